//! The connection the sink writes through: one Redis server (a connection
//! manager that reconnects in the background), or a Redis Cluster (the
//! redis crate's cluster client, which keeps a connection per node,
//! routes each command by its key's hash slot and follows `MOVED`/`ASK`
//! while slots move).
//!
//! What differs in a cluster is what Redis allows: a transaction
//! (`MULTI … EXEC`) and a multi-key command may only touch keys of one hash
//! slot. So the sink sends a batch as one atomic pipeline per slot (see
//! [`super::requests`]), all at once, and counts the batch applied only
//! when every slot's pipeline was acknowledged; a flush SCANs every
//! master.

use std::collections::BTreeSet;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// One server or a cluster.
#[derive(Clone)]
pub enum Conn {
    /// A single server (or a primary behind a proxy), reconnecting.
    Node(ConnectionManager),
    /// A single server, for one command-line verb.
    Direct(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Whether commands must be grouped by hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// The masters serving slots now, as `(host, port)`: a flush SCANs
    /// each one. A single server is its own only master (`None`).
    pub async fn masters(&mut self) -> Result<Vec<Option<(String, u16)>>, RedisError> {
        let Conn::Cluster(cluster) = self else {
            return Ok(vec![None]);
        };
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(cluster)
            .await?;
        Ok(masters_of(&nodes).into_iter().map(Some).collect())
    }

    /// Sends an atomic pipeline (`MULTI … EXEC`) to the master of `route`
    /// (`None` on a single server) and fails if any command in it failed.
    pub async fn transaction(
        &mut self,
        route: Option<Route>,
        pipe: &Pipeline,
    ) -> Result<(), RedisError> {
        match (self, route) {
            (Conn::Cluster(cluster), Some(route)) => {
                match routed_transaction(cluster, route, pipe).await {
                    Err(error) if redirected(&error) => {
                        // The slot is moving (ASK) or has moved (MOVED): a
                        // transaction cannot follow, single commands can —
                        // the cluster client sends ASKING where needed and
                        // refreshes its slot map on MOVED, so the next
                        // batch's transactions go to the new owner. The
                        // slot's commands run in order, each acknowledged.
                        for cmd in pipe.cmd_iter() {
                            cmd.query_async::<Value>(cluster).await?;
                        }
                        Ok(())
                    }
                    other => other,
                }
            }
            (conn, _) => pipe.query_async::<()>(conn).await,
        }
    }

    /// Runs `cmd` on the master at `node` (`None`: wherever it routes).
    pub async fn on_node<T: redis::FromRedisValue>(
        &mut self,
        node: Option<&(String, u16)>,
        cmd: Cmd,
    ) -> Result<T, RedisError> {
        match (self, node) {
            (Conn::Cluster(cluster), Some((host, port))) => {
                let value = cluster
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?;
                redis::from_redis_value(value).map_err(RedisError::from)
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

/// Sends `pipe` as one transaction to the master of `route`; fails if any
/// command in it failed.
async fn routed_transaction(
    cluster: &mut ClusterConnection,
    route: Route,
    pipe: &Pipeline,
) -> Result<(), RedisError> {
    // The replies to MULTI and each queued command, then EXEC's.
    let queued = pipe.cmd_iter().count();
    let replies = cluster
        .route_pipeline(
            pipe.clone(),
            queued + 1,
            1,
            SingleNodeRoutingInfo::SpecificNode(route),
        )
        .await?;
    match replies.into_iter().next() {
        Some(Value::Array(results)) => {
            for result in results {
                if let Value::ServerError(error) = result {
                    return Err(error.into());
                }
            }
            Ok(())
        }
        Some(Value::ServerError(error)) => Err(error.into()),
        other => Err(RedisError::from((
            redis::ErrorKind::Io,
            "the cluster aborted a transaction",
            format!("{other:?}"),
        ))),
    }
}

/// Whether `error` (or a command of an aborted transaction) is a cluster
/// redirection: the slot is moving or has moved.
fn redirected(error: &RedisError) -> bool {
    use redis::ServerErrorKind as K;
    let redirect =
        |kind: Option<K>| matches!(kind, Some(K::Moved | K::Ask | K::TryAgain | K::ClusterDown));
    error.is_cluster_error()
        || error
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| redirect(e.kind())))
}

/// The masters in `CLUSTER NODES` output that serve slots and are not
/// failing.
fn masters_of(nodes: &str) -> Vec<(String, u16)> {
    let mut masters = BTreeSet::new();
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(address), Some(flags)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        let serves_slots = fields.len() > 8;
        if !flags.contains(&"master")
            || flags.iter().any(|f| f.starts_with("fail"))
            || !serves_slots
        {
            continue;
        }
        // host:port@cport[,hostname]
        let host_port = address.split('@').next().unwrap_or_default();
        if let Some((host, port)) = host_port.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                masters.insert((host.to_string(), port));
            }
        }
    }
    masters.into_iter().collect()
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Direct(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::masters_of;

    #[test]
    fn masters_are_read_from_cluster_nodes() {
        let nodes = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003,node-3 master - 0 1426238318243 3 connected 10923-16383
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 1426238315729 5 disconnected 0-5460
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
e7d2 127.0.0.1:30006@40006 master - 0 0 6 connected
";
        assert_eq!(
            masters_of(nodes),
            vec![
                ("127.0.0.1".to_string(), 30001),
                ("127.0.0.1".to_string(), 30002),
                ("127.0.0.1".to_string(), 30003),
            ]
        );
    }
}
