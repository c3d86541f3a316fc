//! The hot loop: bytes from the client to its backend session and back.
//!
//! Each direction reads into its own buffer, walks the message headers in
//! place, and writes the original bytes on in one write per read. Bodies are
//! streamed through without being buffered whole, except the few backend
//! messages whose contents the proxy needs (ReadyForQuery, ParameterStatus,
//! ErrorResponse), which are small. The two directions run concurrently, so
//! a client pushing COPY data never blocks notices or NOTIFY coming back.
//!
//! While a change stream runs, the client direction hands each unit (a
//! simple Query, or an extended-protocol batch up to Sync) to the router
//! first, which may serve a read on the secondary; the backend direction
//! holds a commit's ReadyForQuery until the secondary has applied it.

use crate::route::{Router, UnitStart};
use crate::traffic::Traffic;
use bytes::{Buf, BytesMut};
use cutover_backend::connection::set_param;
use cutover_control::BackendMetrics;
use cutover_wire::frame::{self, Frame, FrameError};
use cutover_wire::messages::ready_for_query::TransactionStatus;
use cutover_wire::messages::{parameter_status, ready_for_query, ErrorResponse};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

const READ_CHUNK: usize = 16 * 1024;

/// State both directions touch: replies still owed and the transaction status.
pub struct Shared {
    /// Query, Sync and FunctionCall messages sent minus ReadyForQuery received.
    pub outstanding: AtomicI64,
    status: AtomicU8,
    /// When the oldest outstanding request was sent (nanoseconds since
    /// `epoch`), for the latency histogram. Pipelined requests are timed from
    /// the previous reply, which is what their client waits for.
    oldest_sent: AtomicU64,
    epoch: Instant,
    /// The session counts as active at the write gate (set when a unit
    /// starts, cleared at ReadyForQuery `I` with nothing outstanding).
    pub holding: AtomicBool,
    /// Injected Parse+Sync exchanges whose replies the client must not see.
    pub swallow: AtomicU32,
    /// Per request sent (Query, Sync, FunctionCall): whether it may have
    /// written, so its ReadyForQuery knows whether a commit must wait.
    wrote: Mutex<VecDeque<bool>>,
    /// Signalled whenever no reply is outstanding.
    pub idle: Notify,
    /// The primary position the session's last write commit needs on the
    /// secondary before a read may go there.
    pub last_commit: AtomicU64,
    /// A write committed whose position has not been asked yet (async mode).
    pub commit_unknown: AtomicBool,
    /// Old's answer to a shadowed read, hashed as it passes (see shadow.rs).
    pub capture: Mutex<Option<crate::shadow::Capture>>,
    pub capturing: AtomicBool,
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            outstanding: AtomicI64::new(0),
            status: AtomicU8::new(b'I'),
            oldest_sent: AtomicU64::new(0),
            epoch: Instant::now(),
            holding: AtomicBool::new(false),
            swallow: AtomicU32::new(0),
            wrote: Mutex::new(VecDeque::new()),
            idle: Notify::new(),
            last_commit: AtomicU64::new(0),
            commit_unknown: AtomicBool::new(false),
            capture: Mutex::new(None),
            capturing: AtomicBool::new(false),
        }
    }

    fn push_wrote(&self, wrote: bool) {
        self.wrote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(wrote);
    }

    fn pop_wrote(&self) -> bool {
        self.wrote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or(true)
    }

    /// Waits until no reply is outstanding.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.outstanding.load(Ordering::SeqCst) <= 0 {
                return;
            }
            idle.await;
        }
    }

    /// Gives up the session's place at the write gate, if it holds one.
    pub fn release(&self, traffic: &Traffic) {
        if self.holding.swap(false, Ordering::SeqCst) {
            traffic.gate.leave();
        }
    }

    pub fn status(&self) -> Option<TransactionStatus> {
        TransactionStatus::from_byte(self.status.load(Ordering::Relaxed))
    }

    /// Feeds a frame of old's answer to the armed capture; ReadyForQuery
    /// completes it.
    fn capture_frame(&self, tag: u8, body: &[u8]) {
        let mut slot = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        match (tag, slot.as_mut()) {
            (b'D', Some(c)) => c.answer.row(body),
            (b'E', Some(c)) => c.answer.error(body),
            (b'Z', Some(_)) => {
                self.capturing.store(false, Ordering::Relaxed);
                if let Some(c) = slot.take() {
                    let _ = c.done.send(c.answer);
                }
            }
            _ => {}
        }
    }

    /// Arms a capture of the next answer; false when one is armed already.
    pub fn arm_capture(&self, capture: crate::shadow::Capture) -> bool {
        let mut slot = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(capture);
        self.capturing.store(true, Ordering::Relaxed);
        true
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn request_sent(&self) {
        if self.outstanding.fetch_add(1, Ordering::SeqCst) == 0 {
            self.oldest_sent.store(self.now(), Ordering::Relaxed);
        }
    }

    fn ready(&self, status: TransactionStatus, read: bool, metrics: &BackendMetrics) {
        self.status.store(status.byte(), Ordering::Relaxed);
        let now = self.now();
        let sent = self.oldest_sent.swap(now, Ordering::Relaxed);
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        let seconds = now.saturating_sub(sent) as f64 / 1e9;
        metrics.duration.observe(seconds);
        if read {
            metrics.read_duration.observe(seconds);
        }
    }
}

