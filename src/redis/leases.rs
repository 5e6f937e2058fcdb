//! The lease functions in Redis (see [`pgci_protocol::functions`], shared
//! with the app clients), and loading them over a connection of its own for
//! `setup`.

pub use pgci_protocol::functions::*;

/// Loads the functions over a connection of its own (for `setup`).
pub async fn load_once(
    url: &crate::secret::SecretUrl,
    ca_cert: Option<&std::path::Path>,
) -> Result<Loaded, String> {
    let mut conn = super::connect_once(url, ca_cert).await?;
    load(&mut conn).await.map_err(|e| url.scrub(&e.to_string()))
}
