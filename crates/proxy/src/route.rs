//! The router: what happens at the start of each unit of client work (a
//! simple Query, or an extended-protocol batch up to its Sync) while a
//! change stream runs. It keeps the session at the write gate, moves the
//! session to a new primary after promote or rollback, classifies the unit,
//! serves certain reads on the secondary under the read dial (falling back
//! to the primary on connection, read-only and undefined-object errors), and
//! prepares named statements lazily on whichever backend runs them.

use crate::classify::{Class, ClassCache};
use crate::relay;
use crate::traffic::{Plane, Traffic};
use crate::Pools;
use bytes::{BufMut, Bytes, BytesMut};
use cutover_backend::connection::read_frame;
use cutover_backend::{Checkout, OnReturn, PoolKey};
use cutover_config::RoutingStrategy;
use cutover_control::Backend;
use cutover_wire::messages::ready_for_query::{self, TransactionStatus};
use cutover_wire::messages::ErrorResponse;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// A unit larger than this is not buffered for classification; it goes to
/// the primary as it streams.
const UNIT_CAP: usize = 1 << 20;
/// Secondary replies beyond this are passed on before the read completes
/// (and can then no longer fall back to the primary).
const REPLY_BUFFER: usize = 256 * 1024;

/// What the client direction does with the unit at the head of its buffer.
pub enum UnitStart {
    /// Forward it to the primary; `writes` is false only for certain reads.
    Forward { writes: bool },
    /// Served elsewhere (the secondary); drop these bytes.
    Served { consumed: usize },
    /// The unit is not all here yet: read more, then ask again.
    NeedMore,
    /// Move the session to the new primary first.
    Switch,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("client i/o: {0}")]
    Client(std::io::Error),
    #[error("backend i/o: {0}")]
    Backend(std::io::Error),
}

/// A named (or the unnamed) prepared statement of the client's, as the
/// client sent it, and where it exists now.
struct Prepared {
    parse: Bytes,
    class: Class,
    on_primary: bool,
    on_secondary: bool,
}

/// Routing state that lives as long as the client session.
pub struct SessionRouting {
    pub key: PoolKey,
    pub password: Option<String>,
    /// The backend the session's primary connection is on.
    pub primary: Backend,
    secondary: Option<(Backend, Checkout)>,
    secondary_buf: BytesMut,
    statements: HashMap<String, Prepared>,
    /// Statements the client closed that the secondary connection still has.
    secondary_closes: Vec<String>,
    /// Session-level SETs, replayed on other connections of the session.
    pub sets: Vec<String>,
    sets_on_secondary: usize,
    cache: ClassCache,
    draw: u64,
    /// Draws for shadow reads (apart from the dial's, which a session
    /// strategy keeps fixed).
    shadow_draw: u64,
    /// Inside a `BEGIN READ ONLY` transaction served by the secondary.
    pinned_secondary: bool,
    /// The session changed settings cutover could not follow: its reads
    /// stay on the primary.
    reads_on_primary: bool,
    /// Connected to a database other than the migrated one: every byte
    /// goes to its backend session; no gate, no routing, no commit waits.
    pub passthrough: bool,
}

impl SessionRouting {
    pub fn new(id: u64, key: PoolKey, password: Option<String>, primary: Backend) -> Self {
        SessionRouting {
            key,
            password,
            primary,
            secondary: None,
            secondary_buf: BytesMut::new(),
            statements: HashMap::new(),
            secondary_closes: Vec::new(),
            sets: Vec::new(),
            sets_on_secondary: 0,
            cache: ClassCache::default(),
            draw: splitmix(id ^ 0x5eed),
            shadow_draw: splitmix(id ^ 0x5ad0),
            pinned_secondary: false,
            reads_on_primary: false,
            passthrough: false,
        }
    }

    /// The session now runs on a new primary connection: nothing prepared
    /// there yet, and the old secondary connection is on the wrong backend.
    pub fn primary_switched(&mut self, primary: Backend) {
        self.primary = primary;
        for p in self.statements.values_mut() {
            p.on_primary = false;
            p.on_secondary = false;
        }
        self.drop_secondary(OnReturn::Reset);
    }

