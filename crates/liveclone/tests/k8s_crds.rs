//! The custom resources of Kubernetes mode against a real kube-apiserver
//! (and etcd) on loopback: the checked-in CRDs install and are served; the
//! status subresource, server-side apply, schema validation and printer
//! columns behave as the agents and users need; RBAC can give the node agent
//! status and nothing more.
//!
//! Needs the tools from `tests/tools/build-k8s-tools.sh`; fails (does not
//! skip) without them:
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_crds -- --nocapture
//!
//! `--nocapture` shows the kubectl tables as a user would see them.

mod k8s_common;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use k8s_common::{create_namespace, install_crds, kubectl_table, meta, row, start};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Resource;
use liveclone::domain::hydration::{HydrationPhase, Progress};
use liveclone::k8s::{
    AccessMode, HydrationDestination, HydrationSource, HydrationTunablesSpec, LivecloneSnapshot,
    LivecloneSnapshotSpec, LivecloneSnapshotStatus, LivecloneVolume, LivecloneVolumeSpec,
    LivecloneVolumeStatus, SourceKind, VolumeAccess, VolumeHydration, VolumeHydrationSpec,
    VolumeHydrationStatus, VolumePhase, NODE_FIELD_MANAGER,
};
use liveclone::os::fs::FsType;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SOURCE_VOLUME: &str = "lcv-0123456789abcdef0123456789abcdef";
const CLONE_VOLUME: &str = "lcv-fedcba9876543210fedcba9876543210";
const SNAPSHOT: &str = "lcs-00112233445566778899aabbccddeeff";

fn hydration(name: &str, namespace: &str) -> VolumeHydration {
    let mut vh = VolumeHydration::new(
        name,
        VolumeHydrationSpec {
            pvc: name.to_owned(),
            source: HydrationSource {
                kind: SourceKind::PersistentVolumeClaim,
                name: "data".to_owned(),
                namespace: None,
                volume_handle: Some(SOURCE_VOLUME.to_owned()),
                snapshot_handle: None,
            },
            destination: HydrationDestination {
                volume_handle: CLONE_VOLUME.to_owned(),
                persistent_volume_name: format!("pvc-{name}"),
            },
            node: "node-1".to_owned(),
            tunables: Some(HydrationTunablesSpec {
                hydration_threshold: Some(64),
                hydration_batch_size: Some(16),
                rate_limit_bytes_per_second: None,
            }),
            paused: false,
        },
    );
    vh.metadata.namespace = Some(namespace.to_owned());
    vh
}

/// The status the node agent would write for a clone `percent` hydrated.
fn hydrating_status(percent: f64, generation: Option<i64>) -> VolumeHydrationStatus {
    let total = 1000 * MIB;
    let hydrated = (total as f64 * percent / 100.0) as u64;
    let progress = Progress {
        phase: HydrationPhase::Hydrating,
        hydrated_bytes: hydrated,
        total_bytes: total,
        percent,
        bytes_per_second: (120 * MIB) as f64,
        eta: Some(Duration::from_secs(192)),
        paused: false,
        last_progress_at: None,
        message: format!("Hydrating: {percent:.1}% copied."),
    };
    let mut status =
        VolumeHydrationStatus::from_progress(&progress, generation, &[], &liveclone::k8s::now());
    status.started_at = liveclone::k8s::time_from_unix_seconds(1_700_000_000);
    status
}

