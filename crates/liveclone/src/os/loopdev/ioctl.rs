//! [`LoopDevices`] with the kernel's loop ioctls and sysfs: no processes.
//!
//! Under a slow CPU (the test VM emulates one) every process start costs
//! tens to hundreds of milliseconds, and a clone needs about twenty loop
//! operations; the ioctls below cost microseconds. The `loopdev-3` crate
//! provides `/dev/loop-control` (LOOP_CTL_GET_FREE), the two-step attach of
//! older kernels (LOOP_SET_FD + LOOP_SET_STATUS64), LOOP_SET_DIRECT_IO and
//! LOOP_SET_CAPACITY. Three ioctls it lacks are declared here with `nix`
//! (module `ioctls`): LOOP_CONFIGURE, LOOP_GET_STATUS64 and LOOP_CLR_FD on a
//! descriptor we opened ourselves.
//!
//! # Attach
//!
//! A free device is asked of `/dev/loop-control`, then bound with one
//! LOOP_CONFIGURE (Linux 5.8+) that also sets read-only and direct I/O, so
//! the device never exists in a half-configured state. Another process (or
//! thread) can take the same free device between the two calls; the kernel
//! then answers EBUSY and the attach starts over with the next free device.
//! Kernels without LOOP_CONFIGURE get LOOP_SET_FD, LOOP_SET_STATUS64 and
//! LOOP_SET_DIRECT_IO instead.
//!
//! The backing file is opened by us, read-write unless read-only is asked
//! for: a file that cannot be opened for writing is an error, never a
//! silent read-only device. Autoclear is never set: a device must stay until
//! the driver detaches it, whoever else opens and closes it.
//!
//! # Direct I/O
//!
//! With `direct_io` asked for, the backing file is opened with `O_DIRECT`
//! (so the loop device takes the backing disk's logical block size, as
//! `losetup --direct-io=on` does) and LO_FLAGS_DIRECT_IO is part of the
//! configuration. Two things can stop that:
//!
//! * the backing file system cannot open files with `O_DIRECT` at all
//!   (tmpfs on Linux 6.1): the open fails with EINVAL;
//! * the kernel accepts the flag but keeps buffered I/O, e.g. when the
//!   backing file system's block size is larger than the loop device's
//!   logical block size (LOOP_CONFIGURE drops the flag silently; a second
//!   try with LOOP_SET_DIRECT_IO fails with EINVAL).
//!
//! In both cases [`KernelLoops::attach`] keeps a buffered device, logs a
//! warning and reports `direct_io: false` in the returned [`LoopDevice`]
//! rather than failing. Buffered loop I/O is still correct and durable (a
//! flush of the loop device fsyncs the backing file); it costs page-cache
//! memory twice and some speed. The domain layer can read the flag and
//! refuse or report it.
//!
//! # Listing and identity
//!
//! sysfs tells which devices are bound and how (`/sys/block/loopN/`:
//! `dev`, `ro`, `size`, `loop/backing_file`, `loop/dio`; the `loop` folder
//! exists only while a file is bound). The backing file's identity comes
//! from LOOP_GET_STATUS64 (`lo_device`, `lo_inode`), which needs the `/dev`
//! node opened read-only; a device whose node is missing in this mount
//! namespace lists with identity 0/0 and matches no file.
//!
//! A loop device is matched to its backing file by that device and inode
//! number, not by path: the path sysfs shows is worked out from the open
//! file when it is read, so it follows a rename, gets a ` (deleted)` suffix
//! when the file is unlinked, is relative to the reader's root (another in
//! a container) and may meanwhile name a different, new file. This relies
//! on `stat` reporting the same device number as the kernel's superblock,
//! which holds on ext4 and xfs (the pool file systems) but not on btrfs
//! subvolumes or overlayfs.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loopdev::LoopControl;
use nix::errno::Errno;

use super::{LoopDevice, LoopDevices, LoopOptions};
use crate::os::error::{OsError, OsErrorKind, OsResult};

/// Where the kernel lists whole block devices (partitions are not there).
const SYSFS_BLOCK: &str = "/sys/block";

/// Where the device nodes are.
const DEV: &str = "/dev";

/// How many free devices an attach may lose to other processes before it
/// gives up. Each loss means someone else bound a device, so a loop of
/// attaches always makes progress; this bound is only against a runaway.
const ATTACH_ATTEMPTS: u32 = 64;

/// How long a detach waits for a deferred detach to finish. The kernel
/// defers it while anyone else has the device open (udev's probe right
/// after an attach, a concurrent listing); those openers are brief.
const DEFERRED_DETACH_WAIT: Duration = Duration::from_secs(1);

/// The loop ioctls `loopdev-3` does not offer, declared from their
/// definitions in `linux/loop.h` (checked by the size tests below and by the
/// real-kernel tests in `tests/real_loop.rs`).
mod ioctls {
    pub const LO_NAME_SIZE: usize = 64;
    const LO_KEY_SIZE: usize = 32;

    pub const LO_FLAGS_READ_ONLY: u32 = 1;
    pub const LO_FLAGS_DIRECT_IO: u32 = 16;

