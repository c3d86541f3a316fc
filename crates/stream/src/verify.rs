//! Verify proves old and new hold the same rows; repair fixes the rows it
//! finds different.
//!
//! Verify walks each table in primary-key order in chunks (keyset: each
//! chunk starts after the last key of the previous one, never OFFSET). For a
//! chunk, each database computes a row count and a sum of 64-bit hashes of
//! the rows' text form, so rows cross the network only when a chunk
//! differs; then both sides' (key, hash) pairs are fetched and compared to
//! name the exact keys.
//!
//! Writes continue while verify runs, and the stream applies each one
//! moments after it commits on old. With the running stream at hand (a
//! verify in the daemon), each chunk is compared at a point of the stream,
//! as Vitess VDiff stops its stream at a position: old is read, old's WAL
//! position taken, and new read once the stream has applied up to it, so
//! new holds at least everything old's read saw; equal sums mean the chunk
//! was equal at that point. Keys that differ may have changed on old since
//! its read, so each is checked again alone under a row lock: its row read
//! on old `FOR SHARE` (it cannot change until new has been read), old's
//! position taken after the lock is granted, new read once the stream
//! passed it. Only differences that survive that are reported. Writers
//! wait only on the few rows being re-checked, never on whole chunks.
//! Without the stream (`--standalone`), a differing chunk is re-checked a
//! few times, `recheck_delay` apart, which can report a row that was only
//! in flight.
//!
//! A table without a key (REPLICA IDENTITY FULL) is compared whole, as a
//! multiset of rows: count and hash sum first, and if they differ, the
//! count of each distinct row, which names the rows (by their contents)
//! missing on one side, as many times as copies are missing.

use crate::applier::{columns_as_text, literal_or_null, quote_ident, quote_literal};
use crate::keys::{shape, Shape};
use crate::preconditions::TableShape;
use crate::StreamError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio_postgres::Client;

/// The running stream, as verify waits on it.
pub trait StreamPoint: Sync {
    /// Waits until the secondary holds every change up to `lsn`; false if
    /// the stream does not get there in time.
    fn reach<'a>(&'a self, lsn: crate::Lsn) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>>;
}

/// How long verify waits for the stream to pass a chunk's position.
const STREAM_WAIT: Duration = Duration::from_secs(60);
/// A differing key is compared this many times before it is reported.
const KEY_RECHECKS: u32 = 3;
const KEY_RECHECK_DELAY: Duration = Duration::from_millis(250);

impl StreamPoint for crate::StreamPosition {
    fn reach<'a>(&'a self, lsn: crate::Lsn) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(self.wait_for(lsn, STREAM_WAIT))
    }
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub chunk_rows: i64,
    /// Only these tables (`schema.name` or `name`); all when empty.
    pub tables: Vec<String>,
    /// How many times a differing chunk is re-checked before it is reported.
    pub rechecks: u32,
    pub recheck_delay: Duration,
    /// Continue from the progress recorded by an earlier, unfinished run.
    pub resume: bool,
    /// Stop after this many chunks (a bounded verification window); the
    /// report is then incomplete and a later run can `resume`.
    pub max_chunks: Option<u64>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            chunk_rows: 10_000,
            tables: Vec::new(),
            rechecks: 5,
            recheck_delay: Duration::from_millis(500),
            resume: false,
            max_chunks: None,
        }
    }
}

