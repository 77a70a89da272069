//! Kubernetes Events for hydration phase changes, on the VolumeHydration
//! and on the clone's PersistentVolumeClaim (where users look first:
//! `kubectl describe pvc`).

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, warn};

use super::status::PhaseEvent;
use crate::k8s::{bounded_name, VolumeHydration};

/// `reportingController` of every Event the node agents publish.
pub const REPORTING_CONTROLLER: &str = "csi.liveclone.io/node";

/// The API server refuses a `reportingInstance` longer than this; node
/// names may be longer.
const REPORTING_INSTANCE_MAX: usize = 128;

/// Events API limit on `note`, in bytes.
const NOTE_MAX: usize = 1024;

/// The `action` of hydration Events (what the agent was doing).
const ACTION: &str = "Hydrate";

pub(super) struct Publisher {
    client: Client,
    recorder: Recorder,
}

impl Publisher {
    pub fn new(client: Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_owned(),
            instance: Some(bounded_name(node, REPORTING_INSTANCE_MAX)),
        };
        Publisher {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }

    /// The claim named by the VolumeHydration, for Events on it; `None`
    /// (and a log line) if it cannot be read. With its UID, because that is
    /// what `kubectl describe pvc` matches Events on.
    pub async fn claim_reference(&self, vh: &VolumeHydration) -> Option<ObjectReference> {
        let namespace = vh.namespace()?;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &namespace);
        match claims.get_opt(&vh.spec.pvc).await {
            Ok(Some(claim)) => Some(reference(&claim)),
            Ok(None) => {
                debug!(pvc = %vh.spec.pvc, "the claim does not exist; its Events are skipped");
                None
            }
            Err(e) => {
                warn!(pvc = %vh.spec.pvc, "reading the claim for its Events: {e}");
                None
            }
        }
    }

    /// Publishes `event` on the VolumeHydration and, when known, its claim.
    /// Returns how many were published; failures are logged, not retried:
    /// the status says the same thing and is what tools read.
    pub async fn publish(
        &self,
        vh: &VolumeHydration,
        claim: Option<&ObjectReference>,
        event: PhaseEvent,
        note: &str,
    ) -> u32 {
        let event = Event {
            type_: if event.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason().to_owned(),
            note: Some(truncate(note, NOTE_MAX)),
            action: ACTION.to_owned(),
            secondary: None,
        };
        let mut published = 0;
        for target in std::iter::once(reference(vh)).chain(claim.cloned()) {
            match self.recorder.publish(&event, &target).await {
                Ok(()) => published += 1,
                Err(e) => warn!(
                    reason = %event.reason,
                    kind = target.kind.as_deref().unwrap_or_default(),
                    name = target.name.as_deref().unwrap_or_default(),
                    "publishing an Event: {e}"
                ),
            }
        }
        published
    }
}

impl Publisher {
    /// A Warning Event on `object` (for the LivecloneVolume and
    /// LivecloneSnapshot reconcilers, whose objects are cluster-scoped: the
    /// recorder files their Events in the `default` namespace, where
    /// `kubectl describe` looks for them). Returns whether it was
    /// published; a failure is logged, not retried, since the status says
    /// the same.
    pub async fn warn<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        reason: &str,
        action: &str,
        note: &str,
    ) -> bool {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(truncate(note, NOTE_MAX)),
            action: action.to_owned(),
            secondary: None,
        };
        match self.recorder.publish(&event, &reference(object)).await {
            Ok(()) => true,
            Err(e) => {
                warn!(%reason, "publishing an Event: {e}");
                false
            }
        }
    }
}

/// A reference without `resourceVersion` or `fieldPath`: the recorder
/// folds repeats of one Event into a series by reference, and the version
/// changes with every status write.
fn reference<K: Resource<DynamicType = ()>>(object: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: object.meta().name.clone(),
        namespace: object.meta().namespace.clone(),
        uid: object.meta().uid.clone(),
        ..ObjectReference::default()
    }
}

/// At most `max` bytes, cut on a character boundary, with an ellipsis
/// when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    const ELLIPSIS: &str = "…";
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_fit_the_events_api() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(600);
        let cut = truncate(&long, NOTE_MAX);
        assert!(cut.len() <= NOTE_MAX, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn references_leave_out_the_resource_version() {
        let mut claim = PersistentVolumeClaim::default();
        claim.metadata.name = Some("data".to_owned());
        claim.metadata.namespace = Some("apps".to_owned());
        claim.metadata.uid = Some("1234".to_owned());
        claim.metadata.resource_version = Some("99".to_owned());
        let r = reference(&claim);
        assert_eq!(r.kind.as_deref(), Some("PersistentVolumeClaim"));
        assert_eq!(r.api_version.as_deref(), Some("v1"));
        assert_eq!(r.uid.as_deref(), Some("1234"));
        assert_eq!(r.resource_version, None);
    }
}
