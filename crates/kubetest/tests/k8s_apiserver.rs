//! The harness against the real binaries: etcd and kube-apiserver on
//! loopback, RBAC enforced for service accounts, kubectl, the snapshot CRDs,
//! and nothing left behind.
//!
//! Needs the tools from `tests/tools/build-k8s-tools.sh`; fails (does not
//! skip) without them:
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p kubetest --features k8s -- --nocapture

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use kubetest::ApiServer;

const NAMESPACE: &str = "kubetest-rbac";

async fn start() -> ApiServer {
    let started = Instant::now();
    let server = ApiServer::start()
        .await
        .unwrap_or_else(|e| panic!("starting etcd and kube-apiserver: {e:#}"));
    let (etcd, apiserver) = server.pids();
    eprintln!(
        "kube-apiserver at {} ready in {:.1} s (etcd pid {etcd:?}, kube-apiserver pid {apiserver:?}, folder {})",
        server.url(),
        started.elapsed().as_secs_f64(),
        server.dir().display()
    );
    server
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        ..ObjectMeta::default()
    }
}

/// The HTTP status of reading the ConfigMap `settings` as `client`.
async fn read_status(client: Client) -> u16 {
    let maps: Api<ConfigMap> = Api::namespaced(client, NAMESPACE);
    match maps.get("settings").await {
        Ok(_) => 200,
        Err(kube::Error::Api(status)) => status.code,
        Err(e) => panic!("reading configmap settings: {e}"),
    }
}

/// Polls until reading answers `want` (RBAC changes reach the authoriser
/// through an informer, a moment after the write).
async fn expect_read_status(client: &Client, want: u16, who: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = read_status(client.clone()).await;
        if got == want {
            eprintln!("{who}: GET configmap -> {got}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{who}: GET configmap answered {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn gone(pid: Option<u32>) -> bool {
    let pid = pid.expect("the daemon had a pid");
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn rbac_is_enforced_for_service_accounts_and_kubectl_works() {
    let server = start().await;
    let admin = server.client().expect("admin client");

    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(NAMESPACE, None),
                ..Namespace::default()
            },
        )
        .await
        .expect("creating the namespace");
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), NAMESPACE);
    maps.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: meta("settings", Some(NAMESPACE)),
            data: Some(BTreeMap::from([("colour".to_owned(), "blue".to_owned())])),
            ..ConfigMap::default()
        },
    )
    .await
    .expect("creating the configmap");

    // Before any RBAC: both ways of being a service account are refused.
    let impersonated = server
        .client_impersonating_service_account(NAMESPACE, "reader")
        .expect("impersonating client");
    let with_token = server
        .service_account_client(NAMESPACE, "reader")
        .await
        .expect("client with a service-account token");
    assert_eq!(read_status(impersonated.clone()).await, 403);
    assert_eq!(read_status(with_token.clone()).await, 403);
    eprintln!("service account reader without RBAC: 403 (impersonated and with a token)");

    // A Role that reads ConfigMaps, bound to the service account.
    let roles: Api<Role> = Api::namespaced(admin.clone(), NAMESPACE);
    roles
        .create(
            &PostParams::default(),
            &Role {
                metadata: meta("configmap-reader", Some(NAMESPACE)),
                rules: Some(vec![PolicyRule {
                    api_groups: Some(vec![String::new()]),
                    resources: Some(vec!["configmaps".to_owned()]),
                    verbs: vec!["get".to_owned(), "list".to_owned()],
                    ..PolicyRule::default()
                }]),
            },
        )
        .await
        .expect("creating the role");
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), NAMESPACE);
    bindings
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: meta("reader-reads-configmaps", Some(NAMESPACE)),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_owned(),
                    kind: "Role".to_owned(),
                    name: "configmap-reader".to_owned(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".to_owned(),
                    name: "reader".to_owned(),
                    namespace: Some(NAMESPACE.to_owned()),
                    ..Subject::default()
                }]),
            },
        )
        .await
        .expect("creating the role binding");

    expect_read_status(&impersonated, 200, "reader (impersonated) with the Role").await;
    expect_read_status(&with_token, 200, "reader (token) with the Role").await;

    // Exactly what was granted: reading, not writing; this account only.
    let as_reader: Api<ConfigMap> = Api::namespaced(impersonated, NAMESPACE);
    let denied = as_reader
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("sneaky", Some(NAMESPACE)),
                ..ConfigMap::default()
            },
        )
        .await
        .expect_err("the reader may not create configmaps");
    assert!(
        matches!(&denied, kube::Error::Api(status) if status.code == 403),
        "creating as the reader: {denied}"
    );
    let other = server
        .service_account_client(NAMESPACE, "other")
        .await
        .expect("client for another service account");
    assert_eq!(read_status(other).await, 403);
    eprintln!("reader may not create (403); another service account still may not read (403)");

    let out = server
        .kubectl_output(["get", "ns"])
        .expect("kubectl get ns");
    eprintln!("kubectl get ns:\n{out}");
    assert!(out.contains(NAMESPACE), "kubectl get ns: {out}");
    assert!(out.contains("default"), "kubectl get ns: {out}");

    server
        .install_snapshot_crds()
        .expect("installing the VolumeSnapshot CRDs");
    let crds = server
        .kubectl_output(["get", "crd", "-o", "name"])
        .expect("kubectl get crd");
    for crd in [
        "volumesnapshots.snapshot.storage.k8s.io",
        "volumesnapshotcontents.snapshot.storage.k8s.io",
        "volumesnapshotclasses.snapshot.storage.k8s.io",
    ] {
        assert!(crds.contains(crd), "{crd} missing from: {crds}");
    }
    server
        .kubectl_output(["get", "volumesnapshots", "--all-namespaces"])
        .expect("VolumeSnapshots are served");
    eprintln!("snapshot CRDs established and served");

    let (etcd, apiserver) = server.pids();
    let dir = server.dir().to_owned();
    let kept = server.keeps_dir();
    let stopping = Instant::now();
    server.stop().expect("stopping gracefully");
    eprintln!(
        "stopped gracefully in {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    assert!(gone(etcd), "etcd still running");
    assert!(gone(apiserver), "kube-apiserver still running");
    assert!(kept || !dir.exists(), "{} still exists", dir.display());
}

#[tokio::test]
async fn dropping_the_server_kills_everything() {
    let server = start().await;
    let (etcd, apiserver) = server.pids();
    let dir = server.dir().to_owned();
    let kept = server.keeps_dir();
    drop(server);
    assert!(gone(etcd), "etcd still running after drop");
    assert!(gone(apiserver), "kube-apiserver still running after drop");
    assert!(
        kept || !dir.exists(),
        "{} still exists after drop",
        dir.display()
    );
}
