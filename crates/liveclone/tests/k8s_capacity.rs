//! Storage capacity in Kubernetes mode, against a real kube-apiserver: the
//! node agent publishes its LivecloneNode (device classes and their free
//! space, as the service account of deploy/rbac/node.yaml), and the
//! controller agent (as that of deploy/rbac/controller.yaml) answers
//! GetCapacity from it, per node topology and StorageClass parameters:
//! the class's free bytes, 0 for a class the node lacks or cannot measure,
//! for a node without a LivecloneNode and for one whose figures are stale;
//! with no topology, the largest over the nodes.
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_capacity -- --nocapture

mod k8s_common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_common::{
    create_namespace, install_crds, install_rbac_exactly, kubectl_table, row, start, FakeNode,
    CONTROLLER_AGENT_RULES, NODE_AGENT_RULES,
};
use kube::api::{Api, DeleteParams, ListParams};
use kube::Client;
use kubetest::ApiServer;
use liveclone::grpc::controller::ControllerService;
use liveclone::grpc::TOPOLOGY_NODE_KEY;
use liveclone::k8s::controller::{controller_service, ControllerAgentConfig};
use liveclone::k8s::node::{CapacityPublisher, NodeAgent, NodeAgentConfig};
use liveclone::k8s::{LivecloneNode, LivecloneVolume};
use liveclone::os::fs::FsUsage;
use liveclone::proto::csi::v1::controller_server::Controller;
use liveclone::proto::csi::v1::controller_service_capability::{rpc, Type as CapabilityType};
use liveclone::proto::csi::v1::volume_capability::access_mode::Mode;
use liveclone::proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume};
use liveclone::proto::csi::v1::{
    ControllerGetCapabilitiesRequest, GetCapacityRequest, Topology, VolumeCapability,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Code, Request};

const GIB: u64 = 1 << 30;
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
const RELEASE_NS: &str = "liveclone";
const NODE_ACCOUNT: &str = "liveclone-node";
const CONTROLLER_ACCOUNT: &str = "liveclone-controller";
/// Short, so that staleness (three intervals) shows within seconds.
const INTERVAL: Duration = Duration::from_secs(1);

fn usage(total_gib: u64, available_gib: u64) -> FsUsage {
    FsUsage {
        total_bytes: total_gib * GIB,
        available_bytes: available_gib * GIB,
        used_bytes: (total_gib - available_gib) * GIB,
        total_inodes: 1 << 20,
        free_inodes: 1 << 19,
        used_inodes: 1 << 19,
    }
}

/// An account's client once RBAC lets it list LivecloneVolumes (both
/// accounts may; rules reach the authorizer a moment after they are
/// applied).
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

/// GetCapacity as csi-provisioner asks it with `--enable-capacity`: a
/// block volume, the StorageClass's device class (if any), and the node's
/// topology segment (if any).
async fn capacity(
    controller: &ControllerService,
    node: Option<&str>,
    class: Option<&str>,
) -> Result<u64, tonic::Status> {
    let parameters = class
        .map(|class| HashMap::from([("liveclone.io/deviceClass".to_owned(), class.to_owned())]))
        .unwrap_or_default();
    let request = GetCapacityRequest {
        volume_capabilities: vec![VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter.into(),
            }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }],
        parameters,
        accessible_topology: node.map(|node| Topology {
            segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())]),
        }),
    };
    let response = controller.get_capacity(Request::new(request)).await?;
    Ok(u64::try_from(response.into_inner().available_capacity).expect("not negative"))
}

async fn bytes(controller: &ControllerService, node: Option<&str>, class: Option<&str>) -> u64 {
    capacity(controller, node, class)
        .await
        .unwrap_or_else(|e| panic!("GetCapacity {node:?} {class:?}: {e}"))
}

