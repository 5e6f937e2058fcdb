//! The Redis sink: pipelined UNLINKs and PUBLISHes. The only module that
//! uses the `redis` crate.
//!
//! A batch becomes one `MULTI … EXEC` pipeline, so one round-trip carries
//! many transactions and a connection lost mid-batch applies all of it or
//! none. The connection manager reconnects in the background but does not
//! retry the command that was in flight, so [`RedisSink::apply`] retries the
//! whole batch itself until Redis acknowledges it: every operation is
//! idempotent, so a repeat is harmless, and nothing is skipped. A TRUNCATE
//! becomes SCAN + UNLINK by pattern in bounded steps.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisError};
use serde::Serialize;
use tokio::sync::watch;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::SecretUrl;
use crate::db::query::{QueryJob, QueryRunner};
use crate::decode::time::pg_micros_to_unix_seconds;
use crate::plan::{CacheOp, FlushReason};
use crate::sink::{Batch, Item};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// Keys per SCAN step and per UNLINK when flushing by pattern: large enough
/// to be quick, small enough not to block Redis for long.
const SCAN_COUNT: usize = 1000;
/// First retry delay after a failed batch.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: Redis restarts take seconds.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// A reply slower than this counts as a failure and the batch is retried.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many attempts a batch gets once shutdown was requested.
const ATTEMPTS_AFTER_SHUTDOWN: u32 = 3;

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The URL cannot be used.
    #[error("redis.url {url}: {source}")]
    BadUrl {
        /// Redacted URL.
        url: String,
        /// The client's error.
        #[source]
        source: RedisError,
    },
    /// Shutdown was requested while Redis kept failing; the batch was not
    /// applied and will be replayed on the next start.
    #[error(
        "shutdown while redis was failing ({0}); unapplied changes will be replayed on restart"
    )]
    GaveUp(String),
}

/// The pub/sub event for one applied operation.
#[derive(Debug, Serialize)]
struct Event<'a> {
    table: &'a str,
    op: &'a str,
    action: &'a str,
    keys: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    patterns: Option<&'a [String]>,
    lsn: String,
    commit_time: &'a str,
}

/// Counters of applied work, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct SinkStats {
    /// Operations applied.
    pub operations: u64,
    /// Keys unlinked (counted per command, not per existing key).
    pub keys: u64,
    /// Batches applied.
    pub batches: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
}

/// Applies batches to Redis.
pub struct RedisSink {
    conn: ConnectionManager,
    /// Pub/sub channel; `None` when events are off.
    channel: Option<String>,
    shutdown: watch::Receiver<bool>,
    stats: SinkStats,
    health: Arc<Health>,
    /// Runs the aggregate-key queries of refresh rules.
    queries: QueryRunner,
}

