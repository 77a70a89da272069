//! The kubectl plugin (`kubectl-liveclone`, the real binary) against a real
//! kube-apiserver (and etcd) on loopback: the CRDs installed as users do,
//! claims, volumes, VolumeHydrations, LivecloneNodes and Events made the
//! way the agents and provisioners would leave them, and the plugin run
//! with the server's kubeconfig. The assertions are on its output, its exit
//! codes, and the objects it writes (paused flipped, tunables set and
//! cleared, re-runs without conflicts).
//!
//! Needs the tools from `tests/tools/build-k8s-tools.sh`; fails (does not
//! skip) without them:
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_kubectl_plugin -- --nocapture

mod k8s_common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_common::{create_namespace, install_crds, meta, start};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Event, Node, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeSpec,
    TypedLocalObjectReference, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kubetest::ApiServer;
use liveclone::domain::hydration::HydrationPhase;
use liveclone::domain::ids::VolumeId;
use liveclone::k8s::{
    HydrationDestination, HydrationSource, HydrationTunablesSpec, LivecloneNode, LivecloneNodeSpec,
    LivecloneNodeStatus, LivecloneVolume, LivecloneVolumeSpec, LivecloneVolumeStatus, ObjectName,
    SourceKind, VolumeAccess, VolumeHydration, VolumeHydrationSpec, VolumeHydrationStatus,
    VolumePhase,
};
use serde_json::json;

const MIB: u64 = 1 << 20;
const NODE: &str = "node-a";
const CLASS: &str = "liveclone";
const DRIVER: &str = "csi.liveclone.io";

/// Runs the plugin with the server's admin kubeconfig; stdout, stderr and
/// the exit code. Nothing from the caller's environment points it
/// elsewhere: KUBECONFIG is removed and HOME is a folder without a config.
fn plugin(server: &ApiServer, args: &[&str]) -> (i32, String, String) {
    let output = plugin_command(server, args)
        .output()
        .unwrap_or_else(|e| panic!("running kubectl-liveclone {}: {e}", args.join(" ")));
    report(args, output)
}

fn plugin_command(server: &ApiServer, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubectl-liveclone"));
    command
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HOME", server.dir())
        .stdin(Stdio::null());
    command
}

fn report(args: &[&str], output: Output) -> (i32, String, String) {
    let code = output.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!(
        "$ kubectl liveclone {}  (exit {code})\n{stdout}{}",
        args.join(" "),
        if stderr.is_empty() {
            String::new()
        } else {
            format!("stderr: {stderr}")
        }
    );
    (code, stdout, stderr)
}

fn time(seconds_ago: i64) -> Time {
    let now = Timestamp::now().as_second();
    Time(Timestamp::from_second(now - seconds_ago).expect("in range"))
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: time(60),
        observed_generation: None,
    }
}

async fn storage_class(client: &Client, name: &str, provisioner: &str) {
    let class = StorageClass {
        metadata: meta(name, None),
        provisioner: provisioner.to_owned(),
        volume_binding_mode: Some("WaitForFirstConsumer".to_owned()),
        ..StorageClass::default()
    };
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap_or_else(|e| panic!("creating StorageClass {name}: {e}"));
}

/// The node, as the kubelet and the node agent would have registered it.
async fn live_node(client: &Client) {
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &Node {
                metadata: meta(NODE, None),
                ..Node::default()
            },
        )
        .await
        .expect("creating the Node");
    let lcnode = LivecloneNode::new(NODE, LivecloneNodeSpec {});
    let api = Api::<LivecloneNode>::all(client.clone());
    api.create(&PostParams::default(), &lcnode)
        .await
        .expect("creating the LivecloneNode");
    let status = LivecloneNodeStatus {
        observed_time: Some(time(5)),
        publish_interval_seconds: Some(30),
        ..LivecloneNodeStatus::default()
    };
    api.patch_status(
        NODE,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .expect("writing the LivecloneNode's status");
}

