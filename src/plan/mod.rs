//! Plan: from a change to the cache operations it requires.
//!
//! ```text
//!  Change::Schema ─▶ bind (rules ↔ columns) ─▶ BoundTable per table id
//!  Change::Row    ─▶ keys::render_all (old and new row) ─▶ CacheOp
//!                    └ refresh rules: row_json::encode_row / query params
//!  Change::Truncate ─▶ CacheOp::Flush of the table's key patterns
//! ```
//!
//! The source describes each table before its rows ([`Change::Schema`]),
//! again on every replication session and after every ALTER TABLE; each
//! time the table's rules are bound anew ([`bind`]). A table the source
//! sends but no rule watches binds to nothing and is skipped.
//!
//! An UPDATE renders keys from the new row and, when the source has the
//! old row (a replica identity column changed, or REPLICA IDENTITY FULL),
//! from the old row too, so a moved key invalidates both places.
//!
//! `refresh` rules write the new row as `to_jsonb` would render it (see
//! [`row_json`]). If a cached column's value did not travel or cannot be
//! encoded, the key is deleted instead: the next read repopulates it, and
//! nothing wrong is ever cached. Query rules plan a query per distinct
//! parameter tuple (old and new row).

pub(crate) mod bind;
pub(crate) mod keys;
pub(crate) mod row_json;
pub mod rules;

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{Change, Row, RowOp, TableId, TableSchema};
use crate::decode::types::TypeCatalog;
use crate::ops::{CacheOp, FlushReason, Op};
use crate::telemetry::metrics::ROWS_NOT_CACHED_TOTAL;
use bind::{bind_table, BoundKind, BoundTable};
use keys::render_all;
use row_json::{encode_row, param_values};
use rules::{Action, RuleSet};

impl From<RowOp> for Op {
    fn from(op: RowOp) -> Op {
        match op {
            RowOp::Insert => Op::Insert,
            RowOp::Update => Op::Update,
            RowOp::Delete => Op::Delete,
        }
    }
}

/// A change the planner cannot handle safely: the daemon stops rather than
/// skip an invalidation.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A row change arrived for a table the source had not described.
    #[error(
        "the stream sent a change for relation {0} before describing it; this is a protocol error"
    )]
    UnknownRelation(u32),
    /// A rule uses a column the table no longer has (altered while running).
    #[error("table {table} no longer has column {column:?} used by key template {template:?}: every change to it flushes its keys until the column is back (a rolled-back migration) or the rule is fixed")]
    MissingColumn {
        /// `schema.table`.
        table: String,
        /// The missing column.
        column: String,
        /// The template that uses it.
        template: String,
    },
}

/// Counters the planner keeps for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlanStats {
    /// Keys not rendered because a placeholder column was NULL.
    pub null_keys_skipped: u64,
    /// Keys not rendered because a placeholder value did not travel.
    pub unavailable_keys_skipped: u64,
    /// Refreshed rows deleted instead of written (a value did not travel
    /// or could not be encoded).
    pub rows_not_cached: u64,
}

/// Turns changes into [`CacheOp`]s.
#[derive(Debug)]
pub struct Planner {
    rules: Arc<RuleSet>,
    /// Bound rules by table id; `None` for tables no rule watches.
    tables: HashMap<TableId, Option<BoundTable>>,
    /// Watched tables whose last description lacks a column a rule needs
    /// (renamed by a migration, perhaps rolled back later), with what is
    /// wrong: their keys cannot be rendered, so each change flushes the
    /// table's keys instead, until a description binds again.
    broken: HashMap<TableId, (String, CacheOp)>,
    stats: PlanStats,
    /// Column types, for encoding refreshed rows.
    types: TypeCatalog,
}

