//! LVM: the logical volumes behind the LVM pool (`domain::lvm_pool`).
//!
//! [`LinuxLvm`] runs the `lvm` binary (`lvm lvs ...`, `lvm lvcreate ...`)
//! through [`ToolCommand`]: argument vectors, never a shell, `LC_ALL=C` (the
//! error texts are matched in English), and a time limit after which the
//! process group is killed, so a hung LVM call cannot hang the driver.
//! State is read only from LVM's JSON reports with explicit field lists
//! (see [`report`]); every command carries [`LVM_CONFIG`].
//!
//! Why processes here when device-mapper and loop devices are driven by
//! ioctls: LVM's on-disk metadata, locking and allocation are lvm2's own,
//! and its library is not a stable API. LVM calls happen when storage is
//! created, resized or removed, not on the I/O path.
//!
//! [`fake::FakeLvm`] is an in-memory stand-in for unit tests on hosts
//! without device-mapper.

pub mod cache;
pub mod fake;
pub mod report;
pub mod zero;

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

pub use report::{LogicalVolume, LvType, ThinPool, VolumeGroup};

use crate::os::command::{Finished, ToolCommand, ToolOutput};
use crate::os::error::{OsError, OsErrorKind};

/// The configuration given to every LVM command (`--config`), on top of
/// the node's `lvm.conf`. Why each setting:
///
/// * `activation/udev_sync = 0`, `udev_rules = 0`: the driver runs in a
///   container, and the test VM, with no udev daemon. With sync on, LVM
///   waits for udev to confirm each device change, which never comes;
///   with the rules off, LVM makes the `/dev/mapper/<vg>-<lv>` nodes and
///   `/dev/<vg>/<lv>` links itself.
/// * `activation/verify_udev_operations = 1`: LVM checks the nodes and
///   links it expects and repairs them, for a udev that exists but did
///   not act (or a container with a stale `/dev`).
/// * `activation/monitoring = 0`: no dmeventd in a container; LVM would
///   try to reach it for every thin pool it activates. The driver watches
///   pool use itself (the 95 % refusal in the pool).
/// * `devices/obtain_device_list_from_udev = 0`: the udev database is
///   missing or stale in a container; LVM scans `/dev` instead.
/// * `devices/ignore_suspended_devices = 1`: never read a suspended
///   device-mapper device while scanning. The driver suspends its own
///   devices during snapshot cuts and switches; a read would block until
///   the resume, which may be waiting for this very LVM call.
/// * `devices/global_filter = [ "r|^/dev/mapper/liveclone-|" ]`: the
///   driver's own dm devices hold file systems and dm-clone metadata,
///   never PVs, so LVM must not open them at all (an open by LVM's scan
///   also makes a concurrent removal of the device fail as busy). A
///   device is rejected when a name of it matches and none is accepted,
///   and LVM sees the `/dev/mapper` names because it scans `/dev`. Only
///   this pattern: every other device keeps the default (accepted). It
///   replaces a `global_filter` of the node's `lvm.conf`.
/// * `global/use_lvmpolld = 0`: no lvmpolld in a container; nothing the
///   driver runs polls (no pvmove, no conversions).
pub const LVM_CONFIG: &str = concat!(
    "activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 1 monitoring = 0 } ",
    "devices { obtain_device_list_from_udev = 0 ignore_suspended_devices = 1 ",
    "global_filter = [ \"r|^/dev/mapper/liveclone-|\" ] } ",
    "global { use_lvmpolld = 0 }",
);

/// Time limit of a report (`lvs`, `vgs`): a scan of the node's devices.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit of a change (create, extend, rename, (de)activate, remove):
/// a metadata commit on every PV of the VG and device-mapper calls.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// What went wrong, as the pool needs to tell it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LvmErrorKind {
    /// The VG, LV or thin pool does not exist.
    NotFound,
    /// An LV of that name exists already.
    AlreadyExists,
    /// Not enough free extents in the VG (or space in the thin pool).
    NoSpace,
    /// The LV is open (a table, a mount), so it cannot be deactivated or
    /// removed.
    Busy,
    /// `lvm` cannot run (not installed) or the kernel lacks a target.
    Unsupported,
    /// The time limit passed and the command was killed.
    TimedOut,
    /// Anything else.
    Failed,
}

