//! One scenario's world: a client for the kind cluster, its own namespace
//! (deleted afterwards, which deletes its claims and so its volumes), waits
//! with deadlines, and on failure a dump of what the driver and the
//! cluster say.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, DynamicObject, LogParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind, ObjectMeta};
use kube::{Client, Config};
use serde_json::{json, Value};

use crate::cluster;
use crate::cmd::Tool;
use crate::config::{E2eConfig, NODE_POD_SELECTOR, RELEASE_NAMESPACE, STORAGE_CLASS};
use crate::manifests;

/// The class with slow hydration the scenarios that act during a copy use
/// (made from the chart's class by [`manifests::slow_storage_class`]).
pub const SLOW_CLASS: &str = "liveclone-e2e-slow";
/// Field manager of everything the suite applies.
const FIELD_MANAGER: &str = "liveclone-e2e";

pub struct Scenario {
    pub config: E2eConfig,
    pub client: Client,
    pub namespace: String,
}

/// Runs `body` in a fresh namespace on the cluster (set up first if
/// needed); dumps diagnostics if it fails; deletes the namespace whatever
/// happened.
pub async fn run<F, Fut>(name: &str, body: F) -> Result<()>
where
    F: FnOnce(Scenario) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let config = E2eConfig::from_env()?;
    // Blocking tool calls; once per process.
    let setup_config = config.clone();
    tokio::task::spawn_blocking(move || cluster::ensure_ready(&setup_config))
        .await
        .context("cluster setup panicked")??;
    let client = client_for(&config).await?;
    ensure_slow_class(&client).await?;
    let namespace = format!("e2e-{name}-{}", unique_suffix());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(namespace.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .with_context(|| format!("creating namespace {namespace}"))?;
    eprintln!("scenario {name}: namespace {namespace}");
    let scenario = Scenario {
        config: config.clone(),
        client: client.clone(),
        namespace: namespace.clone(),
    };
    let dump_scenario = Scenario {
        config,
        client,
        namespace: namespace.clone(),
    };
    let result = body(scenario).await;
    if let Err(error) = &result {
        eprintln!("scenario {name} FAILED: {error:#}");
        dump_scenario.dump();
    }
    let cleanup = dump_scenario.delete_namespace().await;
    match (result, cleanup) {
        (Err(error), _) => Err(error),
        (Ok(()), Err(error)) => Err(error.context(format!("cleaning up after {name}"))),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// A client for the kind cluster's context (not the user's current one).
async fn client_for(config: &E2eConfig) -> Result<Client> {
    let kubeconfig = Kubeconfig::read().context("reading the kubeconfig kind wrote")?;
    let options = KubeConfigOptions {
        context: Some(config.kube_context()),
        ..KubeConfigOptions::default()
    };
    let client_config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .with_context(|| format!("kubeconfig context {}", config.kube_context()))?;
    Client::try_from(client_config).context("building the API client")
}

async fn ensure_slow_class(client: &Client) -> Result<()> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let base = classes
        .get(STORAGE_CLASS)
        .await
        .with_context(|| format!("the chart's StorageClass {STORAGE_CLASS}"))?;
    let slow = manifests::slow_storage_class(&base, SLOW_CLASS)?;
    // StorageClass parameters are immutable: an older class with other
    // parameters is replaced (no volume of the suite outlives a scenario).
    if let Some(existing) = classes.get_opt(SLOW_CLASS).await? {
        if existing.parameters == slow.parameters {
            return Ok(());
        }
        classes.delete(SLOW_CLASS, &DeleteParams::default()).await?;
    }
    classes
        .patch(
            SLOW_CLASS,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&slow),
        )
        .await
        .with_context(|| format!("applying StorageClass {SLOW_CLASS}"))?;
    Ok(())
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id() % 0x1000, nanos % 0x10_0000)
}

/// The VolumeHydration's figures the scenarios look at (its status as
/// crates/liveclone/src/k8s/hydration.rs writes it). Read from the untyped
/// object so that the suite does not build the driver's crate, and its
/// device-mapper bindings, to talk to a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct HydrationView {
    /// Pending, Hydrating, Switching, Complete, Stalled or Failed.
    pub phase: Option<String>,
    pub hydrated_bytes: u64,
    pub total_bytes: u64,
    pub rate: Option<String>,
    pub paused: bool,
}