/// A row that differs, by its key (column name → text value).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowDiff {
    /// `missing_on_new`, `missing_on_old` or `different`.
    pub kind: String,
    pub key: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TableReport {
    pub table: String,
    /// Rows and chunks checked, including by earlier runs this one resumed.
    pub rows_checked: u64,
    pub chunks: u64,
    /// Chunks checked by this run.
    pub chunks_this_run: u64,
    /// False when `max_chunks` stopped the run inside or before this table.
    pub done: bool,
    pub differences: Vec<RowDiff>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyReport {
    /// No differences in what was checked.
    pub clean: bool,
    /// Every table was checked to its end.
    pub complete: bool,
    pub tables: Vec<TableReport>,
}

impl VerifyReport {
    /// The report for humans.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            let verdict = if t.differences.is_empty() {
                "identical".to_string()
            } else {
                format!("{} rows differ", t.differences.len())
            };
            out.push_str(&format!(
                "{:<40} {:>10} rows in {:>5} chunks  {verdict}\n",
                t.table, t.rows_checked, t.chunks
            ));
            for d in t.differences.iter().take(20) {
                let key: Vec<String> = d.key.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push_str(&format!("    {:<15} {}\n", d.kind, key.join(", ")));
            }
            if t.differences.len() > 20 {
                out.push_str(&format!(
                    "    ... and {} more (use --json)\n",
                    t.differences.len() - 20
                ));
            }
        }
        out.push_str(if !self.complete {
            "verify: stopped at --max-chunks; continue with --resume\n"
        } else if self.clean {
            "verify: old and new hold the same rows\n"
        } else {
            "verify: DIFFERENCES FOUND; `cutover repair` re-copies them from old\n"
        });
        out
    }
}

/// A row's text form, for table alias `t` (`t.*` names the table even
/// when it has a column called `t`).
const ROW_TEXT: &str = "ROW(t.*)::text";

/// Count and hash-sum of the rows of `table` (or a subquery over it) in a
/// key range (`true` for all), computed by the database.
async fn checksum(client: &Client, table: &str, range: &str) -> Result<(i64, String), StreamError> {
    let sql = format!(
        "SELECT count(*), coalesce(sum(hashtextextended({ROW_TEXT}, 0)::numeric), 0)::text FROM {table} t WHERE {range}"
    );
    let row = client.query_one(&sql, &[]).await?;
    Ok((row.get(0), row.get(1)))
}

/// (key → row hash) for the rows in a key range of `from` (the table, or
/// a subquery over it).
async fn row_hashes(
    client: &Client,
    shape: &Shape,
    from: &str,
    range: &str,
) -> Result<BTreeMap<Vec<String>, i64>, StreamError> {
    let sql = format!(
        "SELECT ARRAY[{}], hashtextextended({ROW_TEXT}, 0) FROM {from} t WHERE {range}",
        shape.key_text
    );
    Ok(client
        .query(&sql, &[])
        .await?
        .into_iter()
        .map(|r| (r.get::<_, Vec<String>>(0), r.get::<_, i64>(1)))
        .collect())
}

fn diff(
    shape: &Shape,
    old: &BTreeMap<Vec<String>, i64>,
    new: &BTreeMap<Vec<String>, i64>,
) -> Vec<RowDiff> {
    let key = |k: &Vec<String>| shape.keys.iter().cloned().zip(k.iter().cloned()).collect();
    let mut out = Vec::new();
    for (k, h) in old {
        match new.get(k) {
            None => out.push(RowDiff {
                kind: "missing_on_new".to_string(),
                key: key(k),
            }),
            Some(h2) if h2 != h => out.push(RowDiff {
                kind: "different".to_string(),
                key: key(k),
            }),
            Some(_) => {}
        }
    }
    for k in new.keys() {
        if !old.contains_key(k) {
            out.push(RowDiff {
                kind: "missing_on_old".to_string(),
                key: key(k),
            });
        }
    }
    out
}

/// Verifies every table (or those named in `options.tables`), without the
/// stream: differing chunks are re-checked after a delay.
pub async fn verify(
    old: &Client,
    new: &Client,
    options: &VerifyOptions,
) -> Result<VerifyReport, StreamError> {
    verify_with_progress(old, new, options, None, &|_, _, _| {}).await
}

