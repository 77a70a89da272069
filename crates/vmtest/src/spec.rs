//! What the host asks the guest agent to do, and what the guest answers.
//!
//! Both travel as files in the run folder, which the guest mounts over
//! virtio-9p: the kernel command line is too short for argv and environment,
//! and a status file cannot be faked by a test that prints a look-alike line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// 9p mount tag of the host's root filesystem (read-only).
pub const HOST_ROOT_TAG: &str = "hostroot";
/// 9p mount tag of the run folder (read-write).
pub const RUN_TAG: &str = "vmrun";
/// Where the guest mounts the run folder.
pub const GUEST_RUN_DIR: &str = "/run/vmtest";
/// File names inside the run folder.
pub const SPEC_FILE: &str = "spec.json";
pub const RESULT_FILE: &str = "result.json";
/// Serial of the scratch disk that the agent formats and mounts.
pub const SCRATCH_SERIAL: &str = "vmtest-scratch";
/// Where the scratch disk is mounted in the guest; `TMPDIR` points below it.
pub const GUEST_SCRATCH_DIR: &str = "/scratch";
/// Set in every command's environment inside the VM.
pub const IN_VM_ENV: &str = "LIVECLONE_IN_VM";

/// One command, run as root inside the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestCommand {
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestSpec {
    /// Run in order; every command runs even if an earlier one failed, so one
    /// boot reports on every test binary.
    pub commands: Vec<GuestCommand>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Directory holding the guest kernel's modules (`/lib/modules/<abi>`).
    pub modules_dir: PathBuf,
    pub kernel_abi: String,
    /// Modules loaded before the first command; the harness reports each.
    pub preload_modules: Vec<String>,
    /// Whether the agent should make a file system on the scratch disk.
    pub scratch: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestResult {
    /// Exit code of each command, in order; `None` when killed by a signal.
    pub exit_codes: Vec<Option<i32>>,
    pub kernel_release: String,
    pub dm_clone_loaded: bool,
}

impl GuestResult {
    pub fn success(&self) -> bool {
        self.exit_codes.iter().all(|code| *code == Some(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_success_needs_every_command_to_exit_zero() {
        let mut result = GuestResult {
            exit_codes: vec![Some(0), Some(0)],
            kernel_release: "6.1.0-56-amd64".into(),
            dm_clone_loaded: true,
        };
        assert!(result.success());
        result.exit_codes.push(None);
        assert!(
            !result.success(),
            "a command killed by a signal fails the run"
        );
        result.exit_codes = vec![Some(0), Some(1)];
        assert!(!result.success());
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = GuestSpec {
            commands: vec![GuestCommand {
                argv: vec!["/bin/true".into(), "with space".into()],
            }],
            env: vec![("K".into(), "v=1".into())],
            cwd: "/work".into(),
            modules_dir: "/m".into(),
            kernel_abi: "6.1.0-56-amd64".into(),
            preload_modules: vec!["dm-clone".into()],
            scratch: true,
        };
        let json = serde_json::to_vec(&spec).expect("serialise");
        assert_eq!(
            serde_json::from_slice::<GuestSpec>(&json).expect("parse"),
            spec
        );
    }
}
