//! The cutover daemon assembled: the proxy listener, the admin API and the
//! backend health prober, started together and stopped together. The binary
//! (`main.rs`) parses the command line and calls into this; tests start the
//! same [`Server`] in-process.

pub mod cli_http;
mod migration;
mod ramp;

use cutover_admin::{AdminSource, ApiError, BoxFuture, RampRequest, Transition, VerifyRequest};
use cutover_backend::{Embedded, EmbeddedBackend};
use cutover_config::{BackendConfig, Config};
use cutover_control::{Backend, BackendStatus, ControlState, Health, Metrics, PoolStatus, Status};
use cutover_engine::Engine;
use cutover_proxy::traffic::{Plane, Traffic};
use cutover_proxy::Proxy;
use cutover_stream::MirrorSettings;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
    #[error("{0}")]
    State(String),
    #[error("{0}")]
    Sqlite(#[from] cutover_engine::EngineError),
}

/// The parts the admin API reports on.
struct Daemon {
    config: Config,
    proxy: Proxy,
    /// The SQLite engine serving `[old]` when it is a SQLite file.
    old_engine: Option<EmbeddedBackend>,
    metrics: Arc<Metrics>,
    started: Instant,
    old_health: Health,
    new_health: Health,
    /// Salted passwords for the control-plane logins of the probes.
    scram: cutover_backend::ScramCache,
    /// The change stream matching the phase (from the primary).
    stream: Mutex<Option<migration::RunningStream>>,
    /// The current or last daemon-run verify, as `/v1/status` shows it.
    verify: Arc<Mutex<Option<serde_json::Value>>>,
    /// Transitions run one at a time.
    transitions: tokio::sync::Mutex<()>,
    traffic: Arc<Traffic>,
    last_pause: Mutex<Option<serde_json::Value>>,
    /// The current or last guarded ramp, and the running one's switch.
    ramp: Mutex<Option<ramp::Ramp>>,
    ramp_task: Mutex<Option<ramp::RampTask>>,
    /// This daemon, for the tasks it starts from the admin API.
    me: std::sync::OnceLock<std::sync::Weak<Daemon>>,
}