/// A clone claim in `ns` named `clone`, from claim `data`; bound (with its
/// PersistentVolume) when `bound`.
async fn clone_claim(
    client: &Client,
    ns: &str,
    class: &str,
    bound: Option<&VolumeId>,
) -> PersistentVolumeClaim {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let claim = PersistentVolumeClaim {
        metadata: meta("clone", Some(ns)),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity("1Gi".to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            data_source: Some(TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".to_owned(),
                name: "data".to_owned(),
            }),
            storage_class_name: Some(class.to_owned()),
            volume_name: bound.map(|_| format!("pv-{ns}")),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    let claim = claims
        .create(&PostParams::default(), &claim)
        .await
        .unwrap_or_else(|e| panic!("creating claim {ns}/clone: {e}"));
    let Some(id) = bound else {
        return claim;
    };
    let volume = PersistentVolume {
        metadata: meta(&format!("pv-{ns}"), None),
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity("1Gi".to_owned()),
            )])),
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER.to_owned(),
                volume_handle: id.to_string(),
                ..CSIPersistentVolumeSource::default()
            }),
            storage_class_name: Some(class.to_owned()),
            claim_ref: Some(ObjectReference {
                namespace: Some(ns.to_owned()),
                name: Some("clone".to_owned()),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        ..PersistentVolume::default()
    };
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &volume)
        .await
        .unwrap_or_else(|e| panic!("creating the PV of {ns}/clone: {e}"));
    // No PV controller runs: bind the claim's status as it would.
    claims
        .patch_status(
            "clone",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "phase": "Bound" } })),
        )
        .await
        .unwrap_or_else(|e| panic!("binding {ns}/clone: {e}"))
}

/// The clone's LivecloneVolume, Ready on the node.
async fn liveclone_volume(client: &Client, ns: &str, id: &VolumeId) {
    let api = Api::<LivecloneVolume>::all(client.clone());
    let volume = LivecloneVolume::new(
        id.as_str(),
        LivecloneVolumeSpec {
            name: format!("pvc-{ns}"),
            node: NODE.to_owned(),
            capacity_bytes: 1 << 30,
            access: VolumeAccess {
                mode: liveclone::k8s::AccessMode::Block,
                fs_type: None,
            },
            content_source: None,
            parameters: BTreeMap::new(),
            claim: Some(ObjectName {
                namespace: ns.to_owned(),
                name: "clone".to_owned(),
            }),
            pool: "file".to_owned(),
        },
    );
    api.create(&PostParams::default(), &volume)
        .await
        .unwrap_or_else(|e| panic!("creating LivecloneVolume {id}: {e}"));
    let status = LivecloneVolumeStatus {
        phase: Some(VolumePhase::Ready),
        capacity_bytes: Some(1 << 30),
        message: None,
        observed_generation: Some(1),
        conditions: vec![condition("Ready", "True", "Ready", "The volume exists.")],
    };
    api.patch_status(
        id.as_str(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .unwrap_or_else(|e| panic!("writing the status of LivecloneVolume {id}: {e}"));
}

fn hydration_status(phase: HydrationPhase, hydrated: u64, message: &str) -> VolumeHydrationStatus {
    let total = 1000 * MIB;
    let moving = matches!(phase, HydrationPhase::Hydrating);
    VolumeHydrationStatus {
        phase: Some(phase),
        hydrated_bytes: Some(hydrated),
        total_bytes: Some(total),
        percent: Some(hydrated as f64 * 100.0 / total as f64),
        bytes_per_second: Some(if moving { 120 * MIB } else { 0 }),
        eta_seconds: moving.then_some(192),
        message: (!message.is_empty()).then(|| message.to_owned()),
        ..VolumeHydrationStatus::default()
    }
}

/// The clone's VolumeHydration as the controller makes it, with `status`
/// as the node agent would write it.
async fn hydration(client: &Client, ns: &str, id: &VolumeId, status: VolumeHydrationStatus) {
    let api: Api<VolumeHydration> = Api::namespaced(client.clone(), ns);
    let mut vh = VolumeHydration::new(
        "clone",
        VolumeHydrationSpec {
            pvc: "clone".to_owned(),
            source: HydrationSource {
                kind: SourceKind::PersistentVolumeClaim,
                name: "data".to_owned(),
                namespace: None,
                volume_handle: Some(
                    VolumeId::for_name("data")
                        .expect("a valid name")
                        .to_string(),
                ),
                snapshot_handle: None,
            },
            destination: HydrationDestination {
                volume_handle: id.to_string(),
                persistent_volume_name: format!("pv-{ns}"),
            },
            node: NODE.to_owned(),
            tunables: None,
            paused: false,
        },
    );
    vh.metadata.namespace = Some(ns.to_owned());
    // The controller's own apply, which leaves out the user's fields.
    let mut object = serde_json::to_value(&vh).expect("serializes");
    if let Some(spec) = object["spec"].as_object_mut() {
        spec.remove("paused");
        spec.remove("tunables");
    }
    api.patch(
        "clone",
        &PatchParams::apply("liveclone-controller"),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("creating VolumeHydration {ns}/clone: {e}"));
    set_hydration_status(client, ns, status).await;
}

async fn set_hydration_status(client: &Client, ns: &str, status: VolumeHydrationStatus) {
    let api: Api<VolumeHydration> = Api::namespaced(client.clone(), ns);
    api.patch_status(
        "clone",
        &PatchParams::apply("liveclone-node").force(),
        &Patch::Apply(json!({
            "apiVersion": "liveclone.io/v1alpha1",
            "kind": "VolumeHydration",
            "status": status,
        })),
    )
    .await
    .unwrap_or_else(|e| panic!("writing the status of {ns}/clone: {e}"));
}

/// A core/v1 Event about an object, as a provisioner or agent files it.
async fn event(
    client: &Client,
    ns: &str,
    kind: &str,
    api_version: &str,
    reason: &str,
    message: &str,
) {
    let event = Event {
        metadata: meta(&format!("clone.{}", reason.to_lowercase()), Some(ns)),
        involved_object: ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(kind.to_owned()),
            name: Some("clone".to_owned()),
            namespace: Some(ns.to_owned()),
            ..ObjectReference::default()
        },
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        type_: Some("Warning".to_owned()),
        first_timestamp: Some(time(30)),
        last_timestamp: Some(time(10)),
        count: Some(3),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("test".to_owned()),
            host: None,
        }),
        ..Event::default()
    };
    Api::<Event>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &event)
        .await
        .unwrap_or_else(|e| panic!("creating Event {reason} in {ns}: {e}"));
}

