//! The mirroring task: preconditions, slot and publication, the consistent
//! copy, then the change stream applied to the secondary, reconnecting by
//! itself when either database goes away.

use crate::applier::{self, Applier};
use crate::copy;
use crate::pgoutput::{decode_logical, decode_replication, Logical, Lsn, ReplicationMessage};
use crate::preconditions;
use crate::replication::ReplicationConnection;
use crate::{control_client, StreamError};
use cutover_backend::ScramCache;
use cutover_config::{BackendUrl, MirrorConfig};
use cutover_control::StreamMetrics;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::Statement;

/// Batches stop growing at this many rows, so one apply stays bounded.
const MAX_BATCH_ROWS: u64 = 5_000;
/// How often the slot hears from us even when nothing happens.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Sequences are brought forward at the first quiet moment after changes
/// were applied, and at least this often.
const SEQUENCE_SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// After this long without a message while behind, ask the primary where it is.
const IDLE_PROBE: Duration = Duration::from_millis(500);
/// A batch rolled back by a deadlock or serialization failure is sent
/// again this many times in all before the session restarts.
const APPLY_ATTEMPTS: u32 = 5;
/// Back-off before reconnecting after a lost connection: doubled after
/// each failed attempt up to the cap, back to the first once streaming.
const RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct MirrorSettings {
    /// The source: a PostgreSQL server, or a SQLite file.
    pub old: BackendUrl,
    pub new: BackendUrl,
    /// Name of the slot and of the publication cutover owns.
    pub slot: String,
    pub copy: MirrorConfig,
    /// Start over from the primary's current position with a new slot and
    /// no copy: for a stream started while writes are paused and the two
    /// databases are identical (promote and rollback start the stream in
    /// the other direction this way). Restarts after that resume the slot.
    pub fresh: bool,
    /// A first start may empty tables on the secondary that hold rows
    /// cutover did not copy there (`mirror start --clear-new`).
    pub clear_new: bool,
    /// `[[schema.columns]]`, for a SQLite source's schema map.
    pub schema_columns: Vec<cutover_config::ColumnSetting>,
}

/// Where the mirroring task is.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StreamState {
    /// Preconditions, slot, copy plan.
    #[default]
    Starting,
    /// The stream runs and the initial copy is not finished.
    Copying,
    /// Every table is copied and the stream runs.
    Streaming,
    /// A connection was lost or a transient error stopped it; retrying.
    Reconnecting,
    /// An error no retry gets past; `mirror start` again after the fix.
    Failed,
}

impl StreamState {
    pub fn name(self) -> &'static str {
        match self {
            StreamState::Starting => "starting",
            StreamState::Copying => "copying",
            StreamState::Streaming => "streaming",
            StreamState::Reconnecting => "reconnecting",
            StreamState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TableCopy {
    pub table: String,
    pub rows: u64,
    /// The planner's row estimate when the copy was planned.
    pub estimated_rows: u64,
    pub done: bool,
}

/// What `/v1/status` shows of mirroring.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct MirrorStatus {
    pub state: StreamState,
    pub error: Option<String>,
    /// Last position whose changes are on the secondary.
    pub applied_lsn: Option<String>,
    /// Everything up to here is on the secondary (applied, or nothing to apply).
    pub caught_up_lsn: Option<String>,
    /// The primary's WAL end as last reported by it.
    pub primary_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub applied_transactions: u64,
    pub applied_rows: u64,
    pub copy: Vec<TableCopy>,
}

struct Shared {
    /// A SQLite source's stream and its connection to new, taken for each
    /// pass; verify holds it to compare a table at one log position.
    sqlite:
        tokio::sync::Mutex<Option<(crate::sqlite_source::SqliteSource, tokio_postgres::Client)>>,
    status: Mutex<MirrorStatus>,
    metrics: StreamMetrics,
    /// Everything at or before this position is on the secondary.
    caught_up: watch::Sender<Lsn>,
    /// The highest position a waiting commit needs; the stream asks the
    /// primary where it is when this is ahead of `caught_up`.
    wanted: watch::Sender<Lsn>,
    /// Set once the stream runs (its start position) or failed for good.
    started: watch::Sender<Option<Result<Lsn, String>>>,
    /// The fresh start has been made; reconnects resume from here on.
    fresh_done: AtomicBool,
    /// Every table is copied and the stream is running: the secondary may
    /// serve reads. Cleared the moment the stream stops.
    serving: Arc<AtomicBool>,
    scram: ScramCache,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut MirrorStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Moves to `state`; the secondary serves reads only while streaming.
    fn set_state(&self, state: StreamState, error: Option<String>) {
        self.serving
            .store(state == StreamState::Streaming, Ordering::SeqCst);
        self.metrics
            .failed
            .set(i64::from(state == StreamState::Failed));
        self.metrics
            .serving
            .set(i64::from(state == StreamState::Streaming));
        self.update(|s| {
            s.state = state;
            s.error = error;
        });
    }
}

/// A running mirror. Stopping it leaves the slot in place, so the next
/// start resumes where this one stopped.
pub struct Mirror {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Mirror {
    pub fn start(settings: MirrorSettings, metrics: StreamMetrics) -> Mirror {
        let (caught_up, _) = watch::channel(Lsn(0));
        let (wanted, _) = watch::channel(Lsn(0));
        let (started, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            sqlite: tokio::sync::Mutex::new(None),
            wanted,
            started,
            fresh_done: AtomicBool::new(false),
            serving: Arc::new(AtomicBool::new(false)),
            status: Mutex::new(MirrorStatus::default()),
            caught_up,
            scram: ScramCache::default(),
            metrics,
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(settings, shared.clone(), stopped));
        Mirror { shared, stop, task }
    }

    /// A handle that verifies a SQLite source against new while this
    /// stream runs.
    pub fn sqlite_verifier(&self) -> SqliteVerifier {
        SqliteVerifier {
            shared: self.shared.clone(),
        }
    }

    pub fn status(&self) -> MirrorStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Watches the position up to which the secondary holds every change.
    pub fn caught_up(&self) -> watch::Receiver<Lsn> {
        self.shared.caught_up.subscribe()
    }

    /// A handle that lets waiters (the proxy's commit fence) ask for a position.
    pub fn position(&self) -> StreamPosition {
        StreamPosition {
            caught_up: self.shared.caught_up.subscribe(),
            wanted: self.shared.wanted.clone(),
            serving: self.shared.serving.clone(),
        }
    }

    /// Waits until the stream runs; the error says why it cannot start.
    pub async fn wait_started(&self, timeout: Duration) -> Result<Lsn, String> {
        self.started().wait(timeout).await
    }

    /// A handle to wait for the start with, held without the mirror.
    pub fn started(&self) -> Started {
        Started {
            shared: self.shared.clone(),
        }
    }

