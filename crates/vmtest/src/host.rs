//! Boots the test VM under QEMU (TCG: KVM does not run a stock guest kernel on
//! these machines), streams its console, enforces a time limit and reads the
//! guest agent's result.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cache::PreparedKernel;
use crate::spec::{
    GuestCommand, GuestResult, GuestSpec, HOST_ROOT_TAG, RESULT_FILE, RUN_TAG, SCRATCH_SERIAL,
    SPEC_FILE,
};

/// Modules the agent loads before the first command: everything the bench
/// promises (dm-clone and its dependencies, loop devices, the file systems).
pub const DEFAULT_MODULES: &[&str] = &["dm-clone", "loop", "ext4", "xfs", "dm-snapshot"];

/// A host file attached to the guest as a virtio disk. The guest finds it as
/// `/dev/disk/by-id/virtio-<serial>`; the file outlives the VM, which is what
/// restart and power-cut tests need.
#[derive(Debug, Clone)]
pub struct Disk {
    pub serial: String,
    pub path: PathBuf,
}

impl Disk {
    pub fn new(serial: impl Into<String>, path: impl Into<PathBuf>) -> Result<Self> {
        let serial = serial.into();
        // virtio-blk serials are at most 20 bytes; keep them to a safe alphabet
        // because they become file names under /dev/disk/by-id.
        ensure!(
            !serial.is_empty()
                && serial.len() <= 20
                && serial
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "disk serial {serial:?} must be 1-20 characters of [A-Za-z0-9_-]"
        );
        ensure!(
            serial != SCRATCH_SERIAL,
            "serial {SCRATCH_SERIAL} is reserved"
        );
        Ok(Self {
            serial,
            path: path.into(),
        })
    }
}

/// How the run ended.
#[derive(Debug)]
pub enum Ending {
    /// The guest ran every command and powered off.
    Finished(GuestResult),
    /// The caller's line predicate matched and QEMU was killed at once: the
    /// guest lost power with whatever was in flight.
    PowerCut,
}

#[derive(Debug)]
pub struct Outcome {
    pub ending: Ending,
    /// Console lines, without line endings (kernel messages included).
    pub console: Vec<String>,
    pub elapsed: Duration,
}

