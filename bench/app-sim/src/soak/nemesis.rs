//! The faults the soak injects, drawn from the seed. Each fault is done
//! and healed here: what is killed is started again, what is paused ends;
//! the soak then waits for the daemon to catch up and checks.

use std::time::Duration;

use pgci_test_support::{Daemon, Link, Postgres, Proxy, RedisCluster, TestEnv};
use rand::rngs::StdRng;
use rand::Rng;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// `kill -9` the daemon, start it again a moment later.
    KillDaemon,
    /// End the walsender the daemon streams from.
    TerminateWalsender,
    /// Restart PostgreSQL (fast shutdown): every connection drops.
    RestartPostgres,
    /// `SAVE` Redis, keep writing, then restart it: it comes back from
    /// its own older snapshot, with values and a recorded position from
    /// before the writes in between.
    RedisFromSnapshot,
    /// `CLIENT KILL` every normal and pub/sub connection.
    ClientKill,
    /// `CLIENT PAUSE … WRITE` for up to two seconds.
    ClientPause,
    /// Drop the replication slot under the daemon (as
    /// `max_slot_wal_keep_size` or a DBA would).
    DropSlot,
    /// Redis full: `maxmemory` just above what it uses, `noeviction`, for
    /// up to three seconds (writes that add memory fail with OOM).
    RedisFull,
    /// `kill -9` the primary and promote its synchronous standby (with a
    /// synchronized failover slot); a new standby of the new primary is
    /// then built on the dead primary's port.
    Promote,
    /// The daemon's links to Redis and PostgreSQL slowed (20–300 ms each
    /// way) for up to three seconds.
    SlowLinks,
    /// The daemon's link to Redis, to PostgreSQL, or both, cut for 0.5 to
    /// 15 seconds: nothing arrives, nothing is refused (past
    /// `wal_sender_timeout`, 10 s here, the walsender gives up). What was
    /// sent is delivered when the cut heals, as TCP would.
    CutLinks,
    /// Every connection the daemon has open to Redis, to PostgreSQL, or
    /// to both, stranded: it never carries another byte and is never
    /// closed, as when a NAT or load balancer forgets it; new connections
    /// work. The daemon must notice on its own (a Redis request times out
    /// after 30 s; the server holding the slot stops hearing from the
    /// stream).
    StrandLinks,
    /// Redis Cluster only: a master's replica takes over (`CLUSTER
    /// FAILOVER`, the master agreeing).
    FailoverMaster,
    /// Redis Cluster only: `kill -9` a master. Its replica takes over once
    /// the others have not heard from it for the node timeout (2 s); the
    /// node then starts again, empty (nothing persists), and rejoins as
    /// the new master's replica. Writes the master acknowledged but had not
    /// passed on are lost with it: the daemon's are not, as it waits
    /// (`WAIT`) for each master's replicas before confirming.
    KillMaster,
    /// Redis Cluster only: 100–2,000 hash slots move from one master to
    /// another (`redis-cli --cluster reshard`, keys migrated while the
    /// daemon writes), to completion.
    Reshard,
}

