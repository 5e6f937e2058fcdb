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

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::duration::HumanDuration;
pub use crate::secret::{redact_url, SecretUrl};

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

/// `[[groups]]`: some of the rules' tables, with a replication slot and a
/// publication of their own. One slot is one ordered stream decoded by one
/// walsender; groups let throughput grow past it. Tables written in one
/// transaction whose keys must change together belong in one group: two
/// groups' streams are applied independently, so one group's keys can
/// change before another's for the same transaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Names the group on the command line (`--group`), in logs and
    /// metrics (`group` label), and in the default slot name.
    pub name: String,
    /// `schema.table` (or `table`) of each table the group streams; every
    /// table with rules is in exactly one group.
    pub tables: Vec<String>,
    /// Its replication slot (default `pg_cache_invalidator_<name>`).
    #[serde(default)]
    pub slot: Option<String>,
    /// Its publication (default: the slot's name).
    #[serde(default)]
    pub publication: Option<String>,
    /// Its metrics and health listener (default `http.listen`): set one
    /// per group when the groups' processes share a host.
    #[serde(default)]
    pub listen: Option<String>,
}

impl GroupConfig {
    /// The group's slot.
    pub fn slot(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("{DEFAULT_SLOT_AND_PUBLICATION}_{}", self.name))
    }

    /// The group's publication.
    pub fn publication(&self) -> String {
        self.publication.clone().unwrap_or_else(|| self.slot())
    }

    fn holds(&self, table: &str) -> bool {
        let wanted = crate::change::TableName::parse(table);
        self.tables
            .iter()
            .any(|t| wanted.is_some() && crate::change::TableName::parse(t) == wanted)
    }
}

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
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A logical replication slot with `pgoutput`.
    #[default]
    Replication,
    /// A trigger-fed outbox table.
    Outbox,
}

/// `[replication]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// The logical replication slot.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// The publication listing the watched tables.
    #[serde(default = "default_slot")]
    pub publication: String,
    /// How often to write a heartbeat into the WAL; `0s` turns it off.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: HumanDuration,
    /// Messages (rows) the replication transport buffers ahead of the
    /// apply loop: more drains large transactions faster, fewer bounds
    /// memory when rows are large (each message is one whole row).
    #[serde(default = "default_buffer_messages")]
    pub buffer_messages: usize,
    /// The replication connection's `application_name`: the name to list
    /// in `synchronous_standby_names` for synchronous invalidation.
    #[serde(default = "default_application_name")]
    pub application_name: String,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            slot: default_slot(),
            publication: default_slot(),
            heartbeat_interval: default_heartbeat(),
            buffer_messages: default_buffer_messages(),
            application_name: default_application_name(),
        }
    }
}

/// Default `application_name` of the replication connection (what
/// `pg_stat_replication` shows; quote it in `synchronous_standby_names`:
/// `ANY 1 ("pg-cache-invalidator")`).
pub const DEFAULT_APPLICATION_NAME: &str = "pg-cache-invalidator";

fn default_application_name() -> String {
    DEFAULT_APPLICATION_NAME.to_string()
}

/// Default heartbeat interval: frequent enough that an alert on heartbeat
/// age fires within a minute, rare enough to add no measurable WAL.
pub const DEFAULT_HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Default transport buffer: 256 rows of 100 kB are 25 MB, and 256 small
/// rows keep a large transaction's drain within a few percent of an
/// unbounded buffer (see BENCHMARKS.md).
pub const DEFAULT_BUFFER_MESSAGES: usize = 256;

fn default_buffer_messages() -> usize {
    DEFAULT_BUFFER_MESSAGES
}

fn default_heartbeat() -> HumanDuration {
    HumanDuration(DEFAULT_HEARTBEAT_INTERVAL)
}

fn default_slot() -> String {
    DEFAULT_SLOT_AND_PUBLICATION.to_string()
}

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

