//! Which server, and which history, the slot lives on.
//!
//! A promotion (or a restore to a point in time) starts a new timeline;
//! a restore from another cluster brings another system identifier. A slot
//! on that server may not have everything this daemon already confirmed:
//! with asynchronous replication, the old primary's last commits never
//! reached the standby, so an app may have cached values the new primary
//! does not have, and a slot that exists there (copied with the data
//! directory, or restored) would resume without them. So when the origin
//! of a new session differs from the last one seen, the source reports
//! the position lost (the pipeline recreates the slot and flushes every
//! rule key) instead of resuming. A slot that is missing on the new server
//! is reported lost by the slot check anyway.
//!
//! One promotion is safe to resume through: a failover slot (PostgreSQL
//! 17+) that the standby synchronized, when the old primary held logical
//! changes back until that standby had them (`synchronized_standby_slots`):
//! the daemon was never handed a change the new primary lacks, so the
//! synchronized slot resumes with no flush.
//!
//! The origin is remembered while the daemon runs, and kept in an
//! [`OriginStore`] (the app gives the first Redis target,
//! `pgci:origin:<slot>`), so that a daemon stopped during a promotion
//! still compares the new primary with the old one at its next start.

use std::fmt;

use futures_util::future::BoxFuture;

use crate::db::{Db, DbError};

/// Where the last origin is kept across restarts. Failures are the
/// store's to log: without a stored origin the first session is trusted,
/// as before the store.
pub trait OriginStore: Send + Sync {
    /// The stored origin's text ([`Origin::to_record`]), if any.
    fn load(&self) -> BoxFuture<'_, Option<String>>;
    /// Stores `text`.
    fn save(&self, text: String) -> BoxFuture<'_, ()>;
}

/// A server's system identifier and current timeline, and what it says
/// about the slot's failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    system_id: i64,
    timeline: i64,
    /// The slot is a failover slot (`failover = true`, 17+).
    failover: bool,
    /// The slot was synchronized from a primary (`synced`: on a promoted
    /// standby, left over from before the promotion).
    synced: bool,
    /// Logical changes wait for the standbys named in
    /// `synchronized_standby_slots` (17+).
    waits_for_standbys: bool,
}

/// What a session's origin means after the last one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Since {
    /// The same server and history.
    Same,
    /// Promoted, and the slot can be trusted: why.
    Trusted(String),
    /// The slot cannot be trusted: why.
    Lost(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system {} timeline {}", self.system_id, self.timeline)
    }
}

impl Origin {
    /// What the server holding the slot (`db`) says. On a primary the
    /// timeline is the current WAL file's (the first 8 hex digits of its
    /// name): it changes the moment a promotion ends, where the control
    /// file's checkpoint timeline waits for the next checkpoint. On a
    /// standby that decodes (`replication.url`) it is the timeline the
    /// standby receives, or its last restartpoint's while it receives
    /// nothing: a standby that follows a promoted primary moves to the new
    /// timeline, and the slot it holds is rebuilt like any other.
    ///
    /// The slot's columns are read through `to_jsonb` so that the query
    /// runs on every major (`failover` and `synced` are new in 17).
    pub(crate) async fn read(db: &Db, slot: &str) -> Result<Origin, DbError> {
        let row = db
            .client()
            .query_one(
                "select system_identifier::int8, \
                        case when pg_is_in_recovery() \
                             then coalesce((select received_tli::int8 from pg_stat_wal_receiver), \
                                           (select timeline_id::int8 from pg_control_checkpoint())) \
                             else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 \
                        end, \
                        coalesce((select (to_jsonb(s) ->> 'failover')::bool \
                                    from pg_replication_slots s where slot_name = $1), false), \
                        coalesce((select (to_jsonb(s) ->> 'synced')::bool \
                                    from pg_replication_slots s where slot_name = $1), false), \
                        coalesce(current_setting('synchronized_standby_slots', true), '') <> '' \
                   from pg_control_system()",
                &[&slot],
            )
            .await
            .map_err(DbError::query("reading the server's system identifier and timeline"))?;
        Ok(Origin {
            system_id: row.get(0),
            timeline: row.get(1),
            failover: row.get(2),
            synced: row.get(3),
            waits_for_standbys: row.get(4),
        })
    }

