//! The offline conversion of a SQLite file to an empty PostgreSQL database
//! (`cutover convert`), and the verify that proves it exact.
//!
//! Each table is copied in keyset chunks (rowid order, or primary-key order
//! for WITHOUT ROWID tables). A chunk is one PostgreSQL transaction: the
//! rows through `COPY` and the chunk's last key in
//! `cutover.convert_progress`. A crash therefore leaves every table copied
//! up to a recorded key and nothing past it, and the next run continues
//! from there. The file is read with its values converted through the
//! schema map; a value that does not fit stops the run and is named (table,
//! key, column, value), never altered.
//!
//! The file must not be written while convert runs: the offline path is for
//! a maintenance window or a dry run. Verify at the end reads both sides
//! again, so a write that slipped in shows up as a difference.

use crate::canonical::canonical;
use crate::schema_map::{quote, Column, SchemaMap, Table};
use futures_util::{SinkExt, StreamExt};
use rusqlite::types::Value;
use rusqlite::Connection;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use tokio::sync::mpsc;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(String),
    #[error("{0}")]
    Refused(String),
    #[error("values that do not fit their column (nothing was converted):\n{}", .0.join("\n"))]
    BadValues(Vec<String>),
}

impl From<tokio_postgres::Error> for ConvertError {
    fn from(e: tokio_postgres::Error) -> Self {
        ConvertError::Postgres(postgres_message(&e))
    }
}

/// PostgreSQL's own message (with its detail) rather than "db error".
pub fn postgres_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({}): {detail}", db.message(), db.code().code()),
            None => format!("{} ({})", db.message(), db.code().code()),
        },
        None => e.to_string(),
    }
}

/// What convert tells its caller as it goes (the CLI draws a bar).
#[derive(Debug, Clone)]
pub enum Event {
    /// The copy starts (or resumes) with `done` of `total` rows in.
    Started { total: u64, done: u64 },
    /// `rows` more rows of `table` committed.
    Rows { table: String, rows: u64 },
    /// A table is copied whole.
    TableDone { table: String, rows: u64 },
    /// A step after the copy.
    Step(String),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Rows per chunk, each one PostgreSQL transaction.
    pub chunk_rows: u32,
    /// A ceiling on rows per second across all tables.
    pub throttle: Throttle,
}

