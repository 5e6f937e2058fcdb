//! `setup` and `teardown` for the `replication` source: replica
//! identities, the publication and the slot, planned from the rules and the
//! live catalog so that re-running does nothing more than what is missing.

use crate::change::TableName;
use crate::config::ReplicationConfig;
use crate::db::catalog::{self, Identity};
use crate::db::{ConnInfo, Db, DbError};
use crate::plan::rules::RuleSet;
use crate::source::replication::slot;
use futures_util::future::BoxFuture;

use crate::lsn::Lsn;
use crate::source::install::{Plan, SourceSetup, SourceStatus, Step};
use crate::source::walk::{self, Walked};
use crate::sql::{quote_ident, quote_literal};

/// The replication source's [`SourceSetup`]: replica identities, the
/// publication and the slot.
pub struct ReplicationSetup<'c> {
    /// Its slot and publication.
    pub cfg: &'c ReplicationConfig,
}

impl SourceSetup for ReplicationSetup<'_> {
    fn status<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<SourceStatus, DbError>> {
        Box::pin(async move {
            let slot = &self.cfg.slot;
            let server = SlotServer::open(db, conn).await?;
            let Some(info) = catalog::inspect_slot(server.db(), slot).await? else {
                return Ok(SourceStatus::Missing(format!(
                    "replication slot {slot:?} does not exist: run pg-cache-invalidator setup"
                )));
            };
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
            let mut rows = vec![
                ("slot", info.slot.clone()),
                ("plugin", opt(info.plugin.clone())),
                ("database", opt(info.database.clone())),
                (
                    "active",
                    match info.active_pid {
                        Some(pid) if info.active => {
                            format!("yes (by a walsender, backend {pid}, serving the daemon)")
                        }
                        _ => "no".to_string(),
                    },
                ),
                ("confirmed_lsn", opt(info.confirmed_flush_lsn.clone())),
                ("lag_bytes", opt(info.lag_bytes.map(|b| b.to_string()))),
                (
                    "retained_bytes",
                    opt(info.retained_bytes.map(|b| b.to_string())),
                ),
                ("wal_status", opt(info.wal_status.clone())),
            ];
            let standby_slots = slot::standby_slots(db).await?;
            let failover_ready = info.failover == Some(true) && !standby_slots.is_empty();
            let standbys = match &server {
                SlotServer::Standby(standby) => {
                    rows.push((
                        "server",
                        format!(
                            "standby {} (replication.url): the slot lives and is decoded there",
                            standby.endpoint()
                        ),
                    ));
                    rows.push((
                        "failover",
                        "no: a slot on a standby is not a failover slot; a promotion flushes every rule key once".to_string(),
                    ));
                    Vec::new()
                }
                SlotServer::Primary(_) => {
                    rows.push(("failover", failover_text(info.failover, &standby_slots)));
                    slot::on_standbys(conn, db.endpoint(), slot).await
                }
            };
            for standby in &standbys {
                let text = match (&standby.problem, &standby.confirmed_lsn) {
                    (Some(problem), _) => problem.clone(),
                    (None, lsn) => {
                        format!("synchronized copy at {}", lsn.as_deref().unwrap_or("-"))
                    }
                };
                rows.push(("standby", format!("{} {text}", standby.host)));
            }
            let mut json = serde_json::to_value(&info).unwrap_or_default();
            if let (Some(map), SlotServer::Standby(standby)) = (json.as_object_mut(), &server) {
                map.insert(
                    "decoded_on_standby".into(),
                    serde_json::json!(standby.endpoint().to_string()),
                );
            }
            if let Some(map) = json.as_object_mut() {
                map.insert("failover_ready".into(), serde_json::json!(failover_ready));
                map.insert(
                    "synchronized_standby_slots".into(),
                    serde_json::json!(standby_slots),
                );
                map.insert("standbys".into(), serde_json::json!(standbys));
            }
            Ok(SourceStatus::Found {
                rows,
                json,
                confirmed: info
                    .confirmed_flush_lsn
                    .as_deref()
                    .and_then(|t| t.parse::<Lsn>().ok()),
            })
        })
    }

    fn warnings<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<Vec<String>, DbError>> {
        Box::pin(async move {
            if conn.decodes_on_standby() {
                let server = SlotServer::open(db, conn).await?;
                return standby_warnings(server.db()).await;
            }
            // Only a URL that names standbys says a promotion is planned for.
            if conn.endpoints.len() < 2 {
                return Ok(Vec::new());
            }
            let Some(info) = catalog::inspect_slot(db, &self.cfg.slot).await? else {
                return Ok(Vec::new());
            };
            let standby_slots = slot::standby_slots(db).await?;
            let mut warnings = Vec::new();
            if info.failover != Some(true) || standby_slots.is_empty() {
                warnings.push(format!(
                    "postgres.url names standbys, but the slot is not ready for a promotion ({})",
                    failover_text(info.failover, &standby_slots)
                ));
            }
            for standby in slot::on_standbys(conn, db.endpoint(), &self.cfg.slot).await {
                if let (Some(problem), Some(true)) = (&standby.problem, info.failover) {
                    warnings.push(format!("standby {} {problem}", standby.host));
                }
            }
            Ok(warnings)
        })
    }

    fn record_name(&self) -> String {
        self.cfg.slot.clone()
    }

    fn records_wal_position(&self) -> bool {
        true
    }

    fn label(&self) -> String {
        format!("slot {}", self.cfg.slot)
    }

    fn ready(&self) -> String {
        format!(
            "publication {:?} and slot {:?} are ready",
            self.cfg.publication, self.cfg.slot
        )
    }

    fn plan<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
        rules: &'a RuleSet,
    ) -> BoxFuture<'a, Result<Plan, DbError>> {
        Box::pin(async move {
            let server = SlotServer::open(db, conn).await?;
            plan(db, &server, rules, self.cfg).await
        })
    }

    fn plan_teardown<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<Plan, DbError>> {
        Box::pin(async move {
            let server = SlotServer::open(db, conn).await?;
            plan_teardown(db, &server, self.cfg).await
        })
    }

    fn check<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
        rules: &'a RuleSet,
        running: bool,
    ) -> BoxFuture<'a, Result<Vec<String>, DbError>> {
        Box::pin(async move {
            let server = SlotServer::open(db, conn).await?;
            let mut problems = check(
                db,
                server.db(),
                rules,
                CheckScope {
                    publication: &self.cfg.publication,
                    slot: Some(&self.cfg.slot),
                    tolerate_lost_slot: running,
                },
            )
            .await?;
            if let SlotServer::Standby(standby) = &server {
                problems.extend(standby_problems(db, standby, &self.cfg.application_name).await?);
            }
            Ok(problems)
        })
    }
}

