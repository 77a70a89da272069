//! What the running kernel offers.

use std::path::Path;

use crate::os::error::{OsError, OsErrorKind, OsResult};

/// Kernel feature checks and node-wide settings.
pub trait Kernel: Send + Sync {
    /// Loads `dm-clone` if needed (modprobe) and returns its version from
    /// the device-mapper target list, or an error that says what is missing.
    fn ensure_dm_clone(&self) -> OsResult<String>;
    /// Sets dm-mod's `kcopyd_subjob_size_kb` (the size of the pieces in
    /// which kcopyd, dm-clone's copier, splits every copy; the kernel
    /// clamps it to 1024) and returns the value it had. It applies to
    /// copiers created afterwards, i.e. to tables loaded from then on.
    fn set_kcopyd_subjob_kib(&self, kib: u32) -> OsResult<u32>;
}

/// The running kernel, asked through device-mapper's target list ioctl
/// (and `modprobe` when dm-clone is not loaded yet).
#[derive(Debug, Clone, Default)]
pub struct LinuxKernel {
    _private: (),
}

/// Generous: modprobe may load several dependencies (dm-mod, dm-bufio,
/// dm-persistent-data) from slow storage.
const KERNEL_TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

const KCOPYD_SUBJOB_PARAMETER: &str = "/sys/module/dm_mod/parameters/kcopyd_subjob_size_kb";

impl LinuxKernel {
    pub fn new() -> Self {
        Self::default()
    }
}

/// The version of the `clone` target among the registered targets.
fn listed_clone_version() -> OsResult<Option<String>> {
    use crate::os::dm::ioctl;
    // Without device-mapper at all the node cannot serve: Unsupported,
    // whatever kept the control device from opening.
    let control = ioctl::open_control()
        .map_err(|e| OsError::new(OsErrorKind::Unsupported, e.operation, e.detail))?;
    ioctl::target_version(&control, crate::os::dm::CLONE_TARGET_TYPE)
}

impl Kernel for LinuxKernel {
    /// Asks the target list first: the health check runs this every few
    /// seconds, and a loaded target needs no process. Otherwise runs
    /// `modprobe dm-clone` and tolerates its failure: the target may be
    /// built in, and inside a container without `/lib/modules` modprobe
    /// fails anyway. The target list is what decides.
    fn ensure_dm_clone(&self) -> OsResult<String> {
        use crate::os::command::ToolCommand;

        let release = nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let mut modprobe_failure = None;
        let mut version = listed_clone_version()?;
        if version.is_none() {
            let modprobe = ToolCommand::new("modprobe", KERNEL_TOOL_TIMEOUT).arg("dm-clone");
            if let Err(error) = modprobe.run() {
                tracing::debug!(%error, "modprobe dm-clone failed; checking the target list anyway");
                modprobe_failure = Some(error);
            }
            version = listed_clone_version()?;
        }
        match version {
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
                "modprobe dm-clone; DM_LIST_VERSIONS",
                missing_dm_clone_message(&release, modprobe_failure.as_ref()),
            )),
        }
    }

    fn set_kcopyd_subjob_kib(&self, kib: u32) -> OsResult<u32> {
        let path = Path::new(KCOPYD_SUBJOB_PARAMETER);
        let read = || -> OsResult<u32> {
            let text =
                std::fs::read_to_string(path).map_err(|e| OsError::io("reading", path, &e))?;
            text.trim().parse().map_err(|_| {
                OsError::new(
                    OsErrorKind::Failed,
                    format!("reading {}", path.display()),
                    format!("{text:?} is not a number"),
                )
            })
        };
        let previous = read()?;
        if previous != kib {
            std::fs::write(path, format!("{kib}\n"))
                .map_err(|e| OsError::io("writing", path, &e))?;
        }
        Ok(previous)
    }
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
        "the kernel {release} has no dm-clone target: device-mapper lists no `clone` target and \
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
