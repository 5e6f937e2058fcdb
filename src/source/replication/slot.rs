//! The slot's upkeep beside the stream: recreating it when it was lost,
//! asking the catalog whether it is, and heartbeats.
//!
//! Heartbeats: on an interval, write a logical decoding message (no table
//! needed) through a regular connection and read the slot's retained WAL.
//! The message travels the same path as a change, so its arrival on the
//! stream proves the pipeline alive end to end (its round-trip is a metric),
//! and it gives an idle database WAL to decode, so keepalive confirmations
//! keep the slot from retaining WAL while the watched tables are quiet.
//!
//! Each heartbeat also reads how long the server holding the slot has gone
//! without hearing from the session streaming it ([`ServerView`]): the
//! stream's own connection cannot tell when the network dropped it without
//! a FIN or RST, and the source replaces a session the server no longer
//! hears from. Every heartbeat round is bounded in time for the same
//! reason: its own connection may be the one that silently died.
//!
//! With `replication.url` the slot lives on a hot standby: heartbeats are
//! still written on the primary (they reach the standby's slot through
//! physical replication), the slot's usage is read on the standby, and a
//! slot made there waits for the primary's next running-transactions
//! record, which [`nudging`] asks the primary for.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::db::{ConnInfo, Db, DbError, Endpoint};
use crate::error::{Class, Pace, Retry, SlotHealth};
use crate::lsn::Lsn;
use crate::plan::rules::RuleSet;
use crate::source::replication::drift::{drifted_tables, membership, rejoined, CatalogReport};
use crate::source::replication::install::may_wait_for;
use crate::source::replication::HEARTBEAT_PREFIX;
use crate::telemetry::metrics as m;

/// What the server holding the slot says of the session streaming it, as
/// the last heartbeat read it.
#[derive(Debug, Clone, Copy)]
pub struct ServerView {
    /// When it was read.
    pub checked_at: std::time::Instant,
    /// How long the walsender holding the slot had gone without a reply
    /// from its client; `None` when no session held the slot.
    pub unheard_for: Option<Duration>,
    /// Whether the primary's `synchronous_standby_names` may make commits
    /// wait for this daemon (never when it decodes on a standby).
    pub waited_for: bool,
}

/// The longest a heartbeat round (connecting, the drift check, the
/// heartbeat, the slot's usage) may take before its connections count as
/// dead and are made again.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

/// What the heartbeat also checks: whether the catalog still lets the
/// stream cover every watched table (see [`super::drift`]).
pub struct DriftCheck {
    /// The rules.
    pub rules: Arc<RuleSet>,
    /// The publication.
    pub publication: String,
    /// Where the drifted tables are reported (the apply loop).
    pub report: watch::Sender<CatalogReport>,
}

/// Writes heartbeats every `every` until `cancel` fires; checks for drift
/// with each, and reports the server's view of the stream (named
/// `application_name`) to `seen`.
pub async fn heartbeats(
    conn: ConnInfo,
    slot: String,
    application_name: String,
    every: Duration,
    drift: DriftCheck,
    seen: watch::Sender<Option<ServerView>>,
    cancel: CancellationToken,
) {
    let mut db: Option<Db> = None;
    // The standby that holds the slot (`replication.url`), if not the
    // primary: the heartbeat is written on the primary and read back there.
    let mut standby: Option<Db> = None;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // The last check's membership records (see `drift::membership`).
    let mut members = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let round = tokio::time::timeout(
            ROUND_TIMEOUT,
            beat_round(&conn, &slot, &drift, &mut db, &mut standby, &mut members),
        )
        .await
        .unwrap_or(Err(DbError::TimedOut {
            what: "a heartbeat round",
            after: ROUND_TIMEOUT,
        }));
        match round {
            Ok(Some(usage)) => {
                failing = false;
                metrics::gauge!(m::SLOT_RETAINED_WAL_BYTES).set(usage.retained as f64);
                if usage.wal_status == "lost" {
                    tracing::error!(slot = %slot, "replication slot is lost; the stream will rebuild it");
                }
                seen.send_replace(Some(ServerView {
                    checked_at: std::time::Instant::now(),
                    unheard_for: usage.unheard_for,
                    waited_for: !conn.decodes_on_standby()
                        && may_wait_for(&usage.standby_names, &application_name),
                }));
            }
            Ok(None) => failing = false,
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "heartbeat failed; retrying every interval");
                }
                failing = true;
                db = None;
                standby = None;
            }
        }
    }
}

