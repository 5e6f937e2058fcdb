//! What the live database says about the watched tables, and whether the
//! rules can work against it.
//!
//! The key question is the replica identity. The old row's columns travel in
//! the stream only if they belong to it: a DELETE carries just the identity
//! columns, an UPDATE carries the old identity only when an identity column
//! changed. So every column any key template of a table uses must be part
//! of the table's identity, or a DELETE could not render its keys. Where
//! that fails, the message carries the exact `ALTER TABLE` that fixes it.
//!
//! This file reads the catalog; [`checks`] turns what it reads into one
//! line per problem for `check-config`, `setup` and `run`; [`rls`] warns
//! about row-level security that would hide rows from refresh queries.

mod checks;
mod rls;

use std::collections::BTreeSet;

use crate::change::TableName;
use crate::db::{Db, DbError};
use crate::sql::quote_ident;

pub use checks::{
    describe_identity, generated_column_problems, missing_table, needed_generated_columns,
};
pub use rls::warnings;

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
    /// For a partitioned table, its leaf partitions: their replica
    /// identities (not the parent's) decide what a DELETE carries.
    pub partitions: Vec<TableInfo>,
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
    /// The tables whose replica identity lacks some of `needed`, with the
    /// missing columns: the table itself, or for a partitioned table each
    /// leaf partition that lacks them.
    pub fn identity_gaps(&self, needed: &BTreeSet<String>) -> Vec<(&TableInfo, Vec<String>)> {
        let tables: Vec<&TableInfo> = if self.partitions.is_empty() {
            vec![self]
        } else {
            self.partitions.iter().collect()
        };
        tables
            .into_iter()
            .filter_map(|t| {
                let missing: Vec<String> =
                    needed.difference(&t.identity_columns()).cloned().collect();
                (!missing.is_empty()).then_some((t, missing))
            })
            .collect()
    }

    /// Whether it is a partitioned table.
    pub fn is_partitioned(&self) -> bool {
        !self.partitions.is_empty()
    }

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
            "select c.oid, c.relreplident::text, c.relkind = 'p' from pg_class c \
             join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(DbError::query(format!("reading table {table}")))?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let replica_identity = row.get::<_, String>(1).chars().next().unwrap_or('d');
    let partitioned: bool = row.get(2);
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
    let mut partitions = Vec::new();
    if partitioned {
        let leaves = client
            .query(
                "select n.nspname::text, c.relname::text from pg_partition_tree($1::oid::regclass) t \
                   join pg_class c on c.oid = t.relid join pg_namespace n on n.oid = c.relnamespace \
                  where t.isleaf order by 1, 2",
                &[&oid],
            )
            .await
            .map_err(DbError::query(format!("reading partitions of {table}")))?;
        for leaf in &leaves {
            let name = TableName {
                schema: leaf.get(0),
                name: leaf.get(1),
            };
            if let Some(info) = Box::pin(inspect_table(db, &name)).await? {
                partitions.push(info);
            }
        }
    }
    Ok(Some(TableInfo {
        name: table.clone(),
        oid,
        replica_identity,
        columns,
        indexes,
        partitions,
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
    /// Whether partitions' changes are published as their root table's
    /// (`publish_via_partition_root`), which rules naming the partitioned
    /// table need.
    pub via_root: bool,
}

/// Reads a publication; `None` if it does not exist.
pub async fn inspect_publication(db: &Db, name: &str) -> Result<Option<PublicationInfo>, DbError> {
    let client = db.client();
    let row = client
        .query_opt(
            "select puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, \
                    coalesce(to_jsonb(p) ->> 'pubgencols', 'n') in ('s', 'true'), pubviaroot \
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
        via_root: row.get(6),
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
    /// A failover slot (PostgreSQL 17+; `None` before).
    pub failover: Option<bool>,
    /// Synchronized from a primary (on a standby; 17+).
    pub synced: Option<bool>,
}

/// The server's newest WAL position as SQL: where it writes on a
/// primary, where it has replayed to on a standby (which has no current
/// write position and holds slots when it decodes, see `replication.url`).
pub const WAL_NOW: &str = "(case when pg_is_in_recovery() then pg_last_wal_replay_lsn() \
                           else pg_current_wal_lsn() end)";

/// Reads a slot (on a primary or a standby); `None` if it does not exist.
pub async fn inspect_slot(db: &Db, slot: &str) -> Result<Option<SlotInfo>, DbError> {
    let row = db
        .client()
        .query_opt(
            &format!(
                "select slot_name::text, plugin::text, slot_type::text, database::text, active, \
                    active_pid, confirmed_flush_lsn::text, \
                    (cur.lsn - confirmed_flush_lsn)::int8, \
                    (cur.lsn - restart_lsn)::int8, wal_status::text, \
                    (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool \
               from pg_replication_slots s, (select {WAL_NOW} as lsn) cur \
              where slot_name = $1"
            ),
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
        failover: r.get(10),
        synced: r.get(11),
    }))
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

/// The server's `wal_level`.
pub async fn wal_level(db: &Db) -> Result<String, DbError> {
    let row = db
        .client()
        .query_one("select current_setting('wal_level')", &[])
        .await
        .map_err(DbError::query("reading wal_level"))?;
    Ok(row.get(0))
}

/// A setting's value as `SHOW` prints it (empty when the server does not
/// know the name).
pub async fn setting(db: &Db, name: &str) -> Result<String, DbError> {
    let row = db
        .client()
        .query_one("select coalesce(current_setting($1, true), '')", &[&name])
        .await
        .map_err(DbError::query(format!("reading {name}")))?;
    Ok(row.get(0))
}

/// Whether the server is a standby (`pg_is_in_recovery()`).
pub async fn in_recovery(db: &Db) -> Result<bool, DbError> {
    let row = db
        .client()
        .query_one("select pg_is_in_recovery()", &[])
        .await
        .map_err(DbError::query("asking whether the server is a standby"))?;
    Ok(row.get(0))
}

/// The cluster's system identifier: the same on a primary and every
/// physical standby of it.
pub async fn system_identifier(db: &Db) -> Result<i64, DbError> {
    let row = db
        .client()
        .query_one(
            "select system_identifier::int8 from pg_control_system()",
            &[],
        )
        .await
        .map_err(DbError::query("reading the system identifier"))?;
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
            partitions: Vec::new(),
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
