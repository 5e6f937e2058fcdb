//! The Redis target: applies cache operations to one Redis server or
//! Redis Cluster. It depends on [`crate::ops`] (its contract) and on the
//! plumbing in [`crate::redis`], not on how changes are read or planned.
//!
//! - `again`: the keys a batch's second pass deletes.
//! - [`requests`]: a run of row operations as one atomic pipeline.
//! - [`scripts`]: the version-guarded write of refreshed keys (EVALSHA).
//! - [`events`]: the pub/sub event of each operation, numbered, and the
//!   optional stream.
//! - `open`: connecting (retried until Redis answers), refusing a server
//!   too old, loading the lease functions; reconnecting after READONLY.
//! - [`record`]: what this target applied, and what a replaced record says
//!   about writes Redis lost.
//!
//! The pipeline hands the sink batches in commit order; the sink applies
//! each completely before the batch's acknowledgement may be confirmed to
//! the source. The connection manager reconnects in the background but
//! does not retry the command that was in flight, so [`RedisSink::apply`]
//! retries the whole batch itself until Redis acknowledges it (errors the
//! policy calls transient; see [`crate::error::redis`]): every operation is
//! idempotent or version-guarded, so a repeat is harmless, and nothing is
//! skipped.

pub(crate) mod again;
pub mod events;
mod open;
pub mod record;
pub mod requests;
pub mod scripts;

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::RedisError;
use tokio_util::sync::CancellationToken;

use self::again::Again;
use super::{Sink, SinkError, SinkStats};
use crate::decode::time::pg_micros_to_unix_seconds;
use crate::error::{self, Pace, Retry};
use crate::lsn::Lsn;
use crate::ops::{CacheOp, FlushReason, Item};
use crate::redis::cluster::ClusterConn;
use crate::redis::conn::Conn;
use crate::redis::{flush, position};
use crate::telemetry::health::TargetHealth;
use crate::telemetry::metrics as m;

/// A reply slower than this counts as a failure and the batch is retried.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long opening a connection may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an attempt may wait for Redis before readiness says Redis is
/// not acknowledging: far above a batch's round trip on a healthy server
/// (milliseconds), well below the response timeout.
const SLOW_ATTEMPT: Duration = Duration::from_secs(2);
/// How long an idle readiness check waits for PONG.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// While one batch keeps failing the same way, how often a line says so
/// (the first failure of each kind is logged at once; the rest would be
/// silent at `info`, and a batch that never succeeds must not be).
const STILL_FAILING_EVERY: Duration = Duration::from_secs(30);

/// Which events a step publishes for its row operations (a flush is
/// always announced, with a new epoch).
#[derive(Debug, Clone, Copy)]
enum Announce<'a> {
    /// Those of the operations applied.
    Applied,
    /// None: a first pass, announced by its second.
    Nothing,
    /// Those of these operations (the first pass's, with the second).
    These(&'a [Item]),
}

/// Keys an attempt touched, split as the metrics count them.
#[derive(Debug, Default, Clone, Copy)]
struct Touched {
    removed: u64,
    written: u64,
}

/// Applies batches to Redis.
pub struct RedisSink {
    conn: Conn,
    /// To open a new connection when the node turned replica (READONLY):
    /// the connection manager keeps a connection that answers.
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Kinds of failure already logged in the current run of failures.
    logged: Vec<error::RedisFailure>,
    /// What is applied, recorded with every batch (see [`position`]).
    record: Option<record::Record>,
    /// Where events go; `None` when they are off.
    events: Option<events::Announcer>,
    /// After shutdown is requested a failing batch gets only a few more
    /// attempts (see [`Retry`]).
    cancel: CancellationToken,
    stats: SinkStats,
    health: TargetHealth,
    /// Whether applied work is counted in the change and key metrics:
    /// with several targets only the first counts (see [`fanout`]).
    counts_metrics: bool,
    /// Steps applied (see [`Sink`]).
    steps: u64,
    /// `redis_version` of the server at connect time, when it said.
    server_version: Option<String>,
    /// A first pass leaves a fence where it deletes
    /// (`redis.fence_until_visible`, see [`RedisSink::fencing_until_visible`]).
    fence: bool,
}