/// A bound clone with its volume and its hydration in `status`.
async fn bound_clone(client: &Client, ns: &str, status: VolumeHydrationStatus) -> VolumeId {
    create_namespace(client, ns).await;
    let id = VolumeId::for_name(&format!("pvc-{ns}")).expect("a valid name");
    clone_claim(client, ns, CLASS, Some(&id)).await;
    liveclone_volume(client, ns, &id).await;
    hydration(client, ns, &id, status).await;
    id
}

async fn read_hydration(client: &Client, ns: &str) -> VolumeHydration {
    Api::<VolumeHydration>::namespaced(client.clone(), ns)
        .get("clone")
        .await
        .unwrap_or_else(|e| panic!("reading {ns}/clone: {e}"))
}

fn managers(vh: &VolumeHydration) -> Vec<String> {
    vh.managed_fields()
        .iter()
        .filter_map(|entry| entry.manager.clone())
        .collect()
}

fn tunables(threshold: Option<u32>, batch: Option<u32>) -> Option<HydrationTunablesSpec> {
    Some(HydrationTunablesSpec {
        hydration_threshold: threshold,
        hydration_batch_size: batch,
        rate_limit_bytes_per_second: None,
    })
}

async fn cluster() -> (ApiServer, Client) {
    let server = start().await;
    install_crds(&server);
    let client = server.client().expect("an admin client");
    storage_class(&client, CLASS, DRIVER).await;
    live_node(&client).await;
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pause_resume_and_tune_a_hydrating_clone() {
    let (server, client) = cluster().await;
    let ns = "lc-edit";
    bound_clone(
        &client,
        ns,
        hydration_status(HydrationPhase::Hydrating, 420 * MIB, ""),
    )
    .await;

    // Status: bar, percentage, bytes, rate, ETA, phase, node, paused.
    let (code, out, _) = plugin(&server, &["status", "-n", ns]);
    assert_eq!(code, 0);
    let header = out.lines().next().expect("a header");
    for column in [
        "PVC", "PHASE", "PROGRESS", "COPIED", "RATE", "ETA", "NODE", "PAUSED",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = out.lines().nth(1).expect("a row");
    for cell in [
        "clone",
        "Hydrating",
        "[##########..............]",
        "42.0%",
        "420.0 MiB of 1000.0 MiB",
        "120.0 MiB/s",
        "3m12s",
        NODE,
        "no",
    ] {
        assert!(row.contains(cell), "{cell:?} missing in {row}");
    }
    // The same through KUBECONFIG, as kubectl itself reads it.
    let by_env = Command::new(env!("CARGO_BIN_EXE_kubectl-liveclone"))
        .args(["status", "clone", "-n", ns, "-o", "json"])
        .env("KUBECONFIG", server.kubeconfig())
        .env("HOME", server.dir())
        .output()
        .expect("running the plugin");
    let (code, out, _) = report(&["status", "clone", "-o", "json"], by_env);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(json["hydrations"][0]["hydratedBytes"], 420 * MIB);
    assert_eq!(json["hydrations"][0]["phase"], "Hydrating");
    assert_eq!(json["hydrations"][0]["etaSeconds"], 192);

    // Pause: flips spec.paused under the plugin's field manager.
    let (code, out, _) = plugin(&server, &["pause", "clone", "-n", ns]);
    assert_eq!(code, 0);
    assert!(out.contains("spec.paused: false -> true"), "{out}");
    let vh = read_hydration(&client, ns).await;
    assert!(vh.spec.paused);
    assert!(managers(&vh).contains(&"kubectl-liveclone".to_owned()));
    // Again: nothing to do, no conflict, exit 0.
    let (code, out, _) = plugin(&server, &["pause", "clone", "-n", ns]);
    assert_eq!(code, 0);
    assert!(out.contains("already paused"), "{out}");
    let (code, out, _) = plugin(&server, &["status", "-n", ns]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|row| row.contains("paused") && row.contains("yes")),
        "{out}"
    );
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1, "a paused copy is a finding");
    assert!(out.contains("The copy is paused"), "{out}");
    assert!(out.contains("kubectl liveclone resume clone"), "{out}");

    // Tune while paused: the paused state stays.
    let (code, out, _) = plugin(
        &server,
        &[
            "tune",
            "clone",
            "-n",
            ns,
            "--threshold",
            "64",
            "--batch",
            "16",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("threshold=64 regions, batch=16 regions"),
        "{out}"
    );
    let vh = read_hydration(&client, ns).await;
    assert_eq!(vh.spec.tunables, tunables(Some(64), Some(16)));
    assert!(vh.spec.paused, "tuning kept the pause");
    // Out of bounds: refused before sending, nothing changes.
    for bad in [
        &["tune", "clone", "-n", ns, "--batch", "128"][..],
        &["tune", "clone", "-n", ns, "--threshold", "0"][..],
        &[
            "tune",
            "clone",
            "-n",
            ns,
            "--threshold",
            "65537",
            "--batch",
            "1",
        ][..],
    ] {
        let (code, _, err) = plugin(&server, bad);
        assert_eq!(code, 1, "{bad:?}");
        assert!(
            err.contains("out of bounds") || err.contains("may not exceed"),
            "{err}"
        );
    }
    assert_eq!(
        read_hydration(&client, ns).await.spec.tunables,
        tunables(Some(64), Some(16))
    );
    // Same values again: nothing changed.
    let (code, out, _) = plugin(&server, &["tune", "clone", "-n", ns, "--threshold", "64"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing changed"), "{out}");

    // Resume keeps the tunables.
    let (code, out, _) = plugin(&server, &["resume", "clone", "-n", ns]);
    assert_eq!(code, 0);
    assert!(out.contains("spec.paused: true -> false"), "{out}");
    let vh = read_hydration(&client, ns).await;
    assert!(!vh.spec.paused);
    assert_eq!(vh.spec.tunables, tunables(Some(64), Some(16)));

    // A rate limit joins the other tunables and is lifted alone.
    let (code, out, _) = plugin(
        &server,
        &["tune", "clone", "-n", ns, "--rate-limit", "50MiB"],
    );
    assert_eq!(code, 0, "{out}");
    let limited = read_hydration(&client, ns).await.spec.tunables;
    assert_eq!(
        limited.as_ref().and_then(|t| t.rate_limit_bytes_per_second),
        Some(50 << 20)
    );
    assert_eq!(
        limited.as_ref().and_then(|t| t.hydration_threshold),
        Some(64)
    );
    let (code, out, _) = plugin(&server, &["tune", "clone", "-n", ns, "--no-rate-limit"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        read_hydration(&client, ns).await.spec.tunables,
        tunables(Some(64), Some(16))
    );

    // Reset clears them, even when another manager (a kubectl patch) holds
    // them too.
    Api::<VolumeHydration>::namespaced(client.clone(), ns)
        .patch(
            "clone",
            &PatchParams {
                field_manager: Some("kubectl-patch".to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"spec": {"tunables": {"hydrationThreshold": 32}}})),
        )
        .await
        .expect("a user's kubectl patch");
    let (code, out, _) = plugin(&server, &["tune", "clone", "-n", ns, "--reset"]);
    assert_eq!(code, 0);
    assert!(out.contains("-> none"), "{out}");
    let vh = read_hydration(&client, ns).await;
    assert_eq!(vh.spec.tunables, None);
    assert!(!vh.spec.paused);
    // The controller's fields are untouched and still its own.
    assert_eq!(vh.spec.node, NODE);
    assert!(managers(&vh).contains(&"liveclone-controller".to_owned()));

    // While the status is written every 10 ms (the node agent's default is
    // every 2 s), every edit still lands (a lost race is recomputed from a
    // fresh read) and none writes back a stale value. The plugin runs off
    // the runtime's threads so that the writer keeps going meanwhile.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let client = client.clone();
        let writing = writing.clone();
        tokio::spawn(async move {
            let mut writes = 0u64;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                writes += 1;
                set_hydration_status(
                    &client,
                    "lc-edit",
                    hydration_status(HydrationPhase::Hydrating, 420 * MIB + writes, ""),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            writes
        })
    };
    for args in [
        &["pause", "clone", "-n", ns][..],
        &[
            "tune",
            "clone",
            "-n",
            ns,
            "--threshold",
            "8",
            "--batch",
            "4",
        ][..],
        &["resume", "clone", "-n", ns][..],
        &["tune", "clone", "-n", ns, "--batch", "8"][..],
    ] {
        let command = plugin_command(&server, args);
        let output = tokio::task::spawn_blocking(move || {
            let mut command = command;
            command.output()
        })
        .await
        .expect("the plugin's thread")
        .expect("running the plugin");
        let (code, _, _) = report(args, output);
        assert_eq!(code, 0, "{args:?} under concurrent status writes");
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.expect("the status writer");
    eprintln!("{writes} status writes ran alongside the edits");
    let vh = read_hydration(&client, ns).await;
    assert!(!vh.spec.paused);
    assert_eq!(vh.spec.tunables, tunables(Some(8), Some(8)));
    let (code, _, _) = plugin(&server, &["tune", "clone", "-n", ns, "--reset"]);
    assert_eq!(code, 0);
    assert_eq!(read_hydration(&client, ns).await.spec.tunables, None);
    set_hydration_status(
        &client,
        ns,
        hydration_status(HydrationPhase::Hydrating, 420 * MIB, ""),
    )
    .await;

    // --watch follows the copy until it completes. Its output is read as
    // it comes, so that the changes are made only once the first frame is
    // drawn (the watch is running) and each redraw is seen.
    let mut watch = plugin_command(&server, &["status", "clone", "-n", ns, "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting status --watch");
    let stdout = watch.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !seen.iter().any(|line: &String| line.contains(needle)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(e) => panic!("status --watch never showed {needle:?} ({e}): {seen:#?}"),
            }
        }
    };
    wait_for("42.0%");
    set_hydration_status(
        &client,
        ns,
        hydration_status(HydrationPhase::Hydrating, 900 * MIB, ""),
    )
    .await;
    wait_for("90.0%");
    set_hydration_status(
        &client,
        ns,
        hydration_status(HydrationPhase::Complete, 1000 * MIB, ""),
    )
    .await;
    wait_for("100.0%");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = watch.try_wait().expect("polling the watch") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status --watch did not end when the copy completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    reader.join().expect("the reader thread");
    seen.extend(lines_rx.try_iter());
    eprintln!(
        "$ kubectl liveclone status clone --watch  ({status})\n{}",
        seen.join("\n")
    );
    assert_eq!(status.code(), Some(0));
    let last = seen.last().expect("output");
    assert!(last.contains("Complete") && last.contains("done"), "{last}");

    // Finished: pause and tune are refused, why says all is well.
    let (code, _, err) = plugin(&server, &["pause", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(err.contains("has finished hydrating"), "{err}");
    let (code, _, err) = plugin(&server, &["tune", "clone", "-n", ns, "--batch", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("has finished hydrating"), "{err}");
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing is wrong:"), "{out}");
    assert!(out.contains("independent full copy"), "{out}");

    // A claim that is not a clone, and one that does not exist.
    let plain = "lc-plain";
    create_namespace(&client, plain).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), plain);
    let mut claim = clone_claim(&client, plain, CLASS, None).await;
    claim.metadata = meta("plain", Some(plain));
    if let Some(spec) = claim.spec.as_mut() {
        spec.data_source = None;
    }
    claims
        .create(&PostParams::default(), &claim)
        .await
        .expect("creating a plain claim");
    let (code, _, err) = plugin(&server, &["pause", "plain", "-n", plain]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a liveclone clone"), "{err}");
    let (code, _, err) = plugin(&server, &["resume", "missing", "-n", plain]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    let (code, out, _) = plugin(&server, &["status", "-n", plain]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("No hydrations in namespace lc-plain"),
        "{out}"
    );
    let (code, _, err) = plugin(&server, &["status", "plain", "-n", plain]);
    assert_eq!(code, 1);
    assert!(err.contains("No hydration for PVC plain"), "{err}");

    // -A: every namespace, with a NAMESPACE column.
    let (code, out, _) = plugin(&server, &["status", "-A"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("NAMESPACE"), "{out}");
    assert!(out.contains(ns), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_explains_each_way_a_clone_can_be_stuck() {
    let (server, client) = cluster().await;
    storage_class(&client, "other", "ebs.csi.aws.com").await;

    // Pending: WaitForFirstConsumer and no pod uses the claim.
    let ns = "lc-why-pending";
    create_namespace(&client, ns).await;
    clone_claim(&client, ns, CLASS, None).await;
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(out.contains("WaitForFirstConsumer"), "{out}");
    assert!(out.contains("no pod in lc-why-pending uses it"), "{out}");
    assert!(
        out.contains("look further: kubectl get pods -n lc-why-pending"),
        "{out}"
    );

    // Provisioning failed: the provisioner's Event on the claim is quoted.
    let ns = "lc-why-provfail";
    create_namespace(&client, ns).await;
    clone_claim(&client, ns, CLASS, None).await;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .patch(
            "clone",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "volume.kubernetes.io/selected-node": NODE
            }}})),
        )
        .await
        .expect("the scheduler's annotation");
    event(
        &client,
        ns,
        "PersistentVolumeClaim",
        "v1",
        "ProvisioningFailed",
        "failed to provision volume with StorageClass \"liveclone\": rpc error: code = \
         ResourceExhausted desc = device class file on node-a has 0 B available",
    )
    .await;
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(out.contains("Provisioning failed:"), "{out}");
    assert!(out.contains("has 0 B available"), "{out}");
    assert!(
        out.contains("kubectl describe pvc clone -n lc-why-provfail"),
        "{out}"
    );

    // The wrong provisioner.
    let ns = "lc-why-other";
    create_namespace(&client, ns).await;
    clone_claim(&client, ns, "other", None).await;
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(out.contains("provisioned by ebs.csi.aws.com"), "{out}");

    // Stalled: the node's explanation, and where to look.
    let ns = "lc-why-stalled";
    let stall = "Hydration stalled at 10.0 MiB of 1000.0 MiB (1.0%): no progress for 5m00s; \
                 the usual cause is an I/O error on the source or destination device.";
    bound_clone(
        &client,
        ns,
        hydration_status(HydrationPhase::Stalled, 10 * MIB, stall),
    )
    .await;
    event(
        &client,
        ns,
        "VolumeHydration",
        "liveclone.io/v1alpha1",
        "HydrationStalled",
        stall,
    )
    .await;
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(out.contains("The copy is Stalled at 1.0%"), "{out}");
    assert!(out.contains("I/O error on the source"), "{out}");
    assert!(
        out.contains("kubectl describe vh clone -n lc-why-stalled"),
        "{out}"
    );
    let (code, out, _) = plugin(&server, &["status", "-n", ns]);
    assert_eq!(code, 0);
    assert!(out.contains("    ! Hydration stalled"), "{out}");

    // Failed.
    let ns = "lc-why-failed";
    bound_clone(
        &client,
        ns,
        hydration_status(
            HydrationPhase::Failed,
            10 * MIB,
            "The clone's dm-clone metadata went read-only.",
        ),
    )
    .await;
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(
        out.contains("The copy Failed: The clone's dm-clone metadata went read-only"),
        "{out}"
    );
    let (code, _, err) = plugin(&server, &["resume", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(err.contains("has failed"), "{err}");

    // A LivecloneVolume that its node could not make.
    let ns = "lc-why-volume";
    let id = bound_clone(
        &client,
        ns,
        hydration_status(HydrationPhase::Hydrating, 100 * MIB, ""),
    )
    .await;
    Api::<LivecloneVolume>::all(client.clone())
        .patch_status(
            id.as_str(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Failed",
                "conditions": [condition("Ready", "False", "ResourceExhausted",
                    "the thin pool vg0/tp0 is full")],
            }})),
        )
        .await
        .expect("failing the volume");
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(
        out.contains("is not ready (ResourceExhausted): the thin pool vg0/tp0 is full"),
        "{out}"
    );

    // Healthy and hydrating: exit 0, says how far.
    let ns = "lc-why-healthy";
    bound_clone(
        &client,
        ns,
        hydration_status(HydrationPhase::Hydrating, 500 * MIB, ""),
    )
    .await;
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("nothing is wrong: the claim is bound and usable"),
        "{out}"
    );
    assert!(out.contains("Hydrating (50.0% done"), "{out}");

    // The node agent stopped publishing: stale LivecloneNode.
    Api::<LivecloneNode>::all(client.clone())
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedTime": time(3600)}})),
        )
        .await
        .expect("aging the LivecloneNode");
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", ns]);
    assert_eq!(code, 1);
    assert!(
        out.contains("last reported its capacity 1h00m ago"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_the_chart_gets_a_clear_message() {
    let server = start().await;
    let client = server.client().expect("an admin client");
    for args in [
        &["status", "-n", "default"][..],
        &["status", "-A", "--watch"][..],
        &["pause", "clone", "-n", "default"][..],
    ] {
        let (code, _, err) = plugin(&server, args);
        assert_eq!(code, 3, "{args:?}");
        assert!(
            err.contains("the liveclone chart is not installed"),
            "{err}"
        );
    }
    create_namespace(&client, "lc-bare").await;
    storage_class(&client, CLASS, DRIVER).await;
    clone_claim(&client, "lc-bare", CLASS, None).await;
    let (code, out, _) = plugin(&server, &["why", "clone", "-n", "lc-bare"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("chart (its CRDs and agents) is not installed"),
        "{out}"
    );
    // Bad usage is clap's exit 2, before any connection.
    let (code, _, _) = plugin(&server, &["tune"]);
    assert_eq!(code, 2);
    // A kubeconfig that does not exist.
    let output = Command::new(env!("CARGO_BIN_EXE_kubectl-liveclone"))
        .args(["--kubeconfig", "/nonexistent/kubeconfig", "status"])
        .output()
        .expect("running the plugin");
    let (code, _, err) = report(
        &["--kubeconfig", "/nonexistent/kubeconfig", "status"],
        output,
    );
    assert_eq!(code, 3);
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
}
