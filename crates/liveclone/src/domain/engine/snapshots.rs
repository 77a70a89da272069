//! Snapshots: point-in-time cuts of a volume, and how long images live.
//!
//! A cut quiesces the volume (freeze its mounted file system, suspend its
//! device with a flush), then either
//! * **reflinks** the volume's data file into the image (pools on xfs or
//!   btrfs): instant, the volume is untouched; or
//! * **redirects**: renames the data file to be the image and reloads the
//!   volume as a dm-clone of it, hydrating into a new data file. Instant on
//!   any pool file system; the volume copies itself back in the background.
//!
//! Either way the image never changes afterwards: clones read it through a
//! read-only loop device. Images are released when the CO has deleted the
//! snapshot (or, for a hidden cut made for a clone of a volume, at once)
//! and no hydrating clone reads from them any more.

use tracing::{error, info, info_span, warn};

use super::assembly::DeviceOutcome;
use super::{dm_name, Engine};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::model::{
    unix_now, CutMethod, HydrationStage, SnapshotRecord, SnapshotState, VolumeRecord,
};
use crate::domain::pool::Storage;
use crate::domain::sizing::parse_parameters;

impl Engine {
    pub fn create_snapshot(&self, name: &str, source: &VolumeId) -> DomainResult<SnapshotRecord> {
        let id = SnapshotId::for_name(name)
            .map_err(|e| DomainError::invalid_argument(format!("snapshot name: {e}")))?;
        let span = info_span!("create_snapshot", snapshot = %id, volume = %source);
        let _entered = span.enter();
        let _guard = self
            .locks
            .try_acquire([id.to_string(), source.to_string()])?;
        if let Some(existing) = self.snapshots.get(&id)? {
            if existing.source_volume != *source || existing.hidden {
                return Err(DomainError::already_exists(format!(
                    "snapshot {name:?} exists ({id}) with another source volume ({})",
                    existing.source_volume
                )));
            }
            if existing.deleted {
                return Err(DomainError::unavailable(format!(
                    "a snapshot named {name:?} was deleted and is still held for clones \
                     hydrating from it; retry later"
                )));
            }
            if existing.state == SnapshotState::Ready {
                return Ok(existing);
            }
            return self.continue_cut(existing);
        }
        let volume = self.volumes.get(source)?.ok_or_else(|| {
            DomainError::not_found(format!("source volume {source} does not exist"))
        })?;
        self.check_cuttable(&volume)?;
        let record = SnapshotRecord {
            id,
            name: name.to_owned(),
            source_volume: source.clone(),
            size_bytes: volume.capacity_bytes,
            access: volume.access,
            state: SnapshotState::Creating,
            method: None,
            hidden: false,
            deleted: false,
            source_generation: volume.generation,
            device_class: volume.device_class.clone(),
            created_at: unix_now(),
        };
        self.snapshots.put(&record)?;
        self.continue_cut(record)
    }

    /// The hidden cut a clone of a volume reads from. The caller holds the
    /// locks of the clone and the source volume.
    pub(super) fn ensure_hidden_cut(
        &self,
        clone: &VolumeId,
        source: &VolumeId,
        snapshot: &SnapshotId,
    ) -> DomainResult<()> {
        let _guard = self.locks.try_acquire([snapshot])?;
        let record = match self.snapshots.get(snapshot)? {
            Some(existing) if existing.state == SnapshotState::Ready => return Ok(()),
            Some(existing) => existing,
            None => {
                let volume = self.require_volume(source)?;
                self.check_cuttable(&volume)?;
                let record = SnapshotRecord {
                    id: snapshot.clone(),
                    name: format!("source of clone {clone}"),
                    source_volume: source.clone(),
                    size_bytes: volume.capacity_bytes,
                    access: volume.access,
                    state: SnapshotState::Creating,
                    method: None,
                    hidden: true,
                    deleted: false,
                    source_generation: volume.generation,
                    device_class: volume.device_class.clone(),
                    created_at: unix_now(),
                };
                self.snapshots.put(&record)?;
                record
            }
        };
        self.continue_cut(record).map(|_| ())
    }

