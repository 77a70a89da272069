//! External tools (kind, docker, helm, kubectl), always run with an argument
//! vector, never through a shell, and always with a deadline.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A tool call: program, arguments, deadline.
#[derive(Debug, Clone)]
pub struct Tool {
    program: String,
    args: Vec<String>,
    timeout: Duration,
}

/// What a finished call printed.
#[derive(Debug, Clone)]
pub struct Captured {
    pub stdout: String,
    pub stderr: String,
}

impl Tool {
    pub fn new(program: &str, timeout: Duration) -> Self {
        Tool {
            program: program.to_owned(),
            args: Vec::new(),
            timeout,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The call as a person would type it, for messages only (never run).
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|word| quote_for_display(word))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the call and returns what it printed; a non-zero exit, a
    /// failure to start or the deadline is an error naming the call and
    /// carrying its stderr.
    pub fn capture(&self) -> Result<Captured> {
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}`", self.display()))?;
        let (status, stdout, stderr) = self.wait_with_output(child)?;
        if !status.success() {
            bail!(
                "`{}` failed ({status}): {}",
                self.display(),
                last_lines(&stderr, 40)
            );
        }
        Ok(Captured { stdout, stderr })
    }

    /// Runs the call with its output going to the test's own (long steps:
    /// image builds, cluster creation, so that progress shows).
    pub fn stream(&self) -> Result<()> {
        eprintln!("+ {}", self.display());
        let child = self
            .command()
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting `{}`", self.display()))?;
        let (status, _, _) = self.wait_with_output(child)?;
        if !status.success() {
            bail!(
                "`{}` failed ({status}); its output is above",
                self.display()
            );
        }
        Ok(())
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        command
    }

    /// Waits for the child until the deadline, reading its pipes on threads
    /// (a full pipe would otherwise block it forever); kills it at the
    /// deadline.
    fn wait_with_output(
        &self,
        mut child: Child,
    ) -> Result<(std::process::ExitStatus, String, String)> {
        let stdout_reader = child.stdout.take().map(spawn_reader);
        let stderr_reader = child.stderr.take().map(spawn_reader);
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for `{}`", self.display()))?
            {
                break status;
            }
            if Instant::now() >= deadline {
                // The kill can only fail if it already exited; either way
                // the wait below reaps it.
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`{}` did not finish within {}s",
                    self.display(),
                    self.timeout.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        let stdout = stdout_reader.map(join_reader).unwrap_or_default();
        let stderr = stderr_reader.map(join_reader).unwrap_or_default();
        Ok((status, stdout, stderr))
    }
}

fn spawn_reader<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error leaves what was read; the exit status tells the rest.
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn join_reader(handle: thread::JoinHandle<String>) -> String {
    handle.join().unwrap_or_default()
}

/// The last `count` lines of `text` (tool errors can be long; the end says
/// what went wrong).
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(count);
    lines[start..].join("\n")
}

/// Single-quotes a word for display when it holds anything a shell would
/// read specially.
fn quote_for_display(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Whether `program` is an executable file in one of the PATH's folders.
pub fn on_path(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let tool = Tool::new("kubectl", Duration::from_secs(1))
            .args(["patch", "vh", "clone", "--type", "merge", "-p"])
            .arg(r#"{"spec":{"paused":true}}"#);
        assert_eq!(
            tool.display(),
            r#"kubectl patch vh clone --type merge -p '{"spec":{"paused":true}}'"#
        );
        assert_eq!(quote_for_display("it's"), r"'it'\''s'");
        assert_eq!(quote_for_display(""), "''");
    }

    #[test]
    fn capture_reports_the_call_and_its_stderr() {
        let error = Tool::new("sh", Duration::from_secs(10))
            .args(["-c", "echo broken >&2; exit 3"])
            .capture()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("`sh -c 'echo broken >&2; exit 3'` failed"),
            "{error}"
        );
        assert!(error.contains("broken"), "{error}");
    }

    #[test]
    fn capture_kills_a_call_at_its_deadline() {
        let started = Instant::now();
        let error = Tool::new("sleep", Duration::from_millis(300))
            .arg("30")
            .capture()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("did not finish within"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_missing_program_is_named() {
        let error = Tool::new("liveclone-e2e-no-such-tool", Duration::from_secs(1))
            .capture()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(
            error.contains("starting `liveclone-e2e-no-such-tool`"),
            "{error}"
        );
    }

    #[test]
    fn last_lines_keeps_the_end() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
