//! The SQLite engine: a PostgreSQL server for one SQLite file, so an app
//! that switched its driver to PostgreSQL keeps running on its SQLite data
//! until the migration moves the data underneath. This crate owns the
//! protocol sessions (`session`), the translation of PostgreSQL-dialect SQL
//! (`translate`), types from the schema map (`types`), the functions
//! PostgreSQL has and SQLite lacks (`functions`), SQLite's errors in
//! PostgreSQL's terms (`errors`), and the concurrency: one writer lease,
//! FIFO, for the whole file; readers on their own connections.
//!
//! To the rest of cutover it is a backend like any other: the proxy reaches
//! it through [`Engine::connect`], an in-memory byte stream speaking the
//! protocol; tests can also give it a TCP listener of its own.

mod builtins;
mod catalog;
mod copy;
mod ddl;
mod decimal;
mod errors;
mod functions;
mod rewrite;
mod session;
mod time;
pub mod translate;
pub mod types;

use cutover_sqlite::rusqlite::{self, Connection, InterruptHandle, OpenFlags};
use cutover_sqlite::{ColumnSetting, SchemaMap};
use cutover_wire::messages::backend_key_data::CancelKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use translate::Command;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("SQLite file {path}: {reason}")]
    Open { path: String, reason: String },
}

/// One SQLite file served as a PostgreSQL database.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    path: PathBuf,
    pub(crate) database: String,
    overrides: Vec<ColumnSetting>,
    /// The file's schema as last read; sessions follow the file's
    /// `schema_version` and read it again when it moves.
    schema: Mutex<Arc<Schema>>,
    /// Held while the schema is read again, so it is read once.
    rereading: Mutex<()>,
    /// DDL statements run through the engine, so sessions look at the
    /// schema at once.
    pub(crate) ddl_generation: std::sync::atomic::AtomicU64,
    /// The writer lease: whoever holds it may write to the file. tokio's
    /// mutex queues waiters in order.
    pub(crate) writer: Arc<tokio::sync::Mutex<()>>,
    next_pid: AtomicI32,
    sessions: Mutex<HashMap<i32, (i32, Option<InterruptHandle>)>>,
    /// NOTIFY between sessions: (sender pid, channel, payload).
    pub(crate) notify: tokio::sync::broadcast::Sender<(i32, String, String)>,
    advisory: Arc<AdvisoryLocks>,
}

/// The file's schema at one `schema_version`, and what depends on it.
pub(crate) struct Schema {
    pub(crate) version: i64,
    pub(crate) map: Arc<SchemaMap>,
    /// The file's tables and the catalog's, for typing statements.
    pub(crate) typing: Arc<SchemaMap>,
    /// Translations by statement text.
    cache: Mutex<HashMap<String, Arc<Command>>>,
}

impl Schema {
    fn new(version: i64, map: SchemaMap) -> Schema {
        let mut typing = map.clone();
        typing.tables.extend(catalog::tables());
        Schema {
            version,
            map: Arc::new(map),
            typing: Arc::new(typing),
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn cached(&self, sql: &str) -> Option<Arc<Command>> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sql)
            .cloned()
    }

    pub(crate) fn command(&self, sql: &str) -> Result<Arc<Command>, translate::SqlError> {
        if let Some(c) = self.cached(sql) {
            return Ok(c);
        }
        let command = Arc::new(translate::command(sql, &self.typing)?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(sql.to_string(), command.clone());
        Ok(command)
    }
}

/// The file's `schema_version`, which SQLite moves at every change to its
/// schema (by any process).
pub(crate) fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA schema_version")?
        .query_row([], |r| r.get(0))
}

/// Advisory locks held: key to (session pid, times taken), and the
/// condition waiters sleep on.
type AdvisoryLocks = (Mutex<HashMap<i64, (i32, u32)>>, Condvar);

/// How many translations are kept before the cache starts over.
const CACHE_LIMIT: usize = 4096;

