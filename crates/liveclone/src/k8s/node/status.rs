//! From the engine's state to a VolumeHydration status, when to write it,
//! and which phase changes are worth an Event. Free of I/O and of the
//! clock (callers pass the times), so every rule is unit-tested.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::time::Instant;

use crate::domain::human::format_bytes;
use crate::domain::hydration::{HydrationPhase, Progress};
use crate::domain::model::{HydrationStage, VolumeRecord, VolumeState};
use crate::k8s::hydration::{condition, set_condition, VolumeHydrationStatus};
use crate::k8s::{time_from_unix_seconds, CONDITION_TRUE};

/// What the engine says about the volume of one VolumeHydration.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Observed {
    pub progress: Progress,
    /// Unix seconds, from the volume's records.
    pub started_at: Option<u64>,
    pub completed_at: Option<u64>,
    /// False for a `Pending` made up here before the monitor has read the
    /// clone: its byte counts are not known, so they are left out rather
    /// than shown as zero.
    pub counts_known: bool,
}

/// The status to publish for `record` (and the monitor's latest `progress`
/// of it), or `None` when there is nothing to say yet. `published` is the
/// phase the VolumeHydration shows now.
///
/// * A clone still hydrating reports the monitor's progress. Before the
///   monitor's first reading it is `Pending`, but only while that is the
///   truth as far as anyone showed it: the copy has not been enabled yet,
///   or nothing was ever published. After a restart of the agent the
///   object already shows the real phase, and going back to `Pending` for a
///   moment would also repeat the HydrationStarted event; so then nothing
///   is written until the monitor reports.
/// * A clone whose copy has ended reports `Complete` from its record (the
///   progress map is lost when the process restarts; the record is not).
/// * A volume being deleted, or one that never was a clone: nothing.
pub(super) fn observe(
    record: &VolumeRecord,
    progress: Option<Progress>,
    published: Option<HydrationPhase>,
) -> Option<Observed> {
    if record.state == VolumeState::Deleting {
        return None;
    }
    if let Some(hydration) = &record.hydration {
        return match progress {
            // A `Complete` progress with a hydrating record is left over
            // from an earlier copy of the same volume (a redirect cut
            // started a new one): not this copy's state.
            Some(progress) if progress.phase != HydrationPhase::Complete => Some(Observed {
                progress,
                started_at: Some(hydration.started_at),
                completed_at: None,
                counts_known: true,
            }),
            _ if hydration.stage < HydrationStage::Enabled
                || matches!(published, None | Some(HydrationPhase::Pending)) =>
            {
                Some(Observed {
                    progress: Progress {
                        phase: HydrationPhase::Pending,
                        hydrated_bytes: 0,
                        total_bytes: hydration.source_bytes,
                        percent: 0.0,
                        bytes_per_second: 0.0,
                        eta: None,
                        paused: hydration.paused,
                        last_progress_at: None,
                        message: format!(
                            "Waiting for the copy of {} from the source to start.",
                            format_bytes(hydration.source_bytes)
                        ),
                    },
                    // It has not started yet.
                    started_at: None,
                    completed_at: None,
                    counts_known: false,
                })
            }
            _ => None,
        };
    }
    let done = record.last_hydration.as_ref()?;
    let progress = match progress {
        Some(progress) if progress.phase == HydrationPhase::Complete => progress,
        _ => Progress {
            phase: HydrationPhase::Complete,
            hydrated_bytes: done.bytes,
            total_bytes: done.bytes,
            percent: 100.0,
            bytes_per_second: 0.0,
            eta: None,
            paused: false,
            last_progress_at: None,
            message: format!(
                "Hydration complete: all {} are on the destination.",
                format_bytes(done.bytes)
            ),
        },
    };
    Some(Observed {
        progress,
        started_at: Some(done.started_at),
        completed_at: Some(done.completed_at),
        counts_known: true,
    })
}

/// Something about the spec that the node cannot do as asked; shown as
/// the Degraded condition (and in the message) until the spec changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SpecProblem {
    /// CamelCase condition reason.
    pub reason: &'static str,
    /// For people: what is wrong and what the copy does meanwhile.
    pub message: String,
}

