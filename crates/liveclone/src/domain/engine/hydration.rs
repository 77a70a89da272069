//! Hydration's start (the trim and the enable that new file-system clones
//! and redirected volumes wait for), its control (pause, resume, tune),
//! samples for the monitor, and the switch to a linear table when a clone
//! is complete.

use tracing::{info, info_span, warn};

use super::assembly::DeviceOutcome;
use super::{dm_name, Engine};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::ids::VolumeId;
use crate::domain::model::{
    unix_now, CompletedHydration, HydrationStage, SnapshotState, VolumeRecord, VolumeState,
};
use crate::domain::pool::Storage;
use crate::domain::sizing::HydrationTunables;
use crate::os::dm::{CloneMessage, CloneStatus, CloneStatusLine, SuspendFlush};

/// One reading of a hydrating clone.
#[derive(Debug, Clone)]
pub struct HydrationSample {
    pub status: CloneStatusLine,
    /// The device's event counter when read, for waiting on the next event.
    pub event_nr: u32,
    pub paused: bool,
}

impl Engine {
    /// Volumes that are clones still hydrating, as `(id, paused)`.
    pub fn hydrating_volumes(&self) -> DomainResult<Vec<(VolumeId, bool)>> {
        Ok(self
            .volumes
            .list()?
            .into_iter()
            .filter(|v| v.state == VolumeState::Ready)
            .filter_map(|v| v.hydration.map(|h| (v.id, h)))
            // Before `Enabled` the table may not be a clone yet (a cut in
            // progress): not the monitor's business.
            .filter(|(_, h)| h.stage == HydrationStage::Enabled)
            .map(|(id, h)| (id, h.paused))
            .collect())
    }

    /// Volumes whose copy waits for the monitor to start it (see
    /// [`Engine::start_hydration`]).
    pub fn awaiting_hydration_start(&self) -> DomainResult<Vec<VolumeId>> {
        let mut waiting = Vec::new();
        for volume in self.volumes.list()? {
            if self.awaits_hydration_start(&volume)? {
                waiting.push(volume.id);
            }
        }
        Ok(waiting)
    }

    /// Whether the volume is ready, its copy not yet enabled, and its image
    /// cut: a new file-system clone (CreateVolume left its trim to the
    /// monitor) or a volume a redirect cut left reading from its image.
    fn awaits_hydration_start(&self, volume: &VolumeRecord) -> DomainResult<bool> {
        let Some(hydration) = &volume.hydration else {
            return Ok(false);
        };
        if volume.state != VolumeState::Ready || hydration.stage >= HydrationStage::Enabled {
            return Ok(false);
        }
        // A cut that failed or is still running leaves its volume in the
        // same stage before the swap; only a finished cut has its image.
        Ok(self
            .snapshots
            .get(&hydration.source)?
            .is_some_and(|s| s.state == SnapshotState::Ready))
    }

    /// Trims a volume that awaits its copy (through its mount, or a private
    /// mount when it has none) and enables its hydration. For a new
    /// file-system clone this is the trim CreateVolume left out; for a
    /// volume redirected by a cut, the start of its copy-back.
    ///
    /// Background work, under the volume's guard: ABORTED at once while a
    /// CO call holds the volume (the monitor tries again next round), and a
    /// NodeStage, NodeUnstage or DeleteVolume that comes meanwhile waits
    /// for it, so the mount it trims through cannot come or go under it.
    ///
    /// Crash-safe: the trim only discards what the file system calls free
    /// (so repeating it is harmless), `Trimmed` is recorded before the
    /// enable, and a volume at `Trimmed` is enabled again by any table load
    /// (`apply_hydration_settings`) and by the next call here. The holes of
    /// the source were skipped in CreateVolume, before anything could
    /// write to the clone; nothing here discards anything but free space.
    pub fn start_hydration(&self, id: &VolumeId) -> DomainResult<()> {
        let span = info_span!("start_hydration", volume = %id);
        let _entered = span.enter();
        let _guard = self.locks.try_acquire_background([id])?;
        let Some(mut volume) = self.volumes.get(id)? else {
            return Ok(());
        };
        if !self.awaits_hydration_start(&volume)? {
            return Ok(());
        }
        if volume
            .hydration
            .as_ref()
            .is_some_and(|h| h.stage < HydrationStage::Trimmed)
        {
            self.trim_volume(&volume)?;
            volume = self.set_stage(volume, HydrationStage::Trimmed)?;
        }
        self.apply_hydration_settings(&volume)?;
        self.set_stage(volume, HydrationStage::Enabled)?;
        info!("hydration started");
        Ok(())
    }