/// `[outbox]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Schema for the outbox table and trigger functions.
    #[serde(default = "default_outbox_schema")]
    pub schema: String,
    /// How often the outbox is drained without a wake-up: NOTIFY is lost
    /// while nobody listens, so polling is the guarantee, NOTIFY the speed.
    #[serde(default = "default_poll")]
    pub poll_interval: HumanDuration,
    /// Outbox rows applied per Redis round-trip and database transaction.
    #[serde(default = "default_outbox_batch")]
    pub batch_size: u32,
    /// How long writers fill one outbox partition before they switch to
    /// the other, so the drained one can be emptied with TRUNCATE.
    #[serde(default = "default_rotate")]
    pub rotate_interval: HumanDuration,
    /// Whether writers wake the daemon with NOTIFY while it waits; off,
    /// the daemon does not LISTEN (a transaction-mode pooler cannot) and
    /// polls every `poll_interval`.
    #[serde(default = "default_true")]
    pub wake_ups: bool,
}

fn default_true() -> bool {
    true
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            schema: default_outbox_schema(),
            poll_interval: default_poll(),
            batch_size: default_outbox_batch(),
            rotate_interval: default_rotate(),
            wake_ups: true,
        }
    }
}

/// Default outbox poll: a lost wake-up delays invalidation by at most this.
pub const DEFAULT_OUTBOX_POLL: std::time::Duration = std::time::Duration::from_secs(1);
/// Default outbox batch: large enough for few round-trips, small enough
/// that one transaction's row locks and one pipeline stay small.
pub const DEFAULT_OUTBOX_BATCH: u32 = 1000;

/// Default outbox rotation: often enough that a partition holds seconds of
/// writes (TRUNCATE then frees little), rarely enough that the switch and
/// the TRUNCATE's lock are rare events.
pub const DEFAULT_OUTBOX_ROTATE: std::time::Duration = std::time::Duration::from_secs(10);

/// Default outbox schema. Not `pg_cache_invalidator` like the slot:
/// PostgreSQL reserves schema names starting with `pg_`.
pub const DEFAULT_OUTBOX_SCHEMA: &str = "cache_invalidator";

fn default_outbox_schema() -> String {
    DEFAULT_OUTBOX_SCHEMA.to_string()
}

fn default_poll() -> HumanDuration {
    HumanDuration(DEFAULT_OUTBOX_POLL)
}

fn default_rotate() -> HumanDuration {
    HumanDuration(DEFAULT_OUTBOX_ROTATE)
}

fn default_outbox_batch() -> u32 {
    DEFAULT_OUTBOX_BATCH
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Names a `[[targets]]` entry in logs, metrics, readiness and
    /// `status`; `[redis]` is named "redis".
    #[serde(default)]
    pub name: Option<String>,
    /// `redis://` or `rediss://` URL; `REDIS_URL` overrides it.
    #[serde(default)]
    pub url: SecretUrl,
    /// Pub/sub channel for events; empty turns events off.
    #[serde(default = "default_channel")]
    pub channel: String,
    /// CA certificate (PEM) for `rediss://` servers signed by a private CA.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// How often the daemon reads the server's `INFO` into `pgci_redis_…`
    /// metrics; 0 turns that off.
    #[serde(default = "default_info_interval")]
    pub info_interval: HumanDuration,
    /// `url` names one node of a Redis Cluster.
    #[serde(default)]
    pub cluster: bool,
    /// More cluster nodes to start from, when `url`'s is down.
    #[serde(default)]
    pub nodes: Vec<SecretUrl>,
    /// Events go out with `SPUBLISH` (Redis 7 sharded pub/sub: on a
    /// cluster only the channel's shard carries them) instead of
    /// `PUBLISH` (every node of a cluster carries every message).
    /// Subscribers then use `SSUBSCRIBE`.
    #[serde(default)]
    pub sharded_events: bool,
    /// With several targets: most bytes of changes queued for this one
    /// while it does not answer (default 64 MiB, see `sink::fanout`); past
    /// it the queue is dropped and the target flushes every rule key when
    /// it answers again.
    #[serde(default)]
    pub max_backlog_bytes: Option<usize>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            name: None,
            url: SecretUrl::new(""),
            channel: default_channel(),
            ca_cert: None,
            info_interval: default_info_interval(),
            cluster: false,
            nodes: Vec::new(),
            sharded_events: false,
            max_backlog_bytes: None,
        }
    }
}

