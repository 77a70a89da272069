//! The controller agent (`liveclone controller` in Kubernetes mode): the CSI
//! Controller service of a cluster whose volumes live on the nodes.
//!
//! The controller cannot touch any node's storage. Each CSI call becomes a
//! spec in a cluster-scoped custom resource named by the CSI ID
//! (`LivecloneVolume`, `LivecloneSnapshot`), written by server-side apply
//! under [`CONTROLLER_FIELD_MANAGER`], labelled with its node
//! ([`NODE_LABEL`]) and carrying [`STORAGE_FINALIZER`]; the node agent of
//! that node makes it so and reports in the status, and the call waits for
//! that report (at most [`ControllerAgentConfig::wait_timeout`]; after that
//! UNAVAILABLE, which the sidecars retry, and a retry waits again). A
//! clone made for a claim also gets its `VolumeHydration`, in the claim's
//! namespace, before the wait, so `kubectl get vh` shows it at once.
//!
//! Which node: a clone or restore goes where its source is (dm-clone reads
//! the source on the same node); a new empty volume goes to the first node
//! of the CO's preferred topologies (the scheduler's choice, with
//! WaitForFirstConsumer), else of its requisite ones.
//!
//! GetCapacity reads the LivecloneNode that each node agent publishes (its
//! device classes and their free space): the named class's
//! `availableBytes` on the topology's node, 0 when the node has no such
//! class, no LivecloneNode, or one older than three publish intervals.
//!
//! No leader election: the agent has no work of its own. It only answers
//! the calls of the sidecars in its own pod, and those elect a leader among
//! the replicas; every call is an idempotent apply of a whole spec and a
//! wait, so even two replicas answering at once (a leader change in the
//! middle of a call) write the same objects.

mod wait;

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{debug, info, warn};

use super::capacity::{self, LivecloneNode};
use super::hydration::{HydrationDestination, HydrationSource, SourceKind, VolumeHydrationSpec};
use super::volume::{
    LivecloneSnapshot, LivecloneSnapshotSpec, LivecloneVolume, LivecloneVolumeSpec,
    VolumeContentSource, VolumePhase, DEFAULT_POOL,
};
use super::{
    node_label_value, ObjectName, VolumeHydration, CONTROLLER_FIELD_MANAGER, NODE_LABEL,
    READY_CONDITION, STORAGE_FINALIZER,
};
use crate::domain::device_class::DeviceClassName;
use crate::domain::engine::{CapacityRange, CreateVolume};
use crate::domain::error::{DomainError, DomainResult, ErrorCode};
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::{AccessKind, ContentSource};
use crate::domain::provisioner::{
    CoMetadata, CoObject, Placement, Provisioner, SnapshotInfo, VolumeInfo,
};
use crate::domain::sizing::parse_parameters;
use crate::grpc::controller::ControllerService;

/// Condition type a node agent sets on a LivecloneVolume while the volume
/// is abnormal (a stalled or failed hydration); the message says why.
pub const ABNORMAL_CONDITION: &str = "Abnormal";

/// Settings of the controller agent.
#[derive(Debug, Clone)]
pub struct ControllerAgentConfig {
    /// How long a call waits for the node's report before answering
    /// UNAVAILABLE (the sidecar retries; nothing is undone). Keep it below
    /// the sidecars' `--timeout`.
    pub wait_timeout: Duration,
    /// How often the object is read while waiting.
    pub poll_interval: Duration,
}

