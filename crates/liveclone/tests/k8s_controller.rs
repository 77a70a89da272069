//! The controller agent's answers to the CO when things are not simple,
//! against a real kube-apiserver: a node agent that is not running yet (a
//! bounded wait, UNAVAILABLE, and a retry that finishes the job), requests
//! that must be refused before anything is written (bad parameters, no
//! topology, a clone smaller than its source or placed away from it, a name
//! reused for another volume), a failure only the node can see (its reason
//! becomes the gRPC code), and deletion. The controller runs as the service
//! account of deploy/rbac/controller.yaml and the node agent as that of
//! deploy/rbac/node.yaml, so a missing rule fails the test.
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_controller -- --nocapture

mod k8s_common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_common::{
    create_namespace, install_crds, install_rbac_exactly, start, FakeNode, CONTROLLER_AGENT_RULES,
    NODE_AGENT_RULES,
};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use kubetest::ApiServer;
use liveclone::domain::ids::VolumeId;
use liveclone::grpc::controller::ControllerService;
use liveclone::grpc::TOPOLOGY_NODE_KEY;
use liveclone::k8s::controller::{controller_service, ControllerAgentConfig};
use liveclone::k8s::node::{run_agent, NodeAgentConfig};
use liveclone::k8s::{LivecloneVolume, VolumeHydration, NODE_LABEL, STORAGE_FINALIZER};
use liveclone::proto::csi::v1::controller_server::Controller;
use liveclone::proto::csi::v1::volume_capability::access_mode::Mode;
use liveclone::proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume};
use liveclone::proto::csi::v1::volume_content_source::{Type, VolumeSource};
use liveclone::proto::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerGetVolumeRequest,
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest,
    ListSnapshotsRequest, ListVolumesRequest, Topology, TopologyRequirement, VolumeCapability,
    VolumeContentSource,
};
use tokio::sync::watch;
use tonic::{Code, Request};

const NODE: &str = "node-a";
const MIB: i64 = 1 << 20;
const RELEASE_NS: &str = "liveclone";

fn topology(node: &str) -> Topology {
    Topology {
        segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())]),
    }
}

/// A raw-block volume request placed on `node`, as csi-provisioner sends it
/// with WaitForFirstConsumer.
fn request(name: &str, bytes: i64, node: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }],
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![topology(node)],
            preferred: vec![topology(node)],
        }),
        ..Default::default()
    }
}

fn clone_of(name: &str, source: &str, bytes: i64, node: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(Type::Volume(VolumeSource {
                volume_id: source.to_owned(),
            })),
        }),
        ..request(name, bytes, node)
    }
}

