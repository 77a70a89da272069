//! [`DeviceMapper`] with the `dmsetup` tool (LVM2's libdevmapper).
//!
//! # udev
//!
//! The driver runs in a container where udev usually does not run, or runs
//! on the host with rules the container cannot see. dmsetup's default is to
//! wait on a udev cookie for every change that creates or removes a node,
//! which then never completes. So every call passes `--noudevsync` and sets
//! `DM_DISABLE_UDEV=1`, which makes libdevmapper create and remove the
//! `/dev/mapper/<name>` nodes itself. [`Dmsetup::create`] checks that the
//! node exists with the right device number (and asks `dmsetup mknodes` to
//! repair it once if not), because everything above uses that path.
//!
//! # No flush on status
//!
//! A status read without `--noflush` makes dm-clone commit its metadata and
//! flush the destination; a poller would do that every few seconds. Status
//! is therefore always read with `--noflush`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use super::device::{DeviceMapper, DmInfo, DmName, SuspendFlush, DM_NAME_PREFIX};
use super::{CloneMessage, CloneStatusLine, Table};
use crate::os::command::{Finished, ToolCommand};
use crate::os::error::{OsError, OsErrorKind, OsResult};

const DMSETUP: &str = "dmsetup";

/// The time limit for one dmsetup call. Most take milliseconds; a flushing
/// suspend waits for in-flight I/O, which on a slow or failing disk can take
/// long. A call stuck in the kernel is killed at the limit (and reaped in
/// the background if it cannot die yet).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The `info` columns we ask for, in this order.
const INFO_COLUMNS: &str = "name,major,minor,attr,open,events";
/// A separator no device name of ours contains (names are `[a-z0-9-]`).
const INFO_SEPARATOR: &str = "|";

/// `dmsetup`, run with an argument vector.
#[derive(Debug, Clone)]
pub struct Dmsetup {
    timeout: Duration,
}

impl Default for Dmsetup {
    fn default() -> Self {
        Self::new()
    }
}

impl Dmsetup {
    pub fn new() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A different limit for each call (except [`DeviceMapper::wait_event`],
    /// which uses the timeout it is given).
    pub fn with_timeout(timeout: Duration) -> Self {
        Self { timeout }
    }

    /// `dmsetup --noudevsync <args>` with udev disabled for libdevmapper.
    fn command(&self) -> ToolCommand {
        ToolCommand::new(DMSETUP, self.timeout)
            .env("DM_DISABLE_UDEV", "1")
            .arg("--noudevsync")
    }

    /// Makes sure `/dev/mapper/<name>` is the block device `major:minor`,
    /// asking libdevmapper to fix the node once if it is not.
    fn ensure_node(&self, name: &DmName, major: u32, minor: u32) -> OsResult<()> {
        let path = name.mapper_path();
        if node_matches(&path, major, minor) {
            return Ok(());
        }
        tracing::warn!(
            device = %name,
            "{} is missing or stale after a change; running dmsetup mknodes",
            path.display()
        );
        self.command().args(["mknodes", name.as_str()]).run()?;
        if node_matches(&path, major, minor) {
            Ok(())
        } else {
            Err(OsError::new(
                OsErrorKind::Failed,
                format!("dmsetup mknodes {name}"),
                format!(
                    "{} is not the block device {major}:{minor}; is /dev writable \
                     and not managed by a udev that renames device-mapper nodes?",
                    path.display()
                ),
            ))
        }
    }

    fn require_info(&self, name: &DmName) -> OsResult<DmInfo> {
        self.info(name)?.ok_or_else(|| {
            OsError::new(
                OsErrorKind::NotFound,
                format!("dmsetup info {name}"),
                "Device does not exist.",
            )
        })
    }
}

impl DeviceMapper for Dmsetup {
    /// `dmsetup create NAME` with the table on stdin (one target per line).
    /// When the table is refused, dmsetup removes the half-made device
    /// itself, so a failed create leaves nothing behind.
    fn create(&self, name: &DmName, table: &Table) -> OsResult<()> {
        self.command()
            .args(["create", name.as_str()])
            .stdin(table_input(table))
            .run()?;
        let info = self.require_info(name)?;
        self.ensure_node(name, info.major, info.minor)
    }

    fn load(&self, name: &DmName, table: &Table) -> OsResult<()> {
        self.command()
            .args(["load", name.as_str()])
            .stdin(table_input(table))
            .run()
            .map(drop)
    }

    fn suspend(&self, name: &DmName, flush: SuspendFlush) -> OsResult<()> {
        let mut command = self.command().arg("suspend");
        if flush == SuspendFlush::NoFlush {
            command = command.arg("--noflush");
        }
        command.arg(name.as_str()).run().map(drop)
    }

    fn resume(&self, name: &DmName) -> OsResult<()> {
        self.command()
            .args(["resume", name.as_str()])
            .run()
            .map(drop)
    }

