//! The app side of the cache, in Rust: cache-aside reads that stay true
//! while the daemon invalidates (the TypeScript package does the same for
//! the Next.js app; both follow the contract in [`pgci_protocol::lease`]).
//!
//! Two races make a naive cache-aside reader return old data even though
//! every change is invalidated:
//!
//! 1. *Fill after invalidation*: a reader reads a row, the row changes and
//!    the daemon deletes the key, then the reader stores its old copy,
//!    which stays until its TTL. [`Cache::get_or_load`] fills through a
//!    lease the daemon's delete voids ([`pgci_protocol::lease`]).
//! 2. *Read your own write*: the daemon's delete lands a moment after the
//!    writer's commit returns, so the writer's next read may still hit the
//!    old entry. The writer takes a [`WriteToken`] after its commit
//!    ([`write_token`]); a read given it compares the token with the
//!    position the daemon records in Redis with every batch
//!    (`pgci:position:<slot>`) and, while the daemon is behind, does not
//!    trust the cache: it loads from the database without filling
//!    ([`AfterPolicy::Bypass`], the default), or waits a bounded time for
//!    the daemon first ([`AfterPolicy::Wait`]).

/// The order of the daemon's invalidation events, for subscribers that
/// keep copies of their own (see [`pgci_protocol::events`]).
pub use pgci_protocol::events;

pub mod l1;
pub use l1::{L1Options, L1Stats, L1};

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::RedisError;

use pgci_protocol::lease::{self, Got};
use pgci_protocol::lsn::Lsn;
use pgci_protocol::{functions, position};

/// A position after a write: the reader's cache must not be older.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WriteToken(pub Lsn);

impl std::fmt::Display for WriteToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for WriteToken {
    type Err = pgci_protocol::lsn::ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(WriteToken)
    }
}

/// Takes a token after a commit, on the session that committed (or any
/// later one): the WAL insert position now is at or past that commit.
/// (Feature `tokio-postgres`; with another driver, parse the text of
/// `select pg_current_wal_insert_lsn()::text` into a [`WriteToken`].)
#[cfg(feature = "tokio-postgres")]
pub async fn write_token(pg: &tokio_postgres::Client) -> Result<WriteToken, ClientError> {
    let text: String = pg
        .query_one("select pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| ClientError::Postgres(e.to_string()))?
        .get(0);
    text.parse()
        .map_err(|_| ClientError::Postgres(format!("unexpected LSN {text:?}")))
}

/// What a read given a token does while the daemon has not applied it yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterPolicy {
    /// Load from the database and do not fill (one database read, no wait).
    Bypass,
    /// Wait up to this long for the daemon, then bypass.
    Wait(Duration),
}

/// Tunables; [`CacheOptions::default`] suits an app server.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The daemon's slot (names the position key).
    pub slot: String,
    /// How long a lease lasts: longer than a slow load, short enough that a
    /// crashed reader's lease does not block a key for long.
    pub lease: Duration,
    /// How long a reader waits for another reader's fill before loading
    /// itself (without filling).
    pub lease_wait: Duration,
    /// Token reads while the daemon is behind.
    pub after: AfterPolicy,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            slot: "pg_cache_invalidator".into(),
            lease: Duration::from_secs(10),
            lease_wait: Duration::from_millis(500),
            after: AfterPolicy::Bypass,
        }
    }
}

/// Why a cache call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Redis refused or failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// A reply the protocol does not allow (another program owns the key?).
    #[error("unexpected reply from {function} for key {key:?}")]
    Protocol {
        /// The function called.
        function: &'static str,
        /// The key.
        key: String,
    },
    /// The token query failed.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The loader failed.
    #[error("loader: {0}")]
    Loader(Box<dyn std::error::Error + Send + Sync>),
    /// A setting or the server cannot work (the message says what to do).
    #[error("{0}")]
    Config(String),
}

/// Where a value came from, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The cache.
    Hit,
    /// The in-process cache ([`L1`]).
    L1,
    /// The loader, and the key was filled.
    Filled,
    /// The loader; the fill was refused (an invalidation voided the lease).
    Refused,
    /// The loader, on purpose without filling (token ahead of the daemon,
    /// or another reader's lease did not resolve in time).
    Bypassed,
}

