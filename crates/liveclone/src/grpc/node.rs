//! The CSI Node service: making this node's volumes usable by pods.
//!
//! A file-system volume is mounted once at the staging path and
//! bind-mounted into each pod's target path; a block volume's device is
//! bind-mounted straight to the target. As in the Controller service the
//! handlers only check the request, run the engine on the blocking pool and
//! shape the response; paths are checked against the allowed roots by the
//! engine, before it touches them.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::domain::engine::{Engine, MountSpec, NodeStats, PublishRequest, StageRequest};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::ids::VolumeId;
use crate::grpc::convert::volume_span;
use crate::grpc::convert::{
    self, bytes_i64, capability, node_topology, require, required_capability, Access, Capability,
};
use crate::grpc::errors::run_blocking;
use crate::proto::csi::v1::node_server::{Node, NodeServer};
use crate::proto::csi::v1::node_service_capability::{self, rpc};
use crate::proto::csi::v1::volume_usage::Unit;
use crate::proto::csi::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, VolumeUsage,
};

/// The Node service implementation.
#[derive(Clone)]
pub struct NodeService {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService")
            .field("node_id", &self.engine.config().node_id)
            .finish_non_exhaustive()
    }
}

/// What the node plugin offers, in the order the CO sees them.
fn node_capabilities() -> Vec<NodeServiceCapability> {
    [
        rpc::Type::StageUnstageVolume,
        rpc::Type::GetVolumeStats,
        rpc::Type::ExpandVolume,
        rpc::Type::VolumeCondition,
        rpc::Type::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(|kind| NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: kind.into(),
            },
        )),
    })
    .collect()
}

/// FAILED_PRECONDITION (the spec's code for capabilities the volume does
/// not support) unless the volume was created for this kind of access.
///
/// Checked before staging or publishing because the engine would act on
/// the request as given: a mount request for a block volume whose contents
/// blkid does not recognise would format it.
fn check_fits(engine: &Engine, id: &VolumeId, wanted: &Capability) -> DomainResult<()> {
    let record = engine
        .volume(id)?
        .ok_or_else(|| DomainError::not_found(format!("volume {id} does not exist")))?;
    wanted.fits(record.access).map_err(|why| {
        DomainError::failed_precondition(format!("volume {id} cannot be used this way: {why}"))
    })
}

/// NodeGetVolumeStats figures: bytes and inodes of a mounted file system,
/// only the size of a block volume (nothing on it is ours to interpret).
fn usage(stats: &NodeStats) -> Vec<VolumeUsage> {
    match &stats.usage {
        Some(fs) => vec![
            VolumeUsage {
                available: bytes_i64(fs.available_bytes),
                total: bytes_i64(fs.total_bytes),
                used: bytes_i64(fs.used_bytes),
                unit: Unit::Bytes.into(),
            },
            VolumeUsage {
                available: bytes_i64(fs.free_inodes),
                total: bytes_i64(fs.total_inodes),
                used: bytes_i64(fs.used_inodes),
                unit: Unit::Inodes.into(),
            },
        ],
        None => vec![VolumeUsage {
            available: 0,
            total: bytes_i64(stats.capacity_bytes),
            used: 0,
            unit: Unit::Bytes.into(),
        }],
    }
}