/// The full status for an observation: the measured fields, times from
/// the records, and the conditions for the phase, with a spec problem as
/// Degraded. Conditions keep their transition times from `previous`.
pub(super) fn build(
    observed: &Observed,
    observed_generation: Option<i64>,
    spec_problem: Option<&SpecProblem>,
    previous: Option<&VolumeHydrationStatus>,
    now: &Time,
) -> VolumeHydrationStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let mut status = VolumeHydrationStatus::from_progress(
        &observed.progress,
        observed_generation,
        previous_conditions,
        now,
    );
    if !observed.counts_known {
        status.hydrated_bytes = None;
        status.percent = None;
        status.progress = None;
        status.bytes_per_second = None;
        if !observed.progress.paused {
            status.rate = None;
        }
    }
    if observed.progress.phase == HydrationPhase::Complete {
        // Time left means nothing once the copy is done.
        status.eta = None;
        status.eta_seconds = None;
    }
    status.started_at = observed.started_at.and_then(time_from_unix_seconds);
    status.completed_at = observed.completed_at.and_then(time_from_unix_seconds);
    if let Some(problem) = spec_problem {
        if let Some(degraded) = status
            .conditions
            .iter_mut()
            .find(|c| c.type_ == condition::DEGRADED)
        {
            *degraded = if degraded.status == CONDITION_TRUE {
                // A stall or failure explains the copy itself and keeps the
                // reason; the spec problem is added to what it says.
                let mut both = degraded.clone();
                both.message = format!("{} Also: {}", both.message, problem.message);
                both
            } else {
                set_condition(
                    previous_conditions,
                    condition::DEGRADED,
                    CONDITION_TRUE,
                    problem.reason,
                    problem.message.clone(),
                    observed_generation,
                    now,
                )
            };
        }
        status.message = Some(match status.message.take() {
            Some(message) => format!("{message} {}", problem.message),
            None => problem.message.clone(),
        });
    }
    status
}

/// Why a status is written now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteCause {
    /// The phase differs from the one published: written at once.
    PhaseChange,
    /// Anything else changed and the interval since the last write passed.
    Update,
}

/// Whether to write `next` now, given what was last written (or found on
/// the object) and when. At most one write per `interval`, except that a
/// phase change goes out at once; nothing when nothing changed. A change
/// held back by the interval is not lost: the caller computes the status
/// again on its next round and writes it once the interval has passed.
pub(super) fn write_due(
    last: Option<&VolumeHydrationStatus>,
    last_written_at: Option<Instant>,
    next: &VolumeHydrationStatus,
    now: Instant,
    interval: Duration,
) -> Option<WriteCause> {
    if last == Some(next) {
        return None;
    }
    if last.and_then(|s| s.phase) != next.phase {
        return Some(WriteCause::PhaseChange);
    }
    match last_written_at {
        Some(at) if now.saturating_duration_since(at) < interval => None,
        _ => Some(WriteCause::Update),
    }
}

/// The Events a VolumeHydration and its claim get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PhaseEvent {
    Started,
    Stalled,
    Resumed,
    Complete,
    Failed,
}

impl PhaseEvent {
    /// The Event's reason, as `kubectl describe` shows it.
    pub fn reason(self) -> &'static str {
        match self {
            PhaseEvent::Started => "HydrationStarted",
            PhaseEvent::Stalled => "HydrationStalled",
            PhaseEvent::Resumed => "HydrationResumed",
            PhaseEvent::Complete => "HydrationComplete",
            PhaseEvent::Failed => "HydrationFailed",
        }
    }

    /// Stalls and failures need someone to look; the rest is news.
    pub fn is_warning(self) -> bool {
        matches!(self, PhaseEvent::Stalled | PhaseEvent::Failed)
    }
}

