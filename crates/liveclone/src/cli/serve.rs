//! `liveclone controller|node|standalone`: assemble the layers and serve.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tokio::sync::watch;
use tonic::service::Routes;
use tracing::{error, info, warn};

use crate::domain::device_class::DeviceClasses;
use crate::domain::engine::{Engine, EngineConfig};
use crate::domain::file_pool::FilePool;
use crate::domain::model::{SnapshotRecord, VolumeRecord};
use crate::domain::monitor::{self, MonitorConfig};
use crate::domain::paths::AllowedRoots;
use crate::domain::store::{JsonDirStore, RecordStore};
use crate::grpc::admin::AdminService;
use crate::grpc::controller::ControllerService;
use crate::grpc::identity::{IdentityService, NotReady, Readiness};
use crate::grpc::node::NodeService;
use crate::grpc::server::BoundSocket;
use crate::metrics::{self as metrics_endpoint, Metrics, MetricsListener};
use crate::os::Os;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// CSI endpoint: `unix:///abs/path` or an absolute socket path.
    #[arg(long, env = "CSI_ENDPOINT", default_value = super::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Where volume and snapshot records are kept (standalone state).
    #[arg(long, default_value = "/var/lib/liveclone/state")]
    pub state_dir: PathBuf,
    /// The file pool: a folder on ext4 or xfs that holds volume data
    /// (device class `file`, the default class).
    #[arg(long, default_value = "/var/lib/liveclone/pool")]
    pub pool_dir: PathBuf,
    /// A YAML file of LVM device classes (volume group, thin pool) that
    /// StorageClasses choose with `liveclone.io/deviceClass`; see
    /// docs/LVM.md.
    #[arg(long, env = "LIVECLONE_DEVICE_CLASSES")]
    pub device_classes: Option<PathBuf>,
    /// This node's name, reported in NodeGetInfo and topology (default:
    /// the host name).
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    /// A folder under which staging and target paths may be; repeat for
    /// several. Paths elsewhere are refused.
    #[arg(long = "allowed-mount-root", default_value = "/var/lib/kubelet")]
    pub allowed_mount_roots: Vec<PathBuf>,
    /// Most volumes published on this node at once.
    #[arg(long, default_value_t = 256)]
    pub max_volumes: u64,
    /// Seconds between hydration status readings (events wake it sooner).
    #[arg(long, default_value_t = 2.0)]
    pub hydration_poll_seconds: f64,
    /// Seconds without progress, while work remains, before a hydration is
    /// reported as stalled.
    #[arg(long, default_value_t = 30.0)]
    pub stall_after_seconds: f64,
    /// Size in KiB of the pieces in which the kernel's copier (kcopyd)
    /// splits each hydration copy: dm-mod's node-wide
    /// `kcopyd_subjob_size_kb`, which also applies to other device-mapper
    /// copies on the node (mirrors, snapshots). Larger pieces mean fewer,
    /// bigger I/Os; the kernel's default is 512 and its maximum 1024.
    /// 0 leaves the node's setting alone.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=1024))]
    pub kcopyd_subjob_kib: u32,
    /// Where to serve Prometheus metrics (`GET /metrics`), as IP:port,
    /// e.g. `127.0.0.1:9808`; empty or `off` serves none. Off unless asked:
    /// a fixed default port would make a second driver on the machine (a
    /// test, a second pool) fail to start. The Kubernetes manifests set it.
    #[arg(long, default_value = "off")]
    pub metrics_address: String,
    /// Kubernetes mode: `controller` turns CSI calls into LivecloneVolume
    /// and LivecloneSnapshot objects and waits for their nodes (no pool, no
    /// state folder); `node` makes the objects of its node (`--node-id`
    /// must be the Kubernetes node name) and publishes VolumeHydration
    /// status. Uses the in-cluster service account (or KUBECONFIG).
    #[arg(long, env = "LIVECLONE_KUBERNETES")]
    pub kubernetes: bool,
    /// Kubernetes mode, controller: seconds a CSI call waits for the
    /// node's report before answering UNAVAILABLE (the sidecar retries).
    /// Keep it below the sidecars' `--timeout`.
    #[arg(long, default_value_t = 50.0)]
    pub node_wait_seconds: f64,
    /// Kubernetes mode, node: at most one VolumeHydration status write per
    /// clone per this many seconds (phase changes are written at once).
    #[arg(long, default_value_t = 2.0)]
    pub status_interval_seconds: f64,
    /// Kubernetes mode, node: seconds between publishes of the node's
    /// LivecloneNode (its device classes' free space, which the controller
    /// answers GetCapacity from; figures older than three of these count as
    /// none).
    #[arg(long, default_value_t = 30.0)]
    pub capacity_interval_seconds: f64,
}

