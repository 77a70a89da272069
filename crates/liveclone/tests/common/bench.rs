//! What the benchmarks share (`bench_driver` for the file pool,
//! `bench_lvm` for the LVM device classes; included with
//! `#[path = "common/bench.rs"] mod bench;`): the figures, each measured
//! against a baseline of the same run on the same storage, the report
//! table, and the data, dd and I/O helpers. What differs from one pool to
//! another (where a clone's destination is, what a copy between two pieces
//! of its storage costs, what a clone allocates) comes from a [`Backend`].
//! `docs/BENCHMARKS.md` says what each figure means.

// Each benchmark binary uses part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use liveclone::domain::sizing::HydrationTunables;
use liveclone::os::dm::RegionSize;
use liveclone::proto::admin::v1alpha1::set_hydration_request::Action;

use crate::common::{
    describe, drop_caches, fs_usage, say, sha256_hex, try_clone_status, try_dm_table,
    try_open_direct, try_run, Access, Aligned, Bench, Csi, Mounted, OwnDevice, Pool, RpcResult,
    Source, BLOCK, DM_PREFIX, GIB, INFO_LOG, KIB, LOG_TAIL, MIB,
};

/// What differs between pools for the figures: the StorageClass
/// parameters that put a volume there, figure 2's copy baseline, figure
/// 4's device under a clone, and figure 3's cross-check of what a clone
/// allocated.
pub trait Backend {
    /// StorageClass parameters of every CreateVolume (e.g. the device
    /// class); the figures add their own.
    fn parameters(&self) -> Vec<(&'static str, &'static str)>;

    /// Figure 2's (and for LVM figure 1's) baseline, made on a blocking
    /// thread: a source of [`RAW_SOURCE`] bytes of data and copies of it
    /// onto fresh storage of the kind a clone writes to.
    fn copy_baseline(&self, bench: &Bench) -> BaselineMaker;

    /// The device a clone writes to (its destination), under its
    /// device-mapper table.
    fn destination(&self, bench: &Bench, volume_id: &str) -> anyhow::Result<PathBuf>;

    /// What the destination is, for figure 4's note ("loop device").
    fn destination_kind(&self) -> &'static str;

    /// Figure 3's cross-check once a clone is complete: a short phrase for
    /// the step line and a longer one for the note.
    fn allocation(&self, bench: &Bench, volume_id: &str) -> anyhow::Result<(String, String)>;
}

/// Makes a [`CopyBaseline`] (fills its source) on a blocking thread.
pub type BaselineMaker = Box<dyn FnOnce() -> anyhow::Result<Box<dyn CopyBaseline>> + Send>;

/// A dd baseline: a source holding [`RAW_SOURCE`] bytes of data, copied
/// with direct I/O onto a fresh destination of the same kind of storage as
/// a clone's; cleaned up when dropped.
pub trait CopyBaseline: Send {
    /// For the steps, e.g. "dd between loop devices".
    fn short(&self) -> String;
    /// For the notes, up to the dd options, e.g. "dd between loop devices
    /// (direct I/O, ", to which "bs=4M, iflag=direct, oflag=direct)" is
    /// added.
    fn what(&self) -> String;
    /// One copy of [`RAW_SOURCE`] bytes in blocks of `block` (dd's syntax)
    /// onto a fresh destination, caches dropped first; its wall time.
    fn copy(&mut self, block: &str) -> anyhow::Result<Duration>;
    /// Removes what it made, reporting a failure (a drop cannot).
    fn finish(&mut self) -> anyhow::Result<()>;
}

/// One copy on a blocking thread; the baseline comes back for the next.
pub async fn copy_once(
    baseline: Box<dyn CopyBaseline>,
    block: &'static str,
) -> anyhow::Result<(Box<dyn CopyBaseline>, Duration)> {
    blocking(move || {
        let mut baseline = baseline;
        let took = baseline.copy(block)?;
        Ok((baseline, took))
    })
    .await
}

/// The parameters of `backend` followed by `extra`.
pub fn with_backend<'a>(
    backend: &dyn Backend,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut all: Vec<(&'a str, &'a str)> = backend.parameters();
    all.extend_from_slice(extra);
    all
}

/// Figure 1: the two source sizes, and the data both hold.
pub const SMALL_SOURCE: u64 = GIB;
pub const LARGE_SOURCE: u64 = 64 * GIB;
pub const FIG1_FILES: usize = 16;
pub const FILE_BYTES: usize = 4 * MIB as usize;
/// Figure 1's baseline: bytes copied by `dd`.
pub const DD_BYTES: u64 = GIB;

/// Figures 2, 4 and 5: the raw block source (all data) and the clones of it.
pub const RAW_SOURCE: u64 = GIB;
/// Figure 2's tuned variant: 64 MiB in flight, 16 MiB batches (64 KiB
/// regions, the default for 1 GiB), against the defaults of 16 MiB and
/// 4 MiB.
pub const TUNED_THRESHOLD: u32 = 1024;
pub const TUNED_BATCH: u32 = 256;
/// How often figure 2 reads the clone's status.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Figure 3: an ext4 volume and the files it holds (about 10%).
pub const FIG3_VOLUME: u64 = GIB;
pub const FIG3_FILES: usize = 25;

/// Figure 4: the span the random I/O hits, the length of one measured
/// slice, and the rounds (each round: read and write on both devices).
pub const IOPS_SPAN: u64 = 256 * MIB;
pub const IOPS_TURN_OPS: u64 = 64;
pub const IOPS_PAIRS: usize = 120;
pub const IOPS_PAIRS_AFTER: usize = 60;

/// Figure 5: the pause between two writes of the writer (hydration only
/// starts copies while no user I/O is in flight, so an unpaced writer at
/// queue depth 1 starves it).
pub const WRITER_PAUSE: Duration = Duration::from_millis(1);
/// Writes this close to the suspended window count as "around the switch".
pub const AROUND_SWITCH: Duration = Duration::from_secs(1);

/// The driver's default region size for a 1 GiB clone, and its default
/// tunables for it (for the report).
pub const DEFAULT_REGION_KIB: u64 = 64;
pub const DEFAULT_THRESHOLD: u32 = 256;
pub const DEFAULT_BATCH: u32 = 64;
/// Figure 2's third variant: the region size that was the default for
/// 1 GiB before the 64 KiB floor, with the default tunables for it.
pub const SMALL_REGION: &str = "4KiB";
pub const SMALL_REGION_THRESHOLD: u32 = 4096;
pub const SMALL_REGION_BATCH: u32 = 1024;

/// Figure 3's clone: one region at a time (threshold and batch 1) at the
/// default region size, so that hardly anything is copied before the pause.
pub const ONE_REGION_AT_A_TIME: [(&str, &str); 2] = [
    ("liveclone.io/hydrationThreshold", "1"),
    ("liveclone.io/hydrationBatchSize", "1"),
];
/// How long figure 3 waits for the monitor to trim the clone and enable
/// (here: record, since it is paused) its hydration.
pub const START_LIMIT_F3: Duration = Duration::from_secs(120);

/// Time limits for waiting on hydration.
pub const HYDRATION_LIMIT: Duration = Duration::from_secs(600);

/// Which figures to run: `LIVECLONE_BENCH_FIGURES`, e.g. `2,4` (default:
/// all).
pub struct Figures(Option<BTreeSet<u32>>);

impl Figures {
    pub fn from_env() -> Self {
        let Ok(list) = std::env::var("LIVECLONE_BENCH_FIGURES") else {
            return Self(None);
        };
        let figures: BTreeSet<u32> = list
            .split([',', ' '])
            .filter(|f| !f.is_empty())
            .map(|f| {
                f.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("LIVECLONE_BENCH_FIGURES: {f:?} is not a number"))
            })
            .collect();
        say(&format!(
            "only figures {figures:?} (LIVECLONE_BENCH_FIGURES)"
        ));
        Self(Some(figures))
    }

    pub fn has(&self, figure: u32) -> bool {
        self.0.as_ref().is_none_or(|set| set.contains(&figure))
    }
}

