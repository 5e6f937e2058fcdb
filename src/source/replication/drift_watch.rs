//! What the apply loop does about drift (see [`super::drift`]): which keys
//! to flush when a watched table starts or stops being covered, and the
//! readiness that follows.
//!
//! Reports come from two places. The catalog check (with each heartbeat)
//! sees everything but only once a heartbeat; a Relation message shows a
//! changed replica identity before the first change made under it, so that
//! change's lost old keys are flushed in the same batch. The watch merges
//! both and answers with the flush operations to queue; the loop queues
//! them in order with everything else it read.

use std::sync::Arc;

use crate::change::{TableName, TableSchema};
use crate::ops::{CacheOp, FlushReason};
use crate::plan::Planner;
use crate::telemetry::health::Health;

use super::drift::{CatalogReport, Drifted};

/// Drift as the loop knows it between events.
pub struct DriftWatch {
    /// The last catalog report.
    catalog: Vec<Drifted>,
    /// Tables whose last description lacked key columns in its identity,
    /// and when that description was read.
    described: Vec<(Drifted, tokio::time::Instant)>,
    /// Partitioned tables: their descriptions carry the partitioned table's
    /// own identity, not the partitions' that decide what old rows hold, so
    /// only the catalog check judges them.
    partitioned: Vec<TableName>,
    /// Readiness reflects drift.
    health: Arc<Health>,
}

impl DriftWatch {
    /// A watch with nothing drifted; `partitioned` lists the watched tables
    /// that are partitioned.
    pub fn new(partitioned: Vec<TableName>, health: Arc<Health>) -> Self {
        DriftWatch {
            catalog: Vec::new(),
            described: Vec::new(),
            partitioned,
            health,
        }
    }

    /// Every drifted table, once.
    fn all(&self) -> Vec<Drifted> {
        let mut all = self.catalog.clone();
        for (d, _) in &self.described {
            if !all.iter().any(|a| a.table == d.table) {
                all.push(d.clone());
            }
        }
        all
    }

    /// Takes a catalog report; returns the flushes it calls for.
    pub fn on_catalog(&mut self, report: CatalogReport, planner: &Planner) -> Vec<CacheOp> {
        let before = self.all();
        // A table described as drifted before the check began, which the
        // check does not list, was put right since (the next change would
        // describe it again; readiness should not wait for one).
        let checked_at = tokio::time::Instant::from_std(report.checked_at);
        self.described.retain(|(d, seen)| {
            *seen >= checked_at || report.drifted.iter().any(|c| c.table == d.table)
        });
        self.catalog = report.drifted;
        let now = self.all();
        let mut flushes = self.changed(&before, &now, planner);
        // Left the publication and came back between two checks: whatever
        // changed in between was never streamed.
        for table in &report.rejoined {
            if now.iter().any(|d| &d.table == table) {
                continue;
            }
            tracing::error!(table = %table,
                "the watched table left the publication and came back since the last catalog check: its changes in between were not streamed; flushing its keys");
            flushes.extend(planner.plan_flush_table(table, FlushReason::Drift));
        }
        flushes
    }

    /// Compares a table's new description with what its rules need (after
    /// the planner bound them to it); returns the flushes it calls for.
    pub fn on_described(&mut self, schema: &TableSchema, planner: &Planner) -> Vec<CacheOp> {
        if self.partitioned.contains(&schema.name) {
            return Vec::new();
        }
        let gaps = planner.identity_gaps(schema);
        let unbound = planner.binding_problem(schema).map(str::to_string);
        let known = self
            .described
            .iter()
            .position(|(d, _)| d.table == schema.name);
        let before = self.all();
        match (gaps.is_empty() && unbound.is_none(), known) {
            (false, None) => self.described.push((Drifted {
                table: schema.name.clone(),
                reason: unbound.unwrap_or_else(|| format!(
                    "the stream describes table {} with a replica identity that does not carry column(s) {}, so deletes and key changes cannot be invalidated: run pg-cache-invalidator check-config for the ALTER TABLE … REPLICA IDENTITY to run, or pg-cache-invalidator setup",
                    schema.name,
                    gaps.join(", ")
                )),
            }, tokio::time::Instant::now())),
            (true, Some(i)) => {
                self.described.remove(i);
            }
            _ => return Vec::new(),
        }
        let now = self.all();
        self.changed(&before, &now, planner)
    }

    /// Flushes the keys of tables that drifted since `before` (their changes
    /// may not be streamed) and of tables that recovered (changes made
    /// while they drifted were missed).
    fn changed(&self, before: &[Drifted], now: &[Drifted], planner: &Planner) -> Vec<CacheOp> {
        let drifted = now
            .iter()
            .filter(|d| !before.iter().any(|b| b.table == d.table));
        let recovered = before
            .iter()
            .filter(|b| !now.iter().any(|d| d.table == b.table));
        for d in drifted.clone() {
            tracing::error!(table = %d.table, problem = %d.reason,
                "a watched table's changes may be missed; flushing its keys, not ready until fixed");
        }
        for b in recovered.clone() {
            tracing::warn!(table = %b.table,
                "the watched table is covered again; flushing its keys (changes in between were missed)");
        }
        self.health.set_drifted(!now.is_empty());
        drifted
            .chain(recovered)
            .filter_map(|d| planner.plan_flush_table(&d.table, FlushReason::Drift))
            .collect()
    }
}
