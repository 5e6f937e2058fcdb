//! An app server's in-process copies kept true by the daemon's events
//! alone: the check that no invalidation is lost without the subscriber
//! knowing (`seq`, `epoch`, a dropped connection; see
//! `pgci_protocol::events`).
//!
//! A listener applies each event (drops the keys it names; drops every
//! copy on a gap, a rewind, a new epoch, a flush or an event that left
//! keys out, and whenever its connection drops) and fillers copy pages
//! from Redis while it listens. At a quiescent point, once the listener
//! has seen the last event the daemon numbered, a copy older than its
//! rows is an event lost undetected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pgci_client::events::{Observed, Sequence};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use pgci_app_sim::workload::{self, PAGES};

use crate::redis_target::{RedisConn, RedisTarget};

const CHANNEL: &str = "cache-invalidation";

/// The copies and what the listener saw.
#[derive(Default)]
pub struct Copies {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Key → the page version copied.
    held: HashMap<String, i64>,
    /// Events naming each key so far (a fill that raced one is not kept).
    named: HashMap<String, u64>,
    /// Bumped whenever every copy was dropped or the subscription is
    /// down; a fill across it is not kept.
    generation: u64,
    subscribed: bool,
    order: Sequence,
    /// The last `seq` applied.
    last_seq: u64,
    counts: Counts,
}

/// What the listener counted.
#[derive(Default, Clone, Copy, Debug)]
pub struct Counts {
    pub events: u64,
    pub gaps: u64,
    pub rewinds: u64,
    pub epochs: u64,
    pub disconnects: u64,
    pub copies_filled: u64,
}

impl State {
    fn drop_all(&mut self) {
        self.held.clear();
        self.generation += 1;
    }
}

impl Copies {
    /// What the listener counted so far.
    pub fn counts(&self) -> Counts {
        self.lock().counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (at most `limit`) until the listener applied the event
    /// numbered `seq`, or dropped everything since asked; whether it did.
    pub async fn caught_up(&self, seq: u64, limit: Duration) -> bool {
        let generation = self.lock().generation;
        let until = Instant::now() + limit;
        while Instant::now() < until {
            {
                let state = self.lock();
                if state.last_seq >= seq || state.generation != generation {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// The copies older than `newest` (key → its rows' version).
    pub fn stale(&self, newest: &HashMap<String, i64>) -> Vec<String> {
        self.lock()
            .held
            .iter()
            .filter(|(key, v)| newest.get(*key).is_some_and(|n| *v < n))
            .map(|(key, v)| format!("{key} copied v{v}, rows at v{}", newest[key]))
            .collect()
    }
}

/// Applies the channel's events to `copies` until `stop`, subscribing
/// again after each disconnect.
pub async fn listen(copies: Arc<Copies>, redis_url: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let subscribed = async {
            let client = redis::Client::open(redis_url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        let Ok(pubsub) = subscribed else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        {
            let mut state = copies.lock();
            state.drop_all();
            state.order.reset();
            // The record may have gone back (Redis from a snapshot): what
            // was applied before says nothing about the numbers to come.
            state.last_seq = 0;
            state.subscribed = true;
        }
        let mut messages = pubsub.into_on_message();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
            let message = match next {
                Err(_) if stop.load(Ordering::Relaxed) => return,
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(message)) => message,
            };
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&payload) else {
                continue;
            };
            apply(&mut copies.lock(), &event);
        }
        let mut state = copies.lock();
        state.subscribed = false;
        state.drop_all();
        state.counts.disconnects += 1;
    }
}

fn apply(state: &mut State, event: &serde_json::Value) {
    state.counts.events += 1;
    let (Some(epoch), Some(seq)) = (event["epoch"].as_str(), event["seq"].as_u64()) else {
        state.drop_all();
        return;
    };
    let observed = state.order.observe(epoch, seq);
    state.last_seq = seq;
    match observed {
        Observed::Gap { .. } => state.counts.gaps += 1,
        Observed::Rewound => state.counts.rewinds += 1,
        Observed::NewEpoch => state.counts.epochs += 1,
        Observed::First | Observed::Next => {}
    }
    let flushed = event["patterns"].as_array().is_some_and(|p| !p.is_empty())
        || event["keys_omitted"].as_u64().unwrap_or(0) > 0;
    if observed.must_drop() || flushed {
        state.drop_all();
    }
    for key in event["keys"].as_array().into_iter().flatten() {
        if let Some(key) = key.as_str() {
            state.held.remove(key);
            *state.named.entry(key.to_string()).or_default() += 1;
        }
    }
}

/// Copies random pages from Redis into `copies` until `stop`.
pub async fn fill(
    copies: Arc<Copies>,
    target: RedisTarget,
    ids: Vec<String>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut redis: Option<RedisConn> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let conn = match redis.as_mut() {
            Some(conn) => conn,
            None => match target.try_connect(Duration::from_secs(5)).await {
                Some(conn) => redis.insert(conn),
                None => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let id = &ids[rng.random_range(0..ids.len())];
        let key = PAGES[rng.random_range(0..PAGES.len())].key(id);
        let before = {
            let state = copies.lock();
            if !state.subscribed {
                continue;
            }
            (
                state.generation,
                state.named.get(&key).copied().unwrap_or(0),
            )
        };
        let got: Result<Option<String>, _> = redis::cmd("GET").arg(&key).query_async(conn).await;
        let value = match got {
            Ok(value) => value,
            Err(_) => {
                redis = None;
                continue;
            }
        };
        let Some(version) = value.as_deref().and_then(workload::version_of) else {
            continue;
        };
        let mut state = copies.lock();
        let now = (
            state.generation,
            state.named.get(&key).copied().unwrap_or(0),
        );
        if state.subscribed && now == before {
            state.held.insert(key, version);
            state.counts.copies_filled += 1;
        }
    }
}

/// The last `seq` the daemon drew for the channel (0 when none).
pub async fn last_seq(target: &RedisTarget) -> u64 {
    let Some(mut conn) = target.try_connect(Duration::from_secs(5)).await else {
        return 0;
    };
    redis::cmd("HGET")
        .arg(pgci_client::events::sequence_key(CHANNEL))
        .arg("seq")
        .query_async::<Option<u64>>(&mut conn)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}
