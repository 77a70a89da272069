//! The LivecloneVolume reconciler: makes, grows and deletes this node's
//! volumes as their objects say, and reports each outcome and the volume's
//! health in the status.

use std::sync::Arc;

use kube::runtime::controller::Action;
use kube::ResourceExt;
use tracing::{info, info_span, warn, Instrument};

use super::objects::{self, Abnormal};
use super::storage::{has_storage_finalizer, Context, ReconcileError};
use crate::domain::engine::CapacityRange;
use crate::domain::error::DomainError;
use crate::domain::hydration::HydrationPhase;
use crate::domain::ids::VolumeId;
use crate::domain::model::VolumeRecord;
use crate::k8s::{LivecloneVolume, LivecloneVolumeSpec, VolumePhase};

/// Event reason when the node cannot make a volume.
pub const PROVISIONING_FAILED: &str = "ProvisioningFailed";
const PROVISION_ACTION: &str = "Provision";

pub(super) async fn reconcile(
    volume: Arc<LivecloneVolume>,
    context: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let span = info_span!("lcvol", volume = %volume.name_any());
    reconcile_volume(&volume, &context).instrument(span).await
}

async fn reconcile_volume(
    volume: &LivecloneVolume,
    context: &Context,
) -> Result<Action, ReconcileError> {
    if volume.spec.node != context.node {
        // Labelled for this node but meant for another: the label is only
        // a filter, spec.node decides.
        warn!(node = %volume.spec.node, "ignored: labelled for this node, spec.node names another");
        return Ok(Action::await_change());
    }
    let name = volume.name_any();
    let identity = objects::volume_identity(&name, &volume.spec.name);
    if volume.metadata.deletion_timestamp.is_some() {
        return delete(volume, context, identity.ok()).await;
    }
    let generation = volume.metadata.generation;
    let previous = volume.status.as_ref();
    let id = match identity {
        Ok(id) => id,
        Err(error) => {
            publish(volume, context, None, Some(error), None).await?;
            return Ok(Action::await_change());
        }
    };
    if previous.is_some_and(|s| objects::failed_at(&s.conditions, generation)) {
        // Given up on this spec; a new generation is tried afresh.
        return Ok(Action::await_change());
    }
    let existing = {
        let id = id.clone();
        context.blocking(move |engine| engine.volume(&id)).await
    };
    let existing = match existing {
        Ok(record) => record,
        Err(e) => {
            // Says nothing about the volume: the status stays as it is.
            let delay = context.retry_after(&name);
            warn!("reading the volume's record: {e}; retrying in {delay:?}");
            return Ok(Action::requeue(delay));
        }
    };
    let (record, error) = if objects::volume_settled(
        previous,
        generation,
        existing.as_ref(),
        volume.spec.capacity_bytes,
    ) {
        (existing, None)
    } else {
        ensure(context, &volume.spec, &id, existing).await
    };
    let abnormal = abnormal(context, &id);
    let transient = error.as_ref().is_some_and(|e| e.code.is_transient());
    let failed = error.is_some() && !transient;
    publish(volume, context, record.as_ref(), error, abnormal.as_ref()).await?;
    if transient {
        return Ok(Action::requeue(context.retry_after(&name)));
    }
    context.succeeded(&name);
    if failed {
        return Ok(Action::await_change());
    }
    // Health has no change notification: looked at again on the period.
    Ok(Action::requeue(context.resync))
}