impl Engine {
    /// Opens the file (which must exist), switches it to WAL, and reads its
    /// schema map; clients will name the database `database`.
    pub fn open(
        path: &Path,
        database: &str,
        overrides: &[ColumnSetting],
    ) -> Result<Engine, EngineError> {
        let fail = |reason: String| EngineError::Open {
            path: path.display().to_string(),
            reason,
        };
        if !path.exists() {
            return Err(fail("no such file".to_string()));
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| fail(e.to_string()))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| fail(e.to_string()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fail(format!(
                "journal_mode is {mode} and could not be set to WAL; readers and the writer need WAL to run side by side"
            )));
        }
        let version = schema_version(&conn).map_err(|e| fail(e.to_string()))?;
        drop(conn);
        let map = SchemaMap::read_file(path, overrides, 2).map_err(|e| fail(e.to_string()))?;
        Ok(Engine {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                database: database.to_string(),
                overrides: overrides.to_vec(),
                schema: Mutex::new(Arc::new(Schema::new(version, map))),
                rereading: Mutex::new(()),
                ddl_generation: std::sync::atomic::AtomicU64::new(0),
                writer: Arc::new(tokio::sync::Mutex::new(())),
                next_pid: AtomicI32::new(1),
                sessions: Mutex::new(HashMap::new()),
                notify: tokio::sync::broadcast::channel(1024).0,
                advisory: Arc::new((Mutex::new(HashMap::new()), Condvar::new())),
            }),
        })
    }

    pub fn database(&self) -> &str {
        &self.inner.database
    }

    /// The file's schema map as the engine last read it.
    pub fn schema_map(&self) -> Arc<SchemaMap> {
        self.inner.schema().map.clone()
    }

    /// A new session: the client's end of an in-memory stream whose other
    /// end the engine serves.
    /// Each session runs on a thread of its own, so SQLite's calls block
    /// only that session; call from within a tokio runtime (its timers
    /// keep `statement_timeout`).
    pub fn connect(&self) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(64 * 1024);
        self.spawn_session(server);
        client
    }

    /// Serves sessions on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            self.spawn_session(tcp);
        }
    }

    fn spawn_session<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let inner = self.inner.clone();
        let timers = tokio::runtime::Handle::current();
        let spawned = std::thread::Builder::new()
            .name("cutover-sqlite".to_string())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(session::run(inner, stream, timers)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a SQLite session's runtime")
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a SQLite session's thread");
        }
    }

    /// The translation sessions run for `sql`, from the engine's cache
    /// (translated on first use).
    pub fn translation(&self, sql: &str) -> Result<Arc<Command>, translate::SqlError> {
        self.inner.schema().command(sql)
    }

    /// A CancelRequest for a session of this engine.
    pub fn cancel(&self, key: CancelKey) {
        self.inner.cancel(key);
    }
}

