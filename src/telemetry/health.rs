//! Liveness and readiness, shared by the apply loop and the HTTP server.
//!
//! Liveness is "the apply loop turned recently": it ticks at least once a
//! second even when idle, and does not depend on Postgres or Redis being
//! up (an outage is not fixed by restarting the daemon). Readiness is
//! "streaming from the slot and Redis answering".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the loop may go without a tick before `/healthz` fails.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared health flags.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the loop's last tick.
    last_tick_ms: AtomicU64,
    streaming: AtomicBool,
    redis_ok: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            redis_ok: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// The apply loop is alive.
    pub fn tick(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the loop ticked within [`LIVENESS_TIMEOUT`].
    pub fn alive(&self) -> bool {
        let last = Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) < LIVENESS_TIMEOUT
    }

    /// The replication stream opened or closed.
    pub fn set_streaming(&self, on: bool) {
        self.streaming.store(on, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::metrics::STREAMING).set(if on { 1.0 } else { 0.0 });
    }

    /// Whether the stream is open.
    pub fn streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    /// Redis answered (or failed) the last attempt.
    pub fn set_redis_ok(&self, ok: bool) {
        self.redis_ok.store(ok, Ordering::Relaxed);
    }

    /// Streaming and Redis answering.
    pub fn ready(&self) -> bool {
        self.streaming() && self.redis_ok.load(Ordering::Relaxed)
    }
}