    /// The stored form: `v1 <system> <timeline> <failover> <synced> <waits>`.
    pub(crate) fn to_record(self) -> String {
        format!(
            "v1 {} {} {} {} {}",
            self.system_id,
            self.timeline,
            u8::from(self.failover),
            u8::from(self.synced),
            u8::from(self.waits_for_standbys)
        )
    }

    /// Reads [`Origin::to_record`]'s text; `None` for anything else.
    pub(crate) fn parse(text: &str) -> Option<Origin> {
        let mut parts = text.split(' ');
        if parts.next()? != "v1" {
            return None;
        }
        let system_id = parts.next()?.parse().ok()?;
        let timeline = parts.next()?.parse().ok()?;
        let mut flag = || parts.next().map(|p| p == "1");
        let (failover, synced, waits_for_standbys) = (flag()?, flag()?, flag()?);
        Some(Origin {
            system_id,
            timeline,
            failover,
            synced,
            waits_for_standbys,
        })
    }

    /// What `now` means for the slot after sessions on `self`.
    pub(crate) fn then(self, now: Origin) -> Since {
        match self.changed_to(now) {
            None => Since::Same,
            Some(why)
                if self.system_id == now.system_id
                    && self.failover
                    && self.waits_for_standbys
                    && now.synced =>
            {
                Since::Trusted(format!(
                    "{why}; the slot was synchronized to this standby and the old primary sent only what the standbys had (synchronized_standby_slots): resuming from it"
                ))
            }
            Some(why) => Since::Lost(why),
        }
    }

    /// How `now` differs from `self`, or `None` when it is the same server
    /// and history.
    fn changed_to(self, now: Origin) -> Option<String> {
        if self.system_id != now.system_id {
            return Some(format!(
                "the database is another cluster now ({self} before, {now} now: a restore or a replacement)"
            ));
        }
        (self.timeline != now.timeline).then(|| {
            format!(
                "the database moved to timeline {} from {} (a promotion or a point-in-time restore): commits confirmed on the old timeline may be missing here",
                now.timeline, self.timeline
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: Origin = Origin {
        system_id: 7,
        timeline: 1,
        failover: true,
        synced: false,
        waits_for_standbys: true,
    };

    #[test]
    fn a_new_timeline_or_system_is_a_change_and_the_same_is_not() {
        assert_eq!(PRIMARY.then(PRIMARY), Since::Same);
        let promoted = Origin {
            timeline: 2,
            ..PRIMARY
        };
        assert!(
            matches!(PRIMARY.then(promoted), Since::Lost(why) if why.contains("timeline 2 from 1"))
        );
        let other = Origin {
            system_id: 8,
            synced: true,
            ..PRIMARY
        };
        assert!(matches!(PRIMARY.then(other), Since::Lost(why) if why.contains("another cluster")));
    }

    #[test]
    fn the_stored_form_reads_back_and_nothing_else_does() {
        let promoted = Origin {
            timeline: 3,
            synced: true,
            ..PRIMARY
        };
        for origin in [PRIMARY, promoted] {
            assert_eq!(Origin::parse(&origin.to_record()), Some(origin));
        }
        for text in ["", "v1", "v2 7 1 1 0 1", "v1 7 x 1 0 1", "v1 7 1 1 0"] {
            assert_eq!(Origin::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn only_a_synchronized_failover_slot_behind_waiting_standbys_is_trusted() {
        let promoted = Origin {
            timeline: 2,
            synced: true,
            ..PRIMARY
        };
        assert!(matches!(PRIMARY.then(promoted), Since::Trusted(_)));
        let not_waiting = Origin {
            waits_for_standbys: false,
            ..PRIMARY
        };
        assert!(matches!(not_waiting.then(promoted), Since::Lost(_)));
        let not_failover = Origin {
            failover: false,
            ..PRIMARY
        };
        assert!(matches!(not_failover.then(promoted), Since::Lost(_)));
        let copied = Origin {
            synced: false,
            ..promoted
        };
        assert!(matches!(PRIMARY.then(copied), Since::Lost(_)));
    }
}
