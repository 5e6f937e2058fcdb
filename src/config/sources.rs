//! `[replication]` and `[outbox]`: where each source keeps its objects and
//! how it reads, with their defaults.

use serde::Deserialize;

use super::DEFAULT_SLOT_AND_PUBLICATION;
use crate::duration::HumanDuration;
use crate::secret::SecretUrl;

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
    /// A hot standby (PostgreSQL 16+) to keep the slot on and decode from,
    /// offloading the primary; unset, the slot lives on the primary. The
    /// publication, heartbeats and write tokens stay on `postgres.url`'s
    /// primary. Same database, one host; `postgres.ssl_root_cert` applies.
    #[serde(default)]
    pub url: Option<SecretUrl>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            slot: default_slot(),
            publication: default_slot(),
            heartbeat_interval: default_heartbeat(),
            buffer_messages: default_buffer_messages(),
            application_name: default_application_name(),
            url: None,
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