/// The server that holds the slot: the primary, or the hot standby of
/// `replication.url` (decoding there offloads the primary; the
/// publication, replica identities and heartbeats stay on the primary).
pub(crate) enum SlotServer<'a> {
    /// The slot lives on the primary (`db`).
    Primary(&'a Db),
    /// The slot lives on this standby.
    Standby(Db),
}

impl<'a> SlotServer<'a> {
    /// `primary` itself, or a connection to the standby `conn` names.
    pub(crate) async fn open(primary: &'a Db, conn: &ConnInfo) -> Result<SlotServer<'a>, DbError> {
        Ok(match conn.decodes_on_standby() {
            true => SlotServer::Standby(Db::connect(conn.slot_server()).await?),
            false => SlotServer::Primary(primary),
        })
    }

    /// The connection to it.
    pub(crate) fn db(&self) -> &Db {
        match self {
            SlotServer::Primary(db) => db,
            SlotServer::Standby(db) => db,
        }
    }
}

/// Why the standby of `replication.url` cannot hold the slot: too old,
/// another cluster, `wal_level` below logical there, or the primary
/// waiting for this daemon as a synchronous standby (a walsender on a
/// standby is not the primary's standby: those commits would wait
/// forever).
async fn standby_problems(
    primary: &Db,
    standby: &Db,
    application_name: &str,
) -> Result<Vec<String>, DbError> {
    let mut problems = Vec::new();
    let major = catalog::server_major(standby).await?;
    if major < 16 {
        problems.push(format!(
            "replication.url: decoding on a standby needs PostgreSQL 16 or later, and {} runs {major}: remove replication.url to decode on the primary",
            standby.endpoint()
        ));
        return Ok(problems);
    }
    let (primary_id, standby_id) = (
        catalog::system_identifier(primary).await?,
        catalog::system_identifier(standby).await?,
    );
    if primary_id != standby_id {
        problems.push(format!(
            "replication.url: {} is another cluster (system identifier {standby_id}) than postgres.url's primary ({primary_id}): name a standby that replicates from that primary",
            standby.endpoint()
        ));
    }
    let level = catalog::wal_level(standby).await?;
    if level != "logical" {
        problems.push(format!(
            "replication.url: wal_level is {level} on the standby {}: set wal_level = logical there too (ALTER SYSTEM SET wal_level = logical; then restart it)",
            standby.endpoint()
        ));
    }
    let names = catalog::setting(primary, "synchronous_standby_names").await?;
    if lists_standby(&names, application_name) {
        problems.push(format!(
            "replication.url: the primary's synchronous_standby_names ({names}) waits for {application_name:?}, but a slot on a standby cannot release the primary's commits (they would wait forever): take {application_name:?} out of synchronous_standby_names, or remove replication.url to decode on the primary for synchronous invalidation"
        ));
    }
    Ok(problems)
}

/// What would cost a flush later when the slot is on a standby.
async fn standby_warnings(standby: &Db) -> Result<Vec<String>, DbError> {
    let mut warnings = Vec::new();
    if !catalog::in_recovery(standby).await? {
        warnings.push(format!(
            "replication.url: {} accepts writes (a primary, not a standby): decoding there offloads nothing",
            standby.endpoint()
        ));
    } else if catalog::setting(standby, "hot_standby_feedback").await? != "on" {
        warnings.push(format!(
            "replication.url: hot_standby_feedback is off on {}: the primary may vacuum catalog rows the slot still needs, which invalidates it (a flush of every rule key): set hot_standby_feedback = on there, with a primary_slot_name",
            standby.endpoint()
        ));
    }
    Ok(warnings)
}

/// Whether `synchronous_standby_names` names `application_name`
/// (`FIRST n (a, b)`, `ANY n (a, b)`, `n (a, b)` or `a, b`; compared
/// without case, as the walsender does; `*` is any standby, which a
/// physical standby satisfies, so it does not count).
pub(crate) fn lists_standby(setting: &str, application_name: &str) -> bool {
    standby_names(setting).any(|name| name.eq_ignore_ascii_case(application_name))
}

/// Whether commits may wait for a session named `application_name`:
/// [`lists_standby`], or `*` (any standby).
pub(crate) fn may_wait_for(setting: &str, application_name: &str) -> bool {
    standby_names(setting).any(|name| name == "*" || name.eq_ignore_ascii_case(application_name))
}

/// The names in a `synchronous_standby_names` setting, unquoted.
fn standby_names(setting: &str) -> impl Iterator<Item = String> + '_ {
    let setting = setting.trim();
    let list = match (setting.find('('), setting.rfind(')')) {
        (Some(open), Some(close)) if open < close => &setting[open + 1..close],
        _ => setting,
    };
    list.split(',').map(|name| {
        let name = name.trim();
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => name.to_string(),
        }
    })
}

