//! The apply loop: source → plan → resolve → sink → ack, for either source.
//!
//! ```text
//!  source.next() ─▶ plan ─▶ pending Batch ─(channel, 2 deep)─▶ sink task: resolve, apply
//!        ▲                                                                  │
//!        └──────────── confirm(ack) ◀──── ack watch (applied ack) ◀─────────┘
//! ```
//!
//! Reading and applying overlap: while the sink task waits for Redis, the
//! loop keeps planning into the next batch, so a batch grows exactly as
//! large as the Redis round-trip lets it (up to [`MAX_BATCH_ITEMS`]). A
//! batch carries the acknowledgement of the last transaction it completes
//! (an LSN, or an outbox claim); the sink task applies batches strictly in
//! order and publishes that acknowledgement only after Redis acknowledged
//! everything, and only then is it confirmed to the source. A keepalive's
//! position is confirmed the same way, when no transaction is open, so
//! writes to unwatched tables never make the slot retain WAL.
//!
//! A large transaction does not have to fit in memory: once the pending
//! batch is full it is applied without an acknowledgement, and the
//! transaction's commit confirms it later. That is safe because pgoutput v1
//! sends only committed transactions.

mod held;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{Change, TableName};
use crate::db::types::TypeLoader;
use crate::db::ConnInfo;
use crate::decode::time::pg_micros_to_rfc3339;
use crate::error::Fatal;
use crate::lsn::Lsn;
use crate::ops::{CacheOp, FlushReason, Item};
use crate::plan::{PlanError, Planner};
use crate::resolve::{ResolveError, Resolver, Visibility};
use crate::sink::{Again, Sink, SinkError};
use crate::source::replication::drift::CatalogReport;
use crate::source::replication::drift_watch::DriftWatch;
use crate::source::{Event, Source, Txn};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;
use crate::telemetry::systemd;

/// Most operations in one batch: bounds the size of one Redis pipeline,
/// while being large enough that a backlog of small changes drains in few
/// round-trips.
pub const MAX_BATCH_ITEMS: usize = 4096;
/// Most bytes (keys and refreshed values) in one batch: refreshed rows can
/// be large (a 100 kB profile), and at most three batches are alive at once
/// (pending, queued, applying) plus the Redis request built from one, so
/// this keeps the daemon's memory in tens of MB whatever the rows hold,
/// while 2 MiB is still far more than one round-trip needs to be efficient.
pub const MAX_BATCH_BYTES: usize = 2 << 20;
/// Batches queued for the sink besides the one it applies: one is enough to
/// keep Redis busy while the next fills.
const QUEUED_BATCHES: usize = 1;
/// How often the loop proves it is alive (liveness, systemd watchdog) and
/// updates the lag gauge, even when the stream is idle.
const TICK: Duration = Duration::from_secs(1);
/// How often the commits held across a restart are asked about until they
/// show: the flush follows within this much.
const RECHECK_ACROSS_RESTART: Duration = Duration::from_millis(200);
/// How often the sink task logs its progress while there is any.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source cannot continue.
    #[error(transparent)]
    Source(#[from] Fatal),
    /// A change could not be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Refresh queries could not be answered before shutdown.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// Redis could not be written before shutdown.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The sink task ended unexpectedly.
    #[error("the redis sink task ended unexpectedly")]
    SinkGone,
}

/// Operations to apply in order, and what may be confirmed once they (and
/// every batch before) are applied.
#[derive(Debug)]
pub struct Batch<A> {
    /// Operations in commit order.
    pub items: Vec<Item>,
    /// Their size in bytes (see [`Item::weight`]).
    pub bytes: usize,
    /// End of the last transaction (or position) wholly inside this and
    /// earlier batches; `None` while a large transaction is still open.
    pub ack: Option<A>,
    /// Which position the ack belongs to: it changes when a lost slot is
    /// recreated, so acks for the old slot are not confirmed to the new one.
    pub generation: u64,
}

