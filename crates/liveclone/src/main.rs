//! The `liveclone` binary: see `liveclone --help`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use liveclone::cli::{self, Cli, Command, LogFormat};
use liveclone::os::dm::ioctl::DmIoctl;
use liveclone::os::fs::linux::LinuxFilesystems;
use liveclone::os::kernel::LinuxKernel;
use liveclone::os::loopdev::ioctl::KernelLoops;
use liveclone::os::Os;
use std::sync::Arc;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).init(),
    }
}

/// The real Linux implementations of the OS layer.
fn linux() -> Os {
    Os {
        dm: Arc::new(DmIoctl::new()),
        loops: Arc::new(KernelLoops::new()),
        fs: Arc::new(LinuxFilesystems::new()),
        kernel: Arc::new(LinuxKernel::new()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("liveclone: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Controller(args) => {
                cli::serve::run(cli::serve::Mode::Controller, args, linux()).await
            }
            Command::Node(args) => cli::serve::run(cli::serve::Mode::Node, args, linux()).await,
            Command::Standalone(args) => {
                cli::serve::run(cli::serve::Mode::Standalone, args, linux()).await
            }
            Command::Status(args) => cli::status::run(args).await,
            Command::Hydration(args) => cli::hydration::run(args).await,
            Command::Crdgen(args) => cli::crdgen::run(args),
        }
    });
    // Blocking tasks (a device-mapper event wait) may still run; they hold
    // nothing that needs a clean stop.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("liveclone: {e:#}");
            ExitCode::FAILURE
        }
    }
}
