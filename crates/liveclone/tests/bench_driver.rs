#![cfg(feature = "real-kernel")]
//! Benchmarks of `liveclone standalone` on the VM's real kernel (`make
//! bench`), each printed as a ratio against a baseline measured in the same
//! run, on the same storage: the VM is software-emulated (TCG) and shares
//! its host, so absolute figures mean little and drift between runs.
//! `docs/BENCHMARKS.md` says what each figure means, how it is measured,
//! its target and the figures of the last run.
//!
//! 1. CreateVolume (clone of a volume) + NodeStage + NodePublish of an ext4
//!    clone, for a 1 GiB and a 64 GiB source holding the same 64 MiB of
//!    files; baseline: `dd` copying 1 GiB.
//! 2. Background hydration throughput of a raw block clone of 1 GiB of
//!    data; baseline: an O_DIRECT `dd` between loop devices over files in
//!    the same file system as the pool.
//! 3. Bytes copied by hydration for an ext4 volume 10% full (the rest is
//!    skipped: the source image's holes in CreateVolume, the free space by
//!    the trim the monitor does before it enables hydration).
//! 4. 4 KiB random read and write IOPS on a clone that still has its
//!    dm-clone table (regions hydrated, hydration paused), against a linear
//!    device over its destination, interleaved; again after the switch.
//! 5. Write latency of a paced O_DIRECT writer while a clone completes and
//!    switches to linear.
//!
//! A figure that misses its target is printed loudly but does not fail the
//! run; a figure that cannot be measured (an RPC or a tool failed) does.
//! `LIVECLONE_BENCH_FIGURES=2,4` runs only some figures;
//! `LIVECLONE_BENCH_SHOW_LOG=1` prints the driver's log at the end (pass
//! both to the VM with `vmtest test --env`).
//!
//! Ignored by default, and named `bench_*` so that `make test-vm` (which
//! runs `real_*`) never runs it. In the VM as root, or on a host with
//! dm-clone when `LIVECLONE_TEST_ON_HOST=1`.

#[path = "common/bench.rs"]
mod bench;
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use bench::{
    bench, blocking, clone_figure, dd_copy, figure_3, fill_direct, human_bytes, machine,
    raw_source_figures, secs, start_driver, Backend, BaselineMaker, CopyBaseline, Figures, Report,
    DD_BLOCK, DD_BYTES, RAW_SOURCE,
};
use common::{drop_caches, require_real_kernel, say, Bench, Csi, LoopDevice, Pool, GIB};

/// The pool of figure 1: an ext4 file system in a sparse image, so that a
/// 64 GiB volume fits (the driver refuses a volume larger than its pool).
const BIG_POOL_BYTES: u64 = 96 * GIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with make bench"]
async fn bench_driver() {
    require_real_kernel();
    let started = Instant::now();
    let mut report = Report::default();
    say(&format!("liveclone benchmarks: {}", machine()));

    let wanted = Figures::from_env();
    // Figure 1 needs a pool larger than 64 GiB: its own driver and pool.
    if wanted.has(1) {
        let mut bench = bench("fig1", Pool::LargeExt4(BIG_POOL_BYTES));
        let figure_started = Instant::now();
        let result = match start_driver(&mut bench, &[]).await {
            Ok(mut csi) => figure_1(&mut bench, &mut csi, &mut report).await,
            Err(e) => Err(e),
        };
        report.took("1", figure_started);
        report.outcome("1", result, &bench);
    }

    // Figures 2 to 5: the pool on the scratch disk's own ext4.
    if [2, 3, 4, 5].iter().any(|&f| wanted.has(f)) {
        let mut bench = bench("fig2-5", Pool::Ext4);
        match start_driver(&mut bench, &[]).await {
            Ok(mut csi) => {
                if wanted.has(3) {
                    let figure_started = Instant::now();
                    let result = figure_3(&mut bench, &mut csi, &FilePool, &mut report).await;
                    report.took("3", figure_started);
                    report.outcome("3", result, &bench);
                }
                if wanted.has(2) || wanted.has(4) || wanted.has(5) {
                    let result =
                        raw_source_figures(&mut bench, &mut csi, &FilePool, &mut report, &wanted)
                            .await;
                    report.outcome("2, 4, 5 (the raw source)", result, &bench);
                }
            }
            Err(e) => report.outcome("2 to 5 (driver)", Err(e), &bench),
        }
    }

    report.print(started.elapsed());
    assert!(
        report.errors.is_empty(),
        "{} figure(s) could not be measured: {:?}",
        report.errors.len(),
        report.errors
    );
}

// ---------------------------------------------------------------------------
// Figure 1: clone of a volume to a published, mounted clone.

