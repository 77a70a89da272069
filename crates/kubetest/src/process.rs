//! A long-running child process (etcd, kube-apiserver, a CSI sidecar) that
//! cannot outlive its owner: killed on drop, and killed by the kernel if the
//! test process itself dies.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// A child process with its output in a log file; see the module
/// documentation. Tests use it for the CSI sidecars.
pub struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program` with `args`, stdin closed, stdout and stderr into
    /// the file `log`.
    pub fn spawn<I, S>(name: &'static str, program: &Path, args: I, log: &Path) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // If the test process dies (even by SIGKILL), so does the daemon.
        // The signal follows the thread that forks, so the caller's thread
        // must live as long as the daemon should: a test's thread does.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Self {
            name,
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("checking on {}", self.name)),
            None => Ok(None),
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        match fs::read(&self.log) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log.display()),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then SIGKILL if the process has not ended within `grace`;
    /// reaps it either way. Returns how it ended (None if already stopped).
    pub fn stop(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait().context("checking on the process")? {
            return Ok(Some(status));
        }
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        if signal::kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().context("waiting for the process")? {
                    return Ok(Some(status));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        // Still there (or the signal failed): no more waiting.
        let _ = child.kill();
        let status = child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        Ok(Some(status))
    }

    /// SIGKILL and reap, at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
