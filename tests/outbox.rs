//! `source = "outbox"`: trigger-fed capture for databases without
//! replication. Same rules, same Redis state and events as replication;
//! nothing lost when the daemon is down, killed, or doubled; works through
//! PgBouncer in session mode.

use std::time::Duration;

use futures_util::StreamExt;

use crate::support::{balance_keys, preset, surviving, wait_for, PgBouncer, TestEnv};
use crate::support::{removed_by, users};

async fn outbox_env(users: i32) -> TestEnv {
    let mut env = TestEnv::start(users).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_config("");
    env.setup();
    env
}

/// Outbox rows not drained yet, as `status` counts them (rows stay until
/// their partition is emptied; the recorded position says which are
/// applied).
async fn outbox_rows(env: &TestEnv) -> i64 {
    use pg_cache_invalidator::config::{OutboxConfig, SecretUrl};
    use pg_cache_invalidator::db::{ConnInfo, Db};
    let conn = ConnInfo::parse(&SecretUrl::new(env.pg.url()), None).expect("conn");
    let db = Db::connect(&conn).await.expect("connect");
    pg_cache_invalidator::source::outbox::drain::backlog(&db, &OutboxConfig::default())
        .await
        .expect("backlog")
        .0
}

/// The same writes as the replication tests (an update, transfer_tokens,
/// a delete by surrogate key, a primary-key change, a truncate) remove the
/// same keys through the outbox, each announced by the same event.
#[tokio::test(flavor = "multi_thread")]
async fn outbox_invalidates_like_replication() {
    let mut env = outbox_env(20).await;
    let _daemon = env.daemon().await;
    let u = users(&env, 3).await;
    let client = redis::Client::open(env.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe("cache-invalidation")
        .await
        .expect("subscribe");
    let mut messages = pubsub.into_on_message();

    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "update public.profiles set full_name = 'x' where id = '{}'",
            u[0].id
        ),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{}", u[0].id)]);
    let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("event")
        .expect("open");
    let event: serde_json::Value =
        serde_json::from_str(&msg.get_payload::<String>().expect("text")).expect("json");
    assert_eq!(event["table"], "public.profiles");
    assert_eq!(event["op"], "update");
    assert_eq!(event["action"], "delete");
    assert_eq!(
        event["keys"],
        serde_json::json!([format!("profile:user:{}", u[0].id)])
    );
    assert!(event["lsn"].as_str().is_some_and(|l| l.contains('/')));
    assert!(event["commit_time"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

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
    let mut expected = vec![
        format!("balance:user:{}", u[0].id),
        format!("balance:user:{}:token:{token}", u[0].id),
        format!("balance:user:{}", u[1].id),
        format!("balance:user:{}:token:{token}", u[1].id),
    ];
    expected.sort();
    assert_eq!(removed, expected);

    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "delete from public.user_tokens where id = (select id from public.user_tokens where user_id = '{}' and token_id = '{}')",
            u[2].id, u[2].tokens[1]
        ),
    )
    .await;
    let mut expected = vec![
        format!("balance:user:{}", u[2].id),
        format!("balance:user:{}:token:{}", u[2].id, u[2].tokens[1]),
    ];
    expected.sort();
    assert_eq!(removed, expected);

    let moved = "00000000-0000-4000-8000-000000000009";
    let removed = removed_by(
        &env,
        &u,
        &[format!("profile:user:{moved}")],
        &format!(
            "insert into auth.users (id) values ('{moved}'); update public.profiles set id = '{moved}' where id = '{}'",
            u[1].id
        ),
    )
    .await;
    let mut expected = vec![
        format!("profile:user:{}", u[1].id),
        format!("profile:user:{moved}"),
    ];
    expected.sort();
    assert_eq!(removed, expected);

    let removed = removed_by(
        &env,
        &u,
        &["journeyman:1".to_string()],
        "truncate public.user_journeys",
    )
    .await;
    let mut expected: Vec<String> = u.iter().map(|u| format!("journey:user:{}", u.id)).collect();
    expected.sort();
    assert_eq!(removed, expected);
    // The rows go after their keys (once the batch is confirmed): wait,
    // do not race the drain under load.
    wait_for(
        "applied rows are deleted",
        Duration::from_secs(10),
        || async { outbox_rows(&env).await == 0 },
    )
    .await;
}

