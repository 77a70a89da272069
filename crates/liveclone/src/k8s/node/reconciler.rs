//! The loop: a watch of this node's VolumeHydrations into a store, and
//! rounds over the store that compare each object with the engine.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{predicates, watcher, PredicateConfig, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::{debug, info, info_span, warn, Instrument};

use super::events::Publisher;
use super::status::{self, SpecProblem, WriteCause};
use super::{spec, AgentMetrics, HydrationAgentConfig};
use crate::domain::engine::Engine;
use crate::domain::error::DomainError;
use crate::domain::hydration::HydrationPhase;
use crate::domain::ids::VolumeId;
use crate::domain::model::VolumeState;
use crate::k8s::{
    node_label_value, VolumeHydration, VolumeHydrationStatus, NODE_FIELD_MANAGER, NODE_LABEL,
};

const MIN_RESYNC: std::time::Duration = std::time::Duration::from_millis(20);
/// How long a round in progress at shutdown may take to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What every round shares (kube-rs' controller "Context").
pub(super) struct Context {
    client: Client,
    engine: Arc<Engine>,
    node: String,
    config: HydrationAgentConfig,
    publisher: Publisher,
    pub metrics: Arc<AgentMetrics>,
}

impl Context {
    pub fn new(
        client: Client,
        engine: Arc<Engine>,
        node: String,
        config: HydrationAgentConfig,
    ) -> Self {
        Context {
            publisher: Publisher::new(client.clone(), &node),
            client,
            engine,
            node,
            config,
            metrics: Arc::default(),
        }
    }
}

/// What the agent remembers of one VolumeHydration between rounds. Lost
/// on restart by design: everything in it is rebuilt from the object's
/// status and the engine's records, so a restart neither repeats Events
/// nor loses a phase change.
struct Tracked {
    /// `namespace/name`, for logs and metrics.
    key: String,
    /// The status as last written, or as found on the object when first
    /// seen: what changes are measured against, where condition transition
    /// times and the published phase come from.
    published: Option<VolumeHydrationStatus>,
    /// When this process last wrote it.
    published_at: Option<Instant>,
    /// The generation whose spec the engine reflects (observedGeneration).
    applied_generation: Option<i64>,
    /// What that spec asks that the node cannot do.
    spec_problem: Option<SpecProblem>,
    /// A failed engine call for the spec: its generation and when.
    failed_call: Option<(Option<i64>, Instant)>,
    /// The claim, for Events, once read.
    claim: Option<ObjectReference>,
    /// The final Complete status is on the object: nothing more to do.
    done: bool,
    /// Why the object is not reconciled, as last logged (logged once).
    skipped: Option<String>,
}

impl Tracked {
    fn new(vh: &VolumeHydration) -> Self {
        let published = vh.status.clone();
        Tracked {
            key: format!("{}/{}", vh.namespace().unwrap_or_default(), vh.name_any()),
            done: published
                .as_ref()
                .is_some_and(|s| s.phase == Some(HydrationPhase::Complete)),
            published,
            published_at: None,
            applied_generation: None,
            spec_problem: None,
            failed_call: None,
            claim: None,
            skipped: None,
        }
    }

    fn skip(&mut self, why: String) {
        if self.skipped.as_ref() != Some(&why) {
            info!("not reconciled: {why}");
            self.skipped = Some(why);
        }
    }
}

