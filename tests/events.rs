//! The event contract a subscriber relies on (see `pgci_protocol::events`):
//! `seq` contiguous across a daemon crash, a new `epoch` whenever keys
//! were flushed by pattern, every event kept in the stream, and a
//! subscriber back from a disconnect either resuming from the stream
//! without a hole or told that it cannot.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use pgci_protocol::events::{Observed, Sequence};

use crate::support::{free_port, users, wait_for, TestEnv};

const CHANNEL: &str = "cache-invalidation";
const STREAM: &str = "pgci-events";

/// Collects every event published on the channel, in arrival order, until
/// the subscription drops.
async fn collect(env: &TestEnv) -> Arc<Mutex<Vec<serde_json::Value>>> {
    let client = redis::Client::open(env.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(CHANNEL).await.expect("subscribe");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let payload: String = message.get_payload().expect("text");
            let event = serde_json::from_str(&payload).expect("json event");
            into.lock().expect("lock").push(event);
        }
    });
    seen
}

fn snapshot(seen: &Mutex<Vec<serde_json::Value>>) -> Vec<serde_json::Value> {
    seen.lock().expect("lock").clone()
}

fn keys_of(events: &[serde_json::Value]) -> BTreeSet<String> {
    events
        .iter()
        .flat_map(|e| e["keys"].as_array().cloned().unwrap_or_default())
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect()
}

/// Waits until an event names `key` (the daemon publishes in the batch's
/// transaction, but delivery to this subscriber is its own).
async fn wait_for_key(seen: &Arc<Mutex<Vec<serde_json::Value>>>, key: &str) {
    wait_for(
        &format!("an event naming {key}"),
        Duration::from_secs(30),
        || {
            let found = keys_of(&snapshot(seen)).contains(key);
            async move { found }
        },
    )
    .await;
}

/// `env.sync()` waits for the first deletion pass; events go out with the
/// second. This waits until the daemon recorded a position past
/// everything committed so far (both passes, events published).
async fn sync_events(env: &TestEnv) {
    env.sync().await;
    let pg = env.pg.client().await;
    let token = pgci_client::write_token(&pg).await.expect("token");
    let key = pgci_protocol::position::key("pg_cache_invalidator");
    wait_for(
        "the events of everything committed",
        Duration::from_secs(30),
        || async {
            let mut redis = env.redis.conn().await;
            pgci_protocol::position::read(&mut redis, &key)
                .await
                .ok()
                .flatten()
                .is_some_and(|at| at.0 >= token.0 .0)
        },
    )
    .await;
}

async fn bump(env: &TestEnv, user: &str, n: usize) {
    env.pg
        .client()
        .await
        .execute(
            "update public.profiles set bio = $2 where id = $1::text::uuid",
            &[&user, &format!("bio {n}")],
        )
        .await
        .expect("update");
}

/// The stream's entries: (id, event).
async fn stream_entries(env: &TestEnv, after: &str) -> Vec<(String, serde_json::Value)> {
    let mut redis = env.redis.conn().await;
    crate::support::stream_events(&mut redis, STREAM, &format!("({after}"))
        .await
        .expect("xrange")
}