    /// Returns the secondary connection (reset and pooled, or closed).
    pub fn drop_secondary(&mut self, how: OnReturn) {
        if let Some((_, mut checkout)) = self.secondary.take() {
            checkout.on_return(how);
        }
        self.secondary_buf.clear();
        self.sets_on_secondary = 0;
        self.secondary_closes.clear();
        for p in self.statements.values_mut() {
            p.on_secondary = false;
        }
    }
}

/// Everything the router touches for one pass of the relay.
pub struct Router<'a, W> {
    pub session: &'a mut SessionRouting,
    pub traffic: &'a Traffic,
    pub pools: &'a Pools,
    pub strategy: RoutingStrategy,
    pub client: &'a tokio::sync::Mutex<W>,
    pub max_message: usize,
}

/// A complete unit at the head of the buffer.
struct Unit {
    len: usize,
    /// ReadyForQuery replies it will produce.
    syncs: usize,
    class: Class,
    /// Statements its Binds use that it does not Parse itself.
    uses: Vec<String>,
    /// Statements it Parses.
    parses: Vec<String>,
    /// Statements it Closes.
    closes: Vec<String>,
    /// Ends with Flush, not Sync: the batch stays open on the backend that
    /// runs it, so it and what follows up to the Sync run on the primary.
    flush: bool,
}

enum Scan {
    Complete(Unit),
    Incomplete,
    /// Not routable as a unit (Flush inside a batch, FunctionCall, too big).
    Opaque,
}

