//! The cache inspector behind `verify`: reads cached keys and compares them
//! with what the database says now (Uber's Cache Inspector, Meta's Polaris
//! do this for their caches). A stale key here means an invalidation was
//! missed or a reader filled an old value, whatever the cause.
//!
//! ```text
//!  rules ─▶ targets (template + expected value) ─▶ SCAN MATCH (bounded, rate-limited)
//!        ─▶ key ─▶ its template's values ─▶ GET ─▶ jsonb compare in PostgreSQL
//!        ─▶ mismatch? wait until the daemon applied everything committed so far,
//!           read again ─▶ still stale: report (and with --repair, delete it)
//! ```
//!
//! Only keys whose value the daemon can compute are checked: whole-row
//! refresh rules, delete rules marked `holds = "row"`, and refresh query
//! rules whose parameters all appear in the key. A key several templates
//! match belongs to the one with the most literal text.

use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use crate::db::compare::{Compared, Comparer, Expected};
use crate::db::DbError;
use crate::lease;
use crate::plan::keys::KeyTemplate;
use crate::plan::rules::{Rule, RuleSet};
use crate::redis::inspect;

/// How many times a mismatch waits for the daemon and looks again before
/// it counts as stale: a row written again while the daemon applied the
/// change before mismatches once more without anything being wrong.
const WAITS: u32 = 3;

/// How many stale keys a report lists (the counts cover all).
pub const LISTED: usize = 20;
/// How long a mismatch waits for the daemon to apply what was committed
/// when it was seen, before it counts as stale.
const CATCH_UP: Duration = Duration::from_secs(10);

/// What to check and how fast.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after checking this many keys.
    pub sample: Option<u64>,
    /// Keys per second at most (SCAN, GET and a query each).
    pub rate: u32,
    /// Delete the stale keys found.
    pub repair: bool,
    /// The daemon's position key in Redis (replication), to wait on.
    pub position_key: Option<String>,
}

/// Why a key is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// The value differs from the database.
    Differs,
    /// The row is gone (or the query answers NULL) but the key is cached.
    RowGone,
    /// The value is not JSON.
    NotJson,
}

/// One stale key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// The key.
    pub key: String,
    /// The rule's table.
    pub table: String,
    /// What is wrong.
    pub problem: Problem,
    /// Whether `--repair` deleted it.
    pub repaired: bool,
}

/// What `verify` found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Keys compared with the database.
    pub checked: u64,
    /// Keys whose value differs (or is not JSON).
    pub stale: u64,
    /// Keys whose row is gone.
    pub missing: u64,
    /// Keys not compared: a lease marker, a value that expired meanwhile,
    /// a key that is not UTF-8 or that the database cannot read as its
    /// columns' types.
    pub skipped: u64,
    /// Stale keys deleted by `--repair`.
    pub repaired: u64,
    /// The first [`LISTED`] stale keys.
    pub stale_keys: Vec<Finding>,
    /// Rules whose keys cannot be checked, and why.
    pub unchecked_rules: Vec<String>,
    /// The daemon did not catch up within 10 s once; later mismatches were
    /// reported without waiting for it (is it running?).
    pub daemon_behind: bool,
}

impl Report {
    /// Whether anything stale was found.
    pub fn clean(&self) -> bool {
        self.stale == 0 && self.missing == 0
    }
}

/// Why verifying stopped.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A template whose keys can be checked, and what they should hold.
struct Target<'a> {
    template: &'a KeyTemplate,
    rule: &'a Rule,
}

impl<'a> Target<'a> {
    /// What a key's value should be, and the key's values in the order the
    /// comparison takes them; `None` when the key lacks a needed column.
    fn expect(&self, values: &[(&'a str, String)]) -> Option<(Expected<'a>, Vec<String>)> {
        let value_of = |col: &str| {
            values
                .iter()
                .find(|(c, _)| *c == col)
                .map(|(_, v)| v.clone())
        };
        match &self.rule.query {
            Some(query) => {
                let params: Option<Vec<String>> =
                    query.params.iter().map(|p| value_of(p)).collect();
                Some((Expected::Query { sql: &query.sql }, params?))
            }
            None => Some((
                Expected::Row {
                    table: &self.rule.table,
                    filter: &self.rule.columns,
                    columns: values.iter().map(|(c, _)| *c).collect(),
                },
                values.iter().map(|(_, v)| v.clone()).collect(),
            )),
        }
    }
}

/// The templates whose keys can be checked; rules that cannot, with why.
fn targets(rules: &RuleSet) -> (Vec<Target<'_>>, Vec<String>) {
    let mut targets = Vec::new();
    let mut unchecked = Vec::new();
    for (table, table_rules) in rules.tables() {
        for rule in table_rules {
            for template in &rule.keys {
                match &rule.query {
                    Some(q) if !q.params.iter().all(|p| template.columns().any(|c| c == p)) => {
                        unchecked.push(format!(
                            "{table} key {template}: the query's params are not all in the key, so its value cannot be recomputed from the key"
                        ));
                    }
                    Some(_) => targets.push(Target { template, rule }),
                    None if rule.holds_row => targets.push(Target { template, rule }),
                    None => unchecked.push(format!(
                        "{table} key {template}: a delete rule; add holds = \"row\" if the app caches the row's JSON there"
                    )),
                }
            }
        }
    }
    (targets, unchecked)
}

/// The template (of any rule) that rendered `key`: the matching one with
/// the most literal text.
fn owner<'r>(rules: &'r RuleSet, key: &str) -> Option<&'r KeyTemplate> {
    rules
        .tables()
        .flat_map(|(_, r)| r.iter())
        .flat_map(|r| r.keys.iter())
        .filter(|t| t.match_key(key).is_some())
        .max_by_key(|t| t.literal_len())
}

