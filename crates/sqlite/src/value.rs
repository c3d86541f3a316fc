//! One stored SQLite value as PostgreSQL input text for its column's type,
//! read through the column's codec: what convert copies, what verify
//! compares and what the stream will apply. A value the codec cannot read
//! is an error naming it, never a guess. Reading accepts every form the
//! column's family allows (epoch ms, epoch s and text in one date-time
//! column), so a column an ORM filled in several ways converts whole; the
//! codec says how new values are written.

use crate::schema_map::Column;
use rusqlite::types::ValueRef;

/// A value that does not fit its column, as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{column}: {stored} does not fit {pg_type}")]
pub struct BadValue {
    pub column: String,
    pub pg_type: String,
    /// The value as SQLite would print it, with its storage class.
    pub stored: String,
}

impl Column {
    /// Whether `value` converts, without building its text where the
    /// answer is plain (integers in integer columns, text in text columns).
    pub fn fits(&self, value: ValueRef<'_>) -> bool {
        match (self.pg_type.as_str(), value) {
            (_, ValueRef::Null) => true,
            (
                "bigint" | "integer" | "smallint" | "numeric" | "double precision",
                ValueRef::Integer(_),
            ) => true,
            ("bytea", ValueRef::Blob(_)) => true,
            (ty, ValueRef::Text(t)) if is_text(ty) => !t.contains(&0) && utf8(t).is_some(),
            _ => self.to_pg_text(value).is_ok(),
        }
    }

    /// `value` as PostgreSQL input text for this column (None for NULL).
    pub fn to_pg_text(&self, value: ValueRef<'_>) -> Result<Option<String>, BadValue> {
        if let ValueRef::Null = value {
            return Ok(None);
        }
        let bad = || BadValue {
            column: self.name.clone(),
            pg_type: self.pg_type.clone(),
            stored: describe(value),
        };
        let text = match (self.pg_type.as_str(), value) {
            ("bigint" | "integer" | "smallint", ValueRef::Integer(i)) => i.to_string(),
            ("bigint" | "integer" | "smallint", ValueRef::Text(t)) => {
                let t = utf8(t).ok_or_else(bad)?.trim();
                t.parse::<i64>().map_err(|_| bad())?.to_string()
            }
            ("double precision", ValueRef::Text(t)) => {
                let t = utf8(t).ok_or_else(bad)?.trim();
                float(t.parse::<f64>().map_err(|_| bad())?)
            }
            ("double precision", ValueRef::Integer(i)) => i.to_string(),
            ("double precision", ValueRef::Real(f)) => float(f),
            ("numeric", ValueRef::Integer(i)) => i.to_string(),
            ("numeric", ValueRef::Real(f)) if f.is_finite() => float(f),
            ("numeric", ValueRef::Text(t)) => {
                let t = utf8(t).ok_or_else(bad)?;
                if is_decimal(t.trim()) {
                    t.trim().to_string()
                } else {
                    return Err(bad());
                }
            }
            ("boolean", v) => boolean(v).ok_or_else(bad)?.to_string(),
            ("timestamptz" | "timestamp", v) => timestamp(v).ok_or_else(bad)?,
            ("date", ValueRef::Text(t)) => {
                let t = utf8(t).ok_or_else(bad)?;
                if t.len() == 10 && t.as_bytes()[4] == b'-' {
                    t.to_string()
                } else {
                    return Err(bad());
                }
            }
            ("jsonb" | "json", ValueRef::Text(t)) => {
                let t = utf8(t).ok_or_else(bad)?;
                serde_json::from_str::<serde_json::Value>(t).map_err(|_| bad())?;
                t.to_string()
            }
            ("uuid", ValueRef::Text(t)) => {
                let t = utf8(t).ok_or_else(bad)?.trim();
                let hex = t.bytes().filter(|b| *b != b'-').collect::<Vec<_>>();
                if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
                    return Err(bad());
                }
                t.to_ascii_lowercase()
            }
            ("uuid", ValueRef::Blob(b)) if b.len() == 16 => uuid(b),
            ("bytea", ValueRef::Blob(b)) => hex(b),
            ("bytea", ValueRef::Text(t)) => hex(t),
            // PostgreSQL text cannot hold NUL.
            (ty, ValueRef::Text(t)) if is_text(ty) && !t.contains(&0) => {
                utf8(t).ok_or_else(bad)?.to_string()
            }
            // A BLOB in a text column is text when it is valid UTF-8.
            (ty, ValueRef::Blob(b)) if is_text(ty) && !b.contains(&0) => {
                utf8(b).ok_or_else(bad)?.to_string()
            }
            (ty, ValueRef::Integer(i)) if is_text(ty) => i.to_string(),
            (ty, ValueRef::Real(f)) if is_text(ty) => float(f),
            _ => return Err(bad()),
        };
        Ok(Some(text))
    }
}

