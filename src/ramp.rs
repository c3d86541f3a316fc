//! The guarded ramp (`cutover ramp`, `POST /v1/ramp`): the read dial walked
//! through stages by the daemon, each held for a while and watched. A stage
//! is judged on the reads the dial sent to the secondary since it began:
//!
//! - errors: reads that failed there and were answered by the primary
//!   through the fallback, plus errors passed to the client that the
//!   primary would not have raised (`secondary_read_errors_total{cause=
//!   "secondary"}`; a syntax error or a division by zero is the client's);
//! - latency: the p99 of reads on the secondary over the p99 of reads on
//!   the primary in the same window, from the `read_duration_seconds`
//!   histograms (so at bucket resolution), once both have 50 reads;
//! - optionally, shadow reads that disagreed, over those compared.
//!
//! A breach sets the dial to 0 and records which stage, which figure and
//! the numbers; a new ramp is then refused until the operator acknowledges
//! it. The ramp is persisted next to the control state and resumed after a
//! restart (the stage keeps its start time; its window starts again).

use crate::Daemon;
use cutover_admin::{ApiError, RampRequest, Transition};
use cutover_control::metrics::TrafficMetrics;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Reads on the secondary a stage needs before its error rate is judged
/// on its own; below it, the rate is taken over this many.
const MIN_READS: u64 = 100;
/// Reads each side needs before latencies are compared.
const MIN_LATENCY_SAMPLES: u64 = 50;
/// How long a ramp waits for the secondary to be ready when it starts or
/// resumes, before it counts that as a failure.
const READY_WAIT: Duration = Duration::from_secs(30);
/// Fallback reasons that mean the secondary failed the read.
const FAILED_ON_SECONDARY: &[&str] = &[
    "connection",
    "undefined_object",
    "read_only",
    "error",
    "unavailable",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RampState {
    Running,
    Completed,
    RolledBack,
    Aborted,
}

/// A ramp as persisted and shown in status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ramp {
    pub stages: Vec<u8>,
    pub hold_seconds: f64,
    /// Fraction of the secondary's reads that may fail (0.01 for 1 %).
    pub max_error_rate: f64,
    pub max_p99_ratio: Option<f64>,
    /// Fraction of compared shadow reads that may disagree.
    #[serde(default)]
    pub max_shadow_mismatch: Option<f64>,
    pub state: RampState,
    /// Index into `stages`.
    pub stage: usize,
    pub stage_started_unix_ms: u64,
    /// Why it rolled back or was aborted.
    pub reason: Option<String>,
    /// The current (or last) stage's figures.
    pub figures: Option<Figures>,
}

