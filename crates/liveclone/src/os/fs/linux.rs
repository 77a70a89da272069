//! [`Filesystems`] on Linux: mount(2), umount2(2), statvfs and the
//! file-system ioctls through `nix`; probing, formatting and resizing
//! through the usual tools (`blkid`, `mkfs.ext4`, `mkfs.xfs`, `resize2fs`,
//! `xfs_growfs`, `xfs_admin`) run with argument vectors.
//!
//! Points the domain layer relies on:
//!
//! * [`LinuxFilesystems::mkfs`] probes again and refuses a device that is
//!   not blank: `mkfs.ext4` does not ask before overwriting when stdin is
//!   not a terminal, so the caller's check alone would be racy.
//! * `mkfs.xfs` (xfsprogs 6.1) refuses devices under 300 MiB.
//! * [`LinuxFilesystems::regenerate_uuid`] is a no-op for ext4, which
//!   mounts with a duplicate UUID. `tune2fs -U` is not safe for us: with
//!   `metadata_csum` and no `csum_seed` it rewrites every checksum, and on a
//!   clone of a mounted file system (journal needing recovery) it refuses
//!   until `e2fsck` has run. The only cost is that blkid and
//!   `/dev/disk/by-uuid` see two file systems with one UUID, which the
//!   driver never uses. For xfs, which refuses to mount a second file system
//!   with a UUID already mounted, the log of a clone taken while its source
//!   was mounted is replayed first (a mount with `nouuid` and an unmount),
//!   because `xfs_admin` does not change the UUID of a file system with a
//!   dirty log (and still exits 0); the new UUID is checked with blkid.
//! * [`LinuxFilesystems::thaw`] of a file system that is not frozen is
//!   success, so a recovery path can always thaw.
//! * A read-only [`LinuxFilesystems::bind_mount`] of a block device node
//!   does not make the device read-only: the node still opens for writing
//!   (tested).
//! * [`LinuxFilesystems::reflink`] creates the destination with mode 0600;
//!   making the new file durable (fsync of it and of its directory) is the
//!   caller's [`Filesystems::flush`].

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::statvfs::FsFlags;

use super::{Filesystems, FsType, FsUsage, MountInfo};
use crate::os::command::ToolCommand;
use crate::os::error::{OsError, OsErrorKind, OsResult};

/// Time limit for quick tools (blkid, xfs_admin).
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit for tools whose work grows with the device (mkfs discards the
/// whole device first; resize2fs and xfs_growfs write new group metadata).
pub const LONG_TIMEOUT: Duration = Duration::from_secs(30 * 60);

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// How long an unmount keeps retrying EBUSY before reporting it (see
/// [`umount_retrying_busy`]), and the pause between attempts.
const UNMOUNT_BUSY_LIMIT: Duration = Duration::from_secs(2);
const UNMOUNT_BUSY_PAUSE: Duration = Duration::from_millis(50);

/// The ioctls, declared from their definitions in `linux/fs.h`. Each
/// request code is checked against the kernel's value in the tests.
mod ioctls {
    /// `struct fstrim_range`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct FstrimRange {
        pub start: u64,
        pub len: u64,
        pub minlen: u64,
    }

    // FITRIM = _IOWR('X', 121, struct fstrim_range)
    nix::ioctl_readwrite!(fitrim, b'X', 121, FstrimRange);
    // BLKDISCARD = _IO(0x12, 119): declared without a size, takes a
    // pointer to `u64[2]` (start, length).
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    // FIFREEZE = _IOWR('X', 119, int); the argument is ignored.
    nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
    // FITHAW = _IOWR('X', 120, int); the argument is ignored.
    nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t); the kernel writes a u64.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // FICLONE = _IOW(0x94, 9, int); the argument is the source fd itself.
    nix::ioctl_write_int!(ficlone, 0x94, 9);
}

/// The Linux implementation of [`Filesystems`].
#[derive(Debug, Clone, Default)]
pub struct LinuxFilesystems {
    _private: (),
}

