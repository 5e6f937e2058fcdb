//! Key templates: `profile:user:{id}`, parsed and rendered here.
//!
//! Parsed once when the configuration loads into literal and column parts;
//! bound to a table's column positions when the source describes the table
//! ([`KeyTemplate::bind`]); rendered per row by concatenation
//! ([`BoundKey::render`]), with no parsing on the hot path. A placeholder
//! whose column is NULL, or whose value did not travel, yields no key: it
//! is counted, never rendered as "null".

use std::fmt;

use crate::change::{Row, Value};
use crate::plan::PlanStats;
use crate::telemetry::metrics::KEYS_SKIPPED_TOTAL;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as is.
    Literal(String),
    /// A `{column}` placeholder.
    Column(String),
}

/// A parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    source: String,
    parts: Vec<Part>,
}

/// Why a template text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The template is empty.
    #[error("key template is empty")]
    Empty,
    /// `{` without `}`.
    #[error("key template {0:?} has a '{{' without a closing '}}'")]
    Unclosed(String),
    /// `}` without `{`.
    #[error("key template {0:?} has a '}}' without an opening '{{'")]
    Unopened(String),
    /// `{}`.
    #[error("key template {0:?} has an empty placeholder '{{}}'")]
    EmptyPlaceholder(String),
    /// No placeholder at all: every row would hit the same key.
    #[error("key template {0:?} has no {{column}} placeholder")]
    NoPlaceholder(String),
    /// Starts with a placeholder: TRUNCATE could only flush it with `*`.
    #[error("key template {0:?} must start with a literal prefix such as \"profile:user:\" so TRUNCATE can flush it by pattern")]
    NoLiteralPrefix(String),
}

impl KeyTemplate {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<KeyTemplate, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let open = rest.find('{');
            let close = rest.find('}');
            match (open, close) {
                (None, None) => {
                    parts.push(Part::Literal(rest.to_string()));
                    rest = "";
                }
                (None, Some(_)) => return Err(TemplateError::Unopened(text.to_string())),
                (Some(o), Some(c)) if c < o => {
                    return Err(TemplateError::Unopened(text.to_string()))
                }
                (Some(_), None) => return Err(TemplateError::Unclosed(text.to_string())),
                (Some(o), Some(c)) => {
                    if o > 0 {
                        parts.push(Part::Literal(rest[..o].to_string()));
                    }
                    let name = &rest[o + 1..c];
                    if name.is_empty() {
                        return Err(TemplateError::EmptyPlaceholder(text.to_string()));
                    }
                    if name.contains('{') {
                        return Err(TemplateError::Unclosed(text.to_string()));
                    }
                    parts.push(Part::Column(name.to_string()));
                    rest = &rest[c + 1..];
                }
            }
        }
        if !parts.iter().any(|p| matches!(p, Part::Column(_))) {
            return Err(TemplateError::NoPlaceholder(text.to_string()));
        }
        if !matches!(parts.first(), Some(Part::Literal(_))) {
            return Err(TemplateError::NoLiteralPrefix(text.to_string()));
        }
        Ok(KeyTemplate {
            source: text.to_string(),
            parts,
        })
    }

    /// The parts in order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The column names the template uses, in order, possibly repeated.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// A Redis `SCAN MATCH` pattern for every key this template can
    /// produce: literals glob-escaped, placeholders as `*`.
    pub fn scan_pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Literal(text) => {
                    for ch in text.chars() {
                        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
                            pattern.push('\\');
                        }
                        pattern.push(ch);
                    }
                }
                Part::Column(_) => pattern.push('*'),
            }
        }
        pattern
    }
}

