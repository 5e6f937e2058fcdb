//! The second pass of a batch applied before its commits were visible
//! (see [`crate::resolve`]): which of its keys are deleted once more.

use crate::ops::Item;

/// Which keys [`super::RedisSink::delete_again`] deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// Only the keys the batch deleted.
    Deleted,
    /// Every key the batch touched.
    All,
}

/// The keys [`super::RedisSink::delete_again`] deletes, as invalidations in batch
/// order. A key deleted by one operation and written by a later one of
/// the same batch (a refreshed key moved away from and then onto, within
/// one transaction) is left out under [`Again::Deleted`]: deleting it
/// again would undo the later write. (Under [`Again::All`] the written
/// keys are deleted as well, so nothing later survives to be undone.)
pub(super) fn deletions(items: &[Item], scope: Again) -> Vec<Item> {
    let mut written_later: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut again: Vec<Item> = Vec::new();
    for item in items.iter().rev() {
        let touched = item.op.keys();
        let keys: Vec<String> = match scope {
            Again::All => touched.all().cloned().collect(),
            Again::Deleted => {
                // The op's own write follows its deletions.
                written_later.extend(touched.written.iter().map(String::as_str));
                touched
                    .deleted()
                    .filter(|k| !written_later.contains(k.as_str()))
                    .cloned()
                    .collect()
            }
        };
        again.extend(item.invalidating(keys));
    }
    again.reverse();
    again
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::ops::{CacheOp, Op};
    use std::sync::Arc;

    fn refresh(seq: u32, del: &[&str], set: &[&str]) -> Item {
        Item {
            op: CacheOp::Refresh {
                table: Arc::from("public.profiles"),
                op: Op::Update,
                set: set.iter().map(|s| s.to_string()).collect(),
                del: del.iter().map(|s| s.to_string()).collect(),
                value: Some(Arc::from("{}")),
                ttl_secs: 60,
            },
            lsn: Lsn(100),
            commit_time: Arc::from(""),
            commit_micros: 0,
            seq,
            xid: 7,
        }
    }

    fn keys(items: &[Item]) -> Vec<Vec<String>> {
        items
            .iter()
            .map(|i| match &i.op {
                CacheOp::Invalidate { keys, .. } => keys.clone(),
                other => panic!("not an invalidation: {other:?}"),
            })
            .collect()
    }

    /// `b → b-tmp`, then `c → b` in one transaction: the second pass must
    /// not delete `b`, which the later change wrote.
    #[test]
    fn a_key_written_later_in_the_batch_is_not_deleted_again() {
        let items = [
            refresh(1, &["u:b"], &["u:b-tmp"]),
            refresh(2, &["u:c"], &["u:b"]),
        ];
        assert_eq!(
            keys(&deletions(&items, Again::Deleted)),
            vec![vec!["u:c".to_string()]]
        );
        // Every touched key goes under `All`.
        assert_eq!(
            keys(&deletions(&items, Again::All)),
            vec![
                vec!["u:b-tmp".to_string(), "u:b".to_string()],
                vec!["u:b".to_string(), "u:c".to_string()]
            ]
        );
        // A deletion after the write still counts.
        let items = [
            refresh(1, &["u:b"], &["u:x"]),
            refresh(2, &["u:c"], &["u:b"]),
            refresh(3, &["u:b"], &["u:y"]),
        ];
        assert_eq!(
            keys(&deletions(&items, Again::Deleted)),
            vec![vec!["u:c".to_string()], vec!["u:b".to_string()]]
        );
    }
}
