//! What the caching plan asks of Redis itself: hit/miss, memory, eviction
//! and persistence exported from `INFO`, and warnings for the settings the
//! plan asks for (an LRU policy under a memory limit, snapshots, an 80 %
//! hit ratio) in `check-config`, `status` and the daemon's log.

use std::time::Duration;

use crate::support::{http_get, metric, metric_sum, wait_for, TestEnv};

async fn scrape(port: u16) -> String {
    http_get(port, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// Hits and misses move after GETs, memory is non-zero, the policy and
/// persistence are reported, every `info_interval`.
#[tokio::test(flavor = "multi_thread")]
async fn redis_info_is_exported_as_metrics() {
    let mut env = TestEnv::start(1).await;
    env.write_config("");
    let config = std::fs::read_to_string(&env.config).expect("config");
    std::fs::write(
        &env.config,
        config.replacen("[redis]\n", "[redis]\ninfo_interval = \"200ms\"\n", 1),
    )
    .expect("config");
    env.setup();
    let _daemon = env.daemon().await;
    let target = format!("127.0.0.1:{}", env.redis.port);
    let series = |name: &str| format!("{name}{{target=\"{target}\"}}");
    let port = env.http_port;
    wait_for("redis metrics", Duration::from_secs(20), || async {
        metric(&scrape(port).await, &series("pgci_redis_memory_used_bytes")).is_some()
    })
    .await;
    let before = scrape(port).await;
    let hits = metric(&before, &series("pgci_redis_keyspace_hits_total")).expect("hits");
    let misses = metric(&before, &series("pgci_redis_keyspace_misses_total")).expect("misses");
    assert!(metric(&before, &series("pgci_redis_memory_used_bytes")).expect("used") > 0.0);
    assert_eq!(
        metric(&before, &series("pgci_redis_memory_max_bytes")),
        Some(0.0),
        "the test server has no maxmemory"
    );
    assert_eq!(
        metric(
            &before,
            &format!("pgci_redis_maxmemory_policy{{target=\"{target}\",policy=\"noeviction\"}}")
        ),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        metric(&before, &series("pgci_redis_aof_enabled")),
        Some(0.0)
    );
    assert!(metric_sum(&before, "pgci_redis_connected_clients").expect("clients") >= 1.0);

    let mut redis = env.redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg("app:hit")
        .arg("1")
        .query_async(&mut redis)
        .await
        .expect("set");
    for _ in 0..7 {
        let _: Option<String> = redis::cmd("GET")
            .arg("app:hit")
            .query_async(&mut redis)
            .await
            .expect("get");
    }
    for _ in 0..5 {
        let _: Option<String> = redis::cmd("GET")
            .arg("app:miss")
            .query_async(&mut redis)
            .await
            .expect("get");
    }
    wait_for(
        "hits and misses to move",
        Duration::from_secs(10),
        || async {
            let now = scrape(port).await;
            metric(&now, &series("pgci_redis_keyspace_hits_total")).unwrap_or(0.0) >= hits + 7.0
                && metric(&now, &series("pgci_redis_keyspace_misses_total")).unwrap_or(0.0)
                    >= misses + 5.0
        },
    )
    .await;
}

/// `check-config` and `status` warn (never fail) about no maxmemory, a
/// noeviction policy under a limit, no persistence, and a hit ratio under
/// 80 %; once Redis is set as the plan asks, the warnings go.
#[tokio::test(flavor = "multi_thread")]
async fn the_plan_s_redis_settings_are_checked() {
    let env = TestEnv::start(1).await;
    env.write_config("");
    env.setup();
    let mut redis = env.redis.conn().await;
    // 1 hit, 1,499 misses.
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("1")
        .query_async(&mut redis)
        .await
        .expect("set");
    let _: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut redis)
        .await
        .expect("get");
    for i in 0..1499 {
        let _: Option<String> = redis::cmd("GET")
            .arg(format!("missing:{i}"))
            .query_async(&mut redis)
            .await
            .expect("get");
    }
    let warnings = |out: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let out = env.cli(&["check-config"]);
    let text = warnings(&out);
    assert!(out.status.success(), "warnings only: {text}");
    assert!(text.contains("warning: redis has no maxmemory"), "{text}");
    assert!(text.contains("warning: redis persists nothing"), "{text}");
    assert!(
        text.contains("hit ratio since its last restart is 0 %"),
        "{text}"
    );

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("64mb")
        .query_async(&mut redis)
        .await
        .expect("maxmemory");
    let out = env.cli(&["status"]);
    let text = warnings(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning: redis runs maxmemory-policy noeviction"),
        "{text}"
    );
    assert!(text.contains("redis_policy    noeviction"), "{text}");

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut redis)
        .await
        .expect("policy");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("save")
        .arg("900 1")
        .query_async(&mut redis)
        .await
        .expect("save");
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut redis)
        .await
        .expect("resetstat");
    let out = env.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(json["redis"]["maxmemory_policy"], "allkeys-lru", "{json}");
    assert_eq!(json["redis"]["warnings"], serde_json::json!([]), "{json}");
    let out = env.cli(&["check-config"]);
    assert!(
        !warnings(&out).contains("warning: redis"),
        "{}",
        warnings(&out)
    );
}

