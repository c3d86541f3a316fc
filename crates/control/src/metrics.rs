//! Prometheus metrics in cutover's own registry (no process-global one, so
//! two proxies in one test process never share counters). Hot-path handles
//! are resolved once per backend so a query costs atomic adds, not label
//! lookups.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    pub client_connections: IntGauge,
    pub client_connections_total: IntCounter,
    pub queries: IntCounterVec,
    pub query_duration: HistogramVec,
    pub client_bytes_received: IntCounter,
    pub client_bytes_sent: IntCounter,
    pub pool_connections: IntGaugeVec,
    pub backend_connect_failures: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub protocol_errors: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub cancel_requests: IntCounterVec,
    /// Configuration reloads (SIGHUP) by outcome: ok, partial (some
    /// settings need a restart), failed (the file did not load).
    pub config_reloads: IntCounterVec,
    pub stream: StreamMetrics,
    pub traffic: TrafficMetrics,
}

/// The read dial, commit waits and transitions.
#[derive(Clone)]
pub struct TrafficMetrics {
    /// 1 for the current phase, 0 for the others.
    pub phase: IntGaugeVec,
    /// 1 for the backend that is primary now.
    pub primary: IntGaugeVec,
    pub read_percent: IntGauge,
    pub reads: IntCounterVec,
    pub read_fallbacks: IntCounterVec,
    /// Reads' time to ReadyForQuery, by the backend that served them.
    pub read_duration: HistogramVec,
    /// Errors reads on the secondary passed to the client: `client` when
    /// the primary would have raised them too (syntax, data), `secondary`
    /// otherwise.
    pub secondary_read_errors: IntCounterVec,
    /// The guarded ramp: its stage's percentage (0 when none runs).
    pub ramp_percent: IntGauge,
    /// 1 while a ramp runs.
    pub ramp_running: IntGauge,
    pub ramp_rollbacks: IntCounter,
    /// Shadow reads by result: match, mismatch, error, skipped.
    pub shadow_reads: IntCounterVec,
    pub commit_wait_seconds: Histogram,
    pub commit_wait_timeouts: IntCounter,
    pub secondary_lagging: IntGauge,
    pub pause_seconds: Histogram,
    pub transitions: IntCounterVec,
}

/// The change stream's and the copy's metrics.
#[derive(Clone)]
pub struct StreamMetrics {
    pub lag_bytes: IntGauge,
    pub lag_seconds: Gauge,
    pub applied_transactions: IntCounter,
    pub applied_rows: IntCounter,
    pub apply_batch_seconds: Histogram,
    pub reconnects: IntCounter,
    /// 1 while the stream stopped on an error no retry gets past.
    pub failed: IntGauge,
    /// 1 while the secondary may serve reads: copied and streaming.
    pub serving: IntGauge,
    pub copy_rows: IntCounterVec,
    pub verify_rows_checked: IntCounter,
    pub verify_chunks: IntCounter,
    pub verify_rows_different: IntGauge,
}

