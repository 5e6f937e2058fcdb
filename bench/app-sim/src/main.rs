//! The app simulation: does the caching plan pay off, and at what cost in
//! stale reads? Runs one workload — Zipf-popular users reading profiles,
//! balance pages and journey progress through cache-aside on Redis, while
//! the app writes (profile edits, `transfer_tokens`, journey progress) and
//! other writers bypass it (a SQL function, a batch job) — under each
//! policy in turn, on a private PostgreSQL and Redis started like the
//! test harness does, and reports per policy the hit rate, database
//! queries per request, latency, and stale reads: reads that returned an
//! older version than the newest one committed when they started (every
//! row carries a version counter, so this is exact).
//!
//! ```text
//! scripts/app-sim.sh [--seconds 30] [--users 10000] [--zipf 1.1] [--workers 16] [--read-rate N] …
//! ```

mod policy;
mod report;
mod sim;
mod truth;
use pgci_app_sim::{column, workload};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use pgci_client::{write_token, Cache, CacheOptions};
use pgci_test_support::{Daemon, TestEnv};

use crate::policy::Policy;
use crate::report::Outcome;
use crate::sim::{Connect, Shared, Workload};
use crate::workload::Users;

/// Runs the app simulation under each cache policy and reports the plan's
/// success metrics and stale reads.
#[derive(Parser, Debug)]
#[command(name = "app-sim")]
struct Args {
    /// Seconds each policy runs.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Users in the fixture (each has a profile, two balances, two journeys).
    #[arg(long, default_value_t = 10_000)]
    users: i32,
    /// Zipf exponent of user popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Concurrent request loops.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Reads per second offered by all request loops together (each loop
    /// paced to its share); 0: each loop reads as fast as it can, so a
    /// faster cache makes more reads.
    #[arg(long, default_value_t = 0)]
    read_rate: u64,
    /// Give every policy the L1 policy's faults (pub/sub connections
    /// killed at a third of the run, Redis restarted empty at two thirds),
    /// so their stale reads compare like for like.
    #[arg(long)]
    faults: bool,
    /// The app's own writes per second.
    #[arg(long, default_value_t = 40)]
    writes: u64,
    /// Calls per second of the SQL function that changes balances behind
    /// the app's back.
    #[arg(long, default_value_t = 10)]
    bypass: u64,
    /// Seconds between runs of the batch job (journeys of many users).
    #[arg(long, default_value_t = 5)]
    batch_every: u64,
    /// Users the batch job updates per run.
    #[arg(long, default_value_t = 200)]
    batch_users: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs this policy's readers beside each policy's in the same run:
    /// half the request loops read each way, on the same writes at the
    /// same time, so that what the machine does to one it does to the
    /// other (the writes, the daemon and the faults are the other
    /// policy's; both must run the daemon the same way).
    #[arg(long)]
    beside: Option<String>,
    /// Policies to run, comma-separated (default: all of them).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Where to write the plot.
    #[arg(long, default_value = "docs/app-sim.png")]
    plot: PathBuf,
    /// A TrueType font for the plot's labels.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let policies: Vec<Policy> = if args.policies.is_empty() {
        Policy::ALL.to_vec()
    } else {
        args.policies
            .iter()
            .map(|name| {
                Policy::parse(name).unwrap_or_else(|| {
                    fail(&format!(
                        "--policies: unknown policy {name:?}; choose from {}",
                        Policy::ALL.map(Policy::name).join(", ")
                    ))
                })
            })
            .collect()
    };
    let beside = args.beside.as_deref().map(|name| {
        let beside = Policy::parse(name).unwrap_or_else(|| {
            fail(&format!(
                "--beside: unknown policy {name:?}; choose from {}",
                Policy::ALL.map(Policy::name).join(", ")
            ))
        });
        let same_daemon = |p: Policy| {
            p.daemon() == beside.daemon()
                && p.fences() == beside.fences()
                && p.synchronous() == beside.synchronous()
        };
        if let Some(other) = policies.iter().find(|&&p| !same_daemon(p)) {
            fail(&format!(
                "--beside {name}: {} runs the daemon differently (or not at all); pair policies that share it, e.g. daemon-leases-l1 with daemon-leases",
                other.name()
            ));
        }
        beside
    });
    if args.users < 2 || args.workers == 0 || args.seconds == 0 {
        fail("--users must be at least 2, --workers and --seconds at least 1");
    }
    if std::env::var_os("PGCI_DAEMON_BIN").is_none() {
        fail("PGCI_DAEMON_BIN is not set: run scripts/app-sim.sh, or build the daemon with `cargo build --release` and point PGCI_DAEMON_BIN at target/release/pg-cache-invalidator");
    }
    let workload = Workload {
        seconds: args.seconds,
        workers: args.workers,
        reads_per_sec: (args.read_rate > 0).then_some(args.read_rate),
        writes_per_sec: args.writes,
        bypass_per_sec: args.bypass,
        batch_every: Duration::from_secs(args.batch_every.max(1)),
        batch_users: args.batch_users,
        seed: args.seed,
        faults: args.faults,
    };

    eprintln!(
        "starting PostgreSQL and Redis, seeding {} users",
        args.users
    );
    let mut env = TestEnv::start(args.users).await;
    let pg = env.pg.client().await;
    pg.batch_execute(workload::SCHEMA_SQL)
        .await
        .expect("version counters");
    let ids: Vec<String> = column(&pg, "select id::text from public.profiles order by id").await;
    let tokens = column(&pg, "select id::text from public.tokens order by symbol").await;
    let pillars = column(&pg, "select id::text from public.pillars order by slug").await;
    let index: HashMap<String, usize> = ids.iter().cloned().zip(0..).collect();
    let users = ids.len();
    let redis = redis::aio::ConnectionManager::new(
        redis::Client::open(env.redis.url()).expect("redis url"),
    )
    .await
    .expect("connect to redis");
    let connect = Arc::new(Connect {
        pg_url: env.pg.url(),
        redis: redis.clone(),
        redis_url: env.redis.url(),
    });
    let mut shared = Some(Shared {
        users: Users::new(ids, args.zipf),
        index,
        tokens,
        pillars,
        truth: truth::Truth::new(3 * users),
    });

    let mut outcomes = Vec::new();
    for policy in policies {
        let mut redis = redis.clone();
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut redis)
            .await
            .expect("FLUSHALL");
        let daemon = match policy.daemon() {
            Some(refresh) => Some(start_daemon(&mut env, refresh, policy.fences()).await),
            None => None,
        };
        if policy.synchronous() {
            pgci_test_support::set_synchronous_standbys(
                &pg,
                "\"pg-cache-invalidator\"",
                Some("pg-cache-invalidator"),
            )
            .await;
        }
        let mut fresh = shared.take().expect("shared state");
        fresh.truth = truth::Truth::new(3 * users);
        sim::learn_all(&fresh, &pg).await;
        let fresh = Arc::new(fresh);
        eprintln!("running {} for {} s", policy.name(), args.seconds);
        // Under the L1 policy (every policy with --faults) Redis is restarted
        // (empty) in the middle.
        let faults = policy.l1() || beside.is_some_and(Policy::l1) || args.faults;
        let (restart, restart_now) = tokio::sync::oneshot::channel();
        let restarter = async {
            if faults && restart_now.await.is_ok() {
                env.redis.restart().await;
                eprintln!("redis restarted");
            }
        };
        let run = sim::run(
            policy,
            beside,
            &workload,
            fresh.clone(),
            connect.clone(),
            faults.then_some(restart),
        );
        let (((tally, series), beside_seen), ()) = tokio::join!(run, restarter);
        let outcome = Outcome {
            policy,
            tally,
            series,
            seconds: args.seconds,
            beside: None,
        };
        println!("{}", outcome.line());
        outcomes.push(outcome);
        if let (Some(other), Some((tally, series))) = (beside, beside_seen) {
            let outcome = Outcome {
                policy: other,
                tally,
                series,
                seconds: args.seconds,
                beside: Some(policy),
            };
            println!("{}", outcome.line());
            outcomes.push(outcome);
        }
        if policy.synchronous() {
            // Before the daemon stops: commits would wait for it.
            pgci_test_support::set_synchronous_standbys(&pg, "", None).await;
        }
        if let Some(mut daemon) = daemon {
            daemon.terminate().await;
        }
        shared = Some(Arc::into_inner(fresh).expect("every task ended"));
    }
    println!();
    print!("{}", report::table(&outcomes));
    match report::plot(&outcomes, &args.plot, &args.font) {
        Ok(()) => eprintln!("plot written to {}", args.plot.display()),
        Err(e) => eprintln!("no plot: {e}"),
    }
}

