//! `/` (the status page, see [`super::status`]), `/metrics` (Prometheus
//! text), `/healthz` (liveness), `/readyz` (readiness) on `[http] listen`.
//!
//! The listener has no authentication and may be reachable from a whole
//! cluster network, so it is bounded: at most [`MAX_CONNECTIONS`] open
//! connections (one more is closed at once, and a failed accept, such as
//! running out of file descriptors, waits a moment), a request's headers
//! must arrive within [`HEADER_TIMEOUT`], and a connection lives at most
//! [`CONNECTION_LIFETIME`]. Idle or trickling clients cannot hold the
//! descriptors the replication stream and Redis need.

use std::time::Duration;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::telemetry::health::Health;
use crate::telemetry::status::{self, Board};

/// Most connections open at once: scrapers, probes and a few people
/// looking at the status page need far fewer.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open (keep-alive included).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long to wait after a failed accept (no file descriptor left).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    accept(listener, app, cancel).await;
    let _ = upkeep.await;
}

/// Accepts connections until `cancel` fires, within the bounds in the
/// module doc.
async fn accept(listener: tokio::net::TcpListener, app: Router, cancel: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut refused_logged = false;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(error = %error, "http listener cannot accept; waiting");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if !refused_logged {
                refused_logged = true;
                tracing::warn!(
                    limit = MAX_CONNECTIONS,
                    "http connection limit reached; closing new connections until some end"
                );
            }
            metrics::counter!(crate::telemetry::metrics::HTTP_CONNECTIONS_REFUSED_TOTAL)
                .increment(1);
            drop(stream);
            continue;
        };
        refused_logged = false;
        let service = service.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
            }
            drop(permit);
        });
    }
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
    } else if state.health.stalled_by_held() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "invalidations wait behind a commit held by a synchronous standby that has not shown it yet (a standby other than the daemon is down or slow; see the log)".to_string(),
        )
    } else if state.health.redis_failing() {
        // Before the stream: at start-up Redis is connected first, and a
        // Redis that fails keeps the stream from starting.
        (StatusCode::SERVICE_UNAVAILABLE, state.health.redis_reason())
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
