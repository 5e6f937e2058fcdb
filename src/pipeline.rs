//! The apply loop: source → decode → plan → sink → ack.
//!
//! ```text
//!  source.next() ─▶ decode ─▶ plan ─▶ pending Batch ─(channel, 2 deep)─▶ sink task
//!        ▲                                                                  │
//!        └──────────── confirm(lsn) ◀──── ack watch (applied LSN) ◀─────────┘
//! ```
//!
//! Reading and applying overlap: while the sink task waits for Redis, the
//! loop keeps decoding into the next batch, so a batch grows exactly as
//! large as the Redis round-trip lets it (up to [`MAX_BATCH_ITEMS`]). A
//! batch carries the end LSN of the last transaction it completes; the sink
//! applies batches strictly in order and publishes that LSN only after Redis
//! acknowledged everything, and only then is it confirmed to the server.
//! A keepalive's position is confirmed the same way, when no transaction is
//! open, so writes to unwatched tables never make the slot retain WAL.
//!
//! A large transaction does not have to fit in memory: once the pending
//! batch is full it is applied without an acknowledgement, and the
//! transaction's commit confirms it later. That is safe because pgoutput v1
//! sends only committed transactions.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::db::{self, setup, ConnInfo, Db};
use crate::decode::pgoutput::{self, DecodeError, Message};
use crate::decode::time::pg_micros_to_rfc3339;
use crate::lsn::Lsn;
use crate::plan::{CacheOp, Op, PlanError, Planner};
use crate::sink::redis::{RedisSink, SinkError};
use crate::sink::{Batch, Item};
use crate::source::replication::{FatalSourceError, ReplicationSource, SourceEvent};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;
use crate::telemetry::systemd;

