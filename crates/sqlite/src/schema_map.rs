//! Reading a SQLite file's schema and data into the schema map.
//!
//! The declaration decides a column's type family (SQLite's affinity
//! rules: INT → integer, CHAR/CLOB/TEXT → text, BLOB or nothing → by
//! data, REAL/FLOA/DOUB → float, else numeric), with the names apps
//! really write (BOOLEAN, DATETIME, DATE, JSON, UUID, DECIMAL) on top; the
//! data decides the codec within the family: a DATETIME column holding
//! integers above 10^11 holds epoch milliseconds, below that epoch
//! seconds, and text holds ISO-8601. An override (`[[schema.columns]]`)
//! settles what neither can. Values that fit no codec of the chosen type
//! are listed with their key, never altered.

use cutover_config::ColumnSetting;
use rusqlite::types::ValueRef;
use rusqlite::Connection;

#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("schema.columns: {0}")]
    Override(String),
}

/// How many values of each SQLite storage class a column holds, and what
/// they look like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub null: u64,
    pub integer: u64,
    pub real: u64,
    pub text: u64,
    pub blob: u64,
    /// Integers that are 0 or 1.
    pub zero_one: u64,
    /// Texts that spell a boolean ('true'/'false', 't'/'f', 'yes'/'no', '1'/'0').
    pub bool_text: u64,
    /// Integers above 10^11 (epoch milliseconds after 1973).
    pub big_integers: u64,
    /// Texts that are ISO-8601 / SQLite date-times.
    pub datetime_text: u64,
    /// Texts that are plain dates (`YYYY-MM-DD`).
    pub date_text: u64,
    /// Texts that parse as a JSON object or array.
    pub json_text: u64,
    /// Texts that are UUIDs.
    pub uuid_text: u64,
    /// The longest text, in characters.
    pub max_chars: u64,
}

impl Profile {
    pub fn non_null(&self) -> u64 {
        self.integer + self.real + self.text + self.blob
    }

    fn note(&mut self, value: ValueRef<'_>) {
        match value {
            ValueRef::Null => self.null += 1,
            ValueRef::Integer(i) => {
                self.integer += 1;
                if i == 0 || i == 1 {
                    self.zero_one += 1;
                }
                if i.unsigned_abs() >= 100_000_000_000 {
                    self.big_integers += 1;
                }
            }
            ValueRef::Real(_) => self.real += 1,
            ValueRef::Text(bytes) => {
                self.text += 1;
                let text = String::from_utf8_lossy(bytes);
                self.max_chars = self.max_chars.max(text.chars().count() as u64);
                let trimmed = text.trim();
                if ["true", "false", "t", "f", "yes", "no", "1", "0"]
                    .iter()
                    .any(|b| b.eq_ignore_ascii_case(trimmed))
                {
                    self.bool_text += 1;
                }
                if is_date(&text) {
                    self.date_text += 1;
                } else if is_datetime(&text) {
                    self.datetime_text += 1;
                }
                if (trimmed.starts_with('{') || trimmed.starts_with('['))
                    && serde_json::from_str::<serde_json::Value>(&text).is_ok()
                {
                    self.json_text += 1;
                }
                if is_uuid(&text) {
                    self.uuid_text += 1;
                }
            }
            ValueRef::Blob(_) => self.blob += 1,
        }
    }
}

