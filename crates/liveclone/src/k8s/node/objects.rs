//! What the LivecloneVolume and LivecloneSnapshot reconcilers ask of the
//! engine and write back: the engine request for a spec, the status for an
//! engine outcome, when a failure is final, the finalizer patch, retry
//! delays. Free of I/O and of the clock (callers pass the time), so every
//! rule is unit-tested.
//!
//! The status contract the controller agent reads (and waits on):
//! * `Ready=True`: the object exists on its node as the spec of
//!   `observedGeneration` says (volumes also show phase `Ready` and the
//!   size they have).
//! * `Ready=False` with a reason that is an [`ErrorCode`] name: the node
//!   cannot do it; final for that generation (volumes: phase `Failed`). The
//!   message is the engine's.
//! * `Ready=False` with reason [`reason::CREATING`] or [`reason::DELETING`]:
//!   still working (a transient engine error is retried, its message
//!   shown); volumes show phase `Creating` or `Deleting`.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{json, Value};

use crate::domain::engine::{CapacityRange, CreateVolume};
use crate::domain::error::{DomainError, ErrorCode};
use crate::domain::human::format_bytes;
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::{
    AccessKind, ContentSource, SnapshotRecord, SnapshotState, VolumeRecord, VolumeState,
};
use crate::k8s::hydration::set_condition;
use crate::k8s::{
    time_from_unix_seconds, LivecloneSnapshotStatus, LivecloneVolumeSpec, LivecloneVolumeStatus,
    VolumePhase, CONDITION_FALSE, CONDITION_TRUE, READY_CONDITION, STORAGE_FINALIZER,
};

/// Condition type on LivecloneVolume status: True while the volume's
/// hydration is stalled or has failed (what CSI calls an abnormal volume
/// condition), with the engine's explanation.
pub const ABNORMAL_CONDITION: &str = "Abnormal";

/// Condition reasons other than error codes.
pub mod reason {
    /// Ready=True on a volume.
    pub const VOLUME_READY: &str = "VolumeReady";
    /// Ready=True on a snapshot.
    pub const SNAPSHOT_READY: &str = "SnapshotReady";
    /// Ready=False while the node is still making the object.
    pub const CREATING: &str = "Creating";
    /// Ready=False while the node removes the object's storage.
    pub const DELETING: &str = "Deleting";
    /// Abnormal=False.
    pub const AS_EXPECTED: &str = "AsExpected";
}

/// Why a volume is abnormal, for the Abnormal condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Abnormal {
    pub reason: &'static str,
    pub message: String,
}

/// The volume ID of a LivecloneVolume: its name, which must be the ID the
/// engine derives from `spec.name` (else the node would make, or delete,
/// another volume than the one the object names).
pub(super) fn volume_identity(object_name: &str, spec_name: &str) -> Result<VolumeId, DomainError> {
    let id = VolumeId::for_name(spec_name)
        .map_err(|e| DomainError::invalid_argument(format!("spec.name {spec_name:?}: {e}")))?;
    if id.as_str() != object_name {
        return Err(DomainError::invalid_argument(format!(
            "the object is named {object_name} but the volume ID of spec.name {spec_name:?} \
             is {id}"
        )));
    }
    Ok(id)
}

/// The snapshot ID of a LivecloneSnapshot, as [`volume_identity`].
pub(super) fn snapshot_identity(
    object_name: &str,
    spec_name: &str,
) -> Result<SnapshotId, DomainError> {
    let id = SnapshotId::for_name(spec_name)
        .map_err(|e| DomainError::invalid_argument(format!("spec.name {spec_name:?}: {e}")))?;
    if id.as_str() != object_name {
        return Err(DomainError::invalid_argument(format!(
            "the object is named {object_name} but the snapshot ID of spec.name {spec_name:?} \
             is {id}"
        )));
    }
    Ok(id)
}

