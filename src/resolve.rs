//! Resolve: the stage between plan and sink that answers the aggregate-key
//! queries of `refresh` rules, so the sink only ever talks to Redis.
//!
//! ```text
//!  plan ─▶ [Item…, Query{sql, params}, …] ─▶ resolve ─▶ [Item…, Refresh{value}, …] ─▶ sink
//! ```
//!
//! Queries of one batch run concurrently (bounded, see [`crate::db::query`])
//! and their answers are put back in place, so they land in commit order.
//! A batch is resolved after every earlier batch was applied, so a query
//! sees at least the database as of its own transaction. A lost connection
//! is retried (confirmations are held meanwhile); a query the server
//! rejects answers "none", which deletes its keys.
//!
//! The walsender sends a commit once its record is flushed, a moment
//! before the committing session makes it visible (much longer when the
//! commit waits for a synchronous standby). Queries wait here until their
//! transactions are visible; invalidations do not wait — the pipeline
//! applies them at once and deletes their keys a second time once
//! [`Resolver::check_visible`] says the commits show, since a reader that
//! took a lease after the first DEL may still have read the old row.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use crate::db::query::Visibility;
use crate::db::query::{Hold, QueryJob, QueryRunner};
use crate::db::ConnInfo;
use crate::db::DbError;
use crate::error::{Fatal, GiveUp, Pace, Retry};
use crate::ops::{CacheOp, Item};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// Why resolving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Retrying cannot help.
    #[error("refresh queries: {0}")]
    Fatal(Fatal),
    /// Shutdown was requested while the queries kept failing.
    #[error("shutdown while refresh queries were failing ({0}); unapplied changes will be replayed on restart")]
    GaveUp(String),
}

/// How long invalidations may wait behind a held commit (see
/// [`Resolver::wait_visible`]) before readiness says so: a commit held by
/// the daemon itself shows within milliseconds of its confirmation, one
/// held by another standby as long as that standby is away.
const STALLED_AFTER: Duration = Duration::from_secs(2);

/// Answers refresh queries on a small pool of regular connections.
pub struct Resolver {
    queries: QueryRunner,
    cancel: CancellationToken,
    /// Where a long wait for held commits is reported.
    health: Option<Arc<Health>>,
}

impl Resolver {
    /// A resolver querying `conn`; connects when a query first comes.
    pub fn new(conn: ConnInfo, cancel: CancellationToken) -> Self {
        Resolver {
            queries: QueryRunner::new(conn),
            cancel,
            health: None,
        }
    }