impl<A> Default for Batch<A> {
    fn default() -> Self {
        Batch {
            items: Vec::new(),
            bytes: 0,
            ack: None,
            generation: 0,
        }
    }
}

/// The transaction being read.
struct OpenTxn {
    txn: Txn,
    commit_time: Arc<str>,
    /// Operations planned so far in this transaction (versions them).
    seq: u32,
}

/// Planning state between events.
struct Stream<A> {
    planner: Planner,
    pending: Batch<A>,
    txn: Option<OpenTxn>,
    /// Highest ack already handed to the sink or pending.
    queued_ack: A,
    /// Bumped when the position is rebuilt (see [`Batch::generation`]).
    generation: u64,
    /// Whether systemd was told we are ready.
    announced_ready: bool,
    /// Reused buffer for the operations one change plans.
    scratch: Vec<CacheOp>,
    /// Column types for refresh rules, loaded when a table is described.
    types: TypeLoader,
    /// Watched tables whose changes may be missed, as the catalog check
    /// and the stream's own table descriptions report them.
    drift: DriftWatch,
}

impl<A: Copy + Default + PartialOrd> Stream<A> {
    /// The pending batch should go to the sink now.
    fn ready(&self) -> bool {
        self.pending.ack.is_some() || self.full()
    }

    /// Reading must pause until the sink takes the pending batch.
    fn full(&self) -> bool {
        self.pending.items.len() >= MAX_BATCH_ITEMS || self.pending.bytes >= MAX_BATCH_BYTES
    }

    fn take(&mut self) -> Batch<A> {
        let mut batch = std::mem::take(&mut self.pending);
        batch.generation = self.generation;
        batch
    }

    fn set_ack(&mut self, ack: A) {
        if ack > self.queued_ack {
            self.queued_ack = ack;
            self.pending.ack = Some(ack);
        }
    }

    fn push(&mut self, op: CacheOp) {
        let item = match &mut self.txn {
            Some(open) => {
                open.seq += 1;
                Item {
                    op,
                    lsn: open.txn.lsn,
                    commit_time: Arc::clone(&open.commit_time),
                    commit_micros: open.txn.commit_time_micros,
                    seq: open.txn.fixed_seq.unwrap_or(open.seq),
                    xid: open.txn.xid,
                }
            }
            None => Item {
                op,
                lsn: Lsn::ZERO,
                commit_time: Arc::from(""),
                commit_micros: 0,
                seq: 0,
                xid: 0,
            },
        };
        self.pending.bytes += item.weight();
        self.pending.items.push(item);
    }

