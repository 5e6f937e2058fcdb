//! The least-privilege Redis user for the daemon, as an ACL file line
//! (`redis-acl`): only the commands the daemon sends, only the keys its
//! rules render (with the version keys of refreshed ones, its own
//! position record and its events' sequence record and stream), and only
//! its events channel.
//!
//! The password is the one in `redis.url`, written as its SHA-256 (`#…`),
//! so the line can be kept in version control and never shows the secret.
//! `CONFIG` is left out on purpose: `CONFIG GET` can read other users'
//! passwords (`requirepass`, `masterauth`); without it the daemon reports
//! the RDB save schedule as unknown, as on managed services.

use sha2::{Digest, Sha256};

use crate::redis::position;
use crate::secret::SecretUrl;

/// What the daemon sends: the apply path (GET/SET/UNLINK/DEL inside the
/// version-guarded script, PUBLISH and HGET/HSET/HINCRBY on the sequence
/// record inside the events script, MULTI/EXEC), SUBSCRIBE to its own
/// channel (the status page's recent events), flushes (SCAN), the
/// lease functions it loads for readers (FUNCTION LOAD and LIST, SCRIPT
/// LOAD and EVALSHA where functions are missing), health (PING, INFO), and
/// what the client library sends on connect (HELLO, SELECT); and on a
/// Redis Cluster the slot map
/// (CLUSTER SLOTS), each master's replicas (ROLE), their acknowledgement
/// (WAIT) and a migrating slot's redirection (ASKING). `CLIENT
/// SETINFO`, which it also sends, is left out: Redis 7.0 does not know it
/// (an ACL file naming it does not load there), and the client library
/// ignores its refusal. FUNCTION (Redis 7.0+) and sharded events are
/// [`FUNCTION_COMMANDS`] and [`SHARDED_COMMANDS`], granted only where they
/// apply: Redis 6.2 refuses to load an ACL line that names a command it
/// does not know.
pub const DAEMON_COMMANDS: &[&str] = &[
    "get",
    "set",
    "unlink",
    "del",
    "publish",
    "hget",
    "hset",
    "hincrby",
    "subscribe",
    "multi",
    "exec",
    "scan",
    "evalsha",
    "eval",
    "script|load",
    "ping",
    "info",
    "cluster|slots",
    "role",
    "wait",
    "asking",
    "hello",
    "select",
];

/// Loading the lease library where Redis has Functions (7.0+).
pub const FUNCTION_COMMANDS: &[&str] = &["function|load", "function|list"];

/// The event stream (`redis.stream`).
pub const STREAM_COMMANDS: &[&str] = &["xadd"];

/// Sharded events (`redis.sharded_events`, Redis 7.0+).
pub const SHARDED_COMMANDS: &[&str] = &["spublish", "ssubscribe"];

/// The server a line is for.
#[derive(Debug, Clone, Copy)]
pub struct Server {
    /// Its `redis_version`, major and minor (Valkey reports 7.2).
    pub version: (u32, u32),
    /// Whether a target publishes sharded events.
    pub sharded_events: bool,
}

/// The ACL line of the daemon's user for `url`'s user and password, the
/// rules' key patterns, `channel` (empty: events off) and `stream` (empty:
/// none), with only the commands `server` knows and the daemon sends
/// there.
pub fn daemon_user(
    url: &SecretUrl,
    key_patterns: &[String],
    channel: &str,
    stream: &str,
    slots: &[String],
    server: Server,
) -> Result<String, String> {
    if server.sharded_events && server.version < (7, 0) {
        return Err(format!(
            "redis.sharded_events needs Redis 7.0 or later (--redis-version {}.{}): set sharded_events = false",
            server.version.0, server.version.1
        ));
    }
    let info = redis::IntoConnectionInfo::into_connection_info(url.expose()).map_err(|e| {
        format!(
            "redis.url {}: {}",
            url.redacted(),
            url.scrub(&e.to_string())
        )
    })?;
    let settings = info.redis_settings();
    let Some(password) = settings.password() else {
        return Err(format!(
            "redis.url {} has no password: put the daemon's user and password in it (redis://USER:PASSWORD@host:port) and run again",
            url.redacted()
        ));
    };
    let user = settings.username().unwrap_or("default");
    let mut parts = vec![format!("user {user} on #{}", sha256_hex(password))];
    for pattern in key_patterns {
        let pattern = file_safe(pattern);
        parts.push(format!("~{pattern}"));
        // The version key of a refreshed key: `{key}:pgci-version`.
        parts.push(format!("~{{{pattern}}}:pgci-version"));
    }
    for slot in slots {
        parts.push(format!("~{}", position::key(slot)));
        // The server origin the replication source last streamed from.
        if !slot.starts_with("outbox:") {
            parts.push(format!("~{}", super::origin::key(slot)));
        }
    }
    if !channel.is_empty() {
        let sequence = pgci_protocol::events::sequence_key(channel);
        parts.push(format!("~{}", file_safe(&literal_pattern(&sequence))));
        if !stream.is_empty() {
            parts.push(format!("~{}", file_safe(&literal_pattern(stream))));
        }
    }
    parts.push("resetchannels".to_string());
    if !channel.is_empty() {
        parts.push(format!("&{}", file_safe(&literal_pattern(channel))));
    }
    parts.push("-@all".to_string());
    let functions: &[&str] = if server.version >= (7, 0) {
        FUNCTION_COMMANDS
    } else {
        &[]
    };
    let sharded: &[&str] = if server.sharded_events {
        SHARDED_COMMANDS
    } else {
        &[]
    };
    let streamed: &[&str] = if !channel.is_empty() && !stream.is_empty() {
        STREAM_COMMANDS
    } else {
        &[]
    };
    let commands = DAEMON_COMMANDS
        .iter()
        .chain(streamed)
        .chain(functions)
        .chain(sharded);
    parts.extend(commands.map(|c| format!("+{c}")));
    Ok(parts.join(" "))
}

