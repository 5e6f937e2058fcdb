//! Row-level security that would hide rows from refresh queries: found
//! from each query's generic plan, reported as warnings.

use crate::db::{Db, DbError};
use crate::plan::rules::RuleSet;

/// Warnings about the rules that do not stop the daemon: refresh queries
/// that read tables with row-level security the connecting role does not
/// bypass (their answers may come back empty, which deletes the keys).
pub async fn warnings(db: &Db, rules: &RuleSet) -> Result<Vec<String>, DbError> {
    let mut warnings = Vec::new();
    let role: (String, bool) = db
        .client()
        .query_one(
            "select current_user::text, rolsuper or rolbypassrls from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .map_err(DbError::query("reading the role's attributes"))?;
    if role.1 {
        return Ok(warnings);
    }
    for (table, table_rules) in rules.tables() {
        for query in table_rules.iter().filter_map(|r| r.query.as_ref()) {
            for relation in rls_relations(db, &query.wrapped_sql(), query.params.len()).await? {
                warnings.push(format!(
                    "table {table}: its refresh query reads {relation}, which has row-level security that role {:?} does not bypass: answers may be empty and the keys deleted; connect as a role with BYPASSRLS (on Supabase, postgres) or as the table's owner",
                    role.0
                ));
            }
        }
    }
    Ok(warnings)
}

/// The tables `sql` reads whose row-level security applies to the current
/// role, from the generic plan (`EXPLAIN … EXECUTE` with NULL parameters).
async fn rls_relations(db: &Db, sql: &str, params: usize) -> Result<Vec<String>, DbError> {
    let nulls = vec!["NULL"; params].join(", ");
    let execute = if params == 0 {
        "EXECUTE pgci_rls_check".to_string()
    } else {
        format!("EXECUTE pgci_rls_check({nulls})")
    };
    let client = db.client();
    let plan = async {
        client
            .batch_execute(&format!(
                "SET plan_cache_mode = force_generic_plan; PREPARE pgci_rls_check AS {sql}"
            ))
            .await?;
        // The simple protocol returns the plan (type json) as text.
        let messages = client
            .simple_query(&format!("EXPLAIN (FORMAT JSON, VERBOSE) {execute}"))
            .await;
        client
            .batch_execute("DEALLOCATE pgci_rls_check; RESET plan_cache_mode")
            .await?;
        Ok::<_, tokio_postgres::Error>(messages?.into_iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        }))
    }
    .await;
    // A query that cannot be planned this way is reported by `check`.
    let Ok(Some(plan)) = plan else {
        let _ = client
            .batch_execute("DEALLOCATE ALL; RESET plan_cache_mode")
            .await;
        return Ok(Vec::new());
    };
    let mut relations = Vec::new();
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(&plan) {
        collect_relations(&json, &mut relations);
    }
    relations.sort();
    relations.dedup();
    let mut protected = Vec::new();
    for (schema, name) in relations {
        let applies: Option<bool> = client
            .query_opt(
                "select c.relrowsecurity and (c.relforcerowsecurity or not pg_has_role(c.relowner, 'USAGE')) \
                   from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                  where n.nspname = $1 and c.relname = $2",
                &[&schema, &name],
            )
            .await
            .map_err(DbError::query("reading row-level security"))?
            .map(|r| r.get(0));
        if applies == Some(true) {
            protected.push(format!("{schema}.{name}"));
        }
    }
    Ok(protected)
}

/// Every (schema, relation) a JSON plan scans.
fn collect_relations(node: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match node {
        serde_json::Value::Object(map) => {
            if let (Some(schema), Some(name)) = (
                map.get("Schema").and_then(|v| v.as_str()),
                map.get("Relation Name").and_then(|v| v.as_str()),
            ) {
                out.push((schema.to_string(), name.to_string()));
            }
            map.values().for_each(|v| collect_relations(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_relations(v, out)),
        _ => {}
    }
}