/// Name of the replication slot and publication cutover owns on the old database.
pub const SLOT: &str = migration::FORWARD_SLOT;

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

    /// Verify with a SQLite old: every table (or those asked for) compared
    /// at one position of the running stream from the file, in a task;
    /// progress and the verdict in `/v1/status` as for PostgreSQL.
    fn start_sqlite_verify(
        &self,
        request: VerifyRequest,
        repair: bool,
    ) -> Result<serde_json::Value, ApiError> {
        let (Some(path), Some(new_url)) = (
            self.config
                .old
                .url
                .sqlite_path()
                .map(std::path::Path::to_path_buf),
            self.config.new.as_ref().map(|n| n.url.clone()),
        ) else {
            return Err(ApiError::conflict(
                "no [new] backend is configured; add [new] url = ... and restart cutover",
            ));
        };
        let verifier = {
            let running = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            running
                .as_ref()
                .filter(|s| s.from == Backend::Old)
                .map(|s| s.mirror.sqlite_verifier())
        };
        let Some(verifier) = verifier else {
            return Err(ApiError::conflict(
                "verify compares the file with new at positions of the change stream from the file; run `cutover mirror start` first (after promotion, roll back to verify)",
            ));
        };
        {
            let mut doc = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if doc.as_ref().is_some_and(|v| v["state"] == "running") {
                return Err(ApiError::conflict(
                    "a verify run is already in progress; see /v1/status for its progress",
                ));
            }
            *doc = Some(serde_json::json!({ "state": "running" }));
        }
        let doc = self.verify.clone();
        let columns = self.config.schema_columns.clone();
        tokio::spawn(async move {
            let result = async {
                let file = path.clone();
                let mut map = tokio::task::spawn_blocking(move || {
                    cutover_sqlite::SchemaMap::read_file(&file, &columns, 2)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                if !request.tables.is_empty() {
                    map.tables.retain(|t| request.tables.contains(&t.name));
                }
                let pg = cutover_stream::control_client(&new_url, "cutover-verify")
                    .await
                    .map_err(|e| e.to_string())?;
                let chunk_rows = request.chunk_rows.unwrap_or(10_000).max(1) as usize;
                let checks = if repair {
                    verifier.repair_sqlite(&path, &map, &pg, chunk_rows).await
                } else {
                    verifier.verify_sqlite(&path, &map, &pg, chunk_rows).await
                };
                checks.map_err(|e| e.to_string())
            }
            .await;
            if let Some(v) = doc.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                match result {
                    Ok(checks) => {
                        let clean = checks.iter().all(|c| c.check.clean());
                        v["state"] = if clean { "clean" } else { "differences" }.into();
                        v["report"] = serde_json::json!({
                            "source": "sqlite",
                            "clean": clean,
                            "tables": checks.iter().map(|c| serde_json::json!({
                                "table": c.check.table,
                                "sqlite_rows": c.check.sqlite_rows,
                                "postgres_rows": c.check.postgres_rows,
                                "differences": c.check.differences,
                                "repaired_rows": c.repaired,
                            })).collect::<Vec<_>>(),
                        });
                    }
                    Err(e) => {
                        v["state"] = "failed".into();
                        v["error"] = e.into();
                    }
                }
            }
        });
        Ok(serde_json::json!({
            (if repair { "repair" } else { "verify" }): "started",
            "at_stream_position": true
        }))
    }

    fn mirror_settings(&self) -> Option<MirrorSettings> {
        if self.config.old.url.sqlite_path().is_some() {
            return None;
        }
        self.stream_settings(Backend::Old, false, false)
    }

    fn pool_status(&self, backend: Backend) -> Option<PoolStatus> {
        let s = self.proxy.pools().get(backend)?.stats();
        Some(PoolStatus {
            size: s.size,
            in_use: s.in_use,
            idle: s.idle,
            waiting: s.waiting,
        })
    }
}