/// The kinds among `kinds` named in `names` (all of them when `names` is
/// empty); an unknown name, or one that does not apply to this run, is an
/// error that says which kinds do.
pub fn only(kinds: &[Fault], names: &[String]) -> Result<Vec<Fault>, String> {
    if names.is_empty() {
        return Ok(kinds.to_vec());
    }
    let applicable = || {
        kinds
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    names
        .iter()
        .map(|name| {
            kinds
                .iter()
                .copied()
                .find(|f| f.name() == name)
                .ok_or_else(|| {
                    format!(
                        "{name:?} does not apply to this run; choose from {}",
                        applicable()
                    )
                })
        })
        .collect()
}

/// Every fault kind.
pub const ALL: [Fault; 15] = [
    Fault::KillDaemon,
    Fault::TerminateWalsender,
    Fault::RestartPostgres,
    Fault::RedisFromSnapshot,
    Fault::ClientKill,
    Fault::ClientPause,
    Fault::DropSlot,
    Fault::RedisFull,
    Fault::Promote,
    Fault::SlowLinks,
    Fault::CutLinks,
    Fault::StrandLinks,
    Fault::FailoverMaster,
    Fault::Reshard,
    Fault::KillMaster,
];

impl Fault {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillDaemon => "kill-daemon",
            Fault::TerminateWalsender => "terminate-walsender",
            Fault::RestartPostgres => "restart-postgres",
            Fault::RedisFromSnapshot => "redis-from-snapshot",
            Fault::ClientKill => "client-kill",
            Fault::ClientPause => "client-pause",
            Fault::DropSlot => "drop-slot",
            Fault::RedisFull => "redis-full",
            Fault::Promote => "promote-standby",
            Fault::SlowLinks => "slow-links",
            Fault::CutLinks => "cut-links",
            Fault::StrandLinks => "strand-links",
            Fault::FailoverMaster => "failover-master",
            Fault::Reshard => "reshard",
            Fault::KillMaster => "kill-master",
        }
    }

    /// The kinds that apply: the slot's only with the replication source
    /// (not `outbox`), a promotion only with a standby; on a Redis Cluster
    /// the cluster's own faults instead of a snapshot restore, a full
    /// Redis and the Redis links (the cluster client finds the nodes
    /// itself, past any forwarder).
    pub fn kinds(outbox: bool, standby: bool, cluster: bool) -> Vec<Fault> {
        ALL.into_iter()
            .filter(|f| !(outbox && matches!(f, Fault::TerminateWalsender | Fault::DropSlot)))
            .filter(|f| standby || *f != Fault::Promote)
            .filter(|f| {
                let cluster_only = matches!(
                    f,
                    Fault::FailoverMaster | Fault::Reshard | Fault::KillMaster
                );
                let server_only = matches!(f, Fault::RedisFromSnapshot | Fault::RedisFull);
                if cluster {
                    !server_only
                } else {
                    !cluster_only
                }
            })
            .collect()
    }

    /// Whether, after this fault, a deleted key may come back or the slot
    /// move past changes the daemon never applied, until the daemon
    /// notices and flushes (Redis back from an older snapshot, a slot
    /// created anew, a promotion): the canaries are not judged until the
    /// next quiescent point.
    pub fn undoes_invalidations(self) -> bool {
        matches!(
            self,
            Fault::RedisFromSnapshot | Fault::DropSlot | Fault::Promote
        )
    }

    /// Draws one or two distinct faults of `kinds`.
    pub fn draw(rng: &mut StdRng, kinds: &[Fault]) -> Vec<Fault> {
        let first = kinds[rng.random_range(0..kinds.len())];
        let mut faults = vec![first];
        if rng.random_bool(0.3) {
            let second = kinds[rng.random_range(0..kinds.len())];
            if second != first {
                faults.push(second);
            }
        }
        faults.sort();
        faults
    }
}

/// The forwarders between the daemon and its servers (the workload and
/// the checker connect directly).
pub struct Links {
    /// To Redis (one server; a cluster client finds the nodes itself).
    pub redis: Option<Proxy>,
    /// To each PostgreSQL host the daemon's URL names.
    pub postgres: Vec<Proxy>,
}

impl Links {
    fn set(&self, redis: Option<Link>, postgres: Option<Link>) {
        if let (Some(link), Some(proxy)) = (redis, &self.redis) {
            proxy.set_link(link);
        }
        for proxy in &self.postgres {
            if let Some(link) = postgres {
                proxy.set_link(link);
            }
        }
    }
}

/// A connection to every Redis node: the one server, or each node of the
/// cluster.
async fn nodes(
    env: &TestEnv,
    cluster: Option<&RedisCluster>,
) -> Vec<redis::aio::MultiplexedConnection> {
    let Some(cluster) = cluster else {
        return vec![env.redis.conn().await];
    };
    let mut conns = Vec::new();
    for url in cluster.urls() {
        let Ok(client) = redis::Client::open(url) else {
            continue;
        };
        if let Ok(Ok(conn)) = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            conns.push(conn);
        }
    }
    conns
}

