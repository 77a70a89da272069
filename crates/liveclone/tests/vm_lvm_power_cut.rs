//! The driver's LVM device classes survive a power cut in the middle of a
//! thick -> thin clone's hydration and of a thick volume's snapshot cut.
//!
//! Built only with `--features vm`. The host test boots the VM twice on the
//! same two virtio disks (serials `lc-lvm-a`, `lc-lvm-b`, sparse host
//! files) and runs this same test binary inside the VM for each phase (the
//! `guest_` tests, ignored unless asked for):
//!
//! 1. makes the volume group `lcvg` on the disks with the thin pool of the
//!    `thin` class and a small ext4 LV of the test's own (not the driver's)
//!    for the driver's state folder, file pool and logs; starts
//!    `liveclone standalone --device-classes ...`; writes a 128 MiB thick
//!    volume whole, clones it into the thin class with slow hydration (the
//!    thick source is cut by redirect and copies itself back meanwhile),
//!    writes a second thick volume, and once the clone has copied
//!    something (committed by a flushing status read) sends CreateSnapshot
//!    for the second volume and prints `POWER-CUT-NOW` as soon as the
//!    cut's first new LV shows; the host kills QEMU on that line.
//! 2. boots again on the same disks: no device of the driver's exists and
//!    none of its LVs is active. The test activates only its own state LV,
//!    starts the driver, and checks that recovery found every volume from
//!    LVM again (devices back, LVs active, the clone not restarted from
//!    zero), that the retried CreateSnapshot succeeds with the volume's
//!    bytes, that the clone completes with its source's bytes, and that
//!    once everything is deleted no LV or device of the driver's is left.

mod common;
#[path = "common/vm_host.rs"]
mod vm_host;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::lvm::{
    class_params, data_lv, device_classes_yaml, lvm, lvs_summary, our_lvs, volume_lvs, Content,
    Disks, Lv, TestVg, ThinPoolSpec, DISK_SERIALS, THIN_POOL, VG,
};
use common::{
    all_dm_devices, assert_single_linear, clone_regions, describe, dm_devices, in_vm, must,
    path_string, run, say, standalone_args, tail_of, unmount_all_under, Access, Csi, Driver,
    Source, DEBUG_LOG, LOG_TAIL, MIB, SLOW,
};
use liveclone::proto::csi::v1 as csi;
use vm_host::{phase_command, HostRun};
use vmtest::Ending;

/// The disks of the VG (sparse on the host).
const DISK_BYTES: u64 = 3 << 30;
const THIN_POOL_BYTES: u64 = 768 * MIB;
/// The test's own LV for the driver's state, file pool and logs.
const STATE_LV: &str = "lcstate";
const STATE_LV_SIZE: &str = "256m";
const STATE_MOUNT: &str = "/mnt/lcstate";
const NODE_ID: &str = "lvm-power-cut-node";
/// The thick volume the clone copies, written whole.
const SOURCE_NAME: &str = "lvm-pc-source";
const SOURCE_BYTES: u64 = 128 * MIB;
const SOURCE_SEED: u64 = 1;
/// The thin clone (slow hydration) cut by the power cut.
const CLONE_NAME: &str = "lvm-pc-clone";
/// The thick volume whose snapshot cut the power cut interrupts.
const CUT_NAME: &str = "lvm-pc-cut-volume";
const CUT_BYTES: u64 = 32 * MIB;
const CUT_SEED: u64 = 2;
const SNAPSHOT_NAME: &str = "lvm-pc-snapshot";
const CUT_MARKER: &str = "POWER-CUT-NOW";
/// The clone's hydrated bytes, committed before the cut, for phase 2.
const HYDRATED_ENV: &str = "LIVECLONE_LVM_PC_HYDRATED";
/// The driver binary: a private copy the host made for this test.
const DRIVER_ENV: &str = "LIVECLONE_LVM_PC_DRIVER";
/// The clone must have copied this much before the cut.
const MIN_HYDRATED: u64 = 2 * MIB;
/// Recovery included, under QEMU's software CPU.
const START_LIMIT: Duration = Duration::from_secs(180);
const STOP_LIMIT: Duration = Duration::from_secs(30);
const HYDRATION_LIMIT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// The host side.

