#![cfg(feature = "real-kernel")]
//! End-to-end tests of `liveclone standalone` on the real kernel: the
//! driver binary is started as it would be on a node, and driven over its
//! Unix socket with the generated CSI clients and the admin API, exactly
//! as a CO and `liveclone status` would. Every check compares bytes (and
//! prints SHA-256 sums), never only exit codes.
//!
//! Built only with `--features real-kernel`; run inside the test VM as
//! root (`make test-vm`), or on a host with dm-clone when
//! `LIVECLONE_TEST_ON_HOST=1`. The tests take a process-wide lock, so
//! they run one at a time even without `--test-threads=1`: the driver's
//! start-up recovery removes every `liveclone-` device it has no record of,
//! which would break a neighbour's volumes.
//!
//! The driver's log (`RUST_LOG=debug` unless set) goes to a file that is
//! printed when a test fails, together with the device-mapper and loop
//! devices left at that moment (`LIVECLONE_TEST_SHOW_LOG=1` prints it after
//! a test that passed too).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use liveclone::grpc::client::connect_unix;
use liveclone::proto::admin::v1alpha1 as admin;
use liveclone::proto::admin::v1alpha1::admin_client::AdminClient;
use liveclone::proto::admin::v1alpha1::set_hydration_request::Action;
use liveclone::proto::csi::v1 as csi;
use liveclone::proto::csi::v1::controller_client::ControllerClient;
use liveclone::proto::csi::v1::identity_client::IdentityClient;
use liveclone::proto::csi::v1::node_client::NodeClient;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;
const SECTOR: u64 = 512;
const BIN: &str = env!("CARGO_BIN_EXE_liveclone");
const NODE_ID: &str = "test-node";
const DM_PREFIX: &str = "liveclone-";
/// How long the driver may take to answer Probe with ready = true
/// (recovery included).
const START_LIMIT: Duration = Duration::from_secs(90);
/// How long the driver may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Lines of the driver's log printed when a test fails.
const LOG_TAIL: usize = 400;
/// Set to 1 to print the driver's whole log after a test that passed too
/// (`vmtest test --env LIVECLONE_TEST_SHOW_LOG=1 ...`).
const SHOW_LOG_ENV: &str = "LIVECLONE_TEST_SHOW_LOG";
/// The xfs image that holds the pool of the xfs tests (sparse).
const XFS_IMAGE_BYTES: u64 = 2 << 30;
/// Tunables that make hydration slow enough to act during it (one 4 KiB
/// region at a time), and fast ones to finish it.
const SLOW: [(&str, &str); 2] = [
    ("liveclone.io/hydrationThreshold", "1"),
    ("liveclone.io/hydrationBatchSize", "1"),
];
const FAST_THRESHOLD: u32 = 4096;
const FAST_BATCH: u32 = 1024;

/// One test at a time (see the module comment). A tokio mutex: it is held
/// across awaits, and each test has its own runtime.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// The tests.

/// A clone of a mounted ext4 volume is usable as soon as CreateVolume
/// returns, takes writes of its own, becomes a plain linear device once
/// hydrated, and stays right after its source is deleted; the source never
/// sees the clone's writes. Nothing is left once everything is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_of_a_filesystem_volume_is_usable_at_once_and_hydrates_to_linear() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    let mut bench = Bench::new("fsclone", PoolFs::Ext4);
    let mut csi = bench.start_driver().await;

    let source = must(
        "CreateVolume (source)",
        csi.create_volume(&bench.name("source"), 128 * MIB, Access::Ext4, None, &[])
            .await,
    );
    assert_eq!(source.capacity_bytes, to_i64(128 * MIB), "{source:?}");
    let source_mount = bench
        .stage_publish(&mut csi, &source.volume_id, Access::Ext4, "source")
        .await;
    let files = sample_files(11);
    write_files(&source_mount.target, &files);
    bench.step(&format!(
        "source {} written: {}",
        source.volume_id,
        files_summary(&files)
    ));

    let started = Instant::now();
    let clone = must(
        "CreateVolume (clone of the source)",
        csi.create_volume(
            &bench.name("clone"),
            128 * MIB,
            Access::Ext4,
            Some(Source::Volume(&source.volume_id)),
            // Slow, so that the clone is read and written while it still
            // hydrates (with the defaults it is done within a second or
            // two, since only the used blocks are copied).
            &SLOW,
        )
        .await,
    );
    let clone_dm = csi.dm_name_of(&clone.volume_id).await;
    let (hydrated, total) = clone_regions(&clone_dm);
    bench.step(&format!(
        "clone {} created in {:.1} s, {hydrated}/{total} regions hydrated; {}",
        clone.volume_id,
        started.elapsed().as_secs_f64(),
        describe(&csi.hydration_of(&clone.volume_id).await)
    ));
    // The clone's free space was discarded before hydration started: those
    // regions count as hydrated without being copied. The file system holds
    // a few MiB of 128.
    assert!(
        hydrated * 2 > total,
        "only {hydrated} of {total} regions are hydrated right after CreateVolume: the \
         clone's free space was not discarded, so hydration copies it all"
    );
    assert_eq!(
        clone.content_source,
        Some(volume_source(&source.volume_id)),
        "the clone's Volume does not name its source"
    );
    let clone_mount = bench
        .stage_publish(&mut csi, &clone.volume_id, Access::Ext4, "clone")
        .await;
    let at_first_read = csi.hydration_of(&clone.volume_id).await;
    verify_files(&clone_mount.target, &files, &[], "the new clone");
    bench.step(&format!(
        "the clone reads the source's files {:.1} s after the CreateVolume call; it was {}",
        started.elapsed().as_secs_f64(),
        describe(&at_first_read)
    ));

    // The clone's own writes: a changed file and a new one.
    let mut clone_files = files.clone();
    let patch = pattern(12, 3 * BLOCK + 17);
    overwrite_at(&clone_mount.target.join("a.bin"), 10 * BLOCK as u64, &patch);
    splice(
        clone_files.get_mut("a.bin").expect("a.bin"),
        10 * BLOCK,
        &patch,
    );
    let only_in_clone = pattern(13, (MIB + 123) as usize);
    write_file(&clone_mount.target.join("clone-only.bin"), &only_in_clone);
    clone_files.insert("clone-only.bin".to_owned(), only_in_clone);
    sync_dir(&clone_mount.target);
    verify_files(
        &clone_mount.target,
        &clone_files,
        &[],
        "the clone after its writes",
    );

    let done = csi
        .wait_complete(&bench, &clone.volume_id, Duration::from_secs(120))
        .await;
    bench.step(&format!("clone hydrated: {}", describe(&done)));
    assert_single_linear(&clone_dm, 128 * MIB);

    // Read the linear device afresh, through a new mount.
    bench.unpublish_unstage(&mut csi, &clone_mount).await;
    drop_caches();
    let clone_mount = bench
        .stage_publish(&mut csi, &clone.volume_id, Access::Ext4, "clone")
        .await;
    verify_files(&clone_mount.target, &clone_files, &[], "the hydrated clone");
    drop_caches();
    verify_files(
        &source_mount.target,
        &files,
        &["clone-only.bin"],
        "the source after the clone's writes",
    );

    bench.unpublish_unstage(&mut csi, &source_mount).await;
    must(
        "DeleteVolume (source, clone hydrated)",
        csi.delete_volume(&source.volume_id).await,
    );
    drop_caches();
    verify_files(
        &clone_mount.target,
        &clone_files,
        &[],
        "the clone after its source was deleted",
    );
    assert_single_linear(&clone_dm, 128 * MIB);

    bench.unpublish_unstage(&mut csi, &clone_mount).await;
    must(
        "DeleteVolume (clone)",
        csi.delete_volume(&clone.volume_id).await,
    );
    assert!(
        csi.admin_list().await.is_empty(),
        "volumes are still listed after every volume was deleted"
    );
    bench.assert_nothing_left();
    bench.step("passed");
}