/// `YYYY-MM-DD` alone.
fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|±HH:MM]`, as SQLite, JavaScript and
/// ORMs write them.
fn is_datetime(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() < 16 || !is_date(&text[..10]) || !(b[10] == b'T' || b[10] == b' ') {
        return false;
    }
    b[11..13].iter().all(u8::is_ascii_digit)
        && b[13] == b':'
        && b[14..16].iter().all(u8::is_ascii_digit)
}

fn is_uuid(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// How a date-time is stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeCodec {
    UnixSeconds,
    UnixMillis,
    /// ISO-8601 or SQLite's `YYYY-MM-DD HH:MM:SS` text; without an offset
    /// it means UTC.
    IsoText,
}

/// How a column's values are stored in the file: what a value read from
/// it means, and how one written to it must look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored as SQLite stores the family (integers, reals, text, blobs).
    Native,
    /// A boolean as 0/1.
    BoolInt,
    /// A boolean as text ('true'/'false', 't'/'f', 'yes'/'no').
    BoolText,
    /// A date-time; the variant is how new values are written. Values in
    /// the other forms (a column can mix them) are read too.
    Time(TimeCodec),
    /// A date as `YYYY-MM-DD` text.
    DateText,
    /// JSON as text.
    JsonText,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Native => "native",
            Codec::BoolInt => "bool_int",
            Codec::BoolText => "bool_text",
            Codec::Time(TimeCodec::UnixSeconds) => "unix_s",
            Codec::Time(TimeCodec::UnixMillis) => "unix_ms",
            Codec::Time(TimeCodec::IsoText) => "iso_text",
            Codec::DateText => "date_text",
            Codec::JsonText => "json_text",
        }
    }

    fn parse(name: &str) -> Option<Codec> {
        Some(match name {
            "native" => Codec::Native,
            "bool_int" => Codec::BoolInt,
            "bool_text" => Codec::BoolText,
            "unix_s" => Codec::Time(TimeCodec::UnixSeconds),
            "unix_ms" => Codec::Time(TimeCodec::UnixMillis),
            "iso_text" => Codec::Time(TimeCodec::IsoText),
            "date_text" => Codec::DateText,
            "json_text" => Codec::JsonText,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// The declaration as written (`INTEGER`, `DATETIME`, `varchar(20)`, ``).
    pub declared: String,
    pub not_null: bool,
    /// The SQLite default expression as written.
    pub default: Option<String>,
    pub profile: Profile,
    pub pg_type: String,
    pub codec: Codec,
    /// The PostgreSQL default, translated.
    pub pg_default: Option<String>,
    /// Decisions the data could not settle, said in the DDL comment.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
    /// Primary-key columns in key order; empty for none.
    pub primary_key: Vec<String>,
    /// The `INTEGER PRIMARY KEY` column that aliases the rowid: an identity
    /// on new.
    pub rowid_alias: Option<String>,
    pub autoincrement: bool,
    pub without_rowid: bool,
    /// Where the identity restarts: past the largest id and past
    /// `sqlite_sequence`, as SQLite would continue.
    pub next_id: Option<i64>,
    /// `(key, column, value)` of values that fit no codec of the column's type.
    pub bad_values: Vec<(String, String, String)>,
    /// Indexes and UNIQUE constraints (not the primary key's).
    pub indexes: Vec<Index>,
    pub foreign_keys: Vec<ForeignKey>,
    /// CHECK expressions carried over (column and table constraints).
    pub checks: Vec<String>,
    /// The table's CREATE statement as the file holds it.
    pub sql: String,
}

impl Table {
    /// This table's DDL after the data, before foreign keys: its primary
    /// key, the identity restart where SQLite would continue, its indexes,
    /// UNIQUE and CHECK constraints.
    pub fn keys_and_indexes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.primary_key.is_empty() {
            let keys: Vec<String> = self.primary_key.iter().map(|k| quote(k)).collect();
            out.push(format!(
                "ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY ({})",
                quote(&self.name),
                quote(&format!("{}_pkey", self.name)),
                keys.join(", ")
            ));
        }
        if let (Some(id), Some(next)) = (&self.rowid_alias, self.next_id) {
            out.push(format!(
                "ALTER TABLE {} ALTER COLUMN {} RESTART WITH {next}",
                quote(&self.name),
                quote(id)
            ));
        }
        out.extend(self.indexes.iter().filter_map(|i| index_ddl(self, i)));
        for (n, check) in self.checks.iter().enumerate() {
            out.push(format!(
                "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({check})",
                quote(&self.name),
                quote(&format!("{}_check{}", self.name, n + 1))
            ));
        }
        out
    }

    /// The table's rows, as the profile counted them.
    pub fn rows(&self) -> u64 {
        self.columns
            .first()
            .map(|c| c.profile.null + c.profile.non_null())
            .unwrap_or(0)
    }
}

/// An index or a UNIQUE constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    pub name: String,
    pub unique: bool,
    /// Declared as a table constraint (UNIQUE (...)) rather than CREATE INDEX.
    pub constraint: bool,
    /// Key columns, each with whether it is descending; None for an
    /// expression, which is not carried over.
    pub columns: Vec<(Option<String>, bool)>,
    /// The WHERE clause of a partial index, as written.
    pub partial: Option<String>,
}

/// A foreign key with its actions.
#[derive(Debug, Clone, PartialEq)]
pub struct ForeignKey {
    pub columns: Vec<String>,
    pub references: String,
    pub referenced: Vec<String>,
    pub on_update: String,
    pub on_delete: String,
}

/// The schema map of one SQLite file.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaMap {
    pub tables: Vec<Table>,
    /// Tables that are not converted, with the reason: virtual tables
    /// (FTS, R*Tree) and their shadow tables.
    pub skipped: Vec<(String, String)>,
}

impl SchemaMap {
    /// Reads every user table of `conn` (not `sqlite_*`), profiles every
    /// column's values, and decides types and codecs; `overrides` win.
    pub fn read(conn: &Connection, overrides: &[ColumnSetting]) -> Result<SchemaMap, SqliteError> {
        let overrides = &with_declared_types(conn, overrides)?;
        let (names, skipped) = list_tables(conn, overrides)?;
        let mut tables = Vec::new();
        for (name, sql) in names {
            tables.push(read_table(conn, &name, &sql, overrides)?);
        }
        Ok(SchemaMap { tables, skipped })
    }

    /// The map after the file's schema changed, read on `conn` (so inside
    /// its transaction when it has one): a table whose CREATE statement is
    /// unchanged keeps its types and codecs from `previous` without being
    /// profiled again (its indexes are read again); a new or altered table
    /// is read and profiled.
    pub fn reread(
        conn: &Connection,
        previous: &SchemaMap,
        overrides: &[ColumnSetting],
    ) -> Result<SchemaMap, SqliteError> {
        let overrides = &with_declared_types(conn, overrides)?;
        let (names, skipped) = list_tables(conn, overrides)?;
        let mut tables = Vec::new();
        for (name, sql) in names {
            let kept = previous
                .tables
                .iter()
                .find(|t| t.name == name && t.sql == sql);
            tables.push(match kept {
                Some(t) => Table {
                    indexes: indexes(conn, &name)?,
                    ..t.clone()
                },
                None => read_table(conn, &name, &sql, overrides)?,
            });
        }
        Ok(SchemaMap { tables, skipped })
    }

    /// The connection's temporary tables (its `temp` schema), read and
    /// profiled as the file's are.
    pub fn read_temp(conn: &Connection) -> Result<Vec<Table>, SqliteError> {
        let mut stmt = conn.prepare(
            "SELECT name, sql FROM temp.sqlite_master WHERE type = 'table' ORDER BY name",
        )?;
        let names: Vec<(String, String)> = stmt
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                ))
            })?
            .collect::<Result<_, _>>()?;
        names
            .iter()
            .map(|(name, sql)| read_table(conn, name, sql, &[]))
            .collect()
    }

    /// As [`SchemaMap::read`] for the file at `path`, with the tables
    /// profiled on up to `threads` read-only connections at once.
    pub fn read_file(
        path: &std::path::Path,
        overrides: &[ColumnSetting],
        threads: usize,
    ) -> Result<SchemaMap, SqliteError> {
        let first = crate::open_read_only(path)?;
        let overrides = &with_declared_types(&first, overrides)?;
        let (names, skipped) = list_tables(&first, overrides)?;
        drop(first);
        let threads = threads.clamp(1, names.len().max(1));
        // Each thread takes the next table not yet taken.
        let taken = std::sync::atomic::AtomicUsize::new(0);
        let read = |_: usize| -> Result<Vec<(usize, Table)>, SqliteError> {
            let conn = crate::open_read_only(path)?;
            let mut done = Vec::new();
            loop {
                let i = taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, sql)) = names.get(i) else {
                    return Ok(done);
                };
                done.push((i, read_table(&conn, name, sql, overrides)?));
            }
        };
        let mut tables: Vec<(usize, Table)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|n| {
                    let read = &read;
                    scope.spawn(move || read(n))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SqliteError::Override(
                            "a profiling thread stopped".to_string(),
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })?
        .into_iter()
        .flatten()
        .collect();
        tables.sort_by_key(|(i, _)| *i);
        Ok(SchemaMap {
            tables: tables.into_iter().map(|(_, t)| t).collect(),
            skipped,
        })
    }

    /// PostgreSQL DDL for every table, as `cutover schema` prints it: the
    /// tables, then what convert creates after the data.
    pub fn ddl(&self) -> String {
        let mut out = String::new();
        for (name, why) in &self.skipped {
            out.push_str(&format!("-- {} is not converted: {why}\n", quote(name)));
        }
        if !self.skipped.is_empty() {
            out.push('\n');
        }
        for statement in self.table_ddl() {
            out.push_str(&statement);
            out.push_str(";\n\n");
        }
        for statement in self.post_data_ddl() {
            out.push_str(&statement);
            out.push_str(";\n");
        }
        for t in &self.tables {
            for i in t
                .indexes
                .iter()
                .filter(|i| i.columns.iter().any(|(c, _)| c.is_none()))
            {
                out.push_str(&format!(
                    "-- index {} on {} uses an expression; create it by hand\n",
                    quote(&i.name),
                    quote(&t.name)
                ));
            }
        }
        out
    }

    /// One CREATE TABLE per table: columns with their types, defaults and
    /// identities, and a comment per column saying what the file holds.
    /// Keys come after the data ([`SchemaMap::post_data_ddl`]).
    pub fn table_ddl(&self) -> Vec<String> {
        let mut statements = Vec::new();
        for t in &self.tables {
            let mut out = format!("CREATE TABLE {} (\n", quote(&t.name));
            let mut lines = Vec::new();
            for c in &t.columns {
                let mut line = format!("  {} {}", quote(&c.name), c.pg_type);
                if t.rowid_alias.as_deref() == Some(c.name.as_str()) {
                    line.push_str(" GENERATED BY DEFAULT AS IDENTITY");
                } else if let Some(d) = &c.pg_default {
                    line.push_str(&format!(" DEFAULT {d}"));
                }
                if c.not_null || t.primary_key.contains(&c.name) {
                    line.push_str(" NOT NULL");
                }
                lines.push((line, comment(c)));
            }
            let last = lines.len().saturating_sub(1);
            for (i, (line, comment)) in lines.iter().enumerate() {
                let comma = if i == last { "" } else { "," };
                if comment.is_empty() {
                    out.push_str(&format!("{line}{comma}\n"));
                } else {
                    out.push_str(&format!("{line}{comma}  -- {comment}\n"));
                }
            }
            out.push(')');
            statements.push(out);
        }
        statements
    }

    /// What follows the data (built once over all rows, as pgloader and
    /// pg_restore do): primary keys, identity restarts where SQLite would
    /// continue, indexes, UNIQUE and CHECK constraints, then foreign keys.
    pub fn post_data_ddl(&self) -> Vec<String> {
        let mut out = self.keys_and_indexes();
        out.extend(self.foreign_keys().into_iter().map(|fk| fk.ddl));
        out
    }

    /// The post-data DDL before the foreign keys.
    pub fn keys_and_indexes(&self) -> Vec<String> {
        self.tables
            .iter()
            .flat_map(Table::keys_and_indexes)
            .collect()
    }

    /// Every foreign key, as PostgreSQL DDL with the query that counts the
    /// rows it would refuse (SQLite does not check foreign keys unless an
    /// app turned them on, so files hold rows whose parent is gone).
    pub fn foreign_keys(&self) -> Vec<ForeignKeyDdl> {
        let mut out = Vec::new();
        for t in &self.tables {
            for (n, fk) in t.foreign_keys.iter().enumerate() {
                let list = |names: &[String]| {
                    names
                        .iter()
                        .map(|c| quote(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let name = quote(&format!("{}_fkey{}", t.name, n + 1));
                let matches: Vec<String> = fk
                    .columns
                    .iter()
                    .zip(&fk.referenced)
                    .map(|(c, r)| format!("p.{} = c.{}", quote(r), quote(c)))
                    .collect();
                let present: Vec<String> = fk
                    .columns
                    .iter()
                    .map(|c| format!("c.{} IS NOT NULL", quote(c)))
                    .collect();
                out.push(ForeignKeyDdl {
                    table: t.name.clone(),
                    ddl: format!(
                        "ALTER TABLE {} ADD CONSTRAINT {name} FOREIGN KEY ({}) REFERENCES {} ({}) ON UPDATE {} ON DELETE {}",
                        quote(&t.name),
                        list(&fk.columns),
                        quote(&fk.references),
                        list(&fk.referenced),
                        fk.on_update,
                        fk.on_delete
                    ),
                    describe: format!(
                        "foreign key {name} ({}.{} -> {}.{})",
                        quote(&t.name),
                        list(&fk.columns),
                        quote(&fk.references),
                        list(&fk.referenced)
                    ),
                    orphans: format!(
                        "SELECT count(*) FROM {} c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})",
                        quote(&t.name),
                        present.join(" AND "),
                        quote(&fk.references),
                        matches.join(" AND ")
                    ),
                });
            }
        }
        out
    }
}

/// A foreign key's DDL, its description, and the query counting the rows
/// that break it.
#[derive(Debug, Clone)]
pub struct ForeignKeyDdl {
    /// The referencing table.
    pub table: String,
    pub ddl: String,
    pub describe: String,
    pub orphans: String,
}

/// CREATE INDEX (or a UNIQUE constraint) for PostgreSQL; None for an
/// expression index, which `ddl` names in a comment to be made by hand.
fn index_ddl(t: &Table, i: &Index) -> Option<String> {
    if i.columns.iter().any(|(c, _)| c.is_none()) {
        return None;
    }
    let columns: Vec<String> = i
        .columns
        .iter()
        .map(|(c, desc)| {
            let c = quote(c.as_deref().unwrap_or_default());
            if *desc {
                format!("{c} DESC")
            } else {
                c
            }
        })
        .collect();
    if i.constraint {
        // SQLite names these sqlite_autoindex_*; PostgreSQL's own
        // convention is table_columns_key.
        let names: Vec<&str> = i.columns.iter().filter_map(|(c, _)| c.as_deref()).collect();
        return Some(format!(
            "ALTER TABLE {} ADD CONSTRAINT {} UNIQUE ({})",
            quote(&t.name),
            quote(&format!("{}_{}_key", t.name, names.join("_"))),
            columns.join(", ")
        ));
    }
    Some(format!(
        "CREATE {}INDEX {} ON {} ({}){}",
        if i.unique { "UNIQUE " } else { "" },
        quote(&i.name),
        quote(&t.name),
        columns.join(", "),
        i.partial
            .as_deref()
            .map(|w| format!(" WHERE {w}"))
            .unwrap_or_default()
    ))
}

fn comment(c: &Column) -> String {
    let p = &c.profile;
    let mut counts = Vec::new();
    for (n, name) in [
        (p.integer, "integer"),
        (p.real, "real"),
        (p.text, "text"),
        (p.blob, "blob"),
        (p.null, "null"),
    ] {
        if n > 0 {
            counts.push(format!("{name} {n}"));
        }
    }
    let declared = if c.declared.is_empty() {
        "(no type)".to_string()
    } else {
        c.declared.clone()
    };
    let mut text = format!(
        "sqlite: {declared}; stored: {}; codec: {}",
        if counts.is_empty() {
            "empty".to_string()
        } else {
            counts.join(", ")
        },
        c.codec.name()
    );
    for n in &c.notes {
        text.push_str("; ");
        text.push_str(n);
    }
    text
}

/// A PostgreSQL identifier, always quoted (mixed case and reserved words
/// come through as they are).
/// Each table's rowid alias (`id INTEGER PRIMARY KEY`), from the
/// declarations alone: cheap enough for a promotion's pause.
pub fn rowid_aliases(conn: &Connection) -> Result<Vec<(String, String)>, SqliteError> {
    let mut tables = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         AND name NOT LIKE '\\_cutover\\_%' ESCAPE '\\' AND sql NOT LIKE '%WITHOUT ROWID%'",
    )?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for name in names {
        let mut info = conn.prepare("SELECT name, type, pk FROM pragma_table_info(?1)")?;
        let keys: Vec<(String, String)> = info
            .query_map([&name], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .filter_map(|r| r.ok())
            .filter(|(_, _, pk)| *pk > 0)
            .map(|(c, ty, _)| (c, ty))
            .collect();
        if let [(column, ty)] = keys.as_slice() {
            if ty.eq_ignore_ascii_case("INTEGER") {
                tables.push((name.clone(), column.clone()));
            }
        }
    }
    Ok(tables)
}

pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A table's name and its CREATE statement, or why it is skipped.
type NameAnd = (String, String);

/// The user tables of the file with their CREATE statements (not
/// `sqlite_*`), and those not converted with the reason: virtual tables and
/// their shadow tables. Every override must name one of the tables.
/// Where the SQLite engine records the PostgreSQL types an app declared
/// through it that the file's declarations cannot say (`integer` and
/// `smallint`, which SQLite spells `INTEGER` like every integer): table,
/// column, type.
pub const DECLARED_TYPES: &str = "_cutover_columns";

/// `overrides` (the configuration's, which win) and the types recorded in
/// [`DECLARED_TYPES`] for columns the file still has.
fn with_declared_types(
    conn: &Connection,
    overrides: &[ColumnSetting],
) -> Result<Vec<ColumnSetting>, SqliteError> {
    let mut all = overrides.to_vec();
    let recorded: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [DECLARED_TYPES],
        |r| r.get(0),
    )?;
    if recorded == 0 {
        return Ok(all);
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT d.tbl, d.col, d.pg_type FROM {DECLARED_TYPES} AS d \
         WHERE EXISTS (SELECT 1 FROM pragma_table_info(d.tbl) AS p WHERE p.name = d.col)"
    ))?;
    let rows = stmt.query_map([], |r| {
        Ok(ColumnSetting {
            table: r.get(0)?,
            column: r.get(1)?,
            pg_type: r.get(2)?,
            storage: None,
        })
    })?;
    for row in rows {
        let row = row?;
        if !all
            .iter()
            .any(|o| o.table == row.table && o.column == row.column)
        {
            all.push(row);
        }
    }
    Ok(all)
}

fn list_tables(
    conn: &Connection,
    overrides: &[ColumnSetting],
) -> Result<(Vec<NameAnd>, Vec<NameAnd>), SqliteError> {
    let mut names = Vec::new();
    let mut skipped = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT l.name, l.type, m.sql FROM pragma_table_list AS l \
         JOIN sqlite_master AS m ON m.name = l.name AND m.type = 'table' \
         WHERE l.schema = 'main' AND l.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY l.name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    for row in rows {
        let (name, kind, sql) = row?;
        match kind.as_str() {
            // cutover's own change log and positions are not the app's data.
            "table" if name.starts_with("_cutover_") => {}
            "table" => names.push((name, sql.unwrap_or_default())),
            "virtual" => skipped.push((
                name,
                "a virtual table (FTS, R*Tree, ...); PostgreSQL has its own full-text and spatial indexes".to_string(),
            )),
            _ => skipped.push((name, format!("a {kind} table of a virtual table"))),
        }
    }
    for o in overrides {
        if !names.iter().any(|(n, _)| *n == o.table) {
            return Err(SqliteError::Override(format!(
                "table {:?} is not in the SQLite file",
                o.table
            )));
        }
    }
    Ok((names, skipped))
}

struct Info {
    name: String,
    declared: String,
    not_null: bool,
    default: Option<String>,
    pk: i64,
}

fn read_table(
    conn: &Connection,
    name: &str,
    sql: &str,
    overrides: &[ColumnSetting],
) -> Result<Table, SqliteError> {
    let mut infos = Vec::new();
    {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({})", quote(name)))?;
        let rows = stmt.query_map([], |r| {
            Ok(Info {
                name: r.get(1)?,
                declared: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                not_null: r.get::<_, i64>(3)? != 0,
                default: r.get(4)?,
                pk: r.get(5)?,
            })
        })?;
        for row in rows {
            infos.push(row?);
        }
    }
    let upper = sql.to_ascii_uppercase();
    // The table options follow the last parenthesis: `WITHOUT ROWID, STRICT`.
    let without_rowid = upper.rsplit(')').next().is_some_and(|options| {
        options
            .replace(char::is_whitespace, "")
            .contains("WITHOUTROWID")
    });
    let mut keyed: Vec<&Info> = infos.iter().filter(|i| i.pk > 0).collect();
    keyed.sort_by_key(|i| i.pk);
    let primary_key: Vec<String> = keyed.iter().map(|i| i.name.clone()).collect();
    // Only a single-column key declared exactly INTEGER aliases the rowid
    // (`INT PRIMARY KEY` does not), and never in a WITHOUT ROWID table.
    let rowid_alias = match keyed.as_slice() {
        [only] if !without_rowid && only.declared.eq_ignore_ascii_case("INTEGER") => {
            Some(only.name.clone())
        }
        _ => None,
    };
    let autoincrement = upper.contains("AUTOINCREMENT");

    let mut profiles: Vec<Profile> = vec![Profile::default(); infos.len()];
    if !infos.is_empty() {
        let list: Vec<String> = infos.iter().map(|i| quote(&i.name)).collect();
        let mut stmt = conn.prepare(&format!("SELECT {} FROM {}", list.join(", "), quote(name)))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            for (i, p) in profiles.iter_mut().enumerate() {
                p.note(row.get_ref(i)?);
            }
        }
    }

    // SQLite lets a primary key that is not a rowid alias hold NULLs
    // (drizzle's `__drizzle_migrations` has `id SERIAL PRIMARY KEY`, all
    // NULL). PostgreSQL cannot; such a table is copied without the key.
    let mut primary_key = primary_key;
    let mut key_notes = Vec::new();
    if rowid_alias.is_none() && !without_rowid {
        let nulls: Vec<&str> = infos
            .iter()
            .zip(&profiles)
            .filter(|(i, p)| i.pk > 0 && p.null > 0)
            .map(|(i, _)| i.name.as_str())
            .collect();
        if !nulls.is_empty() {
            key_notes.push((
                nulls[0].to_string(),
                format!(
                    "the primary key ({}) holds NULLs, which PostgreSQL does not allow: the table is copied without a primary key",
                    primary_key.join(", ")
                ),
            ));
            primary_key.clear();
        }
    }
    let mut columns = Vec::new();
    for (info, profile) in infos.iter().zip(profiles) {
        let given = overrides
            .iter()
            .find(|o| o.table == name && o.column == info.name);
        columns.push(decide(
            info,
            profile,
            given,
            rowid_alias.as_deref() == Some(&info.name),
        )?);
    }
    if let Some(o) = overrides
        .iter()
        .find(|o| o.table == name && !infos.iter().any(|i| i.name == o.column))
    {
        return Err(SqliteError::Override(format!(
            "column {:?} is not in table {name:?}",
            o.column
        )));
    }

    for (column, note) in key_notes {
        if let Some(c) = columns.iter_mut().find(|c| c.name == column) {
            c.notes.push(note);
        }
    }
    let next_id = match &rowid_alias {
        Some(id) => {
            let max: Option<i64> = conn.query_row(
                &format!("SELECT max({}) FROM {}", quote(id), quote(name)),
                [],
                |r| r.get(0),
            )?;
            let sequence: Option<i64> = if autoincrement {
                conn.query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?
            } else {
                None
            };
            Some(max.unwrap_or(0).max(sequence.unwrap_or(0)) + 1)
        }
        None => None,
    };
    let bad_values = bad_values(conn, name, &primary_key, &columns)?;
    let mut checks = Vec::new();
    for check in check_expressions(sql) {
        let lower = check.to_ascii_lowercase();
        let boolean_range = columns
            .iter()
            .any(|c| c.pg_type == "boolean" && lower.contains(&c.name.to_ascii_lowercase()))
            && (lower.replace(' ', "").contains("in(0,1)")
                || lower.replace(' ', "").contains("in(1,0)"));
        if lower.contains("typeof(") || lower.contains("json_valid(") || boolean_range {
            if let Some(c) = columns
                .iter_mut()
                .find(|c| lower.contains(&c.name.to_ascii_lowercase()))
            {
                c.notes
                    .push(format!("CHECK ({check}) is implied by the type"));
            }
        } else {
            checks.push(pg_expression(&check));
        }
    }
    Ok(Table {
        name: name.to_string(),
        columns,
        primary_key,
        rowid_alias,
        autoincrement,
        without_rowid,
        next_id,
        bad_values,
        indexes: indexes(conn, name)?,
        foreign_keys: foreign_keys(conn, name)?,
        checks,
        sql: sql.to_string(),
    })
}

fn indexes(conn: &Connection, table: &str) -> Result<Vec<Index>, SqliteError> {
    let mut list = Vec::new();
    {
        let mut stmt = conn.prepare(&format!("PRAGMA index_list({})", quote(table)))?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? != 0,
                r.get::<_, String>(3)?,
            ))
        })?;
        for row in rows {
            list.push(row?);
        }
    }
    let mut out = Vec::new();
    for (name, unique, origin) in list {
        if origin == "pk" {
            continue;
        }
        let mut columns = Vec::new();
        let mut stmt = conn.prepare(&format!("PRAGMA index_xinfo({})", quote(&name)))?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)? != 0,
                r.get::<_, i64>(5)? != 0,
            ))
        })?;
        for row in rows {
            let (cid, column, desc, key) = row?;
            if key {
                columns.push((if cid == -2 { None } else { column }, desc));
            }
        }
        let sql: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1",
                [&name],
                |r| r.get(0),
            )
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        let partial = sql.as_deref().and_then(|sql| {
            let upper = sql.to_ascii_uppercase();
            upper
                .rfind(" WHERE ")
                .map(|at| pg_expression(sql[at + 7..].trim()))
        });
        out.push(Index {
            name,
            unique,
            constraint: origin == "u",
            columns,
            partial,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn foreign_keys(conn: &Connection, table: &str) -> Result<Vec<ForeignKey>, SqliteError> {
    let mut by_id: Vec<(i64, ForeignKey)> = Vec::new();
    let mut stmt = conn.prepare(&format!("PRAGMA foreign_key_list({})", quote(table)))?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    for row in rows {
        let (id, parent, from, to, on_update, on_delete) = row?;
        let position = match by_id.iter().position(|(i, _)| *i == id) {
            Some(p) => p,
            None => {
                by_id.push((
                    id,
                    ForeignKey {
                        columns: Vec::new(),
                        references: parent,
                        referenced: Vec::new(),
                        on_update,
                        on_delete,
                    },
                ));
                by_id.len() - 1
            }
        };
        let fk = &mut by_id[position].1;
        fk.columns.push(from);
        fk.referenced.extend(to);
    }
    // `REFERENCES parent` without columns means the parent's primary key.
    for (_, fk) in &mut by_id {
        if fk.referenced.is_empty() {
            let mut stmt =
                conn.prepare(&format!("PRAGMA table_info({})", quote(&fk.references)))?;
            let mut keys: Vec<(i64, String)> = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(5)?, r.get::<_, String>(1)?)))?
                .collect::<Result<_, _>>()?;
            keys.retain(|(pk, _)| *pk > 0);
            keys.sort();
            fk.referenced = keys.into_iter().map(|(_, n)| n).collect();
        }
    }
    by_id.sort_by_key(|(id, _)| *id);
    Ok(by_id.into_iter().map(|(_, fk)| fk).collect())
}

/// The expressions of the CHECK constraints in a CREATE TABLE statement,
/// column and table ones alike, as written.
fn check_expressions(sql: &str) -> Vec<String> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if b == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if matches!(b, b'\'' | b'"' | b'`') {
            quote = Some(b);
            i += 1;
            continue;
        }
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && sql.len() >= i + 5 && sql[i..i + 5].eq_ignore_ascii_case("check") {
            let mut j = i + 5;
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            if j < bytes.len() && bytes[j] == b'(' {
                if let Some(end) = closing_paren(sql, j) {
                    out.push(sql[j + 1..end].trim().to_string());
                    i = end + 1;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

/// A SQLite expression with its identifiers quoted PostgreSQL's way:
/// `` `name` `` and `[name]` become `"name"`; string literals are kept.
fn pg_expression(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                for d in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '`' | '[' => {
                let close = if c == '`' { '`' } else { ']' };
                let name: String = chars.by_ref().take_while(|d| *d != close).collect();
                out.push_str(&quote(&name));
            }
            _ => out.push(c),
        }
    }
    out
}

/// The index of the parenthesis closing the one at `open`, skipping quotes.
fn closing_paren(sql: &str, open: usize) -> Option<usize> {
    let mut depth = 0;
    let mut quote: Option<u8> = None;
    for (i, b) in sql.bytes().enumerate().skip(open) {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'\'' | b'"' | b'`' => quote = Some(b),
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            },
        }
    }
    None
}

