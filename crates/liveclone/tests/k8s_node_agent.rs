//! The node agent's hydration reconciler against a real kube-apiserver (and
//! etcd) on loopback, with a real engine over the OS simulator: a clone made
//! by the engine hydrates as the test advances the simulated copy, and the
//! agent, running as the service account of deploy/rbac/node.yaml, must
//! publish its VolumeHydration's status (rate-limited), act on edits of the
//! spec (pause, resume, tunables, invalid tunables) and publish Events on
//! the VolumeHydration and its claim.
//!
//! Needs the tools from `tests/tools/build-k8s-tools.sh`; fails (does not
//! skip) without them:
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_node_agent -- --nocapture
//!
//! `--nocapture` shows `kubectl get vh` mid-hydration and at the end.

mod k8s_common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_common::{
    create_namespace, install_crds, install_rbac_exactly, kubectl_table, meta, row, start,
    FakeNode, NODE_AGENT_RULES,
};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use kubetest::ApiServer;
use liveclone::domain::engine::{dm_name, CapacityRange, CreateVolume};
use liveclone::domain::hydration::HydrationPhase;
use liveclone::domain::ids::VolumeId;
use liveclone::domain::model::{
    AccessKind, ContentSource, HydrationRecord, HydrationStage, VolumeRecord,
};
use liveclone::domain::monitor::{self, MonitorConfig};
use liveclone::domain::pool::Storage;
use liveclone::k8s::hydration::condition;
use liveclone::k8s::node::{HydrationAgent, HydrationAgentConfig, REPORTING_CONTROLLER};
use liveclone::k8s::{
    node_label_value, HydrationDestination, HydrationSource, SourceKind, VolumeHydration,
    VolumeHydrationSpec, VolumeHydrationStatus, NODE_LABEL,
};
use liveclone::os::dm::DmName;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;

const MIB: u64 = 1 << 20;
/// 256 regions of 64 KiB: enough for every step below at the trickle's
/// pace before the test finishes the copy itself.
const SOURCE_BYTES: u64 = 16 * MIB;
const REGION_BYTES: u64 = 64 << 10;
const NODE: &str = "node-a";
const NS: &str = "lc-agent";
const AGENT_NAMESPACE: &str = "liveclone";
const AGENT_ACCOUNT: &str = "liveclone-node";
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Watch delivery jitter allowed when checking the interval between writes.
const SLACK: Duration = Duration::from_millis(250);

impl FakeNode {
    /// A block volume full of data (no holes: a clone of it has every
    /// region to copy), and a clone of it with 64 KiB regions.
    fn source_and_clone(&self) -> (VolumeRecord, VolumeRecord) {
        let source = self
            .engine
            .create_volume(CreateVolume {
                name: "source".to_owned(),
                capacity: CapacityRange {
                    required_bytes: SOURCE_BYTES,
                    limit_bytes: 0,
                },
                access: AccessKind::Block,
                source: None,
                parameters: BTreeMap::new(),
            })
            .expect("creating the source volume");
        let data = self.pool.path_of(&Storage::Data {
            volume: source.id.clone(),
            generation: source.generation,
        });
        OpenOptions::new()
            .write(true)
            .open(&data)
            .and_then(|file| file.write_all_at(&vec![0xa5; SOURCE_BYTES as usize], 0))
            .expect("writing the source's data");
        let clone = self
            .engine
            .create_volume(CreateVolume {
                name: "clone".to_owned(),
                capacity: CapacityRange {
                    required_bytes: 0,
                    limit_bytes: 0,
                },
                access: AccessKind::Block,
                source: Some(ContentSource::Volume(source.id.clone())),
                parameters: BTreeMap::from([(
                    "liveclone.io/regionSize".to_owned(),
                    "64KiB".to_owned(),
                )]),
            })
            .expect("cloning the source");
        (source, clone)
    }

    fn hydration(&self, id: &VolumeId) -> Option<HydrationRecord> {
        self.engine
            .volume(id)
            .expect("reading the volume record")
            .expect("the volume exists")
            .hydration
    }

    /// Bytes the simulated kernel has copied so far.
    fn hydrated(&self, name: &DmName) -> u64 {
        self.engine
            .os()
            .dm
            .clone_status(name)
            .expect("clone status")
            .hydrated_bytes()
            .expect("an active clone")
    }
}

