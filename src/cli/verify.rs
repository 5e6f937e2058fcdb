//! `verify`: the cache inspector (see [`crate::verify`]) — prints what it
//! found and exits 1 when a cached key differs from the database.

use crate::cli::{Failure, Loaded, EXIT_FAILURE};
use crate::db::compare::Comparer;
use crate::db::Db;
use crate::redis::position;
use crate::source::install;
use crate::verify::{self as inspector, Options, Report};

/// Keys per second by default: a few hundred microseconds of Redis and a
/// primary-key lookup each, light enough for a production cache.
pub const DEFAULT_RATE: u32 = 500;

/// The command's flags.
pub struct Args {
    /// `--sample N`.
    pub sample: Option<u64>,
    /// `--rate KEYS_PER_S`.
    pub rate: u32,
    /// `--json`.
    pub json: bool,
    /// `--repair`.
    pub repair: bool,
}

/// Runs the inspector and reports.
pub async fn verify(loaded: Loaded, args: Args) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let redis_cfg = &loaded.config.redis;
    let mut redis = crate::redis::connect_once(&redis_cfg.url, redis_cfg.ca_cert.as_deref())
        .await
        .map_err(|e| Failure::runtime(format!("redis {}: {e}", redis_cfg.url.redacted())))?;
    if redis.is_cluster() {
        return Err(Failure::usage(vec![format!(
            "verify: {} is a Redis Cluster node, and verify reads one server only so far: run it against a single Redis, or check keys with the clients",
            redis_cfg.url.redacted()
        )]));
    }
    let options = Options {
        sample: args.sample,
        rate: args.rate,
        repair: args.repair,
        position_key: {
            let setup = install::of(&loaded.config);
            setup
                .records_wal_position()
                .then(|| position::key(&setup.record_name()))
        },
    };
    let mut comparer = Comparer::new(&db);
    let json = args.json;
    let report = inspector::verify(&mut comparer, &mut redis, &loaded.rules, &options, |r| {
        eprintln!(
            "verify: {} keys checked so far, {} stale, {} missing rows",
            r.checked, r.stale, r.missing
        );
    })
    .await
    .map_err(|e| Failure::runtime(redis_cfg.url.scrub(&e.to_string())))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(Failure::runtime)?
        );
    } else {
        print_text(&report);
    }
    if report.clean() {
        return Ok(());
    }
    Err(Failure {
        code: EXIT_FAILURE,
        lines: vec![format!(
            "{} cached key(s) differ from the database{}",
            report.stale + report.missing,
            if args.repair {
                format!(" ({} deleted by --repair)", report.repaired)
            } else {
                ": run verify --repair to delete them, and look for writes the daemon cannot see (rules, drift) or readers filling without leases".to_string()
            }
        )],
    })
}

fn print_text(report: &Report) {
    println!(
        "checked {} keys: {} stale, {} cached for rows that are gone, {} skipped{}",
        report.checked,
        report.stale,
        report.missing,
        report.skipped,
        if report.repaired > 0 {
            format!(", {} deleted", report.repaired)
        } else {
            String::new()
        }
    );
    for finding in &report.stale_keys {
        println!(
            "  {:?} {} ({}){}",
            finding.key,
            match finding.problem {
                inspector::Problem::Differs => "differs from the database",
                inspector::Problem::RowGone => "is cached but its row is gone",
                inspector::Problem::NotJson => "does not hold JSON",
            },
            finding.table,
            if finding.repaired { ", deleted" } else { "" }
        );
    }
    if report.daemon_behind {
        println!("note: the daemon did not catch up within 10 s, so mismatches after that were not re-checked: is it running?");
    }
    for line in &report.unchecked_rules {
        println!("not checked: {line}");
    }
}
