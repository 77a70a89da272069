//! [`LoopDevices`] with util-linux `losetup`.
//!
//! # Direct I/O
//!
//! With `direct_io` asked for, the device is attached with
//! `--direct-io=on`. Two things can stop that:
//!
//! * the backing file system cannot open files with `O_DIRECT` at all
//!   (tmpfs on Linux 6.1): the attach fails with EINVAL;
//! * the kernel accepts the flag but keeps buffered I/O, e.g. when the
//!   backing file system's block size is larger than the loop device's
//!   logical block size.
//!
//! In both cases [`Losetup::attach`] keeps a buffered device, logs a
//! warning and reports `direct_io: false` in the returned [`LoopDevice`]
//! rather than failing. Buffered loop I/O is still correct and durable (a
//! flush of the loop device fsyncs the backing file); it costs page-cache
//! memory twice and some speed. The domain layer can read the flag and
//! refuse or report it.
//!
//! # Identity
//!
//! A loop device is matched to its backing file by the file's device and
//! inode number (`BACK-MAJ:MIN`, `BACK-INO`), not by path: the kernel's
//! recorded path goes stale when the file is renamed, and gets a
//! ` (deleted)` suffix when it is unlinked. This relies on `stat` reporting
//! the same device number as the kernel's superblock, which holds on ext4
//! and xfs (the pool file systems) but not on btrfs subvolumes or overlayfs.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{LoopDevice, LoopDevices, LoopOptions};
use crate::os::command::ToolCommand;
use crate::os::error::{OsError, OsErrorKind, OsResult};

const LOSETUP: &str = "losetup";

/// losetup only issues a few ioctls; a minute means something is stuck.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The listing columns we parse.
const LIST_COLUMNS: &str = "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,DIO";

/// util-linux `losetup`, run with an argument vector.
#[derive(Debug, Clone)]
pub struct Losetup {
    timeout: Duration,
}

impl Default for Losetup {
    fn default() -> Self {
        Self::new()
    }
}

impl Losetup {
    pub fn new() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_timeout(timeout: Duration) -> Self {
        Self { timeout }
    }

    fn command(&self) -> ToolCommand {
        ToolCommand::new(LOSETUP, self.timeout)
    }

    /// `losetup --find --show [--read-only] [--direct-io=on] FILE`; returns
    /// the new device's path.
    fn attach_once(&self, file: &Path, read_only: bool, direct_io: bool) -> OsResult<PathBuf> {
        let mut command = self.command().args(["--find", "--show"]);
        if read_only {
            command = command.arg("--read-only");
        }
        if direct_io {
            command = command.arg("--direct-io=on");
        }
        let command = command.arg(file);
        let output = command.run()?;
        let device = output.stdout.trim();
        if device.is_empty() {
            return Err(OsError::new(
                OsErrorKind::Failed,
                command.display(),
                "losetup printed no device name",
            ));
        }
        Ok(PathBuf::from(device))
    }

    /// The listing of one attached device.
    fn describe(&self, device: &Path) -> OsResult<LoopDevice> {
        let command = self
            .command()
            .args(["--list", "--json", "--output", LIST_COLUMNS])
            .arg(device);
        let output = command.run()?;
        let mut devices = parse_list(&output.stdout)
            .map_err(|detail| OsError::new(OsErrorKind::Failed, command.display(), detail))?;
        match devices.len() {
            1 => {
                let mut listed = devices.remove(0);
                listed.size_bytes = sysfs_size_bytes(&listed.device)?;
                Ok(listed)
            }
            0 => Err(OsError::new(
                OsErrorKind::NotFound,
                command.display(),
                format!("{} is not attached", device.display()),
            )),
            n => Err(OsError::new(
                OsErrorKind::Failed,
                command.display(),
                format!("expected one device, losetup listed {n}"),
            )),
        }
    }
}

