//! The applied position, kept in Redis beside the cache it describes.
//!
//! With every acknowledged batch the sink records the LSN it applied up to
//! (`pgci:position:<slot>`, written in the same `MULTI` as the batch's last
//! operations). At start the daemon compares it with the slot's confirmed
//! position: a record behind the slot (a slot dropped and created again by
//! `setup`, a Redis restored from an older snapshot or failed over to a
//! replica that missed writes) or no record at all (a Redis emptied) means
//! the daemon cannot show that it applied every change the slot has
//! skipped, so it flushes every rule key before applying anything.
//!
//! While it runs, every record is written with `SET … GET`: the record it
//! replaces must be the one this daemon wrote last. One that is behind or
//! missing means Redis lost writes under the daemon (restarted from an
//! older snapshot, emptied, failed over to a replica that missed them),
//! bringing back values deleted since, so the sink flushes every rule key
//! (see [`lost_writes`]); the idle check reads the record the same way.
//! The outbox source has no stream position: its record counts batches.

use std::path::Path;
use std::time::Duration;

use redis::RedisError;

use super::cluster::ClusterConn;
use super::conn::Conn;
use crate::lsn::Lsn;
use crate::ops::CacheOp;
use crate::secret::SecretUrl;

/// The key holding `slot`'s applied position.
pub fn key(slot: &str) -> String {
    format!("pgci:position:{slot}")
}

/// The key holding the count of batches applied from the outbox in
/// `schema` (see `RedisSink::record_batches_at`).
pub fn outbox_key(schema: &str) -> String {
    key(&format!("outbox:{schema}"))
}

/// `SET key lsn GET` (no expiry: it must outlive any outage). The reply is
/// the record it replaced, which [`lost_writes`] compares with what this
/// daemon wrote last: Redis ≥ 6.2.
pub fn record(key: &str, lsn: Lsn) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key).arg(lsn.to_string()).arg("GET");
    cmd
}

/// Whether Redis lost writes since this daemon last recorded `last`: the
/// record a new one replaced (`replaced`, as `SET … GET` returned it) is
/// missing or behind it. A Redis restarted from an older snapshot, or
/// failed over to a replica that missed writes, brings back the values the
/// lost batches had deleted. (A record ahead of `last` is another
/// instance's: it applied more, which loses nothing.)
pub fn lost_writes(last: Option<Lsn>, replaced: Option<&str>) -> bool {
    let Some(last) = last else {
        return false;
    };
    replaced.and_then(|r| r.parse::<Lsn>().ok()) < Some(last)
}

/// The sink's record of what it applied, and what the record it replaces
/// says about writes Redis lost (see the module doc).
#[derive(Debug)]
pub struct Record {
    /// Where it is kept.
    key: String,
    /// The record this daemon wrote last (or found at start).
    last: Option<Lsn>,
    /// It counts applied batches instead of holding a stream position.
    counting: bool,
    /// The flush of every rule's keys, for when Redis lost writes.
    flush_all: CacheOp,
    /// Redis lost writes and the flush has not completed yet.
    flush_due: bool,
}

impl Record {
    /// The applied position of `slot`.
    pub fn position(slot: &str, flush_all: CacheOp) -> Record {
        Record {
            key: key(slot),
            last: None,
            counting: false,
            flush_all,
            flush_due: false,
        }
    }

    /// A count of applied batches at `key` (a source without a stream
    /// position: the outbox).
    pub fn batches(key: String, flush_all: CacheOp) -> Record {
        Record {
            key,
            last: None,
            counting: true,
            flush_all,
            flush_due: false,
        }
    }

    /// Where it is kept.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The record found in Redis at start.
    pub fn found(&mut self, found: Option<Lsn>) {
        self.last = found;
    }

    /// What a batch records: `applied`, or when counting and the batch
    /// changes keys, the next count.
    pub fn next(&self, applied: Option<Lsn>, changes_keys: bool) -> Option<Lsn> {
        match (self.counting, applied) {
            (true, None) if changes_keys => Some(Lsn(self.last.map_or(1, |l| l.0 + 1))),
            _ => applied,
        }
    }

