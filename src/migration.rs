//! The migration's control plane inside the daemon: the control state and
//! its persistence, the change stream that matches the phase, the commit
//! fence the data path waits on, and the transitions an operator asks for
//! (read dial, promote, rollback, finalize) with their write pause.

use crate::Daemon;
use cutover_admin::{ApiError, Transition};
use cutover_config::BackendUrl;
use cutover_control::{Backend, ControlState, Phase};
use cutover_proxy::traffic::{BoxFuture, CommitFence, Plane};
use cutover_stream::{Lsn, Mirror, MirrorSettings, StreamPosition, StreamState};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Slot and publication of the stream from old to new (on old).
pub const FORWARD_SLOT: &str = "cutover";
/// Slot and publication of the stream from new to old after promotion (on new).
pub const REVERSE_SLOT: &str = "cutover_reverse";

/// The primary's current WAL write position, asked on a control
/// connection: past the commit record of every transaction whose commit
/// has returned with `synchronous_commit` on (the insert position would
/// also cover asynchronous commits, but it runs ahead into WAL not yet
/// written, which the stream cannot pass until the primary writes it out,
/// so commits would wait for other commits or for the WAL writer). Many
/// commits waiting at once share one query: waiters queue for the
/// connection, and one whose turn comes after a query that started after
/// it asked takes that query's answer. The statement is prepared once, so
/// each query is one round trip.
pub struct PrimaryPosition {
    url: BackendUrl,
    /// A SQLite primary's read connection, kept between questions.
    sqlite: Arc<std::sync::Mutex<Option<cutover_sqlite::Connection>>>,
    /// The connection with its statement, and the last answer with the
    /// ticket it covers.
    slot: tokio::sync::Mutex<(Option<PositionQuery>, u64, u64)>,
    asked: AtomicU64,
}

struct PositionQuery {
    client: tokio_postgres::Client,
    statement: tokio_postgres::Statement,
}

const POSITION_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `mirror start` waits for the setup before answering.
const MIRROR_SETUP_WAIT: Duration = Duration::from_secs(60);

impl PrimaryPosition {
    pub fn new(url: BackendUrl) -> PrimaryPosition {
        PrimaryPosition {
            url,
            sqlite: Arc::new(std::sync::Mutex::new(None)),
            slot: tokio::sync::Mutex::new((None, 0, 0)),
            asked: AtomicU64::new(0),
        }
    }

    pub async fn current(&self) -> Result<u64, String> {
        let ticket = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
        let mut slot = self.slot.lock().await;
        let (client, covers, lsn) = &mut *slot;
        // A query that started after we asked may have finished while we
        // queued for the connection: its answer is good for us too.
        if *covers >= ticket {
            return Ok(*lsn);
        }
        let started_at = self.asked.load(Ordering::SeqCst);
        let result = tokio::time::timeout(POSITION_TIMEOUT, self.query(client))
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()));
        match result {
            Ok(answer) => {
                (*covers, *lsn) = (started_at, answer);
                Ok(answer)
            }
            Err(e) => {
                *client = None;
                Err(format!("primary position: {e}"))
            }
        }
    }

    async fn query(&self, query: &mut Option<PositionQuery>) -> Result<u64, String> {
        // A SQLite primary's position is its change log's newest entry.
        if let Some(path) = self.url.sqlite_path() {
            let (path, cached) = (path.to_path_buf(), self.sqlite.clone());
            return tokio::task::spawn_blocking(move || {
                let mut cached = cached.lock().unwrap_or_else(|p| p.into_inner());
                if cached.is_none() {
                    *cached =
                        Some(cutover_sqlite::open_read_only(&path).map_err(|e| e.to_string())?);
                }
                let conn = cached.as_ref().ok_or("no connection")?;
                let position = cutover_stream::sqlite_source::log_position(conn);
                if position.is_err() {
                    *cached = None;
                }
                position.map(|p| p as u64).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        if query.as_ref().is_none_or(|q| q.client.is_closed()) {
            let client = cutover_stream::control_client(&self.url, "cutover-fence")
                .await
                .map_err(|e| e.to_string())?;
            let statement = client
                .prepare("SELECT pg_current_wal_lsn()::text")
                .await
                .map_err(|e| e.to_string())?;
            *query = Some(PositionQuery { client, statement });
        }
        let Some(q) = query.as_ref() else {
            return Err("no connection".to_string());
        };
        let row = q
            .client
            .query_one(&q.statement, &[])
            .await
            .map_err(|e| e.to_string())?;
        let text: String = row.get(0);
        text.parse::<Lsn>().map(|l| l.0)
    }
}

/// The fence over one running stream.
struct StreamFence {
    position: StreamPosition,
    primary: Arc<PrimaryPosition>,
}

impl CommitFence for StreamFence {
    fn primary_position(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(self.primary.current())
    }

    fn caught_up(&self) -> u64 {
        self.position.caught_up().0
    }

    fn serving(&self) -> bool {
        self.position.serving()
    }

    fn wait_applied(&self, lsn: u64, timeout: Duration) -> BoxFuture<'_, bool> {
        Box::pin(self.position.wait_for(Lsn(lsn), timeout))
    }
}

/// The stream that runs now, and from which backend.
pub struct RunningStream {
    pub from: Backend,
    pub mirror: Mirror,
    primary: Arc<PrimaryPosition>,
}

/// Reads the persisted state; a missing file is the default state.
pub fn load_state(path: &Path) -> Result<Option<ControlState>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("control state file {}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("control state file {}: {e}", path.display())),
    }
}