/// Per-direction framing position.
#[derive(Default)]
pub struct Cursor {
    pub buf: BytesMut,
    /// Bytes of the current message still to pass through unexamined.
    pub remaining: usize,
}

impl Cursor {
    /// True at a message boundary with nothing buffered.
    pub fn is_clean(&self) -> bool {
        self.remaining == 0 && self.buf.is_empty()
    }

    /// Moves `pos` past what is buffered of the message being streamed
    /// through, then reads the next header. None when the buffer ends first
    /// (inside a message, or with fewer than 5 bytes of the next header).
    pub(crate) fn next_header(
        &mut self,
        pos: &mut usize,
        max: usize,
    ) -> Option<Result<Frame, FrameError>> {
        let avail = self.buf.len() - *pos;
        let take = self.remaining.min(avail);
        *pos += take;
        self.remaining -= take;
        if self.remaining > 0 || self.buf.len() - *pos < 5 {
            return None;
        }
        let h = &self.buf[*pos..*pos + 5];
        Some(frame::header([h[0], h[1], h[2], h[3], h[4]], max))
    }
}

/// The client side's framing, plus whether an extended-protocol batch is open.
#[derive(Default)]
pub struct ClientCursor {
    pub cursor: Cursor,
    /// True after Parse/Bind/Describe/Execute/Close/Flush until the next Sync.
    pub unsynced: bool,
    /// Inside a unit of work: after Parse/Bind/Describe/Execute/Close until
    /// the Sync or Flush that ends it. Units start only outside one.
    pub in_unit: bool,
}

/// How the client direction ended.
#[derive(Debug)]
pub enum ClientEnd {
    Terminated,
    Disconnected,
    /// The primary changed (promote or rollback) and the session is at a
    /// clean boundary: reconnect it to the new primary, then go on.
    SwitchPrimary,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("invalid frontend message type {0}")]
    UnknownType(u8),
    #[error("client i/o: {0}")]
    ClientIo(std::io::Error),
    #[error("backend i/o: {0}")]
    BackendIo(std::io::Error),
}

impl From<crate::route::RouteError> for ClientError {
    fn from(e: crate::route::RouteError) -> Self {
        match e {
            crate::route::RouteError::Client(io) => ClientError::ClientIo(io),
            crate::route::RouteError::Backend(io) => ClientError::BackendIo(io),
        }
    }
}

impl ClientError {
    pub fn protocol_reason(&self) -> Option<&'static str> {
        match self {
            ClientError::Frame(e) => Some(e.reason()),
            ClientError::UnknownType(_) => Some("unknown_message_type"),
            _ => None,
        }
    }
}

