//! Times as the broker shows them: Unix seconds rendered as RFC 3339 UTC text, and RFC 3339 text
//! read back. Pure arithmetic (no clock, no time zone database), shared by the audit log, spans
//! and the command line.

/// RFC 3339 UTC rendering of Unix seconds: `1800000000` → `2027-01-15T08:00:00Z`.
#[must_use]
pub fn rfc3339(unix: i64) -> String {
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(unix.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3_600, secs % 3_600 / 60, secs % 60)
}

/// Reads an RFC 3339 time (`2027-01-15T08:00:00Z`, `2027-01-15T09:00:00.5+01:00`; `t`, `z` and a
/// space for `T` accepted; fractions of a second dropped) or a full date (`2027-01-15`, midnight
/// UTC) as Unix seconds. `None` for anything else, including impossible dates (`2027-02-30`).
#[must_use]
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t = text.trim();
    let (date, rest) = match t.find(['T', 't', ' ']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let days = parse_date(date)?;
    let Some(rest) = rest else { return Some(days * 86_400) };
    // The offset: `Z`, or `+HH:MM` / `-HH:MM` after the time.
    let (clock, offset) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (sign, hm) = (if rest.as_bytes()[i] == b'-' { -1 } else { 1 }, &rest[i + 1..]);
        let (h, m) = hm.split_once(':')?;
        let (h, m) = (two_digits(h)?, two_digits(m)?);
        if h > 23 || m > 59 {
            return None;
        }
        (&rest[..i], sign * (h * 3_600 + m * 60))
    };
    let clock = clock.split_once('.').map_or(clock, |(whole, frac)| {
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) { "" } else { whole }
    });
    let mut parts = clock.split(':');
    let (h, m, s) = (two_digits(parts.next()?)?, two_digits(parts.next()?)?, two_digits(parts.next()?)?);
    // 60 is a leap second, which Unix time folds into the next second.
    if parts.next().is_some() || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days * 86_400 + h * 3_600 + m * 60 + s - offset)
}

/// `YYYY-MM-DD` as days since 1970-01-01, when it names a real day.
fn parse_date(text: &str) -> Option<i64> {
    let mut parts = text.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || !y.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, two_digits(m)?, two_digits(d)?);
    let days = days_from_civil(y, m, d);
    // Round trip: rejects month 13 and day 30 of February alike.
    (m >= 1 && d >= 1 && civil_from_days(days) == (y, m, d)).then_some(days)
}

/// Exactly two ASCII digits.
fn two_digits(text: &str) -> Option<i64> {
    (text.len() == 2 && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
}

/// A proleptic Gregorian (year, month, day) to days since 1970-01-01, after Howard Hinnant's
/// `days_from_civil` (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard Hinnant's
/// `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::{parse_rfc3339, rfc3339};

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn rfc3339_text_reads_back_to_the_same_second() {
        for unix in [0, 1_800_000_000, 951_782_400, -1, 4_102_444_799, 1_700_000_123] {
            assert_eq!(parse_rfc3339(&rfc3339(unix)), Some(unix), "{unix}");
        }
        assert_eq!(parse_rfc3339("2027-01-15"), Some(1_799_971_200));
        assert_eq!(parse_rfc3339("2027-01-15T09:00:00+01:00"), Some(1_800_000_000));
        assert_eq!(parse_rfc3339("2027-01-15T07:30:00-00:30"), Some(1_800_000_000));
        assert_eq!(parse_rfc3339("2027-01-15 08:00:00.999z"), Some(1_800_000_000));
        assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), parse_rfc3339("2017-01-01T00:00:00Z"));
        for bad in [
            "",
            "2027",
            "2027-1-15",
            "2027-02-30",
            "2027-13-01",
            "2027-00-10",
            "27-01-15",
            "2027-01-15T08:00:00",
            "2027-01-15T24:00:00Z",
            "2027-01-15T08:00Z",
            "2027-01-15T08:00:00+1:00",
            "2027-01-15T08:00:00.Z",
            "2027-01-15T08:00:00+01:60",
            "+2027-01-15",
            "2027-01-15Tx",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
