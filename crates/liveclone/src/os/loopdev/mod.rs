//! Loop devices, behind a trait.
//!
//! The Linux implementation ([`ioctl::KernelLoops`]) uses the kernel's loop
//! ioctls and sysfs directly, without starting any process; tests use a
//! fake.

pub mod ioctl;

use std::path::{Path, PathBuf};

use crate::os::error::OsResult;

/// How to attach a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    pub read_only: bool,
    /// Direct I/O to the backing file: no double caching in the page cache,
    /// and flushes reach the file system.
    pub direct_io: bool,
}

/// An attached loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// The backing file's identity; a path can be renamed, an inode cannot.
    pub backing_dev: u64,
    pub backing_inode: u64,
    /// The backing file's path as the kernel shows it (sysfs): it follows a
    /// rename and ends in ` (deleted)` once the file is unlinked.
    pub backing_file: PathBuf,
    pub read_only: bool,
    pub direct_io: bool,
    pub size_bytes: u64,
}

/// Loop device control.
pub trait LoopDevices: Send + Sync {
    /// Attaches `file` to a free loop device.
    fn attach(&self, file: &Path, options: LoopOptions) -> OsResult<LoopDevice>;
    /// Every loop device currently backed by the file at `file` (matched by
    /// device and inode, so a renamed file is still found).
    fn find(&self, file: &Path) -> OsResult<Vec<LoopDevice>>;
    /// Every attached loop device.
    fn list(&self) -> OsResult<Vec<LoopDevice>>;
    /// Detaches; an absent device is success.
    fn detach(&self, device: &Path) -> OsResult<()>;
    /// Re-reads the backing file's size after it grew.
    fn refresh_size(&self, device: &Path) -> OsResult<()>;
}
