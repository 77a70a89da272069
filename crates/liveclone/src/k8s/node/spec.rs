//! The spec side: what `paused` and `tunables` ask of the engine, and the
//! engine calls that make it so.

use std::sync::Arc;

use tracing::{debug, info, warn};

use super::status::SpecProblem;
use crate::domain::engine::Engine;
use crate::domain::error::{DomainError, DomainResult, ErrorCode};
use crate::domain::ids::VolumeId;
use crate::domain::model::{HydrationRecord, VolumeRecord};
use crate::domain::sizing::{parse_parameters, HydrationTunables};
use crate::k8s::hydration::VolumeHydrationSpec;

/// The tunables `spec` asks for, resolved as the clone's own were when it
/// was made: each value from `spec.tunables`, else the StorageClass
/// parameter recorded with the volume, else the driver's default for the
/// region size (with the same adjustment of one to the other), then
/// validated against the region size. So removing a tunable from the spec
/// returns it to what the StorageClass gave, as the CRD documents, and
/// the VolumeHydration is the one source of truth for the tunables of a
/// clone in Kubernetes mode (a `liveclone hydration tune` on the node is
/// undone at the agent's next round).
///
/// The error is the engine's message for these values: `tune_hydration`
/// validates with the same [`HydrationTunables::validate`].
pub(super) fn desired_tunables(
    record: &VolumeRecord,
    hydration: &HydrationRecord,
    spec: &VolumeHydrationSpec,
) -> Result<HydrationTunables, String> {
    let region_size = hydration
        .region_size()
        .ok_or_else(|| "the clone's recorded region size is invalid".to_owned())?;
    let parameters = parse_parameters(&record.parameters).map_err(|e| e.to_string())?;
    let tunables = spec.tunables.as_ref();
    HydrationTunables::resolve(
        region_size,
        tunables
            .and_then(|t| t.hydration_threshold)
            .or(parameters.hydration_threshold),
        tunables
            .and_then(|t| t.hydration_batch_size)
            .or(parameters.hydration_batch_size),
    )
    .map_err(|e| e.to_string())
}

/// The outcome of one pass over the spec.
#[derive(Debug, Default)]
pub(super) struct SpecPass {
    /// The engine did as the spec asks, or was found to be so already, or
    /// cannot and `problem` says why: the spec's generation was handled.
    pub handled: bool,
    /// A call failed for a reason that may pass (not busy, not invalid):
    /// worth another try later, not at every round.
    pub failed_call: bool,
    /// What the spec asks that the node cannot do.
    pub problem: Option<SpecProblem>,
    /// Engine state changes made.
    pub changes: u32,
}

/// Brings the engine's pause state and tunables for `id` to what `spec`
/// asks. `record` is the volume as read at the start of the round (a
/// hydrating clone); calls block, so they run on the blocking pool. A
/// volume busy with another call (ABORTED) is left for the next round.
pub(super) async fn apply(
    engine: &Arc<Engine>,
    id: &VolumeId,
    record: &VolumeRecord,
    hydration: &HydrationRecord,
    spec: &VolumeHydrationSpec,
    call_engine: bool,
) -> SpecPass {
    let mut pass = SpecPass {
        handled: true,
        ..SpecPass::default()
    };
    let mut problems = Vec::new();

    if hydration.paused != spec.paused {
        if call_engine {
            let paused = spec.paused;
            let result = blocking(engine, id, move |engine, id| {
                if paused {
                    engine.pause_hydration(id)
                } else {
                    engine.resume_hydration(id)
                }
            })
            .await;
            match result {
                Ok(()) => {
                    pass.changes += 1;
                    info!(
                        paused,
                        "hydration {} as the spec asks",
                        if paused { "paused" } else { "resumed" }
                    );
                }
                Err(e) => note_failure(&mut pass, &mut problems, "PauseFailed", &e, || {
                    format!(
                        "The node could not {} the copy: {e}.",
                        if paused { "pause" } else { "resume" }
                    )
                }),
            }
        } else {
            pass.handled = false;
        }
    }

    match desired_tunables(record, hydration, spec) {
        Ok(desired) if desired == hydration.tunables() => {}
        Ok(desired) if call_engine => {
            let result = blocking(engine, id, move |engine, id| {
                engine.tune_hydration(id, Some(desired.threshold), Some(desired.batch_size))
            })
            .await;
            match result {
                Ok(tunables) => {
                    pass.changes += 1;
                    info!(
                        threshold = tunables.threshold,
                        batch_size = tunables.batch_size,
                        "hydration tuned as the spec asks"
                    );
                }
                Err(e) if e.code == ErrorCode::InvalidArgument => {
                    problems.push(invalid_tunables(&e.message, hydration));
                }
                Err(e) => note_failure(&mut pass, &mut problems, "TuneFailed", &e, || {
                    format!("The node could not apply spec.tunables: {e}.")
                }),
            }
        }
        Ok(_) => pass.handled = false,
        Err(message) => problems.push(invalid_tunables(&message, hydration)),
    }

    if let Some(rate) = spec
        .tunables
        .as_ref()
        .and_then(|t| t.rate_limit_bytes_per_second)
    {
        problems.push(SpecProblem {
            reason: "RateLimitUnsupported",
            message: format!(
                "spec.tunables.rateLimitBytesPerSecond ({rate}) is not supported by this \
                 node yet, so the copy runs without a rate limit; lower \
                 spec.tunables.hydrationThreshold to slow it down."
            ),
        });
    }

    pass.problem = merge(problems);
    pass
}

