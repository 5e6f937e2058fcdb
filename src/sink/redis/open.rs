//! Opening the Redis target: connect (retried until Redis answers or
//! shutdown), refuse a server too old for the commands the daemon sends,
//! and load the lease functions app readers call; and a new connection
//! when the node turned replica (READONLY).

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::{RedisSink, CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::error::{self, Fatal, GiveUp, Pace, Retry};
use crate::redis::cluster::ClusterConn;
use crate::redis::conn::Conn;
use crate::redis::{leases, server};
use crate::secret::SecretUrl;
use crate::sink::{SinkError, SinkStats};
use crate::telemetry::health::TargetHealth;
use crate::telemetry::metrics as m;

impl RedisSink {
    /// Connects, retrying until Redis answers or shutdown is requested.
    /// With `cluster` seeds (`url` among them), `url` names one node of a
    /// Redis Cluster.
    pub async fn connect(
        url: &SecretUrl,
        ca_cert: Option<&std::path::Path>,
        cluster: Option<&[SecretUrl]>,
        channel: &str,
        cancel: CancellationToken,
        health: TargetHealth,
    ) -> Result<RedisSink, SinkError> {
        let client = crate::redis::client(url, ca_cert)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Pace::REDIS.max)
            // One attempt per call: the loop below retries, and logs and
            // reports each failure as it happens (the manager's own retries
            // would keep the first one silent for seconds).
            .set_number_of_retries(0);
        let mut retry = Retry::until_shutdown(&Pace::REDIS, &cancel);
        let conn = loop {
            let attempt = match cluster {
                None => ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map(Conn::Node),
                Some(seeds) => {
                    let seeds: Vec<&str> = seeds.iter().map(|s| s.expose()).collect();
                    ClusterConn::connect(&seeds, CONNECT_TIMEOUT, RESPONSE_TIMEOUT)
                        .await
                        .map(Conn::Cluster)
                }
            };
            match attempt {
                Ok(conn) => break conn,
                Err(error) => {
                    let what = format!("{}: {error}", url.redacted());
                    let delay = match retry.after(&what, error::redis(&error)) {
                        Ok(delay) => delay,
                        Err(GiveUp::Fatal(fatal)) => return Err(SinkError::Fatal(fatal)),
                        Err(_) => return Err(SinkError::GaveUp(error.to_string())),
                    };
                    metrics::counter!(m::RECONNECTS_TOTAL, "target" => "redis").increment(1);
                    let shown = url.scrub(&error.to_string());
                    health.failing(&format!(
                        "cannot connect to redis at {}: {shown}",
                        url.redacted()
                    ));
                    tracing::warn!(error = %shown, url = %url.redacted(), retry_in = ?delay, "cannot connect to redis; retrying");
                    if retry.sleep(delay).await.is_err() {
                        return Err(SinkError::GaveUp(error.to_string()));
                    }
                }
            }
        };
        tracing::info!(url = %url.redacted(), "connected to redis");
        let mut conn = conn;
        // A server too old for the commands the daemon sends would fail
        // every batch: refuse it now, once.
        let mut server_version = None;
        if let Ok(info) = redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut conn)
            .await
        {
            if let Some(version) = server::ServerInfo::parse(&info).version {
                if !server::new_enough(&version) {
                    return Err(SinkError::Fatal(Fatal {
                        what: format!("redis {version} at {}", url.redacted()),
                        hint: "the daemon needs Redis 6.2 or newer (or Valkey): upgrade the server",
                        user_must_fix: true,
                    }));
                }
                server_version = Some(version);
            }
        }
        // Every master of a cluster holds the functions (its replicas get
        // them by replication).
        let loaded = match conn.each_master().await {
            Ok(masters) => {
                let mut loaded = Ok(Vec::new());
                for mut master in masters {
                    match (leases::load(&mut master).await, &mut loaded) {
                        (Ok(how), Ok(hows)) => hows.push(how),
                        (Err(error), _) => loaded = Err(error),
                        _ => {}
                    }
                }
                loaded
            }
            Err(error) => Err(error),
        };
        match loaded {
            Ok(how) => {
                let how: Vec<String> = how.iter().map(ToString::to_string).collect();
                tracing::info!(loaded = %how.join(", "), "lease functions loaded for app readers")
            }
            // Readers load them themselves when missing; the daemon's own
            // work does not need them.
            Err(error) => tracing::warn!(error = %url.scrub(&error.to_string()),
                "cannot load the lease functions; readers using leases will load them themselves"),
        }
        health.ok();
        Ok(RedisSink {
            conn,
            client,
            config,
            logged: Vec::new(),
            record: None,
            events: (!channel.is_empty()).then(|| super::events::Announcer::new(channel)),
            cancel,
            stats: SinkStats::default(),
            health,
            counts_metrics: true,
            steps: 0,
            fence: false,
            server_version,
        })
    }

    /// Opens a new connection in place of the current one (which answers
    /// from a node that is no longer the primary, or does not answer at
    /// all); `why` is logged.
    pub(super) async fn reconnect(&mut self, why: &str) {
        if self.conn.is_cluster() {
            // The cluster client reads the slot map again itself.
            return;
        }
        match ConnectionManager::new_with_config(self.client.clone(), self.config.clone()).await {
            Ok(conn) => {
                metrics::counter!(m::RECONNECTS_TOTAL, "target" => "redis").increment(1);
                tracing::info!("reconnected to redis {why}");
                self.conn = Conn::Node(conn);
            }
            Err(error) => tracing::warn!(error = %error, "cannot reconnect to redis; retrying"),
        }
    }
}
