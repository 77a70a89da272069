//! Engine tests over the OS simulator ([`FakeOs`]), a real [`FilePool`] and
//! a real [`JsonDirStore`], both in a temporary folder.
//!
//! Every OS call, pool call and record-store call the engine makes goes
//! through a *step* wrapper that numbers it, so a test can make exactly the
//! k-th step fail ([`Fault::ErrorAt`]; for OS calls through
//! `FakeOs::fail_next`, armed just before the call) or let the process die
//! just before it ([`Fault::CrashAt`]: that step and every later one fail
//! without any effect, and nothing the engine does afterwards, such as the
//! resume in a drop guard, reaches the OS, the pool or the records). The
//! crash matrix runs each operation once to list its steps, then once per
//! step and fault, restarts (a new [`Engine`] over the same simulator and
//! folders, then `recover`) or retries first, retries the operation as a
//! CO would, and checks the invariants ([`Rig::check`]).
//!
//! What the fault model does not cover:
//! * A crash *inside* one step. Record writes are atomic (the store's own
//!   tests cover a torn temporary file), but a pool file half created or
//!   half copied, or a tool killed half way, is modelled only as "not done"
//!   (or, crashing at the next step, "done").
//! * A reboot. Devices, loops, mounts and frozen file systems survive the
//!   restart here, as they survive a process restart; after a reboot none
//!   of them exist and recovery rebuilds everything from the records. The
//!   simulator cannot model that: its dm-clone metadata state is per
//!   instance.
//! * Data lost from caches on power loss: the simulator has no page cache,
//!   so the flushes before a switch are checked for order only.
//! * Work the engine does without the OS layer, the pool or the store (the
//!   private trim folder): it always succeeds here.

use crate::domain::device_class::DeviceClasses;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tempfile::TempDir;

use super::recovery::RecoveryReport;
use super::volumes::hidden_snapshot_for;
use super::{dm_name, CapacityRange, CreateVolume, Engine, EngineConfig, MountSpec, StageRequest};
use crate::domain::error::{DomainError, DomainResult, ErrorCode};
use crate::domain::file_pool::FilePool;
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::{
    AccessKind, ContentSource, CutMethod, HydrationStage, SnapshotRecord, SnapshotState,
    VolumeRecord, VolumeState,
};
use crate::domain::paths::AllowedRoots;
use crate::domain::pool::{BlockDevice, Pool, PoolCapacity, Storage};
use crate::domain::store::{JsonDirStore, Record, RecordStore, StoreError};
use crate::os::dm::{
    CloneMessage, CloneStatus, CloneStatusLine, CloneStatusReport, DeviceMapper, DeviceRef, DmInfo,
    DmName, Sectors, SuspendFlush, Table, TableLine, Target, SECTOR_BYTES,
};
use crate::os::fake::{FakeOs, LOOP_MAJOR};
use crate::os::fs::{Filesystems, FsType, FsUsage, MountInfo};
use crate::os::kernel::Kernel;
use crate::os::loopdev::{LoopDevice, LoopDevices, LoopOptions};
use crate::os::{Os, OsError, OsErrorKind, OsResult};

const MIB: u64 = 1 << 20;
/// Sources are 4 MiB: 1024 regions of 4 KiB.
const SOURCE_BYTES: u64 = 4 * MIB;
const LARGER_BYTES: u64 = 8 * MIB;
const EXPANDED_BYTES: u64 = 12 * MIB;

const SOURCE: &str = "source";
const CLONE: &str = "clone";
const SNAPSHOT: &str = "snapshot";
const EMPTY: &str = "empty";

/// Where a test writes into a source's data file, as a pod would.
const PATTERN_OFFSET: u64 = MIB + 512;
/// The first metadata block, where dm-clone (and the simulator) keeps its
/// superblock.
const METADATA_BLOCK: usize = 4096;
/// Where the tests stamp a formatted metadata file, inside its first block
/// but past the simulator's superblock marker: if the stamp ever goes while
/// the record says the metadata is bound, the file was zeroed or replaced.
const WITNESS_OFFSET: usize = 2048;
const WITNESS: &[u8] = b"engine tests: formatted metadata seen here\n";

/// What [`Rig::consistency_problems`] says of a metadata file left next to
/// a volume that is no longer a clone. The crash matrix tolerates it (see
/// `a_crash_after_recording_the_switch_leaves_no_metadata_file`): the file
/// goes when the volume is deleted.
const METADATA_LEFT_AFTER_SWITCH: &str = "metadata file left after the switch to linear";

/// What [`Rig::consistency_problems`] says of an image nothing reads that
/// is still kept or attached. Images are released after a deletion, a
/// switch or at start-up; a release that failed waits for the next one,
/// so only a check before a restart tolerates this.
const IMAGE_RELEASE_PENDING: &str = "image release pending";

const INJECTED: &str = "injected failure (engine tests)";
const CRASHED: &str = "the process crashed before this call (engine tests)";

// ---------------------------------------------------------------------------
// Steps and faults

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Step k fails with an error; the engine's error paths run.
    ErrorAt(usize),
    /// The process dies before step k: it and every later step fail
    /// without effect.
    CrashAt(usize),
}

enum Verdict {
    Run,
    Fail,
    Dead,
}

/// Holds the first step whose description starts with `prefix` until the
/// test has passed the barrier twice (once to see it reached, once to let
/// it go).
struct Gate {
    prefix: String,
    barrier: Arc<Barrier>,
}

#[derive(Default)]
struct FaultState {
    steps: Vec<String>,
    fault: Option<Fault>,
    gate: Option<Gate>,
}

/// Numbers the steps of the engine and decides which ones fail.
#[derive(Default)]
struct Faults(Mutex<FaultState>);

impl Faults {
    fn state(&self) -> MutexGuard<'_, FaultState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn begin(&self, step: String) -> Verdict {
        let (verdict, gate) = {
            let mut state = self.state();
            let index = state.steps.len();
            let verdict = match state.fault {
                Some(Fault::ErrorAt(k)) if k == index => Verdict::Fail,
                Some(Fault::CrashAt(k)) if index >= k => Verdict::Dead,
                _ => Verdict::Run,
            };
            let gated = state
                .gate
                .as_ref()
                .is_some_and(|gate| step.starts_with(&gate.prefix));
            let gate = if gated { state.gate.take() } else { None };
            state.steps.push(step);
            (verdict, gate)
        };
        if let Some(gate) = gate {
            gate.barrier.wait();
            gate.barrier.wait();
        }
        verdict
    }

    /// Starts counting steps from zero, with `fault` armed.
    fn arm(&self, fault: Option<Fault>) {
        let mut state = self.state();
        state.steps.clear();
        state.fault = fault;
    }

    fn steps(&self) -> Vec<String> {
        self.state().steps.clone()
    }

    fn gate_at(&self, prefix: &str, barrier: Arc<Barrier>) {
        self.state().gate = Some(Gate {
            prefix: prefix.to_owned(),
            barrier,
        });
    }
}

/// The simulator behind the step counter.
struct SteppedOs {
    fake: FakeOs,
    faults: Arc<Faults>,
}

impl SteppedOs {
    fn os(fake: &FakeOs, faults: &Arc<Faults>) -> Os {
        let stepped = Arc::new(SteppedOs {
            fake: fake.clone(),
            faults: Arc::clone(faults),
        });
        Os {
            dm: stepped.clone(),
            loops: stepped.clone(),
            fs: stepped.clone(),
            kernel: stepped,
        }
    }

    /// `op` is the simulator's service-qualified name (`dm.load`).
    fn enter(&self, op: &str, detail: impl Display) -> OsResult<()> {
        match self.faults.begin(format!("{op} {detail}")) {
            Verdict::Run => Ok(()),
            Verdict::Fail => {
                self.fake.fail_next(op, OsErrorKind::Failed);
                Ok(())
            }
            Verdict::Dead => Err(OsError::new(OsErrorKind::Failed, op, CRASHED)),
        }
    }
}

impl DeviceMapper for SteppedOs {
    fn create(&self, name: &DmName, table: &Table) -> OsResult<()> {
        self.enter("dm.create", name)?;
        self.fake.create(name, table)
    }
    fn load(&self, name: &DmName, table: &Table) -> OsResult<()> {
        self.enter("dm.load", name)?;
        self.fake.load(name, table)
    }
    fn suspend(&self, name: &DmName, flush: SuspendFlush) -> OsResult<()> {
        self.enter("dm.suspend", name)?;
        self.fake.suspend(name, flush)
    }
    fn resume(&self, name: &DmName) -> OsResult<()> {
        self.enter("dm.resume", name)?;
        self.fake.resume(name)
    }
    fn clear_inactive(&self, name: &DmName) -> OsResult<()> {
        self.enter("dm.clear_inactive", name)?;
        self.fake.clear_inactive(name)
    }
    fn remove(&self, name: &DmName) -> OsResult<()> {
        self.enter("dm.remove", name)?;
        DeviceMapper::remove(&self.fake, name)
    }
    fn info(&self, name: &DmName) -> OsResult<Option<DmInfo>> {
        self.enter("dm.info", name)?;
        self.fake.info(name)
    }
    fn table(&self, name: &DmName) -> OsResult<Table> {
        self.enter("dm.table", name)?;
        self.fake.table(name)
    }
    fn clone_status(&self, name: &DmName) -> OsResult<CloneStatusLine> {
        self.enter("dm.clone_status", name)?;
        self.fake.clone_status(name)
    }
    fn message(&self, name: &DmName, message: &CloneMessage) -> OsResult<()> {
        self.enter("dm.message", format_args!("{name} {message}"))?;
        self.fake.message(name, message)
    }
    fn wait_event(&self, name: &DmName, event_nr: u32, timeout: Duration) -> OsResult<Option<u32>> {
        self.enter("dm.wait_event", name)?;
        self.fake.wait_event(name, event_nr, timeout)
    }
    fn list(&self) -> OsResult<Vec<DmName>> {
        self.enter("dm.list", "")?;
        DeviceMapper::list(&self.fake)
    }
}

impl LoopDevices for SteppedOs {
    fn attach(&self, file: &Path, options: LoopOptions) -> OsResult<LoopDevice> {
        self.enter("loop.attach", file.display())?;
        self.fake.attach(file, options)
    }
    fn find(&self, file: &Path) -> OsResult<Vec<LoopDevice>> {
        self.enter("loop.find", file.display())?;
        self.fake.find(file)
    }
    fn list(&self) -> OsResult<Vec<LoopDevice>> {
        self.enter("loop.list", "")?;
        LoopDevices::list(&self.fake)
    }
    fn detach(&self, device: &Path) -> OsResult<()> {
        self.enter("loop.detach", device.display())?;
        self.fake.detach(device)
    }
    fn refresh_size(&self, device: &Path) -> OsResult<()> {
        self.enter("loop.refresh_size", device.display())?;
        self.fake.refresh_size(device)
    }
}

impl Filesystems for SteppedOs {
    fn probe(&self, device: &Path) -> OsResult<Option<String>> {
        self.enter("fs.probe", device.display())?;
        self.fake.probe(device)
    }
    fn mkfs(&self, device: &Path, fs: FsType, reads_zeros: bool) -> OsResult<()> {
        self.enter("fs.mkfs", device.display())?;
        self.fake.mkfs(device, fs, reads_zeros)
    }
    fn mount(&self, device: &Path, target: &Path, fs: FsType, options: &[String]) -> OsResult<()> {
        self.enter("fs.mount", target.display())?;
        self.fake.mount(device, target, fs, options)
    }
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()> {
        self.enter("fs.bind_mount", target.display())?;
        self.fake.bind_mount(source, target, read_only)
    }
    fn unmount(&self, target: &Path) -> OsResult<()> {
        self.enter("fs.unmount", target.display())?;
        self.fake.unmount(target)
    }
    fn mount_at(&self, target: &Path) -> OsResult<Option<MountInfo>> {
        self.enter("fs.mount_at", target.display())?;
        self.fake.mount_at(target)
    }
    fn mounts_of(&self, major: u32, minor: u32) -> OsResult<Vec<MountInfo>> {
        self.enter("fs.mounts_of", format_args!("{major}:{minor}"))?;
        self.fake.mounts_of(major, minor)
    }
    fn trim(&self, mount_point: &Path) -> OsResult<u64> {
        self.enter("fs.trim", mount_point.display())?;
        self.fake.trim(mount_point)
    }
    fn freeze(&self, mount_point: &Path) -> OsResult<()> {
        self.enter("fs.freeze", mount_point.display())?;
        self.fake.freeze(mount_point)
    }
    fn thaw(&self, mount_point: &Path) -> OsResult<()> {
        self.enter("fs.thaw", mount_point.display())?;
        self.fake.thaw(mount_point)
    }
    fn grow(&self, device: &Path, mount_point: &Path, fs: FsType) -> OsResult<()> {
        self.enter("fs.grow", mount_point.display())?;
        self.fake.grow(device, mount_point, fs)
    }
    fn regenerate_uuid(&self, device: &Path, fs: FsType) -> OsResult<()> {
        self.enter("fs.regenerate_uuid", device.display())?;
        self.fake.regenerate_uuid(device, fs)
    }
    fn usage(&self, path: &Path) -> OsResult<FsUsage> {
        self.enter("fs.usage", path.display())?;
        self.fake.usage(path)
    }
    fn block_size_bytes(&self, device: &Path) -> OsResult<u64> {
        self.enter("fs.block_size_bytes", device.display())?;
        self.fake.block_size_bytes(device)
    }
    fn reflink(&self, source: &Path, dest: &Path) -> OsResult<()> {
        self.enter("fs.reflink", dest.display())?;
        self.fake.reflink(source, dest)
    }
    fn flush(&self, path: &Path) -> OsResult<()> {
        self.enter("fs.flush", path.display())?;
        self.fake.flush(path)
    }
    fn discard(&self, device: &Path, offset: u64, length: u64) -> OsResult<()> {
        self.enter("fs.discard", device.display())?;
        self.fake.discard(device, offset, length)
    }
}

