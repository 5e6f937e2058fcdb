//! The in-process cache (L1) in front of Redis, kept true by Redis itself.
//!
//! Redis' client-side caching (`CLIENT TRACKING`) remembers every key one
//! of our connections read and pushes an invalidation when *anyone* changes
//! it — the daemon's delete, another app instance's fill, a `FLUSHALL` —
//! which the daemon's events alone cannot tell (they name only the
//! daemon's own deletes). Here the connection speaks RESP3, so the
//! invalidations, the daemon's events and the replies to our `GET`s all
//! arrive on that one connection, in the order Redis sent them.
//!
//! What keeps it true:
//! - L1 keeps only what a `GET` on the tracked connection returned, and
//!   only if no invalidation of that key arrived while the `GET` was in
//!   flight; a value this process loaded from the database is never kept
//!   (leases still govern fills into Redis);
//! - when the connection drops, an event's `seq` skips or goes back, its
//!   `epoch` changes or Redis is flushed, L1 is emptied before it answers
//!   again, and while the connection is down it answers nothing;
//! - a read with a write token is answered from L1 only once the position
//!   the daemon records in Redis, read *on the tracked connection* (so
//!   after every invalidation Redis queued before it), passed the token and
//!   every push before that reply was handled here.
//!
//! Bounds: [`L1Options::max_entries`], [`L1Options::max_bytes`] (a key and
//! its value counted in bytes, plus [`ENTRY_OVERHEAD`] each), and
//! [`L1Options::ttl`] per entry; least recently used first out.
//!
//! Invalidations are handled where the connection reads them, before the
//! reply behind them is delivered: a hop through a task would leave L1
//! answering with a deleted value until a busy runtime scheduled that task
//! (reads a Redis-only app would not get wrong). The other pushes (events,
//! the disconnection, our barriers) wait in an unbounded channel for the
//! task that handles them; that task does nothing else, so the channel
//! holds at most what arrives while one push is handled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use pgci_protocol::events::{Observed, Sequence};
use pgci_protocol::lsn::Lsn;
use pgci_protocol::{lease, position};

use crate::{ClientError, WriteToken};

/// Bytes counted for each entry on top of its key and value.
pub const ENTRY_OVERHEAD: usize = 64;

/// The kind of the marker this module sends itself through the push
/// channel: when the task handles it, every push before it was handled.
const BARRIER: &str = "pgci-l1-barrier";

/// The in-process cache's settings.
#[derive(Debug, Clone)]
pub struct L1Options {
    /// At most this many entries.
    pub max_entries: usize,
    /// At most this many bytes (keys and values, plus [`ENTRY_OVERHEAD`] each).
    pub max_bytes: usize,
    /// An entry is read from Redis again after this long.
    pub ttl: Duration,
    /// The daemon's events channel (`[redis] channel`).
    pub channel: String,
    /// The daemon publishes with `SPUBLISH` (`[redis] sharded_events`).
    pub sharded: bool,
    /// The daemon's slot (names the position key).
    pub slot: String,
}

impl Default for L1Options {
    fn default() -> Self {
        L1Options {
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            ttl: Duration::from_secs(60),
            channel: "cache-invalidation".into(),
            sharded: false,
            slot: "pg_cache_invalidator".into(),
        }
    }
}

/// How often L1 was emptied, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L1Drops {
    /// Its connection dropped.
    pub disconnect: u64,
    /// An event's `seq` skipped or went back.
    pub gap: u64,
    /// The daemon flushed keys by pattern (a new epoch).
    pub epoch: u64,
    /// Redis was flushed (`FLUSHALL`, `FLUSHDB`).
    pub flush: u64,
}

/// What L1 holds and has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L1Stats {
    /// Entries held now.
    pub entries: usize,
    /// Their bytes.
    pub bytes: usize,
    /// Lookups it answered.
    pub hits: u64,
    /// Values it kept from Redis.
    pub fills: u64,
    /// Values read from Redis and not kept (an invalidation raced the read,
    /// or the connection was down).
    pub not_kept: u64,
    /// Whether it answers now (connected, tracking on, subscribed).
    pub tracking: bool,
    /// How often it was emptied, by cause.
    pub drops: L1Drops,
}

