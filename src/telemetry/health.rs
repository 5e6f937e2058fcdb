//! Liveness and readiness, shared by the apply loop and the HTTP server.
//!
//! Liveness is "the apply loop turned recently": it ticks at least once a
//! second even when idle, and does not depend on Postgres or Redis being
//! up (an outage is not fixed by restarting the daemon). Before the loop
//! starts (while start-up waits for Postgres or Redis) the process counts
//! as alive. Readiness is "streaming from the slot and every Redis target
//! answering": each target (see `sink::fanout`) reports through its own
//! [`TargetHealth`], so `/readyz` names the one that fails.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Each Redis target, in the order they were added.
    targets: Mutex<Vec<Target>>,
    /// Some watched table's changes may be missed (see
    /// `source::replication::drift`).
    drifted: AtomicBool,
    /// Invalidations wait behind a commit held by a synchronous standby
    /// that has not shown for a while (see `pipeline::release_held`).
    stalled_by_held: AtomicBool,
    /// What each Redis server's settings lack, as the last INFO read found
    /// (`redis::server::watch`), for the status page; not readiness.
    redis_warnings: Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    /// The freshness sampler's counts of the last hour, when it runs.
    freshness: Mutex<Option<FreshnessWindow>>,
}

/// Keys checked and found stale per minute, for the last hour.
#[derive(Debug)]
pub struct FreshnessWindow {
    /// (minute since `Health::started`, checked, stale), oldest first.
    minutes: std::collections::VecDeque<(u64, u64, u64)>,
}

/// Minutes [`FreshnessWindow`] keeps.
const FRESHNESS_MINUTES: u64 = 60;

impl FreshnessWindow {
    fn add(&mut self, minute: u64, checked: u64, stale: u64) {
        match self.minutes.back_mut() {
            Some((m, c, s)) if *m == minute => {
                *c += checked;
                *s += stale;
            }
            _ => self.minutes.push_back((minute, checked, stale)),
        }
        self.trim(minute);
    }

    fn trim(&mut self, minute: u64) {
        while self
            .minutes
            .front()
            .is_some_and(|(m, _, _)| *m + FRESHNESS_MINUTES <= minute)
        {
            self.minutes.pop_front();
        }
    }

    fn totals(&self) -> (u64, u64) {
        self.minutes
            .iter()
            .fold((0, 0), |(c, s), (_, mc, ms)| (c + mc, s + ms))
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            streaming: AtomicBool::new(false),
            targets: Mutex::new(Vec::new()),
            drifted: AtomicBool::new(false),
            stalled_by_held: AtomicBool::new(false),
            redis_warnings: Mutex::default(),
            freshness: Mutex::new(None),
        }
    }
}

impl Health {
    /// The freshness sampler runs: the status page shows its counts.
    pub fn sample_freshness(&self) {
        let mut window = self.freshness.lock().unwrap_or_else(|e| e.into_inner());
        window.get_or_insert_with(|| FreshnessWindow {
            minutes: Default::default(),
        });
    }

    /// The sampler checked `checked` keys and found `stale` of them stale.
    pub fn record_freshness(&self, checked: u64, stale: u64) {
        let minute = self.started.elapsed().as_secs() / 60;
        let mut window = self.freshness.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(window) = window.as_mut() {
            window.add(minute, checked, stale);
        }
    }

    /// Keys checked and found stale in the last hour; `None` when the
    /// sampler is off.
    pub fn freshness(&self) -> Option<(u64, u64)> {
        let minute = self.started.elapsed().as_secs() / 60;
        let mut window = self.freshness.lock().unwrap_or_else(|e| e.into_inner());
        window.as_mut().map(|w| {
            w.trim(minute);
            w.totals()
        })
    }

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

    /// Adds a Redis target named `name`, failing until it says otherwise.
    pub fn add_target(self: &Arc<Self>, name: &str) -> TargetHealth {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.push(Target {
            name: name.to_string(),
            ok: false,
            reason: String::new(),
        });
        TargetHealth {
            health: Arc::clone(self),
            index: targets.len() - 1,
        }
    }

    fn set_target(&self, index: usize, ok: bool, reason: &str) {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(target) = targets.get_mut(index) {
            target.ok = ok;
            reason.clone_into(&mut target.reason);
        }
    }

    /// Each target's name, whether it answers, and why not.
    pub fn targets(&self) -> Vec<(String, bool, String)> {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets
            .iter()
            .map(|t| (t.name.clone(), t.ok, t.reason.clone()))
            .collect()
    }

    /// Why Redis is not OK, as the last failure of the first failing
    /// target said (named when there are several).
    pub fn redis_reason(&self) -> String {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let Some(failing) = targets.iter().find(|t| !t.ok) else {
            return "redis is answering".to_string();
        };
        let reason = if failing.reason.is_empty() {
            "redis is not answering"
        } else {
            failing.reason.as_str()
        };
        if targets.len() > 1 {
            format!("target {}: {reason}", failing.name)
        } else {
            reason.to_string()
        }
    }