impl Default for ControllerAgentConfig {
    fn default() -> Self {
        ControllerAgentConfig {
            wait_timeout: Duration::from_secs(50),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// The CSI Controller service of Kubernetes mode, over `client` (whose
/// identity needs the rules of `deploy/rbac/controller.yaml`).
pub fn controller_service(client: Client, config: ControllerAgentConfig) -> ControllerService {
    ControllerService::with_provisioner(std::sync::Arc::new(KubeProvisioner::new(client, config)))
}

/// The [`Provisioner`] of Kubernetes mode.
#[derive(Clone)]
pub struct KubeProvisioner {
    client: Client,
    config: ControllerAgentConfig,
}

impl std::fmt::Debug for KubeProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeProvisioner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// An API error as a domain error: what the CO should do about it.
pub(crate) fn api_error(what: &str, error: kube::Error) -> DomainError {
    match &error {
        kube::Error::Api(status) => match status.code {
            // The CEL rules and schema of the CRDs refuse what cannot be
            // (a shrink, a changed node): the request's fault.
            400 | 422 => DomainError::invalid_argument(format!("{what}: {}", status.message)),
            404 => DomainError::not_found(format!("{what}: {}", status.message)),
            409 => DomainError::aborted(format!("{what}: {}", status.message)),
            401 | 403 => DomainError::internal(format!(
                "{what}: the API server refused the controller agent ({}); check its RBAC \
                 (deploy/rbac/controller.yaml)",
                status.message
            )),
            _ => DomainError::unavailable(format!("{what}: {}", status.message)),
        },
        // Connection problems and the like: the API server may be back soon.
        _ => DomainError::unavailable(format!("{what}: {error}")),
    }
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// The object of that name, if there is one.
async fn read<K>(api: &Api<K>, name: &str) -> DomainResult<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| api_error(&format!("reading {} {name}", K::kind(&())), e))
}

/// Asks the API server to delete the object; `false` when it was gone
/// already. With its finalizer, it stays until its node has cleaned up.
async fn delete_object<K>(api: &Api<K>, name: &str) -> DomainResult<bool>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(api_error(&format!("deleting {} {name}", K::kind(&())), e)),
    }
}

/// The node's failure, from the Ready condition it wrote (False, reason: an
/// error code name).
fn node_failure(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Option<DomainError> {
    let ready = conditions.iter().find(|c| c.type_ == READY_CONDITION)?;
    if ready.status != super::CONDITION_FALSE {
        return None;
    }
    let code = ready.reason.parse::<ErrorCode>().ok()?;
    Some(DomainError {
        code,
        message: ready.message.clone(),
    })
}

fn object_name(object: &CoObject) -> ObjectName {
    ObjectName {
        namespace: object.namespace.clone(),
        name: object.name.clone(),
    }
}

fn labels(node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(NODE_LABEL.to_owned(), node_label_value(node))])
}

/// The controller's whole server-side apply of a LivecloneVolume or
/// LivecloneSnapshot: name, node label, storage finalizer and spec. Always
/// all of them: fields this manager applied before and leaves out of an
/// apply are removed, and a lost finalizer or label would let the object go
/// without its node's cleanup, or hide it from its node.
fn storage_apply<K: Resource<DynamicType = ()>>(
    name: &str,
    node: &str,
    spec: &impl serde::Serialize,
) -> serde_json::Value {
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels(node)),
            finalizers: Some(vec![STORAGE_FINALIZER.to_owned()]),
            ..ObjectMeta::default()
        },
        "spec": spec,
    })
}

fn deleting<K: Resource>(object: &K) -> bool {
    object.meta().deletion_timestamp.is_some()
}

/// A volume's object as the Controller service reports it; `None` while the
/// node has not made it (or it is being deleted).
fn volume_info(object: &LivecloneVolume) -> Option<VolumeInfo> {
    let status = object.status.as_ref()?;
    if deleting(object) || status.phase != Some(VolumePhase::Ready) {
        return None;
    }
    let id = object.name_any().parse::<VolumeId>().ok()?;
    let access = AccessKind::try_from(object.spec.access).ok()?;
    let content_source = match &object.spec.content_source {
        Some(source) => Some(ContentSource::try_from(source).ok()?),
        None => None,
    };
    let abnormal = status
        .conditions
        .iter()
        .find(|c| c.type_ == ABNORMAL_CONDITION && c.status == super::CONDITION_TRUE)
        .map(|c| c.message.clone());
    Some(VolumeInfo {
        id,
        capacity_bytes: status.capacity_bytes.unwrap_or(object.spec.capacity_bytes),
        access,
        content_source,
        node: object.spec.node.clone(),
        abnormal,
        progress: None,
    })
}

