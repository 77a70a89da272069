//! The LVM pool: one *device class* of logical volumes in a volume group,
//! thick (linear LVs) or thin (thin LVs in a thin pool).
//!
//! Names come only from validated IDs:
//!
//! ```text
//! <volume-id>_g<generation>   volume data        e.g. lcv-0123...cdef_g2
//! <snapshot-id>               snapshot image     e.g. lcs-0123...cdef
//! <volume-id>_meta            dm-clone metadata  e.g. lcv-0123...cdef_meta
//! ```
//!
//! Every LV the pool makes carries the tags `liveclone`,
//! `liveclone.io/class=<class>` and `liveclone.io/kind=<data|image|metadata>`.
//! LVM itself is the record of what exists: [`LvmPool::list`] reports the
//! VG's LVs with this class's tag, so a restarted node needs nothing else,
//! and several classes may share one VG (a thick and a thin class) without
//! seeing each other's LVs. An LV that has one of our names but not this
//! class's tag is never used, changed or removed. The item is read from
//! the name; the kind tag is for people (`lvs @liveclone.io/kind=image`)
//! and is rewritten after a rename.
//!
//! A thick class cannot clone instantly, so the engine cuts snapshots by
//! redirect: `rename` turns the volume's data LV into the image (an
//! lvrename is atomic and an active LV keeps its device number, so the
//! tables that use it keep working). A thin class snapshots with a thin
//! snapshot, which shares the origin's blocks.
//!
//! An LV has exactly one device (`/dev/mapper/<vg>-<lv>`); attaching is
//! activating and detaching is deactivating. Unlike the file pool's loop
//! devices there is no separate read-only device: dm-clone opens its
//! source read-only itself, and an image's device is reported read-only.

use std::sync::Arc;

use serde::Deserialize;

use crate::domain::error::{DomainError, DomainResult};
use crate::domain::human::format_bytes;
use crate::domain::ids::{SnapshotId, VolumeId};
use crate::domain::pool::{BlockDevice, Pool, PoolCapacity, Storage, ThinUsage};
use crate::os::lvm::{LogicalVolume, LvType, Lvm, LvmError, LvmErrorKind, ThinPool};

/// Tag on every LV any liveclone class made.
pub const TAG: &str = "liveclone";
const CLASS_TAG_PREFIX: &str = "liveclone.io/class=";
const KIND_TAG_PREFIX: &str = "liveclone.io/kind=";
/// The ID the LV belongs to, so that `lvs -o lv_name,lv_tags` (or `lvs
/// @liveclone.io/volume=<id>`) answers "which LVs are this volume's" from
/// LVM alone: a volume's data generations and metadata, or a snapshot's
/// image.
const VOLUME_TAG_PREFIX: &str = "liveclone.io/volume=";
const SNAPSHOT_TAG_PREFIX: &str = "liveclone.io/snapshot=";
const DATA_SUFFIX: &str = "_g";
const METADATA_SUFFIX: &str = "_meta";

/// New thin volumes and snapshots are refused once the pool's data or
/// metadata use reaches this fraction: a thin pool that fills up fails
/// writes to every one of its volumes, so the last few percent are kept
/// for the writes of the volumes that exist.
pub const NEARLY_FULL: f64 = 0.95;

/// Longest device class name (it becomes part of a tag and of messages).
pub const MAX_CLASS_LEN: usize = 63;
/// Longest VG or LV name LVM accepts (its NAME_LEN less the NUL).
const MAX_LVM_NAME_LEN: usize = 127;
/// Device-mapper names are at most 127 bytes, and LVM names an LV's
/// device `<vg>-<lv>` with each dash doubled. Our longest LV name,
/// `lcv-` + 32 hex + `_g` + a u32, is 48 bytes and 49 escaped.
const LONGEST_LV_DM_LEN: usize = 49;
const MAX_VG_DM_LEN: usize = 127 - 1 - LONGEST_LV_DM_LEN;

fn default_ratio() -> f64 {
    1.0
}

/// One LVM device class, as configured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LvmClassConfig {
    pub volume_group: String,
    /// Absent: thick linear LVs in the volume group.
    #[serde(default)]
    pub thin_pool: Option<String>,
    /// Thin classes only: the thin pool's LVs may promise up to this many
    /// times the pool's size. At least 1.
    #[serde(default = "default_ratio")]
    pub overprovision_ratio: f64,
}

impl LvmClassConfig {
    /// Checks the names against LVM's rules and the ratio.
    pub fn validate(&self) -> Result<(), String> {
        validate_lvm_name("volumeGroup", &self.volume_group)?;
        let escaped = self.volume_group.replace('-', "--");
        if escaped.len() > MAX_VG_DM_LEN {
            return Err(format!(
                "volumeGroup {:?} is too long: its device-mapper form {escaped:?} has {} bytes, \
                 at most {MAX_VG_DM_LEN} leave room for liveclone's LV names",
                self.volume_group,
                escaped.len()
            ));
        }
        let ratio = self.overprovision_ratio;
        match &self.thin_pool {
            Some(pool) => {
                validate_lvm_name("thinPool", pool)?;
                if !ratio.is_finite() || ratio < 1.0 {
                    return Err(format!(
                        "overprovisionRatio must be a number of at least 1.0, not {ratio}"
                    ));
                }
            }
            None if ratio != 1.0 => {
                return Err(format!(
                    "overprovisionRatio ({ratio}) applies only to a class with a thinPool"
                ));
            }
            None => {}
        }
        Ok(())
    }
}

