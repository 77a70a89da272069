//! Kubernetes mode end to end with the real CSI sidecars, against a real
//! kube-apiserver (and etcd) on loopback:
//!
//! * the liveclone controller agent (CSI Identity + Controller) on a Unix
//!   socket in this process, as the service account of
//!   deploy/rbac/controller.yaml;
//! * the node agent of `node-a` in this process, over a real engine on the
//!   OS simulator, as the service account of deploy/rbac/node.yaml;
//! * the real csi-provisioner and csi-snapshotter as child processes with a
//!   token of the controller's service account (the containers of the
//!   controller pod), and the real snapshot-controller (a cluster add-on,
//!   run as the admin).
//!
//! No scheduler, kubelet or kube-controller-manager runs, so the test does
//! their part by hand: the Node and its CSINode, the selected-node and
//! storage-provisioner annotations the scheduler and the PV controller put
//! on a claim, and the binding of each claim to the PV the provisioner made.
//!
//! The story: a source claim is provisioned (CreateVolume: provisioner ->
//! controller agent -> LivecloneVolume -> node agent -> engine), filled with
//! data in the simulator, cloned by a claim with a PVC data source, snapshot
//! by a VolumeSnapshot, restored by a claim with a snapshot data source;
//! the two copies get VolumeHydrations that `kubectl get vh` shows and that
//! reach Complete as the simulated copy finishes; deleting the clone's claim
//! and PV makes the provisioner call DeleteVolume, which removes the
//! LivecloneVolume.
//!
//! Needs the tools from `tests/tools/build-k8s-tools.sh`; fails (does not
//! skip) without them:
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_sidecars -- --nocapture
//!
//! On failure the sidecars' logs (`-v=5`) are printed; with
//! `LIVECLONE_KUBETEST_KEEP=1` they stay in the server's folder.

