//! Row changes on the demo schema invalidate exactly the keys the rules
//! name, and each is announced on pub/sub.

use std::time::Duration;

use futures_util::StreamExt;

use crate::support::{preset, removed_by, users, TestEnv};

fn sorted(mut keys: Vec<String>) -> Vec<String> {
    keys.sort();
    keys
}

/// INSERT, UPDATE and DELETE on profiles remove that user's profile key and
/// nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn profile_changes_invalidate_only_the_profile_key() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 3).await;

    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "update public.profiles set full_name = 'New' where id = '{}'",
            u[0].id
        ),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{}", u[0].id)]);

    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!("delete from public.profiles where id = '{}'", u[1].id),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{}", u[1].id)]);

    let new_id = "00000000-0000-4000-8000-000000000001";
    let removed = removed_by(
        &env,
        &u,
        &[format!("profile:user:{new_id}")],
        &format!(
            "insert into auth.users (id, email) values ('{new_id}', 'new@example.com'); \
             insert into public.profiles (id, username) values ('{new_id}', 'newbie')"
        ),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{new_id}")]);
}

/// user_tokens has a surrogate `id`; after `setup` its DELETE still carries
/// user_id and token_id, so both balance keys go. Updates and inserts
/// remove the user's total and that one token's key, not the other token's.
#[tokio::test(flavor = "multi_thread")]
async fn balance_changes_invalidate_user_and_token_keys() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 3).await;

    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "update public.user_tokens set balance = balance + 1 where user_id = '{}' and token_id = '{}'",
            u[0].id, u[0].tokens[0]
        ),
    )
    .await;
    assert_eq!(
        removed,
        sorted(vec![
            format!("balance:user:{}", u[0].id),
            format!("balance:user:{}:token:{}", u[0].id, u[0].tokens[0]),
        ])
    );

    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "delete from public.user_tokens where id = (select id from public.user_tokens where user_id = '{}' and token_id = '{}')",
            u[1].id, u[1].tokens[1]
        ),
    )
    .await;
    assert_eq!(
        removed,
        sorted(vec![
            format!("balance:user:{}", u[1].id),
            format!("balance:user:{}:token:{}", u[1].id, u[1].tokens[1]),
        ])
    );

    let removed = removed_by(
        &env,
        &u,
        &[format!("balance:user:{}:token:00000000-0000-4000-8000-0000000000aa", u[2].id)],
        &format!(
            "insert into public.tokens (id, symbol, name) values ('00000000-0000-4000-8000-0000000000aa', 'NEW', 'New'); \
             insert into public.user_tokens (user_id, token_id, balance) values ('{}', '00000000-0000-4000-8000-0000000000aa', 5)",
            u[2].id
        ),
    )
    .await;
    assert_eq!(
        removed,
        sorted(vec![
            format!("balance:user:{}", u[2].id),
            format!(
                "balance:user:{}:token:00000000-0000-4000-8000-0000000000aa",
                u[2].id
            ),
        ])
    );
}

/// Journey updates, deletes (REPLICA IDENTITY FULL after setup: no unique
/// NOT NULL index covers user_id) and inserts remove the journey key.
#[tokio::test(flavor = "multi_thread")]
async fn journey_changes_invalidate_the_journey_key() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 3).await;
    for (user, sql) in [
        (
            0,
            "update public.user_journeys set progress = 42 where user_id = '{}'",
        ),
        (1, "delete from public.user_journeys where user_id = '{}'"),
        (
            2,
            "insert into public.user_journeys (user_id, pillar_id, route_id) \
             select '{}', id, gen_random_uuid() from public.pillars where slug = 'individual'",
        ),
    ] {
        let removed = removed_by(&env, &u, &[], &sql.replace("{}", &u[user].id)).await;
        assert_eq!(removed, [format!("journey:user:{}", u[user].id)], "{sql}");
    }
}

/// transfer_tokens changes two rows in one transaction: both users' total
/// and per-token keys go, their other token's keys stay.
#[tokio::test(flavor = "multi_thread")]
async fn transfer_tokens_invalidates_both_users() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 3).await;
    let token = &u[0].tokens[0];
    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "select public.transfer_tokens('{}', '{}', '{token}', 0.01)",
            u[0].id, u[1].id
        ),
    )
    .await;
    assert_eq!(
        removed,
        sorted(vec![
            format!("balance:user:{}", u[0].id),
            format!("balance:user:{}:token:{token}", u[0].id),
            format!("balance:user:{}", u[1].id),
            format!("balance:user:{}:token:{token}", u[1].id),
        ])
    );
}

/// Changing a primary key invalidates the key rendered from the old row and
/// the one rendered from the new row.
#[tokio::test(flavor = "multi_thread")]
async fn primary_key_change_invalidates_old_and_new_keys() {
    let mut env = TestEnv::start(5).await;
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let moved_to = "00000000-0000-4000-8000-000000000002";
    let removed = removed_by(
        &env,
        &u,
        &[format!("profile:user:{moved_to}")],
        &format!(
            "insert into auth.users (id) values ('{moved_to}'); \
             update public.profiles set id = '{moved_to}' where id = '{}'",
            u[0].id
        ),
    )
    .await;
    assert_eq!(
        removed,
        sorted(vec![
            format!("profile:user:{}", u[0].id),
            format!("profile:user:{moved_to}"),
        ])
    );
}

