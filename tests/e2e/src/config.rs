//! The suite's settings, from environment variables (read once; parsed by a
//! pure function so that the rules are unit-tested).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The kind cluster's default name (also `deploy/kind/demo.sh`'s).
pub const DEFAULT_CLUSTER_NAME: &str = "liveclone-e2e";
/// The image the suite builds and loads (docs/E2E.md, the agreed interface).
pub const IMAGE_REPOSITORY: &str = "liveclone";
pub const IMAGE_TAG: &str = "e2e";
/// The Helm release and its namespace.
pub const RELEASE: &str = "liveclone";
pub const RELEASE_NAMESPACE: &str = "liveclone";
/// The chart's StorageClass and VolumeSnapshotClass (charts/liveclone).
pub const STORAGE_CLASS: &str = "liveclone";
pub const SNAPSHOT_CLASS: &str = "liveclone";
/// The node plugin's DaemonSet and its pods' component label.
pub const NODE_DAEMONSET: &str = "liveclone-node";
pub const NODE_POD_SELECTOR: &str = "app.kubernetes.io/component=node";
pub const CONTROLLER_DEPLOYMENT: &str = "liveclone-controller";
/// external-snapshotter release whose CRDs and snapshot-controller are
/// installed: the same tag as the binaries of the apiserver tests
/// (docs/K8S-TESTING.md).
pub const EXTERNAL_SNAPSHOTTER_TAG: &str = "v8.7.0";
/// The image of the test pods: small, with sh, dd, sha256sum, df and
/// blockdev (busybox applets).
pub const WORKLOAD_IMAGE: &str = "busybox:1.37.0";

/// Settings of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2eConfig {
    /// `LIVECLONE_E2E_CLUSTER`: the kind cluster's name.
    pub cluster_name: String,
    /// `LIVECLONE_E2E_KEEP=1`: leave the cluster (and the release) for the
    /// next run; `make e2e` deletes it otherwise.
    pub keep: bool,
    /// `LIVECLONE_E2E_SKIP_BUILD=1`: use the `liveclone:e2e` image already
    /// in Docker (loaded into the nodes all the same).
    pub skip_build: bool,
    /// `LIVECLONE_E2E_TIMEOUT_SCALE`: multiplies every wait (slow disks,
    /// busy laptops); 1 by default.
    pub timeout_scale: u32,
    /// The repository's root (Dockerfile, charts/, deploy/kind/).
    pub repo_root: PathBuf,
}

impl E2eConfig {
    /// From the process environment.
    pub fn from_env() -> Result<Self> {
        let vars: BTreeMap<String, String> = std::env::vars()
            .filter(|(name, _)| name.starts_with("LIVECLONE_E2E_"))
            .collect();
        Self::from_vars(&vars, &default_repo_root())
    }

    /// From `vars` (only the `LIVECLONE_E2E_*` ones are looked at).
    pub fn from_vars(vars: &BTreeMap<String, String>, repo_root: &Path) -> Result<Self> {
        let get = |name: &str| vars.get(name).map(String::as_str);
        let cluster_name = match get("LIVECLONE_E2E_CLUSTER") {
            None | Some("") => DEFAULT_CLUSTER_NAME.to_owned(),
            Some(name) => {
                check_cluster_name(name)?;
                name.to_owned()
            }
        };
        let timeout_scale = match get("LIVECLONE_E2E_TIMEOUT_SCALE") {
            None | Some("") => 1,
            Some(text) => match text.parse::<u32>() {
                Ok(scale) if (1..=20).contains(&scale) => scale,
                _ => bail!(
                    "LIVECLONE_E2E_TIMEOUT_SCALE={text:?}: expected a whole number from 1 to 20"
                ),
            },
        };
        Ok(E2eConfig {
            cluster_name,
            keep: parse_flag("LIVECLONE_E2E_KEEP", get("LIVECLONE_E2E_KEEP"))?,
            skip_build: parse_flag("LIVECLONE_E2E_SKIP_BUILD", get("LIVECLONE_E2E_SKIP_BUILD"))?,
            timeout_scale,
            repo_root: repo_root.to_path_buf(),
        })
    }

