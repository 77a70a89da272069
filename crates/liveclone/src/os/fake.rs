//! An in-memory simulator of the OS layer, for tests of the domain layer
//! without root, loop devices or device-mapper.
//!
//! [`FakeOs`] implements all four OS traits over one shared state, and
//! [`FakeOs::os`] bundles it as an [`Os`]. Files are real (tests create
//! them in a temporary directory, and loop devices record their device and
//! inode); devices, tables, mounts and file-system signatures live in
//! memory. The simulation keeps the kernel behaviour that domain bugs trip
//! over, and tightens it where the kernel would accept a mistake silently:
//!
//! * Tables are checked like a table load: every device must exist and be
//!   large enough, a clone's metadata and destination writable. Devices
//!   given as paths come back as `major:minor` from [`DeviceMapper::table`].
//! * dm-clone: hydration counts whole regions, starts disabled with
//!   `no_hydration`, and runs only while enabled, with a non-zero threshold,
//!   `rw` metadata and the device not suspended. Tunables revert to the
//!   table's core arguments (else the kernel's 1 and 1) on every load.
//!   Completion and metadata mode changes fire an event; nothing else does.
//! * Metadata: the first 4 KiB of the metadata file are read at every clone
//!   load. All zero means "format": a marker is written there and the
//!   hydrated count starts at 0. Otherwise the count resumes from what this
//!   simulator remembers for that file's inode, and a different region size
//!   or length fails as the kernel's EINVAL does. So a test can prove that
//!   metadata is zeroed once and never again.
//! * Busy rules: a device-mapper device with openers (a mounted file
//!   system, a table stacked on it, or [`FakeOs::set_open_count`]) cannot be
//!   removed; a loop device used by a loaded table or a mount cannot be
//!   detached. The second is stricter than Linux, which answers such a
//!   detach with success and detaches later, when the last user closes
//!   (`LO_FLAGS_AUTOCLEAR`): a test that passes here detaches in an order
//!   that is also right on a real kernel.
//! * File-system signatures follow the data: a clone shows its source's
//!   file system, a reflinked copy its original's, and xfs refuses to mount
//!   a second device with the same UUID until the UUID is regenerated.
//! * [`FakeOs::hazards`] lists what the kernel would allow but that loses
//!   data: a clone replaced before it was fully hydrated or with bad
//!   metadata, metadata reused for another clone, undersized metadata.
//!
//! Every trait call is logged (see [`FakeOs::calls`]) and can be made to
//! fail once with [`FakeOs::fail_next`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::dm::{
    CloneFeatures, CloneMessage, CloneStatus, CloneStatusLine, CloneStatusReport, CloneTarget,
    DeviceMapper, DeviceRef, DmInfo, DmName, LinearTarget, MetadataMode, RegionSize, Sectors,
    SuspendFlush, Table, TableLine, Target, KERNEL_DEFAULT_HYDRATION_BATCH_SIZE,
    KERNEL_DEFAULT_HYDRATION_THRESHOLD, METADATA_BLOCK_SECTORS, METADATA_MAX_SECTORS, SECTOR_BYTES,
};
use super::fs::{Filesystems, FsType, FsUsage, MountInfo};
use super::kernel::Kernel;
use super::loopdev::{LoopDevice, LoopDevices, LoopOptions};
use super::{Os, OsError, OsErrorKind, OsResult};

/// The loop driver's fixed major number.
pub const LOOP_MAJOR: u32 = 7;
/// The major number the simulator gives device-mapper devices (the kernel
/// allocates one dynamically; 253 or 254 in practice).
pub const DM_MAJOR: u32 = 253;
/// What dm-clone reports from [`Kernel::ensure_dm_clone`] unless told otherwise.
pub const DM_CLONE_VERSION: &str = "1.0.0";

/// The first metadata block, where dm-clone looks for its superblock.
const METADATA_BLOCK_BYTES: usize = 4096;
/// Written over an all-zero first block when a clone table is first loaded,
/// as the kernel formats it. Any non-zero content would do for the zero
/// check; a recognisable one tells "formatted by us" from "garbage".
const SUPERBLOCK_MARKER: &[u8] = b"liveclone FakeOs dm-clone superblock\n";
/// Below this the simulator refuses a metadata device outright: a
/// superblock and the space maps need a few blocks.
const MIN_METADATA_BYTES: u64 = 4 * METADATA_BLOCK_BYTES as u64;
/// The field notes' safe floor is `regions / 4 + 1 MiB`; less is recorded
/// as a hazard since the real kernel can crash rather than fail.
const METADATA_FLOOR_FIXED_BYTES: u64 = 1 << 20;
/// Used metadata blocks grow by about one per this many regions.
const REGIONS_PER_METADATA_BLOCK: u64 = 32_576;
/// devtmpfs, as `/proc/self/mountinfo` shows it for a bind mount of a
/// device node.
const DEVTMPFS_MAJOR_MINOR: (u32, u32) = (0, 5);
/// Stacked tables are followed at most this deep when looking for data.
const MAX_STACK_DEPTH: usize = 8;
const GIB: u64 = 1 << 30;
/// [`Filesystems::usage`] for a path on no simulated mount.
const DEFAULT_HOST_USAGE: FsUsage = FsUsage {
    total_bytes: 100 * GIB,
    available_bytes: 60 * GIB,
    used_bytes: 40 * GIB,
    total_inodes: 6_553_600,
    free_inodes: 6_000_000,
    used_inodes: 553_600,
};

/// The simulated OS. Cloning gives another handle on the same state.
#[derive(Clone)]
pub struct FakeOs {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every device-mapper change, for [`DeviceMapper::wait_event`].
    changed: Condvar,
}

/// A file by identity, which survives renames (not deletion and reuse of
/// the inode number; the metadata zero check covers that case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of_loop(info: &LoopDevice) -> Self {
        FileId {
            dev: info.backing_dev,
            ino: info.backing_inode,
        }
    }

    fn of_metadata(metadata: &std::fs::Metadata) -> Self {
        FileId {
            dev: metadata.dev(),
            ino: metadata.ino(),
        }
    }
}

/// A block device of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DevId {
    Loop(u32),
    /// By minor number.
    Dm(u32),
}

#[derive(Debug, Clone, Copy)]
struct Resolved {
    id: DevId,
    major: u32,
    minor: u32,
    size_bytes: u64,
    read_only: bool,
}

impl Resolved {
    fn sectors(&self) -> Sectors {
        Sectors(self.size_bytes / SECTOR_BYTES)
    }
}

