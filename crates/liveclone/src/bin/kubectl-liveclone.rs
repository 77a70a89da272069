//! `kubectl-liveclone`, the kubectl plugin: `kubectl liveclone --help`.
//! Parses the command line, runs [`liveclone::kubectl::run`], and maps its
//! outcome to the exit code documented in `--help` and docs/KUBECTL-PLUGIN.md.

use std::process::ExitCode;

use clap::Parser;
use liveclone::kubectl::{self, Cli, PluginError};

fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's convention), before any connection.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kubectl-liveclone: starting the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(kubectl::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `why` has printed its findings already.
        Err(PluginError::Unhealthy) => ExitCode::from(PluginError::Unhealthy.exit_code()),
        Err(error) => {
            eprintln!("kubectl-liveclone: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