impl RedisConfig {
    /// Its name: the `[[targets]]` entry's, or "redis".
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("redis")
    }

    /// The cluster's seed nodes (`url` first), or `None` for one server.
    pub fn cluster_seeds(&self) -> Option<Vec<SecretUrl>> {
        self.cluster.then(|| {
            std::iter::once(self.url.clone())
                .chain(self.nodes.iter().cloned())
                .collect()
        })
    }
}

/// Default `INFO` interval: a usual Prometheus scrape interval.
pub const DEFAULT_REDIS_INFO_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

fn default_info_interval() -> HumanDuration {
    HumanDuration(DEFAULT_REDIS_INFO_INTERVAL)
}

fn default_channel() -> String {
    DEFAULT_CHANNEL.to_string()
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
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What the app caches under a `delete` rule's keys, so `verify` can
/// compare them with the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Holds {
    /// The row's JSON as `select *` returns it through Supabase/PostgREST
    /// (`to_jsonb` of the row).
    Row,
}

/// What the daemon does with a rule's keys when a row changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Remove the keys; the app's next read repopulates them.
    #[default]
    Delete,
    /// Write the new row into the keys.
    Refresh,
}

impl Action {
    /// The name used in events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Delete => "delete",
            Action::Refresh => "refresh",
        }
    }
}

/// One `[[rules]]` entry as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `schema.table` (or `table` for `public.table`).
    pub table: String,
    /// Key templates such as `profile:user:{id}`.
    pub keys: Vec<String>,
    /// What to do with the keys.
    #[serde(default)]
    pub action: Action,
    /// `refresh` only: how long the written value lives (`"1h"`, `"5m"`).
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// `refresh` only: which columns the cached row holds.
    #[serde(default)]
    pub columns: Option<ColumnsConfig>,
    /// `refresh` only: SQL whose single JSON value is cached instead of the
    /// row; `$1`, `$2`… are `params`, passed as text.
    #[serde(default)]
    pub query: Option<String>,
    /// Columns of the changed row passed to `query`, in order.
    #[serde(default)]
    pub params: Option<Vec<String>>,
    /// `delete` only: what the app caches under the keys (`"row"`), so
    /// `verify` can check them; refresh rules say it themselves.
    #[serde(default)]
    pub holds: Option<Holds>,
}

/// `columns = { include = [...] }` or `{ exclude = [...] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnsConfig {
    /// Only these columns are cached.
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// These columns are never cached.
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
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

