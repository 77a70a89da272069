//! The dm-clone status line.
//!
//! `clone_status` (STATUSTYPE_INFO) prints, for a working target:
//!
//! ```text
//! <metadata block sectors> <used>/<total metadata blocks> <region sectors>
//! <hydrated>/<total regions> <hydrating regions>
//! <#features> <feature>* 4 hydration_threshold <n> hydration_batch_size <n>
//! rw|ro
//! ```
//!
//! on one line, single spaces. The feature count is always printed, `0`
//! included (`emit_flags`), and the core group is always the count `4`
//! followed by both keys in that order (`emit_core_args`). When the metadata
//! is in fail mode the whole status is `Fail`; when reading the free-block
//! count fails it is `Error`.
//!
//! Read it with the no-flush flag (`dmsetup status --noflush`): without it
//! every read commits metadata and flushes the destination.

use std::fmt;
use std::str::FromStr;

use super::table::CloneFeatures;
use super::{
    parse_decimal, ParseError, RegionSize, Sectors, Tokens, CLONE_TARGET_TYPE, MAX_REGIONS,
};

/// The core-argument count dm-clone always prints: two keys, two values.
const STATUS_CORE_ARGS: u32 = 4;
const HYDRATION_THRESHOLD: &str = "hydration_threshold";
const HYDRATION_BATCH_SIZE: &str = "hydration_batch_size";
const FAIL: &str = "Fail";
const ERROR: &str = "Error";

/// Whether dm-clone may still change its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetadataMode {
    /// `rw`: normal operation.
    ReadWrite,
    /// `ro`: a metadata operation failed; hydration has stopped and writes
    /// to unhydrated regions fail. Needs repair, never a linear switch.
    ReadOnly,
}

impl fmt::Display for MetadataMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MetadataMode::ReadWrite => "rw",
            MetadataMode::ReadOnly => "ro",
        })
    }
}

/// The status of a dm-clone target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CloneStatus {
    /// The target reported its counters. The metadata may still be
    /// read-only: check [`CloneStatusReport::metadata_mode`].
    Active(CloneStatusReport),
    /// `Fail`: the metadata is in fail mode and all I/O fails.
    Fail,
    /// `Error`: the kernel could not read the metadata's free-block count
    /// for this report. Transient or not, nothing else is known.
    Error,
}

/// The counters of a working dm-clone target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CloneStatusReport {
    /// Sectors per metadata block; 8 (4 KiB) in every kernel so far.
    pub metadata_block_sectors: u64,
    pub metadata_used_blocks: u64,
    pub metadata_total_blocks: u64,
    pub region_size: RegionSize,
    /// Regions whose data is on the destination (copied, overwritten whole
    /// or discarded).
    pub hydrated_regions: u64,
    /// All regions of the target, a partial last region included.
    pub total_regions: u64,
    /// Regions being copied right now. Can briefly read one more than the
    /// copies in flight: `do_hydration` counts itself while it runs.
    pub hydrating_regions: u64,
    pub features: CloneFeatures,
    pub hydration_threshold: u32,
    pub hydration_batch_size: u32,
    pub metadata_mode: MetadataMode,
}

impl CloneStatusReport {
    /// Every region is on the destination and no copy is in flight.
    pub fn is_fully_hydrated(&self) -> bool {
        self.hydrated_regions == self.total_regions && self.hydrating_regions == 0
    }

    /// Whether the target may be replaced by a linear table: fully hydrated
    /// with read-write metadata. (The caller still flushes the destination
    /// and suspends first.)
    pub fn may_switch_to_linear(&self) -> bool {
        self.is_fully_hydrated() && self.metadata_mode == MetadataMode::ReadWrite
    }

    pub fn remaining_regions(&self) -> u64 {
        self.total_regions.saturating_sub(self.hydrated_regions)
    }

    /// Hydrated regions times the region size. Counted in whole regions,
    /// like [`Self::total_bytes`], so the two are comparable and equal
    /// exactly when everything is hydrated; it overstates by part of a
    /// region when a partial last region is among the hydrated ones.
    pub fn hydrated_bytes(&self) -> u64 {
        self.hydrated_regions
            .saturating_mul(self.region_size.bytes())
    }