/// As [`verify`], comparing each chunk at one point of `stream` when given
/// (see the module comment), and calling `on_chunk(table, rows_checked,
/// differences_found)` after every chunk.
pub async fn verify_with_progress(
    old: &Client,
    new: &Client,
    options: &VerifyOptions,
    stream: Option<&dyn StreamPoint>,
    on_chunk: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<VerifyReport, StreamError> {
    let tables = crate::preconditions::user_tables(old).await?;
    new.batch_execute(PROGRESS_SQL).await?;
    let mut budget = options.max_chunks;
    let mut reports = Vec::new();
    for table in tables {
        let wanted = options.tables.is_empty()
            || options.tables.iter().any(|t| {
                *t == table.name
                    || *t == format!("{}.{}", table.schema, table.name)
                    || *t == table.qualified()
            });
        if !wanted {
            continue;
        }
        let saved = if options.resume {
            saved_progress(new, &table.qualified()).await?
        } else {
            new.execute(
                "DELETE FROM cutover.verify_progress WHERE table_name = $1",
                &[&table.qualified()],
            )
            .await?;
            None
        };
        let at = Checker {
            old,
            new,
            options,
            stream,
        };
        reports.push(verify_table(&at, &table, saved, &mut budget, on_chunk).await?);
    }
    Ok(VerifyReport {
        clean: reports.iter().all(|r| r.differences.is_empty()),
        complete: reports.iter().all(|r| r.done),
        tables: reports,
    })
}

/// Per-table verify progress on the secondary, so a run can resume.
const PROGRESS_SQL: &str = "CREATE SCHEMA IF NOT EXISTS cutover; \
     CREATE TABLE IF NOT EXISTS cutover.verify_progress (table_name text PRIMARY KEY, last_key text[], \
     rows_checked bigint NOT NULL, chunks bigint NOT NULL, differences jsonb NOT NULL, done bool NOT NULL)";

/// What an earlier run recorded for a table: its report so far and where it stopped.
async fn saved_progress(
    new: &Client,
    table: &str,
) -> Result<Option<(TableReport, Option<Vec<String>>)>, StreamError> {
    let Some(row) = new
        .query_opt(
            "SELECT last_key, rows_checked, chunks, differences::text, done FROM cutover.verify_progress \
             WHERE table_name = $1",
            &[&table],
        )
        .await?
    else {
        return Ok(None);
    };
    let differences: String = row.get(3);
    let report = TableReport {
        table: table.to_string(),
        rows_checked: row.get::<_, i64>(1) as u64,
        chunks: row.get::<_, i64>(2) as u64,
        chunks_this_run: 0,
        done: row.get(4),
        differences: serde_json::from_str(&differences).map_err(|e| {
            StreamError::Control(format!("cutover.verify_progress for {table}: {e}"))
        })?,
    };
    Ok(Some((report, row.get(0))))
}

async fn save_progress(
    new: &Client,
    report: &TableReport,
    last_key: Option<&[String]>,
) -> Result<(), StreamError> {
    let differences = serde_json::to_string(&report.differences)
        .map_err(|e| StreamError::Control(e.to_string()))?;
    let last_key: Option<Vec<String>> = last_key.map(|k| k.to_vec());
    new.execute(
        "INSERT INTO cutover.verify_progress VALUES ($1, $2, $3, $4, $5::text::jsonb, $6) \
         ON CONFLICT (table_name) DO UPDATE SET last_key = EXCLUDED.last_key, rows_checked = EXCLUDED.rows_checked, \
         chunks = EXCLUDED.chunks, differences = EXCLUDED.differences, done = EXCLUDED.done",
        &[
            &report.table,
            &last_key,
            &(report.rows_checked as i64),
            &(report.chunks as i64),
            &differences,
            &report.done,
        ],
    )
    .await?;
    Ok(())
}

/// The two databases and how chunks are compared.
struct Checker<'a> {
    old: &'a Client,
    new: &'a Client,
    options: &'a VerifyOptions,
    stream: Option<&'a dyn StreamPoint>,
}