impl RedisSink {
    /// The cluster this sink writes to, if it is one (its `INFO` is read
    /// master by master).
    pub fn cluster(&self) -> Option<ClusterConn> {
        match &self.conn {
            Conn::Cluster(cluster) => Some(cluster.clone()),
            _ => None,
        }
    }

    /// Announces with `SPUBLISH` (sharded pub/sub) instead of `PUBLISH`;
    /// refused (a configuration problem, found at start) when the server
    /// is older than Redis 7.0, which has no sharded pub/sub.
    pub fn with_sharded_events(mut self, sharded: bool) -> Result<RedisSink, SinkError> {
        if sharded {
            if let Some(version) = self
                .server_version
                .as_deref()
                .filter(|v| !crate::redis::server::at_least(v, (7, 0)))
            {
                return Err(SinkError::Fatal(crate::error::Fatal {
                    what: format!(
                        "redis.sharded_events: redis {version} has no sharded pub/sub (SPUBLISH is Redis 7.0+)"
                    ),
                    hint: "set sharded_events = false, or upgrade the server",
                    user_must_fix: true,
                }));
            }
        }
        self.events = self.events.map(|e| e.sharded(sharded));
        Ok(self)
    }

    /// Appends every event to the stream `name` too (`redis.stream`),
    /// trimmed to about `max_len` entries; nothing when events are off.
    pub fn with_stream(mut self, name: &str, max_len: u64) -> RedisSink {
        self.events = self.events.map(|e| e.streamed_if(name, max_len));
        self
    }

    /// The first pass of a commit not yet visible
    /// ([`RedisSink::apply_unannounced`]) sets each key it would delete to
    /// the daemon's lease marker ([`pgci_protocol::lease::FENCE`], for
    /// [`pgci_protocol::lease::FENCE_MS`] at most) instead: lease readers
    /// cannot fill the row as it was until the second pass deletes it.
    /// Without it, a reader that missed between the first deletion and the
    /// commit showing fills the old row, and every reader is served it
    /// until the second pass, after the commit returned.
    pub fn fencing_until_visible(mut self, on: bool) -> RedisSink {
        self.fence = on;
        self
    }

    /// Applies `items` completely, retrying transient errors, and records
    /// `applied` as the position everything up to which is now in Redis.
    /// Returns an error if Redis refuses us for good, or if shutdown was
    /// requested and Redis still fails.
    pub async fn apply(&mut self, items: &[Item], applied: Option<Lsn>) -> Result<(), SinkError> {
        self.apply_counted(items, applied, true, Announce::Applied)
            .await
    }

    /// Applies `items` without announcing their rows: the first pass of
    /// a batch whose commits are not known to be visible yet. Their events
    /// go out with the second pass ([`RedisSink::delete_again`]), once
    /// nothing a reader filled in between can still be in Redis: a
    /// subscriber that drops its copy on an event and copies the key again
    /// from Redis must not copy a value the second pass then removes
    /// without a word (found by the soak's in-process copies). Flushes are
    /// announced at once.
    pub async fn apply_unannounced(&mut self, items: &[Item]) -> Result<(), SinkError> {
        self.apply_counted(items, None, true, Announce::Nothing)
            .await
    }

    /// Deletes keys of `items` once more, without counting, announces
    /// `items` (their first pass, [`RedisSink::apply_unannounced`], did
    /// not) and records `applied`: for a batch applied before its commits
    /// were visible (see [`crate::resolve`]). A reader that took a lease in
    /// between may have read the old rows; this voids its lease or removes
    /// what it filled. [`Again::Deleted`]: the keys the batch deleted (a
    /// key that holds a refreshed value cannot be leased); [`Again::All`]:
    /// refreshed keys too (their values may come from queries answered
    /// before the commits showed).
    pub async fn delete_again(
        &mut self,
        items: &[Item],
        scope: Again,
        applied: Option<Lsn>,
    ) -> Result<(), SinkError> {
        let again = again::deletions(items, scope);
        self.apply_counted(&again, applied, false, Announce::These(items))
            .await
    }