    /// Total regions times the region size: the target's length rounded up
    /// to whole regions, so up to one region minus a sector more than the
    /// target's real length when the last region is partial. The status
    /// line does not carry the length; [`CloneStatusLine::length`] does.
    pub fn total_bytes(&self) -> u64 {
        self.total_regions.saturating_mul(self.region_size.bytes())
    }

    /// Reads the counters form. Returns a [`CloneStatus`] because a line
    /// may still end in `Fail` (see below).
    fn parse(tokens: &mut Tokens<'_>) -> Result<CloneStatus, ParseError> {
        let metadata_block_sectors = tokens.next_number("metadata block sectors")?;
        let (metadata_used_blocks, metadata_total_blocks) =
            parse_fraction(tokens, "metadata blocks used/total")?;
        let region_size = tokens.next_token("region size")?.parse()?;
        let (hydrated_regions, total_regions) = parse_fraction(tokens, "regions hydrated/total")?;
        let hydrating_regions = tokens.next_number("hydrating regions")?;
        let features = CloneFeatures::parse_group(tokens)?;

        let count_token = tokens.next_token("#core args")?;
        let count: u32 = parse_decimal("#core args", count_token)?;
        if count != STATUS_CORE_ARGS {
            // Also catches `2 hydration_threshold 1 hydration_batch_size 1`,
            // a shape the kernel never prints.
            return Err(ParseError::InvalidCount {
                field: "#core args",
                token: count_token.to_owned(),
                reason: "dm-clone's status always has 4 core arguments",
            });
        }
        let hydration_threshold = parse_key_value(tokens, HYDRATION_THRESHOLD)?;
        let hydration_batch_size = parse_key_value(tokens, HYDRATION_BATCH_SIZE)?;

        let mode_token = tokens.next_token("metadata mode")?;
        let metadata_mode = match mode_token {
            "rw" => MetadataMode::ReadWrite,
            "ro" => MetadataMode::ReadOnly,
            // `clone_status` checks for fail mode before printing counters
            // and reads the mode again at the end; if the metadata failed in
            // between, the counters end with `Fail`. The counters are then
            // meaningless: report the failure.
            FAIL => return Ok(CloneStatus::Fail),
            other => {
                return Err(ParseError::InvalidMetadataMode {
                    token: other.to_owned(),
                })
            }
        };

        // The kernel guarantees these; a violation means a misread line.
        let inconsistent = |token: String, reason: &str| {
            Err(ParseError::Inconsistent {
                token,
                reason: reason.to_owned(),
            })
        };
        if metadata_used_blocks > metadata_total_blocks {
            return inconsistent(
                format!("{metadata_used_blocks}/{metadata_total_blocks}"),
                "more metadata blocks used than exist",
            );
        }
        if hydrated_regions > total_regions {
            return inconsistent(
                format!("{hydrated_regions}/{total_regions}"),
                "more regions hydrated than exist",
            );
        }
        if total_regions == 0 || total_regions > MAX_REGIONS {
            return inconsistent(
                total_regions.to_string(),
                "a clone target has from 1 to 2^31 regions",
            );
        }

        Ok(CloneStatus::Active(CloneStatusReport {
            metadata_block_sectors,
            metadata_used_blocks,
            metadata_total_blocks,
            region_size,
            hydrated_regions,
            total_regions,
            hydrating_regions,
            features,
            hydration_threshold,
            hydration_batch_size,
            metadata_mode,
        }))
    }
}

fn parse_fraction(tokens: &mut Tokens<'_>, field: &'static str) -> Result<(u64, u64), ParseError> {
    let token = tokens.next_token(field)?;
    let invalid = || ParseError::InvalidFraction {
        field,
        token: token.to_owned(),
    };
    let (count, total) = token.split_once('/').ok_or_else(invalid)?;
    let count = parse_decimal(field, count).map_err(|_| invalid())?;
    let total = parse_decimal(field, total).map_err(|_| invalid())?;
    Ok((count, total))
}