/// The CreateVolume for a spec. With the volume already made, the size
/// asked is at most the one it has: the engine refuses a repeat whose
/// range excludes the existing size (another volume under a taken name),
/// and a larger spec is an expansion, done after.
pub(super) fn create_request(
    spec: &LivecloneVolumeSpec,
    existing: Option<&VolumeRecord>,
) -> Result<CreateVolume, DomainError> {
    let access = AccessKind::try_from(spec.access)
        .map_err(|e| DomainError::invalid_argument(format!("spec.access: {e}")))?;
    let source = spec
        .content_source
        .as_ref()
        .map(ContentSource::try_from)
        .transpose()
        .map_err(|e| DomainError::invalid_argument(format!("spec.contentSource: {e}")))?;
    let required_bytes = match existing {
        Some(record) => spec.capacity_bytes.min(record.capacity_bytes),
        None => spec.capacity_bytes,
    };
    Ok(CreateVolume {
        name: spec.name.clone(),
        capacity: CapacityRange {
            required_bytes,
            limit_bytes: 0,
        },
        access,
        source,
        parameters: spec.parameters.clone(),
    })
}

/// The generation the Ready condition reports on.
fn ready_generation(conditions: &[Condition]) -> Option<i64> {
    conditions
        .iter()
        .find(|c| c.type_ == READY_CONDITION)
        .and_then(|c| c.observed_generation)
}

/// Whether `conditions` say the node gave up on `generation` for good: its
/// Ready condition is False with a non-transient error code for reason.
/// Such an object is not retried until its spec changes (a new
/// generation), whichever agent wrote the failure.
pub(super) fn failed_at(conditions: &[Condition], generation: Option<i64>) -> bool {
    conditions.iter().any(|c| {
        c.type_ == READY_CONDITION
            && c.status == CONDITION_FALSE
            && c.observed_generation == generation
            && c.reason
                .parse::<ErrorCode>()
                .is_ok_and(|code| !code.is_transient())
    })
}

/// Whether a volume needs no engine call: its status already reports the
/// current spec as Ready and the engine's record agrees.
pub(super) fn volume_settled(
    status: Option<&LivecloneVolumeStatus>,
    generation: Option<i64>,
    record: Option<&VolumeRecord>,
    spec_capacity: u64,
) -> bool {
    let reported = status.is_some_and(|s| {
        s.phase == Some(VolumePhase::Ready) && s.observed_generation == generation
    });
    let made =
        record.is_some_and(|r| r.state == VolumeState::Ready && r.capacity_bytes >= spec_capacity);
    reported && made
}

/// Whether a snapshot needs no engine call, as [`volume_settled`].
pub(super) fn snapshot_settled(
    status: Option<&LivecloneSnapshotStatus>,
    generation: Option<i64>,
    record: Option<&SnapshotRecord>,
) -> bool {
    let reported = status.is_some_and(|s| {
        s.ready_to_use == Some(true) && ready_generation(&s.conditions) == generation
    });
    reported && record.is_some_and(snapshot_usable)
}

fn snapshot_usable(record: &SnapshotRecord) -> bool {
    record.state == SnapshotState::Ready && !record.deleted && !record.hidden
}

/// Ready=False for `error`: its code as the reason when final, else
/// "still creating" with its message.
fn not_ready(
    error: &DomainError,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> (Condition, String) {
    if error.code.is_transient() {
        let message = format!("{} (retrying)", error.message);
        let condition = set_condition(
            previous,
            READY_CONDITION,
            CONDITION_FALSE,
            reason::CREATING,
            message.clone(),
            generation,
            now,
        );
        (condition, message)
    } else {
        let condition = set_condition(
            previous,
            READY_CONDITION,
            CONDITION_FALSE,
            error.code.as_str(),
            error.message.clone(),
            generation,
            now,
        );
        (condition, error.message.clone())
    }
}

fn abnormal_condition(
    abnormal: Option<&Abnormal>,
    previous: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    match abnormal {
        Some(abnormal) => set_condition(
            previous,
            ABNORMAL_CONDITION,
            CONDITION_TRUE,
            abnormal.reason,
            abnormal.message.clone(),
            generation,
            now,
        ),
        None => set_condition(
            previous,
            ABNORMAL_CONDITION,
            CONDITION_FALSE,
            reason::AS_EXPECTED,
            String::new(),
            generation,
            now,
        ),
    }
}

/// The status of a volume that is not being deleted: `record` is the
/// engine's after this round's calls, `error` what they failed with.
pub(super) fn volume_status(
    record: Option<&VolumeRecord>,
    error: Option<&DomainError>,
    generation: Option<i64>,
    abnormal: Option<&Abnormal>,
    previous: Option<&LivecloneVolumeStatus>,
    now: &Time,
) -> LivecloneVolumeStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let (phase, ready, message) = match (error, record) {
        (Some(error), _) => {
            let (ready, message) = not_ready(error, previous_conditions, generation, now);
            let phase = if error.code.is_transient() {
                VolumePhase::Creating
            } else {
                VolumePhase::Failed
            };
            (phase, ready, message)
        }
        (None, Some(record)) if record.state == VolumeState::Ready => {
            let message = format!(
                "The volume exists on its node ({}).",
                format_bytes(record.capacity_bytes)
            );
            let ready = set_condition(
                previous_conditions,
                READY_CONDITION,
                CONDITION_TRUE,
                reason::VOLUME_READY,
                message.clone(),
                generation,
                now,
            );
            (VolumePhase::Ready, ready, message)
        }
        // A create that returned without error but not Ready (or nothing):
        // the next round carries on.
        (None, _) => {
            let message = "The node is making the volume.".to_owned();
            let ready = set_condition(
                previous_conditions,
                READY_CONDITION,
                CONDITION_FALSE,
                reason::CREATING,
                message.clone(),
                generation,
                now,
            );
            (VolumePhase::Creating, ready, message)
        }
    };
    LivecloneVolumeStatus {
        phase: Some(phase),
        capacity_bytes: record.map(|r| r.capacity_bytes),
        message: Some(message),
        observed_generation: generation,
        conditions: vec![
            ready,
            abnormal_condition(abnormal, previous_conditions, generation, now),
        ],
    }
}