/// A snapshot's object as the Controller service reports it; `None` until
/// the node has cut it (or while it is being deleted).
fn snapshot_info(object: &LivecloneSnapshot) -> Option<SnapshotInfo> {
    let status = object.status.as_ref()?;
    if deleting(object) {
        return None;
    }
    let created_at = status.creation_time.as_ref()?.0.as_second();
    Some(SnapshotInfo {
        id: object.name_any().parse().ok()?,
        source_volume: object.spec.source_volume.parse().ok()?,
        size_bytes: status.size_bytes?,
        created_at: u64::try_from(created_at).unwrap_or(0),
        ready_to_use: status.ready_to_use.unwrap_or(false),
    })
}

impl KubeProvisioner {
    pub fn new(client: Client, config: ControllerAgentConfig) -> Self {
        KubeProvisioner { client, config }
    }

    fn volumes(&self) -> Api<LivecloneVolume> {
        Api::all(self.client.clone())
    }

    fn snapshots(&self) -> Api<LivecloneSnapshot> {
        Api::all(self.client.clone())
    }

    fn apply_params() -> PatchParams {
        // Forced: these spec fields are the controller's alone; a conflict
        // could only come from a person editing them by hand.
        PatchParams::apply(CONTROLLER_FIELD_MANAGER).force()
    }

    async fn get_volume(&self, id: &VolumeId) -> DomainResult<Option<LivecloneVolume>> {
        read(&self.volumes(), id.as_str()).await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> DomainResult<Option<LivecloneSnapshot>> {
        read(&self.snapshots(), id.as_str()).await
    }

    /// Waits until the object is gone: its node has removed the storage and
    /// then the finalizer. `node_message` is the node's last word on it.
    async fn wait_until_gone<K>(
        &self,
        api: &Api<K>,
        name: &str,
        node_message: fn(K) -> Option<String>,
    ) -> DomainResult<()>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        wait::until(&self.config, || async {
            Ok(match read(api, name).await? {
                None => wait::Poll::Done(()),
                Some(object) => wait::Poll::Waiting(
                    node_message(object)
                        .unwrap_or_else(|| "the node has not removed it yet".to_owned()),
                ),
            })
        })
        .await
    }

    /// The source's node, size and the object people know it by.
    async fn source_facts(&self, source: &ContentSource) -> DomainResult<SourceFacts> {
        let gone = |what: String| DomainError::not_found(format!("{what} does not exist"));
        match source {
            ContentSource::Volume(id) => {
                let object = self
                    .get_volume(id)
                    .await?
                    .filter(|object| !deleting(object))
                    .ok_or_else(|| gone(format!("source volume {id}")))?;
                let size = object
                    .status
                    .as_ref()
                    .and_then(|status| status.capacity_bytes)
                    .ok_or_else(|| {
                        DomainError::unavailable(format!(
                            "source volume {id} is not made yet on node {}",
                            object.spec.node
                        ))
                    })?;
                Ok(SourceFacts {
                    node: object.spec.node.clone(),
                    size_bytes: size,
                    source: match &object.spec.claim {
                        Some(claim) => HydrationSource {
                            kind: SourceKind::PersistentVolumeClaim,
                            name: claim.name.clone(),
                            namespace: Some(claim.namespace.clone()),
                            volume_handle: Some(id.to_string()),
                            snapshot_handle: None,
                        },
                        None => HydrationSource {
                            kind: SourceKind::Volume,
                            name: id.to_string(),
                            namespace: None,
                            volume_handle: Some(id.to_string()),
                            snapshot_handle: None,
                        },
                    },
                })
            }
            ContentSource::Snapshot(id) => {
                let object = self
                    .get_snapshot(id)
                    .await?
                    .filter(|object| !deleting(object))
                    .ok_or_else(|| gone(format!("source snapshot {id}")))?;
                let size = object
                    .status
                    .as_ref()
                    .and_then(|status| status.size_bytes)
                    .ok_or_else(|| {
                        DomainError::unavailable(format!(
                            "source snapshot {id} is not cut yet on node {}",
                            object.spec.node
                        ))
                    })?;
                let (name, namespace) = match &object.spec.volume_snapshot {
                    Some(snapshot) => (snapshot.name.clone(), Some(snapshot.namespace.clone())),
                    None => (id.to_string(), None),
                };
                Ok(SourceFacts {
                    node: object.spec.node.clone(),
                    size_bytes: size,
                    source: HydrationSource {
                        kind: SourceKind::VolumeSnapshot,
                        name,
                        namespace,
                        volume_handle: None,
                        snapshot_handle: Some(id.to_string()),
                    },
                })
            }
        }
    }

