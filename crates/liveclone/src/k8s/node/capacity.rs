//! The node's LivecloneNode: its device classes and their room, measured
//! from the engine's pools and published by server-side apply at start and
//! then every [`NodeAgentConfig::capacity_interval`](super::NodeAgentConfig),
//! for the controller agent's GetCapacity.
//!
//! The object is applied once (name and an empty spec; that needs `create`
//! and `patch` on `liveclonenodes`), then only its status (`patch` on
//! `liveclonenodes/status`), forced as
//! [`NODE_FIELD_MANAGER`](crate::k8s::NODE_FIELD_MANAGER): the node is its
//! only writer. Every publish is a write even when the figures did not
//! change, because the new `observedTime` is what tells readers that the
//! node is still there. The object is left in place when the agent stops:
//! a restart (an upgrade) should not blank the node's capacity, and the
//! staleness bound makes a node that stays away count for nothing.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::domain::engine::Engine;
use crate::k8s::capacity::{class_status, node_status, DeviceClassStatus};
use crate::k8s::{now, LivecloneNode, NODE_FIELD_MANAGER};

/// After a failed publish, how soon it is tried again (at most the
/// interval): the first publish at start may meet an API server or RBAC
/// that is not ready yet, and the node's capacity should not wait a whole
/// interval for it.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("measuring the pools did not finish: {0}")]
    Measure(String),
    #[error("creating LivecloneNode {node}: {source}")]
    Create {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of LivecloneNode {node}: {source}")]
    Status {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("LivecloneNode {node} was deleted again right after it was created")]
    Vanished { node: String },
}

/// Publishes one node's LivecloneNode.
pub struct CapacityPublisher {
    client: Client,
    engine: Arc<Engine>,
    node: String,
    interval: Duration,
    /// Whether this publisher has applied the object itself (after which
    /// only the status is written, until the object turns out gone).
    created: bool,
}

impl CapacityPublisher {
    /// `node` names the object (the Kubernetes node name, also the CSI node
    /// ID); `interval` is how often [`CapacityPublisher::run`] publishes,
    /// and is published too, so that readers know when figures are stale.
    pub fn new(client: Client, engine: Arc<Engine>, node: String, interval: Duration) -> Self {
        CapacityPublisher {
            client,
            engine,
            node,
            interval,
            created: false,
        }
    }

    /// Every class of the engine with its capacity. `capacity()` runs
    /// tools or system calls (statvfs, lvs), so on the blocking pool.
    async fn measure(&self) -> Result<Vec<DeviceClassStatus>, PublishError> {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || {
            engine
                .device_classes()
                .iter()
                .map(|(name, pool)| class_status(name, pool.describe(), pool.capacity()))
                .collect()
        })
        .await
        .map_err(|e| PublishError::Measure(e.to_string()))
    }

    async fn create(&self, api: &Api<LivecloneNode>) -> Result<(), PublishError> {
        let object = json!({
            "apiVersion": LivecloneNode::api_version(&()),
            "kind": LivecloneNode::kind(&()),
            "metadata": {"name": self.node},
            "spec": {},
        });
        api.patch(
            &self.node,
            &PatchParams::apply(NODE_FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .map(drop)
        .map_err(|source| PublishError::Create {
            node: self.node.clone(),
            source,
        })
    }

    /// Measures the pools and writes the status (creating the object
    /// first when this publisher has not, or when it was deleted); returns
    /// the object as written.
    pub async fn publish(&mut self) -> Result<LivecloneNode, PublishError> {
        let classes = self.measure().await?;
        let status = node_status(classes, now(), self.interval);
        let api: Api<LivecloneNode> = Api::all(self.client.clone());
        let body = json!({
            "apiVersion": LivecloneNode::api_version(&()),
            "kind": LivecloneNode::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(NODE_FIELD_MANAGER).force();
        // At most twice: once more after re-creating an object that was
        // deleted since the last publish.
        for _ in 0..2 {
            if !self.created {
                self.create(&api).await?;
                self.created = true;
            }
            match api
                .patch_status(&self.node, &params, &Patch::Apply(&body))
                .await
            {
                Ok(object) => return Ok(object),
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    info!(node = %self.node, "LivecloneNode gone; creating it again");
                    self.created = false;
                }
                Err(source) => {
                    return Err(PublishError::Status {
                        node: self.node.clone(),
                        source,
                    })
                }
            }
        }
        Err(PublishError::Vanished {
            node: self.node.clone(),
        })
    }

    /// Publishes at once, then every interval, until `shutdown` turns true
    /// (or its sender is dropped). Failures are logged and retried sooner.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        info!(node = %self.node, interval = ?self.interval, "capacity publisher starting");
        loop {
            if *shutdown.borrow() {
                break;
            }
            let wait = match self.publish().await {
                Ok(object) => {
                    debug!(
                        node = %self.node,
                        available = ?object.status.and_then(|status| status.available),
                        "capacity published"
                    );
                    self.interval
                }
                Err(e) => {
                    let retry = self.interval.min(RETRY_AFTER_FAILURE);
                    warn!("{e}; trying again in {retry:?}");
                    retry
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // A dropped sender also means stop.
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        info!(node = %self.node, "capacity publisher stopped");
    }
}