/// The source of a clone is deleted while the clone has hardly started
/// copying (paused): the delete succeeds, and the clone still reads exactly
/// what the source held, before and after it finishes hydrating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_deleted_during_hydration_keeps_the_clone_right() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    let mut bench = Bench::new("srcdel", PoolFs::Ext4);
    let mut csi = bench.start_driver().await;
    let size = 128 * MIB;

    let source = must(
        "CreateVolume (block source)",
        csi.create_volume(&bench.name("source"), size, Access::Block, None, &[])
            .await,
    );
    let source_mount = bench
        .stage_publish(&mut csi, &source.volume_id, Access::Block, "source")
        .await;
    let extents = vec![
        (0, pattern(21, 4 * MIB as usize)),
        (100 * MIB, pattern(22, MIB as usize + 3 * BLOCK)),
        (size - 16 * KIB, pattern(23, 16 * KIB as usize)),
    ];
    write_extents(&source_mount.target, &extents);
    let want = verify_device(&source_mount.target, size, &extents, "the source");
    bench.step(&format!(
        "source {} written, sha256 {want}",
        source.volume_id
    ));

    let clone = must(
        "CreateVolume (clone, slow hydration)",
        csi.create_volume(
            &bench.name("clone"),
            size,
            Access::Block,
            Some(Source::Volume(&source.volume_id)),
            &SLOW,
        )
        .await,
    );
    let paused = must(
        "SetHydration PAUSE",
        csi.set_hydration(&clone.volume_id, Action::Pause, None, None)
            .await,
    );
    assert!(
        paused.hydration.as_ref().is_some_and(|h| h.paused),
        "PAUSE answered with {paused:?}"
    );
    let clone_dm = csi.dm_name_of(&clone.volume_id).await;
    let (hydrated, total) = clone_regions(&clone_dm);
    bench.step(&format!(
        "clone {} paused at {hydrated}/{total} regions",
        clone.volume_id
    ));

    bench.unpublish_unstage(&mut csi, &source_mount).await;
    must(
        "DeleteVolume (source of a hydrating clone)",
        csi.delete_volume(&source.volume_id).await,
    );
    assert!(
        !csi.admin_list()
            .await
            .iter()
            .any(|v| v.volume_id == source.volume_id),
        "the deleted source is still listed"
    );
    bench.step("source deleted");

    let clone_mount = bench
        .stage_publish(&mut csi, &clone.volume_id, Access::Block, "clone")
        .await;
    let got = verify_device(
        &clone_mount.target,
        size,
        &extents,
        "the paused clone after its source was deleted",
    );
    assert_eq!(got, want);
    let (hydrated, total) = clone_regions(&clone_dm);
    assert!(
        hydrated < total,
        "the clone finished hydrating while paused ({hydrated}/{total}): the check above \
         proved nothing about reading from the source image"
    );
    bench.step(&format!(
        "clone reads right with its source deleted, at {hydrated}/{total} regions hydrated"
    ));

    must(
        "SetHydration TUNE",
        csi.set_hydration(
            &clone.volume_id,
            Action::Tune,
            Some(FAST_THRESHOLD),
            Some(FAST_BATCH),
        )
        .await,
    );
    must(
        "SetHydration RESUME",
        csi.set_hydration(&clone.volume_id, Action::Resume, None, None)
            .await,
    );
    let done = csi
        .wait_complete(&bench, &clone.volume_id, Duration::from_secs(180))
        .await;
    bench.step(&format!("clone hydrated: {}", describe(&done)));
    assert_single_linear(&clone_dm, size);
    let got = verify_device(&clone_mount.target, size, &extents, "the hydrated clone");
    assert_eq!(got, want);

    bench.unpublish_unstage(&mut csi, &clone_mount).await;
    must(
        "DeleteVolume (clone)",
        csi.delete_volume(&clone.volume_id).await,
    );
    bench.assert_nothing_left();
    bench.step("passed");
}

/// On a pool without reflink (ext4) the driver cuts a snapshot by
/// redirecting the volume; the restore has the data of the cut, the source
/// its later data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_on_an_ext4_pool() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    snapshot_then_restore(PoolFs::Ext4).await;
}

/// The same on xfs, where the cut is a reflink and the source is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_on_an_xfs_pool() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    snapshot_then_restore(PoolFs::Xfs).await;
}

async fn snapshot_then_restore(fs: PoolFs) {
    let mut bench = Bench::new(&format!("snap{}", fs.name()), fs);
    let mut csi = bench.start_driver().await;
    let size = 64 * MIB;

    let source = must(
        "CreateVolume (source)",
        csi.create_volume(&bench.name("source"), size, Access::Ext4, None, &[])
            .await,
    );
    let source_mount = bench
        .stage_publish(&mut csi, &source.volume_id, Access::Ext4, "source")
        .await;
    let before = sample_files(31);
    write_files(&source_mount.target, &before);
    bench.step(&format!("source written: {}", files_summary(&before)));

    let snapshot = must(
        "CreateSnapshot (source mounted)",
        csi.create_snapshot(&bench.name("snap"), &source.volume_id)
            .await,
    );
    assert!(snapshot.ready_to_use, "{snapshot:?}");
    assert_eq!(snapshot.source_volume_id, source.volume_id);
    assert_eq!(snapshot.size_bytes, to_i64(size));
    let source_status = csi.status_of(&source.volume_id).await;
    bench.step(&format!(
        "snapshot {} cut; the source's hydration after the cut: {}",
        snapshot.snapshot_id,
        source_status
            .hydration
            .as_ref()
            .map_or_else(|| "none".to_owned(), describe)
    ));
    match fs {
        // Reflink: the volume's file is shared, nothing to copy back.
        PoolFs::Xfs => assert!(
            source_status.hydration.is_none(),
            "on xfs the cut should be a reflink, but the source hydrates: {source_status:?}"
        ),
        // Redirect: the volume now reads the image and copies it back.
        PoolFs::Ext4 => assert!(
            source_status.hydration.is_some(),
            "on ext4 the cut must redirect the source into a clone of the image: \
             {source_status:?}"
        ),
    }

    // Change the source after the cut.
    let mut after = before.clone();
    let changed = pattern(32, (3 * MIB) as usize);
    write_file(&source_mount.target.join("a.bin"), &changed);
    after.insert("a.bin".to_owned(), changed);
    let new_file = pattern(33, 200 * KIB as usize);
    write_file(&source_mount.target.join("after.bin"), &new_file);
    after.insert("after.bin".to_owned(), new_file);
    sync_dir(&source_mount.target);

    let restore = must(
        "CreateVolume (from the snapshot)",
        csi.create_volume(
            &bench.name("restore"),
            size,
            Access::Ext4,
            Some(Source::Snapshot(&snapshot.snapshot_id)),
            &[],
        )
        .await,
    );
    let restore_mount = bench
        .stage_publish(&mut csi, &restore.volume_id, Access::Ext4, "restore")
        .await;
    verify_files(
        &restore_mount.target,
        &before,
        &["after.bin"],
        "the restore (at once)",
    );
    drop_caches();
    verify_files(
        &source_mount.target,
        &after,
        &[],
        "the source after the cut",
    );
    bench.step("restore holds the cut's data, source the later data");

    let done = csi
        .wait_complete(&bench, &restore.volume_id, Duration::from_secs(120))
        .await;
    bench.step(&format!("restore hydrated: {}", describe(&done)));
    if fs == PoolFs::Ext4 {
        let done = csi
            .wait_complete(&bench, &source.volume_id, Duration::from_secs(120))
            .await;
        bench.step(&format!("source hydrated back: {}", describe(&done)));
    }
    assert_single_linear(&csi.dm_name_of(&restore.volume_id).await, size);
    assert_single_linear(&csi.dm_name_of(&source.volume_id).await, size);

    // Both afresh through new mounts.
    bench.unpublish_unstage(&mut csi, &restore_mount).await;
    bench.unpublish_unstage(&mut csi, &source_mount).await;
    drop_caches();
    let restore_mount = bench
        .stage_publish(&mut csi, &restore.volume_id, Access::Ext4, "restore")
        .await;
    let source_mount = bench
        .stage_publish(&mut csi, &source.volume_id, Access::Ext4, "source")
        .await;
    verify_files(
        &restore_mount.target,
        &before,
        &["after.bin"],
        "the hydrated restore",
    );
    verify_files(&source_mount.target, &after, &[], "the source, remounted");

    bench.unpublish_unstage(&mut csi, &restore_mount).await;
    bench.unpublish_unstage(&mut csi, &source_mount).await;
    must(
        "DeleteVolume (restore)",
        csi.delete_volume(&restore.volume_id).await,
    );
    must(
        "DeleteSnapshot",
        csi.delete_snapshot(&snapshot.snapshot_id).await,
    );
    must(
        "DeleteVolume (source)",
        csi.delete_volume(&source.volume_id).await,
    );
    bench.assert_nothing_left();
    bench.step("passed");
}

