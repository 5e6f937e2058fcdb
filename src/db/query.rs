//! Runs the aggregate-key queries of `refresh` rules on a small pool of
//! regular connections, concurrently up to a bound; answers come back in
//! the order asked, so the sink writes them in commit order. A lost
//! connection fails the batch (the resolver retries it); a query the
//! server rejects answers "none", which deletes its keys.
//!
//! Each statement is prepared once per connection with its parameter types
//! left to the server to infer (`where user_id = $1` makes `$1` a uuid), and
//! the row values are sent in text format, which the server parses as that
//! type: so a rule's query needs no casts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::future::try_join_all;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::Statement;

use crate::db::{within, ConnInfo, Db, DbError};
use crate::telemetry::metrics as m;

/// A parameter value in PostgreSQL's text format, for a parameter of any
/// type: the server parses it as the type it inferred.
#[derive(Debug)]
pub(crate) struct TextParam<'a>(pub(crate) Option<&'a str>);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            None => Ok(IsNull::Yes),
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// One connection of the pool and the statements prepared on it.
struct Conn {
    db: Db,
    statements: Mutex<HashMap<Arc<str>, Statement>>,
}

impl Conn {
    /// `sql` prepared on this connection (once).
    async fn statement(&self, sql: &Arc<str>) -> Result<Statement, tokio_postgres::Error> {
        let cached = self
            .statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.db.client().prepare(sql).await?;
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::clone(sql), statement.clone());
        Ok(statement)
    }

    /// Drops `sql`'s statement (after the server refused it: a schema
    /// change may have invalidated it), so the next call prepares anew.
    fn forget(&self, sql: &str) {
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sql);
    }
}

/// Connections in the pool: queries on one connection are pipelined by
/// the driver, so a few suffice and the database sees a bounded load.
const CONNECTIONS: usize = 4;
/// Queries in flight at once across the pool.
const IN_FLIGHT: usize = 16;

/// One query to run: statement and text parameters.
pub type QueryJob<'a> = (&'a Arc<str>, &'a [Option<String>]);

/// A lazily connected pool.
pub struct QueryRunner {
    conn: ConnInfo,
    clients: Vec<Arc<Conn>>,
    /// Transactions below it are known to be visible (see [`Horizon`]).
    horizon: Horizon,
}

/// The oldest transaction that was still running when a visibility check
/// last looked (its snapshot's xmin): every transaction the stream
/// delivers as committed whose id is below it had become visible by then.
/// While a backlog drains, one check's horizon covers the rest of it, so
/// neither the check nor the second pass is repeated per batch; live
/// commits are newer than any horizon and are still checked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Horizon(Option<u64>);

impl Horizon {
    /// Raises the horizon to `xmin` (a full 64-bit xid).
    pub fn advance(&mut self, xmin: u64) {
        if self.0.is_none_or(|h| xmin > h) {
            self.0 = Some(xmin);
        }
    }

    /// Whether every transaction in `xids` (32-bit, as the stream sends
    /// them) precedes the horizon, compared modulo 2^32 as PostgreSQL
    /// does: a delivered xid is within 2^31 of the current one.
    pub fn covers(&self, xids: &[u32]) -> bool {
        let Some(h) = self.0 else {
            return xids.is_empty();
        };
        let h = h as u32;
        xids.iter().all(|&x| (h.wrapping_sub(x) as i32) > 0)
    }
}

impl QueryRunner {
    /// A pool for `conn`; connects on first use.
    pub fn new(conn: ConnInfo) -> Self {
        QueryRunner {
            conn,
            clients: Vec::new(),
            horizon: Horizon::default(),
        }
    }

    /// Forgets the server: its connections (a wait given up may have left
    /// a query in flight on them) and its horizon (after a promotion, the
    /// new primary may hand the lost transactions' ids to new ones).
    pub fn forget_server(&mut self) {
        self.clients.clear();
        self.horizon = Horizon::default();
    }

