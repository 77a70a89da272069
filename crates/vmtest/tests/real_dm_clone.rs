//! Smoke tests that prove the bench: dm-clone on the VM's real kernel, driven
//! directly with losetup and dmsetup. Built only with `--features
//! real-kernel`; run by `make test-vm` inside the VM.

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
/// 4 KiB regions: the smallest dm-clone allows, so partial hydration and
/// writes landing inside unhydrated regions are both exercised.
const REGION_SECTORS: u64 = 8;
const HYDRATION_LIMIT: Duration = Duration::from_secs(300);

const SOURCE_SEED: u64 = 1;
const EARLY_WRITE_SEED: u64 = 2;
const LATE_WRITE_SEED: u64 = 3;

/// Source (filled with the `SOURCE_SEED` pattern), destination and metadata
/// loop devices for one test; `tag` keeps device names apart.
struct Rig {
    source: LoopDevice,
    dest: LoopDevice,
    meta: LoopDevice,
}

impl Rig {
    fn new(tag: &str, source_size: u64, dest_size: u64) -> Self {
        let source = LoopDevice::new(&format!("src-{tag}"), source_size);
        fill_with_pattern(&source.path, SOURCE_SEED, source_size / BLOCK as u64);
        Self {
            source,
            dest: LoopDevice::new(&format!("dst-{tag}"), dest_size),
            meta: LoopDevice::new(&format!("meta-{tag}"), 4 * MIB),
        }
    }
}

fn sectors(bytes: u64) -> u64 {
    bytes / SECTOR
}

#[test]
fn real_clone_reads_source_then_hydrates_with_writes_kept() {
    require_real_kernel();
    let size = 64 * MIB;
    let blocks = size / BLOCK as u64;
    let Rig { source, dest, meta } = Rig::new("a", size, size);

    let clone = DmDevice::create(
        "clone-a",
        &clone_table(
            sectors(size),
            &meta.path,
            &dest.path,
            &source.path,
            REGION_SECTORS,
            &["no_hydration"],
        ),
    );
    let before = clone.clone_status();
    assert_eq!(before.hydrated, 0, "fresh metadata must start empty");
    assert_eq!(before.total_regions, size / (REGION_SECTORS * SECTOR));

    // Before any hydration, the clone reads exactly the source.
    let sum = verify_blocks(&clone.path(), blocks, |i| pattern_block(SOURCE_SEED, i));
    println!("clone before hydration: sha256 {sum}");
    assert_eq!(
        clone.clone_status().hydrated,
        0,
        "reads must not hydrate regions"
    );

    // Writes before hydration: every 7th block.
    let early = |i: u64| i % 7 == 3;
    let late = |i: u64| i % 11 == 5 && !early(i);
    let file = open_direct(&clone.path());
    for i in (0..blocks).filter(|&i| early(i)) {
        write_block_direct(&file, i, &pattern_block(EARLY_WRITE_SEED, i));
    }
    let after_writes = clone.clone_status();
    assert!(
        after_writes.hydrated >= blocks / 7,
        "written regions count as hydrated: {after_writes:?}"
    );

    // Writes during hydration, kept as well.
    clone.message("hydration_batch_size 16");
    clone.message("enable_hydration");
    for i in (0..blocks).filter(|&i| late(i)) {
        write_block_direct(&file, i, &pattern_block(LATE_WRITE_SEED, i));
    }
    drop(file);
    let done = clone.wait_hydrated(HYDRATION_LIMIT);
    println!("hydrated: {done:?}");

    let expected = |i: u64| {
        if early(i) {
            pattern_block(EARLY_WRITE_SEED, i)
        } else if late(i) {
            pattern_block(LATE_WRITE_SEED, i)
        } else {
            pattern_block(SOURCE_SEED, i)
        }
    };
    let through_clone = verify_blocks(&clone.path(), blocks, expected);
    drop(clone);
    // After hydration the destination alone holds source plus writes.
    let dest_alone = verify_blocks(&dest.path, blocks, expected);
    let want = expected_sha256(blocks, expected);
    println!("expected {want}\nclone    {through_clone}\ndest     {dest_alone}");
    assert_eq!(dest_alone, want);
}

