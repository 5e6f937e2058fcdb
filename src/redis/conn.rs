//! The connection the sink writes through: one Redis server (a connection
//! manager that reconnects in the background), or a Redis Cluster
//! ([`super::cluster`]: a slot map and a connection per node).
//!
//! What differs in a cluster is what Redis allows: a transaction
//! (`MULTI … EXEC`) and a multi-key command may only touch keys of one hash
//! slot. So the sink sends a batch as one atomic pipeline per slot (see
//! [`super::requests`]), all at once, and counts the batch applied only
//! when every slot's pipeline was acknowledged and replicated; a flush
//! SCANs every master.

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use super::cluster::{Addr, ClusterConn, Node};

/// One server or a cluster.
#[derive(Clone)]
pub enum Conn {
    /// A single server (or a primary behind a proxy), reconnecting.
    Node(ConnectionManager),
    /// A single server, for one command-line verb.
    Direct(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConn),
    /// One node of a Redis Cluster (a master, for what each must hold).
    Member(Node),
}

impl Conn {
    /// Whether commands must be grouped by hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }

    /// The masters serving slots now: a flush SCANs each one. A single
    /// server is its own only master (`None`).
    pub async fn masters(&mut self) -> Result<Vec<Option<Addr>>, RedisError> {
        match self {
            Conn::Cluster(cluster) => Ok(cluster.masters().await?.into_iter().map(Some).collect()),
            _ => Ok(vec![None]),
        }
    }

    /// A connection to each master (the server itself when single), for
    /// what every master must hold (the lease functions).
    pub async fn each_master(&mut self) -> Result<Vec<Conn>, RedisError> {
        let Conn::Cluster(cluster) = self else {
            return Ok(vec![self.clone()]);
        };
        let mut conns = Vec::new();
        for addr in cluster.masters().await? {
            conns.push(Conn::Member(cluster.node(&addr).await?));
        }
        Ok(conns)
    }

    /// Sends atomic pipelines (`MULTI … EXEC`), each one's keys all in its
    /// slot (`None` on a single server), and fails if any command in them
    /// failed. On a cluster it returns once every master written to has
    /// had its writes acknowledged by its replicas
    /// ([`ClusterConn::transactions`]).
    pub async fn transactions(
        &mut self,
        parts: &[(Option<u16>, Pipeline)],
    ) -> Result<(), RedisError> {
        if let Conn::Cluster(cluster) = self {
            if let Some(parts) = parts
                .iter()
                .map(|(slot, pipe)| slot.map(|slot| (slot, pipe)))
                .collect::<Option<Vec<_>>>()
            {
                return cluster.transactions(&parts).await;
            }
        }
        for (_, pipe) in parts {
            pipe.query_async::<()>(self).await?;
        }
        Ok(())
    }

    /// Runs `cmd` on the master at `node` (`None`: wherever it routes).
    pub async fn on_node<T: redis::FromRedisValue>(
        &mut self,
        node: Option<&Addr>,
        cmd: Cmd,
    ) -> Result<T, RedisError> {
        match (self, node) {
            (Conn::Cluster(cluster), Some(addr)) => {
                let mut conn = cluster.node(addr).await?;
                cmd.query_async(&mut conn).await
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Member(c) => c.req_packed_command(cmd),
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
            Conn::Member(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Direct(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Member(c) => c.get_db(),
        }
    }
}
