//! Plan: from a decoded row change to the cache operations it requires.
//!
//! The stream names tables by OID and sends their column layout in Relation
//! messages (again on every session and after every ALTER TABLE). When one
//! arrives, each rule's templates are *bound*: column names become tuple
//! positions. Rendering a key is then concatenation. A table that the
//! publication sends but no rule watches binds to nothing and is skipped.
//!
//! An UPDATE renders keys from the new row and, when the server sent the old
//! row (a replica identity column changed, or REPLICA IDENTITY FULL), from
//! the old row too, so a moved key invalidates both places. A placeholder
//! whose column is NULL (or an unchanged TOASTed value that did not travel)
//! yields no key: it is counted, never rendered as "null".
//!
//! `refresh` rules write the new row as `to_jsonb` would render it (see
//! [`crate::decode::json`]). If a cached column's value did not travel (an
//! unchanged TOASTed value) or cannot be encoded, the key is deleted
//! instead: the next read repopulates it, and nothing wrong is ever cached.
//! Query rules plan a query per distinct parameter tuple (old and new row).

use std::collections::HashMap;
use std::sync::Arc;

use crate::decode::json::{write_string, write_value};
use crate::decode::pgoutput::{Datum, Relation, Tuple};
use crate::decode::types::TypeCatalog;
use crate::rules::{Action, Part, Rule, RuleSet};
use crate::telemetry::metrics::{KEYS_SKIPPED_TOTAL, ROWS_NOT_CACHED_TOTAL};

/// The kind of row change, as named in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// INSERT
    Insert,
    /// UPDATE
    Update,
    /// DELETE
    Delete,
    /// TRUNCATE
    Truncate,
}

impl Op {
    /// The lowercase name used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// Work for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOp {
    /// Remove these keys (one row change).
    Invalidate {
        /// `schema.table`.
        table: Arc<str>,
        /// The change.
        op: Op,
        /// The rules' action.
        action: Action,
        /// The rendered keys, without duplicates.
        keys: Vec<String>,
    },
    /// Write a row's JSON to `set` (when it could be encoded) and delete
    /// `del` (keys the row moved away from, or could not be written).
    Refresh {
        /// `schema.table`.
        table: Arc<str>,
        /// The change.
        op: Op,
        /// Keys to set to `value`.
        set: Vec<String>,
        /// Keys to delete.
        del: Vec<String>,
        /// The row as JSON; `None` means delete `set` too.
        value: Option<Arc<str>>,
        /// Seconds the value lives.
        ttl_secs: u64,
    },
    /// Run a query and set `keys` to its answer (a NULL answer deletes).
    Query {
        /// `schema.table`.
        table: Arc<str>,
        /// The change.
        op: Op,
        /// Keys rendered from the row the parameters came from.
        keys: Vec<String>,
        /// The statement (wrapped, see [`crate::rules::RuleQuery`]).
        sql: Arc<str>,
        /// Text parameters, `None` for NULL.
        params: Vec<Option<String>>,
        /// Seconds the value lives.
        ttl_secs: u64,
    },
    /// Remove every key matching these patterns.
    Flush {
        /// `schema.table`, or `*` for every table.
        table: Arc<str>,
        /// `SCAN MATCH` patterns.
        patterns: Vec<String>,
        /// Why.
        reason: FlushReason,
    },
}

/// Why keys are flushed by pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    /// The table was truncated.
    Truncate,
    /// The slot was lost or dropped: changes were missed, every key goes.
    SlotReset,
}

impl FlushReason {
    /// The op named in events.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Truncate => "truncate",
            FlushReason::SlotReset => "flush",
        }
    }
}

/// A change the planner cannot handle safely: the daemon stops rather than
/// skip an invalidation.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A row change arrived for an OID with no Relation message before it.
    #[error(
        "the stream sent a change for relation {0} before describing it; this is a protocol error"
    )]
    UnknownRelation(u32),
    /// A rule uses a column the table no longer has (altered while running).
    #[error("table {table} no longer has column {column:?} used by key template {template:?}: fix the rule and restart")]
    MissingColumn {
        /// `schema.table`.
        table: String,
        /// The missing column.
        column: String,
        /// The template that uses it.
        template: String,
    },
}

#[derive(Debug)]
enum BoundPart {
    Literal(String),
    Column(usize),
}

#[derive(Debug)]
struct BoundTemplate {
    parts: Vec<BoundPart>,
}

/// What a bound rule does.
#[derive(Debug)]
enum BoundKind {
    Delete,
    /// Cached columns: (position, name, type OID).
    RefreshRow {
        columns: Vec<(usize, String, u32)>,
        ttl_secs: u64,
    },
    RefreshQuery {
        sql: Arc<str>,
        params: Vec<usize>,
        ttl_secs: u64,
    },
}