    /// Discards a file-system volume's free space through its clone
    /// target, so background hydration skips it: through its mount if it
    /// is mounted, else through a private one (a block volume: nothing).
    /// The trim itself is best effort (without it hydration only copies
    /// more), but a private mount must not outlive the call: one left by a
    /// crash is removed first, and an error when one is still there makes
    /// the caller try again rather than record the trim. The caller holds
    /// the volume's guard.
    fn trim_volume(&self, volume: &VolumeRecord) -> DomainResult<()> {
        if volume.access.fs().is_none() {
            return Ok(());
        }
        let private = self.private_trim_path(&volume.id);
        // The mount table names mount points by their resolved path.
        let private = std::fs::canonicalize(&private).unwrap_or(private);
        let name = dm_name(&volume.id);
        let mounts = match self.os.dm.info(&name)? {
            Some(info) => self.os.fs.mounts_of(info.major, info.minor)?,
            None => Vec::new(),
        };
        if mounts.iter().any(|m| m.mount_point == private) {
            warn!(volume = %volume.id, "removing a private trim mount left by an interrupted trim");
            self.os.fs.unmount(&private)?;
        }
        let trimmed = match mounts.iter().find(|m| m.mount_point != private) {
            Some(mount) => self
                .os
                .fs
                .trim(&mount.mount_point)
                .map(|bytes| {
                    info!(volume = %volume.id, trimmed_bytes = bytes, mount = %mount.mount_point.display(), "free space discarded through the volume's mount before hydration");
                })
                .map_err(DomainError::from),
            None => self.trim_privately(volume).map(drop),
        };
        if let Err(e) = trimmed {
            if self.os.fs.mount_at(&private)?.is_some() {
                return Err(DomainError::internal(format!(
                    "the private trim mount {} of volume {} is still there after: {e}",
                    private.display(),
                    volume.id
                )));
            }
            warn!(volume = %volume.id, "trimming before hydration: {e}");
        }
        Ok(())
    }

    /// Reads a clone's status without flushing. `None` if the volume is no
    /// longer hydrating.
    pub fn sample_hydration(&self, id: &VolumeId) -> DomainResult<Option<HydrationSample>> {
        let Some(record) = self.volumes.get(id)? else {
            return Ok(None);
        };
        let Some(hydration) = &record.hydration else {
            return Ok(None);
        };
        let name = dm_name(id);
        let Some(info) = self.os.dm.info(&name)? else {
            return Err(DomainError::internal(format!("device {name} is missing")));
        };
        let status = match self.os.dm.clone_status(&name) {
            Ok(status) => status,
            Err(error) => {
                // The monitor samples before it switches: a switch whose
                // record update failed must be finished from here too.
                let finished = self
                    .locks
                    .try_acquire_background([id])
                    .and_then(|_guard| self.finish_interrupted_switch(id));
                if let Ok(true) = finished {
                    return Ok(None);
                }
                return Err(error.into());
            }
        };
        Ok(Some(HydrationSample {
            status,
            event_nr: info.event_nr,
            paused: hydration.paused,
        }))
    }

    fn hydrating_record(&self, id: &VolumeId) -> DomainResult<VolumeRecord> {
        let record = self.require_volume(id)?;
        if record.hydration.is_none() {
            return Err(DomainError::failed_precondition(format!(
                "volume {id} is not hydrating (it is an independent volume)"
            )));
        }
        Ok(record)
    }

    pub fn pause_hydration(&self, id: &VolumeId) -> DomainResult<()> {
        self.set_paused(id, true)
    }

    pub fn resume_hydration(&self, id: &VolumeId) -> DomainResult<()> {
        self.set_paused(id, false)
    }

    fn set_paused(&self, id: &VolumeId, paused: bool) -> DomainResult<()> {
        let _guard = self.locks.try_acquire([id])?;
        let mut record = self.hydrating_record(id)?;
        if let Some(hydration) = record.hydration.as_mut() {
            hydration.paused = paused;
        }
        // Recorded first: a restart must not undo a pause.
        self.volumes.put(&record)?;
        self.apply_hydration_settings(&record)?;
        info!(volume = %id, paused, "hydration {}", if paused { "paused" } else { "resumed" });
        Ok(())
    }

    /// Changes the tunables of a hydrating clone (either may be omitted).
    pub fn tune_hydration(
        &self,
        id: &VolumeId,
        threshold: Option<u32>,
        batch_size: Option<u32>,
    ) -> DomainResult<HydrationTunables> {
        let _guard = self.locks.try_acquire([id])?;
        let mut record = self.hydrating_record(id)?;
        let Some(hydration) = record.hydration.as_mut() else {
            return Err(DomainError::internal("hydration vanished"));
        };
        let region_size = hydration
            .region_size()
            .ok_or_else(|| DomainError::internal("recorded region size is invalid"))?;
        let tunables = HydrationTunables {
            threshold: threshold.unwrap_or(hydration.threshold),
            batch_size: batch_size.unwrap_or(hydration.batch_size),
        };
        tunables
            .validate(region_size)
            .map_err(|e| DomainError::invalid_argument(e.to_string()))?;
        hydration.threshold = tunables.threshold;
        hydration.batch_size = tunables.batch_size;
        self.volumes.put(&record)?;
        self.apply_hydration_settings(&record)?;
        info!(volume = %id, threshold = tunables.threshold, batch_size = tunables.batch_size, "hydration tuned");
        Ok(tunables)
    }

