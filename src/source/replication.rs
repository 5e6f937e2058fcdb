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
//! The transport reports the confirmed LSN to the server at most once per
//! [`STATUS_INTERVAL`] and never on its own at shutdown, so
//! [`ReplicationSource::shutdown`] waits until the last confirmation has gone
//! out. A lost connection or a terminated walsender is transient: the session
//! is reopened with capped exponential backoff and the server resumes from
//! the slot's confirmed LSN, re-sending any transaction that was not
//! confirmed. Errors that retrying cannot fix (no slot, bad password) stop
//! the daemon with a hint.

use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{
    PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use tokio::time::Instant;

use std::sync::Arc;

use crate::db::{ConnInfo, SslMode};
use crate::lsn::Lsn;
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// Prefix of the heartbeat messages the daemon writes with
/// `pg_logical_emit_message`; the content is the writer's Unix time in
/// microseconds.
pub const HEARTBEAT_PREFIX: &str = "pg-cache-invalidator.heartbeat";

/// How often confirmed progress is reported to the server. Short, so that
/// `pg_replication_slots` is current and a shutdown waits little for its
/// final report; each report is one 34-byte message.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// First reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay: long enough not to hammer a server that is
/// restarting, short enough that a standby takes over quickly.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long opening a session may take before it counts as failed.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the stream delivers, in order.
#[derive(Debug)]
pub enum SourceEvent {
    /// A new session started. A transaction that was open is re-sent whole.
    Restarted,
    /// A transaction begins.
    Begin {
        /// Its transaction id (32 bits, as pgoutput sends it).
        xid: u32,
        /// LSN of its commit record (events name changes by it).
        commit_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time_micros: i64,
    },
    /// One raw pgoutput message (Relation, Insert, Update, Delete, …).
    Change(Bytes),
    /// The transaction ends; `end_lsn` is what to confirm once it is applied.
    Commit {
        /// LSN just past the commit record.
        end_lsn: Lsn,
    },
    /// The server's position while nothing is being sent: safe to confirm
    /// when no transaction is open and everything before it is applied.
    KeepAlive {
        /// Position the server has decoded up to.
        wal_end: Lsn,
    },
    /// One of our heartbeat messages arrived.
    Heartbeat {
        /// When it was written, Unix microseconds.
        sent_unix_micros: i64,
    },
    /// The slot is gone or was invalidated: changes were missed. The next
    /// `next()` reconnects, so the slot must exist again by then.
    SlotLost {
        /// What the server said.
        reason: String,
    },
}

/// A failure that retrying will not fix.
#[derive(Debug, thiserror::Error)]
#[error("replication: {message}: {hint}")]
pub struct FatalSourceError {
    message: String,
    hint: &'static str,
}

/// A replication session that reopens itself.
pub struct ReplicationSource {
    info: ConnInfo,
    slot: String,
    publication: String,
    client: Option<ReplicationClient>,
    /// Highest LSN confirmed so far; handed to every new session.
    confirmed: Lsn,
    backoff: Duration,
    /// When the next connection attempt may start (survives cancellation
    /// of `next()` by the pipeline's `select!`).
    retry_at: Option<Instant>,
    /// Whether the current session has delivered an event yet: backoff is
    /// reset only then, so a server that accepts and at once fails is not
    /// retried in a tight loop.
    session_healthy: bool,
    health: Arc<Health>,
    /// Set when the last failure was a lost slot, reported once by `next()`.
    slot_lost: Option<String>,
    /// A session being opened (see `next()`).
    opening: Option<tokio::task::JoinHandle<Result<ReplicationClient, PgWireError>>>,
}

impl ReplicationSource {
    /// A source for `slot` / `publication`; connects on the first `next()`.
    pub fn new(info: ConnInfo, slot: String, publication: String, health: Arc<Health>) -> Self {
        ReplicationSource {
            info,
            slot,
            publication,
            client: None,
            confirmed: Lsn::ZERO,
            backoff: BACKOFF_MIN,
            retry_at: None,
            session_healthy: false,
            health,
            slot_lost: None,
            opening: None,
        }
    }

    /// The next event. Transient failures are retried inside; only a fatal
    /// one is returned. Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Result<SourceEvent, FatalSourceError> {
        loop {
            if let Some(reason) = self.slot_lost.take() {
                self.retry_at = None;
                return Ok(SourceEvent::SlotLost { reason });
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
                let opening = self.opening.get_or_insert_with(|| tokio::spawn(open(cfg)));
                let opened = opening.await;
                self.opening = None;
                let opened = opened.unwrap_or_else(|e| {
                    Err(PgWireError::Task(format!("opening the stream failed: {e}")))
                });
                match opened {
                    Ok(client) => {
                        if self.confirmed > Lsn::ZERO {
                            client.update_applied_lsn(pgwire_replication::Lsn::from_u64(
                                self.confirmed.0,
                            ));
                        }
                        tracing::info!(slot = %self.slot, confirmed_lsn = %self.confirmed, "replication stream started");
                        self.client = Some(client);
                        self.session_healthy = false;
                        self.health.set_streaming(true);
                        return Ok(SourceEvent::Restarted);
                    }
                    Err(error) => {
                        self.fail(error)?;
                        continue;
                    }
                }
            };
            let event = match client.recv().await {
                Ok(Some(event)) => event,
                Ok(None) => {
                    self.fail(PgWireError::Task("replication stream ended".into()))?;
                    continue;
                }
                Err(error) => {
                    self.fail(error)?;
                    continue;
                }
            };
            if !self.session_healthy {
                self.session_healthy = true;
                self.backoff = BACKOFF_MIN;
            }
            let mapped = match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    xid,
                } => SourceEvent::Begin {
                    xid,
                    commit_lsn: Lsn(final_lsn.as_u64()),
                    commit_time_micros,
                },
                ReplicationEvent::XLogData { data, .. } => SourceEvent::Change(data),
                ReplicationEvent::Commit { end_lsn, .. } => SourceEvent::Commit {
                    end_lsn: Lsn(end_lsn.as_u64()),
                },
                ReplicationEvent::KeepAlive { wal_end, .. } => SourceEvent::KeepAlive {
                    wal_end: Lsn(wal_end.as_u64()),
                },
                ReplicationEvent::Message {
                    prefix, content, ..
                } if prefix == HEARTBEAT_PREFIX => {
                    match std::str::from_utf8(&content)
                        .ok()
                        .and_then(|t| t.parse().ok())
                    {
                        Some(sent_unix_micros) => SourceEvent::Heartbeat { sent_unix_micros },
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
        let deadline = Instant::now() + STATUS_INTERVAL * 3;
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
        let root = self.info.ssl_root_cert.clone();
        match self.info.sslmode {
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

    fn replication_config(&self) -> ReplicationConfig {
        ReplicationConfig::new(
            self.info.host.clone(),
            self.info.user.clone(),
            self.info.password.clone(),
            self.info.dbname.clone(),
            self.slot.clone(),
            self.publication.clone(),
        )
        .with_port(self.info.port)
        .with_tls(self.tls())
        .with_start_lsn(pgwire_replication::Lsn::ZERO)
        .with_status_interval(STATUS_INTERVAL)
        .with_application_name("pg-cache-invalidator")
        .with_options(crate::db::SESSION_OPTIONS)
    }

    /// Drops the session and schedules a retry, or returns the error if no
    /// retry can fix it.
    fn fail(&mut self, error: PgWireError) -> Result<(), FatalSourceError> {
        if let Some(mut client) = self.client.take() {
            client.abort();
        }
        self.health.set_streaming(false);
        metrics::counter!(m::RECONNECTS_TOTAL, "target" => "postgres").increment(1);
        let text = error.to_string();
        if slot_is_lost(&text) {
            tracing::error!(slot = %self.slot, error = %text,
                "replication slot is missing or invalidated: changes were missed");
            self.slot_lost = Some(text);
            return Ok(());
        }
        if let Some(fatal) = classify(&error, &text) {
            return Err(fatal);
        }
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.retry_at = Some(Instant::now() + delay);
        if sqlstate(&text) == Some("55006") {
            tracing::info!(slot = %self.slot, retry_in = ?delay,
                "replication slot is in use by another session; waiting to take over");
        } else {
            tracing::warn!(error = %text, retry_in = ?delay, "replication stream failed; reconnecting");
        }
        Ok(())
    }
}

/// Connects and waits until the server accepted START_REPLICATION.
async fn open(cfg: ReplicationConfig) -> Result<ReplicationClient, PgWireError> {
    let mut client = ReplicationClient::connect(cfg).await?;
    match tokio::time::timeout(OPEN_TIMEOUT, client.wait_started()).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(PgWireError::Task(format!(
                "START_REPLICATION not accepted within {OPEN_TIMEOUT:?}"
            )))
        }
    }
    Ok(client)
}

/// The one place that decides retry vs stop for the replication stream.
fn classify(error: &PgWireError, text: &str) -> Option<FatalSourceError> {
    let fatal = |hint| {
        Some(FatalSourceError {
            message: text.to_string(),
            hint,
        })
    };
    if matches!(error, PgWireError::Auth(_)) {
        return fatal("check the user and password in postgres.url");
    }
    if matches!(error, PgWireError::Tls(_)) {
        return fatal("check sslmode and ssl_root_cert");
    }
    match sqlstate(text) {
        Some("42704") => fatal("the replication slot or publication does not exist: run pg-cache-invalidator setup"),
        Some("28P01" | "28000") => fatal("check the user and password in postgres.url, and that pg_hba.conf allows replication connections"),
        Some("42501") => fatal("the role needs the REPLICATION attribute (ALTER ROLE ... WITH REPLICATION)"),
        Some("3D000") => fatal("the database in postgres.url does not exist"),
        Some("55000") if text.contains("wal_level") => fatal("set wal_level = logical and restart PostgreSQL"),
        _ => None,
    }
}

/// Whether the server says our slot no longer exists or can no longer be
/// read (invalidated by `max_slot_wal_keep_size`).
fn slot_is_lost(text: &str) -> bool {
    (sqlstate(text) == Some("42704") && text.contains("replication slot"))
        || text.contains("cannot read from logical replication slot")
        || text.contains("can no longer get changes from replication slot")
        || text.contains("has been invalidated")
}

fn sqlstate(text: &str) -> Option<&str> {
    let start = text.find("SQLSTATE ")? + "SQLSTATE ".len();
    text.get(start..start + 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        let missing =
            PgWireError::Server("replication slot \"x\" does not exist (SQLSTATE 42704)".into());
        assert!(classify(&missing, &missing.to_string()).is_some());
        let busy = PgWireError::Server(
            "replication slot \"x\" is active for PID 12 (SQLSTATE 55006)".into(),
        );
        assert!(classify(&busy, &busy.to_string()).is_none());
        let terminated = PgWireError::Server(
            "terminating connection due to administrator command (SQLSTATE 57P01)".into(),
        );
        assert!(classify(&terminated, &terminated.to_string()).is_none());
        let io = PgWireError::Io(std::sync::Arc::new(std::io::Error::other("reset")));
        assert!(classify(&io, &io.to_string()).is_none());
        assert!(slot_is_lost(&missing.to_string()));
        let publication = "publication \"p\" does not exist (SQLSTATE 42704)";
        assert!(!slot_is_lost(publication));
        assert!(slot_is_lost(
            "cannot read from logical replication slot \"x\" (SQLSTATE 55000)"
        ));
    }
}
