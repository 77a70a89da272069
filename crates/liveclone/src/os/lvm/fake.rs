//! An in-memory [`Lvm`] for unit tests on hosts without device-mapper.
//!
//! It keeps the LVM rules the pool relies on: names unique per VG, sizes a
//! multiple of 512 rounded up to whole extents, linear LVs taking free
//! extents (else "insufficient free space"), thin LVs and snapshots taking
//! none, an open LV refusing deactivation and removal, a thin pool with
//! thin LVs refusing removal. Its error texts are LVM's, so the kinds come
//! from the same [`classify`](super::classify). Tests set pool fill and
//! open flags, inject failures and read what was zeroed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::{
    classify, LogicalVolume, LvType, Lvm, LvmError, LvmErrorKind, LvmResult, ThinPool, VolumeGroup,
};

/// The device-mapper major the fake hands out.
pub const FAKE_MAJOR: u32 = 253;

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Linear,
    ThinPool {
        data_used: f64,
        metadata_used: f64,
        zero: bool,
    },
    Thin {
        pool: String,
        origin: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct FakeLv {
    uuid: String,
    size: u64,
    tags: Vec<String>,
    kind: Kind,
    minor: Option<u32>,
    open: bool,
    /// Whether [`Lvm::zero_device`] wrote all of it since it was made.
    zeroed: bool,
}

#[derive(Debug, Clone)]
struct FakeVg {
    extent: u64,
    extents: u64,
    lvs: BTreeMap<String, FakeLv>,
}

impl FakeVg {
    /// Extents that linear LVs and thin pools take (thin LVs take none).
    fn used_extents(&self) -> u64 {
        self.lvs
            .values()
            .filter(|lv| !matches!(lv.kind, Kind::Thin { .. }))
            .map(|lv| lv.size / self.extent)
            .sum()
    }

    fn free_extents(&self) -> u64 {
        self.extents.saturating_sub(self.used_extents())
    }
}

#[derive(Debug, Default)]
struct State {
    vgs: BTreeMap<String, FakeVg>,
    next_minor: u32,
    next_uuid: u64,
    /// Every call, e.g. `lvcreate vg0/x 4194304`, in order.
    calls: Vec<String>,
    /// (call prefix, kind): the next call starting with the prefix fails.
    failures: Vec<(String, LvmErrorKind)>,
}

/// The in-memory LVM.
#[derive(Debug, Default)]
pub struct FakeLvm {
    state: Mutex<State>,
}

fn error(operation: &str, message: String) -> LvmError {
    LvmError::new(classify(&message), operation, message)
}

/// The `/dev/mapper` name LVM gives `vg/lv`: dashes doubled in both.
pub fn dm_path(vg: &str, lv: &str) -> PathBuf {
    PathBuf::from(format!(
        "/dev/mapper/{}-{}",
        vg.replace('-', "--"),
        lv.replace('-', "--")
    ))
}

impl FakeLvm {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves the state as
        // it was; the next test (or assertion) may still read it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A VG of `bytes` (whole extents of `extent_bytes`).
    pub fn add_volume_group(&self, name: &str, bytes: u64, extent_bytes: u64) {
        let mut state = self.state();
        state.vgs.insert(
            name.to_owned(),
            FakeVg {
                extent: extent_bytes,
                extents: bytes / extent_bytes,
                lvs: BTreeMap::new(),
            },
        );
    }

    /// A thin pool of `bytes` taking VG extents, active, empty.
    pub fn add_thin_pool(&self, vg: &str, name: &str, bytes: u64, zero: bool) {
        let mut state = self.state();
        let minor = Self::minor(&mut state);
        let uuid = Self::uuid(&mut state);
        if let Some(group) = state.vgs.get_mut(vg) {
            let size = bytes.div_ceil(group.extent) * group.extent;
            group.lvs.insert(
                name.to_owned(),
                FakeLv {
                    uuid,
                    size,
                    tags: Vec::new(),
                    kind: Kind::ThinPool {
                        data_used: 0.0,
                        metadata_used: 0.0,
                        zero,
                    },
                    minor: Some(minor),
                    open: true,
                    zeroed: false,
                },
            );
        }
    }

    /// Sets a thin pool's fill (fractions).
    pub fn set_pool_usage(&self, vg: &str, pool: &str, data: f64, metadata: f64) {
        let mut state = self.state();
        if let Some(lv) = state.vgs.get_mut(vg).and_then(|g| g.lvs.get_mut(pool)) {
            if let Kind::ThinPool {
                data_used,
                metadata_used,
                ..
            } = &mut lv.kind
            {
                *data_used = data;
                *metadata_used = metadata;
            }
        }
    }

    /// Marks an LV open (a table or mount holds it) or closed.
    pub fn set_open(&self, vg: &str, lv: &str, open: bool) {
        if let Some(found) = self.state().vgs.get_mut(vg).and_then(|g| g.lvs.get_mut(lv)) {
            found.open = open;
        }
    }

    /// A linear LV with any name and tags, as another tool would make it.
    pub fn add_foreign_linear(&self, vg: &str, name: &str, bytes: u64, tags: &[&str]) {
        let tags: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
        let _ = self.create_linear(vg, name, bytes, &tags);
    }

    /// Whether the LV's whole device was zeroed since it was created.
    pub fn is_zeroed(&self, vg: &str, lv: &str) -> bool {
        self.state()
            .vgs
            .get(vg)
            .and_then(|g| g.lvs.get(lv))
            .is_some_and(|found| found.zeroed)
    }

    /// The next call whose log line starts with `prefix` (e.g.
    /// `"lvcreate"`, `"zero"`) fails with an LVM message of that kind.
    pub fn fail_next(&self, prefix: &str, kind: LvmErrorKind) {
        self.state().failures.push((prefix.to_owned(), kind));
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn minor(state: &mut State) -> u32 {
        state.next_minor += 1;
        state.next_minor
    }

    fn uuid(state: &mut State) -> String {
        state.next_uuid += 1;
        format!("fake-uuid-{}", state.next_uuid)
    }

    /// Logs the call and fails it when a failure was injected for it.
    fn enter(state: &mut State, call: String) -> LvmResult<()> {
        let injected = state
            .failures
            .iter()
            .position(|(prefix, _)| call.starts_with(prefix.as_str()));
        state.calls.push(call.clone());
        if let Some(index) = injected {
            let (_, kind) = state.failures.remove(index);
            return Err(LvmError::new(kind, call, "injected failure"));
        }
        Ok(())
    }

    fn group<'a>(state: &'a mut State, vg: &str, operation: &str) -> LvmResult<&'a mut FakeVg> {
        state
            .vgs
            .get_mut(vg)
            .ok_or_else(|| error(operation, format!("Volume group \"{vg}\" not found")))
    }

    fn report(vg: &str, name: &str, lv: &FakeLv) -> LogicalVolume {
        let (lv_type, pool, origin, data_used, metadata_used) = match &lv.kind {
            Kind::Linear => (LvType::Plain, None, None, None, None),
            Kind::ThinPool {
                data_used,
                metadata_used,
                ..
            } => (
                LvType::ThinPool,
                None,
                None,
                lv.minor.map(|_| *data_used),
                lv.minor.map(|_| *metadata_used),
            ),
            Kind::Thin { pool, origin } => (
                LvType::Thin,
                Some(pool.clone()),
                origin.clone(),
                lv.minor.map(|_| 0.0),
                None,
            ),
        };
        let active = lv.minor.is_some();
        LogicalVolume {
            name: name.to_owned(),
            vg: vg.to_owned(),
            uuid: lv.uuid.clone(),
            size_bytes: lv.size,
            tags: lv.tags.clone(),
            attr: format!(
                "{}wi-{}{}----",
                match lv_type {
                    LvType::ThinPool => 't',
                    LvType::Thin => 'V',
                    _ => '-',
                },
                if active { 'a' } else { '-' },
                if active && lv.open { 'o' } else { '-' },
            ),
            lv_type,
            pool,
            origin,
            device: lv.minor.map(|minor| (FAKE_MAJOR, minor)),
            open: active && lv.open,
            data_used,
            metadata_used,
            path: (lv_type != LvType::ThinPool).then(|| PathBuf::from(format!("/dev/{vg}/{name}"))),
            dm_path: Some(dm_path(vg, name)),
        }
    }

    fn check_size(operation: &str, bytes: u64) -> LvmResult<()> {
        if bytes == 0 || !bytes.is_multiple_of(512) {
            return Err(error(
                operation,
                format!("Size is not a multiple of 512. Invalid argument for --size: {bytes}b"),
            ));
        }
        Ok(())
    }

    fn exists_error(operation: &str, vg: &str, lv: &str) -> LvmError {
        error(
            operation,
            format!("Logical Volume \"{lv}\" already exists in volume group \"{vg}\""),
        )
    }

    fn missing_error(operation: &str, vg: &str, lv: &str) -> LvmError {
        error(
            operation,
            format!("Failed to find logical volume \"{vg}/{lv}\""),
        )
    }

    /// The LV `lv` of `group`, or LVM's "not found".
    fn lv_mut<'a>(
        group: &'a mut FakeVg,
        operation: &str,
        vg: &str,
        lv: &str,
    ) -> LvmResult<&'a mut FakeLv> {
        group
            .lvs
            .get_mut(lv)
            .ok_or_else(|| Self::missing_error(operation, vg, lv))
    }

    /// LVM refuses to deactivate or remove an LV that is active and open.
    fn refuse_if_open(operation: &str, vg: &str, lv: &str, found: &FakeLv) -> LvmResult<()> {
        if found.minor.is_some() && found.open {
            return Err(error(
                operation,
                format!("Logical volume {vg}/{lv} in use."),
            ));
        }
        Ok(())
    }

    fn insert(
        state: &mut State,
        vg: &str,
        lv: &str,
        size: u64,
        tags: &[String],
        kind: Kind,
    ) -> LvmResult<()> {
        let minor = Self::minor(state);
        let uuid = Self::uuid(state);
        let operation = format!("lvcreate {vg}/{lv}");
        let group = Self::group(state, vg, &operation)?;
        group.lvs.insert(
            lv.to_owned(),
            FakeLv {
                uuid,
                size,
                tags: tags.to_vec(),
                kind,
                minor: Some(minor),
                open: false,
                zeroed: false,
            },
        );
        Ok(())
    }
}