impl Kernel for SteppedOs {
    fn ensure_dm_clone(&self) -> OsResult<String> {
        self.enter("kernel.ensure_dm_clone", "")?;
        self.fake.ensure_dm_clone()
    }
    fn set_kcopyd_subjob_kib(&self, kib: u32) -> OsResult<u32> {
        self.enter("kernel.set_kcopyd_subjob_kib", kib)?;
        self.fake.set_kcopyd_subjob_kib(kib)
    }
}

/// The file pool behind the step counter (its own OS calls are steps too:
/// it is built over a [`SteppedOs`]).
struct SteppedPool {
    inner: FilePool,
    faults: Arc<Faults>,
}

impl SteppedPool {
    fn enter(&self, op: &str, what: impl Display) -> DomainResult<()> {
        match self.faults.begin(format!("pool.{op} {what}")) {
            Verdict::Run => Ok(()),
            Verdict::Fail => Err(DomainError::internal(format!("pool.{op}: {INJECTED}"))),
            Verdict::Dead => Err(DomainError::internal(format!("pool.{op}: {CRASHED}"))),
        }
    }
}

impl Pool for SteppedPool {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn check(&self) -> Result<(), String> {
        self.inner.check()
    }
    fn capacity(&self) -> DomainResult<PoolCapacity> {
        self.enter("capacity", "")?;
        self.inner.capacity()
    }
    fn create(&self, item: &Storage, bytes: u64) -> DomainResult<()> {
        self.enter("create", item)?;
        self.inner.create(item, bytes)
    }
    fn exists(&self, item: &Storage) -> DomainResult<bool> {
        self.enter("exists", item)?;
        self.inner.exists(item)
    }
    fn size(&self, item: &Storage) -> DomainResult<u64> {
        self.enter("size", item)?;
        self.inner.size(item)
    }
    fn grow(&self, item: &Storage, bytes: u64) -> DomainResult<()> {
        self.enter("grow", item)?;
        self.inner.grow(item, bytes)
    }
    fn remove(&self, item: &Storage) -> DomainResult<()> {
        self.enter("remove", item)?;
        self.inner.remove(item)
    }
    fn attach(&self, item: &Storage, read_only: bool) -> DomainResult<BlockDevice> {
        self.enter("attach", item)?;
        self.inner.attach(item, read_only)
    }
    fn detach(&self, item: &Storage) -> DomainResult<()> {
        self.enter("detach", item)?;
        self.inner.detach(item)
    }
    fn attachments(&self, item: &Storage) -> DomainResult<Vec<BlockDevice>> {
        self.enter("attachments", item)?;
        self.inner.attachments(item)
    }
    fn release(&self, item: &Storage, device: &BlockDevice) -> DomainResult<()> {
        self.enter("release", item)?;
        self.inner.release(item, device)
    }
    fn fresh_storage_reads_zeros(&self) -> bool {
        self.inner.fresh_storage_reads_zeros()
    }
    fn holes(&self, item: &Storage, length: u64) -> DomainResult<Vec<std::ops::Range<u64>>> {
        self.enter("holes", item)?;
        self.inner.holes(item, length)
    }
    fn instant_clone_supported(&self) -> DomainResult<bool> {
        self.enter("instant_clone_supported", "pool")?;
        self.inner.instant_clone_supported()
    }
    fn clone_instant(&self, from: &Storage, to: &Storage) -> DomainResult<bool> {
        self.enter("clone_instant", format_args!("{from} -> {to}"))?;
        self.inner.clone_instant(from, to)
    }
    fn rename(&self, from: &Storage, to: &Storage) -> DomainResult<()> {
        self.enter("rename", format_args!("{from} -> {to}"))?;
        self.inner.rename(from, to)
    }
    fn relabel(&self, item: &Storage) -> DomainResult<()> {
        self.enter("relabel", item)?;
        self.inner.relabel(item)
    }
    fn list(&self) -> DomainResult<Vec<Storage>> {
        self.enter("list", "")?;
        self.inner.list()
    }
}

/// A record store behind the step counter.
struct SteppedStore<R> {
    inner: JsonDirStore<R>,
    faults: Arc<Faults>,
}

impl<R: Record> SteppedStore<R> {
    fn enter(&self, op: &str, what: impl Display) -> Result<(), StoreError> {
        let fail = |why: &str| StoreError::Io {
            path: PathBuf::from(R::KIND),
            source: std::io::Error::other(why.to_owned()),
        };
        match self.faults.begin(format!("store.{op} {} {what}", R::KIND)) {
            Verdict::Run => Ok(()),
            Verdict::Fail => Err(fail(INJECTED)),
            Verdict::Dead => Err(fail(CRASHED)),
        }
    }
}

impl<R: Record> RecordStore<R> for SteppedStore<R> {
    fn get(&self, id: &R::Id) -> Result<Option<R>, StoreError> {
        self.enter("get", id)?;
        self.inner.get(id)
    }
    fn put(&self, record: &R) -> Result<(), StoreError> {
        self.enter("put", record.id())?;
        self.inner.put(record)
    }
    fn remove(&self, id: &R::Id) -> Result<(), StoreError> {
        self.enter("remove", id)?;
        self.inner.remove(id)
    }
    fn list(&self) -> Result<Vec<R>, StoreError> {
        self.enter("list", "")?;
        self.inner.list()
    }
}

// ---------------------------------------------------------------------------
// The rig

/// One hydration of one volume, for the metadata ledger.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HydrationKey {
    volume: VolumeId,
    source: SnapshotId,
    started_at: u64,
    generation: u32,
}

#[derive(Debug, Default)]
struct LedgerEntry {
    /// The metadata file was seen formatted and stamped with [`WITNESS`].
    stamped: bool,
    /// The highest hydrated count seen.
    hydrated: u64,
}

/// A node: the simulator, an engine over it, the pool and state folders,
/// and what the tests remember across restarts.
struct Rig {
    fake: FakeOs,
    faults: Arc<Faults>,
    engine: Engine,
    root: PathBuf,
    kubelet: PathBuf,
    /// The same pool folder, for paths and listings (never through the
    /// engine's step counter).
    files: FilePool,
    volumes: JsonDirStore<VolumeRecord>,
    snapshots: JsonDirStore<SnapshotRecord>,
    /// Volumes staged by the test, with their staging paths.
    staged: Vec<(VolumeId, String)>,
    /// Figures a set-up notes for later checks (inodes).
    notes: BTreeMap<String, u64>,
    ledger: BTreeMap<HydrationKey, LedgerEntry>,
    _dir: TempDir,
}

fn rig() -> Rig {
    Rig::new(true)
}

/// The rig's second device class (a file pool in its own folder).
const OTHER_CLASS: &str = "other";

fn vid(name: &str) -> VolumeId {
    VolumeId::for_name(name).expect("valid volume name")
}

fn sid(name: &str) -> SnapshotId {
    SnapshotId::for_name(name).expect("valid snapshot name")
}

fn ext4() -> AccessKind {
    AccessKind::Filesystem { fs: FsType::Ext4 }
}

fn path_string(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

fn pattern(name: &str) -> Vec<u8> {
    format!("what a pod wrote to {name} before the cut").into_bytes()
}

fn holds_pattern(path: &Path, name: &str) -> bool {
    let want = pattern(name);
    let mut found = vec![0u8; want.len()];
    File::open(path)
        .and_then(|file| file.read_exact_at(&mut found, PATTERN_OFFSET))
        .is_ok()
        && found == want
}

fn read_first_block(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut block = vec![0u8; METADATA_BLOCK];
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

/// The index of the first call at or after `from` that starts with `prefix`.
fn find_call(calls: &[String], from: usize, prefix: &str) -> Option<usize> {
    calls
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, call)| call.starts_with(prefix))
        .map(|(index, _)| index)
}

fn expect_call(calls: &[String], from: usize, prefix: &str) -> usize {
    find_call(calls, from, prefix)
        .unwrap_or_else(|| panic!("no call {prefix:?} from index {from} in {calls:#?}"))
}

fn build_engine(fake: &FakeOs, faults: &Arc<Faults>, root: &Path, kubelet: &Path) -> Engine {
    let os = SteppedOs::os(fake, faults);
    let pool = FilePool::open(&root.join("pool"), os.clone()).expect("pool");
    let state = root.join("state");
    let volumes = JsonDirStore::<VolumeRecord>::open(&state).expect("volume store");
    let snapshots = JsonDirStore::<SnapshotRecord>::open(&state).expect("snapshot store");
    // A second class, outside the step counter (the crash matrices count
    // the default class's steps), for clones between classes.
    let other = FilePool::open(&root.join(OTHER_CLASS), os.clone()).expect("second pool");
    let classes = DeviceClasses::single(Arc::new(SteppedPool {
        inner: pool,
        faults: Arc::clone(faults),
    }))
    .with(OTHER_CLASS.parse().expect("class name"), Arc::new(other))
    .expect("two classes");
    Engine::new(
        os,
        classes,
        Arc::new(SteppedStore {
            inner: volumes,
            faults: Arc::clone(faults),
        }),
        Arc::new(SteppedStore {
            inner: snapshots,
            faults: Arc::clone(faults),
        }),
        EngineConfig {
            node_id: "engine-tests".to_owned(),
            work_dir: root.join("work"),
            allowed_roots: AllowedRoots::new([kubelet.to_path_buf()]),
            max_volumes: 16,
        },
    )
}

impl Rig {
    fn new(reflink: bool) -> Self {
        // tmpfs when there is one: the store and the pool fsync a lot, and
        // the crash matrix builds hundreds of rigs.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("liveclone-engine-")
                .tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("temporary directory");
        let root = dir
            .path()
            .canonicalize()
            .expect("resolvable temporary directory");
        let kubelet = root.join("kubelet");
        for folder in [
            root.join("pool"),
            root.join(OTHER_CLASS),
            root.join("work"),
            kubelet.join("staging"),
        ] {
            std::fs::create_dir_all(&folder).expect("test folders");
        }
        let fake = FakeOs::new();
        fake.set_reflink_supported(reflink);
        // Trims discard a quarter of a new clone: its hydrated count starts
        // above zero, so a metadata re-format would show.
        fake.set_trim(MIB, 25);
        let faults = Arc::new(Faults::default());
        let engine = build_engine(&fake, &faults, &root, &kubelet);
        let state = root.join("state");
        Rig {
            files: FilePool::open(&root.join("pool"), fake.os()).expect("pool"),
            volumes: JsonDirStore::open(&state).expect("volume store"),
            snapshots: JsonDirStore::open(&state).expect("snapshot store"),
            fake,
            faults,
            engine,
            root,
            kubelet,
            staged: Vec::new(),
            notes: BTreeMap::new(),
            ledger: BTreeMap::new(),
            _dir: dir,
        }
    }

    /// A process restart: a new engine over the same simulator (devices,
    /// loops and mounts survive) and the same folders, then recovery.
    fn restart(&mut self) -> RecoveryReport {
        self.engine = build_engine(&self.fake, &self.faults, &self.root, &self.kubelet);
        self.engine.recover().expect("recovery runs")
    }

    fn create(
        &self,
        name: &str,
        bytes: u64,
        source: Option<ContentSource>,
    ) -> DomainResult<VolumeRecord> {
        self.create_as(name, bytes, source, ext4())
    }