    /// The kubectl context kind writes for the cluster.
    pub fn kube_context(&self) -> String {
        format!("kind-{}", self.cluster_name)
    }

    /// `name:tag` of the driver image.
    pub fn image(&self) -> String {
        format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}")
    }

    pub fn cluster_config(&self) -> PathBuf {
        self.repo_root.join("deploy/kind/cluster.yaml")
    }

    pub fn chart_dir(&self) -> PathBuf {
        self.repo_root.join("charts/liveclone")
    }

    /// A wait of `seconds`, scaled.
    pub fn wait(&self, seconds: u64) -> std::time::Duration {
        std::time::Duration::from_secs(seconds.saturating_mul(u64::from(self.timeout_scale)))
    }
}

/// `tests/e2e/../..`: Cargo runs tests with the package's folder as the
/// working directory, but the manifest path is exact wherever it runs.
fn default_repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A yes/no variable: unset, empty, `0`, `false`, `no` are no; `1`,
/// `true`, `yes` are yes; anything else is an error (a typo must not
/// silently delete a cluster someone meant to keep).
pub fn parse_flag(name: &str, value: Option<&str>) -> Result<bool> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("0") | Some("false") | Some("no") => Ok(false),
        Some("1") | Some("true") | Some("yes") => Ok(true),
        Some(other) => bail!("{name}={other:?}: expected 1 or 0 (or true/false, yes/no)"),
    }
}

/// kind names clusters (and their Docker containers) after this; keep it a
/// DNS label so that node names and contexts stay valid.
fn check_cluster_name(name: &str) -> Result<()> {
    let valid = name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !valid {
        bail!("LIVECLONE_E2E_CLUSTER={name:?}: expected lowercase letters, digits and '-', at most 40");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults() -> Result<()> {
        let config = E2eConfig::from_vars(&vars(&[]), Path::new("/repo"))?;
        assert_eq!(config.cluster_name, "liveclone-e2e");
        assert!(!config.keep);
        assert!(!config.skip_build);
        assert_eq!(config.timeout_scale, 1);
        assert_eq!(config.kube_context(), "kind-liveclone-e2e");
        assert_eq!(config.image(), "liveclone:e2e");
        assert_eq!(
            config.cluster_config(),
            Path::new("/repo/deploy/kind/cluster.yaml")
        );
        Ok(())
    }

    #[test]
    fn flags_and_names() -> Result<()> {
        let config = E2eConfig::from_vars(
            &vars(&[
                ("LIVECLONE_E2E_KEEP", "1"),
                ("LIVECLONE_E2E_SKIP_BUILD", "yes"),
                ("LIVECLONE_E2E_CLUSTER", "lc-2"),
                ("LIVECLONE_E2E_TIMEOUT_SCALE", "3"),
            ]),
            Path::new("/r"),
        )?;
        assert!(config.keep && config.skip_build);
        assert_eq!(config.cluster_name, "lc-2");
        assert_eq!(config.wait(10), std::time::Duration::from_secs(30));
        Ok(())
    }

    #[test]
    fn typos_are_errors_not_defaults() {
        for (name, value) in [
            ("LIVECLONE_E2E_KEEP", "ye"),
            ("LIVECLONE_E2E_CLUSTER", "My_Cluster"),
            ("LIVECLONE_E2E_CLUSTER", "-x"),
            ("LIVECLONE_E2E_TIMEOUT_SCALE", "0"),
            ("LIVECLONE_E2E_TIMEOUT_SCALE", "fast"),
        ] {
            let result = E2eConfig::from_vars(&vars(&[(name, value)]), Path::new("/r"));
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.starts_with(name), "{name}={value}: {message}");
        }
    }
}
