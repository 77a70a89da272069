//! Node operations: stage, publish, their reverses, stats and file-system
//! growth. Paths are checked against the allowed roots before anything is
//! created, mounted or removed at them.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tracing::{info, info_span};

use super::{dm_name, Engine};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::hydration::HydrationPhase;
use crate::domain::ids::VolumeId;
use crate::domain::model::{AccessKind, VolumeRecord, VolumeState};
use crate::os::fs::{FsType, FsUsage};

/// How to stage: a block volume needs nothing staged; a file system is
/// mounted once at the staging path and bind-mounted for each publish.
#[derive(Debug, Clone)]
pub struct StageRequest {
    pub staging_path: String,
    /// `None` for raw block access.
    pub mount: Option<MountSpec>,
}

#[derive(Debug, Clone)]
pub struct MountSpec {
    /// From the capability; `None` means the volume's own (or ext4).
    pub fs: Option<FsType>,
    pub flags: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub staging_path: String,
    pub target_path: String,
    pub block: bool,
    pub read_only: bool,
    /// SINGLE_NODE_SINGLE_WRITER: refuse a second publication.
    pub single_writer: bool,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone)]
pub struct NodeStats {
    /// `None` for block volumes: only their size is known.
    pub usage: Option<FsUsage>,
    pub capacity_bytes: u64,
    /// `Some(message)` when the volume is abnormal.
    pub abnormal: Option<String>,
}

/// Mount options, which become mount(2) flags or the file system's
/// comma-joined data string: each must be a plain `name` or `name=value`
/// without separators.
fn validate_mount_flags(flags: &[String]) -> DomainResult<Vec<String>> {
    flags
        .iter()
        .map(|flag| {
            let ok = !flag.is_empty()
                && flag.len() <= 256
                && flag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_=.:/+-@".contains(&b));
            if ok {
                Ok(flag.clone())
            } else {
                Err(DomainError::invalid_argument(format!(
                    "mount flag {flag:?} is not allowed: use name or name=value with letters, \
                     digits and _=.:/+-@ only"
                )))
            }
        })
        .collect()
}

impl Engine {
    fn ready_volume(&self, id: &VolumeId) -> DomainResult<VolumeRecord> {
        let record = self.require_volume(id)?;
        if record.state != VolumeState::Ready {
            return Err(DomainError::not_found(format!("volume {id} is not ready")));
        }
        Ok(record)
    }

    fn device_numbers(&self, id: &VolumeId) -> DomainResult<(u32, u32)> {
        let name = dm_name(id);
        let info = self.os.dm.info(&name)?.ok_or_else(|| {
            DomainError::internal(format!("the device {name} of volume {id} is missing"))
        })?;
        Ok((info.major, info.minor))
    }

    /// Whether `path` is a mount of this volume: a file system mounted from
    /// its device, or a bind mount of its device node.
    fn is_mount_of(&self, id: &VolumeId, path: &Path) -> DomainResult<bool> {
        let Some(mount) = self.os.fs.mount_at(path)? else {
            return Ok(false);
        };
        let (major, minor) = self.device_numbers(id)?;
        if (mount.major, mount.minor) == (major, minor) {
            return Ok(true);
        }
        // A bind-mounted device node: the mount's device is the one holding
        // /dev; the node itself names ours.
        Ok(std::fs::metadata(path)
            .map(|m| {
                m.file_type().is_block_device()
                    && m.rdev() == nix::sys::stat::makedev(major.into(), minor.into())
            })
            .unwrap_or(false))
    }

