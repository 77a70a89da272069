//! Device-mapper: typed tables, status lines and messages for the `clone`
//! and `linear` targets, and the dm-clone limits that every layer respects.
//!
//! The formats follow the kernel source (Linux 6.1,
//! `drivers/md/dm-clone-target.c`, target version 1.0.0, and
//! `drivers/md/dm-linear.c`) and were checked against a real kernel in the
//! test VM; the tests quote lines captured there.
//!
//! Every type here prints exactly what the kernel accepts or prints
//! (`Display`) and parses that back to an equal value (`FromStr`).
//! Parsing is stricter than the kernel where the kernel is lenient in a way
//! that hides mistakes: for example dm-clone silently ignores arguments after
//! its core-argument group, so a wrong count drops tunables without an error;
//! our parser refuses such a line instead.
//!
//! * [`table`]: device references, the `clone` and `linear` targets, whole
//!   tables with the kernel's layout rules.
//! * [`status`]: the dm-clone status line.
//! * [`CloneMessage`]: the messages dm-clone accepts.

pub mod device;
pub mod ioctl;
pub mod status;
pub mod table;

use std::fmt;
use std::str::FromStr;

pub use device::{DeviceMapper, DmInfo, DmName, DmNameError, SuspendFlush, DM_NAME_PREFIX};
pub use status::{CloneStatus, CloneStatusLine, CloneStatusReport, MetadataMode};
pub use table::{
    CloneCoreArgs, CloneFeatures, CloneTarget, DeviceRef, DeviceRefError, LinearTarget, Table,
    TableError, TableLine, Target,
};

/// Bytes per sector. Device-mapper counts lengths and offsets in 512-byte
/// sectors whatever the logical block size of the devices underneath.
pub const SECTOR_BYTES: u64 = 512;

/// Smallest dm-clone region, in sectors (4 KiB): `MIN_REGION_SIZE`.
pub const MIN_REGION_SECTORS: u64 = 1 << 3;

/// Largest dm-clone region, in sectors (1 GiB): `MAX_REGION_SIZE`.
pub const MAX_REGION_SECTORS: u64 = 1 << 21;

/// Most regions one clone target may have. `validate_nr_regions` refuses
/// more than 2^31 (its comment: the kernel's bit operations restrict it to
/// 2^31), so 2^31 itself is allowed. The count includes a partial last
/// region.
pub const MAX_REGIONS: u64 = 1 << 31;

/// Size of one dm-clone metadata block, in sectors (4 KiB):
/// `DM_CLONE_METADATA_BLOCK_SIZE`, the first field of the status line.
pub const METADATA_BLOCK_SECTORS: u64 = 8;

/// Largest metadata device dm-clone uses, in sectors (about 15.9 GiB):
/// `DM_CLONE_METADATA_MAX_SECTORS` = 255 × (2^14 − 64) blocks of 4 KiB.
/// Space beyond this is ignored (the kernel warns above 16 GiB).
pub const METADATA_MAX_SECTORS: u64 = 255 * ((1 << 14) - 64) * METADATA_BLOCK_SECTORS;

/// dm-clone's own default `hydration_threshold` (regions in flight) when a
/// table gives none: `DEFAULT_HYDRATION_THRESHOLD`. Very slow; the driver
/// always sets its own (see `domain::sizing`).
pub const KERNEL_DEFAULT_HYDRATION_THRESHOLD: u32 = 1;

/// dm-clone's own default `hydration_batch_size` (regions per copy):
/// `DEFAULT_HYDRATION_BATCH_SIZE`.
pub const KERNEL_DEFAULT_HYDRATION_BATCH_SIZE: u32 = 1;

/// Target type names as they appear in tables and status lines.
pub const CLONE_TARGET_TYPE: &str = "clone";
/// See [`CLONE_TARGET_TYPE`].
pub const LINEAR_TARGET_TYPE: &str = "linear";

/// A length or offset in 512-byte sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sectors(pub u64);

/// A byte count that does not convert to or from sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{bytes} bytes is not a whole number of 512-byte sectors")]
    NotSectorMultiple { bytes: u64 },
    #[error("{sectors} sectors is too many bytes to count in 64 bits")]
    BytesOverflow { sectors: u64 },
}

impl Sectors {
    pub const ZERO: Sectors = Sectors(0);

    /// Exact conversion: `bytes` must be a multiple of 512, since
    /// device-mapper cannot address part of a sector.
    pub fn from_bytes(bytes: u64) -> Result<Self, SizeError> {
        if bytes.is_multiple_of(SECTOR_BYTES) {
            Ok(Sectors(bytes / SECTOR_BYTES))
        } else {
            Err(SizeError::NotSectorMultiple { bytes })
        }
    }

