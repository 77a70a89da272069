//! The Identity service over a real Unix domain socket, as kubelet and the
//! CSI sidecars reach it.

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use liveclone::grpc::identity::{
    IdentityService, NotReady, Readiness, PLUGIN_NAME, VENDOR_VERSION,
};
use liveclone::grpc::server::{serve_unix, BoundSocket, ServeError};
use liveclone::proto::csi::v1::identity_client::IdentityClient;
use liveclone::proto::csi::v1::plugin_capability::{self, service, volume_expansion};
use liveclone::proto::csi::v1::{GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint, Uri};

/// A readiness the test flips between probes.
#[derive(Default)]
struct Switchable(Mutex<Option<NotReady>>);

impl Switchable {
    fn set(&self, state: Option<NotReady>) {
        *self.0.lock().expect("readiness lock poisoned") = state;
    }
}

impl Readiness for Switchable {
    fn check(&self) -> Result<(), NotReady> {
        match &*self.0.lock().expect("readiness lock poisoned") {
            None => Ok(()),
            Some(not_ready) => Err(not_ready.clone()),
        }
    }
}

/// A running server and the means to stop it.
struct RunningServer {
    socket: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    async fn start(endpoint: &str, readiness: Arc<dyn Readiness>) -> Self {
        let bound = BoundSocket::bind(endpoint)
            .await
            .expect("binding the test socket");
        let socket = bound.path().to_owned();
        let routes = Routes::new(IdentityService::new(readiness).into_server());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.serve(routes, async {
            // A dropped sender stops the server too.
            let _ = stopped.await;
        }));
        Self { socket, stop, task }
    }

    async fn shut_down(self) {
        // The server may have stopped on its own (then the test fails below).
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop within 10 s of the shutdown signal")
            .expect("server task panicked")
            .expect("server returned an error");
    }
}

/// A tonic channel to a Unix socket: the URI is required by the API but
/// ignored, the connector dials the socket instead.
async fn connect(socket: &Path) -> IdentityClient<Channel> {
    let socket = socket.to_owned();
    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("static URI parses")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .expect("connecting to the test socket");
    IdentityClient::new(channel)
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|metadata| metadata.file_type().is_socket())
}

#[tokio::test]
async fn identity_service_answers_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    // The socket's directory does not exist yet: the server creates it.
    let socket_dir = dir.path().join("plugins").join(PLUGIN_NAME);
    let endpoint = format!("unix://{}", socket_dir.join("csi.sock").display());
    let neighbour = socket_dir.join("registration-notes.txt");
    let readiness = Arc::new(Switchable::default());

    let server = RunningServer::start(&endpoint, readiness.clone()).await;
    assert!(is_socket(&server.socket));
    // Something else in the same directory, which shutdown must not touch.
    std::fs::write(&neighbour, "not the server's").expect("writing a neighbour file");
    let mut client = connect(&server.socket).await;

    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, PLUGIN_NAME);
    assert_eq!(info.name, "csi.liveclone.io");
    assert_eq!(info.vendor_version, VENDOR_VERSION);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let capabilities = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("GetPluginCapabilities")
        .into_inner()
        .capabilities;
    let mut services = Vec::new();
    let mut expansions = Vec::new();
    for capability in &capabilities {
        match &capability.r#type {
            Some(plugin_capability::Type::Service(service)) => services.push(service.r#type()),
            Some(plugin_capability::Type::VolumeExpansion(expansion)) => {
                expansions.push(expansion.r#type())
            }
            None => panic!("capability without a type: {capability:?}"),
        }
    }
    assert_eq!(
        services,
        [
            service::Type::ControllerService,
            service::Type::VolumeAccessibilityConstraints
        ]
    );
    assert_eq!(expansions, [volume_expansion::Type::Online]);

    let probe = client
        .probe(ProbeRequest {})
        .await
        .expect("Probe when ready")
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    readiness.set(Some(NotReady::Initializing(
        "recovering volumes after restart".to_owned(),
    )));
    let probe = client
        .probe(ProbeRequest {})
        .await
        .expect("Probe while initializing succeeds")
        .into_inner();
    assert_eq!(probe.ready, Some(false));

    let reason = "the kernel has no dm-clone target: modprobe dm-clone failed: \
                  Module dm-clone not found";
    readiness.set(Some(NotReady::Unhealthy(reason.to_owned())));
    let status = client
        .probe(ProbeRequest {})
        .await
        .expect_err("Probe of an unhealthy plugin fails");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), reason);

    // The client stays connected: shutdown must not wait for it to leave.
    let socket = server.socket.clone();
    server.shut_down().await;
    drop(client);

    // Shutdown removes its own socket and nothing else.
    assert!(!socket.exists(), "the socket is left behind");
    assert!(socket_dir.is_dir(), "the socket directory was removed");
    assert_eq!(
        std::fs::read_to_string(&neighbour).expect("the neighbour file is still there"),
        "not the server's"
    );
}

#[tokio::test]
async fn a_plain_absolute_path_is_an_endpoint_too() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let socket = dir.path().join("csi.sock");
    let endpoint = socket
        .to_str()
        .expect("temporary paths are UTF-8")
        .to_owned();

    let server = RunningServer::start(&endpoint, Arc::new(Switchable::default())).await;
    let mut client = connect(&socket).await;
    let probe = client
        .probe(ProbeRequest {})
        .await
        .expect("Probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    drop(client);
    server.shut_down().await;
}