/// Client → backend. Returns when the client terminates or disconnects,
/// or when the session must move to another primary.
pub async fn client_to_backend<R, W, CW>(
    client: &mut R,
    backend: &mut W,
    state: &mut ClientCursor,
    shared: &Shared,
    max_message: usize,
    metrics: &BackendMetrics,
    router: &mut Router<'_, CW>,
) -> Result<ClientEnd, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    CW: AsyncWrite + Unpin,
{
    // Whether the unit being forwarded may write (false only for reads the
    // router classified as such).
    let mut unit_writes = true;
    loop {
        let cur = &mut state.cursor;
        let mut pos = 0;
        let mut stop = None;
        loop {
            let frame = match cur.next_header(&mut pos, max_message) {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    stop = Some(Err(e.into()));
                    break;
                }
            };
            if !state.in_unit && frame.tag != b'X' && is_request_start(frame.tag) {
                // Whatever came before goes first, so replies stay in order.
                flush_to(backend, &mut cur.buf, &mut pos).await?;
                // After a Flush the primary still has the batch open: what
                // follows, up to its Sync, belongs there.
                let open_batch = state.unsynced;
                match router
                    .unit_start(&cur.buf, shared, backend, open_batch)
                    .await?
                {
                    UnitStart::Forward { writes } => unit_writes = writes,
                    UnitStart::Served { consumed } => {
                        cur.buf.advance(consumed);
                        continue;
                    }
                    UnitStart::NeedMore => break,
                    UnitStart::Switch => return Ok(ClientEnd::SwitchPrimary),
                }
            }
            match frame.tag {
                b'Q' => {
                    shared.push_wrote(unit_writes);
                    shared.request_sent();
                    metrics.simple_queries.inc();
                }
                b'S' => {
                    shared.push_wrote(unit_writes);
                    shared.request_sent();
                    state.unsynced = false;
                    state.in_unit = false;
                }
                b'F' => {
                    shared.push_wrote(true);
                    shared.request_sent();
                    metrics.function_calls.inc();
                }
                b'E' => {
                    metrics.extended_queries.inc();
                    state.unsynced = true;
                    state.in_unit = true;
                }
                b'P' | b'B' | b'D' | b'C' => {
                    state.unsynced = true;
                    state.in_unit = true;
                }
                b'H' => {
                    state.unsynced = true;
                    state.in_unit = false;
                }
                b'd' | b'c' | b'f' => {}
                b'X' => {
                    stop = Some(Ok(ClientEnd::Terminated));
                    break;
                }
                other => {
                    stop = Some(Err(ClientError::UnknownType(other)));
                    break;
                }
            }
            cur.remaining = frame.len;
        }
        // Whatever came before a Terminate or a bad message is still delivered.
        flush_to(backend, &mut cur.buf, &mut pos).await?;
        if let Some(end) = stop {
            cur.buf.clear();
            return end;
        }
        cur.buf.reserve(READ_CHUNK);
        let n = client
            .read_buf(&mut cur.buf)
            .await
            .map_err(ClientError::ClientIo)?;
        if n == 0 {
            return Ok(ClientEnd::Disconnected);
        }
        metrics.bytes_in.inc_by(n as u64);
    }
}

/// Messages that begin a unit of work when no extended batch is open.
fn is_request_start(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F'
    )
}

async fn flush_to<W: AsyncWrite + Unpin>(
    backend: &mut W,
    buf: &mut BytesMut,
    pos: &mut usize,
) -> Result<(), ClientError> {
    if *pos > 0 {
        backend
            .write_all(&buf[..*pos])
            .await
            .map_err(ClientError::BackendIo)?;
        buf.advance(*pos);
        *pos = 0;
    }
    Ok(())
}

/// How the backend direction ended.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the backend closed the connection")]
    Closed,
    #[error("backend i/o: {0}")]
    BackendIo(std::io::Error),
    #[error("client i/o: {0}")]
    ClientIo(std::io::Error),
    #[error("malformed backend message: {0}")]
    Malformed(String),
    /// Only when draining: every outstanding reply has been delivered.
    #[error("all outstanding replies delivered")]
    Drained,
}

/// What the backend direction tracks besides framing.
pub struct BackendView<'a> {
    /// The session's ParameterStatus values, kept current.
    pub params: &'a mut Vec<(String, String)>,
    /// Set when the backend sent a FATAL error (it explained itself before closing).
    pub saw_fatal: bool,
    /// Stop once no reply is outstanding (used to answer what a client sent
    /// before the message that got it disconnected).
    pub drain: bool,
}