/// An in-process cache shared by every [`crate::Cache`] of the process
/// (clone it: the clones share one cache and one connection).
#[derive(Clone)]
pub struct L1 {
    shared: Arc<Shared>,
    _task: Arc<Task>,
}

/// Stops the background task when the last clone of [`L1`] goes.
struct Task(tokio::task::AbortHandle);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Shared {
    state: Mutex<State>,
    /// The tracked connection and the sender of its push channel.
    link: Mutex<Option<Link>>,
    options: L1Options,
    position_key: String,
    refreshing: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
struct Link {
    conn: MultiplexedConnection,
    pushes: UnboundedSender<PushInfo>,
}

struct State {
    entries: LruCache<String, Entry>,
    bytes: usize,
    /// Keys with a GET in flight, and whether an invalidation spoiled them.
    inflight: HashMap<String, Inflight>,
    /// Bumped whenever what L1 holds stops being trustworthy.
    generation: u64,
    tracking: bool,
    /// The daemon's position seen passed, with its invalidations handled.
    applied: Option<Lsn>,
    sequence: Sequence,
    stats: L1Stats,
}

struct Entry {
    raw: String,
    bytes: usize,
    expires: Instant,
}

#[derive(Default)]
struct Inflight {
    reads: usize,
    spoiled: bool,
}

impl L1 {
    /// Connects (RESP3, `CLIENT TRACKING ON`, subscribed to the events
    /// channel) and starts the task that handles its pushes and reconnects
    /// it. Needs one Redis server of version 6 or later (not a cluster) and
    /// a tokio runtime.
    pub async fn connect(client: &redis::Client, options: L1Options) -> Result<L1, ClientError> {
        if options.max_entries == 0 || options.max_bytes == 0 || options.ttl.is_zero() {
            return Err(ClientError::Config(
                "l1: max_entries, max_bytes and ttl must be above zero".into(),
            ));
        }
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                entries: LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
                generation: 0,
                tracking: false,
                applied: None,
                sequence: Sequence::default(),
                stats: L1Stats::default(),
            }),
            link: Mutex::new(None),
            position_key: position::key(&options.slot),
            options,
            refreshing: std::sync::atomic::AtomicBool::new(false),
        });
        // The first connection here, so that what cannot work says so now.
        let first = open(&shared, &client).await?;
        let task = tokio::spawn(run(shared.clone(), client, first));
        Ok(L1 {
            shared,
            _task: Arc::new(Task(task.abort_handle())),
        })
    }

    /// What L1 holds and has done.
    pub fn stats(&self) -> L1Stats {
        let state = self.shared.lock();
        L1Stats {
            entries: state.entries.len(),
            bytes: state.bytes,
            tracking: state.tracking,
            ..state.stats
        }
    }

    /// The value of `key` if L1 may answer a read given `after`.
    pub(crate) fn lookup(&self, key: &str, after: Option<WriteToken>) -> Option<String> {
        let mut state = self.shared.lock();
        if !state.tracking {
            return None;
        }
        if let Some(token) = after {
            if state.applied.is_none_or(|applied| applied < token.0) {
                return None;
            }
        }
        let entry = state.entries.get(key)?;
        if entry.expires <= Instant::now() {
            state.remove(key);
            return None;
        }
        let raw = entry.raw.clone();
        state.stats.hits += 1;
        Some(raw)
    }

    /// `GET key` on the tracked connection, keeping a value nothing changed
    /// meanwhile; `None` when L1 has no connection now (read elsewhere).
    pub(crate) async fn read(&self, key: &str) -> Option<Option<Vec<u8>>> {
        let mut link = self.shared.link()?;
        let (generation, trusted) = {
            let mut state = self.shared.lock();
            state.inflight.entry(key.to_string()).or_default().reads += 1;
            (state.generation, state.tracking)
        };
        let got: Result<Option<Vec<u8>>, _> =
            redis::cmd("GET").arg(key).query_async(&mut link.conn).await;
        let mut state = self.shared.lock();
        let spoiled = match state.inflight.get_mut(key) {
            Some(mark) => {
                mark.reads -= 1;
                let spoiled = mark.spoiled;
                if mark.reads == 0 {
                    state.inflight.remove(key);
                }
                spoiled
            }
            None => true,
        };
        let value = got.ok()?;
        if let Some(bytes) = value.as_deref().filter(|v| !lease::is_marker(v)) {
            let keep = trusted && state.tracking && generation == state.generation && !spoiled;
            match (keep, std::str::from_utf8(bytes)) {
                (true, Ok(text)) => {
                    let (max_entries, max_bytes, ttl) = (
                        self.shared.options.max_entries,
                        self.shared.options.max_bytes,
                        self.shared.options.ttl,
                    );
                    state.store(key, text, max_entries, max_bytes, ttl);
                }
                _ => state.stats.not_kept += 1,
            }
        }
        Some(value)
    }

    /// The daemon was seen past some position elsewhere: learn it here too
    /// (on the tracked connection, behind its invalidations).
    pub(crate) fn refresh_position(&self) {
        refresh_position(&self.shared);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn link(&self) -> Option<Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_link(&self, link: Option<Link>) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = link;
    }
}

