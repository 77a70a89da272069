//! The loop-device implementation (`KernelLoops`: loop ioctls and sysfs,
//! no processes) against a real kernel: attach read-write with direct I/O
//! and read-only, find by identity after a rename, list, size refresh,
//! detach (twice, absent, busy, deferred), many attaches racing for the
//! free device, and no device left behind.
//!
//! Built only with `--features real-kernel`; run as root inside the test VM
//! (`make test-vm`), where `TMPDIR` is an ext4 scratch disk. Every device is
//! detached by a guard, also when an assertion fails, and each test checks
//! through sysfs (not through the code under test) that no loop device is
//! left on its files.

#![cfg(feature = "real-kernel")]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use liveclone::os::loopdev::ioctl::KernelLoops;
use liveclone::os::loopdev::{LoopDevice, LoopDevices, LoopOptions};
use liveclone::os::OsErrorKind;

const MIB: u64 = 1 << 20;

const RW_DIRECT: LoopOptions = LoopOptions {
    read_only: false,
    direct_io: true,
};

const RO_DIRECT: LoopOptions = LoopOptions {
    read_only: true,
    direct_io: true,
};

#[path = "common/kernel.rs"]
mod kernel;
use kernel::{require_real_kernel, scratch, sparse_file};

/// `loopN` of a device path.
fn name_of(device: &Path) -> String {
    device
        .file_name()
        .and_then(|name| name.to_str())
        .expect("a /dev/loopN path")
        .to_owned()
}

/// A sysfs attribute of a loop device, trimmed; `None` if it is absent.
fn sysfs(device: &Path, attribute: &str) -> Option<String> {
    std::fs::read_to_string(
        Path::new("/sys/block")
            .join(name_of(device))
            .join(attribute),
    )
    .ok()
    .map(|text| text.trim_end_matches('\n').to_owned())
}

fn attached_in_sysfs(device: &Path) -> bool {
    sysfs(device, "loop/backing_file").is_some_and(|file| !file.is_empty())
}

/// Every loop device whose backing file is below `dir`, read straight from
/// sysfs, independently of the code under test.
fn loops_below(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let entries = std::fs::read_dir("/sys/block").expect("read /sys/block");
    for entry in entries {
        let entry = entry.expect("a /sys/block entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim_end_matches('\n')).starts_with(dir) {
                found.push(format!("{name}: {}", backing.trim_end()));
            }
        }
    }
    found
}

fn assert_no_loops_below(dir: &Path) {
    let left = loops_below(dir);
    assert!(left.is_empty(), "loop devices left behind: {left:?}");
}

/// An attached loop device, detached on drop.
struct LoopGuard {
    device: LoopDevice,
}

impl LoopGuard {
    fn attach(file: &Path, options: LoopOptions) -> Self {
        let device = KernelLoops::new()
            .attach(file, options)
            .unwrap_or_else(|error| panic!("attaching {}: {error}", file.display()));
        Self { device }
    }

    fn path(&self) -> &Path {
        &self.device.device
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Err(error) = KernelLoops::new().detach(&self.device.device) {
            eprintln!(
                "cleanup: detaching {}: {error}",
                self.device.device.display()
            );
        }
    }
}

/// A device attached by another tool, detached on drop.
struct DetachGuard(PathBuf);

impl Drop for DetachGuard {
    fn drop(&mut self) {
        if let Err(error) = KernelLoops::new().detach(&self.0) {
            eprintln!("cleanup: detaching {}: {error}", self.0.display());
        }
    }
}

/// A mount, lazily unmounted on drop.
struct MountGuard {
    target: PathBuf,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(error) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cleanup: unmounting {}: {error}", self.target.display());
        }
    }
}