#[test]
fn real_clone_with_linear_tail_for_larger_destination() {
    require_real_kernel();
    let source_size = 32 * MIB;
    let dest_size = 48 * MIB;
    let source_blocks = source_size / BLOCK as u64;
    let dest_blocks = dest_size / BLOCK as u64;
    let Rig { source, dest, meta } = Rig::new("b", source_size, dest_size);

    // The clone target covers the source's length; the tail maps the rest of
    // the destination linearly, at the same offset.
    let table = format!(
        "{}\n{} {} linear {} {}",
        clone_table(
            sectors(source_size),
            &meta.path,
            &dest.path,
            &source.path,
            REGION_SECTORS,
            &["no_hydration"],
        ),
        sectors(source_size),
        sectors(dest_size - source_size),
        dest.path.display(),
        sectors(source_size),
    );
    let clone = DmDevice::create("clone-b", &table);
    assert_eq!(device_bytes(&clone.path()), dest_size);

    let zero = vec![0u8; BLOCK];
    let before = |i: u64| {
        if i < source_blocks {
            pattern_block(SOURCE_SEED, i)
        } else {
            zero.clone()
        }
    };
    verify_blocks(&clone.path(), dest_blocks, before);

    // Writes on both sides of the boundary.
    let written =
        |i: u64| i.is_multiple_of(9) || (source_blocks - 2..source_blocks + 2).contains(&i);
    let file = open_direct(&clone.path());
    for i in (0..dest_blocks).filter(|&i| written(i)) {
        write_block_direct(&file, i, &pattern_block(EARLY_WRITE_SEED, i));
    }
    drop(file);
    clone.message("hydration_batch_size 32");
    clone.message("enable_hydration");
    let status = clone.wait_hydrated(HYDRATION_LIMIT);
    assert_eq!(
        status.total_regions,
        source_size / (REGION_SECTORS * SECTOR)
    );

    let expected = |i: u64| {
        if written(i) {
            pattern_block(EARLY_WRITE_SEED, i)
        } else {
            before(i)
        }
    };
    verify_blocks(&clone.path(), dest_blocks, expected);
    drop(clone);
    let sum = verify_blocks(&dest.path, dest_blocks, expected);
    assert_eq!(sum, expected_sha256(dest_blocks, expected));
    println!("destination with tail: sha256 {sum}");
}

/// Hydrate, then swap the clone table for a linear one while a reader and an
/// O_DIRECT writer keep going: no I/O error, and the data is right after.
#[test]
fn real_switch_to_linear_under_concurrent_io() {
    require_real_kernel();
    let size = 32 * MIB;
    let blocks = size / BLOCK as u64;
    let half = blocks / 2;
    let Rig { source, dest, meta } = Rig::new("c", size, size);

    let clone = DmDevice::create(
        "clone-c",
        &clone_table(
            sectors(size),
            &meta.path,
            &dest.path,
            &source.path,
            REGION_SECTORS,
            &[],
        ),
    );
    clone.message("hydration_batch_size 32");
    clone.wait_hydrated(HYDRATION_LIMIT);

    let stop = Arc::new(AtomicBool::new(false));
    // The writer owns the upper half and records each completed generation;
    // the reader checks the lower half, which nobody writes.
    let generation = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let path = clone.path();
    let writer = {
        let (stop, generation, path) = (stop.clone(), generation.clone(), path.clone());
        std::thread::spawn(move || {
            let file = open_direct(&path);
            let mut gen = 0u64;
            while !stop.load(Ordering::Relaxed) {
                gen += 1;
                for i in half..blocks {
                    write_block_direct(&file, i, &pattern_block(100 + gen, i));
                }
                generation.store(gen, Ordering::SeqCst);
            }
        })
    };
    let reader = {
        let (stop, reads, path) = (stop.clone(), reads.clone(), path.clone());
        std::thread::spawn(move || {
            let file = open_direct(&path);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let got = read_block_direct(&file, i);
                assert!(
                    got == pattern_block(SOURCE_SEED, i),
                    "block {i} read wrong data"
                );
                reads.fetch_add(1, Ordering::Relaxed);
                i = (i + 17) % half;
            }
        })
    };

    // Let both run against the clone target, switch, let both run against
    // the linear target.
    while generation.load(Ordering::SeqCst) < 1 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = clone.clone_status();
    assert!(
        status.hydrated == status.total_regions && status.hydrating == 0 && status.mode == "rw",
        "only a fully hydrated, healthy clone may be switched: {status:?}"
    );
    let gen_before = generation.load(Ordering::SeqCst);
    let reads_before = reads.load(Ordering::Relaxed);
    clone.replace_table(&format!(
        "0 {} linear {} 0",
        sectors(size),
        dest.path.display()
    ));
    assert!(clone.table().contains(" linear "), "table is now linear");
    let target = generation.load(Ordering::SeqCst) + 2;
    while generation.load(Ordering::SeqCst) < target {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread: no I/O error");
    reader
        .join()
        .expect("reader thread: no I/O error or wrong data");
    let last = generation.load(Ordering::SeqCst);
    println!(
        "switched under I/O: writer generations {gen_before} -> {last}, reads {reads_before} -> {}",
        reads.load(Ordering::Relaxed)
    );

    // The metadata device is no longer used by the table: O_EXCL on a block
    // device fails with EBUSY while anything holds it.
    assert!(!clone.table().contains("clone"));
    let exclusive = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
        .open(&meta.path);
    assert!(
        exclusive.is_ok(),
        "metadata device still in use: {exclusive:?}"
    );
    drop(exclusive);

    let expected = |i: u64| {
        if i < half {
            pattern_block(SOURCE_SEED, i)
        } else {
            pattern_block(100 + last, i)
        }
    };
    verify_blocks(&clone.path(), blocks, expected);
    drop(clone);
    drop(source); // nothing needs the source any more
    verify_blocks(&dest.path, blocks, expected);
}
