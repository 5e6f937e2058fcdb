//! Classification: an error of each client (tokio-postgres, the
//! replication transport, redis, rustls under them) into a [`Class`].
//! The only module of the daemon that reads those clients' error types.

use pgwire_replication::PgWireError;
use redis::{ErrorKind as RedisKind, RedisError, ServerErrorKind};

use super::Class;

/// What `pg_replication_slots` says about our slot, for telling a lost
/// slot from other "object not found / not ready" errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotHealth {
    /// The slot exists and can be read.
    Usable,
    /// The slot does not exist.
    Missing,
    /// The slot exists but its WAL was removed (`wal_status = 'lost'`, or an
    /// `invalidation_reason` from PostgreSQL 17 on).
    Invalidated,
    /// The catalog could not be asked (the connection failed too).
    Unknown,
}

/// SQLSTATEs and what they mean for us, in one table. Classes not listed
/// (`08` connection exceptions, `57P0x` shutdowns, `53` resources, `40`
/// serialization) are transient.
const SQLSTATES: &[(&str, Class)] = &[
    (
        "28P01",
        Class::fix("check the user and password in postgres.url"),
    ),
    (
        "28000",
        Class::fix("check the user and password in postgres.url, and that pg_hba.conf allows this connection (and replication connections)"),
    ),
    (
        "3D000",
        Class::fix("the database in postgres.url does not exist: fix the URL"),
    ),
    (
        "42501",
        Class::fix("the role lacks a privilege: grant it (the replication source needs ALTER ROLE ... WITH REPLICATION; see sql/)"),
    ),
    (
        "42704",
        Class::fix("the replication slot or publication does not exist: run pg-cache-invalidator setup"),
    ),
    (
        "55000",
        Class::fix("the server cannot stream: set wal_level = logical and restart PostgreSQL, then check the slot with pg-cache-invalidator status"),
    ),
];

/// SQLSTATE classes (first two characters) that retrying can fix.
const TRANSIENT_SQLSTATE_CLASSES: &[&str] = &["08", "53", "57", "40", "58"];

/// The class of a PostgreSQL SQLSTATE we know; `None` for the others,
/// whose meaning depends on the connection (see [`postgres`] and
/// [`replication`]).
pub fn sqlstate(code: &str) -> Option<Class> {
    if let Some((_, class)) = SQLSTATES.iter().find(|(c, _)| *c == code) {
        return Some(*class);
    }
    // 55006: the slot is held by another session (a standby waits its turn).
    (code == "55006"
        || TRANSIENT_SQLSTATE_CLASSES
            .iter()
            .any(|c| code.starts_with(c)))
    .then_some(Class::Transient)
}

/// Classifies an error of a regular PostgreSQL connection. Server errors
/// whose SQLSTATE is not in the table stop: a refused statement would be
/// refused again.
pub fn postgres(error: &tokio_postgres::Error) -> Class {
    if let Some(code) = error.code() {
        // A statement the server refuses for another reason would be
        // refused again.
        return sqlstate(code.code()).unwrap_or(Class::broken(
            "the server refused a statement: see the message",
        ));
    }
    if error.is_closed() {
        return Class::Transient;
    }
    match io_source(error) {
        Some(io) => io_class(io),
        // No code and no I/O underneath: a protocol or configuration
        // error of the driver, which a retry would meet again.
        None => Class::broken("the postgres driver failed: see the message"),
    }
}

/// Classifies a replication transport error. `slot` is what the catalog
/// says about the slot; it is asked only when [`may_mean_slot_lost`].
pub fn replication(error: &PgWireError, slot: SlotHealth) -> Class {
    match error {
        PgWireError::Auth(_) => return Class::fix("check the user and password in postgres.url"),
        // The transport reports handshake failures as text only. The
        // regular connection, which `run` opens first with the same TLS
        // settings, has already passed certificate verification, so a
        // handshake failing here is a reset or timeout: retry.
        PgWireError::Tls(_) => return Class::Transient,
        PgWireError::Io(io) => return io_class(io),
        _ => {}
    }
    let Some(code) = replication_sqlstate(error) else {
        // Protocol, task and internal errors: the session is reopened.
        return Class::Transient;
    };
    if may_mean_slot_lost(error) {
        match slot {
            SlotHealth::Missing | SlotHealth::Invalidated => return Class::PositionLost,
            SlotHealth::Unknown => return Class::Transient,
            SlotHealth::Usable => {}
        }
    }
    // Other server errors end the session; the stream resumes from the
    // slot on the next one.
    sqlstate(code).unwrap_or(Class::Transient)
}