impl AdminSource for Daemon {
    fn status(&self) -> Status {
        let state = self.control_state();
        let role = |b: Backend| {
            if b == state.primary {
                "primary"
            } else {
                "secondary"
            }
        };
        let mut backends = vec![self.backend_status(
            "old",
            role(Backend::Old),
            &self.config.old,
            &self.old_health,
            self.pool_status(Backend::Old),
        )];
        if let Some(new) = &self.config.new {
            backends.push(self.backend_status(
                "new",
                role(Backend::New),
                new,
                &self.new_health,
                self.pool_status(Backend::New),
            ));
        }
        let mirror = self
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| {
                let mut doc = serde_json::to_value(s.mirror.status()).unwrap_or_default();
                doc["from"] = s.from.name().into();
                doc
            });
        let lagging = self.metrics.traffic.secondary_lagging.get() != 0;
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            phase: state.phase.name().to_string(),
            primary: state.primary.name().to_string(),
            read_percent: state.read_percent,
            secondary_lagging: lagging,
            last_pause: self
                .last_pause
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            write_paused: self.traffic.gate.is_paused(),
            clients: self.proxy.clients(),
            backends,
            mirror,
            verify: self
                .verify
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            ramp: self.ramp_status(),
        }
    }

    fn metrics(&self) -> String {
        let gauge = &self.metrics.pool_connections;
        for backend in [Backend::Old, Backend::New] {
            if let Some(pool) = self.pool_status(backend) {
                let name = backend.name();
                gauge.with_label_values(&[name, "in_use"]).set(pool.in_use);
                gauge.with_label_values(&[name, "idle"]).set(pool.idle);
                gauge
                    .with_label_values(&[name, "waiting"])
                    .set(pool.waiting);
            }
        }
        self.metrics.render()
    }

    fn token(&self) -> Option<&str> {
        self.config.admin.token.as_deref()
    }

    fn transition(
        &self,
        transition: Transition,
    ) -> BoxFuture<'_, Result<serde_json::Value, ApiError>> {
        Box::pin(async move {
            if self.ramp_running() {
                return Err(ApiError::conflict(
                    "a guarded ramp is running and owns the dial; `cutover ramp --abort` stops it",
                ));
            }
            self.run_transition(transition).await
        })
    }

    fn start_ramp(&self, request: RampRequest) -> Result<serde_json::Value, ApiError> {
        match self.me.get().and_then(std::sync::Weak::upgrade) {
            Some(me) => me.start_ramp(&request),
            None => Err(ApiError::unavailable("cutover is shutting down")),
        }
    }

    fn abort_ramp(&self) -> BoxFuture<'_, Result<serde_json::Value, ApiError>> {
        Box::pin(Daemon::abort_ramp(self))
    }

    fn start_repair(&self, request: VerifyRequest) -> Result<serde_json::Value, ApiError> {
        if self.config.old.url.sqlite_path().is_some() {
            return self.start_sqlite_verify(request, true);
        }
        Err(ApiError::conflict(
            "repair of a PostgreSQL old runs with `cutover repair --config FILE`",
        ))
    }

    fn start_verify(&self, request: VerifyRequest) -> Result<serde_json::Value, ApiError> {
        if self.config.old.url.sqlite_path().is_some() {
            return self.start_sqlite_verify(request, false);
        }
        if self.config.new.is_none() {
            return Err(ApiError::conflict(
                "no [new] backend is configured; add [new] url = ... and restart cutover",
            ));
        }
        // With a stream running from the primary, each chunk is compared
        // at one point of it (exact under load); the primary is the side
        // verify reads under locks.
        let state = self.control_state();
        let (source, stream) = {
            let running = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            match running.as_ref().filter(|s| s.from == state.primary) {
                Some(s) => (s.from, Some(s.mirror.position())),
                None => (Backend::Old, None),
            }
        };
        let (Some(old_url), Some(new_url)) =
            (self.url(source).cloned(), self.url(source.other()).cloned())
        else {
            return Err(ApiError::conflict("no [new] backend is configured"));
        };
        let options = cutover_stream::VerifyOptions {
            tables: request.tables,
            chunk_rows: i64::from(request.chunk_rows.unwrap_or(10_000)),
            ..Default::default()
        };
        {
            let mut doc = self.verify.lock().unwrap_or_else(|p| p.into_inner());
            if doc.as_ref().is_some_and(|v| v["state"] == "running") {
                return Err(ApiError::conflict(
                    "a verify run is already in progress; see /v1/status for its progress",
                ));
            }
            *doc = Some(serde_json::json!({
                "state": "running", "rows_checked": 0, "chunks": 0, "rows_different": 0
            }));
        }
        let stream_given = stream.is_some();
        let doc = self.verify.clone();
        let metrics = self.metrics.stream.clone();
        metrics.verify_rows_different.set(0);
        tokio::spawn(async move {
            let update = |f: &dyn Fn(&mut serde_json::Value)| {
                if let Some(v) = doc.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    f(v);
                }
            };
            let on_chunk = |_: &str, rows: u64, different: u64| {
                metrics.verify_rows_checked.inc_by(rows);
                metrics.verify_chunks.inc();
                metrics.verify_rows_different.add(different as i64);
                update(&|v| {
                    v["rows_checked"] = (v["rows_checked"].as_u64().unwrap_or(0) + rows).into();
                    v["chunks"] = (v["chunks"].as_u64().unwrap_or(0) + 1).into();
                    v["rows_different"] =
                        (v["rows_different"].as_u64().unwrap_or(0) + different).into();
                });
            };
            let result = async {
                let old = cutover_stream::control_client(&old_url, "cutover-verify").await?;
                let new = cutover_stream::control_client(&new_url, "cutover-verify").await?;
                let stream = stream
                    .as_ref()
                    .map(|s| s as &dyn cutover_stream::StreamPoint);
                cutover_stream::verify_with_progress(&old, &new, &options, stream, &on_chunk).await
            }
            .await;
            update(&|v| match &result {
                Ok(report) => {
                    v["state"] = if report.clean { "clean" } else { "differences" }.into();
                    v["report"] = serde_json::to_value(report).unwrap_or_default();
                }
                Err(e) => {
                    v["state"] = "failed".into();
                    v["error"] = e.to_string().into();
                }
            });
        });
        Ok(serde_json::json!({
            "verify": "started",
            "at_stream_position": stream_given,
        }))
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            cutover_backend::probe(
                "old",
                &self.config.old.url,
                self.old_engine.as_ref(),
                PROBE_TIMEOUT,
                &self.scram,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    }
}

