//! Redirections a node answers with (`MOVED`, `ASK`, `TRYAGAIN`), read
//! from an error or from an aborted transaction's replies.

use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::Addr;

#[derive(Debug, PartialEq)]
pub(super) enum Redirect {
    /// The slot has a new owner.
    Moved,
    /// The key is (or is to be) at this node, which is importing the slot.
    Ask(Addr),
    /// A multi-key command's keys are split by a migration.
    TryAgain,
}

/// The redirection `error` (or a command of an aborted transaction)
/// carries, if any.
pub(super) fn redirection(error: &RedisError) -> Option<Redirect> {
    let errors = error.clone().into_server_errors()?;
    let mut found = None;
    for (_, server_error) in errors.iter() {
        let redirect = match server_error.kind() {
            Some(ServerErrorKind::Moved) => Redirect::Moved,
            Some(ServerErrorKind::TryAgain) => Redirect::TryAgain,
            Some(ServerErrorKind::Ask) => match server_error.details().and_then(ask_target) {
                Some(addr) => Redirect::Ask(addr),
                None => continue,
            },
            _ => continue,
        };
        // MOVED wins: the map is out of date for the whole transaction.
        if redirect == Redirect::Moved {
            return Some(Redirect::Moved);
        }
        found.get_or_insert(redirect);
    }
    found
}

/// `host:port` from an ASK's details (`3999 127.0.0.1:6381`).
pub(super) fn ask_target(details: &str) -> Option<Addr> {
    let (host, port) = details.split_whitespace().nth(1)?.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

pub(super) fn too_many_redirects(slot: u16) -> RedisError {
    RedisError::from((
        ErrorKind::ClusterConnectionNotFound,
        "too many redirections",
        format!("slot {slot} kept moving"),
    ))
}
