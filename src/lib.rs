//! pg-cache-invalidator keeps Redis caches true to PostgreSQL.
//!
//! It reads the database's change stream (a logical replication slot with
//! `pgoutput`, or a trigger-fed outbox where replication is not available)
//! and, for every committed change to a watched table, deletes or rewrites
//! exactly the Redis keys that depend on that row, then announces it on
//! Redis pub/sub.
//!
//! ```text
//! Postgres ──▶ source ──▶ decode ──▶ plan ──▶ sink ──▶ ack
//!  (pgoutput   (source/)   (decode/:  (plan,    (sink/    (confirmed LSN back
//!   or outbox)             pgoutput,  rules/)   redis)    to the slot, or the
//!                          to_jsonb)                      outbox rows deleted)
//! ```
//!
//! # Delivery guarantee
//!
//! At least once, in commit order. The slot's confirmed LSN advances only
//! after Redis acknowledged every command of everything before it, so a
//! crash, a kill -9, a Redis outage or a Postgres restart at any moment loses
//! no invalidation; a restart replays from the last confirmation, which
//! repeats some deletions and events (harmless: deletion is idempotent and
//! subscribers must tolerate duplicates).

pub mod config;
pub mod db;
pub mod decode;
pub mod duration;
pub mod heartbeat;
pub mod lsn;
pub mod pipeline;
pub mod plan;
pub mod rules;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod tls;