    /// Whether some Redis target has failed an attempt since it last
    /// answered (a target not tried yet is not failing).
    pub fn redis_failing(&self) -> bool {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.iter().any(|t| !t.ok && !t.reason.is_empty())
    }

    /// Whether every Redis target answered its last attempt.
    pub fn redis_ok(&self) -> bool {
        let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        !targets.is_empty() && targets.iter().all(|t| t.ok)
    }

    /// What the last INFO read of Redis server `server` found lacking
    /// (empty: nothing).
    pub fn set_redis_warnings(&self, server: &str, warnings: Vec<String>) {
        let mut all = self
            .redis_warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if warnings.is_empty() {
            all.remove(server);
        } else {
            all.insert(server.to_string(), warnings);
        }
    }

    /// Every Redis server's warnings, each named by its server when there
    /// are several servers with warnings.
    pub fn redis_warnings(&self) -> Vec<String> {
        let all = self
            .redis_warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let named = all.len() > 1;
        all.iter()
            .flat_map(|(server, warnings)| {
                warnings.iter().map(move |w| {
                    if named {
                        format!("{server}: {w}")
                    } else {
                        w.clone()
                    }
                })
            })
            .collect()
    }

    /// Whether the catalog has drifted from what the rules need.
    pub fn set_drifted(&self, drifted: bool) {
        flag_with_gauge(
            &self.drifted,
            crate::telemetry::metrics::CATALOG_DRIFT,
            drifted,
        );
    }

    /// Whether it has.
    pub fn drifted(&self) -> bool {
        self.drifted.load(Ordering::Relaxed)
    }

    /// Whether invalidations wait behind a held commit that does not show
    /// (a synchronous standby other than the daemon is down or slow).
    pub fn set_stalled_by_held(&self, stalled: bool) {
        flag_with_gauge(
            &self.stalled_by_held,
            crate::telemetry::metrics::STALLED_BY_HELD,
            stalled,
        );
    }

    /// Whether they do.
    pub fn stalled_by_held(&self) -> bool {
        self.stalled_by_held.load(Ordering::Relaxed)
    }

    /// Streaming, Redis answering, every watched table covered, and no
    /// invalidation waiting behind a held commit.
    pub fn ready(&self) -> bool {
        self.streaming() && self.redis_ok() && !self.drifted() && !self.stalled_by_held()
    }
}

/// Sets a readiness flag and the 0/1 gauge that exports it.
fn flag_with_gauge(flag: &AtomicBool, gauge: &'static str, on: bool) {
    flag.store(on, Ordering::Relaxed);
    metrics::gauge!(gauge).set(if on { 1.0 } else { 0.0 });
}

/// One Redis target's last answer.
#[derive(Debug)]
struct Target {
    name: String,
    ok: bool,
    /// Why it is not OK (empty: not answering).
    reason: String,
}

/// What one Redis target reports its state through.
#[derive(Debug, Clone)]
pub struct TargetHealth {
    health: Arc<Health>,
    index: usize,
}

impl TargetHealth {
    /// The target answered (acknowledged a batch, or a PING while idle).
    pub fn ok(&self) {
        self.health.set_target(self.index, true, "");
    }

    /// The target failed for `reason` (one line for `/readyz`: not
    /// answering, refusing writes and why, not acknowledging in time).
    pub fn failing(&self, reason: &str) {
        self.health.set_target(self.index, false, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_before_the_loop_and_ready_only_when_both_up() {
        let health = Arc::new(Health::default());
        assert!(health.alive(), "start-up counts as alive");
        health.tick();
        assert!(health.alive());
        assert!(!health.ready());
        health.set_streaming(true);
        assert!(!health.ready(), "no redis target yet");
        let redis = health.add_target("redis");
        assert!(!health.ready(), "redis not confirmed yet");
        redis.ok();
        assert!(health.ready());
        redis.failing("redis is not answering");
        assert!(!health.ready());
        assert_eq!(health.redis_reason(), "redis is not answering");
    }

    #[test]
    fn every_target_must_answer_and_the_failing_one_is_named() {
        let health = Arc::new(Health::default());
        health.set_streaming(true);
        let (us, eu) = (health.add_target("us"), health.add_target("eu"));
        us.ok();
        eu.ok();
        assert!(health.ready());
        eu.failing("redis refuses writes: READONLY");
        assert!(!health.ready());
        assert_eq!(
            health.redis_reason(),
            "target eu: redis refuses writes: READONLY"
        );
        eu.ok();
        assert!(health.ready());
    }
}
