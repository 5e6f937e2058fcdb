//! Flushing by pattern (TRUNCATE, a lost slot): SCAN + UNLINK in bounded
//! steps, so a large keyspace never blocks Redis for long. Keys are handled
//! as bytes: a key that is not UTF-8 (written by some other client) is
//! flushed like any other.

use redis::aio::ConnectionLike;
use redis::RedisError;

/// Keys per SCAN step and per UNLINK: large enough to be quick, small
/// enough not to block Redis for long.
const SCAN_COUNT: usize = 1000;

/// Unlinks every key matching any of `patterns`; returns how many went.
pub async fn flush_patterns<C: ConnectionLike>(
    conn: &mut C,
    patterns: &[String],
) -> Result<u64, RedisError> {
    let mut removed = 0u64;
    for pattern in patterns {
        removed += flush_pattern(conn, pattern, false).await?;
    }
    Ok(removed)
}

/// Unlinks (or with `dry_run` only counts) the keys matching `pattern`;
/// returns how many.
pub async fn flush_pattern<C: ConnectionLike>(
    conn: &mut C,
    pattern: &str,
    dry_run: bool,
) -> Result<u64, RedisError> {
    let mut removed = 0u64;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys) = super::inspect::scan_step(conn, cursor, pattern, SCAN_COUNT).await?;
        if dry_run {
            // SCAN may return a key twice while the keyspace rehashes: a
            // dry run's count is an upper bound.
            removed += keys.len() as u64;
        } else if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            removed += n;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    Ok(removed)
}