    /// Writes the VolumeHydration of a clone made for `claim`, owned by the
    /// clone's LivecloneVolume (so it goes when the volume does).
    async fn apply_hydration(
        &self,
        volume: &LivecloneVolume,
        claim: &CoObject,
        source: &SourceFacts,
        persistent_volume: Option<&str>,
    ) -> DomainResult<()> {
        let id = volume.name_any();
        let mut hydration_source = source.source.clone();
        // The source's namespace is only written when it differs.
        if hydration_source.namespace.as_deref() == Some(claim.namespace.as_str()) {
            hydration_source.namespace = None;
        }
        let spec = VolumeHydrationSpec {
            pvc: claim.name.clone(),
            source: hydration_source,
            destination: HydrationDestination {
                volume_handle: id.clone(),
                persistent_volume_name: persistent_volume.unwrap_or(&id).to_owned(),
            },
            node: volume.spec.node.clone(),
            tunables: None,
            paused: false,
        };
        // `paused` and `tunables` are the users' (a later apply that named
        // them would conflict with a user's edit, or take it back once the
        // controller owned them): the controller's apply leaves them out,
        // and their absence means "not paused, class defaults".
        let mut spec = serde_json::to_value(&spec)
            .map_err(|e| DomainError::internal(format!("encoding a VolumeHydration spec: {e}")))?;
        if let Some(fields) = spec.as_object_mut() {
            fields.remove("paused");
            fields.remove("tunables");
        }
        let owner = volume.controller_owner_ref(&()).ok_or_else(|| {
            DomainError::internal(format!(
                "LivecloneVolume {id} has no UID to own its hydration"
            ))
        })?;
        let object = json!({
            "apiVersion": VolumeHydration::api_version(&()),
            "kind": VolumeHydration::kind(&()),
            "metadata": ObjectMeta {
                name: Some(claim.name.clone()),
                namespace: Some(claim.namespace.clone()),
                labels: Some(labels(&volume.spec.node)),
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            "spec": spec,
        });
        let api: Api<VolumeHydration> = Api::namespaced(self.client.clone(), &claim.namespace);
        // Not forced: the fields applied are immutable, so a conflict on
        // them would mean someone else made this object, which must not be
        // taken over.
        api.patch(
            &claim.name,
            &PatchParams::apply(CONTROLLER_FIELD_MANAGER),
            &Patch::Apply(&object),
        )
        .await
        .map_err(|e| {
            api_error(
                &format!(
                    "writing VolumeHydration {}/{} of clone {id}",
                    claim.namespace, claim.name
                ),
                e,
            )
        })?;
        Ok(())
    }
}

/// What a clone needs to know of its source.
struct SourceFacts {
    node: String,
    size_bytes: u64,
    source: HydrationSource,
}

#[async_trait::async_trait]
impl Provisioner for KubeProvisioner {
    fn reports_capacity(&self) -> bool {
        // Capacity is per node and only the nodes can measure it; each node
        // agent publishes its classes' free space in its LivecloneNode,
        // which GetCapacity reads.
        true
    }