/// Reads `<key> <value>` where the kernel prints exactly `key`.
fn parse_key_value(tokens: &mut Tokens<'_>, key: &'static str) -> Result<u32, ParseError> {
    match tokens.peek() {
        Some(token) if token == key => {
            tokens.next_token(key)?;
            tokens.next_number(key)
        }
        Some(HYDRATION_THRESHOLD | HYDRATION_BATCH_SIZE) | None => {
            Err(ParseError::MissingCoreArg { key })
        }
        Some(other) => Err(ParseError::UnknownCoreArg {
            token: other.to_owned(),
        }),
    }
}

impl fmt::Display for CloneStatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} {} {}/{} {} ",
            self.metadata_block_sectors,
            self.metadata_used_blocks,
            self.metadata_total_blocks,
            self.region_size,
            self.hydrated_regions,
            self.total_regions,
            self.hydrating_regions,
        )?;
        self.features.write_group(f)?;
        write!(
            f,
            " {STATUS_CORE_ARGS} {HYDRATION_THRESHOLD} {} {HYDRATION_BATCH_SIZE} {} {}",
            self.hydration_threshold, self.hydration_batch_size, self.metadata_mode
        )
    }
}

impl CloneStatus {
    fn parse(tokens: &mut Tokens<'_>) -> Result<Self, ParseError> {
        let status = match tokens.peek() {
            Some(FAIL) => {
                tokens.next_token(FAIL)?;
                CloneStatus::Fail
            }
            Some(ERROR) => {
                tokens.next_token(ERROR)?;
                CloneStatus::Error
            }
            _ => CloneStatusReport::parse(tokens)?,
        };
        Ok(status)
    }

    pub fn report(&self) -> Option<&CloneStatusReport> {
        match self {
            CloneStatus::Active(report) => Some(report),
            CloneStatus::Fail | CloneStatus::Error => None,
        }
    }
}

/// What the kernel prints for one clone target, without the
/// `<start> <length> clone` prefix `dmsetup status` adds.
impl fmt::Display for CloneStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloneStatus::Active(report) => report.fmt(f),
            CloneStatus::Fail => f.write_str(FAIL),
            CloneStatus::Error => f.write_str(ERROR),
        }
    }
}

impl FromStr for CloneStatus {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tokens::parse_all(s, "clone status", CloneStatus::parse)
    }
}

/// One `dmsetup status` line for a clone target:
/// `<start> <length> clone <status>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CloneStatusLine {
    pub start: Sectors,
    pub length: Sectors,
    pub status: CloneStatus,
}

impl CloneStatusLine {
    /// Picks the one clone line out of `dmsetup status` output for a whole
    /// device, which has a line per target (a linear tail prints
    /// `<start> <length> linear` and nothing else).
    pub fn from_dmsetup_output(output: &str) -> Result<Self, ParseError> {
        let mut clone_lines = output
            .lines()
            .filter(|line| line.split_ascii_whitespace().nth(2) == Some(CLONE_TARGET_TYPE));
        let line = clone_lines.next().ok_or(ParseError::NoCloneLine)?;
        if clone_lines.next().is_some() {
            return Err(ParseError::SeveralCloneLines);
        }
        line.parse()
    }

    /// The target's exact length in bytes, when it fits in 64 bits.
    pub fn total_bytes(&self) -> Option<u64> {
        self.length.to_bytes().ok()
    }

    /// Hydrated bytes, capped at the target's length: exact when hydration
    /// is complete or the partial last region (if any) is not yet hydrated,
    /// otherwise at most one region too high.
    pub fn hydrated_bytes(&self) -> Option<u64> {
        let report = self.status.report()?;
        Some(report.hydrated_bytes().min(self.total_bytes()?))
    }
}

impl fmt::Display for CloneStatusLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {CLONE_TARGET_TYPE} {}",
            self.start, self.length, self.status
        )
    }
}

