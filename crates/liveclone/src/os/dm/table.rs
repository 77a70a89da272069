//! Device-mapper tables for the `clone` and `linear` targets.
//!
//! A table is one line per target, `<start> <length> <type> <params>`, the
//! lines covering the device from sector 0 without gaps. `Display` prints
//! what we load; `FromStr` also reads what `dmsetup table` prints, where the
//! kernel shows devices as `major:minor` and, for dm-clone, echoes the
//! arguments after the three devices exactly as they were loaded.

use std::fmt;
use std::str::FromStr;

use super::{
    ParseError, RegionSize, Sectors, Tokens, CLONE_TARGET_TYPE, LINEAR_TARGET_TYPE, MAX_REGIONS,
};

/// Largest major number the kernel can represent (`MINORBITS` = 20 leaves
/// 12 bits of a 32-bit `dev_t`).
const MAX_MAJOR: u32 = (1 << 12) - 1;
/// Largest minor number (20 bits).
const MAX_MINOR: u32 = (1 << 20) - 1;
const DEV_PREFIX: &str = "/dev/";

/// A block device as a table names it.
///
/// The kernel resolves either form (`dm_get_device`: a path through
/// `lookup_bdev`, else `major:minor`) and always prints `major:minor` back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceRef {
    /// `major:minor`, what `dmsetup table` shows.
    Number { major: u32, minor: u32 },
    /// An absolute path under `/dev/`, what the driver may load.
    Path(String),
}

/// Why a device reference is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceRefError {
    #[error("major number {major} is above the kernel's limit of {MAX_MAJOR}")]
    MajorOutOfRange { major: u32 },
    #[error("minor number {minor} is above the kernel's limit of {MAX_MINOR}")]
    MinorOutOfRange { minor: u32 },
    #[error("`{path}` is not an absolute path under {DEV_PREFIX}")]
    NotUnderDev { path: String },
    #[error(
        "`{path}` contains {character:?}; whitespace, control characters and \
         backslashes would be split or unescaped by the kernel's table parser"
    )]
    UnsafeCharacter { path: String, character: char },
    #[error("`{path}` has an empty, `.` or `..` component; give the device's plain path")]
    IndirectComponent { path: String },
    #[error("`{token}` is neither major:minor nor an absolute path under {DEV_PREFIX}")]
    Unrecognised { token: String },
}

impl DeviceRef {
    pub fn number(major: u32, minor: u32) -> Result<Self, DeviceRefError> {
        if major > MAX_MAJOR {
            return Err(DeviceRefError::MajorOutOfRange { major });
        }
        if minor > MAX_MINOR {
            return Err(DeviceRefError::MinorOutOfRange { minor });
        }
        Ok(DeviceRef::Number { major, minor })
    }

    /// A device path as the driver loads it. It must not need the kernel to
    /// interpret it beyond a lookup: a table line is split on whitespace
    /// with backslash escapes, and `..` would let a path leave `/dev`.
    pub fn path(path: impl Into<String>) -> Result<Self, DeviceRefError> {
        let path = path.into();
        let Some(relative) = path.strip_prefix(DEV_PREFIX) else {
            return Err(DeviceRefError::NotUnderDev { path });
        };
        if let Some(character) = path
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || *c == '\\')
        {
            return Err(DeviceRefError::UnsafeCharacter { path, character });
        }
        if relative
            .split('/')
            .any(|component| matches!(component, "" | "." | ".."))
        {
            return Err(DeviceRefError::IndirectComponent { path });
        }
        Ok(DeviceRef::Path(path))
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRef::Number { major, minor } => write!(f, "{major}:{minor}"),
            DeviceRef::Path(path) => f.write_str(path),
        }
    }
}

impl FromStr for DeviceRef {
    type Err = DeviceRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with('/') {
            return DeviceRef::path(s);
        }
        let unrecognised = || DeviceRefError::Unrecognised {
            token: s.to_owned(),
        };
        let (major, minor) = s.split_once(':').ok_or_else(unrecognised)?;
        let major = super::parse_decimal("major", major).map_err(|_| unrecognised())?;
        let minor = super::parse_decimal("minor", minor).map_err(|_| unrecognised())?;
        DeviceRef::number(major, minor)
    }
}

/// dm-clone's feature arguments. Both default to off (hydration enabled,
/// discards passed down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CloneFeatures {
    /// `no_hydration`: load with background hydration disabled; enable it
    /// later with the `enable_hydration` message.
    pub no_hydration: bool,
    /// `no_discard_passdown`: discards mark regions hydrated but are not
    /// sent to the destination.
    pub no_discard_passdown: bool,
}

const NO_HYDRATION: &str = "no_hydration";
const NO_DISCARD_PASSDOWN: &str = "no_discard_passdown";
/// `parse_feature_args`: at most two feature arguments.
const MAX_FEATURE_ARGS: u32 = 2;
/// `parse_core_args`: at most four core arguments (two key/value pairs).
const MAX_CORE_ARGS: u32 = 4;
const HYDRATION_THRESHOLD: &str = "hydration_threshold";
const HYDRATION_BATCH_SIZE: &str = "hydration_batch_size";

