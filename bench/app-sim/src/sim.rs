//! One policy's run: concurrent requests reading pages of Zipf-drawn
//! users, a stream of the app's own writes (each followed by the writer's
//! read of what it changed), writes that bypass the app (a SQL function,
//! a batch job), and what every read returned against the truth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgci_client::{write_token, L1Options, L1};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::ConnectionManager;

use crate::policy::{Policy, Reader};
use crate::truth::Truth;
use crate::workload::{draw_page, version_of, Page, Users, PAGES};

/// The workload's shape.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Seconds each policy runs.
    pub seconds: u64,
    /// Concurrent request loops.
    pub workers: usize,
    /// Reads per second offered by all the loops together (an open
    /// workload: a faster cache then serves the same requests with idle
    /// time left, instead of making more of them); `None`: as fast as
    /// each loop can.
    pub reads_per_sec: Option<u64>,
    /// The app's own writes per second.
    pub writes_per_sec: u64,
    /// Calls per second of the SQL function that bypasses the app.
    pub bypass_per_sec: u64,
    /// The batch job runs this often…
    pub batch_every: Duration,
    /// …updating this many users' journeys.
    pub batch_users: usize,
    /// Seeds every random choice: each policy sees the same sequence.
    pub seed: u64,
    /// Every policy gets the L1 policy's faults (a pub/sub cut, a Redis
    /// restart), not only the L1 policy.
    pub faults: bool,
}

/// Per-second counts, for the plot.
pub struct Series {
    /// [lookups, hits, stale] per second since the start.
    seconds: Vec<[AtomicU64; 3]>,
    start: Instant,
    /// When the L1 policy's connection was cut.
    cuts: std::sync::Mutex<Vec<Instant>>,
}

impl Series {
    fn new(seconds: u64, start: Instant) -> Series {
        Series {
            seconds: (0..seconds + 30).map(|_| Default::default()).collect(),
            start,
            cuts: Default::default(),
        }
    }

    fn add(&self, at: Instant, hit: bool, stale: bool) {
        let i = (at.saturating_duration_since(self.start).as_secs() as usize)
            .min(self.seconds.len() - 1);
        let slot = &self.seconds[i];
        slot[0].fetch_add(1, Ordering::Relaxed);
        slot[1].fetch_add(u64::from(hit), Ordering::Relaxed);
        slot[2].fetch_add(u64::from(stale), Ordering::Relaxed);
    }

    /// Notes a cut (or a restart) of L1's connection now.
    fn cut(&self) {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        cuts.push(Instant::now());
    }

    /// Whether `at` falls in the first [`CUT_WINDOW`] after a cut.
    fn after_cut(&self, at: Instant) -> bool {
        let cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        cuts.iter()
            .any(|&cut| at >= cut && at.duration_since(cut) < CUT_WINDOW)
    }

    /// (second, hit %, stale %) for each second with lookups, up to `until`.
    pub fn points(&self, until: u64) -> Vec<(f64, f64, f64)> {
        self.seconds
            .iter()
            .take(until as usize)
            .enumerate()
            .filter_map(|(i, s)| {
                let n = s[0].load(Ordering::Relaxed);
                (n > 0).then(|| {
                    let pct = |x: &AtomicU64| 100.0 * x.load(Ordering::Relaxed) as f64 / n as f64;
                    (i as f64, pct(&s[1]), pct(&s[2]))
                })
            })
            .collect()
    }
}

/// How long after a cut of L1's connection reads are counted apart (L1
/// is emptied, reconnects and fills again within it).
pub const CUT_WINDOW: Duration = Duration::from_secs(2);