/// A glob pattern matching exactly `text` (the channel is a name, not a
/// pattern: a `*` in it must not grant every channel).
fn literal_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len());
    for ch in text.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(ch);
    }
    pattern
}

/// `pattern` with each character an ACL file line cannot hold (the file
/// splits rules on spaces; quotes and control characters break the line)
/// matched by `?` instead: one character wider, never narrower, and a
/// file Redis loads.
fn file_safe(pattern: &str) -> String {
    pattern
        .chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || c == '"' || c == '\'' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_only_what_the_daemon_needs_and_hides_the_password() {
        let url = SecretUrl::new("redis://pgci:s3cret@127.0.0.1:6379/0");
        let line = daemon_user(
            &url,
            &["profile:user:*".into()],
            "cache-invalidation",
            "",
            &["pg_cache_invalidator".to_string()],
            REDIS_7,
        )
        .expect("line");
        assert!(line.starts_with("user pgci on #"), "{line}");
        assert!(!line.contains("s3cret"));
        assert!(line.contains(&sha256_hex("s3cret")));
        assert!(line.contains(" ~profile:user:* ~{profile:user:*}:pgci-version ~pgci:position:pg_cache_invalidator ~pgci:origin:pg_cache_invalidator ~pgci:events:{cache-invalidation} "), "{line}");
        assert!(
            line.contains(" resetchannels &cache-invalidation -@all +get "),
            "{line}"
        );
        assert!(!line.contains("config"), "{line}");
        let err = daemon_user(
            &SecretUrl::new("redis://127.0.0.1:6379"),
            &[],
            "",
            "",
            &[],
            REDIS_7,
        )
        .unwrap_err();
        assert!(err.contains("has no password"), "{err}");
    }

    const REDIS_7: Server = Server {
        version: (7, 0),
        sharded_events: false,
    };

    /// Redis 6.2 refuses a line naming FUNCTION or SPUBLISH: those are
    /// granted only to a 7.0+ server, sharded events only when configured.
    #[test]
    fn commands_a_server_does_not_know_are_left_out() {
        let url = SecretUrl::new("redis://pgci:s3cret@127.0.0.1:6379/0");
        let line = |server| daemon_user(&url, &[], "c", "", &["s".to_string()], server);
        let on_7 = line(REDIS_7).expect("line");
        assert!(on_7.ends_with(" +function|load +function|list"), "{on_7}");
        assert!(!on_7.contains("spublish"), "{on_7}");
        let sharded = line(Server {
            sharded_events: true,
            ..REDIS_7
        })
        .expect("line");
        assert!(sharded.ends_with(" +spublish +ssubscribe"), "{sharded}");
        let on_6 = line(Server {
            version: (6, 2),
            sharded_events: false,
        })
        .expect("line");
        assert!(
            !on_6.contains("function") && on_6.contains(" +script|load "),
            "{on_6}"
        );
        let err = line(Server {
            version: (6, 2),
            sharded_events: true,
        })
        .unwrap_err();
        assert!(err.contains("sharded_events = false"), "{err}");
    }

    /// A space in a channel or key pattern no longer splits the rule (Redis
    /// refused to start with the file), and a `*` in the channel is a
    /// literal star, not every channel.
    #[test]
    fn spaces_and_globs_in_names_stay_inside_their_rule() {
        let url = SecretUrl::new("redis://pgci:s3cret@127.0.0.1:6379/0");
        let line = daemon_user(
            &url,
            &["my key:*".into()],
            "cache events*",
            "ev stream*",
            &["s".to_string()],
            REDIS_7,
        )
        .expect("line");
        assert!(
            line.contains(" ~my?key:* ~{my?key:*}:pgci-version "),
            "{line}"
        );
        assert!(line.contains(" &cache?events\\* "), "{line}");
        assert!(
            line.contains(" ~pgci:events:{cache?events\\*} ~ev?stream\\* "),
            "{line}"
        );
        assert!(line.contains(" +xadd "), "{line}");
    }
}
