//! Loads the lease functions ([`crate::lease`]) into Redis, so app readers
//! find them: as a function library where Redis has Functions (7.0 and
//! later), else as scripts by SHA. Clients fall back to sending the script
//! themselves, so a Redis restarted without persistence (which forgets
//! both) only costs them one round-trip.

use redis::aio::ConnectionLike;
use redis::RedisError;

use crate::lease;

/// How the functions were loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Library `pgci` was already loaded with this code.
    Current,
    /// `FUNCTION LOAD REPLACE` of library `pgci`.
    Functions,
    /// `SCRIPT LOAD` of each body (Redis without Functions).
    Scripts,
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Loaded::Current => "already loaded",
            Loaded::Functions => "function library loaded",
            Loaded::Scripts => "scripts loaded (no Redis Functions)",
        })
    }
}

/// Loads (or replaces) the lease functions.
pub async fn load<C: ConnectionLike>(conn: &mut C) -> Result<Loaded, RedisError> {
    let library = lease::library();
    let listed: Result<redis::Value, RedisError> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(lease::LIBRARY)
        .arg("WITHCODE")
        .query_async(conn)
        .await;
    if let Ok(listed) = listed {
        if holds_code(&listed, &library) {
            return Ok(Loaded::Current);
        }
    }
    let loaded: Result<String, RedisError> = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&library)
        .query_async(conn)
        .await;
    match loaded {
        Ok(_) => Ok(Loaded::Functions),
        Err(error) if is_unknown_command(&error) => {
            for (_, body) in lease::FUNCTIONS {
                let _: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(body)
                    .query_async(conn)
                    .await?;
            }
            Ok(Loaded::Scripts)
        }
        Err(error) => Err(error),
    }
}

/// Whether a `FUNCTION LIST … WITHCODE` reply holds exactly `code`.
fn holds_code(listed: &redis::Value, code: &str) -> bool {
    match listed {
        redis::Value::BulkString(bytes) => bytes == code.as_bytes(),
        redis::Value::SimpleString(text) => text == code,
        redis::Value::VerbatimString { text, .. } => text == code,
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().any(|v| holds_code(v, code))
        }
        redis::Value::Map(pairs) => pairs.iter().any(|(_, v)| holds_code(v, code)),
        _ => false,
    }
}

/// Redis before 7.0 answers `ERR unknown command 'FUNCTION'`.
pub fn is_unknown_command(error: &RedisError) -> bool {
    error
        .to_string()
        .to_ascii_lowercase()
        .contains("unknown command")
}

/// `FCALL` of a function no library registered (a Redis that forgot them).
pub fn is_missing_function(error: &RedisError) -> bool {
    error
        .to_string()
        .to_ascii_lowercase()
        .contains("function not found")
}