    /// The length in bytes. Fails only for counts no block device can have
    /// (above 2^55 sectors).
    pub fn to_bytes(self) -> Result<u64, SizeError> {
        self.0
            .checked_mul(SECTOR_BYTES)
            .ok_or(SizeError::BytesOverflow { sectors: self.0 })
    }

    pub fn checked_add(self, other: Sectors) -> Option<Sectors> {
        self.0.checked_add(other.0).map(Sectors)
    }

    pub fn checked_sub(self, other: Sectors) -> Option<Sectors> {
        self.0.checked_sub(other.0).map(Sectors)
    }
}

impl fmt::Display for Sectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Sectors {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_decimal("sectors", s).map(Sectors)
    }
}

/// A dm-clone region size: a power of two from [`MIN_REGION_SECTORS`] to
/// [`MAX_REGION_SECTORS`] sectors, as `parse_region_size` requires.
///
/// (The kernel also requires a multiple of both devices' logical block
/// size; every allowed size is a multiple of 4 KiB, the largest logical
/// block size in use, so that check cannot fail for a valid `RegionSize`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionSize(u32);

/// Why a region size is refused, in the kernel's order of checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionSizeError {
    #[error("{bytes} bytes is not a whole number of 512-byte sectors")]
    NotSectorMultiple { bytes: u64 },
    #[error(
        "{sectors} sectors is below dm-clone's smallest region of \
         {MIN_REGION_SECTORS} sectors (4 KiB)"
    )]
    TooSmall { sectors: u64 },
    #[error(
        "{sectors} sectors is above dm-clone's largest region of \
         {MAX_REGION_SECTORS} sectors (1 GiB)"
    )]
    TooLarge { sectors: u64 },
    #[error("{sectors} sectors is not a power of two, which dm-clone requires")]
    NotPowerOfTwo { sectors: u64 },
}

impl RegionSize {
    pub const MIN: RegionSize = RegionSize(MIN_REGION_SECTORS as u32);
    pub const MAX: RegionSize = RegionSize(MAX_REGION_SECTORS as u32);

    pub fn new(sectors: u64) -> Result<Self, RegionSizeError> {
        if sectors < MIN_REGION_SECTORS {
            return Err(RegionSizeError::TooSmall { sectors });
        }
        if sectors > MAX_REGION_SECTORS {
            return Err(RegionSizeError::TooLarge { sectors });
        }
        if !sectors.is_power_of_two() {
            return Err(RegionSizeError::NotPowerOfTwo { sectors });
        }
        // In range, so it fits: MAX_REGION_SECTORS is 2^21.
        u32::try_from(sectors)
            .map(RegionSize)
            .map_err(|_| RegionSizeError::TooLarge { sectors })
    }

    pub fn from_bytes(bytes: u64) -> Result<Self, RegionSizeError> {
        let sectors =
            Sectors::from_bytes(bytes).map_err(|_| RegionSizeError::NotSectorMultiple { bytes })?;
        Self::new(sectors.0)
    }

    pub fn sectors(self) -> Sectors {
        Sectors(u64::from(self.0))
    }

    /// Bytes per region; at most 1 GiB, so this cannot overflow.
    pub fn bytes(self) -> u64 {
        u64::from(self.0) * SECTOR_BYTES
    }

    /// How many regions dm-clone makes of a target of length `len`: the
    /// kernel rounds up (`dm_sector_div_up` in `clone_ctr`), so a partial
    /// last region counts as a whole one.
    pub fn regions_in(self, len: Sectors) -> u64 {
        len.0.div_ceil(u64::from(self.0))
    }

    /// The next larger region size, if dm-clone allows one.
    pub fn doubled(self) -> Option<RegionSize> {
        Self::new(u64::from(self.0) * 2).ok()
    }
}

impl fmt::Display for RegionSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for RegionSize {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let sectors: u64 = parse_decimal("region size", s)?;
        RegionSize::new(sectors).map_err(|reason| ParseError::InvalidRegionSize {
            token: s.to_owned(),
            reason,
        })
    }
}