impl State {
    fn drop_all(&mut self, why: fn(&mut L1Drops) -> &mut u64) {
        self.generation += 1;
        *why(&mut self.stats.drops) += 1;
        self.entries.clear();
        self.bytes = 0;
        for mark in self.inflight.values_mut() {
            mark.spoiled = true;
        }
    }

    fn invalidate(&mut self, key: &str) {
        if let Some(mark) = self.inflight.get_mut(key) {
            mark.spoiled = true;
        }
        self.remove(key);
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.pop(key) {
            self.bytes -= entry.bytes;
        }
    }

    fn store(&mut self, key: &str, raw: &str, max_entries: usize, max_bytes: usize, ttl: Duration) {
        let bytes = key.len() + raw.len() + ENTRY_OVERHEAD;
        if bytes > max_bytes {
            self.stats.not_kept += 1;
            return;
        }
        self.remove(key);
        let entry = Entry {
            raw: raw.to_string(),
            bytes,
            expires: Instant::now() + ttl,
        };
        self.entries.put(key.to_string(), entry);
        self.bytes += bytes;
        self.stats.fills += 1;
        while self.entries.len() > max_entries || self.bytes > max_bytes {
            match self.entries.pop_lru() {
                Some((_, old)) => self.bytes -= old.bytes,
                None => break,
            }
        }
    }
}

/// One tracked, subscribed connection with its own push channel.
async fn open(
    shared: &Arc<Shared>,
    client: &redis::Client,
) -> Result<UnboundedReceiver<PushInfo>, ClientError> {
    let (pushes, received) = unbounded_channel();
    // Weak: the connection's driver must not keep L1 alive.
    let (weak, others) = (Arc::downgrade(shared), pushes.clone());
    let sender = move |push: PushInfo| {
        if push.kind == PushKind::Invalidate {
            if let Some(shared) = weak.upgrade() {
                invalidated(&shared, &push);
            }
            return Ok(());
        }
        others.send(push)
    };
    let config = AsyncConnectionConfig::new().set_push_sender(sender);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| {
            ClientError::Config(format!(
                "l1: CLIENT TRACKING failed ({e}): L1 needs Redis 6 or later (or Valkey), one server, and a user allowed CLIENT TRACKING and SUBSCRIBE"
            ))
        })?;
    let channel = &shared.options.channel;
    if shared.options.sharded {
        redis::cmd("SSUBSCRIBE")
            .arg(channel)
            .exec_async(&mut conn)
            .await?;
    } else {
        conn.subscribe(channel).await?;
    }
    {
        let mut state = shared.lock();
        state.sequence.reset();
        state.generation += 1;
        state.tracking = true;
    }
    shared.set_link(Some(Link { conn, pushes }));
    Ok(received)
}

/// Handles the pushes of each connection in turn, reconnecting when one
/// drops.
async fn run(shared: Arc<Shared>, client: redis::Client, first: UnboundedReceiver<PushInfo>) {
    let mut received = Some(first);
    let mut pause = Duration::from_millis(50);
    loop {
        let Some(mut pushes) = received.take() else {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
            received = open(&shared, &client).await.ok();
            continue;
        };
        pause = Duration::from_millis(50);
        while let Some(push) = pushes.recv().await {
            if push.kind == PushKind::Disconnection {
                break;
            }
            handle(&shared, push);
        }
        // The connection is gone, and with it what it would have carried.
        shared.set_link(None);
        let mut state = shared.lock();
        state.tracking = false;
        state.drop_all(|d| &mut d.disconnect);
    }
}

