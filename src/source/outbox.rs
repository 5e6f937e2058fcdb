//! The `outbox` source: for databases where a replication slot is not
//! available (only a pooler is reachable, no REPLICATION role, no free
//! slot). Triggers installed by `setup` write one outbox row per changed
//! row in the writer's transaction (see `db::outbox`); this loop drains
//! them.
//!
//! ```text
//!  wake-up (NOTIFY) or poll ─▶ BEGIN; SELECT … FOR UPDATE SKIP LOCKED (oldest first)
//!        ─▶ decode rows ─▶ plan ─▶ Redis (retried until acknowledged)
//!        ─▶ DELETE the rows; COMMIT
//! ```
//!
//! The rows are deleted in the same transaction that locked them, and only
//! after Redis acknowledged their operations: a crash, kill -9, or lost
//! connection rolls the transaction back and the rows are drained again
//! (at least once). NOTIFY is only a wake-up; the loop polls every
//! `poll_interval` and drains on start, so rows written while nobody
//! listened are applied too. Several daemons may drain one outbox: SKIP
//! LOCKED gives each its own rows, and refreshed keys are version-guarded
//! by the WAL position at which each row was written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::config::OutboxConfig;
use crate::db::outbox::{self, OutboxRow};
use crate::db::{catalog, types, ConnInfo, Db, DbError};
use crate::decode::json::parse_record;
use crate::decode::pgoutput::{Datum, Relation, RelationColumn, Tuple};
use crate::decode::time::pg_micros_to_rfc3339;
use crate::lsn::Lsn;
use crate::plan::{CacheOp, Op, PlanError, Planner};
use crate::rules::RuleSet;
use crate::sink::redis::{RedisSink, SinkError};
use crate::sink::{Batch, Item};
use crate::telemetry::health::Health;
use crate::telemetry::{metrics as m, systemd};

/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why the outbox loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Redis kept failing through shutdown (the rows stay in the outbox).
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A rule cannot be bound to its table.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// A watched table as the outbox rows describe it.
struct Capture {
    oid: u32,
    /// Columns in the relation.
    width: usize,
    /// Position in the relation of each captured column, in record order.
    positions: Vec<usize>,
}

