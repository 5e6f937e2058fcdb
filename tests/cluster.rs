//! Redis Cluster as the cache (`[redis] cluster = true`), against a real
//! three-master, three-replica cluster the harness forms on loopback
//! ports: keys across every master, events, refreshed values with their
//! version keys, TRUNCATE flushed on every master, and a kill -9 in the
//! middle of a backlog.

use std::time::Duration;

use futures_util::StreamExt;
use pgci_client::{write_token, Cache, CacheOptions};
use pgci_test_support::redis_cluster::{preset_by_key as preset, surviving_by_key as surviving};
use pgci_test_support::RedisCluster;
use redis::cluster_async::ClusterConnection;

use crate::support::{balance_keys, wait_for, TestEnv};

/// An environment whose daemon writes to a fresh cluster.
async fn cluster_env(users: i32, extra: &str) -> (TestEnv, RedisCluster) {
    cluster_env_with(users, "", extra).await
}

/// Like [`cluster_env`], with more `[redis]` settings.
async fn cluster_env_with(users: i32, redis: &str, extra: &str) -> (TestEnv, RedisCluster) {
    let (mut env, cluster) = tokio::join!(TestEnv::start(users), RedisCluster::start());
    env.redis_url_override = Some(cluster.url());
    env.redis_extra = format!("cluster = true\n{redis}");
    env.write_config(extra);
    env.setup();
    (env, cluster)
}

/// Waits until the daemon has applied everything committed so far: the
/// sentinel rule's key is gone and the recorded position covers it.
async fn sync(env: &TestEnv, conn: &mut ClusterConnection) {
    let pg = env.pg.client().await;
    let id: String = pg
        .query_one("select gen_random_uuid()::text", &[])
        .await
        .expect("id")
        .get(0);
    let key = format!("sentinel:pillar:{id}");
    preset(conn, std::slice::from_ref(&key)).await;
    pg.execute(
        "insert into public.pillars (id, slug) values ($1::text::uuid, 'sentinel-' || $1)",
        &[&id],
    )
    .await
    .expect("sentinel");
    // A batch's slots are applied concurrently: the sentinel's key may go
    // before another master acknowledged its part. The recorded position
    // moves only once every part was acknowledged.
    let token = write_token(&pg).await.expect("token");
    wait_for("the daemon to catch up", Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let applied = Cache::new(conn.clone(), CacheOptions::default())
                .applied()
                .await
                .ok()
                .flatten();
            surviving(&mut conn, std::slice::from_ref(&key)).await == 0
                && applied.is_some_and(|a| a >= token.0)
        }
    })
    .await;
}

/// Keys spread over every master are invalidated by one multi-row
/// transaction (one atomic pipeline per hash slot), and its events reach a
/// subscriber on any node (PUBLISH is cluster-wide). Every master's `INFO`
/// shows in the metrics.
#[tokio::test(flavor = "multi_thread")]
async fn keys_on_every_master_are_invalidated_and_announced() {
    let (mut env, cluster) = cluster_env_with(20, "info_interval = \"1s\"", "").await;
    let _daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    let keys = balance_keys(&env).await;
    assert_eq!(keys.len(), 60, "20 users, a total and two tokens each");
    preset(&mut conn, &keys).await;
    // Subscribe on the last node: not the one the daemon was given.
    let last = cluster.urls().pop().expect("nodes");
    let mut pubsub = redis::Client::open(last)
        .expect("url")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    pubsub
        .subscribe("cache-invalidation")
        .await
        .expect("subscribe");
    let mut messages = pubsub.into_on_message();
    env.pg
        .client()
        .await
        .execute("update public.user_tokens set balance = balance + 1", &[])
        .await
        .expect("update");
    sync(&env, &mut conn).await;
    assert_eq!(surviving(&mut conn, &keys).await, 0);
    let mut updates = 0;
    while updates < 40 {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("an event within 10 s")
            .expect("stream");
        let payload: String = message.get_payload().expect("payload");
        if payload.contains("\"table\":\"public.user_tokens\"") {
            updates += 1;
        }
    }
    for port in cluster.master_ports().await {
        let series = format!("pgci_redis_memory_used_bytes{{target=\"127.0.0.1:{port}\"}}");
        let port = env.http_port;
        wait_for("every master's INFO", Duration::from_secs(10), || {
            let series = series.clone();
            async move {
                let text = crate::support::http_get(port, "/metrics")
                    .await
                    .map(|(_, text)| text)
                    .unwrap_or_default();
                crate::support::metric(&text, &series).is_some_and(|n| n > 0.0)
            }
        })
        .await;
    }
}

