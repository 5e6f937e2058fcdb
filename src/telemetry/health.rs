//! Liveness and readiness, shared by the apply loop and the HTTP server.
//!
//! Liveness is "the apply loop turned recently": it ticks at least once a
//! second even when idle, and does not depend on Postgres or Redis being
//! up (an outage is not fixed by restarting the daemon). Before the loop
//! starts (while start-up waits for Postgres or Redis) the process counts
//! as alive. Readiness is "streaming from the slot and Redis answering".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the loop may go without a tick before `/healthz` fails.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared health flags.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the loop's last tick; 0 until the
    /// loop's first tick.
    last_tick_ms: AtomicU64,
    streaming: AtomicBool,
    redis_ok: AtomicBool,
    /// Why Redis is not OK, for `/readyz` (empty: not answering).
    redis_reason: Mutex<String>,
    /// Some watched table's changes may be missed (see
    /// `source::replication::drift`).
    drifted: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            redis_ok: AtomicBool::new(false),
            redis_reason: Mutex::new(String::new()),
            drifted: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// The apply loop is alive.
    pub fn tick(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Whether the loop ticked within [`LIVENESS_TIMEOUT`], or has not
    /// started yet.
    pub fn alive(&self) -> bool {
        let last = self.last_tick_ms.load(Ordering::Relaxed);
        last == 0
            || self
                .started
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
                < LIVENESS_TIMEOUT
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
        if ok {
            if let Ok(mut reason) = self.redis_reason.lock() {
                reason.clear();
            }
        }
        self.redis_ok.store(ok, Ordering::Relaxed);
    }

    /// Redis failed for `reason` (one line for `/readyz`: not answering,
    /// refusing writes and why, not acknowledging a batch in time).
    pub fn set_redis_failing(&self, reason: &str) {
        if let Ok(mut current) = self.redis_reason.lock() {
            reason.clone_into(&mut current);
        }
        self.redis_ok.store(false, Ordering::Relaxed);
    }

    /// Why Redis is not OK, as the last failure said.
    pub fn redis_reason(&self) -> String {
        match self.redis_reason.lock() {
            Ok(reason) if !reason.is_empty() => reason.clone(),
            _ => "redis is not answering".to_string(),
        }
    }

    /// Whether Redis answered the last attempt.
    pub fn redis_ok(&self) -> bool {
        self.redis_ok.load(Ordering::Relaxed)
    }

    /// Whether the catalog has drifted from what the rules need.
    pub fn set_drifted(&self, drifted: bool) {
        self.drifted.store(drifted, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::metrics::CATALOG_DRIFT).set(if drifted {
            1.0
        } else {
            0.0
        });
    }

    /// Whether it has.
    pub fn drifted(&self) -> bool {
        self.drifted.load(Ordering::Relaxed)
    }

    /// Streaming, Redis answering, and every watched table covered.
    pub fn ready(&self) -> bool {
        self.streaming() && self.redis_ok.load(Ordering::Relaxed) && !self.drifted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_before_the_loop_and_ready_only_when_both_up() {
        let health = Health::default();
        assert!(health.alive(), "start-up counts as alive");
        health.tick();
        assert!(health.alive());
        assert!(!health.ready());
        health.set_streaming(true);
        assert!(!health.ready(), "redis not confirmed yet");
        health.set_redis_ok(true);
        assert!(health.ready());
        health.set_redis_ok(false);
        assert!(!health.ready());
    }
}
