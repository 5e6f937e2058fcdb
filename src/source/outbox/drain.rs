//! Draining the outbox: claim the oldest rows no other drainer holds, turn
//! them into neutral changes, and delete them once Redis has applied them,
//! in the transaction that locked them.
//!
//! Rows carry record text (`ROW(...)::text`) of the captured columns,
//! rendered under pinned settings (ISO dates, UTC); [`Captures`] knows,
//! per table, where each captured field goes in a full-width row.

use std::collections::HashMap;

use bytes::Bytes;

use crate::change::{Change, Column, Row, RowOp, TableId, TableSchema, Value};
use crate::config::OutboxConfig;
use crate::db::{catalog, Db, DbError};
use crate::decode::json::parse_record;
use crate::plan::rules::{Action, RuleSet};
use crate::source::outbox::install::captured;
use crate::sql::quote_ident;

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

/// One outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Its id (order of writing).
    pub id: i64,
    /// WAL insert position when it was written (versions refreshed keys).
    pub lsn: String,
    /// Writer's transaction start, microseconds since 2000-01-01 UTC.
    pub created_micros: i64,
    /// `schema.table`.
    pub relation: String,
    /// insert, update, delete, truncate.
    pub op: String,
    /// Captured columns of the old row, record text.
    pub old_row: Option<String>,
    /// Captured columns of the new row, record text.
    pub new_row: Option<String>,
}

/// Most bytes of captured rows one claim holds: whole-row captures of a
/// refresh table can be large (a 100 kB document), and a claim's rows are
/// alive until Redis acknowledged them, alongside the pipeline's batches.
/// 2 MiB, like a pipeline batch, keeps a claim in the low MBs whatever the
/// rows hold while still amortising a round-trip over many rows.
pub const CLAIM_MAX_BYTES: usize = 2 << 20;
/// Rows fetched per round-trip while a claim fills.
const FETCH_ROWS: usize = 128;

/// Rows claimed by one outbox transaction.
#[derive(Debug, Default)]
pub struct Claim {
    /// The rows, oldest first.
    pub rows: Vec<OutboxRow>,
    /// The claim stopped at a bound (rows or bytes): more may be waiting.
    pub full: bool,
}

/// Opens a transaction and locks rows, oldest first, that no other drainer
/// holds: up to `batch_size` rows and about [`CLAIM_MAX_BYTES`]. The rows
/// are read through a cursor, which locks a row only when it is fetched,
/// so rows past the byte bound stay free for the next claim (or another
/// drainer). The caller applies them, then [`finish`]es.
pub async fn claim(db: &mut Db, cfg: &OutboxConfig) -> Result<Claim, DbError> {
    // The row limit is a validated integer (config), so it can be part of
    // the statement text: DECLARE takes no bind parameters.
    db.client()
        .batch_execute(&format!(
            "BEGIN; DECLARE pgci_claim NO SCROLL CURSOR FOR \
               select id, lsn::text, ((extract(epoch from created_at) - 946684800) * 1000000)::int8, \
                      relation, op, old_row, new_row \
                 from {}.outbox order by id limit {} for update skip locked",
            quote_ident(&cfg.schema),
            cfg.batch_size
        ))
        .await
        .map_err(DbError::query("reading the outbox"))?;
    let limit = cfg.batch_size as usize;
    let mut claim = Claim::default();
    let mut bytes = 0;
    loop {
        let want = FETCH_ROWS.min(limit - claim.rows.len());
        let fetched = db
            .client()
            .query(&format!("FETCH {want} FROM pgci_claim"), &[])
            .await
            .map_err(DbError::query("reading the outbox"))?;
        let got = fetched.len();
        for r in &fetched {
            let row = OutboxRow {
                id: r.get(0),
                lsn: r.get(1),
                created_micros: r.get(2),
                relation: r.get(3),
                op: r.get(4),
                old_row: r.get(5),
                new_row: r.get(6),
            };
            bytes += row.old_row.as_ref().map_or(0, String::len)
                + row.new_row.as_ref().map_or(0, String::len);
            claim.rows.push(row);
        }
        if got < want {
            break;
        }
        if claim.rows.len() >= limit || bytes >= CLAIM_MAX_BYTES {
            claim.full = true;
            break;
        }
    }
    db.client()
        .batch_execute("CLOSE pgci_claim")
        .await
        .map_err(DbError::query("reading the outbox"))?;
    Ok(claim)
}

/// Deletes the applied rows and commits (Redis has acknowledged them).
pub async fn finish(db: &mut Db, cfg: &OutboxConfig, ids: &[i64]) -> Result<(), DbError> {
    db.client()
        .execute(
            &format!(
                "delete from {}.outbox where id = any($1)",
                quote_ident(&cfg.schema)
            ),
            &[&ids],
        )
        .await
        .map_err(DbError::query("deleting applied outbox rows"))?;
    db.client()
        .batch_execute("COMMIT")
        .await
        .map_err(DbError::query("committing the outbox transaction"))
}

/// Says whether this session waits for a wake-up: capture triggers NOTIFY
/// only while some drainer waits (NOTIFY's commit-time lock would
/// otherwise serialise every writing transaction).
pub async fn set_waiting(db: &Db, cfg: &OutboxConfig, waiting: bool) -> Result<(), DbError> {
    let schema = quote_ident(&cfg.schema);
    db.execute_batch(&if waiting {
        format!("insert into {schema}.waiting (pid) values (pg_backend_pid()) on conflict (pid) do nothing")
    } else {
        format!("delete from {schema}.waiting where pid = pg_backend_pid()")
    })
    .await
}

/// Forgets waiters whose sessions are gone (a drainer killed while it
/// waited would make writers NOTIFY for nobody).
pub async fn forget_gone_waiters(db: &Db, cfg: &OutboxConfig) -> Result<(), DbError> {
    db.execute_batch(&format!(
        "delete from {}.waiting where pid not in (select pid from pg_stat_activity where pid is not null)",
        quote_ident(&cfg.schema)
    ))
    .await
}

/// Rows waiting and the age of the oldest, for `status`.
pub async fn backlog(db: &Db, cfg: &OutboxConfig) -> Result<(i64, Option<f64>), DbError> {
    let row = db
        .client()
        .query_one(
            &format!(
                "select count(*), extract(epoch from now() - min(created_at))::float8 from {}.outbox",
                quote_ident(&cfg.schema)
            ),
            &[],
        )
        .await
        .map_err(DbError::query("reading the outbox backlog"))?;
    Ok((row.get(0), row.get(1)))
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
