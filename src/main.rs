//! The `pg-cache-invalidator` binary: parse the command line and hand it
//! to [`pg_cache_invalidator::cli`], which loads the configuration and runs
//! the command. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;

use pg_cache_invalidator::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Both TLS stacks in the dependency tree are compiled in, so rustls
    // cannot pick a provider itself: choose one before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    // The command runs as a task on the runtime's workers, not on this
    // thread: the pipeline's loop hands every batch and acknowledgement to
    // tasks (the stream's reader, the sink, Redis's connections) that run
    // there, and a hand-over between two workers' queues wakes fewer
    // sleeping threads than one to and from this thread (BENCHMARKS.md,
    // "Where the live tail goes": a sixth less CPU at 5,000 rows/s).
    match runtime.block_on(runtime.spawn(cli::run(cli))) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: the command stopped unexpectedly: {error}");
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
