//! Where the CSI Controller service's work is carried out.
//!
//! The Controller handlers (`grpc::controller`) validate a request and then
//! ask a [`Provisioner`] to make, find or remove volumes and snapshots. Two
//! implementations:
//!
//! * [`LocalProvisioner`]: this process's own engine, for `standalone`
//!   (and `controller` without Kubernetes), where the pool is local.
//! * `k8s::controller::KubeProvisioner`: Kubernetes mode, where the
//!   controller agent runs anywhere and the pools are on the nodes; it
//!   writes the volume's or snapshot's custom resource and waits for the
//!   owning node's agent to report.
//!
//! The trait speaks domain types and [`DomainError`]s, so both share the
//! handlers' validation and the mapping to gRPC codes.

use std::sync::Arc;

use tracing::Span;

use crate::domain::device_class::DeviceClassName;
use crate::domain::engine::{CapacityRange, CreateVolume, Engine};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::{
    AccessKind, ContentSource, SnapshotRecord, SnapshotState, VolumeRecord, VolumeState,
};

/// Which nodes a new volume may be made on, from the CO's accessibility
/// requirements (node names under the liveclone topology key). Empty lists
/// mean the CO did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// The volume must be on one of these (if any are given).
    pub requisite: Vec<String>,
    /// In order of preference; the first usable one wins.
    pub preferred: Vec<String>,
}

impl Placement {
    /// Whether `node` is allowed: no requirement, or named in it.
    pub fn allows(&self, node: &str) -> bool {
        (self.requisite.is_empty() && self.preferred.is_empty())
            || self
                .requisite
                .iter()
                .chain(&self.preferred)
                .any(|n| n == node)
    }

    /// The node a volume without a source goes to: the first preferred one,
    /// else the first requisite one.
    pub fn first_choice(&self) -> Option<&str> {
        self.preferred
            .first()
            .or_else(|| self.requisite.first())
            .map(String::as_str)
    }
}

/// A namespaced object of the CO (Kubernetes): namespace and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoObject {
    pub namespace: String,
    pub name: String,
}

/// What the CO tells about the objects a call is made for (Kubernetes'
/// sidecars pass them as `csi.storage.k8s.io/...` parameters with
/// `--extra-create-metadata`). Only used for what people see: the
/// VolumeHydration of a clone and the sources it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoMetadata {
    /// The claim a volume is provisioned for.
    pub claim: Option<CoObject>,
    /// The PersistentVolume that will hold it.
    pub persistent_volume: Option<String>,
    /// The VolumeSnapshot a snapshot is cut for.
    pub volume_snapshot: Option<CoObject>,
}

/// A volume as the Controller service reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub capacity_bytes: u64,
    pub access: AccessKind,
    pub content_source: Option<ContentSource>,
    /// The node whose pool holds it (its only accessible topology).
    pub node: String,
    /// Why the volume is abnormal (a stalled or failed hydration), if it is.
    pub abnormal: Option<String>,
    /// Hydration progress for people, while a clone copies.
    pub progress: Option<String>,
}

/// A snapshot as the Controller service reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub source_volume: VolumeId,
    pub size_bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    pub ready_to_use: bool,
}

impl From<&SnapshotRecord> for SnapshotInfo {
    fn from(record: &SnapshotRecord) -> Self {
        SnapshotInfo {
            id: record.id.clone(),
            source_volume: record.source_volume.clone(),
            size_bytes: record.size_bytes,
            created_at: record.created_at,
            ready_to_use: record.state == SnapshotState::Ready,
        }
    }
}

/// The Controller service's operations. Every method is idempotent, as the
/// CSI calls behind them are.
#[async_trait::async_trait]
pub trait Provisioner: Send + Sync + std::fmt::Debug {
    /// Whether GetCapacity can be answered (advertised as GET_CAPACITY).
    fn reports_capacity(&self) -> bool;

    /// How the data of an existing source is consumed; `None` when the
    /// source does not exist (CreateVolume then reports it as NOT_FOUND).
    async fn source_access(&self, source: &ContentSource) -> DomainResult<Option<AccessKind>>;

