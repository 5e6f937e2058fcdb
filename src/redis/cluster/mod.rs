//! Our Redis Cluster client: a slot map read from `CLUSTER SLOTS`, one
//! multiplexed connection per node, and each hash slot's transaction sent
//! to that slot's master.
//!
//! Why not the redis crate's cluster client: after a reshard its slot
//! refresh never completed, and every request then waited out its timeout
//! for good (issue #15); and the sink needs two things it does not offer:
//! a transaction routed by slot that follows a redirection as a whole,
//! and `WAIT` on the very connection that wrote.
//!
//! ```text
//!   batch ──▶ one MULTI…EXEC per slot, one request per master (map):
//!             its slots' transactions, then WAIT n (n = its replicas)
//!                 │ MOVED            that slot alone: read the map again,
//!                 │                  send again, WAIT there
//!                 │ ASK / TRYAGAIN   the slot is migrating: its commands
//!                 │                  one by one, in order, each following
//!                 │                  its ASK (ASKING on the target)
//!                 │ lost node,       back to the sink, which retries the
//!                 │ CLUSTERDOWN      batch; the map is read again first
//!                 ▼
//!   applied: every master written has its replicas' acknowledgement
//! ```
//!
//! Durability across a failover: Redis replicates asynchronously, so a
//! master killed right after acknowledging a deletion can leave a replica
//! that never had it, and the replica, promoted, serves the stale value.
//! So a batch counts as applied only once every master it wrote to has
//! had its writes acknowledged by its replicas (`WAIT`); a shortfall fails
//! the attempt, the map is read again (a failed replica leaves it) and the
//! batch is retried. Deletions and version-guarded writes are idempotent,
//! so sending a part twice is harmless.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    Pipeline, RedisError, RedisFuture, RedisResult, Value,
};

use crate::telemetry::metrics as m;

mod redirect;
mod slots;

use redirect::{redirection, too_many_redirects, Redirect};
pub use slots::slot_of;
use slots::{key_of, parse_slots, SlotMap};

/// Redirections one request follows before it gives up (the sink then
/// retries the batch): a slot moves once per reshard step, so a few are
/// plenty.
const MAX_REDIRECTS: usize = 5;

/// How long to wait before sending a command again after `TRYAGAIN` (a
/// two-key command whose keys a migration split between two nodes), and
/// how often: the migration of one slot's keys takes milliseconds.
const TRY_AGAIN_DELAY: Duration = Duration::from_millis(20);
const MAX_TRY_AGAIN: usize = 100;

/// How long a master may take to hear from its replicas (`WAIT`) before
/// the attempt fails and is retried: a healthy replica on a local network
/// acknowledges within milliseconds.
const REPLICA_WAIT: Duration = Duration::from_secs(2);

/// A node's address.
pub type Addr = (String, u16);

/// A Redis Cluster, reached through its nodes. Clones share the map and
/// the connections.
#[derive(Clone)]
pub struct ClusterConn {
    shared: Arc<Shared>,
}

struct Shared {
    /// Where to start when no known node answers; the first one's
    /// credentials serve every node.
    seeds: Vec<ConnectionInfo>,
    /// Timeouts for every node's connection.
    config: AsyncConnectionConfig,
    /// The slot map; replaced whole when read again.
    map: RwLock<Arc<SlotMap>>,
    /// One multiplexed connection per node, opened when first needed and
    /// dropped when it fails.
    nodes: Mutex<HashMap<Addr, MultiplexedConnection>>,
    /// One reading of the map at a time: those who waited find it new.
    refreshing: tokio::sync::Mutex<()>,
    /// A failure suggested the map is out of date: read it before the
    /// next request.
    stale: AtomicBool,
}

