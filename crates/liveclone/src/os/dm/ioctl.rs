//! [`DeviceMapper`] with the kernel's device-mapper ioctls, through the
//! `devicemapper` crate (Stratis), on `/dev/mapper/control`.
//!
//! # Why ioctls and not `dmsetup`
//!
//! A clone's creation and its switch to linear are a few dozen
//! device-mapper calls. As processes, each one costs an exec and dynamic
//! loading (50-250 ms each in the test VM, a few ms on hardware), and the
//! switch held I/O across three of them. As ioctls, each costs the kernel's
//! own time, and a device stays suspended only for the ioctls that must run
//! while it is.
//!
//! # Device nodes and udev
//!
//! The driver usually runs in a container where udev does not run (no
//! `/run/udev/control`): then nobody else creates `/dev/mapper/<name>`, so
//! [`DmIoctl::create`] makes the node itself (as libdevmapper does with
//! udev disabled) and [`DmIoctl::remove`] unlinks it. Where udev does run,
//! the crate waits on the device-mapper udev cookie for the calls that make
//! or remove nodes, and a node udev already made is accepted when it is the
//! right block device.
//!
//! # No flush on status
//!
//! A status read without `DM_NOFLUSH_FLAG` makes dm-clone commit its
//! metadata and flush the destination; a poller would do that every few
//! seconds. Status is therefore always read with the no-flush flag.
//!
//! # Events
//!
//! `DM_DEV_WAIT` blocks without a time limit, so [`DmIoctl::wait_event`]
//! uses the control device's poll instead (`DM_DEV_ARM_POLL`, kernel 4.13+):
//! a private control file is armed, the device's counter is checked, and
//! `poll(2)` then wakes on the next event of any device, with a deadline.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use devicemapper as kernel_dm;
use kernel_dm::{DevId, DmFlags, DmOptions, DM};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::device::{DeviceMapper, DmInfo, DmName, SuspendFlush, DM_NAME_PREFIX};
use super::{CloneMessage, CloneStatusLine, Table};
use crate::os::error::{OsError, OsErrorKind, OsResult};

const CONTROL: &str = "/dev/mapper/control";

/// Device-mapper through ioctls. The control file is opened at first use,
/// so a process on a kernel without device-mapper still starts (and its
/// health check says what is missing).
#[derive(Default)]
pub struct DmIoctl {
    control: OnceLock<DM>,
}

impl std::fmt::Debug for DmIoctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmIoctl")
            .field("control_open", &self.control.get().is_some())
            .finish()
    }
}

impl DmIoctl {
    pub fn new() -> Self {
        Self::default()
    }

    fn control(&self) -> OsResult<&DM> {
        if let Some(dm) = self.control.get() {
            return Ok(dm);
        }
        let dm = open_control()?;
        // Two threads may race to open; the loser's file is dropped.
        Ok(self.control.get_or_init(|| dm))
    }

    /// Makes sure `/dev/mapper/<name>` is the block device `major:minor`.
    fn ensure_node(&self, name: &DmName, major: u32, minor: u32) -> OsResult<()> {
        let path = name.mapper_path();
        if node_matches(&path, major, minor) {
            return Ok(());
        }
        let operation = format!("mknod {} {major}:{minor}", path.display());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| OsError::io(&operation, parent, &e))?;
        }
        // A stale node (a reused name whose minor changed) is ours to replace:
        // the path holds a name with our prefix.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(OsError::io(&operation, &path, &e)),
        }
        let made = nix::sys::stat::mknod(
            &path,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o660),
            nix::sys::stat::makedev(u64::from(major), u64::from(minor)),
        );
        match made {
            Ok(()) => Ok(()),
            // udev made it between our check and our mknod.
            Err(nix::errno::Errno::EEXIST) if node_matches(&path, major, minor) => Ok(()),
            Err(errno) => Err(OsError::io(&operation, &path, &errno.into())),
        }
    }

    fn require_info(&self, name: &DmName) -> OsResult<DmInfo> {
        self.info(name)?.ok_or_else(|| {
            OsError::new(
                OsErrorKind::NotFound,
                format!("DM_DEV_STATUS {name}"),
                "the device does not exist",
            )
        })
    }

    fn load_into(&self, dm: &DM, name: &DmName, table: &Table) -> OsResult<()> {
        let targets = table_targets(table);
        dm.table_load(
            &DevId::Name(kernel_name(name)?),
            &targets,
            DmOptions::default(),
        )
        .map(drop)
        .map_err(|e| dm_error(format!("DM_TABLE_LOAD {name} [{table}]"), e))
    }
}

