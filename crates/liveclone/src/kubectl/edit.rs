//! `kubectl liveclone pause|resume|tune PVC`: the user's fields of a
//! clone's VolumeHydration, `spec.paused` and `spec.tunables`, written by
//! server-side apply under [`FIELD_MANAGER`]. The node agent of the clone's
//! node acts on them within seconds (see `crate::k8s::node`).
//!
//! Why these writes are safe alongside the agents: the controller agent's
//! apply of the spec leaves out `paused` and `tunables` (they are the
//! user's), and the node agent writes only the status. So the plugin's
//! apply names only those two fields, and is forced: the only other owners
//! it can take them from are the user's own earlier edits (`kubectl edit`,
//! `kubectl patch`), whose intent the new command replaces.
//!
//! Server-side apply removes a field its manager applied before and leaves
//! out now, so every apply names both fields with the values they should
//! keep (a `tune` keeps the paused state, a `pause` the tunables). The
//! object's `resourceVersion` goes with the apply as a precondition: had
//! anyone changed the object since it was read, the apply fails with a
//! conflict and is recomputed from a fresh read, instead of writing back
//! values that someone just changed.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{emit, find_hydration, PluginError, PluginResult, Target, TuneArgs, FIELD_MANAGER};
use crate::domain::hydration::HydrationPhase;
use crate::domain::sizing::MAX_TUNABLE_REGIONS;
use crate::k8s::{HydrationTunablesSpec, VolumeHydration};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;

/// Applies that lose a race with another writer are recomputed this many
/// times. The node agent writes a copy's status every 2 s by default, so a
/// race is rare and a second attempt nearly always lands; the margin is for
/// several writers at once.
const ATTEMPTS: u32 = 10;

/// The user's fields as they should be after a command.
#[derive(Debug, Clone, PartialEq)]
struct UserFields {
    paused: bool,
    tunables: Option<HydrationTunablesSpec>,
}

impl UserFields {
    fn of(vh: &VolumeHydration) -> Self {
        UserFields {
            paused: vh.spec.paused,
            tunables: normalized(vh.spec.tunables.clone()),
        }
    }
}

/// `None` for tunables that set nothing: the same meaning, one spelling.
fn normalized(tunables: Option<HydrationTunablesSpec>) -> Option<HydrationTunablesSpec> {
    tunables.filter(|t| *t != HydrationTunablesSpec::default())
}

pub async fn set_paused(target: &Target, pvc: &str, paused: bool) -> PluginResult<()> {
    let verb = if paused { "pause" } else { "resume" };
    let outcome = update(target, pvc, verb, |current| {
        Ok(UserFields {
            paused,
            tunables: current.tunables.clone(),
        })
    })
    .await?;
    let object = outcome.describe_object(pvc);
    let text = if outcome.before.paused == paused {
        format!(
            "{object}: already {}: spec.paused is {paused}; nothing changed.\n",
            if paused {
                "paused"
            } else {
                "running (not paused)"
            }
        )
    } else if paused {
        format!(
            "{object}: spec.paused: false -> true. The node agent on {} stops the background \
             copy within seconds; the clone stays fully usable (reads of regions not yet copied \
             go to the source). `kubectl liveclone resume {pvc}` continues it.\n",
            outcome.node
        )
    } else {
        format!(
            "{object}: spec.paused: true -> false. The node agent on {} resumes the background \
             copy within seconds (`kubectl liveclone status {pvc} --watch` follows it).\n",
            outcome.node
        )
    };
    emit(&text);
    Ok(())
}

pub async fn tune(target: &Target, args: &TuneArgs) -> PluginResult<()> {
    if !args.changes_something() {
        // Nothing asked: show what is set, change nothing.
        let vh = require_hydration(target, &args.pvc).await?;
        emit(&format!(
            "{}: spec.tunables: {}.\nSet them with --threshold, --batch and --rate-limit, clear them with --reset.\n",
            describe_object(&vh, &args.pvc),
            describe_tunables(vh.spec.tunables.as_ref())
        ));
        return Ok(());
    }
    let outcome = update(target, &args.pvc, "tune", |current| {
        let tunables = if args.reset {
            None
        } else {
            let mut next = current.tunables.clone().unwrap_or_default();
            if let Some(threshold) = args.threshold {
                next.hydration_threshold = Some(threshold);
            }
            if let Some(batch) = args.batch {
                next.hydration_batch_size = Some(batch);
            }
            if let Some(rate) = args.rate_limit {
                next.rate_limit_bytes_per_second = Some(rate);
            }
            if args.no_rate_limit {
                next.rate_limit_bytes_per_second = None;
            }
            validate(&next)?;
            normalized(Some(next))
        };
        Ok(UserFields {
            paused: current.paused,
            tunables,
        })
    })
    .await?;
    let object = outcome.describe_object(&args.pvc);
    let before = describe_tunables(outcome.before.tunables.as_ref());
    let after = describe_tunables(outcome.after.tunables.as_ref());
    let text = if outcome.before.tunables == outcome.after.tunables {
        format!("{object}: spec.tunables already {after}; nothing changed.\n")
    } else {
        format!(
            "{object}: spec.tunables: {before} -> {after}. The node agent on {} applies them \
             within seconds; if the node refuses them, `kubectl liveclone why {}` says why.\n",
            outcome.node, args.pvc
        )
    };
    emit(&text);
    Ok(())
}