impl LinuxFilesystems {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `KEY=value` pairs `blkid -p -o export` prints for `device`, or
    /// `None` when it finds no signature. `blkid` exits 2 both for a blank
    /// device and for one that does not exist, so existence is checked
    /// first.
    fn blkid(&self, device: &Path) -> OsResult<Option<Vec<(String, String)>>> {
        std::fs::metadata(device).map_err(|error| OsError::io("blkid", device, &error))?;
        let command = ToolCommand::new("blkid", QUICK_TIMEOUT)
            .args(["-p", "-o", "export"])
            .arg(device);
        let output = command.output()?;
        match output.status.code() {
            Some(0) => Ok(Some(parse_export(&output.stdout))),
            Some(2) => Ok(None),
            // "Ambivalent result": several signatures. Not blank.
            Some(8) => Ok(Some(vec![(
                "TYPE".to_owned(),
                "ambivalent (several signatures)".to_owned(),
            )])),
            _ => Err(command.failure(&output)),
        }
    }

    fn uuid(&self, device: &Path) -> OsResult<Option<String>> {
        Ok(self
            .blkid(device)?
            .and_then(|pairs| value_of(&pairs, "UUID").map(str::to_owned)))
    }

    /// Mounts an xfs with `nouuid` on a private temporary directory and
    /// unmounts it, which replays its log.
    fn replay_xfs_log(&self, device: &Path) -> OsResult<()> {
        let dir = std::env::temp_dir().join(format!(
            "liveclone-xfs-replay-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir(&dir).map_err(|error| OsError::io("mkdir", &dir, &error))?;
        let mounted = nix::mount::mount(
            Some(device),
            &dir,
            Some("xfs"),
            MsFlags::empty(),
            Some("nouuid"),
        )
        .map_err(|errno| {
            errno_error(
                format!("mount -t xfs -o nouuid {} (log replay)", device.display()),
                &dir,
                errno,
            )
        });
        let unmounted = match mounted {
            Ok(()) => {
                umount_retrying_busy(&dir).map_err(|errno| errno_error("umount", &dir, errno))
            }
            Err(error) => Err(error),
        };
        let _ = std::fs::remove_dir(&dir);
        unmounted
    }

    fn regenerate_xfs_uuid(&self, device: &Path) -> OsResult<()> {
        let before = self.uuid(device)?;
        let command = ToolCommand::new("xfs_admin", QUICK_TIMEOUT)
            .args(["-U", "generate"])
            .arg(device);
        let first = command.run()?;
        if self.uuid(device)? != before {
            return Ok(());
        }
        if !first.stdout.contains("log") && !first.stderr.contains("log") {
            return Err(OsError::new(
                OsErrorKind::Failed,
                command.display(),
                format!(
                    "the UUID did not change: {}",
                    first.stderr.trim().if_empty(first.stdout.trim())
                ),
            ));
        }
        tracing::info!(
            device = %device.display(),
            "xfs log needs replay before a new UUID; mounting once with nouuid"
        );
        self.replay_xfs_log(device)?;
        let second = command.run()?;
        if self.uuid(device)? != before {
            Ok(())
        } else {
            Err(OsError::new(
                OsErrorKind::Failed,
                command.display(),
                format!(
                    "the UUID did not change after a log replay: {}",
                    second.stderr.trim().if_empty(second.stdout.trim())
                ),
            ))
        }
    }
}

impl Filesystems for LinuxFilesystems {
    fn probe(&self, device: &Path) -> OsResult<Option<String>> {
        Ok(self.blkid(device)?.map(|pairs| {
            value_of(&pairs, "TYPE")
                .or_else(|| value_of(&pairs, "PTTYPE").map(|_| "partition table"))
                .unwrap_or("unknown signature")
                .to_owned()
        }))
    }

    fn mkfs(&self, device: &Path, fs: FsType, reads_zeros: bool) -> OsResult<()> {
        if let Some(found) = self.probe(device)? {
            return Err(OsError::new(
                OsErrorKind::Failed,
                format!("mkfs {fs} {}", device.display()),
                format!("the device is not blank (blkid found {found}); refusing to format"),
            ));
        }
        let command = match fs {
            // See `Filesystems::mkfs`: on a device that reads zeros no
            // inode table needs zeroing (e2fsprogs 1.47+; also skips the
            // discard). Otherwise ext4's defaults: lazy inode table
            // initialisation, zeroed by the kernel after mounting.
            FsType::Ext4 if reads_zeros => ToolCommand::new("mkfs.ext4", LONG_TIMEOUT).args([
                "-q",
                "-E",
                "assume_storage_prezeroed=1",
            ]),
            FsType::Ext4 => ToolCommand::new("mkfs.ext4", LONG_TIMEOUT).arg("-q"),
            // xfs allocates and initialises its inodes as it goes and
            // never takes unwritten blocks for metadata.
            FsType::Xfs => ToolCommand::new("mkfs.xfs", LONG_TIMEOUT).arg("-q"),
        };
        command.arg(device).run().map(drop)
    }

    /// mount(2) directly (mount(8) would cost a process per mount): the
    /// generic options become flags, the rest go to the file system as its
    /// data string, as mount(8) splits them.
    fn mount(&self, device: &Path, target: &Path, fs: FsType, options: &[String]) -> OsResult<()> {
        let fs_name = fs.to_string();
        let operation = format!(
            "mount -t {fs_name} -o {} {} {}",
            options.join(","),
            device.display(),
            target.display()
        );
        let (flags, data) = split_mount_options(options)
            .map_err(|detail| OsError::new(OsErrorKind::Failed, operation.clone(), detail))?;
        nix::mount::mount(
            Some(device),
            target,
            Some(fs_name.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|errno| {
            let mut error = errno_error(operation, device, errno);
            if errno == Errno::EINVAL {
                error.detail.push_str(
                    " (an unknown or conflicting mount option, or no such file system on the \
                     device; the kernel log says which)",
                );
            }
            error
        })
    }

    /// A read-only bind is made in two steps (the kernel ignores
    /// `MS_RDONLY` on the bind itself). The remount keeps the flags the new
    /// mount inherited (nosuid, nodev, noexec, atime), which a remount
    /// would otherwise clear; if it fails, the writable bind is undone.
    ///
    /// For a block device node bound onto a file, read-only is only a mount
    /// flag: the kernel does not apply it to device nodes, so the node still
    /// opens for writing and writes reach the device. Read-only raw block
    /// access needs a read-only device (a read-only loop or device-mapper
    /// table) or the container runtime's device permissions.
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> OsResult<()> {
        let operation = format!("mount --bind {} {}", source.display(), target.display());
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| errno_error(operation.clone(), source, errno))?;
        if !read_only {
            return Ok(());
        }
        let inherited = nix::sys::statvfs::statvfs(target)
            .map(|stat| inherited_flags(stat.flags()))
            .unwrap_or(MsFlags::empty());
        let remounted = nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | inherited,
            None::<&str>,
        );
        if let Err(errno) = remounted {
            let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
            return Err(errno_error(
                format!("mount -o remount,bind,ro {}", target.display()),
                target,
                errno,
            ));
        }
        Ok(())
    }

    /// Unmounts the top mount at `target`. EINVAL (not a mount point) and
    /// ENOENT (no such path) are success; busy (after a short retry, see
    /// [`umount_retrying_busy`]) is [`OsErrorKind::Busy`].
    fn unmount(&self, target: &Path) -> OsResult<()> {
        match umount_retrying_busy(target) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(errno) => Err(errno_error("umount", target, errno)),
        }
    }

