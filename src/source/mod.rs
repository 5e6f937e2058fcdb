//! Source: where changes come from, behind one trait the apply loop reads.
//!
//! - [`replication`] (the default): a logical replication slot with
//!   `pgoutput`; its acknowledgement is an LSN confirmed to the server.
//! - [`outbox`]: rows written by triggers, for databases without
//!   replication; its acknowledgement is a claim of outbox rows, deleted
//!   once Redis has applied them.
//!
//! Both turn what they read into the neutral [`crate::change`] model, so
//! the planner never sees a wire format. `install` modules hold the SQL
//! `setup` and `teardown` run for each.

pub(crate) mod install;
pub mod outbox;
pub mod replication;
pub(crate) mod walk;

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::change::Change;
use crate::error::Fatal;
use crate::lsn::Lsn;

/// A transaction as the source announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Txn {
    /// Its transaction id (32 bits, as pgoutput sends it), when a refresh
    /// query must wait until it is visible; 0 when it already is.
    pub xid: u32,
    /// The LSN events name it by (its commit record's).
    pub lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time_micros: i64,
    /// The position every operation of it is versioned by, when the source
    /// fixes one (outbox rows: the row id, because several drainers
    /// interleave rows); `None` numbers operations in order.
    pub fixed_seq: Option<u32>,
}

/// What a source delivers, in order.
#[derive(Debug)]
pub enum Event<A> {
    /// A new session started. A transaction that was open is re-sent whole.
    Restarted,
    /// A transaction begins.
    Begin(Txn),
    /// A change inside the open transaction.
    Change(Change),
    /// The open transaction ends; `ack` (if any) may be confirmed once it
    /// and everything before it is applied.
    Commit {
        /// What to confirm.
        ack: Option<A>,
    },
    /// A position safe to confirm when no transaction is open and
    /// everything before it is applied (a keepalive, the end of a claim).
    Position(A),
    /// One of our heartbeat messages arrived.
    Heartbeat {
        /// When it was written, Unix microseconds.
        sent_unix_micros: i64,
    },
    /// The stream's position is gone (slot dropped or invalidated):
    /// changes were missed. The loop calls [`Source::recover`] and flushes.
    PositionLost {
        /// What the server said.
        reason: String,
    },
}

/// A change stream the apply loop reads. Transient failures are retried
/// inside the source; only fatal ones come out of [`Source::next`].
pub trait Source {
    /// What is confirmed back once everything before it is applied.
    type Ack: Copy
        + Default
        + PartialOrd
        + Send
        + Sync
        + std::fmt::Debug
        + std::fmt::Display
        + 'static;

    /// The next event. Cancel-safe: dropping the future loses no event.
    fn next(&mut self) -> impl Future<Output = Result<Event<Self::Ack>, Fatal>> + Send;

    /// Everything up to `ack` is applied: Redis acknowledged it.
    fn confirm(&mut self, ack: Self::Ack);

    /// Rebuilds a lost position (recreates the slot): where the new one
    /// starts (`Self::Ack::default()` when it has none to tell), or `None`
    /// if `cancel` fired first. Confirmations made before are forgotten.
    fn recover(
        &mut self,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Option<Self::Ack>> + Send;

    /// Once a second: update gauges such as the lag.
    fn tick(&self) {}

    /// The LSN an acknowledgement stands for, recorded in Redis beside the
    /// cache (see [`crate::redis::position`]); `None` for sources whose
    /// position is not a stream position.
    fn recorded(_ack: Self::Ack) -> Option<Lsn> {
        None
    }

    /// Reports the last confirmation (bounded wait) and ends the session.
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}
