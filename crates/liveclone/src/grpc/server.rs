//! Serving CSI services on a Unix domain socket.
//!
//! The CO (kubelet, the external-provisioner sidecar, ...) reaches a plugin
//! through a Unix socket on a shared host path, named by an endpoint such as
//! `unix:///csi/csi.sock`. [`serve_unix`] binds it, serves whatever services
//! it is given (Identity always; Controller and/or Node depending on the
//! role) and stops gracefully when told to.
//!
//! Each RPC runs in a tracing span named after its method, and its gRPC
//! status and latency are logged at debug level when it completes.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::Body as _;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::codegen::{Bytes, Service};
use tonic::service::Routes;
use tonic::transport::Server;
use tracing::Instrument as _;

use crate::metrics::{Metrics, NO_STATUS};

/// The scheme prefix of socket endpoints, as in `unix:///csi/csi.sock`.
const UNIX_SCHEME: &str = "unix://";

/// `sun_path` holds 108 bytes on Linux, including the terminating NUL.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// How long a connection attempt may take when deciding whether an existing
/// socket file still has a server behind it.
const LIVENESS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why an endpoint string names no usable socket path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("the CSI endpoint is empty; give unix:///absolute/path or /absolute/path")]
    Empty,
    #[error(
        "unsupported CSI endpoint {endpoint:?}: only Unix domain sockets are served; \
         give unix:///absolute/path or /absolute/path"
    )]
    UnsupportedScheme { endpoint: String },
    #[error(
        "CSI endpoint {endpoint:?} does not name an absolute path; \
         give unix:///absolute/path (three slashes) or /absolute/path"
    )]
    NotAbsolute { endpoint: String },
    #[error("CSI endpoint {endpoint:?} names a directory, not a socket file")]
    NoFileName { endpoint: String },
    #[error("CSI endpoint {endpoint:?} contains a NUL byte")]
    NulByte { endpoint: String },
    #[error(
        "CSI socket path {path:?} is {length} bytes long; Unix sockets allow at most \
         {MAX_SOCKET_PATH_BYTES}"
    )]
    TooLong { path: PathBuf, length: usize },
}

/// Why serving stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("creating the socket directory {dir:?}: {source}")]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("inspecting the existing {path:?}: {source}")]
    Inspect { path: PathBuf, source: io::Error },
    #[error(
        "{path:?} exists and is a {kind}, not a socket; refusing to delete it \
         (pick another endpoint or remove it by hand)"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("another server is listening on {path:?}; is a second instance running?")]
    InUse { path: PathBuf },
    #[error("removing the stale socket {path:?}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("binding {path:?}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("serving gRPC on {path:?}: {source}")]
    Transport {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// Turns a CSI endpoint into the socket path it names.
///
/// Accepted: `unix:///abs/path` and a bare `/abs/path`. Everything else is
/// refused: other schemes (`tcp://`), relative paths, which would depend on
/// the working directory, and `unix://relative`, where `relative` would be
/// read as a URL host.
pub fn parse_endpoint(endpoint: &str) -> Result<PathBuf, EndpointError> {
    if endpoint.is_empty() {
        return Err(EndpointError::Empty);
    }
    let path = if let Some(rest) = endpoint.strip_prefix(UNIX_SCHEME) {
        rest
    } else if endpoint.contains("://") || endpoint.starts_with("unix:") {
        return Err(EndpointError::UnsupportedScheme {
            endpoint: endpoint.to_owned(),
        });
    } else {
        endpoint
    };
    if !path.starts_with('/') {
        return Err(EndpointError::NotAbsolute {
            endpoint: endpoint.to_owned(),
        });
    }
    if path.ends_with('/') {
        return Err(EndpointError::NoFileName {
            endpoint: endpoint.to_owned(),
        });
    }
    if path.contains('\0') {
        return Err(EndpointError::NulByte {
            endpoint: endpoint.to_owned(),
        });
    }
    if path.len() > MAX_SOCKET_PATH_BYTES {
        return Err(EndpointError::TooLong {
            path: PathBuf::from(path),
            length: path.len(),
        });
    }
    Ok(PathBuf::from(path))
}

/// A listening socket, bound but not serving yet.
///
/// Binding separately from serving lets a caller (or a test) know that the
/// socket accepts connections before anything connects to it.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file this process created, so that
    /// cleanup removes that file and not one someone put in its place.
    created: Option<(u64, u64)>,
    /// Where each RPC's count and latency are recorded, if anywhere.
    metrics: Option<Arc<Metrics>>,
}