    /// Whether the transactions `xids` are known to be visible already,
    /// from an earlier check, without asking (see [`Horizon`]).
    pub fn known_visible(&self, xids: &[u32]) -> bool {
        self.horizon.covers(xids)
    }

    /// Waits until the transactions `xids` are visible to new snapshots,
    /// or held back by a synchronous standby wait (see [`wait_visible`]).
    /// On any error the pool is dropped, to be reconnected by the retry.
    pub async fn wait_visible(&mut self, xids: &[u32], hold: Hold) -> Result<Visibility, DbError> {
        if self.known_visible(xids) {
            return Ok(Visibility::Visible);
        }
        if self.clients.is_empty() {
            self.clients.push(Arc::new(Conn {
                db: Db::connect(&self.conn).await?,
                statements: Mutex::new(HashMap::new()),
            }));
        }
        match within(
            "checking that decoded transactions are visible",
            CHECK_TIMEOUT,
            wait_visible(&self.clients[0], xids, hold),
        )
        .await
        {
            Ok((visibility, xmin)) => {
                self.horizon.advance(xmin);
                Ok(visibility)
            }
            Err(error) => {
                self.clients.clear();
                Err(error)
            }
        }
    }

    /// Runs `jobs`, returning each one's single text answer (`None` for no
    /// row or NULL) in order, at most [`IN_FLIGHT`] at a time, once the
    /// transactions `xids` are visible (or held by a synchronous standby
    /// wait: then the answers may predate them, which the caller repairs).
    /// On any error the pool is dropped, to be reconnected by the retry.
    pub async fn run(
        &mut self,
        jobs: &[QueryJob<'_>],
        xids: &[u32],
    ) -> Result<(Vec<Option<String>>, Visibility), DbError> {
        if jobs.is_empty() {
            return Ok((Vec::new(), Visibility::Visible));
        }
        while self.clients.len() < CONNECTIONS {
            self.clients.push(Arc::new(Conn {
                db: Db::connect(&self.conn).await?,
                statements: Mutex::new(HashMap::new()),
            }));
        }
        let visibility = if self.known_visible(xids) {
            Visibility::Visible
        } else {
            match within(
                "checking that decoded transactions are visible",
                CHECK_TIMEOUT,
                wait_visible(&self.clients[0], xids, Hold::Allowed),
            )
            .await
            {
                Ok((visibility, xmin)) => {
                    self.horizon.advance(xmin);
                    visibility
                }
                Err(error) => {
                    self.clients.clear();
                    return Err(error);
                }
            }
        };
        let mut answers = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(IN_FLIGHT) {
            let running = chunk.iter().enumerate().map(|(i, (sql, params))| {
                let db = Arc::clone(&self.clients[i % self.clients.len()]);
                let sql = Arc::clone(sql);
                let params = params.to_vec();
                async move { run_one(&db, &sql, &params).await }
            });
            match within(
                "running refresh queries",
                QUERY_TIMEOUT,
                try_join_all(running),
            )
            .await
            {
                Ok(done) => answers.extend(done),
                Err(error) => {
                    self.clients.clear();
                    return Err(error);
                }
            }
        }
        Ok((answers, visibility))
    }
}

/// Whether decoded transactions can be seen by readers yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Every one is visible to new snapshots.
    Visible,
    /// Some are committed locally but wait for a synchronous standby (it
    /// may be this daemon: it must confirm them before they show).
    HeldForStandby,
}

/// Whether a synchronous standby wait ends the wait for visibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Yes: the caller applies now, and again once they are visible.
    Allowed,
    /// No: wait until they are visible (after this daemon confirmed them).
    Visible,
}