    /// Runs the cut's remaining steps; safe to call again after a crash at
    /// any point.
    pub(super) fn continue_cut(
        &self,
        mut snapshot: SnapshotRecord,
    ) -> DomainResult<SnapshotRecord> {
        let volume = self.require_volume(&snapshot.source_volume)?;
        if snapshot.method != Some(CutMethod::Redirect) {
            self.check_cuttable(&volume)?;
            // A pool known not to reflink is not suspended just to find out.
            // The image lives in its volume's pool: the only place an
            // instant copy can share the volume's blocks.
            let pool = self.pool_of(&volume)?;
            if pool.instant_clone_supported()? {
                let image = Storage::Image(snapshot.id.clone());
                // A reflink interrupted by a crash may have left part of an image.
                pool.remove(&image)?;
                let cut = self.quiesce(&volume)?;
                if pool.clone_instant(&Self::data_of(&volume), &image)? {
                    cut.release()?;
                    snapshot.method = Some(CutMethod::Reflink);
                    snapshot.state = SnapshotState::Ready;
                    self.snapshots.put(&snapshot)?;
                    info!(snapshot = %snapshot.id, "snapshot cut by reflink");
                    return Ok(snapshot);
                }
                cut.release()?;
            }
            snapshot.method = Some(CutMethod::Redirect);
            snapshot.source_generation = volume.generation;
            self.snapshots.put(&snapshot)?;
        }
        self.redirect_cut(&snapshot, volume)?;
        snapshot.state = SnapshotState::Ready;
        self.snapshots.put(&snapshot)?;
        info!(snapshot = %snapshot.id, "snapshot cut by redirect; the volume hydrates into a new data file");
        Ok(snapshot)
    }

    fn redirect_cut(
        &self,
        snapshot: &SnapshotRecord,
        mut volume: VolumeRecord,
    ) -> DomainResult<()> {
        let image = Storage::Image(snapshot.id.clone());
        let old_data = Storage::Data {
            volume: volume.id.clone(),
            generation: snapshot.source_generation,
        };
        if volume.generation == snapshot.source_generation {
            // Record the new layout and make its storage before the cut, so
            // the suspended window holds only a rename and a table swap.
            let parameters = parse_parameters(&volume.parameters)
                .map_err(|e| DomainError::invalid_argument(e.to_string()))?;
            let hydration =
                self.plan_hydration(snapshot.id.clone(), volume.capacity_bytes, &parameters)?;
            let metadata_bytes = hydration.metadata_bytes;
            volume.generation = snapshot
                .source_generation
                .checked_add(1)
                .ok_or_else(|| DomainError::internal("volume generation overflow"))?;
            volume.hydration = Some(hydration);
            self.provision_clone_storage(&volume, metadata_bytes)?;
            volume = self.set_stage(volume, HydrationStage::MetadataBound)?;
            // The figures of the volume's own last hydration (if it was a
            // clone) would otherwise stand for this one until the monitor
            // reads it: a `Complete` for a copy that has not started.
            self.forget_progress(&volume.id);
        }
        let hydrating_from_this = volume
            .hydration
            .as_ref()
            .is_some_and(|h| h.source == snapshot.id);
        if !hydrating_from_this {
            return Err(DomainError::internal(format!(
                "snapshot {} was being cut by redirect but volume {} no longer refers to it",
                snapshot.id, volume.id
            )));
        }
        let pool = self.pool_of(&volume)?.clone();
        if !pool.exists(&image)? {
            // Everything the new table needs is attached before the suspend,
            // so the window holds only a rename and a table swap: the new
            // data file and metadata exist already, and the image's
            // read-only loop goes on the old data file now, because a loop
            // device follows its inode through the rename.
            pool.attach(&Self::data_of(&volume), false)?;
            pool.attach(&Storage::Metadata(volume.id.clone()), false)?;
            pool.attach(&old_data, true)?;
            let cut = self.quiesce(&volume)?;
            pool.rename(&old_data, &image)?;
            // Without a device (a reboot) there is no table to swap: the
            // device is made below from the record, already the clone's.
            let swapped = if cut.has_device() {
                self.expected_table(&volume)
                    .and_then(|table| Ok(self.os.dm.load(&dm_name(&volume.id), &table)?))
            } else {
                Ok(())
            };
            if let Err(load_error) = swapped {
                // Put the file back before anything can write through the
                // old table, which still maps it.
                if let Err(rename_error) = pool.rename(&image, &old_data) {
                    error!(volume = %volume.id, "cannot undo a failed redirect cut ({rename_error}); leaving the device suspended so nothing writes to the image");
                    std::mem::forget(cut);
                    return Err(load_error);
                }
                return Err(load_error);
            }
            cut.release()?;
        }
        pool.relabel(&image)?;
        if self.ensure_device(&volume)? == DeviceOutcome::AlreadySwitched {
            self.finish_switch(volume)?;
            return Ok(());
        }
        // The loop that mapped the old data file read-write is no longer in
        // any table; only the read-only one may stay on an image.
        for device in pool.attachments(&image)? {
            if !device.read_only {
                pool.release(&image, &device)?;
            }
        }
        // The volume stays `MetadataBound`, hydration off, reading what it
        // has not rewritten from the image: correct, and all the cut's
        // caller waits for. Trimming it (a walk of the whole file system)
        // and enabling its hydration are the monitor's, through
        // `start_hydration` (as for a new file-system clone), so the cost
        // of a cut does not grow with the volume's size.
        Ok(())
    }