impl ClusterConn {
    /// Reads the slot map from the first of `seeds` that answers.
    pub async fn connect(
        seeds: &[&str],
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<ClusterConn> {
        let seeds = seeds
            .iter()
            .map(|url| url.into_connection_info())
            .collect::<RedisResult<Vec<_>>>()?;
        if seeds.is_empty() {
            return Err((
                ErrorKind::InvalidClientConfig,
                "no cluster node to start from",
            )
                .into());
        }
        let cluster = ClusterConn {
            shared: Arc::new(Shared {
                seeds,
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout)),
                map: RwLock::new(Arc::new(SlotMap::default())),
                nodes: Mutex::new(HashMap::new()),
                refreshing: tokio::sync::Mutex::new(()),
                stale: AtomicBool::new(false),
            }),
        };
        cluster.refresh(0).await?;
        Ok(cluster)
    }

    fn map(&self) -> Arc<SlotMap> {
        self.shared
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The masters serving slots, read afresh (a flush SCANs each).
    pub async fn masters(&self) -> RedisResult<Vec<Addr>> {
        self.refresh(self.map().generation).await?;
        Ok(self.map().masters.iter().map(|m| m.addr.clone()).collect())
    }

    /// The master serving `key`'s slot now.
    pub async fn owner_of_key(&self, key: &[u8]) -> RedisResult<Addr> {
        self.owner(slot_of(key)).await.map(|(addr, _)| addr)
    }

    /// A handle on the node at `addr` for requests of one's own (a flush's
    /// SCAN, INFO for the metrics): a request that fails drops the node's
    /// connection, as the cluster's own requests do, so the next one opens
    /// a new connection instead of failing for ever on a dead one.
    pub async fn node(&self, addr: &Addr) -> RedisResult<Node> {
        Ok(Node {
            conn: self.connection(addr).await?,
            addr: addr.clone(),
            cluster: self.clone(),
        })
    }

    /// The connection to `addr`, opened if there is none. Whoever uses it
    /// reports its failures ([`ClusterConn::failed`]).
    async fn connection(&self, addr: &Addr) -> RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.nodes().get(addr) {
            return Ok(conn.clone());
        }
        // No Nagle: a slot's transaction is written while the previous
        // one on this connection is still unacknowledged.
        let tcp = self.shared.seeds[0]
            .tcp_settings()
            .clone()
            .set_nodelay(true);
        let info = self.shared.seeds[0]
            .clone()
            .set_addr(ConnectionAddr::Tcp(addr.0.clone(), addr.1))
            .set_tcp_settings(tcp);
        let conn = redis::Client::open(info)?
            .get_multiplexed_async_connection_with_config(&self.shared.config)
            .await?;
        self.nodes().insert(addr.clone(), conn.clone());
        Ok(conn)
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<Addr, MultiplexedConnection>> {
        self.shared.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the map again unless someone did since `seen` was current.
    async fn refresh(&self, seen: u64) -> RedisResult<()> {
        let _one = self.shared.refreshing.lock().await;
        let current = self.map();
        if current.generation > seen {
            return Ok(());
        }
        self.shared.stale.store(false, Ordering::Relaxed);
        let mut candidates: Vec<Addr> = current.masters.iter().map(|m| m.addr.clone()).collect();
        candidates.extend(current.nodes.iter().cloned());
        candidates.extend(self.shared.seeds.iter().filter_map(|s| match s.addr() {
            ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
            _ => None,
        }));
        let mut seen_addrs = BTreeSet::new();
        candidates.retain(|a| seen_addrs.insert(a.clone()));
        let mut last_error = None;
        for addr in candidates {
            match self.read_map(&addr).await {
                Ok(mut map) => {
                    self.count_replicas(&mut map).await;
                    map.generation = current.generation + 1;
                    metrics::counter!(m::CLUSTER_MAP_READS_TOTAL).increment(1);
                    if map.masters != current.masters || map.owner != current.owner {
                        tracing::info!(masters = map.masters.len(), from = %format!("{}:{}", addr.0, addr.1),
                            "read the cluster's slot map");
                    }
                    *self.shared.map.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
                    return Ok(());
                }
                Err(error) => {
                    self.nodes().remove(&addr);
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            (
                ErrorKind::ClusterConnectionNotFound,
                "no cluster node answered",
            )
                .into()
        }))
    }

    /// Sets each master's replica count to what the master itself says
    /// (`ROLE`): another node's `CLUSTER SLOTS` can lag behind by a gossip
    /// round and list none, which would skip the `WAIT`. A master that
    /// does not answer keeps the map's count.
    async fn count_replicas(&self, map: &mut SlotMap) {
        for master in &mut map.masters {
            let Ok(mut conn) = self.connection(&master.addr).await else {
                continue;
            };
            match redis::cmd("ROLE").query_async(&mut conn).await {
                Ok(Value::Array(role)) => {
                    // ["master", offset, [[host, port, offset], …]]
                    if let Some(Value::Array(replicas)) = role.get(2) {
                        master.replicas = replicas.len();
                    }
                }
                Ok(_) => {}
                Err(error) => self.drop_if_lost(&master.addr, &error),
            }
        }
    }

    async fn read_map(&self, addr: &Addr) -> RedisResult<SlotMap> {
        let mut conn = self.connection(addr).await?;
        let reply = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Value>(&mut conn)
            .await?;
        parse_slots(&reply, &addr.0).map_err(|reason| {
            RedisError::from((ErrorKind::Parse, "unexpected CLUSTER SLOTS reply", reason))
        })
    }

    /// The master of `slot` and the map's generation, reading the map
    /// first when it is known to be out of date.
    async fn owner(&self, slot: u16) -> RedisResult<(Addr, u64)> {
        let mut map = self.map();
        if self.shared.stale.load(Ordering::Relaxed) || map.owner_of(slot).is_none() {
            self.refresh(map.generation).await?;
            map = self.map();
        }
        match map.owner_of(slot) {
            Some(master) => Ok((master.addr.clone(), map.generation)),
            None => Err(RedisError::from((
                ErrorKind::ClusterConnectionNotFound,
                "no master serves the slot",
                format!("slot {slot}: the cluster is down or the slot is unassigned"),
            ))),
        }
    }

    /// After `error` from `addr`: a lost connection is dropped (the next
    /// request opens a new one) and the map is read before the next
    /// request (the node may have failed over).
    fn failed(&self, addr: &Addr, error: &RedisError) {
        self.drop_if_lost(addr, error);
        self.shared.stale.store(true, Ordering::Relaxed);
    }

    /// Drops the connection to `addr` if `error` says it is lost (closed,
    /// killed with `CLIENT KILL`, or silent): a multiplexed connection
    /// never reconnects, so a dead one kept would fail every request.
    fn drop_if_lost(&self, addr: &Addr, error: &RedisError) {
        if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
            self.nodes().remove(addr);
        }
    }

    /// Sends the atomic pipeline `pipe`, whose keys are all in `slot`, to
    /// the slot's master; fails if any command in it failed. Returns the
    /// nodes written to (more than one only while the slot migrates).
    pub async fn transaction(&self, slot: u16, pipe: &Pipeline) -> RedisResult<BTreeSet<Addr>> {
        for _ in 0..MAX_REDIRECTS {
            let (addr, generation) = self.owner(slot).await?;
            let result = match self.connection(&addr).await {
                Ok(mut conn) => exec(&mut conn, pipe).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => return Ok(BTreeSet::from([addr])),
                Err(error) => match redirection(&error) {
                    Some(Redirect::Moved) => self.refresh(generation).await?,
                    Some(Redirect::Ask(_) | Redirect::TryAgain) => {
                        // The slot is migrating: a transaction cannot span
                        // its two nodes; single commands can.
                        let mut written = BTreeSet::new();
                        for cmd in pipe.cmd_iter() {
                            let (_, at) = self.command_at(Some(slot), cmd).await?;
                            written.insert(at);
                        }
                        return Ok(written);
                    }
                    None => {
                        self.failed(&addr, &error);
                        return Err(error);
                    }
                },
            }
        }
        Err(too_many_redirects(slot))
    }

    /// Sends each of `parts` (an atomic pipeline whose keys are all in its
    /// slot) to its slot's master and returns once every master written
    /// to has had its writes acknowledged by its replicas. One request per
    /// master carries all of that master's transactions and ends with the
    /// `WAIT`: one round trip where sending, then waiting, took two. A
    /// part a redirection turned away (the slot moved or is migrating) is
    /// sent again alone, as [`ClusterConn::transaction`] sends it, and
    /// waited for the same way.
    pub async fn transactions(&self, parts: &[(u16, &Pipeline)]) -> RedisResult<()> {
        let mut by_master: BTreeMap<Addr, Vec<(u16, &Pipeline)>> = BTreeMap::new();
        for (slot, pipe) in parts {
            let (addr, _) = self.owner(*slot).await?;
            by_master.entry(addr).or_default().push((*slot, pipe));
        }
        let map = self.map();
        let sends = by_master.into_iter().map(|(addr, parts)| {
            let replicas = map
                .masters
                .iter()
                .find(|m| m.addr == addr)
                .map_or(0, |m| m.replicas);
            async move {
                let turned_away = self.on_master(&addr, &parts, replicas).await?;
                for (slot, pipe) in turned_away {
                    let written = self.transaction(slot, pipe).await?;
                    self.replicated(&written).await?;
                }
                Ok::<(), RedisError>(())
            }
        });
        futures_util::future::try_join_all(sends).await.map(|_| ())
    }

    /// One request to `addr`: each part's `MULTI … EXEC`, then `WAIT` for
    /// `replicas` (none when it has none). Returns the parts a redirection
    /// turned away, which were not applied there.
    async fn on_master<'p>(
        &self,
        addr: &Addr,
        parts: &[(u16, &'p Pipeline)],
        replicas: usize,
    ) -> RedisResult<Vec<(u16, &'p Pipeline)>> {
        let mut request = redis::pipe();
        for (_, pipe) in parts {
            request.cmd("MULTI");
            for cmd in pipe.cmd_iter() {
                request.add_command(cmd.clone());
            }
            request.cmd("EXEC");
        }
        if replicas > 0 {
            request
                .cmd("WAIT")
                .arg(replicas)
                .arg(REPLICA_WAIT.as_millis() as u64);
        }
        let count = request.cmd_iter().count();
        let replies = match self.connection(addr).await {
            Ok(mut conn) => conn.req_packed_commands(&request, 0, count).await,
            Err(error) => Err(error),
        }
        .inspect_err(|e| self.failed(addr, e))?;
        if replies.len() != count {
            let error = RedisError::from((
                ErrorKind::Io,
                "a cluster node answered a request short",
                format!("{} replies to {count} commands", replies.len()),
            ));
            self.failed(addr, &error);
            return Err(error);
        }
        let mut turned_away = Vec::new();
        let mut rest = &replies[..];
        for (slot, pipe) in parts {
            let (this, tail) = rest.split_at(pipe.cmd_iter().count() + 2);
            rest = tail;
            match part_outcome(this) {
                Ok(()) => {}
                Err(error) if redirection(&error).is_some() => turned_away.push((*slot, *pipe)),
                Err(error) => {
                    self.failed(addr, &error);
                    return Err(error);
                }
            }
        }
        if let Some(reply) = rest.first() {
            let acknowledged: usize = redis::from_redis_value(reply.clone().extract_error()?)?;
            if acknowledged < replicas {
                self.shared.stale.store(true, Ordering::Relaxed);
                return Err(replicas_short(addr, acknowledged, replicas));
            }
        }
        if !turned_away.is_empty() {
            // The map is out of date: read it before the parts go again.
            self.shared.stale.store(true, Ordering::Relaxed);
        }
        Ok(turned_away)
    }

    /// Runs `cmd` on the master of `slot` (`None`: any master), following
    /// redirections; returns its reply and the node that ran it.
    async fn command_at(&self, slot: Option<u16>, cmd: &Cmd) -> RedisResult<(Value, Addr)> {
        let mut asking: Option<Addr> = None;
        let mut redirects = 0;
        let mut try_again = 0;
        loop {
            let (addr, generation) = match (&asking, slot) {
                (Some(target), _) => (target.clone(), self.map().generation),
                (None, Some(slot)) => self.owner(slot).await?,
                (None, None) => self.any_master().await?,
            };
            let result = match self.connection(&addr).await {
                Ok(mut conn) if asking.is_some() => {
                    let mut pipe = redis::pipe();
                    pipe.cmd("ASKING").ignore().add_command(cmd.clone());
                    conn.req_packed_commands(&pipe, 1, 1)
                        .await
                        .and_then(|mut v| v.pop().unwrap_or(Value::Nil).extract_error())
                }
                Ok(mut conn) => conn
                    .req_packed_command(cmd)
                    .await
                    .and_then(Value::extract_error),
                Err(error) => Err(error),
            };
            let error = match result {
                Ok(value) => return Ok((value, addr)),
                Err(error) => error,
            };
            asking = None;
            match redirection(&error) {
                Some(Redirect::Moved) => {
                    redirects += 1;
                    self.refresh(generation).await?;
                }
                Some(Redirect::Ask(target)) => {
                    redirects += 1;
                    asking = Some(target);
                }
                Some(Redirect::TryAgain) => {
                    try_again += 1;
                    if try_again > MAX_TRY_AGAIN {
                        return Err(error);
                    }
                    tokio::time::sleep(TRY_AGAIN_DELAY).await;
                }
                None => {
                    self.failed(&addr, &error);
                    return Err(error);
                }
            }
            if redirects > MAX_REDIRECTS {
                return Err(too_many_redirects(slot.unwrap_or_default()));
            }
        }
    }

    async fn any_master(&self) -> RedisResult<(Addr, u64)> {
        let mut map = self.map();
        if map.masters.is_empty() || self.shared.stale.load(Ordering::Relaxed) {
            self.refresh(map.generation).await?;
            map = self.map();
        }
        map.masters
            .first()
            .map(|m| (m.addr.clone(), map.generation))
            .ok_or_else(|| {
                (
                    ErrorKind::ClusterConnectionNotFound,
                    "no master serves slots",
                )
                    .into()
            })
    }

    /// Runs `cmd` where its key's slot is served (any master for a
    /// command without a key).
    pub async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let slot = key_of(cmd).map(slot_of);
        self.command_at(slot, cmd).await.map(|(value, _)| value)
    }

    /// Waits until the replicas of each master in `written` acknowledged
    /// every write this client made there (`WAIT` on the connection that
    /// wrote). A master without replicas has nothing to wait for.
    pub async fn replicated(&self, written: &BTreeSet<Addr>) -> RedisResult<()> {
        let map = self.map();
        let waits = written.iter().filter_map(|addr| {
            let replicas = map
                .masters
                .iter()
                .find(|m| &m.addr == addr)
                .map_or(0, |m| m.replicas);
            (replicas > 0).then_some(async move {
                let mut conn = self.connection(addr).await?;
                let acknowledged: usize = redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(REPLICA_WAIT.as_millis() as u64)
                    .query_async(&mut conn)
                    .await
                    .inspect_err(|e| self.failed(addr, e))?;
                if acknowledged < replicas {
                    self.shared.stale.store(true, Ordering::Relaxed);
                    return Err(replicas_short(addr, acknowledged, replicas));
                }
                Ok(())
            })
        });
        futures_util::future::try_join_all(waits).await.map(|_| ())
    }
}

