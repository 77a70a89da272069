//! Sizing rules for a clone: the region size, the metadata volume, the
//! hydration tunables, and the StorageClass parameters that override them.
//!
//! The kernel's limits live in [`crate::os::dm`]; this module only adds
//! policy on top of them.

use crate::domain::device_class::DeviceClassName;
use std::collections::BTreeMap;

use crate::os::dm::{
    CloneCoreArgs, CloneMessage, RegionSize, RegionSizeError, Sectors, MAX_REGIONS,
    METADATA_MAX_SECTORS, MIN_REGION_SECTORS, SECTOR_BYTES,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Most regions the automatic policy gives a clone: 2^18, as many as a
/// 16 GiB volume has at [`AUTO_REGION_FLOOR_BYTES`] (64 KiB).
///
/// Everything dm-clone does per region costs the same for every clone
/// under this cap, whatever its size: discards before hydration (the
/// source's holes, the trim) mark each region in the in-core bitmaps and
/// again in the on-disk bitset at the next commit (one bit at a time: with
/// 2^24 regions, an earlier cap, a 64 GiB clone's trim took 8 s in the test
/// VM against 0.5 s for 1 GiB), and kernel memory is three in-core bitmaps
/// of one bit per region (the hydrated-region map and two dirty maps in
/// `dm-clone-metadata.c`) plus the on-disk bitset's blocks cached by
/// dm-bufio: 3 to 4 bits per region, so at most 96 to 128 KiB per clone,
/// for any volume size.
///
/// The price is region size, since a write smaller than a region to an
/// unhydrated region first copies the whole region: 64 KiB regions up to
/// 16 GiB, 256 KiB at 64 GiB, 4 MiB at 1 TiB, 64 MiB at 16 TiB. That cost
/// lasts only until the region is hydrated, and a StorageClass can choose
/// smaller regions (`liveclone.io/regionSize`) for large volumes with
/// random small writes, trading kernel memory and setup time for it.
pub const AUTO_REGION_COUNT_CAP: u64 = 1 << 18;

/// The smallest region the automatic policy gives: 64 KiB.
///
/// Background hydration is bound by per-region and per-copy work (dm-clone
/// walks its bitmap, batches and tracks regions one by one; kcopyd splits
/// every copy into sub-jobs), so tiny regions slow it down: with 64 KiB
/// and 4 KiB regions hydrating the same 1 GiB alternately in one run
/// (docs/BENCHMARKS.md, figure 2, runs Q to T), 64 KiB was 14% to 123%
/// faster in each of eight neighbouring pairs. Larger regions also mean less
/// kernel memory (about 6 KiB per GiB of clone, against 96 KiB at 4 KiB).
/// Discards only mark whole regions, so the hole skipping and the trim
/// could skip slightly less; for ext4, which allocates in extents, the
/// copied bytes did not change (figure 3: 9.9% of the volume at either
/// size). A write smaller than a region to a region not yet hydrated
/// copies the 64 KiB first, once.
pub const AUTO_REGION_FLOOR_BYTES: u64 = 64 * KIB;

/// The region size for a clone of `source_len` sectors: the smallest power
/// of two from [`AUTO_REGION_FLOOR_BYTES`] that keeps the region count at
/// or below [`AUTO_REGION_COUNT_CAP`], counting a partial last region; i.e.
/// max(64 KiB, source / 2^18) rounded up to a power of two.
pub fn auto_region_size(source_len: Sectors) -> Result<RegionSize, SizingError> {
    if source_len == Sectors::ZERO {
        return Err(SizingError::EmptySource);
    }
    smallest_region_with_at_most(source_len, AUTO_REGION_COUNT_CAP, AUTO_REGION_FLOOR_BYTES)
        .ok_or(SizingError::SourceTooLargeForAutoRegion { source_len })
}

/// The region size for a clone: the user's, if given and dm-clone can use
/// it for this source, else [`auto_region_size`]. A user's region size may
/// exceed the automatic cap (trading kernel memory for smaller copies); it
/// is held only to the kernel's limit of [`MAX_REGIONS`].
pub fn choose_region_size(
    source_len: Sectors,
    requested: Option<RegionSize>,
) -> Result<RegionSize, SizingError> {
    let Some(region_size) = requested else {
        return auto_region_size(source_len);
    };
    if source_len == Sectors::ZERO {
        return Err(SizingError::EmptySource);
    }
    let regions = region_size.regions_in(source_len);
    if regions <= MAX_REGIONS {
        return Ok(region_size);
    }
    Err(
        match smallest_region_with_at_most(source_len, MAX_REGIONS, 0) {
            Some(smallest_fitting) => SizingError::TooManyRegions {
                region_size,
                source_len,
                regions,
                smallest_fitting,
            },
            None => SizingError::SourceTooLarge { source_len },
        },
    )
}

/// The smallest region size of at least `floor_bytes` that gives at most
/// `max_regions` regions.
fn smallest_region_with_at_most(
    source_len: Sectors,
    max_regions: u64,
    floor_bytes: u64,
) -> Option<RegionSize> {
    std::iter::successors(Some(RegionSize::MIN), |region| region.doubled()).find(|region| {
        region.bytes() >= floor_bytes && region.regions_in(source_len) <= max_regions
    })
}

/// The fixed part of the metadata floor: superblock, space maps and btree
/// roots, with room to spare.
const METADATA_FIXED_BYTES: u64 = MIB;
/// Metadata volumes are sized in whole MiB.
const METADATA_GRANULE_BYTES: u64 = MIB;

// The largest size we ask for is one dm-clone can use in full.
const _: () = assert!(
    2 * (MAX_REGIONS / 4 + METADATA_FIXED_BYTES) + METADATA_GRANULE_BYTES
        <= METADATA_MAX_SECTORS * SECTOR_BYTES
);

/// Size of the metadata volume for a clone of `regions` regions:
/// 2 × (regions / 4 + 1 MiB), rounded up to a whole MiB.
///
/// dm-clone's metadata is a bitset of one bit per region in 4 KiB blocks
/// (32576 bits per block) plus a few blocks of superblock, space map and
/// btree. Commits are copy-on-write, so a transaction can need the old and
/// the new copy of every block it touches: `regions / 4 + 1 MiB` (two bits
/// per region) is the field notes' safe floor, already about twice the
/// steady use. We allocate twice the floor, because metadata that runs out
/// of space can crash the kernel (a dm-bufio BUG was hit in testing), not
/// merely turn the clone read-only. At the 2^31-region maximum this is
/// 1026 MiB, far below dm-clone's 15.9 GiB metadata limit; for 1 TiB at
/// 64 KiB regions it is 10 MiB.
pub fn metadata_bytes(regions: u64) -> Result<u64, SizingError> {
    if regions > MAX_REGIONS {
        return Err(SizingError::RegionCountOverLimit { regions });
    }
    // No overflow: regions <= 2^31.
    let floor = regions.div_ceil(4) + METADATA_FIXED_BYTES;
    Ok((2 * floor).next_multiple_of(METADATA_GRANULE_BYTES))
}

/// Data per hydration copy the defaults aim for: 4 MiB. kcopyd splits a
/// copy larger than its sub-job size (512 KiB by default) into 8 sub-jobs
/// running in parallel (`SPLIT_COUNT` in `dm-kcopyd.c`), so 4 MiB gives each
/// sub-job one full-sized chunk, and the source is read in large
/// sequential pieces however small the regions are.
pub const TARGET_BATCH_BYTES: u64 = 4 * MIB;

/// Data in flight per clone the defaults aim for: 16 MiB, four batches, so
/// that reading the source and writing the destination overlap. dm-clone
/// starts no new copy while user I/O is in flight, but copies already
/// issued run on: this bounds what user I/O may queue behind.
pub const TARGET_IN_FLIGHT_BYTES: u64 = 16 * MIB;

/// Most data in flight a user override may ask for: 256 MiB per clone.
/// Beyond it hydration gains little on any device, while user I/O of every
/// clone on the node waits behind it. One region is always allowed, even
/// when a region alone is larger.
pub const MAX_IN_FLIGHT_BYTES: u64 = 256 * MIB;

/// The largest threshold or batch size, in regions, that any region size
/// allows: [`MAX_IN_FLIGHT_BYTES`] of 4 KiB regions (65536). Used to refuse
/// absurd StorageClass values before the region size is known.
pub const MAX_TUNABLE_REGIONS: u32 =
    (MAX_IN_FLIGHT_BYTES / (MIN_REGION_SECTORS * SECTOR_BYTES)) as u32;

/// dm-clone's hydration tunables, in regions.
///
/// `threshold` caps the regions being copied at once; `batch_size` is how
/// many contiguous regions go into one copy. The kernel defaults (1 and 1)
/// copy one region at a time: with 4 KiB regions that is a few MiB/s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HydrationTunables {
    pub threshold: u32,
    pub batch_size: u32,
}