impl BoundSocket {
    /// Binds the socket named by `endpoint`.
    ///
    /// Creates the parent directory if missing. An existing socket file is
    /// replaced only if nothing answers on it (a leftover of a previous run);
    /// anything else at that path, including a symlink, is left alone and
    /// reported.
    pub async fn bind(endpoint: &str) -> Result<Self, ServeError> {
        let path = parse_endpoint(endpoint)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|source| ServeError::CreateDir {
                    dir: dir.to_owned(),
                    source,
                })?;
        }
        remove_stale_socket(&path).await?;
        let listener = UnixListener::bind(&path).map_err(|source| ServeError::Bind {
            path: path.clone(),
            source,
        })?;
        let created = match tokio::fs::symlink_metadata(&path).await {
            Ok(metadata) => Some((metadata.dev(), metadata.ino())),
            Err(error) => {
                // Serving works regardless; only the cleanup at shutdown is
                // lost, and the next start replaces a stale socket anyway.
                tracing::warn!(path = %path.display(), %error, "cannot stat the new socket; it will not be removed at shutdown");
                None
            }
        };
        tracing::info!(path = %path.display(), "listening for CSI calls");
        Ok(Self {
            listener,
            path,
            created,
            metrics: None,
        })
    }

    /// Records every RPC served in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `routes` until `shutdown` completes, then lets the calls in
    /// flight finish and removes the socket file (if it is still the one
    /// this process created).
    pub async fn serve(
        self,
        routes: Routes,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let Self {
            listener,
            path,
            created,
            metrics,
        } = self;
        let served = Server::builder()
            .layer(RpcLogLayer { metrics })
            .add_routes(routes)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await;
        if let Some(created) = created {
            remove_own_socket(&path, created).await;
        }
        served.map_err(|source| ServeError::Transport { path, source })
    }
}

/// Serves `routes` on the Unix socket named by `endpoint` until `shutdown`
/// completes; see [`BoundSocket::bind`] and [`BoundSocket::serve`].
///
/// `routes` carries every service of the process; the Controller and Node
/// servers are added the same way as Identity:
///
/// ```no_run
/// use std::sync::Arc;
///
/// use liveclone::grpc::identity::{AlwaysReady, IdentityService};
/// use liveclone::grpc::server::{serve_unix, ServeError};
/// use tonic::service::Routes;
///
/// async fn run() -> Result<(), ServeError> {
///     let identity = IdentityService::new(Arc::new(AlwaysReady));
///     let routes = Routes::new(identity.into_server());
///     // .add_service(ControllerServer::new(controller))
///     // .add_service(NodeServer::new(node))
///     let stop = async {
///         let _ = tokio::signal::ctrl_c().await;
///     };
///     serve_unix("unix:///csi/csi.sock", routes, stop).await
/// }
/// ```
pub async fn serve_unix(
    endpoint: &str,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    BoundSocket::bind(endpoint)
        .await?
        .serve(routes, shutdown)
        .await
}

