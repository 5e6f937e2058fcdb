//! Reading the file and overlaying the environment (`DATABASE_URL`,
//! `REDIS_URL`, `PGCI__SECTION__KEY`); errors on one line, without the
//! file's text.

use std::path::Path;

use super::{Config, ConfigError, ENV_PREFIX};

impl Config {
    /// Reads `path`, then applies `DATABASE_URL`, `REDIS_URL` and
    /// `PGCI__SECTION__KEY` overrides from the environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "config file {} does not exist: pass --config FILE",
                path.display()
            )));
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(false),
            );
        for (var, key) in [("DATABASE_URL", "postgres.url"), ("REDIS_URL", "redis.url")] {
            if let Ok(value) = std::env::var(var) {
                if !value.is_empty() {
                    builder = builder
                        .set_override(key, value)
                        .map_err(|e| ConfigError::Load(format!("{var}: {e}")))?;
                }
            }
        }
        let raw = builder.build().map_err(|e| {
            ConfigError::Load(format!(
                "cannot read config {}: {} (fix the file's TOML syntax)",
                path.display(),
                without_snippets(&e.to_string())
            ))
        })?;
        let config = raw.try_deserialize::<Config>().map_err(|e| {
            ConfigError::Load(format!(
                "invalid config {}: {}",
                path.display(),
                without_snippets(&e.to_string())
            ))
        })?;
        config
            .settle_targets()
            .map_err(|e| ConfigError::Load(format!("invalid config {}: {e}", path.display())))
    }
}

/// A parser's error as one line, without the snippet of the file it
/// quotes (`2 | url = "postgres://user:password@…`): the line in error may
/// hold a secret, and logs must not.
fn without_snippets(text: &str) -> String {
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            let after_number = line.trim_start_matches(|c: char| c.is_ascii_digit());
            !after_number.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    with_dotted_keys(&one_line(&kept.join(": ")))
}

/// The configuration crate names a field inside an array without its dot
/// (`rules[0]action`): written as the file would be (`rules[0].action`).
fn with_dotted_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_')
        {
            out.push('.');
        }
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