impl HydrationTunables {
    /// Batches of about [`TARGET_BATCH_BYTES`] (at least one region) and
    /// about [`TARGET_IN_FLIGHT_BYTES`] in flight (at least one batch).
    /// 4 KiB regions: batch 1024, threshold 4096; 64 KiB: 64 and 256;
    /// 1 MiB: 4 and 16; 16 MiB and up: 1 and 1.
    pub fn defaults_for(region_size: RegionSize) -> Self {
        let batch_size = regions_in_bytes(TARGET_BATCH_BYTES, region_size);
        let threshold = regions_in_bytes(TARGET_IN_FLIGHT_BYTES, region_size).max(batch_size);
        HydrationTunables {
            threshold,
            batch_size,
        }
    }

    /// The defaults for `region_size` with the user's overrides applied,
    /// then validated. Overriding one tunable adjusts the other's default
    /// to stay consistent: a larger batch raises the threshold to the
    /// batch, a smaller threshold lowers the batch to the threshold.
    pub fn resolve(
        region_size: RegionSize,
        threshold: Option<u32>,
        batch_size: Option<u32>,
    ) -> Result<Self, SizingError> {
        let defaults = Self::defaults_for(region_size);
        let tunables = match (threshold, batch_size) {
            (None, None) => defaults,
            (Some(threshold), None) => HydrationTunables {
                threshold,
                batch_size: defaults.batch_size.min(threshold),
            },
            (None, Some(batch_size)) => HydrationTunables {
                threshold: defaults.threshold.max(batch_size),
                batch_size,
            },
            (Some(threshold), Some(batch_size)) => HydrationTunables {
                threshold,
                batch_size,
            },
        };
        tunables.validate(region_size)?;
        Ok(tunables)
    }