/// Figures 2, 4 and 5 share one raw source (a snapshot of 1 GiB of data).
pub async fn raw_source_figures(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    report: &mut Report,
    wanted: &Figures,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let source = RawSource::new(bench, csi, backend).await?;
    report.took("raw source", started);
    if wanted.has(2) {
        let started = Instant::now();
        let result = figure_2(bench, csi, backend, &source, report).await;
        report.took("2", started);
        report.outcome("2", result, bench);
    }
    if wanted.has(4) {
        let started = Instant::now();
        let result = figure_4(bench, csi, backend, &source, report).await;
        report.took("4", started);
        report.outcome("4", result, bench);
    }
    if wanted.has(5) {
        let started = Instant::now();
        let result = figure_5(bench, csi, backend, &source, report).await;
        report.took("5", started);
        report.outcome("5", result, bench);
    }
    source.remove(csi).await
}

// ---------------------------------------------------------------------------
// Figure 1: clone of a volume to a published, mounted clone.

/// Figure 1 once its baseline is measured: `dd`, the time of copying
/// [`DD_BYTES`], which `dd_note` (the first note) explains. Clones a 1 GiB,
/// a 64 GiB and again a 1 GiB source of the backend to mounted clones.
/// Returns the mean time of the 1 GiB clones, in seconds.
pub async fn clone_figure(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    report: &mut Report,
    dd: Duration,
    dd_note: String,
) -> anyhow::Result<f64> {
    let tool = blocking(tool_start_cost).await?;
    bench.step(&format!(
        "one `dmsetup version` process: {} (mean of {TOOL_RUNS})",
        ms(tool.as_secs_f64())
    ));

    let mut small = Vec::new();
    let mut large = Vec::new();
    for (round, size) in [SMALL_SOURCE, LARGE_SOURCE, SMALL_SOURCE]
        .into_iter()
        .enumerate()
    {
        let timing = clone_to_mount(bench, csi, backend, size, round).await?;
        if size == SMALL_SOURCE {
            small.push(timing);
        } else {
            large.push(timing);
        }
    }
    let mean = |timings: &[CloneTiming]| -> f64 {
        timings.iter().map(|t| t.total().as_secs_f64()).sum::<f64>() / timings.len() as f64
    };
    let small_s = mean(&small);
    let large_s = mean(&large);
    let show = |timings: &[CloneTiming]| -> String {
        timings
            .iter()
            .map(CloneTiming::describe)
            .collect::<Vec<_>>()
            .join("; ")
    };
    report.note(dd_note);
    report.note(format!("1: 1 GiB source: {}", show(&small)));
    report.note(format!("1: 64 GiB source: {}", show(&large)));
    let small_forks = small.iter().map(|t| t.forks).sum::<u64>() / small.len() as u64;
    report.note(format!(
        "1: starting one external tool (`dmsetup version`, mean of {TOOL_RUNS}) takes {} in \
         this VM: the 1 GiB clone-to-mounted time is {:.0} such starts, and about {} \
         processes were forked during it (/proc/stat; the driver runs dmsetup, \
         blkid, mount, and its monitor polls)",
        ms(tool.as_secs_f64()),
        small_s / tool.as_secs_f64(),
        small_forks
    ));
    report.row(Row::at_most(
        "1a clone to mounted, 64 GiB vs 1 GiB source",
        format!("{large_s:.2} s"),
        format!("{small_s:.2} s (1 GiB)"),
        large_s / small_s,
        1.2,
    ));
    report.row(Row::at_least(
        "1b clone to mounted (1 GiB) vs dd copy of 1 GiB",
        format!("{small_s:.2} s"),
        format!("{:.2} s (dd)", dd.as_secs_f64()),
        dd.as_secs_f64() / small_s,
        10.0,
        "x faster",
    ));
    report.row(Row::info(
        "1c one tool process start (dmsetup version)",
        ms(tool.as_secs_f64()),
        format!("{small_s:.2} s (1 GiB clone to mounted)"),
        Some(small_s / tool.as_secs_f64()),
    ));
    Ok(small_s)
}

/// How many times figure 1 starts `dmsetup version` to price a tool run.
pub const TOOL_RUNS: u32 = 10;

/// Mean wall time of starting and reaping `dmsetup version`: what every
/// external tool run of the driver costs at least in this VM.
pub fn tool_start_cost() -> anyhow::Result<Duration> {
    let started = Instant::now();
    for _ in 0..TOOL_RUNS {
        try_run("dmsetup", &["version".as_ref()])?;
    }
    Ok(started.elapsed() / TOOL_RUNS)
}

/// `processes` from /proc/stat: forks since boot.
pub fn forks_since_boot() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    stat.lines()
        .find_map(|line| line.strip_prefix("processes "))
        .and_then(|n| n.trim().parse().ok())
        .context("no processes line in /proc/stat")
}

/// A new volume of the backend, staged and published as `tag` (named so in
/// the bench); the time NodeStage and NodePublish took (mkfs included).
pub async fn new_mounted_volume(
    bench: &Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    tag: &str,
    bytes: u64,
    access: Access,
) -> anyhow::Result<(liveclone::proto::csi::v1::Volume, Mounted, Duration)> {
    let volume = csi
        .create_volume(&bench.name(tag), bytes, access, None, &backend.parameters())
        .await
        .rpc("CreateVolume")?;
    let started = Instant::now();
    let mounted = csi
        .try_stage_publish(&bench.mnt, &volume.volume_id, access, tag)
        .await?;
    Ok((volume, mounted, started.elapsed()))
}

#[derive(Debug, Clone)]
pub struct CloneTiming {
    source_bytes: u64,
    create: Duration,
    stage: Duration,
    publish: Duration,
    source_mkfs: Duration,
    /// Processes and threads the whole VM created during the timed part
    /// (`processes` in /proc/stat): mostly the driver's tool runs.
    forks: u64,
}

impl CloneTiming {
    fn total(&self) -> Duration {
        self.create + self.stage + self.publish
    }

    fn describe(&self) -> String {
        format!(
            "{} GiB: {} (CreateVolume {}, NodeStage {}, NodePublish {}; {} forks meanwhile; \
             the source's own NodeStage with mkfs took {})",
            self.source_bytes / GIB,
            secs(self.total()),
            secs(self.create),
            secs(self.stage),
            secs(self.publish),
            self.forks,
            secs(self.source_mkfs)
        )
    }
}

pub async fn clone_to_mount(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    size: u64,
    round: usize,
) -> anyhow::Result<CloneTiming> {
    let tag = format!("f1-{}g-{round}", size / GIB);
    let parameters = backend.parameters();
    let (source, source_mount, source_mkfs) = new_mounted_volume(
        bench,
        csi,
        backend,
        &format!("{tag}-src"),
        size,
        Access::Ext4,
    )
    .await?;
    let seed = 100 + round as u64;
    let target = source_mount.target.clone();
    blocking(move || write_files(&target, FIG1_FILES, seed)).await?;
    bench.step(&format!(
        "{tag}: source {} ({} GiB) staged in {} (mkfs included), {} MiB of files written",
        source.volume_id,
        size / GIB,
        secs(source_mkfs),
        FIG1_FILES * FILE_BYTES / MIB as usize
    ));

    // The timed part: what a CO does for a pod that uses a new clone.
    let forks_before = forks_since_boot()?;
    let started = Instant::now();
    let clone = csi
        .create_volume(
            &bench.name(&format!("{tag}-clone")),
            size,
            Access::Ext4,
            Some(Source::Volume(&source.volume_id)),
            &parameters,
        )
        .await
        .rpc("CreateVolume")?;
    let create = started.elapsed();
    let (clone_mount, stage, publish) = csi
        .try_stage_publish_timed(
            &bench.mnt,
            &clone.volume_id,
            Access::Ext4,
            &format!("{tag}-clone"),
        )
        .await?;
    let forks = forks_since_boot()? - forks_before;
    let timing = CloneTiming {
        source_bytes: size,
        create,
        stage,
        publish,
        source_mkfs,
        forks,
    };
    bench.step(&format!("{tag}: {}", timing.describe()));

    // Not timed: the clone holds the source's files.
    let target = clone_mount.target.clone();
    blocking(move || verify_file(&target, FIG1_FILES - 1, seed)).await?;
    let hydration = csi.try_hydration_of(&clone.volume_id).await?;
    bench.step(&format!(
        "{tag}: the clone reads the source's files; {}",
        describe(&hydration)
    ));

    csi.try_unpublish_unstage(&clone_mount).await?;
    csi.delete_volume(&clone.volume_id)
        .await
        .rpc("DeleteVolume")?;
    csi.try_unpublish_unstage(&source_mount).await?;
    csi.delete_volume(&source.volume_id)
        .await
        .rpc("DeleteVolume")?;
    Ok(timing)
}

