//! What an outbox row means: rows carry record text (`ROW(...)::text`) of
//! the captured columns, rendered under pinned settings (ISO dates, UTC);
//! [`Captures`] knows, per table, where each captured field goes in a
//! full-width row, and turns a row into a neutral change (or a flush of
//! the table's keys when it cannot).

use std::collections::HashMap;

use bytes::Bytes;

use super::drain::OutboxRow;
use crate::change::{Change, Column, Row, RowOp, TableId, TableSchema, Value};
use crate::config::OutboxConfig;
use crate::db::{catalog, Db, DbError};
use crate::decode::json::parse_record;
use crate::plan::rules::{Action, RuleSet};
use crate::source::outbox::install::captured;

/// A watched table as its outbox rows describe it.
struct Capture {
    id: TableId,
    /// Columns in the table.
    width: usize,
    /// Position in the table of each captured column, in record order.
    positions: Vec<usize>,
    /// The trigger captures whole rows (`NEW::text`), so a record has one
    /// field per current column: after an ADD COLUMN it is read by
    /// re-reading the table, not by waiting for `setup`.
    whole_row: bool,
}

/// What one outbox row carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The change (or a flush of the table, for a row that cannot be read).
    Change(Change),
    /// Nothing to apply: a table no rule watches.
    Nothing,
    /// A whole-row record does not match the table as last read: the table
    /// changed (ADD or DROP COLUMN); read the captures again and retry.
    Stale,
}

/// The watched tables' schemas and captured columns, read when a session
/// opens.
pub struct Captures {
    by_relation: HashMap<String, Capture>,
}

impl Captures {
    /// Reads each watched table's columns and what its trigger captures;
    /// returns the schemas to describe to the planner too.
    pub async fn read(
        db: &Db,
        cfg: &OutboxConfig,
        rules: &RuleSet,
    ) -> Result<(Captures, Vec<TableSchema>), DbError> {
        let mut by_relation = HashMap::new();
        let mut schemas = Vec::new();
        for (table, table_rules) in rules.tables() {
            let Some(info) = catalog::inspect_table(db, table).await? else {
                continue;
            };
            let whole_row = table_rules
                .iter()
                .any(|r| r.action == Action::Refresh && r.query.is_none());
            let positions = if whole_row {
                (0..info.columns.len()).collect()
            } else {
                let columns = captured(db, cfg, table).await?.unwrap_or_default();
                let positions = columns
                    .iter()
                    .filter_map(|c| info.columns.iter().position(|col| &col.name == c))
                    .collect::<Vec<_>>();
                if positions.len() != columns.len() {
                    tracing::error!(table = %table, "captured columns no longer match the table: run setup");
                }
                positions
            };
            by_relation.insert(
                table.to_string(),
                Capture {
                    id: info.oid,
                    width: info.columns.len(),
                    positions,
                    whole_row,
                },
            );
            schemas.push(TableSchema {
                id: info.oid,
                name: table.clone(),
                identity: None,
                columns: info
                    .columns
                    .iter()
                    .map(|c| Column {
                        name: c.name.clone(),
                        type_oid: c.type_oid,
                    })
                    .collect(),
            });
        }
        Ok((Captures { by_relation }, schemas))
    }

    /// The change one outbox row carries. A row that cannot be read (its
    /// table's capture no longer matches) flushes every key of that
    /// table's rules instead: an invalidation is never skipped. A whole-row
    /// record of another width is [`Read::Stale`] unless `retried`.
    pub fn decode(&self, row: &OutboxRow, retried: bool) -> Read {
        let Some(capture) = self.by_relation.get(&row.relation) else {
            tracing::warn!(relation = %row.relation, "outbox row for a table no rule watches; dropped");
            return Read::Nothing;
        };
        let stale = |record: &Option<String>| {
            record
                .as_deref()
                .is_some_and(|r| parse_record(r).is_ok_and(|f| f.len() != capture.width))
        };
        if capture.whole_row && !retried && (stale(&row.old_row) || stale(&row.new_row)) {
            return Read::Stale;
        }
        match self.change(capture, row) {
            Some(change) => Read::Change(change),
            None => Read::Nothing,
        }
    }