impl Config {
    /// Reads `path`, then applies `DATABASE_URL`, `REDIS_URL` and
    /// `PGCI__SECTION__KEY` overrides from the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "config file {} does not exist: pass --config FILE",
                path.display()
            )));
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(false),
            );
        for (var, key) in [("DATABASE_URL", "postgres.url"), ("REDIS_URL", "redis.url")] {
            if let Ok(value) = std::env::var(var) {
                if !value.is_empty() {
                    builder = builder
                        .set_override(key, value)
                        .map_err(|e| ConfigError::Load(format!("{var}: {e}")))?;
                }
            }
        }
        let raw = builder.build().map_err(|e| {
            ConfigError::Load(format!(
                "cannot read config {}: {} (fix the file's TOML syntax)",
                path.display(),
                without_snippets(&e.to_string())
            ))
        })?;
        let config = raw.try_deserialize::<Config>().map_err(|e| {
            ConfigError::Load(format!(
                "invalid config {}: {}",
                path.display(),
                without_snippets(&e.to_string())
            ))
        })?;
        config
            .settle_targets()
            .map_err(|e| ConfigError::Load(format!("invalid config {}: {e}", path.display())))
    }

    /// `[redis]` or `[[targets]]`, one of them: [`Config::targets`] lists
    /// every target and [`Config::redis`] is the first.
    fn settle_targets(mut self) -> Result<Config, String> {
        let redis_given = !self.redis.url.expose().is_empty();
        match (redis_given, self.targets.first()) {
            (true, Some(_)) => Err("both [redis] and [[targets]] are given (REDIS_URL and PGCI__REDIS__… also set [redis]): list every Redis as a [[targets]] entry, or use [redis] alone".to_string()),
            (false, None) => Err("[redis] url is missing: add [redis] with url = \"redis://host:6379/0\" (or set REDIS_URL)".to_string()),
            (false, Some(first)) => {
                self.redis = first.clone();
                self.listed_targets = true;
                Ok(self)
            }
            (true, None) => {
                self.targets = vec![self.redis.clone()];
                Ok(self)
            }
        }
    }

    /// Checks every value outside the rules (see `plan::rules::compile`,
    /// which also runs this); returns all problems.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        check_url(
            "postgres.url",
            &self.postgres.url,
            &["postgres", "postgresql"],
            &mut problems,
        );
        self.validate_targets(&mut problems);
        if self.outbox.schema.starts_with("pg_") {
            problems.push(format!(
                "outbox.schema: {:?} starts with \"pg_\", which PostgreSQL reserves: choose another name such as \"cache_invalidator\"",
                self.outbox.schema
            ));
        }
        if !(16..=65_536).contains(&self.replication.buffer_messages) {
            problems.push("replication.buffer_messages: must be between 16 and 65536".to_string());
        }
        if self.setup.lock_timeout.0.is_zero() {
            problems.push(
                "setup.lock_timeout: must be more than 0s (0 would wait forever)".to_string(),
            );
        }
        if self.outbox.poll_interval.0.is_zero() {
            problems.push("outbox.poll_interval: must be more than 0s".to_string());
        }
        if self.outbox.rotate_interval.0.is_zero() {
            problems.push("outbox.rotate_interval: must be more than 0s".to_string());
        }
        if !(1..=100_000).contains(&self.outbox.batch_size) {
            problems.push("outbox.batch_size: must be between 1 and 100000".to_string());
        }
        check_identifier(
            "replication.slot",
            &self.replication.slot,
            true,
            &mut problems,
        );
        check_identifier(
            "replication.publication",
            &self.replication.publication,
            true,
            &mut problems,
        );
        check_identifier("outbox.schema", &self.outbox.schema, false, &mut problems);
        let schema = &self.outbox.schema;
        let plain = schema.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && schema
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !schema.is_empty() && !plain {
            problems.push(format!(
                "outbox.schema: {:?} may contain only letters, digits and underscores, starting with a letter or underscore (it is written into SQL and a function body)",
                self.outbox.schema
            ));
        }
        check_identifier(
            "replication.application_name",
            &self.replication.application_name,
            false,
            &mut problems,
        );
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:9187",
                self.http.listen
            ));
        }
        self.validate_groups(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

impl Config {
    /// The configuration of group `name` alone: its slot, publication,
    /// listener and the rules of its tables. The replication connection's
    /// `application_name` gets the group's name appended, so each group's
    /// walsender can be told apart (and listed in
    /// `synchronous_standby_names`).
    pub fn for_group(&self, name: &str) -> Result<Config, ConfigError> {
        let Some(group) = self.groups.iter().find(|g| g.name == name) else {
            let names: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
            return Err(ConfigError::Invalid(vec![if names.is_empty() {
                format!("--group {name}: the file configures no [[groups]]: drop --group")
            } else {
                format!(
                    "--group {name}: no [[groups]] entry has that name; the file has {}",
                    names.join(", ")
                )
            }]));
        };
        let mut config = self.clone();
        config.replication.slot = group.slot();
        config.replication.publication = group.publication();
        config.replication.application_name =
            format!("{}-{}", self.replication.application_name, group.name);
        if let Some(listen) = &group.listen {
            config.http.listen = listen.clone();
        }
        config.rules.retain(|rule| group.holds(&rule.table));
        config.groups.clear();
        config.group = Some(group.name.clone());
        Ok(config)
    }

    /// Each group's configuration ([`Config::for_group`]); the whole file
    /// when it has no groups.
    pub fn each_group(&self) -> Vec<Config> {
        if self.groups.is_empty() {
            return vec![self.clone()];
        }
        self.groups
            .iter()
            .filter_map(|g| self.for_group(&g.name).ok())
            .collect()
    }

    fn validate_targets(&self, problems: &mut Vec<String>) {
        let mut names = std::collections::BTreeSet::new();
        let mut urls = std::collections::BTreeSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            let at = if self.listed_targets {
                format!("targets[{i}]")
            } else {
                "redis".to_string()
            };
            validate_target(&at, target, problems);
            if self.listed_targets {
                match target.name.as_deref() {
                    None | Some("") => problems.push(format!(
                        "{at}.name: missing: name each [[targets]] entry (such as \"eu\"); it labels logs, metrics and readiness"
                    )),
                    Some(name) => {
                        let plain = name.len() <= 32
                            && name
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                        if !plain {
                            problems.push(format!("{at}.name: {name:?} may hold only letters, digits, '_' and '-' (32 at most)"));
                        }
                        if !names.insert(name) {
                            problems.push(format!(
                                "{at}.name: {name:?} names two targets: give each its own"
                            ));
                        }
                    }
                }
            }
            if !urls.insert(target.url.expose()) {
                problems.push(format!(
                    "{at}.url: the same Redis as an earlier target: list each Redis once"
                ));
            }
        }
    }

    fn validate_groups(&self, problems: &mut Vec<String>) {
        if self.groups.is_empty() {
            return;
        }
        if self.postgres.source != SourceKind::Replication {
            problems.push("groups: table groups split the replication stream; the outbox source has none: remove [[groups]] or use source = \"replication\"".to_string());
        }
        let mut names = std::collections::BTreeSet::new();
        let mut slots = std::collections::BTreeSet::new();
        let mut publications = std::collections::BTreeSet::new();
        let mut tables: Vec<(crate::change::TableName, usize)> = Vec::new();
        for (i, group) in self.groups.iter().enumerate() {
            let field = format!("groups[{i}]");
            if group.name.is_empty()
                || !group
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                problems.push(format!("{field}.name: {:?} must be lower-case letters, digits and underscores (it names the slot)", group.name));
            }
            if !names.insert(group.name.clone()) {
                problems.push(format!(
                    "{field}.name: {:?} is used twice: give each group its own name",
                    group.name
                ));
            }
            check_identifier(&format!("{field}.slot"), &group.slot(), true, problems);
            check_identifier(
                &format!("{field}.publication"),
                &group.publication(),
                true,
                problems,
            );
            if !slots.insert(group.slot()) {
                problems.push(format!(
                    "{field}.slot: {:?} is another group's slot: each group needs its own",
                    group.slot()
                ));
            }
            if !publications.insert(group.publication()) {
                problems.push(format!("{field}.publication: {:?} is another group's publication: each group needs its own", group.publication()));
            }
            if let Some(listen) = &group.listen {
                if listen.parse::<std::net::SocketAddr>().is_err() {
                    problems.push(format!(
                        "{field}.listen: {listen:?} is not an address like 127.0.0.1:9188"
                    ));
                }
            }
            if group.tables.is_empty() {
                problems.push(format!(
                    "{field}.tables: empty: list the tables the group streams"
                ));
            }
            for table in &group.tables {
                let Some(name) = crate::change::TableName::parse(table) else {
                    problems.push(format!(
                        "{field}.tables: {table:?} is not a table name like \"public.profiles\""
                    ));
                    continue;
                };
                if let Some((_, other)) = tables.iter().find(|(t, _)| *t == name) {
                    problems.push(format!("{field}.tables: {name} is also in groups[{other}]: a table belongs to one group"));
                    continue;
                }
                if !self
                    .rules
                    .iter()
                    .any(|r| crate::change::TableName::parse(&r.table).as_ref() == Some(&name))
                {
                    problems.push(format!("{field}.tables: {name} has no [[rules]]: add a rule for it or remove it from the group"));
                }
                tables.push((name, i));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(name) = crate::change::TableName::parse(&rule.table) else {
                continue;
            };
            if !tables.iter().any(|(t, _)| *t == name) {
                problems.push(format!("rules[{i}].table: {name} is in no [[groups]]: add it to the group of the tables written in the same transactions"));
                tables.push((name, usize::MAX));
            }
        }
    }
}