/// Why a read the dial sent to the secondary ran on the primary instead.
struct Fallback(&'static str);

impl<W: AsyncWrite + Unpin> Router<'_, W> {
    pub async fn unit_start<B: AsyncWrite + Unpin>(
        &mut self,
        buf: &[u8],
        shared: &relay::Shared,
        backend: &mut B,
        open_batch: bool,
    ) -> Result<UnitStart, RouteError> {
        if self.session.passthrough {
            return Ok(UnitStart::Forward { writes: false });
        }
        let mut plane = self.traffic.plane();
        if !shared.holding.load(Ordering::SeqCst) && !open_batch {
            let clean = shared.outstanding.load(Ordering::SeqCst) <= 0;
            if clean
                && plane.state.primary != self.session.primary
                && !self.session.pinned_secondary
            {
                return Ok(UnitStart::Switch);
            }
            self.traffic.gate.enter().await;
            shared.holding.store(true, Ordering::SeqCst);
            plane = self.traffic.plane();
            if clean
                && plane.state.primary != self.session.primary
                && !self.session.pinned_secondary
            {
                shared.release(self.traffic);
                return Ok(UnitStart::Switch);
            }
        }
        if !plane.classifies() && !self.session.pinned_secondary {
            return Ok(UnitStart::Forward { writes: true });
        }
        let unit = match self.scan(buf) {
            Scan::Complete(unit) => unit,
            Scan::Incomplete if buf.len() < UNIT_CAP => return Ok(UnitStart::NeedMore),
            Scan::Incomplete | Scan::Opaque => {
                self.forget_statements_in_flight();
                return Ok(UnitStart::Forward { writes: true });
            }
        };
        let bytes = Bytes::copy_from_slice(&buf[..unit.len]);

        if self.session.pinned_secondary && !open_batch {
            return match self
                .run_on_secondary(&plane, &bytes, &unit, shared, false)
                .await?
            {
                Ok(()) => Ok(UnitStart::Served { consumed: unit.len }),
                Err(Fallback(reason)) => {
                    // Mid-transaction there is nothing to fall back to: the
                    // client saw BEGIN succeed on the secondary.
                    self.session.pinned_secondary = false;
                    tracing::warn!(reason, "lost the secondary inside a read-only transaction");
                    Err(RouteError::Backend(std::io::Error::other(format!(
                        "the secondary failed inside a read-only transaction ({reason})"
                    ))))
                }
            };
        }
        if open_batch || unit.flush {
            // Extended-protocol messages of a batch the primary holds open
            // (a driver such as asyncpg prepares with Parse/Describe/Flush,
            // then binds and syncs): they go there, and what they prepare
            // or close is tracked as on any other unit.
            if unit.class == Class::SessionChanging {
                self.session.reads_on_primary = true;
            }
            return self.forward_to_primary(unit, shared, backend, true).await;
        }
        let writes = match unit.class {
            Class::Read | Class::ReadOnlyBegin => {
                if self.choose(&plane, shared).await {
                    match self
                        .run_on_secondary(&plane, &bytes, &unit, shared, true)
                        .await?
                    {
                        Ok(()) => return Ok(UnitStart::Served { consumed: unit.len }),
                        Err(Fallback(reason)) => {
                            self.traffic
                                .metrics
                                .read_fallbacks
                                .with_label_values(&[reason])
                                .inc();
                        }
                    }
                }
                self.count_read(plane.state.primary);
                if unit.class == Class::Read {
                    self.maybe_shadow(&plane, &bytes, &unit, shared);
                }
                false
            }
            Class::SessionSet => {
                if let Some(text) = simple_query_text(&bytes) {
                    self.session.sets.push(text.to_string());
                }
                false
            }
            Class::SessionReset => {
                self.session.sets.clear();
                self.session.statements.clear();
                self.session.reads_on_primary = false;
                self.session.drop_secondary(OnReturn::Reset);
                false
            }
            Class::SessionChanging => {
                self.session.reads_on_primary = true;
                true
            }
            Class::Write => true,
        };
        self.forward_to_primary(unit, shared, backend, writes).await
    }

    /// The unit runs on the primary: prepare there what it uses and the
    /// primary lacks, then record what it closes and prepares.
    async fn forward_to_primary<B: AsyncWrite + Unpin>(
        &mut self,
        unit: Unit,
        shared: &relay::Shared,
        backend: &mut B,
        writes: bool,
    ) -> Result<UnitStart, RouteError> {
        self.prepare_on_primary(&unit, shared, backend).await?;
        for name in &unit.closes {
            if let Some(p) = self.session.statements.remove(name) {
                if p.on_secondary {
                    self.session.secondary_closes.push(name.clone());
                }
            }
        }
        for name in &unit.parses {
            if let Some(p) = self.session.statements.get_mut(name) {
                p.on_primary = true;
            }
        }
        Ok(UnitStart::Forward { writes })
    }

    /// Arms a shadow of this read, which old is about to serve, when the
    /// draw picks it (see shadow.rs); counts why not when it cannot be.
    fn maybe_shadow(&mut self, plane: &Plane, bytes: &Bytes, unit: &Unit, shared: &relay::Shared) {
        let shadow = &self.traffic.shadow;
        let percent = shadow.percent();
        if percent == 0 || plane.state.primary != Backend::Old {
            return;
        }
        self.session.shadow_draw = splitmix(self.session.shadow_draw);
        if self.session.shadow_draw % 100 >= u64::from(percent) {
            return;
        }
        let skipped = || {
            self.traffic
                .metrics
                .shadow_reads
                .with_label_values(&["skipped"])
                .inc()
        };
        let idle = shared.outstanding.load(Ordering::SeqCst) <= 0
            && shared.status() == Some(TransactionStatus::Idle);
        let (Some(fence), Some(pool)) = (plane.fence.clone(), self.pools.get(Backend::New)) else {
            return skipped();
        };
        if !idle
            || self.session.reads_on_primary
            || unit.flush
            || unit.syncs == 0
            || !fence.serving()
        {
            return skipped();
        }
        let Some(permit) = shadow.permit() else {
            return skipped();
        };
        let mut request = BytesMut::new();
        for name in unit.uses.iter().filter(|n| !unit.parses.contains(n)) {
            match self.session.statements.get(name) {
                Some(p) => request.extend_from_slice(&p.parse),
                None => return skipped(),
            }
        }
        request.extend_from_slice(bytes);
        let sql = simple_query_text(bytes)
            .map(str::to_string)
            .or_else(|| parsed_sql(&request))
            .unwrap_or_default();
        let (done, answer) = tokio::sync::oneshot::channel();
        if !shared.arm_capture(crate::shadow::Capture {
            answer: crate::shadow::Answer::default(),
            done,
        }) {
            return skipped();
        }
        let job = crate::shadow::Job {
            shadow: self.traffic.shadow.clone(),
            results: self.traffic.metrics.shadow_reads.clone(),
            fence,
            pool: pool.clone(),
            key: self.session.key.clone(),
            password: self.session.password.clone(),
            sets: self.session.sets.clone(),
            request: request.freeze(),
            syncs: unit.syncs,
            ordered: crate::shadow::ordered(&sql),
            sql,
        };
        tokio::spawn(crate::shadow::run(job, answer, permit));
    }

    fn count_read(&self, backend: Backend) {
        self.traffic
            .metrics
            .reads
            .with_label_values(&[backend.name()])
            .inc();
    }

    /// Whether this read may go to the secondary now; counts why not when
    /// the dial chose it but something stands in the way.
    async fn choose(&mut self, plane: &Plane, shared: &relay::Shared) -> bool {
        let idle = shared.outstanding.load(Ordering::SeqCst) <= 0
            && shared.status() == Some(TransactionStatus::Idle);
        if !idle {
            return false;
        }
        let draw = match self.strategy {
            RoutingStrategy::Session => self.session.draw,
            RoutingStrategy::Random => {
                self.session.draw = splitmix(self.session.draw);
                self.session.draw
            }
        };
        if self.traffic.pick(&plane.state, draw) == plane.state.primary {
            return false;
        }
        let Some(fence) = plane.fence.as_ref() else {
            return false;
        };
        let refuse = |reason: &'static str| {
            self.traffic
                .metrics
                .read_fallbacks
                .with_label_values(&[reason])
                .inc();
            false
        };
        if self.session.reads_on_primary {
            return refuse("session_state");
        }
        if !fence.serving() {
            return refuse("stream_down");
        }
        if !self.traffic.secondary_healthy() {
            return refuse("unhealthy");
        }
        if self.traffic.lagging(fence.as_ref()) {
            return refuse("lagging");
        }
        if shared.commit_unknown.swap(false, Ordering::SeqCst) {
            match fence.primary_position().await {
                Ok(lsn) => {
                    shared.last_commit.fetch_max(lsn, Ordering::SeqCst);
                }
                Err(_) => {
                    shared.commit_unknown.store(true, Ordering::SeqCst);
                    return refuse("position_unknown");
                }
            }
        }
        if fence.caught_up() < shared.last_commit.load(Ordering::SeqCst) {
            return refuse("behind_session");
        }
        true
    }

    /// Runs the unit on the secondary and passes its replies on. The outer
    /// error ends the session; the inner one sends the unit to the primary.
    /// Inside a read-only transaction already under way there (`may_fall_back`
    /// false), errors are the client's to see, as the primary would send them.
    async fn run_on_secondary(
        &mut self,
        plane: &Plane,
        bytes: &[u8],
        unit: &Unit,
        shared: &relay::Shared,
        may_fall_back: bool,
    ) -> Result<Result<(), Fallback>, RouteError> {
        let backend = plane.state.secondary();
        if self.session.secondary.as_ref().map(|(b, _)| *b) != Some(backend) {
            self.session.drop_secondary(OnReturn::Reset);
            let Some(pool) = self.pools.get(backend) else {
                return Ok(Err(Fallback("unavailable")));
            };
            let mut key = self.session.key.clone();
            key.params.push((
                "default_transaction_read_only".to_string(),
                "on".to_string(),
            ));
            match pool.checkout(key, self.session.password.as_deref()).await {
                Ok(checkout) => self.session.secondary = Some((backend, checkout)),
                Err(e) => {
                    tracing::debug!(error = %e, "no secondary session; reading from the primary");
                    return Ok(Err(Fallback("unavailable")));
                }
            }
        }
        let session = &mut *self.session;
        let Some((_, checkout)) = session.secondary.as_mut() else {
            return Ok(Err(Fallback("unavailable")));
        };
        let conn = checkout.conn();
        if session.sets_on_secondary < session.sets.len() {
            let pending: Vec<&str> = session.sets[session.sets_on_secondary..]
                .iter()
                .map(String::as_str)
                .collect();
            if conn.run_quietly(&pending).await.is_err() {
                session.drop_secondary(OnReturn::Close);
                return Ok(Err(Fallback("error")));
            }
            session.sets_on_secondary = session.sets.len();
        }
        // Lazily prepare what the unit uses, after closing what the client
        // closed, in the same batch (their replies are dropped below).
        let mut out = BytesMut::new();
        let mut swallow_close = 0;
        let mut swallow_parse = 0;
        if !session.secondary_closes.is_empty() && unit.syncs > 0 && !is_simple(bytes) {
            for name in session.secondary_closes.drain(..) {
                close_statement(&mut out, &name);
                swallow_close += 1;
            }
        }
        for name in &unit.uses {
            if let Some(p) = session.statements.get(name) {
                if !p.on_secondary {
                    out.extend_from_slice(&p.parse);
                    swallow_parse += 1;
                }
            }
        }
        out.extend_from_slice(bytes);
        // A unit ending in Flush (inside a read-only transaction pinned
        // here) gets a Sync of ours, so this batch ends where it began; its
        // ReadyForQuery is dropped. Inside a transaction block a Sync
        // commits nothing.
        let own_sync = unit.flush;
        if own_sync {
            out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        }
        let syncs = unit.syncs + usize::from(own_sync);
        if conn.stream.write_all(&out).await.is_err() {
            session.drop_secondary(OnReturn::Close);
            return Ok(Err(Fallback("connection")));
        }
        let started = std::time::Instant::now();
        let mut replies = BytesMut::new();
        let mut passed_on = false;
        let mut fallback = None;
        let mut error_cause = None;
        let mut ready = 0;
        let mut status = TransactionStatus::Idle;
        let buf = &mut session.secondary_buf;
        while ready < syncs {
            let frame = match read_frame(&mut conn.stream, buf, self.max_message).await {
                Ok(frame) => frame,
                Err(e) => {
                    if passed_on {
                        return Err(RouteError::Backend(std::io::Error::other(e.to_string())));
                    }
                    session.drop_secondary(OnReturn::Close);
                    return Ok(Err(Fallback("connection")));
                }
            };
            let msg = buf.split_to(frame.len);
            match frame.tag {
                b'1' if swallow_parse > 0 => swallow_parse -= 1,
                b'3' if swallow_close > 0 => swallow_close -= 1,
                b'S' => {}
                b'Z' if own_sync => {
                    ready += 1;
                    status = ready_for_query::decode(&msg[5..]).unwrap_or(TransactionStatus::Idle);
                }
                tag => {
                    if tag == b'E' {
                        let code = ErrorResponse::decode(&msg[5..]).unwrap_or_default().code;
                        match fallback_reason(&code) {
                            Some(reason) if !passed_on && may_fall_back => {
                                fallback.get_or_insert(reason);
                            }
                            _ => {
                                error_cause.get_or_insert(error_cause_of(&code));
                            }
                        }
                    }
                    if tag == b'Z' {
                        ready += 1;
                        status =
                            ready_for_query::decode(&msg[5..]).unwrap_or(TransactionStatus::Idle);
                    }
                    replies.extend_from_slice(&msg);
                }
            }
            if fallback.is_none() && replies.len() > REPLY_BUFFER {
                write_client(self.client, &replies).await?;
                replies.clear();
                passed_on = true;
            }
        }
        if let Some(reason) = fallback {
            // Whatever the failed attempt left prepared there is unknown now.
            session.drop_secondary(OnReturn::Reset);
            return Ok(Err(Fallback(reason)));
        }
        for name in unit.uses.iter().chain(&unit.parses) {
            if let Some(p) = session.statements.get_mut(name) {
                p.on_secondary = true;
            }
        }
        session.pinned_secondary = status != TransactionStatus::Idle;
        // Counted before the client can see the answer, so a scrape after
        // the reply always includes it.
        self.count_read(backend);
        let m = &self.traffic.metrics;
        m.read_duration
            .with_label_values(&[backend.name()])
            .observe(started.elapsed().as_secs_f64());
        if let Some(cause) = error_cause {
            m.secondary_read_errors.with_label_values(&[cause]).inc();
        }
        write_client(self.client, &replies).await?;
        if status == TransactionStatus::Idle && shared.outstanding.load(Ordering::SeqCst) <= 0 {
            shared.release(self.traffic);
        }
        Ok(Ok(()))
    }

    /// Prepares on the primary connection what the unit uses but the
    /// primary has not seen (it ran on the secondary before): a Parse and a
    /// Sync whose replies the backend direction drops.
    async fn prepare_on_primary<B: AsyncWrite + Unpin>(
        &mut self,
        unit: &Unit,
        shared: &relay::Shared,
        backend: &mut B,
    ) -> Result<(), RouteError> {
        let mut out = BytesMut::new();
        for name in &unit.uses {
            if let Some(p) = self.session.statements.get_mut(name) {
                if !p.on_primary {
                    out.extend_from_slice(&p.parse);
                    p.on_primary = true;
                }
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        shared.wait_idle().await;
        shared.swallow.fetch_add(1, Ordering::SeqCst);
        backend.write_all(&out).await.map_err(RouteError::Backend)
    }

    /// A unit that is not classified may Parse or Close anything: stop
    /// trusting what we know about statements on the primary.
    fn forget_statements_in_flight(&mut self) {
        self.session
            .statements
            .retain(|_, p| p.on_secondary && !p.on_primary);
    }

    /// A Bind or Describe of statement `name`: the unit is a read only if
    /// that statement is, and it must exist wherever the unit runs.
    fn uses_statement(&self, unit: &mut Unit, name: &str) {
        match self.session.statements.get(name) {
            Some(p) if p.class == Class::Read => {}
            _ => unit.class = Class::Write,
        }
        if !unit.parses.iter().any(|p| p == name) {
            unit.uses.push(name.to_string());
        }
    }

    fn scan(&mut self, buf: &[u8]) -> Scan {
        let mut pos = 0;
        let mut unit = Unit {
            len: 0,
            syncs: 0,
            class: Class::Read,
            uses: Vec::new(),
            parses: Vec::new(),
            closes: Vec::new(),
            flush: false,
        };
        let mut statements_seen = 0;
        let mut changes_session = false;
        loop {
            if buf.len() < pos + 5 {
                return Scan::Incomplete;
            }
            let tag = buf[pos];
            let len = u32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]])
                as usize
                + 1;
            if len < 5 || len > self.max_message {
                return Scan::Opaque;
            }
            if pos + len > UNIT_CAP {
                return Scan::Opaque;
            }
            if buf.len() < pos + len {
                return Scan::Incomplete;
            }
            let body = &buf[pos + 5..pos + len];
            pos += len;
            match tag {
                b'Q' if pos == len => {
                    let Some(text) = cstr(body).map(|(t, _)| t) else {
                        return Scan::Opaque;
                    };
                    unit.class = self.session.cache.classify(text);
                    unit.len = pos;
                    unit.syncs = 1;
                    return Scan::Complete(unit);
                }
                b'P' => {
                    let Some((name, rest)) = cstr(body) else {
                        return Scan::Opaque;
                    };
                    let Some((text, _)) = cstr(rest) else {
                        return Scan::Opaque;
                    };
                    let class = self.session.cache.classify(text);
                    if class != Class::Read {
                        unit.class = Class::Write;
                    }
                    // Session settings through the extended protocol are
                    // not replayed: the session's reads stay on the primary.
                    changes_session |= matches!(
                        class,
                        Class::SessionSet | Class::SessionChanging | Class::SessionReset
                    );
                    self.session.statements.insert(
                        name.to_string(),
                        Prepared {
                            parse: Bytes::copy_from_slice(&buf[pos - len..pos]),
                            class,
                            on_primary: false,
                            on_secondary: false,
                        },
                    );
                    unit.parses.push(name.to_string());
                    statements_seen += 1;
                }
                b'B' => {
                    let Some((_, rest)) = cstr(body) else {
                        return Scan::Opaque;
                    };
                    let Some((name, _)) = cstr(rest) else {
                        return Scan::Opaque;
                    };
                    self.uses_statement(&mut unit, name);
                    statements_seen += 1;
                }
                b'C' => {
                    unit.class = Class::Write;
                    if body.first() == Some(&b'S') {
                        if let Some((name, _)) = cstr(&body[1..]) {
                            unit.closes.push(name.to_string());
                        }
                    }
                }
                b'D' => {
                    // Describing a statement needs it where the unit runs.
                    if body.first() == Some(&b'S') {
                        let Some((name, _)) = cstr(&body[1..]) else {
                            return Scan::Opaque;
                        };
                        self.uses_statement(&mut unit, name);
                        statements_seen += 1;
                    }
                }
                b'E' => {}
                b'H' => {
                    unit.class = if changes_session {
                        Class::SessionChanging
                    } else {
                        Class::Write
                    };
                    unit.len = pos;
                    unit.flush = true;
                    return Scan::Complete(unit);
                }
                b'S' => {
                    if statements_seen == 0 {
                        unit.class = Class::Write;
                    }
                    if changes_session {
                        unit.class = Class::SessionChanging;
                    }
                    unit.len = pos;
                    unit.syncs = 1;
                    return Scan::Complete(unit);
                }
                _ => return Scan::Opaque,
            }
        }
    }
}

