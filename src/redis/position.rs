//! The applied position in Redis (see [`pgci_protocol::position`], shared
//! with the app clients' write tokens), and the reads and writes the CLI
//! verbs make over a connection of their own.

use std::path::Path;

pub use pgci_protocol::position::*;

use crate::lsn::Lsn;
use crate::secret::SecretUrl;

/// The recorded position of `slot`, read over a connection of its own (for
/// `status`).
pub async fn read_once(
    url: &SecretUrl,
    ca_cert: Option<&Path>,
    slot: &str,
) -> Result<Option<Lsn>, String> {
    let mut conn = super::connect_once(url, ca_cert).await?;
    let text: Option<String> = redis::cmd("GET")
        .arg(key(slot))
        .query_async(&mut conn)
        .await
        .map_err(|e| url.scrub(&e.to_string()))?;
    Ok(text.and_then(|t| t.parse().ok()))
}

/// Records `lsn` for `slot` unless a record exists (`SET … NX`): `setup`
/// does this when it creates the slot, so that the first `run` knows the
/// stream starts where the cache does. An existing record is kept: it is
/// older than a slot created now, which tells `run` to flush.
pub async fn record_if_absent(
    url: &SecretUrl,
    ca_cert: Option<&Path>,
    slot: &str,
    lsn: Lsn,
) -> Result<bool, String> {
    let mut conn = super::connect_once(url, ca_cert).await?;
    let set: Option<String> = redis::cmd("SET")
        .arg(key(slot))
        .arg(lsn.to_string())
        .arg("NX")
        .query_async(&mut conn)
        .await
        .map_err(|e| url.scrub(&e.to_string()))?;
    Ok(set.is_some())
}