    fn mount_at(&self, target: &Path) -> OsResult<Option<MountInfo>> {
        // The kernel prints resolved paths; resolve ours the same way when
        // it exists (a symlinked kubelet directory, a trailing slash).
        let target = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        Ok(read_mountinfo()?
            .into_iter()
            .rfind(|mount| mount.mount_point == target))
    }

    fn mounts_of(&self, major: u32, minor: u32) -> OsResult<Vec<MountInfo>> {
        Ok(read_mountinfo()?
            .into_iter()
            .filter(|mount| mount.major == major && mount.minor == minor)
            .collect())
    }

    fn trim(&self, mount_point: &Path) -> OsResult<u64> {
        let dir = open_dir(mount_point)?;
        let mut range = ioctls::FstrimRange {
            start: 0,
            len: u64::MAX,
            minlen: 0,
        };
        // SAFETY: `dir` is an open descriptor and `range` a valid, writable
        // `struct fstrim_range` that outlives the call.
        unsafe { ioctls::fitrim(dir.as_raw_fd(), &mut range) }
            .map_err(|errno| errno_error("FITRIM", mount_point, errno))?;
        // The kernel writes back the number of bytes trimmed in `len`.
        Ok(range.len)
    }

    fn freeze(&self, mount_point: &Path) -> OsResult<()> {
        let dir = open_dir(mount_point)?;
        let mut unused: nix::libc::c_int = 0;
        // SAFETY: `dir` is open; the kernel ignores the int it is given.
        unsafe { ioctls::fifreeze(dir.as_raw_fd(), &mut unused) }
            .map(drop)
            .map_err(|errno| errno_error("FIFREEZE", mount_point, errno))
    }

