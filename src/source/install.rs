//! What `setup` and `teardown` run: statements planned from the rules and
//! the live catalog (by each source's `install` module), each with the
//! reason it is needed. `--print` shows the same statements instead of
//! running them; `sql/` holds them for a DBA who prefers to run them by hand.

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::config::{Config, SourceKind};
use crate::db::catalog::{self, CheckScope};
use crate::db::{Db, DbError};
use crate::duration::HumanDuration;
use crate::plan::rules::RuleSet;
use crate::source::outbox;

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
}

/// Runs the planned steps in order, calling `done` after each. Each waits
/// at most `lock_timeout` for its table locks: an ALTER TABLE queued behind
/// a long transaction would make every later query on the table queue
/// behind it.
pub async fn apply(
    db: &Db,
    plan: &Plan,
    lock_timeout: Duration,
    mut done: impl FnMut(&Step),
) -> Result<(), DbError> {
    db.execute_batch(&format!(
        "SET lock_timeout = '{}ms'",
        lock_timeout.as_millis().max(1)
    ))
    .await?;
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
    Ok(())
}

/// The live checks of the configured source: one line per problem, each
/// saying what to do. `running` tolerates a lost or missing slot (`run`
/// rebuilds it and flushes the keys; `check-config` reports it).
pub async fn check(
    db: &Db,
    config: &Config,
    rules: &RuleSet,
    running: bool,
) -> Result<Vec<String>, DbError> {
    match config.postgres.source {
        SourceKind::Replication => {
            catalog::check(
                db,
                rules,
                CheckScope {
                    publication: &config.replication.publication,
                    slot: Some(&config.replication.slot),
                    tolerate_lost_slot: running,
                },
            )
            .await
        }
        SourceKind::Outbox => outbox::install::check(db, rules, &config.outbox).await,
    }
}
