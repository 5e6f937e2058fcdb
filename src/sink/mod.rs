//! Sink: where the pipeline's cache operations go, behind one trait.
//!
//! - [`Sink`]: what the apply loop drives (apply a batch, its second pass,
//!   idle checks, which steps every target acknowledged).
//! - [`redis`]: the Redis target ([`RedisSink`]: requests, scripts, events,
//!   the position record, retries, readiness).
//! - [`fanout`]: several Redis targets from one stream (`[[targets]]`).
//! - [`start`]: what a Redis target does before its first step.
//!
//! A new kind of target implements [`Sink`]; the pipeline and `app` are
//! generic over it. The Redis plumbing the target shares with the verbs and
//! the app-side client (cluster client, connections, leases, the position
//! record's key) is [`crate::redis`].

pub mod fanout;
pub mod redis;
pub mod start;

pub use self::redis::again::Again;
pub use self::redis::RedisSink;

use crate::error::{Fatal, GiveUp};
use crate::lsn::Lsn;
use crate::ops::Item;

/// Why the sink stopped.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The URL cannot be used.
    #[error(transparent)]
    BadUrl(#[from] crate::redis::BadUrl),
    /// Redis refuses us in a way retrying cannot fix.
    #[error("redis: {0}")]
    Fatal(Fatal),
    /// Shutdown was requested while Redis kept failing; the batch was not
    /// applied and will be replayed on the next start.
    #[error(
        "shutdown while redis was failing ({0}); unapplied changes will be replayed on restart"
    )]
    GaveUp(String),
}

impl From<GiveUp> for SinkError {
    fn from(stop: GiveUp) -> Self {
        match stop {
            GiveUp::Fatal(fatal) => SinkError::Fatal(fatal),
            GiveUp::PositionLost(why) | GiveUp::Shutdown(why) => SinkError::GaveUp(why),
        }
    }
}

/// Where the pipeline's operations go: one Redis ([`RedisSink`]) or
/// several ([`fanout::Fanout`], `[[targets]]`).
///
/// Each call of [`Sink::apply`] or [`Sink::delete_again`] is one *step*,
/// numbered from 1 in call order. A sink applies its steps in order, and
/// [`Sink::applied`] counts the steps every target has acknowledged: only
/// what those steps carry may be confirmed to the source. A sink that
/// applies before returning has applied every step it was given; one that
/// applies in the background says so through [`Sink::advanced`].
pub trait Sink: Send + 'static {
    /// Applies `items` and records `applied` as the position everything up
    /// to which is in the cache (see [`RedisSink::apply`]).
    fn apply(
        &mut self,
        items: &[Item],
        applied: Option<Lsn>,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// Applies `items`, the first pass of a batch whose commits are not
    /// known to be visible, without announcing them (see
    /// [`RedisSink::apply_unannounced`]); its second pass announces them.
    fn apply_unannounced(
        &mut self,
        items: &[Item],
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// The second deletion pass of `items`, which announces them (see
    /// [`RedisSink::delete_again`]).
    fn delete_again(
        &mut self,
        items: &[Item],
        scope: Again,
        applied: Option<Lsn>,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// Checks the targets while no batch flows (readiness, lost writes).
    fn check(&mut self) -> impl std::future::Future<Output = ()> + Send;

    /// Steps every target has applied.
    fn applied(&self) -> u64;

    /// Resolves when [`Sink::applied`] may have grown without a call (a
    /// target catching up), or with the error of a target that failed for
    /// good; never for a sink that applies before returning.
    fn advanced(&mut self) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// Waits until every target applied every step or gave up (at
    /// shutdown); returns the first error of a target that did not.
    fn finish(&mut self) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;

    /// Work applied so far.
    fn stats(&self) -> SinkStats;
}

/// Counters of applied work, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct SinkStats {
    /// Operations applied.
    pub operations: u64,
    /// Keys touched (counted per command, not per existing key).
    pub keys: u64,
    /// Batches applied.
    pub batches: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
}
