//! Several Redis targets fed from one stream (`[[targets]]`): the same
//! rules applied to two regions, or to a Redis and a Redis Cluster.
//!
//! ```text
//!                    ┌─▶ step queue ─▶ target task (RedisSink: record, events, health) ─┐
//!  pipeline ─▶ Fanout┤                                                                  ├─▶ applied = min
//!                    └─▶ step queue ─▶ target task (RedisSink …)                       ─┘
//! ```
//!
//! Every step the pipeline makes is queued to every target; each target
//! applies its steps in order in its own task, with its own position
//! record, events and health. [`Sink::applied`] is the *minimum* over the
//! targets, so the slot is confirmed only up to what every target
//! acknowledged: a target that is down holds the slot's WAL (as one Redis
//! does) and catches up from its queue when it returns, while the others
//! go on.
//!
//! Pace: the fan-out waits while a target that answers has more than
//! [`PACE_STEPS`] steps queued, so a slow but healthy target slows the
//! stream as one Redis would. A target that has not acknowledged its
//! current step for [`STALLED`] (down, paused, refusing writes) does not
//! slow the others; its queue grows to at most [`MAX_BACKLOG_BYTES`]. Past
//! that (or the target's `max_backlog_bytes`) its queue is dropped, and when it answers again it flushes every
//! rule key before its next step (it cannot replay what it dropped; the
//! flush is ordered after every change it missed, so nothing stale
//! survives), and counts as having applied every step up to then.
//!
//! A target starts in its own task too (connect, then [`super::start::prepare`]),
//! so one that is down when the daemon starts does not stop the others.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use super::{Again, RedisSink, Sink, SinkError, SinkStats};
use crate::lsn::Lsn;
use crate::ops::{CacheOp, Item};
use crate::telemetry::metrics as m;

/// Steps a target that answers may have queued before the fan-out waits
/// for it: one applying, one ready behind it (as the pipeline's own queue).
pub const PACE_STEPS: u64 = 2;
/// Most bytes (keys and values, [`Item::weight`]) queued for a target that
/// does not answer; past that its queue is dropped and it flushes when it
/// answers again. With [`crate::pipeline::MAX_BATCH_BYTES`] a step, this
/// is at least 32 steps, far more than a Redis failover takes.
pub const MAX_BACKLOG_BYTES: usize = 64 << 20;
/// A target that has not acknowledged its current step for this long no
/// longer sets the pace (the readiness threshold of one Redis).
pub const STALLED: Duration = Duration::from_secs(2);
/// How often an idle target checks its Redis (readiness, lost writes).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A target to start: its name and how to open it (connect, then
/// [`super::start::prepare`]).
pub struct Opening {
    /// Names it in logs, metrics and readiness.
    pub name: String,
    /// Connects and prepares it.
    pub open: BoxFuture<'static, Result<RedisSink, SinkError>>,
    /// Most bytes queued while it does not answer ([`MAX_BACKLOG_BYTES`]
    /// unless configured).
    pub max_backlog: usize,
}

/// What a step does.
#[derive(Clone, Copy)]
enum Work {
    Apply,
    ApplyUnannounced,
    Again(Again),
}

/// One step, as every target receives it.
struct Step {
    /// Its number (see [`Sink`]).
    n: u64,
    work: Work,
    items: Arc<[Item]>,
    applied: Option<Lsn>,
    /// Its share of the target's backlog.
    bytes: usize,
}

/// What a target's task and the fan-out share.
#[derive(Default)]
struct Shared {
    /// The last step it applied.
    applied: AtomicU64,
    /// Bytes of the steps queued for it.
    queued_bytes: AtomicUsize,
    /// It has not acknowledged its current step for [`STALLED`], or is not
    /// open yet.
    stalled: AtomicBool,
    /// Its queue was dropped (set by the fan-out, cleared by its rejoin).
    dropped: AtomicBool,
    /// After a drop: it answers again and waits for its rejoin step.
    answering: AtomicBool,
    /// Wakes its task when its queue is dropped.
    overflow: Notify,
    /// Why it stopped for good.
    failed: Mutex<Option<SinkError>>,
}

/// One target as the fan-out holds it.
struct Handle {
    name: String,
    max_backlog: usize,
    steps: Option<mpsc::UnboundedSender<Step>>,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

/// Applies every step to several targets (see the module doc).
pub struct Fanout {
    targets: Vec<Handle>,
    /// Woken by every target on progress, a stall, an answer or a failure.
    wake: Arc<Notify>,
    /// Steps made so far.
    made: u64,
    /// The last position a step recorded (a rejoining target records it
    /// with its flush).
    last_record: Option<Lsn>,
    /// Every rule's keys: what a target whose queue was dropped flushes.
    flush_all: CacheOp,
    stats: SinkStats,
}

impl Fanout {
    /// Starts every target's task.
    pub fn start(targets: Vec<Opening>, flush_all: CacheOp) -> Fanout {
        let wake = Arc::new(Notify::new());
        let targets = targets
            .into_iter()
            .map(|opening| {
                let (tx, rx) = mpsc::unbounded_channel();
                let shared = Arc::new(Shared::default());
                shared.stalled.store(true, Ordering::SeqCst);
                let task = tokio::spawn(run_target(
                    opening.name.clone(),
                    opening.open,
                    rx,
                    Arc::clone(&shared),
                    Arc::clone(&wake),
                ));
                Handle {
                    name: opening.name,
                    max_backlog: opening.max_backlog,
                    steps: Some(tx),
                    shared,
                    task: Some(task),
                }
            })
            .collect();
        Fanout {
            targets,
            wake,
            made: 0,
            last_record: None,
            flush_all,
            stats: SinkStats::default(),
        }
    }