/// Waits (at most `timeout`) until GetCapacity answers `want`.
async fn wait_for_bytes(
    controller: &ControllerService,
    node: Option<&str>,
    class: Option<&str>,
    want: u64,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = bytes(controller, node, class).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GetCapacity {node:?} {class:?}: {got} bytes, not {want}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_node(api: &Api<LivecloneNode>, name: &str) -> LivecloneNode {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(object) = api.get_opt(name).await.expect("reading a LivecloneNode") {
            if object.status.is_some() {
                return object;
            }
        }
        assert!(
            Instant::now() < deadline,
            "LivecloneNode {name} not published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_publish_capacity_and_the_controller_answers_get_capacity() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("liveclone::k8s=info")),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let server = start().await;
    install_crds(&server);
    let admin = server.client().expect("admin client");
    create_namespace(&admin, RELEASE_NS).await;
    install_rbac_exactly(
        &server,
        &admin,
        "deploy/rbac/controller.yaml",
        CONTROLLER_ACCOUNT,
        CONTROLLER_AGENT_RULES,
    )
    .await;
    install_rbac_exactly(
        &server,
        &admin,
        "deploy/rbac/node.yaml",
        NODE_ACCOUNT,
        NODE_AGENT_RULES,
    )
    .await;
    let as_controller = account(&server, CONTROLLER_ACCOUNT).await;
    let as_node = account(&server, NODE_ACCOUNT).await;
    let controller = controller_service(
        as_controller,
        ControllerAgentConfig {
            wait_timeout: Duration::from_secs(3),
            poll_interval: Duration::from_millis(100),
        },
    );
    let nodes: Api<LivecloneNode> = Api::all(admin.clone());

    // Kubernetes mode now offers GET_CAPACITY.
    let capabilities = controller
        .controller_get_capabilities(Request::new(ControllerGetCapabilitiesRequest {}))
        .await
        .expect("capabilities")
        .into_inner()
        .capabilities;
    assert!(
        capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(CapabilityType::Rpc(r)) if r.r#type == i32::from(rpc::Type::GetCapacity)
        )),
        "{capabilities:?}"
    );

    // Node A: the default class `file` (40 of 100 GiB free), `fast` (7 of
    // 10) and `broken`, whose pool folder is gone, so it cannot be
    // measured.
    let node_a = FakeNode::with_classes(NODE_A, &["fast", "broken"]);
    node_a
        .fake
        .set_usage(&node_a.root.join("pool"), usage(100, 40));
    node_a
        .fake
        .set_usage(&node_a.root.join("pool-fast"), usage(10, 7));
    std::fs::remove_dir_all(node_a.root.join("pool-broken")).expect("removing a pool folder");

    // Nothing published yet: nothing available anywhere.
    assert_eq!(bytes(&controller, Some(NODE_A), None).await, 0);
    assert_eq!(bytes(&controller, None, None).await, 0);

    // The whole node agent, as the node's account.
    let (stop_a, stopped_a) = watch::channel(false);
    let agent = NodeAgent::new(
        as_node.clone(),
        Arc::clone(&node_a.engine),
        NODE_A.to_owned(),
        NodeAgentConfig {
            capacity_interval: INTERVAL,
            ..NodeAgentConfig::default()
        },
    );
    let agent_a = tokio::spawn(agent.run(stopped_a));

    let published = wait_for_node(&nodes, NODE_A).await;
    let status = published.status.expect("a status");
    assert_eq!(status.classes.as_deref(), Some("broken,fast,file"));
    assert_eq!(status.publish_interval_seconds, Some(1));
    assert!(status.observed_time.is_some());
    let class = |name: &str| {
        status
            .device_classes
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("class {name} in {:?}", status.device_classes))
            .clone()
    };
    let file = class("file");
    assert_eq!(
        (file.total_bytes, file.available_bytes),
        (100 * GIB, 40 * GIB)
    );
    assert!(file.pool.contains("file pool"), "{file:?}");
    assert_eq!(file.error, None);
    assert_eq!(class("fast").available_bytes, 7 * GIB);
    let broken = class("broken");
    assert_eq!(broken.available_bytes, 0);
    assert!(broken.error.is_some(), "{broken:?}");

    // What people see.
    let yaml = server
        .kubectl_output(["get", "lcnode", NODE_A, "-o", "yaml"])
        .expect("kubectl get lcnode -o yaml");
    eprintln!("$ kubectl get lcnode {NODE_A} -o yaml\n{yaml}");
    let (columns, rows) = kubectl_table(&server, &["get", "lcnode"]);
    assert_eq!(columns, ["NAME", "CLASSES", "AVAILABLE", "UPDATED", "AGE"]);
    let shown = row(&rows, NODE_A);
    assert_eq!(shown["CLASSES"], "broken,fast,file");
    assert_eq!(shown["AVAILABLE"], "broken=?, fast=7.0 GiB, file=40.0 GiB");

    // The node's account writes its object but does not read any.
    match Api::<LivecloneNode>::all(as_node.clone()).get(NODE_A).await {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("get as {NODE_ACCOUNT}: expected 403, got {other:?}"),
    }

    // GetCapacity, per node and StorageClass parameters.
    assert_eq!(bytes(&controller, Some(NODE_A), None).await, 40 * GIB);
    assert_eq!(
        bytes(&controller, Some(NODE_A), Some("file")).await,
        40 * GIB
    );
    assert_eq!(
        bytes(&controller, Some(NODE_A), Some("fast")).await,
        7 * GIB
    );
    assert_eq!(bytes(&controller, Some(NODE_A), Some("broken")).await, 0);
    assert_eq!(bytes(&controller, Some(NODE_A), Some("unknown")).await, 0);
    assert_eq!(bytes(&controller, Some(NODE_B), None).await, 0, "no object");
    assert_eq!(bytes(&controller, Some("Not/A.Node"), None).await, 0);
    let refused = capacity(&controller, Some(NODE_A), Some("Bad_Class")).await;
    assert!(
        matches!(&refused, Err(status) if status.code() == Code::InvalidArgument),
        "{refused:?}"
    );

    // The figures follow the pool, within an interval.
    node_a
        .fake
        .set_usage(&node_a.root.join("pool"), usage(100, 30));
    wait_for_bytes(
        &controller,
        Some(NODE_A),
        None,
        30 * GIB,
        Duration::from_secs(10),
    )
    .await;

    // A deleted LivecloneNode comes back with the next publish.
    nodes
        .delete(NODE_A, &DeleteParams::default())
        .await
        .expect("deleting the LivecloneNode");
    wait_for_node(&nodes, NODE_A).await;

    // Node B publishes once (more room in `file`) and then stops.
    let node_b = FakeNode::new(NODE_B);
    node_b
        .fake
        .set_usage(&node_b.root.join("pool"), usage(100, 50));
    let mut publisher_b = CapacityPublisher::new(
        as_node.clone(),
        Arc::clone(&node_b.engine),
        NODE_B.to_owned(),
        INTERVAL,
    );
    publisher_b.publish().await.expect("publishing node B");
    let published_at = Instant::now();
    assert_eq!(bytes(&controller, Some(NODE_B), None).await, 50 * GIB);
    // No topology: the largest on one node, not the sum of all.
    assert_eq!(bytes(&controller, None, None).await, 50 * GIB);
    assert_eq!(bytes(&controller, None, Some("fast")).await, 7 * GIB);
    assert_eq!(bytes(&controller, Some(NODE_B), Some("fast")).await, 0);

    // Three intervals without a publish: node B's figures are stale and
    // count for nothing, while node A, still publishing, is unaffected.
    wait_for_bytes(&controller, Some(NODE_B), None, 0, Duration::from_secs(10)).await;
    assert!(
        published_at.elapsed() >= Duration::from_secs(2),
        "stale too soon: {:?}",
        published_at.elapsed()
    );
    assert_eq!(bytes(&controller, None, None).await, 30 * GIB);
    assert_eq!(bytes(&controller, Some(NODE_A), None).await, 30 * GIB);
    let b = nodes.get(NODE_B).await.expect("node B's object stays");
    assert!(b.status.is_some());

    // Node A's agent stops: its object stays, its figures go stale.
    stop_a.send(true).expect("stopping the agent");
    tokio::time::timeout(Duration::from_secs(10), agent_a)
        .await
        .expect("the agent stops")
        .expect("the agent task");
    wait_for_bytes(&controller, Some(NODE_A), None, 0, Duration::from_secs(10)).await;
    assert_eq!(bytes(&controller, None, None).await, 0);
    assert!(nodes
        .get_opt(NODE_A)
        .await
        .expect("reading node A")
        .is_some());

    server.stop().expect("stopping the server");
}