/// The Event for a published phase change, if it is one worth telling.
/// Phases the agent did not see in between (it samples) are skipped: a
/// stall that ended before it looked gets neither HydrationStalled nor
/// HydrationResumed, and a copy already done when first seen gets only
/// HydrationComplete.
pub(super) fn phase_event(from: Option<HydrationPhase>, to: HydrationPhase) -> Option<PhaseEvent> {
    use HydrationPhase as P;
    if from == Some(to) {
        return None;
    }
    match (from, to) {
        (None | Some(P::Pending), P::Hydrating) => Some(PhaseEvent::Started),
        (Some(P::Stalled), P::Hydrating) => Some(PhaseEvent::Resumed),
        (_, P::Stalled) => Some(PhaseEvent::Stalled),
        (_, P::Complete) => Some(PhaseEvent::Complete),
        (_, P::Failed) => Some(PhaseEvent::Failed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::ids::{SnapshotId, VolumeId};
    use crate::domain::model::{AccessKind, CompletedHydration, HydrationRecord};
    use crate::k8s::hydration::condition;

    const MIB: u64 = 1 << 20;

    fn record(hydration: Option<HydrationRecord>) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId::for_name("clone").expect("valid name"),
            name: "clone".to_owned(),
            capacity_bytes: 16 * MIB,
            access: AccessKind::Block,
            content_source: None,
            parameters: BTreeMap::new(),
            state: VolumeState::Ready,
            generation: 0,
            hydration,
            last_hydration: None,
            needs_fs_grow: false,
            device_class: None,
            created_at: 1_700_000_000,
            published: Default::default(),
        }
    }

    fn hydrating(stage: HydrationStage) -> HydrationRecord {
        HydrationRecord {
            source: SnapshotId::for_name("source").expect("valid name"),
            source_bytes: 16 * MIB,
            region_sectors: 128,
            metadata_bytes: MIB,
            threshold: 256,
            batch_size: 64,
            paused: false,
            stage,
            started_at: 1_700_000_100,
        }
    }

    fn progress(phase: HydrationPhase, hydrated: u64) -> Progress {
        Progress {
            phase,
            hydrated_bytes: hydrated,
            total_bytes: 16 * MIB,
            percent: hydrated as f64 * 100.0 / (16 * MIB) as f64,
            bytes_per_second: MIB as f64,
            eta: Some(Duration::from_secs(8)),
            paused: false,
            last_progress_at: None,
            message: format!("{phase} at {hydrated}."),
        }
    }

    fn at(seconds: u64) -> Time {
        time_from_unix_seconds(seconds).expect("in range")
    }

    #[test]
    fn a_hydrating_clone_reports_the_monitors_progress() {
        let r = record(Some(hydrating(HydrationStage::Enabled)));
        let seen = observe(
            &r,
            Some(progress(HydrationPhase::Hydrating, 8 * MIB)),
            Some(HydrationPhase::Hydrating),
        )
        .expect("an observation");
        assert_eq!(seen.progress.hydrated_bytes, 8 * MIB);
        assert_eq!(seen.started_at, Some(1_700_000_100));
        let status = build(&seen, Some(4), None, None, &at(2_000_000_000));
        assert_eq!(status.phase, Some(HydrationPhase::Hydrating));
        assert_eq!(status.hydrated_bytes, Some(8 * MIB));
        assert_eq!(status.percent, Some(50.0));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(status.started_at, Some(at(1_700_000_100)));
        assert_eq!(status.completed_at, None);
        assert_eq!(status.conditions.len(), 3);
    }

    #[test]
    fn pending_only_while_nothing_else_was_shown() {
        let enabled = record(Some(hydrating(HydrationStage::Enabled)));
        // Never published: Pending, without counts nobody measured.
        let seen = observe(&enabled, None, None).expect("pending");
        assert_eq!(seen.progress.phase, HydrationPhase::Pending);
        let status = build(&seen, Some(1), None, None, &at(10));
        assert_eq!(status.phase, Some(HydrationPhase::Pending));
        assert_eq!(status.total_bytes, Some(16 * MIB));
        assert_eq!(status.hydrated_bytes, None);
        assert_eq!(status.progress, None);
        assert_eq!(status.started_at, None);
        // Published as Hydrating before (an agent restart): wait for the
        // monitor instead of going back to Pending.
        assert_eq!(
            observe(&enabled, None, Some(HydrationPhase::Hydrating)),
            None
        );
        // Not enabled yet: Pending whatever was shown.
        let trimming = record(Some(hydrating(HydrationStage::Trimmed)));
        assert_eq!(
            observe(&trimming, None, Some(HydrationPhase::Hydrating)).map(|o| o.progress.phase),
            Some(HydrationPhase::Pending)
        );
    }

    #[test]
    fn completion_comes_from_the_record() {
        let mut r = record(None);
        r.last_hydration = Some(CompletedHydration {
            source: SnapshotId::for_name("source").expect("valid name"),
            bytes: 16 * MIB,
            started_at: 1_700_000_100,
            completed_at: 1_700_000_200,
        });
        // After a restart the progress map is empty.
        let seen = observe(&r, None, Some(HydrationPhase::Hydrating)).expect("complete");
        let status = build(&seen, Some(2), None, None, &at(1_700_000_300));
        assert_eq!(status.phase, Some(HydrationPhase::Complete));
        assert_eq!(status.hydrated_bytes, Some(16 * MIB));
        assert_eq!(status.total_bytes, Some(16 * MIB));
        assert_eq!(status.percent, Some(100.0));
        assert_eq!(status.progress.as_deref(), Some("100.0%"));
        assert_eq!(status.completed_at, Some(at(1_700_000_200)));
        assert_eq!((status.eta.as_deref(), status.eta_seconds), (None, None));
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .expect("Ready");
        assert_eq!(ready.status, "True");
        // A stale Complete progress of an earlier copy does not hide a new
        // one; a volume that never was a clone says nothing.
        let mut done = progress(HydrationPhase::Complete, 16 * MIB);
        done.eta = Some(Duration::ZERO);
        let seen = observe(&r, Some(done), Some(HydrationPhase::Switching)).expect("complete");
        let status = build(&seen, Some(2), None, None, &at(1_700_000_300));
        assert_eq!((status.eta.as_deref(), status.eta_seconds), (None, None));
        assert_eq!(status.started_at, Some(at(1_700_000_100)));
        let again = record(Some(hydrating(HydrationStage::Enabled)));
        assert_eq!(
            observe(
                &again,
                Some(progress(HydrationPhase::Complete, 16 * MIB)),
                Some(HydrationPhase::Hydrating)
            ),
            None
        );
        assert_eq!(observe(&record(None), None, None), None);
        let mut deleting = record(Some(hydrating(HydrationStage::Enabled)));
        deleting.state = VolumeState::Deleting;
        assert_eq!(observe(&deleting, None, None), None);
    }

    #[test]
    fn a_spec_problem_is_degraded_and_said_in_the_message() {
        let r = record(Some(hydrating(HydrationStage::Enabled)));
        let seen = observe(&r, Some(progress(HydrationPhase::Hydrating, MIB)), None)
            .expect("an observation");
        let problem = SpecProblem {
            reason: "InvalidTunables",
            message: "spec.tunables: too large.".to_owned(),
        };
        let status = build(&seen, Some(3), Some(&problem), None, &at(100));
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::DEGRADED)
            .expect("Degraded");
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, "InvalidTunables");
        assert_eq!(degraded.message, "spec.tunables: too large.");
        assert_eq!(degraded.observed_generation, Some(3));
        assert!(status
            .message
            .as_deref()
            .is_some_and(|m| m.ends_with("spec.tunables: too large.")));
        // A stall keeps its reason and gains the problem's words.
        let stalled = Observed {
            progress: progress(HydrationPhase::Stalled, MIB),
            ..seen
        };
        let status = build(&stalled, Some(3), Some(&problem), None, &at(100));
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::DEGRADED)
            .expect("Degraded");
        assert_eq!(degraded.reason, "HydrationStalled");
        assert!(degraded
            .message
            .ends_with("Also: spec.tunables: too large."));
    }

    #[test]
    fn writes_are_rate_limited_except_phase_changes() {
        let interval = Duration::from_secs(2);
        let t0 = Instant::now();
        let r = record(Some(hydrating(HydrationStage::Enabled)));
        let status_at = |phase, hydrated| {
            let seen = observe(&r, Some(progress(phase, hydrated)), None).expect("observed");
            build(&seen, Some(1), None, None, &at(100))
        };
        let first = status_at(HydrationPhase::Hydrating, MIB);
        assert_eq!(
            write_due(None, None, &first, t0, interval),
            Some(WriteCause::PhaseChange)
        );
        let same = first.clone();
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            write_due(Some(&first), Some(t0), &same, later, interval),
            None
        );
        let more = status_at(HydrationPhase::Hydrating, 2 * MIB);
        let soon = t0 + Duration::from_millis(1999);
        assert_eq!(
            write_due(Some(&first), Some(t0), &more, soon, interval),
            None
        );
        assert_eq!(
            write_due(Some(&first), Some(t0), &more, t0 + interval, interval),
            Some(WriteCause::Update)
        );
        let stalled = status_at(HydrationPhase::Stalled, MIB);
        assert_eq!(
            write_due(Some(&first), Some(t0), &stalled, soon, interval),
            Some(WriteCause::PhaseChange)
        );
        // Found on the object at start, never written by this process.
        assert_eq!(
            write_due(Some(&first), None, &more, t0, interval),
            Some(WriteCause::Update)
        );
    }

    #[test]
    fn events_for_phase_changes() {
        use HydrationPhase as P;
        let cases = [
            (None, P::Pending, None),
            (Some(P::Pending), P::Hydrating, Some(PhaseEvent::Started)),
            (None, P::Hydrating, Some(PhaseEvent::Started)),
            (Some(P::Hydrating), P::Hydrating, None),
            (Some(P::Hydrating), P::Stalled, Some(PhaseEvent::Stalled)),
            (Some(P::Stalled), P::Hydrating, Some(PhaseEvent::Resumed)),
            (Some(P::Hydrating), P::Switching, None),
            (Some(P::Switching), P::Hydrating, None),
            (Some(P::Switching), P::Complete, Some(PhaseEvent::Complete)),
            (Some(P::Hydrating), P::Complete, Some(PhaseEvent::Complete)),
            (None, P::Complete, Some(PhaseEvent::Complete)),
            (Some(P::Stalled), P::Failed, Some(PhaseEvent::Failed)),
            (Some(P::Pending), P::Stalled, Some(PhaseEvent::Stalled)),
        ];
        for (from, to, want) in cases {
            assert_eq!(phase_event(from, to), want, "{from:?} -> {to}");
        }
        assert!(PhaseEvent::Stalled.is_warning());
        assert!(!PhaseEvent::Complete.is_warning());
        assert_eq!(PhaseEvent::Resumed.reason(), "HydrationResumed");
    }
}
