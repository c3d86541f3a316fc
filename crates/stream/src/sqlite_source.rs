//! The change stream's second source: a SQLite file's change log (see
//! `cutover_sqlite::capture`). Each pass reads the changes after the
//! applied position in one read transaction — a WAL snapshot, so only
//! whole committed SQLite transactions — converts every value through the
//! schema map exactly as the copy does, and hands them to the same
//! [`Applier`] as pgoutput's changes: upserts and deletes by key, one
//! PostgreSQL transaction per pass that also records the position (the
//! log's `seq`) in `cutover.applied`. Log rows are trimmed only after
//! PostgreSQL committed them durably, so a crash anywhere loses nothing
//! and a resumed pass applies nothing twice.
//!
//! Passes commit with `synchronous_commit = off`: the file is the primary
//! and keeps every change in its log until PostgreSQL has flushed it, so a
//! PostgreSQL crash can only take back whole passes together with their
//! recorded position, which the resumed stream applies again. Before each
//! trim one small transaction commits with `synchronous_commit = on`,
//! which flushes every pass before it.

use crate::applier::{Applier, Partial, Unique, SCHEMA_SQL};
use crate::mirror::{apply_pending, Statements};
use crate::pgoutput::{Column, Datum, Logical, Lsn, Relation};
use crate::StreamError;
use cutover_sqlite::capture::{self, Change, Op};
use cutover_sqlite::rusqlite::types::Value;
use cutover_sqlite::rusqlite::Connection;
use cutover_sqlite::SchemaMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The position's name in `cutover.applied`.
pub const SLOT: &str = "sqlite";

/// Applied changes are trimmed from the log after this many, or this long.
const TRIM_EVERY_CHANGES: i64 = 20_000;
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads a SQLite file's change log and applies it to PostgreSQL.
pub struct SqliteSource {
    path: PathBuf,
    map: Arc<SchemaMap>,
    conn: Arc<Mutex<Connection>>,
    applier: Applier,
    statements: Statements,
    /// Per table (in the schema map's order), its unique indexes other
    /// than the key, for [`Self::pass_until`]'s second attempt.
    uniques: Vec<Vec<Unique>>,
    /// Each table's copy position: its changes at or before it are in the
    /// copy already (the copy read the table from that log position's
    /// snapshot), so only later ones are applied.
    copied_at: std::collections::HashMap<String, i64>,
    /// The file's schema cookie the map was checked against (see
    /// [`capture::drift`]).
    schema_version: i64,
    /// Up to where the log has been trimmed, and when.
    trimmed: i64,
    last_trim: std::time::Instant,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pass {
    pub changes: usize,
    /// The log position applied through.
    pub position: i64,
}

fn sqlite(e: impl std::fmt::Display) -> StreamError {
    StreamError::Precondition(format!("SQLite change log: {e}"))
}

impl SqliteSource {
    /// Opens the file's log and reads where `new` says the stream stopped.
    pub async fn open(
        path: &Path,
        map: Arc<SchemaMap>,
        new: &tokio_postgres::Client,
    ) -> Result<SqliteSource, StreamError> {
        new.batch_execute(SCHEMA_SQL).await?;
        let mut copied_at = std::collections::HashMap::new();
        let progress: Option<String> = new
            .query_one("SELECT to_regclass('cutover.convert_progress')::text", &[])
            .await?
            .try_get(0)?;
        if progress.is_some() {
            for row in new
                .query(
                    "SELECT table_name, log_position FROM cutover.convert_progress WHERE log_position IS NOT NULL",
                    &[],
                )
                .await?
            {
                copied_at.insert(row.try_get::<_, String>(0)?, row.try_get::<_, i64>(1)?);
            }
        }
        let applied: i64 = match new
            .query_opt(
                "SELECT (lsn - '0/0'::pg_lsn)::bigint FROM cutover.applied WHERE slot = $1",
                &[&SLOT],
            )
            .await?
        {
            Some(row) => row.try_get(0)?,
            // Nothing applied yet: start at the oldest copy's position.
            None => copied_at.values().copied().min().unwrap_or(0),
        };
        new.batch_execute("SET synchronous_commit = off").await?;
        let conn = Connection::open(path).map_err(sqlite)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(sqlite)?;
        let drift = capture::drift(&conn, &map).map_err(sqlite)?;
        if !drift.is_empty() {
            return Err(schema_changed(&drift));
        }
        let schema_version = capture::schema_version(&conn).map_err(sqlite)?;
        let mut applier = Applier::new(SLOT, Lsn(applied as u64));
        for (i, t) in map.tables.iter().enumerate() {
            applier.feed(Logical::Relation(Relation {
                oid: relation_oid(i),
                schema: "public".to_string(),
                name: t.name.clone(),
                identity: b'd',
                columns: t
                    .columns
                    .iter()
                    .map(|c| Column {
                        name: c.name.clone(),
                        type_oid: 0,
                        is_key: t.primary_key.contains(&c.name),
                    })
                    .collect(),
                keyless_types: None,
            }))?;
        }
        Ok(SqliteSource {
            path: path.to_path_buf(),
            uniques: map.tables.iter().map(uniques).collect(),
            map,
            conn: Arc::new(Mutex::new(conn)),
            applier,
            statements: Statements::default(),
            copied_at,
            schema_version,
            trimmed: applied,
            last_trim: std::time::Instant::now(),
        })
    }