/// SIGKILL during a slow hydration: the kernel keeps the clone, the
/// restarted driver takes it over without losing progress or attaching
/// anything twice, CreateVolume stays idempotent, `liveclone status` shows
/// the clone, and after tuning it up the clone completes with the right
/// data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_driver_resumes_hydration_and_leaks_nothing() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    let mut bench = Bench::new("killed", PoolFs::Ext4);
    let mut csi = bench.start_driver().await;
    let size = 256 * MIB;

    let source = must(
        "CreateVolume (block source)",
        csi.create_volume(&bench.name("source"), size, Access::Block, None, &[])
            .await,
    );
    let source_mount = bench
        .stage_publish(&mut csi, &source.volume_id, Access::Block, "source")
        .await;
    let extents = vec![
        (0, pattern(41, 8 * MIB as usize)),
        (192 * MIB, pattern(42, 4 * MIB as usize)),
        (size - 64 * KIB, pattern(43, 64 * KIB as usize)),
    ];
    write_extents(&source_mount.target, &extents);
    bench.unpublish_unstage(&mut csi, &source_mount).await;

    let request = create_request(
        &bench.name("clone"),
        size,
        Access::Block,
        Some(Source::Volume(&source.volume_id)),
        &SLOW,
    );
    let clone = must(
        "CreateVolume (clone, slow hydration)",
        csi.controller
            .create_volume(request.clone())
            .await
            .map(|r| {
                r.into_inner()
                    .volume
                    .expect("CreateVolume returned no volume")
            }),
    );
    let clone_dm = csi.dm_name_of(&clone.volume_id).await;
    let progress = csi
        .wait_hydration(&clone.volume_id, Duration::from_secs(120), |h| {
            h.hydrated_bytes > 0
        })
        .await;
    assert!(
        progress.hydrated_bytes < progress.total_bytes,
        "the slow hydration finished before the driver could be killed: {}",
        describe(&progress)
    );
    assert_eq!(progress.threshold, 1, "{progress:?}");
    assert_eq!(progress.batch_size, 1, "{progress:?}");
    bench.step(&format!(
        "clone {} hydrating: {}",
        clone.volume_id,
        describe(&progress)
    ));

    // `liveclone status`, both forms, while it hydrates.
    let table = liveclone_cli(&["status", "--endpoint", &bench.endpoint]);
    bench.step(&format!("liveclone status:\n{table}"));
    assert!(table.starts_with("VOLUME"), "{table}");
    let row = table
        .lines()
        .find(|line| line.starts_with(&clone.volume_id))
        .unwrap_or_else(|| panic!("liveclone status does not list the clone:\n{table}"));
    assert!(
        row.contains(&format!("volume {}", source.volume_id))
            && ["Hydrating", "Stalled", "Pending"]
                .iter()
                .any(|phase| row.contains(phase)),
        "the clone's row does not show its source and a hydrating phase: {row}"
    );
    let json = liveclone_cli(&["status", "--json", "--endpoint", &bench.endpoint]);
    let parsed: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("liveclone status --json is not JSON ({e}):\n{json}"));
    let entry = parsed["volumes"]
        .as_array()
        .and_then(|volumes| {
            volumes
                .iter()
                .find(|v| v["volumeId"] == clone.volume_id.as_str())
        })
        .unwrap_or_else(|| panic!("liveclone status --json does not list the clone:\n{json}"));
    assert_eq!(entry["hydration"]["totalBytes"], size, "{entry}");
    assert_eq!(entry["hydration"]["threshold"], 1, "{entry}");
    assert_eq!(
        entry["contentSource"],
        format!("volume {}", source.volume_id).as_str(),
        "{entry}"
    );

    let loops_before = pool_loops(&bench.pool);
    let devices_before = dm_devices();
    let (kernel_before, total) = clone_regions(&clone_dm);
    bench.kill_driver();
    let (kernel_after_kill, _) = clone_regions(&clone_dm);
    bench.step(&format!(
        "driver killed (SIGKILL) at {} hydrated bytes; the kernel's count went \
         {kernel_before} -> {kernel_after_kill} of {total} regions meanwhile",
        progress.hydrated_bytes
    ));

    let mut csi = bench.start_driver().await;
    let resumed = csi
        .wait_hydration(&clone.volume_id, Duration::from_secs(60), |h| {
            h.hydrated_bytes > 0 || h.phase == "Complete"
        })
        .await;
    bench.step(&format!("after the restart: {}", describe(&resumed)));
    assert!(
        resumed.hydrated_bytes >= progress.hydrated_bytes,
        "hydration went back after the restart: {} bytes before the kill, {} after",
        progress.hydrated_bytes,
        resumed.hydrated_bytes
    );
    let (kernel_after_restart, _) = clone_regions(&clone_dm);
    assert!(
        kernel_after_restart >= kernel_after_kill,
        "the kernel's hydrated count went back over the restart: {kernel_after_kill} -> \
         {kernel_after_restart} (was the metadata reset?)"
    );
    let loops_after = pool_loops(&bench.pool);
    let new_loops: Vec<_> = loops_after
        .iter()
        .filter(|(device, _)| !loops_before.contains_key(*device))
        .collect();
    assert!(
        new_loops.is_empty(),
        "the restarted driver attached pool files again: {new_loops:?} (before the kill: \
         {loops_before:?})"
    );
    let new_devices: Vec<_> = dm_devices().difference(&devices_before).cloned().collect();
    assert!(
        new_devices.is_empty(),
        "the restarted driver made new devices: {new_devices:?}"
    );
    assert_eq!(resumed.threshold, 1, "recovery lost the clone's tunables");

    // CreateVolume again with the very same request: same volume.
    let again = must(
        "CreateVolume (repeated after the restart)",
        csi.controller.create_volume(request).await.map(|r| {
            r.into_inner()
                .volume
                .expect("CreateVolume returned no volume")
        }),
    );
    assert_eq!(again.volume_id, clone.volume_id);
    assert_eq!(again.capacity_bytes, clone.capacity_bytes);
    assert_eq!(again.content_source, clone.content_source);

    let tuned = must(
        "SetHydration TUNE",
        csi.set_hydration(
            &clone.volume_id,
            Action::Tune,
            Some(FAST_THRESHOLD),
            Some(FAST_BATCH),
        )
        .await,
    );
    let tuned = tuned.hydration.expect("TUNE answered without hydration");
    assert_eq!(
        (tuned.threshold, tuned.batch_size),
        (FAST_THRESHOLD, FAST_BATCH)
    );
    let done = csi
        .wait_complete(&bench, &clone.volume_id, Duration::from_secs(300))
        .await;
    bench.step(&format!("clone hydrated: {}", describe(&done)));
    assert_single_linear(&clone_dm, size);
    let json = liveclone_cli(&["status", "--json", "--endpoint", &bench.endpoint]);
    assert!(
        json.contains("\"phase\": \"Complete\""),
        "liveclone status --json does not show the completed clone:\n{json}"
    );

    let clone_mount = bench
        .stage_publish(&mut csi, &clone.volume_id, Access::Block, "clone")
        .await;
    let sum = verify_device(&clone_mount.target, size, &extents, "the hydrated clone");
    bench.step(&format!("clone data right, sha256 {sum}"));
    bench.unpublish_unstage(&mut csi, &clone_mount).await;

    must(
        "DeleteVolume (clone)",
        csi.delete_volume(&clone.volume_id).await,
    );
    must(
        "DeleteVolume (source)",
        csi.delete_volume(&source.volume_id).await,
    );
    bench.assert_nothing_left();
    bench.step("passed");
}