/// 10 000 changes written while no daemon runs (NOTIFY goes nowhere) are
/// all applied when it starts.
#[tokio::test(flavor = "multi_thread")]
async fn changes_written_while_down_are_applied_on_start() {
    let mut env = outbox_env(5_000).await;
    let keys = balance_keys(&env).await;
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &keys).await;
    let changed = env
        .pg
        .client()
        .await
        .execute("update public.user_tokens set balance = balance + 1", &[])
        .await
        .expect("10k changes");
    assert_eq!(changed, 10_000);
    assert_eq!(outbox_rows(&env).await, 10_000);
    let _daemon = env.daemon().await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, &keys).await, 0);
    assert_eq!(outbox_rows(&env).await, 0);
}

/// kill -9 while draining a 30 000-row backlog (32 transactions), then a restart: the rows
/// of the interrupted batch were not deleted, so nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_mid_backlog_loses_nothing() {
    let mut env = outbox_env(15_000).await;
    let keys = balance_keys(&env).await;
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &keys).await;
    let client = env.pg.client().await;
    for part in 0..32 {
        client
            .execute(
                "update public.user_tokens set balance = balance + 1 where (hashtext(id::text) & 31) = $1",
                &[&part],
            )
            .await
            .expect("backlog");
    }
    let mut daemon = env.spawn_daemon();
    let total = keys.len();
    wait_for("part of the backlog", Duration::from_secs(60), || {
        let mut redis = redis.clone();
        let keys = &keys;
        async move { surviving(&mut redis, keys).await < total }
    })
    .await;
    daemon.kill9();
    let left = outbox_rows(&env).await;
    eprintln!("killed with {left} outbox rows left");
    let _daemon = env.daemon().await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, &keys).await, 0);
    assert_eq!(outbox_rows(&env).await, 0);
}

/// A 100 kB value (far over NOTIFY's 8000-byte payload limit) refreshes
/// through the outbox exactly as `to_jsonb` renders the row.
#[tokio::test(flavor = "multi_thread")]
async fn large_values_pass_through_the_outbox() {
    let mut env = TestEnv::start(1).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    let client = env.pg.client().await;
    client
        .batch_execute("create table public.docs (id int primary key, body text, at timestamptz)")
        .await
        .expect("docs");
    env.write_config(
        "[[rules]]\ntable = \"public.docs\"\nkeys = [\"doc:{id}\"]\naction = \"refresh\"\nttl = \"1h\"\n",
    );
    env.setup();
    let _daemon = env.daemon().await;
    client
        .batch_execute(
            "set timezone = 'America/New_York'; \
             insert into public.docs select 1, string_agg(md5(g::text), ''), '2026-11-26 07:00:00.5+00' from generate_series(1, 3200) g",
        )
        .await
        .expect("insert 100 kB");
    env.sync().await;
    let mut redis = env.redis.conn().await;
    let cached: String = redis::cmd("GET")
        .arg("doc:1")
        .query_async(&mut redis)
        .await
        .expect("cached");
    assert!(cached.len() > 100_000, "{}", cached.len());
    client
        .batch_execute("set timezone = 'UTC'")
        .await
        .expect("tz");
    let same: bool = client
        .query_one(
            "select $1::text::jsonb = to_jsonb(d) from public.docs d where id = 1",
            &[&cached],
        )
        .await
        .expect("compare")
        .get(0);
    assert!(same, "cached row differs from to_jsonb");
}