impl LoopDevices for Losetup {
    /// Never sets autoclear: a device must stay until the driver detaches
    /// it, whoever else opens and closes it.
    fn attach(&self, file: &Path, options: LoopOptions) -> OsResult<LoopDevice> {
        let device = match self.attach_once(file, options.read_only, options.direct_io) {
            Ok(device) => device,
            // EINVAL with direct I/O: the backing file system cannot do
            // O_DIRECT. Any other cause fails again below, unchanged.
            Err(error) if options.direct_io && error.detail.contains("Invalid argument") => {
                tracing::warn!(
                    file = %file.display(),
                    %error,
                    "the backing file system refused direct I/O; attaching with buffered I/O"
                );
                self.attach_once(file, options.read_only, false)?
            }
            Err(error) => return Err(error),
        };
        let attached = match self.describe(&device) {
            Ok(attached) => attached,
            Err(error) => {
                let _ = self.detach(&device);
                return Err(error);
            }
        };
        if !options.read_only && attached.read_only {
            // losetup falls back to read-only when the file is not
            // writable; a caller that asked for read-write would only find
            // out at its first write.
            let _ = self.detach(&device);
            return Err(OsError::new(
                OsErrorKind::Failed,
                format!("losetup --find --show {}", file.display()),
                format!(
                    "{} was attached read-only (is the file writable?); detached again",
                    device.display()
                ),
            ));
        }
        if options.direct_io && !attached.direct_io {
            tracing::warn!(
                file = %file.display(),
                device = %device.display(),
                "direct I/O is not in effect on the loop device; it uses the page cache"
            );
        }
        Ok(attached)
    }

    fn find(&self, file: &Path) -> OsResult<Vec<LoopDevice>> {
        let meta = std::fs::metadata(file).map_err(|error| OsError::io("stat", file, &error))?;
        let backing_dev = meta.dev();
        let backing_inode = meta.ino();
        Ok(self
            .list()?
            .into_iter()
            .filter(|device| {
                device.backing_dev == backing_dev && device.backing_inode == backing_inode
            })
            .collect())
    }

    fn list(&self) -> OsResult<Vec<LoopDevice>> {
        let command = self
            .command()
            .args(["--list", "--json", "--output", LIST_COLUMNS]);
        let output = command.run()?;
        let listed = parse_list(&output.stdout)
            .map_err(|detail| OsError::new(OsErrorKind::Failed, command.display(), detail))?;
        // Sizes come from sysfs, which also tells a device that vanished
        // between the listing and now (its sysfs folder is gone). Whether
        // the /dev node exists in this mount namespace does not matter: a
        // container with a partial /dev must still see every attached file,
        // or it would attach one twice.
        let mut devices = Vec::with_capacity(listed.len());
        for mut device in listed {
            match sysfs_size_bytes(&device.device) {
                Ok(size) => {
                    device.size_bytes = size;
                    devices.push(device);
                }
                Err(error) if error.is_not_found() => {}
                Err(error) => return Err(error),
            }
        }
        Ok(devices)
    }

    /// Detaches `device`; one that does not exist or is not attached is
    /// success.
    ///
    /// A device held exclusively (by a mount or a device-mapper table) is
    /// [`OsErrorKind::Busy`] and stays attached: the kernel would otherwise
    /// accept the detach of an open device and turn it into autoclear,
    /// which detaches silently at the last close. A plain (non-exclusive)
    /// opener is not detected; in that case the kernel's deferred detach
    /// applies.
    fn detach(&self, device: &Path) -> OsResult<()> {
        if !is_attached(device)? {
            return Ok(());
        }
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(device)
        {
            Ok(probe) => drop(probe),
            Err(error) if error.raw_os_error() == Some(nix::libc::EBUSY) => {
                return Err(OsError::new(
                    OsErrorKind::Busy,
                    format!("losetup --detach {}", device.display()),
                    "the device is in use (mounted or under a device-mapper table)",
                ));
            }
            Err(error) => return Err(OsError::io("open O_EXCL", device, &error)),
        }
        let command = self.command().arg("--detach").arg(device);
        let output = command.output()?;
        if output.status.success() || !is_attached(device)? {
            Ok(())
        } else {
            Err(command.failure(&output))
        }
    }

    fn refresh_size(&self, device: &Path) -> OsResult<()> {
        self.command()
            .arg("--set-capacity")
            .arg(device)
            .run()
            .map(drop)
    }
}

/// Whether the loop device named by `device` has a backing file: sysfs
/// shows `loop/backing_file` only while one is attached. Asked of sysfs,
/// not of the `/dev` node, which a container may lack.
fn is_attached(device: &Path) -> OsResult<bool> {
    Ok(sysfs_dir(device)?
        .join("loop")
        .join("backing_file")
        .exists())
}