    /// `struct loop_info64`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct LoopInfo64 {
        /// The backing file's `st_dev`, in the encoding `stat` reports.
        pub lo_device: u64,
        /// The backing file's inode number.
        pub lo_inode: u64,
        pub lo_rdevice: u64,
        pub lo_offset: u64,
        pub lo_sizelimit: u64,
        pub lo_number: u32,
        pub lo_encrypt_type: u32,
        pub lo_encrypt_key_size: u32,
        pub lo_flags: u32,
        pub lo_file_name: [u8; LO_NAME_SIZE],
        pub lo_crypt_name: [u8; LO_NAME_SIZE],
        pub lo_encrypt_key: [u8; LO_KEY_SIZE],
        pub lo_init: [u64; 2],
    }

    impl LoopInfo64 {
        /// All zero: offset 0, no size limit, no flags, no name.
        pub fn zeroed() -> Self {
            Self {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: 0,
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            }
        }
    }

    /// `struct loop_config`, LOOP_CONFIGURE's argument.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct LoopConfig {
        /// The backing file's descriptor.
        pub fd: u32,
        /// 0: the kernel's default (the backing disk's logical block size
        /// when the file was opened with `O_DIRECT`, else 512).
        pub block_size: u32,
        pub info: LoopInfo64,
        pub reserved: [u64; 8],
    }

    // The loop ioctls predate the _IO* encoding: plain numbers ('L' << 8 | n).
    // LOOP_CONFIGURE = 0x4C0A (Linux 5.8+), takes a struct loop_config.
    nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
    // LOOP_GET_STATUS64 = 0x4C05, fills a struct loop_info64.
    nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);
    // LOOP_CLR_FD = 0x4C01; the argument is ignored.
    nix::ioctl_write_int_bad!(loop_clr_fd, 0x4C01);
}

/// Loop devices through the kernel's ioctls and sysfs.
#[derive(Debug)]
pub struct KernelLoops {
    /// `/sys/block`; another folder in unit tests.
    sysfs_block: PathBuf,
    /// Set once the kernel turned LOOP_CONFIGURE down as unknown and the
    /// two-step attach worked (Linux before 5.8), so later attaches skip it.
    no_configure: AtomicBool,
}

impl Default for KernelLoops {
    fn default() -> Self {
        Self::new()
    }
}

/// What LOOP_GET_STATUS64 said about a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// Bound to the file with this device and inode number; 0/0 when they
    /// cannot be read (no `/dev` node here).
    Identity { dev: u64, inode: u64 },
    /// Nothing bound (any more).
    Unbound,
}

/// A bound device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SysfsLoop {
    major: u32,
    minor: u32,
    backing_file: PathBuf,
    read_only: bool,
    direct_io: bool,
    size_bytes: u64,
}

/// How binding a free device ended.
enum Bind {
    Done,
    /// Another process bound the device first: take the next free one.
    Taken,
}

impl KernelLoops {
    pub fn new() -> Self {
        Self::with_sysfs_block(PathBuf::from(SYSFS_BLOCK))
    }

    fn with_sysfs_block(sysfs_block: PathBuf) -> Self {
        Self {
            sysfs_block,
            no_configure: AtomicBool::new(false),
        }
    }

