//! The HTTP control plane: health and readiness probes, Prometheus metrics
//! and the status document. Built on axum; knows nothing of the wire
//! protocol. What it reports comes from an [`AdminSource`] the daemon provides.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
}

pub fn router(source: Arc<dyn AdminSource>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
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

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({
            "error": "not found",
            "reason": "no such endpoint; try /healthz, /readyz, /metrics or /v1/status"
        })),
    )
        .into_response()
}