/// Cache-aside reads and writes on one Redis connection.
pub struct Cache<C> {
    conn: C,
    options: CacheOptions,
    position_key: String,
    /// Whether `FCALL` works here; `None` until first tried.
    functions: Option<bool>,
    stats: Stats,
    l1: Option<L1>,
}

/// Counts of one key prefix (see [`Cache::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Lookups answered by the cache.
    pub hits: u64,
    /// Lookups that went to the loader (filled, refused or bypassed).
    pub misses: u64,
    /// Lookups that waited for another reader's lease.
    pub lease_waits: u64,
    /// Lookups that filled the key.
    pub fills: u64,
}

/// The prefix a key is counted under: its `:`-separated segments up to the
/// first that holds a digit (an id), so `balance:user:<uuid>:token:<id>`
/// counts as `balance:user`; a key with no such segment counts without its
/// last segment (`config:site:theme` as `config:site`).
pub fn key_prefix(key: &str) -> &str {
    let mut end = 0;
    for (i, segment) in key.split(':').enumerate() {
        if segment.bytes().any(|b| b.is_ascii_digit()) {
            return if i == 0 { key } else { &key[..end - 1] };
        }
        end += segment.len() + 1;
    }
    match key.rfind(':') {
        Some(cut) => &key[..cut],
        None => key,
    }
}

#[derive(Default)]
struct Stats(std::sync::Mutex<std::collections::BTreeMap<String, PrefixStats>>);

impl Stats {
    fn record(&self, key: &str, source: Source, waited: bool) {
        // One owned prefix per lookup, shared by the labels and the map.
        let prefix = key_prefix(key).to_string();
        let hit = matches!(source, Source::Hit | Source::L1);
        let filled = source == Source::Filled;
        let outcome = if hit { "hit" } else { "miss" };
        metrics::counter!("pgci_client_lookups_total", "prefix" => prefix.clone(), "outcome" => outcome)
            .increment(1);
        if waited {
            metrics::counter!("pgci_client_lease_waits_total", "prefix" => prefix.clone())
                .increment(1);
        }
        if filled {
            metrics::counter!("pgci_client_fills_total", "prefix" => prefix.clone()).increment(1);
        }
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let counts = map.entry(prefix).or_default();
        counts.hits += u64::from(hit);
        counts.misses += u64::from(!hit);
        counts.lease_waits += u64::from(waited);
        counts.fills += u64::from(filled);
    }

    fn snapshot(&self) -> std::collections::BTreeMap<String, PrefixStats> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A cached value as text, without a copy when it is UTF-8 (JSON is).
fn into_text(value: Vec<u8>) -> String {
    String::from_utf8(value).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

static TOKENS: AtomicU64 = AtomicU64::new(0);

/// A lease token unique across this process and, with the process id and
/// start time, across processes.
fn new_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}.{:x}.{:x}",
        std::process::id(),
        nanos,
        TOKENS.fetch_add(1, Ordering::Relaxed)
    )
}

impl<C: ConnectionLike + Send> Cache<C> {
    /// A cache on `conn` (a `ConnectionManager` or multiplexed connection).
    pub fn new(conn: C, options: CacheOptions) -> Self {
        let position_key = position::key(&options.slot);
        Cache {
            conn,
            options,
            position_key,
            functions: None,
            stats: Stats::default(),
            l1: None,
        }
    }

    /// Answers repeated reads from `l1` (shared by the process's caches)
    /// before Redis; see [`l1`] for what keeps it true.
    pub fn with_l1(mut self, l1: L1) -> Self {
        self.l1 = Some(l1);
        self
    }