/// Two daemons on one outbox: one drains, the other stands by (the drain
/// lock); every change is applied once (one event each). Killed with -9,
/// the first one's lock goes with its session and the second takes over
/// from the recorded position: nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn one_of_two_daemons_drains_and_the_other_takes_over() {
    let mut env = outbox_env(10_000).await;
    let keys = balance_keys(&env).await;
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &keys).await;
    let client = redis::Client::open(env.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe("cache-invalidation")
        .await
        .expect("subscribe");
    let counter = tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        let mut n = 0;
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_secs(10), messages.next()).await
        {
            if msg
                .get_payload::<String>()
                .unwrap_or_default()
                .contains("public.user_tokens")
            {
                n += 1;
            }
        }
        n
    });
    let mut first = env.daemon().await;
    env.http_port = crate::support::free_port();
    env.write_config("");
    let second = env.spawn_daemon();
    wait_for(
        "the second daemon to stand by",
        Duration::from_secs(20),
        || async { second.log().contains("standing by") },
    )
    .await;
    let db = env.pg.client().await;
    for part in 0..10 {
        db.execute(
            "update public.user_tokens set balance = balance + 1 where (hashtext(id::text) & 15) = $1 % 16",
            &[&part],
        )
        .await
        .expect("writes");
    }
    env.sync().await;
    wait_for(
        "the position to be recorded",
        Duration::from_secs(10),
        || async { outbox_rows(&env).await == 0 },
    )
    .await;
    // The first one is killed: the second takes over the lock and drains
    // the rest, from where the first recorded its position.
    first.kill9();
    for part in 10..20 {
        db.execute(
            "update public.user_tokens set balance = balance + 1 where (hashtext(id::text) & 15) = $1 % 16",
            &[&part],
        )
        .await
        .expect("writes");
    }
    env.sync().await;
    assert!(
        second.log().contains("draining the outbox"),
        "{}",
        second.log()
    );
    assert_eq!(surviving(&mut redis, &keys).await, 0);
    wait_for(
        "the outbox to be drained",
        Duration::from_secs(10),
        || async { outbox_rows(&env).await == 0 },
    )
    .await;
    let expected: i64 = db
        .query_one(
            "select sum(c)::int8 from (select count(*) as c from public.user_tokens, generate_series(0, 19) p \
              where (hashtext(id::text) & 15) = p % 16 group by p) x",
            &[],
        )
        .await
        .expect("expected")
        .get(0);
    let events = counter.await.expect("counter");
    assert_eq!(
        events, expected,
        "each change applied once (the second daemon stood by until the first was killed)"
    );
}

/// Through PgBouncer in session mode (as through Supabase's pooler): the
/// LISTEN wake-up works (the poll interval is a minute, so only NOTIFY can
/// make it fast), and changes are applied.
#[tokio::test(flavor = "multi_thread")]
async fn works_through_pgbouncer_in_session_mode() {
    let mut env = outbox_env(5).await;
    let bouncer = PgBouncer::start(&env.pg).await;
    env.url_override = Some(bouncer.url());
    env.write_config("[outbox]\npoll_interval = \"60s\"\n");
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let started = std::time::Instant::now();
    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "update public.profiles set bio = 'pooled' where id = '{}'",
            u[0].id
        ),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{}", u[0].id)]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "woke only by polling: {}",
        bouncer.log()
    );
}