/// The SQLite engine as a backend the pools reach in memory.
struct SqliteBackend(Engine);

impl Embedded for SqliteBackend {
    fn open(&self) -> tokio::io::DuplexStream {
        self.0.connect()
    }

    fn cancel(&self, key: cutover_wire::messages::backend_key_data::CancelKey) {
        self.0.cancel(key);
    }
}

/// A running daemon. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    daemon: Arc<Daemon>,
}

impl Server {
    /// Binds both listeners and starts serving. A backend that is down does
    /// not stop the start: clients get its connection error until it is back.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let old_engine = match config.old.url.sqlite_path() {
            Some(path) => {
                let engine = Engine::open(path, &config.old.url.database, &config.schema_columns)?;
                Some(EmbeddedBackend(Arc::new(SqliteBackend(engine))))
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let saved = match &config.cutover.state_file {
            Some(path) => migration::load_state(path).map_err(StartError::State)?,
            None => None,
        };
        let traffic = Arc::new(Traffic::new(
            Plane {
                state: ControlState::default(),
                sync: config.mirror.sync,
                sync_timeout: config.mirror.sync_timeout,
                fence: None,
            },
            metrics.traffic.clone(),
        ));
        let proxy = Proxy::new(
            config.clone(),
            metrics.clone(),
            traffic.clone(),
            old_engine.clone(),
        )?;
        let proxy_listener = bind("proxy.listen", config.proxy.listen).await?;
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        let proxy_addr = local_addr(&proxy_listener, config.proxy.listen);
        let admin_addr = local_addr(&admin_listener, config.admin.listen);
        let daemon = Arc::new(Daemon {
            config,
            proxy: proxy.clone(),
            old_engine,
            metrics,
            started: Instant::now(),
            old_health: Health::default(),
            new_health: Health::default(),
            scram: cutover_backend::ScramCache::default(),
            stream: Mutex::new(None),
            verify: Arc::new(Mutex::new(None)),
            transitions: tokio::sync::Mutex::new(()),
            traffic,
            last_pause: Mutex::new(None),
            ramp: Mutex::new(None),
            ramp_task: Mutex::new(None),
            me: std::sync::OnceLock::new(),
        });
        let _ = daemon.me.set(Arc::downgrade(&daemon));
        match saved {
            Some(state) => {
                tracing::info!(
                    phase = state.phase.name(),
                    primary = state.primary.name(),
                    read_percent = state.read_percent,
                    "resuming the saved control state"
                );
                if state.phase.streams() {
                    if let Err(e) = daemon.start_stream(state.primary, false, false) {
                        tracing::error!(error = %e, "cannot resume the change stream");
                    }
                }
                daemon.publish(state);
            }
            None => {
                daemon.publish(ControlState::default());
                if let Some(settings) = daemon.mirror_settings() {
                    tokio::spawn(resume_mirror(daemon.clone(), settings));
                }
            }
        }
        if let Some(saved) =
            ramp::load(ramp::ramp_file(daemon.config.cutover.state_file.as_ref()).as_ref())
        {
            let running = saved.state == ramp::RampState::Running;
            *daemon.ramp.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
            if running {
                tracing::info!("resuming the guarded ramp");
                daemon.spawn_ramp();
            }
        }
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
        tasks.push(tokio::spawn(probe_backends(
            daemon.clone(),
            until_stopped(stopped.clone()),
        )));
        tasks.push(tokio::spawn({
            let daemon = daemon.clone();
            async move {
                until_stopped(stopped).await;
                let stream = daemon
                    .stream
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if let Some(stream) = stream {
                    stream.mirror.stop().await;
                }
            }
        }));
        tracing::info!(%proxy_addr, %admin_addr, "cutover is serving");
        Ok(Server {
            proxy_addr,
            admin_addr,
            stop,
            tasks,
            daemon,
        })
    }

