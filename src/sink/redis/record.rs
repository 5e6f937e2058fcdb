//! What one Redis target applied, as it records it beside its cache (see
//! [`crate::redis::position`] for the record's key and protocol), and what
//! the record a new one replaced says about writes Redis lost.

use std::sync::Arc;

use redis::RedisError;

use super::RedisSink;
use crate::error::{self, Pace, Retry};
use crate::lsn::Lsn;
use crate::ops::{CacheOp, Item};
use crate::redis::position::{self, key, lost_writes};
use crate::sink::SinkError;
use crate::telemetry::metrics as m;

/// The sink's record of what it applied, and what the record it replaces
/// says about writes Redis lost (see the module doc).
#[derive(Debug)]
pub struct Record {
    /// Where it is kept.
    key: String,
    /// The record this daemon wrote last (or found at start).
    last: Option<Lsn>,
    /// It counts applied batches instead of holding a stream position.
    counting: bool,
    /// The flush of every rule's keys, for when Redis lost writes.
    flush_all: CacheOp,
    /// Redis lost writes and the flush has not completed yet.
    flush_due: bool,
}

impl Record {
    /// The applied position of `slot`.
    pub fn position(slot: &str, flush_all: CacheOp) -> Record {
        Record {
            key: key(slot),
            last: None,
            counting: false,
            flush_all,
            flush_due: false,
        }
    }

    /// A count of applied batches at `key` (a source without a stream
    /// position: the outbox).
    pub fn batches(key: String, flush_all: CacheOp) -> Record {
        Record {
            key,
            last: None,
            counting: true,
            flush_all,
            flush_due: false,
        }
    }

    /// Where it is kept.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The record found in Redis at start.
    pub fn found(&mut self, found: Option<Lsn>) {
        self.last = found;
    }

    /// What a batch records: `applied`, or when counting and the batch
    /// changes keys, the next count.
    pub fn next(&self, applied: Option<Lsn>, changes_keys: bool) -> Option<Lsn> {
        match (self.counting, applied) {
            (true, None) if changes_keys => Some(Lsn(self.last.map_or(1, |l| l.0 + 1))),
            _ => applied,
        }
    }

    /// Takes the record that writing `applied` replaced (or that the idle
    /// check read: `applied` is `None`); `true` the first time it shows that
    /// writes were lost (see [`lost_writes`]): a flush is then due.
    pub fn replaced(&mut self, replaced: Option<&str>, applied: Option<Lsn>) -> bool {
        let lost = lost_writes(self.last, replaced) && !self.flush_due;
        self.flush_due |= lost;
        if applied.is_some() {
            self.last = applied;
        }
        lost
    }

    /// The record this daemon wrote last.
    pub fn last(&self) -> Option<Lsn> {
        self.last
    }

    /// The flush that is due, if writes were lost.
    pub fn due(&self) -> Option<&CacheOp> {
        self.flush_due.then_some(&self.flush_all)
    }

    /// The due flush was applied.
    pub fn flushed(&mut self) {
        self.flush_due = false;
    }
}

/// The record as the sink keeps it: set up, read at start, compared with
/// every batch's reply, and the flush when Redis lost writes.
impl RedisSink {
    /// Records the applied position of `slot` with every acknowledged
    /// batch (see [`position`]), and flushes with `flush_all` (every rule's
    /// keys) when a record shows that Redis lost writes since the last one.
    pub fn record_position_of(&mut self, slot: &str, flush_all: CacheOp) {
        self.record = Some(Record::position(slot, flush_all));
    }

    /// Records a count of applied batches at `key` with every batch, for a
    /// source without a stream position (the outbox), so that a Redis that
    /// loses writes while the daemon runs is noticed and flushed with
    /// `flush_all` as with [`RedisSink::record_position_of`]. The count goes
    /// on from the record found at start.
    /// Returns the record found (`None`: Redis holds none).
    pub async fn record_batches_at(
        &mut self,
        key: &str,
        flush_all: CacheOp,
    ) -> Result<Option<Lsn>, SinkError> {
        self.record = Some(Record::batches(key.to_string(), flush_all));
        self.read_record(key).await
    }

    /// The position recorded for `slot`, retried like a batch.
    pub async fn recorded_position(&mut self, slot: &str) -> Result<Option<Lsn>, SinkError> {
        self.read_record(&position::key(slot)).await
    }

    /// The record at `key`, retried like a batch; it is also the last one
    /// this daemon knows of (see [`position::lost_writes`]).
    async fn read_record(&mut self, key: &str) -> Result<Option<Lsn>, SinkError> {
        let mut retry = Retry::finishing(&Pace::REDIS, &self.cancel);
        loop {
            match position::read(&mut self.conn, key).await {
                Ok(lsn) => {
                    if let Some(record) = self.record.as_mut().filter(|r| r.key() == key) {
                        record.found(lsn);
                    }
                    return Ok(lsn);
                }
                Err(error) => {
                    let delay = retry.after(&error, error::redis(&error))?;
                    tracing::warn!(error = %error, retry_in = ?delay, "cannot read the recorded position from redis; retrying");
                    retry.sleep(delay).await?;
                }
            }
        }
    }

    /// Compares the record a new one replaced with the one this daemon
    /// wrote last; `applied` is now the last.
    pub(super) fn check_record(&mut self, replaced: Option<&str>, applied: Option<Lsn>) {
        let Some(record) = self.record.as_mut() else {
            return;
        };
        let expected = record.last().unwrap_or_default();
        if record.replaced(replaced, applied) {
            metrics::counter!(m::REDIS_LOST_WRITES_TOTAL).increment(1);
            tracing::error!(
                recorded_lsn = replaced.unwrap_or("none"),
                expected_lsn = %expected,
                "redis lost writes (restarted from an older snapshot, emptied, or failed over to a replica that missed them): values deleted since may be back; flushing every key of every rule"
            );
        }
    }

    /// Flushes every rule's keys once Redis was found to have lost writes:
    /// the record is removed first, so a daemon stopped before the flush
    /// completes flushes at its next start (no record), and written again
    /// after.
    pub(super) async fn flush_if_writes_lost(
        &mut self,
        applied: Option<Lsn>,
    ) -> Result<(), RedisError> {
        let Some(record) = &self.record else {
            return Ok(());
        };
        let Some(flush) = record.due().cloned() else {
            return Ok(());
        };
        let (key, last) = (record.key().to_string(), record.last());
        redis::cmd("DEL")
            .arg(&key)
            .query_async::<()>(&mut self.conn)
            .await?;
        let item = Item {
            op: flush,
            lsn: applied.unwrap_or_default(),
            commit_time: Arc::from(""),
            commit_micros: 0,
            seq: 0,
            xid: 0,
        };
        self.apply_flush(&item).await?;
        if let Some(lsn) = last {
            position::record(&key, lsn)
                .query_async::<()>(&mut self.conn)
                .await?;
        }
        if let Some(record) = self.record.as_mut() {
            record.flushed();
        }
        Ok(())
    }
}
