//! `VolumeHydration`: one per clone, in the namespace of the clone's
//! PersistentVolumeClaim. Its spec says what is copied where and how fast
//! (users edit `paused` and `tunables`); its status is the node agent's
//! report of the copy, shown by `kubectl get vh`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{schema, CONDITION_FALSE, CONDITION_TRUE};
use crate::domain::human::{format_duration, format_rate};
use crate::domain::hydration::{HydrationPhase, Progress};
use crate::domain::sizing::MAX_TUNABLE_REGIONS;

/// What a clone copies, to where, and how: written by the controller agent
/// when it makes the clone; `paused` and `tunables` are the user's to edit.
// Clippy takes the repeated `type_ = "string"` of the printer columns
// inside `#[kube(...)]` for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "liveclone.io",
    version = "v1alpha1",
    kind = "VolumeHydration",
    plural = "volumehydrations",
    shortname = "vh",
    category = "liveclone",
    namespaced,
    status = "VolumeHydrationStatus",
    derive = "PartialEq",
    doc = "The background copy (hydration) of a liveclone clone from its source. One per \
           clone, in the namespace of the clone's PersistentVolumeClaim, made by the \
           controller agent; its status is written by the node agent of the clone's node. \
           Set spec.paused or spec.tunables to pause, resume or tune the copy.",
    printcolumn(
        name = "PVC",
        type_ = "string",
        json_path = ".spec.pvc",
        description = "The clone's PersistentVolumeClaim"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".spec.source.name",
        description = "What the clone copies"
    ),
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.node",
        description = "The node that holds the clone"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Hydrating, Switching, Complete, Stalled or Failed"
    ),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress",
        description = "Share of the clone already on its own storage"
    ),
    printcolumn(
        name = "Rate",
        type_ = "string",
        json_path = ".status.rate",
        description = "Copy rate over the last seconds"
    ),
    printcolumn(
        name = "ETA",
        type_ = "string",
        json_path = ".status.eta",
        description = "Time left at the current rate"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Kind",
        type_ = "string",
        json_path = ".spec.source.kind",
        priority = 1,
        description = "Kind of the source"
    ),
    printcolumn(
        name = "Volume",
        type_ = "string",
        json_path = ".spec.destination.volumeHandle",
        priority = 1,
        description = "CSI volume ID of the clone"
    ),
    printcolumn(
        name = "Paused",
        type_ = "boolean",
        json_path = ".spec.paused",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeHydrationSpec {
    /// Name of the clone's PersistentVolumeClaim, in this namespace.
    #[schemars(length(min = 1, max = schema::NAME_MAX), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "pvc is immutable"}
    ]))]
    pub pvc: String,
    /// What the clone copies.
    pub source: HydrationSource,
    /// The clone itself.
    pub destination: HydrationDestination,
    /// The node whose storage holds the clone (and its source); its node
    /// agent does the copy and writes the status.
    #[schemars(length(min = 1, max = schema::NAME_MAX), extend("x-kubernetes-validations" = [
        {"rule": "self == oldSelf", "message": "node is immutable"}
    ]))]
    pub node: String,
    /// Overrides of the copy's settings; unset ones keep the StorageClass's
    /// values or the driver's defaults. Changes apply within seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunables: Option<HydrationTunablesSpec>,
    /// Stops the background copy while true. The clone stays fully usable:
    /// reads of regions not yet copied go to the source.
    #[serde(default)]
    pub paused: bool,
}

/// The kinds of object a clone can be made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SourceKind {
    /// A PersistentVolumeClaim (`dataSource` kind PersistentVolumeClaim).
    PersistentVolumeClaim,
    /// A VolumeSnapshot (`dataSource` kind VolumeSnapshot).
    VolumeSnapshot,
    /// A volume known only by its CSI volume ID (no claim).
    Volume,
}

