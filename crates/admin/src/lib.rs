//! The HTTP control plane: health and readiness probes, Prometheus metrics
//! and the status document. Built on axum; knows nothing of the wire
//! protocol. What it reports comes from an [`AdminSource`] the daemon provides.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cutover_control::Status;
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpListener;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the admin API reads from the running daemon.
pub trait AdminSource: Send + Sync + 'static {
    fn status(&self) -> Status;
    /// Prometheus text exposition of the daemon's registry.
    fn metrics(&self) -> String;
    /// Ok when the primary accepts a login right now; Err says why not.
    fn ready(&self) -> BoxFuture<'_, Result<(), String>>;
    /// The bearer token mutating endpoints require, if any.
    fn token(&self) -> Option<&str>;
    /// Starts a verify run in the background.
    fn start_verify(&self, request: VerifyRequest) -> Result<serde_json::Value, ApiError>;
    /// Starts a repair run in the background: verify, then the differing
    /// tables copied again. Only a SQLite old's runs in the daemon.
    fn start_repair(&self, _request: VerifyRequest) -> Result<serde_json::Value, ApiError> {
        Err(ApiError::conflict(
            "repair of a PostgreSQL old runs with `cutover repair --config FILE`",
        ))
    }
    /// Changes the control state (read dial, promote, rollback, finalize).
    fn transition(
        &self,
        transition: Transition,
    ) -> BoxFuture<'_, Result<serde_json::Value, ApiError>>;
    /// Starts the guarded ramp.
    fn start_ramp(&self, request: RampRequest) -> Result<serde_json::Value, ApiError>;
    /// Stops the running ramp where it is.
    fn abort_ramp(&self) -> BoxFuture<'_, Result<serde_json::Value, ApiError>>;
}

/// The guarded ramp (`POST /v1/ramp`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampRequest {
    /// The dial's stages in percent, increasing: `[10, 25, 50, 75, 100]`.
    pub stages: Vec<u8>,
    /// How long each stage is held and watched.
    pub hold_seconds: f64,
    /// Reads on new that may fail, in percent of those sent there.
    pub max_error_rate_percent: f64,
    /// p99 of reads on new over p99 of reads on old that ends the ramp.
    pub max_p99_ratio: Option<f64>,
    /// Shadow reads that may disagree, in percent of those compared.
    pub max_shadow_mismatch_percent: Option<f64>,
    /// Start although the last ramp rolled back.
    #[serde(default)]
    pub acknowledge: bool,
}

/// What a verify run covers (`POST /v1/verify`, all fields optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Only these tables (`name` or `schema.name`); every table when empty.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Rows per checksum chunk.
    pub chunk_rows: Option<u32>,
}

/// An operator's request to change the control state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Start mirroring (or start it again after it failed); `clear_new`
    /// lets the copy empty tables on new holding rows it did not put there.
    MirrorStart {
        clear_new: bool,
    },
    Reads(u8),
    Promote {
        force: bool,
    },
    Rollback,
    Finalize,
}

impl Transition {
    pub fn name(&self) -> &'static str {
        match self {
            Transition::MirrorStart { .. } => "mirror_start",
            Transition::Reads(_) => "reads",
            Transition::Promote { .. } => "promote",
            Transition::Rollback => "rollback",
            Transition::Finalize => "finalize",
        }
    }
}

/// A refused request: HTTP status and the reason, sent as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub reason: String,
}

impl ApiError {
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            reason: reason.into(),
        }
    }

    pub fn unavailable(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: 503,
            reason: reason.into(),
        }
    }

    pub fn conflict(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: 409,
            reason: reason.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "error": status.canonical_reason().unwrap_or("error"), "reason": self.reason })))
            .into_response()
    }
}

/// Checks `Authorization: Bearer <token>` when a token is configured.
fn authorize(source: &dyn AdminSource, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = source.token() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError {
            status: 401,
            reason: "the bearer token does not match admin.token".to_string(),
        }),
        None => Err(ApiError {
            status: 401,
            reason: "this endpoint needs `Authorization: Bearer <admin.token>`".to_string(),
        }),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn router(source: Arc<dyn AdminSource>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/mirror/start", post(mirror_start))
        .route("/v1/verify", post(verify_start))
        .route("/v1/repair", post(repair_start))
        .route("/v1/reads", axum::routing::put(reads))
        .route("/v1/promote", post(promote))
        .route("/v1/rollback", post(rollback))
        .route("/v1/finalize", post(finalize))
        .route("/v1/ramp", post(ramp_start))
        .route("/v1/ramp/abort", post(ramp_abort))
        .fallback(not_found)
        .with_state(source)
}

