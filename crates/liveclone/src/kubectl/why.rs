//! `kubectl liveclone why PVC`: plain sentences on why a clone is not (yet)
//! usable or not (yet) independent of its source.
//!
//! Two halves: [`gather`] reads what bears on the claim (the claim, its
//! StorageClass, the pods that use it, the Events on it, its
//! PersistentVolume, LivecloneVolume, VolumeHydration and the Events on
//! that, the node's LivecloneNode and Node); [`diagnose`] turns those facts
//! into findings without any I/O, so that every rule is unit-tested. Each
//! finding carries the command to look further. Objects the plugin may not
//! read (RBAC) are noted and skipped rather than failing the whole answer.

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::render::{format_percent, HydrationView};
use super::{emit, is_not_served, pick_hydration, PluginError, PluginResult, Target, DRIVER_NAME};
use crate::domain::human::format_duration;
use crate::domain::hydration::HydrationPhase;
use crate::k8s::capacity::{is_stale, stale_after};
use crate::k8s::hydration::condition;
use crate::k8s::node::ABNORMAL_CONDITION;
use crate::k8s::{LivecloneNode, LivecloneVolume, VolumeHydration, VolumePhase, READY_CONDITION};

/// The scheduler's annotation on a WaitForFirstConsumer claim once it has
/// picked the node of the first pod that uses it.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// An object looked up by name.
#[derive(Debug, Clone)]
pub enum Lookup<T> {
    Found(T),
    Missing,
    /// Not readable: the reason (usually RBAC), shown as a note.
    Unreadable(String),
}

impl<T> Lookup<T> {
    fn found(&self) -> Option<&T> {
        match self {
            Lookup::Found(value) => Some(value),
            _ => None,
        }
    }
}

/// The part of an Event that matters here.
#[derive(Debug, Clone, PartialEq)]
pub struct EventFact {
    pub warning: bool,
    pub reason: String,
    pub message: String,
    /// When it last happened (RFC 3339), for ordering and display.
    pub last_seen: Option<Timestamp>,
}

/// Everything [`diagnose`] looks at.
#[derive(Debug, Clone)]
pub struct Facts {
    pub namespace: String,
    pub pvc: String,
    pub claim: Lookup<PersistentVolumeClaim>,
    /// `None` when the claim names no class.
    pub storage_class: Option<Lookup<StorageClass>>,
    /// Pods in the namespace that use the claim; `None` if not readable.
    pub consumers: Option<Vec<String>>,
    pub claim_events: Vec<EventFact>,
    pub volume: Option<Lookup<PersistentVolume>>,
    /// False when the cluster does not serve liveclone's CRDs.
    pub crds_installed: bool,
    pub liveclone_volume: Option<Lookup<LivecloneVolume>>,
    pub hydration: Option<VolumeHydration>,
    pub hydration_events: Vec<EventFact>,
    /// The node holding the clone, as the liveclone objects name it.
    pub node: Option<String>,
    pub liveclone_node: Option<Lookup<LivecloneNode>>,
    pub node_object: Option<Lookup<Node>>,
    pub now: Timestamp,
}

impl Facts {
    /// What is known once the claim has been looked up: nothing else yet
    /// (the CRDs taken as served until a lookup says otherwise).
    pub fn about_claim(
        namespace: &str,
        pvc: &str,
        claim: Lookup<PersistentVolumeClaim>,
        now: Timestamp,
    ) -> Self {
        Facts {
            namespace: namespace.to_owned(),
            pvc: pvc.to_owned(),
            claim,
            storage_class: None,
            consumers: None,
            claim_events: Vec::new(),
            volume: None,
            crds_installed: true,
            liveclone_volume: None,
            hydration: None,
            hydration_events: Vec::new(),
            node: None,
            liveclone_node: None,
            node_object: None,
            now,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Keeps the clone from being usable or from becoming independent.
    Problem,
    /// Worth knowing; nothing to fix.
    Note,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub severity: Severity,
    pub text: String,
    /// A command that shows more.
    pub look: String,
}

/// What `why` concludes.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    /// One line on the claim: its phase and class.
    pub headline: String,
    pub findings: Vec<Finding>,
    /// For a healthy clone: where it stands (after "nothing is wrong: ").
    pub healthy: String,
}

impl Diagnosis {
    pub fn is_healthy(&self) -> bool {
        self.findings
            .iter()
            .all(|f| f.severity != Severity::Problem)
    }

