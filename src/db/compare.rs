//! Comparing a cached JSON value with what the database says now, for
//! `verify`. The comparison runs inside PostgreSQL (`jsonb = jsonb`), so
//! numerics compare exactly and key order or spacing never matter.

use std::collections::HashMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

use super::query::TextParam;
use super::{Db, DbError};
use crate::change::TableName;
use crate::plan::rules::ColumnFilter;
use crate::sql::quote_literal;

/// What the database says about a cached value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compared {
    /// The value is what the database would have cached now.
    Same,
    /// The value differs.
    Differs,
    /// There is no such row (or the query answers NULL): the key should
    /// not exist.
    Gone,
    /// The key's columns match several rows: the key does not name a row.
    Ambiguous,
}

/// What a key's value should be.
#[derive(Debug, Clone)]
pub enum Expected<'a> {
    /// The row of `table` whose `columns` equal the key's values, as
    /// `to_jsonb` renders it, filtered.
    Row {
        /// The table.
        table: &'a TableName,
        /// Which columns the value holds.
        filter: &'a ColumnFilter,
        /// The columns the key names, in the order values are given.
        columns: Vec<&'a str>,
    },
    /// A refresh rule's query, with `$1…` from the key's values.
    Query {
        /// The user's SQL.
        sql: &'a str,
    },
}

impl Expected<'_> {
    /// The comparing statement: `$1` is the cached JSON, then the values.
    fn sql(&self) -> String {
        match self {
            Expected::Row {
                table,
                filter,
                columns,
            } => {
                let value = match filter {
                    ColumnFilter::All => "to_jsonb(t)".to_string(),
                    ColumnFilter::Exclude(cols) => format!(
                        "to_jsonb(t) - array[{}]::text[]",
                        cols.iter().map(|c| quote_literal(c)).collect::<Vec<_>>().join(", ")
                    ),
                    ColumnFilter::Include(cols) => format!(
                        "(select coalesce(jsonb_object_agg(e.key, e.value), '{{}}'::jsonb) from jsonb_each(to_jsonb(t)) e where e.key in ({}))",
                        cols.iter().map(|c| quote_literal(c)).collect::<Vec<_>>().join(", ")
                    ),
                };
                let filter = columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("t.{} = ${}", crate::sql::quote_ident(c), i + 2))
                    .collect::<Vec<_>>()
                    .join(" and ");
                format!(
                    "select ({value}) = $1::text::jsonb from {} t where {filter}",
                    table.quoted()
                )
            }
            Expected::Query { sql } => {
                // The user's $1, $2… become $2, $3…: $1 is the cached value.
                let shifted = shift_params(sql);
                format!("select (({shifted}))::jsonb = $1::text::jsonb")
            }
        }
    }
}

/// Renumbers `$n` placeholders to `$n+1` (outside quoted text).
fn shift_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(ch) = chars.next() {
        match quote {
            Some(q) => {
                out.push(ch);
                if ch == q {
                    quote = None;
                }
            }
            None if ch == '\'' || ch == '"' => {
                quote = Some(ch);
                out.push(ch);
            }
            None if ch == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                let n: u32 = digits.parse().unwrap_or(0);
                out.push_str(&format!("${}", n + 1));
            }
            None => out.push(ch),
        }
    }
    out
}

/// Compares cached values with the database, preparing each statement once.
pub struct Comparer<'a> {
    db: &'a Db,
    statements: HashMap<String, Statement>,
}

impl<'a> Comparer<'a> {
    /// A comparer on `db`.
    pub fn new(db: &'a Db) -> Self {
        Comparer {
            db,
            statements: HashMap::new(),
        }
    }

    /// Compares `cached` (JSON text) with `expected` for a key whose
    /// placeholders hold `values`. A value the server cannot take for its
    /// column (a key some other program wrote) is an error of this key only.
    pub async fn compare(
        &mut self,
        expected: &Expected<'_>,
        cached: &str,
        values: &[&str],
    ) -> Result<Compared, DbError> {
        let sql = expected.sql();
        let statement = match self.statements.get(&sql) {
            Some(s) => s.clone(),
            None => {
                let s = self
                    .db
                    .client()
                    .prepare(&sql)
                    .await
                    .map_err(DbError::query(format!("preparing {sql}")))?;
                self.statements.insert(sql.clone(), s.clone());
                s
            }
        };
        let mut params = vec![TextParam(Some(cached))];
        params.extend(values.iter().map(|v| TextParam(Some(v))));
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = self
            .db
            .client()
            .query(&statement, &refs)
            .await
            .map_err(DbError::query("comparing a cached value"))?;
        if rows.len() > 1 {
            return Ok(Compared::Ambiguous);
        }
        Ok(
            match rows.first().and_then(|r| r.get::<_, Option<bool>>(0)) {
                Some(true) => Compared::Same,
                Some(false) => Compared::Differs,
                None => Compared::Gone,
            },
        )
    }

    /// The server's current WAL position (`pg_current_wal_lsn()`).
    pub async fn wal_position(&self) -> Result<Option<crate::lsn::Lsn>, DbError> {
        let text: String = self
            .db
            .client()
            .query_one("select pg_current_wal_lsn()::text", &[])
            .await
            .map_err(DbError::query("reading the WAL position"))?
            .get(0);
        Ok(text.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placeholders move up by one; quoted text is left alone.
    #[test]
    fn params_shift_outside_quotes() {
        assert_eq!(
            shift_params("select x from t where a = $1 and b = '$1' and c = $12"),
            "select x from t where a = $2 and b = '$1' and c = $13"
        );
    }
}