    fn create_as(
        &self,
        name: &str,
        bytes: u64,
        source: Option<ContentSource>,
        access: AccessKind,
    ) -> DomainResult<VolumeRecord> {
        self.engine.create_volume(CreateVolume {
            name: name.to_owned(),
            capacity: CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            },
            access,
            source,
            parameters: BTreeMap::new(),
        })
    }

    fn clone_of(&self, name: &str, source: &VolumeId) -> VolumeRecord {
        self.create(name, 0, Some(ContentSource::Volume(source.clone())))
            .unwrap_or_else(|e| panic!("cloning {source} as {name}: {e}"))
    }

    /// A 4 MiB ext4 volume, staged (so formatted and mounted), with a
    /// pattern written to its data file; notes the data file's inode as
    /// `<name> data`.
    fn fs_source(&mut self, name: &str) -> VolumeId {
        let record = self
            .create(name, SOURCE_BYTES, None)
            .expect("creating a source volume");
        self.stage(&record.id);
        let data = self.path_of(&Storage::Data {
            volume: record.id.clone(),
            generation: record.generation,
        });
        OpenOptions::new()
            .write(true)
            .open(&data)
            .and_then(|file| {
                // Data everywhere (no holes, so a clone has everything to
                // copy), then the recognisable pattern.
                file.write_all_at(&vec![0xa5; SOURCE_BYTES as usize], 0)?;
                file.write_all_at(&pattern(name), PATTERN_OFFSET)
            })
            .expect("writing into the source's data");
        let inode = std::fs::metadata(&data).expect("data file").ino();
        self.notes.insert(format!("{name} data"), inode);
        record.id
    }

    fn staging_path(&self, id: &VolumeId) -> String {
        path_string(&self.kubelet.join("staging").join(id.as_str()))
    }

    fn stage(&mut self, id: &VolumeId) {
        let path = self.staging_path(id);
        self.engine
            .stage(
                id,
                &StageRequest {
                    staging_path: path.clone(),
                    mount: Some(MountSpec {
                        fs: None,
                        flags: Vec::new(),
                    }),
                },
            )
            .unwrap_or_else(|e| panic!("staging {id}: {e}"));
        self.staged.push((id.clone(), path));
    }

    fn unstage(&mut self, id: &VolumeId) {
        let path = self.staging_path(id);
        self.engine
            .unstage(id, &path)
            .unwrap_or_else(|e| panic!("unstaging {id}: {e}"));
        self.staged.retain(|(staged, _)| staged != id);
    }

    fn path_of(&self, item: &Storage) -> PathBuf {
        self.files.path_of(item)
    }

    fn inode(&self, item: &Storage) -> Option<u64> {
        std::fs::metadata(self.path_of(item)).ok().map(|m| m.ino())
    }

    fn note(&self, key: &str) -> u64 {
        *self
            .notes
            .get(key)
            .unwrap_or_else(|| panic!("nothing noted as {key:?}"))
    }

    fn record(&self, id: &VolumeId) -> Option<VolumeRecord> {
        self.volumes.get(id).expect("reading a volume record")
    }

    fn snapshot_record(&self, id: &SnapshotId) -> Option<SnapshotRecord> {
        self.snapshots.get(id).expect("reading a snapshot record")
    }

    fn table(&self, id: &VolumeId) -> Table {
        DeviceMapper::table(&self.fake, &dm_name(id))
            .unwrap_or_else(|e| panic!("the table of {id}: {e}"))
    }

    fn status(&self, id: &VolumeId) -> CloneStatusReport {
        let line = self
            .fake
            .clone_status(&dm_name(id))
            .unwrap_or_else(|e| panic!("the clone status of {id}: {e}"));
        match line.status {
            CloneStatus::Active(report) => report,
            other => panic!("the clone {id} is not active: {other:?}"),
        }
    }

    fn hydrate(&self, id: &VolumeId, regions: u64) -> u64 {
        self.fake
            .hydrate(&dm_name(id), regions)
            .unwrap_or_else(|e| panic!("hydrating {id}: {e}"))
    }

    /// What the monitor does first in every round: trim and start the copy
    /// of volumes that wait for it (new file-system clones, volumes a
    /// redirect cut left reading from their image).
    fn start_awaiting(&self) {
        for id in self
            .engine
            .awaiting_hydration_start()
            .expect("listing volumes that await their copy")
        {
            self.engine
                .start_hydration(&id)
                .unwrap_or_else(|e| panic!("starting the hydration of {id}: {e}"));
        }
    }

    fn hydrate_all(&self, id: &VolumeId) {
        self.start_awaiting();
        let report = self.status(id);
        let after = self.hydrate(id, report.total_regions);
        assert_eq!(after, report.total_regions, "{id} hydrates to the end");
    }

    /// Hydrates the clone to the end and switches it to linear.
    fn settle(&self, id: &VolumeId) {
        self.hydrate_all(id);
        let switched = self
            .engine
            .complete_hydration(id)
            .unwrap_or_else(|e| panic!("completing {id}: {e}"));
        assert!(switched, "{id} switches once fully hydrated");
    }

    fn loops(&self) -> BTreeMap<u32, LoopDevice> {
        LoopDevices::list(&self.fake)
            .expect("listing loops")
            .into_iter()
            .map(|device| (device.minor, device))
            .collect()
    }

    // -- invariants ---------------------------------------------------------

    /// Everything the crash matrix requires of a settled node: the metadata
    /// ledger, then [`Self::consistency_problems`].
    fn check(&mut self) -> Vec<String> {
        let mut problems = self.audit_metadata();
        problems.extend(self.consistency_problems());
        problems
    }

    fn assert_consistent(&mut self, when: &str) {
        let problems = self.check();
        assert!(problems.is_empty(), "{when}:\n  {}", problems.join("\n  "));
    }

    /// Stamps formatted metadata of bound clones and checks earlier stamps
    /// and hydrated counts are still there: once a record says
    /// `MetadataBound` or later, the metadata is never zeroed, replaced or
    /// re-formatted.
    fn audit_metadata(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let volumes = self.volumes.list().expect("listing volume records");
        self.ledger
            .retain(|key, _| volumes.iter().any(|v| v.id == key.volume));
        for volume in &volumes {
            let Some(hydration) = &volume.hydration else {
                continue;
            };
            // A deletion removes the metadata before the record.
            if hydration.stage < HydrationStage::MetadataBound
                || volume.state == VolumeState::Deleting
            {
                continue;
            }
            let key = HydrationKey {
                volume: volume.id.clone(),
                source: hydration.source.clone(),
                started_at: hydration.started_at,
                generation: volume.generation,
            };
            let path = self.path_of(&Storage::Metadata(volume.id.clone()));
            let entry = self.ledger.entry(key).or_default();
            let block = match read_first_block(&path) {
                Ok(block) => block,
                Err(e) => {
                    problems.push(format!(
                        "{}: metadata unreadable at stage {:?}: {e}",
                        volume.name, hydration.stage
                    ));
                    continue;
                }
            };
            let formatted = block[..16].iter().any(|&b| b != 0);
            let witnessed = block[WITNESS_OFFSET..].starts_with(WITNESS);
            if formatted {
                if entry.stamped && !witnessed {
                    problems.push(format!(
                        "{}: metadata replaced or re-formatted after it was formatted \
                         (stage {:?})",
                        volume.name, hydration.stage
                    ));
                }
                if !witnessed {
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|file| file.write_all_at(WITNESS, WITNESS_OFFSET as u64))
                        .expect("stamping metadata");
                }
                entry.stamped = true;
            } else if entry.stamped {
                problems.push(format!(
                    "{}: metadata zeroed again after it was formatted (stage {:?})",
                    volume.name, hydration.stage
                ));
            }
            if let Ok(line) = self.fake.clone_status(&dm_name(&volume.id)) {
                if let CloneStatus::Active(report) = line.status {
                    if report.hydrated_regions < entry.hydrated {
                        problems.push(format!(
                            "{}: hydrated count went back from {} to {} (metadata re-formatted?)",
                            volume.name, entry.hydrated, report.hydrated_regions
                        ));
                    }
                    entry.hydrated = entry.hydrated.max(report.hydrated_regions);
                }
            }
        }
        problems
    }

    /// Records, devices, loops and pool files agree; no hazards.
    fn consistency_problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .fake
            .hazards()
            .into_iter()
            .map(|hazard| format!("hazard: {hazard}"))
            .collect();
        let volumes = self.volumes.list().expect("listing volume records");
        let snapshots = self.snapshots.list().expect("listing snapshot records");
        let loops = self.loops();
        let devices = DeviceMapper::list(&self.fake).expect("listing devices");
        let items = self.files.list().expect("listing the pool");
        let read_by_clones: BTreeSet<&SnapshotId> = volumes
            .iter()
            .filter_map(|v| v.hydration.as_ref().map(|h| &h.source))
            .collect();

        let mut in_tables = BTreeSet::new();
        for name in &devices {
            if !volumes.iter().any(|v| dm_name(&v.id) == *name) {
                problems.push(format!("device {name} has no volume record"));
            }
            let Ok(table) = DeviceMapper::table(&self.fake, name) else {
                problems.push(format!("device {name} has no live table"));
                continue;
            };
            for line in table.lines() {
                for device in line_devices(line) {
                    if let DeviceRef::Number {
                        major: LOOP_MAJOR,
                        minor,
                    } = device
                    {
                        in_tables.insert(*minor);
                    }
                }
            }
            // A crash in a cut must not leave a file system frozen.
            if let Ok(Some(info)) = self.fake.info(name) {
                for mount in self
                    .fake
                    .mounts_of(info.major, info.minor)
                    .unwrap_or_default()
                {
                    if self.fake.freeze(&mount.mount_point).is_ok() {
                        let _ = self.fake.thaw(&mount.mount_point);
                    } else {
                        problems.push(format!(
                            "{} (on {name}) was left frozen",
                            mount.mount_point.display()
                        ));
                    }
                }
            }
        }

        let mut by_inode = BTreeMap::new();
        for item in &items {
            if let Some(inode) = self.inode(item) {
                by_inode.insert(inode, item.clone());
            }
        }
        for device in loops.values() {
            match by_inode.get(&device.backing_inode) {
                None => problems.push(format!(
                    "{} is attached to a file that is no longer in the pool",
                    device.device.display()
                )),
                Some(item) if !in_tables.contains(&device.minor) => {
                    let kept_for_a_clone = device.read_only
                        && matches!(item, Storage::Image(s) if read_by_clones.contains(s));
                    let why = match item {
                        Storage::Image(_) if device.read_only => IMAGE_RELEASE_PENDING,
                        Storage::Metadata(v)
                            if volumes.iter().any(|r| r.id == *v && r.hydration.is_none()) =>
                        {
                            METADATA_LEFT_AFTER_SWITCH
                        }
                        _ => "a stray",
                    };
                    if !kept_for_a_clone {
                        problems.push(format!(
                            "{why}: {} ({item}, {}) is attached but no table uses it",
                            device.device.display(),
                            if device.read_only {
                                "read-only"
                            } else {
                                "read-write"
                            }
                        ));
                    }
                }
                Some(_) => {}
            }
        }

        for volume in &volumes {
            problems.extend(self.volume_problems(volume, &loops));
        }
        for item in &items {
            let explained = match item {
                Storage::Data { volume, generation } => volumes
                    .iter()
                    .any(|v| v.id == *volume && v.generation == *generation),
                Storage::Image(snapshot) => snapshots.iter().any(|s| s.id == *snapshot),
                Storage::Metadata(volume) => {
                    if volumes
                        .iter()
                        .any(|v| v.id == *volume && v.hydration.is_none())
                    {
                        problems.push(format!("{item}: {METADATA_LEFT_AFTER_SWITCH}"));
                        continue;
                    }
                    volumes
                        .iter()
                        .any(|v| v.id == *volume && v.hydration.is_some())
                }
            };
            if !explained {
                problems.push(format!("pool file {item} is explained by no record"));
            }
        }
        for snapshot in &snapshots {
            if snapshot.state != SnapshotState::Ready {
                problems.push(format!(
                    "snapshot {} is {:?}",
                    snapshot.name, snapshot.state
                ));
            }
            if (snapshot.hidden || snapshot.deleted) && !read_by_clones.contains(&snapshot.id) {
                problems.push(format!(
                    "{IMAGE_RELEASE_PENDING}: snapshot {} (hidden {}, deleted {}) is kept with \
                     no clone reading it",
                    snapshot.name, snapshot.hidden, snapshot.deleted
                ));
            } else if self.inode(&Storage::Image(snapshot.id.clone())).is_none() {
                problems.push(format!("snapshot {} has no image", snapshot.name));
            }
        }
        problems
    }

    /// The volume's device has the table its record calls for, over the
    /// right files, with the record's hydration settings.
    fn volume_problems(
        &self,
        volume: &VolumeRecord,
        loops: &BTreeMap<u32, LoopDevice>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let who = &volume.name;
        if volume.state != VolumeState::Ready {
            problems.push(format!("volume {who} is {:?}", volume.state));
        }
        let name = dm_name(&volume.id);
        match self.fake.info(&name) {
            Ok(Some(info)) => {
                if info.suspended {
                    problems.push(format!("volume {who}: device left suspended"));
                }
                if info.inactive_table {
                    problems.push(format!("volume {who}: device has an inactive table"));
                }
            }
            Ok(None) => {
                problems.push(format!("volume {who} has no device"));
                return problems;
            }
            Err(e) => {
                problems.push(format!("volume {who}: {e}"));
                return problems;
            }
        }
        let table = self.table(&volume.id);
        // Which file (inode) a table device maps, and read-only or not.
        let file_of = |device: &DeviceRef| match device {
            DeviceRef::Number {
                major: LOOP_MAJOR,
                minor,
            } => loops.get(minor).map(|l| (l.backing_inode, l.read_only)),
            _ => None,
        };
        let writable = |item: Storage| self.inode(&item).map(|inode| (inode, false));
        let data = writable(Storage::Data {
            volume: volume.id.clone(),
            generation: volume.generation,
        });
        let length = Sectors(volume.capacity_bytes / SECTOR_BYTES);
        let Some(hydration) = &volume.hydration else {
            let linear_over_data = matches!(table.lines(), [line]
                if line.start == Sectors::ZERO
                    && line.length == length
                    && matches!(&line.target, Target::Linear(linear)
                        if linear.offset == Sectors::ZERO
                            && data.is_some()
                            && file_of(&linear.device) == data));
            if !linear_over_data {
                problems.push(format!(
                    "volume {who}: table {table} is not linear over data generation {}",
                    volume.generation
                ));
            }
            return problems;
        };
        let source_length = Sectors(hydration.source_bytes / SECTOR_BYTES);
        let metadata = writable(Storage::Metadata(volume.id.clone()));
        let image = self
            .inode(&Storage::Image(hydration.source.clone()))
            .map(|inode| (inode, true));
        let head_ok = table.lines().first().is_some_and(|line| {
            line.start == Sectors::ZERO
                && line.length == source_length
                && matches!(&line.target, Target::Clone(clone)
                    if metadata.is_some() && file_of(&clone.metadata) == metadata
                        && data.is_some() && file_of(&clone.destination) == data
                        && image.is_some() && file_of(&clone.source) == image
                        && clone.region_size.sectors().0 == hydration.region_sectors)
        });
        let tail_ok = match table.lines() {
            [_] => length == source_length,
            [head, tail] => {
                length > source_length
                    && tail.start == source_length
                    && tail.start.checked_add(tail.length) == Some(length)
                    && matches!((&head.target, &tail.target), (Target::Clone(clone), Target::Linear(linear))
                        if linear.device == clone.destination && linear.offset == source_length)
            }
            _ => false,
        };
        if !head_ok || !tail_ok {
            problems.push(format!(
                "volume {who}: table {table} is not the clone its record describes \
                 (metadata, data generation {}, image of {}, {} + {} sectors)",
                volume.generation,
                hydration.source,
                source_length,
                length.0.saturating_sub(source_length.0)
            ));
        }
        // A new file-system clone, and a volume a redirect cut left reading
        // from the image, have hydration off until the monitor trims them
        // and starts the copy.
        let awaiting = self
            .engine
            .awaiting_hydration_start()
            .is_ok_and(|ids| ids.contains(&volume.id));
        if hydration.stage != HydrationStage::Enabled
            && volume.state == VolumeState::Ready
            && !awaiting
        {
            problems.push(format!(
                "volume {who}: ready but hydration stage {:?}",
                hydration.stage
            ));
        }
        match self.fake.clone_status(&name).map(|line| line.status) {
            Ok(CloneStatus::Active(report)) => {
                let enabled = !hydration.paused && hydration.stage >= HydrationStage::Trimmed;
                if report.features.no_hydration == enabled {
                    problems.push(format!(
                        "volume {who}: hydration is {} on the device but should be {}",
                        if enabled { "off" } else { "on" },
                        if enabled { "on" } else { "off" },
                    ));
                }
                if (report.hydration_threshold, report.hydration_batch_size)
                    != (hydration.threshold, hydration.batch_size)
                {
                    problems.push(format!(
                        "volume {who}: tunables {}/{} on the device, {}/{} in the record",
                        report.hydration_threshold,
                        report.hydration_batch_size,
                        hydration.threshold,
                        hydration.batch_size
                    ));
                }
            }
            other => problems.push(format!("volume {who}: clone status {other:?}")),
        }
        problems
    }

    /// Unstages and deletes everything through the engine, then checks
    /// nothing is left: no records, pool files, devices, loops or hazards.
    fn delete_everything(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for (id, path) in std::mem::take(&mut self.staged) {
            if self.record(&id).is_some() {
                if let Err(e) = self.engine.unstage(&id, &path) {
                    problems.push(format!("unstaging {id}: {e}"));
                }
            }
        }
        for volume in self.volumes.list().expect("listing volume records") {
            if let Err(e) = self.engine.delete_volume(&volume.id) {
                problems.push(format!("deleting volume {}: {e}", volume.name));
            }
        }
        for snapshot in self.snapshots.list().expect("listing snapshot records") {
            if !snapshot.hidden {
                if let Err(e) = self.engine.delete_snapshot(&snapshot.id) {
                    problems.push(format!("deleting snapshot {}: {e}", snapshot.name));
                }
            }
        }
        let volumes = self.volumes.list().expect("listing volume records");
        if !volumes.is_empty() {
            problems.push(format!(
                "volume records left after deleting everything: {:?}",
                volumes.iter().map(|v| &v.name).collect::<Vec<_>>()
            ));
        }
        let snapshots = self.snapshots.list().expect("listing snapshot records");
        if !snapshots.is_empty() {
            problems.push(format!(
                "snapshot records left after deleting everything: {:?}",
                snapshots.iter().map(|s| &s.name).collect::<Vec<_>>()
            ));
        }
        let items = self.files.list().expect("listing the pool");
        if !items.is_empty() {
            problems.push(format!(
                "pool files left after deleting everything: {}",
                items
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let devices = DeviceMapper::list(&self.fake).expect("listing devices");
        if !devices.is_empty() {
            problems.push(format!(
                "devices left after deleting everything: {devices:?}"
            ));
        }
        let loops = self.loops();
        if !loops.is_empty() {
            problems.push(format!(
                "loops left after deleting everything: {:?}",
                loops
                    .values()
                    .map(|l| l.backing_file.display().to_string())
                    .collect::<Vec<_>>()
            ));
        }
        problems.extend(
            self.fake
                .hazards()
                .into_iter()
                .map(|h| format!("hazard: {h}")),
        );
        problems
    }

    fn assert_all_deleted(&mut self) {
        let problems = self.delete_everything();
        assert!(
            problems.is_empty(),
            "deleting everything:\n  {}",
            problems.join("\n  ")
        );
    }
}

fn line_devices(line: &TableLine) -> Vec<&DeviceRef> {
    match &line.target {
        Target::Linear(linear) => vec![&linear.device],
        Target::Clone(clone) => vec![&clone.metadata, &clone.destination, &clone.source],
    }
}

fn is_linear(table: &Table) -> bool {
    table
        .lines()
        .iter()
        .all(|line| matches!(line.target, Target::Linear(_)))
}

// ---------------------------------------------------------------------------
// 1. Happy paths

#[test]
fn an_empty_volume_is_a_linear_table_over_a_loop() {
    let mut rig = rig();
    let volume = rig.create(EMPTY, LARGER_BYTES, None).expect("create");
    assert_eq!(volume.state, VolumeState::Ready);
    assert_eq!(volume.id, vid(EMPTY));
    assert_eq!(volume.capacity_bytes, LARGER_BYTES);
    assert!(volume.hydration.is_none());
    let table = rig.table(&volume.id);
    assert!(is_linear(&table) && table.lines().len() == 1, "{table}");
    assert_eq!(table.length(), Sectors(LARGER_BYTES / SECTOR_BYTES));
    assert!(
        !rig.fake.calls().iter().any(|c| c.starts_with("dm.message")),
        "an independent volume gets no clone messages"
    );
    rig.assert_consistent("after creating an empty volume");

    // Staging formats it once and mounts it; publishing bind-mounts that.
    rig.stage(&volume.id);
    let target = rig.kubelet.join("pod-target");
    rig.engine
        .publish(
            &volume.id,
            &super::PublishRequest {
                staging_path: rig.staging_path(&volume.id),
                target_path: path_string(&target),
                block: false,
                read_only: false,
                single_writer: false,
            },
        )
        .expect("publish");
    let mkfs = rig
        .fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("fs.mkfs"))
        .count();
    assert_eq!(mkfs, 1, "formatted once");
    let deleting = rig.engine.delete_volume(&volume.id).expect_err("in use");
    assert_eq!(deleting.code, ErrorCode::FailedPrecondition);
    rig.engine
        .unpublish(&volume.id, &path_string(&target))
        .expect("unpublish");
    rig.assert_consistent("after publishing");
    rig.assert_all_deleted();
}

/// The index of the first trim of `volume` (its private trim mount or its
/// staging path, both named by its ID).
fn trim_of(calls: &[String], volume: &VolumeId) -> Option<usize> {
    calls
        .iter()
        .position(|call| call.starts_with("fs.trim") && call.contains(volume.as_str()))
}

/// The order of a clone's set-up, from CreateVolume to the start of its
/// copy: the table is loaded with hydration off, trimmed (file systems
/// only), then the tunables and `enable_hydration` are sent.
fn check_clone_setup_order(calls: &[String], clone: &VolumeId, trimmed: bool) {
    let name = dm_name(clone);
    let create = expect_call(calls, 0, &format!("dm.create {name} clone"));
    let enable = format!("dm.message {name} enable_hydration");
    let first_enable = expect_call(calls, create, &enable);
    assert_eq!(
        find_call(calls, 0, &enable),
        Some(first_enable),
        "enable_hydration before the table exists"
    );
    if trimmed {
        let trim =
            trim_of(calls, clone).unwrap_or_else(|| panic!("no trim of {clone} in {calls:#?}"));
        assert!(
            create < trim && trim < first_enable,
            "hydration enabled (call {first_enable}) before the trim (call {trim}): {calls:#?}"
        );
    } else {
        assert_eq!(trim_of(calls, clone), None, "a block clone is not trimmed");
    }
    let threshold = expect_call(
        calls,
        create,
        &format!("dm.message {name} hydration_threshold"),
    );
    let batch = expect_call(
        calls,
        create,
        &format!("dm.message {name} hydration_batch_size"),
    );
    assert!(threshold < first_enable && batch < first_enable);
}

/// What CreateVolume does for a file-system clone: its table with hydration
/// off, and neither a mount, nor a trim, nor `enable_hydration`; those are
/// the monitor's (`start_hydration`), so the call's cost does not grow with
/// the volume's size.
fn check_created_without_trim(rig: &Rig, calls: &[String], clone: &VolumeId) {
    let name = dm_name(clone);
    expect_call(calls, 0, &format!("dm.create {name} clone"));
    for call in calls {
        assert!(
            !call.starts_with("fs.mount ") && !call.starts_with("fs.trim"),
            "CreateVolume mounted or trimmed: {call} in {calls:#?}"
        );
    }
    assert_eq!(
        find_call(calls, 0, &format!("dm.message {name} enable_hydration")),
        None,
        "CreateVolume enabled hydration before the trim: {calls:#?}"
    );
    let record = rig.record(clone).expect("the clone's record");
    assert_eq!(record.state, VolumeState::Ready);
    assert_eq!(
        record.hydration.as_ref().map(|h| h.stage),
        Some(HydrationStage::SourceHolesSkipped),
        "a new file-system clone waits for its trim"
    );
    assert!(rig.status(clone).features.no_hydration);
    assert!(
        rig.engine
            .awaiting_hydration_start()
            .expect("listing")
            .contains(clone),
        "the monitor does not see the clone as waiting"
    );
}

/// The switch: flush of the clone device, then of the destination, then
/// load linear (inactive), suspend without freezing the file system, resume.
fn check_switch_order(calls: &[String], clone: &VolumeId) {
    let name = dm_name(clone);
    let flush = expect_call(
        calls,
        0,
        &format!("fs.flush {}", name.mapper_path().display()),
    );
    let flush_data = expect_call(calls, flush, "fs.flush /dev/loop");
    let load = expect_call(calls, 0, &format!("dm.load {name} linear"));
    let suspend = expect_call(calls, load, &format!("dm.suspend {name} flush-keep-fs"));
    let resume = expect_call(calls, suspend, &format!("dm.resume {name}"));
    assert!(
        flush < flush_data && flush_data < load && load < suspend && suspend < resume,
        "switch out of order: {calls:#?}"
    );
}

fn clone_of_a_volume_hydrates_and_switches(reflink: bool) {
    let mut rig = Rig::new(reflink);
    let source = rig.fs_source(SOURCE);
    rig.fake.clear_calls();
    let clone = rig.clone_of(CLONE, &source);
    assert_eq!(clone.state, VolumeState::Ready);
    assert_eq!(clone.capacity_bytes, SOURCE_BYTES);
    assert_eq!(
        clone.content_source,
        Some(ContentSource::Volume(source.clone()))
    );
    let hydration = clone.hydration.clone().expect("a new clone hydrates");
    let hidden = hidden_snapshot_for(&clone.id).expect("hidden snapshot ID");
    assert_eq!(hydration.source, hidden);
    check_created_without_trim(&rig, &rig.fake.calls(), &clone.id);

    let cut = rig
        .snapshot_record(&hidden)
        .expect("the hidden cut is recorded");
    assert!(cut.hidden);
    assert_eq!(cut.state, SnapshotState::Ready);
    let image = rig.path_of(&Storage::Image(hidden.clone()));
    assert!(
        holds_pattern(&image, SOURCE),
        "the image holds the source's data"
    );
    let source_record = rig.record(&source).expect("source");
    if reflink {
        assert_eq!(cut.method, Some(CutMethod::Reflink));
        assert!(
            source_record.hydration.is_none(),
            "a reflink cut leaves the source alone"
        );
        assert_eq!(
            rig.inode(&Storage::Data {
                volume: source.clone(),
                generation: 0
            }),
            Some(rig.note("source data"))
        );
    } else {
        assert_eq!(cut.method, Some(CutMethod::Redirect));
        assert_eq!(
            std::fs::metadata(&image).expect("image").ino(),
            rig.note("source data"),
            "a redirect cut renames the source's data file into the image"
        );
        assert_eq!(source_record.generation, 1);
        assert_eq!(
            source_record.hydration.as_ref().map(|h| &h.source),
            Some(&hidden)
        );
    }
    rig.assert_consistent("after cloning");
    // The monitor's next round trims the clone and starts its copy.
    rig.start_awaiting();
    check_clone_setup_order(&rig.fake.calls(), &clone.id, true);
    assert_eq!(
        rig.record(&clone.id)
            .and_then(|r| r.hydration)
            .map(|h| h.stage),
        Some(HydrationStage::Enabled)
    );
    assert!(!rig.status(&clone.id).features.no_hydration);
    rig.assert_consistent("after the clone's hydration started");
    assert!(rig
        .engine
        .sample_hydration(&clone.id)
        .expect("sample")
        .is_some());
    assert!(
        !rig.engine.complete_hydration(&clone.id).expect("not yet"),
        "a partly hydrated clone does not switch"
    );
    assert!(is_linear(&rig.table(&source)) == reflink);

    rig.hydrate_all(&clone.id);
    rig.fake.clear_calls();
    assert!(rig.engine.complete_hydration(&clone.id).expect("switch"));
    check_switch_order(&rig.fake.calls(), &clone.id);
    let done = rig.record(&clone.id).expect("clone");
    assert!(done.hydration.is_none());
    assert_eq!(
        done.last_hydration.as_ref().map(|h| &h.source),
        Some(&hidden)
    );
    assert!(is_linear(&rig.table(&clone.id)));
    assert!(
        rig.inode(&Storage::Metadata(clone.id.clone())).is_none(),
        "metadata removed"
    );
    assert!(rig
        .engine
        .sample_hydration(&clone.id)
        .expect("sample")
        .is_none());
    if !reflink {
        // The source reads the same image until it is independent again.
        assert!(image.exists(), "the source still hydrates from the image");
        rig.settle(&source);
    }
    assert!(
        !image.exists(),
        "the hidden image goes with its last reader"
    );
    assert!(rig.snapshot_record(&hidden).is_none());
    assert!(rig.fake.hazards().is_empty(), "{:?}", rig.fake.hazards());
    rig.assert_consistent("after the switch");
    rig.assert_all_deleted();
}

#[test]
fn a_clone_of_a_volume_on_a_reflink_pool_hydrates_and_switches_to_linear() {
    clone_of_a_volume_hydrates_and_switches(true);
}

#[test]
fn a_clone_of_a_volume_on_a_pool_without_reflink_hydrates_and_switches_to_linear() {
    clone_of_a_volume_hydrates_and_switches(false);
}

/// A volume in one device class, its snapshot (an image in the same
/// class), and a clone of that snapshot in the default class: the clone's
/// data and metadata go to its own class, it reads the image from the
/// other, and it ends an independent copy in its own class.
#[test]
fn a_clone_reads_its_source_from_another_device_class() {
    let rig = Rig::new(false);
    let other = FilePool::open(&rig.root.join(OTHER_CLASS), rig.fake.os()).expect("second pool");
    let in_other = BTreeMap::from([(
        crate::domain::sizing::DEVICE_CLASS_KEY.to_owned(),
        OTHER_CLASS.to_owned(),
    )]);
    let request = |name: &str, source, parameters: &BTreeMap<String, String>| CreateVolume {
        name: name.to_owned(),
        capacity: CapacityRange {
            required_bytes: SOURCE_BYTES,
            limit_bytes: 0,
        },
        access: AccessKind::Block,
        source,
        parameters: parameters.clone(),
    };

    let unknown = BTreeMap::from([(
        crate::domain::sizing::DEVICE_CLASS_KEY.to_owned(),
        "missing".to_owned(),
    )]);
    let refused = rig
        .engine
        .create_volume(request("nowhere", None, &unknown))
        .expect_err("a class the node lacks");
    assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused}");
    assert!(refused.message.contains("missing"), "{refused}");
    assert!(rig.volumes.list().expect("records").is_empty());

    let source = rig
        .engine
        .create_volume(request(SOURCE, None, &in_other))
        .expect("a volume in the other class");
    assert_eq!(
        source.device_class.as_ref().map(|c| c.as_str()),
        Some(OTHER_CLASS)
    );
    let source_data = Storage::Data {
        volume: source.id.clone(),
        generation: 0,
    };
    assert!(other.exists(&source_data).expect("exists"));
    assert!(!rig.files.exists(&source_data).expect("exists"));
    OpenOptions::new()
        .write(true)
        .open(other.path_of(&source_data))
        .and_then(|file| {
            file.write_all_at(&vec![0xa5; SOURCE_BYTES as usize], 0)?;
            file.write_all_at(&pattern(SOURCE), PATTERN_OFFSET)
        })
        .expect("writing the source's data");

    let snapshot = rig
        .engine
        .create_snapshot(SNAPSHOT, &source.id)
        .expect("snapshot");
    assert_eq!(
        snapshot.device_class.as_ref().map(|c| c.as_str()),
        Some(OTHER_CLASS)
    );
    let image = Storage::Image(snapshot.id.clone());
    assert!(
        other.exists(&image).expect("exists"),
        "the image stays in its volume's class"
    );

    let clone = rig
        .engine
        .create_volume(request(
            CLONE,
            Some(ContentSource::Snapshot(snapshot.id.clone())),
            &BTreeMap::new(),
        ))
        .expect("a clone into the default class");
    assert_eq!(clone.device_class, None);
    assert!(rig
        .files
        .exists(&Storage::Metadata(clone.id.clone()))
        .expect("exists"));
    assert!(!other
        .exists(&Storage::Metadata(clone.id.clone()))
        .expect("exists"));
    // The clone's table reads the image through the other class's device.
    let reading = other.attachments(&image).expect("attachments");
    assert_eq!(reading.len(), 1, "{reading:?}");
    assert!(reading[0].read_only);
    let table = rig.table(&clone.id).to_string();
    assert!(
        table.contains(&format!("{}:{}", reading[0].major, reading[0].minor)),
        "{table}"
    );
    rig.settle(&clone.id);
    assert!(is_linear(&rig.table(&clone.id)));
    assert!(
        !rig.table(&clone.id)
            .to_string()
            .contains(&format!("{}:{}", reading[0].major, reading[0].minor)),
        "the switched clone no longer reads the other class"
    );
    assert!(
        other.exists(&image).expect("exists"),
        "the user's snapshot is kept"
    );

    assert_eq!(
        rig.engine
            .available_capacity(Some(&OTHER_CLASS.parse().expect("class")))
            .expect("capacity"),
        other.capacity().expect("capacity").available_bytes
    );
    rig.engine.delete_volume(&clone.id).expect("delete clone");
    rig.engine
        .delete_snapshot(&snapshot.id)
        .expect("delete snapshot");
    rig.engine.delete_volume(&source.id).expect("delete source");
    assert!(
        other.list().expect("list").is_empty(),
        "nothing left in the other class"
    );
}

