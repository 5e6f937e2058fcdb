//! What the Redis server says about itself: `INFO`, read every
//! `[redis] info_interval` into `pgci_redis_…` metrics, and the checks the
//! caching plan asks for (an LRU eviction policy under a memory limit,
//! snapshots for recovery, an 80 % hit ratio), reported as warnings by
//! `check-config`, `status` and the daemon's start-up.
//!
//! Only `INFO` is required: managed services (ElastiCache, MemoryDB) refuse
//! `CONFIG GET`, so the RDB save schedule, the one thing `INFO` does not
//! say, is read with `CONFIG GET save` when allowed and otherwise reported
//! as unknown, once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::cluster::ClusterConn;
use super::conn::Conn;
use crate::secret::SecretUrl;
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// The hit ratio the caching plan targets.
pub const HIT_RATIO_TARGET: f64 = 0.80;
/// Lookups since the restart below which the hit ratio says nothing yet.
const HIT_RATIO_MIN_LOOKUPS: u64 = 1000;

/// The fields of `INFO` the daemon exports and checks.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ServerInfo {
    /// `redis_version`.
    pub version: Option<String>,
    /// `keyspace_hits`: lookups that found their key.
    pub keyspace_hits: Option<u64>,
    /// `keyspace_misses`: lookups that did not.
    pub keyspace_misses: Option<u64>,
    /// `used_memory`, bytes.
    pub used_memory: Option<u64>,
    /// `used_memory_peak`, bytes.
    pub used_memory_peak: Option<u64>,
    /// `maxmemory`, bytes (0: no limit).
    pub maxmemory: Option<u64>,
    /// `maxmemory_policy`.
    pub maxmemory_policy: Option<String>,
    /// `evicted_keys`: removed to stay under maxmemory.
    pub evicted_keys: Option<u64>,
    /// `expired_keys`: removed at their TTL.
    pub expired_keys: Option<u64>,
    /// `connected_clients`.
    pub connected_clients: Option<u64>,
    /// `rdb_last_save_time`: the last successful snapshot, Unix seconds.
    pub rdb_last_save_time: Option<u64>,
    /// `rdb_last_bgsave_status` is `ok`.
    pub rdb_last_bgsave_ok: Option<bool>,
    /// `aof_enabled`.
    pub aof_enabled: Option<bool>,
    /// The RDB save schedule (`CONFIG GET save`): empty means no snapshots;
    /// `None` when the server refused to say.
    pub save_schedule: Option<String>,
}

/// The oldest server the daemon writes to: the position record is
/// written with `SET … GET` (Redis 6.2), which finds writes Redis lost.
pub const MIN_VERSION: (u32, u32) = (6, 2);

/// Whether `version` (`redis_version`, `major.minor.patch`) is at least
/// [`MIN_VERSION`]; an unreadable version counts as new enough (forks
/// report theirs in other fields).
pub fn new_enough(version: &str) -> bool {
    at_least(version, MIN_VERSION)
}

/// Whether `version` (`major.minor.patch`) is at least `(major, minor)`;
/// an unreadable version counts as new enough. Valkey reports the Redis
/// version it is compatible with in `redis_version` (7.2.4 for Valkey 8
/// and 9).
pub fn at_least(version: &str, wanted: (u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= wanted,
        _ => true,
    }
}

