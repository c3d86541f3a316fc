//! PostgreSQL's everyday string, math and JSON functions that SQLite lacks
//! or spells with another meaning (SQLite's `max(a, b)` is NULL when one
//! argument is, PostgreSQL's `greatest` skips NULLs), with PostgreSQL's
//! results and errors. Strict functions give NULL for a NULL argument, as
//! PostgreSQL's do. Their result types are in translate.rs's
//! `function_type`.

use cutover_sqlite::rusqlite::functions::{Context, FunctionFlags};
use cutover_sqlite::rusqlite::types::{Value, ValueRef};
use cutover_sqlite::rusqlite::{self, Connection};

fn err(message: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(message.into().into())
}

/// Argument `i` as text, or None for NULL.
fn text(ctx: &Context<'_>, i: usize) -> Option<String> {
    match ctx.get_raw(i) {
        ValueRef::Null => None,
        v => Some(cutover_sqlite::value::raw(v)),
    }
}

/// Argument `i` as an integer (PostgreSQL's int arguments), or None.
fn int(ctx: &Context<'_>, i: usize) -> rusqlite::Result<Option<i64>> {
    Ok(match ctx.get_raw(i) {
        ValueRef::Null => None,
        ValueRef::Integer(n) => Some(n),
        ValueRef::Real(f) if f.fract() == 0.0 => Some(f as i64),
        v => {
            let t = cutover_sqlite::value::raw(v);
            Some(
                t.trim()
                    .parse()
                    .map_err(|_| err(format!("invalid input syntax for type integer: \"{t}\"")))?,
            )
        }
    })
}

/// Argument `i` as a double, or None.
fn float(ctx: &Context<'_>, i: usize) -> rusqlite::Result<Option<f64>> {
    Ok(match ctx.get_raw(i) {
        ValueRef::Null => None,
        ValueRef::Integer(n) => Some(n as f64),
        ValueRef::Real(f) => Some(f),
        v => {
            let t = cutover_sqlite::value::raw(v);
            Some(t.trim().parse().map_err(|_| {
                err(format!(
                    "invalid input syntax for type double precision: \"{t}\""
                ))
            })?)
        }
    })
}

/// A double as SQLite keeps it: whole values as integers, so they print
/// without a fraction where the result type is numeric.
fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::Integer(f as i64)
    } else {
        Value::Real(f)
    }
}

