//! The LVM pool against real LVM and the real kernel: `LinuxLvm` (the
//! `lvm` binary, JSON reports) under `LvmPool`, for a thick and a thin
//! device class.
//!
//! Built only with `--features real-kernel`; run as root inside the test VM
//! (`make test-vm`), which has lvm2 from the host's root file system and no
//! udev. The volume group goes on the virtio disk with serial `lc-lvm-a`
//! when the VM has one (`vmtest test --disk lc-lvm-a=FILE ...`), else on a
//! loop device over a sparse file in `TMPDIR`. Each test makes its own
//! volume group (its name has dashes, which device-mapper names double)
//! and removes it, its PV and its loop device in a guard, also when an
//! assertion fails. The tests take one lock, so the one disk serves them
//! in turn.

#![cfg(feature = "real-kernel")]

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

use liveclone::domain::error::ErrorCode;
use liveclone::domain::ids::{SnapshotId, VolumeId};
use liveclone::domain::lvm_pool::{LvmClassConfig, LvmPool};
use liveclone::domain::pool::{Pool, Storage};
use liveclone::os::loopdev::ioctl::KernelLoops;
use liveclone::os::loopdev::{LoopDevice, LoopDevices, LoopOptions};
use liveclone::os::lvm::{report, LinuxLvm, LvType, Lvm, LvmErrorKind, LVM_CONFIG};

#[path = "common/kernel.rs"]
mod kernel;
use kernel::{require_real_kernel, scratch, sparse_file};

const MIB: u64 = 1 << 20;
const VIRTIO_DISK: &str = "/dev/disk/by-id/virtio-lc-lvm-a";
/// Size of the loop-backed PV (sparse; only what the tests write takes
/// space on the scratch disk).
const LOOP_PV_BYTES: u64 = 1024 * MIB;

/// One volume group at a time: they may share the virtio disk.
static DISK: Mutex<()> = Mutex::new(());

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The `lvm` binary: the VM shares the host's root, where Debian puts it
/// in /usr/sbin (PATH may not have it).
fn lvm_binary() -> PathBuf {
    ["/usr/sbin/lvm", "/sbin/lvm"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("lvm"))
}

