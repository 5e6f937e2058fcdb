//! Rules: which Redis keys a change to which table touches.
//!
//! A [`RuleSet`] is the compiled form of the `[[rules]]` entries: table
//! names split into schema and name, key templates parsed (see
//! [`super::keys`]). It is checked against the live database at start-up
//! (see [`crate::db::catalog`]) and bound to the source's table schemas by
//! [`super::bind`].

use std::collections::BTreeSet;
use std::time::Duration;

pub use crate::change::TableName;
pub use crate::config::Action;
use crate::config::{Config, ConfigError, RuleConfig};
use crate::plan::keys::KeyTemplate;

/// The longest TTL a refresh rule may set: Redis refuses an expiry whose
/// milliseconds overflow (`invalid expire time`), and that refusal would
/// hold every batch. A hundred years is far below that and far above any
/// cache's need.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);
/// Checks the whole configuration and compiles its rules: every problem
/// of both at once, each naming its field.
pub fn compile(config: &Config) -> Result<RuleSet, ConfigError> {
    let mut problems = match config.validate() {
        Ok(()) => Vec::new(),
        Err(ConfigError::Invalid(lines)) => lines,
        Err(other) => return Err(other),
    };
    match RuleSet::compile(&config.rules) {
        Ok(rules) if problems.is_empty() => Ok(rules),
        Ok(_) => Err(ConfigError::Invalid(problems)),
        Err(errors) => {
            problems.extend(errors);
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The watched table.
    pub table: TableName,
    /// The keys a row of it maps to.
    pub keys: Vec<KeyTemplate>,
    /// The keys of the tag marks a row of it maps to
    /// (`pgci:tag:<tag template>`, see `pgci_protocol::tags`): deleted at
    /// each change, whatever the action.
    pub tags: Vec<KeyTemplate>,
    /// What to do with them.
    pub action: Action,
    /// `refresh`: how long a written value lives.
    pub ttl: Duration,
    /// `refresh`: which columns of the row are cached.
    pub columns: ColumnFilter,
    /// `refresh`: cache a query's answer instead of the row.
    pub query: Option<RuleQuery>,
    /// The keys hold the row's JSON (filtered by `columns`): a whole-row
    /// refresh rule, or a delete rule with `holds = "row"`. `verify` checks
    /// these (and query rules).
    pub holds_row: bool,
}

impl Rule {
    /// Its key templates and its tags' mark-key templates: every Redis key
    /// a row can make it touch.
    pub fn templates(&self) -> impl Iterator<Item = &KeyTemplate> {
        self.keys.iter().chain(&self.tags)
    }
}

/// Which columns a refreshed row carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnFilter {
    /// Every column.
    All,
    /// Only these.
    Include(Vec<String>),
    /// All but these.
    Exclude(Vec<String>),
}

impl ColumnFilter {
    /// Whether `column` is cached.
    pub fn keeps(&self, column: &str) -> bool {
        match self {
            ColumnFilter::All => true,
            ColumnFilter::Include(cols) => cols.iter().any(|c| c == column),
            ColumnFilter::Exclude(cols) => !cols.iter().any(|c| c == column),
        }
    }

    /// The columns it names.
    pub fn named(&self) -> &[String] {
        match self {
            ColumnFilter::All => &[],
            ColumnFilter::Include(cols) | ColumnFilter::Exclude(cols) => cols,
        }
    }
}

/// An aggregate key's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleQuery {
    /// The user's SQL, returning at most one row of one JSON value.
    pub sql: String,
    /// Row columns bound to `$1`, `$2`, … as text.
    pub params: Vec<String>,
}

