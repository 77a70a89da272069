//! The cluster the scenarios run on: kind from deploy/kind/cluster.yaml, the
//! driver image built from the repository's Dockerfile, the VolumeSnapshot
//! CRDs and snapshot-controller, and the chart. Every step is idempotent,
//! so a kept cluster (`LIVECLONE_E2E_KEEP=1`) is reused as it is.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::Tool;
use crate::config::{
    E2eConfig, CONTROLLER_DEPLOYMENT, EXTERNAL_SNAPSHOTTER_TAG, IMAGE_REPOSITORY, IMAGE_TAG,
    NODE_DAEMONSET, NODE_POD_SELECTOR, RELEASE, RELEASE_NAMESPACE,
};
use crate::preflight::{self, HostProbe};

/// external-snapshotter's manifests at [`EXTERNAL_SNAPSHOTTER_TAG`]: the
/// three CRDs, then the controller's RBAC and Deployment (kube-system).
pub fn snapshotter_manifests() -> Vec<String> {
    let base = format!(
        "https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/{EXTERNAL_SNAPSHOTTER_TAG}"
    );
    [
        "client/config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml",
        "client/config/crd/snapshot.storage.k8s.io_volumesnapshotcontents.yaml",
        "client/config/crd/snapshot.storage.k8s.io_volumesnapshots.yaml",
        "deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml",
        "deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml",
    ]
    .iter()
    .map(|path| format!("{base}/{path}"))
    .collect()
}

/// The snapshot-controller image of that release (set explicitly, so the
/// tag is ours whatever the manifest names).
pub fn snapshot_controller_image() -> String {
    format!("registry.k8s.io/sig-storage/snapshot-controller:{EXTERNAL_SNAPSHOTTER_TAG}")
}

/// The `helm upgrade --install` arguments: the agreed local-image settings
/// (docs/E2E.md). `upgrade --install` is `helm install` made idempotent.
pub fn helm_install_args(config: &E2eConfig) -> Vec<String> {
    let chart = config.chart_dir().display().to_string();
    [
        "upgrade",
        "--install",
        RELEASE,
        &chart,
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--kube-context",
        &config.kube_context(),
        "--set",
        &format!("image.repository={IMAGE_REPOSITORY}"),
        "--set",
        &format!("image.tag={IMAGE_TAG}"),
        "--set",
        "image.pullPolicy=Never",
        "--wait",
        "--timeout",
        "10m",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The node kind names the control plane of `cluster`.
pub fn control_plane_node(cluster: &str) -> String {
    format!("{cluster}-control-plane")
}

/// Brings the cluster up once per test process; every scenario calls this
/// first. A failure is remembered, so the other scenarios fail at once
/// with the same message instead of retrying a broken setup.
pub fn ensure_ready(config: &E2eConfig) -> Result<()> {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    SETUP
        .get_or_init(|| setup(config).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!("cluster setup failed: {e}"))
}

fn setup(config: &E2eConfig) -> Result<()> {
    let problems = preflight::check(&HostProbe);
    if !problems.is_empty() {
        bail!(
            "the machine is not ready for the kind suite (docs/E2E.md):\n  - {}",
            problems.join("\n  - ")
        );
    }
    let context = config.kube_context();
    let kubectl = |args: &[&str]| {
        Tool::new("kubectl", Duration::from_secs(300))
            .args(["--context", context.as_str()])
            .args(args.iter().copied())
    };

    let clusters = Tool::new("kind", Duration::from_secs(60))
        .args(["get", "clusters"])
        .capture()?;
    if clusters
        .stdout
        .lines()
        .any(|l| l.trim() == config.cluster_name)
    {
        eprintln!("reusing kind cluster {}", config.cluster_name);
    } else {
        Tool::new("kind", Duration::from_secs(900))
            .args(["create", "cluster", "--name", config.cluster_name.as_str()])
            .arg("--config")
            .arg(config.cluster_config().display().to_string())
            .args(["--wait", "300s"])
            .stream()?;
    }

    let image_id = || -> Option<String> {
        Tool::new("docker", Duration::from_secs(60))
            .args(["image", "inspect", "--format", "{{.Id}}", &config.image()])
            .capture()
            .ok()
            .map(|out| out.stdout.trim().to_owned())
    };
    let before = image_id();
    if !config.skip_build {
        Tool::new("docker", Duration::from_secs(3600))
            .args(["build", "--target", "runtime", "--tag", &config.image()])
            .arg(config.repo_root.display().to_string())
            .stream()?;
    }
    let after = image_id().with_context(|| {
        format!(
            "image {} is not in Docker (LIVECLONE_E2E_SKIP_BUILD=1 needs it built)",
            config.image()
        )
    })?;
    Tool::new("kind", Duration::from_secs(900))
        .args(["load", "docker-image", &config.image()])
        .args(["--name", config.cluster_name.as_str()])
        .stream()?;

    for manifest in snapshotter_manifests() {
        kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &manifest,
        ])
        .stream()?;
    }
    kubectl(&[
        "-n",
        "kube-system",
        "set",
        "image",
        "deployment/snapshot-controller",
        &format!("snapshot-controller={}", snapshot_controller_image()),
    ])
    .capture()?;
    kubectl(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deployment/snapshot-controller",
        "--timeout=300s",
    ])
    .stream()?;

    let release_existed = Tool::new("helm", Duration::from_secs(60))
        .args(["status", RELEASE, "--namespace", RELEASE_NAMESPACE])
        .args(["--kube-context", context.as_str()])
        .capture()
        .is_ok();
    Tool::new("helm", Duration::from_secs(900))
        .args(helm_install_args(config))
        .stream()?;
    // Same tag, new image: Helm sees no change, so the pods would keep
    // running the old build.
    if release_existed && before.as_deref() != Some(after.as_str()) {
        for workload in [
            format!("daemonset/{NODE_DAEMONSET}"),
            format!("deployment/{CONTROLLER_DEPLOYMENT}"),
        ] {
            kubectl(&["-n", RELEASE_NAMESPACE, "rollout", "restart", &workload]).capture()?;
            kubectl(&[
                "-n",
                RELEASE_NAMESPACE,
                "rollout",
                "status",
                &workload,
                "--timeout=300s",
            ])
            .stream()?;
        }
    }
    check_node_plugin_placement(config)
}

