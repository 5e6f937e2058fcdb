//! Source: where changes come from.
//!
//! Only `replication` (a logical slot with `pgoutput`) exists so far; the
//! outbox source will sit beside it and feed the same pipeline.

pub mod replication;