    async fn source_access(&self, source: &ContentSource) -> DomainResult<Option<AccessKind>> {
        let access = match source {
            ContentSource::Volume(id) => self
                .get_volume(id)
                .await?
                .filter(|object| !deleting(object))
                .map(|object| object.spec.access),
            ContentSource::Snapshot(id) => self
                .get_snapshot(id)
                .await?
                .filter(|object| !deleting(object))
                .map(|object| object.spec.access),
        };
        access
            .map(AccessKind::try_from)
            .transpose()
            .map_err(|e| DomainError::internal(format!("the source's recorded access: {e}")))
    }

    async fn create_volume(
        &self,
        request: CreateVolume,
        placement: &Placement,
        metadata: &CoMetadata,
    ) -> DomainResult<VolumeInfo> {
        let id = VolumeId::for_name(&request.name)
            .map_err(|e| DomainError::invalid_argument(format!("volume name: {e}")))?;
        // Refused here, before anything is written, rather than by the node.
        parse_parameters(&request.parameters)
            .map_err(|e| DomainError::invalid_argument(format!("parameters: {e}")))?;
        let device_class = crate::domain::sizing::device_class_parameter(&request.parameters)
            .map_err(|e| DomainError::invalid_argument(format!("parameters: {e}")))?;
        let source = match &request.source {
            Some(source) => Some(self.source_facts(source).await?),
            None => None,
        };
        let existing = self.get_volume(&id).await?;
        if let Some(object) = &existing {
            if deleting(object) {
                return Err(DomainError::aborted(format!(
                    "volume {id} ({:?}) is being deleted; try again when it is gone",
                    request.name
                )));
            }
        }
        let node = match (&existing, &source) {
            // A retry: the node was chosen by the first call.
            (Some(object), _) => object.spec.node.clone(),
            (None, Some(source)) => source.node.clone(),
            (None, None) => placement.first_choice().map(str::to_owned).ok_or_else(|| {
                DomainError::invalid_argument(
                    "accessibility_requirements name no node (topology.liveclone.io/node); \
                     liveclone volumes are node-local: use a StorageClass with \
                     volumeBindingMode WaitForFirstConsumer",
                )
            })?,
        };
        if !placement.allows(&node) {
            return Err(DomainError::resource_exhausted(format!(
                "volume {id} can only be on node {node:?} (where its source is), which \
                 accessibility_requirements exclude"
            )));
        }
        let capacity_bytes = request
            .capacity
            .resolve(source.as_ref().map(|source| source.size_bytes))?;
        let spec = LivecloneVolumeSpec {
            name: request.name.clone(),
            node: node.clone(),
            capacity_bytes,
            access: request.access.into(),
            content_source: request.source.as_ref().map(VolumeContentSource::from),
            parameters: request
                .parameters
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            claim: metadata.claim.as_ref().map(object_name),
            // What the node will use, from the same parameter, for
            // `kubectl get lcvol -o wide`.
            pool: device_class.map_or_else(|| DEFAULT_POOL.to_owned(), |class| class.to_string()),
        };
        if let Some(object) = &existing {
            let same = LivecloneVolumeSpec {
                capacity_bytes: object.spec.capacity_bytes,
                claim: object.spec.claim.clone(),
                ..spec.clone()
            };
            if object.spec != same || !request.capacity.admits(object.spec.capacity_bytes) {
                return Err(DomainError::already_exists(format!(
                    "volume {:?} exists ({id}, {} bytes on node {}) and does not match this \
                     request",
                    request.name, object.spec.capacity_bytes, object.spec.node
                )));
            }
        }
        let object = match existing {
            Some(object) => object,
            None => {
                let object = storage_apply::<LivecloneVolume>(id.as_str(), &node, &spec);
                info!(volume = %id, %node, "asking the node for the volume");
                self.volumes()
                    .patch(id.as_str(), &Self::apply_params(), &Patch::Apply(&object))
                    .await
                    .map_err(|e| api_error(&format!("writing LivecloneVolume {id}"), e))?
            }
        };
        if let (Some(source), Some(claim)) = (&source, &metadata.claim) {
            self.apply_hydration(
                &object,
                claim,
                source,
                metadata.persistent_volume.as_deref(),
            )
            .await?;
        }
        let ready = wait::until(&self.config, || async {
            let object = self.get_volume(&id).await?.ok_or_else(|| {
                DomainError::aborted(format!("volume {id} was deleted meanwhile"))
            })?;
            let generation = object.metadata.generation;
            let Some(status) = &object.status else {
                return Ok(wait::Poll::Waiting(
                    "no status from the node yet".to_owned(),
                ));
            };
            if generation.is_some() && status.observed_generation < generation {
                return Ok(wait::Poll::Waiting(
                    "the node has not seen the request yet".to_owned(),
                ));
            }
            if let Some(failure) = node_failure(&status.conditions) {
                if !failure.code.is_transient() {
                    return Ok(wait::Poll::Done(Err(failure)));
                }
            }
            match volume_info(&object) {
                Some(info) => Ok(wait::Poll::Done(Ok(info))),
                None => Ok(wait::Poll::Waiting(
                    status
                        .message
                        .clone()
                        .unwrap_or_else(|| "the node is working on it".to_owned()),
                )),
            }
        })
        .await
        .map_err(|e| e.context(format!("volume {id} on node {node}")))?;
        match ready {
            Ok(info) => Ok(info),
            Err(failure) => {
                // The CO does not call DeleteVolume for a volume it was
                // refused, so the object goes now (the node made nothing,
                // and releases the finalizer); a later CreateVolume of the
                // same name starts afresh instead of meeting this spec.
                if let Err(e) = delete_object(&self.volumes(), id.as_str()).await {
                    warn!(volume = %id, "removing the refused volume's object: {e}");
                }
                Err(failure.context(format!("volume {id} on node {node}")))
            }
        }
    }

