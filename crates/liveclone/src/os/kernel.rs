//! What the running kernel offers.

use crate::os::error::{OsError, OsErrorKind, OsResult};

/// Kernel feature checks.
pub trait Kernel: Send + Sync {
    /// Loads `dm-clone` if needed (modprobe) and returns its version from
    /// the device-mapper target list, or an error that says what is missing.
    fn ensure_dm_clone(&self) -> OsResult<String>;
}

/// The running kernel, asked through `modprobe` and `dmsetup targets`.
#[derive(Debug, Clone, Default)]
pub struct LinuxKernel {
    _private: (),
}

/// Generous: modprobe may load several dependencies (dm-mod, dm-bufio,
/// dm-persistent-data) from slow storage.
const KERNEL_TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl LinuxKernel {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Kernel for LinuxKernel {
    /// Runs `modprobe dm-clone` first and tolerates its failure: the target
    /// may be built in (`CONFIG_DM_CLONE=y`) or already loaded, and inside a
    /// container without `/lib/modules` modprobe fails anyway. The target
    /// list is what decides.
    fn ensure_dm_clone(&self) -> OsResult<String> {
        use crate::os::command::ToolCommand;

        let modprobe = ToolCommand::new("modprobe", KERNEL_TOOL_TIMEOUT).arg("dm-clone");
        let modprobe_failure = match modprobe.run() {
            Ok(_) => None,
            Err(error) => {
                tracing::debug!(%error, "modprobe dm-clone failed; checking the target list anyway");
                Some(error)
            }
        };
        let release = nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let targets = ToolCommand::new("dmsetup", KERNEL_TOOL_TIMEOUT)
            .env("DM_DISABLE_UDEV", "1")
            .arg("targets")
            .run()
            .map_err(|error| {
                OsError::new(
                    OsErrorKind::Unsupported,
                    error.operation,
                    format!(
                        "{}; device-mapper itself is unavailable on kernel {release} \
                         (is dm-mod loaded and /dev/mapper/control present in this container?)",
                        error.detail
                    ),
                )
            })?;
        match clone_target_version(&targets.stdout) {
            Some(version) => {
                if kernel_predates_fixes(&release) {
                    tracing::warn!(
                        %release,
                        "this kernel predates dm-clone's data-corruption fixes (5.4.6, 5.5) and \
                         its discard fixes (5.7); use 5.7 or later"
                    );
                }
                Ok(version)
            }
            None => Err(OsError::new(
                OsErrorKind::Unsupported,
                "modprobe dm-clone; dmsetup targets",
                missing_dm_clone_message(&release, modprobe_failure.as_ref()),
            )),
        }
    }
}

/// The version of the `clone` target in `dmsetup targets` output
/// (`clone            v1.0.0`), without the `v`.
fn clone_target_version(targets: &str) -> Option<String> {
    targets.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(crate::os::dm::CLONE_TARGET_TYPE))
            .then(|| fields.next())
            .flatten()
            .map(|version| version.trim_start_matches('v').to_owned())
    })
}

/// Whether the release (`6.1.0-56-amd64`, `5.4.0-42-generic`) is older than
/// 5.7. Unparsable releases are given the benefit of the doubt.
fn kernel_predates_fixes(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (5, 7),
        _ => false,
    }
}

fn missing_dm_clone_message(release: &str, modprobe_failure: Option<&OsError>) -> String {
    let modprobe = match modprobe_failure {
        Some(error) => format!("`modprobe dm-clone` failed ({})", error.detail),
        None => "`modprobe dm-clone` succeeded but registered no target".to_owned(),
    };
    format!(
        "the kernel {release} has no dm-clone target: `dmsetup targets` lists no `clone` and \
         {modprobe}. liveclone needs dm-clone (kernel option CONFIG_DM_CLONE, Linux 5.7 or \
         later). Fedora and Arch build it; Debian 12, RHEL 9 and its derivatives, Talos and \
         Flatcar do not. Run the node on a kernel built with CONFIG_DM_CLONE=m or =y, or build \
         the module for this exact kernel out of tree (docs/TESTING.md shows how the test VM \
         does it for Debian)."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_clone_target_version() {
        // Captured in the test VM.
        let targets =
            "snapshot-merge   v1.5.0\nsnapshot-origin  v1.9.0\nsnapshot         v1.16.0\n\
                       clone            v1.0.0\nstriped          v1.6.0\nlinear           v1.4.0\n\
                       error            v1.5.0\n";
        assert_eq!(clone_target_version(targets), Some("1.0.0".to_owned()));
        assert_eq!(
            clone_target_version("linear           v1.4.0\nerror            v1.5.0\n"),
            None
        );
        // A target whose name merely starts with "clone" is not it.
        assert_eq!(clone_target_version("clone-ish v9.9.9\n"), None);
        assert_eq!(clone_target_version(""), None);
    }

    #[test]
    fn flags_kernels_older_than_5_7() {
        assert!(kernel_predates_fixes("5.4.0-42-generic"));
        assert!(kernel_predates_fixes("4.19.0"));
        assert!(!kernel_predates_fixes("5.7.0"));
        assert!(!kernel_predates_fixes("6.1.0-56-amd64"));
        assert!(!kernel_predates_fixes("unknown"));
    }

    #[test]
    fn the_missing_target_message_says_what_to_do() {
        let failure = OsError::new(
            OsErrorKind::NotFound,
            "modprobe dm-clone",
            "modprobe: FATAL: Module dm-clone not found in directory /lib/modules/6.1.0-56-amd64",
        );
        let message = missing_dm_clone_message("6.1.0-56-amd64", Some(&failure));
        for needle in [
            "6.1.0-56-amd64",
            "CONFIG_DM_CLONE",
            "Debian 12",
            "Module dm-clone not found",
            "docs/TESTING.md",
        ] {
            assert!(
                message.contains(needle),
                "{needle:?} missing from {message}"
            );
        }
        assert!(missing_dm_clone_message("6.1.0", None).contains("registered no target"));
    }
}
