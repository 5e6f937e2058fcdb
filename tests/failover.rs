//! PostgreSQL high availability: several hosts in `postgres.url`, and a
//! standby promoted under a running daemon. A real streaming standby (see
//! `Postgres::standby`), real promotions (`pg_promote()`).

use std::time::Duration;

use crate::support::{free_port, http_get, metric, preset, surviving, wait_for, TestEnv};

/// `postgres.url` naming `ports` on loopback, in order, asking for the
/// writable primary.
fn multi_host_url(ports: &[u16]) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "postgres://postgres@{}/postgres?sslmode=disable&target_session_attrs=read-write",
        hosts.join(",")
    )
}

async fn scrape(env: &TestEnv) -> String {
    http_get(env.http_port, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

async fn some_user(env: &TestEnv) -> String {
    pgci_test_support::first_profile_id(&env.pg.client().await).await
}

/// What an app's cache-aside read leaves in Redis: `value` under `key`.
async fn app_fill(redis: &mut redis::aio::MultiplexedConnection, key: &str, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(redis)
        .await
        .expect("app fill");
}

async fn update_bio(env: &TestEnv, user: &str, bio: &str) {
    env.pg
        .client()
        .await
        .execute(
            "update public.profiles set bio = $2 where id = $1::text::uuid",
            &[&user, &bio],
        )
        .await
        .expect("update");
}

/// Waits until the flush after a lost slot has finished. It deletes rule
/// by rule, the sentinel's rule too: until then `env.sync()` may see its
/// sentinel go with the flush, before the rebuilt slot streams (a pg17 CI
/// run failed so).
async fn flush_finished(daemon: &crate::support::Daemon) {
    wait_for("the flush to finish", Duration::from_secs(60), || async {
        daemon
            .log()
            .contains("flushed every key of every rule because changes were missed")
    })
    .await;
}

/// The first host does not answer and the second is a standby: setup,
/// check-config and the daemon all reach the primary, third in the list,
/// and the daemon streams from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_multi_host_url_reaches_the_primary_wherever_it_is_listed() {
    let mut env = TestEnv::start(5).await;
    let standby = env.pg.standby().await;
    let nobody = free_port();
    env.url_override = Some(multi_host_url(&[nobody, standby.port, env.pg.port]));
    env.write_config("");
    env.setup();
    let out = env.cli(&["check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // No synchronized failover slot here: check-config says what a
    // promotion would cost.
    assert!(
        stderr.contains(
            "warning: postgres.url names standbys, but the slot is not ready for a promotion"
        ) && stderr.contains("a promotion flushes every rule key"),
        "{stderr}"
    );
    let daemon = env.daemon().await;
    let user = some_user(&env).await;
    let key = format!("profile:user:{user}");
    let mut redis = env.redis.conn().await;
    preset(&mut redis, std::slice::from_ref(&key)).await;
    update_bio(&env, &user, "multi-host").await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, &[key]).await, 0);
    // Positions print as PostgreSQL writes them, never as Rust debug text.
    let log = daemon.log();
    assert!(log.contains("lease functions loaded"), "{log}");
    assert!(!log.contains("Lsn(") && !log.contains("loaded=["), "{log}");
    let started = format!("host=127.0.0.1:{}", env.pg.port);
    assert!(
        daemon
            .log()
            .lines()
            .any(|l| l.contains("replication stream started") && l.contains(&started)),
        "{}",
        daemon.log()
    );
}

/// Several hosts without `target_session_attrs=read-write` could land on
/// a standby: refused at start, exit 2, one line saying what to add.
#[tokio::test(flavor = "multi_thread")]
async fn several_hosts_without_read_write_are_refused_at_start() {
    let mut env = TestEnv::start(1).await;
    env.url_override = Some(format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?sslmode=disable",
        free_port(),
        env.pg.port
    ));
    env.write_config("");
    let out = env.cli(&["check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("target_session_attrs=read-write"),
        "{stderr}"
    );
}

/// The primary dies with a change the standby never received (asynchronous
/// replication), after the daemon invalidated its key and an app filled
/// it again from the primary. The standby is promoted: the daemon finds it
/// through the multi-host URL, finds no slot there, flushes every rule key
/// once (the lost change's value among them, which the new primary does
/// not have), recreates the slot, and invalidates what is committed on the
/// new primary.
#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_standby_without_the_slot_is_followed_and_the_rules_keys_flushed_once() {
    let mut env = TestEnv::start(10).await;
    let mut standby = env.pg.standby().await;
    env.url_override = Some(multi_host_url(&[env.pg.port, standby.port]));
    env.write_config("");
    env.setup();
    let daemon = env.daemon().await;
    let user = some_user(&env).await;
    let key = format!("profile:user:{user}");
    let mut redis = env.redis.conn().await;
    update_bio(&env, &user, "replicated").await;
    env.sync().await;
    standby.caught_up_with(&env.pg).await;

    // The standby goes away; the primary commits a change only it has,
    // the daemon invalidates it, and an app caches the primary's answer.
    standby.kill9();
    // The old primary moves on to a WAL segment the standby never gets, so
    // the position the daemon records lies ahead of the new primary's.
    env.pg
        .client()
        .await
        .batch_execute("select pg_switch_wal()")
        .await
        .expect("switch wal");
    update_bio(&env, &user, "lost in the failover").await;
    env.sync().await;
    app_fill(&mut redis, &key, "lost in the failover").await;
    let unrelated = "unrelated:key".to_string();
    preset(&mut redis, std::slice::from_ref(&unrelated)).await;

    // The primary dies; the standby comes back and is promoted.
    env.pg.kill9();
    standby.start_again().await;
    standby.promote().await;
    std::mem::swap(&mut env.pg, &mut standby);
    let bio: String = env
        .pg
        .client()
        .await
        .query_one(
            "select bio from public.profiles where id = $1::text::uuid",
            &[&user],
        )
        .await
        .expect("bio")
        .get(0);
    assert_eq!(bio, "replicated", "the new primary lacks the lost change");

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while surviving(&mut redis, std::slice::from_ref(&key)).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lost change's key was not flushed within 60 s: {}\n-- new primary:\n{}",
            daemon.log(),
            env.pg.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        surviving(&mut redis, &[unrelated]).await,
        1,
        "only rule keys"
    );

    flush_finished(&daemon).await;
    // New changes on the new primary are invalidated.
    preset(&mut redis, std::slice::from_ref(&key)).await;
    update_bio(&env, &user, "after the promotion").await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, std::slice::from_ref(&key)).await, 0);
    let metrics = scrape(&env).await;
    assert_eq!(
        metric(&metrics, "pgci_slot_resets_total"),
        Some(1.0),
        "one flush: {}",
        daemon.log()
    );
    drop(standby);
}

