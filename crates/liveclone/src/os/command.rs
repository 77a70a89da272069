//! Running the external tools the OS layer relies on (`dmsetup`,
//! `blkid`, the mkfs and resize tools, `mount`).
//!
//! Every command is an argument vector handed to `execve`, never a shell
//! line, so no path or option can be reinterpreted. Each runs with
//! `LC_ALL=C` because the callers match English error texts, with a time
//! limit after which its whole process group is killed, and with stdout and
//! stderr captured. The API is synchronous: the domain layer calls the OS
//! layer from `spawn_blocking`.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::os::error::{OsError, OsErrorKind, OsResult};

/// How long a killed child gets to be reaped before a background thread
/// takes over the wait. A process stuck in an uninterruptible sleep (a
/// suspend waiting on a dead disk) cannot die until the kernel lets it, and
/// the caller must not hang with it.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// How long the output readers may take after the child has exited. They
/// only outlive it when a grandchild inherited the pipes.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The first poll interval; it doubles up to [`MAX_POLL`]. Quick tools
/// (most `dmsetup` calls take a few milliseconds) return promptly, long
/// ones cost at most one wake-up per [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(20);

/// One external command to run.
#[derive(Debug, Clone)]
pub struct ToolCommand {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

/// What a command printed and how it ended.
#[derive(Debug, Clone)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// How a run ended: by itself, or killed at the time limit.
#[derive(Debug)]
pub enum Finished {
    Exited(ToolOutput),
    TimedOut,
}

impl ToolCommand {
    /// `program` is looked up in `PATH`, like a shell would.
    pub fn new(program: impl AsRef<OsStr>, timeout: Duration) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            stdin: None,
            timeout,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Bytes for the child's stdin; without this stdin is `/dev/null`, so a
    /// tool that asks a question (mkfs over an existing file system) reads
    /// end-of-file and gives up instead of waiting.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command line for messages: program and arguments joined with
    /// spaces (stdin is not shown).
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|part| part.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command and requires exit status 0. A failure becomes an
    /// [`OsError`] whose kind comes from the tool's message (see
    /// [`classify`]), whose operation is the command line and whose detail
    /// is the trimmed stderr (or the exit status when stderr is empty).
    pub fn run(&self) -> OsResult<ToolOutput> {
        let output = self.output()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(self.failure(&output))
        }
    }

    /// Runs the command and returns its output whatever the exit status,
    /// for tools whose exit codes carry answers (`blkid` exits 2 on a blank
    /// device). Only a failure to start or the time limit is an error.
    pub fn output(&self) -> OsResult<ToolOutput> {
        match self.run_until_deadline()? {
            Finished::Exited(output) => Ok(output),
            Finished::TimedOut => Err(OsError::new(
                OsErrorKind::Failed,
                self.display(),
                format!(
                    "did not finish within {:.1} s and was killed",
                    self.timeout.as_secs_f64()
                ),
            )),
        }
    }

    /// The error for a run that exited unsuccessfully.
    pub fn failure(&self, output: &ToolOutput) -> OsError {
        let stderr = output.stderr.trim();
        let detail = if stderr.is_empty() {
            format!("{} with no message", output.status)
        } else {
            stderr.to_owned()
        };
        OsError::new(classify(&detail), self.display(), detail)
    }

    /// Runs the command; when the time limit passes first, kills its process
    /// group and returns [`Finished::TimedOut`] (for `dmsetup wait`, a time
    /// out is an answer, not an error).
    pub fn run_until_deadline(&self) -> OsResult<Finished> {
        let mut command = std::process::Command::new(&self.program);
        command
            .args(&self.args)
            .env("LC_ALL", "C")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a time-out also kills any helper it
            // started (mount(8) runs mount.<type> helpers).
            .process_group(0);
        let mut child = command.spawn().map_err(|error| self.spawn_error(&error))?;

        let stdin_writer = match (child.stdin.take(), &self.stdin) {
            (Some(mut pipe), Some(bytes)) => {
                let bytes = bytes.clone();
                // A thread, so a child that prints before it reads cannot
                // deadlock us. A write error means the child stopped
                // reading; its exit status tells the rest.
                Some(thread::spawn(move || {
                    let _ = pipe.write_all(&bytes);
                }))
            }
            _ => None,
        };
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());