impl RedisSink {
    /// Connects, retrying until Redis answers or shutdown is requested.
    pub async fn connect(
        url: &SecretUrl,
        ca_cert: Option<&std::path::Path>,
        channel: &str,
        queries: QueryRunner,
        shutdown: watch::Receiver<bool>,
        health: Arc<Health>,
    ) -> Result<RedisSink, SinkError> {
        let bad_url = |source| SinkError::BadUrl {
            url: url.redacted(),
            source,
        };
        let client = match ca_cert {
            None => redis::Client::open(url.expose()).map_err(bad_url)?,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    bad_url(RedisError::from(std::io::Error::new(
                        e.kind(),
                        format!("redis.ca_cert {}: {e}", path.display()),
                    )))
                })?;
                redis::Client::build_with_tls(
                    url.expose(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(bad_url)?
            }
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(RETRY_MAX);
        let mut delay = RETRY_MIN;
        let conn = loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(conn) => break conn,
                Err(error) => {
                    if *shutdown.borrow() {
                        return Err(SinkError::GaveUp(error.to_string()));
                    }
                    metrics::counter!(m::RECONNECTS_TOTAL, "target" => "redis").increment(1);
                    tracing::warn!(error = %error, url = %url.redacted(), retry_in = ?delay, "cannot connect to redis; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        };
        tracing::info!(url = %url.redacted(), "connected to redis");
        health.set_redis_ok(true);
        Ok(RedisSink {
            conn,
            channel: (!channel.is_empty()).then(|| channel.to_string()),
            shutdown,
            stats: SinkStats::default(),
            health,
            queries,
        })
    }

    /// Work applied so far.
    pub fn stats(&self) -> SinkStats {
        self.stats
    }

    /// Applies `batch` completely, retrying on any error. Returns an error
    /// only if shutdown was requested and Redis still fails.
    pub async fn apply(&mut self, batch: &Batch) -> Result<(), SinkError> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let mut delay = RETRY_MIN;
        let mut attempts_after_shutdown = 0;
        loop {
            match self.try_apply(&batch.items).await {
                Ok(keys) => {
                    self.stats.batches += 1;
                    self.stats.operations += batch.items.len() as u64;
                    self.stats.keys += keys;
                    self.health.set_redis_ok(true);
                    self.record(batch, keys);
                    return Ok(());
                }
                Err(error) => {
                    self.stats.retries += 1;
                    self.health.set_redis_ok(false);
                    metrics::counter!(m::REDIS_ERRORS_TOTAL).increment(1);
                    if *self.shutdown.borrow() {
                        attempts_after_shutdown += 1;
                        if attempts_after_shutdown >= ATTEMPTS_AFTER_SHUTDOWN {
                            return Err(SinkError::GaveUp(error.to_string()));
                        }
                    }
                    tracing::warn!(error = %error, retry_in = ?delay, operations = batch.items.len(),
                        "redis batch failed; retrying it (confirmations are held meanwhile)");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One attempt. Consecutive invalidations go out as one atomic
    /// pipeline: a single UNLINK of all their keys (deletions commute, so
    /// one command does for many rows), then one PUBLISH per change. A
    /// flush runs between such runs, in order. Returns keys unlinked.
    async fn try_apply(&mut self, items: &[Item]) -> Result<u64, AttemptError> {
        let mut keys = 0u64;
        let mut rest = items;
        while !rest.is_empty() {
            let run = rest
                .iter()
                .take_while(|i| !matches!(i.op, CacheOp::Flush { .. }))
                .count();
            if run > 0 {
                keys += self.apply_invalidations(&rest[..run]).await?;
                rest = &rest[run..];
                continue;
            }
            if let Some((item, tail)) = rest.split_first() {
                keys += self.apply_flush(item).await?;
                rest = tail;
            }
        }
        Ok(keys)
    }

    /// Applies a run of row operations as one atomic pipeline, in order:
    /// consecutive deletions share one UNLINK; refreshed keys are written
    /// by the version-guarded script; events follow. Aggregate queries run
    /// first (concurrently), so their answers land in commit order too.
    async fn apply_invalidations(&mut self, items: &[Item]) -> Result<u64, AttemptError> {
        let mut xids = Vec::new();
        let jobs: Vec<QueryJob<'_>> = items
            .iter()
            .filter_map(|item| match &item.op {
                CacheOp::Query { sql, params, .. } => {
                    if item.xid != 0 && !xids.contains(&item.xid) {
                        xids.push(item.xid);
                    }
                    Some((sql, params.as_slice()))
                }
                _ => None,
            })
            .collect();
        let mut answers = self.queries.run(&jobs, &xids).await?.into_iter();

        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut unlink = redis::cmd("UNLINK");
        let mut unlinking = false;
        let mut keys = 0u64;
        for item in items {
            // Only refreshed keys are versioned; deletions need no string.
            let version = || format!("{:016X}{:08X}", item.lsn.0, item.seq);
            match &item.op {
                CacheOp::Invalidate { keys: k, .. } => {
                    unlink.arg(k.as_slice());
                    unlinking = true;
                    keys += k.len() as u64;
                }
                CacheOp::Refresh {
                    set,
                    del,
                    value,
                    ttl_secs,
                    ..
                } => {
                    flush_unlink(&mut pipe, &mut unlink, &mut unlinking);
                    let version = version();
                    for key in del {
                        pipe.add_command(guarded(key, &version, None, *ttl_secs))
                            .ignore();
                    }
                    for key in set {
                        pipe.add_command(guarded(key, &version, value.as_deref(), *ttl_secs))
                            .ignore();
                    }
                    keys += (set.len() + del.len()) as u64;
                }
                CacheOp::Query {
                    keys: k, ttl_secs, ..
                } => {
                    flush_unlink(&mut pipe, &mut unlink, &mut unlinking);
                    let version = version();
                    let answer = answers.next().flatten();
                    for key in k {
                        pipe.add_command(guarded(key, &version, answer.as_deref(), *ttl_secs))
                            .ignore();
                    }
                    keys += k.len() as u64;
                }
                CacheOp::Flush { .. } => {}
            }
        }
        flush_unlink(&mut pipe, &mut unlink, &mut unlinking);
        if let Some(channel) = &self.channel {
            for item in items {
                pipe.publish(channel, event_json(item)).ignore();
            }
        }
        pipe.query_async::<()>(&mut self.conn).await?;
        Ok(keys)
    }

    async fn apply_flush(&mut self, item: &Item) -> Result<u64, AttemptError> {
        let CacheOp::Flush {
            table,
            patterns,
            reason,
        } = &item.op
        else {
            return Ok(0);
        };
        let removed = self.flush_patterns(patterns).await?;
        match reason {
            FlushReason::Truncate => {
                metrics::counter!(m::TRUNCATE_FLUSHES_TOTAL).increment(1);
                tracing::warn!(table = %table, patterns = ?patterns, keys_removed = removed,
                    "table truncated; flushed every key of its rules");
            }
            FlushReason::SlotReset => tracing::error!(patterns = ?patterns, keys_removed = removed,
                "flushed every key of every rule because changes were missed"),
        }
        if let Some(channel) = &self.channel {
            let _: () = self.conn.publish(channel, event_json(item)).await?;
        }
        Ok(removed)
    }

    async fn flush_patterns(&mut self, patterns: &[String]) -> Result<u64, RedisError> {
        let mut removed = 0u64;
        for pattern in patterns {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut self.conn)
                    .await?;
                if !keys.is_empty() {
                    let n: u64 = self.conn.unlink(&keys).await?;
                    removed += n;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }
}

impl RedisSink {
    /// Metrics for an applied batch, aggregated so labels are built once
    /// per (table, op) rather than per row.
    fn record(&self, batch: &Batch, keys: u64) {
        let mut per_table: HashMap<(&str, &'static str), u64> = HashMap::new();
        let mut last_commit: Option<i64> = None;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        for item in &batch.items {
            let (table, op) = match &item.op {
                CacheOp::Invalidate { table, op, .. }
                | CacheOp::Refresh { table, op, .. }
                | CacheOp::Query { table, op, .. } => (&**table, op.as_str()),
                CacheOp::Flush { table, reason, .. } => (&**table, reason.as_str()),
            };
            *per_table.entry((table, op)).or_default() += 1;
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
        metrics::counter!(m::KEYS_INVALIDATED_TOTAL).increment(keys);
        if self.channel.is_some() {
            metrics::counter!(m::EVENTS_PUBLISHED_TOTAL).increment(batch.items.len() as u64);
        }
        metrics::counter!(m::BATCHES_TOTAL).increment(1);
        metrics::histogram!(m::BATCH_OPERATIONS).record(batch.items.len() as f64);
    }
}

/// Why one attempt at a batch failed; either way the batch is retried.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("postgres: {0}")]
    Query(#[from] crate::db::DbError),
}

/// Moves the pending UNLINK (if it has keys) into the pipeline.
fn flush_unlink(pipe: &mut redis::Pipeline, unlink: &mut redis::Cmd, unlinking: &mut bool) {
    if *unlinking {
        pipe.add_command(std::mem::replace(unlink, redis::cmd("UNLINK")))
            .ignore();
        *unlinking = false;
    }
}

/// Writes (or, with `value` `None`, deletes) `key` unless a newer version
/// was already applied. The version (commit LSN and position in the
/// transaction, fixed-width hex so strings compare like numbers) lives in a
/// companion key that shares the key's hash slot; a replay after a crash
/// therefore never moves a cached value backwards, and a replayed write of
/// a row that was later deleted does not resurrect it.
const GUARDED_WRITE: &str = r#"
local current = redis.call('GET', KEYS[2])
if current and current >= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
else
  redis.call('UNLINK', KEYS[1])
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[5])
return 1
"#;

/// How long a version outlives its value at least: longer than any replay
/// window (a restart replays from the last confirmation, seconds back).
const VERSION_TTL_MIN_SECS: u64 = 3600;

/// The companion key holding `key`'s version.
pub fn version_key(key: &str) -> String {
    format!("{{{key}}}:pgci-version")
}

fn guarded(key: &str, version: &str, value: Option<&str>, ttl_secs: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(GUARDED_WRITE)
        .arg(2)
        .arg(key)
        .arg(version_key(key))
        .arg(version)
        .arg(if value.is_some() { "1" } else { "0" })
        .arg(value.unwrap_or(""))
        .arg(ttl_secs)
        .arg(ttl_secs.max(VERSION_TTL_MIN_SECS));
    cmd
}

fn event_json(item: &Item) -> String {
    let touched: Vec<String>;
    let (table, op, action, keys, patterns): (&str, &str, &str, &[String], _) = match &item.op {
        CacheOp::Refresh {
            table,
            op,
            set,
            del,
            ..
        } => {
            touched = set.iter().chain(del).cloned().collect();
            (table, op.as_str(), "refresh", &touched, None)
        }
        CacheOp::Query {
            table, op, keys, ..
        } => (table, op.as_str(), "refresh", keys, None),
        CacheOp::Invalidate {
            table,
            op,
            action,
            keys,
        } => (table, op.as_str(), action.as_str(), keys, None),
        CacheOp::Flush {
            table,
            patterns,
            reason,
        } => (
            table,
            reason.as_str(),
            "delete",
            &[],
            Some(patterns.as_slice()),
        ),
    };
    let event = Event {
        table,
        op,
        action,
        keys,
        patterns,
        lsn: item.lsn.to_string(),
        commit_time: &item.commit_time,
    };
    serde_json::to_string(&event).unwrap_or_else(|_| String::from("{}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::plan::Op;
    use crate::rules::Action;

    #[test]
    fn events_have_the_documented_shape() {
        let item = Item {
            op: CacheOp::Invalidate {
                table: Arc::from("public.profiles"),
                op: Op::Update,
                action: Action::Delete,
                keys: vec!["profile:user:1".into()],
            },
            lsn: Lsn(0x16B3748),
            commit_time: Arc::from("2026-11-26T07:00:00.123456Z"),
            commit_micros: 1,
            seq: 1,
            xid: 0,
        };
        assert_eq!(
            event_json(&item),
            r#"{"table":"public.profiles","op":"update","action":"delete","keys":["profile:user:1"],"lsn":"0/16B3748","commit_time":"2026-11-26T07:00:00.123456Z"}"#
        );
    }
}
