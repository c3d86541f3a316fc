//! A pool of backend sessions for one backend, keyed by who logs in and with
//! which startup parameters, capped at `pool_size` open sessions — or, by
//! default, at what the server itself accepts (`max_connections` less the
//! slots it reserves), learned on the first login, so cutover never turns
//! a client away that the database would have taken.
//!
//! A checkout is a guard. When it drops, the session goes back to the pool
//! only if the proxy marked it clean enough to reset (no reply outstanding);
//! the reset (ROLLBACK if needed, then DISCARD ALL) runs in its own task, and
//! a session that fails it is closed. Anything else is closed on drop: a
//! half-read reply must never reach the next client.

use crate::connection::{BackendConnection, ConnectError, LoginTarget};
use crate::scram::ScramCache;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a returned session may take to reset before it is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// `old` or `new`.
    pub backend: String,
    pub address: String,
    pub database: String,
    /// TLS to the backend, from its URL.
    pub tls: crate::BackendTls,
    /// Set when the backend runs inside cutover (a SQLite file).
    pub embedded: Option<crate::EmbeddedBackend>,
    pub size: PoolSize,
    pub connect_timeout: Duration,
    pub checkout_timeout: Duration,
}

/// How many sessions a pool may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    Fixed(u32),
    /// As many as the server accepts for non-superusers; until the first
    /// login has asked, this many.
    FromServer {
        until_known: u32,
    },
}

/// What the server accepts for ordinary roles: `max_connections` less the
/// superuser-reserved slots (and `reserved_connections` where it exists).
const SERVER_LIMIT_SQL: &str = "SELECT (current_setting('max_connections')::int \
     - current_setting('superuser_reserved_connections')::int \
     - coalesce(current_setting('reserved_connections', true)::int, 0))::text";

/// Sessions are interchangeable only for the same user and startup parameters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub params: Vec<(String, String)>,
}

/// A point-in-time view of the pool, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub size: u32,
    pub in_use: i64,
    pub idle: i64,
    pub waiting: i64,
    pub connect_failures: u64,
}

struct Idle {
    conn: BackendConnection,
    permit: OwnedSemaphorePermit,
}

