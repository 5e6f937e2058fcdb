//! Flushing by pattern (TRUNCATE, a lost slot): SCAN + UNLINK in bounded
//! steps, so a large keyspace never blocks Redis for long; on a cluster,
//! on every master. Keys are handled
//! as bytes: a key that is not UTF-8 (written by some other client) is
//! flushed like any other.

use redis::RedisError;

use super::cluster::{slot_of, Addr};
use super::conn::Conn;

/// Keys per SCAN step and per UNLINK: large enough to be quick, small
/// enough not to block Redis for long.
const SCAN_COUNT: usize = 1000;

/// Unlinks every key matching any of `patterns`, on every master of a
/// cluster; returns how many went.
pub async fn flush_patterns(conn: &mut Conn, patterns: &[String]) -> Result<u64, RedisError> {
    let masters = conn.masters().await?;
    let mut removed = 0u64;
    for pattern in patterns {
        removed += flush_pattern_everywhere(conn, &masters, pattern, false).await?;
    }
    Ok(removed)
}

/// Unlinks (or with `dry_run` only counts) the keys matching `pattern` on
/// each of `masters` (from [`Conn::masters`], read once per flush);
/// returns how many.
pub async fn flush_pattern_everywhere(
    conn: &mut Conn,
    masters: &[Option<Addr>],
    pattern: &str,
    dry_run: bool,
) -> Result<u64, RedisError> {
    let mut removed = 0u64;
    for master in masters {
        removed += flush_pattern_on(conn, master.as_ref(), pattern, dry_run).await?;
    }
    Ok(removed)
}

/// Unlinks the keys matching `pattern` that `master` holds (`None`: the
/// single server). On a cluster the SCAN runs on that master and one
/// UNLINK per slot follows (a multi-key command may not span slots).
async fn flush_pattern_on(
    conn: &mut Conn,
    master: Option<&Addr>,
    pattern: &str,
    dry_run: bool,
) -> Result<u64, RedisError> {
    let mut removed = 0u64;
    let mut cursor: u64 = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<Vec<u8>>) = conn.on_node(master, scan).await?;
        if dry_run {
            // SCAN may return a key twice while the keyspace rehashes: a
            // dry run's count is an upper bound.
            removed += keys.len() as u64;
        } else if !keys.is_empty() {
            removed += unlink(conn, &keys).await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(removed)
}

/// Unlinks `keys`: one UNLINK on a single server, one per hash slot on a
/// cluster.
async fn unlink(conn: &mut Conn, keys: &[Vec<u8>]) -> Result<u64, RedisError> {
    if !conn.is_cluster() {
        return redis::cmd("UNLINK").arg(keys).query_async(conn).await;
    }
    let mut by_slot: std::collections::BTreeMap<u16, Vec<&Vec<u8>>> = Default::default();
    for key in keys {
        by_slot.entry(slot_of(key)).or_default().push(key);
    }
    let mut removed = 0u64;
    for keys in by_slot.values() {
        let n: u64 = redis::cmd("UNLINK").arg(keys).query_async(conn).await?;
        removed += n;
    }
    Ok(removed)
}
