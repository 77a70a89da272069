#![cfg(feature = "real-kernel")]
//! Kubernetes mode on the real kernel: the real `liveclone controller
//! --kubernetes` and `liveclone node --kubernetes` binaries, talking to a
//! real kube-apiserver (and etcd) started inside the test VM on its
//! loopback, make a live clone of an ext4 volume with dm-clone.
//!
//! * etcd and kube-apiserver come from the kubetest harness (binaries of
//!   `tests/tools/build-k8s-tools.sh`, which the VM reads from the host's
//!   tools cache over virtfs); the CRDs of deploy/crds and the RBAC of
//!   deploy/rbac/{node,controller}.yaml are applied, and each agent runs
//!   with a kubeconfig holding a real token of its service account.
//! * Over the controller's CSI socket: CreateVolume of an ext4 source on
//!   the node (accessibility requirements name it), which is staged and
//!   published over the node's socket and filled with files; then
//!   CreateVolume of a clone of it with the claim metadata csi-provisioner's
//!   `--extra-create-metadata` sends, for a claim that exists (Events need
//!   a target).
//! * The clone's VolumeHydration (claim's namespace, claim's name) is
//!   watched through the API server: Hydrating, then (after the source's
//!   DeleteVolume, and tunables raised by editing the VolumeHydration's
//!   spec as a user would) Complete with its figures; the clone's device is
//!   then one `linear` target and its files match the source's checksums.
//! * DeleteVolume of both; their LivecloneVolumes and the VolumeHydration
//!   go; no device-mapper device, loop device, pool file or mount is left.
//!
//! `kubectl get vh -A` is printed mid-hydration and at the end (visible
//! with `--nocapture`). On failure the logs of both agents are printed,
//! with the kernel's state.
//!
//!     cargo build -p vmtest && bash tests/vm/prepare.sh
//!     target/debug/vmtest test --timeout 3000 --test-arg=--test-threads=1 \
//!         --test-arg=--nocapture -- -p liveclone --features real-kernel \
//!         --test real_k8s_agents
//!
//! The tools are found as kubetest finds them; in the VM `HOME` is /root,
//! so when the build's `HOME` differs the env file of the build's tools
//! cache is named explicitly (see [`locate_tools`]).

mod common;
mod k8s_common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    assert_single_linear, create_request, driver_binary, output_or_error, require_real_kernel, say,
    sha256_hex, tail_of, Access, Bench, Csi, Pool, Source, MIB,
};
use k8s_common::{create_namespace, install_crds, meta, repo_root};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, TypedLocalObjectReference,
    VolumeResourceRequirements,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use kubetest::{ApiServer, Daemon, Options, Tool, Tools};
use liveclone::domain::hydration::HydrationPhase;
use liveclone::grpc::client::connect_unix;
use liveclone::grpc::TOPOLOGY_NODE_KEY;
use liveclone::k8s::{LivecloneVolume, VolumeHydration, VolumeHydrationStatus};
use liveclone::proto::csi::v1 as csi;
use liveclone::proto::csi::v1::controller_client::ControllerClient;
use liveclone::proto::csi::v1::identity_client::IdentityClient;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

