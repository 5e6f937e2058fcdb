//! `run`: the daemon, until SIGTERM or a fatal error.

use crate::app::{self, Stopped};
use crate::cli::{Failure, Loaded};
use crate::error::Exit;

/// Runs the daemon (see [`crate::app`]); its exit status is
/// [`Stopped::exit`]'s.
pub async fn run(loaded: Loaded) -> Result<(), Failure> {
    let stopped = match app::run(loaded.config, loaded.rules, loaded.conn).await {
        Ok(()) => return Ok(()),
        Err(stopped) => stopped,
    };
    let exit = stopped.exit();
    if exit == Exit::Success {
        return Ok(());
    }
    let lines = match stopped {
        Stopped::Problems(lines) => lines,
        Stopped::Database(error) => vec![error.one_line()],
        Stopped::Fatal(fatal) => vec![fatal.to_string()],
        Stopped::Failed(text) | Stopped::Interrupted(text) => vec![text],
        Stopped::Cancelled => Vec::new(),
    };
    Err(Failure::new(exit, lines))
}
