//! `setup` and `teardown` for the `replication` source: replica
//! identities, the publication and the slot, planned from the rules and the
//! live catalog so that re-running does nothing more than what is missing.

use crate::config::ReplicationConfig;
use crate::db::catalog::{self, Identity};
use crate::db::{Db, DbError};
use crate::plan::rules::RuleSet;
use crate::source::install::{Plan, Step};
use crate::sql::{quote_ident, quote_literal};

/// Plans the statements that make the database ready for `rules`: replica
/// identities first, then the publication, then the slot (a slot decodes
/// with the catalog as of each change, so the publication must exist before
/// the slot's first change).
pub async fn plan(db: &Db, rules: &RuleSet, cfg: &ReplicationConfig) -> Result<Plan, DbError> {
    let mut plan = Plan::default();
    let level = catalog::wal_level(db).await?;
    if level != "logical" {
        plan.problems.push(format!(
            "wal_level is {level}: run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL, then run setup again"
        ));
    }
    let mut tables = Vec::new();
    let mut major = None;
    let mut wants_generated = false;
    let mut wants_via_root = false;
    for (table, table_rules) in rules.tables() {
        let Some(info) = catalog::inspect_table(db, table).await? else {
            plan.problems.push(catalog::missing_table(db, table).await?);
            continue;
        };
        if !catalog::needed_generated_columns(&info, table_rules).is_empty() {
            let major = match major {
                Some(m) => m,
                None => *major.insert(catalog::server_major(db).await?),
            };
            let problems = catalog::generated_column_problems(&info, table_rules, major, None);
            wants_generated |= problems.is_empty();
            if !problems.is_empty() {
                plan.problems.extend(problems);
                continue;
            }
        }
        let needed = RuleSet::key_columns(table_rules);
        let unknown: Vec<_> = needed
            .iter()
            .filter(|c| !info.columns.iter().any(|col| &col.name == *c))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            plan.problems.push(format!(
                "table {table} has no column(s) {} used by its key templates: fix the templates",
                unknown.join(", ")
            ));
            continue;
        }
        // A partitioned table's partitions each have their own identity.
        for (part, _) in info.identity_gaps(&needed) {
            let name = &part.name;
            let identity = part.cheapest_identity(&needed);
            let why = match &identity {
                Identity::Default => format!("{name}: the primary key carries the key columns"),
                Identity::Index(index) => format!(
                    "{name}: unique index {index} over NOT NULL columns carries the key columns"
                ),
                Identity::Full => format!(
                    "{name}: no primary key or unique NOT NULL index covers the key columns, so DELETEs must log the whole row"
                ),
            };
            plan.steps.push(Step {
                why,
                sql: identity.alter_sql(name),
            });
        }
        wants_via_root |= info.is_partitioned();
        tables.push(table.clone());
    }

    let publication = &cfg.publication;
    let all_ops = "insert, update, delete, truncate";
    // PostgreSQL 18 sends stored generated columns when asked; rules that
    // need them ask.
    let mut gencols = String::new();
    if wants_generated {
        gencols.push_str(", publish_generated_columns = stored");
    }
    // Changes of a partition are published under the partitioned table's
    // name, the one the rules watch.
    if wants_via_root {
        gencols.push_str(", publish_via_partition_root = true");
    }
    match catalog::inspect_publication(db, publication).await? {
        None if !tables.is_empty() => plan.steps.push(Step {
            why: format!("publication {publication} lists the watched tables"),
            sql: format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = '{all_ops}'{gencols});",
                quote_ident(publication),
                tables
                    .iter()
                    .map(|t| t.quoted())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
        None => {}
        Some(existing) => {
            if wants_via_root && !existing.via_root {
                plan.steps.push(Step {
                    why: format!(
                        "publication {publication} must publish partitions' changes as their partitioned table's"
                    ),
                    sql: format!(
                        "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                        quote_ident(publication)
                    ),
                });
            }
            if wants_generated && !existing.generated_columns {
                plan.steps.push(Step {
                    why: format!(
                        "publication {publication} must send the stored generated columns the rules need"
                    ),
                    sql: format!(
                        "ALTER PUBLICATION {} SET (publish_generated_columns = stored);",
                        quote_ident(publication)
                    ),
                });
            }
            if !existing.missing_operations.is_empty() {
                plan.steps.push(Step {
                    why: format!(
                        "publication {publication} must also publish {}",
                        existing.missing_operations.join(", ")
                    ),
                    sql: format!(
                        "ALTER PUBLICATION {} SET (publish = '{all_ops}');",
                        quote_ident(publication)
                    ),
                });
            }
            if !existing.all_tables {
                for table in tables.iter().filter(|t| !existing.tables.contains(t)) {
                    plan.steps.push(Step {
                        why: format!("publication {publication} is missing {table}"),
                        sql: format!(
                            "ALTER PUBLICATION {} ADD TABLE {};",
                            quote_ident(publication),
                            table.quoted()
                        ),
                    });
                }
            }
        }
    }

    let slot = &cfg.slot;
    match catalog::inspect_slot(db, slot).await? {
        None => {
            plan.creates_slot = true;
            plan.steps.push(Step {
            why: format!("replication slot {slot} keeps the changes the daemon has not confirmed"),
            sql: format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput');",
                quote_literal(slot)
            ),
        })
        }
        Some(info) if info.plugin.as_deref() != Some("pgoutput") => plan.problems.push(format!(
            "replication slot {slot:?} exists with plugin {:?}: drop it or choose another [replication] slot",
            info.plugin.unwrap_or_default()
        )),
        Some(_) => {}
    }
    Ok(plan)
}

/// Plans `teardown`: drop the slot, then the publication. Replica
/// identities are left as they are: they are harmless and other consumers
/// may rely on them.
pub async fn plan_teardown(db: &Db, cfg: &ReplicationConfig) -> Result<Plan, DbError> {
    let mut plan = Plan::default();
    if let Some(slot) = catalog::inspect_slot(db, &cfg.slot).await? {
        if slot.active {
            plan.problems.push(format!(
                "replication slot {:?} is in use by pid {}: stop the daemon first",
                cfg.slot,
                slot.active_pid.unwrap_or_default()
            ));
        }
        plan.steps.push(Step {
            why: format!(
                "drop replication slot {} (a forgotten slot retains WAL without limit)",
                cfg.slot
            ),
            sql: format!(
                "SELECT pg_drop_replication_slot({});",
                quote_literal(&cfg.slot)
            ),
        });
    }
    if catalog::inspect_publication(db, &cfg.publication)
        .await?
        .is_some()
    {
        plan.steps.push(Step {
            why: format!("drop publication {}", cfg.publication),
            sql: format!("DROP PUBLICATION {};", quote_ident(&cfg.publication)),
        });
    }
    Ok(plan)
}
