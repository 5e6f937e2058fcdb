//! Where the replication source keeps the server origin it last streamed
//! from (see `source::replication::origin`), so that a daemon stopped
//! during a promotion still notices it at its next start: one key per slot,
//! `pgci:origin:<slot>`, no expiry, written only when the origin changes.

use std::path::Path;

use crate::secret::SecretUrl;

/// The key of `slot`'s origin.
pub(crate) fn key(slot: &str) -> String {
    format!("pgci:origin:{slot}")
}

/// The stored origin of `slot`, over a connection of its own.
pub(crate) async fn read_once(
    url: &SecretUrl,
    ca_cert: Option<&Path>,
    slot: &str,
) -> Result<Option<String>, String> {
    let mut conn = super::connect_once(url, ca_cert).await?;
    redis::cmd("GET")
        .arg(key(slot))
        .query_async(&mut conn)
        .await
        .map_err(|e| url.scrub(&e.to_string()))
}

/// Stores `text` as `slot`'s origin.
pub(crate) async fn write_once(
    url: &SecretUrl,
    ca_cert: Option<&Path>,
    slot: &str,
    text: &str,
) -> Result<(), String> {
    let mut conn = super::connect_once(url, ca_cert).await?;
    redis::cmd("SET")
        .arg(key(slot))
        .arg(text)
        .query_async(&mut conn)
        .await
        .map_err(|e| url.scrub(&e.to_string()))
}
