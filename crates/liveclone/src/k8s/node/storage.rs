//! What the LivecloneVolume and LivecloneSnapshot reconcilers share: their
//! context, engine calls on the blocking pool, status writes, finalizer
//! removal, retry delays, and the `kube::runtime::Controller` that drives
//! each of them.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tokio_stream::StreamExt;
use tracing::{debug, info, warn, Span};

use super::events::Publisher;
use super::metrics::StorageMetrics;
use super::objects;
use crate::domain::engine::Engine;
use crate::domain::error::{DomainError, DomainResult};
use crate::k8s::{node_label_value, NODE_FIELD_MANAGER, NODE_LABEL, STORAGE_FINALIZER};

/// What every reconcile of one kind shares (kube-rs' controller "Context").
pub(super) struct Context {
    pub client: Client,
    pub engine: Arc<Engine>,
    pub node: String,
    /// How often a settled object is looked at again (volume health; a
    /// snapshot still being cut).
    pub resync: Duration,
    retry_min: Duration,
    retry_max: Duration,
    pub publisher: Publisher,
    pub metrics: Arc<StorageMetrics>,
    /// Failed attempts in a row, by object name (both kinds are
    /// cluster-scoped), for the retry delay.
    attempts: Mutex<HashMap<String, u32>>,
}

/// A failure that only an API call can have; engine failures become
/// status, not errors.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReconcileError {
    #[error("writing the status: {0}")]
    Status(#[source] kube::Error),
    #[error("removing the storage finalizer: {0}")]
    Finalizer(#[source] kube::Error),
}

impl Context {
    pub fn new(
        client: Client,
        engine: Arc<Engine>,
        node: String,
        resync: Duration,
        retry: (Duration, Duration),
    ) -> Self {
        Context {
            publisher: Publisher::new(client.clone(), &node),
            client,
            engine,
            node,
            resync,
            retry_min: retry.0,
            retry_max: retry.1,
            metrics: Arc::default(),
            attempts: Mutex::default(),
        }
    }

    fn attempts(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        // A counter map cannot be left half updated by a panic.
        self.attempts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a failed attempt on `name` and says when to try again.
    pub fn retry_after(&self, name: &str) -> Duration {
        let mut attempts = self.attempts();
        let count = attempts.entry(name.to_owned()).or_default();
        let delay = objects::retry_delay(*count, self.retry_min, self.retry_max);
        *count = count.saturating_add(1);
        delay
    }

    /// Forgets `name`'s failures: the next one waits the shortest delay.
    pub fn succeeded(&self, name: &str) {
        self.attempts().remove(name);
    }

    /// Runs `call` (engine calls block on tools, ioctls and files) on the
    /// blocking pool, in the caller's span so that the engine's logs carry
    /// the object's ID.
    pub async fn blocking<T, F>(&self, call: F) -> DomainResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Engine) -> DomainResult<T> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        let span = Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| call(&engine)))
            .await
            .unwrap_or_else(|e| Err(DomainError::internal(format!("engine task failed: {e}"))))
    }

    /// Server-side apply of the whole status (fields left out are removed),
    /// forced: the node is the only writer of these fields.
    pub async fn write_status<K, S>(&self, object: &K, status: &S) -> Result<(), ReconcileError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
        S: Serialize,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let body = json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        let result = api
            .patch_status(
                &object.name_any(),
                &PatchParams::apply(NODE_FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await;
        self.metrics.status_written(result.is_ok());
        result.map(drop).map_err(ReconcileError::Status)
    }

    /// Removes [`STORAGE_FINALIZER`] from `object`, refused by the API
    /// server if its finalizers changed since this copy was read (the
    /// watch then delivers the new list and the removal is tried again).
    pub async fn remove_finalizer<K>(&self, object: &K) -> Result<(), ReconcileError>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    {
        let Some(patch) = objects::finalizer_removal(object.finalizers()) else {
            return Ok(());
        };
        let patch = serde_json::from_value(patch)
            .map(Patch::<()>::Json)
            .map_err(|e| ReconcileError::Finalizer(kube::Error::SerdeError(e)))?;
        let api: Api<K> = Api::all(self.client.clone());
        match api
            .patch(&object.name_any(), &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                self.metrics.finalizer_removed();
                info!("storage finalizer removed");
                Ok(())
            }
            // Gone already: nothing holds it any more.
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(ReconcileError::Finalizer(e)),
        }
    }
}

/// Whether `object` carries [`STORAGE_FINALIZER`].
pub(super) fn has_storage_finalizer(object: &impl Resource) -> bool {
    object
        .meta()
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == STORAGE_FINALIZER))
}

/// Retries a reconcile whose API call failed after the object's next delay.
fn error_policy<K: Resource>(
    object: Arc<K>,
    error: &ReconcileError,
    context: Arc<Context>,
) -> Action {
    let name = object.meta().name.clone().unwrap_or_default();
    let delay = context.retry_after(&name);
    warn!(object = %name, "{error}; retrying in {delay:?}");
    Action::requeue(delay)
}

/// Runs a Controller of `K` over the objects labelled for this node until
/// `shutdown` turns true (or its sender is dropped); reconciles in progress
/// then finish first.
pub(super) async fn run<K, F, Fut>(
    kind: &'static str,
    context: Arc<Context>,
    reconcile: F,
    mut shutdown: watch::Receiver<bool>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, ReconcileError>> + Send + 'static,
{
    let selector = format!("{NODE_LABEL}={}", node_label_value(&context.node));
    info!(node = %context.node, %selector, "{kind} reconciler starting");
    // The controller's shutdown trigger must be Sync, which a watch wait is
    // not: a oneshot relays it.
    let (stop, stopped) = oneshot::channel::<()>();
    let relay = tokio::spawn(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
        let _ = stop.send(());
    });
    let api: Api<K> = Api::all(context.client.clone());
    let node = context.node.clone();
    let results = Controller::new(api, watcher::Config::default().labels(&selector))
        .graceful_shutdown_on(async move {
            let _ = stopped.await;
        })
        .run(reconcile, error_policy::<K>, context);
    let mut results = std::pin::pin!(results);
    while let Some(result) = results.next().await {
        match result {
            Ok(_) => {}
            // Logged by the error policy.
            Err(controller::Error::ReconcilerFailed(..)) => {}
            Err(controller::Error::ObjectNotFound(object)) => {
                debug!(object = %object.name, "gone before its reconcile")
            }
            // The watch starts again by itself, after a backoff.
            Err(e) => warn!("{kind} reconciler: {e}"),
        }
    }
    relay.abort();
    info!(%node, "{kind} reconciler stopped");
}
