//! CreateVolume, DeleteVolume and ControllerExpandVolume.

use std::collections::BTreeMap;

use tracing::{info, info_span, warn};

use super::assembly::DeviceOutcome;
use super::{dm_name, Engine};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::{
    unix_now, AccessKind, ContentSource, HydrationRecord, HydrationStage, SnapshotState,
    VolumeRecord, VolumeState,
};
use crate::domain::pool::Storage;
use crate::domain::sizing::{
    device_class_parameter, parse_parameters, CloneParameters, PARAMETER_PREFIX,
};
use crate::os::dm::SECTOR_BYTES;
use crate::os::fs::FsType;

const MIB: u64 = 1 << 20;
/// Size of a volume when the CO gives no capacity range.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
/// Volume sizes are rounded up to this, so every size is whole sectors and
/// whole file-system blocks.
pub const VOLUME_ALIGNMENT: u64 = MIB;

/// The CSI capacity range; zero means "not given".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityRange {
    pub required_bytes: u64,
    pub limit_bytes: u64,
}

impl CapacityRange {
    /// The size to make: the required size (or `floor`, or the default)
    /// rounded up to [`VOLUME_ALIGNMENT`], within the limit.
    pub fn resolve(&self, floor: Option<u64>) -> DomainResult<u64> {
        if self.limit_bytes != 0 && self.required_bytes > self.limit_bytes {
            return Err(DomainError::invalid_argument(format!(
                "required_bytes {} is above limit_bytes {}",
                self.required_bytes, self.limit_bytes
            )));
        }
        if let Some(floor) = floor {
            if self.required_bytes != 0 && self.required_bytes < floor {
                return Err(DomainError::out_of_range(format!(
                    "the source holds {floor} bytes; a clone of it cannot be smaller \
                     (asked for {} bytes)",
                    self.required_bytes
                )));
            }
        }
        let wanted = match (self.required_bytes, floor) {
            (0, Some(floor)) => floor,
            (0, None) if self.limit_bytes != 0 => self.limit_bytes.min(DEFAULT_VOLUME_BYTES),
            (0, None) => DEFAULT_VOLUME_BYTES,
            (required, floor) => required.max(floor.unwrap_or(0)),
        };
        let aligned = wanted
            .checked_next_multiple_of(VOLUME_ALIGNMENT)
            .ok_or_else(|| DomainError::out_of_range(format!("{wanted} bytes is too large")))?;
        let size = if self.limit_bytes != 0 && aligned > self.limit_bytes {
            // Rounding up must not break the limit: whole sectors suffice.
            wanted.next_multiple_of(SECTOR_BYTES)
        } else {
            aligned
        };
        if self.limit_bytes != 0 && size > self.limit_bytes {
            return Err(DomainError::out_of_range(format!(
                "{size} bytes are needed but limit_bytes is {}",
                self.limit_bytes
            )));
        }
        if size == 0 {
            return Err(DomainError::out_of_range(
                "a volume needs at least one sector",
            ));
        }
        Ok(size)
    }

    pub fn admits(&self, bytes: u64) -> bool {
        bytes >= self.required_bytes && (self.limit_bytes == 0 || bytes <= self.limit_bytes)
    }
}

/// A CreateVolume request, validated by the handler except for what needs
/// state (source existence, sizes against the source).
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub capacity: CapacityRange,
    pub access: AccessKind,
    pub source: Option<ContentSource>,
    pub parameters: BTreeMap<String, String>,
}

/// The hidden snapshot cut from a source volume for one clone.
pub(super) fn hidden_snapshot_for(clone: &VolumeId) -> DomainResult<SnapshotId> {
    SnapshotId::for_name(&format!("liveclone.io/clone-source/{clone}"))
        .map_err(|e| DomainError::internal(e.to_string()))
}