    pub fn render(&self) -> String {
        let mut out = format!("{}\n", self.headline);
        for finding in &self.findings {
            let label = match finding.severity {
                Severity::Problem => "problem",
                Severity::Note => "note",
            };
            let _ = writeln!(out, "{label}: {}", finding.text);
            let _ = writeln!(out, "  look further: {}", finding.look);
        }
        if self.is_healthy() {
            let _ = writeln!(out, "nothing is wrong: {}", self.healthy);
        }
        out
    }
}

struct Findings(Vec<Finding>);

impl Findings {
    fn problem(&mut self, text: impl Into<String>, look: impl Into<String>) {
        self.0.push(Finding {
            severity: Severity::Problem,
            text: text.into(),
            look: look.into(),
        });
    }

    fn note(&mut self, text: impl Into<String>, look: impl Into<String>) {
        self.0.push(Finding {
            severity: Severity::Note,
            text: text.into(),
            look: look.into(),
        });
    }
}

fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The facts turned into findings (no I/O).
pub fn diagnose(facts: &Facts) -> Diagnosis {
    let ns = &facts.namespace;
    let pvc = &facts.pvc;
    let mut findings = Findings(Vec::new());
    let describe_pvc = format!("kubectl describe pvc {pvc} -n {ns}");

    let claim = match &facts.claim {
        Lookup::Found(claim) => claim,
        Lookup::Missing => {
            findings.problem(
                format!("PersistentVolumeClaim {ns}/{pvc} does not exist."),
                format!("kubectl get pvc -n {ns}"),
            );
            return Diagnosis {
                headline: format!("PVC {ns}/{pvc}: not found"),
                findings: findings.0,
                healthy: String::new(),
            };
        }
        Lookup::Unreadable(why) => {
            findings.problem(
                format!("PersistentVolumeClaim {ns}/{pvc} could not be read: {why}"),
                format!("kubectl auth can-i get pvc -n {ns}"),
            );
            return Diagnosis {
                headline: format!("PVC {ns}/{pvc}: unreadable"),
                findings: findings.0,
                healthy: String::new(),
            };
        }
    };
    let spec = claim.spec.clone().unwrap_or_default();
    let phase = claim
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".to_owned());
    let class_name = spec.storage_class_name.clone();
    let is_clone = spec.data_source.is_some() || spec.data_source_ref.is_some();
    let mut headline = format!(
        "PVC {ns}/{pvc}: {phase}, StorageClass {}",
        class_name.as_deref().unwrap_or("(none)")
    );
    if let Some(source) = spec
        .data_source_ref
        .as_ref()
        .map(|r| (&r.kind, &r.name))
        .or(spec.data_source.as_ref().map(|r| (&r.kind, &r.name)))
    {
        let _ = write!(headline, ", cloned from {} {}", source.0, source.1);
    }

    // The StorageClass: is liveclone the provisioner, and when does it bind?
    let mut wait_for_consumer = false;
    let mut liveclone_class = true;
    match &facts.storage_class {
        None => {
            if phase == "Pending" {
                findings.problem(
                    "The claim names no StorageClass and the cluster has no default one, so \
                     nothing will provision it; set spec.storageClassName to a liveclone class \
                     (the chart's default is `liveclone`) when creating the claim.",
                    "kubectl get storageclass",
                );
            }
        }
        Some(Lookup::Missing) => findings.problem(
            format!(
                "StorageClass {} does not exist, so nothing provisions this claim; create it \
                 (the liveclone chart makes its classes) or recreate the claim with an \
                 existing class.",
                class_name.as_deref().unwrap_or_default()
            ),
            "kubectl get storageclass",
        ),
        Some(Lookup::Unreadable(why)) => findings.note(
            format!("The StorageClass could not be read ({why}); its checks are skipped."),
            "kubectl get storageclass",
        ),
        Some(Lookup::Found(class)) => {
            let name = class.name_any();
            if class.provisioner != DRIVER_NAME {
                liveclone_class = false;
                findings.problem(
                    format!(
                        "StorageClass {name} is provisioned by {}, not by liveclone \
                         ({DRIVER_NAME}): this claim is not a liveclone volume, and no live \
                         clone is made for it. Use a liveclone StorageClass.",
                        class.provisioner
                    ),
                    format!("kubectl get storageclass {name} -o yaml"),
                );
            }
            wait_for_consumer =
                class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
        }
    }

    let selected_node = claim
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SELECTED_NODE))
        .cloned();
    let latest_failure = facts
        .claim_events
        .iter()
        .filter(|e| e.warning && e.reason == "ProvisioningFailed")
        .max_by_key(|e| e.last_seen);

    match phase.as_str() {
        "Pending" => {
            if wait_for_consumer && selected_node.is_none() {
                match &facts.consumers {
                    Some(pods) if pods.is_empty() => findings.problem(
                        format!(
                            "The claim is Pending because its StorageClass binds volumes only \
                             when a pod uses them (volumeBindingMode WaitForFirstConsumer), and \
                             no pod in {ns} uses it yet: the clone is made once one is \
                             scheduled. Create the pod that mounts it."
                        ),
                        format!("kubectl get pods -n {ns}"),
                    ),
                    Some(pods) => findings.problem(
                        format!(
                            "The claim waits for its first consumer (WaitForFirstConsumer) and \
                             is used by pod {}, but the scheduler has not placed the pod yet \
                             (no {SELECTED_NODE} annotation): its Events say why.",
                            pods.join(", ")
                        ),
                        format!(
                            "kubectl describe pod {} -n {ns}",
                            pods.first().map(String::as_str).unwrap_or_default()
                        ),
                    ),
                    None => findings.problem(
                        "The claim waits for its first consumer (WaitForFirstConsumer): it is \
                         provisioned once a pod that uses it is scheduled.",
                        format!("kubectl get pods -n {ns}"),
                    ),
                }
            }
            if let Some(event) = latest_failure {
                findings.problem(
                    format!(
                        "Provisioning failed: {} (Warning Event ProvisioningFailed on the \
                         claim; the provisioner retries).",
                        event.message.trim_end_matches('.')
                    ),
                    describe_pvc.clone(),
                );
            } else if !(wait_for_consumer && selected_node.is_none()) && liveclone_class {
                findings.problem(
                    "The claim is Pending: its volume is being provisioned and no Event says \
                     anything went wrong yet. If it stays Pending, the controller's logs say \
                     why.",
                    format!(
                        "{describe_pvc}; kubectl logs -n liveclone deploy/liveclone-controller \
                         --all-containers"
                    ),
                );
            }
        }
        "Lost" => findings.problem(
            format!(
                "The claim is Lost: its PersistentVolume {} is gone, so its data is \
                 unreachable.",
                spec.volume_name.as_deref().unwrap_or("(unknown)")
            ),
            describe_pvc.clone(),
        ),
        _ => {}
    }

    // The PersistentVolume of a bound claim: is it liveclone's?
    if let Some(Lookup::Found(volume)) = &facts.volume {
        let driver = volume
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .map(|csi| csi.driver.clone());
        if liveclone_class && driver.as_deref() != Some(DRIVER_NAME) {
            findings.problem(
                format!(
                    "PersistentVolume {} is not a liveclone volume (CSI driver {}).",
                    volume.name_any(),
                    driver.as_deref().unwrap_or("none")
                ),
                format!("kubectl get pv {} -o yaml", volume.name_any()),
            );
        }
    } else if let Some(Lookup::Missing) = &facts.volume {
        findings.problem(
            format!(
                "The claim is bound to PersistentVolume {}, which does not exist.",
                spec.volume_name.as_deref().unwrap_or_default()
            ),
            describe_pvc.clone(),
        );
    }

    if !facts.crds_installed {
        findings.problem(
            "This cluster does not serve liveclone's custom resources: the liveclone chart \
             (its CRDs and agents) is not installed, so no claim can be provisioned or cloned \
             by it.",
            "kubectl get crd volumehydrations.liveclone.io liveclonevolumes.liveclone.io",
        );
        return Diagnosis {
            headline,
            findings: findings.0,
            healthy: String::new(),
        };
    }

    // The LivecloneVolume: did its node make it?
    let vh = facts.hydration.as_ref();
    match &facts.liveclone_volume {
        Some(Lookup::Found(volume)) => {
            let id = volume.name_any();
            let status = volume.status.clone().unwrap_or_default();
            let ready = find_condition(&status.conditions, READY_CONDITION);
            let look = format!(
                "kubectl get lcvol {id} -o yaml; kubectl get events -n default \
                 --field-selector involvedObject.name={id}"
            );
            match ready {
                Some(c) if c.status == "False" => findings.problem(
                    format!(
                        "LivecloneVolume {id} on node {} is not ready ({}): {}",
                        volume.spec.node,
                        c.reason,
                        c.message.trim()
                    ),
                    look.clone(),
                ),
                None if status.phase != Some(VolumePhase::Ready) => findings.problem(
                    format!(
                        "LivecloneVolume {id} has no Ready condition yet: the node agent on {} \
                         has not made the volume (phase {}).",
                        volume.spec.node,
                        status
                            .phase
                            .map_or("not reported".to_owned(), |p| format!("{p:?}"))
                    ),
                    look.clone(),
                ),
                _ => {}
            }
            if vh.is_none() {
                if let Some(c) = find_condition(&status.conditions, ABNORMAL_CONDITION)
                    .filter(|c| c.status == "True")
                {
                    findings.problem(
                        format!("LivecloneVolume {id} is abnormal: {}", c.message.trim()),
                        look,
                    );
                }
            }
        }
        Some(Lookup::Missing) if phase == "Bound" && liveclone_class => findings.problem(
            "The claim is bound but its LivecloneVolume does not exist: the volume's record \
             was deleted, so no node serves it.",
            "kubectl get lcvol",
        ),
        Some(Lookup::Unreadable(why)) => findings.note(
            format!("LivecloneVolumes could not be read ({why})."),
            "kubectl get lcvol",
        ),
        _ => {}
    }

    // The VolumeHydration: is the copy moving?
    let mut healthy = match phase.as_str() {
        "Bound" => "the claim is bound and usable".to_owned(),
        other => format!("the claim is {other}"),
    };
    match vh {
        None if is_clone && phase == "Bound" && liveclone_class => findings.problem(
            format!(
                "The claim is a clone, but no VolumeHydration in {ns} has spec.pvc={pvc}: the \
                 controller agent has not recorded its hydration, so nobody can follow or \
                 control the copy."
            ),
            "kubectl logs -n liveclone deploy/liveclone-controller --all-containers",
        ),
        None if !is_clone => {
            healthy.push_str("; it is not a clone (no dataSource), so it has nothing to copy");
        }
        None => {}
        Some(vh) => {
            let view = HydrationView::of(vh);
            let name = vh.name_any();
            let describe_vh = format!("kubectl describe vh {name} -n {ns}");
            let status = vh.status.clone().unwrap_or_default();
            let message = status.message.clone().unwrap_or_default();
            match status.phase {
                None => findings.problem(
                    format!(
                        "VolumeHydration {name} has no status: the node agent on {} has not \
                         reported on the copy. Is the liveclone-node pod running there?",
                        vh.spec.node
                    ),
                    format!(
                        "kubectl get pods -A -l app.kubernetes.io/component=node \
                         --field-selector spec.nodeName={}",
                        vh.spec.node
                    ),
                ),
                Some(HydrationPhase::Stalled) => findings.problem(
                    format!(
                        "The copy is Stalled at {}, so the clone is not becoming independent: \
                         {}",
                        format_percent(view.percent),
                        if message.is_empty() {
                            "no progress for a while (an I/O error on the source or the \
                             destination, or application I/O that starves the copy)"
                                .to_owned()
                        } else {
                            message.clone()
                        }
                    ),
                    format!(
                        "{describe_vh}; on node {}: dmesg | grep -i -e clone -e 'I/O error'",
                        vh.spec.node
                    ),
                ),
                Some(HydrationPhase::Failed) => findings.problem(
                    format!(
                        "The copy Failed: {}",
                        if message.is_empty() {
                            "the node gave no reason".to_owned()
                        } else {
                            message.clone()
                        }
                    ),
                    describe_vh.clone(),
                ),
                Some(HydrationPhase::Complete) => {
                    healthy.push_str(
                        "; its copy is complete, so it is an independent full copy that no \
                         longer reads its source",
                    );
                }
                Some(
                    phase @ (HydrationPhase::Pending
                    | HydrationPhase::Hydrating
                    | HydrationPhase::Switching),
                ) => {
                    if !vh.spec.paused {
                        let eta = view
                            .eta_seconds
                            .map(|s| {
                                format!(
                                    ", about {} left",
                                    format_duration(std::time::Duration::from_secs(s))
                                )
                            })
                            .unwrap_or_default();
                        let _ = write!(
                            healthy,
                            "; its copy is {phase} ({} done{eta}) and it becomes independent of \
                             its source when the copy completes",
                            format_percent(view.percent)
                        );
                    }
                }
            }
            if vh.spec.paused && !view.has_ended() {
                findings.problem(
                    "The copy is paused (spec.paused is true), so the clone stays dependent \
                     on its source until it is resumed; it is fully usable meanwhile.",
                    format!("kubectl liveclone resume {pvc} -n {ns}"),
                );
            }
            if let Some(degraded) = find_condition(&status.conditions, condition::DEGRADED) {
                let already = matches!(
                    status.phase,
                    Some(HydrationPhase::Stalled | HydrationPhase::Failed)
                );
                if degraded.status == "True" && !already {
                    findings.problem(
                        format!(
                            "The node refused the copy's settings ({}): {}",
                            degraded.reason,
                            degraded.message.trim()
                        ),
                        format!("kubectl liveclone tune {pvc} -n {ns} --reset"),
                    );
                }
            }
            if let (Some(observed), Some(generation)) =
                (status.observed_generation, vh.metadata.generation)
            {
                if observed < generation && !view.has_ended() {
                    findings.note(
                        "The node agent has not yet acted on the latest change of the spec \
                         (status.observedGeneration is behind metadata.generation); it \
                         usually does within seconds.",
                        describe_vh.clone(),
                    );
                }
            }
            if let Some(event) = facts
                .hydration_events
                .iter()
                .filter(|e| e.warning)
                .max_by_key(|e| e.last_seen)
            {
                let current = matches!(
                    (status.phase, event.reason.as_str()),
                    (Some(HydrationPhase::Stalled), "HydrationStalled")
                        | (Some(HydrationPhase::Failed), "HydrationFailed")
                );
                if !current {
                    findings.note(
                        format!(
                            "Latest Warning Event on the VolumeHydration: {}: {}",
                            event.reason,
                            event.message.trim()
                        ),
                        describe_vh.clone(),
                    );
                }
            }
        }
    }

    // The node: is its agent alive, does it still exist?
    if let Some(node) = &facts.node {
        let ended = vh.is_some_and(|vh| HydrationView::of(vh).has_ended());
        match &facts.liveclone_node {
            Some(Lookup::Missing) => findings.problem(
                format!(
                    "Node {node} has no LivecloneNode: the liveclone node agent has never run \
                     there (or its record was deleted), so nothing makes, mounts or copies \
                     this volume."
                ),
                format!(
                    "kubectl get lcnode; kubectl get pods -A -l app.kubernetes.io/component=node \
                     --field-selector spec.nodeName={node}"
                ),
            ),
            Some(Lookup::Found(lcnode)) => {
                let status = lcnode.status.clone().unwrap_or_default();
                if is_stale(&status, facts.now) {
                    let age = status
                        .observed_time
                        .as_ref()
                        .and_then(|t| {
                            std::time::Duration::try_from(facts.now.duration_since(t.0)).ok()
                        })
                        .map_or("never".to_owned(), |d| {
                            format!("{} ago", format_duration(d))
                        });
                    findings.problem(
                        format!(
                            "The node agent on {node} last reported its capacity {age} \
                             (LivecloneNode {node}; stale after {}): it is probably not \
                             running, so nothing on the node acts on this volume{}.",
                            format_duration(stale_after(&status)),
                            if ended { "" } else { " or reports on its copy" }
                        ),
                        format!(
                            "kubectl get lcnode {node}; kubectl get pods -A -l \
                             app.kubernetes.io/component=node --field-selector \
                             spec.nodeName={node}"
                        ),
                    );
                }
            }
            Some(Lookup::Unreadable(why)) => findings.note(
                format!("LivecloneNode {node} could not be read ({why})."),
                format!("kubectl get lcnode {node}"),
            ),
            None => {}
        }
        match &facts.node_object {
            Some(Lookup::Missing) => findings.problem(
                format!(
                    "Node {node}, which holds this volume's data, is not in the cluster: the \
                     volume cannot be used until the node is back (its storage is on it)."
                ),
                "kubectl get nodes".to_owned(),
            ),
            Some(Lookup::Unreadable(why)) => findings.note(
                format!("Node {node} could not be read ({why}); its check is skipped."),
                format!("kubectl get node {node}"),
            ),
            _ => {}
        }
    }

    Diagnosis {
        headline,
        findings: findings.0,
        healthy,
    }
}