mod k8s_common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use k8s_common::{create_namespace, install_crds, kubectl_table, meta, repo_root, start, FakeNode};
use k8s_openapi::api::core::v1::{
    Node, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    TypedLocalObjectReference, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::{CSINode, CSINodeDriver, CSINodeSpec, StorageClass};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use kubetest::{ApiServer, Daemon, Tool};
use liveclone::domain::engine::dm_name;
use liveclone::domain::hydration::HydrationPhase;
use liveclone::domain::ids::{SnapshotId, VolumeId};
use liveclone::domain::model::VolumeRecord;
use liveclone::domain::monitor::{self, MonitorConfig};
use liveclone::domain::pool::Storage;
use liveclone::grpc::identity::{AlwaysReady, IdentityService, PLUGIN_NAME};
use liveclone::grpc::server::BoundSocket;
use liveclone::grpc::TOPOLOGY_NODE_KEY;
use liveclone::k8s::{
    LivecloneSnapshot, LivecloneVolume, SourceKind, VolumeHydration, VolumePhase,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::service::Routes;

const NODE: &str = "node-a";
/// Where the test's claims live (the user's namespace).
const NS: &str = "lc-sidecars";
/// The release namespace of deploy/rbac/*.yaml.
const RELEASE_NS: &str = "liveclone";
const CONTROLLER_ACCOUNT: &str = "liveclone-controller";
const NODE_ACCOUNT: &str = "liveclone-node";
const STORAGE_CLASS: &str = "liveclone";
const SNAPSHOT_CLASS: &str = "liveclone";
const CLAIM_SIZE: &str = "64Mi";
const MIB: u64 = 1 << 20;
/// Written over the whole source volume before it is cloned and snapshot,
/// so that no region of the copies is a hole the engine can skip: the
/// hydrations have all 64 MiB to copy.
const PATTERN: u8 = 0x5a;
const PATTERN_BYTES: usize = 64 * MIB as usize;
/// What the PV controller and the scheduler put on claims.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";

/// The child processes; all killed when this is dropped, also when the test
/// panics, after printing the end of each one's log.
struct Children {
    running: Vec<Daemon>,
}

impl Children {
    /// Panics with its log if a child has exited: a sidecar that died will
    /// not do what the test waits for, and its log says why.
    fn check(&mut self) {
        for child in &mut self.running {
            if let Some(status) = child.exited().expect("checking a child process") {
                panic!(
                    "{} exited ({status}); log {}:\n{}",
                    child.name(),
                    child.log_path().display(),
                    child.log_tail(60)
                );
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for child in &self.running {
                eprintln!(
                    "--- {} (log {}), last 120 lines ---\n{}",
                    child.name(),
                    child.log_path().display(),
                    child.log_tail(120)
                );
            }
        }
        for child in &mut self.running {
            child.kill();
        }
    }
}

/// The test's own tasks (agents, monitor, CSI server): aborted when this is
/// dropped, so that a failing test does not leave them running over a
/// removed node folder while the runtime shuts down.
struct Tasks(Vec<tokio::task::AbortHandle>);

impl Tasks {
    fn spawn<F>(&mut self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = tokio::spawn(future);
        self.0.push(task.abort_handle());
        task
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Polls `probe` every 200 ms until it gives a value, checking on the
/// children in between; panics after `timeout`, with the last note.
async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    children: &mut Children,
    mut probe: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        children.check();
        match probe().await {
            Ok(value) => {
                eprintln!("{what}: after {:.1} s", started.elapsed().as_secs_f64());
                return value;
            }
            Err(note) => assert!(
                started.elapsed() < timeout,
                "{what}: not within {timeout:?}; last: {note}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The node: a real engine over the OS simulator, its pool and state in a
/// temporary folder.
impl FakeNode {
    fn volume_of(&self, handle: &str) -> Option<VolumeRecord> {
        self.volume(&VolumeId::from_str(handle).expect("a liveclone volume ID"))
    }

    /// The file that holds the volume's data now.
    fn data_file(&self, handle: &str) -> PathBuf {
        let record = self
            .volume_of(handle)
            .expect("the volume exists on the node");
        self.pool.path_of(&Storage::Data {
            volume: record.id.clone(),
            generation: record.generation,
        })
    }
}

fn read_start(path: &Path, len: usize) -> Vec<u8> {
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut bytes = vec![0; len];
    file.read_exact_at(&mut bytes, 0)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    bytes
}

fn snapshot_resources() -> (ApiResource, ApiResource, ApiResource) {
    let gvk = |kind| GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind);
    (
        ApiResource::from_gvk_with_plural(&gvk("VolumeSnapshot"), "volumesnapshots"),
        ApiResource::from_gvk_with_plural(&gvk("VolumeSnapshotContent"), "volumesnapshotcontents"),
        ApiResource::from_gvk_with_plural(&gvk("VolumeSnapshotClass"), "volumesnapshotclasses"),
    )
}

/// A claim as a user writes it, plus the two annotations the scheduler
/// (the node it picked for the first consumer) and the PV controller (which
/// provisioner acts on it) would add.
fn claim(name: &str, data_source: Option<TypedLocalObjectReference>) -> PersistentVolumeClaim {
    let mut metadata = meta(name, Some(NS));
    metadata.annotations = Some(BTreeMap::from([
        (SELECTED_NODE.to_owned(), NODE.to_owned()),
        (STORAGE_PROVISIONER.to_owned(), PLUGIN_NAME.to_owned()),
    ]));
    PersistentVolumeClaim {
        metadata,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(CLAIM_SIZE.to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            storage_class_name: Some(STORAGE_CLASS.to_owned()),
            data_source,
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Applies a manifest under deploy/rbac.
fn apply_rbac(server: &ApiServer, file: &str) {
    let path = repo_root().join("deploy/rbac").join(file);
    let out = server
        .kubectl_output(["apply".as_ref(), "-f".as_ref(), path.as_os_str()])
        .unwrap_or_else(|e| panic!("kubectl apply -f deploy/rbac/{file}: {e:#}"));
    eprint!("kubectl apply -f deploy/rbac/{file}:\n{out}");
}

/// The Node the scheduler picked, labelled with its topology segment, and
/// the CSINode the kubelet's registration of the node plugin would make.
async fn create_node(admin: &Client) {
    let mut node = Node {
        metadata: meta(NODE, None),
        ..Node::default()
    };
    node.metadata.labels = Some(BTreeMap::from([(
        TOPOLOGY_NODE_KEY.to_owned(),
        NODE.to_owned(),
    )]));
    Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("creating the Node");
    let csi_node = CSINode {
        metadata: meta(NODE, None),
        spec: CSINodeSpec {
            drivers: vec![CSINodeDriver {
                name: PLUGIN_NAME.to_owned(),
                node_id: NODE.to_owned(),
                topology_keys: Some(vec![TOPOLOGY_NODE_KEY.to_owned()]),
                allocatable: None,
            }],
        },
    };
    Api::<CSINode>::all(admin.clone())
        .create(&PostParams::default(), &csi_node)
        .await
        .expect("creating the CSINode");
}

async fn create_classes(admin: &Client) {
    let class = StorageClass {
        metadata: meta(STORAGE_CLASS, None),
        provisioner: PLUGIN_NAME.to_owned(),
        parameters: Some(BTreeMap::from([(
            "csi.storage.k8s.io/fstype".to_owned(),
            "ext4".to_owned(),
        )])),
        reclaim_policy: Some("Delete".to_owned()),
        volume_binding_mode: Some("WaitForFirstConsumer".to_owned()),
        allow_volume_expansion: Some(true),
        ..StorageClass::default()
    };
    Api::<StorageClass>::all(admin.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("creating the StorageClass");
    let (_, _, class_resource) = snapshot_resources();
    let snapshot_class = DynamicObject::new(SNAPSHOT_CLASS, &class_resource).data(json!({
        "driver": PLUGIN_NAME,
        "deletionPolicy": "Delete",
    }));
    Api::<DynamicObject>::all_with(admin.clone(), &class_resource)
        .create(&PostParams::default(), &snapshot_class)
        .await
        .expect("creating the VolumeSnapshotClass");
}

/// What the PV controller does once the provisioner made a claim's PV (it
/// already names the claim, with its UID, in `claimRef`): the PV becomes
/// Bound, the claim names the PV and becomes Bound with the PV's capacity.
async fn bind(admin: &Client, claim: &PersistentVolumeClaim, pv: &PersistentVolume) {
    let pv_name = pv.name_any();
    let claim_name = claim.name_any();
    let pv_spec = pv.spec.as_ref().expect("the PV has a spec");
    let claim_ref = pv_spec.claim_ref.as_ref().expect("the PV names its claim");
    assert_eq!(
        claim_ref.uid, claim.metadata.uid,
        "{pv_name} is for {claim_name}"
    );
    Api::<PersistentVolume>::all(admin.clone())
        .patch_status(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Bound"}})),
        )
        .await
        .unwrap_or_else(|e| panic!("marking {pv_name} Bound: {e}"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    claims
        .patch(
            &claim_name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {
                    "pv.kubernetes.io/bind-completed": "yes",
                    "pv.kubernetes.io/bound-by-controller": "yes",
                }},
                "spec": {"volumeName": pv_name},
            })),
        )
        .await
        .unwrap_or_else(|e| panic!("binding {claim_name} to {pv_name}: {e}"));
    claims
        .patch_status(
            &claim_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Bound",
                "accessModes": pv_spec.access_modes,
                "capacity": pv_spec.capacity,
            }})),
        )
        .await
        .unwrap_or_else(|e| panic!("marking {claim_name} Bound: {e}"));
    eprintln!("bound {NS}/{claim_name} to {pv_name}");
}

/// Creates the claim, waits for the PV the provisioner makes for it, binds
/// them; returns the PV.
async fn provision(
    admin: &Client,
    children: &mut Children,
    claim: PersistentVolumeClaim,
) -> PersistentVolume {
    let name = claim.name_any();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    let created = claims
        .create(&PostParams::default(), &claim)
        .await
        .unwrap_or_else(|e| panic!("creating claim {name}: {e}"));
    let uid = created.metadata.uid.clone();
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    let pv = eventually(
        &format!("the provisioner made the PV of {name}"),
        Duration::from_secs(60),
        children,
        || async {
            let listed = pvs
                .list(&ListParams::default())
                .await
                .map_err(|e| format!("listing PVs: {e}"))?;
            listed
                .items
                .into_iter()
                .find(|pv| {
                    pv.spec
                        .as_ref()
                        .and_then(|s| s.claim_ref.as_ref())
                        .is_some_and(|r| r.uid == uid)
                })
                .ok_or_else(|| "no PV yet".to_owned())
        },
    )
    .await;
    let spec = pv.spec.as_ref().expect("the PV has a spec");
    let csi = spec.csi.as_ref().expect("a CSI PV");
    eprintln!(
        "{} for {name}: volume handle {}, attributes {:?}, node affinity {:?}",
        pv.name_any(),
        csi.volume_handle,
        csi.volume_attributes,
        spec.node_affinity
    );
    assert_eq!(csi.driver, PLUGIN_NAME);
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete")
    );
    assert_eq!(
        spec.capacity.as_ref().and_then(|c| c.get("storage")),
        Some(&Quantity(CLAIM_SIZE.to_owned())),
        "the PV has the size asked for"
    );
    // The volume lives on node-a only: the provisioner turns the topology
    // CreateVolume answered into the PV's node affinity.
    let terms = spec
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    let pinned = terms.iter().any(|term| {
        term.match_expressions.iter().flatten().any(|e| {
            e.key == TOPOLOGY_NODE_KEY
                && e.operator == "In"
                && e.values.as_deref() == Some(&[NODE.to_owned()][..])
        })
    });
    assert!(pinned, "the PV is pinned to {NODE}: {terms:?}");
    bind(admin, &created, &pv).await;
    pv
}

fn volume_handle(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone())
        .expect("a CSI PV")
}

/// The LivecloneVolume of a provisioned volume: made by the controller
/// agent for the claim, Ready on node-a.
async fn check_volume(admin: &Client, handle: &str, claim: &str) -> LivecloneVolume {
    let volume = Api::<LivecloneVolume>::all(admin.clone())
        .get(handle)
        .await
        .unwrap_or_else(|e| panic!("the LivecloneVolume {handle}: {e}"));
    assert_eq!(volume.spec.node, NODE);
    let named = volume
        .spec
        .claim
        .as_ref()
        .expect("the volume names its claim");
    assert_eq!((named.namespace.as_str(), named.name.as_str()), (NS, claim));
    assert_eq!(
        volume.status.as_ref().and_then(|s| s.phase),
        Some(VolumePhase::Ready),
        "{volume:#?}"
    );
    volume
}

/// The VolumeHydration of the clone in claim `pvc`, as the controller
/// agent made it.
async fn hydration_of(hydrations: &Api<VolumeHydration>, pvc: &str) -> VolumeHydration {
    let listed = hydrations
        .list(&ListParams::default())
        .await
        .expect("listing VolumeHydrations");
    let mine: Vec<_> = listed
        .items
        .into_iter()
        .filter(|vh| vh.spec.pvc == pvc)
        .collect();
    assert_eq!(mine.len(), 1, "one VolumeHydration for {pvc}: {mine:#?}");
    mine.into_iter().next().expect("one")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sidecars_drive_the_agents() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("liveclone=info")),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
    let test_started = Instant::now();
    let server = start().await;
    let tools = server.tools().clone();
    let provisioner_bin = tools.get(Tool::CsiProvisioner).expect("csi-provisioner");
    let snapshotter_bin = tools.get(Tool::CsiSnapshotter).expect("csi-snapshotter");
    let snapshot_controller_bin = tools
        .get(Tool::SnapshotController)
        .expect("snapshot-controller");
    install_crds(&server);
    server
        .install_snapshot_crds()
        .expect("installing the VolumeSnapshot CRDs");
    let admin = server.client().expect("admin client");
    create_namespace(&admin, RELEASE_NS).await;
    create_namespace(&admin, NS).await;
    apply_rbac(&server, "node.yaml");
    apply_rbac(&server, "controller.yaml");
    create_node(&admin).await;
    create_classes(&admin).await;

    let mut children = Children {
        running: Vec::new(),
    };
    // RBAC reaches the authorizer through an informer: wait until both
    // accounts have their rules, so that no agent starts in backoff.
    let as_controller = server
        .client_impersonating_service_account(RELEASE_NS, CONTROLLER_ACCOUNT)
        .expect("impersonating the controller's account");
    let as_node = server
        .client_impersonating_service_account(RELEASE_NS, NODE_ACCOUNT)
        .expect("impersonating the node's account");
    {
        let controller_view: Api<LivecloneVolume> = Api::all(as_controller.clone());
        let node_view: Api<VolumeHydration> = Api::all(as_node.clone());
        let pv_view: Api<PersistentVolume> = Api::all(as_controller.clone());
        eventually(
            "the service accounts' rules are in force",
            Duration::from_secs(15),
            &mut children,
            || async {
                controller_view
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| format!("controller: {e}"))?;
                pv_view
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| format!("controller (provisioner rules): {e}"))?;
                node_view
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| format!("node: {e}"))?;
                Ok(())
            },
        )
        .await;
    }

    // The node agent over the simulator, beside the hydration monitor
    // whose published progress it reports (as `liveclone node` runs them).
    let node = FakeNode::new(NODE);
    let (stop, stopped) = watch::channel(false);
    // Declared after the node so that, on a panic, the tasks are gone
    // before its folder is.
    let mut tasks = Tasks(Vec::new());
    let monitor = tasks.spawn(monitor::run(
        Arc::clone(&node.engine),
        MonitorConfig {
            poll_interval: Duration::from_millis(200),
            // The copy moves only when the test moves it: no stalls.
            stall_after: Duration::from_secs(600),
            event_wait: Duration::from_millis(500),
        },
        stopped.clone(),
    ));
    let node_agent = tasks.spawn(liveclone::k8s::node::run_agent(
        as_node.clone(),
        Arc::clone(&node.engine),
        NODE.to_owned(),
        liveclone::k8s::node::NodeAgentConfig::default(),
        stopped.clone(),
    ));

    // The controller agent on the socket the sidecars share, as in the pod.
    let socket_dir = tempfile::tempdir().expect("socket folder");
    let socket = socket_dir.path().join("csi.sock");
    let socket_arg = socket.to_str().expect("a UTF-8 socket path").to_owned();
    let bound = BoundSocket::bind(&socket_arg)
        .await
        .expect("binding the CSI socket");
    let routes = Routes::new(IdentityService::new(Arc::new(AlwaysReady)).into_server())
        .add_service(
            liveclone::k8s::controller::controller_service(
                as_controller.clone(),
                liveclone::k8s::controller::ControllerAgentConfig::default(),
            )
            .into_server(),
        );
    let grpc = {
        let mut stopped = stopped.clone();
        tasks.spawn(bound.serve(routes, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }))
    };

    // The sidecars. The provisioner and the snapshotter are containers of
    // the controller pod: a token of its account. The snapshot-controller
    // is the cluster's add-on with its own identity, not ours: the admin.
    let kubeconfig = server
        .service_account_kubeconfig(RELEASE_NS, CONTROLLER_ACCOUNT)
        .await
        .expect("a kubeconfig for the controller's account");
    let kubeconfig_arg = format!("--kubeconfig={}", kubeconfig.display());
    let csi_address = format!("--csi-address={socket_arg}");
    let logs = server.dir().to_owned();
    let spawn = |name: &'static str, program: &Path, args: Vec<String>| {
        let log = logs.join(format!("{name}.log"));
        eprintln!("starting {name} {}", args.join(" "));
        Daemon::spawn(name, program, &args, &log)
            .unwrap_or_else(|e| panic!("starting {name}: {e:#}"))
    };
    children.running.push(spawn(
        "csi-provisioner",
        provisioner_bin,
        vec![
            kubeconfig_arg.clone(),
            csi_address.clone(),
            "--feature-gates=Topology=true".to_owned(),
            "--extra-create-metadata".to_owned(),
            "--leader-election=false".to_owned(),
            // CreateVolume waits for the node to make the volume.
            "--timeout=60s".to_owned(),
            // A failed attempt is retried soon, not after minutes of backoff.
            "--retry-interval-max=5s".to_owned(),
            "-v=5".to_owned(),
        ],
    ));
    children.running.push(spawn(
        "csi-snapshotter",
        snapshotter_bin,
        vec![
            kubeconfig_arg,
            csi_address,
            "--extra-create-metadata".to_owned(),
            "--leader-election=false".to_owned(),
            "--timeout=60s".to_owned(),
            "--retry-interval-max=5s".to_owned(),
            "-v=5".to_owned(),
        ],
    ));
    children.running.push(spawn(
        "snapshot-controller",
        snapshot_controller_bin,
        vec![
            format!("--kubeconfig={}", server.kubeconfig().display()),
            "--leader-election=false".to_owned(),
            // No VolumeGroupSnapshot CRDs here: without this it waits 30 s
            // for them before carrying on.
            "--feature-gates=CSIVolumeGroupSnapshot=false".to_owned(),
            "--retry-interval-max=5s".to_owned(),
            "-v=5".to_owned(),
        ],
    ));

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    let hydrations: Api<VolumeHydration> = Api::namespaced(admin.clone(), NS);

    // 1. The source: provisioner -> CreateVolume -> LivecloneVolume -> node.
    let source_pv = provision(&admin, &mut children, claim("source", None)).await;
    let source_handle = volume_handle(&source_pv);
    check_volume(&admin, &source_handle, "source").await;
    let record = node
        .volume_of(&source_handle)
        .expect("the node's engine has the source");
    assert!(record.hydration.is_none(), "the source is no clone");
    let data = node.data_file(&source_handle);
    OpenOptions::new()
        .write(true)
        .open(&data)
        .and_then(|file| file.write_all_at(&vec![PATTERN; PATTERN_BYTES], 0))
        .expect("writing the source's data");

    // 2. A clone of the source claim.
    let clone_pv = provision(
        &admin,
        &mut children,
        claim(
            "clone",
            Some(TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".to_owned(),
                name: "source".to_owned(),
            }),
        ),
    )
    .await;
    let clone_handle = volume_handle(&clone_pv);
    let clone_volume = check_volume(&admin, &clone_handle, "clone").await;
    eprintln!("clone's LivecloneVolume spec: {:?}", clone_volume.spec);
    let clone_vh = hydration_of(&hydrations, "clone").await;
    assert_eq!(clone_vh.spec.node, NODE);
    assert_eq!(clone_vh.spec.source.kind, SourceKind::PersistentVolumeClaim);
    assert_eq!(clone_vh.spec.source.name, "source");
    assert_eq!(
        clone_vh.spec.source.volume_handle.as_deref(),
        Some(source_handle.as_str())
    );
    assert_eq!(clone_vh.spec.destination.volume_handle, clone_handle);
    assert_eq!(
        clone_vh.spec.destination.persistent_volume_name,
        clone_pv.name_any()
    );
    assert!(
        node.volume_of(&clone_handle)
            .expect("the node's engine has the clone")
            .hydration
            .is_some(),
        "the clone hydrates"
    );

    // 3. A VolumeSnapshot of the source: snapshot-controller makes the
    // content, csi-snapshotter calls CreateSnapshot -> LivecloneSnapshot.
    let (snapshot_resource, content_resource, _) = snapshot_resources();
    let snapshots: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &snapshot_resource);
    let snapshot = DynamicObject::new("snap", &snapshot_resource)
        .within(NS)
        .data(json!({"spec": {
            "volumeSnapshotClassName": SNAPSHOT_CLASS,
            "source": {"persistentVolumeClaimName": "source"},
        }}));
    snapshots
        .create(&PostParams::default(), &snapshot)
        .await
        .expect("creating the VolumeSnapshot");
    let ready = eventually(
        "the VolumeSnapshot is readyToUse",
        Duration::from_secs(60),
        &mut children,
        || async {
            let snapshot = snapshots
                .get("snap")
                .await
                .map_err(|e| format!("reading the VolumeSnapshot: {e}"))?;
            if snapshot.data["status"]["readyToUse"] == json!(true) {
                Ok(snapshot)
            } else {
                Err(format!("status {}", snapshot.data["status"]))
            }
        },
    )
    .await;
    eprintln!("VolumeSnapshot status: {}", ready.data["status"]);
    let content_name = ready.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .expect("the snapshot names its content")
        .to_owned();
    let content = Api::<DynamicObject>::all_with(admin.clone(), &content_resource)
        .get(&content_name)
        .await
        .expect("reading the VolumeSnapshotContent");
    let snapshot_handle = content.data["status"]["snapshotHandle"]
        .as_str()
        .expect("the content has a snapshot handle")
        .to_owned();
    let lcsnap = Api::<LivecloneSnapshot>::all(admin.clone())
        .get(&snapshot_handle)
        .await
        .unwrap_or_else(|e| panic!("the LivecloneSnapshot {snapshot_handle}: {e}"));
    assert_eq!(lcsnap.spec.node, NODE);
    assert_eq!(lcsnap.spec.source_volume, source_handle);
    let named = lcsnap
        .spec
        .volume_snapshot
        .as_ref()
        .expect("the LivecloneSnapshot names its VolumeSnapshot");
    assert_eq!(
        (named.namespace.as_str(), named.name.as_str()),
        (NS, "snap")
    );
    assert_eq!(
        lcsnap.status.as_ref().and_then(|s| s.ready_to_use),
        Some(true)
    );
    // The data written into the source is in the snapshot's image.
    let snapshot_id = SnapshotId::from_str(&snapshot_handle).expect("a liveclone snapshot ID");
    assert!(
        node.engine
            .snapshot(&snapshot_id)
            .expect("reading the snapshot record")
            .is_some(),
        "the node's engine has the snapshot"
    );
    let image = node.pool.path_of(&Storage::Image(snapshot_id));
    assert!(
        read_start(&image, PATTERN_BYTES)
            .iter()
            .all(|b| *b == PATTERN),
        "the snapshot's image holds what was written into the source"
    );

    // 4. A claim restored from the VolumeSnapshot.
    let restored_pv = provision(
        &admin,
        &mut children,
        claim(
            "restored",
            Some(TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".to_owned()),
                kind: "VolumeSnapshot".to_owned(),
                name: "snap".to_owned(),
            }),
        ),
    )
    .await;
    let restored_handle = volume_handle(&restored_pv);
    check_volume(&admin, &restored_handle, "restored").await;
    let restored_vh = hydration_of(&hydrations, "restored").await;
    assert_eq!(restored_vh.spec.node, NODE);
    assert_eq!(restored_vh.spec.source.kind, SourceKind::VolumeSnapshot);
    assert_eq!(restored_vh.spec.source.name, "snap");
    assert_eq!(
        restored_vh.spec.source.snapshot_handle.as_deref(),
        Some(snapshot_handle.as_str())
    );
    assert_eq!(restored_vh.spec.destination.volume_handle, restored_handle);

    // 5. `kubectl get vh`: the columns, and a row per copy once the node
    // has published a phase.
    eventually(
        "both VolumeHydrations have a phase",
        Duration::from_secs(30),
        &mut children,
        || async {
            for pvc in ["clone", "restored"] {
                let vh = hydration_of(&hydrations, pvc).await;
                if vh.status.and_then(|s| s.phase).is_none() {
                    return Err(format!("{pvc} has no phase yet"));
                }
            }
            Ok(())
        },
    )
    .await;
    let expected_rows = BTreeMap::from([
        ("clone".to_owned(), "source".to_owned()),
        ("restored".to_owned(), "snap".to_owned()),
    ]);
    let check_table = |want_phase: Option<&str>| {
        let (columns, rows) = kubectl_table(&server, &["get", "vh", "-n", NS]);
        assert_eq!(
            columns,
            ["NAME", "PVC", "SOURCE", "NODE", "PHASE", "PROGRESS", "RATE", "ETA", "AGE"],
            "kubectl get vh columns"
        );
        let shown: BTreeMap<String, String> = rows
            .iter()
            .map(|r| (r["PVC"].clone(), r["SOURCE"].clone()))
            .collect();
        assert_eq!(shown, expected_rows);
        let phases = BTreeSet::from(["Pending", "Hydrating", "Switching", "Complete", "Stalled"]);
        for row in &rows {
            assert_eq!(row["NODE"], NODE, "{row:?}");
            assert!(!row["NAME"].is_empty(), "{row:?}");
            match want_phase {
                Some(phase) => assert_eq!(row["PHASE"], phase, "{row:?}"),
                None => assert!(phases.contains(row["PHASE"].as_str()), "{row:?}"),
            }
        }
        rows
    };
    check_table(None);

    // 6. The simulated copy: half, then the rest; the node agent publishes
    // Complete once the engine has switched the clone to its own storage.
    for handle in [&clone_handle, &restored_handle] {
        let id = VolumeId::from_str(handle).expect("a volume ID");
        let dm = dm_name(&id);
        let total = node
            .volume_of(handle)
            .and_then(|v| v.hydration)
            .map(|h| h.source_bytes.div_ceil(h.region_sectors * 512))
            .expect("a hydrating clone");
        node.fake.hydrate(&dm, total / 2).expect("hydrating half");
    }
    eventually(
        "both VolumeHydrations show the half",
        Duration::from_secs(30),
        &mut children,
        || async {
            for pvc in ["clone", "restored"] {
                let status = hydration_of(&hydrations, pvc).await.status;
                let (phase, hydrated, total) = status
                    .map(|s| (s.phase, s.hydrated_bytes, s.total_bytes))
                    .unwrap_or_default();
                if phase != Some(HydrationPhase::Hydrating)
                    || hydrated.unwrap_or(0) * 2 < total.unwrap_or(u64::MAX)
                {
                    return Err(format!("{pvc} is {phase:?}, {hydrated:?} of {total:?}"));
                }
            }
            Ok(())
        },
    )
    .await;
    for row in check_table(Some("Hydrating")) {
        assert!(row["PROGRESS"].ends_with('%'), "{row:?}");
    }
    for handle in [&clone_handle, &restored_handle] {
        let dm = dm_name(&VolumeId::from_str(handle).expect("a volume ID"));
        node.fake
            .hydrate(&dm, u64::MAX)
            .expect("hydrating the rest");
    }
    eventually(
        "both VolumeHydrations are Complete",
        Duration::from_secs(30),
        &mut children,
        || async {
            for pvc in ["clone", "restored"] {
                let phase = hydration_of(&hydrations, pvc)
                    .await
                    .status
                    .and_then(|s| s.phase);
                if phase != Some(HydrationPhase::Complete) {
                    return Err(format!("{pvc} is {phase:?}"));
                }
            }
            Ok(())
        },
    )
    .await;
    for row in check_table(Some("Complete")) {
        assert_eq!(row["PROGRESS"], "100.0%", "{row:?}");
    }
    for handle in [&clone_handle, &restored_handle] {
        assert!(
            node.volume_of(handle)
                .expect("the copy exists")
                .hydration
                .is_none(),
            "the engine says {handle} is independent"
        );
    }

    // 7. The clone goes: its claim is deleted (the pvc-protection
    // finalizer is removed as kube-controller-manager does once no pod uses
    // the claim), its PV becomes Released (the PV controller's part), and
    // the provisioner, seeing reclaim policy Delete, calls DeleteVolume.
    claims
        .delete("clone", &DeleteParams::default())
        .await
        .expect("deleting the clone's claim");
    claims
        .patch(
            "clone",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("removing the clone claim's finalizers");
    let pvs: Api<PersistentVolume> = Api::all(admin.clone());
    pvs.patch_status(
        &clone_pv.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Released"}})),
    )
    .await
    .expect("marking the clone's PV Released");
    let volumes: Api<LivecloneVolume> = Api::all(admin.clone());
    eventually(
        "DeleteVolume removed the clone's LivecloneVolume",
        Duration::from_secs(60),
        &mut children,
        || async {
            match volumes.get_opt(&clone_handle).await {
                Ok(None) => Ok(()),
                Ok(Some(volume)) => Err(format!(
                    "still there: deletionTimestamp {:?}, finalizers {:?}, status {:?}",
                    volume.metadata.deletion_timestamp, volume.metadata.finalizers, volume.status
                )),
                Err(e) => Err(format!("reading it: {e}")),
            }
        },
    )
    .await;
    assert!(
        node.volume_of(&clone_handle).is_none(),
        "the node's engine no longer has the clone"
    );
    // After DeleteVolume the provisioner removes its finalizer and deletes
    // the PV (which then waits only for kube-controller-manager's
    // pv-protection finalizer).
    let clone_pv_name = clone_pv.name_any();
    eventually(
        "the provisioner deleted the clone's PV",
        Duration::from_secs(30),
        &mut children,
        || async {
            match pvs.get_opt(&clone_pv_name).await {
                Ok(None) => Ok(()),
                Ok(Some(pv)) => {
                    let finalizers = pv.finalizers().to_vec();
                    if pv.metadata.deletion_timestamp.is_some()
                        && !finalizers
                            .iter()
                            .any(|f| f.starts_with("external-provisioner"))
                    {
                        Ok(())
                    } else {
                        Err(format!(
                            "deletionTimestamp {:?}, finalizers {finalizers:?}",
                            pv.metadata.deletion_timestamp
                        ))
                    }
                }
                Err(e) => Err(format!("reading it: {e}")),
            }
        },
    )
    .await;
    let vh_left: Vec<String> = hydrations
        .list(&ListParams::default())
        .await
        .expect("listing VolumeHydrations")
        .items
        .iter()
        .map(|vh| vh.spec.pvc.clone())
        .collect();
    assert_eq!(
        vh_left,
        ["restored"],
        "the clone's VolumeHydration goes with it"
    );
    // The others are untouched.
    check_volume(&admin, &source_handle, "source").await;
    check_volume(&admin, &restored_handle, "restored").await;
    assert!(node.fake.hazards().is_empty(), "{:?}", node.fake.hazards());

    children.check();
    drop(children);
    stop.send(true).expect("stopping the agents");
    tokio::time::timeout(Duration::from_secs(10), grpc)
        .await
        .expect("the CSI server stops")
        .expect("the CSI server task")
        .expect("the CSI server");
    for (what, task) in [("node agent", node_agent), ("monitor", monitor)] {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("the {what} did not stop"))
            .unwrap_or_else(|e| panic!("the {what} failed: {e}"));
    }
    server.stop().expect("stopping the server");
    eprintln!(
        "the whole story took {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
}
