//! The engine: every operation on volumes and snapshots of one node.
//!
//! Handlers (gRPC, the admin API) call it from `spawn_blocking`: its calls
//! block on tools and ioctls. Each public operation takes the
//! [`OpLocks`](crate::domain::locks::OpLocks) of every object it touches
//! (ABORTED if one is busy), records what it is about to do, does it, and
//! records that it is done, so that a retry or a restarted process finishes
//! the same work instead of repeating or losing it.
//!
//! Submodules: `assembly` (device tables from records), `volumes`
//! (create, delete, expand), `snapshots` (cuts and image lifetimes),
//! `node` (stage, publish, stats), `hydration` (pause, resume, tune,
//! samples and the switch to linear), `recovery` (start-up re-assembly).

mod assembly;
mod hydration;
mod node;
mod recovery;
mod snapshots;
#[cfg(test)]
mod tests;
mod volumes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use hydration::HydrationSample;
pub use node::{MountSpec, NodeStats, PublishRequest, StageRequest};
pub use volumes::{CapacityRange, CreateVolume};

use crate::domain::device_class::{DeviceClassName, DeviceClasses};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::hydration::Progress;
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::locks::OpLocks;
use crate::domain::model::{SnapshotRecord, VolumeRecord};
use crate::domain::paths::AllowedRoots;
use crate::domain::pool::Pool;
use crate::domain::store::RecordStore;
use crate::os::dm::{DmInfo, DmName};
use crate::os::Os;

/// Settings of one node's engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub node_id: String,
    /// Private folder for temporary mounts (trimming a new clone).
    pub work_dir: PathBuf,
    /// Where staging and target paths may be.
    pub allowed_roots: AllowedRoots,
    /// Most volumes published on this node at once (NodeGetInfo).
    pub max_volumes: u64,
}

/// One volume as status output shows it.
#[derive(Debug, Clone)]
pub struct VolumeView {
    pub record: VolumeRecord,
    pub device: Option<DmInfo>,
    pub progress: Option<Progress>,
}

pub struct Engine {
    os: Os,
    classes: DeviceClasses,
    volumes: Arc<dyn RecordStore<VolumeRecord>>,
    snapshots: Arc<dyn RecordStore<SnapshotRecord>>,
    locks: OpLocks,
    config: EngineConfig,
    /// Latest hydration progress per volume, written by the monitor.
    progress: Mutex<BTreeMap<VolumeId, Progress>>,
    /// Where published progress is also recorded, if anywhere.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Kept images (snapshots the CO still has) already detached since
    /// they last had a reader: `collect_images` runs every monitor round,
    /// and asking an LVM pool whether an LV is active costs a process.
    idle_images: Mutex<std::collections::BTreeSet<SnapshotId>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("classes", &self.classes)
            .field("config", &self.config)
            .finish()
    }
}

/// The device-mapper name of a volume's device.
pub fn dm_name(id: &VolumeId) -> DmName {
    // IDs are `lcv-` and 32 lowercase hex digits: always a valid suffix.
    DmName::with_suffix(id.as_str())
        .unwrap_or_else(|_| unreachable!("volume IDs are valid device-mapper suffixes"))
}

impl Engine {
    pub fn new(
        os: Os,
        classes: DeviceClasses,
        volumes: Arc<dyn RecordStore<VolumeRecord>>,
        snapshots: Arc<dyn RecordStore<SnapshotRecord>>,
        config: EngineConfig,
    ) -> Self {
        Self {
            os,
            classes,
            volumes,
            snapshots,
            locks: OpLocks::default(),
            config,
            progress: Mutex::new(BTreeMap::new()),
            metrics: None,
            idle_images: Mutex::new(Default::default()),
        }
    }

    /// Records published hydration progress in `metrics` too.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn metrics(&self) -> Option<&Arc<crate::metrics::Metrics>> {
        self.metrics.as_ref()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn os(&self) -> &Os {
        &self.os
    }

    pub fn device_classes(&self) -> &DeviceClasses {
        &self.classes
    }

    /// What Probe reports: the kernel has dm-clone and every pool is usable.
    pub fn health(&self) -> Result<(), String> {
        self.os
            .kernel
            .ensure_dm_clone()
            .map_err(|e| format!("device-mapper's clone target is not available: {e}"))?;
        for (class, pool) in self.classes.iter() {
            pool.check().map_err(|e| {
                format!(
                    "device class {class} ({}) is unusable: {e}",
                    pool.describe()
                )
            })?;
        }
        Ok(())
    }