/// Runs `lvm <subcommand> --config ... <args>`: the test's own set-up
/// calls, with the driver's configuration (no udev here either).
fn try_lvm(subcommand: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(lvm_binary())
        .arg(subcommand)
        .arg("--config")
        .arg(LVM_CONFIG)
        .args(args)
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| format!("cannot run lvm: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "lvm {subcommand} {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn lvm(subcommand: &str, args: &[&str]) -> String {
    try_lvm(subcommand, args).unwrap_or_else(|e| panic!("{e}"))
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// A volume group for one test, removed with everything in it on drop.
struct VolumeGroup {
    name: String,
    pv: PathBuf,
    loop_device: Option<LoopDevice>,
    _dir: Option<tempfile::TempDir>,
    _lock: MutexGuard<'static, ()>,
}

impl VolumeGroup {
    /// `lc-test-<tag>` on the virtio disk or a loop device, with a thin
    /// pool `tp0` of `thin_pool_mib` (zeroing on) when asked.
    fn new(tag: &str, thin_pool_mib: Option<u64>) -> Self {
        require_real_kernel();
        let lock = DISK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // LVM loads dm-thin-pool on demand too; loading it here makes a
        // missing module fail with a plain message.
        run("modprobe", &["dm-thin-pool"]);
        let name = format!("lc-test-{tag}");
        // A group left by an earlier run that was killed.
        let _ = try_lvm("vgremove", &["-ff", "-y", &name]);
        let (pv, loop_device, dir) = if Path::new(VIRTIO_DISK).exists() {
            let _ = try_lvm("pvremove", &["-ff", "-y", VIRTIO_DISK]);
            run("wipefs", &["-a", VIRTIO_DISK]);
            (PathBuf::from(VIRTIO_DISK), None, None)
        } else {
            let dir = scratch();
            let file = sparse_file(&dir.path().join("pv.img"), LOOP_PV_BYTES);
            let device = KernelLoops::new()
                .attach(
                    &file,
                    LoopOptions {
                        read_only: false,
                        direct_io: true,
                    },
                )
                .expect("a loop device for the PV");
            (device.device.clone(), Some(device), Some(dir))
        };
        let group = Self {
            name,
            pv,
            loop_device,
            _dir: dir,
            _lock: lock,
        };
        let pv = group.pv.to_string_lossy().into_owned();
        lvm("pvcreate", &["-y", &pv]);
        lvm("vgcreate", &[&group.name, &pv]);
        if let Some(mib) = thin_pool_mib {
            group.add_thin_pool("tp0", mib);
        }
        say(&format!("volume group {} on {pv}", group.name));
        group
    }

    fn add_thin_pool(&self, pool: &str, mib: u64) {
        let size = format!("{mib}m");
        lvm(
            "lvcreate",
            &[
                "--yes",
                "--type",
                "thin-pool",
                "-L",
                &size,
                "-Zy",
                "-n",
                pool,
                &self.name,
            ],
        );
    }

    fn pool(&self, class: &str, thin_pool: Option<&str>, ratio: f64) -> LvmPool {
        let config = LvmClassConfig {
            volume_group: self.name.clone(),
            thin_pool: thin_pool.map(str::to_owned),
            overprovision_ratio: ratio,
        };
        let lvm: Arc<dyn Lvm> = Arc::new(LinuxLvm::with_program(lvm_binary()));
        LvmPool::open(class, &config, lvm).unwrap_or_else(|e| panic!("opening {class}: {e}"))
    }

    fn figures(&self) -> liveclone::os::lvm::VolumeGroup {
        LinuxLvm::with_program(lvm_binary())
            .volume_group(&self.name)
            .expect("vgs")
    }
}

impl Drop for VolumeGroup {
    fn drop(&mut self) {
        let pv = self.pv.to_string_lossy().into_owned();
        let steps = [
            try_lvm("vgremove", &["-ff", "-y", &self.name]),
            try_lvm("pvremove", &["-ff", "-y", &pv]),
        ];
        for step in steps {
            if let Err(e) = step {
                say(&format!("cleanup: {e}"));
            }
        }
        if let Some(device) = &self.loop_device {
            if let Err(e) = KernelLoops::new().detach(&device.device) {
                say(&format!(
                    "cleanup: detaching {}: {e}",
                    device.device.display()
                ));
            }
        }
    }
}

fn volume(n: u32) -> VolumeId {
    VolumeId::for_name(&format!("real-lvm-volume-{n}")).expect("valid")
}

fn snapshot(n: u32) -> SnapshotId {
    SnapshotId::for_name(&format!("real-lvm-snapshot-{n}")).expect("valid")
}

fn data(n: u32) -> Storage {
    Storage::Data {
        volume: volume(n),
        generation: 1,
    }
}

/// Deterministic bytes for a seed and an offset.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
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

fn write_at(device: &Path, offset: u64, bytes: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(device)
        .unwrap_or_else(|e| panic!("opening {}: {e}", device.display()));
    file.write_all_at(bytes, offset)
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| panic!("writing {}: {e}", device.display()));
}

/// Reads with O_DIRECT, so what is compared comes from the device, not
/// from a page cache filled by an earlier LV on the same blocks.
fn read_at(device: &Path, offset: u64, len: usize) -> Vec<u8> {
    const ALIGN: usize = 4096;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(device)
        .unwrap_or_else(|e| panic!("opening {}: {e}", device.display()));
    let rounded = len.div_ceil(ALIGN) * ALIGN;
    let mut buffer = vec![0u8; rounded + ALIGN];
    let start = buffer.as_ptr().align_offset(ALIGN);
    let window = &mut buffer[start..start + rounded];
    file.read_exact_at(window, offset)
        .unwrap_or_else(|e| panic!("reading {}: {e}", device.display()));
    window[..len].to_vec()
}

/// The kernel's size of a block device.
fn device_bytes(major: u32, minor: u32) -> u64 {
    let path = format!("/sys/dev/block/{major}:{minor}/size");
    let sectors: u64 = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {path}: {e}"))
        .trim()
        .parse()
        .expect("a sector count");
    sectors * 512
}

fn assert_all_zero(bytes: &[u8], what: &str) {
    if let Some(at) = bytes.iter().position(|b| *b != 0) {
        panic!("{what}: byte {at} is {:#04x}, not zero", bytes[at]);
    }
}

#[test]
fn reports_parse_as_lvm_prints_them() {
    let group = VolumeGroup::new("report", Some(64));
    let pool = group.pool("fast", Some("tp0"), 2.0);
    pool.create(&data(1), 8 * MIB).expect("created");
    pool.clone_instant(&data(1), &Storage::Image(snapshot(1)))
        .expect("snapshot");
    lvm(
        "lvcreate",
        &["--yes", "-n", "plain", "-L", "4m", &group.name],
    );
    lvm("lvextend", &["-L", "8m", &format!("{}/plain", group.name)]);

    let lvs_args = [
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        report::LV_FIELDS,
        &group.name,
    ];
    let json = lvm("lvs", &lvs_args);
    say(&format!("lvs JSON:\n{json}"));
    let volumes = report::parse_lvs(&json).expect("parses");
    let names: Vec<&str> = volumes.iter().map(|lv| lv.name.as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let plain = volumes.iter().find(|lv| lv.name == "plain").expect("plain");
    assert_eq!(plain.lv_type, LvType::Plain);
    assert_eq!(plain.size_bytes, 8 * MIB);
    assert!(plain.is_active());
    let thin = volumes
        .iter()
        .find(|lv| lv.pool.as_deref() == Some("tp0") && lv.origin.is_none())
        .expect("the thin LV");
    assert_eq!(thin.lv_type, LvType::Thin);
    assert!(thin.has_tag("liveclone.io/class=fast"));
    let escaped = group.name.replace('-', "--");
    assert!(
        thin.dm_path.as_ref().is_some_and(|p| p
            .to_string_lossy()
            .starts_with(&format!("/dev/mapper/{escaped}-lcv--"))),
        "{:?}",
        thin.dm_path
    );

    let pool_args = [
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        report::THIN_POOL_FIELDS,
        &format!("{}/tp0", group.name),
    ];
    let json = lvm("lvs", &pool_args);
    say(&format!("thin pool JSON:\n{json}"));
    let pools = report::parse_thin_pools(&json).expect("parses");
    assert_eq!(pools.len(), 1);
    assert!(pools[0].zeroes_new_blocks);
    assert_eq!(pools[0].volume.size_bytes, 64 * MIB);
    assert!(pools[0].volume.data_used.is_some());

    let json = lvm(
        "vgs",
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            report::VG_FIELDS,
            &group.name,
        ],
    );
    say(&format!("vgs JSON:\n{json}"));
    let groups = report::parse_vgs(&json).expect("parses");
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].extent_bytes, 4 * MIB);
}

/// LVM's real messages map to the kinds the pool relies on.
#[test]
fn lvm_failures_have_kinds() {
    let group = VolumeGroup::new("errors", None);
    let lvm = LinuxLvm::with_program(lvm_binary());
    let vg = group.name.as_str();
    let tags = ["liveclone".to_owned()];
    lvm.create_linear(vg, "one", 4 * MIB, &tags)
        .expect("created");
    let kind = |result: Result<(), liveclone::os::lvm::LvmError>| {
        let error = result.expect_err("fails");
        say(&format!("{:?}: {error}", error.kind));
        error.kind
    };
    assert_eq!(
        kind(lvm.create_linear(vg, "one", 4 * MIB, &tags)),
        LvmErrorKind::AlreadyExists
    );
    assert_eq!(
        kind(lvm.create_linear(vg, "two", 64 * 1024 * MIB, &tags)),
        LvmErrorKind::NoSpace
    );
    assert_eq!(
        kind(lvm.extend(vg, "one", 64 * 1024 * MIB)),
        LvmErrorKind::NoSpace
    );
    assert_eq!(kind(lvm.remove(vg, "nope")), LvmErrorKind::NotFound);
    assert_eq!(
        kind(lvm.rename(vg, "nope", "other")),
        LvmErrorKind::NotFound
    );
    assert_eq!(
        kind(lvm.create_thin(vg, "nopool", "three", 4 * MIB, &tags)),
        LvmErrorKind::NotFound
    );
    assert_eq!(lvm.logical_volume(vg, "nope").expect("answers"), None);
    let missing = lvm.volume_group("lc-test-nope").expect_err("no such VG");
    assert_eq!(missing.kind, LvmErrorKind::NotFound, "{missing}");
    let missing = lvm
        .logical_volume("lc-test-nope", "one")
        .expect_err("no such VG is not an absent LV");
    assert_eq!(missing.kind, LvmErrorKind::NotFound, "{missing}");

    let one = lvm.logical_volume(vg, "one").expect("lvs").expect("exists");
    let path = one.dm_path.clone().expect("a device path");
    let holder = File::open(&path).expect("opens the LV");
    assert_eq!(kind(lvm.deactivate(vg, "one")), LvmErrorKind::Busy);
    assert_eq!(kind(lvm.remove(vg, "one")), LvmErrorKind::Busy);
    drop(holder);
    lvm.change_tags(vg, "one", &["b=1".to_owned()], &tags)
        .expect("retagged");
    let one = lvm.logical_volume(vg, "one").expect("lvs").expect("exists");
    assert_eq!(one.tags, ["b=1"]);
    assert_eq!(lvm.logical_volumes(vg, Some("b=1")).expect("lvs").len(), 1);
    assert!(lvm
        .logical_volumes(vg, Some("liveclone"))
        .expect("lvs")
        .is_empty());
    // Zeroing refuses a device held open by another exclusive user (a
    // mount or a table): here a second O_EXCL open.
    let exclusive = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&path)
        .expect("opens exclusively");
    let refused = lvm.zero_device(&path).expect_err("in use");
    assert_eq!(refused.kind, LvmErrorKind::Busy, "{refused}");
    drop(exclusive);
    assert_eq!(lvm.zero_device(&path).expect("zeroed"), 4 * MIB);
    lvm.deactivate(vg, "one").expect("deactivated");
    lvm.remove(vg, "one").expect("removed");
}

