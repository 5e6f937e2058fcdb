//! The change model both sources produce and the planner consumes.
//!
//! It knows nothing of the wire: the replication source builds it from
//! pgoutput messages, the outbox source from captured record text. A table
//! is described once ([`TableSchema`], again after it changes), and rows
//! refer to it by id; a row is one [`Value`] per column, in column order.

use std::fmt;

use bytes::Bytes;

use crate::sql::quote_ident;

/// A schema-qualified table name, compared case-sensitively as stored in
/// the catalog.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// The schema (`public` when the rule omits it).
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table`.
    pub fn parse(text: &str) -> Option<TableName> {
        let (schema, name) = text.split_once('.').unwrap_or(("public", text));
        let valid = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains(['.', '"']);
        (valid(schema) && valid(name)).then(|| TableName {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// The name as SQL, each part double-quoted: `"public"."profiles"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// Read from the configuration file as `schema.table` or `table`: a name
/// that is not one fails when the file is read, naming its field.
impl<'de> serde::Deserialize<'de> for TableName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        TableName::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not a table name like \"public.profiles\""
            ))
        })
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// How the stream names a table: its OID.
pub type TableId = u32;

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The column name.
    pub name: String,
    /// Its type OID (for encoding refreshed rows).
    pub type_oid: u32,
}

/// A table as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    /// The id rows refer to it by.
    pub id: TableId,
    /// Its name.
    pub name: TableName,
    /// Its columns, in order.
    pub columns: Vec<Column>,
    /// The columns the source says an old row carries (the replica
    /// identity, from each pgoutput Relation message); `None` when the
    /// source does not say (the outbox captures what the rules need).
    pub identity: Option<Vec<String>>,
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL (also a column the source did not capture or send in an
    /// old-key row).
    Null,
    /// The value did not travel: an unchanged TOASTed value.
    Unchanged,
    /// The value in PostgreSQL's text output format.
    Text(Bytes),
}

/// A row: one [`Value`] per column of the table, in column order.
pub type Row = Vec<Value>;

/// The kind of row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    /// INSERT
    Insert,
    /// UPDATE
    Update,
    /// DELETE
    Delete,
}

/// One change inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A table is (re-)described; rows after this refer to it.
    Schema(TableSchema),
    /// A row changed.
    Row {
        /// Which table.
        table: TableId,
        /// How.
        op: RowOp,
        /// The old row, when the source has it (an UPDATE of a key column
        /// or under REPLICA IDENTITY FULL, a DELETE's identity columns).
        old: Option<Row>,
        /// The new row (INSERT and UPDATE).
        new: Option<Row>,
    },
    /// Tables were truncated.
    Truncate {
        /// Which tables.
        tables: Vec<TableId>,
    },
}