fn unreadable(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.is_forbidden() => {
            format!("forbidden: {}", status.message)
        }
        other => other.to_string(),
    }
}

/// A get whose outcome is a [`Lookup`]: missing and forbidden are answers.
async fn lookup<K>(api: Api<K>, name: &str) -> Lookup<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(Some(object)) => Lookup::Found(object),
        Ok(None) => Lookup::Missing,
        Err(e) => Lookup::Unreadable(unreadable(&e)),
    }
}

fn event_fact(event: Event) -> EventFact {
    let last_seen = event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| event.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0));
    EventFact {
        warning: event.type_.as_deref() == Some("Warning"),
        reason: event.reason.unwrap_or_default(),
        message: event.message.unwrap_or_default(),
        last_seen,
    }
}

/// Events about one object (core/v1, which also serves the Events that the
/// agents publish through events.k8s.io/v1).
async fn events_about(client: &Client, namespace: &str, kind: &str, name: &str) -> Vec<EventFact> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind={kind},involvedObject.name={name}"
    ));
    match api.list(&params).await {
        Ok(list) => list.items.into_iter().map(event_fact).collect(),
        // Events are evidence, not the answer: without them the rest stands.
        Err(_) => Vec::new(),
    }
}

/// Reads everything [`diagnose`] needs.
pub async fn gather(client: &Client, namespace: &str, pvc: &str) -> PluginResult<Facts> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let claim = lookup(claims, pvc).await;
    let mut facts = Facts::about_claim(namespace, pvc, claim.clone(), Timestamp::now());
    let Lookup::Found(claim) = claim else {
        return Ok(facts);
    };
    let spec = claim.spec.clone().unwrap_or_default();
    if let Some(class) = &spec.storage_class_name {
        facts.storage_class = Some(lookup(Api::<StorageClass>::all(client.clone()), class).await);
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    facts.consumers = pods.list(&ListParams::default()).await.ok().map(|list| {
        list.items
            .iter()
            .filter(|pod| {
                pod.spec
                    .iter()
                    .flat_map(|s| s.volumes.iter().flatten())
                    .any(|v| {
                        v.persistent_volume_claim
                            .as_ref()
                            .is_some_and(|c| c.claim_name == pvc)
                    })
            })
            .map(|pod| pod.name_any())
            .collect()
    });
    facts.claim_events = events_about(client, namespace, "PersistentVolumeClaim", pvc).await;
    let mut volume_handle = None;
    if let Some(volume_name) = spec.volume_name.as_deref().filter(|n| !n.is_empty()) {
        let volume = lookup(Api::<PersistentVolume>::all(client.clone()), volume_name).await;
        volume_handle = volume
            .found()
            .and_then(|pv| pv.spec.as_ref())
            .and_then(|s| s.csi.as_ref())
            .filter(|csi| csi.driver == super::DRIVER_NAME)
            .map(|csi| csi.volume_handle.clone());
        facts.volume = Some(volume);
    }

    let hydrations: Api<VolumeHydration> = Api::namespaced(client.clone(), namespace);
    match hydrations.list(&ListParams::default()).await {
        Ok(list) => facts.hydration = pick_hydration(list.items, pvc),
        Err(e) if is_not_served(&e) => {
            facts.crds_installed = false;
            return Ok(facts);
        }
        Err(e) => {
            return Err(PluginError::api(
                format!("listing VolumeHydrations in {namespace}"),
                e,
            ))
        }
    }
    if let Some(vh) = &facts.hydration {
        volume_handle.get_or_insert_with(|| vh.spec.destination.volume_handle.clone());
        facts.hydration_events =
            events_about(client, namespace, "VolumeHydration", &vh.name_any()).await;
    }
    let volumes: Api<LivecloneVolume> = Api::all(client.clone());
    facts.liveclone_volume = match &volume_handle {
        Some(handle) => Some(lookup(volumes, handle).await),
        // Not bound yet: the volume may exist already (made, not yet bound),
        // found by the claim it was made for.
        None => match volumes.list(&ListParams::default()).await {
            Ok(list) => list
                .items
                .into_iter()
                .find(|v| {
                    v.spec
                        .claim
                        .as_ref()
                        .is_some_and(|c| c.namespace == namespace && c.name == pvc)
                })
                .map(Lookup::Found),
            Err(e) => Some(Lookup::Unreadable(unreadable(&e))),
        },
    };
    facts.node = facts
        .hydration
        .as_ref()
        .map(|vh| vh.spec.node.clone())
        .or_else(|| {
            facts
                .liveclone_volume
                .as_ref()
                .and_then(Lookup::found)
                .map(|v| v.spec.node.clone())
        });
    if let Some(node) = &facts.node {
        facts.liveclone_node = Some(lookup(Api::<LivecloneNode>::all(client.clone()), node).await);
        facts.node_object = Some(lookup(Api::<Node>::all(client.clone()), node).await);
    }
    Ok(facts)
}

