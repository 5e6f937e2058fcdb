//! Problem lines about tables shared by the checks (see `source::walk` and
//! each source's `install`): one line per problem, each saying what to do.

use super::{ColumnInfo, PublicationInfo, TableInfo};
use crate::change::TableName;
use crate::db::{Db, DbError};
use crate::plan::rules::{Action, Rule, RuleSet};

/// Why a rule's table was not found, for the problem line: a view or a
/// foreign table is named as such (the stream carries only tables' rows).
pub async fn missing_table(db: &Db, table: &TableName) -> Result<String, DbError> {
    let kind: Option<String> = db
        .client()
        .query_opt(
            "select c.relkind::text from pg_class c join pg_namespace n on n.oid = c.relnamespace \
              where n.nspname = $1 and c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(DbError::query(format!("looking up {table}")))?
        .map(|r| r.get(0));
    Ok(match kind.as_deref() {
        Some("v") => format!(
            "{table} is a view, not a table: its rows never change by themselves; name the tables it reads from in the rules"
        ),
        Some("m") => format!(
            "{table} is a materialized view: REFRESH does not send row changes; name the tables it reads from in the rules"
        ),
        Some("f") => format!(
            "{table} is a foreign table: its changes happen on another server; watch that server's table instead"
        ),
        _ => format!("table {table} does not exist: create it or fix the rule's table name"),
    })
}

/// The generated columns of `info` that `rules` need from the change
/// stream: named in a key template, a query parameter or `columns`, or
/// part of a whole row a `refresh` rule caches.
pub fn needed_generated_columns<'a>(info: &'a TableInfo, rules: &[Rule]) -> Vec<&'a ColumnInfo> {
    let named = RuleSet::key_columns(rules);
    info.columns
        .iter()
        .filter(|c| c.generated.is_some())
        .filter(|c| {
            named.contains(&c.name)
                || rules.iter().any(|r| {
                    r.action == Action::Refresh && r.query.is_none() && r.columns.keeps(&c.name)
                })
        })
        .collect()
}

/// Problems with generated columns `rules` need: the stream carries them
/// only from PostgreSQL 18, stored ones only, and only when the
/// publication asks (`publish_generated_columns = stored`, which `setup`
/// sets). `publication` is `None` when setup is about to create or alter it.
pub fn generated_column_problems(
    info: &TableInfo,
    rules: &[Rule],
    major: i32,
    publication: Option<&PublicationInfo>,
) -> Vec<String> {
    let table = &info.name;
    let mut problems = Vec::new();
    for column in needed_generated_columns(info, rules) {
        let name = &column.name;
        let ways_out = format!(
            "keep it out of key templates and params, exclude it from refreshed rows (columns = {{ exclude = [\"{name}\"] }}), or cache a query's answer instead (query = \"select to_jsonb(t) from {table} t where ...\")"
        );
        if column.generated == Some('v') {
            problems.push(format!(
                "table {table}: column {name:?} is a virtual generated column, which logical replication never sends: {ways_out}"
            ));
        } else if major < 18 {
            problems.push(format!(
                "table {table}: column {name:?} is a generated column, which PostgreSQL {major} does not send in the change stream (18 does): {ways_out}, or upgrade to PostgreSQL 18"
            ));
        } else if publication.is_some_and(|p| !p.generated_columns) {
            problems.push(format!(
                "table {table}: column {name:?} is a generated column and the publication does not send them: run pg-cache-invalidator setup (it sets publish_generated_columns = stored)"
            ));
        }
    }
    problems
}

/// How a table's replica identity reads in a problem line.
pub fn describe_identity(info: &TableInfo) -> String {
    match info.replica_identity {
        'f' => "FULL".to_string(),
        'n' => "NOTHING".to_string(),
        'i' => "USING INDEX".to_string(),
        _ if info.indexes.iter().any(|i| i.is_primary) => format!(
            "DEFAULT = primary key ({})",
            info.identity_columns()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => "DEFAULT without a primary key".to_string(),
    }
}