/// The daemon runs under exactly the user `redis-acl` prints for its rules
/// (on a real redis-server started with `--aclfile`): an update invalidates
/// and announces, a refresh rule writes values and versions, a TRUNCATE
/// flushes by SCAN, the events are numbered and kept in a stream, and it
/// restarts and loads the lease functions — all
/// without a refused command; what the list leaves out is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_runs_under_its_least_privilege_user() {
    use crate::support::{removed_by, users};
    use pgci_test_support::redis_server::Redis;
    let mut env = TestEnv::start(20).await;
    // Events numbered from their record and kept in a stream too.
    env.redis_extra = "stream = \"pgci-events\"\n".to_string();
    let refresh = "[[rules]]\ntable = \"public.pillars\"\nkeys = [\"pillar:{slug}\"]\naction = \"refresh\"\nttl = \"1h\"\n";
    let url = |port: u16| format!("redis://pgci:s3cr%40t@127.0.0.1:{port}/0");
    env.redis_url_override = Some(url(env.redis.port));
    env.write_config(refresh);
    let out = redis_acl(&env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(line.starts_with("user pgci on #"), "{line}");
    assert!(!line.contains("s3cr"), "the password is printed: {line}");
    env.redis = Redis::start_with_acl(&line).await;
    env.redis_url_override = Some(url(env.redis.port));
    env.write_config(refresh);
    env.setup();
    let mut daemon = env.daemon().await;

    let u = users(&env, 3).await;
    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "update public.profiles set bio = 'acl' where id = '{}'",
            u[0].id
        ),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{}", u[0].id)]);
    let client = env.pg.client().await;
    client
        .batch_execute("update public.pillars set slug = slug where slug = 'individual'")
        .await
        .expect("refresh");
    env.sync().await;
    let mut admin = env.redis.conn().await;
    let kept: usize = redis::cmd("XLEN")
        .arg("pgci-events")
        .query_async(&mut admin)
        .await
        .expect("xlen");
    assert!(kept >= 2, "the events are kept in the stream: {kept}");
    let cached: Option<String> = redis::cmd("GET")
        .arg("pillar:individual")
        .query_async(&mut admin)
        .await
        .expect("get");
    assert!(
        cached.is_some_and(|v| v.contains("individual")),
        "refreshed value missing"
    );
    let keys = vec![format!("journey:user:{}", u[1].id)];
    crate::support::preset(&mut admin, &keys).await;
    client
        .batch_execute("truncate public.user_journeys")
        .await
        .expect("truncate");
    env.sync().await;
    assert_eq!(
        crate::support::surviving(&mut admin, &keys).await,
        0,
        "truncate flush"
    );
    // A restart: position record, lease functions, INFO.
    assert!(daemon.terminate().await.success());
    let mut daemon = env.daemon().await;
    env.sync().await;
    assert!(daemon.terminate().await.success());
    let log = daemon.log();
    let lower = log.to_lowercase();
    assert!(
        !lower.contains("noperm")
            && !lower.contains("no permissions")
            && !log.contains("redis batch failed"),
        "{log}"
    );
    // The user may not run CONFIG (as on managed services): said once,
    // and nothing else breaks.
    assert_eq!(log.matches("refuses CONFIG GET save").count(), 1, "{log}");

    // What the user may not do.
    let restricted = redis::Client::open(url(env.redis.port)).expect("client");
    let mut conn = restricted
        .get_multiplexed_async_connection()
        .await
        .expect("connect as pgci");
    for refused in [
        redis::cmd("FLUSHALL"),
        redis::cmd("CONFIG").arg("GET").arg("requirepass").clone(),
        redis::cmd("GET").arg("session:other-app").clone(),
        redis::cmd("KEYS").arg("*").clone(),
    ] {
        let answer: redis::RedisResult<redis::Value> = refused.query_async(&mut conn).await;
        let error = answer.expect_err("refused");
        assert!(
            error.to_string().to_lowercase().contains("no permissions"),
            "{error}"
        );
    }
}