/// Most operations in one batch: bounds memory (a few hundred bytes each)
/// and the size of one Redis pipeline, while being large enough that a
/// backlog drains in few round-trips.
pub const MAX_BATCH_ITEMS: usize = 4096;
/// Batches queued for the sink besides the one it applies: one is enough to
/// keep Redis busy while the next fills.
const QUEUED_BATCHES: usize = 1;
/// How often the loop proves it is alive (liveness, systemd watchdog) and
/// updates the lag gauge, even when the stream is idle.
const TICK: Duration = Duration::from_secs(1);

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The stream cannot continue.
    #[error(transparent)]
    Source(#[from] FatalSourceError),
    /// A message could not be decoded.
    #[error("cannot decode the change stream: {0}")]
    Decode(#[from] DecodeError),
    /// A change could not be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Redis could not be written before shutdown.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The sink task ended unexpectedly.
    #[error("the redis sink task ended unexpectedly")]
    SinkGone,
}

/// The transaction being read.
struct OpenTxn {
    xid: u32,
    lsn: Lsn,
    commit_time: Arc<str>,
    commit_micros: i64,
    /// Operations planned so far in this transaction (versions them).
    seq: u32,
}

/// What it takes to rebuild a lost slot.
pub struct SlotKeeper {
    /// Where the slot lives.
    pub conn: ConnInfo,
    /// Its name.
    pub slot: String,
}

impl SlotKeeper {
    /// Recreates the slot, retrying until it works or shutdown is asked.
    async fn recreate(&self, shutdown: &watch::Receiver<bool>) -> bool {
        let mut delay = Duration::from_millis(200);
        loop {
            let result = match Db::connect(&self.conn).await {
                Ok(db) => setup::recreate_slot(&db, &self.slot).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => return true,
                Err(error) if !*shutdown.borrow() => {
                    tracing::warn!(error = %error, retry_in = ?delay, "cannot recreate the replication slot; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(_) => return false,
            }
        }
    }
}

/// Decoding state between events.
struct Stream {
    planner: Planner,
    pending: Batch,
    txn: Option<OpenTxn>,
    /// Highest ack already handed to the sink or pending.
    queued_ack: Lsn,
    /// Bumped when the slot is recreated (see [`Batch::generation`]).
    generation: u64,
    /// Whether systemd was told we are ready.
    announced_ready: bool,
    /// Reused buffer for the operations one change plans.
    scratch: Vec<CacheOp>,
    /// Where column types are read from.
    types_conn: ConnInfo,
    /// A regular connection for type look-ups, opened when first needed.
    types_db: Option<Db>,
}

impl Stream {
    /// The pending batch should go to the sink now.
    fn ready(&self) -> bool {
        self.pending.ack.is_some() || self.pending.items.len() >= MAX_BATCH_ITEMS
    }

    /// Reading must pause until the sink takes the pending batch.
    fn full(&self) -> bool {
        self.pending.items.len() >= MAX_BATCH_ITEMS
    }

    fn take(&mut self) -> Batch {
        let mut batch = std::mem::take(&mut self.pending);
        batch.generation = self.generation;
        batch
    }

    fn set_ack(&mut self, lsn: Lsn) {
        if lsn > self.queued_ack {
            self.queued_ack = lsn;
            self.pending.ack = Some(lsn);
        }
    }

    fn push(&mut self, op: CacheOp) {
        let (lsn, commit_time, commit_micros, seq, xid) = match &mut self.txn {
            Some(txn) => {
                txn.seq += 1;
                (
                    txn.lsn,
                    Arc::clone(&txn.commit_time),
                    txn.commit_micros,
                    txn.seq,
                    txn.xid,
                )
            }
            None => (Lsn::ZERO, Arc::from(""), 0, 0, 0),
        };
        self.pending.items.push(Item {
            op,
            lsn,
            commit_time,
            commit_micros,
            seq,
            xid,
        });
    }

    /// Handles one event; returns the reason if the slot was lost.
    async fn handle(&mut self, event: SourceEvent) -> Result<Option<String>, PipelineError> {
        match event {
            SourceEvent::Restarted => {
                self.txn = None;
                if !self.announced_ready {
                    self.announced_ready = true;
                    systemd::ready();
                }
            }
            SourceEvent::SlotLost { reason } => return Ok(Some(reason)),
            SourceEvent::Heartbeat { sent_unix_micros } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                let rtt = (now - sent_unix_micros as f64 / 1e6).max(0.0);
                metrics::gauge!(m::HEARTBEAT_RTT_SECONDS).set(rtt);
                metrics::gauge!(m::LAST_HEARTBEAT_TIMESTAMP_SECONDS).set(now);
            }
            SourceEvent::Begin {
                xid,
                commit_lsn,
                commit_time_micros,
            } => {
                self.txn = Some(OpenTxn {
                    xid,
                    lsn: commit_lsn,
                    commit_time: Arc::from(pg_micros_to_rfc3339(commit_time_micros)),
                    commit_micros: commit_time_micros,
                    seq: 0,
                });
            }
            SourceEvent::Commit { end_lsn } => {
                self.txn = None;
                self.set_ack(end_lsn);
            }
            SourceEvent::KeepAlive { wal_end } => {
                if self.txn.is_none() {
                    self.set_ack(wal_end);
                }
            }
            SourceEvent::Change(data) => self.change(&pgoutput::decode(&data)?).await?,
        }
        Ok(None)
    }

    /// The slot was recreated: acks of the old slot must not be confirmed
    /// to the new one, and every key is flushed (after everything already
    /// read, which the sink applies first).
    fn reset_after_slot_loss(&mut self) {
        self.generation += 1;
        self.queued_ack = Lsn::ZERO;
        self.txn = None;
        let flush = self.planner.plan_flush_all();
        self.push(flush);
    }

    async fn change(&mut self, message: &Message) -> Result<(), PipelineError> {
        let mut planned = std::mem::take(&mut self.scratch);
        match message {
            Message::Relation(relation) => {
                self.load_types(relation).await;
                self.planner.on_relation(relation)?;
            }
            Message::Insert { relation, new } => {
                self.planner
                    .plan_row(*relation, Op::Insert, None, Some(new), &mut planned)?;
            }
            Message::Update { relation, old, new } => self.planner.plan_row(
                *relation,
                Op::Update,
                old.as_ref().map(|(_, tuple)| tuple),
                Some(new),
                &mut planned,
            )?,
            Message::Delete { relation, old } => {
                self.planner
                    .plan_row(*relation, Op::Delete, Some(&old.1), None, &mut planned)?;
            }
            Message::Truncate { relations, .. } => {
                for oid in relations {
                    if let Some(op) = self.planner.plan_truncate(*oid)? {
                        planned.push(op);
                    }
                }
            }
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Origin { .. }
            | Message::Type { .. }
            | Message::LogicalMessage { .. } => {}
        }
        for op in planned.drain(..) {
            self.push(op);
        }
        self.scratch = planned;
        Ok(())
    }

    /// Loads the column types refresh rules need for `relation`. On
    /// failure the rows of unknown types are deleted instead of written
    /// (the encoder refuses them), which is safe; the next Relation
    /// message retries.
    async fn load_types(&mut self, relation: &pgoutput::Relation) {
        let missing = self.planner.missing_types(relation);
        if missing.is_empty() {
            return;
        }
        if self.types_db.is_none() {
            match Db::connect(&self.types_conn).await {
                Ok(db) => self.types_db = Some(db),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot load column types; rows of those types will be deleted instead of refreshed");
                    return;
                }
            }
        }
        if let Some(db) = &self.types_db {
            if let Err(error) = db::types::load_types(db, self.planner.types_mut(), missing).await {
                tracing::warn!(error = %error, "cannot load column types; rows of those types will be deleted instead of refreshed");
                self.types_db = None;
            }
        }
    }
}

/// Runs until `shutdown` turns true or a fatal error; then applies what was
/// read, confirms it, and ends the replication session.
pub async fn run(
    mut source: ReplicationSource,
    sink: RedisSink,
    planner: Planner,
    keeper: SlotKeeper,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(QUEUED_BATCHES);
    let (ack_tx, mut ack_rx) = watch::channel((0u64, Lsn::ZERO));
    let sink_task = tokio::spawn(apply_batches(sink, batch_rx, ack_tx));
    let mut stream = Stream {
        planner,
        pending: Batch::default(),
        txn: None,
        queued_ack: Lsn::ZERO,
        generation: 0,
        announced_ready: false,
        scratch: Vec::new(),
        types_conn: keeper.conn.clone(),
        types_db: None,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick();

    let outcome = loop {
        tokio::select! {
            biased;
            // 1. Shutdown: stop reading; what was read is applied below.
            _ = shutdown.changed() => break Ok(()),
            // 2. The sink applied a batch: confirm its LSN to the server
            //    (unless it belongs to a slot that has since been replaced).
            changed = ack_rx.changed() => {
                if changed.is_err() {
                    break Err(PipelineError::SinkGone);
                }
                let (generation, applied) = *ack_rx.borrow_and_update();
                if generation == stream.generation {
                    source.confirm(applied);
                    metrics::gauge!(m::CONFIRMED_LSN_BYTES).set(applied.0 as f64);
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
                if let Some(end) = source.server_wal_end() {
                    let lag = end.0.saturating_sub(source.confirmed().0);
                    metrics::gauge!(m::REPLICATION_LAG_BYTES).set(lag as f64);
                }
            }
            // 5. New WAL or a keepalive, unless the pending batch is full.
            event = source.next(), if !stream.full() => match event {
                Ok(event) => match stream.handle(event).await {
                    Ok(None) => {}
                    Ok(Some(reason)) => {
                        // Recreate the slot first, then flush: a change
                        // committed after the flush is then in the new slot.
                        if !keeper.recreate(&shutdown).await {
                            break Ok(());
                        }
                        source.reset_confirmed();
                        stream.reset_after_slot_loss();
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
    outcome?;
    sink_result.map_err(PipelineError::from)
}

/// The sink task: applies batches in order and publishes each batch's ack
/// after Redis acknowledged it.
async fn apply_batches(
    mut sink: RedisSink,
    mut batches: mpsc::Receiver<Batch>,
    ack: watch::Sender<(u64, Lsn)>,
) -> Result<(), SinkError> {
    let mut last_report = tokio::time::Instant::now();
    let mut reported = sink.stats();
    while let Some(batch) = batches.recv().await {
        sink.apply(&batch).await?;
        if let Some(lsn) = batch.ack {
            ack.send_replace((batch.generation, lsn));
        }
        if last_report.elapsed() >= std::time::Duration::from_secs(10) {
            let now = sink.stats();
            if now.operations != reported.operations {
                tracing::info!(
                    changes = now.operations - reported.operations,
                    keys = now.keys - reported.keys,
                    batches = now.batches - reported.batches,
                    retries = now.retries - reported.retries,
                    applied_lsn = %ack.borrow().1,
                    "progress"
                );
            }
            reported = now;
            last_report = tokio::time::Instant::now();
        }
    }
    Ok(())
}