/// Records a failed call: busy is for the next round; anything else is a
/// problem to show, and a call to retry later.
fn note_failure(
    pass: &mut SpecPass,
    problems: &mut Vec<SpecProblem>,
    reason: &'static str,
    error: &DomainError,
    message: impl FnOnce() -> String,
) {
    if error.code == ErrorCode::Aborted {
        debug!("the volume is busy; the spec is applied on the next round: {error}");
        pass.handled = false;
        return;
    }
    warn!("{reason}: {error}");
    pass.failed_call = true;
    problems.push(SpecProblem {
        reason,
        message: message(),
    });
}

fn invalid_tunables(why: &str, hydration: &HydrationRecord) -> SpecProblem {
    SpecProblem {
        reason: "InvalidTunables",
        message: format!(
            "spec.tunables cannot be applied: {why}. The copy goes on with \
             hydrationThreshold {} and hydrationBatchSize {}; correct spec.tunables.",
            hydration.threshold, hydration.batch_size
        ),
    }
}

/// One problem: the first one's reason, every message.
fn merge(problems: Vec<SpecProblem>) -> Option<SpecProblem> {
    let reason = problems.first()?.reason;
    let message = problems
        .into_iter()
        .map(|p| p.message)
        .collect::<Vec<_>>()
        .join(" ");
    Some(SpecProblem { reason, message })
}

