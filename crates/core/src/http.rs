//! The worker's HTTP port: `/healthz` (alive), `/readyz` (joined and brokers
//! reachable), `/metrics` (Prometheus text).

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::telemetry::Telemetry;

/// Route paths, named once so manifests and tests can check against them.
pub const HEALTHZ: &str = "/healthz";
pub const READYZ: &str = "/readyz";
pub const METRICS: &str = "/metrics";

pub fn router(telemetry: Arc<Telemetry>) -> Router {
    Router::new()
        .route(HEALTHZ, get(|| async { "ok\n" }))
        .route(READYZ, get(readyz))
        .route(METRICS, get(metrics))
        .with_state(telemetry)
}

async fn readyz(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    match t.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        t.encode(),
    )
}

/// Serves the routes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(telemetry))
        .with_graceful_shutdown(shutdown)
        .await
}
