//! The `pg-cache-invalidator` command line: parse, load and validate the
//! configuration, start logging, run the chosen command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use pg_cache_invalidator::config::{Config, LogFormat, SourceKind, DEFAULT_CONFIG_PATH};
use pg_cache_invalidator::db::catalog::{self, CheckScope};
use pg_cache_invalidator::db::query::QueryRunner;
use pg_cache_invalidator::db::{outbox, setup, ConnInfo, Db};
use pg_cache_invalidator::heartbeat;
use pg_cache_invalidator::pipeline::{self, SlotKeeper};
use pg_cache_invalidator::plan::Planner;
use pg_cache_invalidator::rules::RuleSet;
use pg_cache_invalidator::sink::redis::RedisSink;
use pg_cache_invalidator::source::{self, replication::ReplicationSource};
use pg_cache_invalidator::telemetry;
use pg_cache_invalidator::telemetry::health::Health;

/// Exit status for problems the user must fix (configuration, database).
const EXIT_USAGE: u8 = 2;
/// Exit status for runtime failures.
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(version, about = "Keeps Redis caches true to PostgreSQL")]
struct Cli {
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
}

/// A failure already reduced to lines for the user.
struct Failure {
    code: u8,
    lines: Vec<String>,
}

impl Failure {
    fn usage(lines: Vec<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            lines,
        }
    }

    fn runtime(error: impl std::fmt::Display) -> Self {
        Failure {
            code: EXIT_FAILURE,
            lines: vec![error.to_string()],
        }
    }
}

impl From<pg_cache_invalidator::db::DbError> for Failure {
    fn from(error: pg_cache_invalidator::db::DbError) -> Self {
        let text = match &error {
            pg_cache_invalidator::db::DbError::Query { context, source } => {
                match source.as_db_error() {
                    Some(db) => format!("{context}: {}", db.message()),
                    None => format!("{context}: {}", error_chain(source)),
                }
            }
            other => other.to_string(),
        };
        Failure::usage(vec![text])
    }
}

/// An error and its causes on one line: "a: b: c".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let next = inner.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = inner.source();
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Both TLS stacks in the dependency tree are compiled in, so rustls
    // cannot pick a provider itself: choose one before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            for line in &failure.lines {
                eprintln!("error: {line}");
            }
            ExitCode::from(failure.code)
        }
    }
}

struct Loaded {
    config: Config,
    rules: RuleSet,
    conn: ConnInfo,
}

fn load(arg: &ConfigArg) -> Result<Loaded, Failure> {
    let config = Config::load(&arg.config).map_err(|e| Failure::usage(vec![e.to_string()]))?;
    let rules = config.validate().map_err(|e| match e {
        pg_cache_invalidator::config::ConfigError::Invalid(lines) => Failure::usage(lines),
        other => Failure::usage(vec![other.to_string()]),
    })?;
    let conn = ConnInfo::parse(
        &config.postgres.url,
        config.postgres.ssl_root_cert.as_deref(),
    )
    .map_err(|e| Failure::usage(vec![e.to_string()]))?;
    Ok(Loaded {
        config,
        rules,
        conn,
    })
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(arg) => {
            let loaded = load(&arg)?;
            telemetry::init_logging(cli.log_format.unwrap_or(loaded.config.log.format));
            run(loaded).await
        }
        Command::Setup { config, print } => setup_command(load(&config)?, print).await,
        Command::CheckConfig(arg) => check_config(load(&arg)?).await,
        Command::Status { config, json } => status(load(&config)?, json).await,
        Command::Teardown(arg) => teardown(load(&arg)?).await,
    }
}

