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
    /// Starts mirroring to the new database.
    fn start_mirror(&self) -> Result<serde_json::Value, ApiError>;
    /// Starts a verify run in the background.
    fn start_verify(&self) -> Result<serde_json::Value, ApiError>;
}

/// A refused request: HTTP status and the reason, sent as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub reason: String,
}

impl ApiError {
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

async fn mirror_start(State(source): State<Arc<dyn AdminSource>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(source.as_ref(), &headers) {
        return e.into_response();
    }
    match source.start_mirror() {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn verify_start(State(source): State<Arc<dyn AdminSource>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(source.as_ref(), &headers) {
        return e.into_response();
    }
    match source.start_verify() {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({
            "error": "not found",
            "reason": "no such endpoint; try /healthz, /readyz, /metrics, /v1/status or POST /v1/mirror/start"
        })),
    )
        .into_response()
}