struct FakeLoop {
    info: LoopDevice,
    /// Held open like the kernel holds the backing file: reads and writes
    /// reach the same inode after a rename.
    file: File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimMetadataMode {
    ReadWrite,
    ReadOnly,
    Fail,
}

/// The in-kernel state of one loaded clone target.
#[derive(Debug, Clone)]
struct CloneSim {
    start: Sectors,
    length: Sectors,
    region_size: RegionSize,
    total_regions: u64,
    metadata: FileId,
    metadata_bytes: u64,
    destination: Option<FileId>,
    no_discard_passdown: bool,
    hydration_enabled: bool,
    threshold: u32,
    batch_size: u32,
    mode: SimMetadataMode,
}

/// A table after its (simulated) constructors ran.
#[derive(Debug, Clone)]
struct Loaded {
    table: Table,
    /// Every device the table holds open.
    refs: Vec<DevId>,
    clone: Option<CloneSim>,
}

struct FakeDm {
    minor: u32,
    live: Option<Loaded>,
    inactive: Option<Loaded>,
    suspended: bool,
    /// Openers set by [`FakeOs::set_open_count`], on top of mounts and
    /// stacked tables.
    extra_openers: u32,
    event_nr: u32,
}

/// What the simulator remembers of one formatted metadata file.
#[derive(Debug, Clone)]
struct MetadataRecord {
    region_size: RegionSize,
    length: Sectors,
    hydrated: u64,
    /// The data the metadata was formatted for, to spot reuse.
    destination: Option<FileId>,
    source: Option<FileId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FsSignature {
    fs: String,
    uuid: u64,
}

struct FakeMount {
    info: MountInfo,
    /// The device whose file system is mounted; `None` for a bind mount of
    /// a device node or of a host path.
    device: Option<DevId>,
}

struct State {
    calls: Vec<String>,
    failures: Vec<(String, OsErrorKind)>,
    loops: BTreeMap<u32, FakeLoop>,
    devices: BTreeMap<String, FakeDm>,
    next_dm_minor: u32,
    metadata: HashMap<FileId, MetadataRecord>,
    signatures: HashMap<FileId, FsSignature>,
    next_uuid: u64,
    /// In mount order; the last one at a path is the top one.
    mounts: Vec<FakeMount>,
    frozen: BTreeSet<PathBuf>,
    trim_bytes: u64,
    trim_discard_percent: u8,
    reflink_supported: bool,
    dm_clone_error: Option<(OsErrorKind, String)>,
    /// dm-mod's `kcopyd_subjob_size_kb` (the kernel's default is 512).
    kcopyd_subjob_kib: u32,
    usage_overrides: BTreeMap<PathBuf, FsUsage>,
    hazards: Vec<String>,
}

impl Default for FakeOs {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for FakeOs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeOs")
    }
}

impl FakeOs {
    /// An empty system: no loops, no devices, no mounts; reflink supported,
    /// dm-clone available, trims discard nothing.
    pub fn new() -> Self {
        FakeOs {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    calls: Vec::new(),
                    failures: Vec::new(),
                    loops: BTreeMap::new(),
                    devices: BTreeMap::new(),
                    next_dm_minor: 0,
                    metadata: HashMap::new(),
                    signatures: HashMap::new(),
                    next_uuid: 1,
                    mounts: Vec::new(),
                    frozen: BTreeSet::new(),
                    trim_bytes: 0,
                    trim_discard_percent: 0,
                    reflink_supported: true,
                    dm_clone_error: None,
                    kcopyd_subjob_kib: 512,
                    usage_overrides: BTreeMap::new(),
                    hazards: Vec::new(),
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// The OS handle for the domain layer, every service backed by this
    /// simulator.
    pub fn os(&self) -> Os {
        Os {
            dm: Arc::new(self.clone()),
            loops: Arc::new(self.clone()),
            fs: Arc::new(self.clone()),
            kernel: Arc::new(self.clone()),
        }
    }

    /// Every trait call so far, in order, failed ones included, as
    /// `<service>.<method> <arguments>`: `dm.create liveclone-x clone+linear`,
    /// `dm.load liveclone-x linear`, `dm.suspend liveclone-x flush`,
    /// `dm.message liveclone-x enable_hydration`, `loop.attach /pool/f`,
    /// `fs.trim /mnt`, `fs.flush /dev/mapper/liveclone-x`,
    /// `kernel.ensure_dm_clone`. Table calls name the target types in order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Forgets the calls so far, to assert on what comes next.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Makes the next call of `op` fail with `kind` (once; repeat to fail
    /// several). `op` is a trait method name (`"load"`, `"attach"`), or the
    /// service-qualified name from [`Self::calls`] (`"dm.load"`), which
    /// is needed for `list`, a method of both the dm and the loop services.
    pub fn fail_next(&self, op: &str, kind: OsErrorKind) {
        self.lock().failures.push((op.to_owned(), kind));
    }

    /// Background hydration of `regions` more regions of the clone `name`,
    /// if it would run now: the live table has a clone target, hydration is
    /// enabled with a non-zero threshold, the metadata is `rw` and the
    /// device is not suspended. Returns the hydrated count afterwards.
    /// Reaching the total fires the completion event.
    pub fn hydrate(&self, name: &DmName, regions: u64) -> OsResult<u64> {
        let mut state = self.lock();
        let operation = format!("FakeOs::hydrate {name}");
        let sim = state.live_clone(&operation, name)?;
        let dm = state.device(&operation, name)?;
        let running = sim.hydration_enabled
            && sim.threshold > 0
            && sim.mode == SimMetadataMode::ReadWrite
            && !dm.suspended;
        let hydrated = state.add_hydrated(name, if running { regions } else { 0 });
        self.shared.changed.notify_all();
        Ok(hydrated)
    }

    /// Puts the clone's metadata in fail mode (status `Fail`), as after a
    /// failed metadata write; fires an event.
    pub fn set_metadata_failed(&self, name: &DmName) -> OsResult<()> {
        self.set_metadata_mode(name, SimMetadataMode::Fail)
    }

    /// Switches the clone's metadata to read-only (status `ro`); fires an
    /// event.
    pub fn set_metadata_read_only(&self, name: &DmName) -> OsResult<()> {
        self.set_metadata_mode(name, SimMetadataMode::ReadOnly)
    }

    /// Sets how many openers the device has besides mounts and stacked
    /// tables (a process holding it open).
    pub fn set_open_count(&self, name: &DmName, openers: u32) -> OsResult<()> {
        let mut state = self.lock();
        let operation = format!("FakeOs::set_open_count {name}");
        state.device_mut(&operation, name)?.extra_openers = openers;
        Ok(())
    }

    /// What [`Filesystems::trim`] does: returns `trimmed_bytes`, and when
    /// the mounted device is a clone with `rw` metadata, marks
    /// `discard_percent` % (rounded down) of its unhydrated regions
    /// hydrated, as discards of free space do. Values above 100 count as 100.
    pub fn set_trim(&self, trimmed_bytes: u64, discard_percent: u8) {
        let mut state = self.lock();
        state.trim_bytes = trimmed_bytes;
        state.trim_discard_percent = discard_percent.min(100);
    }

    /// Whether [`Filesystems::reflink`] works (a real copy) or answers
    /// `Unsupported`, as on a file system without FICLONE.
    pub fn set_reflink_supported(&self, supported: bool) {
        self.lock().reflink_supported = supported;
    }

    /// Makes [`Kernel::ensure_dm_clone`] fail with `kind` and `detail`
    /// (`None`: dm-clone is available).
    pub fn set_dm_clone_error(&self, error: Option<(OsErrorKind, String)>) {
        self.lock().dm_clone_error = error;
    }

    /// Fixes [`Filesystems::usage`] for `path` and everything under it.
    pub fn set_usage(&self, path: &Path, usage: FsUsage) {
        self.lock()
            .usage_overrides
            .insert(path.to_path_buf(), usage);
    }

    /// What the kernel would have allowed but that loses or mixes up data,
    /// in order. Domain tests should usually assert this is empty.
    pub fn hazards(&self) -> Vec<String> {
        self.lock().hazards.clone()
    }

    fn set_metadata_mode(&self, name: &DmName, mode: SimMetadataMode) -> OsResult<()> {
        let mut state = self.lock();
        let operation = format!("FakeOs::set_metadata_mode {name}");
        state.live_clone(&operation, name)?;
        let dm = state.device_mut(&operation, name)?;
        if let Some(sim) = dm.live.as_mut().and_then(|live| live.clone.as_mut()) {
            if sim.mode != mode {
                sim.mode = mode;
                dm.event_nr = dm.event_nr.wrapping_add(1);
            }
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The state, recovered if a panicking test thread poisoned the lock:
    /// every mutation leaves it consistent before anything can panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn failed(operation: &str, detail: impl Into<String>) -> OsError {
    OsError::new(OsErrorKind::Failed, operation, detail)
}

fn not_found(operation: &str, detail: impl Into<String>) -> OsError {
    OsError::new(OsErrorKind::NotFound, operation, detail)
}

fn busy(operation: &str, detail: impl Into<String>) -> OsError {
    OsError::new(OsErrorKind::Busy, operation, detail)
}

/// `clone+linear`: the target types of a table, in order.
fn target_types(table: &Table) -> String {
    table
        .lines()
        .iter()
        .map(|line| line.target.type_name())
        .collect::<Vec<_>>()
        .join("+")
}

/// N of `/dev/loopN`.
fn loop_number(device: &Path) -> Option<u32> {
    let digits = device.to_str()?.strip_prefix("/dev/loop")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// glibc's `major`/`minor` of a `dev_t`.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x00ff);
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

/// Reads up to the first metadata block; a short file reads as zeros past
/// its end, like the rest of a sparse file.
fn read_first_block(file: &File) -> std::io::Result<[u8; METADATA_BLOCK_BYTES]> {
    let mut block = [0u8; METADATA_BLOCK_BYTES];
    let mut filled = 0;
    while filled < block.len() {
        let read = file.read_at(&mut block[filled..], filled as u64)?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    Ok(block)
}

impl State {
    /// Logs a call and consumes an injected failure for it, if any.
    /// Returns the call's description, the `operation` of its errors.
    fn begin(&mut self, op: &str, args: std::fmt::Arguments<'_>) -> OsResult<String> {
        let args = args.to_string();
        let call = if args.is_empty() {
            op.to_owned()
        } else {
            format!("{op} {args}")
        };
        self.calls.push(call.clone());
        let method = op.split_once('.').map_or(op, |(_, method)| method);
        if let Some(index) = self
            .failures
            .iter()
            .position(|(name, _)| name == op || name == method)
        {
            let (_, kind) = self.failures.remove(index);
            return Err(OsError::new(
                kind,
                call,
                "injected failure (FakeOs::fail_next)",
            ));
        }
        Ok(call)
    }

    fn device(&self, operation: &str, name: &DmName) -> OsResult<&FakeDm> {
        self.devices
            .get(name.as_str())
            .ok_or_else(|| not_found(operation, format!("no device-mapper device {name}")))
    }

    fn device_mut(&mut self, operation: &str, name: &DmName) -> OsResult<&mut FakeDm> {
        self.devices
            .get_mut(name.as_str())
            .ok_or_else(|| not_found(operation, format!("no device-mapper device {name}")))
    }

    /// A copy of the live clone target's state.
    fn live_clone(&self, operation: &str, name: &DmName) -> OsResult<CloneSim> {
        let dm = self.device(operation, name)?;
        let live = dm
            .live
            .as_ref()
            .ok_or_else(|| failed(operation, format!("{name} has no live table")))?;
        live.clone.clone().ok_or_else(|| {
            failed(
                operation,
                format!("the live table of {name} has no clone target"),
            )
        })
    }

    fn dm_by_minor(&self, minor: u32) -> Option<(&String, &FakeDm)> {
        self.devices.iter().find(|(_, dm)| dm.minor == minor)
    }

    /// The name and simulated clone target of the device-mapper device
    /// `minor`, when its live table is a clone.
    fn live_clone_by_minor(&self, minor: u32) -> Option<(DmName, CloneSim)> {
        self.dm_by_minor(minor).and_then(|(name, dm)| {
            Some((
                name.parse::<DmName>().ok()?,
                dm.live.as_ref()?.clone.clone()?,
            ))
        })
    }

    fn resolve_loop(&self, minor: u32) -> Option<Resolved> {
        self.loops.get(&minor).map(|lp| Resolved {
            id: DevId::Loop(minor),
            major: LOOP_MAJOR,
            minor,
            size_bytes: lp.info.size_bytes,
            read_only: lp.info.read_only,
        })
    }

    fn resolve_dm(&self, dm: &FakeDm) -> Resolved {
        let sectors = dm.live.as_ref().map_or(0, |live| live.table.length().0);
        Resolved {
            id: DevId::Dm(dm.minor),
            major: DM_MAJOR,
            minor: dm.minor,
            size_bytes: sectors.saturating_mul(SECTOR_BYTES),
            read_only: false,
        }
    }

    fn resolve_path(&self, path: &Path) -> Option<Resolved> {
        if let Some(minor) = loop_number(path) {
            return self.resolve_loop(minor);
        }
        let text = path.to_str()?;
        if let Some(name) = text.strip_prefix("/dev/mapper/") {
            return self.devices.get(name).map(|dm| self.resolve_dm(dm));
        }
        let minor: u32 = text.strip_prefix("/dev/dm-")?.parse().ok()?;
        self.dm_by_minor(minor).map(|(_, dm)| self.resolve_dm(dm))
    }

    fn resolve_ref(&self, device: &DeviceRef) -> Option<Resolved> {
        match device {
            DeviceRef::Number {
                major: LOOP_MAJOR,
                minor,
            } => self.resolve_loop(*minor),
            DeviceRef::Number {
                major: DM_MAJOR,
                minor,
            } => self.dm_by_minor(*minor).map(|(_, dm)| self.resolve_dm(dm)),
            DeviceRef::Number { .. } => None,
            DeviceRef::Path(path) => self.resolve_path(Path::new(path)),
        }
    }

    /// The file whose bytes the device shows from offset 0: a loop's
    /// backing file, or, through tables, the clone destination's or the
    /// linear device's. A clone shows its destination's because its source's
    /// content is carried over when the metadata is formatted.
    fn data_key(&self, id: DevId, depth: usize) -> Option<FileId> {
        match id {
            DevId::Loop(minor) => self.loops.get(&minor).map(|lp| FileId::of_loop(&lp.info)),
            DevId::Dm(minor) => {
                if depth >= MAX_STACK_DEPTH {
                    return None;
                }
                let (_, dm) = self.dm_by_minor(minor)?;
                let first = dm.live.as_ref()?.table.lines().first()?;
                let device = match &first.target {
                    Target::Clone(clone) => &clone.destination,
                    Target::Linear(LinearTarget { device, offset }) if *offset == Sectors::ZERO => {
                        device
                    }
                    Target::Linear(_) => return None,
                };
                let next = self.resolve_ref(device)?;
                self.data_key(next.id, depth + 1)
            }
        }
    }

    /// Whether a loaded table (live or inactive) or a mount holds `id` open.
    fn held_by_tables(&self, id: DevId) -> usize {
        self.devices
            .values()
            .flat_map(|dm| dm.live.iter().chain(dm.inactive.iter()))
            .filter(|loaded| loaded.refs.contains(&id))
            .count()
    }

    fn is_mounted(&self, id: DevId) -> bool {
        self.mounts.iter().any(|mount| mount.device == Some(id))
    }

    /// Openers as `DM_DEV_STATUS` counts them: one per stacked table, one
    /// for the file system however many times it is mounted (one
    /// superblock), plus the test's own.
    fn open_count(&self, dm: &FakeDm) -> u32 {
        let id = DevId::Dm(dm.minor);
        let tables = u32::try_from(self.held_by_tables(id)).unwrap_or(u32::MAX);
        dm.extra_openers
            .saturating_add(tables)
            .saturating_add(u32::from(self.is_mounted(id)))
    }

    /// Runs the table's constructors: device lookups and size checks, and
    /// dm-clone's metadata open (with its format on a zeroed first block).
    fn construct(&mut self, operation: &str, table: &Table) -> OsResult<Loaded> {
        let mut refs = Vec::new();
        let mut clone_line = None;
        for line in table.lines() {
            match &line.target {
                Target::Linear(linear) => {
                    let device = self.lookup(operation, &linear.device)?;
                    let needed = linear.offset.checked_add(line.length);
                    self.check_covers(operation, &linear.device, device, needed)?;
                    self.check_writable(operation, &linear.device, device)?;
                    refs.push(device.id);
                }
                Target::Clone(clone) => {
                    if clone_line.is_some() {
                        return Err(failed(
                            operation,
                            "the simulator supports one clone target per table",
                        ));
                    }
                    let metadata = self.lookup(operation, &clone.metadata)?;
                    let destination = self.lookup(operation, &clone.destination)?;
                    let source = self.lookup(operation, &clone.source)?;
                    self.check_writable(operation, &clone.metadata, metadata)?;
                    self.check_writable(operation, &clone.destination, destination)?;
                    self.check_covers(
                        operation,
                        &clone.destination,
                        destination,
                        Some(line.length),
                    )?;
                    self.check_covers(operation, &clone.source, source, Some(line.length))?;
                    refs.extend([metadata.id, destination.id, source.id]);
                    clone_line = Some((line, clone, metadata, destination, source));
                }
            }
        }
        let clone = match clone_line {
            Some((line, clone, metadata, destination, source)) => {
                Some(self.open_metadata(operation, line, clone, metadata, destination, source)?)
            }
            None => None,
        };
        Ok(Loaded {
            table: table.clone(),
            refs,
            clone,
        })
    }

    fn lookup(&self, operation: &str, device: &DeviceRef) -> OsResult<Resolved> {
        self.resolve_ref(device).ok_or_else(|| {
            failed(
                operation,
                format!("{device}: device lookup failed (no such simulated device)"),
            )
        })
    }

    fn check_covers(
        &self,
        operation: &str,
        device: &DeviceRef,
        resolved: Resolved,
        needed: Option<Sectors>,
    ) -> OsResult<()> {
        match needed {
            Some(needed) if needed <= resolved.sectors() => Ok(()),
            _ => Err(failed(
                operation,
                format!(
                    "{device} is too small: the table needs {} sectors, the device has {}",
                    needed.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string()),
                    resolved.sectors()
                ),
            )),
        }
    }

    fn check_writable(
        &self,
        operation: &str,
        device: &DeviceRef,
        resolved: Resolved,
    ) -> OsResult<()> {
        if resolved.read_only {
            Err(failed(
                operation,
                format!("{device} is read-only, but the table writes to it"),
            ))
        } else {
            Ok(())
        }
    }

    /// dm-clone's metadata open at table load.
    fn open_metadata(
        &mut self,
        operation: &str,
        line: &TableLine,
        clone: &CloneTarget,
        metadata: Resolved,
        destination: Resolved,
        source: Resolved,
    ) -> OsResult<CloneSim> {
        let DevId::Loop(metadata_minor) = metadata.id else {
            return Err(failed(
                operation,
                "the simulator keeps dm-clone metadata only on loop devices",
            ));
        };
        let total_regions = clone.region_size.regions_in(line.length);
        if metadata.size_bytes < MIN_METADATA_BYTES {
            return Err(failed(
                operation,
                format!(
                    "metadata device {} holds {} bytes, too small for dm-clone",
                    clone.metadata, metadata.size_bytes
                ),
            ));
        }
        let floor = total_regions / 4 + METADATA_FLOOR_FIXED_BYTES;
        if metadata.size_bytes < floor {
            self.hazards.push(format!(
                "metadata device {} holds {} bytes for {total_regions} regions, below the \
                 safe floor of {floor} bytes (undersized metadata can crash the kernel)",
                clone.metadata, metadata.size_bytes
            ));
        }
        let key;
        let blank;
        let first_block_is_ours;
        {
            let Some(lp) = self.loops.get(&metadata_minor) else {
                return Err(failed(operation, "the metadata loop device vanished"));
            };
            key = FileId::of_loop(&lp.info);
            let block = read_first_block(&lp.file)
                .map_err(|e| OsError::io(operation, &lp.info.backing_file, &e))?;
            blank = block.iter().all(|&b| b == 0);
            first_block_is_ours = block.starts_with(SUPERBLOCK_MARKER);
            if blank {
                lp.file
                    .write_all_at(SUPERBLOCK_MARKER, 0)
                    .map_err(|e| OsError::io(operation, &lp.info.backing_file, &e))?;
            }
        }
        let destination_key = self.data_key(destination.id, 0);
        let source_key = self.data_key(source.id, 0);
        let metadata_name = &clone.metadata;
        if blank {
            self.metadata.insert(
                key,
                MetadataRecord {
                    region_size: clone.region_size,
                    length: line.length,
                    hydrated: 0,
                    destination: destination_key,
                    source: source_key,
                },
            );
            // Reading the clone shows the source; so will the destination
            // once hydrated. Carry the file-system signature over now.
            if let Some(destination_key) = destination_key {
                match source_key.and_then(|k| self.signatures.get(&k).cloned()) {
                    Some(signature) => {
                        self.signatures.insert(destination_key, signature);
                    }
                    None => {
                        self.signatures.remove(&destination_key);
                    }
                }
            }
        } else {
            if !first_block_is_ours {
                return Err(failed(
                    operation,
                    format!(
                        "{metadata_name}: superblock check failed: the first block is neither \
                         zero nor dm-clone metadata (a used file that was never zeroed?)"
                    ),
                ));
            }
            let Some(record) = self.metadata.get(&key) else {
                return Err(failed(
                    operation,
                    format!(
                        "{metadata_name}: formatted by another FakeOs instance; this one does \
                         not know its hydration state"
                    ),
                ));
            };
            if record.region_size != clone.region_size || record.length != line.length {
                return Err(failed(
                    operation,
                    format!(
                        "{metadata_name}: Invalid argument: region and/or target size don't \
                         match the metadata (formatted for {} sectors in regions of {}, \
                         loaded with {} in regions of {})",
                        record.length, record.region_size, line.length, clone.region_size
                    ),
                ));
            }
            if record.destination != destination_key || record.source != source_key {
                self.hazards.push(format!(
                    "metadata {metadata_name} was formatted for another destination or source \
                     and is reused as is: the clone reads wrong data"
                ));
            }
        }
        Ok(CloneSim {
            start: line.start,
            length: line.length,
            region_size: clone.region_size,
            total_regions,
            metadata: key,
            metadata_bytes: metadata.size_bytes,
            destination: destination_key,
            no_discard_passdown: clone.features.no_discard_passdown,
            hydration_enabled: !clone.features.no_hydration,
            threshold: clone
                .core
                .hydration_threshold
                .unwrap_or(KERNEL_DEFAULT_HYDRATION_THRESHOLD),
            batch_size: clone
                .core
                .hydration_batch_size
                .unwrap_or(KERNEL_DEFAULT_HYDRATION_BATCH_SIZE),
            mode: SimMetadataMode::ReadWrite,
        })
    }

    fn hydrated_of(&self, sim: &CloneSim) -> u64 {
        self.metadata
            .get(&sim.metadata)
            .map_or(0, |record| record.hydrated.min(sim.total_regions))
    }

    /// Adds hydrated regions to the live clone of `name` (capped at the
    /// total) and fires the completion event when the total is reached.
    /// Returns the count afterwards.
    fn add_hydrated(&mut self, name: &DmName, regions: u64) -> u64 {
        let Some(sim) = self
            .devices
            .get(name.as_str())
            .and_then(|dm| dm.live.as_ref())
            .and_then(|live| live.clone.clone())
        else {
            return 0;
        };
        let Some(record) = self.metadata.get_mut(&sim.metadata) else {
            return 0;
        };
        let before = record.hydrated.min(sim.total_regions);
        let after = before.saturating_add(regions).min(sim.total_regions);
        record.hydrated = after;
        if before < sim.total_regions && after == sim.total_regions {
            if let Some(dm) = self.devices.get_mut(name.as_str()) {
                dm.event_nr = dm.event_nr.wrapping_add(1);
            }
        }
        after
    }

    fn status_line(&self, sim: &CloneSim, suspended: bool) -> CloneStatusLine {
        let hydrated = self.hydrated_of(sim);
        let remaining = sim.total_regions - hydrated;
        let running = sim.hydration_enabled
            && sim.threshold > 0
            && sim.mode == SimMetadataMode::ReadWrite
            && !suspended;
        let metadata_mode = match sim.mode {
            SimMetadataMode::ReadWrite => MetadataMode::ReadWrite,
            SimMetadataMode::ReadOnly => MetadataMode::ReadOnly,
            SimMetadataMode::Fail => {
                return CloneStatusLine {
                    start: sim.start,
                    length: sim.length,
                    status: CloneStatus::Fail,
                }
            }
        };
        let block_bytes = METADATA_BLOCK_SECTORS * SECTOR_BYTES;
        let total_blocks =
            sim.metadata_bytes.min(METADATA_MAX_SECTORS * SECTOR_BYTES) / block_bytes;
        let used_blocks =
            (3 + sim.total_regions.div_ceil(REGIONS_PER_METADATA_BLOCK)).min(total_blocks);
        CloneStatusLine {
            start: sim.start,
            length: sim.length,
            status: CloneStatus::Active(CloneStatusReport {
                metadata_block_sectors: METADATA_BLOCK_SECTORS,
                metadata_used_blocks: used_blocks,
                metadata_total_blocks: total_blocks,
                region_size: sim.region_size,
                hydrated_regions: hydrated,
                total_regions: sim.total_regions,
                hydrating_regions: if running {
                    remaining.min(u64::from(sim.threshold))
                } else {
                    0
                },
                // dm-clone prints its current flags here, not the table's.
                features: CloneFeatures {
                    no_hydration: !sim.hydration_enabled,
                    no_discard_passdown: sim.no_discard_passdown,
                },
                hydration_threshold: sim.threshold,
                hydration_batch_size: sim.batch_size,
                metadata_mode,
            }),
        }
    }

    /// Records what replacing `old` by `new` on `name` would lose.
    fn check_swap(&mut self, name: &str, old: Option<&Loaded>, new: &Loaded) {
        let Some(old_sim) = old.and_then(|old| old.clone.as_ref()) else {
            return;
        };
        if new.clone.is_some() {
            return;
        }
        let hydrated = self.hydrated_of(old_sim);
        if hydrated < old_sim.total_regions {
            self.hazards.push(format!(
                "{name}: clone replaced by a {} table with {hydrated}/{} regions hydrated: \
                 the unhydrated regions now read the destination's stale data",
                target_types(&new.table),
                old_sim.total_regions
            ));
        }
        if old_sim.mode != SimMetadataMode::ReadWrite {
            self.hazards.push(format!(
                "{name}: clone replaced while its metadata was {:?}",
                old_sim.mode
            ));
        }
        let new_data = new.refs.first().and_then(|id| self.data_key(*id, 0));
        if new_data.is_none() || new_data != old_sim.destination {
            self.hazards.push(format!(
                "{name}: clone replaced by a table that does not start on its destination"
            ));
        }
    }

    /// The live table with every device as `major:minor`, as the kernel
    /// prints it.
    fn numbered(&self, table: &Table) -> Table {
        let number = |device: &DeviceRef| match self.resolve_ref(device) {
            Some(resolved) => DeviceRef::Number {
                major: resolved.major,
                minor: resolved.minor,
            },
            None => device.clone(),
        };
        let lines = table
            .lines()
            .iter()
            .map(|line| TableLine {
                start: line.start,
                length: line.length,
                target: match &line.target {
                    Target::Clone(clone) => Target::Clone(CloneTarget {
                        metadata: number(&clone.metadata),
                        destination: number(&clone.destination),
                        source: number(&clone.source),
                        ..clone.clone()
                    }),
                    Target::Linear(linear) => Target::Linear(LinearTarget {
                        device: number(&linear.device),
                        offset: linear.offset,
                    }),
                },
            })
            .collect();
        // Same layout as an accepted table, so this cannot fail; keep the
        // original if it somehow does.
        Table::new(lines).unwrap_or_else(|_| table.clone())
    }

    fn top_mount(&self, target: &Path) -> Option<&FakeMount> {
        self.mounts
            .iter()
            .rev()
            .find(|m| m.info.mount_point == target)
    }

    /// The mount holding `path`: the deepest mount point above it.
    fn mount_containing(&self, path: &Path) -> Option<&FakeMount> {
        self.mounts
            .iter()
            .rev()
            .filter(|m| path.starts_with(&m.info.mount_point))
            .max_by_key(|m| m.info.mount_point.components().count())
    }

    fn signature_of(&self, id: DevId) -> Option<&FsSignature> {
        self.data_key(id, 0)
            .and_then(|key| self.signatures.get(&key))
    }

    fn new_uuid(&mut self) -> u64 {
        let uuid = self.next_uuid;
        self.next_uuid += 1;
        uuid
    }
}

impl DeviceMapper for FakeOs {
    fn create(&self, name: &DmName, table: &Table) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("dm.create", format_args!("{name} {}", target_types(table)))?;
        if state.devices.contains_key(name.as_str()) {
            return Err(busy(&call, format!("{name} already exists")));
        }
        let loaded = state.construct(&call, table)?;
        let minor = state.next_dm_minor;
        state.next_dm_minor += 1;
        state.devices.insert(
            name.as_str().to_owned(),
            FakeDm {
                minor,
                live: Some(loaded),
                inactive: None,
                suspended: false,
                extra_openers: 0,
                event_nr: 0,
            },
        );
        self.shared.changed.notify_all();
        Ok(())
    }

    fn load(&self, name: &DmName, table: &Table) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("dm.load", format_args!("{name} {}", target_types(table)))?;
        state.device(&call, name)?;
        let loaded = state.construct(&call, table)?;
        state.device_mut(&call, name)?.inactive = Some(loaded);
        Ok(())
    }

    fn suspend(&self, name: &DmName, flush: SuspendFlush) -> OsResult<()> {
        let mut state = self.lock();
        let mode = match flush {
            SuspendFlush::Flush => "flush",
            SuspendFlush::FlushKeepFs => "flush-keep-fs",
            SuspendFlush::NoFlush => "noflush",
        };
        let call = state.begin("dm.suspend", format_args!("{name} {mode}"))?;
        state.device_mut(&call, name)?.suspended = true;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Swaps in the inactive table, if any (suspending first if needed, as
    /// the kernel does), and resumes.
    fn resume(&self, name: &DmName) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("dm.resume", format_args!("{name}"))?;
        let dm = state.device_mut(&call, name)?;
        let incoming = dm.inactive.take();
        dm.suspended = false;
        if let Some(new) = incoming {
            let old = state
                .devices
                .get_mut(name.as_str())
                .and_then(|dm| dm.live.take());
            state.check_swap(name.as_str(), old.as_ref(), &new);
            state.device_mut(&call, name)?.live = Some(new);
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    fn clear_inactive(&self, name: &DmName) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("dm.clear_inactive", format_args!("{name}"))?;
        state.device_mut(&call, name)?.inactive = None;
        Ok(())
    }

    fn remove(&self, name: &DmName) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("dm.remove", format_args!("{name}"))?;
        let Some(dm) = state.devices.get(name.as_str()) else {
            return Ok(());
        };
        let openers = state.open_count(dm);
        if openers > 0 {
            return Err(busy(
                &call,
                format!("{name} is open ({openers} openers: mounts, stacked tables or processes)"),
            ));
        }
        state.devices.remove(name.as_str());
        self.shared.changed.notify_all();
        Ok(())
    }

    fn info(&self, name: &DmName) -> OsResult<Option<DmInfo>> {
        let mut state = self.lock();
        state.begin("dm.info", format_args!("{name}"))?;
        Ok(state.devices.get(name.as_str()).map(|dm| DmInfo {
            major: DM_MAJOR,
            minor: dm.minor,
            suspended: dm.suspended,
            inactive_table: dm.inactive.is_some(),
            open_count: state.open_count(dm),
            event_nr: dm.event_nr,
        }))
    }

    fn table(&self, name: &DmName) -> OsResult<Table> {
        let mut state = self.lock();
        let call = state.begin("dm.table", format_args!("{name}"))?;
        let dm = state.device(&call, name)?;
        let live = dm
            .live
            .as_ref()
            .ok_or_else(|| failed(&call, format!("{name} has no live table")))?;
        // Through the text form, as the real implementation reads it.
        state
            .numbered(&live.table)
            .to_string()
            .parse()
            .map_err(|e| failed(&call, format!("the simulated table does not parse: {e}")))
    }

    fn clone_status(&self, name: &DmName) -> OsResult<CloneStatusLine> {
        let mut state = self.lock();
        let call = state.begin("dm.clone_status", format_args!("{name}"))?;
        let sim = state.live_clone(&call, name)?;
        let suspended = state.device(&call, name)?.suspended;
        // Printed and parsed back, so a line the parser refuses fails here.
        state
            .status_line(&sim, suspended)
            .to_string()
            .parse()
            .map_err(|e| failed(&call, format!("the simulated status does not parse: {e}")))
    }

    fn message(&self, name: &DmName, message: &CloneMessage) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("dm.message", format_args!("{name} {message}"))?;
        state.live_clone(&call, name)?;
        let sim = state
            .device_mut(&call, name)?
            .live
            .as_mut()
            .and_then(|live| live.clone.as_mut())
            .ok_or_else(|| failed(&call, "no clone target"))?;
        match *message {
            CloneMessage::EnableHydration => sim.hydration_enabled = true,
            CloneMessage::DisableHydration => sim.hydration_enabled = false,
            CloneMessage::HydrationThreshold(n) => sim.threshold = n,
            CloneMessage::HydrationBatchSize(n) => sim.batch_size = n,
        }
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Returns at once if the counter differs from `event_nr` (the kernel
    /// compares for inequality, so a stale or future number never blocks).
    fn wait_event(&self, name: &DmName, event_nr: u32, timeout: Duration) -> OsResult<Option<u32>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        let call = state.begin("dm.wait_event", format_args!("{name} {event_nr}"))?;
        loop {
            let current = state.device(&call, name)?.event_nr;
            if current != event_nr {
                return Ok(Some(current));
            }
            state = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.shared
                        .changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    fn list(&self) -> OsResult<Vec<DmName>> {
        let mut state = self.lock();
        state.begin("dm.list", format_args!(""))?;
        Ok(state
            .devices
            .keys()
            .filter_map(|name| name.parse().ok())
            .collect())
    }
}

impl LoopDevices for FakeOs {
    fn attach(&self, file: &Path, options: LoopOptions) -> OsResult<LoopDevice> {
        let mut state = self.lock();
        let call = state.begin("loop.attach", format_args!("{}", file.display()))?;
        let metadata = std::fs::metadata(file).map_err(|e| OsError::io(&call, file, &e))?;
        if !metadata.is_file() {
            return Err(failed(
                &call,
                format!("{} is not a regular file", file.display()),
            ));
        }
        let handle = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(file)
            .map_err(|e| OsError::io(&call, file, &e))?;
        let minor = (0..=u32::MAX)
            .find(|n| !state.loops.contains_key(n))
            .ok_or_else(|| OsError::new(OsErrorKind::NoSpace, &call, "no free loop device"))?;
        let info = LoopDevice {
            device: PathBuf::from(format!("/dev/loop{minor}")),
            major: LOOP_MAJOR,
            minor,
            backing_dev: metadata.dev(),
            backing_inode: metadata.ino(),
            backing_file: std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()),
            read_only: options.read_only,
            direct_io: options.direct_io,
            size_bytes: metadata.len(),
        };
        state.loops.insert(
            minor,
            FakeLoop {
                info: info.clone(),
                file: handle,
            },
        );
        Ok(info)
    }

    fn find(&self, file: &Path) -> OsResult<Vec<LoopDevice>> {
        let mut state = self.lock();
        let call = state.begin("loop.find", format_args!("{}", file.display()))?;
        let metadata = std::fs::metadata(file).map_err(|e| OsError::io(&call, file, &e))?;
        let id = FileId::of_metadata(&metadata);
        Ok(state
            .loops
            .values()
            .filter(|lp| FileId::of_loop(&lp.info) == id)
            .map(|lp| lp.info.clone())
            .collect())
    }

    fn list(&self) -> OsResult<Vec<LoopDevice>> {
        let mut state = self.lock();
        state.begin("loop.list", format_args!(""))?;
        Ok(state.loops.values().map(|lp| lp.info.clone()).collect())
    }

    fn detach(&self, device: &Path) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("loop.detach", format_args!("{}", device.display()))?;
        let Some(minor) = loop_number(device).filter(|n| state.loops.contains_key(n)) else {
            return Ok(());
        };
        let id = DevId::Loop(minor);
        if state.held_by_tables(id) > 0 || state.is_mounted(id) {
            return Err(busy(
                &call,
                format!(
                    "{} is used by a device-mapper table or a mount (Linux would detach it \
                     later; the simulator refuses)",
                    device.display()
                ),
            ));
        }
        state.loops.remove(&minor);
        Ok(())
    }

    fn refresh_size(&self, device: &Path) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("loop.refresh_size", format_args!("{}", device.display()))?;
        let lp = loop_number(device)
            .and_then(|minor| state.loops.get_mut(&minor))
            .ok_or_else(|| not_found(&call, format!("{} is not attached", device.display())))?;
        let size = lp
            .file
            .metadata()
            .map_err(|e| OsError::io(&call, &lp.info.backing_file, &e))?
            .len();
        lp.info.size_bytes = size;
        Ok(())
    }
}

impl FakeOs {
    fn resolve_device(state: &State, operation: &str, device: &Path) -> OsResult<Resolved> {
        state.resolve_path(device).ok_or_else(|| {
            not_found(
                operation,
                format!("{}: no such simulated block device", device.display()),
            )
        })
    }

    fn require_mount_point<'s>(
        state: &'s State,
        operation: &str,
        mount_point: &Path,
    ) -> OsResult<&'s FakeMount> {
        state.top_mount(mount_point).ok_or_else(|| {
            failed(
                operation,
                format!("{} is not a mount point", mount_point.display()),
            )
        })
    }
}

impl Filesystems for FakeOs {
    fn probe(&self, device: &Path) -> OsResult<Option<String>> {
        let mut state = self.lock();
        let call = state.begin("fs.probe", format_args!("{}", device.display()))?;
        let resolved = Self::resolve_device(&state, &call, device)?;
        Ok(state.signature_of(resolved.id).map(|s| s.fs.clone()))
    }