#[test]
fn vm_lvm_driver_survives_power_cuts() {
    let mut run = HostRun::new("lvm-power-cut-", "vm_lvm_power_cut");
    run.vm.timeout = Duration::from_secs(1200);
    for serial in DISK_SERIALS {
        run.add_disk(serial, &format!("{serial}.img"), DISK_BYTES);
    }
    let driver = path_string(&run.driver);
    run.vm.env.push((DRIVER_ENV.to_owned(), driver));
    let me = run.me.clone();

    let mut hydrated: Option<u64> = None;
    let first = run
        .vm
        .run_until(
            vec![phase_command(&me, "guest_lvm_power_cut_phase_1")],
            |line| {
                let Some(rest) = line.strip_prefix(CUT_MARKER) else {
                    return false;
                };
                hydrated = rest
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("hydrated="))
                    .and_then(|n| n.parse().ok());
                true
            },
        )
        .expect("first boot");
    assert!(
        matches!(first.ending, Ending::PowerCut),
        "phase 1 ended without reaching the cut point: {:?}",
        first.result()
    );
    let hydrated = hydrated.expect("the cut marker carries the hydrated bytes");
    println!(
        "phase 1: power cut after {:.1} s; the clone had {hydrated} bytes hydrated (committed)",
        first.elapsed.as_secs_f64()
    );

    run.vm
        .env
        .push((HYDRATED_ENV.to_owned(), hydrated.to_string()));
    let second = run
        .vm
        .run(vec![phase_command(&me, "guest_lvm_power_cut_phase_2")])
        .expect("second boot");
    let result = second.result().expect("phase 2 finished");
    println!(
        "phase 2: {:.1} s, {:?}",
        second.elapsed.as_secs_f64(),
        result
    );
    assert!(result.success(), "phase 2 failed: {result:?}");
}

