//! Retrying: how long to wait before the next attempt and when to give up,
//! for every loop of the daemon that retries. The waits are named
//! ([`Pace`]), so a reader sees which loops share settings and why.
//!
//! A loop that retries reads the same way everywhere:
//!
//! ```text
//! let mut retry = Retry::finishing(&Pace::REDIS, &cancel);
//! loop {
//!     match attempt().await {
//!         Ok(done) => break done,
//!         Err(error) => {
//!             let delay = retry.after(&error, classify(&error))?; // Fatal or shutdown
//!             tracing::warn!(%error, retry_in = ?delay, "…; retrying");
//!             retry.sleep(delay).await?;
//!         }
//!     }
//! }
//! ```

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Class, Fatal};

/// Named backoff settings: capped exponential waits. Short first waits
/// make a blip cheap; the cap keeps a long outage from being hammered
/// while still noticing recovery quickly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// The first wait.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Pace {
    /// PostgreSQL: connecting at start-up, a replication session, the
    /// outbox's claim session, recreating a slot, refresh queries and the
    /// visibility check. 200 ms doubling to 5 s: a restart or a failover
    /// takes seconds.
    pub const POSTGRES: Pace = Pace {
        min: Duration::from_millis(200),
        max: Duration::from_secs(5),
    };

    /// Redis: connecting, a batch, the recorded position. 100 ms doubling
    /// to 2 s: a batch waiting holds every change behind it, and Redis
    /// comes back (a restart, a failover, `CLIENT PAUSE`) within a second
    /// or two.
    pub const REDIS: Pace = Pace {
        min: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };
}

/// Waits of one [`Pace`], doubling from its first to its longest.
#[derive(Debug, Clone)]
pub struct Backoff {
    pace: Pace,
    next: Duration,
}

impl Backoff {
    /// Waits as `pace` says.
    pub fn new(pace: &Pace) -> Self {
        Backoff {
            pace: *pace,
            next: pace.min,
        }
    }

    /// The next wait; the one after is twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.pace.max);
        delay
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.pace.min;
    }
}

/// Why a retrying loop stops.
#[derive(Debug)]
pub enum GiveUp {
    /// Retrying cannot fix it.
    Fatal(Fatal),
    /// The stream's position is gone: the caller recovers (see
    /// [`Class::PositionLost`]).
    PositionLost(String),
    /// Shutdown was asked for while it kept failing: the last error. What
    /// was not applied was not confirmed and is replayed at the next start.
    Shutdown(String),
}

/// Attempts a failing unit of work gets once shutdown was requested.
pub const ATTEMPTS_AFTER_SHUTDOWN: u32 = 3;

/// The state of one retrying loop: its backoff, and what shutdown means
/// for it.
#[derive(Debug)]
pub struct Retry {
    backoff: Backoff,
    cancel: CancellationToken,
    /// Attempts still allowed once `cancel` fired.
    after_shutdown: u32,
    /// Whether shutdown ends a wait early.
    interruptible: bool,
}

impl Retry {
    /// For waiting on something (a connection at start-up, a slot to
    /// recreate): shutdown ends the loop at once, even mid-wait.
    pub fn until_shutdown(pace: &Pace, cancel: &CancellationToken) -> Self {
        Retry {
            backoff: Backoff::new(pace),
            cancel: cancel.clone(),
            after_shutdown: 0,
            interruptible: true,
        }
    }

    /// For a unit of work (a batch, its refresh queries) that must not be
    /// given up while the daemon runs: retried until it works, and
    /// [`ATTEMPTS_AFTER_SHUTDOWN`] more times once shutdown was asked.
    pub fn finishing(pace: &Pace, cancel: &CancellationToken) -> Self {
        Retry {
            backoff: Backoff::new(pace),
            cancel: cancel.clone(),
            after_shutdown: ATTEMPTS_AFTER_SHUTDOWN,
            interruptible: false,
        }
    }

    /// After an attempt failed with `error` of `class`: how long to wait
    /// before the next one, or why to stop.
    pub fn after(
        &mut self,
        error: &dyn std::fmt::Display,
        class: Class,
    ) -> Result<Duration, GiveUp> {
        match class {
            Class::Transient => {}
            Class::PositionLost => return Err(GiveUp::PositionLost(error.to_string())),
            class @ Class::Definite { .. } => {
                if let Some(fatal) = Fatal::from_class(error, class) {
                    return Err(GiveUp::Fatal(fatal));
                }
            }
        }
        if self.cancel.is_cancelled() {
            if self.after_shutdown == 0 {
                return Err(GiveUp::Shutdown(error.to_string()));
            }
            self.after_shutdown -= 1;
            if self.after_shutdown == 0 {
                return Err(GiveUp::Shutdown(error.to_string()));
            }
        }
        Ok(self.backoff.next_delay())
    }

    /// Waits `delay`; a loop made [`Retry::until_shutdown`] stops when
    /// shutdown comes first.
    pub async fn sleep(&self, delay: Duration) -> Result<(), GiveUp> {
        if !self.interruptible {
            tokio::time::sleep(delay).await;
            return Ok(());
        }
        tokio::select! {
            _ = self.cancel.cancelled() => Err(GiveUp::Shutdown("shutdown".to_string())),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_ends_a_few_attempts_after_shutdown() {
        let cancel = CancellationToken::new();
        let mut retry = Retry::finishing(&Pace::POSTGRES, &cancel);
        for _ in 0..10 {
            assert!(retry.after(&"down", Class::Transient).is_ok());
        }
        cancel.cancel();
        assert!(retry.after(&"down", Class::Transient).is_ok());
        assert!(retry.after(&"down", Class::Transient).is_ok());
        assert!(matches!(
            retry.after(&"down", Class::Transient),
            Err(GiveUp::Shutdown(why)) if why == "down"
        ));
    }

    #[tokio::test]
    async fn waiting_ends_at_shutdown_even_mid_wait() {
        let cancel = CancellationToken::new();
        let mut retry = Retry::until_shutdown(&Pace::POSTGRES, &cancel);
        let delay = retry.after(&"down", Class::Transient).expect("a wait");
        cancel.cancel();
        let waited = tokio::time::timeout(Duration::from_secs(1), retry.sleep(delay * 100)).await;
        assert!(matches!(waited, Ok(Err(GiveUp::Shutdown(_)))));
        assert!(matches!(
            retry.after(&"down", Class::Transient),
            Err(GiveUp::Shutdown(_))
        ));
    }

    #[test]
    fn definite_errors_stop_at_once_and_a_lost_position_is_the_caller_s() {
        let mut retry = Retry::finishing(&Pace::REDIS, &CancellationToken::new());
        let fatal = retry.after(&"denied", Class::fix("check the password"));
        assert!(matches!(fatal, Err(GiveUp::Fatal(f)) if f.user_must_fix && f.what == "denied"));
        assert!(matches!(
            retry.after(&"gone", Class::PositionLost),
            Err(GiveUp::PositionLost(_))
        ));
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(&Pace::POSTGRES);
        let waits: Vec<_> = (0..7).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Pace::POSTGRES.min);
        let mut r = Backoff::new(&Pace::REDIS);
        let waits: Vec<_> = (0..6).map(|_| r.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000]);
    }
}