    fn mkfs(&self, device: &Path, fs: FsType, _reads_zeros: bool) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("fs.mkfs", format_args!("{} {fs}", device.display()))?;
        let resolved = Self::resolve_device(&state, &call, device)?;
        if resolved.read_only {
            return Err(failed(&call, format!("{} is read-only", device.display())));
        }
        if state.is_mounted(resolved.id) {
            return Err(busy(&call, format!("{} is mounted", device.display())));
        }
        let key = state
            .data_key(resolved.id, 0)
            .ok_or_else(|| failed(&call, "the device maps no data at offset 0"))?;
        let uuid = state.new_uuid();
        state.signatures.insert(
            key,
            FsSignature {
                fs: fs.to_string(),
                uuid,
            },
        );
        Ok(())
    }

    fn mount(&self, device: &Path, target: &Path, fs: FsType, options: &[String]) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin(
            "fs.mount",
            format_args!(
                "{} {} {fs} {}",
                device.display(),
                target.display(),
                options.join(",")
            ),
        )?;
        let resolved = Self::resolve_device(&state, &call, device)?;
        let target_meta = std::fs::metadata(target).map_err(|e| OsError::io(&call, target, &e))?;
        if !target_meta.is_dir() {
            return Err(failed(
                &call,
                format!("{} is not a directory", target.display()),
            ));
        }
        let signature = state.signature_of(resolved.id).cloned();
        let Some(signature) = signature.filter(|s| s.fs == fs.to_string()) else {
            return Err(failed(
                &call,
                format!(
                    "wrong fs type, bad option, bad superblock on {} (no {fs} found)",
                    device.display()
                ),
            ));
        };
        if fs == FsType::Xfs {
            let duplicate = state.mounts.iter().any(|mount| {
                mount
                    .device
                    .filter(|other| *other != resolved.id)
                    .and_then(|other| state.signature_of(other))
                    .is_some_and(|other| *other == signature)
            });
            if duplicate {
                return Err(failed(
                    &call,
                    "Filesystem has duplicate UUID - can't mount (regenerate the clone's UUID)",
                ));
            }
        }
        let read_only = resolved.read_only || options.iter().any(|o| o == "ro");
        state.mounts.push(FakeMount {
            info: MountInfo {
                mount_point: target.to_path_buf(),
                major: resolved.major,
                minor: resolved.minor,
                root: PathBuf::from("/"),
                fs_type: fs.to_string(),
                source: device.display().to_string(),
                read_only,
            },
            device: Some(resolved.id),
        });
        Ok(())
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()> {
        let mut state = self.lock();
        let ro = if read_only { " ro" } else { "" };
        let call = state.begin(
            "fs.bind_mount",
            format_args!("{} {}{ro}", source.display(), target.display()),
        )?;
        let target_meta = std::fs::metadata(target).map_err(|e| OsError::io(&call, target, &e))?;
        let (info, device) = if state.resolve_path(source).is_some() {
            // A device node: the mount is of devtmpfs, not of the device.
            if target_meta.is_dir() {
                return Err(failed(
                    &call,
                    "a device node binds onto a file, not a directory",
                ));
            }
            let (major, minor) = DEVTMPFS_MAJOR_MINOR;
            let relative = source.strip_prefix("/dev").unwrap_or(source);
            let info = MountInfo {
                mount_point: target.to_path_buf(),
                major,
                minor,
                root: Path::new("/").join(relative),
                fs_type: "devtmpfs".to_owned(),
                source: "udev".to_owned(),
                read_only,
            };
            (info, None)
        } else {
            let source_meta =
                std::fs::metadata(source).map_err(|e| OsError::io(&call, source, &e))?;
            if source_meta.is_dir() != target_meta.is_dir() {
                return Err(failed(
                    &call,
                    "Not a directory: source and target must both be directories or both files",
                ));
            }
            match state.mount_containing(source) {
                Some(parent) => {
                    let relative = source
                        .strip_prefix(&parent.info.mount_point)
                        .unwrap_or(Path::new(""));
                    let info = MountInfo {
                        mount_point: target.to_path_buf(),
                        root: parent.info.root.join(relative),
                        read_only: read_only || parent.info.read_only,
                        ..parent.info.clone()
                    };
                    (info, parent.device)
                }
                None => {
                    let (major, minor) = split_dev(source_meta.dev());
                    let info = MountInfo {
                        mount_point: target.to_path_buf(),
                        major,
                        minor,
                        root: source.to_path_buf(),
                        fs_type: "host".to_owned(),
                        source: "none".to_owned(),
                        read_only,
                    };
                    (info, None)
                }
            }
        };
        state.mounts.push(FakeMount { info, device });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("fs.unmount", format_args!("{}", target.display()))?;
        let Some(index) = state
            .mounts
            .iter()
            .rposition(|m| m.info.mount_point == target)
        else {
            return Ok(());
        };
        if state
            .mounts
            .iter()
            .any(|m| m.info.mount_point != target && m.info.mount_point.starts_with(target))
        {
            return Err(busy(
                &call,
                format!("{} has mounts below it", target.display()),
            ));
        }
        state.mounts.remove(index);
        if state.top_mount(target).is_none() {
            state.frozen.remove(target);
        }
        Ok(())
    }

