//! Binding: a table's rules matched to the columns the source described,
//! so that planning a row is position look-ups, never name searches.
//!
//! A table is (re-)described on every replication session and after every
//! ALTER TABLE; each time its rules are bound anew. A rule that names a
//! column the table no longer has is an error (the daemon stops rather
//! than skip invalidations).

use std::sync::Arc;

use crate::change::TableSchema;
use crate::plan::keys::BoundKey;
use crate::plan::rules::{scan_patterns, Action, ColumnFilter, Rule};
use crate::plan::PlanError;

/// What a bound rule does.
#[derive(Debug)]
pub enum BoundKind {
    /// Delete the keys.
    Delete,
    /// Write the row's cached columns: (position, name, type OID).
    RefreshRow {
        /// The cached columns.
        columns: Vec<(usize, String, u32)>,
        /// Seconds a value lives.
        ttl_secs: u64,
    },
    /// Write a query's answer.
    RefreshQuery {
        /// The wrapped statement.
        sql: Arc<str>,
        /// Positions of the parameter columns.
        params: Vec<usize>,
        /// Seconds a value lives.
        ttl_secs: u64,
    },
}

/// One rule bound to a table's columns.
#[derive(Debug)]
pub struct BoundRule {
    /// Its key templates.
    pub keys: Vec<BoundKey>,
    /// Its tags' mark-key templates (deleted at every change).
    pub tags: Vec<BoundKey>,
    /// What it does.
    pub kind: BoundKind,
}

/// Every rule of a watched table, bound.
#[derive(Debug)]
pub struct BoundTable {
    /// `schema.table`, shared by every operation planned for it.
    pub name: Arc<str>,
    /// Its rules.
    pub rules: Vec<BoundRule>,
    /// `SCAN MATCH` patterns of every key its rules can produce (TRUNCATE).
    pub patterns: Vec<String>,
}

/// Binds `rules` (all of one table) to `schema`.
pub fn bind_table(schema: &TableSchema, rules: &[Rule]) -> Result<BoundTable, PlanError> {
    let name: Arc<str> = Arc::from(schema.name.to_string());
    let bound = rules
        .iter()
        .map(|rule| bind_rule(rule, schema, &name))
        .collect::<Result<_, _>>()?;
    Ok(BoundTable {
        name,
        rules: bound,
        patterns: scan_patterns(rules),
    })
}

fn bind_rule(rule: &Rule, schema: &TableSchema, table: &Arc<str>) -> Result<BoundRule, PlanError> {
    let find = |column: &str| schema.columns.iter().position(|c| c.name == column);
    let missing = |column: &str, what: String| PlanError::MissingColumn {
        table: table.to_string(),
        column: column.to_string(),
        template: what,
    };
    let position = |column: &str, what: String| find(column).ok_or_else(|| missing(column, what));
    let bind_all = |templates: &[crate::plan::keys::KeyTemplate]| {
        templates
            .iter()
            .map(|template| {
                template
                    .bind(find)
                    .map_err(|column| missing(&column, template.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let keys = bind_all(&rule.keys)?;
    let tags = bind_all(&rule.tags)?;
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
            // Included columns must travel; an excluded one may be absent
            // (a generated column before PostgreSQL 18 never does).
            if let ColumnFilter::Include(included) = &rule.columns {
                for named in included {
                    position(named, "columns".to_string())?;
                }
            }
            BoundKind::RefreshRow {
                columns: schema
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
    Ok(BoundRule { keys, tags, kind })
}