#[derive(Debug)]
struct BoundRule {
    templates: Vec<BoundTemplate>,
    kind: BoundKind,
}

#[derive(Debug)]
struct BoundTable {
    name: Arc<str>,
    rules: Vec<BoundRule>,
    patterns: Vec<String>,
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

/// Turns decoded changes into [`CacheOp`]s.
#[derive(Debug)]
pub struct Planner {
    rules: Arc<RuleSet>,
    /// Bound rules by relation OID; `None` for relations no rule watches.
    relations: HashMap<u32, Option<BoundTable>>,
    stats: PlanStats,
    /// Column types, for encoding refreshed rows.
    types: TypeCatalog,
}

impl Planner {
    /// A planner for `rules`, with no relation known yet.
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Planner {
            rules,
            relations: HashMap::new(),
            stats: PlanStats::default(),
            types: TypeCatalog::default(),
        }
    }

    /// Column types of `relation` that refresh rules need and the catalog
    /// does not know yet; load them (see `db::types`) before binding.
    pub fn missing_types(&self, relation: &Relation) -> Vec<u32> {
        let refreshes = self
            .rules
            .rules_for(&relation.namespace, &relation.name)
            .is_some_and(|(_, rules)| {
                rules
                    .iter()
                    .any(|r| r.action == Action::Refresh && r.query.is_none())
            });
        if !refreshes {
            return Vec::new();
        }
        self.types
            .missing(relation.columns.iter().map(|c| c.type_oid))
    }

    /// The type catalog, to load missing types into.
    pub fn types_mut(&mut self) -> &mut TypeCatalog {
        &mut self.types
    }

    /// What has been skipped so far.
    pub fn stats(&self) -> PlanStats {
        self.stats
    }

    /// Binds the rules of a (re-)described relation.
    pub fn on_relation(&mut self, relation: &Relation) -> Result<(), PlanError> {
        let bound = match self.rules.rules_for(&relation.namespace, &relation.name) {
            None => None,
            Some((table, rules)) => {
                let name: Arc<str> = Arc::from(table.to_string());
                let mut bound_rules = Vec::new();
                let mut patterns = Vec::new();
                for rule in rules {
                    bound_rules.push(bind_rule(rule, relation, &name)?);
                    for template in &rule.keys {
                        let pattern = template.scan_pattern();
                        if !patterns.contains(&pattern) {
                            patterns.push(pattern);
                        }
                    }
                }
                Some(BoundTable {
                    name,
                    rules: bound_rules,
                    patterns,
                })
            }
        };
        self.relations.insert(relation.oid, bound);
        Ok(())
    }

    fn table(&self, oid: u32) -> Result<Option<&BoundTable>, PlanError> {
        match self.relations.get(&oid) {
            Some(bound) => Ok(bound.as_ref()),
            None => Err(PlanError::UnknownRelation(oid)),
        }
    }