/// Whether `error` could mean the slot is gone, so that the catalog should
/// be asked before classifying it: "undefined object" (42704) and "object
/// not in prerequisite state" (55000, an invalidated slot on 15 to 18).
pub fn may_mean_slot_lost(error: &PgWireError) -> bool {
    matches!(replication_sqlstate(error), Some("42704" | "55000"))
}

/// The SQLSTATE of a server error reported by the replication transport,
/// which puts it into its message as `(SQLSTATE xxxxx)`. The only place
/// that reads it.
pub fn replication_sqlstate(error: &PgWireError) -> Option<&str> {
    let PgWireError::Server(text) = error else {
        return None;
    };
    let start = text.find("SQLSTATE ")? + "SQLSTATE ".len();
    let code = text.get(start..start + 5)?;
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric())
        .then_some(code)
}

/// The kind and code of the error that matters: for a pipeline or a
/// transaction (EXECABORT), the first command the server refused.
fn redis_cause(error: &RedisError) -> (RedisKind, Option<String>) {
    let first = error
        .clone()
        .into_server_errors()
        .and_then(|errors| errors.first().map(|(_, e)| e.clone()));
    match first {
        Some(first) => (
            first.kind().map_or(RedisKind::Extension, RedisKind::Server),
            Some(first.code().to_string()),
        ),
        None => (error.kind(), error.code().map(str::to_string)),
    }
}

/// Classifies a Redis error.
pub fn redis(error: &RedisError) -> Class {
    match redis_cause(error).0 {
        RedisKind::AuthenticationFailed | RedisKind::Server(ServerErrorKind::NoPerm) => {
            Class::fix("check the user and password in redis.url and the user's ACL (it needs UNLINK, SET, GET, EVALSHA, SCAN and PUBLISH)")
        }
        RedisKind::InvalidClientConfig => Class::fix("check redis.url"),
        // Everything else, including scripts refused under memory pressure,
        // is retried: the batch is held until Redis takes it.
        _ => Class::Transient,
    }
}

/// What kind of Redis failure an attempt met: the label of
/// `pgci_redis_errors_total`, the log line's `kind`, what readiness says
/// and what the operator can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailure {
    /// Down, unreachable, a timeout, a dropped connection.
    Io,
    /// The node became a replica (`READONLY`).
    ReadOnly,
    /// Loading its dataset (`LOADING`).
    Loading,
    /// The script cache was flushed (`NOSCRIPT`).
    NoScript,
    /// A transaction refused as a whole (`EXECABORT`).
    ExecAbort,
    /// Slots moving, a failover, a replica behind.
    Cluster,
    /// The password or the ACL.
    Auth,
    /// A reply the client cannot read.
    Reply,
    /// Out of memory under `noeviction` (`OOM`).
    Oom,
    /// A key of another type (`WRONGTYPE`).
    WrongType,
    /// Cannot save its snapshot (`MISCONF`).
    Misconf,
    /// Anything else.
    Other,
}