// ---------------------------------------------------------------------------
// The raw block source of figures 2, 4 and 5: 1 GiB of data, cut into a
// snapshot. The source volume is deleted after the cut: on an ext4 pool the
// cut is a redirect, so the source would copy itself back in the background
// and compete with the clones being measured.

pub struct RawSource {
    snapshot_id: String,
}

impl RawSource {
    async fn new(bench: &mut Bench, csi: &mut Csi, backend: &dyn Backend) -> anyhow::Result<Self> {
        let (volume, mounted, _) =
            new_mounted_volume(bench, csi, backend, "raw-src", RAW_SOURCE, Access::Block).await?;
        let target = mounted.target.clone();
        let started = Instant::now();
        blocking(move || fill_direct(&target, 0, RAW_SOURCE, 42, false)).await?;
        bench.step(&format!(
            "raw source {} filled with {} MiB of data in {}",
            volume.volume_id,
            RAW_SOURCE / MIB,
            secs(started.elapsed())
        ));
        let snapshot = csi
            .create_snapshot(&bench.name("raw-snap"), &volume.volume_id)
            .await
            .rpc("CreateSnapshot")?;
        csi.try_unpublish_unstage(&mounted).await?;
        csi.delete_volume(&volume.volume_id)
            .await
            .rpc("DeleteVolume")?;
        bench.step(&format!(
            "snapshot {} cut; source volume deleted",
            snapshot.snapshot_id
        ));
        Ok(Self {
            snapshot_id: snapshot.snapshot_id,
        })
    }