/// Setup is idempotent and follows the rules: dropping a rule and running
/// setup again removes that table's triggers; check-config agrees.
#[tokio::test(flavor = "multi_thread")]
async fn setup_follows_rule_changes() {
    let env = outbox_env(1).await;
    let out = env.cli(&["setup"]);
    assert!(out.status.success());
    let triggers = |client: tokio_postgres::Client| async move {
        client
            .query_one(
                "select count(*) from pg_trigger where tgname = 'pgci_capture' and tgrelid = 'public.user_journeys'::regclass",
                &[],
            )
            .await
            .expect("triggers")
            .get::<_, i64>(0)
    };
    assert_eq!(triggers(env.pg.client().await).await, 1);
    let config = std::fs::read_to_string(&env.config).expect("config");
    let without = config.replace(
        "[[rules]]\ntable  = \"public.user_journeys\"\nkeys   = [\"journey:user:{user_id}\"]\naction = \"delete\"",
        "",
    );
    assert_ne!(config, without, "rule not found in the config");
    std::fs::write(&env.config, &without).expect("write");
    let out = env.cli(&["setup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(triggers(env.pg.client().await).await, 0);
    let out = env.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("backlog_rows"));
    let out = env.cli(&["teardown"]);
    assert!(out.status.success());
    let out = env.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not installed"));
}

/// `setup --print` for the demo rules is sql/outbox/setup.sql, and the
/// daemon runs as the least-privilege role of sql/outbox/role.sql.
#[tokio::test(flavor = "multi_thread")]
async fn shipped_sql_matches_and_the_least_privilege_role_works() {
    let mut env = TestEnv::start(3).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_demo_config();
    let out = env.cli(&["setup", "--print"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let printed: Vec<&str> = stdout.lines().skip(1).collect();
    let golden =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/outbox/setup.sql"))
            .expect("sql/outbox/setup.sql");
    let (_, golden) = golden
        .split_once("\n\n")
        .expect("header, blank line, statements");
    assert_eq!(
        printed,
        golden.lines().collect::<Vec<_>>(),
        "sql/outbox/setup.sql is stale"
    );

    env.write_config("");
    env.setup();
    let role = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/outbox/role.sql"))
        .expect("sql/outbox/role.sql")
        .replace(":password", "'not-used-with-trust'");
    env.pg
        .client()
        .await
        .batch_execute(&role)
        .await
        .expect("role.sql");
    env.url_override = Some(format!(
        "postgres://cache_invalidator@127.0.0.1:{}/postgres?sslmode=disable",
        env.pg.port
    ));
    env.write_config("");
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "update public.profiles set bio = 'least' where id = '{}'",
            u[0].id
        ),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{}", u[0].id)]);
}

/// Two tables whose schema and name join to the same text
/// (`app.user_tokens` and `app_user.tokens`) get trigger functions of their
/// own, so each table's changes invalidate its own keys.
#[tokio::test(flavor = "multi_thread")]
async fn tables_whose_names_join_alike_keep_their_own_triggers() {
    let mut env = TestEnv::start(1).await;
    env.pg
        .client()
        .await
        .batch_execute(
            "create schema app; create schema app_user; \
             create table app.user_tokens (id int primary key, v int); \
             create table app_user.tokens (id int primary key, v int); \
             insert into app.user_tokens values (1, 0); insert into app_user.tokens values (1, 0);",
        )
        .await
        .expect("tables");
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_config(
        "[[rules]]\ntable = \"app.user_tokens\"\nkeys = [\"a:{id}\"]\n\n\
         [[rules]]\ntable = \"app_user.tokens\"\nkeys = [\"b:{id}\"]\n",
    );
    env.setup();
    let _daemon = env.daemon().await;
    let mut redis = env.redis.conn().await;
    let keys = vec!["a:1".to_string(), "b:1".to_string()];
    preset(&mut redis, &keys).await;
    env.pg
        .client()
        .await
        .batch_execute("update app_user.tokens set v = 1")
        .await
        .expect("update");
    env.sync().await;
    assert_eq!(surviving(&mut redis, &keys[..1]).await, 1, "a:1 must stay");
    assert_eq!(surviving(&mut redis, &keys[1..]).await, 0, "b:1 must go");
    env.pg
        .client()
        .await
        .batch_execute("update app.user_tokens set v = 1")
        .await
        .expect("update");
    env.sync().await;
    assert_eq!(surviving(&mut redis, &keys).await, 0);
}

/// SIGTERM while a large backlog drains is honoured at once: the daemon
/// applies and deletes the claim it holds, exits 0 within seconds, and
/// leaves the rest of the backlog for the next start, which drains it.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_a_backlog_drains_stops_promptly() {
    let mut env = TestEnv::start(15_000).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_config("[outbox]\nbatch_size = 50\n");
    env.setup();
    let client = env.pg.client().await;
    for part in 0..8 {
        client
            .execute(
                "update public.user_tokens set balance = balance + 1 where (hashtext(id::text) & 7) = $1",
                &[&part],
            )
            .await
            .expect("backlog");
    }
    let backlog = outbox_rows(&env).await;
    let mut daemon = env.spawn_daemon();
    // Generous: a daemon starts in well under a second, but CI once
    // waited 30 s here, with six jobs on two cores.
    daemon
        .wait_for("draining to start", Duration::from_secs(90), || async {
            outbox_rows(&env).await < backlog
        })
        .await;
    let asked = std::time::Instant::now();
    let status = daemon.terminate().await;
    let took = asked.elapsed();
    assert!(status.success(), "{}", daemon.log());
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM took {took:?} to be honoured"
    );
    let left = outbox_rows(&env).await;
    assert!(left > 0, "the whole backlog was drained before stopping");
    let keys = balance_keys(&env).await;
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &keys).await;
    let mut daemon = env.daemon().await;
    daemon
        .wait_for(
            "the rest of the backlog",
            Duration::from_secs(120),
            || async { outbox_rows(&env).await == 0 },
        )
        .await;
}

