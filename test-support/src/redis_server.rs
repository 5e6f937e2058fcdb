//! A private redis-server per test on a free loopback port (TLS-only when
//! given certificates), killed on Drop; and helpers to preset and count
//! keys.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::certs::Certs;
use crate::free_port;

/// A private redis-server.
pub struct Redis {
    dir: TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    /// Serve TLS only, with these certificates.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Users loaded from this ACL file (`--aclfile`).
    aclfile: Option<PathBuf>,
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
            aclfile: None,
        };
        redis.spawn(3).await;
        redis
    }

    /// Starts a server whose users are those of the ACL file text `users`
    /// plus an unrestricted `default` user for the test itself (`--aclfile`).
    pub async fn start_with_acl(users: &str) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("pgci-redis-")
            .tempdir()
            .expect("tempdir");
        let aclfile = dir.path().join("users.acl");
        std::fs::write(
            &aclfile,
            format!("user default on nopass ~* &* +@all\n{}\n", users.trim()),
        )
        .expect("aclfile");
        let mut redis = Redis {
            dir,
            port: free_port(),
            child: None,
            tls: None,
            aclfile: Some(aclfile),
        };
        redis.spawn(3).await;
        redis
    }

    /// Starts the server and waits until it answers PING. On a first start
    /// (`moves` left) a server that exited, its port taken between
    /// `free_port` and its bind by another test's server, starts again on
    /// another port.
    async fn spawn(&mut self, moves: u32) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("log");
        let mut command = Command::new(crate::redis_server_bin());
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
        if let Some(aclfile) = &self.aclfile {
            command.arg("--aclfile").arg(aclfile);
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
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited && moves > 0 {
                self.port = free_port();
                return Box::pin(self.spawn(moves - 1)).await;
            }
            // Bounded: whatever took the port may never answer.
            let conn = tokio::time::timeout(Duration::from_secs(2), self.try_conn()).await;
            if let Ok(Ok(mut conn)) = conn {
                let ping = redis::cmd("PING");
                let pong = tokio::time::timeout(
                    Duration::from_secs(2),
                    ping.query_async::<String>(&mut conn),
                )
                .await;
                if matches!(pong, Ok(Ok(_))) {
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
        // The client's default bounds (1 s to connect, 500 ms per answer)
        // are for production; a loaded CI machine takes longer to answer a
        // 5,000-key pipeline, and a test's own connection must not fail on it.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(10)))
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        redis::Client::open(url)?
            .get_multiplexed_async_connection_with_config(&config)
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
        self.spawn(0).await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
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

/// The events kept in `stream` from `start` on (an XRANGE start: `-`, or
/// `(ID` for after ID), each as its entry id and the event's JSON (the
/// entry's `event` field). An error when the node does not hold the
/// stream's slot (a cluster).
pub async fn stream_events<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    start: &str,
) -> redis::RedisResult<Vec<(String, serde_json::Value)>> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(start)
        .arg("+")
        .query_async(conn)
        .await?;
    Ok(entries
        .into_iter()
        .map(|(id, fields)| {
            let event = fields
                .into_iter()
                .find(|(field, _)| field == "event")
                .map(|(_, json)| serde_json::from_str(&json).expect("an event's JSON"))
                .expect("an entry with an event field");
            (id, event)
        })
        .collect())
}