    /// Both at least 1; the threshold at most [`MAX_IN_FLIGHT_BYTES`] of
    /// regions (at least 1); the batch at most the threshold, since the
    /// kernel stops adding regions to a batch once the threshold's worth is
    /// in flight (`do_hydration`), so a larger batch never fills.
    pub fn validate(&self, region_size: RegionSize) -> Result<(), SizingError> {
        if self.threshold == 0 {
            return Err(SizingError::ZeroTunable {
                name: "hydration threshold",
            });
        }
        if self.batch_size == 0 {
            return Err(SizingError::ZeroTunable {
                name: "hydration batch size",
            });
        }
        let max_threshold = regions_in_bytes(MAX_IN_FLIGHT_BYTES, region_size);
        if self.threshold > max_threshold {
            return Err(SizingError::ThresholdTooLarge {
                threshold: self.threshold,
                region_size,
                max_threshold,
            });
        }
        if self.batch_size > self.threshold {
            return Err(SizingError::BatchLargerThanThreshold {
                batch_size: self.batch_size,
                threshold: self.threshold,
            });
        }
        Ok(())
    }

    /// As core arguments of a clone table, so that they hold from the load.
    pub fn core_args(&self) -> CloneCoreArgs {
        CloneCoreArgs {
            hydration_threshold: Some(self.threshold),
            hydration_batch_size: Some(self.batch_size),
        }
    }

    /// As messages, to change them on a loaded clone.
    pub fn messages(&self) -> [CloneMessage; 2] {
        [
            CloneMessage::HydrationThreshold(self.threshold),
            CloneMessage::HydrationBatchSize(self.batch_size),
        ]
    }
}

/// How many regions of `region_size` fit in `bytes`, at least 1 and at most
/// `u32::MAX`.
fn regions_in_bytes(bytes: u64, region_size: RegionSize) -> u32 {
    let regions = (bytes / region_size.bytes()).max(1);
    u32::try_from(regions).unwrap_or(u32::MAX)
}

/// The prefix of our StorageClass parameters.
pub const PARAMETER_PREFIX: &str = "liveclone.io/";
/// Region size in bytes: plain (`65536`) or with a binary suffix (`64KiB`).
pub const REGION_SIZE_KEY: &str = "liveclone.io/regionSize";
/// Hydration threshold, in regions.
pub const HYDRATION_THRESHOLD_KEY: &str = "liveclone.io/hydrationThreshold";
/// Hydration batch size, in regions.
pub const HYDRATION_BATCH_SIZE_KEY: &str = "liveclone.io/hydrationBatchSize";
/// The node's device class (pool) that holds the volume; absent: the
/// default class.
pub const DEVICE_CLASS_KEY: &str = "liveclone.io/deviceClass";

const REGION_SIZE_ALLOWED: &str = "expected a power of two from 4KiB to 1GiB, as a number of \
     bytes (65536) or with a binary suffix: KiB, MiB, GiB (or Ki, Mi, Gi), e.g. 4KiB, 64KiB, 1MiB";

/// The clone settings a StorageClass may give. Each is checked on its own
/// here; [`CloneParameters::plan`] checks them against the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CloneParameters {
    pub region_size: Option<RegionSize>,
    pub hydration_threshold: Option<u32>,
    pub hydration_batch_size: Option<u32>,
}

