//! The file-backed pool: sparse files in a pool directory, attached as loop
//! devices with direct I/O.
//!
//! Layout under the pool root (names come only from validated IDs):
//!
//! ```text
//! volumes/<volume-id>.g<generation>.img   volume data
//! images/<snapshot-id>.img                snapshot images (read-only)
//! metadata/<volume-id>.meta               dm-clone metadata of a hydrating clone
//! ```
//!
//! Files are opened with `O_NOFOLLOW`, and the root is resolved once at
//! start, so nothing in the pool can redirect the driver elsewhere.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::domain::error::{DomainError, DomainResult};
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::pool::{BlockDevice, Pool, PoolCapacity, Storage};
use crate::os::loopdev::{LoopDevice, LoopOptions};
use crate::os::{Os, OsErrorKind};

const VOLUMES: &str = "volumes";
const IMAGES: &str = "images";
const METADATA: &str = "metadata";

pub struct FilePool {
    root: PathBuf,
    os: Os,
    /// Whether the pool's file system can reflink, probed once: it does not
    /// change while the pool directory stays mounted.
    reflink: std::sync::OnceLock<bool>,
}

impl std::fmt::Debug for FilePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilePool")
            .field("root", &self.root)
            .finish()
    }
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> DomainError {
    let message = format!("{what} {}: {error}", path.display());
    match error.raw_os_error() {
        Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT => {
            DomainError::resource_exhausted(message)
        }
        _ if error.kind() == std::io::ErrorKind::AlreadyExists => {
            DomainError::already_exists(message)
        }
        _ if error.kind() == std::io::ErrorKind::NotFound => DomainError::not_found(message),
        _ => DomainError::internal(message),
    }
}

impl FilePool {
    /// Opens (creating the sub-folders of) the pool at `root`, which must
    /// exist: a mistyped path should fail, not create a pool somewhere else.
    pub fn open(root: &Path, os: Os) -> DomainResult<Self> {
        let root = root
            .canonicalize()
            .map_err(|e| io_error("opening the pool directory", root, e))?;
        for sub in [VOLUMES, IMAGES, METADATA] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| io_error("creating", &dir, e))?;
        }
        Ok(Self {
            root,
            os,
            reflink: std::sync::OnceLock::new(),
        })
    }

    /// Reflinks a one-block scratch file in the pool root (a name no pool
    /// item can have) and removes both files.
    fn probe_reflink(&self) -> DomainResult<bool> {
        let probe = self.root.join(".reflink-probe");
        let copy = self.root.join(".reflink-probe.copy");
        for stale in [&probe, &copy] {
            match std::fs::remove_file(stale) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("removing", stale, e)),
            }
        }
        std::fs::write(&probe, [0u8; 4096]).map_err(|e| io_error("writing", &probe, e))?;
        let result = self.os.fs.reflink(&probe, &copy);
        let _ = std::fs::remove_file(&copy);
        let _ = std::fs::remove_file(&probe);
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.kind == OsErrorKind::Unsupported => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file behind a storage item.
    pub fn path_of(&self, item: &Storage) -> PathBuf {
        match item {
            Storage::Data { volume, generation } => self
                .root
                .join(VOLUMES)
                .join(format!("{volume}.g{generation}.img")),
            Storage::Image(snapshot) => self.root.join(IMAGES).join(format!("{snapshot}.img")),
            Storage::Metadata(volume) => self.root.join(METADATA).join(format!("{volume}.meta")),
        }
    }

    fn parse_file_name(folder: &str, name: &str) -> Option<Storage> {
        match folder {
            VOLUMES => {
                let stem = name.strip_suffix(".img")?;
                let (id, generation) = stem.split_once(".g")?;
                Some(Storage::Data {
                    volume: VolumeId::from_str(id).ok()?,
                    generation: generation.parse().ok()?,
                })
            }
            IMAGES => Some(Storage::Image(
                SnapshotId::from_str(name.strip_suffix(".img")?).ok()?,
            )),
            METADATA => Some(Storage::Metadata(
                VolumeId::from_str(name.strip_suffix(".meta")?).ok()?,
            )),
            _ => None,
        }
    }

    fn open_existing(&self, item: &Storage, write: bool) -> DomainResult<File> {
        let path = self.path_of(item);
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_error("opening", &path, e))
    }

    fn sync_parent(&self, path: &Path) -> DomainResult<()> {
        if let Some(parent) = path.parent() {
            File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| io_error("syncing", parent, e))?;
        }
        Ok(())
    }

    fn to_block_device(device: LoopDevice) -> BlockDevice {
        BlockDevice {
            path: device.device,
            major: device.major,
            minor: device.minor,
            size_bytes: device.size_bytes,
            read_only: device.read_only,
        }
    }
}

