//! The benchmark behind `scripts/bench.sh`: drain throughput against
//! `pg_recvlogical`, live latency, memory, and a naive one-DEL-per-row
//! consumer as the baseline, all on a private PostgreSQL and Redis started
//! like the test harness does. Prints a Markdown report and a one-line
//! summary. Numbers are ratios against baselines measured in the same run,
//! because this machine is shared and noisy.
//!
//! ```text
//! cargo bench --bench pipeline -- [--changes N] [--runs R] [--memory-changes N]
//!                                 [--rates 1000,5000,20000] [--seconds S]
//! ```
//!
//! With `PGCI_BENCH_SLOW=1` the live scenarios also print each episode of
//! commits whose event took over 5 ms (when, how many, the worst).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pg_cache_invalidator::change::{Change, RowOp};
use pg_cache_invalidator::config::SecretUrl;
use pg_cache_invalidator::db::ConnInfo;
use pg_cache_invalidator::ops::CacheOp;
use pg_cache_invalidator::plan::rules::RuleSet;
use pg_cache_invalidator::plan::Planner;
use pg_cache_invalidator::source::replication::ReplicationSource;
use pg_cache_invalidator::source::Event;
use pg_cache_invalidator::telemetry::health::Health;
use pgci_test_support::{pg_bin, Daemon, RedisCluster, TestEnv};

struct Args {
    changes: u64,
    runs: usize,
    memory_changes: u64,
    rates: Vec<u64>,
    seconds: u64,
    naive_seconds: u64,
    /// Scenarios to run (all when empty): drain1000, drain1, live,
    /// outbox-live, outbox-poll, capture, memory, cluster-drain,
    /// cluster-live, cluster-live-sharded, groups, large-rows, failover,
    /// catchup, sync-commit, live-recvlogical, hit-path.
    only: Vec<String>,
    /// large-rows: rows in the transaction, and megabytes per row.
    large_rows: u32,
    large_mb: u32,
    /// catchup: seconds the daemon is down, and rows/s committed meanwhile
    /// (and on, during the catch-up).
    catchup_seconds: u64,
    catchup_rate: u64,
}

impl Args {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

fn args() -> Args {
    let mut args = Args {
        changes: 500_000,
        runs: 3,
        memory_changes: 1_000_000,
        rates: vec![1_000, 5_000, 20_000],
        seconds: 5,
        naive_seconds: 20,
        only: Vec::new(),
        large_rows: 10,
        large_mb: 50,
        catchup_seconds: 60,
        catchup_rate: 2_000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        let number = || {
            value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{} needs a number", argv[i]))
        };
        match argv[i].as_str() {
            "--changes" => args.changes = number(),
            "--runs" => args.runs = number() as usize,
            "--memory-changes" => args.memory_changes = number(),
            "--seconds" => args.seconds = number(),
            "--naive-seconds" => args.naive_seconds = number(),
            "--only" => args.only = value.split(',').map(str::to_string).collect(),
            "--large-rows" => args.large_rows = number() as u32,
            "--large-mb" => args.large_mb = number() as u32,
            "--catchup-seconds" => args.catchup_seconds = number(),
            "--catchup-rate" => args.catchup_rate = number(),
            "--rates" => {
                args.rates = value.split(',').map(|r| r.parse().expect("rate")).collect();
            }
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    args
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// A numbered view of user_tokens, so writers can address row k cheaply.
async fn number_rows(client: &tokio_postgres::Client) -> i64 {
    number(client, "public.user_tokens", "bench_ids").await
}

/// Numbers `table`'s rows 1..n by id into `into` (id, rn), so writers can
/// pick rows by number; returns n.
async fn number(client: &tokio_postgres::Client, table: &str, into: &str) -> i64 {
    client
        .batch_execute(&format!(
            "create table if not exists {into} as \
               select id, row_number() over (order by id) as rn from {table}; \
             create index if not exists {into}_rn on {into} (rn);"
        ))
        .await
        .expect("number rows");
    client
        .query_one(&format!("select count(*) from {into}"), &[])
        .await
        .expect("count")
        .get(0)
}

/// Writes `changes` row updates in transactions of `per_txn` rows.
async fn write_backlog(client: &tokio_postgres::Client, changes: u64, per_txn: u64, rows: i64) {
    let txns = changes / per_txn;
    let sql = format!(
        "do $$ declare i bigint; lo bigint; begin \
           for i in 0..{last} loop \
             lo := (i * {per_txn}) % {rows}; \
             update public.user_tokens set balance = balance + 1 \
              where id in (select id from bench_ids where rn > lo and rn <= lo + {per_txn}); \
             commit; \
           end loop; end $$",
        last = txns - 1,
    );
    client.batch_execute(&sql).await.expect("write backlog");
}

/// Creates a slot and records its start in Redis, as `setup` does, so the
/// daemon does not flush every key on its first start from it.
async fn create_slot(env: &TestEnv, client: &tokio_postgres::Client, name: &str) -> String {
    let start: String = client
        .query_one(
            "select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&name],
        )
        .await
        .expect("create slot")
        .get(0);
    let mut redis = env.redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg(format!("pgci:position:{name}"))
        .arg(&start)
        .query_async(&mut redis)
        .await
        .expect("record the slot's start");
    start
}

/// Inserts a sentinel row (the harness's sentinel rule watches pillars); returns its key and the WAL
/// position just past its commit.
async fn touch_sentinel(env: &TestEnv) -> (String, String) {
    let client = env.pg.client().await;
    let id: String = client
        .query_one(
            "insert into public.pillars (slug) values ('sentinel-' || gen_random_uuid()) returning id::text",
            &[],
        )
        .await
        .expect("sentinel")
        .get(0);
    let end: String = client
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    (format!("sentinel:pillar:{id}"), end)
}

fn recvlogical(env: &TestEnv, slot: &str, endpos: &str) -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new(pg_bin().join("pg_recvlogical"))
        .arg("-d")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            env.pg.port
        ))
        .args(["--slot", slot, "--start", "-f", "/dev/null", "--no-loop"])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=pg_cache_invalidator",
        ])
        .args(["-E", endpos])
        .status()
        .expect("pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed");
    started.elapsed()
}

