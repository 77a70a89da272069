//! Where the Kubernetes binaries are: the contract with
//! `tests/tools/build-k8s-tools.sh`.
//!
//! Each binary is looked up, first match wins:
//!
//! 1. its own environment variable (`LIVECLONE_KUBE_APISERVER`, ...);
//! 2. for etcd, kube-apiserver and kubectl: `$KUBEBUILDER_ASSETS/<name>`,
//!    envtest's convention, when that file exists;
//! 3. the env file written by the script: `$LIVECLONE_K8S_ENV` if set, else
//!    `k8s.env` in the tools cache (`$LIVECLONE_TOOLS_CACHE`, else
//!    `$XDG_CACHE_HOME/liveclone/tools`, else `~/.cache/liveclone/tools`,
//!    else `/var/cache/liveclone/tools`, as the script resolves it).
//!
//! The env file holds `KEY=VALUE` lines (values unquoted, absolute paths);
//! blank lines and lines starting with `#` are ignored.

use std::collections::HashMap;
use std::env;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The script that builds the binaries, relative to the repository root.
pub const BUILD_SCRIPT: &str = "tests/tools/build-k8s-tools.sh";
/// Names the env file explicitly.
pub const ENV_FILE_VAR: &str = "LIVECLONE_K8S_ENV";

/// One binary or folder the harness can look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Etcd,
    KubeApiserver,
    Kubectl,
    CsiProvisioner,
    CsiSnapshotter,
    SnapshotController,
    /// A folder holding the VolumeSnapshot, VolumeSnapshotContent and
    /// VolumeSnapshotClass CRDs.
    SnapshotCrds,
    /// helm, for the chart's test (`crates/liveclone/tests/k8s_chart.rs`).
    Helm,
    /// A folder holding prometheus-operator's ServiceMonitor CRD, so that
    /// the chart's optional ServiceMonitor can be checked by the API server.
    PrometheusCrds,
}

impl Tool {
    pub const ALL: [Tool; 9] = [
        Tool::Etcd,
        Tool::KubeApiserver,
        Tool::Kubectl,
        Tool::CsiProvisioner,
        Tool::CsiSnapshotter,
        Tool::SnapshotController,
        Tool::SnapshotCrds,
        Tool::Helm,
        Tool::PrometheusCrds,
    ];

    /// The key in the env file, also the environment variable that overrides it.
    pub fn key(self) -> &'static str {
        match self {
            Tool::Etcd => "LIVECLONE_ETCD",
            Tool::KubeApiserver => "LIVECLONE_KUBE_APISERVER",
            Tool::Kubectl => "LIVECLONE_KUBECTL",
            Tool::CsiProvisioner => "LIVECLONE_CSI_PROVISIONER",
            Tool::CsiSnapshotter => "LIVECLONE_CSI_SNAPSHOTTER",
            Tool::SnapshotController => "LIVECLONE_SNAPSHOT_CONTROLLER",
            Tool::SnapshotCrds => "LIVECLONE_SNAPSHOT_CRDS",
            Tool::Helm => "LIVECLONE_HELM",
            Tool::PrometheusCrds => "LIVECLONE_PROMETHEUS_CRDS",
        }
    }

    /// The file name in `KUBEBUILDER_ASSETS`, for the three envtest ships.
    fn asset_name(self) -> Option<&'static str> {
        match self {
            Tool::Etcd => Some("etcd"),
            Tool::KubeApiserver => Some("kube-apiserver"),
            Tool::Kubectl => Some("kubectl"),
            _ => None,
        }
    }

    fn is_folder(self) -> bool {
        matches!(self, Tool::SnapshotCrds | Tool::PrometheusCrds)
    }
}

/// Where each tool was found.
#[derive(Debug, Clone)]
pub struct Tools {
    found: HashMap<&'static str, PathBuf>,
    /// What was consulted, for error messages.
    env_file: PathBuf,
    env_file_present: bool,
}