/// Clears the way for binding `path`: removes a socket file with nothing
/// listening behind it, refuses anything else.
async fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    // symlink_metadata looks at the link itself: a symlink is refused below
    // rather than followed to wherever it points.
    let metadata = match tokio::fs::symlink_metadata(path).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file_type = metadata.file_type();
    if !file_type.is_socket() {
        let kind = if file_type.is_symlink() {
            "symbolic link"
        } else if file_type.is_dir() {
            "directory"
        } else if file_type.is_file() {
            "regular file"
        } else {
            "special file"
        };
        return Err(ServeError::NotASocket {
            path: path.to_owned(),
            kind,
        });
    }
    // A socket file outlives the process that bound it; if a server still
    // answers, it is another instance, whose socket must not be stolen.
    match tokio::time::timeout(
        LIVENESS_CONNECT_TIMEOUT,
        tokio::net::UnixStream::connect(path),
    )
    .await
    {
        Ok(Ok(_)) | Err(_) => {
            return Err(ServeError::InUse {
                path: path.to_owned(),
            })
        }
        Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => {}
        Ok(Err(error)) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Ok(Err(source)) => {
            return Err(ServeError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    }
    tracing::info!(path = %path.display(), "removing stale socket");
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServeError::RemoveStale {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the socket file at shutdown if it is still the one bound, so
/// that nothing connects to a dead socket meanwhile.
async fn remove_own_socket(path: &Path, created: (u64, u64)) {
    let still_ours = tokio::fs::symlink_metadata(path)
        .await
        .is_ok_and(|metadata| {
            metadata.file_type().is_socket() && (metadata.dev(), metadata.ino()) == created
        });
    if !still_ours {
        tracing::debug!(path = %path.display(), "socket replaced or gone; leaving the path alone");
        return;
    }
    if let Err(error) = tokio::fs::remove_file(path).await {
        tracing::warn!(path = %path.display(), %error, "cannot remove the socket at shutdown");
    }
}

/// Tower layer that gives every RPC a tracing span and logs how it ended
/// (and records it in the metrics, if given).
#[derive(Debug, Clone, Default)]
pub struct RpcLogLayer {
    pub metrics: Option<Arc<Metrics>>,
}

impl<S> tower_layer::Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcLogLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct RpcLog<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<Request<Body>> for RpcLog<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // gRPC paths are /package.Service/Method.
        let rpc = request.uri().path().to_owned();
        let span = tracing::debug_span!("rpc", method = %rpc);
        let started = Instant::now();
        let response = self.inner.call(request).instrument(span.clone());
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = response.await?;
            let mut outcome = RpcOutcome {
                span,
                started,
                logged: false,
                rpc,
                metrics,
            };
            // A call that fails before any message carries its status in
            // the headers ("trailers-only"); otherwise the status comes in
            // the trailers, after the last message.
            if let Some(code) = grpc_code(response.headers()) {
                outcome.log(code);
                return Ok(response);
            }
            if response.body().is_end_stream() {
                outcome.log_unfinished("empty response without grpc-status");
                return Ok(response);
            }
            Ok(response.map(|body| Body::new(LoggedBody { body, outcome })))
        })
    }
}

fn grpc_code(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .map(|value| tonic::Code::from_bytes(value.as_bytes()))
}

/// Logs (and records in the metrics), once, how an RPC ended.
struct RpcOutcome {
    span: tracing::Span,
    started: Instant,
    logged: bool,
    rpc: String,
    metrics: Option<Arc<Metrics>>,
}

impl RpcOutcome {
    fn log(&mut self, code: tonic::Code) {
        self.logged = true;
        let latency = self.started.elapsed();
        tracing::debug!(parent: &self.span, ?code, ?latency, "rpc finished");
        if let Some(metrics) = &self.metrics {
            metrics.record_rpc(&self.rpc, &format!("{code:?}"), latency);
        }
    }

    fn log_unfinished(&mut self, what: &str) {
        self.logged = true;
        let latency = self.started.elapsed();
        tracing::debug!(parent: &self.span, ?latency, "rpc ended without a status: {what}");
        if let Some(metrics) = &self.metrics {
            metrics.record_rpc(&self.rpc, NO_STATUS, latency);
        }
    }
}

impl Drop for RpcOutcome {
    fn drop(&mut self) {
        if !self.logged {
            // The body was dropped before its end: the client went away or
            // the connection broke mid-call.
            self.log_unfinished("response dropped before the end (client gone?)");
        }
    }
}

