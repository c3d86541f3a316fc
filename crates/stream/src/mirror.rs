//! The mirroring task: preconditions, slot and publication, the consistent
//! copy, then the change stream applied to the secondary, reconnecting by
//! itself when either database goes away.

use crate::applier::{self, Applier};
use crate::pgoutput::{decode_logical, decode_replication, Lsn, ReplicationMessage};
use crate::preconditions::{self, TableShape};
use crate::replication::ReplicationConnection;
use crate::{control_client, StreamError};
use cutover_backend::ScramCache;
use cutover_config::BackendUrl;
use cutover_control::StreamMetrics;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Batches stop growing at this many rows, so one apply stays bounded.
const MAX_BATCH_ROWS: u64 = 5_000;
/// How often the slot hears from us even when nothing happens.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Sequences are brought forward at the first quiet moment after changes
/// were applied, and at least this often.
const SEQUENCE_SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// After this long without a message while behind, ask the primary where it is.
const IDLE_PROBE: Duration = Duration::from_millis(500);
/// Back-off before reconnecting after a lost connection.
const RETRY_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct MirrorSettings {
    pub old: BackendUrl,
    pub new: BackendUrl,
    /// Name of the slot and of the publication cutover owns.
    pub slot: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TableCopy {
    pub table: String,
    pub rows: u64,
    pub done: bool,
}

/// What `/v1/status` shows of mirroring.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct MirrorStatus {
    /// starting | copying | streaming | reconnecting | failed
    pub state: String,
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
    status: Mutex<MirrorStatus>,
    metrics: StreamMetrics,
    /// Everything at or before this position is on the secondary.
    caught_up: watch::Sender<Lsn>,
    scram: ScramCache,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut MirrorStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
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
        let shared = Arc::new(Shared {
            status: Mutex::new(MirrorStatus {
                state: "starting".to_string(),
                ..MirrorStatus::default()
            }),
            caught_up,
            scram: ScramCache::default(),
            metrics,
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(settings, shared.clone(), stopped));
        Mirror { shared, stop, task }
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

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run(settings: MirrorSettings, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    loop {
        let result = tokio::select! {
            r = session(&settings, &shared) => r,
            _ = stopped.wait_for(|s| *s) => return,
        };
        match result {
            Ok(()) => return,
            Err(StreamError::Precondition(reason)) => {
                tracing::error!(%reason, "mirroring cannot start");
                shared.update(|s| {
                    s.state = "failed".to_string();
                    s.error = Some(reason);
                });
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "mirroring interrupted; reconnecting");
                shared.metrics.reconnects.inc();
                shared.update(|s| {
                    s.state = "reconnecting".to_string();
                    s.error = Some(e.to_string());
                });
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_DELAY) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

async fn session(settings: &MirrorSettings, shared: &Shared) -> Result<(), StreamError> {
    let old = control_client(&settings.old, "cutover-control").await?;
    let new = control_client(&settings.new, "cutover-applier").await?;
    new.batch_execute(applier::SCHEMA_SQL).await?;
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
    let mut repl = ReplicationConnection::connect(&settings.old, &shared.scram).await?;
    let start = match (applied, slot_exists) {
        (Some(lsn), true) => {
            let lsn: Lsn = lsn.parse().map_err(StreamError::Protocol)?;
            tracing::info!(%lsn, "resuming the change stream");
            lsn
        }
        _ => initial_copy(settings, shared, &old, &new, &mut repl, slot_exists).await?,
    };
    repl.start(&settings.slot, &settings.slot, start).await?;
    shared.update(|s| {
        s.state = "streaming".to_string();
        s.error = None;
        s.applied_lsn = Some(start.to_string());
        s.caught_up_lsn = Some(start.to_string());
    });
    shared.caught_up.send_replace(start);
    stream(settings, shared, &old, &new, &mut repl, start).await
}

/// Creates the publication and slot, copies every table in the slot's
/// exported snapshot, sets sequences, and records the slot's consistent
/// point as the applied position. Returns that position.
async fn initial_copy(
    settings: &MirrorSettings,
    shared: &Shared,
    old: &tokio_postgres::Client,
    new: &tokio_postgres::Client,
    repl: &mut ReplicationConnection,
    slot_exists: bool,
) -> Result<Lsn, StreamError> {
    let tables =
        preconditions::check(old, new, &settings.old.address(), &settings.old.user).await?;
    let slot = applier::quote_ident(&settings.slot);
    if slot_exists {
        // A copy that never finished: its snapshot is gone, start over.
        old.execute("SELECT pg_drop_replication_slot($1)", &[&settings.slot])
            .await?;
    }
    old.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {slot}; CREATE PUBLICATION {slot} FOR ALL TABLES"
    ))
    .await?;
    let rows = repl
        .command(&format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT"
        ))
        .await?;
    let row = rows.first().ok_or_else(|| {
        StreamError::Protocol("CREATE_REPLICATION_SLOT returned no row".to_string())
    })?;
    let consistent: Lsn = row
        .get(1)
        .cloned()
        .flatten()
        .ok_or_else(|| StreamError::Protocol("no consistent point".to_string()))?
        .parse()
        .map_err(StreamError::Protocol)?;
    let snapshot = row
        .get(2)
        .cloned()
        .flatten()
        .ok_or_else(|| StreamError::Protocol("no exported snapshot".to_string()))?;
    tracing::info!(%consistent, %snapshot, tables = tables.len(), "slot created; copying");
    shared.update(|s| {
        s.state = "copying".to_string();
        s.copy = tables
            .iter()
            .map(|t| TableCopy {
                table: t.qualified(),
                rows: 0,
                done: false,
            })
            .collect();
    });

    // The snapshot lives while `repl` stays idle; copy inside it.
    let reader = control_client(&settings.old, "cutover-copy").await?;
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            applier::quote_literal(&snapshot)
        ))
        .await?;
    for (i, table) in tables.iter().enumerate() {
        let rows = copy_table(&reader, new, table).await?;
        shared.update(|s| {
            if let Some(c) = s.copy.get_mut(i) {
                c.rows = rows;
                c.done = true;
            }
        });
        shared
            .metrics
            .copy_rows
            .with_label_values(&[&table.qualified()])
            .inc_by(rows);
        tracing::info!(table = %table.qualified(), rows, "table copied");
    }
    sync_sequences(&reader, new).await?;
    reader.batch_execute("COMMIT").await?;
    new.execute(
        &format!(
            "INSERT INTO {} (slot, lsn) VALUES ($1, $2::text::pg_lsn) \
             ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, applied_at = now()",
            applier::APPLIED_TABLE
        ),
        &[&settings.slot, &consistent.to_string()],
    )
    .await?;
    Ok(consistent)
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

