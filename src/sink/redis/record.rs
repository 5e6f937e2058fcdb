//! What one Redis target applied, as it records it beside its cache (see
//! [`crate::redis::position`] for the record's key and protocol), and what
//! the record a new one replaced says about writes Redis lost.

use crate::lsn::Lsn;
use crate::ops::CacheOp;
use crate::redis::position::{key, lost_writes};

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
