//! What a Redis target does before its first step: find its record of
//! what it applied (see [`super::position`]) and flush every rule key when
//! that record cannot show the cache has seen every change the source has
//! skipped. The same for one `[redis]` and for each of `[[targets]]`, which
//! run it in their own task (see [`super::fanout`]).

use std::sync::Arc;

use super::{RedisSink, SinkError};
use crate::lsn::Lsn;
use crate::ops::{CacheOp, Item};
use crate::redis::position;

/// Where the source keeps what it confirmed, as the target must compare it.
#[derive(Debug, Clone)]
pub enum Recorded {
    /// A replication slot, and the position it confirmed at start (`None`:
    /// the slot is missing or lost; the stream recreates it and flushes).
    Slot {
        /// The slot's name (names the record).
        slot: String,
        /// `confirmed_flush_lsn` when the daemon started.
        confirmed: Option<Lsn>,
    },
    /// The outbox: a count of applied batches at `key`.
    Outbox {
        /// The record's key.
        key: String,
    },
}

/// Makes `sink` record what it applies, and flushes every rule key
/// (`flush_all`) before anything is applied when Redis holds no proof that
/// the cache has seen every change the source has skipped: no recorded
/// position, or one behind the slot's confirmed position (the slot was
/// dropped and created again while the daemon was stopped, Redis came back
/// from an older snapshot, or this target was down when the others went
/// on); for the outbox, no record (`setup` writes one).
pub async fn prepare(
    sink: &mut RedisSink,
    recorded: &Recorded,
    flush_all: &CacheOp,
) -> Result<(), SinkError> {
    match recorded {
        Recorded::Slot { slot, confirmed } => {
            sink.record_position_of(slot, flush_all.clone());
            let Some(confirmed) = *confirmed else {
                return Ok(());
            };
            let found = sink.recorded_position(slot).await?;
            if position::covers(found, confirmed) {
                return Ok(());
            }
            match found {
                None => tracing::warn!(slot, confirmed_lsn = %confirmed,
                    "redis holds no record of the applied position (a new or emptied redis, or setup --print run by hand): flushing every key of every rule once before streaming"),
                Some(found) => {
                    tracing::error!(slot, recorded_lsn = %found, confirmed_lsn = %confirmed,
                    "redis's applied position is behind the slot (a slot created anew, or redis restored from an older snapshot): changes may have been missed; flushing every key of every rule before streaming")
                }
            }
            flush_all_now(sink, flush_all, confirmed).await
        }
        Recorded::Outbox { key } => {
            let found = sink.record_batches_at(key, flush_all.clone()).await?;
            if found.is_some() {
                return Ok(());
            }
            tracing::warn!("redis holds no record of the outbox's applied batches (an emptied redis, or a flush cut short): flushing every key of every rule once before draining");
            flush_all_now(sink, flush_all, Lsn::ZERO).await
        }
    }
}

/// Flushes every rule key and records `applied` (a counting source, the
/// outbox, passes 0/0 and records its next count instead).
async fn flush_all_now(
    sink: &mut RedisSink,
    flush_all: &CacheOp,
    applied: Lsn,
) -> Result<(), SinkError> {
    let flush = Item {
        op: flush_all.clone(),
        lsn: applied,
        commit_time: Arc::from(""),
        commit_micros: 0,
        seq: 0,
        xid: 0,
    };
    let record = Some(applied).filter(|lsn| *lsn != Lsn::ZERO);
    sink.apply(&[flush], record).await?;
    metrics::counter!(crate::telemetry::metrics::STARTUP_FLUSHES_TOTAL).increment(1);
    Ok(())
}