/// Replaces the table's contents on the secondary with the snapshot's, in
/// one transaction, streaming binary COPY from old to new.
async fn copy_table(
    reader: &tokio_postgres::Client,
    new: &tokio_postgres::Client,
    table: &TableShape,
) -> Result<u64, StreamError> {
    let name = table.qualified();
    new.batch_execute(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica; TRUNCATE {name}"
    ))
    .await?;
    let source = reader
        .copy_out(&format!("COPY {name} TO STDOUT (FORMAT binary)"))
        .await?;
    let sink = new
        .copy_in(&format!("COPY {name} FROM STDIN (FORMAT binary)"))
        .await?;
    futures_util::pin_mut!(source, sink);
    while let Some(chunk) = source.next().await {
        sink.send(chunk?).await?;
    }
    let rows = sink.as_mut().finish().await?;
    new.batch_execute("COMMIT").await?;
    Ok(rows)
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
    let mut in_transaction = false;
    let mut primary_end = start;
    let mut caught_up_at = Instant::now();
    let mut last_status = Instant::now();
    let mut last_sequence_sync = Instant::now();
    let mut applied_at_sequence_sync = start;
    loop {
        let payload = match tokio::time::timeout(IDLE_PROBE, repl.next_copy_data()).await {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => {
                return Err(StreamError::Lost(
                    "the primary ended the stream".to_string(),
                ))
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                apply(shared, new, &mut applier).await?;
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
        let mut reply = false;
        match decode_replication(&payload).map_err(|e| StreamError::Protocol(e.to_string()))? {
            ReplicationMessage::XLogData { end, data, .. } => {
                primary_end = primary_end.max(end);
                let msg = decode_logical(data).map_err(|e| StreamError::Protocol(e.to_string()))?;
                in_transaction = !matches!(msg, crate::pgoutput::Logical::Commit { .. })
                    && (in_transaction || matches!(msg, crate::pgoutput::Logical::Begin { .. }));
                if applier.feed(msg)? && applier.batch.rows >= MAX_BATCH_ROWS {
                    apply(shared, new, &mut applier).await?;
                    reply = true;
                }
            }
            ReplicationMessage::Keepalive {
                end,
                reply_requested,
            } => {
                primary_end = primary_end.max(end);
                reply = reply_requested;
                // Apply what is pending before claiming to be caught up.
                if applier.batch.end_lsn.is_some() {
                    apply(shared, new, &mut applier).await?;
                }
                if !in_transaction && applier.batch.end_lsn.is_none() {
                    // Nothing pending: the secondary holds everything up to `end`.
                    shared.caught_up.send_if_modified(|lsn| {
                        let advanced = end > *lsn;
                        *lsn = (*lsn).max(end);
                        advanced
                    });
                }
            }
        }
        // Batch whatever has already arrived; apply once the buffer is empty.
        if applier.batch.end_lsn.is_some() && !repl.has_buffered_message() {
            apply(shared, new, &mut applier).await?;
            reply = true;
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
        if reply || last_status.elapsed() >= STATUS_INTERVAL {
            repl.send_status(caught_up, false).await?;
            last_status = Instant::now();
        }
    }
}

async fn apply(
    shared: &Shared,
    new: &tokio_postgres::Client,
    applier: &mut Applier,
) -> Result<(), StreamError> {
    let Some(sql) = applier.batch_sql() else {
        return Ok(());
    };
    let started = Instant::now();
    if let Err(e) = new.batch_execute(&sql).await {
        let _ = new.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    let batch = applier.batch_committed();
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
        %applied,
        elapsed = ?started.elapsed(),
        "applied batch"
    );
    shared.update(|s| {
        s.applied_lsn = Some(applied.to_string());
        s.applied_transactions += batch.transactions;
        s.applied_rows += batch.rows;
    });
    Ok(())
}