#[tokio::test]
async fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let socket = dir.path().join("csi.sock");
    // A socket file nobody listens on, as a crashed previous run leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("binding a stale socket"));
    assert!(is_socket(&socket));

    let endpoint = format!("unix://{}", socket.display());
    let server = RunningServer::start(&endpoint, Arc::new(Switchable::default())).await;
    let mut client = connect(&socket).await;
    client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo on the replaced socket");
    drop(client);
    server.shut_down().await;
}

#[tokio::test]
async fn a_live_socket_is_not_stolen() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let first = RunningServer::start(&endpoint, Arc::new(Switchable::default())).await;

    let second = BoundSocket::bind(&endpoint).await;
    assert!(
        matches!(second, Err(ServeError::InUse { .. })),
        "{second:?}"
    );

    // The first server still answers.
    let mut client = connect(&first.socket).await;
    client
        .probe(ProbeRequest {})
        .await
        .expect("Probe on the first server");
    drop(client);
    first.shut_down().await;
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_left_alone() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let path = dir.path().join("csi.sock");
    std::fs::write(&path, "precious").expect("writing a regular file");

    let result = serve_unix(
        &format!("unix://{}", path.display()),
        Routes::default(),
        std::future::ready(()),
    )
    .await;

    assert!(
        matches!(
            result,
            Err(ServeError::NotASocket {
                kind: "regular file",
                ..
            })
        ),
        "{result:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("the file is still there"),
        "precious"
    );
}

#[tokio::test]
async fn a_symlink_at_the_socket_path_is_not_followed() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    // A stale socket elsewhere, and a link to it where the endpoint points:
    // following the link would delete a file outside the socket directory.
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("creating a directory");
    let target = outside.join("other.sock");
    drop(std::os::unix::net::UnixListener::bind(&target).expect("binding a socket"));
    let link = dir.path().join("csi.sock");
    std::os::unix::fs::symlink(&target, &link).expect("creating a symlink");

    let result = BoundSocket::bind(&format!("unix://{}", link.display())).await;

    assert!(
        matches!(
            result,
            Err(ServeError::NotASocket {
                kind: "symbolic link",
                ..
            })
        ),
        "{result:?}"
    );
    assert!(is_socket(&target), "the link's target was removed");
    assert!(link.is_symlink(), "the link was removed");
}

#[tokio::test]
async fn bad_endpoints_are_refused_before_touching_the_file_system() {
    for endpoint in ["tcp://127.0.0.1:10000", "csi.sock", "unix://csi.sock"] {
        let result = serve_unix(endpoint, Routes::default(), std::future::ready(())).await;
        assert!(
            matches!(result, Err(ServeError::Endpoint(_))),
            "{endpoint}: {result:?}"
        );
    }
}

/// Collects what a tracing subscriber writes, for assertions.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer poisoned")).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("log buffer poisoned"))?
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Set in the child process that runs the logging scenario.
const LOG_SCENARIO_CHILD: &str = "LIVECLONE_TEST_RPC_LOG_CHILD";

#[test]
fn every_rpc_is_logged_with_its_method_status_and_latency() {
    // tracing caches, process-wide, whether each log statement is enabled,
    // and the other tests of this binary run the same statements on other
    // threads at the same time: a subscriber installed for one test can then
    // miss events. So the scenario runs alone, in a child process running
    // only this test.
    if std::env::var_os(LOG_SCENARIO_CHILD).is_some() {
        logging_scenario();
        return;
    }
    let this_test = "every_rpc_is_logged_with_its_method_status_and_latency";
    let output =
        std::process::Command::new(std::env::current_exe().expect("locating the test executable"))
            .args([this_test, "--exact", "--test-threads=1", "--nocapture"])
            .env(LOG_SCENARIO_CHILD, "1")
            .output()
            .expect("running the logging scenario in a child process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "logging scenario failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Guards against the filter matching nothing, which also succeeds.
    assert!(stdout.contains("1 passed"), "{stdout}");
}

fn logging_scenario() {
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("installing the log capture");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a runtime")
        .block_on(run_rpcs_and_check_logs(logs));
}

async fn run_rpcs_and_check_logs(logs: CapturedLogs) {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let readiness = Arc::new(Switchable::default());
    let server = RunningServer::start(&endpoint, readiness.clone()).await;
    let mut client = connect(&server.socket).await;

    client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .expect("GetPluginInfo");
    readiness.set(Some(NotReady::Unhealthy("no dm-clone".to_owned())));
    client
        .probe(ProbeRequest {})
        .await
        .expect_err("Probe of an unhealthy plugin fails");
    drop(client);
    server.shut_down().await;

    let text = logs.text();
    let finished: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("rpc finished"))
        .collect();
    assert_eq!(finished.len(), 2, "{text}");
    assert!(
        finished[0].contains("method=/csi.v1.Identity/GetPluginInfo")
            && finished[0].contains("code=Ok")
            && finished[0].contains("latency="),
        "{text}"
    );
    assert!(
        finished[1].contains("method=/csi.v1.Identity/Probe")
            && finished[1].contains("code=FailedPrecondition"),
        "{text}"
    );
    // The handler's own log line runs inside the RPC's span.
    assert!(
        text.lines().any(|line| line.contains("probe: unhealthy")
            && line.contains("method=/csi.v1.Identity/Probe")),
        "{text}"
    );
}
