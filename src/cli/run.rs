//! `run`: the daemon, until SIGTERM or a fatal error.

use crate::app::{self, Stopped};
use crate::cli::{Failure, Loaded};

/// Runs the daemon (see [`crate::app`]).
pub async fn run(loaded: Loaded) -> Result<(), Failure> {
    match app::run(loaded.config, loaded.rules, loaded.conn).await {
        Ok(()) | Err(Stopped::Cancelled) => Ok(()),
        Err(Stopped::Problems(lines)) => Err(Failure::usage(lines)),
        Err(Stopped::Database(error)) => Err(Failure::usage(vec![error.one_line()])),
        Err(Stopped::Fatal(fatal)) => Err(fatal.into()),
        Err(Stopped::Failed(text)) => Err(Failure::runtime(text)),
    }
}