/// An override's type in the spelling the converter works with, or None
/// for a type it does not convert to.
fn normal_type(given: &str) -> Option<String> {
    let t = given.trim().to_ascii_lowercase();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(
        match t.as_str() {
            "smallint" | "int2" => "smallint",
            "integer" | "int" | "int4" => "integer",
            "bigint" | "int8" => "bigint",
            "boolean" | "bool" => "boolean",
            "numeric" | "decimal" => "numeric",
            "double precision" | "float8" | "float" => "double precision",
            "text" => "text",
            "date" => "date",
            "timestamptz" | "timestamp with time zone" => "timestamptz",
            "jsonb" => "jsonb",
            "json" => "json",
            "uuid" => "uuid",
            "bytea" => "bytea",
            other => {
                let (name, rest) = other.split_once('(')?;
                let n: u32 = rest.strip_suffix(')')?.trim().parse().ok()?;
                return match name.trim() {
                    "varchar" | "character varying" if n > 0 => Some(format!("varchar({n})")),
                    _ => None,
                };
            }
        }
        .to_string(),
    )
}

/// The type family of a declaration, by SQLite's affinity rules with the
/// names apps write on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Integer,
    Boolean,
    DateTime,
    Date,
    Float,
    Numeric,
    Json,
    Uuid,
    Text,
    Blob,
    /// No declaration: the data decides.
    Untyped,
}