    fn thaw(&self, mount_point: &Path) -> OsResult<()> {
        let dir = open_dir(mount_point)?;
        let mut unused: nix::libc::c_int = 0;
        // SAFETY: as for FIFREEZE.
        match unsafe { ioctls::fithaw(dir.as_raw_fd(), &mut unused) } {
            // EINVAL: not frozen.
            Ok(_) | Err(Errno::EINVAL) => Ok(()),
            Err(errno) => Err(errno_error("FITHAW", mount_point, errno)),
        }
    }

    fn grow(&self, device: &Path, mount_point: &Path, fs: FsType) -> OsResult<()> {
        let command = match fs {
            FsType::Ext4 => ToolCommand::new("resize2fs", LONG_TIMEOUT).arg(device),
            FsType::Xfs => ToolCommand::new("xfs_growfs", LONG_TIMEOUT)
                .arg("-d")
                .arg(mount_point),
        };
        command.run().map(drop)
    }

    fn regenerate_uuid(&self, device: &Path, fs: FsType) -> OsResult<()> {
        match fs {
            FsType::Ext4 => Ok(()),
            FsType::Xfs => self.regenerate_xfs_uuid(device),
        }
    }

    fn usage(&self, path: &Path) -> OsResult<FsUsage> {
        let stat = nix::sys::statvfs::statvfs(path)
            .map_err(|errno| errno_error("statvfs", path, errno))?;
        let fragment = stat.fragment_size();
        let bytes = |blocks: u64| blocks.saturating_mul(fragment);
        let blocks = stat.blocks();
        let free = stat.blocks_free();
        let files = stat.files();
        let files_free = stat.files_free();
        Ok(FsUsage {
            total_bytes: bytes(blocks),
            available_bytes: bytes(stat.blocks_available()),
            used_bytes: bytes(blocks.saturating_sub(free)),
            total_inodes: files,
            free_inodes: files_free,
            used_inodes: files.saturating_sub(files_free),
        })
    }

    fn block_size_bytes(&self, device: &Path) -> OsResult<u64> {
        let file = File::open(device).map_err(|error| OsError::io("open", device, &error))?;
        let mut size: u64 = 0;
        // SAFETY: `file` is open and `size` is a writable u64, which is what
        // the kernel writes for BLKGETSIZE64.
        unsafe { ioctls::blkgetsize64(file.as_raw_fd(), &mut size) }
            .map_err(|errno| errno_error("BLKGETSIZE64", device, errno))?;
        Ok(size)
    }

