//! Starts the test API server and keeps it running until Ctrl-C, for poking
//! at it by hand (kubectl, the CSI sidecars):
//!
//!     cargo run -p kubetest --example apiserver
//!     export KUBECONFIG=...   # the path it prints

use anyhow::{Context, Result};
use kubetest::ApiServer;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let server = ApiServer::start().await?;
    server.install_snapshot_crds()?;
    println!("kube-apiserver: {}", server.url());
    println!("export KUBECONFIG={}", server.kubeconfig().display());
    println!("logs: {}", server.dir().display());
    println!("VolumeSnapshot CRDs installed; Ctrl-C stops everything");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    server.stop()
}
