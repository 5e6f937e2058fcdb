//! Building the Redis request for a run of row operations: one atomic
//! pipeline (`MULTI … EXEC`) in commit order.
//!
//! Consecutive deletions share one UNLINK (deletions commute, so one
//! command does for many rows); refreshed keys go through the
//! version-guarded script ([`super::scripts`]); one PUBLISH per operation
//! follows. A connection lost mid-batch applies all of it or none.

use crate::ops::{CacheOp, Item};
use crate::sink::events::event_json;
use crate::sink::scripts;

/// The pipeline for `items` (none of them a flush).
pub fn row_pipeline(items: &[Item], channel: Option<&str>) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    if items
        .iter()
        .any(|i| matches!(i.op, CacheOp::Refresh { .. } | CacheOp::Query { .. }))
    {
        pipe.add_command(scripts::load()).ignore();
    }
    let mut unlink = Unlink::default();
    for item in items {
        match &item.op {
            CacheOp::Invalidate { keys: k, .. } => {
                unlink.add(k);
            }
            CacheOp::Refresh {
                set,
                del,
                value,
                ttl_secs,
                ..
            } => {
                unlink.flush_into(&mut pipe);
                let version = item.version();
                for key in del {
                    scripts::guarded(&mut pipe, key, &version, None, *ttl_secs);
                }
                for key in set {
                    scripts::guarded(&mut pipe, key, &version, value.as_deref(), *ttl_secs);
                }
            }
            // Not resolved (see `crate::resolve`): deleting is always safe.
            CacheOp::Query {
                keys: k, ttl_secs, ..
            } => {
                unlink.flush_into(&mut pipe);
                let version = item.version();
                for key in k {
                    scripts::guarded(&mut pipe, key, &version, None, *ttl_secs);
                }
            }
            CacheOp::Flush { .. } => {}
        }
    }
    unlink.flush_into(&mut pipe);
    if let Some(channel) = channel {
        for item in items {
            pipe.publish(channel, event_json(item)).ignore();
        }
    }
    pipe
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
    fn add(&mut self, keys: &[String]) {
        self.cmd.arg(keys);
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
        let pipe = row_pipeline(
            &[delete("a"), delete("b"), refresh, delete("c")],
            Some("ch"),
        );
        assert_eq!(
            commands(&pipe),
            ["SCRIPT", "UNLINK", "EVALSHA", "UNLINK", "PUBLISH", "PUBLISH", "PUBLISH", "PUBLISH"]
        );
        let pipe = row_pipeline(&[delete("a"), delete("b")], None);
        assert_eq!(commands(&pipe), ["UNLINK"]);
    }
}
