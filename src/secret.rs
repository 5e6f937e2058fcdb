//! Secrets in configuration: connection URLs whose password never reaches
//! a log line, an error message or a `Debug` print.

use std::fmt;

use serde::Deserialize;

/// A connection URL whose password never reaches a log line: `Debug` and
/// `Display` print it redacted; [`SecretUrl::expose`] gives the real text
/// to the one place that connects.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// `host:port` (or the socket path) of the URL, with no user,
    /// password, path or query: for metric labels.
    pub fn host_port(&self) -> String {
        let url = &self.0;
        let rest = url.find("://").map_or(url.as_str(), |i| &url[i + 3..]);
        let rest = rest.rfind('@').map_or(rest, |i| &rest[i + 1..]);
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        rest[..end].to_string()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Where the password of `scheme://user:password@host/...` is in `url`.
///
/// Passwords are often generated and hold `/ ? # @ :` without the
/// percent-encoding a URL needs, so the userinfo is taken to end at the
/// *last* `@`, and a password to start at the first `:` when that comes
/// before the first `@`. A query that holds an `@` is then redacted too,
/// which errs on the safe side.
fn password_span(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let last_at = rest.rfind('@')?;
    let colon = rest.find(':')?;
    let first_at = rest.find('@')?;
    (colon < first_at && colon < last_at).then(|| start + colon + 1..start + last_at)
}

/// Replaces the password of `scheme://user:password@host/...`, and any
/// `password=` query or key/value parameter, with `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(span) = password_span(&out) {
        out.replace_range(span, "***");
    }
    let mut from = 0;
    while let Some(pos) = out[from..].to_ascii_lowercase().find("password=") {
        let start = from + pos + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map_or(out.len(), |i| start + i);
        out.replace_range(start..end, "***");
        from = start + 3;
    }
    out
}

impl SecretUrl {
    /// Whether the password holds `/ ? # @` unencoded: such a URL does not
    /// mean what it looks like (the host would be read from the password).
    pub fn password_needs_encoding(&self) -> bool {
        password_span(self.expose())
            .is_some_and(|span| self.expose()[span].contains(['/', '?', '#', '@']))
    }

    /// `text` with every form of this URL's password (as written, and
    /// percent-decoded) replaced by `***`: for error messages of clients
    /// that may quote what they were given.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.replace(self.expose(), &self.redacted());
        if let Some(span) = password_span(self.expose()) {
            let raw = &self.expose()[span];
            for form in [raw.to_string(), percent_decode(raw)] {
                if form.len() >= 3 {
                    out = out.replace(&form, "***");
                }
            }
        }
        out
    }
}

/// `%XX` sequences decoded (invalid ones kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_has_no_credentials() {
        assert_eq!(
            SecretUrl::new("redis://app:p@ss/w?rd@cache.internal:6380/2").host_port(),
            "cache.internal:6380"
        );
        assert_eq!(
            SecretUrl::new("redis://127.0.0.1:6379").host_port(),
            "127.0.0.1:6379"
        );
    }

    #[test]
    fn redacts_passwords_in_every_form() {
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db:5432/postgres?sslmode=require"),
            "postgres://app:***@db:5432/postgres?sslmode=require"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("postgres://app@db/x?password=zz&sslmode=disable"),
            "postgres://app@db/x?password=***&sslmode=disable"
        );
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
        assert_eq!(
            redact_url("postgres://app@db:5432/x?sslmode=require"),
            "postgres://app@db:5432/x?sslmode=require",
            "no password, nothing redacted"
        );
        for password in [
            "p/ss?w@rd",
            "a:b@c#d",
            "x?y/z@",
            "@@::",
            "p%2Fss%40rd",
            "ünï/cødé",
        ] {
            for url in [
                format!("postgres://app:{password}@db.example.com:5432/postgres?sslmode=require"),
                format!("redis://:{password}@127.0.0.1:6379/0"),
                format!("rediss://default:{password}@cache:6380"),
            ] {
                let shown = redact_url(&url);
                assert!(!shown.contains(password), "{shown}");
                assert!(shown.contains("***"), "{shown}");
                let secret = SecretUrl::new(url.clone());
                assert_eq!(
                    secret.password_needs_encoding(),
                    password.contains(['/', '?', '#', '@']),
                    "{url}"
                );
                let said = secret.scrub(&format!(
                    "cannot parse {url} (password {})",
                    percent_decode(password)
                ));
                assert!(!said.contains(password), "{said}");
                assert!(!said.contains(&percent_decode(password)), "{said}");
            }
        }
        assert!(!format!("{:?}", SecretUrl::new("redis://u:hunter2@h")).contains("hunter2"));
    }
}
