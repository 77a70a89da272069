#![cfg(feature = "real-kernel")]
//! The benchmarks of `bench_driver` for the LVM device classes (`make
//! bench`, `make bench-lvm`): the same figures, measured against
//! baselines of the same run on the same volume group, once for a thick
//! class (linear LVs) and once for a thin class (thin LVs in a thin pool),
//! printed as `LVM thick ...` and `LVM thin ...` rows.
//!
//! The volume group goes on the virtio disks with serials `lc-bench-a` and
//! `lc-bench-b` (`vmtest test --disk lc-bench-a=FILE ...`; sparse files on
//! the host), else on loop devices over sparse files in TMPDIR. It holds a
//! thin pool for the `thin` class and room for the thick class's 64 GiB
//! volumes of figure 1 (a source, the new LV a redirect cut gives it, and
//! the clone). One driver serves both classes, started with
//! `--device-classes`.
//!
//! 1. CreateVolume (clone of a volume) + NodeStage + NodePublish of an ext4
//!    clone, for a 1 GiB and a 64 GiB source holding the same files;
//!    baseline: `dd` of 1 GiB between two LVs of the class.
//! 2. Background hydration throughput of a raw block clone of 1 GiB of
//!    data; baseline: an O_DIRECT `dd` between two LVs of the class (a new
//!    destination LV each time, as a clone's destination is new).
//! 3. Bytes copied by hydration for an ext4 volume 10% full. LVM cannot
//!    tell a source's holes, so only the trim skips anything: the free
//!    space of the file system.
//! 4. 4 KiB random IOPS through the dm-clone table against a linear table
//!    over the same destination LV, interleaved; again after the switch.
//! 5. Write latency of a paced O_DIRECT writer while a clone completes and
//!    switches to linear.
//!
//! `LIVECLONE_BENCH_FIGURES=2,4` runs only some figures,
//! `LIVECLONE_BENCH_CLASSES=thin` only one class, and
//! `LIVECLONE_BENCH_SHOW_LOG=1` prints the driver's log at the end (pass
//! them to the VM with `vmtest test --env`). Ignored by default and named
//! `bench_*`, so neither `cargo test` nor `make test-vm` runs it.

#[path = "common/bench.rs"]
mod bench;
mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bench::{
    bench, blocking, clone_figure, copy_once, dd_copy, figure_3, fill_direct, human_bytes, machine,
    ms, raw_source_figures, secs, start_driver, Backend, BaselineMaker, CopyBaseline, Figures,
    Report, Row, DD_BLOCK, RAW_SOURCE,
};
use common::lvm::{
    class_params, device_classes_yaml, try_lvm, try_lvs, Disks, TestVg, ThinPoolSpec, THIN_POOL, VG,
};
use common::{drop_caches, require_real_kernel, say, Bench, Csi, LoopDevice, Pool, GIB};

/// The virtio disks of the volume group (`/dev/disk/by-id/virtio-<serial>`).
const DISK_SERIALS: [&str; 2] = ["lc-bench-a", "lc-bench-b"];
/// Each loop-device stand-in when no disk is there (sparse files in
/// TMPDIR; only what the figures write takes space).
const FALLBACK_DISK_BYTES: u64 = 128 * GIB;
/// The thin pool: large enough for what the figures write at once (figure
/// 2 holds a source, a clone and two dd LVs of 1 GiB); small enough that
/// the host's sparse disk file stays small, since the pool's allocator
/// moves on through the pool as volumes come and go.
const THIN_POOL_BYTES: u64 = 12 * GIB;
/// Figure 1 provisions three 64 GiB thin LVs (the source, its snapshot,
/// the clone) and their metadata LVs in the 12 GiB pool.
const OVERPROVISION_RATIO: f64 = 24.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with make bench or make bench-lvm"]
async fn bench_lvm() {
    require_real_kernel();
    let started = Instant::now();
    let mut report = Report::titled("liveclone LVM benchmarks");
    say(&format!("liveclone LVM benchmarks: {}", machine()));
    let wanted = Figures::from_env();
    let classes = classes_from_env();

    // Declared before the bench: the bench (the driver and its devices)
    // goes first, then the volume group with whatever is left in it.
    let vg = TestVg::create(
        bench_disks(),
        &[ThinPoolSpec {
            name: THIN_POOL,
            bytes: THIN_POOL_BYTES,
        }],
    )
    .unwrap_or_else(|e| panic!("making the volume group: {e:#}"));
    let mut bench = bench("lvm", Pool::Ext4);
    let classes_file = bench.root.join("device-classes.yaml");
    std::fs::write(
        &classes_file,
        device_classes_yaml(&[
            (THICK.class, None, None),
            (THIN.class, Some(THIN_POOL), Some(OVERPROVISION_RATIO)),
        ]),
    )
    .expect("writing the device classes");
    let classes_arg = classes_file.to_str().expect("UTF-8 path");
    bench.step(&format!(
        "volume group {} on {}; thin pool {THIN_POOL} of {} (overprovisioning up to x{})",
        vg.name,
        disk_names(&vg.disks),
        human_bytes(THIN_POOL_BYTES as f64),
        OVERPROVISION_RATIO
    ));

    match start_driver(&mut bench, &["--device-classes", classes_arg]).await {
        Ok(mut csi) => {
            for class in classes {
                run_class(&mut bench, &mut csi, class, &mut report, &wanted).await;
            }
        }
        Err(e) => report.outcome("all (driver)", Err(e), &bench),
    }

    report.print(started.elapsed());
    drop(bench);
    drop(vg);
    assert!(
        report.errors.is_empty(),
        "{} figure(s) could not be measured: {:?}",
        report.errors.len(),
        report.errors
    );
}

