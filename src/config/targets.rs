//! `[redis]` or `[[targets]]`: the Redis deployments kept fresh from the
//! one stream, settled into [`Config::targets`] when the file is read.

use std::path::PathBuf;

use serde::Deserialize;

use super::validate::check_url;
use super::{Config, SecretUrl, DEFAULT_CHANNEL};
use crate::duration::HumanDuration;

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
    /// A Redis Stream every event is appended to as well (`XADD`, in the
    /// script that publishes it), so a subscriber back from a disconnect
    /// reads what it missed from the last id it saw; empty (the default)
    /// keeps events on pub/sub only. On a cluster it must share the
    /// channel's hash slot (`{cache-invalidation}:events`).
    #[serde(default)]
    pub stream: String,
    /// About how many events the stream keeps (`MAXLEN ~`; Redis trims
    /// whole nodes of about 100 entries, so a few more may stay). An
    /// event is at most 64 KiB of keys plus about 300 bytes, usually a
    /// few hundred bytes: the default 10,000 keeps a few MB.
    #[serde(default = "default_stream_max_len")]
    pub stream_max_len: u64,
    /// With several targets: most bytes of changes queued for this one
    /// while it does not answer (default 64 MiB, see `sink::fanout`); past
    /// it the queue is dropped and the target flushes every rule key when
    /// it answers again.
    #[serde(default)]
    pub max_backlog_bytes: Option<usize>,
    /// The first deletion of a commit not yet visible (a synchronous
    /// commit waiting for the daemon, above all) leaves a lease marker
    /// owned by the daemon instead of nothing, until the commit shows and
    /// the second pass deletes it (10 s at most): a reader through the
    /// pgci clients waits for it or reads the database, and none can fill
    /// the row as it was before the commit in between. Only for keys every
    /// reader reads through the pgci clients (`getOrLoad`,
    /// `getCachedData`): a plain `GET` would return the marker.
    #[serde(default)]
    pub fence_until_visible: bool,
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
            stream: String::new(),
            stream_max_len: default_stream_max_len(),
            max_backlog_bytes: None,
            fence_until_visible: false,
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

/// Default `stream_max_len`.
pub const DEFAULT_STREAM_MAX_LEN: u64 = 10_000;

fn default_stream_max_len() -> u64 {
    DEFAULT_STREAM_MAX_LEN
}

fn default_channel() -> String {
    DEFAULT_CHANNEL.to_string()
}

impl Config {
    /// `[redis]` or `[[targets]]`, one of them: [`Config::targets`] lists
    /// every target and [`Config::redis`] is the first.
    pub(super) fn settle_targets(mut self) -> Result<Config, String> {
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

    /// The checks of every target, and that their names and URLs differ.
    pub(super) fn validate_targets(&self, problems: &mut Vec<String>) {
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
}

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
    if !redis.stream.is_empty() {
        let same_slot = |a: &str, b: &str| {
            crate::redis::cluster::slot_of(a.as_bytes())
                == crate::redis::cluster::slot_of(b.as_bytes())
        };
        if redis.channel.is_empty() {
            problems.push(format!(
                "{at}.stream: events are off ({at}.channel is empty): set a channel, or remove the stream"
            ));
        } else if redis.cluster
            && !same_slot(
                &redis.stream,
                &pgci_protocol::events::sequence_key(&redis.channel),
            )
        {
            problems.push(format!(
                "{at}.stream: {:?} is in another hash slot than the channel {:?}: on a cluster name it like {:?}",
                redis.stream,
                redis.channel,
                pgci_protocol::events::stream_name_like(&redis.channel)
            ));
        }
        if !(1..=10_000_000).contains(&redis.stream_max_len) {
            problems.push(format!(
                "{at}.stream_max_len: must be between 1 and 10000000 (the default is {DEFAULT_STREAM_MAX_LEN})"
            ));
        }
    }
    if redis.cluster
        && !redis.channel.is_empty()
        && crate::redis::cluster::slot_of(redis.channel.as_bytes())
            != crate::redis::cluster::slot_of(
                pgci_protocol::events::sequence_key(&redis.channel).as_bytes(),
            )
    {
        problems.push(format!(
            "{at}.channel: {:?} has a '}}' before any hash tag, so no record of its events' numbers can share its hash slot: choose a channel without braces",
            redis.channel
        ));
    }
    if redis.cluster && (redis.ca_cert.is_some() || redis.url.expose().starts_with("rediss://")) {
        problems.push(format!("{at}.cluster: TLS (rediss://, ca_cert) is not supported in cluster mode yet: use redis:// inside a private network, or one server"));
    }
}