    pub async fn stop(self) {
        self.shared.serving.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Waits for a mirror's setup to finish.
/// Verifies a SQLite source while its stream runs (see
/// [`Mirror::sqlite_verifier`]).
#[derive(Clone)]
pub struct SqliteVerifier {
    shared: Arc<Shared>,
}

impl SqliteVerifier {
    /// Compares every table of a SQLite source with new, each at one
    /// position of the change log: the stream is held while a table is
    /// compared, applied exactly up to the position of the snapshot the
    /// file's side is read from, so a write racing the compare cannot show
    /// as a difference. With sync commits on, commits wait (up to
    /// `mirror.sync_timeout_ms`) while a table is being compared.
    pub async fn verify_sqlite(
        &self,
        path: &std::path::Path,
        map: &cutover_sqlite::SchemaMap,
        pg: &tokio_postgres::Client,
        chunk_rows: usize,
    ) -> Result<Vec<SqliteCheck>, StreamError> {
        self.check_sqlite(path, map, pg, chunk_rows, false).await
    }

    /// [`SqliteVerifier::verify_sqlite`], and in each range found
    /// different the differing keys written again from the same snapshot
    /// (the stream still held), then the range compared again: the checks
    /// after repair.
    pub async fn repair_sqlite(
        &self,
        path: &std::path::Path,
        map: &cutover_sqlite::SchemaMap,
        pg: &tokio_postgres::Client,
        chunk_rows: usize,
    ) -> Result<Vec<SqliteCheck>, StreamError> {
        self.check_sqlite(path, map, pg, chunk_rows, true).await
    }

    async fn check_sqlite(
        &self,
        path: &std::path::Path,
        map: &cutover_sqlite::SchemaMap,
        pg: &tokio_postgres::Client,
        chunk_rows: usize,
        repair: bool,
    ) -> Result<Vec<SqliteCheck>, StreamError> {
        let mut checks = Vec::new();
        for table in &map.tables {
            let mut total = cutover_sqlite::convert::TableCheck {
                table: table.name.clone(),
                sqlite_rows: 0,
                postgres_rows: 0,
                sqlite_hash: 0,
                postgres_hash: 0,
                differences: Vec::new(),
            };
            let (mut after, mut repaired) = (None, 0);
            loop {
                let (check, range, fixed) = self
                    .check_range(path, table, pg, after, chunk_rows, repair)
                    .await?;
                repaired += fixed;
                total.sqlite_rows += check.sqlite_rows;
                total.postgres_rows += check.postgres_rows;
                total.sqlite_hash = total.sqlite_hash.wrapping_add(check.sqlite_hash);
                total.postgres_hash = total.postgres_hash.wrapping_add(check.postgres_hash);
                let room =
                    cutover_sqlite::convert::MAX_REPORTED.saturating_sub(total.differences.len());
                total
                    .differences
                    .extend(check.differences.into_iter().take(room));
                match range.upto {
                    Some(upto) => after = Some(upto),
                    None => break,
                }
            }
            checks.push(SqliteCheck {
                check: total,
                repaired,
            });
        }
        Ok(checks)
    }

    /// Compares (and with `repair`, repairs) the range of `chunk_rows`
    /// keys of `table` after `after`, holding the stream at the position
    /// of the snapshot the file is read from; the check, the range, and
    /// the rows repaired.
    async fn check_range(
        &self,
        path: &std::path::Path,
        table: &cutover_sqlite::Table,
        pg: &tokio_postgres::Client,
        after: Option<i64>,
        chunk_rows: usize,
        repair: bool,
    ) -> Result<
        (
            cutover_sqlite::convert::TableCheck,
            cutover_sqlite::convert::KeyRange,
            u64,
        ),
        StreamError,
    > {
        let mut held = self.shared.sqlite.lock().await;
        let Some((source, new)) = held.as_mut() else {
            return Err(StreamError::Precondition(
                "the SQLite change stream is not running yet; wait for `cutover status` to show it streaming".to_string(),
            ));
        };
        let (file, t) = (path.to_path_buf(), table.clone());
        let (conn, position, range) = tokio::task::spawn_blocking(move || {
            let conn = cutover_sqlite::open_read_only(&file)?;
            conn.execute_batch("BEGIN")?;
            let position = crate::sqlite_source::log_position(&conn)
                .map_err(cutover_sqlite::convert::ConvertError::from)?;
            let range = cutover_sqlite::convert::next_range(&conn, &t, after, chunk_rows)?;
            Ok::<_, cutover_sqlite::convert::ConvertError>((conn, position, range))
        })
        .await
        .map_err(|e| StreamError::Precondition(e.to_string()))?
        .map_err(|e| StreamError::Precondition(format!("{}: {e}", path.display())))?;
        while source.applied() < position {
            source
                .pass_until(new, MAX_BATCH_ROWS as usize, position)
                .await?;
        }
        let conn = Arc::new(Mutex::new(conn));
        let (check, repaired) =
            cutover_sqlite::convert::check_range_at(conn, table, pg, range, repair)
                .await
                .map_err(|e| StreamError::Precondition(format!("verify: {e}")))?;
        if repaired > 0 {
            tracing::info!(table = %table.name, rows = repaired, ?range, "repaired rows from the SQLite file");
        }
        Ok((check, range, repaired))
    }
}

/// One table of a SQLite verify or repair: the check (after repair, for
/// a repair) and the rows repair wrote or deleted.
pub struct SqliteCheck {
    pub check: cutover_sqlite::convert::TableCheck,
    pub repaired: u64,
}

pub struct Started {
    shared: Arc<Shared>,
}

impl Started {
    /// The stream's start position once it runs; the error says why it
    /// cannot start, or, past `timeout`, what it is still retrying.
    pub async fn wait(&self, timeout: Duration) -> Result<Lsn, String> {
        let mut started = self.shared.started.subscribe();
        let result = tokio::time::timeout(timeout, started.wait_for(|s| s.is_some())).await;
        match result {
            Ok(Ok(state)) => state
                .clone()
                .unwrap_or_else(|| Err("not started".to_string())),
            Ok(Err(_)) => Err("the mirroring task ended".to_string()),
            Err(_) => {
                let status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
                Err(format!(
                    "the change stream did not start within {} s (state {}{}); cutover keeps trying, \
                     follow it with `cutover status`",
                    timeout.as_secs(),
                    status.state.name(),
                    status
                        .error
                        .as_deref()
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                ))
            }
        }
    }
}

/// What a waiter needs of a running stream: where the secondary is, and a
/// way to ask for a position.
#[derive(Clone)]
pub struct StreamPosition {
    caught_up: watch::Receiver<Lsn>,
    wanted: watch::Sender<Lsn>,
    serving: Arc<AtomicBool>,
}

impl StreamPosition {
    /// Every table is copied and the stream runs: reads may go to the
    /// secondary. False from the moment the stream stops.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// Everything at or before this position is on the secondary.
    pub fn caught_up(&self) -> Lsn {
        *self.caught_up.borrow()
    }

    /// Waits until the secondary holds everything up to `lsn`; false on timeout.
    pub async fn wait_for(&self, lsn: Lsn, timeout: Duration) -> bool {
        if self.caught_up() >= lsn {
            return true;
        }
        self.wanted.send_if_modified(|w| {
            let ahead = lsn > *w;
            *w = (*w).max(lsn);
            ahead
        });
        let mut rx = self.caught_up.clone();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= lsn)).await;
        matches!(reached, Ok(Ok(_)))
    }
}

/// True for stream errors that no retry of the same slot can get past:
/// PostgreSQL cannot decode the slot's WAL (seen when a catalog-changing
/// transaction such as TRUNCATE races the slot's creation).
fn slot_is_wedged(e: &StreamError) -> bool {
    matches!(e, StreamError::Server { code, message, .. }
        if code == "XX000" && message.contains("could not map filenode"))
}

/// True for errors a retry can get past: lost or refused connections,
/// servers shutting down or short of resources, lock and serialization
/// conflicts, a slot still held by a previous walsender. Anything else
/// (a constraint, a permission, a missing column, a precondition) fails
/// the same way every time until someone fixes it.
fn is_transient(e: &StreamError) -> bool {
    match e {
        StreamError::Precondition(_) => false,
        StreamError::Server { code, .. } => {
            ["08", "40", "53", "55", "57", "58"].contains(&code.get(..2).unwrap_or(""))
        }
        StreamError::Connect(_)
        | StreamError::Lost(_)
        | StreamError::Protocol(_)
        | StreamError::Control(_) => true,
    }
}

async fn run(settings: MirrorSettings, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let mut rebuild = false;
    let mut delay = RETRY_DELAY;
    loop {
        let rebuilding = std::mem::take(&mut rebuild);
        let attempt = async {
            match (settings.old.sqlite_path(), settings.new.sqlite_path()) {
                (Some(path), _) => sqlite_session(path, &settings, &shared).await,
                (None, Some(path)) => sqlite_reverse_session(path, &settings, &shared).await,
                (None, None) => session(&settings, &shared, rebuilding).await,
            }
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let ran = matches!(
            shared
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state,
            StreamState::Copying | StreamState::Streaming
        );
        shared.serving.store(false, Ordering::SeqCst);
        shared.metrics.serving.set(0);
        if ran {
            delay = RETRY_DELAY;
        }
        match result {
            Ok(()) => return,
            Err(e) if slot_is_wedged(&e) => {
                tracing::warn!(error = %e, "the slot cannot be decoded; creating a new slot and copying again");
                shared.metrics.reconnects.inc();
                rebuild = true;
                shared.set_state(
                    StreamState::Reconnecting,
                    Some(format!("{e}; starting over with a new slot")),
                );
            }
            Err(e) if !is_transient(&e) => {
                let reason = e.to_string();
                tracing::error!(%reason, "mirroring stopped; fix the cause and run `cutover mirror start` again");
                shared.started.send_replace(Some(Err(reason.clone())));
                shared.set_state(StreamState::Failed, Some(reason));
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "mirroring interrupted; reconnecting");
                shared.metrics.reconnects.inc();
                shared.set_state(StreamState::Reconnecting, Some(e.to_string()));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// How often the reverse stream looks for writes made to the SQLite file
/// directly.
const FOREIGN_WRITES_CHECK: Duration = Duration::from_secs(1);

/// How often an idle SQLite stream looks at the change log again.
const SQLITE_POLL: Duration = Duration::from_millis(20);

/// Mirroring from a SQLite file: capture installed in the file, the copy
/// (each table from its own snapshot, its log position recorded), then the
/// change log applied pass after pass (see `sqlite_source`).
async fn sqlite_session(
    path: &std::path::Path,
    settings: &MirrorSettings,
    shared: &Shared,
) -> Result<(), StreamError> {
    use cutover_sqlite::{capture, convert, SchemaMap};
    let new = control_client(&settings.new, "cutover-applier").await?;
    let fresh = settings.fresh && !shared.fresh_done.load(Ordering::Relaxed);
    if fresh {
        // Started at a swap (rollback): both sides are the same, nothing to
        // copy. The position is recorded before the schema map is read, so
        // the pause does not wait for profiling the file.
        let start = crate::sqlite_source::SqliteSource::record_fresh_start(path, &new).await?;
        shared.fresh_done.store(true, Ordering::Relaxed);
        shared.started.send_replace(Some(Ok(Lsn(start as u64))));
    }
    let copier = control_client(&settings.new, "cutover-copy").await?;
    let (map, problems) = {
        let (path, columns) = (path.to_path_buf(), settings.schema_columns.clone());
        tokio::task::spawn_blocking(move || {
            let map = SchemaMap::read_file(&path, &columns, 2)
                .map_err(|e| StreamError::Precondition(format!("{}: {e}", path.display())))?;
            let conn = cutover_sqlite::Connection::open(&path)
                .map_err(|e| StreamError::Precondition(format!("{}: {e}", path.display())))?;
            conn.busy_timeout(Duration::from_secs(30))
                .map_err(|e| StreamError::Precondition(e.to_string()))?;
            let problems = capture::preconditions(&conn, &map)
                .map_err(|e| StreamError::Precondition(e.to_string()))?;
            if problems.is_empty() {
                capture::install(&conn, &map)
                    .map_err(|e| StreamError::Precondition(format!("installing capture: {e}")))?;
            }
            Ok::<_, StreamError>((map, problems))
        })
        .await
        .map_err(|e| StreamError::Precondition(e.to_string()))??
    };
    if !problems.is_empty() {
        return Err(StreamError::Precondition(problems.join("; ")));
    }
    let map = Arc::new(map);
    if settings.fresh {
        let source = crate::sqlite_source::SqliteSource::open(path, map.clone(), &new).await?;
        shared.set_state(StreamState::Streaming, None);
        *shared.sqlite.lock().await = Some((source, new));
        return sqlite_stream(shared).await;
    }
    shared.started.send_replace(Some(Ok(Lsn(0))));
    shared.update(|s| {
        s.copy = map
            .tables
            .iter()
            .map(|t| TableCopy {
                table: t.name.clone(),
                rows: 0,
                estimated_rows: t.rows(),
                done: false,
            })
            .collect();
    });
    shared.set_state(StreamState::Copying, None);
    let events = |event: convert::Event| {
        if let convert::Event::Rows { table, rows } = &event {
            shared.update(|s| {
                if let Some(c) = s.copy.iter_mut().find(|c| &c.table == table) {
                    c.rows += rows;
                }
            });
        }
        if let convert::Event::TableDone { table, rows } = event {
            shared
                .metrics
                .copy_rows
                .with_label_values(&[table.as_str()])
                .inc_by(rows);
            shared.update(|s| {
                if let Some(c) = s.copy.iter_mut().find(|c| c.table == table) {
                    c.rows = rows;
                    c.done = true;
                }
            });
        }
    };
    let options = convert::Options {
        chunk_rows: settings.copy.copy_chunk_rows,
        throttle: convert::Throttle::new(settings.copy.copy_max_rows_per_second),
    };
    let copied = convert::convert(
        path,
        &map,
        &[copier, control_client(&settings.new, "cutover-copy").await?],
        &options,
        &events,
    )
    .await
    .map_err(|e| StreamError::Precondition(format!("copying the SQLite file: {e}")))?;
    for warning in copied.warnings {
        tracing::warn!(%warning, "copy");
    }
    shared.update(|s| s.copy.iter_mut().for_each(|c| c.done = true));
    let source = crate::sqlite_source::SqliteSource::open(path, map, &new).await?;
    shared.set_state(StreamState::Streaming, None);
    *shared.sqlite.lock().await = Some((source, new));
    sqlite_stream(shared).await
}

/// Applies the SQLite change log pass after pass, publishing the position.
async fn sqlite_stream(shared: &Shared) -> Result<(), StreamError> {
    let mut wanted = shared.wanted.subscribe();
    // Where PostgreSQL is now, even behind what an earlier session
    // reported: a PostgreSQL crash takes back passes not yet flushed (see
    // `sqlite_source`), and reads must not be sent there as if it held them.
    if let Some((source, _)) = shared.sqlite.lock().await.as_ref() {
        shared.caught_up.send_replace(Lsn(source.applied() as u64));
    }
    loop {
        let (pass, applied, newest) = {
            let mut held = shared.sqlite.lock().await;
            let Some((source, new)) = held.as_mut() else {
                return Err(StreamError::Lost(
                    "the SQLite stream was taken away".to_string(),
                ));
            };
            let pass = source.pass(new, MAX_BATCH_ROWS as usize).await?;
            let applied = source.applied();
            (pass, applied, source.last_seq().await?.max(applied))
        };
        shared.caught_up.send_if_modified(|lsn| {
            let advanced = Lsn(applied as u64) > *lsn;
            *lsn = (*lsn).max(Lsn(applied as u64));
            advanced
        });
        if pass.changes > 0 {
            shared.metrics.applied_rows.inc_by(pass.changes as u64);
            shared.metrics.applied_transactions.inc();
        }
        shared.update(|s| {
            s.applied_lsn = Some(Lsn(applied as u64).to_string());
            s.caught_up_lsn = s.applied_lsn.clone();
            s.primary_lsn = Some(Lsn(newest as u64).to_string());
            s.lag_bytes = Some((newest - applied).max(0) as u64);
            if pass.changes > 0 {
                s.applied_transactions += 1;
                s.applied_rows += pass.changes as u64;
            }
        });
        if pass.changes == 0 {
            // Idle: look again soon, or at once when a commit waits.
            tokio::select! {
                _ = tokio::time::sleep(SQLITE_POLL) => {}
                _ = wanted.changed() => {}
            }
        }
    }
}

/// The reverse stream into a SQLite file (after promotion): a slot on the
/// PostgreSQL primary, created fresh at the promotion (both sides are
/// identical then, so nothing is copied), its transactions written into
/// the file by [`crate::sqlite_target::SqliteTarget`], the position kept in
/// the file. Writes made to the file directly meanwhile are reported.
async fn sqlite_reverse_session(
    path: &std::path::Path,
    settings: &MirrorSettings,
    shared: &Shared,
) -> Result<(), StreamError> {
    use crate::sqlite_target::SqliteTarget;
    let old = control_client(&settings.old, "cutover-control").await?;
    let target = Arc::new(Mutex::new(SqliteTarget::open(path)?));
    fn lock(
        t: &Arc<Mutex<crate::sqlite_target::SqliteTarget>>,
    ) -> Result<std::sync::MutexGuard<'_, crate::sqlite_target::SqliteTarget>, StreamError> {
        t.lock()
            .map_err(|_| StreamError::Protocol("the SQLite writer failed".to_string()))
    }
    let slot_exists = old
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&settings.slot],
        )
        .await?
        .is_some();
    let fresh = settings.fresh && !shared.fresh_done.load(Ordering::Relaxed);
    let mut repl = ReplicationConnection::connect(&settings.old, &shared.scram).await?;
    let recorded = lock(&target)?.applied(&settings.slot)?;
    let start = match recorded {
        Some(lsn) if slot_exists && !fresh => lsn,
        _ => {
            if !fresh {
                return Err(StreamError::Precondition(format!(
                    "the reverse stream's slot {} is gone; it cannot resume without losing changes",
                    settings.slot
                )));
            }
            preconditions::check_source(&old, &settings.old, &settings.slot).await?;
            let slot = applier::quote_ident(&settings.slot);
            if slot_exists {
                old.execute("SELECT pg_drop_replication_slot($1)", &[&settings.slot])
                    .await?;
            }
            old.batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {slot}; CREATE PUBLICATION {slot} FOR ALL TABLES"
            ))
            .await?;
            let (start, _) = create_slot(&mut repl, &slot, false).await?;
            // What the forward stream applied but left in the log is not a
            // write PostgreSQL lacks.
            let forward: Option<i64> = old
                .query_opt(
                    "SELECT (lsn - '0/0'::pg_lsn)::bigint FROM cutover.applied WHERE slot = $1",
                    &[&crate::sqlite_source::SLOT],
                )
                .await
                .ok()
                .flatten()
                .and_then(|r| r.try_get(0).ok());
            if let Some(applied) = forward {
                lock(&target)?.trim_applied(applied)?;
            }
            lock(&target)?.record(&settings.slot, start)?;
            shared.fresh_done.store(true, Ordering::Relaxed);
            start
        }
    };
    repl.start(&settings.slot, &settings.slot, start).await?;
    shared.started.send_replace(Some(Ok(start)));
    // The map after the start: PostgreSQL keeps the changes in the slot
    // meanwhile, and a promotion's pause does not wait for the profiling.
    let map = {
        let (file, columns) = (path.to_path_buf(), settings.schema_columns.clone());
        tokio::task::spawn_blocking(move || {
            cutover_sqlite::SchemaMap::read_file(&file, &columns, 2)
        })
        .await
        .map_err(|e| StreamError::Precondition(e.to_string()))?
        .map_err(|e| StreamError::Precondition(format!("{}: {e}", path.display())))?
    };
    lock(&target)?.set_map(map);
    shared.caught_up.send_if_modified(|lsn| {
        let advanced = start > *lsn;
        *lsn = (*lsn).max(start);
        advanced
    });
    shared.set_state(StreamState::Streaming, None);
    let mut in_transaction = false;
    let mut primary_end = start;
    let mut reported = 0i64;
    let mut last_check = Instant::now();
    loop {
        // Writes made to the file directly are looked for every second,
        // busy or idle.
        if last_check.elapsed() >= FOREIGN_WRITES_CHECK {
            last_check = Instant::now();
            let (count, range) = lock(&target)?.foreign_writes()?;
            if count > 0 && count != reported {
                reported = count;
                let (a, b) = range.unwrap_or((0, 0));
                let message = format!(
                    "the SQLite file was written directly after promotion: {count} row changes (change log {a}..{b}) that PostgreSQL does not have; they are kept and reach PostgreSQL only if the migration rolls back"
                );
                tracing::error!(%message, "write to the old database after promotion");
                shared.metrics.failed.set(1);
                shared.update(|s| s.error = Some(message));
            }
        }
        let next = tokio::time::timeout(IDLE_PROBE, repl.next_copy_data()).await;
        let payload = match next {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => {
                return Err(StreamError::Lost(
                    "the primary ended the stream".to_string(),
                ))
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let caught_up = *shared.caught_up.borrow();
                repl.send_status(caught_up, true).await?;
                continue;
            }
        };
        match decode_replication(&payload).map_err(|e| StreamError::Protocol(e.to_string()))? {
            ReplicationMessage::XLogData { end, data, .. } => {
                primary_end = primary_end.max(end);
                let msg = decode_logical(data).map_err(|e| StreamError::Protocol(e.to_string()))?;
                match &msg {
                    Logical::Begin { .. } => in_transaction = true,
                    Logical::Commit { .. } => in_transaction = false,
                    _ => {}
                }
                // Only a commit touches the file; it runs off the runtime.
                let applied = if matches!(msg, Logical::Commit { .. }) {
                    let (target, slot) = (target.clone(), settings.slot.clone());
                    tokio::task::spawn_blocking(move || lock(&target)?.feed(&slot, msg))
                        .await
                        .map_err(|e| StreamError::Protocol(e.to_string()))??
                } else {
                    lock(&target)?.feed(&settings.slot, msg)?
                };
                if let Some(end) = applied {
                    shared.caught_up.send_if_modified(|lsn| {
                        let advanced = end > *lsn;
                        *lsn = (*lsn).max(end);
                        advanced
                    });
                    shared.metrics.applied_transactions.inc();
                    shared.update(|s| {
                        s.applied_lsn = Some(end.to_string());
                        s.applied_transactions += 1;
                    });
                    if !repl.has_buffered_message() {
                        repl.send_status(end, false).await?;
                    }
                }
            }
            ReplicationMessage::Keepalive {
                end,
                reply_requested,
            } => {
                primary_end = primary_end.max(end);
                if !in_transaction {
                    shared.caught_up.send_if_modified(|lsn| {
                        let advanced = end > *lsn;
                        *lsn = (*lsn).max(end);
                        advanced
                    });
                }
                let caught_up = *shared.caught_up.borrow();
                shared.update(|s| {
                    s.caught_up_lsn = Some(caught_up.to_string());
                    s.primary_lsn = Some(primary_end.to_string());
                    s.lag_bytes = Some(primary_end.0.saturating_sub(caught_up.0));
                });
                if reply_requested {
                    repl.send_status(caught_up, false).await?;
                }
            }
        }
    }
}

async fn session(
    settings: &MirrorSettings,
    shared: &Shared,
    rebuild: bool,
) -> Result<(), StreamError> {
    let old = control_client(&settings.old, "cutover-control").await?;
    let new = control_client(&settings.new, "cutover-applier").await?;
    preconditions::check_target(&new, &settings.new).await?;
    new.batch_execute(applier::SCHEMA_SQL).await?;
    new.batch_execute(copy::PROGRESS_SQL).await?;
    let applied: Option<String> = new
        .query_opt(
            &format!(
                "SELECT lsn::text FROM {} WHERE slot = $1",
                applier::APPLIED_TABLE
            ),
            &[&settings.slot],
        )
        .await?
        .map(|r| r.get(0));
    let slot_exists = old
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&settings.slot],
        )
        .await?
        .is_some();
    let fresh = settings.fresh && !shared.fresh_done.load(Ordering::Relaxed);
    let resumes = !fresh && !rebuild && applied.is_some() && slot_exists;
    if !resumes {
        // Before the walsender login, so a role that may not replicate
        // gets the fix rather than a refused login retried for ever.
        preconditions::check_source(&old, &settings.old, &settings.slot).await?;
    }
    let mut repl = ReplicationConnection::connect(&settings.old, &shared.scram).await?;
    // Copy progress: metrics, and the status once the plan is known.
    let report = |table: &str, rows: u64, done: bool| {
        shared
            .metrics
            .copy_rows
            .with_label_values(&[table])
            .inc_by(rows);
        shared.update(|s| {
            if let Some(c) = s.copy.iter_mut().find(|c| c.table == table) {
                c.rows += rows;
                c.done = done;
            }
        });
    };
    let start = match (applied, slot_exists) {
        _ if fresh => {
            let start = setup(settings, &old, &new, &mut repl, slot_exists, false, &report).await?;
            shared.fresh_done.store(true, Ordering::Relaxed);
            start
        }
        (Some(lsn), true) if !rebuild => {
            let lsn: Lsn = lsn.parse().map_err(StreamError::Protocol)?;
            tracing::info!(%lsn, "resuming the change stream");
            lsn
        }
        _ => setup(settings, &old, &new, &mut repl, slot_exists, true, &report).await?,
    };
    let progress = copy::progress(&new, &settings.slot).await?;
    let copying = progress.iter().any(|p| !p.done);
    shared.update(|s| {
        s.applied_lsn = Some(start.to_string());
        s.caught_up_lsn = Some(start.to_string());
        s.copy = progress
            .iter()
            .map(|p| TableCopy {
                table: p.table.clone(),
                rows: p.rows,
                estimated_rows: p.estimated_rows,
                done: p.done,
            })
            .collect();
    });
    repl.start(&settings.slot, &settings.slot, start).await?;
    shared.caught_up.send_replace(start);
    shared.started.send_replace(Some(Ok(start)));
    let state = if copying {
        StreamState::Copying
    } else {
        StreamState::Streaming
    };
    shared.set_state(state, None);

    // The stream and the copy run together (see `copy` for why that is safe).
    let copy = async {
        copy::copy_pending(
            &settings.old,
            &settings.new,
            &settings.slot,
            &settings.copy,
            &report,
        )
        .await?;
        sync_sequences(&old, &new).await?;
        shared.set_state(StreamState::Streaming, None);
        tracing::info!("initial copy complete");
        Ok::<(), StreamError>(())
    };
    let stream = stream(settings, shared, &old, &new, &mut repl, start);
    tokio::pin!(copy, stream);
    let mut copy_finished = !copying;
    loop {
        tokio::select! {
            r = &mut copy, if !copy_finished => {
                r?;
                copy_finished = true;
            }
            r = &mut stream => return r,
        }
    }
}