    /// Handles one event; returns the reason if the position was lost.
    async fn handle(&mut self, event: Event<A>) -> Result<Option<String>, PipelineError> {
        match event {
            Event::Restarted => {
                self.txn = None;
                if !self.announced_ready {
                    self.announced_ready = true;
                    systemd::ready();
                }
            }
            Event::PositionLost { reason } => return Ok(Some(reason)),
            Event::Heartbeat { sent_unix_micros } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                let rtt = (now - sent_unix_micros as f64 / 1e6).max(0.0);
                metrics::gauge!(m::HEARTBEAT_RTT_SECONDS).set(rtt);
                metrics::gauge!(m::LAST_HEARTBEAT_TIMESTAMP_SECONDS).set(now);
            }
            Event::Begin(txn) => {
                self.txn = Some(OpenTxn {
                    txn,
                    commit_time: Arc::from(pg_micros_to_rfc3339(txn.commit_time_micros)),
                    seq: 0,
                });
            }
            Event::Commit { ack } => {
                self.txn = None;
                if let Some(ack) = ack {
                    self.set_ack(ack);
                }
            }
            Event::Position(ack) => {
                if self.txn.is_none() {
                    self.set_ack(ack);
                }
            }
            Event::Change(change) => self.change(&change).await?,
        }
        Ok(None)
    }

    /// Takes a catalog drift report.
    fn on_catalog_drift(&mut self, report: CatalogReport) {
        for flush in self.drift.on_catalog(report, &self.planner) {
            self.push(flush);
        }
    }

    /// The position was lost: acks of the old one must not be confirmed to
    /// the new one, and what was read from it and not handed to the sink
    /// yet is dropped (the flush that starts the new one covers its keys).
    fn abandon_position(&mut self) {
        self.generation += 1;
        self.queued_ack = A::default();
        self.pending = Batch::default();
        self.txn = None;
    }

    /// The position was rebuilt, starting at `start` (after
    /// [`Stream::abandon_position`]): every key is flushed. The
    /// flush's batch carries `start`, so the position each target records
    /// (which write tokens are compared with) moves to the new position in
    /// the same transaction as the flush: after a promotion the old
    /// primary's positions may lie ahead of the new one's, and a record
    /// left there would answer tokens taken on the new primary from the
    /// cache before their changes were applied.
    fn reset_after_position_loss(&mut self, start: A) {
        let flush = self.planner.plan_flush_all();
        self.push(flush);
        self.set_ack(start);
    }

    async fn change(&mut self, change: &Change) -> Result<(), PipelineError> {
        if let Change::Schema(schema) = change {
            self.types.load(&mut self.planner, schema).await;
        }
        let mut planned = std::mem::take(&mut self.scratch);
        self.planner.plan(change, &mut planned)?;
        // After planning: the planner has bound (or failed to bind) the
        // table's rules to the new description.
        if let Change::Schema(schema) = change {
            for flush in self.drift.on_described(schema, &self.planner) {
                self.push(flush);
            }
        }
        for op in planned.drain(..) {
            self.push(op);
        }
        self.scratch = planned;
        Ok(())
    }
}

/// What the loop drives.
pub struct Stages<K> {
    /// Turns changes into cache operations.
    pub planner: Planner,
    /// Answers refresh queries before the sink.
    pub resolver: Resolver,
    /// Applies operations to Redis (one target, or several).
    pub sink: K,
    /// Where column types are read from.
    pub conn: ConnInfo,
    /// Reports of watched tables the catalog no longer lets the stream
    /// cover (replication, from the heartbeat task).
    pub drift: Option<watch::Receiver<CatalogReport>>,
    /// Watched tables that are partitioned (see [`DriftWatch`]).
    pub partitioned: Vec<TableName>,
    /// Commits that waited for another synchronous standby at start (see
    /// [`held::Held::across_restart`]).
    pub held_across_restart: Vec<u32>,
}