/// The source of a clone: the object the user named, and its CSI ID.
/// Immutable: a clone's source is fixed when it is made.
// The rules are on the type rather than on the `source` field because a
// field's `x-kubernetes-validations` would replace the type's, not add to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.kind == 'VolumeSnapshot' ? (has(self.snapshotHandle) && !has(self.volumeHandle)) : (has(self.volumeHandle) && !has(self.snapshotHandle))",
        "message": "a VolumeSnapshot source has a snapshotHandle and no volumeHandle; other sources have a volumeHandle and no snapshotHandle"
    },
    {"rule": "self == oldSelf", "message": "source is immutable"}
]))]
pub struct HydrationSource {
    pub kind: SourceKind,
    /// The object's name (for kind Volume, its PersistentVolume's name or
    /// its volume ID).
    #[schemars(length(min = 1, max = schema::NAME_MAX))]
    pub name: String,
    /// The object's namespace, when it is namespaced and not the
    /// VolumeHydration's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = schema::NAMESPACE_MAX))]
    pub namespace: Option<String>,
    /// CSI volume ID of the source (kinds PersistentVolumeClaim and Volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = schema::CSI_ID_MAX))]
    pub volume_handle: Option<String>,
    /// CSI snapshot ID of the source (kind VolumeSnapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = schema::CSI_ID_MAX))]
    pub snapshot_handle: Option<String>,
}

/// The clone: its CSI volume and its PersistentVolume. Immutable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "destination is immutable"}
]))]
pub struct HydrationDestination {
    /// CSI volume ID of the clone (the LivecloneVolume's name).
    #[schemars(length(min = 1, max = schema::CSI_ID_MAX))]
    pub volume_handle: String,
    /// Name of the clone's PersistentVolume.
    #[schemars(length(min = 1, max = schema::NAME_MAX))]
    pub persistent_volume_name: String,
}

/// How hard the copy works. Region counts are in the clone's regions (the
/// region size is chosen when the clone is made).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.hydrationThreshold) || !has(self.hydrationBatchSize) || self.hydrationBatchSize <= self.hydrationThreshold",
    "message": "hydrationBatchSize may not exceed hydrationThreshold (a batch larger than what may be in flight never fills)"
}]))]
pub struct HydrationTunablesSpec {
    /// Regions being copied at once at most (dm-clone's
    /// hydration_threshold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TUNABLE_REGIONS))]
    pub hydration_threshold: Option<u32>,
    /// Regions copied together in one batch at most (dm-clone's
    /// hydration_batch_size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TUNABLE_REGIONS))]
    pub hydration_batch_size: Option<u32>,
    /// Average copy rate at most, in bytes per second; unset for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub rate_limit_bytes_per_second: Option<u64>,
}

/// The node agent's report of the copy. Every field is optional so that a
/// server-side apply sends only what the agent knows; a field it stops
/// sending is removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeHydrationStatus {
    /// Pending, Hydrating, Switching, Complete, Stalled or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::hydration_phase")]
    pub phase: Option<HydrationPhase>,
    /// Bytes already on the clone's own storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydrated_bytes: Option<u64>,
    /// Bytes to copy in all (the source's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// hydratedBytes as a share of totalBytes, 0 to 100; exactly 100 only
    /// when everything is copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: Option<f64>,
    /// percent for people, e.g. "42.0%" (rounded down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Copy rate averaged over the last seconds; 0 while paused or not yet
    /// measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// bytesPerSecond for people, e.g. "120.0 MiB/s", or "paused".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    /// Seconds left at the current rate; unset when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// etaSeconds for people, e.g. "3m12s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    /// When the copy started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the clone became independent of its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// The metadata.generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One sentence for people on where the copy stands or what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Ready (the clone no longer reads its source), Progressing (data is
    /// being copied or the device switched), Degraded (the copy needs
    /// attention).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
}

/// The condition types of a VolumeHydration.
pub mod condition {
    /// True once the clone is an independent full copy (hydration complete,
    /// device switched to linear, source no longer read).
    pub const READY: &str = "Ready";
    /// True while data is being copied or the device is being switched.
    pub const PROGRESSING: &str = "Progressing";
    /// True when the copy needs attention: stalled or failed.
    pub const DEGRADED: &str = "Degraded";
}

