//! The Rust client's in-process cache (`pgci_client::L1`) against the
//! daemon on a real Redis: tracking, the events' gaps and epochs, dropped
//! connections, write tokens. (The TypeScript client's L1 has the same
//! tests in `clients::typescript`.)

use std::time::{Duration, Instant};

use pgci_client::{Cache, CacheOptions, L1Options, Source, WriteToken, L1};

use crate::support::{users, TestEnv};

/// Polls `check` every 5 ms for up to `within`.
async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Setup {
    env: TestEnv,
    pg: tokio_postgres::Client,
    ids: Vec<String>,
}

async fn setup() -> (Setup, crate::support::Daemon) {
    let mut env = TestEnv::start(8).await;
    env.setup();
    let daemon = env.daemon().await;
    let pg = env.pg.client().await;
    let ids = users(&env, 8).await.into_iter().map(|u| u.id).collect();
    let setup = Setup { env, pg, ids };
    // The users' own invalidations must be behind us: one arriving after a
    // test filled L1 would drop an entry the test counts.
    let mut cache = setup.cache(None).await;
    setup.applied(&mut cache).await;
    (setup, daemon)
}

impl Setup {
    async fn l1(&self, options: L1Options) -> L1 {
        let client = redis::Client::open(self.env.redis.url()).expect("client");
        let l1 = L1::connect(&client, options).await.expect("L1 connects");
        assert!(l1.stats().tracking);
        l1
    }

    async fn cache(&self, l1: Option<&L1>) -> Cache<redis::aio::MultiplexedConnection> {
        let cache = Cache::new(self.env.redis.conn().await, CacheOptions::default());
        match l1 {
            Some(l1) => cache.with_l1(l1.clone()),
            None => cache,
        }
    }

    async fn bio(&self, id: &str) -> Result<Option<String>, String> {
        let row = self
            .pg
            .query_one(
                "select coalesce(bio, '') from public.profiles where id = $1::text::uuid",
                &[&id],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(row.get(0)))
    }

    /// Reads `id`'s key until L1 answers it.
    async fn read_into_l1(&self, cache: &mut Cache<redis::aio::MultiplexedConnection>, id: &str) {
        let key = format!("profile:user:{id}");
        for _ in 0..5 {
            let (_, source) = cache
                .get_or_load(&key, 3600, || self.bio(id), None)
                .await
                .expect("read");
            if source == Source::L1 {
                return;
            }
        }
        panic!("L1 never answered {key}");
    }