/// Opens the device-mapper control device (also for the kernel's target
/// check in `os::kernel`).
pub(crate) fn open_control() -> OsResult<DM> {
    DM::new().map_err(|e| {
        let mut error = dm_error(format!("open {CONTROL}"), e);
        if !Path::new(CONTROL).exists() {
            error.kind = OsErrorKind::Unsupported;
            error.detail = format!(
                "{CONTROL} does not exist: is the dm-mod module loaded, and /dev shared with this container?"
            );
        }
        error
    })
}

/// The version (`1.0.0`) of a registered target type, `None` when the
/// kernel has no such target loaded.
pub(crate) fn target_version(dm: &DM, target: &str) -> OsResult<Option<String>> {
    let targets = dm
        .list_versions()
        .map_err(|e| dm_error("DM_LIST_VERSIONS", e))?;
    Ok(targets
        .into_iter()
        .find(|(name, ..)| name == target)
        .map(|(_, major, minor, patch)| format!("{major}.{minor}.{patch}")))
}

impl DeviceMapper for DmIoctl {
    /// Create, load, resume. A refused table removes the half-made device
    /// again, so a failed create leaves nothing behind (as dmsetup does).
    fn create(&self, name: &DmName, table: &Table) -> OsResult<()> {
        let dm = self.control()?;
        let id_name = kernel_name(name)?;
        dm.device_create(id_name, None, DmOptions::default())
            .map_err(|e| dm_error(format!("DM_DEV_CREATE {name}"), e))?;
        let loaded = self
            .load_into(dm, name, table)
            .and_then(|()| self.resume(name));
        if let Err(error) = loaded {
            if let Err(cleanup) = dm.device_remove(&DevId::Name(id_name), DmOptions::default()) {
                tracing::warn!(device = %name, error = %cleanup,
                    "removing a device whose table was refused failed; recovery removes it later");
            }
            return Err(error);
        }
        let info = self.require_info(name)?;
        self.ensure_node(name, info.major, info.minor)
    }

    fn load(&self, name: &DmName, table: &Table) -> OsResult<()> {
        self.load_into(self.control()?, name, table)
    }

    fn suspend(&self, name: &DmName, flush: SuspendFlush) -> OsResult<()> {
        let flags = match flush {
            SuspendFlush::Flush => DmFlags::DM_SUSPEND,
            SuspendFlush::FlushKeepFs => DmFlags::DM_SUSPEND | DmFlags::DM_SKIP_LOCKFS,
            SuspendFlush::NoFlush => DmFlags::DM_SUSPEND | DmFlags::DM_NOFLUSH,
        };
        self.control()?
            .device_suspend(
                &DevId::Name(kernel_name(name)?),
                DmOptions::default().set_flags(flags),
            )
            .map(drop)
            .map_err(|e| dm_error(format!("DM_DEV_SUSPEND {name} ({flush:?})"), e))
    }

    fn resume(&self, name: &DmName) -> OsResult<()> {
        self.control()?
            .device_suspend(&DevId::Name(kernel_name(name)?), DmOptions::default())
            .map(drop)
            .map_err(|e| dm_error(format!("DM_DEV_SUSPEND {name} (resume)"), e))
    }

    fn clear_inactive(&self, name: &DmName) -> OsResult<()> {
        self.control()?
            .table_clear(&DevId::Name(kernel_name(name)?))
            .map(drop)
            .map_err(|e| dm_error(format!("DM_TABLE_CLEAR {name}"), e))
    }

