//! The daemon's tasks, started under one cancellation token and joined
//! at shutdown (mini-redis's `Shutdown` is the model).
//!
//! ```text
//!  signals ──cancel──▶ every task
//!  http (/ /metrics /healthz /readyz)      heartbeats (replication)
//!  events → the status page
//!  redis INFO → pgci_redis_… metrics
//!  source ─▶ pipeline::run (plan ─▶ resolve ─▶ sink) ─▶ confirm
//! ```
//!
//! SIGTERM (or Ctrl-C) cancels the token: the apply loop stops reading,
//! applies and confirms what it read, and every other task ends; `run`
//! returns once all of them have. A fatal error in the loop cancels the
//! token the same way.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, RedisConfig, SourceKind};
use crate::db::{catalog, ConnInfo, Db, DbError};
use crate::error::{self, Class, Exit, Fatal, GiveUp, Pace, Retry};
use crate::lsn::Lsn;
use crate::ops::CacheOp;
use crate::pipeline::{self, PipelineError, Stages};
use crate::plan::rules::RuleSet;
use crate::plan::Planner;
use crate::redis::{position, server};
use crate::resolve::Resolver;
use crate::sink::fanout::{Fanout, Opening};
use crate::sink::start::{self, Recorded};
use crate::sink::{RedisSink, Sink, SinkError};
use crate::source::outbox::OutboxSource;
use crate::source::replication::install::SlotServer;
use crate::source::replication::{slot, ReplicationSource};
use crate::source::{install, Source};
use crate::telemetry;
use crate::telemetry::health::{Health, TargetHealth};
use crate::telemetry::status::Board;

/// How long the other tasks get to finish once the loop has stopped.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long start-up may wait for PostgreSQL to answer its questions
/// (connecting included) before it drops that connection and asks again
/// on a new one. Each question is a small catalog query; a server that
/// is up answers them within milliseconds.
const STARTUP_QUESTIONS_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the daemon stopped.
#[derive(Debug)]
pub enum Stopped {
    /// The configuration or the database does not fit: one line each.
    Problems(Vec<String>),
    /// The database could not be reached for good.
    Database(DbError),
    /// Retrying cannot fix what happened.
    Fatal(Fatal),
    /// Something else broke.
    Failed(String),
    /// Shutdown was asked for (SIGTERM) while start-up waited for a
    /// database or a Redis that did not answer yet: nothing was read, so
    /// nothing is lost (exit 0, as any SIGTERM).
    Cancelled,
    /// Shutdown was asked for while Redis or the refresh queries kept
    /// failing: what was not applied was not confirmed, and is replayed at
    /// the next start (exit 0, as any SIGTERM; logged as a warning).
    Interrupted(String),
}

impl Stopped {
    /// How the process ends (see [`Exit`]): 0 for a shutdown, whatever
    /// was failing when it came.
    pub fn exit(&self) -> Exit {
        match self {
            Stopped::Cancelled | Stopped::Interrupted(_) => Exit::Success,
            Stopped::Problems(_) => Exit::UserMustFix,
            Stopped::Database(error) => Exit::of(error.class()),
            Stopped::Fatal(fatal) => Exit::of_fatal(fatal),
            Stopped::Failed(_) => Exit::Broken,
        }
    }

    /// A database error during start-up. One that retrying could have
    /// fixed, met once shutdown was asked for, is the shutdown's.
    fn database(error: DbError, cancel: &CancellationToken) -> Stopped {
        if cancel.is_cancelled() && error.class() == Class::Transient {
            Stopped::Cancelled
        } else {
            Stopped::Database(error)
        }
    }
}

