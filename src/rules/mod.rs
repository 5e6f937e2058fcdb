//! Rules: which Redis keys a change to which table touches.
//!
//! A [`RuleSet`] is the compiled form of the `[[rules]]` entries: table
//! names split into schema and name, key templates parsed. It is checked
//! against the live database at start-up (see [`crate::catalog`]) and bound
//! to the stream's relations by [`crate::plan`].

pub mod template;

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

pub use template::{KeyTemplate, Part, TemplateError};

use crate::config::RuleConfig;

/// What the daemon does with a rule's keys when a row changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Remove the keys; the app's next read repopulates them.
    #[default]
    Delete,
    /// Write the new row into the keys.
    Refresh,
}

impl Action {
    /// The name used in events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Delete => "delete",
            Action::Refresh => "refresh",
        }
    }
}

/// A schema-qualified table name, compared case-sensitively as stored in
/// the catalog.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// The schema (`public` when the rule omits it).
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table`.
    pub fn parse(text: &str) -> Option<TableName> {
        let (schema, name) = text.split_once('.').unwrap_or(("public", text));
        let valid = |s: &str| !s.is_empty() && s.len() <= 63 && !s.contains(['.', '"']);
        (valid(schema) && valid(name)).then(|| TableName {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// The name as SQL, each part double-quoted: `"public"."profiles"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The watched table.
    pub table: TableName,
    /// The keys a row of it maps to.
    pub keys: Vec<KeyTemplate>,
    /// What to do with them.
    pub action: Action,
}

/// Every rule, grouped by table in the order tables first appear.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    tables: Vec<(TableName, Vec<Rule>)>,
}

impl RuleSet {
    /// Compiles the configured rules; returns one message per problem,
    /// each naming the field (`rules[1].keys[0]: ...`).
    pub fn compile(configs: &[RuleConfig]) -> Result<RuleSet, Vec<String>> {
        let mut problems = Vec::new();
        let mut set = RuleSet::default();
        if configs.is_empty() {
            problems.push("rules: no [[rules]] given: add at least one table to watch".to_string());
        }
        for (i, rc) in configs.iter().enumerate() {
            let Some(table) = TableName::parse(&rc.table) else {
                problems.push(format!(
                    "rules[{i}].table: {:?} is not a table name like \"public.profiles\"",
                    rc.table
                ));
                continue;
            };
            if rc.action == Action::Refresh {
                problems.push(format!(
                    "rules[{i}].action: \"refresh\" is not available in this version: use \"delete\""
                ));
            }
            if rc.keys.is_empty() {
                problems.push(format!(
                    "rules[{i}].keys: empty: give at least one key template"
                ));
            }
            let mut keys = Vec::new();
            for (j, text) in rc.keys.iter().enumerate() {
                match KeyTemplate::parse(text) {
                    Ok(t) => keys.push(t),
                    Err(e) => problems.push(format!("rules[{i}].keys[{j}]: {e}")),
                }
            }
            let rule = Rule {
                table: table.clone(),
                keys,
                action: rc.action,
            };
            match set.tables.iter_mut().find(|(t, _)| *t == table) {
                Some((_, rules)) => rules.push(rule),
                None => set.tables.push((table, vec![rule])),
            }
        }
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems)
        }
    }

    /// The watched tables with their rules.
    pub fn tables(&self) -> impl Iterator<Item = (&TableName, &[Rule])> {
        self.tables.iter().map(|(t, r)| (t, r.as_slice()))
    }

    /// The rules of `table`, if it is watched.
    pub fn rules_for(&self, schema: &str, name: &str) -> Option<(&TableName, &[Rule])> {
        self.tables
            .iter()
            .find(|(t, _)| t.schema == schema && t.name == name)
            .map(|(t, r)| (t, r.as_slice()))
    }

    /// Every column any key template of `table` uses.
    pub fn key_columns(rules: &[Rule]) -> BTreeSet<String> {
        rules
            .iter()
            .flat_map(|r| r.keys.iter())
            .flat_map(|k| k.columns())
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(table: &str, keys: &[&str]) -> RuleConfig {
        RuleConfig {
            table: table.to_string(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            action: Action::Delete,
        }
    }

    #[test]
    fn groups_rules_by_table_and_collects_key_columns() {
        let set = RuleSet::compile(&[
            rule("public.user_tokens", &["balance:user:{user_id}"]),
            rule("profiles", &["profile:user:{id}"]),
            rule("public.user_tokens", &["b:{user_id}:t:{token_id}"]),
        ])
        .expect("valid");
        let tables: Vec<_> = set
            .tables()
            .map(|(t, r)| (t.to_string(), r.len()))
            .collect();
        assert_eq!(
            tables,
            [
                ("public.user_tokens".to_string(), 2),
                ("public.profiles".to_string(), 1)
            ]
        );
        let (_, rules) = set.rules_for("public", "user_tokens").expect("watched");
        let cols: Vec<_> = RuleSet::key_columns(rules).into_iter().collect();
        assert_eq!(cols, ["token_id", "user_id"]);
    }

    #[test]
    fn reports_every_problem_with_its_field() {
        let errs = RuleSet::compile(&[
            rule("a.b.c", &["x:{id}"]),
            rule("public.t", &["x:{id", "y"]),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("rules[0].table"));
        assert!(errs[1].starts_with("rules[1].keys[0]"));
        assert!(errs[2].starts_with("rules[1].keys[1]"));
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        let t = TableName::parse("my schema.Odd\"Name").map(|t| t.quoted());
        assert_eq!(t, None, "quotes inside names are refused");
        let t = TableName::parse("s.Mixed Case").expect("valid");
        assert_eq!(t.quoted(), "\"s\".\"Mixed Case\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