    /// Binds `backing` to the free device `device` (at `path`).
    fn bind(
        &self,
        device: &loopdev::LoopDevice,
        path: &Path,
        backing: &File,
        file: &Path,
        read_only: bool,
        direct_io: bool,
    ) -> OsResult<Bind> {
        let operation = || format!("attach {} to {}", file.display(), path.display());
        let mut refused = None;
        if !self.no_configure.load(Ordering::Relaxed) {
            let config = loop_config(backing, file, read_only, direct_io).map_err(|detail| {
                OsError::new(
                    OsErrorKind::Failed,
                    format!("{} (LOOP_CONFIGURE)", operation()),
                    detail,
                )
            })?;
            // SAFETY: `device` is an open loop device, `config` a valid,
            // initialised `struct loop_config` that outlives the call, and
            // its `fd` (the backing file) stays open until after it; the
            // kernel takes its own reference to the file.
            match unsafe { ioctls::loop_configure(device.as_raw_fd(), &config) } {
                Ok(_) => return Ok(Bind::Done),
                Err(Errno::EBUSY) => return Ok(Bind::Taken),
                // What a kernel without LOOP_CONFIGURE answers; a newer one
                // says EINVAL for a bad backing file too, which the
                // two-step attach will then report in turn.
                Err(errno @ (Errno::EINVAL | Errno::ENOTTY)) => refused = Some(errno),
                Err(errno) => {
                    return Err(errno_error(
                        format!("{} (LOOP_CONFIGURE)", operation()),
                        path,
                        errno,
                    ))
                }
            }
        }
        // LOOP_SET_FD, then LOOP_SET_STATUS64 (loopdev detaches again if the
        // second fails). Read-only follows from the file's open mode.
        match device
            .with()
            .read_only(read_only)
            .attach_fd(backing.as_raw_fd())
        {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(nix::libc::EBUSY) => return Ok(Bind::Taken),
            Err(error) => {
                let mut error = OsError::io(
                    format!("{} (LOOP_SET_FD, LOOP_SET_STATUS64)", operation()),
                    path,
                    &error,
                );
                if let Some(errno) = refused {
                    error.detail =
                        format!("{}; LOOP_CONFIGURE said {}", error.detail, errno.desc());
                }
                return Err(error);
            }
        }
        if refused.is_some() && !self.no_configure.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "the kernel has no LOOP_CONFIGURE (Linux before 5.8); attaching in two steps"
            );
        }
        // Direct I/O follows in `finish_attach`.
        Ok(Bind::Done)
    }

    /// The record of a device we just bound and still hold open.
    fn describe_bound(&self, device: &loopdev::LoopDevice, path: &Path) -> OsResult<LoopDevice> {
        let name = loop_name(path, "describe")?;
        let Some(listed) = read_sysfs_loop(&self.sysfs_block.join(name))? else {
            return Err(OsError::new(
                OsErrorKind::Failed,
                format!("describe {}", path.display()),
                "sysfs shows no backing file right after the attach (detached by someone else?)",
            ));
        };
        match status_backing(device.as_raw_fd(), path)? {
            Backing::Identity { dev, inode } => Ok(to_device(path, listed, dev, inode)),
            Backing::Unbound => Err(OsError::new(
                OsErrorKind::Failed,
                format!("LOOP_GET_STATUS64 {}", path.display()),
                "unbound right after the attach (detached by someone else?)",
            )),
        }
    }

    /// Checks and completes an attach; on failure the device is detached
    /// again.
    fn finish_attach(
        &self,
        device: &loopdev::LoopDevice,
        path: &Path,
        file: &Path,
        options: LoopOptions,
        direct_io: bool,
    ) -> OsResult<LoopDevice> {
        let checked = self.describe_bound(device, path).and_then(|mut attached| {
            if direct_io && !attached.direct_io {
                // The two-step attach (old kernels) sets direct I/O only
                // now. LOOP_CONFIGURE drops the flag silently when the
                // kernel cannot honour it; LOOP_SET_DIRECT_IO tries again
                // and at least says no (EINVAL).
                match device.set_direct_io(true) {
                    Ok(()) => attached = self.describe_bound(device, path)?,
                    Err(error) => tracing::debug!(
                        device = %path.display(),
                        %error,
                        "LOOP_SET_DIRECT_IO refused"
                    ),
                }
            }
            if !options.read_only && attached.read_only {
                // The kernel makes the device read-only when the file
                // cannot be written through this descriptor (no write
                // support in its file system); a caller that asked for
                // read-write would only find out at its first write.
                return Err(OsError::new(
                    OsErrorKind::Failed,
                    format!("attach {} to {}", file.display(), path.display()),
                    "the kernel made the device read-only (is the file writable?); detached again",
                ));
            }
            Ok(attached)
        });
        match checked {
            Ok(attached) => {
                if direct_io && !attached.direct_io {
                    tracing::warn!(
                        file = %file.display(),
                        device = %path.display(),
                        "direct I/O is not in effect on the loop device; it uses the page cache"
                    );
                }
                Ok(attached)
            }
            Err(error) => {
                if let Err(detach) = device.detach() {
                    tracing::warn!(
                        device = %path.display(),
                        %detach,
                        "cannot detach a loop device after a failed attach"
                    );
                }
                Err(error)
            }
        }
    }

    /// Whether the device `name` (`loopN`) has a backing file. Asked of
    /// sysfs, not of the `/dev` node, which a container may lack.
    fn is_attached(&self, name: &str) -> OsResult<bool> {
        let path = self
            .sysfs_block
            .join(name)
            .join("loop")
            .join("backing_file");
        Ok(read_attribute(&path)?.is_some_and(|text| !strip_newline(&text).is_empty()))
    }

    /// Whether `name` is attached and marked to detach at its last close.
    fn is_detaching(&self, name: &str) -> OsResult<bool> {
        let path = self.sysfs_block.join(name).join("loop").join("autoclear");
        Ok(self.is_attached(name)?
            && read_attribute(&path)?.is_some_and(|text| parse_flag(&text) == Some(true)))
    }

    /// The backing file's identity of `/dev/<name>`, opened read-only
    /// (which cannot disturb an exclusive holder).
    fn backing_of(&self, name: &str, device: &Path) -> OsResult<Backing> {
        match File::open(device) {
            Ok(opened) => status_backing(opened.as_raw_fd(), device),
            // Being deleted.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(nix::libc::ENXIO | nix::libc::ENODEV)
                ) =>
            {
                Ok(Backing::Unbound)
            }
            Err(error) if error.kind() == ErrorKind::NotFound => {
                if self.is_attached(name)? {
                    tracing::debug!(
                        device = %device.display(),
                        "no device node here: the loop device's backing file cannot be identified"
                    );
                    Ok(Backing::Identity { dev: 0, inode: 0 })
                } else {
                    Ok(Backing::Unbound)
                }
            }
            Err(error) => Err(OsError::io("open for LOOP_GET_STATUS64", device, &error)),
        }
    }

    /// The answer of LOOP_CLR_FD, and a short wait when the kernel deferred
    /// it.
    fn clear(&self, name: &str, device: &Path, exclusive: File) -> OsResult<()> {
        // SAFETY: `exclusive` is an open loop device; LOOP_CLR_FD takes no
        // memory from us.
        match unsafe { ioctls::loop_clr_fd(exclusive.as_raw_fd(), 0) } {
            Ok(_) => {}
            // Detached by someone else meanwhile.
            Err(Errno::ENXIO) => return Ok(()),
            Err(errno) => return Err(errno_error("detach (LOOP_CLR_FD)", device, errno)),
        }
        // With other openers the kernel only marks the device autoclear and
        // detaches at the last close; they are usually gone in moments. A
        // device that is attached without autoclear after that is a new
        // attachment by someone else (we never set autoclear), not ours.
        drop(exclusive);
        let deadline = Instant::now() + DEFERRED_DETACH_WAIT;
        while self.is_detaching(name)? {
            if Instant::now() >= deadline {
                tracing::warn!(
                    device = %device.display(),
                    "the loop device is still open elsewhere; the kernel detaches it at the last close"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl LoopDevices for KernelLoops {
    fn attach(&self, file: &Path, options: LoopOptions) -> OsResult<LoopDevice> {
        let (backing, direct_io) = open_backing(file, options)?;
        let control = LoopControl::open().map_err(|error| {
            let mut error = OsError::io(
                format!("attach {}: open the loop control device", file.display()),
                "/dev/loop-control",
                &error,
            );
            if error.kind == OsErrorKind::NotFound {
                error.kind = OsErrorKind::Unsupported;
                error.detail = format!("{} (is the loop module loaded?)", error.detail);
            }
            error
        })?;
        let free_device_error = |error: &std::io::Error| {
            OsError::io(
                format!(
                    "attach {}: find and open a free loop device",
                    file.display()
                ),
                "/dev/loop-control",
                error,
            )
        };
        // The last failure to open a free device, reported if every try
        // ends that way (no device nodes in this /dev, say).
        let mut open_failure = None;
        for _ in 0..ATTACH_ATTEMPTS {
            // LOOP_CTL_GET_FREE, then an open of that device.
            let device = match control.next_free() {
                Ok(device) => device,
                // The free device may have been removed before we opened it.
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(nix::libc::ENOENT | nix::libc::ENXIO | nix::libc::ENODEV)
                    ) =>
                {
                    open_failure = Some(free_device_error(&error));
                    continue;
                }
                Err(error) => return Err(free_device_error(&error)),
            };
            let path = device.path().ok_or_else(|| {
                OsError::new(
                    OsErrorKind::Failed,
                    format!("attach {}", file.display()),
                    "cannot name the free loop device (is /proc mounted?)",
                )
            })?;
            match self.bind(&device, &path, &backing, file, options.read_only, direct_io)? {
                Bind::Done => return self.finish_attach(&device, &path, file, options, direct_io),
                Bind::Taken => {
                    tracing::debug!(
                        device = %path.display(),
                        "another process took the free loop device first; trying the next"
                    );
                    std::thread::yield_now();
                }
            }
        }
        Err(open_failure.unwrap_or_else(|| {
            OsError::new(
                OsErrorKind::Busy,
                format!("attach {}", file.display()),
                format!(
                    "every free loop device was taken by another process first, \
                     {ATTACH_ATTEMPTS} times"
                ),
            )
        }))
    }

    fn find(&self, file: &Path) -> OsResult<Vec<LoopDevice>> {
        let meta = std::fs::metadata(file).map_err(|error| OsError::io("stat", file, &error))?;
        let (backing_dev, backing_inode) = (meta.dev(), meta.ino());
        Ok(self
            .list()?
            .into_iter()
            .filter(|device| {
                device.backing_dev == backing_dev && device.backing_inode == backing_inode
            })
            .collect())
    }

    /// Every bound device, read from sysfs: a device that goes away during
    /// the listing is left out. Whether the `/dev` node exists in this mount
    /// namespace does not decide what is listed, only whether the identity
    /// can be read.
    fn list(&self) -> OsResult<Vec<LoopDevice>> {
        scan(&self.sysfs_block, |name, device| {
            self.backing_of(name, device)
        })
    }

    /// Detaches `device`; one that does not exist or is not attached is
    /// success.
    ///
    /// The device is opened with `O_EXCL` and detached through that
    /// descriptor, so a device held exclusively (by a mount or a
    /// device-mapper table) is [`OsErrorKind::Busy`] and stays attached, and
    /// nothing can claim it between the check and the detach. Without the
    /// check the kernel would accept the detach of a device in use and turn
    /// it into autoclear, which detaches silently at the last close. A plain
    /// (non-exclusive) opener is not detected; in that case the kernel's
    /// deferred detach applies.
    fn detach(&self, device: &Path) -> OsResult<()> {
        let name = loop_name(device, "detach")?;
        if !self.is_attached(name)? {
            return Ok(());
        }
        let exclusive = match OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(device)
        {
            Ok(exclusive) => exclusive,
            Err(error) if error.raw_os_error() == Some(nix::libc::EBUSY) => {
                return Err(OsError::new(
                    OsErrorKind::Busy,
                    format!("detach {}", device.display()),
                    "the device is in use (mounted or under a device-mapper table)",
                ));
            }
            Err(error) if !self.is_attached(name)? => {
                tracing::debug!(device = %device.display(), %error, "detached meanwhile");
                return Ok(());
            }
            Err(error) => return Err(OsError::io("detach: open O_EXCL", device, &error)),
        };
        self.clear(name, device, exclusive)
    }

    fn refresh_size(&self, device: &Path) -> OsResult<()> {
        let opened = loopdev::LoopDevice::open(device).map_err(|error| {
            OsError::io("refresh size (LOOP_SET_CAPACITY): open", device, &error)
        })?;
        opened
            .set_capacity()
            .map_err(|error| OsError::io("refresh size (LOOP_SET_CAPACITY)", device, &error))
    }
}

/// Opens the file to back a loop device; the flag tells whether it was
/// opened for direct I/O.
fn open_backing(file: &Path, options: LoopOptions) -> OsResult<(File, bool)> {
    let mut open = OpenOptions::new();
    open.read(true).write(!options.read_only);
    let operation = || {
        format!(
            "attach {}: open the backing file {}",
            file.display(),
            if options.read_only {
                "read-only"
            } else {
                "read-write"
            }
        )
    };
    if options.direct_io {
        match open.clone().custom_flags(nix::libc::O_DIRECT).open(file) {
            Ok(opened) => return Ok((opened, true)),
            // The file system cannot do O_DIRECT at all.
            Err(error) if error.raw_os_error() == Some(nix::libc::EINVAL) => {
                tracing::warn!(
                    file = %file.display(),
                    %error,
                    "the backing file system refused direct I/O; attaching with buffered I/O"
                );
            }
            Err(error) => return Err(OsError::io(operation(), file, &error)),
        }
    }
    open.open(file)
        .map(|opened| (opened, false))
        .map_err(|error| OsError::io(operation(), file, &error))
}

/// LOOP_CONFIGURE's argument for `backing`.
fn loop_config(
    backing: &File,
    file: &Path,
    read_only: bool,
    direct_io: bool,
) -> Result<ioctls::LoopConfig, String> {
    let fd = u32::try_from(backing.as_raw_fd())
        .map_err(|_| format!("bad descriptor {}", backing.as_raw_fd()))?;
    let mut info = ioctls::LoopInfo64::zeroed();
    if read_only {
        info.lo_flags |= ioctls::LO_FLAGS_READ_ONLY;
    }
    if direct_io {
        info.lo_flags |= ioctls::LO_FLAGS_DIRECT_IO;
    }
    // Informational only (sysfs shows the path of the open file): what
    // LOOP_GET_STATUS reports as the name, as losetup fills it.
    info.lo_file_name = file_name_field(file.as_os_str());
    Ok(ioctls::LoopConfig {
        fd,
        block_size: 0,
        info,
        reserved: [0; 8],
    })
}

/// `lo_file_name`: the path's bytes, cut to leave room for the final NUL.
fn file_name_field(path: &OsStr) -> [u8; ioctls::LO_NAME_SIZE] {
    let mut field = [0; ioctls::LO_NAME_SIZE];
    let bytes = path.as_bytes();
    let len = bytes.len().min(ioctls::LO_NAME_SIZE - 1);
    field[..len].copy_from_slice(&bytes[..len]);
    field
}

/// LOOP_GET_STATUS64 on the open loop device `fd` (named `device`).
fn status_backing(fd: std::os::unix::io::RawFd, device: &Path) -> OsResult<Backing> {
    let mut info = ioctls::LoopInfo64::zeroed();
    // SAFETY: `fd` is an open loop device and `info` a writable `struct
    // loop_info64` that outlives the call.
    match unsafe { ioctls::loop_get_status64(fd, &mut info) } {
        Ok(_) => Ok(Backing::Identity {
            dev: info.lo_device,
            inode: info.lo_inode,
        }),
        Err(Errno::ENXIO) => Ok(Backing::Unbound),
        Err(errno) => Err(errno_error("LOOP_GET_STATUS64", device, errno)),
    }
}

/// Every bound loop device under `sysfs_block`, sorted by device number,
/// with the backing identity from `backing` (given `loopN` and its `/dev`
/// path).
fn scan(
    sysfs_block: &Path,
    mut backing: impl FnMut(&str, &Path) -> OsResult<Backing>,
) -> OsResult<Vec<LoopDevice>> {
    let entries = std::fs::read_dir(sysfs_block)
        .map_err(|error| OsError::io("list loop devices", sysfs_block, &error))?;
    let mut devices = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| OsError::io("list loop devices", sysfs_block, &error))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().filter(|name| is_loop_name(name)) else {
            continue;
        };
        let Some(listed) = read_sysfs_loop(&entry.path())? else {
            continue;
        };
        let device = Path::new(DEV).join(name);
        match backing(name, &device)? {
            Backing::Identity { dev, inode } => {
                devices.push(to_device(&device, listed, dev, inode))
            }
            Backing::Unbound => {}
        }
    }
    devices.sort_by_key(|device| (device.major, device.minor));
    Ok(devices)
}

fn to_device(device: &Path, listed: SysfsLoop, dev: u64, inode: u64) -> LoopDevice {
    LoopDevice {
        device: device.to_path_buf(),
        major: listed.major,
        minor: listed.minor,
        backing_dev: dev,
        backing_inode: inode,
        backing_file: listed.backing_file,
        read_only: listed.read_only,
        direct_io: listed.direct_io,
        size_bytes: listed.size_bytes,
    }
}

/// A loop device's sysfs folder (`/sys/block/loopN`); `None` when nothing
/// is bound or the device went away while it was read.
fn read_sysfs_loop(dir: &Path) -> OsResult<Option<SysfsLoop>> {
    let backing_path = dir.join("loop").join("backing_file");
    let Some(backing) = read_attribute(&backing_path)? else {
        return Ok(None);
    };
    // The kernel prints the path and a newline; the path may itself hold
    // any byte but NUL, so only that one newline goes.
    let backing = strip_newline(&backing);
    if backing.is_empty() {
        return Ok(None);
    }
    let dev_path = dir.join("dev");
    let ro_path = dir.join("ro");
    let size_path = dir.join("size");
    let dio_path = dir.join("loop").join("dio");
    let (Some(dev), Some(ro), Some(size), Some(dio)) = (
        read_attribute(&dev_path)?,
        read_attribute(&ro_path)?,
        read_attribute(&size_path)?,
        read_attribute(&dio_path)?,
    ) else {
        return Ok(None);
    };
    let (major, minor) =
        parse_dev(&dev).ok_or_else(|| not_parsed(&dev_path, "not MAJ:MIN", &dev))?;
    Ok(Some(SysfsLoop {
        major,
        minor,
        backing_file: PathBuf::from(OsStr::from_bytes(backing)),
        read_only: parse_flag(&ro).ok_or_else(|| not_parsed(&ro_path, "not 0 or 1", &ro))?,
        direct_io: parse_flag(&dio).ok_or_else(|| not_parsed(&dio_path, "not 0 or 1", &dio))?,
        size_bytes: parse_sectors(&size)
            .ok_or_else(|| not_parsed(&size_path, "not a sector count", &size))?,
    }))
}

/// A sysfs attribute's bytes; `None` if it does not exist (any more).
fn read_attribute(path: &Path) -> OsResult<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        // ENODEV: the kernel object went away while the file was open.
        Err(error)
            if error.kind() == ErrorKind::NotFound
                || error.raw_os_error() == Some(nix::libc::ENODEV) =>
        {
            Ok(None)
        }
        Err(error) => Err(OsError::io("read", path, &error)),
    }
}