/// Tracking's invalidation: the keys named, or everything.
fn invalidated(shared: &Shared, push: &PushInfo) {
    let mut state = shared.lock();
    match push.data.first() {
        Some(Value::Array(keys)) => {
            for key in keys {
                if let Some(key) = text(key) {
                    state.invalidate(&key);
                }
            }
        }
        // A nil list: the whole database was flushed.
        _ => state.drop_all(|d| &mut d.flush),
    }
}

fn handle(shared: &Arc<Shared>, push: PushInfo) {
    match push.kind {
        PushKind::Invalidate => invalidated(shared, &push),
        PushKind::Message | PushKind::SMessage => {
            let Some(payload) = push.data.get(1).and_then(text) else {
                return;
            };
            let event: serde_json::Value = match serde_json::from_str(&payload) {
                Ok(event) => event,
                Err(_) => return,
            };
            if let (Some(seq), Some(epoch)) = (event["seq"].as_u64(), event["epoch"].as_str()) {
                let mut state = shared.lock();
                let observed = state.sequence.observe(epoch, seq);
                if observed.must_drop() {
                    if matches!(observed, Observed::NewEpoch) {
                        state.drop_all(|d| &mut d.epoch);
                    } else {
                        state.drop_all(|d| &mut d.gap);
                    }
                }
            }
            refresh_position(shared);
        }
        PushKind::Other(kind) if kind == BARRIER => {
            if let [Value::Int(generation), position] = push.data.as_slice() {
                let lsn = text(position).and_then(|t| t.parse::<Lsn>().ok());
                let mut state = shared.lock();
                if let Some(lsn) = lsn.filter(|_| *generation as u64 == state.generation) {
                    if state.applied.is_none_or(|applied| applied < lsn) {
                        state.applied = Some(lsn);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Reads the daemon's position on the tracked connection, then sends a
/// barrier through its push channel: when the task handles it, every
/// invalidation Redis queued before that reply has been handled. One at a
/// time; an event during one asks for another.
fn refresh_position(shared: &Arc<Shared>) {
    use std::sync::atomic::Ordering;
    if shared.refreshing.swap(true, Ordering::AcqRel) {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Some(mut link) = shared.link() {
            let generation = shared.lock().generation;
            let read: Result<Option<String>, _> = redis::cmd("GET")
                .arg(&shared.position_key)
                .query_async(&mut link.conn)
                .await;
            if let Ok(Some(position)) = read {
                let barrier = PushInfo {
                    kind: PushKind::Other(BARRIER.into()),
                    data: vec![
                        Value::Int(generation as i64),
                        Value::BulkString(position.into_bytes()),
                    ],
                };
                let _ = link.pushes.send(barrier);
            }
        }
        shared.refreshing.store(false, Ordering::Release);
    });
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            entries: LruCache::unbounded(),
            bytes: 0,
            inflight: HashMap::new(),
            generation: 0,
            tracking: true,
            applied: None,
            sequence: Sequence::default(),
            stats: L1Stats::default(),
        }
    }

    /// The bounds hold in entries and in bytes, least recently used first out.
    #[test]
    fn entries_and_bytes_are_bounded() {
        let mut s = state();
        let ttl = Duration::from_secs(60);
        for i in 0..5 {
            s.store(&format!("k{i}"), "0123456789", 3, 10_000, ttl);
        }
        assert_eq!(s.entries.len(), 3);
        assert!(s.entries.contains("k4") && !s.entries.contains("k1"));
        let per = 2 + 10 + ENTRY_OVERHEAD;
        assert_eq!(s.bytes, 3 * per);
        let mut s = state();
        for i in 0..5 {
            s.store(&format!("k{i}"), "0123456789", 100, 2 * per, ttl);
        }
        assert_eq!((s.entries.len(), s.bytes), (2, 2 * per));
        s.store("big", &"x".repeat(1000), 100, 2 * per, ttl);
        assert!(
            !s.entries.contains("big"),
            "a value over the whole bound is not kept"
        );
        s.invalidate("k4");
        assert_eq!((s.entries.len(), s.bytes), (1, per));
        s.drop_all(|d| &mut d.gap);
        assert_eq!((s.entries.len(), s.bytes, s.stats.drops.gap), (0, 0, 1));
    }
}
