//! The node agent's LivecloneVolume and LivecloneSnapshot reconcilers
//! against a real kube-apiserver (and etcd) on loopback, with a real engine
//! over the OS simulator. The test plays the controller agent: it creates
//! the objects as that agent does (server-side apply under
//! `liveclone-controller`, with the node label and the storage finalizer)
//! and deletes them; the node agent, started by `run_agent`'s type and run
//! as the service account of deploy/rbac/node.yaml, must make, grow,
//! snapshot and delete the storage and report it in the status.
//!
//! Needs the tools from `tests/tools/build-k8s-tools.sh`; fails (does not
//! skip) without them:
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_node_volumes -- --nocapture

mod k8s_common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use k8s_common::{
    create_namespace, install_crds, install_rbac_exactly, kubectl_table, start, FakeNode,
    NODE_AGENT_RULES,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use liveclone::domain::engine::dm_name;
use liveclone::domain::error::ErrorCode;
use liveclone::domain::ids::{SnapshotId, VolumeId};
use liveclone::domain::model::{AccessKind, SnapshotState, VolumeState};
use liveclone::domain::monitor::{self, MonitorConfig};
use liveclone::domain::pool::{Pool, Storage};
use liveclone::k8s::node::{
    NodeAgent, NodeAgentConfig, ABNORMAL_CONDITION, PROVISIONING_FAILED, REPORTING_CONTROLLER,
};
use liveclone::k8s::volume::ContentSourceKind;
use liveclone::k8s::{
    node_label_value, LivecloneSnapshot, LivecloneSnapshotSpec, LivecloneVolume,
    LivecloneVolumeSpec, VolumeAccess, VolumeContentSource, VolumePhase, CONTROLLER_FIELD_MANAGER,
    NODE_LABEL, READY_CONDITION, STORAGE_FINALIZER,
};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

const MIB: u64 = 1 << 20;
const SOURCE_BYTES: u64 = 16 * MIB;
const REGION_BYTES: u64 = 64 << 10;
const NODE: &str = "node-a";
const AGENT_NAMESPACE: &str = "liveclone";
const AGENT_ACCOUNT: &str = "liveclone-node";
const PATTERN_OFFSET: u64 = 5 * MIB + 123;
const PATTERN: &[u8] = b"the source's bytes, as they were when it was cloned";

impl FakeNode {
    fn holds_pattern(&self, item: &Storage) -> bool {
        let mut found = vec![0; PATTERN.len()];
        std::fs::File::open(self.pool.path_of(item))
            .and_then(|file| file.read_exact_at(&mut found, PATTERN_OFFSET))
            .is_ok_and(|()| found == PATTERN)
    }

    /// Copies the rest of a clone in the simulated kernel.
    fn hydrate_all(&self, id: &VolumeId) {
        let regions = SOURCE_BYTES.div_ceil(REGION_BYTES) * 4;
        self.fake
            .hydrate(&dm_name(id), regions)
            .unwrap_or_else(|e| panic!("hydrating {id}: {e}"));
    }
}

fn volume_spec(name: &str, node: &str, bytes: u64) -> LivecloneVolumeSpec {
    LivecloneVolumeSpec {
        name: name.to_owned(),
        node: node.to_owned(),
        capacity_bytes: bytes,
        access: VolumeAccess::from(AccessKind::Block),
        content_source: None,
        parameters: BTreeMap::from([("liveclone.io/regionSize".to_owned(), "64KiB".to_owned())]),
        claim: None,
        pool: "file".to_owned(),
    }
}

fn from_source(
    mut spec: LivecloneVolumeSpec,
    kind: ContentSourceKind,
    id: &str,
) -> LivecloneVolumeSpec {
    spec.content_source = Some(VolumeContentSource {
        kind,
        id: id.to_owned(),
    });
    spec
}

/// What the controller agent does: server-side apply of the object, with
/// the node label (for `label_node`) and the storage finalizer.
async fn apply_as_controller<K>(
    api: &Api<K>,
    name: &str,
    label_node: &str,
    spec: serde_json::Value,
) -> K
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {
            "name": name,
            "labels": {NODE_LABEL: node_label_value(label_node)},
            "finalizers": [STORAGE_FINALIZER],
        },
        "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply(CONTROLLER_FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {} {name}: {e}", K::kind(&())))
}