impl Lvm for FakeLvm {
    fn logical_volumes(&self, vg: &str, tag: Option<&str>) -> LvmResult<Vec<LogicalVolume>> {
        let mut state = self.state();
        let operation = format!("lvs {vg}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        Ok(group
            .lvs
            .iter()
            .map(|(name, lv)| Self::report(vg, name, lv))
            .filter(|lv| tag.is_none_or(|tag| lv.has_tag(tag)))
            .collect())
    }

    fn logical_volume(&self, vg: &str, lv: &str) -> LvmResult<Option<LogicalVolume>> {
        let mut state = self.state();
        let operation = format!("lvs {vg}/{lv}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        Ok(group.lvs.get(lv).map(|found| Self::report(vg, lv, found)))
    }

    fn volume_group(&self, vg: &str) -> LvmResult<VolumeGroup> {
        let mut state = self.state();
        let operation = format!("vgs {vg}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        Ok(VolumeGroup {
            name: vg.to_owned(),
            size_bytes: group.extents * group.extent,
            free_bytes: group.free_extents() * group.extent,
            extent_bytes: group.extent,
            extent_count: group.extents,
            free_extents: group.free_extents(),
        })
    }

    fn thin_pool(&self, vg: &str, pool: &str) -> LvmResult<ThinPool> {
        let mut state = self.state();
        let operation = format!("lvs {vg}/{pool} (thin pool)");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        let found = group
            .lvs
            .get(pool)
            .ok_or_else(|| Self::missing_error(&operation, vg, pool))?;
        match found.kind {
            Kind::ThinPool { zero, .. } => Ok(ThinPool {
                volume: Self::report(vg, pool, found),
                zeroes_new_blocks: zero,
                discards: "passdown".into(),
                chunk_bytes: 64 << 10,
            }),
            _ => Err(LvmError::new(
                LvmErrorKind::Failed,
                operation,
                format!("{vg}/{pool} is not a thin pool"),
            )),
        }
    }