    pub fn delete_snapshot(&self, id: &SnapshotId) -> DomainResult<()> {
        let span = info_span!("delete_snapshot", snapshot = %id);
        let _entered = span.enter();
        let _guard = self.locks.try_acquire([id])?;
        let Some(mut snapshot) = self.snapshots.get(id)? else {
            return Ok(());
        };
        if snapshot.hidden {
            return Ok(());
        }
        if snapshot.state == SnapshotState::Creating {
            // Finish the cut: a redirect half done must be completed, not
            // abandoned, or the volume would lose its data file.
            let _source_guard = self.locks.try_acquire([&snapshot.source_volume])?;
            match self.continue_cut(snapshot.clone()) {
                Ok(done) => snapshot = done,
                Err(e) if snapshot.method != Some(CutMethod::Redirect) => {
                    warn!("abandoning an unfinished cut: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        if self.has_dependents(id)? {
            snapshot.deleted = true;
            self.snapshots.put(&snapshot)?;
            info!(
                "snapshot deleted; its image is kept until the clones reading it finish hydrating"
            );
            return Ok(());
        }
        self.image_pool(&snapshot)?
            .remove(&Storage::Image(id.clone()))?;
        self.snapshots.remove(id)?;
        info!("snapshot deleted");
        Ok(())
    }

    fn idle_images_set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<SnapshotId>> {
        // Plain set updates cannot be left half done by a panic.
        self.idle_images
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn has_dependents(&self, id: &SnapshotId) -> DomainResult<bool> {
        Ok(self
            .volumes
            .list()?
            .iter()
            .any(|v| v.hydration.as_ref().is_some_and(|h| h.source == *id)))
    }

    /// Releases images nothing needs: removes deleted and hidden ones, and
    /// detaches the loop devices of kept ones. Errors are logged: this runs
    /// after the caller's work is done, and again on every monitor round,
    /// so a release that failed is retried within seconds.
    pub fn collect_images(&self) {
        let snapshots = match self.snapshots.list() {
            Ok(list) => list,
            Err(e) => {
                warn!("listing snapshots to release images: {e}");
                return;
            }
        };
        for snapshot in snapshots {
            let Ok(_guard) = self.locks.try_acquire_background([&snapshot.id]) else {
                continue;
            };
            if snapshot.state != SnapshotState::Ready {
                continue;
            }
            match self.has_dependents(&snapshot.id) {
                Ok(false) => {}
                Ok(true) => {
                    self.idle_images_set().remove(&snapshot.id);
                    continue;
                }
                Err(e) => {
                    warn!("checking the clones of {}: {e}", snapshot.id);
                    continue;
                }
            }
            let image = Storage::Image(snapshot.id.clone());
            let result = if snapshot.hidden || snapshot.deleted {
                self.image_pool(&snapshot)
                    .and_then(|pool| pool.remove(&image))
                    .and_then(|()| Ok(self.snapshots.remove(&snapshot.id)?))
                    .map(|()| info!(snapshot = %snapshot.id, "image released"))
            } else if self.idle_images_set().contains(&snapshot.id) {
                Ok(())
            } else {
                self.image_pool(&snapshot)
                    .and_then(|pool| pool.detach(&image))
                    .map(|()| {
                        self.idle_images_set().insert(snapshot.id.clone());
                    })
            };
            if let Err(e) = result {
                warn!(snapshot = %snapshot.id, "releasing the image: {e}");
            }
        }
    }
}
