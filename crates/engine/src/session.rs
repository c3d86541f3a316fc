//! One client session of the engine: the PostgreSQL protocol over any byte
//! stream (startup, simple and extended query, COPY refused by name), the
//! session's settings, and PostgreSQL's transaction behaviour over SQLite:
//! reads run on the session's own connection, each statement on the newest
//! commit (READ COMMITTED); the first write of a transaction (or a locking
//! read, or a savepoint) takes the engine's writer lease — FIFO, so waiting
//! writers queue instead of meeting SQLITE_BUSY — and opens `BEGIN
//! IMMEDIATE`; COMMIT or ROLLBACK ends it and hands the lease on.

use crate::errors::{from_sqlite, Failure};
use crate::functions::{now_micros, Identity, SessionClock};
use crate::translate::{self, Command, Lock, Translated};
use crate::types::{self, PgType};
use crate::{Inner, Schema};
use bytes::{Buf, BytesMut};
use cutover_sqlite::rusqlite::types::Value;
use cutover_sqlite::rusqlite::{self, Connection};
use cutover_sqlite::Column;
use cutover_wire::messages::backend_key_data::{self, CancelKey};
use cutover_wire::messages::ready_for_query::{self, TransactionStatus};
use cutover_wire::messages::results::{self, Field};
use cutover_wire::messages::{
    authentication, bind, parameter_status, parse, startup, target, ErrorResponse,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedMutexGuard;

const MAX_MESSAGE: usize = 1 << 30;

/// Settings PostgreSQL reports with ParameterStatus, in its order.
const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
];

fn defaults(user: &str) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    for (k, v) in [
        ("application_name", ""),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("default_transaction_read_only", "off"),
        ("in_hot_standby", "off"),
        ("integer_datetimes", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "off"),
        ("server_encoding", "UTF8"),
        ("server_version", "15.0"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
        ("transaction_isolation", "read committed"),
        ("default_transaction_isolation", "read committed"),
        ("search_path", "\"$user\", public"),
        ("statement_timeout", "0"),
        ("lock_timeout", "0"),
        ("idle_in_transaction_session_timeout", "0"),
        ("extra_float_digits", "1"),
        ("client_min_messages", "notice"),
        ("max_identifier_length", "63"),
        ("bytea_output", "hex"),
        ("max_connections", "100"),
        ("superuser_reserved_connections", "3"),
        ("timezone_abbreviations", "Default"),
    ] {
        s.insert(k.to_string(), v.to_string());
    }
    s.insert("session_authorization".to_string(), user.to_string());
    s
}

/// The canonical spelling of a setting's name (PostgreSQL's are case-blind).
fn setting_name(settings: &BTreeMap<String, String>, name: &str) -> String {
    settings
        .keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .cloned()
        .unwrap_or_else(|| name.to_ascii_lowercase())
}

/// Where the session's transaction is.
enum Tx {
    Idle,
    Block {
        failed: bool,
        /// Held from the transaction's first write to its end; SQLite's
        /// `BEGIN IMMEDIATE` is open while it is held.
        lease: Option<OwnedMutexGuard<()>>,
    },
}

/// What a statement text yields, kept per session.
struct Shape {
    fields: Vec<(Field, PgType, Option<Column>)>,
    readonly: bool,
}

struct Prepared {
    command: Arc<Command>,
    /// What the client said, then what was inferred.
    param_types: Vec<u32>,
    /// The client's text, and the file's schema version it was
    /// translated at.
    sql: String,
    version: i64,
}

struct Portal {
    statement: Arc<Prepared>,
    params: Vec<Value>,
    formats: bind::Bind,
    /// Rows left from an Execute with a row limit.
    pending: Option<Output>,
}

/// A statement's result, encoded.
struct Output {
    fields: Vec<(Field, PgType, Option<Column>)>,
    rows: Vec<Vec<Option<Vec<u8>>>>,
    tag: String,
    sent: usize,
}

pub(crate) struct Session {
    engine: Arc<Inner>,
    /// The file's schema this session's statements are translated by
    /// (with the session's temporary tables when it has some).
    schema: Arc<Schema>,
    /// The file's schema as the engine has it, and the session's
    /// temporary tables.
    base: Arc<Schema>,
    temp: Vec<cutover_sqlite::Table>,
    /// The engine's DDL count and the time when the file's schema version
    /// was last asked for.
    schema_seen: std::cell::Cell<(u64, std::time::Instant)>,
    key: CancelKey,
    conn: Arc<Mutex<Connection>>,
    clock: Arc<SessionClock>,
    settings: BTreeMap<String, String>,
    tx: Tx,
    /// The open transaction is the implicit one of extended-protocol
    /// messages, which ends at the next Sync.
    implicit: bool,
    /// The settings when the transaction began, restored when it rolls
    /// back, and the names SET LOCAL changed, restored when it ends.
    saved_settings: Option<BTreeMap<String, String>>,
    /// The settings at each open savepoint, innermost last: ROLLBACK TO
    /// takes back what was SET after it.
    savepoint_settings: Vec<(String, BTreeMap<String, String>)>,
    local_settings: Vec<String>,
    statements: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    listening: HashSet<String>,
    pending_notifies: Vec<(String, String)>,
    out: BytesMut,
    /// After an error in the extended protocol, messages up to Sync are
    /// skipped.
    skipping: bool,
    /// `COPY … FROM STDIN` under way: the plan and the data so far.
    copy_in: Option<(Arc<Command>, Vec<u8>)>,
    /// By schema version and translated text.
    shapes: HashMap<(i64, String), Arc<Shape>>,
    /// The proxy's runtime, for timers that must fire while this
    /// session's thread is inside SQLite.
    timers: tokio::runtime::Handle,
}

/// How long a session may go without asking whether another process
/// changed the file's schema (statement texts it has not seen ask at
/// once; so does everything after DDL through the engine).
const SCHEMA_CHECK: Duration = Duration::from_millis(100);