/// A new start: preconditions, publication, a slot, and, in one secondary
/// transaction, what to copy and the slot's start as the applied position.
/// Returns that position.
///
/// With `copy`, the copy plan (empty tables, every table pending) and the
/// tables without a key, copied whole in the slot's exported snapshot (see
/// `copy`). Without it — a start while writes are paused and both sides
/// hold the same rows (promote, rollback) — nothing is copied.
async fn setup(
    settings: &MirrorSettings,
    old: &tokio_postgres::Client,
    new: &tokio_postgres::Client,
    repl: &mut ReplicationConnection,
    slot_exists: bool,
    copy: bool,
    report: &(dyn Fn(&str, u64, bool) + Sync),
) -> Result<Lsn, StreamError> {
    if copy {
        // Tables new lacks are created from old's definition first.
        crate::schema::create_missing(old, new).await?;
    }
    let tables = preconditions::check(old, new, &settings.new).await?;
    let slot = applier::quote_ident(&settings.slot);
    if slot_exists {
        // Left by a start that never finished, or replaced by a fresh start.
        old.execute("SELECT pg_drop_replication_slot($1)", &[&settings.slot])
            .await?;
    }
    old.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {slot}; CREATE PUBLICATION {slot} FOR ALL TABLES"
    ))
    .await?;
    let (start, snapshot) = create_slot(repl, &slot, copy).await?;
    let plan = if copy {
        let clear = copy::clear_sql(new, &settings.slot, &tables, settings.clear_new).await?;
        clear + &copy::plan_sql(old, &settings.slot, &tables).await?
    } else {
        format!(
            "DELETE FROM cutover.copy_progress WHERE slot = {};",
            applier::quote_literal(&settings.slot)
        )
    };
    let record = async {
        new.batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {plan}"
        ))
        .await?;
        let copied = match &snapshot {
            Some(snapshot) if tables.iter().any(|t| t.keyless) => {
                copy::copy_keyless(
                    &settings.old,
                    new,
                    snapshot,
                    &settings.slot,
                    &tables,
                    &settings.copy,
                    report,
                )
                .await?
            }
            _ => String::new(),
        };
        new.batch_execute(&format!(
            "{copied}INSERT INTO {} (slot, lsn) VALUES ({}, '{start}') \
             ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, applied_at = now(); COMMIT",
            applier::APPLIED_TABLE,
            applier::quote_literal(&settings.slot)
        ))
        .await?;
        Ok::<(), StreamError>(())
    };
    if let Err(e) = record.await {
        let _ = new.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    tracing::info!(%start, tables = tables.len(), copy, "slot created; the stream starts here");
    Ok(start)
}

