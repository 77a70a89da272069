//! The node agent: the part of `liveclone node` in Kubernetes mode that
//! acts on this node's custom resources. [`run_agent`] runs its three
//! reconcilers and its capacity publisher side by side until shutdown:
//!
//! * **LivecloneVolume** (`volumes`): makes the volume of every object
//!   labelled for this node (`engine.create_volume` from the spec, which is
//!   idempotent; then `engine.expand_volume` while the made size is below
//!   `spec.capacityBytes`), and writes the outcome into the status by
//!   server-side apply (field manager
//!   [`NODE_FIELD_MANAGER`](crate::k8s::NODE_FIELD_MANAGER), forced): phase
//!   `Ready` with the size and `Ready=True`; for an engine error that a
//!   retry may cure (`ErrorCode::is_transient`), phase `Creating` with the
//!   message, retried with a doubling delay; for any other, phase `Failed`
//!   and `Ready=False` whose reason is the error code's name (what the
//!   controller agent returns as the gRPC code), not retried until the spec
//!   changes (a new generation), plus a `ProvisioningFailed` Warning Event.
//!   `observedGeneration` (also on the conditions) says which spec the
//!   status reflects. The `Abnormal` condition mirrors
//!   `engine.abnormal_condition` (a stalled or failed hydration), looked at
//!   again every [`NodeAgentConfig::resync_interval`].
//! * **LivecloneSnapshot** (`snapshots`): `engine.create_snapshot`, then
//!   `readyToUse`, size, creation time and `Ready`; looked at again on the
//!   same period until ready. Errors as for volumes (Event
//!   `SnapshotFailed`).
//! * **Deletion** of either: the status says `Deleting` (volumes) while
//!   `engine.delete_volume` or `engine.delete_snapshot` runs, then the
//!   [`STORAGE_FINALIZER`](crate::k8s::STORAGE_FINALIZER) is removed by a
//!   JSON patch that first tests the finalizer list it read, so a
//!   concurrent change by someone else is never overwritten. The engine
//!   itself keeps a deleted source's image for clones still copying from
//!   it, so the finalizer does not wait for them. A failed delete (a volume
//!   still staged) keeps the finalizer, shows the message and is retried
//!   with the doubling delay.
//! * **VolumeHydration** (the hydration reconciler, below).
//! * **LivecloneNode** (`capacity`): the node's own object, named by the
//!   node, whose status lists the engine's device classes with their size
//!   and free space (an error message and nothing free for a pool that
//!   cannot be measured); applied at start and then every
//!   [`NodeAgentConfig::capacity_interval`], for the controller agent's
//!   GetCapacity.
//!
//! Every status is written only when it differs from the object's, so a
//! settled object costs one record read per period and no writes; and a
//! restarted agent finds the engine's records and the objects' statuses in
//! agreement and calls nothing (re-adoption without repeated work).
//! Objects whose `spec.node` is another node are ignored even when
//! labelled for this one; objects whose name is not the ID the engine
//! derives from `spec.name` are refused (`Failed`, `InvalidArgument`), and
//! on deletion released without touching the engine.
//!
//! Why a `kube::runtime::Controller` for volumes and snapshots (and not the
//! hydration reconciler's loop over a store): their work is driven by spec
//! changes, not by a fast-moving engine state, so per-object scheduling is
//! what fits: one reconcile per object at a time, a requeue per object
//! (the resync period for health, a backoff after failures) instead of
//! rounds over every object, and a graceful shutdown that lets reconciles
//! in progress finish. Each Controller watches its kind with the label
//! selector `liveclone.io/node=<node>`; it also wakes on the agent's own
//! status writes, which then find nothing to do. Engine calls block (tools,
//! ioctls, files), so they run on the blocking pool, in the reconcile's
//! span (`lcvol` or `lcsnap`, with the ID), so that every log line names
//! its object.
//!
//! The hydration reconciler makes the VolumeHydrations of its node reflect
//! and control the node's hydrations:
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
//! RBAC (deploy/rbac/node.yaml): list and watch `volumehydrations`,
//! `liveclonevolumes` and `liveclonesnapshots`; patch the status of all
//! three; patch `liveclonevolumes` and `liveclonesnapshots` (the finalizer);
//! create and patch `events.k8s.io` events; get `persistentvolumeclaims` (a
//! claim's UID, for its Events); create and patch `liveclonenodes` and
//! patch `liveclonenodes/status` (its own LivecloneNode).