/// TRUNCATE of a watched table removes every key its rules can produce,
/// and only those: other tables' keys and look-alike keys stay.
#[tokio::test(flavor = "multi_thread")]
async fn truncate_flushes_only_the_tables_keys() {
    let mut env = TestEnv::start(20).await;
    env.setup();
    let daemon = env.daemon().await;
    let u = users(&env, 20).await;
    let extra = vec![
        "journeyman:1".to_string(),
        "journey:users".to_string(),
        "other:journey:user:1".to_string(),
    ];
    let removed = removed_by(&env, &u, &extra, "truncate public.user_journeys").await;
    let expected: Vec<String> =
        sorted(u.iter().map(|u| format!("journey:user:{}", u.id)).collect());
    assert_eq!(removed, expected);
    assert!(daemon.log().contains("table truncated"), "{}", daemon.log());
}

/// Each change is announced once on the channel with the documented
/// fields: table, op, action, keys, lsn, commit_time.
#[tokio::test(flavor = "multi_thread")]
async fn events_are_published_with_documented_fields() {
    let mut env = TestEnv::start(3).await;
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let client = redis::Client::open(env.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe("cache-invalidation")
        .await
        .expect("subscribe");
    let mut messages = pubsub.into_on_message();

    let before = std::time::SystemTime::now();
    env.pg
        .client()
        .await
        .batch_execute(&format!(
            "update public.profiles set bio = 'x' where id = '{0}'; \
             delete from public.user_journeys where user_id = '{0}'",
            u[0].id
        ))
        .await
        .expect("write");
    let mut events = Vec::new();
    while events.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .expect("event within 20 s")
            .expect("stream open");
        let payload: String = msg.get_payload().expect("text payload");
        let event: serde_json::Value = serde_json::from_str(&payload).expect("json event");
        events.push(event);
    }
    assert_eq!(events[0]["table"], "public.profiles");
    assert_eq!(events[0]["op"], "update");
    assert_eq!(events[0]["action"], "delete");
    assert_eq!(
        events[0]["keys"],
        serde_json::json!([format!("profile:user:{}", u[0].id)])
    );
    assert_eq!(events[1]["table"], "public.user_journeys");
    assert_eq!(events[1]["op"], "delete");
    assert_eq!(events[1]["keys"].as_array().map(Vec::len), Some(1));
    for event in &events {
        let lsn = event["lsn"].as_str().expect("lsn string");
        let (hi, lo) = lsn.split_once('/').expect("X/Y");
        assert!(
            u32::from_str_radix(hi, 16).is_ok() && u32::from_str_radix(lo, 16).is_ok(),
            "{lsn}"
        );
        let time = event["commit_time"].as_str().expect("commit_time string");
        assert!(time.ends_with('Z') && time.len() == 27, "{time}");
        let unix = unix_seconds(time);
        let now = before
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        assert!((unix - now).abs() < 60, "commit_time {time} is not now");
    }
    assert_eq!(
        events[0]["lsn"], events[1]["lsn"],
        "one transaction, one commit LSN"
    );
}

/// Seconds since 1970 of `YYYY-MM-DDTHH:MM:SS.ffffffZ` (days_from_civil).
fn unix_seconds(t: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| t[r].parse::<i64>().expect("digits");
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

/// A partitioned table named in a rule: `setup` publishes partitions'
/// changes under the partitioned table's name (`publish_via_partition_root`)
/// and gives each partition a replica identity that carries the key
/// columns, so inserts and deletes landing in any partition invalidate the
/// rule's keys.
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_tables_are_watched_through_their_root() {
    let mut env = TestEnv::start(1).await;
    let client = env.pg.client().await;
    client
        .batch_execute(
            "create table public.visits (id int, region text, user_id int, primary key (id, region)) \
               partition by list (region); \
             create table public.visits_eu partition of public.visits for values in ('eu'); \
             create table public.visits_us partition of public.visits for values in ('us'); \
             insert into public.visits values (1, 'eu', 7), (2, 'us', 8);",
        )
        .await
        .expect("partitioned table");
    env.write_config("[[rules]]\ntable = \"public.visits\"\nkeys = [\"visits:user:{user_id}\"]\n");
    env.setup();
    let out = env.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _daemon = env.daemon().await;
    let mut redis = env.redis.conn().await;
    let keys = vec![
        "visits:user:7".to_string(),
        "visits:user:8".to_string(),
        "visits:user:9".to_string(),
    ];
    preset(&mut redis, &keys).await;
    client
        .batch_execute(
            "insert into public.visits values (3, 'us', 9); delete from public.visits where id = 1",
        )
        .await
        .expect("writes");
    env.sync().await;
    let left: Vec<String> = {
        let mut left = Vec::new();
        for key in &keys {
            let exists: bool = redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut redis)
                .await
                .expect("exists");
            if exists {
                left.push(key.clone());
            }
        }
        left
    };
    assert_eq!(
        left,
        ["visits:user:8"],
        "the insert and the delete invalidate, the untouched row stays"
    );
}