    /// Plans an INSERT, UPDATE or DELETE into `out`: nothing when no rule
    /// watches the table or no key could be rendered.
    pub fn plan_row(
        &mut self,
        oid: u32,
        op: Op,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
        out: &mut Vec<CacheOp>,
    ) -> Result<(), PlanError> {
        let mut stats = self.stats;
        let Some(table) = self.table(oid)? else {
            return Ok(());
        };
        let mut deleted = Vec::new();
        for rule in &table.rules {
            match &rule.kind {
                BoundKind::Delete => {
                    for tuple in [new, old].into_iter().flatten() {
                        render_all(&rule.templates, tuple, &mut deleted, &mut stats);
                    }
                }
                BoundKind::RefreshRow { columns, ttl_secs } => {
                    let mut set = Vec::new();
                    let mut del = Vec::new();
                    if let Some(new) = new {
                        render_all(&rule.templates, new, &mut set, &mut stats);
                    }
                    if let Some(old) = old {
                        let mut old_keys = Vec::new();
                        render_all(&rule.templates, old, &mut old_keys, &mut stats);
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
                    for tuple in [new, old].into_iter().flatten() {
                        let Some(values) = param_values(tuple, params) else {
                            stats.unavailable_keys_skipped += 1;
                            continue;
                        };
                        if planned.contains(&values) {
                            continue;
                        }
                        let mut keys = Vec::new();
                        render_all(&rule.templates, tuple, &mut keys, &mut stats);
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
                action: Action::Delete,
                keys: deleted,
            });
        }
        self.stats = stats;
        Ok(())
    }

    /// Plans a TRUNCATE of `oid`; `None` when no rule watches it.
    pub fn plan_truncate(&self, oid: u32) -> Result<Option<CacheOp>, PlanError> {
        Ok(self.table(oid)?.map(|table| CacheOp::Flush {
            table: Arc::clone(&table.name),
            patterns: table.patterns.clone(),
            reason: FlushReason::Truncate,
        }))
    }

    /// Plans flushing every key any rule can produce.
    pub fn plan_flush_all(&self) -> CacheOp {
        let mut patterns: Vec<String> = Vec::new();
        for (_, rules) in self.rules.tables() {
            for template in rules.iter().flat_map(|r| r.keys.iter()) {
                let pattern = template.scan_pattern();
                if !patterns.contains(&pattern) {
                    patterns.push(pattern);
                }
            }
        }
        CacheOp::Flush {
            table: Arc::from("*"),
            patterns,
            reason: FlushReason::SlotReset,
        }
    }
}

enum Rendered {
    Key(String),
    Null,
    Unavailable,
}

fn bind_rule(rule: &Rule, relation: &Relation, table: &Arc<str>) -> Result<BoundRule, PlanError> {
    let position = |column: &str, what: String| {
        relation
            .columns
            .iter()
            .position(|c| c.name == column)
            .ok_or_else(|| PlanError::MissingColumn {
                table: table.to_string(),
                column: column.to_string(),
                template: what,
            })
    };
    let mut templates = Vec::new();
    for template in &rule.keys {
        let mut parts = Vec::new();
        for part in template.parts() {
            parts.push(match part {
                Part::Literal(text) => BoundPart::Literal(text.clone()),
                Part::Column(col) => BoundPart::Column(position(col, template.to_string())?),
            });
        }
        templates.push(BoundTemplate { parts });
    }
    let ttl_secs = rule.ttl.as_secs().max(1);
    let kind = match (&rule.action, &rule.query) {
        (Action::Delete, _) => BoundKind::Delete,
        (Action::Refresh, Some(query)) => BoundKind::RefreshQuery {
            sql: Arc::from(query.wrapped_sql()),
            params: query
                .params
                .iter()
                .map(|p| position(p, format!("params {:?}", query.params)))
                .collect::<Result<_, _>>()?,
            ttl_secs,
        },
        (Action::Refresh, None) => {
            for named in rule.columns.named() {
                position(named, "columns".to_string())?;
            }
            BoundKind::RefreshRow {
                columns: relation
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| rule.columns.keeps(&c.name))
                    .map(|(i, c)| (i, c.name.clone(), c.type_oid))
                    .collect(),
                ttl_secs,
            }
        }
    };
    Ok(BoundRule { templates, kind })
}

/// Renders every template for `tuple` into `keys` (without duplicates),
/// counting the keys that could not be rendered.
fn render_all(
    templates: &[BoundTemplate],
    tuple: &Tuple,
    keys: &mut Vec<String>,
    stats: &mut PlanStats,
) {
    for template in templates {
        match render(template, tuple) {
            Rendered::Key(key) => {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            Rendered::Null => {
                stats.null_keys_skipped += 1;
                metrics::counter!(KEYS_SKIPPED_TOTAL, "reason" => "null").increment(1);
            }
            Rendered::Unavailable => {
                stats.unavailable_keys_skipped += 1;
                metrics::counter!(KEYS_SKIPPED_TOTAL, "reason" => "unavailable").increment(1);
            }
        }
    }
}

fn render(template: &BoundTemplate, tuple: &Tuple) -> Rendered {
    let mut key = String::with_capacity(64);
    for part in &template.parts {
        match part {
            BoundPart::Literal(text) => key.push_str(text),
            BoundPart::Column(i) => match tuple.get(*i) {
                Some(Datum::Text(bytes)) => key.push_str(&String::from_utf8_lossy(bytes)),
                Some(Datum::Null) => return Rendered::Null,
                Some(Datum::UnchangedToast | Datum::Binary(_)) | None => {
                    return Rendered::Unavailable
                }
            },
        }
    }
    Rendered::Key(key)
}

/// Why a row could not be cached: the column, and what went wrong.
type NotCached<'a> = (&'a str, String);

/// The row as a JSON object of the cached columns, or the first column
/// whose value did not travel or cannot be encoded.
fn encode_row<'a>(
    tuple: &Tuple,
    columns: &'a [(usize, String, u32)],
    types: &TypeCatalog,
) -> Result<String, NotCached<'a>> {
    let mut json = String::with_capacity(256);
    json.push('{');
    for (n, (i, name, oid)) in columns.iter().enumerate() {
        if n > 0 {
            json.push(',');
        }
        write_string(&mut json, name);
        json.push(':');
        match tuple.get(*i) {
            Some(Datum::Null) => json.push_str("null"),
            Some(Datum::Text(bytes)) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| (name.as_str(), "not UTF-8".to_string()))?;
                write_value(&mut json, text, *oid, types)
                    .map_err(|e| (name.as_str(), format!("{e} (type oid {oid})")))?;
            }
            Some(Datum::UnchangedToast) => {
                return Err((
                    name.as_str(),
                    "unchanged TOASTed value not in the stream".into(),
                ))
            }
            Some(Datum::Binary(_)) | None => {
                return Err((name.as_str(), "value not in the stream".into()))
            }
        }
    }
    json.push('}');
    Ok(json)
}

