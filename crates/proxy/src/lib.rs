//! The proxy's data path: the client listener, one session per client
//! (handshake, backend checkout, relay), cancel forwarding and graceful
//! shutdown. Sessions are pinned: a client owns a session on the primary
//! (moved to the new primary after promote or rollback) and, while the read
//! dial is up, a read-only session on the secondary.

mod cancel;
pub mod classify;
pub mod relay;
mod route;
mod session;
pub mod shadow;
pub mod traffic;

use cancel::CancelRegistry;
use cutover_backend::{BackendTls, Pool, PoolSettings, PoolSize};
use cutover_config::Config;
use cutover_control::{Backend, Metrics};
use cutover_wire::auth::Authenticator;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use traffic::Traffic;

/// Sessions a pool sized by the server may open before its first login
/// has asked the server (PostgreSQL's default max_connections).
const PROVISIONAL_POOL_SIZE: u32 = 100;
/// Sessions of the SQLite engine when `old.pool_size` is not set: each is a
/// SQLite connection, and writers queue for one lease anyway.
const EMBEDDED_POOL_SIZE: u32 = 64;

/// How long a client may take to complete startup and authentication
/// (PostgreSQL's authentication_timeout default).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Tls(#[from] cutover_wire::tls::TlsError),
    #[error("{backend}.url: {reason}")]
    BackendTls { backend: String, reason: String },
}

/// Everything sessions share.
pub(crate) struct Shared {
    pub config: Config,
    /// What a configuration reload changes: who may log in and how reads
    /// are drawn. Sessions take them when they start.
    reloadable: std::sync::RwLock<Reloadable>,
    pub tls: Option<TlsAcceptor>,
    /// The TLS certificate's `tls-server-end-point` hash (SCRAM-SHA-256-PLUS).
    pub channel_binding: Option<Vec<u8>>,
    pub pools: Pools,
    pub traffic: Arc<Traffic>,
    pub metrics: Arc<Metrics>,
    pub cancels: CancelRegistry,
    pub next_session: AtomicU64,
    pub clients: AtomicI64,
}

struct Reloadable {
    authenticator: Arc<Authenticator>,
    /// The users, whose passwords log sessions in to the backends.
    auth: cutover_config::AuthConfig,
    strategy: cutover_config::RoutingStrategy,
    /// `pool_size` of old and new as last applied.
    pool_sizes: (Option<u32>, Option<u32>),
}

impl Shared {
    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.reloadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .authenticator
            .clone()
    }

    /// The password `user` logs in to the backends with.
    pub fn password(&self, user: &str) -> Option<String> {
        self.reloadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .auth
            .user(user)
            .and_then(|u| u.password.clone())
    }

    pub fn strategy(&self) -> cutover_config::RoutingStrategy {
        self.reloadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .strategy
    }
}

/// One pool per configured backend. Read-only secondary sessions share
/// their backend's pool under a key with `default_transaction_read_only`.
pub struct Pools {
    pub old: Pool,
    pub new: Option<Pool>,
    /// Pools for other databases on either backend's server, made on first use.
    other: std::sync::Mutex<std::collections::HashMap<(Backend, String), Pool>>,
}

impl Pools {
    pub fn get(&self, backend: Backend) -> Option<&Pool> {
        match backend {
            Backend::Old => Some(&self.old),
            Backend::New => self.new.as_ref(),
        }
    }

    /// The pool for `database` on `backend`'s server: the same settings as
    /// that backend's pool, another database.
    pub fn other(&self, backend: Backend, database: &str) -> Option<Pool> {
        let template = self.get(backend)?.settings().clone();
        let mut other = self.other.lock().unwrap_or_else(|p| p.into_inner());
        let pool = other
            .entry((backend, database.to_string()))
            .or_insert_with(|| {
                Pool::new(PoolSettings {
                    database: database.to_string(),
                    size: PoolSize::FromServer {
                        until_known: PROVISIONAL_POOL_SIZE,
                    },
                    ..template
                })
            });
        Some(pool.clone())
    }
}

