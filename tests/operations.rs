//! Running it in production: metrics and health endpoints, heartbeats,
//! recovery from a lost slot, and a standby that takes over.

use std::time::{Duration, Instant};

use crate::support::{
    http_get, metric, metric_sum, preset, slot_active, surviving, wait_for, TestEnv,
};

async fn scrape(env: &TestEnv) -> String {
    let (status, body) = http_get(env.http_port, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

async fn status_of(port: u16, path: &str) -> u16 {
    http_get(port, path).await.map_or(0, |(status, _)| status)
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

/// After a workload, /metrics shows exactly the changes applied, keys,
/// events, batches, latency, the last commit time, heartbeats and slot
/// gauges; /healthz stays up through a Redis outage while /readyz reports
/// it, and recovers with Redis.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_follow_the_workload() {
    let mut env = TestEnv::start(20).await;
    env.write_config("[replication]\nheartbeat_interval = \"1s\"\n");
    env.setup();
    let _daemon = env.daemon().await;
    wait_for("readyz", Duration::from_secs(10), || async {
        status_of(env.http_port, "/readyz").await == 200
    })
    .await;
    assert_eq!(status_of(env.http_port, "/healthz").await, 200);

    let client = env.pg.client().await;
    client
        .batch_execute(
            "update public.user_tokens set balance = balance + 1 \
              where id in (select id from public.user_tokens order by id limit 10); \
             update public.profiles set bio = 'a' where id in (select id from public.profiles order by id limit 3);",
        )
        .await
        .expect("workload");
    env.sync().await;
    let text = scrape(&env).await;
    let get = |series: &str| metric(&text, series);
    assert_eq!(
        get("pgci_changes_total{table=\"public.user_tokens\",op=\"update\"}"),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        get("pgci_changes_total{table=\"public.profiles\",op=\"update\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        get("pgci_changes_total{table=\"public.pillars\",op=\"insert\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        get("pgci_keys_invalidated_total"),
        Some(10.0 * 2.0 + 3.0 + 1.0),
        "{text}"
    );
    assert_eq!(get("pgci_events_published_total"), Some(14.0), "{text}");
    assert!(get("pgci_batches_total").unwrap_or(0.0) >= 1.0, "{text}");
    assert!(
        get("pgci_apply_latency_seconds_count").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert!(
        get("pgci_apply_latency_seconds_bucket{le=\"1\"}").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    let last_commit = get("pgci_last_applied_commit_timestamp_seconds").expect("last commit gauge");
    assert!((now_unix() - last_commit).abs() < 60.0, "{last_commit}");
    assert_eq!(get("pgci_streaming"), Some(1.0));
    assert!(
        get("pgci_confirmed_lsn_bytes").unwrap_or(0.0) > 0.0,
        "{text}"
    );

    // Heartbeats arrive every second and report the slot's retained WAL.
    wait_for("a heartbeat", Duration::from_secs(10), || async {
        let text = scrape(&env).await;
        metric(&text, "pgci_last_heartbeat_timestamp_seconds").is_some_and(|t| now_unix() - t < 5.0)
            && metric(&text, "pgci_slot_retained_wal_bytes").is_some()
    })
    .await;
    let text = scrape(&env).await;
    let rtt = metric(&text, "pgci_heartbeat_rtt_seconds").expect("rtt");
    assert!((0.0..5.0).contains(&rtt), "{rtt}");

    // Redis down: liveness holds, readiness fails once a write is retried.
    env.redis.kill();
    client
        .batch_execute("update public.profiles set bio = 'b' where id in (select id from public.profiles order by id limit 1)")
        .await
        .expect("write");
    wait_for("readyz to fail", Duration::from_secs(20), || async {
        status_of(env.http_port, "/readyz").await == 503
    })
    .await;
    assert_eq!(status_of(env.http_port, "/healthz").await, 200);
    let text = scrape(&env).await;
    assert!(
        metric_sum(&text, "pgci_redis_errors_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    env.redis.restart().await;
    wait_for("readyz to recover", Duration::from_secs(20), || async {
        status_of(env.http_port, "/readyz").await == 200
    })
    .await;
}

/// Keys every rule can produce, plus one no rule matches.
async fn preset_rule_keys(env: &TestEnv) -> Vec<String> {
    let client = env.pg.client().await;
    let rows = client
        .query(
            "select user_id::text, token_id::text from public.user_tokens",
            &[],
        )
        .await
        .expect("rows");
    let mut keys = Vec::new();
    for r in &rows {
        let (user, token): (String, String) = (r.get(0), r.get(1));
        keys.push(format!("balance:user:{user}:token:{token}"));
        keys.push(format!("balance:user:{user}"));
        keys.push(format!("profile:user:{user}"));
        keys.push(format!("journey:user:{user}"));
    }
    keys.sort();
    keys.dedup();
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &keys).await;
    preset(&mut redis, &["unrelated:key".to_string()]).await;
    keys
}

async fn slot_resets(env: &TestEnv) -> f64 {
    metric(&scrape(env).await, "pgci_slot_resets_total").unwrap_or(0.0)
}

/// Someone drops the slot under a running daemon: it logs an error,
/// recreates the slot, flushes every key its rules can produce (and no
/// other), counts the reset, and keeps invalidating new changes.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_slot_is_recreated_and_every_rule_key_flushed() {
    let mut env = TestEnv::start(50).await;
    env.setup();
    let daemon = env.daemon().await;
    let keys = preset_rule_keys(&env).await;
    let client = env.pg.client().await;

    crate::support::drop_slot_under_daemon(&client).await;

    let mut redis = env.redis.conn().await;
    wait_for(
        "every rule key to be flushed",
        Duration::from_secs(30),
        || {
            let mut redis = redis.clone();
            let keys = &keys;
            async move { surviving(&mut redis, keys).await == 0 }
        },
    )
    .await;
    assert_eq!(
        surviving(&mut redis, &["unrelated:key".to_string()]).await,
        1
    );
    wait_for(
        "the slot to be streamed again",
        Duration::from_secs(20),
        || async { slot_active(&client).await },
    )
    .await;
    assert_eq!(slot_resets(&env).await, 1.0);
    assert!(
        daemon.log().contains("replication slot recreated"),
        "{}",
        daemon.log()
    );

    // The new slot carries new changes.
    let user: String = client
        .query_one("select id::text from public.profiles limit 1", &[])
        .await
        .expect("user")
        .get(0);
    let key = format!("profile:user:{user}");
    preset(&mut redis, std::slice::from_ref(&key)).await;
    client
        .execute(
            "update public.profiles set bio = 'after' where id = $1::text::uuid",
            &[&user],
        )
        .await
        .expect("update");
    env.sync().await;
    assert_eq!(surviving(&mut redis, &[key]).await, 0);
}

/// The slot is invalidated by max_slot_wal_keep_size while the daemon is
/// stopped (wal_status = lost): on start it recreates the slot, flushes
/// every rule key, and streams again.
#[tokio::test(flavor = "multi_thread")]
async fn invalidated_slot_is_recreated_and_every_rule_key_flushed() {
    let mut env = TestEnv::start(50).await;
    env.setup();
    let client = env.pg.client().await;
    for sql in [
        "alter system set max_slot_wal_keep_size = '1MB'",
        "select pg_reload_conf()",
        "create table public.filler (id serial primary key, payload text)",
    ] {
        client.batch_execute(sql).await.expect("configure");
    }
    let keys = preset_rule_keys(&env).await;
    // Changes the daemon will never see, then enough WAL to lose the slot.
    client
        .batch_execute("update public.profiles set bio = 'missed'")
        .await
        .expect("missed change");
    let mut status = String::new();
    for _ in 0..10 {
        for sql in [
            "insert into public.filler (payload) select repeat('x', 1000) from generate_series(1, 2000)",
            "select pg_switch_wal()",
            "checkpoint",
        ] {
            client.batch_execute(sql).await.expect("generate wal");
        }
        status = client
            .query_one(
                "select coalesce(wal_status, '') from pg_replication_slots where slot_name = 'pg_cache_invalidator'",
                &[],
            )
            .await
            .expect("slot")
            .get(0);
        if status == "lost" {
            break;
        }
    }
    assert_eq!(status, "lost", "could not invalidate the slot");

    let out = env.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is lost"));

    let daemon = env.daemon().await;
    let mut redis = env.redis.conn().await;
    wait_for(
        "every rule key to be flushed",
        Duration::from_secs(30),
        || {
            let mut redis = redis.clone();
            let keys = &keys;
            async move { surviving(&mut redis, keys).await == 0 }
        },
    )
    .await;
    assert_eq!(
        surviving(&mut redis, &["unrelated:key".to_string()]).await,
        1
    );
    assert_eq!(slot_resets(&env).await, 1.0, "{}", daemon.log());
    env.sync().await;
}

/// Two instances with the same config: one streams, the other waits
/// (not ready); after kill -9 of the first, the second takes over within
/// 10 s and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn standby_takes_over_within_ten_seconds() {
    let mut env = TestEnv::start(50).await;
    env.setup();
    let mut first = env.daemon().await;
    let client = env.pg.client().await;
    let first_pid: i32 = client
        .query_one(
            "select active_pid from pg_replication_slots where slot_name = 'pg_cache_invalidator'",
            &[],
        )
        .await
        .expect("pid")
        .get(0);

    let first_port = env.http_port;
    env.http_port = crate::support::free_port();
    env.write_config("");
    let second = env.spawn_daemon();
    wait_for(
        "the standby to wait for the slot",
        Duration::from_secs(20),
        || async { second.log().contains("in use by another session") },
    )
    .await;
    assert_eq!(status_of(env.http_port, "/readyz").await, 503);
    assert_eq!(status_of(first_port, "/readyz").await, 200);

    let keys = preset_rule_keys(&env).await;
    first.kill9();
    let killed = Instant::now();
    // Changes while nobody streams.
    client
        .batch_execute("update public.user_tokens set balance = balance + 1; update public.profiles set bio = 'x'")
        .await
        .expect("writes");
    wait_for("the standby to take the slot", Duration::from_secs(15), || async {
        client
            .query_opt(
                "select 1 from pg_replication_slots where slot_name = 'pg_cache_invalidator' and active and active_pid <> $1",
                &[&first_pid],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    let took = killed.elapsed();
    eprintln!("standby took over {took:?} after kill -9");
    assert!(took < Duration::from_secs(10), "takeover took {took:?}");
    env.sync().await;
    let mut redis = env.redis.conn().await;
    let balance_and_profile: Vec<String> = keys
        .into_iter()
        .filter(|k| !k.starts_with("journey:"))
        .collect();
    assert_eq!(surviving(&mut redis, &balance_and_profile).await, 0);
    wait_for("standby ready", Duration::from_secs(10), || async {
        status_of(env.http_port, "/readyz").await == 200
    })
    .await;
}

/// With no traffic at all, `/readyz` still notices that Redis went away
/// (the sink pings it while idle) and recovers when it is back.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_redis_while_idle() {
    let mut env = TestEnv::start(1).await;
    env.write_config("[replication]\nheartbeat_interval = \"0s\"\n");
    env.setup();
    let _daemon = env.daemon().await;
    let port = env.http_port;
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(20)).await;
    env.redis.kill();
    wait_for(
        "not ready without redis",
        Duration::from_secs(10),
        || async move { status_of(port, "/readyz").await == 503 },
    )
    .await;
    assert_eq!(status_of(port, "/healthz").await, 200, "still alive");
    env.redis.restart().await;
    crate::support::wait_status("ready again", port, "/readyz", 200, Duration::from_secs(20)).await;
}

/// The slot is dropped while the daemon is stopped (an operator stopping
/// WAL growth) and `setup` creates a fresh one: the change made in between
/// is in neither slot. Redis's record of the applied position is behind the
/// new slot, so the next `run` flushes every rule key before streaming, and
/// the stale key is gone. A plain restart, whose record covers the slot,
/// flushes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn changes_missed_through_a_recreated_slot_are_flushed_at_start() {
    let mut env = TestEnv::start(20).await;
    env.setup();
    let mut daemon = env.daemon().await;
    let client = env.pg.client().await;
    let user: String = client
        .query_one("select id::text from public.profiles limit 1", &[])
        .await
        .expect("user")
        .get(0);
    let key = format!("profile:user:{user}");
    let mut redis = env.redis.conn().await;
    client
        .execute(
            "update public.profiles set bio = 'applied' where id = $1::text::uuid",
            &[&user],
        )
        .await
        .expect("update");
    env.sync().await;
    assert!(daemon.terminate().await.success(), "{}", daemon.log());

    // A plain restart: nothing was missed, nothing is flushed.
    preset(&mut redis, std::slice::from_ref(&key)).await;
    let mut daemon = env.daemon().await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, std::slice::from_ref(&key)).await, 1);
    assert!(
        !daemon.log().contains("flushing every key"),
        "{}",
        daemon.log()
    );
    assert!(daemon.terminate().await.success());

    // The app caches the row, it changes while the daemon is stopped, and
    // the slot that held the change is dropped and made anew by setup.
    preset(&mut redis, std::slice::from_ref(&key)).await;
    client
        .execute(
            "update public.profiles set bio = 'missed' where id = $1::text::uuid",
            &[&user],
        )
        .await
        .expect("update");
    // The stopped daemon's walsender may take a moment to let go of the
    // slot (seen once in CI: "is active for PID …").
    crate::support::wait_for(
        "the stopped daemon's walsender to release the slot",
        std::time::Duration::from_secs(30),
        || async { !crate::support::slot_active(&client).await },
    )
    .await;
    client
        .execute(
            "select pg_drop_replication_slot('pg_cache_invalidator')",
            &[],
        )
        .await
        .expect("drop slot");
    let out = env.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    env.setup();
    let covers = |env: &TestEnv| {
        let out = env.cli(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
        status["recorded_covers_slot"].clone()
    };
    assert_eq!(
        covers(&env),
        serde_json::json!(false),
        "status shows the gap"
    );
    let daemon = env.daemon().await;
    env.sync().await;
    assert_eq!(
        surviving(&mut redis, std::slice::from_ref(&key)).await,
        0,
        "the key the missed change made stale survived: {}",
        daemon.log()
    );
    assert!(daemon.log().contains("behind the slot"), "{}", daemon.log());
    assert_eq!(
        covers(&env),
        serde_json::json!(true),
        "and that it is closed"
    );
}

/// Drift while running: a migration drops a watched table from the
/// publication, or resets a table's replica identity so deletes no longer
/// carry its key columns. Within a heartbeat the daemon flushes that
/// table's keys, logs an error naming the table and the fix, and reports
/// not ready; once the catalog is right again it flushes once more (changes
/// in between were missed) and is ready.
#[tokio::test(flavor = "multi_thread")]
async fn drift_while_running_is_flushed_logged_and_not_ready() {
    let mut env = TestEnv::start(10).await;
    env.write_config("[replication]\nheartbeat_interval = \"1s\"\n");
    env.setup();
    let daemon = env.daemon().await;
    let port = env.http_port;
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(20)).await;
    let client = env.pg.client().await;
    let profiles: Vec<String> = client
        .query("select 'profile:user:' || id from public.profiles", &[])
        .await
        .expect("profiles")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut redis = env.redis.conn().await;

    for (break_it, fix_it, names) in [
        (
            "alter publication pg_cache_invalidator drop table public.profiles",
            "alter publication pg_cache_invalidator add table public.profiles",
            "ALTER PUBLICATION",
        ),
        (
            "alter table public.profiles replica identity nothing",
            "alter table public.profiles replica identity default",
            "REPLICA IDENTITY",
        ),
    ] {
        preset(&mut redis, &profiles).await;
        client.batch_execute(break_it).await.expect("drift");
        wait_for(
            "not ready after drift",
            Duration::from_secs(15),
            || async move { status_of(port, "/readyz").await == 503 },
        )
        .await;
        wait_for(
            "the table's keys to be flushed",
            Duration::from_secs(15),
            || {
                let mut redis = redis.clone();
                let profiles = profiles.clone();
                async move { surviving(&mut redis, &profiles).await == 0 }
            },
        )
        .await;
        let log = daemon.log();
        assert!(
            log.contains("public.profiles") && log.contains(names),
            "the error names the table and the fix: {log}"
        );
        preset(&mut redis, &profiles).await;
        client.batch_execute(fix_it).await.expect("fix");
        crate::support::wait_status("ready again", port, "/readyz", 200, Duration::from_secs(15))
            .await;
        wait_for("a flush on recovery", Duration::from_secs(15), || {
            let mut redis = redis.clone();
            let profiles = profiles.clone();
            async move { surviving(&mut redis, &profiles).await == 0 }
        })
        .await;
    }
}

/// A replica identity reset by a migration is seen in the stream itself,
/// before the first change made under it: with heartbeats (and so the
/// catalog check) off, a rule keyed on `username` loses the old username
/// of the next key change, yet that key is flushed, the log names the fix
/// and /readyz fails; once the identity is right again and the table's
/// next change shows it, the daemon is ready and flushes once more.
#[tokio::test(flavor = "multi_thread")]
async fn identity_drift_is_read_from_the_stream() {
    let mut env = TestEnv::start(5).await;
    env.write_config(
        "[replication]\nheartbeat_interval = \"0s\"\n\n\
         [[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile:username:{username}\"]\naction = \"delete\"\n",
    );
    env.setup();
    let daemon = env.daemon().await;
    let port = env.http_port;
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(20)).await;
    let client = env.pg.client().await;
    let row = client
        .query_one(
            "select id::text, username from public.profiles where username is not null order by id limit 1",
            &[],
        )
        .await
        .expect("a profile");
    let (id, username): (String, String) = (row.get(0), row.get(1));
    let old_key = format!("profile:username:{username}");
    let mut redis = env.redis.conn().await;
    preset(&mut redis, std::slice::from_ref(&old_key)).await;

    client
        .batch_execute("alter table public.profiles replica identity default")
        .await
        .expect("reset the identity");
    client
        .execute(
            "update public.profiles set username = username || '-renamed' where id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("rename");
    env.sync().await;
    assert_eq!(
        surviving(&mut redis, std::slice::from_ref(&old_key)).await,
        0,
        "the old username's key must be flushed: {}",
        daemon.log()
    );
    assert_eq!(status_of(port, "/readyz").await, 503);
    let log = daemon.log();
    assert!(
        log.contains("public.profiles") && log.contains("REPLICA IDENTITY"),
        "the error names the table and the fix: {log}"
    );

    preset(&mut redis, std::slice::from_ref(&old_key)).await;
    client
        .batch_execute(
            "alter table public.profiles replica identity full; \
             update public.profiles set bio = 'back' where id = (select id from public.profiles order by id limit 1)",
        )
        .await
        .expect("fix");
    crate::support::wait_status("ready again", port, "/readyz", 200, Duration::from_secs(15)).await;
    env.sync().await;
    assert_eq!(
        surviving(&mut redis, std::slice::from_ref(&old_key)).await,
        0
    );
}

/// What Prometheus users expect of any exporter: `pgci_build_info` with
/// the version and the commit `--version` prints, and process metrics
/// (resident memory, CPU seconds, open file descriptors).
#[tokio::test(flavor = "multi_thread")]
async fn build_info_and_process_metrics_are_exported() {
    let mut env = TestEnv::start(1).await;
    env.setup();
    let _daemon = env.daemon().await;
    let version = std::process::Command::new(crate::support::daemon_bin())
        .arg("--version")
        .output()
        .expect("--version");
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    // "pg-cache-invalidator 0.1.0 (0123456789ab)"
    let commit = version
        .rsplit_once(" (")
        .and_then(|(_, c)| c.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no commit in {version:?}"))
        .to_string();
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(git) = git {
        assert_eq!(commit, git, "--version names another commit than HEAD");
    }
    let text = scrape(&env).await;
    assert_eq!(
        metric(
            &text,
            &format!(
                "pgci_build_info{{version=\"{}\",commit=\"{commit}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(&text, "process_resident_memory_bytes").is_some_and(|v| v > 1e6),
        "{text}"
    );
    assert!(
        // Whole seconds (the metrics crate's counters are integers).
        metric(&text, "process_cpu_seconds_total").is_some_and(|v| v >= 0.0),
        "{text}"
    );
    assert!(
        metric(&text, "process_open_fds").is_some_and(|v| v >= 3.0),
        "{text}"
    );
}

/// Once a replica identity the stream described as wrong is put right,
/// the next catalog check makes the daemon ready (and flushes the table
/// once more) without waiting for the table's next change: /readyz stayed
/// 503 until the next change to the table (over 30 s seen).
#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_identity_is_ready_without_waiting_for_a_change() {
    let mut env = TestEnv::start(5).await;
    env.write_config(
        "[replication]\nheartbeat_interval = \"1s\"\n\n\
         [[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile:username:{username}\"]\naction = \"delete\"\n",
    );
    env.setup();
    let daemon = env.daemon().await;
    let port = env.http_port;
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(20)).await;
    let client = env.pg.client().await;
    client
        .batch_execute(
            "alter table public.profiles replica identity default; \
             update public.profiles set username = username || '-renamed' \
              where id = (select id from public.profiles order by id limit 1)",
        )
        .await
        .expect("reset the identity and rename");
    env.sync().await;
    assert_eq!(status_of(port, "/readyz").await, 503, "{}", daemon.log());
    client
        .batch_execute("alter table public.profiles replica identity full")
        .await
        .expect("fix");
    crate::support::wait_status(
        "ready again without a change to the table",
        port,
        "/readyz",
        200,
        Duration::from_secs(10),
    )
    .await;
}

/// A key column renamed and renamed back (a migration rolled back) with
/// changes in between: the daemon does not stop (it stopped, and every
/// start replayed the old description and stopped again, naming a column
/// that existed again); the changes made while the column was missing
/// flush the table's keys, and the daemon is ready afterwards and keeps
/// invalidating; a restart replays nothing that stops it.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_column_renamed_and_back_flushes_and_keeps_going() {
    let mut env = TestEnv::start(5).await;
    env.write_config(
        "[replication]\nheartbeat_interval = \"1s\"\n\n\
         [[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile:username:{username}\"]\naction = \"delete\"\n",
    );
    env.setup();
    let mut daemon = env.daemon().await;
    let port = env.http_port;
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(20)).await;
    let client = env.pg.client().await;
    let names: Vec<String> = client
        .query("select 'profile:username:' || username from public.profiles where username is not null", &[])
        .await
        .expect("profiles")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &names).await;
    client
        .batch_execute(
            "alter table public.profiles rename column username to uname; \
             update public.profiles set bio = 'renamed'; \
             alter table public.profiles rename column uname to username",
        )
        .await
        .expect("rename and back");
    env.sync().await;
    assert_eq!(surviving(&mut redis, &names).await, 0, "{}", daemon.log());
    assert!(
        daemon.try_status().is_none(),
        "the daemon stopped: {}",
        daemon.log()
    );
    crate::support::wait_status("ready again", port, "/readyz", 200, Duration::from_secs(15)).await;
    // Invalidation goes on, also after a restart that replays the change.
    assert!(daemon.terminate().await.success());
    let mut daemon = env.daemon().await;
    preset(&mut redis, &names).await;
    client
        .batch_execute("update public.profiles set bio = 'after'")
        .await
        .expect("update");
    env.sync().await;
    assert_eq!(surviving(&mut redis, &names).await, 0, "{}", daemon.log());
    assert!(daemon.try_status().is_none(), "{}", daemon.log());
}

/// A watched table dropped from the publication and added back between two
/// catalog checks, with changes in between (never streamed): the next
/// check sees its membership record is a new one and flushes the table's
/// keys. Before, the keys stayed stale, ready, nothing logged.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_dropped_from_the_publication_and_added_back_is_flushed() {
    let mut env = TestEnv::start(20).await;
    env.write_config("[replication]\nheartbeat_interval = \"1s\"\n");
    env.setup();
    let daemon = env.daemon().await;
    let port = env.http_port;
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(20)).await;
    // A heartbeat arrived, so a catalog check (which comes first in each
    // round) has recorded the membership the next one compares with.
    wait_for("a heartbeat", Duration::from_secs(20), || async move {
        crate::support::http_get(port, "/metrics")
            .await
            .is_some_and(|(_, text)| text.contains("pgci_last_heartbeat_timestamp_seconds "))
    })
    .await;
    let client = env.pg.client().await;
    let profiles: Vec<String> = client
        .query("select 'profile:user:' || id from public.profiles", &[])
        .await
        .expect("profiles")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &profiles).await;
    client
        .batch_execute(
            "alter publication pg_cache_invalidator drop table public.profiles; \
             update public.profiles set bio = 'unseen'; \
             alter publication pg_cache_invalidator add table public.profiles",
        )
        .await
        .expect("drop, update, add");
    wait_for(
        "the table's keys to be flushed",
        Duration::from_secs(15),
        || {
            let mut redis = redis.clone();
            let profiles = profiles.clone();
            async move { surviving(&mut redis, &profiles).await == 0 }
        },
    )
    .await;
    let log = daemon.log();
    assert!(log.contains("left the publication and came back"), "{log}");
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(10)).await;
}