impl RuleQuery {
    /// The statement actually run: the user's query as a scalar subquery
    /// cast to text, so any JSON-ish column type works and more than one
    /// row is an error rather than a silent pick.
    pub fn wrapped_sql(&self) -> String {
        format!("select ({})::text", self.sql.trim().trim_end_matches(';'))
    }
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
            let table = rc.table.clone();
            let refresh_only = |field: &str, problems: &mut Vec<String>| {
                problems.push(format!(
                    "rules[{i}].{field}: only used with action = \"refresh\": remove it or set the action"
                ));
            };
            let mut ttl = Duration::ZERO;
            let mut columns = ColumnFilter::All;
            let mut query = None;
            if rc.action == Action::Delete {
                for (field, set) in [
                    ("ttl", rc.ttl.is_some()),
                    ("columns", rc.columns.is_some()),
                    ("query", rc.query.is_some()),
                    ("params", rc.params.is_some()),
                ] {
                    if set {
                        refresh_only(field, &mut problems);
                    }
                }
            } else {
                match rc.ttl {
                    Some(t) if t.0 > MAX_TTL => problems.push(format!(
                        "rules[{i}].ttl: at most {}d (100 years): Redis refuses an expiry far beyond that, which would stall every table",
                        MAX_TTL.as_secs() / 86_400
                    )),
                    Some(t) if !t.0.is_zero() => ttl = t.0,
                    _ => problems.push(format!(
                        "rules[{i}].ttl: action = \"refresh\" needs a ttl such as \"1h\" or \"5m\""
                    )),
                }
                if let Some(c) = &rc.columns {
                    columns = match (&c.include, &c.exclude) {
                        (Some(inc), None) if !inc.is_empty() => ColumnFilter::Include(inc.clone()),
                        (None, Some(exc)) => ColumnFilter::Exclude(exc.clone()),
                        _ => {
                            problems.push(format!(
                                "rules[{i}].columns: give either a non-empty include = [...] or exclude = [...]"
                            ));
                            ColumnFilter::All
                        }
                    };
                }
                match (&rc.query, &rc.params) {
                    (Some(sql), params) => {
                        if rc.columns.is_some() {
                            problems.push(format!(
                                "rules[{i}].columns: not used with query: select the columns in the query"
                            ));
                        }
                        if sql.trim().is_empty() {
                            problems.push(format!("rules[{i}].query: empty"));
                        }
                        query = Some(RuleQuery {
                            sql: sql.clone(),
                            params: params.clone().unwrap_or_default(),
                        });
                    }
                    (None, Some(_)) => problems.push(format!(
                        "rules[{i}].params: only used with query: add the query or remove params"
                    )),
                    (None, None) => {}
                }
            }
            if rc.keys.is_empty() && rc.tags.is_empty() {
                problems.push(format!(
                    "rules[{i}].keys: empty: give at least one key template (or tags)"
                ));
            }
            let mut keys = Vec::new();
            for (j, text) in rc.keys.iter().enumerate() {
                match KeyTemplate::parse(text) {
                    Ok(t) => keys.push(t),
                    Err(e) => problems.push(format!("rules[{i}].keys[{j}]: {e}")),
                }
            }
            let mut tags = Vec::new();
            for (j, text) in rc.tags.iter().enumerate() {
                if text.trim().is_empty() {
                    problems.push(format!("rules[{i}].tags[{j}]: empty: give a tag template such as \"profile:{{id}}\""));
                    continue;
                }
                match KeyTemplate::parse(&pgci_protocol::tags::key(text)) {
                    Ok(t) => tags.push(t),
                    Err(e) => problems.push(format!("rules[{i}].tags[{j}]: {e}")),
                }
            }
            if !rc.tags.is_empty() && query.is_some() {
                problems.push(format!(
                    "rules[{i}].tags: not used with query: put the tags in a delete rule of the same table"
                ));
            }
            if rc.holds.is_some() && query.is_some() {
                problems.push(format!(
                    "rules[{i}].holds: a query rule's keys hold the query's answer: remove holds"
                ));
            }
            let holds_row = match rc.action {
                Action::Refresh => query.is_none(),
                Action::Delete => rc.holds == Some(crate::config::Holds::Row),
            };
            let rule = Rule {
                table: table.clone(),
                keys,
                tags,
                action: rc.action,
                ttl,
                columns,
                query,
                holds_row,
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

    /// Every column any key template or query parameter of `table` uses:
    /// the old row must carry them all.
    pub fn key_columns(rules: &[Rule]) -> BTreeSet<String> {
        let mut columns: BTreeSet<String> = rules
            .iter()
            .flat_map(Rule::templates)
            .flat_map(|k| k.columns())
            .map(str::to_string)
            .collect();
        for rule in rules {
            if let Some(query) = &rule.query {
                columns.extend(query.params.iter().cloned());
            }
        }
        columns
    }

    /// Every column a rule of `table` names outside its key templates
    /// (`columns` filters, query parameters), for the catalog check.
    pub fn named_columns(rules: &[Rule]) -> BTreeSet<String> {
        let mut columns = BTreeSet::new();
        for rule in rules {
            columns.extend(rule.columns.named().iter().cloned());
            if let Some(query) = &rule.query {
                columns.extend(query.params.iter().cloned());
            }
        }
        columns
    }
}

/// The `SCAN MATCH` patterns of every key `rules` can produce, each once,
/// in rule order (for TRUNCATE, drift and lost-slot flushes).
pub fn scan_patterns<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Vec<String> {
    let mut patterns: Vec<String> = Vec::new();
    for template in rules.into_iter().flat_map(Rule::templates) {
        let pattern = template.scan_pattern();
        if !patterns.contains(&pattern) {
            patterns.push(pattern);
        }
    }
    patterns
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(table: &str, keys: &[&str]) -> RuleConfig {
        RuleConfig {
            table: TableName::parse(table).expect("valid"),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            tags: vec![],
            action: Action::Delete,
            ttl: None,
            columns: None,
            query: None,
            params: None,
            holds: None,
        }
    }

    #[test]
    fn refresh_options_are_checked() {
        use crate::config::ColumnsConfig;
        use crate::duration::HumanDuration;
        let refresh = |f: &dyn Fn(&mut RuleConfig)| {
            let mut r = rule("public.t", &["t:{id}"]);
            r.action = Action::Refresh;
            r.ttl = Some(HumanDuration(Duration::from_secs(60)));
            f(&mut r);
            RuleSet::compile(&[r])
        };
        assert!(refresh(&|_| {}).is_ok());
        let errs = refresh(&|r| {
            r.ttl = Some(HumanDuration(Duration::from_secs(107_000_000_000 * 86_400)))
        })
        .unwrap_err();
        assert!(
            errs[0].starts_with("rules[0].ttl: at most 36500d"),
            "{errs:?}"
        );
        refresh(&|r| r.ttl = Some(HumanDuration(MAX_TTL))).expect("100 years is accepted");
        let errs = refresh(&|r| r.ttl = None).unwrap_err();
        assert!(errs[0].starts_with("rules[0].ttl"), "{errs:?}");
        let errs = refresh(&|r| {
            r.columns = Some(ColumnsConfig {
                include: Some(vec!["a".into()]),
                exclude: Some(vec!["b".into()]),
            })
        })
        .unwrap_err();
        assert!(errs[0].starts_with("rules[0].columns"), "{errs:?}");
        let errs = refresh(&|r| r.params = Some(vec!["id".into()])).unwrap_err();
        assert!(errs[0].starts_with("rules[0].params"), "{errs:?}");
        let ok = refresh(&|r| {
            r.query = Some("select 1".into());
            r.params = Some(vec!["user_id".into()]);
        })
        .expect("valid");
        let (_, rules) = ok.rules_for("public", "t").expect("rules");
        assert!(RuleSet::key_columns(rules).contains("user_id"));
        assert_eq!(
            rules[0]
                .query
                .as_ref()
                .map(RuleQuery::wrapped_sql)
                .as_deref(),
            Some("select (select 1)::text")
        );
        let mut delete_with_ttl = rule("public.t", &["t:{id}"]);
        delete_with_ttl.ttl = Some(HumanDuration(Duration::from_secs(1)));
        let errs = RuleSet::compile(&[delete_with_ttl]).unwrap_err();
        assert!(errs[0].starts_with("rules[0].ttl"), "{errs:?}");
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
            rule("public.s", &["x:{"]),
            rule("public.t", &["x:{id", "y"]),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("rules[0].keys[0]"));
        assert!(errs[1].starts_with("rules[1].keys[0]"));
        assert!(errs[2].starts_with("rules[1].keys[1]"));
    }

    #[test]
    fn quotes_identifiers_and_literals() {
        let t = TableName::parse("my schema.Odd\"Name").map(|t| t.quoted());
        assert_eq!(t, None, "quotes inside names are refused");
        let t = TableName::parse("s.Mixed Case").expect("valid");
        assert_eq!(t.quoted(), "\"s\".\"Mixed Case\"");
        assert_eq!(crate::sql::quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn config_and_rule_problems_are_reported_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
            [postgres]
            url = "mysql://x"
            [replication]
            slot = "Bad-Slot"
            [redis]
            url = "redis://127.0.0.1"
            [[rules]]
            table = "public.profiles"
            keys = ["{id}"]
        "#,
        )
        .expect("write");
        let config = Config::load(&path).expect("loads");
        let text = compile(&config).unwrap_err().to_string();
        assert!(text.contains("postgres.url"), "{text}");
        assert!(text.contains("replication.slot"), "{text}");
        assert!(text.contains("rules[0].keys[0]"), "{text}");
    }
}