/// Plans the statements that make the database ready for `rules`: replica
/// identities first, then the publication, then the slot (a slot decodes
/// with the catalog as of each change, so the publication must exist before
/// the slot's first change).
pub(crate) async fn plan(
    db: &Db,
    server: &SlotServer<'_>,
    rules: &RuleSet,
    cfg: &ReplicationConfig,
) -> Result<Plan, DbError> {
    let mut plan = Plan::default();
    plan.problems.extend(walk::wal_level_problem(db).await?);
    if let SlotServer::Standby(standby) = server {
        plan.problems
            .extend(standby_problems(db, standby, &cfg.application_name).await?);
    }
    let mut tables = Vec::new();
    let mut major = None;
    let mut wants_generated = false;
    let mut wants_via_root = false;
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
    match catalog::inspect_slot(server.db(), slot).await? {
        None => {
            plan.creates_slot = true;
            let major = catalog::server_major(server.db()).await?;
            let sql = format!(
                "{};",
                super::slot::create_sql(major, matches!(server, SlotServer::Standby(_)))
                    .replace("$1", &quote_literal(slot))
            );
            match server {
                SlotServer::Standby(standby) => plan.standby_steps.push(Step {
                    why: format!(
                        "replication slot {slot} on the standby {} keeps the changes the daemon has not confirmed (it waits for the primary's next running-transactions record: SELECT pg_log_standby_snapshot(); on the primary brings one at once)",
                        standby.endpoint()
                    ),
                    sql,
                }),
                SlotServer::Primary(_) => plan.steps.push(Step {
                    why: if major >= 17 {
                        format!("replication slot {slot} keeps the changes the daemon has not confirmed (a failover slot: a standby with sync_replication_slots = on keeps it through a promotion)")
                    } else {
                        format!("replication slot {slot} keeps the changes the daemon has not confirmed")
                    },
                    sql,
                }),
            }
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
pub(crate) async fn plan_teardown(
    db: &Db,
    server: &SlotServer<'_>,
    cfg: &ReplicationConfig,
) -> Result<Plan, DbError> {
    let mut plan = Plan::default();
    if let Some(slot) = catalog::inspect_slot(server.db(), &cfg.slot).await? {
        if slot.active {
            plan.problems.push(format!(
                "replication slot {:?} is being streamed (walsender backend {}): stop the daemon that streams it first (ending the backend only makes it reconnect)",
                cfg.slot,
                slot.active_pid.unwrap_or_default()
            ));
        }
        let drop = Step {
            why: format!(
                "drop replication slot {} (a forgotten slot retains WAL without limit)",
                cfg.slot
            ),
            sql: format!(
                "SELECT pg_drop_replication_slot({});",
                quote_literal(&cfg.slot)
            ),
        };
        match server {
            SlotServer::Standby(_) => plan.standby_steps.push(drop),
            SlotServer::Primary(_) => plan.steps.push(drop),
        }
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

/// Checks the rules against the live database: `wal_level`, the tables
/// (see [`walk`]), replica identities, the publication and the slot. Returns one
/// line per problem, each saying what to do.
/// `slot_db` reaches the server that holds the slot (the primary `db`, or
/// the standby of `replication.url`).
pub async fn check(
    db: &Db,
    slot_db: &Db,
    rules: &RuleSet,
    scope: CheckScope<'_>,
) -> Result<Vec<String>, DbError> {
    let mut problems = Vec::new();
    problems.extend(walk::wal_level_problem(db).await?);
    let mut existing = Vec::new();
    let mut generated = Vec::new();
    let mut partitioned: Vec<TableName> = Vec::new();
    for walked in walk::tables(db, rules, &mut problems).await? {
        let Walked {
            table,
            rules: table_rules,
            info,
            columns_ok,
        } = walked;
        if columns_ok {
            let needed = RuleSet::key_columns(table_rules);
            for (part, missing) in info.identity_gaps(&needed) {
                let fix = part.cheapest_identity(&needed).alter_sql(&part.name);
                let which = if part.name == *table {
                    format!("table {table}")
                } else {
                    format!("table {table} (partition {})", part.name)
                };
                problems.push(format!(
                    "{which}: a DELETE would not carry column(s) {} needed by its key templates (replica identity {}): run `{fix}` or pg-cache-invalidator setup",
                    missing.join(", "),
                    catalog::describe_identity(part),
                ));
            }
        }
        existing.push(table.clone());
        if info.is_partitioned() {
            partitioned.push(table.clone());
        }
        if info.columns.iter().any(|c| c.generated.is_some()) {
            generated.push((info, table_rules));
        }
    }
    let publication = catalog::inspect_publication(db, scope.publication).await?;
    if let Some(p) = &publication {
        if !p.via_root && !partitioned.is_empty() {
            problems.push(format!(
                "publication {:?} reports partitions' changes under the partitions' names, which no rule watches ({}): run ALTER PUBLICATION {} SET (publish_via_partition_root = true); or pg-cache-invalidator setup",
                scope.publication,
                partitioned.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                quote_ident(scope.publication)
            ));
        }
    }
    if !generated.is_empty() {
        let major = catalog::server_major(db).await?;
        for (info, table_rules) in &generated {
            problems.extend(catalog::generated_column_problems(
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
        match catalog::inspect_slot(slot_db, slot).await? {
            None if scope.tolerate_lost_slot => {}
            None => problems.push(format!(
                "replication slot {slot:?} does not exist: run pg-cache-invalidator setup"
            )),
            Some(info) => {
                let database = catalog::current_database(db).await?;
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

/// What `status` says about surviving a promotion.
fn failover_text(failover: Option<bool>, standby_slots: &str) -> String {
    match failover {
        None => "no (PostgreSQL 16 or older has no failover slots: a promotion flushes every rule key)".to_string(),
        Some(false) => "no: the slot was created without failover; drop it and run setup again to make a failover slot (until then a promotion flushes every rule key)".to_string(),
        Some(true) if standby_slots.is_empty() => "a failover slot, but synchronized_standby_slots is not set on the primary: a promotion flushes every rule key (see the README's \"Failover and upgrades\")".to_string(),
        Some(true) => format!("yes: a failover slot, and the primary waits for {standby_slots} (synchronized_standby_slots)"),
    }
}

#[cfg(test)]
mod tests {
    use super::{lists_standby, may_wait_for};

    #[test]
    fn synchronous_standby_names_are_read_in_every_form() {
        let name = "pg-cache-invalidator";
        for listed in [
            "\"pg-cache-invalidator\"",
            "FIRST 1 (standby, \"PG-Cache-Invalidator\")",
            "ANY 2 (a, \"pg-cache-invalidator\", b)",
            "1 (\"pg-cache-invalidator\")",
            "a, pgci, \"pg-cache-invalidator\"",
        ] {
            assert!(lists_standby(listed, name), "{listed}");
        }
        for not_listed in ["", "*", "standby", "FIRST 1 (a, b)", "\"pg-cache\""] {
            assert!(!lists_standby(not_listed, name), "{not_listed}");
        }
        assert!(lists_standby("ANY 1 (Cache)", "cache"));
    }

    #[test]
    fn any_standby_may_be_this_daemon() {
        let name = "pg-cache-invalidator";
        for waits in [
            "*",
            "FIRST 1 (*)",
            "ANY 1 (standby, *)",
            "\"pg-cache-invalidator\"",
        ] {
            assert!(may_wait_for(waits, name), "{waits}");
        }
        for not in ["", "standby", "ANY 1 (a, b)"] {
            assert!(!may_wait_for(not, name), "{not}");
        }
    }
}