/// Which CSI services a process serves. Without `--kubernetes` every mode
/// runs the engine on this node's pool; with it, the controller agent runs
/// no engine and the node agents make what it asks for (see `k8s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    Standalone,
}

/// Probe's answer, kept current by a background check so that Probe itself
/// never runs a tool.
struct Health {
    state: RwLock<Result<(), NotReady>>,
}

impl Health {
    fn set(&self, value: Result<(), NotReady>) {
        let mut state = self
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *state = value;
    }
}

impl Readiness for Health {
    fn check(&self) -> Result<(), NotReady> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} must be a positive number of seconds"))
}

fn host_name() -> anyhow::Result<String> {
    let name = nix::unistd::gethostname().context("reading the host name")?;
    name.into_string()
        .map_err(|_| anyhow::anyhow!("the host name is not UTF-8; pass --node-id"))
}

/// Builds the engine over the real Linux implementations.
pub fn build_engine(args: &ServeArgs, node_id: String, os: Os) -> anyhow::Result<Engine> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let pool = FilePool::open(&args.pool_dir, os.clone())
        .map_err(|e| anyhow::anyhow!("opening the pool: {e}"))?;
    let volumes: Arc<dyn RecordStore<VolumeRecord>> =
        Arc::new(JsonDirStore::open(&args.state_dir)?);
    let snapshots: Arc<dyn RecordStore<SnapshotRecord>> =
        Arc::new(JsonDirStore::open(&args.state_dir)?);
    let config = EngineConfig {
        node_id,
        work_dir: args.state_dir.join("work"),
        allowed_roots: AllowedRoots::new(args.allowed_mount_roots.clone()),
        max_volumes: args.max_volumes,
    };
    let mut classes = DeviceClasses::single(Arc::new(pool));
    if let Some(path) = &args.device_classes {
        classes = super::device_classes::add_from_file(classes, path)?;
    }
    Ok(Engine::new(os, classes, volumes, snapshots, config))
}