    /// Plain remove: no `--force` (which would replace the table with an
    /// error target under an opener) and no `--deferred` (which would hide a
    /// leak until the last close). A device that is still open is
    /// [`OsErrorKind::Busy`]; the caller retries (udev's probes on a host
    /// with udev can hold a new device open for a moment).
    fn remove(&self, name: &DmName) -> OsResult<()> {
        let command = self.command().args(["remove", name.as_str()]);
        let output = command.output()?;
        if output.status.success() {
            return Ok(());
        }
        // Decide "absent" by asking, not from the message: success must
        // only ever mean that the device is gone.
        if self.info(name)?.is_none() {
            return Ok(());
        }
        Err(command.failure(&output))
    }

    fn info(&self, name: &DmName) -> OsResult<Option<DmInfo>> {
        let command = self.command().args([
            "info",
            "--columns",
            "--noheadings",
            "--separator",
            INFO_SEPARATOR,
            "-o",
            INFO_COLUMNS,
            name.as_str(),
        ]);
        let output = command.output()?;
        if !output.status.success() {
            return if is_absent_message(&output.stderr) {
                Ok(None)
            } else {
                Err(command.failure(&output))
            };
        }
        parse_info(&output.stdout, name)
            .map(Some)
            .map_err(|detail| OsError::new(OsErrorKind::Failed, command.display(), detail))
    }

    fn table(&self, name: &DmName) -> OsResult<Table> {
        let command = self.command().args(["table", name.as_str()]);
        let output = command.run()?;
        output.stdout.parse().map_err(|error| {
            OsError::new(
                OsErrorKind::Failed,
                command.display(),
                format!("cannot parse the table {:?}: {error}", output.stdout.trim()),
            )
        })
    }

    fn clone_status(&self, name: &DmName) -> OsResult<CloneStatusLine> {
        let command = self.command().args(["status", "--noflush", name.as_str()]);
        let output = command.run()?;
        CloneStatusLine::from_dmsetup_output(&output.stdout).map_err(|error| {
            OsError::new(
                OsErrorKind::Failed,
                command.display(),
                format!(
                    "cannot parse the status {:?}: {error}",
                    output.stdout.trim()
                ),
            )
        })
    }

    fn message(&self, name: &DmName, message: &CloneMessage) -> OsResult<()> {
        let text = message.to_string();
        self.command()
            .args(["message", name.as_str(), "0"])
            .args(text.split_ascii_whitespace())
            .run()
            .map(drop)
    }

    /// `dmsetup wait NAME EVENT_NR` in a child killed at `timeout`. The
    /// kernel (`DM_DEV_WAIT`) returns as soon as the device's counter
    /// differs from `event_nr`, so a stale `event_nr` returns at once; the
    /// counter is then read with `info`.
    fn wait_event(&self, name: &DmName, event_nr: u32, timeout: Duration) -> OsResult<Option<u32>> {
        let command =
            self.command()
                .timeout(timeout)
                .args(["wait", name.as_str(), &event_nr.to_string()]);
        match command.run_until_deadline()? {
            Finished::TimedOut => Ok(None),
            Finished::Exited(output) if output.status.success() => {
                Ok(Some(self.require_info(name)?.event_nr))
            }
            Finished::Exited(output) => Err(command.failure(&output)),
        }
    }

    fn list(&self) -> OsResult<Vec<DmName>> {
        let output = self.command().arg("ls").run()?;
        Ok(parse_ls(&output.stdout))
    }
}

/// The table as dmsetup reads it from stdin: one target per line.
fn table_input(table: &Table) -> Vec<u8> {
    format!("{table}\n").into_bytes()
}

/// What dmsetup prints for a device that does not exist: `info` says
/// "Device does not exist.", the ioctls say ENXIO.
fn is_absent_message(stderr: &str) -> bool {
    stderr.contains("Device does not exist") || stderr.contains("No such device or address")
}

fn node_matches(path: &Path, major: u32, minor: u32) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| {
        meta.file_type().is_block_device()
            && meta.rdev() == nix::sys::stat::makedev(u64::from(major), u64::from(minor))
    })
}