#[test]
fn a_thick_class_end_to_end() {
    let group = VolumeGroup::new("thick", None);
    let pool = group.pool("slow", None, 1.0);
    assert!(pool.check().is_ok());
    assert!(!pool.instant_clone_supported().expect("answers"));
    assert!(!pool.fresh_storage_reads_zeros());

    // Create, exists, size (rounded up to 4 MiB extents), attach.
    let item = data(1);
    assert!(!pool.exists(&item).expect("answers"));
    pool.create(&item, 10 * MIB).expect("created");
    assert!(pool.exists(&item).expect("answers"));
    assert_eq!(pool.size(&item).expect("size"), 12 * MIB);
    assert_eq!(
        pool.create(&item, 10 * MIB).expect_err("exists").code,
        ErrorCode::AlreadyExists
    );
    let device = pool.attach(&item, false).expect("attached");
    assert!(!device.read_only);
    assert_eq!(device.size_bytes, 12 * MIB);
    assert_eq!(device_bytes(device.major, device.minor), 12 * MIB);
    let written = pattern(1, 0, 3 * MIB as usize);
    write_at(&device.path, MIB, &written);
    assert_eq!(read_at(&device.path, MIB, written.len()), written);

    // Grow while attached: the device follows.
    pool.grow(&item, 15 * MIB).expect("grown");
    assert_eq!(pool.size(&item).expect("size"), 16 * MIB);
    assert_eq!(device_bytes(device.major, device.minor), 16 * MIB);
    pool.grow(&item, MIB).expect("never shrinks");
    assert_eq!(pool.size(&item).expect("size"), 16 * MIB);

    // Detach refuses while the device is open; release deactivates.
    let holder = File::open(&device.path).expect("opens the LV");
    let busy = pool.detach(&item).expect_err("open");
    assert_eq!(busy.code, ErrorCode::FailedPrecondition, "{busy}");
    assert!(busy.message.contains("still open"), "{busy}");

    // A redirect cut: rename while open; the device number stays and the
    // open descriptor keeps working.
    let image = Storage::Image(snapshot(1));
    pool.rename(&item, &image).expect("renamed");
    assert!(!pool.exists(&item).expect("answers"));
    let moved = pool.attachments(&image).expect("attachments");
    assert_eq!(moved.len(), 1);
    assert_eq!(
        (moved[0].major, moved[0].minor),
        (device.major, device.minor)
    );
    assert!(moved[0].read_only);
    assert_ne!(moved[0].path, device.path);
    let mut check = vec![0u8; 4096];
    holder
        .read_exact_at(&mut check, MIB)
        .expect("reads through the old descriptor");
    assert_eq!(check, written[..4096]);
    assert_eq!(read_at(&moved[0].path, MIB, written.len()), written);
    drop(holder);
    pool.release(&image, &moved[0]).expect("released");
    assert!(pool.attachments(&image).expect("none").is_empty());
    assert_eq!(
        pool.attach(&image, true).expect("re-activated").path,
        moved[0].path
    );
    assert_eq!(pool.list().expect("lists"), vec![image.clone()]);

    // Capacity is the volume group's.
    let figures = group.figures();
    let capacity = pool.capacity().expect("capacity");
    assert_eq!(capacity.total_bytes, figures.size_bytes);
    assert_eq!(capacity.available_bytes, figures.free_bytes);
    assert_eq!(capacity.thin, None);
    let too_big = figures.free_bytes + 4 * MIB;
    let refused = pool.create(&data(2), too_big).expect_err("no room");
    assert_eq!(refused.code, ErrorCode::ResourceExhausted, "{refused}");
    assert!(refused.message.contains("device class slow"), "{refused}");
    assert!(!pool.exists(&data(2)).expect("answers"));

    // Metadata is zeroed at creation over old content; thick data is not.
    let garbage = data(3);
    pool.create(&garbage, 8 * MIB).expect("created");
    let garbage_device = pool.attach(&garbage, false).expect("attached");
    write_at(&garbage_device.path, 0, &vec![0xAB; 8 * MIB as usize]);
    pool.remove(&garbage).expect("removed");
    let reused = data(4);
    pool.create(&reused, 8 * MIB)
        .expect("created on the freed extents");
    let reused_device = pool.attach(&reused, false).expect("attached");
    assert_eq!(
        read_at(&reused_device.path, 4 * MIB, 4096),
        vec![0xAB; 4096],
        "a new thick LV keeps what the disk held (so fresh storage does not read zeros)"
    );
    pool.remove(&reused).expect("removed");
    let metadata = Storage::Metadata(volume(1));
    pool.create(&metadata, 8 * MIB).expect("created");
    let metadata_device = pool.attach(&metadata, false).expect("attached");
    assert_eq!(metadata_device.size_bytes, 8 * MIB);
    assert_all_zero(
        &read_at(&metadata_device.path, 0, 8 * MIB as usize),
        "the new metadata LV",
    );

    // Remove: active or not; absent is success.
    pool.remove(&metadata).expect("removed");
    pool.remove(&image).expect("removed");
    pool.remove(&image).expect("absent is success");
    assert!(pool.list().expect("lists").is_empty());
}

