//! `kubectl-liveclone`, the kubectl plugin (`kubectl liveclone ...`): what
//! people ask of a cluster's clones, answered from the custom resources of
//! [`crate::k8s`] and the core objects around them.
//!
//! * [`status`]: every VolumeHydration with a progress bar, rate and ETA;
//!   `--watch` redraws from a watch of the API until the copies end.
//! * [`edit`]: `pause`, `resume` and `tune`, server-side applies of the
//!   user's fields of a VolumeHydration (`spec.paused`, `spec.tunables`)
//!   under the field manager [`FIELD_MANAGER`].
//! * [`why`]: plain sentences on why a clone is not (yet) usable or not
//!   (yet) independent of its source, each with a command to look further.
//!
//! The plugin talks to the API server as kubectl would (KUBECONFIG,
//! `--kubeconfig`, `--context`, `-n`, `-A`); kubectl does not pass its own
//! global flags to plugins, so the plugin takes them itself.

pub mod edit;
#[cfg(test)]
mod fixtures;
pub mod render;
pub mod status;
pub mod why;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};

use crate::k8s::VolumeHydration;

/// Field manager of every write the plugin makes: `managedFields` then say
/// which of a VolumeHydration's fields a user set through the plugin.
pub const FIELD_MANAGER: &str = "kubectl-liveclone";

/// The CSI driver name, as StorageClasses and PersistentVolumes carry it.
pub const DRIVER_NAME: &str = "csi.liveclone.io";

/// What to tell a user whose cluster does not serve liveclone's resources.
pub const NOT_INSTALLED: &str = "this cluster does not serve liveclone's custom resources \
     (volumehydrations.liveclone.io and the others): the liveclone chart is not installed. \
     Install it with `helm install liveclone charts/liveclone -n liveclone --create-namespace`, \
     or check with `kubectl get crd volumehydrations.liveclone.io`";

/// `kubectl liveclone`: live clones' hydration, pausing, tuning and diagnosis.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-liveclone",
    bin_name = "kubectl liveclone",
    version,
    about = "Watch, pause, resume, tune and diagnose liveclone clones (csi.liveclone.io)",
    after_help = "Exit codes: 0 done (or, for `why`, nothing is wrong); 1 refused, not found, \
                  or `why` found something; 2 bad usage; 3 the cluster could not be reached or \
                  does not have liveclone installed; 130 interrupted."
)]
pub struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace (default: the context's, else `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every hydration (or one PVC's) with progress, rate, ETA, phase and node.
    Status(StatusArgs),
    /// Pause a clone's background copy (spec.paused=true); the clone stays usable.
    Pause(PvcArg),
    /// Resume a paused clone's background copy (spec.paused=false).
    Resume(PvcArg),
    /// Set or clear a clone's copy tunables (spec.tunables), in regions.
    Tune(TuneArgs),
    /// Explain why a clone is not (yet) usable or not (yet) independent.
    Why(PvcArg),
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only the hydration of this PersistentVolumeClaim.
    pub pvc: Option<String>,
    /// Hydrations of every namespace.
    #[arg(short = 'A', long, conflicts_with = "pvc")]
    pub all_namespaces: bool,
    /// Redraw on every change until all copies have ended (or Ctrl-C).
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table with progress bars.
    Human,
    /// JSON (one document; with --watch, one line per change).
    Json,
}

#[derive(Debug, clap::Args)]
pub struct PvcArg {
    /// The clone's PersistentVolumeClaim.
    pub pvc: String,
}

#[derive(Debug, clap::Args)]
pub struct TuneArgs {
    /// The clone's PersistentVolumeClaim.
    pub pvc: String,
    /// Regions copied at once at most (dm-clone's hydration_threshold).
    #[arg(long, value_name = "REGIONS")]
    pub threshold: Option<u32>,
    /// Regions copied together in one batch (dm-clone's hydration_batch_size).
    #[arg(long, value_name = "REGIONS")]
    pub batch: Option<u32>,
    /// Average copy rate at most, in bytes per second with a binary suffix
    /// (e.g. 50MiB): a throttle for a copy that competes with the pod.
    #[arg(long, value_name = "BYTES", value_parser = parse_rate_limit)]
    pub rate_limit: Option<u64>,
    /// Lift the rate limit.
    #[arg(long, conflicts_with = "rate_limit")]
    pub no_rate_limit: bool,
    /// Clear every tunable: back to the StorageClass's values or the defaults.
    #[arg(long, conflicts_with_all = ["threshold", "batch", "rate_limit", "no_rate_limit"])]
    pub reset: bool,
}