impl Checker<'_> {
    /// Old's WAL write position now: after a read of old, it is past the
    /// commit record of every change that read saw, and inside a key
    /// re-check's transaction, past every change to the locked rows (a
    /// writer's locks are released only after its commit record is
    /// written, with `synchronous_commit` on). (The insert position would also
    /// cover asynchronous commits, but on an idle server it can sit past
    /// anything the stream will be sent until more WAL is written.)
    async fn old_position(&self) -> Result<crate::Lsn, StreamError> {
        let text: String = self
            .old
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .try_get(0)?;
        text.parse().map_err(StreamError::Protocol)
    }

    async fn reach(&self, stream: &dyn StreamPoint, lsn: crate::Lsn) -> Result<(), StreamError> {
        if stream.reach(lsn).await {
            Ok(())
        } else {
            Err(StreamError::Control(format!(
                "the change stream did not apply up to {lsn} within {} s; verify needs a running stream \
                 (see `cutover status`), or run it with --standalone",
                STREAM_WAIT.as_secs()
            )))
        }
    }

    /// Compares one key range: (rows on old, differences). Old is read
    /// first, then its position; new is read once the stream applied past
    /// it, so new holds at least everything old's read saw. Keys that
    /// differ (changed on old since, or really different) are checked
    /// again together under row locks.
    async fn chunk(&self, shape: &Shape, range: &str) -> Result<(u64, Vec<RowDiff>), StreamError> {
        let Some(stream) = self.stream else {
            return self.chunk_rechecked(shape, range).await;
        };
        let (old, new) = (self.old, self.new);
        let a = checksum(old, &shape.table, range).await?;
        self.reach(stream, self.old_position().await?).await?;
        let b = checksum(new, &shape.table, range).await?;
        if a == b {
            return Ok((a.0 as u64, Vec::new()));
        }
        let on_old = row_hashes(old, shape, &shape.table, range).await?;
        self.reach(stream, self.old_position().await?).await?;
        let on_new = row_hashes(new, shape, &shape.table, range).await?;
        let differences = diff(shape, &on_old, &on_new);
        Ok((
            a.0 as u64,
            self.keys_differ(stream, shape, differences).await?,
        ))
    }

    /// The differing keys checked again at one point of the stream: their
    /// rows read on old `FOR SHARE` (they cannot change until new has been
    /// read), old's position taken after the locks are granted, new read
    /// once the stream applied past it. A few attempts, `KEY_RECHECK_DELAY`
    /// apart, cover what a lock cannot: an insert on old still in
    /// progress, and a commit with `synchronous_commit = off` whose record
    /// the WAL writer has not written yet. Returns those still different.
    async fn keys_differ(
        &self,
        stream: &dyn StreamPoint,
        shape: &Shape,
        mut differences: Vec<RowDiff>,
    ) -> Result<Vec<RowDiff>, StreamError> {
        let (old, new) = (self.old, self.new);
        for attempt in 0..KEY_RECHECKS {
            if differences.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(KEY_RECHECK_DELAY).await;
            }
            let keys: Vec<Vec<String>> = differences
                .iter()
                .map(|d| {
                    shape
                        .keys
                        .iter()
                        .map(|k| d.key.get(k).cloned().unwrap_or_default())
                        .collect()
                })
                .collect();
            let range = shape.key_in(&keys);
            old.batch_execute("BEGIN").await?;
            let result = async {
                let locked = format!("(SELECT * FROM {} WHERE {range} FOR SHARE)", shape.table);
                let a = row_hashes(old, shape, &locked, "true").await?;
                self.reach(stream, self.old_position().await?).await?;
                let b = row_hashes(new, shape, &shape.table, &range).await?;
                Ok::<_, StreamError>((a, b))
            }
            .await;
            old.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })
                .await?;
            let (a, b) = result?;
            // The range is exactly these keys: what still differs, with
            // its kind as it is now.
            differences = diff(shape, &a, &b);
        }
        Ok(differences)
    }

    /// Without the stream: compare, and re-check a differing chunk a few
    /// times in case the difference was in flight.
    async fn chunk_rechecked(
        &self,
        shape: &Shape,
        range: &str,
    ) -> Result<(u64, Vec<RowDiff>), StreamError> {
        let (old, new, options) = (self.old, self.new, self.options);
        let mut rows = 0;
        let mut differences = Vec::new();
        for attempt in 0..=options.rechecks {
            let (a, b) = (
                checksum(old, &shape.table, range).await?,
                checksum(new, &shape.table, range).await?,
            );
            if attempt == 0 {
                rows = a.0 as u64;
            }
            if a == b {
                differences.clear();
                break;
            }
            differences = diff(
                shape,
                &row_hashes(old, shape, &shape.table, range).await?,
                &row_hashes(new, shape, &shape.table, range).await?,
            );
            if differences.is_empty() || attempt == options.rechecks {
                break;
            }
            tokio::time::sleep(options.recheck_delay).await;
        }
        Ok((rows, differences))
    }

    /// A table without a key, whole, as a multiset of rows: with the
    /// stream, new is read once the stream applied past old's position
    /// after old's read. Rows changed on old since can differ, and without
    /// a key nothing narrower can be locked, so a differing comparison is
    /// made again, up to `rechecks` times (`recheck_delay` apart).
    async fn keyless(&self, name: &str) -> Result<(u64, Vec<RowDiff>), StreamError> {
        let (old, new, options) = (self.old, self.new, self.options);
        let mut rows = 0;
        let mut differences = Vec::new();
        for attempt in 0..=options.rechecks {
            if attempt > 0 {
                tokio::time::sleep(options.recheck_delay).await;
            }
            let a = checksum(old, name, "true").await?;
            if let Some(stream) = self.stream {
                self.reach(stream, self.old_position().await?).await?;
            }
            let b = checksum(new, name, "true").await?;
            if attempt == 0 {
                rows = a.0 as u64;
            }
            differences = if a == b {
                Vec::new()
            } else {
                multiset_diff(old, new, name).await?
            };
            if differences.is_empty() {
                break;
            }
        }
        Ok((rows, differences))
    }
}

