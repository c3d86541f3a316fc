//! PostgreSQL types as the engine reports and reads them: OIDs and sizes
//! for RowDescription, text and binary output of SQLite values (through the
//! schema map's codec for table columns), and parameters read back into
//! the file's storage conventions.

use cutover_sqlite::rusqlite::types::{Value, ValueRef};
use cutover_sqlite::{Codec, Column, TimeCodec};

/// Microseconds from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i64 = 10_957;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Numeric,
    Float8,
    Text,
    Varchar,
    /// `name`: identifiers (current_database(), catalog names).
    Name,
    /// `"char"`: the catalog's one-byte codes (relkind, typtype).
    Char,
    /// `oid`: the catalog's object identifiers.
    Oid,
    Date,
    Timestamp,
    Timestamptz,
    Json,
    Jsonb,
    Bytea,
    Uuid,
    /// A one-dimensional array of the `ALL[i]` type, as `array_agg`
    /// builds it (its text form comes ready-made).
    Array(u8),
}

impl PgType {
    pub fn oid(self) -> u32 {
        match self {
            PgType::Bool => 16,
            PgType::Int2 => 21,
            PgType::Int4 => 23,
            PgType::Int8 => 20,
            PgType::Numeric => 1700,
            PgType::Float8 => 701,
            PgType::Text => 25,
            PgType::Varchar => 1043,
            PgType::Name => 19,
            PgType::Char => 18,
            PgType::Oid => 26,
            PgType::Date => 1082,
            PgType::Timestamp => 1114,
            PgType::Timestamptz => 1184,
            PgType::Json => 114,
            PgType::Jsonb => 3802,
            PgType::Bytea => 17,
            PgType::Uuid => 2950,
            PgType::Array(i) => ALL.get(usize::from(i)).map_or(1009, |t| t.array_oid()),
        }
    }

    pub fn from_oid(oid: u32) -> Option<PgType> {
        ALL.iter().copied().find(|t| t.oid() == oid)
    }

    /// The array type of `self`.
    pub fn array(self) -> PgType {
        let i = ALL.iter().position(|t| *t == self).unwrap_or(6);
        PgType::Array(i as u8)
    }
}

/// Every type the engine knows.
const ALL: &[PgType] = &[
    PgType::Bool,
    PgType::Int2,
    PgType::Int4,
    PgType::Int8,
    PgType::Numeric,
    PgType::Float8,
    PgType::Text,
    PgType::Varchar,
    PgType::Name,
    PgType::Char,
    PgType::Oid,
    PgType::Date,
    PgType::Timestamp,
    PgType::Timestamptz,
    PgType::Json,
    PgType::Jsonb,
    PgType::Bytea,
    PgType::Uuid,
];

impl PgType {
    /// pg_type.typlen.
    pub fn size(self) -> i16 {
        match self {
            PgType::Bool | PgType::Char => 1,
            PgType::Int2 => 2,
            PgType::Int4 | PgType::Date | PgType::Oid => 4,
            PgType::Int8 | PgType::Float8 | PgType::Timestamp | PgType::Timestamptz => 8,
            PgType::Uuid => 16,
            PgType::Name => 64,
            _ => -1,
        }
    }

    /// The type the schema map gave a column (`bigint`, `varchar(40)`, ...).
    pub fn of_column(pg_type: &str) -> PgType {
        PgType::from_name(pg_type).unwrap_or(PgType::Text)
    }

