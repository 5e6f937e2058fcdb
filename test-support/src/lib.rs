//! Test harness shared by the integration tests and the benchmark: a
//! private PostgreSQL (wal_level=logical) and redis-server per test, on
//! free loopback ports in temporary directories, started from the
//! machine's binaries and stopped on Drop (PgBouncer and certificates when
//! a test needs them); and the daemon binary run as a child process, so
//! tests can SIGTERM or kill -9 it.
//!
//! One module per service: [`postgres`], [`redis_server`], [`pgbouncer`],
//! [`certs`], [`daemon`], [`demo`] (the demo users and their keys), [`proxy`] (a switchable TCP forwarder, for
//! failovers and slow or cut links), [`redis_cluster`] (three masters, three replicas), and [`env`] ([`TestEnv`]) which puts them together with the
//! demo schema and a config file.

pub mod certs;
pub mod daemon;
pub mod demo;
pub mod env;
pub mod pgbouncer;
pub mod postgres;
pub mod proxy;
pub mod redis_cluster;
pub mod redis_server;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

pub use certs::Certs;
pub use daemon::Daemon;
pub use demo::{first_profile_id, removed_by, users, User};
pub use env::{balance_keys, TestEnv};
pub use pgbouncer::PgBouncer;
pub use postgres::{
    drop_slot_under_daemon, pg_bin, sees_synchronous_standbys, set_synchronous_standbys,
    slot_active, terminate_walsender, Postgres,
};
pub use proxy::{Link, Marked, Proxy};
pub use redis_cluster::RedisCluster;
pub use redis_server::{preset, stream_events, surviving, Redis};

/// The demo schema the tests write to.
pub const SCHEMA_SQL: &str = include_str!("../../sql/demo/avolve_schema.sql");
/// The demo rules.
pub const RULES_TOML: &str = include_str!("../../sql/demo/avolve_config.toml");

/// The daemon binary: `PGCI_DAEMON_BIN` when set, else the one cargo built
/// beside the running test or benchmark (`target/<profile>/`, the parent
/// of its `deps/`).
pub fn daemon_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PGCI_DAEMON_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary lives in target/<profile>/deps");
    profile_dir.join("pg-cache-invalidator")
}

/// The Redis server binary the harness starts: `PGCI_TEST_REDIS_SERVER`
/// when set (Valkey, or another Redis version, unpacked by
/// `scripts/test.sh`), else `redis-server` from `PATH` (Debian's).
pub fn redis_server_bin() -> PathBuf {
    std::env::var_os("PGCI_TEST_REDIS_SERVER")
        .map_or_else(|| PathBuf::from("redis-server"), PathBuf::from)
}

/// The Redis version the harness's server speaks, major and minor, from
/// `--version` (`Redis server v=6.2.5`; Valkey, `Valkey server v=9.1.2`,
/// speaks Redis 7.2).
pub fn redis_server_version() -> (u32, u32) {
    let out = std::process::Command::new(redis_server_bin())
        .arg("--version")
        .output()
        .expect("redis-server --version");
    let text = String::from_utf8_lossy(&out.stdout);
    if text.starts_with("Valkey") {
        return (7, 2);
    }
    let version = text
        .split_whitespace()
        .find_map(|part| part.strip_prefix("v="))
        .unwrap_or("7.0");
    let mut parts = version.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(7), parts.next().unwrap_or(0))
}

/// `redis-acl`'s arguments for the harness's server (`--redis-version`).
pub fn redis_acl_args() -> Vec<String> {
    let (major, minor) = redis_server_version();
    vec![
        "redis-acl".to_string(),
        "--redis-version".to_string(),
        format!("{major}.{minor}"),
    ]
}

/// The `redis-cli` that forms clusters: `PGCI_TEST_REDIS_CLI` when set,
/// else `redis-cli` from `PATH`.
pub fn redis_cli_bin() -> PathBuf {
    std::env::var_os("PGCI_TEST_REDIS_CLI")
        .map_or_else(|| PathBuf::from("redis-cli"), PathBuf::from)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    // Never the same port twice in a process: two servers started at once
    // (a TestEnv starts PostgreSQL and Redis together) were given one port.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A port for a Redis Cluster node: free, with its cluster bus port (the
/// port + 10000) free too, both below the kernel's ephemeral range
/// (32768 and up), so that no [`free_port`] of another test or process can
/// hand out the bus port while the node runs (an HTTP listener once took
/// one and failed with "Address already in use").
pub fn cluster_node_port() -> u16 {
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_768 - 10_000; // P + 10000 stays below 32768
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for i in 0..u32::from(SPAN) {
        let port = LOW + ((seed.wrapping_add(i.wrapping_mul(7_919))) % u32::from(SPAN)) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!(
        "no free port pair for a Redis Cluster node in {LOW}..{}",
        LOW + SPAN
    );
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

/// Waits until GET `path` on the daemon's listener answers `status`;
/// panics with `what` after `timeout`.
pub async fn wait_status(what: &str, port: u16, path: &str, status: u16, timeout: Duration) {
    wait_for(what, timeout, || async move {
        http_get(port, path).await.is_some_and(|(s, _)| s == status)
    })
    .await;
}

/// The sum of every series of metric `name` (all label values), if any.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split_once('{').map_or(series, |(n, _)| n);
            (base == name).then(|| value.parse().ok()).flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
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
