//! What the live database says about the watched tables, and whether the
//! rules can work against it.
//!
//! The key question is the replica identity. The old row's columns travel in
//! the stream only if they belong to it: a DELETE carries just the identity
//! columns, an UPDATE carries the old identity only when an identity column
//! changed. So every column any key template of a table uses must be part
//! of the table's identity, or a DELETE could not render its keys. Where
//! that fails, the message carries the exact `ALTER TABLE` that fixes it.

use std::collections::BTreeSet;

use crate::change::TableName;
use crate::db::{Db, DbError};
use crate::plan::rules::{Action, Rule, RuleSet};
use crate::sql::quote_ident;

/// A column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Its name.
    pub name: String,
    /// Whether it is NOT NULL.
    pub not_null: bool,
    /// Its type OID.
    pub type_oid: u32,
    /// `attgenerated`: `s` stored or `v` virtual generated column, else
    /// `None`.
    pub generated: Option<char>,
}

/// An index of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexInfo {
    /// The index name (unqualified; it lives in the table's schema).
    pub name: String,
    /// Its columns in order.
    pub columns: Vec<String>,
    /// Whether it is the primary key.
    pub is_primary: bool,
    /// Whether it is the table's `REPLICA IDENTITY USING INDEX`.
    pub is_replica_identity: bool,
    /// Unique, immediate, valid, not partial, no expressions: may serve as
    /// a replica identity if its columns are NOT NULL.
    pub unique_plain: bool,
}

/// A watched table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The table.
    pub name: TableName,
    /// Its OID.
    pub oid: u32,
    /// `relreplident`: `d`, `n`, `f` or `i`.
    pub replica_identity: char,
    /// Its live columns.
    pub columns: Vec<ColumnInfo>,
    /// Its indexes.
    pub indexes: Vec<IndexInfo>,
}

/// A replica identity setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// `REPLICA IDENTITY DEFAULT` (the primary key).
    Default,
    /// `REPLICA IDENTITY USING INDEX name`.
    Index(String),
    /// `REPLICA IDENTITY FULL`.
    Full,
}

impl Identity {
    /// The statement that sets it on `table`.
    pub fn alter_sql(&self, table: &TableName) -> String {
        let how = match self {
            Identity::Default => "DEFAULT".to_string(),
            Identity::Index(name) => format!("USING INDEX {}", quote_ident(name)),
            Identity::Full => "FULL".to_string(),
        };
        format!("ALTER TABLE {} REPLICA IDENTITY {how};", table.quoted())
    }
}

impl TableInfo {
    /// The columns a DELETE carries under the current replica identity.
    pub fn identity_columns(&self) -> BTreeSet<String> {
        let from_index = |pick: &dyn Fn(&IndexInfo) -> bool| {
            self.indexes
                .iter()
                .find(|i| pick(i))
                .map(|i| i.columns.iter().cloned().collect())
                .unwrap_or_default()
        };
        match self.replica_identity {
            'f' => self.columns.iter().map(|c| c.name.clone()).collect(),
            'd' => from_index(&|i| i.is_primary),
            'i' => from_index(&|i| i.is_replica_identity),
            _ => BTreeSet::new(),
        }
    }

    /// The cheapest identity whose columns cover `needed`: the primary key,
    /// else the narrowest usable unique index over NOT NULL columns, else
    /// FULL (which makes every UPDATE and DELETE log the whole old row).
    pub fn cheapest_identity(&self, needed: &BTreeSet<String>) -> Identity {
        let covers = |i: &IndexInfo| needed.iter().all(|c| i.columns.contains(c));
        if self.indexes.iter().any(|i| i.is_primary && covers(i)) {
            return Identity::Default;
        }
        let not_null = |col: &String| self.columns.iter().any(|c| &c.name == col && c.not_null);
        self.indexes
            .iter()
            .filter(|i| i.unique_plain && covers(i) && i.columns.iter().all(not_null))
            .min_by_key(|i| (i.columns.len(), i.name.clone()))
            .map_or(Identity::Full, |i| Identity::Index(i.name.clone()))
    }
}