impl CloneFeatures {
    /// The feature names in the order the kernel prints them (`emit_flags`).
    fn names(self) -> impl Iterator<Item = &'static str> {
        [
            (self.no_hydration, NO_HYDRATION),
            (self.no_discard_passdown, NO_DISCARD_PASSDOWN),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
    }

    fn count(self) -> usize {
        self.names().count()
    }

    /// Writes the group with its count, `0` included.
    pub(crate) fn write_group(self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.count())?;
        for name in self.names() {
            write!(f, " {name}")?;
        }
        Ok(())
    }

    /// Reads `<#features> <feature>*`. Names match case-insensitively, as
    /// in `parse_feature_args` (`strcasecmp`).
    pub(crate) fn parse_group(tokens: &mut Tokens<'_>) -> Result<Self, ParseError> {
        let count_token = tokens.next_token("#feature args")?;
        let count: u32 = super::parse_decimal("#feature args", count_token)?;
        if count > MAX_FEATURE_ARGS {
            return Err(ParseError::InvalidCount {
                field: "#feature args",
                token: count_token.to_owned(),
                reason: "dm-clone takes at most 2 feature arguments",
            });
        }
        let mut features = CloneFeatures::default();
        for _ in 0..count {
            let name = tokens.next_token("a dm-clone feature")?;
            let flag = if name.eq_ignore_ascii_case(NO_HYDRATION) {
                &mut features.no_hydration
            } else if name.eq_ignore_ascii_case(NO_DISCARD_PASSDOWN) {
                &mut features.no_discard_passdown
            } else {
                return Err(ParseError::UnknownFeature {
                    token: name.to_owned(),
                });
            };
            if *flag {
                return Err(ParseError::DuplicateFeature {
                    token: name.to_owned(),
                });
            }
            *flag = true;
        }
        Ok(features)
    }
}

/// dm-clone's core arguments: the hydration tunables a table can set.
/// `None` leaves the kernel default (one region, see
/// [`super::KERNEL_DEFAULT_HYDRATION_THRESHOLD`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CloneCoreArgs {
    pub hydration_threshold: Option<u32>,
    pub hydration_batch_size: Option<u32>,
}

impl CloneCoreArgs {
    fn pairs(self) -> impl Iterator<Item = (&'static str, u32)> {
        [
            (HYDRATION_THRESHOLD, self.hydration_threshold),
            (HYDRATION_BATCH_SIZE, self.hydration_batch_size),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
    }

    /// Number of arguments: keys and values both count, as in the table.
    fn count(self) -> usize {
        2 * self.pairs().count()
    }

    pub(crate) fn write_group(self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.count())?;
        for (key, value) in self.pairs() {
            write!(f, " {key} {value}")?;
        }
        Ok(())
    }

    /// Reads `<#core args> [<key> <value>]*`: an even count of at most 4,
    /// keys case-insensitive, values unsigned 32-bit decimals
    /// (`parse_core_args`). Keys may come in any order.
    pub(crate) fn parse_group(tokens: &mut Tokens<'_>) -> Result<Self, ParseError> {
        let count_token = tokens.next_token("#core args")?;
        let count: u32 = super::parse_decimal("#core args", count_token)?;
        let invalid_count = |reason| ParseError::InvalidCount {
            field: "#core args",
            token: count_token.to_owned(),
            reason,
        };
        if count > MAX_CORE_ARGS {
            return Err(invalid_count("dm-clone takes at most 4 core arguments"));
        }
        if !count.is_multiple_of(2) {
            return Err(invalid_count(
                "core arguments are key/value pairs, so their count is even",
            ));
        }
        let mut args = CloneCoreArgs::default();
        for _ in 0..count / 2 {
            let key = tokens.next_token("a dm-clone core argument")?;
            let (slot, field) = if key.eq_ignore_ascii_case(HYDRATION_THRESHOLD) {
                (&mut args.hydration_threshold, HYDRATION_THRESHOLD)
            } else if key.eq_ignore_ascii_case(HYDRATION_BATCH_SIZE) {
                (&mut args.hydration_batch_size, HYDRATION_BATCH_SIZE)
            } else {
                return Err(ParseError::UnknownCoreArg {
                    token: key.to_owned(),
                });
            };
            if slot.is_some() {
                return Err(ParseError::DuplicateCoreArg {
                    token: key.to_owned(),
                });
            }
            *slot = Some(tokens.next_number(field)?);
        }
        Ok(args)
    }
}

/// The parameters of a `clone` target:
/// `<metadata> <destination> <source> <region sectors>
/// [<#features> <feature>* [<#core args> <key> <value>...]]`.
///
/// The groups are positional (`clone_ctr` reads the feature group, then the
/// core group): core arguments need a feature count before them, `0` when
/// there are no features. The VM's kernel refused
/// `8 4 hydration_threshold 1 hydration_batch_size 1` with "Invalid number
/// of feature arguments".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CloneTarget {
    pub metadata: DeviceRef,
    pub destination: DeviceRef,
    pub source: DeviceRef,
    pub region_size: RegionSize,
    pub features: CloneFeatures,
    pub core: CloneCoreArgs,
}