// ---------------------------------------------------------------------------
// The guest phases.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "phase of vm_lvm_driver_survives_power_cuts; runs inside the VM"]
async fn guest_lvm_power_cut_phase_1() {
    require_in_vm();
    let disks = Disks::virtio().expect("the virtio disks lc-lvm-a and lc-lvm-b");
    let vg = TestVg::create(
        disks,
        &[ThinPoolSpec {
            name: THIN_POOL,
            bytes: THIN_POOL_BYTES,
        }],
    )
    .unwrap_or_else(|e| panic!("making {VG}: {e:#}"));
    lvm(
        "lvcreate",
        &["--yes", "-L", STATE_LV_SIZE, "-n", STATE_LV, VG],
    );
    let mut guest = Guest::new(1);
    guest.mount_state(true);
    let mut csi = guest.start_driver().await;

    let source = block_volume(&guest, &mut csi, SOURCE_NAME, SOURCE_BYTES, SOURCE_SEED).await;
    let clone = must(
        "CreateVolume (clone thick -> thin, slow)",
        csi.create_volume(
            CLONE_NAME,
            SOURCE_BYTES,
            Access::Block,
            Some(Source::Volume(&source)),
            &class_params("thin", &SLOW),
        )
        .await,
    )
    .volume_id;
    let clone_dm = csi.dm_name_of(&clone).await;
    guest.step(&format!("clone {clone} of {source} created"));
    let cut_volume = block_volume(&guest, &mut csi, CUT_NAME, CUT_BYTES, CUT_SEED).await;

    let h = csi
        .wait_hydration(&clone, Duration::from_secs(600), |h| {
            h.hydrated_bytes >= MIN_HYDRATED
        })
        .await;
    assert!(
        h.hydrated_bytes < h.total_bytes,
        "the clone finished before the cut: {}",
        describe(&h)
    );
    // A flushing status read commits dm-clone's metadata: at least this
    // much is hydrated for good.
    run("dmsetup", &["status".as_ref(), OsStr::new(&clone_dm)]);
    guest.step(&format!(
        "clone hydrating, committed: {}; the source: {}",
        describe(&h),
        csi.status_of(&source)
            .await
            .hydration
            .as_ref()
            .map_or_else(|| "no hydration".to_owned(), describe)
    ));
    say(&format!("LVM before the cut:\n{}", lvs_summary(VG)));

    let hex = cut_volume
        .split_once('-')
        .map_or(cut_volume.as_str(), |(_, hex)| hex)
        .to_owned();
    let before = dm_names_sysfs();
    let mut controller = csi.controller.clone();
    let request = csi::CreateSnapshotRequest {
        source_volume_id: cut_volume.clone(),
        name: SNAPSHOT_NAME.to_owned(),
        ..Default::default()
    };
    let call = tokio::spawn(async move { controller.create_snapshot(request).await });
    let sent = Instant::now();
    loop {
        let new: Vec<String> = dm_names_sysfs()
            .difference(&before)
            .filter(|name| name.contains(&hex))
            .cloned()
            .collect();
        if !new.is_empty() {
            say(&format!(
                "{CUT_MARKER} hydrated={} after={:.2}s new={new:?}",
                h.hydrated_bytes,
                sent.elapsed().as_secs_f64()
            ));
            break;
        }
        assert!(
            !call.is_finished(),
            "CreateSnapshot finished before any new LV device was seen: {:?}",
            call.await
        );
        assert!(
            sent.elapsed() < Duration::from_secs(120),
            "the cut made no LV within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The host cuts the power now.
    tokio::time::sleep(Duration::from_secs(900)).await;
    std::mem::forget(guest);
    std::mem::forget(vg);
    panic!("the power was not cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "phase of vm_lvm_driver_survives_power_cuts; runs inside the VM"]
async fn guest_lvm_power_cut_phase_2() {
    require_in_vm();
    let hydrated_before: u64 = std::env::var(HYDRATED_ENV)
        .expect("hydrated bytes from phase 1")
        .parse()
        .expect("a number");
    let _ = Command::new("modprobe").arg("dm-thin-pool").output();
    let disks = Disks::virtio().expect("the virtio disks lc-lvm-a and lc-lvm-b");
    let vg = TestVg::existing(disks, &[THIN_POOL]);
    let active: Vec<String> = common::lvm::lvs(VG)
        .into_iter()
        .filter(|lv| lv.active)
        .map(|lv| lv.name)
        .collect();
    assert!(
        active.is_empty() && dm_devices().is_empty(),
        "after the power cut, active LVs {active:?}, devices {:?}",
        dm_devices()
    );
    say(&format!("LVM after the power cut:\n{}", lvs_summary(VG)));
    lvm("lvchange", &["-ay", &format!("{VG}/{STATE_LV}")]);
    let mut guest = Guest::new(2);
    guest.mount_state(false);
    say(&format!(
        "--- last lines of phase 1's driver log (cut off by the power cut) ---\n{}\n---",
        tail_of(&guest.log_of(1), 20)
    ));
    let mut csi = guest.start_driver().await;

    let volumes = csi.admin_list().await;
    for volume in &volumes {
        guest.step(&format!(
            "recovered {} ({}): {} {}, device {} present {}; {}",
            volume.volume_id,
            volume.name,
            volume.access,
            volume.state,
            volume.device,
            volume.device_present,
            volume
                .hydration
                .as_ref()
                .map_or_else(|| "no hydration".to_owned(), describe)
        ));
    }
    let by_name = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("the driver does not list {name} after the reboot"))
    };
    let source = by_name(SOURCE_NAME);
    let clone = by_name(CLONE_NAME);
    let cut_volume = by_name(CUT_NAME);
    for volume in [&source, &clone, &cut_volume] {
        assert!(
            volume.state == "Ready" && volume.device_present,
            "not back after the reboot: {volume:?}"
        );
    }
    let lvs = our_lvs(VG);
    let inactive: Vec<&Lv> = lvs
        .values()
        .filter(|lv| {
            (lv.name.starts_with(&clone.volume_id) || lv.name.starts_with(&source.volume_id))
                && !lv.active
        })
        .collect();
    assert!(
        inactive.is_empty(),
        "LVs of the recovered volumes are inactive: {inactive:?}"
    );
    data_lv(&lvs, &clone.volume_id, "thin");

    // The clone: recovered on its metadata, not restarted.
    let clone_dm = csi.dm_name_of(&clone.volume_id).await;
    let h = csi.hydration_of(&clone.volume_id).await;
    let (kernel_hydrated, total) = clone_regions(&clone_dm);
    let kernel_bytes = kernel_hydrated * h.region_bytes;
    guest.step(&format!(
        "the clone after recovery: {}; kernel {kernel_hydrated}/{total} regions ({kernel_bytes} \
         bytes; {hydrated_before} committed before the cut)",
        describe(&h)
    ));
    assert!(
        kernel_bytes >= hydrated_before,
        "the recovered clone has {kernel_bytes} bytes hydrated, fewer than the \
         {hydrated_before} committed before the cut"
    );
    assert_eq!(
        (h.threshold, h.batch_size),
        (1, 1),
        "recovery lost the clone's tunables"
    );
    let source_content = Content::whole(SOURCE_BYTES, SOURCE_SEED);
    let clone_device = PathBuf::from(&csi.status_of(&clone.volume_id).await.device);
    let during = source_content.verify(&clone_device, "the recovered clone, hydrating");

    // The interrupted snapshot: retried as the CO would.
    let cut_content = Content::whole(CUT_BYTES, CUT_SEED);
    let snapshot = must(
        "CreateSnapshot (retried after the power cut)",
        csi.create_snapshot(SNAPSHOT_NAME, &cut_volume.volume_id)
            .await,
    );
    assert!(snapshot.ready_to_use, "{snapshot:?}");
    let lvs = our_lvs(VG);
    data_lv(&lvs, &cut_volume.volume_id, "thick");
    let image = lvs
        .get(&snapshot.snapshot_id)
        .unwrap_or_else(|| panic!("no image LV for {}", snapshot.snapshot_id));
    assert!(
        image.class() == Some("thick") && image.kind() == Some("image"),
        "{}",
        image.describe()
    );
    let own = volume_lvs(&lvs, &cut_volume.volume_id);
    assert!(
        own.len() <= 2,
        "the cut volume has LVs beyond its data and metadata: {:?}",
        own.iter().map(|lv| lv.describe()).collect::<Vec<_>>()
    );
    let cut_device = PathBuf::from(&csi.status_of(&cut_volume.volume_id).await.device);
    cut_content.verify(&cut_device, "the cut volume after the retried snapshot");
    let restore = must(
        "CreateVolume (restore of the snapshot into thin)",
        csi.create_volume(
            "lvm-pc-restore",
            CUT_BYTES,
            Access::Block,
            Some(Source::Snapshot(&snapshot.snapshot_id)),
            &class_params("thin", &[]),
        )
        .await,
    )
    .volume_id;
    let restore_device = PathBuf::from(&csi.status_of(&restore).await.device);
    cut_content.verify(&restore_device, "the restore, at once");

    // Everything completes.
    csi.tune_fast(&clone.volume_id).await;
    for id in [&clone.volume_id, &restore] {
        let done = csi.wait_complete(id, HYDRATION_LIMIT).await;
        guest.step(&format!("{id} hydrated: {}", describe(&done)));
    }
    for id in [&source.volume_id, &cut_volume.volume_id] {
        if csi.status_of(id).await.hydration.is_some() {
            csi.wait_complete(id, HYDRATION_LIMIT).await;
        }
    }
    assert_single_linear(&clone_dm, SOURCE_BYTES);
    let after = source_content.verify(&clone_device, "the hydrated clone");
    assert_eq!(during, after);
    cut_content.verify(&restore_device, "the hydrated restore");
    let source_device = PathBuf::from(&csi.status_of(&source.volume_id).await.device);
    source_content.verify(&source_device, "the source");
    cut_content.verify(&cut_device, "the cut volume at the end");
    assert!(
        !our_lvs(VG).contains_key(&format!("{}_meta", clone.volume_id)),
        "the completed clone keeps its metadata LV"
    );

    must(
        "DeleteSnapshot",
        csi.delete_snapshot(&snapshot.snapshot_id).await,
    );
    for id in [
        &restore,
        &clone.volume_id,
        &source.volume_id,
        &cut_volume.volume_id,
    ] {
        must("DeleteVolume", csi.delete_volume(id).await);
    }
    assert!(
        csi.admin_list().await.is_empty(),
        "volumes are still listed"
    );
    let ours = our_lvs(VG);
    let stray = vg.stray_dm_devices(&[STATE_LV]);
    assert!(
        ours.is_empty() && stray.is_empty() && dm_devices().is_empty(),
        "left after everything was deleted: LVs {:?}, LV devices {stray:?}, devices {:?}\n{}",
        ours.keys().collect::<Vec<_>>(),
        dm_devices(),
        lvs_summary(VG)
    );
    guest.stop_driver();
    for phase in [1, 2] {
        let log = std::fs::read_to_string(guest.log_of(phase)).unwrap_or_default();
        let notable: Vec<&str> = log
            .lines()
            .filter(|line| {
                line.contains("WARN") || line.contains("ERROR") || line.contains("recovery")
            })
            .take(40)
            .collect();
        say(&format!(
            "driver log of phase {phase}: {} warnings, errors or recovery lines (first 40):\n  {}",
            notable.len(),
            notable.join("\n  ")
        ));
    }
    guest.step("passed");
    drop(guest);
    vg.remove()
        .unwrap_or_else(|e| panic!("removing {VG}: {e:#}"));
}

// ---------------------------------------------------------------------------
// The guest bench.

fn require_in_vm() {
    assert!(
        in_vm(),
        "the phases of the LVM power-cut test run inside the VM, started by \
         vm_lvm_driver_survives_power_cuts"
    );
}

/// A raw-block thick volume written whole with `seed`; its ID.
async fn block_volume(guest: &Guest, csi: &mut Csi, name: &str, bytes: u64, seed: u64) -> String {
    let volume = must(
        &format!("CreateVolume ({name}, thick)"),
        csi.create_volume(
            name,
            bytes,
            Access::Block,
            None,
            &class_params("thick", &[]),
        )
        .await,
    );
    let mounted = csi
        .stage_publish(&guest.mnt, &volume.volume_id, Access::Block, name)
        .await;
    Content::whole(bytes, seed).write(&mounted.target);
    csi.unpublish_unstage(&mounted).await;
    guest.step(&format!("{name}: {} written whole", volume.volume_id));
    volume.volume_id
}

/// Names of every device-mapper device, from sysfs (cheap to poll).
fn dm_names_sysfs() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for entry in entries.flatten() {
            if let Ok(name) = std::fs::read_to_string(entry.path().join("dm/name")) {
                names.insert(name.trim().to_owned());
            }
        }
    }
    names
}