impl Engine {
    pub fn create_volume(&self, request: CreateVolume) -> DomainResult<VolumeRecord> {
        let id = VolumeId::for_name(&request.name)
            .map_err(|e| DomainError::invalid_argument(format!("volume name: {e}")))?;
        let span = info_span!("create_volume", volume = %id, name = %request.name);
        let _entered = span.enter();
        let clone_parameters = parse_parameters(&request.parameters)
            .map_err(|e| DomainError::invalid_argument(e.to_string()))?;
        let mut keys = vec![id.to_string()];
        match &request.source {
            Some(ContentSource::Volume(source)) => keys.push(source.to_string()),
            Some(ContentSource::Snapshot(source)) => keys.push(source.to_string()),
            None => {}
        }
        let _guard = self.locks.try_acquire(keys)?;

        let record = match self.volumes.get(&id)? {
            Some(existing) => {
                // The spec's idempotency covers capacity, capabilities and
                // parameters alike: a retry that differs in any is another
                // volume under a name already taken.
                let parameters: BTreeMap<String, String> = request
                    .parameters
                    .iter()
                    .filter(|(k, _)| k.starts_with(PARAMETER_PREFIX))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if existing.content_source != request.source
                    || existing.access != request.access
                    || existing.parameters != parameters
                    || !request.capacity.admits(existing.capacity_bytes)
                {
                    return Err(DomainError::already_exists(format!(
                        "volume {:?} exists ({id}, {} bytes, {:?}, source {:?}) and does not \
                         match this request",
                        request.name,
                        existing.capacity_bytes,
                        existing.access,
                        existing.content_source
                    )));
                }
                match existing.state {
                    VolumeState::Ready => return Ok(existing),
                    VolumeState::Deleting => {
                        return Err(DomainError::aborted(format!(
                            "volume {id} is being deleted; retry once that finishes"
                        )))
                    }
                    VolumeState::Creating => existing,
                }
            }
            None => self.new_volume_record(&id, &request, &clone_parameters)?,
        };
        self.continue_create(record)
    }

