//! LVM for the tests of the driver's LVM device classes (`real_lvm_driver`
//! in the VM, the guest phases of `vm_lvm_power_cut`): a volume group of
//! the test's own on two disks, LVM's reports as the tests read them, the
//! device-classes file, and volume contents whose every block says what it
//! is (so that a wrong block read back can be named, not only found
//! different).
//!
//! The test runs its own LVM commands with the same kind of settings the
//! driver passes (no udev daemon in the VM, no dmeventd, no lvmpolld), and
//! a filter that keeps LVM's scans off the driver's `liveclone-` devices.
//! Tools run with argument vectors, never through a shell.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _};
use sha2::{Digest, Sha256};

use super::{all_dm_devices, hex, open_direct, say, Aligned, LoopDevice, BLOCK, GIB, MIB};

/// The volume group the tests make (and remove).
pub const VG: &str = "lcvg";
/// The thin pool of the `thin` class.
pub const THIN_POOL: &str = "pool0";
/// Serials of the virtio disks `make test-vm` attaches for the VG (the
/// guest sees `/dev/disk/by-id/virtio-<serial>`).
pub const DISK_SERIALS: [&str; 2] = ["lc-lvm-a", "lc-lvm-b"];
/// Size of each loop-device stand-in when the disks are absent (sparse
/// files in TMPDIR).
pub const FALLBACK_DISK_BYTES: u64 = 3 * GIB;
/// The tag on every LV the driver makes.
pub const TAG: &str = "liveclone";
pub const CLASS_TAG: &str = "liveclone.io/class=";
pub const KIND_TAG: &str = "liveclone.io/kind=";

/// `--config` for the test's own LVM commands: no udev (LVM makes the
/// device nodes itself and does not wait for udev), no dmeventd, no
/// lvmpolld, scan `/dev` rather than udev's database, never open a
/// suspended device or one of the driver's.
pub const TEST_LVM_CONFIG: &str = concat!(
    "activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 1 monitoring = 0 } ",
    "devices { obtain_device_list_from_udev = 0 ignore_suspended_devices = 1 ",
    "global_filter = [ \"r|^/dev/mapper/liveclone-|\" ] } ",
    "global { use_lvmpolld = 0 }",
);

// ---------------------------------------------------------------------------
// Running LVM.

/// `lvm <subcommand> --config ... <args>`; its stdout, or an error with
/// its stderr.
pub fn try_lvm(subcommand: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("lvm")
        .arg(subcommand)
        .arg("--config")
        .arg(TEST_LVM_CONFIG)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env("LC_ALL", "C")
        .output()
        .context("cannot run lvm")?;
    ensure!(
        output.status.success(),
        "lvm {subcommand} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn lvm(subcommand: &str, args: &[&str]) -> String {
    try_lvm(subcommand, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// One LV as `lvs --reportformat json` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    pub name: String,
    pub tags: Vec<String>,
    pub size_bytes: u64,
    /// `linear`, `thin`, `thin-pool`, ...
    pub segtype: String,
    /// The thin pool of a thin LV, else empty.
    pub pool: String,
    /// The origin of a thin snapshot, else empty.
    pub origin: String,
    pub active: bool,
    /// `(major, minor)` of an active LV's device.
    pub device: Option<(u32, u32)>,
    /// Thin pools: data and metadata use, in percent.
    pub data_percent: Option<f64>,
    pub metadata_percent: Option<f64>,
}

impl Lv {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// The driver's LVs carry `liveclone`.
    pub fn is_ours(&self) -> bool {
        self.has_tag(TAG)
    }

    /// The value of the `liveclone.io/class=` tag.
    pub fn class(&self) -> Option<&str> {
        self.tags.iter().find_map(|t| t.strip_prefix(CLASS_TAG))
    }

    /// The value of the `liveclone.io/kind=` tag.
    pub fn kind(&self) -> Option<&str> {
        self.tags.iter().find_map(|t| t.strip_prefix(KIND_TAG))
    }

    pub fn describe(&self) -> String {
        format!(
            "{} [{}] {} bytes {}{}{}{}",
            self.name,
            self.tags.join(","),
            self.size_bytes,
            self.segtype,
            if self.pool.is_empty() {
                String::new()
            } else {
                format!(" in {}", self.pool)
            },
            if self.origin.is_empty() {
                String::new()
            } else {
                format!(" of {}", self.origin)
            },
            if self.active { " active" } else { " inactive" }
        )
    }
}

const LV_FIELDS: &str = "lv_name,lv_tags,lv_size,segtype,pool_lv,origin,lv_active,\
                         lv_kernel_major,lv_kernel_minor,data_percent,metadata_percent";

fn json_str<'a>(entry: &'a serde_json::Value, key: &str) -> &'a str {
    entry.get(key).and_then(|v| v.as_str()).unwrap_or("")
}

