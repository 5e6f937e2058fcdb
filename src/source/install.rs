//! What `setup` and `teardown` run: statements planned from the rules and
//! the live catalog (by each source's `install` module), each with the
//! reason it is needed. `--print` shows the same statements instead of
//! running them; `sql/` holds them for a DBA who prefers to run them by hand.

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::config::{Config, SourceKind};
use futures_util::future::BoxFuture;

use crate::db::{ConnInfo, Db, DbError};
use crate::duration::HumanDuration;
use crate::plan::rules::RuleSet;
use crate::source::outbox;
use crate::source::replication;

/// One statement and why it is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// A one-line reason, printed as an SQL comment.
    pub why: String,
    /// The statement.
    pub sql: String,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-- {}\n{}\n", self.why, self.sql)
    }
}

/// What setup would do, or why it cannot.
#[derive(Debug, Default)]
pub struct Plan {
    /// Statements to run, in order.
    pub steps: Vec<Step>,
    /// Problems setup cannot fix (missing tables or columns, wal_level).
    pub problems: Vec<String>,
    /// Whether a step creates the replication slot.
    pub creates_slot: bool,
    /// Statements for the standby that holds the slot (`replication.url`),
    /// run after `steps`: creating or dropping the slot there.
    pub standby_steps: Vec<Step>,
}

impl Plan {
    /// Whether there is nothing to run anywhere.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.standby_steps.is_empty()
    }
}

/// Runs the planned steps in order, calling `done` after each. Each waits
/// at most `lock_timeout` for its table locks: an ALTER TABLE queued behind
/// a long transaction would make every later query on the table queue
/// behind it.
///
/// `standby_steps` run on `standby` after the rest, each while the primary
/// is asked for the running-transactions record a slot being created on a
/// standby waits for (see [`replication::slot::nudging`]); `waiting` runs
/// if that takes more than a few seconds.
pub async fn apply(
    db: &Db,
    standby: Option<&Db>,
    plan: &Plan,
    lock_timeout: Duration,
    mut done: impl FnMut(&Step),
    waiting: impl Fn(&Step),
) -> Result<(), DbError> {
    db.execute_batch(&format!(
        "SET lock_timeout = '{}ms'",
        lock_timeout.as_millis().max(1)
    ))
    .await?;
    if let (Some(first), None) = (plan.standby_steps.first(), standby) {
        return Err(DbError::BadUrl {
            url: "replication.url".to_string(),
            reason: format!("{}: no connection to the standby", first.why),
        });
    }
    for step in &plan.steps {
        if let Err(error) = db.execute_batch(&step.sql).await {
            return Err(match error {
                DbError::Query { source, .. } if source.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                    DbError::Query {
                        context: format!(
                            "{}: the table is in use and its lock was not granted within {}: run setup again at a quieter time, or raise setup.lock_timeout",
                            step.why,
                            HumanDuration(lock_timeout)
                        ),
                        source,
                    }
                }
                other => other,
            });
        }
        done(step);
    }
    if let Some(standby) = standby {
        for step in &plan.standby_steps {
            replication::slot::nudging(db, standby.execute_batch(&step.sql), || waiting(step))
                .await?;
            done(step);
        }
    }
    Ok(())
}

/// What `setup`, `teardown` and the live checks (`check-config`, and `run`
/// before it streams) ask of a source; [`of`] picks the configured one.
/// Both start from the same walk over the rules' tables
/// ([`crate::source::walk`]), so a problem reads the same in each.
pub trait SourceSetup: Send + Sync {
    /// How logs and the status page name it (`slot NAME`, `outbox SCHEMA`).
    fn label(&self) -> String;

    /// What a ready database holds, for `check-config`'s `ok:` line.
    fn ready(&self) -> String;

    /// The statements that make the database ready for `rules` (only what
    /// is missing), or the problems setup cannot fix. `db` reaches the
    /// primary; `conn` says where else to look (the standby that holds the
    /// slot, `replication.url`).
    fn plan<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
        rules: &'a RuleSet,
    ) -> BoxFuture<'a, Result<Plan, DbError>>;

    /// The statements that remove what setup installed.
    fn plan_teardown<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<Plan, DbError>>;

    /// One line per problem of the live database, each saying what to do.
    /// `running` tolerates a lost or missing slot (`run` rebuilds it and
    /// flushes the keys; `check-config` reports it).
    fn check<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
        rules: &'a RuleSet,
        running: bool,
    ) -> BoxFuture<'a, Result<Vec<String>, DbError>>;

    /// What `status` shows of the source: the slot (and its copies on the
    /// other hosts of `conn`), or the outbox's backlog.
    fn status<'a>(
        &'a self,
        db: &'a Db,
        conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<SourceStatus, DbError>>;

    /// Warnings for `check-config`: what would cost a flush later (a
    /// promotion without a synchronized failover slot, when `conn` names
    /// standbys). None by default.
    fn warnings<'a>(
        &'a self,
        _db: &'a Db,
        _conn: &'a ConnInfo,
    ) -> BoxFuture<'a, Result<Vec<String>, DbError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// The name each target records what it applied of this source under
    /// (the key is `redis::position::key(name)`): the slot's name, or
    /// `outbox:SCHEMA` for the outbox's count of applied batches.
    fn record_name(&self) -> String;

    /// Whether that record is a WAL position that can be compared with the
    /// slot's (the outbox records a count of batches instead).
    fn records_wal_position(&self) -> bool;
}

/// The source's state, for `status`.
#[derive(Debug)]
pub enum SourceStatus {
    /// What setup installs is missing: what to say.
    Missing(String),
    /// Its state.
    Found {
        /// Name and value, printed as a table.
        rows: Vec<(&'static str, String)>,
        /// The same as JSON (`status --json`).
        json: serde_json::Value,
        /// What the source has confirmed, for comparing with what each
        /// target records (replication only).
        confirmed: Option<crate::lsn::Lsn>,
    },
}

/// The configured source's setup.
pub fn of(config: &Config) -> Box<dyn SourceSetup + '_> {
    match config.postgres.source {
        SourceKind::Replication => Box::new(replication::install::ReplicationSetup {
            cfg: &config.replication,
        }),
        SourceKind::Outbox => Box::new(outbox::install::OutboxSetup {
            cfg: &config.outbox,
        }),
    }
}

/// The live checks of the configured source (see [`SourceSetup::check`]).
pub async fn check(
    db: &Db,
    conn: &ConnInfo,
    config: &Config,
    rules: &RuleSet,
    running: bool,
) -> Result<Vec<String>, DbError> {
    of(config).check(db, conn, rules, running).await
}
