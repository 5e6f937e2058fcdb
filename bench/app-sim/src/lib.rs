//! What the app simulation and the chaos soak share: the simulated app's
//! pages, their queries and version counters, and its writes; reading the
//! fixture; waiting for the daemon.

pub mod workload;

use std::time::{Duration, Instant};

use pgci_client::{Cache, WriteToken};
use redis::aio::ConnectionLike;

/// The first column of every row `sql` returns (fixture ids).
pub async fn column(pg: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    pg.query(sql, &[])
        .await
        .expect("fixture ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until the daemon's applied position in Redis reaches `token`;
/// `false` if it has not within `limit`.
pub async fn caught_up<C: ConnectionLike + Send>(
    cache: &mut Cache<C>,
    token: WriteToken,
    limit: Duration,
) -> bool {
    let started = Instant::now();
    loop {
        if cache
            .applied()
            .await
            .ok()
            .flatten()
            .is_some_and(|a| a >= token.0)
        {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