/// A table, status line or message that does not parse. Every variant names
/// the offending token, or what was expected where the input ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("expected {expected}, but the input ended")]
    Missing { expected: &'static str },
    #[error("{field}: `{token}` is not a decimal number in range")]
    InvalidNumber { field: &'static str, token: String },
    #[error("{field}: `{token}` is not of the form <count>/<total>")]
    InvalidFraction { field: &'static str, token: String },
    #[error("region size `{token}`: {reason}")]
    InvalidRegionSize {
        token: String,
        reason: RegionSizeError,
    },
    #[error("{field} `{token}`: {reason}")]
    InvalidDevice {
        field: &'static str,
        token: String,
        reason: DeviceRefError,
    },
    #[error("{field} `{token}`: {reason}")]
    InvalidCount {
        field: &'static str,
        token: String,
        reason: &'static str,
    },
    #[error("unknown dm-clone feature `{token}` (known: no_hydration, no_discard_passdown)")]
    UnknownFeature { token: String },
    #[error("dm-clone feature `{token}` given twice")]
    DuplicateFeature { token: String },
    #[error(
        "unknown dm-clone core argument `{token}` \
         (known: hydration_threshold, hydration_batch_size)"
    )]
    UnknownCoreArg { token: String },
    #[error("dm-clone core argument `{token}` given twice")]
    DuplicateCoreArg { token: String },
    #[error("the status line lacks the core argument `{key}`, which dm-clone always prints")]
    MissingCoreArg { key: &'static str },
    #[error("metadata mode `{token}` is none of rw, ro, Fail")]
    InvalidMetadataMode { token: String },
    #[error("unknown target type `{token}` (known: clone, linear)")]
    UnknownTargetType { token: String },
    #[error("expected a `clone` target, found `{token}`")]
    NotACloneTarget { token: String },
    #[error("unknown dm-clone message `{token}`")]
    UnknownMessage { token: String },
    #[error("unexpected `{token}` after the end of the {context}")]
    UnexpectedToken {
        context: &'static str,
        token: String,
    },
    #[error("`{token}`: {reason}")]
    Inconsistent { token: String, reason: String },
    #[error("no `clone` target in the status output")]
    NoCloneLine,
    #[error("several `clone` targets in the status output; expected one")]
    SeveralCloneLines,
    #[error("invalid table: {0}")]
    InvalidTable(#[from] TableError),
}

/// Parses a decimal number made of ASCII digits only. Stricter than Rust's
/// `FromStr` (no sign) so that every accepted token is one the kernel would
/// print for the same value, give or take leading zeros.
pub(crate) fn parse_decimal<T: FromStr>(field: &'static str, token: &str) -> Result<T, ParseError> {
    let invalid = || ParseError::InvalidNumber {
        field,
        token: token.to_owned(),
    };
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    token.parse().map_err(|_| invalid())
}

/// Whitespace-separated tokens, as the kernel splits table parameters and
/// messages (`dm_split_args`) and as dmsetup prints status.
pub(crate) struct Tokens<'a> {
    inner: std::iter::Peekable<std::str::SplitAsciiWhitespace<'a>>,
}

impl<'a> Tokens<'a> {
    pub(crate) fn new(s: &'a str) -> Self {
        Tokens {
            inner: s.split_ascii_whitespace().peekable(),
        }
    }

    pub(crate) fn next_token(&mut self, expected: &'static str) -> Result<&'a str, ParseError> {
        self.inner.next().ok_or(ParseError::Missing { expected })
    }

    pub(crate) fn next_number<T: FromStr>(&mut self, field: &'static str) -> Result<T, ParseError> {
        let token = self.next_token(field)?;
        parse_decimal(field, token)
    }

    pub(crate) fn peek(&mut self) -> Option<&'a str> {
        self.inner.peek().copied()
    }

    pub(crate) fn is_empty(&mut self) -> bool {
        self.inner.peek().is_none()
    }

    /// Parses all of `s` with `parse`: a value followed by anything else is
    /// an error naming the first extra token.
    pub(crate) fn parse_all<T>(
        s: &'a str,
        context: &'static str,
        parse: impl FnOnce(&mut Tokens<'a>) -> Result<T, ParseError>,
    ) -> Result<T, ParseError> {
        let mut tokens = Tokens::new(s);
        let value = parse(&mut tokens)?;
        tokens.finish(context)?;
        Ok(value)
    }

    /// Fails on the first token left over after a complete value.
    pub(crate) fn finish(mut self, context: &'static str) -> Result<(), ParseError> {
        match self.inner.next() {
            None => Ok(()),
            Some(token) => Err(ParseError::UnexpectedToken {
                context,
                token: token.to_owned(),
            }),
        }
    }
}

/// A message for a dm-clone target (`dmsetup message <dev> 0 <message>`,
/// the `DM_TARGET_MSG` ioctl). Messages go to the target holding the sector
/// given; the clone target always starts at sector 0 in our tables.
///
/// The kernel does not persist the tunables: they fall back to the table's
/// core arguments (or the kernel defaults) on every table load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloneMessage {
    EnableHydration,
    DisableHydration,
    /// Most regions copied at once by background hydration. Zero pauses
    /// hydration (the kernel accepts it); the driver uses
    /// [`CloneMessage::DisableHydration`] for that instead.
    HydrationThreshold(u32),
    /// Contiguous regions copied together in one kcopyd job. The kernel
    /// treats zero like one.
    HydrationBatchSize(u32),
}

const ENABLE_HYDRATION: &str = "enable_hydration";
const DISABLE_HYDRATION: &str = "disable_hydration";
const HYDRATION_THRESHOLD: &str = "hydration_threshold";
const HYDRATION_BATCH_SIZE: &str = "hydration_batch_size";

impl fmt::Display for CloneMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloneMessage::EnableHydration => f.write_str(ENABLE_HYDRATION),
            CloneMessage::DisableHydration => f.write_str(DISABLE_HYDRATION),
            CloneMessage::HydrationThreshold(n) => write!(f, "{HYDRATION_THRESHOLD} {n}"),
            CloneMessage::HydrationBatchSize(n) => write!(f, "{HYDRATION_BATCH_SIZE} {n}"),
        }
    }
}