impl KeyTemplate {
    /// Reads a key back into the column values it was rendered from, or
    /// `None` when the template cannot have produced it. A placeholder
    /// takes the shortest text up to the next literal (the last one takes
    /// the rest); a column used twice must have the same value both times.
    pub fn match_key(&self, key: &str) -> Option<Vec<(&str, String)>> {
        let mut values: Vec<(&str, String)> = Vec::new();
        let mut rest = key;
        let mut parts = self.parts.iter().peekable();
        while let Some(part) = parts.next() {
            match part {
                Part::Literal(text) => rest = rest.strip_prefix(text.as_str())?,
                Part::Column(column) => {
                    let value = match parts.peek() {
                        Some(Part::Literal(next)) => {
                            let end = rest.find(next.as_str())?;
                            let value = &rest[..end];
                            rest = &rest[end..];
                            value
                        }
                        // Two adjacent placeholders cannot be told apart.
                        Some(Part::Column(_)) => return None,
                        None => std::mem::take(&mut rest),
                    };
                    if value.is_empty() {
                        return None;
                    }
                    match values.iter().find(|(c, _)| c == column) {
                        Some((_, seen)) if seen != value => return None,
                        Some(_) => {}
                        None => values.push((column.as_str(), value.to_string())),
                    }
                }
            }
        }
        rest.is_empty().then_some(values)
    }

    /// How many literal characters the template has: when several
    /// templates match a key, the one with more literal text is the one
    /// that rendered it (`balance:user:{u}:token:{t}` over
    /// `balance:user:{u}`).
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(t) => t.len(),
                Part::Column(_) => 0,
            })
            .sum()
    }
}

impl fmt::Display for KeyTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A template bound to a table's column positions, ready to render.
#[derive(Debug)]
pub struct BoundKey {
    parts: Vec<BoundPart>,
}

#[derive(Debug)]
enum BoundPart {
    Literal(String),
    Column(usize),
}

/// The outcome of rendering one template for one row.
#[derive(Debug, PartialEq, Eq)]
pub enum Rendered {
    /// The key.
    Key(String),
    /// A placeholder's column is NULL.
    Null,
    /// A placeholder's value did not travel.
    Unavailable,
}

impl KeyTemplate {
    /// Binds the template to column positions; `position` finds a column
    /// by name. The error is the first column it does not find.
    pub fn bind(&self, position: impl Fn(&str) -> Option<usize>) -> Result<BoundKey, String> {
        let parts = self
            .parts
            .iter()
            .map(|part| match part {
                Part::Literal(text) => Ok(BoundPart::Literal(text.clone())),
                Part::Column(col) => position(col)
                    .map(BoundPart::Column)
                    .ok_or_else(|| col.clone()),
            })
            .collect::<Result<_, _>>()?;
        Ok(BoundKey { parts })
    }
}

impl BoundKey {
    /// Renders the key for `row`.
    pub fn render(&self, row: &Row) -> Rendered {
        let mut key = String::with_capacity(64);
        for part in &self.parts {
            match part {
                BoundPart::Literal(text) => key.push_str(text),
                BoundPart::Column(i) => match row.get(*i) {
                    Some(Value::Text(bytes)) => key.push_str(&String::from_utf8_lossy(bytes)),
                    Some(Value::Null) => return Rendered::Null,
                    Some(Value::Unchanged) | None => return Rendered::Unavailable,
                },
            }
        }
        Rendered::Key(key)
    }
}

