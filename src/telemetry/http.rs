//! `/` (the status page, see [`super::status`]), `/metrics` (Prometheus
//! text), `/healthz` (liveness), `/readyz` (readiness) on `[http] listen`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::health::Health;
use crate::telemetry::status::{self, Board};

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    process: Arc<metrics_process::Collector>,
    board: Arc<Board>,
}

/// Binds `listen`; the error names the address.
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("http.listen {listen}: cannot listen ({e}): choose a free address"))
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    board: Arc<Board>,
    cancel: CancellationToken,
) {
    let upkeep = metrics.clone();
    let stop_upkeep = cancel.clone();
    let sampled = Arc::clone(&board);
    let upkeep = tokio::spawn(async move {
        // The exporter's upkeep every 5 s; the status board's samples.
        let mut every = tokio::time::interval(status::SAMPLE_EVERY);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = stop_upkeep.cancelled() => return,
                _ = every.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(3) {
                        upkeep.run_upkeep();
                    }
                    sampled.sample(&upkeep.render());
                }
            }
        }
    });
    let process = metrics_process::Collector::default();
    process.describe();
    let app = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            health,
            process: Arc::new(process),
            board,
        });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::warn!(error = %error, "http server stopped");
    }
    let _ = upkeep.await;
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    // process_cpu_seconds_total, process_resident_memory_bytes,
    // process_open_fds, … as of this scrape.
    state.process.collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn status_page(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        state.board.render(&state.health),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "apply loop stalled\n")
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (status, text) = if state.health.ready() {
        (StatusCode::OK, "ready".to_string())
    } else if state.health.drifted() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "a watched table is no longer covered by the publication or its replica identity (see the log)".to_string(),
        )
    } else if !state.health.streaming() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not streaming from the replication slot".to_string(),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, state.health.redis_reason())
    };
    (status, format!("{text}\n"))
}