/// ControllerExpandVolume on a clone whose hydration is paused, then
/// NodeExpandVolume on its mount: the file system grows at once, and the
/// clone still completes with the right data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_during_hydration() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    let mut bench = Bench::new("expand", PoolFs::Ext4);
    let mut csi = bench.start_driver().await;
    let size = 64 * MIB;
    let grown = 160 * MIB;

    let source = must(
        "CreateVolume (source)",
        csi.create_volume(&bench.name("source"), size, Access::Ext4, None, &[])
            .await,
    );
    let source_mount = bench
        .stage_publish(&mut csi, &source.volume_id, Access::Ext4, "source")
        .await;
    let files = sample_files(51);
    write_files(&source_mount.target, &files);
    bench.unpublish_unstage(&mut csi, &source_mount).await;

    let clone = must(
        "CreateVolume (clone, slow hydration)",
        csi.create_volume(
            &bench.name("clone"),
            size,
            Access::Ext4,
            Some(Source::Volume(&source.volume_id)),
            &SLOW,
        )
        .await,
    );
    must(
        "SetHydration PAUSE",
        csi.set_hydration(&clone.volume_id, Action::Pause, None, None)
            .await,
    );
    let clone_dm = csi.dm_name_of(&clone.volume_id).await;
    let clone_mount = bench
        .stage_publish(&mut csi, &clone.volume_id, Access::Ext4, "clone")
        .await;
    let fs_before = fs_bytes(&clone_mount.target);
    bench.step(&format!(
        "clone {} paused at {:?} regions, file system {fs_before} bytes",
        clone.volume_id,
        clone_regions(&clone_dm)
    ));

    let expanded = must(
        "ControllerExpandVolume (hydrating clone)",
        csi.controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: clone.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: to_i64(grown),
                    limit_bytes: 0,
                }),
                volume_capability: Some(capability(Access::Ext4)),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner),
    );
    assert!(
        expanded.capacity_bytes >= to_i64(grown),
        "ControllerExpandVolume answered {expanded:?}"
    );
    assert!(expanded.node_expansion_required, "{expanded:?}");
    let table = dm_table(&clone_dm);
    bench.step(&format!("expanded; the clone's table:\n{table}"));
    assert_eq!(
        table_sectors(&table),
        grown / SECTOR,
        "the device does not cover the new size:\n{table}"
    );
    assert!(
        table
            .lines()
            .any(|line| line.split_whitespace().nth(2) == Some("clone")),
        "the paused clone lost its clone target on expansion:\n{table}"
    );

    let node_expanded = must(
        "NodeExpandVolume",
        csi.node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: clone.volume_id.clone(),
                volume_path: path_string(&clone_mount.target),
                staging_target_path: path_string(&clone_mount.staging),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: to_i64(grown),
                    limit_bytes: 0,
                }),
                volume_capability: Some(capability(Access::Ext4)),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner),
    );
    let fs_after = fs_bytes(&clone_mount.target);
    let df = run("df", &["-B1".as_ref(), clone_mount.target.as_os_str()]);
    bench.step(&format!(
        "NodeExpandVolume answered {} bytes; file system {fs_before} -> {fs_after} bytes\n{df}",
        node_expanded.capacity_bytes
    ));
    assert!(
        fs_after >= fs_before + (grown - size) * 9 / 10,
        "the file system did not grow: {fs_before} -> {fs_after} bytes\n{df}"
    );
    let (hydrated, total) = clone_regions(&clone_dm);
    assert!(
        hydrated < total,
        "the paused clone completed during expansion ({hydrated}/{total})"
    );
    verify_files(&clone_mount.target, &files, &[], "the expanded clone");
    // Use the new room: more than the old file system held in all.
    let mut clone_files = files.clone();
    let big = pattern(52, (size + 8 * MIB) as usize);
    write_file(&clone_mount.target.join("big.bin"), &big);
    clone_files.insert("big.bin".to_owned(), big);
    sync_dir(&clone_mount.target);

    must(
        "SetHydration TUNE",
        csi.set_hydration(
            &clone.volume_id,
            Action::Tune,
            Some(FAST_THRESHOLD),
            Some(FAST_BATCH),
        )
        .await,
    );
    must(
        "SetHydration RESUME",
        csi.set_hydration(&clone.volume_id, Action::Resume, None, None)
            .await,
    );
    let done = csi
        .wait_complete(&bench, &clone.volume_id, Duration::from_secs(180))
        .await;
    bench.step(&format!("clone hydrated: {}", describe(&done)));
    let table = dm_table(&clone_dm);
    assert!(
        table
            .lines()
            .all(|line| line.split_whitespace().nth(2) == Some("linear")),
        "the hydrated clone is not linear:\n{table}"
    );
    assert_eq!(table_sectors(&table), grown / SECTOR, "{table}");

    bench.unpublish_unstage(&mut csi, &clone_mount).await;
    drop_caches();
    let clone_mount = bench
        .stage_publish(&mut csi, &clone.volume_id, Access::Ext4, "clone")
        .await;
    verify_files(
        &clone_mount.target,
        &clone_files,
        &[],
        "the hydrated, expanded clone",
    );
    assert!(fs_bytes(&clone_mount.target) >= fs_after);

    bench.unpublish_unstage(&mut csi, &clone_mount).await;
    must(
        "DeleteVolume (clone)",
        csi.delete_volume(&clone.volume_id).await,
    );
    must(
        "DeleteVolume (source)",
        csi.delete_volume(&source.volume_id).await,
    );
    bench.assert_nothing_left();
    bench.step("passed");
}

/// Requests the driver must refuse, with the right code, before touching
/// anything: no device, loop, file, record or mount appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_changes_nothing() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    let mut bench = Bench::new("badinput", PoolFs::Ext4);
    let mut csi = bench.start_driver().await;
    let size = 64 * MIB;

    let source = must(
        "CreateVolume (source)",
        csi.create_volume(&bench.name("source"), size, Access::Block, None, &[])
            .await,
    );
    let outside = bench.root.join("outside");
    let before = bench.inventory();
    let listed_before = csi.admin_list().await.len();

    let region_3k: &[(&str, &str)] = &[("liveclone.io/regionSize", "3KiB")];
    let unknown: &[(&str, &str)] = &[("liveclone.io/foo", "1")];
    let no_parameters: &[(&str, &str)] = &[];
    let cases: Vec<RefusedCreate<'_>> = vec![
        (
            "plain-region-3k",
            None,
            size,
            region_3k,
            Code::InvalidArgument,
        ),
        (
            "clone-region-3k",
            Some(Source::Volume(&source.volume_id)),
            size,
            region_3k,
            Code::InvalidArgument,
        ),
        ("plain-unknown", None, size, unknown, Code::InvalidArgument),
        (
            "clone-unknown",
            Some(Source::Volume(&source.volume_id)),
            size,
            unknown,
            Code::InvalidArgument,
        ),
        (
            "clone-smaller",
            Some(Source::Volume(&source.volume_id)),
            size / 2,
            no_parameters,
            Code::OutOfRange,
        ),
    ];
    for (what, source_of, bytes, params, code) in cases {
        let result = csi
            .create_volume(&bench.name(what), bytes, Access::Block, source_of, params)
            .await;
        expect_code(&format!("CreateVolume {what}"), result, code);
    }

    let staging_outside = outside.join("staging");
    let dotdot = format!("{}/../outside/staging", bench.mnt.display());
    for staging in [path_string(&staging_outside), dotdot] {
        let result = csi
            .node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: source.volume_id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(capability(Access::Block)),
                ..Default::default()
            })
            .await;
        expect_code(
            &format!("NodeStageVolume at {staging}"),
            result,
            Code::InvalidArgument,
        );
    }
    let staging_inside = bench.mnt.join("source-staging");
    std::fs::create_dir_all(&staging_inside).expect("creating the staging folder");
    let result = csi
        .node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: source.volume_id.clone(),
            staging_target_path: path_string(&staging_inside),
            target_path: path_string(&outside.join("target")),
            volume_capability: Some(capability(Access::Block)),
            ..Default::default()
        })
        .await;
    expect_code(
        "NodePublishVolume to a target outside the root",
        result,
        Code::InvalidArgument,
    );
    std::fs::remove_dir(&staging_inside).expect("removing the staging folder");

    assert!(
        !outside.exists(),
        "{} was created by a refused request",
        outside.display()
    );
    let after = bench.inventory();
    assert_eq!(
        before, after,
        "refused requests changed devices, loops, files or mounts"
    );
    assert_eq!(
        csi.admin_list().await.len(),
        listed_before,
        "refused requests added volumes"
    );

    must(
        "DeleteVolume (source)",
        csi.delete_volume(&source.volume_id).await,
    );
    bench.assert_nothing_left();
    bench.step("passed");
}

