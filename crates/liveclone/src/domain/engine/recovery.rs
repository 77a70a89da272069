//! Start-up: bring every device back in line with the records.
//!
//! Runs before the driver serves requests. Order matters: unfinished cuts
//! first (a redirect cut may be between its rename and its table swap),
//! then unfinished creations and deletions, then every ready volume's
//! device; finally anything of ours that no record explains is released.

use std::collections::BTreeSet;

use tracing::{error, info, warn};

use super::{dm_name, Engine};
use crate::domain::error::DomainResult;
use crate::domain::model::{SnapshotState, VolumeState};
use crate::domain::pool::Storage;
use crate::os::dm::DmName;

/// What recovery did, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub volumes_assembled: usize,
    pub cuts_finished: usize,
    pub creations_finished: usize,
    pub deletions_finished: usize,
    pub stray_devices_removed: Vec<String>,
    pub stray_loops_detached: usize,
    /// Per-object failures; the objects stay as they were.
    pub failures: Vec<String>,
}

impl Engine {
    pub fn recover(&self) -> DomainResult<RecoveryReport> {
        let mut report = RecoveryReport::default();
        for snapshot in self.snapshots.list()? {
            if snapshot.state == SnapshotState::Creating {
                let keys = [snapshot.id.to_string(), snapshot.source_volume.to_string()];
                let result = self
                    .locks
                    .try_acquire(keys)
                    .and_then(|_guard| self.continue_cut(snapshot.clone()));
                match result {
                    Ok(_) => report.cuts_finished += 1,
                    Err(e) => report
                        .failures
                        .push(format!("snapshot {}: {e}", snapshot.id)),
                }
            }
        }
        for volume in self.volumes.list()? {
            let id = volume.id.clone();
            let result = match volume.state {
                VolumeState::Deleting => self.delete_volume(&id).map(|()| {
                    report.deletions_finished += 1;
                }),
                VolumeState::Creating => {
                    let mut keys = vec![id.to_string()];
                    if let Some(crate::domain::model::ContentSource::Volume(source)) =
                        &volume.content_source
                    {
                        keys.push(source.to_string());
                    }
                    self.locks
                        .try_acquire(keys)
                        .and_then(|_guard| self.continue_create(volume))
                        .map(|_| report.creations_finished += 1)
                }
                VolumeState::Ready => self
                    .locks
                    .try_acquire([&id])
                    .and_then(|_guard| self.reassemble(volume))
                    .map(|()| report.volumes_assembled += 1),
            };
            if let Err(e) = result {
                error!(volume = %id, "recovery: {e}");
                report.failures.push(format!("volume {id}: {e}"));
            }
        }
        self.release_strays(&mut report);
        self.collect_images();
        info!(?report, "recovery finished");
        Ok(report)
    }

    fn reassemble(&self, volume: crate::domain::model::VolumeRecord) -> DomainResult<()> {
        if self.ensure_device(&volume)? == super::assembly::DeviceOutcome::AlreadySwitched {
            let switched = self.finish_switch(volume)?;
            self.ensure_device(&switched)?;
            return Ok(());
        }
        // Metadata only matters while hydrating; a crash right after a
        // switch was recorded can leave the file behind.
        if volume.hydration.is_none() {
            self.pool_of(&volume)?
                .remove(&Storage::Metadata(volume.id.clone()))?;
        }
        // A crash during a cut can leave a mounted file system frozen.
        if let Some(info) = self.os.dm.info(&dm_name(&volume.id))? {
            for mount in self.os.fs.mounts_of(info.major, info.minor)? {
                let _ = self.os.fs.thaw(&mount.mount_point);
            }
        }
        Ok(())
    }

    /// Removes our devices without a record and detaches loop devices on
    /// pool storage that no device uses. Files are never removed here.
    fn release_strays(&self, report: &mut RecoveryReport) {
        let known: BTreeSet<DmName> = match self.volumes.list() {
            Ok(volumes) => volumes.iter().map(|v| dm_name(&v.id)).collect(),
            Err(e) => {
                report.failures.push(format!("listing volumes: {e}"));
                return;
            }
        };
        match self.os.dm.list() {
            Ok(devices) => {
                for name in devices.into_iter().filter(|n| !known.contains(n)) {
                    match self.os.dm.remove(&name) {
                        Ok(()) => report.stray_devices_removed.push(name.to_string()),
                        Err(e) => report.failures.push(format!("stray device {name}: {e}")),
                    }
                }
            }
            Err(e) => report.failures.push(format!("listing devices: {e}")),
        }
        let in_use = self.devices_in_tables();
        for (class, pool) in self.classes.iter() {
            let items = match pool.list() {
                Ok(items) => items,
                Err(e) => {
                    report
                        .failures
                        .push(format!("listing device class {class}: {e}"));
                    continue;
                }
            };
            for item in items {
                let Ok(attachments) = pool.attachments(&item) else {
                    continue;
                };
                for device in attachments {
                    if in_use.contains(&(device.major, device.minor)) {
                        continue;
                    }
                    if matches!(item, Storage::Image(_)) && device.read_only {
                        // Kept for clones; collect_images decides.
                        continue;
                    }
                    match pool.release(&item, &device) {
                        Ok(()) => report.stray_loops_detached += 1,
                        Err(e) => warn!("detaching {}: {e}", device.path.display()),
                    }
                }
            }
        }
    }

    /// `(major, minor)` of every device named in one of our tables.
    fn devices_in_tables(&self) -> BTreeSet<(u32, u32)> {
        let mut used = BTreeSet::new();
        let Ok(names) = self.os.dm.list() else {
            return used;
        };
        for name in names {
            let Ok(table) = self.os.dm.table(&name) else {
                continue;
            };
            for line in table.lines() {
                let devices = match &line.target {
                    crate::os::dm::Target::Linear(linear) => vec![linear.device.clone()],
                    crate::os::dm::Target::Clone(clone) => vec![
                        clone.metadata.clone(),
                        clone.destination.clone(),
                        clone.source.clone(),
                    ],
                };
                for device in devices {
                    if let crate::os::dm::DeviceRef::Number { major, minor } = device {
                        used.insert((major, minor));
                    }
                }
            }
        }
        used
    }
}