struct Guest {
    phase: u32,
    mount: PathBuf,
    /// On the scratch disk (fresh at every boot): socket and publish paths.
    work: PathBuf,
    mnt: PathBuf,
    endpoint: String,
    driver: Option<Driver>,
    started: Instant,
}

impl Guest {
    fn new(phase: u32) -> Self {
        let work = std::env::temp_dir().join("lclvmpc");
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap_or_else(|e| panic!("creating {}: {e}", mnt.display()));
        Self {
            phase,
            mount: PathBuf::from(STATE_MOUNT),
            endpoint: format!("unix://{}", work.join("csi.sock").display()),
            work,
            mnt,
            driver: None,
            started: Instant::now(),
        }
    }

    fn step(&self, message: &str) {
        say(&format!(
            "[lvm phase {} +{:.1}s] {message}",
            self.phase,
            self.started.elapsed().as_secs_f64()
        ));
    }

    fn log_of(&self, phase: u32) -> PathBuf {
        self.mount
            .join("logs")
            .join(format!("driver-phase-{phase}.log"))
    }

    fn device(&self) -> PathBuf {
        Path::new("/dev").join(VG).join(STATE_LV)
    }

    /// Mounts the state LV; formats it first in phase 1.
    fn mount_state(&mut self, format: bool) {
        let device = self.device();
        if format {
            run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                    device.as_os_str(),
                ],
            );
        }
        std::fs::create_dir_all(&self.mount)
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.mount.display()));
        run(
            "mount",
            &[
                "-t".as_ref(),
                "ext4".as_ref(),
                device.as_os_str(),
                self.mount.as_os_str(),
            ],
        );
        for dir in ["pool", "state", "logs"] {
            let dir = self.mount.join(dir);
            std::fs::create_dir_all(&dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        if format {
            let yaml =
                device_classes_yaml(&[("thick", None, None), ("thin", Some(THIN_POOL), Some(1.0))]);
            // Written through to the disk: a power cut within ext4's
            // commit interval would otherwise leave phase 2 an empty file.
            let path = self.mount.join("device-classes.yaml");
            std::fs::File::create(&path)
                .and_then(|mut file| {
                    std::io::Write::write_all(&mut file, yaml.as_bytes())?;
                    file.sync_all()
                })
                .and_then(|()| std::fs::File::open(&self.mount)?.sync_all())
                .expect("writing the device classes");
        }
        self.step(&format!(
            "state LV {} mounted at {}",
            device.display(),
            self.mount.display()
        ));
    }

    async fn start_driver(&mut self) -> Csi {
        assert!(self.driver.is_none(), "the driver is already running");
        let binary = std::env::var_os(DRIVER_ENV).expect("the driver's path from the host");
        let state = self.mount.join("state");
        let pool = self.mount.join("pool");
        let classes = self.mount.join("device-classes.yaml");
        let mut args = standalone_args(&self.endpoint, &state, &pool, NODE_ID, &self.mnt);
        args.extend([
            OsStr::new("--device-classes"),
            classes.as_os_str(),
            OsStr::new("--hydration-poll-seconds"),
            OsStr::new("0.5"),
            OsStr::new("--stall-after-seconds"),
            OsStr::new("120"),
        ]);
        let what = format!("driver start, LVM phase {}", self.phase);
        let driver = Driver::start(
            Path::new(&binary),
            &args,
            &self.log_of(self.phase),
            DEBUG_LOG,
            &what,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let started = Instant::now();
        let driver = self.driver.insert(driver);
        let channel = driver
            .wait_ready(&self.endpoint, START_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.step(&format!(
            "driver ready in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        Csi::new(channel)
    }

    fn stop_driver(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            let status = driver.stop_within(STOP_LIMIT);
            self.step(&format!("driver stopped ({status:?})"));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            say(&format!(
                "[lvm phase {}] FAILED after {:.1} s; devices {:?}; all dm devices {:?}\nLVM:\n{}\n\
                 --- last {LOG_TAIL} lines of the driver's log ---\n{}\n--- end of the driver's \
                 log ---",
                self.phase,
                self.started.elapsed().as_secs_f64(),
                dm_devices(),
                all_dm_devices(),
                lvs_summary(VG),
                tail_of(&self.log_of(self.phase), LOG_TAIL)
            ));
        }
        self.stop_driver();
        unmount_all_under(&self.mnt);
        // The driver's devices hold LVs open; the VG's removal needs them
        // gone.
        for name in dm_devices() {
            let _ = Command::new("dmsetup")
                .args(["remove", "--retry", &name])
                .output();
        }
        let _ = Command::new("umount").arg(&self.mount).output();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}
