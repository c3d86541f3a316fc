//! The initial copy (backfill), run while the change stream is applied.
//!
//! Each table is read in primary-key chunks (keyset: after the last key of
//! the previous chunk, never OFFSET). A chunk is read on the primary with
//! `FOR SHARE`, inserted on the secondary with `ON CONFLICT DO NOTHING`
//! together with the chunk's last key in `cutover.copy_progress` (one
//! secondary transaction), and only then is the primary transaction, and
//! with it the row locks, released. So a crash resumes after the last
//! recorded chunk, and:
//!
//! - a row changed before the slot's start and not since is only in the copy;
//! - a row changed after the slot's start reaches the secondary through the
//!   stream. If the stream got there first, insert-if-absent leaves the
//!   stream's version; if the copy got there first, the stream's later
//!   upsert or delete overwrites it, in commit order;
//! - a writer cannot slip a change between the chunk's read and its insert,
//!   because the row locks are held until the insert has committed;
//! - a row deleted before the chunk is read is not copied, so nothing is
//!   resurrected.
//!
//! Tables without a key (REPLICA IDENTITY FULL) cannot be copied that way:
//! insert-if-absent needs a key to tell a copied row from a streamed one.
//! They are read whole in the snapshot the slot exported when it was
//! created, before the stream starts, and written in the same secondary
//! transaction that records the slot's start as the applied position. That
//! snapshot holds exactly the transactions committed before the slot's
//! start, and the stream carries exactly those after it, so every row is
//! there once. A crash before that transaction commits leaves no start
//! recorded, so the next start makes a new slot and copies them again;
//! they are not resumable part-way, and their progress shows once done.

use crate::applier::{columns_as_text, literal_or_null, quote_ident, quote_literal};
use crate::keys::{shape, Shape};
use crate::preconditions::TableShape;
use crate::{control_client, StreamError};
use cutover_config::{BackendUrl, MirrorConfig};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Per-table copy progress on the secondary.
pub const PROGRESS_SQL: &str = "CREATE TABLE IF NOT EXISTS cutover.copy_progress (\
     slot text NOT NULL, table_name text NOT NULL, last_key text[], rows bigint NOT NULL DEFAULT 0, \
     estimated_rows bigint NOT NULL DEFAULT 0, done bool NOT NULL DEFAULT false, \
     PRIMARY KEY (slot, table_name))";

/// One table's progress, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub table: String,
    pub last_key: Option<Vec<String>>,
    pub rows: u64,
    pub estimated_rows: u64,
    pub done: bool,
}

/// Empties, for a fresh copy, the secondary's tables that hold rows — but
/// only rows cutover copied there before (the table is in this slot's
/// copy progress): a table holding rows someone else put on the new
/// database is refused with the fix, unless `clear_new` allows it. The
/// tables go in one TRUNCATE with every other mirrored table, so foreign
/// keys among them do not stop it.
pub async fn clear_sql(
    new: &Client,
    slot: &str,
    tables: &[TableShape],
    clear_new: bool,
) -> Result<String, StreamError> {
    let copied_before: Vec<String> = new
        .query(
            "SELECT table_name FROM cutover.copy_progress WHERE slot = $1",
            &[&slot],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut clear: Vec<String> = Vec::new();
    let mut foreign = Vec::new();
    for t in tables {
        let table = t.qualified();
        let has_rows: bool = new
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])
            .await?
            .try_get(0)?;
        if !has_rows {
            continue;
        }
        if clear_new || copied_before.contains(&table) {
            clear.push(table);
        } else {
            foreign.push(table);
        }
    }
    if !foreign.is_empty() {
        return Err(StreamError::Precondition(format!(
            "new database: {} already hold rows that cutover did not copy there; empty them, \
             or run `cutover mirror start --clear-new` to have cutover delete every row in them first",
            foreign.join(", ")
        )));
    }
    if clear.is_empty() {
        return Ok(String::new());
    }
    // TRUNCATE refuses a table referenced by a foreign key from a table
    // not truncated with it, empty or not: every mirrored table goes in
    // the one statement (the empty ones lose nothing).
    let all: Vec<String> = tables.iter().map(TableShape::qualified).collect();
    Ok(format!("TRUNCATE {}; ", all.join(", ")))
}

/// Records a fresh copy plan: every table pending from its first key, in
/// the same secondary transaction that sets the stream's start position.
pub async fn plan_sql(
    old: &Client,
    slot: &str,
    tables: &[TableShape],
) -> Result<String, StreamError> {
    let mut sql = format!(
        "DELETE FROM cutover.copy_progress WHERE slot = {}; ",
        quote_literal(slot)
    );
    for t in tables {
        let estimate: i64 = old
            .query_one(
                "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::text::regclass",
                &[&t.qualified()],
            )
            .await?
            .get(0);
        sql.push_str(&format!(
            "INSERT INTO cutover.copy_progress (slot, table_name, estimated_rows) VALUES ({}, {}, {estimate}); ",
            quote_literal(slot),
            quote_literal(&t.qualified())
        ));
    }
    Ok(sql)
}