    /// The first error of a target that stopped for good.
    fn failure(&self) -> Result<(), SinkError> {
        for target in &self.targets {
            let mut failed = target
                .shared
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(error) = failed.take() {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Hands each target whose queue was dropped and that answers again
    /// its flush, as the step everything made so far is applied with.
    fn rejoin(&mut self) {
        for target in &self.targets {
            let shared = &target.shared;
            if !shared.answering.load(Ordering::SeqCst) {
                continue;
            }
            let Some(tx) = &target.steps else { continue };
            let flush = Item {
                op: self.flush_all.clone(),
                lsn: self.last_record.unwrap_or_default(),
                commit_time: Arc::from(""),
                commit_micros: 0,
                seq: 0,
                xid: 0,
            };
            shared.answering.store(false, Ordering::SeqCst);
            shared.dropped.store(false, Ordering::SeqCst);
            tracing::warn!(target = %target.name,
                "the redis target answers again after its backlog was dropped: flushing every key of every rule there, then applying from now on");
            let _ = tx.send(Step {
                n: self.made,
                work: Work::Apply,
                items: Arc::from(vec![flush]),
                applied: self.last_record,
                bytes: 0,
            });
        }
    }

    /// Counts a batch's operations and keys in the stats (once, whatever
    /// the number of targets).
    fn count(&mut self, items: &[Item]) {
        if items.is_empty() {
            return;
        }
        self.stats.batches += 1;
        self.stats.operations += items.len() as u64;
        for item in items {
            let (removed, written) = item.op.keys().counts();
            self.stats.keys += (removed + written) as u64;
        }
    }

    /// Queues one step to every target, then keeps the pace.
    async fn step(
        &mut self,
        work: Work,
        items: &[Item],
        applied: Option<Lsn>,
    ) -> Result<(), SinkError> {
        self.failure()?;
        self.rejoin();
        self.made += 1;
        if applied.is_some() {
            self.last_record = applied;
        }
        let bytes: usize = items.iter().map(Item::weight).sum();
        let items: Arc<[Item]> = Arc::from(items);
        for target in &self.targets {
            let shared = &target.shared;
            if shared.dropped.load(Ordering::SeqCst) {
                continue;
            }
            let Some(tx) = &target.steps else { continue };
            let queued = shared.queued_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
            let _ = tx.send(Step {
                n: self.made,
                work,
                items: Arc::clone(&items),
                applied,
                bytes,
            });
            if queued > target.max_backlog && shared.stalled.load(Ordering::SeqCst) {
                shared.dropped.store(true, Ordering::SeqCst);
                shared.overflow.notify_one();
                metrics::counter!(m::TARGET_BACKLOG_DROPS_TOTAL, "target" => target.name.clone())
                    .increment(1);
                tracing::error!(target = %target.name, backlog_bytes = queued, bound_bytes = target.max_backlog,
                    "a redis target has not answered for so long that its backlog passed its bound: dropped; it flushes every key of every rule when it answers again");
            }
        }
        self.gauges();
        self.pace().await
    }

    /// Waits while a target that answers has more than [`PACE_STEPS`]
    /// steps queued.
    async fn pace(&mut self) -> Result<(), SinkError> {
        loop {
            self.failure()?;
            let waiting = self.targets.iter().any(|t| {
                let s = &t.shared;
                !s.dropped.load(Ordering::SeqCst)
                    && !s.stalled.load(Ordering::SeqCst)
                    && self.made - s.applied.load(Ordering::SeqCst) > PACE_STEPS
            });
            if !waiting {
                return Ok(());
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(STALLED) => {}
            }
        }
    }

    fn gauges(&self) {
        for target in &self.targets {
            let s = &target.shared;
            metrics::gauge!(m::TARGET_BACKLOG_BYTES, "target" => target.name.clone())
                .set(s.queued_bytes.load(Ordering::SeqCst) as f64);
            let behind = self.made.saturating_sub(s.applied.load(Ordering::SeqCst));
            metrics::gauge!(m::TARGET_BEHIND_STEPS, "target" => target.name.clone())
                .set(behind as f64);
        }
    }
}

impl Sink for Fanout {
    async fn apply(&mut self, items: &[Item], applied: Option<Lsn>) -> Result<(), SinkError> {
        self.count(items);
        self.step(Work::Apply, items, applied).await
    }

    async fn apply_unannounced(&mut self, items: &[Item]) -> Result<(), SinkError> {
        self.count(items);
        self.step(Work::ApplyUnannounced, items, None).await
    }

    async fn delete_again(
        &mut self,
        items: &[Item],
        scope: Again,
        applied: Option<Lsn>,
    ) -> Result<(), SinkError> {
        self.step(Work::Again(scope), items, applied).await
    }

    async fn check(&mut self) {
        // Each target checks its own Redis while idle; here only a target
        // that answers again after a drop is let back in.
        self.rejoin();
        self.gauges();
    }

    fn applied(&self) -> u64 {
        self.targets
            .iter()
            .map(|t| t.shared.applied.load(Ordering::SeqCst))
            .min()
            .unwrap_or(self.made)
    }

    async fn advanced(&mut self) -> Result<(), SinkError> {
        self.wake.notified().await;
        self.gauges();
        self.failure()
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        for target in &mut self.targets {
            target.steps = None;
        }
        for target in &mut self.targets {
            if let Some(task) = target.task.take() {
                let _ = task.await;
            }
        }
        self.gauges();
        // A target that gave up at shutdown applied less; what it did not
        // apply is not confirmed, and is replayed at the next start.
        for target in &self.targets {
            let mut failed = target
                .shared
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match failed.take() {
                Some(SinkError::GaveUp(why)) => {
                    tracing::warn!(target = %target.name, error = %why,
                        "a redis target did not apply everything before shutdown; the rest is replayed at the next start")
                }
                Some(error) => return Err(error),
                None => {}
            }
        }
        Ok(())
    }

    fn stats(&self) -> SinkStats {
        self.stats
    }
}

/// A target's task: opens it, then applies its steps in order.
async fn run_target(
    name: String,
    open: BoxFuture<'static, Result<RedisSink, SinkError>>,
    steps: mpsc::UnboundedReceiver<Step>,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
) {
    let result = drive_target(&name, open, steps, &shared, &wake).await;
    if let Err(error) = result {
        if !matches!(error, SinkError::GaveUp(_)) {
            tracing::error!(target = %name, error = %error, "a redis target stopped");
        }
        *shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }
    wake.notify_one();
}

async fn drive_target(
    name: &str,
    open: BoxFuture<'static, Result<RedisSink, SinkError>>,
    mut steps: mpsc::UnboundedReceiver<Step>,
    shared: &Shared,
    wake: &Notify,
) -> Result<(), SinkError> {
    let mut sink = open.await?;
    tracing::info!(target = name, "redis target open");
    shared.stalled.store(false, Ordering::SeqCst);
    wake.notify_one();
    let mut idle = tokio::time::interval(IDLE_CHECK);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if shared.dropped.load(Ordering::SeqCst) && !shared.answering.load(Ordering::SeqCst) {
            // Its queue was dropped: discard what is left, wait until it
            // answers, then take the rejoin step (a flush) the fan-out
            // sends next.
            while let Ok(step) = steps.try_recv() {
                shared.queued_bytes.fetch_sub(step.bytes, Ordering::SeqCst);
            }
            loop {
                if sink.check().await {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(IDLE_CHECK) => {}
                    step = steps.recv() => if step.is_none() { return Ok(()) },
                }
            }
            shared.stalled.store(false, Ordering::SeqCst);
            shared.answering.store(true, Ordering::SeqCst);
            wake.notify_one();
        }
        let step = tokio::select! {
            step = steps.recv() => match step {
                Some(step) => step,
                None => return Ok(()),
            },
            () = shared.overflow.notified() => continue,
            _ = idle.tick() => {
                sink.check().await;
                continue;
            }
        };
        idle.reset();
        let applying = async {
            match step.work {
                Work::Apply => sink.apply(&step.items, step.applied).await,
                Work::ApplyUnannounced => sink.apply_unannounced(&step.items).await,
                Work::Again(scope) => sink.delete_again(&step.items, scope, step.applied).await,
            }
        };
        tokio::pin!(applying);
        let stall = tokio::time::sleep(STALLED);
        tokio::pin!(stall);
        let outcome = loop {
            tokio::select! {
                done = &mut applying => break Some(done),
                () = &mut stall, if !shared.stalled.load(Ordering::SeqCst) => {
                    shared.stalled.store(true, Ordering::SeqCst);
                    wake.notify_one();
                }
                () = shared.overflow.notified() => {
                    if shared.dropped.load(Ordering::SeqCst) {
                        break None;
                    }
                }
            }
        };
        shared.queued_bytes.fetch_sub(step.bytes, Ordering::SeqCst);
        let Some(done) = outcome else {
            // Dropped while this step waited: the loop's top discards the
            // rest.
            continue;
        };
        done?;
        tracing::trace!(
            target = name,
            step = step.n,
            operations = step.items.len(),
            "step applied"
        );
        shared.stalled.store(false, Ordering::SeqCst);
        shared.applied.store(step.n, Ordering::SeqCst);
        wake.notify_one();
    }
}
