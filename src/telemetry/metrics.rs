//! Metric names, in one place, Prometheus style: `_total` counters, base
//! units (`_seconds`, `_bytes`), and label values drawn from bounded sets
//! (table names from the configuration, ops, targets, reasons).
//!
//! Recording goes through the `metrics` facade, which is a no-op until
//! [`install`] puts the Prometheus recorder in place (only `run` does).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Row changes applied, by `table` and `op`.
pub const CHANGES_TOTAL: &str = "pgci_changes_total";
/// Keys removed (each key of each applied change, and each key a flush
/// removed).
pub const KEYS_INVALIDATED_TOTAL: &str = "pgci_keys_invalidated_total";
/// Keys written with a refreshed value.
pub const KEYS_WRITTEN_TOTAL: &str = "pgci_keys_written_total";
/// Keys not rendered, by `reason` (`null`: a key column was NULL;
/// `unavailable`: its value did not travel in the stream).
pub const KEYS_SKIPPED_TOTAL: &str = "pgci_keys_skipped_total";
/// Refreshed rows whose keys were deleted instead of written (a value not
/// in the stream, such as an unchanged TOASTed column, or not encodable).
pub const ROWS_NOT_CACHED_TOTAL: &str = "pgci_rows_not_cached_total";
/// Refresh queries that answered NULL or no row (their keys are deleted).
pub const REFRESH_NULL_ANSWERS_TOTAL: &str = "pgci_refresh_null_answers_total";
/// Visibility checks asked of PostgreSQL (one per batch of live commits;
/// a draining backlog needs few, see `db::query::Horizon`).
pub const VISIBILITY_CHECKS_TOTAL: &str = "pgci_visibility_checks_total";
/// Readings of a Redis Cluster's slot map (`CLUSTER SLOTS`): at start, on
/// MOVED, after a lost node, before a flush.
pub const CLUSTER_MAP_READS_TOTAL: &str = "pgci_cluster_map_reads_total";
/// Outbox rows applied (outbox source).
pub const OUTBOX_ROWS_TOTAL: &str = "pgci_outbox_rows_total";
/// Redis `INFO` (see `redis::server`), labelled by `target` (host:port):
/// keyspace hits and misses since the server's restart (the hit ratio),
pub const REDIS_KEYSPACE_HITS_TOTAL: &str = "pgci_redis_keyspace_hits_total";
/// …misses,
pub const REDIS_KEYSPACE_MISSES_TOTAL: &str = "pgci_redis_keyspace_misses_total";
/// …keys evicted under maxmemory,
pub const REDIS_EVICTED_KEYS_TOTAL: &str = "pgci_redis_evicted_keys_total";
/// …keys expired,
pub const REDIS_EXPIRED_KEYS_TOTAL: &str = "pgci_redis_expired_keys_total";
/// …memory used, its peak, and the limit (0: none), bytes,
pub const REDIS_MEMORY_USED_BYTES: &str = "pgci_redis_memory_used_bytes";
/// …
pub const REDIS_MEMORY_PEAK_BYTES: &str = "pgci_redis_memory_peak_bytes";
/// …
pub const REDIS_MEMORY_MAX_BYTES: &str = "pgci_redis_memory_max_bytes";
/// …1 with the eviction policy as the `policy` label,
pub const REDIS_MAXMEMORY_POLICY: &str = "pgci_redis_maxmemory_policy";
/// …connected clients,
pub const REDIS_CONNECTED_CLIENTS: &str = "pgci_redis_connected_clients";
/// …the last successful RDB snapshot (Unix seconds), whether the last one
/// succeeded, and whether AOF is on.
pub const REDIS_RDB_LAST_SAVE_TIMESTAMP: &str = "pgci_redis_rdb_last_save_timestamp_seconds";
/// …
pub const REDIS_RDB_LAST_BGSAVE_OK: &str = "pgci_redis_rdb_last_bgsave_ok";
/// …
pub const REDIS_AOF_ENABLED: &str = "pgci_redis_aof_enabled";
/// Bytes of steps a `[[targets]]` target has not applied yet, by
/// `target` (see `sink::fanout`).
pub const TARGET_BACKLOG_BYTES: &str = "pgci_target_backlog_bytes";
/// Steps the pipeline made that a target has not applied yet, by
/// `target`: what holds the slot's confirmed position back.
pub const TARGET_BEHIND_STEPS: &str = "pgci_target_behind_steps";
/// Backlogs dropped because a failing target's grew past its bound (it
/// flushes every rule key when it answers again), by `target`.
pub const TARGET_BACKLOG_DROPS_TOTAL: &str = "pgci_target_backlog_drops_total";
/// Outbox partitions emptied with TRUNCATE after they were drained.
pub const OUTBOX_TRUNCATES_TOTAL: &str = "pgci_outbox_truncates_total";
/// Events published on the pub/sub channel.
pub const EVENTS_PUBLISHED_TOTAL: &str = "pgci_events_published_total";
/// Cached keys the freshness sampler compared with the database, by rule
/// (its key template).
pub const VERIFY_CHECKED_TOTAL: &str = "pgci_verify_checked_total";
/// Of those, keys found stale (value differs, row gone, not JSON).
pub const VERIFY_STALE_TOTAL: &str = "pgci_verify_stale_total";
/// How long each stale key found had been wrong, at least.
pub const VERIFY_STALE_AGE_SECONDS: &str = "pgci_verify_stale_age_seconds";
/// Batches applied to Redis.
pub const BATCHES_TOTAL: &str = "pgci_batches_total";
/// Operations per applied batch (histogram).
pub const BATCH_OPERATIONS: &str = "pgci_batch_operations";
/// Failed Redis attempts (each is retried), by `kind` (see
/// `error::RedisFailure`: io, readonly, oom, wrongtype, …).
pub const REDIS_ERRORS_TOTAL: &str = "pgci_redis_errors_total";
/// Reconnections, by `target` (`postgres`, `redis`).
pub const RECONNECTS_TOTAL: &str = "pgci_reconnects_total";
/// Seconds from a transaction's commit to Redis acknowledging its
/// invalidations (histogram).
pub const APPLY_LATENCY_SECONDS: &str = "pgci_apply_latency_seconds";
/// Seconds from a transaction's commit to the server sending it on the
/// replication stream, both on the server's clock (histogram): the part of
/// [`APPLY_LATENCY_SECONDS`] spent inside PostgreSQL.
pub const STREAM_SEND_DELAY_SECONDS: &str = "pgci_stream_send_delay_seconds";
/// Seconds the sink spent on one batch, from taking it to its last round
/// trip: refresh queries, both deletion passes and the visibility check
/// between them (histogram).
pub const BATCH_SECONDS: &str = "pgci_batch_seconds";
/// Seconds a confirmation waited in the transport before it was reported
/// to the server, which is what releases a commit waiting for the daemon
/// as a synchronous standby (histogram; see
/// [`crate::source::replication::SYNC_STATUS_INTERVAL`]).
pub const CONFIRM_REPORT_WAIT_SECONDS: &str = "pgci_confirm_report_wait_seconds";
/// Server WAL end seen on the stream minus the confirmed LSN, in bytes.
pub const REPLICATION_LAG_BYTES: &str = "pgci_replication_lag_bytes";
/// WAL the slot keeps on the server (current LSN minus restart LSN).
pub const SLOT_RETAINED_WAL_BYTES: &str = "pgci_slot_retained_wal_bytes";
/// WAL the server may still write before the slot is invalidated
/// (`safe_wal_size`; absent while `max_slot_wal_keep_size` is unlimited).
pub const SLOT_SAFE_WAL_BYTES: &str = "pgci_slot_safe_wal_bytes";
/// 1 while the catalog has drifted from what the rules need (replica
/// identity, publication), else 0.
pub const CATALOG_DRIFT: &str = "pgci_catalog_drift";
/// Sessions waiting for a synchronous standby (`wait_event = 'SyncRep'`);
/// complete only when the daemon's role may read all statistics.
pub const SYNC_WAITERS: &str = "pgci_sync_waiters";
/// 1 while the slot's walsender is a synchronous standby (`sync_state`
/// `sync` or `quorum`), else 0.
pub const SYNC_STANDBY: &str = "pgci_sync_standby";
/// 1 while invalidations wait behind a commit that a synchronous standby
/// other than the daemon holds (past 2 s; not ready meanwhile), else 0.
pub const STALLED_BY_HELD: &str = "pgci_stalled_by_held_commit";
/// Unix time of the commit whose invalidations were applied last.
pub const LAST_APPLIED_COMMIT_TIMESTAMP_SECONDS: &str =
    "pgci_last_applied_commit_timestamp_seconds";
