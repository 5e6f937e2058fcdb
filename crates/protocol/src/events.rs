//! The order of the invalidation events, as a subscriber checks it.
//!
//! Redis pub/sub is fire-and-forget: a subscriber that was disconnected
//! for a moment misses events without being told. So every event carries
//! two fields the daemon draws from one record in Redis
//! ([`sequence_key`]) in the same script that publishes it:
//!
//! - `seq` grows by exactly one per event published on the channel, across
//!   daemon restarts and every group's daemon (they share the record), so
//!   a subscriber that sees any other number knows it missed something. A
//!   replay after a crash publishes the replayed changes again with new
//!   numbers: duplicates of changes, never holes.
//! - `epoch` changes when the daemon deleted keys by pattern instead of
//!   naming them (a truncate, changes missed by a lost slot, drift, a
//!   promotion, Redis losing writes, a synchronous commit too large to
//!   remember), and when the record itself was lost (an emptied Redis).
//!
//! A subscriber keeps a [`Sequence`] per channel: on a disconnect it
//! calls [`Sequence::reset`] and drops everything it holds; on each event
//! it drops everything unless [`Sequence::observe`] says the event is the
//! next one.

use crate::keys::hash_tag;

/// The record `seq` and `epoch` come from (a Redis hash with fields `seq`
/// and `epoch`): in the channel's hash slot, so a script on a Redis
/// Cluster can update it and `SPUBLISH` on the channel together. A channel
/// with a hash tag of its own keeps it (`pgci:events:app{inv}`); any other
/// is wrapped (`pgci:events:{cache-invalidation}`).
pub fn sequence_key(channel: &str) -> String {
    if hash_tag(channel.as_bytes()).is_some() {
        format!("pgci:events:{channel}")
    } else {
        format!("pgci:events:{{{channel}}}")
    }
}

/// A name for the event stream in `channel`'s hash slot (`{channel}:events`,
/// or `{tag}:events` when the channel has a hash tag): on a Redis Cluster
/// the stream must share the slot of [`sequence_key`].
pub fn stream_name_like(channel: &str) -> String {
    match hash_tag(channel.as_bytes()) {
        Some(tag) => format!("{{{}}}:events", String::from_utf8_lossy(tag)),
        None => format!("{{{channel}}}:events"),
    }
}

/// The field of a stream entry that holds the event, as published.
pub const STREAM_FIELD: &str = "event";

/// What one event says about the events before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The first event since the subscription (or [`Sequence::reset`]).
    First,
    /// The next event: nothing was missed.
    Next,
    /// Events were missed: `missed` of them (`seq` jumped ahead).
    Gap {
        /// How many numbers were skipped.
        missed: u64,
    },
    /// `seq` went back in the same epoch: Redis lost the record's latest
    /// writes (restored from an older snapshot, failed over to a replica
    /// that missed them), and events may be lost with it.
    Rewound,
    /// The epoch changed: the daemon deleted keys by pattern.
    NewEpoch,
}

impl Observed {
    /// Whether a subscriber must drop everything it holds.
    pub fn must_drop(&self) -> bool {
        !matches!(self, Observed::Next | Observed::First)
    }
}

/// The last event a subscriber saw on one channel.
#[derive(Debug, Default, Clone)]
pub struct Sequence {
    last: Option<(String, u64)>,
}

impl Sequence {
    /// Takes the event numbered `seq` in `epoch`.
    pub fn observe(&mut self, epoch: &str, seq: u64) -> Observed {
        let observed = match &self.last {
            None => Observed::First,
            Some((last_epoch, _)) if last_epoch != epoch => Observed::NewEpoch,
            Some((_, last)) if seq == last.saturating_add(1) => Observed::Next,
            Some((_, last)) if seq > *last => Observed::Gap {
                missed: seq - last - 1,
            },
            Some(_) => Observed::Rewound,
        };
        match &mut self.last {
            Some((last_epoch, last)) if last_epoch == epoch => *last = seq,
            _ => self.last = Some((epoch.to_string(), seq)),
        }
        observed
    }

    /// The subscription was lost: the next event starts afresh.
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// The last event seen: its epoch and `seq`.
    pub fn last(&self) -> Option<(&str, u64)> {
        self.last.as_ref().map(|(e, s)| (e.as_str(), *s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_learns_what_it_missed() {
        let mut seen = Sequence::default();
        assert_eq!(seen.observe("e1", 7), Observed::First);
        assert_eq!(seen.observe("e1", 8), Observed::Next);
        assert_eq!(seen.observe("e1", 11), Observed::Gap { missed: 2 });
        assert_eq!(seen.observe("e1", 12), Observed::Next);
        assert_eq!(seen.observe("e1", 12), Observed::Rewound);
        assert_eq!(seen.observe("e1", 3), Observed::Rewound);
        assert_eq!(seen.observe("e1", 4), Observed::Next);
        assert_eq!(seen.observe("e2", 5), Observed::NewEpoch);
        assert!(Observed::NewEpoch.must_drop());
        assert!(!Observed::Next.must_drop());
        assert_eq!(seen.last(), Some(("e2", 5)));
        seen.reset();
        assert_eq!(seen.observe("e2", 40), Observed::First);
    }

    #[test]
    fn the_record_and_a_suggested_stream_share_the_channel_s_slot() {
        assert_eq!(
            sequence_key("cache-invalidation"),
            "pgci:events:{cache-invalidation}"
        );
        assert_eq!(sequence_key("app{inv}"), "pgci:events:app{inv}");
        assert_eq!(
            stream_name_like("cache-invalidation"),
            "{cache-invalidation}:events"
        );
        assert_eq!(stream_name_like("app{inv}"), "{inv}:events");
        assert_eq!(sequence_key("a{}b"), "pgci:events:{a{}b}");
    }
}