/// The Kubernetes node name, also the node agent's `--node-id`.
const NODE: &str = "vm-node";
/// The users' namespace: the claims and the VolumeHydration.
const NS: &str = "lc-vm";
/// The release namespace of deploy/rbac/*.yaml.
const RELEASE_NS: &str = "liveclone";
const NODE_ACCOUNT: &str = "liveclone-node";
const CONTROLLER_ACCOUNT: &str = "liveclone-controller";
const SOURCE_CLAIM: &str = "data";
const CLONE_CLAIM: &str = "data-clone";
const VOLUME_BYTES: u64 = 128 * MIB;
const CLAIM_SIZE: &str = "128Mi";
/// Files written into the source: 12 MiB of data to copy besides the file
/// system's own blocks.
const FILES: u64 = 12;
const FILE_BYTES: usize = MIB as usize;
/// The clone copies one 4 KiB region at a time until the test raises the
/// tunables through the VolumeHydration, so that it is seen mid-copy.
const SLOW: [(&str, &str); 3] = [
    ("liveclone.io/regionSize", "4KiB"),
    ("liveclone.io/hydrationThreshold", "1"),
    ("liveclone.io/hydrationBatchSize", "1"),
];
const FAST_THRESHOLD: u32 = 4096;
const FAST_BATCH: u32 = 1024;
/// etcd plus kube-apiserver under QEMU's software CPU.
const APISERVER_START_LIMIT: Duration = Duration::from_secs(900);
/// An agent's socket answering Probe with ready.
const AGENT_START_LIMIT: Duration = Duration::from_secs(180);
/// A CSI call retried on UNAVAILABLE/ABORTED (as the sidecars do).
const CSI_RETRY_LIMIT: Duration = Duration::from_secs(300);
const HYDRATION_LIMIT: Duration = Duration::from_secs(900);
/// The agents' RUST_LOG unless the environment sets one.
const AGENT_LOG: &str = "info,liveclone=debug";
/// Lines of each agent's log printed on failure.
const LOG_TAIL: usize = 300;

// ---------------------------------------------------------------------------
// Finding the tools in the VM.

/// The env file of the tools cache as the build resolved it, from the
/// environment `cargo` compiled this test with (kubetest's resolution, at
/// build time): the VM's `HOME` is /root, which need not be the builder's.
fn build_time_env_file() -> Option<PathBuf> {
    if let Some(file) = option_env!("LIVECLONE_K8S_ENV").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(file));
    }
    let root = if let Some(dir) = option_env!("LIVECLONE_TOOLS_CACHE").filter(|v| !v.is_empty()) {
        PathBuf::from(dir)
    } else if let Some(xdg) = option_env!("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        PathBuf::from(xdg).join("liveclone/tools")
    } else {
        PathBuf::from(option_env!("HOME")?).join(".cache/liveclone/tools")
    };
    Some(root.join("k8s.env"))
}

/// The Kubernetes binaries: as kubetest finds them in the VM's environment,
/// else through the build's env file (named by `LIVECLONE_K8S_ENV`, set
/// here before any other thread exists).
fn locate_tools() -> Tools {
    let tools = Tools::locate().unwrap_or_else(|e| panic!("locating the Kubernetes tools: {e:#}"));
    if tools.get(Tool::KubeApiserver).is_ok() || std::env::var_os("LIVECLONE_K8S_ENV").is_some() {
        say(&format!(
            "Kubernetes tools from {} (HOME={})",
            tools.env_file().display(),
            std::env::var("HOME").unwrap_or_default()
        ));
        return tools;
    }
    let Some(file) = build_time_env_file().filter(|file| file.is_file()) else {
        return tools;
    };
    say(&format!(
        "no tools at {} (HOME={}); using the build's {}",
        tools.env_file().display(),
        std::env::var("HOME").unwrap_or_default(),
        file.display()
    ));
    // Single-threaded here: the runtime is not built yet.
    std::env::set_var("LIVECLONE_K8S_ENV", &file);
    Tools::locate().unwrap_or_else(|e| panic!("locating the Kubernetes tools: {e:#}"))
}

// ---------------------------------------------------------------------------
// The agents.

/// The two agent processes; stopped (SIGTERM, then SIGKILL) when dropped,
/// after printing their logs if the test is failing.
struct Agents {
    running: Vec<Daemon>,
}