    pub fn stage(&self, id: &VolumeId, request: &StageRequest) -> DomainResult<()> {
        let span = info_span!("stage", volume = %id);
        let _entered = span.enter();
        let staging = self
            .config
            .allowed_roots
            .check("staging path", &request.staging_path)?;
        let _guard = self.locks.try_acquire([id])?;
        let mut record = self.ready_volume(id)?;
        self.ensure_device(&record)?;
        let Some(mount) = &request.mount else {
            return Ok(());
        };
        let flags = validate_mount_flags(&mount.flags)?;
        let fs = mount.fs.or(record.access.fs()).unwrap_or(FsType::DEFAULT);
        if self.os.fs.mount_at(&staging)?.is_some() {
            if self.is_mount_of(id, &staging)? {
                return Ok(());
            }
            return Err(DomainError::already_exists(format!(
                "{} is already a mount of something else",
                staging.display()
            )));
        }
        let device = Self::device_path(&record);
        match self.os.fs.probe(&device)? {
            None => {
                // A clone reads like its source, which may not read zeros
                // where it was never written (a blank thick LV): only a
                // new volume in a pool whose new storage reads zeros is
                // known to read zeros everywhere.
                let reads_zeros = record.content_source.is_none()
                    && self.pool_of(&record)?.fresh_storage_reads_zeros();
                info!(reads_zeros, "formatting {fs}");
                self.os.fs.mkfs(&device, fs, reads_zeros)?;
            }
            Some(found) if found == fs.to_string() => {}
            Some(found) => {
                return Err(DomainError::failed_precondition(format!(
                    "volume {id} holds a {found} file system, not {fs}; refusing to mount \
                     or format it as {fs}"
                )))
            }
        }
        create_dir_if_missing(&staging)?;
        self.os.fs.mount(&device, &staging, fs, &flags)?;
        if record.needs_fs_grow {
            self.os.fs.grow(&device, &staging, fs)?;
            record.needs_fs_grow = false;
            self.volumes.put(&record)?;
        }
        info!(path = %staging.display(), "staged");
        Ok(())
    }

    pub fn unstage(&self, id: &VolumeId, staging_path: &str) -> DomainResult<()> {
        let staging = self
            .config
            .allowed_roots
            .check("staging path", staging_path)?;
        let _guard = self.locks.try_acquire([id])?;
        self.require_volume(id)?;
        self.os.fs.unmount(&staging)?;
        Ok(())
    }

    pub fn publish(&self, id: &VolumeId, request: &PublishRequest) -> DomainResult<()> {
        let span = info_span!("publish", volume = %id);
        let _entered = span.enter();
        let target = self
            .config
            .allowed_roots
            .check("target path", &request.target_path)?;
        let staging = self
            .config
            .allowed_roots
            .check("staging path", &request.staging_path)?;
        let _guard = self.locks.try_acquire([id])?;
        let mut record = self.ready_volume(id)?;
        if self.os.fs.mount_at(&target)?.is_some() {
            if self.is_mount_of(id, &target)? {
                return self.remember_publication(record, &request.target_path);
            }
            return Err(DomainError::already_exists(format!(
                "{} is already a mount of something else",
                target.display()
            )));
        }
        if request.block {
            self.ensure_device(&record)?;
            create_file_if_missing(&target)?;
            self.os
                .fs
                .bind_mount(&Self::device_path(&record), &target, request.read_only)?;
        } else {
            if !self.is_mount_of(id, &staging)? {
                return Err(DomainError::failed_precondition(format!(
                    "volume {id} is not staged at {}; call NodeStageVolume first",
                    staging.display()
                )));
            }
            if request.single_writer {
                let (major, minor) = self.device_numbers(id)?;
                let elsewhere: Vec<_> = self
                    .os
                    .fs
                    .mounts_of(major, minor)?
                    .into_iter()
                    .map(|m| m.mount_point)
                    .filter(|p| *p != staging && *p != target)
                    .collect();
                if let Some(other) = elsewhere.first() {
                    return Err(DomainError::failed_precondition(format!(
                        "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already                          published at {}",
                        other.display()
                    )));
                }
            }
            create_dir_if_missing(&target)?;
            self.os
                .fs
                .bind_mount(&staging, &target, request.read_only)?;
        }
        info!(path = %target.display(), read_only = request.read_only, "published");
        record = self.volumes.get(id)?.unwrap_or(record);
        self.remember_publication(record, &request.target_path)
    }