    fn mount_at(&self, target: &Path) -> OsResult<Option<MountInfo>> {
        let mut state = self.lock();
        state.begin("fs.mount_at", format_args!("{}", target.display()))?;
        Ok(state.top_mount(target).map(|m| m.info.clone()))
    }

    fn mounts_of(&self, major: u32, minor: u32) -> OsResult<Vec<MountInfo>> {
        let mut state = self.lock();
        state.begin("fs.mounts_of", format_args!("{major}:{minor}"))?;
        Ok(state
            .mounts
            .iter()
            .filter(|m| m.info.major == major && m.info.minor == minor)
            .map(|m| m.info.clone())
            .collect())
    }

    fn trim(&self, mount_point: &Path) -> OsResult<u64> {
        let mut state = self.lock();
        let call = state.begin("fs.trim", format_args!("{}", mount_point.display()))?;
        let device = Self::require_mount_point(&state, &call, mount_point)?.device;
        if state.frozen.contains(mount_point) {
            return Err(busy(&call, "the file system is frozen"));
        }
        if let Some(DevId::Dm(minor)) = device {
            if let Some((name, sim)) = state.live_clone_by_minor(minor) {
                if sim.mode == SimMetadataMode::ReadWrite {
                    let remaining = sim.total_regions - state.hydrated_of(&sim);
                    let discarded = remaining * u64::from(state.trim_discard_percent) / 100;
                    state.add_hydrated(&name, discarded);
                    self.shared.changed.notify_all();
                }
            }
        }
        Ok(state.trim_bytes)
    }