mod capacity;
mod events;
mod metrics;
mod objects;
mod reconciler;
mod snapshots;
mod spec;
mod status;
mod storage;
mod volumes;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use capacity::{CapacityPublisher, PublishError};
pub use events::REPORTING_CONTROLLER;
pub use metrics::{AgentMetrics, StorageMetrics};
pub use objects::{reason, ABNORMAL_CONDITION};
pub use snapshots::SNAPSHOT_FAILED;
pub use volumes::PROVISIONING_FAILED;

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

/// Settings of the whole node agent.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    /// The hydration reconciler's.
    pub hydrations: HydrationAgentConfig,
    /// How often a settled LivecloneVolume is looked at again (its
    /// `Abnormal` condition follows the engine's hydration health, which
    /// has no change notification), and a LivecloneSnapshot still being cut.
    pub resync_interval: Duration,
    /// The first delay before retrying an object after a failure (an engine
    /// error a retry may cure, a failed delete, a refused API call); it
    /// doubles with every failure in a row, up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How often the node's LivecloneNode (its classes' capacity) is
    /// published. Readers take figures older than
    /// [`STALE_AFTER_INTERVALS`](crate::k8s::capacity::STALE_AFTER_INTERVALS)
    /// of these for stale.
    pub capacity_interval: Duration,
}

impl Default for NodeAgentConfig {
    fn default() -> Self {
        Self {
            hydrations: HydrationAgentConfig::default(),
            resync_interval: Duration::from_secs(5),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            capacity_interval: crate::k8s::capacity::DEFAULT_PUBLISH_INTERVAL,
        }
    }
}

/// The whole node agent, built before it runs so that its caller can keep
/// its metrics.
pub struct NodeAgent {
    hydrations: HydrationAgent,
    volumes: Arc<storage::Context>,
    snapshots: Arc<storage::Context>,
    capacity: CapacityPublisher,
}

impl NodeAgent {
    /// `node` is this node's name as the objects give it in `spec.node`
    /// (the Kubernetes node name, also the CSI node ID).
    pub fn new(
        client: kube::Client,
        engine: Arc<Engine>,
        node: String,
        config: NodeAgentConfig,
    ) -> Self {
        let retry = (config.retry_min, config.retry_max);
        let context = || {
            Arc::new(storage::Context::new(
                client.clone(),
                Arc::clone(&engine),
                node.clone(),
                config.resync_interval,
                retry,
            ))
        };
        NodeAgent {
            volumes: context(),
            snapshots: context(),
            hydrations: HydrationAgent::new(
                client.clone(),
                Arc::clone(&engine),
                node.clone(),
                config.hydrations.clone(),
            ),
            capacity: CapacityPublisher::new(
                client.clone(),
                Arc::clone(&engine),
                node.clone(),
                config.capacity_interval,
            ),
        }
    }

    pub fn hydration_metrics(&self) -> Arc<AgentMetrics> {
        self.hydrations.metrics()
    }

    pub fn volume_metrics(&self) -> Arc<StorageMetrics> {
        Arc::clone(&self.volumes.metrics)
    }

    pub fn snapshot_metrics(&self) -> Arc<StorageMetrics> {
        Arc::clone(&self.snapshots.metrics)
    }

    /// Runs the three reconcilers and the capacity publisher until
    /// `shutdown` turns true (or its sender is dropped); work in progress
    /// then finishes first.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        tokio::join!(
            self.hydrations.run(shutdown.clone()),
            self.capacity.run(shutdown.clone()),
            storage::run(
                "LivecloneVolume",
                self.volumes,
                volumes::reconcile,
                shutdown.clone()
            ),
            storage::run(
                "LivecloneSnapshot",
                self.snapshots,
                snapshots::reconcile,
                shutdown
            ),
        );
    }
}

/// Runs the node agent of node `node` (volumes, snapshots, hydrations,
/// its LivecloneNode) until `shutdown` turns true.
///
/// Meant to be started by `liveclone node` in Kubernetes mode, after the
/// engine's recovery (so that every volume of the node is re-adopted) and
/// beside the hydration monitor (see [`run`]). The client's identity needs
/// the rules of `deploy/rbac/node.yaml`. Returns `()`: nothing can fail at
/// start, and API errors are retried with a backoff (logged).
pub async fn run_agent(
    client: kube::Client,
    engine: Arc<Engine>,
    node: String,
    config: NodeAgentConfig,
    shutdown: watch::Receiver<bool>,
) {
    NodeAgent::new(client, engine, node, config)
        .run(shutdown)
        .await;
}