#[test]
fn a_clone_of_a_snapshot_hydrates_and_keeps_the_snapshot() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    let snapshot = rig
        .engine
        .create_snapshot(SNAPSHOT, &source)
        .expect("snapshot");
    assert_eq!(snapshot.method, Some(CutMethod::Reflink));
    rig.fake.clear_calls();
    let clone = rig
        .create(CLONE, 0, Some(ContentSource::Snapshot(snapshot.id.clone())))
        .expect("clone of a snapshot");
    check_created_without_trim(&rig, &rig.fake.calls(), &clone.id);
    rig.start_awaiting();
    check_clone_setup_order(&rig.fake.calls(), &clone.id, true);
    let hydration = clone.hydration.clone().expect("hydrating");
    assert_eq!(hydration.source, snapshot.id);
    assert!(
        rig.snapshots
            .list()
            .expect("snapshots")
            .iter()
            .all(|s| !s.hidden),
        "no hidden cut for a clone of a snapshot"
    );
    rig.assert_consistent("after cloning a snapshot");
    rig.settle(&clone.id);
    let image = Storage::Image(snapshot.id.clone());
    assert!(
        rig.inode(&image).is_some(),
        "the CO's snapshot outlives its clones"
    );
    assert!(
        rig.files
            .attachments(&image)
            .expect("attachments")
            .is_empty(),
        "but its image is detached once nothing reads it"
    );
    assert_eq!(rig.engine.list_snapshots().expect("list").len(), 1);
    rig.assert_consistent("after the switch");
    rig.assert_all_deleted();
}