/// What one request loop (or the writer's own reads) saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Reads.
    pub requests: u64,
    /// Reads served from the cache.
    pub hits: u64,
    /// Of them, reads served from the in-process cache.
    pub l1_hits: u64,
    /// Reads in the [`CUT_WINDOW`] after a cut of L1's connection…
    pub cut_reads: u64,
    /// …how many of them L1 answered…
    pub cut_l1_hits: u64,
    /// …and how many were stale.
    pub cut_stale: u64,
    /// Reads that queried PostgreSQL.
    pub db_queries: u64,
    /// Reads that returned an older version than the newest committed
    /// when they started.
    pub stale: u64,
    /// Of them, reads right after the reader's own write.
    pub own_reads: u64,
    /// …and how many of those were stale.
    pub own_stale: u64,
    /// …and how many of those queried PostgreSQL.
    pub own_queried: u64,
    /// …and their latencies summed, microseconds.
    pub own_latency_us: u64,
    /// The longest a returned page had been superseded.
    pub worst_stale: Duration,
    /// Of the stale reads, those the in-process cache answered.
    pub stale_from_l1: u64,
    /// How long each stale read's page had been superseded when the read
    /// started, microseconds (the window a cache leaves open).
    pub stale_ages_us: Vec<u32>,
    /// Each read's latency, microseconds.
    pub latencies_us: Vec<u32>,
    /// Each of the app's writes' latency (statement and commit),
    /// microseconds.
    pub commit_latencies_us: Vec<u32>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.hits += other.hits;
        self.l1_hits += other.l1_hits;
        self.cut_reads += other.cut_reads;
        self.cut_l1_hits += other.cut_l1_hits;
        self.cut_stale += other.cut_stale;
        self.db_queries += other.db_queries;
        self.stale += other.stale;
        self.own_reads += other.own_reads;
        self.own_stale += other.own_stale;
        self.own_queried += other.own_queried;
        self.own_latency_us += other.own_latency_us;
        self.worst_stale = self.worst_stale.max(other.worst_stale);
        self.stale_from_l1 += other.stale_from_l1;
        self.stale_ages_us.extend(other.stale_ages_us);
        self.latencies_us.extend(other.latencies_us);
        self.commit_latencies_us.extend(other.commit_latencies_us);
    }
}

/// What the run shares.
pub struct Shared {
    /// The users, by popularity.
    pub users: Users,
    /// A user's index by id.
    pub index: HashMap<String, usize>,
    /// The two token ids (transfers move one of them).
    pub tokens: Vec<String>,
    /// The pillar ids (journey progress moves on one of them).
    pub pillars: Vec<String>,
    /// Committed versions.
    pub truth: Truth,
}

impl Shared {
    /// The entity of `page` of user `user`.
    pub fn entity(&self, page: Page, user: usize) -> usize {
        page.index() * self.users.ids.len() + user
    }

    /// Reads the current versions of `page` for `ids` (all users when
    /// `None`) into the truth, as of now.
    pub async fn learn(&self, pg: &tokio_postgres::Client, page: Page, ids: Option<&[String]>) {
        let rows = match ids {
            None => pg.query(&page.versions_sql(), &[]).await,
            Some(ids) => pg.query(&page.versions_of_sql(), &[&ids]).await,
        }
        .expect("read versions");
        let now = Instant::now();
        for row in rows {
            let id: String = row.get(0);
            let version: i64 = row.get(1);
            if let Some(&user) = self.index.get(&id) {
                self.truth.committed(self.entity(page, user), version, now);
            }
        }
    }
}

/// Opens what a request loop or writer needs.
pub struct Connect {
    /// PostgreSQL URL.
    pub pg_url: String,
    /// Shared Redis connection (it reconnects after a Redis restart).
    pub redis: ConnectionManager,
    /// Redis URL (the L1 policy's own connection).
    pub redis_url: String,
}

impl Connect {
    async fn pg(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.pg_url, tokio_postgres::NoTls)
            .await
            .expect("connect to postgres");
        tokio::spawn(connection);
        client
    }

    async fn reader(&self, policy: Policy, l1: Option<L1>) -> Reader {
        Reader::new(policy, self.pg().await, self.redis.clone(), l1).await
    }
}