    async fn delete_volume(&self, id: &VolumeId) -> DomainResult<()> {
        let Some(object) = self.get_volume(id).await? else {
            debug!(volume = %id, "no such LivecloneVolume; nothing to delete");
            return Ok(());
        };
        if !deleting(&object) {
            info!(volume = %id, node = %object.spec.node, "asking the node to delete the volume");
            if !delete_object(&self.volumes(), id.as_str()).await? {
                return Ok(());
            }
        }
        // The hydration object goes with its volume by owner reference
        // (Kubernetes' garbage collector); deleting it here as well makes
        // it go at once and in clusters that run without a collector.
        if let (Some(claim), Some(_)) = (&object.spec.claim, &object.spec.content_source) {
            let api: Api<VolumeHydration> = Api::namespaced(self.client.clone(), &claim.namespace);
            if let Ok(Some(hydration)) = api.get_opt(&claim.name).await {
                if hydration.spec.destination.volume_handle == id.as_str() {
                    if let Err(e) = api.delete(&claim.name, &DeleteParams::default()).await {
                        if !is_not_found(&e) {
                            warn!(volume = %id, "deleting its VolumeHydration: {e}");
                        }
                    }
                }
            }
        }
        self.wait_until_gone(&self.volumes(), id.as_str(), |object| {
            object.status.and_then(|status| status.message)
        })
        .await
        .map_err(|e| e.context(format!("deleting volume {id} on node {}", object.spec.node)))
    }

    async fn volume(&self, id: &VolumeId) -> DomainResult<Option<VolumeInfo>> {
        Ok(self.get_volume(id).await?.as_ref().and_then(volume_info))
    }