    /// A raw block clone of the snapshot, named `tag` in the bench, with
    /// the backend's parameters and `extra`.
    async fn clone_volume(
        &self,
        bench: &Bench,
        csi: &mut Csi,
        backend: &dyn Backend,
        tag: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<liveclone::proto::csi::v1::Volume> {
        csi.create_volume(
            &bench.name(tag),
            RAW_SOURCE,
            Access::Block,
            Some(Source::Snapshot(&self.snapshot_id)),
            &with_backend(backend, extra),
        )
        .await
        .rpc("CreateVolume")
    }

    async fn remove(&self, csi: &mut Csi) -> anyhow::Result<()> {
        csi.delete_snapshot(&self.snapshot_id)
            .await
            .rpc("DeleteSnapshot")
    }
}

// ---------------------------------------------------------------------------
// Figure 2: background hydration throughput.

pub async fn figure_2(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    source: &RawSource,
    report: &mut Report,
) -> anyhow::Result<()> {
    let baseline = blocking(backend.copy_baseline(bench)).await?;
    let tuned_threshold = TUNED_THRESHOLD.to_string();
    let tuned_batch = TUNED_BATCH.to_string();
    let variants: [(&str, String, Parameters); 3] = [
        (
            "defaults",
            format!(
                "{DEFAULT_REGION_KIB} KiB regions, threshold {DEFAULT_THRESHOLD}, batch \
                 {DEFAULT_BATCH}"
            ),
            vec![],
        ),
        (
            "larger threshold and batch",
            format!(
                "{DEFAULT_REGION_KIB} KiB regions, threshold {TUNED_THRESHOLD}, batch \
                 {TUNED_BATCH}"
            ),
            vec![
                ("liveclone.io/hydrationThreshold", &tuned_threshold),
                ("liveclone.io/hydrationBatchSize", &tuned_batch),
            ],
        ),
        (
            "4 KiB regions",
            format!(
                "liveclone.io/regionSize={SMALL_REGION}, the default for 1 GiB before the \
                 64 KiB floor; threshold {SMALL_REGION_THRESHOLD}, batch {SMALL_REGION_BATCH}"
            ),
            vec![("liveclone.io/regionSize", SMALL_REGION)],
        ),
    ];
    // dd runs before, between and after the hydrations: each hydration is
    // compared with the mean of the two dd runs around it, since the
    // host's speed drifts over a run.
    let (mut baseline, first) = copy_once(baseline, DD_BLOCK).await?;
    let mut dd = vec![first];
    bench.step(&format!(
        "baseline: {}, {} MiB in {} ({})",
        baseline.short(),
        RAW_SOURCE / MIB,
        secs(dd[0]),
        rate(RAW_SOURCE, dd[0])
    ));
    // (variant, trace, index of the dd run before it)
    let mut runs: Vec<(usize, HydrationTrace, usize)> = Vec::new();
    for (position, &variant) in F2_ORDER.iter().enumerate() {
        let (label, _, parameters) = &variants[variant];
        let name = format!("{label} {position}");
        let trace = hydrate_and_follow(bench, csi, backend, source, &name, parameters).await?;
        runs.push((variant, trace, dd.len() - 1));
        let again;
        (baseline, again) = copy_once(baseline, DD_BLOCK).await?;
        bench.step(&format!(
            "baseline again: {} ({})",
            secs(again),
            rate(RAW_SOURCE, again)
        ));
        dd.push(again);
    }
    let (mut baseline, small) = copy_once(baseline, KCOPYD_BLOCK).await?;
    baseline.finish()?;
    bench.step(&format!(
        "baseline with bs={KCOPYD_BLOCK}: {} ({})",
        secs(small),
        rate(RAW_SOURCE, small)
    ));
    let around = |i: usize| 2.0 * RAW_SOURCE as f64 / (dd[i] + dd[i + 1]).as_secs_f64();
    // Per variant: the mean hydration rate, the mean of its dd baselines,
    // the mean of its per-run ratios, and its traces.
    let of_variant = |variant: usize| -> (f64, f64, f64, Vec<&HydrationTrace>) {
        let mine: Vec<_> = runs.iter().filter(|(v, _, _)| *v == variant).collect();
        let n = mine.len().max(1) as f64;
        let rate = mine.iter().map(|(_, t, _)| t.middle_rate).sum::<f64>() / n;
        let base = mine.iter().map(|(_, _, d)| around(*d)).sum::<f64>() / n;
        let ratio = mine
            .iter()
            .map(|(_, t, d)| t.middle_rate / around(*d))
            .sum::<f64>()
            / n;
        (rate, base, ratio, mine.iter().map(|(_, t, _)| t).collect())
    };
    let small_rate = RAW_SOURCE as f64 / small.as_secs_f64();
    report.note(format!(
        "2: {}bs={DD_BLOCK}, iflag=direct, oflag=direct), {} MiB, before, between and after the hydrations: {}; each hydration's baseline is \
         the mean rate of the dd runs just before and after it. The same dd with \
         bs={KCOPYD_BLOCK}, the size of the pieces kcopyd copies in (dm-mod's \
         kcopyd_subjob_size_kb), after them: {} ({}/s)",
        baseline.what(),
        RAW_SOURCE / MIB,
        dd.iter().map(|d| secs(*d)).collect::<Vec<_>>().join(", "),
        secs(small),
        human_bytes(small_rate)
    ));
    let letters = ['a', 'b', 'c'];
    for (i, (label, tunables, _)) in variants.iter().enumerate() {
        let (rate, base, ratio, traces) = of_variant(i);
        let per_run: Vec<String> = runs
            .iter()
            .enumerate()
            .filter(|(_, (v, _, _))| *v == i)
            .map(|(position, (_, t, d))| {
                format!(
                    "run {} of {}: {}; ratio {:.3}",
                    position + 1,
                    F2_ORDER.len(),
                    t.describe(),
                    t.middle_rate / around(*d)
                )
            })
            .collect();
        report.note(format!(
            "2: {label} ({tunables}), {} run(s): {}",
            traces.len(),
            per_run.join("; ")
        ));
        let figure = format!("2{} hydration rate, middle 80%, {label}", letters[i]);
        let value = format!("{}/s", human_bytes(rate));
        let baseline = format!("{}/s (dd)", human_bytes(base));
        report.row(if i == 0 {
            Row::at_least(&figure, value, baseline, ratio, 0.9, "")
        } else {
            Row::info(&figure, value, baseline, Some(ratio))
        });
    }
    let (defaults_rate, defaults_base, _, defaults) = of_variant(0);
    let n = defaults.len().max(1) as f64;
    let to_full = defaults
        .iter()
        .map(|t| t.to_full.as_secs_f64())
        .sum::<f64>()
        / n;
    let dd_time = RAW_SOURCE as f64 / defaults_base;
    report.row(Row::info(
        "2d hydration, enable to all copied, defaults",
        format!(
            "{} ({}/s)",
            secs_f(to_full),
            human_bytes(RAW_SOURCE as f64 / to_full)
        ),
        format!("{} (dd)", secs_f(dd_time)),
        Some(dd_time / to_full),
    ));
    report.row(Row::info(
        &format!("2e hydration rate, defaults, vs dd bs={KCOPYD_BLOCK}"),
        format!("{}/s", human_bytes(defaults_rate)),
        format!("{}/s (dd bs={KCOPYD_BLOCK})", human_bytes(small_rate)),
        Some(defaults_rate / small_rate),
    ));
    Ok(())
}

/// The order of figure 2's hydrations, as indices into its variants
/// (defaults, larger threshold and batch, 4 KiB regions): symmetric, so
/// that a drift of the host's speed over the figure favours neither region
/// size (in runs B to P, in a fixed order, the one of the two measured
/// last had the better ratio in 9 of 15 runs, one a tie). The defaults and
/// the 4 KiB regions run twice; their figures are means.
pub const F2_ORDER: [usize; 5] = [0, 2, 1, 2, 0];

/// dd's block size for the baselines, and kcopyd's sub-job size.
pub const DD_BLOCK: &str = "4M";
pub const KCOPYD_BLOCK: &str = "512K";

/// StorageClass parameters of a CreateVolume.
pub type Parameters<'a> = Vec<(&'a str, &'a str)>;

/// What figure 2 records of one clone's hydration.
pub struct HydrationTrace {
    total_bytes: u64,
    /// From CreateVolume's return (hydration enabled) to every region
    /// hydrated.
    to_full: Duration,
    /// To the admin API's phase `Complete` (switched to linear).
    to_complete: Duration,
    /// Bytes per second between 10% and 90% hydrated.
    middle_rate: f64,
    samples: usize,
    at_enable: u64,
}

impl HydrationTrace {
    fn describe(&self) -> String {
        format!(
            "{} MiB; {} MiB already hydrated at the first reading; all copied {} after \
             CreateVolume returned, Complete (linear) after {}; {}/s between 10% and 90% \
             ({} status readings)",
            self.total_bytes / MIB,
            self.at_enable / MIB,
            secs(self.to_full),
            secs(self.to_complete),
            human_bytes(self.middle_rate),
            self.samples
        )
    }
}

pub async fn hydrate_and_follow(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    source: &RawSource,
    label: &str,
    parameters: &[(&str, &str)],
) -> anyhow::Result<HydrationTrace> {
    // As before each dd run: nothing dirty left to write back meanwhile.
    blocking(|| {
        drop_caches();
        Ok(())
    })
    .await?;
    let clone = source
        .clone_volume(bench, csi, backend, &format!("f2-{label}"), parameters)
        .await?;
    let enabled = Instant::now();
    let name = format!("{DM_PREFIX}{}", clone.volume_id);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut region_bytes = 0;
    let mut total_regions = 0;
    let mut to_full = None;
    let to_complete;
    let mut last_phase_check = Instant::now();
    loop {
        let before = enabled.elapsed().as_secs_f64();
        let status = {
            let name = name.clone();
            blocking(move || try_clone_status(&name)).await?
        };
        let after = enabled.elapsed().as_secs_f64();
        match status {
            Some(status) => {
                region_bytes = status.region_sectors * 512;
                total_regions = status.total;
                samples.push(((before + after) / 2.0, status.hydrated));
                if status.hydrated == status.total && to_full.is_none() {
                    to_full = Some(Duration::from_secs_f64(after));
                }
            }
            None => {
                // Already linear: everything was copied by now.
                if to_full.is_none() {
                    to_full = Some(Duration::from_secs_f64(after));
                }
            }
        }
        if to_full.is_some() || last_phase_check.elapsed() >= Duration::from_secs(2) {
            last_phase_check = Instant::now();
            let hydration = csi.try_hydration_of(&clone.volume_id).await?;
            ensure!(
                hydration.phase != "Failed",
                "hydration of {} failed: {}",
                clone.volume_id,
                describe(&hydration)
            );
            if hydration.phase == "Complete" {
                to_complete = enabled.elapsed();
                break;
            }
        }
        ensure!(
            enabled.elapsed() < HYDRATION_LIMIT,
            "hydration of {} did not complete within {HYDRATION_LIMIT:?}",
            clone.volume_id
        );
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let to_full = to_full.unwrap_or(to_complete);
    ensure!(
        total_regions > 0,
        "no status reading of {} showed a clone target",
        clone.volume_id
    );
    let total = total_regions as f64;
    let t10 = crossing(&samples, 0.1 * total);
    let t90 = crossing(&samples, 0.9 * total);
    let middle_rate = match (t10, t90) {
        (Some(a), Some(b)) if b > a => 0.8 * total * region_bytes as f64 / (b - a),
        _ => bail!(
            "too few status readings of {} to place 10% and 90% ({} readings)",
            clone.volume_id,
            samples.len()
        ),
    };
    let trace = HydrationTrace {
        total_bytes: total_regions * region_bytes,
        to_full,
        to_complete,
        middle_rate,
        samples: samples.len(),
        at_enable: samples.first().map_or(0, |s| s.1) * region_bytes,
    };
    bench.step(&format!("f2 {label}: {}", trace.describe()));
    csi.delete_volume(&clone.volume_id)
        .await
        .rpc("DeleteVolume")?;
    Ok(trace)
}

/// When `samples` (time, hydrated regions) first reached `level`, linearly
/// interpolated between the two readings around it.
pub fn crossing(samples: &[(f64, u64)], level: f64) -> Option<f64> {
    let mut previous: Option<(f64, u64)> = None;
    for &(t, h) in samples {
        if h as f64 >= level {
            return Some(match previous {
                Some((t0, h0)) if (h as f64) > h0 as f64 => {
                    t0 + (t - t0) * (level - h0 as f64) / (h as f64 - h0 as f64)
                }
                _ => t,
            });
        }
        previous = Some((t, h));
    }
    None
}

// ---------------------------------------------------------------------------
// Figure 3: bytes copied for a file system 10% full.

pub async fn figure_3(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (source, mounted, _) =
        new_mounted_volume(bench, csi, backend, "f3-src", FIG3_VOLUME, Access::Ext4).await?;
    let target = mounted.target.clone();
    blocking(move || write_files(&target, FIG3_FILES, 300)).await?;
    let (fs_size, fs_used) = fs_usage(&mounted.target)?;
    bench.step(&format!(
        "f3: source {} holds {} MiB of files; its ext4 uses {} of {}",
        source.volume_id,
        FIG3_FILES * FILE_BYTES / MIB as usize,
        human_bytes(fs_used as f64),
        human_bytes(fs_size as f64)
    ));

    // One region at a time, and paused at once: the clone's trim is the
    // monitor's, in a round or two, and the hydration it then enables
    // stays paused, so that hardly anything is copied before the reading.
    let created = Instant::now();
    let clone = csi
        .create_volume(
            &bench.name("f3-clone"),
            FIG3_VOLUME,
            Access::Ext4,
            Some(Source::Volume(&source.volume_id)),
            &with_backend(backend, &ONE_REGION_AT_A_TIME),
        )
        .await
        .rpc("CreateVolume")?;
    csi.set_hydration(&clone.volume_id, Action::Pause, None, None)
        .await
        .rpc("SetHydration")?;
    let name = format!("{DM_PREFIX}{}", clone.volume_id);
    let at_create = {
        let name = name.clone();
        blocking(move || try_clone_status(&name))
            .await?
            .context("the new clone has no clone target")?
    };
    // The admin API says `Pending` until the monitor has trimmed the clone
    // and recorded its hydration as started; then it follows it (here:
    // Paused).
    let started = csi
        .try_wait_hydration(&clone.volume_id, START_LIMIT_F3, |h| h.phase != "Pending")
        .await?;
    ensure!(
        started.paused,
        "the clone is not paused: {}",
        describe(&started)
    );
    let waited = created.elapsed();
    let at_pause = {
        let name = name.clone();
        blocking(move || try_clone_status(&name))
            .await?
            .context("the new clone has no clone target")?
    };
    let region = at_pause.region_sectors * 512;
    let total_bytes = at_pause.total * region;
    let trimmed_bytes = at_pause.hydrated * region;
    let holes_bytes = at_create.hydrated * region;
    bench.step(&format!(
        "f3: clone {} paused; right after CreateVolume {} of {} were hydrated (the image's \
         holes skipped), {} once the monitor had trimmed it ({} after CreateVolume was \
         called: {}); region {} KiB",
        clone.volume_id,
        human_bytes(holes_bytes as f64),
        human_bytes(total_bytes as f64),
        human_bytes(trimmed_bytes as f64),
        secs(waited),
        describe(&started),
        region / KIB
    ));
    let defaults = RegionSize::from_bytes(region)
        .map(HydrationTunables::defaults_for)
        .map_err(|e| anyhow!("the clone's region of {region} bytes: {e}"))?;
    // The source would copy itself back (redirect cut) meanwhile: not
    // measured, so removed.
    csi.try_unpublish_unstage(&mounted).await?;
    csi.delete_volume(&source.volume_id)
        .await
        .rpc("DeleteVolume")?;

    let started = Instant::now();
    csi.set_hydration(
        &clone.volume_id,
        Action::Tune,
        Some(defaults.threshold),
        Some(defaults.batch_size),
    )
    .await
    .rpc("SetHydration")?;
    csi.set_hydration(&clone.volume_id, Action::Resume, None, None)
        .await
        .rpc("SetHydration")?;
    let done = csi
        .try_wait_complete(&clone.volume_id, HYDRATION_LIMIT)
        .await?;
    let copied = total_bytes - trimmed_bytes;
    let (allocated, allocated_note) = backend.allocation(bench, &clone.volume_id)?;
    bench.step(&format!(
        "f3: complete {} after resume ({}); {allocated}",
        secs(started.elapsed()),
        describe(&done),
    ));
    csi.delete_volume(&clone.volume_id)
        .await
        .rpc("DeleteVolume")?;

    report.note(format!(
        "3: {} ext4 volume with {} MiB of files; its file system reports {} used (files, \
         journal, inode tables, bitmaps); {} KiB regions; the clone had {} hydrated right \
         after CreateVolume (the image's holes), {} of {} once the monitor had trimmed it \
         and recorded its hydration as started ({} after the CreateVolume call; hydration \
         paused at once, threshold 1), so {} were copied; {allocated_note}",
        human_bytes(FIG3_VOLUME as f64),
        FIG3_FILES * FILE_BYTES / MIB as usize,
        human_bytes(fs_used as f64),
        region / KIB,
        human_bytes(holes_bytes as f64),
        human_bytes(trimmed_bytes as f64),
        human_bytes(total_bytes as f64),
        secs(waited),
        human_bytes(copied as f64),
    ));
    report.row(Row::at_most(
        "3a bytes copied / volume size, ext4 10% full",
        human_bytes(copied as f64),
        human_bytes(total_bytes as f64),
        copied as f64 / total_bytes as f64,
        0.15,
    ));
    report.row(Row::info(
        "3b bytes copied / file system used",
        human_bytes(copied as f64),
        format!("{} used", human_bytes(fs_used as f64)),
        Some(copied as f64 / fs_used as f64),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// Figure 4: random 4 KiB IOPS on a clone before its switch, vs linear.

pub async fn figure_4(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    source: &RawSource,
    report: &mut Report,
) -> anyhow::Result<()> {
    let clone = source
        .clone_volume(bench, csi, backend, "f4-clone", &[])
        .await?;
    csi.set_hydration(&clone.volume_id, Action::Pause, None, None)
        .await
        .rpc("SetHydration")?;
    let clone_mount = csi
        .try_stage_publish(&bench.mnt, &clone.volume_id, Access::Block, "f4-clone")
        .await?;
    let name = format!("{DM_PREFIX}{}", clone.volume_id);

    // Whole-region writes hydrate regions without copying: after this the
    // span is hydrated, so the clone target maps it to the destination.
    let target = clone_mount.target.clone();
    let started = Instant::now();
    blocking(move || fill_direct(&target, 0, IOPS_SPAN, 77, false)).await?;
    let status = {
        let name = name.clone();
        blocking(move || try_clone_status(&name)).await?
    }
    .context("the paused clone was switched to linear before the measurement")?;
    ensure!(
        status.hydrated < status.total,
        "the paused clone is fully hydrated: it could switch during the measurement"
    );
    // The baseline: a linear device of our own over the clone's destination
    // (its data file's loop device, or its LV), so both read and write the
    // very same blocks through the same device, the clone target or not.
    let destination = backend.destination(bench, &clone.volume_id)?;
    let linear = OwnDevice::linear(
        &format!("lcbench-{}-dest", std::process::id()),
        &destination,
        RAW_SOURCE,
    )?;
    bench.step(&format!(
        "f4: clone {} paused with {} of {} regions hydrated (the first {} MiB written in {}); \
         {} is linear over its destination {}",
        clone.volume_id,
        status.hydrated,
        status.total,
        IOPS_SPAN / MIB,
        secs(started.elapsed()),
        linear.path().display(),
        destination.display()
    ));

    let before = {
        let (c, p) = (clone_mount.target.clone(), linear.path().to_owned());
        blocking(move || interleaved_iops(&c, &p, IOPS_PAIRS)).await?
    };
    bench.step(&format!("f4: before the switch: {}", before.describe()));

    // Now let it finish and switch: the same comparison is a control.
    let started = Instant::now();
    csi.set_hydration(&clone.volume_id, Action::Resume, None, None)
        .await
        .rpc("SetHydration")?;
    csi.try_wait_complete(&clone.volume_id, HYDRATION_LIMIT)
        .await?;
    let table = try_dm_table(&name)?;
    ensure!(
        table.split_whitespace().nth(2) == Some("linear"),
        "{name} is not linear after Complete: {table}"
    );
    bench.step(&format!(
        "f4: clone complete and linear {} after resume",
        secs(started.elapsed())
    ));
    let after = {
        let (c, p) = (clone_mount.target.clone(), linear.path().to_owned());
        blocking(move || interleaved_iops(&c, &p, IOPS_PAIRS_AFTER)).await?
    };
    bench.step(&format!("f4: after the switch: {}", after.describe()));

    drop(linear);
    csi.try_unpublish_unstage(&clone_mount).await?;
    csi.delete_volume(&clone.volume_id)
        .await
        .rpc("DeleteVolume")?;

    report.note(format!(
        "4: queue depth 1, 4 KiB O_DIRECT at random offsets in the first {} MiB (hydrated), \
         in turns of {} operations on the clone and on a linear device over its destination \
         (which goes first alternates); ratio = median of the per-pair ratios [quartiles]; \
         before the switch, hydration paused ({} pairs of turns): {}; after the switch ({} \
         pairs; a control, both linear over the same {}): {}",
        IOPS_SPAN / MIB,
        IOPS_TURN_OPS,
        IOPS_PAIRS,
        before.describe(),
        IOPS_PAIRS_AFTER,
        backend.destination_kind(),
        after.describe()
    ));
    report.row(Row::at_least(
        "4a 4 KiB random read IOPS, clone table vs linear",
        format!("{:.0}", before.clone_read),
        format!("{:.0} (linear)", before.linear_read),
        before.read_ratio.median,
        0.9,
        "",
    ));
    report.row(Row::at_least(
        "4b 4 KiB random write IOPS, clone table vs linear",
        format!("{:.0}", before.clone_write),
        format!("{:.0} (linear)", before.linear_write),
        before.write_ratio.median,
        0.9,
        "",
    ));
    report.row(Row::info(
        "4c read IOPS after the switch vs linear (control)",
        format!("{:.0}", after.clone_read),
        format!("{:.0} (linear)", after.linear_read),
        Some(after.read_ratio.median),
    ));
    report.row(Row::info(
        "4d write IOPS after the switch vs linear (control)",
        format!("{:.0}", after.clone_write),
        format!("{:.0} (linear)", after.linear_write),
        Some(after.write_ratio.median),
    ));
    Ok(())
}

/// Median and quartiles of a set of ratios.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    q1: f64,
    median: f64,
    q3: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self {
            q1: percentile(&values, 0.25),
            median: percentile(&values, 0.5),
            q3: percentile(&values, 0.75),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} [{:.3}, {:.3}]", self.median, self.q1, self.q3)
    }
}

pub struct Iops {
    clone_read: f64,
    linear_read: f64,
    clone_write: f64,
    linear_write: f64,
    read_ratio: Spread,
    write_ratio: Spread,
}

impl Iops {
    fn describe(&self) -> String {
        format!(
            "read clone {:.0} / linear {:.0} IOPS, ratio {}; write clone {:.0} / linear {:.0} \
             IOPS, ratio {}",
            self.clone_read,
            self.linear_read,
            self.read_ratio,
            self.clone_write,
            self.linear_write,
            self.write_ratio
        )
    }
}

/// Random reads, then random writes, on both devices in turns of
/// [`IOPS_TURN_OPS`] operations, the first device alternating from pair to
/// pair: the host's speed drifts a lot under TCG (other VMs share it), and
/// turns of a few tens of milliseconds put both devices under nearly the
/// same conditions. A ratio per pair of turns, whose median is kept,
/// discards the pairs a host hiccup hit.
pub fn interleaved_iops(clone: &Path, linear: &Path, pairs: usize) -> anyhow::Result<Iops> {
    let clone_file = try_open_direct(clone, true)?;
    let linear_file = try_open_direct(linear, true)?;
    let mut rng = Rng::new(0x5eed);
    let mut buffer = Aligned::new(BLOCK);
    buffer.as_mut_slice().fill(0xA5);
    // [clone read, linear read, clone write, linear write]: seconds
    let mut totals = [0.0f64; 4];
    let mut read_ratios = Vec::new();
    let mut write_ratios = Vec::new();
    for write in [false, true] {
        let (c, l) = if write { (2, 3) } else { (0, 1) };
        for pair in 0..pairs {
            let turns = if pair % 2 == 0 {
                [(c, &clone_file), (l, &linear_file)]
            } else {
                [(l, &linear_file), (c, &clone_file)]
            };
            let mut took = [0.0f64; 4];
            for (slot, file) in turns {
                took[slot] = random_io(file, write, &mut rng, &mut buffer)?;
                totals[slot] += took[slot];
            }
            // Same number of operations on both: the IOPS ratio is the
            // inverse ratio of the times.
            let ratios = if write {
                &mut write_ratios
            } else {
                &mut read_ratios
            };
            ratios.push(took[l] / took[c]);
        }
    }
    let ops = (pairs as u64 * IOPS_TURN_OPS) as f64;
    Ok(Iops {
        clone_read: ops / totals[0],
        linear_read: ops / totals[1],
        clone_write: ops / totals[2],
        linear_write: ops / totals[3],
        read_ratio: Spread::of(read_ratios),
        write_ratio: Spread::of(write_ratios),
    })
}

/// Queue depth 1: [`IOPS_TURN_OPS`] 4 KiB O_DIRECT reads or writes at
/// random aligned offsets in the first [`IOPS_SPAN`] bytes. Returns the
/// seconds they took.
pub fn random_io(
    file: &File,
    write: bool,
    rng: &mut Rng,
    buffer: &mut Aligned,
) -> anyhow::Result<f64> {
    let blocks = IOPS_SPAN / BLOCK as u64;
    let started = Instant::now();
    for _ in 0..IOPS_TURN_OPS {
        let offset = rng.below(blocks) * BLOCK as u64;
        if write {
            file.write_all_at(buffer.as_slice(), offset)
                .with_context(|| format!("writing at {offset}"))?;
        } else {
            file.read_exact_at(buffer.as_mut_slice(), offset)
                .with_context(|| format!("reading at {offset}"))?;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// Figure 5: the I/O pause of the switch to linear under a writer.

pub async fn figure_5(
    bench: &mut Bench,
    csi: &mut Csi,
    backend: &dyn Backend,
    source: &RawSource,
    report: &mut Report,
) -> anyhow::Result<()> {
    let clone = source
        .clone_volume(bench, csi, backend, "f5-clone", &[])
        .await?;
    let mounted = csi
        .try_stage_publish(&bench.mnt, &clone.volume_id, Access::Block, "f5-clone")
        .await?;
    let name = format!("{DM_PREFIX}{}", clone.volume_id);
    // No udev in the VM: /dev/mapper holds device nodes, not links to
    // dm-N, so find the sysfs folder by device number.
    let suspended_flag = {
        let mapper = Path::new("/dev/mapper").join(&name);
        let rdev = std::fs::metadata(&mapper)
            .with_context(|| format!("stat {}", mapper.display()))?
            .rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        PathBuf::from(format!("/sys/dev/block/{major}:{minor}/dm/suspended"))
    };
    ensure!(
        suspended_flag.exists(),
        "{} does not exist",
        suspended_flag.display()
    );

    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let target = mounted.target.clone();
        std::thread::spawn(move || paced_writer(&target, origin, &stop))
    };
    let watcher = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || watch_suspended(&suspended_flag, origin, &stop))
    };
    let waited = csi
        .try_wait_complete(&clone.volume_id, HYDRATION_LIMIT)
        .await;
    let complete_seen = origin.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let writes = writer
        .join()
        .map_err(|_| anyhow!("the writer thread panicked"))??;
    let transitions = watcher
        .join()
        .map_err(|_| anyhow!("the watcher thread panicked"))??;
    waited?;
    let table = try_dm_table(&name)?;
    ensure!(
        table.split_whitespace().nth(2) == Some("linear"),
        "{name} is not linear after Complete: {table}"
    );
    csi.try_unpublish_unstage(&mounted).await?;
    csi.delete_volume(&clone.volume_id)
        .await
        .rpc("DeleteVolume")?;

    ensure!(!writes.is_empty(), "the writer recorded no write");
    // The suspended window: first 1 then back to 0.
    let window = suspended_window(&transitions);
    let (from, to, how) = match window {
        Some((a, b)) => (
            a,
            b,
            format!(
                "suspended from {a:.3} s to {b:.3} s ({:.1} ms)",
                (b - a) * 1000.0
            ),
        ),
        None => (
            complete_seen - 1.0,
            complete_seen,
            format!(
                "the suspended window was not caught (sysfs polled every ~1 ms); using the \
                 second before Complete was seen at {complete_seen:.3} s"
            ),
        ),
    };
    let near = |w: &Write4k| {
        w.start + w.latency >= from - AROUND_SWITCH.as_secs_f64()
            && w.start <= to + AROUND_SWITCH.as_secs_f64()
    };
    let mut away: Vec<f64> = writes
        .iter()
        .filter(|w| !near(w))
        .map(|w| w.latency)
        .collect();
    away.sort_by(f64::total_cmp);
    let median = percentile(&away, 0.5);
    let p99 = percentile(&away, 0.99);
    let max_away = away.last().copied().unwrap_or(0.0);
    let around = writes
        .iter()
        .filter(|w| near(w))
        .max_by(|a, b| a.latency.total_cmp(&b.latency))
        .copied();
    let overlapping = writes
        .iter()
        .filter(|w| w.start <= to && w.start + w.latency >= from)
        .map(|w| w.latency)
        .fold(0.0f64, f64::max);
    let around_max = around.map_or(0.0, |w| w.latency);
    let detail = format!(
        "{} writes over {:.1} s; {how}; away from the switch: median {}, p99 {}, max {}; \
         around it (±{} s): max {}{}; writes overlapping the suspended window: max {}",
        writes.len(),
        writes.last().map_or(0.0, |w| w.start),
        ms(median),
        ms(p99),
        ms(max_away),
        AROUND_SWITCH.as_secs(),
        ms(around_max),
        around.map_or(String::new(), |w| format!(
            " (issued at {:.3} s, {:+.0} ms from the suspend)",
            w.start,
            (w.start - from) * 1000.0
        )),
        ms(overlapping)
    );
    bench.step(&format!("f5: {detail}"));
    let tool = blocking(tool_start_cost).await?;
    report.note(format!(
        "5: paced writer (4 KiB O_DIRECT at random offsets, {} ms pause between writes) on a \
         1 GiB raw clone from CreateVolume until 1.5 s after Complete: {detail}. One \
         `dmsetup version` process takes {} here (mean of {TOOL_RUNS})",
        WRITER_PAUSE.as_millis(),
        ms(tool.as_secs_f64())
    ));
    report.row(Row::info(
        "5a write latency, typical (median / p99)",
        format!("{} / {}", ms(median), ms(p99)),
        "-".to_owned(),
        None,
    ));
    report.row(Row::info(
        "5b longest write around the switch",
        ms(around_max),
        format!("{} (median)", ms(median)),
        Some(around_max / median),
    ));
    if let Some((a, b)) = window {
        report.row(Row::info(
            "5c device suspended during the switch (sysfs)",
            ms(b - a),
            format!("{} (one dmsetup start)", ms(tool.as_secs_f64())),
            Some((b - a) / tool.as_secs_f64()),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub struct Write4k {
    /// Seconds since the origin.
    start: f64,
    latency: f64,
}

pub fn paced_writer(
    target: &Path,
    origin: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<Write4k>> {
    let file = try_open_direct(target, true)?;
    let size = (&file)
        .seek(SeekFrom::End(0))
        .context("seeking to the end of the device")?;
    let blocks = size / BLOCK as u64;
    let mut rng = Rng::new(0xf5);
    let mut buffer = Aligned::new(BLOCK);
    buffer.as_mut_slice().fill(0x5A);
    let mut writes = Vec::with_capacity(200_000);
    while !stop.load(Ordering::SeqCst) {
        let offset = rng.below(blocks) * BLOCK as u64;
        let start = Instant::now();
        file.write_all_at(buffer.as_slice(), offset)
            .with_context(|| format!("writing at {offset}"))?;
        let latency = start.elapsed().as_secs_f64();
        writes.push(Write4k {
            start: start.duration_since(origin).as_secs_f64(),
            latency,
        });
        std::thread::sleep(WRITER_PAUSE);
    }
    Ok(writes)
}

/// (seconds since origin, suspended) at each change of the sysfs flag.
pub fn watch_suspended(
    flag: &Path,
    origin: Instant,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<(f64, bool)>> {
    let mut changes = Vec::new();
    let mut last = None;
    let mut text = String::new();
    while !stop.load(Ordering::SeqCst) {
        text.clear();
        match File::open(flag).and_then(|mut f| f.read_to_string(&mut text)) {
            Ok(_) => {
                let now = text.trim() == "1";
                if last != Some(now) {
                    changes.push((origin.elapsed().as_secs_f64(), now));
                    last = Some(now);
                }
            }
            // The device may go away at the very end.
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(changes)
}

pub fn suspended_window(changes: &[(f64, bool)]) -> Option<(f64, f64)> {
    let start = changes.iter().position(|c| c.1)?;
    let end = changes[start..].iter().find(|c| !c.1)?;
    Some((changes[start].0, end.0))
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------
// The report.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Miss,
    Info,
}

#[derive(Debug, Clone)]
pub struct Row {
    figure: String,
    value: String,
    baseline: String,
    ratio: Option<f64>,
    target: String,
    verdict: Verdict,
}

impl Row {
    pub fn at_most(figure: &str, value: String, baseline: String, ratio: f64, max: f64) -> Self {
        Self {
            figure: figure.to_owned(),
            value,
            baseline,
            ratio: Some(ratio),
            target: format!("<= {max}"),
            verdict: if ratio <= max {
                Verdict::Pass
            } else {
                Verdict::Miss
            },
        }
    }

    pub fn at_least(
        figure: &str,
        value: String,
        baseline: String,
        ratio: f64,
        min: f64,
        unit: &str,
    ) -> Self {
        Self {
            figure: figure.to_owned(),
            value,
            baseline,
            ratio: Some(ratio),
            target: format!(">= {min}{}", if unit.is_empty() { "" } else { " " }) + unit,
            verdict: if ratio >= min {
                Verdict::Pass
            } else {
                Verdict::Miss
            },
        }
    }

    pub fn info(figure: &str, value: String, baseline: String, ratio: Option<f64>) -> Self {
        Self {
            figure: figure.to_owned(),
            value,
            baseline,
            ratio,
            target: "-".to_owned(),
            verdict: Verdict::Info,
        }
    }
}

/// The figures of a run, printed as they come and as one table at the
/// end.
pub struct Report {
    title: String,
    /// Put before every figure name, note and error from now on: which
    /// pool they are of ("LVM thick ").
    section: String,
    rows: Vec<Row>,
    notes: Vec<String>,
    pub errors: Vec<String>,
    /// How long each figure took (wall time, its baselines included).
    times: Vec<(String, Duration)>,
}

impl Default for Report {
    fn default() -> Self {
        Self::titled("liveclone benchmarks")
    }
}

impl Report {
    pub fn titled(title: &str) -> Self {
        Self {
            title: title.to_owned(),
            section: String::new(),
            rows: Vec::new(),
            notes: Vec::new(),
            errors: Vec::new(),
            times: Vec::new(),
        }
    }

    /// Names what follows (rows, notes, errors, times) with `prefix`.
    pub fn section(&mut self, prefix: &str) {
        prefix.clone_into(&mut self.section);
    }

    /// Records how long a figure took since `started`.
    pub fn took(&mut self, figure: &str, started: Instant) {
        let took = started.elapsed();
        say(&format!(
            "{}figure {figure} took {}",
            self.section,
            secs(took)
        ));
        self.times.push((format!("{}{figure}", self.section), took));
    }

    pub fn row(&mut self, mut row: Row) {
        row.figure.insert_str(0, &self.section);
        let verdict = match row.verdict {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::Info => "info",
        };
        say(&format!(
            "FIGURE {}: {} vs {} = {} (target {}) {verdict}",
            row.figure,
            row.value,
            row.baseline,
            row.ratio.map_or("-".to_owned(), |r| format!("{r:.3}")),
            row.target
        ));
        if row.verdict == Verdict::Miss {
            say(&format!(
                "!!!!!!!! MISS: {} is {} against a target of {} !!!!!!!!",
                row.figure,
                row.ratio.map_or("-".to_owned(), |r| format!("{r:.3}")),
                row.target
            ));
        }
        self.rows.push(row);
    }

    pub fn note(&mut self, note: String) {
        self.notes.push(format!("{}{note}", self.section));
    }

    pub fn outcome(&mut self, figure: &str, result: anyhow::Result<()>, bench: &Bench) {
        if let Err(e) = result {
            let message = format!("{}figure {figure}: {e:#}", self.section);
            say(&format!(
                "!!!!!!!! ERROR: {message}\nkernel state:\n{}\n--- last {LOG_TAIL} lines of the \
                 driver's log ---\n{}\n--- end of the driver's log ---",
                bench.kernel_state(),
                bench.log_tail(LOG_TAIL)
            ));
            self.errors.push(message);
        }
    }

    pub fn print(&self, elapsed: Duration) {
        let mut out = String::new();
        out.push_str(&format!(
            "\n==================== {} ({}, kernel {}, TCG; {:.0} s) \
             ====================\n\n",
            self.title,
            today(),
            kernel_release(),
            elapsed.as_secs_f64()
        ));
        out.push_str("| figure | value | baseline | ratio | target | result |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- |\n");
        // In figure order (figure 3 runs before 2: it needs no raw source).
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by(|a, b| a.figure.cmp(&b.figure));
        for row in rows {
            let verdict = match row.verdict {
                Verdict::Pass => "PASS",
                Verdict::Miss => "**MISS**",
                Verdict::Info => "info",
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {verdict} |\n",
                row.figure,
                row.value,
                row.baseline,
                row.ratio.map_or("-".to_owned(), |r| format!("{r:.3}")),
                row.target
            ));
        }
        out.push('\n');
        for note in &self.notes {
            out.push_str(&format!("- {note}\n"));
        }
        if !self.times.is_empty() {
            let times: Vec<String> = self
                .times
                .iter()
                .map(|(figure, took)| format!("{figure} {:.0} s", took.as_secs_f64()))
                .collect();
            out.push_str(&format!(
                "- wall time per figure (its baselines included): {}\n",
                times.join(", ")
            ));
        }
        let misses: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Miss)
            .map(|r| r.figure.as_str())
            .collect();
        if misses.is_empty() {
            out.push_str("\nEvery figure with a target met it.\n");
        } else {
            out.push_str(&format!(
                "\n!!!!!!!! {} figure(s) MISSED their target: {} !!!!!!!!\n",
                misses.len(),
                misses.join("; ")
            ));
        }
        for error in &self.errors {
            out.push_str(&format!("!!!!!!!! ERROR (not measured): {error}\n"));
        }
        out.push_str("==================== end of the benchmarks ====================\n");
        say(&out);
    }
}

// ---------------------------------------------------------------------------
// The bench: a work folder, a pool, the driver.

/// A work folder and pool for some figures. The driver logs at info level
/// (debug lines would weigh on what is measured).
pub fn bench(label: &str, pool: Pool) -> Bench {
    Bench::new(label, pool)
        .with_rust_log(INFO_LOG)
        .with_show_log_env("LIVECLONE_BENCH_SHOW_LOG")
}

/// Starts the bench's driver with its default options and `extra_args`.
pub async fn start_driver(bench: &mut Bench, extra_args: &[&str]) -> anyhow::Result<Csi> {
    let mut csi = bench.try_start_driver(extra_args).await?;
    // Figure 5 falls back on when `Complete` was seen: read it often.
    csi.poll = Duration::from_millis(250);
    Ok(csi)
}

// ---------------------------------------------------------------------------
// Devices and tools.

/// Runs a blocking job on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| anyhow!("blocking task failed: {e}"))?
}

/// dd of `bytes` in blocks of `block` (dd's syntax) with direct I/O on
/// both sides; wall time.
pub fn dd_copy(src: &Path, dst: &Path, bytes: u64, block: &str) -> anyhow::Result<Duration> {
    let block_bytes = match block.strip_suffix('M') {
        Some(m) => m.parse::<u64>()? * MIB,
        None => {
            block
                .strip_suffix('K')
                .context("dd block size")?
                .parse::<u64>()?
                * KIB
        }
    };
    let started = Instant::now();
    let output = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dst.display()))
        .args([
            format!("bs={block}"),
            format!("count={}", bytes / block_bytes),
            "iflag=direct".to_owned(),
            "oflag=direct".to_owned(),
            "status=none".to_owned(),
        ])
        .output()
        .context("running dd")?;
    let took = started.elapsed();
    ensure!(
        output.status.success(),
        "dd {} -> {} failed ({}): {}",
        src.display(),
        dst.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(took)
}

/// The machine, for the first line of a run.
pub fn machine() -> String {
    format!(
        "kernel {}, {} CPUs, {} MiB RAM, {}",
        kernel_release(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        memory_mib(),
        today()
    )
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

pub fn today() -> String {
    try_run("date", &["-u".as_ref(), "+%Y-%m-%d %H:%M UTC".as_ref()])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown date".to_owned())
}

// ---------------------------------------------------------------------------
// Data.

/// xorshift64*: cheap and good enough to pick offsets.
pub struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 4 MiB of pseudo-random bytes for `seed`.
pub fn base_chunk(seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(FILE_BYTES);
    while out.len() < FILE_BYTES {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out
}

/// Makes every 4 KiB block of `chunk` unique: its first 16 bytes become
/// (seed, global block number).
pub fn stamp(chunk: &mut [u8], seed: u64, first_block: u64) {
    for (i, block) in chunk.chunks_mut(BLOCK).enumerate() {
        block[..8].copy_from_slice(&seed.to_le_bytes());
        block[8..16].copy_from_slice(&(first_block + i as u64).to_le_bytes());
    }
}

/// Writes `len` bytes of data at `offset` with O_DIRECT in 4 MiB pieces,
/// then flushes. `create` makes (or truncates) a regular file first.
pub fn fill_direct(
    path: &Path,
    offset: u64,
    len: u64,
    seed: u64,
    create: bool,
) -> anyhow::Result<()> {
    if create {
        File::create(path).with_context(|| format!("creating {}", path.display()))?;
    }
    let file = try_open_direct(path, true)?;
    let base = base_chunk(seed);
    let mut buffer = Aligned::new(FILE_BYTES);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(FILE_BYTES as u64) as usize;
        let chunk = &mut buffer.as_mut_slice()[..n];
        chunk.copy_from_slice(&base[..n]);
        stamp(chunk, seed, (offset + done) / BLOCK as u64);
        file.write_all_at(chunk, offset + done)
            .with_context(|| format!("writing {} at {}", path.display(), offset + done))?;
        done += n as u64;
    }
    file.sync_all()
        .with_context(|| format!("flushing {}", path.display()))
}

pub fn file_content(seed: u64, index: usize) -> Vec<u8> {
    let mut data = base_chunk(seed);
    stamp(&mut data, seed, (index * FILE_BYTES / BLOCK) as u64);
    data
}

/// `count` files of 4 MiB, each with its own content, flushed.
pub fn write_files(dir: &Path, count: usize, seed: u64) -> anyhow::Result<()> {
    let folder = dir.join("data");
    std::fs::create_dir_all(&folder)?;
    let base = base_chunk(seed);
    for index in 0..count {
        let mut data = base.clone();
        stamp(&mut data, seed, (index * FILE_BYTES / BLOCK) as u64);
        let path = folder.join(format!("f{index:03}.bin"));
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&data)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    File::open(&folder)
        .and_then(|d| d.sync_all())
        .context("syncing the data folder")?;
    Ok(())
}

pub fn verify_file(dir: &Path, index: usize, seed: u64) -> anyhow::Result<()> {
    let path = dir.join("data").join(format!("f{index:03}.bin"));
    let got = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let want = file_content(seed, index);
    ensure!(
        got == want,
        "{} differs from what was written to the source (sha256 {} vs {})",
        path.display(),
        sha256_hex(&got),
        sha256_hex(&want)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Small helpers.

pub fn secs(d: Duration) -> String {
    secs_f(d.as_secs_f64())
}

pub fn secs_f(s: f64) -> String {
    format!("{s:.2} s")
}

pub fn ms(s: f64) -> String {
    format!("{:.1} ms", s * 1000.0)
}

pub fn human_bytes(bytes: f64) -> String {
    if bytes >= GIB as f64 {
        format!("{:.2} GiB", bytes / GIB as f64)
    } else if bytes >= MIB as f64 {
        format!("{:.1} MiB", bytes / MIB as f64)
    } else {
        format!("{:.0} KiB", bytes / KIB as f64)
    }
}

pub fn rate(bytes: u64, took: Duration) -> String {
    format!("{}/s", human_bytes(bytes as f64 / took.as_secs_f64()))
}