/// An ADD COLUMN on a table whose rows are refreshed whole, while the
/// daemon runs: the trigger captures the wider row at once, and the daemon
/// reads the table again and caches the row with the new column, as
/// `to_jsonb` renders it, instead of flushing the table's keys on every row
/// until `setup` runs again.
#[tokio::test(flavor = "multi_thread")]
async fn add_column_on_a_whole_row_table_is_read_without_setup() {
    let mut env = TestEnv::start(1).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    let client = env.pg.client().await;
    client
        .batch_execute("create table public.notes (id int primary key, body text); insert into public.notes values (1, 'a')")
        .await
        .expect("notes");
    env.write_config(
        "[[rules]]\ntable = \"public.notes\"\nkeys = [\"note:{id}\"]\naction = \"refresh\"\nttl = \"1h\"\n",
    );
    env.setup();
    let daemon = env.daemon().await;
    client
        .batch_execute("alter table public.notes add column stars int default 3; update public.notes set body = 'b'")
        .await
        .expect("add column and update");
    env.sync().await;
    let mut redis = env.redis.conn().await;
    let cached: Option<String> = redis::cmd("GET")
        .arg("note:1")
        .query_async(&mut redis)
        .await
        .expect("get");
    let cached =
        cached.unwrap_or_else(|| panic!("note:1 was flushed, not refreshed: {}", daemon.log()));
    let same: bool = client
        .query_one(
            "select $1::text::jsonb = to_jsonb(n) from public.notes n where id = 1",
            &[&cached],
        )
        .await
        .expect("compare")
        .get(0);
    assert!(same, "{cached}");
}

/// A table that no longer binds (a key column dropped while rows for it
/// wait in the outbox): its rows' keys cannot be rendered, so they are
/// applied as a flush of the table's keys (never deleted unapplied, never
/// a stop that every restart would repeat); the daemon logs the problem and
/// is not ready while the rule does not fit the table.
#[tokio::test(flavor = "multi_thread")]
async fn rows_of_a_table_that_no_longer_binds_flush_its_keys() {
    let mut env = TestEnv::start(1).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    let client = env.pg.client().await;
    client
        .batch_execute("create table public.tags (id int primary key, owner int); insert into public.tags values (1, 1)")
        .await
        .expect("tags");
    env.write_config("[[rules]]\ntable = \"public.tags\"\nkeys = [\"tags:owner:{owner}\"]\n");
    env.setup();
    let mut daemon = env.daemon().await;
    // Redis goes away: the claim is applied but never confirmed, so the
    // rows stay in the outbox.
    env.redis.kill();
    client
        .batch_execute("update public.tags set owner = 2")
        .await
        .expect("update");
    wait_for("the row to be claimed", Duration::from_secs(10), || async {
        daemon.log().contains("redis batch failed")
    })
    .await;
    client
        .batch_execute("alter table public.tags drop column owner cascade")
        .await
        .expect("drop the key column");
    // The outbox session is cut; the new one cannot bind the rule.
    client
        .batch_execute(
            "select pg_terminate_backend(pid) from pg_stat_activity \
              where application_name = 'pg-cache-invalidator' and pid <> pg_backend_pid()",
        )
        .await
        .expect("terminate");
    env.redis.restart().await;
    let keys = ["tags:owner:1".to_string(), "tags:owner:2".to_string()];
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &keys).await;
    wait_for(
        "the table's keys to be flushed",
        Duration::from_secs(30),
        || {
            let mut redis = redis.clone();
            let keys = keys.clone();
            async move { surviving(&mut redis, &keys).await == 0 }
        },
    )
    .await;
    wait_for(
        "the problem to be logged",
        Duration::from_secs(30),
        || async { daemon.log().contains("no longer has column") },
    )
    .await;
    assert!(daemon.try_status().is_none(), "{}", daemon.log());
    crate::support::wait_status(
        "not ready",
        env.http_port,
        "/readyz",
        503,
        Duration::from_secs(10),
    )
    .await;
}