    /// Reports to `health` while invalidations wait behind held commits
    /// ([`Resolver::wait_visible`]).
    pub fn reporting_to(mut self, health: Arc<Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Replaces every [`CacheOp::Query`] in `items` by the
    /// [`CacheOp::Refresh`] that writes its answer, once the batch's
    /// transactions are visible — or held back by a synchronous standby
    /// wait, which [`Visibility::HeldForStandby`] reports (the answers may
    /// then predate them). `None` when the batch has no queries (nothing
    /// was checked).
    pub async fn resolve(
        &mut self,
        items: &mut [Item],
    ) -> Result<Option<Visibility>, ResolveError> {
        if !items.iter().any(|i| matches!(i.op, CacheOp::Query { .. })) {
            return Ok(None);
        }
        let xids = xids_of(items);
        let mut retry = Retry::finishing(&Pace::POSTGRES, &self.cancel);
        let (answers, visibility) = loop {
            match self.run(items, &xids).await {
                Ok(done) => break done,
                Err(error) => wait_to_retry(&mut retry, error).await?,
            }
        };
        let mut answers = answers.into_iter();
        for item in items.iter_mut() {
            if let CacheOp::Query {
                table,
                op,
                keys,
                ttl_secs,
                ..
            } = &mut item.op
            {
                let value = answers.next().flatten().map(std::sync::Arc::from);
                item.op = CacheOp::Refresh {
                    table: std::sync::Arc::clone(table),
                    op: *op,
                    set: std::mem::take(keys),
                    del: Vec::new(),
                    value,
                    ttl_secs: *ttl_secs,
                };
            }
        }
        Ok(Some(visibility))
    }

    /// Forgets what it knew of the server and drops its connections: the
    /// position was replaced (see [`crate::pipeline`]), and a wait for the
    /// old position's transactions was given up, or will not come.
    pub fn forget_server(&mut self) {
        self.queries.forget_server();
    }

    /// Whether the transactions of `items` were visible before now, as an
    /// earlier check showed (a backlog's older commits): their keys need
    /// no second deletion.
    pub fn known_visible(&self, items: &[Item]) -> bool {
        self.queries.known_visible(&xids_of(items))
    }

    /// Waits until the transactions of `items` are visible, or held back by
    /// a synchronous standby wait (this daemon may be the standby: it must
    /// confirm them first).
    pub async fn check_visible(&mut self, items: &[Item]) -> Result<Visibility, ResolveError> {
        self.check_visible_xids(&xids_of(items)).await
    }

    /// [`Resolver::check_visible`] for the transactions `xids`.
    pub async fn check_visible_xids(&mut self, xids: &[u32]) -> Result<Visibility, ResolveError> {
        let mut retry = Retry::finishing(&Pace::POSTGRES, &self.cancel);
        loop {
            match self.queries.wait_visible(xids, Hold::Allowed).await {
                Ok(visibility) => return Ok(visibility),
                Err(error) => wait_to_retry(&mut retry, error).await?,
            }
        }
    }

    /// Waits until the transactions `xids` are visible, with no
    /// exception for synchronous standby waits: called after the batch was
    /// applied and confirmed, which released this daemon's part of them.
    /// Every later batch waits meanwhile: past [`STALLED_AFTER`] the
    /// daemon is not ready (invalidations of commits that did show, such as
    /// asynchronous ones, are not applied) until they show.
    pub async fn wait_visible(&mut self, xids: &[u32]) -> Result<(), ResolveError> {
        let wait = async {
            let mut retry = Retry::finishing(&Pace::POSTGRES, &self.cancel);
            loop {
                match self.queries.wait_visible(xids, Hold::Visible).await {
                    Ok(_) => return Ok(()),
                    Err(error) => wait_to_retry(&mut retry, error).await?,
                }
            }
        };
        // Cleared however the wait ends: shown, failed, or given up
        // because the position was replaced.
        let stalled = Stalled(self.health.as_deref());
        let report = async {
            tokio::time::sleep(STALLED_AFTER).await;
            stalled.report(xids.len());
            std::future::pending().await
        };
        tokio::select! {
            done = wait => done,
            done = report => done,
        }
    }

    async fn run(
        &mut self,
        items: &[Item],
        xids: &[u32],
    ) -> Result<(Vec<Option<String>>, Visibility), crate::db::DbError> {
        let jobs: Vec<QueryJob<'_>> = items
            .iter()
            .filter_map(|item| match &item.op {
                CacheOp::Query { sql, params, .. } => Some((sql, params.as_slice())),
                _ => None,
            })
            .collect();
        self.queries.run(&jobs, xids).await
    }
}

/// Readiness while invalidations wait behind held commits (see
/// [`Resolver::wait_visible`]); cleared when dropped.
struct Stalled<'a>(Option<&'a Health>);

impl Stalled<'_> {
    fn report(&self, transactions: usize) {
        tracing::warn!(transactions, waited = ?STALLED_AFTER,
            "invalidations wait behind commits a synchronous standby holds (not this daemon: it confirmed them); not ready until they show");
        if let Some(health) = self.0 {
            health.set_stalled_by_held(true);
        }
    }
}

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        if let Some(health) = self.0.filter(|h| h.stalled_by_held()) {
            health.set_stalled_by_held(false);
            tracing::info!("the held commits showed, or were given up; invalidations go on");
        }
    }
}

/// Waits before the next attempt after `error`, or says why not to retry.
async fn wait_to_retry(retry: &mut Retry, error: DbError) -> Result<(), ResolveError> {
    let delay = retry
        .after(&error, error.class())
        .map_err(|stop| match stop {
            GiveUp::Fatal(fatal) => ResolveError::Fatal(fatal),
            GiveUp::PositionLost(why) | GiveUp::Shutdown(why) => ResolveError::GaveUp(why),
        })?;
    metrics::counter!(m::RECONNECTS_TOTAL, "target" => "postgres").increment(1);
    tracing::warn!(error = %error, retry_in = ?delay,
        "refresh queries or the visibility check failed; retrying (confirmations are held meanwhile)");
    retry
        .sleep(delay)
        .await
        .map_err(|_| ResolveError::GaveUp(error.to_string()))
}

/// Whether `items` hold row changes of some transaction (flushes and
/// keepalive positions do not).
pub fn has_rows(items: &[Item]) -> bool {
    items
        .iter()
        .any(|i| i.xid != 0 && !matches!(i.op, CacheOp::Flush { .. }))
}

/// The transactions whose row changes `items` invalidate (flushes and
/// keepalive positions carry none).
fn xids_of(items: &[Item]) -> Vec<u32> {
    let mut xids: Vec<u32> = Vec::new();
    for item in items {
        if item.xid != 0
            && !matches!(item.op, CacheOp::Flush { .. })
            && xids.last() != Some(&item.xid)
        {
            xids.push(item.xid);
        }
    }
    xids.sort_unstable();
    xids.dedup();
    xids
}