/// What a stage saw of the reads sent to the secondary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Reads the dial sent to the secondary (served there or failed there).
    pub reads: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p99_secondary_seconds: Option<f64>,
    pub p99_primary_seconds: Option<f64>,
    /// Shadow reads compared (match or mismatch) and those that disagreed.
    #[serde(default)]
    pub shadow_compared: u64,
    #[serde(default)]
    pub shadow_mismatches: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Ramp {
    fn percent(&self) -> u8 {
        self.stages.get(self.stage).copied().unwrap_or(0)
    }

    fn hold(&self) -> Duration {
        Duration::from_secs_f64(self.hold_seconds)
    }

    fn remaining(&self) -> Duration {
        let elapsed = Duration::from_millis(now_ms().saturating_sub(self.stage_started_unix_ms));
        self.hold().saturating_sub(elapsed)
    }

    /// `stage 2 of 5 (25%)`.
    fn where_(&self) -> String {
        format!(
            "stage {} of {} ({}%)",
            self.stage + 1,
            self.stages.len(),
            self.percent()
        )
    }

    /// The status document's view.
    pub fn status(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["percent"] = self.percent().into();
        if self.state == RampState::Running {
            v["remaining_seconds"] = self.remaining().as_secs().into();
        }
        v
    }

    /// A new running ramp from a request, checked.
    pub fn start(request: &RampRequest) -> Result<Ramp, ApiError> {
        let stages = &request.stages;
        if stages.is_empty() || stages.iter().any(|p| *p == 0 || *p > 100) {
            return Err(ApiError::bad_request(
                "stages must be percentages from 1 to 100, e.g. [10, 25, 50, 75, 100]",
            ));
        }
        if stages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ApiError::bad_request("stages must increase"));
        }
        if !(1.0..=86_400.0).contains(&request.hold_seconds) {
            return Err(ApiError::bad_request(
                "hold_seconds must be between 1 and 86400",
            ));
        }
        if !(0.0..100.0).contains(&request.max_error_rate_percent) {
            return Err(ApiError::bad_request(
                "max_error_rate_percent must be at least 0 and below 100",
            ));
        }
        if request
            .max_shadow_mismatch_percent
            .is_some_and(|p| !(0.0..100.0).contains(&p))
        {
            return Err(ApiError::bad_request(
                "max_shadow_mismatch_percent must be at least 0 and below 100",
            ));
        }
        if request.max_p99_ratio.is_some_and(|r| r < 1.0) {
            return Err(ApiError::bad_request("max_p99_ratio must be at least 1"));
        }
        Ok(Ramp {
            stages: stages.clone(),
            hold_seconds: request.hold_seconds,
            max_error_rate: request.max_error_rate_percent / 100.0,
            max_p99_ratio: request.max_p99_ratio,
            max_shadow_mismatch: request.max_shadow_mismatch_percent.map(|p| p / 100.0),
            state: RampState::Running,
            stage: 0,
            stage_started_unix_ms: now_ms(),
            reason: None,
            figures: None,
        })
    }

    /// The limit a stage's figures break, said with the numbers.
    fn breach(&self, f: &Figures) -> Option<String> {
        let allowed = self.max_error_rate * f.reads.max(MIN_READS) as f64;
        if f.errors > 0 && f.errors as f64 > allowed {
            return Some(format!(
                "error rate {:.2}% over {}% ({} errors in {} reads on new)",
                f.error_rate * 100.0,
                self.max_error_rate * 100.0,
                f.errors,
                f.reads
            ));
        }
        if let Some(max) = self.max_shadow_mismatch {
            let allowed = max * f.shadow_compared.max(MIN_READS) as f64;
            if f.shadow_mismatches > 0 && f.shadow_mismatches as f64 > allowed {
                return Some(format!(
                    "shadow mismatch rate {:.2}% over {}% ({} of {} compared reads)",
                    f.shadow_mismatches as f64 * 100.0 / f.shadow_compared.max(1) as f64,
                    max * 100.0,
                    f.shadow_mismatches,
                    f.shadow_compared
                ));
            }
        }
        if let (Some(max), Some(new), Some(old)) = (
            self.max_p99_ratio,
            f.p99_secondary_seconds,
            f.p99_primary_seconds,
        ) {
            if old > 0.0 && new / old > max {
                return Some(format!(
                    "p99 latency ratio {:.2} over {max} ({:.1} ms on new, {:.1} ms on old)",
                    new / old,
                    new * 1000.0,
                    old * 1000.0
                ));
            }
        }
        None
    }
}

/// The counters a stage is judged by, at one moment.
struct Snapshot {
    secondary_reads: u64,
    failed_fallbacks: u64,
    secondary_errors: u64,
    /// (upper bound, cumulative count) per bucket, and the count.
    secondary_latency: (Vec<(f64, u64)>, u64),
    primary_latency: (Vec<(f64, u64)>, u64),
    shadow_match: u64,
    shadow_mismatch: u64,
}

fn buckets(h: &prometheus::Histogram) -> (Vec<(f64, u64)>, u64) {
    use prometheus::core::Metric;
    let m = h.metric();
    let h = m.get_histogram();
    (
        h.get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect(),
        h.get_sample_count(),
    )
}

impl Snapshot {
    fn take(m: &TrafficMetrics, secondary: &str, primary: &str) -> Snapshot {
        Snapshot {
            secondary_reads: m.reads.with_label_values(&[secondary]).get(),
            failed_fallbacks: FAILED_ON_SECONDARY
                .iter()
                .map(|r| m.read_fallbacks.with_label_values(&[r]).get())
                .sum(),
            secondary_errors: m
                .secondary_read_errors
                .with_label_values(&["secondary"])
                .get(),
            secondary_latency: buckets(&m.read_duration.with_label_values(&[secondary])),
            primary_latency: buckets(&m.read_duration.with_label_values(&[primary])),
            shadow_match: m.shadow_reads.with_label_values(&["match"]).get(),
            shadow_mismatch: m.shadow_reads.with_label_values(&["mismatch"]).get(),
        }
    }

    /// What happened between `since` and this snapshot.
    fn since(&self, since: &Snapshot) -> Figures {
        let failed = self.failed_fallbacks - since.failed_fallbacks;
        let reads = self.secondary_reads - since.secondary_reads + failed;
        let errors = failed + self.secondary_errors - since.secondary_errors;
        Figures {
            reads,
            errors,
            error_rate: if reads == 0 {
                0.0
            } else {
                errors as f64 / reads as f64
            },
            p99_secondary_seconds: p99(&self.secondary_latency, &since.secondary_latency),
            p99_primary_seconds: p99(&self.primary_latency, &since.primary_latency),
            shadow_compared: self.shadow_match + self.shadow_mismatch
                - since.shadow_match
                - since.shadow_mismatch,
            shadow_mismatches: self.shadow_mismatch - since.shadow_mismatch,
        }
    }
}