/// An account's client once RBAC lets it list LivecloneVolumes (rules reach
/// the authorizer through an informer, a moment after they are applied).
async fn account(server: &ApiServer, name: &str) -> Client {
    let client = server
        .client_impersonating_service_account(RELEASE_NS, name)
        .expect("impersonating the account");
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = Api::<LivecloneVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        assert!(Instant::now() < deadline, "{name} cannot list: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client
}

async fn create(
    controller: &ControllerService,
    request: CreateVolumeRequest,
) -> Result<liveclone::proto::csi::v1::Volume, tonic::Status> {
    controller
        .create_volume(Request::new(request))
        .await
        .map(|response| response.into_inner().volume.expect("a volume"))
}

fn failed_with(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code) -> String {
    match result {
        Err(status) if status.code() == code => status.message().to_owned(),
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_agent_waits_for_nodes_and_maps_their_answers() {
    let server = start().await;
    install_crds(&server);
    let admin = server.client().expect("admin client");
    create_namespace(&admin, RELEASE_NS).await;
    // Exactly what the agents use: a missing rule fails the calls below,
    // an extra one fails here.
    install_rbac_exactly(
        &server,
        &admin,
        "deploy/rbac/controller.yaml",
        "liveclone-controller",
        CONTROLLER_AGENT_RULES,
    )
    .await;
    install_rbac_exactly(
        &server,
        &admin,
        "deploy/rbac/node.yaml",
        "liveclone-node",
        NODE_AGENT_RULES,
    )
    .await;
    let as_controller = account(&server, "liveclone-controller").await;
    let as_node = account(&server, "liveclone-node").await;
    let controller = controller_service(
        as_controller,
        ControllerAgentConfig {
            wait_timeout: Duration::from_secs(3),
            poll_interval: Duration::from_millis(100),
        },
    );
    let volumes: Api<LivecloneVolume> = Api::all(admin.clone());

    // Refused before anything is written.
    let mut bad = request("bad-parameter", 16 * MIB, NODE);
    bad.parameters
        .insert("liveclone.io/regionSzie".to_owned(), "64KiB".to_owned());
    let message = failed_with(create(&controller, bad).await, Code::InvalidArgument);
    assert!(message.contains("regionSzie"), "{message}");
    let nowhere = CreateVolumeRequest {
        accessibility_requirements: None,
        ..request("nowhere", 16 * MIB, NODE)
    };
    let message = failed_with(create(&controller, nowhere).await, Code::InvalidArgument);
    assert!(message.contains("WaitForFirstConsumer"), "{message}");
    let written = volumes.list(&ListParams::default()).await.expect("list");
    assert!(written.items.is_empty(), "nothing written: {written:?}");

    // No node agent yet: the call gives up within its bound, having
    // written the object the node will act on.
    let started = Instant::now();
    let message = failed_with(
        create(&controller, request("source", 16 * MIB, NODE)).await,
        Code::Unavailable,
    );
    assert!(started.elapsed() < Duration::from_secs(10), "bounded wait");
    assert!(message.contains(NODE), "names the node: {message}");
    let source_id = VolumeId::for_name("source").expect("a valid name");
    let object = volumes.get(source_id.as_str()).await.expect("written");
    assert_eq!(
        object.labels().get(NODE_LABEL).map(String::as_str),
        Some(NODE)
    );
    assert_eq!(object.finalizers(), [STORAGE_FINALIZER.to_owned()]);

    // The node agent starts; the CO's retry finishes the volume.
    let node = FakeNode::new(NODE);
    let (stop, stopped) = watch::channel(false);
    let agent = tokio::spawn(run_agent(
        as_node,
        Arc::clone(&node.engine),
        NODE.to_owned(),
        NodeAgentConfig::default(),
        stopped,
    ));
    let source = create(&controller, request("source", 16 * MIB, NODE))
        .await
        .expect("the retry succeeds");
    assert_eq!(source.volume_id, source_id.as_str());
    assert_eq!(source.capacity_bytes, 16 * MIB);
    assert_eq!(source.accessible_topology, [topology(NODE)]);
    assert!(node.volume(&source_id).is_some(), "made on the node");
    let listed = controller
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .expect("ListVolumes")
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let got = controller
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: source.volume_id.clone(),
        }))
        .await
        .expect("ControllerGetVolume")
        .into_inner();
    assert_eq!(
        got.status
            .and_then(|s| s.volume_condition)
            .map(|c| c.abnormal),
        Some(false)
    );

    // A name reused for another volume; clones that cannot be.
    let message = failed_with(
        create(&controller, request("source", 32 * MIB, NODE)).await,
        Code::AlreadyExists,
    );
    assert!(message.contains("does not match"), "{message}");
    let message = failed_with(
        create(
            &controller,
            clone_of("small", &source.volume_id, 8 * MIB, NODE),
        )
        .await,
        Code::OutOfRange,
    );
    assert!(message.contains("cannot be smaller"), "{message}");
    let message = failed_with(
        create(
            &controller,
            clone_of("elsewhere", &source.volume_id, 0, "node-b"),
        )
        .await,
        Code::ResourceExhausted,
    );
    assert!(message.contains(NODE), "{message}");
    failed_with(
        create(
            &controller,
            clone_of("orphan", "lcv-0123456789abcdef0123456789abcdef", 0, NODE),
        )
        .await,
        Code::NotFound,
    );

    // Only the node checks tunables against the clone's region size: a
    // batch larger than the threshold. Its Ready=False reason comes back as
    // the gRPC code, without waiting for the bound.
    let mut bad_tunables = clone_of("bad-tunables", &source.volume_id, 0, NODE);
    bad_tunables.parameters.extend([
        ("liveclone.io/hydrationThreshold".to_owned(), "2".to_owned()),
        ("liveclone.io/hydrationBatchSize".to_owned(), "4".to_owned()),
    ]);
    let started = Instant::now();
    let message = failed_with(
        create(&controller, bad_tunables).await,
        Code::InvalidArgument,
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no wait for a final failure"
    );
    assert!(message.contains("batch"), "{message}");
    let refused = VolumeId::for_name("bad-tunables").expect("a valid name");
    let deadline = Instant::now() + Duration::from_secs(15);
    while volumes
        .get_opt(refused.as_str())
        .await
        .expect("get")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "a refused volume's object is removed (the CO will not delete it)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A real clone, then deletion of both; deleting again is fine.
    let clone = create(&controller, clone_of("clone", &source.volume_id, 0, NODE))
        .await
        .expect("a clone");
    assert_eq!(clone.capacity_bytes, 16 * MIB);

    // A clone made for a claim gets its VolumeHydration; a user's pause
    // survives the CO's retry of the same CreateVolume.
    create_namespace(&admin, "apps").await;
    let mut claimed = clone_of("claimed", &source.volume_id, 0, NODE);
    claimed.parameters.extend([
        ("csi.storage.k8s.io/pvc/name".to_owned(), "copy".to_owned()),
        (
            "csi.storage.k8s.io/pvc/namespace".to_owned(),
            "apps".to_owned(),
        ),
        (
            "csi.storage.k8s.io/pv/name".to_owned(),
            "pv-copy".to_owned(),
        ),
    ]);
    let copy = create(&controller, claimed.clone())
        .await
        .expect("a clone for a claim");
    let hydrations: Api<VolumeHydration> = Api::namespaced(admin.clone(), "apps");
    let vh = hydrations.get("copy").await.expect("its VolumeHydration");
    assert_eq!(vh.spec.destination.volume_handle, copy.volume_id);
    assert_eq!(vh.spec.destination.persistent_volume_name, "pv-copy");
    assert_eq!(
        vh.spec.source.volume_handle.as_deref(),
        Some(source.volume_id.as_str())
    );
    assert_eq!(vh.labels().get(NODE_LABEL).map(String::as_str), Some(NODE));
    hydrations
        .patch(
            "copy",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
        )
        .await
        .expect("a user pauses the copy");
    create(&controller, claimed)
        .await
        .expect("the CO's retry succeeds");
    let vh = hydrations.get("copy").await.expect("its VolumeHydration");
    assert!(vh.spec.paused, "the retry left the user's pause alone");
    controller
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: copy.volume_id.clone(),
            secrets: HashMap::new(),
        }))
        .await
        .expect("DeleteVolume");
    assert!(
        hydrations.get_opt("copy").await.expect("get").is_none(),
        "the clone's VolumeHydration goes with it"
    );

    // Expansion goes through the node: the answer is the node's size.
    let expanded = controller
        .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
            volume_id: source.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .expect("ControllerExpandVolume")
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 32 * MIB);
    assert!(!expanded.node_expansion_required, "a block volume");
    let on_node = node.volume(&source_id).expect("the source");
    assert_eq!(on_node.capacity_bytes, 32 << 20, "grown on the node");
    let object = volumes.get(source_id.as_str()).await.expect("the source");
    assert_eq!(
        object.finalizers(),
        [STORAGE_FINALIZER.to_owned()],
        "the finalizer survives the expansion's apply"
    );
    assert_eq!(
        object.labels().get(NODE_LABEL).map(String::as_str),
        Some(NODE)
    );

    // A snapshot: cut by the node, listed and found by ID and by source,
    // then deleted (twice: the second is a no-op).
    let snapshot = controller
        .create_snapshot(Request::new(CreateSnapshotRequest {
            source_volume_id: source.volume_id.clone(),
            name: "snap".to_owned(),
            ..Default::default()
        }))
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .expect("a snapshot");
    assert_eq!(snapshot.source_volume_id, source.volume_id);
    assert_eq!(snapshot.size_bytes, 32 * MIB);
    let listed = controller
        .list_snapshots(Request::new(ListSnapshotsRequest {
            source_volume_id: source.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .expect("ListSnapshots")
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let message = failed_with(
        controller
            .create_snapshot(Request::new(CreateSnapshotRequest {
                source_volume_id: clone.volume_id.clone(),
                name: "snap".to_owned(),
                ..Default::default()
            }))
            .await,
        Code::AlreadyExists,
    );
    assert!(message.contains("another volume"), "{message}");
    for _ in 0..2 {
        controller
            .delete_snapshot(Request::new(DeleteSnapshotRequest {
                snapshot_id: snapshot.snapshot_id.clone(),
                secrets: HashMap::new(),
            }))
            .await
            .expect("DeleteSnapshot");
    }
    let snapshot_id = snapshot.snapshot_id.parse().expect("a snapshot ID");
    assert!(node.snapshot(&snapshot_id).is_none(), "deleted on the node");
    for id in [&source.volume_id, &clone.volume_id, &source.volume_id] {
        controller
            .delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: HashMap::new(),
            }))
            .await
            .expect("DeleteVolume");
        assert!(
            volumes.get_opt(id).await.expect("get").is_none(),
            "{id} is gone once DeleteVolume returns"
        );
    }
    assert!(node.volume(&source_id).is_none(), "the node deleted it");

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
}
