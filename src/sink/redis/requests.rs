//! Building the Redis requests for a run of row operations, in commit
//! order: one atomic pipeline (`MULTI … EXEC`) on a single server; on a
//! cluster, where a transaction may only touch one hash slot, one atomic
//! pipeline per slot, and the events in a pipeline of their own, sent once
//! every slot's part was acknowledged.
//!
//! Consecutive deletions (of one slot) share one UNLINK (deletions
//! commute, so one command does for many rows); refreshed keys go through
//! the version-guarded script ([`super::scripts`]); one script call
//! numbering and publishing every operation's event follows
//! ([`super::events`]). A connection lost mid-batch applies each pipeline
//! all or nothing, and the batch is retried whole.

use std::collections::HashMap;

use pgci_protocol::lease::{FENCE, FENCE_MS};
use pgci_protocol::tags::TAG_KEY_PREFIX;

use crate::ops::{CacheOp, Item};
use crate::redis::cluster::slot_of;
use crate::sink::redis::events::Announcer;
use crate::sink::redis::scripts;

/// The requests for one run of row operations.
pub struct RowRequest {
    /// Atomic pipelines: one on a single server, one per hash slot on a
    /// cluster, with the slot (any order between them; commit
    /// order within each).
    pub shards: Vec<(Option<u16>, redis::Pipeline)>,
    /// On a cluster, the events, to send after every shard (to the
    /// channel's slot).
    pub events: Option<redis::Cmd>,
}

/// The requests for `items` (none of them a flush), with the events of
/// `events`' operations (those of `items`, or of a first pass that went
/// unannounced); `by_slot` splits them by hash slot for a cluster;
/// `fence` sets each key an invalidation deletes to the daemon's lease
/// marker instead (see [`super::RedisSink::fencing_until_visible`]).
pub fn row_request(
    items: &[Item],
    events: Option<(&Announcer, &[Item])>,
    by_slot: bool,
    fence: bool,
) -> RowRequest {
    let mut shards = Shards::new(by_slot);
    for item in items {
        match &item.op {
            CacheOp::Invalidate { keys, .. } => {
                for key in keys {
                    let shard = shards.of(key);
                    // A Next.js tag's mark must be missing, not a marker,
                    // for the pages it tags to render again.
                    if fence && !key.starts_with(TAG_KEY_PREFIX) {
                        shard.fence(key);
                    } else {
                        shard.unlink.add(key);
                    }
                }
            }
            CacheOp::Refresh {
                set,
                del,
                value,
                ttl_secs,
                ..
            } => {
                let version = item.version();
                for key in del {
                    shards.of(key).guarded(key, &version, None, *ttl_secs);
                }
                for key in set {
                    shards
                        .of(key)
                        .guarded(key, &version, value.as_deref(), *ttl_secs);
                }
            }
            // Not resolved (see `crate::resolve`): deleting is always safe.
            CacheOp::Query { keys, ttl_secs, .. } => {
                let version = item.version();
                for key in keys {
                    shards.of(key).guarded(key, &version, None, *ttl_secs);
                }
            }
            CacheOp::Flush { .. } => {}
        }
    }
    let mut pipes: Vec<(Option<u16>, redis::Pipeline)> = shards
        .list
        .into_iter()
        .map(|mut shard| {
            shard.unlink.flush_into(&mut shard.pipe);
            (shard.slot, shard.pipe)
        })
        .collect();
    let mut apart = None;
    if let Some((announcer, announced)) = events {
        let announce = announcer.announce_rows(announced);
        if by_slot {
            apart = Some(announce);
        } else {
            pipes[0].1.add_command(announce).ignore();
        }
    }
    RowRequest {
        shards: pipes,
        events: apart,
    }
}

/// The atomic pipeline of one slot (or of the single server).
struct Shard {
    pipe: redis::Pipeline,
    unlink: Unlink,
    /// Part of a cluster request.
    by_slot: bool,
    /// Its hash slot on a cluster.
    slot: Option<u16>,
    /// Whether the guarded write's `SCRIPT LOAD` is in already.
    scripted: bool,
}

impl Shard {
    fn new(slot: Option<u16>) -> Shard {
        let mut pipe = redis::pipe();
        pipe.atomic();
        Shard {
            pipe,
            unlink: Unlink::default(),
            by_slot: slot.is_some(),
            slot,
            scripted: false,
        }
    }

    /// Sets `key` to the daemon's lease marker, after the deletions before
    /// it.
    fn fence(&mut self, key: &str) {
        self.unlink.flush_into(&mut self.pipe);
        self.pipe
            .cmd("SET")
            .arg(key)
            .arg(FENCE)
            .arg("PX")
            .arg(FENCE_MS)
            .ignore();
    }

    /// The guarded write (or delete) of `key`, after the deletions before
    /// it. The pipeline loads the script before its first use: Redis runs
    /// a transaction in order, so the `EVALSHA`s after it find the script
    /// even right after a restart that forgot it.
    fn guarded(&mut self, key: &str, version: &str, value: Option<&str>, ttl_secs: u64) {
        if self.by_slot && !scripts::same_slot(key) {
            // No version key can share this key's slot: delete it (always
            // safe; the next read fills it).
            self.unlink.add(key);
            return;
        }
        self.unlink.flush_into(&mut self.pipe);
        if !self.scripted {
            self.pipe.add_command(scripts::load()).ignore();
            self.scripted = true;
        }
        scripts::guarded(&mut self.pipe, key, version, value, ttl_secs);
    }
}