async fn verify_table(
    at: &Checker<'_>,
    table: &TableShape,
    saved: Option<(TableReport, Option<Vec<String>>)>,
    budget: &mut Option<u64>,
    on_chunk: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<TableReport, StreamError> {
    let (mut report, mut after) = saved.unwrap_or_else(|| {
        (
            TableReport {
                table: table.qualified(),
                rows_checked: 0,
                chunks: 0,
                chunks_this_run: 0,
                done: false,
                differences: Vec::new(),
            },
            None,
        )
    });
    if table.keyless {
        if !report.done && *budget != Some(0) {
            if let Some(b) = budget.as_mut() {
                *b -= 1;
            }
            let (rows_checked, mut differences) = at.keyless(&table.qualified()).await?;
            differences.sort();
            report = TableReport {
                table: table.qualified(),
                rows_checked,
                chunks: 1,
                chunks_this_run: 1,
                done: true,
                differences,
            };
            on_chunk(
                &report.table,
                report.rows_checked,
                report.differences.len() as u64,
            );
            save_progress(at.new, &report, None).await?;
        }
        return Ok(report);
    }
    let (old, new, options) = (at.old, at.new, at.options);
    let shape = shape(old, table).await?;
    while !report.done {
        if *budget == Some(0) {
            return Ok(report);
        }
        if let Some(b) = budget.as_mut() {
            *b -= 1;
        }
        // The chunk's upper bound: the last of the next `chunk_rows` keys on old.
        let bound_sql = format!(
            "SELECT ARRAY[{}] FROM {} WHERE {} ORDER BY {} LIMIT {}",
            shape.key_text,
            shape.table,
            shape.range(after.as_deref(), None),
            shape
                .keys
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", "),
            options.chunk_rows
        );
        let keys = old.query(&bound_sql, &[]).await?;
        let last: Option<Vec<String>> = keys.last().map(|r| r.get(0));
        // The final chunk is open-ended, so rows only on new past old's last key count.
        let upto = if (keys.len() as i64) < options.chunk_rows {
            None
        } else {
            last.clone()
        };
        let range = shape.range(after.as_deref(), upto.as_deref());
        report.chunks += 1;
        report.chunks_this_run += 1;
        let (rows_in_chunk, differences) = at.chunk(&shape, &range).await?;
        report.rows_checked += rows_in_chunk;
        on_chunk(&report.table, rows_in_chunk, differences.len() as u64);
        report.differences.extend(differences);
        report.differences.sort();
        match upto {
            None => report.done = true,
            Some(u) => after = Some(u),
        }
        save_progress(new, &report, after.as_deref()).await?;
    }
    Ok(report)
}