fn family(declared: &str) -> Family {
    let d = declared.to_ascii_uppercase();
    if d.is_empty() {
        Family::Untyped
    } else if d.contains("BOOL") {
        Family::Boolean
    } else if d.contains("DATETIME") || d.contains("TIMESTAMP") {
        Family::DateTime
    } else if d == "DATE" {
        Family::Date
    } else if d.contains("INT") || d.contains("SERIAL") {
        Family::Integer
    } else if d.contains("JSON") {
        Family::Json
    } else if d.contains("UUID") {
        Family::Uuid
    } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
        Family::Text
    } else if d.contains("BLOB") {
        Family::Blob
    } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
        Family::Float
    } else {
        Family::Numeric
    }
}

fn decide(
    info: &Info,
    profile: Profile,
    given: Option<&ColumnSetting>,
    rowid_alias: bool,
) -> Result<Column, SqliteError> {
    let mut notes = Vec::new();
    let p = &profile;
    let (pg_type, codec) = match family(&info.declared) {
        _ if rowid_alias => ("bigint".to_string(), Codec::Native),
        Family::Integer => ("bigint".to_string(), Codec::Native),
        Family::Boolean => {
            let codec = if p.text > 0 && p.text >= p.integer {
                Codec::BoolText
            } else {
                Codec::BoolInt
            };
            ("boolean".to_string(), codec)
        }
        Family::DateTime => (
            "timestamptz".to_string(),
            Codec::Time(time_codec(p, &mut notes)),
        ),
        Family::Date => ("date".to_string(), Codec::DateText),
        Family::Float => ("double precision".to_string(), Codec::Native),
        Family::Numeric => ("numeric".to_string(), Codec::Native),
        Family::Json => {
            if p.text == p.json_text {
                ("jsonb".to_string(), Codec::JsonText)
            } else {
                notes.push(format!(
                    "{} of {} values are not JSON: text",
                    p.text - p.json_text,
                    p.text
                ));
                ("text".to_string(), Codec::Native)
            }
        }
        Family::Uuid => {
            // Text in the 36-character form, or 16-byte blobs (a blob of
            // another length is reported when it is converted).
            if p.text == p.uuid_text && p.integer + p.real == 0 {
                ("uuid".to_string(), Codec::Native)
            } else {
                notes.push("values are not all UUID text: text".to_string());
                ("text".to_string(), Codec::Native)
            }
        }
        Family::Text => {
            if p.text > 0 && p.text == p.json_text && p.integer + p.real + p.blob == 0 {
                ("jsonb".to_string(), Codec::JsonText)
            } else {
                (text_type(&info.declared, p, &mut notes), Codec::Native)
            }
        }
        Family::Blob => ("bytea".to_string(), Codec::Native),
        Family::Untyped => {
            let non_null = p.non_null();
            let ty = if non_null == 0 || p.text > 0 {
                "text"
            } else if p.integer == non_null {
                "bigint"
            } else if p.integer + p.real == non_null {
                "double precision"
            } else if p.blob == non_null {
                "bytea"
            } else {
                "text"
            };
            if non_null == 0 {
                notes.push("no values to tell the type by: text".to_string());
            }
            (ty.to_string(), Codec::Native)
        }
    };
    let (pg_type, codec) = match given {
        Some(o) => {
            let pg_type = normal_type(&o.pg_type).ok_or_else(|| {
                SqliteError::Override(format!(
                    "{}.{}: type {:?} is not one convert writes; use smallint, integer, bigint, boolean, numeric, double precision, text, varchar(n), date, timestamptz, jsonb, json, uuid or bytea",
                    o.table, o.column, o.pg_type
                ))
            })?;
            let codec = match &o.storage {
                Some(s) => Codec::parse(s).ok_or_else(|| {
                    SqliteError::Override(format!(
                        "{}.{}: unknown storage {s:?}; use native, unix_s, unix_ms, iso_text, bool_int, bool_text, date_text or json_text",
                        o.table, o.column
                    ))
                })?,
                None if pg_type == "timestamptz" => Codec::Time(time_codec(p, &mut notes)),
                None if pg_type == "boolean" => {
                    if p.text > 0 { Codec::BoolText } else { Codec::BoolInt }
                }
                None => codec,
            };
            notes.push("type set by schema.columns".to_string());
            (pg_type, codec)
        }
        None => (pg_type, codec),
    };
    let pg_default = info
        .default
        .as_deref()
        .map(|d| translate_default(d, &pg_type, codec));
    Ok(Column {
        name: info.name.clone(),
        declared: info.declared.clone(),
        not_null: info.not_null,
        default: info.default.clone(),
        profile,
        pg_type,
        codec,
        pg_default,
        notes,
    })
}