async fn run(loaded: Loaded) -> Result<(), Failure> {
    let Loaded {
        config,
        rules,
        conn,
    } = loaded;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        postgres = %conn.redacted(),
        redis = %config.redis.url.redacted(),
        slot = %config.replication.slot,
        tables = rules.tables().count(),
        "starting"
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(wait_for_signal(shutdown_tx));
    let health = Arc::new(Health::default());
    let metrics = telemetry::metrics::install().map_err(Failure::runtime)?;
    let listener = telemetry::http::bind(&config.http.listen)
        .await
        .map_err(|e| Failure::usage(vec![e]))?;
    tracing::info!(listen = %config.http.listen, "serving /metrics /healthz /readyz");
    tokio::spawn(telemetry::http::serve(
        listener,
        metrics,
        Arc::clone(&health),
        shutdown_rx.clone(),
    ));

    let db = connect_with_retry(&conn, shutdown_rx.clone()).await?;
    let problems = check_source(&db, &config, &rules, true).await?;
    drop(db);
    if !problems.is_empty() {
        return Err(Failure::usage(problems));
    }

    let sink = RedisSink::connect(
        &config.redis.url,
        config.redis.ca_cert.as_deref(),
        &config.redis.channel,
        QueryRunner::new(conn.clone()),
        shutdown_rx.clone(),
        Arc::clone(&health),
    )
    .await
    .map_err(Failure::runtime)?;
    if config.postgres.source == SourceKind::Outbox {
        let outcome = source::outbox::run(
            conn,
            config.outbox.clone(),
            Arc::new(rules),
            sink,
            health,
            shutdown_rx,
        )
        .await;
        return match outcome {
            Ok(()) => {
                tracing::info!("stopped");
                Ok(())
            }
            Err(error) => {
                tracing::error!(error = %error, "stopped on error");
                Err(Failure::runtime(error))
            }
        };
    }
    let heartbeat_every = config.replication.heartbeat_interval.0;
    if !heartbeat_every.is_zero() {
        tokio::spawn(heartbeat::run(
            conn.clone(),
            config.replication.slot.clone(),
            heartbeat_every,
            shutdown_rx.clone(),
        ));
    }
    let keeper = SlotKeeper {
        conn: conn.clone(),
        slot: config.replication.slot.clone(),
    };
    let source = ReplicationSource::new(
        conn,
        config.replication.slot.clone(),
        config.replication.publication.clone(),
        Arc::clone(&health),
    );
    let planner = Planner::new(Arc::new(rules));
    match pipeline::run(source, sink, planner, keeper, health, shutdown_rx).await {
        Ok(()) => {
            tracing::info!("stopped");
            Ok(())
        }
        Err(error) => {
            tracing::error!(error = %error, "stopped on error");
            Err(Failure::runtime(error))
        }
    }
}

