//! The `/metrics` endpoint over real TCP on loopback: no root, no VM.

use std::sync::Arc;
use std::time::Duration;

use liveclone::metrics::{Metrics, MetricsListener};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn get(address: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("response in time")
    .expect("read response");
    response
}

#[tokio::test]
async fn serves_metrics_and_404_elsewhere() {
    let metrics = Arc::new(Metrics::new());
    metrics.record_rpc("/csi.v1.Identity/Probe", "Ok", Duration::from_millis(2));
    let listener = MetricsListener::bind(([127, 0, 0, 1], 0).into())
        .await
        .expect("bind");
    let address = listener.local_addr().expect("local address");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(listener.serve(Arc::clone(&metrics), async move {
        let _ = stop_rx.await;
    }));

    let response = get(address, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{response}"
    );
    assert!(
        response.contains(
            "liveclone_rpc_requests_total{method=\"/csi.v1.Identity/Probe\",code=\"Ok\"} 1\n"
        ),
        "{response}"
    );
    assert!(response.ends_with("# EOF\n"), "{response}");

    let response = get(address, "/other").await;
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .expect("server task");
}

#[tokio::test]
async fn a_taken_address_is_a_clear_error() {
    let first = MetricsListener::bind(([127, 0, 0, 1], 0).into())
        .await
        .expect("bind");
    let address = first.local_addr().expect("local address");
    let error = MetricsListener::bind(address)
        .await
        .expect_err("the port is taken");
    let message = error.to_string();
    assert!(
        message.contains("metrics endpoint") && message.contains(&address.to_string()),
        "{message}"
    );
}

/// The per-RPC layer records what a real call over the CSI socket did.
#[tokio::test]
async fn rpcs_over_the_csi_socket_are_counted() {
    use hyper_util::rt::TokioIo;
    use liveclone::grpc::identity::{AlwaysReady, IdentityService};
    use liveclone::grpc::server::BoundSocket;
    use liveclone::proto::csi::v1::identity_client::IdentityClient;
    use liveclone::proto::csi::v1::ProbeRequest;
    use tonic::service::Routes;
    use tonic::transport::{Endpoint, Uri};

    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
    let metrics = Arc::new(Metrics::new());
    let bound = BoundSocket::bind(&endpoint)
        .await
        .expect("binding the test socket")
        .with_metrics(Arc::clone(&metrics));
    let socket = bound.path().to_owned();
    let routes = Routes::new(IdentityService::new(Arc::new(AlwaysReady)).into_server());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.serve(routes, async move {
        let _ = stop_rx.await;
    }));

    let channel = Endpoint::try_from("http://[::]:50051")
        .expect("static URI parses")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("connecting to the test socket");
    let mut client = IdentityClient::new(channel);
    client.probe(ProbeRequest {}).await.expect("probe");
    client.probe(ProbeRequest {}).await.expect("probe");
    drop(client);

    // The status goes out with the trailers, just after the client has its
    // answer: allow the layer a moment.
    let line = "liveclone_rpc_requests_total{method=\"/csi.v1.Identity/Probe\",code=\"Ok\"} 2\n";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !metrics.render().contains(line) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = metrics.render();
    assert!(text.contains(line), "{text}");
    assert!(
        text.contains(
            "liveclone_rpc_duration_seconds_count{method=\"/csi.v1.Identity/Probe\"} 2\n"
        ),
        "{text}"
    );

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .expect("server task")
        .expect("serving");
}