async fn figure_1(bench: &mut Bench, csi: &mut Csi, report: &mut Report) -> anyhow::Result<()> {
    // The pool folder is in the big image's file system.
    let big = bench
        .pool
        .parent()
        .context("the pool folder has a parent")?
        .to_owned();

    // Baseline: dd of 1 GiB between two files, on the scratch disk's own
    // ext4 and in the pool's file system; the faster one is the baseline.
    let scratch_dd = dd_file_baseline(&bench.root.join("dd-scratch")).await?;
    let pool_dd = dd_file_baseline(&big.join("dd-pool")).await?;
    bench.step(&format!(
        "dd baseline, 1 GiB file to file: scratch ext4 {}, pool ext4 {}",
        secs(scratch_dd),
        secs(pool_dd)
    ));
    let dd = scratch_dd.min(pool_dd);
    let note = format!(
        "1: dd 1 GiB file to file (bs=4M, iflag=direct, oflag=direct): scratch ext4 {}, in the \
         pool's ext4 {}; baseline = the faster",
        secs(scratch_dd),
        secs(pool_dd)
    );
    clone_figure(bench, csi, &FilePool, report, dd, note)
        .await
        .map(drop)
}

/// dd of 1 GiB from a file filled with data to a new file, both in `dir`.
async fn dd_file_baseline(dir: &Path) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    let (s, d) = (src.clone(), dst.clone());
    let took = blocking(move || {
        fill_direct(&s, 0, DD_BYTES, 7, true)?;
        let _ = std::fs::remove_file(&d);
        drop_caches();
        dd_copy(&s, &d, DD_BYTES, DD_BLOCK)
    })
    .await?;
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(took)
}

// ---------------------------------------------------------------------------
// What is particular to the file pool.

/// The driver's file pool (class `file`, `--pool-dir`): volumes are files
/// attached as loop devices with direct I/O.
struct FilePool;

impl Backend for FilePool {
    fn parameters(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    fn copy_baseline(&self, bench: &Bench) -> BaselineMaker {
        let dir = bench.root.join("baseline");
        Box::new(move || Ok(Box::new(LoopCopy::new(dir)?) as Box<dyn CopyBaseline>))
    }

    fn destination(&self, bench: &Bench, volume_id: &str) -> anyhow::Result<PathBuf> {
        data_loop_of(&bench.pool, volume_id)
    }

    fn destination_kind(&self) -> &'static str {
        "loop device"
    }

    fn allocation(&self, bench: &Bench, volume_id: &str) -> anyhow::Result<(String, String)> {
        let allocated = human_bytes(data_file_allocated(&bench.pool, volume_id)? as f64);
        Ok((
            format!("the destination file has {allocated} allocated"),
            format!(
                "the destination file has {allocated} allocated after completion (copies plus \
                 what the trim mount wrote)"
            ),
        ))
    }
}

/// Figure 2's baseline on the file pool: dd from a loop device over a file
/// of data (read-only) to one over a new sparse file, both with direct
/// I/O, as the pool attaches them, in the same file system as the pool.
struct LoopCopy {
    dir: PathBuf,
    src_file: PathBuf,
}

impl LoopCopy {
    fn new(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let src_file = dir.join("src.img");
        fill_direct(&src_file, 0, RAW_SOURCE, 43, true)?;
        Ok(Self { dir, src_file })
    }
}

impl CopyBaseline for LoopCopy {
    fn short(&self) -> String {
        "dd between loop devices".to_owned()
    }

    fn what(&self) -> String {
        "dd between loop devices (direct I/O, ".to_owned()
    }

    fn copy(&mut self, block: &str) -> anyhow::Result<Duration> {
        let dst = self.dir.join("dst.img");
        let _ = std::fs::remove_file(&dst);
        std::fs::File::create(&dst)
            .and_then(|f| f.set_len(RAW_SOURCE))
            .with_context(|| format!("creating {}", dst.display()))?;
        let src_loop = LoopDevice::attach_direct(&self.src_file, true)?;
        let dst_loop = LoopDevice::attach_direct(&dst, false)?;
        drop_caches();
        let took = dd_copy(&src_loop.path, &dst_loop.path, RAW_SOURCE, block);
        drop(dst_loop);
        drop(src_loop);
        let _ = std::fs::remove_file(&dst);
        took
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }
}

/// The loop device over a volume's data file in the pool.
fn data_loop_of(pool: &Path, volume_id: &str) -> anyhow::Result<PathBuf> {
    let prefix = pool.join("volumes").join(format!("{volume_id}."));
    let prefix = prefix.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if backing.trim().starts_with(&prefix) {
            found.push(PathBuf::from(format!("/dev/{name}")));
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one loop device over the data of {volume_id}, found {found:?}"),
    }
}

/// Bytes allocated to a volume's data file in the pool.
fn data_file_allocated(pool: &Path, volume_id: &str) -> anyhow::Result<u64> {
    let folder = pool.join("volumes");
    let prefix = format!("{volume_id}.");
    let mut total = 0;
    let mut found = false;
    for entry in
        std::fs::read_dir(&folder).with_context(|| format!("listing {}", folder.display()))?
    {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            total += entry.metadata()?.blocks() * 512;
            found = true;
        }
    }
    ensure!(found, "no data file of {volume_id} in {}", folder.display());
    Ok(total)
}
