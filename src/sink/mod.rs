//! Sink: where cache operations are applied.
//!
//! The pipeline hands the sink [`Batch`]es in commit order; the sink
//! applies each completely (retrying as long as it takes) before the
//! batch's acknowledgement LSN may be confirmed to the source.

pub mod redis;

use std::sync::Arc;

use crate::lsn::Lsn;
use crate::plan::CacheOp;

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
    /// visible to other sessions (see `db::query`); 0 when it already is.
    pub xid: u32,
}

/// Operations to apply in order, and the LSN that may be confirmed once
/// they (and every batch before) are applied.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Operations in commit order.
    pub items: Vec<Item>,
    /// End of the last transaction (or keepalive) wholly inside this and
    /// earlier batches; `None` while a large transaction is still open.
    pub ack: Option<Lsn>,
    /// Which slot the ack belongs to: it changes when a lost slot is
    /// recreated, so acks for the old slot are not confirmed to the new one.
    pub generation: u64,
}