impl RedisFailure {
    /// Classifies `error` (for a transaction, by its first refused command).
    pub fn of(error: &RedisError) -> RedisFailure {
        if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
            return RedisFailure::Io;
        }
        let (kind, code) = redis_cause(error);
        match kind {
            RedisKind::Server(ServerErrorKind::ReadOnly) => RedisFailure::ReadOnly,
            RedisKind::Server(ServerErrorKind::BusyLoading) => RedisFailure::Loading,
            RedisKind::Server(ServerErrorKind::NoScript) => RedisFailure::NoScript,
            RedisKind::Server(ServerErrorKind::ExecAbort) => RedisFailure::ExecAbort,
            RedisKind::Server(
                ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown,
            )
            | RedisKind::ClusterConnectionNotFound => RedisFailure::Cluster,
            RedisKind::AuthenticationFailed | RedisKind::Server(ServerErrorKind::NoPerm) => {
                RedisFailure::Auth
            }
            RedisKind::Parse | RedisKind::UnexpectedReturnType => RedisFailure::Reply,
            _ => match code.as_deref() {
                Some("OOM") => RedisFailure::Oom,
                Some("WRONGTYPE") => RedisFailure::WrongType,
                Some("MISCONF") => RedisFailure::Misconf,
                _ => RedisFailure::Other,
            },
        }
    }

    /// The bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisFailure::Io => "io",
            RedisFailure::ReadOnly => "readonly",
            RedisFailure::Loading => "loading",
            RedisFailure::NoScript => "noscript",
            RedisFailure::ExecAbort => "execabort",
            RedisFailure::Cluster => "cluster",
            RedisFailure::Auth => "auth",
            RedisFailure::Reply => "reply",
            RedisFailure::Oom => "oom",
            RedisFailure::WrongType => "wrongtype",
            RedisFailure::Misconf => "misconf",
            RedisFailure::Other => "other",
        }
    }

    /// What an operator can do about it.
    pub fn hint(self) -> &'static str {
        match self {
            RedisFailure::Io => "redis is down or unreachable; the batch is retried until it answers",
            RedisFailure::ReadOnly => "the node became a replica (a failover): reconnecting; point redis.url at the primary endpoint",
            RedisFailure::Loading => "redis is loading its dataset; it answers once loaded",
            RedisFailure::Cluster => "the cluster is moving slots, failing over, or a replica is behind: the slot map is read again and the batch retried",
            RedisFailure::NoScript => "the script cache was flushed; the next attempt loads the script again",
            RedisFailure::Oom => "redis is out of memory under a noeviction policy: set maxmemory-policy allkeys-lru (or volatile-lru) or raise maxmemory",
            RedisFailure::WrongType => "a key the rules write holds another type (a hash, a list): delete that key or change the key template",
            RedisFailure::Misconf => "redis cannot save its snapshot and refuses writes: fix its disk or persistence settings",
            RedisFailure::ExecAbort | RedisFailure::Auth | RedisFailure::Reply | RedisFailure::Other => {
                "see the error; the batch is retried"
            }
        }
    }

    /// What `/readyz` says while attempts fail this way.
    pub fn readiness(self) -> String {
        match self {
            RedisFailure::Io => "redis is not answering".to_string(),
            kind => format!(
                "redis refuses the batch ({}): {}",
                kind.as_str(),
                kind.hint()
            ),
        }
    }
}

fn io_source<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cause = current.source();
    }
    None
}

/// Only a certificate the client refuses is definite; resets, timeouts,
/// refused connections, DNS failures and unreachable networks during
/// connect or the TLS handshake are retried (a restart, a proxy blip, a
/// network still coming up at boot).
fn io_class(io: &std::io::Error) -> Class {
    let certificate = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::UnsupportedNameType
            )
        });
    if certificate {
        return Class::fix(
            "the server's certificate was refused: check sslmode and the CA certificate (ssl_root_cert)",
        );
    }
    Class::Transient
}

/// Whether `error` says the network or host cannot be reached (no route).
pub fn is_unreachable(error: &(dyn std::error::Error + 'static)) -> bool {
    io_source(error).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::NetworkUnreachable | std::io::ErrorKind::HostUnreachable
        )
    })
}

/// What to say when a host that has only IPv6 addresses cannot be reached
/// (Supabase's direct connection from a network without IPv6).
pub const IPV6_ONLY_HINT: &str = "the host has only IPv6 addresses and this network cannot reach them: use an IPv4 address (Supabase's IPv4 add-on), or source = \"outbox\" through the IPv4 pooler";

#[cfg(test)]
mod tests {
    use super::*;

    fn server(text: &str) -> PgWireError {
        PgWireError::Server(text.to_string())
    }