/// A StorageClass parameter we cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    #[error(
        "unknown StorageClass parameter `{key}`; liveclone.io/ parameters are \
         {REGION_SIZE_KEY}, {HYDRATION_THRESHOLD_KEY}, {HYDRATION_BATCH_SIZE_KEY} and \
         {DEVICE_CLASS_KEY}"
    )]
    UnknownKey { key: String },
    #[error("StorageClass parameter `{key}` = `{value}`: {reason}")]
    InvalidValue {
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// Reads our settings from StorageClass parameters. Keys outside
/// `liveclone.io/` (such as `csi.storage.k8s.io/fstype`) belong to others
/// and are ignored; an unknown key under our prefix is an error, so that a
/// typo is not silently ignored.
pub fn parse_parameters(
    parameters: &BTreeMap<String, String>,
) -> Result<CloneParameters, ParameterError> {
    let mut result = CloneParameters::default();
    for (key, value) in parameters {
        if !key.starts_with(PARAMETER_PREFIX) {
            continue;
        }
        match key.as_str() {
            REGION_SIZE_KEY => result.region_size = Some(parse_region_size(value)?),
            HYDRATION_THRESHOLD_KEY => {
                result.hydration_threshold = Some(parse_tunable(HYDRATION_THRESHOLD_KEY, value)?);
            }
            HYDRATION_BATCH_SIZE_KEY => {
                result.hydration_batch_size = Some(parse_tunable(HYDRATION_BATCH_SIZE_KEY, value)?);
            }
            // Checked here so that a bad name fails with the others;
            // read by `device_class_parameter`.
            DEVICE_CLASS_KEY => {
                parse_device_class(value)?;
            }
            _ => return Err(ParameterError::UnknownKey { key: key.clone() }),
        }
    }
    Ok(result)
}

/// The device class a StorageClass names, if any.
pub fn device_class_parameter(
    parameters: &BTreeMap<String, String>,
) -> Result<Option<DeviceClassName>, ParameterError> {
    parameters
        .get(DEVICE_CLASS_KEY)
        .map(|value| parse_device_class(value))
        .transpose()
}

fn parse_device_class(value: &str) -> Result<DeviceClassName, ParameterError> {
    value
        .parse()
        .map_err(|reason| ParameterError::InvalidValue {
            key: DEVICE_CLASS_KEY,
            value: value.to_owned(),
            reason,
        })
}

fn parse_region_size(value: &str) -> Result<RegionSize, ParameterError> {
    let invalid = |reason: String| ParameterError::InvalidValue {
        key: REGION_SIZE_KEY,
        value: value.to_owned(),
        reason,
    };
    let bytes =
        parse_byte_size(value.trim()).ok_or_else(|| invalid(REGION_SIZE_ALLOWED.to_owned()))?;
    RegionSize::from_bytes(bytes).map_err(|error| {
        let why = match error {
            // The sector counts in these messages would confuse someone
            // who wrote bytes: say it in bytes.
            RegionSizeError::NotSectorMultiple { .. } | RegionSizeError::NotPowerOfTwo { .. } => {
                format!("{bytes} bytes is not a power of two")
            }
            RegionSizeError::TooSmall { .. } => format!("{bytes} bytes is below 4KiB"),
            RegionSizeError::TooLarge { .. } => format!("{bytes} bytes is above 1GiB"),
        };
        invalid(format!("{why}; {REGION_SIZE_ALLOWED}"))
    })
}

/// `<digits>[suffix]` with a binary suffix; `None` for anything else,
/// including decimal suffixes (`K`, `MB`), which would be ambiguous.
pub fn parse_byte_size(value: &str) -> Option<u64> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let multiplier = match suffix {
        "" => 1,
        "Ki" | "KiB" => KIB,
        "Mi" | "MiB" => MIB,
        "Gi" | "GiB" => GIB,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(multiplier)
}

fn parse_tunable(key: &'static str, value: &str) -> Result<u32, ParameterError> {
    let trimmed = value.trim();
    trimmed
        .parse::<u32>()
        .ok()
        .filter(|n| {
            trimmed.bytes().all(|b| b.is_ascii_digit()) && (1..=MAX_TUNABLE_REGIONS).contains(n)
        })
        .ok_or_else(|| ParameterError::InvalidValue {
            key,
            value: value.to_owned(),
            reason: format!(
                "expected a whole number of regions from 1 to {MAX_TUNABLE_REGIONS} \
                 (and at most {} MiB in flight at the clone's region size)",
                MAX_IN_FLIGHT_BYTES / MIB
            ),
        })
}

/// Everything sized for one clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClonePlan {
    pub region_size: RegionSize,
    /// Regions of the clone target, a partial last region included.
    pub region_count: u64,
    pub metadata_bytes: u64,
    pub tunables: HydrationTunables,
}

impl CloneParameters {
    /// Sizes a clone of a source of `source_len` sectors with these
    /// settings.
    pub fn plan(&self, source_len: Sectors) -> Result<ClonePlan, SizingError> {
        let region_size = choose_region_size(source_len, self.region_size)?;
        let region_count = region_size.regions_in(source_len);
        Ok(ClonePlan {
            region_size,
            region_count,
            metadata_bytes: metadata_bytes(region_count)?,
            tunables: HydrationTunables::resolve(
                region_size,
                self.hydration_threshold,
                self.hydration_batch_size,
            )?,
        })
    }
}

