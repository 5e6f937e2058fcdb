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
//! The origin is remembered while the daemon runs; a daemon that was
//! stopped during a promotion relies on the slot check alone (a slot the
//! new primary has is trusted).

use std::fmt;

use crate::db::{Db, DbError};

/// A server's system identifier and current timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    system_id: i64,
    timeline: i64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system {} timeline {}", self.system_id, self.timeline)
    }
}

impl Origin {
    /// What the primary `db` reaches says. The timeline is the current
    /// WAL file's (the first 8 hex digits of its name): it changes the
    /// moment a promotion ends, where the control file's checkpoint
    /// timeline waits for the next checkpoint.
    pub(crate) async fn read(db: &Db) -> Result<Origin, DbError> {
        let row = db
            .client()
            .query_one(
                "select system_identifier::int8, \
                        ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 \
                   from pg_control_system()",
                &[],
            )
            .await
            .map_err(DbError::query("reading the server's system identifier and timeline"))?;
        Ok(Origin {
            system_id: row.get(0),
            timeline: row.get(1),
        })
    }

    /// Why a slot on `now` cannot be trusted after sessions on `self`, or
    /// `None` when it is the same server and history.
    pub(crate) fn changed_to(self, now: Origin) -> Option<String> {
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

    #[test]
    fn a_new_timeline_or_system_is_a_change_and_the_same_is_not() {
        let old = Origin {
            system_id: 7,
            timeline: 1,
        };
        assert_eq!(old.changed_to(old), None);
        let promoted = Origin { timeline: 2, ..old };
        assert!(old
            .changed_to(promoted)
            .is_some_and(|why| why.contains("timeline 2 from 1")));
        let other = Origin {
            system_id: 8,
            ..old
        };
        assert!(old
            .changed_to(other)
            .is_some_and(|why| why.contains("another cluster")));
    }
}