/// Moves 100–2,000 hash slots from one master to another, keys and all,
/// to completion (at most two minutes).
async fn reshard(cluster: &RedisCluster, rng: &mut StdRng) {
    let masters = cluster.master_ports().await;
    if masters.len() < 2 {
        return;
    }
    let from = rng.random_range(0..masters.len());
    let to = (from + rng.random_range(1..masters.len())) % masters.len();
    let (Some(from_id), Some(to_id)) = (node_id(masters[from]).await, node_id(masters[to]).await)
    else {
        return;
    };
    let slots = rng.random_range(100..2000).to_string();
    let child = tokio::process::Command::new(pgci_test_support::redis_cli_bin())
        .args([
            "--cluster",
            "reshard",
            &format!("127.0.0.1:{}", masters[from]),
        ])
        .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
        .args(["--cluster-slots", &slots, "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(120), child).await {
        Ok(Ok(out)) if out.status.success() => {}
        Ok(Ok(out)) => eprintln!(
            "reshard of {slots} slots failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(Err(error)) => eprintln!("reshard could not run: {error}"),
        Err(_) => eprintln!("reshard of {slots} slots did not finish in 120 s"),
    }
    cluster.wait_healthy().await;
}

/// A cluster node's id (`CLUSTER MYID`).
async fn node_id(port: u16) -> Option<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut conn)
        .await
        .ok()
}

/// The standby the soak promotes, and how to build the next one.
pub struct Standby {
    /// The standby now.
    pub server: Postgres,
    /// The slot it must hold a synchronized copy of before a promotion
    /// (none for the outbox source).
    pub slot: Option<String>,
}

/// Kills the primary, promotes the standby, and builds the next standby
/// (on the dead primary's port, so the URLs stay right) once `pause` has
/// passed; waits until it holds a synchronized copy of the slot again.
async fn promote(env: &mut TestEnv, standby: &mut Standby, pause: Duration) {
    env.pg.kill9();
    standby.server.promote().await;
    std::mem::swap(&mut env.pg, &mut standby.server);
    let port = standby.server.port;
    tokio::time::sleep(pause).await;
    // The dead primary's directory goes; its port is free again.
    standby.server = env
        .pg
        .synchronous_standby_at(port, standby.slot.is_some())
        .await;
    if let Some(slot) = &standby.slot {
        standby.server.wait_synced(slot, &env.pg).await;
    }
}

