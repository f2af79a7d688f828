//! The `at` and `since` arguments: a version id, a duration back from now, or a time.

/// Durations longer than this are not meant as durations: `123456789d` is a version id.
const MAX_DURATION_MS: u64 = 10 * 366 * 24 * 3600 * 1000;
/// A version id needs this many hex digits, so it is never mistaken for a short duration.
pub(crate) const MIN_ID_LEN: usize = 6;

/// What an `at` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum When {
    /// A hex prefix of a snapshot id.
    Id(String),
    /// Unix ms.
    At(u64),
}

/// `10m`, `1h30m`, `2d` (s, m, h, d, w) back from `now`; a time as `2026-05-01T14:30:00Z` (or
/// with a space for `T`, seconds and fractions optional, `Z` or `±HH:MM`); or a version id.
pub(crate) fn parse(text: &str, now_ms: u64, ids: bool) -> Option<When> {
    let t = text.trim();
    if let Some(ms) = duration_ms(t) {
        return Some(When::At(now_ms.saturating_sub(ms)));
    }
    if let Some(at) = time_ms(t) {
        return Some(When::At(at));
    }
    let hex = t.len() >= MIN_ID_LEN && t.len() <= 40 && t.bytes().all(|b| b.is_ascii_hexdigit());
    (ids && hex).then(|| When::Id(t.to_ascii_lowercase()))
}

fn duration_ms(t: &str) -> Option<u64> {
    if t.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().ok()?;
        digits.clear();
        let unit = match c {
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 7 * 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    // A bare number has no unit: neither a duration nor (alone) a time.
    (digits.is_empty() && total <= MAX_DURATION_MS).then_some(total)
}

fn time_ms(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    if b.len() < 16 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute) = (num(11..13)?, num(14..16)?);
    if b[13] != b':' {
        return None;
    }
    let mut rest = &t[16..];
    let mut second = 0;
    let mut millis = 0;
    if let Some(r) = rest.strip_prefix(':') {
        second = r.get(0..2)?.parse::<i64>().ok()?;
        rest = &r[2..];
        if let Some(r) = rest.strip_prefix('.') {
            let frac: String = r.chars().take_while(char::is_ascii_digit).collect();
            rest = &r[frac.len()..];
            let padded = format!("{frac:0<3}");
            millis = padded.get(0..3)?.parse::<i64>().ok()?;
        }
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let r = &rest[1..];
            if r.len() != 5 || r.as_bytes()[2] != b':' {
                return None;
            }
            sign * (r[0..2].parse::<i64>().ok()? * 60 + r[3..5].parse::<i64>().ok()?)
        }
    };
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour < 24
        && minute < 60
        && second < 61;
    if !valid {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
    u64::try_from(secs * 1000 + millis).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix ms as `2026-05-01T14:30:00Z`, for messages.
pub(crate) fn format_utc(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Inverse of `days_from_civil`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(parse("10m", NOW, true), Some(When::At(NOW - 600_000)));
        assert_eq!(parse("1h30m", NOW, true), Some(When::At(NOW - 5_400_000)));
        assert_eq!(parse("2d", NOW, true), Some(When::At(NOW - 172_800_000)));
        assert_eq!(parse("90", NOW, false), None, "a bare number has no unit");
        assert_eq!(parse("5x", NOW, true), None);
    }

    #[test]
    fn times_are_rfc3339_with_a_zone() {
        assert_eq!(time_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(time_ms("2026-05-01T14:30:00Z"), Some(1_777_645_800_000));
        assert_eq!(
            time_ms("2026-05-01 16:30:00.250+02:00"),
            Some(1_777_645_800_250)
        );
        assert_eq!(time_ms("2026-05-01T14:30Z"), Some(1_777_645_800_000));
        assert_eq!(time_ms("2026-13-01T14:30Z"), None);
        assert_eq!(time_ms("2026-05-01T14:30"), None, "a time needs its zone");
        assert_eq!(format_utc(1_777_645_800_000), "2026-05-01T14:30:00Z");
    }

    #[test]
    fn hex_of_six_or_more_digits_is_an_id_unless_it_is_a_duration() {
        assert_eq!(
            parse("3f2a1c9b", NOW, true),
            Some(When::Id("3f2a1c9b".into()))
        );
        assert_eq!(parse("3f2a1", NOW, true), None, "too short for an id");
        assert_eq!(
            parse("123456789d", NOW, true),
            Some(When::Id("123456789d".into())),
            "longer than ten years: an id"
        );
        assert_eq!(parse("3f2a1c9b", NOW, false), None);
    }
}
