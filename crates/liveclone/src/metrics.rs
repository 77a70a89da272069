//! Prometheus metrics of the driver process, and the `/metrics` endpoint.
//!
//! One [`Metrics`] per process, created by `liveclone standalone|controller|
//! node` and shared by `Arc`:
//! * the per-RPC layer ([`crate::grpc::server`]) records each CSI or admin
//!   call's method, gRPC code and latency;
//! * the engine records the hydration progress the monitor publishes, and
//!   drops a volume's series when it is no longer followed.
//!
//! [`MetricsListener`] serves `GET /metrics` in the OpenMetrics text format
//! over HTTP/1; any other path is a 404.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::domain::hydration::{HydrationPhase, Progress};
use crate::domain::pool::PoolCapacity;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `code` label of an RPC that ended without a gRPC status (the client
/// went away, or the response had no `grpc-status`).
pub const NO_STATUS: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

fn rpc_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Every metric family of the process, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    hydrated_bytes: Family<VolumeLabel, Gauge>,
    total_bytes: Family<VolumeLabel, Gauge>,
    rate: Family<VolumeLabel, Gauge<f64, AtomicU64>>,
    hydrations: Family<PhaseLabel, Gauge>,
    hydration_duration: Histogram,
    class_total: Family<ClassLabel, Gauge>,
    class_available: Family<ClassLabel, Gauge>,
    class_up: Family<ClassLabel, Gauge>,
    thin_data_used: Family<ClassLabel, Gauge<f64, AtomicU64>>,
    thin_metadata_used: Family<ClassLabel, Gauge<f64, AtomicU64>>,
    thin_provisioned: Family<ClassLabel, Gauge>,
    /// When this process first saw each followed hydration, for
    /// `liveclone_hydration_duration_seconds`.
    started: Mutex<HashMap<String, Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_duration =
            Family::<MethodLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                rpc_histogram,
            );
        let hydrated_bytes = Family::<VolumeLabel, Gauge>::default();
        let total_bytes = Family::<VolumeLabel, Gauge>::default();
        let rate = Family::<VolumeLabel, Gauge<f64, AtomicU64>>::default();
        let hydrations = Family::<PhaseLabel, Gauge>::default();
        let hydration_duration = Histogram::new([
            10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
            28800.0, 86400.0,
        ]);
        let class_total = Family::<ClassLabel, Gauge>::default();
        let class_available = Family::<ClassLabel, Gauge>::default();
        let class_up = Family::<ClassLabel, Gauge>::default();
        let thin_data_used = Family::<ClassLabel, Gauge<f64, AtomicU64>>::default();
        let thin_metadata_used = Family::<ClassLabel, Gauge<f64, AtomicU64>>::default();
        let thin_provisioned = Family::<ClassLabel, Gauge>::default();
        registry.register(
            "liveclone_device_class_capacity_bytes",
            "Size of a device class's pool (for a thin pool: its size times the overprovisioning ratio)",
            class_total.clone(),
        );
        registry.register(
            "liveclone_device_class_available_bytes",
            "Bytes a new volume of the device class may take (what GetCapacity answers)",
            class_available.clone(),
        );
        registry.register(
            "liveclone_device_class_up",
            "1 when the device class's pool answered its last capacity reading, else 0",
            class_up.clone(),
        );
        registry.register(
            "liveclone_thin_pool_data_used_ratio",
            "How full a thin device class's pool data is, from 0 to 1",
            thin_data_used.clone(),
        );
        registry.register(
            "liveclone_thin_pool_metadata_used_ratio",
            "How full a thin device class's pool metadata is, from 0 to 1",
            thin_metadata_used.clone(),
        );
        registry.register(
            "liveclone_thin_pool_provisioned_bytes",
            "Virtual sizes of the thin volumes and snapshots in a thin device class's pool",
            thin_provisioned.clone(),
        );
        // Counters get `_total` appended by the encoder.
        registry.register(
            "liveclone_rpc_requests",
            "CSI and admin RPCs served, by method and gRPC code",
            rpc_requests.clone(),
        );
        registry.register(
            "liveclone_rpc_duration_seconds",
            "Latency of CSI and admin RPCs, by method",
            rpc_duration.clone(),
        );
        registry.register(
            "liveclone_hydration_hydrated_bytes",
            "Bytes already copied to the destination, per hydrating volume",
            hydrated_bytes.clone(),
        );
        registry.register(
            "liveclone_hydration_total_bytes",
            "Bytes to hydrate in all, per hydrating volume",
            total_bytes.clone(),
        );
        registry.register(
            "liveclone_hydration_rate_bytes_per_second",
            "Hydration rate averaged over the rate window, per hydrating volume",
            rate.clone(),
        );
        registry.register(
            "liveclone_hydrations",
            "Volumes with a hydration state on this node, by phase",
            hydrations.clone(),
        );
        registry.register(
            "liveclone_hydration_duration_seconds",
            "Time from when this process began following a hydration to its completion",
            hydration_duration.clone(),
        );
        Self {
            registry,
            rpc_requests,
            rpc_duration,
            hydrated_bytes,
            total_bytes,
            rate,
            hydrations,
            hydration_duration,
            class_total,
            class_available,
            class_up,
            thin_data_used,
            thin_metadata_used,
            thin_provisioned,
            started: Mutex::new(HashMap::new()),
        }
    }

    /// Records one finished RPC; `method` is the gRPC path
    /// (`/csi.v1.Controller/CreateVolume`), `code` a gRPC code name or
    /// [`NO_STATUS`].
    pub fn record_rpc(&self, method: &str, code: &str, latency: Duration) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabel {
                method: method.to_owned(),
            })
            .observe(latency.as_secs_f64());
    }

    fn started(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Plain map updates cannot be left half done by a panic.
        self.started
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a progress figure of one volume's hydration. On completion
    /// the duration is observed (once) and the volume's series are dropped.
    pub fn hydration_progress(&self, volume: &str, progress: &Progress) {
        if progress.phase == HydrationPhase::Complete {
            if let Some(started) = self.started().remove(volume) {
                self.hydration_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            self.remove_volume_series(volume);
            return;
        }
        self.started()
            .entry(volume.to_owned())
            .or_insert_with(Instant::now);
        let label = VolumeLabel {
            volume: volume.to_owned(),
        };
        self.hydrated_bytes
            .get_or_create(&label)
            .set(i64::try_from(progress.hydrated_bytes).unwrap_or(i64::MAX));
        self.total_bytes
            .get_or_create(&label)
            .set(i64::try_from(progress.total_bytes).unwrap_or(i64::MAX));
        self.rate
            .get_or_create(&label)
            .set(progress.bytes_per_second);
    }

    /// Drops a volume's series: its hydration is no longer followed.
    pub fn forget_hydration(&self, volume: &str) {
        self.started().remove(volume);
        self.remove_volume_series(volume);
    }

    fn remove_volume_series(&self, volume: &str) {
        let label = VolumeLabel {
            volume: volume.to_owned(),
        };
        self.hydrated_bytes.remove(&label);
        self.total_bytes.remove(&label);
        self.rate.remove(&label);
    }

    /// Sets `liveclone_hydrations` from the phase of every volume with a
    /// hydration state; phases with none read 0.
    pub fn set_hydration_phases(&self, phases: impl IntoIterator<Item = HydrationPhase>) {
        let phases: Vec<HydrationPhase> = phases.into_iter().collect();
        for phase in HydrationPhase::ALL {
            let count = phases.iter().filter(|p| **p == phase).count();
            self.hydrations
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Records a device class's capacity reading; `None` when reading it
    /// failed (the figures keep their last values and `up` reads 0).
    pub fn device_class_capacity(&self, class: &str, capacity: Option<&PoolCapacity>) {
        let label = ClassLabel {
            class: class.to_owned(),
        };
        let bytes = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let Some(capacity) = capacity else {
            self.class_up.get_or_create(&label).set(0);
            return;
        };
        self.class_up.get_or_create(&label).set(1);
        self.class_total
            .get_or_create(&label)
            .set(bytes(capacity.total_bytes));
        self.class_available
            .get_or_create(&label)
            .set(bytes(capacity.available_bytes));
        if let Some(thin) = &capacity.thin {
            self.thin_data_used
                .get_or_create(&label)
                .set(thin.data_used);
            self.thin_metadata_used
                .get_or_create(&label)
                .set(thin.metadata_used);
            self.thin_provisioned
                .get_or_create(&label)
                .set(bytes(thin.provisioned_bytes));
        }
    }

    /// Every metric in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing to a String does not fail; keep what was written.
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

/// What `--metrics-address` asks for: an address, or nothing ("" or
/// "off").
pub fn parse_address(value: &str) -> anyhow::Result<Option<SocketAddr>> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|e| {
        anyhow::anyhow!(
            "--metrics-address {value:?} is not an IP:port such as 127.0.0.1:9808 \
             (or \"off\"): {e}"
        )
    })
}

/// The metrics endpoint, bound but not serving yet.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
}

impl MetricsListener {
    pub async fn bind(address: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| anyhow::anyhow!("binding the metrics endpoint {address}: {e}"))?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `GET /metrics` until `shutdown` completes.
    pub async fn serve(self, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = &mut shutdown => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let metrics = Arc::clone(&metrics);
                    async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!("metrics endpoint: connection: {e}");
                }
            });
        }
    }
}

