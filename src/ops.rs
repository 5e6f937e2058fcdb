//! The sink's contract: the cache operations the planner produces and the
//! sink applies, each with the transaction it came from.
//!
//! This module depends on nothing but [`crate::lsn`], so the sink can be
//! read (and replaced) without knowing how changes are decoded or planned.

use std::sync::Arc;

use crate::lsn::Lsn;

/// The kind of change, as named in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// INSERT
    Insert,
    /// UPDATE
    Update,
    /// DELETE
    Delete,
}

impl Op {
    /// The lowercase name used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// Work for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOp {
    /// Remove these keys (one row change).
    Invalidate {
        /// `schema.table`.
        table: Arc<str>,
        /// The change.
        op: Op,
        /// The rendered keys, without duplicates.
        keys: Vec<String>,
    },
    /// Write a row's JSON to `set` (when it could be encoded) and delete
    /// `del` (keys the row moved away from, or could not be written).
    Refresh {
        /// `schema.table`.
        table: Arc<str>,
        /// The change.
        op: Op,
        /// Keys to set to `value`.
        set: Vec<String>,
        /// Keys to delete.
        del: Vec<String>,
        /// The row as JSON; `None` means delete `set` too.
        value: Option<Arc<str>>,
        /// Seconds the value lives.
        ttl_secs: u64,
    },
    /// Run a query and set `keys` to its answer (a NULL answer deletes).
    /// Resolved into a [`CacheOp::Refresh`] by [`crate::resolve`] before
    /// the sink sees it.
    Query {
        /// `schema.table`.
        table: Arc<str>,
        /// The change.
        op: Op,
        /// Keys rendered from the row the parameters came from.
        keys: Vec<String>,
        /// The statement (wrapped, see [`crate::plan::rules::RuleQuery`]).
        sql: Arc<str>,
        /// Text parameters, `None` for NULL.
        params: Vec<Option<String>>,
        /// Seconds the value lives.
        ttl_secs: u64,
    },
    /// Remove every key matching these patterns.
    Flush {
        /// `schema.table`, or `*` for every table.
        table: Arc<str>,
        /// `SCAN MATCH` patterns.
        patterns: Vec<String>,
        /// Why.
        reason: FlushReason,
    },
}

impl CacheOp {
    /// The table and the op named in events and metrics.
    pub fn names(&self) -> (&str, &'static str) {
        match self {
            CacheOp::Invalidate { table, op, .. }
            | CacheOp::Refresh { table, op, .. }
            | CacheOp::Query { table, op, .. } => (table, op.as_str()),
            CacheOp::Flush { table, reason, .. } => (table, reason.as_str()),
        }
    }
}

/// The keys one operation touches, borrowed: the one answer to "which
/// keys does this op touch" for the sink, the events, the second pass and
/// the held keys. A flush touches keys by pattern, not by name: none here.
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// Keys it deletes: an invalidation's or an unresolved query's keys, a
    /// refresh's keys moved away from, and its keys to write when its row
    /// could not be written (no value).
    pub deleted: [&'a [String]; 2],
    /// Keys it writes a value into (a refresh with a value).
    pub written: &'a [String],
}

impl<'a> Keys<'a> {
    /// Every key, in the order events list them (a refresh's keys to
    /// write first, then those it moved away from).
    pub fn all(&self) -> impl Iterator<Item = &'a String> + 'a {
        let (first, second) = match (self.written.is_empty(), self.deleted) {
            // A refresh without a value deletes its `set` keys (second
            // slice) too: keep them first, as with a value.
            (true, [del, set]) if !set.is_empty() => (set, del),
            (_, [del, _]) => (self.written, del),
        };
        first.iter().chain(second.iter())
    }

    /// The keys it deletes.
    pub fn deleted(&self) -> impl Iterator<Item = &'a String> + 'a {
        let [a, b] = self.deleted;
        a.iter().chain(b.iter())
    }

    /// How many keys it deletes and how many it writes.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.deleted[0].len() + self.deleted[1].len(),
            self.written.len(),
        )
    }
}

