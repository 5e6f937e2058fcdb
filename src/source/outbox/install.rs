//! `setup`, `teardown` and `check-config` for the `outbox` source: the
//! outbox table, one capture trigger function per watched table, row and
//! TRUNCATE triggers.
//!
//! A trigger writes one outbox row per changed row in the writer's own
//! transaction, so a change and its invalidation commit or roll back
//! together. Rows carry only what the rules need: the key (and query
//! parameter) columns of the old and new row, or the whole row for tables
//! with `refresh` rules, as PostgreSQL record text (`ROW(...)::text`),
//! rendered under the same pinned settings as the replication stream
//! (ISO dates, UTC) so the same decoder reads both. `pg_notify` only wakes
//! the daemon: identical notifications in one transaction are folded into
//! one, and the daemon polls anyway, so a lost wake-up delays, never loses.
//!
//! The outbox is partitioned in two. Writers fill the partition `state`
//! names; the drain reads rows by their writer's transaction id, never
//! locks or deletes them, and empties a partition with TRUNCATE once it is
//! drained and writers fill the other one (see [`super::drain`]). Writers
//! read `state` once per row: it also says whether the drainer waits for a
//! wake-up.

use std::collections::BTreeSet;

use crate::change::TableName;
use crate::config::OutboxConfig;
use crate::db::catalog::TableInfo;
use crate::db::{ConnInfo, Db, DbError};
use crate::plan::rules::{Action, Rule, RuleSet};
use futures_util::future::BoxFuture;

use crate::source::install::{Plan, SourceSetup, SourceStatus, Step};
use crate::source::walk::{self, Walked};
use crate::sql::{quote_ident, quote_literal};

/// Types whose text output depends on session settings: date, time,
/// timetz, timestamp, timestamptz, interval, float4, float8 (and their
/// arrays).
const FORMAT_SENSITIVE_TYPES: &[u32] = &[
    1082, 1083, 1266, 1114, 1184, 1186, 700, 701, 1182, 1183, 1270, 1115, 1185, 1187, 1021, 1022,
];

/// Trigger names (per table).
const ROW_TRIGGER: &str = "pgci_capture";
const TRUNCATE_TRIGGER: &str = "pgci_capture_truncate";

/// The columns captured for `table`: every column if a rule refreshes whole
/// rows, else the key and parameter columns, in table order.
pub fn captured_columns(info: &TableInfo, rules: &[Rule]) -> Vec<String> {
    let whole_row = rules
        .iter()
        .any(|r| r.action == Action::Refresh && r.query.is_none());
    let needed: BTreeSet<String> = RuleSet::key_columns(rules);
    info.columns
        .iter()
        .filter(|c| whole_row || needed.contains(&c.name))
        .map(|c| c.name.clone())
        .collect()
}

/// The trigger function's name for `table`: readable, and never over the
/// 63-byte identifier limit (long names get a hash suffix).
pub fn function_name(table: &TableName) -> String {
    let name = format!("capture_{}_{}", table.schema, table.name);
    // With an underscore in the schema the joined name is ambiguous
    // (`app.user_tokens` and `app_user.tokens`): a hash of the exact pair
    // tells them apart.
    let ambiguous = table.schema.contains('_');
    if name.len() <= 63 && !ambiguous {
        return name;
    }
    let hash = [table.schema.as_bytes(), b".", table.name.as_bytes()]
        .concat()
        .into_iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let mut cut = name.len().min(50);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{:08x}", &name[..cut], hash as u32)
}

fn row_expr(var: &str, columns: &[String], all: usize) -> String {
    if columns.len() == all {
        format!("{var}::text")
    } else {
        let fields: Vec<String> = columns
            .iter()
            .map(|c| format!("{var}.{}", quote_ident(c)))
            .collect();
        format!("ROW({})::text", fields.join(", "))
    }
}

/// The outbox source's [`SourceSetup`]: the outbox tables and each
/// table's capture trigger.
pub struct OutboxSetup<'c> {
    /// Its schema and settings.
    pub cfg: &'c OutboxConfig,
}

