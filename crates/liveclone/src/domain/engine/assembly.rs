//! Device tables from records, and bringing devices in line with them.

use std::path::PathBuf;

use tracing::{info, warn};

use super::{dm_name, Engine};
use crate::domain::error::{DomainError, DomainResult};
use crate::domain::model::{HydrationStage, VolumeRecord};
use crate::domain::pool::{BlockDevice, Storage};
use crate::os::dm::{
    CloneFeatures, CloneMessage, CloneTarget, DeviceRef, DmName, Sectors, SuspendFlush, Table,
    Target,
};

/// What [`Engine::ensure_device`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeviceOutcome {
    /// The device has the record's table (created, reloaded or already so).
    Assembled,
    /// The record says hydrating but the live table is already the linear
    /// replacement: a switch finished before the record was updated.
    AlreadySwitched,
}

pub(super) fn sectors(bytes: u64) -> DomainResult<Sectors> {
    Sectors::from_bytes(bytes).map_err(|e| DomainError::internal(e.to_string()))
}

fn device_ref(device: &BlockDevice) -> DomainResult<DeviceRef> {
    DeviceRef::number(device.major, device.minor).map_err(|e| DomainError::internal(e.to_string()))
}

/// Same devices, lengths, offsets and region size; the clone target's
/// features and tunables are ignored (they change with messages).
pub(super) fn same_layout(a: &Table, b: &Table) -> bool {
    a.lines().len() == b.lines().len()
        && a.lines().iter().zip(b.lines()).all(|(x, y)| {
            x.start == y.start
                && x.length == y.length
                && match (&x.target, &y.target) {
                    (Target::Linear(p), Target::Linear(q)) => p == q,
                    (Target::Clone(p), Target::Clone(q)) => {
                        p.metadata == q.metadata
                            && p.destination == q.destination
                            && p.source == q.source
                            && p.region_size == q.region_size
                    }
                    _ => false,
                }
        })
}

impl Engine {
    pub(super) fn data_of(record: &VolumeRecord) -> Storage {
        Storage::Data {
            volume: record.id.clone(),
            generation: record.generation,
        }
    }

    /// The table the record calls for, attaching pool storage as needed.
    pub(super) fn expected_table(&self, record: &VolumeRecord) -> DomainResult<Table> {
        let length = sectors(record.capacity_bytes)?;
        let pool = self.pool_of(record)?;
        let data = pool.attach(&Self::data_of(record), false)?;
        let Some(hydration) = &record.hydration else {
            return Table::linear(length, device_ref(&data)?)
                .map_err(|e| DomainError::internal(e.to_string()));
        };
        let metadata = pool.attach(&Storage::Metadata(record.id.clone()), false)?;
        let source = self
            .image_pool_by_id(&hydration.source)?
            .attach(&Storage::Image(hydration.source.clone()), true)?;
        let region_size = hydration.region_size().ok_or_else(|| {
            DomainError::internal(format!(
                "volume {}: recorded region size {} sectors is invalid",
                record.id, hydration.region_sectors
            ))
        })?;
        let clone = CloneTarget {
            metadata: device_ref(&metadata)?,
            destination: device_ref(&data)?,
            source: device_ref(&source)?,
            region_size,
            // Always loaded with hydration off: it is enabled by message
            // once the clone is trimmed, and only if not paused.
            features: CloneFeatures {
                no_hydration: true,
                no_discard_passdown: false,
            },
            core: hydration.tunables().core_args(),
        };
        Table::clone_with_tail(sectors(hydration.source_bytes)?, length, clone)
            .map_err(|e| DomainError::internal(e.to_string()))
    }

