//! Drift: the database changed under a running daemon so that some watched
//! table's changes would no longer be invalidated correctly — the table was
//! dropped from the publication (or the publication recreated without it),
//! or its replica identity no longer carries the key columns. Checked with
//! every heartbeat; the apply loop flushes the affected rules' keys, logs
//! the fix, and reports not ready until the catalog is right again.
//!
//! A table dropped from the publication and added back between two checks
//! looks right to both, yet its changes in between were never streamed.
//! Its membership record (`pg_publication_rel`, or `pg_publication_namespace`
//! for `TABLES IN SCHEMA`) is a new row then, with a new OID: each check
//! compares the OIDs with the last check's and reports the tables whose
//! membership changed as [`CatalogReport::rejoined`], and the loop flushes
//! their keys.

use std::collections::HashMap;

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
    /// Tables covered now whose membership of the publication changed
    /// since the last check (they left it and came back in between).
    pub rejoined: Vec<TableName>,
}

impl Default for CatalogReport {
    fn default() -> Self {
        CatalogReport {
            checked_at: std::time::Instant::now(),
            drifted: Vec::new(),
            rejoined: Vec::new(),
        }
    }
}

/// The OIDs of the publication's membership records that cover each
/// watched table (its own `pg_publication_rel` row, its schema's
/// `pg_publication_namespace` row), sorted; a table with none is absent.
pub async fn membership(
    db: &Db,
    rules: &RuleSet,
    publication: &str,
) -> Result<HashMap<TableName, Vec<i64>>, DbError> {
    let rows = db
        .client()
        .query(
            "select pr.oid::int8, n.nspname::text, c.relname::text \
               from pg_publication_rel pr \
               join pg_publication p on p.oid = pr.prpubid \
               join pg_class c on c.oid = pr.prrelid \
               join pg_namespace n on n.oid = c.relnamespace \
              where p.pubname = $1 \
             union all \
             select pn.oid::int8, n.nspname::text, null \
               from pg_publication_namespace pn \
               join pg_publication p on p.oid = pn.pnpubid \
               join pg_namespace n on n.oid = pn.pnnspid \
              where p.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(DbError::query("reading the publication's membership"))?;
    let mut covered: HashMap<TableName, Vec<i64>> = HashMap::new();
    for row in &rows {
        let (oid, schema, table): (i64, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        for (watched, _) in rules.tables() {
            if watched.schema == schema && table.as_deref().is_none_or(|t| t == watched.name) {
                covered.entry(watched.clone()).or_default().push(oid);
            }
        }
    }
    for oids in covered.values_mut() {
        oids.sort_unstable();
    }
    Ok(covered)
}

/// The tables covered both `before` and `now` by other membership records:
/// they left the publication and came back in between.
pub fn rejoined(
    before: &HashMap<TableName, Vec<i64>>,
    now: &HashMap<TableName, Vec<i64>>,
) -> Vec<TableName> {
    let mut tables: Vec<TableName> = now
        .iter()
        .filter(|(table, oids)| before.get(*table).is_some_and(|old| old != *oids))
        .map(|(table, _)| table.clone())
        .collect();
    tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    tables
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_covered_by_other_records_than_before_rejoined() {
        let t = |name: &str| TableName {
            schema: "public".into(),
            name: name.into(),
        };
        let before = HashMap::from([(t("a"), vec![10]), (t("b"), vec![11]), (t("c"), vec![12])]);
        let now = HashMap::from([(t("a"), vec![10]), (t("b"), vec![20]), (t("d"), vec![21])]);
        // b came back as a new record; c left (drift reports it); d is new.
        assert_eq!(rejoined(&before, &now), vec![t("b")]);
        assert!(rejoined(&now, &now).is_empty());
    }
}
