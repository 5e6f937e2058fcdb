//! Test harness: a private PostgreSQL (wal_level=logical) and redis-server
//! per test, on free loopback ports in a temporary directory, started from
//! the machine's binaries and stopped on Drop; and the daemon binary run as
//! a child process, so tests can SIGTERM or kill -9 it.
//!
//! `initdb` runs once per machine into a template directory that each test
//! copies, which makes a fresh cluster cost a copy and a start.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

/// The demo schema the tests write to.
pub const SCHEMA_SQL: &str = include_str!("../../sql/demo/avolve_schema.sql");
/// The demo rules.
pub const RULES_TOML: &str = include_str!("../../sql/demo/avolve_config.toml");
/// An extra rule the harness watches to know when the daemon has caught up.
const SENTINEL_RULE: &str = r#"
[[rules]]
table  = "public.pillars"
keys   = ["sentinel:pillar:{id}"]
action = "delete"
"#;
/// The binary under test.
pub const DAEMON: &str = env!("CARGO_BIN_EXE_pg-cache-invalidator");

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("id postgres (is the postgresql package installed?)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// The newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/test.sh, which installs it")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().expect("no PostgreSQL server binaries found")
}

/// A command that runs as the postgres user when we are root (initdb and
/// postgres refuse to run as root).
fn pg_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    if is_root() {
        use std::os::unix::process::CommandExt;
        cmd.uid(id_of("-u")).gid(id_of("-g"));
    }
    cmd
}