    async fn apply_counted(
        &mut self,
        items: &[Item],
        applied: Option<Lsn>,
        counted: bool,
        announce: Announce<'_>,
    ) -> Result<(), SinkError> {
        let applied = self
            .record
            .as_ref()
            .and_then(|r| r.next(applied, !items.is_empty()));
        let record = match (&self.record, applied) {
            (Some(r), Some(lsn)) => Some(position::record(r.key(), lsn)),
            _ => None,
        };
        let announces = matches!(announce, Announce::These(these) if !these.is_empty())
            && self.events.is_some();
        if items.is_empty() && record.is_none() && !announces {
            return Ok(());
        }
        let mut retry = Retry::finishing(&Pace::REDIS, &self.cancel);
        let started = std::time::Instant::now();
        let mut said = started;
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            // A Redis that is frozen (SIGSTOP, CLIENT PAUSE) or overloaded
            // answers nothing until the response timeout: readiness says
            // so once an attempt has waited SLOW_ATTEMPT.
            let health = self.health.clone();
            let attempt = {
                let attempt = self.try_apply(items, record.as_ref(), announce);
                tokio::pin!(attempt);
                tokio::select! {
                    done = &mut attempt => done,
                    () = tokio::time::sleep(SLOW_ATTEMPT) => {
                        health.failing(&format!(
                            "redis has not acknowledged a batch within {}s (frozen, paused or overloaded)",
                            SLOW_ATTEMPT.as_secs()
                        ));
                        attempt.await
                    }
                }
            };
            let attempt = match attempt {
                Ok((touched, replaced)) => {
                    if let Some(replaced) = replaced {
                        self.check_record(replaced.as_deref(), applied);
                    }
                    self.flush_if_writes_lost(applied).await.map(|()| touched)
                }
                Err(error) => Err(error),
            };
            match attempt {
                Ok(touched) => {
                    self.logged.clear();
                    self.health.ok();
                    if counted && !items.is_empty() {
                        self.stats.batches += 1;
                        self.stats.operations += items.len() as u64;
                        self.stats.keys += touched.removed + touched.written;
                        if self.counts_metrics {
                            self.record(items, touched);
                        }
                    }
                    return Ok(());
                }
                Err(error) => {
                    self.stats.retries += 1;
                    let failure = error::RedisFailure::of(&error);
                    let kind = failure.as_str();
                    self.health.failing(&failure.readiness());
                    metrics::counter!(m::REDIS_ERRORS_TOTAL, "kind" => kind).increment(1);
                    let delay = retry.after(&error, error::redis(&error))?;
                    // One line per kind of failure while they last; every
                    // attempt is counted in the metric.
                    if !self.logged.contains(&failure) {
                        self.logged.push(failure);
                        tracing::warn!(error = %error, kind, hint = failure.hint(), retry_in = ?delay,
                            operations = items.len(),
                            "redis batch failed; retrying it (confirmations are held meanwhile)");
                    } else if said.elapsed() >= STILL_FAILING_EVERY {
                        said = std::time::Instant::now();
                        tracing::warn!(error = %error, kind, hint = failure.hint(), attempts,
                            failing_for = ?started.elapsed(), operations = items.len(),
                            "redis batch still failing; retrying it (confirmations are held meanwhile)");
                    } else {
                        tracing::debug!(error = %error, kind, retry_in = ?delay, "redis batch failed again");
                    }
                    if failure == error::RedisFailure::ReadOnly {
                        self.reconnect("after a READONLY reply").await;
                    } else if error.is_timeout() {
                        // The connection may be one the network dropped
                        // without telling either end: the manager would
                        // keep using it.
                        self.reconnect("after a request timed out").await;
                    }
                    retry.sleep(delay).await?;
                }
            }
        }
    }

    /// Counts this sink's applied work in the change and key metrics (on
    /// by default; a fan-out turns it off for every target but the first,
    /// so a change is counted once).
    pub fn counting_metrics(mut self, on: bool) -> RedisSink {
        self.counts_metrics = on;
        self
    }

    /// Asks Redis whether it answers, for readiness while no batch flows;
    /// `true` if it did.
    pub async fn check(&mut self) -> bool {
        let answered = tokio::time::timeout(
            PING_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut self.conn),
        )
        .await;
        match answered {
            Ok(Ok(ref pong)) if pong == "PONG" => self.health.ok(),
            Ok(_) => {
                self.health.failing("redis is not answering");
                return false;
            }
            Err(_) => {
                self.health.failing("redis is not answering");
                // No answer at all: perhaps a connection the network
                // dropped silently, which the manager would keep using.
                self.reconnect("after a PING went unanswered").await;
                return false;
            }
        }
        // While idle no batch writes the record: read it, so that a Redis
        // restored from an older snapshot is found within a tick, not at
        // the next change.
        let Some(key) = self
            .record
            .as_ref()
            .filter(|r| r.last().is_some())
            .map(|r| r.key().to_string())
        else {
            return true;
        };
        let read = tokio::time::timeout(PING_TIMEOUT, async {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(&mut self.conn)
                .await
        })
        .await;
        if let Ok(Ok(found)) = read {
            self.check_record(found.as_deref(), None);
            if let Err(error) = self.flush_if_writes_lost(None).await {
                tracing::warn!(error = %error, "cannot flush after redis lost writes; trying again");
                self.health.failing("redis is not answering");
                return false;
            }
        }
        true
    }

    /// One attempt: runs of row operations as atomic pipelines, a flush
    /// between such runs, in order.
    /// `record`, the position record, goes in the last pipeline (or alone,
    /// when the batch ends with a flush or is empty).
    /// Returns what the record replaced, when it was written (see
    /// [`position::lost_writes`]).
    async fn try_apply(
        &mut self,
        items: &[Item],
        record: Option<&redis::Cmd>,
        announce: Announce<'_>,
    ) -> Result<(Touched, Option<Option<String>>), RedisError> {
        let mut touched = Touched::default();
        let mut rest = items;
        let mut replaced: Option<Option<String>> = None;
        // Announced with the first run (alone, if nothing is deleted).
        let mut instead = match announce {
            Announce::These(these) if !these.is_empty() => Some(these),
            _ => None,
        }
        .filter(|_| self.events.is_some());
        while !rest.is_empty() || instead.is_some() {
            let run = rest
                .iter()
                .take_while(|i| !matches!(i.op, CacheOp::Flush { .. }))
                .count();
            if run > 0 || instead.is_some() {
                let announced = match announce {
                    Announce::Applied => Some(&rest[..run]),
                    Announce::Nothing => None,
                    Announce::These(_) => instead.take(),
                };
                let request = requests::row_request(
                    &rest[..run],
                    self.events.as_ref().zip(announced),
                    self.conn.is_cluster(),
                    self.fence && matches!(announce, Announce::Nothing),
                );
                let mut shards = request.shards;
                // One server: the position goes in the batch's transaction,
                // the only command whose reply is read.
                let single = match (&mut shards[..], record) {
                    ([(_, pipe)], Some(record)) if !self.conn.is_cluster() && run == rest.len() => {
                        pipe.add_command(record.clone());
                        Some(pipe)
                    }
                    _ => None,
                };
                if let Some(pipe) = single {
                    let replies: Vec<Option<String>> = pipe.query_async(&mut self.conn).await?;
                    replaced = Some(replies.into_iter().next().flatten());
                } else {
                    // Every slot's part at once; the events, and the
                    // position (below), only once all of them were
                    // acknowledged, and on a cluster replicated (a
                    // failover must not lose what was acknowledged).
                    self.conn.transactions(&shards).await?;
                }
                // On a cluster the events go to their channel's master
                // (the slot of its sequence record), and the position
                // record (when this run ends the batch) to its own, side
                // by side: one round trip.
                let record_now = record.filter(|_| self.conn.is_cluster() && run == rest.len());
                let (mut events_conn, mut record_conn) = (self.conn.clone(), self.conn.clone());
                let (_, recorded) = futures_util::future::try_join(
                    async {
                        match &request.events {
                            Some(announce) => announce.query_async::<()>(&mut events_conn).await,
                            None => Ok(()),
                        }
                    },
                    async {
                        match record_now {
                            Some(record) => record
                                .query_async::<Option<String>>(&mut record_conn)
                                .await
                                .map(Some),
                            None => Ok(None),
                        }
                    },
                )
                .await?;
                if let Some(recorded) = recorded {
                    replaced = Some(recorded);
                }
                for item in &rest[..run] {
                    let (removed, written) = item.op.keys().counts();
                    touched.removed += removed as u64;
                    touched.written += written as u64;
                }
                rest = &rest[run..];
                continue;
            }
            if let Some((item, tail)) = rest.split_first() {
                touched.removed += self.apply_flush(item).await?;
                rest = tail;
            }
        }
        if let (Some(record), None) = (record, &replaced) {
            replaced = Some(record.query_async(&mut self.conn).await?);
        }
        Ok((touched, replaced))
    }

    async fn apply_flush(&mut self, item: &Item) -> Result<u64, RedisError> {
        let CacheOp::Flush {
            table,
            patterns,
            reason,
        } = &item.op
        else {
            return Ok(0);
        };
        let removed = flush::flush_patterns(&mut self.conn, patterns).await?;
        match reason {
            FlushReason::Truncate => {
                metrics::counter!(m::TRUNCATE_FLUSHES_TOTAL).increment(1);
                tracing::warn!(table = %table, patterns = ?patterns, keys_removed = removed,
                    "table truncated; flushed every key of its rules");
            }
            FlushReason::SlotReset => tracing::error!(patterns = ?patterns, keys_removed = removed,
                "flushed every key of every rule because changes were missed"),
            FlushReason::Drift => {
                tracing::error!(table = %table, patterns = ?patterns, keys_removed = removed,
                "flushed every key of the table's rules because its changes may not have been streamed")
            }
            FlushReason::Operator => {
                tracing::warn!(patterns = ?patterns, keys_removed = removed, "flushed at the operator's request")
            }
            FlushReason::HeldAcrossRestart => {
                tracing::warn!(patterns = ?patterns, keys_removed = removed,
                "flushed every key of every rule once the commits that waited for another synchronous standby across the restart showed")
            }
            FlushReason::HeldTooLarge => {
                tracing::warn!(table = %table, patterns = ?patterns, keys_removed = removed,
                "flushed every key of the table's rules once a synchronous commit too large to remember its keys showed")
            }
        }
        if let Some(events) = &self.events {
            let announce = events.announce(std::slice::from_ref(item), true);
            let _: () = announce.query_async(&mut self.conn).await?;
        }
        Ok(removed)
    }

    /// Metrics for an applied batch, aggregated so labels are built once
    /// per (table, op) rather than per row.
    fn record(&self, items: &[Item], touched: Touched) {
        let mut per_table: HashMap<(&str, &'static str), u64> = HashMap::new();
        let mut last_commit: Option<i64> = None;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        for item in items {
            *per_table.entry(item.op.names()).or_default() += 1;
            if item.commit_micros != 0 && last_commit != Some(item.commit_micros) {
                last_commit = Some(item.commit_micros);
                let committed = pg_micros_to_unix_seconds(item.commit_micros);
                metrics::histogram!(m::APPLY_LATENCY_SECONDS).record((now - committed).max(0.0));
            }
        }
        for ((table, op), n) in per_table {
            metrics::counter!(m::CHANGES_TOTAL, "table" => table.to_string(), "op" => op)
                .increment(n);
        }
        if let Some(micros) = last_commit {
            metrics::gauge!(m::LAST_APPLIED_COMMIT_TIMESTAMP_SECONDS)
                .set(pg_micros_to_unix_seconds(micros));
        }
        metrics::counter!(m::KEYS_INVALIDATED_TOTAL).increment(touched.removed);
        metrics::counter!(m::KEYS_WRITTEN_TOTAL).increment(touched.written);
        if self.events.is_some() {
            metrics::counter!(m::EVENTS_PUBLISHED_TOTAL).increment(items.len() as u64);
        }
        metrics::counter!(m::BATCHES_TOTAL).increment(1);
        metrics::histogram!(m::BATCH_OPERATIONS).record(items.len() as f64);
    }
}

impl Sink for RedisSink {
    async fn apply(&mut self, items: &[Item], applied: Option<Lsn>) -> Result<(), SinkError> {
        RedisSink::apply(self, items, applied).await?;
        self.steps += 1;
        Ok(())
    }

    async fn apply_unannounced(&mut self, items: &[Item]) -> Result<(), SinkError> {
        RedisSink::apply_unannounced(self, items).await?;
        self.steps += 1;
        Ok(())
    }

    async fn delete_again(
        &mut self,
        items: &[Item],
        scope: Again,
        applied: Option<Lsn>,
    ) -> Result<(), SinkError> {
        RedisSink::delete_again(self, items, scope, applied).await?;
        self.steps += 1;
        Ok(())
    }

    async fn check(&mut self) {
        RedisSink::check(self).await;
    }

    fn applied(&self) -> u64 {
        self.steps
    }

    async fn advanced(&mut self) -> Result<(), SinkError> {
        std::future::pending().await
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn stats(&self) -> SinkStats {
        self.stats
    }
}