/// A change applied while its commit is still invisible to readers (a
/// synchronous standby that has not applied it: `remote_apply`, replay
/// paused) is announced only once the commit shows. A reader may fill the
/// old row meanwhile, which the daemon's second deletion pass removes; a
/// subscriber that dropped its copy on an event sent with the first pass
/// and copied the key again from Redis would keep that old value, with no
/// event left to drop it (the soak's in-process copies found two such).
/// Before the fix the event went out with the first pass, while the
/// writer still waited.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_goes_out_only_once_its_commit_shows() {
    let mut env = TestEnv::start(5).await;
    let standby = env.pg.synchronous_standby_at(free_port(), false).await;
    env.setup();
    let seen = collect(&env).await;
    let daemon = env.daemon().await;
    let user = users(&env, 1).await.remove(0).id;
    let key = format!("profile:user:{user}");
    let mut redis = env.redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("cached")
        .query_async(&mut redis)
        .await
        .expect("set");
    standby
        .client()
        .await
        .batch_execute("select pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    let writer = {
        let client = env.pg.client().await;
        tokio::spawn(async move {
            client
                .batch_execute(&format!(
                    "set synchronous_commit = remote_apply;                      update public.profiles set bio = 'invisible for a while' where id = '{user}'"
                ))
                .await
                .expect("update");
        })
    };
    // The daemon decodes the commit and deletes the key (its first pass)
    // while the writer waits for the standby.
    wait_for(
        "the first deletion pass",
        Duration::from_secs(30),
        || async {
            let mut redis = env.redis.conn().await;
            let exists: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .expect("exists");
            !exists
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !writer.is_finished(),
        "the writer did not wait for the standby: the test proves nothing"
    );
    assert!(
        !keys_of(&snapshot(&seen)).contains(&key),
        "an event named {key} while its commit was invisible: {:?}",
        snapshot(&seen)
    );
    standby
        .client()
        .await
        .batch_execute("select pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    writer.await.expect("writer");
    wait_for_key(&seen, &key).await;
    drop(daemon);
    drop(standby);
}

/// A daemon killed with SIGKILL mid-stream replays what it had not
/// confirmed: the replayed changes are announced again with new numbers,
/// so `seq` has no hole and no repeat; a TRUNCATE starts a new epoch that
/// later events keep; the stream holds every published event in order.
#[tokio::test(flavor = "multi_thread")]
async fn seq_runs_on_across_a_crash_and_a_truncate_starts_an_epoch() {
    let mut env = TestEnv::start(20).await;
    env.redis_extra = format!("stream = \"{STREAM}\"\nstream_max_len = 100000\n");
    env.write_config("");
    env.setup();
    let seen = collect(&env).await;
    let mut daemon = env.daemon().await;
    let u = users(&env, 20).await;
    for n in 0..300 {
        bump(&env, &u[n % u.len()].id, n).await;
        if n == 150 {
            daemon.kill9();
            daemon = env.daemon().await;
        }
    }
    env.sync().await;
    env.pg
        .client()
        .await
        .batch_execute("truncate public.user_journeys")
        .await
        .expect("truncate");
    for n in 300..320 {
        bump(&env, &u[n % u.len()].id, n).await;
    }
    env.sync().await;
    for user in &u {
        wait_for_key(&seen, &format!("profile:user:{}", user.id)).await;
    }
    let last_user = &u[319 % u.len()].id;
    wait_for_key(&seen, &format!("profile:user:{last_user}")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = snapshot(&seen);

    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "seq must grow by one: {seqs:?}");
    }
    let truncate = events
        .iter()
        .position(|e| e["op"] == "truncate")
        .expect("the truncate's event");
    let (before, after) = (&events[..truncate], &events[truncate..]);
    let first_epoch = &events[0]["epoch"];
    assert!(before.iter().all(|e| &e["epoch"] == first_epoch));
    assert_ne!(
        &after[0]["epoch"], first_epoch,
        "the truncate starts an epoch"
    );
    assert!(after.iter().all(|e| e["epoch"] == after[0]["epoch"]));
    assert!(
        after.len() > 20,
        "the 20 updates after the truncate: {after:?}"
    );

    // The stream holds the same events, in the same order; the published
    // copy names its entry.
    let kept = stream_entries(&env, "0-0").await;
    assert_eq!(kept.len(), events.len());
    for ((id, entry), published) in kept.iter().zip(&events) {
        assert_eq!(published["stream_id"].as_str(), Some(id.as_str()));
        let mut published = published.clone();
        published
            .as_object_mut()
            .expect("object")
            .remove("stream_id");
        assert_eq!(entry, &published);
    }
    drop(daemon);
}