impl CloneTarget {
    fn parse_params(tokens: &mut Tokens<'_>) -> Result<Self, ParseError> {
        let metadata = parse_device(tokens, "metadata device")?;
        let destination = parse_device(tokens, "destination device")?;
        let source = parse_device(tokens, "source device")?;
        let region_size = tokens.next_token("region size")?.parse()?;
        let features = if tokens.is_empty() {
            CloneFeatures::default()
        } else {
            CloneFeatures::parse_group(tokens)?
        };
        let core = if tokens.is_empty() {
            CloneCoreArgs::default()
        } else {
            CloneCoreArgs::parse_group(tokens)?
        };
        // Anything left is refused by the caller's `Tokens::finish`. The
        // kernel ignores it instead (it accepted `... 1 no_hydration 2
        // hydration_threshold 1 hydration_batch_size 1` and kept the default
        // batch size), but it always means a count is wrong.
        Ok(CloneTarget {
            metadata,
            destination,
            source,
            region_size,
            features,
            core,
        })
    }
}

/// Prints the parameters only, without the target type.
impl fmt::Display for CloneTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.metadata, self.destination, self.source, self.region_size
        )?;
        let has_core = self.core.count() > 0;
        if self.features.count() > 0 || has_core {
            f.write_str(" ")?;
            self.features.write_group(f)?;
        }
        if has_core {
            f.write_str(" ")?;
            self.core.write_group(f)?;
        }
        Ok(())
    }
}

impl FromStr for CloneTarget {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tokens::parse_all(s, "clone parameters", CloneTarget::parse_params)
    }
}

/// The parameters of a `linear` target: `<device> <offset sectors>`
/// (`linear_ctr` takes exactly two arguments).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LinearTarget {
    pub device: DeviceRef,
    pub offset: Sectors,
}

impl LinearTarget {
    fn parse_params(tokens: &mut Tokens<'_>) -> Result<Self, ParseError> {
        let device = parse_device(tokens, "linear device")?;
        let offset = Sectors(tokens.next_number("linear offset")?);
        Ok(LinearTarget { device, offset })
    }
}

/// Prints the parameters only, without the target type.
impl fmt::Display for LinearTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.device, self.offset)
    }
}

impl FromStr for LinearTarget {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tokens::parse_all(s, "linear parameters", LinearTarget::parse_params)
    }
}

fn parse_device(tokens: &mut Tokens<'_>, field: &'static str) -> Result<DeviceRef, ParseError> {
    let token = tokens.next_token(field)?;
    token.parse().map_err(|reason| ParseError::InvalidDevice {
        field,
        token: token.to_owned(),
        reason,
    })
}

/// One target of a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Clone(CloneTarget),
    Linear(LinearTarget),
}

impl Target {
    /// The target type as the kernel names it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Target::Clone(_) => CLONE_TARGET_TYPE,
            Target::Linear(_) => LINEAR_TARGET_TYPE,
        }
    }

    /// The parameter string, as the table-load ioctl takes it.
    pub fn params(&self) -> String {
        match self {
            Target::Clone(clone) => clone.to_string(),
            Target::Linear(linear) => linear.to_string(),
        }
    }

    fn parse(tokens: &mut Tokens<'_>) -> Result<Self, ParseError> {
        let type_name = tokens.next_token("target type")?;
        match type_name {
            CLONE_TARGET_TYPE => CloneTarget::parse_params(tokens).map(Target::Clone),
            LINEAR_TARGET_TYPE => LinearTarget::parse_params(tokens).map(Target::Linear),
            other => Err(ParseError::UnknownTargetType {
                token: other.to_owned(),
            }),
        }
    }
}

/// `<type> <params>`.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Clone(clone) => write!(f, "{CLONE_TARGET_TYPE} {clone}"),
            Target::Linear(linear) => write!(f, "{LINEAR_TARGET_TYPE} {linear}"),
        }
    }
}

impl FromStr for Target {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tokens::parse_all(s, "target parameters", Target::parse)
    }
}

/// One line of a table: `<start> <length> <type> <params>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableLine {
    pub start: Sectors,
    pub length: Sectors,
    pub target: Target,
}

impl TableLine {
    /// The first sector after this line, if it can be represented.
    pub fn end(&self) -> Option<Sectors> {
        self.start.checked_add(self.length)
    }
}

impl fmt::Display for TableLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.start, self.length, self.target)
    }
}

impl FromStr for TableLine {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tokens = Tokens::new(s);
        let start = Sectors(tokens.next_number("start sector")?);
        let length = Sectors(tokens.next_number("length")?);
        let target = Target::parse(&mut tokens)?;
        tokens.finish("table line")?;
        Ok(TableLine {
            start,
            length,
            target,
        })
    }
}