/// Runs a session over `stream` until the client leaves.
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    engine: Arc<Inner>,
    mut stream: S,
    timers: tokio::runtime::Handle,
) {
    let mut buf = BytesMut::with_capacity(8192);
    let params = loop {
        match read_startup(&mut stream, &mut buf).await {
            Ok(startup::StartupPacket::Startup { params, .. }) => break params,
            Ok(startup::StartupPacket::Ssl) | Ok(startup::StartupPacket::GssEnc) => {
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Ok(startup::StartupPacket::Cancel(key)) => {
                engine.cancel(key);
                return;
            }
            Err(_) => return,
        }
    };
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let database = params
        .iter()
        .find(|(k, _)| k == "database")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| user.clone());
    let mut out = BytesMut::new();
    if database != engine.database {
        ErrorResponse::fatal("3D000", format!("database \"{database}\" does not exist"))
            .encode(&mut out);
        let _ = stream.write_all(&out).await;
        return;
    }
    let key = engine.register();
    let clock = Arc::new(SessionClock::default());
    let identity = Arc::new(Identity {
        database: database.clone(),
        user: user.clone(),
        pid: key.pid,
    });
    let schema = engine.schema();
    let conn = match engine.open_connection(clock.clone(), identity, &schema.map) {
        Ok(c) => c,
        Err(e) => {
            ErrorResponse::fatal("58030", format!("cannot open the SQLite file: {e}"))
                .encode(&mut out);
            let _ = stream.write_all(&out).await;
            engine.unregister(key.pid);
            return;
        }
    };
    engine.set_interrupt(key.pid, conn.get_interrupt_handle());
    let mut session = Session {
        engine: engine.clone(),
        base: schema.clone(),
        temp: Vec::new(),
        schema,
        schema_seen: std::cell::Cell::new((0, std::time::Instant::now() - SCHEMA_CHECK)),
        key,
        conn: Arc::new(Mutex::new(conn)),
        clock,
        settings: defaults(&user),
        tx: Tx::Idle,
        implicit: false,
        saved_settings: None,
        savepoint_settings: Vec::new(),
        local_settings: Vec::new(),
        statements: HashMap::new(),
        portals: HashMap::new(),
        listening: HashSet::new(),
        pending_notifies: Vec::new(),
        out,
        skipping: false,
        copy_in: None,
        shapes: HashMap::new(),
        timers,
    };
    for (k, v) in &params {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                for (name, value) in parse_options(v) {
                    let _ = session.set(&name, Some(value));
                }
            }
            _ => {
                let _ = session.set(k, Some(v.clone()));
            }
        }
    }
    session.publish_settings();
    authentication::ok(&mut session.out);
    for name in REPORTED {
        let value = session.settings.get(*name).cloned().unwrap_or_default();
        parameter_status::encode(&mut session.out, name, &value);
    }
    backend_key_data::encode(&mut session.out, key);
    session.ready();
    if stream.write_all(&session.out).await.is_err() {
        engine.unregister(key.pid);
        return;
    }
    session.out.clear();
    let mut notifications = engine.notify.subscribe();
    loop {
        let idle_timeout = session.idle_timeout();
        let frame = tokio::select! {
            f = read_message(&mut stream, &mut buf) => f,
            n = notifications.recv() => {
                if let Ok((pid, channel, payload)) = n {
                    if session.listening.contains(&channel) {
                        let mut b = BytesMut::new();
                        results::notification(&mut b, pid, &channel, &payload);
                        if stream.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                }
                continue;
            }
            _ = sleep_or_forever(idle_timeout) => {
                ErrorResponse::fatal("25P03", "terminating connection due to idle-in-transaction timeout").encode(&mut session.out);
                let _ = stream.write_all(&session.out).await;
                break;
            }
        };
        let Ok(Some((tag, body))) = frame else { break };
        if tag == b'X' {
            break;
        }
        session.handle(tag, body).await;
        if !session.out.is_empty() {
            if stream.write_all(&session.out).await.is_err() {
                break;
            }
            session.out.clear();
        }
    }
    session.end().await;
    engine.unregister(key.pid);
}

async fn sleep_or_forever(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// `-c name=value` pairs from the startup `options` parameter.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(w) = words.next() {
        let pair = if w == "-c" {
            words.next()
        } else {
            w.strip_prefix("-c").or(w.strip_prefix("--"))
        };
        if let Some((k, v)) = pair.and_then(|p| p.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_string()));
        }
    }
    out
}

async fn read_startup<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<startup::StartupPacket, ()> {
    while buf.len() < 4 {
        if stream.read_buf(buf).await.map_err(|_| ())? == 0 {
            return Err(());
        }
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=startup::MAX_STARTUP_LEN).contains(&len) {
        return Err(());
    }
    while buf.len() < len {
        if stream.read_buf(buf).await.map_err(|_| ())? == 0 {
            return Err(());
        }
    }
    let packet = buf.split_to(len);
    startup::decode(&packet[4..]).map_err(|_| ())
}