    /// A type name as SQL spells it in a cast or a declaration.
    pub fn from_name(name: &str) -> Option<PgType> {
        let lower = name.trim().to_ascii_lowercase();
        let lower = lower.strip_prefix("pg_catalog.").unwrap_or(&lower);
        let base = lower.split('(').next().unwrap_or("").trim();
        Some(match base {
            "bool" | "boolean" => PgType::Bool,
            "int2" | "smallint" => PgType::Int2,
            "int" | "int4" | "integer" | "serial" => PgType::Int4,
            "int8" | "bigint" | "bigserial" => PgType::Int8,
            "numeric" | "decimal" => PgType::Numeric,
            "float8" | "double precision" | "float" | "real" | "float4" => PgType::Float8,
            "text" => PgType::Text,
            "name" => PgType::Name,
            "\"char\"" => PgType::Char,
            "oid" | "regclass" | "regtype" => PgType::Oid,
            "varchar" | "character varying" | "char" | "character" | "bpchar" => PgType::Varchar,
            "date" => PgType::Date,
            "timestamp" | "timestamp without time zone" => PgType::Timestamp,
            "timestamptz" | "timestamp with time zone" => PgType::Timestamptz,
            "json" => PgType::Json,
            "jsonb" => PgType::Jsonb,
            "bytea" => PgType::Bytea,
            "uuid" => PgType::Uuid,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PgType::Bool => "boolean",
            PgType::Int2 => "smallint",
            PgType::Int4 => "integer",
            PgType::Int8 => "bigint",
            PgType::Numeric => "numeric",
            PgType::Float8 => "double precision",
            PgType::Text => "text",
            PgType::Varchar => "character varying",
            PgType::Name => "name",
            PgType::Char => "\"char\"",
            PgType::Oid => "oid",
            PgType::Date => "date",
            PgType::Timestamp => "timestamp without time zone",
            PgType::Timestamptz => "timestamp with time zone",
            PgType::Json => "json",
            PgType::Jsonb => "jsonb",
            PgType::Bytea => "bytea",
            PgType::Uuid => "uuid",
            PgType::Array(_) => "ARRAY",
        }
    }

    /// The OID of the array type of this type.
    pub fn array_oid(self) -> u32 {
        match self {
            PgType::Bool => 1000,
            PgType::Int2 => 1005,
            PgType::Int4 => 1007,
            PgType::Int8 => 1016,
            PgType::Numeric => 1231,
            PgType::Float8 => 1022,
            PgType::Text => 1009,
            PgType::Varchar => 1015,
            PgType::Name => 1003,
            PgType::Char => 1002,
            PgType::Oid => 1028,
            PgType::Date => 1182,
            PgType::Timestamp => 1115,
            PgType::Timestamptz => 1185,
            PgType::Json => 199,
            PgType::Jsonb => 3807,
            PgType::Bytea => 1001,
            PgType::Uuid => 2951,
            PgType::Array(_) => 0,
        }
    }

    /// The element type of an array type's OID.
    pub fn element_of(array_oid: u32) -> Option<PgType> {
        ALL.iter().copied().find(|t| t.array_oid() == array_oid)
    }

    /// pg_type.typname.
    pub fn short_name(self) -> &'static str {
        match self {
            PgType::Bool => "bool",
            PgType::Int2 => "int2",
            PgType::Int4 => "int4",
            PgType::Int8 => "int8",
            PgType::Numeric => "numeric",
            PgType::Float8 => "float8",
            PgType::Text => "text",
            PgType::Varchar => "varchar",
            PgType::Name => "name",
            PgType::Char => "char",
            PgType::Oid => "oid",
            PgType::Date => "date",
            PgType::Timestamp => "timestamp",
            PgType::Timestamptz => "timestamptz",
            PgType::Json => "json",
            PgType::Jsonb => "jsonb",
            PgType::Bytea => "bytea",
            PgType::Uuid => "uuid",
            PgType::Array(_) => "anyarray",
        }
    }

    pub fn is_integer(self) -> bool {
        matches!(self, PgType::Int2 | PgType::Int4 | PgType::Int8)
    }
}

/// Why a value could not be read or written as its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput {
    pub pg_type: PgType,
    pub text: String,
}

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid input syntax for type {}: \"{}\"",
            self.pg_type.name(),
            self.text
        )
    }
}

/// A stored value as PostgreSQL text output of `ty`; `column` (when the
/// value comes straight from a table column) says how the file stores it.
pub fn output_text(ty: PgType, column: Option<&Column>, value: ValueRef<'_>) -> Option<String> {
    if let ValueRef::Null = value {
        return None;
    }
    let input = match column {
        Some(c) => c.to_pg_text(value).ok().flatten(),
        None => None,
    };
    let input = input.unwrap_or_else(|| match (ty, value) {
        // A numeric computed as a double prints in positional notation.
        (PgType::Numeric, ValueRef::Real(f)) if f.is_finite() => format!("{f}"),
        _ => natural_text(value),
    });
    Some(normalize_output(ty, &input))
}

/// A SQLite value as text, without a column to say what it means.
fn natural_text(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => String::new(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => float_text(f),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Blob(b) => format!("\\x{}", hex(b)),
    }
}