#[test]
fn a_clone_larger_than_its_source_gets_a_linear_tail_and_a_grown_file_system() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    let snapshot = rig
        .engine
        .create_snapshot(SNAPSHOT, &source)
        .expect("snapshot");
    let clone = rig
        .create(
            CLONE,
            LARGER_BYTES,
            Some(ContentSource::Snapshot(snapshot.id.clone())),
        )
        .expect("larger clone");
    assert!(clone.needs_fs_grow);
    let table = rig.table(&clone.id);
    let kinds: Vec<_> = table.lines().iter().map(|l| l.target.type_name()).collect();
    assert_eq!(kinds, ["clone", "linear"], "{table}");
    assert_eq!(table.length(), Sectors(LARGER_BYTES / SECTOR_BYTES));
    rig.assert_consistent("after creating a larger clone");

    rig.fake.clear_calls();
    rig.stage(&clone.id);
    expect_call(&rig.fake.calls(), 0, "fs.grow");
    assert!(!rig.record(&clone.id).expect("clone").needs_fs_grow);

    rig.hydrate_all(&clone.id);
    assert!(rig.engine.complete_hydration(&clone.id).expect("switch"));
    let table = rig.table(&clone.id);
    assert!(is_linear(&table) && table.lines().len() == 1, "{table}");
    assert_eq!(table.length(), Sectors(LARGER_BYTES / SECTOR_BYTES));
    rig.assert_consistent("after the switch");
    rig.assert_all_deleted();
}

#[test]
fn a_block_clone_is_not_trimmed_and_hydrates_at_once() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    rig.fake.clear_calls();
    let clone = rig
        .create_as(
            CLONE,
            0,
            Some(ContentSource::Volume(source.clone())),
            AccessKind::Block,
        )
        .expect("block clone");
    check_clone_setup_order(&rig.fake.calls(), &clone.id, false);
    assert!(!rig.status(&clone.id).features.no_hydration);
    rig.assert_consistent("after a block clone");
    rig.assert_all_deleted();
}

#[test]
fn regions_where_the_source_is_a_hole_are_not_copied() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    // Punch the source's data file back to one written block (the
    // pattern): the clone must copy only the region holding it.
    let data = rig.path_of(&Storage::Data {
        volume: source.clone(),
        generation: 0,
    });
    let file = OpenOptions::new().write(true).open(&data).expect("data");
    file.set_len(0).expect("truncate");
    file.set_len(SOURCE_BYTES).expect("extend sparse");
    file.write_all_at(&pattern(SOURCE), PATTERN_OFFSET)
        .expect("pattern");
    rig.fake.clear_calls();
    let clone = rig
        .create_as(
            CLONE,
            0,
            Some(ContentSource::Volume(source.clone())),
            AccessKind::Block,
        )
        .expect("block clone");
    let status = rig.status(&clone.id);
    let region_bytes = status.region_size.sectors().0 * SECTOR_BYTES;
    let pattern_regions = (PATTERN_OFFSET + pattern(SOURCE).len() as u64).div_ceil(region_bytes)
        - PATTERN_OFFSET / region_bytes;
    assert_eq!(
        status.total_regions - status.hydrated_regions,
        pattern_regions,
        "only the regions holding data are left to copy"
    );
    let calls = rig.fake.calls();
    let discard = expect_call(&calls, 0, "fs.discard");
    let enable = expect_call(
        &calls,
        0,
        &format!("dm.message {} enable_hydration", dm_name(&clone.id)),
    );
    assert!(
        discard < enable,
        "holes are skipped before hydration starts: {calls:#?}"
    );
    rig.assert_consistent("after a clone of a sparse source");
    rig.settle(&clone.id);
    rig.assert_all_deleted();
}

#[test]
fn tunables_and_the_hydration_switch_are_sent_again_after_every_load() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    let clone = rig.clone_of(CLONE, &source);
    rig.start_awaiting();
    let tuned = rig
        .engine
        .tune_hydration(&clone.id, Some(64), Some(16))
        .expect("tune");
    assert_eq!((tuned.threshold, tuned.batch_size), (64, 16));
    let report = rig.status(&clone.id);
    assert_eq!(
        (report.hydration_threshold, report.hydration_batch_size),
        (64, 16)
    );

    // Growing reloads the table (clone + a longer tail) with hydration off.
    rig.fake.clear_calls();
    let (bytes, grow) = rig
        .engine
        .expand_volume(
            &clone.id,
            CapacityRange {
                required_bytes: EXPANDED_BYTES,
                limit_bytes: 0,
            },
        )
        .expect("expand");
    assert_eq!((bytes, grow), (EXPANDED_BYTES, true));
    let calls = rig.fake.calls();
    let name = dm_name(&clone.id);
    let load = expect_call(&calls, 0, &format!("dm.load {name} clone+linear"));
    let resume = expect_call(&calls, load, &format!("dm.resume {name}"));
    for message in [
        "hydration_threshold 64",
        "hydration_batch_size 16",
        "enable_hydration",
    ] {
        expect_call(&calls, resume, &format!("dm.message {name} {message}"));
    }
    let report = rig.status(&clone.id);
    assert!(
        !report.features.no_hydration,
        "hydration enabled again after the load"
    );
    assert_eq!(
        (report.hydration_threshold, report.hydration_batch_size),
        (64, 16)
    );
    assert_eq!(
        rig.table(&clone.id).length(),
        Sectors(EXPANDED_BYTES / SECTOR_BYTES)
    );

    // A restart re-sends them too.
    rig.fake.clear_calls();
    let report = rig.restart();
    assert!(report.failures.is_empty(), "{report:?}");
    expect_call(
        &rig.fake.calls(),
        0,
        &format!("dm.message {name} enable_hydration"),
    );
    rig.assert_consistent("after the expansion and a restart");
    rig.assert_all_deleted();
}

#[test]
fn hydration_is_never_enabled_while_paused() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    let clone = rig.clone_of(CLONE, &source);
    let name = dm_name(&clone.id);
    let enables = |rig: &Rig| {
        rig.fake
            .calls()
            .iter()
            .filter(|c| c.starts_with(&format!("dm.message {name} enable_hydration")))
            .count()
    };
    // Paused before the monitor started it: the start trims and records
    // it as started, but leaves it paused.
    rig.engine.pause_hydration(&clone.id).expect("pause");
    rig.fake.clear_calls();
    rig.start_awaiting();
    assert_eq!(
        rig.record(&clone.id)
            .and_then(|r| r.hydration)
            .map(|h| h.stage),
        Some(HydrationStage::Enabled)
    );
    assert!(trim_of(&rig.fake.calls(), &clone.id).is_some());
    let before = rig.status(&clone.id).hydrated_regions;
    assert!(rig.status(&clone.id).features.no_hydration);
    assert_eq!(
        rig.hydrate(&clone.id, 10),
        before,
        "no progress while paused"
    );

    rig.engine
        .expand_volume(
            &clone.id,
            CapacityRange {
                required_bytes: EXPANDED_BYTES,
                limit_bytes: 0,
            },
        )
        .expect("expand while paused");
    rig.engine
        .tune_hydration(&clone.id, Some(2048), Some(512))
        .expect("tune while paused");
    let report = rig.restart();
    assert!(report.failures.is_empty(), "{report:?}");
    rig.stage(&clone.id);
    assert_eq!(enables(&rig), 0, "{:#?}", rig.fake.calls());
    assert!(rig.status(&clone.id).features.no_hydration);
    assert_eq!(rig.hydrate(&clone.id, 10), before);
    rig.assert_consistent("paused");

    rig.engine.resume_hydration(&clone.id).expect("resume");
    assert_eq!(enables(&rig), 1);
    assert_eq!(rig.hydrate(&clone.id, 10), before + 10);
    rig.assert_consistent("resumed");
    rig.assert_all_deleted();
}

// ---------------------------------------------------------------------------
// 2. Crash at every step

/// An operation of the crash matrix: a set-up, the operation (whose result,
/// as text, a retry must repeat), and what must hold afterwards besides the
/// general invariants.
struct Scenario {
    name: &'static str,
    reflink: bool,
    setup: fn(&mut Rig),
    op: fn(&Rig) -> DomainResult<String>,
    verify: fn(&Rig) -> Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Restart (recovery), then the CO's retry.
    AfterRestart,
    /// The CO retries against the same process; then a restart.
    BeforeRestart,
}

fn run_crash_matrix(scenario: &Scenario) {
    let (baseline, steps) = {
        let mut rig = Rig::new(scenario.reflink);
        (scenario.setup)(&mut rig);
        rig.assert_consistent(&format!("{}: after the set-up", scenario.name));
        rig.faults.arm(None);
        let result = (scenario.op)(&rig)
            .unwrap_or_else(|e| panic!("{}: fails without faults: {e}", scenario.name));
        let steps = rig.faults.steps();
        let mut problems = rig.check();
        problems.extend((scenario.verify)(&rig));
        problems.extend(rig.delete_everything());
        assert!(
            problems.is_empty(),
            "{} without faults:\n  {}",
            scenario.name,
            problems.join("\n  ")
        );
        (result, steps)
    };
    assert!(!steps.is_empty(), "{}: no steps counted", scenario.name);
    let mut failures = Vec::new();
    let mut trials = 0;
    for (k, step) in steps.iter().enumerate() {
        for (fault, retry) in [
            (Fault::ErrorAt(k), Retry::AfterRestart),
            (Fault::ErrorAt(k), Retry::BeforeRestart),
            (Fault::CrashAt(k), Retry::AfterRestart),
        ] {
            trials += 1;
            let problems = crash_trial(scenario, fault, retry, &baseline);
            if !problems.is_empty() {
                failures.push(format!(
                    "{fault:?} `{step}`, retry {retry:?}:\n    {}",
                    problems.join("\n    ")
                ));
            }
        }
    }
    eprintln!(
        "{}: {} steps, {trials} trials, {} failed",
        scenario.name,
        steps.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{}: {} of {trials} trials over {} steps broke an invariant:\n{}",
        scenario.name,
        failures.len(),
        steps.len(),
        failures.join("\n")
    );
}

