//! The `replication` source: a logical replication session on our slot,
//! kept alive across failures. The only module that uses
//! `pgwire-replication`.
//!
//! ```text
//!   PostgreSQL walsender ──pgoutput──▶ transport worker ──▶ next() ──▶ pipeline
//!          ▲                                                             │
//!          └──── standby status (confirmed LSN) ◀──── confirm(lsn) ◀─────┘
//! ```
//!
//! The transport reports the confirmed LSN to the server within
//! [`STATUS_INTERVAL`] of each confirmation (coalesced: never more often;
//! [`SYNC_STATUS_INTERVAL`] while `synchronous_standby_names` may make
//! commits wait for this daemon, since each report is what releases one),
//! and never on its own at shutdown, so
//! [`ReplicationSource::shutdown`] waits until the last confirmation has gone
//! out. A lost connection or a terminated walsender is transient: the session
//! is reopened with capped exponential backoff and the server resumes from
//! the slot's confirmed LSN, re-sending any transaction that was not
//! confirmed. Errors that retrying cannot fix (bad password, no
//! publication) stop the daemon with a hint; a slot that the catalog says
//! is gone or invalidated is reported as [`Event::PositionLost`] (see
//! [`crate::error::replication`]).
//!
//! The session opens on the server that holds the slot: the primary, or
//! the hot standby of `replication.url` ([`ConnInfo::slot_server`]), where
//! the origin, the slot's health and its rebuild are asked too.
//!
//! pgoutput messages are decoded here ([`crate::decode::pgoutput`]) and
//! handed on as the neutral [`Change`] model.