/// Injects `faults` (in order, a random moment apart) and heals them.
/// Returns whether the daemon was restarted.
pub async fn inject(
    env: &mut TestEnv,
    daemon: &mut Daemon,
    standby: Option<&mut Standby>,
    links: &Links,
    cluster: Option<&mut RedisCluster>,
    faults: &[Fault],
    rng: &mut StdRng,
) -> bool {
    let mut standby = standby;
    let mut cluster = cluster;
    let mut restarted = false;
    for &fault in faults {
        let pause = Duration::from_millis(rng.random_range(100..1500));
        match fault {
            Fault::KillDaemon => {
                daemon.kill9();
                tokio::time::sleep(pause).await;
                *daemon = env.spawn_daemon();
                restarted = true;
            }
            Fault::TerminateWalsender => {
                let pg = env.pg.client().await;
                let _ = pg
                    .execute(
                        "select pg_terminate_backend(active_pid) from pg_replication_slots where active_pid is not null and slot_type = 'logical'",
                        &[],
                    )
                    .await;
            }
            Fault::RestartPostgres => env.pg.restart().await,
            Fault::RedisFromSnapshot => {
                let mut redis = env.redis.conn().await;
                let _: Result<(), _> = redis::cmd("SAVE").query_async(&mut redis).await;
                tokio::time::sleep(pause * 2).await;
                env.redis.restart().await;
            }
            Fault::ClientKill => {
                for mut redis in nodes(env, cluster.as_deref()).await {
                    for kind in ["normal", "pubsub"] {
                        let _: Result<i64, _> = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("TYPE")
                            .arg(kind)
                            .arg("SKIPME")
                            .arg("yes")
                            .query_async(&mut redis)
                            .await;
                    }
                }
            }
            Fault::ClientPause => {
                for mut redis in nodes(env, cluster.as_deref()).await {
                    let _: Result<(), _> = redis::cmd("CLIENT")
                        .arg("PAUSE")
                        .arg(pause.as_millis() as u64 + 500)
                        .arg("WRITE")
                        .query_async(&mut redis)
                        .await;
                }
                tokio::time::sleep(pause + Duration::from_millis(500)).await;
            }
            Fault::FailoverMaster => {
                if let Some(cluster) = cluster.as_deref() {
                    let masters = cluster.master_ports().await;
                    let master = masters[rng.random_range(0..masters.len())];
                    let replica = cluster.replica_of(master).await;
                    cluster.failover(replica).await;
                    cluster.wait_healthy().await;
                }
            }
            Fault::Reshard => {
                if let Some(cluster) = cluster.as_deref() {
                    reshard(cluster, rng).await;
                }
            }
            Fault::KillMaster => {
                if let Some(cluster) = cluster.as_deref_mut() {
                    let masters = cluster.master_ports().await;
                    let master = masters[rng.random_range(0..masters.len())];
                    let replica = cluster.replica_of(master).await;
                    cluster.kill(master);
                    cluster.wait_master(replica).await;
                    tokio::time::sleep(pause).await;
                    cluster.restart(master).await;
                    cluster.wait_healthy().await;
                    // The next failover or kill finds a replica again.
                    cluster.replica_of(replica).await;
                }
            }
            Fault::DropSlot => {
                let pg = env.pg.client().await;
                // The daemon reconnects at once: end its walsender and
                // drop the slot until the drop wins.
                for _ in 0..50 {
                    let dropped = pg
                        .batch_execute(
                            "select pg_terminate_backend(active_pid) from pg_replication_slots where active_pid is not null and slot_type = 'logical'; \
                             select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_type = 'logical'",
                        )
                        .await;
                    if dropped.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Fault::RedisFull => {
                let mut redis = env.redis.conn().await;
                let info: String = redis::cmd("INFO")
                    .arg("memory")
                    .query_async(&mut redis)
                    .await
                    .unwrap_or_default();
                let used: u64 = info
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let config = |name: &str, value: String| {
                    let mut redis = redis.clone();
                    let name = name.to_string();
                    async move {
                        let _: Result<(), _> = redis::cmd("CONFIG")
                            .arg("SET")
                            .arg(name)
                            .arg(value)
                            .query_async(&mut redis)
                            .await;
                    }
                };
                config("maxmemory-policy", "noeviction".into()).await;
                config("maxmemory", (used + 64 * 1024).to_string()).await;
                tokio::time::sleep(pause * 2).await;
                config("maxmemory", "0".into()).await;
            }
            Fault::Promote => {
                if let Some(standby) = standby.as_deref_mut() {
                    promote(env, standby, pause).await;
                }
            }
            Fault::SlowLinks => {
                let slow = |rng: &mut StdRng| {
                    Some(Link::Delayed(Duration::from_millis(
                        rng.random_range(20..300),
                    )))
                };
                let (redis, postgres) = (slow(rng), slow(rng));
                links.set(redis, postgres);
                tokio::time::sleep(pause * 2).await;
                links.set(Some(Link::Up), Some(Link::Up));
            }
            Fault::CutLinks => {
                let (redis, postgres) = match rng.random_range(0..3) {
                    0 => (Some(Link::Cut), None),
                    1 => (None, Some(Link::Cut)),
                    _ => (Some(Link::Cut), Some(Link::Cut)),
                };
                links.set(redis, postgres);
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..15_000))).await;
                links.set(Some(Link::Up), Some(Link::Up));
            }
            Fault::StrandLinks => {
                let (redis, postgres) = match rng.random_range(0..3) {
                    0 => (true, false),
                    1 => (false, true),
                    _ => (true, true),
                };
                if let (true, Some(proxy)) = (redis, &links.redis) {
                    proxy.strand();
                }
                if postgres {
                    for proxy in &links.postgres {
                        proxy.strand();
                    }
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
    restarted
}
