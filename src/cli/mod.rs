//! The command line: what each command does, and how failures reach the
//! user — one `error:` line each, exit status 2 when the configuration or
//! the database setup must change, 1 when something broke.
//!
//! - `run` ([`mod@run`]): the daemon (see [`crate::app`]).
//!
//! With table groups (`[[groups]]`) every verb takes `--group NAME` and
//! works on that group's slot, publication and tables; `run` needs it (one
//! process per group), `setup`, `teardown`, `status` and `check-config`
//! without it do every group in turn.
//! - `setup [--print]` and `teardown` ([`setup`]).
//! - `check-config` ([`check`]).
//! - `status [--json]` ([`status`]).
//! - `verify [--sample N] [--rate K] [--json] [--repair]` ([`mod@verify`]).
//! - `events [--json] [--table T] [--key GLOB]` ([`mod@events`]).
//! - `flush (--rule N | --table T | --all) [--dry-run]` ([`mod@flush`]).
//! - `redis-acl`: the daemon's least-privilege Redis user
//!   ([`crate::redis::acl`]).

pub(crate) mod check;
pub(crate) mod events;
pub(crate) mod flush;
pub(crate) mod run;
pub(crate) mod setup;
pub(crate) mod status;
pub(crate) mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, LogFormat, DEFAULT_CONFIG_PATH};
use crate::db::{ConnInfo, DbError};
use crate::error::{Exit, Fatal};
use crate::plan::rules::{self, RuleSet};
use crate::source::install;

/// Exit status for problems the user must fix (configuration, database).
pub const EXIT_USAGE: u8 = Exit::UserMustFix.code();
/// Exit status for runtime failures.
pub const EXIT_FAILURE: u8 = Exit::Broken.code();

/// The command line.
#[derive(Parser)]
#[command(version = crate::telemetry::metrics::VERSION, about = "Keeps Redis caches true to PostgreSQL")]
pub struct Cli {
    /// Log format (overrides [log] format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The TOML configuration file.
    #[arg(long, short, env = "PGCI_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Only this table group ([[groups]] name): its slot, publication and
    /// tables. `run` needs it when the file has groups; `setup`,
    /// `teardown`, `status` and `check-config` do every group without it.
    #[arg(long, env = "PGCI_GROUP", value_name = "NAME")]
    group: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run(ConfigArg),
    /// Create the publication, replica identities and slot the rules need.
    Setup {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the SQL instead of running it.
        #[arg(long)]
        print: bool,
    },
    /// Check the file and the live database against it.
    CheckConfig(ConfigArg),
    /// Show the replication slot's state.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Drop the slot and the publication.
    Teardown(ConfigArg),
    /// Print the invalidation events as they are published.
    Events {
        #[command(flatten)]
        config: ConfigArg,
        /// Print each event's JSON on a line instead of a table.
        #[arg(long)]
        json: bool,
        /// Only events of this table (schema.table).
        #[arg(long, value_name = "T")]
        table: Option<String>,
        /// Only events with a key matching this glob (* and ?).
        #[arg(long, value_name = "GLOB")]
        key: Option<String>,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Read the events kept in redis.stream from the entry after this
        /// id (0: the oldest kept), then live.
        #[arg(long, value_name = "ID")]
        since: Option<String>,
    },
    /// Delete (or count) every key of a rule, a table's rules, or all rules.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["rule", "table", "all"])))]
    Flush {
        #[command(flatten)]
        config: ConfigArg,
        /// The Nth [[rules]] entry, from 1 in file order.
        #[arg(long, value_name = "N")]
        rule: Option<usize>,
        /// Every rule of this table (schema.table).
        #[arg(long, value_name = "T")]
        table: Option<String>,
        /// Every rule.
        #[arg(long)]
        all: bool,
        /// Count the keys, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the ACL file line of a Redis user that may do only what the
    /// daemon does (its user and password are taken from redis.url).
    RedisAcl {
        #[command(flatten)]
        config: ConfigArg,
        /// The server the line is for, MAJOR.MINOR (`INFO server`'s
        /// redis_version; Valkey reports 7.2): before 7.0 the line leaves
        /// out FUNCTION, which Redis 6.2 does not know (the lease code
        /// loads as scripts there).
        #[arg(long, value_name = "MAJOR.MINOR", default_value = "7.0", value_parser = parse_redis_version)]
        redis_version: (u32, u32),
    },
    /// Compare cached keys with the database; exit 1 when any is stale.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Check at most this many keys.
        #[arg(long, value_name = "N")]
        sample: Option<u64>,
        /// Keys per second at most, so a production cache is not loaded (0: no limit).
        #[arg(long, value_name = "KEYS_PER_S", default_value_t = verify::DEFAULT_RATE)]
        rate: u32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Delete the stale keys found.
        #[arg(long)]
        repair: bool,
    },
}