/// Runs the daemon until SIGTERM or a fatal error.
pub async fn run(config: Config, rules: RuleSet, conn: ConnInfo) -> Result<(), Stopped> {
    let decodes_on = match conn.decodes_on_standby() {
        true => format!("standby {}", conn.slot_server().redacted()),
        false => "primary".to_string(),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = crate::telemetry::metrics::COMMIT,
        postgres = %conn.redacted(),
        decodes_on = %decodes_on,
        redis = %config.redis.url.redacted(),
        slot = %config.replication.slot,
        group = config.group.as_deref().unwrap_or("-"),
        tables = rules.tables().count(),
        "starting"
    );
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(wait_for_signal(cancel.clone()));
    let outcome = start_and_run(&config, rules, conn, &cancel, &tasks).await;
    cancel.cancel();
    tasks.close();
    if tokio::time::timeout(JOIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    match &outcome {
        Ok(()) => tracing::info!("stopped"),
        Err(Stopped::Fatal(fatal)) => tracing::error!(error = %fatal, "stopped on error"),
        Err(Stopped::Failed(text)) => tracing::error!(error = %text, "stopped on error"),
        Err(Stopped::Cancelled) => {
            tracing::info!("stopped while start-up waited for postgres or redis")
        }
        Err(Stopped::Interrupted(why)) => tracing::warn!(error = %why,
            "stopped on request while it kept failing; what was not applied is replayed at the next start"),
        Err(_) => {}
    }
    outcome
}

async fn start_and_run(
    config: &Config,
    rules: RuleSet,
    conn: ConnInfo,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), Stopped> {
    let health = Arc::new(Health::default());
    let metrics = telemetry::metrics::install(config.group.as_deref()).map_err(Stopped::Failed)?;
    health.set_drifted(false);
    health.set_stalled_by_held(false);
    let listener = telemetry::http::bind(&config.http.listen)
        .await
        .map_err(|e| Stopped::Problems(vec![e]))?;
    tracing::info!(listen = %config.http.listen, "serving the status page at /, and /metrics /healthz /readyz");
    let board = Board::new(
        install::of(config).label(),
        rules.tables().map(|(t, _)| t.to_string()).collect(),
        config.http.show_keys,
    );
    tasks.spawn(telemetry::http::serve(
        listener,
        metrics,
        Arc::clone(&health),
        Arc::clone(&board),
        cancel.clone(),
    ));
    if !config.redis.channel.is_empty() {
        tasks.spawn(feed_events(board, config.redis.clone(), cancel.clone()));
    }

    // Bounded: a connection the network drops silently (no FIN, no RST)
    // would hold the start for ever, with nothing in the log.
    let mut retry = Retry::until_shutdown(&Pace::POSTGRES, cancel);
    let (recorded, partitioned, waiting) = loop {
        let attempt = async {
            let db = connect_with_retry(&conn, cancel).await?;
            inspect(&db, config, &rules, &conn, cancel).await
        };
        // A SIGTERM is heard while a question waits: nothing was read yet.
        let answered = tokio::select! {
            answered = tokio::time::timeout(STARTUP_QUESTIONS_TIMEOUT, attempt) => answered,
            () = cancel.cancelled() => return Err(Stopped::Cancelled),
        };
        match answered {
            // The server went away in the middle of the questions (a
            // restart, a failover): asked again, as a start that cannot
            // connect yet is.
            Ok(Err(Stopped::Database(error))) if error.class() == Class::Transient => {
                wait_to_ask_again(
                    &mut retry,
                    error,
                    "",
                    "postgres went away while start-up asked its questions; asking again",
                )
                .await?;
            }
            Ok(inspected) => break inspected?,
            Err(_) => tracing::warn!(timeout = ?STARTUP_QUESTIONS_TIMEOUT,
                "start-up got no answer from postgres in time (a connection the network dropped?); asking again on a new connection"),
        }
    };
    let rules = Arc::new(rules);
    tasks.spawn(crate::freshness::run(
        config.clone(),
        Arc::clone(&rules),
        conn.clone(),
        Arc::clone(&health),
        cancel.clone(),
    ));
    let planner = Planner::new(Arc::clone(&rules));
    if !waiting.is_empty() {
        tracing::warn!(transactions = waiting.len(),
            "commits wait for a synchronous standby other than this daemon; once they show, every key of every rule is flushed (a daemon stopped while it waited for them may not have deleted their keys a second time)");
    }
    let started = Started {
        planner,
        rules,
        partitioned,
        conn,
        waiting,
    };
    let flush_all = started.planner.plan_flush_all();
    let info_every = config.redis.info_interval.0;
    if let [target] = &config.targets[..] {
        let sink = open_target(
            target.clone(),
            recorded,
            flush_all,
            cancel.clone(),
            health.add_target(target.name()),
        )
        .await
        .map_err(|error| match error {
            // Nothing was read yet: a SIGTERM while waiting loses nothing.
            SinkError::GaveUp(_) => Stopped::Cancelled,
            error => sink_stopped(error),
        })?;
        if !info_every.is_zero() {
            tasks.spawn(server::watch(
                target.url.clone(),
                target.ca_cert.clone(),
                sink.cluster(),
                info_every,
                Arc::clone(&health),
                cancel.clone(),
            ));
        }
        return stream(config, started, sink, health, cancel, tasks).await;
    }
    // Several targets: each opens in its own task, so one that is down
    // does not hold the others (see sink::fanout). A URL that cannot be
    // used is a configuration problem, found now.
    let mut openings = Vec::new();
    for (i, target) in config.targets.iter().enumerate() {
        crate::redis::client(&target.url, target.ca_cert.as_deref())
            .map_err(|e| sink_stopped(e.into()))?;
        if !info_every.is_zero() && !target.cluster {
            tasks.spawn(server::watch(
                target.url.clone(),
                target.ca_cert.clone(),
                None,
                info_every,
                Arc::clone(&health),
                cancel.clone(),
            ));
        }
        let open = open_target(
            target.clone(),
            recorded.clone(),
            flush_all.clone(),
            cancel.clone(),
            health.add_target(target.name()),
        );
        let counted = i == 0;
        openings.push(Opening {
            name: target.name().to_string(),
            open: Box::pin(async move { Ok(open.await?.counting_metrics(counted)) }),
            max_backlog: target
                .max_backlog_bytes
                .unwrap_or(crate::sink::fanout::MAX_BACKLOG_BYTES),
        });
    }
    let sink = Fanout::start(openings, flush_all);
    stream(config, started, sink, health, cancel, tasks).await
}

/// Start-up's questions to PostgreSQL on `db`: the install and the
/// rules checked (problems stop the start), where the source's position
/// is kept, which watched tables are partitioned, and which transactions
/// wait for a synchronous standby other than this daemon (see
/// [`slot::waiting_for_other_standbys`]; asked before any target is
/// prepared, whose start-up flush they may outlive).
async fn inspect(
    db: &Db,
    config: &Config,
    rules: &RuleSet,
    conn: &ConnInfo,
    cancel: &CancellationToken,
) -> Result<(Recorded, Vec<crate::change::TableName>, Vec<u32>), Stopped> {
    let problems = install::check(db, conn, config, rules, true)
        .await
        .map_err(|e| Stopped::database(e, cancel))?;
    for warning in catalog::warnings(db, rules)
        .await
        .map_err(|e| Stopped::database(e, cancel))?
    {
        tracing::warn!(warning = %warning, "check the rules");
    }
    if !problems.is_empty() {
        return Err(Stopped::Problems(problems));
    }
    let recorded = match config.postgres.source {
        SourceKind::Replication => {
            let slot = &config.replication.slot;
            let server = SlotServer::open(db, conn)
                .await
                .map_err(|e| Stopped::database(e, cancel))?;
            Recorded::Slot {
                slot: slot.clone(),
                confirmed: catalog::inspect_slot(server.db(), slot)
                    .await
                    .map_err(|e| Stopped::database(e, cancel))?
                    .and_then(|info| info.confirmed_flush_lsn)
                    .and_then(|text| text.parse::<Lsn>().ok()),
            }
        }
        SourceKind::Outbox => Recorded::Outbox {
            key: position::outbox_key(&config.outbox.schema),
        },
    };
    let mut partitioned = Vec::new();
    for (table, _) in rules.tables() {
        let info = catalog::inspect_table(db, table)
            .await
            .map_err(|e| Stopped::database(e, cancel))?;
        if info.is_some_and(|i| i.is_partitioned()) {
            partitioned.push(table.clone());
        }
    }
    let waiting = match config.postgres.source {
        SourceKind::Replication => {
            slot::waiting_for_other_standbys(db, &config.replication.application_name)
                .await
                .map_err(|e| Stopped::database(e, cancel))?
        }
        SourceKind::Outbox => Vec::new(),
    };
    Ok((recorded, partitioned, waiting))
}

/// What start-up prepared for the stream.
struct Started {
    planner: Planner,
    rules: Arc<RuleSet>,
    /// Watched tables that are partitioned (see `pipeline`'s drift).
    partitioned: Vec<crate::change::TableName>,
    conn: ConnInfo,
    /// Transactions that wait for another synchronous standby (see
    /// [`slot::waiting_for_other_standbys`]).
    waiting: Vec<u32>,
}

/// Connects to one Redis target and makes it safe to stream into (see
/// [`start::prepare`]).
async fn open_target(
    target: RedisConfig,
    recorded: Recorded,
    flush_all: CacheOp,
    cancel: CancellationToken,
    health: TargetHealth,
) -> Result<RedisSink, SinkError> {
    let seeds = target.cluster_seeds();
    let mut sink = RedisSink::connect(
        &target.url,
        target.ca_cert.as_deref(),
        seeds.as_deref(),
        &target.channel,
        cancel,
        health,
    )
    .await?
    .with_sharded_events(target.sharded_events)?
    .with_stream(&target.stream, target.stream_max_len)
    .fencing_until_visible(target.fence_until_visible);
    start::prepare(&mut sink, &recorded, &flush_all).await?;
    Ok(sink)
}

/// Streams from the configured source into `sink` until shutdown.
async fn stream<K: Sink>(
    config: &Config,
    started: Started,
    sink: K,
    health: Arc<Health>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), Stopped> {
    let Started {
        planner,
        rules,
        partitioned,
        conn,
        waiting,
    } = started;
    let (drift_tx, drift_rx) = tokio::sync::watch::channel(Default::default());
    let stages = Stages {
        planner,
        resolver: Resolver::new(conn.clone(), cancel.clone()).reporting_to(Arc::clone(&health)),
        sink,
        conn: conn.clone(),
        drift: (config.postgres.source == SourceKind::Replication
            && !config.replication.heartbeat_interval.0.is_zero())
        .then_some(drift_rx),
        partitioned,
        held_across_restart: waiting,
    };
    match config.postgres.source {
        SourceKind::Outbox => {
            let source =
                OutboxSource::start(conn, config.outbox.clone(), rules, Arc::clone(&health));
            drive(source, stages, health, cancel).await
        }
        SourceKind::Replication => {
            let every = config.replication.heartbeat_interval.0;
            let (seen_tx, seen_rx) = tokio::sync::watch::channel(None);
            if !every.is_zero() {
                tasks.spawn(slot::heartbeats(
                    conn.clone(),
                    config.replication.slot.clone(),
                    config.replication.application_name.clone(),
                    every,
                    slot::DriftCheck {
                        rules: Arc::clone(&rules),
                        publication: config.replication.publication.clone(),
                        report: drift_tx,
                    },
                    seen_tx,
                    cancel.clone(),
                ));
            }
            let source = ReplicationSource::new(
                conn,
                config.replication.slot.clone(),
                config.replication.publication.clone(),
                Arc::clone(&health),
            )
            .with_buffer(config.replication.buffer_messages)
            .with_application_name(&config.replication.application_name)
            .with_server_view(seen_rx);
            let source = match config.targets.first() {
                Some(target) => source.with_origin_store(Arc::new(RedisOriginStore {
                    url: target.url.clone(),
                    ca_cert: target.ca_cert.clone(),
                    slot: config.replication.slot.clone(),
                })),
                None => source,
            };
            drive(source, stages, health, cancel).await
        }
    }
}

async fn drive<S: Source, K: Sink>(
    source: S,
    stages: Stages<K>,
    health: Arc<Health>,
    cancel: &CancellationToken,
) -> Result<(), Stopped> {
    pipeline::run(source, stages, health, cancel.clone())
        .await
        .map_err(|error| match error {
            PipelineError::Source(fatal)
            | PipelineError::Sink(SinkError::Fatal(fatal))
            | PipelineError::Resolve(crate::resolve::ResolveError::Fatal(fatal)) => {
                Stopped::Fatal(fatal)
            }
            // Shutdown came while Redis or the queries kept failing: what
            // was not applied was not confirmed.
            PipelineError::Sink(SinkError::GaveUp(why))
            | PipelineError::Resolve(crate::resolve::ResolveError::GaveUp(why)) => {
                Stopped::Interrupted(why)
            }
            other => Stopped::Failed(other.to_string()),
        })
}

fn sink_stopped(error: SinkError) -> Stopped {
    match error {
        SinkError::Fatal(fatal) => Stopped::Fatal(fatal),
        SinkError::BadUrl(_) => Stopped::Problems(vec![error.to_string()]),
        SinkError::GaveUp(_) => Stopped::Failed(error.to_string()),
    }
}

/// The database may still be starting when the daemon starts (systemd
/// ordering, a failover): keep trying while the error policy says it is
/// transient.
async fn connect_with_retry(conn: &ConnInfo, cancel: &CancellationToken) -> Result<Db, Stopped> {
    let mut retry = Retry::until_shutdown(&Pace::POSTGRES, cancel);
    loop {
        match Db::connect(conn).await {
            Ok(db) => return Ok(db),
            Err(error) => {
                let hint = match &error {
                    DbError::Query { source, .. }
                        if error::is_unreachable(source) && only_ipv6(conn).await =>
                    {
                        error::IPV6_ONLY_HINT
                    }
                    _ => "",
                };
                wait_to_ask_again(&mut retry, error, hint, "cannot reach postgres; retrying")
                    .await?;
            }
        }
    }
}

/// Waits before start-up asks PostgreSQL again after `error` (logged with
/// `hint` and `message`), or says why it stops instead: shutdown was
/// requested, or retrying cannot help.
async fn wait_to_ask_again(
    retry: &mut Retry,
    error: DbError,
    hint: &'static str,
    message: &'static str,
) -> Result<(), Stopped> {
    let delay = match retry.after(&error, error.class()) {
        Ok(delay) => delay,
        Err(GiveUp::Shutdown(_)) => return Err(Stopped::Cancelled),
        Err(GiveUp::Fatal(_) | GiveUp::PositionLost(_)) => return Err(Stopped::Database(error)),
    };
    tracing::warn!(error = %error.one_line(), hint, retry_in = ?delay, "{message}");
    retry.sleep(delay).await.map_err(|_| Stopped::Cancelled)
}

/// Whether the database host resolves to IPv6 addresses only.
async fn only_ipv6(conn: &ConnInfo) -> bool {
    match tokio::net::lookup_host((conn.host.as_str(), conn.port)).await {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.is_ipv6())
        }
        Err(_) => false,
    }
}

