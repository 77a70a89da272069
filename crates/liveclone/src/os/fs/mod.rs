//! File systems and mounts, behind a trait.
//!
//! The Linux implementation ([`linux::LinuxFilesystems`]) uses `nix` for
//! mount(2), statvfs and ioctls, and runs the file-system tools (mkfs, fstrim,
//! resize) with argument vectors; tests use a fake.

pub mod linux;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::os::error::OsResult;

/// File systems the driver formats and grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub const DEFAULT: FsType = FsType::Ext4;
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("file system type {0:?} is not supported; use ext4 or xfs")]
pub struct UnsupportedFsType(pub String);

impl FromStr for FsType {
    type Err = UnsupportedFsType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(UnsupportedFsType(other.to_owned())),
        }
    }
}

/// One line of /proc/self/mountinfo, the parts the driver needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    /// The mounted device's `major:minor` (for a bind mount of a block device
    /// node, the device of the file system holding the node).
    pub major: u32,
    pub minor: u32,
    /// The root of the mount within its file system (`/` unless a bind
    /// mount of a subtree or a file).
    pub root: PathBuf,
    pub fs_type: String,
    /// The mount source, e.g. `/dev/mapper/liveclone-...`.
    pub source: String,
    pub read_only: bool,
}

/// statvfs figures for a mounted file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

/// File systems, mounts and file-level ioctls.
pub trait Filesystems: Send + Sync {
    /// The file system on `device` per blkid, `None` when blank. An
    /// unrecognised signature is `Some(name)` so nothing formats over data.
    fn probe(&self, device: &Path) -> OsResult<Option<String>>;
    /// Formats a blank device. `reads_zeros`: the device reads zeros
    /// everywhere (a new sparse file, a new thin LV), so ext4 can mark its
    /// inode tables as initialised instead of leaving a kernel thread to
    /// write zeros over all of them (1 GiB for 64 GiB) after the first
    /// mount, which every clone would then copy. Without it (a thick LV
    /// keeps old disk content) ext4 must not assume zeros: stale bytes in
    /// an inode table taken as initialised would be read as inodes.
    fn mkfs(&self, device: &Path, fs: FsType, reads_zeros: bool) -> OsResult<()>;
    /// mount(2) of `device` on `target` with `options` (each validated by
    /// the caller: generic ones become flags, the rest the data string).
    fn mount(&self, device: &Path, target: &Path, fs: FsType, options: &[String]) -> OsResult<()>;
    /// Bind mount (file or directory), then a read-only remount if asked.
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()>;
    /// Unmounts; not mounted is success.
    fn unmount(&self, target: &Path) -> OsResult<()>;
    /// The mount at exactly `target`, if any (the top one when stacked).
    fn mount_at(&self, target: &Path) -> OsResult<Option<MountInfo>>;
    /// Every mount of the block device `major:minor`.
    fn mounts_of(&self, major: u32, minor: u32) -> OsResult<Vec<MountInfo>>;
    /// FITRIM over the whole mounted file system; returns bytes trimmed.
    fn trim(&self, mount_point: &Path) -> OsResult<u64>;
    /// FIFREEZE / FITHAW on a mount point.
    fn freeze(&self, mount_point: &Path) -> OsResult<()>;
    fn thaw(&self, mount_point: &Path) -> OsResult<()>;
    /// Grows the mounted file system to fill its device (resize2fs, xfs_growfs).
    fn grow(&self, device: &Path, mount_point: &Path, fs: FsType) -> OsResult<()>;
    /// Gives an unmounted xfs a new UUID, so that a clone can be mounted
    /// on the same node as its source (xfs refuses duplicate UUIDs).
    fn regenerate_uuid(&self, device: &Path, fs: FsType) -> OsResult<()>;
    fn usage(&self, path: &Path) -> OsResult<FsUsage>;
    /// The size in bytes of a block device (BLKGETSIZE64).
    fn block_size_bytes(&self, device: &Path) -> OsResult<u64>;
    /// FICLONE: makes `dest` (created, must not exist) share `source`'s
    /// blocks. `OsErrorKind::Unsupported` when the file system cannot.
    fn reflink(&self, source: &Path, dest: &Path) -> OsResult<()>;
    /// fsync of a block device or file: a flush that reaches stable storage.
    fn flush(&self, path: &Path) -> OsResult<()>;
    /// BLKDISCARD of `length` bytes at `offset` of a block device (both
    /// multiples of 512).
    fn discard(&self, device: &Path, offset: u64, length: u64) -> OsResult<()>;
}