    async fn list_volumes(&self) -> DomainResult<Vec<VolumeInfo>> {
        let list = self
            .volumes()
            .list(&Default::default())
            .await
            .map_err(|e| api_error("listing LivecloneVolumes", e))?;
        let mut volumes: Vec<_> = list.items.iter().filter_map(volume_info).collect();
        volumes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(volumes)
    }

    /// From the LivecloneNodes the node agents publish (see
    /// [`capacity::available_bytes`]: 0 for a class the node lacks, a node
    /// without one, or stale figures).
    async fn available_capacity(
        &self,
        node: Option<&str>,
        class: Option<&DeviceClassName>,
    ) -> DomainResult<u64> {
        let now = super::now().0;
        let api: Api<LivecloneNode> = Api::all(self.client.clone());
        match node {
            Some(node) => {
                // A topology value that cannot name an object names no node
                // of ours (and must not go into a request path).
                if !capacity::is_object_name(node) {
                    return Ok(0);
                }
                Ok(read(&api, node)
                    .await?
                    .map_or(0, |object| capacity::available_bytes(&object, class, now)))
            }
            // No topology: the largest room on any one node, not the sum.
            // A volume lives on a single node, so the sum would promise a
            // volume that no node can hold, while the largest is what the
            // biggest new volume can actually get.
            None => {
                let list = api
                    .list(&Default::default())
                    .await
                    .map_err(|e| api_error("listing LivecloneNodes", e))?;
                Ok(list
                    .items
                    .iter()
                    .map(|object| capacity::available_bytes(object, class, now))
                    .max()
                    .unwrap_or(0))
            }
        }
    }

    async fn expand_volume(
        &self,
        id: &VolumeId,
        capacity: CapacityRange,
    ) -> DomainResult<(u64, bool)> {
        let object = self
            .get_volume(id)
            .await?
            .filter(|object| !deleting(object))
            .ok_or_else(|| DomainError::not_found(format!("volume {id} does not exist")))?;
        let wanted = capacity.resolve(None)?;
        let node_expansion_required = matches!(
            AccessKind::try_from(object.spec.access),
            Ok(AccessKind::Filesystem { .. })
        );
        if wanted > object.spec.capacity_bytes {
            let spec = LivecloneVolumeSpec {
                capacity_bytes: wanted,
                ..object.spec.clone()
            };
            // The whole spec: an apply that left fields out would drop them.
            let apply = storage_apply::<LivecloneVolume>(id.as_str(), &spec.node, &spec);
            info!(volume = %id, bytes = wanted, "asking the node to grow the volume");
            self.volumes()
                .patch(id.as_str(), &Self::apply_params(), &Patch::Apply(&apply))
                .await
                .map_err(|e| api_error(&format!("growing LivecloneVolume {id}"), e))?;
        }
        let target = wanted.max(object.spec.capacity_bytes);
        let bytes = wait::until(&self.config, || async {
            let object = self
                .get_volume(id)
                .await?
                .ok_or_else(|| DomainError::not_found(format!("volume {id} was deleted")))?;
            let status = object.status.unwrap_or_default();
            if let Some(failure) = node_failure(&status.conditions) {
                if !failure.code.is_transient() {
                    return Err(failure);
                }
            }
            Ok(match status.capacity_bytes {
                Some(bytes) if bytes >= target => wait::Poll::Done(bytes),
                _ => wait::Poll::Waiting(
                    status
                        .message
                        .unwrap_or_else(|| "the node has not grown it yet".to_owned()),
                ),
            })
        })
        .await
        .map_err(|e| e.context(format!("growing volume {id}")))?;
        Ok((bytes, node_expansion_required))
    }

