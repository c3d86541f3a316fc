//! The hot loop: bytes from the client to its backend session and back.
//!
//! Each direction reads into its own buffer, walks the message headers in
//! place, and writes the original bytes on in one write per read. Bodies are
//! streamed through without being buffered whole, except the few backend
//! messages whose contents the proxy needs (ReadyForQuery, ParameterStatus,
//! ErrorResponse), which are small. The two directions run concurrently, so
//! a client pushing COPY data never blocks notices or NOTIFY coming back.

use bytes::{Buf, BytesMut};
use cutover_backend::connection::set_param;
use cutover_control::BackendMetrics;
use cutover_wire::frame::{self, Frame, FrameError};
use cutover_wire::messages::ready_for_query::TransactionStatus;
use cutover_wire::messages::{parameter_status, ready_for_query, ErrorResponse};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
        }
    }

    pub fn status(&self) -> Option<TransactionStatus> {
        TransactionStatus::from_byte(self.status.load(Ordering::Relaxed))
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn request_sent(&self) {
        if self.outstanding.fetch_add(1, Ordering::Relaxed) == 0 {
            self.oldest_sent.store(self.now(), Ordering::Relaxed);
        }
    }

    fn ready(&self, status: TransactionStatus, metrics: &BackendMetrics) {
        self.status.store(status.byte(), Ordering::Relaxed);
        let now = self.now();
        let sent = self.oldest_sent.swap(now, Ordering::Relaxed);
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        metrics
            .duration
            .observe(now.saturating_sub(sent) as f64 / 1e9);
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
    fn next_header(&mut self, pos: &mut usize, max: usize) -> Option<Result<Frame, FrameError>> {
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
}

/// How the client direction ended.
#[derive(Debug)]
pub enum ClientEnd {
    Terminated,
    Disconnected,
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

impl ClientError {
    pub fn protocol_reason(&self) -> Option<&'static str> {
        match self {
            ClientError::Frame(e) => Some(e.reason()),
            ClientError::UnknownType(_) => Some("unknown_message_type"),
            _ => None,
        }
    }
}

/// Client → backend. Returns when the client terminates or disconnects.
pub async fn client_to_backend<R, W>(
    client: &mut R,
    backend: &mut W,
    state: &mut ClientCursor,
    shared: &Shared,
    max_message: usize,
    metrics: &BackendMetrics,
) -> Result<ClientEnd, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let cur = &mut state.cursor;
        cur.buf.reserve(READ_CHUNK);
        let n = client
            .read_buf(&mut cur.buf)
            .await
            .map_err(ClientError::ClientIo)?;
        if n == 0 {
            return Ok(ClientEnd::Disconnected);
        }
        metrics.bytes_in.inc_by(n as u64);
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
            match frame.tag {
                b'Q' => {
                    shared.request_sent();
                    metrics.simple_queries.inc();
                }
                b'S' => {
                    shared.request_sent();
                    state.unsynced = false;
                }
                b'F' => {
                    shared.request_sent();
                    metrics.function_calls.inc();
                }
                b'E' => {
                    metrics.extended_queries.inc();
                    state.unsynced = true;
                }
                b'P' | b'B' | b'D' | b'C' | b'H' => state.unsynced = true,
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
        if pos > 0 {
            backend
                .write_all(&cur.buf[..pos])
                .await
                .map_err(ClientError::BackendIo)?;
            cur.buf.advance(pos);
        }
        if let Some(end) = stop {
            cur.buf.clear();
            return end;
        }
    }
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
    client: &mut W,
    cur: &mut Cursor,
    shared: &Shared,
    view: &mut BackendView<'_>,
    metrics: &BackendMetrics,
) -> BackendError
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
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
            if matches!(frame.tag, b'Z' | b'S' | b'E') {
                if cur.buf.len() - pos < frame.len {
                    break;
                }
                let body = &cur.buf[pos + 5..pos + frame.len];
                match frame.tag {
                    b'Z' => match ready_for_query::decode(body) {
                        Some(status) => shared.ready(status, metrics),
                        None => return BackendError::Malformed("bad ReadyForQuery".to_string()),
                    },
                    b'S' => {
                        if let Some((name, value)) = parameter_status::decode(body) {
                            set_param(view.params, name, value);
                        }
                    }
                    _ => {
                        if let Some(fields) = ErrorResponse::decode(body) {
                            if fields.severity == "FATAL" || fields.severity == "PANIC" {
                                view.saw_fatal = true;
                            }
                        }
                    }
                }
                pos += frame.len;
            } else {
                cur.remaining = frame.len;
            }
        }
        if pos > 0 {
            if let Err(e) = client.write_all(&cur.buf[..pos]).await {
                return BackendError::ClientIo(e);
            }
            metrics.bytes_out.inc_by(pos as u64);
            cur.buf.advance(pos);
        }
    }
}
