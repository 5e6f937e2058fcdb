//! The checks of values outside the rules and targets: every problem at
//! once, each naming its dotted field and the fix.

use super::{Config, ConfigError, SecretUrl};

impl Config {
    /// Checks every value outside the rules (see `plan::rules::compile`,
    /// which also runs this); returns all problems.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        check_url(
            "postgres.url",
            &self.postgres.url,
            &["postgres", "postgresql"],
            &mut problems,
        );
        if let Some(url) = &self.replication.url {
            check_url(
                "replication.url",
                url,
                &["postgres", "postgresql"],
                &mut problems,
            );
            if self.postgres.source != super::SourceKind::Replication {
                problems.push(
                    "replication.url: the outbox source has no slot to decode on a standby: remove replication.url".to_string(),
                );
            }
        }
        self.validate_targets(&mut problems);
        if self.outbox.schema.starts_with("pg_") {
            problems.push(format!(
                "outbox.schema: {:?} starts with \"pg_\", which PostgreSQL reserves: choose another name such as \"cache_invalidator\"",
                self.outbox.schema
            ));
        }
        if !(16..=65_536).contains(&self.replication.buffer_messages) {
            problems.push("replication.buffer_messages: must be between 16 and 65536".to_string());
        }
        if self.setup.lock_timeout.0.is_zero() {
            problems.push(
                "setup.lock_timeout: must be more than 0s (0 would wait forever)".to_string(),
            );
        }
        if self.outbox.poll_interval.0.is_zero() {
            problems.push("outbox.poll_interval: must be more than 0s".to_string());
        }
        if self.outbox.rotate_interval.0.is_zero() {
            problems.push("outbox.rotate_interval: must be more than 0s".to_string());
        }
        if !(1..=100_000).contains(&self.outbox.batch_size) {
            problems.push("outbox.batch_size: must be between 1 and 100000".to_string());
        }
        check_identifier(
            "replication.slot",
            &self.replication.slot,
            true,
            &mut problems,
        );
        check_identifier(
            "replication.publication",
            &self.replication.publication,
            true,
            &mut problems,
        );
        check_identifier("outbox.schema", &self.outbox.schema, false, &mut problems);
        let schema = &self.outbox.schema;
        let plain = schema.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && schema
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !schema.is_empty() && !plain {
            problems.push(format!(
                "outbox.schema: {:?} may contain only letters, digits and underscores, starting with a letter or underscore (it is written into SQL and a function body)",
                self.outbox.schema
            ));
        }
        check_identifier(
            "replication.application_name",
            &self.replication.application_name,
            false,
            &mut problems,
        );
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:9187",
                self.http.listen
            ));
        }
        if self.verify.sample_per_second > 1000 {
            problems.push(
                "verify.sample_per_second: at most 1000 (each check is a query on the database)"
                    .to_string(),
            );
        }
        if self.verify.sample_per_second > 0 && self.redis.cluster {
            problems.push("verify.sample_per_second: the sampler reads one Redis server only so far, not a cluster: set it to 0".to_string());
        }
        self.validate_groups(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

pub(super) fn check_url(
    field: &str,
    url: &SecretUrl,
    schemes: &[&str],
    problems: &mut Vec<String>,
) {
    if url.expose().is_empty() {
        problems.push(format!(
            "{field}: missing: set it to a {}:// URL",
            schemes[0]
        ));
        return;
    }
    let scheme = url.expose().split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) => {}
        _ => problems.push(format!(
            "{field}: {} is not a {}:// URL",
            url.redacted(),
            schemes[0]
        )),
    }
    if url.password_needs_encoding() {
        problems.push(format!(
            "{field}: the password holds / ? # or @, which a URL must percent-encode: write / as %2F, ? as %3F, # as %23, @ as %40"
        ));
    }
}

/// Slot and publication names may hold only lower-case letters, digits and
/// underscores: the server's rule for slots, and the transport sends both
/// unquoted. Other identifiers are quoted wherever we use them, so only
/// emptiness and length matter.
pub(super) fn check_identifier(
    field: &str,
    value: &str,
    slot_rules: bool,
    problems: &mut Vec<String>,
) {
    if value.is_empty() || value.len() > 63 {
        problems.push(format!("{field}: must be 1 to 63 characters long"));
    } else if slot_rules
        && !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        problems.push(format!(
            "{field}: {value:?} may contain only lower-case letters, digits and underscores"
        ));
    }
}