    fn remember_publication(&self, mut record: VolumeRecord, target: &str) -> DomainResult<()> {
        if record.published.insert(target.to_owned()) {
            self.volumes.put(&record)?;
        }
        Ok(())
    }

    /// Publications that are still mounts of the volume; stale entries
    /// (a reboot dropped the mount) are forgotten.
    pub(super) fn live_publications(&self, record: &VolumeRecord) -> DomainResult<Vec<String>> {
        let mut live = Vec::new();
        for target in &record.published {
            if self
                .is_mount_of(&record.id, Path::new(target))
                .unwrap_or(false)
            {
                live.push(target.clone());
            }
        }
        Ok(live)
    }

    pub fn unpublish(&self, id: &VolumeId, target_path: &str) -> DomainResult<()> {
        let target = self
            .config
            .allowed_roots
            .check("target path", target_path)?;
        let _guard = self.locks.try_acquire([id])?;
        let mut record = self.require_volume(id)?;
        self.os.fs.unmount(&target)?;
        if record.published.remove(target_path) {
            self.volumes.put(&record)?;
        }
        match std::fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| DomainError::internal(format!("removing {}: {e}", target.display())))?;
        Ok(())
    }

    pub fn volume_stats(&self, id: &VolumeId, volume_path: &str) -> DomainResult<NodeStats> {
        if volume_path.is_empty() {
            return Err(DomainError::invalid_argument("volume path is missing"));
        }
        let record = self.require_volume(id)?;
        let path = PathBuf::from(volume_path);
        if !path.exists() {
            return Err(DomainError::not_found(format!(
                "{volume_path} does not exist"
            )));
        }
        if !self.is_mount_of(id, &path)? {
            return Err(DomainError::not_found(format!(
                "{volume_path} is not a mount of volume {id}"
            )));
        }
        let usage = match record.access {
            AccessKind::Filesystem { .. } if path.is_dir() => Some(self.os.fs.usage(&path)?),
            _ => None,
        };
        Ok(NodeStats {
            usage,
            capacity_bytes: record.capacity_bytes,
            abnormal: self.abnormal_condition(id),
        })
    }

    /// A message when hydration is stalled or failed, for volume conditions.
    pub fn abnormal_condition(&self, id: &VolumeId) -> Option<String> {
        let progress = self.progress_of(id)?;
        matches!(
            progress.phase,
            HydrationPhase::Stalled | HydrationPhase::Failed
        )
        .then(|| progress.message.clone())
    }

    /// Grows the file system mounted at `volume_path` to its device.
    pub fn node_expand(&self, id: &VolumeId, volume_path: &str) -> DomainResult<u64> {
        // An unknown volume is NOT_FOUND whatever the path looks like.
        self.require_volume(id)?;
        let path = self
            .config
            .allowed_roots
            .check("volume path", volume_path)?;
        let _guard = self.locks.try_acquire([id])?;
        let mut record = self.require_volume(id)?;
        if !path.exists() {
            return Err(DomainError::not_found(format!(
                "{volume_path} does not exist"
            )));
        }
        if let (Some(fs), true) = (record.access.fs(), path.is_dir()) {
            if !self.is_mount_of(id, &path)? {
                return Err(DomainError::not_found(format!(
                    "{volume_path} is not a mount of volume {id}"
                )));
            }
            self.os.fs.grow(&Self::device_path(&record), &path, fs)?;
            if record.needs_fs_grow {
                record.needs_fs_grow = false;
                self.volumes.put(&record)?;
            }
        }
        Ok(record.capacity_bytes)
    }
}

fn create_dir_if_missing(path: &Path) -> DomainResult<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(DomainError::internal(format!(
            "creating the folder {}: {e}",
            path.display()
        ))),
    }
}

fn create_file_if_missing(path: &Path) -> DomainResult<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_file() => Ok(()),
        Err(e) => Err(DomainError::internal(format!(
            "creating the file {}: {e}",
            path.display()
        ))),
    }
}
