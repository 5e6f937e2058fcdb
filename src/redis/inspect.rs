//! Reading the cache for `verify`: SCAN steps, values as bytes, and a
//! delete that only removes the value that was found stale (a fill or the
//! daemon may have replaced it since).

use redis::aio::ConnectionLike;
use redis::RedisError;

/// Keys per SCAN step for `verify`: each key found costs a GET and a query,
/// so steps stay small.
pub const SCAN_COUNT: usize = 500;

/// Deletes `KEYS[1]` only while it still holds `ARGV[1]`.
const UNLINK_IF_SAME: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('UNLINK', KEYS[1])
end
return 0
"#;

/// One SCAN step over `pattern` from `cursor` looking at about `count`
/// keys: the next cursor (0 at the end) and the keys found (as bytes).
pub async fn scan_step<C: ConnectionLike>(
    conn: &mut C,
    cursor: u64,
    pattern: &str,
    count: usize,
) -> Result<(u64, Vec<Vec<u8>>), RedisError> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await
}

/// The value of `key`, as bytes.
pub async fn get<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<Option<Vec<u8>>, RedisError> {
    redis::cmd("GET").arg(key).query_async(conn).await
}

/// Deletes `key` if it still holds `value`; whether it did.
pub async fn unlink_if_same<C: ConnectionLike>(
    conn: &mut C,
    key: &str,
    value: &[u8],
) -> Result<bool, RedisError> {
    let n: i64 = redis::Script::new(UNLINK_IF_SAME)
        .key(key)
        .arg(value)
        .invoke_async(conn)
        .await?;
    Ok(n == 1)
}
