//! The `outbox` source: for databases where a replication slot is not
//! available (only a pooler is reachable, no REPLICATION role, no free
//! slot). Triggers installed by `setup` write one outbox row per changed
//! row in the writer's transaction (see [`install`]); a drain worker reads
//! them (see [`drain`]).
//!
//! ```text
//!  wake-up (NOTIFY) or poll ─▶ BEGIN; SELECT … FOR UPDATE SKIP LOCKED (oldest first)
//!      ─▶ events (one transaction per row) ─▶ apply loop ─▶ Redis (retried until acknowledged)
//!      ─▶ confirm(claim) ─▶ DELETE the rows; COMMIT
//! ```
//!
//! The rows are deleted in the same transaction that locked them, and only
//! after the apply loop confirmed their claim (Redis acknowledged every
//! operation): a crash, kill -9, or lost connection rolls the transaction
//! back and the rows are drained again (at least once). NOTIFY is only a
//! wake-up; the worker polls every `poll_interval` and drains on start, so
//! rows written while nobody listened are applied too. Several daemons may
//! drain one outbox: SKIP LOCKED gives each its own rows, and refreshed
//! keys are version-guarded by the WAL position at which each row was
//! written.
//!
//! The worker is a task of its own so that [`OutboxSource::next`] is a
//! channel receive, which the apply loop's `select!` may cancel freely; a
//! claim's queries are never interrupted halfway.

pub mod drain;
pub mod install;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::change::Change;
use crate::config::OutboxConfig;
use crate::db::{ConnInfo, Db, DbError};
use crate::error::{Backoff, Fatal};
use crate::lsn::Lsn;
use crate::plan::rules::RuleSet;
use crate::source::{Event, Source, Txn};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;
use drain::{Captures, Read};

/// Events queued from the worker to the apply loop: enough to keep the
/// loop busy while the worker reads on; the worker waits when it is full.
const QUEUED_EVENTS: usize = 4096;
/// How long shutdown waits for the worker to delete the last confirmed
/// claim.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Claim numbers, counted per process: the acknowledgement of this source.
pub type ClaimId = u64;

type Message = Result<Event<ClaimId>, Fatal>;

/// What the apply loop tells the worker.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// Claims up to this one are applied: their rows may be deleted.
    confirmed: ClaimId,
    /// Shutdown: finish a confirmed claim, then stop.
    stopping: bool,
}

/// The outbox as a [`Source`].
pub struct OutboxSource {
    events: mpsc::Receiver<Message>,
    control: watch::Sender<Control>,
    worker: JoinHandle<()>,
}

impl OutboxSource {
    /// Starts the drain worker; it connects (and retries) on its own.
    pub fn start(
        conn: ConnInfo,
        cfg: OutboxConfig,
        rules: Arc<RuleSet>,
        health: Arc<Health>,
    ) -> Self {
        let (tx, events) = mpsc::channel(QUEUED_EVENTS);
        let (control, control_rx) = watch::channel(Control::default());
        // The worker is stopped by `shutdown`, not by the daemon's signal:
        // it must outlive the loop until the final claim is deleted.
        let worker = Worker {
            conn,
            cfg,
            rules,
            health,
            tx,
            control: control_rx,
            claims: 0,
        };
        let worker = tokio::spawn(worker.run());
        OutboxSource {
            events,
            control,
            worker,
        }
    }
}

impl Source for OutboxSource {
    type Ack = ClaimId;

    async fn next(&mut self) -> Result<Event<ClaimId>, Fatal> {
        match self.events.recv().await {
            Some(message) => message,
            None => Err(Fatal {
                what: "the outbox worker ended unexpectedly".to_string(),
                hint: "this is a bug: report it with the log",
                user_must_fix: false,
            }),
        }
    }

    fn confirm(&mut self, ack: ClaimId) {
        self.control
            .send_modify(|c| c.confirmed = c.confirmed.max(ack));
    }

    /// The outbox never loses its position: rows stay until deleted.
    async fn recover(&mut self, _cancel: &CancellationToken) -> bool {
        true
    }

    async fn shutdown(self) {
        self.control.send_modify(|c| c.stopping = true);
        let mut worker = self.worker;
        if tokio::time::timeout(SHUTDOWN_WAIT, &mut worker)
            .await
            .is_err()
        {
            tracing::warn!(
                "outbox worker did not stop in time; undeleted rows will be drained again"
            );
            worker.abort();
        }
    }
}

/// Claims rows, hands them to the loop, deletes them once confirmed.
struct Worker {
    conn: ConnInfo,
    cfg: OutboxConfig,
    rules: Arc<RuleSet>,
    health: Arc<Health>,
    tx: mpsc::Sender<Message>,
    control: watch::Receiver<Control>,
    /// The last claim number handed out.
    claims: ClaimId,
}

/// How a drain session ended.
enum Ended {
    /// Stop the worker (shutdown, or the loop is gone).
    Stop,
    /// The connection failed: open a new session.
    Reconnect(DbError),
}