/// A server-side apply body for the status subresource: only the fields
/// the caller owns, with the type's apiVersion and kind.
fn status_apply<K: Resource<DynamicType = ()>>(status: impl serde::Serialize) -> Value {
    json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

fn node_apply() -> PatchParams {
    PatchParams::apply(NODE_FIELD_MANAGER).force()
}

/// The message of the API error of `result`, which must have failed with
/// HTTP `code`.
fn expect_code<T: Debug>(result: Result<T, kube::Error>, code: u16, what: &str) -> String {
    match result {
        Err(kube::Error::Api(status)) if status.code == code => {
            eprintln!("{what}: {code} {}", status.message);
            status.message
        }
        other => panic!("{what}: expected HTTP {code}, got {other:?}"),
    }
}

#[tokio::test]
async fn status_subresource_server_side_apply_and_validation() {
    const NS: &str = "lc-status";
    let server = start().await;
    install_crds(&server);
    let admin = server.client().expect("admin client");
    create_namespace(&admin, NS).await;
    let api: Api<VolumeHydration> = Api::namespaced(admin.clone(), NS);

    let created = api
        .create(&PostParams::default(), &hydration("clone-a", NS))
        .await
        .expect("creating a VolumeHydration");
    assert_eq!(created.metadata.generation, Some(1));
    assert_eq!(created.status, None, "a new VolumeHydration has no status");

    // A spec change (what `kubectl patch` does to pause) bumps the generation.
    let paused = api
        .patch(
            "clone-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .expect("pausing through the spec");
    assert!(paused.spec.paused);
    assert_eq!(paused.metadata.generation, Some(2));

    // The node agent's status write, by server-side apply: no new generation.
    let first = hydrating_status(42.0, Some(2));
    assert!(first.eta.is_some());
    let written = api
        .patch_status(
            "clone-a",
            &node_apply(),
            &Patch::Apply(status_apply::<VolumeHydration>(&first)),
        )
        .await
        .expect("applying the status");
    assert_eq!(written.metadata.generation, Some(2));
    let status = written.status.clone().expect("a status");
    assert_eq!(status.phase, Some(HydrationPhase::Hydrating));
    assert_eq!(status.progress.as_deref(), Some("42.0%"));
    assert_eq!(status.conditions.len(), 3);

    // A second apply that leaves out eta and etaSeconds: fields the manager
    // stops sending are removed, the rest is replaced.
    let mut second = hydrating_status(57.5, Some(2));
    second.eta = None;
    second.eta_seconds = None;
    let written = api
        .patch_status(
            "clone-a",
            &node_apply(),
            &Patch::Apply(status_apply::<VolumeHydration>(&second)),
        )
        .await
        .expect("applying the status again");
    let status = written.status.clone().expect("a status");
    assert_eq!(written.metadata.generation, Some(2));
    assert_eq!(status.progress.as_deref(), Some("57.5%"));
    assert_eq!(status.eta, None, "a field no longer applied is removed");
    assert_eq!(status.conditions.len(), 3);

    // managedFields: the node agent owns the status, through the status
    // subresource, and nothing of the spec.
    let entries = written.metadata.managed_fields.clone().unwrap_or_default();
    for entry in &entries {
        eprintln!(
            "managedFields: manager={:?} operation={:?} subresource={:?}",
            entry.manager, entry.operation, entry.subresource
        );
    }
    let node_entries: Vec<_> = entries
        .iter()
        .filter(|e| e.manager.as_deref() == Some(NODE_FIELD_MANAGER))
        .collect();
    assert_eq!(node_entries.len(), 1, "one entry for {NODE_FIELD_MANAGER}");
    let entry = node_entries[0];
    assert_eq!(entry.operation.as_deref(), Some("Apply"));
    assert_eq!(entry.subresource.as_deref(), Some("status"));
    let fields = &entry.fields_v1.as_ref().expect("fieldsV1").0;
    let owned = &fields["f:status"];
    for field in [
        "f:phase",
        "f:progress",
        "f:rate",
        "f:conditions",
        "f:hydratedBytes",
    ] {
        assert!(
            owned.get(field).is_some(),
            "{NODE_FIELD_MANAGER} owns status.{field}: {fields}"
        );
    }
    assert!(
        owned.get("f:eta").is_none(),
        "eta is no longer owned: {fields}"
    );
    assert!(
        fields.get("f:spec").is_none(),
        "{NODE_FIELD_MANAGER} owns no spec: {fields}"
    );

    // The main resource ignores status, and the status subresource ignores
    // spec: each writer can only touch its half.
    let after = api
        .patch(
            "clone-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed", "message": "forged"}})),
        )
        .await
        .expect("a merge patch of the main resource");
    let status = after.status.expect("status kept");
    assert_eq!(status.phase, Some(HydrationPhase::Hydrating));
    assert_ne!(status.message.as_deref(), Some("forged"));
    assert_eq!(after.metadata.generation, Some(2));
    let after = api
        .patch_status(
            "clone-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .expect("a merge patch of the status subresource");
    assert!(after.spec.paused, "spec is not written through /status");
    eprintln!("status through the main resource and spec through /status: both ignored");

    // Schema validation: each of these is refused with 422 Unprocessable.
    let bad_phase = api
        .patch_status(
            "clone-a",
            &node_apply(),
            &Patch::Apply(status_apply::<VolumeHydration>(
                json!({"phase": "Exploded"}),
            )),
        )
        .await;
    let e = expect_code(bad_phase, 422, "status.phase Exploded");
    assert!(e.contains("phase"), "{}", e);

    let bad_percent = api
        .patch_status(
            "clone-a",
            &node_apply(),
            &Patch::Apply(status_apply::<VolumeHydration>(json!({"percent": 140.0}))),
        )
        .await;
    expect_code(bad_percent, 422, "status.percent 140");

    let mut zero = serde_json::to_value(hydration("clone-zero", NS)).expect("json");
    zero["spec"]["tunables"]["hydrationThreshold"] = json!(0);
    let e = expect_code(
        api.create(
            &PostParams::default(),
            &serde_json::from_value(zero).expect("typed"),
        )
        .await,
        422,
        "tunables.hydrationThreshold 0",
    );
    assert!(e.contains("hydrationThreshold"), "{}", e);

    let mut unknown_kind = serde_json::to_value(hydration("clone-kind", NS)).expect("json");
    unknown_kind["spec"]["source"]["kind"] = json!("Bucket");
    let e = expect_code(
        api.patch(
            "clone-kind",
            &PatchParams::apply("liveclone-test"),
            &Patch::Apply(unknown_kind),
        )
        .await,
        422,
        "source.kind Bucket",
    );
    assert!(e.contains("kind"), "{}", e);

    let mut no_handle = serde_json::to_value(hydration("clone-handle", NS)).expect("json");
    no_handle["spec"]["source"]
        .as_object_mut()
        .expect("an object")
        .remove("volumeHandle");
    let e = expect_code(
        api.patch(
            "clone-handle",
            &PatchParams::apply("liveclone-test"),
            &Patch::Apply(no_handle),
        )
        .await,
        422,
        "a PersistentVolumeClaim source without a volumeHandle",
    );
    assert!(e.contains("volumeHandle"), "{}", e);

    let big_batch = api
        .patch(
            "clone-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tunables": {"hydrationBatchSize": 128}}})),
        )
        .await;
    expect_code(big_batch, 422, "batch size above the threshold");

    let moved = api
        .patch(
            "clone-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"node": "node-2"}})),
        )
        .await;
    let e = expect_code(moved, 422, "changing spec.node");
    assert!(e.contains("immutable"), "{}", e);

    // Tunables and paused stay editable, as users need.
    let tuned = api
        .patch(
            "clone-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false, "tunables": {"hydrationThreshold": 256, "hydrationBatchSize": 128}}})),
        )
        .await
        .expect("resuming and tuning");
    assert_eq!(tuned.metadata.generation, Some(3));
    let tunables = tuned.spec.tunables.expect("tunables");
    assert_eq!(tunables.hydration_threshold, Some(256));

    // The default of `paused` is applied by the server.
    let defaulted = api
        .patch(
            "clone-defaults",
            &PatchParams::apply("liveclone-test"),
            &Patch::Apply({
                let mut v = serde_json::to_value(hydration("clone-defaults", NS)).expect("json");
                v["spec"]
                    .as_object_mut()
                    .expect("an object")
                    .remove("paused");
                v
            }),
        )
        .await
        .expect("creating without paused");
    assert!(!defaulted.spec.paused);

    server.stop().expect("stopping the server");
}

