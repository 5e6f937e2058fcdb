//! The client packages' own tests, run against a real Redis, a real
//! PostgreSQL and the daemon started here (the Rust client is tested in
//! `consistency`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::TestEnv;

/// `npm test` of `clients/typescript` (node's test runner: the lease
/// protocol, write tokens, a refused fill after a real invalidation, a
/// concurrent race with zero stale reads, self-loading of the functions)
/// passes against the daemon running with the demo rules.
#[tokio::test(flavor = "multi_thread")]
async fn typescript() {
    let dir = typescript_package();
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
    // The live tests skip themselves without the two URLs: here they ran.
    assert!(
        stdout.contains("\n# skipped 0\n"),
        "some of the client's tests were skipped:\n{stdout}"
    );
}

/// clients/typescript with its build tools installed.
fn typescript_package() -> PathBuf {
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
    dir
}

/// Runs `program args` in `dir`; panics with its output unless it succeeds.
fn run_in(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// What `npm pack` makes of clients/typescript installs into a fresh app
/// with one `npm install <tarball>` (README "Installing the clients"):
/// `require` and `import` both load it and a getOrLoad through it misses,
/// fills and hits on a real Redis; tsc type-checks an app against its
/// declarations as CommonJS and as ESM (and a wrong option type is an
/// error there, so the types are really read).
#[tokio::test(flavor = "multi_thread")]
async fn the_packed_typescript_client_installs_into_a_fresh_app() {
    let dir = typescript_package();
    let packed = tempfile::tempdir().expect("tempdir");
    let destination = packed.path().to_str().expect("utf-8 path");
    // `npm pack` rebuilds dist/ (prepare): one at a time, as in `typescript`.
    let tarball = run_in(
        &dir,
        "flock",
        &[
            "node_modules/.pgci-npm-test.lock",
            "npm",
            "pack",
            "--silent",
            "--pack-destination",
            destination,
        ],
        &[],
    );
    let tarball = packed.path().join(
        tarball
            .trim()
            .lines()
            .last()
            .expect("npm pack prints the file"),
    );
    let app = tempfile::tempdir().expect("tempdir");
    let app = app.path();
    std::fs::write(
        app.join("package.json"),
        r#"{ "name": "fresh-app", "version": "1.0.0", "private": true }"#,
    )
    .expect("package.json");
    // The one command (its peer ioredis and the type-check's tools beside).
    run_in(
        app,
        "npm",
        &[
            "install",
            "--no-audit",
            "--no-fund",
            "--prefer-offline",
            tarball.to_str().expect("utf-8 path"),
            "ioredis@5.9.2",
            "typescript@5.9.3",
            "@types/node@20.9.5",
        ],
        &[],
    );
    let redis = pgci_test_support::redis_server::Redis::start().await;
    let program = |import: &str, key: &str| {
        format!(
            r#"{import}
const redis = new Redis(process.env.REDIS_URL);
const cache = createCache({{ redis }});
const first = await cache.getOrLoadWithSource("{key}", 60, async () => ({{ n: 1 }}));
const second = await cache.getOrLoadWithSource("{key}", 60, async () => ({{ n: 2 }}));
console.log(JSON.stringify([first.source, second.source, second.value]));
redis.disconnect();
"#
        )
    };
    std::fs::write(
        app.join("app.mjs"),
        program(
            "import Redis from \"ioredis\";\nimport { createCache } from \"@pg-cache-invalidator/client\";",
            "fresh:esm",
        ),
    )
    .expect("app.mjs");
    std::fs::write(
        app.join("app.cjs"),
        format!(
            "(async () => {{\n{}}})().catch((e) => {{ console.error(e); process.exit(1); }});\n",
            program(
                "const Redis = require(\"ioredis\");\nconst { createCache } = require(\"@pg-cache-invalidator/client\");",
                "fresh:cjs",
            )
        ),
    )
    .expect("app.cjs");
    let url = redis.url();
    for file in ["app.mjs", "app.cjs"] {
        let out = run_in(app, "node", &[file], &[("REDIS_URL", &url)]);
        assert_eq!(out.trim(), r#"["filled","hit",{"n":1}]"#, "{file}");
    }
    let typed = r#"import type { Redis } from "ioredis";
import { createCache, type Cache, type Source } from "@pg-cache-invalidator/client";
declare const redis: Redis;
const cache: Cache = createCache({ redis, after: { waitMs: 50 } });
export const source: Promise<Source> = cache.getOrLoadWithSource("k", 60, async () => 1).then((r) => r.source);
// @ts-expect-error leaseMs is a number of milliseconds
createCache({ redis, leaseMs: "10s" });
"#;
    std::fs::write(app.join("typed.ts"), typed).expect("typed.ts");
    std::fs::write(app.join("typed.mts"), typed).expect("typed.mts");
    std::fs::write(
        app.join("tsconfig.json"),
        r#"{ "compilerOptions": { "module": "node16", "moduleResolution": "node16", "strict": true, "noEmit": true, "skipLibCheck": true, "types": ["node"] }, "files": ["typed.ts", "typed.mts"] }"#,
    )
    .expect("tsconfig.json");
    run_in(
        app,
        "node",
        &["node_modules/typescript/bin/tsc", "-p", "."],
        &[],
    );
}