pub fn install(conn: &Connection) -> rusqlite::Result<()> {
    let det = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    let nondet = FunctionFlags::SQLITE_UTF8;
    conn.create_scalar_function("split_part", 3, det, |ctx| {
        let (Some(s), Some(d), Some(n)) = (text(ctx, 0), text(ctx, 1), int(ctx, 2)?) else {
            return Ok(None);
        };
        if n == 0 {
            return Err(err("field position must not be zero"));
        }
        let parts: Vec<&str> = if d.is_empty() {
            vec![s.as_str()]
        } else {
            s.split(d.as_str()).collect()
        };
        let i = if n > 0 { n - 1 } else { parts.len() as i64 + n };
        Ok(Some(
            usize::try_from(i)
                .ok()
                .and_then(|i| parts.get(i))
                .map_or(String::new(), |p| p.to_string()),
        ))
    })?;
    conn.create_scalar_function("strpos", 2, det, |ctx| {
        let (Some(s), Some(sub)) = (text(ctx, 0), text(ctx, 1)) else {
            return Ok(None);
        };
        Ok(Some(
            s.find(&sub)
                .map_or(0, |at| s[..at].chars().count() as i64 + 1),
        ))
    })?;
    for (name, from_left) in [("left", true), ("right", false)] {
        conn.create_scalar_function(name, 2, det, move |ctx| {
            let (Some(s), Some(n)) = (text(ctx, 0), int(ctx, 1)?) else {
                return Ok(None);
            };
            let chars: Vec<char> = s.chars().collect();
            let len = chars.len() as i64;
            let keep = if n >= 0 { n.min(len) } else { (len + n).max(0) } as usize;
            Ok(Some(if from_left {
                chars[..keep].iter().collect::<String>()
            } else {
                chars[chars.len() - keep..].iter().collect::<String>()
            }))
        })?;
    }
    for (name, left) in [("lpad", true), ("rpad", false)] {
        for arity in [2, 3] {
            conn.create_scalar_function(name, arity, det, move |ctx| {
                let (Some(s), Some(len)) = (text(ctx, 0), int(ctx, 1)?) else {
                    return Ok(None);
                };
                let fill = if arity == 3 {
                    match text(ctx, 2) {
                        Some(f) => f,
                        None => return Ok(None),
                    }
                } else {
                    " ".to_string()
                };
                let len = len.max(0) as usize;
                let chars: Vec<char> = s.chars().collect();
                if chars.len() >= len || fill.is_empty() {
                    return Ok(Some(chars.iter().take(len).collect::<String>()));
                }
                let pad: String = fill.chars().cycle().take(len - chars.len()).collect();
                Ok(Some(if left { pad + &s } else { s + &pad }))
            })?;
        }
    }
    conn.create_scalar_function("initcap", 1, det, |ctx| {
        let Some(s) = text(ctx, 0) else {
            return Ok(None);
        };
        // As PostgreSQL in the C locale (SQLite's lower/upper too): words
        // are ASCII letters and digits; other characters stay as they are.
        let mut out = String::with_capacity(s.len());
        let mut in_word = false;
        for c in s.chars() {
            if c.is_ascii_alphanumeric() {
                out.push(if in_word {
                    c.to_ascii_lowercase()
                } else {
                    c.to_ascii_uppercase()
                });
                in_word = true;
            } else {
                out.push(c);
                in_word = false;
            }
        }
        Ok(Some(out))
    })?;
    conn.create_scalar_function("repeat", 2, det, |ctx| {
        let (Some(s), Some(n)) = (text(ctx, 0), int(ctx, 1)?) else {
            return Ok(None);
        };
        Ok(Some(s.repeat(n.max(0) as usize)))
    })?;
    conn.create_scalar_function("reverse", 1, det, |ctx| {
        Ok(text(ctx, 0).map(|s| s.chars().rev().collect::<String>()))
    })?;
    conn.create_scalar_function("concat_ws", -1, det, |ctx| {
        let Some(sep) = text(ctx, 0) else {
            return Ok(None);
        };
        let parts: Vec<String> = (1..ctx.len()).filter_map(|i| text(ctx, i)).collect();
        Ok(Some(parts.join(&sep)))
    })?;
    for name in ["char_length", "character_length"] {
        conn.create_scalar_function(name, 1, det, |ctx| {
            Ok(text(ctx, 0).map(|s| s.chars().count() as i64))
        })?;
    }
    conn.create_scalar_function("octet_length", 1, det, |ctx| {
        Ok(match ctx.get_raw(0) {
            ValueRef::Null => None,
            ValueRef::Blob(b) => Some(b.len() as i64),
            v => Some(cutover_sqlite::value::raw(v).len() as i64),
        })
    })?;
    conn.create_scalar_function("translate", 3, det, |ctx| {
        let (Some(s), Some(from), Some(to)) = (text(ctx, 0), text(ctx, 1), text(ctx, 2)) else {
            return Ok(None);
        };
        let from: Vec<char> = from.chars().collect();
        let to: Vec<char> = to.chars().collect();
        Ok(Some(
            s.chars()
                .filter_map(|c| match from.iter().position(|f| *f == c) {
                    Some(i) => to.get(i).copied(),
                    None => Some(c),
                })
                .collect::<String>(),
        ))
    })?;
    for arity in [1, 2] {
        conn.create_scalar_function("btrim", arity, det, move |ctx| {
            let Some(s) = text(ctx, 0) else {
                return Ok(None);
            };
            let chars: Vec<char> = if arity == 2 {
                match text(ctx, 1) {
                    Some(c) => c.chars().collect(),
                    None => return Ok(None),
                }
            } else {
                vec![' ']
            };
            Ok(Some(s.trim_matches(|c| chars.contains(&c)).to_string()))
        })?;
    }
    conn.create_scalar_function("starts_with", 2, det, |ctx| {
        Ok(match (text(ctx, 0), text(ctx, 1)) {
            (Some(s), Some(p)) => Some(s.starts_with(&p)),
            _ => None,
        })
    })?;
    conn.create_scalar_function("md5", 1, det, |ctx| {
        use md5::Digest;
        Ok(text(ctx, 0).map(|s| {
            md5::Md5::digest(s.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        }))
    })?;
    conn.create_scalar_function("chr", 1, det, |ctx| {
        let Some(n) = int(ctx, 0)? else {
            return Ok(None);
        };
        u32::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .and_then(char::from_u32)
            .map(|c| Some(c.to_string()))
            .ok_or_else(|| err(format!("requested character not valid for encoding: {n}")))
    })?;
    conn.create_scalar_function("ascii", 1, det, |ctx| {
        Ok(text(ctx, 0).map(|s| s.chars().next().map_or(0, |c| c as i64)))
    })?;
    install_math(conn, det)?;
    install_json(conn, det)?;
    conn.create_scalar_function("clock_timestamp", 0, nondet, |_| {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        Ok(crate::types::iso_text(micros))
    })?;
    // to_char of a date or time (the translator refuses other types).
    conn.create_scalar_function("to_char", 2, det, |ctx| {
        let (v, Some(format)) = (ctx.get_raw(0), text(ctx, 1)) else {
            return Ok(None);
        };
        if matches!(v, ValueRef::Null) {
            return Ok(None);
        }
        let micros = crate::functions::micros_of(v).ok_or_else(|| {
            err(format!(
                "invalid input syntax for type timestamp with time zone: \"{}\"",
                cutover_sqlite::value::raw(v)
            ))
        })?;
        Ok(Some(to_char(micros, &format)))
    })?;
    conn.create_scalar_function("to_timestamp", 1, det, |ctx| {
        Ok(match float(ctx, 0)? {
            None => None,
            Some(s) if !s.is_finite() => {
                return Err(err("timestamp out of range"));
            }
            Some(s) => Some(crate::types::iso_text((s * 1_000_000.0).round() as i64)),
        })
    })?;
    Ok(())
}

/// A function of one double.
type Unary = fn(f64) -> f64;

fn install_math(conn: &Connection, det: FunctionFlags) -> rusqlite::Result<()> {
    // greatest/least skip NULLs (NULL only when all are).
    for (name, greater) in [("greatest", true), ("least", false)] {
        conn.create_scalar_function(name, -1, det, move |ctx| {
            let mut best: Option<Value> = None;
            for i in 0..ctx.len() {
                let v: Value = ctx.get(i)?;
                if matches!(v, Value::Null) {
                    continue;
                }
                best = Some(match best {
                    None => v,
                    Some(b) => {
                        let order = compare(&v, &b);
                        if (greater && order == std::cmp::Ordering::Greater)
                            || (!greater && order == std::cmp::Ordering::Less)
                        {
                            v
                        } else {
                            b
                        }
                    }
                });
            }
            Ok(best.unwrap_or(Value::Null))
        })?;
    }
    let unary: [(&str, Unary); 6] = [
        ("ceil", f64::ceil),
        ("ceiling", f64::ceil),
        ("floor", f64::floor),
        ("sign", f64::signum),
        ("exp", f64::exp),
        ("cbrt", f64::cbrt),
    ];
    for (name, f) in unary {
        conn.create_scalar_function(name, 1, det, move |ctx| {
            Ok(match float(ctx, 0)? {
                None => Value::Null,
                Some(0.0) if name == "sign" => Value::Integer(0),
                Some(x) => number(f(x)),
            })
        })?;
    }
    conn.create_scalar_function("sqrt", 1, det, |ctx| {
        Ok(match float(ctx, 0)? {
            None => None,
            Some(x) if x < 0.0 => {
                return Err(err("cannot take square root of a negative number"));
            }
            Some(x) => Some(x.sqrt()),
        })
    })?;
    for (name, base) in [("ln", None), ("log", Some(10.0)), ("log10", Some(10.0))] {
        conn.create_scalar_function(name, 1, det, move |ctx| {
            Ok(match float(ctx, 0)? {
                None => None,
                Some(0.0) => return Err(err("cannot take logarithm of zero")),
                Some(x) if x < 0.0 => {
                    return Err(err("cannot take logarithm of a negative number"));
                }
                Some(x) => Some(match base {
                    Some(_) => x.log10(),
                    None => x.ln(),
                }),
            })
        })?;
    }
    for name in ["power", "pow"] {
        conn.create_scalar_function(name, 2, det, |ctx| {
            Ok(match (float(ctx, 0)?, float(ctx, 1)?) {
                (Some(a), Some(b)) => {
                    if a == 0.0 && b < 0.0 {
                        return Err(err(
                            "zero raised to a negative power is undefined",
                        ));
                    }
                    if a < 0.0 && b.fract() != 0.0 {
                        return Err(err(
                            "a negative number raised to a non-integer power yields a complex result",
                        ));
                    }
                    Some(a.powf(b))
                }
                _ => None,
            })
        })?;
    }
    conn.create_scalar_function("pi", 0, det, |_| Ok(std::f64::consts::PI))?;
    conn.create_scalar_function("mod", 2, det, |ctx| {
        Ok(match (ctx.get_raw(0), ctx.get_raw(1)) {
            (ValueRef::Null, _) | (_, ValueRef::Null) => Value::Null,
            (ValueRef::Integer(a), ValueRef::Integer(b)) => {
                if b == 0 {
                    return Err(err("division by zero"));
                }
                Value::Integer(a.wrapping_rem(b))
            }
            _ => {
                let (a, b) = (float(ctx, 0)?.unwrap_or(0.0), float(ctx, 1)?.unwrap_or(0.0));
                if b == 0.0 {
                    return Err(err("division by zero"));
                }
                number(a % b)
            }
        })
    })?;
    for arity in [1, 2] {
        conn.create_scalar_function("trunc", arity, det, move |ctx| {
            let Some(x) = float(ctx, 0)? else {
                return Ok(Value::Null);
            };
            let digits = if arity == 2 {
                match int(ctx, 1)? {
                    Some(d) => d,
                    None => return Ok(Value::Null),
                }
            } else {
                0
            };
            let scale = 10f64.powi(digits.clamp(-300, 300) as i32);
            Ok(number((x * scale).trunc() / scale))
        })?;
    }
    Ok(())
}

/// Two SQLite values in PostgreSQL's order for values of one type:
/// numbers by value, text by its bytes.
fn compare(a: &Value, b: &Value) -> std::cmp::Ordering {
    let num = |v: &Value| match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Real(f) => Some(*f),
        _ => None,
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal),
        _ => {
            let t = |v: &Value| match v {
                Value::Text(s) => s.clone(),
                Value::Integer(i) => i.to_string(),
                Value::Real(f) => f.to_string(),
                _ => String::new(),
            };
            t(a).cmp(&t(b))
        }
    }
}