/// Runs until `cancel` fires or a fatal error; then applies what was read,
/// confirms it, and ends the source's session.
pub async fn run<S: Source, K: Sink>(
    mut source: S,
    stages: Stages<K>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    let Stages {
        planner,
        resolver,
        sink,
        conn,
        mut drift,
        partitioned,
        held_across_restart,
    } = stages;
    let (batch_tx, batch_rx) = mpsc::channel::<Batch<S::Ack>>(QUEUED_BATCHES);
    let (ack_tx, mut ack_rx) = watch::channel((0u64, S::Ack::default()));
    let (generation_tx, generation_rx) = watch::channel(0u64);
    let held = held::Held::new(planner.plan_flush_each_table(FlushReason::HeldTooLarge))
        .across_restart(
            held_across_restart,
            planner.plan_flush_all_because(FlushReason::HeldAcrossRestart),
        );
    let sink_task = tokio::spawn(apply_batches(
        resolver,
        sink,
        held,
        batch_rx,
        ack_tx,
        Current(generation_rx),
        S::recorded,
    ));
    let mut stream = Stream {
        planner,
        pending: Batch::default(),
        txn: None,
        queued_ack: S::Ack::default(),
        generation: 0,
        announced_ready: false,
        scratch: Vec::new(),
        types: TypeLoader::new(conn),
        drift: DriftWatch::new(partitioned, Arc::clone(&health)),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick();

    let outcome = loop {
        tokio::select! {
            biased;
            // 1. Shutdown: stop reading; what was read is applied below.
            _ = cancel.cancelled() => break Ok(()),
            // 2. The sink applied a batch: confirm its ack to the source
            //    (unless it belongs to a position that has since been
            //    replaced).
            changed = ack_rx.changed() => {
                if changed.is_err() {
                    break Err(PipelineError::SinkGone);
                }
                let (generation, applied) = *ack_rx.borrow_and_update();
                if generation == stream.generation {
                    source.confirm(applied);
                }
            }
            // 3. The sink has room and a batch is ready: hand it over.
            permit = batch_tx.reserve(), if stream.ready() => match permit {
                Ok(permit) => permit.send(stream.take()),
                Err(_) => break Err(PipelineError::SinkGone),
            },
            // 4. Once a second: liveness, watchdog, lag.
            _ = tick.tick() => {
                health.tick();
                systemd::watchdog();
                source.tick();
            }
            // 5. The catalog changed under the stream: flush what may be
            //    missed, and stay not ready until it is right again.
            report = async {
                match drift.as_mut() {
                    Some(rx) => rx.changed().await.map(|()| rx.borrow_and_update().clone()),
                    None => std::future::pending().await,
                }
            } => match report {
                Ok(report) => stream.on_catalog_drift(report),
                Err(_) => drift = None,
            },
            // 6. New changes or a keepalive, unless the pending batch is full.
            event = source.next(), if !stream.full() => match event {
                Ok(event) => match stream.handle(event).await {
                    Ok(None) => {}
                    Ok(Some(reason)) => {
                        // What was read from the lost position is given up
                        // at once, waits for its transactions included (the
                        // new primary may never have had them); the flush
                        // below covers its keys.
                        stream.abandon_position();
                        generation_tx.send_replace(stream.generation);
                        // Rebuild the position first, then flush: a change
                        // committed after the flush is then in the new slot.
                        let Some(start) = source.recover(&cancel).await else {
                            break Ok(());
                        };
                        stream.reset_after_position_loss(start);
                        metrics::counter!(m::SLOT_RESETS_TOTAL).increment(1);
                        tracing::error!(reason = %reason,
                            "replication slot recreated; flushing every key of every rule");
                    }
                    Err(error) => break Err(error),
                },
                Err(error) => break Err(error.into()),
            },
        }
    };

    // Apply what was read (on a fatal error too: those changes are
    // committed and their invalidations are due), then confirm and stop.
    systemd::stopping();
    if !stream.pending.items.is_empty() || stream.pending.ack.is_some() {
        let _ = batch_tx.send(stream.take()).await;
    }
    drop(batch_tx);
    let sink_result = sink_task.await.map_err(|_| PipelineError::SinkGone)?;
    let (generation, applied) = *ack_rx.borrow();
    if generation == stream.generation {
        source.confirm(applied);
    }
    source.shutdown().await;
    health.set_streaming(false);
    // The sink's own error first: when it stopped, the loop saw only that
    // its task was gone.
    match (outcome, sink_result) {
        (_, Err(error)) | (Err(error), Ok(())) => Err(error),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Acknowledgements waiting for the sink to apply the steps that carry
/// them (see [`Sink`]): a sink that applies in the background (several
/// targets) acknowledges later than the call returns.
struct Unconfirmed<A> {
    /// Steps made so far.
    made: u64,
    /// (last step of the batch, its generation and ack), oldest first.
    acks: std::collections::VecDeque<(u64, (u64, A))>,
}

impl<A: Copy> Unconfirmed<A> {
    /// Publishes the newest ack whose steps the sink applied; returns it
    /// with its generation.
    fn publish<K: Sink>(&mut self, sink: &K, ack: &watch::Sender<(u64, A)>) -> Option<(u64, A)> {
        let applied = sink.applied();
        let mut newest = None;
        while let Some(&(step, acked)) = self.acks.front() {
            if step > applied {
                break;
            }
            self.acks.pop_front();
            newest = Some(acked);
        }
        let newest = newest?;
        ack.send_replace(newest);
        Some(newest)
    }
}

/// The sink task's view of which position is current (see
/// [`Batch::generation`]). A batch read from a replaced one is obsolete:
/// its acks are never confirmed and the flush that starts the new position
/// covers its keys. A wait for its transactions to become visible is given
/// up, since the new primary may never have had them: waiting would stall
/// every batch behind it, the flush included.
struct Current(watch::Receiver<u64>);

impl Current {
    /// Whether position `generation` has been replaced.
    fn replaced(&self, generation: u64) -> bool {
        *self.0.borrow() > generation
    }

    /// Runs `wait` to its end, unless position `generation` is replaced
    /// first (`None`; `wait` is dropped).
    async fn unless_replaced<T>(
        &mut self,
        generation: u64,
        wait: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let replaced = async {
            if self.0.wait_for(|&now| now > generation).await.is_err() {
                // The loop ended: it replaces nothing any more.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            done = wait => Some(done),
            () = replaced => None,
        }
    }
}

/// The sink task: resolves and applies batches in order and publishes each
/// batch's ack after the sink acknowledged it.
async fn apply_batches<A: Copy + std::fmt::Display, K: Sink>(
    mut resolver: Resolver,
    mut sink: K,
    mut held: held::Held,
    mut batches: mpsc::Receiver<Batch<A>>,
    ack: watch::Sender<(u64, A)>,
    mut current: Current,
    recorded: fn(A) -> Option<Lsn>,
) -> Result<(), PipelineError> {
    let mut last_report = tokio::time::Instant::now();
    let mut reported = sink.stats();
    // While no batch comes, Redis is pinged so readiness notices an outage.
    let mut idle = tokio::time::interval(TICK);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recheck = tokio::time::interval(RECHECK_ACROSS_RESTART);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmer = crate::memory::Trimmer::default();
    let mut unconfirmed = Unconfirmed {
        made: 0,
        acks: std::collections::VecDeque::new(),
    };
    // The newest position a batch was read from.
    let mut generation = 0;
    loop {
        let mut batch = tokio::select! {
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => break,
            },
            _ = idle.tick() => {
                sink.check().await;
                trimmer.idle();
                continue;
            }
            _ = recheck.tick(), if held.waiting_across_restart().is_some() => {
                flush_once_shown_across_restart(&mut resolver, &mut sink, &mut held, &mut unconfirmed).await?;
                continue;
            }
            advanced = sink.advanced() => {
                advanced?;
                if let Some(published) = unconfirmed.publish(&sink, &ack) {
                    release_held(&mut resolver, &mut sink, &mut held, &mut unconfirmed, &mut current, published, recorded).await?;
                }
                continue;
            }
        };
        idle.reset();
        let started = tokio::time::Instant::now();
        trimmer.moved(batch.bytes);
        if current.replaced(batch.generation) {
            continue;
        }
        if batch.generation > generation {
            // The first batch of a new position, which starts with the
            // flush: nothing of the old one is worth waiting for.
            generation = batch.generation;
            held.clear();
            resolver.forget_server();
        }
        // Queries wait until their transactions are visible; plain
        // invalidations are applied at once (readers see them sooner) and
        // their keys deleted a second time once the commits show, before
        // the position is recorded and confirmed; their events go out with
        // that second pass.
        let visible_before = resolver.known_visible(&batch.items);
        let Some(queried) = current
            .unless_replaced(batch.generation, resolver.resolve(&mut batch.items))
            .await
        else {
            resolver.forget_server();
            continue;
        };
        let queried = queried?;
        let ack_lsn = batch.ack.and_then(recorded);
        let second_pass = crate::resolve::has_rows(&batch.items)
            && !visible_before
            && queried != Some(Visibility::Visible);
        if second_pass {
            // Announced by the second pass, once final (see
            // `RedisSink::apply_unannounced`).
            sink.apply_unannounced(&batch.items).await?;
        } else {
            let record_now = held.is_empty();
            sink.apply(&batch.items, ack_lsn.filter(|_| record_now))
                .await?;
        }
        unconfirmed.made += 1;
        if second_pass {
            let visibility = match queried {
                Some(v) => Some(v),
                None => current
                    .unless_replaced(batch.generation, resolver.check_visible(&batch.items))
                    .await
                    .transpose()?,
            };
            match visibility {
                Some(Visibility::Visible) => {
                    let record = ack_lsn.filter(|_| held.is_empty());
                    sink.delete_again(&batch.items, Again::Deleted, record)
                        .await?;
                    unconfirmed.made += 1;
                }
                Some(Visibility::HeldForStandby) => held.hold(&batch.items, batch.generation),
                None => {
                    resolver.forget_server();
                    continue;
                }
            }
        }
        metrics::histogram!(m::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        if let Some(applied) = batch.ack {
            unconfirmed
                .acks
                .push_back((unconfirmed.made, (batch.generation, applied)));
        }
        if let Some(published) = unconfirmed.publish(&sink, &ack) {
            release_held(
                &mut resolver,
                &mut sink,
                &mut held,
                &mut unconfirmed,
                &mut current,
                published,
                recorded,
            )
            .await?;
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            let now = sink.stats();
            if now.operations != reported.operations {
                tracing::info!(
                    changes = now.operations - reported.operations,
                    keys = now.keys - reported.keys,
                    batches = now.batches - reported.batches,
                    retries = now.retries - reported.retries,
                    applied = %ack.borrow().1,
                    "progress"
                );
            }
            reported = now;
            last_report = tokio::time::Instant::now();
        }
    }
    // Every target applies what it was given (or gives up at shutdown)
    // before the last acknowledgement is published.
    sink.finish().await?;
    unconfirmed.publish(&sink, &ack);
    Ok(())
}

/// Flushes every rule's keys once the commits held across the restart
/// (see [`held::Held::across_restart`]) show; asks once.
async fn flush_once_shown_across_restart<A, K: Sink>(
    resolver: &mut Resolver,
    sink: &mut K,
    held: &mut held::Held,
    unconfirmed: &mut Unconfirmed<A>,
) -> Result<(), PipelineError> {
    let Some(xids) = held.waiting_across_restart() else {
        return Ok(());
    };
    if resolver.check_visible_xids(xids).await? != Visibility::Visible {
        return Ok(());
    }
    if let Some(flush) = held.shown_across_restart() {
        sink.apply(&[flush], None).await?;
        unconfirmed.made += 1;
    }
    Ok(())
}

/// Once `published` (the position just published for confirmation, with
/// its generation) is confirmed, the daemon's part of a synchronous
/// standby's wait is released for the transactions it covers (a batch may
/// end with the start of one whose commit a later batch confirms); once
/// their commits show, readers that filled the old rows in between lose
/// them, and the position is recorded. If the position is replaced
/// meanwhile, they are given up (see [`Current`]).
async fn release_held<A: Copy, K: Sink>(
    resolver: &mut Resolver,
    sink: &mut K,
    held: &mut held::Held,
    unconfirmed: &mut Unconfirmed<A>,
    current: &mut Current,
    (generation, published): (u64, A),
    recorded: fn(A) -> Option<Lsn>,
) -> Result<(), PipelineError> {
    if held.is_empty() || generation != held.generation() {
        return Ok(());
    }
    let Some(confirmed) = recorded(published) else {
        return Ok(());
    };
    let due = held.take_due(confirmed);
    if due.is_empty() {
        return Ok(());
    }
    let Some(visible) = current
        .unless_replaced(generation, resolver.wait_visible(&due.xids))
        .await
    else {
        held.clear();
        resolver.forget_server();
        return Ok(());
    };
    visible?;
    let record = Some(confirmed).filter(|_| held.is_empty());
    if !due.flushes.is_empty() {
        sink.apply(&due.flushes, None).await?;
        unconfirmed.made += 1;
    }
    sink.delete_again(&due.again, Again::All, record).await?;
    unconfirmed.made += 1;
    Ok(())
}
