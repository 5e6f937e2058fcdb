//! Regular (non-replication) PostgreSQL connections: catalog checks,
//! `setup`, `status`. The only module that uses `tokio-postgres`.
//!
//! The connection URL is parsed once into [`ConnInfo`], which both this
//! module and the replication source use, so the two connections always
//! reach the same server as the same user.

pub(crate) mod catalog;
pub(crate) mod compare;
pub(crate) mod hosts;
pub mod query;
pub(crate) mod types;

use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use self::hosts::Endpoint;
use crate::secret::SecretUrl;
pub use crate::tls::SslMode;

/// Session settings for every connection, replication and regular: values
/// are rendered as text in one known format (ISO dates, UTC), the one the
/// JSON encoder converts and `to_jsonb` under PostgREST's defaults uses.
/// The replication session gets them as startup options; regular sessions
/// run [`SESSION_SETTINGS`] after connecting, because poolers (PgBouncer,
/// Supavisor) refuse or drop startup options.
pub const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres -c extra_float_digits=1";
/// The same settings as statements, and `synchronous_commit = local`: the
/// daemon's own writes (heartbeats, outbox deletions) never wait for a
/// synchronous standby, which may be this daemon.
const SESSION_SETTINGS: &str = "SET datestyle = 'ISO, MDY'; SET timezone = 'UTC'; \
     SET intervalstyle = 'postgres'; SET extra_float_digits = 1; \
     SET synchronous_commit = 'local';";

/// Where and as whom to connect, parsed from `[postgres] url`.
#[derive(Clone)]
pub struct ConnInfo {
    /// Host name, IP address, or a Unix socket directory (starts with `/`):
    /// the first of [`ConnInfo::endpoints`], or the one it was pinned to.
    pub host: String,
    /// TCP port (also names the Unix socket file), with `host`.
    pub port: u16,
    /// Every host of the URL, tried in order (see [`hosts`]).
    pub endpoints: Vec<Endpoint>,
    /// Whether the session must accept writes
    /// (`target_session_attrs=read-write`): standbys are passed over.
    pub read_write: bool,
    /// Role name.
    pub user: String,
    /// Password, empty for trust / peer authentication.
    pub password: String,
    /// Database name.
    pub dbname: String,
    /// TLS mode.
    pub sslmode: SslMode,
    /// CA certificate file for verifying the server.
    pub ssl_root_cert: Option<PathBuf>,
    /// The URL as given, to print redacted.
    url: SecretUrl,
    /// The hot standby that holds the slot (`replication.url`), when it is
    /// not the primary (see [`ConnInfo::slot_server`]).
    standby: Option<Box<ConnInfo>>,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnInfo({})", self.url.redacted())
    }
}

