//! The LivecloneSnapshot reconciler: cuts and deletes this node's
//! snapshots as their objects say, and reports when each is ready to use.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::ResourceExt;
use tracing::{info, info_span, warn, Instrument};

use super::objects;
use super::storage::{has_storage_finalizer, Context, ReconcileError};
use crate::domain::error::DomainError;
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::SnapshotRecord;
use crate::k8s::LivecloneSnapshot;

/// Event reason when the node cannot cut a snapshot.
pub const SNAPSHOT_FAILED: &str = "SnapshotFailed";
const SNAPSHOT_ACTION: &str = "Snapshot";

pub(super) async fn reconcile(
    snapshot: Arc<LivecloneSnapshot>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let span = info_span!("lcsnap", snapshot = %snapshot.name_any());
    reconcile_snapshot(&snapshot, &context)
        .instrument(span)
        .await
}

async fn reconcile_snapshot(
    snapshot: &LivecloneSnapshot,
    context: &Context,
) -> Result<Action, ReconcileError> {
    if snapshot.spec.node != context.node {
        warn!(node = %snapshot.spec.node, "ignored: labelled for this node, spec.node names another");
        return Ok(Action::await_change());
    }
    let name = snapshot.name_any();
    let identity = objects::snapshot_identity(&name, &snapshot.spec.name);
    if snapshot.metadata.deletion_timestamp.is_some() {
        return delete(snapshot, context, identity.ok()).await;
    }
    let generation = snapshot.metadata.generation;
    let previous = snapshot.status.as_ref();
    let source = snapshot
        .spec
        .source_volume
        .parse::<VolumeId>()
        .map_err(|e| {
            DomainError::invalid_argument(format!(
                "spec.sourceVolume {:?}: {e}",
                snapshot.spec.source_volume
            ))
        });
    let (id, source) = match (identity, source) {
        (Ok(id), Ok(source)) => (id, source),
        (Err(error), _) | (_, Err(error)) => {
            publish(snapshot, context, None, Some(error)).await?;
            return Ok(Action::await_change());
        }
    };
    if previous.is_some_and(|s| objects::failed_at(&s.conditions, generation)) {
        return Ok(Action::await_change());
    }
    let existing = {
        let id = id.clone();
        context.blocking(move |engine| engine.snapshot(&id)).await
    };
    let existing = match existing {
        Ok(record) => record,
        Err(e) => {
            let delay = context.retry_after(&name);
            warn!("reading the snapshot's record: {e}; retrying in {delay:?}");
            return Ok(Action::requeue(delay));
        }
    };
    let (record, error) = if objects::snapshot_settled(previous, generation, existing.as_ref()) {
        (existing, None)
    } else {
        let spec_name = snapshot.spec.name.clone();
        context.metrics.engine_called();
        match context
            .blocking(move |engine| engine.create_snapshot(&spec_name, &source))
            .await
        {
            Ok(record) => (Some(record), None),
            Err(error) => (existing, Some(error)),
        }
    };
    let ready = record
        .as_ref()
        .is_some_and(|r| r.state == crate::domain::model::SnapshotState::Ready);
    let transient = error.as_ref().is_some_and(|e| e.code.is_transient());
    let failed = error.is_some() && !transient;
    publish(snapshot, context, record.as_ref(), error).await?;
    if transient {
        return Ok(Action::requeue(context.retry_after(&name)));
    }
    context.succeeded(&name);
    if failed || ready {
        return Ok(Action::await_change());
    }
    // Still being cut: looked at again on the period until ready.
    Ok(Action::requeue(context.resync))
}

async fn publish(
    snapshot: &LivecloneSnapshot,
    context: &Context,
    record: Option<&SnapshotRecord>,
    error: Option<DomainError>,
) -> Result<(), ReconcileError> {
    let generation = snapshot.metadata.generation;
    let previous = snapshot.status.as_ref();
    let next = objects::snapshot_status(
        record,
        error.as_ref(),
        generation,
        previous,
        &crate::k8s::now(),
    );
    if previous == Some(&next) {
        return Ok(());
    }
    context.write_status(snapshot, &next).await?;
    let message = next.message.as_deref().unwrap_or_default();
    if previous.and_then(|s| s.ready_to_use) != next.ready_to_use {
        info!(ready_to_use = ?next.ready_to_use, "{message}");
    }
    let newly_failed = objects::failed_at(&next.conditions, generation)
        && !previous.is_some_and(|s| objects::failed_at(&s.conditions, generation));
    if newly_failed {
        warn!("snapshot failed: {message}");
        if context
            .publisher
            .warn(snapshot, SNAPSHOT_FAILED, SNAPSHOT_ACTION, message)
            .await
        {
            context.metrics.warned();
        }
    }
    Ok(())
}

/// Deletes the snapshot (the engine keeps its image while clones still
/// copy from it), then lets the object go.
async fn delete(
    snapshot: &LivecloneSnapshot,
    context: &Context,
    id: Option<SnapshotId>,
) -> Result<Action, ReconcileError> {
    if !has_storage_finalizer(snapshot) {
        return Ok(Action::await_change());
    }
    let name = snapshot.name_any();
    if let Some(id) = id {
        let generation = snapshot.metadata.generation;
        let previous = snapshot.status.as_ref();
        context.metrics.engine_called();
        if let Err(error) = context
            .blocking(move |engine| engine.delete_snapshot(&id))
            .await
        {
            let delay = context.retry_after(&name);
            warn!("deleting the snapshot: {error}; retrying in {delay:?}");
            let stuck = objects::deleting_snapshot_status(
                previous,
                generation,
                Some(&error),
                &crate::k8s::now(),
            );
            if previous != Some(&stuck) {
                context.write_status(snapshot, &stuck).await?;
            }
            return Ok(Action::requeue(delay));
        }
        info!("snapshot deleted from the node");
    }
    context.remove_finalizer(snapshot).await?;
    context.succeeded(&name);
    Ok(Action::await_change())
}