#[test]
fn real_loop_attach_read_write_with_direct_io() {
    require_real_kernel();
    let dir = scratch();
    let file = sparse_file(&dir.path().join("rw.img"), 16 * MIB);
    {
        let rw = LoopGuard::attach(&file, RW_DIRECT);
        let device = &rw.device;
        assert!(!device.read_only);
        assert!(
            device.direct_io,
            "TMPDIR is ext4 in the VM, so direct I/O must be in effect"
        );
        assert_eq!(device.size_bytes, 16 * MIB);
        assert_eq!(device.backing_file, file);
        let meta = std::fs::metadata(&file).expect("stat the file");
        assert_eq!(
            (device.backing_dev, device.backing_inode),
            (meta.dev(), meta.ino())
        );
        // What sysfs says, read here and not by the code under test.
        assert_eq!(sysfs(rw.path(), "loop/dio").as_deref(), Some("1"));
        assert_eq!(sysfs(rw.path(), "ro").as_deref(), Some("0"));
        assert_eq!(sysfs(rw.path(), "loop/autoclear").as_deref(), Some("0"));
        assert_eq!(
            sysfs(rw.path(), "dev"),
            Some(format!("{}:{}", device.major, device.minor))
        );
        let node = std::fs::metadata(rw.path()).expect("stat the loop device");
        assert!(node.file_type().is_block_device());
        assert_eq!(
            node.rdev(),
            nix::sys::stat::makedev(device.major.into(), device.minor.into())
        );

        // What goes into the device lands in the file, through an O_DIRECT
        // writer too.
        let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
        let writer = OpenOptions::new()
            .write(true)
            .open(rw.path())
            .expect("open the device for writing");
        writer.write_all_at(&data, 3 * MIB).expect("write");
        writer.sync_all().expect("fsync the device");
        let mut back = vec![0; data.len()];
        File::open(&file)
            .and_then(|f| f.read_exact_at(&mut back, 3 * MIB))
            .expect("read the file");
        assert!(back == data, "the file does not hold what was written");
        let aligned = AlignedBlock::filled(0x5a);
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(rw.path())
            .expect("open the device with O_DIRECT");
        direct
            .write_all_at(aligned.bytes(), 8 * MIB)
            .expect("O_DIRECT write");
        drop(direct);
        let mut block = vec![0; 4096];
        File::open(&file)
            .and_then(|f| f.read_exact_at(&mut block, 8 * MIB))
            .expect("read the file");
        assert!(block.iter().all(|&b| b == 0x5a));
    }
    assert_no_loops_below(dir.path());
}

/// A 4 KiB block at a 4 KiB boundary, for O_DIRECT.
#[repr(C, align(4096))]
struct AlignedBlock([u8; 4096]);

impl AlignedBlock {
    fn filled(byte: u8) -> Box<Self> {
        Box::new(Self([byte; 4096]))
    }

    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

#[test]
fn real_loop_attach_read_only() {
    require_real_kernel();
    let dir = scratch();
    let file = sparse_file(&dir.path().join("ro.img"), 8 * MIB);
    {
        for options in [
            RO_DIRECT,
            LoopOptions {
                read_only: true,
                direct_io: false,
            },
        ] {
            let ro = LoopGuard::attach(&file, options);
            assert!(ro.device.read_only);
            assert_eq!(ro.device.direct_io, options.direct_io, "{options:?}");
            assert_eq!(sysfs(ro.path(), "ro").as_deref(), Some("1"));
            assert_eq!(ro.device.size_bytes, 8 * MIB);
            let write_refused = OpenOptions::new()
                .write(true)
                .open(ro.path())
                .and_then(|device| {
                    device
                        .write_all_at(b"x", 0)
                        .and_then(|()| device.sync_all())
                })
                .is_err();
            assert!(write_refused, "a read-only loop device accepted a write");
        }
        // Read-only and read-write devices on the same file, both found.
        let ro = LoopGuard::attach(&file, RO_DIRECT);
        let rw = LoopGuard::attach(&file, RW_DIRECT);
        let found = KernelLoops::new().find(&file).expect("find");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.contains(&ro.device) && found.contains(&rw.device));
    }
    assert_no_loops_below(dir.path());
}