/// 300 clients that open a connection to the HTTP listener and trickle a
/// header line every 2 s cannot hold the daemon's file descriptors: it
/// keeps at most 64 connections open (its descriptors stay bounded),
/// closes each within the 5 s header timeout, and streams and answers
/// /readyz meanwhile. Before, all 300 stayed open, and under `ulimit -n
/// 256` the replication stream failed with "Too many open files".
#[tokio::test(flavor = "multi_thread")]
async fn slow_http_clients_cannot_hold_the_daemon_s_descriptors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = TestEnv::start(5).await;
    env.setup();
    let daemon = env.daemon().await;
    let port = env.http_port;
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(20)).await;
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let pid = daemon.pid().expect("running");
    let before = fds(pid);
    let mut clients = Vec::new();
    for _ in 0..300 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = stream.write_all(b"GET / HTTP/1.1\r\n").await;
            clients.push(stream);
        }
    }
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let mut closed = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            for stream in &mut clients {
                let _ = stream.write_all(b"X-Slow: 1\r\n").await;
            }
        }
        for stream in &mut clients {
            let mut buf = [0u8; 64];
            if matches!(
                tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await,
                Ok(Ok(0) | Err(_))
            ) {
                closed += 1;
            }
        }
        (closed, clients.len())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = fds(pid);
    assert!(
        during <= before + 70,
        "{during} descriptors open with 300 slow clients (before: {before})"
    );
    // The stream goes on.
    env.sync().await;
    let (closed, opened) = trickle.await.expect("clients");
    assert_eq!(
        closed,
        opened,
        "connections still open after {:?}",
        started.elapsed()
    );
    crate::support::wait_status("ready", port, "/readyz", 200, Duration::from_secs(10)).await;
}