impl CacheOp {
    /// The keys it touches (see [`Keys`]).
    pub fn keys(&self) -> Keys<'_> {
        const NONE: &[String] = &[];
        match self {
            CacheOp::Invalidate { keys, .. } | CacheOp::Query { keys, .. } => Keys {
                deleted: [keys, NONE],
                written: NONE,
            },
            CacheOp::Refresh {
                set, del, value, ..
            } => match value {
                Some(_) => Keys {
                    deleted: [del, NONE],
                    written: set,
                },
                None => Keys {
                    deleted: [del, set],
                    written: NONE,
                },
            },
            CacheOp::Flush { .. } => Keys {
                deleted: [NONE, NONE],
                written: NONE,
            },
        }
    }
}

/// Why keys are flushed by pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// The table was truncated.
    Truncate,
    /// The slot was lost or dropped: changes were missed, every key goes.
    SlotReset,
    /// The catalog changed under the stream (a table left the publication,
    /// its replica identity changed): the table's changes may be missed.
    Drift,
    /// A synchronous commit held more keys to delete again than the
    /// daemon keeps: its tables' keys are flushed once it shows.
    HeldTooLarge,
    /// The operator ran `flush`.
    Operator,
    /// Commits that waited for another synchronous standby while the
    /// daemon restarted showed: the daemon before the restart had confirmed
    /// past them before their second deletion (see [`crate::pipeline`]).
    HeldAcrossRestart,
}

impl FlushReason {
    /// The op named in events.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Truncate => "truncate",
            FlushReason::SlotReset
            | FlushReason::Drift
            | FlushReason::HeldTooLarge
            | FlushReason::HeldAcrossRestart
            | FlushReason::Operator => "flush",
        }
    }
}

/// One cache operation with the transaction it came from.
#[derive(Debug, Clone)]
pub struct Item {
    /// What to do.
    pub op: CacheOp,
    /// The transaction's commit LSN (named in events).
    pub lsn: Lsn,
    /// The transaction's commit time, RFC 3339.
    pub commit_time: Arc<str>,
    /// The same, in microseconds since 2000-01-01 UTC (for latency).
    pub commit_micros: i64,
    /// Position within the transaction: with `lsn`, the version that keeps
    /// refreshed values from going backwards on a replay.
    pub seq: u32,
    /// The transaction id, when a query must wait until the transaction is
    /// visible to other sessions (see [`crate::resolve`]); 0 when it
    /// already is.
    pub xid: u32,
}

impl Item {
    /// The same transaction's invalidation of `keys` in place of this
    /// operation (the second pass and the held keys delete keys again);
    /// `None` for a flush, which names no keys, or when `keys` is empty.
    pub fn invalidating(&self, keys: Vec<String>) -> Option<Item> {
        let (table, op) = match &self.op {
            CacheOp::Invalidate { table, op, .. }
            | CacheOp::Refresh { table, op, .. }
            | CacheOp::Query { table, op, .. } => (table, *op),
            CacheOp::Flush { .. } => return None,
        };
        if keys.is_empty() {
            return None;
        }
        Some(Item {
            op: CacheOp::Invalidate {
                table: Arc::clone(table),
                op,
                keys,
            },
            lsn: self.lsn,
            commit_time: Arc::clone(&self.commit_time),
            commit_micros: self.commit_micros,
            seq: self.seq,
            xid: self.xid,
        })
    }

    /// Roughly the bytes it holds (keys, value, patterns), for bounding
    /// batches by memory as well as by count.
    pub fn weight(&self) -> usize {
        let strings = |v: &[String]| v.iter().map(|s| s.len() + 24).sum::<usize>();
        let keys: usize = self.op.keys().all().map(|s| s.len() + 24).sum();
        let op = match &self.op {
            CacheOp::Invalidate { .. } => keys,
            CacheOp::Refresh { value, .. } => keys + value.as_ref().map_or(0, |v| v.len()),
            CacheOp::Query { sql, params, .. } => {
                keys + sql.len()
                    + params
                        .iter()
                        .map(|p| p.as_ref().map_or(8, |p| p.len() + 24))
                        .sum::<usize>()
            }
            CacheOp::Flush { patterns, .. } => strings(patterns),
        };
        op + std::mem::size_of::<Item>()
    }

    /// The version refreshed keys are guarded by: commit LSN and position,
    /// fixed-width hex so that strings compare like numbers.
    pub fn version(&self) -> String {
        format!("{:016X}{:08X}", self.lsn.0, self.seq)
    }
}
