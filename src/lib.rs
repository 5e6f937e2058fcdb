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

// The library exports only what the binary, `bench/` and the integration
// tests use; everything else is the crate's own. Its docs are read with
// `cargo doc --document-private-items`, so they link to private items.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod app;
pub mod change;
pub mod cli;
pub mod config;
pub mod db;
pub(crate) mod decode;
pub(crate) mod duration;
pub(crate) mod error;
pub(crate) mod freshness;
pub(crate) mod memory;
pub mod ops;
pub(crate) mod pipeline;
pub mod plan;
pub(crate) mod redis;
pub(crate) mod resolve;
pub(crate) mod secret;
pub(crate) mod sink;
pub mod source;
pub(crate) mod sql;
pub mod telemetry;
pub(crate) mod tls;
pub(crate) mod verify;

/// What the daemon and the app clients agree on (the `pgci-protocol`
/// crate): `pg_lsn`, and the lease protocol.
pub use pgci_protocol::{lease, lsn};