/// A parser's error as one line, without the snippet of the file it
/// quotes (`2 | url = "postgres://user:password@…`): the line in error may
/// hold a secret, and logs must not.
/// The checks of one Redis target, its fields named under `at`.
fn validate_target(at: &str, redis: &RedisConfig, problems: &mut Vec<String>) {
    check_url(
        &format!("{at}.url"),
        &redis.url,
        &["redis", "rediss"],
        problems,
    );
    if let Some(path) = &redis.ca_cert {
        if !path.is_file() {
            problems.push(format!(
                "{at}.ca_cert: {} is not a readable file",
                path.display()
            ));
        } else if !redis.url.expose().starts_with("rediss://") {
            problems.push(format!(
                "{at}.ca_cert: only used with a rediss:// URL: change the URL or remove the key"
            ));
        }
    }
    for (i, node) in redis.nodes.iter().enumerate() {
        check_url(&format!("{at}.nodes[{i}]"), node, &["redis"], problems);
    }
    if redis.max_backlog_bytes == Some(0) {
        problems.push(format!(
            "{at}.max_backlog_bytes: must be more than 0 (the default is 67108864, 64 MiB)"
        ));
    }
    if !redis.cluster && !redis.nodes.is_empty() {
        problems.push(format!(
            "{at}.nodes: only used with {at}.cluster = true: set it, or remove the list"
        ));
    }
    if redis.cluster && (redis.ca_cert.is_some() || redis.url.expose().starts_with("rediss://")) {
        problems.push(format!("{at}.cluster: TLS (rediss://, ca_cert) is not supported in cluster mode yet: use redis:// inside a private network, or one server"));
    }
}