    /// Waits until the daemon recorded a position past everything
    /// committed so far (both passes of its batches done).
    async fn applied(&self, cache: &mut Cache<redis::aio::MultiplexedConnection>) {
        let token = pgci_client::write_token(&self.pg).await.expect("token");
        let deadline = Instant::now() + Duration::from_secs(10);
        while cache
            .applied()
            .await
            .expect("position")
            .is_none_or(|at| at < token.0)
        {
            assert!(Instant::now() < deadline, "the daemon did not pass {token}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn redis_cmd<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        cmd.query_async(&mut self.env.redis.conn().await)
            .await
            .expect("redis command")
    }
}

/// A repeated read is answered in process; a change by SQL, another
/// instance's overwrite and another instance's lease fill each reach L1
/// through tracking; the bounds hold.
#[tokio::test(flavor = "multi_thread")]
async fn l1_answers_in_process_and_tracking_keeps_it_true() {
    let (s, _daemon) = setup().await;
    let l1 = s.l1(L1Options::default()).await;
    let mut cache = s.cache(Some(&l1)).await;
    let mut other = s.cache(None).await;
    let id = s.ids[4].clone();
    let key = format!("profile:user:{id}");

    let (_, first) = cache
        .get_or_load(&key, 3600, || s.bio(&id), None)
        .await
        .expect("fill");
    assert_eq!(first, Source::Filled);
    assert_eq!(l1.stats().entries, 0, "its own load is not kept");
    s.read_into_l1(&mut cache, &id).await;
    let (_, source) = cache
        .get_or_load(
            &key,
            3600,
            || async { Err::<Option<String>, _>("no load from L1") },
            None,
        )
        .await
        .expect("from L1");
    assert_eq!(source, Source::L1);

    // A change by plain SQL: the daemon deletes the key, tracking tells L1.
    s.pg.execute(
        "update public.profiles set bio = 'l1 sql' where id = $1::text::uuid",
        &[&id],
    )
    .await
    .expect("update");
    // Both of the daemon's passes over the key are done (the second one
    // would delete what another instance writes below).
    s.applied(&mut other).await;
    wait_for("L1 to drop the key", Duration::from_secs(10), || {
        l1.stats().entries == 0
    })
    .await;
    s.read_into_l1(&mut cache, &id).await;
    let (value, _) = cache
        .get_or_load(&key, 3600, || s.bio(&id), None)
        .await
        .expect("read");
    assert_eq!(value.as_deref(), Some("l1 sql"));

    // Another instance overwrites the key without deleting it first.
    other
        .set_cached_data(&key, "another instance", 3600)
        .await
        .expect("set");
    wait_for(
        "L1 to drop the overwritten key",
        Duration::from_secs(5),
        || l1.stats().entries == 0,
    )
    .await;
    let (value, _) = cache
        .get_or_load(&key, 3600, || s.bio(&id), None)
        .await
        .expect("read");
    assert_eq!(value.as_deref(), Some("another instance"));

    // Another instance's lease fill after an invalidation.
    s.read_into_l1(&mut cache, &id).await;
    other.invalidate_cache(&key).await.expect("del");
    let (_, filled) = other
        .get_or_load(
            &key,
            3600,
            || async { Ok::<_, String>(Some("filled elsewhere".to_string())) },
            None,
        )
        .await
        .expect("fill");
    assert_eq!(filled, Source::Filled);
    wait_for(
        "L1 to drop the refilled key",
        Duration::from_secs(5),
        || l1.stats().entries == 0,
    )
    .await;
    let (value, _) = cache
        .get_or_load(&key, 3600, || s.bio(&id), None)
        .await
        .expect("read");
    assert_eq!(value.as_deref(), Some("filled elsewhere"));
    let stats = l1.stats();
    assert!(stats.hits >= 3 && stats.fills >= 3, "{stats:?}");

    // Bounded by entries, by bytes and in time.
    let small = s
        .l1(L1Options {
            max_entries: 2,
            ..L1Options::default()
        })
        .await;
    let mut bounded = s.cache(Some(&small)).await;
    for id in &s.ids[..5] {
        s.read_into_l1(&mut bounded, id).await;
    }
    assert_eq!(small.stats().entries, 2);
    let brief = s
        .l1(L1Options {
            ttl: Duration::from_millis(50),
            ..L1Options::default()
        })
        .await;
    let mut expiring = s.cache(Some(&brief)).await;
    s.read_into_l1(&mut expiring, &s.ids[0]).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    let (_, source) = expiring
        .get_or_load(
            &format!("profile:user:{}", s.ids[0]),
            3600,
            || s.bio(&s.ids[0]),
            None,
        )
        .await
        .expect("read");
    assert_eq!(
        source,
        Source::Hit,
        "an expired entry is read from Redis again"
    );
    let client = redis::Client::open(s.env.redis.url()).expect("client");
    let refused = L1::connect(
        &client,
        L1Options {
            max_entries: 0,
            ..L1Options::default()
        },
    )
    .await
    .err()
    .expect("max_entries 0");
    assert!(
        refused.to_string().contains("must be above zero"),
        "{refused}"
    );
}

/// L1 is emptied when its connection is cut, when an event is missed (the
/// daemon's numbering skips) and when the daemon flushes keys by pattern
/// (TRUNCATE starts a new epoch); after a cut it reconnects and tracking
/// works again.
#[tokio::test(flavor = "multi_thread")]
async fn l1_is_emptied_on_a_cut_a_gap_and_a_new_epoch() {
    let (s, _daemon) = setup().await;
    let l1 = s.l1(L1Options::default()).await;
    let mut cache = s.cache(Some(&l1)).await;
    let ids = s.ids[..4].to_vec();
    // A fill's own tracking push (its lease and value writes) can be
    // handled after L1 kept the value read behind it, and drops the entry
    // (safe: a miss, never a stale answer); read again until L1 keeps all
    // four with no push left to handle.
    macro_rules! fill {
        () => {
            for _ in 0..10 {
                for id in &ids {
                    s.read_into_l1(&mut cache, id).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if l1.stats().entries == 4 {
                    break;
                }
            }
            assert_eq!(l1.stats().entries, 4);
        };
    }

    // The connection is cut (CLIENT KILL, as a network cut would).
    fill!();
    let killed: i64 = s
        .redis_cmd(
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("SKIPME")
                .arg("yes")
                .arg("TYPE")
                .arg("pubsub"),
        )
        .await;
    assert!(killed >= 1, "L1's connection is a subscriber");
    wait_for("L1 to learn of the cut", Duration::from_secs(5), || {
        l1.stats().drops.disconnect >= 1
    })
    .await;
    assert_eq!(l1.stats().entries, 0);
    wait_for("L1 to reconnect", Duration::from_secs(10), || {
        l1.stats().tracking
    })
    .await;
    fill!();
    s.pg.execute(
        "update public.profiles set bio = 'after the cut' where id = $1::text::uuid",
        &[&ids[0]],
    )
    .await
    .expect("update");
    wait_for(
        "the new connection's tracking",
        Duration::from_secs(10),
        || l1.stats().entries == 3,
    )
    .await;

    // An event gap: the daemon's numbering skips three events.
    fill!();
    let sequence = pgci_client::events::sequence_key("cache-invalidation");
    s.pg.execute("update public.pillars set slug = slug where true", &[])
        .await
        .expect("update pillars");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drops = l1.stats().drops;
    assert_eq!(
        (drops.gap, drops.epoch),
        (0, 0),
        "a pillar's event is no gap"
    );
    let _: i64 = s
        .redis_cmd(redis::cmd("HINCRBY").arg(&sequence).arg("seq").arg(3))
        .await;
    s.pg.execute("update public.pillars set slug = slug where true", &[])
        .await
        .expect("update pillars");
    wait_for("L1 to see the gap", Duration::from_secs(5), || {
        l1.stats().drops.gap >= 1
    })
    .await;
    assert_eq!(l1.stats().entries, 0);

    // A new epoch: TRUNCATE makes the daemon flush journey keys by pattern.
    fill!();
    s.pg.execute("truncate public.user_journeys", &[])
        .await
        .expect("truncate");
    wait_for("L1 to see the new epoch", Duration::from_secs(10), || {
        l1.stats().drops.epoch >= 1
    })
    .await;
    assert_eq!(l1.stats().entries, 0);
    fill!();
}

/// A read with a write token never returns, through L1, a value from
/// before the write: L1 answers it only once the daemon's position passed
/// the token on its own connection.
#[tokio::test(flavor = "multi_thread")]
async fn l1_token_reads_never_return_a_value_from_before_the_write() {
    let (s, _daemon) = setup().await;
    let l1 = s.l1(L1Options::default()).await;
    let mut cache = s.cache(Some(&l1)).await;
    let id = s.ids[3].clone();
    let key = format!("profile:user:{id}");
    let (mut reads, mut from_l1, mut stale) = (0, 0, 0);
    for n in 0..25 {
        s.read_into_l1(&mut cache, &id).await;
        let bio = format!("l1-token-{n}");
        s.pg.execute(
            "update public.profiles set bio = $2 where id = $1::text::uuid",
            &[&id, &bio],
        )
        .await
        .expect("update");
        let token: WriteToken = pgci_client::write_token(&s.pg).await.expect("token");
        let mut since_l1 = 0;
        for _ in 0..400 {
            let (value, source) = cache
                .get_or_load(&key, 3600, || s.bio(&id), Some(token))
                .await
                .expect("own read");
            reads += 1;
            if value.as_deref() != Some(bio.as_str()) {
                stale += 1;
            }
            if source == Source::L1 {
                from_l1 += 1;
                since_l1 += 1;
                if since_l1 == 3 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    eprintln!("rust L1 token reads: {reads}, from L1 {from_l1}, stale {stale}");
    assert_eq!(stale, 0);
    assert!(
        from_l1 >= 25,
        "L1 answered only {from_l1} reads with a token"
    );
}

/// An invalidation Redis sent before a reply is applied before that reply
/// reaches the caller: once a read on the tracked connection saw a write,
/// L1 no longer answers the other keys that write changed.
/// (Handled by a task behind a channel, the invalidation waited for the
/// runtime to schedule that task, and a busy process kept answering the
/// old value meanwhile: with one worker, the reader woken by the reply ran
/// first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn l1_applies_an_invalidation_before_the_reply_behind_it() {
    let (s, _daemon) = setup().await;
    let l1 = s.l1(L1Options::default()).await;
    // On the worker, as an app's request handler runs.
    let (judged, stale) = tokio::spawn(async move {
        let mut cache = s.cache(Some(&l1)).await;
        let mut other = s.env.redis.conn().await;
        let (mut judged, mut stale) = (0, 0);
        for n in 0..200 {
            let (changed, sentinel) = (format!("l1-order:{n}"), format!("l1-sentinel:{n}"));
            s.redis_cmd::<()>(
                redis::cmd("MSET")
                    .arg(&changed)
                    .arg("old")
                    .arg(&sentinel)
                    .arg("x"),
            )
            .await;
            let load = || async { Ok::<_, String>(Some("loaded".to_string())) };
            for _ in 0..2 {
                cache
                    .get_or_load(&changed, 60, load, None)
                    .await
                    .expect("read");
            }
            assert_eq!(l1.stats().entries, 1, "{changed} is in L1");
            // Both keys overwritten at once by another connection while
            // the sentinel is read on the tracked one.
            let mut write = redis::cmd("MSET");
            write.arg(&changed).arg("new").arg(&sentinel).arg("y");
            // (The request woken last is written first.)
            let (read, written) = tokio::join!(
                cache.get_or_load(&sentinel, 60, load, None),
                write.query_async::<()>(&mut other)
            );
            written.expect("mset");
            let (value, _) = read.expect("read the sentinel");
            // Read before the write: nothing to judge.
            if value.as_deref() == Some("y") {
                judged += 1;
                let (value, source) = cache
                    .get_or_load(&changed, 60, load, None)
                    .await
                    .expect("read again");
                if source == Source::L1 || value.as_deref() != Some("new") {
                    stale += 1;
                }
            }
            s.redis_cmd::<()>(redis::cmd("DEL").arg(&changed).arg(&sentinel))
                .await;
            wait_for("L1 to empty", Duration::from_secs(5), || {
                l1.stats().entries == 0
            })
            .await;
        }
        (judged, stale)
    })
    .await
    .expect("reader");
    eprintln!("judged {judged}, stale {stale}");
    assert!(judged >= 20, "only {judged} sentinels read after the write");
    assert_eq!(stale, 0, "reads answered with an overwritten value");
}
