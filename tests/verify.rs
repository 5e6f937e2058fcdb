//! `verify`, the cache inspector, against a live daemon: it checks the
//! keys whose values the daemon can compute, finds values that differ,
//! rows that are gone and values that are not JSON, repairs them, and does
//! not report a change the daemon had simply not applied yet.

use std::time::Duration;

use crate::support::{daemon_bin, wait_for, TestEnv};

/// Profiles refreshed whole by the daemon; user_tokens rows cached by the
/// app under `token-row:{id}` (a delete rule that says `holds = "row"`);
/// the demo's balance keys (delete rules that hold aggregates) cannot be
/// checked and are listed as such.
const RULES: &str = r#"
[[rules]]
table  = "public.user_tokens"
keys   = ["token-row:{id}"]
action = "delete"
holds  = "row"
"#;

const PROFILE_REFRESH: &str = "[[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile:user:{id}\"]\naction = \"refresh\"\nttl = \"1h\"\n";

fn verify_env_config(env: &TestEnv) {
    env.write_config(&format!("{PROFILE_REFRESH}{RULES}"));
    let text = std::fs::read_to_string(&env.config).expect("read config");
    let text = text.replacen(
        "[[rules]]\ntable  = \"public.profiles\"\nkeys   = [\"profile:user:{id}\"]\naction = \"delete\"\n",
        "",
        1,
    );
    std::fs::write(&env.config, text).expect("write config");
}

