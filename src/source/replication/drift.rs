//! Drift: the database changed under a running daemon so that some watched
//! table's changes would no longer be invalidated correctly — the table was
//! dropped from the publication (or the publication recreated without it),
//! or its replica identity no longer carries the key columns. Checked with
//! every heartbeat; the apply loop flushes the affected rules' keys, logs
//! the fix, and reports not ready until the catalog is right again.

use crate::change::TableName;
use crate::db::catalog;
use crate::db::{Db, DbError};
use crate::plan::rules::RuleSet;
use crate::sql::quote_ident;

/// A watched table whose changes may be missed, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drifted {
    /// The table.
    pub table: TableName,
    /// What is wrong and the fix.
    pub reason: String,
}

/// One catalog check: the drifted tables, and when the check began (a
/// table the stream described as drifted before then and the catalog no
/// longer lists has been put right).
#[derive(Debug, Clone)]
pub struct CatalogReport {
    /// When the check began.
    pub checked_at: std::time::Instant,
    /// What it found.
    pub drifted: Vec<Drifted>,
}

impl Default for CatalogReport {
    fn default() -> Self {
        CatalogReport {
            checked_at: std::time::Instant::now(),
            drifted: Vec::new(),
        }
    }
}

/// The watched tables the catalog no longer lets the stream cover.
pub async fn drifted_tables(
    db: &Db,
    rules: &RuleSet,
    publication: &str,
) -> Result<Vec<Drifted>, DbError> {
    let mut drifted = Vec::new();
    let published = catalog::inspect_publication(db, publication).await?;
    for (table, table_rules) in rules.tables() {
        let mut push = |reason: String| {
            drifted.push(Drifted {
                table: table.clone(),
                reason,
            })
        };
        let Some(info) = catalog::inspect_table(db, table).await? else {
            push(format!(
                "table {table} no longer exists: fix the rules and restart"
            ));
            continue;
        };
        match &published {
            None => push(format!(
                "publication {publication:?} no longer exists: run pg-cache-invalidator setup"
            )),
            Some(p) if !p.missing_operations.is_empty() => push(format!(
                "publication {publication:?} no longer publishes {}: run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate');",
                p.missing_operations.join(", "),
                quote_ident(publication)
            )),
            Some(p) if !p.all_tables && !p.tables.contains(table) => push(format!(
                "table {table} is no longer in publication {publication:?}, so its changes are not streamed: run ALTER PUBLICATION {} ADD TABLE {}; or pg-cache-invalidator setup",
                quote_ident(publication),
                table.quoted()
            )),
            Some(_) => {}
        }
        let needed = RuleSet::key_columns(table_rules);
        let gone: Vec<&str> = needed
            .iter()
            .filter(|c| !info.columns.iter().any(|col| &col.name == *c))
            .map(String::as_str)
            .collect();
        if !gone.is_empty() {
            push(format!(
                "table {table} no longer has column(s) {} used by its key templates: every change to it flushes its keys until the column is back (a rolled-back migration) or the rule is fixed",
                gone.join(", ")
            ));
            continue;
        }
        for (part, missing) in info.identity_gaps(&needed) {
            push(format!(
                "table {}: its replica identity no longer carries column(s) {}, so deletes and key changes cannot be invalidated: run `{}` or pg-cache-invalidator setup",
                part.name,
                missing.join(", "),
                part.cheapest_identity(&needed).alter_sql(&part.name)
            ));
        }
    }
    Ok(drifted)
}
