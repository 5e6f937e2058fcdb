//! A private Redis Cluster per test: three masters and three replicas
//! (`redis-server --cluster-enabled yes` on free loopback ports, joined by
//! `redis-cli --cluster create … --cluster-replicas 1`), killed on Drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::cluster_node_port;

/// One node of the cluster.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A private Redis Cluster.
pub struct RedisCluster {
    dir: TempDir,
    nodes: Vec<Node>,
}

/// Masters, each with one replica.
const MASTERS: usize = 3;

impl RedisCluster {
    /// Starts six nodes and forms the cluster; returns once every node
    /// reports `cluster_state:ok` and every master's replica is online.
    pub async fn start() -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("pgci-redis-cluster-")
            .tempdir()
            .expect("tempdir");
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..2 * MASTERS {
            let port = cluster_node_port();
            cluster.nodes.push(Node { port, child: None });
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_started(i).await;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(crate::redis_cli_bin())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create (is redis-tools installed?)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_healthy().await;
        for port in cluster.master_ports().await {
            cluster.replica_of(port).await;
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let port = self.nodes[i].port;
        let node_dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("redis.log"))
            .expect("log");
        let child = Command::new(crate::redis_server_bin())
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            // Failovers within a couple of seconds of a master's death.
            .args(["--cluster-node-timeout", "2000"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&node_dir)
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        self.nodes[i].child = Some(child);
    }

    /// Waits until node `i` answers, as our process. A port
    /// found free can be taken by another test's server before ours binds
    /// it (ours then exits, and that server answers PING): the node then
    /// starts again on another free port.
    async fn wait_started(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let exited = self.nodes[i]
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                self.nodes[i].port = cluster_node_port();
                self.spawn(i);
            } else if let Ok(mut conn) = self.node_conn(i).await {
                let info: String = redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                let ours = self.nodes[i]
                    .child
                    .as_ref()
                    .is_some_and(|c| info.contains(&format!("process_id:{}\r\n", c.id())));
                if ours {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "cluster node did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every running node says the cluster is ok and knows
    /// three masters covering every slot.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut healthy = true;
            for i in 0..self.nodes.len() {
                if self.nodes[i].child.is_none() {
                    continue;
                }
                let info: Option<String> = match self.node_conn(i).await {
                    Ok(mut conn) => redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .ok(),
                    Err(_) => None,
                };
                let info = info.unwrap_or_default();
                healthy &= info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && info.contains(&format!("cluster_size:{MASTERS}"));
            }
            if healthy {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the cluster did not become healthy in 60 s; what each node says:\n{}",
                    self.states().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each running node's `CLUSTER INFO` state and `CLUSTER NODES`, for
    /// a failure's message.
    async fn states(&self) -> String {
        let mut out = String::new();
        for i in 0..self.nodes.len() {
            let port = self.nodes[i].port;
            if self.nodes[i].child.is_none() {
                out.push_str(&format!("{port}: not running\n"));
                continue;
            }
            let (info, nodes) = match self.node_conn(i).await {
                Ok(mut conn) => {
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_else(|e| format!("CLUSTER INFO failed: {e}"));
                    let nodes: String = redis::cmd("CLUSTER")
                        .arg("NODES")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_else(|e| format!("CLUSTER NODES failed: {e}"));
                    (info, nodes)
                }
                Err(e) => (format!("no connection: {e}"), String::new()),
            };
            let state: Vec<&str> = info
                .lines()
                .filter(|l| {
                    l.starts_with("cluster_state")
                        || l.starts_with("cluster_slots_ok")
                        || l.starts_with("cluster_slots_fail")
                        || l.starts_with("cluster_size")
                        || l.starts_with("cluster_known_nodes")
                        || l.contains("failed")
                })
                .map(str::trim)
                .collect();
            out.push_str(&format!("{port}: {}\n", state.join(" ")));
            for line in nodes.lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
        out
    }

    /// A direct connection to node `i`.
    async fn node_conn(&self, i: usize) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.nodes[i].port))?
            .get_multiplexed_async_connection()
            .await
    }

    /// The seed URL the daemon is given (the first node).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.nodes[0].port)
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// A cluster connection, for the test's own reads and writes.
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect to the test cluster")
    }

    /// The ports of the nodes that are masters now.
    pub async fn master_ports(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            if let Ok(mut conn) = self.node_conn(i).await {
                let role: Vec<redis::Value> = redis::cmd("ROLE")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                    masters.push(self.nodes[i].port);
                }
            }
        }
        masters
    }

    /// The port of an online replica of the master on `port` (from its
    /// `ROLE`), waiting for one to have connected.
    pub async fn replica_of(&self, port: u16) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(replica) = self.online_replica(port).await {
                return replica;
            }
            assert!(
                Instant::now() < deadline,
                "no replica of {port} came online"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn online_replica(&self, port: u16) -> Option<u16> {
        let mut conn = self.node_conn(self.index(port)).await.ok()?;
        let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await.ok()?;
        // ["master", offset, [[ip, port, offset], ...]]
        let redis::Value::Array(fields) = role else {
            return None;
        };
        let Some(redis::Value::Array(replicas)) = fields.get(2) else {
            return None;
        };
        let Some(redis::Value::Array(replica)) = replicas.first() else {
            return None;
        };
        match replica.get(1) {
            Some(redis::Value::BulkString(port)) => String::from_utf8_lossy(port).parse().ok(),
            _ => None,
        }
    }

    /// Promotes the replica on `port` (`CLUSTER FAILOVER`, its master
    /// agreeing) and waits until it is a master.
    pub async fn failover(&self, port: u16) {
        let mut conn = self.node_conn(self.index(port)).await.expect("replica");
        let _: () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query_async(&mut conn)
            .await
            .expect("cluster failover");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.master_ports().await.contains(&port) {
            assert!(Instant::now() < deadline, "the failover did not happen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the node on `port`: a
    /// stopped node holds its connections but answers nothing.
    pub fn signal(&self, port: u16, signal: &str) {
        let pid = self.nodes[self.index(port)]
            .child
            .as_ref()
            .expect("running node")
            .id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    fn index(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of this cluster")
    }

    /// Starts the node on `port` again after [`RedisCluster::kill`]: with
    /// no data (nothing persists) but its cluster config, so it rejoins,
    /// as a replica of the node that took its slots over.
    pub async fn restart(&mut self, port: u16) {
        let i = self.index(port);
        if self.nodes[i].child.is_none() {
            self.spawn(i);
            self.wait_started(i).await;
        }
    }

    /// Waits until the node on `port` is a master (at most 30 s).
    pub async fn wait_master(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.master_ports().await.contains(&port) {
            assert!(
                Instant::now() < deadline,
                "the node on {port} did not become a master"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills (SIGKILL) the node on `port`; its replica takes over after
    /// the node timeout.
    pub fn kill(&mut self, port: u16) {
        for node in &mut self.nodes {
            if node.port == port {
                if let Some(mut child) = node.child.take() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Sets every key to a placeholder value, one `SET` at a time: keys in
/// different hash slots cannot share a command, and a cluster connection
/// does not split a pipeline by slot. Works on any connection.
pub async fn preset_by_key<C: redis::aio::ConnectionLike>(conn: &mut C, keys: &[String]) {
    for key in keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("cached")
            .query_async(conn)
            .await
            .expect("preset");
    }
}

/// How many of `keys` still exist, one `EXISTS` at a time (see
/// [`preset_by_key`]).
pub async fn surviving_by_key<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &[String],
) -> usize {
    let mut n = 0;
    for key in keys {
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(conn)
            .await
            .expect("exists");
        n += usize::from(exists);
    }
    n
}