/// Backend → client. Runs until either side fails, or, when draining, until
/// no reply is outstanding.
pub async fn backend_to_client<R, W>(
    backend: &mut R,
    client: &tokio::sync::Mutex<W>,
    cur: &mut Cursor,
    shared: &Shared,
    view: &mut BackendView<'_>,
    metrics: &BackendMetrics,
    traffic: &Traffic,
) -> BackendError
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // A write happened since the last ReadyForQuery `I`.
    let mut txn_wrote = false;
    // ReadyForQuery messages parsed but not yet written to the client: the
    // request counts as answered only once the client has its reply, so the
    // router never serves the next unit elsewhere ahead of it.
    let mut unsent = Vec::new();
    loop {
        if view.drain && shared.outstanding.load(Ordering::Relaxed) <= 0 {
            return BackendError::Drained;
        }
        cur.buf.reserve(READ_CHUNK);
        match backend.read_buf(&mut cur.buf).await {
            Ok(0) => return BackendError::Closed,
            Ok(_) => {}
            Err(e) => return BackendError::BackendIo(e),
        }
        let mut pos = 0;
        loop {
            let frame = match cur.next_header(&mut pos, usize::MAX) {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return BackendError::Malformed(e.to_string()),
            };
            let swallowing = shared.swallow.load(Ordering::SeqCst) > 0;
            let injected_reply = swallowing && matches!(frame.tag, b'1' | b'3' | b'E' | b'Z');
            let captured = frame.tag == b'D' && shared.capturing.load(Ordering::Relaxed);
            if !(injected_reply || captured || matches!(frame.tag, b'Z' | b'S' | b'E')) {
                cur.remaining = frame.len;
                continue;
            }
            if cur.buf.len() - pos < frame.len {
                break;
            }
            if injected_reply {
                // A reply to a Parse the proxy injected: drop it.
                if let Err(e) =
                    flush_and_deliver(client, cur, &mut pos, metrics, shared, traffic, &mut unsent)
                        .await
                {
                    return e;
                }
                cur.buf.advance(frame.len);
                if frame.tag == b'Z' {
                    shared.swallow.fetch_sub(1, Ordering::SeqCst);
                }
                continue;
            }
            let body = &cur.buf[pos + 5..pos + frame.len];
            if shared.capturing.load(Ordering::Relaxed) {
                shared.capture_frame(frame.tag, body);
            }
            match frame.tag {
                b'Z' => {
                    let Some(status) = ready_for_query::decode(body) else {
                        return BackendError::Malformed("bad ReadyForQuery".to_string());
                    };
                    let wrote = shared.pop_wrote();
                    txn_wrote |= wrote;
                    if status == TransactionStatus::Idle && std::mem::take(&mut txn_wrote) {
                        let plane = traffic.plane();
                        if plane.classifies() {
                            if plane.sync {
                                // Everything before this ReadyForQuery
                                // reaches the client now; the
                                // acknowledgement waits for the secondary.
                                if let Err(e) = flush_and_deliver(
                                    client,
                                    cur,
                                    &mut pos,
                                    metrics,
                                    shared,
                                    traffic,
                                    &mut unsent,
                                )
                                .await
                                {
                                    return e;
                                }
                                if let Some(lsn) = traffic.fence_commit(&plane).await {
                                    shared.last_commit.fetch_max(lsn, Ordering::SeqCst);
                                }
                            } else {
                                shared.commit_unknown.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    unsent.push((status, !wrote));
                }
                b'S' => {
                    if let Some((name, value)) = parameter_status::decode(body) {
                        set_param(view.params, name, value);
                    }
                }
                b'E' => {
                    if let Some(fields) = ErrorResponse::decode(body) {
                        if fields.severity == "FATAL" || fields.severity == "PANIC" {
                            view.saw_fatal = true;
                        }
                    }
                }
                // DataRow, examined only while a shadow capture hashes it.
                _ => {}
            }
            pos += frame.len;
        }
        if let Err(e) =
            flush_and_deliver(client, cur, &mut pos, metrics, shared, traffic, &mut unsent).await
        {
            return e;
        }
    }
}

/// Writes what is ready to the client, then counts the ReadyForQuery
/// messages it carried as answered (and, back at idle, leaves the gate).
async fn flush_and_deliver<W: AsyncWrite + Unpin>(
    client: &tokio::sync::Mutex<W>,
    cur: &mut Cursor,
    pos: &mut usize,
    metrics: &BackendMetrics,
    shared: &Shared,
    traffic: &Traffic,
    unsent: &mut Vec<(TransactionStatus, bool)>,
) -> Result<(), BackendError> {
    flush_to_client(client, cur, pos, metrics).await?;
    for (status, read) in unsent.drain(..) {
        shared.ready(status, read, metrics);
        if status == TransactionStatus::Idle && shared.outstanding.load(Ordering::SeqCst) <= 0 {
            shared.release(traffic);
            shared.idle.notify_waiters();
        }
    }
    Ok(())
}

async fn flush_to_client<W: AsyncWrite + Unpin>(
    client: &tokio::sync::Mutex<W>,
    cur: &mut Cursor,
    pos: &mut usize,
    metrics: &BackendMetrics,
) -> Result<(), BackendError> {
    if *pos > 0 {
        client
            .lock()
            .await
            .write_all(&cur.buf[..*pos])
            .await
            .map_err(BackendError::ClientIo)?;
        metrics.bytes_out.inc_by(*pos as u64);
        cur.buf.advance(*pos);
        *pos = 0;
    }
    Ok(())
}