/// The codec new values of a date-time column are written in: the form
/// most of its values have (integers told apart by magnitude).
fn time_codec(p: &Profile, notes: &mut Vec<String>) -> TimeCodec {
    let millis = p.big_integers;
    let seconds = p.integer - p.big_integers;
    let text = p.datetime_text + p.date_text;
    let forms = [millis, seconds, text].iter().filter(|n| **n > 0).count();
    if forms > 1 {
        notes.push(format!(
            "mixed storage: {millis} epoch ms, {seconds} epoch s, {text} text; all are read"
        ));
    }
    if millis >= seconds && millis >= text && millis > 0 {
        TimeCodec::UnixMillis
    } else if seconds >= text && seconds > 0 {
        TimeCodec::UnixSeconds
    } else {
        TimeCodec::IsoText
    }
}

/// `varchar(n)` stays when no value is longer (SQLite never enforced n).
fn text_type(declared: &str, p: &Profile, notes: &mut Vec<String>) -> String {
    let d = declared.to_ascii_lowercase();
    let length = d
        .split_once('(')
        .and_then(|(_, rest)| rest.trim_end_matches(')').trim().parse::<u64>().ok());
    match length {
        Some(n) if d.contains("char") && p.max_chars <= n => format!("varchar({n})"),
        Some(n) => {
            notes.push(format!(
                "declared length {n}, longest value {}: text",
                p.max_chars
            ));
            "text".to_string()
        }
        None => "text".to_string(),
    }
}