// ---------------------------------------------------------------------------
// The bench: a work folder, a pool, the driver process, and clean-up.

/// A CreateVolume the driver must refuse: name suffix, source, size,
/// parameters, and the code it must answer.
type RefusedCreate<'a> = (
    &'a str,
    Option<Source<'a>>,
    u64,
    &'a [(&'a str, &'a str)],
    Code,
);

/// The same check as the bench's smoke tests: these tests create devices
/// and mounts, so they run in the VM, or on a host only when asked to.
fn require_real_kernel() {
    let in_vm = std::env::var_os("LIVECLONE_IN_VM").is_some_and(|v| v == "1");
    let on_host = std::env::var_os("LIVECLONE_TEST_ON_HOST").is_some_and(|v| v == "1");
    assert!(
        in_vm || on_host,
        "real-kernel tests run in the test VM (`make test-vm`), or on a host with dm-clone \
         when LIVECLONE_TEST_ON_HOST=1"
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolFs {
    /// The pool in the scratch disk's own ext4 (the VM's TMPDIR): no reflink.
    Ext4,
    /// The pool on a fresh xfs in a loop-mounted image: reflink.
    Xfs,
}

impl PoolFs {
    fn name(self) -> &'static str {
        match self {
            PoolFs::Ext4 => "ext4",
            PoolFs::Xfs => "xfs",
        }
    }
}

/// An xfs file system in an image file, on a loop device, mounted.
struct XfsPool {
    loop_device: PathBuf,
    mount_point: PathBuf,
}

impl XfsPool {
    fn new(image: &Path, mount_point: &Path) -> Self {
        File::create(image)
            .and_then(|file| file.set_len(XFS_IMAGE_BYTES))
            .unwrap_or_else(|e| panic!("creating {}: {e}", image.display()));
        let device = run(
            "losetup",
            &["--find".as_ref(), "--show".as_ref(), image.as_os_str()],
        );
        let pool = Self {
            loop_device: PathBuf::from(device.trim()),
            mount_point: mount_point.to_owned(),
        };
        run(
            "mkfs.xfs",
            &["-q".as_ref(), "-f".as_ref(), pool.loop_device.as_os_str()],
        );
        std::fs::create_dir(mount_point)
            .unwrap_or_else(|e| panic!("creating {}: {e}", mount_point.display()));
        run(
            "mount",
            &[
                "-t".as_ref(),
                "xfs".as_ref(),
                pool.loop_device.as_os_str(),
                mount_point.as_os_str(),
            ],
        );
        pool
    }

    fn tear_down(&self) {
        unmount_all_under(&self.mount_point);
        let detached = Command::new("losetup")
            .arg("-d")
            .arg(&self.loop_device)
            .output();
        if !detached.is_ok_and(|output| output.status.success()) {
            say(&format!(
                "cleanup: could not detach {}",
                self.loop_device.display()
            ));
        }
    }
}

/// Everything a refused request must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Inventory {
    devices: BTreeSet<String>,
    loops: BTreeMap<String, String>,
    pool_files: BTreeSet<PathBuf>,
    state_files: BTreeSet<PathBuf>,
    mounts: Vec<PathBuf>,
}

struct Bench {
    label: String,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    pool: PathBuf,
    state: PathBuf,
    mnt: PathBuf,
    endpoint: String,
    log: PathBuf,
    xfs: Option<XfsPool>,
    driver: Option<Child>,
    starts: u32,
    dm_before: BTreeSet<String>,
    started: Instant,
}