/// The shards of a request, in the order their first key came.
struct Shards {
    by_slot: bool,
    list: Vec<Shard>,
    index: HashMap<u16, usize>,
}

impl Shards {
    fn new(by_slot: bool) -> Shards {
        Shards {
            by_slot,
            // A single server's one pipeline exists even without keys: the
            // events go in it.
            list: if by_slot {
                Vec::new()
            } else {
                vec![Shard::new(None)]
            },
            index: HashMap::new(),
        }
    }

    /// The shard `key` belongs to.
    fn of(&mut self, key: &str) -> &mut Shard {
        if !self.by_slot {
            return &mut self.list[0];
        }
        let slot = slot_of(key.as_bytes());
        let next = self.list.len();
        let i = *self.index.entry(slot).or_insert(next);
        if i == next {
            self.list.push(Shard::new(Some(slot)));
        }
        &mut self.list[i]
    }
}

/// The UNLINK being gathered from consecutive deletions.
struct Unlink {
    cmd: redis::Cmd,
    any: bool,
}

impl Default for Unlink {
    fn default() -> Self {
        Unlink {
            cmd: redis::cmd("UNLINK"),
            any: false,
        }
    }
}

impl Unlink {
    fn add(&mut self, key: &str) {
        self.cmd.arg(key);
        self.any = true;
    }

    /// Moves the gathered UNLINK (if it has keys) into `pipe`.
    fn flush_into(&mut self, pipe: &mut redis::Pipeline) {
        if self.any {
            pipe.add_command(std::mem::take(self).cmd).ignore();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::ops::Op;
    use std::sync::Arc;

    fn item(op: CacheOp) -> Item {
        Item {
            op,
            lsn: Lsn(1),
            commit_time: Arc::from(""),
            commit_micros: 0,
            seq: 1,
            xid: 0,
        }
    }

    fn events() -> Announcer {
        Announcer::new("ch")
    }

    fn commands(pipe: &redis::Pipeline) -> Vec<String> {
        pipe.cmd_iter()
            .map(|c| {
                c.args_iter()
                    .next()
                    .map(|a| match a {
                        redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                        _ => "cursor".into(),
                    })
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn consecutive_deletions_share_one_unlink_and_refreshes_split_them() {
        let delete = |k: &str| {
            item(CacheOp::Invalidate {
                table: Arc::from("t"),
                op: Op::Update,
                keys: vec![k.to_string()],
            })
        };
        let refresh = item(CacheOp::Refresh {
            table: Arc::from("t"),
            op: Op::Update,
            set: vec!["r".into()],
            del: vec![],
            value: Some(Arc::from("{}")),
            ttl_secs: 60,
        });
        let items = [delete("a"), delete("b"), refresh, delete("c")];
        let announcer = events();
        let request = row_request(&items, Some((&announcer, &items[..])), false, false);
        assert_eq!(request.shards.len(), 1);
        assert!(request.events.is_none());
        assert_eq!(
            commands(&request.shards[0].1),
            ["UNLINK", "SCRIPT", "EVALSHA", "UNLINK", "EVAL"]
        );
        let request = row_request(&[delete("a"), delete("b")], None, false, false);
        assert_eq!(commands(&request.shards[0].1), ["UNLINK"]);
        // Fenced: each deleted key holds the daemon's marker instead; a
        // refreshed value is written as ever.
        let request = row_request(&items, None, false, true);
        assert_eq!(
            commands(&request.shards[0].1),
            ["SET", "SET", "SCRIPT", "EVALSHA", "SET"]
        );
        // …but a Next.js tag's mark is deleted even then.
        let tagged = row_request(&[delete("pgci:tag:profile:1")], None, false, true);
        assert_eq!(commands(&tagged.shards[0].1), ["UNLINK"]);
        let first: Vec<Vec<u8>> = request.shards[0]
            .1
            .cmd_iter()
            .next()
            .expect("a command")
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            first,
            [
                b"SET".to_vec(),
                b"a".to_vec(),
                FENCE.as_bytes().to_vec(),
                b"PX".to_vec(),
                FENCE_MS.to_string().into_bytes()
            ]
        );
    }

    #[test]
    fn on_a_cluster_each_slot_gets_its_own_transaction_and_events_come_after() {
        let delete = |k: &str| {
            item(CacheOp::Invalidate {
                table: Arc::from("t"),
                op: Op::Update,
                keys: vec![k.to_string()],
            })
        };
        // {u1} and {u2} hash to different slots; keys with one tag share one.
        let items = [delete("a:{u1}"), delete("b:{u2}"), delete("c:{u1}")];
        let announcer = events();
        let request = row_request(&items, Some((&announcer, &items[..])), true, false);
        assert_eq!(request.shards.len(), 2);
        for (slot, shard) in &request.shards {
            assert!(slot.is_some());
            assert_eq!(commands(shard), ["UNLINK"]);
        }
        let keys: Vec<usize> = request
            .shards
            .iter()
            .map(|(_, p)| p.cmd_iter().next().map_or(0, |c| c.args_iter().count() - 1))
            .collect();
        assert_eq!(keys, [2, 1], "a:{{u1}} and c:{{u1}} share one UNLINK");
        let events = request.events.expect("events apart");
        let args: Vec<String> = events
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(args[0], "EVAL");
        assert_eq!(args[2], "1", "one key: the sequence record");
        assert_eq!(args[3], "pgci:events:{ch}");
        assert_eq!(args.len(), 9 + 3, "one event per operation");
    }
}