/// The expression without the parentheses wrapping all of it
/// (`(datetime('now'))` → `datetime('now')`).
fn unwrap_parens(expression: &str) -> &str {
    let mut e = expression.trim();
    while e.starts_with('(') && e.ends_with(')') {
        let inner = &e[1..e.len() - 1];
        let mut depth = 0i32;
        let balanced = inner.chars().all(|c| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            depth >= 0
        });
        if !balanced || depth != 0 {
            break;
        }
        e = inner.trim();
    }
    e
}

/// SQLite's default expressions as PostgreSQL ones: the clock functions
/// by meaning, never quoted; booleans as booleans; literals as they are.
fn translate_default(default: &str, pg_type: &str, codec: Codec) -> String {
    let bare = unwrap_parens(default);
    let lower = bare.to_ascii_lowercase().replace(' ', "");
    // A text column keeps the text SQLite's clock functions write.
    let text = pg_type == "text" || pg_type.starts_with("varchar");
    match lower.as_str() {
        "current_timestamp" | "datetime('now')" | "datetime(\"now\")" if text => {
            return "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')".to_string()
        }
        "current_date" | "date('now')" if text => {
            return "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD')".to_string()
        }
        "current_timestamp" | "datetime('now')" | "datetime(\"now\")" => {
            return match codec {
                Codec::Time(TimeCodec::UnixSeconds) if pg_type != "timestamptz" => {
                    "floor(extract(epoch from now()))::bigint".to_string()
                }
                _ => "now()".to_string(),
            }
        }
        "strftime('%s','now')" | "unixepoch()" | "unixepoch('now')" => {
            return if pg_type == "timestamptz" {
                "now()".to_string()
            } else {
                "floor(extract(epoch from now()))::bigint".to_string()
            };
        }
        "current_date" | "date('now')" => return "CURRENT_DATE".to_string(),
        _ => {}
    }
    if pg_type == "boolean" {
        return match lower.trim_matches('\'') {
            "1" | "true" | "t" | "yes" => "true".to_string(),
            _ => "false".to_string(),
        };
    }
    // drizzle-kit writes `DEFAULT false` for integer booleans; SQLite
    // reads it as 0.
    if matches!(pg_type, "bigint" | "integer" | "smallint") {
        match lower.as_str() {
            "true" => return "1".to_string(),
            "false" => return "0".to_string(),
            _ => {}
        }
    }
    bare.to_string()
}

