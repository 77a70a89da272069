//! [`CachingLvm`]: one LV report per volume group serves the LV lookups
//! that follow it closely.
//!
//! A clone's CreateVolume asks about a handful of LVs one at a time
//! (exists, attach, capacity...), and each question is an `lvm lvs`
//! process: 20-50 ms on hardware, 100-1000 ms in the emulated test VM, and
//! the lookups dominated an LVM clone's setup (docs/BENCHMARKS.md, LVM
//! figure 1). The whole VG's LV report costs about the same as one LV's,
//! so this keeps the last one for a short while.
//!
//! What may be stale, and why that is safe: every change made through
//! this handle empties the VG's entry, before and after the command, and a
//! report that was running while a change happened is not kept (a
//! generation counter), so the driver always sees its own changes. Only
//! changes made by others during [`FRESH_FOR`] can be missed; the pool
//! only uses LVs it made (names from IDs, class tags), and a lookup that is
//! wrong about one of them fails the next LVM or device-mapper call (the
//! name exists, the device node is gone) rather than touching data. Thin
//! pool and volume group figures are never cached.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{LogicalVolume, Lvm, LvmResult, ThinPool, VolumeGroup};

/// How long a VG's LV report answers lookups.
pub const FRESH_FOR: Duration = Duration::from_secs(2);

#[derive(Default)]
struct VgEntry {
    /// Bumped by every change; a report is kept only if it did not move
    /// while the report ran.
    generation: u64,
    report: Option<(Instant, Arc<Vec<LogicalVolume>>)>,
}

/// An [`Lvm`] that answers LV lookups from a recent report of the VG.
pub struct CachingLvm {
    inner: Arc<dyn Lvm>,
    fresh_for: Duration,
    groups: Mutex<HashMap<String, VgEntry>>,
}

impl CachingLvm {
    pub fn new(inner: Arc<dyn Lvm>) -> Self {
        Self::with_freshness(inner, FRESH_FOR)
    }

    pub fn with_freshness(inner: Arc<dyn Lvm>, fresh_for: Duration) -> Self {
        Self {
            inner,
            fresh_for,
            groups: Mutex::new(HashMap::new()),
        }
    }

    fn groups(&self) -> MutexGuard<'_, HashMap<String, VgEntry>> {
        // Map updates cannot be left half done by a panic.
        self.groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every LV of `vg`, from a fresh enough report or a new one.
    fn all(&self, vg: &str) -> LvmResult<Arc<Vec<LogicalVolume>>> {
        let generation = {
            let mut groups = self.groups();
            let entry = groups.entry(vg.to_owned()).or_default();
            if let Some((at, report)) = &entry.report {
                if at.elapsed() < self.fresh_for {
                    return Ok(Arc::clone(report));
                }
            }
            entry.generation
        };
        let started = Instant::now();
        let report = Arc::new(self.inner.logical_volumes(vg, None)?);
        let mut groups = self.groups();
        let entry = groups.entry(vg.to_owned()).or_default();
        if entry.generation == generation {
            entry.report = Some((started, Arc::clone(&report)));
        }
        Ok(report)
    }

    /// Runs a change, forgetting the VG's report before and after it.
    fn change<T>(&self, vg: &str, work: impl FnOnce() -> LvmResult<T>) -> LvmResult<T> {
        self.forget(vg);
        let result = work();
        self.forget(vg);
        result
    }

    fn forget(&self, vg: &str) {
        let mut groups = self.groups();
        let entry = groups.entry(vg.to_owned()).or_default();
        entry.generation = entry.generation.wrapping_add(1);
        entry.report = None;
    }
}

impl Lvm for CachingLvm {
    fn logical_volumes(&self, vg: &str, tag: Option<&str>) -> LvmResult<Vec<LogicalVolume>> {
        Ok(self
            .all(vg)?
            .iter()
            .filter(|lv| tag.is_none_or(|tag| lv.has_tag(tag)))
            .cloned()
            .collect())
    }

    fn logical_volume(&self, vg: &str, lv: &str) -> LvmResult<Option<LogicalVolume>> {
        Ok(self.all(vg)?.iter().find(|found| found.name == lv).cloned())
    }

