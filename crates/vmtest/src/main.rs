//! `vmtest`: run commands and test binaries in the real-kernel test VM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use vmtest::{cargo, Disk, Ending, PreparedKernel, Vm, TEST_ON_HOST_ENV};

#[derive(Parser)]
#[command(about = "Run liveclone's real-kernel tests in a QEMU VM with dm-clone")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args)]
struct VmOptions {
    /// Time limit for the whole boot, in seconds; QEMU is killed after it.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Attach a host file as a virtio disk: SERIAL=PATH
    /// (the guest sees /dev/disk/by-id/virtio-SERIAL).
    #[arg(long = "disk", value_name = "SERIAL=PATH")]
    disks: Vec<String>,
    /// Extra environment for the guest commands: KEY=VALUE.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the VM and run one command as root; exits with its status.
    Run {
        #[command(flatten)]
        vm: VmOptions,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Build test binaries with `cargo test --no-run ARGS` and run all of them
    /// in one VM boot (or on this host as root when LIVECLONE_TEST_ON_HOST=1).
    Test {
        #[command(flatten)]
        vm: VmOptions,
        /// Argument passed to every test binary (repeatable).
        #[arg(long = "test-arg")]
        test_args: Vec<String>,
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Print the prepared kernel.
    Info,
    /// The guest agent; runs as PID 1 inside the VM. Not for direct use.
    #[command(hide = true)]
    Guest,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("vmtest: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Cmd) -> Result<ExitCode> {
    match command {
        Cmd::Guest => {
            if std::process::id() != 1 {
                bail!("`vmtest guest` only runs as PID 1 inside the test VM");
            }
            vmtest::guest::run_agent()
        }
        Cmd::Info => {
            let kernel = PreparedKernel::locate()?;
            println!(
                "kernel {} (Debian {}) in {}",
                kernel.abi,
                kernel.package_version,
                kernel.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { vm, command } => {
            let vm = build_vm(&vm)?;
            boot_and_report(&vm, vec![command])
        }
        Cmd::Test {
            vm,
            test_args,
            cargo_args,
        } => {
            let on_host = std::env::var_os(TEST_ON_HOST_ENV).is_some_and(|v| v == "1");
            // Before cargo runs: it may rebuild and replace this very binary.
            let vm = if on_host { None } else { Some(build_vm(&vm)?) };
            let binaries = cargo::build_test_binaries(&cargo_args)?;
            if binaries.is_empty() {
                bail!("cargo built no test binary for {cargo_args:?}");
            }
            let commands: Vec<Vec<String>> = binaries
                .iter()
                .map(|binary| {
                    let mut argv = vec![binary.path.display().to_string()];
                    argv.extend(test_args.iter().cloned());
                    argv
                })
                .collect();
            match vm {
                None => run_on_host(&commands),
                Some(vm) => boot_and_report(&vm, commands),
            }
        }
    }
}

fn build_vm(options: &VmOptions) -> Result<Vm> {
    let kernel = PreparedKernel::locate()?;
    let agent = std::env::current_exe().context("locating this executable")?;
    let mut vm = Vm::new(kernel, agent)?;
    vm.timeout = Duration::from_secs(options.timeout);
    vm.memory_mib = options.memory;
    vm.cpus = options.cpus;
    for disk in &options.disks {
        let (serial, path) = disk
            .split_once('=')
            .with_context(|| format!("--disk {disk:?} is not SERIAL=PATH"))?;
        vm.disks.push(Disk::new(serial, PathBuf::from(path))?);
    }
    for pair in &options.env {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--env {pair:?} is not KEY=VALUE"))?;
        vm.env.push((key.to_owned(), value.to_owned()));
    }
    Ok(vm)
}

fn boot_and_report(vm: &Vm, commands: Vec<Vec<String>>) -> Result<ExitCode> {
    let kernel = vm.kernel();
    eprintln!(
        "vmtest: booting kernel {} (Debian {}) under QEMU/TCG, {} command(s)",
        kernel.abi,
        kernel.package_version,
        commands.len()
    );
    let outcome = vm.run(commands.clone())?;
    let Ending::Finished(result) = &outcome.ending else {
        bail!("the VM was cut off");
    };
    eprintln!(
        "vmtest: guest kernel {}, dm-clone loaded: {}, {:.0} s wall",
        result.kernel_release,
        if result.dm_clone_loaded { "yes" } else { "no" },
        outcome.elapsed.as_secs_f64()
    );
    for (command, code) in commands.iter().zip(&result.exit_codes) {
        let verdict = match code {
            Some(0) => "ok".to_owned(),
            Some(code) => format!("FAILED (exit code {code})"),
            None => "FAILED (killed by a signal)".to_owned(),
        };
        eprintln!("vmtest: {verdict}: {}", command.join(" "));
    }
    if result.exit_codes.len() != commands.len() {
        bail!(
            "the guest ran {} of {} commands",
            result.exit_codes.len(),
            commands.len()
        );
    }
    Ok(if result.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// For hosts whose kernel has dm-clone: run the binaries here, as root.
fn run_on_host(commands: &[Vec<String>]) -> Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("{TEST_ON_HOST_ENV}=1 needs root: the tests create device-mapper and loop devices");
    }
    let loaded = std::process::Command::new("modprobe")
        .arg("dm-clone")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !loaded {
        bail!("this host's kernel has no dm-clone module (modprobe dm-clone failed); use the VM");
    }
    let mut failed = false;
    for argv in commands {
        let Some((program, args)) = argv.split_first() else {
            continue;
        };
        eprintln!("vmtest: running on the host: {}", argv.join(" "));
        let status = std::process::Command::new(program).args(args).status()?;
        if !status.success() {
            eprintln!("vmtest: FAILED ({status}): {}", argv.join(" "));
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