impl Worker {
    async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut announced = false;
        loop {
            if self.control.borrow().stopping {
                return;
            }
            let session = async {
                let (db, wake) = Db::connect_listening(&self.conn, &self.cfg.schema).await?;
                drain::forget_gone_waiters(&db, &self.cfg).await?;
                let (captures, schemas) = Captures::read(&db, &self.cfg, &self.rules).await?;
                Ok::<_, DbError>((db, wake, captures, schemas))
            };
            let (mut db, mut wake, mut captures, schemas) = match session.await {
                Ok(session) => session,
                Err(error) => {
                    if let Some(fatal) = Fatal::from_class(&error, error.class()) {
                        let _ = self.tx.send(Err(fatal)).await;
                        return;
                    }
                    metrics::counter!(m::RECONNECTS_TOTAL, "target" => "postgres").increment(1);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %error, retry_in = ?delay, "cannot open the outbox; retrying");
                    if !self.sleep(delay).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            if !announced {
                announced = true;
                tracing::info!(schema = %self.cfg.schema, "draining the outbox");
            }
            if !self.send(Ok(Event::Restarted)).await {
                return;
            }
            for schema in schemas {
                if !self.send(Ok(Event::Change(Change::Schema(schema)))).await {
                    return;
                }
            }
            self.health.set_streaming(true);
            let ended = self.drain(&mut db, &mut wake, &mut captures).await;
            self.health.set_streaming(false);
            match ended {
                Ended::Stop => return,
                Ended::Reconnect(error) => {
                    metrics::counter!(m::RECONNECTS_TOTAL, "target" => "postgres").increment(1);
                    tracing::warn!(error = %error, "outbox connection failed; reconnecting");
                }
            }
        }
    }

    /// Drains until the connection fails or the worker must stop.
    async fn drain(
        &mut self,
        db: &mut Db,
        wake: &mut mpsc::Receiver<()>,
        captures: &mut Captures,
    ) -> Ended {
        // Whether this session is marked as waiting for a wake-up.
        let mut waiting = false;
        loop {
            let drain::Claim { rows, full } = match drain::claim(db, &self.cfg).await {
                Ok(claim) => claim,
                Err(error) => return Ended::Reconnect(error),
            };
            if !rows.is_empty() && waiting {
                // Busy again: writers need not wake us (this commits with
                // the claim).
                if let Err(error) = drain::set_waiting(db, &self.cfg, false).await {
                    return Ended::Reconnect(error);
                }
                waiting = false;
            }
            if !rows.is_empty() {
                self.claims += 1;
                let claim = self.claims;
                for row in &rows {
                    let mut read = captures.decode(row, false);
                    if read == Read::Stale {
                        // ADD or DROP COLUMN on a whole-row table: read it
                        // again, describe it again, and read the row anew.
                        match Captures::read(db, &self.cfg, &self.rules).await {
                            Ok((fresh, schemas)) => {
                                *captures = fresh;
                                for schema in schemas {
                                    if !self.send(Ok(Event::Change(Change::Schema(schema)))).await {
                                        return Ended::Stop;
                                    }
                                }
                            }
                            Err(error) => return Ended::Reconnect(error),
                        }
                        read = captures.decode(row, true);
                    }
                    let Read::Change(change) = read else {
                        continue;
                    };
                    let txn = Txn {
                        // Rows read by the drain's snapshot are visible to
                        // any later one already.
                        xid: 0,
                        lsn: row.lsn.parse().unwrap_or(Lsn::ZERO),
                        commit_time_micros: row.created_micros,
                        fixed_seq: Some(row.id as u32),
                    };
                    for event in [
                        Event::Begin(txn),
                        Event::Change(change),
                        Event::Commit { ack: None },
                    ] {
                        if !self.send(Ok(event)).await {
                            return Ended::Stop;
                        }
                    }
                }
                if !self.send(Ok(Event::Position(claim))).await {
                    return Ended::Stop;
                }
                // Hold the rows' locks until Redis has applied them.
                let confirmed = self
                    .control
                    .wait_for(|c| c.confirmed >= claim || c.stopping)
                    .await
                    .map(|c| c.confirmed >= claim);
                if !matches!(confirmed, Ok(true)) {
                    return Ended::Stop;
                }
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                if let Err(error) = drain::finish(db, &self.cfg, &ids).await {
                    return Ended::Reconnect(error);
                }
                metrics::counter!(m::OUTBOX_ROWS_TOTAL).increment(rows.len() as u64);
                if self.control.borrow().stopping {
                    return Ended::Stop;
                }
                if full {
                    continue;
                }
            } else if let Err(error) = db.execute_batch("COMMIT").await {
                return Ended::Reconnect(error);
            }
            let stopping = self.control.borrow().stopping;
            if stopping {
                return self.stop_waiting(db, waiting).await;
            }
            if !waiting {
                // About to wait: ask writers for a wake-up, then look once
                // more, since a row committed before they could see the
                // request did not NOTIFY.
                if let Err(error) = drain::set_waiting(db, &self.cfg, true).await {
                    return Ended::Reconnect(error);
                }
                waiting = true;
                continue;
            }
            let mut control = self.control.clone();
            let stop = tokio::select! {
                _ = async { let _ = control.wait_for(|c| c.stopping).await; } => true,
                woke = wake.recv() => {
                    if woke.is_none() {
                        return Ended::Reconnect(DbError::Closed);
                    }
                    false
                }
                _ = tokio::time::sleep(self.cfg.poll_interval.0) => false,
            };
            if stop {
                return self.stop_waiting(db, waiting).await;
            }
        }
    }

    /// Stops; a mark that this session waits is removed first, so writers
    /// do not NOTIFY for a drainer that is gone (no transaction is open
    /// while the session waits).
    async fn stop_waiting(&self, db: &Db, waiting: bool) -> Ended {
        if waiting {
            let _ = drain::set_waiting(db, &self.cfg, false).await;
        }
        Ended::Stop
    }

    /// Hands `message` to the loop; `false` if the loop is gone or has
    /// stopped reading (shutdown).
    async fn send(&self, message: Message) -> bool {
        let mut control = self.control.clone();
        tokio::select! {
            sent = self.tx.send(message) => sent.is_ok(),
            _ = control.wait_for(|c| c.stopping) => false,
        }
    }

    /// Sleeps unless stopping; `false` if stopping.
    async fn sleep(&self, delay: std::time::Duration) -> bool {
        let mut control = self.control.clone();
        tokio::select! {
            _ = control.wait_for(|c| c.stopping) => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}