/// Runs until `shutdown` turns true.
pub async fn run(
    conn: ConnInfo,
    cfg: OutboxConfig,
    rules: Arc<RuleSet>,
    mut sink: RedisSink,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), OutboxError> {
    let mut planner = Planner::new(Arc::clone(&rules));
    let mut delay = Duration::from_millis(200);
    let mut announced = false;
    health.tick();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let session = async {
            let (mut db, wake) = Db::connect_listening(&conn, &cfg.schema).await?;
            let captures = bind(&mut db, &cfg, &rules, &mut planner).await?;
            Ok::<_, DbError>((db, wake, captures))
        };
        let (mut db, mut wake, captures) = match session.await {
            Ok(session) => session,
            Err(error) => {
                metrics::counter!(m::RECONNECTS_TOTAL, "target" => "postgres").increment(1);
                tracing::warn!(error = %error, retry_in = ?delay, "cannot open the outbox; retrying");
                wait(&mut shutdown, delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        delay = Duration::from_millis(200);
        health.set_streaming(true);
        if !announced {
            announced = true;
            systemd::ready();
            tracing::info!(schema = %cfg.schema, "draining the outbox");
        }
        loop {
            health.tick();
            systemd::watchdog();
            let drained = match drain_once(&mut db, &cfg, &captures, &mut planner, &mut sink).await
            {
                Ok(n) => n,
                Err(DrainError::Sink(error)) => return Err(error.into()),
                Err(DrainError::Plan(error)) => return Err(error.into()),
                Err(DrainError::Db(error)) => {
                    health.set_streaming(false);
                    metrics::counter!(m::RECONNECTS_TOTAL, "target" => "postgres").increment(1);
                    tracing::warn!(error = %error, "outbox connection failed; reconnecting");
                    break;
                }
            };
            if drained == cfg.batch_size as usize {
                continue;
            }
            tokio::select! {
                _ = shutdown.changed() => {
                    health.set_streaming(false);
                    return Ok(());
                }
                woke = wake.recv() => {
                    if woke.is_none() {
                        health.set_streaming(false);
                        tracing::warn!("outbox connection closed; reconnecting");
                        break;
                    }
                }
                _ = tokio::time::sleep(cfg.poll_interval.0) => {}
            }
        }
    }
}

async fn wait(shutdown: &mut watch::Receiver<bool>, delay: Duration) {
    tokio::select! {
        _ = shutdown.changed() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Describes each watched table to the planner and reads which columns
/// its trigger captures.
async fn bind(
    db: &mut Db,
    cfg: &OutboxConfig,
    rules: &RuleSet,
    planner: &mut Planner,
) -> Result<HashMap<String, Capture>, DbError> {
    let mut captures = HashMap::new();
    for (table, _) in rules.tables() {
        let Some(info) = catalog::inspect_table(db, table).await? else {
            continue;
        };
        let relation = Relation {
            oid: info.oid,
            namespace: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: b'f',
            columns: info
                .columns
                .iter()
                .map(|c| RelationColumn {
                    is_identity: false,
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: -1,
                })
                .collect(),
        };
        let missing = planner.missing_types(&relation);
        if !missing.is_empty() {
            types::load_types(db, planner.types_mut(), missing).await?;
        }
        if let Err(error) = planner.on_relation(&relation) {
            tracing::error!(error = %error, "cannot bind rules");
            continue;
        }
        let columns = outbox::captured(db, cfg, table).await?.unwrap_or_default();
        let positions = columns
            .iter()
            .filter_map(|c| info.columns.iter().position(|col| &col.name == c))
            .collect::<Vec<_>>();
        if positions.len() != columns.len() {
            tracing::error!(table = %table, "captured columns no longer match the table: run setup");
        }
        captures.insert(
            table.to_string(),
            Capture {
                oid: info.oid,
                width: info.columns.len(),
                positions,
            },
        );
    }
    Ok(captures)
}

enum DrainError {
    Db(DbError),
    Sink(SinkError),
    Plan(PlanError),
}

/// Claims, applies and deletes one batch; returns how many rows it held.
async fn drain_once(
    db: &mut Db,
    cfg: &OutboxConfig,
    captures: &HashMap<String, Capture>,
    planner: &mut Planner,
    sink: &mut RedisSink,
) -> Result<usize, DrainError> {
    let rows = outbox::claim(db, cfg).await.map_err(DrainError::Db)?;
    if rows.is_empty() {
        db.execute_batch("COMMIT").await.map_err(DrainError::Db)?;
        return Ok(0);
    }
    let mut items = Vec::with_capacity(rows.len());
    let mut ops = Vec::new();
    for row in &rows {
        plan_row(row, captures, planner, &mut ops).map_err(DrainError::Plan)?;
        let commit_time: Arc<str> = Arc::from(pg_micros_to_rfc3339(row.created_micros));
        for op in ops.drain(..) {
            items.push(Item {
                op,
                lsn: row.lsn.parse().unwrap_or(Lsn::ZERO),
                commit_time: Arc::clone(&commit_time),
                commit_micros: row.created_micros,
                seq: row.id as u32,
                // Rows read by the drain's snapshot are visible to any
                // later one already.
                xid: 0,
            });
        }
    }
    let batch = Batch {
        items,
        ack: None,
        generation: 0,
    };
    sink.apply(&batch).await.map_err(DrainError::Sink)?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    outbox::finish(db, cfg, &ids)
        .await
        .map_err(DrainError::Db)?;
    metrics::counter!(m::OUTBOX_ROWS_TOTAL).increment(rows.len() as u64);
    Ok(rows.len())
}

/// Plans one outbox row. A row that cannot be read (its table's capture no
/// longer matches) flushes every key of that table's rules instead: an
/// invalidation is never skipped.
fn plan_row(
    row: &OutboxRow,
    captures: &HashMap<String, Capture>,
    planner: &mut Planner,
    ops: &mut Vec<CacheOp>,
) -> Result<(), PlanError> {
    let Some(capture) = captures.get(&row.relation) else {
        tracing::warn!(relation = %row.relation, "outbox row for a table no rule watches; dropped");
        return Ok(());
    };
    let op = match row.op.as_str() {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "delete" => Op::Delete,
        _ => {
            if let Some(flush) = planner.plan_truncate(capture.oid)? {
                ops.push(flush);
            }
            return Ok(());
        }
    };
    let old = row.old_row.as_deref().map(|r| tuple(r, capture));
    let new = row.new_row.as_deref().map(|r| tuple(r, capture));
    match (old, new) {
        (Some(None), _) | (_, Some(None)) => {
            tracing::error!(relation = %row.relation, id = row.id,
                "outbox row does not match the captured columns; flushing the table's keys");
            ops.extend(planner.plan_truncate(capture.oid)?);
            Ok(())
        }
        (old, new) => planner.plan_row(
            capture.oid,
            op,
            old.flatten().as_ref(),
            new.flatten().as_ref(),
            ops,
        ),
    }
}

/// A captured record as a full-width tuple (uncaptured columns NULL), or
/// `None` if it does not parse or has the wrong number of fields.
fn tuple(record: &str, capture: &Capture) -> Option<Tuple> {
    let fields = parse_record(record).ok()?;
    if fields.len() != capture.positions.len() {
        return None;
    }
    let mut tuple = vec![Datum::Null; capture.width];
    for (field, &position) in fields.into_iter().zip(&capture.positions) {
        if let Some(text) = field {
            tuple[position] = Datum::Text(Bytes::from(text));
        }
    }
    Some(tuple)
}