impl ServerInfo {
    /// Reads the fields from `INFO` text (`field:value` lines, `#` section
    /// headers); fields a server does not report stay `None`.
    pub fn parse(info: &str) -> ServerInfo {
        let fields: HashMap<&str, &str> = info
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.trim_end_matches('\r').split_once(':'))
            .collect();
        let number = |name: &str| fields.get(name).and_then(|v| v.trim().parse::<u64>().ok());
        let text = |name: &str| fields.get(name).map(|v| v.trim().to_string());
        ServerInfo {
            version: text("redis_version"),
            keyspace_hits: number("keyspace_hits"),
            keyspace_misses: number("keyspace_misses"),
            used_memory: number("used_memory"),
            used_memory_peak: number("used_memory_peak"),
            maxmemory: number("maxmemory"),
            maxmemory_policy: text("maxmemory_policy"),
            evicted_keys: number("evicted_keys"),
            expired_keys: number("expired_keys"),
            connected_clients: number("connected_clients"),
            rdb_last_save_time: number("rdb_last_save_time"),
            rdb_last_bgsave_ok: fields
                .get("rdb_last_bgsave_status")
                .map(|v| v.trim() == "ok"),
            aof_enabled: number("aof_enabled").map(|v| v == 1),
            save_schedule: None,
        }
    }

    /// Hits over lookups since the server's last restart (or `CONFIG
    /// RESETSTAT`), once there are enough lookups to say.
    pub fn hit_ratio(&self) -> Option<f64> {
        let (hits, misses) = (self.keyspace_hits?, self.keyspace_misses?);
        let lookups = hits + misses;
        (lookups >= HIT_RATIO_MIN_LOOKUPS).then(|| hits as f64 / lookups as f64)
    }

    /// What the caching plan asks of the cache and this server does not
    /// do: one line each, with what to change.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let policy = self.maxmemory_policy.as_deref().unwrap_or("");
        match self.maxmemory {
            Some(0) => warnings.push(
                "redis has no maxmemory: the cache grows until the host runs out of memory; set maxmemory and maxmemory-policy allkeys-lru".to_string(),
            ),
            Some(_) if policy == "noeviction" => warnings.push(
                "redis runs maxmemory-policy noeviction: once the cache is full every write fails; use allkeys-lru (or volatile-lru when every cached key has a TTL)".to_string(),
            ),
            _ => {}
        }
        if self.aof_enabled == Some(false) && self.save_schedule.as_deref() == Some("") {
            warnings.push(
                "redis persists nothing (no RDB save schedule, AOF off): a restart starts the cache empty and every reader at once goes to the database; configure `save` snapshots (for example save 900 1) or appendonly yes".to_string(),
            );
        }
        if self.rdb_last_bgsave_ok == Some(false) {
            warnings.push(
                "redis's last RDB snapshot failed (rdb_last_bgsave_status:err): check its log and disk space".to_string(),
            );
        }
        if let Some(ratio) = self.hit_ratio() {
            if ratio < HIT_RATIO_TARGET {
                warnings.push(format!(
                    "redis hit ratio since its last restart is {:.0} %, below the caching plan's {:.0} % target: check TTLs and which reads go through the cache",
                    ratio * 100.0,
                    HIT_RATIO_TARGET * 100.0
                ));
            }
        }
        warnings
    }

    /// Exports the fields as `pgci_redis_…` metrics labelled with `target`.
    pub fn export(&self, target: &str) {
        let label = || [("target", target.to_string())];
        let gauge = |name: &'static str, value: Option<u64>| {
            if let Some(v) = value {
                metrics::gauge!(name, &label()).set(v as f64);
            }
        };
        let counter = |name: &'static str, value: Option<u64>| {
            if let Some(v) = value {
                metrics::counter!(name, &label()).absolute(v);
            }
        };
        counter(m::REDIS_KEYSPACE_HITS_TOTAL, self.keyspace_hits);
        counter(m::REDIS_KEYSPACE_MISSES_TOTAL, self.keyspace_misses);
        counter(m::REDIS_EVICTED_KEYS_TOTAL, self.evicted_keys);
        counter(m::REDIS_EXPIRED_KEYS_TOTAL, self.expired_keys);
        gauge(m::REDIS_MEMORY_USED_BYTES, self.used_memory);
        gauge(m::REDIS_MEMORY_PEAK_BYTES, self.used_memory_peak);
        gauge(m::REDIS_MEMORY_MAX_BYTES, self.maxmemory);
        gauge(m::REDIS_CONNECTED_CLIENTS, self.connected_clients);
        gauge(m::REDIS_RDB_LAST_SAVE_TIMESTAMP, self.rdb_last_save_time);
        gauge(
            m::REDIS_RDB_LAST_BGSAVE_OK,
            self.rdb_last_bgsave_ok.map(u64::from),
        );
        gauge(m::REDIS_AOF_ENABLED, self.aof_enabled.map(u64::from));
        if let Some(policy) = &self.maxmemory_policy {
            metrics::gauge!(m::REDIS_MAXMEMORY_POLICY, "target" => target.to_string(), "policy" => policy.clone())
                .set(1.0);
        }
    }
}

/// Reads `INFO` and, when allowed, the save schedule. `Err` only when
/// `INFO` itself fails.
pub async fn read<C: redis::aio::ConnectionLike>(conn: &mut C) -> redis::RedisResult<ServerInfo> {
    let text: String = redis::cmd("INFO").arg("all").query_async(conn).await?;
    let mut info = ServerInfo::parse(&text);
    let save: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(conn)
        .await;
    info.save_schedule = save.ok().and_then(|pair| pair.into_iter().nth(1));
    Ok(info)
}

/// Reads the server once on a connection of its own (`check-config`,
/// `status`).
pub async fn read_once(
    url: &SecretUrl,
    ca_cert: Option<&std::path::Path>,
) -> Result<ServerInfo, String> {
    let mut conn = super::connect_node_once(url, ca_cert).await?;
    read(&mut conn).await.map_err(|e| url.scrub(&e.to_string()))
}

/// The `target` label of a server: host and port, never credentials.
pub fn target_label(url: &SecretUrl) -> String {
    url.host_port()
}