fn parse_lvs(json: &str) -> anyhow::Result<Vec<Lv>> {
    let parsed: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("lvs printed no JSON:\n{json}"))?;
    let entries = parsed["report"][0]["lv"]
        .as_array()
        .with_context(|| format!("no report.lv in:\n{json}"))?;
    let mut out = Vec::new();
    for entry in entries {
        let number = |key: &str| -> Option<f64> { json_str(entry, key).trim().parse().ok() };
        let major = json_str(entry, "lv_kernel_major").trim().parse::<i64>();
        let minor = json_str(entry, "lv_kernel_minor").trim().parse::<i64>();
        let device = match (major, minor) {
            (Ok(major), Ok(minor)) if major >= 0 && minor >= 0 => Some((
                u32::try_from(major).context("major")?,
                u32::try_from(minor).context("minor")?,
            )),
            _ => None,
        };
        let tags = json_str(entry, "lv_tags");
        out.push(Lv {
            name: json_str(entry, "lv_name").to_owned(),
            tags: tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            size_bytes: json_str(entry, "lv_size")
                .trim()
                .parse()
                .with_context(|| format!("odd lv_size in {entry}"))?,
            segtype: json_str(entry, "segtype").to_owned(),
            pool: json_str(entry, "pool_lv").to_owned(),
            origin: json_str(entry, "origin").to_owned(),
            active: json_str(entry, "lv_active") == "active",
            device,
            data_percent: number("data_percent"),
            metadata_percent: number("metadata_percent"),
        });
    }
    Ok(out)
}

/// Every (visible) LV of `vg`.
pub fn try_lvs(vg: &str) -> anyhow::Result<Vec<Lv>> {
    let json = try_lvm(
        "lvs",
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            LV_FIELDS,
            vg,
        ],
    )?;
    parse_lvs(&json)
}

pub fn lvs(vg: &str) -> Vec<Lv> {
    try_lvs(vg).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The driver's LVs (tagged `liveclone`), by name.
pub fn our_lvs(vg: &str) -> BTreeMap<String, Lv> {
    lvs(vg)
        .into_iter()
        .filter(Lv::is_ours)
        .map(|lv| (lv.name.clone(), lv))
        .collect()
}

/// One LV of `vg`, which must exist.
pub fn lv(vg: &str, name: &str) -> Lv {
    lvs(vg)
        .into_iter()
        .find(|lv| lv.name == name)
        .unwrap_or_else(|| panic!("{vg} has no LV {name}:\n{}", lvs_summary(vg)))
}

/// For messages: one line per LV of the VG.
pub fn lvs_summary(vg: &str) -> String {
    match try_lvs(vg) {
        Ok(list) => list
            .iter()
            .map(|lv| format!("  {}", lv.describe()))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("  (lvs failed: {e:#})"),
    }
}

/// `(size, free)` of a VG, in bytes.
pub fn vg_size_free(vg: &str) -> (u64, u64) {
    let json = lvm(
        "vgs",
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_name,vg_size,vg_free",
            vg,
        ],
    );
    let parsed: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("vgs printed no JSON ({e}):\n{json}"));
    let entry = &parsed["report"][0]["vg"][0];
    let number = |key: &str| -> u64 {
        json_str(entry, key)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("odd {key} in {json}"))
    };
    (number("vg_size"), number("vg_free"))
}

