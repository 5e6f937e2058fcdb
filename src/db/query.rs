//! Runs the aggregate-key queries of `refresh` rules on a small pool of
//! regular connections, concurrently up to a bound; answers come back in
//! the order asked, so the sink writes them in commit order. A lost
//! connection fails the batch (the sink retries it); a query the server
//! rejects answers "none", which deletes its keys.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::try_join_all;
use tokio_postgres::types::{ToSql, Type};

use crate::db::{ConnInfo, Db, DbError};

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
    clients: Vec<Arc<Db>>,
}

impl QueryRunner {
    /// A pool for `conn`; connects on first use.
    pub fn new(conn: ConnInfo) -> Self {
        QueryRunner {
            conn,
            clients: Vec::new(),
        }
    }

    /// Runs `jobs`, returning each one's single text answer (`None` for no
    /// row or NULL) in order, at most [`IN_FLIGHT`] at a time, once the
    /// transactions `xids` are visible. On any error the pool is dropped,
    /// to be reconnected by the retry.
    pub async fn run(
        &mut self,
        jobs: &[QueryJob<'_>],
        xids: &[u32],
    ) -> Result<Vec<Option<String>>, DbError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        while self.clients.len() < CONNECTIONS {
            self.clients.push(Arc::new(Db::connect(&self.conn).await?));
        }
        if let Err(error) = wait_visible(&self.clients[0], xids).await {
            self.clients.clear();
            return Err(error);
        }
        let mut answers = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(IN_FLIGHT) {
            let running = chunk.iter().enumerate().map(|(i, (sql, params))| {
                let db = Arc::clone(&self.clients[i % self.clients.len()]);
                let sql = Arc::clone(sql);
                let params = params.to_vec();
                async move { run_one(&db, &sql, &params).await }
            });
            match try_join_all(running).await {
                Ok(done) => answers.extend(done),
                Err(error) => {
                    self.clients.clear();
                    return Err(error);
                }
            }
        }
        Ok(answers)
    }
}

/// How long to wait for a decoded transaction to become visible before
/// querying anyway: the window is normally microseconds.
const VISIBILITY_WAIT: Duration = Duration::from_secs(5);

/// Waits until every transaction in `xids` is visible to new snapshots.
///
/// The walsender may send a transaction's commit as soon as its commit
/// record is flushed, a moment before the committing backend makes it
/// visible to other sessions. A query run in that moment would not see the
/// change it was triggered by and would cache the value from before it,
/// stamped with the newer version. The 32-bit xid from the stream is
/// widened to a full xid against the snapshot's xmax (a committed xid is
/// less than 2^31 behind it).
async fn wait_visible(db: &Db, xids: &[u32]) -> Result<(), DbError> {
    if xids.is_empty() {
        return Ok(());
    }
    let xids: Vec<i64> = xids.iter().map(|&x| i64::from(x)).collect();
    let deadline = tokio::time::Instant::now() + VISIBILITY_WAIT;
    loop {
        let visible: bool = db
            .client()
            .query_one(
                "with snap as (select pg_current_snapshot() as s),                       bounds as (select s, pg_snapshot_xmax(s)::text::int8 as xmax from snap)                  select coalesce(bool_and(case                    when x < xmax % 4294967296 then                      pg_visible_in_snapshot(((xmax / 4294967296) * 4294967296 + x)::text::xid8, s)                    when x - xmax % 4294967296 < 2147483648 then false                    when xmax / 4294967296 = 0 then false                    else pg_visible_in_snapshot(((xmax / 4294967296 - 1) * 4294967296 + x)::text::xid8, s)                  end), true) from bounds, unnest($1::int8[]) as x",
                &[&xids],
            )
            .await
            .map_err(DbError::query("checking that decoded transactions are visible"))?
            .get(0);
        if visible {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(xids = ?xids, "decoded transactions still not visible; querying anyway");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn run_one(db: &Db, sql: &str, params: &[Option<String>]) -> Result<Option<String>, DbError> {
    let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
        .iter()
        .map(|p| (p as &(dyn ToSql + Sync), Type::TEXT))
        .collect();
    let rows = match db.client().query_typed(sql, &typed).await {
        Ok(rows) => rows,
        // The server refused this query for these values (a data error, a
        // dropped column...): retrying cannot help, and waiting would stall
        // every later invalidation. Deleting the keys is always safe.
        Err(error) if error.as_db_error().is_some() => {
            let reason = error
                .as_db_error()
                .map(|e| e.message().to_string())
                .unwrap_or_default();
            metrics::counter!(crate::telemetry::metrics::ROWS_NOT_CACHED_TOTAL).increment(1);
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
    Ok(rows.first().and_then(|r| r.get::<_, Option<String>>(0)))
}