/// Serves until SIGTERM or SIGINT, over the given OS implementation
/// (the binary passes the Linux one).
pub async fn run(mode: Mode, args: ServeArgs, os: Os) -> anyhow::Result<()> {
    if args.kubernetes {
        match mode {
            Mode::Controller => return run_kubernetes_controller(args).await,
            Mode::Standalone => anyhow::bail!(
                "standalone keeps its state in a local folder and runs without Kubernetes; in \
                 a cluster run `controller --kubernetes` and `node --kubernetes`"
            ),
            Mode::Node => {}
        }
    }
    let node_id = match &args.node_id {
        Some(id) => id.clone(),
        None => host_name()?,
    };
    let monitor_config = MonitorConfig {
        poll_interval: seconds(args.hydration_poll_seconds, "hydration-poll-seconds")?,
        stall_after: seconds(args.stall_after_seconds, "stall-after-seconds")?,
        ..MonitorConfig::default()
    };
    let metrics_address = metrics_endpoint::parse_address(&args.metrics_address)?;
    let agent_config = crate::k8s::node::NodeAgentConfig {
        hydrations: crate::k8s::node::HydrationAgentConfig {
            status_interval: seconds(args.status_interval_seconds, "status-interval-seconds")?,
            ..Default::default()
        },
        capacity_interval: seconds(args.capacity_interval_seconds, "capacity-interval-seconds")?,
        ..Default::default()
    };
    let mut kube_client = if args.kubernetes {
        Some(kubernetes_client().await?)
    } else {
        None
    };
    let _state_lock = lock_state_dir(&args.state_dir)?;
    let metrics_listener = bind_metrics(metrics_address).await?;
    // Before recovery loads any table: each clone table's copier takes the
    // value current when it is created.
    if args.kcopyd_subjob_kib > 0 {
        match os.kernel.set_kcopyd_subjob_kib(args.kcopyd_subjob_kib) {
            Ok(previous) if previous != args.kcopyd_subjob_kib => info!(
                previous,
                now = args.kcopyd_subjob_kib,
                "set dm-mod's kcopyd_subjob_size_kb (hydration copies in larger pieces)"
            ),
            Ok(_) => {}
            Err(e) => warn!("cannot set dm-mod's kcopyd_subjob_size_kb: {e}; hydration copies in the kernel's default pieces"),
        }
    }
    let metrics = Arc::new(Metrics::new());
    let engine =
        Arc::new(build_engine(&args, node_id.clone(), os)?.with_metrics(Arc::clone(&metrics)));
    info!(?mode, node = %node_id, classes = %engine.device_classes().describe(), "starting");

    let health = Arc::new(Health {
        state: RwLock::new(Err(NotReady::Initializing(
            "re-assembling volumes from the state folder".to_owned(),
        ))),
    });
    // Bind first, so the socket answers Probe (not ready) during recovery.
    let socket = BoundSocket::bind(&args.endpoint)
        .await?
        .with_metrics(Arc::clone(&metrics));
    let mut routes = Routes::new(IdentityService::new(health.clone()).into_server())
        .add_service(AdminService::new(Arc::clone(&engine)).into_server());
    if mode != Mode::Node {
        routes = routes.add_service(ControllerService::new(Arc::clone(&engine)).into_server());
    }
    if mode != Mode::Controller {
        routes = routes.add_service(NodeService::new(Arc::clone(&engine)).into_server());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = serve_until_stopped(socket, routes, metrics_listener, &metrics, &stop_rx);

    let recovered = {
        let engine = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || engine.recover()).await?
    };
    match recovered {
        Ok(report) if report.failures.is_empty() => info!(?report, "state recovered"),
        Ok(report) => warn!(?report, "state recovered with failures"),
        Err(e) => error!("recovery failed: {e}"),
    }
    tokio::spawn(keep_health(Arc::clone(&engine), Arc::clone(&health)));
    let monitor = tokio::spawn(monitor::run(
        Arc::clone(&engine),
        monitor_config,
        stop_rx.clone(),
    ));
    // After recovery: every device of the node exists again before the
    // agent compares the cluster's objects with them.
    let agent = kube_client.take().map(|client| {
        tokio::spawn(crate::k8s::node::run_agent(
            client,
            Arc::clone(&engine),
            node_id.clone(),
            agent_config,
            stop_rx,
        ))
    });

    wait_for_signal().await?;
    info!("stopping");
    let _ = stop_tx.send(true);
    let _ = monitor.await;
    if let Some(agent) = agent {
        let _ = agent.await;
    }
    server.await??;
    Ok(())
}

