//! [`TestEnv`]: a PostgreSQL with the demo schema, a Redis, a config file
//! for them, and the daemon started against them.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::certs::Certs;
use crate::daemon::Daemon;
use crate::postgres::{slot_active, Postgres};
use crate::redis_server::Redis;
use crate::{daemon_bin, free_port, http_get, wait_for, RULES_TOML, SCHEMA_SQL};

/// An extra rule the harness watches to know when the daemon has caught up:
/// [`TestEnv::sync`] inserts a fresh pillar row per call, so a replay of an
/// earlier sync (after a restart the daemon resumes from its last
/// confirmation, up to a status interval back) renders another key and
/// cannot end a later wait early.
const SENTINEL_RULE: &str = r#"
[[rules]]
table  = "public.pillars"
keys   = ["sentinel:pillar:{id}"]
action = "delete"
"#;

/// A PostgreSQL with the demo schema, a Redis, and a config file for them.
pub struct TestEnv {
    /// The database.
    pub pg: Postgres,
    /// The cache.
    pub redis: Redis,
    /// The daemon's config file.
    pub config: PathBuf,
    dir: TempDir,
    daemons: usize,
    /// Where the daemon serves /metrics, /healthz, /readyz.
    pub http_port: u16,
    /// Extra lines for the `[postgres]` section (`source = "outbox"`).
    pub postgres_extra: String,
    /// The URL the daemon connects to, when not the server's own (a pooler).
    pub url_override: Option<String>,
    /// The Redis URL the daemon uses, when not the server's own (a proxy,
    /// a cluster).
    pub redis_url_override: Option<String>,
    /// Extra lines for the `[redis]` section (`cluster = true`).
    pub redis_extra: String,
    /// When not empty, the file lists these as `[[targets]]` (name, URL,
    /// extra lines) instead of `[redis]`; name the harness's own Redis
    /// among them for [`TestEnv::sync`] to see the daemon catch up.
    pub targets: Vec<(String, String, String)>,
}

impl TestEnv {
    /// Starts both servers, loads the demo schema and seeds `users` users.
    pub async fn start(users: i32) -> TestEnv {
        TestEnv::start_with(users, None).await
    }

    /// Like [`TestEnv::start`], both servers speaking TLS with `certs`.
    pub async fn start_with(users: i32, certs: Option<&Certs>) -> TestEnv {
        let (pg, redis) = tokio::join!(Postgres::start_with(certs), Redis::start_with(certs));
        let client = pg.client().await;
        client.batch_execute(SCHEMA_SQL).await.expect("load schema");
        client
            .execute("select public.seed_demo_data($1)", &[&users])
            .await
            .expect("seed");
        let dir = tempfile::Builder::new()
            .prefix("pgci-env-")
            .tempdir()
            .expect("tempdir");
        let config = dir.path().join("config.toml");
        let env = TestEnv {
            pg,
            redis,
            config,
            dir,
            daemons: 0,
            http_port: free_port(),
            postgres_extra: String::new(),
            url_override: None,
            redis_url_override: None,
            redis_extra: String::new(),
            targets: Vec::new(),
        };
        env.write_config("");
        env
    }

