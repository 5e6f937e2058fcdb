//! `check-config`: the file, then the live database against it.

use crate::cli::{Failure, Loaded};
use crate::db::{catalog, Db};
use crate::redis::server;
use crate::source::install;

/// Checks and prints `ok: …`, or one line per problem.
pub async fn check_config(loaded: Loaded) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let problems = install::check(&db, &loaded.config, &loaded.rules, false).await?;
    if !problems.is_empty() {
        return Err(Failure::usage(problems));
    }
    let setup = install::of(&loaded.config);
    let mut warnings = catalog::warnings(&db, &loaded.rules).await?;
    warnings.extend(setup.warnings(&db, &loaded.conn).await?);
    for warning in warnings {
        eprintln!("warning: {warning}");
    }
    let redis = &loaded.config.redis;
    match server::read_once(&redis.url, redis.ca_cert.as_deref()).await {
        Ok(info) => {
            for warning in info.warnings() {
                eprintln!("warning: {warning}");
            }
        }
        Err(error) => eprintln!(
            "warning: cannot read redis INFO at {} ({error}): its settings are not checked",
            redis.url.redacted()
        ),
    }
    let source = setup.ready();
    println!(
        "ok: {} table(s), {source} on {}",
        loaded.rules.tables().count(),
        loaded.conn.redacted()
    );
    Ok(())
}