/// PostgreSQL input text of a value in the spelling PostgreSQL prints.
fn normalize_output(ty: PgType, input: &str) -> String {
    match ty {
        PgType::Bool => match input {
            "1" | "t" | "true" => "t".to_string(),
            "0" | "f" | "false" => "f".to_string(),
            other => other.to_string(),
        },
        PgType::Timestamptz => match cutover_sqlite::canonical::timestamp_micros(input) {
            Some(micros) => format_timestamp(micros, true),
            None => input.to_string(),
        },
        PgType::Timestamp => match cutover_sqlite::canonical::timestamp_micros(input) {
            Some(micros) => format_timestamp(micros, false),
            None => input.to_string(),
        },
        PgType::Numeric => cutover_sqlite::canonical::canonical("numeric", input)
            .map(|c| c.into_owned())
            .unwrap_or_else(|_| input.to_string()),
        PgType::Float8 => match input.parse::<f64>() {
            Ok(f) => float_text(f),
            Err(_) => input.to_string(),
        },
        PgType::Jsonb => match serde_json::from_str::<serde_json::Value>(input) {
            Ok(v) => jsonb_text(&v),
            Err(_) => input.to_string(),
        },
        _ => input.to_string(),
    }
}

/// `f` as PostgreSQL prints a double (shortest exact form, its spelling of
/// exponents and special values).
pub fn float_text(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e15).contains(&abs) {
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    format!("{f}")
}

/// jsonb's output: keys ordered by length then bytes, one space after `:`
/// and `,`.
pub fn jsonb_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    write_jsonb(v, &mut out);
    out
}