    /// The value of `key`, loading and filling it on a miss. With `after`,
    /// never a value older than that write (see [`AfterPolicy`]). `loader`
    /// returns the JSON to cache, or `None` for "no such row" (not cached).
    pub async fn get_or_load<F, Fut, E>(
        &mut self,
        key: &str,
        ttl_secs: u64,
        loader: F,
        after: Option<WriteToken>,
    ) -> Result<(Option<String>, Source), ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<String>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut waited = false;
        let result = self.lookup(key, ttl_secs, loader, after, &mut waited).await;
        if let Ok((_, source)) = &result {
            self.stats.record(key, *source, waited);
        }
        result
    }

    /// Lookups, lease waits and fills so far, per key prefix
    /// ([`key_prefix`]); each is also counted in the `metrics` facade as
    /// `pgci_client_lookups_total{prefix,outcome}` (`outcome`: hit or miss),
    /// `pgci_client_lease_waits_total{prefix}` and
    /// `pgci_client_fills_total{prefix}`.
    pub fn stats(&self) -> std::collections::BTreeMap<String, PrefixStats> {
        self.stats.snapshot()
    }

    async fn lookup<F, Fut, E>(
        &mut self,
        key: &str,
        ttl_secs: u64,
        loader: F,
        after: Option<WriteToken>,
        waited: &mut bool,
    ) -> Result<(Option<String>, Source), ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<String>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(value) = self.l1.as_ref().and_then(|l1| l1.lookup(key, after)) {
            return Ok((Some(value), Source::L1));
        }
        if let Some(token) = after {
            if !self.caught_up(token).await? {
                let value = loader().await.map_err(|e| ClientError::Loader(e.into()))?;
                return Ok((value, Source::Bypassed));
            }
        }
        // A hit costs one GET: a cached value is never a lease marker, so
        // the lease function is called only on a miss or a marker.
        let through_l1 = match &self.l1 {
            Some(l1) => l1.read(key).await,
            None => None,
        };
        let cached = match through_l1 {
            Some(raw) => raw.filter(|v| !lease::is_marker(v)).map(into_text),
            None => self.get_cached_data(key).await?,
        };
        if let Some(value) = cached {
            return Ok((Some(value), Source::Hit));
        }
        let token = new_token();
        let deadline = Instant::now() + self.options.lease_wait;
        let lease_ms = self.options.lease.as_millis().to_string();
        loop {
            let reply: Vec<String> = self.call(lease::GET, key, &[&token, &lease_ms]).await?;
            match Got::parse(&reply).ok_or_else(|| ClientError::Protocol {
                function: lease::GET,
                key: key.to_string(),
            })? {
                Got::Hit(value) => return Ok((Some(value), Source::Hit)),
                Got::Lease => break,
                Got::Wait(left_ms) => {
                    *waited = true;
                    let now = Instant::now();
                    if now >= deadline {
                        let value = loader().await.map_err(|e| ClientError::Loader(e.into()))?;
                        return Ok((value, Source::Bypassed));
                    }
                    let step = Duration::from_millis(left_ms.clamp(1, 5));
                    tokio::time::sleep(step.min(deadline - now)).await;
                }
            }
        }
        let loaded = match loader().await {
            Ok(value) => value,
            Err(error) => {
                let _ = self.release(key, &token).await;
                return Err(ClientError::Loader(error.into()));
            }
        };
        let Some(value) = loaded else {
            self.release(key, &token).await?;
            return Ok((None, Source::Bypassed));
        };
        let stored: i64 = self
            .call(lease::FILL, key, &[&token, &value, &ttl_secs.to_string()])
            .await?;
        let source = if stored == 1 {
            Source::Filled
        } else {
            Source::Refused
        };
        Ok((Some(value), source))
    }

    /// The cached value of `key`; a lease marker reads as a miss.
    pub async fn get_cached_data(&mut self, key: &str) -> Result<Option<String>, ClientError> {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn)
            .await?;
        Ok(value.filter(|v| !lease::is_marker(v)).map(into_text))
    }

    /// Stores `value` without a lease (the plan's plain `SET … EX`): use it
    /// for values computed from a write the caller just made, never for
    /// values read before.
    pub async fn set_cached_data(
        &mut self,
        key: &str,
        value: &str,
        ttl_secs: u64,
    ) -> Result<(), ClientError> {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("EX")
            .arg(ttl_secs)
            .query_async::<()>(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Deletes `key` (and any lease on it).
    pub async fn invalidate_cache(&mut self, key: &str) -> Result<(), ClientError> {
        redis::cmd("DEL")
            .arg(key)
            .query_async::<()>(&mut self.conn)
            .await?;
        Ok(())
    }

    /// The position the daemon has applied, as recorded in Redis.
    pub async fn applied(&mut self) -> Result<Option<Lsn>, ClientError> {
        Ok(position::read(&mut self.conn, &self.position_key).await?)
    }

    /// Whether the daemon has applied `token`, waiting per the policy.
    async fn caught_up(&mut self, token: WriteToken) -> Result<bool, ClientError> {
        let deadline = match self.options.after {
            AfterPolicy::Bypass => None,
            AfterPolicy::Wait(bound) => Some(Instant::now() + bound),
        };
        loop {
            if self.applied().await?.is_some_and(|at| at >= token.0) {
                // Lets later reads with this token answer from L1.
                if let Some(l1) = &self.l1 {
                    l1.refresh_position();
                }
                return Ok(true);
            }
            match deadline {
                Some(d) if Instant::now() < d => tokio::time::sleep(Duration::from_millis(1)).await,
                _ => return Ok(false),
            }
        }
    }

    async fn release(&mut self, key: &str, token: &str) -> Result<(), ClientError> {
        let _: i64 = self.call(lease::RELEASE, key, &[token]).await?;
        Ok(())
    }

    /// Calls a lease function: `FCALL` where Redis has the library, else
    /// the same body by SHA (`EVALSHA`, sending it once when missing).
    async fn call<T: redis::FromRedisValue>(
        &mut self,
        function: &'static str,
        key: &str,
        args: &[&str],
    ) -> Result<T, ClientError> {
        if self.functions != Some(false) {
            let result = redis::cmd("FCALL")
                .arg(function)
                .arg(1)
                .arg(key)
                .arg(args)
                .query_async::<T>(&mut self.conn)
                .await;
            match result {
                Ok(value) => {
                    self.functions = Some(true);
                    return Ok(value);
                }
                Err(error) if functions::is_missing_function(&error) => {
                    // Redis restarted without persistence, or nobody loaded
                    // the library yet: load it and call again.
                    match functions::load(&mut self.conn).await? {
                        functions::Loaded::Functions | functions::Loaded::Current => {
                            return Ok(redis::cmd("FCALL")
                                .arg(function)
                                .arg(1)
                                .arg(key)
                                .arg(args)
                                .query_async::<T>(&mut self.conn)
                                .await?);
                        }
                        functions::Loaded::Scripts => self.functions = Some(false),
                    }
                }
                Err(error) if functions::is_unknown_command(&error) => self.functions = Some(false),
                Err(error) => return Err(error.into()),
            }
        }
        let body = lease::script(function).ok_or(ClientError::Protocol {
            function,
            key: key.to_string(),
        })?;
        let script = redis::Script::new(body);
        let mut invocation = script.key(key);
        for arg in args {
            invocation.arg(*arg);
        }
        Ok(invocation.invoke_async(&mut self.conn).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_count_under_their_prefix_without_ids() {
        assert_eq!(key_prefix("profile:user:3f2a-11"), "profile:user");
        assert_eq!(
            key_prefix("balance:user:0b7e4c1a-9d1f-4a3e-8c2b-5e6f7a8b9c0d:token:t1"),
            "balance:user"
        );
        assert_eq!(key_prefix("config:site:theme"), "config:site");
        assert_eq!(key_prefix("user42"), "user42");
        assert_eq!(key_prefix("plain"), "plain");
    }

    /// Tokens never repeat within a process.
    #[test]
    fn tokens_are_unique() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
    }

    /// A write token is an LSN and orders like one.
    #[test]
    fn write_tokens_order_like_lsns() {
        let a: WriteToken = "0/16B3748".parse().expect("lsn");
        let b: WriteToken = "1/0".parse().expect("lsn");
        assert!(a < b);
        assert_eq!(a.to_string(), "0/16B3748");
        assert!("nope".parse::<WriteToken>().is_err());
    }
}