impl SourceSetup for OutboxSetup<'_> {
    fn status<'a>(
        &'a self,
        db: &'a Db,
        _conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<SourceStatus, DbError>> {
        Box::pin(async move {
            let (rows, oldest) = super::drain::backlog(db, self.cfg).await?;
            Ok(SourceStatus::Found {
                rows: vec![
                    ("source", "outbox".to_string()),
                    ("schema", self.cfg.schema.clone()),
                    ("backlog_rows", rows.to_string()),
                    (
                        "oldest_row_age",
                        oldest.map_or_else(|| "-".to_string(), |s| format!("{s:.1}s")),
                    ),
                ],
                json: serde_json::json!({"source": "outbox", "schema": self.cfg.schema,
                    "backlog_rows": rows, "oldest_row_age_seconds": oldest}),
                confirmed: None,
            })
        })
    }

    fn record_name(&self) -> String {
        format!("outbox:{}", self.cfg.schema)
    }

    fn records_wal_position(&self) -> bool {
        false
    }

    fn label(&self) -> String {
        format!("outbox {}", self.cfg.schema)
    }

    fn ready(&self) -> String {
        format!(
            "the outbox in schema {:?} and its triggers are installed",
            self.cfg.schema
        )
    }

    fn plan<'a>(
        &'a self,
        db: &'a Db,
        _conn: &'a ConnInfo,
        rules: &'a RuleSet,
    ) -> BoxFuture<'a, Result<Plan, DbError>> {
        Box::pin(plan(db, rules, self.cfg))
    }

    fn plan_teardown<'a>(
        &'a self,
        db: &'a Db,
        _conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<Plan, DbError>> {
        Box::pin(plan_teardown(db, self.cfg))
    }

    fn check<'a>(
        &'a self,
        db: &'a Db,
        _conn: &'a ConnInfo,
        rules: &'a RuleSet,
        _running: bool,
    ) -> BoxFuture<'a, Result<Vec<String>, DbError>> {
        Box::pin(check(db, rules, self.cfg))
    }
}

