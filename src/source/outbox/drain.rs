//! Draining the outbox: read the rows of the transactions that committed
//! since the last recorded snapshot, turn them into neutral changes, record
//! the new position once Redis has applied them, and empty drained
//! partitions with TRUNCATE.
//!
//! Nothing here locks or deletes a row: a row costs the drain one index
//! read, and the outbox leaves no dead tuples behind, so draining does not
//! compete with the writers for row locks, WAL or vacuum (the costs of the
//! earlier `FOR UPDATE SKIP LOCKED` + `DELETE` drain). One daemon drains an
//! outbox at a time ([`try_lock`]); others stand by.
//!
//! What a row means is the business of [`super::captures`].

use crate::config::OutboxConfig;
use crate::db::{Db, DbError};
use crate::sql::quote_ident;

/// One outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Its writer's transaction id (xid8 text).
    pub xid: String,
    /// Its id (order of writing within a transaction).
    pub id: i64,
    /// WAL insert position when it was written (versions refreshed keys).
    pub lsn: String,
    /// Writer's transaction start, microseconds since 2000-01-01 UTC.
    pub created_micros: i64,
    /// `schema.table`.
    pub relation: String,
    /// insert, update, delete, truncate.
    pub op: String,
    /// Captured columns of the old row, record text.
    pub old_row: Option<String>,
    /// Captured columns of the new row, record text.
    pub new_row: Option<String>,
}

/// How far the drain got, as recorded in `<schema>.drained`.
///
/// Rows are read in batches: a batch holds the rows of the transactions
/// that committed between two snapshots, `drained` (every transaction
/// visible in it is applied) and the batch's own, taken when it starts.
/// A batch too big for one claim continues after the last `(xid, id)`
/// read. Committed rows never change, so any later statement reads a
/// batch alike, and a transaction is in exactly one batch: nothing is
/// skipped, whatever order transactions commit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Snapshot (pg_snapshot text) whose visible transactions are applied.
    pub drained: String,
    /// The batch under way, if one was cut short.
    pub batch: Option<Batch>,
}

/// A batch cut short by a claim's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The batch's snapshot.
    pub upto: String,
    /// The last row applied: its transaction id (xid8 text)…
    pub after_xid: String,
    /// …and its id.
    pub after_id: i64,
}

/// Most bytes of captured rows one claim holds: whole-row captures of a
/// refresh table can be large (a 100 kB document), and a claim's rows are
/// alive until Redis acknowledged them, alongside the pipeline's batches.
/// 2 MiB, like a pipeline batch, keeps a claim in the low MBs whatever the
/// rows hold while still amortising a round-trip over many rows.
pub const CLAIM_MAX_BYTES: usize = 2 << 20;
/// Rows read per round-trip while a claim fills.
const FETCH_ROWS: usize = 256;
/// Rows read by a claim's first round-trip, before their size is known.
const FIRST_FETCH_ROWS: usize = 32;
/// Advisory lock class of the drain (with the schema's hash as the key):
/// one daemon drains an outbox, others stand by.
const LOCK_CLASS: i32 = 0x7067_6369; // "pgci"

/// Rows claimed: the next rows of the batch under way.
#[derive(Debug)]
pub struct Claim {
    /// The rows, in `(xid, id)` order.
    pub rows: Vec<OutboxRow>,
    /// The claim stopped at a bound (rows or bytes): more may be waiting.
    pub full: bool,
    /// The position once these rows are applied.
    pub next: Position,
}

/// A drain session's statements, prepared once per connection.
pub struct Session {
    read: tokio_postgres::Statement,
    record: tokio_postgres::Statement,
    schema: String,
}

/// What writers read, as the session found it.
#[derive(Debug, Clone, Copy)]
pub struct Writers {
    /// The partition writers fill.
    pub current: i16,
    /// Seconds since writers switched to it.
    pub filling_for: f64,
    /// Whether it holds rows (drained or not) from before this session.
    pub holds_rows: bool,
}