/// A refresh rule writes values and their version keys in each key's own
/// slot (the guarded script needs both in one slot).
#[tokio::test(flavor = "multi_thread")]
async fn refreshed_values_are_written_with_their_versions() {
    let rule = "[[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile-json:user:{id}\"]\naction = \"refresh\"\nttl = \"1h\"\n";
    let (mut env, cluster) = cluster_env(10, rule).await;
    let _daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    let pg = env.pg.client().await;
    let ids: Vec<String> = pg
        .query(
            "update public.profiles set bio = 'on a cluster' returning id::text",
            &[],
        )
        .await
        .expect("update")
        .iter()
        .map(|r| r.get(0))
        .collect();
    sync(&env, &mut conn).await;
    for id in &ids {
        let key = format!("profile-json:user:{id}");
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("get");
        assert!(
            value.as_deref().is_some_and(|v| v.contains("on a cluster")),
            "{key}: {value:?}"
        );
        let version: Option<String> = redis::cmd("GET")
            .arg(format!("{{{key}}}:pgci-version"))
            .query_async(&mut conn)
            .await
            .expect("get version");
        assert!(version.is_some(), "{key} has its version");
    }
}

/// TRUNCATE flushes the table's keys on every master, and only them.
#[tokio::test(flavor = "multi_thread")]
async fn truncate_flushes_every_master() {
    let (mut env, cluster) = cluster_env(20, "").await;
    let _daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    let keys = balance_keys(&env).await;
    preset(&mut conn, &keys).await;
    // No row renders these: only a flush by pattern removes the first.
    let strays = stray_balances();
    let other = "profile:user:stray".to_string();
    preset(&mut conn, &strays).await;
    preset(&mut conn, std::slice::from_ref(&other)).await;
    truncate_user_tokens(&env).await;
    sync(&env, &mut conn).await;
    assert_eq!(surviving(&mut conn, &keys).await, 0);
    assert_eq!(surviving(&mut conn, &strays).await, 0, "on every master");
    assert_eq!(surviving(&mut conn, std::slice::from_ref(&other)).await, 1);
}

/// A TRUNCATE after `CLIENT KILL` took the daemon's connections to some
/// masters (not the one whose slot map it reads first) flushes every
/// master. The flush's SCAN on a killed connection used to fail without
/// dropping it, and the batch was retried on it for ever (found by the
/// cluster soak: the daemon stalled after a `client-kill` round).
#[tokio::test(flavor = "multi_thread")]
async fn a_truncate_after_client_kill_flushes_every_master() {
    let (mut env, cluster) = cluster_env(20, "").await;
    let _daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    sync(&env, &mut conn).await;
    let keys = balance_keys(&env).await;
    preset(&mut conn, &keys).await;
    let strays = stray_balances();
    preset(&mut conn, &strays).await;
    let first = slot_owner(cluster.master_ports().await[0], 0);
    for port in cluster.master_ports().await {
        if port != first {
            redis_cli(port, &["client", "kill", "type", "normal"]);
        }
    }
    truncate_user_tokens(&env).await;
    sync(&env, &mut conn).await;
    assert_eq!(surviving(&mut conn, &keys).await, 0);
    assert_eq!(surviving(&mut conn, &strays).await, 0, "on every master");
}

/// Balance keys no row renders: only a flush by pattern removes them.
fn stray_balances() -> [String; 3] {
    ["stray-1", "stray-2", "stray-3"].map(|s| format!("balance:user:{s}"))
}

/// `TRUNCATE public.user_tokens` (its rules' keys are flushed).
async fn truncate_user_tokens(env: &TestEnv) {
    env.pg
        .client()
        .await
        .batch_execute("truncate public.user_tokens")
        .await
        .expect("truncate");
}

/// The port of the master serving `slot`, as the node on `port` sees it.
fn slot_owner(port: u16, slot: u16) -> u16 {
    let nodes = redis_cli(port, &["cluster", "nodes"]);
    nodes
        .lines()
        .filter(|line| line.contains("master"))
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let serves = fields.iter().skip(8).any(|range| {
                let mut ends = range.split('-').map(|n| n.parse::<u16>().ok());
                match (ends.next().flatten(), ends.next().flatten()) {
                    (Some(from), Some(to)) => (from..=to).contains(&slot),
                    (Some(only), None) => only == slot,
                    _ => false,
                }
            });
            let addr = fields.get(1)?.split('@').next()?;
            serves
                .then(|| addr.rsplit(':').next()?.parse().ok())
                .flatten()
        })
        .expect("a master serves the slot")
}