impl NodeService {
    /// A Node service over `engine`, which it shares with the Controller
    /// service (and the admin API) of the same process.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// The tonic service, ready to be added to the routes given to
    /// [`crate::grpc::server::serve_unix`].
    pub fn into_server(self) -> NodeServer<Self> {
        NodeServer::new(self)
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("NodeStageVolume", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            require("staging_target_path", &request.staging_target_path)?;
            let wanted =
                required_capability("volume_capability", request.volume_capability.as_ref())?;
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let stage = StageRequest {
                staging_path: request.staging_target_path.clone(),
                mount: match &wanted.access {
                    Access::Block => None,
                    Access::Mount { fs, flags } => Some(MountSpec {
                        fs: *fs,
                        flags: flags.clone(),
                    }),
                },
            };
            let engine = Arc::clone(&self.engine);
            run_blocking(&span, move || {
                check_fits(&engine, &id, &wanted)?;
                engine.stage(&id, &stage)
            })
            .await?;
            Ok(Response::new(NodeStageVolumeResponse {}))
        }
        .instrument(span.clone())
        .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("NodeUnstageVolume", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            require("staging_target_path", &request.staging_target_path)?;
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let engine = Arc::clone(&self.engine);
            let path = request.staging_target_path.clone();
            run_blocking(&span, move || engine.unstage(&id, &path)).await?;
            Ok(Response::new(NodeUnstageVolumeResponse {}))
        }
        .instrument(span.clone())
        .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("NodePublishVolume", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            require("target_path", &request.target_path)?;
            let wanted =
                required_capability("volume_capability", request.volume_capability.as_ref())?;
            // The plugin advertises STAGE_UNSTAGE_VOLUME, so the CO must
            // have staged the volume and must say where.
            require("staging_target_path", &request.staging_target_path)?;
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let publish = PublishRequest {
                staging_path: request.staging_target_path.clone(),
                target_path: request.target_path.clone(),
                block: wanted.access == Access::Block,
                read_only: request.readonly || wanted.is_read_only(),
                single_writer: wanted.mode
                    == crate::proto::csi::v1::volume_capability::access_mode::Mode::SingleNodeSingleWriter,
            };
            let engine = Arc::clone(&self.engine);
            run_blocking(&span, move || {
                check_fits(&engine, &id, &wanted)?;
                engine.publish(&id, &publish)
            })
            .await?;
            Ok(Response::new(NodePublishVolumeResponse {}))
        }
        .instrument(span.clone())
        .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("NodeUnpublishVolume", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            require("target_path", &request.target_path)?;
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let engine = Arc::clone(&self.engine);
            let path = request.target_path.clone();
            run_blocking(&span, move || engine.unpublish(&id, &path)).await?;
            Ok(Response::new(NodeUnpublishVolumeResponse {}))
        }
        .instrument(span.clone())
        .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("NodeGetVolumeStats", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            require("volume_path", &request.volume_path)?;
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let engine = Arc::clone(&self.engine);
            let lookup = id.clone();
            let path = request.volume_path.clone();
            let stats = run_blocking(&span, move || engine.volume_stats(&lookup, &path)).await?;
            let usage = usage(&stats);
            let condition = convert::volume_condition(
                stats.abnormal,
                self.engine
                    .progress_of(&id)
                    .map(|progress| progress.message),
            );
            Ok(Response::new(NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(condition),
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = volume_span("NodeExpandVolume", &request.volume_id);
        async {
            require("volume_id", &request.volume_id)?;
            require("volume_path", &request.volume_path)?;
            // Both optional; checked so that a malformed request is refused
            // rather than half read.
            convert::capacity_range(request.capacity_range.as_ref())?;
            if let Some(wanted) = &request.volume_capability {
                capability(wanted)
                    .map_err(|why| Status::invalid_argument(format!("volume_capability: {why}")))?;
            }
            let id = convert::volume_id("volume_id", &request.volume_id)?;
            let engine = Arc::clone(&self.engine);
            let path = request.volume_path.clone();
            let bytes = run_blocking(&span, move || engine.node_expand(&id, &path)).await?;
            Ok(Response::new(NodeExpandVolumeResponse {
                capacity_bytes: bytes_i64(bytes),
            }))
        }
        .instrument(span.clone())
        .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: node_capabilities(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let config = self.engine.config();
        Ok(Response::new(NodeGetInfoResponse {
            node_id: config.node_id.clone(),
            max_volumes_per_node: i64::try_from(config.max_volumes).unwrap_or(i64::MAX),
            accessible_topology: Some(node_topology(&config.node_id)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::grpc::testkit::{
        block_capability, create_request, mount_capability, Node as TestNode, MAX_VOLUMES, MIB,
        NODE_ID,
    };
    use crate::grpc::TOPOLOGY_NODE_KEY;
    use crate::proto::csi::v1::controller_server::Controller as _;
    use crate::proto::csi::v1::volume_capability::access_mode::Mode;
    use crate::proto::csi::v1::{ControllerExpandVolumeRequest, VolumeCapability};

    /// A well-formed ID that no volume has.
    const UNKNOWN_VOLUME: &str = "lcv-0123456789abcdef0123456789abcdef";

    fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
        result.expect_err("the call must fail").code()
    }

    fn stage_request(
        id: &str,
        staging: &str,
        capability: VolumeCapability,
    ) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: id.to_owned(),
            staging_target_path: staging.to_owned(),
            volume_capability: Some(capability),
            ..Default::default()
        }
    }

    fn publish_request(
        id: &str,
        staging: &str,
        target: &str,
        capability: VolumeCapability,
    ) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: id.to_owned(),
            staging_target_path: staging.to_owned(),
            target_path: target.to_owned(),
            volume_capability: Some(capability),
            ..Default::default()
        }
    }

    async fn stats(
        node: &TestNode,
        id: &str,
        path: &str,
    ) -> Result<NodeGetVolumeStatsResponse, Status> {
        node.node
            .node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_id: id.to_owned(),
                volume_path: path.to_owned(),
                staging_target_path: String::new(),
            }))
            .await
            .map(Response::into_inner)
    }

    #[tokio::test]
    async fn node_get_info_reports_the_node_and_its_topology() {
        let node = TestNode::new();
        let info = node
            .node
            .node_get_info(Request::new(NodeGetInfoRequest {}))
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.node_id, NODE_ID);
        assert_eq!(
            info.max_volumes_per_node,
            i64::try_from(MAX_VOLUMES).expect("small")
        );
        let topology = info.accessible_topology.expect("a topology");
        assert_eq!(topology.segments.len(), 1);
        assert_eq!(
            topology.segments.get(TOPOLOGY_NODE_KEY).map(String::as_str),
            Some(NODE_ID)
        );
    }