/// A table that breaks one of the kernel's layout rules, or that the
/// constructors cannot build. Line indexes count from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("a table needs at least one target")]
    Empty,
    #[error("the first line starts at sector {start}; it must start at 0")]
    FirstLineNotAtZero { start: Sectors },
    #[error(
        "line {index} starts at sector {start}, but the line before ends at \
         sector {expected}: the kernel refuses gaps and overlaps"
    )]
    NotContiguous {
        index: usize,
        start: Sectors,
        expected: Sectors,
    },
    #[error("line {index} has length 0; the kernel refuses zero-length targets")]
    ZeroLength { index: usize },
    #[error("line {index} ends beyond the last representable sector")]
    EndOverflow { index: usize },
    #[error(
        "line {index}: {regions} regions of {region_size} sectors; dm-clone \
         allows at most {MAX_REGIONS}, so use a larger region size"
    )]
    TooManyRegions {
        index: usize,
        regions: u64,
        region_size: RegionSize,
    },
    #[error(
        "the destination ({dest_len} sectors) is smaller than the source \
         ({source_len} sectors)"
    )]
    DestinationSmallerThanSource {
        source_len: Sectors,
        dest_len: Sectors,
    },
    #[error(
        "not a clone table of the shape Table::clone_with_tail builds \
         (a clone line at 0, then at most a linear tail on its destination)"
    )]
    NotACloneWithTail,
}

/// A whole table: lines covering sectors `0..length` in order, without gaps
/// (`dm_table_add_target`: a zero-length target is refused, and `adjoin`
/// requires the first line at 0 and each next line at the previous end).
///
/// A `clone` line's length need not be a multiple of its region size: the
/// kernel rounds the region count up (`dm_sector_div_up` in `clone_ctr`)
/// and `hydration_copy` copies only the remaining tail of a partial last
/// region; the VM's kernel loaded a 131068-sector clone with 16-sector
/// regions and reported 8192 regions. The only length rule is the region
/// count, at most [`MAX_REGIONS`].
///
/// Not checked here, because it depends on the devices: every start and
/// length must be a multiple of the devices' logical block size, and the
/// devices must be at least as large as the lines need.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Table(Vec<TableLine>);

impl Table {
    pub fn new(lines: Vec<TableLine>) -> Result<Self, TableError> {
        if lines.is_empty() {
            return Err(TableError::Empty);
        }
        let mut expected_start = Sectors::ZERO;
        for (index, line) in lines.iter().enumerate() {
            if line.start != expected_start {
                return Err(if index == 0 {
                    TableError::FirstLineNotAtZero { start: line.start }
                } else {
                    TableError::NotContiguous {
                        index,
                        start: line.start,
                        expected: expected_start,
                    }
                });
            }
            if line.length == Sectors::ZERO {
                return Err(TableError::ZeroLength { index });
            }
            if let Target::Clone(clone) = &line.target {
                let regions = clone.region_size.regions_in(line.length);
                if regions > MAX_REGIONS {
                    return Err(TableError::TooManyRegions {
                        index,
                        regions,
                        region_size: clone.region_size,
                    });
                }
            }
            expected_start = line.end().ok_or(TableError::EndOverflow { index })?;
        }
        Ok(Table(lines))
    }

    /// The table for a live clone: a `clone` target over the source's
    /// length, then, when the destination is larger, a `linear` tail mapping
    /// the rest of the destination at the same offset. (dm-clone's target
    /// length must fit in both its source and its destination.)
    ///
    /// Takes the clone target whole rather than its six parts: the three
    /// devices have one type, and naming them as fields keeps them from
    /// being swapped.
    pub fn clone_with_tail(
        source_len: Sectors,
        dest_len: Sectors,
        clone: CloneTarget,
    ) -> Result<Self, TableError> {
        let tail_len =
            dest_len
                .checked_sub(source_len)
                .ok_or(TableError::DestinationSmallerThanSource {
                    source_len,
                    dest_len,
                })?;
        let tail = (tail_len > Sectors::ZERO).then(|| TableLine {
            start: source_len,
            length: tail_len,
            target: Target::Linear(LinearTarget {
                device: clone.destination.clone(),
                offset: source_len,
            }),
        });
        let head = TableLine {
            start: Sectors::ZERO,
            length: source_len,
            target: Target::Clone(clone),
        };
        Table::new(std::iter::once(head).chain(tail).collect())
    }

    /// A single `linear` line over the whole of `device` from offset 0: the
    /// table a fully hydrated clone switches to.
    pub fn linear(len: Sectors, device: DeviceRef) -> Result<Self, TableError> {
        Table::new(vec![TableLine {
            start: Sectors::ZERO,
            length: len,
            target: Target::Linear(LinearTarget {
                device,
                offset: Sectors::ZERO,
            }),
        }])
    }

    /// The table that replaces this one once hydration is complete: the
    /// same total length, linear over the clone's destination from offset 0
    /// (the clone's region maps the destination at the same offsets, and so
    /// does the tail). Fails unless this table has the shape
    /// [`Table::clone_with_tail`] builds.
    pub fn linear_replacement(&self) -> Result<Self, TableError> {
        let Some((head, tail)) = self.0.split_first() else {
            return Err(TableError::NotACloneWithTail);
        };
        let Target::Clone(clone) = &head.target else {
            return Err(TableError::NotACloneWithTail);
        };
        let tail_is_the_destination = |line: &TableLine| {
            matches!(&line.target, Target::Linear(linear)
                if linear.device == clone.destination && linear.offset == line.start)
        };
        if tail.len() > 1 || !tail.iter().all(tail_is_the_destination) {
            return Err(TableError::NotACloneWithTail);
        }
        Table::linear(self.length(), clone.destination.clone())
    }