/// The query parameters from `tuple`, or `None` if one did not travel.
fn param_values(tuple: &Tuple, params: &[usize]) -> Option<Vec<Option<String>>> {
    params
        .iter()
        .map(|i| match tuple.get(*i)? {
            Datum::Null => Some(None),
            Datum::Text(bytes) => Some(Some(String::from_utf8_lossy(bytes).into_owned())),
            Datum::UnchangedToast | Datum::Binary(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleConfig;
    use crate::decode::pgoutput::{decode, tests::relation_message, Message};
    use bytes::Bytes;

    /// The one operation a change plans, if any.
    fn plan1(
        p: &mut Planner,
        oid: u32,
        op: Op,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
    ) -> Result<Option<CacheOp>, PlanError> {
        let mut out = Vec::new();
        p.plan_row(oid, op, old, new, &mut out)?;
        assert!(out.len() <= 1, "{out:?}");
        Ok(out.pop())
    }

    fn planner() -> Planner {
        let rules = RuleSet::compile(&[
            RuleConfig {
                table: "public.user_tokens".into(),
                keys: vec![
                    "balance:user:{user_id}".into(),
                    "balance:user:{user_id}:token:{token_id}".into(),
                ],
                action: Action::Delete,
                ttl: None,
                columns: None,
                query: None,
                params: None,
            },
            RuleConfig {
                table: "public.user_tokens".into(),
                keys: vec!["balance:user:{user_id}".into()],
                action: Action::Delete,
                ttl: None,
                columns: None,
                query: None,
                params: None,
            },
        ])
        .expect("valid");
        let mut planner = Planner::new(Arc::new(rules));
        let rel = relation_message(
            7,
            "user_tokens",
            &[("id", true), ("user_id", false), ("token_id", false)],
        );
        let Ok(Message::Relation(rel)) = decode(&rel) else {
            panic!("relation")
        };
        planner.on_relation(&rel).expect("binds");
        let other = relation_message(8, "unwatched", &[("id", true)]);
        let Ok(Message::Relation(other)) = decode(&other) else {
            panic!("relation")
        };
        planner.on_relation(&other).expect("binds");
        planner
    }

    fn row(values: &[Option<&str>]) -> Tuple {
        values
            .iter()
            .map(|v| match v {
                Some(s) => Datum::Text(Bytes::copy_from_slice(s.as_bytes())),
                None => Datum::Null,
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
        let got = keys(plan1(&mut p, 7, Op::Insert, None, Some(&new)).expect("plans"));
        assert_eq!(got, ["balance:user:u1", "balance:user:u1:token:t1"]);
    }

    #[test]
    fn moved_row_invalidates_old_and_new_keys() {
        let mut p = planner();
        let old = row(&[Some("r1"), Some("u1"), Some("t1")]);
        let new = row(&[Some("r1"), Some("u2"), Some("t1")]);
        let got = keys(plan1(&mut p, 7, Op::Update, Some(&old), Some(&new)).expect("plans"));
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

    #[test]
    fn null_key_columns_are_skipped_and_counted() {
        let mut p = planner();
        let new = row(&[Some("r1"), Some("u1"), None]);
        let got = keys(plan1(&mut p, 7, Op::Insert, None, Some(&new)).expect("plans"));
        assert_eq!(got, ["balance:user:u1"]);
        assert_eq!(p.stats().null_keys_skipped, 1);
        let all_null = row(&[Some("r1"), None, None]);
        assert_eq!(
            plan1(&mut p, 7, Op::Delete, Some(&all_null), None).expect("plans"),
            None
        );
        assert_eq!(p.stats().null_keys_skipped, 4);
    }

    #[test]
    fn unwatched_and_unknown_relations() {
        let mut p = planner();
        let new = row(&[Some("x")]);
        assert_eq!(
            plan1(&mut p, 8, Op::Insert, None, Some(&new)).expect("ok"),
            None
        );
        assert!(matches!(
            plan1(&mut p, 99, Op::Insert, None, Some(&new)),
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
    fn relation_without_a_key_column_is_an_error() {
        let mut p = planner();
        let rel = relation_message(7, "user_tokens", &[("id", true), ("user_id", false)]);
        let Ok(Message::Relation(rel)) = decode(&rel) else {
            panic!("relation")
        };
        assert!(matches!(
            p.on_relation(&rel),
            Err(PlanError::MissingColumn { ref column, .. }) if column == "token_id"
        ));
    }
}
