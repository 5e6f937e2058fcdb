//! The version-guarded write refreshed keys go through, run by SHA
//! (`EVALSHA` via [`redis::Script`]) rather than sending its text with
//! every key.
//!
//! A version (commit LSN and position in the transaction, fixed-width hex
//! so strings compare like numbers) lives in a companion key that shares
//! the key's hash slot; a replay after a crash therefore never moves a
//! cached value backwards, and a replayed write of a row that was later
//! deleted does not resurrect it.

use pgci_protocol::keys::hash_tag;
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

/// The companion key holding `key`'s version, in `key`'s hash slot: the
/// whole key as its hash tag, or, when the key has a hash tag of its own
/// (`balance:{user-1}`), the key with a suffix, which keeps that tag
/// (wrapping it would make `{balance:{user-1}` the tag: another slot, and
/// a CROSSSLOT error on a cluster).
pub fn version_key(key: &str) -> String {
    if hash_tag(key.as_bytes()).is_some() {
        format!("{key}:pgci-version")
    } else {
        format!("{{{key}}}:pgci-version")
    }
}

/// Whether `key`'s version key is in `key`'s hash slot. Only a key with a
/// `}` and no hash tag has none that is (`a}b`: wrapped, `{a}` becomes the
/// tag); on a cluster such a key is deleted instead of written.
pub fn same_slot(key: &str) -> bool {
    use crate::redis::cluster::slot_of;
    slot_of(key.as_bytes()) == slot_of(version_key(key).as_bytes())
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

#[cfg(test)]
mod tests {
    use super::{same_slot, version_key};
    use crate::redis::cluster::slot_of;

    #[test]
    fn the_version_key_shares_the_key_s_hash_slot() {
        for key in ["profile:user:1", "balance:{user-1}", "x{y", "{t}{u}"] {
            assert_eq!(
                slot_of(key.as_bytes()),
                slot_of(version_key(key).as_bytes()),
                "{key} → {}",
                version_key(key)
            );
        }
        assert_eq!(
            version_key("profile:user:1"),
            "{profile:user:1}:pgci-version"
        );
        // A `}` before any tag: no companion shares the slot (the cluster
        // request deletes such keys instead, see `requests`).
        assert!(!same_slot("a}b"));
        assert!(same_slot("balance:{user-1}"));
    }
}