/// Writes the state next to its file, then renames it over, so a crash
/// leaves the old state or the new one, never half of either.
fn save_state(path: &Path, state: &ControlState) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Daemon {
    pub(crate) fn url(&self, backend: Backend) -> Option<&BackendUrl> {
        match backend {
            Backend::Old => Some(&self.config.old.url),
            Backend::New => self.config.new.as_ref().map(|n| &n.url),
        }
    }

    /// Settings for the stream whose source is `from` (see
    /// [`MirrorSettings`] for `fresh` and `clear_new`).
    pub(crate) fn stream_settings(
        &self,
        from: Backend,
        fresh: bool,
        clear_new: bool,
    ) -> Option<MirrorSettings> {
        Some(MirrorSettings {
            old: self.url(from)?.clone(),
            new: self.url(from.other())?.clone(),
            slot: match from {
                Backend::Old => FORWARD_SLOT,
                Backend::New => REVERSE_SLOT,
            }
            .to_string(),
            copy: self.config.mirror.clone(),
            fresh,
            clear_new,
            schema_columns: self.config.schema_columns.clone(),
        })
    }

    /// Starts the stream from `from` unless one runs.
    pub(crate) fn start_stream(
        &self,
        from: Backend,
        fresh: bool,
        clear_new: bool,
    ) -> Result<(), String> {
        let settings = self
            .stream_settings(from, fresh, clear_new)
            .ok_or("no [new] backend is configured; add [new] url = ... and restart cutover")?;
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if stream.is_some() {
            return Err("a change stream is already running".to_string());
        }
        tracing::info!(from = from.name(), old = %settings.old.redacted(), new = %settings.new.redacted(), "starting the change stream");
        let primary = Arc::new(PrimaryPosition::new(settings.old.clone()));
        *stream = Some(RunningStream {
            from,
            mirror: Mirror::start(settings, self.metrics.stream.clone()),
            primary,
        });
        Ok(())
    }

    /// Makes `state` the one the data path obeys, shows it in metrics and
    /// persists it.
    pub(crate) fn publish(&self, state: ControlState) {
        let fence = self
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| s.from == state.primary && state.phase.streams())
            .map(|s| {
                Arc::new(StreamFence {
                    position: s.mirror.position(),
                    primary: s.primary.clone(),
                }) as Arc<dyn CommitFence>
            });
        self.traffic.set_plane(Plane {
            state,
            sync: self.config.mirror.sync,
            sync_timeout: self.config.mirror.sync_timeout,
            fence,
        });
        let m = &self.metrics.traffic;
        for phase in Phase::all() {
            m.phase
                .with_label_values(&[phase.name()])
                .set(i64::from(phase == state.phase));
        }
        for backend in [Backend::Old, Backend::New] {
            m.primary
                .with_label_values(&[backend.name()])
                .set(i64::from(backend == state.primary));
        }
        m.read_percent.set(i64::from(state.read_percent));
        if let Some(path) = &self.config.cutover.state_file {
            if let Err(e) = save_state(path, &state) {
                tracing::error!(path = %path.display(), error = %e, "cannot persist the control state");
            }
        }
    }

    /// The state as last published: the one the data path obeys.
    pub(crate) fn control_state(&self) -> ControlState {
        self.traffic.plane().state
    }

    pub(crate) async fn run_transition(
        &self,
        transition: Transition,
    ) -> Result<serde_json::Value, ApiError> {
        let _one_at_a_time = self.transitions.lock().await;
        let result = self.transition_locked(transition).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e.status == 409 => "refused",
            Err(_) => "aborted",
        };
        self.metrics
            .traffic
            .transitions
            .with_label_values(&[transition.name(), outcome])
            .inc();
        match &result {
            Ok(_) => tracing::info!(
                transition = transition.name(),
                ?transition,
                "transition done"
            ),
            Err(e) => {
                tracing::warn!(transition = transition.name(), reason = %e.reason, "transition not done")
            }
        }
        result
    }

    async fn transition_locked(
        &self,
        transition: Transition,
    ) -> Result<serde_json::Value, ApiError> {
        let current = self.control_state();
        let refused = |r: cutover_control::Refusal| ApiError::conflict(r.reason);
        match transition {
            Transition::MirrorStart { clear_new } => self.start_mirror(current, clear_new).await,
            Transition::Reads(percent) => {
                let next = current.set_reads(percent).map_err(refused)?;
                if percent > 0 && next.primary == Backend::Old {
                    self.secondary_ready()?;
                }
                self.publish(next);
                Ok(self.state_json(next))
            }
            Transition::Promote { force } => {
                let next = current.promote().map_err(refused)?;
                self.secondary_ready()?;
                if !force {
                    self.promotion_ready()?;
                }
                self.swap_primary(current, next).await
            }
            Transition::Rollback => {
                let next = current.rollback().map_err(refused)?;
                if current.primary == next.primary {
                    self.publish(next);
                    return Ok(self.state_json(next));
                }
                self.swap_primary(current, next).await
            }
            Transition::Finalize => {
                let next = current.finalize().map_err(refused)?;
                let running = self.stream.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(running) = running {
                    running.mirror.stop().await;
                }
                self.publish(next);
                let mut dropped = Vec::new();
                // A SQLite old keeps no slot: its capture comes out of the file.
                if let Some(path) = self.config.old.url.sqlite_path() {
                    let file = path.to_path_buf();
                    let removed = tokio::task::spawn_blocking(move || {
                        let conn =
                            cutover_sqlite::Connection::open(&file).map_err(|e| e.to_string())?;
                        conn.busy_timeout(Duration::from_secs(30))
                            .map_err(|e| e.to_string())?;
                        let map = cutover_sqlite::SchemaMap::read(&conn, &[])
                            .map_err(|e| e.to_string())?;
                        cutover_sqlite::capture::remove(&conn, &map).map_err(|e| e.to_string())?;
                        conn.execute_batch(&format!(
                            "DROP TABLE IF EXISTS {}",
                            cutover_stream::sqlite_target::APPLIED_TABLE
                        ))
                        .map_err(|e| e.to_string())
                    })
                    .await;
                    match removed {
                        Ok(Ok(())) => dropped.push("old:capture".to_string()),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "could not remove capture from the SQLite file; drop the _cutover_ triggers and tables by hand")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not remove capture from the SQLite file")
                        }
                    }
                }
                for (backend, slot) in [(Backend::New, REVERSE_SLOT), (Backend::Old, FORWARD_SLOT)]
                {
                    if self.url(backend).is_some_and(|u| u.sqlite_path().is_some()) {
                        continue;
                    }
                    if let Some(url) = self.url(backend) {
                        match cutover_stream::drop_slot(url, slot).await {
                            Ok(()) => dropped.push(format!("{}:{slot}", backend.name())),
                            Err(e) => {
                                tracing::warn!(backend = backend.name(), slot, error = %e, "could not drop cutover's slot; drop it by hand")
                            }
                        }
                    }
                }
                let mut body = self.state_json(next);
                body["dropped"] = dropped.into();
                Ok(body)
            }
        }
    }

    /// Starts mirroring, or starts it again when it failed, and waits for
    /// its setup (preconditions, slot, copy plan) to finish: a setup error
    /// is the answer, not something to find later in the status.
    async fn start_mirror(
        &self,
        current: ControlState,
        clear_new: bool,
    ) -> Result<serde_json::Value, ApiError> {
        if self.config.new.is_none() {
            return Err(ApiError::conflict(
                "no [new] backend is configured; add [new] url = ... and restart cutover",
            ));
        }
        // Mirroring whose stream failed (or never came back after a
        // restart) starts again in the same phase.
        let restart = current.phase.streams()
            && self
                .stream
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_none_or(|s| s.mirror.status().state == StreamState::Failed);
        let next = if restart {
            let stopped = self.stream.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(stopped) = stopped {
                stopped.mirror.stop().await;
            }
            current
        } else {
            current
                .start_mirroring()
                .map_err(|r| ApiError::conflict(r.reason))?
        };
        self.start_stream(next.primary, false, clear_new)
            .map_err(ApiError::conflict)?;
        self.publish(next);
        let started = {
            let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            stream.as_ref().map(|s| s.mirror.started())
        };
        let Some(started) = started else {
            return Err(ApiError::conflict(
                "the change stream stopped while starting",
            ));
        };
        match started.wait(MIRROR_SETUP_WAIT).await {
            Ok(lsn) => Ok(serde_json::json!({
                "phase": next.phase.name(),
                "started": true,
                "start_lsn": lsn.to_string(),
            })),
            Err(reason) => Err(ApiError::conflict(format!(
                "mirroring could not start: {reason}; fix it and run `cutover mirror start` again"
            ))),
        }
    }

    /// The running stream's status, if one runs.
    fn stream_status(&self) -> Option<cutover_stream::MirrorStatus> {
        self.stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.mirror.status())
    }

    /// The dial may send reads to the secondary, and new may be promoted,
    /// only once every table is copied and the stream runs: before that
    /// the secondary is missing rows.
    pub(crate) fn secondary_ready(&self) -> Result<(), ApiError> {
        let status = self.stream_status();
        let Some(status) = status else {
            return Err(ApiError::conflict(
                "no change stream is running; run `cutover mirror start` first",
            ));
        };
        match status.state {
            StreamState::Streaming => Ok(()),
            StreamState::Copying => {
                let left: Vec<&str> = status
                    .copy
                    .iter()
                    .filter(|c| !c.done)
                    .map(|c| c.table.as_str())
                    .collect();
                Err(ApiError::conflict(format!(
                    "the secondary is not ready: the initial copy is still running ({} of {} tables left: {}); \
                     wait until `cutover status` shows the stream streaming",
                    left.len(),
                    status.copy.len(),
                    left.join(", ")
                )))
            }
            state => Err(ApiError::conflict(format!(
                "the secondary is not ready: the change stream is {}{}; {}",
                state.name(),
                status
                    .error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default(),
                if state == StreamState::Failed {
                    "fix the cause and run `cutover mirror start` again"
                } else {
                    "wait until `cutover status` shows the stream streaming"
                }
            ))),
        }
    }

    /// Promotion needs a drained stream and a clean last verify.
    fn promotion_ready(&self) -> Result<(), ApiError> {
        let status = self.stream_status();
        let Some(status) = status else {
            return Err(ApiError::conflict("no change stream is running"));
        };
        if status.state != StreamState::Streaming || status.lag_bytes.unwrap_or(u64::MAX) > 0 {
            return Err(ApiError::conflict(format!(
                "the stream is not caught up (state {}, lag {} bytes); wait for lag 0 or use --force",
                status.state.name(),
                status
                    .lag_bytes
                    .map_or("unknown".to_string(), |b| b.to_string())
            )));
        }
        let verify = self
            .verify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let verify_state = verify
            .as_ref()
            .and_then(|v| v["state"].as_str().map(str::to_string));
        if verify_state.as_deref() != Some("clean") {
            return Err(ApiError::conflict(format!(
                "the last verify is not clean ({}); run `cutover verify` (POST /v1/verify) until it is, or use --force",
                verify_state.unwrap_or_else(|| "none run".to_string())
            )));
        }
        Ok(())
    }

    /// The write pause: close the gate, let transactions finish, drain the
    /// stream, start the stream the other way, swap the primary, open the
    /// gate. Aborts (and resumes unchanged) past `cutover.max_pause`.
    async fn swap_primary(
        &self,
        current: ControlState,
        next: ControlState,
    ) -> Result<serde_json::Value, ApiError> {
        let max_pause = self.config.cutover.max_pause;
        let started = Instant::now();
        let deadline = started + max_pause;
        self.traffic.gate.pause();
        let in_flight = self.traffic.gate.active().max(0);
        let prepared = self.prepare_swap(current, next, deadline).await;
        let result = match prepared {
            Ok(reverse) => {
                let old = self
                    .stream
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(reverse);
                self.publish(next);
                self.traffic.gate.resume();
                if let Some(old) = old {
                    let url = self.url(old.from).cloned();
                    let slot = self
                        .stream_settings(old.from, false, false)
                        .map(|s| s.slot)
                        .unwrap_or_default();
                    tokio::spawn(async move {
                        old.mirror.stop().await;
                        if let Some(url) = url {
                            if let Err(e) = cutover_stream::drop_slot(&url, &slot).await {
                                tracing::warn!(%slot, error = %e, "could not drop the replaced stream's slot");
                            }
                        }
                    });
                }
                Ok(())
            }
            Err(reason) => {
                self.traffic.gate.resume();
                Err(reason)
            }
        };
        let paused = started.elapsed();
        self.metrics
            .traffic
            .pause_seconds
            .observe(paused.as_secs_f64());
        *self.last_pause.lock().unwrap_or_else(|p| p.into_inner()) = Some(serde_json::json!({
            "to": next.primary.name(),
            "milliseconds": paused.as_secs_f64() * 1000.0,
            "completed": result.is_ok(),
            "sessions_in_flight": in_flight,
        }));
        match result {
            Ok(()) => {
                let mut body = self.state_json(next);
                body["pause_ms"] = (paused.as_secs_f64() * 1000.0).into();
                body["sessions_in_flight"] = in_flight.into();
                Ok(body)
            }
            Err(reason) => Err(ApiError::unavailable(format!(
                "{reason}; aborted after {:.0} ms, traffic resumed unchanged",
                paused.as_secs_f64() * 1000.0
            ))),
        }
    }

    /// Everything of the swap that happens while paused, before the state
    /// changes: returns the new stream, started.
    async fn prepare_swap(
        &self,
        current: ControlState,
        next: ControlState,
        deadline: Instant,
    ) -> Result<RunningStream, String> {
        let max_pause = self.config.cutover.max_pause;
        if !self.traffic.gate.wait_idle(deadline).await {
            return Err(format!(
                "{} sessions were still inside transactions after cutover.max_pause ({} ms)",
                self.traffic.gate.active(),
                max_pause.as_millis()
            ));
        }
        let (position, primary) = {
            let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            let running = stream
                .as_ref()
                .filter(|s| s.from == current.primary)
                .ok_or("no change stream runs from the primary, so the secondary may be behind")?;
            (running.mirror.position(), running.primary.clone())
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let lsn = tokio::time::timeout(remaining, primary.current())
            .await
            .map_err(|_| "the primary did not say its position in time".to_string())??;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if !position.wait_for(Lsn(lsn), remaining).await {
            return Err(format!(
                "the stream did not drain to {} within cutover.max_pause",
                Lsn(lsn)
            ));
        }
        let settings = self
            .stream_settings(next.primary, true, false)
            .ok_or("no [new] backend is configured")?;
        // Logical replication does not carry sequences: bring them over
        // now, while nothing writes, so the first insert on the new
        // primary cannot reuse a key.
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(
            remaining,
            cutover_stream::carry_sequences(&settings.new, &settings.old),
        )
        .await
        .map_err(|_| "carrying sequences over took longer than cutover.max_pause".to_string())?
        .map_err(|e| format!("carrying sequences over: {e}"))?;
        let reverse = RunningStream {
            from: next.primary,
            primary: Arc::new(PrimaryPosition::new(settings.old.clone())),
            mirror: Mirror::start(settings, self.metrics.stream.clone()),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = reverse.mirror.wait_started(remaining).await {
            reverse.mirror.stop().await;
            return Err(format!(
                "the stream from {} could not start: {e}",
                next.primary.name()
            ));
        }
        Ok(reverse)
    }

    pub(crate) fn state_json(&self, state: ControlState) -> serde_json::Value {
        serde_json::json!({
            "phase": state.phase.name(),
            "primary": state.primary.name(),
            "read_percent": state.read_percent,
        })
    }
}