/// One read, judged against the truth.
async fn judged_read(
    reader: &mut Reader,
    shared: &Shared,
    series: &Series,
    tally: &mut Tally,
    page: Page,
    user: usize,
    after: Option<pgci_client::WriteToken>,
) {
    let entity = shared.entity(page, user);
    let newest = shared.truth.newest(entity);
    let started = Instant::now();
    let read = reader.read(page, &shared.users.ids[user], after).await;
    let took = started.elapsed();
    let version = read.json.as_deref().and_then(version_of).unwrap_or(0);
    let stale = version < newest;
    tally.requests += 1;
    tally.hits += u64::from(read.hit);
    tally.l1_hits += u64::from(read.near);
    if series.after_cut(started) {
        tally.cut_reads += 1;
        tally.cut_l1_hits += u64::from(read.near);
        tally.cut_stale += u64::from(stale);
    }
    tally.db_queries += u64::from(read.queried);
    tally
        .latencies_us
        .push(took.as_micros().min(u32::MAX as u128) as u32);
    if stale {
        tally.stale += 1;
        tally.stale_from_l1 += u64::from(read.near);
        if let Some(since) = shared.truth.newer_since(entity, version) {
            let age = started.saturating_duration_since(since);
            tally.worst_stale = tally.worst_stale.max(age);
            tally
                .stale_ages_us
                .push(age.as_micros().min(u32::MAX as u128) as u32);
        }
    }
    series.add(started, read.hit, stale);
}

/// What the readers of one policy saw in a run.
pub type Seen = (Tally, Arc<Series>);