    /// The start of a stream started at a swap, when both sides hold the
    /// same rows: the log's end, or before the oldest change still in the
    /// log (written to the file directly while PostgreSQL was the primary,
    /// which PostgreSQL must now get); recorded in PostgreSQL at once, so
    /// [`SqliteSource::open`] starts there.
    pub async fn record_fresh_start(
        path: &Path,
        new: &tokio_postgres::Client,
    ) -> Result<i64, StreamError> {
        let file = path.to_path_buf();
        let start: i64 = tokio::task::spawn_blocking(move || {
            let conn = cutover_sqlite::open_read_only(&file)?;
            conn.query_row(
                &format!(
                    "SELECT coalesce((SELECT min(seq) - 1 FROM {}), (SELECT seq FROM sqlite_sequence WHERE name = ?1), 0)",
                    capture::LOG_TABLE
                ),
                [capture::LOG_TABLE],
                |r| r.get(0),
            )
        })
        .await
        .map_err(|e| sqlite(e.to_string()))?
        .map_err(sqlite)?;
        new.batch_execute(SCHEMA_SQL).await?;
        new.execute(
            "INSERT INTO cutover.applied (slot, lsn) VALUES ($1, ('0/0'::pg_lsn + $2::text::numeric)) \
             ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, applied_at = now()",
            &[&SLOT, &(start.to_string())],
        )
        .await?;
        Ok(start)
    }

    /// The log position PostgreSQL has applied through.
    pub fn applied(&self) -> i64 {
        self.applier.applied().0 as i64
    }

    /// Applies up to `limit` changes (whole SQLite transactions) and trims
    /// them from the log once PostgreSQL committed them.
    pub async fn pass(
        &mut self,
        new: &tokio_postgres::Client,
        limit: usize,
    ) -> Result<Pass, StreamError> {
        self.pass_until(new, limit, i64::MAX).await
    }