/// `redis-acl` for the harness's server (`--redis-version` from its
/// `--version`: Redis 6.2 refuses a line naming FUNCTION).
fn redis_acl(env: &TestEnv) -> std::process::Output {
    let args = pgci_test_support::redis_acl_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.cli(&args)
}

/// `deploy/redis/users.acl` (Redis 7+, Valkey) and `users-redis6.acl`
/// (Redis 6.2) hold what `redis-acl` prints for the demo rules (password
/// `change-me`), and an `app` user under which the client library's lease
/// reads, fills and write-token reads work (it loads the lease functions
/// itself on a fresh server) while the daemon runs under its own user; the
/// app user may not write the daemon's bookkeeping.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_acl_file_serves_the_daemon_and_the_app() {
    use pgci_client::{write_token, Cache, CacheOptions, Source};
    use pgci_test_support::redis_server::Redis;
    let file = if pgci_test_support::redis_server_version() < (7, 0) {
        "users-redis6.acl"
    } else {
        "users.acl"
    };
    let shipped = std::fs::read_to_string(format!(
        "{}/deploy/redis/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("the shipped ACL file");
    let mut env = TestEnv::start(5).await;
    env.redis_url_override = Some(format!(
        "redis://cache-invalidator:change-me@127.0.0.1:{}/0",
        env.redis.port
    ));
    env.write_demo_config();
    let out = redis_acl(&env);
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        shipped.lines().next(),
        Some(printed.as_str()),
        "deploy/redis/{file} is stale: regenerate its first line with redis-acl"
    );

    env.redis = Redis::start_with_acl(&shipped).await;
    env.redis_url_override = Some(format!(
        "redis://cache-invalidator:change-me@127.0.0.1:{}/0",
        env.redis.port
    ));
    env.write_demo_config();
    env.setup();
    let _daemon = env.daemon().await;

    let app = redis::Client::open(format!(
        "redis://app:change-me-too@127.0.0.1:{}/0",
        env.redis.port
    ))
    .expect("client");
    let conn = app
        .get_multiplexed_async_connection()
        .await
        .expect("connect as app");
    let mut cache = Cache::new(conn.clone(), CacheOptions::default());
    let u = crate::support::users(&env, 1).await;
    let key = format!("profile:user:{}", u[0].id);
    let load = || async { Ok::<_, std::io::Error>(Some("{\"bio\":\"v1\"}".to_string())) };
    let (_, first) = cache
        .get_or_load(&key, 3600, load, None)
        .await
        .expect("fill as app");
    assert_eq!(first, Source::Filled);
    let (value, second) = cache
        .get_or_load(&key, 3600, load, None)
        .await
        .expect("hit as app");
    assert_eq!(
        (value.as_deref(), second),
        (Some("{\"bio\":\"v1\"}"), Source::Hit)
    );
    // Client-side hit/miss per key prefix (the plan's per-endpoint ratio).
    let stats = cache.stats();
    let profile = stats.get("profile:user").copied().unwrap_or_default();
    assert_eq!(
        (profile.hits, profile.misses, profile.fills),
        (1, 1, 1),
        "{stats:?}"
    );
    // The app's write: a token, then a read after it once the daemon
    // applied the change.
    let db = env.pg.client().await;
    db.batch_execute(&format!(
        "update public.profiles set bio = 'v2' where id = '{}'",
        u[0].id
    ))
    .await
    .expect("write");
    let token = write_token(&db).await.expect("write token");
    let fresh = || async { Ok::<_, std::io::Error>(Some("{\"bio\":\"v2\"}".to_string())) };
    let (value, _) = cache
        .get_or_load(&key, 3600, fresh, Some(token))
        .await
        .expect("read after the write as app");
    assert_eq!(value.as_deref(), Some("{\"bio\":\"v2\"}"));
    // Redis 6.2 has no read-only key patterns (`%R~`, 7.0+): there the app
    // user may read the position record only by being allowed to write it.
    if file == "users.acl" {
        let mut conn = conn;
        let refused: redis::RedisResult<()> = redis::cmd("SET")
            .arg("pgci:position:pg_cache_invalidator")
            .arg("0/0")
            .query_async(&mut conn)
            .await;
        assert!(
            refused.is_err(),
            "the app may overwrite the daemon's position"
        );
    }
}