impl TuneArgs {
    /// Whether the command asks for any change at all.
    pub fn changes_something(&self) -> bool {
        self.reset
            || self.threshold.is_some()
            || self.batch.is_some()
            || self.rate_limit.is_some()
            || self.no_rate_limit
    }
}

/// `--rate-limit`: a byte size (the StorageClass parameters' syntax), at
/// least 1 byte per second.
fn parse_rate_limit(value: &str) -> Result<u64, String> {
    match crate::domain::sizing::parse_byte_size(value.trim()) {
        Some(0) => Err("a rate limit of 0 would stop the copy; use pause for that".to_owned()),
        Some(bytes) => Ok(bytes),
        None => Err(format!(
            "{value:?} is not a byte size: digits with an optional Ki, Mi or Gi (KiB, MiB, GiB) suffix"
        )),
    }
}

/// Why a command did not do what was asked; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The request makes no sense for this object (not a clone, finished,
    /// out of bounds, not found), or `why` found something wrong.
    #[error("{0}")]
    Refused(String),
    /// `why` printed its findings; nothing more to say.
    #[error("something needs attention (see above)")]
    Unhealthy,
    /// The cluster does not serve the CRDs.
    #[error("{NOT_INSTALLED}")]
    NotInstalled,
    /// The kubeconfig could not be used.
    #[error("{0}")]
    Config(String),
    /// The API server refused or failed a request.
    #[error("{doing}: {source}")]
    Api {
        doing: String,
        #[source]
        source: kube::Error,
    },
    /// Ctrl-C during `--watch`.
    #[error("interrupted")]
    Interrupted,
}

impl PluginError {
    /// The process exit code (see the `--help` text).
    pub fn exit_code(&self) -> u8 {
        match self {
            PluginError::Refused(_) | PluginError::Unhealthy => 1,
            PluginError::NotInstalled | PluginError::Config(_) | PluginError::Api { .. } => 3,
            PluginError::Interrupted => 130,
        }
    }

    pub(crate) fn api(doing: impl Into<String>, source: kube::Error) -> Self {
        PluginError::Api {
            doing: doing.into(),
            source,
        }
    }
}

pub type PluginResult<T> = Result<T, PluginError>;

/// The client and namespace the flags and kubeconfig select.
pub struct Target {
    pub client: Client,
    pub namespace: String,
}

/// Builds the client as kubectl would: `--kubeconfig` else KUBECONFIG (a
/// list of files, merged) else `~/.kube/config`, then in-cluster config as
/// a last resort (the plugin run from a pod); `--context` picks the context.
pub async fn connect(cli: &Cli) -> PluginResult<Target> {
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                PluginError::Config(format!("reading kubeconfig {}: {e}", path.display()))
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| {
                    PluginError::Config(format!("using kubeconfig {}: {e}", path.display()))
                })?
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| PluginError::Config(format!("loading the kubeconfig: {e}")))?,
        None => Config::infer().await.map_err(|e| {
            PluginError::Config(format!(
                "no usable kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster config: {e}"
            ))
        })?,
    };
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)
        .map_err(|e| PluginError::Config(format!("making the API client: {e}")))?;
    Ok(Target { client, namespace })
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> PluginResult<()> {
    let target = connect(&cli).await?;
    match cli.command {
        Command::Status(args) => status::run(&target, &args).await,
        Command::Pause(arg) => edit::set_paused(&target, &arg.pvc, true).await,
        Command::Resume(arg) => edit::set_paused(&target, &arg.pvc, false).await,
        Command::Tune(args) => edit::tune(&target, &args).await,
        Command::Why(arg) => why::run(&target, &arg.pvc).await,
    }
}