/// An LVM failure: the command line and what LVM said.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {detail}")]
pub struct LvmError {
    pub kind: LvmErrorKind,
    /// The command line, e.g. `lvm lvcreate ... vg0` (never secrets; the
    /// `--config` text is left out to keep messages readable).
    pub operation: String,
    pub detail: String,
}

pub type LvmResult<T> = Result<T, LvmError>;

impl LvmError {
    pub fn new(
        kind: LvmErrorKind,
        operation: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            operation: operation.into(),
            detail: detail.into(),
        }
    }
}

impl From<OsError> for LvmError {
    fn from(error: OsError) -> Self {
        let kind = match error.kind {
            OsErrorKind::NotFound => LvmErrorKind::NotFound,
            OsErrorKind::Busy => LvmErrorKind::Busy,
            OsErrorKind::Unsupported => LvmErrorKind::Unsupported,
            OsErrorKind::NoSpace => LvmErrorKind::NoSpace,
            OsErrorKind::Failed => LvmErrorKind::Failed,
        };
        Self::new(kind, error.operation, error.detail)
    }
}

/// For callers that speak the OS layer's errors: an existing name and a
/// time-out have no kind of their own there.
impl From<LvmError> for OsError {
    fn from(error: LvmError) -> Self {
        let kind = match error.kind {
            LvmErrorKind::NotFound => OsErrorKind::NotFound,
            LvmErrorKind::Busy => OsErrorKind::Busy,
            LvmErrorKind::Unsupported => OsErrorKind::Unsupported,
            LvmErrorKind::NoSpace => OsErrorKind::NoSpace,
            LvmErrorKind::AlreadyExists | LvmErrorKind::TimedOut | LvmErrorKind::Failed => {
                OsErrorKind::Failed
            }
        };
        OsError::new(kind, error.operation, error.detail)
    }
}

/// Maps LVM's messages (lvm2 2.03, `LC_ALL=C`) to a kind. Warnings are
/// ignored when the message has other lines: LVM warns on success too
/// (a missing `thin_check`, overprovisioning), and a warning's words must
/// not decide the kind of the actual error.
pub fn classify(stderr: &str) -> LvmErrorKind {
    let lines: Vec<String> = stderr
        .lines()
        .map(|line| line.trim().to_ascii_lowercase())
        .filter(|line| !line.is_empty())
        .collect();
    let errors: Vec<&String> = lines
        .iter()
        .filter(|line| !line.starts_with("warning"))
        .collect();
    let relevant: Vec<&String> = if errors.is_empty() {
        lines.iter().collect()
    } else {
        errors
    };
    let any = |needles: &[&str]| {
        relevant
            .iter()
            .any(|line| needles.iter().any(|needle| line.contains(needle)))
    };
    if any(&["already exists"]) {
        // `Logical Volume "x" already exists in volume group "vg"`
        LvmErrorKind::AlreadyExists
    } else if any(&[
        "insufficient free space",
        "insufficient suitable",
        "no space left",
        "not enough free",
    ]) {
        // `Volume group "vg" has insufficient free space (254 extents): 1280 required.`
        LvmErrorKind::NoSpace
    } else if any(&[" in use", "device or resource busy", "is open"]) {
        // `Logical volume vg/lv in use.`
        LvmErrorKind::Busy
    } else if any(&["not found", "failed to find", "does not exist"]) {
        // `Failed to find logical volume "vg/lv"`, `Volume group "vg" not
        // found`, `Pool tp not found in Volume group vg.`
        LvmErrorKind::NotFound
    } else if any(&[
        "not supported",
        "unknown target",
        "can't process lv",
        "required device-mapper target",
    ]) {
        LvmErrorKind::Unsupported
    } else {
        LvmErrorKind::Failed
    }
}