async fn apply_volume(api: &Api<LivecloneVolume>, spec: &LivecloneVolumeSpec) -> VolumeId {
    let id = VolumeId::for_name(&spec.name).expect("a valid name");
    let spec_json = serde_json::to_value(spec).expect("serializes");
    apply_as_controller(api, id.as_str(), &spec.node, spec_json).await;
    id
}

async fn apply_snapshot(api: &Api<LivecloneSnapshot>, spec: &LivecloneSnapshotSpec) -> SnapshotId {
    let id = SnapshotId::for_name(&spec.name).expect("a valid name");
    let spec_json = serde_json::to_value(spec).expect("serializes");
    apply_as_controller(api, id.as_str(), &spec.node, spec_json).await;
    id
}

/// Polls the object until `check` accepts it.
async fn wait_for_object<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&K) -> bool,
) -> K
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let started = Instant::now();
    loop {
        let object = api
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("reading {name}: {e}"));
        if check(&object) {
            eprintln!("{what}: after {:.1} s", started.elapsed().as_secs_f64());
            return object;
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; the object is {object:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until_gone<K>(api: &Api<K>, name: &str, what: &str, timeout: Duration)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let started = Instant::now();
    while let Some(object) = api
        .get_opt(name)
        .await
        .unwrap_or_else(|e| panic!("reading {name}: {e}"))
    {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; the object is {object:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{what}: after {:.1} s", started.elapsed().as_secs_f64());
}

async fn wait_for(what: &str, timeout: Duration, check: impl Fn() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{what}: after {:.1} s", started.elapsed().as_secs_f64());
}

/// Every volume's and snapshot's resourceVersion, by name: any write to
/// any of them changes it.
async fn resource_versions(
    volumes: &Api<LivecloneVolume>,
    snapshots: &Api<LivecloneSnapshot>,
) -> BTreeMap<String, String> {
    let named = |name: String, version: Option<String>| (name, version.unwrap_or_default());
    let mut versions: BTreeMap<String, String> = volumes
        .list(&ListParams::default())
        .await
        .expect("listing volumes")
        .items
        .iter()
        .map(|v| named(v.name_any(), v.resource_version()))
        .collect();
    versions.extend(
        snapshots
            .list(&ListParams::default())
            .await
            .expect("listing snapshots")
            .items
            .iter()
            .map(|s| named(s.name_any(), s.resource_version())),
    );
    versions
}

fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn volume_ready(volume: &LivecloneVolume) -> bool {
    volume.status.as_ref().is_some_and(|s| {
        s.phase == Some(VolumePhase::Ready)
            && s.observed_generation == volume.metadata.generation
            && condition(&s.conditions, READY_CONDITION).is_some_and(|c| c.status == "True")
    })
}

fn abnormal(volume: &LivecloneVolume) -> Option<String> {
    volume
        .status
        .as_ref()
        .and_then(|s| condition(&s.conditions, ABNORMAL_CONDITION))
        .map(|c| c.status.clone())
}

/// Waits until the engine's monitor has the volume stalled and its object
/// shows exactly that: nothing changes after, without progress.
async fn wait_for_stall(
    api: &Api<LivecloneVolume>,
    node: &FakeNode,
    id: &VolumeId,
    what: &str,
) -> LivecloneVolume {
    let engine = Arc::clone(&node.engine);
    let name = id.to_string();
    let id = id.clone();
    wait_for_object(api, &name, what, Duration::from_secs(15), move |v| {
        let shown = v
            .status
            .as_ref()
            .and_then(|s| condition(&s.conditions, ABNORMAL_CONDITION))
            .filter(|c| c.status == "True")
            .map(|c| c.message.clone());
        shown.is_some() && shown == engine.abnormal_condition(&id)
    })
    .await
}

fn new_agent(as_node: &Client, node: &FakeNode) -> NodeAgent {
    NodeAgent::new(
        as_node.clone(),
        Arc::clone(&node.engine),
        NODE.to_owned(),
        NodeAgentConfig {
            resync_interval: Duration::from_millis(200),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            ..NodeAgentConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_agent_makes_and_deletes_volumes_and_snapshots() {
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
    create_namespace(&admin, AGENT_NAMESPACE).await;
    install_rbac_exactly(
        &server,
        &admin,
        "deploy/rbac/node.yaml",
        AGENT_ACCOUNT,
        NODE_AGENT_RULES,
    )
    .await;
    let as_node = server
        .client_impersonating_service_account(AGENT_NAMESPACE, AGENT_ACCOUNT)
        .expect("impersonating the node agent's account");
    // RBAC reaches the authorizer through an informer: wait until the
    // account may list, so that the watches do not start in backoff.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = Api::<LivecloneSnapshot>::all(as_node.clone())
        .list(&ListParams::default())
        .await
    {
        assert!(Instant::now() < deadline, "the account cannot list: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The spec stays the controller's.
    let node_volumes: Api<LivecloneVolume> = Api::all(as_node.clone());
    match node_volumes.get("anything").await {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("get as {AGENT_ACCOUNT}: expected 403, got {other:?}"),
    }

    let node = FakeNode::new(NODE);
    let (stop, stopped) = watch::channel(false);
    let monitor = tokio::spawn(monitor::run(
        Arc::clone(&node.engine),
        MonitorConfig {
            poll_interval: Duration::from_millis(100),
            stall_after: Duration::from_secs(1),
            event_wait: Duration::from_millis(300),
        },
        stopped.clone(),
    ));
    let (stop_first, first_stopped) = watch::channel(false);
    let agent = new_agent(&as_node, &node);
    let first_volumes = agent.volume_metrics();
    let first_agent = tokio::spawn(agent.run(first_stopped));

    let volumes: Api<LivecloneVolume> = Api::all(admin.clone());
    let snapshots: Api<LivecloneSnapshot> = Api::all(admin.clone());

    // Objects that are not this node's: another node's, one labelled for
    // this node whose spec.node is another, and one whose name is not the
    // ID of its spec.name.
    let elsewhere = apply_volume(&volumes, &volume_spec("pvc-elsewhere", "node-b", MIB)).await;
    let mislabelled_spec = volume_spec("pvc-mislabelled", "node-c", MIB);
    let mislabelled = VolumeId::for_name(&mislabelled_spec.name).expect("valid");
    apply_as_controller(
        &volumes,
        mislabelled.as_str(),
        NODE,
        serde_json::to_value(&mislabelled_spec).expect("serializes"),
    )
    .await;
    let misnamed = VolumeId::for_name("pvc-misnamed").expect("valid");
    apply_as_controller(
        &volumes,
        misnamed.as_str(),
        NODE,
        serde_json::to_value(volume_spec("pvc-other-name", NODE, MIB)).expect("serializes"),
    )
    .await;

    // An empty volume.
    let source = apply_volume(&volumes, &volume_spec("pvc-source", NODE, SOURCE_BYTES)).await;
    let object = wait_for_object(
        &volumes,
        source.as_str(),
        "the source volume is Ready",
        Duration::from_secs(20),
        volume_ready,
    )
    .await;
    let status = object.status.clone().expect("a status");
    assert_eq!(status.capacity_bytes, Some(SOURCE_BYTES));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(abnormal(&object).as_deref(), Some("False"));
    let record = node.volume(&source).expect("the engine has the volume");
    assert_eq!(
        (
            record.state,
            record.capacity_bytes,
            record.access,
            record.name.as_str()
        ),
        (
            VolumeState::Ready,
            SOURCE_BYTES,
            AccessKind::Block,
            "pvc-source"
        )
    );
    // Data everywhere (a clone has every region to copy), and a pattern.
    let data = node.pool.path_of(&Storage::Data {
        volume: source.clone(),
        generation: record.generation,
    });
    OpenOptions::new()
        .write(true)
        .open(&data)
        .and_then(|file| {
            file.write_all_at(&vec![0xa5; SOURCE_BYTES as usize], 0)?;
            file.write_all_at(PATTERN, PATTERN_OFFSET)
        })
        .expect("writing the source's data");

    // A clone of it, and one smaller than it.
    let clone_spec = from_source(
        volume_spec("pvc-clone", NODE, SOURCE_BYTES),
        ContentSourceKind::Volume,
        source.as_str(),
    );
    let clone = apply_volume(&volumes, &clone_spec).await;
    let small = apply_volume(
        &volumes,
        &from_source(
            volume_spec("pvc-small", NODE, SOURCE_BYTES / 2),
            ContentSourceKind::Volume,
            source.as_str(),
        ),
    )
    .await;
    wait_for_object(
        &volumes,
        clone.as_str(),
        "the clone is Ready",
        Duration::from_secs(20),
        volume_ready,
    )
    .await;
    let clone_record = node.volume(&clone).expect("the engine has the clone");
    let hydration = clone_record.hydration.clone().expect("the clone hydrates");
    let hidden_image = Storage::Image(hydration.source.clone());
    assert!(
        node.holds_pattern(&hidden_image),
        "the clone reads the source's data"
    );
    let failed = wait_for_object(
        &volumes,
        small.as_str(),
        "the small clone Failed",
        Duration::from_secs(20),
        |v| v.status.as_ref().and_then(|s| s.phase) == Some(VolumePhase::Failed),
    )
    .await;
    let status = failed.status.clone().expect("a status");
    let ready = condition(&status.conditions, READY_CONDITION).expect("Ready");
    eprintln!(
        "the small clone: {} {}: {}",
        ready.status, ready.reason, ready.message
    );
    assert_eq!(
        (ready.status.as_str(), ready.reason.parse::<ErrorCode>()),
        ("False", Ok(ErrorCode::OutOfRange))
    );
    assert_eq!(status.message.as_deref(), Some(ready.message.as_str()));
    assert!(
        ready.message.contains("cannot be smaller"),
        "{}",
        ready.message
    );
    assert_eq!(status.observed_generation, Some(1));
    assert!(node.volume(&small).is_none(), "nothing made for it");
    let misnamed_object = wait_for_object(
        &volumes,
        misnamed.as_str(),
        "the misnamed volume Failed",
        Duration::from_secs(10),
        |v| v.status.as_ref().and_then(|s| s.phase) == Some(VolumePhase::Failed),
    )
    .await;
    let ready = misnamed_object
        .status
        .as_ref()
        .and_then(|s| condition(&s.conditions, READY_CONDITION))
        .expect("Ready");
    assert_eq!(ready.reason, "InvalidArgument");
    for id in [
        &misnamed,
        &VolumeId::for_name("pvc-other-name").expect("valid"),
    ] {
        assert!(
            node.volume(id).is_none(),
            "nothing made for the misnamed object"
        );
    }

    // The clone's copy makes some progress, then none: Abnormal.
    node.fake
        .hydrate(&dm_name(&clone), 1)
        .expect("copying one region");
    let stalled = wait_for_stall(&volumes, &node, &clone, "the stalled clone is Abnormal").await;
    let condition_abnormal = stalled
        .status
        .as_ref()
        .and_then(|s| condition(&s.conditions, ABNORMAL_CONDITION))
        .expect("Abnormal");
    eprintln!(
        "Abnormal: {}: {}",
        condition_abnormal.reason, condition_abnormal.message
    );
    assert_eq!(condition_abnormal.reason, "HydrationStalled");
    assert!(condition_abnormal.message.contains("stalled"));
    assert!(volume_ready(&stalled), "still Ready: {stalled:#?}");

    // Expansion.
    let mut grown_spec = volume_spec("pvc-source", NODE, 2 * SOURCE_BYTES);
    grown_spec.capacity_bytes = 2 * SOURCE_BYTES;
    apply_volume(&volumes, &grown_spec).await;
    let grown = wait_for_object(
        &volumes,
        source.as_str(),
        "the source grew",
        Duration::from_secs(20),
        |v| volume_ready(v) && v.metadata.generation == Some(2),
    )
    .await;
    assert_eq!(
        grown.status.as_ref().and_then(|s| s.capacity_bytes),
        Some(2 * SOURCE_BYTES)
    );
    assert_eq!(
        node.volume(&source).map(|r| r.capacity_bytes),
        Some(2 * SOURCE_BYTES)
    );

    // A snapshot of the source, and a restore of it.
    let snapshot = apply_snapshot(
        &snapshots,
        &LivecloneSnapshotSpec {
            name: "snap-1".to_owned(),
            source_volume: source.to_string(),
            node: NODE.to_owned(),
            access: VolumeAccess::from(AccessKind::Block),
            volume_snapshot: None,
        },
    )
    .await;
    let cut = wait_for_object(
        &snapshots,
        snapshot.as_str(),
        "the snapshot is ready to use",
        Duration::from_secs(20),
        |s| s.status.as_ref().and_then(|s| s.ready_to_use) == Some(true),
    )
    .await;
    let status = cut.status.clone().expect("a status");
    assert_eq!(status.size_bytes, Some(2 * SOURCE_BYTES));
    let snapshot_record = node
        .snapshot(&snapshot)
        .expect("the engine has the snapshot");
    assert_eq!(snapshot_record.state, SnapshotState::Ready);
    assert_eq!(
        status.creation_time,
        liveclone::k8s::time_from_unix_seconds(snapshot_record.created_at)
    );
    assert_eq!(
        condition(&status.conditions, READY_CONDITION).map(|c| c.status.as_str()),
        Some("True")
    );
    let restore = apply_volume(
        &volumes,
        &from_source(
            volume_spec("pvc-restore", NODE, 2 * SOURCE_BYTES),
            ContentSourceKind::Snapshot,
            snapshot.as_str(),
        ),
    )
    .await;
    wait_for_object(
        &volumes,
        restore.as_str(),
        "the restore is Ready",
        Duration::from_secs(20),
        volume_ready,
    )
    .await;
    let restore_hydration = node
        .volume(&restore)
        .and_then(|r| r.hydration)
        .expect("the restore hydrates");
    assert_eq!(restore_hydration.source, snapshot);

    // A permanent failure is not retried until the spec changes, and has
    // its Warning Event.
    let calls = first_volumes.engine_calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        first_volumes.engine_calls(),
        calls,
        "engine calls while settled"
    );
    let events: Api<Event> = Api::namespaced(admin.clone(), "default");
    let listed = events
        .list(&ListParams::default())
        .await
        .expect("listing Events");
    let warnings: Vec<&Event> = listed
        .items
        .iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.name.as_deref() == Some(small.as_str()))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0].reason.as_deref(), Some(PROVISIONING_FAILED));
    assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    assert_eq!(
        warnings[0].reporting_controller.as_deref(),
        Some(REPORTING_CONTROLLER)
    );
    assert!(warnings[0]
        .note
        .as_deref()
        .is_some_and(|n| n.contains("cannot be smaller")));

    // A restarted agent finds everything as it left it: no engine call, no
    // status write. (Both copies stand still, so their health is settled.)
    wait_for_stall(&volumes, &node, &clone, "the clone is still stalled").await;
    wait_for_stall(&volumes, &node, &restore, "the restore is stalled").await;
    eprintln!("--- kubectl get lcvol,lcsnap -o wide ---");
    kubectl_table(&server, &["get", "lcvol", "-o", "wide"]);
    kubectl_table(&server, &["get", "lcsnap"]);
    stop_first.send(true).expect("stopping the first agent");
    tokio::time::timeout(Duration::from_secs(10), first_agent)
        .await
        .expect("the first agent stops")
        .expect("the first agent ran");
    let before = resource_versions(&volumes, &snapshots).await;
    let agent = new_agent(&as_node, &node);
    let (volume_metrics, snapshot_metrics) = (agent.volume_metrics(), agent.snapshot_metrics());
    let agent = tokio::spawn(agent.run(stopped.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = resource_versions(&volumes, &snapshots).await;
    assert_eq!(after, before, "objects changed after the restart");
    for (kind, metrics) in [("volume", &volume_metrics), ("snapshot", &snapshot_metrics)] {
        assert_eq!(
            (metrics.engine_calls(), metrics.status_writes()),
            (0, 0),
            "{kind} work repeated after the restart"
        );
    }

    // Deleting the source while its clone hydrates, and the snapshot while
    // the restore hydrates: both go at once; the data the clones read stays.
    for result in [
        volumes
            .delete(source.as_str(), &DeleteParams::default())
            .await
            .map(drop),
        snapshots
            .delete(snapshot.as_str(), &DeleteParams::default())
            .await
            .map(drop),
    ] {
        result.expect("deleting");
    }
    wait_until_gone(
        &volumes,
        source.as_str(),
        "the source is gone",
        Duration::from_secs(20),
    )
    .await;
    wait_until_gone(
        &snapshots,
        snapshot.as_str(),
        "the snapshot is gone",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        node.volume(&source).is_none(),
        "the source's record is gone"
    );
    assert!(
        node.engine
            .list_snapshots()
            .expect("listing snapshots")
            .is_empty(),
        "the snapshot is deleted for the CO"
    );
    assert!(
        node.holds_pattern(&hidden_image),
        "the clone's source data is kept while it copies"
    );
    assert!(
        node.pool
            .exists(&Storage::Image(snapshot.clone()))
            .expect("checking the pool"),
        "the restore's source image is kept while it copies"
    );
    // The copies finish; the agent reports the clone healthy again.
    for id in [&clone, &restore] {
        node.hydrate_all(id);
    }
    wait_for("both copies complete", Duration::from_secs(20), || {
        [&clone, &restore]
            .iter()
            .all(|id| node.volume(id).is_some_and(|r| r.hydration.is_none()))
    })
    .await;
    wait_for_object(
        &volumes,
        clone.as_str(),
        "the clone is healthy again",
        Duration::from_secs(10),
        |v| volume_ready(v) && abnormal(v).as_deref() == Some("False"),
    )
    .await;
    wait_for(
        "the sources' images are released",
        Duration::from_secs(20),
        || {
            [&hidden_image, &Storage::Image(snapshot.clone())]
                .iter()
                .all(|image| !node.pool.exists(image).expect("checking the pool"))
        },
    )
    .await;
    assert!(node.fake.hazards().is_empty(), "{:?}", node.fake.hazards());

    // Deleting the rest removes their storage.
    for id in [&clone, &restore, &small, &misnamed] {
        volumes
            .delete(id.as_str(), &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("deleting {id}: {e}"));
    }
    for id in [&clone, &restore, &small, &misnamed] {
        wait_until_gone(&volumes, id.as_str(), "deleted", Duration::from_secs(20)).await;
        assert!(node.volume(id).is_none(), "{id} is still on the node");
    }
    assert!(
        node.engine
            .list_volumes()
            .expect("listing volumes")
            .is_empty(),
        "volumes left on the node"
    );
    assert!(volume_metrics.finalizers_removed() >= 5);

    // Not this node's: no status, no storage, finalizers left alone.
    for id in [&elsewhere, &mislabelled] {
        let object = volumes.get(id.as_str()).await.expect("still there");
        assert_eq!(object.status, None, "{id} is not this node's");
        assert!(node.volume(id).is_none());
    }

    stop.send(true).expect("stopping");
    for (what, task) in [("agent", agent), ("monitor", monitor)] {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("the {what} did not stop"))
            .unwrap_or_else(|e| panic!("the {what} failed: {e}"));
    }
    server.stop().expect("stopping the server");
}
