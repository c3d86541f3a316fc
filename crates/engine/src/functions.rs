//! SQL functions the engine adds to each SQLite connection: PostgreSQL's
//! own (`now()`, `version()`, `gen_random_uuid()`, ...) with PostgreSQL's
//! results, and the normalizers the translator wraps around values the file
//! may store in several forms (`cutover_ts`, `cutover_bool`) so they compare
//! as PostgreSQL compares them.

use crate::decimal::Decimal;
use crate::types::{format_timestamp, iso_text};
use cutover_sqlite::rusqlite::functions::{Aggregate, Context, FunctionFlags};
use cutover_sqlite::rusqlite::types::{Value, ValueRef};
use cutover_sqlite::rusqlite::{self, Connection};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// What the session functions read: set by the session as it runs.
#[derive(Debug, Default)]
pub struct SessionClock {
    /// The transaction's start (microseconds since 1970), which `now()`
    /// returns for every statement of the transaction.
    pub transaction_start: AtomicI64,
    /// When the client's latest command message (a query string, an
    /// Execute) arrived, which `statement_timestamp()` returns.
    pub statement_start: AtomicI64,
    /// The session's settings as `current_setting()` reads them.
    pub settings: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

pub struct Identity {
    pub database: String,
    pub user: String,
    pub pid: i32,
}

pub const VERSION: &str = "PostgreSQL 15.0 (cutover SQLite engine) on SQLite";

fn err(message: String) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(message.into())
}

/// A time stored as epoch seconds, epoch milliseconds (from 10^11 up),
/// epoch real seconds or date-time text, as microseconds since 1970.
pub fn micros_of(value: ValueRef<'_>) -> Option<i64> {
    match value {
        ValueRef::Integer(i) if i.unsigned_abs() >= 100_000_000_000 => Some(i * 1000),
        ValueRef::Integer(i) => Some(i * 1_000_000),
        ValueRef::Real(f) if f.is_finite() => Some((f * 1_000_000.0).round() as i64),
        ValueRef::Text(t) => {
            let t = std::str::from_utf8(t).ok()?.trim();
            cutover_sqlite::canonical::timestamp_micros(t)
        }
        _ => None,
    }
}

