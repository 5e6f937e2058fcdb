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

use redis::RedisError;

use crate::lsn::Lsn;

/// The key holding `slot`'s applied position.
pub fn key(slot: &str) -> String {
    format!("pgci:position:{slot}")
}

/// The key holding the count of batches applied from the outbox in
/// `schema` (the daemon's outbox source records batches there).
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

/// The recorded position, if any (an unreadable value counts as none).
pub async fn read<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<Option<Lsn>, RedisError> {
    let text: Option<String> = redis::cmd("GET").arg(key).query_async(conn).await?;
    Ok(text.and_then(|t| t.parse().ok()))
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