/// `redis-cli -p port args…`'s output.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new(crate::support::redis_cli_bin())
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A daemon killed -9 in the middle of a backlog, restarted, applies
/// everything: no key left stale. The backlog's last 400 transactions are
/// the only ones touching the checked keys, so the kill lands before them.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_in_the_middle_of_a_backlog_loses_nothing() {
    let (mut env, cluster) = cluster_env(200, "").await;
    let mut conn = cluster.conn().await;
    let pg = env.pg.client().await;
    let mut keys: Vec<String> = Vec::new();
    for row in pg
        .query(
            "select user_id::text, token_id::text from public.user_tokens order by user_id, token_id offset 200",
            &[],
        )
        .await
        .expect("rows")
    {
        let (user, token): (String, String) = (row.get(0), row.get(1));
        keys.push(format!("balance:user:{user}"));
        keys.push(format!("balance:user:{user}:token:{token}"));
    }
    keys.sort();
    keys.dedup();
    let mut daemon = env.daemon().await;
    sync(&env, &mut conn).await;
    daemon.kill9();
    pg.batch_execute(
        "do $$ begin \
           for i in 1..19600 loop \
             update public.user_tokens set balance = balance + 1 \
              where ctid = (select ctid from public.user_tokens order by user_id, token_id offset i % 200 limit 1); \
             commit; \
           end loop; \
           for i in 200..399 loop \
             update public.user_tokens set balance = balance + 1 \
              where ctid = (select ctid from public.user_tokens order by user_id, token_id offset i limit 1); \
             commit; \
           end loop; \
         end $$",
    )
    .await
    .expect("backlog");
    preset(&mut conn, &keys).await;
    let mut daemon = env.daemon().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    daemon.kill9();
    let left = surviving(&mut conn, &keys).await;
    assert!(
        left > 0,
        "the kill came after the whole backlog was applied: lengthen it"
    );
    let _daemon = env.daemon().await;
    sync(&env, &mut conn).await;
    assert_eq!(
        surviving(&mut conn, &keys).await,
        0,
        "{left} keys left at the kill; every one is invalidated after the restart"
    );
}