/// Creates the slot; returns its start and, with `export`, the snapshot
/// that sees exactly what committed before that start (valid until the
/// replication connection runs its next command).
async fn create_slot(
    repl: &mut ReplicationConnection,
    slot: &str,
    export: bool,
) -> Result<(Lsn, Option<String>), StreamError> {
    let snapshot = if export {
        "EXPORT_SNAPSHOT"
    } else {
        "NOEXPORT_SNAPSHOT"
    };
    let rows = repl
        .command(&format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput {snapshot}"
        ))
        .await?;
    let row = rows.first();
    let start = row
        .and_then(|r| r.get(1).cloned().flatten())
        .ok_or_else(|| {
            StreamError::Protocol("CREATE_REPLICATION_SLOT returned no position".to_string())
        })?
        .parse()
        .map_err(StreamError::Protocol)?;
    Ok((start, row.and_then(|r| r.get(2).cloned().flatten())))
}

/// Drops cutover's slot and publication named `slot` on `url`'s database,
/// if they exist (finalize, and the stream a promote or rollback replaced).
pub async fn drop_slot(url: &BackendUrl, slot: &str) -> Result<(), StreamError> {
    let client = control_client(url, "cutover-control").await?;
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots              WHERE slot_name = $1 AND NOT active",
            &[&slot],
        )
        .await?;
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            applier::quote_ident(slot)
        ))
        .await?;
    Ok(())
}