    fn freeze(&self, mount_point: &Path) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("fs.freeze", format_args!("{}", mount_point.display()))?;
        Self::require_mount_point(&state, &call, mount_point)?;
        if !state.frozen.insert(mount_point.to_path_buf()) {
            return Err(busy(&call, "the file system is already frozen"));
        }
        Ok(())
    }

    fn thaw(&self, mount_point: &Path) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("fs.thaw", format_args!("{}", mount_point.display()))?;
        if !state.frozen.remove(mount_point) {
            return Err(failed(
                &call,
                "Invalid argument: the file system is not frozen",
            ));
        }
        Ok(())
    }

    fn grow(&self, device: &Path, mount_point: &Path, fs: FsType) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin(
            "fs.grow",
            format_args!("{} {} {fs}", device.display(), mount_point.display()),
        )?;
        let resolved = Self::resolve_device(&state, &call, device)?;
        let mount = Self::require_mount_point(&state, &call, mount_point)?;
        if mount.device != Some(resolved.id) || mount.info.fs_type != fs.to_string() {
            return Err(failed(
                &call,
                format!(
                    "{} is not the {fs} file system of {}",
                    mount_point.display(),
                    device.display()
                ),
            ));
        }
        Ok(())
    }

    fn regenerate_uuid(&self, device: &Path, fs: FsType) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin(
            "fs.regenerate_uuid",
            format_args!("{} {fs}", device.display()),
        )?;
        let resolved = Self::resolve_device(&state, &call, device)?;
        if state.is_mounted(resolved.id) {
            return Err(busy(&call, format!("{} is mounted", device.display())));
        }
        let key = state.data_key(resolved.id, 0);
        let uuid = state.new_uuid();
        match key.and_then(|key| state.signatures.get_mut(&key)) {
            Some(signature) if signature.fs == fs.to_string() => {
                signature.uuid = uuid;
                Ok(())
            }
            _ => Err(failed(
                &call,
                format!("no {fs} file system on {}", device.display()),
            )),
        }
    }

    /// Set figures ([`FakeOs::set_usage`]) first; then, on a simulated
    /// mount, a tenth of the device used; else fixed host figures.
    fn usage(&self, path: &Path) -> OsResult<FsUsage> {
        let mut state = self.lock();
        let call = state.begin("fs.usage", format_args!("{}", path.display()))?;
        let overridden = state
            .usage_overrides
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.components().count())
            .map(|(_, usage)| *usage);
        if let Some(usage) = overridden {
            return Ok(usage);
        }
        std::fs::metadata(path).map_err(|e| OsError::io(&call, path, &e))?;
        let Some(device) = state.mount_containing(path).and_then(|m| m.device) else {
            return Ok(DEFAULT_HOST_USAGE);
        };
        let total_bytes = match device {
            DevId::Loop(minor) => state.resolve_loop(minor).map_or(0, |r| r.size_bytes),
            DevId::Dm(minor) => state
                .dm_by_minor(minor)
                .map_or(0, |(_, dm)| state.resolve_dm(dm).size_bytes),
        };
        let used_bytes = total_bytes / 10;
        let total_inodes = total_bytes / 16_384;
        let used_inodes = total_inodes.min(11);
        Ok(FsUsage {
            total_bytes,
            available_bytes: total_bytes - used_bytes,
            used_bytes,
            total_inodes,
            free_inodes: total_inodes - used_inodes,
            used_inodes,
        })
    }

    fn block_size_bytes(&self, device: &Path) -> OsResult<u64> {
        let mut state = self.lock();
        let call = state.begin("fs.block_size_bytes", format_args!("{}", device.display()))?;
        Ok(Self::resolve_device(&state, &call, device)?.size_bytes)
    }

    fn reflink(&self, source: &Path, dest: &Path) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin(
            "fs.reflink",
            format_args!("{} {}", source.display(), dest.display()),
        )?;
        if !state.reflink_supported {
            return Err(OsError::new(
                OsErrorKind::Unsupported,
                &call,
                "Operation not supported (reflink disabled with FakeOs::set_reflink_supported)",
            ));
        }
        let mut input = File::open(source).map_err(|e| OsError::io(&call, source, &e))?;
        let mut output = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .map_err(|e| OsError::io(&call, dest, &e))?;
        copy_keeping_holes(&mut input, &mut output).map_err(|e| OsError::io(&call, dest, &e))?;
        let ids = (input.metadata(), output.metadata());
        if let (Ok(from), Ok(to)) = ids {
            let from = FileId::of_metadata(&from);
            let to = FileId::of_metadata(&to);
            if let Some(signature) = state.signatures.get(&from).cloned() {
                state.signatures.insert(to, signature);
            } else {
                state.signatures.remove(&to);
            }
        }
        Ok(())
    }

    /// On a clone, whole regions inside the range count as hydrated (as
    /// dm-clone marks them); elsewhere a discard changes nothing modelled.
    fn discard(&self, device: &Path, offset: u64, length: u64) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin(
            "fs.discard",
            format_args!("{} {offset}+{length}", device.display()),
        )?;
        let resolved = Self::resolve_device(&state, &call, device)?;
        if resolved.read_only {
            return Err(failed(
                &call,
                "Bad file descriptor: the device is read-only",
            ));
        }
        if let DevId::Dm(minor) = resolved.id {
            if let Some((name, sim)) = state.live_clone_by_minor(minor) {
                let region = sim.region_size.sectors().0 * SECTOR_BYTES;
                let first = offset.div_ceil(region);
                let end = (offset.saturating_add(length) / region).min(sim.total_regions);
                let whole = end.saturating_sub(first);
                let remaining = sim.total_regions - state.hydrated_of(&sim);
                state.add_hydrated(&name, whole.min(remaining));
                self.shared.changed.notify_all();
            }
        }
        Ok(())
    }

    fn flush(&self, path: &Path) -> OsResult<()> {
        let mut state = self.lock();
        let call = state.begin("fs.flush", format_args!("{}", path.display()))?;
        if state.resolve_path(path).is_some() {
            return Ok(());
        }
        std::fs::metadata(path)
            .map(|_| ())
            .map_err(|e| OsError::io(&call, path, &e))
    }
}