impl Agents {
    /// `liveclone <args>` with KUBECONFIG set, through `env` so that the
    /// harness's Daemon (log file, killed with the test process) runs it.
    fn spawn(&mut self, name: &'static str, args: &[&OsStr], kubeconfig: &Path, log: &Path) {
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| AGENT_LOG.to_owned());
        // The rest of the environment is the test's (PATH, the VM's
        // DM_DISABLE_UDEV and LIVECLONE_IN_VM).
        let kube_env = format!("KUBECONFIG={}", kubeconfig.display());
        let log_env = format!("RUST_LOG={rust_log}");
        let mut argv: Vec<&OsStr> = Vec::new();
        argv.extend([
            OsStr::new(&kube_env),
            OsStr::new(&log_env),
            driver_binary().as_os_str(),
        ]);
        argv.extend(args);
        let daemon = Daemon::spawn(name, Path::new("/usr/bin/env"), &argv, log)
            .unwrap_or_else(|e| panic!("starting {name}: {e:#}"));
        self.running.push(daemon);
    }

    fn get(&mut self, name: &str) -> &mut Daemon {
        self.running
            .iter_mut()
            .find(|d| d.name() == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// Panics with its log if an agent has ended.
    fn check(&mut self) {
        for agent in &mut self.running {
            if let Some(status) = agent.exited().expect("checking an agent") {
                panic!(
                    "{} exited ({status}); log {}:\n{}",
                    agent.name(),
                    agent.log_path().display(),
                    agent.log_tail(120)
                );
            }
        }
    }

    /// Waits until the agent's socket answers Probe with ready.
    async fn wait_ready(&mut self, name: &str, endpoint: &str) -> Channel {
        let started = Instant::now();
        loop {
            self.check();
            let last = match connect_unix(endpoint).await {
                Ok(channel) => {
                    match IdentityClient::new(channel.clone())
                        .probe(csi::ProbeRequest {})
                        .await
                    {
                        Ok(answer) if answer.get_ref().ready == Some(true) => {
                            say(&format!(
                                "{name} ready in {:.1} s",
                                started.elapsed().as_secs_f64()
                            ));
                            return channel;
                        }
                        Ok(answer) => format!("Probe: {:?}", answer.get_ref()),
                        Err(status) => format!("Probe: {status}"),
                    }
                }
                Err(e) => format!("{e:#}"),
            };
            assert!(
                started.elapsed() < AGENT_START_LIMIT,
                "{name} not ready within {AGENT_START_LIMIT:?}: {last}; log:\n{}",
                self.get(name).log_tail(120)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let show = std::env::var_os("LIVECLONE_TEST_SHOW_LOG").is_some_and(|v| v == "1");
        for agent in &mut self.running {
            let ended = agent.stop(Duration::from_secs(20));
            if failed || show {
                say(&format!(
                    "--- {} ({:?}), log {}, last {LOG_TAIL} lines ---\n{}\n--- end of {} ---",
                    agent.name(),
                    ended,
                    agent.log_path().display(),
                    tail_of(agent.log_path(), LOG_TAIL),
                    agent.name()
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Kubernetes objects.

/// A claim as a user makes it (nothing binds it: no controller runs); its
/// UID, from which its PV is named as the provisioner names it.
async fn create_claim(client: &Client, name: &str, source_claim: Option<&str>) -> String {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let claim = PersistentVolumeClaim {
        metadata: meta(name, Some(NS)),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(CLAIM_SIZE.to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            storage_class_name: Some("liveclone".to_owned()),
            data_source: source_claim.map(|source| TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".to_owned(),
                name: source.to_owned(),
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    let made = claims
        .create(&PostParams::default(), &claim)
        .await
        .unwrap_or_else(|e| panic!("creating claim {NS}/{name}: {e}"));
    made.uid().expect("a created claim has a UID")
}

/// Applies a file of deploy/rbac.
fn apply_rbac(server: &ApiServer, file: &str) {
    let path = repo_root().join("deploy/rbac").join(file);
    assert!(
        path.is_file(),
        "{} does not exist (deploy/rbac/{file} is needed for the agent's account)",
        path.display()
    );
    let out = server
        .kubectl_output(["apply".as_ref(), "-f".as_ref(), path.as_os_str()])
        .unwrap_or_else(|e| panic!("kubectl apply -f deploy/rbac/{file}: {e:#}"));
    say(&format!(
        "kubectl apply -f deploy/rbac/{file}:\n{}",
        out.trim()
    ));
}

fn kubectl_show(server: &ApiServer, args: &[&str]) {
    match server.kubectl_output(args) {
        Ok(out) => say(&format!("$ kubectl {}\n{}", args.join(" "), out.trim_end())),
        Err(e) => say(&format!("$ kubectl {}\n({e:#})", args.join(" "))),
    }
}

/// Every distinct status of the VolumeHydration the watch delivered.
type Seen = Arc<Mutex<Vec<VolumeHydrationStatus>>>;

fn watch_statuses(api: Api<VolumeHydration>, name: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let stream = watcher(api, config).applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let vh = match item {
                    Ok(vh) => vh,
                    Err(e) => {
                        say(&format!("  (watch of the VolumeHydration: {e})"));
                        continue;
                    }
                };
                let Some(status) = vh.status else {
                    continue;
                };
                let mut seen = seen.lock().expect("the status log");
                if seen.last() != Some(&status) {
                    say(&format!("  watch: {}", describe(&status)));
                    seen.push(status);
                }
            }
        })
    };
    (seen, task)
}

fn describe(status: &VolumeHydrationStatus) -> String {
    format!(
        "phase {:?}, {} of {} bytes ({}), rate {}, message {:?}",
        status.phase,
        status.hydrated_bytes.unwrap_or(0),
        status.total_bytes.unwrap_or(0),
        status.progress.as_deref().unwrap_or("-"),
        status.rate.as_deref().unwrap_or("-"),
        status.message.as_deref().unwrap_or("")
    )
}

fn latest(seen: &Seen) -> Option<VolumeHydrationStatus> {
    seen.lock().expect("the status log").last().cloned()
}

/// Waits until the watched status satisfies `done`; panics on `Failed`, on
/// an agent's exit, or after `limit`.
async fn wait_status(
    seen: &Seen,
    agents: &mut Agents,
    what: &str,
    limit: Duration,
    done: impl Fn(&VolumeHydrationStatus) -> bool,
) -> VolumeHydrationStatus {
    let started = Instant::now();
    loop {
        agents.check();
        let status = latest(seen);
        if let Some(status) = &status {
            if done(status) {
                say(&format!(
                    "{what}: after {:.1} s: {}",
                    started.elapsed().as_secs_f64(),
                    describe(status)
                ));
                return status.clone();
            }
            assert!(
                status.phase != Some(HydrationPhase::Failed),
                "{what}: the hydration failed: {status:?}"
            );
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------
// CSI calls, retried as the sidecars retry them.

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
    )
}

async fn create_volume(
    controller: &mut ControllerClient<Channel>,
    agents: &mut Agents,
    request: csi::CreateVolumeRequest,
) -> csi::Volume {
    let started = Instant::now();
    loop {
        agents.check();
        match controller.create_volume(request.clone()).await {
            Ok(answer) => {
                say(&format!(
                    "CreateVolume {} answered in {:.1} s",
                    request.name,
                    started.elapsed().as_secs_f64()
                ));
                return answer
                    .into_inner()
                    .volume
                    .expect("CreateVolume returned no volume");
            }
            Err(status) if retryable(status.code()) && started.elapsed() < CSI_RETRY_LIMIT => {
                say(&format!(
                    "  CreateVolume {}: {:?}: {}; retrying",
                    request.name,
                    status.code(),
                    status.message()
                ));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(status) => panic!(
                "CreateVolume {} failed after {:.1} s: {:?}: {}",
                request.name,
                started.elapsed().as_secs_f64(),
                status.code(),
                status.message()
            ),
        }
    }
}

async fn delete_volume(controller: &mut ControllerClient<Channel>, agents: &mut Agents, id: &str) {
    let started = Instant::now();
    loop {
        agents.check();
        let request = csi::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        };
        match controller.delete_volume(request).await {
            Ok(_) => {
                say(&format!(
                    "DeleteVolume {id} answered in {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
                return;
            }
            Err(status) if retryable(status.code()) && started.elapsed() < CSI_RETRY_LIMIT => {
                say(&format!(
                    "  DeleteVolume {id}: {:?}: {}; retrying",
                    status.code(),
                    status.message()
                ));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(status) => panic!(
                "DeleteVolume {id} failed: {:?}: {}",
                status.code(),
                status.message()
            ),
        }
    }
}

/// What csi-provisioner sends with `--extra-create-metadata` for a claim.
fn claim_parameters<'a>(claim: &'a str, pv: &'a str) -> [(&'static str, &'a str); 3] {
    [
        ("csi.storage.k8s.io/pvc/name", claim),
        ("csi.storage.k8s.io/pvc/namespace", NS),
        ("csi.storage.k8s.io/pv/name", pv),
    ]
}

/// Accessibility requirements naming the node, as the provisioner sends
/// them for a claim whose pod the scheduler put there.
fn on_the_node() -> csi::TopologyRequirement {
    let topology = csi::Topology {
        segments: [(TOPOLOGY_NODE_KEY.to_owned(), NODE.to_owned())]
            .into_iter()
            .collect(),
    };
    csi::TopologyRequirement {
        requisite: vec![topology.clone()],
        preferred: vec![topology],
    }
}

// ---------------------------------------------------------------------------
// Data.

/// Reproducible bytes that differ per seed (xorshift64*).
fn sample(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes the files, synced; file name to SHA-256.
fn write_files(dir: &Path) -> BTreeMap<String, String> {
    let mut sums = BTreeMap::new();
    for i in 0..FILES {
        let name = format!("file-{i:02}.bin");
        let data = sample(i + 1, FILE_BYTES);
        let path = dir.join(&name);
        let mut file = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        file.write_all(&data)
            .and_then(|()| file.sync_all())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        sums.insert(name, sha256_hex(&data));
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("syncing {}: {e}", dir.display()));
    sums
}

fn verify_files(dir: &Path, sums: &BTreeMap<String, String>) {
    for (name, sum) in sums {
        let path = dir.join(name);
        let data =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let got = sha256_hex(&data);
        assert_eq!(
            &got,
            sum,
            "{} differs from the source's file ({} bytes)",
            path.display(),
            data.len()
        );
    }
    say(&format!(
        "the clone's {} files match the source's SHA-256 sums (first {} {})",
        sums.len(),
        sums.keys().next().map(String::as_str).unwrap_or("-"),
        sums.values().next().map(String::as_str).unwrap_or("-")
    ));
}

// ---------------------------------------------------------------------------
// The test.

#[test]
fn kubernetes_mode_clones_hydrate_to_linear_on_the_real_kernel() {
    require_real_kernel();
    let tools = locate_tools();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
        .block_on(story(tools));
}

async fn story(tools: Tools) {
    // Dropped last: clean-up of mounts, devices, loops and folders.
    let bench = Bench::new("k8s", Pool::Ext4);

    bench.step(&format!(
        "starting etcd + kube-apiserver (limit {APISERVER_START_LIMIT:?})"
    ));
    let started = Instant::now();
    let options = Options {
        startup_timeout: APISERVER_START_LIMIT,
        ..Options::default()
    };
    let server = ApiServer::start_with(tools, options)
        .await
        .unwrap_or_else(|e| panic!("starting etcd and kube-apiserver in the VM: {e:#}"));
    let (etcd_pid, apiserver_pid) = server.pids();
    bench.step(&format!(
        "etcd + kube-apiserver ready at {} in {:.1} s (kube-apiserver {}, etcd {}); {}",
        server.url(),
        started.elapsed().as_secs_f64(),
        rss(apiserver_pid),
        rss(etcd_pid),
        mem_available()
    ));
    let started = Instant::now();
    install_crds(&server);
    let admin = server.client().expect("admin client");
    create_namespace(&admin, RELEASE_NS).await;
    create_namespace(&admin, NS).await;
    apply_rbac(&server, "node.yaml");
    apply_rbac(&server, "controller.yaml");
    let node_kubeconfig = server
        .service_account_kubeconfig(RELEASE_NS, NODE_ACCOUNT)
        .await
        .expect("the node agent's kubeconfig");
    let controller_kubeconfig = server
        .service_account_kubeconfig(RELEASE_NS, CONTROLLER_ACCOUNT)
        .await
        .expect("the controller agent's kubeconfig");
    bench.step(&format!(
        "CRDs, namespaces, RBAC and service-account kubeconfigs in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // Dropped before the server and the bench: the agents stop first.
    let mut agents = Agents {
        running: Vec::new(),
    };
    let node_socket = bench.root.join("node.sock");
    let node_endpoint = format!("unix://{}", node_socket.display());
    let controller_endpoint = format!("unix://{}", bench.root.join("controller.sock").display());
    agents.spawn(
        "liveclone node",
        &[
            OsStr::new("node"),
            OsStr::new("--kubernetes"),
            OsStr::new("--node-id"),
            OsStr::new(NODE),
            OsStr::new("--endpoint"),
            OsStr::new(&node_endpoint),
            OsStr::new("--pool-dir"),
            bench.pool.as_os_str(),
            OsStr::new("--state-dir"),
            bench.state.as_os_str(),
            OsStr::new("--allowed-mount-root"),
            bench.mnt.as_os_str(),
            OsStr::new("--hydration-poll-seconds"),
            OsStr::new("0.5"),
        ],
        &node_kubeconfig,
        &bench.root.join("node.log"),
    );
    agents.spawn(
        "liveclone controller",
        &[
            OsStr::new("controller"),
            OsStr::new("--kubernetes"),
            OsStr::new("--endpoint"),
            OsStr::new(&controller_endpoint),
        ],
        &controller_kubeconfig,
        &bench.root.join("controller.log"),
    );
    let node_channel = agents.wait_ready("liveclone node", &node_endpoint).await;
    let controller_channel = agents
        .wait_ready("liveclone controller", &controller_endpoint)
        .await;
    // The node's socket: Node and the admin API (dm names, hydration).
    let mut node = Csi::new(node_channel);
    let mut controller = ControllerClient::new(controller_channel);
    bench.step("both agents ready");

    // The source: a claim, and CreateVolume as the provisioner makes it.
    let source_uid = create_claim(&admin, SOURCE_CLAIM, None).await;
    let source_pv = format!("pvc-{source_uid}");
    let mut request = create_request(
        &source_pv,
        VOLUME_BYTES,
        Access::Ext4,
        None,
        &claim_parameters(SOURCE_CLAIM, &source_pv),
    );
    request.accessibility_requirements = Some(on_the_node());
    let source = create_volume(&mut controller, &mut agents, request).await;
    bench.step(&format!(
        "source {} made on {NODE}: {} bytes, topology {:?}",
        source.volume_id, source.capacity_bytes, source.accessible_topology
    ));
    let volumes: Api<LivecloneVolume> = Api::all(admin.clone());
    let object = volumes
        .get(&source.volume_id)
        .await
        .expect("the source's LivecloneVolume");
    say(&format!(
        "LivecloneVolume {}: node {}, status {:?}",
        object.name_any(),
        object.spec.node,
        object.status.as_ref().map(|s| (&s.phase, s.capacity_bytes))
    ));
    let source_mount = node
        .stage_publish(&bench.mnt, &source.volume_id, Access::Ext4, "source")
        .await;
    let sums = write_files(&source_mount.target);
    bench.step(&format!(
        "source staged, published and filled: {FILES} files of {FILE_BYTES} bytes"
    ));

    // The clone, for a claim whose data source is the source's claim.
    let clone_uid = create_claim(&admin, CLONE_CLAIM, Some(SOURCE_CLAIM)).await;
    let clone_pv = format!("pvc-{clone_uid}");
    let hydrations: Api<VolumeHydration> = Api::namespaced(admin.clone(), NS);
    let (seen, watch) = watch_statuses(hydrations.clone(), CLONE_CLAIM);
    let mut parameters: Vec<(&str, &str)> = SLOW.to_vec();
    parameters.extend(claim_parameters(CLONE_CLAIM, &clone_pv));
    let mut request = create_request(
        &clone_pv,
        VOLUME_BYTES,
        Access::Ext4,
        Some(Source::Volume(&source.volume_id)),
        &parameters,
    );
    request.accessibility_requirements = Some(on_the_node());
    let clone = create_volume(&mut controller, &mut agents, request).await;
    bench.step(&format!(
        "clone {} made: {} bytes, content source {:?}",
        clone.volume_id, clone.capacity_bytes, clone.content_source
    ));
    let vh = hydrations
        .get(CLONE_CLAIM)
        .await
        .expect("the clone's VolumeHydration, made with it");
    assert_eq!(vh.spec.destination.volume_handle, clone.volume_id);
    assert_eq!(vh.spec.destination.persistent_volume_name, clone_pv);
    assert_eq!(vh.spec.node, NODE);
    assert_eq!(vh.spec.pvc, CLONE_CLAIM);
    assert_eq!(vh.spec.source.name, SOURCE_CLAIM);
    assert_eq!(
        vh.spec.source.volume_handle.as_deref(),
        Some(source.volume_id.as_str())
    );

    let hydrating = wait_status(
        &seen,
        &mut agents,
        "VolumeHydration Hydrating",
        HYDRATION_LIMIT,
        |s| s.phase == Some(HydrationPhase::Hydrating),
    )
    .await;
    say("--- mid-hydration ---");
    kubectl_show(&server, &["get", "vh", "-A"]);
    kubectl_show(&server, &["get", "vh", "-A", "-o", "wide"]);
    kubectl_show(&server, &["get", "liveclonevolumes"]);
    let dm_clone = node.dm_name_of(&clone.volume_id).await;
    say(&format!(
        "{dm_clone}: {}",
        output_or_error("dmsetup", &["status", "--noflush", &dm_clone])
    ));
    assert!(
        hydrating.hydrated_bytes < hydrating.total_bytes,
        "Hydrating with everything copied: {hydrating:?}"
    );

    // The source goes while its clone still copies.
    node.unpublish_unstage(&source_mount).await;
    delete_volume(&mut controller, &mut agents, &source.volume_id).await;
    let gone = volumes
        .get_opt(&source.volume_id)
        .await
        .expect("reading the source's LivecloneVolume");
    assert!(
        gone.is_none(),
        "the source's LivecloneVolume is still there: {gone:?}"
    );
    let still = latest(&seen).expect("a status");
    bench.step(&format!(
        "source deleted during the hydration, its LivecloneVolume is gone; clone: {}",
        describe(&still)
    ));

    // As a user would: faster copying through the VolumeHydration's spec.
    hydrations
        .patch(
            CLONE_CLAIM,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tunables": {
                "hydrationThreshold": FAST_THRESHOLD,
                "hydrationBatchSize": FAST_BATCH,
            }}})),
        )
        .await
        .expect("raising the tunables in the VolumeHydration's spec");
    bench.step("tunables raised in the VolumeHydration's spec");
    let complete = wait_status(
        &seen,
        &mut agents,
        "VolumeHydration Complete",
        HYDRATION_LIMIT,
        |s| s.phase == Some(HydrationPhase::Complete),
    )
    .await;
    let history: Vec<Option<HydrationPhase>> = seen
        .lock()
        .expect("the status log")
        .iter()
        .map(|s| s.phase)
        .collect();
    say(&format!("phases the watch saw: {history:?}"));
    assert!(
        history.contains(&Some(HydrationPhase::Hydrating)),
        "{history:?}"
    );
    assert_eq!(
        complete.hydrated_bytes, complete.total_bytes,
        "{complete:?}"
    );
    assert!(complete.total_bytes.is_some_and(|t| t > 0), "{complete:?}");
    assert_eq!(complete.percent, Some(100.0), "{complete:?}");
    assert!(complete.completed_at.is_some(), "{complete:?}");
    assert!(complete.started_at.is_some(), "{complete:?}");
    let ready = complete
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str());
    assert_eq!(ready, Some("True"), "{complete:?}");
    say("--- complete ---");
    kubectl_show(&server, &["get", "vh", "-A", "-o", "wide"]);
    let hydration = node.hydration_of(&clone.volume_id).await;
    say(&format!(
        "admin API: {} {:.1}%, threshold {}, batch {}",
        hydration.phase, hydration.percent, hydration.threshold, hydration.batch_size
    ));

    // The clone is a plain linear device with the source's files.
    assert_eq!(node.dm_name_of(&clone.volume_id).await, dm_clone);
    assert_single_linear(&dm_clone, VOLUME_BYTES);
    say(&format!(
        "{dm_clone}: {}",
        output_or_error("dmsetup", &["table", &dm_clone])
    ));
    let clone_mount = node
        .stage_publish(&bench.mnt, &clone.volume_id, Access::Ext4, "clone")
        .await;
    common::drop_caches();
    verify_files(&clone_mount.target, &sums);
    node.unpublish_unstage(&clone_mount).await;

    // The Events on the VolumeHydration and the claim.
    let events: Api<Event> = Api::namespaced(admin.clone(), NS);
    let started = Instant::now();
    loop {
        let list = events
            .list(&ListParams::default())
            .await
            .expect("listing Events");
        let complete = list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("HydrationComplete"));
        if complete || started.elapsed() > Duration::from_secs(30) {
            for event in &list.items {
                let regarding = event.regarding.as_ref();
                say(&format!(
                    "Event {} on {} {}: {}",
                    event.reason.as_deref().unwrap_or("-"),
                    regarding.and_then(|r| r.kind.as_deref()).unwrap_or("-"),
                    regarding.and_then(|r| r.name.as_deref()).unwrap_or("-"),
                    event.note.as_deref().unwrap_or("")
                ));
            }
            assert!(complete, "no HydrationComplete Event within 30 s");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The clone goes too, and with it its VolumeHydration.
    delete_volume(&mut controller, &mut agents, &clone.volume_id).await;
    assert!(
        volumes
            .get_opt(&clone.volume_id)
            .await
            .expect("reading the clone's LivecloneVolume")
            .is_none(),
        "the clone's LivecloneVolume is still there"
    );
    let started = Instant::now();
    while hydrations
        .get_opt(CLONE_CLAIM)
        .await
        .expect("reading the VolumeHydration")
        .is_some()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the VolumeHydration outlived its clone by 30 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    watch.abort();
    kubectl_show(&server, &["get", "vh", "-A"]);
    kubectl_show(&server, &["get", "liveclonevolumes"]);
    let left = node.admin_list().await;
    assert!(left.is_empty(), "the node still lists volumes: {left:?}");
    bench.assert_nothing_left();
    bench.step("everything deleted: no device, loop, pool file or mount left");

    // A clean stop of both agents.
    for name in ["liveclone controller", "liveclone node"] {
        let ended = agents
            .get(name)
            .stop(Duration::from_secs(20))
            .expect("stopping an agent");
        say(&format!("{name} stopped: {ended:?}"));
    }
    drop(agents);
    drop(server);
}

/// Resident memory of a process, for the report.
fn rss(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "not running".to_owned();
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .map(|line| line.trim_start_matches("VmRSS:").trim().to_owned())
        })
        .map(|rss| format!("RSS {rss}"))
        .unwrap_or_else(|| "RSS unknown".to_owned())
}

fn mem_available() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("MemAvailable:"))
                .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "MemAvailable unknown".to_owned())
}