/// A Redis user that may not UNLINK stops the daemon at the first change
/// with Redis's own refusal and its hint, exit 2 (as at start-up), not
/// with "the redis sink task ended unexpectedly", exit 1: the sink's error
/// was dropped when the loop saw its task gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_user_that_may_not_unlink_stops_with_redis_s_refusal() {
    use crate::support::users;
    use pgci_test_support::redis_server::Redis;
    let mut env = TestEnv::start(5).await;
    let url = |port: u16| format!("redis://pgci:s3cret@127.0.0.1:{port}/0");
    env.redis_url_override = Some(url(env.redis.port));
    env.write_config("");
    let out = redis_acl(&env);
    assert!(out.status.success());
    let line = format!("{} -unlink", String::from_utf8_lossy(&out.stdout).trim());
    env.redis = Redis::start_with_acl(&line).await;
    env.redis_url_override = Some(url(env.redis.port));
    env.write_config("");
    env.setup();
    let mut daemon = env.daemon().await;
    let u = users(&env, 1).await;
    env.pg
        .client()
        .await
        .batch_execute(&format!(
            "update public.profiles set bio = 'x' where id = '{}'",
            u[0].id
        ))
        .await
        .expect("update");
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    let log = daemon.log();
    assert!(!log.contains("sink task ended unexpectedly"), "{log}");
    assert!(log.to_lowercase().contains("unlink"), "{log}");
    assert_eq!(status.code(), Some(2), "{log}");
}

/// `redis-acl` for a channel with a space and a star, and a key template
/// with a space, prints a line redis-server loads (it refused to start
/// with the old line), and the star grants no other channel.
#[tokio::test(flavor = "multi_thread")]
async fn the_acl_line_loads_with_spaces_and_stars_in_names() {
    use pgci_test_support::redis_server::Redis;
    let mut env = TestEnv::start(1).await;
    env.redis_url_override = Some(format!("redis://pgci:pw@127.0.0.1:{}/0", env.redis.port));
    env.redis_extra = "channel = \"cache events*\"".to_string();
    env.write_config(
        "[[rules]]\ntable = \"public.pillars\"\nkeys = [\"pillar name:{slug}\"]\naction = \"delete\"\n",
    );
    let out = redis_acl(&env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let redis = Redis::start_with_acl(&line).await;
    let user =
        redis::Client::open(format!("redis://pgci:pw@127.0.0.1:{}/0", redis.port)).expect("client");
    let mut conn = user
        .get_multiplexed_async_connection()
        .await
        .expect("connect as pgci");
    let _: () = redis::cmd("PUBLISH")
        .arg("cache events*")
        .arg("x")
        .query_async(&mut conn)
        .await
        .expect("its own channel");
    let other: redis::RedisResult<()> = redis::cmd("PUBLISH")
        .arg("cache events-other")
        .arg("x")
        .query_async(&mut conn)
        .await;
    assert!(other.is_err(), "the star granted another channel");
    let _: () = redis::cmd("UNLINK")
        .arg("pillar name:x")
        .query_async(&mut conn)
        .await
        .expect("its own key");
}

/// Readiness tells why Redis holds the stream: paused while a batch is in
/// flight, it turns not ready within seconds (it stayed ready for the 30 s
/// response timeout) saying the batch is not acknowledged; out of memory
/// under noeviction, it says so (it said "not answering"); both recover.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_says_why_redis_holds_the_stream() {
    use crate::support::users;
    let mut env = TestEnv::start(5).await;
    env.setup();
    let daemon = env.daemon().await;
    let port = env.http_port;
    let ready = |want: &'static str| async move {
        http_get(port, "/readyz").await.is_some_and(|(s, body)| {
            if want == "ready" {
                s == 200
            } else {
                s == 503 && body.contains(want)
            }
        })
    };
    wait_for("ready", Duration::from_secs(30), || ready("ready")).await;
    let u = users(&env, 2).await;
    let client = env.pg.client().await;
    let mut admin = env.redis.conn().await;

    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(8000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .expect("pause");
    let paused = std::time::Instant::now();
    client
        .batch_execute(&format!(
            "update public.profiles set bio = 'p' where id = '{}'",
            u[0].id
        ))
        .await
        .expect("update");
    wait_for("not ready while paused", Duration::from_secs(6), || {
        ready("has not acknowledged a batch")
    })
    .await;
    assert!(
        paused.elapsed() < Duration::from_secs(7),
        "{:?}",
        paused.elapsed()
    );
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .expect("unpause");
    wait_for("ready after the pause", Duration::from_secs(30), || {
        ready("ready")
    })
    .await;

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut admin)
        .await
        .expect("policy");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query_async(&mut admin)
        .await
        .expect("maxmemory");
    client
        .batch_execute(&format!(
            "update public.profiles set bio = 'q' where id = '{}'",
            u[1].id
        ))
        .await
        .expect("update");
    wait_for("not ready, out of memory", Duration::from_secs(30), || {
        ready("(oom)")
    })
    .await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut admin)
        .await
        .expect("maxmemory");
    wait_for(
        "ready after memory was freed",
        Duration::from_secs(30),
        || ready("ready"),
    )
    .await;
    env.sync().await;
    drop(daemon);
}

