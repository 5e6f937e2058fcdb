//! The version-guarded write refreshed keys go through, run by SHA
//! (`EVALSHA` via [`redis::Script`]) rather than sending its text with
//! every key.
//!
//! A version (commit LSN and position in the transaction, fixed-width hex
//! so strings compare like numbers) lives in a companion key that shares
//! the key's hash slot; a replay after a crash therefore never moves a
//! cached value backwards, and a replayed write of a row that was later
//! deleted does not resurrect it.

use std::sync::LazyLock;

/// The guarded write: `KEYS[1]` the key, `KEYS[2]` its version key;
/// `ARGV` version, `1` to write or `0` to delete, value, TTL, version TTL.
const GUARDED_WRITE: &str = r#"
local current = redis.call('GET', KEYS[2])
if current and current >= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
else
  redis.call('UNLINK', KEYS[1])
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[5])
return 1
"#;

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GUARDED_WRITE));

/// How long a version outlives its value at least: longer than any replay
/// window (a restart replays from the last confirmation, seconds back).
const VERSION_TTL_MIN_SECS: u64 = 3600;

/// The companion key holding `key`'s version.
pub fn version_key(key: &str) -> String {
    format!("{{{key}}}:pgci-version")
}

/// `SCRIPT LOAD` of the guarded write. A pipeline that uses it starts with
/// this command: Redis runs a transaction's commands in order, so the
/// `EVALSHA`s after it always find the script, even right after Redis
/// restarted and forgot it.
pub fn load() -> redis::Cmd {
    let mut cmd = redis::cmd("SCRIPT");
    cmd.arg("LOAD").arg(GUARDED_WRITE);
    cmd
}

/// Adds the guarded write (or, with `value` `None`, delete) of `key` to
/// `pipe`.
pub fn guarded(
    pipe: &mut redis::Pipeline,
    key: &str,
    version: &str,
    value: Option<&str>,
    ttl_secs: u64,
) {
    let mut invocation = SCRIPT.prepare_invoke();
    invocation
        .key(key)
        .key(version_key(key))
        .arg(version)
        .arg(if value.is_some() { "1" } else { "0" })
        .arg(value.unwrap_or(""))
        .arg(ttl_secs)
        .arg(ttl_secs.max(VERSION_TTL_MIN_SECS));
    pipe.invoke_script(&invocation).ignore();
}