fn not_parsed(path: &Path, what: &str, bytes: &[u8]) -> OsError {
    OsError::new(
        OsErrorKind::Failed,
        format!("read {}", path.display()),
        format!("{what}: {:?}", String::from_utf8_lossy(bytes)),
    )
}

fn strip_newline(bytes: &[u8]) -> &[u8] {
    bytes.strip_suffix(b"\n").unwrap_or(bytes)
}

fn trimmed(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok().map(str::trim)
}

/// sysfs `dev`: `7:3`.
fn parse_dev(bytes: &[u8]) -> Option<(u32, u32)> {
    let (major, minor) = trimmed(bytes)?.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// sysfs `ro`, `loop/dio`: `0` or `1`.
fn parse_flag(bytes: &[u8]) -> Option<bool> {
    match trimmed(bytes)? {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// sysfs `size`: 512-byte sectors whatever the logical block size.
fn parse_sectors(bytes: &[u8]) -> Option<u64> {
    trimmed(bytes)?.parse::<u64>().ok()?.checked_mul(512)
}

/// `loop` followed by a number: a whole loop device, not a partition
/// (`loop0p1`) nor `loop-control`.
fn is_loop_name(name: &str) -> bool {
    name.strip_prefix("loop")
        .is_some_and(|number| !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
}

/// `loopN` of `/dev/loopN`.
fn loop_name<'a>(device: &'a Path, operation: &str) -> OsResult<&'a str> {
    device
        .file_name()
        .and_then(|name| name.to_str())
        .filter(|name| is_loop_name(name))
        .ok_or_else(|| {
            OsError::new(
                OsErrorKind::Failed,
                format!("{operation} {}", device.display()),
                "not a /dev/loopN path",
            )
        })
}

fn errno_error(operation: impl Into<String>, path: &Path, errno: Errno) -> OsError {
    OsError::io(operation, path, &std::io::Error::from(errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_structures_have_the_kernel_layout() {
        // sizeof and offsetof in linux/loop.h, the same on every 64-bit and
        // 32-bit architecture (only fixed-size fields).
        assert_eq!(std::mem::size_of::<ioctls::LoopInfo64>(), 232);
        assert_eq!(std::mem::offset_of!(ioctls::LoopInfo64, lo_number), 40);
        assert_eq!(std::mem::offset_of!(ioctls::LoopInfo64, lo_flags), 52);
        assert_eq!(std::mem::offset_of!(ioctls::LoopInfo64, lo_file_name), 56);
        assert_eq!(std::mem::offset_of!(ioctls::LoopInfo64, lo_init), 216);
        assert_eq!(std::mem::size_of::<ioctls::LoopConfig>(), 304);
        assert_eq!(std::mem::offset_of!(ioctls::LoopConfig, info), 8);
        assert_eq!(std::mem::offset_of!(ioctls::LoopConfig, reserved), 240);
    }

    #[test]
    fn the_configuration_carries_the_flags_and_a_bounded_name() {
        let file = tempfile::tempfile().expect("temporary file");
        let config = loop_config(&file, Path::new("/pool/a"), true, true).expect("config");
        assert_eq!(
            config.info.lo_flags,
            ioctls::LO_FLAGS_READ_ONLY | ioctls::LO_FLAGS_DIRECT_IO
        );
        assert_eq!(i64::from(config.fd), i64::from(file.as_raw_fd()));
        assert_eq!(config.block_size, 0);
        assert_eq!(&config.info.lo_file_name[..8], b"/pool/a\0");
        let plain = loop_config(&file, Path::new("/p"), false, false).expect("config");
        assert_eq!(plain.info.lo_flags, 0);

        let long = "x".repeat(100);
        let field = file_name_field(OsStr::new(&long));
        assert!(field[..63].iter().all(|&b| b == b'x'));
        assert_eq!(field[63], 0, "always NUL-terminated");
    }

    #[test]
    fn names_whole_loop_devices_only() {
        for name in ["loop0", "loop12", "loop4000"] {
            assert!(is_loop_name(name), "{name}");
        }
        for name in ["loop", "loop0p1", "loop-control", "sda", "loopx", "nbd0"] {
            assert!(!is_loop_name(name), "{name}");
        }
        assert_eq!(
            loop_name(Path::new("/dev/loop7"), "detach").expect("name"),
            "loop7"
        );
        let error = loop_name(Path::new("/dev/sda"), "detach").expect_err("not a loop");
        assert_eq!(error.kind, OsErrorKind::Failed);
        assert!(error.operation.contains("/dev/sda"), "{error}");
    }

    #[test]
    fn parses_sysfs_attributes() {
        assert_eq!(parse_dev(b"7:3\n"), Some((7, 3)));
        assert_eq!(parse_dev(b"259:12"), Some((259, 12)));
        assert_eq!(parse_dev(b"7"), None);
        assert_eq!(parse_dev(b"a:b\n"), None);
        assert_eq!(parse_flag(b"1\n"), Some(true));
        assert_eq!(parse_flag(b"0\n"), Some(false));
        assert_eq!(parse_flag(b"yes\n"), None);
        assert_eq!(parse_sectors(b"32768\n"), Some(16 << 20));
        assert_eq!(parse_sectors(b"-1\n"), None);
        assert_eq!(parse_sectors(u64::MAX.to_string().as_bytes()), None);
        assert_eq!(strip_newline(b"/a b\n\n"), b"/a b\n");
        assert_eq!(strip_newline(b"/a"), b"/a");
    }

    /// A fake `/sys/block`.
    struct FakeSysfs {
        root: tempfile::TempDir,
    }

    impl FakeSysfs {
        fn new() -> Self {
            Self {
                root: tempfile::tempdir().expect("temporary directory"),
            }
        }

        fn path(&self) -> &Path {
            self.root.path()
        }

        /// A device folder with the given attributes (path relative to it,
        /// content).
        fn device(&self, name: &str, attributes: &[(&str, &[u8])]) {
            let dir = self.path().join(name);
            std::fs::create_dir_all(dir.join("loop")).expect("mkdir");
            for (attribute, content) in attributes {
                std::fs::write(dir.join(attribute), content).expect("write attribute");
            }
        }

        fn bound(
            &self,
            name: &str,
            minor: u32,
            backing: &[u8],
            ro: &[u8],
            dio: &[u8],
            sectors: &[u8],
        ) {
            let dev = format!("7:{minor}\n");
            self.device(
                name,
                &[
                    ("dev", dev.as_bytes()),
                    ("ro", ro),
                    ("size", sectors),
                    ("loop/backing_file", backing),
                    ("loop/dio", dio),
                ],
            );
        }
    }

    fn identity_by_minor(_: &str, device: &Path) -> OsResult<Backing> {
        let number: u64 = device
            .to_str()
            .and_then(|path| path.strip_prefix("/dev/loop"))
            .and_then(|digits| digits.parse().ok())
            .expect("a /dev/loopN path");
        Ok(Backing::Identity {
            dev: 0xfe00,
            inode: 1000 + number,
        })
    }

    #[test]
    fn lists_bound_devices_from_sysfs() {
        let sysfs = FakeSysfs::new();
        sysfs.bound(
            "loop10",
            10,
            b"/pool/b.img (deleted)\n",
            b"1\n",
            b"0\n",
            b"16384\n",
        );
        sysfs.bound("loop2", 2, b"/pool/a b.img\n", b"0\n", b"1\n", b"32768\n");
        // Unbound: no loop/ folder at all, or an empty backing_file.
        std::fs::create_dir_all(sysfs.path().join("loop0")).expect("mkdir");
        std::fs::write(sysfs.path().join("loop0/dev"), "7:0\n").expect("write");
        sysfs.device("loop3", &[("dev", b"7:3\n"), ("loop/backing_file", b"")]);
        // Not whole loop devices.
        sysfs.bound("loop2p1", 3, b"/x\n", b"0\n", b"0\n", b"1\n");
        sysfs.bound("sda", 0, b"/x\n", b"0\n", b"0\n", b"1\n");

        let mut asked = Vec::new();
        let devices = scan(sysfs.path(), |name, device| {
            asked.push(name.to_owned());
            identity_by_minor(name, device)
        })
        .expect("scan");
        assert_eq!(asked.len(), 2, "only bound devices are opened: {asked:?}");
        assert_eq!(
            devices,
            vec![
                LoopDevice {
                    device: PathBuf::from("/dev/loop2"),
                    major: 7,
                    minor: 2,
                    backing_dev: 0xfe00,
                    backing_inode: 1002,
                    backing_file: PathBuf::from("/pool/a b.img"),
                    read_only: false,
                    direct_io: true,
                    size_bytes: 16 << 20,
                },
                LoopDevice {
                    device: PathBuf::from("/dev/loop10"),
                    major: 7,
                    minor: 10,
                    backing_dev: 0xfe00,
                    backing_inode: 1010,
                    backing_file: PathBuf::from("/pool/b.img (deleted)"),
                    read_only: true,
                    direct_io: false,
                    size_bytes: 8 << 20,
                },
            ],
            "sorted by minor, paths as the kernel recorded them"
        );
    }

    #[test]
    fn leaves_out_devices_that_go_away_during_the_listing() {
        let sysfs = FakeSysfs::new();
        sysfs.bound("loop1", 1, b"/pool/a\n", b"0\n", b"1\n", b"8\n");
        sysfs.bound("loop2", 2, b"/pool/b\n", b"0\n", b"1\n", b"8\n");
        // Detached between sysfs and the ioctl.
        let devices = scan(sysfs.path(), |name, device| {
            if name == "loop1" {
                Ok(Backing::Unbound)
            } else {
                identity_by_minor(name, device)
            }
        })
        .expect("scan");
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].device, PathBuf::from("/dev/loop2"));
        // Half gone in sysfs: an attribute missing.
        std::fs::remove_file(sysfs.path().join("loop2/size")).expect("rm");
        assert_eq!(
            scan(sysfs.path(), identity_by_minor).expect("scan").len(),
            1
        );
    }

    #[test]
    fn a_device_without_backing_identity_matches_nothing() {
        let sysfs = FakeSysfs::new();
        sysfs.bound("loop4", 4, b"/pool/a\n", b"0\n", b"0\n", b"8\n");
        let devices = scan(sysfs.path(), |_, _| {
            Ok(Backing::Identity { dev: 0, inode: 0 })
        })
        .expect("scan");
        assert_eq!((devices[0].backing_dev, devices[0].backing_inode), (0, 0));
    }

    #[test]
    fn refuses_sysfs_it_cannot_trust() {
        let sysfs = FakeSysfs::new();
        sysfs.bound("loop5", 5, b"/pool/a\n", b"yes\n", b"0\n", b"8\n");
        let error = scan(sysfs.path(), identity_by_minor).expect_err("bad ro");
        assert_eq!(error.kind, OsErrorKind::Failed);
        assert!(error.operation.contains("loop5/ro"), "{error}");

        let sysfs = FakeSysfs::new();
        sysfs.bound("loop6", 6, b"/pool/a\n", b"0\n", b"0\n", b"many\n");
        let error = scan(sysfs.path(), identity_by_minor).expect_err("bad size");
        assert!(error.operation.contains("loop6/size"), "{error}");

        // An identity that cannot be read is an error, not an omission.
        let sysfs = FakeSysfs::new();
        sysfs.bound("loop7", 7, b"/pool/a\n", b"0\n", b"0\n", b"8\n");
        let error = scan(sysfs.path(), |_, device| {
            Err(errno_error("LOOP_GET_STATUS64", device, Errno::EIO))
        })
        .expect_err("ioctl failed");
        assert!(error.detail.contains("/dev/loop7"), "{error}");

        let missing = scan(Path::new("/nonexistent/liveclone-sysfs"), identity_by_minor)
            .expect_err("no sysfs");
        assert_eq!(missing.kind, OsErrorKind::NotFound);
    }

    #[test]
    fn attachment_is_read_from_sysfs() {
        let sysfs = FakeSysfs::new();
        sysfs.bound("loop1", 1, b"/pool/a\n", b"0\n", b"0\n", b"8\n");
        sysfs.device("loop2", &[("loop/backing_file", b"")]);
        let loops = KernelLoops::with_sysfs_block(sysfs.path().to_path_buf());
        assert!(loops.is_attached("loop1").expect("loop1"));
        assert!(!loops.is_attached("loop2").expect("loop2"));
        assert!(!loops.is_attached("loop3").expect("no such device"));
        // Detaching what is not attached needs no device node at all.
        loops
            .detach(Path::new("/dev/loop3"))
            .expect("absent is success");
        loops
            .detach(Path::new("/nonexistent/loop2"))
            .expect("unbound is success");
        assert_eq!(
            loops
                .detach(Path::new("/dev/sda"))
                .expect_err("not a loop device")
                .kind,
            OsErrorKind::Failed
        );
    }
}