/// Writes `text` to stdout. A closed pipe (`| head`) is not an error worth
/// a panic or a message.
pub(crate) fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Whether an API error says the resource type itself is not served: a
/// list of a CRD that is not installed answers a bare 404 ("404 page not
/// found", no Status body, so no reason to go by: the code decides). A list
/// in a namespace that does not exist answers an empty list, not a 404.
pub(crate) fn is_not_served(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// The VolumeHydration of claim `pvc` in `namespace`, found by `spec.pvc`
/// (the controller names it after the claim, but the spec is what counts).
/// `None` when there is none.
pub(crate) async fn find_hydration(
    client: &Client,
    namespace: &str,
    pvc: &str,
) -> PluginResult<Option<VolumeHydration>> {
    let api: Api<VolumeHydration> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&ListParams::default()).await.map_err(|e| {
        if is_not_served(&e) {
            PluginError::NotInstalled
        } else {
            PluginError::api(format!("listing VolumeHydrations in {namespace}"), e)
        }
    })?;
    Ok(pick_hydration(list.items, pvc))
}

/// Of the VolumeHydrations of a namespace, the one of claim `pvc`; if
/// several name it (the controller makes one, but anyone may create more),
/// the one named after the claim, else the oldest.
pub(crate) fn pick_hydration(items: Vec<VolumeHydration>, pvc: &str) -> Option<VolumeHydration> {
    let mut matching: Vec<VolumeHydration> =
        items.into_iter().filter(|vh| vh.spec.pvc == pvc).collect();
    matching.sort_by(|a, b| {
        (a.name_any() != pvc, a.metadata.creation_timestamp.clone())
            .cmp(&(b.name_any() != pvc, b.metadata.creation_timestamp.clone()))
    });
    matching.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_command() {
        let cli = Cli::try_parse_from([
            "kubectl-liveclone",
            "status",
            "-n",
            "team-a",
            "--context",
            "prod",
            "-o",
            "json",
        ])
        .expect("parses");
        assert_eq!(cli.namespace.as_deref(), Some("team-a"));
        assert_eq!(cli.context.as_deref(), Some("prod"));
        let Command::Status(args) = cli.command else {
            panic!("status expected");
        };
        assert_eq!(args.output, Output::Json);
        assert!(Cli::try_parse_from(["kubectl-liveclone", "status", "-A", "pvc"]).is_err());
        assert!(
            Cli::try_parse_from(["kubectl-liveclone", "tune", "c", "--reset", "--batch", "2"])
                .is_err()
        );
    }

    #[test]
    fn the_rate_limit_takes_binary_sizes_and_refuses_zero() {
        let tune = |args: &[&str]| {
            let mut argv = vec!["kubectl-liveclone", "tune", "clone"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Tune(args) => args,
                _ => panic!("tune expected"),
            })
        };
        let limited = tune(&["--rate-limit", "50MiB"]).expect("parses");
        assert_eq!(limited.rate_limit, Some(50 << 20));
        assert!(limited.changes_something());
        assert_eq!(
            tune(&["--rate-limit", "4096"]).expect("parses").rate_limit,
            Some(4096)
        );
        for bad in ["0", "50MB", "fast", "-1"] {
            assert!(tune(&["--rate-limit", bad]).is_err(), "{bad}");
        }
        assert!(tune(&["--rate-limit", "1Mi", "--no-rate-limit"]).is_err());
        assert!(tune(&["--reset", "--no-rate-limit"]).is_err());
        assert!(tune(&["--no-rate-limit"])
            .expect("parses")
            .changes_something());
        assert!(!tune(&[]).expect("parses").changes_something());
    }

    #[test]
    fn exit_codes_tell_refusals_from_cluster_trouble() {
        assert_eq!(PluginError::Refused("no".into()).exit_code(), 1);
        assert_eq!(PluginError::Unhealthy.exit_code(), 1);
        assert_eq!(PluginError::NotInstalled.exit_code(), 3);
        assert_eq!(PluginError::Interrupted.exit_code(), 130);
    }
}