        let deadline = Instant::now() + self.timeout;
        let status = match wait_until(&mut child, deadline) {
            Ok(Some(status)) => status,
            Ok(None) => {
                kill_group(&mut child);
                reap_or_hand_off(child, self.display());
                return Ok(Finished::TimedOut);
            }
            Err(error) => {
                kill_group(&mut child);
                reap_or_hand_off(child, self.display());
                return Err(OsError::new(
                    OsErrorKind::Failed,
                    self.display(),
                    format!("waiting for the command: {error}"),
                ));
            }
        };
        if let Some(writer) = stdin_writer {
            let _ = writer.join();
        }
        Ok(Finished::Exited(ToolOutput {
            status,
            stdout: collect(stdout),
            stderr: collect(stderr),
        }))
    }

    /// A tool that cannot start is reported as [`OsErrorKind::Unsupported`]
    /// rather than the `NotFound` its ENOENT would suggest: callers treat
    /// `NotFound` as "the device is absent", and a missing `dmsetup` must
    /// never make a removal look successful.
    fn spawn_error(&self, error: &std::io::Error) -> OsError {
        let kind = if error.kind() == std::io::ErrorKind::NotFound {
            OsErrorKind::Unsupported
        } else {
            OsErrorKind::Failed
        };
        OsError::new(
            kind,
            self.display(),
            format!(
                "cannot run {}: {error} (is it installed and on PATH?)",
                self.program.to_string_lossy()
            ),
        )
    }
}

/// Maps the usual failure texts of the tools (and the strerror texts they
/// quote) to an error kind. Busy comes first: "failed: Device or resource
/// busy" must not be read as a not-found because of "failed".
pub fn classify(message: &str) -> OsErrorKind {
    let message = message.to_ascii_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|needle| message.contains(needle));
    if any(&["device or resource busy", "target is busy", "is in use"]) {
        OsErrorKind::Busy
    } else if any(&["no space left", "disk quota exceeded"]) {
        OsErrorKind::NoSpace
    } else if any(&[
        "no such device or address",
        "no such device",
        "no such file or directory",
        "does not exist",
        "not found",
    ]) {
        OsErrorKind::NotFound
    } else if any(&["operation not supported", "not supported"]) {
        OsErrorKind::Unsupported
    } else {
        OsErrorKind::Failed
    }
}

/// Reads a pipe to its end on a thread; the text arrives on the channel.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buffer = Vec::new();
            let _ = pipe.read_to_end(&mut buffer);
            let _ = sender.send(buffer);
        });
    }
    receiver
}

fn collect(receiver: mpsc::Receiver<Vec<u8>>) -> String {
    let bytes = receiver.recv_timeout(DRAIN_GRACE).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Polls until the child exits or `deadline` passes (`Ok(None)`). Polling
/// `try_wait` rather than waiting on another thread keeps the child
/// unreaped until we have decided, so its pid cannot be reused by the time
/// we kill it.
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut interval = FIRST_POLL;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(MAX_POLL);
    }
}

/// SIGKILL to the child's process group (it leads one, see `process_group`),
/// then to the child itself in case the group is already gone.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
}