    fn volume_group(&self, vg: &str) -> LvmResult<VolumeGroup> {
        self.inner.volume_group(vg)
    }

    fn thin_pool(&self, vg: &str, pool: &str) -> LvmResult<ThinPool> {
        self.inner.thin_pool(vg, pool)
    }

    fn create_linear(&self, vg: &str, lv: &str, bytes: u64, tags: &[String]) -> LvmResult<()> {
        self.change(vg, || self.inner.create_linear(vg, lv, bytes, tags))
    }

    fn create_thin(
        &self,
        vg: &str,
        pool: &str,
        lv: &str,
        bytes: u64,
        tags: &[String],
    ) -> LvmResult<()> {
        self.change(vg, || self.inner.create_thin(vg, pool, lv, bytes, tags))
    }

    fn create_thin_snapshot(
        &self,
        vg: &str,
        origin: &str,
        lv: &str,
        tags: &[String],
    ) -> LvmResult<()> {
        self.change(vg, || self.inner.create_thin_snapshot(vg, origin, lv, tags))
    }

    fn rename(&self, vg: &str, from: &str, to: &str) -> LvmResult<()> {
        self.change(vg, || self.inner.rename(vg, from, to))
    }

    fn extend(&self, vg: &str, lv: &str, bytes: u64) -> LvmResult<()> {
        self.change(vg, || self.inner.extend(vg, lv, bytes))
    }

    fn remove(&self, vg: &str, lv: &str) -> LvmResult<()> {
        self.change(vg, || self.inner.remove(vg, lv))
    }

    fn activate(&self, vg: &str, lv: &str) -> LvmResult<()> {
        self.change(vg, || self.inner.activate(vg, lv))
    }

    fn deactivate(&self, vg: &str, lv: &str) -> LvmResult<()> {
        self.change(vg, || self.inner.deactivate(vg, lv))
    }

    fn change_tags(&self, vg: &str, lv: &str, add: &[String], remove: &[String]) -> LvmResult<()> {
        self.change(vg, || self.inner.change_tags(vg, lv, add, remove))
    }

    fn zero_device(&self, device: &Path) -> LvmResult<u64> {
        self.inner.zero_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::lvm::fake::FakeLvm;

    const MIB: u64 = 1 << 20;

    #[test]
    fn lookups_share_one_report_and_changes_are_seen_at_once() {
        let fake = Arc::new(FakeLvm::new());
        fake.add_volume_group("vg0", 64 * MIB * 64, 4 * MIB);
        let lvm = CachingLvm::with_freshness(fake.clone(), Duration::from_secs(3600));
        lvm.create_linear("vg0", "a", 8 * MIB, &["t".to_owned()])
            .expect("created");
        let before = fake.calls().len();
        assert!(lvm.logical_volume("vg0", "a").expect("reads").is_some());
        assert!(lvm.logical_volume("vg0", "b").expect("reads").is_none());
        assert_eq!(
            lvm.logical_volumes("vg0", Some("t")).expect("reads").len(),
            1
        );
        assert_eq!(
            fake.calls().len(),
            before + 1,
            "three lookups, one report: {:?}",
            &fake.calls()[before..]
        );
        lvm.create_linear("vg0", "b", 8 * MIB, &[])
            .expect("created");
        assert!(
            lvm.logical_volume("vg0", "b").expect("reads").is_some(),
            "our own change is never hidden by the cache"
        );
        lvm.remove("vg0", "a").expect("removed");
        assert!(lvm.logical_volume("vg0", "a").expect("reads").is_none());
    }

    #[test]
    fn reports_expire() {
        let fake = Arc::new(FakeLvm::new());
        fake.add_volume_group("vg0", 64 * MIB * 64, 4 * MIB);
        let lvm = CachingLvm::with_freshness(fake.clone(), Duration::ZERO);
        let before = fake.calls().len();
        lvm.logical_volume("vg0", "a").expect("reads");
        lvm.logical_volume("vg0", "a").expect("reads");
        assert_eq!(fake.calls().len(), before + 2);
    }
}