/// Refuses tunables the API server or the node would refuse, with the
/// bounds spelled out (the CRD's own rules, checked before sending).
pub fn validate(tunables: &HydrationTunablesSpec) -> PluginResult<()> {
    for (flag, value) in [
        ("--threshold", tunables.hydration_threshold),
        ("--batch", tunables.hydration_batch_size),
    ] {
        if let Some(value) = value {
            if !(1..=MAX_TUNABLE_REGIONS).contains(&value) {
                return Err(PluginError::Refused(format!(
                    "{flag} {value} is out of bounds: a whole number of regions from 1 to \
                     {MAX_TUNABLE_REGIONS}"
                )));
            }
        }
    }
    if let (Some(threshold), Some(batch)) =
        (tunables.hydration_threshold, tunables.hydration_batch_size)
    {
        if batch > threshold {
            return Err(PluginError::Refused(format!(
                "a batch of {batch} regions may not exceed the threshold of {threshold} regions \
                 in flight (such a batch never fills); raise --threshold or lower --batch"
            )));
        }
    }
    Ok(())
}

/// `threshold=64 regions, batch=16 regions`, or what unset means.
pub fn describe_tunables(tunables: Option<&HydrationTunablesSpec>) -> String {
    let Some(tunables) = tunables else {
        return "none (the StorageClass's values or the driver's defaults)".to_owned();
    };
    let mut parts = Vec::new();
    if let Some(threshold) = tunables.hydration_threshold {
        parts.push(format!("threshold={threshold} regions"));
    }
    if let Some(batch) = tunables.hydration_batch_size {
        parts.push(format!("batch={batch} regions"));
    }
    if let Some(rate) = tunables.rate_limit_bytes_per_second {
        parts.push(format!(
            "rate limit={}",
            crate::domain::human::format_rate(rate)
        ));
    }
    if parts.is_empty() {
        "none (the StorageClass's values or the driver's defaults)".to_owned()
    } else {
        parts.join(", ")
    }
}

struct Outcome {
    namespace: String,
    name: String,
    node: String,
    before: UserFields,
    after: UserFields,
}

impl Outcome {
    fn describe_object(&self, pvc: &str) -> String {
        format!(
            "volumehydration {}/{} (PVC {pvc})",
            self.namespace, self.name
        )
    }
}

fn describe_object(vh: &VolumeHydration, pvc: &str) -> String {
    format!(
        "volumehydration {}/{} (PVC {pvc})",
        vh.namespace().unwrap_or_default(),
        vh.name_any()
    )
}

/// Reads the claim's VolumeHydration, computes the user's fields with
/// `change`, and applies them if they differ; on a lost race, again from a
/// fresh read.
async fn update(
    target: &Target,
    pvc: &str,
    verb: &str,
    change: impl Fn(&UserFields) -> PluginResult<UserFields>,
) -> PluginResult<Outcome> {
    let mut attempt = 1;
    loop {
        let vh = require_hydration(target, pvc).await?;
        refuse_if_finished(&vh, pvc, verb)?;
        let before = UserFields::of(&vh);
        let after = change(&before)?;
        let outcome = Outcome {
            namespace: vh.namespace().unwrap_or_default(),
            name: vh.name_any(),
            node: vh.spec.node.clone(),
            before: before.clone(),
            after: after.clone(),
        };
        if before == after {
            return Ok(outcome);
        }
        match apply(target, &vh, &after).await {
            Ok(()) => return Ok(outcome),
            Err(kube::Error::Api(status)) if status.is_conflict() && attempt < ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => {
                return Err(PluginError::api(
                    format!("writing the spec of {}", outcome.describe_object(pvc)),
                    e,
                ))
            }
        }
    }
}