/// One heartbeat round: (re)connects, checks the catalog for drift, writes
/// the heartbeat and reads the slot's usage where it lives (`None` when
/// that server cannot be reached yet).
async fn beat_round(
    conn: &ConnInfo,
    slot: &str,
    drift: &DriftCheck,
    db: &mut Option<Db>,
    standby: &mut Option<Db>,
    members: &mut Option<std::collections::HashMap<crate::change::TableName, Vec<i64>>>,
) -> Result<Option<SlotUsage>, DbError> {
    {
        if db.is_none() {
            *db = Some(Db::connect(conn).await?);
        }
        let Some(connection) = db.as_ref() else {
            return Ok(None);
        };
        let now = unix_micros_now();
        let checked_at = std::time::Instant::now();
        let members_now = membership(connection, &drift.rules, &drift.publication).await;
        match drifted_tables(connection, &drift.rules, &drift.publication).await {
            // Every check is sent, changed or not: it also tells the loop
            // that tables the stream described as drifted earlier are right
            // again.
            Ok(drifted) => {
                let rejoined = match (members.as_ref(), &members_now) {
                    (Some(before), Ok(now)) => rejoined(before, now),
                    _ => Vec::new(),
                };
                drift.report.send_replace(CatalogReport {
                    checked_at,
                    drifted,
                    rejoined,
                });
                if let Ok(now) = members_now {
                    *members = Some(now);
                }
            }
            Err(error) => tracing::debug!(error = %error, "cannot check the catalog for drift"),
        }
        if conn.decodes_on_standby() && standby.is_none() {
            *standby = Db::connect(conn.slot_server()).await.ok();
        }
        let slot_db = match (standby.as_ref(), conn.decodes_on_standby()) {
            (Some(standby), true) => Some(standby),
            (None, true) => None,
            (_, false) => Some(connection),
        };
        heartbeat(connection, HEARTBEAT_PREFIX, now).await?;
        match slot_db {
            Some(slot_db) => slot_usage(slot_db, slot).await,
            None => Ok(None),
        }
    }
}