    fn reflink(&self, source: &Path, dest: &Path) -> OsResult<()> {
        let operation = format!("FICLONE {} -> {}", source.display(), dest.display());
        let from =
            File::open(source).map_err(|error| OsError::io(operation.clone(), source, &error))?;
        // create_new: never clobber an existing file, and only ever remove
        // a file this call created.
        let to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|error| OsError::io(operation.clone(), dest, &error))?;
        let source_fd = nix::sys::ioctl::ioctl_param_type::try_from(from.as_raw_fd())
            .map_err(|_| OsError::new(OsErrorKind::Failed, operation.clone(), "bad descriptor"))?;
        // SAFETY: both descriptors are open for the duration of the call;
        // FICLONE takes the source descriptor by value.
        let cloned = unsafe { ioctls::ficlone(to.as_raw_fd(), source_fd) };
        if let Err(errno) = cloned {
            drop(to);
            let _ = std::fs::remove_file(dest);
            let kind = match errno {
                Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY => {
                    OsErrorKind::Unsupported
                }
                Errno::ENOSPC | Errno::EDQUOT => OsErrorKind::NoSpace,
                _ => OsErrorKind::Failed,
            };
            return Err(OsError::new(
                kind,
                operation,
                format!("{errno}: {}", errno.desc()),
            ));
        }
        Ok(())
    }

    fn flush(&self, path: &Path) -> OsResult<()> {
        let file = File::open(path).map_err(|error| OsError::io("open", path, &error))?;
        file.sync_all()
            .map_err(|error| OsError::io("fsync", path, &error))
    }

    fn discard(&self, device: &Path, offset: u64, length: u64) -> OsResult<()> {
        let operation = format!("BLKDISCARD {} {offset}+{length}", device.display());
        let file = OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|error| OsError::io(operation.clone(), device, &error))?;
        let range: [u64; 2] = [offset, length];
        // SAFETY: the descriptor is open for the call; the kernel reads two
        // u64 (start, length) from the pointer, which outlives the call.
        unsafe { ioctls::blkdiscard(file.as_raw_fd(), &range) }
            .map(drop)
            .map_err(|errno| errno_error(operation, device, errno))
    }
}

trait IfEmpty<'a> {
    fn if_empty(self, other: &'a str) -> &'a str;
}

impl<'a> IfEmpty<'a> for &'a str {
    fn if_empty(self, other: &'a str) -> &'a str {
        if self.is_empty() {
            other
        } else {
            self
        }
    }
}

/// umount2 without flags, retrying EBUSY for up to [`UNMOUNT_BUSY_LIMIT`].
///
/// A tool this process starts on another thread (the monitor's dmsetup,
/// an event waiter) holds a copy of every open descriptor from its fork to
/// its exec, close-on-exec ones included. A folder of the mount that we
/// opened and closed just before (FITRIM, FIFREEZE) can so pin the mount
/// for a moment, and the unmount of a private mount nobody else uses fails
/// with EBUSY. Under a loaded or emulated CPU that window is long enough
/// to fail CreateVolume now and then.
fn umount_retrying_busy(target: &Path) -> Result<(), Errno> {
    let started = std::time::Instant::now();
    loop {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Err(Errno::EBUSY) if started.elapsed() < UNMOUNT_BUSY_LIMIT => {
                std::thread::sleep(UNMOUNT_BUSY_PAUSE);
            }
            result => return result,
        }
    }
}

fn errno_error(operation: impl Into<String>, path: &Path, errno: Errno) -> OsError {
    OsError::io(operation, path, &std::io::Error::from(errno))
}

fn open_dir(path: &Path) -> OsResult<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY)
        .open(path)
        .map_err(|error| OsError::io("open", path, &error))
}

/// Splits mount(8)-style options into mount(2) flags and the file
/// system's data string. Options only mount(8) itself acts on are refused
/// (`bind`, `remount`, `loop`...) or, when they only concern fstab
/// handling (`defaults`, `auto`, `nofail`, `_netdev`, `x-*`), dropped.
fn split_mount_options(options: &[String]) -> Result<(MsFlags, String), String> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for option in options {
        let option = option.as_str();
        let (set, clear) = match option {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
            "loud" => (MsFlags::empty(), MsFlags::MS_SILENT),
            "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "nouser" => continue,
            _ if option.starts_with("x-") => continue,
            "bind" | "rbind" | "remount" | "move" | "loop" | "user" | "users" | "owner"
            | "group" => {
                return Err(format!(
                    "mount option {option:?} is not a file-system mount option"
                ))
            }
            _ => {
                data.push(option);
                continue;
            }
        };
        flags = (flags | set) - clear;
    }
    Ok((flags, data.join(",")))
}

/// The per-mount flags a read-only remount must repeat to keep them.
fn inherited_flags(flags: FsFlags) -> MsFlags {
    let pairs = [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    pairs
        .into_iter()
        .filter(|(statvfs_flag, _)| flags.contains(*statvfs_flag))
        .fold(MsFlags::empty(), |acc, (_, mount_flag)| acc | mount_flag)
}

/// `KEY=value` lines of `blkid -o export`.
fn parse_export(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

fn value_of<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, value)| value.as_str())
}