/// Cancels `cancel` on SIGTERM or Ctrl-C; ends when it is cancelled.
async fn wait_for_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(error = %error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested; applying what was read, then confirming");
    cancel.cancel();
}

/// Feeds the status page the events the daemon publishes, as any
/// subscriber sees them; resubscribes after a lost connection.
async fn feed_events(
    board: Arc<Board>,
    redis: crate::config::RedisConfig,
    cancel: CancellationToken,
) {
    use futures_util::StreamExt;
    loop {
        if let Ok(stream) = crate::sink::redis::events::subscribe(&redis).await {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    payload = stream.next() => match payload {
                        Some(payload) => board.event(&payload),
                        None => break,
                    },
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The replication source's origin kept in the first Redis target
/// (`pgci:origin:<slot>`, see `source::replication::origin`).
struct RedisOriginStore {
    url: crate::secret::SecretUrl,
    ca_cert: Option<std::path::PathBuf>,
    slot: String,
}

impl crate::source::replication::origin::OriginStore for RedisOriginStore {
    fn load(&self) -> futures_util::future::BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            match crate::redis::origin::read_once(&self.url, self.ca_cert.as_deref(), &self.slot)
                .await
            {
                Ok(text) => text,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read the stored server origin from redis; a promotion while the daemon was stopped goes unnoticed this time");
                    None
                }
            }
        })
    }

    fn save(&self, text: String) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(error) = crate::redis::origin::write_once(
                &self.url,
                self.ca_cert.as_deref(),
                &self.slot,
                &text,
            )
            .await
            {
                tracing::warn!(error = %error, "cannot store the server origin in redis; a promotion while the daemon is stopped may go unnoticed at its next start");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_database_error_met_at_shutdown_exits_0_and_otherwise_1() {
        let cancel = CancellationToken::new();
        let during_start = Stopped::database(DbError::Closed, &cancel);
        assert_eq!(during_start.exit().code(), 1, "{during_start:?}");
        cancel.cancel();
        let at_shutdown = Stopped::database(DbError::Closed, &cancel);
        assert_eq!(at_shutdown.exit().code(), 0, "{at_shutdown:?}");
        let bad_url = DbError::BadUrl {
            url: "postgres://x".into(),
            reason: "no".into(),
        };
        assert_eq!(Stopped::database(bad_url, &cancel).exit().code(), 2);
        assert_eq!(Stopped::Problems(vec![]).exit().code(), 2);
        assert_eq!(Stopped::Interrupted("redis".into()).exit().code(), 0);
    }
}
