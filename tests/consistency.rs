//! Zero stale reads from the app's side: cache-aside readers racing writers
//! while the daemon invalidates. Naive readers (GET, read the row, SET)
//! show both races — stale entries left after quiescence and reads right
//! after the reader's own write that return the old row — which proves the
//! test can see them; readers using leases and write tokens
//! ([`pgci_client`]) show neither, in delete and refresh
//! mode, with the daemon killed -9 and restarted in some runs.
//!
//! `PGCI_RACE_RUNS` sets the randomized runs per lease scenario (default
//! 20); each run prints a line, and a summary line per scenario goes to
//! BENCHMARKS.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgci_client::{write_token, AfterPolicy, Cache, CacheOptions, Source};

use crate::support::{wait_for, TestEnv};

/// Hot keys the readers and writers share.
const HOT: usize = 20;
/// Concurrent readers.
const READERS: usize = 8;
/// Writers (each owns every second hot key, so a read after its own write
/// must show exactly that write).
const WRITERS: usize = 2;
/// Updates per second per writer.
const WRITES_PER_SEC: u64 = 100;
/// How long writers write in one run.
const RUN: Duration = Duration::from_millis(1500);
/// The longest pause of a "slow request" between its database read and
/// its fill.
const MAX_FILL_DELAY_MS: u64 = 5;

const ROW_SQL: &str = "select to_jsonb(p)::text from public.profiles p where id = $1::text::uuid";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Readers {
    /// GET; on a miss read the row, pause, SET.
    Naive,
    /// `get_or_load` with leases, and write tokens after the own write.
    Leases,
}

/// What one scenario saw over its runs.
#[derive(Debug, Default)]
struct Tally {
    runs: u64,
    stale_keys: u64,
    own_reads: u64,
    stale_own_reads: u64,
    refused_fills: u64,
    bypassed: u64,
}

/// A small xorshift generator: runs are randomized but need no crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn seed(salt: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

fn bio_of(json: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()?
        .get("bio")?
        .as_str()
        .map(str::to_string)
}

async fn load_row(pg: &tokio_postgres::Client, id: &str) -> Option<String> {
    pg.query_opt(ROW_SQL, &[&id])
        .await
        .expect("read the row")
        .map(|r| r.get(0))
}