/// One node of a cluster, for requests of one's own ([`ClusterConn::node`]).
#[derive(Clone)]
pub struct Node {
    conn: MultiplexedConnection,
    addr: Addr,
    cluster: ClusterConn,
}

impl Node {
    fn report<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(error) = &result {
            if redirection(error).is_none() {
                self.cluster.failed(&self.addr, error);
            }
        }
        result
    }
}

impl ConnectionLike for Node {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = self.conn.req_packed_command(cmd).await;
            self.report(result)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = self.conn.req_packed_commands(pipeline, offset, count).await;
            self.report(result)
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Sends `pipe` (atomic) on `conn`; fails if any command in it failed.
/// What one part of a master's request ([`ClusterConn::on_master`])
/// came to, from its replies: `MULTI`'s, each queued command's, `EXEC`'s.
/// A command refused while queueing (`MOVED`, `ASK`) aborts the
/// transaction; its error is the one returned.
fn part_outcome(replies: &[Value]) -> RedisResult<()> {
    let Some((exec, queued)) = replies.split_last() else {
        return Err((ErrorKind::Io, "no reply to a transaction").into());
    };
    for reply in queued {
        reply.clone().extract_error()?;
    }
    match exec {
        Value::Array(results) => {
            for result in results {
                result.clone().extract_error()?;
            }
            Ok(())
        }
        other => other.clone().extract_error().and_then(|other| {
            Err(RedisError::from((
                ErrorKind::Io,
                "the cluster aborted a transaction",
                format!("{other:?}"),
            )))
        }),
    }
}

/// A master's replicas did not all acknowledge its writes in time.
fn replicas_short(addr: &Addr, acknowledged: usize, replicas: usize) -> RedisError {
    RedisError::from((
        ErrorKind::ClusterConnectionNotFound,
        "a replica did not acknowledge the batch",
        format!(
            "{}:{}: {acknowledged} of {replicas} replicas within {REPLICA_WAIT:?}",
            addr.0, addr.1
        ),
    ))
}

async fn exec(conn: &mut MultiplexedConnection, pipe: &Pipeline) -> RedisResult<()> {
    // Skip the replies to MULTI and each queued command; keep EXEC's.
    let queued = pipe.cmd_iter().count();
    let replies = conn.req_packed_commands(pipe, queued + 1, 1).await?;
    match replies.into_iter().next() {
        Some(Value::Array(results)) => {
            for result in results {
                result.extract_error()?;
            }
            Ok(())
        }
        Some(other) => other.extract_error().and_then(|other| {
            Err(RedisError::from((
                ErrorKind::Io,
                "the cluster aborted a transaction",
                format!("{other:?}"),
            )))
        }),
        None => Err((ErrorKind::Io, "no reply to a transaction").into()),
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.command(cmd).await })
    }

    /// A pipeline through this generic path goes to one node: the one
    /// serving its first key's slot (any master when it has no key), so
    /// its keys must share a slot. The sink's batches use
    /// [`ClusterConn::transaction`] instead.
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let slot = pipeline.cmd_iter().find_map(key_of).map(slot_of);
            for _ in 0..MAX_REDIRECTS {
                let (addr, generation) = match slot {
                    Some(slot) => self.owner(slot).await?,
                    None => self.any_master().await?,
                };
                let result = match self.connection(&addr).await {
                    Ok(mut conn) => conn.req_packed_commands(pipeline, offset, count).await,
                    Err(error) => Err(error),
                };
                match result {
                    Ok(values) => return Ok(values),
                    Err(error) if redirection(&error).is_some() => self.refresh(generation).await?,
                    Err(error) => {
                        self.failed(&addr, &error);
                        return Err(error);
                    }
                }
            }
            Err(too_many_redirects(slot.unwrap_or_default()))
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::redirect::ask_target;
    use super::slots::Master;
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn the_slot_map_is_read_from_cluster_slots() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("127.0.0.1", 30002),
                node("127.0.0.1", 30005),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("", 30001),
                node("127.0.0.1", 30004),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                node("127.0.0.1", 30003),
            ]),
        ]);
        let map = parse_slots(&reply, "10.0.0.9").expect("parsed");
        let addr = |host: &str, port: u16| (host.to_string(), port);
        assert_eq!(
            map.masters,
            vec![
                Master {
                    addr: addr("10.0.0.9", 30001),
                    replicas: 1
                },
                Master {
                    addr: addr("127.0.0.1", 30002),
                    replicas: 1
                },
                Master {
                    addr: addr("127.0.0.1", 30003),
                    replicas: 0
                },
            ]
        );
        assert_eq!(map.owner_of(0).map(|m| m.addr.1), Some(30001));
        assert_eq!(map.owner_of(5461).map(|m| m.addr.1), Some(30002));
        assert_eq!(map.owner_of(16383).map(|m| m.addr.1), Some(30003));
        assert_eq!(map.nodes.len(), 5);
        assert!(parse_slots(&Value::Int(1), "h").is_err());
        let bad = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(20000),
            node("h", 1),
        ])]);
        assert!(parse_slots(&bad, "h").is_err());
    }

    #[test]
    fn slots_follow_hash_tags() {
        // Known values (redis-cli CLUSTER KEYSLOT).
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn commands_route_by_their_key() {
        let mut get = redis::cmd("GET");
        get.arg("k");
        assert_eq!(key_of(&get), Some(&b"k"[..]));
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg("sha").arg(2).arg("a").arg("b");
        assert_eq!(key_of(&evalsha), Some(&b"a"[..]));
        let mut keyless = redis::cmd("FCALL");
        keyless.arg("f").arg(0);
        assert_eq!(key_of(&keyless), None);
        let mut publish = redis::cmd("publish");
        publish.arg("channel").arg("m");
        assert_eq!(key_of(&publish), None);
    }

    #[test]
    fn each_part_of_a_master_s_request_is_read_from_its_replies() {
        let ok = || Value::Okay;
        let queued = || Value::SimpleString("QUEUED".into());
        let server_error =
            |line: &str| match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
                Ok(value) => value,
                Err(error) => panic!("{error}"),
            };
        // Applied: MULTI, two queued, EXEC with both results.
        assert!(part_outcome(&[
            ok(),
            queued(),
            queued(),
            Value::Array(vec![Value::Int(1), Value::Int(0)])
        ])
        .is_ok());
        // Moved while queueing: not applied, sent again alone.
        let moved = part_outcome(&[
            ok(),
            server_error("MOVED 3999 127.0.0.1:6381"),
            server_error("EXECABORT Transaction discarded because of previous errors."),
        ])
        .expect_err("moved");
        assert_eq!(redirection(&moved), Some(Redirect::Moved));
        let ask = part_outcome(&[
            ok(),
            queued(),
            server_error("ASK 3999 127.0.0.1:6381"),
            server_error("EXECABORT Transaction discarded because of previous errors."),
        ])
        .expect_err("ask");
        assert_eq!(
            redirection(&ask),
            Some(Redirect::Ask(("127.0.0.1".to_string(), 6381)))
        );
        // A command failing inside EXEC fails the batch, no redirection.
        let failed = part_outcome(&[
            ok(),
            queued(),
            Value::Array(vec![server_error(
                "WRONGTYPE Operation against a key holding the wrong kind of value",
            )]),
        ])
        .expect_err("wrongtype");
        assert_eq!(redirection(&failed), None);
        assert!(part_outcome(&[]).is_err());
    }

    #[test]
    fn redirections_are_read_from_errors() {
        assert_eq!(
            ask_target("3999 127.0.0.1:6381"),
            Some(("127.0.0.1".to_string(), 6381))
        );
        assert_eq!(ask_target("3999"), None);
    }
}