/// Writers NOTIFY only while a drainer waits for a wake-up, at most once per
/// transaction: with no daemon waiting, a burst of writes sends no
/// notification at all (NOTIFY's commit-time lock would serialise them);
/// once the daemon waits, a write wakes it and is applied at once.
#[tokio::test(flavor = "multi_thread")]
async fn writers_notify_only_while_a_drainer_waits() {
    use pg_cache_invalidator::config::SecretUrl;
    use pg_cache_invalidator::db::{ConnInfo, Db};
    let mut env = outbox_env(5).await;
    let conn = ConnInfo::parse(&SecretUrl::new(env.pg.url()), None).expect("conn");
    let (_listener, mut wakes) = Db::connect_listening(&conn, "cache_invalidator")
        .await
        .expect("listen");
    let client = env.pg.client().await;
    for _ in 0..20 {
        client
            .batch_execute("update public.profiles set bio = 'burst'")
            .await
            .expect("write");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        wakes.try_recv().is_err(),
        "a write sent NOTIFY with nobody waiting"
    );

    let mut daemon = env.daemon().await;
    wait_for(
        "the daemon to wait for a wake-up",
        Duration::from_secs(20),
        || async {
            client
                .query_one("select wake from cache_invalidator.state", &[])
                .await
                .is_ok_and(|r| r.get::<_, bool>(0))
        },
    )
    .await;
    assert_eq!(outbox_rows(&env).await, 0, "the burst was drained on start");
    client
        .batch_execute("update public.profiles set bio = 'wake'")
        .await
        .expect("write");
    tokio::time::timeout(Duration::from_secs(5), wakes.recv())
        .await
        .expect("a write NOTIFYs while the daemon waits")
        .expect("listening");
    env.sync().await;
    // A daemon that stops says it no longer waits.
    assert!(daemon.terminate().await.success());
    let waiting: bool = client
        .query_one("select wake from cache_invalidator.state", &[])
        .await
        .expect("state")
        .get(0);
    assert!(!waiting, "a stopped daemon left its wake-up request");
}

/// Writers switch partitions every `rotate_interval` and the drained one is
/// emptied with TRUNCATE — but not while a transaction that began writing
/// into it before the switch is still open: its row is applied when it
/// commits, after rows of later transactions, and only then does the
/// partition go. Batches of 7 rows make the drain continue batches across
/// claims.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_open_across_a_partition_switch_is_applied() {
    let mut env = TestEnv::start(40).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_config("[outbox]\nrotate_interval = \"300ms\"\nbatch_size = 7\n");
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 40).await;
    let client = env.pg.client().await;
    async fn current(client: &tokio_postgres::Client) -> i16 {
        client
            .query_one("select current from cache_invalidator.state", &[])
            .await
            .expect("state")
            .get(0)
    }
    let first = current(&client).await;
    let mut long = env.pg.client().await;
    let long_txn = long.transaction().await.expect("begin");
    long_txn
        .execute(
            "update public.profiles set bio = 'long' where id = $1::text::uuid",
            &[&u[0].id],
        )
        .await
        .expect("write in the long transaction");
    // Later transactions, applied while the long one stays open; the
    // writers switch partitions meanwhile.
    for user in &u[1..] {
        client
            .execute(
                "update public.profiles set bio = 'short' where id = $1::text::uuid",
                &[&user.id],
            )
            .await
            .expect("write");
    }
    env.sync().await;
    wait_for(
        "writers to switch partitions",
        Duration::from_secs(20),
        || async { current(&client).await != first },
    )
    .await;
    // The daemon tries to empty the partition the long transaction writes
    // to meanwhile (nothing here may read that partition: it would queue
    // behind the daemon's lock).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key = format!("profile:user:{}", u[0].id);
    let mut redis = env.redis.conn().await;
    preset(&mut redis, std::slice::from_ref(&key)).await;
    long_txn
        .commit()
        .await
        .expect("commit the long transaction");
    env.sync().await;
    assert_eq!(
        surviving(&mut redis, std::slice::from_ref(&key)).await,
        0,
        "the long transaction's change was not applied"
    );
    wait_for(
        "the partition it wrote to to be emptied",
        Duration::from_secs(20),
        || async {
            client
                .query_one(
                    &format!("select count(*) from cache_invalidator.outbox_{first}"),
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 0)
        },
    )
    .await;
    drop(long);
}