/// The metrics listener, bound before anything else starts (a bind
/// failure stops startup); `None` when metrics are off.
async fn bind_metrics(
    address: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<MetricsListener>> {
    Ok(match address {
        Some(address) => Some(MetricsListener::bind(address).await?),
        None => None,
    })
}

/// Serves the CSI socket, and metrics if bound, until `stop` turns true;
/// the returned task ends when the socket has stopped serving.
fn serve_until_stopped(
    socket: BoundSocket,
    routes: Routes,
    metrics_listener: Option<MetricsListener>,
    metrics: &Arc<Metrics>,
    stop: &watch::Receiver<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut server_stop = stop.clone();
    let server = tokio::spawn(async move {
        socket
            .serve(routes, async move {
                let _ = server_stop.wait_for(|stop| *stop).await;
            })
            .await
            .map_err(anyhow::Error::from)
    });
    if let Some(listener) = metrics_listener {
        if let Ok(address) = listener.local_addr() {
            info!(%address, "serving metrics on /metrics");
        }
        let mut metrics_stop = stop.clone();
        tokio::spawn(listener.serve(Arc::clone(metrics), async move {
            let _ = metrics_stop.wait_for(|stop| *stop).await;
        }));
    }
    server
}

/// The API client of Kubernetes mode: the pod's service account, or
/// KUBECONFIG outside a cluster. Made before anything else starts, so that
/// a node without access fails at once with a clear message.
async fn kubernetes_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default().await.context(
        "connecting to the Kubernetes API server (in-cluster service account or KUBECONFIG)",
    )
}

/// `liveclone controller --kubernetes`: Identity and the Controller service
/// over the API server; no engine, pool or state folder.
async fn run_kubernetes_controller(args: ServeArgs) -> anyhow::Result<()> {
    let wait_timeout = seconds(args.node_wait_seconds, "node-wait-seconds")?;
    let metrics_address = metrics_endpoint::parse_address(&args.metrics_address)?;
    let metrics_listener = bind_metrics(metrics_address).await?;
    let client = kubernetes_client().await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health {
        state: RwLock::new(Err(NotReady::Initializing(
            "reaching the Kubernetes API server".to_owned(),
        ))),
    });
    let socket = BoundSocket::bind(&args.endpoint)
        .await?
        .with_metrics(Arc::clone(&metrics));
    let config = crate::k8s::controller::ControllerAgentConfig {
        wait_timeout,
        ..Default::default()
    };
    let routes = Routes::new(IdentityService::new(health.clone()).into_server()).add_service(
        crate::k8s::controller::controller_service(client.clone(), config).into_server(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = serve_until_stopped(socket, routes, metrics_listener, &metrics, &stop_rx);
    info!("controller agent started (Kubernetes mode)");
    tokio::spawn(keep_api_health(client, health));
    wait_for_signal().await?;
    info!("stopping");
    let _ = stop_tx.send(true);
    server.await??;
    Ok(())
}

/// Probe of the controller agent: ready while the API server answers (all
/// its work goes through it).
async fn keep_api_health(client: kube::Client, health: Arc<Health>) {
    loop {
        let state = match client.apiserver_version().await {
            Ok(_) => Ok(()),
            Err(e) => Err(NotReady::Unhealthy(format!(
                "the Kubernetes API server does not answer: {e}"
            ))),
        };
        if let Err(problem) = &state {
            warn!("not ready: {problem}");
        }
        health.set(state);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Holds an exclusive lock on the state folder for the life of the
/// process: two processes driving the same devices and records would undo
/// each other's work (the per-volume guards are per process).
fn lock_state_dir(state_dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            anyhow::anyhow!(
                "the state folder {} is in use by another liveclone process ({errno}); one \
             process per state folder: use `standalone` to serve Controller and Node together",
                state_dir.display()
            )
        },
    )
}

async fn keep_health(engine: Arc<Engine>, health: Arc<Health>) {
    loop {
        let engine = Arc::clone(&engine);
        // The capacity figures come from the same pools, on the same beat.
        let result = tokio::task::spawn_blocking(move || {
            engine.refresh_capacity_metrics();
            engine.health()
        })
        .await;
        let state = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(NotReady::Unhealthy(message)),
            Err(e) => Err(NotReady::Unhealthy(format!("health check failed: {e}"))),
        };
        if let Err(problem) = &state {
            warn!("not ready: {problem}");
        }
        health.set(state);
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
