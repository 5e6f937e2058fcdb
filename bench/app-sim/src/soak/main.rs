//! The chaos soak: the simulated app's readers and writers run while a
//! nemesis, drawn from a seed, injects faults (one or two at a time) into
//! the daemon, PostgreSQL and Redis; after each round the faults are
//! healed, the writers pause, the daemon catches up, and an independent
//! checker compares every cached page with the database's version
//! counters. A cached page older than its rows, an own read (with a
//! write token) older than the write, or an app server's in-process copy
//! kept by the events older than its rows (an event lost without its
//! `seq`, `epoch` or a disconnect saying so; see `copies`), is a violation;
//! so is a canary key still in Redis after the slot confirmed the commit
//! that deletes it (checked all the time; see `confirmed`).
//!
//! ```text
//! scripts/soak.sh [--minutes 2] [--seed 1] [--users 300] [--redis server|cluster]
//! ```
//!
//! The last line is `violations=N kinds=K` (fault kinds injected); the
//! first violation is printed with the seed and round, so a failure can be
//! replayed with the same `--seed`.

mod confirmed;
mod copies;
mod nemesis;
mod redis_target;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use pgci_app_sim::workload::{self, Page, PAGES};
use pgci_client::{write_token, Cache, CacheOptions, WriteToken};
use pgci_test_support::{free_port, Daemon, Proxy, RedisCluster, TestEnv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::RwLock;

use crate::nemesis::{Fault, Links, Standby};
use crate::redis_target::{RedisConn, RedisTarget};

/// Runs the chaos soak.
#[derive(Parser, Debug)]
#[command(name = "soak")]
struct Args {
    /// How long to inject faults.
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// Seeds the nemesis and the workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Users in the fixture.
    #[arg(long, default_value_t = 300)]
    users: i32,
    /// Concurrent lease readers.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// How long the daemon may take to catch up after a round.
    #[arg(long, default_value_t = 120)]
    catch_up_secs: u64,
    /// The checker's own test: leave this page's rule out of the daemon's
    /// config (`profile`, `balance` or `journey`); the checker must then
    /// find stale pages.
    #[arg(long)]
    without_rule: Option<String>,
    /// Run no standby and never promote (on PostgreSQL 15 and 16 the soak
    /// never does: without failover slots a promotion flushes, and a write
    /// token taken on the new primary before the daemon is back can
    /// compare as applied against the old primary's record, as the README
    /// says).
    #[arg(long)]
    no_standby: bool,
    /// Which change stream the daemon reads: `replication` (a slot) or
    /// `outbox` (trigger-fed; the slot faults are left out).
    #[arg(long, default_value = "replication")]
    source: String,
    /// Where the cache is: `server` (one Redis) or `cluster` (a Redis
    /// Cluster of three masters and three replicas; its faults are master
    /// failovers and reshards instead of snapshot restores, a full Redis
    /// and the Redis links).
    #[arg(long, default_value = "server")]
    redis: String,
    /// Run the daemon with `redis.fence_until_visible = true`: its first
    /// pass leaves the lease marker where it deletes, until the commit
    /// shows (the soak's readers all read through leases).
    #[arg(long)]
    fences: bool,
    /// Copy every daemon's log into this directory before the servers'
    /// directories are removed (to read what happened around a violation).
    #[arg(long)]
    keep_logs: Option<std::path::PathBuf>,
    /// Inject only these fault kinds (comma-separated names, as in the
    /// report), to replay or time one kind alone.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// What the workload did, and what it got wrong.
#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    read_errors: AtomicU64,
    writes: AtomicU64,
    own_reads: AtomicU64,
    stale_own_reads: AtomicU64,
    rebuilds: AtomicU64,
}

/// What the workload tasks share.
struct Shared {
    /// The daemon reads the outbox: it records a count of batches, not a
    /// WAL position, so write tokens are never seen applied (own reads go
    /// to the database) and quiescence is a sentinel row's key gone.
    outbox: bool,
    ids: Vec<String>,
    pg_url: String,
    redis: RedisTarget,
    counts: Counts,
    /// Writers hold it shared for each write; the checker takes it
    /// exclusively, so no write is in flight while it checks.
    writes: RwLock<()>,
    stop: AtomicBool,
    first_violation: std::sync::Mutex<Option<String>>,
    /// An app server's in-process copies kept by the events alone.
    copies: Arc<copies::Copies>,
    /// Copies found older than their rows at a quiescent point: an
    /// invalidation lost without a gap, epoch or disconnect saying so.
    events_lost: AtomicU64,
    /// Quiescent points where the listener had not seen the last event
    /// within 10 s (its copies were not judged).
    copies_unchecked: AtomicU64,
    /// Canaries: nothing confirmed that Redis had not acknowledged.
    confirmed: Arc<confirmed::Watcher>,
}

impl Shared {
    /// A lease cache on its own Redis connection (reconnecting).
    async fn cache(&self) -> Cache<RedisConn> {
        Cache::new(self.redis.connect().await, CacheOptions::default())
    }

    fn violation(&self, what: String) {
        let mut first = self
            .first_violation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        eprintln!("VIOLATION: {what}");
        first.get_or_insert(what);
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if std::env::var_os("PGCI_DAEMON_BIN").is_none() {
        eprintln!("error: PGCI_DAEMON_BIN is not set: run scripts/soak.sh, or point it at a built pg-cache-invalidator");
        std::process::exit(2);
    }
    if args.users < 10 || args.readers == 0 || args.minutes <= 0.0 {
        eprintln!("error: --users must be at least 10, --readers at least 1, --minutes above 0");
        std::process::exit(2);
    }
    let outbox = match args.source.as_str() {
        "replication" => false,
        "outbox" => true,
        other => {
            eprintln!("error: --source {other:?}: choose replication or outbox");
            std::process::exit(2)
        }
    };
    let mut cluster = match args.redis.as_str() {
        "server" => None,
        "cluster" => Some(RedisCluster::start().await),
        other => {
            eprintln!("error: --redis {other:?}: choose server or cluster");
            std::process::exit(2)
        }
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    eprintln!(
        "soak: seed {}, {} min, {} users",
        args.seed, args.minutes, args.users
    );
    let mut env = TestEnv::start(args.users).await;
    if let Some(dir) = args.keep_logs.clone() {
        // A harness step that panics (a cluster that never heals, a slot
        // never synchronized) ends the soak before the report: keep the
        // logs of what led there too.
        let from = env.path("");
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            keep_logs(&from, &dir);
            eprintln!("the daemons' logs are in {}", dir.display());
            report(info);
        }));
    }
    let pg = env.pg.client().await;
    pg.batch_execute(workload::SCHEMA_SQL)
        .await
        .expect("version counters");
    let ids = pgci_app_sim::column(&pg, "select id::text from public.profiles order by id").await;
    // Profiles are refreshed, balances and journeys deleted.
    let left_out = args.without_rule.as_deref().map(|name| {
        PAGES
            .into_iter()
            .find(|p| p.name() == name)
            .unwrap_or_else(|| {
                eprintln!("error: --without-rule {name:?}: choose profile, balance or journey");
                std::process::exit(2)
            })
    });
    let rules: String = PAGES
        .into_iter()
        .filter(|page| Some(*page) != left_out)
        .map(|page| page.rule_toml(page == Page::Profile))
        .collect();
    // A synchronous standby with failover slots (17+): a commit anyone saw
    // survives a promotion, and so does the slot.
    let mut standby = if !args.no_standby && env.pg.major().await >= 17 {
        let server = env.pg.synchronous_standby_at(free_port(), !outbox).await;
        Some(Standby {
            server,
            slot: (!outbox).then(|| "pg_cache_invalidator".to_string()),
        })
    } else {
        None
    };
    // Every client finds the primary wherever it is now.
    let pg_url = match &standby {
        Some(standby) => format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?sslmode=disable&target_session_attrs=read-write",
            env.pg.port, standby.server.port
        ),
        None => env.pg.url(),
    };
    // The daemon reaches its servers through forwarders the nemesis can
    // slow down or cut.
    let mut pg_ports = vec![env.pg.port];
    pg_ports.extend(standby.as_ref().map(|s| s.server.port));
    let mut postgres = Vec::new();
    for port in pg_ports {
        postgres.push(Proxy::start(port).await);
    }
    let links = Links {
        redis: match cluster {
            None => Some(Proxy::start(env.redis.port).await),
            Some(_) => None,
        },
        postgres,
    };
    let redis = match &cluster {
        Some(cluster) => RedisTarget::Cluster(cluster.urls()),
        None => RedisTarget::Server(env.redis.url()),
    };
    let mut daemon_redis = match (&links.redis, &cluster) {
        (Some(proxy), _) => format!("url = \"redis://127.0.0.1:{}/0\"\n", proxy.port),
        (None, Some(cluster)) => format!("url = \"{}\"\ncluster = true\n", cluster.url()),
        (None, None) => unreachable!("one server has a forwarder"),
    };
    if args.fences {
        daemon_redis.push_str("fence_until_visible = true\n");
    }
    let hosts: Vec<String> = links
        .postgres
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect();
    let daemon_pg_url = format!(
        "postgres://postgres@{}/postgres?sslmode=disable&target_session_attrs=read-write",
        hosts.join(",")
    );
    let source = if outbox { "source = \"outbox\"\n" } else { "" };
    env.postgres_extra = source.to_string();
    let config = format!(
        "[postgres]\nurl = \"{daemon_pg_url}\"\n{source}\n[redis]\n{daemon_redis}\n[http]\nlisten = \"127.0.0.1:{}\"\n\n{rules}{SENTINEL_RULE}",
        env.http_port,
    );
    std::fs::write(&env.config, config).expect("write config");
    env.setup();
    let mut daemon = env.spawn_daemon();
    // The standby's copy becomes usable once the slot has moved.
    if let Some(Standby {
        server,
        slot: Some(slot),
    }) = &standby
    {
        server.wait_synced(slot, &env.pg).await;
    }
    let shared = Arc::new(Shared {
        outbox,
        ids,
        pg_url,
        redis,
        counts: Counts::default(),
        writes: RwLock::new(()),
        stop: AtomicBool::new(false),
        first_violation: std::sync::Mutex::new(None),
        copies: Arc::default(),
        events_lost: AtomicU64::new(0),
        copies_unchecked: AtomicU64::new(0),
        confirmed: Arc::default(),
    });
    let stop_copies = Arc::new(AtomicBool::new(false));
    let mut copy_tasks = vec![tokio::spawn(copies::listen(
        shared.copies.clone(),
        shared.redis.subscribe_url().to_string(),
        stop_copies.clone(),
    ))];
    for i in 0..2 {
        copy_tasks.push(tokio::spawn(copies::fill(
            shared.copies.clone(),
            shared.redis.clone(),
            shared.ids.clone(),
            stop_copies.clone(),
            args.seed + 200 + i,
        )));
    }
    if !outbox {
        copy_tasks.push(tokio::spawn(confirmed::launch(
            shared.confirmed.clone(),
            shared.pg_url.clone(),
            shared.redis.clone(),
            stop_copies.clone(),
        )));
        copy_tasks.push(tokio::spawn(confirmed::judge(
            shared.confirmed.clone(),
            shared.pg_url.clone(),
            shared.redis.clone(),
            SLOT.to_string(),
            stop_copies.clone(),
        )));
    }
    let mut tasks = Vec::new();
    for i in 0..args.readers {
        tasks.push(tokio::spawn(reader(
            shared.clone(),
            args.seed + 1 + i as u64,
        )));
    }
    tasks.push(tokio::spawn(writer(shared.clone(), args.seed + 100)));

    let deadline = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let mut injected: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut recovery: BTreeMap<Fault, Steps> = BTreeMap::new();
    let mut rounds = 0u64;
    let mut checked = 0u64;
    let mut stale_keys = 0u64;
    let mut restarts = 0u64;
    let mut violations = 0u64;
    check(
        &shared,
        &mut daemon,
        &mut env,
        args.catch_up_secs,
        &mut violations,
    )
    .await;
    let kinds = Fault::kinds(outbox, standby.is_some(), cluster.is_some());
    let kinds = match nemesis::only(&kinds, &args.only) {
        Ok(kinds) => kinds,
        Err(message) => {
            eprintln!("error: --only: {message}");
            std::process::exit(2)
        }
    };
    while Instant::now() < deadline {
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
        let faults = Fault::draw(&mut rng, &kinds);
        let names: Vec<&str> = faults.iter().map(|f| f.name()).collect();
        eprintln!("round {rounds}: {}", names.join(" + "));
        shared.confirmed.round.store(rounds, Ordering::Relaxed);
        if faults.iter().any(|f| f.undoes_invalidations()) {
            shared.confirmed.expect_loss();
        }
        let injecting = Instant::now();
        if nemesis::inject(
            &mut env,
            &mut daemon,
            standby.as_mut(),
            &links,
            cluster.as_mut(),
            &faults,
            &mut rng,
        )
        .await
        {
            restarts += 1;
        }
        for &fault in &faults {
            *injected.entry(fault).or_default() += 1;
        }
        eprintln!(
            "round {rounds}: injected and healed in {} ms",
            injecting.elapsed().as_millis()
        );
        let Checked { stale, steps } = check(
            &shared,
            &mut daemon,
            &mut env,
            args.catch_up_secs,
            &mut violations,
        )
        .await;
        eprintln!("round {rounds}: recovered: {steps}");
        for &fault in &faults {
            let longest = recovery.entry(fault).or_default();
            if steps.total() > longest.total() {
                *longest = steps;
            }
        }
        checked += 1;
        if stale > 0 {
            stale_keys += stale;
            violations += stale;
            shared.violation(format!(
                "seed {} round {rounds} ({}): {stale} cached pages older than their rows",
                args.seed,
                names.join(" + ")
            ));
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    stop_copies.store(true, Ordering::SeqCst);
    for task in tasks.into_iter().chain(copy_tasks) {
        let _ = task.await;
    }
    let c = &shared.counts;
    let stale_own = c.stale_own_reads.load(Ordering::Relaxed);
    println!(
        "batch_jobs={} (journeys rebuilt with TRUNCATE and INSERT in one transaction)",
        c.rebuilds.load(Ordering::Relaxed)
    );
    violations += stale_own;
    let lost = shared.events_lost.load(Ordering::Relaxed);
    violations += lost;
    let seen = shared.copies.counts();
    println!(
        "events_seen={} gaps_detected={} rewinds_detected={} new_epochs={} subscriber_disconnects={} copies_filled={} copy_checks_skipped={} events_lost_undetected={lost}",
        seen.events,
        seen.gaps,
        seen.rewinds,
        seen.epochs,
        seen.disconnects,
        seen.copies_filled,
        shared.copies_unchecked.load(Ordering::Relaxed),
    );
    let alive = shared.confirmed.alive.load(Ordering::Relaxed);
    violations += alive;
    println!(
        "canaries_launched={} canaries_judged={} canaries_alive_after_confirm={alive}",
        shared.confirmed.launched.load(Ordering::Relaxed),
        shared.confirmed.judged.load(Ordering::Relaxed),
    );
    println!(
        "seed={} source={} redis={} fences={} rounds={rounds} quiescent_points_checked={checked} daemon_restarts={restarts} standby={}",
        args.seed,
        args.source,
        args.redis,
        args.fences,
        match (&standby, outbox) {
            (None, _) => "no",
            (Some(_), false) => "yes (synchronous, failover slots)",
            (Some(_), true) => "yes (synchronous)",
        }
    );
    println!(
        "reads={} read_errors={} writes={} own_reads={} stale_own_reads={stale_own} stale_keys={stale_keys}",
        c.reads.load(Ordering::Relaxed),
        c.read_errors.load(Ordering::Relaxed),
        c.writes.load(Ordering::Relaxed),
        c.own_reads.load(Ordering::Relaxed),
    );
    let (promoted, flushed) = daemon_logs(&env);
    println!("promotions_resumed_without_flush={promoted} flushes={flushed}");
    for (fault, n) in &injected {
        println!(
            "fault {}: injected={n} longest_recovery_ms={} ({})",
            fault.name(),
            recovery.get(fault).map_or(0, |s| s.total().as_millis()),
            recovery.get(fault).copied().unwrap_or_default()
        );
    }
    let first = shared
        .first_violation
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .or_else(|| {
            shared
                .confirmed
                .first_alive()
                .map(|what| format!("seed {}: {what}", args.seed))
        });
    if let Some(first) = first {
        println!("first violation: {first}");
        eprintln!("daemon log (tail):\n{}", tail(&daemon.log(), 60));
    }
    println!("violations={violations} kinds={}", injected.len());
    if let Some(dir) = &args.keep_logs {
        keep_logs(&env.path(""), dir);
    }
    // Stop every server before exit(), which runs no destructors: the
    // servers outlived each run (found on the CI machine).
    drop(daemon);
    drop(standby);
    drop(cluster);
    drop(env);
    std::process::exit(i32::from(violations > 0));
}

/// Across every daemon the soak started: promotions resumed from a
/// synchronized failover slot, and flushes of every rule key (a dropped
/// slot, Redis back from a snapshot, a promotion that could not resume).
fn daemon_logs(env: &TestEnv) -> (usize, usize) {
    let mut promoted = 0;
    let mut flushed = 0;
    for n in 1.. {
        let Ok(log) = std::fs::read_to_string(env.path(&format!("daemon-{n}.log"))) else {
            break;
        };
        promoted += log
            .matches("the database behind the slot was promoted")
            .count();
        flushed += log.matches("flushed every key of every rule").count();
    }
    (promoted, flushed)
}

/// Copies `daemon-N.log` of every daemon the soak started (in the
/// environment's directory `from`) into `dir`.
fn keep_logs(from: &std::path::Path, dir: &std::path::Path) {
    if let Err(error) = std::fs::create_dir_all(dir) {
        eprintln!("cannot create {}: {error}", dir.display());
        return;
    }
    for n in 1.. {
        let name = format!("daemon-{n}.log");
        if std::fs::copy(from.join(&name), dir.join(&name)).is_err() {
            break;
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How long each step of a quiescent point took, from the faults healed.
#[derive(Clone, Copy, Default)]
struct Steps {
    /// Until no write was in flight.
    paused: Duration,
    /// Until a write token was taken on the primary.
    token: Duration,
    /// Until the daemon had applied that token (or the sentinel).
    caught_up: Duration,
    /// Until the events listener had seen the daemon's last event.
    listened: Duration,
}

impl Steps {
    /// From the faults healed to the checker's judgement.
    fn total(&self) -> Duration {
        self.paused + self.token + self.caught_up + self.listened
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ms: writes paused {}, token {}, caught up {}, listener {}",
            self.total().as_millis(),
            self.paused.as_millis(),
            self.token.as_millis(),
            self.caught_up.as_millis(),
            self.listened.as_millis()
        )
    }
}

/// What a quiescent point found.
struct Checked {
    /// Cached pages older than their rows.
    stale: u64,
    steps: Steps,
}

/// A quiescent point: writers paused, the daemon running and caught up
/// with everything committed; then every cached page is compared with its
/// rows' versions.
async fn check(
    shared: &Shared,
    daemon: &mut Daemon,
    env: &mut TestEnv,
    catch_up_secs: u64,
    violations: &mut u64,
) -> Checked {
    let mut steps = Steps::default();
    let mut step = Instant::now();
    let mut lap = |into: &mut Duration| {
        *into = step.elapsed();
        step = Instant::now();
    };
    let _paused = shared.writes.write().await;
    lap(&mut steps.paused);
    if let Some(status) = daemon.try_status() {
        *violations += 1;
        shared.violation(format!(
            "the daemon exited ({status}): {}",
            tail(&daemon.log(), 20)
        ));
        *daemon = env.spawn_daemon();
    }
    let pg = connect_pg(&shared.pg_url).await;
    let limit = Duration::from_secs(catch_up_secs);
    let caught_up = if shared.outbox {
        sentinel_applied(&pg, &shared.redis, limit).await
    } else {
        let token = loop {
            match write_token(&pg).await {
                Ok(token) => break token,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        lap(&mut steps.token);
        let mut cache = shared.cache().await;
        pgci_app_sim::caught_up(&mut cache, token, limit).await
    };
    lap(&mut steps.caught_up);
    if caught_up {
        shared.confirmed.settled();
    }
    if !caught_up {
        *violations += 1;
        shared.violation(format!(
            "the daemon did not catch up within {catch_up_secs} s: {}",
            tail(&daemon.log(), 30)
        ));
        return Checked { stale: 0, steps };
    }
    let mut redis = shared.redis.connect().await;
    let mut stale = 0;
    // The listener must have seen every event the daemon numbered so far
    // before its copies are judged.
    let last_seq = copies::last_seq(&shared.redis).await;
    let listened = shared
        .copies
        .caught_up(last_seq, Duration::from_secs(10))
        .await;
    lap(&mut steps.listened);
    let mut newest: HashMap<String, i64> = HashMap::new();
    for page in PAGES {
        let rows = pg.query(&page.versions_sql(), &[]).await.expect("versions");
        let truth: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        for id in &shared.ids {
            newest.insert(page.key(id), truth.get(id).copied().unwrap_or(0));
        }
        for id in &shared.ids {
            let cached: Option<String> = redis::cmd("GET")
                .arg(page.key(id))
                .query_async(&mut redis)
                .await
                .unwrap_or(None);
            let Some(v) = cached.as_deref().and_then(workload::version_of) else {
                continue;
            };
            let newest = truth.get(id).copied().unwrap_or(0);
            if v < newest {
                eprintln!("stale: {} cached v{v}, rows at v{newest}", page.key(id));
                stale += 1;
            }
        }
    }
    if listened {
        let lost = shared.copies.stale(&newest);
        if !lost.is_empty() {
            shared
                .events_lost
                .fetch_add(lost.len() as u64, Ordering::Relaxed);
            shared.violation(format!(
                "{} in-process copies older than their rows without a gap, epoch or disconnect: {}",
                lost.len(),
                lost.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
            ));
        }
    } else {
        shared.copies_unchecked.fetch_add(1, Ordering::Relaxed);
    }
    Checked { stale, steps }
}

/// The daemon's slot (the default name).
const SLOT: &str = "pg_cache_invalidator";

/// A rule the soak watches to know when the daemon has applied
/// everything committed before a sentinel row (the outbox source, which
/// has no WAL position to compare a write token with).
const SENTINEL_RULE: &str =
    "[[rules]]\ntable = \"public.pillars\"\nkeys = [\"sentinel:pillar:{id}\"]\naction = \"delete\"\n";

/// Sets a sentinel key, commits a pillar row whose rule deletes it, and
/// waits (at most `limit`) until the key is gone: the daemon applies in
/// commit order, so everything committed before is applied too.
async fn sentinel_applied(
    pg: &tokio_postgres::Client,
    target: &RedisTarget,
    limit: Duration,
) -> bool {
    let mut redis = target.connect().await;
    let started = Instant::now();
    let id = loop {
        let inserted = async {
            let id: String = pg
                .query_one("select gen_random_uuid()::text", &[])
                .await?
                .get(0);
            let key = format!("sentinel:pillar:{id}");
            let _: redis::RedisResult<()> = redis::cmd("SET")
                .arg(&key)
                .arg("1")
                .query_async(&mut redis)
                .await;
            pg.execute(
                "insert into public.pillars (id, slug) values ($1::text::uuid, 'sentinel-' || $1)",
                &[&id],
            )
            .await?;
            Ok::<_, tokio_postgres::Error>(key)
        };
        match inserted.await {
            Ok(key) => break key,
            Err(_) if started.elapsed() < limit => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(_) => return false,
        }
    };
    while started.elapsed() < limit {
        let exists: Option<bool> = redis::cmd("EXISTS")
            .arg(&id)
            .query_async(&mut redis)
            .await
            .ok();
        if exists == Some(false) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn connect_pg(url: &str) -> tokio_postgres::Client {
    loop {
        if let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Loads `page` of user `id` from the database.
async fn load(
    pg: &tokio_postgres::Client,
    page: Page,
    id: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let sql = page.query().replace("$1", "$1::text::uuid");
    Ok(pg.query_opt(&sql, &[&id]).await?.and_then(|r| r.get(0)))
}

/// Reads pages through leases (cache-aside with the client), forever.
async fn reader(shared: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pg = connect_pg(&shared.pg_url).await;
    let mut cache = shared.cache().await;
    while !shared.stop.load(Ordering::Relaxed) {
        let id = shared.ids[rng.random_range(0..shared.ids.len())].clone();
        let page = PAGES[rng.random_range(0..PAGES.len())];
        let read = cache
            .get_or_load(&page.key(&id), 300, || load(&pg, page, &id), None)
            .await;
        shared.counts.reads.fetch_add(1, Ordering::Relaxed);
        if read.is_err() {
            shared.counts.read_errors.fetch_add(1, Ordering::Relaxed);
            if pg.is_closed() {
                pg = connect_pg(&shared.pg_url).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The batch job: every journey row out (TRUNCATE) and back in, one
/// version higher, in one transaction.
const REBUILD_JOURNEYS: &str = "begin; \
    create temp table sim_journeys on commit drop as select * from public.user_journeys; \
    update sim_journeys set version = version + 1; \
    truncate public.user_journeys; \
    insert into public.user_journeys select * from sim_journeys; \
    commit;";

/// Writes: profile edits read back with a write token (own reads), the
/// SQL function that changes balances behind the app, journey updates of
/// several users at once.
async fn writer(shared: Arc<Shared>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pg = connect_pg(&shared.pg_url).await;
    let mut cache = shared.cache().await;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..30))).await;
        let _writing = shared.writes.read().await;
        if pg.is_closed() {
            pg = connect_pg(&shared.pg_url).await;
        }
        let id = shared.ids[rng.random_range(0..shared.ids.len())].clone();
        match rng.random_range(0..10) {
            0..=5 => {
                let Ok(row) = pg
                    .query_one(
                        "update public.profiles set bio = md5(random()::text) where id = $1::text::uuid returning version",
                        &[&id],
                    )
                    .await
                else {
                    continue;
                };
                shared.counts.writes.fetch_add(1, Ordering::Relaxed);
                if shared.outbox {
                    continue;
                }
                let written: i64 = row.get(0);
                let Ok(token) = write_token(&pg).await else {
                    continue;
                };
                own_read(&shared, &mut cache, &pg, &id, written, token).await;
            }
            6..=7 => {
                if pg
                    .execute("select public.sim_daily_bonus($1::text::uuid)", &[&id])
                    .await
                    .is_ok()
                {
                    shared.counts.writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Now and then a batch job rebuilds every journey: TRUNCATE and
            // INSERT in one transaction, each row's version one higher.
            _ if rng.random_ratio(1, 100) => {
                if pg.batch_execute(REBUILD_JOURNEYS).await.is_ok() {
                    shared.counts.writes.fetch_add(1, Ordering::Relaxed);
                    shared.counts.rebuilds.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                let some: Vec<String> = (0..5)
                    .map(|_| shared.ids[rng.random_range(0..shared.ids.len())].clone())
                    .collect();
                if pg
                    .execute(
                        "update public.user_journeys set progress = least(progress + 1, 100) where user_id = any($1::text[]::uuid[])",
                        &[&some],
                    )
                    .await
                    .is_ok()
                {
                    shared.counts.writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The writer reads its own profile back with its write token: never older
/// than what it wrote.
async fn own_read(
    shared: &Shared,
    cache: &mut Cache<RedisConn>,
    pg: &tokio_postgres::Client,
    id: &str,
    written: i64,
    token: WriteToken,
) {
    let key = Page::Profile.key(id);
    let Ok((value, source)) = cache
        .get_or_load(&key, 300, || load(pg, Page::Profile, id), Some(token))
        .await
    else {
        return;
    };
    shared.counts.own_reads.fetch_add(1, Ordering::Relaxed);
    if let Some(v) = value.as_deref().and_then(workload::version_of) {
        if v < written {
            shared
                .counts
                .stale_own_reads
                .fetch_add(1, Ordering::Relaxed);
            shared.violation(format!(
                "own read of {key} with token {token} returned v{v} ({source:?}), written v{written}"
            ));
        }
    }
}
