//! pg-cache-invalidator keeps Redis caches true to PostgreSQL.
//!
//! It reads the database's change stream (a logical replication slot with
//! `pgoutput`, or a trigger-fed outbox where replication is not available)
//! and, for every committed change to a watched table, deletes or rewrites
//! exactly the Redis keys that depend on that row, then announces it on
//! Redis pub/sub.
//!
//! ```text
//! Postgres ─▶ source ─▶ decode ─▶ change ─▶ plan ─▶ resolve ─▶ sink ─▶ ack
//!  (pgoutput   (source/)  (decode/)  (change)  (plan/)  (resolve)  (sink/)  (source::confirm:
//!   or outbox)                                  ─ ops: the sink's contract ─   LSN to the slot, or
//!                                                                              outbox rows deleted)
//! ```
//!
//! The apply loop that drives it is [`pipeline`]; [`app`] starts it and the
//! tasks beside it; [`cli`] holds the commands. What to do about each
//! failure (retry, stop with a hint, or rebuild a lost slot) is decided in
//! one place, [`error`].
//!
//! # Delivery guarantee
//!
//! At least once, in commit order. The slot's confirmed LSN advances only
//! after Redis acknowledged every command of everything before it, so a
//! crash, a kill -9, a Redis outage or a Postgres restart at any moment loses
//! no invalidation; a restart replays from the last confirmation, which
//! repeats some deletions and events (harmless: deletion is idempotent and
//! subscribers must tolerate duplicates).

pub mod app;
pub mod change;
pub mod cli;
pub mod config;
pub mod db;
pub mod decode;
pub mod duration;
pub mod error;
pub mod memory;
pub mod ops;
pub mod pipeline;
pub mod plan;
pub mod redis;
pub mod resolve;
pub mod secret;
pub mod sink;
pub mod source;
pub mod sql;
pub mod telemetry;
pub mod tls;
pub mod verify;

/// What the daemon and the app clients agree on (the `pgci-protocol`
/// crate): `pg_lsn`, and the lease protocol.
pub use pgci_protocol::{lease, lsn};