    /// A plain remove: no deferred remove (which would hide a leak until the
    /// last close). A device that is still open is [`OsErrorKind::Busy`];
    /// the caller retries.
    fn remove(&self, name: &DmName) -> OsResult<()> {
        let Some(info) = self.info(name)? else {
            return Ok(());
        };
        let removed = self
            .control()?
            .device_remove(&DevId::Name(kernel_name(name)?), DmOptions::default());
        match removed {
            Ok(_) => {}
            Err(e) => {
                let error = dm_error(format!("DM_DEV_REMOVE {name}"), e);
                // Success must only ever mean that the device is gone.
                if !(error.is_not_found() && self.info(name)?.is_none()) {
                    return Err(error);
                }
            }
        }
        let path = name.mapper_path();
        if node_matches(&path, info.major, info.minor) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(device = %name, error = %e,
                    "the device is removed but its node could not be unlinked"),
            }
        }
        Ok(())
    }

    fn info(&self, name: &DmName) -> OsResult<Option<DmInfo>> {
        match self
            .control()?
            .device_info(&DevId::Name(kernel_name(name)?))
        {
            Ok(info) => Ok(Some(DmInfo {
                major: info.device().major,
                minor: info.device().minor,
                suspended: info.flags().contains(DmFlags::DM_SUSPEND),
                inactive_table: info.flags().contains(DmFlags::DM_INACTIVE_PRESENT),
                open_count: u32::try_from(info.open_count()).unwrap_or(0),
                event_nr: info.event_nr(),
            })),
            Err(e) => {
                let error = dm_error(format!("DM_DEV_STATUS {name}"), e);
                if error.is_not_found() {
                    Ok(None)
                } else {
                    Err(error)
                }
            }
        }
    }

    fn table(&self, name: &DmName) -> OsResult<Table> {
        let operation = format!("DM_TABLE_STATUS {name} (table)");
        let (_, lines) = self
            .control()?
            .table_status(
                &DevId::Name(kernel_name(name)?),
                DmOptions::default().set_flags(DmFlags::DM_STATUS_TABLE),
            )
            .map_err(|e| dm_error(&operation, e))?;
        let text = status_text(&lines);
        text.parse().map_err(|error| {
            OsError::new(
                OsErrorKind::Failed,
                operation,
                format!("cannot parse the table {text:?}: {error}"),
            )
        })
    }

    fn clone_status(&self, name: &DmName) -> OsResult<CloneStatusLine> {
        let operation = format!("DM_TABLE_STATUS {name} (status, no flush)");
        let (_, lines) = self
            .control()?
            .table_status(
                &DevId::Name(kernel_name(name)?),
                DmOptions::default().set_flags(DmFlags::DM_NOFLUSH),
            )
            .map_err(|e| dm_error(&operation, e))?;
        let text = status_text(&lines);
        CloneStatusLine::from_dmsetup_output(&text).map_err(|error| {
            OsError::new(
                OsErrorKind::Failed,
                operation,
                format!("cannot parse the status {text:?}: {error}"),
            )
        })
    }

    fn message(&self, name: &DmName, message: &CloneMessage) -> OsResult<()> {
        let text = message.to_string();
        self.control()?
            .target_msg(&DevId::Name(kernel_name(name)?), Some(0), &text)
            .map(drop)
            .map_err(|e| dm_error(format!("DM_TARGET_MSG {name} {text:?}"), e))
    }

    fn wait_event(&self, name: &DmName, event_nr: u32, timeout: Duration) -> OsResult<Option<u32>> {
        let deadline = Instant::now() + timeout;
        // A private control file: arming is per open file, and the shared
        // one must not be woken by (or wake) other waiters.
        let waiter = open_control()?;
        loop {
            waiter
                .arm_poll()
                .map_err(|e| dm_error(format!("DM_DEV_ARM_POLL for {name}"), e))?;
            // Checked after arming, so an event between the caller's read of
            // the counter and the arm is not missed.
            let now = self.require_info(name)?.event_nr;
            if now != event_nr {
                return Ok(Some(now));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            poll_readable(waiter.file(), left)
                .map_err(|e| OsError::io(format!("poll {CONTROL} for {name}"), CONTROL, &e))?;
        }
    }

    fn list(&self) -> OsResult<Vec<DmName>> {
        let devices = self
            .control()?
            .list_devices()
            .map_err(|e| dm_error("DM_LIST_DEVICES", e))?;
        Ok(our_names(
            devices.iter().map(|(name, _, _)| name.to_string()),
        ))
    }
}

/// Waits until `file` is readable or `left` passes; an interrupted wait is
/// simply shorter (the caller loops on its deadline).
fn poll_readable(file: &File, left: Duration) -> std::io::Result<()> {
    // poll(2) takes at most i32::MAX ms; a longer wait is just re-polled.
    let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, timeout) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// Our name in the crate's type (the crate re-checks the kernel's limits).
fn kernel_name(name: &DmName) -> OsResult<&kernel_dm::DmName> {
    kernel_dm::DmName::new(name.as_str()).map_err(|e| {
        OsError::new(
            OsErrorKind::Failed,
            format!("device-mapper name {name}"),
            e.to_string(),
        )
    })
}