/// Plans the outbox installation for `rules`. Every statement is
/// idempotent, so the plan is the full installation; triggers of tables no
/// rule watches any more are dropped.
pub async fn plan(db: &Db, rules: &RuleSet, cfg: &OutboxConfig) -> Result<Plan, DbError> {
    let mut plan = Plan::default();
    let schema = quote_ident(&cfg.schema);
    plan.steps.push(Step {
        why: format!(
            "schema {} holds the outbox and its trigger functions",
            cfg.schema
        ),
        sql: format!("CREATE SCHEMA IF NOT EXISTS {schema};"),
    });
    match layout(db, cfg).await? {
        Layout::Missing | Layout::Partitioned => {}
        Layout::RowLocking { rows: 0 } => plan.steps.push(Step {
            why: "the outbox of earlier versions (row locks and deletes) is empty: replace it"
                .to_string(),
            sql: format!("DROP TABLE IF EXISTS {schema}.outbox, {schema}.waiting;"),
        }),
        Layout::RowLocking { rows } => plan.problems.push(format!(
            "{}.outbox still holds {rows} row(s) in the layout of earlier versions: let the earlier daemon drain it (status shows the backlog), then run setup again",
            cfg.schema
        )),
    }
    plan.steps.push(Step {
        why: "one row per changed row, written in the writer's transaction into the partition writers currently fill; the drain reads rows by the writer's transaction id, and empties a drained partition with TRUNCATE".to_string(),
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.outbox (\n  part smallint NOT NULL,\n  xid xid8 NOT NULL DEFAULT pg_current_xact_id(),\n  id bigserial,\n  lsn pg_lsn NOT NULL DEFAULT pg_current_wal_insert_lsn(),\n  created_at timestamptz NOT NULL DEFAULT now(),\n  relation text NOT NULL,\n  op text NOT NULL,\n  old_row text,\n  new_row text\n) PARTITION BY LIST (part);\n\
             CREATE TABLE IF NOT EXISTS {schema}.outbox_0 PARTITION OF {schema}.outbox FOR VALUES IN (0);\n\
             CREATE TABLE IF NOT EXISTS {schema}.outbox_1 PARTITION OF {schema}.outbox FOR VALUES IN (1);\n\
             CREATE INDEX IF NOT EXISTS outbox_xid_id ON {schema}.outbox (xid, id);"
        ),
    });
    plan.steps.push(Step {
        why: "which columns each table's trigger captures, in order".to_string(),
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.captures (relation text PRIMARY KEY, columns text[] NOT NULL);"
        ),
    });
    plan.steps.push(Step {
        why: "what writers read: the partition they fill, and whether the drainer waits for a wake-up (writers NOTIFY only then)".to_string(),
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.state (\n  one boolean PRIMARY KEY DEFAULT true CHECK (one),\n  current smallint NOT NULL DEFAULT 0 CHECK (current IN (0, 1)),\n  wake boolean NOT NULL DEFAULT false,\n  rotated_at timestamptz NOT NULL DEFAULT now()\n);\n\
             INSERT INTO {schema}.state DEFAULT VALUES ON CONFLICT DO NOTHING;"
        ),
    });
    plan.steps.push(Step {
        why: "how far the drain got: every row of a transaction visible in `snapshot` is applied (taken before any trigger exists, so no row predates it)".to_string(),
        sql: format!(
            "CREATE TABLE IF NOT EXISTS {schema}.drained (\n  one boolean PRIMARY KEY DEFAULT true CHECK (one),\n  snapshot pg_snapshot NOT NULL,\n  batch pg_snapshot,\n  after_xid xid8,\n  after_id int8,\n  at timestamptz NOT NULL DEFAULT now()\n);\n\
             INSERT INTO {schema}.drained (snapshot) VALUES (pg_current_snapshot()) ON CONFLICT DO NOTHING;"
        ),
    });
    let mut watched = Vec::new();
    for walked in walk::tables(db, rules, &mut plan.problems).await? {
        let Walked {
            table,
            rules: table_rules,
            info,
            columns_ok,
        } = walked;
        if !columns_ok {
            continue;
        }
        let columns = captured_columns(&info, table_rules);
        let function = format!("{schema}.{}", quote_ident(&function_name(table)));
        let relation = quote_literal(&table.to_string());
        let old = row_expr("OLD", &columns, info.columns.len());
        let new = row_expr("NEW", &columns, info.columns.len());
        let notify = quote_literal(&cfg.schema);
        // Pinning the text format costs a settings save/restore per call,
        // so it is done only where the captured text depends on it: whole
        // rows, or key columns of date, time, interval or float types.
        let whole_row = columns.len() == info.columns.len();
        let format_sensitive = info
            .columns
            .iter()
            .any(|c| columns.contains(&c.name) && FORMAT_SENSITIVE_TYPES.contains(&c.type_oid));
        let settings = if whole_row || format_sensitive {
            "\nSET datestyle = 'ISO, MDY' SET timezone = 'UTC' SET intervalstyle = 'postgres' SET extra_float_digits = 1"
        } else {
            ""
        };
        plan.steps.push(Step {
            why: format!("{table}: capture {} into the outbox", describe(&columns, info.columns.len())),
            sql: format!(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n\
                 LANGUAGE plpgsql SECURITY DEFINER\n\
                 SET search_path = pg_catalog, pg_temp{settings}\n\
                 AS $fn$\n\
                 DECLARE\n\
                 \x20 s record;\n\
                 BEGIN\n\
                 \x20 SELECT current, wake INTO s FROM {schema}.state;\n\
                 \x20 IF TG_OP = 'TRUNCATE' THEN\n\
                 \x20   INSERT INTO {schema}.outbox (part, relation, op) VALUES (coalesce(s.current, 0), {relation}, 'truncate');\n\
                 \x20 ELSE\n\
                 \x20   INSERT INTO {schema}.outbox (part, relation, op, old_row, new_row) VALUES (coalesce(s.current, 0), {relation}, lower(TG_OP),\n\
                 \x20     CASE WHEN TG_OP <> 'INSERT' THEN {old} END,\n\
                 \x20     CASE WHEN TG_OP <> 'DELETE' THEN {new} END);\n\
                 \x20 END IF;\n\
                 \x20 -- Wake the drainer only while it waits: NOTIFY takes a\n\
                 \x20 -- cluster-wide lock at commit (PostgreSQL folds repeats).\n\
                 \x20 IF s.wake THEN\n\
                 \x20   PERFORM pg_notify({notify}, '');\n\
                 \x20 END IF;\n\
                 \x20 RETURN NULL;\n\
                 END\n\
                 $fn$;"
            ),
        });
        plan.steps.push(Step {
            why: format!("{table}: row and TRUNCATE triggers"),
            sql: format!(
                "CREATE OR REPLACE TRIGGER {ROW_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {function}();\n\
                 CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} AFTER TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
                table.quoted(),
                table.quoted()
            ),
        });
        let array: Vec<String> = columns.iter().map(|c| quote_literal(c)).collect();
        plan.steps.push(Step {
            why: format!("{table}: record the captured columns"),
            sql: format!(
                "INSERT INTO {schema}.captures VALUES ({relation}, ARRAY[{}]::text[]) ON CONFLICT (relation) DO UPDATE SET columns = excluded.columns;",
                array.join(", ")
            ),
        });
        watched.push(table.clone());
    }
    for stale in installed_tables(db).await? {
        if watched.contains(&stale) {
            continue;
        }
        plan.steps.push(Step {
            why: format!("{stale}: no rule watches it any more"),
            sql: format!(
                "DROP TRIGGER IF EXISTS {ROW_TRIGGER} ON {table};\nDROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {table};\n\
                 DROP FUNCTION IF EXISTS {schema}.{}();\nDELETE FROM {schema}.captures WHERE relation = {};",
                quote_ident(&function_name(&stale)),
                quote_literal(&stale.to_string()),
                table = stale.quoted(),
            ),
        });
    }
    Ok(plan)
}

