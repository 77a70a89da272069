//! Sizes and durations for people: the progress messages, events and logs
//! that an operator reads. Machine-readable fields carry exact numbers; these
//! strings are only ever shown, never parsed back.

use std::time::Duration;

/// Binary units above bytes, in order. `u64::MAX` is just under 16 EiB, so
/// the list never runs out.
const BINARY_UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// A byte count in binary units with one decimal, e.g. `"1.5 GiB"`; below
/// 1 KiB the exact count, e.g. `"512 B"`.
///
/// The value is rounded half up to a tenth of the unit, and a count that
/// would round to 1024.0 of one unit is shown as 1.0 of the next, so the
/// number before the unit is always below 1024.
pub fn format_bytes(bytes: u64) -> String {
    const STEP: u128 = 1024;
    if u128::from(bytes) < STEP {
        return format!("{bytes} B");
    }
    // Exact integer arithmetic: u128 holds u64::MAX * 10 with room to spare,
    // and floats would misround values near a unit boundary.
    let value = u128::from(bytes);
    let mut unit_bytes = STEP;
    let mut shown = None;
    for name in BINARY_UNITS {
        let tenths = (value * 10 + unit_bytes / 2) / unit_bytes;
        shown = Some((tenths, name));
        if tenths < STEP * 10 {
            break;
        }
        unit_bytes *= STEP;
    }
    match shown {
        Some((tenths, name)) => format!("{}.{} {name}", tenths / 10, tenths % 10),
        // BINARY_UNITS is not empty, so the loop ran at least once.
        None => format!("{bytes} B"),
    }
}

/// A rate as [`format_bytes`] per second, e.g. `"120.0 MiB/s"`.
pub fn format_rate(bytes_per_second: u64) -> String {
    format!("{}/s", format_bytes(bytes_per_second))
}

/// A duration in its two largest units, truncated: `"45s"`, `"3m12s"`,
/// `"1h04m"`, `"2d03h"`. The second unit is zero-padded so that values line
/// up in a column; below one second it reads `"0s"`.
pub fn format_duration(duration: Duration) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    let secs = duration.as_secs();
    if secs < MINUTE {
        format!("{secs}s")
    } else if secs < HOUR {
        format!("{}m{:02}s", secs / MINUTE, secs % MINUTE)
    } else if secs < DAY {
        format!("{}h{:02}m", secs / HOUR, secs % HOUR / MINUTE)
    } else {
        format!("{}d{:02}h", secs / DAY, secs % DAY / HOUR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn bytes_below_one_kib_are_exact() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1), "1 B");
        assert_eq!(format_bytes(1023), "1023 B");
    }

    #[test]
    fn bytes_use_binary_units_with_one_decimal() {
        assert_eq!(format_bytes(KIB), "1.0 KiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(GIB + GIB / 2), "1.5 GiB");
        assert_eq!(format_bytes(10 * GIB), "10.0 GiB");
        assert_eq!(format_bytes(1 << 40), "1.0 TiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn bytes_round_half_up_and_carry_into_the_next_unit() {
        // 1.25 KiB is exactly halfway between 1.2 and 1.3.
        assert_eq!(format_bytes(1280), "1.3 KiB");
        assert_eq!(format_bytes(1279), "1.2 KiB");
        // One byte short of 1 MiB rounds to 1024.0 KiB: shown as 1.0 MiB.
        assert_eq!(format_bytes(MIB - 1), "1.0 MiB");
        assert_eq!(format_bytes(1023 * KIB), "1023.0 KiB");
    }

    #[test]
    fn rates_append_per_second() {
        assert_eq!(format_rate(120 * MIB), "120.0 MiB/s");
        assert_eq!(format_rate(0), "0 B/s");
    }

    #[test]
    fn durations_show_two_units_truncated() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(999)), "0s");
        assert_eq!(format_duration(Duration::from_secs(59)), "59s");
        assert_eq!(format_duration(Duration::from_secs(60)), "1m00s");
        assert_eq!(format_duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(format_duration(Duration::from_secs(3599)), "59m59s");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h00m");
        assert_eq!(format_duration(Duration::from_secs(3840 + 59)), "1h04m");
        assert_eq!(
            format_duration(Duration::from_secs(86_400 * 2 + 3 * 3600)),
            "2d03h"
        );
    }
}