fn bool_of(value: ValueRef<'_>) -> Option<bool> {
    match value {
        ValueRef::Integer(i) => Some(i != 0),
        ValueRef::Real(f) => Some(f != 0.0),
        ValueRef::Text(t) => match std::str::from_utf8(t)
            .ok()?
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "t" | "true" | "yes" | "y" | "on" | "1" => Some(true),
            "f" | "false" | "no" | "n" | "off" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn arg<'a>(ctx: &'a Context<'_>) -> ValueRef<'a> {
    ctx.get_raw(0)
}

pub fn install(
    conn: &Connection,
    clock: Arc<SessionClock>,
    identity: Arc<Identity>,
) -> rusqlite::Result<()> {
    let det = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    let nondet = FunctionFlags::SQLITE_UTF8;
    install_regex(conn)?;
    conn.create_scalar_function("cutover_int_range", 2, det, |ctx| {
        let bits: i64 = ctx.get(1)?;
        if let ValueRef::Integer(n) = ctx.get_raw(0) {
            let (name, max) = if bits == 16 {
                ("smallint", i64::from(i16::MAX))
            } else {
                ("integer", i64::from(i32::MAX))
            };
            if n > max || n < -max - 1 {
                return Err(err(format!("{name} out of range")));
            }
        }
        ctx.get::<rusqlite::types::Value>(0)
    })?;
    conn.create_scalar_function("cutover_ts", 1, det, |ctx| {
        Ok(match arg(ctx) {
            ValueRef::Null => None,
            v => Some(micros_of(v).ok_or_else(|| {
                err(format!(
                    "invalid input syntax for type timestamp with time zone: \"{}\"",
                    cutover_sqlite::value::raw(v)
                ))
            })?),
        })
    })?;
    conn.create_scalar_function("cutover_ts_text", 1, det, |ctx| {
        Ok(match arg(ctx) {
            ValueRef::Null => None,
            v => Some(iso_text(micros_of(v).ok_or_else(|| {
                err(format!(
                    "invalid input syntax for type timestamp with time zone: \"{}\"",
                    cutover_sqlite::value::raw(v)
                ))
            })?)),
        })
    })?;
    conn.create_scalar_function("cutover_bool", 1, det, |ctx| {
        Ok(match arg(ctx) {
            ValueRef::Null => None,
            v => Some(i64::from(bool_of(v).ok_or_else(|| {
                err(format!(
                    "invalid input syntax for type boolean: \"{}\"",
                    cutover_sqlite::value::raw(v)
                ))
            })?)),
        })
    })?;
    conn.create_scalar_function("cutover_int", 1, det, |ctx| {
        Ok(match arg(ctx) {
            ValueRef::Null => None,
            ValueRef::Integer(i) => Some(i),
            // PostgreSQL rounds half away from zero when casting to integer.
            ValueRef::Real(f) => Some(f.round() as i64),
            v => {
                let text = cutover_sqlite::value::raw(v);
                Some(text.trim().parse::<i64>().map_err(|_| {
                    err(format!("invalid input syntax for type integer: \"{text}\""))
                })?)
            }
        })
    })?;
    conn.create_scalar_function("cutover_store", 2, det, |ctx| {
        let codec: String = ctx.get(1)?;
        let v = arg(ctx);
        let refuse = |ty: &str| {
            err(format!(
                "invalid input syntax for type {ty}: \"{}\"",
                cutover_sqlite::value::raw(v)
            ))
        };
        Ok(match (codec.as_str(), v) {
            (_, ValueRef::Null) => Value::Null,
            ("unix_ms", v) => Value::Integer(
                micros_of(v)
                    .ok_or_else(|| refuse("timestamp with time zone"))?
                    .div_euclid(1000),
            ),
            ("unix_s", v) => Value::Integer(
                micros_of(v)
                    .ok_or_else(|| refuse("timestamp with time zone"))?
                    .div_euclid(1_000_000),
            ),
            ("iso_text", v) => Value::Text(iso_text(
                micros_of(v).ok_or_else(|| refuse("timestamp with time zone"))?,
            )),
            ("bool_int", v) => {
                Value::Integer(i64::from(bool_of(v).ok_or_else(|| refuse("boolean"))?))
            }
            ("bool_text", v) => Value::Text(
                if bool_of(v).ok_or_else(|| refuse("boolean"))? {
                    "true"
                } else {
                    "false"
                }
                .to_string(),
            ),
            (_, v) => Value::try_from(v).map_err(|e| err(e.to_string()))?,
        })
    })?;
    // PostgreSQL raises on division by zero where SQLite returns NULL.
    conn.create_scalar_function("cutover_div", 2, det, |ctx| {
        let (a, b) = (ctx.get_raw(0), ctx.get_raw(1));
        Ok(match (a, b) {
            (ValueRef::Null, _) | (_, ValueRef::Null) => Value::Null,
            (_, ValueRef::Integer(0)) => return Err(err("division by zero".to_string())),
            (_, ValueRef::Real(0.0)) => return Err(err("division by zero".to_string())),
            (ValueRef::Integer(x), ValueRef::Integer(y)) => Value::Integer(
                x.checked_div(y)
                    .ok_or_else(|| err("integer out of range".to_string()))?,
            ),
            (x, y) => {
                let f = |v: ValueRef<'_>| match v {
                    ValueRef::Integer(i) => Some(i as f64),
                    ValueRef::Real(r) => Some(r),
                    ValueRef::Text(t) => std::str::from_utf8(t).ok()?.trim().parse().ok(),
                    _ => None,
                };
                match (f(x), f(y)) {
                    (Some(_), Some(0.0)) => return Err(err("division by zero".to_string())),
                    (Some(x), Some(y)) => Value::Real(x / y),
                    _ => return Err(err("invalid input syntax for type numeric".to_string())),
                }
            }
        })
    })?;
    conn.create_scalar_function("cutover_numeric", 1, det, |ctx| {
        Ok(match arg(ctx) {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            v => {
                let text = cutover_sqlite::value::raw(v);
                let t = text.trim();
                match t.parse::<i64>() {
                    Ok(i) => Value::Integer(i),
                    Err(_) => Value::Real(t.parse::<f64>().map_err(|_| {
                        err(format!("invalid input syntax for type numeric: \"{text}\""))
                    })?),
                }
            }
        })
    })?;
    conn.create_scalar_function("cutover_json", 1, det, |ctx| {
        Ok(match arg(ctx) {
            ValueRef::Null => None,
            v => {
                let text = cutover_sqlite::value::raw(v);
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(|_| err(format!("invalid input syntax for type json: \"{text}\"")))?;
                Some(text)
            }
        })
    })?;
    for name in ["now", "transaction_timestamp", "current_timestamp"] {
        let clock = clock.clone();
        conn.create_scalar_function(name, 0, nondet, move |_| {
            Ok(format_timestamp(
                clock.transaction_start.load(Ordering::Relaxed),
                true,
            ))
        })?;
    }
    let statement = clock.clone();
    conn.create_scalar_function("statement_timestamp", 0, nondet, move |_| {
        Ok(format_timestamp(
            statement.statement_start.load(Ordering::Relaxed),
            true,
        ))
    })?;
    conn.create_aggregate_function("cutover_sum_numeric", 1, det, NumericSum)?;
    conn.create_aggregate_function("cutover_json_agg", 1, det, JsonAgg)?;
    conn.create_aggregate_function("cutover_array_agg", 1, det, ArrayAgg)?;
    conn.create_scalar_function("cutover_to_json", 2, det, |ctx| {
        let ty: String = ctx.get(1)?;
        to_json(ctx.get_raw(0), &ty)
    })?;
    conn.create_scalar_function("cutover_json_value", 1, det, |ctx| {
        Ok(cutover_sqlite::value::raw(ctx.get_raw(0)))
    })?;
    let json_arg = |ctx: &Context<'_>, i: usize| match ctx.get_raw(i) {
        ValueRef::Null => "null".to_string(),
        v => cutover_sqlite::value::raw(v),
    };
    conn.create_scalar_function("cutover_json_array", -1, det, move |ctx| {
        Ok(format!(
            "[{}]",
            joined((0..ctx.len()).map(|i| json_arg(ctx, i)))
        ))
    })?;
    conn.create_scalar_function("cutover_json_object", -1, det, move |ctx| {
        if ctx.len() % 2 != 0 {
            return Err(err(
                "argument list must have even number of elements".to_string()
            ));
        }
        let pairs = (0..ctx.len() / 2)
            .map(|i| format!("{} : {}", json_arg(ctx, 2 * i), json_arg(ctx, 2 * i + 1)));
        Ok(format!("{{{}}}", joined(pairs)))
    })?;
    conn.create_aggregate_function("cutover_avg", 1, det, NumericAvg)?;
    install_time_and_numeric(conn, clock.clone())?;
    conn.create_scalar_function("cutover_jsonb_concat", 2, det, |ctx| {
        let parse = |i: usize| -> rusqlite::Result<Option<serde_json::Value>> {
            match ctx.get_raw(i) {
                ValueRef::Null => Ok(None),
                v => {
                    let text = cutover_sqlite::value::raw(v);
                    serde_json::from_str(&text)
                        .map(Some)
                        .map_err(|_| err(format!("invalid input syntax for type json: \"{text}\"")))
                }
            }
        };
        let (Some(a), Some(b)) = (parse(0)?, parse(1)?) else {
            return Ok(None);
        };
        use serde_json::Value as J;
        let merged = match (a, b) {
            (J::Object(mut a), J::Object(b)) => {
                a.extend(b);
                J::Object(a)
            }
            (J::Array(mut a), J::Array(b)) => {
                a.extend(b);
                J::Array(a)
            }
            (J::Array(mut a), b) => {
                a.push(b);
                J::Array(a)
            }
            (a, J::Array(b)) => J::Array(std::iter::once(a).chain(b).collect()),
            (a, b) => J::Array(vec![a, b]),
        };
        Ok(Some(crate::types::jsonb_text(&merged)))
    })?;
    conn.create_scalar_function("version", 0, det, |_| Ok(VERSION.to_string()))?;
    for args in [1, 2] {
        let clock = clock.clone();
        conn.create_scalar_function("current_setting", args, nondet, move |ctx| {
            let name: String = ctx.get(0)?;
            let missing_ok = args == 2 && ctx.get::<bool>(1)?;
            let settings = clock.settings.lock().unwrap_or_else(|p| p.into_inner());
            match settings.iter().find(|(k, _)| k.eq_ignore_ascii_case(&name)) {
                Some((_, v)) => Ok(Some(v.clone())),
                None if missing_ok => Ok(None),
                None => Err(err(format!(
                    "unrecognized configuration parameter \"{name}\""
                ))),
            }
        })?;
    }
    // Catalog helpers drivers and ORMs call while introspecting.
    conn.create_scalar_function("pg_table_is_visible", 1, det, |_| Ok(true))?;
    conn.create_scalar_function("pg_type_is_visible", 1, det, |_| Ok(true))?;
    conn.create_scalar_function("has_table_privilege", -1, det, |_| Ok(true))?;
    conn.create_scalar_function("has_schema_privilege", -1, det, |_| Ok(true))?;
    conn.create_scalar_function("pg_get_userbyid", 1, det, |_| Ok("postgres".to_string()))?;
    conn.create_scalar_function("obj_description", -1, det, |_| Ok(None::<String>))?;
    // Sizes per table are not known without SQLite's dbstat (psql's \dt+
    // prints them empty).
    for f in [
        "pg_table_size",
        "pg_relation_size",
        "pg_total_relation_size",
    ] {
        conn.create_scalar_function(f, -1, det, |_| Ok(None::<i64>))?;
    }
    conn.create_scalar_function("pg_size_pretty", 1, det, |ctx| {
        let bytes: Option<i64> = ctx.get(0)?;
        Ok(bytes.map(|b| {
            let units = ["bytes", "kB", "MB", "GB", "TB", "PB"];
            let (mut n, mut unit) = (b, 0);
            // PostgreSQL moves up a unit from 10 240 of the current one,
            // rounding half up.
            while n.abs() >= 10 * 1024 && unit + 1 < units.len() {
                n = (n + n.signum() * 512) / 1024;
                unit += 1;
            }
            format!("{n} {}", units[unit])
        }))
    })?;
    conn.create_scalar_function("col_description", 2, det, |_| Ok(None::<String>))?;
    conn.create_scalar_function("format_type", 2, det, |ctx| {
        let oid: Option<i64> = ctx.get(0)?;
        let typmod: Option<i64> = ctx.get(1)?;
        Ok(
            oid.map(|oid| match crate::types::PgType::from_oid(oid as u32) {
                Some(crate::types::PgType::Varchar) if typmod.unwrap_or(-1) > 4 => {
                    format!("character varying({})", typmod.unwrap_or(0) - 4)
                }
                Some(t) => t.name().to_string(),
                None => "???".to_string(),
            }),
        )
    })?;
    // jsonb's path, containment and key operators (Django's JSONField
    // lookups): `#>`, `#>>`, `@>`, `<@`, `?`, `?|`, `?&`.
    conn.create_scalar_function("cutover_json_path", 3, det, |ctx| {
        let (doc, path, as_text): (Option<String>, Option<String>, bool) =
            (ctx.get(0)?, ctx.get(1)?, ctx.get(2)?);
        let (Some(doc), Some(path)) = (doc, path) else {
            return Ok(None);
        };
        let doc: serde_json::Value = serde_json::from_str(&doc)
            .map_err(|_| err(format!("invalid input syntax for type json: \"{doc}\"")))?;
        let Some(path) = text_list(&path) else {
            return Err(err(format!("malformed array literal: \"{path}\"")));
        };
        let mut at = &doc;
        for key in &path {
            let Some(key) = key else {
                return Ok(None);
            };
            let next = match at {
                serde_json::Value::Object(o) => o.get(key.as_str()),
                serde_json::Value::Array(a) => key.parse::<i64>().ok().and_then(|i| {
                    let i = if i < 0 { a.len() as i64 + i } else { i };
                    usize::try_from(i).ok().and_then(|i| a.get(i))
                }),
                _ => None,
            };
            match next {
                Some(v) => at = v,
                None => return Ok(None),
            }
        }
        Ok(match (as_text, at) {
            (true, serde_json::Value::Null) => None,
            (true, serde_json::Value::String(s)) => Some(s.clone()),
            (_, v) => Some(v.to_string()),
        })
    })?;
    conn.create_scalar_function("cutover_jsonb_contains", 2, det, |ctx| {
        let (a, b): (Option<String>, Option<String>) = (ctx.get(0)?, ctx.get(1)?);
        let (Some(a), Some(b)) = (a, b) else {
            return Ok(None);
        };
        let parse = |t: &str| {
            serde_json::from_str::<serde_json::Value>(t)
                .map_err(|_| err(format!("invalid input syntax for type json: \"{t}\"")))
        };
        Ok(Some(json_contains(&parse(&a)?, &parse(&b)?, true)))
    })?;
    conn.create_scalar_function("cutover_jsonb_exists", 3, det, |ctx| {
        let (doc, keys, mode): (Option<String>, Option<String>, String) =
            (ctx.get(0)?, ctx.get(1)?, ctx.get(2)?);
        let (Some(doc), Some(keys)) = (doc, keys) else {
            return Ok(None);
        };
        let doc: serde_json::Value = serde_json::from_str(&doc)
            .map_err(|_| err(format!("invalid input syntax for type json: \"{doc}\"")))?;
        let keys: Vec<String> = if mode == "one" {
            vec![keys]
        } else {
            text_list(&keys)
                .ok_or_else(|| err(format!("malformed array literal: \"{keys}\"")))?
                .into_iter()
                .flatten()
                .collect()
        };
        let has = |key: &String| match &doc {
            serde_json::Value::Object(o) => o.contains_key(key.as_str()),
            serde_json::Value::Array(a) => a.iter().any(|v| v.as_str() == Some(key.as_str())),
            serde_json::Value::String(s) => s == key,
            _ => false,
        };
        Ok(Some(if mode == "all" {
            keys.iter().all(has)
        } else {
            keys.iter().any(has)
        }))
    })?;
    // psycopg's TypeInfo.fetch (SQLAlchemy asks it for hstore at connect):
    // the oid of a type name, NULL for a type the engine does not have.
    conn.create_scalar_function("to_regtype", 1, det, |ctx| {
        let name: Option<String> = ctx.get(0)?;
        Ok(name.and_then(|name| type_oid_by_name(&name)))
    })?;
    conn.create_scalar_function("current_schema", 0, det, |_| Ok("public".to_string()))?;
    let id = identity.clone();
    conn.create_scalar_function("current_database", 0, det, move |_| Ok(id.database.clone()))?;
    for name in ["current_user", "session_user"] {
        let id = identity.clone();
        conn.create_scalar_function(name, 0, det, move |_| Ok(id.user.clone()))?;
    }
    let id = identity;
    conn.create_scalar_function("pg_backend_pid", 0, det, move |_| Ok(id.pid))?;
    conn.create_scalar_function("random", 0, nondet, |_| Ok(rand::random::<f64>()))?;
    // uuid-ossp's uuid_generate_v4 is pgcrypto's gen_random_uuid.
    for name in ["gen_random_uuid", "uuid_generate_v4"] {
        conn.create_scalar_function(name, 0, nondet, |ctx| random_uuid(ctx))?;
    }
    Ok(())
}