#[test]
fn a_thin_class_end_to_end() {
    let group = VolumeGroup::new("thin", Some(256));
    let pool = group.pool("fast", Some("tp0"), 1.0);
    assert!(pool.instant_clone_supported().expect("answers"));
    assert!(pool.fresh_storage_reads_zeros());
    assert_eq!(
        pool.describe(),
        format!(
            "LVM device class fast (thin pool {}/tp0, overprovisioning up to x1)",
            group.name
        )
    );

    let item = data(1);
    pool.create(&item, 64 * MIB).expect("created");
    let device = pool.attach(&item, false).expect("attached");
    assert_all_zero(&read_at(&device.path, 0, 4 * MIB as usize), "a new thin LV");
    let before = pattern(2, 0, 2 * MIB as usize);
    write_at(&device.path, 0, &before);

    // A thin snapshot keeps the point in time while the origin changes.
    let image = Storage::Image(snapshot(1));
    assert!(pool.clone_instant(&item, &image).expect("snapshot"));
    let image_device = pool.attach(&image, true).expect("attached");
    assert!(image_device.read_only);
    assert_ne!(
        (image_device.major, image_device.minor),
        (device.major, device.minor)
    );
    let after = pattern(3, 0, 2 * MIB as usize);
    write_at(&device.path, 0, &after);
    assert_eq!(read_at(&image_device.path, 0, before.len()), before);
    assert_eq!(read_at(&device.path, 0, after.len()), after);

    // Capacity: 256 MiB x 1; two 64 MiB LVs promised.
    let capacity = pool.capacity().expect("capacity");
    assert_eq!(capacity.total_bytes, 256 * MIB);
    let usage = capacity.thin.expect("thin figures");
    assert_eq!(usage.provisioned_bytes, 128 * MIB);
    assert!(usage.data_used > 0.0 && usage.data_used < 0.1, "{usage:?}");
    assert!(usage.metadata_used > 0.0, "{usage:?}");
    assert_eq!(capacity.available_bytes, 128 * MIB);

    // Overprovisioning: 128 MiB left of the limit.
    let refused = pool
        .create(&data(2), 132 * MIB)
        .expect_err("over the limit");
    assert_eq!(refused.code, ErrorCode::ResourceExhausted, "{refused}");
    for part in [
        "device class fast",
        "tp0",
        "128.0 MiB is provisioned",
        "256.0 MiB",
    ] {
        assert!(refused.message.contains(part), "{part}: {refused}");
    }
    assert!(!pool.exists(&data(2)).expect("answers"));
    // A snapshot counts its origin's size: 192 MiB, then 256 MiB exactly.
    pool.clone_instant(&item, &Storage::Image(snapshot(2)))
        .expect("fits");
    pool.create(&data(2), 64 * MIB).expect("exactly the limit");
    let refused = pool
        .clone_instant(&item, &Storage::Image(snapshot(3)))
        .expect_err("over the limit");
    assert_eq!(refused.code, ErrorCode::ResourceExhausted, "{refused}");
    assert!(!pool.exists(&Storage::Image(snapshot(3))).expect("answers"));
    pool.remove(&Storage::Image(snapshot(2))).expect("removed");
    pool.remove(&data(2)).expect("removed");

    // Metadata: a thin LV, zeroed by writing, so fully provisioned.
    let metadata = Storage::Metadata(volume(1));
    pool.create(&metadata, 8 * MIB).expect("created");
    let metadata_device = pool.attach(&metadata, false).expect("attached");
    assert_all_zero(
        &read_at(&metadata_device.path, 0, 8 * MIB as usize),
        "the new metadata LV",
    );
    let lvm = LinuxLvm::with_program(lvm_binary());
    let metadata_lv = lvm
        .logical_volume(&group.name, &metadata_device_name(&metadata))
        .expect("lvs")
        .expect("exists");
    assert_eq!(metadata_lv.pool.as_deref(), Some("tp0"));
    assert_eq!(metadata_lv.data_used, Some(1.0), "fully provisioned");

    // Grow a thin LV while attached.
    pool.grow(&item, 80 * MIB).expect("grown");
    assert_eq!(device_bytes(device.major, device.minor), 80 * MIB);

    // Rename keeps the device.
    let next = Storage::Data {
        volume: volume(1),
        generation: 2,
    };
    pool.rename(&item, &next).expect("renamed");
    let renamed = pool.attachments(&next).expect("attachments");
    assert_eq!(renamed.len(), 1);
    assert_eq!(
        (renamed[0].major, renamed[0].minor),
        (device.major, device.minor)
    );
    assert_eq!(read_at(&renamed[0].path, 0, after.len()), after);

    let mut expected = vec![next.clone(), image.clone(), metadata.clone()];
    expected.sort();
    assert_eq!(pool.list().expect("lists"), expected);

    // After a reboot nothing is active: the pool's figures need the pool
    // active, and attach activates an LV again.
    for item in &expected {
        pool.detach(item).expect("detached");
        assert!(pool.attachments(item).expect("none").is_empty());
    }
    let pool_lv = format!("{}/tp0", group.name);
    let _ = try_lvm("lvchange", &["-an", &pool_lv]);
    let inactive = lvm.thin_pool(&group.name, "tp0").expect("lvs");
    say(&format!(
        "thin pool after deactivation: attr {}, data {:?}",
        inactive.volume.attr, inactive.volume.data_used
    ));
    let usage = pool.capacity().expect("capacity").thin.expect("thin");
    assert!(usage.data_used > 0.0, "{usage:?}");
    let again = pool.attach(&next, false).expect("attached");
    assert_eq!(read_at(&again.path, 0, after.len()), after);

    for item in &expected {
        pool.remove(item).expect("removed");
    }
    assert!(pool.list().expect("lists").is_empty());
}