fn read_mountinfo() -> OsResult<Vec<MountInfo>> {
    let text = std::fs::read_to_string(MOUNTINFO)
        .map_err(|error| OsError::io("read", MOUNTINFO, &error))?;
    parse_mountinfo(&text).map_err(|detail| OsError::new(OsErrorKind::Failed, MOUNTINFO, detail))
}

/// Parses `/proc/self/mountinfo` (proc(5)):
///
/// ```text
/// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
/// ```
///
/// mount ID, parent ID, `major:minor`, root, mount point, per-mount
/// options, optional fields ended by `-`, type, source, super options.
/// Paths escape space, tab, newline and backslash as `\ooo` octal.
fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>, String> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(parse_mountinfo_line)
        .collect()
}

fn parse_mountinfo_line(line: &str) -> Result<MountInfo, String> {
    let bad = |what: &str| format!("{what} in mountinfo line {line:?}");
    let mut fields = line.split(' ');
    let mut next = |what: &str| fields.next().ok_or_else(|| bad(what));
    let _mount_id = next("no mount ID")?;
    let _parent_id = next("no parent ID")?;
    let (major, minor) = next("no major:minor")?
        .split_once(':')
        .and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)))
        .ok_or_else(|| bad("bad major:minor"))?;
    let root = unescape(next("no root")?);
    let mount_point = unescape(next("no mount point")?);
    let mount_options = next("no mount options")?;
    // Optional fields, up to the separator.
    loop {
        if next("no `-` separator")? == "-" {
            break;
        }
    }
    let fs_type = unescape(next("no file system type")?);
    let source = unescape(next("no source")?);
    let super_options = next("no super options")?;
    let has_ro = |options: &str| options.split(',').any(|option| option == "ro");
    Ok(MountInfo {
        mount_point,
        major,
        minor,
        root,
        fs_type: fs_type.to_string_lossy().into_owned(),
        source: source.to_string_lossy().into_owned(),
        read_only: has_ro(mount_options) || has_ro(super_options),
    })
}