/// The confirmed LSN as a number (for rate() of progress).
pub const CONFIRMED_LSN_BYTES: &str = "pgci_confirmed_lsn_bytes";
/// Times the slot was found lost or missing and rebuilt (keys flushed).
pub const SLOT_RESETS_TOTAL: &str = "pgci_slot_resets_total";
/// Times the database behind the slot turned out to be another server or
/// timeline (a promotion, a restore): the slot was rebuilt, keys flushed.
pub const SERVER_CHANGES_TOTAL: &str = "pgci_server_changes_total";
/// Stream sessions replaced because the server holding the slot no longer
/// heard from them, though their connection never closed.
pub const STREAM_SILENT_TOTAL: &str = "pgci_stream_sessions_unheard_total";
/// Start-ups that flushed every rule key because Redis could not show it
/// had seen every change the slot skipped.
pub const STARTUP_FLUSHES_TOTAL: &str = "pgci_startup_flushes_total";
/// Times a position record showed that Redis lost writes (restarted from
/// an older snapshot, emptied, failed over to a replica that missed them)
/// while the daemon ran, and every rule key was flushed.
pub const REDIS_LOST_WRITES_TOTAL: &str = "pgci_redis_lost_writes_total";
/// HTTP connections closed at once because the listener had
/// `MAX_CONNECTIONS` open.
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "pgci_http_connections_refused_total";
/// TRUNCATEs that flushed a table's keys.
pub const TRUNCATE_FLUSHES_TOTAL: &str = "pgci_truncate_flushes_total";
/// Seconds from writing a heartbeat message to reading it on the stream.
pub const HEARTBEAT_RTT_SECONDS: &str = "pgci_heartbeat_rtt_seconds";
/// Unix time the last heartbeat arrived on the stream.
pub const LAST_HEARTBEAT_TIMESTAMP_SECONDS: &str = "pgci_last_heartbeat_timestamp_seconds";
/// 1 while the replication stream is open, else 0.
pub const STREAMING: &str = "pgci_streaming";
/// 1, labelled with the version and the git commit of the build.
pub const BUILD_INFO: &str = "pgci_build_info";