/// The 99th percentile of the observations between two snapshots of a
/// histogram: the upper bound of the bucket it falls in.
fn p99(now: &(Vec<(f64, u64)>, u64), then: &(Vec<(f64, u64)>, u64)) -> Option<f64> {
    let count = now.1.checked_sub(then.1)?;
    if count < MIN_LATENCY_SAMPLES {
        return None;
    }
    let rank = (count as f64 * 0.99).ceil() as u64;
    now.0
        .iter()
        .zip(&then.0)
        .find(|((_, a), (_, b))| a - b >= rank)
        .map(|((bound, _), _)| *bound)
        .or(now.0.last().map(|(bound, _)| *bound))
}

/// Where a ramp is kept: next to the control state file.
pub fn ramp_file(state_file: Option<&PathBuf>) -> Option<PathBuf> {
    state_file.map(|p| p.with_extension("ramp.json"))
}

pub fn load(path: Option<&PathBuf>) -> Option<Ramp> {
    let bytes = std::fs::read(path?).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn save(path: Option<&PathBuf>, ramp: &Ramp) {
    let Some(path) = path else { return };
    let tmp = path.with_extension("tmp");
    let written = serde_json::to_vec_pretty(ramp)
        .map_err(std::io::Error::other)
        .and_then(|text| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::error!(path = %path.display(), error = %e, "cannot persist the ramp");
    }
}

/// The running ramp's stop switch.
pub struct RampTask {
    pub abort: watch::Sender<bool>,
}

impl Daemon {
    fn ramp_path(&self) -> Option<PathBuf> {
        ramp_file(self.config.cutover.state_file.as_ref())
    }

    /// Records `ramp` as the current one: status, metrics, the file.
    fn record_ramp(&self, ramp: &Ramp) {
        let m = &self.metrics.traffic;
        let running = ramp.state == RampState::Running;
        m.ramp_running.set(i64::from(running));
        m.ramp_percent.set(if running {
            i64::from(ramp.percent())
        } else {
            0
        });
        save(self.ramp_path().as_ref(), ramp);
        *self.ramp.lock().unwrap_or_else(|p| p.into_inner()) = Some(ramp.clone());
    }

    pub(crate) fn ramp_status(&self) -> Option<serde_json::Value> {
        self.ramp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Ramp::status)
    }

    pub(crate) fn ramp_running(&self) -> bool {
        self.ramp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|r| r.state == RampState::Running)
    }

    /// Starts a ramp (refused while one runs, or after one rolled back
    /// unless acknowledged).
    pub(crate) fn start_ramp(
        self: &Arc<Self>,
        request: &RampRequest,
    ) -> Result<serde_json::Value, ApiError> {
        let ramp = Ramp::start(request)?;
        {
            let current = self.ramp.lock().unwrap_or_else(|p| p.into_inner());
            match current.as_ref() {
                Some(r) if r.state == RampState::Running => {
                    return Err(ApiError::conflict(format!(
                        "a ramp is running ({}); `cutover ramp --abort` stops it",
                        r.where_()
                    )))
                }
                Some(r) if r.state == RampState::RolledBack && !request.acknowledge => {
                    return Err(ApiError::conflict(format!(
                        "the last ramp rolled back: {}; start again with --acknowledge (\"acknowledge\": true) once that is understood",
                        r.reason.as_deref().unwrap_or("")
                    )))
                }
                _ => {}
            }
        }
        let state = self.control_state();
        if state.primary != cutover_control::Backend::Old {
            return Err(ApiError::conflict(
                "the ramp moves reads to new before promotion; new is already the primary",
            ));
        }
        self.record_ramp(&ramp);
        self.spawn_ramp();
        tracing::info!(stages = ?ramp.stages, hold_seconds = ramp.hold_seconds, "ramp started");
        Ok(ramp.status())
    }

    /// Stops the running ramp where it is (the dial stays).
    pub(crate) async fn abort_ramp(&self) -> Result<serde_json::Value, ApiError> {
        let task = self
            .ramp_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(task) = task.filter(|_| self.ramp_running()) else {
            return Err(ApiError::conflict("no ramp is running"));
        };
        let _ = task.abort.send(true);
        // The task records the abort; wait for it briefly.
        for _ in 0..50 {
            if !self.ramp_running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self.ramp_status().unwrap_or_default())
    }

    /// Runs the recorded ramp (a new one, or one resumed after a restart).
    pub(crate) fn spawn_ramp(self: &Arc<Self>) {
        let (abort, aborted) = watch::channel(false);
        *self.ramp_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(RampTask { abort });
        tokio::spawn(self.clone().run_ramp(aborted));
    }

    async fn run_ramp(self: Arc<Self>, mut aborted: watch::Receiver<bool>) {
        let Some(mut ramp) = self.ramp.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let interval = (ramp.hold() / 10).clamp(Duration::from_millis(250), Duration::from_secs(5));
        // After a restart the stream needs a moment before new may serve.
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        while self.secondary_ready().is_err() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        loop {
            let percent = ramp.percent();
            if let Err(e) = self.run_transition(Transition::Reads(percent)).await {
                return self
                    .roll_back(
                        ramp,
                        format!("the dial could not be set to {percent}%: {}", e.reason),
                    )
                    .await;
            }
            self.record_ramp(&ramp);
            let base = Snapshot::take(&self.metrics.traffic, "new", "old");
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval.min(ramp.remaining().max(Duration::from_millis(10)))) => {}
                    _ = aborted.changed() => {
                        ramp.state = RampState::Aborted;
                        ramp.reason = Some(format!("aborted by the operator at {}", ramp.where_()));
                        tracing::warn!(at = %ramp.where_(), "ramp aborted");
                        self.record_ramp(&ramp);
                        return;
                    }
                }
                let figures = Snapshot::take(&self.metrics.traffic, "new", "old").since(&base);
                ramp.figures = Some(figures);
                if let Some(why) = ramp.breach(&figures) {
                    return self.roll_back(ramp, why).await;
                }
                *self.ramp.lock().unwrap_or_else(|p| p.into_inner()) = Some(ramp.clone());
                if ramp.remaining().is_zero() {
                    break;
                }
            }
            if ramp.stage + 1 == ramp.stages.len() {
                ramp.state = RampState::Completed;
                tracing::info!("ramp completed");
                self.record_ramp(&ramp);
                return;
            }
            ramp.stage += 1;
            ramp.stage_started_unix_ms = now_ms();
            ramp.figures = None;
        }
    }

    async fn roll_back(&self, mut ramp: Ramp, why: String) {
        let reason = format!("{}: {why}", ramp.where_());
        tracing::error!(%reason, "ramp breached a limit; reads back to old");
        if let Err(e) = self.run_transition(Transition::Reads(0)).await {
            tracing::error!(reason = %e.reason, "the ramp could not set the dial to 0");
        }
        ramp.state = RampState::RolledBack;
        ramp.reason = Some(reason);
        self.metrics.traffic.ramp_rollbacks.inc();
        self.record_ramp(&ramp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stages: &[u8]) -> RampRequest {
        RampRequest {
            stages: stages.to_vec(),
            hold_seconds: 60.0,
            max_error_rate_percent: 1.0,
            max_p99_ratio: Some(1.5),
            max_shadow_mismatch_percent: Some(0.5),
            acknowledge: false,
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(Ramp::start(&request(&[10, 25, 100])).is_ok());
        for bad in [&[][..], &[0, 10], &[10, 101], &[50, 25]] {
            assert_eq!(
                Ramp::start(&request(bad)).unwrap_err().status,
                400,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_few_errors_in_few_reads_do_not_breach_but_a_rate_does() {
        let ramp = Ramp::start(&request(&[10])).unwrap();
        let figures = |reads, errors| Figures {
            reads,
            errors,
            error_rate: errors as f64 / reads.max(1) as f64,
            p99_secondary_seconds: None,
            p99_primary_seconds: None,
            shadow_compared: 0,
            shadow_mismatches: 0,
        };
        assert_eq!(ramp.breach(&figures(10, 1)), None, "1 of at least 100");
        assert!(ramp.breach(&figures(10, 2)).is_some());
        assert_eq!(ramp.breach(&figures(1000, 10)), None);
        let why = ramp.breach(&figures(1000, 11)).unwrap();
        assert_eq!(
            why,
            "error rate 1.10% over 1% (11 errors in 1000 reads on new)"
        );
        let slow = Figures {
            p99_secondary_seconds: Some(0.05),
            p99_primary_seconds: Some(0.01),
            ..figures(1000, 0)
        };
        assert!(ramp
            .breach(&slow)
            .unwrap()
            .starts_with("p99 latency ratio 5.00 over 1.5"));
    }

    #[test]
    fn p99_comes_from_the_window_not_from_before_it() {
        let then = (vec![(0.001, 1000), (0.01, 1000), (0.1, 1000)], 1000);
        let now = (vec![(0.001, 1000), (0.01, 1098), (0.1, 1100)], 1100);
        assert_eq!(
            p99(
                &(vec![(0.001, 1000), (0.01, 1099), (0.1, 1100)], 1100),
                &then
            ),
            Some(0.01)
        );
        assert_eq!(p99(&now, &then), Some(0.1));
        let few = (vec![(0.001, 1000), (0.01, 1010), (0.1, 1010)], 1010);
        assert_eq!(p99(&few, &then), None);
    }
}
