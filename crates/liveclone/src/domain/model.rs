//! What the driver persists about volumes and snapshots.
//!
//! These records are the single source of truth for what should exist:
//! devices, loop attachments and mounts are rebuilt from them after a
//! restart or a reboot. Each is written whole and atomically by a
//! [`super::store::RecordStore`], and every step of a multi-step operation
//! records its progress *before* the step that depends on it (see
//! `docs/ARCHITECTURE.md`, "Crash safety").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::device_class::DeviceClassName;
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::sizing::HydrationTunables;
use crate::domain::store::Record;
use crate::os::dm::RegionSize;
use crate::os::fs::FsType;

/// How a volume is consumed. Chosen at CreateVolume from its capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AccessKind {
    Block,
    Filesystem { fs: FsType },
}

impl AccessKind {
    pub fn fs(&self) -> Option<FsType> {
        match self {
            AccessKind::Block => None,
            AccessKind::Filesystem { fs } => Some(*fs),
        }
    }
}

/// Where a volume's initial data came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "lowercase")]
pub enum ContentSource {
    Volume(VolumeId),
    Snapshot(SnapshotId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// CreateVolume has started; a retry continues from the recorded steps.
    Creating,
    Ready,
    /// DeleteVolume has started; a retry finishes it.
    Deleting,
}

/// The steps of setting up a clone, in order. Stored so that a restarted
/// process continues from the right one; in particular the metadata volume
/// is zeroed only in [`HydrationStage::Provisioning`] and never once the
/// stage has moved past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HydrationStage {
    /// Files may be half made; the metadata has never been loaded.
    Provisioning,
    /// The metadata volume is zeroed and bound to this destination and
    /// source. From here on it is only ever loaded, never zeroed.
    MetadataBound,
    /// The regions where the source image is a hole were discarded on the
    /// new clone (marked hydrated without copying: both sides read zeros).
    /// Recorded before anything writes to the clone, because a discard
    /// after that (the trim mount replays the journal) could drop data.
    SourceHolesSkipped,
    /// The clone's free space was discarded (file systems only).
    Trimmed,
    /// Background hydration has been enabled at least once.
    Enabled,
}

/// A clone's binding of destination, metadata and source, and its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HydrationRecord {
    /// The point-in-time image the clone copies from (a user snapshot, or a
    /// hidden one cut from a source volume for this clone).
    pub source: SnapshotId,
    pub source_bytes: u64,
    pub region_sectors: u64,
    pub metadata_bytes: u64,
    pub threshold: u32,
    pub batch_size: u32,
    pub paused: bool,
    pub stage: HydrationStage,
    /// Unix seconds.
    pub started_at: u64,
}

impl HydrationRecord {
    pub fn region_size(&self) -> Option<RegionSize> {
        RegionSize::new(self.region_sectors).ok()
    }

    pub fn tunables(&self) -> HydrationTunables {
        HydrationTunables {
            threshold: self.threshold,
            batch_size: self.batch_size,
        }
    }
}

/// How the last hydration ended, kept for `liveclone status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedHydration {
    pub source: SnapshotId,
    pub bytes: u64,
    pub started_at: u64,
    pub completed_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    /// The CO's name (its idempotency key).
    pub name: String,
    pub capacity_bytes: u64,
    pub access: AccessKind,
    pub content_source: Option<ContentSource>,
    /// The StorageClass parameters under `liveclone.io/`.
    pub parameters: BTreeMap<String, String>,
    pub state: VolumeState,
    /// Which data file in the pool holds the volume. It changes when a
    /// snapshot on a pool without reflink turns the old file into the
    /// snapshot image and the volume into a clone of it.
    pub generation: u32,
    /// Present while the volume is a dm-clone that is still hydrating.
    pub hydration: Option<HydrationRecord>,
    pub last_hydration: Option<CompletedHydration>,
    /// The file system must be grown to the device at the next stage
    /// (a clone larger than its source, or an expansion).
    pub needs_fs_grow: bool,
    /// The device class whose pool holds the data and, while hydrating,
    /// the metadata (`None`: the default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<DeviceClassName>,
    /// Unix seconds.
    pub created_at: u64,
    /// Target paths where the volume is published. A bind mount of a
    /// block device node does not open the device, so the device's open
    /// count alone cannot tell that a pod still uses a raw block volume.
    #[serde(default)]
    pub published: std::collections::BTreeSet<String>,
}

impl Record for VolumeRecord {
    type Id = VolumeId;
    const KIND: &'static str = "volumes";
    fn id(&self) -> &VolumeId {
        &self.id
    }
}

/// How a snapshot's image was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CutMethod {
    /// The pool shares the volume's blocks (FICLONE): instant, and the
    /// volume stays as it is.
    Reflink,
    /// The volume's data file became the image and the volume became a
    /// dm-clone of it, hydrating into a new data file: instant on any pool
    /// file system, at the cost of a background copy of the volume.
    Redirect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    Creating,
    Ready,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    /// The CO's name; for a hidden snapshot, a name derived from its clone.
    pub name: String,
    pub source_volume: VolumeId,
    pub size_bytes: u64,
    pub access: AccessKind,
    pub state: SnapshotState,
    pub method: Option<CutMethod>,
    /// Cut by the driver for a clone of a volume; never listed, removed
    /// when no clone needs it any more.
    pub hidden: bool,
    /// The CO deleted it while clones still hydrate from it; the image is
    /// kept until the last of them completes.
    pub deleted: bool,
    /// For a redirect cut: the generation of the volume's data file that
    /// became this image.
    pub source_generation: u32,
    /// The device class whose pool holds the image: the source volume's
    /// at the cut (`None`: the default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_class: Option<DeviceClassName>,
    /// Unix seconds.
    pub created_at: u64,
}

impl Record for SnapshotRecord {
    type Id = SnapshotId;
    const KIND: &'static str = "snapshots";
    fn id(&self) -> &SnapshotId {
        &self.id
    }
}

/// Now, in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