/// Every figure of one class, in the order of `bench_driver`.
async fn run_class(
    bench: &mut Bench,
    csi: &mut Csi,
    class: &LvmClass,
    report: &mut Report,
    wanted: &Figures,
) {
    report.section(class.label);
    bench.label = format!("lvm-{}", class.class);
    if wanted.has(1) {
        let started = Instant::now();
        let result = figure_1(bench, csi, class, report).await;
        report.took("1", started);
        report.outcome("1", result, bench);
    }
    if wanted.has(3) {
        let started = Instant::now();
        let result = figure_3(bench, csi, class, report).await;
        report.took("3", started);
        report.outcome("3", result, bench);
    }
    if wanted.has(2) || wanted.has(4) || wanted.has(5) {
        let result = raw_source_figures(bench, csi, class, report, wanted).await;
        report.outcome("2, 4, 5 (the raw source)", result, bench);
    }
    bench.step(&format!("after the {} class: {}", class.class, vg_usage()));
}

/// `LIVECLONE_BENCH_CLASSES`, e.g. `thin` (default: both).
fn classes_from_env() -> Vec<&'static LvmClass> {
    let Ok(list) = std::env::var("LIVECLONE_BENCH_CLASSES") else {
        return vec![&THICK, &THIN];
    };
    let classes: Vec<&'static LvmClass> = [&THICK, &THIN]
        .into_iter()
        .filter(|c| list.split([',', ' ']).any(|name| name.trim() == c.class))
        .collect();
    assert!(
        !classes.is_empty(),
        "LIVECLONE_BENCH_CLASSES={list:?} names neither thick nor thin"
    );
    say(&format!(
        "only the classes {:?} (LIVECLONE_BENCH_CLASSES)",
        classes.iter().map(|c| c.class).collect::<Vec<_>>()
    ));
    classes
}

/// The virtio disks that are there, else loop devices over sparse files.
fn bench_disks() -> Disks {
    let present: Vec<PathBuf> = DISK_SERIALS
        .iter()
        .map(|serial| Path::new("/dev/disk/by-id").join(format!("virtio-{serial}")))
        .filter(|path| path.exists())
        .map(|path| path.canonicalize().unwrap_or(path))
        .collect();
    if !present.is_empty() {
        return Disks::Virtio(present);
    }
    let files = tempfile::Builder::new()
        .prefix("lc-bench-disks-")
        .tempdir()
        .expect("a folder for the loop disks under TMPDIR");
    let loops = DISK_SERIALS
        .iter()
        .map(|serial| {
            let path = files.path().join(format!("{serial}.img"));
            File::create(&path)
                .and_then(|f| f.set_len(FALLBACK_DISK_BYTES))
                .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            LoopDevice::attach_direct(&path, false)
                .unwrap_or_else(|e| panic!("attaching {}: {e:#}", path.display()))
        })
        .collect();
    Disks::Loops {
        loops,
        _files: files,
    }
}

fn disk_names(disks: &Disks) -> String {
    let paths: Vec<String> = disks
        .paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    match disks {
        Disks::Virtio(_) => format!("the virtio disks {}", paths.join(", ")),
        Disks::Loops { .. } => format!(
            "loop devices over sparse files of {} in TMPDIR ({}; no virtio disk {})",
            human_bytes(FALLBACK_DISK_BYTES as f64),
            paths.join(", "),
            DISK_SERIALS.join(" or ")
        ),
    }
}

