//! The slot's upkeep beside the stream: recreating it when it was lost,
//! asking the catalog whether it is, and heartbeats.
//!
//! Heartbeats: on an interval, write a logical decoding message (no table
//! needed) through a regular connection and read the slot's retained WAL.
//! The message travels the same path as a change, so its arrival on the
//! stream proves the pipeline alive end to end (its round-trip is a metric),
//! and it gives an idle database WAL to decode, so keepalive confirmations
//! keep the slot from retaining WAL while the watched tables are quiet.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::db::{ConnInfo, Db, DbError, Endpoint};
use crate::error::{Class, Pace, Retry, SlotHealth};
use crate::lsn::Lsn;
use crate::plan::rules::RuleSet;
use crate::source::replication::drift::{drifted_tables, membership, rejoined, CatalogReport};
use crate::source::replication::HEARTBEAT_PREFIX;
use crate::telemetry::metrics as m;

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
/// with each.
pub async fn heartbeats(
    conn: ConnInfo,
    slot: String,
    every: Duration,
    drift: DriftCheck,
    cancel: CancellationToken,
) {
    let mut db: Option<Db> = None;
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
        if db.is_none() {
            db = Db::connect(&conn).await.ok();
        }
        let Some(connection) = &db else { continue };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let checked_at = std::time::Instant::now();
        let members_now = membership(connection, &drift.rules, &drift.publication).await;
        match drifted_tables(connection, &drift.rules, &drift.publication).await {
            // Every check is sent, changed or not: it also tells the loop
            // that tables the stream described as drifted earlier are right
            // again.
            Ok(drifted) => {
                let rejoined = match (&members, &members_now) {
                    (Some(before), Ok(now)) => rejoined(before, now),
                    _ => Vec::new(),
                };
                drift.report.send_replace(CatalogReport {
                    checked_at,
                    drifted,
                    rejoined,
                });
                if let Ok(now) = members_now {
                    members = Some(now);
                }
            }
            Err(error) => tracing::debug!(error = %error, "cannot check the catalog for drift"),
        }
        match heartbeat(connection, HEARTBEAT_PREFIX, &slot, now).await {
            Ok(Some((retained, wal_status))) => {
                failing = false;
                metrics::gauge!(m::SLOT_RETAINED_WAL_BYTES).set(retained as f64);
                if wal_status == "lost" {
                    tracing::error!(slot = %slot, "replication slot is lost; the stream will rebuild it");
                }
            }
            Ok(None) => failing = false,
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "heartbeat failed; retrying every interval");
                }
                failing = true;
                db = None;
            }
        }
    }
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
pub async fn recreate(conn: &ConnInfo, slot: &str, cancel: &CancellationToken) -> Option<Lsn> {
    let mut retry = Retry::until_shutdown(&Pace::POSTGRES, cancel);
    loop {
        let result = match Db::connect(conn).await {
            Ok(db) => recreate_slot(&db, slot).await,
            Err(error) => Err(error),
        };
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
/// [`super::origin`]). Harmless without such a standby.
pub(crate) fn create_sql(major: i32) -> &'static str {
    if major >= 17 {
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
async fn recreate_slot(db: &Db, slot: &str) -> Result<Lsn, DbError> {
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
    let created = db.client().execute(create_sql(major), &[&slot]).await;
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

/// Writes a heartbeat into the WAL (no table needed) and reads how much
/// WAL the slot retains and its `wal_status`.
async fn heartbeat(
    db: &Db,
    prefix: &str,
    slot: &str,
    now_unix_micros: i64,
) -> Result<Option<(i64, String)>, DbError> {
    db.client()
        .execute(
            "select pg_logical_emit_message(false, $1, $2)",
            &[&prefix, &now_unix_micros.to_string()],
        )
        .await
        .map_err(DbError::query(
            "writing a heartbeat with pg_logical_emit_message",
        ))?;
    let row = db
        .client()
        .query_opt(
            "select (pg_current_wal_lsn() - s.restart_lsn)::int8, coalesce(s.wal_status, ''), \
                    (select count(*) from pg_stat_activity where wait_event = 'SyncRep'), \
                    coalesce((select r.sync_state in ('sync', 'quorum') from pg_stat_replication r \
                               where r.pid = s.active_pid), false), \
                    s.safe_wal_size \
               from pg_replication_slots s where s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(DbError::query("reading the slot's retained WAL"))?;
    Ok(row.map(|r| {
        metrics::gauge!(m::SYNC_WAITERS).set(r.get::<_, i64>(2) as f64);
        metrics::gauge!(m::SYNC_STANDBY).set(if r.get::<_, bool>(3) { 1.0 } else { 0.0 });
        // NULL while max_slot_wal_keep_size is unlimited.
        if let Some(safe) = r.get::<_, Option<i64>>(4) {
            metrics::gauge!(m::SLOT_SAFE_WAL_BYTES).set(safe as f64);
        }
        (r.get::<_, Option<i64>>(0).unwrap_or(0), r.get(1))
    }))
}