#[test]
fn real_loop_read_write_attach_of_an_unwritable_file_fails_cleanly() {
    require_real_kernel();
    let dir = scratch();
    let source = dir.path().join("source");
    let target = dir.path().join("read-only");
    std::fs::create_dir(&source).expect("mkdir");
    std::fs::create_dir(&target).expect("mkdir");
    sparse_file(&source.join("f.img"), 4 * MIB);
    // A read-only bind mount: even root cannot open the file for writing.
    nix::mount::mount(
        Some(&source),
        &target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount");
    let mount = MountGuard {
        target: target.clone(),
    };
    nix::mount::mount(
        None::<&str>,
        &target,
        None::<&str>,
        nix::mount::MsFlags::MS_REMOUNT
            | nix::mount::MsFlags::MS_BIND
            | nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .expect("remount read-only");
    let file = target.join("f.img");
    let loops = KernelLoops::new();

    let error = loops
        .attach(&file, RW_DIRECT)
        .expect_err("a read-write attach of a file on a read-only mount");
    assert_eq!(error.kind, OsErrorKind::Failed, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("f.img") && text.contains("attach"),
        "the error names the operation and the file: {text}"
    );
    assert_no_loops_below(dir.path());

    // Read-only is what it can have.
    {
        let ro = LoopGuard::attach(&file, RO_DIRECT);
        assert!(ro.device.read_only);
    }
    drop(mount);
    assert_no_loops_below(dir.path());
}

#[test]
fn real_loop_find_after_rename_and_unlink() {
    require_real_kernel();
    let loops = KernelLoops::new();
    let dir = scratch();
    let a = sparse_file(&dir.path().join("a.img"), 4 * MIB);
    let b = sparse_file(&dir.path().join("b.img"), 4 * MIB);
    {
        let on_a = LoopGuard::attach(&a, RW_DIRECT);
        let on_b = LoopGuard::attach(&b, RW_DIRECT);
        assert_eq!(loops.find(&a).expect("find a"), vec![on_a.device.clone()]);
        assert_eq!(loops.find(&b).expect("find b"), vec![on_b.device.clone()]);

        // Renamed: the kernel's path is stale, the identity still matches.
        let renamed = dir.path().join("a-renamed.img");
        std::fs::rename(&a, &renamed).expect("rename");
        let found = loops.find(&renamed).expect("find after rename");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].device, on_a.device.device);
        // sysfs shows the file's current path: it follows the rename.
        assert_eq!(found[0].backing_file, renamed);
        assert_eq!(
            loops.find(&a).expect_err("the old path is gone").kind,
            OsErrorKind::NotFound
        );
        // A new file at the old path is another file.
        sparse_file(&a, MIB);
        assert_eq!(loops.find(&a).expect("find the new a"), vec![]);

        // Unlinked: still listed, with the kernel's suffix.
        std::fs::remove_file(&b).expect("unlink b");
        let listed = loops.list().expect("list");
        let unlinked = listed
            .iter()
            .find(|device| device.device == on_b.device.device)
            .expect("the device of the unlinked file is listed");
        assert_eq!(
            unlinked.backing_file,
            PathBuf::from(format!("{} (deleted)", b.display()))
        );
    }
    assert_no_loops_below(dir.path());
}

#[test]
fn real_loop_list_agrees_with_sysfs_and_with_losetup() {
    require_real_kernel();
    let loops = KernelLoops::new();
    let dir = scratch();
    let mine = sparse_file(&dir.path().join("mine.img"), 4 * MIB);
    let theirs = sparse_file(&dir.path().join("theirs.img"), 2 * MIB);
    let guard = LoopGuard::attach(&mine, RW_DIRECT);
    // A device attached by util-linux, as another tool on the node would.
    let output = Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(&theirs)
        .output()
        .expect("run losetup");
    assert!(output.status.success(), "losetup: {output:?}");
    let other = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let other_guard = DetachGuard(other.clone());

    let listed = loops.list().expect("list");
    assert!(listed.contains(&guard.device), "{listed:?}");
    let found = loops.find(&theirs).expect("find theirs");
    assert_eq!(found.len(), 1, "{found:?}");
    let theirs_device = &found[0];
    assert_eq!(theirs_device.device, other);
    assert!(theirs_device.read_only && !theirs_device.direct_io);
    assert_eq!(theirs_device.size_bytes, 2 * MIB);
    assert!(listed.contains(theirs_device));

    // Every listed device is bound in sysfs and its numbers match.
    for device in &listed {
        assert!(attached_in_sysfs(&device.device), "{device:?}");
        assert_eq!(
            sysfs(&device.device, "dev"),
            Some(format!("{}:{}", device.major, device.minor))
        );
    }
    // And every bound loop device is listed.
    let bound = std::fs::read_dir("/sys/block")
        .expect("read /sys/block")
        .filter_map(Result::ok)
        .map(|entry| PathBuf::from("/dev").join(entry.file_name()))
        .filter(|device| name_of(device).starts_with("loop") && attached_in_sysfs(device))
        .count();
    assert_eq!(listed.len(), bound);

    loops.detach(&other).expect("detach what losetup attached");
    assert!(!attached_in_sysfs(&other));
    drop(other_guard);
    drop(guard);
    assert_no_loops_below(dir.path());
}

#[test]
fn real_loop_refresh_size_after_growth() {
    require_real_kernel();
    let loops = KernelLoops::new();
    let dir = scratch();
    let file = sparse_file(&dir.path().join("grow.img"), 16 * MIB);
    {
        let device = LoopGuard::attach(&file, RW_DIRECT);
        File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(48 * MIB))
            .expect("grow the file");
        // The device keeps its size until the capacity is re-read.
        assert_eq!(loops.find(&file).expect("find")[0].size_bytes, 16 * MIB);
        loops.refresh_size(device.path()).expect("refresh the size");
        assert_eq!(loops.find(&file).expect("find")[0].size_bytes, 48 * MIB);
        assert_eq!(
            sysfs(device.path(), "size").as_deref(),
            Some((48 * MIB / 512).to_string().as_str())
        );
        // The new end is usable.
        let writer = OpenOptions::new()
            .write(true)
            .open(device.path())
            .expect("open");
        writer.write_all_at(b"tail", 48 * MIB - 4).expect("write");
        writer.sync_all().expect("fsync");

        let error = loops
            .refresh_size(Path::new("/dev/loop4000"))
            .expect_err("no such device");
        assert_eq!(error.kind, OsErrorKind::NotFound, "{error}");
        assert!(error.to_string().contains("/dev/loop4000"), "{error}");
    }
    assert_no_loops_below(dir.path());
}