/// The LVM operations the pool needs. Names are passed as given: the pool
/// derives them from validated IDs and validated configuration only.
pub trait Lvm: Send + Sync {
    /// The LVs of `vg` (not LVM's hidden internal ones), only those
    /// carrying `tag` when one is given.
    fn logical_volumes(&self, vg: &str, tag: Option<&str>) -> LvmResult<Vec<LogicalVolume>>;
    /// One LV; `None` when the VG has no LV of that name.
    fn logical_volume(&self, vg: &str, lv: &str) -> LvmResult<Option<LogicalVolume>>;
    fn volume_group(&self, vg: &str) -> LvmResult<VolumeGroup>;
    fn thin_pool(&self, vg: &str, pool: &str) -> LvmResult<ThinPool>;
    /// A linear LV of at least `bytes` (LVM rounds up to whole extents;
    /// `bytes` must be a multiple of 512), old signatures wiped and its
    /// start zeroed, active.
    fn create_linear(&self, vg: &str, lv: &str, bytes: u64, tags: &[String]) -> LvmResult<()>;
    /// A thin LV of virtual size `bytes` in `pool`, active.
    fn create_thin(
        &self,
        vg: &str,
        pool: &str,
        lv: &str,
        bytes: u64,
        tags: &[String],
    ) -> LvmResult<()>;
    /// A thin snapshot `lv` of the thin LV `origin`, without the
    /// activation-skip flag LVM sets on snapshots by default, active.
    fn create_thin_snapshot(
        &self,
        vg: &str,
        origin: &str,
        lv: &str,
        tags: &[String],
    ) -> LvmResult<()>;
    /// Renames an LV (atomic; an active LV keeps its device number).
    fn rename(&self, vg: &str, from: &str, to: &str) -> LvmResult<()>;
    /// Grows an LV to `bytes` (a multiple of 512; rounded up to extents);
    /// no file system resize.
    fn extend(&self, vg: &str, lv: &str, bytes: u64) -> LvmResult<()>;
    /// Removes an LV (deactivating it first when it is not open).
    fn remove(&self, vg: &str, lv: &str) -> LvmResult<()>;
    /// Activates an LV, also one flagged to skip activation.
    fn activate(&self, vg: &str, lv: &str) -> LvmResult<()>;
    fn deactivate(&self, vg: &str, lv: &str) -> LvmResult<()>;
    /// Adds and removes tags in one metadata change.
    fn change_tags(&self, vg: &str, lv: &str, add: &[String], remove: &[String]) -> LvmResult<()>;
    /// Writes zeros over all of an LV's device (see [`zero`]); returns the
    /// bytes zeroed.
    fn zero_device(&self, device: &Path) -> LvmResult<u64>;
}

/// [`Lvm`] with the `lvm` binary.
#[derive(Debug, Clone)]
pub struct LinuxLvm {
    program: OsString,
    report_timeout: Duration,
    change_timeout: Duration,
}

impl Default for LinuxLvm {
    fn default() -> Self {
        Self::new()
    }
}

impl LinuxLvm {
    /// `lvm` from `PATH`.
    pub fn new() -> Self {
        Self::with_program("lvm")
    }