pub(super) async fn run(context: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let (store, writer) = reflector::store();
    let wake = Arc::new(Notify::new());
    let selector = format!("{NODE_LABEL}={}", node_label_value(&context.node));
    info!(node = %context.node, %selector, "hydration reconciler starting");
    let watch = tokio::spawn(watch_hydrations(
        Api::all(context.client.clone()),
        selector,
        writer,
        Arc::clone(&wake),
    ));
    let mut tracked = HashMap::new();
    let mut foreign = HashSet::new();
    // A zero period would spin.
    let resync = context.config.resync_interval.max(MIN_RESYNC);
    loop {
        let pass = round(&context, &store, &mut tracked, &mut foreign);
        let mut pass = std::pin::pin!(pass);
        let stopping = tokio::select! {
            _ = &mut pass => false,
            _ = shutdown.wait_for(|stop| *stop) => true,
        };
        if stopping {
            // A round cut short between a phase change's status write and
            // its Events would lose the Events for good: the next agent
            // finds the phase already published. So the round may finish,
            // within bounds.
            if tokio::time::timeout(SHUTDOWN_GRACE, pass).await.is_err() {
                warn!("stopping in the middle of a round");
            }
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(resync) => {}
            _ = wake.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    watch.abort();
    info!(node = %context.node, "hydration reconciler stopped");
}

/// Keeps `writer`'s store in step with this node's VolumeHydrations and
/// wakes the loop when one appears or its spec changes (its generation;
/// status writes, the agent's own included, do not wake it).
async fn watch_hydrations(
    api: Api<VolumeHydration>,
    selector: String,
    writer: Writer<VolumeHydration>,
    wake: Arc<Notify>,
) {
    let changes = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let mut changes = std::pin::pin!(changes);
    while let Some(change) = changes.next().await {
        match change {
            Ok(vh) => {
                debug!(vh = %vh.name_any(), generation = ?vh.metadata.generation, "spec changed");
                wake.notify_one();
            }
            // The watcher starts again by itself, after the backoff.
            Err(e) => warn!("watching VolumeHydrations: {e}"),
        }
    }
}

/// One pass over every VolumeHydration of the node, concurrently, each in
/// a span that names its volume.
async fn round(
    context: &Arc<Context>,
    store: &Store<VolumeHydration>,
    tracked: &mut HashMap<String, Tracked>,
    foreign: &mut HashSet<String>,
) {
    let mut present = HashSet::new();
    let mut listed = HashSet::new();
    let mut tasks = JoinSet::new();
    for vh in store.state() {
        let Some(uid) = vh.uid() else {
            continue;
        };
        listed.insert(uid.clone());
        if vh.spec.node != context.node {
            // Labelled for this node but meant for another: the label is
            // only a filter, spec.node decides.
            if foreign.insert(uid) {
                warn!(
                    vh = %format!("{}/{}", vh.namespace().unwrap_or_default(), vh.name_any()),
                    node = %vh.spec.node,
                    "ignoring a VolumeHydration labelled for this node whose spec.node is another"
                );
            }
            continue;
        }
        present.insert(uid.clone());
        let entry = tracked.remove(&uid).unwrap_or_else(|| Tracked::new(&vh));
        if entry.done {
            tracked.insert(uid, entry);
            continue;
        }
        let span = info_span!(
            "hydration",
            volume = %vh.spec.destination.volume_handle,
            vh = %entry.key,
        );
        let context = Arc::clone(context);
        tasks.spawn(
            async move {
                let mut entry = entry;
                reconcile(&context, &vh, &mut entry).await;
                (uid, entry)
            }
            .instrument(span),
        );
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((uid, entry)) => {
                tracked.insert(uid, entry);
            }
            // Its state is rebuilt from the object on the next round.
            Err(e) => warn!("a hydration reconcile task failed: {e}"),
        }
    }
    tracked.retain(|uid, _| present.contains(uid));
    foreign.retain(|uid| listed.contains(uid));
}

/// Brings the engine to the spec, then the status to the engine.
async fn reconcile(context: &Context, vh: &VolumeHydration, entry: &mut Tracked) {
    let handle = &vh.spec.destination.volume_handle;
    let id: VolumeId = match handle.parse() {
        Ok(id) => id,
        Err(e) => return entry.skip(format!("spec.destination.volumeHandle: {e}")),
    };
    let record = {
        let (engine, id) = (Arc::clone(&context.engine), id.clone());
        tokio::task::spawn_blocking(move || engine.volume(&id))
            .await
            .unwrap_or_else(|e| Err(DomainError::internal(format!("engine task failed: {e}"))))
    };
    let record = match record {
        Ok(Some(record)) => record,
        Ok(None) => {
            return entry.skip(format!(
                "volume {id} does not exist on this node (not yet, or not here)"
            ))
        }
        Err(e) => {
            warn!("reading the volume's record: {e}");
            return;
        }
    };
    entry.skipped = None;
    let generation = vh.metadata.generation;

    match (&record.hydration, record.state) {
        (Some(hydration), VolumeState::Ready) => {
            let now = Instant::now();
            let call_engine = !matches!(
                entry.failed_call,
                Some((failed, at)) if failed == generation
                    && now.saturating_duration_since(at) < context.config.spec_retry_interval
            );
            let pass = spec::apply(
                &context.engine,
                &id,
                &record,
                hydration,
                &vh.spec,
                call_engine,
            )
            .await;
            context.metrics.engine_changed(pass.changes);
            if call_engine {
                // When the engine was not called, the last call's problem
                // still stands.
                entry.spec_problem = pass.problem;
                entry.failed_call = pass.failed_call.then_some((generation, now));
            }
            if pass.handled {
                entry.applied_generation = generation;
            }
        }
        // Still being made: the spec is applied once it is ready.
        (Some(_), _) => {}
        // The copy has ended: nothing left to pause or tune, so the final
        // status reflects the spec as it is.
        (None, _) => {
            entry.applied_generation = generation;
            entry.spec_problem = None;
        }
    }

    let published_phase = entry.published.as_ref().and_then(|s| s.phase);
    let Some(observed) = status::observe(&record, context.engine.progress_of(&id), published_phase)
    else {
        return;
    };
    let next = status::build(
        &observed,
        entry.applied_generation,
        entry.spec_problem.as_ref(),
        entry.published.as_ref(),
        &crate::k8s::now(),
    );
    let now = Instant::now();
    let Some(cause) = status::write_due(
        entry.published.as_ref(),
        entry.published_at,
        &next,
        now,
        context.config.status_interval,
    ) else {
        return;
    };
    if let Err(e) = write_status(&context.client, vh, &next).await {
        context.metrics.status_write_failed();
        // Nothing is recorded as written: the next round tries again.
        warn!("writing the status: {e}");
        return;
    }
    context.metrics.status_written(&entry.key);
    let phase = next.phase;
    match cause {
        WriteCause::PhaseChange => {
            info!(
                from = published_phase
                    .map(HydrationPhase::as_str)
                    .unwrap_or("none"),
                to = phase.map(HydrationPhase::as_str).unwrap_or("none"),
                "published a phase change"
            );
        }
        WriteCause::Update => debug!(progress = ?next.progress, "published progress"),
    }
    let event = phase.and_then(|to| status::phase_event(published_phase, to));
    let note = event.map(|event| event_note(vh, event, next.message.as_deref().unwrap_or("")));
    entry.published = Some(next);
    entry.published_at = Some(now);
    if let (Some(event), Some(note)) = (event, note) {
        if entry.claim.is_none() {
            entry.claim = context.publisher.claim_reference(vh).await;
        }
        let published = context
            .publisher
            .publish(vh, entry.claim.as_ref(), event, &note)
            .await;
        context.metrics.events_published(event.reason(), published);
    }
    if phase == Some(HydrationPhase::Complete) {
        info!("hydration complete; its status is final");
        entry.done = true;
    }
}

/// Server-side apply of the whole status: fields left out are removed.
async fn write_status(
    client: &Client,
    vh: &VolumeHydration,
    status: &VolumeHydrationStatus,
) -> Result<(), kube::Error> {
    let api: Api<VolumeHydration> =
        Api::namespaced(client.clone(), &vh.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": VolumeHydration::api_version(&()),
        "kind": VolumeHydration::kind(&()),
        "status": status,
    });
    api.patch_status(
        &vh.name_any(),
        &PatchParams::apply(NODE_FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(drop)
}

/// The Event's text: the status message, with what was copied from where
/// for the start and the end.
fn event_note(vh: &VolumeHydration, event: status::PhaseEvent, message: &str) -> String {
    let source = &vh.spec.source;
    let source = match &source.namespace {
        Some(namespace) => format!("{:?} {namespace}/{}", source.kind, source.name),
        None => format!("{:?} {}", source.kind, source.name),
    };
    let volume = &vh.spec.destination.volume_handle;
    match event {
        status::PhaseEvent::Started => {
            format!("Copying {source} into volume {volume} in the background. {message}")
        }
        status::PhaseEvent::Complete => {
            format!("Volume {volume} no longer depends on {source}. {message}")
        }
        _ => message.to_owned(),
    }
}