/// Brings every sequence on `to` forward to its value on `from` (promote
/// and rollback run this while writes are paused).
pub async fn carry_sequences(from: &BackendUrl, to: &BackendUrl) -> Result<(), StreamError> {
    // A SQLite file continues its ids past its largest by itself.
    if to.sqlite_path().is_some() {
        return Ok(());
    }
    if let Some(path) = from.sqlite_path() {
        return carry_sqlite_ids(path, to).await;
    }
    let from = control_client(from, "cutover-control").await?;
    let to = control_client(to, "cutover-control").await?;
    sync_sequences(&from, &to).await
}

/// A SQLite file's next ids (past its largest id and AUTOINCREMENT's
/// memory of deleted newest ones) onto PostgreSQL's identities, never
/// moving one back.
async fn carry_sqlite_ids(path: &std::path::Path, to: &BackendUrl) -> Result<(), StreamError> {
    let file = path.to_path_buf();
    let ids: Vec<(String, String, i64)> = tokio::task::spawn_blocking(move || {
        let conn = cutover_sqlite::open_read_only(&file).map_err(|e| e.to_string())?;
        // The rowid aliases from the declarations alone (no profiling: this
        // runs inside a promotion's pause).
        let aliases = cutover_sqlite::schema_map::rowid_aliases(&conn).map_err(|e| e.to_string())?;
        let mut ids = Vec::new();
        for (table, alias) in aliases {
            let max: i64 = conn
                .query_row(
                    &format!(
                        "SELECT max(coalesce((SELECT max({}) FROM {}), 0), coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0))",
                        cutover_sqlite::schema_map::quote(&alias),
                        cutover_sqlite::schema_map::quote(&table)
                    ),
                    [&table],
                    |r| r.get(0),
                )
                .or_else(|_| {
                    conn.query_row(
                        &format!(
                            "SELECT coalesce(max({}), 0) FROM {}",
                            cutover_sqlite::schema_map::quote(&alias),
                            cutover_sqlite::schema_map::quote(&table)
                        ),
                        [],
                        |r| r.get(0),
                    )
                })
                .map_err(|e| e.to_string())?;
            ids.push((table, alias, max));
        }
        Ok::<_, String>(ids)
    })
    .await
    .map_err(|e| StreamError::Precondition(e.to_string()))?
    .map_err(|e| StreamError::Precondition(format!("{}: {e}", path.display())))?;
    let to = control_client(to, "cutover-control").await?;
    for (table, column, max) in ids {
        if max < 1 {
            continue;
        }
        to.execute(
            "SELECT setval(s, greatest($3, (SELECT last_value FROM pg_sequences \
               WHERE format('%I.%I', schemaname, sequencename) = s::text)), true) \
             FROM (SELECT pg_get_serial_sequence(quote_ident($1), $2)::regclass AS s) q WHERE s IS NOT NULL",
            &[&table, &column, &max],
        )
        .await?;
    }
    Ok(())
}