fn crash_trial(scenario: &Scenario, fault: Fault, retry: Retry, baseline: &str) -> Vec<String> {
    let mut rig = Rig::new(scenario.reflink);
    (scenario.setup)(&mut rig);
    let mut problems = rig.audit_metadata();
    rig.faults.arm(Some(fault));
    let first = (scenario.op)(&rig);
    rig.faults.arm(None);
    problems.extend(
        rig.audit_metadata()
            .into_iter()
            .map(|p| format!("right after the fault: {p}")),
    );
    let retried = match retry {
        Retry::AfterRestart => {
            let report = rig.restart();
            if !report.failures.is_empty() {
                problems.push(format!("recovery failed: {:?}", report.failures));
            }
            problems.extend(
                rig.audit_metadata()
                    .into_iter()
                    .map(|p| format!("after recovery: {p}")),
            );
            (scenario.op)(&rig)
        }
        Retry::BeforeRestart => {
            let retried = (scenario.op)(&rig);
            if retried.is_ok() {
                // What the process leaves without the help of a restart.
                // Images are released by the next deletion, switch or
                // restart; a failed release waits for one of those.
                problems.extend(
                    rig.check()
                        .into_iter()
                        .filter(|p| !p.contains(IMAGE_RELEASE_PENDING))
                        .map(|p| format!("after the retry, before a restart: {p}")),
                );
            }
            let report = rig.restart();
            if !report.failures.is_empty() {
                problems.push(format!(
                    "recovery after the retry failed: {:?}",
                    report.failures
                ));
            }
            retried
        }
    };
    match retried {
        Ok(result) if result == baseline => {}
        Ok(result) => problems.push(format!("the retry returned {result}, not {baseline}")),
        Err(e) => {
            problems.push(format!(
                "the retry failed: {e} (the faulted call returned {first:?})"
            ));
            return problems;
        }
    }
    problems.extend(rig.check());
    problems.extend((scenario.verify)(&rig));
    problems.extend(rig.delete_everything());
    problems.retain(|p| !p.contains(METADATA_LEFT_AFTER_SWITCH));
    problems
}

/// The index of the first step of `op` (after `setup`) that starts with
/// `prefix`, in a run without faults.
fn index_of_step(setup: fn(&mut Rig), op: fn(&Rig) -> DomainResult<String>, prefix: &str) -> usize {
    let mut rig = rig();
    setup(&mut rig);
    rig.faults.arm(None);
    op(&rig).expect("the operation succeeds without faults");
    let steps = rig.faults.steps();
    steps
        .iter()
        .position(|step| step.starts_with(prefix))
        .unwrap_or_else(|| panic!("no step {prefix:?} in {steps:#?}"))
}

// -- set-ups

fn setup_source(rig: &mut Rig) {
    rig.fs_source(SOURCE);
}

fn setup_redirected_source(rig: &mut Rig) {
    rig.fs_source(SOURCE);
    rig.engine
        .create_snapshot(SNAPSHOT, &vid(SOURCE))
        .expect("snapshot by redirect");
}

fn setup_hydrating_clone(rig: &mut Rig) {
    let source = rig.fs_source(SOURCE);
    let clone = rig.clone_of(CLONE, &source);
    // The clone only: a source redirected by the cut stays waiting.
    rig.engine
        .start_hydration(&clone.id)
        .expect("starting the clone's copy");
    // 20 of its 64 regions (4 MiB at 64 KiB): partly hydrated.
    rig.hydrate(&clone.id, 20);
}

fn setup_new_clone(rig: &mut Rig) {
    let source = rig.fs_source(SOURCE);
    rig.clone_of(CLONE, &source);
}

fn setup_new_staged_clone(rig: &mut Rig) {
    setup_new_clone(rig);
    rig.stage(&vid(CLONE));
}

fn setup_hydrated_clone(rig: &mut Rig) {
    let source = rig.fs_source(SOURCE);
    let clone = rig.clone_of(CLONE, &source);
    rig.hydrate_all(&clone.id);
}

fn setup_unstaged_source_of_a_hydrating_clone(rig: &mut Rig) {
    setup_hydrating_clone(rig);
    rig.unstage(&vid(SOURCE));
}

// -- operations

fn op_create_empty(rig: &Rig) -> DomainResult<String> {
    rig.create(EMPTY, LARGER_BYTES, None)
        .map(|record| record.id.to_string())
}

fn op_clone_source(rig: &Rig) -> DomainResult<String> {
    rig.create(CLONE, 0, Some(ContentSource::Volume(vid(SOURCE))))
        .map(|record| record.id.to_string())
}

fn op_snapshot_source(rig: &Rig) -> DomainResult<String> {
    rig.engine
        .create_snapshot(SNAPSHOT, &vid(SOURCE))
        .map(|record| record.id.to_string())
}

fn op_start_redirected(rig: &Rig) -> DomainResult<String> {
    rig.engine
        .start_hydration(&vid(SOURCE))
        .map(|()| "started".to_owned())
}

fn op_start_clone(rig: &Rig) -> DomainResult<String> {
    rig.engine
        .start_hydration(&vid(CLONE))
        .map(|()| "started".to_owned())
}

fn op_delete_clone(rig: &Rig) -> DomainResult<String> {
    rig.engine
        .delete_volume(&vid(CLONE))
        .map(|()| "deleted".to_owned())
}

fn op_delete_source(rig: &Rig) -> DomainResult<String> {
    rig.engine
        .delete_volume(&vid(SOURCE))
        .map(|()| "deleted".to_owned())
}

fn op_expand_clone(rig: &Rig) -> DomainResult<String> {
    rig.engine
        .expand_volume(
            &vid(CLONE),
            CapacityRange {
                required_bytes: EXPANDED_BYTES,
                limit_bytes: 0,
            },
        )
        .map(|(bytes, grow)| format!("{bytes} bytes, grow {grow}"))
}

fn op_complete_clone(rig: &Rig) -> DomainResult<String> {
    rig.engine
        .complete_hydration(&vid(CLONE))
        .map(|switched| format!("switched {switched}"))
}

/// Images are released by `collect_images` after a deletion, a switch,
/// at start-up and on every monitor round; its failures are only logged.
/// When the release after a clone's deletion fails, DeleteVolume still
/// succeeds, and the next round (called here as the monitor would)
/// releases the image.
#[test]
fn a_failed_image_release_after_a_deletion_is_retried() {
    let release = index_of_step(
        setup_hydrating_clone,
        op_delete_clone,
        "pool.remove image of",
    );
    let mut rig = rig();
    setup_hydrating_clone(&mut rig);
    rig.faults.arm(Some(Fault::ErrorAt(release)));
    op_delete_clone(&rig).expect("the deletion itself succeeds");
    rig.faults.arm(None);
    // What the monitor does on every round.
    rig.engine.collect_images();
    let hidden = hidden_snapshot_for(&vid(CLONE)).expect("hidden snapshot ID");
    assert!(
        rig.inode(&Storage::Image(hidden)).is_none(),
        "the hidden image of the deleted clone is still in the pool"
    );
}

/// The monitor samples a clone before it asks for the switch: when the
/// switch reached the device but its record failed to be written, the
/// next sample finishes it instead of failing on a clone target that is
/// gone, until a restart.
#[test]
fn an_interrupted_switch_is_finished_by_the_next_sample() {
    let record_write = index_of_step(setup_hydrated_clone, op_complete_clone, "store.put volumes");
    let mut rig = rig();
    setup_hydrated_clone(&mut rig);
    let clone = vid(CLONE);
    rig.faults.arm(Some(Fault::ErrorAt(record_write)));
    op_complete_clone(&rig).expect_err("the record write fails");
    rig.faults.arm(None);
    assert!(is_linear(&rig.table(&clone)), "the device was switched");
    assert!(rig.record(&clone).expect("clone").hydration.is_some());
    let sample = rig.engine.sample_hydration(&clone).expect("sample");
    assert!(
        sample.is_none(),
        "the sample finished the switch: {sample:?}"
    );
    let record = rig.record(&clone).expect("clone");
    assert!(record.hydration.is_none() && record.last_hydration.is_some());
    rig.assert_consistent("after the sample");
    rig.assert_all_deleted();
}

/// `finish_switch` records the switch, then removes the metadata file,
/// logging a failure. A crash between the two leaves the file; recovery
/// removes the metadata of every volume that is no longer hydrating.
#[test]
fn a_crash_after_recording_the_switch_leaves_no_metadata_file() {
    let removal = index_of_step(
        setup_hydrated_clone,
        op_complete_clone,
        "pool.remove clone metadata",
    );
    let mut rig = rig();
    setup_hydrated_clone(&mut rig);
    rig.faults.arm(Some(Fault::CrashAt(removal)));
    // The failed removal is only logged: the call may even succeed.
    let _ = op_complete_clone(&rig);
    rig.faults.arm(None);
    let report = rig.restart();
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(op_complete_clone(&rig).expect("retry"), "switched true");
    let metadata = Storage::Metadata(vid(CLONE));
    assert!(
        rig.inode(&metadata).is_none(),
        "{metadata} is still in the pool after the switch"
    );
}

// -- checks after the retry

fn require(problems: &mut Vec<String>, ok: bool, what: impl FnOnce() -> String) {
    if !ok {
        problems.push(what());
    }
}

fn verify_empty(rig: &Rig) -> Vec<String> {
    let mut problems = Vec::new();
    let record = rig.record(&vid(EMPTY));
    require(
        &mut problems,
        record.as_ref().is_some_and(|r| {
            r.state == VolumeState::Ready
                && r.hydration.is_none()
                && r.capacity_bytes == LARGER_BYTES
        }),
        || format!("the empty volume's record is {record:?}"),
    );
    problems
}

/// The source's data survived: in the image (by inode for a redirect, by
/// content always), and in the source's own file for a reflink cut.
fn verify_cut(rig: &Rig, snapshot: &SnapshotId, hidden: bool, reflink: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let record = rig.snapshot_record(snapshot);
    let method = if reflink {
        CutMethod::Reflink
    } else {
        CutMethod::Redirect
    };
    require(
        &mut problems,
        record.as_ref().is_some_and(|s| {
            s.state == SnapshotState::Ready && s.hidden == hidden && s.method == Some(method)
        }),
        || format!("snapshot record {record:?}, expected a ready {method:?} cut"),
    );
    let image = rig.path_of(&Storage::Image(snapshot.clone()));
    require(&mut problems, holds_pattern(&image, SOURCE), || {
        "the image does not hold the source's data".to_owned()
    });
    let source = rig.record(&vid(SOURCE));
    let old_data = rig.note("source data");
    if reflink {
        require(
            &mut problems,
            source
                .as_ref()
                .is_some_and(|s| s.generation == 0 && s.hydration.is_none()),
            || format!("a reflink cut changed the source: {source:?}"),
        );
        let data = rig.inode(&Storage::Data {
            volume: vid(SOURCE),
            generation: 0,
        });
        require(&mut problems, data == Some(old_data), || {
            "the source's data file was replaced".to_owned()
        });
    } else {
        require(
            &mut problems,
            source.as_ref().is_some_and(|s| {
                s.generation == 1 && s.hydration.as_ref().is_some_and(|h| h.source == *snapshot)
            }),
            || {
                format!(
                    "after a redirect cut the source should hydrate from {snapshot}: {source:?}"
                )
            },
        );
        let image_inode = std::fs::metadata(&image).ok().map(|m| m.ino());
        require(&mut problems, image_inode == Some(old_data), || {
            "the image is not the source's old data file".to_owned()
        });
    }
    problems
}

fn verify_clone(rig: &Rig, reflink: bool) -> Vec<String> {
    let clone = vid(CLONE);
    let hidden = hidden_snapshot_for(&clone).expect("hidden snapshot ID");
    let mut problems = verify_cut(rig, &hidden, true, reflink);
    let record = rig.record(&clone);
    require(
        &mut problems,
        record.as_ref().is_some_and(|r| {
            r.content_source == Some(ContentSource::Volume(vid(SOURCE)))
                && r.hydration.as_ref().is_some_and(|h| h.source == hidden)
        }),
        || format!("the clone's record is {record:?}"),
    );
    // CreateVolume leaves a file-system clone's trim to the monitor.
    require(
        &mut problems,
        record
            .as_ref()
            .and_then(|r| r.hydration.as_ref())
            .is_some_and(|h| h.stage == HydrationStage::SourceHolesSkipped),
        || format!("the new clone is not waiting for its trim: {record:?}"),
    );
    problems
}

fn verify_clone_reflink(rig: &Rig) -> Vec<String> {
    verify_clone(rig, true)
}

fn verify_clone_redirect(rig: &Rig) -> Vec<String> {
    verify_clone(rig, false)
}

fn verify_snapshot_reflink(rig: &Rig) -> Vec<String> {
    verify_cut(rig, &sid(SNAPSHOT), false, true)
}

fn verify_snapshot_redirect(rig: &Rig) -> Vec<String> {
    verify_cut(rig, &sid(SNAPSHOT), false, false)
}