    fn change(&self, capture: &Capture, row: &OutboxRow) -> Option<Change> {
        let op = match row.op.as_str() {
            "insert" => RowOp::Insert,
            "update" => RowOp::Update,
            "delete" => RowOp::Delete,
            _ => {
                return Some(Change::Truncate {
                    tables: vec![capture.id],
                })
            }
        };
        let old = row.old_row.as_deref().map(|r| capture.row(r));
        let new = row.new_row.as_deref().map(|r| capture.row(r));
        match (old, new) {
            (Some(None), _) | (_, Some(None)) => {
                tracing::error!(relation = %row.relation, id = row.id,
                    "outbox row does not match the captured columns; flushing the table's keys");
                Some(Change::Truncate {
                    tables: vec![capture.id],
                })
            }
            (old, new) => Some(Change::Row {
                table: capture.id,
                op,
                old: old.flatten(),
                new: new.flatten(),
            }),
        }
    }
}

impl Capture {
    /// A captured record as a full-width row (uncaptured columns NULL), or
    /// `None` if it does not parse or has the wrong number of fields.
    fn row(&self, record: &str) -> Option<Row> {
        let fields = parse_record(record).ok()?;
        if fields.len() != self.positions.len() {
            return None;
        }
        let mut row = vec![Value::Null; self.width];
        for (field, &position) in fields.into_iter().zip(&self.positions) {
            if let Some(text) = field {
                row[position] = Value::Text(Bytes::from(text));
            }
        }
        Some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captures() -> Captures {
        let mut by_relation = HashMap::new();
        by_relation.insert(
            "public.user_tokens".to_string(),
            Capture {
                id: 9,
                width: 4,
                positions: vec![1, 3],
                whole_row: false,
            },
        );
        Captures { by_relation }
    }

    fn row(op: &str, old: Option<&str>, new: Option<&str>) -> OutboxRow {
        OutboxRow {
            xid: "1000".into(),
            id: 1,
            lsn: "0/1".into(),
            created_micros: 0,
            relation: "public.user_tokens".into(),
            op: op.into(),
            old_row: old.map(str::to_string),
            new_row: new.map(str::to_string),
        }
    }

    #[test]
    fn rows_become_full_width_changes_or_flushes() {
        let c = captures();
        let text = |s: &'static str| Value::Text(Bytes::from_static(s.as_bytes()));
        assert_eq!(
            c.decode(&row("update", Some("(u1,t1)"), Some("(u2,)")), false),
            Read::Change(Change::Row {
                table: 9,
                op: RowOp::Update,
                old: Some(vec![Value::Null, text("u1"), Value::Null, text("t1")]),
                new: Some(vec![Value::Null, text("u2"), Value::Null, Value::Null]),
            })
        );
        assert_eq!(
            c.decode(&row("insert", None, Some("(only-one)")), false),
            Read::Change(Change::Truncate { tables: vec![9] }),
            "a record of the wrong width flushes the table"
        );
        assert_eq!(
            c.decode(&row("truncate", None, None), false),
            Read::Change(Change::Truncate { tables: vec![9] })
        );
        let mut other = row("insert", None, Some("(a,b)"));
        other.relation = "public.other".into();
        assert_eq!(c.decode(&other, false), Read::Nothing);
        let mut whole = captures();
        if let Some(capture) = whole.by_relation.get_mut("public.user_tokens") {
            capture.whole_row = true;
            capture.positions = vec![0, 1, 2, 3];
        }
        assert_eq!(
            whole.decode(&row("insert", None, Some("(1,u,t,5,new)")), false),
            Read::Stale,
            "a record wider than the table: the table changed"
        );
        assert_eq!(
            whole.decode(&row("insert", None, Some("(1,u,t,5,new)")), true),
            Read::Change(Change::Truncate { tables: vec![9] }),
            "still not matching after a re-read: flush"
        );
    }
}