/// Moves every sequence on the secondary forward to the primary's value.
/// Logical replication carries rows, not sequence advances, so this runs
/// after the copy and again whenever the stream is idle.
async fn sync_sequences(
    old: &tokio_postgres::Client,
    new: &tokio_postgres::Client,
) -> Result<(), StreamError> {
    let sequences = old
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences \
             WHERE last_value IS NOT NULL AND schemaname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .await?;
    for seq in sequences {
        let (name, value): (String, i64) = (seq.get(0), seq.get(1));
        new.execute(
            "SELECT setval(s, greatest($2, (SELECT last_value FROM pg_sequences \
               WHERE format('%I.%I', schemaname, sequencename) = $1)), true) \
             FROM (SELECT $1::text::regclass AS s) q WHERE to_regclass($1) IS NOT NULL",
            &[&name, &value],
        )
        .await?;
    }
    Ok(())
}

/// What woke the stream loop.
enum Event {
    /// The batch in flight finished on the secondary.
    Applied(Result<Applied, StreamError>),
    /// A message from the primary, or none within the idle probe.
    Message(Result<Result<Option<bytes::BytesMut>, StreamError>, tokio::time::error::Elapsed>),
    /// A commit waits for a position.
    Wanted,
}

async fn stream(
    settings: &MirrorSettings,
    shared: &Shared,
    old: &tokio_postgres::Client,
    new: &tokio_postgres::Client,
    repl: &mut ReplicationConnection,
    start: Lsn,
) -> Result<(), StreamError> {
    let mut applier = Applier::new(&settings.slot, start);
    let mut statements = Statements::default();
    // One batch is applied on the secondary while the next one is received
    // and built; never more, so a failed batch cannot be followed by a
    // later one (commit order) — the session restarts from the recorded
    // position instead.
    let mut in_flight: Option<InFlight<'_>> = None;
    let mut primary_end = start;
    let mut caught_up_at = Instant::now();
    let mut last_status = Instant::now();
    let mut last_sequence_sync = Instant::now();
    let mut applied_at_sequence_sync = start;
    let mut wanted = shared.wanted.subscribe();
    loop {
        let event = tokio::select! {
            r = async {
                match in_flight.as_mut() {
                    Some(batch) => batch.done.as_mut().await,
                    None => std::future::pending().await,
                }
            } => Event::Applied(r),
            next = tokio::time::timeout(IDLE_PROBE, repl.next_copy_data()) => Event::Message(next),
            _ = wanted.changed() => Event::Wanted,
        };
        let mut reply = false;
        let mut keepalive = false;
        let next = match event {
            Event::Applied(result) => {
                committed(shared, &mut applier, result?);
                // Keep the secondary busy: whatever whole transactions
                // arrived meanwhile go next.
                in_flight = start_batch(new, &mut applier, &mut statements).await?;
                reply = true;
                // A commit that asked while this batch was in flight may
                // wait for a position past it.
                probe_if_wanted(shared, &applier, in_flight.is_some(), &mut wanted, repl).await?;
                None
            }
            Event::Wanted => {
                probe_if_wanted(shared, &applier, in_flight.is_some(), &mut wanted, repl).await?;
                continue;
            }
            Event::Message(next) => Some(next),
        };
        if let Some(next) = next {
            let payload = match next {
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None)) => {
                    return Err(StreamError::Lost(
                        "the primary ended the stream".to_string(),
                    ))
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    apply_all(shared, new, &mut applier, &mut statements, &mut in_flight).await?;
                    let applied_since = applier.applied() != applied_at_sequence_sync;
                    if applied_since || last_sequence_sync.elapsed() >= SEQUENCE_SYNC_INTERVAL {
                        sync_sequences(old, new).await?;
                        last_sequence_sync = Instant::now();
                        applied_at_sequence_sync = applier.applied();
                    }
                    // Quiet: have the primary tell us its WAL end, so lag can
                    // reach zero without waiting for its own keepalive.
                    let caught_up = *shared.caught_up.borrow();
                    repl.send_status(caught_up, true).await?;
                    last_status = Instant::now();
                    continue;
                }
            };
            match decode_replication(&payload).map_err(|e| StreamError::Protocol(e.to_string()))? {
                ReplicationMessage::XLogData { end, data, .. } => {
                    primary_end = primary_end.max(end);
                    let msg =
                        decode_logical(data).map_err(|e| StreamError::Protocol(e.to_string()))?;
                    let msg = match msg {
                        Logical::Relation(rel) => {
                            Logical::Relation(resolve_identity(old, rel).await?)
                        }
                        other => other,
                    };
                    if applier.feed(msg)? && applier.batch.rows >= MAX_BATCH_ROWS {
                        // Full: build this batch (it is sent when first
                        // polled), wait for the one in flight, then send it.
                        let next = start_batch(new, &mut applier, &mut statements).await?;
                        if let Some(batch) = in_flight.take() {
                            committed(shared, &mut applier, batch.done.await?);
                        }
                        in_flight = next;
                        reply = true;
                    }
                }
                ReplicationMessage::Keepalive {
                    end,
                    reply_requested,
                } => {
                    primary_end = primary_end.max(end);
                    reply = reply_requested;
                    keepalive = true;
                    // Apply what is pending before claiming to be caught up.
                    if applier.batch.end_lsn.is_some() || in_flight.is_some() {
                        apply_all(shared, new, &mut applier, &mut statements, &mut in_flight)
                            .await?;
                    }
                    if !applier.in_transaction() && applier.batch.end_lsn.is_none() {
                        // Nothing pending: the secondary holds everything up to `end`.
                        shared.caught_up.send_if_modified(|lsn| {
                            let advanced = end > *lsn;
                            *lsn = (*lsn).max(end);
                            advanced
                        });
                    }
                }
            }
            // Batch whatever has already arrived; send it once the buffer
            // is empty and the secondary is free.
            if applier.batch.end_lsn.is_some()
                && in_flight.is_none()
                && !repl.has_buffered_message()
            {
                in_flight = start_batch(new, &mut applier, &mut statements).await?;
            }
        }
        // Transactions arrive in commit order, each after its commit: every
        // transaction committed before the earliest one received and not
        // yet applied has been received, and so applied. Everything up to
        // one byte short of that one's commit record is on the secondary
        // (confirming that to the slot never skips it).
        let in_flight_first = in_flight.as_ref().and_then(|f| f.first_commit);
        if let Some(first) = in_flight_first.or(applier.earliest_pending()) {
            let below = Lsn(first.0.saturating_sub(1));
            shared.caught_up.send_if_modified(|lsn| {
                let advanced = below > *lsn;
                *lsn = (*lsn).max(below);
                advanced
            });
        }
        // Lag changes only when something was applied or the primary said
        // where it is; publishing it per row change would cost a lock and
        // two allocations each.
        let status_due = last_status.elapsed() >= STATUS_INTERVAL;
        if !(reply || keepalive || status_due) {
            continue;
        }
        let caught_up = *shared.caught_up.borrow();
        if caught_up >= primary_end {
            caught_up_at = Instant::now();
        }
        let lag_bytes = primary_end.0.saturating_sub(caught_up.0);
        let lag_seconds = if caught_up >= primary_end {
            0.0
        } else {
            caught_up_at.elapsed().as_secs_f64()
        };
        shared.metrics.lag_bytes.set(lag_bytes as i64);
        shared.metrics.lag_seconds.set(lag_seconds);
        shared.update(|s| {
            s.caught_up_lsn = Some(caught_up.to_string());
            s.primary_lsn = Some(primary_end.to_string());
            s.lag_bytes = Some(lag_bytes);
            s.lag_seconds = Some(lag_seconds);
        });
        if reply || status_due {
            repl.send_status(caught_up, false).await?;
            last_status = Instant::now();
        }
    }
}