fn verify_redirected_started(rig: &Rig) -> Vec<String> {
    let mut problems = Vec::new();
    let source = rig.record(&vid(SOURCE));
    require(
        &mut problems,
        source
            .as_ref()
            .and_then(|s| s.hydration.as_ref())
            .is_some_and(|h| h.stage == HydrationStage::Enabled),
        || format!("the source's hydration is not enabled: {source:?}"),
    );
    require(
        &mut problems,
        rig.engine
            .awaiting_hydration_start()
            .is_ok_and(|ids| ids.is_empty()),
        || "a volume still awaits its copy-back".to_owned(),
    );
    problems
}

/// A clone's copy started: `Enabled` with hydration on, no longer waiting,
/// no private trim mount left behind, and a staged clone still mounted
/// where the CO staged it. (Whether the trim itself ran is not required:
/// it is best effort, and a fault injected into it skips it.)
fn verify_clone_started(rig: &Rig) -> Vec<String> {
    let mut problems = Vec::new();
    let id = vid(CLONE);
    let clone = rig.record(&id);
    require(
        &mut problems,
        clone
            .as_ref()
            .and_then(|c| c.hydration.as_ref())
            .is_some_and(|h| h.stage == HydrationStage::Enabled && !h.paused),
        || format!("the clone's hydration is not enabled: {clone:?}"),
    );
    require(
        &mut problems,
        rig.engine
            .awaiting_hydration_start()
            .is_ok_and(|ids| !ids.contains(&id)),
        || "the clone still awaits its copy".to_owned(),
    );
    let private = rig.root.join("work").join("trim").join(id.as_str());
    require(
        &mut problems,
        rig.fake.mount_at(&private).is_ok_and(|m| m.is_none()),
        || format!("the private trim mount {} was left", private.display()),
    );
    for (staged, path) in &rig.staged {
        if *staged == id {
            require(
                &mut problems,
                rig.fake
                    .mount_at(Path::new(path))
                    .is_ok_and(|m| m.is_some()),
                || format!("the clone is no longer mounted at {path}"),
            );
        }
    }
    problems
}

fn verify_clone_deleted(rig: &Rig) -> Vec<String> {
    let mut problems = Vec::new();
    let clone = vid(CLONE);
    require(&mut problems, rig.record(&clone).is_none(), || {
        "the clone's record is still there".to_owned()
    });
    let hidden = hidden_snapshot_for(&clone).expect("hidden snapshot ID");
    require(
        &mut problems,
        rig.snapshot_record(&hidden).is_none(),
        || "the clone's hidden snapshot was not released".to_owned(),
    );
    let source = rig.record(&vid(SOURCE));
    require(
        &mut problems,
        source.as_ref().is_some_and(|s| s.hydration.is_none()),
        || format!("the source changed: {source:?}"),
    );
    problems
}

fn verify_source_deleted(rig: &Rig) -> Vec<String> {
    let mut problems = Vec::new();
    require(&mut problems, rig.record(&vid(SOURCE)).is_none(), || {
        "the source's record is still there".to_owned()
    });
    let clone = rig.record(&vid(CLONE));
    let hidden = hidden_snapshot_for(&vid(CLONE)).expect("hidden snapshot ID");
    require(
        &mut problems,
        clone
            .as_ref()
            .is_some_and(|c| c.hydration.as_ref().is_some_and(|h| h.source == hidden)),
        || format!("the clone no longer hydrates from its hidden cut: {clone:?}"),
    );
    let image = rig.path_of(&Storage::Image(hidden));
    require(&mut problems, holds_pattern(&image, SOURCE), || {
        "the clone's image lost the source's data".to_owned()
    });
    problems
}

fn verify_expanded(rig: &Rig) -> Vec<String> {
    let mut problems = Vec::new();
    let clone = rig.record(&vid(CLONE));
    require(
        &mut problems,
        clone.as_ref().is_some_and(|c| {
            c.capacity_bytes == EXPANDED_BYTES && c.needs_fs_grow && c.hydration.is_some()
        }),
        || format!("the expanded clone's record is {clone:?}"),
    );
    problems
}

fn verify_completed(rig: &Rig) -> Vec<String> {
    let mut problems = Vec::new();
    let id = vid(CLONE);
    let clone = rig.record(&id);
    require(
        &mut problems,
        clone
            .as_ref()
            .is_some_and(|c| c.hydration.is_none() && c.last_hydration.is_some()),
        || format!("the clone is not recorded as switched: {clone:?}"),
    );
    require(
        &mut problems,
        rig.inode(&Storage::Metadata(id.clone())).is_none(),
        || format!("the clone's {METADATA_LEFT_AFTER_SWITCH}"),
    );
    let hidden = hidden_snapshot_for(&id).expect("hidden snapshot ID");
    require(
        &mut problems,
        rig.snapshot_record(&hidden).is_none(),
        || "the hidden snapshot was not released".to_owned(),
    );
    problems
}

#[test]
fn crash_at_every_step_of_creating_an_empty_volume() {
    run_crash_matrix(&Scenario {
        name: "create an empty volume",
        reflink: true,
        setup: |_| {},
        op: op_create_empty,
        verify: verify_empty,
    });
}

#[test]
fn crash_at_every_step_of_cloning_a_volume_on_a_reflink_pool() {
    run_crash_matrix(&Scenario {
        name: "clone a volume (reflink cut)",
        reflink: true,
        setup: setup_source,
        op: op_clone_source,
        verify: verify_clone_reflink,
    });
}

#[test]
fn crash_at_every_step_of_cloning_a_volume_on_a_pool_without_reflink() {
    run_crash_matrix(&Scenario {
        name: "clone a volume (redirect cut)",
        reflink: false,
        setup: setup_source,
        op: op_clone_source,
        verify: verify_clone_redirect,
    });
}

#[test]
fn crash_at_every_step_of_a_snapshot_by_reflink() {
    run_crash_matrix(&Scenario {
        name: "snapshot by reflink",
        reflink: true,
        setup: setup_source,
        op: op_snapshot_source,
        verify: verify_snapshot_reflink,
    });
}

#[test]
fn crash_at_every_step_of_a_snapshot_by_redirect() {
    run_crash_matrix(&Scenario {
        name: "snapshot by redirect",
        reflink: false,
        setup: setup_source,
        op: op_snapshot_source,
        verify: verify_snapshot_redirect,
    });
}

#[test]
fn crash_at_every_step_of_starting_a_redirected_hydration() {
    run_crash_matrix(&Scenario {
        name: "start the copy-back of a redirected source",
        reflink: false,
        setup: setup_redirected_source,
        op: op_start_redirected,
        verify: verify_redirected_started,
    });
}

#[test]
fn crash_at_every_step_of_starting_a_new_clone_through_a_private_mount() {
    run_crash_matrix(&Scenario {
        name: "start the copy of a new clone (trim through a private mount)",
        reflink: true,
        setup: setup_new_clone,
        op: op_start_clone,
        verify: verify_clone_started,
    });
}

#[test]
fn crash_at_every_step_of_starting_a_new_staged_clone() {
    run_crash_matrix(&Scenario {
        name: "start the copy of a new staged clone (trim through its mount)",
        reflink: true,
        setup: setup_new_staged_clone,
        op: op_start_clone,
        verify: verify_clone_started,
    });
}

#[test]
fn crash_at_every_step_of_starting_a_new_clone_on_a_pool_without_reflink() {
    run_crash_matrix(&Scenario {
        name: "start the copy of a new clone whose source was redirected",
        reflink: false,
        setup: setup_new_clone,
        op: op_start_clone,
        verify: verify_clone_started,
    });
}

#[test]
fn crash_at_every_step_of_deleting_a_hydrating_clone() {
    run_crash_matrix(&Scenario {
        name: "delete a hydrating clone",
        reflink: true,
        setup: setup_hydrating_clone,
        op: op_delete_clone,
        verify: verify_clone_deleted,
    });
}

#[test]
fn crash_at_every_step_of_deleting_the_source_of_a_hydrating_clone() {
    run_crash_matrix(&Scenario {
        name: "delete the source of a hydrating clone (redirect pool)",
        reflink: false,
        setup: setup_unstaged_source_of_a_hydrating_clone,
        op: op_delete_source,
        verify: verify_source_deleted,
    });
}

#[test]
fn crash_at_every_step_of_expanding_a_hydrating_clone() {
    run_crash_matrix(&Scenario {
        name: "expand a hydrating clone",
        reflink: true,
        setup: setup_hydrating_clone,
        op: op_expand_clone,
        verify: verify_expanded,
    });
}

#[test]
fn crash_at_every_step_of_the_switch_to_linear() {
    run_crash_matrix(&Scenario {
        name: "complete a hydration",
        reflink: true,
        setup: setup_hydrated_clone,
        op: op_complete_clone,
        verify: verify_completed,
    });
}

/// The crash matrix's checks must be able to fail: a metadata file zeroed
/// behind the engine's back, a stray loop and a frozen mount are caught.
#[test]
fn the_invariant_checks_catch_what_they_look_for() {
    let mut rig = rig();
    setup_hydrating_clone(&mut rig);
    rig.assert_consistent("before tampering");
    let clone = vid(CLONE);

    // Zero the bound metadata and make the device load it again.
    let metadata = rig.path_of(&Storage::Metadata(clone.clone()));
    OpenOptions::new()
        .write(true)
        .open(&metadata)
        .and_then(|file| file.write_all_at(&[0u8; METADATA_BLOCK], 0))
        .expect("zeroing");
    let name = dm_name(&clone);
    let table = rig.table(&clone);
    rig.fake.load(&name, &table).expect("reload");
    rig.fake.resume(&name).expect("resume");
    let problems = rig.audit_metadata();
    assert!(
        problems.iter().any(|p| p.contains("re-formatted")),
        "{problems:?}"
    );

    let stray = rig.root.join("stray");
    File::create(&stray)
        .and_then(|f| f.set_len(MIB))
        .expect("stray file");
    rig.fake
        .attach(
            &stray,
            LoopOptions {
                read_only: false,
                direct_io: true,
            },
        )
        .expect("attach");
    let staging = rig.staging_path(&vid(SOURCE));
    rig.fake.freeze(Path::new(&staging)).expect("freeze");
    let problems = rig.consistency_problems();
    assert!(
        problems.iter().any(|p| p.contains("no longer in the pool")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("left frozen")),
        "{problems:?}"
    );
}

// ---------------------------------------------------------------------------
// 3. Source protection

fn sources_can_be_deleted_while_clones_hydrate(reflink: bool) {
    let mut rig = Rig::new(reflink);
    let source = rig.fs_source(SOURCE);
    let snapshot = rig
        .engine
        .create_snapshot(SNAPSHOT, &source)
        .expect("snapshot");
    if !reflink {
        // The source copies itself back from the snapshot's image before it
        // can be cut again.
        let busy = rig
            .create("too-early", 0, Some(ContentSource::Volume(source.clone())))
            .expect_err("a hydrating source cannot be cut");
        assert_eq!(busy.code, ErrorCode::Unavailable);
        rig.settle(&source);
    }
    let source_generation = rig.record(&source).expect("source").generation;
    if !reflink {
        // The simulator counts copied regions but does not copy bytes:
        // give the new data file the content the copy-back made, so the
        // clones below have data (not holes) to hydrate.
        let data = rig.path_of(&Storage::Data {
            volume: source.clone(),
            generation: source_generation,
        });
        OpenOptions::new()
            .write(true)
            .open(&data)
            .and_then(|file| {
                file.write_all_at(&vec![0xa5; SOURCE_BYTES as usize], 0)?;
                file.write_all_at(&pattern(SOURCE), PATTERN_OFFSET)
            })
            .expect("writing the copied-back data");
    }
    let source_data = rig
        .inode(&Storage::Data {
            volume: source.clone(),
            generation: source_generation,
        })
        .expect("the source's data file");
    let from_volume = rig.clone_of("from-volume", &source);
    let from_snapshot = rig
        .create(
            "from-snapshot",
            0,
            Some(ContentSource::Snapshot(snapshot.id.clone())),
        )
        .expect("clone of the snapshot");
    let hidden = hidden_snapshot_for(&from_volume.id).expect("hidden snapshot ID");
    rig.unstage(&source);

    rig.engine
        .delete_volume(&source)
        .expect("deleting the source of a hydrating clone succeeds");
    rig.engine
        .delete_snapshot(&snapshot.id)
        .expect("deleting a snapshot clones hydrate from succeeds");
    assert!(rig.record(&source).is_none());
    assert!(rig.engine.list_snapshots().expect("list").is_empty());
    let late = rig
        .create(
            "late",
            0,
            Some(ContentSource::Snapshot(snapshot.id.clone())),
        )
        .expect_err("a deleted snapshot cannot be cloned");
    assert_eq!(late.code, ErrorCode::NotFound);
    // The simulator copies no bytes when it hydrates, so after a redirect
    // the source's new data file is known by inode, not by content.
    let hidden_image = rig.path_of(&Storage::Image(hidden.clone()));
    if reflink {
        assert!(
            holds_pattern(&hidden_image, SOURCE),
            "the hidden image lost the data"
        );
    } else {
        let inode = std::fs::metadata(&hidden_image)
            .expect("hidden image")
            .ino();
        assert_eq!(
            inode, source_data,
            "the hidden image is the source's data file"
        );
    }
    let snapshot_image = rig.path_of(&Storage::Image(snapshot.id.clone()));
    assert!(
        holds_pattern(&snapshot_image, SOURCE),
        "the snapshot's image lost the data"
    );
    for (clone, image) in [(&from_volume, &hidden), (&from_snapshot, &snapshot.id)] {
        assert!(
            !rig.files
                .attachments(&Storage::Image(image.clone()))
                .expect("attachments")
                .is_empty(),
            "{}'s image is still attached",
            clone.name
        );
        assert!(rig.status(&clone.id).hydrated_regions < rig.status(&clone.id).total_regions);
    }
    rig.assert_consistent("after deleting the sources");

    rig.settle(&from_volume.id);
    assert!(
        rig.snapshot_record(&hidden).is_none(),
        "hidden cut released"
    );
    assert!(rig.inode(&Storage::Image(hidden.clone())).is_none());
    assert!(
        rig.inode(&Storage::Image(snapshot.id.clone())).is_some(),
        "still read"
    );
    rig.settle(&from_snapshot.id);
    assert!(
        rig.snapshot_record(&snapshot.id).is_none(),
        "deleted snapshot released"
    );
    assert!(rig.inode(&Storage::Image(snapshot.id.clone())).is_none());
    let loops = rig.loops();
    assert_eq!(
        loops.len(),
        2,
        "only the two clones' data remain: {loops:?}"
    );
    rig.assert_consistent("after both clones completed");
    rig.assert_all_deleted();
}