impl Outcome {
    /// The guest result, or an error if the run was cut.
    pub fn result(&self) -> Result<&GuestResult> {
        match &self.ending {
            Ending::Finished(result) => Ok(result),
            Ending::PowerCut => bail!("the VM was powered off before it finished"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Vm {
    kernel: PreparedKernel,
    /// The `vmtest` binary, read once: the guest runs a copy of it as its
    /// agent. A copy, because cargo may replace the file while we run.
    agent: Arc<Vec<u8>>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    pub disks: Vec<Disk>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub scratch_size_gib: u32,
    /// Echo the console to this process's stderr as it arrives.
    pub echo: bool,
}

impl Vm {
    pub fn new(kernel: PreparedKernel, agent: impl Into<PathBuf>) -> Result<Self> {
        let agent = agent.into();
        let agent = std::fs::read(&agent)
            .with_context(|| format!("reading the vmtest agent {}", agent.display()))?;
        Ok(Self {
            kernel,
            agent: Arc::new(agent),
            memory_mib: 2048,
            cpus: 2,
            timeout: Duration::from_secs(900),
            disks: Vec::new(),
            env: Vec::new(),
            cwd: std::env::current_dir().context("current directory")?,
            scratch_size_gib: 8,
            echo: true,
        })
    }

    pub fn kernel(&self) -> &PreparedKernel {
        &self.kernel
    }

    /// Boots, runs `commands` in order, powers off.
    pub fn run(&self, commands: Vec<Vec<String>>) -> Result<Outcome> {
        self.boot(commands, |_| false)
    }

    /// Boots and runs `commands`, but kills QEMU (a power cut) as soon as a
    /// console line satisfies `cut_when`.
    pub fn run_until(
        &self,
        commands: Vec<Vec<String>>,
        cut_when: impl FnMut(&str) -> bool,
    ) -> Result<Outcome> {
        self.boot(commands, cut_when)
    }

    /// Boots again (up to [`BOOT_ATTEMPTS`] boots in all) when a boot
    /// printed nothing at all within [`BOOT_SILENCE_LIMIT`]: QEMU's software
    /// CPU has been seen, about once in twenty boots, to spin before the
    /// kernel's first console line. No line means the guest never reached
    /// its agent, so nothing ran and booting again is safe, disks included.
    fn boot(
        &self,
        commands: Vec<Vec<String>>,
        mut cut_when: impl FnMut(&str) -> bool,
    ) -> Result<Outcome> {
        let mut attempt = 1;
        loop {
            match self.boot_once(commands.clone(), &mut cut_when) {
                Err(error)
                    if error.downcast_ref::<SilentBoot>().is_some() && attempt < BOOT_ATTEMPTS =>
                {
                    attempt += 1;
                    eprintln!("vmtest: {error}; booting again (boot {attempt} of at most {BOOT_ATTEMPTS})");
                }
                other => return other,
            }
        }
    }

    fn boot_once(
        &self,
        commands: Vec<Vec<String>>,
        cut_when: &mut impl FnMut(&str) -> bool,
    ) -> Result<Outcome> {
        ensure!(!commands.is_empty(), "nothing to run in the VM");
        let runs = self.kernel.runs_dir()?;
        std::fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;
        remove_abandoned_runs(&runs);
        let run_dir = tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(&runs)
            .context("creating the run folder")?;
        std::fs::write(
            run_dir.path().join("owner.pid"),
            std::process::id().to_string(),
        )?;

        let spec = GuestSpec {
            commands: commands
                .into_iter()
                .map(|argv| GuestCommand { argv })
                .collect(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            modules_dir: self.kernel.modules_dir(),
            kernel_abi: self.kernel.abi.clone(),
            preload_modules: DEFAULT_MODULES.iter().map(|m| m.to_string()).collect(),
            scratch: true,
        };
        std::fs::write(
            run_dir.path().join(SPEC_FILE),
            serde_json::to_vec_pretty(&spec)?,
        )?;
        let agent = run_dir.path().join("vmtest-agent");
        std::fs::write(&agent, self.agent.as_slice())?;
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))?;
        let scratch = run_dir.path().join("scratch.img");
        std::fs::File::create(&scratch)?.set_len(u64::from(self.scratch_size_gib) << 30)?;

        let mut qemu_cmd = self.qemu_command(&agent, run_dir.path(), &scratch)?;
        let started = Instant::now();
        let mut qemu = QemuProcess(
            qemu_cmd
                .spawn()
                .context("starting qemu-system-x86_64 (is qemu-system-x86 installed?)")?,
        );
        let stdout = qemu.0.stdout.take().context("qemu stdout")?;
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_owned();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });

        let deadline = started + self.timeout;
        let mut console = Vec::new();
        let mut cut = false;
        loop {
            let now = Instant::now();
            if console.is_empty() && now >= started + BOOT_SILENCE_LIMIT && now < deadline {
                qemu.kill();
                return Err(SilentBoot {
                    after: BOOT_SILENCE_LIMIT,
                }
                .into());
            }
            if now >= deadline {
                qemu.kill();
                bail!(
                    "the VM did not finish within {} s; QEMU was killed. Last console lines:\n{}",
                    self.timeout.as_secs(),
                    tail(&console, 30)
                );
            }
            // Wake at the silence limit too, while nothing was printed.
            let wait = if console.is_empty() {
                (started + BOOT_SILENCE_LIMIT)
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(100))
                    .min(deadline - now)
            } else {
                deadline - now
            };
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    if self.echo {
                        let mut err = std::io::stderr().lock();
                        let _ = writeln!(err, "{line}");
                    }
                    let matched = cut_when(&line);
                    console.push(line);
                    if matched {
                        qemu.kill();
                        cut = true;
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = qemu.0.wait().context("waiting for QEMU")?;
        let _ = reader.join();
        let elapsed = started.elapsed();
        if cut {
            return Ok(Outcome {
                ending: Ending::PowerCut,
                console,
                elapsed,
            });
        }
        let result_path = run_dir.path().join(RESULT_FILE);
        let result: GuestResult = match std::fs::read(&result_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).context("parsing the guest result")?,
            Err(_) => bail!(
                "the VM stopped ({status}) without a result: the guest crashed or never \
                 started its agent. Last console lines:\n{}",
                tail(&console, 40)
            ),
        };
        Ok(Outcome {
            ending: Ending::Finished(result),
            console,
            elapsed,
        })
    }

    fn qemu_command(&self, agent: &Path, run_dir: &Path, scratch: &Path) -> Result<Command> {
        let agent = path_str(agent)?;
        ensure!(
            !agent.contains(char::is_whitespace),
            "the agent path {agent:?} must not contain white space (it goes on the kernel command line)"
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-monitor", "none", "-serial", "stdio"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .arg("-kernel")
            .arg(self.kernel.vmlinuz())
            .arg("-initrd")
            .arg(self.kernel.initramfs())
            .arg("-append")
            .arg(format!(
                "console=ttyS0 loglevel=4 panic=-1 oops=panic vmtest.agent={agent}"
            ))
            .arg("-virtfs")
            .arg(format!(
                "local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
            ))
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag={RUN_TAG},security_model=none,multidevs=remap",
                path_str(run_dir)?
            ));
        let mut disks = vec![(SCRATCH_SERIAL.to_owned(), scratch.to_path_buf())];
        disks.extend(
            self.disks
                .iter()
                .map(|d| (d.serial.clone(), d.path.clone())),
        );
        for (index, (serial, path)) in disks.iter().enumerate() {
            let path = path_str(path)?;
            // QEMU's -drive syntax uses ',' as separator; refuse rather than escape.
            ensure!(
                !path.contains(','),
                "disk path {path:?} must not contain ','"
            );
            cmd.arg("-drive")
                .arg(format!(
                    "file={path},if=none,id=disk{index},format=raw,cache=writeback,aio=threads"
                ))
                .arg("-device")
                .arg(format!("virtio-blk-pci,drive=disk{index},serial={serial}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // If this process dies, so does QEMU: nothing is left running.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        Ok(cmd)
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How long a boot may stay silent (no console line at all) before it is
/// taken for a hung boot. A boot prints its first line after about 7 s
/// under TCG, and under a minute on a loaded 2-core machine. Kept short
/// because a hung boot costs this much of a CI run every time, and taking a
/// slow boot for a hung one only costs that boot (nothing ran yet): the
/// next attempt starts at once.
const BOOT_SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// Boots tried before a silent boot is an error.
const BOOT_ATTEMPTS: u32 = 4;

/// A boot that printed nothing within [`BOOT_SILENCE_LIMIT`].
#[derive(Debug)]
struct SilentBoot {
    after: Duration,
}

impl std::fmt::Display for SilentBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the VM printed nothing within {} s of starting QEMU (a hung boot); QEMU was killed",
            self.after.as_secs()
        )
    }
}

impl std::error::Error for SilentBoot {}

/// The QEMU process; killed and reaped if the runner returns early (error or
/// panic), so no VM outlives its run.
struct QemuProcess(Child);

impl QemuProcess {
    /// SIGKILL: for the guest, the power goes off.
    fn kill(&mut self) {
        let _ = self.0.kill();
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Removes run folders whose owner process is gone (a runner that was killed
/// before it could clean up after itself).
fn remove_abandoned_runs(runs: &Path) {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = std::fs::read_to_string(dir.join("owner.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok());
        let alive = match owner {
            Some(pid) => Path::new(&format!("/proc/{pid}")).exists(),
            // A folder without an owner file may be one that another runner is
            // just creating: leave it unless it is old.
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < Duration::from_secs(600)),
        };
        if !alive {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_serials_are_checked() {
        assert!(Disk::new("pc-source", "/tmp/x").is_ok());
        assert!(Disk::new("", "/tmp/x").is_err());
        assert!(Disk::new("a".repeat(21), "/tmp/x").is_err());
        assert!(Disk::new("bad serial", "/tmp/x").is_err());
        assert!(Disk::new("../../etc", "/tmp/x").is_err());
        assert!(Disk::new(SCRATCH_SERIAL, "/tmp/x").is_err());
    }

    #[test]
    fn abandoned_run_folders_are_removed_and_live_ones_kept() {
        let runs = tempfile::tempdir().expect("tempdir");
        let dead = runs.path().join("run-dead");
        let live = runs.path().join("run-live");
        let fresh = runs.path().join("run-fresh");
        for dir in [&dead, &live, &fresh] {
            std::fs::create_dir(dir).expect("mkdir");
        }
        // PIDs are below 2^22 on Linux, so this one cannot exist.
        std::fs::write(dead.join("owner.pid"), "99999999").expect("write");
        std::fs::write(live.join("owner.pid"), std::process::id().to_string()).expect("write");
        remove_abandoned_runs(runs.path());
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(fresh.exists(), "a folder being created is left alone");
    }
}