/// The LV name the pool gives an item (as `lvs` shows it).
fn metadata_device_name(item: &Storage) -> String {
    liveclone::domain::lvm_pool::lv_name(item)
}

#[test]
fn two_classes_share_a_volume_group() {
    let group = VolumeGroup::new("shared", Some(128));
    let slow = group.pool("slow", None, 1.0);
    let fast = group.pool("fast", Some("tp0"), 3.0);
    slow.create(&data(1), 4 * MIB).expect("created");
    slow.create(&Storage::Metadata(volume(1)), 4 * MIB)
        .expect("created");
    fast.create(&data(2), 4 * MIB).expect("created");
    fast.clone_instant(&data(2), &Storage::Image(snapshot(2)))
        .expect("snapshot");
    // Another tool's LV, and one with a liveclone name but no class tag.
    lvm(
        "lvcreate",
        &["--yes", "-n", "lvol-other", "-L", "4m", &group.name],
    );
    let impostor = liveclone::domain::lvm_pool::lv_name(&data(3));
    lvm(
        "lvcreate",
        &[
            "--yes",
            "-n",
            &impostor,
            "-L",
            "4m",
            "--addtag",
            "liveclone",
            &group.name,
        ],
    );

    assert_eq!(
        slow.list().expect("lists"),
        vec![data(1), Storage::Metadata(volume(1))]
    );
    assert_eq!(
        fast.list().expect("lists"),
        vec![data(2), Storage::Image(snapshot(2))]
    );
    let refused = slow.exists(&data(2)).expect_err("another class's LV");
    assert!(refused.message.contains("not tagged"), "{refused}");
    assert!(
        slow.remove(&data(3)).is_err(),
        "an untagged LV is never removed"
    );
    assert_eq!(
        slow.create(&data(3), 4 * MIB).expect_err("name taken").code,
        ErrorCode::AlreadyExists
    );

    // The thin class's figures are its pool's; the thick one's the VG's.
    let fast_capacity = fast.capacity().expect("capacity");
    assert_eq!(fast_capacity.total_bytes, 3 * 128 * MIB);
    assert_eq!(fast_capacity.thin.expect("thin").provisioned_bytes, 8 * MIB);
    assert_eq!(
        slow.capacity().expect("capacity").available_bytes,
        group.figures().free_bytes
    );
    for item in slow.list().expect("lists") {
        slow.remove(&item).expect("removed");
    }
    for item in fast.list().expect("lists") {
        fast.remove(&item).expect("removed");
    }
    assert!(slow.list().expect("lists").is_empty());
    assert!(fast.list().expect("lists").is_empty());
    // Foreign LVs are still there.
    let left = LinuxLvm::with_program(lvm_binary())
        .logical_volumes(&group.name, None)
        .expect("lvs");
    let mut names: Vec<String> = left.into_iter().map(|lv| lv.name).collect();
    names.sort();
    let mut expected = vec!["lvol-other".to_owned(), impostor, "tp0".to_owned()];
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn a_nearly_full_thin_pool_refuses_new_volumes() {
    let group = VolumeGroup::new("full", Some(32));
    let pool = group.pool("fast", Some("tp0"), 4.0);
    let item = data(1);
    pool.create(&item, 32 * MIB).expect("created");
    let device = pool.attach(&item, false).expect("attached");
    // 31 of the pool's 32 MiB: 96.9 %.
    write_at(&device.path, 0, &pattern(4, 0, 31 * MIB as usize));
    let usage = pool.capacity().expect("capacity").thin.expect("thin");
    assert!(usage.data_used >= 0.95, "{usage:?}");
    let refused = pool.create(&data(2), 4 * MIB).expect_err("nearly full");
    assert_eq!(refused.code, ErrorCode::ResourceExhausted, "{refused}");
    assert!(refused.message.contains("nearly full"), "{refused}");
    assert!(refused.message.contains("device class fast"), "{refused}");
    let refused = pool
        .clone_instant(&item, &Storage::Image(snapshot(1)))
        .expect_err("nearly full");
    assert_eq!(refused.code, ErrorCode::ResourceExhausted, "{refused}");
    assert!(!pool.exists(&data(2)).expect("answers"));

    // Removing the LV frees its chunks in the pool, and creation works again.
    pool.remove(&item).expect("removed");
    pool.create(&data(2), 4 * MIB).expect("room again");
    pool.remove(&data(2)).expect("removed");
}
