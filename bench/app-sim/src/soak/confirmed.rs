//! Nothing confirmed that Redis had not acknowledged, checked with
//! canaries.
//!
//! The daemon may confirm a transaction to PostgreSQL only after Redis
//! acknowledged its invalidations: a slot that moved past a change whose
//! deletes Redis never applied has forgotten it. The stale check at
//! quiescent points cannot see such a confirmation, because the daemon's
//! start-up check flushes every rule key when Redis's record of what it
//! applied is behind the slot, which hides what was skipped. (Comparing
//! that record with the slot directly does not work either: a synchronous
//! transaction's second deletion pass and a large transaction's record are
//! written after the confirmation, by design; see the daemon's
//! `pipeline::held`.)
//!
//! So the checker asks the contract itself, all the time: a canary task
//! sets a key, then commits a row whose rule deletes it and notes the WAL
//! position after the commit; a judge samples the slot's
//! `confirmed_flush_lsn` and, for every canary whose commit the slot has
//! confirmed, asks Redis whether its key is still there. Nothing but the
//! daemon deletes it, nothing sets it again, so a key found after its
//! commit was confirmed is a confirmation Redis had not acknowledged.
//! Canaries fly while Redis pauses writes or is full, and while a killed
//! daemon is down: the moments an early confirmation would show.
//!
//! Some faults bring a deleted key back or move the slot past a canary
//! without the daemon applying it, legitimately, until the daemon notices
//! and flushes: Redis back from an older snapshot, a slot dropped and
//! created anew, a promotion. From the moment such a fault starts until
//! the next quiescent point, canaries are not judged
//! ([`Watcher::expect_loss`], [`Watcher::settled`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::redis_target::{RedisConn, RedisTarget};
use pgci_protocol::lsn::Lsn;

/// How often the judge samples the slot.
const SAMPLE_EVERY: Duration = Duration::from_millis(25);
/// How often a canary is launched.
const LAUNCH_EVERY: Duration = Duration::from_millis(100);
/// How long one call to a server may take before the sample or the
/// canary is given up (a server paused, down or being restarted).
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Most canaries in flight (a daemon that is down for long leaves them
/// waiting; the oldest are dropped unjudged past this).
const MAX_FLYING: usize = 1000;

/// The checker's state, shared with the soak's main loop.
#[derive(Default)]
pub struct Watcher {
    /// Even while canaries are judged, odd while a fault may legitimately
    /// bring keys back or move the slot without the daemon; bumped on each
    /// change, and a canary is judged only in the phase it was launched in.
    phase: AtomicU64,
    /// Canaries in flight, oldest (lowest position) first.
    flying: Mutex<VecDeque<Canary>>,
    /// Canaries launched.
    pub launched: AtomicU64,
    /// Canaries judged (their commit confirmed, their key looked up).
    pub judged: AtomicU64,
    /// Canaries whose key was still in Redis after the slot confirmed
    /// their commit.
    pub alive: AtomicU64,
    /// The first such canary, described.
    first: Mutex<Option<String>>,
    /// The nemesis' round now (for the report).
    pub round: AtomicU64,
}

/// A key whose deleting change is committed at or before `lsn`.
struct Canary {
    key: String,
    lsn: Lsn,
    phase: u64,
}

impl Watcher {
    /// A fault that may bring keys back or move the slot without the
    /// daemon is about to start: stop judging until [`Watcher::settled`].
    pub fn expect_loss(&self) {
        let _ = self
            .phase
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                p.is_multiple_of(2).then_some(p + 1)
            });
    }

    /// A quiescent point: the daemon caught up with everything committed
    /// (and flushed what it had to); canaries are judged again.
    pub fn settled(&self) {
        let _ = self
            .phase
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                (!p.is_multiple_of(2)).then_some(p + 1)
            });
    }

    /// The first canary found alive, if any.
    pub fn first_alive(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn judging(&self) -> Option<u64> {
        let phase = self.phase.load(Ordering::SeqCst);
        phase.is_multiple_of(2).then_some(phase)
    }

    fn flying(&self) -> std::sync::MutexGuard<'_, VecDeque<Canary>> {
        self.flying.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Launches a canary every [`LAUNCH_EVERY`] until `stop`: sets its key,
/// commits a `public.pillars` row whose rule (the soak's sentinel rule)
/// deletes it, and reads the WAL position after the commit. A canary that
/// cannot be completed (a server down or paused) is not flown.
pub async fn launch(
    watcher: Arc<Watcher>,
    pg_url: String,
    redis: RedisTarget,
    stop: Arc<AtomicBool>,
) {
    let mut conns = Conns::new(pg_url, redis);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(LAUNCH_EVERY).await;
        let Some(phase) = watcher.judging() else {
            continue;
        };
        let Some((pg, redis)) = conns.get().await else {
            continue;
        };
        let flown = async {
            let id: String = pg
                .query_one("select gen_random_uuid()::text", &[])
                .await
                .ok()?
                .get(0);
            let key = format!("sentinel:pillar:{id}");
            let set: Result<(), _> = redis::cmd("SET")
                .arg(&key)
                .arg("canary")
                .query_async(redis)
                .await;
            set.ok()?;
            pg.execute(
                "insert into public.pillars (id, slug) values ($1::text::uuid, 'canary-' || $1)",
                &[&id],
            )
            .await
            .ok()?;
            let after: String = pg
                .query_one("select pg_current_wal_insert_lsn()::text", &[])
                .await
                .ok()?
                .get(0);
            Some(Canary {
                key,
                lsn: after.parse().ok()?,
                phase,
            })
        };
        match tokio::time::timeout(CALL_TIMEOUT * 3, flown).await {
            Ok(Some(canary)) => {
                watcher.launched.fetch_add(1, Ordering::Relaxed);
                let mut flying = watcher.flying();
                flying.push_back(canary);
                while flying.len() > MAX_FLYING {
                    flying.pop_front();
                }
            }
            // A server down, paused or restarted: connect again.
            Ok(None) | Err(_) => conns.reset(),
        }
    }
}

