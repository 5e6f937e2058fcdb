//! What pg-cache-invalidator and the apps that read its cache agree on in
//! Redis, and nothing else: the lease functions app readers call
//! ([`lease`], loaded by [`functions`]), the daemon's applied-position
//! record that read-your-writes tokens are compared with ([`position`]),
//! the cache-tag marks a Next.js cache handler reads ([`tags`]), Redis
//! Cluster's hash-tag rule ([`keys`]), the
//! order of the invalidation events a subscriber checks ([`events`]), and
//! PostgreSQL's `pg_lsn` ([`lsn`]).
//!
//! The daemon and the Rust client (`pgci-client`) both depend on this
//! crate; the TypeScript client implements the same contract and its tests
//! check that its function library is byte for byte the one the daemon
//! loads.

pub mod events;
pub mod functions;
pub mod keys;
pub mod lease;
pub mod lsn;
pub mod position;
pub mod tags;