    #[tokio::test]
    async fn capabilities_are_the_advertised_set() {
        let node = TestNode::new();
        let response = node
            .node
            .node_get_capabilities(Request::new(NodeGetCapabilitiesRequest {}))
            .await
            .expect("capabilities")
            .into_inner();
        let kinds: Vec<rpc::Type> = response
            .capabilities
            .iter()
            .filter_map(|capability| {
                capability
                    .r#type
                    .map(|node_service_capability::Type::Rpc(rpc)| rpc.r#type())
            })
            .collect();
        assert_eq!(
            kinds,
            [
                rpc::Type::StageUnstageVolume,
                rpc::Type::GetVolumeStats,
                rpc::Type::ExpandVolume,
                rpc::Type::VolumeCondition,
                rpc::Type::SingleNodeMultiWriter,
            ]
        );
    }

    #[tokio::test]
    async fn required_fields_are_invalid_arguments_naming_the_field() {
        let node = TestNode::new();
        let staging = node.path("staging/pv");
        let target = node.path("pods/p/mount");
        let ext4 = || mount_capability("", Mode::SingleNodeWriter);
        let expect_invalid = |status: Status, field: &str| {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains(field), "{field}: {status:?}");
        };

        let stage = |request| node.node.node_stage_volume(Request::new(request));
        expect_invalid(
            stage(stage_request("", &staging, ext4()))
                .await
                .expect_err("no id"),
            "volume_id",
        );
        expect_invalid(
            stage(stage_request(UNKNOWN_VOLUME, "", ext4()))
                .await
                .expect_err("no path"),
            "staging_target_path",
        );
        let mut request = stage_request(UNKNOWN_VOLUME, &staging, ext4());
        request.volume_capability = None;
        expect_invalid(
            stage(request).await.expect_err("no capability"),
            "volume_capability",
        );
        let request = stage_request(
            UNKNOWN_VOLUME,
            &staging,
            mount_capability("", Mode::MultiNodeMultiWriter),
        );
        expect_invalid(
            stage(request).await.expect_err("multi-node"),
            "volume_capability",
        );

        let publish = |request| node.node.node_publish_volume(Request::new(request));
        expect_invalid(
            publish(publish_request("", &staging, &target, ext4()))
                .await
                .expect_err("no id"),
            "volume_id",
        );
        expect_invalid(
            publish(publish_request(UNKNOWN_VOLUME, &staging, "", ext4()))
                .await
                .expect_err("no target"),
            "target_path",
        );
        let mut request = publish_request(UNKNOWN_VOLUME, &staging, &target, ext4());
        request.volume_capability = None;
        expect_invalid(
            publish(request).await.expect_err("no capability"),
            "volume_capability",
        );
        expect_invalid(
            publish(publish_request(UNKNOWN_VOLUME, "", &target, ext4()))
                .await
                .expect_err("no staging path"),
            "staging_target_path",
        );

        let unstage = |id: &str, path: &str| {
            node.node
                .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                    volume_id: id.to_owned(),
                    staging_target_path: path.to_owned(),
                }))
        };
        expect_invalid(unstage("", &staging).await.expect_err("no id"), "volume_id");
        expect_invalid(
            unstage(UNKNOWN_VOLUME, "").await.expect_err("no path"),
            "staging_target_path",
        );

        let unpublish = |id: &str, path: &str| {
            node.node
                .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                    volume_id: id.to_owned(),
                    target_path: path.to_owned(),
                }))
        };
        expect_invalid(
            unpublish("", &target).await.expect_err("no id"),
            "volume_id",
        );
        expect_invalid(
            unpublish(UNKNOWN_VOLUME, "").await.expect_err("no path"),
            "target_path",
        );

        expect_invalid(
            stats(&node, "", "some/path").await.expect_err("no id"),
            "volume_id",
        );
        expect_invalid(
            stats(&node, UNKNOWN_VOLUME, "").await.expect_err("no path"),
            "volume_path",
        );

        let expand = |id: &str, path: &str| {
            node.node
                .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                    volume_id: id.to_owned(),
                    volume_path: path.to_owned(),
                    ..Default::default()
                }))
        };
        expect_invalid(expand("", &target).await.expect_err("no id"), "volume_id");
        expect_invalid(
            expand(UNKNOWN_VOLUME, "").await.expect_err("no path"),
            "volume_path",
        );
    }

    #[tokio::test]
    async fn unknown_and_malformed_volumes_are_not_found() {
        let node = TestNode::new();
        let staging = node.path("staging/pv");
        let target = node.path("pods/p/mount");
        for id in [UNKNOWN_VOLUME, "fake-vol-id"] {
            let ext4 = mount_capability("", Mode::SingleNodeWriter);
            let staged = node
                .node
                .node_stage_volume(Request::new(stage_request(id, &staging, ext4.clone())))
                .await;
            assert_eq!(code(staged), Code::NotFound, "stage {id}");
            let published = node
                .node
                .node_publish_volume(Request::new(publish_request(id, &staging, &target, ext4)))
                .await;
            assert_eq!(code(published), Code::NotFound, "publish {id}");
            let unstaged = node
                .node
                .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                    volume_id: id.to_owned(),
                    staging_target_path: staging.clone(),
                }))
                .await;
            assert_eq!(code(unstaged), Code::NotFound, "unstage {id}");
            let unpublished = node
                .node
                .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                    volume_id: id.to_owned(),
                    target_path: target.clone(),
                }))
                .await;
            assert_eq!(code(unpublished), Code::NotFound, "unpublish {id}");
            // csi-sanity sends a relative path with an unknown volume: the
            // volume is what is missing.
            assert_eq!(code(stats(&node, id, "some/path").await), Code::NotFound);
            let expanded = node
                .node
                .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                    volume_id: id.to_owned(),
                    volume_path: "some/path".to_owned(),
                    ..Default::default()
                }))
                .await;
            assert_eq!(code(expanded), Code::NotFound, "expand {id}");
        }
    }

    #[tokio::test]
    async fn a_file_system_volume_goes_through_its_node_lifecycle() {
        let node = TestNode::new();
        let volume = node.volume(create_request("pvc-1", 16 * MIB)).await;
        let id = volume.volume_id.clone();
        let staging = node.path("staging/pv-1");
        let target = node.path("pods/p1/volumes/pv-1/mount");
        let ext4 = mount_capability("", Mode::SingleNodeWriter);

        for _ in 0..2 {
            node.node
                .node_stage_volume(Request::new(stage_request(&id, &staging, ext4.clone())))
                .await
                .expect("stage (twice: idempotent)");
        }
        for _ in 0..2 {
            node.node
                .node_publish_volume(Request::new(publish_request(
                    &id,
                    &staging,
                    &target,
                    ext4.clone(),
                )))
                .await
                .expect("publish (twice: idempotent)");
        }

        let response = stats(&node, &id, &target).await.expect("stats");
        let units: Vec<Unit> = response.usage.iter().map(VolumeUsage::unit).collect();
        assert_eq!(units, [Unit::Bytes, Unit::Inodes]);
        assert!(
            response.usage.iter().all(|usage| usage.total > 0),
            "{response:?}"
        );
        let condition = response.volume_condition.expect("a condition");
        assert!(!condition.abnormal);
        assert_eq!(
            code(stats(&node, &id, "some/path").await),
            Code::NotFound,
            "a path that is not a mount of the volume"
        );

        node.controller
            .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(crate::proto::csi::v1::CapacityRange {
                    required_bytes: 32 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }))
            .await
            .expect("controller expand");
        let expanded = node
            .node
            .node_expand_volume(Request::new(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.clone(),
                ..Default::default()
            }))
            .await
            .expect("node expand")
            .into_inner();
        assert_eq!(expanded.capacity_bytes, 32 * MIB);

        for _ in 0..2 {
            node.node
                .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.clone(),
                }))
                .await
                .expect("unpublish (twice: idempotent)");
        }
        assert!(
            !std::path::Path::new(&target).exists(),
            "the target path is removed"
        );
        for _ in 0..2 {
            node.node
                .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.clone(),
                }))
                .await
                .expect("unstage (twice: idempotent)");
        }
    }

    #[tokio::test]
    async fn a_block_volume_is_published_as_a_device() {
        let node = TestNode::new();
        let mut request = create_request("pvc-block", 16 * MIB);
        request.volume_capabilities = vec![block_capability(Mode::SingleNodeWriter)];
        let volume = node.volume(request).await;
        let id = volume.volume_id.clone();
        let staging = node.path("staging/pv-block");
        let target = node.path("pods/p1/volumeDevices/pv-block");
        let block = block_capability(Mode::SingleNodeWriter);

        let mounted = node
            .node
            .node_stage_volume(Request::new(stage_request(
                &id,
                &staging,
                mount_capability("", Mode::SingleNodeWriter),
            )))
            .await;
        assert_eq!(
            code(mounted),
            Code::FailedPrecondition,
            "a block volume is never formatted"
        );
        node.node
            .node_stage_volume(Request::new(stage_request(&id, &staging, block.clone())))
            .await
            .expect("stage");
        node.node
            .node_publish_volume(Request::new(publish_request(&id, &staging, &target, block)))
            .await
            .expect("publish");

        // NodeGetVolumeStats on the published device is not exercised: the
        // engine recognises a bind-mounted device node by stat(2)ing it,
        // and the simulator cannot make a real device node without root.
        node.node
            .node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.clone(),
            }))
            .await
            .expect("unpublish");
        assert!(!std::path::Path::new(&target).exists());
        node.node
            .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                volume_id: id,
                staging_target_path: staging,
            }))
            .await
            .expect("unstage");
    }

    #[test]
    fn block_usage_is_only_the_size_and_file_systems_add_inodes() {
        let block = NodeStats {
            usage: None,
            capacity_bytes: 16 << 20,
            abnormal: None,
        };
        assert_eq!(
            usage(&block),
            [VolumeUsage {
                available: 0,
                total: 16 << 20,
                used: 0,
                unit: Unit::Bytes.into(),
            }]
        );
        let fs = NodeStats {
            usage: Some(crate::os::fs::FsUsage {
                total_bytes: 100,
                available_bytes: 60,
                used_bytes: 40,
                total_inodes: 10,
                free_inodes: 7,
                used_inodes: 3,
            }),
            capacity_bytes: 128,
            abnormal: None,
        };
        assert_eq!(
            usage(&fs),
            [
                VolumeUsage {
                    available: 60,
                    total: 100,
                    used: 40,
                    unit: Unit::Bytes.into(),
                },
                VolumeUsage {
                    available: 7,
                    total: 10,
                    used: 3,
                    unit: Unit::Inodes.into(),
                },
            ]
        );
    }
}
