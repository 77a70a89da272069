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

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    all_dm_devices, assert_single_linear, capability, clone_regions, create_request, describe,
    dm_devices, dm_table, drop_caches, files_under, fs_usage, liveclone_cli, mounts_under, must,
    open_direct, output_or_error, path_string, pool_loops, replace_table, require_real_kernel, run,
    say, sha256_hex, table_sectors, to_i64, try_clone_status, volume_source, Access, Aligned,
    Bench, Csi, Mounted, OwnDevice, Pool, Source, BLOCK, KIB, MIB, SECTOR, SLOW,
};
use liveclone::proto::admin::v1alpha1::set_hydration_request::Action;
use liveclone::proto::csi::v1 as csi;
use sha2::{Digest, Sha256};
use tonic::Code;

/// The xfs image that holds the pool of the xfs tests (sparse).
const XFS_IMAGE_BYTES: u64 = 2 << 30;
/// The driver's options beyond the bench's folders: frequent hydration
/// readings, and a stall reported within seconds.
const DRIVER_ARGS: &[&str] = &[
    "--hydration-poll-seconds",
    "0.5",
    "--stall-after-seconds",
    "5",
];

/// For the stall test: a reading every second, and a stall called after
/// three seconds without progress.
const STALL_DRIVER_ARGS: &[&str] = &[
    "--hydration-poll-seconds",
    "1",
    "--stall-after-seconds",
    "3",
];

/// One test at a time (see the module comment). A tokio mutex: it is held
/// across awaits, and each test has its own runtime.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// The tests.

/// A clone of a mounted ext4 volume is usable as soon as CreateVolume
/// returns (before its trim, which the monitor does through the clone's
/// mount and then starts hydration), takes writes of its own, becomes a
/// plain linear device once hydrated, and stays right after its source is
/// deleted; the source never sees the clone's writes. Nothing is left once
/// everything is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_of_a_filesystem_volume_is_usable_at_once_and_hydrates_to_linear() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    let mut bench = Bench::new("fsclone", Pool::Ext4);
    let mut csi = bench.start_driver(DRIVER_ARGS).await;

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
    let (at_create, total) = clone_regions(&clone_dm);
    bench.step(&format!(
        "clone {} created in {:.1} s, {at_create}/{total} regions hydrated (the source \
         image's holes, skipped in CreateVolume); {}",
        clone.volume_id,
        started.elapsed().as_secs_f64(),
        describe(&csi.hydration_of(&clone.volume_id).await)
    ));
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

    // CreateVolume left the trim to the monitor, which does it through
    // the clone's mount within a round or two and then enables hydration.
    // The clone's free space counts as hydrated without being copied: the
    // file system holds a few MiB of 128.
    let started_copy = csi
        .wait_started(&clone.volume_id, Duration::from_secs(60))
        .await;
    // On a quiet machine the few regions left after the trim can all be
    // copied, and the clone switched to linear, before this reading: then
    // everything is hydrated (the checks of the data below still hold).
    let (hydrated, total) = match try_clone_status(&clone_dm) {
        Ok(Some(line)) => (line.hydrated, line.total),
        Ok(None) => {
            bench.step("the clone hydrated and switched to linear before the first reading");
            (total, total)
        }
        Err(e) => panic!("{e:#}"),
    };
    bench.step(&format!(
        "hydration started {:.1} s after the CreateVolume call, {hydrated}/{total} regions \
         hydrated (at CreateVolume's return: {at_create}); {}",
        started.elapsed().as_secs_f64(),
        describe(&started_copy)
    ));
    assert!(
        hydrated * 2 > total,
        "only {hydrated} of {total} regions are hydrated once hydration started: the clone's \
         free space was not discarded, so hydration copies it all"
    );

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
        .wait_complete(&clone.volume_id, Duration::from_secs(120))
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
    let mut bench = Bench::new("srcdel", Pool::Ext4);
    let mut csi = bench.start_driver(DRIVER_ARGS).await;
    let size = 128 * MIB;

    let extents = vec![
        (0, pattern(21, 4 * MIB as usize)),
        (100 * MIB, pattern(22, MIB as usize + 3 * BLOCK)),
        (size - 16 * KIB, pattern(23, 16 * KIB as usize)),
    ];
    let (source, source_mount) = block_source(&bench, &mut csi, size, &extents).await;
    let want = verify_device(&source_mount.target, size, &extents, "the source");
    bench.step(&format!(
        "source {} written, sha256 {want}",
        source.volume_id
    ));

    let clone = paused_slow_clone(
        &bench,
        &mut csi,
        size,
        Access::Block,
        Source::Volume(&source.volume_id),
    )
    .await;
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

    csi.tune_fast(&clone.volume_id).await;
    must(
        "SetHydration RESUME",
        csi.set_hydration(&clone.volume_id, Action::Resume, None, None)
            .await,
    );
    let done = csi
        .wait_complete(&clone.volume_id, Duration::from_secs(180))
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
    snapshot_then_restore(Pool::Ext4).await;
}