/// `/sys/class/block/<loopN>` for `/dev/loopN`.
fn sysfs_dir(device: &Path) -> OsResult<PathBuf> {
    let name = device
        .file_name()
        .and_then(|name| name.to_str())
        .filter(|name| name.starts_with("loop"))
        .ok_or_else(|| {
            OsError::new(
                OsErrorKind::Failed,
                format!("sysfs lookup of {}", device.display()),
                "not a /dev/loopN path",
            )
        })?;
    Ok(Path::new("/sys/class/block").join(name))
}

/// The device's size from sysfs, which counts 512-byte sectors whatever
/// the logical block size. Reading sysfs does not open the device, so it
/// cannot disturb an exclusive holder.
fn sysfs_size_bytes(device: &Path) -> OsResult<u64> {
    let path = sysfs_dir(device)?.join("size");
    let text =
        std::fs::read_to_string(&path).map_err(|error| OsError::io("read", &path, &error))?;
    text.trim()
        .parse::<u64>()
        .ok()
        .and_then(|sectors| sectors.checked_mul(512))
        .ok_or_else(|| {
            OsError::new(
                OsErrorKind::Failed,
                format!("read {}", path.display()),
                format!("not a sector count: {text:?}"),
            )
        })
}

/// `losetup --list --json` output. Types differ between util-linux
/// versions (2.38 prints numbers and booleans, older ones strings such as
/// `"1"`), so every field is read leniently.
#[derive(Debug, Deserialize)]
struct Listing {
    loopdevices: Vec<ListedDevice>,
}

#[derive(Debug, Deserialize)]
struct ListedDevice {
    name: String,
    #[serde(rename = "back-file", default)]
    back_file: Option<String>,
    #[serde(rename = "back-ino", default)]
    back_ino: Option<Scalar>,
    #[serde(rename = "back-maj:min", default)]
    back_maj_min: Option<String>,
    #[serde(rename = "maj:min", default)]
    maj_min: Option<String>,
    #[serde(default)]
    ro: Option<Scalar>,
    #[serde(default)]
    dio: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Number(u64),
    Text(String),
}

impl Scalar {
    fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Number(n) => Some(*n),
            Scalar::Text(text) => text.trim().parse().ok(),
            Scalar::Bool(_) => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            Scalar::Number(n) => Some(*n != 0),
            Scalar::Text(text) => match text.trim() {
                "1" => Some(true),
                "0" => Some(false),
                _ => None,
            },
        }
    }
}

/// `"  7:1  "` (padded in util-linux 2.38's JSON) to `(7, 1)`.
fn parse_maj_min(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.trim().parse().ok()?, minor.trim().parse().ok()?))
}

