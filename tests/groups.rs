//! Table groups (`[[groups]]`): the rules' tables split over two slots and
//! publications, each streamed by a daemon process of its own (`run
//! --group NAME`), against a real PostgreSQL and Redis.

use std::time::Duration;

use crate::support::{balance_keys, free_port, http_get, preset, surviving, wait_for, TestEnv};

/// Two groups: balances alone, and the rest (the sentinel's table too).
fn groups(balances_port: u16) -> String {
    format!(
        "[[groups]]\nname = \"balances\"\ntables = [\"public.user_tokens\"]\nlisten = \"127.0.0.1:{balances_port}\"\n\n\
         [[groups]]\nname = \"rest\"\ntables = [\"public.profiles\", \"public.user_journeys\", \"public.pillars\"]\n"
    )
}

async fn slot_active(env: &TestEnv, slot: &str) -> bool {
    env.pg
        .client()
        .await
        .query_opt(
            "select active from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .is_some_and(|row| row.get::<_, bool>(0))
}

async fn profile_keys(env: &TestEnv) -> Vec<String> {
    env.pg
        .client()
        .await
        .query("select id::text from public.profiles", &[])
        .await
        .expect("profiles")
        .iter()
        .map(|r| format!("profile:user:{}", r.get::<_, String>(0)))
        .collect()
}

/// `setup` (without `--group`) creates both groups' slots and
/// publications; `run` without `--group` refuses (exit 2); a daemon per
/// group applies its own tables' changes and labels its metrics with its
/// group; `status --json` lists both; and the groups stream independently:
/// with one group's daemon stopped, the other's keys are still invalidated,
/// and the stopped group's are once it runs again.
#[tokio::test(flavor = "multi_thread")]
async fn two_groups_stream_their_own_tables_in_their_own_processes() {
    let mut env = TestEnv::start(10).await;
    let balances_port = free_port();
    env.write_config(&groups(balances_port));
    let out = env.cli(&["setup"]);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("== group balances") && printed.contains("== group rest"),
        "{printed}"
    );
    let out = env.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.cli(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--group NAME"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _balances = env.spawn_daemon_env(&[("PGCI_GROUP", "balances")]);
    let mut rest = env.spawn_daemon_env(&[("PGCI_GROUP", "rest")]);
    for slot in ["pg_cache_invalidator_balances", "pg_cache_invalidator_rest"] {
        wait_for(slot, Duration::from_secs(30), || slot_active(&env, slot)).await;
    }
    let mut redis = env.redis.conn().await;
    let (balances, profiles) = (balance_keys(&env).await, profile_keys(&env).await);
    preset(&mut redis, &balances).await;
    preset(&mut redis, &profiles).await;
    let pg = env.pg.client().await;
    pg.batch_execute(
        "update public.user_tokens set balance = balance + 1; update public.profiles set bio = 'b';",
    )
    .await
    .expect("update");
    wait_for("both groups' keys", Duration::from_secs(30), || async {
        let mut redis = env.redis.conn().await;
        surviving(&mut redis, &balances).await + surviving(&mut redis, &profiles).await == 0
    })
    .await;

    for (port, group) in [(balances_port, "balances"), (env.http_port, "rest")] {
        let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
        assert!(
            metrics.contains(&format!("group=\"{group}\"")),
            "{group}'s metrics carry its label"
        );
    }
    let out = env.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let listed: Vec<(&str, &str)> = status
        .as_array()
        .expect("one entry per group")
        .iter()
        .map(|g| {
            (
                g["group"].as_str().unwrap_or(""),
                g["slot"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("balances", "pg_cache_invalidator_balances"),
            ("rest", "pg_cache_invalidator_rest")
        ]
    );

    // One group stopped: the other goes on alone.
    rest.kill9();
    preset(&mut redis, &balances).await;
    preset(&mut redis, &profiles).await;
    pg.batch_execute(
        "update public.user_tokens set balance = balance + 1; update public.profiles set bio = 'c';",
    )
    .await
    .expect("update");
    wait_for(
        "the balances group alone",
        Duration::from_secs(30),
        || async {
            let mut redis = env.redis.conn().await;
            surviving(&mut redis, &balances).await == 0
        },
    )
    .await;
    assert_eq!(surviving(&mut redis, &profiles).await, profiles.len());
    let _rest = env.spawn_daemon_env(&[("PGCI_GROUP", "rest")]);
    wait_for(
        "the rest group after its restart",
        Duration::from_secs(30),
        || async {
            let mut redis = env.redis.conn().await;
            surviving(&mut redis, &profiles).await == 0
        },
    )
    .await;
}

/// Mistakes in `[[groups]]` stop every verb at start with exit 2 and one
/// line each naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn group_mistakes_are_refused_at_start() {
    let env = TestEnv::start(1).await;
    env.write_config(
        "[[groups]]\nname = \"a\"\ntables = [\"public.user_tokens\", \"public.profiles\"]\n\n\
         [[groups]]\nname = \"b\"\ntables = [\"public.profiles\", \"public.nope\"]\n",
    );
    let out = env.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "groups[1].tables: public.profiles is also in groups[0]",
        "groups[1].tables: public.nope has no [[rules]]",
        "rules[2].table: public.user_journeys is in no [[groups]]",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    let out = env.cli_env(&["status"], &[("PGCI_GROUP", "c")]);
    assert_eq!(out.status.code(), Some(2));
}
