//! Configuration: one TOML file overlaid by environment variables.
//!
//! Plain serde structs with `deny_unknown_fields`, so a typo is an error
//! rather than a silently ignored setting. Loading and checking are split:
//! [`Config::load`] reads and type-checks, [`Config::validate`] checks the
//! values and returns every problem at once, each naming its dotted field,
//! so an operator fixes a file in one pass. The `[[rules]]` entries are
//! compiled into typed values (key templates parsed once) by
//! [`crate::plan::rules::compile`], which depends on this module and not
//! the other way round.

use std::path::PathBuf;

use serde::Deserialize;

use crate::duration::HumanDuration;

/// A configuration enum read from its name (`#[serde(try_from = "String")]`),
/// so that a typo is answered with the valid names: `action "invalidate" is
/// not one of: delete, refresh`.
macro_rules! named_values {
    ($ty:ty, $what:literal, [$($name:literal => $variant:expr),+ $(,)?]) => {
        impl TryFrom<String> for $ty {
            type Error = String;

            fn try_from(text: String) -> Result<Self, String> {
                match text.as_str() {
                    $($name => Ok($variant),)+
                    other => Err(format!(
                        "{} {:?} is not one of: {}",
                        $what,
                        other,
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}
pub use crate::secret::{redact_url, SecretUrl};
pub(crate) use named_values;

/// Where the daemon looks for its file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pg-cache-invalidator/config.toml";
/// Default name of both the replication slot and the publication.
pub const DEFAULT_SLOT_AND_PUBLICATION: &str = "pg_cache_invalidator";
/// Default pub/sub channel for invalidation events.
pub const DEFAULT_CHANNEL: &str = "cache-invalidation";
/// Default metrics/health listener: loopback only, so nothing is exposed
/// unless the operator asks for it.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9187";
/// Prefix of environment overrides: `PGCI__REDIS__CHANNEL=...`.
pub const ENV_PREFIX: &str = "PGCI";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The database to watch.
    pub postgres: PostgresConfig,
    /// Slot and publication of the `replication` source.
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// Where the `outbox` source keeps its objects.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// How `setup` changes the database.
    #[serde(default)]
    pub setup: SetupConfig,
    /// The cache to keep fresh (the first of [`Config::targets`] when the
    /// file lists `[[targets]]`: the verbs that talk to one Redis use it).
    #[serde(default)]
    pub redis: RedisConfig,
    /// Every Redis kept fresh from the one stream, each with its own
    /// position record, events and health (see `sink::fanout`): the
    /// file's `[[targets]]`, or `[redis]` alone.
    #[serde(default)]
    pub targets: Vec<RedisConfig>,
    /// The file lists `[[targets]]` (not `[redis]`).
    #[serde(skip)]
    pub listed_targets: bool,
    /// Metrics and health endpoints.
    #[serde(default)]
    pub http: HttpConfig,
    /// Log output.
    #[serde(default)]
    pub log: LogConfig,
    /// The freshness sampler (`[verify]`).
    #[serde(default)]
    pub verify: VerifyConfig,
    /// Which keys each table's changes invalidate.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Table groups: the tables split over several slots and publications,
    /// each streamed by a daemon process of its own (`run --group NAME`).
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    /// The group this configuration was narrowed to ([`Config::for_group`]).
    #[serde(skip)]
    pub group: Option<String>,
}

mod groups;
mod load;
mod rules;
mod sources;
mod targets;
mod validate;

pub use groups::GroupConfig;
pub use rules::{Action, ColumnsConfig, Holds, RuleConfig};
pub use sources::{
    OutboxConfig, ReplicationConfig, DEFAULT_APPLICATION_NAME, DEFAULT_BUFFER_MESSAGES,
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_OUTBOX_BATCH, DEFAULT_OUTBOX_POLL, DEFAULT_OUTBOX_ROTATE,
    DEFAULT_OUTBOX_SCHEMA,
};
pub use targets::{RedisConfig, DEFAULT_REDIS_INFO_INTERVAL};

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// A libpq-style URL; `DATABASE_URL` overrides it.
    pub url: SecretUrl,
    /// CA certificate for `sslmode=verify-ca|verify-full`.
    #[serde(default)]
    pub ssl_root_cert: Option<PathBuf>,
    /// Which change stream to read.
    #[serde(default)]
    pub source: SourceKind,
}

/// The change stream the daemon reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SourceKind {
    /// A logical replication slot with `pgoutput`.
    #[default]
    Replication,
    /// A trigger-fed outbox table.
    Outbox,
}

named_values!(SourceKind, "source", ["replication" => SourceKind::Replication, "outbox" => SourceKind::Outbox]);
named_values!(LogFormat, "log format", ["text" => LogFormat::Text, "json" => LogFormat::Json]);

/// `[setup]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetupConfig {
    /// How long `setup` waits for a table lock (ALTER TABLE, CREATE
    /// TRIGGER) before giving up, so that it never queues behind a long
    /// transaction while every later query on the table queues behind it.
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout: HumanDuration,
}

impl Default for SetupConfig {
    fn default() -> Self {
        SetupConfig {
            lock_timeout: default_lock_timeout(),
        }
    }
}

/// Default lock wait of `setup`: a few seconds rides out short
/// transactions; longer would stall the application behind the queued
/// ALTER TABLE.
pub const DEFAULT_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn default_lock_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_LOCK_TIMEOUT)
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address for `/metrics`, `/healthz`, `/readyz`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Whether the status page lists the keys of recent events. Off by
    /// default: keys hold row values (usernames, ids) and the page has no
    /// authentication; off, it shows how many keys each event touched.
    #[serde(default)]
    pub show_keys: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            show_keys: false,
        }
    }
}

fn default_listen() -> String {
    DEFAULT_HTTP_LISTEN.to_string()
}

/// `[verify]`: the freshness sampler inside the daemon (see
/// `crate::freshness`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// Cached keys compared with the database per second, at most; 0 (the
    /// default) turns the sampler off. Each check is one SCAN step share,
    /// one GET and one primary-key query.
    #[serde(default)]
    pub sample_per_second: u32,
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for terminals, `json` for log collectors.
    #[serde(default)]
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(try_from = "String")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration file that could not be used. `Display` is one line per
/// problem, each naming the field and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or unreadable, or not valid TOML, or a field has
    /// the wrong type or is unknown.
    #[error("{0}")]
    Load(String),
    /// Values that are well-typed but wrong.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

#[cfg(test)]
mod tests;