/// A copy that leaves all-zero 4 KiB blocks unwritten, so holes stay
/// holes as they do with a real reflink.
fn copy_keeping_holes(input: &mut File, output: &mut File) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut block = [0u8; 4096];
    let mut length = 0u64;
    loop {
        let read = input.read(&mut block)?;
        if read == 0 {
            break;
        }
        if block[..read].iter().any(|&b| b != 0) {
            output.seek(SeekFrom::Start(length))?;
            output.write_all(&block[..read])?;
        }
        length += read as u64;
    }
    output.set_len(length)
}

impl Kernel for FakeOs {
    fn ensure_dm_clone(&self) -> OsResult<String> {
        let mut state = self.lock();
        let call = state.begin("kernel.ensure_dm_clone", format_args!(""))?;
        match &state.dm_clone_error {
            Some((kind, detail)) => Err(OsError::new(*kind, call, detail.clone())),
            None => Ok(DM_CLONE_VERSION.to_owned()),
        }
    }

    fn set_kcopyd_subjob_kib(&self, kib: u32) -> OsResult<u32> {
        let mut state = self.lock();
        state.begin("kernel.set_kcopyd_subjob_kib", format_args!("{kib}"))?;
        Ok(std::mem::replace(&mut state.kcopyd_subjob_kib, kib))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::dm::CloneCoreArgs;

    const MIB: u64 = 1 << 20;
    /// 4 MiB in 4 KiB regions: 1024 regions.
    const VOLUME: u64 = 4 * MIB;
    const REGIONS: u64 = 1024;
    const REGION_SECTORS: u64 = 8;
    const METADATA: u64 = 2 * MIB;

    struct Bench {
        dir: tempfile::TempDir,
        fake: FakeOs,
    }

    /// The three loops of a clone.
    struct Devices {
        metadata: LoopDevice,
        destination: LoopDevice,
        source: LoopDevice,
    }

    impl Bench {
        fn new() -> Self {
            Bench {
                dir: tempfile::tempdir().expect("temporary directory"),
                fake: FakeOs::new(),
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// A sparse file of `bytes` (all zero).
        fn file(&self, name: &str, bytes: u64) -> PathBuf {
            let path = self.path(name);
            File::create(&path)
                .and_then(|f| f.set_len(bytes))
                .expect("create file");
            path
        }

        fn dir(&self, name: &str) -> PathBuf {
            let path = self.path(name);
            std::fs::create_dir(&path).expect("create directory");
            path
        }

        fn attach(&self, path: &Path, read_only: bool) -> LoopDevice {
            self.fake
                .attach(
                    path,
                    LoopOptions {
                        read_only,
                        direct_io: true,
                    },
                )
                .expect("attach")
        }

        /// Files `<prefix>-meta`, `-dest`, `-src` attached (the source
        /// read-only), the source formatted ext4.
        fn clone_devices(&self, prefix: &str) -> Devices {
            let source_file = self.file(&format!("{prefix}-src"), VOLUME);
            let source = self.attach(&source_file, true);
            // mkfs needs a writable device: format through a second loop.
            let writable = self.attach(&source_file, false);
            self.fake
                .mkfs(&writable.device, FsType::Ext4, true)
                .expect("mkfs source");
            self.fake.detach(&writable.device).expect("detach");
            Devices {
                metadata: self.attach(&self.file(&format!("{prefix}-meta"), METADATA), false),
                destination: self.attach(&self.file(&format!("{prefix}-dest"), VOLUME), false),
                source,
            }
        }
    }

    fn dm(suffix: &str) -> DmName {
        DmName::with_suffix(suffix).expect("valid name")
    }

    fn device_ref(device: &LoopDevice) -> DeviceRef {
        DeviceRef::path(device.device.display().to_string()).expect("a /dev path")
    }

    fn clone_table(devices: &Devices, region_sectors: u64, core: CloneCoreArgs) -> Table {
        Table::clone_with_tail(
            Sectors(VOLUME / SECTOR_BYTES),
            Sectors(VOLUME / SECTOR_BYTES),
            CloneTarget {
                metadata: device_ref(&devices.metadata),
                destination: device_ref(&devices.destination),
                source: device_ref(&devices.source),
                region_size: RegionSize::new(region_sectors).expect("region size"),
                features: CloneFeatures {
                    no_hydration: true,
                    no_discard_passdown: false,
                },
                core,
            },
        )
        .expect("clone table")
    }

    fn report(fake: &FakeOs, name: &DmName) -> CloneStatusReport {
        match fake.clone_status(name).expect("status").status {
            CloneStatus::Active(report) => report,
            other => panic!("expected an active status, got {other}"),
        }
    }

    fn first_block(path: &Path) -> Vec<u8> {
        let file = File::open(path).expect("open");
        read_first_block(&file).expect("read").to_vec()
    }

    #[test]
    fn loops_are_found_by_inode_after_a_rename() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let a = bench.file("a", MIB);
        let b = bench.file("b", 2 * MIB);
        let loop_a = bench.attach(&a, false);
        let loop_b = bench.attach(&b, true);
        assert_eq!(loop_a.device, Path::new("/dev/loop0"));
        assert_eq!((loop_a.major, loop_a.minor), (7, 0));
        assert_eq!(
            (loop_b.minor, loop_b.size_bytes, loop_b.read_only),
            (1, 2 * MIB, true)
        );

        let renamed = bench.path("a-renamed");
        std::fs::rename(&a, &renamed).expect("rename");
        assert_eq!(fake.find(&renamed).expect("find"), vec![loop_a.clone()]);
        assert_eq!(fake.find(&b).expect("find"), vec![loop_b.clone()]);
        assert!(fake.find(&a).expect_err("gone").is_not_found());
        assert_eq!(LoopDevices::list(fake).expect("list").len(), 2);

        fake.detach(&loop_a.device).expect("detach");
        fake.detach(&loop_a.device)
            .expect("detaching twice is fine");
        fake.detach(Path::new("/dev/sda"))
            .expect("not a loop: nothing to do");
        // The smallest free number is reused, as LOOP_CTL_GET_FREE does.
        assert_eq!(bench.attach(&renamed, false).minor, 0);

        let missing = fake
            .attach(
                &bench.path("missing"),
                LoopOptions {
                    read_only: false,
                    direct_io: false,
                },
            )
            .expect_err("no file");
        assert_eq!(missing.kind, OsErrorKind::NotFound);

        File::options()
            .write(true)
            .open(&b)
            .and_then(|f| f.set_len(3 * MIB))
            .expect("grow");
        assert_eq!(
            fake.block_size_bytes(&loop_b.device).expect("size"),
            2 * MIB
        );
        fake.refresh_size(&loop_b.device).expect("refresh");
        assert_eq!(
            fake.block_size_bytes(&loop_b.device).expect("size"),
            3 * MIB
        );
        assert!(fake
            .refresh_size(Path::new("/dev/loop9"))
            .expect_err("absent")
            .is_not_found());
    }

    #[test]
    fn tables_need_existing_large_enough_devices() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let small = bench.attach(&bench.file("small", MIB), false);
        let name = dm("lin");
        let too_long =
            Table::linear(Sectors(2 * MIB / SECTOR_BYTES), device_ref(&small)).expect("table");
        let error = fake.create(&name, &too_long).expect_err("too small");
        assert!(error.detail.contains("too small"), "{error}");
        assert_eq!(fake.info(&name).expect("info"), None);

        let absent =
            Table::linear(Sectors(8), DeviceRef::path("/dev/loop7").expect("path")).expect("table");
        let error = fake.create(&name, &absent).expect_err("no such loop");
        assert!(error.detail.contains("device lookup failed"), "{error}");

        let ok = Table::linear(Sectors(MIB / SECTOR_BYTES), device_ref(&small)).expect("table");
        fake.create(&name, &ok).expect("create");
        assert_eq!(
            fake.create(&name, &ok).expect_err("exists").kind,
            OsErrorKind::Busy
        );
        assert!(fake
            .load(&dm("other"), &ok)
            .expect_err("absent")
            .is_not_found());
        // The kernel prints devices by number.
        assert_eq!(
            fake.table(&name).expect("table").to_string(),
            "0 2048 linear 7:0 0"
        );
        assert_eq!(DeviceMapper::list(fake).expect("list"), vec![name.clone()]);
        let error = fake.clone_status(&name).expect_err("linear");
        assert!(error.detail.contains("no clone target"), "{error}");

        // A read-only clone destination is refused.
        let devices = bench.clone_devices("ro");
        let ro_destination = Devices {
            destination: devices.source.clone(),
            ..devices
        };
        let error = fake
            .create(
                &dm("ro"),
                &clone_table(&ro_destination, REGION_SECTORS, CloneCoreArgs::default()),
            )
            .expect_err("read-only destination");
        assert!(error.detail.contains("read-only"), "{error}");
    }

    #[test]
    fn busy_devices_cannot_be_removed_or_detached() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let backing = bench.attach(&bench.file("vol", VOLUME), false);
        let name = dm("vol");
        let table =
            Table::linear(Sectors(VOLUME / SECTOR_BYTES), device_ref(&backing)).expect("table");
        fake.create(&name, &table).expect("create");

        let error = fake.detach(&backing.device).expect_err("under a table");
        assert_eq!(error.kind, OsErrorKind::Busy);

        fake.mkfs(&name.mapper_path(), FsType::Ext4, true)
            .expect("mkfs");
        let target = bench.dir("mnt");
        fake.mount(&name.mapper_path(), &target, FsType::Ext4, &[])
            .expect("mount");
        let info = fake.info(&name).expect("info").expect("exists");
        assert_eq!((info.major, info.open_count), (DM_MAJOR, 1));
        assert_eq!(
            fake.remove(&name).expect_err("mounted").kind,
            OsErrorKind::Busy
        );
        fake.unmount(&target).expect("unmount");

        fake.set_open_count(&name, 2).expect("exists");
        assert_eq!(
            fake.remove(&name).expect_err("open").kind,
            OsErrorKind::Busy
        );
        fake.set_open_count(&name, 0).expect("exists");

        fake.remove(&name).expect("remove");
        fake.remove(&name).expect("removing twice is fine");
        fake.detach(&backing.device).expect("free now");
    }

