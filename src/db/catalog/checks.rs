//! The checks `check-config`, `setup` and `run` make of the rules against
//! the live catalog: one line per problem, each saying what to do.

use super::{
    current_database, inspect_publication, inspect_slot, inspect_table, server_major, wal_level,
};
use super::{ColumnInfo, PublicationInfo, TableInfo};
use crate::change::TableName;
use crate::db::{Db, DbError};
use crate::plan::rules::{Action, Rule, RuleSet};
use crate::sql::quote_ident;

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

/// What to check besides the tables.
#[derive(Debug, Clone, Copy)]
pub struct CheckScope<'a> {
    /// The publication name.
    pub publication: &'a str,
    /// The slot name, or `None` to skip the slot (before `setup` made it).
    pub slot: Option<&'a str>,
    /// Whether a missing or lost slot is acceptable (`run` rebuilds it and
    /// flushes the keys; `check-config` reports it).
    pub tolerate_lost_slot: bool,
}

/// Checks the rules against the live database: `wal_level`, tables,
/// columns, replica identities, the publication and the slot. Returns one
/// line per problem, each saying what to do.
pub async fn check(
    db: &Db,
    rules: &RuleSet,
    scope: CheckScope<'_>,
) -> Result<Vec<String>, DbError> {
    let mut problems = Vec::new();
    let level = wal_level(db).await?;
    if level != "logical" {
        problems.push(format!(
            "wal_level is {level}: set wal_level = logical in postgresql.conf and restart PostgreSQL"
        ));
    }
    let mut existing = Vec::new();
    let mut generated = Vec::new();
    let mut partitioned: Vec<TableName> = Vec::new();
    for (table, table_rules) in rules.tables() {
        let Some(info) = inspect_table(db, table).await? else {
            problems.push(missing_table(db, table).await?);
            continue;
        };
        let needed = RuleSet::key_columns(table_rules);
        let mut columns_ok = true;
        for col in RuleSet::named_columns(table_rules) {
            if !info.columns.iter().any(|c| c.name == col) {
                columns_ok = false;
                problems.push(format!(
                    "table {table} has no column {col:?} named in a rule's columns or params: fix the rule"
                ));
            }
        }
        for rule in table_rules {
            if let Some(query) = &rule.query {
                if let Err(error) = db.client().prepare(&query.wrapped_sql()).await {
                    let reason = error
                        .as_db_error()
                        .map_or_else(|| error.to_string(), |e| e.message().to_string());
                    problems.push(format!(
                        "table {table}: refresh query does not prepare ({reason}): fix the query ($1, $2, … are the rule's params, in order)"
                    ));
                }
            }
        }
        for rule in table_rules {
            for template in &rule.keys {
                for col in template.columns() {
                    if !info.columns.iter().any(|c| c.name == col) {
                        columns_ok = false;
                        problems.push(format!(
                            "table {table} has no column {col:?} used by key template {:?}: fix the template",
                            template.to_string()
                        ));
                    }
                }
            }
        }
        if columns_ok {
            for (part, missing) in info.identity_gaps(&needed) {
                let fix = part.cheapest_identity(&needed).alter_sql(&part.name);
                let which = if part.name == *table {
                    format!("table {table}")
                } else {
                    format!("table {table} (partition {})", part.name)
                };
                problems.push(format!(
                    "{which}: a DELETE would not carry column(s) {} needed by its key templates (replica identity {}): run `{fix}` or pg-cache-invalidator setup",
                    missing.join(", "),
                    describe_identity(part),
                ));
            }
        }
        existing.push(table.clone());
        if info.is_partitioned() {
            partitioned.push(table.clone());
        }
        if info.columns.iter().any(|c| c.generated.is_some()) {
            generated.push((info, table_rules));
        }
    }
    let publication = inspect_publication(db, scope.publication).await?;
    if let Some(p) = &publication {
        if !p.via_root && !partitioned.is_empty() {
            problems.push(format!(
                "publication {:?} reports partitions' changes under the partitions' names, which no rule watches ({}): run ALTER PUBLICATION {} SET (publish_via_partition_root = true); or pg-cache-invalidator setup",
                scope.publication,
                partitioned.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                quote_ident(scope.publication)
            ));
        }
    }
    if !generated.is_empty() {
        let major = server_major(db).await?;
        for (info, table_rules) in &generated {
            problems.extend(generated_column_problems(
                info,
                table_rules,
                major,
                publication.as_ref(),
            ));
        }
    }
    match publication {
        None => problems.push(format!(
            "publication {:?} does not exist: run pg-cache-invalidator setup",
            scope.publication
        )),
        Some(publication) => {
            if !publication.missing_operations.is_empty() {
                problems.push(format!(
                    "publication {:?} does not publish {}: run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                    scope.publication,
                    publication.missing_operations.join(", "),
                    quote_ident(scope.publication)
                ));
            }
            for table in &existing {
                if !publication.all_tables && !publication.tables.contains(table) {
                    problems.push(format!(
                        "publication {:?} does not include table {table}: run ALTER PUBLICATION {} ADD TABLE {}; or pg-cache-invalidator setup",
                        scope.publication,
                        quote_ident(scope.publication),
                        table.quoted()
                    ));
                }
            }
        }
    }
    if let Some(slot) = scope.slot {
        match inspect_slot(db, slot).await? {
            None if scope.tolerate_lost_slot => {}
            None => problems.push(format!(
                "replication slot {slot:?} does not exist: run pg-cache-invalidator setup"
            )),
            Some(info) => {
                let database = current_database(db).await?;
                if info.plugin.as_deref() != Some("pgoutput") {
                    problems.push(format!(
                        "replication slot {slot:?} uses plugin {:?}, not pgoutput: drop it (select pg_drop_replication_slot('{slot}');) and run setup",
                        info.plugin.unwrap_or_default()
                    ));
                } else if info.database.as_deref() != Some(database.as_str()) {
                    problems.push(format!(
                        "replication slot {slot:?} belongs to database {:?}, not {database:?}: choose another [replication] slot name",
                        info.database.unwrap_or_default()
                    ));
                }
                if info.wal_status.as_deref() == Some("lost") && !scope.tolerate_lost_slot {
                    problems.push(format!(
                        "replication slot {slot:?} is lost (its WAL was removed), so changes were missed: drop it, flush the cache keys, and run setup"
                    ));
                }
            }
        }
    }
    Ok(problems)
}

fn describe_identity(info: &TableInfo) -> String {
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