impl Pool for FilePool {
    fn describe(&self) -> String {
        format!("file pool {}", self.root.display())
    }

    fn check(&self) -> Result<(), String> {
        for sub in [VOLUMES, IMAGES, METADATA] {
            let dir = self.root.join(sub);
            nix::unistd::access(
                &dir,
                nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
            )
            .map_err(|e| format!("the pool folder {} is not writable: {e}", dir.display()))?;
        }
        Ok(())
    }

    fn capacity(&self) -> DomainResult<PoolCapacity> {
        let usage = self.os.fs.usage(&self.root)?;
        Ok(PoolCapacity {
            total_bytes: usage.total_bytes,
            available_bytes: usage.available_bytes,
            thin: None,
        })
    }

    fn create(&self, item: &Storage, bytes: u64) -> DomainResult<()> {
        let path = self.path_of(item);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_error("creating", &path, e))?;
        // A new file's holes read as zeros: the storage is zero-filled
        // without writing, and takes no space until written.
        let result = file
            .set_len(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("sizing", &path, e));
        if let Err(error) = result {
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        self.sync_parent(&path)
    }

    fn exists(&self, item: &Storage) -> DomainResult<bool> {
        let path = self.path_of(item);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_file() => Ok(true),
            Ok(_) => Err(DomainError::internal(format!(
                "{} is not a regular file; refusing to use it",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("inspecting", &path, e)),
        }
    }

    fn size(&self, item: &Storage) -> DomainResult<u64> {
        let file = self.open_existing(item, false)?;
        let path = self.path_of(item);
        file.metadata()
            .map(|m| m.len())
            .map_err(|e| io_error("inspecting", &path, e))
    }

    fn grow(&self, item: &Storage, bytes: u64) -> DomainResult<()> {
        let file = self.open_existing(item, true)?;
        let path = self.path_of(item);
        let current = file
            .metadata()
            .map_err(|e| io_error("inspecting", &path, e))?
            .len();
        if bytes > current {
            file.set_len(bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error("growing", &path, e))?;
        }
        for device in self.attachments(item)? {
            self.os.loops.refresh_size(&device.path)?;
        }
        Ok(())
    }

    fn remove(&self, item: &Storage) -> DomainResult<()> {
        self.detach(item)?;
        let path = self.path_of(item);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_parent(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("removing", &path, e)),
        }
    }

    fn attach(&self, item: &Storage, read_only: bool) -> DomainResult<BlockDevice> {
        if let Some(existing) = self
            .attachments(item)?
            .into_iter()
            .find(|device| device.read_only == read_only)
        {
            return Ok(existing);
        }
        // Check the file is ours and regular before attaching it.
        drop(self.open_existing(item, false)?);
        let device = self.os.loops.attach(
            &self.path_of(item),
            LoopOptions {
                read_only,
                direct_io: true,
            },
        )?;
        Ok(Self::to_block_device(device))
    }

    fn detach(&self, item: &Storage) -> DomainResult<()> {
        for device in self.attachments(item)? {
            self.os.loops.detach(&device.path)?;
        }
        Ok(())
    }

