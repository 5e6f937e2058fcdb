//! The Redis the soak caches in: one server, or a Redis Cluster
//! (`--redis cluster`). Every task of the soak (readers, writer, checker,
//! canaries, the events listener and its fillers) connects through
//! [`RedisTarget`], so each runs unchanged against either.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Where the cache is.
#[derive(Clone, Debug)]
pub enum RedisTarget {
    /// One server (`redis://…`).
    Server(String),
    /// The nodes of a cluster (any of them leads to all).
    Cluster(Vec<String>),
}

/// A connection to a [`RedisTarget`] that reconnects by itself.
#[derive(Clone)]
pub enum RedisConn {
    /// To one server.
    Server(ConnectionManager),
    /// To a cluster: each key's command goes to the master serving it.
    Cluster(ClusterConnection),
}

impl RedisTarget {
    /// A connection, retried until one opens.
    pub async fn connect(&self) -> RedisConn {
        loop {
            if let Some(conn) = self.try_connect(Duration::from_secs(5)).await {
                return conn;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A connection, or `None` if none opened within `limit`.
    pub async fn try_connect(&self, limit: Duration) -> Option<RedisConn> {
        let opened = match self {
            RedisTarget::Server(url) => {
                let client = redis::Client::open(url.as_str()).ok()?;
                tokio::time::timeout(limit, ConnectionManager::new(client))
                    .await
                    .ok()?
                    .ok()
                    .map(RedisConn::Server)
            }
            RedisTarget::Cluster(urls) => {
                let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(limit)
                    .response_timeout(limit)
                    .build()
                    .ok()?;
                tokio::time::timeout(limit, client.get_async_connection())
                    .await
                    .ok()?
                    .ok()
                    .map(RedisConn::Cluster)
            }
        };
        opened
    }

    /// Where to subscribe to the events: the server, or the cluster's
    /// first node (`PUBLISH` reaches every node of a cluster).
    pub fn subscribe_url(&self) -> &str {
        match self {
            RedisTarget::Server(url) => url,
            RedisTarget::Cluster(urls) => &urls[0],
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Server(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Server(conn) => conn.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Server(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}