/// The git commit the binary was built from ("unknown" outside git).
pub const COMMIT: &str = env!("PGCI_GIT_COMMIT");
/// `--version`: the version and the commit.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("PGCI_GIT_COMMIT"),
    ")"
);

/// Buckets of the latency histograms, seconds: fine below 10 ms, where a
/// live stream's figures fall, coarse up to the minute a backlog takes.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Buckets of [`CONFIRM_REPORT_WAIT_SECONDS`], seconds: around the
/// transport's report intervals (100 µs, 1 ms) and its timer's 1 ms tick.
const REPORT_WAIT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.1, 1.0, 10.0,
];

/// Installs the Prometheus recorder and describes every metric.
pub fn install(group: Option<&str>) -> Result<PrometheusHandle, String> {
    let mut builder = PrometheusBuilder::new();
    // A table group's process labels every series with its group.
    if let Some(group) = group {
        builder = builder.add_global_label("group", group);
    }
    for latency in [
        APPLY_LATENCY_SECONDS,
        STREAM_SEND_DELAY_SECONDS,
        BATCH_SECONDS,
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(latency.to_string()), LATENCY_BUCKETS)
            .map_err(|e| e.to_string())?;
    }
    let handle = builder
        .set_buckets_for_metric(
            Matcher::Full(BATCH_OPERATIONS.to_string()),
            &[
                1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2000.0, 4096.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(CONFIRM_REPORT_WAIT_SECONDS.to_string()),
                REPORT_WAIT_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(VERIFY_STALE_AGE_SECONDS.to_string()),
                &[1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0],
            )
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => COMMIT)
        .set(1.0);
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        BUILD_INFO,
        "1, with the version and git commit of the build"
    );
    describe_counter!(CHANGES_TOTAL, "Row changes applied, by table and op");
    describe_counter!(KEYS_INVALIDATED_TOTAL, "Keys removed from Redis");
    describe_counter!(KEYS_WRITTEN_TOTAL, "Keys written with a refreshed value");
    describe_counter!(
        CLUSTER_MAP_READS_TOTAL,
        "Readings of the Redis Cluster's slot map (start, MOVED, lost node, flush)"
    );
    describe_counter!(
        VISIBILITY_CHECKS_TOTAL,
        "Checks that decoded commits are visible to readers"
    );
    describe_counter!(KEYS_SKIPPED_TOTAL, "Keys not rendered, by reason");
    describe_counter!(EVENTS_PUBLISHED_TOTAL, "Events published on the channel");
    describe_counter!(
        VERIFY_CHECKED_TOTAL,
        "Cached keys the freshness sampler compared with the database, by rule"
    );
    describe_counter!(
        VERIFY_STALE_TOTAL,
        "Cached keys the freshness sampler found stale, by rule"
    );
    describe_histogram!(
        VERIFY_STALE_AGE_SECONDS,
        Unit::Seconds,
        "How long each stale key the sampler found had been wrong, at least"
    );
    describe_gauge!(
        TARGET_BACKLOG_BYTES,
        Unit::Bytes,
        "Bytes of steps a target has not applied yet"
    );
    describe_gauge!(
        TARGET_BEHIND_STEPS,
        "Steps a target has not applied yet (they hold the slot's confirmation)"
    );
    describe_counter!(
        TARGET_BACKLOG_DROPS_TOTAL,
        "Backlogs dropped past their bound (the target flushes when it answers again)"
    );
    describe_counter!(OUTBOX_ROWS_TOTAL, "Outbox rows applied");
    describe_counter!(
        REDIS_KEYSPACE_HITS_TOTAL,
        "Redis keyspace hits since its restart (INFO)"
    );
    describe_counter!(
        REDIS_KEYSPACE_MISSES_TOTAL,
        "Redis keyspace misses since its restart (INFO)"
    );
    describe_counter!(REDIS_EVICTED_KEYS_TOTAL, "Keys Redis evicted (INFO)");
    describe_counter!(REDIS_EXPIRED_KEYS_TOTAL, "Keys Redis expired (INFO)");
    describe_gauge!(REDIS_MEMORY_USED_BYTES, Unit::Bytes, "Redis used_memory");
    describe_gauge!(
        REDIS_MEMORY_PEAK_BYTES,
        Unit::Bytes,
        "Redis used_memory_peak"
    );
    describe_gauge!(
        REDIS_MEMORY_MAX_BYTES,
        Unit::Bytes,
        "Redis maxmemory (0: no limit)"
    );
    describe_gauge!(
        REDIS_MAXMEMORY_POLICY,
        "1, with Redis's maxmemory-policy as the policy label"
    );
    describe_gauge!(REDIS_CONNECTED_CLIENTS, "Redis connected_clients");
    describe_gauge!(
        REDIS_RDB_LAST_SAVE_TIMESTAMP,
        Unit::Seconds,
        "Unix time of Redis's last successful RDB snapshot"
    );
    describe_gauge!(
        REDIS_RDB_LAST_BGSAVE_OK,
        "1 if Redis's last RDB snapshot succeeded"
    );
    describe_gauge!(REDIS_AOF_ENABLED, "1 while Redis appends to an AOF");
    describe_counter!(
        OUTBOX_TRUNCATES_TOTAL,
        "Outbox partitions emptied with TRUNCATE once drained"
    );
    describe_counter!(
        REFRESH_NULL_ANSWERS_TOTAL,
        "Refresh queries that answered NULL (keys deleted)"
    );
    describe_counter!(
        ROWS_NOT_CACHED_TOTAL,
        "Refreshed rows deleted instead of written"
    );
    describe_counter!(BATCHES_TOTAL, "Batches applied to Redis");
    describe_histogram!(BATCH_OPERATIONS, "Operations per applied batch");
    describe_counter!(REDIS_ERRORS_TOTAL, "Failed Redis attempts, each retried");
    describe_counter!(RECONNECTS_TOTAL, "Reconnections by target");
    describe_histogram!(
        APPLY_LATENCY_SECONDS,
        Unit::Seconds,
        "Commit to Redis acknowledgement"
    );
    describe_histogram!(
        STREAM_SEND_DELAY_SECONDS,
        Unit::Seconds,
        "Commit to the server sending it on the stream (server clock): the part spent in PostgreSQL"
    );
    describe_histogram!(
        CONFIRM_REPORT_WAIT_SECONDS,
        Unit::Seconds,
        "Confirmation to its report to the server (what releases a synchronous commit)"
    );
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Time the sink spent on one batch (queries, both deletion passes, visibility check)"
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "Server WAL end minus confirmed LSN"
    );
    describe_gauge!(
        SLOT_SAFE_WAL_BYTES,
        Unit::Bytes,
        "WAL the server may still write before the slot is lost"
    );
    describe_gauge!(
        CATALOG_DRIFT,
        "1 while the catalog has drifted from what the rules need"
    );
    describe_gauge!(
        SYNC_WAITERS,
        "Sessions waiting for a synchronous standby (SyncRep)"
    );
    describe_gauge!(
        STALLED_BY_HELD,
        "1 while invalidations wait behind a commit another synchronous standby holds"
    );
    describe_gauge!(
        SYNC_STANDBY,
        "1 while the daemon's walsender is a synchronous standby"
    );
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL retained by the slot"
    );
    describe_gauge!(
        LAST_APPLIED_COMMIT_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Commit time of the last applied transaction"
    );
    describe_gauge!(CONFIRMED_LSN_BYTES, Unit::Bytes, "Confirmed LSN");
    describe_counter!(
        SLOT_RESETS_TOTAL,
        "Lost or missing slots rebuilt (keys flushed)"
    );
    describe_counter!(
        SERVER_CHANGES_TOTAL,
        "Promotions or restores found behind the slot (slot rebuilt, keys flushed)"
    );
    describe_counter!(
        STREAM_SILENT_TOTAL,
        "Stream sessions replaced because the server no longer heard from them (a connection the network dropped silently)"
    );
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED_TOTAL,
        "HTTP connections closed at once because the connection limit was reached"
    );
    describe_counter!(
        REDIS_LOST_WRITES_TOTAL,
        "Times redis was found to have lost writes while running (every rule key flushed)"
    );
    describe_counter!(
        STARTUP_FLUSHES_TOTAL,
        "Start-ups that flushed every rule key (no proof nothing was missed)"
    );
    describe_counter!(
        TRUNCATE_FLUSHES_TOTAL,
        "TRUNCATEs that flushed a table's keys"
    );
    describe_gauge!(
        HEARTBEAT_RTT_SECONDS,
        Unit::Seconds,
        "Heartbeat write to arrival on the stream"
    );
    describe_gauge!(
        LAST_HEARTBEAT_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Arrival time of the last heartbeat"
    );
    describe_gauge!(STREAMING, "1 while the replication stream is open");
}