/// A response body that logs the RPC's status when its trailers go out.
struct LoggedBody {
    body: Body,
    outcome: RpcOutcome,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        // Every field is Unpin (tonic's Body boxes its inner body).
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if !this.outcome.logged {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(grpc_code) {
                        this.outcome.log(code);
                    }
                }
                Poll::Ready(Some(Err(status))) => this.outcome.log(status.code()),
                Poll::Ready(None) => this.outcome.log_unfinished("no grpc-status trailer"),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_unix_urls_with_absolute_paths() {
        assert_eq!(
            parse_endpoint("unix:///csi/csi.sock"),
            Ok(PathBuf::from("/csi/csi.sock"))
        );
        assert_eq!(
            parse_endpoint("unix:///var/lib/kubelet/plugins/csi.liveclone.io/csi.sock"),
            Ok(PathBuf::from(
                "/var/lib/kubelet/plugins/csi.liveclone.io/csi.sock"
            ))
        );
    }

    #[test]
    fn accepts_bare_absolute_paths() {
        assert_eq!(
            parse_endpoint("/run/csi/socket"),
            Ok(PathBuf::from("/run/csi/socket"))
        );
    }

    #[test]
    fn refuses_relative_paths() {
        for endpoint in ["csi.sock", "./csi.sock", "run/csi.sock", "../csi.sock"] {
            assert!(
                matches!(
                    parse_endpoint(endpoint),
                    Err(EndpointError::NotAbsolute { .. })
                ),
                "{endpoint}"
            );
        }
    }

    #[test]
    fn refuses_unix_urls_with_a_relative_path() {
        // unix://csi/csi.sock reads "csi" as a host: almost certainly a
        // missing third slash.
        let error = parse_endpoint("unix://csi/csi.sock").expect_err("must be refused");
        assert!(matches!(error, EndpointError::NotAbsolute { .. }));
        assert!(error.to_string().contains("three slashes"), "{error}");
        assert!(matches!(
            parse_endpoint("unix://csi.sock"),
            Err(EndpointError::NotAbsolute { .. })
        ));
    }

    #[test]
    fn refuses_other_schemes() {
        for endpoint in [
            "tcp://127.0.0.1:10000",
            "tcp:///csi.sock",
            "http://localhost/csi",
            "unix:/csi/csi.sock",
            "unix:csi.sock",
            "UNIX:///csi/csi.sock",
        ] {
            let error = parse_endpoint(endpoint).expect_err("must be refused");
            assert!(
                matches!(error, EndpointError::UnsupportedScheme { .. }),
                "{endpoint}: {error:?}"
            );
        }
        let error = parse_endpoint("tcp://127.0.0.1:10000").expect_err("must be refused");
        assert!(error.to_string().contains("unix:///"), "{error}");
    }

    #[test]
    fn refuses_empty_directories_and_nul() {
        assert_eq!(parse_endpoint(""), Err(EndpointError::Empty));
        assert!(matches!(
            parse_endpoint("unix://"),
            Err(EndpointError::NotAbsolute { .. })
        ));
        assert!(matches!(
            parse_endpoint("unix:///"),
            Err(EndpointError::NoFileName { .. })
        ));
        assert!(matches!(
            parse_endpoint("/run/csi/"),
            Err(EndpointError::NoFileName { .. })
        ));
        assert!(matches!(
            parse_endpoint("/run/csi\0.sock"),
            Err(EndpointError::NulByte { .. })
        ));
    }

    #[test]
    fn refuses_paths_longer_than_sun_path() {
        let longest = format!("/{}", "a".repeat(MAX_SOCKET_PATH_BYTES - 1));
        assert!(parse_endpoint(&longest).is_ok());
        let too_long = format!("{longest}b");
        assert!(matches!(
            parse_endpoint(&too_long),
            Err(EndpointError::TooLong { length, .. }) if length == MAX_SOCKET_PATH_BYTES + 1
        ));
    }
}