/// `--redis-version`: `7.0`, `6.2` (a patch level is ignored).
fn parse_redis_version(text: &str) -> Result<(u32, u32), String> {
    let mut parts = text.split('.').map(str::parse::<u32>);
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Ok((major, minor)),
        (Some(Ok(major)), None) => Ok((major, 0)),
        _ => Err(format!("{text:?} is not MAJOR.MINOR, such as 7.0 or 6.2")),
    }
}

/// A failure already reduced to lines for the user.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    lines: Vec<String>,
}

impl Failure {
    /// Problems the user must fix.
    pub fn usage(lines: Vec<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            lines,
        }
    }

    /// Ends the process as `exit` says, with `lines`.
    pub fn new(exit: Exit, lines: Vec<String>) -> Self {
        Failure {
            code: exit.code(),
            lines,
        }
    }

    /// Something broke.
    pub fn runtime(error: impl std::fmt::Display) -> Self {
        Failure::new(Exit::Broken, vec![error.to_string()])
    }
}

impl From<Fatal> for Failure {
    fn from(fatal: Fatal) -> Self {
        Failure::new(Exit::of_fatal(&fatal), vec![fatal.to_string()])
    }
}

impl From<DbError> for Failure {
    fn from(error: DbError) -> Self {
        Failure::new(Exit::of_verb_database(), vec![error.one_line()])
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        match error {
            ConfigError::Invalid(lines) => Failure::usage(lines),
            other => Failure::usage(vec![other.to_string()]),
        }
    }
}

/// A configuration file loaded, checked, and its rules compiled.
pub struct Loaded {
    /// The file.
    pub config: Config,
    /// Its rules.
    pub rules: RuleSet,
    /// The database connection it names.
    pub conn: ConnInfo,
}

/// The file, narrowed to `--group` when given.
fn load(arg: &ConfigArg) -> Result<Loaded, Failure> {
    let config = Config::load(&arg.config)?;
    // The whole file first: a group's view no longer holds the groups.
    config.validate()?;
    let config = match &arg.group {
        Some(group) => config.for_group(group)?,
        None => config,
    };
    loaded(config)
}

/// The file once per group (`--group`: that one; no groups: the file).
fn load_each(arg: &ConfigArg) -> Result<Vec<Loaded>, Failure> {
    let config = Config::load(&arg.config)?;
    config.validate()?;
    match &arg.group {
        Some(group) => Ok(vec![loaded(config.for_group(group)?)?]),
        None => config.each_group().into_iter().map(loaded).collect(),
    }
}

/// Runs `verb` for each group of the file (see [`load_each`]), with a
/// heading per group when there are several; stops at the first failure.
async fn each_group<F, Fut>(arg: &ConfigArg, verb: F) -> Result<(), Failure>
where
    F: Fn(Loaded) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let all = load_each(arg)?;
    let several = all.len() > 1;
    for loaded in all {
        if several {
            println!(
                "== group {}",
                loaded.config.group.as_deref().unwrap_or_default()
            );
        }
        verb(loaded).await?;
    }
    Ok(())
}