    /// Another `lvm` binary (an absolute path in a container image).
    pub fn with_program(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            report_timeout: REPORT_TIMEOUT,
            change_timeout: CHANGE_TIMEOUT,
        }
    }

    pub fn with_timeouts(mut self, report: Duration, change: Duration) -> Self {
        self.report_timeout = report;
        self.change_timeout = change;
        self
    }

    /// An `lvm` command; [`LinuxLvm::execute`] sets its time limit.
    fn command(&self, subcommand: &str) -> ToolCommand {
        ToolCommand::new(&self.program, self.change_timeout)
            // lvm warns about every inherited descriptor on stderr, which
            // would end up in error messages.
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .arg(subcommand)
            .arg("--config")
            .arg(LVM_CONFIG)
    }

    /// The command line for messages, without the long `--config` text.
    fn describe(command: &ToolCommand) -> String {
        let line = command.display();
        let quoted = format!(" --config {LVM_CONFIG}");
        line.replacen(&quoted, "", 1)
    }

    /// Runs a command that must succeed within `timeout`; its stdout.
    fn execute(&self, command: ToolCommand, timeout: Duration) -> LvmResult<String> {
        let command = command.timeout(timeout);
        let operation = Self::describe(&command);
        let finished = command.run_until_deadline().map_err(|error| {
            let mut error = LvmError::from(error);
            error.operation.clone_from(&operation);
            error
        })?;
        match finished {
            Finished::Exited(ToolOutput {
                status,
                stdout,
                stderr,
            }) => {
                if status.success() {
                    return Ok(stdout);
                }
                let stderr = stderr.trim();
                let detail = if stderr.is_empty() {
                    format!("{status} with no message")
                } else {
                    stderr.to_owned()
                };
                Err(LvmError::new(classify(&detail), operation, detail))
            }
            Finished::TimedOut => Err(LvmError::new(
                LvmErrorKind::TimedOut,
                operation,
                format!(
                    "did not finish within {:.0} s and was killed",
                    timeout.as_secs_f64()
                ),
            )),
        }
    }

    fn report_command(&self, subcommand: &str, fields: &str, target: &str) -> ToolCommand {
        self.command(subcommand).args([
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
            target,
        ])
    }

    /// Runs a report; its JSON.
    fn report(&self, command: ToolCommand) -> LvmResult<String> {
        self.execute(command, self.report_timeout)
    }

    /// Runs a change.
    fn change(&self, command: ToolCommand) -> LvmResult<()> {
        self.execute(command, self.change_timeout).map(drop)
    }
}

fn parsed<T>(operation: &str, result: Result<T, String>) -> LvmResult<T> {
    result.map_err(|detail| LvmError::new(LvmErrorKind::Failed, operation, detail))
}

fn full_name(vg: &str, lv: &str) -> String {
    format!("{vg}/{lv}")
}

fn size_argument(bytes: u64) -> String {
    format!("{bytes}b")
}

fn tag_arguments(flag: &str, tags: &[String]) -> Vec<String> {
    tags.iter()
        .flat_map(|tag| [flag.to_owned(), tag.clone()])
        .collect()
}

impl Lvm for LinuxLvm {
    fn logical_volumes(&self, vg: &str, tag: Option<&str>) -> LvmResult<Vec<LogicalVolume>> {
        let command = self.report_command("lvs", report::LV_FIELDS, vg);
        let operation = Self::describe(&command);
        let json = self.report(command)?;
        let mut volumes = parsed(&operation, report::parse_lvs(&json))?;
        // Filtered here rather than with `-S lv_tags=...`: tags contain
        // `=` and `/`, which the selection syntax would have to quote.
        if let Some(tag) = tag {
            volumes.retain(|lv| lv.has_tag(tag));
        }
        Ok(volumes)
    }