/// The status of a volume whose object is being deleted, while the node
/// removes its storage; `error` is the last attempt's failure.
pub(super) fn deleting_volume_status(
    previous: Option<&LivecloneVolumeStatus>,
    generation: Option<i64>,
    error: Option<&DomainError>,
    now: &Time,
) -> LivecloneVolumeStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let message = match error {
        None => "The node is deleting the volume's storage.".to_owned(),
        Some(error) => format!("Deleting the volume's storage failed (retrying): {error}"),
    };
    let mut conditions = vec![set_condition(
        previous_conditions,
        READY_CONDITION,
        CONDITION_FALSE,
        reason::DELETING,
        message.clone(),
        generation,
        now,
    )];
    // Health stays as last reported: the engine is not asked any more.
    conditions.extend(
        previous_conditions
            .iter()
            .find(|c| c.type_ == ABNORMAL_CONDITION)
            .cloned(),
    );
    LivecloneVolumeStatus {
        phase: Some(VolumePhase::Deleting),
        capacity_bytes: previous.and_then(|s| s.capacity_bytes),
        message: Some(message),
        observed_generation: generation,
        conditions,
    }
}

/// The status of a snapshot that is not being deleted, as
/// [`volume_status`].
pub(super) fn snapshot_status(
    record: Option<&SnapshotRecord>,
    error: Option<&DomainError>,
    generation: Option<i64>,
    previous: Option<&LivecloneSnapshotStatus>,
    now: &Time,
) -> LivecloneSnapshotStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let (ready_to_use, ready, message) = match (error, record) {
        (Some(error), _) => {
            let (ready, message) = not_ready(error, previous_conditions, generation, now);
            (false, ready, message)
        }
        (None, Some(record)) if snapshot_usable(record) => {
            let message = format!(
                "Snapshot of volume {} ({}).",
                record.source_volume,
                format_bytes(record.size_bytes)
            );
            let ready = set_condition(
                previous_conditions,
                READY_CONDITION,
                CONDITION_TRUE,
                reason::SNAPSHOT_READY,
                message.clone(),
                generation,
                now,
            );
            (true, ready, message)
        }
        (None, _) => {
            let message = "The node is cutting the snapshot.".to_owned();
            let ready = set_condition(
                previous_conditions,
                READY_CONDITION,
                CONDITION_FALSE,
                reason::CREATING,
                message.clone(),
                generation,
                now,
            );
            (false, ready, message)
        }
    };
    LivecloneSnapshotStatus {
        ready_to_use: Some(ready_to_use),
        size_bytes: record.map(|r| r.size_bytes),
        creation_time: record.and_then(|r| time_from_unix_seconds(r.created_at)),
        message: Some(message),
        conditions: vec![ready],
    }
}