impl Inner {
    pub(crate) fn register(&self) -> CancelKey {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        let secret = rand::random::<i32>();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid, (secret, None));
        CancelKey { pid, secret }
    }

    pub(crate) fn set_interrupt(&self, pid: i32, handle: InterruptHandle) {
        if let Some(entry) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&pid)
        {
            entry.1 = Some(handle);
        }
    }

    pub(crate) fn unregister(&self, pid: i32) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }

    pub(crate) fn cancel(&self, key: CancelKey) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((secret, Some(handle))) = sessions.get(&key.pid) {
            if *secret == key.secret {
                handle.interrupt();
            }
        }
    }

    pub(crate) fn schema(&self) -> Arc<Schema> {
        self.schema
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The schema at `version`, which `conn` has just seen: the engine's
    /// when it is at that version, else read again on `conn` — tables
    /// whose CREATE statement did not change keep their types and codecs —
    /// and, when `conn` is outside a transaction (what it sees is
    /// committed), kept as the engine's.
    pub(crate) fn schema_at(
        &self,
        version: i64,
        conn: &Connection,
    ) -> Result<Arc<Schema>, cutover_sqlite::SqliteError> {
        let _reading = self.rereading.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.schema();
        if current.version == version {
            return Ok(current);
        }
        let map = SchemaMap::reread(conn, &current.map, &self.overrides)?;
        let schema = Arc::new(Schema::new(version, map));
        if conn.is_autocommit() {
            *self.schema.lock().unwrap_or_else(|p| p.into_inner()) = schema.clone();
            tracing::info!(
                file = %self.path.display(),
                tables = schema.map.tables.len(),
                "the SQLite file's schema changed; read it again"
            );
        }
        Ok(schema)
    }

    /// A connection for one session, set up as every session needs it.
    pub(crate) fn open_connection(
        &self,
        clock: Arc<functions::SessionClock>,
        identity: Arc<functions::Identity>,
        map: &SchemaMap,
    ) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Another process writing holds SQLite's lock for the length of its
        // transaction; wait for it rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(60))?;
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA case_sensitive_like = ON;",
        )?;
        conn.set_prepared_statement_cache_capacity(256);
        let pid = identity.pid;
        catalog::install(&conn, map, &self.database)?;
        functions::install(&conn, clock, identity)?;
        builtins::install(&conn)?;
        self.install_advisory(&conn, pid)?;
        Ok(conn)
    }

    /// Session-level advisory locks, shared by the engine's sessions.
    fn install_advisory(&self, conn: &Connection, pid: i32) -> rusqlite::Result<()> {
        use rusqlite::functions::FunctionFlags;
        let flags = FunctionFlags::SQLITE_UTF8;
        let locks = self.advisory.clone();
        conn.create_scalar_function("pg_try_advisory_lock", 1, flags, move |ctx| {
            let key: i64 = ctx.get(0)?;
            let mut held = locks.0.lock().unwrap_or_else(|p| p.into_inner());
            Ok(take_advisory(&mut held, key, pid))
        })?;
        let locks = self.advisory.clone();
        conn.create_scalar_function("pg_advisory_lock", 1, flags, move |ctx| {
            let key: i64 = ctx.get(0)?;
            let mut held = locks.0.lock().unwrap_or_else(|p| p.into_inner());
            while !take_advisory(&mut held, key, pid) {
                held = locks.1.wait(held).unwrap_or_else(|p| p.into_inner());
            }
            Ok(String::new())
        })?;
        let locks = self.advisory.clone();
        conn.create_scalar_function("pg_advisory_unlock", 1, flags, move |ctx| {
            let key: i64 = ctx.get(0)?;
            let mut held = locks.0.lock().unwrap_or_else(|p| p.into_inner());
            let released = match held.get_mut(&key) {
                Some((owner, count)) if *owner == pid => {
                    *count -= 1;
                    if *count == 0 {
                        held.remove(&key);
                    }
                    true
                }
                _ => false,
            };
            locks.1.notify_all();
            Ok(released)
        })?;
        let locks = self.advisory.clone();
        conn.create_scalar_function("pg_advisory_unlock_all", 0, flags, move |_| {
            let mut held = locks.0.lock().unwrap_or_else(|p| p.into_inner());
            held.retain(|_, (owner, _)| *owner != pid);
            locks.1.notify_all();
            Ok(String::new())
        })?;
        Ok(())
    }

    /// Releases every advisory lock `pid` holds (DISCARD ALL, session end).
    pub(crate) fn release_advisory(&self, pid: i32) {
        let mut held = self.advisory.0.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, (owner, _)| *owner != pid);
        self.advisory.1.notify_all();
    }
}

fn take_advisory(held: &mut HashMap<i64, (i32, u32)>, key: i64, pid: i32) -> bool {
    match held.get_mut(&key) {
        Some((owner, count)) if *owner == pid => {
            *count += 1;
            true
        }
        Some(_) => false,
        None => {
            held.insert(key, (pid, 1));
            true
        }
    }
}