    /// The pool that holds a volume's data and clone metadata.
    pub(crate) fn pool_of(&self, volume: &VolumeRecord) -> DomainResult<&Arc<dyn Pool>> {
        self.classes.get(volume.device_class.as_ref())
    }

    /// The pool that holds a snapshot's image.
    pub(crate) fn image_pool(&self, snapshot: &SnapshotRecord) -> DomainResult<&Arc<dyn Pool>> {
        self.classes.get(snapshot.device_class.as_ref())
    }

    /// The pool of the image a clone reads, found through its snapshot.
    pub(crate) fn image_pool_by_id(&self, snapshot: &SnapshotId) -> DomainResult<&Arc<dyn Pool>> {
        let record = self.snapshots.get(snapshot)?.ok_or_else(|| {
            DomainError::internal(format!(
                "snapshot {snapshot} has no record but a clone reads its image"
            ))
        })?;
        self.classes.get(record.device_class.as_ref())
    }

    pub fn volume(&self, id: &VolumeId) -> DomainResult<Option<VolumeRecord>> {
        Ok(self.volumes.get(id)?)
    }

    pub fn snapshot(&self, id: &SnapshotId) -> DomainResult<Option<SnapshotRecord>> {
        Ok(self.snapshots.get(id)?)
    }

    /// Every volume that exists for the CO (not half-deleted), sorted by ID.
    pub fn list_volumes(&self) -> DomainResult<Vec<VolumeRecord>> {
        Ok(self
            .volumes
            .list()?
            .into_iter()
            .filter(|v| v.state == crate::domain::model::VolumeState::Ready)
            .collect())
    }

    /// Every snapshot the CO can see: cut, not hidden, not deleted.
    pub fn list_snapshots(&self) -> DomainResult<Vec<SnapshotRecord>> {
        Ok(self
            .snapshots
            .list()?
            .into_iter()
            .filter(|s| {
                !s.hidden && !s.deleted && s.state == crate::domain::model::SnapshotState::Ready
            })
            .collect())
    }

    /// Volumes with their device and hydration state, for status output.
    pub fn volume_views(&self) -> DomainResult<Vec<VolumeView>> {
        let progress = self.progress_map();
        self.volumes
            .list()?
            .into_iter()
            .map(|record| {
                let device = self.os.dm.info(&dm_name(&record.id))?;
                let progress = progress.get(&record.id).cloned();
                Ok(VolumeView {
                    record,
                    device,
                    progress,
                })
            })
            .collect()
    }

    pub fn progress_of(&self, id: &VolumeId) -> Option<Progress> {
        self.progress_map().get(id).cloned()
    }

    fn progress_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<VolumeId, Progress>> {
        // Plain map updates cannot be left half done by a panic.
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by the monitor with each new figure.
    pub fn publish_progress(&self, id: &VolumeId, progress: Progress) {
        let mut map = self.progress_map();
        if let Some(metrics) = &self.metrics {
            metrics.hydration_progress(id.as_str(), &progress);
        }
        map.insert(id.clone(), progress);
        if let Some(metrics) = &self.metrics {
            metrics.set_hydration_phases(map.values().map(|p| p.phase));
        }
    }

    pub fn forget_progress(&self, id: &VolumeId) {
        let mut map = self.progress_map();
        map.remove(id);
        if let Some(metrics) = &self.metrics {
            metrics.forget_hydration(id.as_str());
            metrics.set_hydration_phases(map.values().map(|p| p.phase));
        }
    }

    /// Reads every device class's capacity into the metrics (if any); a
    /// class that cannot answer is logged and marked down.
    pub fn refresh_capacity_metrics(&self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        for (class, pool) in self.classes.iter() {
            match pool.capacity() {
                Ok(capacity) => metrics.device_class_capacity(class.as_str(), Some(&capacity)),
                Err(e) => {
                    tracing::warn!(%class, "reading the capacity of {}: {e}", pool.describe());
                    metrics.device_class_capacity(class.as_str(), None);
                }
            }
        }
    }

    /// Free bytes for new volumes of a device class (`None`: the default).
    pub fn available_capacity(&self, class: Option<&DeviceClassName>) -> DomainResult<u64> {
        Ok(self.classes.get(class)?.capacity()?.available_bytes)
    }

    fn require_volume(&self, id: &VolumeId) -> DomainResult<VolumeRecord> {
        self.volumes
            .get(id)?
            .ok_or_else(|| DomainError::not_found(format!("volume {id} does not exist")))
    }
}