/// Parses the JSON listing; sizes are left at 0 for the caller to fill.
fn parse_list(json: &str) -> Result<Vec<LoopDevice>, String> {
    // An empty listing is `{"loopdevices": []}` on 2.38; older versions
    // print nothing at all.
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let listing: Listing =
        serde_json::from_str(json).map_err(|error| format!("cannot parse the listing: {error}"))?;
    listing
        .loopdevices
        .into_iter()
        .map(|listed| {
            let context = |what: &str| format!("{}: {what}", listed.name);
            let (major, minor) = listed
                .maj_min
                .as_deref()
                .and_then(parse_maj_min)
                .ok_or_else(|| context("no MAJ:MIN"))?;
            // A device whose backing file cannot be identified (LOOP_GET_STATUS
            // failed) lists as 0:0 / 0 and matches no file.
            let (back_major, back_minor) = listed
                .back_maj_min
                .as_deref()
                .and_then(parse_maj_min)
                .unwrap_or((0, 0));
            Ok(LoopDevice {
                device: PathBuf::from(&listed.name),
                major,
                minor,
                backing_dev: nix::sys::stat::makedev(u64::from(back_major), u64::from(back_minor)),
                backing_inode: listed
                    .back_ino
                    .as_ref()
                    .and_then(Scalar::as_u64)
                    .unwrap_or(0),
                backing_file: PathBuf::from(listed.back_file.unwrap_or_default()),
                read_only: listed
                    .ro
                    .as_ref()
                    .and_then(Scalar::as_bool)
                    .ok_or_else(|| context("no RO flag"))?,
                direct_io: listed
                    .dio
                    .as_ref()
                    .and_then(Scalar::as_bool)
                    .ok_or_else(|| context("no DIO flag"))?,
                size_bytes: 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured in the test VM (util-linux 2.38.1, Linux 6.1) after
    /// `losetup --find --show --read-only b.img` and `--direct-io=on a.img`.
    const LISTING_2_38: &str = r#"{
   "loopdevices": [
      {
         "name": "/dev/loop1",
         "back-file": "/scratch/tmp/b.img (deleted)",
         "back-ino": 393220,
         "back-maj:min": "     254:0  ",
         "maj:min": "  7:1  ",
         "ro": true,
         "dio": false
      },{
         "name": "/dev/loop0",
         "back-file": "/scratch/tmp/a2.img",
         "back-ino": 393219,
         "back-maj:min": "     254:0  ",
         "maj:min": "  7:0  ",
         "ro": false,
         "dio": true
      }
   ]
}"#;

    #[test]
    fn parses_the_util_linux_2_38_listing() {
        let devices = parse_list(LISTING_2_38).expect("parses");
        assert_eq!(devices.len(), 2);
        let ro = &devices[0];
        assert_eq!(ro.device, PathBuf::from("/dev/loop1"));
        assert_eq!((ro.major, ro.minor), (7, 1));
        assert!(ro.read_only && !ro.direct_io);
        assert_eq!(ro.backing_inode, 393220);
        // stat(2) in the VM gave st_dev 65024 (0xfe00) for the same file.
        assert_eq!(ro.backing_dev, 65024);
        assert_eq!(
            ro.backing_file,
            PathBuf::from("/scratch/tmp/b.img (deleted)")
        );
        let rw = &devices[1];
        assert!(!rw.read_only && rw.direct_io);
        assert_eq!((rw.major, rw.minor), (7, 0));
    }

    #[test]
    fn parses_string_typed_fields_of_other_versions() {
        let json = r#"{"loopdevices": [{"name": "/dev/loop3", "back-file": "/p/f",
            "back-ino": "12", "back-maj:min": "259:3", "maj:min": "7:3",
            "ro": "1", "dio": "0"}]}"#;
        let devices = parse_list(json).expect("parses");
        assert_eq!(devices[0].backing_inode, 12);
        assert_eq!(devices[0].backing_dev, nix::sys::stat::makedev(259, 3));
        assert!(devices[0].read_only && !devices[0].direct_io);
    }

    #[test]
    fn empty_listings_are_empty() {
        assert_eq!(
            parse_list("{\n   \"loopdevices\": [\n\n   ]\n}\n"),
            Ok(vec![])
        );
        assert_eq!(parse_list(""), Ok(vec![]));
    }

    #[test]
    fn a_device_without_backing_identity_matches_nothing() {
        let json = r#"{"loopdevices": [{"name": "/dev/loop3", "back-file": null,
            "back-ino": null, "back-maj:min": null, "maj:min": "7:3",
            "ro": false, "dio": false}]}"#;
        let devices = parse_list(json).expect("parses");
        assert_eq!((devices[0].backing_dev, devices[0].backing_inode), (0, 0));
    }

    #[test]
    fn refuses_listings_it_cannot_trust() {
        assert!(parse_list("not json").is_err());
        // No MAJ:MIN for the device itself.
        assert!(parse_list(
            r#"{"loopdevices": [{"name": "/dev/loop0", "ro": false, "dio": false}]}"#
        )
        .is_err());
        // A flag that is neither boolean nor 0/1.
        assert!(parse_list(
            r#"{"loopdevices": [{"name": "/dev/loop0", "maj:min": "7:0", "ro": "yes", "dio": false}]}"#
        )
        .is_err());
    }

    #[test]
    fn parses_padded_device_numbers() {
        assert_eq!(parse_maj_min("     254:0  "), Some((254, 0)));
        assert_eq!(parse_maj_min("7:12"), Some((7, 12)));
        assert_eq!(parse_maj_min("7"), None);
        assert_eq!(parse_maj_min("a:b"), None);
    }
}