#[test]
fn real_loop_detach_twice_absent_busy_and_deferred() {
    require_real_kernel();
    let loops = KernelLoops::new();
    let dir = scratch();
    let file = sparse_file(&dir.path().join("d.img"), 4 * MIB);

    let device = loops.attach(&file, RW_DIRECT).expect("attach");
    loops.detach(&device.device).expect("detach");
    assert!(!attached_in_sysfs(&device.device));
    assert_eq!(loops.find(&file).expect("find after detach"), vec![]);
    loops
        .detach(&device.device)
        .expect("detaching again is success");
    loops
        .detach(Path::new("/dev/loop4000"))
        .expect("detaching a device that does not exist is success");

    // Held exclusively (as by a mount or a device-mapper table): busy, and
    // still attached.
    let device = loops.attach(&file, RW_DIRECT).expect("attach");
    let holder = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&device.device)
        .expect("hold the device exclusively");
    let error = loops.detach(&device.device).expect_err("held");
    assert_eq!(error.kind, OsErrorKind::Busy, "{error}");
    assert!(
        error.to_string().contains(&name_of(&device.device)),
        "{error}"
    );
    assert!(attached_in_sysfs(&device.device));
    drop(holder);
    loops.detach(&device.device).expect("detach once released");
    assert!(!attached_in_sysfs(&device.device));

    // A plain opener: the kernel defers the detach to its last close.
    let device = loops.attach(&file, RW_DIRECT).expect("attach");
    let reader = File::open(&device.device).expect("open the device");
    let started = Instant::now();
    loops
        .detach(&device.device)
        .expect("a deferred detach is success");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        sysfs(&device.device, "loop/autoclear").as_deref(),
        Some("1"),
        "marked for detach at the last close"
    );
    drop(reader);
    let deadline = Instant::now() + Duration::from_secs(10);
    while attached_in_sysfs(&device.device) {
        assert!(
            Instant::now() < deadline,
            "never detached after the last close"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_loops_below(dir.path());
}

#[test]
fn real_loop_parallel_attaches_race_for_the_free_device() {
    require_real_kernel();
    const THREADS: usize = 8;
    const ROUNDS: usize = 4;
    let dir = scratch();
    let files: Vec<PathBuf> = (0..THREADS)
        .map(|i| sparse_file(&dir.path().join(format!("p{i}.img")), MIB))
        .collect();
    let loops = Arc::new(KernelLoops::new());
    for round in 0..ROUNDS {
        // All threads ask for the free device at the same moment: the
        // kernel hands most of them the same one.
        let start = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = files
            .iter()
            .cloned()
            .map(|file| {
                let loops = Arc::clone(&loops);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    let options = LoopOptions {
                        read_only: round % 2 == 1,
                        direct_io: true,
                    };
                    loops.attach(&file, options).map(|device| (file, device))
                })
            })
            .collect();
        let attached: Vec<(PathBuf, LoopDevice)> = handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .expect("attach thread")
                    .unwrap_or_else(|error| panic!("round {round}: {error}"))
            })
            .collect();
        let guards: Vec<LoopGuard> = attached
            .iter()
            .map(|(_, device)| LoopGuard {
                device: device.clone(),
            })
            .collect();

        let mut minors: Vec<u32> = attached.iter().map(|(_, device)| device.minor).collect();
        minors.sort_unstable();
        minors.dedup();
        assert_eq!(minors.len(), THREADS, "every attach got its own device");
        for (file, device) in &attached {
            assert_eq!(device.read_only, round % 2 == 1);
            assert!(device.direct_io);
            assert_eq!(
                loops.find(file).expect("find"),
                vec![device.clone()],
                "{} is on exactly its own device",
                file.display()
            );
        }

        // Detach in parallel as well.
        let start = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = guards
            .into_iter()
            .map(|guard| {
                let start = Arc::clone(&start);
                let loops = Arc::clone(&loops);
                std::thread::spawn(move || {
                    start.wait();
                    let result = loops.detach(guard.path());
                    drop(guard);
                    result
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("detach thread").expect("detach");
        }
        // A concurrent listing can defer a detach for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !loops_below(dir.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_no_loops_below(dir.path());
    }
}
