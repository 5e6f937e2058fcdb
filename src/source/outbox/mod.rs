//! The `outbox` source: for databases where a replication slot is not
//! available (only a pooler is reachable, no REPLICATION role, no free
//! slot). Triggers installed by `setup` write one outbox row per changed
//! row in the writer's transaction (see [`install`]); a drain worker reads
//! them (see [`drain`]).
//!
//! ```text
//!  wake-up (NOTIFY) or poll ─▶ rows of transactions committed since the recorded snapshot
//!      ─▶ events (one transaction per row) ─▶ apply loop ─▶ Redis (retried until acknowledged)
//!      ─▶ confirm(claim) ─▶ record the new snapshot
//!  every rotate_interval: writers switch partitions; the drained one is TRUNCATEd
//! ```
//!
//! The position is recorded only after the apply loop confirmed the claim
//! (Redis acknowledged every operation): after a crash, kill -9, or a lost
//! connection, rows since the last recorded position are applied again (at
//! least once; refreshed keys are version-guarded by the WAL position at
//! which each row was written). NOTIFY is only a wake-up; the worker polls
//! every `poll_interval` and drains on start, so rows written while nobody
//! listened are applied too. One daemon drains an outbox at a time (a
//! session advisory lock); a second one stands by and takes over when the
//! first one's session ends.
//!
//! The worker is a task of its own so that [`OutboxSource::next`] is a
//! channel receive, which the apply loop's `select!` may cancel freely; a
//! claim's queries are never interrupted halfway.

pub(crate) mod captures;
pub mod drain;
pub(crate) mod install;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::change::Change;
use crate::config::OutboxConfig;
use crate::db::{ConnInfo, Db, DbError};
use crate::error::{Backoff, Fatal, Pace};
use crate::lsn::Lsn;
use crate::plan::rules::RuleSet;
use crate::source::{Event, Source, Txn};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;
use captures::{Captures, Read};

/// Events queued from the worker to the apply loop: enough to keep the
/// loop busy while the worker reads on; the worker waits when it is full.
const QUEUED_EVENTS: usize = 4096;
/// How long shutdown waits for the worker to record the last confirmed
/// claim.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// How long a busy drainer waits before it looks for more rows: a few
/// milliseconds of rows per claim instead of a claim (and a wake-up
/// request) per row while writers keep writing.
const LINGER: Duration = Duration::from_millis(3);
/// How soon an outbox partition that could not be emptied is tried again
/// (and how long after a switch it is first tried).
const TRUNCATE_RETRY: Duration = Duration::from_millis(500);

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
    async fn recover(&mut self, _cancel: &CancellationToken) -> Option<Self::Ack> {
        Some(Self::Ack::default())
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

/// One drain session: the connection holding the drain lock, where the
/// drain stands, and the partition rotation.
struct Drain<'a> {
    db: &'a Db,
    session: &'a drain::Session,
    position: drain::Position,
    rotation: Rotation,
    /// Whether writers are asked to wake us.
    waking: bool,
    /// Since the wake-up request: writers that may have read it unset.
    unsure: Option<Unsure>,
}

/// Writers running when the drainer asked for wake-ups may have read the
/// request before it was made and commit without a NOTIFY: until none of
/// them runs, the drainer looks again every `step` (doubling up to the
/// poll interval), then once more, and only then waits for a wake-up.
struct Unsure {
    /// The first look's snapshot after the request (its running
    /// transactions are the writers in question).
    snapshot: Option<String>,
    step: Duration,
}

/// The first re-look while writers of before the wake-up request run.
const UNSURE_FIRST_STEP: Duration = Duration::from_millis(5);

impl Drain<'_> {
    /// Keeps the outbox small: empties the partition writers left once it
    /// is drained, and switches writers to the other one every
    /// `rotate_interval` (when they wrote anything).
    async fn keep_small(&mut self, cfg: &OutboxConfig) -> Result<(), DbError> {
        let now = Instant::now();
        if let Some(part) = self.rotation.leaving {
            if now < self.rotation.next_try {
                return Ok(());
            }
            match self.session.truncate(self.db, part, &self.position).await? {
                drain::Emptied::Yes => {
                    self.rotation.leaving = None;
                    self.rotation.tries = 0;
                    metrics::counter!(m::OUTBOX_TRUNCATES_TOTAL).increment(1);
                }
                busy => {
                    self.rotation.tries += 1;
                    self.rotation.next_try = now + TRUNCATE_RETRY;
                    if self.rotation.tries.is_multiple_of(50) {
                        tracing::warn!(partition = part, state = ?busy, tries = self.rotation.tries,
                            "an outbox partition cannot be emptied yet: a long transaction still writes to it, or its rows are not applied");
                    }
                }
            }
            return Ok(());
        }
        if self.rotation.rows > 0 && now >= self.rotation.since + cfg.rotate_interval.0 {
            let left = self.session.rotate(self.db).await?;
            self.rotation = Rotation {
                leaving: Some(left),
                since: now,
                // Give transactions that read `state` before the switch a
                // moment to finish before the TRUNCATE's lock asks.
                next_try: now + TRUNCATE_RETRY,
                rows: 0,
                tries: 0,
            };
        }
        Ok(())
    }
}

