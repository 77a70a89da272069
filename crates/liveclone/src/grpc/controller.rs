//! The CSI Controller service: volumes and snapshots of this node's pool.
//!
//! Each handler checks the request as the spec asks (missing fields are
//! INVALID_ARGUMENT naming the field, IDs that cannot be ours are
//! NOT_FOUND), asks the [`Provisioner`] (this node's engine in standalone
//! mode, the node agents through the API server in Kubernetes mode) and
//! turns what it returns into the response. What a call does to state
//! (idempotency, sizes against sources, locking) is the provisioner's
//! business.
//!
//! Liveclone volumes live in one node's pool, so every volume is accessible
//! from that node only ([`crate::grpc::TOPOLOGY_NODE_KEY`]); there is no
//! attach step (ControllerPublishVolume is unimplemented and not
//! advertised).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{field, info_span, Instrument as _, Span};

use crate::domain::engine::{CreateVolume, Engine};
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::provisioner::{LocalProvisioner, Placement, Provisioner, VolumeInfo};
use crate::domain::sizing::{device_class_parameter, parse_parameters, PARAMETER_PREFIX};
use crate::grpc::convert::volume_span;
use crate::grpc::convert::{
    self, bytes_i64, capabilities, capability, capacity_range, co_metadata, content_source,
    content_source_message, node_topology, quoted, require, snapshot_message,
};
use crate::proto::csi::v1::controller_server::{Controller, ControllerServer};
use crate::proto::csi::v1::controller_service_capability::{self, rpc};
use crate::proto::csi::v1::validate_volume_capabilities_response::Confirmed;
use crate::proto::csi::v1::{
    controller_get_volume_response, list_snapshots_response, list_volumes_response,
    ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    GetSnapshotRequest, GetSnapshotResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    ListVolumesRequest, ListVolumesResponse, TopologyRequirement,
    ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse, Volume, VolumeCondition,
};

/// The Controller service implementation.
#[derive(Debug, Clone)]
pub struct ControllerService {
    provisioner: Arc<dyn Provisioner>,
}

/// What the controller offers, in the order the CO sees them; GET_CAPACITY
/// only when the provisioner can answer it.
fn controller_capabilities(reports_capacity: bool) -> Vec<ControllerServiceCapability> {
    [
        rpc::Type::CreateDeleteVolume,
        rpc::Type::CreateDeleteSnapshot,
        rpc::Type::ListVolumes,
        rpc::Type::ListSnapshots,
        rpc::Type::CloneVolume,
        rpc::Type::ExpandVolume,
        rpc::Type::GetCapacity,
        rpc::Type::GetVolume,
        rpc::Type::VolumeCondition,
        rpc::Type::SingleNodeMultiWriter,
    ]
    .into_iter()
    .filter(|kind| reports_capacity || *kind != rpc::Type::GetCapacity)
    .map(|kind| ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: kind.into(),
            },
        )),
    })
    .collect()
}

/// A span for an RPC about one snapshot.
fn snapshot_span(rpc: &'static str, snapshot_id: &str) -> Span {
    info_span!("csi", rpc, snapshot = %quoted(snapshot_id))
}

/// A span for an RPC about no single object.
fn plain_span(rpc: &'static str) -> Span {
    info_span!("csi", rpc)
}

/// A volume the CO may see, or NOT_FOUND.
fn visible(volume: Option<VolumeInfo>, id: &VolumeId) -> Result<VolumeInfo, Status> {
    volume.ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
}

/// Which nodes the CO allows, from its accessibility requirements. A
/// topology without our key names no node of ours (an empty name, which
/// matches none), so a requirement made only of such topologies cannot be
/// met rather than being ignored.
fn placement(requirement: Option<&TopologyRequirement>) -> Placement {
    let names = |topologies: &[crate::proto::csi::v1::Topology]| -> Vec<String> {
        topologies
            .iter()
            .map(|topology| {
                topology
                    .segments
                    .get(crate::grpc::TOPOLOGY_NODE_KEY)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    };
    requirement.map_or_else(Placement::default, |requirement| Placement {
        requisite: names(&requirement.requisite),
        preferred: names(&requirement.preferred),
    })
}

/// INVALID_ARGUMENT when a request carries mutable parameters: they belong
/// to ControllerModifyVolume, which liveclone does not offer.
fn refuse_mutable_parameters(
    mutable_parameters: &std::collections::HashMap<String, String>,
) -> Result<(), Status> {
    if mutable_parameters.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "mutable_parameters are not supported (liveclone does not offer MODIFY_VOLUME)",
        ))
    }
}

impl ControllerService {
    /// A Controller service over `engine`, which it shares with the Node
    /// service (and the admin API) of the same process.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self::with_provisioner(Arc::new(LocalProvisioner::new(engine)))
    }

    /// A Controller service whose work is done by `provisioner`.
    pub fn with_provisioner(provisioner: Arc<dyn Provisioner>) -> Self {
        Self { provisioner }
    }

    /// The tonic service, ready to be added to the routes given to
    /// [`crate::grpc::server::serve_unix`].
    pub fn into_server(self) -> ControllerServer<Self> {
        ControllerServer::new(self)
    }
}

