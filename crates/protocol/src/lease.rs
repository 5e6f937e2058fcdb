//! The lease protocol: how app readers fill the cache without racing the
//! daemon's invalidations.
//!
//! Cache-aside has a race no invalidator can close from its side alone: a
//! reader misses, reads the row, the row changes and the daemon deletes
//! the key, and only then does the reader store what it read — an old
//! value that stays until its TTL. Leases (Facebook's memcache, NSDI 2013)
//! close it: a miss stores a short-lived *lease marker* in the key itself,
//! and a fill succeeds only while the key still holds that marker. The
//! daemon's DEL and refresh SET replace the marker, so a fill that raced an
//! invalidation is refused. A reader that finds another's marker waits
//! briefly instead of loading too, which also stops thundering herds.
//!
//! ```text
//!  reader A: pgci_lease_get ─▶ miss: key = marker(A) ─▶ read row ─▶ pgci_lease_fill(A) ─▶ stored
//!  reader B:     pgci_lease_get ─▶ "wait" (A holds the lease) ─▶ retry ─▶ hit
//!  daemon:            DEL key (row changed) ──▶ A's fill finds no marker ─▶ refused
//! ```
//!
//! Every call touches one key, so it works unchanged in Redis Cluster. The
//! functions are a contract other clients implement (the TypeScript package
//! does): library `pgci`, functions `pgci_lease_get(key; token, lease_ms)`
//! → `["hit", value]` | `["lease", token]` | `["wait", ms_left]`,
//! `pgci_lease_fill(key; token, value, ttl_s)` → 1 stored | 0 refused, and
//! `pgci_lease_release(key; token)` → 1 | 0. Where Redis has no Functions
//! (before 7.0) the same bodies run as scripts by SHA.
//!
//! A marker is [`MARKER_PREFIX`] followed by the reader's token: it starts
//! with a NUL byte, so no JSON reader can take it for data.

/// What a lease marker starts with.
pub const MARKER_PREFIX: &str = "\u{0}pgci-lease:";
/// The function library's name.
pub const LIBRARY: &str = "pgci";
/// The name of the *get* function.
pub const GET: &str = "pgci_lease_get";
/// The name of the *fill* function.
pub const FILL: &str = "pgci_lease_fill";
/// The name of the *release* function.
pub const RELEASE: &str = "pgci_lease_release";

/// `KEYS[1]` the key; `ARGV` token, lease milliseconds.
const GET_BODY: &str = r#"
local v = redis.call('GET', KEYS[1])
local prefix = '\0pgci-lease:'
if not v then
  redis.call('SET', KEYS[1], prefix .. ARGV[1], 'PX', ARGV[2])
  return {'lease', ARGV[1]}
end
if string.sub(v, 1, #prefix) == prefix then
  return {'wait', tostring(redis.call('PTTL', KEYS[1]))}
end
return {'hit', v}
"#;

/// `KEYS[1]` the key; `ARGV` token, value, TTL seconds.
const FILL_BODY: &str = r#"
if redis.call('GET', KEYS[1]) == '\0pgci-lease:' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"#;

/// `KEYS[1]` the key; `ARGV` token.
const RELEASE_BODY: &str = r#"
if redis.call('GET', KEYS[1]) == '\0pgci-lease:' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// Each function's name and body.
pub const FUNCTIONS: [(&str, &str); 3] =
    [(GET, GET_BODY), (FILL, FILL_BODY), (RELEASE, RELEASE_BODY)];

/// The body run as a script (`EVALSHA`) where Functions are missing.
pub fn script(function: &str) -> Option<&'static str> {
    FUNCTIONS
        .iter()
        .find(|(name, _)| *name == function)
        .map(|(_, body)| *body)
}

/// The library `FUNCTION LOAD REPLACE` takes.
pub fn library() -> String {
    let mut text = format!("#!lua name={LIBRARY}\n");
    for (name, body) in FUNCTIONS {
        text.push_str(&format!(
            "redis.register_function('{name}', function(KEYS, ARGV)\n{body}\nend)\n"
        ));
    }
    text
}

/// Whether a stored value is a lease marker rather than data.
pub fn is_marker(value: &[u8]) -> bool {
    value.starts_with(MARKER_PREFIX.as_bytes())
}

/// The marker the daemon leaves where it deleted a key of a commit not
/// yet visible (`redis.fence_until_visible`): a lease no reader holds, so
/// readers wait for it (or read the database) and none can fill the key
/// until the daemon's second deletion, once the commit shows, removes it.
pub const FENCE: &str = "\u{0}pgci-lease:daemon-fence";

/// How long a fence lives at most (`PX`): far longer than a commit takes
/// to show once the daemon confirmed it (milliseconds), short enough that
/// a daemon killed in between costs its readers a few seconds of bypass.
pub const FENCE_MS: u64 = 10_000;

/// What `pgci_lease_get` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// The cached value.
    Hit(String),
    /// A miss: this reader holds the lease and should fill the key.
    Lease,
    /// Another reader holds the lease for this many more milliseconds.
    Wait(u64),
}

impl Got {
    /// Reads the function's reply (`[kind, value]`).
    pub fn parse(reply: &[String]) -> Option<Got> {
        match reply {
            [kind, value] if kind == "hit" => Some(Got::Hit(value.clone())),
            [kind, _] if kind == "lease" => Some(Got::Lease),
            [kind, ms] if kind == "wait" => Some(Got::Wait(ms.parse::<i64>().ok()?.max(0) as u64)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library registers every function under its contract name, and
    /// the marker prefix in the Lua bodies is the one Rust checks.
    #[test]
    fn library_registers_every_function_with_the_marker() {
        let lib = library();
        assert!(lib.starts_with("#!lua name=pgci\n"));
        for name in [GET, FILL, RELEASE] {
            assert!(
                lib.contains(&format!("register_function('{name}'")),
                "{name}"
            );
            assert!(script(name).is_some_and(|b| b.contains("'\\0pgci-lease:'")));
        }
        assert!(is_marker(format!("{MARKER_PREFIX}abc").as_bytes()));
        assert!(!is_marker(b"{\"id\":1}"));
    }

    /// Replies parse into what they mean; anything else is refused.
    #[test]
    fn replies_parse() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(Got::parse(&s(&["hit", "{}"])), Some(Got::Hit("{}".into())));
        assert_eq!(Got::parse(&s(&["lease", "t"])), Some(Got::Lease));
        assert_eq!(Got::parse(&s(&["wait", "120"])), Some(Got::Wait(120)));
        assert_eq!(Got::parse(&s(&["wait", "-2"])), Some(Got::Wait(0)));
        assert_eq!(Got::parse(&s(&["what"])), None);
    }
}
