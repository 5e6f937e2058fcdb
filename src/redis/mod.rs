//! Redis plumbing shared by the Redis target ([`crate::sink::redis`]), the
//! command-line verbs and the app-side client: connections to one server or
//! a cluster, our cluster client, the lease functions, the applied-position
//! record's key, the server's own report, the daemon's ACL user.
//!
//! (`crate::redis` is this module; a bare `redis::` path elsewhere in the
//! daemon is the redis-rs crate.)
//!
//! - [`acl`]: the least-privilege ACL user of the daemon.
//! - [`conn`]: one server or a cluster, and what differs between them.
//! - [`cluster`]: our Redis Cluster client (slot map, MOVED/ASK, WAIT).
//! - [`flush`]: SCAN + UNLINK by pattern (TRUNCATE, a lost slot, `flush`).
//! - [`inspect`]: the verbs' reads (`verify`).
//! - [`leases`]: loads the lease functions app readers call.
//! - [`position`]: the applied position recorded beside the cache.
//! - [`server`]: what the server says about itself (`INFO` metrics, the
//!   caching plan's checks).

pub mod acl;
pub mod cluster;
pub mod conn;
pub mod flush;
pub mod inspect;
pub mod leases;
pub(crate) mod origin;
pub mod position;
pub mod server;

use std::path::Path;
use std::time::Duration;

use redis::RedisError;

use self::cluster::ClusterConn;
use self::conn::Conn;
use crate::secret::SecretUrl;

/// A Redis URL (or CA certificate) the client cannot use.
#[derive(Debug, thiserror::Error)]
#[error("redis.url {url}: {reason}")]
pub struct BadUrl {
    /// Redacted URL.
    pub url: String,
    /// The client's error, with any form of the password removed.
    pub reason: String,
}

/// A client for `url`, trusting `ca_cert` for `rediss://` when given.
pub fn client(url: &SecretUrl, ca_cert: Option<&std::path::Path>) -> Result<redis::Client, BadUrl> {
    let bad_url = |source: RedisError| BadUrl {
        url: url.redacted(),
        reason: url.scrub(&source.to_string()),
    };
    let client = match ca_cert {
        None => redis::Client::open(url.expose()).map_err(bad_url)?,
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                bad_url(RedisError::from(std::io::Error::new(
                    e.kind(),
                    format!("redis.ca_cert {}: {e}", path.display()),
                )))
            })?;
            redis::Client::build_with_tls(
                url.expose(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(bad_url)?
        }
    };
    Ok(client)
}

/// A connection of its own to the configured Redis (`status`, `setup`,
/// the verbs). A Redis Cluster node is recognised by what it says of
/// itself (`cluster_enabled:1`) and reached as the cluster.
pub(crate) async fn connect_once(url: &SecretUrl, ca_cert: Option<&Path>) -> Result<Conn, String> {
    let mut node = connect_node_once(url, ca_cert).await?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut node)
        .await
        .map_err(|e| url.scrub(&e.to_string()))?;
    if !info.contains("cluster_enabled:1") {
        return Ok(Conn::Direct(node));
    }
    let timeout = Duration::from_secs(10);
    tokio::time::timeout(
        timeout,
        ClusterConn::connect(&[url.expose()], timeout, timeout),
    )
    .await
    .map_err(|_| "no answer within 10s".to_string())?
    .map(Conn::Cluster)
    .map_err(|e| url.scrub(&e.to_string()))
}

/// A connection to the one server `url` names (a cluster node's own
/// `INFO`, for instance).
pub(crate) async fn connect_node_once(
    url: &SecretUrl,
    ca_cert: Option<&Path>,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = client(url, ca_cert).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "no answer within 10s".to_string())?
    .map_err(|e| url.scrub(&e.to_string()))
}