async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<Option<(u8, BytesMut)>> {
    loop {
        match cutover_wire::frame::scan(buf, MAX_MESSAGE) {
            Ok(Some(frame)) => {
                let mut msg = buf.split_to(frame.len);
                msg.advance(5);
                return Ok(Some((frame.tag, msg)));
            }
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

impl Session {
    fn status(&self) -> TransactionStatus {
        match self.tx {
            Tx::Idle => TransactionStatus::Idle,
            Tx::Block { failed: false, .. } => TransactionStatus::InTransaction,
            Tx::Block { failed: true, .. } => TransactionStatus::Failed,
        }
    }

    fn ready(&mut self) {
        let status = self.status();
        ready_for_query::encode(&mut self.out, status);
    }

    fn millis(&self, name: &str) -> Option<Duration> {
        let v = self.settings.get(name)?;
        let (digits, unit): (String, String) = v.trim().chars().partition(|c| c.is_ascii_digit());
        let n: u64 = digits.parse().ok()?;
        let ms = match unit.trim() {
            "" | "ms" => n,
            "s" => n * 1000,
            "min" => n * 60_000,
            "h" => n * 3_600_000,
            _ => return None,
        };
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Makes the settings visible to `current_setting()`.
    fn publish_settings(&self) {
        *self
            .clock
            .settings
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = self.settings.clone();
    }

    fn idle_timeout(&self) -> Option<Duration> {
        match self.tx {
            Tx::Block { .. } => self.millis("idle_in_transaction_session_timeout"),
            Tx::Idle => None,
        }
    }

    fn error(&mut self, f: Failure) {
        f.0.encode(&mut self.out);
        if let Tx::Block { failed, .. } = &mut self.tx {
            *failed = true;
        }
    }

    async fn handle(&mut self, tag: u8, body: BytesMut) {
        if self.copy_in.is_some() {
            return self.copy_message(tag, body).await;
        }
        if self.skipping && tag != b'S' {
            return;
        }
        match tag {
            b'Q' => {
                let sql =
                    String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
                if self.simple_query(&sql).await {
                    self.ready();
                }
            }
            b'P' => match parse::decode(&body) {
                Some(p) => self.parse(p),
                None => self.protocol_error("malformed Parse message"),
            },
            b'B' => match bind::decode(&body) {
                Some(b) => self.bind(b),
                None => self.protocol_error("malformed Bind message"),
            },
            b'D' => match target::decode_named(&body) {
                Some((kind, name)) => self.describe(kind, &name).await,
                None => self.protocol_error("malformed Describe message"),
            },
            b'E' => match target::decode_execute(&body) {
                Some((portal, limit)) => self.execute(&portal, limit).await,
                None => self.protocol_error("malformed Execute message"),
            },
            b'C' => match target::decode_named(&body) {
                Some((b'S', name)) => {
                    self.statements.remove(&name);
                    results::empty(&mut self.out, b'3');
                }
                Some((_, name)) => {
                    self.portals.remove(&name);
                    results::empty(&mut self.out, b'3');
                }
                None => self.protocol_error("malformed Close message"),
            },
            b'S' => {
                self.skipping = false;
                self.portals.retain(|name, _| !name.is_empty());
                if std::mem::take(&mut self.implicit) {
                    let commit = !self.aborted();
                    if let Err(e) = self.finish(commit).await {
                        self.error(e);
                    }
                }
                self.ready();
            }
            b'H' => {}
            b'd' | b'c' | b'f' => {}
            other => self.protocol_error(&format!("unexpected message type {:?}", other as char)),
        }
    }

    fn protocol_error(&mut self, message: &str) {
        self.error(Failure::new("08P01", message));
        self.skipping = true;
    }

    /// The cached translation of `sql`, by the file's schema as it is
    /// now.
    fn command(&mut self, sql: &str) -> Result<Arc<Command>, Failure> {
        self.follow_schema(false)?;
        if let Some(c) = self.schema.cached(sql) {
            return Ok(c);
        }
        // A text not seen before may name what a migration just made.
        self.follow_schema(true)?;
        self.schema.command(sql).map_err(Failure::from)
    }

    /// The schema statements are translated by: the file's, and the
    /// session's temporary tables over it (as pg_temp comes first in
    /// PostgreSQL's search path).
    fn overlay_temp(&mut self) {
        if self.temp.is_empty() {
            self.schema = self.base.clone();
            return;
        }
        let mut map = (*self.base.map).clone();
        map.tables
            .retain(|t| !self.temp.iter().any(|x| x.name == t.name));
        map.tables.extend(self.temp.iter().cloned());
        self.schema = Arc::new(Schema::new(self.base.version, map));
    }

    /// Reads the session's temporary tables again (after DDL).
    fn follow_temp(&mut self) -> Result<(), Failure> {
        let temp = {
            let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            cutover_sqlite::SchemaMap::read_temp(&conn).map_err(|e| {
                Failure::new("XX000", format!("cannot read the temporary tables: {e}"))
            })?
        };
        if temp != self.temp {
            self.temp = temp;
            self.overlay_temp();
            self.shapes.clear();
            let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            conn.flush_prepared_statement_cache();
        }
        Ok(())
    }

    /// Whether `steps` drop only this session's temporary tables (which
    /// capture does not see, so they may go while it runs).
    fn drops_only_temp(&self, steps: &[crate::ddl::Step]) -> bool {
        let mut dropped = false;
        for step in steps {
            match step {
                crate::ddl::Step::Record(_) => {}
                crate::ddl::Step::DropTable(name) if self.temp.iter().any(|t| &t.name == name) => {
                    dropped = true;
                }
                _ => return false,
            }
        }
        dropped
    }

    /// Drops the session's temporary tables (DISCARD ALL, DISCARD TEMP).
    fn drop_temp(&mut self) -> Result<(), Failure> {
        if self.temp.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = self.temp.iter().map(|t| t.name.clone()).collect();
        {
            let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            for name in names {
                conn.execute_batch(&format!(
                    "DROP TABLE IF EXISTS temp.{}",
                    cutover_sqlite::schema_map::quote(&name)
                ))
                .map_err(|e| from_sqlite(&e, &self.schema.map))?;
            }
        }
        self.temp.clear();
        self.overlay_temp();
        Ok(())
    }

    /// A prepared statement after the file's schema changed, translated
    /// again as PostgreSQL plans it again; as there, a statement whose
    /// result columns changed is refused (the client prepares it anew).
    fn replan(&mut self, name: &str, statement: Arc<Prepared>) -> Result<Arc<Prepared>, Failure> {
        self.follow_schema(false)?;
        if statement.version == self.schema.version || statement.sql.is_empty() {
            return Ok(statement);
        }
        let fresh = self.schema.command(&statement.sql)?;
        if let (Command::Sql(old), Command::Sql(new)) = (statement.command.as_ref(), fresh.as_ref())
        {
            let before = self
                .shapes
                .get(&(statement.version, old.sql.clone()))
                .cloned();
            let after = self.shape(new)?;
            let types = |s: &Shape| {
                s.fields
                    .iter()
                    .map(|(f, _, _)| f.type_oid)
                    .collect::<Vec<_>>()
            };
            if before.is_some_and(|b| types(&b) != types(&after)) {
                return Err(Failure::new(
                    "0A000",
                    "cached plan must not change result type",
                ));
            }
        }
        let replanned = Arc::new(Prepared {
            command: fresh,
            param_types: statement.param_types.clone(),
            sql: statement.sql.clone(),
            version: self.schema.version,
        });
        self.statements.insert(name.to_string(), replanned.clone());
        Ok(replanned)
    }

    /// Reads the file's schema again when its `schema_version` moved (a
    /// migration by another process, or DDL through the engine), and the
    /// catalog's tables with it. The version is asked for (a read of the
    /// file's header, a few µs) when `now`, after DDL through the engine,
    /// and otherwise at most every [`SCHEMA_CHECK`].
    fn follow_schema(&mut self, now: bool) -> Result<(), Failure> {
        let generation = self.engine.ddl_generation.load(Ordering::Acquire);
        let (seen, at) = self.schema_seen.get();
        if !now && generation == seen && at.elapsed() < SCHEMA_CHECK {
            return Ok(());
        }
        self.schema_seen
            .set((generation, std::time::Instant::now()));
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let version =
            crate::schema_version(&conn).map_err(|e| from_sqlite(&e, &self.schema.map))?;
        if version == self.schema.version {
            return Ok(());
        }
        let schema = self.engine.schema_at(version, &conn).map_err(|e| {
            Failure::new(
                "XX000",
                format!("cannot read the SQLite file's schema: {e}"),
            )
        })?;
        crate::catalog::refresh(&conn, &schema.map, &self.engine.database)
            .map_err(|e| from_sqlite(&e, &schema.map))?;
        // A statement prepared before the change describes the old columns
        // until it is stepped (`SELECT *`).
        conn.flush_prepared_statement_cache();
        drop(conn);
        self.base = schema;
        self.overlay_temp();
        Ok(())
    }

    /// Runs a simple query's statements; false when it ended in `COPY …
    /// FROM STDIN`, whose ReadyForQuery comes after the data.
    async fn simple_query(&mut self, sql: &str) -> bool {
        let statements = translate::split(sql);
        if statements.is_empty() {
            results::empty(&mut self.out, b'I');
            return true;
        }
        self.clock
            .statement_start
            .store(now_micros(), Ordering::Relaxed);
        let last = statements.len() - 1;
        // PostgreSQL runs the statements of one query string as one
        // implicit transaction (unless they manage transactions
        // themselves): a statement that fails takes back those before it.
        let implicit = last > 0
            && matches!(self.tx, Tx::Idle)
            && !statements.iter().any(|s| manages_transaction(s));
        if implicit {
            self.clock.transaction_start.store(
                self.clock.statement_start.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            self.open_block();
        }
        for (i, text) in statements.into_iter().enumerate() {
            if self.aborted() && !ends_transaction(text) {
                self.error(aborted());
                return true;
            }
            let command = match self.command(text) {
                Ok(c) => c,
                Err(e) => {
                    self.error(e);
                    if implicit {
                        let _ = self.finish(false).await;
                    }
                    return true;
                }
            };
            if let Command::Copy(plan) = command.as_ref() {
                if plan.query.is_none() {
                    if i != last {
                        self.error(Failure::new(
                            "0A000",
                            "COPY FROM STDIN must be the last statement of a query string in cutover's SQLite engine",
                        ));
                        return true;
                    }
                    results::copy_response(&mut self.out, b'G', plan.columns.len());
                    self.copy_in = Some((command.clone(), Vec::new()));
                    return false;
                }
            }
            match self.run(&command, Vec::new(), None, 0).await {
                Ok(output) => self.send_output(output, true, 0),
                Err(e) => {
                    self.error(e);
                    if implicit {
                        let _ = self.finish(false).await;
                    }
                    return true;
                }
            }
        }
        if implicit {
            if let Err(e) = self.finish(true).await {
                self.error(e);
            }
        }
        true
    }

    /// A message while `COPY … FROM STDIN` runs.
    async fn copy_message(&mut self, tag: u8, body: BytesMut) {
        match tag {
            b'd' => {
                if let Some((_, data)) = &mut self.copy_in {
                    data.extend_from_slice(&body);
                }
            }
            b'c' => {
                let Some((command, data)) = self.copy_in.take() else {
                    return;
                };
                let Command::Copy(plan) = command.as_ref() else {
                    return;
                };
                match self.copy_from(plan, data).await {
                    Ok(n) => results::command_complete(&mut self.out, &format!("COPY {n}")),
                    Err(e) => self.error(e),
                }
                self.ready();
            }
            b'f' => {
                self.copy_in = None;
                let reason =
                    String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
                self.error(Failure::new(
                    "57014",
                    format!("COPY from stdin failed: {reason}"),
                ));
                self.ready();
            }
            b'H' | b'S' => {}
            other => {
                self.copy_in = None;
                self.error(Failure::new(
                    "08P01",
                    format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                ));
                self.ready();
            }
        }
    }

    /// Writes COPY's rows in one statement-sized transaction (or the
    /// open one), each value in its column's storage form.
    async fn copy_from(
        &mut self,
        plan: &translate::CopyPlan,
        data: Vec<u8>,
    ) -> Result<u64, Failure> {
        let text = String::from_utf8(data).map_err(|_| {
            Failure::new(
                "22021",
                "invalid byte sequence for encoding \"UTF8\" in COPY data",
            )
        })?;
        let rows = plan
            .format
            .read_rows(&text)
            .map_err(|e| Failure::new("22P04", format!("bad COPY data: {e}")))?;
        let table = self
            .schema
            .map
            .tables
            .iter()
            .find(|t| t.name == plan.table)
            .cloned()
            .ok_or_else(|| {
                Failure::new(
                    "42P01",
                    format!("relation \"{}\" does not exist", plan.table),
                )
            })?;
        let columns: Vec<Column> = plan
            .columns
            .iter()
            .filter_map(|c| table.columns.iter().find(|x| &x.name == c).cloned())
            .collect();
        let mut values = Vec::with_capacity(rows.len());
        for (n, row) in rows.into_iter().enumerate() {
            if row.len() != columns.len() {
                let what = if row.len() < columns.len() {
                    "missing data for a column"
                } else {
                    "extra data after last expected column"
                };
                return Err(Failure::new(
                    "22P04",
                    format!("COPY {}, line {}: {what}", plan.table, n + 1),
                ));
            }
            let mut converted = Vec::with_capacity(row.len());
            for (field, column) in row.into_iter().zip(&columns) {
                converted.push(match field {
                    None => Value::Null,
                    Some(text) => types::to_storage(
                        PgType::of_column(&column.pg_type),
                        Some(column.codec),
                        &text,
                    )
                    .map_err(|e| {
                        Failure::new(
                            "22P02",
                            format!(
                                "{e} (COPY {}, line {}, column {})",
                                plan.table,
                                n + 1,
                                column.name
                            ),
                        )
                    })?,
                });
            }
            values.push(converted);
        }
        let autocommit = matches!(self.tx, Tx::Idle);
        self.take_lease(None).await?;
        let conn = self.conn.clone();
        let schema = self.schema.clone();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            cutover_sqlite::schema_map::quote(&plan.table),
            columns
                .iter()
                .map(|c| cutover_sqlite::schema_map::quote(&c.name))
                .collect::<Vec<_>>()
                .join(", "),
            (1..=columns.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let result = (|| {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            let mut stmt = conn
                .prepare_cached(&sql)
                .map_err(|e| from_sqlite(&e, &schema.map))?;
            for row in &values {
                stmt.execute(rusqlite::params_from_iter(row.iter()))
                    .map_err(|e| from_sqlite(&e, &schema.map))?;
            }
            Ok::<u64, Failure>(values.len() as u64)
        })();
        if autocommit {
            if result.is_ok() {
                self.finish(true).await?;
            } else {
                let _ = self.finish(false).await;
            }
        }
        result
    }

    fn aborted(&self) -> bool {
        matches!(self.tx, Tx::Block { failed: true, .. })
    }

    fn parse(&mut self, p: parse::Parse) {
        if self.aborted() && !ends_transaction(&p.sql) {
            self.error(aborted());
            self.skipping = true;
            return;
        }
        let command = if translate::is_blank(&p.sql) {
            Ok(Arc::new(Command::Empty))
        } else {
            self.command(&p.sql)
        };
        match command {
            Ok(command) => {
                let mut param_types = p.param_types.clone();
                if let Command::Sql(t) = command.as_ref() {
                    if param_types.len() < t.params.len() {
                        param_types.resize(t.params.len(), 0);
                    }
                    for (i, ty) in param_types.iter_mut().enumerate() {
                        if *ty == 0 {
                            let param = t.params.get(i);
                            let elem = param.and_then(|p| p.pg_type).unwrap_or(PgType::Text);
                            *ty = if param.is_some_and(|p| p.array) {
                                elem.array_oid()
                            } else {
                                elem.oid()
                            };
                        }
                    }
                }
                self.statements.insert(
                    p.name,
                    Arc::new(Prepared {
                        command,
                        param_types,
                        sql: p.sql,
                        version: self.schema.version,
                    }),
                );
                results::empty(&mut self.out, b'1');
            }
            Err(e) => {
                self.error(e);
                self.skipping = true;
            }
        }
    }

    fn bind(&mut self, b: bind::Bind) {
        let Some(statement) = self.statements.get(&b.statement).cloned() else {
            self.error(Failure::new(
                "26000",
                format!("prepared statement \"{}\" does not exist", b.statement),
            ));
            self.skipping = true;
            return;
        };
        let statement = match self.replan(&b.statement, statement) {
            Ok(s) => s,
            Err(e) => {
                self.error(e);
                self.skipping = true;
                return;
            }
        };
        if b.params.len() != statement.param_types.len() {
            self.error(Failure::new(
                "08P01",
                format!(
                    "bind message supplies {} parameters, but prepared statement \"{}\" requires {}",
                    b.params.len(),
                    b.statement,
                    statement.param_types.len()
                ),
            ));
            self.skipping = true;
            return;
        }
        let mut params = Vec::with_capacity(b.params.len());
        for (i, value) in b.params.iter().enumerate() {
            let oid = statement.param_types[i];
            let ty = PgType::from_oid(oid).unwrap_or(PgType::Text);
            let converted = match (value, PgType::element_of(oid)) {
                (None, _) => Ok(Value::Null),
                (Some(bytes), Some(elem)) => {
                    types::array_param_json(elem, b.param_formats[i], bytes).map(Value::Text)
                }
                (Some(bytes), None) => types::param_text(ty, b.param_formats[i], bytes)
                    .and_then(|text| types::to_storage(ty, None, &text)),
            };
            match converted {
                Ok(v) => params.push(v),
                Err(e) => {
                    self.error(Failure::new("22P02", e.to_string()));
                    self.skipping = true;
                    return;
                }
            }
        }
        self.portals.insert(
            b.portal.clone(),
            Portal {
                statement,
                params,
                formats: b,
                pending: None,
            },
        );
        results::empty(&mut self.out, b'2');
    }

    async fn describe(&mut self, kind: u8, name: &str) {
        let (statement, formats) = if kind == b'S' {
            match self.statements.get(name) {
                Some(s) => (s.clone(), None),
                None => {
                    self.error(Failure::new(
                        "26000",
                        format!("prepared statement \"{name}\" does not exist"),
                    ));
                    self.skipping = true;
                    return;
                }
            }
        } else {
            match self.portals.get(name) {
                Some(p) => (p.statement.clone(), Some(p.formats.clone())),
                None => {
                    self.error(Failure::new(
                        "34000",
                        format!("portal \"{name}\" does not exist"),
                    ));
                    self.skipping = true;
                    return;
                }
            }
        };
        if kind == b'S' {
            results::parameter_description(&mut self.out, &statement.param_types);
        }
        let fields = match statement.command.as_ref() {
            Command::Sql(t) => match self.columns(t).await {
                Ok(f) => f,
                Err(e) => {
                    self.error(e);
                    self.skipping = true;
                    return;
                }
            },
            Command::Show(name) => vec![(text_field(name), PgType::Text, None)],
            _ => Vec::new(),
        };
        if fields.is_empty() {
            results::empty(&mut self.out, b'n');
        } else {
            let described: Vec<Field> = fields
                .iter()
                .enumerate()
                .map(|(i, (f, _, _))| Field {
                    format: formats.as_ref().map(|b| b.result_format(i)).unwrap_or(0),
                    ..f.clone()
                })
                .collect();
            results::row_description(&mut self.out, &described);
        }
    }

    async fn execute(&mut self, portal_name: &str, limit: i32) {
        let Some(mut portal) = self.portals.remove(portal_name) else {
            self.error(Failure::new(
                "34000",
                format!("portal \"{portal_name}\" does not exist"),
            ));
            self.skipping = true;
            return;
        };
        if self.aborted()
            && !matches!(
                portal.statement.command.as_ref(),
                Command::Commit | Command::Rollback | Command::RollbackTo(_)
            )
        {
            self.error(aborted());
            self.skipping = true;
            return;
        }
        self.clock
            .statement_start
            .store(now_micros(), Ordering::Relaxed);
        // As in PostgreSQL, the statements executed up to a Sync outside a
        // transaction block are one implicit transaction (asyncpg's
        // executemany relies on it: all rows or none).
        if matches!(self.tx, Tx::Idle) && !manages(portal.statement.command.as_ref()) {
            self.clock.transaction_start.store(
                self.clock.statement_start.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            self.open_block();
            self.implicit = true;
        }
        let output = match portal.pending.take() {
            Some(o) => Ok(o),
            None => {
                let command = portal.statement.command.clone();
                self.run(
                    &command,
                    portal.params.clone(),
                    Some(&portal.formats),
                    limit,
                )
                .await
            }
        };
        match output {
            Ok(mut output) => {
                let limit = usize::try_from(limit).unwrap_or(0);
                if limit > 0 && output.rows.len() - output.sent > limit {
                    for row in &output.rows[output.sent..output.sent + limit] {
                        results::data_row(&mut self.out, row.iter().map(|v| v.as_deref()));
                    }
                    output.sent += limit;
                    results::empty(&mut self.out, b's');
                    portal.pending = Some(output);
                    self.portals.insert(portal_name.to_string(), portal);
                } else {
                    self.send_output(output, false, 0);
                    if !portal_name.is_empty() {
                        self.portals.insert(portal_name.to_string(), portal);
                    }
                }
            }
            Err(e) => {
                self.error(e);
                self.skipping = true;
            }
        }
    }

    fn send_output(&mut self, output: Output, describe: bool, _limit: usize) {
        if describe && !output.fields.is_empty() {
            let fields: Vec<Field> = output.fields.iter().map(|(f, _, _)| f.clone()).collect();
            results::row_description(&mut self.out, &fields);
        }
        for row in &output.rows[output.sent..] {
            results::data_row(&mut self.out, row.iter().map(|v| v.as_deref()));
        }
        if output.tag.is_empty() {
            results::empty(&mut self.out, b'I');
        } else {
            results::command_complete(&mut self.out, &output.tag);
        }
    }

    fn tagged(tag: &str) -> Output {
        Output {
            fields: Vec::new(),
            rows: Vec::new(),
            tag: tag.to_string(),
            sent: 0,
        }
    }

    /// Runs one command.
    async fn run(
        &mut self,
        command: &Command,
        params: Vec<Value>,
        formats: Option<&bind::Bind>,
        _limit: i32,
    ) -> Result<Output, Failure> {
        if matches!(self.tx, Tx::Idle) {
            self.clock.transaction_start.store(
                self.clock.statement_start.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        match command {
            Command::Empty => Ok(Self::tagged("")),
            Command::Begin => {
                if std::mem::take(&mut self.implicit) {
                    // BEGIN inside the extended protocol's implicit
                    // transaction makes it an explicit one, as in
                    // PostgreSQL.
                } else if matches!(self.tx, Tx::Idle) {
                    self.open_block();
                } else {
                    self.notice("25001", "there is already a transaction in progress");
                }
                Ok(Self::tagged("BEGIN"))
            }
            Command::Commit => {
                let was_failed = self.aborted();
                let ok = self.finish(!was_failed).await;
                match (was_failed, ok) {
                    (true, _) => Ok(Self::tagged("ROLLBACK")),
                    (false, Ok(true)) => Ok(Self::tagged("COMMIT")),
                    (false, Ok(false)) => {
                        self.notice("25P01", "there is no transaction in progress");
                        Ok(Self::tagged("COMMIT"))
                    }
                    (false, Err(e)) => Err(e),
                }
            }
            Command::Rollback => {
                if !self.finish(false).await? {
                    self.notice("25P01", "there is no transaction in progress");
                }
                Ok(Self::tagged("ROLLBACK"))
            }
            Command::Savepoint(name) => {
                if matches!(self.tx, Tx::Idle) {
                    return Err(Failure::new(
                        "25P01",
                        "SAVEPOINT can only be used in transaction blocks",
                    ));
                }
                self.take_lease(None).await?;
                self.sqlite_batch(format!("SAVEPOINT \"{}\"", name.replace('"', "\"\"")))
                    .await?;
                self.savepoint_settings
                    .push((name.clone(), self.settings.clone()));
                Ok(Self::tagged("SAVEPOINT"))
            }
            Command::Release(name) => {
                self.in_block("RELEASE SAVEPOINT")?;
                self.savepoint_op("RELEASE", name).await?;
                if let Some(at) = self.savepoint_settings.iter().rposition(|(n, _)| n == name) {
                    self.savepoint_settings.truncate(at);
                }
                Ok(Self::tagged("RELEASE"))
            }
            Command::RollbackTo(name) => {
                self.in_block("ROLLBACK TO SAVEPOINT")?;
                self.savepoint_op("ROLLBACK TO", name).await?;
                if let Tx::Block { failed, .. } = &mut self.tx {
                    *failed = false;
                }
                if let Some(at) = self.savepoint_settings.iter().rposition(|(n, _)| n == name) {
                    self.savepoint_settings.truncate(at + 1);
                    let restored = self.savepoint_settings[at].1.clone();
                    self.apply_settings(restored);
                }
                Ok(Self::tagged("ROLLBACK"))
            }
            Command::Set { name, value } => {
                if name.is_empty() && value.is_none() {
                    let user = self
                        .settings
                        .get("session_authorization")
                        .cloned()
                        .unwrap_or_default();
                    self.settings = defaults(&user);
                    self.publish_settings();
                    return Ok(Self::tagged("RESET"));
                }
                if name.is_empty() {
                    return Ok(Self::tagged("SET"));
                }
                self.set(name, value.clone())?;
                Ok(Self::tagged(if value.is_some() { "SET" } else { "RESET" }))
            }
            Command::SetConstraints { deferred } => {
                if matches!(self.tx, Tx::Idle) {
                    self.notice(
                        "25P01",
                        "SET CONSTRAINTS can only be used in transaction blocks",
                    );
                    return Ok(Self::tagged("SET CONSTRAINTS"));
                }
                self.sqlite_batch(format!(
                    "PRAGMA defer_foreign_keys = {}",
                    if *deferred { "ON" } else { "OFF" }
                ))
                .await?;
                Ok(Self::tagged("SET CONSTRAINTS"))
            }
            Command::SetLocal { name, value } => {
                if matches!(self.tx, Tx::Idle) {
                    self.notice("25P01", "SET LOCAL can only be used in transaction blocks");
                    return Ok(Self::tagged("SET"));
                }
                self.set(name, value.clone())?;
                let key = setting_name(&self.settings, name);
                self.local_settings.push(key);
                Ok(Self::tagged("SET"))
            }
            Command::Show(name) => {
                let value = if name == "all" {
                    return Err(Failure::new(
                        "0A000",
                        "SHOW ALL is not supported by cutover's SQLite engine",
                    ));
                } else {
                    let key = setting_name(&self.settings, name);
                    self.settings.get(&key).cloned().ok_or_else(|| {
                        Failure::new(
                            "42704",
                            format!("unrecognized configuration parameter \"{name}\""),
                        )
                    })?
                };
                let format = formats.map(|b| b.result_format(0)).unwrap_or(0);
                let mut field = text_field(name);
                field.format = format;
                Ok(Output {
                    fields: vec![(field, PgType::Text, None)],
                    rows: vec![vec![Some(value.into_bytes())]],
                    tag: "SHOW".to_string(),
                    sent: 0,
                })
            }
            Command::Discard => {
                if !matches!(self.tx, Tx::Idle) {
                    return Err(Failure::new(
                        "25001",
                        "DISCARD ALL cannot run inside a transaction block",
                    ));
                }
                let user = self
                    .settings
                    .get("session_authorization")
                    .cloned()
                    .unwrap_or_default();
                self.settings = defaults(&user);
                self.publish_settings();
                self.statements.clear();
                self.portals.clear();
                self.listening.clear();
                self.engine.release_advisory(self.key.pid);
                self.drop_temp()?;
                Ok(Self::tagged("DISCARD ALL"))
            }
            Command::Deallocate(name) => {
                match name {
                    None => self.statements.clear(),
                    Some(n) => {
                        if self.statements.remove(n).is_none() {
                            return Err(Failure::new(
                                "26000",
                                format!("prepared statement \"{n}\" does not exist"),
                            ));
                        }
                    }
                }
                Ok(Self::tagged(if name.is_some() {
                    "DEALLOCATE"
                } else {
                    "DEALLOCATE ALL"
                }))
            }
            Command::Listen(ch) => {
                self.listening.insert(ch.clone());
                Ok(Self::tagged("LISTEN"))
            }
            Command::Unlisten(ch) => {
                match ch {
                    Some(c) => {
                        self.listening.remove(c);
                    }
                    None => self.listening.clear(),
                }
                Ok(Self::tagged("UNLISTEN"))
            }
            Command::Notify { channel, payload } => {
                if matches!(self.tx, Tx::Idle) {
                    let _ =
                        self.engine
                            .notify
                            .send((self.key.pid, channel.clone(), payload.clone()));
                } else {
                    self.pending_notifies
                        .push((channel.clone(), payload.clone()));
                }
                Ok(Self::tagged("NOTIFY"))
            }
            Command::Noop { tag, notice } => {
                let code = if tag.starts_with("CREATE") {
                    "42P07"
                } else {
                    "00000"
                };
                self.notice(code, notice);
                Ok(Self::tagged(tag))
            }
            Command::Ddl {
                tag,
                steps,
                temporary,
            } => {
                let frozen = !*temporary && !self.drops_only_temp(steps) && {
                    let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
                    cutover_sqlite::capture::installed(&conn)
                        .map_err(|e| Failure::new("XX000", e.to_string()))?
                };
                if frozen {
                    return Err(Failure::new(
                        "0A000",
                        "DDL while the live migration's capture runs is not supported by cutover's SQLite engine: the schema is frozen from mirror start to finalize (change it before mirror start or after finalize)",
                    ));
                }
                let written = self.write_steps(steps).await;
                if !*temporary {
                    self.engine.ddl_generation.fetch_add(1, Ordering::Release);
                }
                let followed = self.follow_temp();
                written?;
                followed?;
                Ok(Self::tagged(tag))
            }
            Command::Sql(t) => self.run_sql(t, params, formats).await,
            Command::Truncate(deletes) => {
                let steps: Vec<crate::ddl::Step> =
                    deletes.iter().cloned().map(crate::ddl::Step::Sql).collect();
                self.write_steps(&steps).await?;
                Ok(Self::tagged("TRUNCATE TABLE"))
            }
            Command::Copy(plan) => {
                let Some(query) = &plan.query else {
                    return Err(Failure::new(
                        "0A000",
                        "COPY FROM STDIN runs only as a simple query",
                    ));
                };
                let output = self.run_sql(query, Vec::new(), None).await?;
                results::copy_response(&mut self.out, b'H', output.fields.len());
                let mut copied = String::new();
                if plan.format.header {
                    let names: Vec<Option<&str>> = output
                        .fields
                        .iter()
                        .map(|(f, _, _)| Some(f.name.as_str()))
                        .collect();
                    copied.push_str(&plan.format.write_row(&names));
                }
                for row in &output.rows {
                    let values: Vec<Option<&str>> = row
                        .iter()
                        .map(|v| v.as_deref().map(|b| std::str::from_utf8(b).unwrap_or("")))
                        .collect();
                    copied.push_str(&plan.format.write_row(&values));
                }
                for line in copied.split_inclusive('\n') {
                    results::copy_data(&mut self.out, line.as_bytes());
                }
                results::empty(&mut self.out, b'c');
                Ok(Self::tagged(&format!("COPY {}", output.rows.len())))
            }
        }
    }

    fn in_block(&self, what: &str) -> Result<(), Failure> {
        if matches!(self.tx, Tx::Idle) {
            return Err(Failure::new(
                "25P01",
                format!("{what} can only be used in transaction blocks"),
            ));
        }
        Ok(())
    }

    async fn savepoint_op(&mut self, op: &str, name: &str) -> Result<(), Failure> {
        let open = matches!(&self.tx, Tx::Block { lease: Some(_), .. });
        if !open {
            return Err(Failure::new(
                "3B001",
                format!("savepoint \"{name}\" does not exist"),
            ));
        }
        let sql = format!("{op} SAVEPOINT \"{}\"", name.replace('"', "\"\""));
        self.sqlite_batch(sql).await.map_err(|e| {
            if e.0.message.contains("no such savepoint") {
                Failure::new("3B001", format!("savepoint \"{name}\" does not exist"))
            } else {
                e
            }
        })
    }

    fn notice(&mut self, code: &str, message: &str) {
        let mut r = ErrorResponse::error(code, message);
        // Transaction-state complaints are warnings in PostgreSQL; the
        // rest (`… already exists, skipping`) notices.
        r.severity = if code.starts_with("25") {
            "WARNING"
        } else {
            "NOTICE"
        };
        let mut b = BytesMut::new();
        r.encode(&mut b);
        // A NoticeResponse is an ErrorResponse with another tag.
        b[0] = b'N';
        self.out.extend_from_slice(&b);
    }

    /// Sets a setting the way PostgreSQL's SET would, refusing values the
    /// engine would not honour.
    fn set(&mut self, name: &str, value: Option<String>) -> Result<(), Failure> {
        let key = setting_name(&self.settings, name);
        let value = match value {
            Some(v) => v,
            None => defaults("").get(&key).cloned().unwrap_or_default(),
        };
        match key.as_str() {
            "TimeZone" => {
                let utc = [
                    "utc",
                    "etc/utc",
                    "gmt",
                    "etc/gmt",
                    "z",
                    "zulu",
                    "+00",
                    "00:00",
                    "+00:00",
                    "-00:00",
                    "0",
                    "universal",
                ];
                if !utc.contains(&value.to_ascii_lowercase().as_str()) {
                    return Err(Failure::new(
                        "0A000",
                        format!("TimeZone {value:?} is not supported by cutover's SQLite engine, which renders times in UTC"),
                    ));
                }
            }
            "DateStyle" if !value.to_ascii_uppercase().starts_with("ISO") => {
                return Err(Failure::new(
                    "0A000",
                    format!("DateStyle {value:?} is not supported by cutover's SQLite engine (ISO only)"),
                ));
            }
            "client_encoding" => {
                let v = value.to_ascii_uppercase().replace(['-', '_'], "");
                if v != "UTF8" && v != "UNICODE" {
                    return Err(Failure::new(
                        "22023",
                        format!("client_encoding {value:?} is not supported; use UTF8"),
                    ));
                }
            }
            "transaction_isolation" | "default_transaction_isolation" => {
                let v = value.to_ascii_lowercase();
                if v != "read committed" && v != "read uncommitted" {
                    return Err(Failure::new("0A000", "an isolation level above READ COMMITTED is not supported by cutover's SQLite engine"));
                }
            }
            "server_version"
            | "server_encoding"
            | "integer_datetimes"
            | "max_identifier_length" => {
                return Err(Failure::new(
                    "55P02",
                    format!("parameter \"{key}\" cannot be changed"),
                ));
            }
            _ => {}
        }
        let value = if key == "TimeZone" {
            "UTC".to_string()
        } else {
            value
        };
        let changed = self.settings.get(&key) != Some(&value);
        self.settings.insert(key.clone(), value.clone());
        if changed && REPORTED.contains(&key.as_str()) {
            parameter_status::encode(&mut self.out, &key, &value);
        }
        Ok(())
    }

    /// Takes the writer lease and opens SQLite's write transaction, unless
    /// this transaction already holds it.
    async fn take_lease(&mut self, lock: Option<Lock>) -> Result<(), Failure> {
        if matches!(&self.tx, Tx::Block { lease: Some(_), .. }) {
            return Ok(());
        }
        let guard = match lock {
            Some(Lock::NoWait) => self.engine.writer.clone().try_lock_owned().map_err(|_| {
                Failure::new(
                    "55P03",
                    "could not obtain lock on row: another transaction is writing",
                )
            })?,
            _ => {
                let wait = self.engine.writer.clone().lock_owned();
                match self.millis("lock_timeout") {
                    Some(d) => tokio::time::timeout(d, wait).await.map_err(|_| {
                        Failure::new("55P03", "canceling statement due to lock timeout")
                    })?,
                    None => wait.await,
                }
            }
        };
        self.sqlite_batch("BEGIN IMMEDIATE".to_string()).await?;
        match &mut self.tx {
            Tx::Block { lease, .. } => *lease = Some(guard),
            Tx::Idle => {
                self.tx = Tx::Block {
                    failed: false,
                    lease: Some(guard),
                };
            }
        }
        Ok(())
    }

    /// Ends the transaction block; true if there was one.
    async fn finish(&mut self, commit: bool) -> Result<bool, Failure> {
        let tx = std::mem::replace(&mut self.tx, Tx::Idle);
        let Tx::Block { lease, .. } = tx else {
            return Ok(false);
        };
        self.end_settings(commit);
        if lease.is_some() {
            let sql = if commit { "COMMIT" } else { "ROLLBACK" };
            if let Err(e) = self.sqlite_batch(sql.to_string()).await {
                let _ = self.sqlite_batch("ROLLBACK".to_string()).await;
                self.pending_notifies.clear();
                return Err(e);
            }
        }
        drop(lease);
        let notifies = std::mem::take(&mut self.pending_notifies);
        if commit {
            for (channel, payload) in notifies {
                let _ = self.engine.notify.send((self.key.pid, channel, payload));
            }
        }
        Ok(true)
    }

    /// Opens a transaction block, remembering the settings it began with.
    fn open_block(&mut self) {
        self.tx = Tx::Block {
            failed: false,
            lease: None,
        };
        self.saved_settings = Some(self.settings.clone());
        self.local_settings.clear();
        self.savepoint_settings.clear();
    }

    /// The settings after a transaction: all as they were when it began if
    /// it rolled back, else those SET LOCAL changed; reported parameters
    /// that change are sent to the client again.
    fn end_settings(&mut self, commit: bool) {
        let Some(saved) = self.saved_settings.take() else {
            return;
        };
        let locals = std::mem::take(&mut self.local_settings);
        let mut restored = self.settings.clone();
        if commit {
            for key in locals {
                match saved.get(&key) {
                    Some(v) => restored.insert(key, v.clone()),
                    None => restored.remove(&key),
                };
            }
        } else {
            restored = saved;
        }
        self.savepoint_settings.clear();
        self.apply_settings(restored);
    }

    /// Makes `restored` the session's settings, sending the reported
    /// parameters that change to the client again.
    fn apply_settings(&mut self, restored: BTreeMap<String, String>) {
        if restored == self.settings {
            return;
        }
        for key in REPORTED {
            if let Some(v) = restored
                .get(*key)
                .filter(|v| self.settings.get(*key) != Some(*v))
            {
                parameter_status::encode(&mut self.out, key, v);
            }
        }
        self.settings = restored;
        self.publish_settings();
    }

    async fn end(&mut self) {
        let _ = self.finish(false).await;
        self.engine.release_advisory(self.key.pid);
    }

    /// Runs statements that write and return nothing (DDL's steps,
    /// TRUNCATE's deletes) under the writer lease, all or none: in the open
    /// transaction, or one of their own.
    async fn write_steps(&mut self, steps: &[crate::ddl::Step]) -> Result<(), Failure> {
        let autocommit = matches!(self.tx, Tx::Idle);
        self.take_lease(None).await?;
        let mut result = Ok(());
        for step in steps {
            result = match step {
                crate::ddl::Step::Sql(sql) => self.sqlite_batch(sql.clone()).await,
                crate::ddl::Step::DropTable(name) => {
                    self.sqlite_batch(format!(
                        "DROP TABLE {}",
                        cutover_sqlite::schema_map::quote(name)
                    ))
                    .await
                }
                crate::ddl::Step::Record(sql) => {
                    let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
                    let recorded = conn
                        .query_row(
                            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                            [cutover_sqlite::schema_map::DECLARED_TYPES],
                            |r| r.get::<_, i64>(0),
                        )
                        .map_err(|e| from_sqlite(&e, &self.schema.map));
                    match recorded {
                        Ok(0) => Ok(()),
                        Ok(_) => conn
                            .execute_batch(sql)
                            .map_err(|e| from_sqlite(&e, &self.schema.map)),
                        Err(e) => Err(e),
                    }
                }
                crate::ddl::Step::AlterColumn {
                    table,
                    column,
                    change,
                } => {
                    let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
                    crate::rewrite::alter_column(&conn, table, column, change, &self.schema.map)
                }
                crate::ddl::Step::AddConstraint {
                    table,
                    constraint,
                    verify,
                } => {
                    let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
                    crate::rewrite::add_constraint(
                        &conn,
                        table,
                        constraint,
                        verify,
                        &self.schema.map,
                    )
                }
            };
            if result.is_err() {
                break;
            }
        }
        if autocommit {
            if result.is_ok() {
                self.finish(true).await?;
            } else {
                let _ = self.finish(false).await;
            }
        }
        result
    }

    /// Runs SQL that returns nothing. The session has a thread of its
    /// own, so SQLite runs right here.
    async fn sqlite_batch(&self, sql: String) -> Result<(), Failure> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute_batch(&sql)
            .map_err(|e| from_sqlite(&e, &self.schema.map))
    }

    /// A statement's result columns and whether it only reads, worked
    /// out once per statement text and schema version.
    fn shape(&mut self, t: &Translated) -> Result<Arc<Shape>, Failure> {
        let key = (self.schema.version, t.sql.clone());
        if let Some(s) = self.shapes.get(&key) {
            return Ok(s.clone());
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let stmt = conn
            .prepare_cached(&t.sql)
            .map_err(|e| from_sqlite(&e, &self.schema.map))?;
        let shape = Arc::new(Shape {
            fields: describe_columns(&stmt, t, &self.schema),
            readonly: stmt.readonly(),
        });
        drop(stmt);
        drop(conn);
        if self.shapes.len() >= 1024 {
            self.shapes.clear();
        }
        self.shapes.insert(key, shape.clone());
        Ok(shape)
    }

    /// Result columns of a statement without running it.
    async fn columns(
        &mut self,
        t: &Translated,
    ) -> Result<Vec<(Field, PgType, Option<Column>)>, Failure> {
        Ok(self.shape(t)?.fields.clone())
    }

    async fn run_sql(
        &mut self,
        t: &Translated,
        params: Vec<Value>,
        formats: Option<&bind::Bind>,
    ) -> Result<Output, Failure> {
        let shape = self.shape(t)?;
        let readonly = shape.readonly;
        let writes = !readonly || t.lock.is_some();
        let autocommit = matches!(self.tx, Tx::Idle) && writes;
        if writes {
            if self
                .settings
                .get("default_transaction_read_only")
                .map(String::as_str)
                == Some("on")
                && !readonly
            {
                return Err(Failure::new(
                    "25006",
                    format!("cannot execute {} in a read-only transaction", t.verb),
                ));
            }
            self.take_lease(t.lock).await?;
        }
        let result = self.step(t, &shape, params, formats);
        if autocommit {
            match &result {
                Ok(_) => {
                    self.finish(true).await?;
                }
                Err(_) => {
                    let _ = self.finish(false).await;
                }
            }
        }
        result
    }

    /// Runs a statement; `statement_timeout` is kept by a timer on the
    /// proxy's runtime, since this thread is busy in SQLite meanwhile.
    fn step(
        &self,
        t: &Translated,
        shape: &Shape,
        params: Vec<Value>,
        formats: Option<&bind::Bind>,
    ) -> Result<Output, Failure> {
        let timeout = self.millis("statement_timeout");
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let timer = timeout.map(|d| {
            let interrupt = conn.get_interrupt_handle();
            self.timers.spawn(async move {
                tokio::time::sleep(d).await;
                interrupt.interrupt();
                true
            })
        });
        let result = execute(&conn, t, shape, &params, formats, &self.schema);
        drop(conn);
        if result.as_ref().is_err_and(|f| f.code() == "0A000") {
            // Perhaps the file's schema changed: look at the next statement.
            self.schema_seen
                .set((0, std::time::Instant::now() - SCHEMA_CHECK));
        }
        if let Some(timer) = timer {
            let fired = timer.is_finished();
            timer.abort();
            if fired {
                if let Err(f) = &result {
                    if f.code() == "57014" {
                        return Err(Failure::new(
                            "57014",
                            "canceling statement due to statement timeout",
                        ));
                    }
                }
            }
        }
        result
    }
}

/// A command that controls the transaction itself, or COPY (whose data
/// outlives its Execute): run outside any implicit transaction.
fn manages(command: &Command) -> bool {
    matches!(
        command,
        Command::Begin
            | Command::Commit
            | Command::Rollback
            | Command::Savepoint(_)
            | Command::Release(_)
            | Command::RollbackTo(_)
            | Command::Copy(_)
    )
}

/// A statement that controls the transaction itself (or, as COPY FROM
/// STDIN, outlives its query string): a query string holding one runs
/// statement by statement.
fn manages_transaction(sql: &str) -> bool {
    let first = sql
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_end_matches(';')
        .to_ascii_uppercase();
    matches!(
        first.as_str(),
        "BEGIN"
            | "START"
            | "COMMIT"
            | "END"
            | "ROLLBACK"
            | "ABORT"
            | "SAVEPOINT"
            | "RELEASE"
            | "PREPARE"
            | "COPY"
    )
}

fn ends_transaction(sql: &str) -> bool {
    let first = sql
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    matches!(first.as_str(), "COMMIT" | "ROLLBACK" | "END" | "ABORT")
}

fn aborted() -> Failure {
    Failure::new(
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

fn text_field(name: &str) -> Field {
    Field {
        name: name.to_string(),
        table_oid: 0,
        column: 0,
        type_oid: PgType::Text.oid(),
        type_size: -1,
        type_modifier: -1,
        format: 0,
    }
}

/// Each result column's name, type and (for a table column) the column
/// that says how its values are stored.
fn describe_columns(
    stmt: &rusqlite::Statement<'_>,
    t: &Translated,
    schema: &Schema,
) -> Vec<(Field, PgType, Option<Column>)> {
    let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
    let count = names.len();
    let columns: Vec<_> = stmt.columns_with_metadata().collect();
    (0..count)
        .map(|i| {
            let origin = columns.get(i).and_then(|c| {
                let table = c.table_name()?;
                let column = c.origin_name()?;
                let (t_index, table) = schema
                    .typing
                    .tables
                    .iter()
                    .enumerate()
                    .find(|(_, t)| t.name == table)?;
                let (c_index, col) = table
                    .columns
                    .iter()
                    .enumerate()
                    .find(|(_, x)| x.name == column)?;
                Some((t_index, c_index, col.clone()))
            });
            let hint = if t.result_hints.len() == count {
                t.result_hints[i]
            } else {
                None
            };
            let (ty, column, table_oid, number) = match origin {
                Some((ti, ci, col)) => {
                    let ty = PgType::of_column(&col.pg_type);
                    // An expression over a column (max(x), x + 1) keeps the
                    // hint's type; the column still says how values are stored.
                    let ty = hint
                        .filter(|h| *h != ty && t.result_hints.len() == count)
                        .unwrap_or(ty);
                    // The catalog's own tables are not the file's.
                    let (oid, number) = if ti < schema.map.tables.len() {
                        (crate::catalog::table_oid(ti), (ci + 1) as i16)
                    } else {
                        (0, 0)
                    };
                    (ty, Some(col), oid, number)
                }
                None => (hint.unwrap_or(PgType::Text), None, 0, 0),
            };
            let modifier = column
                .as_ref()
                .and_then(|c| varchar_len(&c.pg_type))
                .map(|n| n + 4)
                .unwrap_or(-1);
            (
                Field {
                    name: names[i].clone(),
                    table_oid,
                    column: number,
                    type_oid: ty.oid(),
                    type_size: ty.size(),
                    type_modifier: if ty == PgType::Varchar { modifier } else { -1 },
                    format: 0,
                },
                ty,
                column,
            )
        })
        .collect()
}

fn varchar_len(pg_type: &str) -> Option<i32> {
    pg_type
        .strip_prefix("varchar(")?
        .strip_suffix(')')?
        .parse()
        .ok()
}

/// Runs a translated statement on the session's connection and encodes
/// its rows.
fn execute(
    conn: &Connection,
    t: &Translated,
    shape: &Shape,
    params: &[Value],
    formats: Option<&bind::Bind>,
    schema: &Schema,
) -> Result<Output, Failure> {
    let map = &schema.map;
    let mut stmt = conn
        .prepare_cached(&t.sql)
        .map_err(|e| from_sqlite(&e, map))?;
    let mut fields = shape.fields.clone();
    for (i, (f, _, _)) in fields.iter_mut().enumerate() {
        f.format = formats.map(|b| b.result_format(i)).unwrap_or(0);
    }
    let expected = stmt.parameter_count();
    if params.len() < expected {
        return Err(Failure::new(
            "08P01",
            format!(
                "bind message supplies {} parameters, but the statement requires {expected}",
                params.len()
            ),
        ));
    }
    for (i, p) in params.iter().enumerate().take(expected) {
        stmt.raw_bind_parameter(i + 1, p)
            .map_err(|e| from_sqlite(&e, map))?;
    }
    let mut rows_out = Vec::new();
    {
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(|e| from_sqlite(&e, map))? {
            // SQLite prepared the statement again for a schema changed by
            // another process since it was described: as PostgreSQL's
            // cached plans, refuse rather than answer in the old shape.
            if row.as_ref().column_count() != fields.len() {
                return Err(Failure::new(
                    "0A000",
                    "cached plan must not change result type",
                ));
            }
            let mut values = Vec::with_capacity(fields.len());
            for (i, (field, ty, column)) in fields.iter().enumerate() {
                let v = row.get_ref(i).map_err(|e| from_sqlite(&e, map))?;
                let text = types::output_text(*ty, column.as_ref(), v);
                values.push(match (text, field.format) {
                    (None, _) => None,
                    (Some(text), 0) => Some(text.into_bytes()),
                    (Some(text), _) => Some(
                        types::binary(*ty, &text)
                            .map_err(|e| Failure::new("22P02", e.to_string()))?,
                    ),
                });
            }
            rows_out.push(values);
        }
    }
    let n = match t.verb {
        "SELECT" => rows_out.len() as u64,
        _ => conn.changes(),
    };
    let tag = match t.verb {
        "INSERT" => format!("INSERT 0 {n}"),
        verb => format!("{verb} {n}"),
    };
    // Only statements that return rows describe them.
    let returns_rows = t.verb == "SELECT" || !fields.is_empty();
    Ok(Output {
        fields: if returns_rows { fields } else { Vec::new() },
        rows: rows_out,
        tag,
        sent: 0,
    })
}
