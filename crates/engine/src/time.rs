//! Date and time arithmetic as PostgreSQL does it, for values the file
//! stores as epoch numbers or text: intervals added to timestamps
//! (calendar months included), days added to dates, `date_trunc`,
//! `extract` and `date_part`. Times are UTC (the engine's only TimeZone).

use crate::types::{civil_from_days, days_from_civil, format_timestamp};

const DAY: i64 = 86_400_000_000;

/// An interval: calendar months, days, and microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interval {
    pub months: i64,
    pub days: i64,
    pub micros: i64,
}

impl Interval {
    /// PostgreSQL's interval input: `7 days`, `-1 day 2 hours`, `3 mons`,
    /// `1 year 2 months`, `00:30:00`, `1.5 hours`, with `ago`.
    pub fn parse(text: &str) -> Option<Interval> {
        let mut out = Interval::default();
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut i = 0;
        let mut any = false;
        while i < words.len() {
            let w = words[i];
            if w.eq_ignore_ascii_case("ago") {
                out = Interval {
                    months: -out.months,
                    days: -out.days,
                    micros: -out.micros,
                };
                i += 1;
                continue;
            }
            if w.contains(':') {
                let negative = w.starts_with('-');
                let parts: Vec<&str> = w.trim_start_matches(['-', '+']).split(':').collect();
                let hours: i64 = parts.first()?.parse().ok()?;
                let minutes: i64 = parts.get(1).map(|m| m.parse().ok()).unwrap_or(Some(0))?;
                let seconds: f64 = parts.get(2).map(|s| s.parse().ok()).unwrap_or(Some(0.0))?;
                let micros =
                    (hours * 3600 + minutes * 60) * 1_000_000 + (seconds * 1e6).round() as i64;
                out.micros += if negative { -micros } else { micros };
                any = true;
                i += 1;
                continue;
            }
            // A number with its unit either attached (`7days`) or next.
            let split = w.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(w.len());
            let (number, unit) = if split < w.len() {
                (&w[..split], w[split..].to_string())
            } else {
                i += 1;
                (
                    w,
                    words
                        .get(i)
                        .map(|u| u.to_string())
                        .unwrap_or_else(|| "second".to_string()),
                )
            };
            let n: f64 = number.parse().ok()?;
            let unit = unit.to_ascii_lowercase();
            let unit = unit.trim_end_matches(',');
            match unit {
                "microsecond" | "microseconds" | "us" | "usec" | "usecs" => {
                    out.micros += n.round() as i64
                }
                "millisecond" | "milliseconds" | "ms" | "msec" | "msecs" => {
                    out.micros += (n * 1e3).round() as i64
                }
                "second" | "seconds" | "s" | "sec" | "secs" => {
                    out.micros += (n * 1e6).round() as i64
                }
                "minute" | "minutes" | "m" | "min" | "mins" => {
                    out.micros += (n * 6e7).round() as i64
                }
                "hour" | "hours" | "h" | "hr" | "hrs" => out.micros += (n * 3.6e9).round() as i64,
                "day" | "days" | "d" => {
                    out.days += n.trunc() as i64;
                    out.micros += (n.fract() * DAY as f64).round() as i64;
                }
                "week" | "weeks" | "w" => {
                    let days = n * 7.0;
                    out.days += days.trunc() as i64;
                    out.micros += (days.fract() * DAY as f64).round() as i64;
                }
                "month" | "months" | "mon" | "mons" => {
                    out.months += n.trunc() as i64;
                    out.days += (n.fract() * 30.0).round() as i64;
                }
                "year" | "years" | "y" | "yr" | "yrs" => out.months += (n * 12.0).round() as i64,
                _ => return None,
            }
            any = true;
            i += 1;
        }
        any.then_some(out)
    }

    pub fn negated(self) -> Interval {
        Interval {
            months: -self.months,
            days: -self.days,
            micros: -self.micros,
        }
    }
}

/// `micros` (since 1970) plus `months` calendar months, the day clamped
/// to the month's end as PostgreSQL does.
fn add_months(micros: i64, months: i64) -> i64 {
    if months == 0 {
        return micros;
    }
    let days = micros.div_euclid(DAY);
    let in_day = micros.rem_euclid(DAY);
    let (y, m, d) = civil_from_days(days);
    let total = y * 12 + (m - 1) + months;
    let (ny, nm) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    let last = days_in_month(ny, nm);
    days_from_civil(ny, nm, d.min(last)) * DAY + in_day
}

fn days_in_month(y: i64, m: i64) -> i64 {
    let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(next.0, next.1, 1) - days_from_civil(y, m, 1)
}

pub fn add(micros: i64, iv: Interval) -> i64 {
    add_months(micros, iv.months) + iv.days * DAY + iv.micros
}