    #[test]
    fn clone_hydration_follows_the_kernel_rules() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("c");
        let name = dm("c");
        let core = CloneCoreArgs {
            hydration_threshold: Some(4),
            hydration_batch_size: Some(2),
        };
        fake.create(&name, &clone_table(&devices, REGION_SECTORS, core))
            .expect("create");

        let status = report(fake, &name);
        assert_eq!(
            (status.hydrated_regions, status.total_regions),
            (0, REGIONS)
        );
        assert!(status.features.no_hydration);
        assert_eq!(
            (status.hydration_threshold, status.hydration_batch_size),
            (4, 2)
        );
        assert_eq!(status.hydrating_regions, 0);
        assert_eq!(status.metadata_total_blocks, METADATA / 4096);
        assert!(status.metadata_used_blocks <= status.metadata_total_blocks);

        // Disabled: nothing moves.
        assert_eq!(fake.hydrate(&name, 100).expect("hydrate"), 0);
        fake.message(&name, &CloneMessage::EnableHydration)
            .expect("enable");
        let status = report(fake, &name);
        assert!(!status.features.no_hydration);
        assert_eq!(status.hydrating_regions, 4);
        assert_eq!(fake.hydrate(&name, 100).expect("hydrate"), 100);

        // Suspended: nothing moves either.
        fake.suspend(&name, SuspendFlush::Flush).expect("suspend");
        assert_eq!(fake.hydrate(&name, 100).expect("hydrate"), 100);
        assert_eq!(report(fake, &name).hydrating_regions, 0);
        fake.resume(&name).expect("resume");

        // Tunables do not survive a reload; hydration restarts disabled.
        fake.message(&name, &CloneMessage::HydrationThreshold(64))
            .expect("threshold");
        assert_eq!(report(fake, &name).hydration_threshold, 64);
        let plain = clone_table(&devices, REGION_SECTORS, CloneCoreArgs::default());
        fake.load(&name, &plain).expect("reload");
        assert!(
            fake.info(&name)
                .expect("info")
                .expect("exists")
                .inactive_table
        );
        fake.resume(&name).expect("resume");
        let status = report(fake, &name);
        assert_eq!(
            (status.hydration_threshold, status.hydration_batch_size),
            (
                KERNEL_DEFAULT_HYDRATION_THRESHOLD,
                KERNEL_DEFAULT_HYDRATION_BATCH_SIZE
            )
        );
        assert!(status.features.no_hydration);
        assert_eq!(
            status.hydrated_regions, 100,
            "hydration resumes where it was"
        );