/// A commit waits for a position past what we know is on the secondary:
/// with nothing pending, ask the primary where it is (its keepalive reply
/// moves the caught-up position over WAL that carries no changes).
async fn probe_if_wanted(
    shared: &Shared,
    applier: &Applier,
    in_flight: bool,
    wanted: &mut watch::Receiver<Lsn>,
    repl: &mut ReplicationConnection,
) -> Result<(), StreamError> {
    let idle = !applier.in_transaction() && applier.batch.end_lsn.is_none() && !in_flight;
    let caught_up = *shared.caught_up.borrow();
    if idle && *wanted.borrow_and_update() > caught_up {
        repl.send_status(caught_up, true).await?;
    }
    Ok(())
}

/// With `REPLICA IDENTITY FULL` pgoutput flags every column as part of the
/// identity. For a table with a primary key the applier matches and
/// upserts by that key, so take the key columns from the primary's catalog;
/// a table without one is matched by whole rows, for which the applier
/// needs each column's type.
async fn resolve_identity(
    old: &tokio_postgres::Client,
    mut rel: crate::pgoutput::Relation,
) -> Result<crate::pgoutput::Relation, StreamError> {
    if rel.identity != b'f' {
        return Ok(rel);
    }
    let table = format!(
        "{}.{}",
        applier::quote_ident(&rel.schema),
        applier::quote_ident(&rel.name)
    );
    let rows = old
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid \
                            AND i.indisprimary AND a.attnum = ANY(i.indkey)) \
             FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&table],
        )
        .await?;
    let column = |name: &str| rows.iter().find(|r| r.get::<_, String>(0) == name);
    if rows.iter().any(|r| r.get::<_, bool>(2)) {
        for c in &mut rel.columns {
            c.is_key = column(&c.name).is_some_and(|r| r.get(2));
        }
        return Ok(rel);
    }
    let types: Option<Vec<String>> = rel
        .columns
        .iter()
        .map(|c| column(&c.name).map(|r| r.get(1)))
        .collect();
    rel.keyless_types = Some(types.ok_or_else(|| {
        StreamError::Protocol(format!("the columns of {table} changed on the primary"))
    })?);
    Ok(rel)
}

/// A row value sent as a text-format parameter, whatever the column's type:
/// PostgreSQL parses it with the type's input function, exactly as it would
/// a literal, so every type round-trips as pgoutput sent it.
struct TextParam<'a>(Option<&'a str>);

impl std::fmt::Debug for TextParam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TextParam")
    }
}

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// Prepared statements on the secondary connection, by SQL text, and the
/// secondary's column types of the tables multi-row upserts write.
#[derive(Default)]
pub struct Statements {
    prepared: HashMap<String, Statement>,
    /// Multi-row upsert SQL by the single-row upsert's SQL.
    multi: HashMap<Arc<str>, Arc<str>>,
}

impl Statements {
    async fn prepare(
        &mut self,
        new: &tokio_postgres::Client,
        sql: &str,
    ) -> Result<(), StreamError> {
        if !self.prepared.contains_key(sql) {
            let statement = new.prepare(sql).await?;
            self.prepared.insert(sql.to_string(), statement);
        }
        Ok(())
    }

    /// The multi-row form of an upsert: the rows arrive as one text array
    /// per column and are cast to the secondary's column types, in order.
    async fn multi_upsert(
        &mut self,
        new: &tokio_postgres::Client,
        single_sql: &Arc<str>,
        upsert: &applier::Upsert,
    ) -> Result<Arc<str>, StreamError> {
        if let Some(sql) = self.multi.get(single_sql) {
            return Ok(sql.clone());
        }
        let rows = new
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&upsert.table],
            )
            .await?;
        let types: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut casts = Vec::new();
        let mut arrays = Vec::new();
        for (i, column) in upsert.columns.iter().enumerate() {
            let ty = types.get(column).ok_or_else(|| {
                StreamError::Precondition(format!(
                    "column {column} of {} is missing on the new database",
                    upsert.table
                ))
            })?;
            casts.push(format!("u.c{i}::{ty}"));
            arrays.push(format!("${}::text[]", i + 1));
        }
        let names: Vec<String> = (0..upsert.columns.len()).map(|i| format!("c{i}")).collect();
        let columns: Vec<String> = upsert
            .columns
            .iter()
            .map(|c| applier::quote_ident(c))
            .collect();
        let sql = format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM unnest({}) AS u({}) {}",
            upsert.table,
            columns.join(", "),
            casts.join(", "),
            arrays.join(", "),
            names.join(", "),
            upsert.conflict
        );
        self.prepare(new, &sql).await?;
        let sql: Arc<str> = sql.into();
        self.multi.insert(single_sql.clone(), sql.clone());
        Ok(sql)
    }
}

/// A batch on its way through the secondary.
struct InFlight<'a> {
    /// Commit LSN of its first transaction.
    first_commit: Option<Lsn>,
    done: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Applied, StreamError>> + Send + 'a>,
    >,
}

