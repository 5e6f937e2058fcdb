//! Source: where changes come from.
//!
//! `replication` (a logical slot with `pgoutput`, the default) and
//! `outbox` (trigger-fed rows, for databases without replication). Both
//! feed the same planner and Redis sink.

pub mod outbox;
pub mod replication;