/// A version-4 UUID in its text form.
fn random_uuid(_: &Context<'_>) -> rusqlite::Result<String> {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// A numeric value read from storage: integers, doubles by their
/// shortest spelling, decimal text.
fn decimal_of(value: ValueRef<'_>) -> rusqlite::Result<Option<Decimal>> {
    let bad = || {
        err(format!(
            "invalid input syntax for type numeric: \"{}\"",
            cutover_sqlite::value::raw(value)
        ))
    };
    Ok(match value {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(Decimal::from_int(i)),
        ValueRef::Real(f) => Some(Decimal::from_f64(f).ok_or_else(bad)?),
        ValueRef::Text(t) => Some(
            std::str::from_utf8(t)
                .ok()
                .and_then(Decimal::parse)
                .ok_or_else(bad)?,
        ),
        ValueRef::Blob(_) => return Err(bad()),
    })
}

/// A value as PostgreSQL's to_json renders a value of `pg_type`.
fn to_json(value: ValueRef<'_>, pg_type: &str) -> rusqlite::Result<String> {
    let string = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let text = || cutover_sqlite::value::raw(value);
    Ok(match (pg_type, value) {
        (_, ValueRef::Null) => "null".to_string(),
        ("boolean", v) => match bool_of(v) {
            Some(b) => b.to_string(),
            None => {
                return Err(err(format!(
                    "invalid input syntax for type boolean: \"{}\"",
                    text()
                )))
            }
        },
        ("timestamp with time zone" | "timestamp without time zone", v) => {
            let micros = micros_of(v).ok_or_else(|| {
                err(format!(
                    "invalid input syntax for type timestamp: \"{}\"",
                    text()
                ))
            })?;
            let zone = pg_type == "timestamp with time zone";
            let t = format_timestamp(micros, false).replacen(' ', "T", 1);
            string(&if zone { format!("{t}+00:00") } else { t })
        }
        ("json", ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        ("jsonb", ValueRef::Text(t)) => {
            match serde_json::from_str::<serde_json::Value>(&String::from_utf8_lossy(t)) {
                Ok(v) => crate::types::jsonb_text(&v),
                Err(_) => {
                    return Err(err(format!(
                        "invalid input syntax for type json: \"{}\"",
                        text()
                    )))
                }
            }
        }
        ("numeric", v) => match decimal_of(v)? {
            Some(d) => d.to_text(),
            None => "null".to_string(),
        },
        ("double precision", ValueRef::Real(f)) if !f.is_finite() => {
            string(&crate::types::float_text(f))
        }
        ("double precision", ValueRef::Real(f)) => crate::types::float_text(f),
        ("bytea", ValueRef::Blob(b)) => string(&format!(
            "\\x{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )),
        (
            "smallint" | "integer" | "bigint" | "double precision" | "unknown",
            ValueRef::Integer(i),
        ) => i.to_string(),
        ("unknown", ValueRef::Real(f)) => crate::types::float_text(f),
        _ => string(&text()),
    })
}

/// JSON texts joined as PostgreSQL's json functions print them.
fn joined(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// `json_agg`: the JSON texts of its input, in order.
struct JsonAgg;

impl Aggregate<Vec<String>, Option<String>> for JsonAgg {
    fn init(&self, _: &mut Context<'_>) -> rusqlite::Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn step(&self, ctx: &mut Context<'_>, acc: &mut Vec<String>) -> rusqlite::Result<()> {
        acc.push(match ctx.get_raw(0) {
            ValueRef::Null => "null".to_string(),
            v => cutover_sqlite::value::raw(v),
        });
        Ok(())
    }

    fn finalize(
        &self,
        _: &mut Context<'_>,
        acc: Option<Vec<String>>,
    ) -> rusqlite::Result<Option<String>> {
        Ok(acc
            .filter(|a| !a.is_empty())
            .map(|a| format!("[{}]", joined(a.into_iter()))))
    }
}

/// `array_agg` of numbers and text: PostgreSQL's array text, `{a,b}`,
/// elements quoted where its array input would misread them.
struct ArrayAgg;

impl Aggregate<Vec<Option<String>>, Option<String>> for ArrayAgg {
    fn init(&self, _: &mut Context<'_>) -> rusqlite::Result<Vec<Option<String>>> {
        Ok(Vec::new())
    }

    fn step(&self, ctx: &mut Context<'_>, acc: &mut Vec<Option<String>>) -> rusqlite::Result<()> {
        acc.push(match ctx.get_raw(0) {
            ValueRef::Null => None,
            ValueRef::Real(f) => Some(crate::types::float_text(f)),
            v => Some(cutover_sqlite::value::raw(v)),
        });
        Ok(())
    }

    fn finalize(
        &self,
        _: &mut Context<'_>,
        acc: Option<Vec<Option<String>>>,
    ) -> rusqlite::Result<Option<String>> {
        Ok(acc.filter(|a| !a.is_empty()).map(|a| {
            let items: Vec<String> = a
                .into_iter()
                .map(|item| match item {
                    None => "NULL".to_string(),
                    Some(t)
                        if t.is_empty()
                            || t.eq_ignore_ascii_case("null")
                            || t.chars().any(|c| {
                                matches!(c, '{' | '}' | ',' | '"' | '\\') || c.is_whitespace()
                            }) =>
                    {
                        format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\""))
                    }
                    Some(t) => t,
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }))
    }
}

/// `sum(numeric)` in exact decimal arithmetic.
struct NumericSum;

impl Aggregate<Option<Decimal>, Option<String>> for NumericSum {
    fn init(&self, _: &mut Context<'_>) -> rusqlite::Result<Option<Decimal>> {
        Ok(None)
    }

    fn step(&self, ctx: &mut Context<'_>, acc: &mut Option<Decimal>) -> rusqlite::Result<()> {
        if let Some(d) = decimal_of(ctx.get_raw(0))? {
            let sum = acc.unwrap_or_else(Decimal::zero).add(d);
            *acc = Some(sum.ok_or_else(|| err("numeric value out of range".to_string()))?);
        }
        Ok(())
    }

    fn finalize(
        &self,
        _: &mut Context<'_>,
        acc: Option<Option<Decimal>>,
    ) -> rusqlite::Result<Option<String>> {
        Ok(acc.flatten().map(Decimal::to_text))
    }
}

/// `avg` of integers or numerics: their exact sum divided by their count
/// at PostgreSQL's numeric scale.
struct NumericAvg;

impl Aggregate<(Option<Decimal>, i64), Option<String>> for NumericAvg {
    fn init(&self, _: &mut Context<'_>) -> rusqlite::Result<(Option<Decimal>, i64)> {
        Ok((None, 0))
    }

    fn step(
        &self,
        ctx: &mut Context<'_>,
        acc: &mut (Option<Decimal>, i64),
    ) -> rusqlite::Result<()> {
        if let Some(d) = decimal_of(ctx.get_raw(0))? {
            let sum = acc.0.unwrap_or_else(Decimal::zero).add(d);
            acc.0 = Some(sum.ok_or_else(|| err("numeric value out of range".to_string()))?);
            acc.1 += 1;
        }
        Ok(())
    }

    fn finalize(
        &self,
        _: &mut Context<'_>,
        acc: Option<(Option<Decimal>, i64)>,
    ) -> rusqlite::Result<Option<String>> {
        Ok(match acc {
            Some((Some(sum), n)) if n > 0 => sum.div(Decimal::from_int(n)).map(Decimal::to_text),
            _ => None,
        })
    }
}

/// A decimal result as the SQLite value that compares and sorts as the
/// number it is (text would sort after every number).
fn decimal_value(d: Decimal) -> Value {
    let text = d.to_text();
    match text.parse::<i64>() {
        Ok(i) => Value::Integer(i),
        Err(_) => Value::Real(text.parse::<f64>().unwrap_or(f64::NAN)),
    }
}

fn install_time_and_numeric(conn: &Connection, clock: Arc<SessionClock>) -> rusqlite::Result<()> {
    use crate::time;
    let det = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    for (name, op) in [
        ("cutover_num_add", 0u8),
        ("cutover_num_sub", 1),
        ("cutover_num_mul", 2),
    ] {
        conn.create_scalar_function(name, 2, det, move |ctx| {
            let (Some(a), Some(b)) = (decimal_of(ctx.get_raw(0))?, decimal_of(ctx.get_raw(1))?)
            else {
                return Ok(Value::Null);
            };
            let result = match op {
                0 => a.add(b),
                1 => a.add(b.negated()),
                _ => a.mul(b),
            };
            Ok(decimal_value(result.ok_or_else(|| {
                err("numeric value out of range".to_string())
            })?))
        })?;
    }
    let time_of = |v: ValueRef<'_>| {
        micros_of(v).ok_or_else(|| {
            err(format!(
                "invalid input syntax for type timestamp with time zone: \"{}\"",
                cutover_sqlite::value::raw(v)
            ))
        })
    };
    conn.create_scalar_function("cutover_ts_add", 3, det, move |ctx| {
        if let ValueRef::Null = ctx.get_raw(0) {
            return Ok(None);
        }
        let t = time_of(ctx.get_raw(0))?;
        let text: String = ctx.get(1)?;
        let sign: i64 = ctx.get(2)?;
        let iv = time::Interval::parse(&text).ok_or_else(|| {
            err(format!(
                "invalid input syntax for type interval: \"{text}\""
            ))
        })?;
        let iv = if sign < 0 { iv.negated() } else { iv };
        Ok(Some(time::timestamp_text(time::add(t, iv))))
    })?;
    conn.create_scalar_function("cutover_date_add", 2, det, move |ctx| {
        if let ValueRef::Null = ctx.get_raw(0) {
            return Ok(None);
        }
        let days = time_of(ctx.get_raw(0))?.div_euclid(86_400_000_000);
        let n: i64 = ctx.get(1)?;
        Ok(Some(time::date_text(days + n)))
    })?;
    let today = clock.clone();
    conn.create_scalar_function(
        "cutover_current_date",
        0,
        FunctionFlags::SQLITE_UTF8,
        move |_| {
            Ok(time::date_text(
                today
                    .transaction_start
                    .load(Ordering::Relaxed)
                    .div_euclid(86_400_000_000),
            ))
        },
    )?;
    conn.create_scalar_function("cutover_date_trunc", 2, det, move |ctx| {
        let unit: String = ctx.get(0)?;
        if let ValueRef::Null = ctx.get_raw(1) {
            return Ok(None);
        }
        let t = time_of(ctx.get_raw(1))?;
        let truncated = time::trunc(&unit, t).ok_or_else(|| {
            err(format!(
                "unit \"{unit}\" not recognized for type timestamp with time zone"
            ))
        })?;
        Ok(Some(time::timestamp_text(truncated)))
    })?;
    for (name, float) in [("cutover_extract", false), ("cutover_date_part", true)] {
        conn.create_scalar_function(name, 3, det, move |ctx| {
            let field: String = ctx.get(0)?;
            if let ValueRef::Null = ctx.get_raw(1) {
                return Ok(Value::Null);
            }
            let t = time_of(ctx.get_raw(1))?;
            let date: bool = ctx.get(2)?;
            let text = time::extract(&field, t, date).ok_or_else(|| {
                err(format!(
                    "unit \"{field}\" not recognized for type timestamp with time zone"
                ))
            })?;
            Ok(if float {
                Value::Real(text.parse().unwrap_or(f64::NAN))
            } else {
                Value::Text(text)
            })
        })?;
    }
    Ok(())
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The oid of a built-in type spelled as `to_regtype` takes it (`int4`,
/// `integer`, `pg_catalog.text`, `text[]`, `_int4`); None for others.
fn type_oid_by_name(name: &str) -> Option<i64> {
    let name = name.trim();
    let name = name.strip_prefix("pg_catalog.").unwrap_or(name);
    let (base, array) = match name.strip_suffix("[]") {
        Some(base) => (base, true),
        None => match name.strip_prefix('_') {
            Some(base) => (base, true),
            None => (name, false),
        },
    };
    let ty = crate::types::PgType::from_name(base)?;
    Some(i64::from(if array { ty.array_oid() } else { ty.oid() }))
}

/// A text[] as `#>`, `?|` and `?&` take it: a bound array parameter
/// (which arrives as a JSON array) or PostgreSQL's array text (a literal).
fn text_list(value: &str) -> Option<Vec<Option<String>>> {
    let json = if value.trim_start().starts_with('{') {
        crate::types::array_param_json(crate::types::PgType::Text, 0, value.as_bytes()).ok()?
    } else {
        value.to_string()
    };
    let list: Vec<serde_json::Value> = serde_json::from_str(&json).ok()?;
    Some(
        list.into_iter()
            .map(|v| match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s),
                other => Some(other.to_string()),
            })
            .collect(),
    )
}

/// jsonb's `a @> b`: objects contain the pairs of `b` (recursively),
/// arrays every element of `b` somewhere, scalars are equal (numbers by
/// value); at the top, an array contains a scalar it holds.
fn json_contains(a: &serde_json::Value, b: &serde_json::Value, top: bool) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => b
            .iter()
            .all(|(k, bv)| a.get(k).is_some_and(|av| json_contains(av, bv, false))),
        (Value::Array(a), Value::Array(b)) => b
            .iter()
            .all(|bv| a.iter().any(|av| json_contains(av, bv, false))),
        (Value::Array(a), b) if top && !b.is_object() => {
            a.iter().any(|av| json_contains(av, b, false))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// PostgreSQL's regular expressions: `cutover_regex(text, pattern,
/// case_insensitive)` for `~ ~* !~ !~*`, and `regexp_replace(source,
/// pattern, replacement[, flags])`. Patterns are compiled once per
/// statement (SQLite keeps them as the call's auxiliary data). The
/// syntax is Rust's `regex`, which has PostgreSQL's common forms (classes,
/// anchors, groups, alternation, bounded repetition, `\d \w \s`,
/// `[[:alpha:]]`) but no back-references or look-around; those are refused
/// with PostgreSQL's 2201B.
fn install_regex(conn: &Connection) -> rusqlite::Result<()> {
    let det = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    fn compiled(
        ctx: &rusqlite::functions::Context<'_>,
        pattern_arg: usize,
        insensitive: bool,
    ) -> rusqlite::Result<Option<Arc<regex::Regex>>> {
        if matches!(ctx.get_raw(pattern_arg), ValueRef::Null) {
            return Ok(None);
        }
        let re = ctx.get_or_create_aux(
            pattern_arg as i32,
            |v| -> Result<regex::Regex, rusqlite::Error> {
                let pattern = cutover_sqlite::value::raw(v);
                regex::RegexBuilder::new(&pattern)
                    .case_insensitive(insensitive)
                    .build()
                    .map_err(|e| {
                        err(format!(
                            "invalid regular expression: {}",
                            e.to_string().lines().last().unwrap_or("")
                        ))
                    })
            },
        )?;
        Ok(Some(re))
    }
    conn.create_scalar_function("cutover_regex", 3, det, |ctx| {
        let insensitive: bool = ctx.get(2)?;
        let Some(re) = compiled(ctx, 1, insensitive)? else {
            return Ok(None);
        };
        Ok(match ctx.get_raw(0) {
            ValueRef::Null => None,
            v => Some(re.is_match(&cutover_sqlite::value::raw(v))),
        })
    })?;
    for arity in [3, 4] {
        conn.create_scalar_function("regexp_replace", arity, det, move |ctx| {
            let flags: String = if arity == 4 {
                ctx.get::<Option<String>>(3)?.unwrap_or_default()
            } else {
                String::new()
            };
            if let Some(f) = flags.chars().find(|c| !matches!(c, 'g' | 'i' | 'c')) {
                return Err(err(format!("invalid regular expression option: \"{f}\"")));
            }
            let Some(re) = compiled(ctx, 1, flags.contains('i'))? else {
                return Ok(None);
            };
            let (source, replacement) = match (ctx.get_raw(0), ctx.get_raw(2)) {
                (ValueRef::Null, _) | (_, ValueRef::Null) => return Ok(None),
                (s, r) => (cutover_sqlite::value::raw(s), cutover_sqlite::value::raw(r)),
            };
            let replacement = pg_replacement(&replacement);
            Ok(Some(if flags.contains('g') {
                re.replace_all(&source, replacement.as_str()).into_owned()
            } else {
                re.replace(&source, replacement.as_str()).into_owned()
            }))
        })?;
    }
    Ok(())
}

/// PostgreSQL's replacement text (`\1`…`\9` for groups, `\&` for the
/// match, `\\` for a backslash) in the regex crate's spelling.
fn pg_replacement(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.next() {
                Some(d @ '1'..='9') => out.push_str(&format!("${{{d}}}")),
                Some('&') => out.push_str("${0}"),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            other => out.push(other),
        }
    }
    out
}