    /// [`SqliteSource::pass`] over changes up to `upto` only.
    pub async fn pass_until(
        &mut self,
        new: &tokio_postgres::Client,
        limit: usize,
        upto: i64,
    ) -> Result<Pass, StreamError> {
        let after = self.applied();
        let (conn, map, known) = (self.conn.clone(), self.map.clone(), self.schema_version);
        // The schema cookie is read after the changes: a schema change
        // that came after them shows now, before any is applied.
        let (changes, version, drift) = tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let changes = capture::read(&conn, after, limit)?;
            let version = capture::schema_version(&conn)?;
            let drift = if version == known {
                Vec::new()
            } else {
                capture::drift(&conn, &map)?
            };
            Ok::<_, capture::CaptureError>((changes, version, drift))
        })
        .await
        .map_err(|e| sqlite(e.to_string()))?
        .map_err(sqlite)?;
        if !drift.is_empty() {
            return Err(schema_changed(&drift));
        }
        // A change that moves nothing the capture depends on (an index, a
        // view, a trigger of the app's own).
        self.schema_version = version;
        let changes: Vec<Change> = changes.into_iter().filter(|c| c.seq <= upto).collect();
        let Some(last) = changes.last().map(|c| c.seq) else {
            return Ok(Pass {
                changes: 0,
                position: after,
            });
        };
        // A REPLACE that removed *another* row to keep a unique constraint
        // other than the key left no trace in the log (SQLite fires no
        // delete trigger for it), and no trigger can tell a REPLACE from an
        // INSERT OR IGNORE or an upsert beforehand. Its upsert then collides
        // on PostgreSQL with the row SQLite removed: the batch rolls back
        // whole and is applied again removing, before each upsert, the rows
        // it collides with. That is exact, as SQLite checks unique
        // constraints row by row: at that point in the log the file held
        // no such other row.
        match self.apply(new, &changes, last, false).await {
            Err(StreamError::Server { code, message, .. }) if code == "23505" => {
                tracing::info!(%message, "a change collided on a unique constraint (a REPLACE removed the other row in the file); applying the batch again with the removals");
                self.apply(new, &changes, last, true).await?;
            }
            other => other?,
        }
        // Trimming takes the file's write lock, which the app's writers
        // need too: once in a while, not after every pass.
        if last - self.trimmed >= TRIM_EVERY_CHANGES || self.last_trim.elapsed() >= TRIM_EVERY {
            flush(new).await?;
            let conn = self.conn.clone();
            tokio::task::spawn_blocking(move || {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                capture::trim(&conn, last)
            })
            .await
            .map_err(|e| sqlite(e.to_string()))?
            .map_err(sqlite)?;
            self.trimmed = last;
            self.last_trim = std::time::Instant::now();
        }
        Ok(Pass {
            changes: changes.len(),
            position: last,
        })
    }

    /// Applies `changes` (through `last`) in one PostgreSQL transaction;
    /// with `evict`, each upsert first removes the rows it collides with
    /// on a unique constraint other than the key.
    async fn apply(
        &mut self,
        new: &tokio_postgres::Client,
        changes: &[Change],
        last: i64,
        evict: bool,
    ) -> Result<(), StreamError> {
        self.applier.feed(Logical::Begin {
            final_lsn: Lsn(last as u64),
            xid: 0,
        })?;
        for change in changes {
            if self
                .copied_at
                .get(&change.table)
                .is_some_and(|at| change.seq <= *at)
            {
                continue;
            }
            let (index, message) = self.message(change)?;
            if let (true, Logical::Insert { rel, new: row }) = (evict, &message) {
                for unique in &self.uniques[index] {
                    self.applier.evict_collisions(*rel, row, unique)?;
                }
            }
            self.applier.feed(message)?;
        }
        self.applier.feed(Logical::Commit {
            commit_lsn: Lsn(last as u64),
            end_lsn: Lsn(last as u64),
        })?;
        apply_pending(new, &mut self.applier, &mut self.statements).await?;
        Ok(())
    }

    /// The newest position in the file's change log.
    pub async fn last_seq(&self) -> Result<i64, StreamError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            log_position(&conn)
        })
        .await
        .map_err(|e| sqlite(e.to_string()))?
        .map_err(sqlite)
    }

    /// Applies passes until the log holds nothing after the position.
    pub async fn drain(&mut self, new: &tokio_postgres::Client) -> Result<i64, StreamError> {
        while self.pass(new, 10_000).await?.changes > 0 {}
        flush(new).await?;
        let (conn, applied) = (self.conn.clone(), self.applied());
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            capture::trim(&conn, applied)
        })
        .await
        .map_err(|e| sqlite(e.to_string()))?
        .map_err(sqlite)?;
        self.trimmed = applied;
        Ok(applied)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A captured change as the applier's message, its values converted
    /// through the schema map, with its table's place in the map.
    fn message(&self, change: &Change) -> Result<(usize, Logical), StreamError> {
        let (index, table) = self
            .map
            .tables
            .iter()
            .enumerate()
            .find(|(_, t)| t.name == change.table)
            .ok_or_else(|| {
                StreamError::Precondition(format!(
                    "the change log names table {:?}, which the schema map does not have (was it created after capture started?)",
                    change.table
                ))
            })?;
        let rel = relation_oid(index);
        let datum = |column: &cutover_sqlite::Column,
                     value: &Value|
         -> Result<Datum, StreamError> {
            match column.to_pg_text(value.into()) {
                Ok(Some(text)) => Ok(Datum::Text(text)),
                Ok(None) => Ok(Datum::Null),
                Err(bad) => Err(StreamError::Precondition(format!(
                    "change {} to {}: column {} holds {}, which is not a {} (give the column another type in [[schema.columns]])",
                    change.seq, table.name, bad.column, bad.stored, bad.pg_type
                ))),
            }
        };
        Ok((
            index,
            match (change.op, &change.row) {
                (Op::Insert | Op::Update, Some(row)) => Logical::Insert {
                    rel,
                    new: table
                        .columns
                        .iter()
                        .zip(row)
                        .map(|(c, v)| datum(c, v))
                        .collect::<Result<_, _>>()?,
                },
                (Op::Delete, _) => {
                    let mut old = vec![Datum::Null; table.columns.len()];
                    for (key, value) in table.primary_key.iter().zip(&change.key) {
                        if let Some(i) = table.columns.iter().position(|c| &c.name == key) {
                            old[i] = datum(&table.columns[i], value)?;
                        }
                    }
                    Logical::Delete { rel, old }
                }
                (_, None) => {
                    return Err(StreamError::Protocol(format!(
                        "change {} to {} has no row image",
                        change.seq, table.name
                    )))
                }
            },
        ))
    }
}

