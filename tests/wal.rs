//! Writes to tables the daemon does not watch never make the slot retain
//! WAL: keepalive positions are confirmed while no transaction is open.

use std::time::{Duration, Instant};

use crate::support::TestEnv;

/// 30 s of writes to an unwatched table (several MB of WAL): the slot's
/// confirmed LSN keeps within 1 MB of the server's WAL position throughout.
#[tokio::test(flavor = "multi_thread")]
async fn unwatched_writes_do_not_make_the_slot_retain_wal() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let client = env.pg.client().await;
    client
        .batch_execute("create table public.unwatched_log (id bigserial primary key, payload text)")
        .await
        .expect("create");
    let _daemon = env.daemon().await;

    let start_lsn: String = client
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let started = Instant::now();
    let mut max_lag: i64 = 0;
    let mut next_sample = Instant::now() + Duration::from_secs(3);
    while started.elapsed() < Duration::from_secs(30) {
        client
            .execute(
                "insert into public.unwatched_log (payload) select repeat('x', 500) from generate_series(1, 20)",
                &[],
            )
            .await
            .expect("insert");
        if Instant::now() >= next_sample {
            let lag: i64 = client
                .query_one(
                    "select (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 from pg_replication_slots where slot_name = 'pg_cache_invalidator'",
                    &[],
                )
                .await
                .expect("lag")
                .get(0);
            max_lag = max_lag.max(lag);
            next_sample += Duration::from_secs(1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written: i64 = client
        .query_one(
            "select (pg_current_wal_lsn() - $1::text::pg_lsn)::int8",
            &[&start_lsn],
        )
        .await
        .expect("written")
        .get(0);
    eprintln!("wrote {written} bytes of WAL; largest confirmed lag sampled: {max_lag} bytes");
    assert!(written > 2_000_000, "only {written} bytes of WAL written");
    assert!(max_lag < 1_000_000, "slot lagged {max_lag} bytes behind");
}