    async fn create_snapshot(
        &self,
        name: &str,
        source: &VolumeId,
        metadata: &CoMetadata,
    ) -> DomainResult<SnapshotInfo> {
        let id = SnapshotId::for_name(name)
            .map_err(|e| DomainError::invalid_argument(format!("snapshot name: {e}")))?;
        let existing = self.get_snapshot(&id).await?;
        let object = match existing {
            Some(object) if deleting(&object) => {
                return Err(DomainError::aborted(format!(
                    "snapshot {id} ({name:?}) is being deleted; try again when it is gone"
                )))
            }
            Some(object) if object.spec.source_volume != source.as_str() => {
                return Err(DomainError::already_exists(format!(
                    "snapshot {name:?} exists ({id}) of another volume, {}",
                    object.spec.source_volume
                )))
            }
            Some(object) => object,
            None => {
                let volume = self
                    .get_volume(source)
                    .await?
                    .filter(|object| !deleting(object))
                    .ok_or_else(|| {
                        DomainError::not_found(format!("source volume {source} does not exist"))
                    })?;
                let spec = LivecloneSnapshotSpec {
                    name: name.to_owned(),
                    source_volume: source.to_string(),
                    node: volume.spec.node.clone(),
                    access: volume.spec.access,
                    volume_snapshot: metadata.volume_snapshot.as_ref().map(object_name),
                };
                let object =
                    storage_apply::<LivecloneSnapshot>(id.as_str(), &volume.spec.node, &spec);
                info!(snapshot = %id, volume = %source, node = %volume.spec.node, "asking the node for the snapshot");
                self.snapshots()
                    .patch(id.as_str(), &Self::apply_params(), &Patch::Apply(&object))
                    .await
                    .map_err(|e| api_error(&format!("writing LivecloneSnapshot {id}"), e))?
            }
        };
        let node = object.spec.node.clone();
        wait::until(&self.config, || async {
            let object = self.get_snapshot(&id).await?.ok_or_else(|| {
                DomainError::aborted(format!("snapshot {id} was deleted meanwhile"))
            })?;
            let status = object.status.clone().unwrap_or_default();
            if let Some(failure) = node_failure(&status.conditions) {
                if !failure.code.is_transient() {
                    return Err(failure);
                }
            }
            // Cut (size and time known) is enough: ready_to_use may still
            // be false while the node copies, and the snapshotter asks
            // again until it is true.
            Ok(match snapshot_info(&object) {
                Some(info) => wait::Poll::Done(info),
                None => wait::Poll::Waiting(
                    status
                        .message
                        .unwrap_or_else(|| "the node has not cut it yet".to_owned()),
                ),
            })
        })
        .await
        .map_err(|e| e.context(format!("snapshot {id} on node {node}")))
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> DomainResult<()> {
        let Some(object) = self.get_snapshot(id).await? else {
            return Ok(());
        };
        if !deleting(&object) {
            info!(snapshot = %id, node = %object.spec.node, "asking the node to delete the snapshot");
            if !delete_object(&self.snapshots(), id.as_str()).await? {
                return Ok(());
            }
        }
        self.wait_until_gone(&self.snapshots(), id.as_str(), |object| {
            object.status.and_then(|status| status.message)
        })
        .await
        .map_err(|e| {
            e.context(format!(
                "deleting snapshot {id} on node {}",
                object.spec.node
            ))
        })
    }

    async fn snapshot(&self, id: &SnapshotId) -> DomainResult<Option<SnapshotInfo>> {
        Ok(self
            .get_snapshot(id)
            .await?
            .as_ref()
            .and_then(snapshot_info))
    }

    async fn list_snapshots(&self) -> DomainResult<Vec<SnapshotInfo>> {
        let list = self
            .snapshots()
            .list(&Default::default())
            .await
            .map_err(|e| api_error("listing LivecloneSnapshots", e))?;
        let mut snapshots: Vec<_> = list.items.iter().filter_map(snapshot_info).collect();
        snapshots.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(snapshots)
    }
}

#[cfg(test)]
mod tests;