/// Paces the copy to at most `rate` rows per second over all tables
/// (`mirror.copy_max_rows_per_second`; 0 or none: as fast as it goes).
#[derive(Debug, Clone)]
pub struct Throttle {
    rate: u64,
    started: std::time::Instant,
    rows: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Throttle {
    pub fn new(rows_per_second: u64) -> Throttle {
        Throttle {
            rate: rows_per_second,
            started: std::time::Instant::now(),
            rows: Default::default(),
        }
    }

    /// Counts `rows` copied and waits until the rate allows them.
    pub async fn pace(&self, rows: u64) {
        if self.rate == 0 {
            return;
        }
        let total = self
            .rows
            .fetch_add(rows, std::sync::atomic::Ordering::Relaxed)
            + rows;
        let due = std::time::Duration::from_secs_f64(total as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What one table's verify found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCheck {
    pub table: String,
    pub sqlite_rows: u64,
    pub postgres_rows: u64,
    pub sqlite_hash: u64,
    pub postgres_hash: u64,
    /// Up to [`MAX_REPORTED`] differences, each naming the key and values.
    pub differences: Vec<String>,
}

impl TableCheck {
    pub fn clean(&self) -> bool {
        self.differences.is_empty()
            && self.sqlite_rows == self.postgres_rows
            && self.sqlite_hash == self.postgres_hash
    }
}

/// Differences listed per table before the rest is only counted.
pub const MAX_REPORTED: usize = 20;

/// What a convert did: each table's verify, and what was converted with a
/// caveat (a foreign key its rows break).
#[derive(Debug, Clone)]
pub struct Converted {
    pub checks: Vec<TableCheck>,
    pub warnings: Vec<String>,
}

/// Converts the file at `path`, described by `map`, into PostgreSQL over
/// `pgs` (control sessions with canonical settings; tables are copied on
/// all of them at once), and verifies the result.
pub async fn convert(
    path: &Path,
    map: &SchemaMap,
    pgs: &[Client],
    options: &Options,
    events: &(dyn Fn(Event) + Sync),
) -> Result<Converted, ConvertError> {
    let pg = pgs.first().ok_or_else(|| {
        ConvertError::Refused("convert needs a connection to PostgreSQL".to_string())
    })?;
    let bad: Vec<String> = map
        .tables
        .iter()
        .flat_map(|t| {
            t.bad_values.iter().map(move |(key, column, value)| {
                format!(
                    "  {}: key {key}, column {}: {value:?}",
                    quote(&t.name),
                    quote(column)
                )
            })
        })
        .collect();
    if !bad.is_empty() {
        return Err(ConvertError::BadValues(bad));
    }
    let locked: bool = pg
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('cutover.convert'))",
            &[],
        )
        .await?
        .get(0);
    if !locked {
        return Err(ConvertError::Refused(
            "another cutover convert is running against this database".to_string(),
        ));
    }
    // The tables' DDL identifies an earlier convert of the same file. What
    // changes as the file is written is left out: the comments (counts of
    // stored values) and the statements after the data (identity restarts
    // past the current largest id).
    let ddl = map
        .table_ddl()
        .iter()
        .map(|t| {
            t.lines()
                .map(|l| l.split("  -- ").next().unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join(";\n");
    let post_data_done = prepare(pg, map, &ddl, path).await?;
    let mut warnings = Vec::new();
    // A chunk's rows and its progress commit together, so a crash of
    // PostgreSQL that loses the last commits loses both and the next run
    // copies those chunks again: waiting for each flush buys nothing.
    for c in pgs {
        c.batch_execute("SET synchronous_commit = off").await?;
    }
    let done: i64 = pg
        .query_one(
            "SELECT coalesce(sum(rows), 0)::bigint FROM cutover.convert_progress",
            &[],
        )
        .await?
        .get(0);
    events(Event::Started {
        total: map.tables.iter().map(Table::rows).sum(),
        done: done as u64,
    });
    each_table(pgs, map, |pg, table| {
        copy_table(path, table, pg, options, events)
    })
    .await?;
    if !post_data_done {
        events(Event::Step(
            "primary keys, indexes, constraints and foreign keys".to_string(),
        ));
        for c in pgs {
            c.batch_execute("SET maintenance_work_mem = '256MB'")
                .await?;
        }
        warnings = post_data(pgs, map).await?;
        pg.batch_execute("UPDATE cutover.convert SET post_data_done = true")
            .await?;
    }
    events(Event::Step("ANALYZE".to_string()));
    each_table(pgs, map, |pg, t| async move {
        Ok(pg
            .batch_execute(&format!("ANALYZE {}", quote(&t.name)))
            .await?)
    })
    .await?;
    // Under capture the file keeps changing while it is copied: compare
    // once the change stream has applied the log, not now.
    let live = crate::capture::installed(&open(path)?)
        .map_err(|e| ConvertError::Refused(e.to_string()))?;
    if live {
        warnings.push(
            "change capture is installed: the copy read each table from its own snapshot and the change stream brings it up to date; verify after the stream has applied the log".to_string(),
        );
        return Ok(Converted {
            checks: Vec::new(),
            warnings,
        });
    }
    events(Event::Step("verify".to_string()));
    let checks = verify(path, map, pgs).await?;
    Ok(Converted { checks, warnings })
}

/// Runs `work` for every table, the largest first, each taken by the next
/// free connection of `pgs`; the results in the map's table order.
async fn each_table<'a, T, F, Fut>(
    pgs: &'a [Client],
    map: &'a SchemaMap,
    work: F,
) -> Result<Vec<T>, ConvertError>
where
    F: Fn(&'a Client, &'a Table) -> Fut,
    Fut: std::future::Future<Output = Result<T, ConvertError>>,
{
    let mut order: Vec<(usize, &Table)> = map.tables.iter().enumerate().collect();
    order.sort_by_key(|(_, t)| std::cmp::Reverse(t.rows()));
    let queue = std::sync::Mutex::new(order.into_iter());
    let next = || queue.lock().ok().and_then(|mut q| q.next());
    let workers = pgs.iter().map(|pg| {
        let (next, work) = (&next, &work);
        async move {
            let mut done = Vec::new();
            while let Some((i, table)) = next() {
                done.push((i, work(pg, table).await?));
            }
            Ok::<_, ConvertError>(done)
        }
    });
    let mut all: Vec<(usize, T)> = futures_util::future::try_join_all(workers)
        .await?
        .into_iter()
        .flatten()
        .collect();
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

/// Keys, indexes and constraints, then the foreign keys, tables spread
/// over the connections. Each statement commits with its record in
/// `cutover.convert_post_data`, so a resumed run skips what is done. A
/// foreign key that rows of the file break is made NOT VALID (enforced for
/// new rows, the old ones kept as they are) and named in a warning with the
/// count, rather than failing the convert or dropping rows.
async fn post_data(pgs: &[Client], map: &SchemaMap) -> Result<Vec<String>, ConvertError> {
    let done: std::collections::HashSet<String> = pgs[0]
        .query("SELECT statement FROM cutover.convert_post_data", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let done = &done;
    each_table(pgs, map, |pg, table| async move {
        for statement in table.keys_and_indexes() {
            if !done.contains(&statement) {
                recorded(pg, &statement, &statement).await?;
            }
        }
        Ok(())
    })
    .await?;
    let foreign_keys = map.foreign_keys();
    let foreign_keys = &foreign_keys;
    let warnings = each_table(pgs, map, |pg, table| async move {
        let mut warnings = Vec::new();
        for fk in foreign_keys.iter().filter(|fk| fk.table == table.name) {
            if done.contains(&fk.ddl) {
                continue;
            }
            pg.batch_execute("BEGIN").await?;
            if let Err(e) = pg.batch_execute(&fk.ddl).await {
                let _ = pg.batch_execute("ROLLBACK").await;
                if e.code() != Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
                    return Err(failed(&fk.ddl, &e));
                }
                let orphans: i64 = pg.query_one(&fk.orphans, &[]).await?.get(0);
                recorded(pg, &format!("{} NOT VALID", fk.ddl), &fk.ddl).await?;
                warnings.push(format!(
                    "{}: {orphans} rows reference rows that do not exist (SQLite did not check); \
                     it is created NOT VALID, enforced for new rows; fix those rows, then VALIDATE CONSTRAINT",
                    fk.describe
                ));
                continue;
            }
            record(pg, &fk.ddl).await?;
        }
        Ok(warnings)
    })
    .await?;
    Ok(warnings.into_iter().flatten().collect())
}

fn failed(statement: &str, e: &tokio_postgres::Error) -> ConvertError {
    ConvertError::Postgres(format!("{statement}: {}", postgres_message(e)))
}

/// Runs `statement` in a transaction that also records `done_as` as done.
async fn recorded(pg: &Client, statement: &str, done_as: &str) -> Result<(), ConvertError> {
    pg.batch_execute("BEGIN").await?;
    if let Err(e) = pg.batch_execute(statement).await {
        let _ = pg.batch_execute("ROLLBACK").await;
        return Err(failed(statement, &e));
    }
    record(pg, done_as).await
}

/// Records `statement` as done and commits the open transaction.
async fn record(pg: &Client, statement: &str) -> Result<(), ConvertError> {
    let written = async {
        pg.execute(
            "INSERT INTO cutover.convert_post_data (statement) VALUES ($1)",
            &[&statement],
        )
        .await?;
        pg.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = written {
        let _ = pg.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    Ok(())
}

/// Creates cutover's bookkeeping and the tables, or checks that an earlier
/// run converted this same schema. Returns whether the post-data step ran.
async fn prepare(
    pg: &Client,
    map: &SchemaMap,
    ddl: &str,
    path: &Path,
) -> Result<bool, ConvertError> {
    pg.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS cutover;
         CREATE TABLE IF NOT EXISTS cutover.convert (
             one boolean PRIMARY KEY DEFAULT true CHECK (one),
             source text NOT NULL, ddl text NOT NULL, post_data_done boolean NOT NULL DEFAULT false);
         CREATE TABLE IF NOT EXISTS cutover.convert_post_data (statement text NOT NULL);
         CREATE TABLE IF NOT EXISTS cutover.convert_progress (
             table_name text PRIMARY KEY, cursor text, rows bigint NOT NULL DEFAULT 0,
             done boolean NOT NULL DEFAULT false);
         ALTER TABLE cutover.convert_progress ADD COLUMN IF NOT EXISTS log_position bigint",
    )
    .await?;
    if let Some(row) = pg
        .query_opt(
            "SELECT ddl, post_data_done, source FROM cutover.convert",
            &[],
        )
        .await?
    {
        let (earlier, done, source): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
        if earlier != ddl {
            return Err(ConvertError::Refused(format!(
                "this database holds an earlier convert of {source} whose schema differs from this file's; \
                 convert into an empty database, or drop the converted tables and the cutover schema"
            )));
        }
        return Ok(done);
    }
    let names: Vec<String> = map.tables.iter().map(|t| t.name.clone()).collect();
    let existing = pg
        .query(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = current_schema() AND c.relname = ANY($1) ORDER BY 1",
            &[&names],
        )
        .await?;
    if !existing.is_empty() {
        let list: Vec<String> = existing
            .iter()
            .map(|r| quote(&r.get::<_, String>(0)))
            .collect();
        return Err(ConvertError::Refused(format!(
            "the new database is not empty: {} already exist; convert needs an empty database",
            list.join(", ")
        )));
    }
    pg.batch_execute("BEGIN").await?;
    for statement in map.table_ddl() {
        if let Err(e) = pg.batch_execute(&statement).await {
            let _ = pg.batch_execute("ROLLBACK").await;
            return Err(ConvertError::Postgres(format!(
                "{statement}: {}",
                postgres_message(&e)
            )));
        }
    }
    pg.execute(
        "INSERT INTO cutover.convert (source, ddl) VALUES ($1, $2)",
        &[&path.display().to_string(), &ddl],
    )
    .await?;
    pg.execute(
        "INSERT INTO cutover.convert_progress (table_name) SELECT unnest($1::text[])",
        &[&names],
    )
    .await?;
    pg.batch_execute("COMMIT").await?;
    Ok(false)
}

/// One chunk read from the file: COPY text rows and the key after which
/// the next chunk starts.
struct Chunk {
    data: Vec<u8>,
    rows: u64,
    cursor: String,
    /// On a table's first chunk, when capture is installed: the change
    /// log's position in the snapshot the table is read from.
    log_position: Option<i64>,
}

async fn copy_table(
    path: &Path,
    table: &Table,
    pg: &Client,
    options: &Options,
    events: &(dyn Fn(Event) + Sync),
) -> Result<(), ConvertError> {
    let row = pg
        .query_one(
            "SELECT cursor, rows, done, log_position FROM cutover.convert_progress WHERE table_name = $1",
            &[&table.name],
        )
        .await?;
    let (mut cursor, mut copied, done, position): (Option<String>, i64, bool, Option<i64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if done {
        return Ok(());
    }
    // Under capture a table is read from one snapshot whose log position
    // the stream starts after; a table left half copied from an older
    // snapshot is copied again whole, so no row is older than its position.
    if cursor.is_some() && position.is_some() {
        pg.batch_execute("BEGIN").await?;
        let restarted = async {
            pg.batch_execute(&format!("TRUNCATE {}", quote(&table.name)))
                .await?;
            pg.execute(
                "UPDATE cutover.convert_progress SET cursor = NULL, rows = 0, log_position = NULL \
                 WHERE table_name = $1",
                &[&table.name],
            )
            .await?;
            pg.batch_execute("COMMIT").await
        }
        .await;
        if let Err(e) = restarted {
            let _ = pg.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
        cursor = None;
        copied = 0;
    }
    let (tx, mut rx) = mpsc::channel::<Result<Chunk, ConvertError>>(2);
    let reader = {
        let (path, table, rows) = (path.to_path_buf(), table.clone(), options.chunk_rows);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = read_chunks(&path, &table, cursor, rows, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        })
    };
    let columns: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let copy = format!(
        "COPY {} ({}) FROM STDIN",
        quote(&table.name),
        columns.join(", ")
    );
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        pg.batch_execute("BEGIN").await?;
        let written = async {
            let sink = pg.copy_in::<_, bytes::Bytes>(&copy).await?;
            futures_util::pin_mut!(sink);
            sink.send(bytes::Bytes::from(chunk.data)).await?;
            sink.finish().await?;
            pg.execute(
                "UPDATE cutover.convert_progress SET cursor = $1, rows = rows + $2, \
                 log_position = coalesce($4, log_position) WHERE table_name = $3",
                &[
                    &chunk.cursor,
                    &(chunk.rows as i64),
                    &table.name,
                    &chunk.log_position,
                ],
            )
            .await?;
            pg.batch_execute("COMMIT").await
        }
        .await;
        if let Err(e) = written {
            let _ = pg.batch_execute("ROLLBACK").await;
            return Err(ConvertError::Postgres(format!(
                "copying {}: {}",
                quote(&table.name),
                postgres_message(&e)
            )));
        }
        copied += chunk.rows as i64;
        events(Event::Rows {
            table: table.name.clone(),
            rows: chunk.rows,
        });
        options.throttle.pace(chunk.rows).await;
    }
    reader
        .await
        .map_err(|e| ConvertError::Refused(format!("the reader of {} stopped: {e}", table.name)))?;
    pg.execute(
        "UPDATE cutover.convert_progress SET done = true WHERE table_name = $1",
        &[&table.name],
    )
    .await?;
    events(Event::TableDone {
        table: table.name.clone(),
        rows: copied as u64,
    });
    Ok(())
}

fn open(path: &Path) -> Result<Connection, ConvertError> {
    Ok(crate::open_read_only(path)?)
}

/// How a table is walked in order: by rowid, or by the primary key of a
/// WITHOUT ROWID table.
fn order_columns(table: &Table) -> Vec<String> {
    if table.without_rowid {
        table.primary_key.iter().map(|k| quote(k)).collect()
    } else {
        vec!["rowid".to_string()]
    }
}

fn read_chunks(
    path: &Path,
    table: &Table,
    mut cursor: Option<String>,
    chunk_rows: u32,
    tx: &mpsc::Sender<Result<Chunk, ConvertError>>,
) -> Result<(), ConvertError> {
    let conn = open(path)?;
    let order = order_columns(table);
    let columns: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let select = format!(
        "SELECT {}, {} FROM {}",
        order.join(", "),
        columns.join(", "),
        quote(&table.name)
    );
    let placeholders: Vec<String> = (1..=order.len()).map(|i| format!("?{i}")).collect();
    let first = format!("{select} ORDER BY {} LIMIT {chunk_rows}", order.join(", "));
    let next = format!(
        "{select} WHERE ({}) > ({}) ORDER BY {} LIMIT {chunk_rows}",
        order.join(", "),
        placeholders.join(", "),
        order.join(", ")
    );
    let keys = order.len();
    // One read transaction for the whole table: one snapshot, and under
    // capture the log position that snapshot is at.
    conn.execute_batch("BEGIN")?;
    let mut log_position =
        if crate::capture::installed(&conn).map_err(|e| ConvertError::Refused(e.to_string()))? {
            Some(conn.query_row(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0)",
                [crate::capture::LOG_TABLE],
                |r| r.get::<_, i64>(0),
            )?)
        } else {
            None
        };
    loop {
        let after: Vec<Value> = match &cursor {
            None => Vec::new(),
            Some(text) => decode_cursor(text)?,
        };
        let mut stmt = conn.prepare_cached(if after.is_empty() { &first } else { &next })?;
        let mut rows = stmt.query(rusqlite::params_from_iter(after.iter()))?;
        let mut chunk = Chunk {
            data: Vec::with_capacity(chunk_rows as usize * 64),
            rows: 0,
            cursor: cursor.clone().unwrap_or_default(),
            log_position: log_position.take(),
        };
        let mut last: Vec<Value> = Vec::new();
        while let Some(row) = rows.next()? {
            for (i, c) in table.columns.iter().enumerate() {
                if i > 0 {
                    chunk.data.push(b'\t');
                }
                let value = row.get_ref(keys + i)?;
                match c.to_pg_text(value) {
                    Ok(None) => chunk.data.extend_from_slice(b"\\N"),
                    Ok(Some(text)) => escape_copy(&text, &mut chunk.data),
                    Err(bad) => {
                        return Err(ConvertError::BadValues(vec![format!(
                            "  {}: key {}, column {}: {} does not fit {}",
                            quote(&table.name),
                            describe_key(table, row, keys)?,
                            quote(&c.name),
                            bad.stored,
                            bad.pg_type
                        )]))
                    }
                }
            }
            chunk.data.push(b'\n');
            chunk.rows += 1;
            last = (0..keys)
                .map(|i| row.get::<_, Value>(i))
                .collect::<Result<_, _>>()?;
        }
        if chunk.rows == 0 {
            // An empty table (or end) still records its log position.
            if chunk.log_position.is_some() {
                let _ = tx.blocking_send(Ok(chunk));
            }
            return Ok(());
        }
        let full = chunk.rows == u64::from(chunk_rows);
        chunk.cursor = encode_cursor(&last);
        cursor = Some(chunk.cursor.clone());
        if tx.blocking_send(Ok(chunk)).is_err() || !full {
            return Ok(());
        }
    }
}

/// The row's key as `id=7` (or `rowid 7` for a table without one).
fn describe_key(
    table: &Table,
    row: &rusqlite::Row<'_>,
    keys: usize,
) -> Result<String, ConvertError> {
    if table.primary_key.is_empty() {
        return Ok(format!("rowid {}", crate::value::raw(row.get_ref(0)?)));
    }
    let mut parts = Vec::new();
    for k in &table.primary_key {
        let at = table.columns.iter().position(|c| &c.name == k).unwrap_or(0);
        parts.push(format!(
            "{}={}",
            k,
            crate::value::raw(row.get_ref(keys + at)?)
        ));
    }
    Ok(parts.join(", "))
}

/// The key values of a chunk's last row, kept as JSON with their storage
/// class so the next chunk binds them exactly.
fn encode_cursor(values: &[Value]) -> String {
    let list: Vec<serde_json::Value> = values
        .iter()
        .map(|v| match v {
            Value::Null => serde_json::Value::Null,
            Value::Integer(i) => serde_json::json!({ "i": i }),
            Value::Real(f) => serde_json::json!({ "r": f }),
            Value::Text(t) => serde_json::json!({ "t": t }),
            Value::Blob(b) => serde_json::json!({ "b": b }),
        })
        .collect();
    serde_json::Value::Array(list).to_string()
}

fn decode_cursor(text: &str) -> Result<Vec<Value>, ConvertError> {
    let broken = || {
        ConvertError::Refused(format!(
            "cutover.convert_progress holds a cursor cutover did not write: {text}"
        ))
    };
    let list: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|_| broken())?;
    list.into_iter()
        .map(|v| {
            Ok(match v {
                serde_json::Value::Null => Value::Null,
                serde_json::Value::Object(o) => {
                    if let Some(i) = o.get("i").and_then(|i| i.as_i64()) {
                        Value::Integer(i)
                    } else if let Some(f) = o.get("r").and_then(|f| f.as_f64()) {
                        Value::Real(f)
                    } else if let Some(t) = o.get("t").and_then(|t| t.as_str()) {
                        Value::Text(t.to_string())
                    } else if let Some(b) = o.get("b") {
                        Value::Blob(serde_json::from_value(b.clone()).map_err(|_| broken())?)
                    } else {
                        return Err(broken());
                    }
                }
                _ => return Err(broken()),
            })
        })
        .collect()
}

/// A value in COPY's text format: backslash, tab, newline and carriage
/// return escaped.
fn escape_copy(text: &str, out: &mut Vec<u8>) {
    for &b in text.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// One field of a COPY text row, unescaped (None for `\N`); borrowed
/// when it holds no escape.
fn unescape_copy(field: &[u8]) -> Option<Cow<'_, str>> {
    if field == b"\\N" {
        return None;
    }
    if !field.contains(&b'\\') {
        return Some(String::from_utf8_lossy(field));
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 1 < field.len() {
            i += 1;
            out.push(match field[i] {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'b' => 8,
                b'f' => 12,
                b'v' => 11,
                other => other,
            });
        } else {
            out.push(field[i]);
        }
        i += 1;
    }
    Some(Cow::Owned(String::from_utf8_lossy(&out).into_owned()))
}

/// A row's values (or its key's), as text; None for NULL.
type Values = Vec<Option<String>>;

/// A row in canonical values: the key's and every column's.
type CanonicalRow = (Values, Values);

/// The canonical form of a value, or the value marked so it differs from
/// every canonical one, with why it could not be read.
fn canonical_or_marked<'a>(
    column: &Column,
    text: &'a str,
    problem: &mut Option<String>,
) -> Cow<'a, str> {
    let value = canonical(&column.pg_type, text).unwrap_or_else(|e| {
        problem.get_or_insert_with(|| format!("column {}: {e}", quote(&column.name)));
        Cow::Owned(format!("\u{1}{text}"))
    });
    // A time the file stores as epoch seconds or milliseconds holds no
    // finer part: compare at that precision (PostgreSQL's `now()` written
    // back into the file keeps what the file can hold).
    let unit = match column.codec {
        crate::Codec::Time(crate::TimeCodec::UnixSeconds) => 1_000_000,
        crate::Codec::Time(crate::TimeCodec::UnixMillis) => 1_000,
        _ => return value,
    };
    match value.parse::<i64>() {
        Ok(micros) if column.pg_type.starts_with("timestamp") => {
            Cow::Owned(micros.div_euclid(unit).saturating_mul(unit).to_string())
        }
        _ => value,
    }
}

/// The hash of a row's canonical values (the same for a row whichever
/// side it was read from), and what could not be read.
fn digest<S: AsRef<str>>(table: &Table, values: &[Option<S>]) -> (u64, Option<String>) {
    let mut h = std::hash::DefaultHasher::new();
    let mut problem = None;
    for (c, v) in table.columns.iter().zip(values) {
        match v {
            None => h.write_u8(0),
            Some(text) => {
                h.write_u8(1);
                canonical_or_marked(c, text.as_ref(), &mut problem).hash(&mut h);
            }
        }
    }
    (h.finish(), problem)
}

/// The canonical row of `values` with its key, for the key-by-key compare.
fn canonical_row<S: AsRef<str>>(
    table: &Table,
    key_at: &[usize],
    values: &[Option<S>],
) -> CanonicalRow {
    let mut problem = None;
    let row: Vec<Option<String>> = table
        .columns
        .iter()
        .zip(values)
        .map(|(c, v)| {
            v.as_ref()
                .map(|text| canonical_or_marked(c, text.as_ref(), &mut problem).into_owned())
        })
        .collect();
    let key = key_at.iter().map(|&i| row[i].clone()).collect();
    (key, row)
}

/// Row counts and order-free content hashes of every table on both sides,
/// over canonical values; a table whose figures differ is compared key by
/// key to name the differing rows.
pub async fn verify(
    path: &Path,
    map: &SchemaMap,
    pgs: &[Client],
) -> Result<Vec<TableCheck>, ConvertError> {
    each_table(pgs, map, |pg, table| {
        let reader = Reader::File(path.to_path_buf());
        async move {
            let (check, _) = verify_table(reader, table, pg, KeyRange::default()).await?;
            Ok(check)
        }
    })
    .await
}

/// A slice of a table by its integer key, `after < key <= upto`, either
/// end open; the whole table when both are, or when the table has no
/// [`range_key`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub after: Option<i64>,
    pub upto: Option<i64>,
}