impl Bench {
    fn new(label: &str, fs: PoolFs) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lcd-")
            .tempdir()
            .expect("creating the work folder under TMPDIR");
        let root = dir
            .path()
            .canonicalize()
            .expect("resolving the work folder");
        let mnt = root.join("mnt");
        let state = root.join("state");
        for folder in [&mnt, &state] {
            std::fs::create_dir(folder)
                .unwrap_or_else(|e| panic!("creating {}: {e}", folder.display()));
        }
        let mut bench = Self {
            label: label.to_owned(),
            dir: Some(dir),
            pool: root.join("pool"),
            state,
            mnt,
            endpoint: format!("unix://{}", root.join("csi.sock").display()),
            log: root.join("driver.log"),
            xfs: None,
            driver: None,
            starts: 0,
            dm_before: dm_devices(),
            started: Instant::now(),
            root,
        };
        if fs == PoolFs::Xfs {
            let xfs = XfsPool::new(&bench.root.join("pool.xfs"), &bench.root.join("xfs"));
            bench.pool = xfs.mount_point.join("pool");
            bench.xfs = Some(xfs);
        }
        std::fs::create_dir(&bench.pool)
            .unwrap_or_else(|e| panic!("creating {}: {e}", bench.pool.display()));
        let magic = nix::sys::statfs::statfs(&bench.pool)
            .expect("statfs of the pool")
            .filesystem_type();
        let want = match fs {
            PoolFs::Ext4 => nix::sys::statfs::EXT4_SUPER_MAGIC,
            PoolFs::Xfs => nix::sys::statfs::XFS_SUPER_MAGIC,
        };
        assert!(
            magic == want,
            "the pool {} is not on {} ({magic:?})",
            bench.pool.display(),
            fs.name()
        );
        bench.step(&format!(
            "pool on {} at {}",
            fs.name(),
            bench.pool.display()
        ));
        bench
    }

    /// A CO name unique to this test and process.
    fn name(&self, what: &str) -> String {
        format!("{}-{what}-{}", self.label, std::process::id())
    }

    fn step(&self, message: &str) {
        say(&format!(
            "[{} +{:.1}s] {message}",
            self.label,
            self.started.elapsed().as_secs_f64()
        ));
    }

    /// Starts `liveclone standalone` and waits until Probe says ready.
    async fn start_driver(&mut self) -> Csi {
        assert!(self.driver.is_none(), "the driver is already running");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let _ = writeln!(log, "===== test: driver start #{} =====", self.starts);
        let err = log.try_clone().expect("duplicating the log handle");
        let mut command = Command::new(driver_binary());
        let args: Vec<&OsStr> = vec![
            OsStr::new("standalone"),
            OsStr::new("--endpoint"),
            OsStr::new(&self.endpoint),
            OsStr::new("--state-dir"),
            self.state.as_os_str(),
            OsStr::new("--pool-dir"),
            self.pool.as_os_str(),
            OsStr::new("--node-id"),
            OsStr::new(NODE_ID),
            OsStr::new("--allowed-mount-root"),
            self.mnt.as_os_str(),
            OsStr::new("--hydration-poll-seconds"),
            OsStr::new("0.5"),
            OsStr::new("--stall-after-seconds"),
            OsStr::new("5"),
        ];
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env(
                "RUST_LOG",
                "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info",
            );
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver_binary().display()));
        self.driver = Some(child);

        let started = Instant::now();
        let mut last_problem = String::from("no socket yet");
        loop {
            if let Some(child) = self.driver.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.driver = None;
                    panic!("the driver exited ({status}) while starting: {last_problem}");
                }
            }
            match connect_unix(&self.endpoint).await {
                Ok(channel) => {
                    let mut identity = IdentityClient::new(channel.clone());
                    match identity.probe(csi::ProbeRequest {}).await {
                        Ok(response) if response.get_ref().ready == Some(true) => {
                            self.step(&format!(
                                "driver #{} ready in {:.1} s",
                                self.starts,
                                started.elapsed().as_secs_f64()
                            ));
                            return Csi::new(channel);
                        }
                        Ok(response) => last_problem = format!("Probe: {:?}", response.get_ref()),
                        Err(status) if status.code() == Code::FailedPrecondition => {
                            panic!("the driver is unhealthy: {}", status.message())
                        }
                        Err(status) => last_problem = format!("Probe: {status}"),
                    }
                }
                Err(e) => last_problem = format!("{e:#}"),
            }
            assert!(
                started.elapsed() < START_LIMIT,
                "the driver was not ready within {START_LIMIT:?}: {last_problem}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL: no shutdown code runs, as in a node crash of the process.
    fn kill_driver(&mut self) {
        let mut child = self.driver.take().expect("the driver is not running");
        child.kill().expect("SIGKILL to the driver");
        let status = child.wait().expect("reaping the driver");
        let mut log = OpenOptions::new().append(true).open(&self.log).ok();
        if let Some(log) = log.as_mut() {
            let _ = writeln!(log, "===== test: driver killed ({status}) =====");
        }
    }

    /// SIGTERM, a bounded wait, then SIGKILL.
    fn stop_driver(&mut self) {
        let Some(mut child) = self.driver.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < STOP_LIMIT {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        say("the driver did not exit after SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    async fn stage_publish(
        &self,
        csi: &mut Csi,
        volume_id: &str,
        access: Access,
        tag: &str,
    ) -> Mounted {
        // As kubelet does: the CO makes the staging folder and the target's
        // parent; the driver makes the target.
        let staging = self.mnt.join(format!("{tag}-staging"));
        std::fs::create_dir_all(&staging)
            .unwrap_or_else(|e| panic!("creating {}: {e}", staging.display()));
        let target = self.mnt.join(format!("{tag}-target"));
        must(
            &format!("NodeStageVolume ({tag})"),
            csi.node
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    staging_target_path: path_string(&staging),
                    volume_capability: Some(capability(access)),
                    ..Default::default()
                })
                .await,
        );
        must(
            &format!("NodePublishVolume ({tag})"),
            csi.node
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    staging_target_path: path_string(&staging),
                    target_path: path_string(&target),
                    volume_capability: Some(capability(access)),
                    readonly: false,
                    ..Default::default()
                })
                .await,
        );
        let kind = std::fs::metadata(&target)
            .unwrap_or_else(|e| panic!("the published {} is missing: {e}", target.display()));
        match access {
            Access::Ext4 => assert!(
                mounts_under(&self.mnt).contains(&target) && kind.is_dir(),
                "{} is not a mounted folder after NodePublishVolume",
                target.display()
            ),
            Access::Block => {
                use std::os::unix::fs::FileTypeExt;
                assert!(
                    kind.file_type().is_block_device(),
                    "{} is not a block device after NodePublishVolume",
                    target.display()
                );
            }
        }
        Mounted {
            volume_id: volume_id.to_owned(),
            staging,
            target,
        }
    }

    async fn unpublish_unstage(&self, csi: &mut Csi, mounted: &Mounted) {
        must(
            "NodeUnpublishVolume",
            csi.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: mounted.volume_id.clone(),
                    target_path: path_string(&mounted.target),
                })
                .await,
        );
        must(
            "NodeUnstageVolume",
            csi.node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: mounted.volume_id.clone(),
                    staging_target_path: path_string(&mounted.staging),
                })
                .await,
        );
        assert!(
            !mounted.target.exists(),
            "NodeUnpublishVolume left {}",
            mounted.target.display()
        );
        let left = mounts_under(&mounted.staging);
        assert!(
            left.is_empty(),
            "still mounted after NodeUnstageVolume: {left:?}"
        );
        // The CO removes the staging folder.
        let _ = std::fs::remove_dir(&mounted.staging);
    }

    fn inventory(&self) -> Inventory {
        Inventory {
            devices: dm_devices(),
            loops: pool_loops(&self.pool),
            pool_files: files_under(&self.pool),
            state_files: files_under(&self.state),
            mounts: mounts_under(&self.root),
        }
    }

    /// After every volume and snapshot was deleted: no device, loop, pool
    /// file or mount of ours.
    fn assert_nothing_left(&self) {
        let devices: Vec<String> = dm_devices().difference(&self.dm_before).cloned().collect();
        let loops = pool_loops(&self.pool);
        let pool_files = files_under(&self.pool);
        let mounts = mounts_under(&self.mnt);
        assert!(
            devices.is_empty() && loops.is_empty() && pool_files.is_empty() && mounts.is_empty(),
            "left after everything was deleted:\n  devices {devices:?}\n  loops {loops:?}\n  \
             pool files {pool_files:?}\n  mounts {mounts:?}"
        );
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Err(e) = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text)) {
            return format!("(cannot read {}: {e})", self.log.display());
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// What a failure report needs besides the log.
    fn kernel_state(&self) -> String {
        let mut out = String::new();
        for name in dm_devices() {
            let table = try_run("dmsetup", &["table", &name]);
            let status = try_run("dmsetup", &["status", "--noflush", &name]);
            out.push_str(&format!("{name}:\n  table  {table}\n  status {status}\n"));
        }
        out.push_str(&format!("pool loops: {:?}\n", pool_loops(&self.pool)));
        out.push_str(&format!("pool files: {:?}\n", files_under(&self.pool)));
        out.push_str(&format!("mounts: {:?}\n", mounts_under(&self.root)));
        out
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os(SHOW_LOG_ENV).is_some_and(|v| v == "1") {
            say(&format!(
                "[{}] --- the driver's log ({SHOW_LOG_ENV}=1) ---\n{}\n--- end of the driver's log ---",
                self.label,
                self.log_tail(usize::MAX)
            ));
        }
        if std::thread::panicking() {
            say(&format!(
                "[{}] FAILED after {:.1} s; kernel state:\n{}\n--- last {LOG_TAIL} lines of the \
                 driver's log ({}) ---\n{}\n--- end of the driver's log ---",
                self.label,
                self.started.elapsed().as_secs_f64(),
                self.kernel_state(),
                self.log.display(),
                self.log_tail(LOG_TAIL)
            ));
        }
        self.stop_driver();
        unmount_all_under(&self.mnt);
        unmount_all_under(&self.state);
        for name in dm_devices().difference(&self.dm_before) {
            let removed = Command::new("dmsetup")
                .args(["remove", "--retry", name])
                .output();
            if !removed.is_ok_and(|o| o.status.success()) {
                let forced = Command::new("dmsetup")
                    .args(["remove", "--force", "--retry", name])
                    .output();
                if !forced.is_ok_and(|o| o.status.success()) {
                    say(&format!("cleanup: could not remove device {name}"));
                }
            }
        }
        for device in pool_loops(&self.pool).keys() {
            let detached = Command::new("losetup").args(["-d", device]).output();
            if !detached.is_ok_and(|o| o.status.success()) {
                say(&format!("cleanup: could not detach {device}"));
            }
        }
        if let Some(xfs) = self.xfs.take() {
            xfs.tear_down();
        }
        if let Some(dir) = self.dir.take() {
            // Never delete recursively through something still mounted.
            if mounts_under(&self.root).is_empty() {
                drop(dir);
            } else {
                let kept = dir.keep();
                say(&format!(
                    "cleanup: left {} in place: something below it is still mounted",
                    kept.display()
                ));
            }
        }
    }
}

/// A staged and published volume.
struct Mounted {
    volume_id: String,
    staging: PathBuf,
    target: PathBuf,
}

// ---------------------------------------------------------------------------
// The driver's APIs.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Block,
    Ext4,
}