/// A volume as CSI shows it. Nothing secret goes into the context: it is
/// stored in the PersistentVolume for anyone to read.
fn volume_message(volume: &VolumeInfo) -> Volume {
    Volume {
        capacity_bytes: bytes_i64(volume.capacity_bytes),
        volume_id: volume.id.to_string(),
        volume_context: Default::default(),
        content_source: volume.content_source.as_ref().map(content_source_message),
        accessible_topology: vec![node_topology(&volume.node)],
    }
}

fn condition(volume: &VolumeInfo) -> VolumeCondition {
    convert::volume_condition(volume.abnormal.clone(), volume.progress.clone())
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = info_span!(
            "csi",
            rpc = "CreateVolume",
            name = %quoted(&request.name),
            volume = field::Empty
        );
        async {
            require("name", &request.name)?;
            if let Ok(id) = VolumeId::for_name(&request.name) {
                span.record("volume", field::display(&id));
            }
            let wanted = capabilities("volume_capabilities", &request.volume_capabilities)?;
            let capacity = capacity_range(request.capacity_range.as_ref())?;
            let source = content_source(request.volume_content_source.as_ref())?;
            refuse_mutable_parameters(&request.mutable_parameters)?;
            let placement = placement(request.accessibility_requirements.as_ref());
            // What a content source holds, if it exists: a copy of it holds
            // the same. A missing source is left for the provisioner to
            // report, with the rest of its checks.
            let held = match &source {
                Some(source) => self.provisioner.source_access(source).await?,
                None => None,
            };
            let access = convert::access_kind(&wanted, &request.parameters, held)?;
            let (parameters, metadata) = co_metadata(&request.parameters);
            let create = CreateVolume {
                name: request.name.clone(),
                capacity,
                access,
                source,
                parameters,
            };
            let volume = self
                .provisioner
                .create_volume(create, &placement, &metadata)
                .await?;
            Ok(Response::new(CreateVolumeResponse {
                volume: Some(volume_message(&volume)),
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("DeleteVolume", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            // Deleting is idempotent: an ID this plugin never issued names
            // nothing, which is as deleted as it gets.
            let Ok(id) = request.volume_id.parse::<VolumeId>() else {
                tracing::debug!("not a liveclone volume ID; nothing to delete");
                return Ok(Response::new(DeleteVolumeResponse {}));
            };
            self.provisioner.delete_volume(&id).await?;
            Ok(Response::new(DeleteVolumeResponse {}))
        }
        .instrument(span.clone())
        .await
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "liveclone has no attach step: volumes are made available on their node by \
             NodeStageVolume",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "liveclone has no attach step: volumes are released on their node by \
             NodeUnstageVolume",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("ValidateVolumeCapabilities", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            if request.volume_capabilities.is_empty() {
                return Err(Status::invalid_argument("volume_capabilities is required"));
            }
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let volume = visible(self.provisioner.volume(&id).await?, &id)?;
            let mut problems = Vec::new();
            for (index, wanted) in request.volume_capabilities.iter().enumerate() {
                if let Err(why) = capability(wanted).and_then(|c| c.fits(volume.access)) {
                    problems.push(format!("volume_capabilities[{index}]: {why}"));
                }
            }
            if let Err(error) = parse_parameters(&convert::parameters(&request.parameters)) {
                problems.push(format!("parameters: {error}"));
            }
            if !request.mutable_parameters.is_empty() {
                problems.push("mutable_parameters are not supported".to_owned());
            }
            if !problems.is_empty() {
                return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: problems.join("; "),
                }));
            }
            Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: request.volume_context.clone(),
                    volume_capabilities: request.volume_capabilities.clone(),
                    parameters: request.parameters.clone(),
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let request = request.into_inner();
        let span = plain_span("ListVolumes");
        async {
            let volumes = self.provisioner.list_volumes().await?;
            let page = convert::paginate(
                volumes,
                |volume| volume.id.as_str(),
                |token| token.parse::<VolumeId>().is_ok(),
                request.max_entries,
                &request.starting_token,
            )?;
            let entries = page
                .entries
                .iter()
                .map(|volume| list_volumes_response::Entry {
                    volume: Some(volume_message(volume)),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: Vec::new(),
                        volume_condition: Some(condition(volume)),
                    }),
                })
                .collect();
            Ok(Response::new(ListVolumesResponse {
                entries,
                next_token: page.next_token,
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let request = request.into_inner();
        let span = plain_span("GetCapacity");
        async {
            let none = Response::new(GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: None,
                minimum_volume_size: None,
            });
            // A topology without our key is not one of our nodes.
            let node = match &request.accessible_topology {
                Some(topology) if !topology.segments.is_empty() => {
                    match topology.segments.get(crate::grpc::TOPOLOGY_NODE_KEY) {
                        Some(node) => Some(node.as_str()),
                        None => return Ok(none),
                    }
                }
                _ => None,
            };
            // Volumes this plugin cannot make: nothing is available for them.
            if request
                .volume_capabilities
                .iter()
                .any(|wanted| capability(wanted).is_err())
            {
                return Ok(none);
            }
            // A StorageClass with a mistyped liveclone parameter gets an
            // error here too, rather than capacity for volumes that
            // CreateVolume would then refuse.
            let parameters = convert::parameters(&request.parameters);
            parse_parameters(&parameters)
                .map_err(|error| Status::invalid_argument(format!("parameters: {error}")))?;
            let class = device_class_parameter(&parameters)
                .map_err(|error| Status::invalid_argument(format!("parameters: {error}")))?;
            let available = self
                .provisioner
                .available_capacity(node, class.as_ref())
                .await?;
            Ok(Response::new(GetCapacityResponse {
                available_capacity: bytes_i64(available),
                maximum_volume_size: None,
                minimum_volume_size: None,
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: controller_capabilities(self.provisioner.reports_capacity()),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let request = request.into_inner();
        let span = info_span!(
            "csi",
            rpc = "CreateSnapshot",
            name = %quoted(&request.name),
            volume = %quoted(&request.source_volume_id),
            snapshot = field::Empty
        );
        async {
            require("name", &request.name)?;
            require("source_volume_id", &request.source_volume_id)?;
            if let Ok(id) = SnapshotId::for_name(&request.name) {
                span.record("snapshot", field::display(&id));
            }
            // No snapshot parameters exist yet; one under our prefix is a
            // typo or meant for a newer version, and ignoring it would hide
            // that.
            if let Some(key) = request
                .parameters
                .keys()
                .find(|key| key.starts_with(PARAMETER_PREFIX))
            {
                return Err(Status::invalid_argument(format!(
                    "unknown VolumeSnapshotClass parameter `{key}`: liveclone has no \
                     {PARAMETER_PREFIX} snapshot parameters"
                )));
            }
            let source = convert::volume_id("source_volume_id", &request.source_volume_id)?;
            let (_, metadata) = co_metadata(&request.parameters);
            let snapshot = self
                .provisioner
                .create_snapshot(&request.name, &source, &metadata)
                .await?;
            Ok(Response::new(CreateSnapshotResponse {
                snapshot: Some(snapshot_message(&snapshot)),
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let request = request.into_inner();
        let span = snapshot_span("DeleteSnapshot", &request.snapshot_id);
        async {
            require("snapshot_id", &request.snapshot_id)?;
            // As for volumes: an ID that was never ours is already gone.
            let Ok(id) = request.snapshot_id.parse::<SnapshotId>() else {
                tracing::debug!("not a liveclone snapshot ID; nothing to delete");
                return Ok(Response::new(DeleteSnapshotResponse {}));
            };
            self.provisioner.delete_snapshot(&id).await?;
            Ok(Response::new(DeleteSnapshotResponse {}))
        }
        .instrument(span.clone())
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let request = request.into_inner();
        let span = plain_span("ListSnapshots");
        async {
            // A filter that cannot be one of our IDs matches nothing: the
            // spec wants an empty list for an unknown snapshot or source,
            // not an error.
            let by_snapshot = (!request.snapshot_id.is_empty())
                .then(|| request.snapshot_id.parse::<SnapshotId>().ok());
            let by_source = (!request.source_volume_id.is_empty())
                .then(|| request.source_volume_id.parse::<VolumeId>().ok());
            let matches_nothing =
                matches!(by_snapshot, Some(None)) || matches!(by_source, Some(None));
            let records = if matches_nothing {
                Vec::new()
            } else {
                self.provisioner.list_snapshots().await?
            };
            let filtered: Vec<_> = records
                .into_iter()
                .filter(|record| match &by_snapshot {
                    Some(Some(id)) => record.id == *id,
                    _ => true,
                })
                .filter(|record| match &by_source {
                    Some(Some(id)) => record.source_volume == *id,
                    _ => true,
                })
                .collect();
            let page = convert::paginate(
                filtered,
                |record| record.id.as_str(),
                |token| token.parse::<SnapshotId>().is_ok(),
                request.max_entries,
                &request.starting_token,
            )?;
            let entries = page
                .entries
                .iter()
                .map(|record| list_snapshots_response::Entry {
                    snapshot: Some(snapshot_message(record)),
                })
                .collect();
            Ok(Response::new(ListSnapshotsResponse {
                entries,
                next_token: page.next_token,
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let request = request.into_inner();
        let span = snapshot_span("GetSnapshot", &request.snapshot_id);
        async {
            let id = convert::snapshot_id("snapshot_id", &request.snapshot_id)?;
            let record = self
                .provisioner
                .snapshot(&id)
                .await?
                .ok_or_else(|| Status::not_found(format!("snapshot {id} does not exist")))?;
            Ok(Response::new(GetSnapshotResponse {
                snapshot: Some(snapshot_message(&record)),
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("ControllerExpandVolume", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            let range = request
                .capacity_range
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
            let capacity = capacity_range(Some(range))?;
            if let Some(wanted) = &request.volume_capability {
                capability(wanted)
                    .map_err(|why| Status::invalid_argument(format!("volume_capability: {why}")))?;
            }
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let (bytes, node_expansion_required) =
                self.provisioner.expand_volume(&id, capacity).await?;
            Ok(Response::new(ControllerExpandVolumeResponse {
                capacity_bytes: bytes_i64(bytes),
                node_expansion_required,
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("ControllerGetVolume", &request.volume_id);
        async {
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let volume = visible(self.provisioner.volume(&id).await?, &id)?;
            Ok(Response::new(ControllerGetVolumeResponse {
                volume: Some(volume_message(&volume)),
                status: Some(controller_get_volume_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: Some(condition(&volume)),
                }),
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "liveclone volumes have no mutable parameters",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;
    use crate::domain::hydration::{HydrationPhase, Progress};
    use crate::domain::model::AccessKind;
    use crate::grpc::testkit::{
        block_capability, create_request, mount_capability, Node, MIB, NODE_ID,
    };
    use crate::grpc::TOPOLOGY_NODE_KEY;
    use crate::os::fs::FsType;
    use crate::os::OsErrorKind;
    use crate::proto::csi::v1::volume_capability::access_mode::Mode;
    use crate::proto::csi::v1::volume_capability::AccessType;
    use crate::proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
    use crate::proto::csi::v1::{CapacityRange, Topology, VolumeCapability, VolumeContentSource};

    /// A well-formed ID that no volume has.
    const UNKNOWN_VOLUME: &str = "lcv-0123456789abcdef0123456789abcdef";
    const UNKNOWN_SNAPSHOT: &str = "lcs-0123456789abcdef0123456789abcdef";

    fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
        result.expect_err("the call must fail").code()
    }

    fn from_volume(id: &str) -> Option<VolumeContentSource> {
        Some(VolumeContentSource {
            r#type: Some(Type::Volume(VolumeSource {
                volume_id: id.to_owned(),
            })),
        })
    }

    fn from_snapshot(id: &str) -> Option<VolumeContentSource> {
        Some(VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_owned(),
            })),
        })
    }

    fn topology(node: &str) -> Topology {
        Topology {
            segments: [(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
        }
    }

    async fn create(node: &Node, request: CreateVolumeRequest) -> Result<Volume, Status> {
        node.controller
            .create_volume(Request::new(request))
            .await
            .map(|response| response.into_inner().volume.expect("a volume"))
    }

    fn stalled(message: &str) -> Progress {
        Progress {
            phase: HydrationPhase::Stalled,
            hydrated_bytes: 1,
            total_bytes: 2,
            percent: 50.0,
            bytes_per_second: 0.0,
            eta: None,
            paused: false,
            last_progress_at: Some(Duration::from_secs(1)),
            message: message.to_owned(),
        }
    }

    #[tokio::test]
    async fn create_volume_requires_a_name_and_capabilities() {
        let node = Node::new();
        let status = create(&node, create_request("", 16 * MIB))
            .await
            .expect_err("no name");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("name"), "{status:?}");

        let mut request = create_request("pvc-1", 16 * MIB);
        request.volume_capabilities.clear();
        let status = create(&node, request).await.expect_err("no capabilities");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("volume_capabilities"),
            "{status:?}"
        );
    }

    #[tokio::test]
    async fn create_volume_refuses_unsupported_capabilities() {
        let node = Node::new();
        for wanted in [
            mount_capability("", Mode::MultiNodeMultiWriter),
            mount_capability("", Mode::MultiNodeReaderOnly),
            mount_capability("btrfs", Mode::SingleNodeWriter),
            VolumeCapability {
                access_mode: None,
                access_type: Some(AccessType::Block(Default::default())),
            },
        ] {
            let mut request = create_request("pvc-1", 16 * MIB);
            request.volume_capabilities =
                vec![mount_capability("", Mode::SingleNodeWriter), wanted];
            let status = create(&node, request).await.expect_err("unsupported");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains("volume_capabilities[1]"),
                "{status:?}"
            );
        }
        let mut request = create_request("pvc-1", 16 * MIB);
        request.mutable_parameters = [("iops".to_owned(), "1".to_owned())].into();
        assert_eq!(code(create(&node, request).await), Code::InvalidArgument);
        assert!(node.engine.list_volumes().expect("list").is_empty());
    }

    #[tokio::test]
    async fn create_volume_is_idempotent_by_name() {
        let node = Node::new();
        let first = node.volume(create_request("pvc-1", 16 * MIB)).await;
        assert!(first.volume_id.starts_with("lcv-"), "{first:?}");
        assert_eq!(first.capacity_bytes, 16 * MIB);
        assert_eq!(first.accessible_topology, vec![topology(NODE_ID)]);
        assert!(first.content_source.is_none());
        assert!(first.volume_context.is_empty());

        let again = node.volume(create_request("pvc-1", 16 * MIB)).await;
        assert_eq!(again, first);

        let status = create(&node, create_request("pvc-1", 32 * MIB))
            .await
            .expect_err("same name, other size");
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        let mut as_block = create_request("pvc-1", 16 * MIB);
        as_block.volume_capabilities = vec![block_capability(Mode::SingleNodeWriter)];
        assert_eq!(code(create(&node, as_block).await), Code::AlreadyExists);
        let mut tuned = create_request("pvc-1", 16 * MIB);
        tuned.parameters = [("liveclone.io/regionSize".to_owned(), "64KiB".to_owned())].into();
        assert_eq!(code(create(&node, tuned).await), Code::AlreadyExists);
        assert_eq!(node.engine.list_volumes().expect("list").len(), 1);
    }

    #[tokio::test]
    async fn os_failures_reach_the_co_as_internal_and_a_retry_finishes_the_volume() {
        let node = Node::new();
        node.fake.fail_next("dm.create", OsErrorKind::Failed);
        let status = create(&node, create_request("pvc-1", 16 * MIB))
            .await
            .expect_err("the device cannot be made");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(status.message().contains("dm.create"), "{status:?}");
        let volume = node.volume(create_request("pvc-1", 16 * MIB)).await;
        assert_eq!(volume.capacity_bytes, 16 * MIB);

        node.fake.fail_next("fs.usage", OsErrorKind::NoSpace);
        let status = create(&node, create_request("pvc-2", 16 * MIB))
            .await
            .expect_err("no space");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }

    #[tokio::test]
    async fn access_kind_follows_the_capabilities_and_the_fs_parameter() {
        let node = Node::new();
        let mut block = create_request("pvc-block", 16 * MIB);
        block.volume_capabilities = vec![block_capability(Mode::SingleNodeWriter)];
        let mut xfs = create_request("pvc-xfs", 16 * MIB);
        xfs.parameters = [(convert::FS_TYPE_PARAMETER.to_owned(), "xfs".to_owned())].into();
        let default = create_request("pvc-default", 16 * MIB);
        for (request, expected) in [
            (block, AccessKind::Block),
            (xfs, AccessKind::Filesystem { fs: FsType::Xfs }),
            (default, AccessKind::Filesystem { fs: FsType::Ext4 }),
        ] {
            let volume = node.volume(request).await;
            let id: VolumeId = volume.volume_id.parse().expect("our ID");
            let record = node.engine.volume(&id).expect("read").expect("recorded");
            assert_eq!(record.access, expected);
        }
    }

    #[tokio::test]
    async fn create_volume_honours_topology_requirements() {
        let node = Node::new();
        let elsewhere = TopologyRequirement {
            requisite: vec![topology("node-b")],
            preferred: vec![topology("node-b")],
        };
        let mut request = create_request("pvc-1", 16 * MIB);
        request.accessibility_requirements = Some(elsewhere);
        assert_eq!(code(create(&node, request).await), Code::ResourceExhausted);

        let here = TopologyRequirement {
            requisite: vec![topology("node-b"), topology(NODE_ID)],
            preferred: vec![topology(NODE_ID)],
        };
        let mut request = create_request("pvc-1", 16 * MIB);
        request.accessibility_requirements = Some(here);
        let volume = node.volume(request).await;
        assert_eq!(volume.accessible_topology, vec![topology(NODE_ID)]);

        let mut request = create_request("pvc-2", 16 * MIB);
        request.accessibility_requirements = Some(TopologyRequirement::default());
        node.volume(request).await;
    }

    #[tokio::test]
    async fn clones_echo_their_source_and_cannot_be_smaller() {
        let node = Node::new();
        let source = node.volume(create_request("pvc-source", 32 * MIB)).await;

        let mut request = create_request("pvc-clone", 0);
        request.volume_content_source = from_volume(&source.volume_id);
        let clone = node.volume(request.clone()).await;
        assert_eq!(clone.content_source, request.volume_content_source);
        assert_eq!(
            clone.capacity_bytes,
            32 * MIB,
            "defaults to the source's size"
        );
        assert_eq!(node.volume(request).await, clone, "idempotent");

        let mut smaller = create_request("pvc-small-clone", 16 * MIB);
        smaller.volume_content_source = from_volume(&source.volume_id);
        assert_eq!(code(create(&node, smaller).await), Code::OutOfRange);

        let snapshot = node.snapshot("snap-1", &source.volume_id).await;
        let mut request = create_request("pvc-from-snapshot", 48 * MIB);
        request.volume_content_source = from_snapshot(&snapshot.snapshot_id);
        let restored = node.volume(request.clone()).await;
        assert_eq!(restored.content_source, request.volume_content_source);
        assert_eq!(restored.capacity_bytes, 48 * MIB);
    }

    #[tokio::test]
    async fn copies_keep_the_file_system_of_their_source() {
        let node = Node::new();
        let mut request = create_request("pvc-xfs", 16 * MIB);
        request.volume_capabilities = vec![mount_capability("xfs", Mode::SingleNodeWriter)];
        let source = node.volume(request).await;
        let snapshot = node.snapshot("snap-xfs", &source.volume_id).await;
        let access_of = |volume: &Volume| {
            let id: VolumeId = volume.volume_id.parse().expect("our ID");
            node.engine
                .volume(&id)
                .expect("read")
                .expect("recorded")
                .access
        };
        let xfs = AccessKind::Filesystem { fs: FsType::Xfs };
        for (name, content) in [
            ("pvc-clone", from_volume(&source.volume_id)),
            ("pvc-restore", from_snapshot(&snapshot.snapshot_id)),
        ] {
            let mut request = create_request(name, 16 * MIB);
            request.volume_content_source = content.clone();
            assert_eq!(access_of(&node.volume(request).await), xfs, "{name}");

            let mut request = create_request(&format!("{name}-ext4"), 16 * MIB);
            request.volume_capabilities = vec![mount_capability("ext4", Mode::SingleNodeWriter)];
            request.volume_content_source = content;
            assert_eq!(
                code(create(&node, request).await),
                Code::InvalidArgument,
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn missing_sources_are_not_found() {
        let node = Node::new();
        for source in [
            from_volume(UNKNOWN_VOLUME),
            from_volume("some-volume"),
            from_snapshot(UNKNOWN_SNAPSHOT),
            from_snapshot("non-existing-snapshot-id"),
        ] {
            let mut request = create_request("pvc-clone", 16 * MIB);
            request.volume_content_source = source;
            let status = create(&node, request).await.expect_err("no source");
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
        }
        let mut request = create_request("pvc-clone", 16 * MIB);
        request.volume_content_source = Some(VolumeContentSource { r#type: None });
        assert_eq!(code(create(&node, request).await), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn delete_volume_is_idempotent() {
        let node = Node::new();
        let delete = |id: &str| {
            node.controller
                .delete_volume(Request::new(DeleteVolumeRequest {
                    volume_id: id.to_owned(),
                    ..Default::default()
                }))
        };
        assert_eq!(code(delete("").await), Code::InvalidArgument);
        delete("not-one-of-ours")
            .await
            .expect("malformed is already gone");
        delete(UNKNOWN_VOLUME)
            .await
            .expect("unknown is already gone");

        let volume = node.volume(create_request("pvc-1", 16 * MIB)).await;
        delete(&volume.volume_id).await.expect("deleted");
        delete(&volume.volume_id).await.expect("deleted again");
        let status = node
            .controller
            .controller_get_volume(Request::new(ControllerGetVolumeRequest {
                volume_id: volume.volume_id.clone(),
            }))
            .await
            .expect_err("gone");
        assert_eq!(status.code(), Code::NotFound);
    }

    #[tokio::test]
    async fn list_volumes_pages_by_token() {
        let node = Node::new();
        let mut ids = Vec::new();
        for name in ["pvc-a", "pvc-b", "pvc-c"] {
            ids.push(node.volume(create_request(name, 16 * MIB)).await.volume_id);
        }
        ids.sort();
        let list = |max_entries: i32, starting_token: &str| {
            node.controller
                .list_volumes(Request::new(ListVolumesRequest {
                    max_entries,
                    starting_token: starting_token.to_owned(),
                }))
        };
        let all = list(0, "").await.expect("list").into_inner();
        let listed: Vec<_> = all
            .entries
            .iter()
            .map(|entry| entry.volume.as_ref().expect("volume").volume_id.clone())
            .collect();
        assert_eq!(listed, ids);
        assert!(all.next_token.is_empty());
        for entry in &all.entries {
            let condition = entry
                .status
                .as_ref()
                .and_then(|status| status.volume_condition.as_ref())
                .expect("a condition");
            assert!(!condition.abnormal);
            assert!(!condition.message.is_empty());
        }

        let first = list(2, "").await.expect("page 1").into_inner();
        assert_eq!(first.entries.len(), 2);
        assert!(!first.next_token.is_empty());
        let second = list(2, &first.next_token)
            .await
            .expect("page 2")
            .into_inner();
        assert_eq!(second.entries.len(), 1);
        assert_eq!(
            second.entries[0].volume.as_ref().expect("volume").volume_id,
            ids[2]
        );
        assert!(second.next_token.is_empty());

        assert_eq!(code(list(0, "invalid-token").await), Code::Aborted);
        assert_eq!(code(list(-1, "").await), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn volume_condition_reports_a_stalled_hydration() {
        let node = Node::new();
        let volume = node.volume(create_request("pvc-1", 16 * MIB)).await;
        let id: VolumeId = volume.volume_id.parse().expect("our ID");
        node.engine.publish_progress(
            &id,
            stalled("no progress for 5 minutes; see the kernel log"),
        );
        let response = node
            .controller
            .controller_get_volume(Request::new(ControllerGetVolumeRequest {
                volume_id: volume.volume_id.clone(),
            }))
            .await
            .expect("get")
            .into_inner();
        assert_eq!(response.volume, Some(volume));
        let condition = response
            .status
            .and_then(|status| status.volume_condition)
            .expect("a condition");
        assert!(condition.abnormal);
        assert!(condition.message.contains("no progress"), "{condition:?}");

        let listed = node
            .controller
            .list_volumes(Request::new(ListVolumesRequest::default()))
            .await
            .expect("list")
            .into_inner();
        let condition = listed.entries[0]
            .status
            .as_ref()
            .and_then(|status| status.volume_condition.as_ref())
            .expect("a condition");
        assert!(condition.abnormal);
    }

    #[tokio::test]
    async fn controller_get_volume_checks_its_id() {
        let node = Node::new();
        let get = |id: &str| {
            node.controller
                .controller_get_volume(Request::new(ControllerGetVolumeRequest {
                    volume_id: id.to_owned(),
                }))
        };
        assert_eq!(code(get("").await), Code::InvalidArgument);
        assert_eq!(code(get("some-vol-id").await), Code::NotFound);
        assert_eq!(code(get(UNKNOWN_VOLUME).await), Code::NotFound);
    }

    #[tokio::test]
    async fn validate_volume_capabilities_confirms_only_what_fits() {
        let node = Node::new();
        let volume = node.volume(create_request("pvc-1", 16 * MIB)).await;
        let validate = |id: &str, capabilities: Vec<VolumeCapability>| {
            node.controller.validate_volume_capabilities(Request::new(
                ValidateVolumeCapabilitiesRequest {
                    volume_id: id.to_owned(),
                    volume_capabilities: capabilities,
                    ..Default::default()
                },
            ))
        };
        let ok = vec![mount_capability("", Mode::SingleNodeWriter)];
        assert_eq!(code(validate("", ok.clone()).await), Code::InvalidArgument);
        assert_eq!(
            code(validate(&volume.volume_id, Vec::new()).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(validate(UNKNOWN_VOLUME, ok.clone()).await),
            Code::NotFound
        );
        assert_eq!(
            code(validate("some-vol-id", ok.clone()).await),
            Code::NotFound
        );

        let confirmed = validate(&volume.volume_id, ok.clone())
            .await
            .expect("validate")
            .into_inner();
        assert_eq!(
            confirmed.confirmed.expect("confirmed").volume_capabilities,
            ok
        );

        for unsupported in [
            mount_capability("", Mode::MultiNodeMultiWriter),
            mount_capability("xfs", Mode::SingleNodeWriter),
            block_capability(Mode::SingleNodeWriter),
        ] {
            let refused = validate(&volume.volume_id, vec![ok[0].clone(), unsupported])
                .await
                .expect("validate")
                .into_inner();
            assert!(refused.confirmed.is_none());
            assert!(
                refused.message.contains("volume_capabilities[1]"),
                "{refused:?}"
            );
        }
    }

    #[tokio::test]
    async fn get_capacity_is_zero_for_other_nodes() {
        let node = Node::new();
        let capacity = |topology: Option<Topology>| {
            node.controller
                .get_capacity(Request::new(GetCapacityRequest {
                    accessible_topology: topology,
                    ..Default::default()
                }))
        };
        let available = node.engine.available_capacity(None).expect("capacity");
        assert!(available > 0);
        let mine = capacity(None).await.expect("capacity").into_inner();
        assert_eq!(mine.available_capacity, bytes_i64(available));
        let here = capacity(Some(topology(NODE_ID))).await.expect("capacity");
        assert_eq!(here.into_inner().available_capacity, bytes_i64(available));
        let there = capacity(Some(topology("node-b"))).await.expect("capacity");
        assert_eq!(there.into_inner().available_capacity, 0);

        let multi_node = node
            .controller
            .get_capacity(Request::new(GetCapacityRequest {
                volume_capabilities: vec![mount_capability("", Mode::MultiNodeMultiWriter)],
                ..Default::default()
            }))
            .await
            .expect("capacity");
        assert_eq!(multi_node.into_inner().available_capacity, 0);
    }

    #[tokio::test]
    async fn capabilities_are_the_advertised_set() {
        let node = Node::new();
        let response = node
            .controller
            .controller_get_capabilities(Request::new(ControllerGetCapabilitiesRequest {}))
            .await
            .expect("capabilities")
            .into_inner();
        let kinds: Vec<rpc::Type> = response
            .capabilities
            .iter()
            .filter_map(|capability| {
                capability
                    .r#type
                    .map(|controller_service_capability::Type::Rpc(rpc)| rpc.r#type())
            })
            .collect();
        for expected in [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListVolumes,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::GetCapacity,
            rpc::Type::GetVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ] {
            assert!(kinds.contains(&expected), "{expected:?} missing");
        }
        assert!(!kinds.contains(&rpc::Type::PublishUnpublishVolume));
        assert_eq!(kinds.len(), 10);
    }

    #[tokio::test]
    async fn attach_and_modify_are_unimplemented() {
        let node = Node::new();
        let publish = node
            .controller
            .controller_publish_volume(Request::new(Default::default()))
            .await;
        assert_eq!(code(publish), Code::Unimplemented);
        let unpublish = node
            .controller
            .controller_unpublish_volume(Request::new(Default::default()))
            .await;
        assert_eq!(code(unpublish), Code::Unimplemented);
        let modify = node
            .controller
            .controller_modify_volume(Request::new(Default::default()))
            .await;
        assert_eq!(code(modify), Code::Unimplemented);
    }

    #[tokio::test]
    async fn create_snapshot_checks_its_fields_and_is_idempotent() {
        let node = Node::new();
        let create = |name: &str, source: &str| {
            node.controller
                .create_snapshot(Request::new(CreateSnapshotRequest {
                    name: name.to_owned(),
                    source_volume_id: source.to_owned(),
                    ..Default::default()
                }))
        };
        let status = create("", "testId").await.expect_err("no name");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("name"), "{status:?}");
        let status = create("snap-1", "").await.expect_err("no source");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("source_volume_id"), "{status:?}");
        assert_eq!(code(create("snap-1", "testId").await), Code::NotFound);
        assert_eq!(code(create("snap-1", UNKNOWN_VOLUME).await), Code::NotFound);

        let source = node.volume(create_request("pvc-1", 16 * MIB)).await;
        let other = node.volume(create_request("pvc-2", 16 * MIB)).await;
        let snapshot = node.snapshot("snap-1", &source.volume_id).await;
        assert!(snapshot.snapshot_id.starts_with("lcs-"), "{snapshot:?}");
        assert_eq!(snapshot.source_volume_id, source.volume_id);
        assert_eq!(snapshot.size_bytes, 16 * MIB);
        assert!(snapshot.ready_to_use);
        assert!(snapshot.creation_time.expect("a creation time").seconds > 0);
        assert_eq!(node.snapshot("snap-1", &source.volume_id).await, snapshot);
        assert_eq!(
            code(create("snap-1", &other.volume_id).await),
            Code::AlreadyExists
        );

        let with_parameter = node
            .controller
            .create_snapshot(Request::new(CreateSnapshotRequest {
                name: "snap-2".to_owned(),
                source_volume_id: source.volume_id.clone(),
                parameters: [("liveclone.io/typo".to_owned(), "1".to_owned())].into(),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(with_parameter), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn list_snapshots_filters_and_pages() {
        let node = Node::new();
        let first = node.volume(create_request("pvc-1", 16 * MIB)).await;
        let second = node.volume(create_request("pvc-2", 16 * MIB)).await;
        let a = node.snapshot("snap-a", &first.volume_id).await;
        let b = node.snapshot("snap-b", &first.volume_id).await;
        let c = node.snapshot("snap-c", &second.volume_id).await;
        let list = |request: ListSnapshotsRequest| async {
            node.controller
                .list_snapshots(Request::new(request))
                .await
                .map(|response| {
                    let response = response.into_inner();
                    let ids: Vec<String> = response
                        .entries
                        .into_iter()
                        .map(|entry| entry.snapshot.expect("snapshot").snapshot_id)
                        .collect();
                    (ids, response.next_token)
                })
        };
        let mut all = vec![
            a.snapshot_id.clone(),
            b.snapshot_id.clone(),
            c.snapshot_id.clone(),
        ];
        all.sort();
        let (ids, token) = list(ListSnapshotsRequest::default()).await.expect("list");
        assert_eq!(ids, all);
        assert!(token.is_empty());

        let by_id = ListSnapshotsRequest {
            snapshot_id: b.snapshot_id.clone(),
            ..Default::default()
        };
        assert_eq!(
            list(by_id).await.expect("list").0,
            vec![b.snapshot_id.clone()]
        );

        let by_source = ListSnapshotsRequest {
            source_volume_id: second.volume_id.clone(),
            ..Default::default()
        };
        assert_eq!(
            list(by_source).await.expect("list").0,
            vec![c.snapshot_id.clone()]
        );

        let both_mismatched = ListSnapshotsRequest {
            snapshot_id: c.snapshot_id.clone(),
            source_volume_id: first.volume_id.clone(),
            ..Default::default()
        };
        assert!(list(both_mismatched).await.expect("list").0.is_empty());

        for unknown in [
            ListSnapshotsRequest {
                snapshot_id: UNKNOWN_SNAPSHOT.to_owned(),
                ..Default::default()
            },
            ListSnapshotsRequest {
                snapshot_id: "not-a-snapshot".to_owned(),
                ..Default::default()
            },
            ListSnapshotsRequest {
                source_volume_id: UNKNOWN_VOLUME.to_owned(),
                ..Default::default()
            },
            ListSnapshotsRequest {
                source_volume_id: "not-a-volume".to_owned(),
                ..Default::default()
            },
        ] {
            assert!(list(unknown).await.expect("list").0.is_empty());
        }

        let (page, token) = list(ListSnapshotsRequest {
            max_entries: 2,
            ..Default::default()
        })
        .await
        .expect("page 1");
        assert_eq!(page, all[..2]);
        let (rest, token) = list(ListSnapshotsRequest {
            starting_token: token,
            ..Default::default()
        })
        .await
        .expect("page 2");
        assert_eq!(rest, all[2..]);
        assert!(token.is_empty());
        let invalid = list(ListSnapshotsRequest {
            starting_token: "invalid-token".to_owned(),
            ..Default::default()
        })
        .await;
        assert_eq!(code(invalid), Code::Aborted);
    }

    #[tokio::test]
    async fn delete_snapshot_is_idempotent() {
        let node = Node::new();
        let delete = |id: &str| {
            node.controller
                .delete_snapshot(Request::new(DeleteSnapshotRequest {
                    snapshot_id: id.to_owned(),
                    ..Default::default()
                }))
        };
        assert_eq!(code(delete("").await), Code::InvalidArgument);
        delete("reallyfakesnapshotid").await.expect("malformed");
        delete(UNKNOWN_SNAPSHOT).await.expect("unknown");

        let volume = node.volume(create_request("pvc-1", 16 * MIB)).await;
        let snapshot = node.snapshot("snap-1", &volume.volume_id).await;
        delete(&snapshot.snapshot_id).await.expect("deleted");
        delete(&snapshot.snapshot_id).await.expect("deleted again");
        let listed = node
            .controller
            .list_snapshots(Request::new(ListSnapshotsRequest::default()))
            .await
            .expect("list")
            .into_inner();
        assert!(listed.entries.is_empty());
        let get = node
            .controller
            .get_snapshot(Request::new(GetSnapshotRequest {
                snapshot_id: snapshot.snapshot_id.clone(),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(get), Code::NotFound);
    }

    #[tokio::test]
    async fn expand_volume_needs_a_range_and_grows() {
        let node = Node::new();
        let volume = node.volume(create_request("pvc-1", 16 * MIB)).await;
        let expand = |id: &str, range: Option<CapacityRange>| {
            node.controller
                .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
                    volume_id: id.to_owned(),
                    capacity_range: range,
                    ..Default::default()
                }))
        };
        let bigger = Some(CapacityRange {
            required_bytes: 32 * MIB,
            limit_bytes: 0,
        });
        assert_eq!(code(expand("", bigger).await), Code::InvalidArgument);
        let status = expand(&volume.volume_id, None).await.expect_err("no range");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("capacity_range"), "{status:?}");
        assert_eq!(code(expand(UNKNOWN_VOLUME, bigger).await), Code::NotFound);
        assert_eq!(code(expand("some-vol", bigger).await), Code::NotFound);

        let grown = expand(&volume.volume_id, bigger)
            .await
            .expect("expand")
            .into_inner();
        assert_eq!(grown.capacity_bytes, 32 * MIB);
        assert!(grown.node_expansion_required, "a file system must grow too");
    }
}
