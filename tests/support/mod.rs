//! The harness lives in the `pgci-test-support` crate (`test-support/`),
//! shared with the benchmark; this module adds what only cargo's
//! integration tests know, the path of the binary under test.

pub use pgci_test_support::*;

/// The binary under test.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_pg-cache-invalidator");

/// The harness finds the same binary on its own (see
/// [`pgci_test_support::daemon_bin`]); this proves it does.
#[test]
fn the_harness_runs_the_binary_cargo_built() {
    if std::env::var_os("PGCI_DAEMON_BIN").is_none() {
        assert_eq!(daemon_bin(), std::path::Path::new(DAEMON));
    }
}