/// A URL that cannot be used, or a server that cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL is malformed or asks for something unsupported.
    #[error("postgres.url {url}: {reason}")]
    BadUrl {
        /// Redacted URL.
        url: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The connection ended.
    #[error("the postgres connection closed")]
    Closed,
    /// Every host that answered is a standby (a promotion under way).
    #[error("no host of postgres.url accepts writes ({standbys} are standbys): waiting for one to be promoted")]
    NoPrimary {
        /// The standbys, `host:port` each.
        standbys: String,
    },
    /// Decoded transactions did not become visible to new snapshots.
    #[error("{xids} decoded transaction(s) still not visible to new snapshots after {waited:?}")]
    NotVisible {
        /// How many.
        xids: usize,
        /// How long we waited.
        waited: std::time::Duration,
    },
    /// The server did not answer in time: the connection may have been
    /// dropped by the network without either end being told.
    #[error("{what}: no answer after {after:?} (a connection the network dropped silently?); reconnecting")]
    TimedOut {
        /// What was being done.
        what: &'static str,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// Connecting or a query failed.
    #[error("{context}: {source}")]
    Query {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl DbError {
    /// Wraps a driver error with what was being done.
    pub fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> DbError {
        let context = context.into();
        move |source| DbError::Query { context, source }
    }

    /// What the error policy says about this error.
    pub fn class(&self) -> crate::error::Class {
        match self {
            DbError::BadUrl { .. } => crate::error::Class::Definite {
                hint: "fix postgres.url",
                user_must_fix: true,
            },
            DbError::Closed
            | DbError::NoPrimary { .. }
            | DbError::NotVisible { .. }
            | DbError::TimedOut { .. } => crate::error::Class::Transient,
            DbError::Query { source, .. } => crate::error::postgres(source),
        }
    }
}

/// Runs `work` for at most `limit`. A query on a connection the network
/// dropped without a FIN or RST (a NAT or load balancer that forgot it)
/// would otherwise wait for TCP to give up, hours by default; the caller
/// drops the connection on this error and reconnects.
pub async fn within<T>(
    what: &'static str,
    limit: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or(Err(DbError::TimedOut { what, after: limit }))
}

impl DbError {
    /// The server's SQLSTATE, when the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Query { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// The error on one line for the user, with the server's own words
    /// when it answered.
    pub fn one_line(&self) -> String {
        match self {
            DbError::Query { context, source } => match source.as_db_error() {
                Some(db) => format!("{context}: {}", db.message()),
                None => format!("{context}: {}", error_chain(source)),
            },
            other => other.to_string(),
        }
    }
}

/// An error and its causes on one line: "a: b: c".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let next = inner.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = inner.source();
    }
    text
}

impl ConnInfo {
    /// Parses a `postgres://` URL. `sslmode` and `sslrootcert` are taken
    /// out before the rest is handed to the driver's parser, because the
    /// driver knows only disable / prefer / require. `ssl_root_cert` (the
    /// config key) wins over `sslrootcert` in the URL.
    pub fn parse(url: &SecretUrl, ssl_root_cert: Option<&Path>) -> Result<ConnInfo, DbError> {
        let bad = |reason: String| DbError::BadUrl {
            url: url.redacted(),
            reason: url.scrub(&reason),
        };
        let (stripped, sslmode, url_root_cert) = take_tls_params(url.expose()).map_err(bad)?;
        let ssl_root_cert = ssl_root_cert.map(Path::to_path_buf).or(url_root_cert);
        if let Some(path) = &ssl_root_cert {
            if !path.is_file() {
                return Err(bad(format!(
                    "ssl_root_cert {} is not a readable file",
                    path.display()
                )));
            }
        }
        let config = tokio_postgres::Config::from_str(&stripped)
            .map_err(|e| bad(format!("cannot parse: {e}")))?;
        let (endpoints, read_write) = hosts::endpoints(&config).map_err(bad)?;
        let Endpoint { host, port } = endpoints[0].clone();
        let user = config
            .get_user()
            .ok_or_else(|| bad("no user: write postgres://USER@HOST/DB".to_string()))?
            .to_string();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        if sslmode == SslMode::VerifyCa && ssl_root_cert.is_none() {
            return Err(bad(
                "sslmode=verify-ca needs the CA certificate: set postgres.ssl_root_cert"
                    .to_string(),
            ));
        }
        if sslmode != SslMode::Disable && endpoints.iter().any(|e| e.host.starts_with('/')) {
            return Err(bad(format!(
                "sslmode={} over a Unix socket: use sslmode=disable for socket connections",
                sslmode.as_str()
            )));
        }
        Ok(ConnInfo {
            host,
            port,
            endpoints,
            read_write,
            user,
            password,
            dbname,
            sslmode,
            ssl_root_cert,
            url: url.clone(),
            standby: None,
        })
    }

    /// The same primary, with the slot on the hot standby `url`
    /// (`replication.url`): one host, the same database. The standby's own
    /// `sslmode` applies; the CA certificate is `postgres.ssl_root_cert`.
    pub fn with_slot_on(mut self, url: &SecretUrl) -> Result<ConnInfo, DbError> {
        let standby =
            ConnInfo::parse(url, self.ssl_root_cert.as_deref()).map_err(|error| match error {
                DbError::BadUrl { url, reason } => DbError::BadUrl {
                    url: format!("(replication.url) {url}"),
                    reason,
                },
                other => other,
            })?;
        let bad = |reason: String| DbError::BadUrl {
            url: format!("(replication.url) {}", url.redacted()),
            reason,
        };
        if standby.endpoints.len() > 1 || standby.read_write {
            return Err(bad(
                "name the one standby that holds the slot (a single host, without target_session_attrs)".to_string(),
            ));
        }
        if standby.dbname != self.dbname {
            return Err(bad(format!(
                "database {:?} is not postgres.url's {:?}: a slot decodes one database; name the same one",
                standby.dbname, self.dbname
            )));
        }
        self.standby = Some(Box::new(standby));
        Ok(self)
    }

    /// Where the slot lives and is streamed from: the standby of
    /// `replication.url`, or this (the primary).
    pub fn slot_server(&self) -> &ConnInfo {
        self.standby.as_deref().unwrap_or(self)
    }

    /// Whether the slot lives on a standby (`replication.url`) rather than
    /// on the primary.
    pub fn decodes_on_standby(&self) -> bool {
        self.standby.is_some()
    }

    /// The URL with its password redacted, for logs.
    pub fn redacted(&self) -> String {
        self.url.redacted()
    }

    /// The same, reaching `endpoint` only.
    pub fn at(&self, endpoint: &Endpoint) -> ConnInfo {
        ConnInfo {
            host: endpoint.host.clone(),
            port: endpoint.port,
            endpoints: vec![endpoint.clone()],
            ..self.clone()
        }
    }

    /// The same, reaching `endpoint` whether or not it accepts writes (to
    /// ask a standby about itself).
    pub fn at_any(&self, endpoint: &Endpoint) -> ConnInfo {
        ConnInfo {
            read_write: false,
            ..self.at(endpoint)
        }
    }

    /// The same, pinned to the host that is the writable primary now (for
    /// a connection that must reach the same server as the regular ones,
    /// such as the replication session). With one host, that host.
    pub async fn primary(&self) -> Result<ConnInfo, DbError> {
        if self.endpoints.len() == 1 {
            return Ok(self.clone());
        }
        let db = Db::connect(self).await?;
        Ok(self.at(&db.endpoint))
    }

    fn driver_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("pg-cache-invalidator")
            .connect_timeout(std::time::Duration::from_secs(10));
        if !self.password.is_empty() {
            config.password(&self.password);
        }
        config
    }
}