/// `setup` over the outbox of earlier versions (a plain table drained with
/// row locks and deletes): refused while it holds rows, with what to do;
/// replaced once it is empty.
#[tokio::test(flavor = "multi_thread")]
async fn setup_replaces_the_earlier_outbox_only_when_it_is_empty() {
    let mut env = TestEnv::start(1).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_config("");
    let client = env.pg.client().await;
    client
        .batch_execute(
            "create schema cache_invalidator; \
             create table cache_invalidator.outbox (id bigserial primary key, relation text not null, op text not null, old_row text, new_row text); \
             create table cache_invalidator.waiting (pid int primary key); \
             insert into cache_invalidator.outbox (relation, op) values ('public.profiles', 'truncate')",
        )
        .await
        .expect("the earlier layout");
    let out = env.cli(&["setup"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("still holds 1 row(s) in the layout of earlier versions"),
        "{stderr}"
    );
    client
        .batch_execute("delete from cache_invalidator.outbox")
        .await
        .expect("drained");
    env.setup();
    let kind: i8 = client
        .query_one(
            "select relkind from pg_class where oid = 'cache_invalidator.outbox'::regclass",
            &[],
        )
        .await
        .expect("relkind")
        .get(0);
    assert_eq!(kind as u8, b'p', "the outbox is partitioned now");
    let _daemon = env.daemon().await;
    env.sync().await;
}

/// `wake_ups = false` (a pooler in transaction mode cannot LISTEN): the
/// daemon never asks writers for NOTIFY and polls every `poll_interval`;
/// changes are applied all the same.
#[tokio::test(flavor = "multi_thread")]
async fn without_wake_ups_the_drain_polls() {
    let mut env = TestEnv::start(5).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_config("[outbox]\nwake_ups = false\npoll_interval = \"200ms\"\n");
    env.setup();
    let _daemon = env.daemon().await;
    let u = users(&env, 2).await;
    let started = std::time::Instant::now();
    let removed = removed_by(
        &env,
        &u,
        &[],
        &format!(
            "update public.profiles set bio = 'polled' where id = '{}'",
            u[0].id
        ),
    )
    .await;
    assert_eq!(removed, [format!("profile:user:{}", u[0].id)]);
    assert!(started.elapsed() < Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let wake: bool = env
        .pg
        .client()
        .await
        .query_one("select wake from cache_invalidator.state", &[])
        .await
        .expect("state")
        .get(0);
    assert!(!wake, "the daemon asked for wake-ups");
}

/// Rows physically left in both outbox partitions.
async fn outbox_physical_rows(env: &TestEnv) -> i64 {
    env.pg
        .client()
        .await
        .query_one(
            "select (select count(*) from cache_invalidator.outbox_0) + (select count(*) from cache_invalidator.outbox_1)",
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

/// kill -9 right after draining 20,000 one-row transactions (the position
/// recorded, the rows not yet emptied), then a restart with no new writes:
/// the outbox is emptied within a rotation. It kept all 20,000 rows: the
/// new process counted no rows drained since the partition switch, so it
/// never switched and emptied the full partition. The first process
/// rotates only every ten minutes, so nothing empties the outbox before
/// the kill however slowly the harness sees the drain end (with 2 s it
/// once rotated and emptied first on a loaded CI machine); the second
/// rotates every 2 s.
#[tokio::test(flavor = "multi_thread")]
async fn the_outbox_empties_after_a_kill9() {
    let mut env = TestEnv::start(2_000).await;
    env.postgres_extra = "source = \"outbox\"\n".to_string();
    env.write_config("[outbox]\nrotate_interval = \"10m\"\n");
    env.setup();
    let client = env.pg.client().await;
    client
        .batch_execute(
            "do $$ declare r record; begin \
               for i in 1..5 loop \
                 for r in select id from public.user_tokens order by id limit 4000 loop \
                   update public.user_tokens set balance = balance + 1 where id = r.id; \
                   commit; \
                 end loop; \
               end loop; end $$",
        )
        .await
        .expect("20,000 one-row transactions");
    let written = outbox_physical_rows(&env).await;
    assert!(written >= 20_000, "{written}");
    let keys = balance_keys(&env).await;
    let mut redis = env.redis.conn().await;
    preset(&mut redis, &keys).await;
    let mut daemon = env.spawn_daemon();
    wait_for(
        "the backlog to be drained and recorded",
        Duration::from_secs(120),
        || async { outbox_rows(&env).await == 0 },
    )
    .await;
    daemon.kill9();
    assert_eq!(surviving(&mut redis, &keys).await, 0);
    let left = outbox_physical_rows(&env).await;
    assert!(left > 0, "emptied before the kill: the test proves nothing");
    env.write_config("[outbox]\nrotate_interval = \"2s\"\n");
    let daemon = env.daemon().await;
    wait_for(
        "the outbox to be emptied",
        Duration::from_secs(30),
        || async { outbox_physical_rows(&env).await == 0 },
    )
    .await;
    drop(daemon);
}

/// `setup` gives the outbox's count of applied batches a start in Redis,
/// so the first run keeps the cache; a run that finds no record (Redis
/// emptied, or a flush after lost writes cut short by a kill) flushes
/// every rule key once before draining.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_without_the_outbox_record_flushes_once() {
    let mut env = outbox_env(5).await;
    let keys = balance_keys(&env).await;
    let mut redis = env.redis.conn().await;
    let recorded: Option<String> = redis::cmd("GET")
        .arg("pgci:position:outbox:cache_invalidator")
        .query_async(&mut redis)
        .await
        .expect("get");
    assert_eq!(recorded.as_deref(), Some("0/0"), "setup records the start");
    preset(&mut redis, &keys).await;
    let daemon = env.daemon().await;
    env.sync().await;
    assert_eq!(
        surviving(&mut redis, &keys).await,
        keys.len(),
        "{}",
        daemon.log()
    );
    drop(daemon);
    let _: () = redis::cmd("DEL")
        .arg("pgci:position:outbox:cache_invalidator")
        .query_async(&mut redis)
        .await
        .expect("del");
    let daemon = env.daemon().await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, &keys).await, 0, "{}", daemon.log());
    assert!(daemon.log().contains("holds no record"), "{}", daemon.log());
}

/// A writer that read the wake-up request before the drainer made it
/// (here: its transaction began before the daemon started) commits
/// without a NOTIFY after the drainer's last look; the drainer, seeing it
/// running when it asked, looks again once it ends instead of sleeping the
/// whole poll interval (a minute here).
#[tokio::test(flavor = "multi_thread")]
async fn a_writer_that_missed_the_wake_up_request_is_seen_without_polling() {
    let mut env = outbox_env(3).await;
    env.write_config("[outbox]\npoll_interval = \"60s\"\n");
    let u = users(&env, 1).await;
    let key = format!("profile:user:{}", u[0].id);
    let mut redis = env.redis.conn().await;
    crate::support::preset(&mut redis, std::slice::from_ref(&key)).await;
    let writer = env.pg.client().await;
    writer.batch_execute("begin").await.expect("begin");
    writer
        .execute(
            "update public.profiles set bio = 'early' where id = $1::text::uuid",
            &[&u[0].id],
        )
        .await
        .expect("update");
    let daemon = env.daemon().await;
    // The drainer asks for wake-ups and waits.
    let admin = env.pg.client().await;
    wait_for(
        "the drainer to ask for wake-ups",
        Duration::from_secs(10),
        || async {
            admin
                .query_one("select wake from cache_invalidator.state", &[])
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.batch_execute("commit").await.expect("commit");
    let committed = std::time::Instant::now();
    let deadline = committed + Duration::from_secs(15);
    while crate::support::surviving(&mut redis, std::slice::from_ref(&key)).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the change was not applied within 15 s of its commit (the poll interval is 60 s): {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("applied {:?} after the commit", committed.elapsed());
}