/// kind's nodes share one kernel, hence one device-mapper namespace; a node
/// plugin removes `liveclone-*` devices it has no record of when it starts,
/// so two of them on one host would remove each other's volumes. The
/// cluster has one worker for them; the control plane keeps its NoSchedule
/// taint. Checked, not assumed: a chart change that tolerated every taint
/// would otherwise destroy volumes in the middle of a scenario.
fn check_node_plugin_placement(config: &E2eConfig) -> Result<()> {
    let nodes = Tool::new("kubectl", Duration::from_secs(60))
        .args(["--context", config.kube_context().as_str()])
        .args([
            "-n",
            RELEASE_NAMESPACE,
            "get",
            "pods",
            "-l",
            NODE_POD_SELECTOR,
        ])
        .args([
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
        ])
        .capture()?;
    let nodes: Vec<&str> = nodes.stdout.lines().filter(|l| !l.is_empty()).collect();
    check_placement(&nodes, &control_plane_node(&config.cluster_name))
}

/// The rule of [`check_node_plugin_placement`], on node names.
pub fn check_placement(nodes: &[&str], control_plane: &str) -> Result<()> {
    if nodes.len() != 1 || nodes[0] == control_plane {
        bail!(
            "expected exactly one node plugin pod, on the worker; found them on {nodes:?}. \
             kind nodes share the host kernel's device-mapper, and a node plugin removes \
             liveclone devices it has no record of, so two plugins on one host would destroy \
             each other's volumes: the chart must not tolerate the control plane's taint here"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;

    #[test]
    fn helm_gets_the_agreed_image_settings() -> Result<()> {
        let config = E2eConfig::from_vars(&BTreeMap::new(), Path::new("/repo"))?;
        let args = helm_install_args(&config).join(" ");
        assert!(args.starts_with("upgrade --install liveclone /repo/charts/liveclone --namespace liveclone --create-namespace"), "{args}");
        for expected in [
            "--set image.repository=liveclone",
            "--set image.tag=e2e",
            "--set image.pullPolicy=Never",
            "--kube-context kind-liveclone-e2e",
            "--wait",
        ] {
            assert!(args.contains(expected), "{expected:?} not in {args}");
        }
        Ok(())
    }

    #[test]
    fn the_snapshotter_is_pinned() {
        let manifests = snapshotter_manifests();
        assert_eq!(manifests.len(), 5);
        assert!(manifests
            .iter()
            .all(|m| m.contains("/external-snapshotter/v8.7.0/")));
        assert!(snapshot_controller_image().ends_with(":v8.7.0"));
    }

    #[test]
    fn a_node_plugin_on_the_control_plane_is_refused() {
        let cp = control_plane_node("liveclone-e2e");
        assert!(check_placement(&["liveclone-e2e-worker"], &cp).is_ok());
        for nodes in [
            vec!["liveclone-e2e-worker", "liveclone-e2e-control-plane"],
            vec!["liveclone-e2e-control-plane"],
            vec![],
        ] {
            let error = check_placement(&nodes, &cp)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                error.contains("share the host kernel's device-mapper"),
                "{nodes:?}: {error}"
            );
        }
    }
}