/// A `redis.url` that reaches nothing, or reaches a server that is not
/// Redis (PostgreSQL's port): `check-config` refuses it (exit 2, one line
/// naming Redis); `run` logs the first failed attempt at once, `/readyz`
/// names Redis, and SIGTERM still exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_url_that_does_not_work_is_refused_and_named() {
    let mut env = TestEnv::start(1).await;
    env.write_config("");
    env.setup();
    for url in [
        format!("redis://127.0.0.1:{}/0", crate::support::free_port()),
        format!("redis://127.0.0.1:{}/0", env.pg.port),
    ] {
        env.redis_url_override = Some(url.clone());
        env.write_config("");
        let out = env.cli(&["check-config"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{url}: {stderr}");
        assert!(
            errors[0].contains("redis") && errors[0].contains("cannot read INFO"),
            "{stderr}"
        );
    }
    env.redis_url_override = Some(format!(
        "redis://127.0.0.1:{}/0",
        crate::support::free_port()
    ));
    env.write_config("");
    let mut daemon = env.spawn_daemon();
    let started = std::time::Instant::now();
    wait_for(
        "the first failed attempt in the log",
        Duration::from_secs(3),
        || {
            let log = daemon.log();
            async move { log.contains("cannot connect to redis; retrying") }
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let port = env.http_port;
    wait_for(
        "/readyz to name redis",
        Duration::from_secs(10),
        || async move {
            http_get(port, "/readyz")
                .await
                .is_some_and(|(status, body)| {
                    status == 503 && body.contains("cannot connect to redis")
                })
        },
    )
    .await;
    let status = daemon.terminate().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.log());
}

/// On a server without sharded pub/sub (Redis 6.2, in the Redis matrix),
/// `sharded_events = true` is refused at start: exit 2, one line naming
/// the setting, before any change is read (not at the first event).
#[tokio::test(flavor = "multi_thread")]
async fn sharded_events_are_refused_at_start_where_redis_lacks_them() {
    if pgci_test_support::redis_server_version() >= (7, 0) {
        return;
    }
    let mut env = TestEnv::start(1).await;
    env.redis_extra = "sharded_events = true".to_string();
    env.write_config("");
    env.setup();
    let mut daemon = env.spawn_daemon();
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    let log = daemon.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("redis.sharded_events") && log.contains("set sharded_events = false"),
        "{log}"
    );
    let out = redis_acl(&env);
    assert_eq!(out.status.code(), Some(2));
}
