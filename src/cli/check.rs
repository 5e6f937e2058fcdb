//! `check-config`: the file, then the live database against it.

use crate::cli::{Failure, Loaded};
use crate::db::{catalog, Db};
use crate::redis::server;
use crate::source::install;

/// Checks and prints `ok: …`, or one line per problem.
pub async fn check_config(loaded: Loaded) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let problems = install::check(&db, &loaded.conn, &loaded.config, &loaded.rules, false).await?;
    if !problems.is_empty() {
        return Err(Failure::usage(problems));
    }
    let setup = install::of(&loaded.config);
    let mut warnings = catalog::warnings(&db, &loaded.rules).await?;
    warnings.extend(setup.warnings(&db, &loaded.conn).await?);
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    // Every target must answer as a Redis: a URL that reaches nothing, or
    // another server, would otherwise pass here and fail every batch.
    let mut unusable = Vec::new();
    for target in &loaded.config.targets {
        match server::read_once(&target.url, target.ca_cert.as_deref()).await {
            Ok(info) => {
                for warning in info.warnings() {
                    eprintln!("warning: {warning}");
                }
            }
            Err(error) => unusable.push(format!(
                "redis {}: cannot read INFO ({error}): start Redis there, or fix the URL (`run` would wait for it)",
                target.url.redacted()
            )),
        }
    }
    if !unusable.is_empty() {
        return Err(Failure::usage(unusable));
    }
    let source = setup.ready();
    println!(
        "ok: {} table(s), {source} on {}",
        loaded.rules.tables().count(),
        loaded.conn.redacted()
    );
    Ok(())
}