/// When writers switch partitions and when the one they left is emptied.
struct Rotation {
    /// The partition writers left, not emptied yet.
    leaving: Option<i16>,
    /// When writers switched to the partition they fill.
    since: Instant,
    /// When to try emptying `leaving` again.
    next_try: Instant,
    /// Rows drained since the switch.
    rows: usize,
    /// Failed tries to empty `leaving`.
    tries: u32,
}

impl Rotation {
    fn new(writers: drain::Writers) -> Self {
        let now = Instant::now();
        let filling_for = Duration::from_secs_f64(writers.filling_for.max(0.0));
        Rotation {
            // The other partition may hold rows from before a crash.
            leaving: Some(1 - writers.current),
            since: now.checked_sub(filling_for).unwrap_or(now),
            next_try: now,
            // Rows an earlier process left in the partition writers fill
            // (drained, perhaps, before a kill -9) count as drained since
            // the switch: else, with no new writes, it is never switched
            // and emptied.
            rows: usize::from(writers.holds_rows),
            tries: 0,
        }
    }

    fn drained(&mut self, rows: usize) {
        self.rows += rows;
    }
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
        let mut backoff = Backoff::new(&Pace::POSTGRES);
        let mut announced = false;
        let mut standing_by = false;
        loop {
            if self.control.borrow().stopping {
                return;
            }
            let session = async {
                let (db, wake) = if self.cfg.wake_ups {
                    Db::connect_listening(&self.conn, &self.cfg.schema).await?
                } else {
                    Db::connect_watched(&self.conn).await?
                };
                if !drain::try_lock(&db, &self.cfg).await? {
                    return Ok(None);
                }
                let (session, position, writers) = drain::Session::open(&db, &self.cfg).await?;
                // A drainer killed while it waited left the flag set.
                session.set_wake(&db, false).await?;
                let (captures, schemas) = Captures::read(&db, &self.cfg, &self.rules).await?;
                Ok::<_, DbError>(Some((
                    db, wake, session, position, writers, captures, schemas,
                )))
            };
            let opened = match session.await {
                Ok(Some(opened)) => opened,
                Ok(None) => {
                    // Another daemon drains this outbox: stand by, and
                    // take over when its session ends.
                    backoff.reset();
                    if !standing_by {
                        standing_by = true;
                        tracing::info!(schema = %self.cfg.schema,
                            "another daemon drains this outbox; standing by to take over");
                    }
                    if !self.sleep(self.cfg.poll_interval.0).await {
                        return;
                    }
                    continue;
                }
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
            let (db, mut wake, session, position, writers, mut captures, schemas) = opened;
            backoff.reset();
            if !announced || standing_by {
                announced = true;
                standing_by = false;
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
            let mut drain = Drain {
                db: &db,
                session: &session,
                position,
                rotation: Rotation::new(writers),
                waking: false,
                unsure: None,
            };
            let ended = self.drain(&mut drain, &mut wake, &mut captures).await;
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
        drain: &mut Drain<'_>,
        wake: &mut mpsc::Receiver<()>,
        captures: &mut Captures,
    ) -> Ended {
        loop {
            let drain::Claim { rows, full, next } = match drain
                .session
                .claim(drain.db, &self.cfg, &drain.position)
                .await
            {
                Ok(claim) => claim,
                Err(error) => return Ended::Reconnect(error),
            };
            let had_rows = !rows.is_empty();
            if had_rows {
                if drain.waking {
                    // Busy again: writers need not wake us.
                    if let Err(error) = drain.session.set_wake(drain.db, false).await {
                        return Ended::Reconnect(error);
                    }
                    drain.waking = false;
                    drain.unsure = None;
                }
                self.claims += 1;
                let claim = self.claims;
                if let Err(ended) = self.hand_over(drain.db, &rows, captures).await {
                    return ended;
                }
                if !self.send(Ok(Event::Position(claim))).await {
                    return Ended::Stop;
                }
                // Record the position only once Redis has applied the rows.
                let confirmed = self
                    .control
                    .wait_for(|c| c.confirmed >= claim || c.stopping)
                    .await
                    .map(|c| c.confirmed >= claim);
                if !matches!(confirmed, Ok(true)) {
                    return Ended::Stop;
                }
                if let Err(error) = drain.session.record(drain.db, &next).await {
                    return Ended::Reconnect(error);
                }
                metrics::counter!(m::OUTBOX_ROWS_TOTAL).increment(rows.len() as u64);
                drain.rotation.drained(rows.len());
            }
            // A batch with no rows moves the position in memory only: no
            // row lies between the two snapshots, so either is as good.
            drain.position = next;
            if let Err(error) = drain.keep_small(&self.cfg).await {
                return Ended::Reconnect(error);
            }
            if self.control.borrow().stopping {
                return self.stop_waiting(drain).await;
            }
            if full {
                continue;
            }
            if had_rows {
                // Busy: look again in a moment rather than asking writers
                // for wake-ups (each ask and withdrawal is a write that the
                // next rows would undo at once, and an asked writer pays a
                // NOTIFY).
                if !self.sleep(LINGER).await {
                    return self.stop_waiting(drain).await;
                }
                continue;
            }
            if !drain.waking && self.cfg.wake_ups {
                // About to wait: ask writers for a wake-up, then look once
                // more, since a row committed before they could see the
                // request did not NOTIFY.
                if let Err(error) = drain.session.set_wake(drain.db, true).await {
                    return Ended::Reconnect(error);
                }
                drain.waking = true;
                drain.unsure = Some(Unsure {
                    snapshot: None,
                    step: UNSURE_FIRST_STEP,
                });
                continue;
            }
            let mut wait = self.wait_for_rows(drain);
            if let Some(unsure) = drain.unsure.as_mut() {
                let snapshot = unsure
                    .snapshot
                    .get_or_insert_with(|| drain.position.drained.clone());
                match drain.session.still_running(drain.db, snapshot).await {
                    Ok(true) => {
                        wait = wait.min(unsure.step);
                        unsure.step = (unsure.step * 2).min(self.cfg.poll_interval.0);
                    }
                    Ok(false) => {
                        // They have ended: look once more, then wait.
                        drain.unsure = None;
                        continue;
                    }
                    Err(error) => return Ended::Reconnect(error),
                }
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
                _ = tokio::time::sleep(wait) => false,
            };
            if stop {
                return self.stop_waiting(drain).await;
            }
        }
    }

    /// How long an idle drainer sleeps without a wake-up: the poll
    /// interval, or less when a partition is due to be emptied.
    fn wait_for_rows(&self, drain: &Drain<'_>) -> std::time::Duration {
        match drain.rotation.leaving {
            Some(_) => self.cfg.poll_interval.0.min(TRUNCATE_RETRY),
            None => self.cfg.poll_interval.0,
        }
    }

    /// Hands the claimed rows to the loop, one transaction per row.
    async fn hand_over(
        &self,
        db: &Db,
        rows: &[drain::OutboxRow],
        captures: &mut Captures,
    ) -> Result<(), Ended> {
        for row in rows {
            let mut read = captures.decode(row, false);
            if read == Read::Stale {
                // ADD or DROP COLUMN on a whole-row table: read it again,
                // describe it again, and read the row anew.
                let (fresh, schemas) = Captures::read(db, &self.cfg, &self.rules)
                    .await
                    .map_err(Ended::Reconnect)?;
                *captures = fresh;
                for schema in schemas {
                    if !self.send(Ok(Event::Change(Change::Schema(schema)))).await {
                        return Err(Ended::Stop);
                    }
                }
                read = captures.decode(row, true);
            }
            let Read::Change(change) = read else {
                continue;
            };
            let txn = Txn {
                // Rows the drain reads are visible to any later snapshot
                // already.
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
                    return Err(Ended::Stop);
                }
            }
        }
        Ok(())
    }

    /// Stops; the wake-up request is withdrawn first, so writers do not
    /// NOTIFY for a drainer that is gone.
    async fn stop_waiting(&self, drain: &Drain<'_>) -> Ended {
        if drain.waking {
            let _ = drain.session.set_wake(drain.db, false).await;
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