/// A subscriber whose connection is killed resumes from the stream after
/// the last entry it saw, and the first event it reads there is the next
/// one; once the stream was trimmed past that entry, `events --since`
/// says so and the numbers show the gap; `flush` and an emptied Redis each
/// start a new epoch.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_resumes_from_the_stream_or_learns_it_missed_events() {
    let mut env = TestEnv::start(20).await;
    env.redis_extra = format!("stream = \"{STREAM}\"\nstream_max_len = 50\n");
    env.write_config("");
    env.setup();
    let mut redis = env.redis.conn().await;
    // Trim in nodes of 10 entries: "MAXLEN ~ 50" keeps at most 60.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stream-node-max-entries")
        .arg(10)
        .query_async(&mut redis)
        .await
        .expect("config set");
    let seen = collect(&env).await;
    let _daemon = env.daemon().await;
    let u = users(&env, 20).await;
    bump(&env, &u[0].id, 0).await;
    wait_for_key(&seen, &format!("profile:user:{}", u[0].id)).await;
    let last = snapshot(&seen).last().cloned().expect("an event");
    let (last_seq, last_id) = (
        last["seq"].as_u64().expect("seq"),
        last["stream_id"].as_str().expect("stream_id").to_string(),
    );

    // The subscriber is cut off; changes go on meanwhile.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .expect("client kill");
    assert!(killed >= 1);
    for (n, user) in u.iter().enumerate().skip(1).take(10) {
        bump(&env, &user.id, n).await;
    }
    sync_events(&env).await;
    let resumed = stream_entries(&env, &last_id).await;
    let mut order = Sequence::default();
    order.observe(last["epoch"].as_str().expect("epoch"), last_seq);
    for (_, event) in &resumed {
        let observed = order.observe(
            event["epoch"].as_str().expect("epoch"),
            event["seq"].as_u64().expect("seq"),
        );
        assert_eq!(observed, Observed::Next, "{event}");
    }
    let missed = keys_of(&resumed.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>());
    for user in u.iter().skip(1).take(10) {
        assert!(missed.contains(&format!("profile:user:{}", user.id)));
    }

    // 200 more events trim the stream past that entry.
    for n in 0..200 {
        bump(&env, &u[n % u.len()].id, n).await;
    }
    sync_events(&env).await;
    let length: usize = redis::cmd("XLEN")
        .arg(STREAM)
        .query_async(&mut redis)
        .await
        .expect("xlen");
    assert!(
        (50..=60).contains(&length),
        "stream_max_len bounds it: {length}"
    );
    let after = stream_entries(&env, &last_id).await;
    let mut order = Sequence::default();
    order.observe(last["epoch"].as_str().expect("epoch"), last_seq);
    let first = &after[0].1;
    assert!(
        matches!(
            order.observe(
                first["epoch"].as_str().expect("epoch"),
                first["seq"].as_u64().expect("seq")
            ),
            Observed::Gap { .. }
        ),
        "{first}"
    );
    let out = env.cli(&["events", "--since", &last_id, "--count", "1", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("the stream no longer holds entry {last_id}")),
        "{stderr}"
    );

    // `flush` starts a new epoch, announced like the daemon's flushes.
    let epoch_before = after.last().expect("entries").1["epoch"].clone();
    let out = env.cli(&["flush", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flushed = stream_entries(&env, &after.last().expect("entries").0).await;
    assert_eq!(flushed.len(), 1, "{flushed:?}");
    assert_eq!(flushed[0].1["op"], "flush");
    assert_ne!(flushed[0].1["epoch"], epoch_before);

    // An emptied Redis: the daemon finds its record gone, flushes, and the
    // events it publishes next are of a new epoch.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .expect("flushall");
    sync_events(&env).await;
    let reborn = stream_entries(&env, "0-0").await;
    assert!(!reborn.is_empty());
    assert!(reborn
        .iter()
        .all(|(_, e)| e["epoch"] != flushed[0].1["epoch"]));
}