/// The rows (by contents) one side has more copies of than the other, one
/// entry per missing copy. Distinct rows are counted by hash first, so only
/// the rows whose counts differ cross the network as text.
async fn multiset_diff(
    old: &Client,
    new: &Client,
    table: &str,
) -> Result<Vec<RowDiff>, StreamError> {
    let sql = format!("SELECT hashtextextended({ROW_TEXT}, 0), count(*) FROM {table} t GROUP BY 1");
    let (a, b): (BTreeMap<i64, i64>, BTreeMap<i64, i64>) =
        (counts(old, &sql, &[]).await?, counts(new, &sql, &[]).await?);
    let differing: Vec<i64> = a
        .keys()
        .chain(b.keys())
        .filter(|h| a.get(h) != b.get(h))
        .copied()
        .collect();
    if differing.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {ROW_TEXT}, count(*) FROM {table} t WHERE hashtextextended({ROW_TEXT}, 0) = ANY($1) GROUP BY 1"
    );
    let (a, b): (BTreeMap<String, i64>, BTreeMap<String, i64>) = (
        counts(old, &sql, &[&differing]).await?,
        counts(new, &sql, &[&differing]).await?,
    );
    let mut out = Vec::new();
    for row in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
        let surplus = a.get(row).copied().unwrap_or(0) - b.get(row).copied().unwrap_or(0);
        let kind = if surplus > 0 {
            "missing_on_new"
        } else {
            "missing_on_old"
        };
        for _ in 0..surplus.unsigned_abs() {
            out.push(RowDiff {
                kind: kind.to_string(),
                key: BTreeMap::from([("row".to_string(), row.clone())]),
            });
        }
    }
    Ok(out)
}