    fn kind(class: Class) -> &'static str {
        match class {
            Class::Transient => "transient",
            Class::Definite {
                user_must_fix: true,
                ..
            } => "fix",
            Class::Definite { .. } => "broken",
            Class::PositionLost => "lost",
        }
    }

    #[test]
    fn replication_errors_by_code_and_slot_state() {
        use SlotHealth::*;
        let io = PgWireError::Io(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        let cases: &[(PgWireError, SlotHealth, &str)] = &[
            (
                server("replication slot \"x\" does not exist (SQLSTATE 42704)"),
                Missing,
                "lost",
            ),
            (
                server("publication \"p\" does not exist (SQLSTATE 42704)"),
                Usable,
                "fix",
            ),
            (
                server("cannot read from logical replication slot \"x\" (SQLSTATE 55000)"),
                Invalidated,
                "lost",
            ),
            (
                server("can no longer access replication slot \"x\" (SQLSTATE 55000)"),
                Invalidated,
                "lost",
            ),
            (
                server("logical decoding requires wal_level >= logical (SQLSTATE 55000)"),
                Usable,
                "fix",
            ),
            (server("whatever (SQLSTATE 55000)"), Unknown, "transient"),
            (
                server("replication slot \"x\" is active for PID 12 (SQLSTATE 55006)"),
                Usable,
                "transient",
            ),
            (
                server("terminating connection due to administrator command (SQLSTATE 57P01)"),
                Usable,
                "transient",
            ),
            (
                server("the database system is starting up (SQLSTATE 57P03)"),
                Usable,
                "transient",
            ),
            (
                server("password authentication failed (SQLSTATE 28P01)"),
                Usable,
                "fix",
            ),
            (
                server("permission denied to start WAL sender (SQLSTATE 42501)"),
                Usable,
                "fix",
            ),
            (
                server("database \"nope\" does not exist (SQLSTATE 3D000)"),
                Usable,
                "fix",
            ),
            (server("no code at all"), Usable, "transient"),
            (PgWireError::Auth("bad".into()), Usable, "fix"),
            (
                PgWireError::Tls("TLS handshake failed: connection reset".into()),
                Usable,
                "transient",
            ),
            (
                PgWireError::Task("replication stream ended".into()),
                Usable,
                "transient",
            ),
            (io, Usable, "transient"),
        ];
        for (error, slot, want) in cases {
            assert_eq!(
                kind(replication(error, *slot)),
                *want,
                "{error} with {slot:?}"
            );
        }
        assert!(may_mean_slot_lost(&server("x (SQLSTATE 42704)")));
        assert!(!may_mean_slot_lost(&server("x (SQLSTATE 57P01)")));
        assert_eq!(replication_sqlstate(&server("x (SQLSTATE 5")), None);
    }

    #[test]
    fn sqlstates_and_io_kinds() {
        for (code, want) in [
            ("57P01", "transient"),
            ("08006", "transient"),
            ("53300", "transient"),
            ("40001", "transient"),
            ("28P01", "fix"),
            ("3D000", "fix"),
        ] {
            assert_eq!(sqlstate(code).map(kind), Some(want), "{code}");
        }
        use std::io::{Error, ErrorKind as K};
        for (io, want) in [
            (Error::from(K::ConnectionRefused), "transient"),
            (Error::from(K::TimedOut), "transient"),
            (Error::from(K::UnexpectedEof), "transient"),
            (Error::from(K::InvalidData), "transient"),
            (Error::from(K::NetworkUnreachable), "transient"),
            (Error::from(K::ConnectionReset), "transient"),
            (
                Error::other("failed to lookup address information"),
                "transient",
            ),
            (
                Error::other(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                "fix",
            ),
            (
                Error::other(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                )),
                "fix",
            ),
            (
                Error::other(rustls::Error::AlertReceived(
                    rustls::AlertDescription::HandshakeFailure,
                )),
                "transient",
            ),
        ] {
            assert_eq!(kind(io_class(&io)), want, "{io:?}");
        }
    }

    #[test]
    fn redis_error_labels() {
        let io: RedisError = std::io::Error::from(std::io::ErrorKind::BrokenPipe).into();
        assert_eq!(RedisFailure::of(&io), RedisFailure::Io);
        let readonly: RedisError = (RedisKind::Server(ServerErrorKind::ReadOnly), "ro").into();
        assert_eq!(RedisFailure::of(&readonly).as_str(), "readonly");
        assert!(RedisFailure::Oom.hint().contains("maxmemory-policy"));
        assert!(RedisFailure::Oom
            .readiness()
            .starts_with("redis refuses the batch (oom): "));
    }

    #[test]
    fn redis_errors_by_kind() {
        let io: RedisError = std::io::Error::from(std::io::ErrorKind::BrokenPipe).into();
        assert_eq!(kind(redis(&io)), "transient");
        let auth: RedisError = (RedisKind::AuthenticationFailed, "denied").into();
        assert_eq!(kind(redis(&auth)), "fix");
        let loading: RedisError =
            (RedisKind::Server(ServerErrorKind::BusyLoading), "loading").into();
        assert_eq!(kind(redis(&loading)), "transient");
        let readonly: RedisError = (RedisKind::Server(ServerErrorKind::ReadOnly), "ro").into();
        assert_eq!(kind(redis(&readonly)), "transient");
    }
}