/// Samples the slot every [`SAMPLE_EVERY`] until `stop` and judges every
/// canary whose commit it confirmed (see the module doc).
pub async fn judge(
    watcher: Arc<Watcher>,
    pg_url: String,
    redis: RedisTarget,
    slot: String,
    stop: Arc<AtomicBool>,
) {
    let mut conns = Conns::new(pg_url, redis);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(SAMPLE_EVERY).await;
        if watcher.judging().is_none() {
            watcher.flying().clear();
            continue;
        }
        if watcher.flying().is_empty() {
            continue;
        }
        let Some((pg, redis)) = conns.get().await else {
            continue;
        };
        let sampled = tokio::time::timeout(CALL_TIMEOUT, async {
            let row = pg
                .query_opt(
                    "select confirmed_flush_lsn::text, to_char(clock_timestamp() at time zone 'utc', 'HH24:MI:SS.US') \
                     from pg_replication_slots where slot_name = $1",
                    &[&slot],
                )
                .await
                .ok()??;
            let confirmed: Option<String> = row.get(0);
            let at: String = row.get(1);
            Some((confirmed?.parse::<Lsn>().ok()?, at))
        })
        .await;
        let Some((confirmed, at)) = sampled.ok().flatten() else {
            conns.reset();
            continue;
        };
        // The key is looked up after the slot was read: a confirmation
        // seen is never judged against a key read before it.
        let due: Vec<Canary> = {
            let mut flying = watcher.flying();
            let n = flying.iter().take_while(|c| c.lsn <= confirmed).count();
            flying.drain(..n).collect()
        };
        for canary in due {
            let exists = tokio::time::timeout(
                CALL_TIMEOUT,
                redis::cmd("EXISTS")
                    .arg(&canary.key)
                    .query_async::<bool>(redis),
            )
            .await;
            let Ok(Ok(exists)) = exists else {
                conns.reset();
                break;
            };
            if watcher.phase.load(Ordering::SeqCst) != canary.phase {
                continue;
            }
            watcher.judged.fetch_add(1, Ordering::Relaxed);
            if exists {
                watcher.alive.fetch_add(1, Ordering::Relaxed);
                let what = format!(
                    "round {} ({at}): the slot confirmed {confirmed}, past the commit that deletes {} (before {}), and the key is still in Redis: the daemon confirmed a change Redis had not acknowledged",
                    watcher.round.load(Ordering::Relaxed),
                    canary.key,
                    canary.lsn,
                );
                eprintln!("VIOLATION: {what}");
                watcher
                    .first
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(what);
            }
        }
    }
}

/// A connection to each server, opened again after any failure.
struct Conns {
    pg_url: String,
    target: RedisTarget,
    pg: Option<tokio_postgres::Client>,
    redis: Option<RedisConn>,
}

impl Conns {
    fn new(pg_url: String, target: RedisTarget) -> Conns {
        Conns {
            pg_url,
            target,
            pg: None,
            redis: None,
        }
    }

    fn reset(&mut self) {
        self.pg = None;
        self.redis = None;
    }

    async fn get(&mut self) -> Option<(&tokio_postgres::Client, &mut RedisConn)> {
        if self.pg.as_ref().is_none_or(|c| c.is_closed()) {
            let connect = tokio_postgres::connect(&self.pg_url, tokio_postgres::NoTls);
            let (client, conn) = tokio::time::timeout(CALL_TIMEOUT, connect)
                .await
                .ok()?
                .ok()?;
            tokio::spawn(conn);
            self.pg = Some(client);
        }
        if self.redis.is_none() {
            self.redis = Some(self.target.try_connect(CALL_TIMEOUT).await?);
        }
        Some((self.pg.as_ref()?, self.redis.as_mut()?))
    }
}