fn install_json(conn: &Connection, det: FunctionFlags) -> rusqlite::Result<()> {
    fn json(ctx: &Context<'_>, i: usize) -> rusqlite::Result<Option<serde_json::Value>> {
        match text(ctx, i) {
            None => Ok(None),
            Some(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|_| err(format!("invalid input syntax for type json: \"{t}\""))),
        }
    }
    for name in ["jsonb_array_length", "json_array_length"] {
        conn.create_scalar_function(name, 1, det, |ctx| {
            Ok(match json(ctx, 0)? {
                None => None,
                Some(serde_json::Value::Array(a)) => Some(a.len() as i64),
                Some(serde_json::Value::Object(_)) => {
                    return Err(err("cannot get array length of a non-array"))
                }
                Some(_) => return Err(err("cannot get array length of a scalar")),
            })
        })?;
    }
    for name in ["jsonb_typeof", "json_typeof"] {
        conn.create_scalar_function(name, 1, det, |ctx| {
            Ok(json(ctx, 0)?.map(|v| {
                match v {
                    serde_json::Value::Null => "null",
                    serde_json::Value::Bool(_) => "boolean",
                    serde_json::Value::Number(_) => "number",
                    serde_json::Value::String(_) => "string",
                    serde_json::Value::Array(_) => "array",
                    serde_json::Value::Object(_) => "object",
                }
                .to_string()
            }))
        })?;
    }
    for name in ["jsonb_extract_path_text", "json_extract_path_text"] {
        conn.create_scalar_function(name, -1, det, |ctx| {
            let Some(mut v) = json(ctx, 0)? else {
                return Ok(None);
            };
            for i in 1..ctx.len() {
                let Some(key) = text(ctx, i) else {
                    return Ok(None);
                };
                v = match v {
                    serde_json::Value::Object(mut o) => match o.remove(&key) {
                        Some(x) => x,
                        None => return Ok(None),
                    },
                    serde_json::Value::Array(a) => {
                        match key.parse::<i64>().ok().and_then(|n| {
                            let n = if n < 0 { a.len() as i64 + n } else { n };
                            usize::try_from(n).ok().and_then(|n| a.get(n).cloned())
                        }) {
                            Some(x) => x,
                            None => return Ok(None),
                        }
                    }
                    _ => return Ok(None),
                };
            }
            Ok(match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s),
                other => Some(crate::types::jsonb_text(&other)),
            })
        })?;
    }
    conn.create_scalar_function("jsonb_strip_nulls", 1, det, |ctx| {
        fn strip(v: serde_json::Value) -> serde_json::Value {
            match v {
                serde_json::Value::Object(o) => serde_json::Value::Object(
                    o.into_iter()
                        .filter(|(_, x)| !x.is_null())
                        .map(|(k, x)| (k, strip(x)))
                        .collect(),
                ),
                serde_json::Value::Array(a) => {
                    serde_json::Value::Array(a.into_iter().map(strip).collect())
                }
                other => other,
            }
        }
        Ok(json(ctx, 0)?.map(|v| crate::types::jsonb_text(&strip(v))))
    })?;
    for arity in [3, 4] {
        conn.create_scalar_function("jsonb_set", arity, det, move |ctx| {
            let (Some(mut target), Some(path), Some(value)) =
                (json(ctx, 0)?, text(ctx, 1), json(ctx, 2)?)
            else {
                return Ok(None);
            };
            let create = if arity == 4 {
                ctx.get::<Option<bool>>(3)?.unwrap_or(true)
            } else {
                true
            };
            let keys = path_keys(&path)?;
            set_path(&mut target, &keys, value, create);
            Ok(Some(crate::types::jsonb_text(&target)))
        })?;
    }
    Ok(())
}

