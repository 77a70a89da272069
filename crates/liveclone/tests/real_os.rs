//! The OS layer's Linux implementations against a real kernel: loop devices
//! by ioctl, device-mapper with `dmsetup` (linear and dm-clone),
//! ext4 and xfs with their tools, mounts and the file-system ioctls, and
//! the dm-clone check.
//!
//! Built only with `--features real-kernel`; run as root inside the test VM
//! (`make test-vm`), where `TMPDIR` is an ext4 scratch disk. Every
//! device-mapper device is named `liveclone-test-...` and every device,
//! mount and file is released by a guard, also when an assertion fails.

#![cfg(feature = "real-kernel")]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use liveclone::os::dm::ioctl::DmIoctl;
use liveclone::os::dm::{
    CloneCoreArgs, CloneFeatures, CloneMessage, CloneStatus, CloneTarget, DeviceMapper, DeviceRef,
    DmName, LinearTarget, MetadataMode, RegionSize, Sectors, SuspendFlush, Table, TableLine,
    Target,
};
use liveclone::os::fs::linux::LinuxFilesystems;
use liveclone::os::fs::{Filesystems, FsType};
use liveclone::os::kernel::{Kernel, LinuxKernel};
use liveclone::os::loopdev::ioctl::KernelLoops;
use liveclone::os::loopdev::{LoopDevice, LoopDevices, LoopOptions};
use liveclone::os::OsErrorKind;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

const RW_DIRECT: LoopOptions = LoopOptions {
    read_only: false,
    direct_io: true,
};

#[path = "common/kernel.rs"]
mod kernel;
use kernel::{require_real_kernel, scratch, sparse_file};

/// A device-mapper name unique to this test process.
fn dm_name(tag: &str) -> DmName {
    DmName::with_suffix(&format!("test-{tag}-{}", std::process::id())).expect("valid name")
}

/// Deterministic bytes: no two (seed, offset) pairs of 8 bytes are equal.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut word = offset / 8;
    while out.len() < len {
        let mut z = seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(word.wrapping_mul(0xD1B5_4A32_D192_ED03));
        z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 29;
        out.extend_from_slice(&z.to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

fn write_pattern(path: &Path, seed: u64, bytes: u64) {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|error| panic!("opening {}: {error}", path.display()));
    let chunk = MIB;
    let mut offset = 0;
    while offset < bytes {
        let len = chunk.min(bytes - offset);
        let len_usize = usize::try_from(len).expect("chunk fits in usize");
        file.write_all_at(&pattern(seed, offset, len_usize), offset)
            .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
        offset += len;
    }
    file.sync_all().expect("fsync after the pattern");
}

fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buffer = vec![0; len];
    File::open(path)
        .and_then(|file| file.read_exact_at(&mut buffer, offset))
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    buffer
}

fn assert_pattern(path: &Path, seed: u64, bytes: u64) {
    let mut offset = 0;
    while offset < bytes {
        let len = usize::try_from(MIB.min(bytes - offset)).expect("fits");
        assert!(
            read_range(path, offset, len) == pattern(seed, offset, len),
            "{} differs from pattern {seed} in the MiB at {offset}",
            path.display()
        );
        offset += MIB;
    }
}

