//! The freshness sampler: `verify` run continuously inside the daemon at a
//! bounded rate (`[verify] sample_per_second`, off by default), so how
//! fresh the cache is can be seen in production, not only in tests (Uber's
//! Cache Inspector and Meta's Polaris do this for their caches).
//!
//! ```text
//!  walk (SCAN step by step, template after template) ─▶ key
//!    ─▶ GET ─▶ compare with the row in PostgreSQL ─▶ differs? wait until
//!       the daemon applied everything committed by now, compare again
//!    ─▶ pgci_verify_checked_total{rule}, pgci_verify_stale_total{rule},
//!       pgci_verify_stale_age_seconds, the status page's "fresh" line,
//!       and a WARN line once per stale key
//! ```
//!
//! Bounds: at most `sample_per_second` keys a second, one connection to
//! PostgreSQL and one to Redis, the keys of one SCAN step in memory, and at
//! most [`REMEMBERED`] stale keys remembered (for their age and to log each
//! once; forgotten all at once when full).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::compare::Comparer;
use crate::db::{ConnInfo, Db};
use crate::plan::rules::RuleSet;
use crate::redis::position;
use crate::source::install;
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;
use crate::verify::{Options, Walk};

/// Stale keys remembered at most.
const REMEMBERED: usize = 10_000;
/// How long the sampler waits after PostgreSQL or Redis failed it.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Samples until `cancel`; a no-op when `sample_per_second` is 0.
pub async fn run(
    config: Config,
    rules: Arc<RuleSet>,
    conn: ConnInfo,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    let rate = config.verify.sample_per_second;
    if rate == 0 {
        return;
    }
    let walk = Walk::new(&rules);
    if walk.is_empty() {
        tracing::warn!("verify.sample_per_second is set, but no rule's keys can be checked: add holds = \"row\" to delete rules that cache rows, or use refresh rules; the sampler is off");
        return;
    }
    health.sample_freshness();
    tracing::info!(
        keys_per_second = rate,
        "the freshness sampler compares cached keys with the database"
    );
    let setup = install::of(&config);
    let options = Options {
        sample: None,
        rate: 0,
        repair: false,
        position_key: setup
            .records_wal_position()
            .then(|| position::key(&setup.record_name())),
    };
    let mut sampler = Sampler {
        walk,
        options,
        health,
        stale_since: HashMap::new(),
    };
    let redis = &config.redis;
    loop {
        let ran = tokio::select! {
            ran = sampler.connected(&conn, redis, rate) => ran,
            () = cancel.cancelled() => return,
        };
        if let Err(error) = ran {
            tracing::warn!(error = %redis.url.scrub(&error), retry_in = ?RETRY_AFTER, "the freshness sampler failed; starting again");
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_AFTER) => {}
            () = cancel.cancelled() => return,
        }
    }
}

struct Sampler<'r> {
    walk: Walk<'r>,
    options: Options,
    health: Arc<Health>,
    /// Stale keys found, and when first.
    stale_since: HashMap<String, Instant>,
}

impl Sampler<'_> {
    /// Connects and samples until a connection fails.
    async fn connected(
        &mut self,
        conn: &ConnInfo,
        redis: &crate::config::RedisConfig,
        rate: u32,
    ) -> Result<(), String> {
        let db = Db::connect(conn).await.map_err(|e| e.to_string())?;
        let mut cache = crate::redis::connect_once(&redis.url, redis.ca_cert.as_deref()).await?;
        let mut comparer = Comparer::new(&db);
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some((index, key)) = self
                .walk
                .next(&mut cache)
                .await
                .map_err(|e| e.to_string())?
            else {
                // Nothing cached to check: look again in a while.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let report = self
                .walk
                .check(&mut comparer, &mut cache, index, &key, &self.options)
                .await
                .map_err(|e| e.to_string())?;
            let rule = self.walk.rule(index);
            self.count(&rule, &key, report.checked, report.stale + report.missing);
        }
    }

    fn count(&mut self, rule: &str, key: &str, checked: u64, stale: u64) {
        if checked == 0 {
            return;
        }
        metrics::counter!(m::VERIFY_CHECKED_TOTAL, "rule" => rule.to_string()).increment(checked);
        self.health.record_freshness(checked, stale);
        if stale == 0 {
            self.stale_since.remove(key);
            return;
        }
        metrics::counter!(m::VERIFY_STALE_TOTAL, "rule" => rule.to_string()).increment(stale);
        if self.stale_since.len() >= REMEMBERED && !self.stale_since.contains_key(key) {
            self.stale_since.clear();
        }
        let mut first_time = false;
        let since = *self.stale_since.entry(key.to_string()).or_insert_with(|| {
            first_time = true;
            Instant::now()
        });
        let age = since.elapsed();
        metrics::histogram!(m::VERIFY_STALE_AGE_SECONDS).record(age.as_secs_f64());
        if first_time {
            tracing::warn!(key = ?key, rule, "the cache holds a value the database does not (stale, or the row is gone) after the daemon applied everything committed: look for writes it cannot see (rules, drift) or readers filling without leases; verify --repair deletes it");
        }
    }
}