async fn write_client<W: AsyncWrite + Unpin>(
    client: &tokio::sync::Mutex<W>,
    bytes: &[u8],
) -> Result<(), RouteError> {
    client
        .lock()
        .await
        .write_all(bytes)
        .await
        .map_err(RouteError::Client)
}

/// The query text of the last Parse among `bytes`' messages.
fn parsed_sql(mut bytes: &[u8]) -> Option<String> {
    let mut sql = None;
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize + 1;
        if len < 5 || len > bytes.len() {
            break;
        }
        if bytes[0] == b'P' {
            if let Some((_, rest)) = cstr(&bytes[5..len]) {
                sql = cstr(rest).map(|(q, _)| q.to_string()).or(sql);
            }
        }
        bytes = &bytes[len..];
    }
    sql
}

fn is_simple(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'Q')
}

fn simple_query_text(bytes: &[u8]) -> Option<&str> {
    if !is_simple(bytes) || bytes.len() < 5 {
        return None;
    }
    cstr(&bytes[5..]).map(|(t, _)| t)
}

fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    let text = std::str::from_utf8(&b[..end]).ok()?;
    Some((text, &b[end + 1..]))
}

fn close_statement(out: &mut BytesMut, name: &str) {
    out.put_u8(b'C');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
}

/// Errors on the secondary after which the primary runs the read instead.
fn fallback_reason(code: &str) -> Option<&'static str> {
    match code {
        c if c.starts_with("08") => Some("connection"),
        "57P01" | "57P02" | "57P03" => Some("connection"),
        "25006" => Some("read_only"),
        "42P01" | "42883" | "42704" | "3F000" | "26000" | "42P02" => Some("undefined_object"),
        _ => None,
    }
}

/// Whose an error a read met on the secondary is: `client` when the
/// primary, holding the same rows, would have raised it too (the
/// statement's syntax or types, its arithmetic on the data, a cancel, a
/// serialization failure), `secondary` otherwise (permissions, resources,
/// anything else the secondary's own state caused).
fn error_cause_of(code: &str) -> &'static str {
    let client = code.starts_with("22")
        || code.starts_with("40")
        || matches!(
            code,
            "42601" | "42803" | "42804" | "42P18" | "42725" | "42P08" | "57014" | "25P02" | "25001"
        );
    if client {
        "client"
    } else {
        "secondary"
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
