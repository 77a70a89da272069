//! The node agent's hydration reconciler: the part of `liveclone node` that
//! makes the VolumeHydrations of its node reflect and control the node's
//! hydrations.
//!
//! * **Status.** For every VolumeHydration whose `spec.node` is this node
//!   and whose `spec.destination.volumeHandle` is a volume of this node's
//!   engine, the status is written by server-side apply (field manager
//!   [`NODE_FIELD_MANAGER`](crate::k8s::NODE_FIELD_MANAGER), forced: the
//!   node is the only writer of these fields) from the progress the
//!   hydration monitor publishes into the engine: at most one write per
//!   volume per [`HydrationAgentConfig::status_interval`], plus one at once
//!   on every phase change, nothing when nothing changed. A completed
//!   hydration gets its final `Complete` status once, then no more writes.
//! * **Spec.** `spec.paused` and `spec.tunables` are compared with the
//!   engine's records at every round and on every spec change the watch
//!   delivers; differences become `pause_hydration`, `resume_hydration` or
//!   `tune_hydration` calls (blocking, so on the blocking pool). What the
//!   node cannot do (invalid tunables, an unsupported rate limit) becomes
//!   the Degraded condition with the engine's explanation, and is not
//!   retried until the spec changes.
//! * **Events** on the VolumeHydration and on its claim for the phase
//!   changes people care about: HydrationStarted, HydrationStalled,
//!   HydrationResumed, HydrationComplete, HydrationFailed (reporting
//!   controller [`REPORTING_CONTROLLER`], instance: the node name).
//!
//! Which objects: a watch of VolumeHydrations in all namespaces with the
//! label selector `liveclone.io/node=<node>` (see
//! [`NODE_LABEL`](crate::k8s::NODE_LABEL) and
//! [`node_label_value`](crate::k8s::node_label_value)), kept in a reflector
//! store. A label rather than client-side filtering on
//! `spec.node` (which custom resources cannot be field-selected on):
//! otherwise every node would receive every VolumeHydration of the cluster
//! and every status write of every other node, a cost that grows with
//! nodes times clones. `spec.node` is still checked on what arrives.
//!
//! Why a loop over the store rather than a `kube::runtime::Controller`: the
//! status side follows the engine's in-memory progress, which has no change
//! notification, so every object is looked at on a short period anyway; a
//! Controller would requeue every object at that period and trigger on its
//! own status writes. The watch only wakes the loop early when a spec
//! changes (generation filter), so an edit takes effect at once.
//!
//! RBAC (deploy/rbac/node.yaml): list and watch `volumehydrations`, patch
//! `volumehydrations/status`, create and patch `events.k8s.io` events, get
//! `persistentvolumeclaims` (a claim's UID, for its Events).

mod events;
mod metrics;
mod reconciler;
mod spec;
mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use events::REPORTING_CONTROLLER;
pub use metrics::AgentMetrics;

use crate::domain::engine::Engine;

/// Settings of the hydration reconciler.
#[derive(Debug, Clone)]
pub struct HydrationAgentConfig {
    /// At most one status write per volume per this interval; phase
    /// changes are written at once regardless.
    pub status_interval: Duration,
    /// How often the engine's progress and records are compared with the
    /// objects. Bounds how late a phase change is published; spec changes
    /// wake the loop at once.
    pub resync_interval: Duration,
    /// After an engine call for a spec failed for a reason other than
    /// "busy" or "invalid", how long before it is tried again (a new spec
    /// is tried at once).
    pub spec_retry_interval: Duration,
}

impl Default for HydrationAgentConfig {
    fn default() -> Self {
        Self {
            status_interval: Duration::from_secs(2),
            resync_interval: Duration::from_millis(500),
            spec_retry_interval: Duration::from_secs(10),
        }
    }
}

/// The reconciler, built before it runs so that its caller can keep its
/// [`AgentMetrics`].
pub struct HydrationAgent {
    context: Arc<reconciler::Context>,
}

impl HydrationAgent {
    /// `node` is this node's name as VolumeHydrations give it in
    /// `spec.node` (the Kubernetes node name, which is also the CSI node ID
    /// the node plugin reports).
    pub fn new(
        client: kube::Client,
        engine: Arc<Engine>,
        node: String,
        config: HydrationAgentConfig,
    ) -> Self {
        HydrationAgent {
            context: Arc::new(reconciler::Context::new(client, engine, node, config)),
        }
    }

    pub fn metrics(&self) -> Arc<AgentMetrics> {
        Arc::clone(&self.context.metrics)
    }

    /// Runs until `shutdown` turns true (or its sender is dropped); a round
    /// in progress then finishes first (at most 5 s), so that a phase change
    /// written to the status also gets its Events.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        reconciler::run(self.context, shutdown).await;
    }
}

/// Runs the hydration reconciler of node `node` until `shutdown` turns true.
///
/// Meant to be started by `liveclone node` in Kubernetes mode, after the
/// engine's recovery (so that every volume of the node is re-adopted) and
/// beside the hydration monitor, whose published progress it reports (with
/// the monitor not running, clones stay `Pending`):
///
/// ```ignore
/// let monitor = tokio::spawn(monitor::run(Arc::clone(&engine), monitor_config, stop_rx.clone()));
/// let client = kube::Client::try_default().await?;   // in-cluster service account
/// let hydrations = tokio::spawn(liveclone::k8s::node::run(
///     client,
///     Arc::clone(&engine),
///     node_id.clone(),
///     HydrationAgentConfig::default(),
///     stop_rx,
/// ));
/// // on SIGTERM: stop_tx.send(true), then await both.
/// ```
///
/// The client's identity needs the rules of `deploy/rbac/node.yaml`. The
/// function returns `()`: it has nothing to fail on at start, and the
/// watch retries API errors with a backoff (logged).
pub async fn run(
    client: kube::Client,
    engine: Arc<Engine>,
    node: String,
    config: HydrationAgentConfig,
    shutdown: watch::Receiver<bool>,
) {
    HydrationAgent::new(client, engine, node, config)
        .run(shutdown)
        .await;
}
