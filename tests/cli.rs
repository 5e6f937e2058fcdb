//! The command line: setup is idempotent and prints the SQL a DBA can run;
//! bad configuration fails with one line per problem naming it.

use crate::support::TestEnv;

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `setup --print` on a fresh database prints the statements in
/// sql/demo/setup.sql; `setup` runs them; a second `setup` has nothing to
/// do; `check-config` and `status` then report a ready slot.
#[tokio::test(flavor = "multi_thread")]
async fn setup_prints_runs_and_is_idempotent() {
    let env = TestEnv::start(1).await;
    env.write_demo_config();
    let out = env.cli(&["setup", "--print"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    // Line 1 names this run's URL. From PostgreSQL 17 on the slot is a
    // failover slot; the file shows the form every major accepts.
    let printed: Vec<String> = stdout
        .lines()
        .skip(1)
        .map(|line| {
            line.replace(", 'pgoutput', false, false, true);", ", 'pgoutput');")
                .replace(" (a failover slot: a standby with sync_replication_slots = on keeps it through a promotion)", "")
        })
        .collect();
    let golden =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/demo/setup.sql"))
            .expect("sql/demo/setup.sql");
    let (_, golden) = golden
        .split_once("\n\n")
        .expect("header, blank line, statements");
    assert_eq!(
        printed,
        golden.lines().map(str::to_string).collect::<Vec<_>>(),
        "sql/demo/setup.sql is stale"
    );
    env.write_config("");

    let out = env.cli(&["setup"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("done:"), "{stdout}");
    let out = env.cli(&["setup"]);
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert_eq!(stdout.trim(), "nothing to do: the database is ready");

    let out = env.cli(&["check-config"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("ok:"), "{stdout}");

    // DATABASE_URL replaces the file's URL; PGCI__SECTION__KEY any other key.
    let real = std::fs::read_to_string(&env.config).expect("config");
    std::fs::write(
        &env.config,
        real.replace(&env.pg.url(), "postgres://nobody:secret@127.0.0.1:1/none"),
    )
    .expect("write");
    let out = env.cli_env(&["check-config"], &[("DATABASE_URL", &env.pg.url())]);
    assert!(out.status.success(), "{}", text(&out).1);
    let out = env.cli_env(
        &["check-config"],
        &[("PGCI__REPLICATION__SLOT", "other_slot")],
    );
    let (_, stderr) = text(&out);
    assert!(!stderr.contains("secret"), "password leaked: {stderr}");
    let out = env.cli_env(
        &["check-config"],
        &[
            ("DATABASE_URL", &env.pg.url()),
            ("PGCI__REPLICATION__SLOT", "other_slot"),
        ],
    );
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("replication slot \"other_slot\" does not exist"),
        "{stderr}"
    );
    std::fs::write(&env.config, real).expect("restore");

    let out = env.cli(&["status", "--json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(status["plugin"], "pgoutput");
    assert_eq!(status["active"], false);

    let out = env.cli(&["teardown"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let out = env.cli(&["check-config"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("publication \"pg_cache_invalidator\" does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains("replication slot \"pg_cache_invalidator\" does not exist"),
        "{stderr}"
    );
}

/// Runs `args` on a config with `mutate` applied and returns (exit code,
/// error lines).
fn fails_with(
    env: &TestEnv,
    args: &[&str],
    mutate: impl Fn(String) -> String,
) -> (Option<i32>, Vec<String>) {
    let original = std::fs::read_to_string(&env.config).expect("config");
    std::fs::write(&env.config, mutate(original.clone())).expect("write");
    let out = env.cli(args);
    std::fs::write(&env.config, original).expect("restore");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // `run` logs a start-up line before it checks the database; the
    // problems are the lines starting with "error:".
    let errors = stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect();
    (out.status.code(), errors)
}

/// An unknown key, a malformed template, a column the table lacks, and a
/// replica identity that cannot carry the key columns each fail with exit
/// status 2 and one line that names the problem and the fix.
#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_fails_with_one_line_per_problem() {
    let env = TestEnv::start(1).await;
    env.setup();

    let (code, lines) = fails_with(&env, &["run"], |c| {
        c.replace("[redis]", "[redis]\nchanel = \"x\"")
    });
    assert_eq!(code, Some(2));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("unknown field `chanel`"), "{lines:?}");

    let (code, lines) = fails_with(&env, &["run"], |c| {
        c.replace("profile:user:{id}", "profile:user:{id")
    });
    assert_eq!(code, Some(2));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("rules[0].keys[0]") && lines[0].contains("closing"),
        "{lines:?}"
    );

    let (code, lines) = fails_with(&env, &["check-config"], |c| {
        c.replace("profile:user:{id}", "profile:user:{uid}")
    });
    assert_eq!(code, Some(2));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("public.profiles has no column \"uid\""),
        "{lines:?}"
    );

    let (code, lines) = fails_with(&env, &["check-config"], |c| {
        c.replace("[redis]", "[replication]\nslot = \"Bad Slot\"\n[redis]")
    });
    assert_eq!(code, Some(2));
    assert!(lines[0].contains("replication.slot"), "{lines:?}");

    env.pg
        .client()
        .await
        .batch_execute("alter table public.user_tokens replica identity default")
        .await
        .expect("alter");
    let (code, lines) = fails_with(&env, &["run"], |c| c);
    assert_eq!(code, Some(2), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(
            "run `ALTER TABLE \"public\".\"user_tokens\" REPLICA IDENTITY USING INDEX \"user_tokens_user_id_token_id_key\";`"
        ),
        "{lines:?}"
    );
    assert!(lines[0].contains("token_id, user_id"), "{lines:?}");

    let missing = env.path("missing.toml");
    let out = std::process::Command::new(crate::support::DAEMON)
        .args(["check-config", "--config"])
        .arg(&missing)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
}

/// Passwords full of URL metacharacters (`/ ? # @ :`, raw or
/// percent-encoded) never appear in any output: not in `check-config`,
/// `setup --print`, `status`, `teardown`, nor in the daemon's log while it
/// retries a connection, whether the URL parses, the server accepts it or
/// nobody listens.
#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_appear_in_output() {
    let mut env = TestEnv::start(1).await;
    let closed = crate::support::free_port();
    let passwords = ["p/ss?w@rd", "a:b@c#d/e", "x?y/z@q", "p%2Fss%40rd%3Fx"];
    for password in passwords {
        let decoded = password
            .replace("%2F", "/")
            .replace("%40", "@")
            .replace("%3F", "?");
        let forms = [password.to_string(), decoded];
        for (pg_port, redis_port) in [(env.pg.port, env.redis.port), (closed, closed)] {
            std::fs::write(
                &env.config,
                format!(
                    "[postgres]\nurl = \"postgres://postgres:{password}@127.0.0.1:{pg_port}/postgres?sslmode=disable\"\n\n\
                     [redis]\nurl = \"redis://:{password}@127.0.0.1:{redis_port}/0\"\n\n\
                     [http]\nlisten = \"127.0.0.1:{}\"\n\n{}",
                    env.http_port,
                    crate::support::RULES_TOML
                ),
            )
            .expect("write config");
            for args in [
                &["check-config"][..],
                &["setup", "--print"],
                &["status"],
                &["status", "--json"],
                &["teardown"],
            ] {
                let out = env.cli(args);
                let (stdout, stderr) = text(&out);
                if password.contains(['/', '?', '@']) {
                    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
                    assert!(stderr.contains("percent-encode"), "{args:?}: {stderr}");
                }
                for form in &forms {
                    assert!(
                        !stdout.contains(form.as_str()) && !stderr.contains(form.as_str()),
                        "{args:?} printed the password {form:?}: {stdout}{stderr}"
                    );
                }
            }
            let mut daemon = env.spawn_daemon();
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            daemon.kill9();
            let log = daemon.log();
            for form in &forms {
                assert!(
                    !log.contains(form.as_str()),
                    "the log shows {form:?}: {log}"
                );
            }
        }
    }
}

/// `setup` waits at most `setup.lock_timeout` for a table another
/// transaction is using, then stops with exit status 2 and says to retry at
/// a quieter time, instead of queueing its ALTER TABLE (and every later
/// query on the table behind it) for as long as the transaction lasts.
#[tokio::test(flavor = "multi_thread")]
async fn setup_gives_up_on_a_busy_table_after_lock_timeout() {
    let env = TestEnv::start(1).await;
    env.write_config("[setup]\nlock_timeout = \"1s\"\n");
    let holder = env.pg.client().await;
    holder
        .batch_execute("begin; select count(*) from public.user_tokens")
        .await
        .expect("hold a lock");
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(crate::support::DAEMON)
        .args(["setup", "--config"])
        .arg(&env.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run setup");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("setup queued behind the open transaction for 20 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let out = child.wait_with_output().expect("output");
    let (_, stderr) = text(&out);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("quieter time"), "{stderr}");
    assert!(stderr.contains("public.user_tokens"), "{stderr}");
    holder.batch_execute("rollback").await.expect("release");
    env.setup();
}

/// A rule that names a view is reported as a view, with what to do, not as
/// a missing table.
#[tokio::test(flavor = "multi_thread")]
async fn a_view_in_a_rule_is_named_as_a_view() {
    let env = TestEnv::start(1).await;
    env.pg
        .client()
        .await
        .batch_execute(
            "create view public.profile_names as select id, full_name from public.profiles",
        )
        .await
        .expect("view");
    for args in [&["check-config"][..], &["setup", "--print"]] {
        let (code, lines) = fails_with(&env, args, |c| {
            format!("{c}\n[[rules]]\ntable = \"public.profile_names\"\nkeys = [\"name:{{id}}\"]\n")
        });
        assert_eq!(code, Some(2), "{args:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("public.profile_names is a view")),
            "{args:?}: {lines:?}"
        );
    }
}
