//! Shadow reads (`routing.shadow_percent`): a share of the reads old serves
//! also run on new, off the client's path, and the two answers are
//! compared by row count and a hash of the rows — in order when the
//! statement's outermost query has ORDER BY, as a multiset otherwise.
//!
//! Old's answer is hashed as the relay passes it to the client (the relay
//! fills a [`Capture`] while one is armed; it never waits for the shadow).
//! The shadow task then waits until new has applied everything old had
//! committed when it answered, runs the same statement on a read-only
//! session of new's pool, and counts `match`, `mismatch` or `error`. A read
//! is `skipped` when the session has uncommitted work or replies in flight,
//! when the cap on concurrent shadows is reached, or when new does not
//! catch up within a second.

use crate::traffic::CommitFence;
use bytes::{Bytes, BytesMut};
use cutover_backend::connection::read_frame;
use cutover_backend::{OnReturn, Pool, PoolKey};
use cutover_wire::messages::ErrorResponse;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, Semaphore};

/// How long new may take to reach old's position before a shadow is skipped.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Rows of each answer kept to show the first difference.
const SAMPLE_ROWS: usize = 20;
/// At most one mismatch is logged in this interval.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The shadow settings every session shares.
pub struct Shadow {
    percent: AtomicU8,
    permits: Arc<Semaphore>,
    concurrency: std::sync::atomic::AtomicU32,
    last_log: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Shadow {
    pub fn new(percent: u8, concurrency: u32) -> Shadow {
        Shadow {
            percent: AtomicU8::new(percent.min(100)),
            permits: Arc::new(Semaphore::new(concurrency.max(1) as usize)),
            concurrency: std::sync::atomic::AtomicU32::new(concurrency.max(1)),
            last_log: std::sync::Mutex::new(None),
        }
    }

    pub fn percent(&self) -> u8 {
        self.percent.load(Ordering::Relaxed)
    }

    /// `routing.shadow_percent` and `routing.shadow_concurrency` (at start
    /// and on reload; a lower cap takes the permits free now).
    pub fn configure(&self, percent: u8, concurrency: u32) {
        self.percent.store(percent.min(100), Ordering::Relaxed);
        let concurrency = concurrency.max(1);
        let before = self.concurrency.swap(concurrency, Ordering::SeqCst);
        if concurrency > before {
            self.permits.add_permits((concurrency - before) as usize);
        } else {
            self.permits.forget_permits((before - concurrency) as usize);
        }
    }

    /// A permit to run one shadow now, if the cap allows.
    pub fn permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    fn should_log(&self) -> bool {
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// One answer, hashed: rows, the hash in order, the hash as a multiset,
/// the first rows, and the error if it ended in one.
#[derive(Debug, Default)]
pub struct Answer {
    pub rows: u64,
    ordered: u64,
    unordered: u64,
    sample: Vec<Bytes>,
    pub error: Option<String>,
}

impl Answer {
    pub fn row(&mut self, body: &[u8]) {
        self.rows += 1;
        let mut h = std::hash::DefaultHasher::new();
        body.hash(&mut h);
        let row = h.finish();
        self.unordered = self.unordered.wrapping_add(row);
        let mut o = std::hash::DefaultHasher::new();
        (self.ordered, row).hash(&mut o);
        self.ordered = o.finish();
        if self.sample.len() < SAMPLE_ROWS {
            self.sample.push(Bytes::copy_from_slice(body));
        }
    }

    pub fn error(&mut self, body: &[u8]) {
        if self.error.is_none() {
            self.error = Some(ErrorResponse::decode(body).unwrap_or_default().code);
        }
    }
}

/// Old's answer being captured by the relay, and where it goes when done.
pub struct Capture {
    pub answer: Answer,
    pub done: oneshot::Sender<Answer>,
}

/// What the shadow task needs to run the statement on new.
pub struct Job {
    pub shadow: Arc<Shadow>,
    /// `shadow_reads_total`.
    pub results: cutover_control::IntCounterVec,
    pub fence: Arc<dyn CommitFence>,
    pub pool: Pool,
    pub key: PoolKey,
    pub password: Option<String>,
    /// The session's `SET`s to replay first.
    pub sets: Vec<String>,
    /// Parse messages of the named statements the unit uses, then the unit.
    pub request: Bytes,
    /// Sync or Query messages in the request (ReadyForQuery to wait for).
    pub syncs: usize,
    pub ordered: bool,
    /// The statement, for the mismatch log.
    pub sql: String,
}

/// Runs the shadow once old's answer arrives; `permit` bounds concurrency.
pub async fn run(
    job: Job,
    old: oneshot::Receiver<Answer>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let result = compare(&job, old).await;
    drop(permit);
    job.results.with_label_values(&[result]).inc();
}

async fn compare(job: &Job, old: oneshot::Receiver<Answer>) -> &'static str {
    let Ok(old) = old.await else {
        return "skipped";
    };
    // New must hold what old had committed when it answered.
    let Ok(position) = job.fence.primary_position().await else {
        return "skipped";
    };
    if !job.fence.wait_applied(position, CATCH_UP).await {
        return "skipped";
    }
    let new = match run_on_new(job).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::debug!(error = %e, "shadow read could not run on new");
            return "error";
        }
    };
    let same = match (&old.error, &new.error) {
        (Some(a), Some(b)) => a == b,
        (None, None) => {
            old.rows == new.rows
                && if job.ordered {
                    old.ordered == new.ordered
                } else {
                    old.unordered == new.unordered
                }
        }
        (None, Some(_)) => return "error",
        (Some(_), None) => false,
    };
    if same {
        return "match";
    }
    if job.shadow.should_log() {
        let first = first_difference(&old.sample, &new.sample, job.ordered);
        tracing::warn!(
            statement = %fingerprint(&job.sql),
            old_rows = old.rows,
            new_rows = new.rows,
            old_error = ?old.error,
            new_error = ?new.error,
            first_difference = %first,
            "shadow read mismatch"
        );
    }
    "mismatch"
}