/// The time now in microseconds since the Unix epoch: a heartbeat's content.
fn unix_micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the catalog says about `slot`: missing, invalidated (`wal_status
/// = 'lost'`, or an `invalidation_reason`, a column PostgreSQL 17 added and
/// read through `to_jsonb` so older servers need no other query), or usable.
pub async fn health(conn: &ConnInfo, slot: &str) -> SlotHealth {
    let Ok(db) = Db::connect(conn).await else {
        return SlotHealth::Unknown;
    };
    let row = db
        .client()
        .query_opt(
            "select coalesce(s.wal_status = 'lost', false) \
                    or (to_jsonb(s) ->> 'invalidation_reason') is not null \
               from pg_replication_slots s where s.slot_name = $1",
            &[&slot],
        )
        .await;
    match row {
        Ok(None) => SlotHealth::Missing,
        Ok(Some(row)) if row.get::<_, bool>(0) => SlotHealth::Invalidated,
        Ok(Some(_)) => SlotHealth::Usable,
        Err(_) => SlotHealth::Unknown,
    }
}

/// Whether `publication` exists now (`None`: the catalog cannot be read).
pub async fn publication_exists(conn: &ConnInfo, publication: &str) -> Option<bool> {
    let db = Db::connect(conn).await.ok()?;
    crate::db::catalog::inspect_publication(&db, publication)
        .await
        .ok()
        .map(|p| p.is_some())
}

/// Recreates the slot, retrying until it works: the position it starts at
/// (zero when it cannot be read); `None` if `cancel` fired first.
/// With `replication.url` the slot is made on that standby, the primary
/// asked meanwhile for what the standby waits for (see [`nudging`]).
pub async fn recreate(conn: &ConnInfo, slot: &str, cancel: &CancellationToken) -> Option<Lsn> {
    let mut retry = Retry::until_shutdown(&Pace::POSTGRES, cancel);
    loop {
        let result = async {
            let db = Db::connect(conn.slot_server()).await?;
            let pid: i32 =
                crate::db::within("reading the session's pid", WATCH_QUERY_TIMEOUT, async {
                    db.client()
                        .query_one("select pg_backend_pid()", &[])
                        .await
                        .map_err(DbError::query("reading the session's pid"))
                })
                .await?
                .get(0);
            // Without the primary (down, or this standby was promoted and
            // the URL names no other host) the slot is made unhurried.
            let primary = match conn.decodes_on_standby() {
                true => Db::connect(conn).await.ok(),
                false => None,
            };
            // Creating a slot waits for running transactions, for as long
            // as they run: no time limit fits it. Instead, the session is
            // watched from another connection, and given up once the
            // server says it is idle while no answer came (the network
            // dropped the connection silently; the retry finds the slot
            // made, or makes it).
            tokio::select! {
                made = recreate_slot(&db, primary.as_ref(), slot) => made,
                lost = session_lost(conn.slot_server(), pid) => Err(lost),
            }
        }
        .await;
        match result {
            Ok(start) => return Some(start),
            Err(error) => {
                // Every error is retried: the operator sees the warning,
                // and nothing can be applied without a slot.
                let Ok(delay) = retry.after(&error, Class::Transient) else {
                    return None;
                };
                tracing::warn!(error = %error, retry_in = ?delay, "cannot recreate the replication slot; retrying");
                if retry.sleep(delay).await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// How long one query of the watch on a session may take.
const WATCH_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watch looks at the session.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Resolves once the server has shown the session `pid` idle (or gone)
/// twice in a row, [`WATCH_EVERY`] apart, while its caller still waits for
/// an answer: the connection is dead though never closed.
async fn session_lost(conn: &ConnInfo, pid: i32) -> DbError {
    let mut idle_seen = 0;
    let mut watcher: Option<Db> = None;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if watcher.is_none() {
            watcher = crate::db::within(
                "watching the session",
                WATCH_QUERY_TIMEOUT,
                Db::connect(conn),
            )
            .await
            .ok();
        }
        let Some(db) = &watcher else { continue };
        let state = crate::db::within("watching the session", WATCH_QUERY_TIMEOUT, async {
            db.client()
                .query_opt(
                    "select coalesce(state, '') from pg_stat_activity where pid = $1",
                    &[&pid],
                )
                .await
                .map_err(DbError::query("watching the session"))
        })
        .await;
        match state {
            Ok(row) => {
                let idle = row.is_none_or(|r| r.get::<_, String>(0) == "idle");
                idle_seen = if idle { idle_seen + 1 } else { 0 };
                if idle_seen >= 2 {
                    return DbError::TimedOut {
                        what:
                            "recreating the replication slot (the server finished, no answer came)",
                        after: WATCH_EVERY * 2,
                    };
                }
            }
            Err(_) => watcher = None,
        }
    }
}

/// Whether the primary `db` holds logical changes back until named
/// standbys have them (`synchronized_standby_slots`, 17+): their names, or
/// empty.
pub(crate) async fn standby_slots(db: &Db) -> Result<String, DbError> {
    let row = db
        .client()
        .query_one(
            "select coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await
        .map_err(DbError::query("reading synchronized_standby_slots"))?;
    Ok(row.get(0))
}

/// Transactions on the primary `db` whose commits wait for a synchronous
/// standby that this daemon (`application_name`) cannot be; none when
/// `synchronous_standby_names` may name it ([`may_wait_for`]: then the
/// commits waiting at start are this daemon's to release, and show once it
/// confirms them). Read at start, before any target is prepared: a daemon
/// stopped while such a commit was held (see [`crate::pipeline::held`])
/// had confirmed past it before its second deletion, so the restarted one
/// never reads it again, and a reader may fill the old row until it shows.
/// Needs `pg_read_all_stats` to see other roles' sessions (as the
/// visibility check does).
pub(crate) async fn waiting_for_other_standbys(
    db: &Db,
    application_name: &str,
) -> Result<Vec<u32>, DbError> {
    let row = db
        .client()
        .query_one(
            "select current_setting('synchronous_standby_names'), \
                    coalesce(array_agg(backend_xid::text::int8) \
                               filter (where wait_event = 'SyncRep' and backend_xid is not null), \
                             '{}'::int8[]) \
               from pg_stat_activity",
            &[],
        )
        .await
        .map_err(DbError::query(
            "reading the commits that wait for a synchronous standby",
        ))?;
    if may_wait_for(&row.get::<_, String>(0), application_name) {
        return Ok(Vec::new());
    }
    Ok(row
        .get::<_, Vec<i64>>(1)
        .into_iter()
        .filter_map(|xid| u32::try_from(xid).ok())
        .collect())
}

/// What a standby holds of the slot, for `status`.
#[derive(Debug, serde::Serialize)]
pub(crate) struct OnStandby {
    /// `host:port`.
    pub host: String,
    /// Whether the standby holds a synchronized copy (`synced`).
    pub synced: bool,
    /// That copy's confirmed position.
    pub confirmed_lsn: Option<String>,
    /// Why it could not be asked, or what is wrong.
    pub problem: Option<String>,
}

/// Asks every host of `conn` but `primary` about its copy of `slot`.
pub(crate) async fn on_standbys(conn: &ConnInfo, primary: &Endpoint, slot: &str) -> Vec<OnStandby> {
    let mut found = Vec::new();
    for endpoint in conn.endpoints.iter().filter(|e| *e != primary) {
        let plain = conn.at_any(endpoint);
        let mut entry = OnStandby {
            host: endpoint.to_string(),
            synced: false,
            confirmed_lsn: None,
            problem: None,
        };
        let asked = async {
            let db = Db::connect(&plain).await?;
            db.client()
                .query_opt(
                    "select (to_jsonb(s) ->> 'synced')::bool, confirmed_flush_lsn::text \
                       from pg_replication_slots s where slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(DbError::query("reading the standby's slots"))
        };
        match asked.await {
            Ok(Some(row)) => {
                entry.synced = row.get::<_, Option<bool>>(0).unwrap_or(false);
                entry.confirmed_lsn = row.get(1);
                if !entry.synced {
                    entry.problem = Some("holds a copy that is not synchronized".to_string());
                }
            }
            Ok(None) => {
                entry.problem = Some(
                    "holds no copy of the slot: set sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name, and a dbname in primary_conninfo there (PostgreSQL 17+)"
                        .to_string(),
                )
            }
            Err(error) => entry.problem = Some(format!("cannot be asked: {}", error.one_line())),
        }
        found.push(entry);
    }
    found
}

/// The statement that creates the slot (`$1`: its name). From PostgreSQL
/// 17 on it is a failover slot: a standby with `sync_replication_slots`
/// keeps a synchronized copy that a promotion makes usable (see
/// [`super::origin`]). Harmless without such a standby. Not on a standby
/// that decodes (`replication.url`), which cannot create one.
pub(crate) fn create_sql(major: i32, on_standby: bool) -> &'static str {
    // A standby cannot make a failover slot: its own standbys do not
    // synchronize from it.
    if major >= 17 && !on_standby {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

/// How long a rebuild waits for the session that held the old slot (this
/// daemon's, just aborted) to let go of it.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Drops what is left of a lost slot (once no session holds it, waiting
/// up to [`RELEASE_WAIT`]) and creates it anew at the current WAL
/// position, which it returns. Another instance doing the same at once is
/// fine.
async fn recreate_slot(db: &Db, primary: Option<&Db>, slot: &str) -> Result<Lsn, DbError> {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        let active: Option<bool> = db
            .client()
            .query_opt(
                "select active from pg_replication_slots where slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(DbError::query(format!("reading replication slot {slot}")))?
            .map(|row| row.get(0));
        if active != Some(true) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.client()
        .execute(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
              where slot_name = $1 and not active",
            &[&slot],
        )
        .await
        .map_err(DbError::query(format!(
            "dropping lost replication slot {slot}"
        )))?;
    let major = crate::db::catalog::server_major(db).await?;
    let sql = create_sql(major, crate::db::catalog::in_recovery(db).await?);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let create = db.client().execute(sql, &params);
    let created = match primary {
        Some(primary) => {
            nudging(primary, create, || {
                tracing::info!(slot = %slot, "creating the slot on the standby: waiting for the primary's next running-transactions record");
            })
            .await
        }
        None => create.await,
    };
    match created {
        Ok(_) => {}
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
        Err(error) => {
            return Err(DbError::query(format!("creating replication slot {slot}"))(
                error,
            ))
        }
    }
    let start = crate::db::catalog::inspect_slot(db, slot)
        .await?
        .and_then(|info| info.confirmed_flush_lsn)
        .and_then(|text| text.parse::<Lsn>().ok());
    Ok(start.unwrap_or(Lsn::ZERO))
}

/// Writes a heartbeat into the primary's WAL (no table needed) and reads
/// how many commits there wait for a synchronous standby.
async fn heartbeat(primary: &Db, prefix: &str, now_unix_micros: i64) -> Result<(), DbError> {
    let row = primary
        .client()
        .query_one(
            "select pg_logical_emit_message(false, $1, $2)::text, \
                    (select count(*) from pg_stat_activity where wait_event = 'SyncRep')",
            &[&prefix, &now_unix_micros.to_string()],
        )
        .await
        .map_err(DbError::query(
            "writing a heartbeat with pg_logical_emit_message",
        ))?;
    metrics::gauge!(m::SYNC_WAITERS).set(row.get::<_, i64>(1) as f64);
    Ok(())
}

/// The slot's upkeep figures, read where it lives.
struct SlotUsage {
    /// WAL bytes it retains.
    retained: i64,
    /// `wal_status` (`lost` once invalidated).
    wal_status: String,
    /// See [`ServerView::unheard_for`].
    unheard_for: Option<Duration>,
    /// `synchronous_standby_names` where the slot lives.
    standby_names: String,
}

/// How much WAL the slot retains on the server that holds it (`db`, the
/// primary or a decoding standby), its `wal_status`, and how long the
/// walsender holding it has gone without a reply from its client
/// (`reply_time`, or when the session began if it never replied).
async fn slot_usage(db: &Db, slot: &str) -> Result<Option<SlotUsage>, DbError> {
    let row = db
        .client()
        .query_opt(
            &format!(
                "select ({} - s.restart_lsn)::int8, coalesce(s.wal_status, ''), \
                        coalesce((select r.sync_state in ('sync', 'quorum') from pg_stat_replication r \
                                   where r.pid = s.active_pid), false), \
                        s.safe_wal_size, \
                        (select extract(epoch from clock_timestamp() - coalesce(r.reply_time, r.backend_start))::float8 \
                           from pg_stat_replication r where r.pid = s.active_pid), \
                        current_setting('synchronous_standby_names') \
                   from pg_replication_slots s where s.slot_name = $1",
                crate::db::catalog::WAL_NOW
            ),
            &[&slot],
        )
        .await
        .map_err(DbError::query("reading the slot's retained WAL"))?;
    Ok(row.map(|r| {
        metrics::gauge!(m::SYNC_STANDBY).set(if r.get::<_, bool>(2) { 1.0 } else { 0.0 });
        // NULL while max_slot_wal_keep_size is unlimited.
        if let Some(safe) = r.get::<_, Option<i64>>(3) {
            metrics::gauge!(m::SLOT_SAFE_WAL_BYTES).set(safe as f64);
        }
        SlotUsage {
            retained: r.get::<_, Option<i64>>(0).unwrap_or(0),
            wal_status: r.get(1),
            unheard_for: r
                .get::<_, Option<f64>>(4)
                .map(|secs| Duration::from_secs_f64(secs.max(0.0))),
            standby_names: r.get(5),
        }
    }))
}

/// How often work on a standby that waits for the primary asks it again.
const NUDGE_EVERY: Duration = Duration::from_secs(1);
/// How long that work runs before `on_wait` says it is waiting.
const NUDGE_QUIET: Duration = Duration::from_secs(3);

/// Runs `work` on a standby — creating a logical slot there waits for the
/// primary's next running-transactions record, which an idle primary
/// writes every 15 s at best — while asking `primary` for one every
/// second: `pg_log_standby_snapshot()` (16+; superuser, or EXECUTE
/// granted), or without the grant a heartbeat message, which gives the
/// background writer WAL to log a record after. `on_wait` runs once if
/// `work` is still running after a few seconds.
pub(crate) async fn nudging<T>(
    primary: &Db,
    work: impl std::future::Future<Output = T>,
    on_wait: impl FnOnce(),
) -> T {
    tokio::pin!(work);
    let mut ticker = tokio::time::interval(NUDGE_EVERY);
    let started = tokio::time::Instant::now();
    let mut on_wait = Some(on_wait);
    let mut granted = true;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticker.tick() => {}
        }
        if granted {
            granted = primary
                .client()
                .batch_execute("select pg_log_standby_snapshot()")
                .await
                .is_ok();
        }
        if !granted {
            let _ = heartbeat(primary, HEARTBEAT_PREFIX, unix_micros_now()).await;
        }
        if started.elapsed() >= NUDGE_QUIET {
            if let Some(say) = on_wait.take() {
                say();
            }
        }
    }
}
