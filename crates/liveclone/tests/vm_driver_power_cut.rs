//! The driver survives a power cut in the middle of a clone's hydration and
//! of writes to it.
//!
//! Built only with `--features vm`. The host test boots the VM twice on the
//! same virtio disk (serial `lcpool`, a sparse host file) that holds the
//! driver's state folder and its file pool, and runs this same test binary
//! inside the VM for each phase (the `guest_` tests, ignored unless asked
//! for):
//!
//! 1. formats the disk (ext4), starts `liveclone standalone` on it, makes a
//!    256 MiB raw-block volume full of a known pattern, clones it with slow
//!    hydration, publishes the clone as a raw block device and writes
//!    numbered 4 KiB blocks to it with O_DIRECT, printing `ACKED <n>` after
//!    each fsync. Once hydration has progressed and some batches are
//!    acknowledged it prints `POWER-CUT-NOW` and keeps writing; the host
//!    kills QEMU on that line.
//! 2. boots again on the same disk (no loop or device-mapper device exists
//!    any more), starts the driver on the same folders and checks that it
//!    re-assembled the clone from its records: present, hydrating, not
//!    restarted from zero. It then reads every block (before and after
//!    hydration completes): every write acknowledged before the cut is
//!    there, every other block holds the source's data or a write that may
//!    have landed after the last acknowledgement, nothing else; the source
//!    still holds its pattern. Finally everything is deleted and nothing of
//!    the driver's is left.
//!
//! The last acknowledged write the host saw on the console goes to phase 2
//! in the environment.

mod common;
#[path = "common/vm_host.rs"]
mod vm_host;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_nothing_left, assert_single_linear, clone_regions, describe, device_bytes, dm_devices,
    files_under, hex, in_vm, kernel_state, must, open_direct, output_or_error, path_string, run,
    say, sha256_hex, standalone_args, tail_of, unmount_all_under, Access, Aligned, CloneLine, Csi,
    Driver, Mounted, Source, BLOCK, DEBUG_LOG, DM_PREFIX, LOG_TAIL, MIB, SLOW,
};
use sha2::{Digest, Sha256};
use vm_host::{phase_command, HostRun};
use vmtest::Ending;

/// Size of the source volume and of its clone.
const SIZE: u64 = 256 * MIB;
const BLOCKS: u64 = SIZE / BLOCK as u64;
/// The disk that holds the driver's state and pool (sparse on the host).
const POOL_SERIAL: &str = "lcpool";
const POOL_DISK_BYTES: u64 = 4 << 30;
/// Where the disk is mounted in every phase.
const POOL_MOUNT: &str = "/mnt/lcpool";
const NODE_ID: &str = "power-cut-node";
const SOURCE_NAME: &str = "pc-source";
const CLONE_NAME: &str = "pc-clone";
const CUT_MARKER: &str = "POWER-CUT-NOW";
const ACKED_PREFIX: &str = "ACKED ";
/// The last acknowledged write count the host saw, for phase 2.
const ACKED_ENV: &str = "LIVECLONE_PC_ACKED";
/// The clone's hydrated bytes when the cut was asked for (information).
const HYDRATED_ENV: &str = "LIVECLONE_PC_HYDRATED";
/// The driver binary: a private copy the host made for this test.
const DRIVER_ENV: &str = "LIVECLONE_PC_DRIVER";
/// Blocks written between two fsyncs.
const WRITE_BATCH: u64 = 32;
/// Acknowledged batches before the cut may happen.
const MIN_ACKED_BATCHES: u64 = 8;
/// Hydrated bytes beyond the acknowledged writes before the cut may happen:
/// the background copy itself made progress.
const MIN_COPIED_BYTES: u64 = MIB;
/// Write `n` goes to block `(n * STRIDE + OFFSET) mod BLOCKS`: odd, so every
/// block is written at most once, and the writes are spread over the whole
/// clone (hydrated and not yet hydrated regions alike).
const STRIDE: u64 = 40_503;
const OFFSET: u64 = 1_234;
/// How long the driver may take to answer Probe with ready = true
/// (recovery included) under QEMU's software CPU.
const START_LIMIT: Duration = Duration::from_secs(180);
const STOP_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The host side.