/// The command-line verbs reach the cluster: `check-config` and `status`
/// succeed (the position record is read from its slot's master), `flush
/// --table` deletes the table's keys on every master, and `verify`, which
/// reads one server only so far, says so.
#[tokio::test(flavor = "multi_thread")]
async fn the_verbs_work_on_a_cluster() {
    let (mut env, cluster) = cluster_env(20, "").await;
    let _daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    sync(&env, &mut conn).await;
    for verb in ["check-config", "status"] {
        let out = env.cli(&[verb]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{verb}: {text}");
        assert!(!text.contains("MOVED"), "{verb}: {text}");
    }
    let keys = balance_keys(&env).await;
    preset(&mut conn, &keys).await;
    let out = env.cli(&["flush", "--table", "public.user_tokens"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(surviving(&mut conn, &keys).await, 0);
    let out = env.cli(&["verify"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Redis Cluster"));
}

/// The node id of the cluster node on `port`.
fn node_id(port: u16) -> String {
    redis_cli(port, &["cluster", "myid"]).trim().to_string()
}

/// Rounds of writes while 2,000 slots move between masters
/// (`redis-cli --cluster reshard`): every round presets the keys of all
/// rows, then updates each row in a transaction of its own. Afterwards no
/// key of the last round survives (its invalidations were applied through
/// `MOVED`/`ASK`), and every refreshed profile holds its row's last bio
/// (no key's operations were reordered or lost). The daemon must have
/// read the slot map again (it was told MOVED).
///
/// With the redis crate's cluster client this stalled for good: its slot
/// refresh never completed after the reshard.
#[tokio::test(flavor = "multi_thread")]
async fn a_reshard_in_the_middle_of_a_stream_loses_and_reorders_nothing() {
    let rule = "[[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile-json:user:{id}\"]\naction = \"refresh\"\nttl = \"1h\"\n";
    let (mut env, cluster) = cluster_env(50, rule).await;
    let daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    let keys = balance_keys(&env).await;
    let masters = cluster.master_ports().await;
    let (from, to) = (node_id(masters[0]), node_id(masters[1]));
    let seed = masters[0];
    let log = env.path("reshard.log");
    let mut reshard = std::process::Command::new(crate::support::redis_cli_bin())
        .args(["--cluster", "reshard", &format!("127.0.0.1:{seed}")])
        .args(["--cluster-from", &from, "--cluster-to", &to])
        .args(["--cluster-slots", "2000", "--cluster-yes"])
        .stdout(std::fs::File::create(&log).expect("reshard.log"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli --cluster reshard");
    let pg = env.pg.client().await;
    let mut round = 0;
    // Bounded in time, not rounds: under CI load a round takes longer.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut finished = None;
    while finished.is_none() || round < 3 {
        if finished.is_none() {
            finished = reshard.try_wait().expect("reshard status");
        }
        round += 1;
        preset(&mut conn, &keys).await;
        pg.batch_execute(&format!(
            "do $$ declare r record; begin \
               for r in select ctid from public.user_tokens loop \
                 update public.user_tokens set balance = balance + 1 where ctid = r.ctid; commit; \
               end loop; \
               update public.profiles set bio = 'round {round}'; \
             end $$"
        ))
        .await
        .expect("round");
        if std::time::Instant::now() > deadline {
            let _ = reshard.kill();
            panic!(
                "the reshard did not finish in 300 s ({round} rounds): {}",
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    let out = reshard.wait_with_output().expect("reshard output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sync(&env, &mut conn).await;
    assert_eq!(surviving(&mut conn, &keys).await, 0, "after {round} rounds");
    let ids: Vec<String> = pg
        .query("select id::text from public.profiles", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in ids {
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("profile-json:user:{id}"))
            .query_async(&mut conn)
            .await
            .expect("get");
        assert!(
            value
                .as_deref()
                .is_some_and(|v| v.contains(&format!("round {round}"))),
            "profile {id}: {value:?} after round {round}"
        );
    }
    let (_, metrics) = crate::support::http_get(env.http_port, "/metrics")
        .await
        .expect("metrics");
    let reads = crate::support::metric(&metrics, "pgci_cluster_map_reads_total");
    assert!(
        reads.is_some_and(|n| n >= 2.0),
        "the map was read at start only ({reads:?}): the reshard never reached the daemon\n{}",
        daemon.log()
    );
}

/// The row's profile values (`profile-json:user:{id}`) all hold `bio`.
async fn assert_profiles_hold(env: &TestEnv, conn: &mut ClusterConnection, bio: &str) {
    let pg = env.pg.client().await;
    for row in pg
        .query("select id::text from public.profiles", &[])
        .await
        .expect("ids")
    {
        let id: String = row.get(0);
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("profile-json:user:{id}"))
            .query_async(conn)
            .await
            .expect("get");
        assert!(
            value.as_deref().is_some_and(|v| v.contains(bio)),
            "profile {id}: {value:?}, expected {bio}"
        );
    }
}

/// A master handed over to its replica (`CLUSTER FAILOVER`) and another
/// master killed -9, both while the daemon streams one-row transactions:
/// afterwards no key of a row updated since it was cached survives, and
/// every refreshed profile holds its row's last bio. The daemon waits out
/// the dead master (its batch is retried until the replica took over),
/// and it read the slot map again.
#[tokio::test(flavor = "multi_thread")]
async fn a_master_failover_in_the_middle_of_a_stream_loses_nothing() {
    let rule = "[[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile-json:user:{id}\"]\naction = \"refresh\"\nttl = \"1h\"\n";
    let (mut env, mut cluster) = cluster_env(50, rule).await;
    let daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    let keys = balance_keys(&env).await;
    preset(&mut conn, &keys).await;
    let pg = env.pg.client().await;
    let stream = tokio::spawn(async move {
        pg.batch_execute(
            "do $$ declare r record; begin \
               for pass in 1..8 loop \
                 for r in select ctid from public.user_tokens loop \
                   update public.user_tokens set balance = balance + 1 where ctid = r.ctid; commit; \
                 end loop; \
                 update public.profiles set bio = 'pass ' || pass; commit; \
               end loop; \
             end $$",
        )
        .await
        .expect("stream");
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let masters = cluster.master_ports().await;
    let replica = cluster.replica_of(masters[0]).await;
    cluster.failover(replica).await;
    cluster.kill(masters[1]);
    stream.await.expect("stream task");
    cluster.wait_healthy().await;
    sync(&env, &mut conn).await;
    assert_eq!(surviving(&mut conn, &keys).await, 0, "{}", daemon.log());
    assert_profiles_hold(&env, &mut conn, "pass 8").await;
    let (_, metrics) = crate::support::http_get(env.http_port, "/metrics")
        .await
        .expect("metrics");
    let reads = crate::support::metric(&metrics, "pgci_cluster_map_reads_total");
    assert!(reads.is_some_and(|n| n >= 2.0), "map reads: {reads:?}");
}

/// Redis replicates asynchronously: a master killed right after it
/// acknowledged a deletion can leave a replica without it, which, promoted,
/// serves the stale value. So a batch is confirmed (its position recorded)
/// only once the replicas of every master it wrote to acknowledged it
/// (`WAIT`). With the replica stopped (SIGSTOP) the key is gone from its
/// master but the position does not move; once the replica continues, it
/// does.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_confirmed_only_once_the_replicas_have_it() {
    let (mut env, cluster) = cluster_env(5, "").await;
    let _daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    sync(&env, &mut conn).await;
    let pg = env.pg.client().await;
    let user: String = pg
        .query_one("select user_id::text from public.user_tokens limit 1", &[])
        .await
        .expect("user")
        .get(0);
    let key = format!("balance:user:{user}");
    preset(&mut conn, std::slice::from_ref(&key)).await;
    // The master holding the key answers EXISTS; the others redirect.
    let mut owner = None;
    for port in cluster.master_ports().await {
        let mut node = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("node");
        let exists: redis::RedisResult<bool> =
            redis::cmd("EXISTS").arg(&key).query_async(&mut node).await;
        if exists == Ok(true) {
            owner = Some((port, node));
        }
    }
    let (port, node) = owner.expect("a master holds the key");
    let replica = cluster.replica_of(port).await;
    cluster.signal(replica, "STOP");
    pg.execute(
        "update public.user_tokens set balance = balance + 1 where user_id = $1::text::uuid",
        &[&user],
    )
    .await
    .expect("update");
    let token = write_token(&pg).await.expect("token");
    wait_for(
        "the master to drop the key",
        Duration::from_secs(10),
        || {
            let mut node = node.clone();
            let key = key.clone();
            async move {
                redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async::<bool>(&mut node)
                    .await
                    == Ok(false)
            }
        },
    )
    .await;
    let applied = || async {
        Cache::new(conn.clone(), CacheOptions::default())
            .applied()
            .await
            .expect("applied")
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let held = applied().await;
    cluster.signal(replica, "CONT");
    assert!(
        held.is_none_or(|a| a < token.0),
        "the position moved past the update ({held:?} >= {token:?}) while its master's replica had not acknowledged it"
    );
    wait_for("the position to move", Duration::from_secs(30), || async {
        applied().await.is_some_and(|a| a >= token.0)
    })
    .await;
}

/// With `sharded_events`, events go out with SPUBLISH: `events` (which
/// subscribes with SSUBSCRIBE at the master serving the channel's slot)
/// receives them, and a plain SUBSCRIBE on any node receives nothing.
/// A cluster of servers without sharded pub/sub (Redis 6.2) is refused at
/// start, exit 2 with one line.
#[tokio::test(flavor = "multi_thread")]
async fn sharded_events_reach_the_channel_s_shard_only() {
    let (mut env, cluster) = cluster_env_with(
        5,
        "sharded_events = true\nstream = \"{cache-invalidation}:events\"",
        "",
    )
    .await;
    if pgci_test_support::redis_server_version() < (7, 0) {
        let mut daemon = env.spawn_daemon();
        let status = daemon.wait_exit(Duration::from_secs(30)).await;
        let log = daemon.log();
        assert_eq!(status.code(), Some(2), "{log}");
        assert!(log.contains("set sharded_events = false"), "{log}");
        return;
    }
    let _daemon = env.daemon().await;
    let mut plain = redis::Client::open(cluster.urls()[1].as_str())
        .expect("url")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    plain
        .subscribe("cache-invalidation")
        .await
        .expect("subscribe");
    let tail = crate::verbs::spawn_events(&env, &["--json", "--count", "1"]);
    let pg = env.pg.client().await;
    let tailed = async {
        // Until the tail has subscribed and seen one.
        let mut tail = Some(tail);
        loop {
            pg.execute("update public.profiles set bio = bio || '.'", &[])
                .await
                .expect("update");
            tokio::time::sleep(Duration::from_millis(300)).await;
            if tail
                .as_mut()
                .and_then(|t| t.try_wait().expect("wait"))
                .is_some()
            {
                return crate::verbs::finished(tail.take().expect("tail")).await;
            }
        }
    };
    let printed = tokio::time::timeout(Duration::from_secs(30), tailed)
        .await
        .expect("events printed a sharded event");
    assert!(
        printed.contains("\"table\":\"public.profiles\""),
        "{printed}"
    );
    // The events are numbered and kept in the stream, on the master of
    // the channel's slot, which holds the sequence record too.
    let mut kept = None;
    for url in cluster.urls() {
        let mut node = redis::Client::open(url.as_str())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("node");
        let entries =
            crate::support::stream_events(&mut node, "{cache-invalidation}:events", "-").await;
        if let Ok(entries) = entries {
            kept = Some(entries);
        }
    }
    let kept = kept.expect("the channel's master answers for the stream");
    let seqs: Vec<u64> = kept
        .iter()
        .map(|(_, event)| event["seq"].as_u64().expect("seq"))
        .collect();
    assert!(!seqs.is_empty());
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{seqs:?}");
    }
    let mut messages = plain.on_message();
    let plain_got = tokio::time::timeout(Duration::from_secs(1), messages.next()).await;
    assert!(
        plain_got.is_err(),
        "a plain subscriber got an event: {:?}",
        plain_got.ok().flatten().map(|m| m.get_payload::<String>())
    );
}

/// The client library on a cluster (the app's redis crate cluster
/// connection): leases fill on a miss and hit after, a lease taken before
/// an invalidation is refused its fill, and a read with a write token
/// never returns the value cached before the write. Keys span every
/// master; the lease functions were loaded on each by the daemon.
#[tokio::test(flavor = "multi_thread")]
async fn the_clients_leases_and_write_tokens_work_on_a_cluster() {
    use pgci_client::Source;
    let (mut env, cluster) = cluster_env(10, "").await;
    let _daemon = env.daemon().await;
    let mut conn = cluster.conn().await;
    sync(&env, &mut conn).await;
    let pg = std::sync::Arc::new(env.pg.client().await);
    let users: Vec<String> = pg
        .query("select distinct user_id::text from public.user_tokens", &[])
        .await
        .expect("users")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let shared = std::sync::Arc::clone(&pg);
    let balance = move |user: String| {
        let pg = std::sync::Arc::clone(&shared);
        async move {
            let row = pg
                .query_one(
                    "select sum(balance)::text from public.user_tokens where user_id = $1::text::uuid",
                    &[&user],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(Some(row.get::<_, String>(0)))
        }
    };
    let mut cache = Cache::new(conn.clone(), CacheOptions::default());
    for user in &users {
        let key = format!("balance:user:{user}");
        let (_, first) = cache
            .get_or_load(&key, 3600, || balance(user.clone()), None)
            .await
            .expect("first read");
        let (_, second) = cache
            .get_or_load(&key, 3600, || balance(user.clone()), None)
            .await
            .expect("second read");
        assert_eq!((first, second), (Source::Filled, Source::Hit), "{key}");
    }
    // A lease taken before the row changes: its fill is refused.
    let user = users[0].clone();
    let key = format!("balance:user:{user}");
    cache.invalidate_cache(&key).await.expect("invalidate");
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let loader = {
        let user = user.clone();
        let balance = balance.clone();
        move || async move {
            let old = balance(user).await;
            let _ = wait.await;
            old
        }
    };
    let mut reader = Cache::new(conn.clone(), CacheOptions::default());
    let read = tokio::spawn(async move {
        let key = format!("balance:user:{user}");
        reader.get_or_load(&key, 3600, loader, None).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    pg.execute(
        "update public.user_tokens set balance = balance + 1 where user_id = $1::text::uuid",
        &[&users[0]],
    )
    .await
    .expect("update");
    sync(&env, &mut conn).await;
    let _ = go.send(());
    let (_, source) = read.await.expect("reader").expect("read");
    assert_eq!(source, Source::Refused, "a fill from before the update");
    // Every user's cached balance, then a write and a read with its token:
    // never the value from before the write.
    for user in &users[1..] {
        let key = format!("balance:user:{user}");
        let (before, _) = cache
            .get_or_load(&key, 3600, || balance(user.clone()), None)
            .await
            .expect("cached");
        pg.execute(
            "update public.user_tokens set balance = balance + 7 where user_id = $1::text::uuid",
            &[user],
        )
        .await
        .expect("write");
        let token = write_token(&pg).await.expect("token");
        let (after, _) = cache
            .get_or_load(&key, 3600, || balance(user.clone()), Some(token))
            .await
            .expect("read after the write");
        assert_ne!(after, before, "{key}: the value from before the write");
    }
}
