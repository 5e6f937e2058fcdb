//! The one walk over the rules' tables that both sources' `setup` plans and
//! live checks (`check-config`, `run`) start from: each table inspected
//! once, and every problem a table can have whichever source reads it — a
//! missing table, a column the rules name that it lacks, a refresh query
//! that does not prepare — worded once, here. What each source adds on top
//! (replica identities and the publication, or capture triggers) is its
//! own `install` module's.

use crate::change::TableName;
use crate::db::catalog::{self, TableInfo};
use crate::db::{Db, DbError};
use crate::plan::rules::{Rule, RuleSet};

/// A watched table as the catalog shows it.
pub struct Walked<'r> {
    /// Its name, as the rules give it.
    pub table: &'r TableName,
    /// Its rules.
    pub rules: &'r [Rule],
    /// What the catalog says of it.
    pub info: TableInfo,
    /// Every column its rules name exists (a table without them cannot
    /// be set up; its problems are already reported).
    pub columns_ok: bool,
}

/// Inspects every table of `rules`; pushes each problem onto `problems`
/// and returns the tables that exist.
pub async fn tables<'r>(
    db: &Db,
    rules: &'r RuleSet,
    problems: &mut Vec<String>,
) -> Result<Vec<Walked<'r>>, DbError> {
    let mut walked = Vec::new();
    for (table, table_rules) in rules.tables() {
        let Some(info) = catalog::inspect_table(db, table).await? else {
            problems.push(catalog::missing_table(db, table).await?);
            continue;
        };
        let has = |col: &str| info.columns.iter().any(|c| c.name == col);
        let mut columns_ok = true;
        for col in RuleSet::named_columns(table_rules) {
            if !has(&col) {
                columns_ok = false;
                problems.push(format!(
                    "table {table} has no column {col:?} named in a rule's columns or params: fix the rule"
                ));
            }
        }
        for rule in table_rules {
            for template in rule.templates() {
                for col in template.columns() {
                    if !has(col) {
                        columns_ok = false;
                        problems.push(format!(
                            "table {table} has no column {col:?} used by key template {:?}: fix the template",
                            template.to_string()
                        ));
                    }
                }
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
        walked.push(Walked {
            table,
            rules: table_rules,
            info,
            columns_ok,
        });
    }
    Ok(walked)
}

/// The problem with the server's `wal_level`, if logical decoding is off
/// (the replication source needs it; the outbox does not).
pub async fn wal_level_problem(db: &Db) -> Result<Option<String>, DbError> {
    let level = catalog::wal_level(db).await?;
    Ok((level != "logical").then(|| format!(
        "wal_level is {level}: run ALTER SYSTEM SET wal_level = logical; (or set it in postgresql.conf) and restart PostgreSQL, then run pg-cache-invalidator setup"
    )))
}