#[test]
fn vm_driver_survives_a_power_cut() {
    let mut run = HostRun::new("driver-power-cut-", "vm_driver_power_cut");
    run.vm.timeout = Duration::from_secs(1500);
    run.add_disk(POOL_SERIAL, "lcpool.img", POOL_DISK_BYTES);
    let driver = path_string(&run.driver);
    run.vm.env.push((DRIVER_ENV.to_owned(), driver));
    let me = run.me.clone();
    let phase = |name: &str| phase_command(&me, name);

    let mut acked: Option<u64> = None;
    let mut hydrated: Option<u64> = None;
    let first = run
        .vm
        .run_until(vec![phase("guest_driver_power_cut_phase_1")], |line| {
            if let Some(n) = line
                .strip_prefix(ACKED_PREFIX)
                .and_then(|n| n.trim().parse::<u64>().ok())
            {
                acked = acked.max(Some(n));
            }
            let Some(rest) = line.strip_prefix(CUT_MARKER) else {
                return false;
            };
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            acked = acked.max(field("acked"));
            hydrated = field("hydrated");
            true
        })
        .expect("first boot");
    assert!(
        matches!(first.ending, Ending::PowerCut),
        "phase 1 ended without reaching the cut point: {:?}",
        first.result()
    );
    let acked = acked.expect("acknowledged writes before the cut");
    let hydrated = hydrated.expect("the cut marker carries the hydrated bytes");
    println!(
        "phase 1: power cut after {:.1} s; last acknowledged write count {acked}, the clone had \
         {hydrated} bytes hydrated",
        first.elapsed.as_secs_f64()
    );

    run.vm.env.push((ACKED_ENV.to_owned(), acked.to_string()));
    run.vm
        .env
        .push((HYDRATED_ENV.to_owned(), hydrated.to_string()));
    let second = run
        .vm
        .run(vec![phase("guest_driver_power_cut_phase_2")])
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
#[ignore = "phase of vm_driver_survives_a_power_cut; runs inside the VM"]
async fn guest_driver_power_cut_phase_1() {
    require_in_vm();
    let mut guest = Guest::new(1);
    guest.mount_pool(true);
    let mut csi = guest.start_driver().await;

    let source = must(
        "CreateVolume (source)",
        csi.create_volume(SOURCE_NAME, SIZE, Access::Block, None, &[])
            .await,
    );
    let source_mount = guest
        .stage_publish(&mut csi, &source.volume_id, "source")
        .await;
    let started = Instant::now();
    fill_source(&source_mount.target);
    guest.step(&format!(
        "source {} filled with its pattern ({SIZE} bytes, O_DIRECT + fsync) in {:.1} s",
        source.volume_id,
        started.elapsed().as_secs_f64()
    ));
    csi.unpublish_unstage(&source_mount).await;

    let clone = must(
        "CreateVolume (clone, slow hydration)",
        csi.create_volume(
            CLONE_NAME,
            SIZE,
            Access::Block,
            Some(Source::Volume(&source.volume_id)),
            &SLOW,
        )
        .await,
    );
    let hydration = csi.hydration_of(&clone.volume_id).await;
    assert_eq!(
        (hydration.threshold, hydration.batch_size),
        (1, 1),
        "the clone did not get the slow tunables: {}",
        describe(&hydration)
    );
    guest.step(&format!(
        "clone {} created: {}",
        clone.volume_id,
        describe(&hydration)
    ));
    let clone_mount = guest
        .stage_publish(&mut csi, &clone.volume_id, "clone")
        .await;

    let acked = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(clone_mount.target.clone(), Arc::clone(&acked));
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        assert!(
            !writer.is_finished(),
            "the writer stopped before the cut (write error, or every block written)"
        );
        let h = csi.hydration_of(&clone.volume_id).await;
        assert!(
            h.phase != "Failed" && h.phase != "Complete",
            "the clone is {} before the cut: {}",
            h.phase,
            describe(&h)
        );
        let done = acked.load(Ordering::SeqCst);
        if done >= MIN_ACKED_BATCHES * WRITE_BATCH
            && h.hydrated_bytes > done * BLOCK as u64 + MIN_COPIED_BYTES
        {
            assert!(
                h.hydrated_bytes < h.total_bytes,
                "hydration finished before the cut: {}",
                describe(&h)
            );
            // The reading was taken before `done` was loaded; the fsync of
            // the batch after the next one started after that, and a flush
            // commits dm-clone's metadata: once it returns, at least
            // `h.hydrated_bytes` are hydrated for good, so phase 2 may hold
            // the recovered clone to it.
            let wait = Instant::now();
            while acked.load(Ordering::SeqCst) < done + 2 * WRITE_BATCH {
                assert!(!writer.is_finished(), "the writer stopped before the cut");
                assert!(
                    wait.elapsed() < Duration::from_secs(120),
                    "no fsync returned within 2 minutes"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            guest.step(&format!(
                "cutting the power: {done} writes acknowledged; {}; kernel: {}",
                describe(&h),
                kernel_summary()
            ));
            say(&format!(
                "{CUT_MARKER} acked={done} hydrated={} total={}",
                h.hydrated_bytes, h.total_bytes
            ));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no hydration progress or no acknowledged writes within 10 minutes: {done} \
             acknowledged; {}",
            describe(&h)
        );
        if last_print.elapsed() >= Duration::from_secs(5) {
            guest.step(&format!(
                "waiting for the cut point: {done} writes acknowledged; {}",
                describe(&h)
            ));
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The writer keeps writing until the power goes.
    tokio::time::sleep(Duration::from_secs(900)).await;
    // Never reached: the host kills the VM. Leave everything as it is.
    std::mem::forget(clone_mount);
    std::mem::forget(guest);
    panic!("the power was not cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "phase of vm_driver_survives_a_power_cut; runs inside the VM"]
async fn guest_driver_power_cut_phase_2() {
    require_in_vm();
    let acked: u64 = std::env::var(ACKED_ENV)
        .expect("acknowledged writes from phase 1")
        .parse()
        .expect("a number");
    let hydrated_before: u64 = std::env::var(HYDRATED_ENV)
        .expect("hydrated bytes from phase 1")
        .parse()
        .expect("a number");
    assert!(acked <= BLOCKS, "odd acknowledged count {acked}");
    let mut guest = Guest::new(2);
    guest.mount_pool(false);
    guest.step(&format!(
        "after the power cut: {acked} writes acknowledged, {hydrated_before} bytes hydrated at \
         the cut; no devices of ours: {:?}, pool files: {:?}",
        dm_devices(),
        files_under(&guest.pool)
    ));
    say(&format!(
        "--- last lines of phase 1's driver log (cut off by the power cut) ---\n{}\n---",
        tail_of(&guest.log_of(1), 15)
    ));
    assert!(
        dm_devices().is_empty(),
        "devices of ours exist before the driver started"
    );

    // The kernel's count of hydrated regions as soon as the recovered clone
    // exists, before hydration (enabled by recovery) adds much to it.
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = spawn_first_readings(Arc::clone(&stop_watching));
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
    assert_eq!(clone.state, "Ready", "{clone:?}");
    assert!(clone.device_present, "the clone has no device: {clone:?}");
    assert_eq!(clone.capacity_bytes, SIZE, "{clone:?}");
    let clone_dm = csi.dm_name_of(&clone.volume_id).await;
    let resumed = csi
        .wait_hydration(&clone.volume_id, Duration::from_secs(120), |h| {
            h.phase == "Hydrating" && h.hydrated_bytes > 0
        })
        .await;
    let (kernel_hydrated, kernel_total) = clone_regions(&clone_dm);
    stop_watching.store(true, Ordering::SeqCst);
    let first_readings = watcher.join().expect("the status watcher");
    let (first_hydrated, _) = *first_readings.get(&clone_dm).unwrap_or_else(|| {
        panic!("no status of {clone_dm} was read while the driver started: {first_readings:?}")
    });
    let first_bytes = first_hydrated * resumed.region_bytes;
    say(&format!(
        "RESUMED hydrated={} total={} (at the cut: {hydrated_before}, committed); the kernel's \
         first reading after recovery: {first_hydrated} regions ({first_bytes} bytes), now \
         {kernel_hydrated}/{kernel_total} regions; {}",
        resumed.hydrated_bytes,
        resumed.total_bytes,
        describe(&resumed)
    ));
    assert!(
        resumed.hydrated_bytes > 0 && kernel_hydrated > 0 && first_hydrated > 0,
        "hydration restarted from zero"
    );
    assert!(
        first_bytes >= hydrated_before,
        "the recovered clone had {first_bytes} bytes hydrated, fewer than the {hydrated_before} \
         committed before the cut: its metadata lost progress"
    );
    assert!(
        resumed.hydrated_bytes < resumed.total_bytes,
        "{}",
        describe(&resumed)
    );
    assert_eq!(
        (resumed.threshold, resumed.batch_size),
        (1, 1),
        "recovery lost the clone's tunables"
    );

    // As kubelet does after a node reboot: stage and publish again.
    let clone_mount = guest
        .stage_publish(&mut csi, &clone.volume_id, "clone")
        .await;
    let during = verify_clone(
        &clone_mount.target,
        acked,
        "the recovered clone, still hydrating",
    );
    let h = csi.hydration_of(&clone.volume_id).await;
    assert!(
        h.phase != "Complete" && h.hydrated_bytes < h.total_bytes,
        "the clone completed before it was read: the read above did not cover a hydrating \
         clone: {}",
        describe(&h)
    );

    csi.tune_fast(&clone.volume_id).await;
    let done = csi
        .wait_complete(&clone.volume_id, Duration::from_secs(900))
        .await;
    guest.step(&format!("clone hydrated: {}", describe(&done)));
    assert_single_linear(&clone_dm, SIZE);
    let after = verify_clone(&clone_mount.target, acked, "the hydrated clone");
    assert_eq!(
        during.sha256, after.sha256,
        "the clone's content changed while it finished hydrating"
    );

    // The source: a redirect cut made it a hydrating clone of its own image.
    let source_status = csi.status_of(&source.volume_id).await;
    if source_status.hydration.is_some() {
        let done = csi
            .wait_complete(&source.volume_id, Duration::from_secs(900))
            .await;
        guest.step(&format!("source hydrated: {}", describe(&done)));
    }
    let source_dm = csi.dm_name_of(&source.volume_id).await;
    assert_single_linear(&source_dm, SIZE);
    let source_mount = guest
        .stage_publish(&mut csi, &source.volume_id, "source")
        .await;
    verify_source(&source_mount.target);

    csi.unpublish_unstage(&clone_mount).await;
    csi.unpublish_unstage(&source_mount).await;
    must(
        "DeleteVolume (clone)",
        csi.delete_volume(&clone.volume_id).await,
    );
    must(
        "DeleteVolume (source)",
        csi.delete_volume(&source.volume_id).await,
    );
    let left = csi.admin_list().await;
    assert!(
        left.is_empty(),
        "volumes still listed after every volume was deleted: {left:?}"
    );
    guest.assert_nothing_left();
    guest.stop_driver();
    for phase in [1, 2] {
        let log = std::fs::read_to_string(guest.log_of(phase)).unwrap_or_default();
        let notable: Vec<&str> = log
            .lines()
            .filter(|line| {
                line.contains("WARN")
                    || line.contains("ERROR")
                    || line.contains("recovery finished")
            })
            .collect();
        say(&format!(
            "driver log of phase {phase}: {} warnings, errors or recovery reports{}{}",
            notable.len(),
            if notable.is_empty() { "" } else { ":\n  " },
            notable
                .iter()
                .take(40)
                .copied()
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    guest.step("passed");
}

// ---------------------------------------------------------------------------
// Blocks: every 4 KiB block says what it is (source block i, or write n at
// block p) in each of its 32-byte records, so a block read back can be
// named, not only found different.

const MAGIC: u64 = 0x4c43_5043_424c_4b00; // "LCPCBLK\0"
const KIND_SOURCE: u64 = 1;
const KIND_WRITE: u64 = 2;
const RECORD: usize = 32;

fn make_block(kind: u64, number: u64, position: u64, out: &mut [u8]) {
    for (k, record) in out.chunks_exact_mut(RECORD).enumerate() {
        let k = k as u64;
        let mix = (number ^ (position << 20) ^ (k << 44)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        record[0..8].copy_from_slice(&(MAGIC | kind).to_le_bytes());
        record[8..16].copy_from_slice(&number.to_le_bytes());
        record[16..24].copy_from_slice(&position.to_le_bytes());
        record[24..32].copy_from_slice(&mix.to_le_bytes());
    }
}

/// Where write `number` goes.
fn position(number: u64) -> u64 {
    (number.wrapping_mul(STRIDE).wrapping_add(OFFSET)) % BLOCKS
}

/// For each block, the number of the one write that goes there.
fn writes_by_position() -> Vec<u64> {
    let mut table = vec![u64::MAX; BLOCKS as usize];
    for number in 0..BLOCKS {
        let slot = &mut table[position(number) as usize];
        assert_eq!(*slot, u64::MAX, "two writes go to one block");
        *slot = number;
    }
    table
}

fn word(block: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&block[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// What a block read back is, in words.
fn name_block(block: &[u8]) -> String {
    if block.iter().all(|&b| b == 0) {
        return "zeros".to_owned();
    }
    let head = word(block, 0);
    let (number, position) = (word(block, 8), word(block, 16));
    let kind = match head ^ MAGIC {
        KIND_SOURCE => Some("source block"),
        KIND_WRITE => Some("write"),
        _ => None,
    };
    let Some(kind) = kind else {
        return format!("unknown bytes (sha256 {})", sha256_hex(block));
    };
    let mut whole = vec![0u8; BLOCK];
    make_block(head ^ MAGIC, number, position, &mut whole);
    let whole = if whole == block {
        "whole"
    } else {
        "TORN or mixed"
    };
    format!("{kind} {number} (for block {position}), {whole}")
}

/// Reads `dmsetup status --noflush` of every device in a loop until told
/// to stop; returns the first `(hydrated, total)` regions read for each
/// clone of ours.
fn spawn_first_readings(
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<BTreeMap<String, (u64, u64)>> {
    std::thread::spawn(move || {
        let mut first = BTreeMap::new();
        while !stop.load(Ordering::SeqCst) {
            if let Ok(output) = Command::new("dmsetup")
                .args(["status", "--noflush"])
                .output()
            {
                for line in String::from_utf8_lossy(&output.stdout).lines() {
                    let Some((name, status)) = line.split_once(": ") else {
                        continue;
                    };
                    if !name.starts_with(DM_PREFIX) || first.contains_key(name) {
                        continue;
                    }
                    if let Some(counts) = CloneLine::parse(status) {
                        first.insert(name.to_owned(), (counts.hydrated, counts.total));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        first
    })
}

/// The source's content: every block its own pattern, written with
/// O_DIRECT in 1 MiB pieces, then fsync.
fn fill_source(device: &Path) {
    let file = open_direct(device, true);
    let per_chunk = 256u64;
    let mut buffer = Aligned::new(per_chunk as usize * BLOCK);
    for first in (0..BLOCKS).step_by(per_chunk as usize) {
        for (k, block) in buffer.as_mut_slice().chunks_exact_mut(BLOCK).enumerate() {
            let index = first + k as u64;
            make_block(KIND_SOURCE, index, index, block);
        }
        file.write_all_at(buffer.as_slice(), first * BLOCK as u64)
            .unwrap_or_else(|e| panic!("writing the source at block {first}: {e}"));
    }
    file.sync_all().expect("fsync of the source");
}

/// Writes block after block (write `n` to `position(n)`), fsync after every
/// `WRITE_BATCH`, then `ACKED <count>` on the console. Stops when every
/// block was written once (it is normally cut off long before).
fn spawn_writer(device: PathBuf, acked: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let file = open_direct(&device, true);
        let mut buffer = Aligned::new(BLOCK);
        let mut next = 0u64;
        while next < BLOCKS {
            let end = (next + WRITE_BATCH).min(BLOCKS);
            for number in next..end {
                make_block(KIND_WRITE, number, position(number), buffer.as_mut_slice());
                file.write_all_at(buffer.as_slice(), position(number) * BLOCK as u64)
                    .unwrap_or_else(|e| panic!("writer: write {number}: {e}"));
            }
            file.sync_all()
                .unwrap_or_else(|e| panic!("writer: fsync after write {}: {e}", end - 1));
            next = end;
            acked.store(next, Ordering::SeqCst);
            say(&format!("{ACKED_PREFIX}{next}"));
        }
        say("writer: every block written once");
    })
}

/// What a read of the clone found.
struct CloneContent {
    sha256: String,
    /// Writes found, by their block.
    acked_writes: u64,
    late_writes: u64,
    source_blocks: u64,
}

/// Every block of the clone: a write acknowledged before the cut must be
/// there; any other block holds the source's data or the write that may
/// have landed after the last acknowledgement; nothing else.
fn verify_clone(device: &Path, acked: u64, what: &str) -> CloneContent {
    let started = Instant::now();
    let writes = writes_by_position();
    let file = open_direct(device, false);
    let size = device_bytes(device);
    assert_eq!(
        size,
        SIZE,
        "{what}: {} has the wrong size",
        device.display()
    );
    let per_chunk = 256u64;
    let mut buffer = Aligned::new(per_chunk as usize * BLOCK);
    let mut hasher = Sha256::new();
    let mut want = vec![0u8; BLOCK];
    let mut content = CloneContent {
        sha256: String::new(),
        acked_writes: 0,
        late_writes: 0,
        source_blocks: 0,
    };
    let mut problems = Vec::new();
    for first in (0..BLOCKS).step_by(per_chunk as usize) {
        file.read_exact_at(buffer.as_mut_slice(), first * BLOCK as u64)
            .unwrap_or_else(|e| panic!("{what}: reading block {first}: {e}"));
        hasher.update(buffer.as_slice());
        for (k, got) in buffer.as_slice().chunks_exact(BLOCK).enumerate() {
            let index = first + k as u64;
            let number = writes[index as usize];
            make_block(KIND_WRITE, number, index, &mut want);
            let is_write = got == want.as_slice();
            if number < acked {
                if is_write {
                    content.acked_writes += 1;
                } else {
                    problems.push(format!(
                        "block {index}: write {number} was acknowledged (fsync returned before \
                         the cut; {acked} acknowledged) but the block holds {}",
                        name_block(got)
                    ));
                }
                continue;
            }
            if is_write {
                content.late_writes += 1;
                continue;
            }
            make_block(KIND_SOURCE, index, index, &mut want);
            if got == want.as_slice() {
                content.source_blocks += 1;
            } else {
                problems.push(format!(
                    "block {index}: neither the source's data nor write {number} (not \
                     acknowledged): it holds {}",
                    name_block(got)
                ));
            }
        }
    }
    content.sha256 = hex(&hasher.finalize());
    if !problems.is_empty() {
        let shown: Vec<&String> = problems.iter().take(20).collect();
        panic!(
            "{what}: {} wrong blocks (first {}):\n  {}",
            problems.len(),
            shown.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n  ")
        );
    }
    assert_eq!(
        content.acked_writes, acked,
        "{what}: acknowledged writes miscounted"
    );
    say(&format!(
        "  {what}: all {BLOCKS} blocks right in {:.1} s: {} acknowledged writes, {} later writes \
         that landed, {} source blocks; sha256 {}",
        started.elapsed().as_secs_f64(),
        content.acked_writes,
        content.late_writes,
        content.source_blocks,
        content.sha256
    ));
    content
}

fn verify_source(device: &Path) {
    let started = Instant::now();
    let file = open_direct(device, false);
    assert_eq!(device_bytes(device), SIZE, "the source has the wrong size");
    let per_chunk = 256u64;
    let mut buffer = Aligned::new(per_chunk as usize * BLOCK);
    let mut want = vec![0u8; BLOCK];
    let mut hasher = Sha256::new();
    for first in (0..BLOCKS).step_by(per_chunk as usize) {
        file.read_exact_at(buffer.as_mut_slice(), first * BLOCK as u64)
            .unwrap_or_else(|e| panic!("reading the source at block {first}: {e}"));
        hasher.update(buffer.as_slice());
        for (k, got) in buffer.as_slice().chunks_exact(BLOCK).enumerate() {
            let index = first + k as u64;
            make_block(KIND_SOURCE, index, index, &mut want);
            assert!(
                got == want.as_slice(),
                "source block {index} holds {}",
                name_block(got)
            );
        }
    }
    say(&format!(
        "  the source: all {BLOCKS} blocks hold its pattern ({:.1} s); sha256 {}",
        started.elapsed().as_secs_f64(),
        hex(&hasher.finalize())
    ));
}

// ---------------------------------------------------------------------------
// The guest bench: the pool disk, the driver process, stage and publish.

fn require_in_vm() {
    assert!(
        in_vm(),
        "the phases of the power-cut test run inside the VM, started by \
         vm_driver_survives_a_power_cut"
    );
}

struct Guest {
    phase: u32,
    device: PathBuf,
    mount: PathBuf,
    pool: PathBuf,
    state: PathBuf,
    /// On the scratch disk (fresh at every boot): socket and publish paths.
    work: PathBuf,
    mnt: PathBuf,
    endpoint: String,
    driver: Option<Driver>,
    started: Instant,
}

impl Guest {
    fn new(phase: u32) -> Self {
        let work = std::env::temp_dir().join("lcpc");
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap_or_else(|e| panic!("creating {}: {e}", mnt.display()));
        let mount = PathBuf::from(POOL_MOUNT);
        Self {
            phase,
            device: Path::new("/dev/disk/by-id").join(format!("virtio-{POOL_SERIAL}")),
            pool: mount.join("pool"),
            state: mount.join("state"),
            mount,
            endpoint: format!("unix://{}", work.join("csi.sock").display()),
            work,
            mnt,
            driver: None,
            started: Instant::now(),
        }
    }

    fn step(&self, message: &str) {
        say(&format!(
            "[phase {} +{:.1}s] {message}",
            self.phase,
            self.started.elapsed().as_secs_f64()
        ));
    }

    fn log_of(&self, phase: u32) -> PathBuf {
        self.mount
            .join("logs")
            .join(format!("driver-phase-{phase}.log"))
    }

    /// Mounts the pool disk at its fixed place; formats it first in phase 1.
    fn mount_pool(&mut self, format: bool) {
        if format {
            run(
                "mkfs.ext4",
                &[
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=1,lazy_journal_init=1".as_ref(),
                    self.device.as_os_str(),
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
                self.device.as_os_str(),
                self.mount.as_os_str(),
            ],
        );
        for dir in [&self.pool, &self.state, &self.mount.join("logs")] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        self.step(&format!(
            "pool disk {} mounted at {}{}",
            self.device.display(),
            self.mount.display(),
            if format { " (fresh ext4)" } else { "" }
        ));
    }

    /// Starts `liveclone standalone` on the pool disk and waits until Probe
    /// says ready.
    async fn start_driver(&mut self) -> Csi {
        assert!(self.driver.is_none(), "the driver is already running");
        let binary = std::env::var_os(DRIVER_ENV).expect("the driver's path from the host");
        let mut args = standalone_args(&self.endpoint, &self.state, &self.pool, NODE_ID, &self.mnt);
        // Progress is read often; stalls are not this test's subject.
        args.extend(
            [
                "--hydration-poll-seconds",
                "0.5",
                "--stall-after-seconds",
                "60",
            ]
            .map(OsStr::new),
        );
        let log = self.log_of(self.phase);
        let what = format!("driver start, phase {}", self.phase);
        let driver = Driver::start(Path::new(&binary), &args, &log, DEBUG_LOG, &what)
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

    /// SIGTERM, a bounded wait, then SIGKILL.
    fn stop_driver(&mut self) {
        let Some(mut driver) = self.driver.take() else {
            return;
        };
        match driver.stop_within(STOP_LIMIT) {
            Some(status) => self.step(&format!("driver stopped ({status})")),
            None => self.step("driver stopped (no exit status)"),
        }
    }

    /// NodeStageVolume and NodePublishVolume as raw block, at paths that
    /// are the same in every phase.
    async fn stage_publish(&self, csi: &mut Csi, volume_id: &str, tag: &str) -> Mounted {
        csi.stage_publish(&self.mnt, volume_id, Access::Block, tag)
            .await
    }

    /// No device, pool loop, pool file or publish mount of ours.
    fn assert_nothing_left(&self) {
        assert_nothing_left(&Default::default(), &self.pool, &self.mnt);
        self.step("no device, loop, pool file or mount of ours is left");
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            say(&format!(
                "[phase {}] FAILED after {:.1} s; kernel state:\n{}\n--- last {LOG_TAIL} lines of \
                 the driver's log ---\n{}\n--- end of the driver's log ---",
                self.phase,
                self.started.elapsed().as_secs_f64(),
                kernel_state(&self.pool, &self.work),
                tail_of(&self.log_of(self.phase), LOG_TAIL)
            ));
        }
        self.stop_driver();
        unmount_all_under(&self.mnt);
        let _ = Command::new("umount").arg(&self.mount).output();
    }
}

/// One line per device of ours: its targets and, for clones, the counts.
fn kernel_summary() -> String {
    dm_devices()
        .iter()
        .map(|name| {
            let status = output_or_error("dmsetup", &["status", "--noflush", name]);
            let fields: Vec<&str> = status.split_whitespace().collect();
            match fields.get(2) {
                Some(&"clone") => format!(
                    "{name} clone {} regions",
                    fields.get(6).copied().unwrap_or("?")
                ),
                Some(target) => format!("{name} {target}"),
                None => format!("{name} ?"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