pub(crate) mod drift;
pub(crate) mod drift_watch;
pub(crate) mod install;
pub(crate) mod origin;
pub(crate) mod slot;

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{
    FeedbackObserver, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
    TlsConfig,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::origin::{Origin, OriginStore, Since};
use self::slot::ServerView;
use crate::change::{Change, Column, Row, RowOp, TableName, TableSchema, Value};
use crate::db::{catalog, ConnInfo, Db, Endpoint, SslMode};
use crate::decode::pgoutput::{self, Datum, Message, Tuple};
use crate::error::{self, Backoff, Class, Fatal, Pace, SlotHealth};
use crate::lsn::Lsn;
use crate::source::{Event, Source, Txn};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// Prefix of the heartbeat messages the daemon writes with
/// `pg_logical_emit_message`; the content is the writer's Unix time in
/// microseconds.
pub const HEARTBEAT_PREFIX: &str = "pg-cache-invalidator.heartbeat";

/// The shortest time between two reports of the confirmed position to the
/// server. A confirmation arriving later than that after the last report
/// goes out at once; one arriving sooner waits for the timer, whose ticks
/// are a millisecond apart (so up to 2 ms). Under load, reports coalesce
/// to at most one per interval (1,000/s of 39-byte messages).
pub const STATUS_INTERVAL: Duration = Duration::from_millis(1);
/// [`STATUS_INTERVAL`] while `synchronous_standby_names` may make commits
/// wait for this daemon: each report releases a waiting commit, and one
/// writer committing back to back confirms about once a millisecond, so at
/// 1 ms half its commits waited for the timer (benchmark `sync-commit`:
/// p50 1.8–2.0 ms, p99 3.5 ms; at 100 µs 0.8–0.9 and 1.8–2.0 ms). The
/// transport also reports at every read from the socket once this much
/// has passed, so the walsender spends about 13 % more CPU at 5,000
/// rows/s: only a daemon that commits wait for pays it.
pub const SYNC_STATUS_INTERVAL: Duration = Duration::from_micros(100);
/// How long a shutdown waits for the final confirmation to be reported.
const FINAL_REPORT_WAIT: Duration = Duration::from_secs(3);
/// How long ending a session to reopen it may take.
const END_WAIT: Duration = Duration::from_secs(5);
/// How long opening a session may take before it counts as failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest opening a session may take as a whole (connecting, reading
/// the server's history, START_REPLICATION) before it is tried again.
const OPEN_LIMIT: Duration = Duration::from_secs(60);
/// The longest asking the catalog about the slot or the publication after
/// a failure may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the session tells the server where it is while the stream is
/// idle (otherwise it does at every message): the server hears from a
/// live session at least this often.
const IDLE_FEEDBACK: Duration = Duration::from_secs(10);
/// A session the server holding the slot has not heard from for this long
/// (three idle reports), or that no longer holds the slot, is gone, though
/// its connection was never closed: a NAT or load balancer dropped it
/// without a FIN or RST, and TCP alone would take hours to notice. It is
/// replaced. Needs heartbeats (`replication.heartbeat_interval`), which
/// read the server's view.
const UNHEARD_LIMIT: Duration = Duration::from_secs(30);

/// A replication session that reopens itself.
pub struct ReplicationSource {
    info: ConnInfo,
    slot: String,
    publication: String,
    client: Option<ReplicationClient>,
    /// Highest LSN confirmed so far; handed to every new session.
    confirmed: Lsn,
    /// Reconnect waits: long enough not to hammer a server that is
    /// restarting, short enough that a standby takes over quickly.
    backoff: Backoff,
    /// When the next connection attempt may start (survives cancellation
    /// of `next()` by the pipeline's `select!`).
    retry_at: Option<Instant>,
    /// Whether the current session has delivered an event yet: backoff is
    /// reset only then, so a server that accepts and at once fails is not
    /// retried in a tight loop.
    session_healthy: bool,
    /// When the server sent the newest change message (its clock,
    /// microseconds since 2000): a commit's delay inside PostgreSQL is
    /// measured against the send time of its last change (see
    /// [`m::STREAM_SEND_DELAY_SECONDS`]).
    last_sent_micros: i64,
    health: Arc<Health>,
    /// Set when the last failure was a lost slot, reported once by `next()`.
    slot_lost: Option<String>,
    /// Messages the transport buffers (its buffer counts messages, not
    /// bytes; each is a whole row).
    buffer_messages: usize,
    /// The connection's `application_name` (`replication.application_name`).
    application_name: String,
    /// A session being opened (see `next()`).
    opening: Option<tokio::task::JoinHandle<Result<Opened, PgWireError>>>,
    /// A failed session's error, waiting for the catalog's answers before
    /// it is classified (see [`Failing`]).
    failing: Option<Failing>,
    /// The server and timeline of the last session (see [`origin`]).
    origin: Option<Origin>,
    /// Where the origin is kept across restarts, if anywhere.
    store: Option<Arc<dyn OriginStore>>,
    /// Whether the stored origin was read (once, with the first session).
    store_read: bool,
    /// What the store holds, as far as this daemon knows.
    stored: Option<Origin>,
    /// The server's view of the session, from the heartbeats (see
    /// [`UNHEARD_LIMIT`]).
    server_view: Option<watch::Receiver<Option<ServerView>>>,
    /// When the current session started.
    session_started: Instant,
    /// Whether commits could wait for the current session when it opened
    /// (it then reports every [`SYNC_STATUS_INTERVAL`]).
    waited_for: bool,
}

/// A session that failed with an error that may mean the slot is lost,
/// and the catalog questions that tell (asked in their own task, kept
/// across calls like an opening session: the pipeline's `select!` drops
/// `next()` at least once a second, and a question dropped with it left
/// the error unclassified, so a slot lost while the catalog took longer
/// than that to answer was never recreated).
struct Failing {
    error: PgWireError,
    /// `None`: the error cannot mean the slot is lost; nothing to ask.
    asking: Option<tokio::task::JoinHandle<Answers>>,
}

/// What the catalog said about a failed session's slot and publication.
#[derive(Debug, Clone, Copy)]
struct Answers {
    slot: SlotHealth,
    /// Whether the publication exists (asked only for "undefined object"
    /// from a usable slot; `None`: not asked or not answered).
    publication_exists: Option<bool>,
}

/// A session just opened: where, and on which server history.
struct Opened {
    client: ReplicationClient,
    endpoint: Endpoint,
    origin: Origin,
    /// See [`ReplicationSource::waited_for`].
    waited_for: bool,
    /// The stored origin, when it was asked for.
    stored: Option<Origin>,
}

impl ReplicationSource {
    /// A source for `slot` / `publication`; connects on the first `next()`.
    pub fn new(info: ConnInfo, slot: String, publication: String, health: Arc<Health>) -> Self {
        ReplicationSource {
            buffer_messages: crate::config::DEFAULT_BUFFER_MESSAGES,
            info,
            slot,
            publication,
            client: None,
            confirmed: Lsn::ZERO,
            backoff: Backoff::new(&Pace::POSTGRES),
            retry_at: None,
            session_healthy: false,
            last_sent_micros: 0,
            health,
            slot_lost: None,
            application_name: crate::config::DEFAULT_APPLICATION_NAME.to_string(),
            opening: None,
            failing: None,
            origin: None,
            store: None,
            store_read: false,
            stored: None,
            server_view: None,
            session_started: Instant::now(),
            waited_for: false,
        }
    }

    /// Replaces a session the server no longer hears from, as `view` (the
    /// heartbeats' reading) tells.
    pub fn with_server_view(mut self, view: watch::Receiver<Option<ServerView>>) -> Self {
        self.server_view = Some(view);
        self
    }

    /// Keeps the origin in `store` across restarts (see [`origin`]).
    pub fn with_origin_store(mut self, store: Arc<dyn OriginStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Names the connection `name` (see `replication.application_name`).
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.application_name = name.to_string();
        self
    }

    /// Buffers `messages` rows in the transport (see
    /// `replication.buffer_messages`).
    pub fn with_buffer(mut self, messages: usize) -> Self {
        self.buffer_messages = messages;
        self
    }

    /// The next event. Transient failures are retried inside; only a fatal
    /// one is returned. Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Result<Event<Lsn>, Fatal> {
        loop {
            if let Some(failing) = self.failing.as_mut() {
                let answers = match failing.asking.as_mut() {
                    // Awaited by reference: dropping this future keeps the task.
                    Some(asking) => asking.await.unwrap_or(Answers {
                        slot: SlotHealth::Unknown,
                        publication_exists: None,
                    }),
                    None => Answers {
                        slot: SlotHealth::Usable,
                        publication_exists: None,
                    },
                };
                let error = self.failing.take().map(|f| f.error);
                if let Some(error) = error {
                    self.classify(error, answers)?;
                }
                continue;
            }
            if let Some(reason) = self.slot_lost.take() {
                self.retry_at = None;
                // The slot is rebuilt on whatever server answers next and
                // every rule key flushed: its history starts there.
                self.origin = None;
                return Ok(Event::PositionLost { reason });
            }
            let Some(client) = self.client.as_mut() else {
                if let Some(at) = self.retry_at {
                    tokio::time::sleep_until(at).await;
                }
                // Opening runs in its own task, kept across calls: if the
                // pipeline's select! drops this future mid-handshake, the
                // half-open session is not abandoned (it would hold the slot
                // and make the next attempt fail with "slot is active").
                let cfg = self.replication_config();
                let application = self.application_name.clone();
                let info = self.info.clone();
                let store = (!self.store_read).then(|| self.store.clone()).flatten();
                let opening = self.opening.get_or_insert_with(|| {
                    tokio::spawn(async move {
                        // Bounded as a whole: any of its connections may be
                        // one the network drops silently.
                        tokio::time::timeout(OPEN_LIMIT, open(info, cfg, application, store))
                            .await
                            .unwrap_or_else(|_| {
                                Err(PgWireError::Task(format!(
                                    "opening the stream took longer than {OPEN_LIMIT:?} (a connection the network dropped silently?)"
                                )))
                            })
                    })
                });
                let opened = opening.await;
                self.opening = None;
                let opened = opened.unwrap_or_else(|e| {
                    Err(PgWireError::Task(format!("opening the stream failed: {e}")))
                });
                match opened {
                    Ok(Opened {
                        mut client,
                        endpoint,
                        origin,
                        waited_for,
                        stored,
                    }) => {
                        if !self.store_read && self.store.is_some() {
                            // The first session compares with what the last
                            // run streamed from.
                            self.store_read = true;
                            self.stored = stored;
                            self.origin = self.origin.or(stored);
                        }
                        match self.origin.map(|seen| seen.then(origin)) {
                            None | Some(Since::Same) => {}
                            Some(Since::Trusted(why)) => {
                                metrics::counter!(m::SERVER_CHANGES_TOTAL).increment(1);
                                tracing::warn!(slot = %self.slot, host = %endpoint, reason = %why,
                                    "the database behind the slot was promoted");
                            }
                            Some(Since::Lost(why)) => {
                                // Never resume from a slot whose history may
                                // lack what was confirmed: rebuild and flush.
                                client.abort();
                                self.origin = Some(origin);
                                metrics::counter!(m::SERVER_CHANGES_TOTAL).increment(1);
                                tracing::error!(slot = %self.slot, host = %endpoint, reason = %why,
                                    "the database behind the slot changed; treating the slot as lost");
                                self.slot_lost = Some(why);
                                continue;
                            }
                        }
                        self.origin = Some(origin);
                        if self.stored != Some(origin) {
                            self.stored = Some(origin);
                            if let Some(store) = self.store.clone() {
                                tokio::spawn(async move { store.save(origin.to_record()).await });
                            }
                        }
                        if self.confirmed > Lsn::ZERO {
                            client.update_applied_lsn(pgwire_replication::Lsn::from_u64(
                                self.confirmed.0,
                            ));
                        }
                        tracing::info!(slot = %self.slot, confirmed_lsn = %self.confirmed, host = %endpoint,
                            reports_every = ?report_interval(waited_for), "replication stream started");
                        self.client = Some(client);
                        self.waited_for = waited_for;
                        self.session_started = Instant::now();
                        self.session_healthy = false;
                        self.health.set_streaming(true);
                        return Ok(Event::Restarted);
                    }
                    Err(error) => {
                        self.fail(error);
                        continue;
                    }
                }
            };
            let received = tokio::select! {
                received = client.recv() => Ok(received),
                says = view_says(self.server_view.as_mut(), self.session_started, self.waited_for) => Err(says),
            };
            let received = match received {
                Ok(received) => received,
                Err(ViewSays::Unheard(why)) => {
                    metrics::counter!(m::STREAM_SILENT_TOTAL).increment(1);
                    self.fail(PgWireError::Task(why));
                    continue;
                }
                Err(ViewSays::WaitedFor(waited_for)) => {
                    tracing::info!(slot = %self.slot, waited_for, reports_every = ?report_interval(waited_for),
                        "synchronous_standby_names changed: reopening the stream to report confirmations at the matching pace");
                    self.end_session().await;
                    continue;
                }
            };
            let event = match received {
                Ok(Some(event)) => event,
                Ok(None) => {
                    self.fail(PgWireError::Task("replication stream ended".into()));
                    continue;
                }
                Err(error) => {
                    self.fail(error);
                    continue;
                }
            };
            if !self.session_healthy {
                self.session_healthy = true;
                self.backoff.reset();
            }
            let mapped = match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    xid,
                } => {
                    self.last_sent_micros = 0;
                    Event::Begin(Txn {
                        xid,
                        lsn: Lsn(final_lsn.as_u64()),
                        commit_time_micros,
                        fixed_seq: None,
                    })
                }
                ReplicationEvent::XLogData {
                    data,
                    server_time_micros,
                    ..
                } => {
                    self.last_sent_micros = server_time_micros;
                    let message = pgoutput::decode(&data).map_err(|error| Fatal {
                        what: format!("cannot decode the change stream: {error}"),
                        hint:
                            "this is a bug or a protocol change: report it with the server version",
                        user_must_fix: false,
                    })?;
                    match change_of(message) {
                        Some(change) => Event::Change(change),
                        None => continue,
                    }
                }
                ReplicationEvent::Commit {
                    end_lsn,
                    commit_time_micros,
                    ..
                } => {
                    record_send_delay(commit_time_micros, self.last_sent_micros);
                    Event::Commit {
                        ack: Some(Lsn(end_lsn.as_u64())),
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    Event::Position(Lsn(wal_end.as_u64()))
                }
                ReplicationEvent::Message {
                    prefix, content, ..
                } if prefix == HEARTBEAT_PREFIX => {
                    match std::str::from_utf8(&content)
                        .ok()
                        .and_then(|t| t.parse().ok())
                    {
                        Some(sent_unix_micros) => Event::Heartbeat { sent_unix_micros },
                        None => continue,
                    }
                }
                ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => continue,
            };
            return Ok(mapped);
        }
    }

    /// Records that everything before `lsn` is applied; the transport
    /// reports it within [`STATUS_INTERVAL`].
    pub fn confirm(&mut self, lsn: Lsn) {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            metrics::gauge!(m::CONFIRMED_LSN_BYTES).set(lsn.0 as f64);
            if let Some(client) = &self.client {
                client.update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
            }
        }
    }

    /// The highest LSN confirmed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Forgets confirmations made against a slot that was replaced: the
    /// new slot starts where it was created.
    pub fn reset_confirmed(&mut self) {
        self.confirmed = Lsn::ZERO;
    }

    /// The newest server WAL position seen on the stream.
    pub fn server_wal_end(&self) -> Option<Lsn> {
        self.client
            .as_ref()
            .map(|c| Lsn(c.metrics().last_wal_end().as_u64()))
    }

    /// Waits (bounded) until the server has been told the last confirmed
    /// LSN, then ends the session cleanly.
    pub async fn shutdown(mut self) {
        let Some(mut client) = self.client.take() else {
            return;
        };
        let metrics = client.metrics();
        let deadline = Instant::now() + FINAL_REPORT_WAIT;
        while metrics.last_applied_lsn().as_u64() < self.confirmed.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reported = Lsn(metrics.last_applied_lsn().as_u64());
        if reported < self.confirmed {
            tracing::warn!(confirmed_lsn = %self.confirmed, reported_lsn = %reported,
                "final confirmation did not reach the server; the tail will be replayed on restart");
        } else {
            tracing::info!(confirmed_lsn = %self.confirmed, "final confirmation reported");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    }

    /// The transport's TLS settings for our `sslmode`.
    fn tls(&self) -> TlsConfig {
        let server = self.info.slot_server();
        let root = server.ssl_root_cert.clone();
        match server.sslmode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::disabled()
            },
            SslMode::Require if root.is_some() => TlsConfig::verify_ca(root),
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(root),
            SslMode::VerifyFull => TlsConfig::verify_full(root),
        }
    }

    /// The session's settings, for the server that holds the slot (the
    /// primary, or the standby of `replication.url`).
    fn replication_config(&self) -> ReplicationConfig {
        let server = self.info.slot_server();
        ReplicationConfig::new(
            server.host.clone(),
            server.user.clone(),
            server.password.clone(),
            server.dbname.clone(),
            self.slot.clone(),
            self.publication.clone(),
        )
        .with_port(server.port)
        .with_tls(self.tls())
        .with_start_lsn(pgwire_replication::Lsn::ZERO)
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(IDLE_FEEDBACK)
        .with_feedback_observer(FeedbackObserver::new(|sent| {
            metrics::histogram!(m::CONFIRM_REPORT_WAIT_SECONDS)
                .record(sent.pending_for.as_secs_f64());
        }))
        .with_buffer_size(self.buffer_messages)
        .with_application_name(self.application_name.clone())
        .with_options(crate::db::SESSION_OPTIONS)
    }

    /// Ends the session cleanly, so its walsender lets go of the slot at
    /// once, for the next `next()` to open another straight away (what was
    /// not confirmed yet is sent again).
    async fn end_session(&mut self) {
        if let Some(mut client) = self.client.take() {
            let _ = tokio::time::timeout(END_WAIT, client.shutdown()).await;
        }
        self.health.set_streaming(false);
    }

    /// Drops the session; an error that may mean the slot is lost has the
    /// catalog asked (in a task, see [`Failing`]); `next()` classifies it.
    fn fail(&mut self, error: PgWireError) {
        if let Some(mut client) = self.client.take() {
            client.abort();
        }
        self.health.set_streaming(false);
        metrics::counter!(m::RECONNECTS_TOTAL, "target" => "postgres").increment(1);
        let asking = error::may_mean_slot_lost(&error).then(|| {
            let (info, slot, publication) = (
                self.info.clone(),
                self.slot.clone(),
                self.publication.clone(),
            );
            let undefined = error::replication_sqlstate(&error) == Some("42704");
            tokio::spawn(async move {
                // Bounded: its connection may be one the network drops.
                let slot =
                    tokio::time::timeout(ASK_TIMEOUT, slot::health(info.slot_server(), &slot))
                        .await
                        .unwrap_or(SlotHealth::Unknown);
                let publication_exists = match slot == SlotHealth::Usable && undefined {
                    true => tokio::time::timeout(
                        ASK_TIMEOUT,
                        slot::publication_exists(&info, &publication),
                    )
                    .await
                    .ok()
                    .flatten(),
                    false => None,
                };
                Answers {
                    slot,
                    publication_exists,
                }
            })
        });
        self.failing = Some(Failing { error, asking });
    }

    /// Schedules a retry after a failed session, or returns the error if
    /// no retry can fix it. A lost slot is remembered for `next()` to
    /// report.
    fn classify(&mut self, error: PgWireError, answers: Answers) -> Result<(), Fatal> {
        let slot = answers.slot;
        let text = error.to_string();
        // "Undefined object" from a usable slot: the publication. Present,
        // it was dropped and created again; the walsender looks it up as of
        // each change, so the slot can never decode past that point (every
        // start failed the same way): rebuild the slot like a lost one,
        // which flushes every key. Missing, a migration that drops and
        // creates it again may be half way: wait for it, not ready, rather
        // than exit; once it is back, the slot is rebuilt as above.
        if slot == SlotHealth::Usable && error::replication_sqlstate(&error) == Some("42704") {
            match answers.publication_exists {
                Some(true) => {
                    tracing::error!(slot = %self.slot, publication = %self.publication, error = %text,
                        "the publication was dropped and created again after changes the slot still holds: they cannot be decoded; recreating the slot");
                    self.slot_lost = Some(format!(
                        "publication {} was recreated: {text}",
                        self.publication
                    ));
                    return Ok(());
                }
                Some(false) => {
                    let delay = self.backoff.next_delay();
                    self.retry_at = Some(Instant::now() + delay);
                    tracing::error!(slot = %self.slot, publication = %self.publication, error = %text, retry_in = ?delay,
                        "the publication does not exist (dropped?): waiting for it to be created again (pg-cache-invalidator setup creates it)");
                    return Ok(());
                }
                None => {}
            }
        }
        match error::replication(&error, slot) {
            Class::PositionLost => {
                tracing::error!(slot = %self.slot, error = %text,
                    "replication slot is missing or invalidated: changes were missed");
                self.slot_lost = Some(text);
                return Ok(());
            }
            class @ Class::Definite { .. } => {
                if let Some(fatal) = Fatal::from_class(format!("replication: {text}"), class) {
                    return Err(fatal);
                }
            }
            Class::Transient => {}
        }
        let delay = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        if error::replication_sqlstate(&error) == Some("55006") {
            tracing::info!(slot = %self.slot, retry_in = ?delay,
                "replication slot is in use by another session; waiting to take over");
        } else {
            tracing::warn!(error = %text, retry_in = ?delay, "replication stream failed; reconnecting");
        }
        Ok(())
    }
}