impl FromStr for CloneMessage {
    type Err = ParseError;

    /// Keywords match case-insensitively, as in `clone_message`
    /// (`strcasecmp`). Extra arguments are refused, although the kernel
    /// ignores them after `enable_hydration` and `disable_hydration`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut tokens = Tokens::new(s);
        let keyword = tokens.next_token("a dm-clone message")?;
        let message = if keyword.eq_ignore_ascii_case(ENABLE_HYDRATION) {
            CloneMessage::EnableHydration
        } else if keyword.eq_ignore_ascii_case(DISABLE_HYDRATION) {
            CloneMessage::DisableHydration
        } else if keyword.eq_ignore_ascii_case(HYDRATION_THRESHOLD) {
            CloneMessage::HydrationThreshold(tokens.next_number(HYDRATION_THRESHOLD)?)
        } else if keyword.eq_ignore_ascii_case(HYDRATION_BATCH_SIZE) {
            CloneMessage::HydrationBatchSize(tokens.next_number(HYDRATION_BATCH_SIZE)?)
        } else {
            return Err(ParseError::UnknownMessage {
                token: keyword.to_owned(),
            });
        };
        tokens.finish("message")?;
        Ok(message)
    }
}

#[cfg(test)]
pub(crate) mod strategies {
    //! proptest strategies shared by the table and status tests.
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn region_size() -> impl Strategy<Value = RegionSize> {
        (3u32..=21).prop_map(|shift| RegionSize::new(1u64 << shift).expect("power of two in range"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sectors_from_bytes_requires_whole_sectors() {
        assert_eq!(Sectors::from_bytes(4096), Ok(Sectors(8)));
        assert_eq!(Sectors::from_bytes(0), Ok(Sectors(0)));
        assert_eq!(
            Sectors::from_bytes(4097),
            Err(SizeError::NotSectorMultiple { bytes: 4097 })
        );
        assert_eq!(Sectors(8).to_bytes(), Ok(4096));
        assert_eq!(
            Sectors(u64::MAX).to_bytes(),
            Err(SizeError::BytesOverflow { sectors: u64::MAX })
        );
    }

    #[test]
    fn region_size_limits_follow_the_kernel() {
        assert_eq!(RegionSize::new(8), Ok(RegionSize::MIN));
        assert_eq!(RegionSize::new(2_097_152), Ok(RegionSize::MAX));
        assert_eq!(
            RegionSize::new(4),
            Err(RegionSizeError::TooSmall { sectors: 4 })
        );
        assert_eq!(
            RegionSize::new(0),
            Err(RegionSizeError::TooSmall { sectors: 0 })
        );
        assert_eq!(
            RegionSize::new(4_194_304),
            Err(RegionSizeError::TooLarge { sectors: 4_194_304 })
        );
        // Both refused by the VM's kernel: "Invalid region size" and
        // "Region size is not a power of 2".
        assert_eq!(
            RegionSize::new(24),
            Err(RegionSizeError::NotPowerOfTwo { sectors: 24 })
        );
        assert_eq!(
            RegionSize::from_bytes(65536).map(RegionSize::sectors),
            Ok(Sectors(128))
        );
        assert_eq!(
            RegionSize::from_bytes(4000),
            Err(RegionSizeError::NotSectorMultiple { bytes: 4000 })
        );
        let message = RegionSize::new(24)
            .expect_err("not a power of two")
            .to_string();
        assert!(message.contains("power of two"), "{message}");
    }

    #[test]
    fn a_partial_last_region_counts_as_a_region() {
        let region = RegionSize::new(16).expect("valid");
        // 131068 sectors at 16-sector regions: the VM's kernel reported
        // 8192 total regions for exactly this table.
        assert_eq!(region.regions_in(Sectors(131_068)), 8192);
        assert_eq!(region.regions_in(Sectors(131_072)), 8192);
        assert_eq!(region.regions_in(Sectors(131_073)), 8193);
        assert_eq!(RegionSize::MAX.regions_in(Sectors(131_072)), 1);
    }

    #[test]
    fn region_size_parses_digits_only() {
        assert_eq!(
            "128".parse::<RegionSize>().map(RegionSize::bytes),
            Ok(65536)
        );
        assert!(matches!(
            "+128".parse::<RegionSize>(),
            Err(ParseError::InvalidNumber { token, .. }) if token == "+128"
        ));
        assert!(matches!(
            "12".parse::<RegionSize>(),
            Err(ParseError::InvalidRegionSize { token, reason: RegionSizeError::NotPowerOfTwo { sectors: 12 } })
                if token == "12"
        ));
    }

    #[test]
    fn messages_print_what_the_kernel_accepts() {
        // Each of these was sent with `dmsetup message` to the VM's kernel
        // and accepted.
        assert_eq!(
            CloneMessage::EnableHydration.to_string(),
            "enable_hydration"
        );
        assert_eq!(
            CloneMessage::DisableHydration.to_string(),
            "disable_hydration"
        );
        assert_eq!(
            CloneMessage::HydrationThreshold(64).to_string(),
            "hydration_threshold 64"
        );
        assert_eq!(
            CloneMessage::HydrationBatchSize(16).to_string(),
            "hydration_batch_size 16"
        );
    }

    #[test]
    fn messages_parse_like_the_kernel_but_strictly() {
        assert_eq!(
            "HYDRATION_BATCH_SIZE 16".parse(),
            Ok(CloneMessage::HydrationBatchSize(16))
        );
        // The kernel answered EINVAL to these three.
        assert_eq!(
            "hydration_threshold".parse::<CloneMessage>(),
            Err(ParseError::Missing {
                expected: "hydration_threshold"
            })
        );
        assert_eq!(
            "hydration_threshold 0 1".parse::<CloneMessage>(),
            Err(ParseError::UnexpectedToken {
                context: "message",
                token: "1".to_owned()
            })
        );
        assert_eq!(
            "bogus".parse::<CloneMessage>(),
            Err(ParseError::UnknownMessage {
                token: "bogus".to_owned()
            })
        );
        assert!(matches!(
            "hydration_threshold -1".parse::<CloneMessage>(),
            Err(ParseError::InvalidNumber { token, .. }) if token == "-1"
        ));
        assert!(matches!(
            "hydration_threshold 4294967296".parse::<CloneMessage>(),
            Err(ParseError::InvalidNumber { token, .. }) if token == "4294967296"
        ));
    }

    fn message() -> impl Strategy<Value = CloneMessage> {
        prop_oneof![
            Just(CloneMessage::EnableHydration),
            Just(CloneMessage::DisableHydration),
            any::<u32>().prop_map(CloneMessage::HydrationThreshold),
            any::<u32>().prop_map(CloneMessage::HydrationBatchSize),
        ]
    }

    proptest! {
        #[test]
        fn message_round_trips(m in message()) {
            prop_assert_eq!(m.to_string().parse::<CloneMessage>(), Ok(m));
        }

        #[test]
        fn sectors_round_trip(n in any::<u64>()) {
            prop_assert_eq!(Sectors(n).to_string().parse::<Sectors>(), Ok(Sectors(n)));
        }

        #[test]
        fn region_size_round_trips(r in strategies::region_size()) {
            prop_assert_eq!(r.to_string().parse::<RegionSize>(), Ok(r));
            prop_assert_eq!(RegionSize::from_bytes(r.bytes()), Ok(r));
        }

        #[test]
        fn region_size_accepts_exactly_the_kernel_range(sectors in any::<u64>()) {
            let valid = (MIN_REGION_SECTORS..=MAX_REGION_SECTORS).contains(&sectors)
                && sectors.is_power_of_two();
            prop_assert_eq!(RegionSize::new(sectors).is_ok(), valid);
        }
    }
}