impl VolumeHydrationStatus {
    /// The status for a tracker's progress: every measured field, and the
    /// three conditions for the phase. Transition times are kept from
    /// `previous` for conditions whose status did not change (Kubernetes'
    /// convention: `lastTransitionTime` is when the status last changed);
    /// new or changed ones get `now`. Start and completion times are the
    /// caller's to set, from its records.
    pub fn from_progress(
        progress: &Progress,
        observed_generation: Option<i64>,
        previous: &[Condition],
        now: &Time,
    ) -> Self {
        // Float-to-integer `as` saturates; the tracker promises a rate that
        // is finite and never negative.
        let bytes_per_second = progress.bytes_per_second.round() as u64;
        let rate = if progress.paused {
            Some("paused".to_owned())
        } else if bytes_per_second > 0 {
            Some(format_rate(bytes_per_second))
        } else {
            None
        };
        let eta_seconds = progress.eta.map(|eta| eta.as_secs());
        VolumeHydrationStatus {
            phase: Some(progress.phase),
            hydrated_bytes: Some(progress.hydrated_bytes),
            total_bytes: Some(progress.total_bytes),
            percent: Some(progress.percent),
            progress: Some(format_percent(progress.percent)),
            bytes_per_second: Some(bytes_per_second),
            rate,
            eta_seconds,
            eta: progress.eta.map(format_duration),
            started_at: None,
            completed_at: None,
            observed_generation,
            message: (!progress.message.is_empty()).then(|| progress.message.clone()),
            conditions: hydration_conditions(
                progress.phase,
                progress.paused,
                &progress.message,
                observed_generation,
                previous,
                now,
            ),
        }
    }
}

/// A percentage with one decimal, rounded down so that 99.99 (the most a
/// partial copy shows) never reads as 100.0%.
fn format_percent(percent: f64) -> String {
    format!("{:.1}%", (percent.clamp(0.0, 100.0) * 10.0).floor() / 10.0)
}

