//! `setup [--print]` and `teardown`: plan the statements from the rules and
//! the live catalog (see each source's `install` module), then print or
//! run them.

use crate::cli::{Failure, Loaded};
use crate::config::SourceKind;
use crate::db::Db;
use crate::source::{install, outbox, replication};

/// `setup`: prints (`--print`) or runs what the database is missing.
pub async fn setup(loaded: Loaded, print: bool) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let plan = match loaded.config.postgres.source {
        SourceKind::Replication => {
            replication::install::plan(&db, &loaded.rules, &loaded.config.replication).await?
        }
        SourceKind::Outbox => {
            outbox::install::plan(&db, &loaded.rules, &loaded.config.outbox).await?
        }
    };
    if !plan.problems.is_empty() {
        return Err(Failure::usage(plan.problems));
    }
    if print {
        println!(
            "-- pg-cache-invalidator setup for {}",
            loaded.conn.redacted()
        );
        if plan.steps.is_empty() {
            println!("-- nothing to do: the database is ready");
        }
        for step in &plan.steps {
            println!("{step}");
        }
        return Ok(());
    }
    if plan.steps.is_empty() {
        println!("nothing to do: the database is ready");
        return Ok(());
    }
    install::apply(&db, &plan, loaded.config.setup.lock_timeout.0, |step| {
        println!("done: {}", step.why)
    })
    .await?;
    Ok(())
}

/// `teardown`: drops the slot and publication, or the outbox.
pub async fn teardown(loaded: Loaded) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let plan = match loaded.config.postgres.source {
        SourceKind::Replication => {
            replication::install::plan_teardown(&db, &loaded.config.replication).await?
        }
        SourceKind::Outbox => outbox::install::plan_teardown(&db, &loaded.config.outbox).await?,
    };
    if !plan.problems.is_empty() {
        return Err(Failure::usage(plan.problems));
    }
    if plan.steps.is_empty() {
        println!("nothing to do: no slot or publication left");
        return Ok(());
    }
    install::apply(&db, &plan, loaded.config.setup.lock_timeout.0, |step| {
        println!("done: {}", step.why)
    })
    .await?;
    println!("note: replica identities were left as they are");
    Ok(())
}
