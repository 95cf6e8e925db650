//! Dates and times as text, without a calendar crate: days since the
//! epoch to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).

/// `days` since 1970-01-01 as `YYYY-MM-DD`.
pub fn format_date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    if (0..=9999).contains(&y) {
        format!("{y:04}-{m:02}-{d:02}")
    } else {
        format!("{y:+05}-{m:02}-{d:02}")
    }
}

/// Nanoseconds since midnight as `HH:MM:SS` with `digits` fraction digits.
pub fn format_time_of_day(nanos: i64, digits: u32) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let frac = nanos.rem_euclid(1_000_000_000);
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}{}", fraction(frac, digits))
}

/// A count of 10^-`digits` seconds since the epoch as RFC 3339 (UTC, with
/// the Z when `utc`).
pub fn format_timestamp(value: i64, digits: u32, utc: bool) -> String {
    let per_second = 10i64.pow(digits);
    let secs = value.div_euclid(per_second);
    let frac = value.rem_euclid(per_second) * 10i64.pow(9 - digits);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    format!(
        "{}T{}{}",
        format_date(days),
        format_time_of_day(of_day * 1_000_000_000 + frac, digits),
        if utc { "Z" } else { "" }
    )
}

fn fraction(nanos: i64, digits: u32) -> String {
    if digits == 0 {
        return String::new();
    }
    let scaled = nanos / 10i64.pow(9 - digits);
    format!(".{scaled:0width$}", width = digits as usize)
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_instants() {
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(19_844), "2024-05-01");
        assert_eq!(format_date(-1), "1969-12-31");
        assert_eq!(format_date(11_016), "2000-02-29");
        assert_eq!(
            format_timestamp(1_714_564_800_123, 3, true),
            "2024-05-01T12:00:00.123Z"
        );
        assert_eq!(format_timestamp(-1, 6, false), "1969-12-31T23:59:59.999999");
        assert_eq!(
            format_timestamp(5, 9, true),
            "1970-01-01T00:00:00.000000005Z"
        );
        assert_eq!(format_time_of_day(3_723_004_000_000, 3), "01:02:03.004");
    }

    proptest! {
        #[test]
        fn no_instant_panics(v in any::<i64>(), digits in prop_oneof![Just(3u32), Just(6), Just(9)]) {
            let text = format_timestamp(v, digits, true);
            prop_assert!(text.ends_with('Z'));
            let _ = format_date(i64::from(v as i32));
        }
    }
}