fn without_snippets(text: &str) -> String {
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            let after_number = line.trim_start_matches(|c: char| c.is_ascii_digit());
            !after_number.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    one_line(&kept.join(": "))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn check_url(field: &str, url: &SecretUrl, schemes: &[&str], problems: &mut Vec<String>) {
    if url.expose().is_empty() {
        problems.push(format!(
            "{field}: missing: set it to a {}:// URL",
            schemes[0]
        ));
        return;
    }
    let scheme = url.expose().split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) => {}
        _ => problems.push(format!(
            "{field}: {} is not a {}:// URL",
            url.redacted(),
            schemes[0]
        )),
    }
    if url.password_needs_encoding() {
        problems.push(format!(
            "{field}: the password holds / ? # or @, which a URL must percent-encode: write / as %2F, ? as %3F, # as %23, @ as %40"
        ));
    }
}

/// Slot and publication names may hold only lower-case letters, digits and
/// underscores: the server's rule for slots, and the transport sends both
/// unquoted. Other identifiers are quoted wherever we use them, so only
/// emptiness and length matter.
fn check_identifier(field: &str, value: &str, slot_rules: bool, problems: &mut Vec<String>) {
    if value.is_empty() || value.len() > 63 {
        problems.push(format!("{field}: must be 1 to 63 characters long"));
    } else if slot_rules
        && !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        problems.push(format!(
            "{field}: {value:?} may contain only lower-case letters, digits and underscores"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).expect("write");
        Config::load(&path)
    }

    /// A syntax error on a line holding a password says where and what,
    /// on one line, without quoting the line.
    #[test]
    fn a_syntax_error_does_not_quote_the_line() {
        let Err(ConfigError::Load(text)) =
            parse("[postgres]\nurl = \"postgres://pgci:S3cretPW@127.0.0.1/db\n")
        else {
            panic!("loaded");
        };
        assert!(!text.contains("S3cretPW"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("expected"), "{text}");
    }

    const MINIMAL: &str = r#"
        [postgres]
        url = "postgres://u@127.0.0.1/db"
        [redis]
        url = "redis://127.0.0.1"
        [[rules]]
        table = "public.profiles"
        keys = ["profile:user:{id}"]
    "#;

    #[test]
    fn a_group_narrows_the_file_to_its_slot_publication_and_rules() {
        let text = format!(
            "{MINIMAL}
            [[rules]]
            table = \"user_tokens\"
            keys = [\"balance:{{user_id}}\"]
            [[groups]]
            name = \"balances\"
            tables = [\"public.user_tokens\"]
            listen = \"127.0.0.1:9300\"
            [[groups]]
            name = \"rest\"
            tables = [\"profiles\"]
            slot = \"rest_slot\"
            "
        );
        let cfg = parse(&text).expect("loads");
        let balances = cfg.for_group("balances").expect("group");
        assert_eq!(balances.replication.slot, "pg_cache_invalidator_balances");
        assert_eq!(
            balances.replication.publication,
            "pg_cache_invalidator_balances"
        );
        assert_eq!(
            balances.replication.application_name,
            "pg-cache-invalidator-balances"
        );
        assert_eq!(balances.http.listen, "127.0.0.1:9300");
        assert_eq!(balances.rules.len(), 1);
        assert_eq!(balances.rules[0].table, "user_tokens");
        assert!(balances.groups.is_empty());
        assert_eq!(balances.group.as_deref(), Some("balances"));
        let rest = cfg.for_group("rest").expect("group");
        assert_eq!(
            (
                rest.replication.slot.as_str(),
                rest.replication.publication.as_str()
            ),
            ("rest_slot", "rest_slot")
        );
        assert_eq!(rest.http.listen, DEFAULT_HTTP_LISTEN);
        assert_eq!(cfg.each_group().len(), 2);
        let Err(ConfigError::Invalid(lines)) = cfg.for_group("nope") else {
            panic!("an unknown group is an error")
        };
        assert!(lines[0].contains("balances, rest"), "{lines:?}");
        assert_eq!(parse(MINIMAL).expect("loads").each_group().len(), 1);
    }

    /// A schema name that would break out of the SQL `setup` writes (a
    /// `$fn$` ends the trigger function's body) is refused before setup
    /// creates anything.
    #[test]
    fn an_outbox_schema_that_is_not_a_plain_name_is_refused() {
        for bad in ["a$fn$b", "x;drop", "1abc", "a b", "sch\"ema"] {
            let text = format!("{MINIMAL}\n[outbox]\nschema = {bad:?}\n");
            let Err(ConfigError::Invalid(lines)) = parse(&text).expect("loads").validate() else {
                panic!("{bad} accepted")
            };
            assert!(
                lines.iter().any(|l| l.starts_with("outbox.schema:")),
                "{lines:?}"
            );
        }
        for good in ["cache_invalidator", "Cache_2", "_x"] {
            let text = format!("{MINIMAL}\n[outbox]\nschema = {good:?}\n");
            parse(&text).expect("loads").validate().expect(good);
        }
    }

    #[test]
    fn group_mistakes_name_their_field() {
        let text = format!(
            "{MINIMAL}
            [[groups]]
            name = \"Bad-Name\"
            tables = [\"public.profiles\"]
            listen = \"nowhere\"
            [[groups]]
            name = \"b\"
            tables = []
            slot = \"pg_cache_invalidator_Bad-Name\"
            "
        );
        let Err(ConfigError::Invalid(lines)) = parse(&text).expect("loads").validate() else {
            panic!("mistakes are errors")
        };
        let all = lines.join("\n");
        for expected in [
            "groups[0].name: \"Bad-Name\" must be lower-case",
            "groups[0].listen: \"nowhere\"",
            "groups[1].tables: empty",
            "groups[1].slot: \"pg_cache_invalidator_Bad-Name\" is another group's slot",
        ] {
            assert!(all.contains(expected), "{expected}: {all}");
        }
        let outbox = format!(
            "{}\n[[groups]]\nname = \"a\"\ntables = [\"public.profiles\"]\n",
            MINIMAL.replace("[redis]", "source = \"outbox\"\n[redis]")
        );
        let Err(ConfigError::Invalid(lines)) = parse(&outbox).expect("loads").validate() else {
            panic!("groups with the outbox are an error")
        };
        assert!(lines.iter().any(|l| l.starts_with("groups: ")), "{lines:?}");
    }

    #[test]
    fn loads_defaults() {
        let cfg = parse(MINIMAL).expect("loads");
        assert_eq!(cfg.replication.slot, "pg_cache_invalidator");
        assert_eq!(cfg.redis.channel, "cache-invalidation");
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = parse(&format!("{MINIMAL}\n[log]\nformt = \"json\"\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("formt"), "{text}");
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn validation_names_each_field() {
        let cfg = parse(
            r#"
            [postgres]
            url = "mysql://x"
            [replication]
            slot = "Bad-Slot"
            [redis]
            url = "redis://127.0.0.1"
            [[rules]]
            table = "public.profiles"
            keys = ["{id}"]
        "#,
        )
        .expect("loads");
        let text = cfg.validate().unwrap_err().to_string();
        assert!(text.contains("postgres.url"), "{text}");
        assert!(text.contains("replication.slot"), "{text}");
    }
}