impl Planner {
    /// A planner for `rules`, with no table known yet.
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Planner {
            rules,
            tables: HashMap::new(),
            broken: HashMap::new(),
            stats: PlanStats::default(),
            types: TypeCatalog::default(),
        }
    }

    /// Column types of `schema` that refresh rules need and the catalog
    /// does not know yet; load them (see `db::types`) before planning.
    pub fn missing_types(&self, schema: &TableSchema) -> Vec<u32> {
        let refreshes = self
            .rules
            .rules_for(&schema.name.schema, &schema.name.name)
            .is_some_and(|(_, rules)| {
                rules
                    .iter()
                    .any(|r| r.action == Action::Refresh && r.query.is_none())
            });
        if !refreshes {
            return Vec::new();
        }
        self.types
            .missing(schema.columns.iter().map(|c| c.type_oid))
    }

    /// The key columns `schema`'s rules need in an old row that its
    /// described replica identity does not carry: a DELETE or a key change
    /// of such a table cannot be invalidated exactly. Empty when the source
    /// does not describe identities, or no rule watches the table.
    pub fn identity_gaps(&self, schema: &TableSchema) -> Vec<String> {
        let (Some(identity), Some((_, rules))) = (
            &schema.identity,
            self.rules.rules_for(&schema.name.schema, &schema.name.name),
        ) else {
            return Vec::new();
        };
        RuleSet::key_columns(rules)
            .into_iter()
            .filter(|c| !identity.contains(c))
            .collect()
    }

    /// The type catalog, to load missing types into.
    pub fn types_mut(&mut self) -> &mut TypeCatalog {
        &mut self.types
    }

    /// What has been skipped so far.
    pub fn stats(&self) -> PlanStats {
        self.stats
    }

    /// Plans one change into `out`.
    pub fn plan(&mut self, change: &Change, out: &mut Vec<CacheOp>) -> Result<(), PlanError> {
        match change {
            Change::Schema(schema) => self.on_schema(schema),
            Change::Row {
                table,
                op,
                old,
                new,
            } => self.plan_row(*table, *op, old.as_ref(), new.as_ref(), out),
            Change::Truncate { tables } => {
                for table in tables {
                    out.extend(self.plan_truncate(*table)?);
                }
                Ok(())
            }
        }
    }

    /// Binds the rules of a (re-)described table. A description that
    /// lacks a rule's column does not stop the stream (a restart would
    /// replay the same description for ever): the table counts as broken
    /// (see [`Planner::binding_problem`]) until a later description binds.
    pub fn on_schema(&mut self, schema: &TableSchema) -> Result<(), PlanError> {
        self.broken.remove(&schema.id);
        let bound = match self.rules.rules_for(&schema.name.schema, &schema.name.name) {
            None => None,
            Some((_, rules)) => match bind_table(schema, rules) {
                Ok(bound) => Some(bound),
                Err(error) => {
                    let flush = self
                        .plan_flush_table(&schema.name, FlushReason::Drift)
                        .unwrap_or_else(|| self.plan_flush_all());
                    self.broken.insert(schema.id, (error.to_string(), flush));
                    None
                }
            },
        };
        self.tables.insert(schema.id, bound);
        Ok(())
    }

    /// Why the rules of the table `schema` describes cannot render its
    /// keys, if they cannot.
    pub fn binding_problem(&self, schema: &TableSchema) -> Option<&str> {
        self.broken.get(&schema.id).map(|(why, _)| why.as_str())
    }

    fn table(&self, id: TableId) -> Result<Option<&BoundTable>, PlanError> {
        match self.tables.get(&id) {
            Some(bound) => Ok(bound.as_ref()),
            None => Err(PlanError::UnknownRelation(id)),
        }
    }

    /// Plans an INSERT, UPDATE or DELETE into `out`: nothing when no rule
    /// watches the table or no key could be rendered.
    pub fn plan_row(
        &mut self,
        id: TableId,
        op: RowOp,
        old: Option<&Row>,
        new: Option<&Row>,
        out: &mut Vec<CacheOp>,
    ) -> Result<(), PlanError> {
        let op = Op::from(op);
        let mut stats = self.stats;
        if let Some((_, flush)) = self.broken.get(&id) {
            out.push(flush.clone());
            return Ok(());
        }
        let Some(table) = self.table(id)? else {
            return Ok(());
        };
        let mut deleted = Vec::new();
        for rule in &table.rules {
            // Tag marks go whatever the action (pgci_protocol::tags).
            for row in [new, old].into_iter().flatten() {
                render_all(&rule.tags, row, &mut deleted, &mut stats);
            }
            match &rule.kind {
                BoundKind::Delete => {
                    for row in [new, old].into_iter().flatten() {
                        render_all(&rule.keys, row, &mut deleted, &mut stats);
                    }
                }
                BoundKind::RefreshRow { columns, ttl_secs } => {
                    let mut set = Vec::new();
                    let mut del = Vec::new();
                    if let Some(new) = new {
                        render_all(&rule.keys, new, &mut set, &mut stats);
                    }
                    if let Some(old) = old {
                        let mut old_keys = Vec::new();
                        render_all(&rule.keys, old, &mut old_keys, &mut stats);
                        del.extend(old_keys.into_iter().filter(|k| !set.contains(k)));
                    }
                    let value = match new {
                        Some(new) if !set.is_empty() => {
                            match encode_row(new, columns, &self.types) {
                                Ok(json) => Some(Arc::from(json)),
                                Err((column, reason)) => {
                                    stats.rows_not_cached += 1;
                                    metrics::counter!(ROWS_NOT_CACHED_TOTAL).increment(1);
                                    tracing::debug!(table = %table.name, column, reason = %reason,
                                        "row not cached; deleting its keys instead");
                                    None
                                }
                            }
                        }
                        _ => None,
                    };
                    if !set.is_empty() || !del.is_empty() {
                        out.push(CacheOp::Refresh {
                            table: Arc::clone(&table.name),
                            op,
                            set,
                            del,
                            value,
                            ttl_secs: *ttl_secs,
                        });
                    }
                }
                BoundKind::RefreshQuery {
                    sql,
                    params,
                    ttl_secs,
                } => {
                    let mut planned: Vec<Vec<Option<String>>> = Vec::new();
                    for row in [new, old].into_iter().flatten() {
                        let Some(values) = param_values(row, params) else {
                            stats.unavailable_keys_skipped += 1;
                            continue;
                        };
                        if planned.contains(&values) {
                            continue;
                        }
                        let mut keys = Vec::new();
                        render_all(&rule.keys, row, &mut keys, &mut stats);
                        if keys.is_empty() {
                            continue;
                        }
                        planned.push(values.clone());
                        out.push(CacheOp::Query {
                            table: Arc::clone(&table.name),
                            op,
                            keys,
                            sql: Arc::clone(sql),
                            params: values,
                            ttl_secs: *ttl_secs,
                        });
                    }
                }
            }
        }
        if !deleted.is_empty() {
            out.push(CacheOp::Invalidate {
                table: Arc::clone(&table.name),
                op,
                keys: deleted,
            });
        }
        self.stats = stats;
        Ok(())
    }

    /// Plans a TRUNCATE of table `id`; `None` when no rule watches it.
    pub fn plan_truncate(&self, id: TableId) -> Result<Option<CacheOp>, PlanError> {
        if let Some((_, flush)) = self.broken.get(&id) {
            return Ok(Some(flush.clone()));
        }
        Ok(self.table(id)?.map(|table| CacheOp::Flush {
            table: Arc::clone(&table.name),
            patterns: table.patterns.clone(),
            reason: FlushReason::Truncate,
        }))
    }

    /// Plans flushing every key the rules of `table` can produce (`None`
    /// when no rule watches it).
    pub fn plan_flush_table(
        &self,
        table: &crate::change::TableName,
        reason: FlushReason,
    ) -> Option<CacheOp> {
        let (_, rules) = self.rules.rules_for(&table.schema, &table.name)?;
        Some(CacheOp::Flush {
            table: Arc::from(table.to_string()),
            patterns: rules::scan_patterns(rules),
            reason,
        })
    }

    /// Plans flushing each watched table's keys, one operation per table.
    pub fn plan_flush_each_table(&self, reason: FlushReason) -> Vec<CacheOp> {
        self.rules
            .tables()
            .filter_map(|(table, _)| self.plan_flush_table(table, reason))
            .collect()
    }

    /// Plans flushing every key any rule can produce (changes were missed).
    pub fn plan_flush_all(&self) -> CacheOp {
        self.plan_flush_all_because(FlushReason::SlotReset)
    }

    /// Plans flushing every key any rule can produce, for `reason`.
    pub fn plan_flush_all_because(&self, reason: FlushReason) -> CacheOp {
        CacheOp::Flush {
            table: Arc::from("*"),
            patterns: rules::scan_patterns(self.rules.tables().flat_map(|(_, r)| r)),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Column, TableName, Value};
    use crate::config::RuleConfig;
    use bytes::Bytes;

    fn schema(id: u32, name: &str, columns: &[&str]) -> TableSchema {
        TableSchema {
            id,
            name: TableName::parse(name).expect("valid"),
            identity: None,
            columns: columns
                .iter()
                .map(|c| Column {
                    name: c.to_string(),
                    type_oid: 25,
                })
                .collect(),
        }
    }

    /// The one operation a change plans, if any.
    fn plan1(
        p: &mut Planner,
        oid: u32,
        op: RowOp,
        old: Option<&Row>,
        new: Option<&Row>,
    ) -> Result<Option<CacheOp>, PlanError> {
        let mut out = Vec::new();
        p.plan_row(oid, op, old, new, &mut out)?;
        assert!(out.len() <= 1, "{out:?}");
        Ok(out.pop())
    }

    fn planner() -> Planner {
        let rules = RuleSet::compile(&[
            RuleConfig {
                table: TableName::parse("public.user_tokens").expect("valid"),
                keys: vec![
                    "balance:user:{user_id}".into(),
                    "balance:user:{user_id}:token:{token_id}".into(),
                ],
                tags: vec![],
                action: Action::Delete,
                ttl: None,
                columns: None,
                query: None,
                params: None,
                holds: None,
            },
            RuleConfig {
                table: TableName::parse("public.user_tokens").expect("valid"),
                keys: vec!["balance:user:{user_id}".into()],
                tags: vec![],
                action: Action::Delete,
                ttl: None,
                columns: None,
                query: None,
                params: None,
                holds: None,
            },
        ])
        .expect("valid");
        let mut planner = Planner::new(Arc::new(rules));
        planner
            .plan(
                &Change::Schema(schema(7, "user_tokens", &["id", "user_id", "token_id"])),
                &mut Vec::new(),
            )
            .expect("binds");
        planner
            .on_schema(&schema(8, "unwatched", &["id"]))
            .expect("binds");
        planner
    }

    /// A described identity is compared with the key columns of the
    /// table's rules; unwatched tables and undescribed identities never
    /// report gaps.
    #[test]
    fn identity_gaps_name_the_key_columns_an_old_row_lacks() {
        let p = planner();
        let mut tokens = schema(7, "user_tokens", &["id", "user_id", "token_id"]);
        assert!(p.identity_gaps(&tokens).is_empty(), "undescribed");
        tokens.identity = Some(vec!["id".into()]);
        assert_eq!(p.identity_gaps(&tokens), vec!["token_id", "user_id"]);
        tokens.identity = Some(vec!["id".into(), "user_id".into(), "token_id".into()]);
        assert!(p.identity_gaps(&tokens).is_empty());
        let mut other = schema(8, "unwatched", &["id"]);
        other.identity = Some(Vec::new());
        assert!(p.identity_gaps(&other).is_empty());
    }

    fn row(values: &[Option<&str>]) -> Row {
        values
            .iter()
            .map(|v| match v {
                Some(s) => Value::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => Value::Null,
            })
            .collect()
    }

    fn keys(op: Option<CacheOp>) -> Vec<String> {
        match op {
            Some(CacheOp::Invalidate { keys, .. }) => keys,
            other => panic!("expected keys, got {other:?}"),
        }
    }

    #[test]
    fn renders_every_template_once() {
        let mut p = planner();
        let new = row(&[Some("r1"), Some("u1"), Some("t1")]);
        let got = keys(plan1(&mut p, 7, RowOp::Insert, None, Some(&new)).expect("plans"));
        assert_eq!(got, ["balance:user:u1", "balance:user:u1:token:t1"]);
    }

    #[test]
    fn moved_row_invalidates_old_and_new_keys() {
        let mut p = planner();
        let old = row(&[Some("r1"), Some("u1"), Some("t1")]);
        let new = row(&[Some("r1"), Some("u2"), Some("t1")]);
        let got = keys(plan1(&mut p, 7, RowOp::Update, Some(&old), Some(&new)).expect("plans"));
        assert_eq!(
            got,
            [
                "balance:user:u2",
                "balance:user:u2:token:t1",
                "balance:user:u1",
                "balance:user:u1:token:t1"
            ]
        );
    }

    /// A rule's tags become their marks' keys, deleted at every change of
    /// a row (old and new), whatever the action, and flushed with the
    /// table's keys.
    #[test]
    fn tags_delete_their_marks_and_flush_with_the_table() {
        let rules = RuleSet::compile(&[RuleConfig {
            table: TableName::parse("public.user_tokens").expect("valid"),
            keys: vec![],
            tags: vec!["balance:{user_id}".into()],
            action: Action::Refresh,
            ttl: Some(crate::duration::HumanDuration(
                std::time::Duration::from_secs(60),
            )),
            columns: None,
            query: None,
            params: None,
            holds: None,
        }])
        .expect("valid");
        let mut p = Planner::new(Arc::new(rules));
        p.plan(
            &Change::Schema(schema(7, "user_tokens", &["id", "user_id", "token_id"])),
            &mut Vec::new(),
        )
        .expect("binds");
        let old = row(&[Some("r1"), Some("u1"), Some("t1")]);
        let new = row(&[Some("r1"), Some("u2"), Some("t1")]);
        let got = keys(plan1(&mut p, 7, RowOp::Update, Some(&old), Some(&new)).expect("plans"));
        assert_eq!(got, ["pgci:tag:balance:u2", "pgci:tag:balance:u1"]);
        match p.plan_truncate(7).expect("watched") {
            Some(CacheOp::Flush { patterns, .. }) => assert_eq!(patterns, ["pgci:tag:balance:*"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_key_columns_are_skipped_and_counted() {
        let mut p = planner();
        let new = row(&[Some("r1"), Some("u1"), None]);
        let got = keys(plan1(&mut p, 7, RowOp::Insert, None, Some(&new)).expect("plans"));
        assert_eq!(got, ["balance:user:u1"]);
        assert_eq!(p.stats().null_keys_skipped, 1);
        let all_null = row(&[Some("r1"), None, None]);
        assert_eq!(
            plan1(&mut p, 7, RowOp::Delete, Some(&all_null), None).expect("plans"),
            None
        );
        assert_eq!(p.stats().null_keys_skipped, 4);
    }

    #[test]
    fn unwatched_and_unknown_relations() {
        let mut p = planner();
        let new = row(&[Some("x")]);
        assert_eq!(
            plan1(&mut p, 8, RowOp::Insert, None, Some(&new)).expect("ok"),
            None
        );
        assert!(matches!(
            plan1(&mut p, 99, RowOp::Insert, None, Some(&new)),
            Err(PlanError::UnknownRelation(99))
        ));
        assert_eq!(
            p.plan_truncate(7).expect("ok"),
            Some(CacheOp::Flush {
                table: Arc::from("public.user_tokens"),
                patterns: vec!["balance:user:*".into(), "balance:user:*:token:*".into()],
                reason: FlushReason::Truncate,
            })
        );
    }

    #[test]
    fn relation_without_a_key_column_flushes_its_table() {
        let mut p = planner();
        let rel = schema(7, "user_tokens", &["id", "user_id"]);
        p.on_schema(&rel)
            .expect("a missing column does not stop the stream");
        let problem = p.binding_problem(&rel).expect("broken");
        assert!(problem.contains("token_id"), "{problem}");
        let mut out = Vec::new();
        let new = row(&[Some("a"), Some("b")]);
        p.plan_row(7, RowOp::Update, None, Some(&new), &mut out)
            .expect("planned");
        assert!(matches!(
            &out[..],
            [CacheOp::Flush {
                reason: FlushReason::Drift,
                ..
            }]
        ));
        // Described right again: bound, no problem.
        p.on_schema(&schema(7, "user_tokens", &["id", "user_id", "token_id"]))
            .expect("bound");
        assert!(p.binding_problem(&rel).is_none());
    }
}