/// A batch the secondary committed.
struct Applied {
    batch: applier::Batch,
    statements: usize,
    started: Instant,
}

/// One statement of a batch: a single change, or one multi-row upsert
/// (indexes into the batch's ops).
enum Step {
    Single(Statement, usize),
    Merged(Statement, Vec<usize>, usize),
}

/// Takes the applier's pending batch, prepares what it needs, and returns
/// it running on the secondary; None if nothing is pending.
async fn start_batch<'a>(
    new: &'a tokio_postgres::Client,
    applier: &mut Applier,
    statements: &mut Statements,
) -> Result<Option<InFlight<'a>>, StreamError> {
    let Some(position) = applier.position_sql() else {
        return Ok(None);
    };
    let started = Instant::now();
    let batch = applier.take_batch();
    let first_commit = batch.first_commit;
    let ops = &batch.ops;
    let mut steps = Vec::new();
    for step in applier::plan(ops) {
        match step {
            applier::Step::Single(i) => {
                statements.prepare(new, &ops[i].sql).await?;
                steps.push(Step::Single(statements.prepared[&*ops[i].sql].clone(), i));
            }
            applier::Step::Upserts(rows) => {
                let first = &ops[rows[0]];
                let applier::OpKind::Upsert(upsert) = &first.kind else {
                    return Err(StreamError::Protocol(
                        "a merged step that is not an upsert".into(),
                    ));
                };
                let sql = statements.multi_upsert(new, &first.sql, upsert).await?;
                steps.push(Step::Merged(
                    statements.prepared[&*sql].clone(),
                    rows,
                    upsert.columns.len(),
                ));
            }
        }
    }
    Ok(Some(InFlight {
        first_commit,
        done: Box::pin(run_batch(new, batch, steps, position, started)),
    }))
}

/// Sends one batch as a single round trip: BEGIN, every step, then the
/// position with COMMIT (tokio-postgres sends requests in the order their
/// futures are first polled). If a change fails, the server aborts the
/// transaction and the COMMIT fails with it.
async fn send_batch(
    new: &tokio_postgres::Client,
    ops: &[applier::Op],
    steps: &[Step],
    columns: &[Vec<Vec<Option<&str>>>],
    commit: &str,
) -> Result<(), tokio_postgres::Error> {
    let begin = new.batch_execute("BEGIN; SET LOCAL session_replication_role = replica");
    let executions = steps.iter().zip(columns).map(|(step, columns)| {
        let (statement, params): (&Statement, Vec<Box<dyn ToSql + Sync + Send + '_>>) = match step {
            Step::Single(statement, i) => (
                statement,
                ops[*i]
                    .params
                    .iter()
                    .map(|p| Box::new(TextParam(p.as_deref())) as Box<dyn ToSql + Sync + Send>)
                    .collect(),
            ),
            Step::Merged(statement, ..) => (
                statement,
                columns
                    .iter()
                    .map(|c| Box::new(c) as Box<dyn ToSql + Sync + Send>)
                    .collect(),
            ),
        };
        new.execute_raw(statement, params)
    });
    let executions = futures_util::future::try_join_all(executions);
    let commit = new.batch_execute(commit);
    futures_util::future::try_join3(begin, executions, commit).await?;
    Ok(())
}

/// Applies a batch in one secondary transaction (see [`send_batch`]),
/// sending it again when a lock conflict rolled it back.
async fn run_batch(
    new: &tokio_postgres::Client,
    batch: applier::Batch,
    steps: Vec<Step>,
    position: String,
    started: Instant,
) -> Result<Applied, StreamError> {
    let ops = &batch.ops;
    // Merged upserts take one text array per column, a row per upsert.
    let columns: Vec<Vec<Vec<Option<&str>>>> = steps
        .iter()
        .map(|step| match step {
            Step::Single(..) => Vec::new(),
            Step::Merged(_, rows, width) => (0..*width)
                .map(|c| {
                    rows.iter()
                        .map(|&r| ops[r].params.get(c).and_then(|p| p.as_deref()))
                        .collect()
                })
                .collect(),
        })
        .collect();
    let commit = format!("{position}; COMMIT");
    // The copy writes the same tables on the secondary: a deadlock or
    // serialization failure between its chunk and this batch rolls the
    // batch back whole, and it is simply sent again.
    let mut attempt = 0;
    loop {
        let Err(e) = send_batch(new, ops, &steps, &columns, &commit).await else {
            break;
        };
        let _ = new.batch_execute("ROLLBACK").await;
        attempt += 1;
        let conflict = e.code().is_some_and(|c| {
            *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
                || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
        });
        if !conflict || attempt >= APPLY_ATTEMPTS {
            return Err(e.into());
        }
        tracing::debug!(attempt, error = %e, "batch rolled back by a lock conflict; applying it again");
        tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
    }
    let statements = steps.len();
    drop(columns);
    Ok(Applied {
        batch,
        statements,
        started,
    })
}

/// Records a batch the secondary committed: the applier's position, the
/// caught-up position waiters watch, metrics and status.
fn committed(shared: &Shared, applier: &mut Applier, applied: Applied) {
    let Applied {
        batch,
        statements,
        started,
    } = applied;
    if let Some(end) = batch.end_lsn {
        applier.committed(end);
    }
    let applied = applier.applied();
    shared
        .metrics
        .apply_batch_seconds
        .observe(started.elapsed().as_secs_f64());
    shared
        .metrics
        .applied_transactions
        .inc_by(batch.transactions);
    shared.metrics.applied_rows.inc_by(batch.rows);
    shared.caught_up.send_if_modified(|lsn| {
        let advanced = applied > *lsn;
        *lsn = (*lsn).max(applied);
        advanced
    });
    tracing::debug!(
        transactions = batch.transactions,
        rows = batch.rows,
        statements,
        %applied,
        elapsed = ?started.elapsed(),
        "applied batch"
    );
    shared.update(|s| {
        s.applied_lsn = Some(applied.to_string());
        s.applied_transactions += batch.transactions;
        s.applied_rows += batch.rows;
    });
}

/// Applies the applier's pending batch to `new` in one transaction that
/// also records its position, for change sources other than the
/// replication stream (the SQLite change log); the batch applied, if any.
pub async fn apply_pending(
    new: &tokio_postgres::Client,
    applier: &mut Applier,
    statements: &mut Statements,
) -> Result<Option<applier::Batch>, StreamError> {
    let Some(batch) = start_batch(new, applier, statements).await? else {
        return Ok(None);
    };
    let applied = batch.done.await?;
    if let Some(end) = applied.batch.end_lsn {
        applier.committed(end);
    }
    Ok(Some(applied.batch))
}

/// Applies everything received: the batch in flight, then what is pending.
async fn apply_all<'a>(
    shared: &Shared,
    new: &'a tokio_postgres::Client,
    applier: &mut Applier,
    statements: &mut Statements,
    in_flight: &mut Option<InFlight<'a>>,
) -> Result<(), StreamError> {
    if let Some(batch) = in_flight.take() {
        committed(shared, applier, batch.done.await?);
    }
    if let Some(batch) = start_batch(new, applier, statements).await? {
        committed(shared, applier, batch.done.await?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_undecodable_slots_are_rebuilt() {
        let wedged = StreamError::Server {
            code: "XX000".into(),
            message: "could not map filenode \"base/16385/16515\" to relation OID".into(),
            context: "replication stream".into(),
        };
        assert!(slot_is_wedged(&wedged));
        let other = StreamError::Server {
            code: "XX000".into(),
            message: "something else".into(),
            context: "replication stream".into(),
        };
        assert!(!slot_is_wedged(&other));
        assert!(!slot_is_wedged(&StreamError::Lost("gone".into())));
    }
}