    /// Takes the record that writing `applied` replaced (or that the idle
    /// check read: `applied` is `None`); `true` the first time it shows that
    /// writes were lost (see [`lost_writes`]): a flush is then due.
    pub fn replaced(&mut self, replaced: Option<&str>, applied: Option<Lsn>) -> bool {
        let lost = lost_writes(self.last, replaced) && !self.flush_due;
        self.flush_due |= lost;
        if applied.is_some() {
            self.last = applied;
        }
        lost
    }

    /// The record this daemon wrote last.
    pub fn last(&self) -> Option<Lsn> {
        self.last
    }

    /// The flush that is due, if writes were lost.
    pub fn due(&self) -> Option<&CacheOp> {
        self.flush_due.then_some(&self.flush_all)
    }

    /// The due flush was applied.
    pub fn flushed(&mut self) {
        self.flush_due = false;
    }
}

/// The recorded position, if any (an unreadable value counts as none).
pub async fn read<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<Option<Lsn>, RedisError> {
    let text: Option<String> = redis::cmd("GET").arg(key).query_async(conn).await?;
    Ok(text.and_then(|t| t.parse().ok()))
}

/// The recorded position of `slot`, read over a connection of its own (for
/// `status`).
pub async fn read_once(
    url: &SecretUrl,
    ca_cert: Option<&Path>,
    slot: &str,
) -> Result<Option<Lsn>, String> {
    let mut conn = connect_once(url, ca_cert).await?;
    let text: Option<String> = redis::cmd("GET")
        .arg(key(slot))
        .query_async(&mut conn)
        .await
        .map_err(|e| url.scrub(&e.to_string()))?;
    Ok(text.and_then(|t| t.parse().ok()))
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
    let client = super::client(url, ca_cert).map_err(|e| e.to_string())?;
    tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "no answer within 10s".to_string())?
    .map_err(|e| url.scrub(&e.to_string()))
}

/// Records `lsn` for `slot` unless a record exists (`SET … NX`): `setup`
/// does this when it creates the slot, so that the first `run` knows the
/// stream starts where the cache does. An existing record is kept: it is
/// older than a slot created now, which tells `run` to flush.
pub async fn record_if_absent(
    url: &SecretUrl,
    ca_cert: Option<&Path>,
    slot: &str,
    lsn: Lsn,
) -> Result<bool, String> {
    let mut conn = connect_once(url, ca_cert).await?;
    let set: Option<String> = redis::cmd("SET")
        .arg(key(slot))
        .arg(lsn.to_string())
        .arg("NX")
        .query_async(&mut conn)
        .await
        .map_err(|e| url.scrub(&e.to_string()))?;
    Ok(set.is_some())
}

/// Whether a record `recorded` proves that nothing before the slot's
/// `confirmed` position was missed.
pub fn covers(recorded: Option<Lsn>, confirmed: Lsn) -> bool {
    recorded.is_some_and(|r| r >= confirmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_record_at_or_past_the_slot_covers_it() {
        assert!(covers(Some(Lsn(10)), Lsn(10)));
        assert!(covers(Some(Lsn(11)), Lsn(10)));
        assert!(!covers(Some(Lsn(9)), Lsn(10)));
        assert!(!covers(None, Lsn(10)));
        assert!(!lost_writes(None, None), "nothing recorded yet");
        assert!(!lost_writes(Some(Lsn(10)), Some("0/A")));
        assert!(!lost_writes(Some(Lsn(10)), Some("0/B")), "another instance");
        assert!(lost_writes(Some(Lsn(10)), Some("0/9")), "an older snapshot");
        assert!(lost_writes(Some(Lsn(10)), None), "an emptied redis");
        assert!(lost_writes(Some(Lsn(10)), Some("garbage")));
        assert_eq!(
            key("pg_cache_invalidator"),
            "pgci:position:pg_cache_invalidator"
        );
    }
}