/// How long to wait for a decoded transaction to become visible before
/// querying anyway: the window is normally microseconds.
const VISIBILITY_WAIT: Duration = Duration::from_secs(5);
/// The longest one visibility check may take, its waiting included,
/// before its connection counts as dead (see [`crate::db::within`]).
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a round of refresh queries may take before their
/// connections count as dead and the round is retried: a refresh query
/// reads a few rows by key, far below this.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until every transaction in `xids` is visible to new snapshots,
/// or (with [`Hold::Allowed`]) until those that are not all wait for a
/// synchronous standby.
///
/// The walsender may send a transaction's commit as soon as its commit
/// record is flushed, a moment before the committing backend makes it
/// visible to other sessions. A query run in that moment would not see the
/// change it was triggered by and would cache the value from before it,
/// stamped with the newer version; a DEL applied in that moment could be
/// followed by a reader that fills the old row. When the commit waits for a
/// synchronous standby (`wait_event = 'SyncRep'`), the moment lasts until
/// the standby confirms — and if this daemon is that standby, waiting here
/// would never end. The 32-bit xid from the stream is widened to a full
/// xid against the snapshot's xmax (a committed xid is less than 2^31
/// behind it). Also returns the xmin of the last snapshot it looked at
/// (see [`Horizon`]).
async fn wait_visible(conn: &Conn, xids: &[u32], hold: Hold) -> Result<(Visibility, u64), DbError> {
    let db = &conn.db;
    // Prepared once per connection: one round-trip per check.
    static SQL: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from(VISIBILITY_SQL));
    let statement = conn
        .statement(&SQL)
        .await
        .map_err(DbError::query("preparing the visibility check"))?;
    let xids: Vec<i64> = xids.iter().map(|&x| i64::from(x)).collect();
    let deadline = tokio::time::Instant::now() + VISIBILITY_WAIT;
    let started = tokio::time::Instant::now();
    let mut attempts = 0u32;
    loop {
        let row = db
            .client()
            .query_one(&statement, &[&xids])
            .await
            .map_err(DbError::query(
                "checking that decoded transactions are visible",
            ))?;
        let (visible, visible_or_held, xmin, sees_waits): (bool, bool, i64, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        metrics::counter!(m::VISIBILITY_CHECKS_TOTAL).increment(1);
        let xmin = u64::try_from(xmin).unwrap_or(0);
        if visible {
            return Ok((Visibility::Visible, xmin));
        }
        // Held by a standby wait, or invisible for longer than a commit
        // takes to show (a role without pg_read_all_stats cannot see other
        // sessions' waits): apply now and again later rather than risk
        // waiting for our own confirmation.
        let assume_after = if sees_waits {
            ASSUME_HELD_AFTER_SEEN
        } else {
            ASSUME_HELD_AFTER
        };
        if hold == Hold::Allowed && (visible_or_held || started.elapsed() >= assume_after) {
            return Ok((Visibility::HeldForStandby, xmin));
        }
        // Querying now could cache the answer from before the change
        // under the change's version: fail, and the resolver retries.
        if tokio::time::Instant::now() >= deadline {
            return Err(DbError::NotVisible {
                xids: xids.len(),
                waited: VISIBILITY_WAIT,
            });
        }
        // The window is usually tens of microseconds: ask again at once a
        // few times (each ask is a round-trip), then every millisecond.
        attempts += 1;
        if attempts > SPIN_ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// The visibility check (see [`wait_visible`]): per xid, visible to a new
/// snapshot, or waiting in a session held by a synchronous standby wait.
const VISIBILITY_SQL: &str =
                "with snap as (select pg_current_snapshot() as s), \
                      bounds as (select s, pg_snapshot_xmax(s)::text::int8 as xmax from snap), \
                      each as (select x, case \
                        when x < xmax % 4294967296 then \
                          pg_visible_in_snapshot(((xmax / 4294967296) * 4294967296 + x)::text::xid8, s) \
                        when x - xmax % 4294967296 < 2147483648 then false \
                        when xmax / 4294967296 = 0 then false \
                        else pg_visible_in_snapshot(((xmax / 4294967296 - 1) * 4294967296 + x)::text::xid8, s) \
                      end as visible from bounds, unnest($1::int8[]) as x) \
                 select coalesce(bool_and(visible), true), \
                        coalesce(bool_and(visible or x in ( \
                          select backend_xid::text::int8 from pg_stat_activity \
                           where wait_event = 'SyncRep' and backend_xid is not null)), true), \
                        (select pg_snapshot_xmin(s)::text::int8 from snap), \
                        pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') \
                   from each";

/// How long a commit may stay invisible before it is treated as held by a
/// synchronous standby wait even when that wait cannot be seen: commits
/// show within microseconds otherwise.
const ASSUME_HELD_AFTER: Duration = Duration::from_millis(50);

/// The same when the daemon's role can see other sessions' waits
/// (`pg_read_all_stats`, or a superuser): a commit held for a standby then
/// shows as one, and one that is merely slow to show (its backend starved
/// of CPU on a loaded host) must not be taken for held, or the batch's
/// second pass deletes its refreshed keys too. Only a held commit the
/// check cannot attribute to a session (`COMMIT PREPARED`) waits this
/// long.
const ASSUME_HELD_AFTER_SEEN: Duration = Duration::from_secs(1);

/// Immediate re-checks before the visibility wait sleeps between checks.
const SPIN_ATTEMPTS: u32 = 8;

async fn run_one(
    conn: &Conn,
    sql: &Arc<str>,
    params: &[Option<String>],
) -> Result<Option<String>, DbError> {
    let values: Vec<TextParam<'_>> = params.iter().map(|p| TextParam(p.as_deref())).collect();
    let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let result = match conn.statement(sql).await {
        Ok(statement) => conn.db.client().query(&statement, &refs).await,
        Err(error) => Err(error),
    };
    let rows = match result {
        Ok(rows) => rows,
        // The server refused this query for these values (a data error, a
        // dropped column...): retrying cannot help, and waiting would stall
        // every later invalidation. Deleting the keys is always safe.
        Err(error) if error.as_db_error().is_some() => {
            conn.forget(sql);
            let reason = error
                .as_db_error()
                .map(|e| e.message().to_string())
                .unwrap_or_default();
            metrics::counter!(m::ROWS_NOT_CACHED_TOTAL).increment(1);
            tracing::error!(query = %sql, error = %reason,
                "refresh query failed; deleting its keys instead");
            return Ok(None);
        }
        Err(error) => {
            return Err(DbError::query(format!("running refresh query {sql}"))(
                error,
            ))
        }
    };
    let answer = rows.first().and_then(|r| r.get::<_, Option<String>>(0));
    if answer.is_none() {
        // A NULL answer deletes the keys: right for a user with no rows
        // left, silent data loss for a role that row-level security hides
        // the rows from; the count tells them apart.
        metrics::counter!(m::REFRESH_NULL_ANSWERS_TOTAL).increment(1);
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::Horizon;

    #[test]
    fn a_horizon_covers_only_transactions_before_it() {
        let mut h = Horizon::default();
        assert!(!h.covers(&[1000]), "no check yet: nothing is known");
        assert!(h.covers(&[]));
        h.advance(1000);
        assert!(h.covers(&[999, 3]));
        assert!(!h.covers(&[999, 1000]), "its xmin itself may still run");
        assert!(!h.covers(&[1001]));
        h.advance(900);
        assert!(h.covers(&[999]), "a lower xmin never lowers the horizon");
    }

    #[test]
    fn a_horizon_compares_across_the_32_bit_wraparound() {
        let mut h = Horizon::default();
        // Epoch 1, xid 5: the stream's 4294967290 (epoch 0) came before it,
        // its 6 after.
        h.advance((1u64 << 32) + 5);
        assert!(h.covers(&[4_294_967_290, 4]));
        assert!(!h.covers(&[6]));
        assert!(
            !h.covers(&[5 + (1 << 31)]),
            "half the xid space ahead is not behind"
        );
    }
}