/// Reaps a killed child, or leaves the wait to a background thread when it
/// does not die within [`REAP_GRACE`] (uninterruptible sleep), so that it
/// never lingers as a zombie and never blocks the caller.
fn reap_or_hand_off(mut child: Child, command: String) {
    match wait_until(&mut child, Instant::now() + REAP_GRACE) {
        Ok(Some(_)) => {}
        Ok(None) => {
            tracing::warn!(
                %command,
                "a timed-out command did not die after SIGKILL (uninterruptible sleep?); \
                 reaping it in the background"
            );
            thread::spawn(move || {
                let _ = child.wait();
            });
        }
        Err(error) => tracing::warn!(%command, %error, "cannot reap a killed command"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn captures_output_and_sets_a_c_locale() {
        let output = ToolCommand::new("env", LONG)
            .env("LIVECLONE_TEST_VAR", "x y")
            .run()
            .expect("env runs");
        let lines: Vec<&str> = output.stdout.lines().collect();
        assert!(lines.contains(&"LC_ALL=C"), "{lines:?}");
        assert!(lines.contains(&"LIVECLONE_TEST_VAR=x y"), "{lines:?}");
        assert!(output.status.success());
    }

    #[test]
    fn passes_stdin_and_keeps_arguments_whole() {
        let output = ToolCommand::new("cat", LONG)
            .stdin("line one\nline two\n")
            .run()
            .expect("cat runs");
        assert_eq!(output.stdout, "line one\nline two\n");

        // One argument with a space and a `;` stays one argument: no shell.
        let output = ToolCommand::new("printf", LONG)
            .args(["<%s>", "a b; echo injected"])
            .run()
            .expect("printf runs");
        assert_eq!(output.stdout, "<a b; echo injected>");
    }

    #[test]
    fn a_failure_carries_the_command_line_stderr_and_a_kind() {
        let error = ToolCommand::new("ls", LONG)
            .arg("/nonexistent/liveclone-test")
            .run()
            .expect_err("ls of a missing path fails");
        assert_eq!(error.operation, "ls /nonexistent/liveclone-test");
        assert!(
            error.detail.contains("No such file or directory"),
            "{error}"
        );
        assert_eq!(error.detail, error.detail.trim());
        assert_eq!(error.kind, OsErrorKind::NotFound);
    }

    #[test]
    fn a_silent_failure_reports_the_exit_status() {
        let error = ToolCommand::new("false", LONG)
            .run()
            .expect_err("false fails");
        assert_eq!(error.kind, OsErrorKind::Failed);
        assert!(error.detail.contains("exit status: 1"), "{error}");
        // `output` does not judge the exit status.
        let output = ToolCommand::new("false", LONG).output().expect("runs");
        assert_eq!(output.status.code(), Some(1));
    }

    #[test]
    fn a_missing_program_is_unsupported_not_not_found() {
        let error = ToolCommand::new("liveclone-no-such-tool", LONG)
            .run()
            .expect_err("cannot start");
        assert_eq!(error.kind, OsErrorKind::Unsupported);
        assert!(error.detail.contains("cannot run liveclone-no-such-tool"));
    }

    #[test]
    fn the_time_limit_kills_the_whole_process_group() {
        let start = Instant::now();
        // `sh` starts a `sleep` child: killing only `sh` would leave it
        // holding the stdout pipe.
        let finished = ToolCommand::new("sh", Duration::from_millis(200))
            .args(["-c", "sleep 30; echo done"])
            .run_until_deadline()
            .expect("starts");
        assert!(matches!(finished, Finished::TimedOut), "{finished:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );

        let error = ToolCommand::new("sleep", Duration::from_millis(100))
            .arg("30")
            .run()
            .expect_err("times out");
        assert_eq!(error.kind, OsErrorKind::Failed);
        assert!(error.detail.contains("was killed"), "{error}");
    }

    #[test]
    fn classifies_the_usual_messages() {
        let cases = [
            (
                "device-mapper: remove ioctl on liveclone-x  failed: Device or resource busy",
                OsErrorKind::Busy,
            ),
            (
                "device-mapper: table ioctl on liveclone-x  failed: No such device or address",
                OsErrorKind::NotFound,
            ),
            ("Device does not exist.", OsErrorKind::NotFound),
            (
                "losetup: /dev/loop250: failed to use device: No such device",
                OsErrorKind::NotFound,
            ),
            (
                "mkfs.ext4: No space left on device while writing out",
                OsErrorKind::NoSpace,
            ),
            ("umount: /mnt: target is busy.", OsErrorKind::Busy),
            ("Operation not supported", OsErrorKind::Unsupported),
            (
                "device-mapper: reload ioctl on liveclone-x  failed: Invalid argument",
                OsErrorKind::Failed,
            ),
        ];
        for (message, kind) in cases {
            assert_eq!(classify(message), kind, "{message}");
        }
    }
}
