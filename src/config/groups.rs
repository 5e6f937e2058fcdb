//! `[[groups]]`: the tables split over several slots and publications,
//! each streamed by a daemon process of its own (`run --group NAME`), and
//! the checks that every table with rules is in exactly one group.

use serde::Deserialize;

use crate::change::TableName;

use super::validate::check_identifier;
use super::{Config, ConfigError, SourceKind, DEFAULT_SLOT_AND_PUBLICATION};

/// `[[groups]]`: some of the rules' tables, with a replication slot and a
/// publication of their own. One slot is one ordered stream decoded by one
/// walsender; groups let throughput grow past it. Tables written in one
/// transaction whose keys must change together belong in one group: two
/// groups' streams are applied independently, so one group's keys can
/// change before another's for the same transaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Names the group on the command line (`--group`), in logs and
    /// metrics (`group` label), and in the default slot name.
    pub name: String,
    /// `schema.table` (or `table`) of each table the group streams; every
    /// table with rules is in exactly one group.
    pub tables: Vec<TableName>,
    /// Its replication slot (default `pg_cache_invalidator_<name>`).
    #[serde(default)]
    pub slot: Option<String>,
    /// Its publication (default: the slot's name).
    #[serde(default)]
    pub publication: Option<String>,
    /// Its metrics and health listener (default `http.listen`): set one
    /// per group when the groups' processes share a host.
    #[serde(default)]
    pub listen: Option<String>,
}

impl GroupConfig {
    /// The group's slot.
    pub fn slot(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("{DEFAULT_SLOT_AND_PUBLICATION}_{}", self.name))
    }

    /// The group's publication.
    pub fn publication(&self) -> String {
        self.publication.clone().unwrap_or_else(|| self.slot())
    }

    fn holds(&self, table: &TableName) -> bool {
        self.tables.contains(table)
    }
}

impl Config {
    /// The configuration of group `name` alone: its slot, publication,
    /// listener and the rules of its tables. The replication connection's
    /// `application_name` gets the group's name appended, so each group's
    /// walsender can be told apart (and listed in
    /// `synchronous_standby_names`).
    pub fn for_group(&self, name: &str) -> Result<Config, ConfigError> {
        let Some(group) = self.groups.iter().find(|g| g.name == name) else {
            let names: Vec<&str> = self.groups.iter().map(|g| g.name.as_str()).collect();
            return Err(ConfigError::Invalid(vec![if names.is_empty() {
                format!("--group {name}: the file configures no [[groups]]: drop --group")
            } else {
                format!(
                    "--group {name}: no [[groups]] entry has that name; the file has {}",
                    names.join(", ")
                )
            }]));
        };
        let mut config = self.clone();
        config.replication.slot = group.slot();
        config.replication.publication = group.publication();
        config.replication.application_name =
            format!("{}-{}", self.replication.application_name, group.name);
        if let Some(listen) = &group.listen {
            config.http.listen = listen.clone();
        }
        config.rules.retain(|rule| group.holds(&rule.table));
        config.groups.clear();
        config.group = Some(group.name.clone());
        Ok(config)
    }

    /// Each group's configuration ([`Config::for_group`]); the whole file
    /// when it has no groups.
    pub fn each_group(&self) -> Vec<Config> {
        if self.groups.is_empty() {
            return vec![self.clone()];
        }
        self.groups
            .iter()
            .filter_map(|g| self.for_group(&g.name).ok())
            .collect()
    }

    /// The checks of every group, and that each table with rules is in
    /// exactly one.
    pub(super) fn validate_groups(&self, problems: &mut Vec<String>) {
        if self.groups.is_empty() {
            return;
        }
        if self.postgres.source != SourceKind::Replication {
            problems.push("groups: table groups split the replication stream; the outbox source has none: remove [[groups]] or use source = \"replication\"".to_string());
        }
        let mut names = std::collections::BTreeSet::new();
        let mut slots = std::collections::BTreeSet::new();
        let mut publications = std::collections::BTreeSet::new();
        let mut tables: Vec<(TableName, usize)> = Vec::new();
        for (i, group) in self.groups.iter().enumerate() {
            let field = format!("groups[{i}]");
            if group.name.is_empty()
                || !group
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                problems.push(format!("{field}.name: {:?} must be lower-case letters, digits and underscores (it names the slot)", group.name));
            }
            if !names.insert(group.name.clone()) {
                problems.push(format!(
                    "{field}.name: {:?} is used twice: give each group its own name",
                    group.name
                ));
            }
            check_identifier(&format!("{field}.slot"), &group.slot(), true, problems);
            check_identifier(
                &format!("{field}.publication"),
                &group.publication(),
                true,
                problems,
            );
            if !slots.insert(group.slot()) {
                problems.push(format!(
                    "{field}.slot: {:?} is another group's slot: each group needs its own",
                    group.slot()
                ));
            }
            if !publications.insert(group.publication()) {
                problems.push(format!("{field}.publication: {:?} is another group's publication: each group needs its own", group.publication()));
            }
            if let Some(listen) = &group.listen {
                if listen.parse::<std::net::SocketAddr>().is_err() {
                    problems.push(format!(
                        "{field}.listen: {listen:?} is not an address like 127.0.0.1:9188"
                    ));
                }
            }
            if group.tables.is_empty() {
                problems.push(format!(
                    "{field}.tables: empty: list the tables the group streams"
                ));
            }
            for name in &group.tables {
                if let Some((_, other)) = tables.iter().find(|(t, _)| t == name) {
                    problems.push(format!("{field}.tables: {name} is also in groups[{other}]: a table belongs to one group"));
                    continue;
                }
                if !self.rules.iter().any(|r| &r.table == name) {
                    problems.push(format!("{field}.tables: {name} has no [[rules]]: add a rule for it or remove it from the group"));
                }
                tables.push((name.clone(), i));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let name = &rule.table;
            if !tables.iter().any(|(t, _)| t == name) {
                problems.push(format!("rules[{i}].table: {name} is in no [[groups]]: add it to the group of the tables written in the same transactions"));
                tables.push((name.clone(), usize::MAX));
            }
        }
    }
}