    fn logical_volume(&self, vg: &str, lv: &str) -> LvmResult<Option<LogicalVolume>> {
        let command = self.report_command("lvs", report::LV_FIELDS, &full_name(vg, lv));
        let operation = Self::describe(&command);
        match self.report(command) {
            Ok(json) => Ok(parsed(&operation, report::parse_lvs(&json))?
                .into_iter()
                .find(|volume| volume.name == lv)),
            // "Failed to find logical volume": absent. A missing VG is an
            // error (a misconfigured class), not an absent LV.
            Err(error)
                if error.kind == LvmErrorKind::NotFound
                    && error.detail.to_ascii_lowercase().contains("failed to find") =>
            {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    fn volume_group(&self, vg: &str) -> LvmResult<VolumeGroup> {
        let command = self.report_command("vgs", report::VG_FIELDS, vg);
        let operation = Self::describe(&command);
        let json = self.report(command)?;
        parsed(&operation, report::parse_vgs(&json))?
            .into_iter()
            .find(|group| group.name == vg)
            .ok_or_else(|| {
                LvmError::new(
                    LvmErrorKind::NotFound,
                    operation,
                    format!("volume group {vg} is not in the report"),
                )
            })
    }

    fn thin_pool(&self, vg: &str, pool: &str) -> LvmResult<ThinPool> {
        let command = self.report_command("lvs", report::THIN_POOL_FIELDS, &full_name(vg, pool));
        let operation = Self::describe(&command);
        let json = self.report(command)?;
        let volumes = parsed(&operation, report::parse_lvs(&json))?;
        let pools = parsed(&operation, report::parse_thin_pools(&json))?;
        match pools.into_iter().find(|found| found.volume.name == pool) {
            Some(found) => Ok(found),
            None if volumes.iter().any(|lv| lv.name == pool) => Err(LvmError::new(
                LvmErrorKind::Failed,
                operation,
                format!("{vg}/{pool} is not a thin pool"),
            )),
            None => Err(LvmError::new(
                LvmErrorKind::NotFound,
                operation,
                format!("thin pool {vg}/{pool} not found"),
            )),
        }
    }

    fn create_linear(&self, vg: &str, lv: &str, bytes: u64, tags: &[String]) -> LvmResult<()> {
        let command = self
            .command("lvcreate")
            .args(["--yes", "--wipesignatures", "y", "-Z", "y", "-n", lv])
            .arg("-L")
            .arg(size_argument(bytes))
            .args(tag_arguments("--addtag", tags))
            .arg(vg);
        self.change(command)
    }

    fn create_thin(
        &self,
        vg: &str,
        pool: &str,
        lv: &str,
        bytes: u64,
        tags: &[String],
    ) -> LvmResult<()> {
        let command = self
            .command("lvcreate")
            .args(["--yes", "-n", lv, "--thinpool", pool])
            .arg("-V")
            .arg(size_argument(bytes))
            .args(tag_arguments("--addtag", tags))
            .arg(vg);
        self.change(command)
    }

    fn create_thin_snapshot(
        &self,
        vg: &str,
        origin: &str,
        lv: &str,
        tags: &[String],
    ) -> LvmResult<()> {
        // `-kn`: no activation-skip flag, so the snapshot activates like
        // any LV (now and on `lvchange -ay`).
        let command = self
            .command("lvcreate")
            .args(["--yes", "-s", "-kn", "-n", lv])
            .args(tag_arguments("--addtag", tags))
            .arg(full_name(vg, origin));
        self.change(command)
    }

    fn rename(&self, vg: &str, from: &str, to: &str) -> LvmResult<()> {
        let command = self.command("lvrename").args([vg, from, to]);
        self.change(command)
    }

    fn extend(&self, vg: &str, lv: &str, bytes: u64) -> LvmResult<()> {
        let command = self
            .command("lvextend")
            .arg("-L")
            .arg(size_argument(bytes))
            .arg(full_name(vg, lv));
        self.change(command)
    }

    fn remove(&self, vg: &str, lv: &str) -> LvmResult<()> {
        let command = self.command("lvremove").arg("-y").arg(full_name(vg, lv));
        self.change(command)
    }

    fn activate(&self, vg: &str, lv: &str) -> LvmResult<()> {
        // `-K`: also an LV with the activation-skip flag (thin snapshots
        // made by other tools).
        let command = self
            .command("lvchange")
            .args(["-ay", "-K"])
            .arg(full_name(vg, lv));
        self.change(command)
    }

    fn deactivate(&self, vg: &str, lv: &str) -> LvmResult<()> {
        let command = self.command("lvchange").arg("-an").arg(full_name(vg, lv));
        self.change(command)
    }

    fn change_tags(&self, vg: &str, lv: &str, add: &[String], remove: &[String]) -> LvmResult<()> {
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let command = self
            .command("lvchange")
            .args(tag_arguments("--deltag", remove))
            .args(tag_arguments("--addtag", add))
            .arg(full_name(vg, lv));
        self.change(command)
    }

    fn zero_device(&self, device: &Path) -> LvmResult<u64> {
        Ok(zero::zero_block_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_lvm_messages() {
        let cases = [
            (
                "  Logical Volume \"thin1\" already exists in volume group \"lcx\"",
                LvmErrorKind::AlreadyExists,
            ),
            (
                "  Volume group \"lcx\" has insufficient free space (254 extents): 1280 required.",
                LvmErrorKind::NoSpace,
            ),
            ("  Logical volume lcx/lin1 in use.", LvmErrorKind::Busy),
            (
                "  Failed to find logical volume \"lcx/nope\"",
                LvmErrorKind::NotFound,
            ),
            (
                "  Volume group \"nosuchvg\" not found\n  Cannot process volume group nosuchvg",
                LvmErrorKind::NotFound,
            ),
            (
                "  Pool nopool not found in Volume group lcx.",
                LvmErrorKind::NotFound,
            ),
            (
                "  New size (5 extents) matches existing size (5 extents).",
                LvmErrorKind::Failed,
            ),
            (
                "  Size is not a multiple of 512. Try using 10485760 or 10486272.\n  \
                 Invalid argument for --size: 10485761b\n  Error during parsing of command line.",
                LvmErrorKind::Failed,
            ),
            // A warning's words do not decide the kind.
            (
                "  WARNING: Device /dev/loop0 not found in use somewhere.\n  \
                 Logical Volume \"x\" already exists in volume group \"vg\"",
                LvmErrorKind::AlreadyExists,
            ),
            (
                "  /usr/sbin/thin_check: execvp failed: No such file or directory\n  \
                 WARNING: Check is skipped, please install recommended missing binary \
                 /usr/sbin/thin_check!\n  Insufficient free space: 40 extents needed, but only 3 available",
                LvmErrorKind::NoSpace,
            ),
        ];
        for (message, kind) in cases {
            assert_eq!(classify(message), kind, "{message}");
        }
    }

    #[test]
    fn the_config_is_one_argument_with_every_setting() {
        for setting in [
            "udev_sync = 0",
            "udev_rules = 0",
            "verify_udev_operations = 1",
            "monitoring = 0",
            "obtain_device_list_from_udev = 0",
            "ignore_suspended_devices = 1",
            "global_filter = [ \"r|^/dev/mapper/liveclone-|\" ]",
            "use_lvmpolld = 0",
        ] {
            assert!(LVM_CONFIG.contains(setting), "{setting}");
        }
        let command = LinuxLvm::with_program("/usr/sbin/lvm").report_command(
            "lvs",
            report::LV_FIELDS,
            "vg0/lv0",
        );
        // The message form leaves the config out; the arguments keep it.
        assert_eq!(
            LinuxLvm::describe(&command),
            format!(
                "/usr/sbin/lvm lvs --reportformat json --units b --nosuffix -o {} vg0/lv0",
                report::LV_FIELDS
            )
        );
        assert!(command.display().contains(LVM_CONFIG));
    }

    #[test]
    fn a_missing_binary_is_unsupported() {
        let lvm = LinuxLvm::with_program("/nonexistent/liveclone-no-lvm");
        let error = lvm.volume_group("vg0").expect_err("cannot run");
        assert_eq!(error.kind, LvmErrorKind::Unsupported);
        assert!(error
            .operation
            .starts_with("/nonexistent/liveclone-no-lvm vgs"));
    }

    #[test]
    fn tags_become_repeated_flags() {
        assert_eq!(
            tag_arguments("--addtag", &["a".into(), "b=c".into()]),
            ["--addtag", "a", "--addtag", "b=c"]
        );
        assert!(tag_arguments("--deltag", &[]).is_empty());
    }
}