/// The per-backend handles a session uses on every message.
#[derive(Clone)]
pub struct BackendMetrics {
    pub simple_queries: IntCounter,
    pub extended_queries: IntCounter,
    pub function_calls: IntCounter,
    pub duration: Histogram,
    /// The same time for units the router classified as reads.
    pub read_duration: Histogram,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("cutover")
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let mut m = Metrics {
            client_connections: IntGauge::with_opts(opts(
                "client_connections",
                "Client connections open now.",
            ))
            .expect("valid metric"),
            client_connections_total: IntCounter::with_opts(opts(
                "client_connections_total",
                "Client connections accepted since start.",
            ))
            .expect("valid metric"),
            queries: IntCounterVec::new(
                opts("queries_total", "Statements forwarded, by backend and protocol kind (simple query, extended Execute, function call)."),
                &["backend", "kind"],
            )
            .expect("valid metric"),
            query_duration: HistogramVec::new(
                HistogramOpts::new(
                    "query_duration_seconds",
                    "Time from a client's Query or Sync to the backend's ReadyForQuery.",
                )
                .namespace("cutover")
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["backend"],
            )
            .expect("valid metric"),
            client_bytes_received: IntCounter::with_opts(opts(
                "client_bytes_received_total",
                "Bytes read from clients after login.",
            ))
            .expect("valid metric"),
            client_bytes_sent: IntCounter::with_opts(opts(
                "client_bytes_sent_total",
                "Bytes written to clients after login.",
            ))
            .expect("valid metric"),
            pool_connections: IntGaugeVec::new(
                opts("pool_connections", "Backend pool sessions by state (in_use, idle) and clients waiting for one (waiting)."),
                &["backend", "state"],
            )
            .expect("valid metric"),
            backend_connect_failures: IntCounterVec::new(
                opts("backend_connect_failures_total", "Failed backend logins, by backend and reason."),
                &["backend", "reason"],
            )
            .expect("valid metric"),
            backend_up: IntGaugeVec::new(
                opts("backend_up", "1 if the last health probe of the backend succeeded."),
                &["backend"],
            )
            .expect("valid metric"),
            protocol_errors: IntCounterVec::new(
                opts("protocol_errors_total", "Connections closed for malformed client input, by reason."),
                &["reason"],
            )
            .expect("valid metric"),
            auth_failures: IntCounterVec::new(
                opts("auth_failures_total", "Client logins refused, by reason."),
                &["reason"],
            )
            .expect("valid metric"),
            cancel_requests: IntCounterVec::new(
                opts("cancel_requests_total", "Cancel requests, by outcome (forwarded, unknown_key, failed)."),
                &["result"],
            )
            .expect("valid metric"),
            config_reloads: IntCounterVec::new(
                opts("config_reloads_total", "Configuration reloads (SIGHUP), by outcome: ok, partial (some settings need a restart), failed."),
                &["outcome"],
            )
            .expect("valid metric"),
            stream: StreamMetrics {
                lag_bytes: IntGauge::with_opts(opts(
                    "stream_lag_bytes",
                    "WAL bytes the secondary is behind the primary.",
                ))
                .expect("valid metric"),
                lag_seconds: Gauge::with_opts(opts(
                    "stream_lag_seconds",
                    "Seconds since the secondary last held everything the primary had.",
                ))
                .expect("valid metric"),
                applied_transactions: IntCounter::with_opts(opts(
                    "stream_applied_transactions_total",
                    "Primary transactions applied to the secondary.",
                ))
                .expect("valid metric"),
                applied_rows: IntCounter::with_opts(opts(
                    "stream_applied_rows_total",
                    "Row changes applied to the secondary.",
                ))
                .expect("valid metric"),
                apply_batch_seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "stream_apply_batch_seconds",
                        "Time to apply one batch of transactions on the secondary.",
                    )
                    .namespace("cutover")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
                )
                .expect("valid metric"),
                reconnects: IntCounter::with_opts(opts(
                    "stream_reconnects_total",
                    "Times the change stream was interrupted and reconnected.",
                ))
                .expect("valid metric"),
                failed: IntGauge::with_opts(opts(
                    "stream_failed",
                    "1 while the change stream stopped on an error no retry gets past (see /v1/status); run `cutover mirror start` after the fix.",
                ))
                .expect("valid metric"),
                serving: IntGauge::with_opts(opts(
                    "stream_serving",
                    "1 while every table is copied and the stream runs, so the secondary may serve reads.",
                ))
                .expect("valid metric"),
                verify_rows_checked: IntCounter::with_opts(opts(
                    "verify_rows_checked_total",
                    "Rows compared by verify runs started from the daemon.",
                ))
                .expect("valid metric"),
                verify_chunks: IntCounter::with_opts(opts(
                    "verify_chunks_total",
                    "Key-range chunks compared by verify runs started from the daemon.",
                ))
                .expect("valid metric"),
                verify_rows_different: IntGauge::with_opts(opts(
                    "verify_rows_different",
                    "Rows found different by the current or last verify run.",
                ))
                .expect("valid metric"),
                copy_rows: IntCounterVec::new(
                    opts("copy_rows_total", "Rows copied to the secondary by the initial copy, by table."),
                    &["table"],
                )
                .expect("valid metric"),
            },
            traffic: TrafficMetrics {
                phase: IntGaugeVec::new(opts("phase", "1 for the current migration phase."), &["phase"])
                    .expect("valid metric"),
                primary: IntGaugeVec::new(opts("primary", "1 for the backend that is primary now."), &["backend"])
                    .expect("valid metric"),
                read_percent: IntGauge::with_opts(opts(
                    "read_percent",
                    "The read dial: percentage of eligible reads served by the new backend.",
                ))
                .expect("valid metric"),
                reads: IntCounterVec::new(
                    opts("reads_total", "Statements classified as reads, by the backend that served them."),
                    &["backend"],
                )
                .expect("valid metric"),
                read_fallbacks: IntCounterVec::new(
                    opts("read_fallbacks_total", "Reads the dial sent to the secondary that the primary served instead, by reason."),
                    &["reason"],
                )
                .expect("valid metric"),
                read_duration: HistogramVec::new(
                    HistogramOpts::new(
                        "read_duration_seconds",
                        "Time from a read's request to its ReadyForQuery, by the backend that served it.",
                    )
                    .namespace("cutover")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                    &["backend"],
                )
                .expect("valid metric"),
                secondary_read_errors: IntCounterVec::new(
                    opts("secondary_read_errors_total", "Errors of reads on the secondary passed to the client, by cause: client (the primary would raise it too) or secondary."),
                    &["cause"],
                )
                .expect("valid metric"),
                ramp_percent: IntGauge::with_opts(opts(
                    "ramp_percent",
                    "The guarded ramp's current stage (percentage of reads to new); 0 when no ramp runs.",
                ))
                .expect("valid metric"),
                ramp_running: IntGauge::with_opts(opts(
                    "ramp_running",
                    "1 while a guarded ramp runs.",
                ))
                .expect("valid metric"),
                ramp_rollbacks: IntCounter::with_opts(opts(
                    "ramp_rollbacks_total",
                    "Guarded ramps that breached a limit and set the dial to 0.",
                ))
                .expect("valid metric"),
                shadow_reads: IntCounterVec::new(
                    opts("shadow_reads_total", "Reads old served that also ran on new, by result: match, mismatch, error (new failed), skipped."),
                    &["result"],
                )
                .expect("valid metric"),
                commit_wait_seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "commit_wait_seconds",
                        "Time a commit was held until the secondary applied it (mirror.sync).",
                    )
                    .namespace("cutover")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                )
                .expect("valid metric"),
                commit_wait_timeouts: IntCounter::with_opts(opts(
                    "commit_wait_timeouts_total",
                    "Commits acknowledged after mirror.sync_timeout without the secondary having applied them.",
                ))
                .expect("valid metric"),
                secondary_lagging: IntGauge::with_opts(opts(
                    "secondary_lagging",
                    "1 while the secondary missed a commit's sync timeout and has not caught up since; reads avoid it.",
                ))
                .expect("valid metric"),
                pause_seconds: Histogram::with_opts(
                    HistogramOpts::new(
                        "pause_seconds",
                        "Write pauses of promote and rollback.",
                    )
                    .namespace("cutover")
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]),
                )
                .expect("valid metric"),
                transitions: IntCounterVec::new(
                    opts("transitions_total", "Control state transitions, by name and outcome (ok, refused, aborted)."),
                    &["transition", "outcome"],
                )
                .expect("valid metric"),
            },
            registry,
            names: Vec::new(),
        };
        for c in [
            Box::new(m.client_connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.client_connections_total.clone()),
            Box::new(m.queries.clone()),
            Box::new(m.query_duration.clone()),
            Box::new(m.client_bytes_received.clone()),
            Box::new(m.client_bytes_sent.clone()),
            Box::new(m.pool_connections.clone()),
            Box::new(m.backend_connect_failures.clone()),
            Box::new(m.backend_up.clone()),
            Box::new(m.protocol_errors.clone()),
            Box::new(m.auth_failures.clone()),
            Box::new(m.cancel_requests.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.stream.lag_bytes.clone()),
            Box::new(m.stream.lag_seconds.clone()),
            Box::new(m.stream.applied_transactions.clone()),
            Box::new(m.stream.applied_rows.clone()),
            Box::new(m.stream.apply_batch_seconds.clone()),
            Box::new(m.stream.reconnects.clone()),
            Box::new(m.stream.failed.clone()),
            Box::new(m.stream.serving.clone()),
            Box::new(m.stream.copy_rows.clone()),
            Box::new(m.stream.verify_rows_checked.clone()),
            Box::new(m.stream.verify_chunks.clone()),
            Box::new(m.stream.verify_rows_different.clone()),
            Box::new(m.traffic.phase.clone()),
            Box::new(m.traffic.primary.clone()),
            Box::new(m.traffic.read_percent.clone()),
            Box::new(m.traffic.reads.clone()),
            Box::new(m.traffic.read_fallbacks.clone()),
            Box::new(m.traffic.read_duration.clone()),
            Box::new(m.traffic.secondary_read_errors.clone()),
            Box::new(m.traffic.ramp_percent.clone()),
            Box::new(m.traffic.ramp_running.clone()),
            Box::new(m.traffic.ramp_rollbacks.clone()),
            Box::new(m.traffic.shadow_reads.clone()),
            Box::new(m.traffic.commit_wait_seconds.clone()),
            Box::new(m.traffic.commit_wait_timeouts.clone()),
            Box::new(m.traffic.secondary_lagging.clone()),
            Box::new(m.traffic.pause_seconds.clone()),
            Box::new(m.traffic.transitions.clone()),
        ] {
            m.names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The name of every metric family cutover exports (as `/metrics`
    /// shows them once they have a value), for checking dashboards and
    /// alert rules against.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn backend(&self, backend: &str) -> BackendMetrics {
        BackendMetrics {
            simple_queries: self.queries.with_label_values(&[backend, "simple"]),
            extended_queries: self.queries.with_label_values(&[backend, "extended"]),
            function_calls: self.queries.with_label_values(&[backend, "function_call"]),
            duration: self.query_duration.with_label_values(&[backend]),
            read_duration: self.traffic.read_duration.with_label_values(&[backend]),
            bytes_in: self.client_bytes_received.clone(),
            bytes_out: self.client_bytes_sent.clone(),
        }
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let families = self.registry.gather();
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_prefix() {
        let m = Metrics::new();
        m.backend("old").simple_queries.inc();
        let text = m.render();
        assert!(
            text.contains("cutover_queries_total{backend=\"old\",kind=\"simple\"} 1"),
            "{text}"
        );
    }
}