/// The status of a snapshot whose object is being deleted.
pub(super) fn deleting_snapshot_status(
    previous: Option<&LivecloneSnapshotStatus>,
    generation: Option<i64>,
    error: Option<&DomainError>,
    now: &Time,
) -> LivecloneSnapshotStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let message = match error {
        None => "The node is deleting the snapshot.".to_owned(),
        Some(error) => format!("Deleting the snapshot failed (retrying): {error}"),
    };
    LivecloneSnapshotStatus {
        ready_to_use: Some(false),
        size_bytes: previous.and_then(|s| s.size_bytes),
        creation_time: previous.and_then(|s| s.creation_time.clone()),
        message: Some(message.clone()),
        conditions: vec![set_condition(
            previous_conditions,
            READY_CONDITION,
            CONDITION_FALSE,
            reason::DELETING,
            message,
            generation,
            now,
        )],
    }
}

/// The JSON patch that removes [`STORAGE_FINALIZER`] from an object whose
/// finalizers are `finalizers`, or `None` when it is not there. Its `test`
/// makes the API server refuse it if the list changed since it was read,
/// so a finalizer someone added or removed meanwhile is never overwritten
/// (the next round reads the new list).
pub(super) fn finalizer_removal(finalizers: &[String]) -> Option<Value> {
    if !finalizers.iter().any(|f| f == STORAGE_FINALIZER) {
        return None;
    }
    let remaining: Vec<&String> = finalizers
        .iter()
        .filter(|f| *f != STORAGE_FINALIZER)
        .collect();
    Some(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": remaining},
    ]))
}

