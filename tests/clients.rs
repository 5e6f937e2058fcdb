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
    // The Next.js cache handler's test: profile pages carry profile:<id>.
    env.write_config(NEXT_TAG_RULE);
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

/// A rule naming the cache tag of a profile's pages (the demo rules' own
/// keys stay as they are).
pub(crate) const NEXT_TAG_RULE: &str =
    "[[rules]]\ntable = \"public.profiles\"\ntags = [\"profile:{id}\"]\n";

/// clients/typescript with its build tools installed.
pub(crate) fn typescript_package() -> PathBuf {
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

/// `sql/client/write_token.sql` as Supabase runs it: roles `anon`,
/// `authenticated` and a login `authenticator` (PostgREST's `set role` and
/// JWT claims per request), row-level security on the table, and
/// Supabase's default grant of new functions to `anon`. A user's write,
/// then `select public.pgci_write_token()` in its own transaction, gives a
/// token past the write: while the daemon is stopped a read with it
/// bypasses the cached old value, and once the daemon runs it reads the new
/// one through the cache. `anon` may not call it; inside the writing
/// transaction it refuses with a line that says what to do; the file runs
/// twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_supabase_write_token_function_serves_authenticated_users_under_rls() {
    use pgci_client::{Cache, CacheOptions, Source, WriteToken};
    let mut env = TestEnv::start(2).await;
    env.setup();
    let daemon = env.daemon().await;
    let admin = env.pg.client().await;
    admin
        .batch_execute(
            "create role anon nologin;
             create role authenticated nologin;
             create role authenticator login noinherit;
             grant anon, authenticated to authenticator;
             grant usage on schema public to anon, authenticated;
             grant select, update on public.profiles to authenticated;
             alter default privileges in schema public grant execute on functions to anon, authenticated;
             alter table public.profiles enable row level security;
             create policy own_profile on public.profiles to authenticated
               using (id = (current_setting('request.jwt.claims', true)::json ->> 'sub')::uuid);",
        )
        .await
        .expect("Supabase's roles and a row-level security policy");
    let sql = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sql/client/write_token.sql"
    ))
    .expect("sql/client/write_token.sql");
    for _ in 0..2 {
        admin.batch_execute(&sql).await.expect("write_token.sql");
    }
    let users = crate::support::users(&env, 2).await;
    let (me, other) = (&users[0].id, &users[1].id);
    let (app, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=authenticator dbname=postgres",
            env.pg.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect as authenticator");
    tokio::spawn(connection);
    // One PostgREST request: a transaction as `role` with the user's claims.
    let request = |role: &'static str, body: String| {
        let app = &app;
        let claims = format!(r#"{{"sub":"{me}"}}"#);
        async move {
            app.batch_execute(&format!(
                "begin; set local role {role}; select set_config('request.jwt.claims', '{claims}', true); {body}"
            ))
            .await?;
            let rows = app.simple_query("commit").await;
            rows.map(|_| ())
        }
    };
    let token_in = |role: &'static str| {
        let app = &app;
        async move {
            app.batch_execute(&format!("begin; set local role {role}"))
                .await
                .expect("begin");
            let token = app
                .query_one("select public.pgci_write_token()", &[])
                .await
                .map(|row| row.get::<_, String>(0));
            app.batch_execute(if token.is_ok() { "commit" } else { "rollback" })
                .await
                .expect("end");
            token
        }
    };
    // RLS holds: the user cannot change another's profile.
    request(
        "authenticated",
        format!("update public.profiles set bio = 'not mine' where id = '{other}';"),
    )
    .await
    .expect("an update RLS filters to nothing");
    let bio: String = admin
        .query_one(
            "select coalesce(bio, '') from public.profiles where id = $1::text::uuid",
            &[other],
        )
        .await
        .expect("bio")
        .get(0);
    assert_ne!(bio, "not mine");

    let redis = env.redis.conn().await;
    let mut cache = Cache::new(redis, CacheOptions::default());
    let key = format!("profile:user:{me}");
    let read_bio = || async {
        let bio: String = admin
            .query_one(
                "select coalesce(bio, '') from public.profiles where id = $1::text::uuid",
                &[me],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        Ok::<_, String>(Some(bio))
    };
    let (old, source) = cache
        .get_or_load(&key, 3600, read_bio, None)
        .await
        .expect("fill");
    assert_eq!(source, Source::Filled);

    // Inside the writing transaction the function refuses, saying what to do.
    let refused = request(
        "authenticated",
        format!(
            "update public.profiles set bio = 'in-txn' where id = '{me}'; select public.pgci_write_token();"
        ),
    )
    .await
    .expect_err("a token inside the writing transaction");
    let message = refused
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("call it after the write committed"),
        "{refused:?}"
    );
    app.batch_execute("rollback").await.expect("rollback");
    // anon (Supabase grants new functions to it by default) may not call it.
    let denied = token_in("anon")
        .await
        .expect_err("anon calls pgci_write_token");
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{denied:?}"
    );

    // The daemon stopped: the write, then the token in its own request.
    let pid = daemon.pid().expect("pid");
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill")
    };
    signal("STOP");
    request(
        "authenticated",
        format!("update public.profiles set bio = 'mine, new' where id = '{me}';"),
    )
    .await
    .expect("the user's own write");
    let token: WriteToken = token_in("authenticated")
        .await
        .expect("pgci_write_token as authenticated")
        .parse()
        .expect("a pg_lsn");
    let (value, source) = cache
        .get_or_load(&key, 3600, read_bio, Some(token))
        .await
        .expect("own read while the daemon is stopped");
    signal("CONT");
    assert_eq!(
        (value.as_deref(), source),
        (Some("mine, new"), Source::Bypassed),
        "the cached {old:?} was trusted past the write"
    );
    // Once the daemon applied the write the same token reads the cache.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (value, source) = cache
            .get_or_load(&key, 3600, read_bio, Some(token))
            .await
            .expect("own read");
        assert_eq!(value.as_deref(), Some("mine, new"));
        if source == Source::Hit {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not pass the token: {}",
            daemon.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