/// The recorded progress of every table for `slot`.
pub async fn progress(new: &Client, slot: &str) -> Result<Vec<Progress>, StreamError> {
    Ok(new
        .query(
            "SELECT table_name, last_key, rows, estimated_rows, done FROM cutover.copy_progress \
             WHERE slot = $1 ORDER BY table_name",
            &[&slot],
        )
        .await?
        .into_iter()
        .map(|r| Progress {
            table: r.get(0),
            last_key: r.get(1),
            rows: r.get::<_, i64>(2) as u64,
            estimated_rows: r.get::<_, i64>(3) as u64,
            done: r.get(4),
        })
        .collect())
}

/// Copies the tables without a key whole, reading them on old in the
/// snapshot the slot exported and writing them through `new`, which has
/// the transaction that will record the slot's start open. Returns the SQL
/// that marks them copied, to run in that same transaction.
pub async fn copy_keyless(
    old_url: &BackendUrl,
    new: &Client,
    snapshot: &str,
    slot: &str,
    tables: &[TableShape],
    config: &MirrorConfig,
    report: &(dyn Fn(&str, u64, bool) + Sync),
) -> Result<String, StreamError> {
    use futures_util::{SinkExt, StreamExt};
    let old = control_client(old_url, "cutover-copy").await?;
    old.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot)
    ))
    .await?;
    let throttle = Throttle::new(config.copy_max_rows_per_second);
    let mut marks = String::new();
    for table in tables.iter().filter(|t| t.keyless) {
        let columns: Vec<String> = table.columns.iter().map(|(n, _)| quote_ident(n)).collect();
        let list = if columns.is_empty() {
            String::new()
        } else {
            format!(" ({})", columns.join(", "))
        };
        let out = old
            .copy_out(&format!(
                "COPY (SELECT {} FROM {}) TO STDOUT",
                columns.join(", "),
                table.qualified()
            ))
            .await?;
        let sink = new
            .copy_in(&format!("COPY {}{list} FROM STDIN", table.qualified()))
            .await?;
        futures_util::pin_mut!(out, sink);
        // PostgreSQL sends each row as one CopyData message.
        let mut rows = 0u64;
        while let Some(row) = out.next().await {
            sink.feed(row?).await?;
            rows += 1;
            if rows.is_multiple_of(1000) {
                let wait = throttle.delay(1000);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let copied = sink.finish().await?;
        report(&table.qualified(), copied, true);
        tracing::info!(table = %table.qualified(), rows = copied, "copied a table without a key in the slot's snapshot");
        marks.push_str(&format!(
            "UPDATE cutover.copy_progress SET rows = {copied}, done = true WHERE slot = {} AND table_name = {}; ",
            quote_literal(slot),
            quote_literal(&table.qualified())
        ));
    }
    old.batch_execute("COMMIT").await?;
    Ok(marks)
}

/// Limits copied rows per second across all tables.
struct Throttle {
    rate: u64,
    started: Instant,
    rows: Mutex<u64>,
}

impl Throttle {
    fn new(rate: u64) -> Throttle {
        Throttle {
            rate,
            started: Instant::now(),
            rows: Mutex::new(0),
        }
    }

    /// How long to wait before copying `rows` more.
    fn delay(&self, rows: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let mut total = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        *total += rows;
        let due = Duration::from_secs_f64(*total as f64 / self.rate as f64);
        due.saturating_sub(self.started.elapsed())
    }
}

/// Copies every pending table, `config.copy_parallel_tables` at a time.
/// `report(table, rows_added, done)` is called after each chunk.
pub async fn copy_pending(
    old_url: &BackendUrl,
    new_url: &BackendUrl,
    slot: &str,
    config: &MirrorConfig,
    report: &(dyn Fn(&str, u64, bool) + Sync),
) -> Result<(), StreamError> {
    let new = control_client(new_url, "cutover-copy").await?;
    let old = control_client(old_url, "cutover-copy").await?;
    let pending: Vec<Progress> = progress(&new, slot)
        .await?
        .into_iter()
        .filter(|p| !p.done)
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let tables = crate::preconditions::user_tables(&old).await?;
    let throttle = Throttle::new(config.copy_max_rows_per_second);
    let permits = tokio::sync::Semaphore::new(config.copy_parallel_tables as usize);
    let jobs = pending.iter().map(|p| {
        let table = tables.iter().find(|t| t.qualified() == p.table).cloned();
        let (throttle, permits) = (&throttle, &permits);
        async move {
            let table = table.ok_or_else(|| {
                StreamError::Precondition(format!(
                    "table {} disappeared from the old database",
                    p.table
                ))
            })?;
            if table.keyless {
                return Err(StreamError::Precondition(format!(
                    "table {} has no primary key any more, so its copy cannot resume by key; \
                     stop mirroring, add the key back or start mirroring over",
                    p.table
                )));
            }
            let _permit = permits
                .acquire()
                .await
                .map_err(|_| StreamError::Control("copy stopped".to_string()))?;
            copy_table(
                old_url,
                new_url,
                slot,
                &table,
                p.last_key.clone(),
                config,
                throttle,
                report,
            )
            .await
        }
    });
    futures_util::future::try_join_all(jobs).await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn copy_table(
    old_url: &BackendUrl,
    new_url: &BackendUrl,
    slot: &str,
    table: &TableShape,
    mut after: Option<Vec<String>>,
    config: &MirrorConfig,
    throttle: &Throttle,
    report: &(dyn Fn(&str, u64, bool) + Sync),
) -> Result<(), StreamError> {
    let old = control_client(old_url, "cutover-copy").await?;
    let new = control_client(new_url, "cutover-copy").await?;
    let shape = shape(&old, table).await?;
    let columns: Vec<String> = table.columns.iter().map(|(n, _)| quote_ident(n)).collect();
    let values = columns_as_text(table.columns.iter().map(|(n, _)| n));
    let order = shape
        .keys
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    loop {
        let (n, done, last) = loop {
            match copy_chunk(
                &old,
                &new,
                slot,
                &shape,
                &columns,
                &values,
                &order,
                after.as_deref(),
                config,
            )
            .await
            {
                // A chunk's row locks can deadlock with a writer locking
                // the same rows in another order; retry that chunk.
                Err(StreamError::Server { code, .. }) if code == "40P01" || code == "40001" => {
                    let _ = old.batch_execute("ROLLBACK").await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other?,
            }
        };
        report(&shape.table, n, done);
        if done {
            return Ok(());
        }
        after = last;
        let wait = throttle.delay(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Copies one chunk; returns (rows, whether the table is done, last key).
#[allow(clippy::too_many_arguments)]
async fn copy_chunk(
    old: &Client,
    new: &Client,
    slot: &str,
    shape: &Shape,
    columns: &[String],
    values: &[String],
    order: &str,
    after: Option<&[String]>,
    config: &MirrorConfig,
) -> Result<(u64, bool, Option<Vec<String>>), StreamError> {
    old.batch_execute("BEGIN").await?;
    let rows = old
        .query(
            &format!(
                "SELECT ARRAY[{}], ARRAY[{}] FROM {} WHERE {} ORDER BY {order} LIMIT {} FOR SHARE",
                shape.key_text,
                values.join(", "),
                shape.table,
                shape.range(after, None),
                config.copy_chunk_rows
            ),
            &[],
        )
        .await?;
    let n = rows.len() as u64;
    let done = n < u64::from(config.copy_chunk_rows);
    let last: Option<Vec<String>> = rows.last().map(|r| r.get(0));
    let mut sql = String::from("BEGIN; SET LOCAL session_replication_role = replica; ");
    if n > 0 {
        sql.push_str(&insert_if_absent(shape, columns, &rows));
    }
    let key_sql = match &last {
        Some(k) => format!(
            "ARRAY[{}]::text[]",
            k.iter()
                .map(|v| quote_literal(v))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "last_key".to_string(),
    };
    sql.push_str(&format!(
        "UPDATE cutover.copy_progress SET last_key = {key_sql}, rows = rows + {n}, done = {done} \
         WHERE slot = {} AND table_name = {}; COMMIT",
        quote_literal(slot),
        quote_literal(&shape.table)
    ));
    if let Err(e) = new.batch_execute(&sql).await {
        let _ = new.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    // Only now may writers touch these rows again.
    old.batch_execute("COMMIT").await?;
    Ok((n, done, last))
}

fn insert_if_absent(shape: &Shape, columns: &[String], rows: &[tokio_postgres::Row]) -> String {
    let tuples: Vec<String> = rows
        .iter()
        .map(|r| {
            let vals: Vec<Option<String>> = r.get(1);
            let literals: Vec<String> =
                vals.iter().map(|v| literal_or_null(v.as_deref())).collect();
            format!("({})", literals.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES {} ON CONFLICT {} DO NOTHING; ",
        shape.table,
        columns.join(", "),
        tuples.join(", "),
        shape.key_tuple
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_spreads_rows_over_time() {
        let t = Throttle {
            rate: 1000,
            started: Instant::now(),
            rows: Mutex::new(0),
        };
        assert!(t.delay(500) > Duration::from_millis(400));
        assert!(t.delay(500) > Duration::from_millis(900));
        let free = Throttle {
            rate: 0,
            started: Instant::now(),
            rows: Mutex::new(0),
        };
        assert_eq!(free.delay(1_000_000), Duration::ZERO);
    }
}