/// Renders every template for `row` into `keys` (without duplicates),
/// counting the keys that could not be rendered.
pub fn render_all(
    templates: &[BoundKey],
    row: &Row,
    keys: &mut Vec<String>,
    stats: &mut PlanStats,
) {
    for template in templates {
        match template.render(row) {
            Rendered::Key(key) => {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            Rendered::Null => {
                stats.null_keys_skipped += 1;
                metrics::counter!(KEYS_SKIPPED_TOTAL, "reason" => "null").increment(1);
            }
            Rendered::Unavailable => {
                stats.unavailable_keys_skipped += 1;
                metrics::counter!(KEYS_SKIPPED_TOTAL, "reason" => "unavailable").increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys read back into the values that rendered them; keys another
    /// template rendered, or that no row could render, do not match.
    #[test]
    fn keys_match_back_to_their_values() {
        let t = KeyTemplate::parse("balance:user:{user_id}:token:{token_id}").expect("valid");
        assert_eq!(
            t.match_key("balance:user:u1:token:t9"),
            Some(vec![
                ("user_id", "u1".to_string()),
                ("token_id", "t9".to_string())
            ])
        );
        assert_eq!(t.match_key("balance:user:u1"), None);
        assert_eq!(t.match_key("balance:user::token:t9"), None);
        let short = KeyTemplate::parse("balance:user:{user_id}").expect("valid");
        assert_eq!(
            short.match_key("balance:user:u1:token:t9"),
            Some(vec![("user_id", "u1:token:t9".to_string())])
        );
        assert!(t.literal_len() > short.literal_len());
        let twice = KeyTemplate::parse("p:{id}:{id}x").expect("valid");
        assert_eq!(
            twice.match_key("p:a:ax"),
            Some(vec![("id", "a".to_string())])
        );
        assert_eq!(twice.match_key("p:a:bx"), None);
        assert_eq!(
            KeyTemplate::parse("p:{a}{b}")
                .expect("valid")
                .match_key("p:xy"),
            None
        );
    }

    #[test]
    fn parses_literals_and_columns() {
        let t = KeyTemplate::parse("balance:user:{user_id}:token:{token_id}").expect("valid");
        assert_eq!(
            t.parts(),
            &[
                Part::Literal("balance:user:".into()),
                Part::Column("user_id".into()),
                Part::Literal(":token:".into()),
                Part::Column("token_id".into()),
            ]
        );
        assert_eq!(t.columns().collect::<Vec<_>>(), ["user_id", "token_id"]);
        assert_eq!(t.scan_pattern(), "balance:user:*:token:*");
    }

    #[test]
    fn binds_and_renders() {
        use bytes::Bytes;
        let t = KeyTemplate::parse("b:{user_id}:t:{token_id}").expect("valid");
        let columns = ["id", "user_id", "token_id"];
        let bound = t
            .bind(|c| columns.iter().position(|n| *n == c))
            .expect("binds");
        let text = |s: &str| Value::Text(Bytes::copy_from_slice(s.as_bytes()));
        let row = vec![text("1"), text("u"), text("t")];
        assert_eq!(bound.render(&row), Rendered::Key("b:u:t:t".into()));
        let row = vec![text("1"), Value::Null, text("t")];
        assert_eq!(bound.render(&row), Rendered::Null);
        let row = vec![text("1"), text("u"), Value::Unchanged];
        assert_eq!(bound.render(&row), Rendered::Unavailable);
        assert_eq!(bound.render(&vec![text("1")]), Rendered::Unavailable);
        let missing = t.bind(|c| (c == "user_id").then_some(0)).unwrap_err();
        assert_eq!(missing, "token_id");
    }

    #[test]
    fn escapes_glob_characters_in_patterns() {
        let t = KeyTemplate::parse("a*[b]?\\:{id}").expect("valid");
        assert_eq!(t.scan_pattern(), "a\\*\\[b\\]\\?\\\\:*");
    }

    #[test]
    fn rejects_malformed_templates() {
        for (text, want) in [
            ("", TemplateError::Empty),
            ("p:{id", TemplateError::Unclosed("p:{id".into())),
            ("p:id}", TemplateError::Unopened("p:id}".into())),
            ("p:{}", TemplateError::EmptyPlaceholder("p:{}".into())),
            ("p:{a{b}", TemplateError::Unclosed("p:{a{b}".into())),
            ("profile", TemplateError::NoPlaceholder("profile".into())),
            ("{id}:x", TemplateError::NoLiteralPrefix("{id}:x".into())),
        ] {
            assert_eq!(KeyTemplate::parse(text), Err(want), "{text}");
        }
    }
}