async fn run_on_new(job: &Job) -> Result<Answer, String> {
    let mut key = job.key.clone();
    key.params.push((
        "default_transaction_read_only".to_string(),
        "on".to_string(),
    ));
    let mut checkout = job
        .pool
        .checkout(key, job.password.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let conn = checkout.conn();
    let sets: Vec<&str> = job.sets.iter().map(String::as_str).collect();
    if !sets.is_empty() {
        conn.run_quietly(&sets).await.map_err(|e| e.to_string())?;
    }
    conn.stream
        .write_all(&job.request)
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Answer::default();
    let mut buf = BytesMut::new();
    let mut ready = 0;
    while ready < job.syncs {
        let frame = read_frame(&mut conn.stream, &mut buf, usize::MAX)
            .await
            .map_err(|e| e.to_string())?;
        let msg = buf.split_to(frame.len);
        match frame.tag {
            b'D' => answer.row(&msg[5..]),
            b'E' => answer.error(&msg[5..]),
            b'Z' => ready += 1,
            _ => {}
        }
    }
    checkout.on_return(OnReturn::Reset);
    Ok(answer)
}

/// The statement with its literals blanked, cut short: what to group
/// mismatches by.
fn fingerprint(sql: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                if quoted {
                    out.push('?');
                }
            }
            _ if quoted => {}
            c if c.is_ascii_digit()
                && !out.ends_with(|p: char| p.is_alphanumeric() || p == '_') =>
            {
                if !out.ends_with('?') {
                    out.push('?');
                }
            }
            c if c.is_ascii_digit() && out.ends_with('?') => {}
            c => out.push(c),
        }
        if out.len() > 200 {
            out.push('…');
            break;
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The first row one sample has and the other lacks (at its position when
/// ordered).
fn first_difference(old: &[Bytes], new: &[Bytes], ordered: bool) -> String {
    let show = |row: &Bytes| String::from_utf8_lossy(row).replace(['\0', '\u{1}'], " ");
    if ordered {
        for i in 0..old.len().max(new.len()) {
            if old.get(i) != new.get(i) {
                return format!(
                    "row {}: old {:?}, new {:?}",
                    i + 1,
                    old.get(i).map(show),
                    new.get(i).map(show)
                );
            }
        }
    } else {
        if let Some(row) = old.iter().find(|r| !new.contains(r)) {
            return format!("only on old: {:?}", show(row));
        }
        if let Some(row) = new.iter().find(|r| !old.contains(r)) {
            return format!("only on new: {:?}", show(row));
        }
    }
    "beyond the first rows".to_string()
}

/// Whether the outermost query of the last statement in `sql` orders its
/// rows.
pub fn ordered(sql: &str) -> bool {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => match statements.last() {
            Some(sqlparser::ast::Statement::Query(q)) => q.order_by.is_some(),
            _ => false,
        },
        Err(_) => sql.to_ascii_lowercase().contains("order by"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_the_outermost_query_s() {
        assert!(ordered("SELECT * FROM t ORDER BY id"));
        assert!(!ordered("SELECT * FROM (SELECT * FROM t ORDER BY id) s"));
        assert!(!ordered("SELECT count(*) FROM t"));
    }

    #[test]
    fn answers_hash_rows_in_order_or_as_a_multiset() {
        let (mut a, mut b) = (Answer::default(), Answer::default());
        a.row(b"1");
        a.row(b"2");
        b.row(b"2");
        b.row(b"1");
        assert_eq!((a.rows, a.unordered), (b.rows, b.unordered));
        assert_ne!(a.ordered, b.ordered);
        assert_eq!(
            first_difference(&a.sample, &b.sample, true),
            "row 1: old Some(\"1\"), new Some(\"2\")"
        );
    }

    #[test]
    fn fingerprints_blank_literals() {
        assert_eq!(
            fingerprint("SELECT name FROM items WHERE id = 42 AND tag = 'x'  AND t2 = 5"),
            "SELECT name FROM items WHERE id = ? AND tag = ? AND t2 = ?"
        );
    }
}