/// Reads a table's description; `None` if it does not exist.
pub async fn inspect_table(db: &Db, table: &TableName) -> Result<Option<TableInfo>, DbError> {
    let client = db.client();
    let row = client
        .query_opt(
            "select c.oid, c.relreplident::text from pg_class c \
             join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(DbError::query(format!("reading table {table}")))?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let replica_identity = row.get::<_, String>(1).chars().next().unwrap_or('d');
    let columns = client
        .query(
            "select attname::text, attnotnull, atttypid, attgenerated::text from pg_attribute \
             where attrelid = $1 and attnum > 0 and not attisdropped order by attnum",
            &[&oid],
        )
        .await
        .map_err(DbError::query(format!("reading columns of {table}")))?
        .iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            not_null: r.get(1),
            type_oid: r.get(2),
            generated: r.get::<_, String>(3).chars().next(),
        })
        .collect();
    let indexes = client
        .query(
            "select ic.relname::text, i.indisprimary, i.indisreplident, \
                    i.indisunique and i.indimmediate and i.indisvalid \
                      and i.indpred is null and i.indexprs is null, \
                    array(select a.attname::text \
                            from unnest(i.indkey::int2[]) with ordinality k(attnum, ord) \
                            join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum \
                           order by k.ord) \
               from pg_index i join pg_class ic on ic.oid = i.indexrelid \
              where i.indrelid = $1 order by ic.relname",
            &[&oid],
        )
        .await
        .map_err(DbError::query(format!("reading indexes of {table}")))?
        .iter()
        .map(|r| IndexInfo {
            name: r.get(0),
            is_primary: r.get(1),
            is_replica_identity: r.get(2),
            unique_plain: r.get(3),
            columns: r.get(4),
        })
        .collect();
    Ok(Some(TableInfo {
        name: table.clone(),
        oid,
        replica_identity,
        columns,
        indexes,
    }))
}

/// A publication's settings.
#[derive(Debug, Clone)]
pub struct PublicationInfo {
    /// Publishes every table.
    pub all_tables: bool,
    /// Which operations it publishes, as `insert`, `update`, … names.
    pub missing_operations: Vec<&'static str>,
    /// The tables it lists.
    pub tables: BTreeSet<TableName>,
    /// Whether it publishes stored generated columns (PostgreSQL 18's
    /// `publish_generated_columns = stored`).
    pub generated_columns: bool,
}