pub async fn run(target: &Target, pvc: &str) -> PluginResult<()> {
    let facts = gather(&target.client, &target.namespace, pvc).await?;
    let diagnosis = diagnose(&facts);
    emit(&diagnosis.render());
    if diagnosis.is_healthy() {
        Ok(())
    } else {
        Err(PluginError::Unhealthy)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeClaimStatus, TypedLocalObjectReference,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;
    use crate::k8s::{LivecloneNodeStatus, VolumeHydrationStatus};

    const NOW: i64 = 1_800_000_000;

    fn claim(phase: &str, class: &str) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("clone".to_owned()),
                namespace: Some("team".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                storage_class_name: Some(class.to_owned()),
                data_source: Some(TypedLocalObjectReference {
                    api_group: None,
                    kind: "PersistentVolumeClaim".to_owned(),
                    name: "data".to_owned(),
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: Some(PersistentVolumeClaimStatus {
                phase: Some(phase.to_owned()),
                ..PersistentVolumeClaimStatus::default()
            }),
        }
    }

    fn class(provisioner: &str, mode: &str) -> StorageClass {
        StorageClass {
            metadata: ObjectMeta {
                name: Some("liveclone".to_owned()),
                ..ObjectMeta::default()
            },
            provisioner: provisioner.to_owned(),
            volume_binding_mode: Some(mode.to_owned()),
            ..StorageClass::default()
        }
    }

    fn hydration(phase: HydrationPhase, paused: bool, message: &str) -> VolumeHydration {
        let mut vh = super::super::fixtures::clone_hydration("clone", paused);
        vh.status = Some(VolumeHydrationStatus {
            phase: Some(phase),
            hydrated_bytes: Some(42),
            total_bytes: Some(100),
            percent: Some(42.0),
            message: (!message.is_empty()).then(|| message.to_owned()),
            ..VolumeHydrationStatus::default()
        });
        vh
    }

    fn lcnode(observed: i64) -> LivecloneNode {
        let mut node = LivecloneNode::new("node-a", Default::default());
        node.status = Some(LivecloneNodeStatus {
            observed_time: Some(Time(Timestamp::from_second(observed).expect("in range"))),
            publish_interval_seconds: Some(30),
            ..LivecloneNodeStatus::default()
        });
        node
    }

    fn facts(claim: PersistentVolumeClaim, class: StorageClass) -> Facts {
        let now = Timestamp::from_second(NOW).expect("in range");
        Facts {
            storage_class: Some(Lookup::Found(class)),
            consumers: Some(Vec::new()),
            ..Facts::about_claim("team", "clone", Lookup::Found(claim), now)
        }
    }

    fn bound_with(vh: VolumeHydration) -> Facts {
        let mut facts = facts(
            claim("Bound", "liveclone"),
            class(DRIVER_NAME, "WaitForFirstConsumer"),
        );
        facts.hydration = Some(vh);
        facts.node = Some("node-a".to_owned());
        facts.liveclone_node = Some(Lookup::Found(lcnode(NOW - 10)));
        facts.node_object = Some(Lookup::Found(Node::default()));
        facts
    }

    fn problems(diagnosis: &Diagnosis) -> Vec<&str> {
        diagnosis
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Problem)
            .map(|f| f.text.as_str())
            .collect()
    }

    #[test]
    fn pending_without_a_consumer_says_so() {
        let d = diagnose(&facts(
            claim("Pending", "liveclone"),
            class(DRIVER_NAME, "WaitForFirstConsumer"),
        ));
        let found = problems(&d);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("no pod in team uses it"), "{}", found[0]);
        assert!(!d.is_healthy());
        assert!(d
            .render()
            .contains("look further: kubectl get pods -n team"));
    }

    #[test]
    fn a_consumer_not_yet_scheduled_is_named() {
        let mut f = facts(
            claim("Pending", "liveclone"),
            class(DRIVER_NAME, "WaitForFirstConsumer"),
        );
        f.consumers = Some(vec!["app-0".to_owned()]);
        let d = diagnose(&f);
        assert!(problems(&d)[0].contains("pod app-0"), "{d:?}");
        assert!(d.findings[0]
            .look
            .contains("kubectl describe pod app-0 -n team"));
    }

    #[test]
    fn provisioning_failures_quote_the_latest_event() {
        let mut claim = claim("Pending", "liveclone");
        claim.metadata.annotations = Some(BTreeMap::from([(
            SELECTED_NODE.to_owned(),
            "node-a".to_owned(),
        )]));
        let mut f = facts(claim, class(DRIVER_NAME, "WaitForFirstConsumer"));
        for (at, message) in [(1, "old failure"), (5, "out of space in class file")] {
            f.claim_events.push(EventFact {
                warning: true,
                reason: "ProvisioningFailed".to_owned(),
                message: message.to_owned(),
                last_seen: Some(Timestamp::from_second(at).expect("in range")),
            });
        }
        let d = diagnose(&f);
        let found = problems(&d);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("out of space in class file"),
            "{}",
            found[0]
        );
    }

    #[test]
    fn another_provisioner_is_not_liveclone() {
        let d = diagnose(&facts(
            claim("Bound", "gp3"),
            class("ebs.csi.aws.com", "Immediate"),
        ));
        assert!(problems(&d)[0].contains("not by liveclone"), "{d:?}");
    }

    #[test]
    fn stalled_failed_and_paused_copies_are_problems() {
        let stalled = diagnose(&bound_with(hydration(
            HydrationPhase::Stalled,
            false,
            "Hydration stalled: I/O error on the source device.",
        )));
        assert!(
            problems(&stalled)[0].contains("Stalled at 42.0%"),
            "{stalled:?}"
        );
        assert!(problems(&stalled)[0].contains("I/O error on the source"));

        let failed = diagnose(&bound_with(hydration(
            HydrationPhase::Failed,
            false,
            "metadata went read-only",
        )));
        assert!(problems(&failed)[0].contains("Failed: metadata went read-only"));

        let paused = diagnose(&bound_with(hydration(HydrationPhase::Hydrating, true, "")));
        assert_eq!(problems(&paused).len(), 1, "{paused:?}");
        assert!(problems(&paused)[0].contains("paused"));
        assert!(paused.findings[0]
            .look
            .contains("kubectl liveclone resume clone -n team"));
    }

    #[test]
    fn a_complete_clone_on_a_live_node_is_healthy() {
        let d = diagnose(&bound_with(hydration(HydrationPhase::Complete, false, "")));
        assert!(d.is_healthy(), "{d:?}");
        let text = d.render();
        assert!(
            text.contains("nothing is wrong: the claim is bound and usable"),
            "{text}"
        );
        assert!(text.contains("independent full copy"), "{text}");
    }

    #[test]
    fn a_hydrating_clone_is_healthy_and_says_how_far() {
        let d = diagnose(&bound_with(hydration(HydrationPhase::Hydrating, false, "")));
        assert!(d.is_healthy(), "{d:?}");
        assert!(d.healthy.contains("Hydrating (42.0% done"), "{}", d.healthy);
    }

    #[test]
    fn stale_or_missing_nodes_are_problems() {
        let mut stale = bound_with(hydration(HydrationPhase::Hydrating, false, ""));
        stale.liveclone_node = Some(Lookup::Found(lcnode(NOW - 600)));
        let d = diagnose(&stale);
        assert!(
            problems(&d)[0].contains("last reported its capacity 10m00s ago"),
            "{d:?}"
        );

        let mut gone = bound_with(hydration(HydrationPhase::Complete, false, ""));
        gone.node_object = Some(Lookup::Missing);
        gone.liveclone_node = Some(Lookup::Missing);
        let d = diagnose(&gone);
        let found = problems(&d);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("has no LivecloneNode"));
        assert!(found[1].contains("is not in the cluster"));
    }

    #[test]
    fn no_crds_means_the_chart_is_missing() {
        let mut f = facts(
            claim("Pending", "liveclone"),
            class(DRIVER_NAME, "Immediate"),
        );
        f.crds_installed = false;
        let d = diagnose(&f);
        assert!(problems(&d)
            .iter()
            .any(|p| p.contains("chart (its CRDs and agents) is not installed")));
    }

    #[test]
    fn a_missing_claim_is_said_plainly() {
        let mut f = facts(claim("Bound", "x"), class(DRIVER_NAME, "Immediate"));
        f.claim = Lookup::Missing;
        let d = diagnose(&f);
        assert_eq!(
            problems(&d),
            ["PersistentVolumeClaim team/clone does not exist."]
        );
    }
}