impl KeyRange {
    /// ` WHERE …` selecting the range on either side (both order integers
    /// alike), or nothing for the whole table.
    fn filter(&self, table: &Table) -> String {
        let Some(key) = range_key(table) else {
            return String::new();
        };
        let key = quote(key);
        match (self.after, self.upto) {
            (None, None) => String::new(),
            (Some(a), None) => format!(" WHERE {key} > {a}"),
            (None, Some(b)) => format!(" WHERE {key} <= {b}"),
            (Some(a), Some(b)) => format!(" WHERE {key} > {a} AND {key} <= {b}"),
        }
    }
}

/// The column a table is verified by in key ranges: its only key column,
/// of an integer type and declared with INTEGER affinity (so SQLite holds
/// every key as an integer and orders keys as PostgreSQL does). Other
/// tables are compared whole.
pub fn range_key(table: &Table) -> Option<&str> {
    let [key] = table.primary_key.as_slice() else {
        return None;
    };
    let column = table.columns.iter().find(|c| &c.name == key)?;
    let integer = matches!(column.pg_type.as_str(), "smallint" | "integer" | "bigint");
    (integer && column.declared.to_ascii_uppercase().contains("INT")).then_some(key.as_str())
}

/// The range of the next `rows` keys after `after` in the file read
/// through `conn`; open-ended when fewer remain (and for a table compared
/// whole).
pub fn next_range(
    conn: &Connection,
    table: &Table,
    after: Option<i64>,
    rows: usize,
) -> Result<KeyRange, ConvertError> {
    let Some(key) = range_key(table) else {
        return Ok(KeyRange::default());
    };
    let upto: Option<i64> = conn
        .query_row(
            &format!(
                "SELECT {k} FROM {t} WHERE {k} > ?1 ORDER BY {k} LIMIT 1 OFFSET ?2",
                k = quote(key),
                t = quote(&table.name)
            ),
            rusqlite::params![after.unwrap_or(i64::MIN), rows.max(1) as i64 - 1],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    Ok(KeyRange { after, upto })
}

/// One range of a table compared with the file read through `conn`: a
/// connection inside a read transaction, so the file is seen at one
/// snapshot (the live migration's verify holds the stream at that
/// snapshot's position). With `repair`, the rows found different are
/// written again from the snapshot — PostgreSQL's row of each differing
/// key deleted and the file's written, in one transaction with
/// `session_replication_role = replica` as the applier writes (the rows
/// carry their effects) — and the range compared again: the check after
/// repair, and the rows repaired.
pub async fn check_range_at(
    conn: std::sync::Arc<std::sync::Mutex<Connection>>,
    table: &Table,
    pg: &Client,
    range: KeyRange,
    repair: bool,
) -> Result<(TableCheck, u64), ConvertError> {
    let reader = Reader::Snapshot(conn);
    let (check, fixes) = verify_table(reader.clone(), table, pg, range).await?;
    if !repair || check.clean() {
        return Ok((check, 0));
    }
    let repaired = write_fixes(&reader, table, pg, range, fixes).await?;
    let (check, _) = verify_table(reader, table, pg, range).await?;
    Ok((check, repaired))
}

/// What repair writes: the differing rows by key (None where the file has
/// no row for the key), or, for a table without a key, the range whole.
enum Fixes {
    Rows(Vec<Fix>),
    Whole,
}

/// One differing key: its values as PostgreSQL input, and the file's row.
struct Fix {
    key: Vec<Option<String>>,
    row: Option<Vec<Option<String>>>,
}

/// Writes the file's rows over PostgreSQL's for `fixes`; the rows written
/// or deleted.
async fn write_fixes(
    reader: &Reader,
    table: &Table,
    pg: &Client,
    range: KeyRange,
    fixes: Fixes,
) -> Result<u64, ConvertError> {
    let (deletes, rows, repaired): (Vec<String>, Vec<Vec<Option<String>>>, u64) = match fixes {
        Fixes::Rows(fixes) => {
            let keys: Vec<String> = table.primary_key.iter().map(|k| quote(k)).collect();
            let deletes = fixes
                .chunks(1000)
                .map(|chunk| {
                    let tuples: Vec<String> = chunk
                        .iter()
                        .map(|f| {
                            let values: Vec<String> =
                                f.key.iter().map(|v| literal(v.as_deref())).collect();
                            format!("({})", values.join(", "))
                        })
                        .collect();
                    format!(
                        "DELETE FROM {} WHERE ({}) IN ({})",
                        quote(&table.name),
                        keys.join(", "),
                        tuples.join(", ")
                    )
                })
                .collect();
            let repaired = fixes.len() as u64;
            (
                deletes,
                fixes.into_iter().filter_map(|f| f.row).collect(),
                repaired,
            )
        }
        Fixes::Whole => {
            let (reader, t) = (reader.clone(), table.clone());
            let rows = tokio::task::spawn_blocking(move || {
                let mut rows = Vec::new();
                let problems =
                    sqlite_side(&reader, &t, range, &mut |values| rows.push(values.to_vec()))?;
                match problems.first() {
                    Some(p) => Err(ConvertError::BadValues(vec![p.clone()])),
                    None => Ok(rows),
                }
            })
            .await
            .map_err(|e| ConvertError::Refused(format!("repair stopped: {e}")))??;
            let repaired = rows.len() as u64;
            (
                vec![format!(
                    "DELETE FROM {}{}",
                    quote(&table.name),
                    range.filter(table)
                )],
                rows,
                repaired,
            )
        }
    };
    let mut data = Vec::new();
    for row in &rows {
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                data.push(b'\t');
            }
            match v {
                None => data.extend_from_slice(b"\\N"),
                Some(text) => escape_copy(text, &mut data),
            }
        }
        data.push(b'\n');
    }
    let columns: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let result = async {
        pg.batch_execute("BEGIN; SET LOCAL session_replication_role = replica")
            .await?;
        for delete in &deletes {
            pg.batch_execute(delete).await?;
        }
        let sink = pg
            .copy_in::<_, bytes::Bytes>(&format!(
                "COPY {} ({}) FROM STDIN",
                quote(&table.name),
                columns.join(", ")
            ))
            .await?;
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from(data)).await?;
        sink.finish().await?;
        pg.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = result {
        let _ = pg.batch_execute("ROLLBACK").await;
        return Err(ConvertError::Postgres(format!(
            "repairing {}: {}",
            quote(&table.name),
            postgres_message(&e)
        )));
    }
    Ok(repaired)
}