impl HydrationView {
    pub fn of(vh: &Value) -> Self {
        let status = &vh["status"];
        HydrationView {
            phase: status["phase"].as_str().map(str::to_owned),
            hydrated_bytes: status["hydratedBytes"].as_u64().unwrap_or(0),
            total_bytes: status["totalBytes"].as_u64().unwrap_or(0),
            rate: status["rate"].as_str().map(str::to_owned),
            paused: vh["spec"]["paused"].as_bool().unwrap_or(false),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.phase.as_deref() == Some("Complete")
    }

    pub fn is_failed(&self) -> bool {
        self.phase.as_deref() == Some("Failed")
    }
}

impl Scenario {
    fn pvcs(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn hydrations(&self) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "liveclone.io",
            "v1alpha1",
            "VolumeHydration",
        ));
        Api::namespaced_with(self.client.clone(), &self.namespace, &resource)
    }

    pub async fn create_claim(&self, claim: &PersistentVolumeClaim) -> Result<()> {
        self.pvcs()
            .create(&PostParams::default(), claim)
            .await
            .with_context(|| format!("creating claim {:?}", claim.metadata.name))?;
        Ok(())
    }

    pub async fn create_pod(&self, pod: &Pod) -> Result<()> {
        self.pods()
            .create(&PostParams::default(), pod)
            .await
            .with_context(|| format!("creating pod {:?}", pod.metadata.name))?;
        Ok(())
    }

    pub async fn create_snapshot(&self, name: &str, claim: &str) -> Result<()> {
        let object: DynamicObject =
            serde_json::from_value(manifests::volume_snapshot(name, claim))?;
        self.snapshots()
            .create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("creating VolumeSnapshot {name}"))?;
        Ok(())
    }

    fn snapshots(&self) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshot",
        ));
        Api::namespaced_with(self.client.clone(), &self.namespace, &resource)
    }

    /// Polls `check` every second until it returns `Some`, or fails after
    /// `timeout` with `what` and the last thing seen.
    pub async fn wait_for<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(Option<T>, String)>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check().await {
                Ok((Some(value), _)) => return Ok(value),
                Ok((None, seen)) => seen,
                Err(error) => format!("error: {error:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {}s waiting for {what}; last seen: {last}",
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Waits until the pod has succeeded and returns its log; a failed pod
    /// fails at once with its log.
    pub async fn wait_pod_succeeded(&self, name: &str, timeout: Duration) -> Result<String> {
        self.wait_pod(name, timeout, "Succeeded").await?;
        self.pod_log(name).await
    }

    /// Waits until the pod runs and its script has printed `marker`.
    pub async fn wait_pod_printed(
        &self,
        name: &str,
        marker: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for(
            &format!("pod {name} to print {marker:?}"),
            timeout,
            || async {
                let phase = self.pod_phase(name).await?;
                if phase == "Failed" {
                    let log = self.pod_log(name).await.unwrap_or_default();
                    return Err(anyhow!("pod {name} failed; its log:\n{log}"));
                }
                if phase != "Running" && phase != "Succeeded" {
                    return Ok((None, format!("phase {phase}")));
                }
                let log = self.pod_log(name).await?;
                Ok((
                    log.lines()
                        .any(|l| l.trim() == marker)
                        .then_some(log.clone()),
                    log,
                ))
            },
        )
        .await
    }

    async fn wait_pod(&self, name: &str, timeout: Duration, wanted: &str) -> Result<()> {
        let mut failed_log = None;
        let result = self
            .wait_for(&format!("pod {name} to be {wanted}"), timeout, || async {
                let phase = self.pod_phase(name).await?;
                Ok((
                    (phase == wanted || phase == "Failed").then_some(phase.clone()),
                    phase,
                ))
            })
            .await?;
        if result == "Failed" && wanted != "Failed" {
            failed_log = Some(self.pod_log(name).await.unwrap_or_default());
        }
        if let Some(log) = failed_log {
            bail!("pod {name} failed; its log:\n{log}");
        }
        Ok(())
    }

    async fn pod_phase(&self, name: &str) -> Result<String> {
        let pod = self.pods().get(name).await?;
        Ok(pod
            .status
            .and_then(|s| s.phase)
            .unwrap_or_else(|| "Unknown".to_owned()))
    }

    pub async fn pod_log(&self, name: &str) -> Result<String> {
        self.pods()
            .logs(name, &LogParams::default())
            .await
            .with_context(|| format!("reading pod {name}'s log"))
    }

    pub async fn delete_pod(&self, name: &str) -> Result<()> {
        self.pods().delete(name, &DeleteParams::default()).await?;
        self.wait_for(
            &format!("pod {name} to go"),
            self.config.wait(120),
            || async {
                Ok((
                    self.pods().get_opt(name).await?.is_none().then_some(()),
                    "still there".into(),
                ))
            },
        )
        .await
    }

    pub async fn delete_claim(&self, name: &str) -> Result<()> {
        self.pvcs().delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    pub async fn claim(&self, name: &str) -> Result<Option<PersistentVolumeClaim>> {
        Ok(self.pvcs().get_opt(name).await?)
    }

    /// Writes `mib` MiB of random data on a new claim through a pod and
    /// returns the sha256 the pod printed (of the file, or of the whole
    /// device).
    pub async fn fill(&self, claim: &str, mode: manifests::Mode, mib: u32) -> Result<String> {
        let pod = format!("{claim}-writer");
        let mib = mib.to_string();
        self.create_pod(&manifests::script_pod(
            &pod,
            claim,
            mode,
            manifests::WRITE_SCRIPT,
            &[("MIB", mib.as_str())],
        ))
        .await?;
        let log = self.wait_pod_succeeded(&pod, self.config.wait(600)).await?;
        let sum = manifests::printed_sha256(&log)?;
        // The claim is free again for clones (and for deletion).
        self.delete_pod(&pod).await?;
        Ok(sum)
    }

    /// Starts a pod that checks `claim` holds `expected`; with `hold` it
    /// stays up afterwards.
    pub async fn start_verifier(
        &self,
        pod: &str,
        claim: &str,
        mode: manifests::Mode,
        expected: &str,
        hold: bool,
    ) -> Result<()> {
        self.create_pod(&manifests::script_pod(
            pod,
            claim,
            mode,
            manifests::VERIFY_SCRIPT,
            &[
                ("EXPECTED", expected),
                ("HOLD", if hold { "1" } else { "0" }),
            ],
        ))
        .await
    }

    /// Checks `claim` byte for byte in a new pod, which must print the
    /// expected sum and succeed.
    pub async fn verify(
        &self,
        pod: &str,
        claim: &str,
        mode: manifests::Mode,
        expected: &str,
    ) -> Result<()> {
        self.start_verifier(pod, claim, mode, expected, false)
            .await?;
        let log = self.wait_pod_succeeded(pod, self.config.wait(600)).await?;
        let sum = manifests::printed_sha256(&log)?;
        if sum != expected {
            bail!("{claim}: sha256 {sum}, expected {expected}");
        }
        self.delete_pod(pod).await
    }

    /// The clone's VolumeHydration (named after its claim), if it exists.
    pub async fn hydration(&self, claim: &str) -> Result<Option<HydrationView>> {
        Ok(self
            .hydrations()
            .get_opt(claim)
            .await?
            .map(|vh| HydrationView::of(&vh.data)))
    }

    /// Waits until the clone's VolumeHydration satisfies `done`; a Failed
    /// phase fails at once.
    pub async fn wait_hydration(
        &self,
        claim: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&HydrationView) -> bool,
    ) -> Result<HydrationView> {
        self.wait_for(
            &format!("VolumeHydration {claim}: {what}"),
            timeout,
            || async {
                let Some(view) = self.hydration(claim).await? else {
                    return Ok((None, "no VolumeHydration yet".to_owned()));
                };
                if view.is_failed() {
                    return Err(anyhow!("VolumeHydration {claim} Failed: {view:?}"));
                }
                Ok((done(&view).then_some(view.clone()), format!("{view:?}")))
            },
        )
        .await
    }

    pub async fn wait_complete(&self, claim: &str) -> Result<HydrationView> {
        self.wait_hydration(
            claim,
            "phase Complete",
            self.config.wait(900),
            HydrationView::is_complete,
        )
        .await
    }

    /// Caps (or with `None` uncaps) the clone's copy rate through
    /// spec.tunables.rateLimitBytesPerSecond (a JSON merge patch: null
    /// removes the field).
    pub async fn set_rate_limit(&self, claim: &str, bytes_per_second: Option<u64>) -> Result<()> {
        let patch = json!({"spec": {"tunables": {"rateLimitBytesPerSecond": bytes_per_second}}});
        self.hydrations()
            .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("setting the rate limit of VolumeHydration {claim}"))?;
        Ok(())
    }

    /// `kubectl patch <resource> <name> --type merge -p <patch>`, as a user
    /// would: pausing a copy (`vh`) or expanding a claim (`pvc`).
    pub fn kubectl_merge_patch(&self, resource: &str, name: &str, patch: &Value) -> Result<()> {
        self.kubectl(&[
            "patch",
            resource,
            name,
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ])
        .capture()?;
        Ok(())
    }

    /// `kubectl exec` in a pod of the namespace.
    pub fn exec(&self, pod: &str, command: &[&str]) -> Result<String> {
        let mut args = vec!["exec", pod, "--"];
        args.extend_from_slice(command);
        Ok(self.kubectl(&args).capture()?.stdout)
    }

    fn kubectl(&self, args: &[&str]) -> Tool {
        Tool::new("kubectl", Duration::from_secs(120))
            .args([
                "--context",
                self.config.kube_context().as_str(),
                "-n",
                self.namespace.as_str(),
            ])
            .args(args.iter().copied())
    }

    /// Deletes the node plugin's pod (the DaemonSet makes a new one) and
    /// waits until the new one is ready.
    pub async fn restart_node_plugin(&self) -> Result<()> {
        let context = self.config.kube_context();
        let system = |args: &[&str]| {
            Tool::new("kubectl", Duration::from_secs(300))
                .args(["--context", context.as_str(), "-n", RELEASE_NAMESPACE])
                .args(args.iter().copied())
        };
        system(&["delete", "pod", "-l", NODE_POD_SELECTOR, "--wait=true"]).capture()?;
        system(&[
            "rollout",
            "status",
            "daemonset/liveclone-node",
            "--timeout=300s",
        ])
        .capture()?;
        system(&[
            "wait",
            "pod",
            "-l",
            NODE_POD_SELECTOR,
            "--for=condition=Ready",
            "--timeout=300s",
        ])
        .capture()?;
        Ok(())
    }

    /// Prints what helps to see why a scenario failed. Best effort: each
    /// part that cannot be had says so and the rest goes on.
    pub fn dump(&self) {
        let context = self.config.kube_context();
        let calls: Vec<Vec<&str>> = vec![
            vec![
                "get",
                "vh,pvc,pv,liveclonevolumes,liveclonesnapshots,volumesnapshots",
                "-A",
                "-o",
                "wide",
            ],
            vec![
                "-n",
                self.namespace.as_str(),
                "get",
                "events",
                "--sort-by=.lastTimestamp",
            ],
            vec![
                "-n",
                RELEASE_NAMESPACE,
                "get",
                "events",
                "--sort-by=.lastTimestamp",
            ],
            vec!["-n", self.namespace.as_str(), "get", "vh", "-o", "yaml"],
            vec!["-n", self.namespace.as_str(), "describe", "pods"],
            vec!["-n", RELEASE_NAMESPACE, "get", "pods", "-o", "wide"],
            vec![
                "-n",
                RELEASE_NAMESPACE,
                "logs",
                "-l",
                NODE_POD_SELECTOR,
                "--all-containers",
                "--prefix",
                "--tail=400",
            ],
            vec![
                "-n",
                RELEASE_NAMESPACE,
                "logs",
                "deployment/liveclone-controller",
                "--all-containers",
                "--prefix",
                "--tail=200",
            ],
        ];
        for args in calls {
            let tool = Tool::new("kubectl", Duration::from_secs(60))
                .args(["--context", context.as_str()])
                .args(args);
            eprintln!("===== {}", tool.display());
            match tool.capture() {
                Ok(out) => eprintln!("{}", out.stdout),
                Err(error) => eprintln!("(failed: {error:#})"),
            }
        }
    }

    /// Deletes the namespace and waits until it is gone (its claims, hence
    /// the volumes on the node, go with it).
    async fn delete_namespace(&self) -> Result<()> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces
            .delete(&self.namespace, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting namespace {}", self.namespace))?;
        self.wait_for(
            &format!("namespace {} to go", self.namespace),
            self.config.wait(300),
            || async {
                Ok((
                    namespaces
                        .get_opt(&self.namespace)
                        .await?
                        .is_none()
                        .then_some(()),
                    "still terminating".to_owned(),
                ))
            },
        )
        .await
    }
}