/// Runs a tool the tests use to check results independently of the code
/// under test; returns its exit code and stdout.
fn tool(program: &str, args: &[&str]) -> (i32, String) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// The UUID blkid reads from the device itself.
fn blkid_uuid(device: &Path) -> String {
    let (code, stdout) = tool(
        "blkid",
        &["-p", "-s", "UUID", "-o", "value", path_str(device)],
    );
    assert_eq!(code, 0, "blkid of {}", device.display());
    stdout.trim().to_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
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

    fn dm_ref(&self) -> DeviceRef {
        DeviceRef::path(path_str(self.path())).expect("loop paths are valid table paths")
    }

    fn number_ref(&self) -> DeviceRef {
        DeviceRef::number(self.device.major, self.device.minor).expect("valid numbers")
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

/// A device-mapper device, removed on drop (retrying: a reader that just
/// closed it may still be finishing).
struct DmGuard {
    name: DmName,
}

impl DmGuard {
    fn create(name: DmName, table: &Table) -> Self {
        DmIoctl::new()
            .create(&name, table)
            .unwrap_or_else(|error| panic!("creating {name}: {error}"));
        Self { name }
    }

    fn path(&self) -> PathBuf {
        self.name.mapper_path()
    }
}

impl Drop for DmGuard {
    fn drop(&mut self) {
        let dm = DmIoctl::new();
        // A test that failed while the device was suspended would leave
        // remove waiting on it.
        let _ = dm.resume(&self.name);
        for _ in 0..20 {
            match dm.remove(&self.name) {
                Ok(()) => return,
                Err(error) if error.kind == OsErrorKind::Busy => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(error) => {
                    eprintln!("cleanup: removing {}: {error}", self.name);
                    return;
                }
            }
        }
        eprintln!("cleanup: {} stayed busy", self.name);
    }
}

/// A mount point, unmounted on drop (lazily if it is busy).
struct MountGuard {
    target: PathBuf,
}

impl MountGuard {
    fn new(target: &Path) -> Self {
        Self {
            target: target.to_path_buf(),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let fs = LinuxFilesystems::new();
        for _ in 0..5 {
            match fs.mount_at(&self.target) {
                Ok(Some(_)) => {
                    if fs.unmount(&self.target).is_err() {
                        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
                    }
                }
                _ => return,
            }
        }
    }
}

fn status_report(dm: &DmIoctl, name: &DmName) -> liveclone::os::dm::CloneStatusReport {
    let line = dm
        .clone_status(name)
        .unwrap_or_else(|error| panic!("status of {name}: {error}"));
    match line.status {
        CloneStatus::Active(report) => report,
        other => panic!("{name} is not active: {other:?}"),
    }
}

// ---------------------------------------------------------------- loops

#[test]
fn real_loop_attach_find_after_rename_resize_and_detach() {
    require_real_kernel();
    let loops = KernelLoops::new();
    let fs = LinuxFilesystems::new();
    let dir = scratch();
    let a = sparse_file(&dir.path().join("a.img"), 16 * MIB);
    let b = sparse_file(&dir.path().join("b.img"), 8 * MIB);

    let rw = LoopGuard::attach(&a, RW_DIRECT);
    assert!(!rw.device.read_only);
    assert!(
        rw.device.direct_io,
        "TMPDIR is ext4 in the VM, so direct I/O must be in effect"
    );
    assert_eq!(rw.device.size_bytes, 16 * MIB);
    assert_eq!(rw.device.backing_file, a);
    let meta = std::fs::metadata(&a).expect("stat a");
    assert_eq!(
        (rw.device.backing_dev, rw.device.backing_inode),
        (meta.dev(), meta.ino())
    );
    let node = std::fs::metadata(rw.path()).expect("stat the loop device");
    assert!(node.file_type().is_block_device());
    assert_eq!(
        node.rdev(),
        nix::sys::stat::makedev(rw.device.major.into(), rw.device.minor.into())
    );
    // What goes into the device lands in the file.
    write_pattern(rw.path(), 7, MIB);
    assert_pattern(&a, 7, MIB);

    let ro = LoopGuard::attach(
        &b,
        LoopOptions {
            read_only: true,
            direct_io: false,
        },
    );
    assert!(ro.device.read_only && !ro.device.direct_io);
    let write_refused = OpenOptions::new()
        .write(true)
        .open(ro.path())
        .and_then(|file| file.write_all_at(b"x", 0).and_then(|()| file.sync_all()))
        .is_err();
    assert!(write_refused, "a read-only loop device accepted a write");

    assert_eq!(
        loops.find(&a).expect("find a"),
        vec![rw.device.clone()],
        "find by the file's identity"
    );
    assert_eq!(loops.find(&b).expect("find b"), vec![ro.device.clone()]);
    let listed = loops.list().expect("list");
    assert!(listed.contains(&rw.device) && listed.contains(&ro.device));

    // Renamed: the kernel's path is stale, the identity still matches.
    let renamed = dir.path().join("a-renamed.img");
    std::fs::rename(&a, &renamed).expect("rename");
    let found = loops.find(&renamed).expect("find after rename");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].device, rw.device.device);
    assert_eq!(
        loops.find(&a).expect_err("the old path is gone").kind,
        OsErrorKind::NotFound
    );

    // Grown file: the device keeps its size until the capacity is re-read.
    File::options()
        .write(true)
        .open(&renamed)
        .and_then(|file| file.set_len(32 * MIB))
        .expect("grow the file");
    assert_eq!(loops.find(&renamed).expect("find")[0].size_bytes, 16 * MIB);
    loops.refresh_size(rw.path()).expect("set capacity");
    assert_eq!(loops.find(&renamed).expect("find")[0].size_bytes, 32 * MIB);
    assert_eq!(
        fs.block_size_bytes(rw.path()).expect("BLKGETSIZE64"),
        32 * MIB
    );

    loops.detach(rw.path()).expect("detach");
    assert_eq!(loops.find(&renamed).expect("find after detach"), vec![]);
    loops.detach(rw.path()).expect("detaching again is success");
    loops
        .detach(Path::new("/dev/loop4000"))
        .expect("detaching a device that does not exist is success");
}

#[test]
fn real_loop_direct_io_falls_back_to_buffered_on_tmpfs() {
    require_real_kernel();
    let shm = Path::new("/dev/shm");
    let on_tmpfs = nix::sys::statfs::statfs(shm)
        .is_ok_and(|stat| stat.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    assert!(on_tmpfs, "/dev/shm must be tmpfs (it is in the VM)");
    let dir = tempfile::Builder::new()
        .prefix("liveclone-test-")
        .tempdir_in(shm)
        .expect("directory on tmpfs");
    let file = sparse_file(&dir.path().join("c.img"), 4 * MIB);
    // tmpfs on 6.1 cannot open files with O_DIRECT: the open fails with
    // EINVAL, and attach falls back to buffered I/O.
    let attached = LoopGuard::attach(&file, RW_DIRECT);
    assert!(!attached.device.direct_io);
    assert!(!attached.device.read_only);
    write_pattern(attached.path(), 3, MIB);
    assert_pattern(&file, 3, MIB);
}

// ------------------------------------------------------- device-mapper

#[test]
fn real_dm_linear_create_info_table_suspend_reload_remove() {
    require_real_kernel();
    let dm = DmIoctl::new();
    let loops = KernelLoops::new();
    let fs = LinuxFilesystems::new();
    let dir = scratch();
    let backing = LoopGuard::attach(
        &sparse_file(&dir.path().join("lin.img"), 16 * MIB),
        RW_DIRECT,
    );
    let name = dm_name("lin");
    let len = Sectors(16 * MIB / SECTOR);

    let table = Table::linear(len, backing.dm_ref()).expect("table");
    let device = DmGuard::create(name.clone(), &table);

    let info = dm.info(&name).expect("info").expect("the device exists");
    assert!(!info.suspended && !info.inactive_table);
    assert_eq!(info.open_count, 0);
    let node = std::fs::metadata(device.path()).expect("the /dev/mapper node exists");
    assert!(node.file_type().is_block_device());
    assert_eq!(
        node.rdev(),
        nix::sys::stat::makedev(info.major.into(), info.minor.into())
    );
    // The kernel prints devices as major:minor.
    assert_eq!(
        dm.table(&name).expect("table"),
        Table::linear(len, backing.number_ref()).expect("table")
    );
    assert_eq!(fs.block_size_bytes(&device.path()).expect("size"), 16 * MIB);
    assert!(dm.list().expect("list").contains(&name));

    assert_eq!(
        dm.create(&name, &table)
            .expect_err("the name is taken")
            .kind,
        OsErrorKind::Busy
    );

    for flush in [SuspendFlush::Flush, SuspendFlush::NoFlush] {
        dm.suspend(&name, flush).expect("suspend");
        assert!(dm.info(&name).expect("info").expect("exists").suspended);
        dm.resume(&name).expect("resume");
        assert!(!dm.info(&name).expect("info").expect("exists").suspended);
    }

    // A two-line table of half the length, swapped in by resume.
    let half = Sectors(len.0 / 2);
    let quarter = Sectors(len.0 / 4);
    let reload = Table::new(vec![
        TableLine {
            start: Sectors::ZERO,
            length: quarter,
            target: Target::Linear(LinearTarget {
                device: backing.dm_ref(),
                offset: Sectors::ZERO,
            }),
        },
        TableLine {
            start: quarter,
            length: quarter,
            target: Target::Linear(LinearTarget {
                device: backing.dm_ref(),
                offset: half,
            }),
        },
    ])
    .expect("table");
    dm.load(&name, &reload).expect("load");
    assert!(
        dm.info(&name)
            .expect("info")
            .expect("exists")
            .inactive_table
    );
    assert_eq!(
        dm.table(&name).expect("table").length(),
        len,
        "still the old table"
    );
    dm.resume(&name).expect("resume");
    assert!(
        !dm.info(&name)
            .expect("info")
            .expect("exists")
            .inactive_table
    );
    let live = dm.table(&name).expect("table");
    assert_eq!(live.length(), half);
    assert_eq!(live.lines().len(), 2);
    assert_eq!(
        fs.block_size_bytes(&device.path()).expect("size"),
        half.0 * SECTOR
    );

    // The loop device under the table cannot be detached.
    assert_eq!(
        loops.detach(backing.path()).expect_err("held by dm").kind,
        OsErrorKind::Busy
    );
    assert_eq!(
        loops
            .find(&backing.device.backing_file)
            .expect("find")
            .len(),
        1
    );

    // An open device cannot be removed.
    let opener = File::open(device.path()).expect("open the dm device");
    assert_eq!(dm.info(&name).expect("info").expect("exists").open_count, 1);
    assert_eq!(dm.remove(&name).expect_err("open").kind, OsErrorKind::Busy);
    assert!(dm.info(&name).expect("info").is_some());
    drop(opener);

    dm.remove(&name).expect("remove");
    assert_eq!(dm.info(&name).expect("info"), None);
    assert!(!device.path().exists(), "the node is removed too");
    assert!(!dm.list().expect("list").contains(&name));
    dm.remove(&name)
        .expect("removing an absent device is success");
    assert_eq!(
        dm.table(&name).expect_err("absent").kind,
        OsErrorKind::NotFound
    );
    assert_eq!(
        dm.wait_event(&name, 0, Duration::from_secs(5))
            .expect_err("absent")
            .kind,
        OsErrorKind::NotFound
    );

    // A refused table leaves no half-made device behind.
    let bad = Table::linear(
        len,
        DeviceRef::path("/dev/liveclone-test-no-such-device").expect("valid path"),
    )
    .expect("table");
    let bad_name = dm_name("bad");
    assert!(dm.create(&bad_name, &bad).is_err());
    assert_eq!(dm.info(&bad_name).expect("info"), None);
}

#[test]
fn real_dm_clone_tunables_status_events_and_switch_to_linear() {
    require_real_kernel();
    let dm = DmIoctl::new();
    let loops = KernelLoops::new();
    let fs = LinuxFilesystems::new();
    let dir = scratch();
    let size = 16 * MIB;
    let source = LoopGuard::attach(&sparse_file(&dir.path().join("src.img"), size), RW_DIRECT);
    let dest = LoopGuard::attach(&sparse_file(&dir.path().join("dst.img"), size), RW_DIRECT);
    // Zeroed (sparse) metadata: dm-clone formats it on first load. 4 MiB is
    // far above the floor of regions/4 + 1 MiB for 4096 regions.
    let meta = LoopGuard::attach(
        &sparse_file(&dir.path().join("meta.img"), 4 * MIB),
        RW_DIRECT,
    );
    write_pattern(source.path(), 11, size);

    let len = Sectors(size / SECTOR);
    let region = RegionSize::MIN;
    let target = |metadata: DeviceRef, destination: DeviceRef, source: DeviceRef| CloneTarget {
        metadata,
        destination,
        source,
        region_size: region,
        features: CloneFeatures {
            no_hydration: true,
            no_discard_passdown: false,
        },
        core: CloneCoreArgs::default(),
    };
    let table = Table::clone_with_tail(
        len,
        len,
        target(meta.dm_ref(), dest.dm_ref(), source.dm_ref()),
    )
    .expect("clone table");
    let name = dm_name("clone");
    let clone = DmGuard::create(name.clone(), &table);

    assert_eq!(
        dm.table(&name).expect("table"),
        Table::clone_with_tail(
            len,
            len,
            target(meta.number_ref(), dest.number_ref(), source.number_ref())
        )
        .expect("table"),
        "the live table reads back as loaded, with device numbers"
    );

    let fresh = status_report(&dm, &name);
    assert_eq!(fresh.hydrated_regions, 0);
    assert_eq!(fresh.total_regions, region.regions_in(len));
    assert_eq!(fresh.region_size, region);
    assert!(fresh.features.no_hydration);
    assert_eq!(fresh.metadata_mode, MetadataMode::ReadWrite);
    assert_eq!(
        (fresh.hydration_threshold, fresh.hydration_batch_size),
        (1, 1),
        "the kernel's defaults before any message"
    );

    dm.message(&name, &CloneMessage::HydrationThreshold(64))
        .expect("threshold");
    dm.message(&name, &CloneMessage::HydrationBatchSize(16))
        .expect("batch size");
    let tuned = status_report(&dm, &name);
    assert_eq!(
        (tuned.hydration_threshold, tuned.hydration_batch_size),
        (64, 16)
    );

    // Reads go to the source and hydrate nothing.
    assert_pattern(&clone.path(), 11, size);
    assert_eq!(status_report(&dm, &name).hydrated_regions, 0);

    let before = dm.info(&name).expect("info").expect("exists").event_nr;
    let started = Instant::now();
    assert_eq!(
        dm.wait_event(&name, before, Duration::from_millis(500))
            .expect("wait"),
        None,
        "nothing happened, so the wait times out"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
        "waited {waited:?}"
    );
    // The kernel returns at once when the counter differs from the one given.
    let started = Instant::now();
    assert_eq!(
        dm.wait_event(&name, before.wrapping_add(1), Duration::from_secs(30))
            .expect("wait"),
        Some(before)
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Hydration completing fires an event.
    let waiter = {
        let name = name.clone();
        std::thread::spawn(move || {
            DmIoctl::new().wait_event(&name, before, Duration::from_secs(300))
        })
    };
    dm.message(&name, &CloneMessage::EnableHydration)
        .expect("enable hydration");
    let after = waiter
        .join()
        .expect("the waiter did not panic")
        .expect("wait");
    assert!(
        after.is_some_and(|event| event != before),
        "no event within 300 s: {after:?}"
    );
    let done = status_report(&dm, &name);
    assert!(done.may_switch_to_linear(), "{done:?}");
    assert!(!done.features.no_hydration);
    assert_pattern(dest.path(), 11, size);

    // While the clone table is live, its metadata device is held.
    assert_eq!(
        loops.detach(meta.path()).expect_err("held").kind,
        OsErrorKind::Busy
    );

    // The switch the driver makes after hydration.
    fs.flush(&clone.path()).expect("flush");
    dm.suspend(&name, SuspendFlush::Flush).expect("suspend");
    let linear = table.linear_replacement().expect("linear replacement");
    dm.load(&name, &linear).expect("load linear");
    dm.resume(&name).expect("resume");
    assert_eq!(
        dm.table(&name).expect("table"),
        Table::linear(len, dest.number_ref()).expect("table")
    );
    assert!(
        dm.clone_status(&name).is_err(),
        "no clone target after the switch"
    );
    assert_pattern(&clone.path(), 11, size);
    loops
        .detach(meta.path())
        .expect("the metadata device is free after the switch");
    drop(meta);
}

// -------------------------------------------------------- file systems

#[test]
fn real_ext4_format_mount_trim_freeze_grow_bind_and_usage() {
    require_real_kernel();
    let fs = LinuxFilesystems::new();
    let loops = KernelLoops::new();
    let dir = scratch();
    let image = sparse_file(&dir.path().join("ext4.img"), 64 * MIB);
    let device = LoopGuard::attach(&image, RW_DIRECT);

    assert_eq!(fs.probe(device.path()).expect("probe"), None);
    assert_eq!(
        fs.probe(Path::new("/dev/liveclone-test-none"))
            .expect_err("no such device")
            .kind,
        OsErrorKind::NotFound
    );
    fs.mkfs(device.path(), FsType::Ext4, true)
        .expect("mkfs.ext4");
    assert_eq!(
        fs.probe(device.path()).expect("probe").as_deref(),
        Some("ext4")
    );
    assert!(
        fs.mkfs(device.path(), FsType::Ext4, true).is_err(),
        "mkfs refuses a device that is not blank"
    );
    let uuid = blkid_uuid(device.path());

    // A space in the path exercises mountinfo's \040 escape.
    let mnt = dir.path().join("mnt point");
    let mnt2 = dir.path().join("mnt2");
    std::fs::create_dir(&mnt).expect("mkdir");
    std::fs::create_dir(&mnt2).expect("mkdir");
    fs.mount(device.path(), &mnt, FsType::Ext4, &["noatime".to_owned()])
        .expect("mount with an option");
    let _mounted = MountGuard::new(&mnt);
    fs.mount(device.path(), &mnt2, FsType::Ext4, &[])
        .expect("mount without options");
    let _mounted2 = MountGuard::new(&mnt2);
    let flags = |path: &Path| nix::sys::statvfs::statvfs(path).expect("statvfs").flags();
    assert!(flags(&mnt).contains(nix::sys::statvfs::FsFlags::ST_NOATIME));
    assert!(!flags(&mnt2).contains(nix::sys::statvfs::FsFlags::ST_NOATIME));

    let info = fs.mount_at(&mnt).expect("mountinfo").expect("mounted");
    assert_eq!(info.mount_point, mnt);
    assert_eq!(info.fs_type, "ext4");
    assert_eq!(info.source, path_str(device.path()));
    assert_eq!(
        (info.major, info.minor),
        (device.device.major, device.device.minor)
    );
    assert_eq!(info.root, PathBuf::from("/"));
    assert!(!info.read_only);
    let points: Vec<PathBuf> = fs
        .mounts_of(device.device.major, device.device.minor)
        .expect("mounts_of")
        .into_iter()
        .map(|mount| mount.mount_point)
        .collect();
    assert_eq!(points, vec![mnt.clone(), mnt2.clone()]);

    // Usage follows what is written.
    let empty = fs.usage(&mnt).expect("usage");
    assert!(empty.total_bytes > 40 * MIB && empty.total_bytes <= 64 * MIB);
    assert!(empty.available_bytes <= empty.total_bytes);
    let big = mnt.join("big");
    sparse_file(&big, 0);
    write_pattern(&big, 5, 8 * MIB);
    let full = fs.usage(&mnt).expect("usage");
    assert!(
        full.used_bytes >= empty.used_bytes + 8 * MIB,
        "{empty:?} -> {full:?}"
    );
    assert_eq!(full.used_inodes, empty.used_inodes + 1);
    std::fs::remove_file(&big).expect("rm");
    let trimmed = fs.trim(&mnt).expect("FITRIM");
    assert!(trimmed >= 8 * MIB, "trimmed only {trimmed} bytes");

    // Frozen: a write with fsync waits for the thaw.
    fs.freeze(&mnt).expect("freeze");
    let refreeze = fs.freeze(&mnt);
    let writer = {
        let path = mnt.join("during-freeze");
        std::thread::spawn(move || {
            File::create(&path)
                .and_then(|mut file| file.write_all(b"thawed").and_then(|()| file.sync_all()))
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let finished_while_frozen = writer.is_finished();
    fs.thaw(&mnt).expect("thaw");
    assert_eq!(
        refreeze.expect_err("already frozen").kind,
        OsErrorKind::Busy
    );
    assert!(
        !finished_while_frozen,
        "a write completed on a frozen file system"
    );
    writer
        .join()
        .expect("writer")
        .expect("the write completes after the thaw");
    fs.thaw(&mnt)
        .expect("thawing a thawed file system is success");

    // Grow: file, loop capacity, then the file system.
    File::options()
        .write(true)
        .open(&image)
        .and_then(|file| file.set_len(128 * MIB))
        .expect("grow the image");
    loops.refresh_size(device.path()).expect("set capacity");
    fs.grow(device.path(), &mnt, FsType::Ext4)
        .expect("resize2fs");
    let grown = fs.usage(&mnt).expect("usage");
    assert!(
        grown.total_bytes >= empty.total_bytes + 50 * MIB,
        "{empty:?} -> {grown:?}"
    );

    // Read-only bind of a directory.
    let data = mnt.join("data");
    std::fs::create_dir(&data).expect("mkdir data");
    std::fs::write(data.join("file"), b"content").expect("write");
    let view = dir.path().join("view");
    std::fs::create_dir(&view).expect("mkdir view");
    fs.bind_mount(&data, &view, true).expect("bind ro");
    let bound = MountGuard::new(&view);
    assert_eq!(std::fs::read(view.join("file")).expect("read"), b"content");
    let refused = std::fs::write(view.join("new"), b"x").expect_err("read-only bind");
    assert_eq!(refused.raw_os_error(), Some(nix::libc::EROFS));
    std::fs::write(data.join("new"), b"x").expect("the source stays writable");
    let info = fs.mount_at(&view).expect("mountinfo").expect("bound");
    assert!(info.read_only);
    assert_eq!(info.root, PathBuf::from("/data"));
    assert_eq!(info.fs_type, "ext4");
    fs.unmount(&view).expect("unmount");
    assert_eq!(fs.mount_at(&view).expect("mountinfo"), None);
    fs.unmount(&view)
        .expect("unmounting a non-mount is success");
    drop(bound);

    // Block device nodes bound onto files: read-only and read-write.
    let ro_node = sparse_file(&dir.path().join("block-ro"), 0);
    fs.bind_mount(device.path(), &ro_node, true)
        .expect("bind node ro");
    let _ro_bound = MountGuard::new(&ro_node);
    assert_eq!(
        read_range(&ro_node, 0, 4096),
        read_range(device.path(), 0, 4096)
    );
    // The kernel does not apply a mount's read-only flag to device nodes:
    // the node still opens for writing and writes reach the device. A
    // read-only raw block volume needs a read-only device underneath.
    let writable = OpenOptions::new()
        .write(true)
        .open(&ro_node)
        .and_then(|file| file.write_all_at(&[0x5A; 512], 60 * MIB));
    assert!(
        writable.is_ok(),
        "a read-only bind of a device node now refuses writes ({writable:?}); \
         update LinuxFilesystems::bind_mount's documentation"
    );
    assert_eq!(read_range(device.path(), 60 * MIB, 512), vec![0x5A; 512]);
    let node_info = fs.mount_at(&ro_node).expect("mountinfo").expect("bound");
    assert!(node_info.read_only);
    assert_eq!(
        node_info.root.file_name(),
        device.path().file_name(),
        "the bind's root is the node"
    );
    let rw_node = sparse_file(&dir.path().join("block-rw"), 0);
    fs.bind_mount(device.path(), &rw_node, false)
        .expect("bind node rw");
    let _rw_bound = MountGuard::new(&rw_node);
    OpenOptions::new()
        .write(true)
        .open(&rw_node)
        .expect("a read-write bound node opens for writing");

    // Reflink is not available on ext4; nothing is left behind.
    let source = mnt.join("data/file");
    let copy = mnt.join("copy");
    assert_eq!(
        fs.reflink(&source, &copy).expect_err("ext4").kind,
        OsErrorKind::Unsupported
    );
    assert!(!copy.exists());

    for path in [source.as_path(), mnt.as_path(), device.path()] {
        fs.flush(path)
            .unwrap_or_else(|error| panic!("flush {}: {error}", path.display()));
    }
    assert_eq!(
        fs.flush(&mnt.join("missing")).expect_err("missing").kind,
        OsErrorKind::NotFound
    );

    drop(_rw_bound);
    drop(_ro_bound);
    fs.unmount(&mnt2).expect("unmount");
    fs.unmount(&mnt).expect("unmount");
    assert_eq!(fs.mount_at(&mnt).expect("mountinfo"), None);
    assert_eq!(
        fs.mounts_of(device.device.major, device.device.minor)
            .expect("mounts_of"),
        vec![]
    );

    // ext4: deliberately a no-op (see LinuxFilesystems).
    fs.regenerate_uuid(device.path(), FsType::Ext4)
        .expect("regenerate on ext4");
    assert_eq!(blkid_uuid(device.path()), uuid);
}

#[test]
fn real_xfs_reflink_grow_and_new_uuid_after_an_unclean_stop() {
    require_real_kernel();
    let fs = LinuxFilesystems::new();
    let loops = KernelLoops::new();
    let dir = scratch();
    // mkfs.xfs refuses devices under 300 MiB. Sparse: little is written.
    let image = sparse_file(&dir.path().join("xfs.img"), 320 * MIB);
    let device = LoopGuard::attach(&image, RW_DIRECT);
    fs.mkfs(device.path(), FsType::Xfs, true).expect("mkfs.xfs");
    assert_eq!(
        fs.probe(device.path()).expect("probe").as_deref(),
        Some("xfs")
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    fs.mount(device.path(), &mnt, FsType::Xfs, &[])
        .expect("mount");
    let mounted = MountGuard::new(&mnt);

    let source = mnt.join("source");
    sparse_file(&source, 0);
    write_pattern(&source, 21, 16 * MIB);
    let before = fs.usage(&mnt).expect("usage");
    let copy = mnt.join("copy");
    fs.reflink(&source, &copy).expect("FICLONE on xfs");
    fs.flush(&copy).expect("flush");
    fs.flush(&mnt).expect("flush the directory");
    assert_pattern(&copy, 21, 16 * MIB);
    let after = fs.usage(&mnt).expect("usage");
    assert!(
        after.used_bytes < before.used_bytes + 4 * MIB,
        "a reflink shares blocks: {before:?} -> {after:?}"
    );
    // Copy-on-write: the source does not change.
    OpenOptions::new()
        .write(true)
        .open(&copy)
        .and_then(|file| file.write_all_at(&[0xAA; 4096], 0))
        .expect("write to the copy");
    assert_pattern(&source, 21, 16 * MIB);

    // An existing destination is never replaced or removed.
    let existing = mnt.join("existing");
    std::fs::write(&existing, b"keep").expect("write");
    assert!(fs.reflink(&source, &existing).is_err());
    assert_eq!(std::fs::read(&existing).expect("read"), b"keep");
    assert_eq!(
        fs.reflink(&mnt.join("missing"), &mnt.join("never"))
            .expect_err("no source")
            .kind,
        OsErrorKind::NotFound
    );
    assert!(!mnt.join("never").exists());

    // Grow.
    File::options()
        .write(true)
        .open(&image)
        .and_then(|file| file.set_len(400 * MIB))
        .expect("grow the image");
    loops.refresh_size(device.path()).expect("set capacity");
    fs.grow(device.path(), &mnt, FsType::Xfs)
        .expect("xfs_growfs");
    let grown = fs.usage(&mnt).expect("usage");
    assert!(
        grown.total_bytes >= after.total_bytes + 60 * MIB,
        "{after:?} -> {grown:?}"
    );

    // Stop without a clean unmount: metadata committed to the log only,
    // then a shutdown. This is what a clone of a mounted source looks like.
    std::fs::write(mnt.join("late"), b"late").expect("write");
    nix::unistd::sync();
    let (code, _) = tool("xfs_io", &["-x", "-c", "shutdown", path_str(&mnt)]);
    assert_eq!(code, 0, "xfs_io shutdown");
    fs.unmount(&mnt).expect("unmount after shutdown");
    drop(mounted);
    let (code, _) = tool("xfs_repair", &["-n", path_str(device.path())]);
    assert_ne!(code, 0, "precondition: the log is dirty");

    let old = blkid_uuid(device.path());
    fs.regenerate_uuid(device.path(), FsType::Xfs)
        .expect("a new UUID despite the dirty log");
    let new = blkid_uuid(device.path());
    assert_ne!(new, old);
    let (code, _) = tool("xfs_repair", &["-n", path_str(device.path())]);
    assert_eq!(code, 0, "clean and consistent afterwards");
    fs.regenerate_uuid(device.path(), FsType::Xfs)
        .expect("again on a clean log");
    assert_ne!(blkid_uuid(device.path()), new);

    fs.mount(device.path(), &mnt, FsType::Xfs, &[])
        .expect("mounts with its new UUID");
    let _mounted = MountGuard::new(&mnt);
    assert_pattern(&source, 21, 16 * MIB);
}

// --------------------------------------------------------------- kernel

#[test]
fn real_kernel_has_dm_clone() {
    require_real_kernel();
    let version = LinuxKernel::new()
        .ensure_dm_clone()
        .expect("the VM's kernel has dm-clone");
    let parts: Vec<&str> = version.split('.').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "not a target version: {version:?}"
    );
    assert_eq!(parts[0], "1", "dm-clone target major version");
}