/// Decodes the kernel's `\ooo` escapes (`seq_path` escapes space, tab,
/// newline and backslash); anything else passes through byte for byte, so
/// non-UTF-8 paths survive.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                match u8::try_from(value) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 4;
                    }
                    Err(_) => {
                        out.push(bytes[i]);
                        i += 1;
                    }
                }
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(options: &[&str]) -> Result<(MsFlags, String), String> {
        split_mount_options(&options.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn mount_options_split_into_flags_and_file_system_data() {
        assert_eq!(split(&[]), Ok((MsFlags::empty(), String::new())));
        assert_eq!(
            split(&["ro", "noatime", "nouuid", "data=ordered", "nodev"]),
            Ok((
                MsFlags::MS_RDONLY | MsFlags::MS_NOATIME | MsFlags::MS_NODEV,
                "nouuid,data=ordered".to_owned()
            ))
        );
        // The last word wins, as with mount(8).
        assert_eq!(split(&["ro", "rw"]), Ok((MsFlags::empty(), String::new())));
        assert_eq!(
            split(&["defaults", "x-systemd.automount", "_netdev", "discard"]),
            Ok((MsFlags::empty(), "discard".to_owned()))
        );
        assert!(split(&["bind"]).is_err());
        assert!(split(&["remount", "ro"]).is_err());
    }

    #[test]
    fn ioctl_request_codes_match_the_kernel() {
        // The values of the macros in linux/fs.h on x86_64 and arm64.
        assert_eq!(
            nix::request_code_readwrite!(b'X', 121, std::mem::size_of::<ioctls::FstrimRange>()),
            0xc018_5879
        );
        assert_eq!(
            nix::request_code_readwrite!(b'X', 119, std::mem::size_of::<nix::libc::c_int>()),
            0xc004_5877
        );
        assert_eq!(
            nix::request_code_readwrite!(b'X', 120, std::mem::size_of::<nix::libc::c_int>()),
            0xc004_5878
        );
        assert_eq!(
            nix::request_code_read!(0x12, 114, std::mem::size_of::<u64>()),
            0x8008_1272
        );
        assert_eq!(
            nix::request_code_write!(0x94, 9, std::mem::size_of::<nix::libc::c_int>()),
            0x4004_9409
        );
        assert_eq!(
            nix::request_code_write!(0x94, 9, std::mem::size_of::<nix::libc::c_int>()),
            nix::libc::FICLONE
        );
    }

    #[test]
    fn parses_mountinfo_lines_captured_in_the_vm() {
        let text = "\
21 28 0:19 / /proc rw,relatime - proc proc rw
28 1 0:23 / / rw,relatime - overlay overlay rw,lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work
32 31 7:1 / /scratch/tmp/sp\\040ace rw,relatime - ext4 /dev/loop1 rw
33 31 0:5 /loop1 /scratch/tmp/f/x rw,relatime - devtmpfs devtmpfs rw,size=1002344k,nr_inodes=250586,mode=755,inode64
";
        let mounts = parse_mountinfo(text).expect("parses");
        assert_eq!(mounts.len(), 4);
        let ext4 = &mounts[2];
        assert_eq!(ext4.mount_point, PathBuf::from("/scratch/tmp/sp ace"));
        assert_eq!((ext4.major, ext4.minor), (7, 1));
        assert_eq!(ext4.root, PathBuf::from("/"));
        assert_eq!(ext4.fs_type, "ext4");
        assert_eq!(ext4.source, "/dev/loop1");
        assert!(!ext4.read_only);
        let node = &mounts[3];
        assert_eq!(node.root, PathBuf::from("/loop1"));
        assert_eq!((node.major, node.minor), (0, 5));
        assert_eq!(node.fs_type, "devtmpfs");
    }

    #[test]
    fn reads_optional_fields_and_read_only_flags() {
        let text = "\
36 35 98:0 /mnt1 /mnt2 ro,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue
37 35 98:0 / /mnt3 rw,noatime - xfs /dev/sda1 ro,attr2
";
        let mounts = parse_mountinfo(text).expect("parses");
        assert!(mounts[0].read_only, "per-mount ro");
        assert_eq!(mounts[0].fs_type, "ext3");
        assert_eq!(mounts[0].root, PathBuf::from("/mnt1"));
        assert!(mounts[1].read_only, "super-block ro");
    }

    #[test]
    fn unescapes_octal_sequences_only() {
        assert_eq!(
            unescape("/a\\040b\\011c\\012d\\134e"),
            PathBuf::from("/a b\tc\nd\\e")
        );
        // Not an escape: kept as is.
        assert_eq!(unescape("/a\\0x"), PathBuf::from("/a\\0x"));
        assert_eq!(unescape("/a\\"), PathBuf::from("/a\\"));
        assert_eq!(unescape("/a\\777"), PathBuf::from("/a\\777"));
        // Bytes that are not UTF-8 survive.
        assert_eq!(
            unescape("/\\377"),
            PathBuf::from(OsString::from_vec(vec![b'/', 0xff]))
        );
    }

    #[test]
    fn refuses_truncated_mountinfo() {
        assert!(parse_mountinfo("21 28 0:19 / /proc rw,relatime proc proc rw").is_err());
        assert!(parse_mountinfo("21 28 0:x / /proc rw - proc proc rw").is_err());
        assert!(parse_mountinfo("21 28 0:19 / /proc rw - proc proc").is_err());
    }

    #[test]
    fn parses_blkid_export_output() {
        let pairs = parse_export(
            "DEVNAME=/dev/loop2\nUUID=289caf04-e7c0-11f1-9549-0171eb864435\nBLOCK_SIZE=512\n\
             TYPE=xfs\nUSAGE=filesystem\n",
        );
        assert_eq!(value_of(&pairs, "TYPE"), Some("xfs"));
        assert_eq!(
            value_of(&pairs, "UUID"),
            Some("289caf04-e7c0-11f1-9549-0171eb864435")
        );
        assert_eq!(value_of(&pairs, "PTTYPE"), None);
    }

    #[test]
    fn a_read_only_remount_keeps_inherited_flags() {
        let flags = inherited_flags(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_RDONLY);
        assert_eq!(flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
        assert_eq!(inherited_flags(FsFlags::empty()), MsFlags::empty());
    }
}