/// A clone that cannot be sized as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    #[error("the source is empty; a clone needs at least one sector")]
    EmptySource,
    #[error(
        "a source of {} sectors needs more than {AUTO_REGION_COUNT_CAP} regions even at \
         dm-clone's largest region size (1GiB); give a region size explicitly",
        source_len.0
    )]
    SourceTooLargeForAutoRegion { source_len: Sectors },
    #[error(
        "a source of {} sectors is larger than dm-clone can clone \
         ({MAX_REGIONS} regions of 1GiB)",
        source_len.0
    )]
    SourceTooLarge { source_len: Sectors },
    #[error(
        "region size {} bytes gives {regions} regions for a source of {} sectors, \
         more than dm-clone's limit of {MAX_REGIONS}; the smallest region size that fits is {} bytes",
        region_size.bytes(), source_len.0, smallest_fitting.bytes()
    )]
    TooManyRegions {
        region_size: RegionSize,
        source_len: Sectors,
        regions: u64,
        smallest_fitting: RegionSize,
    },
    #[error("{regions} regions is more than dm-clone's limit of {MAX_REGIONS}")]
    RegionCountOverLimit { regions: u64 },
    #[error("the {name} must be at least 1 region")]
    ZeroTunable { name: &'static str },
    #[error(
        "a hydration threshold of {threshold} regions of {} bytes puts more than {} MiB \
         in flight; at most {max_threshold} regions at this region size",
        region_size.bytes(), MAX_IN_FLIGHT_BYTES / MIB
    )]
    ThresholdTooLarge {
        threshold: u32,
        region_size: RegionSize,
        max_threshold: u32,
    },
    #[error(
        "a hydration batch size of {batch_size} regions is larger than the threshold of \
         {threshold}: the kernel stops adding to a batch at the threshold, so it never fills"
    )]
    BatchLargerThanThreshold { batch_size: u32, threshold: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::dm::MAX_REGION_SECTORS;
    use proptest::prelude::*;

    const TIB: u64 = 1 << 40;

    fn bytes(n: u64) -> Sectors {
        Sectors::from_bytes(n).expect("whole sectors")
    }

    fn region_bytes(n: u64) -> RegionSize {
        RegionSize::from_bytes(n).expect("valid region size")
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn auto_region_size_examples() {
        let cases = [
            // A volume smaller than a region: one partial region.
            (512, 64 * KIB),
            (MIB, 64 * KIB),
            (GIB, 64 * KIB),
            // 16 GiB at 64 KiB is exactly the cap; one sector more doubles.
            (16 * GIB, 64 * KIB),
            (16 * GIB + 512, 128 * KIB),
            (32 * GIB, 128 * KIB),
            (64 * GIB, 256 * KIB),
            (TIB, 4 * MIB),
            (16 * TIB, 64 * MIB),
        ];
        for (volume, expected) in cases {
            let region = auto_region_size(bytes(volume)).expect("sizable");
            assert_eq!(region.bytes(), expected, "volume of {volume} bytes");
        }
        // 1 TiB at 4 MiB regions is exactly the cap: 96 KiB at 3 bits per
        // region.
        let tib_regions = region_bytes(4 * MIB).regions_in(bytes(TIB));
        assert_eq!(tib_regions, AUTO_REGION_COUNT_CAP);
        assert_eq!(tib_regions * 3 / 8, 96 * KIB);
        // The floor bounds memory per byte of small clones too: a 1 GiB
        // clone has 16384 regions (6 KiB at 3 bits each), so a TiB of
        // such clones holds 6 MiB of bitmaps, not 96 MiB as at 4 KiB.
        let gib_regions = region_bytes(64 * KIB).regions_in(bytes(GIB));
        assert_eq!(gib_regions, 1 << 14);
        assert_eq!(gib_regions * 3 / 8 * 1024, 6 * MIB);
        assert_eq!(
            auto_region_size(Sectors::ZERO),
            Err(SizingError::EmptySource)
        );
        // Beyond 2^18 regions of 1 GiB (256 TiB) the policy gives up.
        let huge = Sectors(AUTO_REGION_COUNT_CAP * MAX_REGION_SECTORS + 1);
        assert_eq!(
            auto_region_size(huge),
            Err(SizingError::SourceTooLargeForAutoRegion { source_len: huge })
        );
    }

    #[test]
    fn region_override_is_held_to_the_kernel_limit_only() {
        // Above the automatic cap, within the kernel's: accepted.
        let small = region_bytes(4 * KIB);
        assert_eq!(choose_region_size(bytes(TIB), Some(small)), Ok(small));
        // 8 TiB at 4 KiB regions is exactly 2^31 regions.
        assert_eq!(choose_region_size(bytes(8 * TIB), Some(small)), Ok(small));
        let over = bytes(8 * TIB + 512);
        let error = choose_region_size(over, Some(small)).expect_err("too many regions");
        assert_eq!(
            error,
            SizingError::TooManyRegions {
                region_size: small,
                source_len: over,
                regions: MAX_REGIONS + 1,
                smallest_fitting: region_bytes(8 * KIB),
            }
        );
        let message = error.to_string();
        assert!(message.contains("8192 bytes"), "{message}");
        assert_eq!(
            choose_region_size(Sectors(u64::MAX), Some(RegionSize::MAX)),
            Err(SizingError::SourceTooLarge {
                source_len: Sectors(u64::MAX)
            })
        );
        assert_eq!(
            choose_region_size(Sectors::ZERO, Some(small)),
            Err(SizingError::EmptySource)
        );
        assert_eq!(
            choose_region_size(bytes(TIB), None),
            Ok(region_bytes(4 * MIB))
        );
    }

    #[test]
    fn metadata_examples() {
        // 4 GiB at 4 KiB regions: 2^20 regions. The kernel crashed with
        // 40 blocks (160 KiB) here; we give 3 MiB.
        assert_eq!(metadata_bytes(1 << 20), Ok(3 * MIB));
        assert_eq!(metadata_bytes(0), Ok(2 * MIB));
        assert_eq!(metadata_bytes(1), Ok(3 * MIB));
        assert_eq!(metadata_bytes(AUTO_REGION_COUNT_CAP), Ok(3 * MIB));
        assert_eq!(metadata_bytes(MAX_REGIONS), Ok(1026 * MIB));
        assert_eq!(
            metadata_bytes(MAX_REGIONS + 1),
            Err(SizingError::RegionCountOverLimit {
                regions: MAX_REGIONS + 1
            })
        );
    }

    /// The field notes' floor, regions/4 + 1 MiB.
    fn metadata_floor(regions: u64) -> u64 {
        regions / 4 + MIB
    }

    /// Steady metadata use: one bitset block per 32576 regions plus a few.
    fn metadata_used_estimate(regions: u64) -> u64 {
        (regions.div_ceil(32_576) + 16) * 4 * KIB
    }

    #[test]
    fn tunable_defaults() {
        let cases = [
            (4 * KIB, 4096, 1024),
            (64 * KIB, 256, 64),
            (MIB, 16, 4),
            (4 * MIB, 4, 1),
            (16 * MIB, 1, 1),
            (GIB, 1, 1),
        ];
        for (region, threshold, batch_size) in cases {
            let region = region_bytes(region);
            let defaults = HydrationTunables::defaults_for(region);
            assert_eq!(
                defaults,
                HydrationTunables {
                    threshold,
                    batch_size
                },
                "{region:?}"
            );
            assert_eq!(defaults.validate(region), Ok(()));
        }
    }

    #[test]
    fn tunable_overrides() {
        let region = region_bytes(64 * KIB);
        assert_eq!(
            HydrationTunables::resolve(region, Some(32), None),
            Ok(HydrationTunables {
                threshold: 32,
                batch_size: 32
            })
        );
        assert_eq!(
            HydrationTunables::resolve(region, None, Some(1024)),
            Ok(HydrationTunables {
                threshold: 1024,
                batch_size: 1024
            })
        );
        assert_eq!(
            HydrationTunables::resolve(region, Some(8), Some(16)),
            Err(SizingError::BatchLargerThanThreshold {
                batch_size: 16,
                threshold: 8
            })
        );
        assert_eq!(
            HydrationTunables::resolve(region, Some(0), None),
            Err(SizingError::ZeroTunable {
                name: "hydration threshold"
            })
        );
        assert_eq!(
            HydrationTunables::resolve(region, None, Some(0)),
            Err(SizingError::ZeroTunable {
                name: "hydration batch size"
            })
        );
        // 256 MiB of 64 KiB regions is 4096.
        assert!(HydrationTunables::resolve(region, Some(4096), None).is_ok());
        assert_eq!(
            HydrationTunables::resolve(region, Some(4097), None),
            Err(SizingError::ThresholdTooLarge {
                threshold: 4097,
                region_size: region,
                max_threshold: 4096
            })
        );
        // One region is always allowed, even a 1 GiB one.
        assert!(HydrationTunables::resolve(RegionSize::MAX, Some(1), Some(1)).is_ok());
        assert!(HydrationTunables::resolve(RegionSize::MAX, Some(2), None).is_err());

        let tunables = HydrationTunables {
            threshold: 256,
            batch_size: 64,
        };
        assert_eq!(
            tunables.messages().map(|m| m.to_string()),
            [
                "hydration_threshold 256".to_owned(),
                "hydration_batch_size 64".to_owned()
            ]
        );
        assert_eq!(
            tunables.core_args(),
            CloneCoreArgs {
                hydration_threshold: Some(256),
                hydration_batch_size: Some(64)
            }
        );
    }

    #[test]
    fn parameters_parse() {
        assert_eq!(
            parse_parameters(&BTreeMap::new()),
            Ok(CloneParameters::default())
        );
        let parsed = parse_parameters(&params(&[
            (REGION_SIZE_KEY, "64KiB"),
            (HYDRATION_THRESHOLD_KEY, "512"),
            (HYDRATION_BATCH_SIZE_KEY, " 128 "),
            ("csi.storage.k8s.io/fstype", "xfs"),
            ("other.example.com/whatever", "x"),
        ]))
        .expect("valid parameters");
        assert_eq!(
            parsed,
            CloneParameters {
                region_size: Some(region_bytes(64 * KIB)),
                hydration_threshold: Some(512),
                hydration_batch_size: Some(128),
            }
        );
        for (value, expected) in [
            ("4096", 4 * KIB),
            ("4KiB", 4 * KIB),
            ("4Ki", 4 * KIB),
            ("1MiB", MIB),
            ("2Mi", 2 * MIB),
            ("1GiB", GIB),
            ("1Gi", GIB),
        ] {
            let parsed =
                parse_parameters(&params(&[(REGION_SIZE_KEY, value)])).expect("valid region size");
            assert_eq!(
                parsed.region_size.map(RegionSize::bytes),
                Some(expected),
                "{value}"
            );
        }
    }

    #[test]
    fn parameter_errors_name_key_value_and_what_is_allowed() {
        let error = parse_parameters(&params(&[("liveclone.io/regionsize", "64KiB")]))
            .expect_err("unknown key");
        assert_eq!(
            error,
            ParameterError::UnknownKey {
                key: "liveclone.io/regionsize".to_owned()
            }
        );
        assert!(error.to_string().contains(REGION_SIZE_KEY), "{error}");

        for bad in [
            "64K", "64KB", "64kib", "", "KiB", "-4096", "4 KiB", "1.5MiB", "3KiB", "2KiB", "2GiB",
            "4097",
        ] {
            let error = parse_parameters(&params(&[(REGION_SIZE_KEY, bad)]))
                .expect_err("invalid region size");
            let ParameterError::InvalidValue { key, value, reason } = &error else {
                panic!("unexpected error {error:?}");
            };
            assert_eq!((*key, value.as_str()), (REGION_SIZE_KEY, bad));
            assert!(reason.contains("4KiB to 1GiB"), "{reason}");
            let message = error.to_string();
            assert!(
                message.contains(REGION_SIZE_KEY) && message.contains(bad),
                "{message}"
            );
        }
        let error = parse_parameters(&params(&[(REGION_SIZE_KEY, "12KiB")])).expect_err("12 KiB");
        assert!(
            error
                .to_string()
                .contains("12288 bytes is not a power of two"),
            "{error}"
        );
        let error = parse_parameters(&params(&[(REGION_SIZE_KEY, "2KiB")])).expect_err("2 KiB");
        assert!(
            error.to_string().contains("2048 bytes is below 4KiB"),
            "{error}"
        );

        for bad in ["0", "-1", "+5", "1.5", "fast", "65537", "99999999999"] {
            for key in [HYDRATION_THRESHOLD_KEY, HYDRATION_BATCH_SIZE_KEY] {
                let error = parse_parameters(&params(&[(key, bad)])).expect_err("invalid tunable");
                assert!(
                    matches!(&error, ParameterError::InvalidValue { key: k, value, .. } if *k == key && value == bad),
                    "{error:?}"
                );
                assert!(error.to_string().contains("from 1 to 65536"), "{error}");
            }
        }
    }

    #[test]
    fn plan_combines_the_rules() {
        let plan = CloneParameters::default().plan(bytes(TIB)).expect("plan");
        assert_eq!(
            plan,
            ClonePlan {
                region_size: region_bytes(4 * MIB),
                region_count: 1 << 18,
                metadata_bytes: 3 * MIB,
                tunables: HydrationTunables {
                    threshold: 4,
                    batch_size: 1
                },
            }
        );
        // The defaults for a 1 GiB clone: the 64 KiB floor.
        assert_eq!(
            CloneParameters::default().plan(bytes(GIB)),
            Ok(ClonePlan {
                region_size: region_bytes(64 * KIB),
                region_count: 1 << 14,
                metadata_bytes: 3 * MIB,
                tunables: HydrationTunables {
                    threshold: 256,
                    batch_size: 64
                },
            })
        );
        let custom = CloneParameters {
            region_size: Some(region_bytes(4 * KIB)),
            hydration_threshold: Some(65536),
            hydration_batch_size: None,
        };
        let plan = custom.plan(bytes(TIB)).expect("plan");
        assert_eq!(plan.region_count, 1 << 28);
        assert_eq!(plan.metadata_bytes, 130 * MIB);
        assert_eq!(plan.tunables.batch_size, 1024);
        // The same threshold is too much with larger regions.
        let too_much = CloneParameters {
            region_size: Some(region_bytes(64 * KIB)),
            ..custom
        };
        assert!(matches!(
            too_much.plan(bytes(TIB)),
            Err(SizingError::ThresholdTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn auto_region_is_the_smallest_within_the_cap(len in 1u64..=1 << 39) {
            let source_len = Sectors(len);
            let region = auto_region_size(source_len).expect("below 256 TiB");
            prop_assert!(region.regions_in(source_len) <= AUTO_REGION_COUNT_CAP);
            prop_assert!(region.bytes() >= AUTO_REGION_FLOOR_BYTES);
            prop_assert!(region.bytes().is_power_of_two());
            if region.bytes() > AUTO_REGION_FLOOR_BYTES {
                let half = RegionSize::new(region.sectors().0 / 2).expect("valid");
                prop_assert!(half.regions_in(source_len) > AUTO_REGION_COUNT_CAP);
            }
            // max(64 KiB, size / 2^18), rounded up to a power of two.
            let per_cap = (len * SECTOR_BYTES).div_ceil(AUTO_REGION_COUNT_CAP);
            prop_assert_eq!(
                region.bytes(),
                per_cap.next_power_of_two().max(AUTO_REGION_FLOOR_BYTES)
            );
        }

        /// Volumes from 1 MiB to 64 TiB, whole MiB: at least twice the
        /// floor and about four times the steady use.
        #[test]
        fn metadata_has_headroom(mib in 1u64..=64 * (1 << 20)) {
            let plan = CloneParameters::default()
                .plan(bytes(mib * MIB))
                .expect("plan");
            let floor = metadata_floor(plan.region_count);
            prop_assert!(plan.metadata_bytes >= 2 * floor);
            prop_assert!(plan.metadata_bytes >= 3 * metadata_used_estimate(plan.region_count));
            prop_assert_eq!(plan.metadata_bytes % MIB, 0);
        }

        #[test]
        fn metadata_has_headroom_at_any_region_count(regions in 0..=MAX_REGIONS) {
            let size = metadata_bytes(regions).expect("within the limit");
            prop_assert!(size >= 2 * metadata_floor(regions));
            prop_assert!(size >= 3 * metadata_used_estimate(regions));
            prop_assert!(size <= METADATA_MAX_SECTORS * SECTOR_BYTES);
        }

        #[test]
        fn metadata_is_monotonic(a in 0..=MAX_REGIONS, b in 0..=MAX_REGIONS) {
            let (low, high) = (a.min(b), a.max(b));
            prop_assert!(
                metadata_bytes(low).expect("within the limit")
                    <= metadata_bytes(high).expect("within the limit")
            );
        }

        #[test]
        fn defaults_are_valid_and_bounded(shift in 3u32..=21) {
            let region = RegionSize::new(1 << shift).expect("valid");
            let defaults = HydrationTunables::defaults_for(region);
            prop_assert_eq!(defaults.validate(region), Ok(()));
            let batch_bytes = u64::from(defaults.batch_size) * region.bytes();
            prop_assert!(batch_bytes <= TARGET_BATCH_BYTES.max(region.bytes()));
            prop_assert!(batch_bytes >= TARGET_BATCH_BYTES.min(region.bytes()));
        }

        #[test]
        fn resolved_overrides_are_valid(
            shift in 3u32..=21,
            threshold in proptest::option::of(1u32..=MAX_TUNABLE_REGIONS),
            batch_size in proptest::option::of(1u32..=MAX_TUNABLE_REGIONS),
        ) {
            let region = RegionSize::new(1 << shift).expect("valid");
            if let Ok(tunables) = HydrationTunables::resolve(region, threshold, batch_size) {
                prop_assert_eq!(tunables.validate(region), Ok(()));
                prop_assert!(
                    u64::from(tunables.threshold) * region.bytes()
                        <= MAX_IN_FLIGHT_BYTES.max(region.bytes())
                );
                if let Some(t) = threshold { prop_assert_eq!(tunables.threshold, t); }
                if let Some(b) = batch_size { prop_assert_eq!(tunables.batch_size, b); }
            }
        }

        #[test]
        fn region_size_parameter_round_trips(shift in 12u32..=30) {
            let bytes = 1u64 << shift;
            for text in [bytes.to_string(), format!("{}KiB", bytes / KIB)] {
                let parsed = parse_parameters(&params(&[(REGION_SIZE_KEY, text.as_str())]))
                    .expect("valid");
                prop_assert_eq!(parsed.region_size.map(RegionSize::bytes), Some(bytes));
            }
        }
    }
}