#[test]
fn sources_can_be_deleted_while_clones_hydrate_on_a_reflink_pool() {
    sources_can_be_deleted_while_clones_hydrate(true);
}

#[test]
fn sources_can_be_deleted_while_clones_hydrate_on_a_pool_without_reflink() {
    sources_can_be_deleted_while_clones_hydrate(false);
}

// ---------------------------------------------------------------------------
// 4. Metadata is never reused

#[test]
fn a_stale_metadata_file_is_never_picked_up_by_a_new_clone() {
    let mut rig = rig();
    rig.fake.set_trim(0, 0);
    let first = rig.fs_source("first-source");
    let second = rig.fs_source("second-source");
    let clone = rig.clone_of(CLONE, &first);
    rig.start_awaiting();
    assert_eq!(rig.hydrate(&clone.id, 30), 30);
    rig.assert_consistent("first clone");

    // Keep the metadata's inode (which the simulator remembers, hydrated
    // count included) past the deletion, and put it back where the next
    // clone of the same name would find it: a leftover.
    let metadata = rig.path_of(&Storage::Metadata(clone.id.clone()));
    let kept = rig.root.join("kept.meta");
    std::fs::hard_link(&metadata, &kept).expect("link");
    rig.engine.delete_volume(&clone.id).expect("delete");
    assert!(!metadata.exists());
    rig.assert_consistent("after deleting the clone");
    std::fs::hard_link(&kept, &metadata).expect("leftover metadata");

    let again = rig.clone_of(CLONE, &second);
    assert_eq!(again.id, clone.id, "same name, same volume ID");
    let report = rig.status(&again.id);
    assert_eq!(report.hydrated_regions, 0, "a fresh format starts at 0");
    assert!(rig.fake.hazards().is_empty(), "{:?}", rig.fake.hazards());
    let kept_inode = std::fs::metadata(&kept).expect("kept").ino();
    let used_inode = std::fs::metadata(&metadata).expect("metadata").ino();
    assert_ne!(
        used_inode, kept_inode,
        "the leftover was replaced, not reused"
    );
    let block = read_first_block(&metadata).expect("metadata");
    assert!(
        block.iter().any(|&b| b != 0) && !block[WITNESS_OFFSET..].starts_with(WITNESS),
        "the new metadata was formatted by its own first load"
    );
    std::fs::remove_file(&kept).expect("remove kept");
    rig.assert_consistent("second clone");
    rig.settle(&again.id);
    rig.assert_all_deleted();
}

// ---------------------------------------------------------------------------
// 5. Idempotency and ABORTED

#[test]
fn the_same_create_volume_twice_returns_the_same_record() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    let empty = rig.create(EMPTY, LARGER_BYTES, None).expect("create");
    assert_eq!(rig.create(EMPTY, LARGER_BYTES, None).expect("again"), empty);
    let clone = rig.clone_of(CLONE, &source);
    let again = rig.clone_of(CLONE, &source);
    assert_eq!(again, clone);
    let snapshot = rig
        .engine
        .create_snapshot(SNAPSHOT, &source)
        .expect("snapshot");
    assert_eq!(
        rig.engine
            .create_snapshot(SNAPSHOT, &source)
            .expect("again"),
        snapshot
    );
    let conflict = rig
        .create(EMPTY, 2 * LARGER_BYTES, None)
        .expect_err("same name, other size");
    assert_eq!(conflict.code, ErrorCode::AlreadyExists);
    let conflict = rig
        .create(CLONE, 0, Some(ContentSource::Snapshot(snapshot.id.clone())))
        .expect_err("same name, other source");
    assert_eq!(conflict.code, ErrorCode::AlreadyExists);
    assert_eq!(
        rig.snapshots.list().expect("snapshots").len(),
        2,
        "one hidden cut for the clone, one snapshot: nothing cut twice"
    );
    rig.assert_consistent("after repeated calls");
    rig.assert_all_deleted();
}

/// A real second call while the first is inside its table creation (a step
/// gate holds it there with its locks): calls on the same volume or its
/// source are ABORTED, others go through.
#[test]
fn a_call_for_a_volume_busy_with_another_call_is_aborted() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    let barrier = Arc::new(Barrier::new(2));
    rig.faults.gate_at("dm.create", Arc::clone(&barrier));
    let clone = vid(CLONE);
    let rig_ref = &rig;
    std::thread::scope(|scope| {
        let creating = scope.spawn(|| rig_ref.clone_of(CLONE, &source));
        barrier.wait();
        let aborted = |what: &str, result: DomainResult<()>| {
            let error = result.expect_err(what);
            assert_eq!(error.code, ErrorCode::Aborted, "{what}: {error}");
        };
        aborted(
            "the same CreateVolume",
            rig_ref
                .create(CLONE, 0, Some(ContentSource::Volume(source.clone())))
                .map(drop),
        );
        aborted(
            "DeleteVolume of the clone",
            rig_ref.engine.delete_volume(&clone),
        );
        aborted(
            "a snapshot of the source",
            rig_ref.engine.create_snapshot(SNAPSHOT, &source).map(drop),
        );
        aborted(
            "expanding the source",
            rig_ref
                .engine
                .expand_volume(
                    &source,
                    CapacityRange {
                        required_bytes: LARGER_BYTES,
                        limit_bytes: 0,
                    },
                )
                .map(drop),
        );
        aborted("pausing the clone", rig_ref.engine.pause_hydration(&clone));
        rig_ref
            .create(EMPTY, MIB, None)
            .expect("an unrelated volume is not held up");
        barrier.wait();
        let created = creating.join().expect("the first call does not panic");
        assert_eq!(created.state, VolumeState::Ready);
    });
    rig.engine
        .delete_volume(&clone)
        .expect("free again once the first call finished");
    rig.assert_consistent("after the concurrent calls");
    rig.assert_all_deleted();
}

/// The monitor's trim of a new clone and a NodeStage of the same clone take
/// turns under the volume's guard: a stage that comes while the trim holds
/// its private mount waits for it, then mounts; a start that comes while a
/// CO call holds the volume is ABORTED (the monitor tries next round), and
/// the next one trims through the mount the stage made.
#[test]
fn the_deferred_trim_and_a_stage_of_the_same_clone_take_turns() {
    let mut rig = rig();
    let source = rig.fs_source(SOURCE);
    let stage_request = |path: &str| StageRequest {
        staging_path: path.to_owned(),
        mount: Some(MountSpec {
            fs: None,
            flags: Vec::new(),
        }),
    };

    // A stage during the private trim waits for it.
    let clone = rig.clone_of(CLONE, &source).id;
    let staging = rig.staging_path(&clone);
    let private = rig.root.join("work").join("trim").join(clone.as_str());
    let barrier = Arc::new(Barrier::new(2));
    rig.faults.gate_at("fs.trim", Arc::clone(&barrier));
    let (rig_ref, clone_ref) = (&rig, &clone);
    let request = stage_request(&staging);
    let request_ref = &request;
    std::thread::scope(|scope| {
        let starting = scope.spawn(move || rig_ref.engine.start_hydration(clone_ref));
        barrier.wait();
        assert!(
            rig_ref.fake.mount_at(&private).expect("mounts").is_some(),
            "the trim runs through a private mount"
        );
        let staging_call = scope.spawn(move || rig_ref.engine.stage(clone_ref, request_ref));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !staging_call.is_finished(),
            "the stage did not wait for the trim"
        );
        assert!(
            rig_ref
                .fake
                .mount_at(Path::new(&staging))
                .expect("mounts")
                .is_none(),
            "the clone was staged during its private trim"
        );
        barrier.wait();
        starting
            .join()
            .expect("the start does not panic")
            .expect("the start succeeds");
        staging_call
            .join()
            .expect("the stage does not panic")
            .expect("the stage succeeds once the trim is done");
    });
    rig.staged.push((clone.clone(), staging.clone()));
    assert!(rig.fake.mount_at(&private).expect("mounts").is_none());
    assert!(rig
        .fake
        .mount_at(Path::new(&staging))
        .expect("mounts")
        .is_some());
    rig.assert_consistent("after a stage during the trim");

    // A start while a stage holds the volume is ABORTED; the next start
    // trims through the stage's mount, without a mount of its own.
    let second = rig.clone_of("second-clone", &source).id;
    let second_staging = rig.staging_path(&second);
    let barrier = Arc::new(Barrier::new(2));
    rig.faults.gate_at("fs.mount ", Arc::clone(&barrier));
    let (rig_ref, second_ref) = (&rig, &second);
    let request = stage_request(&second_staging);
    let request_ref = &request;
    std::thread::scope(|scope| {
        let staging_call = scope.spawn(move || rig_ref.engine.stage(second_ref, request_ref));
        barrier.wait();
        let error = rig_ref
            .engine
            .start_hydration(&second)
            .expect_err("the volume is busy with the stage");
        assert_eq!(error.code, ErrorCode::Aborted, "{error}");
        barrier.wait();
        staging_call
            .join()
            .expect("the stage does not panic")
            .expect("the stage succeeds");
    });
    rig.staged.push((second.clone(), second_staging.clone()));
    rig.fake.clear_calls();
    rig.engine.start_hydration(&second).expect("the next start");
    let calls = rig.fake.calls();
    expect_call(&calls, 0, &format!("fs.trim {second_staging}"));
    assert_eq!(find_call(&calls, 0, "fs.mount "), None, "{calls:#?}");
    rig.assert_consistent("after a start during a stage");
    rig.assert_all_deleted();
}

/// An xfs clone gets a UUID of its own in CreateVolume, before anything can
/// mount it (xfs refuses a second mount of one UUID, and the source stays
/// mounted), without a mount or a trim there; it then stages next to its
/// source, and the monitor's start trims it through that mount.
#[test]
fn an_xfs_clone_gets_its_own_uuid_in_create_volume_and_its_trim_later() {
    let mut rig = rig();
    let xfs = AccessKind::Filesystem { fs: FsType::Xfs };
    let source = rig
        .create_as(SOURCE, SOURCE_BYTES, None, xfs)
        .expect("an xfs source")
        .id;
    rig.stage(&source);
    rig.fake.clear_calls();
    let clone = rig
        .create_as(CLONE, 0, Some(ContentSource::Volume(source.clone())), xfs)
        .expect("an xfs clone")
        .id;
    let calls = rig.fake.calls();
    check_created_without_trim(&rig, &calls, &clone);
    let name = dm_name(&clone);
    let uuid = expect_call(
        &calls,
        0,
        &format!("fs.regenerate_uuid {}", name.mapper_path().display()),
    );
    assert!(
        expect_call(&calls, 0, &format!("dm.create {name} clone")) < uuid,
        "{calls:#?}"
    );
    rig.stage(&clone);
    rig.start_awaiting();
    let calls = rig.fake.calls();
    expect_call(&calls, 0, &format!("fs.trim {}", rig.staging_path(&clone)));
    check_clone_setup_order(&calls, &clone, true);
    rig.assert_consistent("after the xfs clone started");
    rig.assert_all_deleted();
}

/// A reboot in the middle of a redirect cut: the power went after the new
/// data and metadata were made and recorded, before the rename. After the
/// reboot no device exists (recovery finishes cuts before it re-creates
/// devices), and nothing can write to the volume: recovery completes the
/// cut without suspending anything, then makes the device from the
/// record, a clone of the new image.
#[test]
fn a_redirect_cut_cut_short_by_a_reboot_is_finished_by_recovery() {
    let mut rig = Rig::new(false);
    let source = rig
        .create_as(SOURCE, SOURCE_BYTES, None, AccessKind::Block)
        .expect("a block volume")
        .id;
    rig.faults.arm(None);
    let steps_before = rig.faults.steps().len();
    let probe = Rig::new(false);
    let probe_source = probe
        .create_as(SOURCE, SOURCE_BYTES, None, AccessKind::Block)
        .expect("a block volume")
        .id;
    probe.faults.arm(None);
    let probe_before = probe.faults.steps().len();
    probe
        .engine
        .create_snapshot(SNAPSHOT, &probe_source)
        .expect("a redirect cut without faults");
    let rename = probe.faults.steps()[probe_before..]
        .iter()
        .position(|step| step.starts_with("pool.rename"))
        .expect("the cut renames");
    rig.faults.arm(Some(Fault::CrashAt(steps_before + rename)));
    rig.engine
        .create_snapshot(SNAPSHOT, &source)
        .expect_err("the power goes at the rename");
    rig.faults.arm(None);
    // The reboot: no device-mapper device and no loop device survives.
    let name = dm_name(&source);
    DeviceMapper::resume(&rig.fake, &name).expect("resume");
    DeviceMapper::remove(&rig.fake, &name).expect("remove");
    for device in rig.loops().into_values() {
        LoopDevices::detach(&rig.fake, &device.device).expect("detach");
    }
    let report = rig.restart();
    assert!(report.failures.is_empty(), "{report:?}");
    assert_eq!(report.cuts_finished, 1, "{report:?}");
    let snapshot = rig.snapshot_record(&sid(SNAPSHOT)).expect("recorded");
    assert_eq!(snapshot.state, SnapshotState::Ready);
    assert_eq!(snapshot.method, Some(CutMethod::Redirect));
    let volume = rig.record(&source).expect("recorded");
    assert_eq!(volume.generation, 1);
    assert_eq!(
        volume.hydration.as_ref().map(|h| &h.source),
        Some(&sid(SNAPSHOT))
    );
    assert!(rig.inode(&Storage::Image(sid(SNAPSHOT))).is_some());
    assert!(
        rig.table(&source).clone_target().is_some(),
        "the device is back, as a clone of the image"
    );
    rig.settle(&source);
    assert!(is_linear(&rig.table(&source)));
}