    /// Makes the volume (or finds it, for a repeated call), on a node the
    /// placement allows.
    async fn create_volume(
        &self,
        request: CreateVolume,
        placement: &Placement,
        metadata: &CoMetadata,
    ) -> DomainResult<VolumeInfo>;

    /// Removes the volume; nothing to do for one that does not exist.
    async fn delete_volume(&self, id: &VolumeId) -> DomainResult<()>;

    /// A volume the CO may see (completely made, not being deleted).
    async fn volume(&self, id: &VolumeId) -> DomainResult<Option<VolumeInfo>>;

    /// Every volume the CO may see, sorted by ID.
    async fn list_volumes(&self) -> DomainResult<Vec<VolumeInfo>>;

    /// Bytes available for new volumes of a device class (`None`: the
    /// default) on `node` (every node this provisioner serves when `None`).
    /// A class the node does not have has nothing available.
    async fn available_capacity(
        &self,
        node: Option<&str>,
        class: Option<&DeviceClassName>,
    ) -> DomainResult<u64>;

    /// Grows a volume; returns its size and whether the node must grow its
    /// file system.
    async fn expand_volume(
        &self,
        id: &VolumeId,
        capacity: CapacityRange,
    ) -> DomainResult<(u64, bool)>;

    async fn create_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
        metadata: &CoMetadata,
    ) -> DomainResult<SnapshotInfo>;

    /// Removes the snapshot; nothing to do for one that does not exist.
    async fn delete_snapshot(&self, id: &SnapshotId) -> DomainResult<()>;

    /// A snapshot the CO may see (not hidden, not deleted).
    async fn snapshot(&self, id: &SnapshotId) -> DomainResult<Option<SnapshotInfo>>;

    /// Every snapshot the CO may see, sorted by ID.
    async fn list_snapshots(&self) -> DomainResult<Vec<SnapshotInfo>>;
}

/// The engine of this process: volumes live in its node's pool.
#[derive(Debug, Clone)]
pub struct LocalProvisioner {
    engine: Arc<Engine>,
}

impl LocalProvisioner {
    pub fn new(engine: Arc<Engine>) -> Self {
        LocalProvisioner { engine }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn node(&self) -> &str {
        &self.engine.config().node_id
    }

    /// Runs an engine call (which blocks on tools and ioctls) on the
    /// blocking pool, inside the caller's span: tracing's current span is
    /// per thread, so without it the engine's log lines would lose the
    /// RPC's volume ID.
    async fn blocking<T, F>(&self, work: F) -> DomainResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Engine) -> DomainResult<T> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let span = Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| work(&engine)))
            .await
            .map_err(|join_error| {
                // A panic in the engine (or a runtime shutting down) ends up
                // here; the operation's records say how far it got, and a
                // retry continues from there.
                tracing::error!(%join_error, "the engine call did not finish");
                DomainError::internal(format!("the operation did not finish: {join_error}"))
            })?
    }

    fn info(&self, record: &VolumeRecord) -> VolumeInfo {
        VolumeInfo {
            id: record.id.clone(),
            capacity_bytes: record.capacity_bytes,
            access: record.access,
            content_source: record.content_source.clone(),
            node: self.node().to_owned(),
            abnormal: self.engine.abnormal_condition(&record.id),
            progress: self
                .engine
                .progress_of(&record.id)
                .map(|progress| progress.message),
        }
    }
}

#[async_trait::async_trait]
impl Provisioner for LocalProvisioner {
    fn reports_capacity(&self) -> bool {
        true
    }

    async fn source_access(&self, source: &ContentSource) -> DomainResult<Option<AccessKind>> {
        let source = source.clone();
        self.blocking(move |engine| {
            Ok(match &source {
                ContentSource::Volume(id) => engine.volume(id)?.map(|record| record.access),
                ContentSource::Snapshot(id) => engine.snapshot(id)?.map(|record| record.access),
            })
        })
        .await
    }