/// Starts the daemon with the pages' rules (fencing deleted keys until
/// their commits show, with `fence`) and waits until it has applied
/// everything committed so far.
async fn start_daemon(env: &mut TestEnv, refresh: bool, fence: bool) -> Daemon {
    let config = format!(
        "[postgres]\nurl = \"{}\"\n\n[redis]\nurl = \"{}\"\nfence_until_visible = {fence}\n\n[http]\nlisten = \"127.0.0.1:{}\"\n\n{}",
        env.pg.url(),
        env.redis.url(),
        env.http_port,
        workload::rules_toml(refresh)
    );
    std::fs::write(&env.config, config).expect("write config");
    env.setup();
    let daemon = env.spawn_daemon();
    let pg = env.pg.client().await;
    pg.execute(
        "update public.profiles set updated_at = now() where id = (select id from public.profiles order by id limit 1)",
        &[],
    )
    .await
    .expect("marker write");
    let token = write_token(&pg).await.expect("token");
    let mut cache = Cache::new(env.redis.conn().await, CacheOptions::default());
    let started = Instant::now();
    if !pgci_app_sim::caught_up(&mut cache, token, Duration::from_secs(300)).await {
        fail(&format!(
            "the daemon did not catch up in 5 minutes; its log:\n{}",
            daemon.log()
        ));
    }
    eprintln!(
        "daemon ({}) caught up in {:?}",
        if refresh { "refresh" } else { "delete" },
        started.elapsed()
    );
    daemon
}
