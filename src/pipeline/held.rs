//! Invalidations applied while their commits were held invisible by a
//! synchronous standby wait, kept until the commits show so their keys can
//! be deleted a second time (see [`crate::resolve`]).
//!
//! A commit waiting for this daemon (it may be the synchronous standby)
//! cannot show before the daemon confirms it, and a large transaction's
//! batches are applied long before its commit is confirmed: every one of
//! them is held. So that a million-row synchronous transaction does not
//! hold a million keys in memory, past [`MAX_HELD_BYTES`] the keys are
//! given up and only their tables remembered; once the commits show,
//! those tables' rules are flushed by pattern instead (more than needed,
//! never less).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::lsn::Lsn;
use crate::ops::{CacheOp, Item};

/// Most bytes of held keys before they are replaced by their tables.
pub const MAX_HELD_BYTES: usize = 32 << 20;

/// The held invalidations.
pub struct Held {
    /// Each with every key it touched, as [`CacheOp::Invalidate`].
    items: Vec<Item>,
    /// Their [`Item::weight`].
    bytes: usize,
    /// What was given up for memory, if anything.
    overflow: Option<Overflow>,
    /// The flush of each watched table's rules, by the table's name as
    /// operations carry it.
    flushes: HashMap<Arc<str>, CacheOp>,
    /// The position (see [`super::Batch::generation`]) the held
    /// transactions were read from.
    generation: u64,
    /// Commits found waiting for another synchronous standby at start,
    /// and the flush of every rule's keys due once they show (see
    /// [`Held::across_restart`]).
    across_restart: Option<(Vec<u32>, CacheOp)>,
}

/// Held invalidations reduced to their tables.
struct Overflow {
    tables: BTreeSet<Arc<str>>,
    xids: BTreeSet<u32>,
    /// The newest commit among them: they are due once it is confirmed.
    last: Lsn,
}

/// What may be deleted again once the commits `xids` show.
#[derive(Debug, Default)]
pub struct Due {
    /// Transactions whose commits must be visible first.
    pub xids: Vec<u32>,
    /// Keys to delete again.
    pub again: Vec<Item>,
    /// Flushes of the tables whose keys were given up.
    pub flushes: Vec<Item>,
}

impl Due {
    /// Nothing is due.
    pub fn is_empty(&self) -> bool {
        self.again.is_empty() && self.flushes.is_empty()
    }
}

impl Held {
    /// Nothing held; `flushes` (one [`CacheOp::Flush`] per watched table)
    /// stand in for keys given up.
    pub fn new(flushes: Vec<CacheOp>) -> Self {
        let flushes = flushes
            .into_iter()
            .filter_map(|op| match &op {
                CacheOp::Flush { table, .. } => Some((Arc::clone(table), op)),
                _ => None,
            })
            .collect();
        Held {
            items: Vec::new(),
            bytes: 0,
            overflow: None,
            flushes,
            generation: 0,
            across_restart: None,
        }
    }

    /// Adds the commits `xids` that waited for a synchronous standby other
    /// than this daemon when it started: the daemon before may have held
    /// them, confirmed past them and stopped before deleting their keys a
    /// second time, and this one will not read them again. Their keys are
    /// unknown, so once they show `flush_all` (every rule's keys) is due.
    pub fn across_restart(mut self, xids: Vec<u32>, flush_all: CacheOp) -> Self {
        if !xids.is_empty() {
            self.across_restart = Some((xids, flush_all));
        }
        self
    }

    /// The commits held across the restart that have not shown yet.
    pub fn waiting_across_restart(&self) -> Option<&[u32]> {
        self.across_restart
            .as_ref()
            .map(|(xids, _)| xids.as_slice())
    }

    /// The flush due now that the commits held across the restart showed;
    /// nothing is waited for after it.
    pub fn shown_across_restart(&mut self) -> Option<Item> {
        let (_, flush) = self.across_restart.take()?;
        Some(Item {
            op: flush,
            lsn: Lsn::ZERO,
            commit_time: Arc::from(""),
            commit_micros: 0,
            seq: 0,
            xid: 0,
        })
    }

    /// The position the held transactions were read from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Forgets everything held: the position they were read from was
    /// replaced, and the flush that starts the new one covers their keys.
    /// Not the commits held across the restart: that flush may come before
    /// they show.
    pub fn clear(&mut self) {
        self.items.clear();
        self.bytes = 0;
        self.overflow = None;
    }