type TlsParams = (String, SslMode, Option<PathBuf>);

fn take_tls_params(url: &str) -> Result<TlsParams, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), SslMode::Prefer, None));
    };
    let mut mode = SslMode::Prefer;
    let mut root_cert = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslrootcert", value)) => root_cert = Some(PathBuf::from(value)),
            Some(("sslmode", value)) => {
                mode = match value {
                    "disable" => SslMode::Disable,
                    "prefer" | "allow" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                        ))
                    }
                }
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, mode, root_cert))
}

/// A regular connection; the driver's connection task runs in the
/// background and ends when the client is dropped.
pub struct Db {
    client: tokio_postgres::Client,
    /// The host it reached.
    endpoint: Endpoint,
}

impl Db {
    /// Connects, with TLS as `sslmode` asks.
    pub async fn connect(info: &ConnInfo) -> Result<Db, DbError> {
        Db::open(info, None).await
    }

    /// Connects without listening: the receiver only ends when the
    /// connection does (for a drain that polls).
    pub async fn connect_watched(
        info: &ConnInfo,
    ) -> Result<(Db, tokio::sync::mpsc::Receiver<()>), DbError> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        Ok((Db::open(info, Some(tx)).await?, rx))
    }

    /// Connects and runs `LISTEN channel`; each notification on it sends
    /// `()` to the returned receiver (a wake-up, never the data itself).
    /// The receiver closes when the connection ends.
    pub async fn connect_listening(
        info: &ConnInfo,
        channel: &str,
    ) -> Result<(Db, tokio::sync::mpsc::Receiver<()>), DbError> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let db = Db::open(info, Some(tx)).await?;
        db.client
            .batch_execute(&format!("LISTEN {}", crate::sql::quote_ident(channel)))
            .await
            .map_err(DbError::query(format!("LISTEN {channel}")))?;
        Ok((db, rx))
    }

    /// Connects to the first host of `info` that answers and, with
    /// `target_session_attrs=read-write`, accepts writes.
    async fn open(
        info: &ConnInfo,
        wake: Option<tokio::sync::mpsc::Sender<()>>,
    ) -> Result<Db, DbError> {
        if info.endpoints.len() <= 1 && !info.read_write {
            return Db::open_one(info, wake).await;
        }
        let mut standbys = Vec::new();
        let mut last_error = None;
        for endpoint in &info.endpoints {
            let db = match Db::open_one(&info.at(endpoint), wake.clone()).await {
                Ok(db) => db,
                Err(error) if error.class() == crate::error::Class::Transient => {
                    last_error = Some(error);
                    continue;
                }
                Err(error) => return Err(error),
            };
            if info.read_write && db.read_only().await? {
                standbys.push(endpoint.to_string());
                continue;
            }
            return Ok(db);
        }
        match last_error {
            Some(error) if standbys.is_empty() => Err(error),
            _ => Err(DbError::NoPrimary {
                standbys: standbys.join(", "),
            }),
        }
    }

    /// Whether the session refuses writes (a standby, or a primary set
    /// `default_transaction_read_only`): what libpq's `read-write` asks.
    async fn read_only(&self) -> Result<bool, DbError> {
        let row = self
            .client
            .query_one("SHOW transaction_read_only", &[])
            .await
            .map_err(DbError::query("asking whether the server accepts writes"))?;
        Ok(row.get::<_, String>(0) == "on")
    }

    /// The host this connection reached.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Connects to `info`'s (first) host (plain or TLS), drives the
    /// connection in the background (forwarding notifications to `wake` if
    /// given), and pins the session settings.
    async fn open_one(
        info: &ConnInfo,
        wake: Option<tokio::sync::mpsc::Sender<()>>,
    ) -> Result<Db, DbError> {
        let context = || format!("cannot connect to {}", info.redacted());
        let mut config = info.driver_config();
        let client = if info.sslmode == SslMode::Disable {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(DbError::query(context()))?;
            drive(connection, wake);
            client
        } else {
            let tls = crate::tls::client_config(info.sslmode, info.ssl_root_cert.as_deref())
                .map_err(|reason| DbError::BadUrl {
                    url: info.redacted(),
                    reason,
                })?;
            config.ssl_mode(if info.sslmode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let (client, connection) = config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map_err(DbError::query(context()))?;
            drive(connection, wake);
            client
        };
        client
            .batch_execute(SESSION_SETTINGS)
            .await
            .map_err(DbError::query("pinning session settings"))?;
        Ok(Db {
            client,
            endpoint: Endpoint {
                host: info.host.clone(),
                port: info.port,
            },
        })
    }

    /// The driver's client, for the modules of `db`.
    pub(crate) fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// Runs SQL text (several statements allowed), returning nothing.
    pub async fn execute_batch(&self, sql: &str) -> Result<(), DbError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(DbError::query(format!("running {}", first_line(sql))))
    }
}

