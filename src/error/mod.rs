//! The error policy: every failure the daemon meets is classified here,
//! once, into what to do about it.
//!
//! | class          | what the caller does                                      |
//! |----------------|-----------------------------------------------------------|
//! | `Transient`    | retry with [`Backoff`]; progress is held meanwhile         |
//! | `Definite`     | stop with a one-line hint (exit 2 when the user must fix) |
//! | `PositionLost` | recreate the slot, then flush every key of every rule      |
//!
//! Classification reads codes, never message text: the SQLSTATE of a
//! PostgreSQL error (`tokio_postgres::Error::code()`, or the one the
//! replication transport puts in its message, read by [`replication_sqlstate`]
//! alone), the I/O error kind under it, and `RedisError::kind()`. Whether a
//! replication error means the slot is gone is decided from
//! `pg_replication_slots` (the caller passes what it says), because the
//! server words it differently in every major (and PostgreSQL 18 puts the
//! reason only in the DETAIL the transport leaves out).
//!
//! - [`classify`]: an error of each client into a [`Class`] (the only
//!   module that reads the clients' error types);
//! - [`retry`]: how long to wait before the next attempt, with the named
//!   [`Pace`]s, and when to give up;
//! - [`Exit`]: the process's exit status, decided by one function.

pub mod classify;
pub mod retry;

pub use classify::{
    is_unreachable, may_mean_slot_lost, postgres, redis, replication, replication_sqlstate,
    RedisFailure, SlotHealth, IPV6_ONLY_HINT,
};
pub use retry::{Backoff, GiveUp, Pace, Retry};

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Retrying can fix it (a restart, a dropped connection, a failover).
    Transient,
    /// Retrying cannot fix it.
    Definite {
        /// What the operator should do, one line.
        hint: &'static str,
        /// Whether the configuration or the database setup must change
        /// (exit status 2) rather than something having broken (1).
        user_must_fix: bool,
    },
    /// The stream's position is gone (the slot was dropped or
    /// invalidated): changes were missed.
    PositionLost,
}

impl Class {
    pub(crate) const fn fix(hint: &'static str) -> Class {
        Class::Definite {
            hint,
            user_must_fix: true,
        }
    }

    pub(crate) const fn broken(hint: &'static str) -> Class {
        Class::Definite {
            hint,
            user_must_fix: false,
        }
    }
}

/// A failure that retrying will not fix: what happened and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {hint}")]
pub struct Fatal {
    /// What failed, with the server's or client's words.
    pub what: String,
    /// What the operator should do.
    pub hint: &'static str,
    /// Whether the configuration or database setup must change (exit 2).
    pub user_must_fix: bool,
}

impl Fatal {
    /// The fatal error for `what` if `class` is definite.
    pub fn from_class(what: impl std::fmt::Display, class: Class) -> Option<Fatal> {
        match class {
            Class::Definite {
                hint,
                user_must_fix,
            } => Some(Fatal {
                what: what.to_string(),
                hint,
                user_must_fix,
            }),
            Class::Transient | Class::PositionLost => None,
        }
    }
}

/// How the process ends, decided here only (`run`'s stop and every verb's
/// failure go through it): 0 for success and for any shutdown (whatever
/// was failing when it came), 2 for what the user must fix
/// (configuration, database objects, a server that refuses us for good),
/// 1 for anything else (a restart may help).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done, or stopped on request.
    Success,
    /// Something broke; running it again may work.
    Broken,
    /// The configuration or the database setup must change.
    UserMustFix,
}

impl Exit {
    /// The exit status for a failure of `class`. A transient failure that
    /// ends the process (retries exhausted, or met where nothing retries)
    /// is broken, not the user's to fix.
    pub fn of(class: Class) -> Exit {
        match class {
            Class::Definite {
                user_must_fix: true,
                ..
            } => Exit::UserMustFix,
            Class::Definite { .. } | Class::Transient | Class::PositionLost => Exit::Broken,
        }
    }

    /// The exit status of a one-shot verb (`setup`, `check-config`,
    /// `status`, …) that failed talking to the database. Nothing retries
    /// there, so whatever it met — a host that does not answer, a refused
    /// statement, a lock it would not wait for — is for the user to fix
    /// or retry by hand; a daemon's start-up failure goes through
    /// [`Exit::of`] instead: after a transient failure it exits 1
    /// (restart it), not 2 (change the configuration).
    pub fn of_verb_database() -> Exit {
        Exit::UserMustFix
    }

    /// The exit status for `fatal`.
    pub fn of_fatal(fatal: &Fatal) -> Exit {
        if fatal.user_must_fix {
            Exit::UserMustFix
        } else {
            Exit::Broken
        }
    }

    /// The number the process returns.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Broken => 1,
            Exit::UserMustFix => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_failure_exits_1_and_only_the_user_s_problems_exit_2() {
        assert_eq!(Exit::of(Class::Transient).code(), 1);
        assert_eq!(Exit::of(Class::PositionLost).code(), 1);
        assert_eq!(Exit::of(Class::fix("fix it")).code(), 2);
        assert_eq!(Exit::of(Class::broken("broke")).code(), 1);
        assert_eq!(Exit::Success.code(), 0);
    }
}