/// Reads a publication; `None` if it does not exist.
pub async fn inspect_publication(db: &Db, name: &str) -> Result<Option<PublicationInfo>, DbError> {
    let client = db.client();
    let row = client
        .query_opt(
            "select puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, \
                    coalesce(to_jsonb(p) ->> 'pubgencols', 'n') in ('s', 'true') \
             from pg_publication p where pubname = $1",
            &[&name],
        )
        .await
        .map_err(DbError::query(format!("reading publication {name}")))?;
    let Some(row) = row else { return Ok(None) };
    let mut missing_operations = Vec::new();
    for (i, op) in ["insert", "update", "delete", "truncate"]
        .into_iter()
        .enumerate()
    {
        if !row.get::<_, bool>(i + 1) {
            missing_operations.push(op);
        }
    }
    let tables = client
        .query(
            "select schemaname::text, tablename::text from pg_publication_tables where pubname = $1",
            &[&name],
        )
        .await
        .map_err(DbError::query(format!("reading tables of publication {name}")))?
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect();
    Ok(Some(PublicationInfo {
        generated_columns: row.get(5),
        all_tables: row.get(0),
        missing_operations,
        tables,
    }))
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotInfo {
    /// Slot name.
    pub slot: String,
    /// Output plugin (`pgoutput` for ours).
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// The database of a logical slot.
    pub database: Option<String>,
    /// Whether a session is streaming from it.
    pub active: bool,
    /// That session's backend pid.
    pub active_pid: Option<i32>,
    /// Everything before this LSN is confirmed applied.
    pub confirmed_flush_lsn: Option<String>,
    /// Server WAL position minus confirmed LSN, in bytes.
    pub lag_bytes: Option<i64>,
    /// WAL the slot keeps on disk (current position minus restart LSN).
    pub retained_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// Reads a slot; `None` if it does not exist.
pub async fn inspect_slot(db: &Db, slot: &str) -> Result<Option<SlotInfo>, DbError> {
    let row = db
        .client()
        .query_opt(
            "select slot_name::text, plugin::text, slot_type::text, database::text, active, \
                    active_pid, confirmed_flush_lsn::text, \
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, \
                    (pg_current_wal_lsn() - restart_lsn)::int8, wal_status::text \
               from pg_replication_slots where slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(DbError::query(format!("reading replication slot {slot}")))?;
    Ok(row.map(|r| SlotInfo {
        slot: r.get(0),
        plugin: r.get(1),
        slot_type: r.get(2),
        database: r.get(3),
        active: r.get(4),
        active_pid: r.get(5),
        confirmed_flush_lsn: r.get(6),
        lag_bytes: r.get(7),
        retained_bytes: r.get(8),
        wal_status: r.get(9),
    }))
}

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

/// The server's major version (15, 18, ...).
pub async fn server_major(db: &Db) -> Result<i32, DbError> {
    let row = db
        .client()
        .query_one(
            "select current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await
        .map_err(DbError::query("reading the server version"))?;
    Ok(row.get(0))
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

/// The server's `wal_level`.
pub async fn wal_level(db: &Db) -> Result<String, DbError> {
    let row = db
        .client()
        .query_one("select current_setting('wal_level')", &[])
        .await
        .map_err(DbError::query("reading wal_level"))?;
    Ok(row.get(0))
}

/// The current database name.
pub async fn current_database(db: &Db) -> Result<String, DbError> {
    let row = db
        .client()
        .query_one("select current_database()::text", &[])
        .await
        .map_err(DbError::query("reading current_database()"))?;
    Ok(row.get(0))
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
            let identity = info.identity_columns();
            let missing: Vec<_> = needed.difference(&identity).cloned().collect();
            if !missing.is_empty() {
                let fix = info.cheapest_identity(&needed).alter_sql(table);
                problems.push(format!(
                    "table {table}: a DELETE would not carry column(s) {} needed by its key templates (replica identity {}): run `{fix}` or pg-cache-invalidator setup",
                    missing.join(", "),
                    describe_identity(&info),
                ));
            }
        }
        existing.push(table.clone());
        if info.columns.iter().any(|c| c.generated.is_some()) {
            generated.push((info, table_rules));
        }
    }
    let publication = inspect_publication(db, scope.publication).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TableInfo {
        let col = |name: &str, not_null: bool| ColumnInfo {
            name: name.into(),
            not_null,
            type_oid: 25,
            generated: None,
        };
        let idx = |name: &str, cols: &[&str], primary: bool| IndexInfo {
            name: name.into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            is_primary: primary,
            is_replica_identity: false,
            unique_plain: true,
        };
        TableInfo {
            name: TableName::parse("public.user_journeys").expect("valid"),
            oid: 1,
            replica_identity: 'd',
            columns: vec![
                col("id", true),
                col("user_id", true),
                col("pillar_id", true),
                col("route_id", false),
                col("slug", true),
            ],
            indexes: vec![
                idx("pk", &["id"], true),
                idx("wide", &["user_id", "pillar_id", "slug"], false),
                idx("narrow", &["user_id", "pillar_id"], false),
                idx("nullable", &["user_id", "route_id"], false),
            ],
        }
    }

    fn set(cols: &[&str]) -> BTreeSet<String> {
        cols.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn picks_the_cheapest_identity() {
        let t = table();
        assert_eq!(t.identity_columns(), set(&["id"]));
        assert_eq!(t.cheapest_identity(&set(&["id"])), Identity::Default);
        assert_eq!(
            t.cheapest_identity(&set(&["user_id"])),
            Identity::Index("narrow".into())
        );
        assert_eq!(t.cheapest_identity(&set(&["route_id"])), Identity::Full);
        assert_eq!(
            Identity::Index("narrow".into()).alter_sql(&t.name),
            "ALTER TABLE \"public\".\"user_journeys\" REPLICA IDENTITY USING INDEX \"narrow\";"
        );
    }

    #[test]
    fn full_identity_covers_every_column() {
        let mut t = table();
        t.replica_identity = 'f';
        assert!(t.identity_columns().contains("route_id"));
        t.replica_identity = 'n';
        assert!(t.identity_columns().is_empty());
    }
}