/// Parses `dmsetup info --columns --noheadings --separator '|' -o
/// name,major,minor,attr,open,events`, e.g. `liveclone-x|253|0|L--w|0|0`.
///
/// `attr` is four flags by position: `L` live table, `I` inactive table,
/// `s` suspended, `r`/`w` read-only or writable (later dmsetup versions may
/// append more, which are ignored).
fn parse_info(output: &str, name: &DmName) -> Result<DmInfo, String> {
    let mut lines = output.lines().filter(|line| !line.trim().is_empty());
    let line = lines
        .next()
        .ok_or_else(|| "dmsetup info printed nothing".to_owned())?;
    if lines.next().is_some() {
        return Err(format!("dmsetup info printed several lines: {output:?}"));
    }
    let fields: Vec<&str> = line.trim().split(INFO_SEPARATOR).collect();
    let [got_name, major, minor, attr, open, events] = fields.as_slice() else {
        return Err(format!("expected 6 fields ({INFO_COLUMNS}), got {line:?}"));
    };
    if *got_name != name.as_str() {
        return Err(format!(
            "asked about {name}, dmsetup answered about {got_name:?}"
        ));
    }
    let number = |field: &str, what: &str| -> Result<u32, String> {
        field
            .trim()
            .parse()
            .map_err(|_| format!("{what} {field:?} is not a number in {line:?}"))
    };
    let flags: Vec<char> = attr.chars().collect();
    if flags.len() < 4 {
        return Err(format!("attr {attr:?} is shorter than 4 flags in {line:?}"));
    }
    Ok(DmInfo {
        major: number(major, "major")?,
        minor: number(minor, "minor")?,
        suspended: flags[2] == 's',
        inactive_table: flags[1] == 'I',
        open_count: number(open, "open count")?,
        event_nr: number(events, "event number")?,
    })
}

/// Parses `dmsetup ls`: `<name>\t(<major>:<minor>)` per device, or
/// `No devices found`. Keeps only valid names with our prefix; a name with
/// the prefix that is not a valid [`DmName`] is someone else's.
fn parse_ls(output: &str) -> Vec<DmName> {
    output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(DM_NAME_PREFIX))
        .filter_map(|name| match name.parse::<DmName>() {
            Ok(name) => Some(name),
            Err(error) => {
                tracing::debug!(%error, "ignoring a device-mapper device that is not ours");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DmName {
        s.parse().expect("valid test name")
    }

    #[test]
    fn parses_info_lines_captured_in_the_vm() {
        let x = name("liveclone-x");
        assert_eq!(
            parse_info("liveclone-x|253|0|L--w|0|0\n", &x),
            Ok(DmInfo {
                major: 253,
                minor: 0,
                suspended: false,
                inactive_table: false,
                open_count: 0,
                event_nr: 0,
            })
        );
        // Suspended, then a table loaded but not resumed.
        let suspended = parse_info("liveclone-x|253|0|L-sw|1|3", &x).expect("parses");
        assert!(suspended.suspended && !suspended.inactive_table);
        assert_eq!((suspended.open_count, suspended.event_nr), (1, 3));
        let inactive = parse_info("liveclone-x|253|7|LI-w|0|0", &x).expect("parses");
        assert!(inactive.inactive_table && !inactive.suspended);
        assert_eq!(inactive.minor, 7);
        // Extra flags from a newer dmsetup are ignored.
        assert!(parse_info("liveclone-x|253|0|LIsrp|0|0", &x).is_ok_and(|i| i.suspended));
    }

    #[test]
    fn refuses_info_it_cannot_trust() {
        let x = name("liveclone-x");
        assert!(parse_info("", &x).is_err());
        assert!(parse_info("liveclone-y|253|0|L--w|0|0", &x).is_err());
        assert!(parse_info("liveclone-x|253|0|L--w|0", &x).is_err());
        assert!(parse_info("liveclone-x|253|zero|L--w|0|0", &x).is_err());
        assert!(parse_info("liveclone-x|253|0|L-|0|0", &x).is_err());
        assert!(parse_info("liveclone-x|253|0|L--w|0|0\nliveclone-x|253|0|L--w|0|0", &x).is_err());
    }

    #[test]
    fn lists_only_our_devices() {
        let output = "liveclone-x\t(253:0)\nvg0-root\t(253:1)\nliveclone-Upper\t(253:2)\n\
                      liveclone-lcv-0123\t(253:3)\n";
        assert_eq!(
            parse_ls(output),
            vec![name("liveclone-x"), name("liveclone-lcv-0123")]
        );
        assert_eq!(parse_ls("No devices found\n"), Vec::<DmName>::new());
        assert_eq!(parse_ls(""), Vec::<DmName>::new());
    }

    #[test]
    fn recognises_absent_devices() {
        assert!(is_absent_message(
            "Device does not exist.\nCommand failed.\n"
        ));
        assert!(is_absent_message(
            "device-mapper: table ioctl on liveclone-x  failed: No such device or address\n"
        ));
        assert!(!is_absent_message(
            "device-mapper: remove ioctl on liveclone-x  failed: Device or resource busy\n"
        ));
    }

    #[test]
    fn a_table_goes_to_stdin_one_target_per_line() {
        let table: Table = "0 8 linear 7:0 0\n8 8 linear 7:1 0".parse().expect("table");
        assert_eq!(
            table_input(&table),
            b"0 8 linear 7:0 0\n8 8 linear 7:1 0\n".to_vec()
        );
    }
}