        // Threshold 0 pauses too.
        fake.message(&name, &CloneMessage::EnableHydration)
            .expect("enable");
        fake.message(&name, &CloneMessage::HydrationThreshold(0))
            .expect("threshold");
        assert_eq!(fake.hydrate(&name, 10).expect("hydrate"), 100);
    }

    #[test]
    fn completion_and_metadata_changes_fire_events() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("e");
        let name = dm("e");
        fake.create(
            &name,
            &clone_table(&devices, REGION_SECTORS, CloneCoreArgs::default()),
        )
        .expect("create");
        fake.message(&name, &CloneMessage::EnableHydration)
            .expect("enable");
        let event = |fake: &FakeOs| fake.info(&name).expect("info").expect("exists").event_nr;
        assert_eq!(event(fake), 0);
        fake.hydrate(&name, REGIONS - 1).expect("hydrate");
        assert_eq!(event(fake), 0, "progress alone fires nothing");
        assert_eq!(
            fake.wait_event(&name, 0, Duration::from_millis(20))
                .expect("wait"),
            None
        );
        assert_eq!(fake.hydrate(&name, 5).expect("hydrate"), REGIONS);
        assert_eq!(event(fake), 1);
        assert!(report(fake, &name).may_switch_to_linear());
        // Already past: returns at once.
        assert_eq!(
            fake.wait_event(&name, 0, Duration::from_secs(60))
                .expect("wait"),
            Some(1)
        );
        // More hydration of a complete clone fires nothing.
        fake.hydrate(&name, 1).expect("hydrate");
        assert_eq!(event(fake), 1);

        // A waiter is woken by the metadata failing.
        let waiter = {
            let fake = fake.clone();
            let name = name.clone();
            std::thread::spawn(move || fake.wait_event(&name, 1, Duration::from_secs(30)))
        };
        while !fake
            .calls()
            .iter()
            .any(|c| c == &format!("dm.wait_event {name} 1"))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        fake.set_metadata_failed(&name).expect("fail");
        assert_eq!(waiter.join().expect("no panic").expect("wait"), Some(2));
        let status = fake.clone_status(&name).expect("status");
        assert_eq!(status.status, CloneStatus::Fail);
        assert_eq!(status.length, Sectors(VOLUME / SECTOR_BYTES));

        assert!(fake
            .wait_event(&dm("none"), 0, Duration::ZERO)
            .expect_err("absent")
            .is_not_found());
    }

    #[test]
    fn read_only_metadata_stops_hydration() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("r");
        let name = dm("r");
        fake.create(
            &name,
            &clone_table(&devices, REGION_SECTORS, CloneCoreArgs::default()),
        )
        .expect("create");
        fake.message(&name, &CloneMessage::EnableHydration)
            .expect("enable");
        fake.set_metadata_read_only(&name).expect("ro");
        assert_eq!(fake.info(&name).expect("info").expect("exists").event_nr, 1);
        assert_eq!(report(fake, &name).metadata_mode, MetadataMode::ReadOnly);
        assert_eq!(fake.hydrate(&name, 10).expect("hydrate"), 0);
    }

    #[test]
    fn metadata_is_formatted_only_when_zeroed_and_resumes_by_inode() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("m");
        let metadata_file = bench.path("m-meta");
        let name = dm("m");
        let table = clone_table(&devices, REGION_SECTORS, CloneCoreArgs::default());
        assert!(first_block(&metadata_file).iter().all(|&b| b == 0));
        fake.create(&name, &table).expect("create");
        assert!(
            first_block(&metadata_file).iter().any(|&b| b != 0),
            "the load formats the metadata"
        );
        fake.message(&name, &CloneMessage::EnableHydration)
            .expect("enable");
        fake.hydrate(&name, 300).expect("hydrate");
        fake.remove(&name).expect("remove");

        // Same file, even renamed: resumes.
        std::fs::rename(&metadata_file, bench.path("m-meta-renamed")).expect("rename");
        fake.create(&name, &table).expect("create again");
        assert_eq!(report(fake, &name).hydrated_regions, 300);
        fake.remove(&name).expect("remove");

        // Different geometry on existing metadata: EINVAL.
        let other_region = clone_table(&devices, 2 * REGION_SECTORS, CloneCoreArgs::default());
        let error = fake.create(&name, &other_region).expect_err("mismatch");
        assert!(error.detail.contains("don't match"), "{error}");
        assert!(fake.hazards().is_empty(), "{:?}", fake.hazards());

        // Zeroed again: starts fresh.
        File::options()
            .write(true)
            .open(bench.path("m-meta-renamed"))
            .and_then(|f| f.write_all_at(&[0; METADATA_BLOCK_BYTES], 0))
            .expect("zero");
        fake.create(&name, &table).expect("create fresh");
        assert_eq!(report(fake, &name).hydrated_regions, 0);
    }

    #[test]
    fn foreign_or_reused_metadata_is_caught() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("f");
        File::options()
            .write(true)
            .open(bench.path("f-meta"))
            .and_then(|f| f.write_all_at(b"leftovers", 0))
            .expect("dirty");
        let table = clone_table(&devices, REGION_SECTORS, CloneCoreArgs::default());
        let error = fake
            .create(&dm("f"), &table)
            .expect_err("garbage superblock");
        assert!(error.detail.contains("superblock"), "{error}");

        // Metadata formatted for one clone, loaded for another destination:
        // the kernel accepts it; the simulator records the hazard.
        let good = bench.clone_devices("g");
        fake.create(
            &dm("g"),
            &clone_table(&good, REGION_SECTORS, CloneCoreArgs::default()),
        )
        .expect("create");
        fake.remove(&dm("g")).expect("remove");
        let other_destination = bench.attach(&bench.file("h-dest", VOLUME), false);
        let mixed = Devices {
            destination: other_destination,
            ..good
        };
        fake.create(
            &dm("h"),
            &clone_table(&mixed, REGION_SECTORS, CloneCoreArgs::default()),
        )
        .expect("the kernel would load it");
        let hazards = fake.hazards();
        assert_eq!(hazards.len(), 1, "{hazards:?}");
        assert!(hazards[0].contains("reused"), "{hazards:?}");
    }

    #[test]
    fn undersized_metadata_is_refused_or_recorded() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("u");
        let tiny = Devices {
            metadata: bench.attach(&bench.file("u-tiny", 8 * 1024), false),
            ..devices
        };
        let table = clone_table(&tiny, REGION_SECTORS, CloneCoreArgs::default());
        let error = fake.create(&dm("u"), &table).expect_err("far too small");
        assert!(error.detail.contains("too small"), "{error}");
        assert!(fake.hazards().is_empty());

        // 1 MiB is below the floor of 1 MiB + 1024/4 bytes: loads, recorded.
        let small = Devices {
            metadata: bench.attach(&bench.file("u-small", MIB), false),
            ..tiny
        };
        let table = clone_table(&small, REGION_SECTORS, CloneCoreArgs::default());
        fake.create(&dm("u"), &table)
            .expect("the kernel would load it");
        let hazards = fake.hazards();
        assert_eq!(hazards.len(), 1, "{hazards:?}");
        assert!(hazards[0].contains("safe floor"), "{hazards:?}");
    }

    #[test]
    fn switching_to_linear_early_is_a_hazard_and_calls_show_the_order() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("s");
        let name = dm("s");
        let table = clone_table(&devices, REGION_SECTORS, CloneCoreArgs::default());
        let linear = table.linear_replacement().expect("replacement");
        fake.create(&name, &table).expect("create");
        fake.message(&name, &CloneMessage::EnableHydration)
            .expect("enable");
        fake.hydrate(&name, REGIONS).expect("hydrate");
        fake.clear_calls();

        fake.flush(&name.mapper_path()).expect("flush");
        fake.suspend(&name, SuspendFlush::Flush).expect("suspend");
        fake.load(&name, &linear).expect("load");
        fake.resume(&name).expect("resume");
        assert_eq!(
            fake.calls(),
            [
                "fs.flush /dev/mapper/liveclone-s",
                "dm.suspend liveclone-s flush",
                "dm.load liveclone-s linear",
                "dm.resume liveclone-s",
            ]
        );
        assert!(fake.hazards().is_empty(), "{:?}", fake.hazards());
        assert_eq!(
            fake.table(&name).expect("table").to_string(),
            "0 8192 linear 7:2 0"
        );
        // The metadata and source are free again.
        fake.detach(&devices.metadata.device)
            .expect("metadata free");
        fake.detach(&devices.source.device).expect("source free");

        let early = bench.clone_devices("t");
        let name = dm("t");
        let table = clone_table(&early, REGION_SECTORS, CloneCoreArgs::default());
        fake.create(&name, &table).expect("create");
        fake.message(&name, &CloneMessage::EnableHydration)
            .expect("enable");
        fake.hydrate(&name, REGIONS - 1).expect("hydrate");
        fake.load(&name, &table.linear_replacement().expect("replacement"))
            .expect("load");
        fake.resume(&name).expect("the kernel allows it");
        let hazards = fake.hazards();
        assert_eq!(hazards.len(), 1, "{hazards:?}");
        assert!(
            hazards[0].contains("1023/1024 regions hydrated"),
            "{hazards:?}"
        );
    }

    #[test]
    fn injected_failures_hit_once_and_are_logged() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let backing = bench.attach(&bench.file("v", MIB), false);
        let name = dm("v");
        let table =
            Table::linear(Sectors(MIB / SECTOR_BYTES), device_ref(&backing)).expect("table");
        fake.create(&name, &table).expect("create");
        fake.clear_calls();

        fake.fail_next("load", OsErrorKind::NoSpace);
        let error = fake.load(&name, &table).expect_err("injected");
        assert_eq!(error.kind, OsErrorKind::NoSpace);
        assert_eq!(error.operation, "dm.load liveclone-v linear");
        fake.load(&name, &table).expect("only once");

        // Qualified names pick one of the two `list`s.
        fake.fail_next("loop.list", OsErrorKind::Failed);
        DeviceMapper::list(fake).expect("dm.list is not affected");
        LoopDevices::list(fake).expect_err("loop.list fails");
        LoopDevices::list(fake).expect("once");

        fake.fail_next("ensure_dm_clone", OsErrorKind::Unsupported);
        assert_eq!(
            fake.ensure_dm_clone().expect_err("injected").kind,
            OsErrorKind::Unsupported
        );
        assert_eq!(
            fake.calls(),
            [
                "dm.load liveclone-v linear",
                "dm.load liveclone-v linear",
                "dm.list",
                "loop.list",
                "loop.list",
                "kernel.ensure_dm_clone",
            ]
        );
    }

    #[test]
    fn file_systems_follow_the_data_and_trims_discard() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let devices = bench.clone_devices("d");
        assert_eq!(
            fake.probe(&devices.source.device).expect("probe"),
            Some("ext4".to_owned())
        );
        assert_eq!(
            fake.probe(&devices.destination.device).expect("probe"),
            None
        );
        assert!(fake
            .probe(Path::new("/dev/loop99"))
            .expect_err("absent")
            .is_not_found());

        let name = dm("d");
        fake.create(
            &name,
            &clone_table(&devices, REGION_SECTORS, CloneCoreArgs::default()),
        )
        .expect("create");
        // The clone shows its source's file system: nothing must format it.
        let mapper = name.mapper_path();
        assert_eq!(fake.probe(&mapper).expect("probe"), Some("ext4".to_owned()));
        assert_eq!(fake.block_size_bytes(&mapper).expect("size"), VOLUME);

        let missing = bench.path("nowhere");
        assert!(fake
            .mount(&mapper, &missing, FsType::Ext4, &[])
            .expect_err("no target")
            .is_not_found());
        let target = bench.dir("mnt");
        let error = fake
            .mount(&mapper, &target, FsType::Xfs, &[])
            .expect_err("wrong type");
        assert!(error.detail.contains("wrong fs type"), "{error}");
        fake.mount(&mapper, &target, FsType::Ext4, &["noatime".to_owned()])
            .expect("mount");
        let info = fake.mount_at(&target).expect("mount_at").expect("mounted");
        assert_eq!(
            (info.major, info.minor, info.fs_type.as_str()),
            (DM_MAJOR, 0, "ext4")
        );
        assert!(!info.read_only);
        assert_eq!(fake.mounts_of(DM_MAJOR, 0).expect("mounts_of"), vec![info]);
        assert_eq!(
            fake.mkfs(&mapper, FsType::Ext4, true)
                .expect_err("mounted")
                .kind,
            OsErrorKind::Busy
        );

        // Discards hydrate half of the unhydrated regions, before any copy.
        fake.set_trim(3 * MIB, 50);
        assert_eq!(fake.trim(&target).expect("trim"), 3 * MIB);
        assert_eq!(report(fake, &name).hydrated_regions, REGIONS / 2);
        assert!(report(fake, &name).features.no_hydration);

        fake.freeze(&target).expect("freeze");
        assert_eq!(
            fake.freeze(&target).expect_err("twice").kind,
            OsErrorKind::Busy
        );
        assert_eq!(
            fake.trim(&target).expect_err("frozen").kind,
            OsErrorKind::Busy
        );
        fake.thaw(&target).expect("thaw");
        assert_eq!(
            fake.thaw(&target).expect_err("not frozen").kind,
            OsErrorKind::Failed
        );
        assert!(fake.freeze(&bench.path("x")).is_err());

        fake.grow(&mapper, &target, FsType::Ext4).expect("grow");
        assert!(fake
            .grow(&devices.source.device, &target, FsType::Ext4)
            .is_err());
        let usage = fake.usage(&target).expect("usage");
        assert_eq!(usage.total_bytes, VOLUME);
        assert_eq!(usage.used_bytes + usage.available_bytes, usage.total_bytes);
        assert_eq!(
            fake.usage(bench.dir.path()).expect("host"),
            DEFAULT_HOST_USAGE
        );
        let fixed = FsUsage {
            total_bytes: 1,
            ..DEFAULT_HOST_USAGE
        };
        fake.set_usage(bench.dir.path(), fixed);
        assert_eq!(fake.usage(&target).expect("overridden"), fixed);

        fake.unmount(&target).expect("unmount");
        fake.unmount(&target).expect("unmounting twice is fine");
        assert_eq!(fake.mount_at(&target).expect("mount_at"), None);
        fake.flush(&mapper).expect("flush a device");
        assert!(fake.flush(&missing).expect_err("absent").is_not_found());
    }

    #[test]
    fn bind_mounts_keep_the_device_open_and_device_nodes_bind_from_devtmpfs() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let backing = bench.attach(&bench.file("b", VOLUME), false);
        let name = dm("b");
        fake.create(
            &name,
            &Table::linear(Sectors(VOLUME / SECTOR_BYTES), device_ref(&backing)).expect("table"),
        )
        .expect("create");
        let mapper = name.mapper_path();
        fake.mkfs(&mapper, FsType::Ext4, true).expect("mkfs");
        let staging = bench.dir("staging");
        fake.mount(&mapper, &staging, FsType::Ext4, &[])
            .expect("mount");
        std::fs::create_dir(staging.join("data")).expect("subdirectory");
        let publish = bench.dir("publish");
        fake.bind_mount(&staging.join("data"), &publish, true)
            .expect("bind");
        let info = fake.mount_at(&publish).expect("mount_at").expect("mounted");
        assert_eq!(
            (info.major, info.minor, info.read_only),
            (DM_MAJOR, 0, true)
        );
        assert_eq!(info.root, Path::new("/data"));
        assert_eq!(fake.mounts_of(DM_MAJOR, 0).expect("mounts").len(), 2);

        let error = fake
            .unmount(bench.dir.path())
            .map(|()| "nothing mounted there");
        assert_eq!(error.expect("not a mount point"), "nothing mounted there");
        fake.unmount(&staging).expect("unmount staging");
        // The bind mount still holds the file system, so the device is open.
        assert_eq!(
            fake.remove(&name).expect_err("still open").kind,
            OsErrorKind::Busy
        );
        fake.unmount(&publish).expect("unmount publish");
        assert_eq!(
            fake.info(&name).expect("info").expect("exists").open_count,
            0
        );

        // Raw block: the device node binds onto a file, from devtmpfs.
        let block_target = bench.file("block", 0);
        fake.bind_mount(&mapper, &block_target, false)
            .expect("bind a device node");
        let info = fake
            .mount_at(&block_target)
            .expect("mount_at")
            .expect("mounted");
        assert_eq!(
            (info.major, info.minor, info.fs_type.as_str()),
            (0, 5, "devtmpfs")
        );
        assert_eq!(info.root, Path::new("/mapper/liveclone-b"));
        assert!(
            fake.bind_mount(&mapper, &staging, false).is_err(),
            "a node onto a directory"
        );
    }

    #[test]
    fn reflinks_copy_files_and_signatures_unless_unsupported() {
        let bench = Bench::new();
        let fake = &bench.fake;
        let original = bench.file("orig", MIB);
        File::options()
            .write(true)
            .open(&original)
            .and_then(|f| f.write_all_at(b"payload", 0))
            .expect("write");
        let device = bench.attach(&original, false);
        fake.mkfs(&device.device, FsType::Xfs, true).expect("mkfs");

        let copy = bench.path("copy");
        fake.reflink(&original, &copy).expect("reflink");
        assert_eq!(first_block(&copy)[..7], *b"payload");
        let error = fake.reflink(&original, &copy).expect_err("exists");
        assert_eq!(error.kind, OsErrorKind::Failed);

        // xfs refuses the copy's duplicate UUID until it is regenerated.
        let copy_device = bench.attach(&copy, false);
        assert_eq!(
            fake.probe(&copy_device.device).expect("probe"),
            Some("xfs".to_owned())
        );
        let (a, b) = (bench.dir("a"), bench.dir("b"));
        fake.mount(&device.device, &a, FsType::Xfs, &[])
            .expect("mount");
        let error = fake
            .mount(&copy_device.device, &b, FsType::Xfs, &[])
            .expect_err("duplicate");
        assert!(error.detail.contains("duplicate UUID"), "{error}");
        assert_eq!(
            fake.regenerate_uuid(&device.device, FsType::Xfs)
                .expect_err("mounted")
                .kind,
            OsErrorKind::Busy
        );
        fake.regenerate_uuid(&copy_device.device, FsType::Xfs)
            .expect("regenerate");
        fake.mount(&copy_device.device, &b, FsType::Xfs, &[])
            .expect("mount the copy");

        fake.set_reflink_supported(false);
        let error = fake
            .reflink(&original, &bench.path("copy2"))
            .expect_err("unsupported");
        assert_eq!(error.kind, OsErrorKind::Unsupported);
        assert!(!bench.path("copy2").exists());
    }

    #[test]
    fn kernel_check_is_configurable() {
        let fake = FakeOs::new();
        assert_eq!(
            fake.os().kernel.ensure_dm_clone().expect("available"),
            "1.0.0"
        );
        fake.set_dm_clone_error(Some((
            OsErrorKind::Unsupported,
            "no dm-clone module".to_owned(),
        )));
        let error = fake.ensure_dm_clone().expect_err("missing");
        assert_eq!(
            (error.kind, error.detail.as_str()),
            (OsErrorKind::Unsupported, "no dm-clone module")
        );
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let fake = FakeOs::new();
        let holder = fake.clone();
        let result = std::thread::spawn(move || {
            let _state = holder.lock();
            panic!("a test thread panics while holding the state");
        })
        .join();
        assert!(result.is_err());
        fake.fail_next("list", OsErrorKind::Busy);
        assert_eq!(
            DeviceMapper::list(&fake).expect_err("still works").kind,
            OsErrorKind::Busy
        );
    }
}