async fn apply(target: &Target, vh: &VolumeHydration, fields: &UserFields) -> kube::Result<()> {
    let namespace = vh.namespace().unwrap_or_default();
    let name = vh.name_any();
    let api: Api<VolumeHydration> = Api::namespaced(target.client.clone(), &namespace);
    let mut spec = json!({ "paused": fields.paused });
    if let Some(tunables) = &fields.tunables {
        spec["tunables"] = serde_json::to_value(tunables).map_err(kube::Error::SerdeError)?;
    }
    let object = json!({
        "apiVersion": VolumeHydration::api_version(&()),
        "kind": VolumeHydration::kind(&()),
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": vh.resource_version(),
        },
        "spec": spec,
    });
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await?;
    if fields.tunables.is_none() && applied.spec.tunables.is_some() {
        // Leaving tunables out of the apply only drops this manager's claim
        // on them; set by another (a `kubectl patch`), they stay. A reset
        // means none at all, so remove them outright, still guarded by the
        // version just written.
        let remove = json!({
            "metadata": { "resourceVersion": applied.resource_version() },
            "spec": { "tunables": null },
        });
        api.patch(
            &name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(&remove),
        )
        .await?;
    }
    Ok(())
}

/// The claim's VolumeHydration, or a refusal that says whether the claim
/// exists and is simply not a liveclone clone.
pub(crate) async fn require_hydration(target: &Target, pvc: &str) -> PluginResult<VolumeHydration> {
    let namespace = &target.namespace;
    if let Some(vh) = find_hydration(&target.client, namespace, pvc).await? {
        return Ok(vh);
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(target.client.clone(), namespace);
    let claim = claims.get_opt(pvc).await.map_err(|e| {
        PluginError::api(
            format!("reading PersistentVolumeClaim {namespace}/{pvc}"),
            e,
        )
    })?;
    Err(PluginError::Refused(match claim {
        None => format!(
            "PersistentVolumeClaim {namespace}/{pvc} does not exist (`kubectl get pvc -n \
             {namespace}` lists the claims; -n picks another namespace)"
        ),
        Some(_) => format!(
            "PVC {namespace}/{pvc} is not a liveclone clone: no VolumeHydration in {namespace} \
             has spec.pvc={pvc}. Only claims cloned by csi.liveclone.io from a PVC or a \
             VolumeSnapshot hydrate (`kubectl liveclone why {pvc} -n {namespace}` says more)"
        ),
    }))
}

/// Refuses to edit a copy that has ended or is about to: there is nothing
/// left for the edit to act on.
fn refuse_if_finished(vh: &VolumeHydration, pvc: &str, verb: &str) -> PluginResult<()> {
    let namespace = vh.namespace().unwrap_or_default();
    let phase = vh.status.as_ref().and_then(|status| status.phase);
    let why = match phase {
        Some(HydrationPhase::Complete) => format!(
            "PVC {namespace}/{pvc} has finished hydrating (phase Complete): it is an independent \
             copy and no longer reads its source, so there is nothing to {verb}"
        ),
        Some(HydrationPhase::Switching) => format!(
            "PVC {namespace}/{pvc} has copied everything and is switching to its own storage \
             (phase Switching): there is nothing left to {verb}"
        ),
        Some(HydrationPhase::Failed) => format!(
            "the hydration of PVC {namespace}/{pvc} has failed (phase Failed), and to {verb} it \
             cannot help: `kubectl liveclone why {pvc} -n {namespace}` says what to do"
        ),
        _ => return Ok(()),
    };
    Err(PluginError::Refused(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunables(threshold: Option<u32>, batch: Option<u32>) -> HydrationTunablesSpec {
        HydrationTunablesSpec {
            hydration_threshold: threshold,
            hydration_batch_size: batch,
            rate_limit_bytes_per_second: None,
        }
    }

    #[test]
    fn bounds_are_checked_before_sending() {
        assert!(validate(&tunables(Some(1), Some(1))).is_ok());
        assert!(validate(&tunables(Some(MAX_TUNABLE_REGIONS), None)).is_ok());
        assert!(validate(&tunables(None, Some(7))).is_ok());
        let zero = validate(&tunables(Some(0), None)).expect_err("0 is refused");
        assert!(zero.to_string().contains("--threshold 0"), "{zero}");
        let over = validate(&tunables(None, Some(MAX_TUNABLE_REGIONS + 1))).expect_err("too big");
        assert!(
            over.to_string().contains(&MAX_TUNABLE_REGIONS.to_string()),
            "{over}"
        );
        let batch = validate(&tunables(Some(4), Some(8))).expect_err("batch > threshold");
        assert!(batch.to_string().contains("may not exceed"), "{batch}");
        assert_eq!(batch.exit_code(), 1);
    }

    #[test]
    fn empty_tunables_mean_none() {
        assert_eq!(normalized(Some(HydrationTunablesSpec::default())), None);
        assert_eq!(
            normalized(Some(tunables(Some(2), None))),
            Some(tunables(Some(2), None))
        );
        assert!(describe_tunables(None).starts_with("none"));
        assert_eq!(
            describe_tunables(Some(&tunables(Some(64), Some(16)))),
            "threshold=64 regions, batch=16 regions"
        );
    }
}