    /// Makes the volume's device match its record: creates it, reloads a
    /// different table, resumes it if a crash left it suspended, and for a
    /// clone re-applies tunables and the hydration switch (the kernel keeps
    /// neither across a load).
    pub(super) fn ensure_device(&self, record: &VolumeRecord) -> DomainResult<DeviceOutcome> {
        let name = dm_name(&record.id);
        let expected = self.expected_table(record)?;
        match self.os.dm.info(&name)? {
            None => {
                info!(volume = %record.id, "creating device {name}");
                self.os.dm.create(&name, &expected)?;
            }
            Some(device) => {
                let live = self.os.dm.table(&name)?;
                if !same_layout(&live, &expected) {
                    if record.hydration.is_some() && self.is_linear_replacement(&live, &expected) {
                        return Ok(DeviceOutcome::AlreadySwitched);
                    }
                    info!(volume = %record.id, "reloading device {name}: its table differs from the record");
                    self.os.dm.load(&name, &expected)?;
                    self.os.dm.resume(&name)?;
                } else if device.inactive_table {
                    // A crash between a load and its resume (a switch to
                    // linear, a cut) left a table nobody checked waiting: a
                    // plain resume would swap it in. Replace it first.
                    warn!(volume = %record.id, "device {name} has an unchecked inactive table; reloading the recorded one");
                    self.os.dm.load(&name, &expected)?;
                    self.os.dm.resume(&name)?;
                } else if device.suspended {
                    warn!(volume = %record.id, "device {name} was left suspended; resuming it");
                    self.os.dm.resume(&name)?;
                }
            }
        }
        self.apply_hydration_settings(record)?;
        Ok(DeviceOutcome::Assembled)
    }

    fn is_linear_replacement(&self, live: &Table, expected: &Table) -> bool {
        expected
            .linear_replacement()
            .map(|linear| same_layout(live, &linear))
            .unwrap_or(false)
    }

    /// Tunables, then enable or disable, per the record.
    pub(super) fn apply_hydration_settings(&self, record: &VolumeRecord) -> DomainResult<()> {
        let Some(hydration) = &record.hydration else {
            return Ok(());
        };
        let name = dm_name(&record.id);
        for message in hydration.tunables().messages() {
            self.os.dm.message(&name, &message)?;
        }
        let enable = !hydration.paused && hydration.stage >= HydrationStage::Trimmed;
        let switch = if enable {
            CloneMessage::EnableHydration
        } else {
            CloneMessage::DisableHydration
        };
        self.os.dm.message(&name, &switch)?;
        Ok(())
    }

    pub(super) fn device_path(record: &VolumeRecord) -> PathBuf {
        dm_name(&record.id).mapper_path()
    }

    /// Suspends a device for a cut and resumes it when dropped, so no
    /// error path leaves a volume frozen. The cut is consistent for a
    /// mounted file system, not only crash-consistent: a suspend without
    /// `--nolockfs` freezes the file system on the device itself (dm's
    /// `lock_fs`, through `freeze_bdev`) and resume thaws it.
    ///
    /// No FIFREEZE of our own before it: on 6.1 (the test VM's kernel; the
    /// nesting of user and kernel freezes came later) the suspend's
    /// `freeze_bdev` then finds the super block already frozen, fails with
    /// EBUSY (`freeze_super`), and every cut of a mounted volume fails.
    pub(super) fn quiesce(&self, record: &VolumeRecord) -> DomainResult<Quiesced<'_>> {
        let name = dm_name(&record.id);
        if self.os.dm.info(&name)?.is_none() {
            // Recovery after a reboot finishes cuts before it re-creates
            // devices: without its device nothing can write to the volume,
            // so it is as still as a suspended one. The caller loads no
            // table (`has_device`); re-assembly makes the device from the
            // record.
            return Ok(Quiesced {
                engine: self,
                name,
                suspended: false,
                device: false,
            });
        }
        self.os.dm.suspend(&name, SuspendFlush::Flush)?;
        Ok(Quiesced {
            engine: self,
            name,
            suspended: true,
            device: true,
        })
    }
}

/// A suspended volume; resumed (which also thaws its file system) once.
pub(super) struct Quiesced<'a> {
    engine: &'a Engine,
    name: DmName,
    suspended: bool,
    /// Whether the volume had a device to suspend (see `quiesce`).
    device: bool,
}

impl Quiesced<'_> {
    /// Whether the volume has a device whose table the cut may replace.
    pub(super) fn has_device(&self) -> bool {
        self.device
    }

    /// Resumes now, reporting errors (drop only logs them).
    pub(super) fn release(mut self) -> DomainResult<()> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> DomainResult<()> {
        if self.suspended {
            self.engine.os.dm.resume(&self.name)?;
            self.suspended = false;
        }
        Ok(())
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.release_inner() {
            warn!("releasing the cut of {}: {error}", self.name);
        }
    }
}
