//! A gRPC channel over a Unix socket, for the admin commands and tests.

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::grpc::server::parse_endpoint;

/// Connects to a `unix:///abs/path` (or absolute path) endpoint.
pub async fn connect_unix(endpoint: &str) -> anyhow::Result<Channel> {
    let path = parse_endpoint(endpoint)?;
    let shown = path.display().to_string();
    // The URI is required by the API but unused: the connector ignores it.
    let channel = Endpoint::try_from("http://liveclone.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            // The transport error itself only says "transport error"; its
            // innermost cause says why (no such file, connection refused).
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            anyhow::anyhow!("connecting to {shown}: {cause}")
        })?;
    Ok(channel)
}