/// For the steps: the VG's size and free space, the thin pool's use.
fn vg_usage() -> String {
    let vg = try_lvm(
        "vgs",
        &[
            "--noheadings",
            "--units",
            "g",
            "-o",
            "vg_size,vg_free,lv_count",
            VG,
        ],
    )
    .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
    .unwrap_or_else(|e| format!("(vgs failed: {e:#})"));
    let pool = try_lvs(VG)
        .ok()
        .and_then(|lvs| lvs.into_iter().find(|lv| lv.name == THIN_POOL))
        .and_then(|lv| lv.data_percent)
        .map_or("unknown".to_owned(), |p| format!("{p:.1}%"));
    format!("VG size, free, LVs: {vg}; thin pool data {pool}")
}

// ---------------------------------------------------------------------------
// The two classes.

/// An LVM device class of the driver's, as the figures use it.
struct LvmClass {
    class: &'static str,
    /// Before every figure name and note.
    label: &'static str,
    /// The thin pool of a thin class.
    thin_pool: Option<&'static str>,
}

const THICK: LvmClass = LvmClass {
    class: "thick",
    label: "LVM thick ",
    thin_pool: None,
};

const THIN: LvmClass = LvmClass {
    class: "thin",
    label: "LVM thin ",
    thin_pool: Some(THIN_POOL),
};

impl LvmClass {
    /// The data LV of a volume (`<volume-id>_g<generation>`): its name,
    /// size, and for a thin LV the share of it allocated in the pool.
    fn data_lv(volume_id: &str) -> anyhow::Result<common::lvm::Lv> {
        let prefix = format!("{volume_id}_g");
        let mut found: Vec<common::lvm::Lv> = try_lvs(VG)?
            .into_iter()
            .filter(|lv| {
                lv.name
                    .strip_prefix(&prefix)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            n => bail!("volume {volume_id} has {n} data LVs in {VG}, want 1"),
        }
    }
}

impl Backend for LvmClass {
    fn parameters(&self) -> Vec<(&'static str, &'static str)> {
        class_params(self.class, &[])
    }

    fn copy_baseline(&self, _bench: &Bench) -> BaselineMaker {
        let thin_pool = self.thin_pool;
        Box::new(move || Ok(Box::new(LvCopy::new(thin_pool)?) as Box<dyn CopyBaseline>))
    }

    fn destination(&self, _bench: &Bench, volume_id: &str) -> anyhow::Result<PathBuf> {
        let lv = Self::data_lv(volume_id)?;
        let path = lv_device(&lv.name);
        anyhow::ensure!(
            path.exists(),
            "the data LV {} of {volume_id} has no device {}",
            lv.name,
            path.display()
        );
        Ok(path)
    }

    fn destination_kind(&self) -> &'static str {
        "LV"
    }

    fn allocation(&self, _bench: &Bench, volume_id: &str) -> anyhow::Result<(String, String)> {
        let lv = Self::data_lv(volume_id)?;
        let size = human_bytes(lv.size_bytes as f64);
        if self.thin_pool.is_none() {
            let phrase = format!(
                "the destination is a thick LV: all of its {size} is allocated, whatever was \
                 copied"
            );
            return Ok((phrase.clone(), phrase));
        }
        let percent = lv
            .data_percent
            .with_context(|| format!("lvs reports no data_percent for {}", lv.name))?;
        let allocated = human_bytes(lv.size_bytes as f64 * percent / 100.0);
        Ok((
            format!("the destination thin LV has {allocated} of {size} allocated in the pool"),
            format!(
                "the destination thin LV has {allocated} of {size} allocated in the pool after \
                 completion (lvs data_percent {percent:.2}%: copies plus what the trim mount \
                 wrote)"
            ),
        ))
    }
}

/// The device of an LV of [`VG`]: device-mapper names it `<vg>-<lv>` with
/// each dash doubled.
fn lv_device(lv: &str) -> PathBuf {
    Path::new("/dev/mapper").join(format!(
        "{}-{}",
        VG.replace('-', "--"),
        lv.replace('-', "--")
    ))
}

/// The LVs of the dd baseline; untagged, so the driver's classes ignore
/// them.
const DD_SOURCE_LV: &str = "bench_dd_src";
const DD_DESTINATION_LV: &str = "bench_dd_dst";

/// The dd baseline on LVM: from an LV of the class holding
/// [`RAW_SOURCE`] bytes of data to a new LV of the class each time (a
/// linear LV, or a thin LV in the class's pool, whose chunks the copy
/// provisions as a clone's hydration does), with direct I/O.
struct LvCopy {
    thin_pool: Option<&'static str>,
    source: PathBuf,
}