/// Takes the drain lock if no other session holds it (a session-level
/// advisory lock: released when the session ends, also through PgBouncer's
/// session mode, whose reset runs `DISCARD ALL`).
pub async fn try_lock(db: &Db, cfg: &OutboxConfig) -> Result<bool, DbError> {
    Ok(db
        .client()
        .query_one(
            "select pg_try_advisory_lock($1, hashtext($2))",
            &[&LOCK_CLASS, &cfg.schema],
        )
        .await
        .map_err(DbError::query("taking the outbox drain lock"))?
        .get(0))
}

impl Session {
    /// Prepares the session (which must hold the drain lock) and reads the
    /// recorded position and the writers' state. The session's own commits
    /// do not wait for the WAL flush: a position lost in a crash is read
    /// again, and applying rows twice is harmless.
    pub async fn open(
        db: &Db,
        cfg: &OutboxConfig,
    ) -> Result<(Session, Position, Writers), DbError> {
        let schema = quote_ident(&cfg.schema);
        db.execute_batch("set synchronous_commit = off").await?;
        let read = db
            .client()
            .prepare(&format!(
                "select o.xid::text, o.id, o.lsn::text, ((extract(epoch from o.created_at) - 946684800) * 1000000)::int8, \
                        o.relation, o.op, o.old_row, o.new_row \
                   from {schema}.outbox o \
                  where o.xid >= pg_snapshot_xmin($1::text::pg_snapshot) and o.xid < pg_snapshot_xmax($2::text::pg_snapshot) \
                    and (o.xid, o.id) > ($3::text::xid8, $4::int8) \
                    and not pg_visible_in_snapshot(o.xid, $1::text::pg_snapshot) \
                    and pg_visible_in_snapshot(o.xid, $2::text::pg_snapshot) \
                  order by o.xid, o.id limit $5::int8"
            ))
            .await
            .map_err(DbError::query("preparing the outbox read"))?;
        let record = db
            .client()
            .prepare(&format!(
                "update {schema}.drained set snapshot = $1::text::pg_snapshot, batch = $2::text::pg_snapshot, \
                        after_xid = $3::text::xid8, after_id = $4::int8, at = now()"
            ))
            .await
            .map_err(DbError::query("preparing the outbox position"))?;
        let row = db
            .client()
            .query_one(
                &format!(
                    "select d.snapshot::text, d.batch::text, d.after_xid::text, d.after_id, \
                            s.current, extract(epoch from now() - s.rotated_at)::float8, \
                            exists (select 1 from {schema}.outbox o where o.part = s.current) \
                       from {schema}.drained d, {schema}.state s"
                ),
                &[],
            )
            .await
            .map_err(DbError::query("reading the outbox position"))?;
        let batch = match (row.get::<_, Option<String>>(1), row.get(2), row.get(3)) {
            (Some(upto), Some(after_xid), Some(after_id)) => Some(Batch {
                upto,
                after_xid,
                after_id,
            }),
            _ => None,
        };
        let position = Position {
            drained: row.get(0),
            batch,
        };
        let writers = Writers {
            current: row.get(4),
            filling_for: row.get(5),
            holds_rows: row.get(6),
        };
        Ok((
            Session {
                read,
                record,
                schema,
            },
            position,
            writers,
        ))
    }