/// The driver's LVs of one volume: its data (`<id>_g<n>`) and metadata
/// (`<id>_meta`) LVs.
pub fn volume_lvs<'a>(lvs: &'a BTreeMap<String, Lv>, volume_id: &str) -> Vec<&'a Lv> {
    let data = format!("{volume_id}_g");
    let metadata = format!("{volume_id}_meta");
    lvs.values()
        .filter(|lv| lv.name.starts_with(&data) || lv.name == metadata)
        .collect()
}

/// The one data LV of a volume, checked: tagged with its class and kind.
pub fn data_lv<'a>(lvs: &'a BTreeMap<String, Lv>, volume_id: &str, class: &str) -> &'a Lv {
    let prefix = format!("{volume_id}_g");
    let data: Vec<&Lv> = lvs
        .values()
        .filter(|lv| {
            lv.name
                .strip_prefix(&prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    let listing = || {
        lvs.values()
            .map(|lv| format!("  {}", lv.describe()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        data.len() == 1,
        "volume {volume_id} has {} data LVs (want exactly 1):\n{}",
        data.len(),
        listing()
    );
    let lv = data[0];
    assert!(
        lv.class() == Some(class) && lv.kind() == Some("data"),
        "the data LV of {volume_id} is not tagged class {class}, kind data: {}",
        lv.describe()
    );
    lv
}

/// Device-mapper devices of the VG's LVs (`<vg>-<lv>`, dashes doubled)
/// that belong to none of `keep` (LV names, e.g. the thin pools, whose
/// hidden parts are `<pool>_tdata`, `<pool>_tmeta`, `<pool>-tpool`).
pub fn lv_dm_devices_except(vg: &str, keep: &[&str]) -> BTreeSet<String> {
    let prefix = format!("{}-", vg.replace('-', "--"));
    all_dm_devices()
        .into_iter()
        .filter(|name| {
            let Some(lv) = name.strip_prefix(&prefix) else {
                return false;
            };
            !keep.iter().any(|k| {
                let k = k.replace('-', "--");
                lv == k
                    || lv.starts_with(&format!("{k}_t"))
                    || lv.starts_with(&format!("{k}-tpool"))
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The volume group.

/// The disks (or loop devices) under the test's VG.
pub enum Disks {
    /// The virtio disks `make test-vm` attaches.
    Virtio(Vec<PathBuf>),
    /// Loop devices over sparse files in TMPDIR (detached, and the files
    /// removed, when dropped).
    Loops {
        loops: Vec<LoopDevice>,
        _files: tempfile::TempDir,
    },
}

impl Disks {
    /// The virtio disks when both exist.
    pub fn virtio() -> Option<Self> {
        let paths: Vec<PathBuf> = DISK_SERIALS
            .iter()
            .map(|serial| Path::new("/dev/disk/by-id").join(format!("virtio-{serial}")))
            .collect();
        if !paths.iter().all(|p| p.exists()) {
            return None;
        }
        Some(Self::Virtio(
            paths
                .into_iter()
                .map(|p| p.canonicalize().unwrap_or(p))
                .collect(),
        ))
    }

    /// The virtio disks, else loop devices over sparse files.
    pub fn find_or_make() -> Self {
        if let Some(disks) = Self::virtio() {
            return disks;
        }
        let files = tempfile::Builder::new()
            .prefix("lc-lvm-disks-")
            .tempdir()
            .expect("a folder for the loop disks under TMPDIR");
        let mut loops = Vec::new();
        for serial in DISK_SERIALS {
            let path = files.path().join(format!("{serial}.img"));
            File::create(&path)
                .and_then(|f| f.set_len(FALLBACK_DISK_BYTES))
                .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            loops.push(
                LoopDevice::attach_direct(&path, false)
                    .unwrap_or_else(|e| panic!("attaching {}: {e:#}", path.display())),
            );
        }
        Self::Loops {
            loops,
            _files: files,
        }
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            Disks::Virtio(paths) => paths.clone(),
            Disks::Loops { loops, .. } => loops.iter().map(|l| l.path.clone()).collect(),
        }
    }

    pub fn describe(&self) -> String {
        let paths: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        match self {
            Disks::Virtio(_) => format!(
                "virtio disks {} ({})",
                DISK_SERIALS.join(", "),
                paths.join(", ")
            ),
            Disks::Loops { .. } => format!(
                "loop devices over sparse files in TMPDIR ({}; the virtio disks {} are absent)",
                paths.join(", "),
                DISK_SERIALS.join(", ")
            ),
        }
    }
}

/// A thin pool to make in the VG: name and size.
#[derive(Debug, Clone, Copy)]
pub struct ThinPoolSpec<'a> {
    pub name: &'a str,
    pub bytes: u64,
}

/// The test's VG over the disks, with its thin pools. Removed with
/// everything in it when dropped (declare it before the driver's bench,
/// so that the bench, which removes the driver's devices, drops first).
pub struct TestVg {
    pub name: &'static str,
    pub disks: Disks,
    pub pools: Vec<String>,
    removed: bool,
}

impl TestVg {
    /// Wipes the disks and makes the VG and its thin pools (zeroing new
    /// blocks, `-Zy`). A VG of the name left by an earlier run is removed
    /// first.
    pub fn create(disks: Disks, pools: &[ThinPoolSpec<'_>]) -> anyhow::Result<Self> {
        let started = Instant::now();
        // The thin target is a module; LVM would load it too, but a
        // missing one is clearer here.
        let _ = Command::new("modprobe").arg("dm-thin-pool").output();
        if try_lvm("vgs", &[VG]).is_ok() {
            say(&format!(
                "an earlier run left volume group {VG}; removing it"
            ));
            let _ = try_lvm("vgchange", &["-an", VG]);
            try_lvm("vgremove", &["-ff", "-y", VG])?;
        }
        let paths = disks.paths();
        let devices: Vec<&str> = paths
            .iter()
            .map(|p| p.to_str().expect("device paths are UTF-8"))
            .collect();
        for device in &devices {
            let output = Command::new("wipefs")
                .args(["-a", device])
                .output()
                .context("running wipefs")?;
            ensure!(
                output.status.success(),
                "wipefs -a {device}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let mut args = vec!["-ff", "-y"];
        args.extend(devices.iter().copied());
        try_lvm("pvcreate", &args)?;
        let mut args = vec![VG];
        args.extend(devices.iter().copied());
        try_lvm("vgcreate", &args)?;
        let vg = Self {
            name: VG,
            disks,
            pools: pools.iter().map(|p| p.name.to_owned()).collect(),
            removed: false,
        };
        for pool in pools {
            let size = format!("{}b", pool.bytes);
            try_lvm(
                "lvcreate",
                &[
                    "--yes",
                    "--type",
                    "thin-pool",
                    "-Zy",
                    "-L",
                    &size,
                    "-n",
                    pool.name,
                    VG,
                ],
            )?;
        }
        let (size, free) = vg_size_free(VG);
        say(&format!(
            "volume group {VG} on {} made in {:.1} s: {size} bytes, {free} free; thin pools \
             {:?}",
            vg.disks.describe(),
            started.elapsed().as_secs_f64(),
            vg.pools
        ));
        Ok(vg)
    }

    /// The VG an earlier boot made on these disks (removed when dropped,
    /// like one made here).
    pub fn existing(disks: Disks, pools: &[&str]) -> Self {
        Self {
            name: VG,
            disks,
            pools: pools.iter().map(|p| (*p).to_owned()).collect(),
            removed: false,
        }
    }

    /// The pool names and `extra` LVs, for [`lv_dm_devices_except`].
    pub fn stray_dm_devices(&self, extra: &[&str]) -> BTreeSet<String> {
        let mut keep: Vec<&str> = self.pools.iter().map(String::as_str).collect();
        keep.extend_from_slice(extra);
        lv_dm_devices_except(self.name, &keep)
    }

    /// After everything was deleted: no LV of the driver's, no device of
    /// an LV other than the pools'.
    pub fn assert_no_driver_lvs(&self) {
        let ours = our_lvs(self.name);
        let stray = self.stray_dm_devices(&[]);
        assert!(
            ours.is_empty() && stray.is_empty(),
            "left in {} after everything was deleted: LVs {:?}, LV devices {stray:?}\n{}",
            self.name,
            ours.keys().collect::<Vec<_>>(),
            lvs_summary(self.name)
        );
    }

    /// Removes the VG and its PVs and wipes the disks.
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.removed = true;
        self.try_remove()
    }

    fn try_remove(&self) -> anyhow::Result<()> {
        let _ = try_lvm("vgchange", &["-an", self.name]);
        try_lvm("vgremove", &["-ff", "-y", self.name])?;
        let paths = self.disks.paths();
        let devices: Vec<&str> = paths.iter().filter_map(|p| p.to_str()).collect();
        let mut args = vec!["-ff", "-y"];
        args.extend(devices.iter().copied());
        try_lvm("pvremove", &args)?;
        for device in devices {
            let _ = Command::new("wipefs").args(["-a", device]).output();
        }
        Ok(())
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        match self.try_remove() {
            Ok(()) => say(&format!("cleanup: volume group {} removed", self.name)),
            Err(e) => say(&format!(
                "cleanup: could not remove volume group {}: {e:#}\n{}",
                self.name,
                lvs_summary(self.name)
            )),
        }
    }
}

/// The device-classes file: `(name, thin pool or None, ratio)` per LVM
/// class, all in [`VG`].
pub fn device_classes_yaml(classes: &[(&str, Option<&str>, Option<f64>)]) -> String {
    let mut out = String::from("deviceClasses:\n");
    for (name, pool, ratio) in classes {
        out.push_str(&format!(
            "  - name: {name}\n    lvm:\n      volumeGroup: {VG}\n"
        ));
        if let Some(pool) = pool {
            out.push_str(&format!("      thinPool: {pool}\n"));
        }
        if let Some(ratio) = ratio {
            out.push_str(&format!("      overprovisionRatio: {ratio:.1}\n"));
        }
    }
    out
}

/// StorageClass parameters choosing a class, plus `extra`.
pub fn class_params<'a>(class: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut out = Vec::with_capacity(extra.len() + 1);
    if class != "file" {
        out.push(("liveclone.io/deviceClass", class));
    }
    out.extend_from_slice(extra);
    out
}

// ---------------------------------------------------------------------------
// Contents: every 4 KiB block is a 32-byte record repeated, naming its
// seed (which volume and write wave) and its index.

const MAGIC: u64 = 0x4c43_4c56_4d42_4c00; // "LCLVMBL\0"
const RECORD: usize = 32;

/// Block `index` of the content `seed`.
pub fn make_block(seed: u64, index: u64, out: &mut [u8]) {
    let mix = (seed ^ (index << 24)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut record = [0u8; RECORD];
    record[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    record[8..16].copy_from_slice(&seed.to_le_bytes());
    record[16..24].copy_from_slice(&index.to_le_bytes());
    record[24..32].copy_from_slice(&mix.to_le_bytes());
    out[..RECORD].copy_from_slice(&record);
    // Doubling copies: few calls even unoptimised.
    let mut filled = RECORD;
    while filled < out.len() {
        let n = filled.min(out.len() - filled);
        out.copy_within(0..n, filled);
        filled += n;
    }
}

/// What a block read back is, in words.
pub fn name_block(block: &[u8]) -> String {
    if block.iter().all(|&b| b == 0) {
        return "zeros".to_owned();
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&block[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    if word(0) != MAGIC {
        return format!("unknown bytes (sha256 {})", super::sha256_hex(block));
    }
    let (seed, index) = (word(8), word(16));
    let mut whole = vec![0u8; block.len()];
    make_block(seed, index, &mut whole);
    let whole = if whole == block { "whole" } else { "mixed" };
    format!("block {index} of content {seed} ({whole})")
}

/// What a device must hold: ranges of blocks, each from a content seed
/// (later ranges win where they overlap). Blocks in no range are not
/// checked (a new thick LV may hold anything there), so sources are
/// written whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub bytes: u64,
    /// `(first block, blocks, seed)`.
    pub ranges: Vec<(u64, u64, u64)>,
}

impl Content {
    /// Every block from `seed`.
    pub fn whole(bytes: u64, seed: u64) -> Self {
        Self {
            bytes,
            ranges: vec![(0, bytes / BLOCK as u64, seed)],
        }
    }

    pub fn blocks(&self) -> u64 {
        self.bytes / BLOCK as u64
    }

    /// The same with `blocks` blocks from `first` overwritten by `seed`.
    pub fn with(&self, first: u64, blocks: u64, seed: u64) -> Self {
        let mut out = self.clone();
        out.ranges.push((first, blocks, seed));
        out
    }

    /// Grown to `bytes`; the new tail is not checked until written.
    pub fn grown(&self, bytes: u64) -> Self {
        let mut out = self.clone();
        out.bytes = bytes;
        out
    }

    /// The seed of a block, `None` where nothing was written.
    pub fn seed_of(&self, index: u64) -> Option<u64> {
        self.ranges
            .iter()
            .rev()
            .find(|(first, blocks, _)| index >= *first && index < first + blocks)
            .map(|(_, _, seed)| *seed)
    }

    /// Writes the ranges with O_DIRECT, 1 MiB at a time, then fsync.
    pub fn write_ranges(&self, device: &Path, ranges: &[(u64, u64, u64)]) {
        let file = open_direct(device, true);
        let per_chunk = MIB / BLOCK as u64;
        let mut buffer = Aligned::new(MIB as usize);
        for (first, blocks, seed) in ranges {
            let end = first + blocks;
            let mut at = *first;
            while at < end {
                let n = per_chunk.min(end - at);
                let slice = &mut buffer.as_mut_slice()[..n as usize * BLOCK];
                for (k, block) in slice.chunks_exact_mut(BLOCK).enumerate() {
                    make_block(*seed, at + k as u64, block);
                }
                file.write_all_at(slice, at * BLOCK as u64)
                    .unwrap_or_else(|e| panic!("writing {} at block {at}: {e}", device.display()));
                at += n;
            }
        }
        file.sync_all()
            .unwrap_or_else(|e| panic!("fsync of {}: {e}", device.display()));
    }

    /// Writes the whole content.
    pub fn write(&self, device: &Path) {
        let started = Instant::now();
        self.write_ranges(device, &self.ranges);
        say(&format!(
            "  wrote {} ({} bytes) in {:.1} s",
            device.display(),
            self.bytes,
            started.elapsed().as_secs_f64()
        ));
    }

    /// Reads the whole device with O_DIRECT and checks every block that
    /// has a seed; the SHA-256 of all its bytes.
    pub fn try_verify(&self, device: &Path, what: &str) -> anyhow::Result<String> {
        let started = Instant::now();
        let file = open_direct(device, false);
        let size = super::device_bytes(device);
        ensure!(
            size == self.bytes,
            "{what}: {} has {size} bytes, want {}",
            device.display(),
            self.bytes
        );
        let mut buffer = Aligned::new(MIB as usize);
        let mut want = vec![0u8; BLOCK];
        let mut hasher = Sha256::new();
        let mut problems = Vec::new();
        let mut checked = 0u64;
        let mut at = 0u64;
        while at < size {
            let len = MIB.min(size - at) as usize;
            let slice = &mut buffer.as_mut_slice()[..len];
            file.read_exact_at(slice, at)
                .with_context(|| format!("{what}: reading {} at {at}", device.display()))?;
            hasher.update(&slice[..]);
            for (k, got) in slice.chunks_exact(BLOCK).enumerate() {
                let index = at / BLOCK as u64 + k as u64;
                let Some(seed) = self.seed_of(index) else {
                    continue;
                };
                checked += 1;
                make_block(seed, index, &mut want);
                if got != want.as_slice() && problems.len() < 20 {
                    problems.push(format!(
                        "block {index}: want block {index} of content {seed}, found {}",
                        name_block(got)
                    ));
                }
            }
            at += len as u64;
        }
        if !problems.is_empty() {
            bail!(
                "{what}: {} differs from what it must hold:\n  {}",
                device.display(),
                problems.join("\n  ")
            );
        }
        let sum = hex(&hasher.finalize());
        say(&format!(
            "  {what}: {checked} of {} blocks checked, right; sha256 {sum} ({:.1} s)",
            self.blocks(),
            started.elapsed().as_secs_f64()
        ));
        Ok(sum)
    }

    pub fn verify(&self, device: &Path, what: &str) -> String {
        self.try_verify(device, what)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}