    fn create_linear(&self, vg: &str, lv: &str, bytes: u64, tags: &[String]) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvcreate linear {vg}/{lv} {bytes}");
        Self::enter(&mut state, operation.clone())?;
        Self::check_size(&operation, bytes)?;
        let group = Self::group(&mut state, vg, &operation)?;
        if group.lvs.contains_key(lv) {
            return Err(Self::exists_error(&operation, vg, lv));
        }
        let extents = bytes.div_ceil(group.extent);
        if extents > group.free_extents() {
            return Err(error(
                &operation,
                format!(
                    "Volume group \"{vg}\" has insufficient free space ({} extents): {extents} required.",
                    group.free_extents()
                ),
            ));
        }
        let size = extents * group.extent;
        Self::insert(&mut state, vg, lv, size, tags, Kind::Linear)
    }

    fn create_thin(
        &self,
        vg: &str,
        pool: &str,
        lv: &str,
        bytes: u64,
        tags: &[String],
    ) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvcreate thin {vg}/{lv} {bytes} in {pool}");
        Self::enter(&mut state, operation.clone())?;
        Self::check_size(&operation, bytes)?;
        let group = Self::group(&mut state, vg, &operation)?;
        if !matches!(
            group.lvs.get(pool).map(|p| &p.kind),
            Some(Kind::ThinPool { .. })
        ) {
            return Err(error(
                &operation,
                format!("Pool {pool} not found in Volume group {vg}."),
            ));
        }
        if group.lvs.contains_key(lv) {
            return Err(Self::exists_error(&operation, vg, lv));
        }
        let size = bytes.div_ceil(group.extent) * group.extent;
        let kind = Kind::Thin {
            pool: pool.to_owned(),
            origin: None,
        };
        Self::insert(&mut state, vg, lv, size, tags, kind)
    }

    fn create_thin_snapshot(
        &self,
        vg: &str,
        origin: &str,
        lv: &str,
        tags: &[String],
    ) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvcreate snapshot {vg}/{lv} of {origin}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        let source = group
            .lvs
            .get(origin)
            .ok_or_else(|| Self::missing_error(&operation, vg, origin))?;
        let (size, pool) = match &source.kind {
            Kind::Thin { pool, .. } => (source.size, pool.clone()),
            _ => {
                return Err(error(
                    &operation,
                    format!(
                        "Snapshot origin {vg}/{origin} is not a thin volume (not supported here)."
                    ),
                ))
            }
        };
        if group.lvs.contains_key(lv) {
            return Err(Self::exists_error(&operation, vg, lv));
        }
        let kind = Kind::Thin {
            pool,
            origin: Some(origin.to_owned()),
        };
        Self::insert(&mut state, vg, lv, size, tags, kind)
    }

    fn rename(&self, vg: &str, from: &str, to: &str) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvrename {vg}/{from} {to}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        if group.lvs.contains_key(to) {
            return Err(Self::exists_error(&operation, vg, to));
        }
        let lv = group
            .lvs
            .remove(from)
            .ok_or_else(|| Self::missing_error(&operation, vg, from))?;
        // The device number stays, as with LVM.
        group.lvs.insert(to.to_owned(), lv);
        for other in group.lvs.values_mut() {
            if let Kind::Thin { origin, .. } = &mut other.kind {
                if origin.as_deref() == Some(from) {
                    *origin = Some(to.to_owned());
                }
            }
        }
        Ok(())
    }

    fn extend(&self, vg: &str, lv: &str, bytes: u64) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvextend {vg}/{lv} {bytes}");
        Self::enter(&mut state, operation.clone())?;
        Self::check_size(&operation, bytes)?;
        let group = Self::group(&mut state, vg, &operation)?;
        let free = group.free_extents();
        let extent = group.extent;
        let found = Self::lv_mut(group, &operation, vg, lv)?;
        let size = bytes.div_ceil(extent) * extent;
        if size <= found.size {
            return Err(error(
                &operation,
                format!(
                    "New size ({} extents) matches existing size ({} extents).",
                    size / extent,
                    found.size / extent
                ),
            ));
        }
        let needed = (size - found.size) / extent;
        if matches!(found.kind, Kind::Linear) && needed > free {
            return Err(error(
                &operation,
                format!(
                    "Insufficient free space: {needed} extents needed, but only {free} available"
                ),
            ));
        }
        found.size = size;
        Ok(())
    }

    fn remove(&self, vg: &str, lv: &str) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvremove {vg}/{lv}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        let found = Self::lv_mut(group, &operation, vg, lv)?;
        Self::refuse_if_open(&operation, vg, lv, found)?;
        if matches!(found.kind, Kind::ThinPool { .. })
            && group
                .lvs
                .values()
                .any(|other| matches!(&other.kind, Kind::Thin { pool, .. } if pool == lv))
        {
            return Err(error(
                &operation,
                format!("Logical volume {vg}/{lv} is used by thin volumes."),
            ));
        }
        group.lvs.remove(lv);
        Ok(())
    }

    fn activate(&self, vg: &str, lv: &str) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvchange -ay {vg}/{lv}");
        Self::enter(&mut state, operation.clone())?;
        let minor = Self::minor(&mut state);
        let group = Self::group(&mut state, vg, &operation)?;
        let found = Self::lv_mut(group, &operation, vg, lv)?;
        if found.minor.is_none() {
            found.minor = Some(minor);
            found.open = false;
        }
        Ok(())
    }

    fn deactivate(&self, vg: &str, lv: &str) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvchange -an {vg}/{lv}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        let found = Self::lv_mut(group, &operation, vg, lv)?;
        Self::refuse_if_open(&operation, vg, lv, found)?;
        found.minor = None;
        Ok(())
    }

    fn change_tags(&self, vg: &str, lv: &str, add: &[String], remove: &[String]) -> LvmResult<()> {
        let mut state = self.state();
        let operation = format!("lvchange tags {vg}/{lv}");
        Self::enter(&mut state, operation.clone())?;
        let group = Self::group(&mut state, vg, &operation)?;
        let found = Self::lv_mut(group, &operation, vg, lv)?;
        found.tags.retain(|tag| !remove.contains(tag));
        for tag in add {
            if !found.tags.contains(tag) {
                found.tags.push(tag.clone());
            }
        }
        Ok(())
    }

    fn zero_device(&self, device: &Path) -> LvmResult<u64> {
        let mut state = self.state();
        let operation = format!("zero {}", device.display());
        Self::enter(&mut state, operation.clone())?;
        for (vg, group) in state.vgs.iter_mut() {
            for (name, lv) in group.lvs.iter_mut() {
                if dm_path(vg, name) == device {
                    if lv.minor.is_none() {
                        break;
                    }
                    lv.zeroed = true;
                    return Ok(lv.size);
                }
            }
        }
        Err(LvmError::new(
            LvmErrorKind::NotFound,
            operation,
            format!("{}: No such file or directory", device.display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn fake() -> FakeLvm {
        let lvm = FakeLvm::new();
        lvm.add_volume_group("vg0", 100 * MIB, 4 * MIB);
        lvm.add_thin_pool("vg0", "tp0", 40 * MIB, true);
        lvm
    }

    #[test]
    fn keeps_lvm_allocation_rules() {
        let lvm = fake();
        assert_eq!(lvm.volume_group("vg0").expect("vg").free_bytes, 60 * MIB);
        lvm.create_linear("vg0", "a", 5 * MIB, &[])
            .expect("created");
        // Rounded up to two extents.
        let a = lvm
            .logical_volume("vg0", "a")
            .expect("reads")
            .expect("exists");
        assert_eq!(a.size_bytes, 8 * MIB);
        assert_eq!(lvm.volume_group("vg0").expect("vg").free_bytes, 52 * MIB);
        let e = lvm.create_linear("vg0", "a", MIB, &[]).expect_err("exists");
        assert_eq!(e.kind, LvmErrorKind::AlreadyExists);
        let e = lvm
            .create_linear("vg0", "b", 100 * MIB, &[])
            .expect_err("too big");
        assert_eq!(e.kind, LvmErrorKind::NoSpace);
        let e = lvm
            .create_linear("vg0", "b", 1000, &[])
            .expect_err("not 512");
        assert_eq!(e.kind, LvmErrorKind::Failed);
        // Thin LVs take no extents.
        lvm.create_thin("vg0", "tp0", "t", 500 * MIB, &[])
            .expect("thin");
        assert_eq!(lvm.volume_group("vg0").expect("vg").free_bytes, 52 * MIB);
        lvm.create_thin_snapshot("vg0", "t", "s", &[])
            .expect("snapshot");
        let s = lvm
            .logical_volume("vg0", "s")
            .expect("reads")
            .expect("exists");
        assert_eq!(s.origin.as_deref(), Some("t"));
        assert_eq!(s.size_bytes, 500 * MIB);
        // The pool is open (its thin LVs are active) and holds thin LVs.
        assert!(lvm.remove("vg0", "tp0").is_err());
        let e = lvm
            .create_thin("vg0", "nope", "u", MIB, &[])
            .expect_err("no pool");
        assert_eq!(e.kind, LvmErrorKind::NotFound);
    }

    #[test]
    fn an_open_lv_stays_active_and_present() {
        let lvm = fake();
        lvm.create_linear("vg0", "a", 4 * MIB, &[])
            .expect("created");
        lvm.set_open("vg0", "a", true);
        assert_eq!(
            lvm.deactivate("vg0", "a").expect_err("busy").kind,
            LvmErrorKind::Busy
        );
        assert_eq!(
            lvm.remove("vg0", "a").expect_err("busy").kind,
            LvmErrorKind::Busy
        );
        lvm.set_open("vg0", "a", false);
        lvm.deactivate("vg0", "a").expect("deactivated");
        let a = lvm
            .logical_volume("vg0", "a")
            .expect("reads")
            .expect("exists");
        assert!(!a.is_active());
        assert_eq!(
            lvm.zero_device(&dm_path("vg0", "a"))
                .expect_err("inactive")
                .kind,
            LvmErrorKind::NotFound
        );
        lvm.activate("vg0", "a").expect("activated");
        lvm.zero_device(&dm_path("vg0", "a")).expect("zeroed");
        assert!(lvm.is_zeroed("vg0", "a"));
        lvm.remove("vg0", "a").expect("removed");
        assert_eq!(
            lvm.remove("vg0", "a").expect_err("absent").kind,
            LvmErrorKind::NotFound
        );
    }

    #[test]
    fn rename_keeps_the_device_and_injected_failures_fire_once() {
        let lvm = fake();
        lvm.create_linear("vg0", "a", 4 * MIB, &["t1".into()])
            .expect("created");
        let before = lvm
            .logical_volume("vg0", "a")
            .expect("reads")
            .expect("exists");
        lvm.rename("vg0", "a", "b").expect("renamed");
        let after = lvm
            .logical_volume("vg0", "b")
            .expect("reads")
            .expect("exists");
        assert_eq!(before.device, after.device);
        assert_eq!(after.tags, ["t1"]);
        assert_eq!(
            dm_path("vg-x", "lcv-1"),
            Path::new("/dev/mapper/vg--x-lcv--1")
        );

        lvm.fail_next("lvrename", LvmErrorKind::Failed);
        assert!(lvm.rename("vg0", "b", "c").is_err());
        lvm.rename("vg0", "b", "c").expect("second try");
        assert!(lvm.calls().iter().any(|call| call == "lvrename vg0/b c"));
    }
}