impl Column {
    /// PostgreSQL output text of this column's type as the value to store
    /// in the file, in the column's codec (epoch s/ms, ISO text, 0/1,
    /// 'true'/'false', JSON text): what the reverse stream writes, so the
    /// file keeps its own conventions.
    pub fn from_pg_text(&self, text: &str) -> Result<rusqlite::types::Value, BadValue> {
        use crate::schema_map::{Codec, TimeCodec};
        use rusqlite::types::Value;
        let bad = || BadValue {
            column: self.name.clone(),
            pg_type: self.pg_type.clone(),
            stored: text.to_string(),
        };
        let t = text.trim();
        Ok(match self.pg_type.as_str() {
            "bigint" | "integer" | "smallint" => Value::Integer(t.parse().map_err(|_| bad())?),
            "double precision" => Value::Real(match t {
                "NaN" => f64::NAN,
                "Infinity" => f64::INFINITY,
                "-Infinity" => f64::NEG_INFINITY,
                t => t.parse().map_err(|_| bad())?,
            }),
            "numeric" => match t.parse::<i64>() {
                Ok(i) => Value::Integer(i),
                Err(_) => Value::Real(t.parse().map_err(|_| bad())?),
            },
            "boolean" => {
                let b = match t {
                    "t" | "true" => true,
                    "f" | "false" => false,
                    _ => return Err(bad()),
                };
                match self.codec {
                    Codec::BoolText => Value::Text(if b { "true" } else { "false" }.to_string()),
                    _ => Value::Integer(i64::from(b)),
                }
            }
            "timestamptz" | "timestamp" => {
                let micros = crate::canonical::timestamp_micros(t).ok_or_else(bad)?;
                match self.codec {
                    Codec::Time(TimeCodec::UnixMillis) => Value::Integer(micros.div_euclid(1000)),
                    Codec::Time(TimeCodec::UnixSeconds) => {
                        Value::Integer(micros.div_euclid(1_000_000))
                    }
                    _ => Value::Text(iso_text(micros)),
                }
            }
            "bytea" => {
                let h = t.strip_prefix("\\x").ok_or_else(bad)?;
                Value::Blob(
                    (0..h.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(h.get(i..i + 2).unwrap_or("zz"), 16))
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad())?,
                )
            }
            _ => Value::Text(text.to_string()),
        })
    }
}

/// A time as ISO-8601 UTC text with milliseconds, as JavaScript's
/// `toISOString` writes it (the form ORMs leave in SQLite files), or with
/// microseconds when the time has them (PostgreSQL's `now()` does), so
/// nothing is cut off.
pub fn iso_text(micros: i64) -> String {
    let seconds = micros.div_euclid(1_000_000);
    let text = epoch_text(seconds, 0);
    let date_time = text.trim_end_matches("+00").replacen(' ', "T", 1);
    let fraction = micros.rem_euclid(1_000_000);
    if fraction % 1000 == 0 {
        format!("{date_time}.{:03}Z", fraction / 1000)
    } else {
        format!("{date_time}.{fraction:06}Z")
    }
}

fn is_text(pg_type: &str) -> bool {
    pg_type == "text" || pg_type.starts_with("varchar")
}

/// A stored value as it reads, for reports: the text itself, not quoted.
pub fn raw(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".to_string(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => format!("blob of {} bytes", b.len()),
    }
}

fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// The shortest text that reads back as the same double, in PostgreSQL's
/// spelling for the special values.
fn float(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_string()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        format!("{f}")
    }
}

fn is_decimal(t: &str) -> bool {
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    let mut parts = digits.splitn(2, '.');
    let whole = parts.next().unwrap_or("");
    let fraction = parts.next().unwrap_or("");
    !(whole.is_empty() && fraction.is_empty())
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit())
}

fn boolean(value: ValueRef<'_>) -> Option<&'static str> {
    match value {
        ValueRef::Integer(0) => Some("f"),
        ValueRef::Integer(1) => Some("t"),
        ValueRef::Text(t) => match utf8(t)?.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" => Some("t"),
            "false" | "f" | "no" | "n" | "0" => Some("f"),
            _ => None,
        },
        _ => None,
    }
}

/// Epoch integers (milliseconds from 10^11 up, else seconds), epoch reals
/// (seconds), and date-time text; text without an offset means UTC.
fn timestamp(value: ValueRef<'_>) -> Option<String> {
    match value {
        ValueRef::Integer(i) if i.unsigned_abs() >= 100_000_000_000 => {
            Some(epoch_text(i.div_euclid(1000), i.rem_euclid(1000) * 1000))
        }
        ValueRef::Integer(i) => Some(epoch_text(i, 0)),
        ValueRef::Real(f) if f.is_finite() => {
            let micros = (f * 1_000_000.0).round() as i64;
            Some(epoch_text(
                micros.div_euclid(1_000_000),
                micros.rem_euclid(1_000_000),
            ))
        }
        ValueRef::Text(t) => {
            let t = utf8(t)?.trim();
            let b = t.as_bytes();
            let dated = b.len() >= 10 && b[4] == b'-' && b[7] == b'-';
            if !dated {
                return None;
            }
            let rest = &t[10..];
            let zoned = rest.ends_with('Z')
                || rest.ends_with('z')
                || rest
                    .rfind(['+', '-'])
                    .is_some_and(|i| i > 0 && rest[i..].len() >= 3);
            Some(if zoned {
                t.to_string()
            } else {
                format!("{t}+00")
            })
        }
        _ => None,
    }
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]+00` for seconds and microseconds since
/// the epoch (days to civil dates after Howard Hinnant's algorithm).
fn epoch_text(seconds: i64, micros: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let fraction = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}{fraction}+00")
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 + bytes.len() * 2);
    out.push_str("\\x");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn uuid(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A stored value as `class value`, for error messages.
fn describe(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "null".to_string(),
        ValueRef::Integer(i) => format!("integer {i}"),
        ValueRef::Real(f) => format!("real {f}"),
        ValueRef::Text(t) => format!("text {:?}", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => format!("blob of {} bytes", b.len()),
    }
}

#[cfg(test)]
mod tests {
    use crate::SchemaMap;
    use rusqlite::Connection;

    /// Every value of `table.column` as converted, in rowid order.
    fn converted(
        conn: &Connection,
        table: &str,
        column: &str,
    ) -> Vec<Result<Option<String>, String>> {
        let map = SchemaMap::read(conn, &[]).unwrap();
        let col = map
            .tables
            .iter()
            .find(|t| t.name == table)
            .and_then(|t| t.columns.iter().find(|c| c.name == column))
            .unwrap()
            .clone();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT \"{column}\" FROM \"{table}\" ORDER BY rowid"
            ))
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        let mut out = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            out.push(
                col.to_pg_text(row.get_ref(0).unwrap())
                    .map_err(|e| e.to_string()),
            );
        }
        out
    }

    fn ok(v: &str) -> Result<Option<String>, String> {
        Ok(Some(v.to_string()))
    }

    #[test]
    fn date_times_in_every_stored_form_become_utc_timestamps() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE e (at DATETIME);
             INSERT INTO e VALUES (1700000000000), (1700000000), (1700000000123), (-1),
               ('2024-01-02 03:04:05'), ('2024-01-02T03:04:05Z'), ('2024-01-02T03:04:05.123+02:00'),
               ('2024-02-29T23:59:59.5-05:00'), (NULL), ('yesterday');",
        )
        .unwrap();
        assert_eq!(
            converted(&conn, "e", "at"),
            vec![
                ok("2023-11-14 22:13:20+00"),
                ok("2023-11-14 22:13:20+00"),
                ok("2023-11-14 22:13:20.123000+00"),
                ok("1969-12-31 23:59:59+00"),
                ok("2024-01-02 03:04:05+00"),
                ok("2024-01-02T03:04:05Z"),
                ok("2024-01-02T03:04:05.123+02:00"),
                ok("2024-02-29T23:59:59.5-05:00"),
                Ok(None),
                Err("at: text \"yesterday\" does not fit timestamptz".to_string()),
            ]
        );
    }

    #[test]
    fn text_where_a_number_or_uuid_belongs_and_nul_in_text_are_refused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE w (n INTEGER, f REAL, u UUID, t TEXT);
             INSERT INTO w VALUES (' 42 ', '1.5e3', 'not-a-uuid', 'nul' || char(0) || 'inside'),
                                  ('abc', 'x', NULL, 'ok');",
        )
        .unwrap();
        assert_eq!(
            converted(&conn, "w", "n"),
            vec![
                ok("42"),
                Err("n: text \"abc\" does not fit bigint".to_string())
            ]
        );
        assert_eq!(
            converted(&conn, "w", "f"),
            vec![
                ok("1500"),
                Err("f: text \"x\" does not fit double precision".to_string())
            ]
        );
        // Not every value is a UUID, so the column is text and keeps them.
        assert_eq!(converted(&conn, "w", "u")[0], ok("not-a-uuid"));
        assert!(
            converted(&conn, "w", "t")[0].is_err(),
            "PostgreSQL text cannot hold NUL"
        );
        assert_eq!(converted(&conn, "w", "t")[1], ok("ok"));
    }

    #[test]
    fn numbers_booleans_blobs_and_text_convert_exactly_or_are_refused() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE v (price DECIMAL(10,2), ok BOOLEAN, raw BLOB, label TEXT, f REAL, u UUID);
             INSERT INTO v VALUES
               (149.99, 1, x'00ff', 'ünïcode', 0.1, '8C9E3B1A-0F2D-4C5E-9A7B-1D2E3F4A5B6C'),
               (3, 'false', x'', x'68656c6c6f', 1e300, x'8c9e3b1a0f2d4c5e9a7b1d2e3f4a5b6c'),
               ('12.50', 'yes', NULL, 42, -2.5, NULL),
               ('cheap', 'maybe', NULL, x'ff00', NULL, NULL);",
        )
        .unwrap();
        assert_eq!(
            converted(&conn, "v", "price"),
            vec![
                ok("149.99"),
                ok("3"),
                // NUMERIC affinity stored '12.50' as the real 12.5.
                ok("12.5"),
                Err("price: text \"cheap\" does not fit numeric".to_string())
            ]
        );
        assert_eq!(
            converted(&conn, "v", "ok"),
            vec![
                ok("t"),
                ok("f"),
                ok("t"),
                Err("ok: text \"maybe\" does not fit boolean".to_string())
            ]
        );
        assert_eq!(
            converted(&conn, "v", "raw"),
            vec![ok("\\x00ff"), ok("\\x"), Ok(None), Ok(None)]
        );
        assert_eq!(
            converted(&conn, "v", "label"),
            vec![
                ok("ünïcode"),
                ok("hello"),
                ok("42"),
                Err("label: blob of 2 bytes does not fit text".to_string())
            ]
        );
        let f = converted(&conn, "v", "f");
        assert_eq!(f[0], ok("0.1"));
        assert_eq!(f[2], ok("-2.5"));
        let big: f64 = f[1].clone().unwrap().unwrap().parse().unwrap();
        assert_eq!(
            big, 1e300,
            "the shortest text reads back as the same double"
        );
        let u = converted(&conn, "v", "u");
        assert_eq!(u[0], ok("8c9e3b1a-0f2d-4c5e-9a7b-1d2e3f4a5b6c"));
        assert_eq!(u[1], ok("8c9e3b1a-0f2d-4c5e-9a7b-1d2e3f4a5b6c"));
    }
}