/// `pgci_stream_send_delay_seconds` is the time a commit spent inside
/// PostgreSQL before the server sent it: a change committed while the
/// daemon is down waits there until it starts (over a second here), while
/// one committed once it streams is sent at once; `pgci_batch_seconds`
/// counts the sink's batches, and `pgci_confirm_report_wait_seconds` the
/// wait of each confirmation for its report to the server.
#[tokio::test(flavor = "multi_thread")]
async fn the_time_a_commit_waits_inside_postgres_is_measured_apart() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let client = env.pg.client().await;
    client
        .batch_execute("update public.profiles set bio = 'waited' where id in (select id from public.profiles order by id limit 1)")
        .await
        .expect("update while the daemon is down");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _daemon = env.daemon().await;
    env.sync().await;
    let text = scrape(&env).await;
    let get = |series: &str| metric(&text, series).unwrap_or(0.0);
    let count = get("pgci_stream_send_delay_seconds_count");
    assert!(count >= 2.0, "{text}");
    assert!(
        get("pgci_stream_send_delay_seconds_sum") >= 1.5,
        "the change committed while the daemon was down waited 1.5 s: {text}"
    );
    assert!(
        count - get("pgci_stream_send_delay_seconds_bucket{le=\"1\"}") >= 1.0,
        "{text}"
    );
    assert!(
        get("pgci_stream_send_delay_seconds_bucket{le=\"1\"}") >= 1.0,
        "the sync's own change was sent at once: {text}"
    );
    assert!(get("pgci_batch_seconds_count") >= 1.0, "{text}");
    assert!(
        get("pgci_confirm_report_wait_seconds_count") >= 1.0,
        "each confirmation's wait for its report is measured: {text}"
    );
}