fn hydration_object(
    name: &str,
    node: &str,
    label: &str,
    source: &str,
    clone: &str,
) -> VolumeHydration {
    let mut vh = VolumeHydration::new(
        name,
        VolumeHydrationSpec {
            pvc: "clone".to_owned(),
            source: HydrationSource {
                kind: SourceKind::PersistentVolumeClaim,
                name: "data".to_owned(),
                namespace: None,
                volume_handle: Some(source.to_owned()),
                snapshot_handle: None,
            },
            destination: HydrationDestination {
                volume_handle: clone.to_owned(),
                persistent_volume_name: "pvc-clone".to_owned(),
            },
            node: node.to_owned(),
            tunables: None,
            paused: false,
        },
    );
    vh.metadata.namespace = Some(NS.to_owned());
    vh.metadata.labels = Some(BTreeMap::from([(
        NODE_LABEL.to_owned(),
        node_label_value(label),
    )]));
    vh
}

fn claim() -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: meta("clone", Some(NS)),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity("16Mi".to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            data_source: Some(TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".to_owned(),
                name: "data".to_owned(),
            }),
            storage_class_name: Some("liveclone".to_owned()),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// Applies deploy/rbac/node.yaml and checks that its ClusterRole grants
/// exactly what the node agent needs.
async fn install_node_rbac(server: &ApiServer, admin: &Client) {
    create_namespace(admin, AGENT_NAMESPACE).await;
    install_rbac_exactly(
        server,
        admin,
        "deploy/rbac/node.yaml",
        AGENT_ACCOUNT,
        NODE_AGENT_RULES,
    )
    .await;
}