/// A SQL literal (or NULL) PostgreSQL coerces to the column's type.
fn literal(value: Option<&str>) -> String {
    match value {
        None => "NULL".to_string(),
        Some(v) => format!("'{}'", v.replace('\'', "''")),
    }
}

/// Where verify reads the file: a connection of its own per read, or one
/// held in a read transaction.
#[derive(Clone)]
enum Reader {
    File(std::path::PathBuf),
    Snapshot(std::sync::Arc<std::sync::Mutex<Connection>>),
}

impl Reader {
    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, ConvertError>,
    ) -> Result<T, ConvertError> {
        match self {
            Reader::File(path) => f(&open(path)?),
            Reader::Snapshot(conn) => f(&conn.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

/// Count, hash and problems of one side.
#[derive(Default)]
struct Side {
    rows: u64,
    hash: u64,
    problems: Vec<String>,
}

impl Side {
    fn add(&mut self, (hash, problem): (u64, Option<String>), side: &str) {
        self.rows += 1;
        self.hash = self.hash.wrapping_add(hash);
        if let Some(p) = problem.filter(|_| self.problems.len() < MAX_REPORTED) {
            self.problems.push(format!("{side}: {p}"));
        }
    }
}

/// Compares one range of a table: counts and hashes, then key by key when
/// they differ; the check, and what repair would write.
async fn verify_table(
    reader: Reader,
    table: &Table,
    pg: &Client,
    range: KeyRange,
) -> Result<(TableCheck, Fixes), ConvertError> {
    let key_at: Vec<usize> = table
        .primary_key
        .iter()
        .filter_map(|k| table.columns.iter().position(|c| &c.name == k))
        .collect();
    // Both sides at once: the file on a blocking thread, PostgreSQL here.
    let sqlite = {
        let (reader, table) = (reader.clone(), table.clone());
        tokio::task::spawn_blocking(move || {
            let mut side = Side::default();
            let bad = sqlite_side(&reader, &table, range, &mut |values| {
                side.add(digest(&table, values), "SQLite")
            })?;
            side.problems.extend(bad);
            Ok::<_, ConvertError>(side)
        })
    };
    let mut theirs = Side::default();
    let postgres = postgres_side(pg, table, range, |values| {
        theirs.add(digest(table, values), "PostgreSQL")
    });
    let (ours, postgres) = tokio::join!(sqlite, postgres);
    postgres?;
    let mut ours = ours.map_err(|e| ConvertError::Refused(format!("verify stopped: {e}")))??;
    ours.problems.truncate(MAX_REPORTED);
    ours.problems.extend(theirs.problems);
    let mut check = TableCheck {
        table: table.name.clone(),
        sqlite_rows: ours.rows,
        postgres_rows: theirs.rows,
        sqlite_hash: ours.hash,
        postgres_hash: theirs.hash,
        differences: ours.problems,
    };
    if check.clean() {
        return Ok((check, Fixes::Rows(Vec::new())));
    }
    if key_at.is_empty() {
        if check.differences.is_empty() {
            check.differences.push(format!(
                "the table has no key; {} rows in SQLite and {} in PostgreSQL, content hashes {:016x} and {:016x}",
                check.sqlite_rows, check.postgres_rows, check.sqlite_hash, check.postgres_hash
            ));
        }
        return Ok((check, Fixes::Whole));
    }
    let (differences, fixes) = drill_down(reader, table, &key_at, pg, range).await?;
    check.differences = differences;
    if check.differences.is_empty() {
        check
            .differences
            .push("the content hashes differ".to_string());
    }
    Ok((check, Fixes::Rows(fixes)))
}

/// Hands every row of the file to `each` as PostgreSQL input text through
/// the schema map; a value that does not convert is handed over as NULL
/// and named in the returned problems.
fn sqlite_side(
    reader: &Reader,
    table: &Table,
    range: KeyRange,
    each: &mut dyn FnMut(&[Option<String>]),
) -> Result<Vec<String>, ConvertError> {
    reader.with(|conn| sqlite_rows(conn, table, range, each))
}

fn sqlite_rows(
    conn: &Connection,
    table: &Table,
    range: KeyRange,
    each: &mut dyn FnMut(&[Option<String>]),
) -> Result<Vec<String>, ConvertError> {
    let columns: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let mut stmt = conn.prepare(&format!(
        "SELECT {} FROM {}{}",
        columns.join(", "),
        quote(&table.name),
        range.filter(table)
    ))?;
    let mut cursor = stmt.query([])?;
    let mut problems = Vec::new();
    let mut values = Vec::with_capacity(table.columns.len());
    while let Some(row) = cursor.next()? {
        values.clear();
        for (i, c) in table.columns.iter().enumerate() {
            match c.to_pg_text(row.get_ref(i)?) {
                Ok(v) => values.push(v),
                Err(bad) => {
                    if problems.len() < MAX_REPORTED {
                        problems.push(format!("SQLite: {bad}"));
                    }
                    values.push(None);
                }
            }
        }
        each(&values);
    }
    Ok(problems)
}

/// Streams the table's rows from PostgreSQL as text values.
async fn postgres_side(
    pg: &Client,
    table: &Table,
    range: KeyRange,
    mut each: impl FnMut(&[Option<Cow<'_, str>>]),
) -> Result<(), ConvertError> {
    let columns: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let stream = pg
        .copy_out(&format!(
            "COPY (SELECT {} FROM {}{}) TO STDOUT",
            columns.join(", "),
            quote(&table.name),
            range.filter(table)
        ))
        .await?;
    futures_util::pin_mut!(stream);
    let mut pending: Vec<u8> = Vec::new();
    while let Some(data) = stream.next().await {
        pending.extend_from_slice(&data?);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + end];
            let values: Vec<Option<Cow<'_, str>>> =
                line.split(|b| *b == b'\t').map(unescape_copy).collect();
            each(&values);
            start += end + 1;
        }
        pending.drain(..start);
    }
    Ok(())
}

/// Compares a keyed table's range row by row: PostgreSQL's rows by key,
/// then the file's against them. The differences said, and the fix of
/// each differing key (none when a value of the file does not convert:
/// repair would write it as NULL).
async fn drill_down(
    reader: Reader,
    table: &Table,
    key_at: &[usize],
    pg: &Client,
    range: KeyRange,
) -> Result<(Vec<String>, Vec<Fix>), ConvertError> {
    // Canonical key → (the key as PostgreSQL wrote it, canonical row).
    let mut theirs: HashMap<Values, (Values, Values)> = HashMap::new();
    postgres_side(pg, table, range, |values| {
        let (key, row) = canonical_row(table, key_at, values);
        let written = key_at
            .iter()
            .map(|&i| values[i].as_ref().map(|v| v.to_string()))
            .collect();
        theirs.insert(key, (written, row));
    })
    .await?;
    let table = table.clone();
    let key_at = key_at.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut fixes = Vec::new();
        let mut more = 0usize;
        let mut note = |line: String| {
            if out.len() < MAX_REPORTED {
                out.push(line);
            } else {
                more += 1;
            }
        };
        let show = |key: &[Option<String>]| {
            key.iter()
                .map(|v| v.clone().unwrap_or_else(|| "NULL".to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let problems = sqlite_side(&reader, &table, range, &mut |values| {
            let (key, row) = canonical_row(&table, &key_at, values);
            match theirs.remove(&key) {
                None => {
                    note(format!("key ({}): only in SQLite", show(&key)));
                    fixes.push(Fix {
                        key: key_at.iter().map(|&i| values[i].clone()).collect(),
                        row: Some(values.to_vec()),
                    });
                }
                Some((written, other)) => {
                    let mut differs = false;
                    for (c, (a, b)) in table.columns.iter().zip(row.iter().zip(other.iter())) {
                        if a != b {
                            differs = true;
                            note(format!(
                                "key ({}), column {}: SQLite {:?}, PostgreSQL {:?}",
                                show(&key),
                                quote(&c.name),
                                a,
                                b
                            ));
                        }
                    }
                    if differs {
                        fixes.push(Fix {
                            key: written,
                            row: Some(values.to_vec()),
                        });
                    }
                }
            }
        })?;
        let unreadable = !problems.is_empty();
        for p in problems {
            note(p);
        }
        for (key, (written, _)) in theirs {
            note(format!("key ({}): only in PostgreSQL", show(&key)));
            fixes.push(Fix {
                key: written,
                row: None,
            });
        }
        if unreadable {
            fixes.clear();
        }
        if more > 0 {
            out.push(format!("... and {more} more differences"));
        }
        Ok((out, fixes))
    })
    .await
    .map_err(|e| ConvertError::Refused(format!("verify stopped: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_round_trip() {
        for text in [
            "plain",
            "tab\there",
            "line\nbreak\r\n",
            "back\\slash \\N",
            "ünïcødé 🎉",
        ] {
            let mut out = Vec::new();
            escape_copy(text, &mut out);
            assert!(!out.contains(&b'\n') && !out.contains(&b'\t'));
            assert_eq!(unescape_copy(&out).as_deref(), Some(text));
        }
        assert_eq!(unescape_copy(b"\\N"), None);
    }

    #[test]
    fn cursors_keep_the_storage_class() {
        let values = vec![
            Value::Integer(-3),
            Value::Text("a\"b".to_string()),
            Value::Blob(vec![0, 255]),
            Value::Real(1.5),
        ];
        assert_eq!(decode_cursor(&encode_cursor(&values)).unwrap(), values);
        assert!(decode_cursor("[{\"x\": 1}]").is_err());
    }
}