fn write_jsonb(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::Value::String((*k).clone()).to_string());
                out.push_str(": ");
                write_jsonb(&map[*k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_jsonb(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Microseconds since 1970 as PostgreSQL prints a timestamp in UTC with
/// DateStyle ISO.
pub fn format_timestamp(micros: i64, zone: bool) -> String {
    let days = micros.div_euclid(86_400_000_000);
    let in_day = micros.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let secs = in_day / 1_000_000;
    let frac = in_day % 1_000_000;
    let mut s = format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    if frac != 0 {
        let f = format!("{frac:06}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    if zone {
        s.push_str("+00");
    }
    s
}

/// A value in PostgreSQL's binary format for `ty`, from its text output.
pub fn binary(ty: PgType, text: &str) -> Result<Vec<u8>, BadInput> {
    let bad = || BadInput {
        pg_type: ty,
        text: text.to_string(),
    };
    Ok(match ty {
        PgType::Bool => vec![u8::from(text == "t")],
        PgType::Int2 => text
            .parse::<i16>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        PgType::Int4 => text
            .parse::<i32>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        PgType::Int8 => text
            .parse::<i64>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        PgType::Float8 => parse_float(text)
            .ok_or_else(bad)?
            .to_bits()
            .to_be_bytes()
            .to_vec(),
        PgType::Numeric => numeric_binary(text).ok_or_else(bad)?,
        PgType::Date => {
            let days = date_days(text).ok_or_else(bad)?;
            ((days - PG_EPOCH_DAYS) as i32).to_be_bytes().to_vec()
        }
        PgType::Timestamp | PgType::Timestamptz => {
            let micros = cutover_sqlite::canonical::timestamp_micros(text).ok_or_else(bad)?;
            (micros - PG_EPOCH_MICROS).to_be_bytes().to_vec()
        }
        PgType::Jsonb => {
            let mut v = vec![1u8];
            v.extend_from_slice(text.as_bytes());
            v
        }
        PgType::Bytea => {
            let h = text.strip_prefix("\\x").ok_or_else(bad)?;
            unhex(h).ok_or_else(bad)?
        }
        PgType::Uuid => {
            let h: String = text.chars().filter(|c| *c != '-').collect();
            let b = unhex(&h).ok_or_else(bad)?;
            if b.len() != 16 {
                return Err(bad());
            }
            b
        }
        // Arrays are sent as text only.
        PgType::Array(_) => return Err(bad()),
        PgType::Oid => text
            .parse::<u32>()
            .map_err(|_| bad())?
            .to_be_bytes()
            .to_vec(),
        PgType::Text | PgType::Varchar | PgType::Name | PgType::Char | PgType::Json => {
            text.as_bytes().to_vec()
        }
    })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

fn unhex(h: &str) -> Option<Vec<u8>> {
    if !h.len().is_multiple_of(2) {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

fn date_days(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y = text[..4].parse().ok()?;
    let m = text[5..7].parse().ok()?;
    let d = text[8..10].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// numeric's binary form: base-10000 digits with weight, sign and scale.
fn numeric_binary(text: &str) -> Option<Vec<u8>> {
    let canon = cutover_sqlite::canonical::canonical("numeric", text).ok()?;
    let (negative, digits) = match canon.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, canon.as_ref()),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let scale = fraction.len() as u16;
    // Pad the integer part on the left and the fraction on the right to
    // whole groups of four.
    let pad_left = (4 - whole.len() % 4) % 4;
    let pad_right = (4 - fraction.len() % 4) % 4;
    let all = format!(
        "{}{whole}{fraction}{}",
        "0".repeat(pad_left),
        "0".repeat(pad_right)
    );
    let mut groups: Vec<i16> = all
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).ok()?.parse::<i16>().ok())
        .collect::<Option<_>>()?;
    let mut weight = ((whole.len() + pad_left) / 4) as i16 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let mut out = Vec::with_capacity(8 + 2 * groups.len());
    out.extend_from_slice(&(groups.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&(if negative { 0x4000u16 } else { 0 }).to_be_bytes());
    out.extend_from_slice(&scale.to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

/// An array parameter (`= ANY($1)`) as a JSON array of its elements'
/// SQLite values, for `json_each`. Text form `{a,"b c",NULL}` or binary.
pub fn array_param_json(elem: PgType, format: i16, bytes: &[u8]) -> Result<String, BadInput> {
    let bad = || BadInput {
        pg_type: elem,
        text: String::from_utf8_lossy(bytes).into_owned(),
    };
    let mut texts: Vec<Option<String>> = Vec::new();
    if format == 0 {
        let t = std::str::from_utf8(bytes).map_err(|_| bad())?.trim();
        let inner = t
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .ok_or_else(bad)?;
        let mut chars = inner.chars().peekable();
        while chars.peek().is_some() {
            let mut item = String::new();
            let quoted = chars.peek() == Some(&'"');
            if quoted {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => item.extend(chars.next()),
                        '"' => break,
                        c => item.push(c),
                    }
                }
                texts.push(Some(item));
                while chars.peek().is_some_and(|c| *c != ',') {
                    chars.next();
                }
            } else {
                while let Some(c) = chars.peek().copied() {
                    if c == ',' {
                        break;
                    }
                    item.push(c);
                    chars.next();
                }
                let item = item.trim();
                if item.eq_ignore_ascii_case("null") {
                    texts.push(None);
                } else {
                    texts.push(Some(item.to_string()));
                }
            }
            chars.next();
        }
    } else {
        let word = |at: usize| -> Result<i32, BadInput> {
            Ok(i32::from_be_bytes(
                bytes
                    .get(at..at + 4)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            ))
        };
        let dims = word(0)?;
        let mut at = 12;
        let mut count = if dims == 0 { 0 } else { 1 };
        for _ in 0..dims {
            count *= word(at)?.max(0) as usize;
            at += 8;
        }
        for _ in 0..count {
            let len = word(at)?;
            at += 4;
            if len < 0 {
                texts.push(None);
                continue;
            }
            let len = len as usize;
            let item = bytes.get(at..at + len).ok_or_else(bad)?;
            texts.push(Some(param_text(elem, 1, item)?));
            at += len;
        }
    }
    let mut json = Vec::with_capacity(texts.len());
    for t in texts {
        json.push(match t {
            None => serde_json::Value::Null,
            Some(t) => match to_storage(elem, None, &t)? {
                Value::Null => serde_json::Value::Null,
                Value::Integer(i) => i.into(),
                Value::Real(f) => serde_json::Number::from_f64(f)
                    .map(Into::into)
                    .unwrap_or(serde_json::Value::Null),
                Value::Text(s) => s.into(),
                Value::Blob(b) => hex(&b).into(),
            },
        });
    }
    Ok(serde_json::Value::Array(json).to_string())
}

/// A parameter as PostgreSQL input text of `ty`, from the client's text
/// or binary form.
pub fn param_text(ty: PgType, format: i16, bytes: &[u8]) -> Result<String, BadInput> {
    let bad = || BadInput {
        pg_type: ty,
        text: String::from_utf8_lossy(bytes).into_owned(),
    };
    if format == 0 {
        return String::from_utf8(bytes.to_vec()).map_err(|_| bad());
    }
    let be8 = || -> Result<[u8; 8], BadInput> { bytes.try_into().map_err(|_| bad()) };
    Ok(match ty {
        PgType::Bool => match bytes {
            [0] => "f".to_string(),
            [_] => "t".to_string(),
            _ => return Err(bad()),
        },
        PgType::Int2 => i16::from_be_bytes(bytes.try_into().map_err(|_| bad())?).to_string(),
        PgType::Int4 => i32::from_be_bytes(bytes.try_into().map_err(|_| bad())?).to_string(),
        PgType::Int8 => i64::from_be_bytes(be8()?).to_string(),
        PgType::Float8 => float_text(f64::from_be_bytes(be8()?)),
        PgType::Date => {
            let days = i32::from_be_bytes(bytes.try_into().map_err(|_| bad())?);
            let (y, m, d) = civil_from_days(i64::from(days) + PG_EPOCH_DAYS);
            format!("{y:04}-{m:02}-{d:02}")
        }
        PgType::Timestamp | PgType::Timestamptz => format_timestamp(
            i64::from_be_bytes(be8()?) + PG_EPOCH_MICROS,
            ty == PgType::Timestamptz,
        ),
        PgType::Jsonb => {
            String::from_utf8(bytes.get(1..).ok_or_else(bad)?.to_vec()).map_err(|_| bad())?
        }
        PgType::Bytea => format!("\\x{}", hex(bytes)),
        PgType::Uuid if bytes.len() == 16 => {
            let h = hex(bytes);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
        PgType::Numeric => numeric_from_binary(bytes).ok_or_else(bad)?,
        PgType::Oid => u32::from_be_bytes(bytes.try_into().map_err(|_| bad())?).to_string(),
        PgType::Text | PgType::Varchar | PgType::Name | PgType::Char | PgType::Json => {
            String::from_utf8(bytes.to_vec()).map_err(|_| bad())?
        }
        PgType::Uuid | PgType::Array(_) => return Err(bad()),
    })
}

fn numeric_from_binary(b: &[u8]) -> Option<String> {
    let word = |i: usize| Some(i16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?));
    let (n, weight, sign, scale) = (word(0)?, word(2)?, word(4)? as u16, word(6)?);
    let mut digits = String::new();
    for i in 0..n as usize {
        digits.push_str(&format!("{:04}", word(8 + 2 * i)?));
    }
    // Digits before the point: (weight + 1) groups.
    let point = (i32::from(weight) + 1) * 4;
    let mut whole = String::new();
    let mut fraction = String::new();
    for (i, c) in digits.chars().enumerate() {
        if (i as i32) < point {
            whole.push(c);
        } else {
            fraction.push(c);
        }
    }
    if point > digits.len() as i32 {
        whole.push_str(&"0".repeat((point - digits.len() as i32) as usize));
    }
    if point < 0 {
        fraction = format!("{}{fraction}", "0".repeat((-point) as usize));
    }
    let mut fraction: String = fraction
        .chars()
        .chain(std::iter::repeat('0'))
        .take(scale.max(0) as usize)
        .collect();
    if scale <= 0 {
        fraction.clear();
    }
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    let sign = if sign == 0x4000 { "-" } else { "" };
    Some(if fraction.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    })
}

/// PostgreSQL input text of `ty` as the SQLite value to store in a column
/// with `codec` (or, without a column, the natural SQLite form).
pub fn to_storage(ty: PgType, codec: Option<Codec>, text: &str) -> Result<Value, BadInput> {
    let bad = || BadInput {
        pg_type: ty,
        text: text.to_string(),
    };
    let t = text.trim();
    Ok(match ty {
        PgType::Bool => {
            let b = match t.to_ascii_lowercase().as_str() {
                "t" | "true" | "yes" | "y" | "on" | "1" => true,
                "f" | "false" | "no" | "n" | "off" | "0" => false,
                _ => return Err(bad()),
            };
            match codec {
                Some(Codec::BoolText) => Value::Text(if b { "true" } else { "false" }.to_string()),
                _ => Value::Integer(i64::from(b)),
            }
        }
        PgType::Int2 | PgType::Int4 | PgType::Int8 => {
            let n = t.parse::<i64>().map_err(|_| bad())?;
            let fits = match ty {
                PgType::Int2 => i16::try_from(n).is_ok(),
                PgType::Int4 => i32::try_from(n).is_ok(),
                _ => true,
            };
            if !fits {
                return Err(bad());
            }
            Value::Integer(n)
        }
        PgType::Float8 => Value::Real(parse_float(t).ok_or_else(bad)?),
        PgType::Numeric => {
            let canon = cutover_sqlite::canonical::canonical("numeric", t).map_err(|_| bad())?;
            match canon.parse::<i64>() {
                Ok(i) => Value::Integer(i),
                Err(_) => Value::Real(canon.parse::<f64>().map_err(|_| bad())?),
            }
        }
        PgType::Timestamp | PgType::Timestamptz => {
            let micros = cutover_sqlite::canonical::timestamp_micros(t).ok_or_else(bad)?;
            match codec {
                Some(Codec::Time(TimeCodec::UnixMillis)) => Value::Integer(micros.div_euclid(1000)),
                Some(Codec::Time(TimeCodec::UnixSeconds)) => {
                    Value::Integer(micros.div_euclid(1_000_000))
                }
                _ => Value::Text(iso_text(micros)),
            }
        }
        PgType::Date => {
            date_days(t).ok_or_else(bad)?;
            Value::Text(t.to_string())
        }
        PgType::Json | PgType::Jsonb => {
            serde_json::from_str::<serde_json::Value>(t).map_err(|_| bad())?;
            Value::Text(text.to_string())
        }
        PgType::Uuid => {
            let h: String = t.chars().filter(|c| *c != '-').collect();
            if h.len() != 32 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            let h = h.to_ascii_lowercase();
            Value::Text(format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            ))
        }
        PgType::Bytea => match t.strip_prefix("\\x") {
            Some(h) => Value::Blob(unhex(h).ok_or_else(bad)?),
            None => Value::Blob(text.as_bytes().to_vec()),
        },
        PgType::Oid => Value::Integer(t.parse::<u32>().map_err(|_| bad())?.into()),
        PgType::Text | PgType::Varchar | PgType::Name | PgType::Char | PgType::Array(_) => {
            Value::Text(text.to_string())
        }
    })
}

/// A time as the file's ISO text: milliseconds as JavaScript's
/// `toISOString` writes them, microseconds when the time has them.
pub use cutover_sqlite::value::iso_text;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_postgresql_does() {
        let micros =
            cutover_sqlite::canonical::timestamp_micros("2024-02-29T13:04:05.120Z").unwrap();
        assert_eq!(format_timestamp(micros, true), "2024-02-29 13:04:05.12+00");
        assert_eq!(iso_text(micros), "2024-02-29T13:04:05.120Z");
        let bin = binary(PgType::Timestamptz, "2000-01-01 00:00:01+00").unwrap();
        assert_eq!(i64::from_be_bytes(bin.try_into().unwrap()), 1_000_000);
    }

    #[test]
    fn numerics_round_trip_through_binary() {
        for text in [
            "0",
            "149.99",
            "-0.0001",
            "10000",
            "123456789.123456789",
            "0.50",
        ] {
            let b = numeric_binary(text).unwrap();
            assert_eq!(numeric_from_binary(&b).unwrap(), text, "{text}");
        }
    }

    #[test]
    fn jsonb_orders_keys_as_postgresql() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"bb":1,"a":[1,{"z":null,"y":true}],"c":"x"}"#).unwrap();
        assert_eq!(
            jsonb_text(&v),
            r#"{"a": [1, {"y": true, "z": null}], "c": "x", "bb": 1}"#
        );
    }

    #[test]
    fn floats_print_as_postgresql() {
        assert_eq!(float_text(0.1), "0.1");
        assert_eq!(float_text(1e21), "1e+21");
        assert_eq!(float_text(1.5e-7), "1.5e-07");
        assert_eq!(float_text(100.0), "100");
    }
}