    /// Writes the config file: URLs, `extra` TOML, the demo rules and the
    /// sentinel rule.
    pub fn write_config(&self, extra: &str) {
        let http = if extra.contains("[http]") {
            String::new()
        } else {
            format!("[http]\nlisten = \"127.0.0.1:{}\"\n", self.http_port)
        };
        let redis = if self.targets.is_empty() {
            format!(
                "[redis]\nurl = \"{}\"\n{}\n",
                self.redis_url_override
                    .clone()
                    .unwrap_or_else(|| self.redis.url()),
                self.redis_extra
            )
        } else {
            self.targets
                .iter()
                .map(|(name, url, extra)| {
                    format!("[[targets]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
                })
                .collect()
        };
        let text = format!(
            "[postgres]\nurl = \"{}\"\n{}\n\n{redis}\n{http}{extra}\n{RULES_TOML}\n{SENTINEL_RULE}",
            self.url_override.clone().unwrap_or_else(|| self.pg.url()),
            self.postgres_extra,
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Writes a config with the demo rules only (no sentinel rule).
    pub fn write_demo_config(&self) {
        let text = format!(
            "[postgres]\nurl = \"{}\"\n{}\n[redis]\nurl = \"{}\"\n{}\n\n{RULES_TOML}",
            self.pg.url(),
            self.postgres_extra,
            self.redis_url_override
                .clone()
                .unwrap_or_else(|| self.redis.url()),
            self.redis_extra
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// A path inside the environment's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the binary with `args` (the config flag is added) to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_env(args, &[])
    }

    /// Like [`TestEnv::cli`] with extra environment variables.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(daemon_bin());
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run the binary")
    }

    /// `setup`, which must succeed.
    pub fn setup(&self) {
        let out = self.cli(&["setup"]);
        assert!(
            out.status.success(),
            "setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the daemon and waits until it streams (holds the slot, or
    /// for the outbox source, reports ready).
    pub async fn daemon(&mut self) -> Daemon {
        let daemon = self.spawn_daemon();
        if self.postgres_extra.contains("outbox") {
            let port = self.http_port;
            wait_for(
                "daemon to drain the outbox",
                Duration::from_secs(30),
                || async move {
                    http_get(port, "/readyz")
                        .await
                        .is_some_and(|(s, _)| s == 200)
                },
            )
            .await;
            return daemon;
        }
        let client = self.pg.client().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !slot_active(&client).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for daemon to hold the slot: {}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        daemon
    }

    /// Starts the daemon without waiting.
    pub fn spawn_daemon(&mut self) -> Daemon {
        self.spawn_daemon_env(&[])
    }

    /// Starts the daemon with extra environment variables.
    pub fn spawn_daemon_env(&mut self, env: &[(&str, &str)]) -> Daemon {
        self.daemons += 1;
        let log = self.path(&format!("daemon-{}.log", self.daemons));
        let file = std::fs::File::create(&log).expect("log");
        // systemd gives WATCHDOG_PID with WATCHDOG_USEC; a shell that execs
        // the daemon knows the pid it will have.
        let mut command = if env.iter().any(|(k, _)| *k == "WATCHDOG_USEC") {
            let mut sh = Command::new("sh");
            sh.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
                .arg(daemon_bin());
            sh
        } else {
            Command::new(daemon_bin())
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("PGCI_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start daemon");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Waits until the daemon has applied everything committed so far: it
    /// applies in commit order, so once a change committed now has been
    /// applied, so has every earlier one. Not while the daemon flushes
    /// every rule's keys (a lost slot, a promotion): the flush deletes the
    /// sentinel too; wait for its log line first.
    pub async fn sync(&self) {
        self.sync_on(&self.redis).await;
    }

    /// Like [`TestEnv::sync`], watching `redis` (one of several targets).
    pub async fn sync_on(&self, redis: &Redis) {
        let client = self.pg.client().await;
        let id: String = client
            .query_one("select gen_random_uuid()::text", &[])
            .await
            .expect("sentinel id")
            .get(0);
        let key = format!("sentinel:pillar:{id}");
        let mut redis = redis.conn().await;
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("1")
            .query_async(&mut redis)
            .await
            .expect("set");
        client
            .execute(
                "insert into public.pillars (id, slug) values ($1::text::uuid, 'sentinel-' || $1)",
                &[&id],
            )
            .await
            .expect("insert sentinel");
        wait_for("daemon to catch up", Duration::from_secs(120), || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move {
                !redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async::<bool>(&mut redis)
                    .await
                    .unwrap_or(true)
            }
        })
        .await;
    }
}

/// Every balance key (per user and per user and token) of every
/// user_tokens row, sorted.
pub async fn balance_keys(env: &TestEnv) -> Vec<String> {
    let rows = env
        .pg
        .client()
        .await
        .query(
            "select user_id::text, token_id::text from public.user_tokens",
            &[],
        )
        .await
        .expect("rows");
    let mut keys: Vec<String> = Vec::with_capacity(rows.len() * 2);
    for r in &rows {
        let (user, token): (String, String) = (r.get(0), r.get(1));
        keys.push(format!("balance:user:{user}:token:{token}"));
        keys.push(format!("balance:user:{user}"));
    }
    keys.sort();
    keys.dedup();
    keys
}