#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// `old_engine` is the SQLite engine when `[old]` is a SQLite file.
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        traffic: Arc<Traffic>,
        old_engine: Option<cutover_backend::EmbeddedBackend>,
    ) -> Result<Proxy, ProxyError> {
        let tls = match &config.proxy.tls {
            Some(files) => Some(cutover_wire::tls::acceptor(&files.cert, &files.key)?),
            None => None,
        };
        let channel_binding = match &config.proxy.tls {
            Some(files) => Some(cutover_wire::tls::server_end_point(&files.cert)?),
            None => None,
        };
        let pool = |name: &str,
                    backend: &cutover_config::BackendConfig,
                    embedded: Option<cutover_backend::EmbeddedBackend>| {
            let tls = BackendTls::new(&backend.url).map_err(|reason| ProxyError::BackendTls {
                backend: name.to_string(),
                reason,
            })?;
            let size = match (backend.pool_size, &embedded) {
                (Some(n), _) => PoolSize::Fixed(n),
                // Each engine session is a SQLite connection of its own.
                (None, Some(_)) => PoolSize::Fixed(EMBEDDED_POOL_SIZE),
                (None, None) => PoolSize::FromServer {
                    until_known: PROVISIONAL_POOL_SIZE,
                },
            };
            Ok::<_, ProxyError>(Pool::new(PoolSettings {
                backend: name.to_string(),
                address: backend.url.address(),
                database: backend.url.database.clone(),
                tls,
                embedded,
                size,
                connect_timeout: config.proxy.connect_timeout,
                checkout_timeout: config.proxy.pool_timeout,
            }))
        };
        traffic.shadow.configure(
            config.routing.shadow_percent,
            config.routing.shadow_concurrency,
        );
        let pools = Pools {
            old: pool("old", &config.old, old_engine)?,
            new: config
                .new
                .as_ref()
                .map(|b| pool("new", b, None))
                .transpose()?,
            other: Default::default(),
        };
        Ok(Proxy {
            shared: Arc::new(Shared {
                reloadable: std::sync::RwLock::new(Reloadable {
                    authenticator: Arc::new(Authenticator::new(&config.auth)),
                    auth: config.auth.clone(),
                    strategy: config.routing.strategy,
                    pool_sizes: (
                        config.old.pool_size,
                        config.new.as_ref().and_then(|n| n.pool_size),
                    ),
                }),
                tls,
                channel_binding,
                pools,
                traffic,
                metrics,
                cancels: CancelRegistry::default(),
                next_session: AtomicU64::new(1),
                clients: AtomicI64::new(0),
                config,
            }),
        })
    }

    /// Applies what a configuration reload may change without a restart:
    /// the users and the authentication method (for logins from now on),
    /// the read dial's strategy (for sessions from now on), the shadow
    /// settings and the pool sizes.
    pub fn reload(&self, config: &Config) {
        let pool_sizes = (
            config.old.pool_size,
            config.new.as_ref().and_then(|n| n.pool_size),
        );
        let before = std::mem::replace(
            &mut *self
                .shared
                .reloadable
                .write()
                .unwrap_or_else(|p| p.into_inner()),
            Reloadable {
                authenticator: Arc::new(Authenticator::new(&config.auth)),
                auth: config.auth.clone(),
                strategy: config.routing.strategy,
                pool_sizes,
            },
        );
        self.shared.traffic.shadow.configure(
            config.routing.shadow_percent,
            config.routing.shadow_concurrency,
        );
        let size = |n: Option<u32>| match n {
            Some(n) => PoolSize::Fixed(n),
            None => PoolSize::FromServer {
                until_known: PROVISIONAL_POOL_SIZE,
            },
        };
        if before.pool_sizes.0 != pool_sizes.0 {
            let old = &self.shared.pools.old;
            let embedded = old.settings().embedded.is_some();
            old.set_size(match pool_sizes.0 {
                None if embedded => PoolSize::Fixed(EMBEDDED_POOL_SIZE),
                n => size(n),
            });
        }
        if let Some(pool) = self
            .shared
            .pools
            .new
            .as_ref()
            .filter(|_| before.pool_sizes.1 != pool_sizes.1)
        {
            pool.set_size(size(pool_sizes.1));
        }
    }

    /// The backend pools.
    pub fn pools(&self) -> &Pools {
        &self.shared.pools
    }

    /// Clients connected and logged in now.
    pub fn clients(&self) -> i64 {
        self.shared.clients.load(Ordering::Relaxed)
    }

    /// Accepts clients until `shutdown` resolves; then stops accepting, lets
    /// sessions finish for up to `proxy.shutdown_timeout`, closes the rest
    /// with 57P01 as PostgreSQL's fast shutdown would, and returns once every
    /// session task has ended.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let (close_tx, close_rx) = watch::channel(false);
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let shared = self.shared.clone();
                        let close = close_rx.clone();
                        sessions.spawn(session::run(shared, tcp, peer, close));
                    }
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        drop(listener);
        let timeout = self.shared.config.proxy.shutdown_timeout;
        tracing::info!(
            sessions = sessions.len(),
            ?timeout,
            "stopped accepting; waiting for sessions to finish"
        );
        let drained = tokio::time::timeout(timeout, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                sessions = sessions.len(),
                "shutdown timeout reached; closing remaining sessions"
            );
            let _ = close_tx.send(true);
            if tokio::time::timeout(Duration::from_secs(5), async {
                while sessions.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                sessions.abort_all();
            }
        }
        self.shared.pools.old.close_idle().await;
        if let Some(new) = &self.shared.pools.new {
            new.close_idle().await;
        }
    }
}