async fn wait_gone<C: redis::aio::ConnectionLike>(
    redis: &mut C,
    key: &str,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(redis)
            .await
            .expect("exists");
        if !exists {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

/// Runs the daemon on `slot` until the sentinel key is gone; also returns
/// when the slot's confirmed position reached `endpos` (what a synchronous
/// waiter and `pg_replication_slots` see), if it did within 30 s.
async fn daemon_drain<C: redis::aio::ConnectionLike>(
    env: &mut TestEnv,
    mut redis: C,
    slot: &str,
    sentinel: &str,
    endpos: &str,
) -> (Duration, Option<Duration>, Daemon) {
    env.write_config(&format!(
        "[replication]\nslot = \"{slot}\"\nheartbeat_interval = \"0s\"\n"
    ));
    let _: () = redis::cmd("SET")
        .arg(sentinel)
        .arg("cached")
        .query_async(&mut redis)
        .await
        .expect("preset the sentinel");
    let client = env.pg.client().await;
    let started = Instant::now();
    let daemon = env.spawn_daemon();
    let slot_name = slot.to_string();
    let streaming = tokio::spawn(async move {
        loop {
            let active: bool = client
                .query_one(
                    "select active from pg_replication_slots where slot_name = $1",
                    &[&slot_name],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(false);
            if active {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    assert!(
        wait_gone(&mut redis, sentinel, Duration::from_secs(600)).await,
        "daemon did not drain: {}",
        daemon.log()
    );
    let took = started.elapsed();
    if let Ok(Ok(startup)) = tokio::time::timeout(Duration::from_millis(10), streaming).await {
        eprintln!("    daemon streaming {startup:?} after start");
    }
    let client = env.pg.client().await;
    let mut confirmed = None;
    while started.elapsed() < took + Duration::from_secs(30) {
        let done: bool = client
            .query_one(
                "select coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) from pg_replication_slots where slot_name = $1",
                &[&slot, &endpos],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(false);
        if done {
            confirmed = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (took, confirmed, daemon)
}

/// The baseline: read the same stream, and await one DEL per key.
async fn naive_drain(env: &TestEnv, slot: &str, changes: u64, limit: Duration) -> (u64, Duration) {
    let toml = std::fs::read_to_string(&env.config).expect("config");
    let config: pg_cache_invalidator::config::Config = {
        let path = env.path("naive.toml");
        std::fs::write(&path, &toml).expect("write");
        pg_cache_invalidator::config::Config::load(&path).expect("config")
    };
    let rules = RuleSet::compile(&config.rules).expect("rules");
    let conn = ConnInfo::parse(&SecretUrl::new(env.pg.url()), None).expect("conn");
    let mut source = ReplicationSource::new(
        conn,
        slot.to_string(),
        "pg_cache_invalidator".into(),
        Arc::new(Health::default()),
    );
    let mut planner = Planner::new(Arc::new(rules));
    let mut redis = env.redis.conn().await;
    let started = Instant::now();
    let mut rows = 0u64;
    while started.elapsed() < limit && rows < changes {
        let Event::Change(change) = source.next().await.expect("stream") else {
            continue;
        };
        let mut planned = Vec::new();
        if matches!(
            change,
            Change::Schema(_)
                | Change::Row {
                    op: RowOp::Update,
                    ..
                }
        ) {
            planner.plan(&change, &mut planned).expect("plan");
        }
        if let Some(CacheOp::Invalidate { keys, .. }) = planned.pop() {
            rows += 1;
            for key in keys {
                let _: () = redis::cmd("DEL")
                    .arg(key)
                    .query_async(&mut redis)
                    .await
                    .expect("del");
            }
        }
    }
    let elapsed = started.elapsed();
    source.shutdown().await;
    (rows, elapsed)
}

/// One catch-up after an outage.
struct Catchup {
    /// Rows committed while the daemon was down.
    rows: u64,
    /// pg_recvlogical reading the outage's WAL from its own slot.
    recv: Duration,
    /// The daemon, started then, until its slot confirmed the same end.
    daemon: Duration,
}

/// Catch-up after an outage (issue #29): writers commit
/// `args.catchup_rate` one-row transactions a second for
/// `args.catchup_seconds` while the daemon is down, and go on writing;
/// pg_recvlogical then reads the outage's WAL (to the WAL position when
/// the outage ended) from a slot made with the daemon's, and the daemon,
/// started next, runs until its slot has confirmed the same position.
/// Who a commit waits for in the `sync-commit` scenario.
#[derive(Clone, Copy)]
enum Waiter {
    /// Nobody (`synchronous_commit = local`).
    Local,
    /// A physical streaming standby on loopback, `remote_apply`: the
    /// anchor for what a synchronous wait costs on this machine.
    PhysicalStandby,
    /// The daemon, `remote_apply`: the commit returns once the daemon has
    /// invalidated its keys in Redis (README "Synchronous invalidation").
    Daemon,
}

impl Waiter {
    const ALL: [Waiter; 3] = [Waiter::Local, Waiter::PhysicalStandby, Waiter::Daemon];

    fn name(self) -> &'static str {
        match self {
            Waiter::Local => "local (nobody waited for)",
            Waiter::PhysicalStandby => "a physical standby, remote_apply",
            Waiter::Daemon => "the daemon, remote_apply",
        }
    }
}

/// Commit latency of one-row updates (one writer, back to back) waiting
/// for nobody, for a physical synchronous standby and for the daemon, the
/// three alternated `args.runs` times with `args.seconds` of commits each.
/// Returns each waiter's commit times in milliseconds.
async fn sync_commit(args: &Args) -> Vec<(Waiter, Vec<f64>)> {
    let mut env = TestEnv::start(100).await;
    let _standby = env.pg.standby().await;
    // Heartbeats tell the daemon soon when synchronous_standby_names
    // comes to name it, and it reopens its stream at the synchronous pace
    // (see `SYNC_STATUS_INTERVAL`).
    env.write_config("[replication]\nheartbeat_interval = \"200ms\"\n");
    env.setup();
    let daemon = env.daemon().await;
    let paced = |every: &str| {
        daemon
            .log()
            .lines()
            .filter(|l| l.contains("replication stream started") && l.contains(every))
            .count()
    };
    let admin = env.pg.client().await;
    let writer = env.pg.client().await;
    let ids: Vec<String> = writer
        .query("select id::text from public.user_tokens", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let update = writer
        .prepare("update public.user_tokens set balance = balance + 1 where id = $1::text::uuid")
        .await
        .expect("prepare");
    let mut times: Vec<(Waiter, Vec<f64>)> = Waiter::ALL.iter().map(|w| (*w, Vec::new())).collect();
    let mut previous: Option<Waiter> = None;
    for _ in 0..args.runs {
        for (waiter, ms) in &mut times {
            let (names, mode) = match waiter {
                Waiter::Local => ("", "local"),
                Waiter::PhysicalStandby => ("standby", "remote_apply"),
                Waiter::Daemon => ("\"pg-cache-invalidator\"", "remote_apply"),
            };
            let application = (!names.is_empty()).then(|| names.trim_matches('"'));
            let every = match waiter {
                Waiter::Daemon => "reports_every=100µs",
                _ => "reports_every=1ms",
            };
            let sessions = paced(every);
            let reopens = waiter_changes_pace(previous, *waiter);
            pgci_test_support::set_synchronous_standbys(&admin, names, application).await;
            // (A daemon from before the pace changed logs none.)
            if reopens && paced("reports_every=") > 0 {
                pgci_test_support::wait_for(
                    "the daemon's stream to reopen at its new pace",
                    Duration::from_secs(30),
                    || {
                        let now = paced(every);
                        async move { now > sessions }
                    },
                )
                .await;
            }
            previous = Some(*waiter);
            writer
                .batch_execute(&format!("set synchronous_commit = {mode}"))
                .await
                .expect("synchronous_commit");
            let scrape = || async {
                pgci_test_support::http_get(env.http_port, "/metrics")
                    .await
                    .map(|(_, body)| body)
                    .unwrap_or_default()
            };
            let before = scrape().await;
            let until = Instant::now() + Duration::from_secs(args.seconds);
            let mut i = 0;
            while Instant::now() < until {
                let id = &ids[i % ids.len()];
                i += 1;
                let started = Instant::now();
                writer.execute(&update, &[id]).await.expect("update");
                ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            if matches!(waiter, Waiter::Daemon) {
                let after = scrape().await;
                let q = |p| {
                    histogram_quantile(&before, &after, "pgci_confirm_report_wait_seconds", p)
                        * 1000.0
                };
                eprintln!(
                    "    the daemon's confirmations waited for their report p50 ~{:.3} p99 ~{:.3} ms",
                    q(0.5),
                    q(0.99)
                );
            }
        }
    }
    for (_, ms) in &mut times {
        ms.sort_by(|a, b| a.total_cmp(b));
    }
    times
}

/// Waits until `slot` has confirmed the WAL written so far.
async fn caught_up(client: &tokio_postgres::Client, slot: &str) {
    let end: String = client
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    pgci_test_support::wait_for(
        "the daemon to catch up with the setup's writes",
        Duration::from_secs(120),
        || async {
            client
                .query_one(
                    "select coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) from pg_replication_slots where slot_name = $1",
                    &[&slot, &end],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        },
    )
    .await;
}

/// Whether the daemon reopens its stream when commits go from waiting
/// for `from` to waiting for `to`: it reports at the synchronous pace
/// only while `synchronous_standby_names` names it.
fn waiter_changes_pace(from: Option<Waiter>, to: Waiter) -> bool {
    let daemon = |w: Waiter| matches!(w, Waiter::Daemon);
    from.is_some_and(|from| daemon(from) != daemon(to))
}

async fn catchup(args: &Args) -> Vec<Catchup> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut env = TestEnv::start(50_000).await;
    env.setup();
    let client = env.pg.client().await;
    let rows = number_rows(&client).await;
    let mut results = Vec::new();
    for r in 0..args.runs {
        let (recv_slot, daemon_slot) = (format!("catchup_recv_{r}"), format!("catchup_daemon_{r}"));
        create_slot(&env, &client, &recv_slot).await;
        create_slot(&env, &client, &daemon_slot).await;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        const WRITERS: u64 = 4;
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let writer = env.pg.client().await;
            let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
            let per_tick = (args.catchup_rate / WRITERS / 100).max(1);
            writers.push(tokio::spawn(async move {
                let update = writer
                    .prepare("update public.user_tokens set balance = balance + 1 where id = (select id from bench_ids where rn = $1)")
                    .await
                    .expect("prepare");
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut n = w as i64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for _ in 0..per_tick {
                        n = (n + WRITERS as i64) % rows + 1;
                        writer.execute(&update, &[&n]).await.expect("update");
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(args.catchup_seconds)).await;
        let outage_rows = written.load(Ordering::Relaxed);
        let end: String = client
            .query_one("select pg_current_wal_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0);
        let recv = recvlogical(&env, &recv_slot, &end);
        env.write_config(&format!(
            "[replication]\nslot = \"{daemon_slot}\"\nheartbeat_interval = \"0s\"\n"
        ));
        let started = Instant::now();
        let daemon = env.spawn_daemon();
        loop {
            let done: bool = client
                .query_one(
                    "select coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) from pg_replication_slots where slot_name = $1",
                    &[&daemon_slot, &end],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(false);
            if done {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1200),
                "the daemon did not catch up: {}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.await.expect("writer");
        }
        drop(daemon);
        for slot in [&recv_slot, &daemon_slot] {
            let _ = client
                .execute("select pg_drop_replication_slot($1)", &[slot])
                .await;
        }
        eprintln!(
            "  run {r}: {outage_rows} rows in {} s down; pg_recvlogical {recv:?}, daemon {took:?}",
            args.catchup_seconds
        );
        results.push(Catchup {
            rows: outage_rows,
            recv,
            daemon: took,
        });
    }
    results
}

struct DrainResult {
    recv: Vec<f64>,
    daemon: Vec<f64>,
    /// Rows/s counted until the slot's confirmed position covered the
    /// backlog.
    confirmed: Vec<f64>,
    naive: f64,
}

async fn drain(args: &Args, per_txn: u64) -> DrainResult {
    let mut env = TestEnv::start(50_000).await;
    env.setup();
    let client = env.pg.client().await;
    let rows = number_rows(&client).await;
    for r in 0..args.runs {
        create_slot(&env, &client, &format!("recv_{r}")).await;
        if r > 0 {
            create_slot(&env, &client, &format!("daemon_{r}")).await;
        }
    }
    create_slot(&env, &client, "naive").await;
    let wrote = Instant::now();
    write_backlog(&client, args.changes, per_txn, rows).await;
    let (sentinel, endpos) = touch_sentinel(&env).await;
    eprintln!(
        "  wrote {} changes in {per_txn}-row transactions in {:?}",
        args.changes,
        wrote.elapsed()
    );

    let mut result = DrainResult {
        recv: Vec::new(),
        daemon: Vec::new(),
        confirmed: Vec::new(),
        naive: 0.0,
    };
    for r in 0..args.runs {
        let recv = recvlogical(&env, &format!("recv_{r}"), &endpos);
        let slot = if r == 0 {
            "pg_cache_invalidator".to_string()
        } else {
            format!("daemon_{r}")
        };
        let redis = env.redis.conn().await;
        let (took, confirmed, mut daemon) =
            daemon_drain(&mut env, redis, &slot, &sentinel, &endpos).await;
        let _ = daemon.terminate().await;
        let confirmed_rate = confirmed.map_or(f64::NAN, |c| args.changes as f64 / c.as_secs_f64());
        result.confirmed.push(confirmed_rate);
        eprintln!("    confirmed to the server after {confirmed:?}");
        let (recv_rate, daemon_rate) = (
            args.changes as f64 / recv.as_secs_f64(),
            args.changes as f64 / took.as_secs_f64(),
        );
        eprintln!(
            "  run {r}: pg_recvlogical {recv:?} ({recv_rate:.0} rows/s), daemon {took:?} ({daemon_rate:.0} rows/s)"
        );
        result.recv.push(recv_rate);
        result.daemon.push(daemon_rate);
    }
    let (naive_rows, naive_time) = naive_drain(
        &env,
        "naive",
        args.changes,
        Duration::from_secs(args.naive_seconds),
    )
    .await;
    result.naive = naive_rows as f64 / naive_time.as_secs_f64();
    eprintln!(
        "  naive: {naive_rows} rows in {naive_time:?} ({:.0} rows/s)",
        result.naive
    );
    result
}

/// The same backlog of 1-row transactions drained into one Redis and into
/// a 3-master, 3-replica Redis Cluster, runs alternating; rows/s of each.
async fn cluster_drain(args: &Args) -> (Vec<f64>, Vec<f64>) {
    let (mut env, cluster) = tokio::join!(TestEnv::start(50_000), RedisCluster::start());
    env.setup();
    let client = env.pg.client().await;
    let rows = number_rows(&client).await;
    let mut on_cluster = cluster.conn().await;
    for r in 0..args.runs {
        create_slot(&env, &client, &format!("single_{r}")).await;
        let name = format!("cluster_{r}");
        let start = create_slot(&env, &client, &name).await;
        let _: () = redis::cmd("SET")
            .arg(format!("pgci:position:{name}"))
            .arg(start)
            .query_async(&mut on_cluster)
            .await
            .expect("record the slot's start on the cluster");
    }
    write_backlog(&client, args.changes, 1, rows).await;
    let (sentinel, endpos) = touch_sentinel(&env).await;
    let (mut single, mut clustered) = (Vec::new(), Vec::new());
    for r in 0..args.runs {
        let redis = env.redis.conn().await;
        let (took, _, mut daemon) =
            daemon_drain(&mut env, redis, &format!("single_{r}"), &sentinel, &endpos).await;
        let _ = daemon.terminate().await;
        single.push(args.changes as f64 / took.as_secs_f64());
        env.redis_url_override = Some(cluster.url());
        env.redis_extra = "cluster = true".to_string();
        let redis = cluster.conn().await;
        let (took_cluster, _, mut daemon) =
            daemon_drain(&mut env, redis, &format!("cluster_{r}"), &sentinel, &endpos).await;
        let _ = daemon.terminate().await;
        env.redis_url_override = None;
        env.redis_extra = String::new();
        clustered.push(args.changes as f64 / took_cluster.as_secs_f64());
        eprintln!(
            "  run {r}: one redis {took:?} ({:.0} rows/s), cluster {took_cluster:?} ({:.0} rows/s)",
            single[r], clustered[r]
        );
    }
    (single, clustered)
}

/// The same backlog of 1-row transactions alternating between two tables
/// (`user_tokens`, `profiles`), drained by one daemon on one slot, and by
/// two daemons, one per table group (`[[groups]]`), each on its own slot
/// and publication; runs alternating. Timed from the start until both
/// tables' last keys are gone. Rows/s of each.
async fn groups_drain(args: &Args) -> (Vec<f64>, Vec<f64>) {
    let mut env = TestEnv::start(50_000).await;
    env.setup();
    let client = env.pg.client().await;
    let rows = number_rows(&client).await;
    let profiles = number(&client, "public.profiles", "bench_profile_ids").await;
    let balances_port = pgci_test_support::free_port();
    let groups = |r: usize| {
        format!(
            "[replication]\nheartbeat_interval = \"0s\"\n\n\
             [[groups]]\nname = \"balances\"\ntables = [\"public.user_tokens\"]\nslot = \"bal_{r}\"\npublication = \"pub_balances\"\nlisten = \"127.0.0.1:{balances_port}\"\n\n\
             [[groups]]\nname = \"rest\"\ntables = [\"public.profiles\", \"public.user_journeys\", \"public.pillars\"]\nslot = \"rest_{r}\"\npublication = \"pub_rest\"\n"
        )
    };
    // The groups' publications and first slots, as an operator would.
    env.write_config(&groups(0));
    let out = env.cli(&["setup"]);
    assert!(
        out.status.success(),
        "setup of the groups: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for r in 0..args.runs {
        create_slot(&env, &client, &format!("single_{r}")).await;
        if r > 0 {
            create_slot(&env, &client, &format!("bal_{r}")).await;
            create_slot(&env, &client, &format!("rest_{r}")).await;
        }
    }
    client
        .batch_execute(&format!(
            "do $$ declare i bigint; begin \
               for i in 0..{last} loop \
                 if i % 2 = 0 then \
                   update public.user_tokens set balance = balance + 1 \
                    where id = (select id from bench_ids where rn = (i / 2) % {rows} + 1); \
                 else \
                   update public.profiles set bio = 'bio ' || i \
                    where id = (select id from bench_profile_ids where rn = (i / 2) % {profiles} + 1); \
                 end if; \
                 commit; \
               end loop; end $$",
            last = args.changes - 1,
        ))
        .await
        .expect("write backlog");
    // Each group's last change: a balance and the sentinel row (rest).
    let (user, token): (String, String) = {
        let row = client
            .query_one(
                "update public.user_tokens set balance = balance + 1 \
                  where id = (select id from bench_ids where rn = 1) \
                  returning user_id::text, token_id::text",
                &[],
            )
            .await
            .expect("last balance");
        (row.get(0), row.get(1))
    };
    let (sentinel, _) = touch_sentinel(&env).await;
    let last_keys = [format!("balance:user:{user}:token:{token}"), sentinel];
    let mut redis = env.redis.conn().await;
    let drained = |took: Duration| args.changes as f64 / took.as_secs_f64();
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for r in 0..args.runs {
        preset_all(&mut redis, &last_keys).await;
        env.write_config(&format!(
            "[replication]\nslot = \"single_{r}\"\nheartbeat_interval = \"0s\"\n"
        ));
        let started = Instant::now();
        let mut daemon = env.spawn_daemon();
        for key in &last_keys {
            assert!(
                wait_gone(&mut redis, key, Duration::from_secs(600)).await,
                "one group: {}",
                daemon.log()
            );
        }
        let single = started.elapsed();
        let _ = daemon.terminate().await;
        one.push(drained(single));

        preset_all(&mut redis, &last_keys).await;
        env.write_config(&groups(r));
        let started = Instant::now();
        let mut balances = env.spawn_daemon_env(&[("PGCI_GROUP", "balances")]);
        let mut rest = env.spawn_daemon_env(&[("PGCI_GROUP", "rest")]);
        for key in &last_keys {
            assert!(
                wait_gone(&mut redis, key, Duration::from_secs(600)).await,
                "two groups: {}{}",
                balances.log(),
                rest.log()
            );
        }
        let grouped = started.elapsed();
        let _ = balances.terminate().await;
        let _ = rest.terminate().await;
        two.push(drained(grouped));
        eprintln!(
            "  run {r}: one slot {single:?} ({:.0} rows/s), two groups {grouped:?} ({:.0} rows/s)",
            one[r], two[r]
        );
    }
    (one, two)
}

async fn preset_all(redis: &mut redis::aio::MultiplexedConnection, keys: &[String]) {
    for key in keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("cached")
            .query_async(redis)
            .await
            .expect("preset");
    }
}

struct LatencyResult {
    target: u64,
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    missing: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Where live changes are captured.
#[derive(Clone, Copy, PartialEq)]
enum Capture {
    Replication,
    /// The outbox, woken by NOTIFY (polling every second otherwise).
    Outbox,
    /// The outbox with wake-ups off, polling every 100 ms.
    OutboxPolling,
    /// The slot on a streaming standby (`replication.url`).
    Standby,
    /// No daemon: `pg_recvlogical` (test_decoding, to a pipe) on a slot of
    /// its own, timed from the commit to the row's line: what any logical
    /// decoding client waits for on this machine, the live anchor.
    RecvLogical,
}

/// `cluster`: the cache is a Redis Cluster; `sharded`: its events go out
/// with `SPUBLISH` and are heard with `SSUBSCRIBE` on the channel's shard
/// (plain `PUBLISH` is heard on a seed node otherwise, across the cluster
/// bus).
async fn live_latency(
    args: &Args,
    capture: Capture,
    rates: &[u64],
    cluster: bool,
    sharded: bool,
) -> Vec<LatencyResult> {
    let mut env = TestEnv::start(50_000).await;
    let cluster = if cluster {
        let cluster = RedisCluster::start().await;
        env.redis_url_override = Some(cluster.url());
        env.redis_extra = match sharded {
            true => "cluster = true\nsharded_events = true".to_string(),
            false => "cluster = true".to_string(),
        };
        env.write_config("");
        Some(cluster)
    } else {
        None
    };
    let outbox = match capture {
        Capture::Replication | Capture::Standby | Capture::RecvLogical => "",
        Capture::Outbox => "[outbox]\n",
        Capture::OutboxPolling => "[outbox]\nwake_ups = false\npoll_interval = \"100ms\"\n",
    };
    if matches!(capture, Capture::Outbox | Capture::OutboxPolling) {
        env.postgres_extra = "source = \"outbox\"\n".to_string();
        env.write_config(outbox);
    }
    let standby = match capture {
        Capture::Standby => Some(env.pg.standby().await),
        _ => None,
    };
    let slot_on = standby.as_ref().map_or(String::new(), |standby| {
        format!(
            "url = \"postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable\"\n",
            standby.port
        )
    });
    if standby.is_some() {
        env.write_config(&format!("[replication]\n{slot_on}"));
    }
    env.setup();
    let client = env.pg.client().await;
    let rows = number_rows(&client).await;
    let ids: Vec<(String, String)> = client
        .query(
            "select user_id::text, token_id::text from public.user_tokens u join bench_ids b using (id) order by b.rn",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    env.write_config(&format!(
        "[replication]\nheartbeat_interval = \"0s\"\n{slot_on}{outbox}"
    ));
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut anchor = None;
    let daemon = match &standby {
        _ if matches!(capture, Capture::RecvLogical) => {
            anchor = Some(recvlogical_live(&env, &client, Arc::clone(&arrivals)).await);
            None
        }
        Some(standby) => {
            let mut daemon = env.spawn_daemon();
            let client = standby.client().await;
            while !pgci_test_support::slot_active(&client).await {
                assert!(daemon.try_status().is_none(), "{}", daemon.log());
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Some(daemon)
        }
        None => Some(env.daemon().await),
    };
    if matches!(capture, Capture::Outbox | Capture::OutboxPolling) {
        // Let the drainer go idle and ask for wake-ups.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let (sharded_tx, sharded_rx) = std::sync::mpsc::channel();
    if let (Some(cluster), true) = (&cluster, sharded) {
        // Only the channel's shard hears SPUBLISH; its other nodes refuse
        // SSUBSCRIBE (MOVED), so every node is tried.
        for url in cluster.urls() {
            let arrivals = Arc::clone(&arrivals);
            let sharded_tx = sharded_tx.clone();
            std::thread::spawn(move || {
                let subscribed = redis::Client::open(url.as_str())
                    .and_then(|client| client.get_connection())
                    .and_then(|mut conn| {
                        redis::cmd("SSUBSCRIBE")
                            .arg("cache-invalidation")
                            .query::<redis::Value>(&mut conn)?
                            .extract_error()?;
                        Ok(conn)
                    });
                let Ok(mut conn) = subscribed else {
                    return;
                };
                let _ = sharded_tx.send(());
                while let Ok(redis::Value::Array(message)) = conn.recv_response() {
                    let now = Instant::now();
                    // ["smessage", channel, payload]
                    let Some(redis::Value::BulkString(payload)) = message.get(2) else {
                        continue;
                    };
                    stamp_event(&arrivals, payload, now);
                }
            });
        }
    }
    // PUBLISH reaches every node of a cluster. The subscriber has a thread
    // of its own (as the anchor's reader has), so the writers' tasks never
    // delay the moment an event is stamped.
    let events_url = cluster.as_ref().map_or(env.redis.url(), |c| c.url());
    let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
    {
        let arrivals = Arc::clone(&arrivals);
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(events_url.as_str())
                .and_then(|client| client.get_connection())
                .expect("subscriber connects");
            let mut pubsub = conn.as_pubsub();
            pubsub.subscribe("cache-invalidation").expect("subscribe");
            let _ = subscribed_tx.send(());
            while let Ok(msg) = pubsub.get_message() {
                let now = Instant::now();
                let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                stamp_event(&arrivals, &payload, now);
            }
        });
    }
    subscribed_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the subscriber subscribed");
    if sharded {
        // The writers start once the channel's shard listens: an event
        // published before would be heard by nobody.
        sharded_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the sharded subscriber subscribed");
    }
    drop(sharded_tx);
    if matches!(capture, Capture::Replication) {
        // The setup's own writes (the rows, `bench_ids`) came after the
        // slot: the daemon drains them when it starts, and a first rate
        // measured meanwhile waits behind that drain (up to ~450 ms on a
        // cluster, ~100 ms on one server). Live latency is measured from
        // a daemon that has caught up; draining is measured apart.
        caught_up(&client, "pg_cache_invalidator").await;
    }

    const WRITERS: u64 = 4;
    let mut results = Vec::new();
    let mut next_row = 0i64;
    for &rate in rates {
        arrivals.lock().expect("lock").clear();
        let total = (rate * args.seconds).min(rows as u64);
        let first = next_row;
        next_row = (next_row + total as i64) % rows;
        let metrics_before = daemon_metrics(&env, &daemon).await;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let writer = env.pg.client().await;
            let stmt = writer
                .prepare("update public.user_tokens set balance = balance + 1 where id = (select id from bench_ids where rn = $1)")
                .await
                .expect("prepare");
            let ids = ids.clone();
            tasks.push(tokio::spawn(async move {
                let mut commits = Vec::new();
                let per_writer = total / WRITERS;
                let interval = Duration::from_secs_f64(WRITERS as f64 / rate as f64);
                let begin = Instant::now();
                for i in 0..per_writer {
                    let due = begin + interval.mul_f64(i as f64);
                    tokio::time::sleep_until(due.into()).await;
                    let row = (first + (i * WRITERS + w) as i64) % rows;
                    writer.execute(&stmt, &[&(row + 1)]).await.expect("update");
                    let (user, token) = &ids[row as usize];
                    commits.push((format!("balance:user:{user}:token:{token}"), Instant::now()));
                }
                commits
            }));
        }
        let mut commits = Vec::new();
        for task in tasks {
            commits.extend(task.await.expect("writer"));
        }
        let achieved = commits.len() as f64 / started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let arrived = arrivals.lock().expect("lock").clone();
        let mut latencies: Vec<f64> = Vec::new();
        let mut missing = 0;
        for (key, committed) in &commits {
            match arrived.get(key) {
                Some(at) => {
                    latencies.push(at.saturating_duration_since(*committed).as_secs_f64() * 1000.0)
                }
                None => missing += 1,
            }
        }
        if std::env::var_os("PGCI_BENCH_SLOW").is_some() {
            let mut slow: Vec<(f64, f64)> = commits
                .iter()
                .filter_map(|(key, committed)| {
                    let at = arrived.get(key)?;
                    Some((
                        committed.saturating_duration_since(started).as_secs_f64(),
                        at.saturating_duration_since(*committed).as_secs_f64() * 1000.0,
                    ))
                })
                .filter(|(_, ms)| *ms > 5.0)
                .collect();
            slow.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut groups: Vec<(f64, f64, usize, f64)> = Vec::new();
            for (t, ms) in slow {
                match groups.last_mut() {
                    Some(g) if t - g.1 <= 0.005 => {
                        g.1 = t;
                        g.2 += 1;
                        g.3 = g.3.max(ms);
                    }
                    _ => groups.push((t, t, 1, ms)),
                }
            }
            for (from, to, n, max) in groups {
                eprintln!("    slow {from:.3}–{to:.3} s: {n} commits, worst {max:.1} ms");
            }
        }
        latencies.sort_by(|a, b| a.total_cmp(b));
        let result = LatencyResult {
            target: rate,
            achieved,
            p50_ms: percentile(&latencies, 0.5),
            p99_ms: percentile(&latencies, 0.99),
            max_ms: latencies.last().copied().unwrap_or(f64::NAN),
            missing,
        };
        eprintln!(
            "  {rate}/s: achieved {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, missing {missing}",
            result.achieved, result.p50_ms, result.p99_ms, result.max_ms
        );
        if let (Some(before), Some(after)) = (metrics_before, daemon_metrics(&env, &daemon).await) {
            print_breakdown(&before, &after);
        }
        results.push(result);
    }
    if let Some(mut recv) = anchor {
        let _ = recv.kill();
        let _ = recv.wait();
    }
    results
}

/// The daemon's /metrics, when one runs.
async fn daemon_metrics(env: &TestEnv, daemon: &Option<Daemon>) -> Option<String> {
    daemon.as_ref()?;
    pgci_test_support::http_get(env.http_port, "/metrics")
        .await
        .map(|(_, body)| body)
}

/// Where the live latency goes, from the daemon's histograms between two
/// scrapes: inside PostgreSQL (commit to the server sending it), the
/// daemon's work per batch, and commit to Redis's acknowledgement.
/// Quantiles are estimated within buckets, as Prometheus does.
fn print_breakdown(before: &str, after: &str) {
    let mut parts = Vec::new();
    for (name, what) in [
        (
            "pgci_stream_send_delay_seconds",
            "commit→sent (in PostgreSQL)",
        ),
        ("pgci_batch_seconds", "per batch (daemon)"),
        ("pgci_apply_latency_seconds", "commit→Redis ack"),
    ] {
        let q = |p| histogram_quantile(before, after, name, p) * 1000.0;
        parts.push(format!("{what} p50 ~{:.2} p99 ~{:.2} ms", q(0.5), q(0.99)));
    }
    eprintln!("    where it goes: {}", parts.join("; "));
}

/// Estimates quantile `q` of histogram `name` over the observations made
/// between scrape `before` and scrape `after`.
fn histogram_quantile(before: &str, after: &str, name: &str, q: f64) -> f64 {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut out: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (le, value) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, value.trim().parse().ok()?))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    };
    let (old, new) = (buckets(before), buckets(after));
    let counts: Vec<(f64, f64)> = new
        .iter()
        .map(|&(le, n)| {
            let was = old.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
            (le, n - was)
        })
        .collect();
    let Some(&(_, total)) = counts.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, cumulative) in &counts {
        if cumulative >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let within = (rank - lower.1) / (cumulative - lower.1).max(f64::MIN_POSITIVE);
            return lower.0 + (le - lower.0) * within;
        }
        lower = (le, cumulative);
    }
    f64::NAN
}

/// What a cache hit costs through the client against a plain `GET`: the
/// same cached values read by `loops` concurrent loops for `seconds`, a
/// plain `GET` (cache-aside as the plan writes it) then `get_or_load`,
/// alternated `runs` times. Returns (plain, client) hits per second per run.
async fn hit_path(args: &Args, loops: usize) -> Vec<(f64, f64)> {
    use pgci_client::{Cache, CacheOptions, Source};
    const KEYS: usize = 1_000;
    let env = TestEnv::start(1).await;
    let mut conn = env.redis.conn().await;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("profile:user:{i:08}")).collect();
    let value = format!("{{\"bio\":\"{}\"}}", "x".repeat(300));
    for key in &keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(&value)
            .query_async(&mut conn)
            .await
            .expect("preset");
    }
    let keys = Arc::new(keys);
    let run = |client: bool| {
        let (keys, conn) = (Arc::clone(&keys), conn.clone());
        async move {
            let end = Instant::now() + Duration::from_secs(args.seconds);
            let mut tasks = Vec::new();
            for l in 0..loops {
                let (keys, mut conn) = (Arc::clone(&keys), conn.clone());
                let mut cache = Cache::new(conn.clone(), CacheOptions::default());
                tasks.push(tokio::spawn(async move {
                    let mut hits = 0u64;
                    let mut i = l * 7;
                    while Instant::now() < end {
                        let key = &keys[i % KEYS];
                        i += 1;
                        if client {
                            let (value, source) = cache
                                .get_or_load(
                                    key,
                                    3600,
                                    || async { Ok::<_, std::io::Error>(None) },
                                    None,
                                )
                                .await
                                .expect("get_or_load");
                            assert!(value.is_some() && source == Source::Hit);
                        } else {
                            let value: Option<String> = redis::cmd("GET")
                                .arg(key)
                                .query_async(&mut conn)
                                .await
                                .expect("GET");
                            assert!(value.is_some());
                        }
                        hits += 1;
                    }
                    hits
                }));
            }
            let mut hits = 0;
            for task in tasks {
                hits += task.await.expect("loop");
            }
            hits as f64 / args.seconds as f64
        }
    };
    let mut results = Vec::new();
    for r in 0..args.runs {
        // Alternate which goes first, so drift favours neither.
        let (plain, client) = match r % 2 {
            0 => {
                let plain = run(false).await;
                (plain, run(true).await)
            }
            _ => {
                let client = run(true).await;
                (run(false).await, client)
            }
        };
        eprintln!(
            "  {loops} loop(s), run {r}: plain GET {plain:.0}/s, get_or_load {client:.0}/s ({:.3}x)",
            client / plain
        );
        results.push((plain, client));
    }
    results
}

/// Records when the first event naming a key (its second key, the
/// balance key of the benchmark's rule) arrived.
fn stamp_event(arrivals: &Mutex<HashMap<String, Instant>>, payload: &[u8], now: Instant) {
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    if let Some(key) = event["keys"][1].as_str() {
        arrivals
            .lock()
            .expect("lock")
            .entry(key.to_string())
            .or_insert(now);
    }
}

/// Starts `pg_recvlogical` on a test_decoding slot of its own, writing to
/// a pipe, and records when each `user_tokens` row's line arrives under
/// the row's balance key (the key the daemon's event names).
async fn recvlogical_live(
    env: &TestEnv,
    client: &tokio_postgres::Client,
    arrivals: Arc<Mutex<HashMap<String, Instant>>>,
) -> std::process::Child {
    use std::io::BufRead;
    client
        .execute(
            "select pg_create_logical_replication_slot('recv_live', 'test_decoding')",
            &[],
        )
        .await
        .expect("create the anchor's slot");
    let mut child = std::process::Command::new(pg_bin().join("pg_recvlogical"))
        .arg("-d")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            env.pg.port
        ))
        .args(["--slot", "recv_live", "--start", "-f", "-", "--no-loop"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pg_recvlogical");
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        // table public.user_tokens: UPDATE: id[bigint]:5 user_id[uuid]:'…' token_id[uuid]:'…' …
        let quoted = |line: &str, column: &str| -> Option<String> {
            let rest = &line[line.find(column)? + column.len()..];
            Some(rest.split('\'').nth(1)?.to_string())
        };
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let now = Instant::now();
            if !line.starts_with("table public.user_tokens: UPDATE") {
                continue;
            }
            let (Some(user), Some(token)) = (
                quoted(&line, " user_id[uuid]:"),
                quoted(&line, " token_id[uuid]:"),
            ) else {
                continue;
            };
            arrivals
                .lock()
                .expect("lock")
                .entry(format!("balance:user:{user}:token:{token}"))
                .or_insert(now);
        }
    });
    // Streaming once the slot is active.
    let active = "select active from pg_replication_slots where slot_name = 'recv_live'";
    while !client
        .query_one(active, &[])
        .await
        .is_ok_and(|row| row.get::<_, bool>(0))
    {
        assert!(
            child.try_wait().expect("poll").is_none(),
            "pg_recvlogical exited"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    child
}

/// TPS of `pgbench` running single-row updates on user_tokens.
fn pgbench_tps(env: &TestEnv, script: &std::path::Path, seconds: u64) -> f64 {
    let out = std::process::Command::new(pg_bin().join("pgbench"))
        .args(["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(script)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.pg.port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .expect("tps line")
}

/// What capture costs writers: the same pgbench update workload with no
/// capture, with the outbox triggers (daemon draining), and with the
/// replication slot (daemon streaming). Rounds alternate the modes.
/// The outbox's size on disk (tables and indexes, every partition) in MB,
/// and its dead tuples, a moment after a run (statistics are flushed
/// lazily).
async fn outbox_footprint(client: &tokio_postgres::Client) -> (f64, i64) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let row = client
        .query_one(
            "with t as (select 'cache_invalidator.outbox'::regclass as relid \
                        union select relid from pg_partition_tree('cache_invalidator.outbox')) \
             select coalesce((select sum(pg_total_relation_size(relid)) from t), 0)::float8 / 1e6::float8, \
                    (select coalesce(sum(n_dead_tup), 0)::int8 from pg_stat_user_tables where relid in (select relid from t))",
            &[],
        )
        .await
        .expect("outbox footprint");
    (row.get(0), row.get(1))
}

/// Writer throughput per capture mode, and the outbox's footprint after
/// each drained run.
struct CaptureCost {
    tps: Vec<(&'static str, f64)>,
    outbox_after: Vec<(f64, i64)>,
}

async fn capture_cost(args: &Args) -> CaptureCost {
    let mut env = TestEnv::start(50_000).await;
    let client = env.pg.client().await;
    let rows = number_rows(&client).await;
    let script = env.path("update.sql");
    std::fs::write(
        &script,
        format!(
            "\\set r random(1, {rows})\nupdate public.user_tokens set balance = balance + 1 where id = (select id from bench_ids where rn = :r);\n"
        ),
    )
    .expect("script");
    let mut results: Vec<(&'static str, Vec<f64>)> = vec![
        ("no capture", Vec::new()),
        ("outbox triggers, daemon draining", Vec::new()),
        (
            "outbox triggers, no daemon (trigger cost alone)",
            Vec::new(),
        ),
        ("replication slot, daemon streaming", Vec::new()),
    ];
    let mut outbox_after = Vec::new();
    for round in 0..args.runs {
        // No capture.
        results[0].1.push(pgbench_tps(&env, &script, args.seconds));
        // Outbox: triggers installed, a daemon draining.
        env.postgres_extra = "source = \"outbox\"\n".to_string();
        env.write_config("[outbox]\npoll_interval = \"200ms\"\n");
        env.setup();
        let mut daemon = env.daemon().await;
        results[1].1.push(pgbench_tps(&env, &script, args.seconds));
        outbox_after.push(outbox_footprint(&client).await);
        let _ = daemon.terminate().await;
        results[2].1.push(pgbench_tps(&env, &script, args.seconds));
        let out = env.cli(&["teardown"]);
        assert!(out.status.success());
        // Replication: slot and publication, a daemon streaming.
        env.postgres_extra = String::new();
        env.write_config("");
        env.setup();
        let mut daemon = env.daemon().await;
        results[3].1.push(pgbench_tps(&env, &script, args.seconds));
        let _ = daemon.terminate().await;
        let out = env.cli(&["teardown"]);
        assert!(out.status.success());
        eprintln!(
            "  round {round}: no capture {:.0} tps, outbox {:.0} tps (no daemon {:.0}), replication {:.0} tps",
            results[0].1[round], results[1].1[round], results[2].1[round], results[3].1[round]
        );
    }
    CaptureCost {
        tps: results
            .into_iter()
            .map(|(name, mut tps)| (name, median(&mut tps)))
            .collect(),
        outbox_after,
    }
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn memory(args: &Args) -> (f64, f64, f64, Duration) {
    let mut env = TestEnv::start(50_000).await;
    env.setup();
    env.write_config("");
    let mut fresh = env.daemon().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh_idle = rss_kb(fresh.pid().expect("pid"), "VmRSS:") as f64 / 1024.0;
    let _ = fresh.terminate().await;
    let client = env.pg.client().await;
    let rows = number_rows(&client).await;
    write_backlog(&client, args.memory_changes, 1000, rows).await;
    let (sentinel, endpos) = touch_sentinel(&env).await;
    let redis = env.redis.conn().await;
    let (took, _, mut daemon) =
        daemon_drain(&mut env, redis, "pg_cache_invalidator", &sentinel, &endpos).await;
    let pid = daemon.pid().expect("pid");
    let peak = rss_kb(pid, "VmHWM:") as f64 / 1024.0;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = rss_kb(pid, "VmRSS:") as f64 / 1024.0;
    let _ = daemon.terminate().await;
    eprintln!(
        "  idle RSS after start {fresh_idle:.1} MB; {} changes drained in {took:?}: peak RSS {peak:.1} MB, idle RSS after the drain {idle:.1} MB",
        args.memory_changes
    );
    (fresh_idle, peak, idle, took)
}

/// Peak RSS (MB) of the daemon while one transaction rewrites
/// `args.large_rows` refreshed rows of `args.large_mb` MB each, with
/// `replication.buffer_messages = buffer`: what large rows cost, since the
/// transport's read-ahead is counted in rows, not bytes.
async fn large_rows(args: &Args, buffer: u32) -> f64 {
    let mut env = TestEnv::start(1).await;
    let client = env.pg.client().await;
    client
        .batch_execute(&format!(
            "create table public.blobs (id int primary key, body text); \
             alter table public.blobs alter column body set storage external; \
             insert into public.blobs select g, 'x' from generate_series(1, {}) g",
            args.large_rows
        ))
        .await
        .expect("blobs");
    env.write_config(&format!(
        "[replication]\nbuffer_messages = {buffer}\n\n[[rules]]\ntable = \"public.blobs\"\nkeys = [\"blob:{{id}}\"]\naction = \"refresh\"\nttl = \"1h\"\n"
    ));
    env.setup();
    let daemon = env.daemon().await;
    let pid = daemon.pid().expect("pid");
    let idle = rss_kb(pid, "VmHWM:") as f64 / 1024.0;
    client
        .batch_execute(&format!(
            "update public.blobs set body = repeat(md5(id::text), {} * 32768)",
            args.large_mb
        ))
        .await
        .expect("rewrite the rows");
    env.sync().await;
    let peak = rss_kb(pid, "VmHWM:") as f64 / 1024.0;
    eprintln!(
        "  {} rows of {} MB, buffer_messages = {buffer}: peak RSS {peak:.0} MB (before the transaction {idle:.0} MB)",
        args.large_rows, args.large_mb
    );
    peak
}

/// The promotion scenario's measure: from `pg_promote()` returning on the
/// standby until the position Redis records as applied has passed a
/// change committed on the new primary right then — the moment the cache
/// is provably current again. Writers keep committing one-row updates
/// every 10 ms meanwhile. `failover_slots`: the standby synchronizes a
/// failover slot behind `synchronized_standby_slots` (17+, no flush);
/// otherwise the new primary has no slot (flush and rebuild).
async fn promotion_ms(failover_slots: bool) -> f64 {
    let mut env = TestEnv::start(1_000).await;
    let standby = if failover_slots {
        env.pg.failover_standby().await
    } else {
        env.pg.standby().await
    };
    env.url_override = Some(format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?sslmode=disable&target_session_attrs=read-write",
        env.pg.port, standby.port
    ));
    env.write_config("");
    env.setup();
    let _daemon = env.daemon().await;
    env.sync().await;
    if failover_slots {
        standby.wait_synced("pg_cache_invalidator", &env.pg).await;
    }
    env.pg.kill9();
    standby.promote().await;
    let promoted = Instant::now();
    let client = standby.client().await;
    let update = "update public.profiles set bio = md5(random()::text) \
                   where id = (select id from public.profiles order by random() limit 1)";
    client.execute(update, &[]).await.expect("first change");
    let target: String = client
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    let target: pg_cache_invalidator::lsn::Lsn = target.parse().expect("lsn");
    let mut redis = env.redis.conn().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        client.execute(update, &[]).await.expect("change");
        let recorded: Option<String> = redis::cmd("GET")
            .arg("pgci:position:pg_cache_invalidator")
            .query_async(&mut redis)
            .await
            .expect("position");
        if recorded
            .and_then(|r| r.parse::<pg_cache_invalidator::lsn::Lsn>().ok())
            .is_some_and(|r| r >= target)
        {
            return promoted.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not catch up after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and
    // a ten-minute benchmark has no place in a test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run scripts/bench.sh (cargo bench --bench pipeline)");
        return;
    }
    let args = args();
    let started = Instant::now();
    let mut report = String::new();
    let mut drains = Vec::new();
    if args.wants("drain1000") {
        eprintln!("drain, 1000-row transactions");
        drains.push(("1000-row transactions", drain(&args, 1000).await));
    }
    if args.wants("drain1") {
        eprintln!("drain, 1-row transactions");
        drains.push(("1-row transactions", drain(&args, 1).await));
    }
    let live = if args.wants("live") {
        eprintln!("live latency");
        live_latency(&args, Capture::Replication, &args.rates, false, false).await
    } else {
        Vec::new()
    };
    let outbox_live = if args.wants("outbox-live") {
        eprintln!("live latency through the outbox");
        live_latency(&args, Capture::Outbox, &[1_000], false, false).await
    } else {
        Vec::new()
    };
    let outbox_polling = if args.wants("outbox-poll") {
        eprintln!("live latency through the outbox, wake-ups off (poll every 100 ms)");
        live_latency(&args, Capture::OutboxPolling, &[1_000], false, false).await
    } else {
        Vec::new()
    };
    let standby_live =
        if args.wants("standby-live") && TestEnv::start(1).await.pg.major().await >= 16 {
            eprintln!("live latency, the slot on a streaming standby");
            live_latency(&args, Capture::Standby, &[1_000], false, false).await
        } else {
            Vec::new()
        };
    let recv_live = if args.wants("live-recvlogical") {
        eprintln!("live latency of pg_recvlogical (test_decoding), no daemon: the anchor");
        live_latency(&args, Capture::RecvLogical, &args.rates, false, false).await
    } else {
        Vec::new()
    };
    let mut hit_paths = Vec::new();
    if args.wants("hit-path") {
        eprintln!("a cache hit: plain GET against the client's get_or_load");
        for loops in [1, 16] {
            hit_paths.push((loops, hit_path(&args, loops).await));
        }
    }
    let cluster_drains = if args.wants("cluster-drain") {
        eprintln!("drain, 1-row transactions, one redis and a redis cluster");
        Some(cluster_drain(&args).await)
    } else {
        None
    };
    let cluster_live = if args.wants("cluster-live") {
        eprintln!("live latency, redis cluster");
        live_latency(&args, Capture::Replication, &args.rates, true, false).await
    } else {
        Vec::new()
    };
    let cluster_live_sharded = if args.wants("cluster-live-sharded") {
        eprintln!("live latency, redis cluster, sharded events");
        live_latency(&args, Capture::Replication, &args.rates, true, true).await
    } else {
        Vec::new()
    };
    let group_drains = if args.wants("groups") {
        eprintln!("drain, 1-row transactions over two tables: one slot, then two table groups");
        Some(groups_drain(&args).await)
    } else {
        None
    };
    let capture = if args.wants("capture") {
        eprintln!("capture cost for writers");
        capture_cost(&args).await
    } else {
        CaptureCost {
            tps: Vec::new(),
            outbox_after: Vec::new(),
        }
    };
    let large = if args.wants("large-rows") {
        eprintln!("large rows in one transaction");
        let mut peaks = Vec::new();
        for buffer in [16, 256] {
            peaks.push((buffer, large_rows(&args, buffer).await));
        }
        peaks
    } else {
        Vec::new()
    };
    let mut promotions: Vec<(&str, Vec<f64>)> = Vec::new();
    if args.wants("failover") {
        eprintln!("promotion of a standby, with and without failover slots");
        let major = TestEnv::start(1).await.pg.major().await;
        let mut flush = Vec::new();
        let mut synced = Vec::new();
        for _ in 0..args.runs {
            flush.push(promotion_ms(false).await);
            if major >= 17 {
                synced.push(promotion_ms(true).await);
            }
        }
        promotions.push(("no slot on the new primary (flush and rebuild)", flush));
        if !synced.is_empty() {
            promotions.push(("synchronized failover slot (no flush)", synced));
        }
    }
    let catchups = if args.wants("catchup") {
        eprintln!(
            "catch-up after {} s down at {} rows/s",
            args.catchup_seconds, args.catchup_rate
        );
        catchup(&args).await
    } else {
        Vec::new()
    };
    let sync_commits = if args.wants("sync-commit") {
        eprintln!("synchronous commits: nobody, a physical standby, the daemon");
        sync_commit(&args).await
    } else {
        Vec::new()
    };
    let (idle, peak, idle_after, mem_took) = if args.wants("memory") {
        eprintln!("memory");
        memory(&args).await
    } else {
        (f64::NAN, f64::NAN, f64::NAN, Duration::ZERO)
    };

    let mut lines = vec![
        format!("## Results ({} changes per drain, median of {} runs)", args.changes, args.runs),
        String::new(),
        "| drain | pg_recvlogical rows/s | daemon rows/s | daemon / pg_recvlogical | confirmed by the slot / pg_recvlogical | naive rows/s | daemon / naive |".into(),
        "|---|---|---|---|---|---|---|".into(),
    ];
    let mut ratios = Vec::new();
    for (name, mut r) in drains {
        let recv = median(&mut r.recv);
        let daemon = median(&mut r.daemon);
        let confirmed = median(&mut r.confirmed);
        ratios.push((name, daemon / recv, confirmed / recv));
        lines.push(format!(
            "| {name} | {recv:.0} | {daemon:.0} | {:.2} | {:.2} | {:.0} | {:.1} |",
            daemon / recv,
            confirmed / recv,
            r.naive,
            daemon / r.naive
        ));
    }
    lines.push(String::new());
    lines.push(
        "| live rate (target) | achieved rows/s | p50 ms | p99 ms | max ms | events missing |"
            .into(),
    );
    lines.push("|---|---|---|---|---|---|".into());
    for (capture, results) in [
        ("", &live),
        (" (outbox)", &outbox_live),
        (" (outbox, polling 100 ms)", &outbox_polling),
        (" (slot on a standby)", &standby_live),
        (
            " (pg_recvlogical, no daemon: row line, not event)",
            &recv_live,
        ),
        (" (redis cluster)", &cluster_live),
        (" (redis cluster, sharded events)", &cluster_live_sharded),
    ] {
        for l in results {
            lines.push(format!(
                "| {}{capture} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
                l.target, l.achieved, l.p50_ms, l.p99_ms, l.max_ms, l.missing
            ));
        }
    }
    lines.push(String::new());
    if !hit_paths.is_empty() {
        lines.push(
            "| cache hits | plain GET hits/s (median) | get_or_load hits/s (median) | get_or_load / GET (median of runs) |"
                .into(),
        );
        lines.push("|---|---|---|---|".into());
        for (loops, runs) in &hit_paths {
            let mut plain: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let mut client: Vec<f64> = runs.iter().map(|r| r.1).collect();
            let mut ratios: Vec<f64> = runs.iter().map(|r| r.1 / r.0).collect();
            lines.push(format!(
                "| {loops} loop(s) | {:.0} | {:.0} | {:.3} |",
                median(&mut plain),
                median(&mut client),
                median(&mut ratios)
            ));
        }
        lines.push(String::new());
    }
    let mut cluster_ratio = f64::NAN;
    if let Some((mut single, mut clustered)) = cluster_drains {
        let (single, clustered) = (median(&mut single), median(&mut clustered));
        cluster_ratio = clustered / single;
        lines.push(
            "| drain, 1-row transactions | one redis rows/s | redis cluster (3 masters, 3 replicas) rows/s | cluster / one |".into(),
        );
        lines.push("|---|---|---|---|".into());
        lines.push(format!(
            "| median of {} | {single:.0} | {clustered:.0} | {cluster_ratio:.2} |",
            args.runs
        ));
        lines.push(String::new());
    }
    let mut groups_ratio = f64::NAN;
    if let Some((mut one, mut two)) = group_drains {
        let (one, two) = (median(&mut one), median(&mut two));
        groups_ratio = two / one;
        lines.push(
            "| drain, 1-row transactions over two tables | one slot, one daemon rows/s | two groups, two daemons rows/s | two / one |".into(),
        );
        lines.push("|---|---|---|---|".into());
        lines.push(format!(
            "| median of {} | {one:.0} | {two:.0} | {groups_ratio:.2} |",
            args.runs
        ));
        lines.push(String::new());
    }
    if let Some((_, base)) = capture.tps.first().copied() {
        lines.push(String::new());
        lines.push(
            "| writers (pgbench, 4 clients, single-row updates) | tps | ratio to no capture |"
                .into(),
        );
        lines.push("|---|---|---|".into());
        for (name, tps) in &capture.tps {
            lines.push(format!("| {name} | {tps:.0} | {:.2} |", tps / base));
        }
        lines.push(String::new());
        for (round, (mb, dead)) in capture.outbox_after.iter().enumerate() {
            lines.push(format!(
                "Outbox after round {round} with the daemon draining: {mb:.1} MB on disk, {dead} dead tuples."
            ));
        }
        lines.push(String::new());
    }
    if !promotions.is_empty() {
        lines.push(
            "| promotion (standby promoted, old primary killed) | ms until the cache is current with a change made at promotion: median | min | max |".into(),
        );
        lines.push("|---|---|---|---|".into());
        for (name, ms) in &mut promotions {
            let (min, max) = (
                ms.iter().copied().fold(f64::INFINITY, f64::min),
                ms.iter().copied().fold(0.0, f64::max),
            );
            lines.push(format!(
                "| {name}, {} runs | {:.0} | {min:.0} | {max:.0} |",
                ms.len(),
                median(ms)
            ));
        }
        lines.push(String::new());
    }
    if !catchups.is_empty() {
        lines.push(format!(
            "| catch-up after {} s down at {} rows/s (writers go on) | rows in the outage | pg_recvlogical s | daemon s (slot confirmed) | daemon / pg_recvlogical (time) |",
            args.catchup_seconds, args.catchup_rate
        ));
        lines.push("|---|---|---|---|---|".into());
        for (i, c) in catchups.iter().enumerate() {
            lines.push(format!(
                "| run {i} | {} | {:.2} | {:.2} | {:.2} |",
                c.rows,
                c.recv.as_secs_f64(),
                c.daemon.as_secs_f64(),
                c.daemon.as_secs_f64() / c.recv.as_secs_f64()
            ));
        }
        lines.push(String::new());
    }
    if let [(_, local), (_, physical), _] = &sync_commits[..] {
        let (local_p50, physical_p50, physical_p99) = (
            percentile(local, 0.5),
            percentile(physical, 0.5),
            percentile(physical, 0.99),
        );
        lines.push(
            "| one-row update, commit waits for | commits | p50 ms | p99 ms | p50 / a physical standby's | p99 / a physical standby's | p50 / local |".into(),
        );
        lines.push("|---|---|---|---|---|---|---|".into());
        for (waiter, ms) in &sync_commits {
            let (p50, p99) = (percentile(ms, 0.5), percentile(ms, 0.99));
            lines.push(format!(
                "| {} | {} | {p50:.2} | {p99:.2} | {:.2} | {:.2} | {:.2} |",
                waiter.name(),
                ms.len(),
                p50 / physical_p50,
                p99 / physical_p99,
                p50 / local_p50
            ));
        }
        lines.push(String::new());
    }
    for (buffer, peak) in &large {
        lines.push(format!(
            "Large rows: one transaction rewriting {} refreshed rows of {} MB, buffer_messages = {buffer}: peak RSS {peak:.0} MB.",
            args.large_rows, args.large_mb
        ));
    }
    lines.push(format!(
        "Memory: idle RSS {idle:.1} MB after start; peak RSS {peak:.1} MB while draining {} changes (in {mem_took:.1?}); idle RSS {idle_after:.1} MB after the drain.",
        args.memory_changes
    ));
    lines.push(format!("Total benchmark time {:.0?}.", started.elapsed()));
    report.push_str(&lines.join("\n"));
    println!("{report}\n");
    let p99_5k = live
        .iter()
        .find(|l| l.target == 5_000)
        .map_or(f64::NAN, |l| l.p99_ms);
    // By shape, not position: `--only drain1` runs only the second.
    let ratio = |shape: &str, confirmed: bool| {
        ratios
            .iter()
            .find(|(name, _, _)| name.starts_with(shape))
            .map_or(
                f64::NAN,
                |&(_, applied, by_slot)| if confirmed { by_slot } else { applied },
            )
    };
    println!(
        "drain_ratio_1000={:.2} drain_ratio_1={:.2} confirmed_ratio_1000={:.2} confirmed_ratio_1={:.2} p99_ms_5k={p99_5k:.2} peak_rss_mb={peak:.0} idle_rss_mb={idle:.0} cluster_drain_ratio={cluster_ratio:.2} groups_drain_ratio={groups_ratio:.2}",
        ratio("1000-row", false),
        ratio("1-row", false),
        ratio("1000-row", true),
        ratio("1-row", true)
    );
}