/// Runs a connection in the background until it ends, turning
/// notifications into wake-ups when `wake` is given.
fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    wake: Option<tokio::sync::mpsc::Sender<()>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    if let Some(wake) = &wake {
                        let _ = wake.try_send(());
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(error = %error, "postgres connection closed");
                    break;
                }
            }
        }
    });
}

fn first_line(sql: &str) -> &str {
    sql.lines()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
        .unwrap_or(sql)
        .trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_sslmode() {
        let info = ConnInfo::parse(
            &SecretUrl::new(
                "postgres://app:p%40ss@db.local:6543/main?sslmode=disable&application_name=x",
            ),
            None,
        )
        .expect("valid");
        assert_eq!(info.host, "db.local");
        assert_eq!(info.port, 6543);
        assert_eq!(info.user, "app");
        assert_eq!(info.password, "p@ss");
        assert_eq!(info.dbname, "main");
        assert_eq!(info.sslmode, SslMode::Disable);
        assert!(!format!("{info:?}").contains("p%40ss"));
    }

    #[test]
    fn the_slot_may_live_on_one_standby_of_the_same_database() {
        let primary =
            ConnInfo::parse(&SecretUrl::new("postgres://app@db-a/main"), None).expect("valid");
        assert!(!primary.decodes_on_standby());
        assert_eq!(primary.slot_server().host, "db-a");
        let both = primary
            .clone()
            .with_slot_on(&SecretUrl::new("postgres://repl:secret@db-b:5433/main"))
            .expect("valid");
        assert!(both.decodes_on_standby());
        assert_eq!(both.host, "db-a");
        assert_eq!(
            (both.slot_server().host.as_str(), both.slot_server().port),
            ("db-b", 5433)
        );
        for (url, expected) in [
            (
                "postgres://app:secret@b1,b2/main?target_session_attrs=read-write",
                "a single host",
            ),
            (
                "postgres://app:secret@db-b/other",
                "a slot decodes one database",
            ),
            ("postgres://db-b/main", "no user"),
        ] {
            let err = primary
                .clone()
                .with_slot_on(&SecretUrl::new(url))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("replication.url") && err.contains(expected),
                "{err}"
            );
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn rejects_unknown_sslmode_and_missing_user() {
        let err = ConnInfo::parse(
            &SecretUrl::new("postgres://a:secret@h/d?sslmode=maybe"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslmode=maybe"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        assert!(ConnInfo::parse(&SecretUrl::new("postgres://h/d"), None).is_err());
        let err = ConnInfo::parse(&SecretUrl::new("postgres://a@h/d?sslmode=verify-ca"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ssl_root_cert"), "{err}");
        let err = ConnInfo::parse(
            &SecretUrl::new("postgres://a@h/d?sslmode=verify-full&sslrootcert=/no/such/file"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/no/such/file"), "{err}");
    }
}