/// (value, count) rows as a map.
async fn counts<K>(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<BTreeMap<K, i64>, StreamError>
where
    K: Ord + for<'a> tokio_postgres::types::FromSql<'a>,
{
    Ok(client
        .query(sql, params)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Makes new hold as many copies of each named row (by contents) of a
/// table without a key as old does; returns the copies added or removed.
async fn repair_keyless(
    old: &Client,
    new: &Client,
    table: &TableShape,
    differences: &[RowDiff],
) -> Result<u64, StreamError> {
    let name = table.qualified();
    let rows: std::collections::BTreeSet<&String> = differences
        .iter()
        .filter_map(|d| d.key.get("row"))
        .collect();
    let columns: Vec<String> = table.columns.iter().map(|(n, _)| quote_ident(n)).collect();
    let values = columns_as_text(table.columns.iter().map(|(n, _)| n));
    let count_sql = format!("SELECT count(*) FROM {name} t WHERE {ROW_TEXT} = $1");
    let mut repaired = 0;
    for row in rows {
        let on_old: i64 = old.query_one(&count_sql, &[row]).await?.get(0);
        let on_new: i64 = new.query_one(&count_sql, &[row]).await?.get(0);
        let change = if on_old > on_new {
            let current = old
                .query_one(
                    &format!(
                        "SELECT ARRAY[{}]::text[] FROM {name} t WHERE {ROW_TEXT} = $1 LIMIT 1",
                        values.join(", ")
                    ),
                    &[row],
                )
                .await?;
            let vals: Vec<Option<String>> = current.get(0);
            let tuple = format!(
                "({})",
                vals.iter()
                    .map(|v| literal_or_null(v.as_deref()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let tuples = vec![tuple; (on_old - on_new) as usize];
            format!(
                "INSERT INTO {name} ({}) OVERRIDING SYSTEM VALUE VALUES {}",
                columns.join(", "),
                tuples.join(", ")
            )
        } else if on_new > on_old {
            format!(
                "DELETE FROM {name} WHERE (tableoid, ctid) IN \
                 (SELECT tableoid, ctid FROM {name} t WHERE {ROW_TEXT} = {} LIMIT {})",
                quote_literal(row),
                on_new - on_old
            )
        } else {
            continue;
        };
        new.batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {change}; COMMIT"
        ))
        .await?;
        repaired += (on_old - on_new).unsigned_abs();
    }
    Ok(repaired)
}

/// Re-copies the rows `report` names from old to new (upsert, or delete
/// where old no longer has the row), then verifies those tables again.
pub async fn repair(
    old: &Client,
    new: &Client,
    report: &VerifyReport,
    options: &VerifyOptions,
) -> Result<(u64, VerifyReport), StreamError> {
    let tables = crate::preconditions::user_tables(old).await?;
    let mut repaired = 0u64;
    let mut touched = Vec::new();
    for t in report.tables.iter().filter(|t| !t.differences.is_empty()) {
        let Some(table) = tables.iter().find(|s| s.qualified() == t.table) else {
            continue;
        };
        touched.push(table.qualified());
        if table.keyless {
            repaired += repair_keyless(old, new, table, &t.differences).await?;
            continue;
        }
        let shape = shape(old, table).await?;
        let cols: Vec<String> = table.columns.iter().map(|(n, _)| quote_ident(n)).collect();
        let sets: Vec<String> = table
            .columns
            .iter()
            .filter(|(n, _)| !shape.keys.contains(n))
            .map(|(n, _)| format!("{0} = EXCLUDED.{0}", quote_ident(n)))
            .collect();
        let action = if sets.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        for d in &t.differences {
            let key_vals: Vec<String> = shape
                .keys
                .iter()
                .map(|k| d.key.get(k).cloned().unwrap_or_default())
                .collect();
            let cond = shape
                .keys
                .iter()
                .zip(&shape.types)
                .zip(&key_vals)
                .map(|((k, t), v)| format!("{} = {}::text::{t}", quote_ident(k), quote_literal(v)))
                .collect::<Vec<_>>()
                .join(" AND ");
            // The row as old has it now, as text values.
            let values = columns_as_text(table.columns.iter().map(|(n, _)| n));
            let current = old
                .query_opt(
                    &format!(
                        "SELECT ARRAY[{}] FROM {} WHERE {cond}",
                        values.join(", "),
                        shape.table
                    ),
                    &[],
                )
                .await?;
            let sql = match current {
                None => format!(
                    "BEGIN; SET LOCAL session_replication_role = replica; DELETE FROM {} WHERE {cond}; COMMIT",
                    shape.table
                ),
                Some(row) => {
                    let vals: Vec<Option<String>> = row.get(0);
                    let literals: Vec<String> = vals
                        .iter()
                        .map(|v| literal_or_null(v.as_deref()))
                        .collect();
                    format!(
                        "BEGIN; SET LOCAL session_replication_role = replica; \
                         INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({}) ON CONFLICT {} {action}; COMMIT",
                        shape.table,
                        cols.join(", "),
                        literals.join(", "),
                        shape.key_tuple
                    )
                }
            };
            new.batch_execute(&sql).await?;
            repaired += 1;
        }
    }
    let again = verify(
        old,
        new,
        &VerifyOptions {
            tables: touched,
            resume: false,
            max_chunks: None,
            ..options.clone()
        },
    )
    .await?;
    Ok((repaired, again))
}
