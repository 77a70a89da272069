//! Builds test binaries with cargo and finds their paths, so that one VM boot
//! can run every real-kernel test binary.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    executable: Option<PathBuf>,
    #[serde(default)]
    profile: Option<Profile>,
    #[serde(default)]
    target: Option<Target>,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

#[derive(Deserialize)]
struct Target {
    name: String,
}

/// A compiled test binary.
#[derive(Debug, Clone)]
pub struct TestBinary {
    pub name: String,
    pub path: PathBuf,
}

/// Runs `cargo test --no-run --message-format=json <args>` and returns the
/// test executables it built, in build order.
pub fn build_test_binaries(cargo_args: &[String]) -> Result<Vec<TestBinary>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(cargo_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running cargo")?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut binaries = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(message) = serde_json::from_str::<Message>(&line) else {
            continue;
        };
        if message.reason != "compiler-artifact" {
            continue;
        }
        if let (Some(path), Some(profile), Some(target)) =
            (message.executable, message.profile, message.target)
        {
            if profile.test {
                binaries.push(TestBinary {
                    name: target.name,
                    path,
                });
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo test --no-run failed ({status})");
    }
    Ok(binaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_artifact_messages() {
        let test = r#"{"reason":"compiler-artifact","target":{"name":"real_dm_clone"},"profile":{"test":true},"executable":"/t/real_dm_clone-1"}"#;
        let lib = r#"{"reason":"compiler-artifact","target":{"name":"vmtest"},"profile":{"test":false},"executable":null}"#;
        let m: Message = serde_json::from_str(test).expect("parse");
        assert_eq!(m.reason, "compiler-artifact");
        assert!(m.profile.expect("profile").test);
        assert_eq!(m.target.expect("target").name, "real_dm_clone");
        let m: Message = serde_json::from_str(lib).expect("parse");
        assert!(m.executable.is_none());
    }
}