impl LvCopy {
    fn new(thin_pool: Option<&'static str>) -> anyhow::Result<Self> {
        create_lv(DD_SOURCE_LV, thin_pool)?;
        let source = lv_device(DD_SOURCE_LV);
        fill_direct(&source, 0, RAW_SOURCE, 43, false)?;
        Ok(Self { thin_pool, source })
    }
}

/// A new LV of [`RAW_SOURCE`] bytes, thick or thin.
fn create_lv(name: &str, thin_pool: Option<&str>) -> anyhow::Result<()> {
    let size = format!("{RAW_SOURCE}b");
    match thin_pool {
        None => try_lvm(
            "lvcreate",
            &["--yes", "-Zy", "-Wy", "-n", name, "-L", &size, VG],
        )?,
        Some(pool) => try_lvm(
            "lvcreate",
            &["--yes", "-n", name, "--thinpool", pool, "-V", &size, VG],
        )?,
    };
    Ok(())
}

fn remove_lv(name: &str) -> anyhow::Result<()> {
    try_lvm("lvremove", &["--yes", &format!("{VG}/{name}")]).map(drop)
}

impl CopyBaseline for LvCopy {
    fn short(&self) -> String {
        match self.thin_pool {
            None => "dd between two thick LVs".to_owned(),
            Some(pool) => format!("dd between two thin LVs of {pool}"),
        }
    }

    fn what(&self) -> String {
        format!(
            "{} of the VG (a new destination LV each time; direct I/O, ",
            self.short()
        )
    }

    fn copy(&mut self, block: &str) -> anyhow::Result<Duration> {
        create_lv(DD_DESTINATION_LV, self.thin_pool)?;
        drop_caches();
        let took = dd_copy(
            &self.source,
            &lv_device(DD_DESTINATION_LV),
            RAW_SOURCE,
            block,
        );
        let removed = remove_lv(DD_DESTINATION_LV);
        let took = took?;
        removed?;
        Ok(took)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        remove_lv(DD_SOURCE_LV)
    }
}

impl Drop for LvCopy {
    fn drop(&mut self) {
        // After finish, or a failure: whatever is still there.
        for name in [DD_DESTINATION_LV, DD_SOURCE_LV] {
            if try_lvs(VG).is_ok_and(|lvs| lvs.iter().any(|lv| lv.name == name)) {
                if let Err(e) = remove_lv(name) {
                    say(&format!("cleanup: could not remove {VG}/{name}: {e:#}"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Figure 1: clone of a volume to a published, mounted clone.

async fn figure_1(
    bench: &mut Bench,
    csi: &mut Csi,
    class: &LvmClass,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Baseline: dd of 1 GiB from an LV of data to a new LV of the class,
    // twice; the faster one is the baseline, as in bench_driver.
    let baseline = blocking(class.copy_baseline(bench)).await?;
    let (baseline, first) = copy_once(baseline, DD_BLOCK).await?;
    let (mut baseline, second) = copy_once(baseline, DD_BLOCK).await?;
    baseline.finish()?;
    bench.step(&format!(
        "dd baseline, 1 GiB: {}, {}",
        secs(first),
        secs(second)
    ));
    let note = format!(
        "1: {}bs={DD_BLOCK}, iflag=direct, oflag=direct), 1 GiB, twice: {}, {}; baseline = \
         the faster",
        baseline.what(),
        secs(first),
        secs(second)
    );
    drop(baseline);
    let lvm_run = blocking(lvm_run_cost).await?;
    bench.step(&format!(
        "one `lvm lvs {VG}` process: {} (mean of {LVM_RUNS})",
        ms(lvm_run.as_secs_f64())
    ));
    let clone_time = clone_figure(bench, csi, class, report, first.min(second), note).await?;
    // What the driver's LVM commands cost: each is a process that scans
    // the disks and reads the VG's metadata, and a clone runs tens of them.
    report.row(Row::info(
        "1d one LVM command (lvm lvs of the VG)",
        ms(lvm_run.as_secs_f64()),
        format!("{clone_time:.2} s (1 GiB clone to mounted)"),
        Some(clone_time / lvm_run.as_secs_f64()),
    ));
    Ok(())
}

/// How many times figure 1 runs `lvm lvs` to price an LVM command.
const LVM_RUNS: u32 = 5;

/// Mean wall time of `lvm lvs <vg>`, with the driver's kind of settings.
fn lvm_run_cost() -> anyhow::Result<Duration> {
    let started = Instant::now();
    for _ in 0..LVM_RUNS {
        try_lvm("lvs", &[VG])?;
    }
    Ok(started.elapsed() / LVM_RUNS)
}