/// One reader until `stop`.
async fn reader(
    env_pg: tokio_postgres::Client,
    redis: redis::aio::MultiplexedConnection,
    ids: Arc<Vec<String>>,
    readers: Readers,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    salt: u64,
) {
    let mut rng = Rng(seed(salt));
    let pg = Arc::new(env_pg);
    let mut cache = Cache::new(redis.clone(), CacheOptions::default());
    let mut redis = redis;
    while !stop.load(Ordering::Relaxed) {
        let id = ids[rng.below(ids.len() as u64) as usize].clone();
        let key = format!("profile:user:{id}");
        let delay = Duration::from_micros(rng.below(MAX_FILL_DELAY_MS * 1000 + 1));
        match readers {
            Readers::Naive => {
                let cached: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .expect("get");
                if cached.is_none() {
                    if let Some(row) = load_row(&pg, &id).await {
                        tokio::time::sleep(delay).await;
                        let _: () = redis::cmd("SET")
                            .arg(&key)
                            .arg(row)
                            .arg("EX")
                            .arg(3600)
                            .query_async(&mut redis)
                            .await
                            .expect("set");
                    }
                }
            }
            Readers::Leases => {
                let pg = Arc::clone(&pg);
                let (_, source) = cache
                    .get_or_load(
                        &key,
                        3600,
                        || async move {
                            let row = load_row(&pg, &id).await;
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::io::Error>(row)
                        },
                        None,
                    )
                    .await
                    .expect("get_or_load");
                if source == Source::Refused {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One writer until `stop`: updates one of its keys' rows, then reads the
/// key as the app would right after its own write; returns (reads, stale
/// reads, bypassed reads).
async fn writer(
    pg: tokio_postgres::Client,
    redis: redis::aio::MultiplexedConnection,
    ids: Arc<Vec<String>>,
    n: usize,
    readers: Readers,
    after: AfterPolicy,
    stop: Arc<AtomicBool>,
) -> (u64, u64, u64) {
    let mine: Vec<String> = ids.iter().skip(n).step_by(WRITERS).cloned().collect();
    let mut rng = Rng(seed(1000 + n as u64));
    let pg = Arc::new(pg);
    let options = CacheOptions {
        after,
        ..CacheOptions::default()
    };
    let mut cache = Cache::new(redis.clone(), options);
    let mut redis = redis;
    let (mut reads, mut stale, mut bypassed) = (0, 0, 0);
    let mut version = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let id = mine[rng.below(mine.len() as u64) as usize].clone();
        let key = format!("profile:user:{id}");
        version += 1;
        let bio = format!("w{n}-{version}");
        pg.execute(
            "update public.profiles set bio = $2 where id = $1::text::uuid",
            &[&id, &bio],
        )
        .await
        .expect("update");
        let seen = match readers {
            Readers::Naive => {
                let cached: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .expect("get");
                match cached {
                    Some(value) => Some(value),
                    None => load_row(&pg, &id).await,
                }
            }
            Readers::Leases => {
                let token = Some(write_token(&pg).await.expect("token"));
                let loader_pg = Arc::clone(&pg);
                let loader_id = id.clone();
                let (value, source) = cache
                    .get_or_load(
                        &key,
                        3600,
                        || async move {
                            Ok::<_, std::io::Error>(load_row(&loader_pg, &loader_id).await)
                        },
                        token,
                    )
                    .await
                    .expect("get_or_load");
                if source == Source::Bypassed {
                    bypassed += 1;
                }
                value
            }
        };
        reads += 1;
        if seen.as_deref().and_then(bio_of).as_deref() != Some(bio.as_str()) {
            stale += 1;
        }
        next += Duration::from_micros(1_000_000 / WRITES_PER_SEC);
        tokio::time::sleep_until(next.into()).await;
    }
    (reads, stale, bypassed)
}

/// Runs `runs` randomized runs of one scenario on one environment.
async fn scenario(
    name: &str,
    refresh: bool,
    readers: Readers,
    after: AfterPolicy,
    runs: u64,
    kill_every: Option<u64>,
) -> Tally {
    let mut env = TestEnv::start(HOT as i32 + 5).await;
    if refresh {
        env.write_config(
            "[[rules]]\ntable = \"public.profiles\"\nkeys = [\"profile:user:{id}\"]\naction = \"refresh\"\nttl = \"1h\"\n",
        );
        let text = std::fs::read_to_string(&env.config).expect("read config");
        // The demo's delete rule for profiles gives way to the refresh rule.
        let text = text.replacen(
            "[[rules]]\ntable  = \"public.profiles\"\nkeys   = [\"profile:user:{id}\"]\naction = \"delete\"\n",
            "",
            1,
        );
        std::fs::write(&env.config, text).expect("write config");
    }
    env.setup();
    let mut daemon = env.daemon().await;
    let pg = env.pg.client().await;
    let ids: Arc<Vec<String>> = Arc::new(
        pg.query(
            &format!("select id::text from public.profiles order by id limit {HOT}"),
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect(),
    );
    let mut redis = env.redis.conn().await;
    let mut tally = Tally::default();
    for run in 0..runs {
        let keys: Vec<String> = ids.iter().map(|id| format!("profile:user:{id}")).collect();
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .expect("clear");
        let stop_readers = Arc::new(AtomicBool::new(false));
        let stop_writers = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let mut reader_tasks = Vec::new();
        for r in 0..READERS {
            reader_tasks.push(tokio::spawn(reader(
                env.pg.client().await,
                env.redis.conn().await,
                Arc::clone(&ids),
                readers,
                Arc::clone(&stop_readers),
                Arc::clone(&refused),
                run * 100 + r as u64,
            )));
        }
        let mut writer_tasks = Vec::new();
        for w in 0..WRITERS {
            writer_tasks.push(tokio::spawn(writer(
                env.pg.client().await,
                env.redis.conn().await,
                Arc::clone(&ids),
                w,
                readers,
                after,
                Arc::clone(&stop_writers),
            )));
        }
        let killed = kill_every.is_some_and(|k| run % k == k - 1);
        if killed {
            tokio::time::sleep(RUN / 2).await;
            daemon.kill9();
            tokio::time::sleep(Duration::from_millis(200)).await;
            daemon = env.daemon().await;
            tokio::time::sleep(RUN / 2).await;
        } else {
            tokio::time::sleep(RUN).await;
        }
        stop_writers.store(true, Ordering::Relaxed);
        let mut run_reads = 0;
        let mut run_stale_reads = 0;
        for task in writer_tasks {
            let (reads, stale, bypassed) = task.await.expect("writer");
            run_reads += reads;
            run_stale_reads += stale;
            tally.bypassed += bypassed;
        }
        env.sync().await;
        stop_readers.store(true, Ordering::Relaxed);
        for task in reader_tasks {
            task.await.expect("reader");
        }
        // Quiescence: every entry left must equal its row.
        let mut stale_keys = 0;
        for id in ids.iter() {
            let cached: Option<Vec<u8>> = redis::cmd("GET")
                .arg(format!("profile:user:{id}"))
                .query_async(&mut redis)
                .await
                .expect("get");
            let Some(cached) = cached else { continue };
            if pg_cache_invalidator::lease::is_marker(&cached) {
                continue;
            }
            let row = load_row(&pg, id).await;
            let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
            if row.as_deref().and_then(parse) != parse(&String::from_utf8_lossy(&cached)) {
                stale_keys += 1;
            }
        }
        eprintln!(
            "race {name} run {run}{}: stale keys {stale_keys}/{HOT}, stale own reads {run_stale_reads}/{run_reads}, refused fills {}",
            if killed { " (daemon killed -9 and restarted)" } else { "" },
            refused.load(Ordering::Relaxed)
        );
        tally.runs += 1;
        tally.stale_keys += stale_keys;
        tally.own_reads += run_reads;
        tally.stale_own_reads += run_stale_reads;
        tally.refused_fills += refused.load(Ordering::Relaxed);
    }
    eprintln!(
        "race summary {name}: runs={} stale_keys={} stale_own_reads={}/{} refused_fills={} bypassed_own_reads={}",
        tally.runs, tally.stale_keys, tally.stale_own_reads, tally.own_reads, tally.refused_fills, tally.bypassed
    );
    tally
}

fn lease_runs() -> u64 {
    std::env::var("PGCI_RACE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Naive cache-aside readers with the daemon in delete mode: reads right
/// after the reader's own write return the old row (the daemon's DEL lands
/// after the commit returned). This proves the race tests can see stale
/// data; stale entries after quiescence are counted and reported (they
/// need a fill to lose a sub-millisecond race, so a run may see none).
#[tokio::test(flavor = "multi_thread")]
async fn races_naive_readers_see_stale_data() {
    let tally = scenario(
        "naive-delete",
        false,
        Readers::Naive,
        AfterPolicy::Bypass,
        5,
        None,
    )
    .await;
    assert!(
        tally.stale_own_reads > 0,
        "naive readers never read their own write stale: {tally:?}"
    );
}

/// Lease readers and token reads with the daemon in delete mode, some runs
/// with the daemon killed -9 and restarted mid-run: no stale entry after
/// quiescence, no stale read after the reader's own write.
#[tokio::test(flavor = "multi_thread")]
async fn races_leases_and_tokens_leave_nothing_stale_in_delete_mode() {
    let tally = scenario(
        "leases-delete",
        false,
        Readers::Leases,
        AfterPolicy::Bypass,
        lease_runs(),
        Some(4),
    )
    .await;
    assert_eq!(tally.stale_keys, 0, "{tally:?}");
    assert_eq!(tally.stale_own_reads, 0, "{tally:?}");
}

/// The same with the daemon in refresh mode (its SET replaces leases too).
#[tokio::test(flavor = "multi_thread")]
async fn races_leases_and_tokens_leave_nothing_stale_in_refresh_mode() {
    let tally = scenario(
        "leases-refresh",
        true,
        Readers::Leases,
        AfterPolicy::Bypass,
        lease_runs(),
        Some(4),
    )
    .await;
    assert_eq!(tally.stale_keys, 0, "{tally:?}");
    assert_eq!(tally.stale_own_reads, 0, "{tally:?}");
}

/// Token reads that wait (up to 50 ms) for the daemon instead of bypassing
/// the cache: still nothing stale, and far fewer database reads after the
/// own write (the summary line counts those that gave up waiting).
#[tokio::test(flavor = "multi_thread")]
async fn races_token_reads_that_wait_for_the_daemon() {
    let tally = scenario(
        "leases-delete-wait50ms",
        false,
        Readers::Leases,
        AfterPolicy::Wait(Duration::from_millis(50)),
        (lease_runs() / 2).max(1),
        Some(4),
    )
    .await;
    assert_eq!(tally.stale_keys, 0, "{tally:?}");
    assert_eq!(tally.stale_own_reads, 0, "{tally:?}");
}

/// Whether Redis holds the lease code: library `pgci` where it has
/// Functions (7.0+), else every lease script by its SHA.
async fn lease_code_loaded(redis: &mut redis::aio::MultiplexedConnection) -> bool {
    let listed: redis::RedisResult<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(pgci_protocol::lease::LIBRARY)
        .query_async(redis)
        .await;
    match listed {
        Ok(libs) => matches!(&libs, redis::Value::Array(a) if !a.is_empty()),
        Err(error) if pgci_protocol::functions::is_unknown_command(&error) => {
            let mut exists = redis::cmd("SCRIPT");
            exists.arg("EXISTS");
            for (_, body) in pgci_protocol::lease::FUNCTIONS {
                exists.arg(redis::Script::new(body).get_hash());
            }
            let found: Vec<bool> = exists.query_async(redis).await.expect("script exists");
            found.iter().all(|f| *f)
        }
        Err(error) => panic!("function list: {error}"),
    }
}

/// Makes Redis forget the lease code, as a restart without persistence
/// does: `FUNCTION FLUSH`, or `SCRIPT FLUSH` before Redis 7.
async fn forget_lease_code(redis: &mut redis::aio::MultiplexedConnection) {
    let flushed: redis::RedisResult<()> =
        redis::cmd("FUNCTION").arg("FLUSH").query_async(redis).await;
    if let Err(error) = flushed {
        assert!(
            pgci_protocol::functions::is_unknown_command(&error),
            "{error}"
        );
    }
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(redis)
        .await
        .expect("script flush");
}

/// The protocol step by step against the running daemon: `setup` and the
/// daemon load library `pgci`; a miss takes the lease and a second reader
/// is told to wait; the daemon's DEL for a committed change voids the
/// lease, so the first reader's fill (of the row it read before) is
/// refused and nothing is cached; after a FUNCTION FLUSH the client loads
/// the library itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_that_raced_an_invalidation_is_refused() {
    let mut env = TestEnv::start(3).await;
    env.setup();
    let mut redis = env.redis.conn().await;
    assert!(
        lease_code_loaded(&mut redis).await,
        "setup loads the lease code"
    );
    forget_lease_code(&mut redis).await;
    assert!(!lease_code_loaded(&mut redis).await, "forgotten");
    let _daemon = env.daemon().await;
    assert!(
        lease_code_loaded(&mut redis).await,
        "the daemon loads the lease code at start"
    );

    let pg = env.pg.client().await;
    let id = pgci_test_support::first_profile_id(&pg).await;
    let key = format!("profile:user:{id}");
    let mut first = Cache::new(env.redis.conn().await, CacheOptions::default());
    let mut second = Cache::new(
        env.redis.conn().await,
        CacheOptions {
            lease_wait: Duration::from_millis(50),
            ..CacheOptions::default()
        },
    );
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let reader_pg = env.pg.client().await;
    let reader_id = id.clone();
    let reader_key = key.clone();
    let first_read = tokio::spawn(async move {
        first
            .get_or_load(
                &reader_key,
                3600,
                || async move {
                    let row = load_row(&reader_pg, &reader_id).await;
                    let _ = loaded_tx.send(());
                    let _ = go_rx.await;
                    Ok::<_, std::io::Error>(row)
                },
                None,
            )
            .await
            .expect("first read")
    });
    loaded_rx
        .await
        .expect("the first reader loaded the old row");
    // A second reader meanwhile waits for the lease, then reads the
    // database without filling.
    let (_, source) = second
        .get_or_load(
            &key,
            3600,
            || async { Ok::<_, std::io::Error>(Some("{}".to_string())) },
            None,
        )
        .await
        .expect("second read");
    assert_eq!(source, Source::Bypassed);
    pg.execute(
        "update public.profiles set bio = 'changed' where id = $1::text::uuid",
        &[&id],
    )
    .await
    .expect("update");
    env.sync().await;
    go_tx.send(()).expect("let the first reader fill");
    let (value, source) = first_read.await.expect("first reader");
    assert_eq!(source, Source::Refused, "the invalidation voided the lease");
    assert_ne!(
        value.as_deref().and_then(bio_of).as_deref(),
        Some("changed")
    );
    let cached: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("get");
    assert_eq!(cached, None, "nothing old was cached");

    // A later reader fills the new row.
    let mut third = Cache::new(env.redis.conn().await, CacheOptions::default());
    let (value, source) = third
        .get_or_load(
            &key,
            3600,
            || async { Ok::<_, std::io::Error>(load_row(&pg, &id).await) },
            None,
        )
        .await
        .expect("third read");
    assert_eq!(source, Source::Filled);
    assert_eq!(
        value.as_deref().and_then(bio_of).as_deref(),
        Some("changed")
    );
    assert_eq!(
        third.get_cached_data(&key).await.expect("get"),
        value,
        "the plain read sees the filled value"
    );

    // Redis forgot the functions (a restart without persistence): a
    // reader loads the library (or, before Redis 7, the script) itself.
    forget_lease_code(&mut redis).await;
    third.invalidate_cache(&key).await.expect("del");
    let (_, source) = third
        .get_or_load(
            &key,
            3600,
            || async { Ok::<_, std::io::Error>(load_row(&pg, &id).await) },
            None,
        )
        .await
        .expect("read after FUNCTION FLUSH");
    assert_eq!(source, Source::Filled);
}

/// The walsender sends a commit as soon as its record is flushed, before
/// the committing session makes it visible — for as long as a synchronous
/// standby holds the commit back. The daemon applies a batch's DEL only
/// once its transactions are visible: a reader that read the old row while
/// the commit was invisible, and filled the key through a lease, has that
/// entry removed when the commit shows, instead of keeping it for a TTL.
#[tokio::test(flavor = "multi_thread")]
async fn invalidations_wait_until_their_commit_is_visible() {
    let mut env = TestEnv::start(3).await;
    env.setup();
    let _daemon = env.daemon().await;
    let admin = env.pg.client().await;
    let id = pgci_test_support::first_profile_id(&admin).await;
    let key = format!("profile:user:{id}");
    let mut redis = env.redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("{\"bio\":\"cached before the write\"}")
        .query_async(&mut redis)
        .await
        .expect("preset");
    // Only the writer's commit waits for a standby that never comes.
    for sql in [
        "alter system set synchronous_standby_names = 'nobody'",
        "alter system set synchronous_commit = 'local'",
        "select pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("configure");
    }
    let writer = env.pg.client().await;
    writer
        .batch_execute("set synchronous_commit = on")
        .await
        .expect("writer waits for the standby");
    pgci_test_support::sees_synchronous_standbys(&writer, "nobody").await;
    let writer_pid: i32 = writer
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let held_id = id.clone();
    let held = tokio::spawn(async move {
        writer
            .execute(
                "update public.profiles set bio = 'invisible for now' where id = $1::text::uuid",
                &[&held_id],
            )
            .await
    });
    // The commit is flushed and streamed while it is still invisible.
    wait_for("the held commit to be streamed", Duration::from_secs(10), || async {
        admin
            .query_one(
                "select coalesce(bool_and(sent_lsn >= pg_current_wal_flush_lsn()), false) from pg_stat_replication",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    // Give a daemon that would not wait time to delete the key now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let still_old: Option<String> = admin
        .query_one(
            "select bio from public.profiles where id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("read")
        .get(0);
    assert_ne!(
        still_old.as_deref(),
        Some("invisible for now"),
        "the commit is still invisible"
    );
    let reader_pg = env.pg.client().await;
    let mut cache = Cache::new(env.redis.conn().await, CacheOptions::default());
    let (value, source) = cache
        .get_or_load(
            &key,
            3600,
            || async { Ok::<_, std::io::Error>(load_row(&reader_pg, &id).await) },
            None,
        )
        .await
        .expect("read while the commit is invisible");
    assert_ne!(
        value.as_deref().and_then(bio_of).as_deref(),
        Some("invisible for now")
    );
    eprintln!("reader during the invisible window: {source:?}");

    admin
        .query_one("select pg_cancel_backend($1)", &[&writer_pid])
        .await
        .expect("release the held commit");
    let _ = held.await.expect("writer task");
    for sql in [
        "alter system reset synchronous_standby_names",
        "alter system reset synchronous_commit",
        "select pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.expect("restore");
    }
    env.sync().await;
    let cached: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .expect("get");
    assert!(
        cached.as_deref().and_then(bio_of).as_deref() == Some("invisible for now")
            || cached.is_none(),
        "nothing read before the commit showed may stay cached: {cached:?}"
    );
}