    async fn create_volume(
        &self,
        request: CreateVolume,
        placement: &Placement,
        _metadata: &CoMetadata,
    ) -> DomainResult<VolumeInfo> {
        // The volume could only be made here: the spec's code for "unable
        // to provision in accessible_topology".
        if !placement.allows(self.node()) {
            return Err(DomainError::resource_exhausted(format!(
                "liveclone volumes are only accessible on the node that holds them; this is \
                 node {:?} and accessibility_requirements do not include it",
                self.node()
            )));
        }
        let record = self
            .blocking(move |engine| engine.create_volume(request))
            .await?;
        Ok(self.info(&record))
    }

    async fn delete_volume(&self, id: &VolumeId) -> DomainResult<()> {
        let id = id.clone();
        self.blocking(move |engine| engine.delete_volume(&id)).await
    }

    async fn volume(&self, id: &VolumeId) -> DomainResult<Option<VolumeInfo>> {
        let id = id.clone();
        let record = self.blocking(move |engine| engine.volume(&id)).await?;
        // One still being created has not been returned by CreateVolume
        // yet, and one being deleted is gone as far as the CO is concerned.
        Ok(record
            .filter(|record| record.state == VolumeState::Ready)
            .map(|record| self.info(&record)))
    }

    async fn list_volumes(&self) -> DomainResult<Vec<VolumeInfo>> {
        let records = self.blocking(|engine| engine.list_volumes()).await?;
        Ok(records.iter().map(|record| self.info(record)).collect())
    }

    async fn available_capacity(
        &self,
        node: Option<&str>,
        class: Option<&DeviceClassName>,
    ) -> DomainResult<u64> {
        // Another node's pool: nothing is available for it here.
        if node.is_some_and(|node| node != self.node()) {
            return Ok(0);
        }
        let class = class.cloned();
        self.blocking(move |engine| {
            if !engine.device_classes().contains(class.as_ref()) {
                return Ok(0);
            }
            engine.available_capacity(class.as_ref())
        })
        .await
    }

    async fn expand_volume(
        &self,
        id: &VolumeId,
        capacity: CapacityRange,
    ) -> DomainResult<(u64, bool)> {
        let id = id.clone();
        self.blocking(move |engine| engine.expand_volume(&id, capacity))
            .await
    }

    async fn create_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
        _metadata: &CoMetadata,
    ) -> DomainResult<SnapshotInfo> {
        let (name, source) = (name.to_owned(), source.clone());
        let record = self
            .blocking(move |engine| engine.create_snapshot(&name, &source))
            .await?;
        Ok(SnapshotInfo::from(&record))
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> DomainResult<()> {
        let id = id.clone();
        self.blocking(move |engine| engine.delete_snapshot(&id))
            .await
    }

    async fn snapshot(&self, id: &SnapshotId) -> DomainResult<Option<SnapshotInfo>> {
        let id = id.clone();
        let record = self.blocking(move |engine| engine.snapshot(&id)).await?;
        // Hidden cuts (made for clones of volumes) and snapshots the CO
        // deleted are not the CO's to see.
        Ok(record
            .filter(|record| !record.hidden && !record.deleted)
            .map(|record| SnapshotInfo::from(&record)))
    }

    async fn list_snapshots(&self) -> DomainResult<Vec<SnapshotInfo>> {
        let records = self.blocking(|engine| engine.list_snapshots()).await?;
        Ok(records.iter().map(SnapshotInfo::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_allows_named_nodes_or_any_when_unconstrained() {
        let free = Placement::default();
        assert!(free.allows("a"));
        assert_eq!(free.first_choice(), None);
        let constrained = Placement {
            requisite: vec!["b".to_owned(), "a".to_owned()],
            preferred: vec!["a".to_owned()],
        };
        assert!(constrained.allows("a") && constrained.allows("b"));
        assert!(!constrained.allows("c"));
        assert_eq!(constrained.first_choice(), Some("a"));
        let requisite_only = Placement {
            requisite: vec!["b".to_owned()],
            preferred: Vec::new(),
        };
        assert_eq!(requisite_only.first_choice(), Some("b"));
    }
}
