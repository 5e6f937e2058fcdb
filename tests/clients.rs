//! The client packages' own tests, run against a real Redis, a real
//! PostgreSQL and the daemon started here (the Rust client is tested in
//! `consistency`).

use std::path::Path;
use std::process::Command;

use crate::support::TestEnv;

/// `npm test` of `clients/typescript` (node's test runner: the lease
/// protocol, write tokens, a refused fill after a real invalidation, a
/// concurrent race with zero stale reads, self-loading of the functions)
/// passes against the daemon running with the demo rules.
#[tokio::test(flavor = "multi_thread")]
async fn typescript() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/typescript");
    if !dir.join("node_modules").exists() {
        let ci = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("npm is installed (scripts/test.sh installs it)");
        assert!(
            ci.status.success(),
            "npm ci: {}",
            String::from_utf8_lossy(&ci.stderr)
        );
    }
    let mut env = TestEnv::start(12).await;
    env.setup();
    let _daemon = env.daemon().await;
    // `npm test` rebuilds dist/: the Redis matrix runs this test on two
    // servers at once, and one build must not overwrite what the other's
    // tests are loading (flock(1) serializes them).
    let out = tokio::process::Command::new("flock")
        .arg(dir.join("node_modules/.pgci-npm-test.lock"))
        .args(["npm", "test"])
        .current_dir(&dir)
        .env("PGCI_TEST_REDIS_URL", env.redis.url())
        .env("PGCI_TEST_DATABASE_URL", env.pg.url())
        .output()
        .await
        .expect("run npm test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "npm test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