fn capability(access: Access) -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    csi::VolumeCapability {
        access_type: Some(match access {
            Access::Block => AccessType::Block(BlockVolume {}),
            Access::Ext4 => AccessType::Mount(MountVolume {
                fs_type: "ext4".to_owned(),
                ..Default::default()
            }),
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
    }
}

#[derive(Clone, Copy, Debug)]
enum Source<'a> {
    Volume(&'a str),
    Snapshot(&'a str),
}

fn volume_source(id: &str) -> csi::VolumeContentSource {
    content_source(Source::Volume(id))
}

fn content_source(source: Source<'_>) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    csi::VolumeContentSource {
        r#type: Some(match source {
            Source::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.to_owned(),
            }),
            Source::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_owned(),
            }),
        }),
    }
}

fn create_request(
    name: &str,
    bytes: u64,
    access: Access,
    source: Option<Source<'_>>,
    parameters: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: to_i64(bytes),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(access)],
        parameters: parameters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        volume_content_source: source.map(content_source),
        ..Default::default()
    }
}

struct Csi {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    admin: AdminClient<Channel>,
}

impl Csi {
    fn new(channel: Channel) -> Self {
        Self {
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel.clone()),
            admin: AdminClient::new(channel),
        }
    }

    async fn create_volume(
        &mut self,
        name: &str,
        bytes: u64,
        access: Access,
        source: Option<Source<'_>>,
        parameters: &[(&str, &str)],
    ) -> Result<csi::Volume, tonic::Status> {
        let request = create_request(name, bytes, access, source, parameters);
        let response = self.controller.create_volume(request).await?.into_inner();
        Ok(response.volume.expect("CreateVolume returned no volume"))
    }

    async fn delete_volume(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn create_snapshot(
        &mut self,
        name: &str,
        source: &str,
    ) -> Result<csi::Snapshot, tonic::Status> {
        let response = self
            .controller
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.to_owned(),
                name: name.to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(response
            .snapshot
            .expect("CreateSnapshot returned no snapshot"))
    }

    async fn delete_snapshot(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn set_hydration(
        &mut self,
        id: &str,
        action: Action,
        threshold: Option<u32>,
        batch_size: Option<u32>,
    ) -> Result<admin::VolumeStatus, tonic::Status> {
        let response = self
            .admin
            .set_hydration(admin::SetHydrationRequest {
                volume_id: id.to_owned(),
                action: action.into(),
                threshold,
                batch_size,
            })
            .await?
            .into_inner();
        Ok(response.volume.expect("SetHydration returned no volume"))
    }

    async fn admin_list(&mut self) -> Vec<admin::VolumeStatus> {
        must(
            "Admin ListVolumes",
            self.admin.list_volumes(admin::ListVolumesRequest {}).await,
        )
        .into_inner()
        .volumes
    }

    async fn status_of(&mut self, id: &str) -> admin::VolumeStatus {
        let volumes = self.admin_list().await;
        let ids: Vec<String> = volumes.iter().map(|v| v.volume_id.clone()).collect();
        volumes
            .into_iter()
            .find(|v| v.volume_id == id)
            .unwrap_or_else(|| panic!("the admin API does not list {id} (it lists {ids:?})"))
    }

    async fn hydration_of(&mut self, id: &str) -> admin::Hydration {
        let status = self.status_of(id).await;
        match status.hydration {
            Some(hydration) => hydration,
            None => panic!("volume {id} has no hydration status: {status:?}"),
        }
    }

    /// The device-mapper name the admin API gives for a volume.
    async fn dm_name_of(&mut self, id: &str) -> String {
        let status = self.status_of(id).await;
        assert!(
            status.device_present,
            "volume {id} has no device: {status:?}"
        );
        let name = Path::new(&status.device)
            .file_name()
            .and_then(OsStr::to_str)
            .unwrap_or_else(|| panic!("odd device path {:?}", status.device))
            .to_owned();
        assert!(name.starts_with(DM_PREFIX), "odd device name {name}");
        name
    }

    /// Polls the admin API until `done` holds, failing on `Failed` or at
    /// `limit`.
    async fn wait_hydration(
        &mut self,
        id: &str,
        limit: Duration,
        done: impl Fn(&admin::Hydration) -> bool,
    ) -> admin::Hydration {
        let start = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let hydration = self.hydration_of(id).await;
            if done(&hydration) {
                return hydration;
            }
            assert!(
                hydration.phase != "Failed",
                "hydration of {id} failed: {}",
                describe(&hydration)
            );
            assert!(
                start.elapsed() < limit,
                "hydration of {id} did not get there within {limit:?}: {}",
                describe(&hydration)
            );
            if last_print.elapsed() >= Duration::from_secs(10) {
                say(&format!("  waiting for {id}: {}", describe(&hydration)));
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn wait_complete(
        &mut self,
        bench: &Bench,
        id: &str,
        limit: Duration,
    ) -> admin::Hydration {
        let start = Instant::now();
        let done = self
            .wait_hydration(id, limit, |h| h.phase == "Complete")
            .await;
        bench.step(&format!(
            "{id} complete after {:.1} s of waiting",
            start.elapsed().as_secs_f64()
        ));
        assert_eq!(done.hydrated_bytes, done.total_bytes, "{done:?}");
        assert!(done.completed_at > 0, "{done:?}");
        done
    }
}

fn describe(h: &admin::Hydration) -> String {
    format!(
        "{}{} {:.1}% ({} of {} bytes), threshold {} batch {}: {}",
        h.phase,
        if h.paused { " (paused)" } else { "" },
        h.percent,
        h.hydrated_bytes,
        h.total_bytes,
        h.threshold,
        h.batch_size,
        h.message
    )
}

fn must<T>(what: &str, result: Result<T, tonic::Status>) -> T {
    result
        .unwrap_or_else(|status| panic!("{what} failed: {:?}: {}", status.code(), status.message()))
}

fn expect_code<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, code: Code) {
    match result {
        Ok(value) => panic!("{what} succeeded ({value:?}); expected {code:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            say(&format!(
                "  {what}: {:?}: {}",
                status.code(),
                status.message()
            ));
        }
    }
}

/// The binary to run. In the VM, a private copy on the scratch disk, made
/// once per test process: the VM reads the host's `target` folder over 9p,
/// and a build on the host that replaced `target/debug/liveclone` while a
/// test started it made the driver die at once with SIGSEGV.
fn driver_binary() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let in_vm = std::env::var_os("LIVECLONE_IN_VM").is_some_and(|v| v == "1");
        if !in_vm {
            return PathBuf::from(BIN);
        }
        let copy =
            std::env::temp_dir().join(format!("liveclone-under-test-{}", std::process::id()));
        std::fs::copy(BIN, &copy)
            .unwrap_or_else(|e| panic!("copying {BIN} to {}: {e}", copy.display()));
        let version = Command::new(&copy)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("running {} --version: {e}", copy.display()));
        assert!(
            version.status.success(),
            "the copy of {BIN} does not run ({}); was it being rebuilt?",
            version.status
        );
        say(&format!(
            "driver under test: {} ({})",
            copy.display(),
            String::from_utf8_lossy(&version.stdout).trim()
        ));
        copy
    })
}