/// The same on xfs, where the cut is a reflink and the source is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_restore_on_an_xfs_pool() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    snapshot_then_restore(Pool::Xfs(XFS_IMAGE_BYTES)).await;
}

async fn snapshot_then_restore(fs: Pool) {
    let mut bench = Bench::new(&format!("snap{}", fs.name()), fs);
    let mut csi = bench.start_driver(DRIVER_ARGS).await;
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
        Pool::Xfs(_) => assert!(
            source_status.hydration.is_none(),
            "on xfs the cut should be a reflink, but the source hydrates: {source_status:?}"
        ),
        // Redirect: the volume now reads the image and copies it back.
        Pool::Ext4 | Pool::LargeExt4(_) => assert!(
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
        .wait_complete(&restore.volume_id, Duration::from_secs(120))
        .await;
    bench.step(&format!("restore hydrated: {}", describe(&done)));
    if fs == Pool::Ext4 {
        let done = csi
            .wait_complete(&source.volume_id, Duration::from_secs(120))
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
    let mut bench = Bench::new("killed", Pool::Ext4);
    let mut csi = bench.start_driver(DRIVER_ARGS).await;
    let size = 256 * MIB;

    // Enough data that the slow copy outlasts the kill and the restart
    // (the driver does not copy what is a hole in the source's image).
    let extents = vec![
        (0, pattern(41, 40 * MIB as usize)),
        (192 * MIB, pattern(42, 24 * MIB as usize)),
        (size - 64 * KIB, pattern(43, 64 * KIB as usize)),
    ];
    let (source, source_mount) = block_source(&bench, &mut csi, size, &extents).await;
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

    let mut csi = bench.start_driver(DRIVER_ARGS).await;
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

    csi.tune_fast(&clone.volume_id).await;
    let done = csi
        .wait_complete(&clone.volume_id, Duration::from_secs(300))
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
    let mut bench = Bench::new("expand", Pool::Ext4);
    let mut csi = bench.start_driver(DRIVER_ARGS).await;
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

    let clone = paused_slow_clone(
        &bench,
        &mut csi,
        size,
        Access::Ext4,
        Source::Volume(&source.volume_id),
    )
    .await;
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

    csi.tune_fast(&clone.volume_id).await;
    must(
        "SetHydration RESUME",
        csi.set_hydration(&clone.volume_id, Action::Resume, None, None)
            .await,
    );
    let done = csi
        .wait_complete(&clone.volume_id, Duration::from_secs(180))
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
    let mut bench = Bench::new("badinput", Pool::Ext4);
    let mut csi = bench.start_driver(DRIVER_ARGS).await;
    let size = 64 * MIB;

    let source = must(
        "CreateVolume (source)",
        csi.create_volume(&bench.name("source"), size, Access::Block, None, &[])
            .await,
    );
    let outside = bench.root.join("outside");
    let before = inventory(&bench);
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
    let after = inventory(&bench);
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

/// A clone whose source fails: dm-clone retries every failed copy forever
/// and reports nothing, so only the standing hydrated count shows it. The
/// driver must call the clone Stalled within its stall time, with a reason
/// that points at I/O errors and the kernel log, in the admin API, in
/// `liveclone status --json` and in the CSI volume condition; and once the
/// source reads again, hydration must go on by itself to the linear switch,
/// with the source's data.
///
/// The failing disk is a device-mapper device of the test's own, put
/// between the clone and its source image without the driver knowing (the
/// clone's table is reloaded with it as the source, as the kernel would
/// see a source disk that fails): `linear` over the image, then `error`,
/// then `linear` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_hydration_is_reported_and_recovers() {
    let _serial = SERIAL.lock().await;
    require_real_kernel();
    // Declared before the bench so that it drops after it: on a failure the
    // bench first removes the driver's clone, which reads through it.
    let mut failing_source: Option<OwnDevice> = None;
    let mut bench = Bench::new("stall", Pool::Ext4);
    let mut csi = bench.start_driver(STALL_DRIVER_ARGS).await;
    let size = 64 * MIB;

    // Enough data that the slow copy, once the source reads again, lasts
    // well beyond the driver's next readings (holes in the snapshot's image
    // are not copied).
    let extents = vec![
        (0, pattern(61, 24 * MIB as usize)),
        (40 * MIB, pattern(62, 16 * MIB as usize + 5 * BLOCK)),
        (size - 8 * KIB, pattern(63, 8 * KIB as usize)),
    ];
    let (source, source_mount) = block_source(&bench, &mut csi, size, &extents).await;
    let want = verify_device(&source_mount.target, size, &extents, "the source");
    bench.unpublish_unstage(&mut csi, &source_mount).await;
    let snapshot = must(
        "CreateSnapshot",
        csi.create_snapshot(&bench.name("snap"), &source.volume_id)
            .await,
    );
    // The snapshot's image holds the data from here on. On this ext4 pool
    // the cut made the source copy itself back from the image: gone, it
    // does not compete with the clone.
    must(
        "DeleteVolume (source)",
        csi.delete_volume(&source.volume_id).await,
    );
    bench.step(&format!(
        "snapshot {} of the source (sha256 {want}) cut; source deleted",
        snapshot.snapshot_id
    ));

    // Paused: nothing is copied while the source is swapped.
    let clone = paused_slow_clone(
        &bench,
        &mut csi,
        size,
        Access::Block,
        Source::Snapshot(&snapshot.snapshot_id),
    )
    .await;
    let clone_dm = csi.dm_name_of(&clone.volume_id).await;
    // Published before the swap: NodeStageVolume brings the device in line
    // with its record, which would undo the swap.
    let clone_mount = bench
        .stage_publish(&mut csi, &clone.volume_id, Access::Block, "clone")
        .await;

    let table = dm_table(&clone_dm);
    let image = clone_source(&table);
    let image_sectors = device_sectors(&image);
    let linear = format!("0 {image_sectors} linear {image} 0");
    let device = failing_source.insert(
        OwnDevice::create(&format!("lctest-errsrc-{}", std::process::id()), &linear)
            .unwrap_or_else(|e| panic!("creating the failing source: {e:#}")),
    );
    let device_number = device.device_number().unwrap_or_else(|e| panic!("{e:#}"));
    replace_table(&clone_dm, &with_clone_source(&table, &device_number))
        .unwrap_or_else(|e| panic!("swapping the clone's source: {e:#}"));
    let swapped = dm_table(&clone_dm);
    assert_eq!(
        clone_source(&swapped),
        device_number,
        "the clone does not read {}:\n{swapped}",
        device.name()
    );
    device
        .replace_table(&format!("0 {image_sectors} error"))
        .unwrap_or_else(|e| panic!("failing the source: {e:#}"));
    bench.step(&format!(
        "clone {} paused at {:?} regions; it now reads its source through {} ({device_number}), \
         which fails every read (the image is {image})",
        clone.volume_id,
        clone_regions(&clone_dm),
        device.name()
    ));

    must(
        "SetHydration RESUME",
        csi.set_hydration(&clone.volume_id, Action::Resume, None, None)
            .await,
    );
    let resumed_at = Instant::now();
    let stalled = csi
        .wait_hydration(&clone.volume_id, Duration::from_secs(120), |h| {
            h.phase == "Stalled"
        })
        .await;
    bench.step(&format!(
        "Stalled {:.1} s after the resume: {}",
        resumed_at.elapsed().as_secs_f64(),
        describe(&stalled)
    ));
    assert_points_at_io_errors("the admin API's message", &stalled.message);
    assert!(
        stalled.hydrated_bytes < stalled.total_bytes,
        "{}",
        describe(&stalled)
    );
    // What the stall is inferred from: the kernel's count stands still.
    let before = clone_regions(&clone_dm);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = clone_regions(&clone_dm);
    assert_eq!(
        before, after,
        "the clone made progress while its source failed every read"
    );
    let kernel_lines: Vec<String> = output_or_error("dmesg", &[])
        .lines()
        .filter(|line| line.contains("hydration"))
        .map(str::to_owned)
        .collect();
    bench.step(&format!(
        "the kernel's count stays at {after:?}; {} kernel log lines about hydration, the last: \
         {:?}",
        kernel_lines.len(),
        kernel_lines.last()
    ));

    let json = liveclone_cli(&["status", "--json", "--endpoint", &bench.endpoint]);
    let entry = status_entry(&json, &clone.volume_id);
    assert_eq!(entry["hydration"]["phase"], "Stalled", "{entry}");
    assert_points_at_io_errors(
        "liveclone status --json",
        entry["hydration"]["message"].as_str().unwrap_or_default(),
    );
    let (controller, node) = conditions(&mut csi, &clone_mount).await;
    bench.step(&format!(
        "volume condition: ControllerGetVolume {controller:?}, NodeGetVolumeStats {node:?}"
    ));
    for (what, condition) in [
        ("ControllerGetVolume", &controller),
        ("NodeGetVolumeStats", &node),
    ] {
        assert!(condition.abnormal, "{what}: {condition:?}");
        assert_points_at_io_errors(what, &condition.message);
    }

    // The disk is back.
    device
        .replace_table(&linear)
        .unwrap_or_else(|e| panic!("repairing the source: {e:#}"));
    let recovered = csi
        .wait_hydration(&clone.volume_id, Duration::from_secs(120), |h| {
            h.phase != "Stalled"
        })
        .await;
    bench.step(&format!(
        "the source reads again; the clone: {}",
        describe(&recovered)
    ));
    assert_eq!(recovered.phase, "Hydrating", "{}", describe(&recovered));
    assert!(
        recovered.hydrated_bytes > stalled.hydrated_bytes,
        "{}",
        describe(&recovered)
    );
    let (controller, node) = conditions(&mut csi, &clone_mount).await;
    assert!(
        !controller.abnormal && !node.abnormal,
        "the volume condition stays abnormal after the recovery: {controller:?}, {node:?}"
    );

    csi.tune_fast(&clone.volume_id).await;
    let done = csi
        .wait_complete(&clone.volume_id, Duration::from_secs(300))
        .await;
    bench.step(&format!("clone hydrated: {}", describe(&done)));
    assert_single_linear(&clone_dm, size);
    let got = verify_device(
        &clone_mount.target,
        size,
        &extents,
        "the clone hydrated through the stall",
    );
    assert_eq!(got, want, "the clone differs from its source");

    // The linear clone no longer reads the failing source.
    let name = device.name().to_owned();
    failing_source
        .take()
        .map(OwnDevice::remove)
        .transpose()
        .unwrap_or_else(|e| panic!("removing {name}: {e:#}"));
    assert!(!all_dm_devices().contains(&name), "{name} is still there");
    bench.unpublish_unstage(&mut csi, &clone_mount).await;
    must(
        "DeleteVolume (clone)",
        csi.delete_volume(&clone.volume_id).await,
    );
    must(
        "DeleteSnapshot",
        csi.delete_snapshot(&snapshot.snapshot_id).await,
    );
    assert!(
        csi.admin_list().await.is_empty(),
        "volumes are still listed after every volume was deleted"
    );
    bench.assert_nothing_left();
    bench.step("passed");
}

// ---------------------------------------------------------------------------
// Checks of this file.

/// A CreateVolume the driver must refuse: name suffix, source, size,
/// parameters, and the code it must answer.
type RefusedCreate<'a> = (
    &'a str,
    Option<Source<'a>>,
    u64,
    &'a [(&'a str, &'a str)],
    Code,
);

/// Everything a refused request must leave as it was.
#[derive(Debug, PartialEq, Eq)]
struct Inventory {
    devices: BTreeSet<String>,
    loops: BTreeMap<String, String>,
    pool_files: BTreeSet<PathBuf>,
    state_files: BTreeSet<PathBuf>,
    mounts: Vec<PathBuf>,
}

/// What the kernel, the pool and the state folder hold now.
fn inventory(bench: &Bench) -> Inventory {
    Inventory {
        devices: dm_devices(),
        loops: pool_loops(&bench.pool),
        pool_files: files_under(&bench.pool),
        state_files: files_under(&bench.state),
        mounts: mounts_under(&bench.root),
    }
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

/// A raw-block volume named `source` that holds `extents` (zeros
/// elsewhere), published.
async fn block_source(
    bench: &Bench,
    csi: &mut Csi,
    size: u64,
    extents: &Extents,
) -> (csi::Volume, Mounted) {
    let source = must(
        "CreateVolume (block source)",
        csi.create_volume(&bench.name("source"), size, Access::Block, None, &[])
            .await,
    );
    let mounted = bench
        .stage_publish(csi, &source.volume_id, Access::Block, "source")
        .await;
    write_extents(&mounted.target, extents);
    (source, mounted)
}

/// A clone named `clone` with slow hydration (one region at a time),
/// paused as soon as it exists, so that what the test does next happens
/// before its copy is done.
async fn paused_slow_clone(
    bench: &Bench,
    csi: &mut Csi,
    size: u64,
    access: Access,
    source: Source<'_>,
) -> csi::Volume {
    let clone = must(
        "CreateVolume (clone, slow hydration)",
        csi.create_volume(&bench.name("clone"), size, access, Some(source), &SLOW)
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
    clone
}

/// In a clone line of a table (`<start> <length> clone <metadata>
/// <destination> <source> <region size> ...`), the source's field.
const CLONE_SOURCE_FIELD: usize = 5;

/// The source device (`major:minor`) of a one-line clone table.
fn clone_source(table: &str) -> String {
    let fields: Vec<&str> = table.split_whitespace().collect();
    assert!(
        table.trim().lines().count() == 1 && fields.get(2) == Some(&"clone"),
        "not a one-line clone table:\n{table}"
    );
    fields
        .get(CLONE_SOURCE_FIELD)
        .map(|field| (*field).to_owned())
        .unwrap_or_else(|| panic!("no source in the clone table:\n{table}"))
}

/// The same one-line clone table, reading from `source` instead.
fn with_clone_source(table: &str, source: &str) -> String {
    let mut fields: Vec<&str> = table.split_whitespace().collect();
    clone_source(table);
    fields[CLONE_SOURCE_FIELD] = source;
    fields.join(" ")
}

/// Size of a block device named `major:minor`, in sectors.
fn device_sectors(device: &str) -> u64 {
    let path = format!("/sys/dev/block/{device}/size");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("odd {path}: {text:?}"))
}

/// A stall's explanation says where to look: I/O errors, the kernel log.
fn assert_points_at_io_errors(what: &str, message: &str) {
    assert!(
        message.contains("I/O error") && message.contains("kernel log"),
        "{what} does not point at I/O errors and the kernel log: {message:?}"
    );
}

/// A volume's entry in `liveclone status --json`.
fn status_entry(json: &str, volume_id: &str) -> serde_json::Value {
    let parsed: serde_json::Value = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("liveclone status --json is not JSON ({e}):\n{json}"));
    parsed["volumes"]
        .as_array()
        .and_then(|volumes| volumes.iter().find(|v| v["volumeId"] == volume_id))
        .cloned()
        .unwrap_or_else(|| panic!("liveclone status --json does not list {volume_id}:\n{json}"))
}

/// The volume condition of a published volume, as ControllerGetVolume and
/// NodeGetVolumeStats give it.
async fn conditions(
    csi: &mut Csi,
    mounted: &Mounted,
) -> (csi::VolumeCondition, csi::VolumeCondition) {
    let controller = must(
        "ControllerGetVolume",
        csi.controller
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: mounted.volume_id.clone(),
            })
            .await,
    )
    .into_inner()
    .status
    .and_then(|status| status.volume_condition)
    .expect("ControllerGetVolume answered no volume condition");
    let node = must(
        "NodeGetVolumeStats",
        csi.node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: mounted.volume_id.clone(),
                volume_path: path_string(&mounted.target),
                staging_target_path: path_string(&mounted.staging),
            })
            .await,
    )
    .into_inner()
    .volume_condition
    .expect("NodeGetVolumeStats answered no volume condition");
    (controller, node)
}

/// Size of the file system mounted at `path`.
fn fs_bytes(path: &Path) -> u64 {
    fs_usage(path).unwrap_or_else(|e| panic!("{e:#}")).0
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