impl FromStr for CloneStatusLine {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tokens = Tokens::new(s);
        let start = Sectors(tokens.next_number("start sector")?);
        let length = Sectors(tokens.next_number("length")?);
        let target_type = tokens.next_token("target type")?;
        if target_type != CLONE_TARGET_TYPE {
            return Err(ParseError::NotACloneTarget {
                token: target_type.to_owned(),
            });
        }
        let status = CloneStatus::parse(&mut tokens)?;
        tokens.finish("clone status")?;
        if let CloneStatus::Active(report) = &status {
            let expected = report.region_size.regions_in(length);
            if report.total_regions != expected {
                return Err(ParseError::Inconsistent {
                    token: report.total_regions.to_string(),
                    reason: format!(
                        "a target of {length} sectors in regions of {} sectors has \
                         {expected} regions",
                        report.region_size
                    ),
                });
            }
        }
        Ok(CloneStatusLine {
            start,
            length,
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::dm::strategies::region_size;
    use crate::os::dm::table::strategies::features;
    use proptest::prelude::*;

    fn region(sectors: u64) -> RegionSize {
        RegionSize::new(sectors).expect("valid region size")
    }

    fn report(line: &str) -> CloneStatusReport {
        match line.parse::<CloneStatusLine>() {
            Ok(CloneStatusLine {
                status: CloneStatus::Active(report),
                ..
            }) => report,
            other => panic!("expected an active status for {line:?}, got {other:?}"),
        }
    }

    /// Lines captured in the VM with `dmsetup status --noflush` (kernel
    /// 6.1.0-56-amd64, dm-clone v1.0.0).
    #[test]
    fn parses_lines_the_kernel_printed() {
        let fresh = report(
            "0 131072 clone 8 6/1024 8 0/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw",
        );
        assert_eq!(
            fresh,
            CloneStatusReport {
                metadata_block_sectors: 8,
                metadata_used_blocks: 6,
                metadata_total_blocks: 1024,
                region_size: region(8),
                hydrated_regions: 0,
                total_regions: 16384,
                hydrating_regions: 0,
                features: CloneFeatures {
                    no_hydration: true,
                    no_discard_passdown: false
                },
                hydration_threshold: 1,
                hydration_batch_size: 1,
                metadata_mode: MetadataMode::ReadWrite,
            }
        );
        assert!(!fresh.is_fully_hydrated());
        assert_eq!(fresh.total_bytes(), 64 << 20);

        // After `enable_hydration`: no features, so the count `0`.
        let done = report(
            "0 131072 clone 8 6/1024 8 16384/16384 0 0 4 hydration_threshold 64 hydration_batch_size 16 rw",
        );
        assert!(done.is_fully_hydrated());
        assert!(done.may_switch_to_linear());
        assert_eq!(done.features, CloneFeatures::default());
        assert_eq!(
            (done.hydration_threshold, done.hydration_batch_size),
            (64, 16)
        );
        assert_eq!(done.hydrated_bytes(), done.total_bytes());

        // Hydrating, with a partial last region: 131068 sectors in
        // 16-sector regions.
        let line: CloneStatusLine =
            "0 131068 clone 8 6/1024 16 907/8192 1 0 4 hydration_threshold 1 hydration_batch_size 1 rw"
                .parse()
                .expect("kernel line");
        let partial = line.status.report().expect("active");
        assert_eq!(partial.hydrating_regions, 1);
        assert_eq!(partial.remaining_regions(), 8192 - 907);
        assert_eq!(partial.total_bytes(), 8192 * 8192);
        assert_eq!(line.total_bytes(), Some(131_068 * 512));
        assert_eq!(line.hydrated_bytes(), Some(907 * 8192));

        // Both features, printed in the kernel's order whatever the table's.
        let both = report(
            "0 131072 clone 8 6/1024 128 0/1024 0 2 no_hydration no_discard_passdown 4 hydration_threshold 9 hydration_batch_size 7 rw",
        );
        assert!(both.features.no_hydration && both.features.no_discard_passdown);

        // One 1 GiB region covering a 64 MiB target.
        let one_region: CloneStatusLine =
            "0 131072 clone 8 6/1024 2097152 0/1 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw"
                .parse()
                .expect("kernel line");
        assert_eq!(one_region.total_bytes(), Some(64 << 20));
        assert_eq!(
            one_region
                .status
                .report()
                .map(CloneStatusReport::total_bytes),
            Some(1 << 30)
        );
    }

    #[test]
    fn picks_the_clone_line_from_dmsetup_output() {
        // The whole `dmsetup status --noflush` output for a clone with a
        // linear tail, as captured (the linear line ends with a space).
        let output = "0 131072 clone 8 6/1024 8 0/16384 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw\n\
                      131072 65536 linear \n";
        let line = CloneStatusLine::from_dmsetup_output(output).expect("one clone line");
        assert_eq!(line.length, Sectors(131_072));
        assert!(line.status.report().is_some());

        assert_eq!(
            CloneStatusLine::from_dmsetup_output("0 131072 linear \n"),
            Err(ParseError::NoCloneLine)
        );
        assert_eq!(
            CloneStatusLine::from_dmsetup_output("0 8 clone Fail\n8 8 clone Fail\n"),
            Err(ParseError::SeveralCloneLines)
        );
    }

    #[test]
    fn fail_and_error_forms() {
        assert_eq!("Fail".parse(), Ok(CloneStatus::Fail));
        assert_eq!("Error".parse(), Ok(CloneStatus::Error));
        assert_eq!(
            "0 131072 clone Fail".parse::<CloneStatusLine>(),
            Ok(CloneStatusLine {
                start: Sectors(0),
                length: Sectors(131_072),
                status: CloneStatus::Fail
            })
        );
        // Fail mode reached while the counters were being printed.
        assert_eq!(
            "8 6/1024 8 0/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 Fail".parse(),
            Ok(CloneStatus::Fail)
        );
        let read_only: CloneStatus =
            "8 6/1024 8 16384/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 ro"
                .parse()
                .expect("ro");
        let read_only = read_only.report().expect("active");
        assert!(read_only.is_fully_hydrated());
        assert!(!read_only.may_switch_to_linear());
    }

    #[test]
    fn refuses_shapes_the_kernel_never_prints() {
        // The shape quoted in the task brief: `clone_status` always prints
        // the core count 4 (`emit_core_args`), never 2.
        assert!(matches!(
            "0 131072 clone 8 72/1024 8 16384/16384 0 1 no_hydration 2 hydration_threshold 1 hydration_batch_size 1 rw"
                .parse::<CloneStatusLine>(),
            Err(ParseError::InvalidCount { field: "#core args", token, .. }) if token == "2"
        ));
        // The feature count is never omitted.
        assert!(matches!(
            "8 6/1024 8 0/16384 0 4 hydration_threshold 1 hydration_batch_size 1 rw".parse::<CloneStatus>(),
            Err(ParseError::InvalidCount { field: "#feature args", token, .. }) if token == "4"
        ));
        assert_eq!(
            "8 6/1024 8 0/16384 0 0 4 hydration_batch_size 1 hydration_threshold 1 rw"
                .parse::<CloneStatus>(),
            Err(ParseError::MissingCoreArg {
                key: HYDRATION_THRESHOLD
            })
        );
        assert_eq!(
            "8 6/1024 8 0/16384 0 0 4 copy_rate 1 hydration_batch_size 1 rw".parse::<CloneStatus>(),
            Err(ParseError::UnknownCoreArg {
                token: "copy_rate".to_owned()
            })
        );
        assert!(matches!(
            "8 6-1024 8 0/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw".parse::<CloneStatus>(),
            Err(ParseError::InvalidFraction { token, .. }) if token == "6-1024"
        ));
        assert_eq!(
            "8 6/1024 8 0/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 RW"
                .parse::<CloneStatus>(),
            Err(ParseError::InvalidMetadataMode {
                token: "RW".to_owned()
            })
        );
        assert_eq!(
            "8 6/1024 8 0/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1"
                .parse::<CloneStatus>(),
            Err(ParseError::Missing {
                expected: "metadata mode"
            })
        );
        assert!(matches!(
            "8 6/1024 8 0/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw extra"
                .parse::<CloneStatus>(),
            Err(ParseError::UnexpectedToken { token, .. }) if token == "extra"
        ));
        assert!(matches!(
            "8 6/1024 8 16385/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw"
                .parse::<CloneStatus>(),
            Err(ParseError::Inconsistent { token, .. }) if token == "16385/16384"
        ));
        assert!(matches!(
            "8 1025/1024 8 0/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw"
                .parse::<CloneStatus>(),
            Err(ParseError::Inconsistent { token, .. }) if token == "1025/1024"
        ));
        // The total must match the line's length.
        assert!(matches!(
            "0 131072 clone 8 6/1024 8 0/16383 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw"
                .parse::<CloneStatusLine>(),
            Err(ParseError::Inconsistent { token, .. }) if token == "16383"
        ));
        assert!(matches!(
            "0 131072 linear ".parse::<CloneStatusLine>(),
            Err(ParseError::NotACloneTarget { token }) if token == "linear"
        ));
        assert!(matches!(
            "8 6/1024 12 0/16384 0 0 4 hydration_threshold 1 hydration_batch_size 1 rw".parse::<CloneStatus>(),
            Err(ParseError::InvalidRegionSize { token, .. }) if token == "12"
        ));
    }

    fn mode() -> impl Strategy<Value = MetadataMode> {
        prop_oneof![Just(MetadataMode::ReadWrite), Just(MetadataMode::ReadOnly)]
    }

    /// A report consistent with a target of `length` sectors.
    fn report_for(length: Sectors) -> impl Strategy<Value = CloneStatusReport> {
        region_size().prop_flat_map(move |region_size| {
            let total_regions = region_size.regions_in(length);
            (
                1u64..=1 << 20,
                0u64..=1 << 20,
                0..=total_regions,
                0u64..=1 << 20,
                features(),
                any::<u32>(),
                any::<u32>(),
                mode(),
            )
                .prop_map(
                    move |(
                        metadata_total_blocks,
                        used_seed,
                        hydrated_regions,
                        hydrating_regions,
                        features,
                        hydration_threshold,
                        hydration_batch_size,
                        metadata_mode,
                    )| {
                        CloneStatusReport {
                            metadata_block_sectors: 8,
                            metadata_used_blocks: used_seed % (metadata_total_blocks + 1),
                            metadata_total_blocks,
                            region_size,
                            hydrated_regions,
                            total_regions,
                            hydrating_regions,
                            features,
                            hydration_threshold,
                            hydration_batch_size,
                            metadata_mode,
                        }
                    },
                )
        })
    }

    fn status_line() -> impl Strategy<Value = CloneStatusLine> {
        (any::<u64>(), 1u64..=1 << 34).prop_flat_map(|(start, length)| {
            let length = Sectors(length);
            prop_oneof![
                8 => report_for(length).prop_map(CloneStatus::Active),
                1 => Just(CloneStatus::Fail),
                1 => Just(CloneStatus::Error),
            ]
            .prop_map(move |status| CloneStatusLine {
                start: Sectors(start),
                length,
                status,
            })
        })
    }

    proptest! {
        #[test]
        fn status_line_round_trips(line in status_line()) {
            prop_assert_eq!(line.to_string().parse::<CloneStatusLine>(), Ok(line.clone()));
            prop_assert_eq!(
                line.status.to_string().parse::<CloneStatus>(),
                Ok(line.status.clone())
            );
            let output = format!("{line}\n{} 8 linear \n", line.length.0);
            prop_assert_eq!(CloneStatusLine::from_dmsetup_output(&output), Ok(line));
        }

        #[test]
        fn byte_helpers_agree(line in status_line()) {
            if let CloneStatus::Active(report) = &line.status {
                let length_bytes = line.length.0 * 512;
                prop_assert!(report.total_bytes() >= length_bytes);
                prop_assert!(report.total_bytes() - length_bytes < report.region_size.bytes());
                prop_assert!(report.hydrated_bytes() <= report.total_bytes());
                let hydrated = line.hydrated_bytes().expect("active");
                prop_assert!(hydrated <= length_bytes);
                if report.hydrated_regions == report.total_regions {
                    prop_assert_eq!(hydrated, length_bytes);
                }
            }
        }
    }
}
