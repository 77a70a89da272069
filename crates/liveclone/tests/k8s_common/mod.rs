//! What the tests against a real kube-apiserver share (`k8s_crds`,
//! `k8s_node_agent`): starting the server, installing the checked-in CRDs,
//! namespaces, and reading kubectl's tables. kubectl runs with argument
//! vectors, never through a shell.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

mod fake_node;
#[allow(unused_imports)] // not every test binary runs agents
pub use fake_node::FakeNode;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use kubetest::ApiServer;
use liveclone::k8s::crds;

pub async fn start() -> ApiServer {
    let started = Instant::now();
    let server = ApiServer::start()
        .await
        .unwrap_or_else(|e| panic!("starting etcd and kube-apiserver: {e:#}"));
    eprintln!(
        "kube-apiserver at {} ready in {:.1} s",
        server.url(),
        started.elapsed().as_secs_f64()
    );
    server
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Applies the checked-in CRDs (what users and the chart install) and waits
/// until they are served.
pub fn install_crds(server: &ApiServer) {
    let generated = crds::files().expect("generating the CRDs");
    let dir = repo_root().join("deploy/crds");
    for file in &generated {
        let checked_in = std::fs::read_to_string(dir.join(&file.file_name))
            .unwrap_or_else(|e| panic!("reading deploy/crds/{}: {e}", file.file_name));
        assert!(
            checked_in == file.yaml,
            "deploy/crds/{} is stale: run `make crds`",
            file.file_name
        );
    }
    let out = server
        .kubectl_output([
            "apply".as_ref(),
            "--server-side".as_ref(),
            "--field-manager=liveclone-crds".as_ref(),
            "-f".as_ref(),
            dir.as_os_str(),
        ])
        .expect("kubectl apply -f deploy/crds");
    eprint!("kubectl apply --server-side -f deploy/crds:\n{out}");
    let mut wait = vec![
        "wait".to_owned(),
        "--for=condition=Established".to_owned(),
        "--timeout=60s".to_owned(),
    ];
    wait.extend(
        generated
            .iter()
            .map(|f| format!("crd/{}", f.file_name.trim_end_matches(".yaml"))),
    );
    server
        .kubectl_output(&wait)
        .expect("waiting for the CRDs to be established");
}

pub async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(name, None),
                ..Namespace::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
}

pub fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        ..ObjectMeta::default()
    }
}

/// kubectl's table: one map per row from column name to cell, by the
/// header's column positions (cells such as "120.0 MiB/s" hold spaces).
pub fn parse_table(out: &str) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    let mut starts = Vec::new();
    let mut names = Vec::new();
    let mut previous = ' ';
    for (index, c) in header.char_indices() {
        if c != ' ' && previous == ' ' {
            starts.push(index);
        }
        previous = c;
    }
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(header.len());
        names.push(header[start..end].trim().to_owned());
    }
    let rows = lines
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let start = starts[i].min(line.len());
                    let end = starts
                        .get(i + 1)
                        .copied()
                        .unwrap_or(line.len())
                        .min(line.len());
                    (name.clone(), line[start..end].trim().to_owned())
                })
                .collect()
        })
        .collect();
    (names, rows)
}

pub fn kubectl_table(
    server: &ApiServer,
    args: &[&str],
) -> (Vec<String>, Vec<BTreeMap<String, String>>) {
    let out = server
        .kubectl_output(args)
        .unwrap_or_else(|e| panic!("kubectl {}: {e:#}", args.join(" ")));
    eprintln!("$ kubectl {}\n{out}", args.join(" "));
    parse_table(&out)
}

pub fn row<'a>(rows: &'a [BTreeMap<String, String>], name: &str) -> &'a BTreeMap<String, String> {
    rows.iter()
        .find(|r| r.get("NAME").map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no row named {name} in {rows:?}"))
}

/// Applies an RBAC file of deploy/rbac (into an existing or new namespace
/// `account_namespace`) and checks that its ClusterRole `role` grants
/// exactly `wanted` (group, resource, verb) triples: a missing rule fails
/// the agent run as that account, an extra one fails here.
/// What the node agent's ClusterRole (deploy/rbac/node.yaml) must grant,
/// no more: the tests that run the agent as that account check it.
pub const NODE_AGENT_RULES: &[(&str, &str, &str)] = &[
    ("liveclone.io", "volumehydrations", "list"),
    ("liveclone.io", "volumehydrations", "watch"),
    ("liveclone.io", "volumehydrations/status", "patch"),
    ("liveclone.io", "liveclonevolumes", "list"),
    ("liveclone.io", "liveclonevolumes", "watch"),
    ("liveclone.io", "liveclonevolumes", "patch"),
    ("liveclone.io", "liveclonevolumes/status", "patch"),
    ("liveclone.io", "liveclonesnapshots", "list"),
    ("liveclone.io", "liveclonesnapshots", "watch"),
    ("liveclone.io", "liveclonesnapshots", "patch"),
    ("liveclone.io", "liveclonesnapshots/status", "patch"),
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
    ("", "persistentvolumeclaims", "get"),
    ("liveclone.io", "liveclonenodes", "create"),
    ("liveclone.io", "liveclonenodes", "patch"),
    ("liveclone.io", "liveclonenodes/status", "patch"),
];

/// What the controller agent's ClusterRole (`liveclone-controller` in
/// deploy/rbac/controller.yaml) must grant, no more.
pub const CONTROLLER_AGENT_RULES: &[(&str, &str, &str)] = &[
    ("liveclone.io", "liveclonevolumes", "get"),
    ("liveclone.io", "liveclonevolumes", "list"),
    ("liveclone.io", "liveclonevolumes", "create"),
    ("liveclone.io", "liveclonevolumes", "patch"),
    ("liveclone.io", "liveclonevolumes", "delete"),
    ("liveclone.io", "liveclonesnapshots", "get"),
    ("liveclone.io", "liveclonesnapshots", "list"),
    ("liveclone.io", "liveclonesnapshots", "create"),
    ("liveclone.io", "liveclonesnapshots", "patch"),
    ("liveclone.io", "liveclonesnapshots", "delete"),
    ("liveclone.io", "volumehydrations", "get"),
    ("liveclone.io", "volumehydrations", "create"),
    ("liveclone.io", "volumehydrations", "patch"),
    ("liveclone.io", "volumehydrations", "delete"),
    ("liveclone.io", "liveclonenodes", "get"),
    ("liveclone.io", "liveclonenodes", "list"),
];

pub async fn install_rbac_exactly(
    server: &ApiServer,
    admin: &Client,
    file: &str,
    role: &str,
    wanted: &[(&str, &str, &str)],
) {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    use std::collections::BTreeSet;

    let path = repo_root().join(file);
    let out = server
        .kubectl_output(["apply".as_ref(), "-f".as_ref(), path.as_os_str()])
        .unwrap_or_else(|e| panic!("kubectl apply -f {file}: {e:#}"));
    eprint!("kubectl apply -f {file}:\n{out}");
    let rules = Api::<ClusterRole>::all(admin.clone())
        .get(role)
        .await
        .unwrap_or_else(|e| panic!("the ClusterRole {role}: {e}"))
        .rules
        .unwrap_or_default();
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert_eq!(rule.resource_names, None, "{rule:?}");
        assert_eq!(rule.non_resource_urls, None, "{rule:?}");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let wanted: BTreeSet<(String, String, String)> = wanted
        .iter()
        .map(|(g, r, v)| ((*g).to_owned(), (*r).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(granted, wanted, "{file} grants other rules than expected");
}