    /// Nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.overflow.is_none()
    }

    /// Holds the row invalidations of `items`, all their keys, read from
    /// the position `generation`.
    pub fn hold(&mut self, items: &[Item], generation: u64) {
        self.generation = generation;
        for item in items {
            let Some(held) = item.invalidating(item.op.keys().all().cloned().collect()) else {
                continue;
            };
            self.bytes += held.weight();
            self.items.push(held);
        }
        if self.bytes > MAX_HELD_BYTES {
            self.give_up_keys();
        }
    }

    /// Replaces the held keys by their tables.
    fn give_up_keys(&mut self) {
        let overflow = self.overflow.get_or_insert_with(|| Overflow {
            tables: BTreeSet::new(),
            xids: BTreeSet::new(),
            last: Lsn::ZERO,
        });
        for item in self.items.drain(..) {
            overflow.tables.insert(Arc::from(item.op.names().0));
            overflow.xids.insert(item.xid);
            overflow.last = overflow.last.max(item.lsn);
        }
        self.bytes = 0;
        tracing::warn!(
            tables = ?overflow.tables,
            limit_bytes = MAX_HELD_BYTES,
            "a synchronous commit holds more keys than the daemon keeps; its tables' keys will be flushed once it shows"
        );
    }

    /// Takes what the confirmation of everything before `confirmed`
    /// released.
    pub fn take_due(&mut self, confirmed: Lsn) -> Due {
        let mut due = Due::default();
        let (now, later): (Vec<Item>, Vec<Item>) = std::mem::take(&mut self.items)
            .into_iter()
            .partition(|item| item.lsn < confirmed);
        self.items = later;
        self.bytes = self.items.iter().map(Item::weight).sum();
        let mut xids: BTreeSet<u32> = now.iter().map(|i| i.xid).collect();
        if let Some(overflow) = self.overflow.take_if(|o| o.last < confirmed) {
            xids.extend(overflow.xids);
            let template = now.first().cloned();
            for table in overflow.tables {
                let Some(flush) = self.flushes.get(&table) else {
                    continue;
                };
                due.flushes.push(Item {
                    op: flush.clone(),
                    lsn: overflow.last,
                    commit_time: template
                        .as_ref()
                        .map_or_else(|| Arc::from(""), |t| Arc::clone(&t.commit_time)),
                    commit_micros: template.as_ref().map_or(0, |t| t.commit_micros),
                    seq: 0,
                    xid: 0,
                });
            }
        }
        due.again = now;
        due.xids = xids.into_iter().collect();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{FlushReason, Op};

    fn item(table: &str, key: String, lsn: u64, xid: u32) -> Item {
        Item {
            op: CacheOp::Invalidate {
                table: Arc::from(table),
                op: Op::Update,
                keys: vec![key],
            },
            lsn: Lsn(lsn),
            commit_time: Arc::from(""),
            commit_micros: 0,
            seq: 1,
            xid,
        }
    }

    fn flush(table: &str) -> CacheOp {
        CacheOp::Flush {
            table: Arc::from(table),
            patterns: vec![format!("{table}:*")],
            reason: FlushReason::HeldTooLarge,
        }
    }

    #[test]
    fn held_keys_come_due_once_their_commit_is_confirmed() {
        let mut held = Held::new(vec![flush("public.a")]);
        held.hold(&[item("public.a", "a:1".into(), 10, 7)], 0);
        held.hold(&[item("public.a", "a:2".into(), 20, 8)], 0);
        assert!(
            held.take_due(Lsn(10)).is_empty(),
            "confirmed up to, not past, 10"
        );
        let due = held.take_due(Lsn(11));
        assert_eq!(due.again.len(), 1);
        assert_eq!(due.xids, vec![7]);
        assert!(due.flushes.is_empty());
        assert!(!held.is_empty());
        let due = held.take_due(Lsn(21));
        assert_eq!(due.xids, vec![8]);
        assert!(held.is_empty());
    }

    #[test]
    fn commits_held_across_a_restart_outlive_a_new_position_and_flush_once() {
        let held = Held::new(vec![flush("public.a")]);
        assert_eq!(held.waiting_across_restart(), None);
        let mut held = held.across_restart(vec![7, 9], flush("*"));
        assert!(held.is_empty(), "nothing to record past");
        // A new position's flush may come before they show.
        held.clear();
        assert_eq!(held.waiting_across_restart(), Some(&[7, 9][..]));
        let shown = held.shown_across_restart().expect("the flush");
        assert_eq!(shown.op.names().0, "*");
        assert_eq!(held.waiting_across_restart(), None);
        assert!(held.shown_across_restart().is_none(), "once");
        let none = Held::new(Vec::new()).across_restart(Vec::new(), flush("*"));
        assert_eq!(none.waiting_across_restart(), None);
    }

    #[test]
    fn past_the_bound_keys_become_flushes_of_their_tables() {
        let mut held = Held::new(vec![flush("public.a"), flush("public.b")]);
        let key = "k".repeat(1000);
        let mut lsn = 0;
        while held.overflow.is_none() {
            lsn += 1;
            held.hold(&[item("public.a", key.clone(), lsn, 5)], 0);
        }
        assert!(
            held.items.is_empty() && held.bytes == 0,
            "the keys are given up"
        );
        held.hold(&[item("public.b", "b:1".into(), lsn + 1, 6)], 0);
        assert!(
            held.take_due(Lsn(lsn)).is_empty(),
            "the last given-up key is not confirmed yet"
        );
        let due = held.take_due(Lsn(lsn + 2));
        assert_eq!(due.xids, vec![5, 6]);
        assert_eq!(due.again.len(), 1, "b:1 came after: still a key");
        assert_eq!(due.flushes.len(), 1);
        assert_eq!(due.flushes[0].op.names().0, "public.a");
        assert!(held.is_empty());
    }
}