    fn new_volume_record(
        &self,
        id: &VolumeId,
        request: &CreateVolume,
        clone_parameters: &CloneParameters,
    ) -> DomainResult<VolumeRecord> {
        let (source_bytes, hydration_source) = match &request.source {
            None => (None, None),
            Some(ContentSource::Volume(source_id)) => {
                let source = self.volumes.get(source_id)?.ok_or_else(|| {
                    DomainError::not_found(format!("source volume {source_id} does not exist"))
                })?;
                self.check_cuttable(&source)?;
                (Some(source.capacity_bytes), Some(hidden_snapshot_for(id)?))
            }
            Some(ContentSource::Snapshot(snapshot_id)) => {
                let snapshot = self
                    .snapshots
                    .get(snapshot_id)?
                    .filter(|s| !s.deleted && !s.hidden)
                    .ok_or_else(|| {
                        DomainError::not_found(format!("snapshot {snapshot_id} does not exist"))
                    })?;
                if snapshot.state != SnapshotState::Ready {
                    return Err(DomainError::unavailable(format!(
                        "snapshot {snapshot_id} is not ready yet"
                    )));
                }
                (Some(snapshot.size_bytes), Some(snapshot_id.clone()))
            }
        };
        let capacity_bytes = request.capacity.resolve(source_bytes)?;
        let device_class = device_class_parameter(&request.parameters)
            .map_err(|e| DomainError::invalid_argument(e.to_string()))?;
        let pool = self.classes.get(device_class.as_ref())?;
        let pool_total = pool.capacity()?.total_bytes;
        if capacity_bytes > pool_total {
            return Err(DomainError::resource_exhausted(format!(
                "{capacity_bytes} bytes is more than the whole {} ({pool_total} bytes)",
                pool.describe()
            )));
        }
        let hydration = match (source_bytes, hydration_source) {
            (Some(source_bytes), Some(source)) => {
                Some(self.plan_hydration(source, source_bytes, clone_parameters)?)
            }
            _ => None,
        };
        let record = VolumeRecord {
            id: id.clone(),
            name: request.name.clone(),
            capacity_bytes,
            access: request.access,
            content_source: request.source.clone(),
            parameters: request
                .parameters
                .iter()
                .filter(|(k, _)| k.starts_with(PARAMETER_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            state: VolumeState::Creating,
            generation: 0,
            needs_fs_grow: source_bytes.is_some_and(|s| capacity_bytes > s),
            device_class,
            hydration,
            last_hydration: None,
            created_at: unix_now(),
            published: Default::default(),
        };
        self.volumes.put(&record)?;
        Ok(record)
    }

    pub(super) fn plan_hydration(
        &self,
        source: SnapshotId,
        source_bytes: u64,
        parameters: &CloneParameters,
    ) -> DomainResult<HydrationRecord> {
        let plan = parameters
            .plan(super::assembly::sectors(source_bytes)?)
            .map_err(|e| DomainError::invalid_argument(e.to_string()))?;
        Ok(HydrationRecord {
            source,
            source_bytes,
            region_sectors: plan.region_size.sectors().0,
            metadata_bytes: plan.metadata_bytes,
            threshold: plan.tunables.threshold,
            batch_size: plan.tunables.batch_size,
            paused: false,
            stage: HydrationStage::Provisioning,
            started_at: unix_now(),
        })
    }

    /// A volume can be the source of a cut only once it is independent.
    pub(super) fn check_cuttable(&self, source: &VolumeRecord) -> DomainResult<()> {
        if source.state != VolumeState::Ready {
            return Err(DomainError::unavailable(format!(
                "source volume {} is not ready",
                source.id
            )));
        }
        if source.hydration.is_some() {
            let progress = self
                .progress_of(&source.id)
                .map(|p| format!(" ({})", p.message))
                .unwrap_or_default();
            return Err(DomainError::unavailable(format!(
                "source volume {} is itself still hydrating{progress}; it can be cloned or \
                 snapshotted once it is an independent copy",
                source.id
            )));
        }
        Ok(())
    }

    /// Runs (or re-runs after a crash) every step of creating the volume
    /// that the record does not show as done.
    pub(super) fn continue_create(&self, mut record: VolumeRecord) -> DomainResult<VolumeRecord> {
        let data = Self::data_of(&record);
        if let Some(hydration) = record.hydration.clone() {
            if let Some(ContentSource::Volume(source_id)) = &record.content_source {
                self.ensure_hidden_cut(&record.id, source_id, &hydration.source)?;
            }
            if hydration.stage == HydrationStage::Provisioning {
                self.provision_clone_storage(&record, hydration.metadata_bytes)?;
                record = self.set_stage(record, HydrationStage::MetadataBound)?;
            }
        } else {
            let pool = self.pool_of(&record)?;
            if !pool.exists(&data)? {
                pool.create(&data, record.capacity_bytes)?;
            }
        }
        if self.ensure_device(&record)? == DeviceOutcome::AlreadySwitched {
            return self.finish_switch(record);
        }
        if record
            .hydration
            .as_ref()
            .is_some_and(|h| h.stage == HydrationStage::MetadataBound)
        {
            self.skip_source_holes(&record)?;
            record = self.set_stage(record, HydrationStage::SourceHolesSkipped)?;
        }
        if record
            .hydration
            .as_ref()
            .is_some_and(|h| h.stage == HydrationStage::SourceHolesSkipped)
        {
            match record.access.fs() {
                // Nothing says what is free on a raw block volume: nothing
                // to trim, so its copy starts now.
                None => {
                    record = self.set_stage(record, HydrationStage::Trimmed)?;
                    self.apply_hydration_settings(&record)?;
                }
                // A file system clone is ready without its trim, which
                // walks the whole file system and so grows with its size:
                // the monitor trims it (through its mount if a pod mounted
                // it by then) and starts the copy in one of its next rounds
                // (`start_hydration`). Until then it reads what it has not
                // written from the source image, with hydration off.
                Some(fs) => self.give_clone_its_own_uuid(&record, fs)?,
            }
        }
        if record
            .hydration
            .as_ref()
            .is_some_and(|h| h.stage == HydrationStage::Trimmed)
        {
            record = self.set_stage(record, HydrationStage::Enabled)?;
        }
        if record.state != VolumeState::Ready {
            record.state = VolumeState::Ready;
            self.volumes.put(&record)?;
            info!(volume = %record.id, bytes = record.capacity_bytes, "volume ready");
        }
        Ok(record)
    }

    /// Destination data and zeroed metadata, both new. Only called in the
    /// Provisioning stage, when the metadata has never been loaded: a
    /// leftover from an interrupted attempt is removed and made again.
    pub(super) fn provision_clone_storage(
        &self,
        record: &VolumeRecord,
        metadata_bytes: u64,
    ) -> DomainResult<()> {
        let pool = self.pool_of(record)?;
        let data = Self::data_of(record);
        if !pool.exists(&data)? {
            pool.create(&data, record.capacity_bytes)?;
        }
        let metadata = Storage::Metadata(record.id.clone());
        pool.remove(&metadata)?;
        pool.create(&metadata, metadata_bytes)
    }

    pub(super) fn set_stage(
        &self,
        mut record: VolumeRecord,
        stage: HydrationStage,
    ) -> DomainResult<VolumeRecord> {
        if let Some(hydration) = record.hydration.as_mut() {
            hydration.stage = stage;
        }
        self.volumes.put(&record)?;
        Ok(record)
    }

    /// Discards, on a new clone that nothing has written yet, every whole
    /// region where the source image is a hole: dm-clone marks them
    /// hydrated without copying, and the destination (a new sparse file)
    /// reads zeros there just as the image does. This skips what a trim
    /// cannot (never-written parts of a file system's own metadata, of a
    /// raw block volume) and makes the trim's work smaller. Only before the
    /// first write: a discard over data written through the clone would
    /// drop it (see `HydrationStage::SourceHolesSkipped`).
    fn skip_source_holes(&self, record: &VolumeRecord) -> DomainResult<()> {
        let Some(hydration) = &record.hydration else {
            return Ok(());
        };
        if !self.pool_of(record)?.fresh_storage_reads_zeros() {
            // A discarded region is read from the destination from then on,
            // and this destination would not read zeros there.
            info!(volume = %record.id, "the destination does not read zeros where unwritten: the source's holes are copied");
            return Ok(());
        }
        let region = hydration.region_sectors.saturating_mul(SECTOR_BYTES);
        if region == 0 {
            return Err(DomainError::internal("recorded region size is zero"));
        }
        let device = Self::device_path(record);
        let mut skipped = 0u64;
        for hole in self.image_pool_by_id(&hydration.source)?.holes(
            &Storage::Image(hydration.source.clone()),
            hydration.source_bytes,
        )? {
            let start = hole.start.div_ceil(region).saturating_mul(region);
            let end = hole.end / region * region;
            if end > start {
                self.os.fs.discard(&device, start, end - start)?;
                skipped += end - start;
            }
        }
        info!(volume = %record.id, skipped_bytes = skipped, "regions where the source is a hole marked hydrated without copying");
        Ok(())
    }

    /// Gives a new xfs clone a UUID of its own, so that it can be mounted
    /// next to its source (xfs refuses a second mount of one UUID); ext4
    /// mounts with a duplicate and is left alone (see
    /// `os::fs::linux`). Only while the clone is `Creating`, before
    /// anything can mount it; repeating it after a crash only draws
    /// another UUID.
    fn give_clone_its_own_uuid(&self, record: &VolumeRecord, fs: FsType) -> DomainResult<()> {
        if fs != FsType::Xfs {
            return Ok(());
        }
        let device = Self::device_path(record);
        match self.os.fs.probe(&device)? {
            Some(found) if found == fs.to_string() => {
                Ok(self.os.fs.regenerate_uuid(&device, fs)?)
            }
            _ => Ok(()),
        }
    }

    /// Where [`Self::trim_privately`] mounts a volume.
    pub(super) fn private_trim_path(&self, id: &VolumeId) -> std::path::PathBuf {
        self.config.work_dir.join("trim").join(id.as_str())
    }

    /// Mounts a file-system volume that nothing else mounts privately,
    /// discards its free space (marking those regions hydrated without
    /// copying them), and unmounts. The file system trimmed, or `None` when
    /// the volume is a block volume or holds no file system of its kind.
    /// The caller holds the volume's lock, so no stage or publish races.
    pub(super) fn trim_privately(&self, record: &VolumeRecord) -> DomainResult<Option<FsType>> {
        let Some(fs) = record.access.fs() else {
            return Ok(None);
        };
        let device = Self::device_path(record);
        match self.os.fs.probe(&device)? {
            Some(found) if found == fs.to_string() => {}
            Some(found) => {
                warn!(volume = %record.id, "volume holds {found}, not {fs}; not trimming");
                return Ok(None);
            }
            None => return Ok(None),
        }
        let mount_point = self.private_trim_path(&record.id);
        std::fs::create_dir_all(&mount_point).map_err(|e| {
            DomainError::internal(format!("creating {}: {e}", mount_point.display()))
        })?;
        let _ = self.os.fs.unmount(&mount_point);
        let options = match fs {
            // The source may be mounted on this node with the same UUID.
            FsType::Xfs => vec!["nouuid".to_owned()],
            // No lazy inode-table initialisation on this short mount: the
            // kernel thread would start writing (and so hydrating) every
            // never-used inode table of the clone, then hold up the unmount.
            FsType::Ext4 => vec!["noinit_itable".to_owned()],
        };
        self.os.fs.mount(&device, &mount_point, fs, &options)?;
        let trimmed = self.os.fs.trim(&mount_point);
        let unmounted = self.os.fs.unmount(&mount_point);
        let trimmed = trimmed?;
        unmounted?;
        let _ = std::fs::remove_dir(&mount_point);
        info!(volume = %record.id, trimmed_bytes = trimmed, "free space discarded before hydration");
        Ok(Some(fs))
    }

    pub fn delete_volume(&self, id: &VolumeId) -> DomainResult<()> {
        let span = info_span!("delete_volume", volume = %id);
        let _entered = span.enter();
        let _guard = self.locks.try_acquire([id])?;
        let Some(mut record) = self.volumes.get(id)? else {
            return Ok(());
        };
        let name = dm_name(id);
        if let Some(device) = self.os.dm.info(&name)? {
            if device.open_count > 0 {
                return Err(DomainError::failed_precondition(format!(
                    "volume {id} is in use (its device {name} is open {} times: staged or \
                     published); unpublish and unstage it first",
                    device.open_count
                )));
            }
        }
        if record.state != VolumeState::Deleting {
            let published = self.live_publications(&record)?;
            if !published.is_empty() {
                return Err(DomainError::failed_precondition(format!(
                    "volume {id} is still published at {}; unpublish it first",
                    published.join(", ")
                )));
            }
            record.state = VolumeState::Deleting;
            self.volumes.put(&record)?;
        }
        self.os.dm.remove(&name)?;
        let pool = self.pool_of(&record)?;
        pool.remove(&Storage::Metadata(id.clone()))?;
        for item in pool.list()? {
            if matches!(&item, Storage::Data { volume, .. } if volume == id) {
                pool.remove(&item)?;
            }
        }
        self.volumes.remove(id)?;
        self.forget_progress(id);
        info!("volume deleted");
        self.collect_images();
        Ok(())
    }

    /// Grows a volume; returns the new size and whether the node must grow
    /// a file system. Safe during hydration: only the linear tail grows.
    pub fn expand_volume(
        &self,
        id: &VolumeId,
        capacity: CapacityRange,
    ) -> DomainResult<(u64, bool)> {
        let span = info_span!("expand_volume", volume = %id);
        let _entered = span.enter();
        let _guard = self.locks.try_acquire([id])?;
        let mut record = self.require_volume(id)?;
        if record.state != VolumeState::Ready {
            return Err(DomainError::aborted(format!("volume {id} is not ready")));
        }
        let wanted = capacity.resolve(None)?;
        let node_grow = record.access.fs().is_some();
        if wanted > record.capacity_bytes {
            let pool = self.pool_of(&record)?;
            let available = pool.capacity()?.total_bytes;
            if wanted > available {
                return Err(DomainError::out_of_range(format!(
                    "{wanted} bytes is more than the whole {}",
                    pool.describe()
                )));
            }
            pool.grow(&Self::data_of(&record), wanted)?;
            record.capacity_bytes = wanted;
            record.needs_fs_grow = node_grow;
            self.volumes.put(&record)?;
            info!(bytes = wanted, "volume expanded");
        }
        // Also when the size is already recorded: a retry must finish a
        // call that recorded it but failed before the device followed (or
        // before a reloaded clone got its hydration switch back).
        if self.ensure_device(&record)? == DeviceOutcome::AlreadySwitched {
            record = self.finish_switch(record)?;
            self.ensure_device(&record)?;
        }
        Ok((record.capacity_bytes, node_grow && record.needs_fs_grow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_resolution() {
        let range = |required, limit| CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        };
        assert_eq!(range(0, 0).resolve(None), Ok(DEFAULT_VOLUME_BYTES));
        assert_eq!(range(1, 0).resolve(None), Ok(MIB));
        assert_eq!(range(MIB + 1, 0).resolve(None), Ok(2 * MIB));
        assert_eq!(range(MIB + 1, MIB + 512).resolve(None), Ok(MIB + 512));
        assert_eq!(range(0, 0).resolve(Some(3 * MIB)), Ok(3 * MIB));
        assert_eq!(range(8 * MIB, 0).resolve(Some(3 * MIB)), Ok(8 * MIB));
        let smaller = range(MIB, 0)
            .resolve(Some(3 * MIB))
            .expect_err("smaller than source");
        assert_eq!(smaller.code, crate::domain::error::ErrorCode::OutOfRange);
        let limited = range(0, 2 * MIB)
            .resolve(Some(3 * MIB))
            .expect_err("limit below source");
        assert_eq!(limited.code, crate::domain::error::ErrorCode::OutOfRange);
        let inverted = range(4 * MIB, 2 * MIB).resolve(None).expect_err("inverted");
        assert_eq!(
            inverted.code,
            crate::domain::error::ErrorCode::InvalidArgument
        );
    }
}