/// `liveclone <args>` as a user would run it; its stdout.
fn liveclone_cli(args: &[&str]) -> String {
    let output = Command::new(driver_binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running liveclone {args:?}: {e}"));
    assert!(
        output.status.success(),
        "liveclone {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// Devices, loops, mounts.

fn run(program: &str, args: &[&OsStr]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Output or the error, for reports.
fn try_run(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        }
        Ok(output) => format!(
            "({program} failed: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => format!("(cannot run {program}: {e})"),
    }
}

/// Our device-mapper devices.
fn dm_devices() -> BTreeSet<String> {
    let listing = run("dmsetup", &["ls".as_ref()]);
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(DM_PREFIX))
        .map(str::to_owned)
        .collect()
}

fn dm_table(name: &str) -> String {
    run("dmsetup", &["table".as_ref(), name.as_ref()])
}

/// Total length of a table, in sectors.
fn table_sectors(table: &str) -> u64 {
    table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(|length| {
            length
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("odd table:\n{table}"))
        })
        .sum()
}

/// The table is one `linear` line over the whole size: the clone is
/// independent of its source and metadata.
fn assert_single_linear(name: &str, bytes: u64) {
    let table = dm_table(name);
    let lines: Vec<&str> = table.lines().collect();
    let fields: Vec<&str> = lines
        .first()
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    let length = (bytes / SECTOR).to_string();
    assert!(
        lines.len() == 1
            && fields.len() == 5
            && fields[0] == "0"
            && fields[1] == length
            && fields[2] == "linear",
        "{name} is not one linear target of {length} sectors:\n{table}"
    );
}

/// `(hydrated, total)` regions of a clone, read without a flush.
fn clone_regions(name: &str) -> (u64, u64) {
    let status = run(
        "dmsetup",
        &["status".as_ref(), "--noflush".as_ref(), name.as_ref()],
    );
    let line = status
        .lines()
        .find(|line| line.split_whitespace().nth(2) == Some("clone"))
        .unwrap_or_else(|| panic!("{name} has no clone target: {status}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    let counts = fields
        .get(6)
        .and_then(|field| field.split_once('/'))
        .and_then(|(h, t)| Some((h.parse().ok()?, t.parse().ok()?)));
    counts.unwrap_or_else(|| panic!("odd clone status of {name}: {line}"))
}

/// Loop devices backed by files under `pool`: device -> backing file.
fn pool_loops(pool: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim().to_owned();
        if Path::new(&backing).starts_with(pool) {
            found.insert(format!("/dev/{name}"), backing);
        }
    }
    found
}

/// Every file (not folder) below `root`, recursively.
fn files_under(root: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(path),
                Ok(_) => {
                    found.insert(path);
                }
                Err(_) => {}
            }
        }
    }
    found
}

/// Mount points at or below `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|point| point.starts_with(root))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    points.dedup();
    points
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Best effort, for clean-up: unmount everything below `root`, deepest
/// first; a busy one is detached lazily.
fn unmount_all_under(root: &Path) {
    for point in mounts_under(root) {
        let plain = Command::new("umount").arg(&point).output();
        if plain.is_ok_and(|output| output.status.success()) {
            continue;
        }
        let lazy = Command::new("umount").arg("-l").arg(&point).output();
        let how = if lazy.is_ok_and(|output| output.status.success()) {
            "detached lazily (busy)"
        } else {
            "could not be unmounted"
        };
        say(&format!("cleanup: {} {how}", point.display()));
    }
}

/// Writes dirty data back and empties the page cache, so the next reads
/// come from the devices.
fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache");
}

/// Size of the file system mounted at `path`.
fn fs_bytes(path: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(path)
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()));
    let bytes: u64 = stat.blocks() * stat.fragment_size();
    bytes
}

// ---------------------------------------------------------------------------
// Data.

type Files = BTreeMap<String, Vec<u8>>;

/// Deterministic bytes: any two seeds differ everywhere.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A few MiB in files of odd sizes, one in a sub-folder.
fn sample_files(seed: u64) -> Files {
    let mut files = Files::new();
    files.insert("a.bin".to_owned(), pattern(seed, (2 * MIB) as usize + 4097));
    files.insert("b.bin".to_owned(), pattern(seed + 1000, MIB as usize));
    files.insert(
        "sub/c.txt".to_owned(),
        format!("liveclone test file, seed {seed}\n").into_bytes(),
    );
    files
}

fn files_summary(files: &Files) -> String {
    files
        .iter()
        .map(|(name, data)| {
            format!(
                "{name} ({} bytes, sha256 {})",
                data.len(),
                &sha256_hex(data)[..16]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("creating {}: {e}", parent.display()));
    }
    let mut file =
        File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn sync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("syncing {}: {e}", dir.display()));
}

fn write_files(dir: &Path, files: &Files) {
    for (name, data) in files {
        write_file(&dir.join(name), data);
    }
    sync_dir(dir);
    sync_dir(&dir.join("sub"));
}

fn overwrite_at(path: &Path, offset: u64, data: &[u8]) {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    file.write_all_at(data, offset)
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn splice(target: &mut [u8], offset: usize, data: &[u8]) {
    target[offset..offset + data.len()].copy_from_slice(data);
}

/// Every file holds exactly what `files` says; `absent` files do not exist.
fn verify_files(dir: &Path, files: &Files, absent: &[&str], what: &str) {
    for (name, want) in files {
        let path = dir.join(name);
        let got = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{what}: reading {}: {e}", path.display()));
        if got != *want {
            let first = got
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(want.len()));
            panic!(
                "{what}: {name} differs (first at byte {first}): {} bytes, sha256 {}; \
                 want {} bytes, sha256 {}",
                got.len(),
                sha256_hex(&got),
                want.len(),
                sha256_hex(want)
            );
        }
    }
    for name in absent {
        let path = dir.join(name);
        assert!(
            !path.exists(),
            "{what}: {} exists but must not",
            path.display()
        );
    }
    say(&format!(
        "  {what}: {} files right ({})",
        files.len(),
        files_summary(files)
    ));
}

/// A page-aligned buffer, as O_DIRECT needs.
struct Aligned {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + BLOCK];
        let offset = storage.as_ptr().align_offset(BLOCK);
        Self {
            storage,
            offset,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

fn open_direct(path: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {} with O_DIRECT: {e}", path.display()))
}

/// Data at offsets of a block device that is otherwise zero.
type Extents = Vec<(u64, Vec<u8>)>;

/// Writes the extents with O_DIRECT and flushes the device.
fn write_extents(device: &Path, extents: &Extents) {
    let file = open_direct(device, true);
    for (offset, data) in extents {
        assert!(
            offset % BLOCK as u64 == 0 && data.len() % BLOCK == 0,
            "extents must be whole 4 KiB blocks"
        );
        let mut buffer = Aligned::new(data.len());
        buffer.as_mut_slice().copy_from_slice(data);
        file.write_all_at(buffer.as_slice(), *offset)
            .unwrap_or_else(|e| panic!("writing {} at {offset}: {e}", device.display()));
    }
    file.sync_all()
        .unwrap_or_else(|e| panic!("flushing {}: {e}", device.display()));
}

/// What the device must hold in `[start, start + len)`.
fn expected_range(extents: &Extents, start: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let end = start + len as u64;
    for (offset, data) in extents {
        let data_end = offset + data.len() as u64;
        let from = start.max(*offset);
        let to = end.min(data_end);
        if from < to {
            let dst = usize::try_from(from - start).expect("small offset");
            let src = usize::try_from(from - offset).expect("small offset");
            let n = usize::try_from(to - from).expect("small length");
            out[dst..dst + n].copy_from_slice(&data[src..src + n]);
        }
    }
    out
}

/// Reads the whole device with O_DIRECT and compares it with the extents
/// on zeros; returns its SHA-256.
fn verify_device(device: &Path, size: u64, extents: &Extents, what: &str) -> String {
    let mut file = open_direct(device, false);
    let actual_size = file.seek(SeekFrom::End(0)).expect("seeking to the end");
    assert_eq!(
        actual_size,
        size,
        "{what}: {} has the wrong size",
        device.display()
    );
    let chunk = MIB as usize;
    let mut buffer = Aligned::new(chunk);
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    while offset < size {
        let len = chunk.min(usize::try_from(size - offset).expect("small chunk"));
        let target = &mut buffer.as_mut_slice()[..len];
        file.read_exact_at(target, offset)
            .unwrap_or_else(|e| panic!("{what}: reading {} at {offset}: {e}", device.display()));
        let got: &[u8] = target;
        let want = expected_range(extents, offset, len);
        if got != want.as_slice() {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "{what}: {} differs at byte {} (chunk sha256 {}, want {})",
                device.display(),
                offset + first as u64,
                sha256_hex(got),
                sha256_hex(&want)
            );
        }
        hasher.update(got);
        offset += len as u64;
    }
    let sum: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    say(&format!("  {what}: all {size} bytes right, sha256 {sum}"));
    sum
}

// ---------------------------------------------------------------------------
// Small helpers.

fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).expect("test sizes fit in i64")
}

fn path_string(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

/// Writes a line straight to stdout, past the test harness's capture, so it
/// shows on the VM console whether the test passes or not.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
