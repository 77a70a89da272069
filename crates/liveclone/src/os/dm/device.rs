//! The device-mapper operations the driver uses, behind a trait.
//!
//! The Linux implementation ([`super::ioctl::DmIoctl`]) issues the kernel's
//! device-mapper ioctls; tests use a fake.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::{CloneMessage, CloneStatusLine, Table};
use crate::os::error::OsResult;

/// Every device-mapper device the driver creates starts with this, so a
/// clean-up finds ours and never touches anyone else's.
pub const DM_NAME_PREFIX: &str = "liveclone-";
/// The kernel's limit (DM_NAME_LEN - 1).
pub const DM_NAME_MAX: usize = 127;

/// A device-mapper name owned by the driver: [`DM_NAME_PREFIX`] then
/// lowercase letters, digits and `-` only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DmName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a liveclone device-mapper name ({DM_NAME_PREFIX} then at most {DM_NAME_MAX} bytes of [a-z0-9-])")]
pub struct DmNameError {
    pub name: String,
}

impl DmName {
    /// `liveclone-<suffix>`; the suffix is usually a volume ID.
    pub fn with_suffix(suffix: &str) -> Result<Self, DmNameError> {
        format!("{DM_NAME_PREFIX}{suffix}").parse()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after the prefix.
    pub fn suffix(&self) -> &str {
        &self.0[DM_NAME_PREFIX.len()..]
    }

    /// `/dev/mapper/<name>`.
    pub fn mapper_path(&self) -> std::path::PathBuf {
        std::path::Path::new("/dev/mapper").join(&self.0)
    }
}

impl FromStr for DmName {
    type Err = DmNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.len() <= DM_NAME_MAX
            && s.len() > DM_NAME_PREFIX.len()
            && s.starts_with(DM_NAME_PREFIX)
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(DmNameError { name: s.to_owned() })
        }
    }
}

impl fmt::Display for DmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `DM_DEV_STATUS` tells about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmInfo {
    pub major: u32,
    pub minor: u32,
    /// The live table is suspended.
    pub suspended: bool,
    /// An inactive table is loaded and waiting for a resume.
    pub inactive_table: bool,
    /// How many openers the device has (a mount counts as one).
    pub open_count: u32,
    /// The event counter for [`DeviceMapper::wait_event`].
    pub event_nr: u32,
}

/// Whether a suspend first lets queued I/O finish and flushes, and whether
/// it freezes a file system mounted on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendFlush {
    /// Normal suspend: in-flight I/O completes, the targets flush (for
    /// dm-clone: metadata committed), and a mounted file system is frozen
    /// until the resume (dm's `lock_fs`). Use for a cut, which must catch
    /// the file system consistent.
    Flush,
    /// As [`SuspendFlush::Flush`] but without freezing the file system
    /// (`--nolockfs`). Use for a table swap that maps the same blocks (the
    /// switch to linear): a freeze would write back the file system's dirty
    /// data while I/O is held, for nothing.
    FlushKeepFs,
    /// `--noflush`: queued I/O is held rather than completed.
    NoFlush,
}

/// Device-mapper control. Every call names a device by [`DmName`], so the
/// driver cannot act on a device it does not own.
pub trait DeviceMapper: Send + Sync {
    /// Creates the device with `table` as its live table (create, load,
    /// resume). Fails with `OsErrorKind::Busy` if the name exists.
    fn create(&self, name: &DmName, table: &Table) -> OsResult<()>;
    /// Loads `table` as the inactive table; a later [`Self::resume`] swaps it in.
    fn load(&self, name: &DmName, table: &Table) -> OsResult<()>;
    fn suspend(&self, name: &DmName, flush: SuspendFlush) -> OsResult<()>;
    fn resume(&self, name: &DmName) -> OsResult<()>;
    /// Drops a loaded but not yet resumed table; none loaded is success.
    fn clear_inactive(&self, name: &DmName) -> OsResult<()>;
    /// Removes the device. Absent is success; open is `OsErrorKind::Busy`.
    fn remove(&self, name: &DmName) -> OsResult<()>;
    /// `None` when the device does not exist.
    fn info(&self, name: &DmName) -> OsResult<Option<DmInfo>>;
    /// The live table, devices as `major:minor`.
    fn table(&self, name: &DmName) -> OsResult<Table>;
    /// The status of the device's one clone target. Always no-flush: a
    /// flushing read commits metadata and flushes the destination.
    fn clone_status(&self, name: &DmName) -> OsResult<CloneStatusLine>;
    /// Sends a message to the clone target (sector 0).
    fn message(&self, name: &DmName, message: &CloneMessage) -> OsResult<()>;
    /// Waits until the device's event counter passes `event_nr` or `timeout`
    /// elapses; returns the new counter, or `None` on timeout.
    fn wait_event(&self, name: &DmName, event_nr: u32, timeout: Duration) -> OsResult<Option<u32>>;
    /// Every device whose name starts with [`DM_NAME_PREFIX`].
    fn list(&self) -> OsResult<Vec<DmName>>;
}
