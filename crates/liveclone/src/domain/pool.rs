//! Pools: where volume data, snapshot images and clone metadata live.
//!
//! The domain layer names storage by what it is ([`Storage`]), never by
//! path; a pool maps that to files (the file pool) or logical volumes (the
//! LVM pool of a later issue) and attaches it as a block device.

use std::fmt;
use std::path::PathBuf;

use crate::domain::error::DomainResult;
use crate::domain::ids::{SnapshotId, VolumeId};

/// One piece of storage in a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Storage {
    /// A volume's data; a new generation appears when a redirect cut turns
    /// the old one into a snapshot image.
    Data { volume: VolumeId, generation: u32 },
    /// A snapshot's point-in-time image; read-only once cut.
    Image(SnapshotId),
    /// A clone's dm-clone metadata.
    Metadata(VolumeId),
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Data { volume, generation } => {
                write!(f, "data of {volume} (generation {generation})")
            }
            Storage::Image(snapshot) => write!(f, "image of {snapshot}"),
            Storage::Metadata(volume) => write!(f, "clone metadata of {volume}"),
        }
    }
}

/// A block device a pool attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub size_bytes: u64,
    pub read_only: bool,
}

/// What a pool can still hold. `available_bytes` is what one new volume
/// may take (GetCapacity); for a thin pool it is the smaller of the
/// overprovisioning limit's headroom and the pool's free data space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolCapacity {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// How full a thin pool's data and metadata are; `None` for other pools.
    pub thin: Option<ThinUsage>,
}

/// A thin pool's fill, as LVM reports it (fractions from 0 to 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThinUsage {
    pub data_used: f64,
    pub metadata_used: f64,
    /// Bytes promised to thin volumes and snapshots (their virtual sizes).
    pub provisioned_bytes: u64,
}

/// Storage for volumes, snapshot images and clone metadata.
pub trait Pool: Send + Sync {
    /// One line for logs and Probe, e.g. `file pool /var/lib/liveclone/pool`.
    fn describe(&self) -> String;
    /// Whether the pool can be used now; the message says what is wrong.
    fn check(&self) -> Result<(), String>;
    fn capacity(&self) -> DomainResult<PoolCapacity>;
    /// Makes new storage of `bytes`. Fails with ALREADY_EXISTS if it exists:
    /// nothing is ever silently reused (a reused metadata volume would
    /// return stale data). Metadata storage reads as zeros throughout;
    /// other storage does where [`Pool::fresh_storage_reads_zeros`] says so.
    fn create(&self, item: &Storage, bytes: u64) -> DomainResult<()>;
    fn exists(&self, item: &Storage) -> DomainResult<bool>;
    fn size(&self, item: &Storage) -> DomainResult<u64>;
    /// Grows to `bytes` (never shrinks) and tells attached devices.
    fn grow(&self, item: &Storage, bytes: u64) -> DomainResult<()>;
    /// Detaches and removes; absent is success.
    fn remove(&self, item: &Storage) -> DomainResult<()>;
    /// A block device for the storage, reusing an existing attachment with
    /// the same read-only setting (so a restart does not leak devices).
    fn attach(&self, item: &Storage, read_only: bool) -> DomainResult<BlockDevice>;
    /// Detaches every device of the storage; none attached is success.
    fn detach(&self, item: &Storage) -> DomainResult<()>;
    /// Every block device currently attached for the storage.
    fn attachments(&self, item: &Storage) -> DomainResult<Vec<BlockDevice>>;
    /// Detaches one of the storage's attachments that no table uses any
    /// more (the read-write loop left on a redirected image, a stray found
    /// by recovery). A pool whose storage has a single device that other
    /// attachments share may keep it.
    fn release(&self, item: &Storage, device: &BlockDevice) -> DomainResult<()>;
    /// Whether storage from [`Pool::create`] reads zeros wherever nothing
    /// was written, and still after a discard. A clone may only mark the
    /// source's holes hydrated without copying them when its destination
    /// does (a thick LV keeps whatever the disk held before).
    fn fresh_storage_reads_zeros(&self) -> bool;
    /// Byte ranges of the first `length` bytes of the storage that read as
    /// zeros because nothing was ever written there (holes of a sparse
    /// file), in order. An empty list when the pool cannot tell.
    fn holes(&self, item: &Storage, length: u64) -> DomainResult<Vec<std::ops::Range<u64>>>;
    /// Whether [`Pool::clone_instant`] can work here at all, so a cut on a
    /// pool without it does not suspend its source just to find out.
    fn instant_clone_supported(&self) -> DomainResult<bool>;
    /// Makes `to` an instant copy of `from` sharing its blocks. `Ok(false)`
    /// when the pool cannot (the caller then cuts by redirect).
    fn clone_instant(&self, from: &Storage, to: &Storage) -> DomainResult<bool>;
    /// Renames storage atomically; attached devices keep working. Only the
    /// name: a redirect cut renames while its volume is suspended, so
    /// anything slower waits for [`Pool::relabel`].
    fn rename(&self, from: &Storage, to: &Storage) -> DomainResult<()>;
    /// Brings what the pool keeps about renamed storage beyond its name
    /// (an LV's tags) in line with what it now is. Called after the cut's
    /// suspended window, and again by a retry; names stay the truth, so a
    /// crash before it misleads nothing. Nothing to do by default.
    fn relabel(&self, _item: &Storage) -> DomainResult<()> {
        Ok(())
    }
    /// Everything in the pool, for finding leftovers.
    fn list(&self) -> DomainResult<Vec<Storage>>;
}