impl Source for ReplicationSource {
    type Ack = Lsn;

    async fn next(&mut self) -> Result<Event<Lsn>, Fatal> {
        ReplicationSource::next(self).await
    }

    fn confirm(&mut self, ack: Lsn) {
        ReplicationSource::confirm(self, ack);
    }

    /// Recreates the slot first, then forgets old confirmations: a change
    /// committed after the flush the loop plans next is in the new slot.
    async fn recover(&mut self, cancel: &CancellationToken) -> Option<Lsn> {
        let start = slot::recreate(&self.info, &self.slot, cancel).await?;
        self.reset_confirmed();
        Some(start)
    }

    fn recorded(ack: Lsn) -> Option<Lsn> {
        Some(ack)
    }

    fn tick(&self) {
        if let Some(end) = self.server_wal_end() {
            let lag = end.0.saturating_sub(self.confirmed.0);
            metrics::gauge!(m::REPLICATION_LAG_BYTES).set(lag as f64);
        }
    }

    async fn shutdown(self) {
        ReplicationSource::shutdown(self).await;
    }
}

/// What the heartbeats' reading of the server asks of the session.
enum ViewSays {
    /// It is gone though never closed: replace it (the reason).
    Unheard(String),
    /// Whether commits may wait for this daemon changed to this: reopen at
    /// the matching [`report_interval`].
    WaitedFor(bool),
}