    /// Reads the next rows after `at`: up to `batch_size` rows and about
    /// [`CLAIM_MAX_BYTES`]. With no batch under way, a new one starts at
    /// the current snapshot. Nothing is locked: the caller applies the
    /// rows, then [`record`](Self::record)s `next`.
    pub async fn claim(
        &self,
        db: &Db,
        cfg: &OutboxConfig,
        at: &Position,
    ) -> Result<Claim, DbError> {
        let (upto, mut after_xid, mut after_id) = match &at.batch {
            Some(b) => (b.upto.clone(), b.after_xid.clone(), b.after_id),
            None => {
                let snapshot: String = db
                    .client()
                    .query_one("select pg_current_snapshot()::text", &[])
                    .await
                    .map_err(DbError::query("reading the outbox"))?
                    .get(0);
                (snapshot, "0".to_string(), 0)
            }
        };
        let limit = cfg.batch_size as usize;
        let mut rows = Vec::new();
        let mut bytes = 0;
        let complete = loop {
            // Rows of unknown size are read a few at a time first; then
            // as many as the bytes left at their average size.
            let per_row = if rows.is_empty() {
                usize::MAX
            } else {
                (CLAIM_MAX_BYTES - bytes) / (bytes / rows.len()).max(1)
            };
            let first = if rows.is_empty() {
                FIRST_FETCH_ROWS
            } else {
                FETCH_ROWS
            };
            let want = first.min(per_row.max(1)).min(limit - rows.len());
            let fetched = db
                .client()
                .query(
                    &self.read,
                    &[&at.drained, &upto, &after_xid, &after_id, &(want as i64)],
                )
                .await
                .map_err(DbError::query("reading the outbox"))?;
            let got = fetched.len();
            for r in &fetched {
                let row = OutboxRow {
                    xid: r.get(0),
                    id: r.get(1),
                    lsn: r.get(2),
                    created_micros: r.get(3),
                    relation: r.get(4),
                    op: r.get(5),
                    old_row: r.get(6),
                    new_row: r.get(7),
                };
                bytes += row.old_row.as_ref().map_or(0, String::len)
                    + row.new_row.as_ref().map_or(0, String::len);
                rows.push(row);
            }
            if let Some(last) = rows.last() {
                after_xid.clone_from(&last.xid);
                after_id = last.id;
            }
            if got < want {
                break true;
            }
            if rows.len() >= limit || bytes >= CLAIM_MAX_BYTES {
                break false;
            }
        };
        let next = if complete {
            Position {
                drained: upto,
                batch: None,
            }
        } else {
            Position {
                drained: at.drained.clone(),
                batch: Some(Batch {
                    upto,
                    after_xid,
                    after_id,
                }),
            }
        };
        Ok(Claim {
            rows,
            full: !complete,
            next,
        })
    }

    /// Records `position` (its rows are applied).
    pub async fn record(&self, db: &Db, position: &Position) -> Result<(), DbError> {
        let batch = position.batch.as_ref();
        db.client()
            .execute(
                &self.record,
                &[
                    &position.drained,
                    &batch.map(|b| b.upto.as_str()),
                    &batch.map(|b| b.after_xid.as_str()),
                    &batch.map(|b| b.after_id),
                ],
            )
            .await
            .map_err(DbError::query("recording the outbox position"))?;
        Ok(())
    }

    /// Switches writers to the other partition; returns the one they left.
    pub async fn rotate(&self, db: &Db) -> Result<i16, DbError> {
        Ok(db
            .client()
            .query_one(
                &format!(
                    "update {}.state set current = 1 - current, rotated_at = now() returning (1 - current)::int2",
                    self.schema
                ),
                &[],
            )
            .await
            .map_err(DbError::query("switching outbox partitions"))?
            .get(0))
    }