/// The outbox table as installed.
enum Layout {
    /// Not installed yet.
    Missing,
    /// Partitioned, drained by snapshots and emptied by TRUNCATE.
    Partitioned,
    /// The plain table of earlier versions, drained by row locks and
    /// deletes, with its rows still waiting.
    RowLocking { rows: i64 },
}

async fn layout(db: &Db, cfg: &OutboxConfig) -> Result<Layout, DbError> {
    let name = format!("{}.outbox", quote_ident(&cfg.schema));
    let kind: Option<i8> = db
        .client()
        .query_one(
            "select (select relkind from pg_class where oid = to_regclass($1))",
            &[&name],
        )
        .await
        .map_err(DbError::query("looking for the outbox"))?
        .get(0);
    Ok(match kind.map(|k| k as u8) {
        None => Layout::Missing,
        Some(b'p') => Layout::Partitioned,
        Some(_) => {
            let rows: i64 = db
                .client()
                .query_one(&format!("select count(*) from {name}"), &[])
                .await
                .map_err(DbError::query("counting rows of the earlier outbox"))?
                .get(0);
            Layout::RowLocking { rows }
        }
    })
}

fn describe(columns: &[String], all: usize) -> String {
    if columns.len() == all {
        "whole rows (a refresh rule writes them)".to_string()
    } else {
        format!("columns {}", columns.join(", "))
    }
}

/// Tables that carry our capture trigger.
pub async fn installed_tables(db: &Db) -> Result<Vec<TableName>, DbError> {
    Ok(db
        .client()
        .query(
            "select n.nspname::text, c.relname::text from pg_trigger t \
               join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace \
              where t.tgname = $1 order by 1, 2",
            &[&ROW_TRIGGER],
        )
        .await
        .map_err(DbError::query("reading installed capture triggers"))?
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect())
}