/// Polls the VolumeHydration until `check` accepts its status.
async fn wait_for_status(
    api: &Api<VolumeHydration>,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&VolumeHydration, &VolumeHydrationStatus) -> bool,
) -> (VolumeHydration, VolumeHydrationStatus) {
    let started = Instant::now();
    loop {
        let vh = api.get(name).await.expect("reading the VolumeHydration");
        if let Some(status) = vh.status.clone() {
            if check(&vh, &status) {
                eprintln!(
                    "{what}: after {:.1} s (phase {:?}, progress {:?}, observedGeneration {:?})",
                    started.elapsed().as_secs_f64(),
                    status.phase,
                    status.progress,
                    status.observed_generation
                );
                return (vh, status);
            }
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; the status is {:#?}",
            vh.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` (on the engine) until it holds.
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

fn find_condition<'a>(
    status: &'a VolumeHydrationStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status:#?}"))
}

async fn merge_spec(api: &Api<VolumeHydration>, name: &str, spec: serde_json::Value) -> i64 {
    let patched = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap_or_else(|e| panic!("patching the spec with {spec}: {e}"));
    eprintln!(
        "spec patched with {spec}: generation {:?}",
        patched.metadata.generation
    );
    patched.metadata.generation.expect("a generation")
}

/// Every distinct status the object went through, with when the watch
/// delivered it.
type Seen = Arc<Mutex<Vec<(Instant, VolumeHydrationStatus)>>>;

fn record_statuses(api: Api<VolumeHydration>, name: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let stream = watcher(api, config).applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let Ok(vh) = item else {
                    continue;
                };
                let Some(status) = vh.status else {
                    continue;
                };
                let mut seen = seen.lock().expect("the status log");
                if seen.last().map(|(_, s)| s) != Some(&status) {
                    seen.push((Instant::now(), status));
                }
            }
        })
    };
    (seen, task)
}

/// The kubectl row of the clone, printed for the closing note.
fn show_hydrations(server: &ApiServer, when: &str) -> BTreeMap<String, String> {
    eprintln!("--- kubectl get vh, {when} ---");
    let (_, rows) = kubectl_table(server, &["get", "vh", "-n", NS]);
    row(&rows, "clone").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_reflects_and_controls_a_hydration() {
    // The agent's logs, one span per volume (RUST_LOG overrides).
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
    create_namespace(&admin, NS).await;
    install_node_rbac(&server, &admin).await;

    let node = FakeNode::new(NODE);
    let (source, clone) = node.source_and_clone();
    let dm = dm_name(&clone.id);
    let total_regions = SOURCE_BYTES / REGION_BYTES;
    assert_eq!(
        clone
            .hydration
            .as_ref()
            .map(|h| (h.stage, h.region_sectors * 512)),
        Some((HydrationStage::Enabled, REGION_BYTES)),
        "a clone with 64 KiB regions whose copy is enabled"
    );
    assert_eq!(node.hydrated(&dm), 0, "nothing copied yet");

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(admin.clone(), NS);
    let claim = claims
        .create(&PostParams::default(), &claim())
        .await
        .expect("creating the clone's claim");
    let hydrations: Api<VolumeHydration> = Api::namespaced(admin.clone(), NS);
    let (source_id, clone_id) = (source.id.as_str(), clone.id.as_str());
    for vh in [
        hydration_object("clone", NODE, NODE, source_id, clone_id),
        // Another node's, and one labelled for this node but meant for
        // another: neither may get a status from this agent.
        hydration_object("elsewhere", "node-b", "node-b", source_id, clone_id),
        hydration_object("mislabelled", "node-c", NODE, source_id, clone_id),
    ] {
        hydrations
            .create(&PostParams::default(), &vh)
            .await
            .expect("creating a VolumeHydration");
    }

    // The agent runs as the service account of deploy/rbac/node.yaml.
    // RBAC reaches the authorizer through an informer: wait until the
    // account may list, so that the agent's watch does not start in backoff.
    let as_node = server
        .client_impersonating_service_account(AGENT_NAMESPACE, AGENT_ACCOUNT)
        .expect("impersonating the node agent's account");
    let node_view: Api<VolumeHydration> = Api::all(as_node.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = node_view.list(&ListParams::default()).await {
        assert!(Instant::now() < deadline, "the account cannot list: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And it may do nothing else with them.
    let scoped: Api<VolumeHydration> = Api::namespaced(as_node.clone(), NS);
    for (what, result) in [
        ("get", scoped.get("clone").await.map(drop)),
        (
            "spec patch",
            scoped
                .patch(
                    "clone",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"paused": true}})),
                )
                .await
                .map(drop),
        ),
    ] {
        match result {
            Err(kube::Error::Api(status)) if status.code == 403 => {
                eprintln!("{what} as {AGENT_ACCOUNT}: 403 as expected")
            }
            other => panic!("{what} as {AGENT_ACCOUNT}: expected 403, got {other:?}"),
        }
    }

    let (seen, recorder) = record_statuses(hydrations.clone(), "clone");
    let (stop, stopped) = watch::channel(false);
    let new_agent = || {
        HydrationAgent::new(
            as_node.clone(),
            Arc::clone(&node.engine),
            NODE.to_owned(),
            HydrationAgentConfig {
                status_interval: STATUS_INTERVAL,
                resync_interval: Duration::from_millis(100),
                ..HydrationAgentConfig::default()
            },
        )
    };
    let (stop_first, first_stopped) = watch::channel(false);
    let agent = new_agent();
    let first_metrics = agent.metrics();
    let first_agent = tokio::spawn(agent.run(first_stopped));

    // Before the monitor has read the clone: Pending, without counts.
    let (_, pending) = wait_for_status(
        &hydrations,
        "clone",
        "Pending before the monitor runs",
        Duration::from_secs(15),
        |_, s| s.phase.is_some(),
    )
    .await;
    assert_eq!(pending.phase, Some(HydrationPhase::Pending));
    assert_eq!(pending.total_bytes, Some(SOURCE_BYTES));
    assert_eq!(pending.hydrated_bytes, None);
    assert_eq!(pending.started_at, None, "not started yet");
    assert_eq!(pending.observed_generation, Some(1));

    let monitor = tokio::spawn(monitor::run(
        Arc::clone(&node.engine),
        MonitorConfig {
            poll_interval: Duration::from_millis(100),
            stall_after: Duration::from_secs(2),
            event_wait: Duration::from_millis(500),
        },
        stopped.clone(),
    ));
    // The simulated copy: one region every 150 ms while `trickling`.
    let trickling = Arc::new(AtomicBool::new(true));
    let trickle = {
        let (fake, dm, trickling) = (node.fake.clone(), dm.clone(), Arc::clone(&trickling));
        tokio::spawn(async move {
            loop {
                if trickling.load(Ordering::SeqCst) {
                    // Fails once the device is linear; the test stops first.
                    let _ = fake.hydrate(&dm, 1);
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };

    let (_, hydrating) = wait_for_status(
        &hydrations,
        "clone",
        "Hydrating with bytes copied",
        Duration::from_secs(10),
        |_, s| s.phase == Some(HydrationPhase::Hydrating) && s.hydrated_bytes.unwrap_or(0) > 0,
    )
    .await;
    assert_eq!(hydrating.total_bytes, Some(SOURCE_BYTES));
    assert_eq!(
        find_condition(&hydrating, condition::PROGRESSING).status,
        "True"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mid = show_hydrations(&server, "mid-hydration");
    assert_eq!(mid["PHASE"], "Hydrating");
    assert_eq!(mid["NODE"], NODE);
    assert!(mid["PROGRESS"].ends_with('%'), "{mid:?}");
    // Pause through the spec: the engine's record and the simulated kernel
    // stop within seconds, and the status says so, with exactly the bytes
    // the engine counted.
    let generation = merge_spec(&hydrations, "clone", json!({"paused": true})).await;
    wait_for("the engine paused", Duration::from_secs(5), || {
        node.hydration(&clone.id).is_some_and(|h| h.paused)
    })
    .await;
    let before = node.hydrated(&dm);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(node.hydrated(&dm), before, "no copying while paused");
    let (_, paused) = wait_for_status(
        &hydrations,
        "clone",
        "the status shows the pause",
        Duration::from_secs(5),
        |_, s| {
            s.rate.as_deref() == Some("paused")
                && s.observed_generation == Some(generation)
                && s.hydrated_bytes == Some(before)
        },
    )
    .await;
    assert!(before > 0 && before < SOURCE_BYTES, "{before}");
    assert_eq!(paused.total_bytes, Some(SOURCE_BYTES));
    let percent = paused.percent.expect("percent");
    assert!(
        (percent - before as f64 * 100.0 / SOURCE_BYTES as f64).abs() < 1e-9,
        "{percent} for {before}"
    );
    assert_eq!(paused.eta, None);
    assert_eq!(
        find_condition(&paused, condition::PROGRESSING).reason,
        "HydrationPaused"
    );
    // Nothing changes while paused, so nothing is written.
    let writes = first_metrics.status_writes(NS, "clone");
    tokio::time::sleep(STATUS_INTERVAL * 2 + Duration::from_millis(500)).await;
    assert_eq!(
        first_metrics.status_writes(NS, "clone"),
        writes,
        "writes while nothing changed"
    );
    let generation = merge_spec(&hydrations, "clone", json!({"paused": false})).await;
    wait_for("the engine resumed", Duration::from_secs(5), || {
        node.hydration(&clone.id).is_some_and(|h| !h.paused)
    })
    .await;
    wait_for("copying again", Duration::from_secs(5), || {
        node.hydrated(&dm) > before
    })
    .await;
    wait_for_status(
        &hydrations,
        "clone",
        "the status shows the resume",
        Duration::from_secs(5),
        |_, s| s.rate.as_deref() != Some("paused") && s.observed_generation == Some(generation),
    )
    .await;

    // Tunables the CRD accepts but the clone's region size does not: at
    // most 256 MiB in flight is 4096 regions of 64 KiB.
    let tuned_before = node.hydration(&clone.id).expect("hydrating");
    let generation = merge_spec(
        &hydrations,
        "clone",
        json!({"tunables": {"hydrationThreshold": 5000}}),
    )
    .await;
    let (_, invalid) = wait_for_status(
        &hydrations,
        "clone",
        "Degraded for invalid tunables",
        Duration::from_secs(5),
        |_, s| s.observed_generation == Some(generation),
    )
    .await;
    let degraded = find_condition(&invalid, condition::DEGRADED);
    eprintln!(
        "Degraded: {} {}: {}",
        degraded.status, degraded.reason, degraded.message
    );
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "InvalidTunables");
    assert!(
        degraded
            .message
            .contains("at most 4096 regions at this region size"),
        "{}",
        degraded.message
    );
    assert_eq!(
        invalid.phase,
        Some(HydrationPhase::Hydrating),
        "the copy goes on"
    );
    let still = node.hydration(&clone.id).expect("hydrating");
    assert_eq!(
        (still.threshold, still.batch_size),
        (tuned_before.threshold, tuned_before.batch_size),
        "invalid tunables change nothing"
    );
    let generation = merge_spec(
        &hydrations,
        "clone",
        json!({"tunables": {"hydrationThreshold": 128, "hydrationBatchSize": 32}}),
    )
    .await;
    wait_for("the engine tuned", Duration::from_secs(5), || {
        node.hydration(&clone.id)
            .is_some_and(|h| (h.threshold, h.batch_size) == (128, 32))
    })
    .await;
    let (_, fixed) = wait_for_status(
        &hydrations,
        "clone",
        "Degraded cleared",
        Duration::from_secs(5),
        |_, s| s.observed_generation == Some(generation),
    )
    .await;
    assert_eq!(find_condition(&fixed, condition::DEGRADED).status, "False");

    // A stall (nothing copied for the monitor's 2 s), then progress again.
    trickling.store(false, Ordering::SeqCst);
    let (_, stalled) = wait_for_status(
        &hydrations,
        "clone",
        "Stalled",
        Duration::from_secs(10),
        |_, s| s.phase == Some(HydrationPhase::Stalled),
    )
    .await;
    let degraded = find_condition(&stalled, condition::DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "HydrationStalled")
    );
    assert_eq!(stalled.hydrated_bytes, Some(node.hydrated(&dm)));
    trickling.store(true, Ordering::SeqCst);
    wait_for_status(
        &hydrations,
        "clone",
        "Hydrating again after the stall",
        Duration::from_secs(10),
        |_, s| s.phase == Some(HydrationPhase::Hydrating),
    )
    .await;

    // A restarted agent carries on from the object's status: no Pending
    // again, no second HydrationStarted. (The pause keeps the first write
    // of the new agent at least one interval after the old one's last.)
    stop_first.send(true).expect("stopping the first agent");
    tokio::time::timeout(Duration::from_secs(10), first_agent)
        .await
        .expect("the first agent stops")
        .expect("the first agent ran");
    tokio::time::sleep(STATUS_INTERVAL).await;
    let agent = new_agent();
    let metrics = agent.metrics();
    let agent = tokio::spawn(agent.run(stopped.clone()));
    wait_for(
        "the second agent's first write",
        Duration::from_secs(10),
        || metrics.total_status_writes() >= 1,
    )
    .await;

    // The rest of the copy at once; the monitor switches the device.
    trickling.store(false, Ordering::SeqCst);
    trickle.abort();
    let copied = node
        .fake
        .hydrate(&dm, total_regions)
        .expect("hydrating the rest");
    assert_eq!(copied, total_regions, "regions copied in all");
    let (vh, complete) = wait_for_status(
        &hydrations,
        "clone",
        "Complete",
        Duration::from_secs(15),
        |_, s| s.phase == Some(HydrationPhase::Complete),
    )
    .await;
    let end = show_hydrations(&server, "complete");
    assert_eq!(end["PHASE"], "Complete");
    assert_eq!(end["PROGRESS"], "100.0%");
    eprintln!("--- kubectl get vh -o wide ---");
    kubectl_table(&server, &["get", "vh", "-n", NS, "-o", "wide"]);
    assert_eq!(complete.hydrated_bytes, Some(SOURCE_BYTES));
    assert_eq!(complete.total_bytes, Some(SOURCE_BYTES));
    assert_eq!(complete.percent, Some(100.0));
    assert_eq!(complete.progress.as_deref(), Some("100.0%"));
    assert!(complete.started_at.is_some() && complete.completed_at.is_some());
    assert_eq!(complete.observed_generation, vh.metadata.generation);
    for (type_, want, reason) in [
        (condition::READY, "True", "HydrationComplete"),
        (condition::PROGRESSING, "False", "HydrationComplete"),
        (condition::DEGRADED, "False", "AsExpected"),
    ] {
        let c = find_condition(&complete, type_);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (want, reason),
            "{c:?}"
        );
    }
    assert!(
        node.hydration(&clone.id).is_none(),
        "the record says independent"
    );

    // Complete is final: no more writes.
    let second_writes = metrics.status_writes(NS, "clone");
    let writes = first_metrics.status_writes(NS, "clone") + second_writes;
    let version = vh.resource_version();
    tokio::time::sleep(STATUS_INTERVAL * 3).await;
    assert_eq!(
        metrics.status_writes(NS, "clone"),
        second_writes,
        "writes after Complete"
    );
    let after = hydrations
        .get("clone")
        .await
        .expect("reading the VolumeHydration");
    assert_eq!(after.resource_version(), version);

    // The rate limit, as the API server saw it: between two writes of the
    // same phase, at least the interval.
    let seen = seen.lock().expect("the status log").clone();
    recorder.abort();
    let phases: Vec<_> = seen.iter().map(|(_, s)| s.phase).collect();
    assert!(
        !phases
            .iter()
            .skip_while(|p| **p == Some(HydrationPhase::Pending))
            .any(|p| *p == Some(HydrationPhase::Pending)),
        "never back to Pending: {phases:?}"
    );
    let mut phase_changes = 0;
    for pair in seen.windows(2) {
        let ((t0, s0), (t1, s1)) = (&pair[0], &pair[1]);
        let gap = t1.saturating_duration_since(*t0);
        if s0.phase != s1.phase {
            phase_changes += 1;
            continue;
        }
        assert!(
            gap + SLACK >= STATUS_INTERVAL,
            "two {:?} writes {gap:?} apart: {s0:#?} then {s1:#?}",
            s1.phase
        );
    }
    let span = seen
        .last()
        .zip(seen.first())
        .map(|((last, _), (first, _))| last.saturating_duration_since(*first))
        .unwrap_or_default();
    eprintln!(
        "{} status writes by the two agents ({} seen by a watch, {} phase changes) over \
         {:.1} s, at most one per {:?} otherwise; {} write errors",
        writes,
        seen.len(),
        phase_changes,
        span.as_secs_f64(),
        STATUS_INTERVAL,
        first_metrics.status_write_errors() + metrics.status_write_errors()
    );
    assert_eq!(writes, seen.len() as u64, "each write is one status change");
    let bound = (span.as_secs_f64() / STATUS_INTERVAL.as_secs_f64()).ceil() as u64
        + phase_changes as u64
        + 1;
    assert!(writes <= bound, "{writes} writes, at most {bound} allowed");
    assert!(
        writes >= 5,
        "progress is published while it moves: {writes}"
    );

    // Events, on the VolumeHydration and on the claim (with its UID, so
    // that `kubectl describe pvc` shows them).
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    let listed = events
        .list(&ListParams::default())
        .await
        .expect("listing Events");
    let out = server
        .kubectl_output([
            "get",
            "events",
            "-n",
            NS,
            "--sort-by=.metadata.creationTimestamp",
        ])
        .expect("kubectl get events");
    eprintln!("$ kubectl get events -n {NS}\n{out}");
    for (kind, uid) in [
        ("VolumeHydration", vh.uid()),
        ("PersistentVolumeClaim", claim.uid()),
    ] {
        let reasons: BTreeMap<String, &Event> = listed
            .items
            .iter()
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some(kind)
                        && r.name.as_deref() == Some("clone")
                        && r.uid == uid
                })
            })
            .filter_map(|e| e.reason.clone().map(|reason| (reason, e)))
            .collect();
        for reason in [
            "HydrationStarted",
            "HydrationStalled",
            "HydrationResumed",
            "HydrationComplete",
        ] {
            let event = reasons
                .get(reason)
                .unwrap_or_else(|| panic!("no {reason} Event on the {kind}: {reasons:?}"));
            assert_eq!(
                event.reporting_controller.as_deref(),
                Some(REPORTING_CONTROLLER)
            );
            assert_eq!(event.reporting_instance.as_deref(), Some(NODE));
            let want = if reason == "HydrationStalled" {
                "Warning"
            } else {
                "Normal"
            };
            assert_eq!(event.type_.as_deref(), Some(want), "{reason}");
            assert!(
                event.note.as_deref().is_some_and(|n| !n.is_empty()),
                "{reason} has a message"
            );
        }
        let started = reasons["HydrationStarted"].note.clone().unwrap_or_default();
        assert!(
            started.contains(&format!(
                "Copying PersistentVolumeClaim data into volume {clone_id}"
            )),
            "{started}"
        );
        assert!(!reasons.contains_key("HydrationFailed"));
    }
    // Each Event on two objects; the second agent repeats none of the first's.
    assert_eq!(first_metrics.events("HydrationStarted"), 2);
    assert_eq!(first_metrics.events("HydrationResumed"), 2);
    assert_eq!(metrics.events("HydrationStarted"), 0);
    assert_eq!(metrics.events("HydrationResumed"), 0);
    assert_eq!(metrics.events("HydrationComplete"), 2);

    for name in ["elsewhere", "mislabelled"] {
        let other = hydrations
            .get(name)
            .await
            .expect("reading a VolumeHydration");
        assert_eq!(other.status, None, "{name} is not this node's");
    }
    assert!(node.fake.hazards().is_empty(), "{:?}", node.fake.hazards());

    stop.send(true).expect("stopping");
    for (what, task) in [("agent", agent), ("monitor", monitor)] {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("the {what} did not stop"))
            .unwrap_or_else(|e| panic!("the {what} failed: {e}"));
    }
    server.stop().expect("stopping the server");
}
