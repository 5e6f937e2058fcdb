//! Synchronous invalidation: the daemon as a synchronous standby, so a
//! transaction that commits with `synchronous_commit = remote_apply`
//! returns only after Redis acknowledged its invalidation.
//!
//! `PGCI_SYNC_CYCLES` sets the transfer+read cycles with the mode on
//! (default 10,000; at most 2,000 run with it off; the README's test
//! command runs fewer on the other majors).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgci_client::{Cache, CacheOptions};

use crate::support::{wait_for, TestEnv};

fn cycles() -> usize {
    std::env::var("PGCI_SYNC_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Lists the daemon in `synchronous_standby_names` and waits until it is
/// a synchronous standby.
async fn make_daemon_synchronous(admin: &tokio_postgres::Client) {
    pgci_test_support::set_synchronous_standbys(
        admin,
        "ANY 1 (\"pg-cache-invalidator\")",
        Some("pg-cache-invalidator"),
    )
    .await;
}

const BALANCE_SQL: &str =
    "select coalesce(sum(balance), 0)::text from public.user_tokens where user_id = $1::text::uuid";

async fn balance(pg: &tokio_postgres::Client, user: &str) -> String {
    pg.query_one(BALANCE_SQL, &[&user])
        .await
        .expect("balance")
        .get(0)
}

/// What one mode saw.
#[derive(Debug, Default)]
struct Tally {
    reads: u64,
    stale: u64,
    commit_micros: Vec<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// `cycles` transfers, shared out between [`PAIRS`] pairs of users that
/// transfer back and forth at once, each followed by cache-aside reads
/// (leases) of both users' balances, while another session writes
/// unrelated rows; counts reads that returned a balance other than the
/// database's.
async fn transfer_and_read(env: &TestEnv, function: &str, cycles: usize) -> Tally {
    let writer = env.pg.client().await;
    let users: Vec<String> = writer
        .query(
            "select user_id::text from public.user_tokens t join public.tokens k on k.id = t.token_id \
              where k.symbol = 'GEN' order by user_id limit $1",
            &[&(2 * PAIRS as i64)],
        )
        .await
        .expect("users")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(users.len(), 2 * PAIRS, "the test env seeds enough users");
    let token: String = writer
        .query_one(
            "select id::text from public.tokens where symbol = 'GEN'",
            &[],
        )
        .await
        .expect("token")
        .get(0);
    // Unrelated load: profile edits by another session (not waiting).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let pg = env.pg.client().await;
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            pg.batch_execute("set synchronous_commit = local")
                .await
                .expect("local");
            while !stop.load(Ordering::Relaxed) {
                pg.batch_execute(
                    "update public.profiles set bio = md5(random()::text) where id = (select id from public.profiles order by random() limit 1)",
                )
                .await
                .expect("load");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Pairs of users transfer back and forth concurrently, each pair on
    // its own sessions: the cycles are shared out between them.
    let mut pairs = Vec::new();
    for (i, pair) in users.chunks(2).enumerate() {
        let share = cycles / PAIRS + usize::from(i < cycles % PAIRS);
        pairs.push(transfer_and_read_pair(
            env,
            function,
            [pair[0].clone(), pair[1].clone()],
            token.clone(),
            share,
        ));
    }
    let mut tally = Tally::default();
    for pair in futures_util::future::join_all(pairs).await {
        tally.reads += pair.reads;
        tally.stale += pair.stale;
        tally.commit_micros.extend(pair.commit_micros);
    }
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    tally.commit_micros.sort_unstable();
    tally
}

/// Pairs of users transferring at once.
const PAIRS: usize = 4;

/// `cycles` transfers between the two `users`, each followed by reads of
/// both balances; see [`transfer_and_read`].
async fn transfer_and_read_pair(
    env: &TestEnv,
    function: &str,
    users: [String; 2],
    token: String,
    cycles: usize,
) -> Tally {
    let writer = env.pg.client().await;
    // Unrelated writes of this session never wait: only the function
    // that opts in does.
    writer
        .batch_execute("set synchronous_commit = local")
        .await
        .expect("set synchronous_commit");
    let reader = env.pg.client().await;
    let mut cache = Cache::new(env.redis.conn().await, CacheOptions::default());
    let mut tally = Tally::default();
    for n in 0..cycles {
        let (from, to) = if n % 2 == 0 {
            (&users[0], &users[1])
        } else {
            (&users[1], &users[0])
        };
        // The cache holds both balances before the transfer (filled by the
        // previous cycle's reads, or here on the first).
        if n == 0 {
            for user in [from, to] {
                let reader = &reader;
                cache
                    .get_or_load(
                        &format!("balance:user:{user}"),
                        300,
                        || async move { Ok::<_, std::io::Error>(Some(balance(reader, user).await)) },
                        None,
                    )
                    .await
                    .expect("fill");
            }
        }
        let started = Instant::now();
        writer
            .execute(
                &format!("select public.{function}($1::text::uuid, $2::text::uuid, $3::text::uuid, 0.01)"),
                &[from, to, &token],
            )
            .await
            .expect("transfer");
        tally
            .commit_micros
            .push(started.elapsed().as_micros() as u64);
        for user in [from, to] {
            let reader = &reader;
            let (seen, _) = cache
                .get_or_load(
                    &format!("balance:user:{user}"),
                    300,
                    || async move { Ok::<_, std::io::Error>(Some(balance(reader, user).await)) },
                    None,
                )
                .await
                .expect("read");
            tally.reads += 1;
            if seen.as_deref() != Some(balance(reader, user).await.as_str()) {
                tally.stale += 1;
            }
        }
    }
    tally
}

/// With the daemon as a synchronous standby and a transfer function that
/// opts its transaction in (`set_config('synchronous_commit',
/// 'remote_apply', true)`), no read right after a transfer returns an old
/// balance; with the plain function (the session commits `local`) the
/// same cycles do (the daemon's DEL lands
/// after the commit returned). Commit latency of both is printed; the
/// daemon reports itself as a synchronous standby in `pgci_sync_standby`.
#[tokio::test(flavor = "multi_thread")]
async fn synchronous_invalidation_leaves_no_stale_balance() {
    let mut env = TestEnv::start(2 * PAIRS as i32).await;
    env.write_config("[replication]\nheartbeat_interval = \"1s\"\n");
    env.setup();
    let _daemon = env.daemon().await;
    let admin = env.pg.client().await;
    make_daemon_synchronous(&admin).await;
    let port = env.http_port;
    wait_for(
        "the sync-standby gauge",
        Duration::from_secs(10),
        || async move {
            let (_, text) = crate::support::http_get(port, "/metrics")
                .await
                .unwrap_or((0, String::new()));
            crate::support::metric(&text, "pgci_sync_standby") == Some(1.0)
        },
    )
    .await;
    // The README's recipe: the money path opts in per transaction.
    admin
        .batch_execute(
            "create function public.transfer_tokens_synchronously(p_from uuid, p_to uuid, p_token uuid, p_amount numeric) \
             returns void language plpgsql as $$ begin \
               perform set_config('synchronous_commit', 'remote_apply', true); \
               perform public.transfer_tokens(p_from, p_to, p_token, p_amount); \
             end $$",
        )
        .await
        .expect("create the synchronous transfer");
    let n = cycles();
    let on = transfer_and_read(&env, "transfer_tokens_synchronously", n).await;
    // Without the mode, a fraction of the cycles is enough to show the
    // stale reads.
    let off = transfer_and_read(&env, "transfer_tokens", n.min(2_000)).await;
    eprintln!(
        "synchronous invalidation: remote_apply stale reads {}/{}, commit p50 {:.2} ms p99 {:.2} ms; local stale reads {}/{}, commit p50 {:.2} ms p99 {:.2} ms",
        on.stale,
        on.reads,
        percentile(&on.commit_micros, 0.5),
        percentile(&on.commit_micros, 0.99),
        off.stale,
        off.reads,
        percentile(&off.commit_micros, 0.5),
        percentile(&off.commit_micros, 0.99),
    );
    assert_eq!(on.stale, 0, "{on:?}");
    // Confirmations go out right after Redis acknowledged (they used to
    // wait for a 1 s report interval, which every synchronous commit
    // would wait too): a functional check with a wide margin, not a
    // speed target.
    assert!(
        percentile(&on.commit_micros, 0.5) < 200.0,
        "synchronous commits wait for a report interval: {:?} ms p50",
        percentile(&on.commit_micros, 0.5)
    );
    assert!(
        off.stale > 0,
        "the test must be able to see stale reads: {off:?}"
    );
}

/// A synchronous writer waits while the daemon is down (killed -9) and is
/// released once the restarted daemon has applied its invalidation;
/// nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_synchronous_writer_waits_for_a_restarted_daemon() {
    let mut env = TestEnv::start(4).await;
    env.setup();
    let mut daemon = env.daemon().await;
    let admin = env.pg.client().await;
    make_daemon_synchronous(&admin).await;
    let id = pgci_test_support::first_profile_id(&admin).await;
    let key = format!("profile:user:{id}");
    let mut redis = env.redis.conn().await;
    crate::support::preset(&mut redis, std::slice::from_ref(&key)).await;
    daemon.kill9();
    let writer = env.pg.client().await;
    writer
        .batch_execute("set synchronous_commit = remote_apply")
        .await
        .expect("remote_apply");
    let update_id = id.clone();
    let write = tokio::spawn(async move {
        writer
            .execute(
                "update public.profiles set bio = 'synchronous' where id = $1::text::uuid",
                &[&update_id],
            )
            .await
            .expect("update")
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !write.is_finished(),
        "the writer waits while no standby applies"
    );
    let started = Instant::now();
    let _daemon = env.daemon().await;
    tokio::time::timeout(Duration::from_secs(20), write)
        .await
        .expect("the writer is released")
        .expect("writer task");
    eprintln!(
        "writer released {:?} after the daemon restarted",
        started.elapsed()
    );
    assert_eq!(
        crate::support::surviving(&mut redis, std::slice::from_ref(&key)).await,
        0,
        "released only after the invalidation was applied"
    );
}

/// The ways out when the daemon is gone while synchronous commits wait:
/// a second daemon on the same slot takes over after a `kill -9` and
/// releases the waiter; and with no daemon at all, the runbook (empty
/// `synchronous_standby_names`, reload) releases it at once, and its
/// invalidation is applied when a daemon streams again — nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn waiters_are_released_by_a_standby_daemon_or_the_runbook() {
    let mut env = TestEnv::start(4).await;
    env.setup();
    let mut first = env.daemon().await;
    env.http_port = crate::support::free_port();
    env.write_config("");
    let mut second = env.spawn_daemon();
    let admin = env.pg.client().await;
    make_daemon_synchronous(&admin).await;
    let ids: Vec<String> = admin
        .query(
            "select id::text from public.profiles order by id limit 2",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let keys: Vec<String> = ids.iter().map(|id| format!("profile:user:{id}")).collect();
    let mut redis = env.redis.conn().await;
    crate::support::preset(&mut redis, &keys).await;

    // The standby daemon takes over.
    first.kill9();
    let write = synchronous_update(env.pg.client().await, ids[0].clone()).await;
    tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the standby daemon releases the writer")
        .expect("writer task");
    assert_eq!(
        crate::support::surviving(&mut redis, std::slice::from_ref(&keys[0])).await,
        0,
        "released only after the invalidation was applied; the first daemon:\n{}\nthe second:\n{}\nPostgreSQL:\n{}",
        first.log(),
        second.log(),
        env.pg.log()
    );

    // No daemon at all: the runbook.
    second.kill9();
    let write = synchronous_update(env.pg.client().await, ids[1].clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !write.is_finished(),
        "the writer waits while no daemon runs"
    );
    for sql in [
        "alter system set synchronous_standby_names = ''",
        "select pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("runbook");
    }
    tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("the runbook releases the writer")
        .expect("writer task");
    assert_eq!(
        crate::support::surviving(&mut redis, std::slice::from_ref(&keys[1])).await,
        1,
        "no daemon has applied it yet"
    );
    let _back = env.daemon().await;
    env.sync().await;
    assert_eq!(
        crate::support::surviving(&mut redis, std::slice::from_ref(&keys[1])).await,
        0,
        "applied once a daemon streams again"
    );
}

/// Starts a `remote_apply` update of profile `id` on `pg`; the task ends
/// when the commit returns.
async fn synchronous_update(
    pg: tokio_postgres::Client,
    id: String,
) -> tokio::task::JoinHandle<u64> {
    pg.batch_execute("set synchronous_commit = remote_apply")
        .await
        .expect("remote_apply");
    tokio::spawn(async move {
        pg.execute(
            "update public.profiles set bio = 'synchronous' where id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("update")
    })
}

/// A backlog is drained without asking PostgreSQL whether each batch's
/// commits are visible: the first check's horizon covers every older
/// commit, so neither the check nor the second deletion is repeated per
/// batch (the drain's confirmed throughput depends on it).
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_drains_without_a_visibility_check_per_batch() {
    let mut env = TestEnv::start(20).await;
    env.setup();
    let mut daemon = env.daemon().await;
    env.sync().await;
    daemon.terminate().await;
    // 20,000 one-row transactions while the daemon is stopped.
    let pg = env.pg.client().await;
    pg.batch_execute(
        "do $$ begin for i in 1..20000 loop \
           update public.user_tokens set balance = balance + 1 \
            where ctid = (select ctid from public.user_tokens order by user_id, token_id offset i % 40 limit 1); \
           commit; \
         end loop; end $$",
    )
    .await
    .expect("backlog");
    let _daemon = env.daemon().await;
    env.sync().await;
    let (_, text) = crate::support::http_get(env.http_port, "/metrics")
        .await
        .expect("metrics");
    let checks = crate::support::metric(&text, "pgci_visibility_checks_total").unwrap_or(0.0);
    let batches = crate::support::metric(&text, "pgci_batches_total").unwrap_or(0.0);
    eprintln!("drained 20000 transactions in {batches} batches with {checks} visibility checks");
    assert!(
        batches >= 8.0,
        "40,000 keys need several batches: {batches}"
    );
    assert!(
        checks <= 3.0,
        "{checks} visibility checks for {batches} batches of an old backlog"
    );
}

/// A synchronous transaction with more keys than the daemon keeps to
/// delete again (its commit is held until the daemon confirms it, so every
/// batch of it is held) is remembered by its tables instead: once it
/// shows, their rules' keys are flushed — the daemon's memory stays
/// bounded and no key it touched can keep a value filled in between.
#[tokio::test(flavor = "multi_thread")]
async fn a_synchronous_transaction_too_large_to_remember_flushes_its_tables() {
    let mut env = TestEnv::start(20).await;
    env.setup();
    let daemon = env.daemon().await;
    let admin = env.pg.client().await;
    make_daemon_synchronous(&admin).await;
    let mut redis = env.redis.conn().await;
    // No row renders these keys: only a flush of the table's rules
    // removes the first; the profile key belongs to another table.
    let untouched = [
        "balance:user:00000000-0000-0000-0000-000000000000".to_string(),
        "profile:user:00000000-0000-0000-0000-000000000000".to_string(),
    ];
    crate::support::preset(&mut redis, &untouched).await;
    let writer = env.pg.client().await;
    // 20 users × 8,000 new tokens: 160,000 rows, 320,000 keys.
    writer
        .batch_execute(
            "insert into public.tokens (symbol, name) \
               select 'T' || g, 'token ' || g from generate_series(1, 8000) g; \
             set synchronous_commit = remote_apply; \
             insert into public.user_tokens (user_id, token_id) \
               select p.id, t.id from public.profiles p, public.tokens t where t.symbol like 'T%'",
        )
        .await
        .expect("large synchronous transaction");
    env.sync().await;
    assert_eq!(
        crate::support::surviving(&mut redis, &untouched[..1]).await,
        0,
        "the table's keys were flushed once the commit showed"
    );
    assert_eq!(
        crate::support::surviving(&mut redis, &untouched[1..]).await,
        1,
        "other tables' keys stay"
    );
    assert!(
        daemon
            .log()
            .contains("a synchronous commit holds more keys than the daemon keeps"),
        "{}",
        daemon.log()
    );
}

/// What readers hammering two balances saw while one writer transferred
/// between them synchronously.
#[derive(Debug, Default)]
struct Hammered {
    reads: u64,
    /// Reads that returned a balance older than the one known when they
    /// started (known once the writer's commit had returned).
    stale: u64,
}

/// `transfers` synchronous transfers from one user to another (so one
/// balance only falls and the other only rises), while four readers read
/// both balances through leases as fast as they can; counts the reads
/// that returned a balance from before a transfer that had returned when
/// the read started.
async fn hammer(env: &TestEnv, transfers: usize) -> Hammered {
    let writer = env.pg.client().await;
    let rows = writer
        .query(
            "select t.user_id::text, k.id::text from public.user_tokens t join public.tokens k on k.id = t.token_id \
              where k.symbol = 'GEN' order by t.user_id limit 2",
            &[],
        )
        .await
        .expect("users");
    let (from, to): (String, String) = (rows[0].get(0), rows[1].get(0));
    let token: String = rows[0].get(1);
    writer
        .execute(
            "update public.user_tokens set balance = 1000000 where user_id = $1::text::uuid and token_id = $2::text::uuid",
            &[&from, &token],
        )
        .await
        .expect("fund the sender");
    let users = [from.clone(), to.clone()];
    let newest = Arc::new(std::sync::Mutex::new([0f64; 2]));
    for (i, user) in users.iter().enumerate() {
        newest.lock().expect("newest")[i] = balance(&writer, user).await.parse().expect("a number");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (pg, redis) = (env.pg.client().await, env.redis.conn().await);
        let (users, newest, stop) = (users.clone(), Arc::clone(&newest), Arc::clone(&stop));
        readers.push(tokio::spawn(async move {
            let mut cache = Cache::new(redis, CacheOptions::default());
            let mut seen = Hammered::default();
            while !stop.load(Ordering::Relaxed) {
                for (i, user) in users.iter().enumerate() {
                    let known = newest.lock().expect("newest")[i];
                    let pg = &pg;
                    let (value, _) = cache
                        .get_or_load(
                            &format!("balance:user:{user}"),
                            300,
                            || async move { Ok::<_, std::io::Error>(Some(balance(pg, user).await)) },
                            None,
                        )
                        .await
                        .expect("read");
                    let value: f64 = value.expect("a balance").parse().expect("a number");
                    seen.reads += 1;
                    // The sender's balance only falls, the receiver's
                    // only rises.
                    let older = if i == 0 {
                        value > known + 0.001
                    } else {
                        value < known - 0.001
                    };
                    seen.stale += u64::from(older);
                }
            }
            seen
        }));
    }
    writer
        .batch_execute("set synchronous_commit = remote_apply")
        .await
        .expect("synchronous_commit");
    for _ in 0..transfers {
        writer
            .execute(
                "select public.transfer_tokens($1::text::uuid, $2::text::uuid, $3::text::uuid, 0.01)",
                &[&from, &to, &token],
            )
            .await
            .expect("transfer");
        // The commit returned: every read from now on must see it (known
        // at once, without asking: only this writer moves these balances).
        let mut newest = newest.lock().expect("newest");
        newest[0] -= 0.01;
        newest[1] += 0.01;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Hammered::default();
    for reader in readers {
        let seen = reader.await.expect("reader");
        total.reads += seen.reads;
        total.stale += seen.stale;
    }
    total
}

/// A synchronous commit returns once the daemon deleted its keys, but
/// before the commit shows to other sessions: a reader that misses in
/// between reads the row as it was and fills it (its lease is its own),
/// and until the daemon's second deletion every reader is served that
/// old balance, after the commit returned. With `fence_until_visible`
/// the first deletion leaves the daemon's lease marker instead, so no
/// reader can fill until the commit shows: no read returns a balance
/// older than a returned transfer. The same run without fences must see
/// such reads (the test can fail).
#[tokio::test(flavor = "multi_thread")]
async fn fences_leave_no_old_balance_to_any_reader_of_a_synchronous_commit() {
    let mut env = TestEnv::start(2).await;
    env.write_config("");
    env.setup();
    let mut daemon = env.daemon().await;
    let admin = env.pg.client().await;
    make_daemon_synchronous(&admin).await;
    let unfenced = hammer(&env, 300).await;
    daemon.terminate().await;
    env.redis_extra = "fence_until_visible = true\n".to_string();
    env.write_config("");
    let _daemon = env.daemon().await;
    make_daemon_synchronous(&admin).await;
    let fenced = hammer(&env, 300).await;
    eprintln!("without fences {unfenced:?}; with fences {fenced:?}");
    assert!(
        unfenced.stale > 0,
        "the test must be able to see old balances: {unfenced:?}"
    );
    assert_eq!(fenced.stale, 0, "{fenced:?}");
}

/// Confirmations are reported at the synchronous pace only while commits
/// may wait for the daemon: when `synchronous_standby_names` comes to name
/// it (read by the heartbeats), the stream reopens reporting every 100 µs
/// instead of every millisecond (each report releases a waiting commit, and
/// at 1 ms half of a busy writer's commits waited for the timer), and goes
/// back when it no longer names it. A synchronous commit made across the
/// switch is released with its invalidation applied.
#[tokio::test(flavor = "multi_thread")]
async fn confirmations_are_reported_at_once_only_while_commits_wait_for_the_daemon() {
    let mut env = TestEnv::start(4).await;
    env.write_config("[replication]\nheartbeat_interval = \"200ms\"\n");
    env.setup();
    let daemon = env.daemon().await;
    let admin = env.pg.client().await;
    let paced = |log: &str, every: &str| {
        log.lines()
            .filter(|l| l.contains("replication stream started") && l.contains(every))
            .count()
    };
    // The slot turns active a moment before the line is written.
    wait_for(
        "the stream to start at the asynchronous pace",
        Duration::from_secs(20),
        || async { paced(&daemon.log(), "reports_every=1ms") >= 1 },
    )
    .await;
    assert_eq!(
        paced(&daemon.log(), "reports_every=1ms"),
        1,
        "{}",
        daemon.log()
    );
    make_daemon_synchronous(&admin).await;
    wait_for(
        "the stream to reopen at the synchronous pace",
        Duration::from_secs(20),
        || {
            let log = daemon.log();
            async move { paced(&log, "reports_every=100µs") == 1 }
        },
    )
    .await;
    let id = pgci_test_support::first_profile_id(&admin).await;
    let key = format!("profile:user:{id}");
    let mut redis = env.redis.conn().await;
    crate::support::preset(&mut redis, std::slice::from_ref(&key)).await;
    let write = synchronous_update(env.pg.client().await, id).await;
    tokio::time::timeout(Duration::from_secs(20), write)
        .await
        .expect("the synchronous commit is released")
        .expect("writer task");
    assert_eq!(
        crate::support::surviving(&mut redis, std::slice::from_ref(&key)).await,
        0,
        "released only after the invalidation was applied"
    );
    pgci_test_support::set_synchronous_standbys(&admin, "", None).await;
    wait_for(
        "the stream to reopen at the usual pace",
        Duration::from_secs(20),
        || {
            let log = daemon.log();
            async move { paced(&log, "reports_every=1ms") == 2 }
        },
    )
    .await;
    let log = daemon.log();
    assert_eq!(
        log.matches("synchronous_standby_names changed").count(),
        2,
        "one reopening each way, no more: {log}"
    );
}

/// Makes `absent`, a standby that never connects, the synchronous one,
/// caches the first profile's key and updates that profile: the commit
/// waits for the standby until the test clears the setting. Returns the
/// key and the writer's task.
async fn held_by_an_absent_standby(env: &TestEnv) -> (String, tokio::task::JoinHandle<u64>) {
    let admin = env.pg.client().await;
    pgci_test_support::set_synchronous_standbys(&admin, "absent", None).await;
    let id = pgci_test_support::first_profile_id(&admin).await;
    let key = format!("profile:user:{id}");
    crate::support::preset(&mut env.redis.conn().await, std::slice::from_ref(&key)).await;
    let writer = env.pg.client().await;
    pgci_test_support::sees_synchronous_standbys(&writer, "absent").await;
    let write = tokio::spawn(async move {
        writer
            .execute(
                "update public.profiles set bio = 'held for a standby' where id = $1::text::uuid",
                &[&id],
            )
            .await
            .expect("update")
    });
    (key, write)
}

/// A commit waits for a synchronous standby that is down (not the daemon)
/// while the daemon restarts. The daemon had decoded it, deleted its key
/// and confirmed past it (its confirmation releases nobody here), and was
/// waiting for the commit to show before the second deletion. After the
/// restart a reader fills the row it reads, rightly the old one: the
/// commit does not show yet. Once the standby's wait ends and the commit
/// shows, that fill must go, although the restarted daemon streams from
/// after the commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_held_for_another_standby_across_a_restart_is_invalidated_when_it_shows() {
    held_across_restarts(false).await;
}

/// The same with fences (`fence_until_visible`): the first pass leaves the
/// daemon's lease marker instead of deleting, and the daemon is killed
/// between its two passes. A reader's fill replaces the marker (as one
/// would once it expired), and must go once the commit shows.
#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_commit_held_across_a_kill_between_the_passes_is_invalidated_when_it_shows() {
    held_across_restarts(true).await;
}

async fn held_across_restarts(fences: bool) {
    let mut env = TestEnv::start(4).await;
    if fences {
        env.redis_extra = "fence_until_visible = true\n".to_string();
        env.write_config("");
    }
    env.setup();
    let mut daemon = env.daemon().await;
    let admin = env.pg.client().await;
    let mut redis = env.redis.conn().await;
    let (key, write) = held_by_an_absent_standby(&env).await;
    let first_pass_done = || async {
        let now: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut env.redis.conn().await)
            .await
            .expect("GET");
        match fences {
            true => now.as_deref() == Some(pgci_protocol::lease::FENCE),
            false => now.is_none(),
        }
    };
    wait_for("the first pass", Duration::from_secs(30), first_pass_done).await;
    let written: String = admin
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    wait_for(
        "the slot to confirm past the held commit",
        Duration::from_secs(30),
        || async {
            admin
                .query_one(
                    "select confirmed_flush_lsn >= $1::text::pg_lsn from pg_replication_slots \
                      where slot_name = 'pg_cache_invalidator'",
                    &[&written],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        },
    )
    .await;
    assert!(!write.is_finished(), "the commit must wait for the standby");
    // Restarted twice: the second start must not forget the commit either
    // (the first one's start-up flush recorded the slot's position).
    for _ in 0..2 {
        daemon.kill9();
        daemon = env.daemon().await;
        // What a reader reads now is the old row, and rightly so.
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("before the held commit")
            .query_async(&mut redis)
            .await
            .expect("fill");
    }
    assert!(!write.is_finished(), "the commit must still wait");
    pgci_test_support::set_synchronous_standbys(&admin, "", None).await;
    tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the writer is released")
        .expect("writer task");
    let deadline = Instant::now() + Duration::from_secs(30);
    while crate::support::surviving(&mut redis, std::slice::from_ref(&key)).await != 0 {
        assert!(
            Instant::now() < deadline,
            "the old row filled before the commit showed is still cached: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// While a commit held by a synchronous standby other than the daemon
/// does not show, the daemon waits to delete its keys a second time and
/// applies nothing after it: readiness says so, and says ready again once
/// the commit shows (its keys then go a second time).
#[tokio::test(flavor = "multi_thread")]
async fn readiness_says_when_invalidations_wait_behind_a_commit_another_standby_holds() {
    let mut env = TestEnv::start(4).await;
    env.setup();
    let daemon = env.daemon().await;
    let admin = env.pg.client().await;
    let (key, write) = held_by_an_absent_standby(&env).await;
    let port = env.http_port;
    let readyz = || async move {
        crate::support::http_get(port, "/readyz")
            .await
            .unwrap_or((0, String::new()))
    };
    let stalled = || async move {
        let (_, text) = crate::support::http_get(port, "/metrics")
            .await
            .unwrap_or((0, String::new()));
        crate::support::metric(&text, "pgci_stalled_by_held_commit")
    };
    wait_for(
        "readiness to say what waits",
        Duration::from_secs(20),
        || async {
            let (status, body) = readyz().await;
            status == 503 && body.contains("held by a synchronous standby")
        },
    )
    .await;
    assert_eq!(stalled().await, Some(1.0), "the gauge says so too");
    assert!(!write.is_finished(), "the commit must wait for the standby");
    let mut redis = env.redis.conn().await;
    crate::support::preset(&mut redis, std::slice::from_ref(&key)).await;
    pgci_test_support::set_synchronous_standbys(&admin, "", None).await;
    tokio::time::timeout(Duration::from_secs(30), write)
        .await
        .expect("the writer is released")
        .expect("writer task");
    wait_for("ready again", Duration::from_secs(20), || async {
        readyz().await.0 == 200
    })
    .await;
    assert_eq!(stalled().await, Some(0.0));
    wait_for("the second deletion", Duration::from_secs(10), || async {
        crate::support::surviving(&mut env.redis.conn().await, std::slice::from_ref(&key)).await
            == 0
    })
    .await;
    assert!(
        daemon.log().contains("not ready until they show"),
        "{}",
        daemon.log()
    );
}

/// A synchronous `COMMIT PREPARED` waits for the daemon, but the
/// visibility check cannot see that wait: the session that waits has no
/// transaction id of its own (the prepared transaction's belongs to no
/// session). Once the commit has been invisible for a second
/// (`ASSUME_HELD_AFTER_SEEN`), the daemon takes it for held by a
/// synchronous standby wait, confirms it, and the commit returns; a fill
/// made meanwhile goes once the commit shows. Without the assumption the
/// daemon would wait for the commit to show, which waits for the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn a_synchronous_commit_prepared_is_taken_for_held_after_a_second() {
    let mut env = TestEnv::start(4).await;
    env.pg
        .client()
        .await
        .batch_execute("alter system set max_prepared_transactions = 4")
        .await
        .expect("max_prepared_transactions");
    env.pg.restart().await;
    env.setup();
    let daemon = env.daemon().await;
    let admin = env.pg.client().await;
    let id = pgci_test_support::first_profile_id(&admin).await;
    let key = format!("profile:user:{id}");
    let mut redis = env.redis.conn().await;
    crate::support::preset(&mut redis, std::slice::from_ref(&key)).await;
    let writer = env.pg.client().await;
    writer
        .batch_execute(&format!(
            "begin; update public.profiles set bio = 'prepared' where id = '{id}'; \
             prepare transaction 'pgci-held'"
        ))
        .await
        .expect("prepare");
    make_daemon_synchronous(&admin).await;
    pgci_test_support::sees_synchronous_standbys(&writer, "ANY 1 (\"pg-cache-invalidator\")").await;
    let started = Instant::now();
    let commit = tokio::spawn(async move {
        writer
            .batch_execute("commit prepared 'pgci-held'")
            .await
            .expect("commit prepared");
        started.elapsed()
    });
    // While the commit waits, a reader fills the row it reads: the old one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!commit.is_finished(), "the commit must wait for the daemon");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("before the prepared commit showed")
        .query_async(&mut redis)
        .await
        .expect("fill");
    let took = tokio::time::timeout(Duration::from_secs(30), commit)
        .await
        .unwrap_or_else(|_| panic!("the commit was never released: {}", daemon.log()))
        .expect("commit task");
    assert!(
        took >= Duration::from_millis(900),
        "released after {took:?}: the wait was seen after all, so this test no longer covers the assumption"
    );
    wait_for("the second deletion", Duration::from_secs(10), || async {
        crate::support::surviving(&mut env.redis.conn().await, std::slice::from_ref(&key)).await
            == 0
    })
    .await;
}