/// The database may still be starting when the daemon starts (systemd
/// ordering, a failover): keep trying, unless the URL itself is wrong.
async fn connect_with_retry(
    conn: &ConnInfo,
    shutdown: watch::Receiver<bool>,
) -> Result<Db, Failure> {
    let mut delay = Duration::from_millis(200);
    loop {
        match Db::connect(conn).await {
            Ok(db) => return Ok(db),
            Err(error) => {
                let failure = Failure::from(error);
                let transient = failure.lines.iter().any(|l| {
                    l.contains("connection refused")
                        || l.contains("Connection refused")
                        || l.contains("timed out")
                        || l.contains("starting up")
                        || l.contains("shutting down")
                });
                if !transient || *shutdown.borrow() {
                    return Err(failure);
                }
                tracing::warn!(error = %failure.lines.join("; "), retry_in = ?delay, "cannot reach postgres; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn wait_for_signal(shutdown: watch::Sender<bool>) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(error = %error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested; applying what was read, then confirming");
    let _ = shutdown.send(true);
}

/// The live checks of the configured source: one line per problem.
async fn check_source(
    db: &Db,
    config: &Config,
    rules: &RuleSet,
    running: bool,
) -> Result<Vec<String>, Failure> {
    Ok(match config.postgres.source {
        SourceKind::Replication => {
            catalog::check(
                db,
                rules,
                CheckScope {
                    publication: &config.replication.publication,
                    slot: Some(&config.replication.slot),
                    tolerate_lost_slot: running,
                },
            )
            .await?
        }
        SourceKind::Outbox => outbox::check(db, rules, &config.outbox).await?,
    })
}

async fn check_config(loaded: Loaded) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let problems = check_source(&db, &loaded.config, &loaded.rules, false).await?;
    if !problems.is_empty() {
        return Err(Failure::usage(problems));
    }
    let source = match loaded.config.postgres.source {
        SourceKind::Replication => format!(
            "publication {:?} and slot {:?} are ready",
            loaded.config.replication.publication, loaded.config.replication.slot
        ),
        SourceKind::Outbox => format!(
            "the outbox in schema {:?} and its triggers are installed",
            loaded.config.outbox.schema
        ),
    };
    println!(
        "ok: {} table(s), {source} on {}",
        loaded.rules.tables().count(),
        loaded.conn.redacted()
    );
    Ok(())
}

async fn setup_command(loaded: Loaded, print: bool) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let plan = match loaded.config.postgres.source {
        SourceKind::Replication => {
            setup::plan(&db, &loaded.rules, &loaded.config.replication).await?
        }
        SourceKind::Outbox => outbox::plan(&db, &loaded.rules, &loaded.config.outbox).await?,
    };
    if !plan.problems.is_empty() {
        return Err(Failure::usage(plan.problems));
    }
    if print {
        println!(
            "-- pg-cache-invalidator setup for {}",
            loaded.conn.redacted()
        );
        if plan.steps.is_empty() {
            println!("-- nothing to do: the database is ready");
        }
        for step in &plan.steps {
            println!("{step}");
        }
        return Ok(());
    }
    if plan.steps.is_empty() {
        println!("nothing to do: the database is ready");
        return Ok(());
    }
    setup::apply(&db, &plan, |step| println!("done: {}", step.why)).await?;
    Ok(())
}

async fn status(loaded: Loaded, json: bool) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    if loaded.config.postgres.source == SourceKind::Outbox {
        let (rows, oldest) = outbox::backlog(&db, &loaded.config.outbox).await?;
        if json {
            println!(
                "{}",
                serde_json::json!({"source": "outbox", "schema": loaded.config.outbox.schema,
                    "backlog_rows": rows, "oldest_row_age_seconds": oldest})
            );
        } else {
            println!("{:<15} outbox", "source");
            println!("{:<15} {}", "schema", loaded.config.outbox.schema);
            println!("{:<15} {rows}", "backlog_rows");
            println!(
                "{:<15} {}",
                "oldest_row_age",
                oldest.map_or_else(|| "-".to_string(), |s| format!("{s:.1}s"))
            );
        }
        return Ok(());
    }
    let slot = &loaded.config.replication.slot;
    let Some(info) = catalog::inspect_slot(&db, slot).await? else {
        return Err(Failure::usage(vec![format!(
            "replication slot {slot:?} does not exist: run pg-cache-invalidator setup"
        )]));
    };
    if json {
        let text = serde_json::to_string_pretty(&info).map_err(Failure::runtime)?;
        println!("{text}");
        return Ok(());
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let rows = [
        ("slot", info.slot.clone()),
        ("plugin", opt(info.plugin.clone())),
        ("database", opt(info.database.clone())),
        (
            "active",
            match info.active_pid {
                Some(pid) if info.active => format!("yes (pid {pid})"),
                _ => "no".to_string(),
            },
        ),
        ("confirmed_lsn", opt(info.confirmed_flush_lsn.clone())),
        ("lag_bytes", opt(info.lag_bytes.map(|b| b.to_string()))),
        (
            "retained_bytes",
            opt(info.retained_bytes.map(|b| b.to_string())),
        ),
        ("wal_status", opt(info.wal_status.clone())),
    ];
    for (name, value) in rows {
        println!("{name:<15} {value}");
    }
    Ok(())
}

async fn teardown(loaded: Loaded) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let plan = match loaded.config.postgres.source {
        SourceKind::Replication => setup::plan_teardown(&db, &loaded.config.replication).await?,
        SourceKind::Outbox => outbox::plan_teardown(&db, &loaded.config.outbox).await?,
    };
    if !plan.problems.is_empty() {
        return Err(Failure::usage(plan.problems));
    }
    if plan.steps.is_empty() {
        println!("nothing to do: no slot or publication left");
        return Ok(());
    }
    setup::apply(&db, &plan, |step| println!("done: {}", step.why)).await?;
    println!("note: replica identities were left as they are");
    Ok(())
}