/// Reads `INFO` every `every` into metrics labelled by `target`
/// (`host:port`), and logs the caching plan's warnings once per server. On
/// a cluster, every master is read (the list is read again each time: a
/// failover or a new master shows).
pub async fn watch(
    url: SecretUrl,
    ca_cert: Option<std::path::PathBuf>,
    cluster: Option<ClusterConn>,
    every: Duration,
    health: Arc<Health>,
    cancel: CancellationToken,
) {
    // The URL was checked when the sink connected.
    let Ok(client) = super::client(&url, ca_cert.as_deref()) else {
        return;
    };
    let mut single = None;
    let mut warned = std::collections::HashSet::new();
    let mut failing = false;
    loop {
        let mut servers = Vec::new();
        let listed = match &cluster {
            None => {
                if single.is_none() {
                    single = client.get_multiplexed_async_connection().await.ok();
                }
                servers.extend(
                    single
                        .clone()
                        .map(|c| (target_label(&url), Conn::Direct(c))),
                );
                Ok(())
            }
            Some(cluster) => match cluster.masters().await {
                Ok(masters) => {
                    for addr in masters {
                        if let Ok(conn) = cluster.node(&addr).await {
                            servers.push((format!("{}:{}", addr.0, addr.1), Conn::Member(conn)));
                        }
                    }
                    Ok(())
                }
                Err(error) => Err(error),
            },
        };
        let mut result = listed;
        for (target, mut conn) in servers {
            match read(&mut conn).await {
                Ok(info) => {
                    info.export(&target);
                    health.set_redis_warnings(&target, info.warnings());
                    if warned.insert(target.clone()) {
                        for warning in info.warnings() {
                            tracing::warn!(warning = %warning, target, "redis settings");
                        }
                        if info.save_schedule.is_none() {
                            tracing::info!(target, "redis refuses CONFIG GET save: whether it takes RDB snapshots is not known (pgci_redis_rdb_last_save_timestamp_seconds still shows the last one)");
                        }
                    }
                }
                Err(error) => {
                    single = None;
                    result = Err(error);
                }
            }
        }
        match result {
            Ok(()) => failing = false,
            Err(error) => {
                if !failing {
                    failing = true;
                    tracing::warn!(error = %url.scrub(&error.to_string()), "cannot read redis INFO; its metrics are stale until it answers");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\n\r\n# Clients\r\nconnected_clients:3\r\n\r\n# Memory\r\nused_memory:1048576\r\nused_memory_peak:2097152\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n\r\n# Persistence\r\nrdb_last_save_time:1764720000\r\nrdb_last_bgsave_status:ok\r\naof_enabled:0\r\n\r\n# Stats\r\nexpired_keys:5\r\nevicted_keys:0\r\nkeyspace_hits:300\r\nkeyspace_misses:900\r\n";

    #[test]
    fn servers_before_6_2_are_too_old() {
        assert!(new_enough("7.0.15"));
        assert!(new_enough("6.2.5"));
        assert!(new_enough("9.1.0"));
        assert!(!new_enough("6.0.20"));
        assert!(!new_enough("5.0.7"));
        assert!(new_enough("unknown"));
    }

    #[test]
    fn info_fields_are_read() {
        let info = ServerInfo::parse(INFO);
        assert_eq!(info.version.as_deref(), Some("7.0.15"));
        assert_eq!(info.keyspace_hits, Some(300));
        assert_eq!(info.keyspace_misses, Some(900));
        assert_eq!(info.used_memory, Some(1 << 20));
        assert_eq!(info.maxmemory, Some(0));
        assert_eq!(info.maxmemory_policy.as_deref(), Some("noeviction"));
        assert_eq!(info.aof_enabled, Some(false));
        assert_eq!(info.rdb_last_bgsave_ok, Some(true));
        assert_eq!(info.connected_clients, Some(3));
        assert_eq!(info.hit_ratio(), Some(0.25));
        assert_eq!(ServerInfo::parse("").hit_ratio(), None);
    }

    #[test]
    fn the_plan_s_settings_are_checked() {
        let mut info = ServerInfo::parse(INFO);
        info.save_schedule = Some(String::new());
        let warnings = info.warnings();
        assert!(
            warnings.iter().any(|w| w.contains("no maxmemory")),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("persists nothing")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("hit ratio since its last restart is 25 %")),
            "{warnings:?}"
        );
        info.maxmemory = Some(100 << 20);
        assert!(info.warnings().iter().any(|w| w.contains("noeviction")));
        info.maxmemory_policy = Some("allkeys-lru".into());
        info.save_schedule = None;
        info.keyspace_hits = Some(9000);
        assert!(info.warnings().is_empty(), "{:?}", info.warnings());
    }
}
