//! The cutover daemon assembled: the proxy listener, the admin API and the
//! backend health prober, started together and stopped together. The binary
//! (`main.rs`) parses the command line and calls into this; tests start the
//! same [`Server`] in-process.

pub mod cli_http;

use cutover_admin::{AdminSource, BoxFuture};
use cutover_config::{BackendConfig, Config};
use cutover_control::{BackendStatus, Health, Metrics, Phase, PoolStatus, Status};
use cutover_proxy::Proxy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often each backend is probed for `/v1/status` and `cutover_backend_up`.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] cutover_proxy::ProxyError),
}

/// The parts the admin API reports on.
struct Daemon {
    config: Config,
    proxy: Proxy,
    metrics: Arc<Metrics>,
    started: Instant,
    old_health: Health,
    new_health: Health,
    /// Salted passwords for the control-plane logins of the probes.
    scram: cutover_backend::ScramCache,
}

impl Daemon {
    fn backend_status(
        &self,
        name: &str,
        role: &str,
        cfg: &BackendConfig,
        health: &Health,
        pool: Option<PoolStatus>,
    ) -> BackendStatus {
        let (healthy, last_error) = health.view();
        BackendStatus {
            name: name.to_string(),
            role: role.to_string(),
            address: cfg.url.address(),
            database: cfg.url.database.clone(),
            healthy,
            last_error,
            pool,
        }
    }

    fn pool_status(&self) -> PoolStatus {
        let s = self.proxy.primary_pool().stats();
        PoolStatus {
            size: s.size,
            in_use: s.in_use,
            idle: s.idle,
            waiting: s.waiting,
        }
    }
}

impl AdminSource for Daemon {
    fn status(&self) -> Status {
        let mut backends = vec![self.backend_status(
            "old",
            "primary",
            &self.config.old,
            &self.old_health,
            Some(self.pool_status()),
        )];
        if let Some(new) = &self.config.new {
            backends.push(self.backend_status("new", "secondary", new, &self.new_health, None));
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            phase: Phase::Passthrough.name().to_string(),
            clients: self.proxy.clients(),
            backends,
        }
    }

    fn metrics(&self) -> String {
        let pool = self.pool_status();
        let gauge = &self.metrics.pool_connections;
        gauge.with_label_values(&["old", "in_use"]).set(pool.in_use);
        gauge.with_label_values(&["old", "idle"]).set(pool.idle);
        gauge
            .with_label_values(&["old", "waiting"])
            .set(pool.waiting);
        self.metrics.render()
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            cutover_backend::probe("old", &self.config.old.url, PROBE_TIMEOUT, &self.scram)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// A running daemon. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds both listeners and starts serving. A backend that is down does
    /// not stop the start: clients get its connection error until it is back.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let proxy = Proxy::new(config.clone(), metrics.clone())?;
        let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        let proxy_addr = local_addr(&proxy_listener, config.proxy.listen);
        let admin_addr = local_addr(&admin_listener, config.admin.listen);
        let daemon = Arc::new(Daemon {
            config,
            proxy: proxy.clone(),
            metrics,
            started: Instant::now(),
            old_health: Health::default(),
            new_health: Health::default(),
            scram: cutover_backend::ScramCache::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn({
            let stopped = stopped.clone();
            async move { proxy.serve(proxy_listener, until_stopped(stopped)).await }
        }));
        tasks.push(tokio::spawn({
            let source: Arc<dyn AdminSource> = daemon.clone();
            let stopped = stopped.clone();
            async move {
                if let Err(e) =
                    cutover_admin::serve(admin_listener, source, until_stopped(stopped)).await
                {
                    tracing::error!(error = %e, "admin API stopped");
                }
            }
        }));
        tasks.push(tokio::spawn(probe_backends(daemon, until_stopped(stopped))));
        tracing::info!(%proxy_addr, %admin_addr, "cutover is serving");
        Ok(Server {
            proxy_addr,
            admin_addr,
            stop,
            tasks,
        })
    }

    /// Stops accepting, lets sessions finish (up to `proxy.shutdown_timeout`),
    /// and returns when everything has stopped.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local_addr(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

async fn probe_backends(daemon: Arc<Daemon>, stopped: impl std::future::Future<Output = ()>) {
    tokio::pin!(stopped);
    loop {
        let mut targets = vec![("old", &daemon.config.old, &daemon.old_health)];
        if let Some(new) = &daemon.config.new {
            targets.push(("new", new, &daemon.new_health));
        }
        for (name, cfg, health) in targets {
            let result = cutover_backend::probe(name, &cfg.url, PROBE_TIMEOUT, &daemon.scram).await;
            daemon
                .metrics
                .backend_up
                .with_label_values(&[name])
                .set(i64::from(result.is_ok()));
            if let Err(e) = &result {
                tracing::warn!(backend = name, error = %e, "backend health probe failed");
            }
            health.record(result.map(|_| ()).map_err(|e| e.to_string()));
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