/// Makes the volume, then grows it to the spec; returns the engine's record
/// afterwards (as far as it got) and the failure, if any.
async fn ensure(
    context: &Context,
    spec: &LivecloneVolumeSpec,
    id: &VolumeId,
    existing: Option<VolumeRecord>,
) -> (Option<VolumeRecord>, Option<DomainError>) {
    let request = match objects::create_request(spec, existing.as_ref()) {
        Ok(request) => request,
        Err(error) => return (existing, Some(error)),
    };
    let wanted = spec.capacity_bytes;
    let id = id.clone();
    context.metrics.engine_called();
    let outcome = context
        .blocking(move |engine| {
            let made = match engine.create_volume(request) {
                Ok(record) => record,
                Err(error) => return Ok((engine.volume(&id).ok().flatten(), Some(error))),
            };
            if made.capacity_bytes >= wanted {
                return Ok((Some(made), None));
            }
            let grown = engine.expand_volume(
                &id,
                CapacityRange {
                    required_bytes: wanted,
                    limit_bytes: 0,
                },
            );
            let record = engine.volume(&id).ok().flatten().or(Some(made));
            Ok((record, grown.err()))
        })
        .await;
    match outcome {
        Ok(outcome) => outcome,
        Err(error) => (existing, Some(error)),
    }
}

/// The volume's hydration trouble, if any, as the engine's monitor sees it.
fn abnormal(context: &Context, id: &VolumeId) -> Option<Abnormal> {
    // Both read the monitor's in-memory progress: no blocking.
    let message = context.engine.abnormal_condition(id)?;
    let reason = match context.engine.progress_of(id).map(|p| p.phase) {
        Some(HydrationPhase::Failed) => "HydrationFailed",
        _ => "HydrationStalled",
    };
    Some(Abnormal { reason, message })
}

/// Writes the status for this outcome when it differs from the object's,
/// with a Warning Event when the volume has just failed for good.
async fn publish(
    volume: &LivecloneVolume,
    context: &Context,
    record: Option<&VolumeRecord>,
    error: Option<DomainError>,
    abnormal: Option<&Abnormal>,
) -> Result<(), ReconcileError> {
    let generation = volume.metadata.generation;
    let previous = volume.status.as_ref();
    let next = objects::volume_status(
        record,
        error.as_ref(),
        generation,
        abnormal,
        previous,
        &crate::k8s::now(),
    );
    if previous == Some(&next) {
        return Ok(());
    }
    context.write_status(volume, &next).await?;
    let was = previous.and_then(|s| s.phase);
    if was != next.phase {
        let message = next.message.as_deref().unwrap_or_default();
        match next.phase {
            Some(VolumePhase::Failed) => warn!("volume failed: {message}"),
            phase => info!(?phase, "{message}"),
        }
    }
    let newly_failed = objects::failed_at(&next.conditions, generation)
        && !previous.is_some_and(|s| objects::failed_at(&s.conditions, generation));
    if newly_failed {
        let note = next.message.as_deref().unwrap_or_default();
        if context
            .publisher
            .warn(volume, PROVISIONING_FAILED, PROVISION_ACTION, note)
            .await
        {
            context.metrics.warned();
        }
    }
    Ok(())
}

/// Deletes the volume's storage, then lets the object go. An object whose
/// name is not its spec's volume ID never had storage made for it here.
async fn delete(
    volume: &LivecloneVolume,
    context: &Context,
    id: Option<VolumeId>,
) -> Result<Action, ReconcileError> {
    if !has_storage_finalizer(volume) {
        return Ok(Action::await_change());
    }
    let name = volume.name_any();
    if let Some(id) = id {
        let generation = volume.metadata.generation;
        let previous = volume.status.as_ref();
        // Once per deletion: a retry keeps the last failure's message.
        if previous.and_then(|s| s.phase) != Some(VolumePhase::Deleting) {
            let deleting =
                objects::deleting_volume_status(previous, generation, None, &crate::k8s::now());
            context.write_status(volume, &deleting).await?;
        }
        context.metrics.engine_called();
        if let Err(error) = context
            .blocking(move |engine| engine.delete_volume(&id))
            .await
        {
            let delay = context.retry_after(&name);
            warn!("deleting the volume: {error}; retrying in {delay:?}");
            let stuck = objects::deleting_volume_status(
                previous,
                generation,
                Some(&error),
                &crate::k8s::now(),
            );
            if previous != Some(&stuck) {
                context.write_status(volume, &stuck).await?;
            }
            return Ok(Action::requeue(delay));
        }
        info!("volume deleted from the node");
    }
    context.remove_finalizer(volume).await?;
    context.succeeded(&name);
    Ok(Action::await_change())
}
