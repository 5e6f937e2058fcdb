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