/// `(start, length, type, params)` per target, as the ioctl takes them.
fn table_targets(table: &Table) -> Vec<(u64, u64, String, String)> {
    table
        .lines()
        .iter()
        .map(|line| {
            (
                line.start.0,
                line.length.0,
                line.target.type_name().to_owned(),
                line.target.params(),
            )
        })
        .collect()
}

/// The ioctl's `(start, length, type, params)` lines in dmsetup's text
/// form, which the typed parsers read.
fn status_text(lines: &[(u64, u64, String, String)]) -> String {
    lines
        .iter()
        .map(|(start, length, kind, params)| format!("{start} {length} {kind} {params}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Valid names with our prefix; a prefixed name that is not a valid
/// [`DmName`] is someone else's.
fn our_names(names: impl Iterator<Item = String>) -> Vec<DmName> {
    names
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

fn node_matches(path: &Path, major: u32, minor: u32) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| {
        meta.file_type().is_block_device()
            && meta.rdev() == nix::sys::stat::makedev(u64::from(major), u64::from(minor))
    })
}

/// Maps the crate's error to ours by errno: the kernel answers ENXIO for a
/// device that does not exist, EBUSY for one that is open or a name that is
/// taken (EEXIST on create).
fn dm_error(operation: impl Into<String>, error: kernel_dm::DmError) -> OsError {
    let operation = operation.into();
    let errno = match &error {
        kernel_dm::DmError::Core(kernel_dm::errors::Error::Ioctl(_, _, _, errno)) => Some(**errno),
        _ => None,
    };
    match errno {
        Some(errno) => {
            let kind = match errno {
                nix::errno::Errno::ENXIO
                | nix::errno::Errno::ENODEV
                | nix::errno::Errno::ENOENT => OsErrorKind::NotFound,
                nix::errno::Errno::EBUSY | nix::errno::Errno::EEXIST => OsErrorKind::Busy,
                nix::errno::Errno::ENOSPC => OsErrorKind::NoSpace,
                nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP => {
                    OsErrorKind::Unsupported
                }
                _ => OsErrorKind::Failed,
            };
            // The kernel logs why it refused a table or a message; the errno
            // alone (usually EINVAL) does not say.
            let hint = if kind == OsErrorKind::Failed {
                " (the kernel log says why: dmesg | grep device-mapper)"
            } else {
                ""
            };
            OsError::new(kind, operation, format!("{}{hint}", errno.desc()))
        }
        None => OsError::new(OsErrorKind::Failed, operation, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DmName {
        s.parse().expect("valid test name")
    }

    #[test]
    fn lists_only_our_devices() {
        let names = [
            "liveclone-x",
            "vg0-root",
            "liveclone-Upper",
            "liveclone-lcv-0123",
        ];
        assert_eq!(
            our_names(names.iter().map(|s| (*s).to_owned())),
            vec![name("liveclone-x"), name("liveclone-lcv-0123")]
        );
    }

    #[test]
    fn tables_go_to_the_kernel_one_tuple_per_target_and_come_back() {
        let table: Table = "0 8 linear 7:0 0\n8 8 linear 7:1 0".parse().expect("table");
        let targets = table_targets(&table);
        assert_eq!(
            targets,
            vec![
                (0, 8, "linear".to_owned(), "7:0 0".to_owned()),
                (8, 8, "linear".to_owned(), "7:1 0".to_owned()),
            ]
        );
        let back: Table = status_text(&targets).parse().expect("round trip");
        assert_eq!(back, table);
    }

    #[test]
    fn errnos_become_kinds() {
        let ioctl = |errno| {
            kernel_dm::DmError::Core(kernel_dm::errors::Error::Ioctl(
                0,
                None,
                None,
                Box::new(errno),
            ))
        };
        assert_eq!(
            dm_error("x", ioctl(nix::errno::Errno::ENXIO)).kind,
            OsErrorKind::NotFound
        );
        assert_eq!(
            dm_error("x", ioctl(nix::errno::Errno::EBUSY)).kind,
            OsErrorKind::Busy
        );
        assert_eq!(
            dm_error("x", ioctl(nix::errno::Errno::EEXIST)).kind,
            OsErrorKind::Busy
        );
        let refused = dm_error("DM_TABLE_LOAD x", ioctl(nix::errno::Errno::EINVAL));
        assert_eq!(refused.kind, OsErrorKind::Failed);
        assert!(refused.detail.contains("dmesg"), "{refused}");
    }
}