fn report(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A clean cache verifies clean (exit 0); corrupted keys are found with the
/// right problem (exit 1, named in the text output), `--repair` deletes
/// exactly those, `--sample` bounds the work, and afterwards the cache is
/// clean again.
#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_and_repairs_stale_keys() {
    let mut env = TestEnv::start(6).await;
    verify_env_config(&env);
    env.setup();
    let _daemon = env.daemon().await;
    let pg = env.pg.client().await;
    pg.batch_execute("update public.profiles set bio = 'cached by the daemon'")
        .await
        .expect("touch profiles");
    env.sync().await;
    let mut redis = env.redis.conn().await;
    let token_rows = pg
        .query(
            "select id::text, to_jsonb(t)::text from public.user_tokens t",
            &[],
        )
        .await
        .expect("token rows");
    for row in &token_rows {
        let (id, json): (String, String) = (row.get(0), row.get(1));
        let _: () = redis::cmd("SET")
            .arg(format!("token-row:{id}"))
            .arg(json)
            .query_async(&mut redis)
            .await
            .expect("app fill");
    }
    let profiles: i64 = pg
        .query_one("select count(*) from public.profiles", &[])
        .await
        .expect("count")
        .get(0);

    let out = env.cli(&["verify", "--json", "--rate", "0"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let clean = report(&out);
    assert_eq!(
        clean["checked"].as_u64(),
        Some(profiles as u64 + token_rows.len() as u64),
        "{clean}"
    );
    assert_eq!(clean["stale"].as_u64(), Some(0), "{clean}");
    assert!(
        clean["unchecked_rules"]
            .to_string()
            .contains("balance:user:{user_id}"),
        "aggregate keys are listed as not checkable: {clean}"
    );

    // Corrupt four keys: a value that differs, one that is not JSON, one
    // for a row that does not exist, and a lease marker (skipped).
    let profile_id = pgci_test_support::first_profile_id(&pg).await;
    let token_id: String = token_rows[0].get(0);
    let corrupt = [
        (
            format!("profile:user:{profile_id}"),
            format!("{{\"id\":\"{profile_id}\",\"bio\":\"old\"}}"),
        ),
        (format!("token-row:{token_id}"), "not json".to_string()),
        (
            "token-row:00000000-0000-0000-0000-000000000001".to_string(),
            "{\"id\":1}".to_string(),
        ),
    ];
    for (key, value) in &corrupt {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut redis)
            .await
            .expect("corrupt");
    }
    let other: String = token_rows[1].get(0);
    let _: () = redis::cmd("SET")
        .arg(format!("token-row:{other}"))
        .arg(format!(
            "{}someone",
            pg_cache_invalidator::lease::MARKER_PREFIX
        ))
        .query_async(&mut redis)
        .await
        .expect("lease marker");

    let out = env.cli(&["verify", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for (key, _) in &corrupt {
        assert!(text.contains(key.as_str()), "{key} listed: {text}");
    }
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 cached key(s) differ"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.cli(&["verify", "--json", "--rate", "0"]);
    let found = report(&out);
    assert_eq!(found["stale"].as_u64(), Some(2), "{found}");
    assert_eq!(found["missing"].as_u64(), Some(1), "{found}");
    assert_eq!(found["skipped"].as_u64(), Some(1), "{found}");
    assert_eq!(found["daemon_behind"].as_bool(), Some(false), "{found}");

    let out = env.cli(&["verify", "--json", "--sample", "2", "--rate", "0"]);
    assert_eq!(report(&out)["checked"].as_u64(), Some(2));

    let out = env.cli(&["verify", "--json", "--repair", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report(&out)["repaired"].as_u64(), Some(3));
    for (key, _) in &corrupt {
        let gone: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut redis)
            .await
            .expect("exists")
            == 0;
        assert!(gone, "{key} repaired");
    }
    let out = env.cli(&["verify", "--json", "--rate", "0"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A mismatch is checked again once the daemon has applied everything
/// committed when it was seen: a change made while the daemon was stopped
/// is reported only if the daemon does not catch up, so a verify racing a
/// restart exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn verify_waits_for_the_daemon_before_calling_a_key_stale() {
    let mut env = TestEnv::start(3).await;
    verify_env_config(&env);
    env.setup();
    let mut daemon = env.daemon().await;
    let pg = env.pg.client().await;
    pg.batch_execute("update public.profiles set bio = 'first'")
        .await
        .expect("touch profiles");
    env.sync().await;
    daemon.terminate().await;
    pg.batch_execute("update public.profiles set bio = 'second'")
        .await
        .expect("change while stopped");
    let config = env.config.clone();
    let verify = tokio::task::spawn_blocking(move || {
        std::process::Command::new(daemon_bin())
            .args(["verify", "--json", "--rate", "0", "--config"])
            .arg(&config)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .output()
            .expect("run verify")
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _daemon = env.daemon().await;
    let out = verify.await.expect("verify");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the daemon the same change is stale and says so.
    drop(_daemon);
    wait_for("the slot to be free", Duration::from_secs(10), || async {
        !crate::support::slot_active(&pg).await
    })
    .await;
    pg.batch_execute("update public.profiles set bio = 'third'")
        .await
        .expect("change while stopped");
    let out = env.cli(&["verify", "--json", "--rate", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let found = report(&out);
    assert_eq!(found["daemon_behind"].as_bool(), Some(true), "{found}");
    assert!(found["stale"].as_u64().unwrap_or(0) >= 1, "{found}");
}

/// The counter `name{rule="…"}` on /metrics (0 when absent).
async fn metric(port: u16, name: &str, rule: &str) -> f64 {
    let (_, body) = crate::support::http_get(port, "/metrics")
        .await
        .unwrap_or_default();
    crate::support::metric(&body, &format!("{name}{{rule=\"{rule}\"}}")).unwrap_or(0.0)
}

/// The freshness sampler inside the daemon (`[verify] sample_per_second`):
/// while rows change all the time and the daemon keeps the cache true, it
/// checks keys and counts none stale; a stale key planted behind the
/// daemon's back is found within seconds, counted under its rule, logged
/// once, and the status page's "fresh" line says so.
#[tokio::test(flavor = "multi_thread")]
async fn the_sampler_finds_a_planted_stale_key_and_none_on_a_busy_true_cache() {
    let mut env = TestEnv::start(30).await;
    verify_env_config(&env);
    let text = std::fs::read_to_string(&env.config).expect("read config");
    std::fs::write(
        &env.config,
        format!("{text}\n[verify]\nsample_per_second = 200\n"),
    )
    .expect("write config");
    env.setup();
    let daemon = env.daemon().await;
    let pg = env.pg.client().await;
    pg.batch_execute("update public.profiles set bio = 'cached by the daemon'")
        .await
        .expect("touch profiles");
    env.sync().await;
    let rule = "profile:user:{id}";
    let port = env.http_port;

    // A busy stream: every profile rewritten again and again, the daemon
    // refreshing each key, for eight seconds.
    let writer = {
        let pg = env.pg.client().await;
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(8);
            let mut n = 0u64;
            while tokio::time::Instant::now() < until {
                pg.execute(
                    "update public.profiles set bio = $1 where id = \
                     (select id from public.profiles order by id offset ($2::bigint % 30) limit 1)",
                    &[&format!("busy {n}"), &(n as i64)],
                )
                .await
                .expect("update");
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let writes = writer.await.expect("writer");
    env.sync().await;
    let checked = metric(port, "pgci_verify_checked_total", rule).await;
    let stale = metric(port, "pgci_verify_stale_total", rule).await;
    assert!(writes > 200, "the stream was busy: {writes} updates");
    assert!(checked >= 100.0, "the sampler checked {checked} keys");
    assert_eq!(
        stale,
        0.0,
        "a true cache has no stale key: {}",
        daemon.log()
    );

    // A value the database never held, written behind the daemon's back.
    let id = pgci_test_support::first_profile_id(&pg).await;
    let key = format!("profile:user:{id}");
    let mut redis = env.redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(format!("{{\"id\":\"{id}\",\"bio\":\"planted\"}}"))
        .query_async(&mut redis)
        .await
        .expect("plant");
    wait_for(
        "the sampler to find the planted key",
        Duration::from_secs(30),
        || async { metric(port, "pgci_verify_stale_total", rule).await >= 1.0 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = daemon.log();
    let logged = log
        .lines()
        .filter(|l| l.contains("the cache holds a value the database does not") && l.contains(&key))
        .count();
    assert_eq!(logged, 1, "logged once however often it is found: {log}");
    let (_, page) = crate::support::http_get(port, "/")
        .await
        .expect("status page");
    assert!(page.contains("id=\"fresh\""), "{page}");
    assert!(page.contains("keys checked in the last hour ("), "{page}");
    assert!(!page.contains("(0 stale)"), "{page}");
}