/// A table's unique constraints and unique indexes other than its key,
/// partial ones with their predicate. Expression indexes are left out (the
/// convert does not carry them).
fn uniques(table: &cutover_sqlite::Table) -> Vec<Unique> {
    let types: Vec<String> = table.columns.iter().map(|c| c.pg_type.clone()).collect();
    table
        .indexes
        .iter()
        .filter(|i| i.unique)
        .filter_map(|i| {
            let columns = i
                .columns
                .iter()
                .map(|(c, _)| c.clone())
                .collect::<Option<_>>()?;
            Some(Unique {
                columns,
                partial: i.partial.as_ref().map(|predicate| Partial {
                    predicate: predicate.clone(),
                    types: types.clone(),
                }),
            })
        })
        .collect()
}

/// The stream's refusal to go on after the file's schema changed.
fn schema_changed(drift: &[String]) -> StreamError {
    StreamError::Precondition(format!(
        "the SQLite file's schema changed while capture runs: {}. cutover does not carry schema changes, \
         and the stream stopped here so that no write of the changed tables is lost unseen (the changes \
         stay in the file's log). To go on, start the migration again into an empty new database (drop \
         the converted tables and the cutover schema there, then `cutover mirror start`), or undo the \
         change in the file",
        drift.join("; ")
    ))
}

/// Waits until every pass committed on `new` is durable there: a commit
/// with `synchronous_commit = on` flushes the WAL up to its own record,
/// past every earlier commit.
async fn flush(new: &tokio_postgres::Client) -> Result<(), StreamError> {
    new.batch_execute(&format!(
        "BEGIN; SET LOCAL synchronous_commit = on; \
         UPDATE cutover.applied SET applied_at = applied_at WHERE slot = '{SLOT}'; COMMIT"
    ))
    .await?;
    Ok(())
}

/// The change log's newest position (kept by AUTOINCREMENT even when the
/// log has been trimmed empty).
pub fn log_position(conn: &Connection) -> Result<i64, cutover_sqlite::rusqlite::Error> {
    conn.query_row(
        "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0)",
        [capture::LOG_TABLE],
        |r| r.get(0),
    )
}

fn relation_oid(index: usize) -> u32 {
    index as u32 + 1
}