/// `date_trunc(unit, t)`.
pub fn trunc(unit: &str, micros: i64) -> Option<i64> {
    let days = micros.div_euclid(DAY);
    let (y, m, _) = civil_from_days(days);
    Some(match unit.to_ascii_lowercase().as_str() {
        "microseconds" | "microsecond" => micros,
        "milliseconds" | "millisecond" => micros.div_euclid(1000) * 1000,
        "second" | "seconds" => micros.div_euclid(1_000_000) * 1_000_000,
        "minute" | "minutes" => micros.div_euclid(60_000_000) * 60_000_000,
        "hour" | "hours" => micros.div_euclid(3_600_000_000) * 3_600_000_000,
        "day" | "days" => days * DAY,
        // ISO weeks start on Monday; 1970-01-01 was a Thursday.
        "week" | "weeks" => (days - (days + 3).rem_euclid(7)) * DAY,
        "month" | "months" => days_from_civil(y, m, 1) * DAY,
        "quarter" => days_from_civil(y, (m - 1) / 3 * 3 + 1, 1) * DAY,
        "year" | "years" => days_from_civil(y, 1, 1) * DAY,
        "decade" => days_from_civil(y.div_euclid(10) * 10, 1, 1) * DAY,
        "century" => days_from_civil((y - 1).div_euclid(100) * 100 + 1, 1, 1) * DAY,
        _ => return None,
    })
}

/// `extract(field FROM t)` as PostgreSQL's numeric text; `date` says the
/// value is a date (no time part, and epoch without a fraction).
pub fn extract(field: &str, micros: i64, date: bool) -> Option<String> {
    let days = micros.div_euclid(DAY);
    let in_day = micros.rem_euclid(DAY);
    let (y, m, d) = civil_from_days(days);
    let six = |v: i64| {
        let sign = if v < 0 { "-" } else { "" };
        format!(
            "{sign}{}.{:06}",
            (v / 1_000_000).abs(),
            (v % 1_000_000).abs()
        )
    };
    Some(match field.to_ascii_lowercase().as_str() {
        "year" => y.to_string(),
        "month" => m.to_string(),
        "day" => d.to_string(),
        "hour" if !date => (in_day / 3_600_000_000).to_string(),
        "minute" if !date => (in_day / 60_000_000 % 60).to_string(),
        "second" if !date => six(in_day % 60_000_000),
        "millisecond" | "milliseconds" if !date => {
            let v = in_day % 60_000_000;
            format!("{}.{:03}", v / 1000, v % 1000)
        }
        "microsecond" | "microseconds" if !date => (in_day % 60_000_000).to_string(),
        "epoch" if date => (micros / 1_000_000).to_string(),
        "epoch" => six(micros),
        "dow" => (days + 4).rem_euclid(7).to_string(),
        "isodow" => ((days + 3).rem_euclid(7) + 1).to_string(),
        "doy" => (days - days_from_civil(y, 1, 1) + 1).to_string(),
        "quarter" => ((m - 1) / 3 + 1).to_string(),
        "week" => iso_week(days).to_string(),
        "decade" => y.div_euclid(10).to_string(),
        "century" => ((y - 1).div_euclid(100) + 1).to_string(),
        _ => return None,
    })
}

/// The ISO-8601 week number of a day.
fn iso_week(days: i64) -> i64 {
    let weekday = (days + 3).rem_euclid(7);
    // The Thursday of this ISO week decides its year.
    let thursday = days - weekday + 3;
    let (y, _, _) = civil_from_days(thursday);
    (thursday - days_from_civil(y, 1, 1)) / 7 + 1
}

/// A date (days since 1970) as PostgreSQL prints it.
pub fn date_text(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

pub fn timestamp_text(micros: i64) -> String {
    format_timestamp(micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: &str) -> i64 {
        cutover_sqlite::canonical::timestamp_micros(t).unwrap()
    }

    #[test]
    fn intervals_add_as_postgresql() {
        let iv = Interval::parse("1 month").unwrap();
        assert_eq!(
            timestamp_text(add(at("2024-01-31 10:00:00"), iv)),
            "2024-02-29 10:00:00+00"
        );
        let iv = Interval::parse("7 days").unwrap().negated();
        assert_eq!(
            timestamp_text(add(at("2024-03-05 00:00:00"), iv)),
            "2024-02-27 00:00:00+00"
        );
        let iv = Interval::parse("1 day 02:30:00").unwrap();
        assert_eq!(
            timestamp_text(add(at("2024-03-05 00:00:00"), iv)),
            "2024-03-06 02:30:00+00"
        );
        assert_eq!(
            Interval::parse("2 hours ago").unwrap().micros,
            -7_200_000_000
        );
        assert!(Interval::parse("7 fortnights").is_none());
    }

    #[test]
    fn truncates_and_extracts_as_postgresql() {
        let t = at("2024-03-07 13:45:12.5");
        assert_eq!(
            timestamp_text(trunc("week", t).unwrap()),
            "2024-03-04 00:00:00+00"
        );
        assert_eq!(
            timestamp_text(trunc("quarter", t).unwrap()),
            "2024-01-01 00:00:00+00"
        );
        assert_eq!(extract("second", t, false).unwrap(), "12.500000");
        assert_eq!(extract("dow", t, false).unwrap(), "4");
        assert_eq!(extract("doy", t, false).unwrap(), "67");
        assert_eq!(extract("week", t, false).unwrap(), "10");
        assert_eq!(
            extract("epoch", at("2024-01-01"), true).unwrap(),
            "1704067200"
        );
    }
}