/// Serves the admin API until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn AdminSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(source))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn readyz(State(source): State<Arc<dyn AdminSource>>) -> Response {
    match source.ready().await {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": reason })),
        )
            .into_response(),
    }
}

async fn metrics(State(source): State<Arc<dyn AdminSource>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        source.metrics(),
    )
        .into_response()
}

async fn status(State(source): State<Arc<dyn AdminSource>>) -> Json<Status> {
    Json(source.status())
}

async fn mirror_start(
    State(source): State<Arc<dyn AdminSource>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let transition = json_body(&body).and_then(|map| match map.get("clear_new") {
        None => Ok(Transition::MirrorStart { clear_new: false }),
        Some(serde_json::Value::Bool(clear_new)) => Ok(Transition::MirrorStart {
            clear_new: *clear_new,
        }),
        Some(other) => Err(ApiError::bad_request(format!(
            "clear_new must be true or false, got {other}"
        ))),
    });
    run_transition(source, &headers, transition).await
}

async fn verify_start(
    State(source): State<Arc<dyn AdminSource>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = authorize(source.as_ref(), &headers) {
        return e.into_response();
    }
    let request = typed_body::<VerifyRequest>(&body, "verify").and_then(|r| match r.chunk_rows {
        Some(0) => Err(ApiError::bad_request("chunk_rows must be at least 1")),
        _ => Ok(r),
    });
    reply(request.and_then(|r| source.start_verify(r)))
}

async fn repair_start(
    State(source): State<Arc<dyn AdminSource>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = authorize(source.as_ref(), &headers) {
        return e.into_response();
    }
    reply(typed_body::<VerifyRequest>(&body, "repair").and_then(|r| source.start_repair(r)))
}

async fn ramp_start(
    State(source): State<Arc<dyn AdminSource>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(e) = authorize(source.as_ref(), &headers) {
        return e.into_response();
    }
    reply(typed_body::<RampRequest>(&body, "ramp").and_then(|r| source.start_ramp(r)))
}

async fn ramp_abort(State(source): State<Arc<dyn AdminSource>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(source.as_ref(), &headers) {
        return e.into_response();
    }
    reply(source.abort_ramp().await)
}

/// The request body as a `T` (an empty body is `{}`); `what` names the
/// request in the error.
fn typed_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    json_body(body).and_then(|map| {
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| ApiError::bad_request(format!("{what} request: {e}")))
    })
}

/// A JSON answer, or the refusal.
fn reply(result: Result<serde_json::Value, ApiError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run_transition(
    source: Arc<dyn AdminSource>,
    headers: &HeaderMap,
    transition: Result<Transition, ApiError>,
) -> Response {
    if let Err(e) = authorize(source.as_ref(), headers) {
        return e.into_response();
    }
    let transition = match transition {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    reply(source.transition(transition).await)
}

/// The request body as a JSON object; an empty body is an empty object.
fn json_body(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

async fn reads(
    State(source): State<Arc<dyn AdminSource>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let transition = json_body(&body).and_then(|map| match map.get("percent") {
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(p) if p <= 100 => Ok(Transition::Reads(p as u8)),
            _ => Err(ApiError::bad_request(format!(
                "percent must be a whole number between 0 and 100, got {n}"
            ))),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "percent must be a whole number between 0 and 100, got {other}"
        ))),
        None => Err(ApiError::bad_request(
            r#"the body needs "percent", e.g. {"percent": 25}"#,
        )),
    });
    run_transition(source, &headers, transition).await
}

async fn promote(
    State(source): State<Arc<dyn AdminSource>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let transition = json_body(&body).and_then(|map| match map.get("force") {
        None => Ok(Transition::Promote { force: false }),
        Some(serde_json::Value::Bool(force)) => Ok(Transition::Promote { force: *force }),
        Some(other) => Err(ApiError::bad_request(format!(
            "force must be true or false, got {other}"
        ))),
    });
    run_transition(source, &headers, transition).await
}

async fn rollback(State(source): State<Arc<dyn AdminSource>>, headers: HeaderMap) -> Response {
    run_transition(source, &headers, Ok(Transition::Rollback)).await
}

async fn finalize(State(source): State<Arc<dyn AdminSource>>, headers: HeaderMap) -> Response {
    run_transition(source, &headers, Ok(Transition::Finalize)).await
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({
            "error": "not found",
            "reason": "no such endpoint; try /healthz, /readyz, /metrics, /v1/status, PUT /v1/reads, POST /v1/mirror/start, /v1/verify, /v1/repair, /v1/ramp, /v1/ramp/abort, /v1/promote, /v1/rollback or /v1/finalize"
        })),
    )
        .into_response()
}
