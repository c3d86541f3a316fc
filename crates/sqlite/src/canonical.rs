//! Canonical values: one spelling per value of a PostgreSQL type, so a
//! value converted from the SQLite file and the same value as PostgreSQL
//! prints it compare equal exactly when they mean the same. Verify hashes
//! and compares these on both sides.
//!
//! PostgreSQL's side is read with the control session's settings
//! (`DateStyle=ISO`, `TimeZone=UTC`, `extra_float_digits=3`,
//! `bytea_output=hex`).

use std::borrow::Cow;

/// `text` (PostgreSQL input or output text of a `pg_type` value) in its
/// canonical spelling; an error says what could not be read.
pub fn canonical<'a>(pg_type: &str, text: &'a str) -> Result<Cow<'a, str>, String> {
    let t = text.trim();
    let unreadable = || format!("{text:?} is not a {pg_type}");
    Ok(match pg_type {
        "smallint" | "integer" | "bigint" => {
            let n = t.parse::<i64>().map_err(|_| unreadable())?;
            // Already canonical (the common case) is borrowed.
            let plain = t.len() == text.len()
                && !t.starts_with('+')
                && !(t.len() > 1 && (t.starts_with('0') || t.starts_with("-0")));
            if plain {
                Cow::Borrowed(t)
            } else {
                Cow::Owned(n.to_string())
            }
        }
        "boolean" => Cow::Borrowed(match t {
            "t" => "t",
            "f" => "f",
            _ if ["true", "yes", "y", "1", "on"]
                .iter()
                .any(|b| b.eq_ignore_ascii_case(t)) =>
            {
                "t"
            }
            _ if ["false", "no", "n", "0", "off"]
                .iter()
                .any(|b| b.eq_ignore_ascii_case(t)) =>
            {
                "f"
            }
            _ => return Err(unreadable()),
        }),
        "numeric" => Cow::Owned(decimal(t).ok_or_else(unreadable)?),
        "double precision" => {
            let f: f64 = t.parse().map_err(|_| unreadable())?;
            Cow::Owned(format!("{f:?}"))
        }
        "timestamptz" => Cow::Owned(timestamp_micros(t).ok_or_else(unreadable)?.to_string()),
        "jsonb" => Cow::Owned(
            serde_json::from_str::<serde_json::Value>(t)
                .map_err(|_| unreadable())?
                .to_string(),
        ),
        "uuid" | "bytea" if t.bytes().any(|b| b.is_ascii_uppercase()) || t.len() != text.len() => {
            Cow::Owned(t.to_ascii_lowercase())
        }
        "uuid" | "bytea" => Cow::Borrowed(t),
        _ => Cow::Borrowed(text),
    })
}

/// A decimal as PostgreSQL's numeric prints it: no `+`, no leading zeros,
/// `0.5` for `.5`, the scale kept, no negative zero.
fn decimal(t: &str) -> Option<String> {
    let (negative, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if (whole.is_empty() && fraction.is_empty())
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    let zero = whole == "0" && fraction.bytes().all(|b| b == b'0');
    let sign = if negative && !zero { "-" } else { "" };
    Some(if fraction.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    })
}

/// Microseconds since the epoch of `YYYY-MM-DD[( |T)HH:MM[:SS[.f]]][Z|±HH[:MM]]`;
/// without an offset the time is UTC.
pub fn timestamp_micros(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let number = |s: &str| -> Option<i64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (year, month, day) = (number(&t[..4])?, number(&t[5..7])?, number(&t[8..10])?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut rest = &t[10..];
    let (mut hour, mut minute, mut second, mut micros) = (0, 0, 0, 0);
    if let Some(time) = rest.strip_prefix(['T', 't', ' ']) {
        let end = time
            .find(|c: char| !(c.is_ascii_digit() || c == ':' || c == '.'))
            .unwrap_or(time.len());
        let (clock, zone) = time.split_at(end);
        let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
        let mut parts = hms.split(':');
        hour = number(parts.next()?)?;
        minute = number(parts.next()?)?;
        second = parts.next().map(number).unwrap_or(Some(0))?;
        if parts.next().is_some() || hour > 24 || minute > 59 || second > 60 {
            return None;
        }
        if !fraction.is_empty() {
            // Microsecond precision, rounded half up as PostgreSQL does.
            let digits: String = fraction.chars().chain("0000000".chars()).take(7).collect();
            let seven = number(&digits)?;
            micros = (seven + 5) / 10;
        }
        rest = zone;
    }
    let offset_seconds = match rest.trim() {
        "" | "Z" | "z" => 0,
        zone => {
            let sign = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let digits = zone[1..].replace(':', "");
            let (h, m, s) = match digits.len() {
                1 | 2 => (number(&digits)?, 0, 0),
                4 => (number(&digits[..2])?, number(&digits[2..])?, 0),
                6 => (
                    number(&digits[..2])?,
                    number(&digits[2..4])?,
                    number(&digits[4..])?,
                ),
                _ => return None,
            };
            sign * (h * 3600 + m * 60 + s)
        }
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(seconds * 1_000_000 + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (after Howard
/// Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_instant_in_every_spelling_is_one_value() {
        let utc = canonical("timestamptz", "2024-03-01 12:30:00+00").unwrap();
        for spelling in [
            "2024-03-01T12:30:00Z",
            "2024-03-01T12:30:00.000Z",
            "2024-03-01 12:30:00",
            "2024-03-01 12:30",
            "2024-03-01T14:30:00+02:00",
            "2024-03-01T07:30:00-0500",
            "2024-03-01 12:30:00.0000004",
        ] {
            assert_eq!(
                canonical("timestamptz", spelling).unwrap(),
                utc,
                "{spelling}"
            );
        }
        assert_eq!(
            canonical("timestamptz", "1970-01-01 00:00:01.5+00").unwrap(),
            "1500000"
        );
        assert_eq!(
            canonical("timestamptz", "1969-12-31").unwrap(),
            "-86400000000"
        );
        assert!(canonical("timestamptz", "yesterday").is_err());
        assert!(canonical("timestamptz", "2024-13-01").is_err());
    }

    #[test]
    fn numbers_json_and_booleans_have_one_spelling() {
        assert_eq!(canonical("numeric", "+0149.990").unwrap(), "149.990");
        assert_eq!(canonical("numeric", ".5").unwrap(), "0.5");
        assert_eq!(canonical("numeric", "-0.00").unwrap(), "0.00");
        assert_ne!(
            canonical("numeric", "149.99").unwrap(),
            canonical("numeric", "149.98999").unwrap()
        );
        assert_eq!(canonical("double precision", "0.1").unwrap(), "0.1");
        assert_eq!(
            canonical("double precision", "1e21").unwrap(),
            canonical("double precision", "1000000000000000000000").unwrap()
        );
        assert_eq!(
            canonical("jsonb", r#"{"b": [1, 2], "a": {"y": null}}"#).unwrap(),
            canonical("jsonb", r#"{"a":{"y":null},"b":[1,2]}"#).unwrap()
        );
        assert_eq!(canonical("boolean", "true").unwrap(), "t");
        assert!(canonical("integer", "12abc").is_err());
        assert_eq!(canonical("text", " padded ").unwrap(), " padded ");
    }
}