async fn blocking<T: Send + 'static>(
    engine: &Arc<Engine>,
    id: &VolumeId,
    job: impl FnOnce(&Engine, &VolumeId) -> DomainResult<T> + Send + 'static,
) -> DomainResult<T> {
    let (engine, id) = (Arc::clone(engine), id.clone());
    tokio::task::spawn_blocking(move || job(&engine, &id))
        .await
        .unwrap_or_else(|e| Err(DomainError::internal(format!("engine task failed: {e}"))))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::domain::ids::SnapshotId;
    use crate::domain::model::{AccessKind, HydrationStage, VolumeState};
    use crate::k8s::hydration::{
        HydrationDestination, HydrationSource, HydrationTunablesSpec, SourceKind,
    };

    /// 64 KiB regions: defaults 64 (batch) and 256 (threshold), at most
    /// 4096 in flight.
    const REGION_SECTORS: u64 = 128;

    fn record(parameters: &[(&str, &str)]) -> (VolumeRecord, HydrationRecord) {
        let hydration = HydrationRecord {
            source: SnapshotId::for_name("source").expect("valid name"),
            source_bytes: 16 << 20,
            region_sectors: REGION_SECTORS,
            metadata_bytes: 1 << 20,
            threshold: 256,
            batch_size: 64,
            paused: false,
            stage: HydrationStage::Enabled,
            started_at: 1,
        };
        let record = VolumeRecord {
            id: VolumeId::for_name("clone").expect("valid name"),
            name: "clone".to_owned(),
            capacity_bytes: 16 << 20,
            access: AccessKind::Block,
            content_source: None,
            parameters: parameters
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            state: VolumeState::Ready,
            generation: 0,
            hydration: Some(hydration.clone()),
            last_hydration: None,
            needs_fs_grow: false,
            device_class: None,
            created_at: 1,
            published: Default::default(),
        };
        (record, hydration)
    }

    fn spec(threshold: Option<u32>, batch_size: Option<u32>) -> VolumeHydrationSpec {
        VolumeHydrationSpec {
            pvc: "clone".to_owned(),
            source: HydrationSource {
                kind: SourceKind::PersistentVolumeClaim,
                name: "data".to_owned(),
                namespace: None,
                volume_handle: Some("lcv-0".to_owned()),
                snapshot_handle: None,
            },
            destination: HydrationDestination {
                volume_handle: "lcv-1".to_owned(),
                persistent_volume_name: "pv".to_owned(),
            },
            node: "node-a".to_owned(),
            tunables: (threshold.is_some() || batch_size.is_some()).then_some(
                HydrationTunablesSpec {
                    hydration_threshold: threshold,
                    hydration_batch_size: batch_size,
                    rate_limit_bytes_per_second: None,
                },
            ),
            paused: false,
        }
    }

    fn tunables(threshold: u32, batch_size: u32) -> HydrationTunables {
        HydrationTunables {
            threshold,
            batch_size,
        }
    }

    #[test]
    fn no_tunables_in_the_spec_means_the_storage_class_or_the_defaults() {
        let (r, h) = record(&[]);
        assert_eq!(
            desired_tunables(&r, &h, &spec(None, None)),
            Ok(tunables(256, 64))
        );
        let (r, h) = record(&[("liveclone.io/hydrationThreshold", "32")]);
        assert_eq!(
            desired_tunables(&r, &h, &spec(None, None)),
            Ok(tunables(32, 32))
        );
    }

    #[test]
    fn spec_tunables_override_and_adjust_each_other() {
        let (r, h) = record(&[("liveclone.io/hydrationThreshold", "32")]);
        assert_eq!(
            desired_tunables(&r, &h, &spec(Some(512), None)),
            Ok(tunables(512, 64))
        );
        let (r, h) = record(&[]);
        assert_eq!(
            desired_tunables(&r, &h, &spec(None, Some(1024))),
            Ok(tunables(1024, 1024))
        );
        assert_eq!(
            desired_tunables(&r, &h, &spec(Some(128), Some(16))),
            Ok(tunables(128, 16))
        );
    }

    #[test]
    fn invalid_tunables_say_why() {
        let (r, h) = record(&[]);
        let error = desired_tunables(&r, &h, &spec(Some(5000), None)).expect_err("too large");
        assert!(error.contains("at most 4096 regions"), "{error}");
        // The batch from the spec against the threshold from the
        // StorageClass: no CRD rule can see both.
        let (r, h) = record(&[("liveclone.io/hydrationThreshold", "32")]);
        let error = desired_tunables(&r, &h, &spec(None, Some(64))).expect_err("batch too big");
        assert!(error.contains("larger than the threshold"), "{error}");
        let problem = invalid_tunables(&error, &h);
        assert_eq!(problem.reason, "InvalidTunables");
        assert!(problem.message.contains("hydrationThreshold 256"));
    }

    #[test]
    fn problems_merge_into_one_condition() {
        assert_eq!(merge(Vec::new()), None);
        let merged = merge(vec![
            SpecProblem {
                reason: "InvalidTunables",
                message: "One.".to_owned(),
            },
            SpecProblem {
                reason: "RateLimitUnsupported",
                message: "Two.".to_owned(),
            },
        ])
        .expect("merged");
        assert_eq!(merged.reason, "InvalidTunables");
        assert_eq!(merged.message, "One. Two.");
    }
}