/// A text array literal of path keys (`{a,b,0}`).
fn path_keys(path: &str) -> rusqlite::Result<Vec<String>> {
    let inner = path
        .trim()
        .strip_prefix('{')
        .and_then(|p| p.strip_suffix('}'))
        .ok_or_else(|| err(format!("malformed array literal: \"{path}\"")))?;
    Ok(if inner.trim().is_empty() {
        Vec::new()
    } else {
        inner
            .split(',')
            .map(|k| k.trim().trim_matches('"').to_string())
            .collect()
    })
}

/// jsonb_set's walk: replaces the value at `keys`, adding the last key
/// to an object (or appending past an array's end) when `create`.
fn set_path(
    target: &mut serde_json::Value,
    keys: &[String],
    value: serde_json::Value,
    create: bool,
) {
    let Some((key, rest)) = keys.split_first() else {
        return;
    };
    match target {
        serde_json::Value::Object(o) => {
            if rest.is_empty() {
                if create || o.contains_key(key) {
                    o.insert(key.clone(), value);
                }
            } else if let Some(next) = o.get_mut(key) {
                set_path(next, rest, value, create);
            }
        }
        serde_json::Value::Array(a) => {
            let Ok(n) = key.parse::<i64>() else {
                return;
            };
            let len = a.len() as i64;
            let at = if n < 0 { len + n } else { n };
            if rest.is_empty() {
                if (0..len).contains(&at) {
                    a[at as usize] = value;
                } else if create {
                    if at >= len {
                        a.push(value);
                    } else {
                        a.insert(0, value);
                    }
                }
            } else if (0..len).contains(&at) {
                set_path(&mut a[at as usize], rest, value, create);
            }
        }
        _ => {}
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// A to_char pattern's output, given the pattern as written (its case).
type Pattern<'a> = Box<dyn Fn(&str) -> String + 'a>;

/// PostgreSQL's `to_char` of a time (UTC, the engine's only zone):
/// the date and time patterns, `FM` to drop padding, `"…"` literals.
fn to_char(micros: i64, format: &str) -> String {
    let days = micros.div_euclid(86_400_000_000);
    let in_day = micros.rem_euclid(86_400_000_000);
    let (y, m, d) = crate::types::civil_from_days(days);
    let (h, mi, sec) = (
        in_day / 3_600_000_000,
        in_day / 60_000_000 % 60,
        in_day / 1_000_000 % 60,
    );
    let us = in_day % 1_000_000;
    let dow = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let doy = days - crate::types::days_from_civil(y, 1, 1) + 1;
    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
    // ISO 8601: weeks start on Monday; week 1 holds the year's first
    // Thursday.
    let iso_dow = (dow as i64 + 6) % 7 + 1;
    let thursday = days + 4 - iso_dow;
    let (iso_year, _, _) = crate::types::civil_from_days(thursday);
    let iso_week = (thursday - crate::types::days_from_civil(iso_year, 1, 1)) / 7 + 1;
    let mut out = String::new();
    let mut rest = format;
    // Case of a name pattern: all upper, capitalized, or all lower.
    let cased = |pattern: &str, name: &str| -> String {
        if pattern
            .chars()
            .nth(1)
            .is_some_and(|c| c.is_ascii_uppercase())
        {
            name.to_uppercase()
        } else if pattern.starts_with(|c: char| c.is_ascii_uppercase()) {
            name.to_string()
        } else {
            name.to_lowercase()
        }
    };
    while !rest.is_empty() {
        let fill = !rest.starts_with("FM");
        if !fill {
            rest = &rest[2..];
        }
        let num = |n: i64, width: usize| {
            if fill {
                format!("{n:0width$}")
            } else {
                n.to_string()
            }
        };
        let name = |pattern: &str, full: &str, short: bool| {
            let n = cased(pattern, if short { &full[..3] } else { full });
            if fill && !short {
                format!("{n:<9}")
            } else {
                n
            }
        };
        // Longest patterns first, as PostgreSQL matches them.
        let patterns: [(&str, Pattern<'_>); 41] = [
            ("SSSSS", Box::new(|_| (in_day / 1_000_000).to_string())),
            ("SSSS", Box::new(|_| (in_day / 1_000_000).to_string())),
            ("IYYY", Box::new(|_| num(iso_year, 4))),
            ("YYYY", Box::new(|_| num(y, 4))),
            ("HH24", Box::new(|_| num(h, 2))),
            ("HH12", Box::new(|_| num(h12, 2))),
            (
                "MONTH",
                Box::new(|p| name(p, MONTHS[(m - 1) as usize], false)),
            ),
            (
                "Month",
                Box::new(|p| name(p, MONTHS[(m - 1) as usize], false)),
            ),
            (
                "month",
                Box::new(|p| name(p, MONTHS[(m - 1) as usize], false)),
            ),
            (
                "A.M.",
                Box::new(|_| if h < 12 { "A.M." } else { "P.M." }.to_string()),
            ),
            (
                "P.M.",
                Box::new(|_| if h < 12 { "A.M." } else { "P.M." }.to_string()),
            ),
            (
                "a.m.",
                Box::new(|_| if h < 12 { "a.m." } else { "p.m." }.to_string()),
            ),
            (
                "p.m.",
                Box::new(|_| if h < 12 { "a.m." } else { "p.m." }.to_string()),
            ),
            ("DAY", Box::new(|p| name(p, DAYS[dow], false))),
            ("Day", Box::new(|p| name(p, DAYS[dow], false))),
            ("day", Box::new(|p| name(p, DAYS[dow], false))),
            ("YYY", Box::new(|_| num(y % 1000, 3))),
            ("MON", Box::new(|p| name(p, MONTHS[(m - 1) as usize], true))),
            ("Mon", Box::new(|p| name(p, MONTHS[(m - 1) as usize], true))),
            ("mon", Box::new(|p| name(p, MONTHS[(m - 1) as usize], true))),
            ("DDD", Box::new(|_| num(doy, 3))),
            ("DY", Box::new(|p| name(p, DAYS[dow], true))),
            ("Dy", Box::new(|p| name(p, DAYS[dow], true))),
            ("dy", Box::new(|p| name(p, DAYS[dow], true))),
            ("YY", Box::new(|_| num(y % 100, 2))),
            ("IW", Box::new(|_| num(iso_week, 2))),
            ("ID", Box::new(|_| iso_dow.to_string())),
            ("WW", Box::new(|_| num((doy - 1) / 7 + 1, 2))),
            ("CC", Box::new(|_| num((y - 1) / 100 + 1, 2))),
            ("W", Box::new(|_| ((d - 1) / 7 + 1).to_string())),
            ("J", Box::new(|_| (days + 2_440_588).to_string())),
            ("MM", Box::new(|_| num(m, 2))),
            ("DD", Box::new(|_| num(d, 2))),
            ("HH", Box::new(|_| num(h12, 2))),
            ("MI", Box::new(|_| num(mi, 2))),
            ("SS", Box::new(|_| num(sec, 2))),
            ("MS", Box::new(|_| num(us / 1000, 3))),
            ("US", Box::new(|_| num(us, 6))),
            (
                "AM",
                Box::new(|_| if h < 12 { "AM" } else { "PM" }.to_string()),
            ),
            (
                "PM",
                Box::new(|_| if h < 12 { "AM" } else { "PM" }.to_string()),
            ),
            ("TZ", Box::new(|_| "UTC".to_string())),
        ];
        // Number patterns match in either case (`hh24:mi`); names by
        // their case, which sets the output's.
        let numeric = |p: &str| {
            p.chars()
                .all(|c| c.is_ascii_digit() || "YMDHISUWCJ".contains(c))
        };
        let found = patterns.iter().find(|(p, _)| {
            rest.starts_with(p)
                || (numeric(p)
                    && rest
                        .get(..p.len())
                        .is_some_and(|r| r.eq_ignore_ascii_case(p)))
        });
        if let Some((p, f)) = found {
            out.push_str(&f(p));
            rest = &rest[p.len()..];
            continue;
        }
        let lower_ampm = [("am", h < 12), ("pm", h < 12)];
        if let Some((p, morning)) = lower_ampm.iter().find(|(p, _)| rest.starts_with(p)) {
            out.push_str(if *morning { "am" } else { "pm" });
            rest = &rest[p.len()..];
            continue;
        }
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            out.push_str(&quoted[..end]);
            rest = quoted.get(end + 1..).unwrap_or("");
            continue;
        }
        if rest.starts_with('D') {
            out.push_str(&(dow + 1).to_string());
            rest = &rest[1..];
            continue;
        }
        if rest.starts_with('Q') {
            out.push_str(&((m - 1) / 3 + 1).to_string());
            rest = &rest[1..];
            continue;
        }
        let mut chars = rest.chars();
        if let Some(c) = chars.next() {
            out.push(c);
        }
        rest = chars.as_str();
    }
    out
}