#[tokio::test]
async fn kubectl_shows_the_printer_columns() {
    const NS: &str = "lc-columns";
    let server = start().await;
    install_crds(&server);
    let admin = server.client().expect("admin client");
    create_namespace(&admin, NS).await;

    let hydrations: Api<VolumeHydration> = Api::namespaced(admin.clone(), NS);
    hydrations
        .create(&PostParams::default(), &hydration("clone-a", NS))
        .await
        .expect("creating a VolumeHydration");
    hydrations
        .patch_status(
            "clone-a",
            &node_apply(),
            &Patch::Apply(status_apply::<VolumeHydration>(hydrating_status(
                42.0,
                Some(1),
            ))),
        )
        .await
        .expect("applying its status");

    let want = [
        "NAME", "PVC", "SOURCE", "NODE", "PHASE", "PROGRESS", "RATE", "ETA", "AGE",
    ];
    for args in [
        &["get", "vh", "-n", NS][..],
        &["get", "volumehydrations", "-n", NS][..],
    ] {
        let (columns, rows) = kubectl_table(&server, args);
        assert_eq!(columns, want, "kubectl {}", args.join(" "));
        let r = row(&rows, "clone-a");
        assert_eq!(r["PVC"], "clone-a");
        assert_eq!(r["SOURCE"], "data");
        assert_eq!(r["NODE"], "node-1");
        assert_eq!(r["PHASE"], "Hydrating");
        assert_eq!(r["PROGRESS"], "42.0%");
        assert_eq!(r["RATE"], "120.0 MiB/s");
        assert_eq!(r["ETA"], "3m12s");
    }
    // All namespaces add a NAMESPACE column first; -o wide the extra ones.
    let (columns, _) = kubectl_table(&server, &["get", "volumehydrations", "--all-namespaces"]);
    assert_eq!(columns[0], "NAMESPACE");
    assert_eq!(columns[1..], want);
    let (columns, rows) = kubectl_table(&server, &["get", "vh", "-n", NS, "-o", "wide"]);
    assert_eq!(
        columns[want.len()..],
        ["KIND", "VOLUME", "PAUSED", "MESSAGE"]
    );
    assert_eq!(row(&rows, "clone-a")["VOLUME"], CLONE_VOLUME);

    // Cluster-scoped volume and snapshot state.
    let volumes: Api<LivecloneVolume> = Api::all(admin.clone());
    let volume = LivecloneVolume::new(
        CLONE_VOLUME,
        LivecloneVolumeSpec {
            name: "pvc-clone-a".to_owned(),
            node: "node-1".to_owned(),
            capacity_bytes: 1 << 30,
            access: VolumeAccess {
                mode: AccessMode::Filesystem,
                fs_type: Some(FsType::Ext4),
            },
            content_source: None,
            claim: None,
            parameters: BTreeMap::from([(
                "liveclone.io/regionSize".to_owned(),
                "64KiB".to_owned(),
            )]),
            pool: "file".to_owned(),
        },
    );
    volumes
        .create(&PostParams::default(), &volume)
        .await
        .expect("creating a LivecloneVolume");
    volumes
        .patch_status(
            CLONE_VOLUME,
            &node_apply(),
            &Patch::Apply(status_apply::<LivecloneVolume>(LivecloneVolumeStatus {
                phase: Some(VolumePhase::Ready),
                capacity_bytes: Some(1 << 30),
                message: Some("The volume is ready on node-1.".to_owned()),
                observed_generation: Some(1),
                conditions: Vec::new(),
            })),
        )
        .await
        .expect("applying the volume's status");
    let (columns, rows) = kubectl_table(&server, &["get", "lcvol"]);
    assert_eq!(columns, ["NAME", "NODE", "SIZE", "PHASE", "AGE"]);
    let r = row(&rows, CLONE_VOLUME);
    assert_eq!(r["NODE"], "node-1");
    assert_eq!(r["SIZE"], (1u64 << 30).to_string());
    assert_eq!(r["PHASE"], "Ready");

    let snapshots: Api<LivecloneSnapshot> = Api::all(admin.clone());
    snapshots
        .create(
            &PostParams::default(),
            &LivecloneSnapshot::new(
                SNAPSHOT,
                LivecloneSnapshotSpec {
                    name: "snapshot-a".to_owned(),
                    source_volume: SOURCE_VOLUME.to_owned(),
                    node: "node-1".to_owned(),
                    access: VolumeAccess {
                        mode: AccessMode::Block,
                        fs_type: None,
                    },
                    volume_snapshot: None,
                },
            ),
        )
        .await
        .expect("creating a LivecloneSnapshot");
    snapshots
        .patch_status(
            SNAPSHOT,
            &node_apply(),
            &Patch::Apply(status_apply::<LivecloneSnapshot>(LivecloneSnapshotStatus {
                ready_to_use: Some(true),
                size_bytes: Some(1 << 30),
                creation_time: liveclone::k8s::time_from_unix_seconds(1_700_000_000),
                message: None,
                conditions: Vec::new(),
            })),
        )
        .await
        .expect("applying the snapshot's status");
    let (columns, rows) = kubectl_table(&server, &["get", "lcsnap"]);
    assert_eq!(columns, ["NAME", "SOURCE", "NODE", "SIZE", "READY", "AGE"]);
    let r = row(&rows, SNAPSHOT);
    assert_eq!(r["SOURCE"], SOURCE_VOLUME);
    assert_eq!(r["READY"], "true");

    // The category lists all three kinds at once.
    let out = server
        .kubectl_output(["get", "liveclone", "--all-namespaces"])
        .expect("kubectl get liveclone");
    eprintln!("$ kubectl get liveclone --all-namespaces\n{out}");
    for name in ["clone-a", CLONE_VOLUME, SNAPSHOT] {
        assert!(out.contains(name), "{name} missing from: {out}");
    }

    server.stop().expect("stopping the server");
}