/// Ready, Progressing and Degraded for a hydration in `phase`. `message` is
/// the tracker's sentence on where it stands (for a stall or a failure: why,
/// and what to do), used wherever a condition is not simply as expected.
pub fn hydration_conditions(
    phase: HydrationPhase,
    paused: bool,
    message: &str,
    observed_generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Vec<Condition> {
    use HydrationPhase as P;
    let ready = match phase {
        P::Complete => (CONDITION_TRUE, "HydrationComplete"),
        P::Failed => (CONDITION_FALSE, "HydrationFailed"),
        P::Stalled => (CONDITION_FALSE, "HydrationStalled"),
        P::Pending => (CONDITION_FALSE, "HydrationPending"),
        P::Hydrating if paused => (CONDITION_FALSE, "HydrationPaused"),
        P::Hydrating => (CONDITION_FALSE, "Hydrating"),
        P::Switching => (CONDITION_FALSE, "Switching"),
    };
    let progressing = match phase {
        P::Pending => (CONDITION_TRUE, "HydrationPending"),
        P::Hydrating if paused => (CONDITION_FALSE, "HydrationPaused"),
        P::Hydrating => (CONDITION_TRUE, "Hydrating"),
        P::Switching => (CONDITION_TRUE, "Switching"),
        P::Stalled => (CONDITION_FALSE, "HydrationStalled"),
        P::Complete => (CONDITION_FALSE, "HydrationComplete"),
        P::Failed => (CONDITION_FALSE, "HydrationFailed"),
    };
    let degraded = match phase {
        P::Stalled => (CONDITION_TRUE, "HydrationStalled"),
        P::Failed => (CONDITION_TRUE, "HydrationFailed"),
        _ => (CONDITION_FALSE, "AsExpected"),
    };
    let paused_message = format!(
        "{message} Set spec.paused to false to resume (e.g. kubectl patch vh NAME --type=merge \
         -p '{{\"spec\":{{\"paused\":false}}}}')."
    );
    let message_for = |reason: &str| -> String {
        match reason {
            "AsExpected" => "No problem with the copy.".to_owned(),
            "HydrationPaused" => paused_message.clone(),
            _ => message.to_owned(),
        }
    };
    [
        (condition::READY, ready),
        (condition::PROGRESSING, progressing),
        (condition::DEGRADED, degraded),
    ]
    .into_iter()
    .map(|(type_, (status, reason))| {
        set_condition(
            previous,
            type_,
            status,
            reason,
            message_for(reason),
            observed_generation,
            now,
        )
    })
    .collect()
}

/// A condition of `type_`, keeping the previous transition time when its
/// status did not change.
pub(crate) fn set_condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    observed_generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::k8s::time_from_unix_seconds;

    fn progress(phase: HydrationPhase, percent: f64) -> Progress {
        Progress {
            phase,
            hydrated_bytes: 420 << 20,
            total_bytes: 1000 << 20,
            percent,
            bytes_per_second: (120 << 20) as f64,
            eta: Some(Duration::from_secs(192)),
            paused: false,
            last_progress_at: None,
            message: "Hydrating: 420.0 MiB of 1000.0 MiB (42.0%) copied.".to_owned(),
        }
    }

    fn at(seconds: u64) -> Time {
        time_from_unix_seconds(seconds).expect("in range")
    }

    fn find<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    #[test]
    fn status_fields_come_from_the_progress_with_human_strings() {
        let status = VolumeHydrationStatus::from_progress(
            &progress(HydrationPhase::Hydrating, 42.0),
            Some(3),
            &[],
            &at(1000),
        );
        assert_eq!(status.phase, Some(HydrationPhase::Hydrating));
        assert_eq!(status.progress.as_deref(), Some("42.0%"));
        assert_eq!(status.bytes_per_second, Some(120 << 20));
        assert_eq!(status.rate.as_deref(), Some("120.0 MiB/s"));
        assert_eq!(status.eta_seconds, Some(192));
        assert_eq!(status.eta.as_deref(), Some("3m12s"));
        assert_eq!(status.observed_generation, Some(3));
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(json["phase"], "Hydrating");
        assert_eq!(json["hydratedBytes"], 420 << 20);
        assert_eq!(json["etaSeconds"], 192);
        assert!(json.get("startedAt").is_none(), "unset fields are left out");
    }

    #[test]
    fn progress_never_reads_100_percent_early() {
        assert_eq!(format_percent(99.99), "99.9%");
        assert_eq!(format_percent(100.0), "100.0%");
        assert_eq!(format_percent(0.0), "0.0%");
    }

    #[test]
    fn a_paused_hydration_says_so_in_rate_and_conditions() {
        let mut paused = progress(HydrationPhase::Hydrating, 42.0);
        paused.paused = true;
        paused.bytes_per_second = 0.0;
        paused.eta = None;
        let status = VolumeHydrationStatus::from_progress(&paused, Some(2), &[], &at(1000));
        assert_eq!(status.rate.as_deref(), Some("paused"));
        assert_eq!(status.eta, None);
        let progressing = find(&status.conditions, condition::PROGRESSING);
        assert_eq!(progressing.status, "False");
        assert_eq!(progressing.reason, "HydrationPaused");
        assert!(progressing.message.contains("spec.paused"));
    }

    #[test]
    fn conditions_for_each_phase() {
        let cases = [
            (HydrationPhase::Pending, "False", "True", "False"),
            (HydrationPhase::Hydrating, "False", "True", "False"),
            (HydrationPhase::Switching, "False", "True", "False"),
            (HydrationPhase::Complete, "True", "False", "False"),
            (HydrationPhase::Stalled, "False", "False", "True"),
            (HydrationPhase::Failed, "False", "False", "True"),
        ];
        for (phase, ready, progressing, degraded) in cases {
            let conditions = hydration_conditions(phase, false, "why", Some(1), &[], &at(5));
            assert_eq!(conditions.len(), 3);
            assert_eq!(find(&conditions, condition::READY).status, ready, "{phase}");
            assert_eq!(
                find(&conditions, condition::PROGRESSING).status,
                progressing,
                "{phase}"
            );
            let degraded_condition = find(&conditions, condition::DEGRADED);
            assert_eq!(degraded_condition.status, degraded, "{phase}");
            if degraded == "True" {
                // The tracker's explanation is what a human acts on.
                assert_eq!(degraded_condition.message, "why");
            }
            for c in &conditions {
                assert!(!c.reason.is_empty(), "{phase}: {c:?}");
                assert_eq!(c.observed_generation, Some(1));
            }
        }
    }

    #[test]
    fn transition_times_change_only_with_the_status() {
        let first = hydration_conditions(HydrationPhase::Hydrating, false, "m", None, &[], &at(10));
        let later =
            hydration_conditions(HydrationPhase::Stalled, false, "m", None, &first, &at(20));
        // Ready stayed False: its time is kept, though its reason changed.
        assert_eq!(find(&later, condition::READY).last_transition_time, at(10));
        assert_eq!(find(&later, condition::READY).reason, "HydrationStalled");
        // Progressing and Degraded flipped.
        assert_eq!(
            find(&later, condition::PROGRESSING).last_transition_time,
            at(20)
        );
        assert_eq!(
            find(&later, condition::DEGRADED).last_transition_time,
            at(20)
        );
    }
}