    /// Switches a fully hydrated clone to a linear table and releases its
    /// metadata and source. Returns `Ok(false)` if it is not complete yet,
    /// ABORTED if another operation holds the volume (the monitor retries).
    pub fn complete_hydration(&self, id: &VolumeId) -> DomainResult<bool> {
        let span = info_span!("switch_to_linear", volume = %id);
        let _entered = span.enter();
        let _guard = self.locks.try_acquire_background([id])?;
        let Some(record) = self.volumes.get(id)? else {
            return Ok(true);
        };
        if record.hydration.is_none() {
            return Ok(true);
        }
        if self.finish_interrupted_switch(id)? {
            return Ok(true);
        }
        let name = dm_name(id);
        let complete = |engine: &Self| -> DomainResult<bool> {
            Ok(match engine.os.dm.clone_status(&name)?.status {
                CloneStatus::Active(report) => report.may_switch_to_linear(),
                CloneStatus::Fail | CloneStatus::Error => false,
            })
        };
        if !complete(self)? {
            return Ok(false);
        }
        // A flush through dm-clone commits its metadata and flushes the
        // destination; then the destination's own device once more, so
        // everything the clone acknowledged is on stable storage before
        // the table that knows where it came from goes away.
        let device = Self::device_path(&record);
        self.os.fs.flush(&device)?;
        for attached in self
            .pool_of(&record)?
            .attachments(&Self::data_of(&record))?
        {
            self.os.fs.flush(&attached.path)?;
        }
        if !complete(self)? {
            return Ok(false);
        }
        let linear = self
            .os
            .dm
            .table(&name)?
            .linear_replacement()
            .map_err(|e| DomainError::internal(format!("building the linear table: {e}")))?;
        // The linear table waits in the inactive slot before the suspend,
        // so I/O is held only from the suspend to the resume (two ioctls),
        // not across the table's construction. A crash in between leaves
        // an unchecked inactive table, which recovery replaces with the
        // recorded clone table before anything resumes it.
        self.os.dm.load(&name, &linear)?;
        if let Err(suspend_error) = self.os.dm.suspend(&name, SuspendFlush::FlushKeepFs) {
            if let Err(e) = self.os.dm.clear_inactive(&name) {
                warn!(volume = %id, "dropping the linear table after a failed suspend: {e}");
            }
            return Err(suspend_error.into());
        }
        self.os.dm.resume(&name)?;
        info!("switched to a linear table; the clone is independent of its source");
        self.finish_switch(record)?;
        Ok(true)
    }

    /// A switch whose record update failed leaves the device linear while
    /// the record still says hydrating (until a restart's recovery sees it).
    /// Finishes such a switch; `true` if there was one. The caller holds
    /// the volume's lock.
    fn finish_interrupted_switch(&self, id: &VolumeId) -> DomainResult<bool> {
        let Some(record) = self.volumes.get(id)?.filter(|r| r.hydration.is_some()) else {
            return Ok(false);
        };
        if self.os.dm.table(&dm_name(id))?.clone_target().is_some() {
            return Ok(false);
        }
        if self.ensure_device(&record)? != DeviceOutcome::AlreadySwitched {
            return Ok(false);
        }
        warn!(volume = %id, "the device was switched to linear but not recorded; finishing the switch");
        self.finish_switch(record)?;
        Ok(true)
    }

    /// Records a completed switch and releases what the clone held.
    pub(super) fn finish_switch(&self, mut record: VolumeRecord) -> DomainResult<VolumeRecord> {
        let Some(hydration) = record.hydration.take() else {
            return Ok(record);
        };
        record.last_hydration = Some(CompletedHydration {
            source: hydration.source.clone(),
            bytes: hydration.source_bytes,
            started_at: hydration.started_at,
            completed_at: unix_now(),
        });
        self.volumes.put(&record)?;
        if let Err(e) = self
            .pool_of(&record)
            .and_then(|pool| pool.remove(&Storage::Metadata(record.id.clone())))
        {
            warn!(volume = %record.id, "removing the clone's metadata: {e}");
        }
        self.collect_images();
        Ok(record)
    }

    /// Sends one message to a clone (used by tests and the admin API).
    pub fn message_clone(&self, id: &VolumeId, message: &CloneMessage) -> DomainResult<()> {
        Ok(self.os.dm.message(&dm_name(id), message)?)
    }
}