    fn attachments(&self, item: &Storage) -> DomainResult<Vec<BlockDevice>> {
        let path = self.path_of(item);
        if !self.exists(item)? {
            return Ok(Vec::new());
        }
        match self.os.loops.find(&path) {
            Ok(devices) => Ok(devices.into_iter().map(Self::to_block_device).collect()),
            Err(e) if e.kind == OsErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    fn release(&self, _item: &Storage, device: &BlockDevice) -> DomainResult<()> {
        Ok(self.os.loops.detach(&device.path)?)
    }

    /// New files are sparse, and a discard through a loop device punches a
    /// hole.
    fn fresh_storage_reads_zeros(&self) -> bool {
        true
    }

    /// SEEK_DATA / SEEK_HOLE over the file. A file system without them
    /// reports the whole file as data, which is only slower.
    fn holes(&self, item: &Storage, length: u64) -> DomainResult<Vec<std::ops::Range<u64>>> {
        use nix::unistd::{lseek, Whence};
        let file = self.open_existing(item, false)?;
        let path = self.path_of(item);
        let offset = |position: u64| {
            i64::try_from(position)
                .map_err(|_| DomainError::internal(format!("offset {position} is out of range")))
        };
        let mut holes = Vec::new();
        let mut position = 0u64;
        while position < length {
            let data = match lseek(&file, offset(position)?, Whence::SeekData) {
                // ENXIO: no data at or after `position`.
                Err(nix::errno::Errno::ENXIO) => length,
                Err(errno) => return Err(io_error("SEEK_DATA in", &path, errno.into())),
                Ok(at) => u64::try_from(at).unwrap_or(length).min(length),
            };
            if data > position {
                holes.push(position..data);
            }
            if data >= length {
                break;
            }
            position = match lseek(&file, offset(data)?, Whence::SeekHole) {
                Err(errno) => return Err(io_error("SEEK_HOLE in", &path, errno.into())),
                Ok(at) => u64::try_from(at).unwrap_or(length),
            };
        }
        Ok(holes)
    }

    fn instant_clone_supported(&self) -> DomainResult<bool> {
        if let Some(known) = self.reflink.get() {
            return Ok(*known);
        }
        let supported = self.probe_reflink()?;
        tracing::info!(pool = %self.root.display(), supported, "probed the pool for reflink");
        Ok(*self.reflink.get_or_init(|| supported))
    }

    fn clone_instant(&self, from: &Storage, to: &Storage) -> DomainResult<bool> {
        match self.os.fs.reflink(&self.path_of(from), &self.path_of(to)) {
            Ok(()) => {
                self.sync_parent(&self.path_of(to))?;
                Ok(true)
            }
            Err(e) if e.kind == OsErrorKind::Unsupported => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn rename(&self, from: &Storage, to: &Storage) -> DomainResult<()> {
        let (from_path, to_path) = (self.path_of(from), self.path_of(to));
        if self.exists(to)? {
            return Err(DomainError::already_exists(format!(
                "cannot rename {} to {}: the target exists",
                from_path.display(),
                to_path.display()
            )));
        }
        std::fs::rename(&from_path, &to_path).map_err(|e| io_error("renaming", &from_path, e))?;
        self.sync_parent(&from_path)?;
        self.sync_parent(&to_path)
    }

    fn list(&self) -> DomainResult<Vec<Storage>> {
        let mut items = Vec::new();
        for folder in [VOLUMES, IMAGES, METADATA] {
            let dir = self.root.join(folder);
            let entries = std::fs::read_dir(&dir).map_err(|e| io_error("listing", &dir, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_error("listing", &dir, e))?;
                if let Some(item) = entry
                    .file_name()
                    .to_str()
                    .and_then(|name| Self::parse_file_name(folder, name))
                {
                    items.push(item);
                }
            }
        }
        items.sort();
        Ok(items)
    }
}
