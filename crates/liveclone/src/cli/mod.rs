//! The `liveclone` command line.

pub mod crdgen;
pub mod device_classes;
pub mod hydration;
pub mod serve;
pub mod status;

use clap::{Parser, Subcommand, ValueEnum};

/// liveclone: a CSI driver whose clones are usable at once and become
/// independent copies in the background (Linux dm-clone).
#[derive(Debug, Parser)]
#[command(name = "liveclone", version, about)]
pub struct Cli {
    /// Log lines as JSON objects (for log collectors) instead of text.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CSI Controller service (and Identity) for this node's pool.
    Controller(serve::ServeArgs),
    /// Serve the CSI Node service (and Identity): stage, publish, stats.
    Node(serve::ServeArgs),
    /// Controller and Node in one process with state in a local folder:
    /// no Kubernetes needed (csi-sanity, Nomad, the VM tests).
    Standalone(serve::ServeArgs),
    /// Every volume and hydration on this node.
    Status(status::StatusArgs),
    /// Pause, resume or tune a clone's hydration.
    Hydration(hydration::HydrationArgs),
    /// Print the CustomResourceDefinitions of Kubernetes mode as YAML.
    Crdgen(crdgen::CrdgenArgs),
}

/// Default socket of a running driver, shared by every client command.
pub const DEFAULT_ENDPOINT: &str = "unix:///csi/csi.sock";

/// Writes command output to stdout; `false` when the reader went away
/// (`liveclone status | head`). That is not an error worth a panic or a
/// message: the output simply ends, as with other command-line tools.
pub(crate) fn emit(text: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::anyhow!("writing to stdout: {e}")),
    }
}