/// Runs `policy` for the workload's duration; under the L1 policy,
/// `restart` is told when to restart Redis. With `beside`, every other
/// request loop reads the way that policy does instead, on the same
/// writes at the same time (the writes are `policy`'s): what those loops
/// saw is returned apart.
pub async fn run(
    policy: Policy,
    beside: Option<Policy>,
    workload: &Workload,
    shared: Arc<Shared>,
    connect: Arc<Connect>,
    restart: Option<tokio::sync::oneshot::Sender<()>>,
) -> (Seen, Option<Seen>) {
    let start = Instant::now();
    let end = start + Duration::from_secs(workload.seconds);
    let series = Arc::new(Series::new(workload.seconds, start));
    let beside_series = Arc::new(Series::new(workload.seconds, start));
    // One in-process cache for the app server's request loops.
    let l1 = match policy.l1() || beside.is_some_and(Policy::l1) {
        true => {
            let client = redis::Client::open(connect.redis_url.as_str()).expect("redis url");
            Some(
                L1::connect(&client, L1Options::default())
                    .await
                    .expect("L1 connects"),
            )
        }
        false => None,
    };
    let mut tasks = Vec::new();
    if l1.is_some() || workload.faults {
        // Cut L1's connection at a third of the run (as a network blip or
        // an output-buffer kill would) and have Redis restarted (empty) at
        // two thirds: L1 must be emptied and refilled without a stale read.
        // (With `faults`, every policy gets the same, for comparison.)
        let (l1, mut redis) = (l1.clone(), connect.redis.clone());
        let (series, beside_series) = (series.clone(), beside_series.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((start + (end - start) / 3).into()).await;
            series.cut();
            beside_series.cut();
            let _: i64 = redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "pubsub"][..])
                .query_async(&mut redis)
                .await
                .expect("CLIENT KILL");
            tokio::time::sleep_until((start + (end - start) * 2 / 3).into()).await;
            if let Some(restart) = restart {
                series.cut();
                beside_series.cut();
                let _ = restart.send(());
            }
            tokio::time::sleep_until(end.into()).await;
            let Some(l1) = l1 else {
                return Tally::default();
            };
            let stats = l1.stats();
            eprintln!(
                "l1 at the end: entries={} bytes={} hits={} fills={} not_kept={} drops: disconnect={} gap={} epoch={} flush={}",
                stats.entries,
                stats.bytes,
                stats.hits,
                stats.fills,
                stats.not_kept,
                stats.drops.disconnect,
                stats.drops.gap,
                stats.drops.epoch,
                stats.drops.flush
            );
            Tally::default()
        }));
    }
    let per_loop = workload
        .reads_per_sec
        .map(|rate| rate as f64 / workload.workers as f64);
    let mut beside_tasks = Vec::new();
    for w in 0..workload.workers {
        // Odd loops read as `beside` does, when it is given.
        let (reads_as, series, tasks) = match beside.filter(|_| w % 2 == 1) {
            Some(other) => (other, beside_series.clone(), &mut beside_tasks),
            None => (policy, series.clone(), &mut tasks),
        };
        let (shared, connect) = (shared.clone(), connect.clone());
        let l1 = l1.clone().filter(|_| reads_as.l1());
        let seed = workload.seed.wrapping_mul(1000).wrapping_add(w as u64);
        tasks.push(tokio::spawn(async move {
            let mut reader = connect.reader(reads_as, l1).await;
            let mut rng = StdRng::seed_from_u64(seed);
            let mut tally = Tally::default();
            let (began, mut reads) = (Instant::now(), 0u64);
            while Instant::now() < end {
                if let Some(per_loop) = per_loop {
                    // Paced by the count due so far (tokio's timers tick in
                    // milliseconds, finer than one read).
                    if reads as f64 >= began.elapsed().as_secs_f64() * per_loop {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    reads += 1;
                }
                let page = draw_page(&mut rng);
                let user = shared.users.draw(&mut rng);
                judged_read(&mut reader, &shared, &series, &mut tally, page, user, None).await;
            }
            tally
        }));
    }
    {
        let (shared, connect, series, workload, l1) = (
            shared.clone(),
            connect.clone(),
            series.clone(),
            workload.clone(),
            l1.clone(),
        );
        let l1 = l1.filter(|_| policy.l1());
        tasks.push(tokio::spawn(async move {
            app_writes(policy, &workload, &shared, &connect, &series, end, l1).await
        }));
    }
    {
        let (shared, connect, workload) = (shared.clone(), connect.clone(), workload.clone());
        tasks.push(tokio::spawn(async move {
            bypass_writes(policy, &workload, &shared, &connect, end).await;
            Tally::default()
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        total.merge(task.await.expect("simulation task"));
    }
    let mut beside_total = Tally::default();
    for task in beside_tasks {
        beside_total.merge(task.await.expect("simulation task"));
    }
    (
        (total, series),
        beside.map(|_| (beside_total, beside_series)),
    )
}

/// The app's own writes, each followed by the writer's read of the page
/// it changed; under the plan the app deletes the keys first, under
/// tokens the read carries the write's token.
async fn app_writes(
    policy: Policy,
    workload: &Workload,
    shared: &Shared,
    connect: &Connect,
    series: &Series,
    end: Instant,
    l1: Option<L1>,
) -> Tally {
    let mut reader = connect.reader(policy, l1).await;
    if policy.synchronous() {
        synchronous(reader.pg()).await;
    }
    let mut rng = StdRng::seed_from_u64(workload.seed.wrapping_add(7_777));
    let mut tally = Tally::default();
    if workload.writes_per_sec == 0 {
        return tally;
    }
    let mut tick =
        tokio::time::interval(Duration::from_micros(1_000_000 / workload.writes_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        let user = shared.users.draw(&mut rng);
        let id = shared.users.ids[user].clone();
        let began = Instant::now();
        let (page, changed): (Page, Vec<String>) = match rng.random_range(0..10) {
            0..=3 => {
                let bio = format!("bio {}", rng.random::<u32>());
                reader
                    .pg()
                    .execute(
                        "update public.profiles set bio = $2, updated_at = now() where id = $1::text::uuid",
                        &[&id, &bio],
                    )
                    .await
                    .expect("profile edit");
                (Page::Profile, vec![id.clone()])
            }
            4..=7 => {
                let to = shared.users.ids[shared.users.draw(&mut rng)].clone();
                let token = &shared.tokens[rng.random_range(0..shared.tokens.len())];
                if to == id {
                    continue;
                }
                let moved = reader
                    .pg()
                    .execute(
                        "select public.transfer_tokens($1::text::uuid, $2::text::uuid, $3::text::uuid, 0.01)",
                        &[&id, &to, token],
                    )
                    .await;
                if moved.is_err() {
                    // Not enough balance: the app shows an error, nothing changed.
                    continue;
                }
                (Page::Balance, vec![id.clone(), to])
            }
            _ => {
                let pillar = &shared.pillars[rng.random_range(0..shared.pillars.len())];
                reader
                    .pg()
                    .execute(
                        "update public.user_journeys set progress = (progress + 1) % 101, updated_at = now() \
                          where user_id = $1::text::uuid and pillar_id = $2::text::uuid",
                        &[&id, pillar],
                    )
                    .await
                    .expect("journey progress");
                (Page::Journey, vec![id.clone()])
            }
        };
        tally
            .commit_latencies_us
            .push(began.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if policy.app_deletes() {
            let keys: Vec<String> = changed.iter().map(|id| page.key(id)).collect();
            reader.delete(&keys).await;
        }
        shared.learn(reader.pg(), page, Some(&changed)).await;
        let token = if policy.tokens() {
            Some(write_token(reader.pg()).await.expect("write token"))
        } else {
            None
        };
        let (stale_before, queried_before) = (tally.stale, tally.db_queries);
        judged_read(&mut reader, shared, series, &mut tally, page, user, token).await;
        tally.own_reads += 1;
        tally.own_stale += tally.stale - stale_before;
        tally.own_queried += tally.db_queries - queried_before;
        tally.own_latency_us += u64::from(tally.latencies_us.last().copied().unwrap_or(0));
    }
    tally
}

/// Commits on `pg` from now on wait until the daemon has applied them
/// (it is a synchronous standby while the policy runs).
async fn synchronous(pg: &tokio_postgres::Client) {
    pg.batch_execute("set synchronous_commit = remote_apply")
        .await
        .expect("synchronous_commit");
}

/// Writes the app does not know about: a SQL function changing balances,
/// and a batch job moving many users' journeys at once (synchronous too
/// under a synchronous policy).
async fn bypass_writes(
    policy: Policy,
    workload: &Workload,
    shared: &Shared,
    connect: &Connect,
    end: Instant,
) {
    let pg = connect.pg().await;
    if policy.synchronous() {
        synchronous(&pg).await;
    }
    let mut rng = StdRng::seed_from_u64(workload.seed.wrapping_add(9_999));
    let per_sec = workload.bypass_per_sec.max(1);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_batch = Instant::now() + workload.batch_every;
    while Instant::now() < end {
        tick.tick().await;
        if workload.bypass_per_sec > 0 {
            let id = shared.users.ids[shared.users.draw(&mut rng)].clone();
            pg.execute("select public.sim_daily_bonus($1::text::uuid)", &[&id])
                .await
                .expect("bonus");
            shared
                .learn(&pg, Page::Balance, Some(std::slice::from_ref(&id)))
                .await;
        }
        if Instant::now() >= next_batch && workload.batch_users > 0 {
            next_batch += workload.batch_every;
            let mut ids: Vec<String> = (0..workload.batch_users)
                .map(|_| shared.users.ids[shared.users.draw(&mut rng)].clone())
                .collect();
            ids.sort();
            ids.dedup();
            pg.execute(
                "update public.user_journeys set progress = (progress + 1) % 101, updated_at = now() \
                  where user_id = any($1::text[]::uuid[])",
                &[&ids],
            )
            .await
            .expect("batch job");
            shared.learn(&pg, Page::Journey, Some(&ids)).await;
        }
    }
}

/// Loads every page's current version (versions persist across policies).
pub async fn learn_all(shared: &Shared, pg: &tokio_postgres::Client) {
    for page in PAGES {
        shared.learn(pg, page, None).await;
    }
}