/// How often a session reports its confirmations (see
/// [`SYNC_STATUS_INTERVAL`]).
fn report_interval(waited_for: bool) -> Duration {
    match waited_for {
        true => SYNC_STATUS_INTERVAL,
        false => STATUS_INTERVAL,
    }
}

/// Resolves once the server holding the slot, read after the session had
/// been open for [`UNHEARD_LIMIT`], says it has not heard from the session
/// for that long, or that no session holds the slot; or once a reading
/// taken after the session opened disagrees with `waited_for` (the
/// session's pace, see [`SYNC_STATUS_INTERVAL`]). Never without `view`.
async fn view_says(
    view: Option<&mut watch::Receiver<Option<ServerView>>>,
    session_started: Instant,
    waited_for: bool,
) -> ViewSays {
    let Some(view) = view else {
        return std::future::pending().await;
    };
    loop {
        let seen = *view.borrow_and_update();
        if let Some(seen) = seen.filter(|s| s.checked_at > session_started.into_std()) {
            if seen.waited_for != waited_for {
                return ViewSays::WaitedFor(seen.waited_for);
            }
        }
        if let Some(seen) =
            seen.filter(|s| s.checked_at > (session_started + UNHEARD_LIMIT).into_std())
        {
            match seen.unheard_for {
                None => {
                    return ViewSays::Unheard("the server says no session streams the slot, yet this one was never closed (the network dropped it?); reconnecting".to_string())
                }
                Some(unheard) if unheard >= UNHEARD_LIMIT => {
                    return ViewSays::Unheard(format!(
                        "the server has not heard from this session for {}s, yet it was never closed (the network dropped it?); reconnecting",
                        unheard.as_secs()
                    ))
                }
                Some(_) => {}
            }
        }
        if view.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Records how long a transaction spent inside PostgreSQL between its
/// commit and the server sending it (both on the server's clock, so the
/// daemon's clock does not matter): the WAL flush, the walsender waiting
/// for CPU or reading through a backlog. Subtracted from
/// [`m::APPLY_LATENCY_SECONDS`] it leaves the daemon's and Redis's part.
/// `last_sent` is the send time of the transaction's last change message
/// (0: none, nothing is recorded).
fn record_send_delay(commit_time_micros: i64, last_sent_micros: i64) {
    if last_sent_micros == 0 || commit_time_micros == 0 {
        return;
    }
    let delay = (last_sent_micros - commit_time_micros).max(0) as f64 / 1e6;
    metrics::histogram!(m::STREAM_SEND_DELAY_SECONDS).record(delay);
}

/// The neutral change a pgoutput message carries, if any (Begin and
/// Commit arrive decoded by the transport; Type, Origin and messages
/// inside transactions carry nothing to plan).
fn change_of(message: Message) -> Option<Change> {
    Some(match message {
        Message::Relation(relation) => Change::Schema(TableSchema {
            id: relation.oid,
            name: TableName {
                schema: relation.namespace,
                name: relation.name,
            },
            identity: Some(
                relation
                    .columns
                    .iter()
                    .filter(|c| c.is_identity)
                    .map(|c| c.name.clone())
                    .collect(),
            ),
            columns: relation
                .columns
                .into_iter()
                .map(|c| Column {
                    name: c.name,
                    type_oid: c.type_oid,
                })
                .collect(),
        }),
        Message::Insert { relation, new } => Change::Row {
            table: relation,
            op: RowOp::Insert,
            old: None,
            new: Some(row_of(new)),
        },
        Message::Update { relation, old, new } => Change::Row {
            table: relation,
            op: RowOp::Update,
            old: old.map(|(_, tuple)| row_of(tuple)),
            new: Some(row_of(new)),
        },
        Message::Delete { relation, old } => Change::Row {
            table: relation,
            op: RowOp::Delete,
            old: Some(row_of(old.1)),
            new: None,
        },
        Message::Truncate { relations, .. } => Change::Truncate { tables: relations },
        Message::Begin { .. }
        | Message::Commit { .. }
        | Message::Origin { .. }
        | Message::Type { .. }
        | Message::Emitted { .. } => return None,
    })
}

/// A pgoutput tuple as a row. Binary values never come (the binary option
/// is off); were one to, it counts as a value that did not travel, which
/// only ever makes the planner delete instead of write.
fn row_of(tuple: Tuple) -> Row {
    tuple
        .into_iter()
        .map(|datum| match datum {
            Datum::Null => Value::Null,
            Datum::Text(bytes) => Value::Text(bytes),
            Datum::UnchangedToast | Datum::Binary(_) => Value::Unchanged,
        })
        .collect()
}

/// Connects and waits until the server accepted START_REPLICATION.
/// A regular connection's error met while opening a session, as the
/// stream's error policy reads it: the SQLSTATE kept where there is one.
fn as_stream_error(error: &crate::db::DbError) -> PgWireError {
    match error.sqlstate() {
        Some(code) => PgWireError::Server(format!("{} (SQLSTATE {code})", error.one_line())),
        None => PgWireError::Task(error.one_line()),
    }
}

/// Opens a session on the writable primary among `info`'s hosts (see
/// [`crate::db::hosts`]), or on the standby that holds the slot
/// (`replication.url`); returns it with the host it reached.
async fn open(
    info: ConnInfo,
    mut cfg: ReplicationConfig,
    application_name: String,
    store: Option<Arc<dyn OriginStore>>,
) -> Result<Opened, PgWireError> {
    if !info.decodes_on_standby() && info.endpoints.len() > 1 {
        // The same server the regular connections reach; its errors keep
        // their SQLSTATE for the error policy.
        let primary = info
            .primary()
            .await
            .map_err(|error| as_stream_error(&error))?;
        cfg.host = primary.host;
        cfg.port = primary.port;
    }
    let endpoint = Endpoint {
        host: cfg.host.clone(),
        port: cfg.port,
    };
    // Never stream without knowing which history the slot is on (see
    // [`origin`]): a session whose origin cannot be read is retried.
    let (origin, waited_for) = async {
        let server = match info.decodes_on_standby() {
            true => info.slot_server().clone(),
            false => info.at(&endpoint),
        };
        let db = Db::connect(&server).await?;
        let origin = Origin::read(&db, &cfg.slot).await?;
        // A slot on a standby cannot release the primary's commits.
        let waited_for = !info.decodes_on_standby()
            && install::may_wait_for(
                &catalog::setting(&db, "synchronous_standby_names").await?,
                &application_name,
            );
        Ok::<_, crate::db::DbError>((origin, waited_for))
    }
    .await
    .map_err(|error| as_stream_error(&error))?;
    cfg.status_interval = report_interval(waited_for);
    let mut client = ReplicationClient::connect(cfg).await?;
    match tokio::time::timeout(OPEN_TIMEOUT, client.wait_started()).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(PgWireError::Task(format!(
                "START_REPLICATION not accepted within {OPEN_TIMEOUT:?}"
            )))
        }
    }
    let stored = match store {
        Some(store) => store.load().await.as_deref().and_then(Origin::parse),
        None => None,
    };
    Ok(Opened {
        client,
        endpoint,
        origin,
        waited_for,
        stored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::pgoutput::{OldTupleKind, Relation, RelationColumn};
    use bytes::Bytes;

    #[test]
    fn pgoutput_messages_become_neutral_changes() {
        let relation = Relation {
            oid: 7,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![RelationColumn {
                is_identity: true,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            }],
        };
        let Some(Change::Schema(schema)) = change_of(Message::Relation(relation)) else {
            panic!("schema")
        };
        assert_eq!(schema.name.to_string(), "public.t");
        assert_eq!(schema.columns[0].type_oid, 23);
        let old = vec![Datum::Text(Bytes::from_static(b"1")), Datum::UnchangedToast];
        let change = change_of(Message::Delete {
            relation: 7,
            old: (OldTupleKind::Key, old),
        });
        assert_eq!(
            change,
            Some(Change::Row {
                table: 7,
                op: RowOp::Delete,
                old: Some(vec![
                    Value::Text(Bytes::from_static(b"1")),
                    Value::Unchanged
                ]),
                new: None,
            })
        );
        assert_eq!(
            change_of(Message::Type {
                oid: 1,
                namespace: "s".into(),
                name: "n".into()
            }),
            None
        );
    }
}