/// LVM's rules for VG and LV names: `[A-Za-z0-9+_.-]`, not starting with a
/// dash, not `.` or `..`, at most 127 bytes.
pub fn validate_lvm_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > MAX_LVM_NAME_LEN {
        return Err(format!(
            "{what} {name:?} is {} bytes long; LVM allows at most {MAX_LVM_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')))
    {
        return Err(format!(
            "{what} {name:?} contains {bad:?}; LVM names use only A-Z a-z 0-9 + _ . -"
        ));
    }
    if name.starts_with('-') {
        return Err(format!(
            "{what} {name:?} starts with '-', which LVM refuses"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} {name:?} is reserved"));
    }
    Ok(())
}

/// Device class names: `[A-Za-z0-9._-]`, starting with a letter or digit,
/// at most [`MAX_CLASS_LEN`] bytes (all characters LVM allows in tags).
pub fn validate_class_name(class: &str) -> Result<(), String> {
    if class.is_empty() || class.len() > MAX_CLASS_LEN {
        return Err(format!(
            "device class name {class:?} must have 1 to {MAX_CLASS_LEN} characters"
        ));
    }
    let first_ok = class
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let all_ok = class
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !(first_ok && all_ok) {
        return Err(format!(
            "device class name {class:?} may use only A-Z a-z 0-9 . _ - and must start with a \
             letter or digit"
        ));
    }
    Ok(())
}

/// The LV name of a storage item.
pub fn lv_name(item: &Storage) -> String {
    match item {
        Storage::Data { volume, generation } => format!("{volume}{DATA_SUFFIX}{generation}"),
        Storage::Image(snapshot) => snapshot.to_string(),
        Storage::Metadata(volume) => format!("{volume}{METADATA_SUFFIX}"),
    }
}

/// The storage item an LV name stands for; `None` for any other name
/// (each item has exactly one name: `_g01` is not generation 1).
pub fn parse_lv_name(name: &str) -> Option<Storage> {
    if let Some(volume) = name.strip_suffix(METADATA_SUFFIX) {
        return volume.parse().ok().map(Storage::Metadata);
    }
    if let Some((volume, generation)) = name.rsplit_once(DATA_SUFFIX) {
        let volume: VolumeId = volume.parse().ok()?;
        let number: u32 = generation.parse().ok()?;
        return (number.to_string() == generation).then_some(Storage::Data {
            volume,
            generation: number,
        });
    }
    name.parse::<SnapshotId>().ok().map(Storage::Image)
}

fn kind_of(item: &Storage) -> &'static str {
    match item {
        Storage::Data { .. } => "data",
        Storage::Image(_) => "image",
        Storage::Metadata(_) => "metadata",
    }
}

fn kind_tag(item: &Storage) -> String {
    format!("{KIND_TAG_PREFIX}{}", kind_of(item))
}

fn id_tag(item: &Storage) -> String {
    match item {
        Storage::Data { volume, .. } | Storage::Metadata(volume) => {
            format!("{VOLUME_TAG_PREFIX}{volume}")
        }
        Storage::Image(snapshot) => format!("{SNAPSHOT_TAG_PREFIX}{snapshot}"),
    }
}

impl From<LvmError> for DomainError {
    /// Codes for the LVM failures a caller can act on. A missing VG or LV
    /// at this level is a broken class, not an answer (the pool asks for
    /// existence explicitly), so it stays INTERNAL like the OS layer's.
    fn from(error: LvmError) -> Self {
        let message = error.to_string();
        match error.kind {
            LvmErrorKind::AlreadyExists => DomainError::already_exists(message),
            LvmErrorKind::NoSpace => DomainError::resource_exhausted(message),
            LvmErrorKind::Busy | LvmErrorKind::Unsupported => {
                DomainError::failed_precondition(message)
            }
            LvmErrorKind::NotFound | LvmErrorKind::TimedOut | LvmErrorKind::Failed => {
                DomainError::internal(message)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ThinClass {
    pool: String,
    ratio: f64,
}

/// A thin pool's state for the limits.
struct ThinState {
    pool: ThinPool,
    data_used: f64,
    metadata_used: f64,
    /// Virtual sizes of all thin LVs in the pool (ours and others').
    provisioned: u64,
    /// Pool size x ratio.
    limit: u64,
}

/// [`Pool`] over LVM for one device class.
pub struct LvmPool {
    class: String,
    class_tag: String,
    vg: String,
    thin: Option<ThinClass>,
    /// LVM allocates whole extents; read once at open (`vgchange -s`
    /// on a VG with LVs is rare, and a stale value only rounds a size
    /// differently from LVM, which rounds up again).
    extent_bytes: u64,
    /// Whether new thin LVs read zeros throughout (see
    /// [`Pool::fresh_storage_reads_zeros`]), read at open.
    fresh_zeros: bool,
    lvm: Arc<dyn Lvm>,
}

impl std::fmt::Debug for LvmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LvmPool")
            .field("class", &self.class)
            .field("vg", &self.vg)
            .field("thin", &self.thin)
            .finish()
    }
}

impl LvmPool {
    /// Checks the configuration, then that the VG (and the thin pool)
    /// exist.
    pub fn open(class: &str, config: &LvmClassConfig, lvm: Arc<dyn Lvm>) -> DomainResult<Self> {
        validate_class_name(class).map_err(DomainError::invalid_argument)?;
        config
            .validate()
            .map_err(|e| DomainError::invalid_argument(format!("device class {class}: {e}")))?;
        let vg = config.volume_group.clone();
        let group = lvm.volume_group(&vg).map_err(|e| {
            DomainError::failed_precondition(format!(
                "device class {class}: cannot use volume group {vg}: {e}"
            ))
        })?;
        let (thin, fresh_zeros) = match &config.thin_pool {
            None => (None, false),
            Some(pool) => {
                let found = lvm.thin_pool(&vg, pool).map_err(|e| {
                    DomainError::failed_precondition(format!(
                        "device class {class}: cannot use thin pool {vg}/{pool}: {e}"
                    ))
                })?;
                // Unwritten blocks of a thin LV read as zeros; with zeroing
                // off, the rest of a chunk a first write provisions keeps
                // the old disk content, and with discards ignored a
                // discarded chunk keeps its data.
                let zeros = found.zeroes_new_blocks && found.discards != "ignore";
                let thin = ThinClass {
                    pool: pool.clone(),
                    ratio: config.overprovision_ratio,
                };
                (Some(thin), zeros)
            }
        };
        Ok(Self {
            class: class.to_owned(),
            class_tag: format!("{CLASS_TAG_PREFIX}{class}"),
            vg,
            thin,
            extent_bytes: group.extent_bytes,
            fresh_zeros,
            lvm,
        })
    }

    pub fn class(&self) -> &str {
        &self.class
    }

    pub fn volume_group(&self) -> &str {
        &self.vg
    }

    pub fn thin_pool(&self) -> Option<&str> {
        self.thin.as_ref().map(|thin| thin.pool.as_str())
    }

    /// The tags of an item's LV.
    fn tags(&self, item: &Storage) -> Vec<String> {
        vec![
            TAG.to_owned(),
            self.class_tag.clone(),
            kind_tag(item),
            id_tag(item),
        ]
    }

    fn full_name(&self, item: &Storage) -> String {
        format!("{}/{}", self.vg, lv_name(item))
    }

    /// `bytes` rounded up to whole extents.
    fn round_up(&self, bytes: u64) -> DomainResult<u64> {
        bytes
            .checked_next_multiple_of(self.extent_bytes)
            .ok_or_else(|| DomainError::out_of_range(format!("{bytes} bytes is too large")))
    }

    /// The item's LV when it is this class's; an LV with the name but
    /// without the class tag is refused, never used.
    fn find(&self, item: &Storage) -> DomainResult<Option<LogicalVolume>> {
        let name = lv_name(item);
        match self.lvm.logical_volume(&self.vg, &name)? {
            None => Ok(None),
            Some(lv) if lv.has_tag(&self.class_tag) => Ok(Some(lv)),
            Some(_) => Err(DomainError::internal(format!(
                "the logical volume {} exists but is not tagged {}: it belongs to another \
                 device class or was not made by liveclone; refusing to use it",
                self.full_name(item),
                self.class_tag
            ))),
        }
    }

    fn require(&self, item: &Storage) -> DomainResult<LogicalVolume> {
        self.find(item)?.ok_or_else(|| {
            DomainError::not_found(format!(
                "{item} ({}) does not exist in device class {}",
                self.full_name(item),
                self.class
            ))
        })
    }

    fn device(item: &Storage, lv: &LogicalVolume) -> Option<BlockDevice> {
        let (major, minor) = lv.device?;
        // LVM's own name for the node: dashes in the VG and LV names are
        // doubled there, and the report says exactly what it made.
        let path = lv.dm_path.clone().or_else(|| lv.path.clone())?;
        Some(BlockDevice {
            path,
            major,
            minor,
            size_bytes: lv.size_bytes,
            read_only: matches!(item, Storage::Image(_)),
        })
    }

    /// Deactivates an active LV; an open one stays and is an error.
    fn deactivate(&self, item: &Storage, lv: &LogicalVolume) -> DomainResult<()> {
        if !lv.is_active() {
            return Ok(());
        }
        match self.lvm.deactivate(&self.vg, &lv.name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind == LvmErrorKind::Busy => {
                Err(DomainError::failed_precondition(format!(
                    "{item} ({}) is still open (a device-mapper table, a mount or a process \
                     uses it), so it stays active: {e}",
                    self.full_name(item)
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A refusal for want of space in the VG, with the VG's figures.
    fn no_space(&self, item: &Storage, bytes: u64, error: LvmError) -> DomainError {
        if error.kind != LvmErrorKind::NoSpace {
            return error.into();
        }
        let free = self
            .lvm
            .volume_group(&self.vg)
            .map(|group| format_bytes(group.free_bytes))
            .unwrap_or_else(|_| "unknown".to_owned());
        DomainError::resource_exhausted(format!(
            "device class {}: volume group {} has {free} free, too little for {item} \
             ({} needed): {}",
            self.class,
            self.vg,
            format_bytes(bytes),
            error.detail
        ))
    }

    /// The thin pool's figures; an inactive pool (none of its LVs active,
    /// e.g. after a reboot) reports no use, so it is activated first.
    fn thin_state(&self, thin: &ThinClass) -> DomainResult<ThinState> {
        let mut pool = self.lvm.thin_pool(&self.vg, &thin.pool)?;
        if pool.volume.data_used.is_none() || pool.volume.metadata_used.is_none() {
            self.lvm.activate(&self.vg, &thin.pool)?;
            pool = self.lvm.thin_pool(&self.vg, &thin.pool)?;
        }
        let (Some(data_used), Some(metadata_used)) =
            (pool.volume.data_used, pool.volume.metadata_used)
        else {
            return Err(DomainError::internal(format!(
                "device class {}: LVM reports no data or metadata use for thin pool {}/{} \
                 even when active",
                self.class, self.vg, thin.pool
            )));
        };
        let provisioned = self
            .lvm
            .logical_volumes(&self.vg, None)?
            .iter()
            .filter(|lv| lv.lv_type == LvType::Thin && lv.pool.as_deref() == Some(&thin.pool))
            .map(|lv| lv.size_bytes)
            .sum();
        // The product only needs byte precision up to 2^53 (8 PiB); `as`
        // saturates beyond u64.
        let limit = (pool.volume.size_bytes as f64 * thin.ratio).floor() as u64;
        Ok(ThinState {
            pool,
            data_used,
            metadata_used,
            provisioned,
            limit,
        })
    }

    /// Refuses `extra` more virtual bytes for `what` when the pool is
    /// nearly full or the sum would pass the overprovisioning limit.
    fn check_thin_room(&self, thin: &ThinClass, extra: u64, what: &str) -> DomainResult<()> {
        let state = self.thin_state(thin)?;
        if state.data_used >= NEARLY_FULL || state.metadata_used >= NEARLY_FULL {
            return Err(DomainError::resource_exhausted(format!(
                "device class {}: thin pool {}/{} is nearly full (data {:.1} %, metadata \
                 {:.1} %; new volumes are refused from {:.0} %), so {what} cannot be made; \
                 extend the pool or free space in it",
                self.class,
                self.vg,
                thin.pool,
                state.data_used * 100.0,
                state.metadata_used * 100.0,
                NEARLY_FULL * 100.0
            )));
        }
        let wanted = state.provisioned.saturating_add(extra);
        if wanted > state.limit {
            return Err(DomainError::resource_exhausted(format!(
                "device class {}: {what} ({}) would overprovision thin pool {}/{}: {} is \
                 provisioned already, and the limit is {} (pool size {} x overprovisionRatio \
                 {})",
                self.class,
                format_bytes(extra),
                self.vg,
                thin.pool,
                format_bytes(state.provisioned),
                format_bytes(state.limit),
                format_bytes(state.pool.volume.size_bytes),
                thin.ratio
            )));
        }
        Ok(())
    }

    /// Zeroes a new metadata LV over its whole length; on failure removes
    /// it, so that a retry makes a new one rather than finding one that
    /// was never zeroed.
    fn zero_new(&self, item: &Storage) -> DomainResult<()> {
        let result = (|| -> DomainResult<()> {
            let mut lv = self.require(item)?;
            if !lv.is_active() {
                self.lvm.activate(&self.vg, &lv.name)?;
                lv = self.require(item)?;
            }
            let device = Self::device(item, &lv).ok_or_else(|| {
                DomainError::internal(format!(
                    "LVM reports no device for the active {}",
                    self.full_name(item)
                ))
            })?;
            let zeroed = self.lvm.zero_device(&device.path)?;
            if zeroed < lv.size_bytes {
                return Err(DomainError::internal(format!(
                    "zeroed {zeroed} bytes of {}, which has {}",
                    device.path.display(),
                    lv.size_bytes
                )));
            }
            Ok(())
        })();
        if let Err(error) = result {
            if let Err(cleanup) = self.lvm.remove(&self.vg, &lv_name(item)) {
                tracing::warn!(
                    lv = %self.full_name(item),
                    %cleanup,
                    "cannot remove a metadata LV whose zeroing failed"
                );
            }
            return Err(error.context(format!("zeroing the new {item}")));
        }
        Ok(())
    }
}

impl Pool for LvmPool {
    fn describe(&self) -> String {
        match &self.thin {
            None => format!(
                "LVM device class {} (thick, volume group {})",
                self.class, self.vg
            ),
            Some(thin) => format!(
                "LVM device class {} (thin pool {}/{}, overprovisioning up to x{})",
                self.class, self.vg, thin.pool, thin.ratio
            ),
        }
    }

    fn check(&self) -> Result<(), String> {
        self.lvm
            .volume_group(&self.vg)
            .map_err(|e| format!("device class {}: volume group {}: {e}", self.class, self.vg))?;
        if let Some(thin) = &self.thin {
            self.lvm.thin_pool(&self.vg, &thin.pool).map_err(|e| {
                format!(
                    "device class {}: thin pool {}/{}: {e}",
                    self.class, self.vg, thin.pool
                )
            })?;
        }
        Ok(())
    }

    fn capacity(&self) -> DomainResult<PoolCapacity> {
        match &self.thin {
            None => {
                let group = self.lvm.volume_group(&self.vg)?;
                Ok(PoolCapacity {
                    total_bytes: group.size_bytes,
                    available_bytes: group.free_bytes,
                    thin: None,
                })
            }
            Some(thin) => {
                let state = self.thin_state(thin)?;
                let size = state.pool.volume.size_bytes;
                let free_data = (size as f64 * (1.0 - state.data_used).max(0.0)).floor() as u64;
                Ok(PoolCapacity {
                    total_bytes: state.limit,
                    available_bytes: state.limit.saturating_sub(state.provisioned).min(free_data),
                    thin: Some(ThinUsage {
                        data_used: state.data_used,
                        metadata_used: state.metadata_used,
                        provisioned_bytes: state.provisioned,
                    }),
                })
            }
        }
    }

    fn create(&self, item: &Storage, bytes: u64) -> DomainResult<()> {
        if bytes == 0 {
            return Err(DomainError::invalid_argument(format!(
                "cannot make {item} of 0 bytes"
            )));
        }
        let name = lv_name(item);
        // Any LV of the name, ours or not: nothing is ever reused.
        if self.lvm.logical_volume(&self.vg, &name)?.is_some() {
            return Err(DomainError::already_exists(format!(
                "{item} exists already ({})",
                self.full_name(item)
            )));
        }
        let size = self.round_up(bytes)?;
        let tags = self.tags(item);
        match &self.thin {
            None => self
                .lvm
                .create_linear(&self.vg, &name, size, &tags)
                .map_err(|e| self.no_space(item, size, e))?,
            Some(thin) => {
                self.check_thin_room(thin, size, &format!("{item}"))?;
                self.lvm
                    .create_thin(&self.vg, &thin.pool, &name, size, &tags)
                    .map_err(|e| self.no_space(item, size, e))?;
            }
        }
        // Metadata LVs are thin LVs in a thin class, too: a pool often
        // spans its whole VG, leaving no extents for linear LVs, and
        // zeroing writes every block, which provisions all of it now, so
        // the clone's metadata writes never need new space from the pool.
        if matches!(item, Storage::Metadata(_)) {
            self.zero_new(item)?;
        }
        Ok(())
    }

    fn exists(&self, item: &Storage) -> DomainResult<bool> {
        Ok(self.find(item)?.is_some())
    }

    fn size(&self, item: &Storage) -> DomainResult<u64> {
        Ok(self.require(item)?.size_bytes)
    }

    /// lvextend (LVM reloads an active LV's table, so its device grows).
    fn grow(&self, item: &Storage, bytes: u64) -> DomainResult<()> {
        let lv = self.require(item)?;
        if bytes <= lv.size_bytes {
            return Ok(());
        }
        let size = self.round_up(bytes)?;
        if let Some(thin) = &self.thin {
            self.check_thin_room(thin, size - lv.size_bytes, &format!("growing {item}"))?;
        }
        self.lvm
            .extend(&self.vg, &lv.name, size)
            .map_err(|e| self.no_space(item, size - lv.size_bytes, e))
    }

    fn remove(&self, item: &Storage) -> DomainResult<()> {
        let Some(lv) = self.find(item)? else {
            return Ok(());
        };
        self.deactivate(item, &lv)?;
        match self.lvm.remove(&self.vg, &lv.name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind == LvmErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Activates the LV when it is not active. `read_only` does not change
    /// the device (an LV has one); an image's device is reported
    /// read-only, since nothing may write to an image once cut.
    fn attach(&self, item: &Storage, _read_only: bool) -> DomainResult<BlockDevice> {
        let mut lv = self.require(item)?;
        if !lv.is_active() {
            self.lvm.activate(&self.vg, &lv.name)?;
            lv = self.require(item)?;
        }
        Self::device(item, &lv).ok_or_else(|| {
            DomainError::internal(format!(
                "LVM activated {} but reports no device for it",
                self.full_name(item)
            ))
        })
    }

    fn detach(&self, item: &Storage) -> DomainResult<()> {
        match self.find(item)? {
            Some(lv) => self.deactivate(item, &lv),
            None => Ok(()),
        }
    }

    fn attachments(&self, item: &Storage) -> DomainResult<Vec<BlockDevice>> {
        Ok(self
            .find(item)?
            .and_then(|lv| Self::device(item, &lv))
            .into_iter()
            .collect())
    }

    /// Deactivates the LV when `device` is its device; another device is
    /// not this LV's to release.
    fn release(&self, item: &Storage, device: &BlockDevice) -> DomainResult<()> {
        match self.find(item)? {
            Some(lv) if lv.device == Some((device.major, device.minor)) => {
                self.deactivate(item, &lv)
            }
            _ => Ok(()),
        }
    }

    fn fresh_storage_reads_zeros(&self) -> bool {
        self.fresh_zeros
    }

    /// LVM cannot tell cheaply: a thin LV's unprovisioned ranges are in
    /// the pool's metadata (thin_dump on a metadata snapshot, far too
    /// heavy for each clone), and a thick LV has none.
    fn holes(&self, _item: &Storage, _length: u64) -> DomainResult<Vec<std::ops::Range<u64>>> {
        Ok(Vec::new())
    }

    fn instant_clone_supported(&self) -> DomainResult<bool> {
        Ok(self.thin.is_some())
    }

    /// A thin snapshot (shares the origin's blocks until either is
    /// written), active and without LVM's activation-skip flag.
    fn clone_instant(&self, from: &Storage, to: &Storage) -> DomainResult<bool> {
        let Some(thin) = &self.thin else {
            return Ok(false);
        };
        let origin = self.require(from)?;
        let name = lv_name(to);
        if self.lvm.logical_volume(&self.vg, &name)?.is_some() {
            return Err(DomainError::already_exists(format!(
                "{to} exists already ({})",
                self.full_name(to)
            )));
        }
        self.check_thin_room(
            thin,
            origin.size_bytes,
            &format!("a thin snapshot of {from} as {to}"),
        )?;
        self.lvm
            .create_thin_snapshot(&self.vg, &origin.name, &name, &self.tags(to))?;
        Ok(true)
    }

    /// lvrename alone; the tags follow in [`Pool::relabel`], outside the
    /// cut's suspended window (one LVM command less while I/O is held).
    fn rename(&self, from: &Storage, to: &Storage) -> DomainResult<()> {
        let lv = self.require(from)?;
        let name = lv_name(to);
        if self.lvm.logical_volume(&self.vg, &name)?.is_some() {
            return Err(DomainError::already_exists(format!(
                "cannot rename {} to {}: the target exists",
                self.full_name(from),
                self.full_name(to)
            )));
        }
        self.lvm.rename(&self.vg, &lv.name, &name)?;
        Ok(())
    }

    /// Sets the kind and ID tags to what the LV's name says it is, dropping
    /// the ones it had under its old name.
    fn relabel(&self, item: &Storage) -> DomainResult<()> {
        let lv = self.require(item)?;
        let wanted = [kind_tag(item), id_tag(item)];
        let add: Vec<String> = wanted
            .iter()
            .filter(|tag| !lv.has_tag(tag))
            .cloned()
            .collect();
        let remove: Vec<String> = lv
            .tags
            .iter()
            .filter(|tag| {
                [KIND_TAG_PREFIX, VOLUME_TAG_PREFIX, SNAPSHOT_TAG_PREFIX]
                    .iter()
                    .any(|prefix| tag.starts_with(prefix))
                    && !wanted.contains(tag)
            })
            .cloned()
            .collect();
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        Ok(self.lvm.change_tags(&self.vg, &lv.name, &add, &remove)?)
    }

    fn list(&self) -> DomainResult<Vec<Storage>> {
        let mut items: Vec<Storage> = self
            .lvm
            .logical_volumes(&self.vg, Some(&self.class_tag))?
            .iter()
            .filter_map(|lv| parse_lv_name(&lv.name))
            .collect();
        items.sort();
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::ErrorCode;
    use crate::os::lvm::fake::{dm_path, FakeLvm};

    const MIB: u64 = 1 << 20;
    const EXTENT: u64 = 4 * MIB;

    fn volume(n: u8) -> VolumeId {
        VolumeId::for_name(&format!("volume-{n}")).expect("valid")
    }

    fn snapshot(n: u8) -> SnapshotId {
        SnapshotId::for_name(&format!("snapshot-{n}")).expect("valid")
    }

    fn data(n: u8) -> Storage {
        Storage::Data {
            volume: volume(n),
            generation: 1,
        }
    }

    /// vg0: 1 GiB in 4 MiB extents, with a 200 MiB thin pool tp0 that
    /// zeroes new blocks.
    fn fake() -> Arc<FakeLvm> {
        let lvm = Arc::new(FakeLvm::new());
        lvm.add_volume_group("vg0", 1024 * MIB, EXTENT);
        lvm.add_thin_pool("vg0", "tp0", 200 * MIB, true);
        lvm
    }

    fn thick(lvm: &Arc<FakeLvm>) -> LvmPool {
        let config = LvmClassConfig {
            volume_group: "vg0".into(),
            thin_pool: None,
            overprovision_ratio: 1.0,
        };
        LvmPool::open("slow", &config, lvm.clone()).expect("opens")
    }

    fn thin(lvm: &Arc<FakeLvm>, ratio: f64) -> LvmPool {
        let config = LvmClassConfig {
            volume_group: "vg0".into(),
            thin_pool: Some("tp0".into()),
            overprovision_ratio: ratio,
        };
        LvmPool::open("fast", &config, lvm.clone()).expect("opens")
    }

    #[test]
    fn names_round_trip() {
        let items = [
            data(1),
            Storage::Data {
                volume: volume(2),
                generation: u32::MAX,
            },
            Storage::Image(snapshot(1)),
            Storage::Metadata(volume(1)),
        ];
        for item in items {
            let name = lv_name(&item);
            assert!(validate_lvm_name("lv", &name).is_ok(), "{name}");
            assert!(name.replace('-', "--").len() <= LONGEST_LV_DM_LEN, "{name}");
            assert_eq!(parse_lv_name(&name), Some(item), "{name}");
        }
        let id = volume(1);
        for foreign in [
            "lvol0".to_owned(),
            format!("{id}_g01"),
            format!("{id}_g"),
            format!("{id}_g-1"),
            format!("{id}_meta2"),
            format!("{id}"),
            "lcv-XYZ_g1".to_owned(),
            "lcs-0123".to_owned(),
            "tp0".to_owned(),
        ] {
            assert_eq!(parse_lv_name(&foreign), None, "{foreign}");
        }
    }

    #[test]
    fn config_is_validated() {
        let parse = |json: &str| serde_json::from_str::<LvmClassConfig>(json);
        let config = parse(r#"{"volumeGroup":"vg0","thinPool":"tp0","overprovisionRatio":2.5}"#)
            .expect("parses");
        assert_eq!(config.thin_pool.as_deref(), Some("tp0"));
        assert!(config.validate().is_ok());
        let config = parse(r#"{"volumeGroup":"vg-data.1"}"#).expect("parses");
        assert_eq!(config.overprovision_ratio, 1.0);
        assert!(config.validate().is_ok());
        assert!(parse(r#"{"volumeGroup":"vg0","thinpool":"tp0"}"#).is_err());
        assert!(parse(r#"{"thinPool":"tp0"}"#).is_err());

        let bad = [
            (r#"{"volumeGroup":""}"#, "empty"),
            (r#"{"volumeGroup":"-vg"}"#, "starts with '-'"),
            (r#"{"volumeGroup":"vg/0"}"#, "contains '/'"),
            (r#"{"volumeGroup":"vg 0"}"#, "contains ' '"),
            (r#"{"volumeGroup":".."}"#, "reserved"),
            (r#"{"volumeGroup":"vg0","thinPool":"tp$"}"#, "contains '$'"),
            (
                r#"{"volumeGroup":"vg0","thinPool":"tp0","overprovisionRatio":0.5}"#,
                "at least 1.0",
            ),
            (
                r#"{"volumeGroup":"vg0","overprovisionRatio":2.0}"#,
                "only to a class with a thinPool",
            ),
        ];
        for (json, expected) in bad {
            let error = parse(json).expect("parses").validate().expect_err(json);
            assert!(error.contains(expected), "{json}: {error}");
        }
        let long = LvmClassConfig {
            volume_group: "v-".repeat(30),
            thin_pool: None,
            overprovision_ratio: 1.0,
        };
        assert!(long.validate().expect_err("too long").contains("too long"));
        let nan = LvmClassConfig {
            volume_group: "vg0".into(),
            thin_pool: Some("tp0".into()),
            overprovision_ratio: f64::NAN,
        };
        assert!(nan.validate().is_err());

        for class in ["", "-x", "a/b", "a=b", &"c".repeat(64)] {
            assert!(validate_class_name(class).is_err(), "{class:?}");
        }
        assert!(validate_class_name("fast-ssd.v2_a").is_ok());
    }

    #[test]
    fn open_checks_the_configuration_and_lvm() {
        let lvm = fake();
        let config = |vg: &str, pool: Option<&str>| LvmClassConfig {
            volume_group: vg.into(),
            thin_pool: pool.map(str::to_owned),
            overprovision_ratio: 1.0,
        };
        let open = |class: &str, config: LvmClassConfig| {
            LvmPool::open(class, &config, lvm.clone()).map(drop)
        };
        let e = open("fast", config("vg9", None)).expect_err("no such VG");
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(e.message.contains("vg9"), "{e}");
        let e = open("fast", config("vg0", Some("tp9"))).expect_err("no such pool");
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(e.message.contains("vg0/tp9"), "{e}");
        let e = open("bad/class", config("vg0", None)).expect_err("bad class");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let e = open("fast", config("-vg", None)).expect_err("bad VG name");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        // A linear LV is not a thin pool.
        lvm.add_foreign_linear("vg0", "lin", 4 * MIB, &[]);
        let e = open("fast", config("vg0", Some("lin"))).expect_err("not a pool");
        assert!(e.message.contains("not a thin pool"), "{e}");

        let pool = thin(&lvm, 1.5);
        assert_eq!(
            pool.describe(),
            "LVM device class fast (thin pool vg0/tp0, overprovisioning up to x1.5)"
        );
        assert!(pool.check().is_ok());
        assert!(pool.instant_clone_supported().expect("answers"));
        assert!(pool.fresh_storage_reads_zeros());
        let pool = thick(&lvm);
        assert_eq!(
            pool.describe(),
            "LVM device class slow (thick, volume group vg0)"
        );
        assert!(!pool.instant_clone_supported().expect("answers"));
        assert!(!pool.fresh_storage_reads_zeros());
        assert!(!pool
            .clone_instant(&data(1), &Storage::Image(snapshot(1)))
            .expect("answers"));

        // A pool that does not zero new blocks: fresh thin LVs may show
        // old data in partly written chunks.
        let unzeroed = Arc::new(FakeLvm::new());
        unzeroed.add_volume_group("vg0", 1024 * MIB, EXTENT);
        unzeroed.add_thin_pool("vg0", "tp0", 200 * MIB, false);
        assert!(!thin(&unzeroed, 1.0).fresh_storage_reads_zeros());
    }

    #[test]
    fn create_tags_rounds_and_never_reuses() {
        let lvm = fake();
        let pool = thick(&lvm);
        let item = data(1);
        assert!(!pool.exists(&item).expect("answers"));
        pool.create(&item, 5 * MIB + 512).expect("created");
        assert!(pool.exists(&item).expect("answers"));
        // Rounded up to whole extents.
        assert_eq!(pool.size(&item).expect("size"), 8 * MIB);
        let lv = lvm
            .logical_volume("vg0", &lv_name(&item))
            .expect("reads")
            .expect("exists");
        assert_eq!(
            lv.tags,
            [
                "liveclone",
                "liveclone.io/class=slow",
                "liveclone.io/kind=data",
                &format!("liveclone.io/volume={}", volume(1)),
            ]
        );
        assert_eq!(lv.lv_type, LvType::Plain);
        let e = pool.create(&item, MIB).expect_err("exists");
        assert_eq!(e.code, ErrorCode::AlreadyExists);
        // Not zeroed: only metadata is.
        assert!(!lvm.is_zeroed("vg0", &lv_name(&item)));
        assert_eq!(
            pool.create(&data(2), 0).expect_err("empty").code,
            ErrorCode::InvalidArgument
        );
        let e = pool.size(&data(3)).expect_err("absent");
        assert_eq!(e.code, ErrorCode::NotFound);
    }

    #[test]
    fn metadata_is_zeroed_at_creation_and_removed_when_that_fails() {
        let lvm = fake();
        for pool in [thick(&lvm), thin(&lvm, 1.0)] {
            let n = if pool.thin.is_some() { 2 } else { 1 };
            let item = Storage::Metadata(volume(n));
            pool.create(&item, 2 * MIB).expect("created");
            assert!(lvm.is_zeroed("vg0", &lv_name(&item)), "{}", pool.describe());

            let other = Storage::Metadata(volume(n + 10));
            lvm.fail_next("zero", LvmErrorKind::Failed);
            let e = pool.create(&other, 2 * MIB).expect_err("zeroing fails");
            assert!(e.message.contains("zeroing the new"), "{e}");
            assert!(!pool.exists(&other).expect("answers"), "left behind");
            pool.create(&other, 2 * MIB)
                .expect("a retry makes a new one");
            assert!(lvm.is_zeroed("vg0", &lv_name(&other)));
        }
        // In a thin class metadata is a thin LV of the pool.
        let lv = lvm
            .logical_volume("vg0", &lv_name(&Storage::Metadata(volume(2))))
            .expect("reads")
            .expect("exists");
        assert_eq!(lv.pool.as_deref(), Some("tp0"));
    }

    #[test]
    fn thick_space_is_the_volume_groups() {
        let lvm = fake();
        let pool = thick(&lvm);
        // 1024 MiB less the 200 MiB pool.
        let capacity = pool.capacity().expect("capacity");
        assert_eq!(capacity.total_bytes, 1024 * MIB);
        assert_eq!(capacity.available_bytes, 824 * MIB);
        assert_eq!(capacity.thin, None);
        pool.create(&data(1), 100 * MIB).expect("created");
        assert_eq!(
            pool.capacity().expect("capacity").available_bytes,
            724 * MIB
        );
        let e = pool.create(&data(2), 800 * MIB).expect_err("too big");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        assert!(
            e.message.contains("volume group vg0 has 724.0 MiB free")
                && e.message.contains("device class slow"),
            "{e}"
        );
        let e = pool.grow(&data(1), 900 * MIB).expect_err("too big");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        pool.grow(&data(1), 101 * MIB).expect("grows");
        assert_eq!(pool.size(&data(1)).expect("size"), 104 * MIB);
        // Never shrinks.
        pool.grow(&data(1), MIB).expect("no-op");
        assert_eq!(pool.size(&data(1)).expect("size"), 104 * MIB);
    }

    #[test]
    fn thin_overprovisioning_is_limited() {
        let lvm = fake();
        // 200 MiB x 1.5 = 300 MiB of promises.
        let pool = thin(&lvm, 1.5);
        pool.create(&data(1), 200 * MIB).expect("created");
        pool.create(&data(2), 100 * MIB).expect("exactly the limit");
        let e = pool.create(&data(3), MIB).expect_err("over the limit");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        for part in [
            "device class fast",
            "thin pool vg0/tp0",
            "300.0 MiB is provisioned",
            "the limit is 300.0 MiB",
            "overprovisionRatio 1.5",
        ] {
            assert!(e.message.contains(part), "{part}: {e}");
        }
        let e = pool
            .clone_instant(&data(1), &Storage::Image(snapshot(1)))
            .expect_err("a snapshot counts too");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        let e = pool.grow(&data(2), 104 * MIB).expect_err("growing counts");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        // Other thin LVs in the pool count, whoever made them.
        pool.remove(&data(2)).expect("removed");
        lvm.create_thin("vg0", "tp0", "someone-elses", 60 * MIB, &[])
            .expect("created");
        let e = pool.create(&data(3), 44 * MIB).expect_err("over the limit");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        pool.create(&data(3), 40 * MIB).expect("fits");
    }

    #[test]
    fn a_nearly_full_thin_pool_refuses_new_volumes() {
        let lvm = fake();
        let pool = thin(&lvm, 10.0);
        pool.create(&data(1), 10 * MIB).expect("created");
        for (data_used, metadata_used) in [(0.95, 0.1), (0.2, 0.97)] {
            lvm.set_pool_usage("vg0", "tp0", data_used, metadata_used);
            let e = pool.create(&data(2), MIB).expect_err("nearly full");
            assert_eq!(e.code, ErrorCode::ResourceExhausted);
            assert!(
                e.message.contains("thin pool vg0/tp0 is nearly full")
                    && e.message.contains("device class fast"),
                "{e}"
            );
            let e = pool
                .clone_instant(&data(1), &Storage::Image(snapshot(1)))
                .expect_err("nearly full");
            assert_eq!(e.code, ErrorCode::ResourceExhausted);
        }
        lvm.set_pool_usage("vg0", "tp0", 0.94, 0.5);
        pool.create(&data(2), MIB).expect("below the threshold");
    }

    #[test]
    fn thin_capacity_is_the_smaller_of_headroom_and_free_data() {
        let lvm = fake();
        let pool = thin(&lvm, 2.0);
        pool.create(&data(1), 100 * MIB).expect("created");
        lvm.set_pool_usage("vg0", "tp0", 0.25, 0.1);
        let capacity = pool.capacity().expect("capacity");
        assert_eq!(capacity.total_bytes, 400 * MIB);
        // Headroom 300 MiB, free data 150 MiB.
        assert_eq!(capacity.available_bytes, 150 * MIB);
        let usage = capacity.thin.expect("thin figures");
        assert_eq!(usage.data_used, 0.25);
        assert_eq!(usage.metadata_used, 0.1);
        assert_eq!(usage.provisioned_bytes, 100 * MIB);
        // Headroom 100 MiB, free data 150 MiB.
        pool.create(&data(2), 200 * MIB).expect("created");
        assert_eq!(
            pool.capacity().expect("capacity").available_bytes,
            100 * MIB
        );
    }

    #[test]
    fn classes_sharing_a_volume_group_keep_apart() {
        let lvm = fake();
        let slow = thick(&lvm);
        let fast = thin(&lvm, 4.0);
        slow.create(&data(1), MIB).expect("created");
        slow.create(&Storage::Metadata(volume(1)), MIB)
            .expect("created");
        fast.create(&data(2), MIB).expect("created");
        fast.create(&Storage::Image(snapshot(2)), MIB)
            .expect("created");
        // Someone else's LVs: a liveclone-like name without our tag, and
        // an untagged one.
        lvm.add_foreign_linear("vg0", &lv_name(&data(3)), MIB, &["liveclone"]);
        lvm.add_foreign_linear("vg0", "lvol0", MIB, &[]);

        assert_eq!(
            slow.list().expect("lists"),
            vec![data(1), Storage::Metadata(volume(1))]
        );
        assert_eq!(
            fast.list().expect("lists"),
            vec![data(2), Storage::Image(snapshot(2))]
        );
        // Another class's LV is never used or removed.
        let e = slow.exists(&data(2)).expect_err("not ours");
        assert!(
            e.message.contains("not tagged liveclone.io/class=slow"),
            "{e}"
        );
        assert!(slow.remove(&data(2)).is_err());
        assert!(fast.exists(&data(2)).expect("answers"));
        assert_eq!(
            slow.create(&data(3), MIB).expect_err("name taken").code,
            ErrorCode::AlreadyExists
        );
        assert_eq!(
            lvm.logical_volume("vg0", "lvol0")
                .expect("reads")
                .map(|lv| lv.tags),
            Some(vec![])
        );
    }

    #[test]
    fn attach_is_activation_and_detach_deactivation() {
        let lvm = fake();
        let pool = thick(&lvm);
        let item = data(1);
        assert_eq!(
            pool.attach(&item, false).expect_err("absent").code,
            ErrorCode::NotFound
        );
        assert!(pool.attachments(&item).expect("none").is_empty());
        pool.create(&item, 8 * MIB).expect("created");
        let name = lv_name(&item);
        let device = pool.attach(&item, false).expect("attached");
        assert_eq!(device.path, dm_path("vg0", &name));
        assert!(device.path.to_string_lossy().contains("lcv--"));
        assert_eq!(device.size_bytes, 8 * MIB);
        assert!(!device.read_only);
        // Reused, whatever the read-only wish: an LV has one device.
        assert_eq!(pool.attach(&item, true).expect("attached"), device);
        assert_eq!(pool.attachments(&item).expect("one"), vec![device.clone()]);

        lvm.set_open("vg0", &name, true);
        let e = pool.detach(&item).expect_err("open");
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert!(e.message.contains("still open"), "{e}");
        let e = pool.release(&item, &device).expect_err("open");
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        lvm.set_open("vg0", &name, false);

        // Another device is not this LV's.
        let other = BlockDevice {
            minor: device.minor + 100,
            ..device.clone()
        };
        pool.release(&item, &other).expect("nothing to do");
        assert_eq!(pool.attachments(&item).expect("one").len(), 1);
        pool.release(&item, &device).expect("released");
        assert!(pool.attachments(&item).expect("none").is_empty());
        // Activated again on the next attach.
        let again = pool.attach(&item, false).expect("attached");
        assert_eq!(again.path, device.path);
        pool.detach(&item).expect("detached");
        pool.detach(&item).expect("detached twice");
        assert!(pool.holes(&item, MIB).expect("answers").is_empty());

        pool.remove(&item).expect("removed");
        assert!(!pool.exists(&item).expect("answers"));
        pool.remove(&item).expect("absent is success");
    }

    #[test]
    fn a_redirect_rename_keeps_the_device_and_retags() {
        let lvm = fake();
        let pool = thick(&lvm);
        let old = data(1);
        let image = Storage::Image(snapshot(1));
        pool.create(&old, 8 * MIB).expect("created");
        let before = pool.attach(&old, false).expect("attached");
        assert!(!before.read_only);
        pool.create(&image, MIB).expect("created");
        assert_eq!(
            pool.rename(&old, &image).expect_err("target exists").code,
            ErrorCode::AlreadyExists
        );
        pool.remove(&image).expect("removed");
        pool.rename(&old, &image).expect("renamed");
        assert!(!pool.exists(&old).expect("answers"));
        let after = pool.attachments(&image).expect("one");
        assert_eq!(after.len(), 1);
        assert_eq!(
            (after[0].major, after[0].minor),
            (before.major, before.minor)
        );
        assert!(after[0].read_only, "an image's device is read-only");
        let tags_of = |item: &Storage| {
            lvm.logical_volume("vg0", &lv_name(item))
                .expect("reads")
                .expect("exists")
        };
        // The rename is the name alone (it runs while a volume is
        // suspended); the tags follow in relabel.
        assert!(tags_of(&image).has_tag("liveclone.io/kind=data"));
        pool.relabel(&image).expect("relabelled");
        let lv = tags_of(&image);
        assert!(lv.has_tag("liveclone.io/kind=image") && !lv.has_tag("liveclone.io/kind=data"));
        let Storage::Image(snapshot_id) = &image else {
            unreachable!("an image")
        };
        assert!(lv.has_tag(&format!("liveclone.io/snapshot={snapshot_id}")));
        assert!(!lv
            .tags
            .iter()
            .any(|tag| tag.starts_with("liveclone.io/volume=")));
        let calls = lvm.calls().len();
        pool.relabel(&image).expect("again");
        assert_eq!(lvm.calls().len(), calls + 1, "a second relabel only reads");
        assert_eq!(pool.list().expect("lists"), vec![image]);
    }

    #[test]
    fn thin_snapshots_share_the_pool() {
        let lvm = fake();
        let pool = thin(&lvm, 2.0);
        let item = data(1);
        let image = Storage::Image(snapshot(1));
        assert_eq!(
            pool.clone_instant(&item, &image)
                .expect_err("no origin")
                .code,
            ErrorCode::NotFound
        );
        pool.create(&item, 64 * MIB).expect("created");
        assert!(pool.clone_instant(&item, &image).expect("snapshot"));
        let lv = lvm
            .logical_volume("vg0", &lv_name(&image))
            .expect("reads")
            .expect("exists");
        assert_eq!(lv.origin.as_deref(), Some(lv_name(&item).as_str()));
        assert!(lv.has_tag("liveclone.io/kind=image") && lv.has_tag("liveclone.io/class=fast"));
        assert_eq!(
            pool.clone_instant(&item, &image).expect_err("exists").code,
            ErrorCode::AlreadyExists
        );
        let device = pool.attach(&image, true).expect("attached");
        assert!(device.read_only);
        assert_eq!(device.size_bytes, 64 * MIB);
        let usage = pool.capacity().expect("capacity").thin.expect("thin");
        assert_eq!(usage.provisioned_bytes, 128 * MIB);
    }
}