/// Plans `teardown` for the outbox: triggers and their functions, then the
/// schema with the outbox (and any rows still in it).
pub async fn plan_teardown(db: &Db, cfg: &OutboxConfig) -> Result<Plan, DbError> {
    let mut plan = Plan::default();
    for table in installed_tables(db).await? {
        plan.steps.push(Step {
            why: format!("{table}: drop the capture triggers"),
            sql: format!(
                "DROP TRIGGER IF EXISTS {ROW_TRIGGER} ON {t};\nDROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {t};",
                t = table.quoted()
            ),
        });
    }
    plan.steps.push(Step {
        why: format!(
            "drop schema {} with the outbox and trigger functions",
            cfg.schema
        ),
        sql: format!(
            "DROP SCHEMA IF EXISTS {} CASCADE;",
            quote_ident(&cfg.schema)
        ),
    });
    Ok(plan)
}

/// Checks that the installed capture matches what the rules need: one line
/// per problem.
pub async fn check(db: &Db, rules: &RuleSet, cfg: &OutboxConfig) -> Result<Vec<String>, DbError> {
    let mut problems = Vec::new();
    let exists: bool = db
        .client()
        .query_one(
            "select (select relkind = 'p' from pg_class where oid = to_regclass($1)) is true \
                and to_regclass($2) is not null and to_regclass($3) is not null and to_regclass($4) is not null",
            &[
                &format!("{}.outbox", quote_ident(&cfg.schema)),
                &format!("{}.captures", quote_ident(&cfg.schema)),
                &format!("{}.state", quote_ident(&cfg.schema)),
                &format!("{}.drained", quote_ident(&cfg.schema)),
            ],
        )
        .await
        .map_err(DbError::query("looking for the outbox"))?
        .get(0);
    if !exists {
        problems.push(format!(
            "the outbox is not installed in schema {:?} (or in the layout of an earlier version): run pg-cache-invalidator setup",
            cfg.schema
        ));
        return Ok(problems);
    }
    let installed = installed_tables(db).await?;
    for walked in walk::tables(db, rules, &mut problems).await? {
        let (table, table_rules, info) = (walked.table, walked.rules, walked.info);
        let expected = captured_columns(&info, table_rules);
        let recorded = captured(db, cfg, table).await?;
        if !installed.contains(table) || recorded.as_ref() != Some(&expected) {
            problems.push(format!(
                "table {table}: its capture trigger is missing or does not match the rules: run pg-cache-invalidator setup"
            ));
        }
    }
    Ok(problems)
}

/// The columns recorded for `table` in the captures table.
pub async fn captured(
    db: &Db,
    cfg: &OutboxConfig,
    table: &TableName,
) -> Result<Option<Vec<String>>, DbError> {
    Ok(db
        .client()
        .query_opt(
            &format!(
                "select columns from {}.captures where relation = $1",
                quote_ident(&cfg.schema)
            ),
            &[&table.to_string()],
        )
        .await
        .map_err(DbError::query("reading captured columns"))?
        .map(|r| r.get(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_fit_the_identifier_limit() {
        let short = TableName::parse("public.profiles").expect("valid");
        assert_eq!(function_name(&short), "capture_public_profiles");
        let long = TableName {
            schema: "s".repeat(40),
            name: "t".repeat(40),
        };
        let name = function_name(&long);
        assert!(name.len() <= 63, "{name}");
        let other = TableName {
            schema: "s".repeat(40),
            name: "u".repeat(40),
        };
        assert_ne!(function_name(&other), name);
        let a = TableName::parse("app.user_tokens").expect("valid");
        let b = TableName::parse("app_user.tokens").expect("valid");
        assert_ne!(function_name(&a), function_name(&b));
        assert_eq!(function_name(&a), "capture_app_user_tokens");
        assert!(function_name(&b).starts_with("capture_app_user_tokens_"));
    }

    #[test]
    fn row_expressions_capture_only_what_is_needed() {
        assert_eq!(
            row_expr("NEW", &["user_id".into(), "token_id".into()], 8),
            "ROW(NEW.\"user_id\", NEW.\"token_id\")::text"
        );
        assert_eq!(row_expr("OLD", &["a".into()], 1), "OLD::text");
    }
}