fn answer(metrics: &Metrics, request: &Request<Incoming>) -> Response<String> {
    let (status, content_type, body) = if request.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics\n".to_owned(),
        )
    } else if request.method() != Method::GET && request.method() != Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_owned(),
        )
    } else {
        (StatusCode::OK, CONTENT_TYPE, metrics.render())
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(phase: HydrationPhase, hydrated: u64, total: u64, rate: f64) -> Progress {
        Progress {
            phase,
            hydrated_bytes: hydrated,
            total_bytes: total,
            percent: 0.0,
            bytes_per_second: rate,
            eta: None,
            paused: false,
            last_progress_at: None,
            message: String::new(),
        }
    }

    #[test]
    fn renders_rpcs() {
        let metrics = Metrics::new();
        let method = "/csi.v1.Controller/CreateVolume";
        metrics.record_rpc(method, "Ok", Duration::from_millis(3));
        metrics.record_rpc(method, "Ok", Duration::from_millis(4));
        metrics.record_rpc(method, "NotFound", Duration::from_millis(1));
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "liveclone_rpc_requests_total{{method=\"{method}\",code=\"Ok\"}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "liveclone_rpc_requests_total{{method=\"{method}\",code=\"NotFound\"}} 1\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "liveclone_rpc_duration_seconds_count{{method=\"{method}\"}} 3\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "liveclone_rpc_duration_seconds_bucket{{le=\"0.005\",method=\"{method}\"}} 3\n"
            )),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn renders_hydration_and_drops_finished_volumes() {
        let metrics = Metrics::new();
        metrics.hydration_progress("lcv-a", &progress(HydrationPhase::Hydrating, 10, 100, 2.5));
        metrics.set_hydration_phases([HydrationPhase::Hydrating]);
        let text = metrics.render();
        for line in [
            "liveclone_hydration_hydrated_bytes{volume=\"lcv-a\"} 10\n",
            "liveclone_hydration_total_bytes{volume=\"lcv-a\"} 100\n",
            "liveclone_hydration_rate_bytes_per_second{volume=\"lcv-a\"} 2.5\n",
            "liveclone_hydrations{phase=\"Hydrating\"} 1\n",
            "liveclone_hydrations{phase=\"Stalled\"} 0\n",
            "liveclone_hydration_duration_seconds_count 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }

        metrics.hydration_progress("lcv-a", &progress(HydrationPhase::Complete, 100, 100, 0.0));
        metrics.set_hydration_phases([HydrationPhase::Complete]);
        // A second Complete (the engine republishes) observes nothing more.
        metrics.hydration_progress("lcv-a", &progress(HydrationPhase::Complete, 100, 100, 0.0));
        let text = metrics.render();
        assert!(!text.contains("volume=\"lcv-a\""), "{text}");
        assert!(
            text.contains("liveclone_hydration_duration_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("liveclone_hydrations{phase=\"Complete\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("liveclone_hydrations{phase=\"Hydrating\"} 0\n"),
            "{text}"
        );

        metrics.hydration_progress("lcv-b", &progress(HydrationPhase::Stalled, 1, 2, 0.0));
        metrics.forget_hydration("lcv-b");
        assert!(!metrics.render().contains("lcv-b"));
    }

    #[test]
    fn renders_device_class_capacity() {
        let metrics = Metrics::new();
        let thin = PoolCapacity {
            total_bytes: 1000,
            available_bytes: 400,
            thin: Some(crate::domain::pool::ThinUsage {
                data_used: 0.5,
                metadata_used: 0.25,
                provisioned_bytes: 600,
            }),
        };
        metrics.device_class_capacity("fast", Some(&thin));
        metrics.device_class_capacity("file", None);
        let text = metrics.render();
        for line in [
            "liveclone_device_class_capacity_bytes{class=\"fast\"} 1000\n",
            "liveclone_device_class_available_bytes{class=\"fast\"} 400\n",
            "liveclone_device_class_up{class=\"fast\"} 1\n",
            "liveclone_device_class_up{class=\"file\"} 0\n",
            "liveclone_thin_pool_data_used_ratio{class=\"fast\"} 0.5\n",
            "liveclone_thin_pool_metadata_used_ratio{class=\"fast\"} 0.25\n",
            "liveclone_thin_pool_provisioned_bytes{class=\"fast\"} 600\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("available_bytes{class=\"file\"}"), "{text}");
    }

    /// The engine's hook: what the monitor publishes lands in the metrics.
    #[test]
    fn the_engine_records_published_progress() {
        use crate::domain::engine::{Engine, EngineConfig};
        use crate::domain::file_pool::FilePool;
        use crate::domain::ids::VolumeId;
        use crate::domain::model::{SnapshotRecord, VolumeRecord};
        use crate::domain::paths::AllowedRoots;
        use crate::domain::store::JsonDirStore;
        use crate::os::fake::FakeOs;

        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path();
        std::fs::create_dir_all(root.join("pool")).expect("pool folder");
        let os = FakeOs::new().os();
        let pool = FilePool::open(&root.join("pool"), os.clone()).expect("pool");
        let volumes = JsonDirStore::<VolumeRecord>::open(&root.join("state")).expect("store");
        let snapshots = JsonDirStore::<SnapshotRecord>::open(&root.join("state")).expect("store");
        let config = EngineConfig {
            node_id: "metrics-tests".to_owned(),
            work_dir: root.join("work"),
            allowed_roots: AllowedRoots::new([root.join("kubelet")]),
            max_volumes: 4,
        };
        let metrics = Arc::new(Metrics::new());
        let engine = Engine::new(
            os,
            crate::domain::device_class::DeviceClasses::single(Arc::new(pool)),
            Arc::new(volumes),
            Arc::new(snapshots),
            config,
        )
        .with_metrics(Arc::clone(&metrics));
        let id = VOLUME_ID.parse::<VolumeId>().expect("volume ID");

        engine.publish_progress(&id, progress(HydrationPhase::Hydrating, 5, 50, 1.0));
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "liveclone_hydration_hydrated_bytes{{volume=\"{VOLUME_ID}\"}} 5\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("liveclone_hydrations{phase=\"Hydrating\"} 1\n"),
            "{text}"
        );

        engine.publish_progress(&id, progress(HydrationPhase::Complete, 50, 50, 0.0));
        let text = metrics.render();
        assert!(!text.contains(VOLUME_ID), "{text}");
        assert!(
            text.contains("liveclone_hydrations{phase=\"Complete\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("liveclone_hydration_duration_seconds_count 1\n"),
            "{text}"
        );

        engine.forget_progress(&id);
        let text = metrics.render();
        assert!(
            text.contains("liveclone_hydrations{phase=\"Complete\"} 0\n"),
            "{text}"
        );
    }

    const VOLUME_ID: &str = "lcv-0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_the_address_flag() {
        assert_eq!(parse_address("").ok(), Some(None));
        assert_eq!(parse_address("off").ok(), Some(None));
        assert_eq!(
            parse_address("127.0.0.1:9808").ok(),
            Some(Some(SocketAddr::from(([127, 0, 0, 1], 9808))))
        );
        let error = parse_address("localhost").expect_err("not an address");
        assert!(error.to_string().contains("--metrics-address"), "{error}");
    }
}
