//! The verbs operators reach for after an incident: `events` tails the
//! invalidations as they are published, filtered by table or key glob;
//! `flush` counts or deletes a rule's keys by pattern.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::users;
use crate::support::{daemon_bin, preset, surviving, TestEnv};

pub(crate) fn spawn_events(env: &TestEnv, args: &[&str]) -> std::process::Child {
    Command::new(daemon_bin())
        .arg("events")
        .args(args)
        .arg("--config")
        .arg(&env.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("events")
}

/// Waits for `child` to exit (it stops after --count events); its stdout.
pub(crate) async fn finished(mut child: std::process::Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "events did not stop: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `events --table` and `events --key` print only matching events (JSON
/// lines, or a table), and stop after `--count`.
#[tokio::test(flavor = "multi_thread")]
async fn events_are_tailed_and_filtered() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let mut redis = env.redis.conn().await;
    async fn subscribers(redis: &mut redis::aio::MultiplexedConnection) -> i64 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("cache-invalidation")
            .query_async(redis)
            .await
            .expect("numsub");
        n
    }
    // The daemon subscribes too (its status page shows recent events):
    // count it first, then wait for both tails to have subscribed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribers(&mut redis).await < 1 {
        assert!(Instant::now() < deadline, "the daemon did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = subscribers(&mut redis).await;
    let by_table = spawn_events(
        &env,
        &["--json", "--table", "public.profiles", "--count", "1"],
    );
    let by_key = spawn_events(&env, &["--key", "balance:user:*:token:*", "--count", "2"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribers(&mut redis).await < before + 2 {
        assert!(Instant::now() < deadline, "events did not subscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = env.pg.client().await;
    db.batch_execute(&format!(
        "update public.user_journeys set progress = progress where user_id = '{id}'; \
         update public.user_tokens set balance = balance + 1 where user_id = '{id}'; \
         update public.profiles set bio = 'tailed' where id = '{id}'",
        id = u[1].id
    ))
    .await
    .expect("writes");
    let json = finished(by_table).await;
    let lines: Vec<&str> = json.lines().collect();
    assert_eq!(lines.len(), 1, "{json}");
    let event: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(event["table"], "public.profiles");
    assert_eq!(event["keys"][0], format!("profile:user:{}", u[1].id));
    let table = finished(by_key).await;
    assert!(table.trim_start().starts_with("seq commit_time"), "{table}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows.iter().all(|r| r.contains("public.user_tokens")),
        "{table}"
    );
    assert!(!table.contains("journey:user"), "{table}");
}

/// `flush --dry-run` counts and deletes nothing; `flush --rule N` and
/// `--table T` delete exactly their rules' keys; a wrong choice is a usage
/// error saying what to do.
#[tokio::test(flavor = "multi_thread")]
async fn flush_counts_then_deletes_a_rule_s_keys() {
    let env = TestEnv::start(3).await;
    env.setup();
    let u = users(&env, 3).await;
    let profiles: Vec<String> = u.iter().map(|x| format!("profile:user:{}", x.id)).collect();
    let journeys: Vec<String> = u.iter().map(|x| format!("journey:user:{}", x.id)).collect();
    let other = vec!["session:abc".to_string()];
    let mut redis = env.redis.conn().await;
    for keys in [&profiles, &journeys, &other] {
        preset(&mut redis, keys).await;
    }
    let run = |args: &[&str]| env.cli(&[&["flush"], args].concat());

    let out = run(&["--rule", "1", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("profile:user:*") && text.contains("3 key(s)"),
        "{text}"
    );
    assert!(
        text.contains("dry run: 3 key(s) would be deleted"),
        "{text}"
    );
    assert_eq!(
        surviving(&mut redis, &profiles).await,
        3,
        "a dry run deleted keys"
    );

    let out = run(&["--rule", "1"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 3 key(s)"));
    assert_eq!(surviving(&mut redis, &profiles).await, 0);
    assert_eq!(
        surviving(&mut redis, &journeys).await,
        3,
        "another rule's keys went"
    );

    let out = run(&["--table", "public.user_journeys"]);
    assert!(out.status.success());
    assert_eq!(surviving(&mut redis, &journeys).await, 0);
    assert_eq!(
        surviving(&mut redis, &other).await,
        1,
        "a key no rule makes went"
    );

    let out = run(&["--rule", "99"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("numbered from 1 in file order"));
    let out = run(&["--table", "public.nothing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rule watches it"));
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2), "no rule chosen");
}