    pub fn lines(&self) -> &[TableLine] {
        &self.0
    }

    pub fn into_lines(self) -> Vec<TableLine> {
        self.0
    }

    /// The device's length: the end of the last line.
    pub fn length(&self) -> Sectors {
        // A valid table is non-empty and every end fits (checked in new).
        self.0
            .last()
            .and_then(TableLine::end)
            .unwrap_or(Sectors::ZERO)
    }

    /// The first clone target, if any.
    pub fn clone_target(&self) -> Option<&CloneTarget> {
        self.0.iter().find_map(|line| match &line.target {
            Target::Clone(clone) => Some(clone),
            Target::Linear(_) => None,
        })
    }
}

/// One line per target, separated by `\n`, no trailing newline.
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, line) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{line}")?;
        }
        Ok(())
    }
}

/// Reads our own output and `dmsetup table` output (blank lines, such as a
/// trailing newline, are skipped), then checks the layout rules.
impl FromStr for Table {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lines = s
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<TableLine>, _>>()?;
        Ok(Table::new(lines)?)
    }
}

#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn device_ref() -> impl Strategy<Value = DeviceRef> {
        prop_oneof![
            (0..=MAX_MAJOR, 0..=MAX_MINOR)
                .prop_map(|(major, minor)| DeviceRef::Number { major, minor }),
            // A first character other than '.' rules out `.` and `..`.
            "[a-z0-9_-][a-z0-9_.:-]{0,11}(/[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,11}){0,2}"
                .prop_map(|rest| DeviceRef::Path(format!("{DEV_PREFIX}{rest}"))),
        ]
    }

    pub(crate) fn features() -> impl Strategy<Value = CloneFeatures> {
        (any::<bool>(), any::<bool>()).prop_map(|(no_hydration, no_discard_passdown)| {
            CloneFeatures {
                no_hydration,
                no_discard_passdown,
            }
        })
    }

    pub(crate) fn core_args() -> impl Strategy<Value = CloneCoreArgs> {
        (
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(
                |(hydration_threshold, hydration_batch_size)| CloneCoreArgs {
                    hydration_threshold,
                    hydration_batch_size,
                },
            )
    }

    pub(crate) fn clone_target() -> impl Strategy<Value = CloneTarget> {
        (
            device_ref(),
            device_ref(),
            device_ref(),
            super::super::strategies::region_size(),
            features(),
            core_args(),
        )
            .prop_map(
                |(metadata, destination, source, region_size, features, core)| CloneTarget {
                    metadata,
                    destination,
                    source,
                    region_size,
                    features,
                    core,
                },
            )
    }

    pub(crate) fn linear_target() -> impl Strategy<Value = LinearTarget> {
        (device_ref(), any::<u64>()).prop_map(|(device, offset)| LinearTarget {
            device,
            offset: Sectors(offset),
        })
    }

    /// Up to 2^34 sectors (8 TiB): within 2^31 regions at the smallest
    /// region size, so any generated clone line is valid.
    pub(crate) fn length() -> impl Strategy<Value = Sectors> {
        (1u64..=1 << 34).prop_map(Sectors)
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::*;
    use super::*;
    use proptest::prelude::*;

    fn dev(major: u32, minor: u32) -> DeviceRef {
        DeviceRef::number(major, minor).expect("valid device number")
    }

    fn path(p: &str) -> DeviceRef {
        DeviceRef::path(p).expect("valid device path")
    }

    fn region(sectors: u64) -> RegionSize {
        RegionSize::new(sectors).expect("valid region size")
    }

    fn loop_clone(features: CloneFeatures, core: CloneCoreArgs) -> CloneTarget {
        CloneTarget {
            metadata: path("/dev/loop2"),
            destination: path("/dev/loop1"),
            source: path("/dev/loop0"),
            region_size: region(8),
            features,
            core,
        }
    }

    #[test]
    fn device_refs_validate() {
        assert_eq!("7:2".parse(), Ok(dev(7, 2)));
        assert_eq!("/dev/loop0".parse(), Ok(path("/dev/loop0")));
        assert_eq!(
            "/dev/disk/by-id/virtio-meta".parse::<DeviceRef>(),
            Ok(DeviceRef::Path("/dev/disk/by-id/virtio-meta".to_owned()))
        );
        assert_eq!(
            DeviceRef::number(4096, 0),
            Err(DeviceRefError::MajorOutOfRange { major: 4096 })
        );
        assert_eq!(
            DeviceRef::number(1, 1 << 20),
            Err(DeviceRefError::MinorOutOfRange { minor: 1 << 20 })
        );
        for bad in [
            "/dev/../etc/passwd",
            "/dev/./loop0",
            "/dev/mapper/",
            "/dev//loop0",
            "/dev/",
        ] {
            assert_eq!(
                DeviceRef::path(bad),
                Err(DeviceRefError::IndirectComponent {
                    path: bad.to_owned()
                }),
                "{bad}"
            );
        }
        assert_eq!(
            DeviceRef::path("/dev/my disk"),
            Err(DeviceRefError::UnsafeCharacter {
                path: "/dev/my disk".to_owned(),
                character: ' '
            })
        );
        assert!(matches!(
            DeviceRef::path("/dev/a\\x20b"),
            Err(DeviceRefError::UnsafeCharacter {
                character: '\\',
                ..
            })
        ));
        assert!(matches!(
            DeviceRef::path("/tmp/disk.img"),
            Err(DeviceRefError::NotUnderDev { .. })
        ));
        assert!(matches!(
            DeviceRef::path("dev/loop0"),
            Err(DeviceRefError::NotUnderDev { .. })
        ));
        for bad in ["loop0", "7:", ":2", "7:2:1", "-7:2", "7:x"] {
            assert_eq!(
                bad.parse::<DeviceRef>(),
                Err(DeviceRefError::Unrecognised {
                    token: bad.to_owned()
                }),
                "{bad}"
            );
        }
    }

    #[test]
    fn clone_params_print_the_kernel_syntax() {
        let none = loop_clone(CloneFeatures::default(), CloneCoreArgs::default());
        assert_eq!(none.to_string(), "/dev/loop2 /dev/loop1 /dev/loop0 8");

        let no_hydration = CloneFeatures {
            no_hydration: true,
            ..CloneFeatures::default()
        };
        let both_core = CloneCoreArgs {
            hydration_threshold: Some(1),
            hydration_batch_size: Some(1),
        };
        // Loaded as is in the VM (with a linear tail).
        assert_eq!(
            loop_clone(no_hydration, both_core).to_string(),
            "/dev/loop2 /dev/loop1 /dev/loop0 8 1 no_hydration \
             4 hydration_threshold 1 hydration_batch_size 1"
        );
        assert_eq!(
            loop_clone(no_hydration, CloneCoreArgs::default()).to_string(),
            "/dev/loop2 /dev/loop1 /dev/loop0 8 1 no_hydration"
        );
        // Core arguments without features need the `0` feature count.
        let threshold_only = CloneCoreArgs {
            hydration_threshold: Some(3),
            hydration_batch_size: None,
        };
        assert_eq!(
            loop_clone(CloneFeatures::default(), threshold_only).to_string(),
            "/dev/loop2 /dev/loop1 /dev/loop0 8 0 2 hydration_threshold 3"
        );
        let both_features = CloneFeatures {
            no_hydration: true,
            no_discard_passdown: true,
        };
        assert_eq!(
            loop_clone(both_features, CloneCoreArgs::default()).to_string(),
            "/dev/loop2 /dev/loop1 /dev/loop0 8 2 no_hydration no_discard_passdown"
        );
    }

    /// `dmsetup table` output captured in the VM (kernel 6.1.0-56-amd64,
    /// dm-clone v1.0.0): devices as major:minor, the rest echoed as loaded.
    #[test]
    fn parses_tables_the_kernel_printed() {
        let table: Table = "0 131072 clone 7:2 7:1 7:0 8 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1\n\
                            131072 65536 linear 7:1 131072\n"
            .parse()
            .expect("kernel table");
        let clone = CloneTarget {
            metadata: dev(7, 2),
            destination: dev(7, 1),
            source: dev(7, 0),
            region_size: region(8),
            features: CloneFeatures {
                no_hydration: true,
                no_discard_passdown: false,
            },
            core: CloneCoreArgs {
                hydration_threshold: Some(1),
                hydration_batch_size: Some(1),
            },
        };
        assert_eq!(
            table,
            Table::clone_with_tail(Sectors(131_072), Sectors(196_608), clone.clone())
                .expect("valid")
        );
        assert_eq!(table.clone_target(), Some(&clone));
        assert_eq!(table.length(), Sectors(196_608));

        // Echoed verbatim: upper case and the keys in the order loaded.
        let echoed: TableLine = "0 131072 clone 7:4 7:1 7:0 128 2 NO_DISCARD_PASSDOWN no_hydration 4 hydration_batch_size 7 hydration_threshold 9"
            .parse()
            .expect("kernel table line");
        let Target::Clone(echoed) = echoed.target else {
            panic!("clone target expected")
        };
        assert_eq!(
            echoed.features,
            CloneFeatures {
                no_hydration: true,
                no_discard_passdown: true
            }
        );
        assert_eq!(
            echoed.core,
            CloneCoreArgs {
                hydration_threshold: Some(9),
                hydration_batch_size: Some(7)
            }
        );

        let partial: Table = "0 131068 clone 7:3 7:1 7:0 16"
            .parse()
            .expect("partial region");
        assert_eq!(partial.length(), Sectors(131_068));
        let empty_groups: Table = "0 131072 clone 7:5 7:1 7:0 8 0 0"
            .parse()
            .expect("empty groups");
        assert_eq!(
            empty_groups.clone_target().map(|c| (c.features, c.core)),
            Some((CloneFeatures::default(), CloneCoreArgs::default()))
        );
        let linear: Table = "0 131072 linear 7:1 0\n".parse().expect("linear");
        assert_eq!(
            linear,
            Table::linear(Sectors(131_072), dev(7, 1)).expect("valid")
        );
    }

    #[test]
    fn refuses_what_the_kernel_refuses_or_silently_misreads() {
        // Refused by the kernel: core arguments without a feature count.
        assert!(matches!(
            "7:2 7:1 7:0 8 4 hydration_threshold 1 hydration_batch_size 1".parse::<CloneTarget>(),
            Err(ParseError::InvalidCount { field: "#feature args", token, .. }) if token == "4"
        ));
        // Accepted by the kernel, which then ignored the batch size: the
        // count says one pair but two follow.
        assert_eq!(
            "7:2 7:1 7:0 8 1 no_hydration 2 hydration_threshold 1 hydration_batch_size 1"
                .parse::<CloneTarget>(),
            Err(ParseError::UnexpectedToken {
                context: "clone parameters",
                token: "hydration_batch_size".to_owned()
            })
        );
        assert!(matches!(
            "7:2 7:1 7:0 8 0 3 hydration_threshold 1 x".parse::<CloneTarget>(),
            Err(ParseError::InvalidCount { field: "#core args", token, .. }) if token == "3"
        ));
        assert!(matches!(
            "7:2 7:1 7:0 8 0 6".parse::<CloneTarget>(),
            Err(ParseError::InvalidCount { field: "#core args", token, .. }) if token == "6"
        ));
        assert!(matches!(
            "7:2 7:1 7:0 8 3 no_hydration".parse::<CloneTarget>(),
            Err(ParseError::InvalidCount { field: "#feature args", token, .. }) if token == "3"
        ));
        assert_eq!(
            "7:2 7:1 7:0 8 1 hydrate_fast".parse::<CloneTarget>(),
            Err(ParseError::UnknownFeature {
                token: "hydrate_fast".to_owned()
            })
        );
        assert_eq!(
            "7:2 7:1 7:0 8 2 no_hydration NO_HYDRATION".parse::<CloneTarget>(),
            Err(ParseError::DuplicateFeature {
                token: "NO_HYDRATION".to_owned()
            })
        );
        assert_eq!(
            "7:2 7:1 7:0 8 0 4 hydration_threshold 1 hydration_threshold 2".parse::<CloneTarget>(),
            Err(ParseError::DuplicateCoreArg {
                token: "hydration_threshold".to_owned()
            })
        );
        assert_eq!(
            "7:2 7:1 7:0 8 0 2 copy_speed 1".parse::<CloneTarget>(),
            Err(ParseError::UnknownCoreArg {
                token: "copy_speed".to_owned()
            })
        );
        assert!(matches!(
            "7:2 7:1 7:0 24".parse::<CloneTarget>(),
            Err(ParseError::InvalidRegionSize { token, .. }) if token == "24"
        ));
        assert_eq!(
            "7:2 7:1 7:0".parse::<CloneTarget>(),
            Err(ParseError::Missing {
                expected: "region size"
            })
        );
        assert!(matches!(
            "7:2 loop1 7:0 8".parse::<CloneTarget>(),
            Err(ParseError::InvalidDevice { field: "destination device", token, .. }) if token == "loop1"
        ));
        assert!(matches!(
            "0 8 striped 2 8 7:1 0 7:2 0".parse::<TableLine>(),
            Err(ParseError::UnknownTargetType { token }) if token == "striped"
        ));
        assert!(matches!(
            "0 8 linear 7:1 0 noexcl".parse::<TableLine>(),
            Err(ParseError::UnexpectedToken { token, .. }) if token == "noexcl"
        ));
    }

    #[test]
    fn table_layout_rules() {
        let linear = |start, length| TableLine {
            start: Sectors(start),
            length: Sectors(length),
            target: Target::Linear(LinearTarget {
                device: dev(7, 1),
                offset: Sectors(start),
            }),
        };
        assert_eq!(Table::new(vec![]), Err(TableError::Empty));
        assert_eq!(
            Table::new(vec![linear(8, 8)]),
            Err(TableError::FirstLineNotAtZero { start: Sectors(8) })
        );
        assert_eq!(
            Table::new(vec![linear(0, 8), linear(16, 8)]),
            Err(TableError::NotContiguous {
                index: 1,
                start: Sectors(16),
                expected: Sectors(8)
            })
        );
        assert_eq!(
            Table::new(vec![linear(0, 8), linear(4, 8)]),
            Err(TableError::NotContiguous {
                index: 1,
                start: Sectors(4),
                expected: Sectors(8)
            })
        );
        assert_eq!(
            Table::new(vec![linear(0, 8), linear(8, 0)]),
            Err(TableError::ZeroLength { index: 1 })
        );
        assert_eq!(
            Table::new(vec![linear(0, u64::MAX), linear(u64::MAX, 1)]),
            Err(TableError::EndOverflow { index: 1 })
        );
        assert!(matches!(
            "0 8 linear 7:1 0\n16 8 linear 7:1 16".parse::<Table>(),
            Err(ParseError::InvalidTable(TableError::NotContiguous {
                index: 1,
                ..
            }))
        ));

        let mut clone = loop_clone(CloneFeatures::default(), CloneCoreArgs::default());
        // 2^31 regions of 8 sectors is the kernel's limit; one more sector
        // makes a partial region too many.
        let limit = Sectors(MAX_REGIONS * 8);
        assert!(Table::clone_with_tail(limit, limit, clone.clone()).is_ok());
        let over = Sectors(limit.0 + 1);
        assert_eq!(
            Table::clone_with_tail(over, over, clone.clone()),
            Err(TableError::TooManyRegions {
                index: 0,
                regions: MAX_REGIONS + 1,
                region_size: region(8)
            })
        );
        clone.region_size = region(16);
        assert!(Table::clone_with_tail(over, over, clone).is_ok());
    }

    #[test]
    fn clone_with_tail_and_its_linear_replacement() {
        let clone = loop_clone(CloneFeatures::default(), CloneCoreArgs::default());
        let same = Table::clone_with_tail(Sectors(1000), Sectors(1000), clone.clone())
            .expect("equal sizes");
        assert_eq!(same.lines().len(), 1);
        assert_eq!(
            same.to_string(),
            "0 1000 clone /dev/loop2 /dev/loop1 /dev/loop0 8"
        );
        assert_eq!(
            same.linear_replacement().map(|t| t.to_string()),
            Ok("0 1000 linear /dev/loop1 0".to_owned())
        );

        let larger = Table::clone_with_tail(Sectors(131_072), Sectors(196_608), clone.clone())
            .expect("larger destination");
        assert_eq!(
            larger.to_string(),
            "0 131072 clone /dev/loop2 /dev/loop1 /dev/loop0 8\n\
             131072 65536 linear /dev/loop1 131072"
        );
        let replacement = larger.linear_replacement().expect("clone with tail");
        assert_eq!(replacement.to_string(), "0 196608 linear /dev/loop1 0");
        assert_eq!(replacement.length(), larger.length());
        assert_eq!(
            replacement.linear_replacement(),
            Err(TableError::NotACloneWithTail)
        );

        assert_eq!(
            Table::clone_with_tail(Sectors(1000), Sectors(999), clone.clone()),
            Err(TableError::DestinationSmallerThanSource {
                source_len: Sectors(1000),
                dest_len: Sectors(999)
            })
        );
        assert_eq!(
            Table::clone_with_tail(Sectors(0), Sectors(8), clone),
            Err(TableError::ZeroLength { index: 0 })
        );
        assert_eq!(
            Table::linear(Sectors(0), dev(7, 1)),
            Err(TableError::ZeroLength { index: 0 })
        );
    }

    #[test]
    fn linear_replacement_refuses_a_tail_elsewhere() {
        let clone = loop_clone(CloneFeatures::default(), CloneCoreArgs::default());
        let table = Table::new(vec![
            TableLine {
                start: Sectors(0),
                length: Sectors(8),
                target: Target::Clone(clone),
            },
            TableLine {
                start: Sectors(8),
                length: Sectors(8),
                target: Target::Linear(LinearTarget {
                    device: path("/dev/loop9"),
                    offset: Sectors(8),
                }),
            },
        ])
        .expect("valid layout");
        assert_eq!(
            table.linear_replacement(),
            Err(TableError::NotACloneWithTail)
        );
    }

    /// Arbitrary valid tables of clone and linear lines.
    fn table() -> impl Strategy<Value = Table> {
        let target = prop_oneof![
            clone_target().prop_map(Target::Clone),
            linear_target().prop_map(Target::Linear),
        ];
        proptest::collection::vec((length(), target), 1..5).prop_map(|lines| {
            let mut start = Sectors::ZERO;
            let lines = lines
                .into_iter()
                .map(|(length, target)| {
                    let line = TableLine {
                        start,
                        length,
                        target,
                    };
                    start = Sectors(start.0 + length.0);
                    line
                })
                .collect();
            Table::new(lines).expect("contiguous lines of valid lengths")
        })
    }

    proptest! {
        #[test]
        fn device_ref_round_trips(device in device_ref()) {
            prop_assert_eq!(device.to_string().parse::<DeviceRef>(), Ok(device));
        }

        #[test]
        fn clone_target_round_trips(target in clone_target()) {
            prop_assert_eq!(target.to_string().parse::<CloneTarget>(), Ok(target));
        }

        #[test]
        fn linear_target_round_trips(target in linear_target()) {
            prop_assert_eq!(target.to_string().parse::<LinearTarget>(), Ok(target));
        }

        #[test]
        fn table_round_trips(table in table()) {
            prop_assert_eq!(table.to_string().parse::<Table>(), Ok(table));
        }

        #[test]
        fn clone_with_tail_covers_the_destination(
            source_len in length(),
            extra in 0u64..1 << 34,
            target in clone_target(),
        ) {
            let dest_len = Sectors(source_len.0 + extra);
            let table = Table::clone_with_tail(source_len, dest_len, target.clone())
                .expect("valid sizes");
            prop_assert_eq!(table.length(), dest_len);
            prop_assert_eq!(table.lines().len(), if extra > 0 { 2 } else { 1 });
            prop_assert_eq!(table.to_string().parse::<Table>(), Ok(table.clone()));
            let replacement = table.linear_replacement().expect("clone with tail");
            prop_assert_eq!(replacement.length(), dest_len);
            prop_assert_eq!(replacement, Table::linear(dest_len, target.destination).expect("valid"));
        }
    }
}