    /// Empties partition `part` with TRUNCATE if every row in it is
    /// drained. `drained` is recorded in the same transaction, and the
    /// partition's ACCESS EXCLUSIVE lock first waits for every writer still
    /// inserting into it (a transaction that read `state` before the switch)
    /// to end, so no row can be in it that `drained` does not cover. The
    /// lock is only tried briefly: writers of the other partition never
    /// wait on it, and a busy partition is tried again later.
    pub async fn truncate(
        &self,
        db: &Db,
        part: i16,
        drained: &Position,
    ) -> Result<Emptied, DbError> {
        let table = format!("{}.outbox_{part}", self.schema);
        let any: bool = db
            .client()
            .query_one(&format!("select exists (select 1 from {table})"), &[])
            .await
            .map_err(DbError::query("looking into an outbox partition"))?
            .get(0);
        if !any {
            return Ok(Emptied::Yes);
        }
        let attempt = async {
            db.execute_batch("begin; set local lock_timeout = '200ms'")
                .await?;
            self.record(db, drained).await?;
            db.execute_batch(&format!("lock table {table} in access exclusive mode"))
                .await?;
            let waiting: i64 = db
                .client()
                .query_one(
                    &format!(
                        "select count(*) from {table} \
                          where xid >= pg_snapshot_xmin($1::text::pg_snapshot) \
                            and not pg_visible_in_snapshot(xid, $1::text::pg_snapshot)"
                    ),
                    &[&drained.drained],
                )
                .await
                .map_err(DbError::query("looking into an outbox partition"))?
                .get(0);
            if waiting > 0 {
                db.execute_batch("rollback").await?;
                return Ok::<_, DbError>(Emptied::Waiting(waiting));
            }
            db.execute_batch(&format!("truncate {table}; commit"))
                .await?;
            Ok(Emptied::Yes)
        };
        match attempt.await {
            Ok(emptied) => Ok(emptied),
            Err(error) if error.sqlstate() == Some("55P03") => {
                db.execute_batch("rollback").await?;
                Ok(Emptied::Busy)
            }
            Err(error) => Err(error),
        }
    }

    /// Says whether the drainer waits for a wake-up: capture triggers
    /// NOTIFY only then (NOTIFY's commit-time lock would otherwise
    /// serialise every writing transaction).
    pub async fn set_wake(&self, db: &Db, wake: bool) -> Result<(), DbError> {
        db.execute_batch(&format!(
            "update {}.state set wake = {wake} where wake <> {wake}",
            self.schema
        ))
        .await
    }

    /// Whether a transaction that was running when `snapshot` was taken
    /// still runs. A writer reads the wake-up request before it commits:
    /// one that read it just before the request was made commits without
    /// a NOTIFY, after the drainer's last look (taken with `snapshot`)
    /// could see its row. Such a writer is running in that snapshot, so
    /// the drainer looks again once none of them runs.
    pub async fn still_running(&self, db: &Db, snapshot: &str) -> Result<bool, DbError> {
        db.client()
            .query_one(
                "select exists (select from pg_snapshot_xip($1::text::pg_snapshot) x \
                  where pg_xact_status(x) = 'in progress')",
                &[&snapshot],
            )
            .await
            .map_err(DbError::query("checking for writers in flight"))
            .map(|row| row.get(0))
    }
}

/// What became of a partition the drain tried to empty.
#[derive(Debug, PartialEq, Eq)]
pub enum Emptied {
    /// It is empty.
    Yes,
    /// This many rows in it are not drained yet.
    Waiting(i64),
    /// A writer still inserts into it (the lock was not granted in time).
    Busy,
}

/// Rows waiting and the age of the oldest, for `status`.
pub async fn backlog(db: &Db, cfg: &OutboxConfig) -> Result<(i64, Option<f64>), DbError> {
    let schema = quote_ident(&cfg.schema);
    let row = db
        .client()
        .query_one(
            &format!(
                "select count(*), extract(epoch from now() - min(o.created_at))::float8 \
                   from {schema}.outbox o, {schema}.drained d \
                  where o.xid >= pg_snapshot_xmin(d.snapshot) and not pg_visible_in_snapshot(o.xid, d.snapshot) \
                    and not (d.batch is not null and pg_visible_in_snapshot(o.xid, d.batch) \
                             and (o.xid, o.id) <= (d.after_xid, d.after_id))"
            ),
            &[],
        )
        .await
        .map_err(DbError::query("reading the outbox backlog"))?;
    Ok((row.get(0), row.get(1)))
}