/// Checks the cached keys of `rules`; `progress` is called now and then
/// with the report so far.
pub async fn verify<C: ConnectionLike + Send>(
    comparer: &mut Comparer<'_>,
    redis: &mut C,
    rules: &RuleSet,
    options: &Options,
    mut progress: impl FnMut(&Report),
) -> Result<Report, VerifyError> {
    let (targets, unchecked) = targets(rules);
    let mut report = Report {
        unchecked_rules: unchecked,
        ..Report::default()
    };
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut handled = 0u64;
    'targets: for target in &targets {
        let pattern = target.template.scan_pattern();
        let mut cursor = 0;
        loop {
            let (next, keys) =
                inspect::scan_step(redis, cursor, &pattern, inspect::SCAN_COUNT).await?;
            for raw in keys {
                if options.sample.is_some_and(|n| report.checked >= n) {
                    break 'targets;
                }
                let Ok(key) = String::from_utf8(raw) else {
                    report.skipped += 1;
                    continue;
                };
                if !owner(rules, &key).is_some_and(|t| std::ptr::eq(t, target.template)) {
                    continue;
                }
                handled += 1;
                pace(started, handled, options.rate).await;
                check_key(comparer, redis, target, &key, options, &mut report).await?;
                if last_progress.elapsed() >= Duration::from_secs(10) {
                    progress(&report);
                    last_progress = Instant::now();
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(report)
}

/// The freshness sampler's walk over the checkable keys (see
/// [`crate::freshness`]): one SCAN step at a time, template after
/// template, starting each template's scan again when it ends, so every
/// cached key comes round in turn whatever the keyspace's size.
pub struct Walk<'r> {
    rules: &'r RuleSet,
    targets: Vec<Target<'r>>,
    /// The template being scanned, and its cursor.
    at: usize,
    cursor: u64,
    /// Keys of the last SCAN step not checked yet: at most one step's
    /// worth ([`inspect::SCAN_COUNT`]).
    pending: std::collections::VecDeque<(usize, String)>,
}

/// SCAN steps one [`Walk::next`] takes at most before it says there is
/// nothing to check for now.
const WALK_STEPS: usize = 64;

impl<'r> Walk<'r> {
    /// A walk over the keys of `rules` that can be checked.
    pub fn new(rules: &'r RuleSet) -> Walk<'r> {
        Walk {
            rules,
            targets: targets(rules).0,
            at: 0,
            cursor: 0,
            pending: Default::default(),
        }
    }

    /// Whether no rule's keys can be checked.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The next cached key to check, with its template's index; `None`
    /// when [`WALK_STEPS`] SCAN steps found none (a cache that holds none
    /// now).
    pub async fn next<C: ConnectionLike + Send>(
        &mut self,
        redis: &mut C,
    ) -> Result<Option<(usize, String)>, redis::RedisError> {
        for _ in 0..WALK_STEPS {
            if let Some(next) = self.pending.pop_front() {
                return Ok(Some(next));
            }
            let Some(target) = self.targets.get(self.at) else {
                return Ok(None);
            };
            let pattern = target.template.scan_pattern();
            let (next, keys) =
                inspect::scan_step(redis, self.cursor, &pattern, inspect::SCAN_COUNT).await?;
            for raw in keys {
                let Ok(key) = String::from_utf8(raw) else {
                    continue;
                };
                if owner(self.rules, &key).is_some_and(|t| std::ptr::eq(t, target.template)) {
                    self.pending.push_back((self.at, key));
                }
            }
            self.cursor = next;
            if next == 0 {
                self.at = (self.at + 1) % self.targets.len();
            }
        }
        Ok(None)
    }

    /// Checks `key` of template `index` as `verify` does (waiting for the
    /// daemon before calling it stale); the report counts this key alone.
    pub async fn check<C: ConnectionLike + Send>(
        &self,
        comparer: &mut Comparer<'_>,
        redis: &mut C,
        index: usize,
        key: &str,
        options: &Options,
    ) -> Result<Report, VerifyError> {
        let mut report = Report::default();
        if let Some(target) = self.targets.get(index) {
            check_key(comparer, redis, target, key, options, &mut report).await?;
        }
        Ok(report)
    }

    /// The rule of template `index`, as metrics label it: the template.
    pub fn rule(&self, index: usize) -> String {
        self.targets
            .get(index)
            .map(|t| t.template.to_string())
            .unwrap_or_default()
    }
}

/// Sleeps so that `done` keys take at least `done / rate` seconds.
async fn pace(started: Instant, done: u64, rate: u32) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / f64::from(rate));
    let elapsed = started.elapsed();
    if due > elapsed {
        tokio::time::sleep(due - elapsed).await;
    }
}

async fn check_key<C: ConnectionLike + Send>(
    comparer: &mut Comparer<'_>,
    redis: &mut C,
    target: &Target<'_>,
    key: &str,
    options: &Options,
    report: &mut Report,
) -> Result<(), VerifyError> {
    let Some(values) = target.template.match_key(key) else {
        return Ok(());
    };
    let Some((expected, params)) = target.expect(&values) else {
        report.skipped += 1;
        return Ok(());
    };
    let mut waited = 0;
    loop {
        let Some(value) = inspect::get(redis, key).await? else {
            // Gone since the scan (expired, invalidated): nothing to check.
            if waited > 0 {
                report.checked += 1;
            } else {
                report.skipped += 1;
            }
            return Ok(());
        };
        if lease::is_marker(&value) {
            report.skipped += 1;
            return Ok(());
        }
        let problem = match std::str::from_utf8(&value)
            .ok()
            .filter(|t| serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok())
        {
            None => Some(Problem::NotJson),
            Some(text) => {
                let refs: Vec<&str> = params.iter().map(String::as_str).collect();
                match comparer.compare(&expected, text, &refs).await {
                    Ok(Compared::Same) => None,
                    Ok(Compared::Differs) => Some(Problem::Differs),
                    Ok(Compared::Gone) => Some(Problem::RowGone),
                    Ok(Compared::Ambiguous) => {
                        report.skipped += 1;
                        return Ok(());
                    }
                    // The key's text is not a value of its column's type
                    // (some other program's key): not ours to judge.
                    Err(DbError::Query { source, .. }) if source.as_db_error().is_some() => {
                        report.skipped += 1;
                        return Ok(());
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        let Some(problem) = problem else {
            report.checked += 1;
            return Ok(());
        };
        if waited < WAITS && !report.daemon_behind {
            // The daemon may simply not have applied a recent change yet:
            // wait until it applied everything committed by now, then look
            // again (a row that changed again meanwhile gets another look).
            report.daemon_behind = !wait_for_daemon(comparer, redis, options).await?;
            waited += 1;
            continue;
        }
        report.checked += 1;
        match problem {
            Problem::RowGone => report.missing += 1,
            Problem::Differs | Problem::NotJson => report.stale += 1,
        }
        let repaired = options.repair && inspect::unlink_if_same(redis, key, &value).await?;
        if repaired {
            report.repaired += 1;
        }
        if report.stale_keys.len() < LISTED {
            report.stale_keys.push(Finding {
                key: key.to_string(),
                table: target.rule.table.to_string(),
                problem,
                repaired,
            });
        }
        return Ok(());
    }
}

/// Waits (up to [`CATCH_UP`]) until the daemon's recorded position reaches
/// the WAL position now; without a position to read (the outbox), waits a
/// second. Whether the daemon caught up.
async fn wait_for_daemon<C: ConnectionLike + Send>(
    comparer: &Comparer<'_>,
    redis: &mut C,
    options: &Options,
) -> Result<bool, VerifyError> {
    let Some(position_key) = &options.position_key else {
        tokio::time::sleep(Duration::from_secs(1)).await;
        return Ok(true);
    };
    let Some(now) = comparer.wal_position().await? else {
        return Ok(true);
    };
    let deadline = Instant::now() + CATCH_UP;
    while Instant::now() < deadline {
        if crate::redis::position::read(redis, position_key)
            .await?
            .is_some_and(|a| a >= now)
        {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}