struct Inner {
    settings: PoolSettings,
    /// One permit per open session, idle or in use.
    permits: Arc<Semaphore>,
    /// The cap in force; with `PoolSize::FromServer`, set once learned.
    size: AtomicU32,
    size_known: AtomicBool,
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    returned: Notify,
    scram: ScramCache,
    in_use: AtomicI64,
    idle_count: AtomicI64,
    waiting: AtomicI64,
    connect_failures: AtomicU64,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Pool {
        let (size, known) = match settings.size {
            PoolSize::Fixed(n) => (n, true),
            PoolSize::FromServer { until_known } => (until_known, false),
        };
        Pool {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(size as usize)),
                size: AtomicU32::new(size),
                size_known: AtomicBool::new(known),
                settings,
                idle: Mutex::new(HashMap::new()),
                returned: Notify::new(),
                scram: ScramCache::default(),
                in_use: AtomicI64::new(0),
                idle_count: AtomicI64::new(0),
                waiting: AtomicI64::new(0),
                connect_failures: AtomicU64::new(0),
            }),
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.inner.settings
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            size: self.inner.size.load(Ordering::Relaxed),
            in_use: self.inner.in_use.load(Ordering::Relaxed),
            idle: self.inner.idle_count.load(Ordering::Relaxed),
            waiting: self.inner.waiting.load(Ordering::Relaxed),
            connect_failures: self.inner.connect_failures.load(Ordering::Relaxed),
        }
    }

    /// A session for `key`: an idle one, a new one, or (when the pool is
    /// full) the first to come free within the checkout timeout.
    pub async fn checkout(
        &self,
        key: PoolKey,
        password: Option<&str>,
    ) -> Result<Checkout, ConnectError> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.settings.checkout_timeout;
        let mut waiting = false;
        let permit = loop {
            let returned = inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(idle) = self.take_idle(&key) {
                self.stop_waiting(&mut waiting);
                return Ok(self.guard(key, idle.conn, idle.permit, false));
            }
            if let Ok(permit) = inner.permits.clone().try_acquire_owned() {
                break permit;
            }
            // Full: a session idling for another user/parameters makes room.
            if let Some(idle) = self.take_any_idle() {
                tokio::spawn(idle.conn.terminate());
                break idle.permit;
            }
            if !waiting {
                waiting = true;
                inner.waiting.fetch_add(1, Ordering::Relaxed);
            }
            tokio::select! {
                _ = returned => {}
                permit = inner.permits.clone().acquire_owned() => {
                    if let Ok(permit) = permit {
                        break permit;
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    self.stop_waiting(&mut waiting);
                    return Err(ConnectError::PoolTimeout {
                        backend: inner.settings.backend.clone(),
                        waited: inner.settings.checkout_timeout,
                        size: inner.size.load(Ordering::Relaxed),
                    });
                }
            }
        };
        self.stop_waiting(&mut waiting);
        let target = LoginTarget {
            backend: &inner.settings.backend,
            address: &inner.settings.address,
            database: &inner.settings.database,
            user: &key.user,
            password,
            params: &key.params,
            timeout: inner.settings.connect_timeout,
            scram: &inner.scram,
            tls: &inner.settings.tls,
            embedded: inner.settings.embedded.as_ref(),
        };
        match BackendConnection::connect(&target).await {
            Ok(mut conn) => {
                if !inner.size_known.swap(true, Ordering::SeqCst) {
                    self.learn_size(&mut conn).await;
                }
                Ok(self.guard(key, conn, permit, true))
            }
            Err(e) => {
                inner.connect_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Asks the server how many sessions it accepts and makes that the cap.
    async fn learn_size(&self, conn: &mut BackendConnection) {
        let inner = &self.inner;
        let limit = match conn.query_value(SERVER_LIMIT_SQL).await {
            Ok(Some(text)) => text.parse::<u32>().ok().filter(|n| *n > 0),
            _ => None,
        };
        let Some(limit) = limit else {
            tracing::warn!(backend = %inner.settings.backend, "could not ask the server for max_connections; the pool keeps its provisional size");
            return;
        };
        self.resize(limit);
        tracing::info!(backend = %inner.settings.backend, size = inner.size.load(Ordering::SeqCst), "pool size taken from the server's max_connections");
    }

    /// Makes `limit` the cap. Growing takes effect at once; shrinking takes
    /// the sessions free now, and the cap stays above `limit` by the
    /// sessions in use beyond it.
    fn resize(&self, limit: u32) {
        let inner = &self.inner;
        let before = inner.size.load(Ordering::SeqCst);
        if limit > before {
            inner.permits.add_permits((limit - before) as usize);
            inner.size.store(limit, Ordering::SeqCst);
        } else {
            let forgotten = inner.permits.forget_permits((before - limit) as usize) as u32;
            inner.size.store(before - forgotten, Ordering::SeqCst);
        }
    }

    /// A new size setting (a configuration reload): a fixed size applies
    /// now; "from the server" is asked again at the next login.
    pub fn set_size(&self, size: PoolSize) {
        match size {
            PoolSize::Fixed(n) => {
                self.resize(n);
                self.inner.size_known.store(true, Ordering::SeqCst);
            }
            PoolSize::FromServer { .. } => self.inner.size_known.store(false, Ordering::SeqCst),
        }
    }

    fn stop_waiting(&self, waiting: &mut bool) {
        if std::mem::take(waiting) {
            self.inner.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn guard(
        &self,
        key: PoolKey,
        conn: BackendConnection,
        permit: OwnedSemaphorePermit,
        fresh: bool,
    ) -> Checkout {
        self.inner.in_use.fetch_add(1, Ordering::Relaxed);
        Checkout {
            conn: Some(conn),
            permit: Some(permit),
            key: Some(key),
            pool: self.clone(),
            on_return: OnReturn::Close,
            fresh,
        }
    }

    fn take_idle(&self, key: &PoolKey) -> Option<Idle> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(candidate) = list.pop() {
            self.inner.idle_count.fetch_sub(1, Ordering::Relaxed);
            if candidate.conn.looks_alive() {
                return Some(candidate);
            }
        }
        None
    }

    fn take_any_idle(&self) -> Option<Idle> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        let found = idle.values_mut().find_map(|list| list.pop());
        if found.is_some() {
            self.inner.idle_count.fetch_sub(1, Ordering::Relaxed);
        }
        found
    }

    fn put_idle(&self, key: PoolKey, conn: BackendConnection, permit: OwnedSemaphorePermit) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.entry(key).or_default().push(Idle { conn, permit });
        self.inner.idle_count.fetch_add(1, Ordering::Relaxed);
        drop(idle);
        self.inner.returned.notify_waiters();
    }

    /// Closes every idle session (at shutdown).
    pub async fn close_idle(&self) {
        let drained: Vec<Idle> = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.drain().flat_map(|(_, list)| list).collect()
        };
        self.inner
            .idle_count
            .fetch_sub(drained.len() as i64, Ordering::Relaxed);
        for Idle { conn, .. } in drained {
            conn.terminate().await;
        }
    }
}

/// What to do with the session when the checkout drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReturn {
    /// Close it (the default: mid-reply, COPY, broken, unknown).
    Close,
    /// Idle at a message boundary: DISCARD ALL and pool it.
    Reset,
    /// Inside a transaction at a message boundary: ROLLBACK, DISCARD ALL, pool it.
    RollbackAndReset,
}

/// A backend session lent to one client.
pub struct Checkout {
    conn: Option<BackendConnection>,
    permit: Option<OwnedSemaphorePermit>,
    key: Option<PoolKey>,
    pool: Pool,
    on_return: OnReturn,
    /// True when this session was logged in for this checkout (not reused).
    pub fresh: bool,
}

impl Checkout {
    pub fn conn(&mut self) -> &mut BackendConnection {
        self.conn.as_mut().expect("connection present until drop")
    }

    pub fn conn_ref(&self) -> &BackendConnection {
        self.conn.as_ref().expect("connection present until drop")
    }

    /// Decides what happens to the session when this checkout drops.
    pub fn on_return(&mut self, what: OnReturn) {
        self.on_return = what;
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        self.pool.inner.in_use.fetch_sub(1, Ordering::Relaxed);
        let (Some(mut conn), Some(permit), Some(key)) =
            (self.conn.take(), self.permit.take(), self.key.take())
        else {
            return;
        };
        let statements: &'static [&'static str] = match self.on_return {
            OnReturn::Close => return,
            OnReturn::Reset => &["DISCARD ALL"],
            OnReturn::RollbackAndReset => &["ROLLBACK", "DISCARD ALL"],
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.pool.clone();
        runtime.spawn(async move {
            let reset = tokio::time::timeout(RESET_TIMEOUT, conn.run_quietly(statements)).await;
            if let Ok(Ok(())) = reset {
                pool.put_idle(key, conn, permit);
            } else {
                pool.inner.returned.notify_waiters();
            }
        });
    }
}