/// How long to wait before retry number `attempt` (0 for the first):
/// doubling from `min`, at most `max`.
pub(super) fn retry_delay(attempt: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    min.checked_mul(factor)
        .unwrap_or(max)
        .min(max)
        .max(min.min(max))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::model::{CutMethod, HydrationRecord, HydrationStage};
    use crate::k8s::{AccessMode, VolumeAccess, VolumeContentSource};
    use crate::os::fs::FsType;

    const MIB: u64 = 1 << 20;

    fn t(seconds: u64) -> Time {
        time_from_unix_seconds(seconds).expect("in range")
    }

    fn spec(name: &str, capacity: u64) -> LivecloneVolumeSpec {
        LivecloneVolumeSpec {
            name: name.to_owned(),
            node: "node-a".to_owned(),
            capacity_bytes: capacity,
            access: VolumeAccess {
                mode: AccessMode::Block,
                fs_type: None,
            },
            content_source: None,
            parameters: BTreeMap::new(),
            claim: None,
            pool: "file".to_owned(),
        }
    }

    fn record(name: &str, capacity: u64, state: VolumeState) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId::for_name(name).expect("valid"),
            name: name.to_owned(),
            capacity_bytes: capacity,
            access: AccessKind::Block,
            content_source: None,
            parameters: BTreeMap::new(),
            state,
            generation: 0,
            needs_fs_grow: false,
            hydration: None,
            last_hydration: None,
            device_class: None,
            created_at: 1_700_000_000,
            published: Default::default(),
        }
    }

    fn snapshot(state: SnapshotState) -> SnapshotRecord {
        SnapshotRecord {
            id: SnapshotId::for_name("snap").expect("valid"),
            name: "snap".to_owned(),
            source_volume: VolumeId::for_name("vol").expect("valid"),
            size_bytes: 4 * MIB,
            access: AccessKind::Block,
            state,
            method: Some(CutMethod::Reflink),
            hidden: false,
            deleted: false,
            source_generation: 0,
            device_class: None,
            created_at: 1_700_000_000,
        }
    }

    fn ready_of(conditions: &[Condition]) -> &Condition {
        conditions
            .iter()
            .find(|c| c.type_ == READY_CONDITION)
            .expect("a Ready condition")
    }

    #[test]
    fn identities_must_match_the_name_derived_from_the_spec() {
        let id = VolumeId::for_name("pvc-1").expect("valid");
        assert_eq!(volume_identity(id.as_str(), "pvc-1"), Ok(id.clone()));
        let other = volume_identity(id.as_str(), "pvc-2").expect_err("another volume's name");
        assert_eq!(other.code, ErrorCode::InvalidArgument);
        assert!(other.message.contains(id.as_str()), "{}", other.message);
        let snap = SnapshotId::for_name("snap-1").expect("valid");
        assert_eq!(snapshot_identity(snap.as_str(), "snap-1"), Ok(snap));
        assert_eq!(
            snapshot_identity(id.as_str(), "snap-1").map_err(|e| e.code),
            Err(ErrorCode::InvalidArgument)
        );
    }

    #[test]
    fn create_requests_follow_the_spec_and_never_ask_less_than_the_made_size() {
        let mut spec = spec("pvc-1", 10 * MIB);
        spec.access = VolumeAccess {
            mode: AccessMode::Filesystem,
            fs_type: Some(FsType::Xfs),
        };
        let source = VolumeId::for_name("pvc-0").expect("valid");
        spec.content_source = Some(VolumeContentSource::from(&ContentSource::Volume(
            source.clone(),
        )));
        spec.parameters
            .insert("liveclone.io/regionSize".to_owned(), "64KiB".to_owned());
        let request = create_request(&spec, None).expect("valid");
        assert_eq!(request.name, "pvc-1");
        assert_eq!(request.capacity.required_bytes, 10 * MIB);
        assert_eq!(request.capacity.limit_bytes, 0);
        assert_eq!(request.access, AccessKind::Filesystem { fs: FsType::Xfs });
        assert_eq!(request.source, Some(ContentSource::Volume(source)));
        assert_eq!(request.parameters, spec.parameters);
        // Made at 8 MiB, now asked 10: the repeat asks 8, expansion does the rest.
        let made = record("pvc-1", 8 * MIB, VolumeState::Ready);
        let request = create_request(&spec, Some(&made)).expect("valid");
        assert_eq!(request.capacity.required_bytes, 8 * MIB);
        // Made larger than asked (alignment): the spec's size stands.
        let made = record("pvc-1", 12 * MIB, VolumeState::Ready);
        let request = create_request(&spec, Some(&made)).expect("valid");
        assert_eq!(request.capacity.required_bytes, 10 * MIB);

        let mut bad = spec.clone();
        bad.access.fs_type = None;
        let error = create_request(&bad, None).expect_err("Filesystem without fsType");
        assert_eq!(error.code, ErrorCode::InvalidArgument);
        let mut bad = spec;
        bad.content_source = Some(VolumeContentSource {
            kind: crate::k8s::volume::ContentSourceKind::Snapshot,
            id: "../etc".to_owned(),
        });
        let error = create_request(&bad, None).expect_err("a bad source ID");
        assert!(error.message.starts_with("spec.contentSource"), "{error}");
    }

    #[test]
    fn a_made_volume_is_ready_with_its_size_and_generation() {
        let made = record("pvc-1", 8 * MIB, VolumeState::Ready);
        let status = volume_status(Some(&made), None, Some(3), None, None, &t(10));
        assert_eq!(status.phase, Some(VolumePhase::Ready));
        assert_eq!(status.capacity_bytes, Some(8 * MIB));
        assert_eq!(status.observed_generation, Some(3));
        let ready = ready_of(&status.conditions);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            (CONDITION_TRUE, reason::VOLUME_READY)
        );
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(ready.last_transition_time, t(10));
        let abnormal = status
            .conditions
            .iter()
            .find(|c| c.type_ == ABNORMAL_CONDITION)
            .expect("an Abnormal condition");
        assert_eq!(abnormal.status, CONDITION_FALSE);
        // The same again later: identical (nothing to write), times kept.
        let again = volume_status(Some(&made), None, Some(3), None, Some(&status), &t(99));
        assert_eq!(again, status);
        assert!(volume_settled(Some(&status), Some(3), Some(&made), 8 * MIB));
        assert!(!volume_settled(
            Some(&status),
            Some(4),
            Some(&made),
            8 * MIB
        ));
        assert!(!volume_settled(
            Some(&status),
            Some(3),
            Some(&made),
            9 * MIB
        ));
        assert!(!volume_settled(Some(&status), Some(3), None, 8 * MIB));
        let creating = record("pvc-1", 8 * MIB, VolumeState::Creating);
        assert!(!volume_settled(
            Some(&status),
            Some(3),
            Some(&creating),
            MIB
        ));
        assert!(!volume_settled(None, Some(3), Some(&made), MIB));
    }

    #[test]
    fn final_errors_fail_with_their_code_and_transient_ones_keep_creating() {
        let error = DomainError::out_of_range("the source holds 16 MiB");
        let failed = volume_status(None, Some(&error), Some(1), None, None, &t(10));
        assert_eq!(failed.phase, Some(VolumePhase::Failed));
        assert_eq!(failed.message.as_deref(), Some("the source holds 16 MiB"));
        let ready = ready_of(&failed.conditions);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            (CONDITION_FALSE, "OutOfRange")
        );
        assert_eq!(ready.message, "the source holds 16 MiB");
        assert!(failed_at(&failed.conditions, Some(1)));
        assert!(
            !failed_at(&failed.conditions, Some(2)),
            "a new spec is tried"
        );

        let busy = DomainError::unavailable("source volume x is not ready");
        let pending = volume_status(None, Some(&busy), Some(1), None, None, &t(10));
        assert_eq!(pending.phase, Some(VolumePhase::Creating));
        assert!(pending
            .message
            .as_deref()
            .is_some_and(|m| m.contains("not ready") && m.contains("retrying")));
        let ready = ready_of(&pending.conditions);
        assert_eq!(ready.reason, reason::CREATING);
        assert!(!failed_at(&pending.conditions, Some(1)));
        // A failed expansion keeps showing the size the volume has.
        let made = record("pvc-1", 8 * MIB, VolumeState::Ready);
        let status = volume_status(Some(&made), Some(&error), Some(2), None, None, &t(10));
        assert_eq!(status.capacity_bytes, Some(8 * MIB));
        assert_eq!(status.phase, Some(VolumePhase::Failed));
        // Every code's reason parses back, as the controller does.
        for code in ErrorCode::ALL {
            let error = DomainError {
                code,
                message: "m".to_owned(),
            };
            let status = volume_status(None, Some(&error), Some(1), None, None, &t(1));
            let reason = &ready_of(&status.conditions).reason;
            if code.is_transient() {
                assert_eq!(reason, reason::CREATING);
            } else {
                assert_eq!(reason.parse::<ErrorCode>(), Ok(code));
            }
        }
    }

    #[test]
    fn abnormal_hydrations_show_and_clear() {
        let mut made = record("pvc-1", 8 * MIB, VolumeState::Ready);
        made.hydration = Some(HydrationRecord {
            source: SnapshotId::for_name("s").expect("valid"),
            source_bytes: 8 * MIB,
            region_sectors: 128,
            metadata_bytes: MIB,
            threshold: 1,
            batch_size: 1,
            paused: false,
            stage: HydrationStage::Enabled,
            started_at: 0,
        });
        let stalled = Abnormal {
            reason: "HydrationStalled",
            message: "no progress for 2 minutes".to_owned(),
        };
        let healthy = volume_status(Some(&made), None, Some(1), None, None, &t(10));
        let sick = volume_status(
            Some(&made),
            None,
            Some(1),
            Some(&stalled),
            Some(&healthy),
            &t(20),
        );
        assert_ne!(sick, healthy, "a change to write");
        let abnormal = sick
            .conditions
            .iter()
            .find(|c| c.type_ == ABNORMAL_CONDITION)
            .expect("Abnormal");
        assert_eq!(
            (
                abnormal.status.as_str(),
                abnormal.reason.as_str(),
                abnormal.message.as_str()
            ),
            (
                CONDITION_TRUE,
                "HydrationStalled",
                "no progress for 2 minutes"
            )
        );
        assert_eq!(abnormal.last_transition_time, t(20));
        assert_eq!(
            ready_of(&sick.conditions).last_transition_time,
            t(10),
            "Ready did not change"
        );
        let healed = volume_status(Some(&made), None, Some(1), None, Some(&sick), &t(30));
        let abnormal = healed
            .conditions
            .iter()
            .find(|c| c.type_ == ABNORMAL_CONDITION)
            .expect("Abnormal");
        assert_eq!(abnormal.status, CONDITION_FALSE);
        assert_eq!(abnormal.last_transition_time, t(30));
    }

    #[test]
    fn deletion_statuses_say_deleting_and_keep_what_is_known() {
        let made = record("pvc-1", 8 * MIB, VolumeState::Ready);
        let ready = volume_status(Some(&made), None, Some(1), None, None, &t(10));
        let deleting = deleting_volume_status(Some(&ready), Some(2), None, &t(20));
        assert_eq!(deleting.phase, Some(VolumePhase::Deleting));
        assert_eq!(deleting.capacity_bytes, Some(8 * MIB));
        let condition = ready_of(&deleting.conditions);
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            (CONDITION_FALSE, reason::DELETING)
        );
        assert!(
            deleting
                .conditions
                .iter()
                .any(|c| c.type_ == ABNORMAL_CONDITION),
            "health kept"
        );
        let busy = DomainError::failed_precondition("volume x is in use");
        let stuck = deleting_volume_status(Some(&deleting), Some(2), Some(&busy), &t(30));
        assert!(stuck
            .message
            .as_deref()
            .is_some_and(|m| m.contains("in use") && m.contains("retrying")));
        assert!(
            !failed_at(&stuck.conditions, Some(2)),
            "a delete is never final"
        );
        let snap = snapshot(SnapshotState::Ready);
        let status = snapshot_status(Some(&snap), None, Some(1), None, &t(10));
        let gone = deleting_snapshot_status(Some(&status), Some(2), None, &t(20));
        assert_eq!(gone.ready_to_use, Some(false));
        assert_eq!(gone.size_bytes, Some(4 * MIB));
        assert_eq!(ready_of(&gone.conditions).reason, reason::DELETING);
    }

    #[test]
    fn snapshots_are_ready_to_use_once_cut() {
        let cut = snapshot(SnapshotState::Ready);
        let status = snapshot_status(Some(&cut), None, Some(1), None, &t(10));
        assert_eq!(status.ready_to_use, Some(true));
        assert_eq!(status.size_bytes, Some(4 * MIB));
        assert_eq!(status.creation_time, Some(t(1_700_000_000)));
        assert_eq!(ready_of(&status.conditions).reason, reason::SNAPSHOT_READY);
        assert!(snapshot_settled(Some(&status), Some(1), Some(&cut)));
        assert!(!snapshot_settled(Some(&status), Some(2), Some(&cut)));
        let mut deleted = cut.clone();
        deleted.deleted = true;
        assert!(!snapshot_settled(Some(&status), Some(1), Some(&deleted)));

        let cutting = snapshot(SnapshotState::Creating);
        let status = snapshot_status(Some(&cutting), None, Some(1), None, &t(10));
        assert_eq!(status.ready_to_use, Some(false));
        assert_eq!(ready_of(&status.conditions).reason, reason::CREATING);
        assert!(!snapshot_settled(Some(&status), Some(1), Some(&cutting)));

        let missing = DomainError::not_found("source volume x does not exist");
        let failed = snapshot_status(None, Some(&missing), Some(1), None, &t(10));
        assert_eq!(failed.ready_to_use, Some(false));
        assert_eq!(ready_of(&failed.conditions).reason, "NotFound");
        assert!(failed_at(&failed.conditions, Some(1)));
    }

    #[test]
    fn the_finalizer_patch_tests_the_list_it_read() {
        let finalizers = vec![
            "example.com/other".to_owned(),
            STORAGE_FINALIZER.to_owned(),
            "example.com/last".to_owned(),
        ];
        let patch = finalizer_removal(&finalizers).expect("ours is there");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                {"op": "replace", "path": "/metadata/finalizers",
                 "value": ["example.com/other", "example.com/last"]},
            ])
        );
        // The form kube sends as a JSON patch.
        let parsed: Result<kube::api::Patch<()>, _> =
            serde_json::from_value(patch).map(kube::api::Patch::Json);
        assert!(parsed.is_ok(), "{parsed:?}");
        assert_eq!(
            finalizer_removal(&[STORAGE_FINALIZER.to_owned()]),
            Some(json!([
                {"op": "test", "path": "/metadata/finalizers", "value": [STORAGE_FINALIZER]},
                {"op": "replace", "path": "/metadata/finalizers", "value": []},
            ]))
        );
        assert_eq!(finalizer_removal(&["example.com/other".to_owned()]), None);
        assert_eq!(finalizer_removal(&[]), None);
    }

    #[test]
    fn retries_double_up_to_the_cap() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let delays: Vec<_> = (0..9).map(|n| retry_delay(n, min, max)).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
                .map(Duration::from_millis)
        );
        assert_eq!(retry_delay(u32::MAX, min, max), max);
        assert_eq!(retry_delay(0, max, min), min, "a cap below the floor wins");
    }
}