fn chown_to_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success());
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The initdb'd template cluster, made once per machine and reused.
fn template() -> PathBuf {
    let mut guard = TEMPLATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = guard.as_ref() {
        return path.clone();
    }
    let bin = pg_bin();
    let version = bin
        .parent()
        .and_then(|p| p.file_name())
        .map(|v| v.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = std::env::temp_dir().join(format!("pgci-template-pg{version}"));
    if !path.join("template.ok").exists() {
        let build =
            std::env::temp_dir().join(format!("pgci-template-build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&build);
        std::fs::create_dir_all(&build).expect("mkdir");
        chown_to_postgres(&build);
        let out = pg_command(&bin.join("initdb"))
            .arg("-D")
            .arg(build.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(build.join("template.ok"), b"ok").expect("marker");
        let _ = std::fs::remove_dir_all(&path);
        if std::fs::rename(&build, &path).is_err() {
            // Another process won the race; use its template.
            let _ = std::fs::remove_dir_all(&build);
        }
    }
    *guard = Some(path.clone());
    path
}

/// A test certificate authority and a server certificate it signed for
/// `DNS:localhost` (not for the IP address, so host-name checks can fail).
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    /// Generates a CA, a server key and certificate, and an unrelated CA.
    pub fn generate() -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("pgci-certs-")
            .tempdir()
            .expect("tempdir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-subj",
                &format!("/CN=pgci test {ca}"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(dir.path().join("san.ext"), "subjectAltName=DNS:localhost\n").expect("ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.pem",
            "-extfile",
            "san.ext",
        ]);
        Certs { dir }
    }

    /// A file of the set: `ca.pem`, `other-ca.pem`, `server.pem`, `server.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A private PostgreSQL server.
pub struct Postgres {
    dir: TempDir,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    /// Extra `-c` settings (TLS).
    settings: Vec<String>,
}

impl Postgres {
    /// Copies the template and starts a server on a free port.
    pub async fn start() -> Postgres {
        Postgres::start_with(None).await
    }

    /// Like [`Postgres::start`], serving TLS with `certs` when given.
    pub async fn start_with(certs: Option<&Certs>) -> Postgres {
        let template = template();
        let dir = tempfile::Builder::new()
            .prefix("pgci-pg-")
            .tempdir()
            .expect("tempdir");
        let status = Command::new("cp")
            .arg("-a")
            .arg(template.join("data"))
            .arg(dir.path().join("data"))
            .status()
            .expect("cp");
        assert!(status.success(), "copying the template cluster failed");
        let mut settings = Vec::new();
        if let Some(certs) = certs {
            for name in ["server.pem", "server.key"] {
                std::fs::copy(certs.path(name), dir.path().join(name)).expect("copy cert");
            }
            let status = Command::new("chmod")
                .arg("600")
                .arg(dir.path().join("server.key"))
                .status()
                .expect("chmod");
            assert!(status.success());
            settings.push("ssl=on".to_string());
            settings.push(format!(
                "ssl_cert_file={}",
                dir.path().join("server.pem").display()
            ));
            settings.push(format!(
                "ssl_key_file={}",
                dir.path().join("server.key").display()
            ));
        }
        chown_to_postgres(dir.path());
        let mut pg = Postgres {
            dir,
            port: free_port(),
            child: None,
            settings,
        };
        pg.spawn();
        pg.wait_ready().await;
        pg
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("log file");
        let mut command = pg_command(&pg_bin().join("postgres"));
        for setting in &self.settings {
            command.arg("-c").arg(setting);
        }
        let child = command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "wal_level=logical"])
            .args(["-c", "max_replication_slots=20"])
            .args(["-c", "max_wal_senders=20"])
            .args(["-c", "wal_sender_timeout=10s"])
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=50"])
            .args(["-c", "log_connections=on"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio_postgres::connect(&self.conninfo(), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// The URL the daemon uses.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// A new client.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(), tokio_postgres::NoTls)
            .await
            .expect("connect to test postgres");
        tokio::spawn(conn);
        client
    }

    /// Crashes the server (SIGQUIT: immediate shutdown, crash recovery on
    /// the next start) and starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready().await;
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private redis-server.
pub struct Redis {
    dir: TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    /// Serve TLS only, with these certificates.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Redis {
    /// Starts a server on a free port; it saves nothing unless told to.
    pub async fn start() -> Redis {
        Redis::start_with(None).await
    }

    /// Like [`Redis::start`], serving only TLS with `certs` when given.
    pub async fn start_with(certs: Option<&Certs>) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("pgci-redis-")
            .tempdir()
            .expect("tempdir");
        let mut redis = Redis {
            dir,
            port: free_port(),
            child: None,
            tls: certs.map(|c| (c.path("server.pem"), c.path("server.key"), c.path("ca.pem"))),
        };
        redis.spawn().await;
        redis
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("log");
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => {
                command.args(["--port", &self.port.to_string()]);
            }
            Some((cert, key, ca)) => {
                command
                    .args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server (is the redis-server package installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut conn) = self.try_conn().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn try_conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        // Two TLS providers are compiled in; pick one, as the daemon does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = match &self.tls {
            None => self.url(),
            Some(_) => format!("rediss://localhost:{}/0#insecure", self.port),
        };
        redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await
    }

    /// The URL the daemon uses.
    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://localhost:{}/0", self.port),
        }
    }

    /// A new connection.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_conn().await.expect("connect to test redis")
    }

    /// Kills the server (SIGKILL): clients see their connections drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port; it loads `dump.rdb` if a SAVE made one.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private PgBouncer in session mode in front of a [`Postgres`].
pub struct PgBouncer {
    dir: TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl PgBouncer {
    /// Starts PgBouncer (session pooling, trust auth) for `pg`.
    pub async fn start(pg: &Postgres) -> PgBouncer {
        let dir = tempfile::Builder::new()
            .prefix("pgci-bouncer-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = session\n\
                 ignore_startup_parameters = extra_float_digits\n",
                pg.port,
                dir.path().join("userlist.txt").display()
            ),
        )
        .expect("ini");
        chown_to_postgres(dir.path());
        let log = std::fs::File::create(dir.path().join("pgbouncer.log")).expect("log");
        let child = pg_command(Path::new("/usr/sbin/pgbouncer"))
            .arg(dir.path().join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pgbouncer (is the pgbouncer package installed?)");
        let bouncer = PgBouncer {
            dir,
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        while tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not start: {}",
                bouncer.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bouncer
    }

    /// The URL through the pooler.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignored SIGTERM: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited, and how.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

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
    /// The pillar row whose key [`TestEnv::sync`] watches.
    sentinel: String,
    /// Where the daemon serves /metrics, /healthz, /readyz.
    pub http_port: u16,
    /// Extra lines for the `[postgres]` section (`source = "outbox"`).
    pub postgres_extra: String,
    /// The URL the daemon connects to, when not the server's own (a pooler).
    pub url_override: Option<String>,
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
        let sentinel: String = client
            .query_one(
                "insert into public.pillars (slug) values ('sentinel') returning id::text",
                &[],
            )
            .await
            .expect("sentinel")
            .get(0);
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
            sentinel,
            http_port: free_port(),
            postgres_extra: String::new(),
            url_override: None,
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
        let text = format!(
            "[postgres]\nurl = \"{}\"\n{}\n\n[redis]\nurl = \"{}\"\n\n{http}{extra}\n{RULES_TOML}\n{SENTINEL_RULE}",
            self.url_override.clone().unwrap_or_else(|| self.pg.url()),
            self.postgres_extra,
            self.redis.url()
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// Writes a config with the demo rules only (no sentinel rule).
    pub fn write_demo_config(&self) {
        let text = format!(
            "[postgres]\nurl = \"{}\"\n{}\n[redis]\nurl = \"{}\"\n\n{RULES_TOML}",
            self.pg.url(),
            self.postgres_extra,
            self.redis.url()
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
        let mut cmd = Command::new(DAEMON);
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
        wait_for(
            "daemon to hold the slot",
            Duration::from_secs(30),
            || async { slot_active(&client).await },
        )
        .await;
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
            sh.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", DAEMON]);
            sh
        } else {
            Command::new(DAEMON)
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
    /// applied, so has every earlier one.
    pub async fn sync(&self) {
        let key = format!("sentinel:pillar:{}", self.sentinel);
        let mut redis = self.redis.conn().await;
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("1")
            .query_async(&mut redis)
            .await
            .expect("set");
        self.pg
            .client()
            .await
            .execute(
                "update public.pillars set slug = slug where id = $1::text::uuid",
                &[&self.sentinel],
            )
            .await
            .expect("touch sentinel");
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

/// GET `path` from the daemon's HTTP listener: (status code, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The value of a Prometheus sample line that starts with `series`
/// (name plus labels as rendered), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Whether some session streams from the slot.
pub async fn slot_active(client: &tokio_postgres::Client) -> bool {
    client
        .query_opt(
            "select active from pg_replication_slots where slot_name = 'pg_cache_invalidator'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false)
}

/// Polls `condition` until it holds; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
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

/// Sets every key to a placeholder value.
pub async fn preset(redis: &mut redis::aio::MultiplexedConnection, keys: &[String]) {
    for chunk in keys.chunks(5000) {
        let mut pipe = redis::pipe();
        for key in chunk {
            pipe.set(key, "cached").ignore();
        }
        let _: () = pipe.query_async(redis).await.expect("preset keys");
    }
}

/// How many of `keys` still exist.
pub async fn surviving(redis: &mut redis::aio::MultiplexedConnection, keys: &[String]) -> usize {
    let mut total = 0;
    for chunk in keys.chunks(5000) {
        let n: usize = redis::cmd("EXISTS")
            .arg(chunk)
            .query_async(redis)
            .await
            .expect("exists");
        total += n;
    }
    total
}