#[tokio::test]
async fn a_status_only_role_writes_status_but_not_spec() {
    const NS: &str = "lc-rbac";
    const ACCOUNT: &str = "liveclone-node";
    let server = start().await;
    install_crds(&server);
    let admin = server.client().expect("admin client");
    create_namespace(&admin, NS).await;
    let api: Api<VolumeHydration> = Api::namespaced(admin.clone(), NS);
    api.create(&PostParams::default(), &hydration("clone-a", NS))
        .await
        .expect("creating a VolumeHydration");

    let roles: Api<Role> = Api::namespaced(admin.clone(), NS);
    let rule = |resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![liveclone::k8s::GROUP.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    };
    roles
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta("hydration-status-writer", Some(NS)),
                rules: Some(vec![
                    rule("volumehydrations", &["get", "list", "watch"]),
                    rule("volumehydrations/status", &["patch"]),
                ]),
            },
        )
        .await
        .expect("creating the Role");
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), NS);
    bindings
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta("liveclone-node-status", Some(NS)),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_owned(),
                    kind: "Role".to_owned(),
                    name: "hydration-status-writer".to_owned(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: ACCOUNT.to_owned(),
                    namespace: Some(NS.to_owned()),
                    ..Subject::default()
                }]),
            },
        )
        .await
        .expect("creating the RoleBinding");

    let node = server
        .client_impersonating_service_account(NS, ACCOUNT)
        .expect("impersonating the node agent's service account");
    let as_node: Api<VolumeHydration> = Api::namespaced(node, NS);

    // RBAC changes reach the authorizer through an informer: poll.
    let deadline = Instant::now() + Duration::from_secs(15);
    let written = loop {
        match as_node
            .patch_status(
                "clone-a",
                &node_apply(),
                &Patch::Apply(status_apply::<VolumeHydration>(hydrating_status(
                    10.0,
                    Some(1),
                ))),
            )
            .await
        {
            Ok(written) => break written,
            Err(kube::Error::Api(status)) if status.code == 403 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("applying status as {ACCOUNT}: {e}"),
        }
    };
    assert_eq!(
        written.status.and_then(|s| s.progress).as_deref(),
        Some("10.0%")
    );
    eprintln!("{ACCOUNT}: server-side apply of /status -> 200");
    as_node.get("clone-a").await.expect("get as the node agent");
    as_node
        .list(&Default::default())
        .await
        .expect("list as the node agent");

    expect_code(
        as_node
            .patch(
                "clone-a",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"paused": true}})),
            )
            .await,
        403,
        "merge patch of spec as the node agent",
    );
    expect_code(
        as_node
            .patch(
                "clone-a",
                &node_apply(),
                &Patch::Apply(json!({
                    "apiVersion": VolumeHydration::api_version(&()),
                    "kind": VolumeHydration::kind(&()),
                    "spec": {"paused": true},
                })),
            )
            .await,
        403,
        "server-side apply of spec as the node agent",
    );
    expect_code(
        as_node
            .create(&PostParams::default(), &hydration("clone-b", NS))
            .await,
        403,
        "create as the node agent",
    );
    expect_code(
        as_node.delete("clone-a", &Default::default()).await,
        403,
        "delete as the node agent",
    );
    let unchanged = api.get("clone-a").await.expect("get as admin");
    assert!(!unchanged.spec.paused);
    assert_eq!(unchanged.metadata.generation, Some(1));

    server.stop().expect("stopping the server");
}