impl Tools {
    /// Looks every tool up (see the module documentation). Fails only on
    /// something malformed (an unreadable env file); a missing tool is
    /// reported by [`Tools::get`].
    pub fn locate() -> Result<Self> {
        let env_file = env_file_path();
        let file_values = match fs::read_to_string(&env_file) {
            Ok(text) => Some(parse_env_file(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", env_file.display()));
            }
        };
        let assets = non_empty_var("KUBEBUILDER_ASSETS").map(PathBuf::from);
        let mut found = HashMap::new();
        for tool in Tool::ALL {
            let from_var = non_empty_var(tool.key()).map(PathBuf::from);
            let from_assets = assets
                .as_ref()
                .zip(tool.asset_name())
                .map(|(dir, name)| dir.join(name))
                .filter(|path| path.is_file());
            let from_file = file_values
                .as_ref()
                .and_then(|values| values.get(tool.key()))
                .map(PathBuf::from);
            if let Some(path) = from_var.or(from_assets).or(from_file) {
                found.insert(tool.key(), path);
            }
        }
        Ok(Self {
            found,
            env_file,
            env_file_present: file_values.is_some(),
        })
    }

    /// The path of `tool`, checked: an executable file (or, for the CRDs, a
    /// folder). The error says how to get it.
    pub fn get(&self, tool: Tool) -> Result<&Path> {
        let Some(path) = self.found.get(tool.key()) else {
            let where_looked = if self.env_file_present {
                format!("{} has no {}", self.env_file.display(), tool.key())
            } else {
                format!("{} does not exist", self.env_file.display())
            };
            let assets = match tool.asset_name() {
                Some(name) => format!(", no {name} in $KUBEBUILDER_ASSETS"),
                None => String::new(),
            };
            bail!(
                "{key} is not set{assets} and {where_looked}. Build the Kubernetes test \
                 tools first: run {BUILD_SCRIPT} (pinned versions, cached; the first run \
                 compiles for several minutes)",
                key = tool.key(),
            );
        };
        check_usable(tool, path).with_context(|| {
            format!(
                "{} = {} is not usable; run {BUILD_SCRIPT} to (re)build the Kubernetes test tools",
                tool.key(),
                path.display()
            )
        })?;
        Ok(path)
    }

    /// The env file that was (or would have been) read.
    pub fn env_file(&self) -> &Path {
        &self.env_file
    }
}

fn check_usable(tool: Tool, path: &Path) -> Result<()> {
    if !path.is_absolute() {
        bail!("not an absolute path");
    }
    let meta = fs::metadata(path).context("cannot stat it")?;
    if tool.is_folder() {
        if !meta.is_dir() {
            bail!("not a folder");
        }
    } else if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("not an executable file");
    }
    Ok(())
}

fn non_empty_var(name: &str) -> Option<OsString> {
    env::var_os(name).filter(|value| !value.is_empty())
}

/// `$LIVECLONE_K8S_ENV`, or `k8s.env` in the tools cache, resolved as the
/// build scripts do.
pub fn env_file_path() -> PathBuf {
    if let Some(path) = non_empty_var(ENV_FILE_VAR) {
        return PathBuf::from(path);
    }
    let root = if let Some(dir) = non_empty_var("LIVECLONE_TOOLS_CACHE") {
        PathBuf::from(dir)
    } else {
        let cache = if let Some(xdg) = non_empty_var("XDG_CACHE_HOME") {
            PathBuf::from(xdg)
        } else if let Some(home) = non_empty_var("HOME") {
            PathBuf::from(home).join(".cache")
        } else {
            PathBuf::from("/var/cache")
        };
        cache.join("liveclone").join("tools")
    };
    root.join("k8s.env")
}

/// `KEY=VALUE` lines; the value is the rest of the line, unquoted.
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .filter(|(key, value)| !key.is_empty() && !value.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_scripts_format() {
        let values = parse_env_file(
            "# comment\n\nLIVECLONE_ETCD=/c/etcd-3.4.23-4+b4/etcd\n\
             LIVECLONE_KUBECTL=/c/kubectl-v1.33.13/kubectl\r\nBROKEN\nEMPTY=\n",
        );
        assert_eq!(values.len(), 2);
        assert_eq!(values["LIVECLONE_ETCD"], "/c/etcd-3.4.23-4+b4/etcd");
        assert_eq!(values["LIVECLONE_KUBECTL"], "/c/kubectl-v1.33.13/kubectl");
    }

    #[test]
    fn missing_tool_names_the_script() {
        let tools = Tools {
            found: HashMap::new(),
            env_file: PathBuf::from("/nowhere/k8s.env"),
            env_file_present: false,
        };
        let message = format!(
            "{:#}",
            tools
                .get(Tool::KubeApiserver)
                .expect_err("nothing was found")
        );
        assert!(message.contains(BUILD_SCRIPT), "{message}");
        assert!(message.contains("LIVECLONE_KUBE_APISERVER"), "{message}");
        assert!(message.contains("KUBEBUILDER_ASSETS"), "{message}");
    }

    #[test]
    fn a_non_executable_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("kubectl");
        fs::write(&file, b"").expect("write file");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).expect("chmod");
        let tools = Tools {
            found: HashMap::from([(Tool::Kubectl.key(), file)]),
            env_file: PathBuf::from("/nowhere/k8s.env"),
            env_file_present: true,
        };
        let message = format!(
            "{:#}",
            tools.get(Tool::Kubectl).expect_err("not executable")
        );
        assert!(message.contains("not an executable file"), "{message}");
        assert!(message.contains(BUILD_SCRIPT), "{message}");
    }
}