    /// Counts a reload whose file did not load.
    pub fn reload_failed(&self) {
        self.daemon
            .metrics
            .config_reloads
            .with_label_values(&["failed"])
            .inc();
    }

    /// Applies a reloaded configuration (SIGHUP): users and the
    /// authentication method, pool sizes and the read dial's strategy take
    /// effect (for logins and sessions from now on; see `Proxy::reload`).
    /// Returns the settings that differ but need a restart, which are left
    /// as they run.
    pub fn reload(&self, config: &Config) -> Vec<&'static str> {
        let running = &self.daemon.config;
        let mut restart = Vec::new();
        if running.proxy != config.proxy {
            restart.push("proxy");
        }
        if running.admin != config.admin {
            restart.push("admin");
        }
        if running.old.url != config.old.url {
            restart.push("old.url");
        }
        if running.new.as_ref().map(|n| &n.url) != config.new.as_ref().map(|n| &n.url) {
            restart.push("new");
        }
        if running.mirror != config.mirror {
            restart.push("mirror");
        }
        if running.cutover != config.cutover {
            restart.push("cutover");
        }
        if running.schema_columns != config.schema_columns {
            restart.push("schema.columns");
        }
        self.daemon.proxy.reload(config);
        self.daemon
            .metrics
            .config_reloads
            .with_label_values(&[if restart.is_empty() { "ok" } else { "partial" }])
            .inc();
        restart
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

/// Restarts mirroring after a restart of cutover: the slot on the primary and
/// the applied position on the secondary say it was running.
async fn resume_mirror(daemon: Arc<Daemon>, settings: MirrorSettings) {
    let was_running = async {
        let old = cutover_stream::control_client(&settings.old, "cutover-control")
            .await
            .ok()?;
        let new = cutover_stream::control_client(&settings.new, "cutover-control")
            .await
            .ok()?;
        let slot = old
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&settings.slot],
            )
            .await
            .ok()??;
        let applied = new
            .query_opt(
                "SELECT 1 FROM cutover.applied WHERE slot = $1",
                &[&settings.slot],
            )
            .await
            .ok()??;
        drop((slot, applied));
        Some(())
    };
    if was_running.await.is_some() {
        if let Ok(next) = daemon.control_state().start_mirroring() {
            if daemon.start_stream(Backend::Old, false, false).is_ok() {
                daemon.publish(next);
            }
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
        let mut targets = vec![(
            "old",
            &daemon.config.old,
            &daemon.old_health,
            daemon.old_engine.as_ref(),
        )];
        if let Some(new) = &daemon.config.new {
            targets.push(("new", new, &daemon.new_health, None));
        }
        for (name, cfg, health, embedded) in targets {
            let result =
                cutover_backend::probe(name, &cfg.url, embedded, PROBE_TIMEOUT, &daemon.scram)
                    .await;
            daemon
                .metrics
                .backend_up
                .with_label_values(&[name])
                .set(i64::from(result.is_ok()));
            if let Err(e) = &result {
                tracing::warn!(backend = name, error = %e, "backend health probe failed");
            }
            let up = result.is_ok();
            health.record(result.map(|_| ()).map_err(|e| e.to_string()));
            if name != daemon.control_state().primary.name() {
                daemon.traffic.set_secondary_healthy(up);
            }
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