fn loaded(config: Config) -> Result<Loaded, Failure> {
    let rules = rules::compile(&config)?;
    let conn = ConnInfo::parse(
        &config.postgres.url,
        config.postgres.ssl_root_cert.as_deref(),
    )
    .and_then(|conn| match &config.replication.url {
        Some(url) => conn.with_slot_on(url),
        None => Ok(conn),
    })
    .map_err(|e| Failure::usage(vec![e.to_string()]))?;
    Ok(Loaded {
        config,
        rules,
        conn,
    })
}

/// Runs the command; prints each failure line as `error: …`.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            for line in &failure.lines {
                eprintln!("error: {line}");
            }
            ExitCode::from(failure.code)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(arg) => {
            let loaded = load(&arg)?;
            if !loaded.config.groups.is_empty() {
                let names: Vec<&str> = loaded
                    .config
                    .groups
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect();
                return Err(Failure::usage(vec![format!(
                    "the file configures table groups ({}): run one daemon per group with --group NAME (systemd: pg-cache-invalidator@NAME.service)",
                    names.join(", ")
                )]));
            }
            crate::telemetry::init_logging(cli.log_format.unwrap_or(loaded.config.log.format));
            run::run(loaded).await
        }
        Command::Setup { config, print } => {
            each_group(&config, |loaded| setup::setup(loaded, print)).await
        }
        Command::CheckConfig(arg) => each_group(&arg, check::check_config).await,
        Command::Status { config, json } if json => {
            let all = load_each(&config)?;
            let several = all.len() > 1;
            let mut values = Vec::new();
            for loaded in all {
                values.push(status::status_json(loaded).await?);
            }
            let value = if several {
                serde_json::Value::Array(values)
            } else {
                values.pop().unwrap_or_default()
            };
            let text = serde_json::to_string_pretty(&value).map_err(Failure::runtime)?;
            println!("{text}");
            Ok(())
        }
        Command::Status { config, .. } => each_group(&config, status::status).await,
        Command::Teardown(arg) => each_group(&arg, setup::teardown).await,
        Command::Events {
            config,
            json,
            table,
            key,
            count,
            since,
        } => {
            let args = events::Args {
                json,
                table,
                key,
                count,
                since,
            };
            events::events(load(&config)?, args).await
        }
        Command::Flush {
            config,
            rule,
            table,
            all,
            dry_run,
        } => {
            let which = match (rule, table, all) {
                (Some(n), _, _) => flush::Which::Rule(n),
                (_, Some(t), _) => flush::Which::Table(t),
                _ => flush::Which::All,
            };
            flush::flush(load(&config)?, which, dry_run).await
        }
        Command::RedisAcl {
            config: arg,
            redis_version,
        } => {
            let loaded = load(&arg)?;
            let all: Vec<&rules::Rule> =
                loaded.rules.tables().flat_map(|(_, r)| r.iter()).collect();
            // Every group's position record (or the one slot's), or the
            // outbox's count of applied batches.
            let mut slots: Vec<String> = loaded
                .config
                .each_group()
                .iter()
                .map(|c| install::of(c).record_name())
                .collect();
            slots.dedup();
            let line = crate::redis::acl::daemon_user(
                &loaded.config.redis.url,
                &rules::scan_patterns(all),
                &loaded.config.redis.channel,
                &loaded.config.redis.stream,
                &slots,
                crate::redis::acl::Server {
                    version: redis_version,
                    sharded_events: loaded.config.targets.iter().any(|t| t.sharded_events),
                },
            )
            .map_err(|e| Failure::usage(vec![e]))?;
            println!("{line}");
            Ok(())
        }
        Command::Verify {
            config,
            sample,
            rate,
            json,
            repair,
        } => {
            let options = verify::Args {
                sample,
                rate,
                json,
                repair,
            };
            verify::verify(load(&config)?, options).await
        }
    }
}