/// Values that do not fit their column's type, found by converting every
/// value as convert will (one scan of the table): text that is no number in
/// an integer column, anything but a boolean spelling in a boolean column,
/// text that is no date-time in a timestamp column, invalid UTF-8 or NUL in
/// text, JSON that does not parse. At most 100 per table.
fn bad_values(
    conn: &Connection,
    table: &str,
    key: &[String],
    columns: &[Column],
) -> Result<Vec<(String, String, String)>, SqliteError> {
    let key_at: Vec<usize> = key
        .iter()
        .filter_map(|k| columns.iter().position(|c| &c.name == k))
        .collect();
    let list: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT rowid, {} FROM {}",
            list.join(", "),
            quote(table)
        ))
        .or_else(|_| {
            conn.prepare(&format!(
                "SELECT NULL, {} FROM {}",
                list.join(", "),
                quote(table)
            ))
        })?;
    let mut rows = stmt.query([])?;
    let mut bad = Vec::new();
    while let Some(row) = rows.next()? {
        for (i, c) in columns.iter().enumerate() {
            let value = row.get_ref(i + 1)?;
            if c.fits(value) {
                continue;
            }
            let key = if key_at.is_empty() {
                format!(
                    "rowid {}",
                    row.get::<_, Option<i64>>(0)?.unwrap_or_default()
                )
            } else {
                let mut parts = Vec::new();
                for &k in &key_at {
                    parts.push(crate::value::raw(row.get_ref(k + 1)?));
                }
                parts.join(",")
            };
            bad.push((key, c.name.clone(), crate::value::raw(value)));
            if bad.len() >= 100 {
                return Ok(bad);
            }
        }
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sql: &str) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(sql).unwrap();
        conn
    }

    fn table<'a>(map: &'a SchemaMap, name: &str) -> &'a Table {
        map.tables.iter().find(|t| t.name == name).unwrap()
    }

    fn column<'a>(map: &'a SchemaMap, t: &str, c: &str) -> &'a Column {
        table(map, t).columns.iter().find(|x| x.name == c).unwrap()
    }

    #[test]
    fn rowid_aliases_restart_where_sqlite_would_continue() {
        let conn = file(
            "CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL);
             INSERT INTO users (email) VALUES ('a'), ('b'), ('c'), ('d'), ('e');
             DELETE FROM users WHERE id >= 4;
             CREATE TABLE emptied (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);
             INSERT INTO emptied (v) VALUES ('x'), ('y'), ('z');
             DELETE FROM emptied;
             CREATE TABLE never_used (id integer primary key autoincrement, v TEXT);
             CREATE TABLE plain (id INTEGER PRIMARY KEY, v TEXT);
             INSERT INTO plain (v) VALUES ('1'), ('2'), ('3');
             DELETE FROM plain WHERE id = 3;
             CREATE TABLE intpk (id INT PRIMARY KEY, v TEXT);
             CREATE TABLE pairs (a TEXT, b INTEGER, PRIMARY KEY (a, b)) WITHOUT ROWID;",
        );
        let map = SchemaMap::read(&conn, &[]).unwrap();
        // AUTOINCREMENT never reuses an id, even after the newest rows went.
        assert_eq!(table(&map, "users").next_id, Some(6));
        assert_eq!(table(&map, "emptied").next_id, Some(4));
        assert_eq!(table(&map, "never_used").next_id, Some(1));
        // Without it SQLite takes max(id) + 1.
        assert_eq!(table(&map, "plain").next_id, Some(3));
        assert_eq!(table(&map, "users").rowid_alias.as_deref(), Some("id"));
        assert_eq!(
            table(&map, "intpk").rowid_alias,
            None,
            "INT PRIMARY KEY is no alias"
        );
        let pairs = table(&map, "pairs");
        assert!(pairs.without_rowid);
        assert_eq!(pairs.rowid_alias, None);
        assert_eq!(pairs.primary_key, ["a", "b"]);
        let ddl = map.ddl();
        assert!(
            ddl.contains("\"id\" bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL"),
            "{ddl}"
        );
        assert!(
            ddl.contains("ALTER TABLE \"users\" ALTER COLUMN \"id\" RESTART WITH 6;"),
            "{ddl}"
        );
        assert!(
            ddl.contains("ADD CONSTRAINT \"pairs_pkey\" PRIMARY KEY (\"a\", \"b\")"),
            "{ddl}"
        );
    }

    #[test]
    fn date_times_keep_their_family_and_the_data_picks_the_codec() {
        let conn = file(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, at DATETIME, seen timestamp, day DATE, n INTEGER);
             INSERT INTO events (at, seen, day, n) VALUES
               (1700000000000, '2024-01-02T03:04:05Z', '2024-01-02', 1700000000000),
               (1700000001000, '2024-01-02 03:04:05', '2024-01-03', 1700000000),
               ('2024-01-02T03:04:05.123+02:00', '2024-01-02T03:04:05', '2024-01-04', 3),
               (1700000000, NULL, NULL, NULL);",
        );
        let map = SchemaMap::read(&conn, &[]).unwrap();
        let at = column(&map, "events", "at");
        assert_eq!(at.pg_type, "timestamptz");
        assert_eq!(at.codec, Codec::Time(TimeCodec::UnixMillis));
        assert!(
            at.notes
                .iter()
                .any(|n| n.contains("mixed storage: 2 epoch ms, 1 epoch s, 1 text")),
            "{:?}",
            at.notes
        );
        let seen = column(&map, "events", "seen");
        assert_eq!(
            (seen.pg_type.as_str(), seen.codec),
            ("timestamptz", Codec::Time(TimeCodec::IsoText))
        );
        let day = column(&map, "events", "day");
        assert_eq!((day.pg_type.as_str(), day.codec), ("date", Codec::DateText));
        // Declared INTEGER stays an integer, epoch-looking or not.
        assert_eq!(column(&map, "events", "n").pg_type, "bigint");
        assert!(table(&map, "events").bad_values.is_empty());
    }

    #[test]
    fn booleans_json_text_blobs_and_untyped_columns() {
        let conn = file(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a BOOLEAN, b boolean, c INTEGER, meta TEXT, notes TEXT,
                             code VARCHAR(3), short VARCHAR(10), doc JSON, raw BLOB, u UUID, anything, unset);
             INSERT INTO t VALUES
               (1, 0, 'true', 0, '{\"k\": [1, 2]}', '{not json', 'ABCD', 'ok', '[1]', x'00ff', '8c9e3b1a-0f2d-4c5e-9a7b-1d2e3f4a5b6c', 1, NULL),
               (2, 1, 'false', 1, '[\"x\"]', 'plain', 'AB', 'fine', '{}', x'01', '0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d', 2, NULL);",
        );
        let map = SchemaMap::read(&conn, &[]).unwrap();
        let ty = |c: &str| {
            let col = column(&map, "t", c);
            (col.pg_type.clone(), col.codec)
        };
        assert_eq!(ty("a"), ("boolean".to_string(), Codec::BoolInt));
        assert_eq!(ty("b"), ("boolean".to_string(), Codec::BoolText));
        assert_eq!(
            ty("c"),
            ("bigint".to_string(), Codec::Native),
            "0/1 in INTEGER stays integer"
        );
        assert_eq!(ty("meta"), ("jsonb".to_string(), Codec::JsonText));
        assert_eq!(ty("notes"), ("text".to_string(), Codec::Native));
        assert_eq!(
            ty("code"),
            ("text".to_string(), Codec::Native),
            "a value longer than 3"
        );
        assert_eq!(ty("short"), ("varchar(10)".to_string(), Codec::Native));
        assert_eq!(ty("doc"), ("jsonb".to_string(), Codec::JsonText));
        assert_eq!(ty("raw"), ("bytea".to_string(), Codec::Native));
        assert_eq!(ty("u"), ("uuid".to_string(), Codec::Native));
        assert_eq!(ty("anything"), ("bigint".to_string(), Codec::Native));
        assert_eq!(ty("unset"), ("text".to_string(), Codec::Native));
        let code = column(&map, "t", "code");
        assert_eq!(code.profile.max_chars, 4);
        assert!(map.ddl().contains("sqlite: VARCHAR(3); stored: text 2; codec: native; declared length 3, longest value 4: text"), "{}", map.ddl());
    }

    #[test]
    fn defaults_become_postgres_expressions_never_quoted_strings() {
        let conn = file(
            "CREATE TABLE d (id INTEGER PRIMARY KEY,
                             created DATETIME DEFAULT CURRENT_TIMESTAMP,
                             stamped DATETIME NOT NULL DEFAULT (datetime('now')),
                             epoch INTEGER DEFAULT (strftime('%s','now')),
                             day DATE DEFAULT CURRENT_DATE,
                             active BOOLEAN DEFAULT 1,
                             off BOOLEAN DEFAULT 'false',
                             label TEXT DEFAULT 'new',
                             n INTEGER DEFAULT 0);",
        );
        let map = SchemaMap::read(&conn, &[]).unwrap();
        let default = |c: &str| column(&map, "d", c).pg_default.clone().unwrap();
        assert_eq!(default("created"), "now()");
        assert_eq!(default("stamped"), "now()");
        assert_eq!(default("epoch"), "floor(extract(epoch from now()))::bigint");
        assert_eq!(default("day"), "CURRENT_DATE");
        assert_eq!(default("active"), "true");
        assert_eq!(default("off"), "false");
        assert_eq!(default("label"), "'new'");
        assert_eq!(default("n"), "0");
    }

    #[test]
    fn values_that_do_not_fit_are_reported_with_key_and_value() {
        let conn = file(
            "CREATE TABLE m (id INTEGER PRIMARY KEY, qty INTEGER, price DECIMAL(10,2), ok BOOLEAN, at DATETIME);
             INSERT INTO m VALUES (1, 3, 149.99, 1, '2024-01-01 00:00:00'),
                                  (2, 'abc', 'cheap', 'maybe', 'yesterday');",
        );
        let map = SchemaMap::read(&conn, &[]).unwrap();
        let mut bad = table(&map, "m").bad_values.clone();
        bad.sort();
        assert_eq!(
            bad,
            [
                ("2".to_string(), "at".to_string(), "yesterday".to_string()),
                ("2".to_string(), "ok".to_string(), "maybe".to_string()),
                ("2".to_string(), "price".to_string(), "cheap".to_string()),
                ("2".to_string(), "qty".to_string(), "abc".to_string()),
            ]
        );
        assert_eq!(column(&map, "m", "price").pg_type, "numeric");
    }

    #[test]
    fn indexes_uniques_and_foreign_keys_with_their_actions_carry_over() {
        let conn = file(
            "CREATE TABLE \"Users\" (id INTEGER PRIMARY KEY, email TEXT, org TEXT, deleted_at DATETIME, UNIQUE (org, email));
             CREATE TABLE posts (id INTEGER PRIMARY KEY,
                                 author INTEGER REFERENCES \"Users\" ON DELETE CASCADE,
                                 editor INTEGER REFERENCES \"Users\" (id) ON UPDATE CASCADE ON DELETE SET NULL,
                                 at DATETIME, title TEXT);
             CREATE INDEX posts_recent ON posts (at DESC, id);
             CREATE UNIQUE INDEX users_live_email ON \"Users\" (email) WHERE deleted_at IS NULL;
             CREATE INDEX posts_lower ON posts (lower(title));
             CREATE TABLE lines (o INTEGER, n INTEGER, PRIMARY KEY (o, n));
             CREATE TABLE notes (o INTEGER, n INTEGER, body TEXT, FOREIGN KEY (o, n) REFERENCES lines (o, n));",
        );
        let map = SchemaMap::read(&conn, &[]).unwrap();
        let posts = table(&map, "posts");
        assert_eq!(posts.foreign_keys.len(), 2);
        let ddl = map.ddl();
        for expected in [
            "CREATE INDEX \"posts_recent\" ON \"posts\" (\"at\" DESC, \"id\");",
            "CREATE UNIQUE INDEX \"users_live_email\" ON \"Users\" (\"email\") WHERE deleted_at IS NULL;",
            "ADD CONSTRAINT \"Users_org_email_key\" UNIQUE (\"org\", \"email\");",
            "-- index \"posts_lower\" on \"posts\" uses an expression; create it by hand",
            "FOREIGN KEY (\"author\") REFERENCES \"Users\" (\"id\") ON UPDATE NO ACTION ON DELETE CASCADE;",
            "FOREIGN KEY (\"editor\") REFERENCES \"Users\" (\"id\") ON UPDATE CASCADE ON DELETE SET NULL;",
            "FOREIGN KEY (\"o\", \"n\") REFERENCES \"lines\" (\"o\", \"n\")",
        ] {
            assert!(ddl.contains(expected), "{expected} not in:\n{ddl}");
        }
        // Indexes and keys come after every table (after the data).
        let last_table = ddl.rfind("CREATE TABLE").unwrap();
        assert!(ddl.find("CREATE INDEX").unwrap() > last_table);
        assert!(ddl.find("FOREIGN KEY").unwrap() > last_table);
    }

    /// The same app schema as a hand-written file, as drizzle-kit writes
    /// it (backticks) and as Prisma migrate writes it (quoted names,
    /// DATETIME holding epoch milliseconds): one map.
    #[test]
    fn three_ddl_styles_map_the_same_way() {
        let hand = "CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL UNIQUE,
                      is_admin BOOLEAN NOT NULL DEFAULT 0, created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP);";
        let drizzle = "CREATE TABLE `users` (`id` integer PRIMARY KEY AUTOINCREMENT NOT NULL, `email` text NOT NULL,
                         `is_admin` boolean DEFAULT false NOT NULL, `created_at` datetime DEFAULT CURRENT_TIMESTAMP NOT NULL);
                       CREATE UNIQUE INDEX `users_email_unique` ON `users` (`email`);";
        let prisma = "CREATE TABLE \"users\" (\"id\" INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, \"email\" TEXT NOT NULL,
                        \"is_admin\" BOOLEAN NOT NULL DEFAULT false, \"created_at\" DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP);
                      CREATE UNIQUE INDEX \"users_email_key\" ON \"users\"(\"email\");";
        let rows = "INSERT INTO users (email, is_admin, created_at) VALUES
                      ('a@x.io', 1, 1700000000000), ('b@x.io', 0, 1700000001000);
                    DELETE FROM users WHERE id = 2;";
        for (style, ddl) in [("hand", hand), ("drizzle", drizzle), ("prisma", prisma)] {
            let conn = file(&format!("{ddl} {rows}"));
            let map = SchemaMap::read(&conn, &[]).unwrap();
            let users = table(&map, "users");
            assert_eq!(users.rowid_alias.as_deref(), Some("id"), "{style}");
            assert_eq!(
                users.next_id,
                Some(3),
                "{style}: AUTOINCREMENT past the deleted row"
            );
            let types: Vec<(String, Codec, Option<String>)> = users
                .columns
                .iter()
                .map(|c| (c.pg_type.clone(), c.codec, c.pg_default.clone()))
                .collect();
            assert_eq!(
                types,
                vec![
                    ("bigint".to_string(), Codec::Native, None),
                    ("text".to_string(), Codec::Native, None),
                    (
                        "boolean".to_string(),
                        Codec::BoolInt,
                        Some("false".to_string())
                    ),
                    (
                        "timestamptz".to_string(),
                        Codec::Time(TimeCodec::UnixMillis),
                        Some("now()".to_string())
                    ),
                ],
                "{style}"
            );
            assert_eq!(users.indexes.len(), 1, "{style}");
            assert!(users.indexes[0].unique, "{style}");
            assert!(table(&map, "users").bad_values.is_empty(), "{style}");
        }
    }

    #[test]
    fn overrides_say_what_the_data_cannot_and_bad_ones_are_refused() {
        let conn = file(
            "CREATE TABLE analytics (id INTEGER PRIMARY KEY, \"timestamp\" INTEGER, flag INTEGER);
             INSERT INTO analytics VALUES (1, 1700000000000, 1), (2, 1700000001000, 0);",
        );
        let given = |column: &str, ty: &str, storage: Option<&str>| ColumnSetting {
            table: "analytics".to_string(),
            column: column.to_string(),
            pg_type: ty.to_string(),
            storage: storage.map(str::to_string),
        };
        let map = SchemaMap::read(
            &conn,
            &[
                given("timestamp", "timestamptz", Some("unix_ms")),
                given("flag", "boolean", None),
            ],
        )
        .unwrap();
        let ts = column(&map, "analytics", "timestamp");
        assert_eq!(
            (ts.pg_type.as_str(), ts.codec),
            ("timestamptz", Codec::Time(TimeCodec::UnixMillis))
        );
        let flag = column(&map, "analytics", "flag");
        assert_eq!(
            (flag.pg_type.as_str(), flag.codec),
            ("boolean", Codec::BoolInt)
        );
        assert!(
            map.ddl().contains("\"timestamp\" timestamptz"),
            "quoted: {}",
            map.ddl()
        );

        let err = SchemaMap::read(&conn, &[given("timestamp", "timestamptz", Some("unix_us"))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("analytics.timestamp: unknown storage \"unix_us\""),
            "{err}"
        );
        let err = SchemaMap::read(&conn, &[given("nope", "text", None)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("column \"nope\" is not in table \"analytics\""),
            "{err}"
        );
        let mut other = given("x", "text", None);
        other.table = "missing".to_string();
        let err = SchemaMap::read(&conn, &[other]).unwrap_err().to_string();
        assert!(
            err.contains("table \"missing\" is not in the SQLite file"),
            "{err}"
        );
    }
}