/// The same loss, but the new primary has the slot: it was copied with the
/// data directory (a file-level copy or a snapshot restore), at the
/// position it had then. Resuming from it would replay the changes the
/// standby has and never the lost one, so the value an app cached from the
/// old primary would stay. The daemon sees the new timeline, treats the
/// slot as lost, flushes every rule key once and rebuilds the slot.
#[tokio::test(flavor = "multi_thread")]
async fn a_promoted_standby_with_an_old_copy_of_the_slot_is_not_trusted() {
    let mut env = TestEnv::start(10).await;
    env.write_config("");
    env.setup();
    let mut standby = env.pg.standby_with_slots().await;
    env.url_override = Some(multi_host_url(&[env.pg.port, standby.port]));
    env.write_config("");
    let daemon = env.daemon().await;
    let users: Vec<String> = env
        .pg
        .client()
        .await
        .query(
            "select id::text from public.profiles order by id limit 2",
            &[],
        )
        .await
        .expect("users")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (kept, lost) = (&users[0], &users[1]);
    let lost_key = format!("profile:user:{lost}");
    let mut redis = env.redis.conn().await;
    update_bio(&env, kept, "replicated").await;
    env.sync().await;
    standby.caught_up_with(&env.pg).await;

    standby.kill9();
    update_bio(&env, lost, "lost in the failover").await;
    env.sync().await;
    app_fill(&mut redis, &lost_key, "lost in the failover").await;

    env.pg.kill9();
    standby.start_again().await;
    standby.promote().await;
    std::mem::swap(&mut env.pg, &mut standby);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while surviving(&mut redis, std::slice::from_ref(&lost_key)).await != 0 {
        if std::time::Instant::now() > deadline {
            let value: Option<String> = redis::cmd("GET")
                .arg(&lost_key)
                .query_async(&mut redis)
                .await
                .expect("get");
            panic!(
                "the lost change's key {lost_key} survived ({value:?}): {}",
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.sync().await;
    let metrics = scrape(&env).await;
    assert_eq!(
        metric(&metrics, "pgci_slot_resets_total"),
        Some(1.0),
        "one flush: {}",
        daemon.log()
    );
    drop(standby);
}

/// The primary dies while a decoded commit is still invisible there (it
/// waits for a synchronous standby that died first), and the promoted
/// standby never had it. The daemon applied the change's first deletion
/// pass and waits for its commit to show before the second: on the new
/// primary it never will. The daemon must give that wait up when it finds
/// the slot untrusted, flush, and go on invalidating the new primary's
/// changes. (It used to wait forever: the flush never ran, and nothing
/// after it was invalidated, while it said it was ready.)
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_that_never_showed_does_not_stall_the_daemon_after_a_promotion() {
    let mut env = TestEnv::start(10).await;
    env.write_config("");
    env.setup();
    let mut standby = env.pg.standby_with_slots().await;
    env.url_override = Some(multi_host_url(&[env.pg.port, standby.port]));
    env.write_config("");
    let daemon = env.daemon().await;
    let users: Vec<String> = env
        .pg
        .client()
        .await
        .query(
            "select id::text from public.profiles order by id limit 2",
            &[],
        )
        .await
        .expect("users")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (kept, lost) = (&users[0], &users[1]);
    let (kept_key, lost_key) = (
        format!("profile:user:{kept}"),
        format!("profile:user:{lost}"),
    );
    let mut redis = env.redis.conn().await;
    update_bio(&env, kept, "replicated").await;
    env.sync().await;
    standby.caught_up_with(&env.pg).await;

    // From now on a commit waits for the standby, which is gone.
    let admin = env.pg.client().await;
    for sql in [
        "alter system set synchronous_standby_names = 'standby'",
        "select pg_reload_conf()",
    ] {
        admin
            .batch_execute(sql)
            .await
            .expect("synchronous_standby_names");
    }
    standby.kill9();
    // Its walreceiver may outlive the postmaster for a moment and still
    // acknowledge a commit: wait until the primary has no standby.
    wait_for(
        "the standby to disconnect",
        Duration::from_secs(30),
        || async {
            admin
                .query_one(
                    "select count(*) from pg_stat_replication where application_name = 'standby'",
                    &[],
                )
                .await
                .map(|r| r.get::<_, i64>(0) == 0)
                .unwrap_or(false)
        },
    )
    .await;
    let writer = env.pg.client().await;
    pgci_test_support::sees_synchronous_standbys(&writer, "standby").await;
    app_fill(&mut redis, &lost_key, "cached before the lost change").await;
    let lost_id = lost.clone();
    let held = tokio::spawn(async move {
        // Ends with an error when the primary is killed.
        let _ = writer
            .execute(
                "update public.profiles set bio = 'never visible' where id = $1::text::uuid",
                &[&lost_id],
            )
            .await;
    });
    // The daemon decodes the commit and deletes the key (its first pass)
    // while the commit waits for the standby.
    wait_for(
        "the first deletion pass",
        Duration::from_secs(30),
        || async {
            surviving(&mut env.redis.conn().await, std::slice::from_ref(&lost_key)).await == 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !held.is_finished(),
        "the commit did not wait for the standby: the test proves nothing"
    );
    // A reader fills the key again; only the flush can remove it now.
    app_fill(&mut redis, &lost_key, "cached before the lost change").await;

    env.pg.kill9();
    let _ = held.await;
    standby.start_again().await;
    standby.promote().await;
    std::mem::swap(&mut env.pg, &mut standby);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while surviving(&mut redis, std::slice::from_ref(&lost_key)).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no flush after the promotion: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flush_finished(&daemon).await;
    // And the new primary's changes are invalidated.
    preset(&mut redis, std::slice::from_ref(&kept_key)).await;
    update_bio(&env, kept, "on the new primary").await;
    env.sync().await;
    assert_eq!(
        surviving(&mut redis, std::slice::from_ref(&kept_key)).await,
        0,
        "a change on the new primary was not invalidated: {}",
        daemon.log()
    );
    let metrics = scrape(&env).await;
    assert_eq!(
        metric(&metrics, "pgci_slot_resets_total"),
        Some(1.0),
        "one flush: {}",
        daemon.log()
    );
    drop(standby);
}

/// PostgreSQL 17+, failover slots: setup creates a failover slot, the
/// standby synchronizes it, the primary holds logical changes back until
/// the standby has them. The primary dies in the middle of a stream and
/// the standby is promoted: the daemon resumes from the synchronized slot
/// on the new primary, with no flush, and no key of any committed change
/// survives. (On 15 and 16 there are no failover slots: the test checks
/// that setup does not ask for one.)
#[tokio::test(flavor = "multi_thread")]
async fn a_synchronized_failover_slot_carries_the_stream_through_a_promotion_without_a_flush() {
    let mut env = TestEnv::start(20).await;
    if env.pg.major().await < 17 {
        env.write_config("");
        let out = env.cli(&["setup", "--print"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(
                "pg_create_logical_replication_slot('pg_cache_invalidator', 'pgoutput');"
            ),
            "{stdout}"
        );
        return;
    }
    let mut standby = env.pg.failover_standby().await;
    env.url_override = Some(multi_host_url(&[env.pg.port, standby.port]));
    env.write_config("");
    env.setup();
    let failover: bool = env
        .pg
        .client()
        .await
        .query_one(
            "select failover from pg_replication_slots where slot_name = 'pg_cache_invalidator'",
            &[],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(failover, "setup creates a failover slot on 17+");
    let daemon = env.daemon().await;
    let users: Vec<String> = env
        .pg
        .client()
        .await
        .query("select id::text from public.profiles order by id", &[])
        .await
        .expect("users")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let keys: Vec<String> = users.iter().map(|u| format!("profile:user:{u}")).collect();
    let mut redis = env.redis.conn().await;
    update_bio(&env, &users[0], "before").await;
    env.sync().await;

    // The standby holds a synchronized copy of the slot.
    standby.wait_synced("pg_cache_invalidator", &env.pg).await;
    let out = env.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("yes: a failover slot, and the primary waits for standby1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "standby         127.0.0.1:{} synchronized copy at",
            standby.port
        )),
        "{text}"
    );
    let out = env.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(json["failover_ready"], serde_json::json!(true), "{json}");

    // A stream of one-row transactions; the primary dies in its middle.
    preset(&mut redis, &keys).await;
    let unrelated = "unrelated:key".to_string();
    preset(&mut redis, std::slice::from_ref(&unrelated)).await;
    let writer = env.pg.client().await;
    let mut committed = Vec::new();
    for (i, user) in users.iter().enumerate() {
        if i == users.len() / 2 {
            env.pg.kill9();
            break;
        }
        if writer
            .execute(
                "update public.profiles set bio = $2 where id = $1::text::uuid",
                &[user, &format!("stream {i}")],
            )
            .await
            .is_ok()
        {
            committed.push(format!("profile:user:{user}"));
        }
    }
    drop(writer);
    standby.promote().await;
    std::mem::swap(&mut env.pg, &mut standby);

    // Every change the new primary has committed is invalidated, nothing
    // was flushed, and new changes flow.
    env.sync().await;
    let after = env.pg.client().await;
    for key in &keys {
        let user = key.trim_start_matches("profile:user:");
        let bio: Option<String> = after
            .query_one(
                "select bio from public.profiles where id = $1::text::uuid",
                &[&user],
            )
            .await
            .expect("bio")
            .get(0);
        if bio.as_deref().is_some_and(|b| b.starts_with("stream ")) {
            assert_eq!(
                surviving(&mut redis, std::slice::from_ref(key)).await,
                0,
                "{key} changed on the new primary but is still cached: {}",
                daemon.log()
            );
        }
    }
    assert!(!committed.is_empty());
    assert_eq!(
        surviving(&mut redis, std::slice::from_ref(&unrelated)).await,
        1
    );
    let metrics = scrape(&env).await;
    assert_eq!(
        metric(&metrics, "pgci_slot_resets_total").unwrap_or(0.0),
        0.0,
        "no flush: {}",
        daemon.log()
    );
    assert_eq!(
        metric(&metrics, "pgci_server_changes_total"),
        Some(1.0),
        "{}",
        daemon.log()
    );
    // Write tokens taken on the new primary are honoured: a value cached
    // before the write is never returned for a read that carries its token.
    let mut cache = pgci_client::Cache::new(
        env.redis.conn().await,
        pgci_client::CacheOptions {
            after: pgci_client::AfterPolicy::Wait(Duration::from_secs(10)),
            ..Default::default()
        },
    );
    let reader = env.pg.client().await;
    for user in &users[..3] {
        let key = format!("profile:user:{user}");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("\"before the write\"")
            .query_async(&mut redis)
            .await
            .expect("cached value");
        after
            .execute(
                "update public.profiles set bio = 'after the promotion' where id = $1::text::uuid",
                &[user],
            )
            .await
            .expect("write");
        let token = pgci_client::write_token(&after).await.expect("token");
        let reader = &reader;
        let (value, _) = cache
            .get_or_load(
                &key,
                60,
                || async move {
                    let row = reader
                        .query_one(
                            "select to_jsonb(bio)::text from public.profiles where id = $1::text::uuid",
                            &[user],
                        )
                        .await?;
                    Ok::<_, tokio_postgres::Error>(Some(row.get::<_, String>(0)))
                },
                Some(token),
            )
            .await
            .expect("read with the token");
        assert_eq!(
            value.as_deref(),
            Some("\"after the promotion\""),
            "{key}: a read with the write's token returned {value:?}"
        );
    }
    let untouched: Vec<String> = keys[users.len() / 2..].to_vec();
    assert_eq!(
        surviving(&mut redis, &untouched).await,
        untouched.len(),
        "keys of rows nobody changed were not flushed"
    );
    drop(standby);
}

/// As with an old copy of the slot, but the daemon is stopped (SIGTERM)
/// before the primary dies and started after the promotion: the origin it
/// last streamed from is kept in Redis (`pgci:origin:<slot>`), so the
/// first session on the new primary is still compared with it, and the
/// copy of the slot is not trusted.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_stopped_during_a_promotion_still_does_not_trust_an_old_copy_of_the_slot() {
    let mut env = TestEnv::start(10).await;
    env.write_config("");
    env.setup();
    let mut standby = env.pg.standby_with_slots().await;
    env.url_override = Some(multi_host_url(&[env.pg.port, standby.port]));
    env.write_config("");
    let mut daemon = env.daemon().await;
    let lost = some_user(&env).await;
    let lost_key = format!("profile:user:{lost}");
    let mut redis = env.redis.conn().await;
    env.sync().await;
    standby.caught_up_with(&env.pg).await;
    wait_for("the origin to be stored", Duration::from_secs(10), || {
        let mut redis = redis.clone();
        async move {
            redis::cmd("GET")
                .arg("pgci:origin:pg_cache_invalidator")
                .query_async::<Option<String>>(&mut redis)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.starts_with("v1 "))
        }
    })
    .await;

    standby.kill9();
    update_bio(&env, &lost, "lost in the failover").await;
    env.sync().await;
    app_fill(&mut redis, &lost_key, "lost in the failover").await;
    assert_eq!(daemon.terminate().await.code(), Some(0));

    env.pg.kill9();
    standby.start_again().await;
    standby.promote().await;
    std::mem::swap(&mut env.pg, &mut standby);
    let daemon = env.daemon().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while surviving(&mut redis, std::slice::from_ref(&lost_key)).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lost change's key survived a start after the promotion: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        daemon.log().contains("the database moved to timeline"),
        "{}",
        daemon.log()
    );
    drop(standby);
}

/// `[replication] url` naming `standby` (one host, the same database),
/// heartbeats every 200 ms.
fn decode_on(standby: &crate::support::Postgres) -> String {
    format!(
        "[replication]\nurl = \"postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable\"\nheartbeat_interval = \"200ms\"\n",
        standby.port
    )
}

/// Where `slot` stands on `server`: whether it exists and has confirmed
/// at least `lsn` (`None`: it does not exist).
async fn slot_confirmed_past(server: &crate::support::Postgres, lsn: &str) -> Option<bool> {
    server
        .client()
        .await
        .query_opt(
            "select coalesce(confirmed_flush_lsn >= $1::text::pg_lsn, false) \
               from pg_replication_slots where slot_name = 'pg_cache_invalidator'",
            &[&lsn],
        )
        .await
        .expect("slots")
        .map(|row| row.get(0))
}

/// The daemon started against `env` holds the slot on `standby`.
async fn wait_streaming_on(standby: &crate::support::Postgres, daemon: &crate::support::Daemon) {
    let client = standby.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !crate::support::slot_active(&client).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not stream from the standby: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Decoding on a hot standby (PostgreSQL 16+): `setup` makes the slot
/// there (not on the primary), `status` says where it lives, the daemon
/// streams from the standby and invalidates what the primary commits, the
/// primary's heartbeats reach it through the standby and move the
/// standby's slot while only unwatched tables change, a slot lost on the
/// standby is rebuilt there (with one flush), and `teardown` drops it there.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_on_a_standby_decodes_what_the_primary_commits() {
    let mut env = TestEnv::start(5).await;
    if env.pg.major().await < 16 {
        return;
    }
    let standby = env.pg.standby().await;
    env.write_config(&decode_on(&standby));
    let out = env.cli(&["setup", "--print"]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!(
            "-- on the standby that holds the slot (postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable, replication.url):\n-- replication slot pg_cache_invalidator on the standby"
        , standby.port)) && printed.contains("pg_create_logical_replication_slot('pg_cache_invalidator', 'pgoutput');"),
        "{printed}"
    );
    let out = env.cli(&["setup"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("done: replication slot pg_cache_invalidator on the standby"),
        "{stdout}"
    );
    assert_eq!(
        slot_confirmed_past(&env.pg, "0/0").await,
        None,
        "no slot on the primary"
    );
    assert!(
        slot_confirmed_past(&standby, "0/0").await.is_some(),
        "the slot is on the standby"
    );
    let out = env.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.cli(&["status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!(
            "standby 127.0.0.1:{} (replication.url)",
            standby.port
        )),
        "{status}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut daemon = env.spawn_daemon();
    wait_streaming_on(&standby, &daemon).await;
    let user = some_user(&env).await;
    let key = format!("profile:user:{user}");
    let mut redis = env.redis.conn().await;
    preset(&mut redis, std::slice::from_ref(&key)).await;
    update_bio(&env, &user, "decoded on the standby").await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, std::slice::from_ref(&key)).await, 0);

    // Only an unwatched table changes: the standby's slot still moves past
    // it, and the primary's heartbeats arrive through the standby.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let primary = env.pg.client().await;
    primary
        .batch_execute(
            "create table public.unwatched (n int); insert into public.unwatched select generate_series(1, 1000)",
        )
        .await
        .expect("unwatched writes");
    let lsn: String = primary
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    wait_for(
        "the standby's slot to confirm past the unwatched writes",
        Duration::from_secs(30),
        || async { slot_confirmed_past(&standby, &lsn).await == Some(true) },
    )
    .await;
    wait_for(
        "a heartbeat decoded on the standby",
        Duration::from_secs(30),
        || async {
            metric(&scrape(&env).await, "pgci_last_heartbeat_timestamp_seconds")
                .is_some_and(|at| at > started)
        },
    )
    .await;
    assert!(
        metric(&scrape(&env).await, "pgci_slot_retained_wal_bytes").is_some(),
        "the slot's retained WAL is read on the standby"
    );

    // The slot is lost on the standby while the daemon is down: the next
    // start rebuilds it there and flushes the rules' keys once.
    daemon.kill9();
    // The killed daemon's walsender may hold the slot for a moment.
    let client = standby.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(error) = client
        .batch_execute("select pg_drop_replication_slot('pg_cache_invalidator')")
        .await
    {
        assert!(
            std::time::Instant::now() < deadline,
            "drop the standby's slot: {error}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    update_bio(&env, &user, "missed while no slot").await;
    app_fill(&mut redis, &key, "missed while no slot").await;
    let mut daemon = env.spawn_daemon();
    wait_streaming_on(&standby, &daemon).await;
    wait_for(
        "the missed change's key to be flushed",
        Duration::from_secs(60),
        || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move { surviving(&mut redis, &[key]).await == 0 }
        },
    )
    .await;
    assert_eq!(
        slot_confirmed_past(&env.pg, "0/0").await,
        None,
        "still no slot on the primary"
    );
    preset(&mut redis, std::slice::from_ref(&key)).await;
    update_bio(&env, &user, "after the rebuild").await;
    env.sync().await;
    assert_eq!(surviving(&mut redis, std::slice::from_ref(&key)).await, 0);

    assert_eq!(daemon.terminate().await.code(), Some(0), "{}", daemon.log());
    let out = env.cli(&["teardown"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        slot_confirmed_past(&standby, "0/0").await,
        None,
        "teardown dropped it there"
    );
}

/// A slot on a standby cannot release the primary's commits: with the
/// daemon's application_name in the primary's
/// `synchronous_standby_names`, `check-config` and `run` refuse at start
/// (exit 2, one line saying why and what to do).
#[tokio::test(flavor = "multi_thread")]
async fn synchronous_invalidation_is_refused_when_the_slot_is_on_a_standby() {
    let mut env = TestEnv::start(1).await;
    if env.pg.major().await < 16 {
        return;
    }
    let standby = env.pg.standby().await;
    env.write_config(&decode_on(&standby));
    env.setup();
    // The physical standby ("standby") is first, so the primary's own
    // commits are not held up.
    let primary = env.pg.client().await;
    for sql in [
        "alter system set synchronous_standby_names = 'FIRST 1 (standby, \"PG-Cache-Invalidator\")'",
        "select pg_reload_conf()",
    ] {
        primary.batch_execute(sql).await.expect("synchronous_standby_names");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = env.cli(&["check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("synchronous_standby_names") && stderr.contains("remove replication.url"),
        "{stderr}"
    );
    let mut daemon = env.spawn_daemon();
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2), "{}", daemon.log());
    assert!(
        daemon.log().contains("synchronous_standby_names"),
        "{}",
        daemon.log()
    );
    drop(standby);
}
