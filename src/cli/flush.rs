//! `flush (--rule N | --table T | --all) [--dry-run]`: deletes (or counts)
//! every key a rule can produce, by SCAN pattern in batches of 1,000, for
//! use after an incident (a cache written by a bug, a restore from backup),
//! then announces the flush on the events channel with a new epoch.

use crate::change::TableName;
use crate::cli::{Failure, Loaded};
use crate::plan::rules::{self, Rule};
use std::sync::Arc;

use crate::lsn::Lsn;
use crate::ops::{CacheOp, FlushReason, Item};
use crate::redis::flush;
use crate::sink::redis::events::Announcer;

/// Which rules.
pub enum Which {
    /// The Nth `[[rules]]` entry of the file, from 1.
    Rule(usize),
    /// Every rule of a table (`schema.table`).
    Table(String),
    /// Every rule.
    All,
}

/// Counts or deletes the keys of the chosen rules; one line per pattern.
pub async fn flush(loaded: Loaded, which: Which, dry_run: bool) -> Result<(), Failure> {
    let all: Vec<&Rule> = loaded.rules.tables().flat_map(|(_, r)| r.iter()).collect();
    let chosen: Vec<&Rule> = match &which {
        Which::All => all,
        Which::Rule(n) => match nth_rule(&loaded, &all, *n) {
            Some(rule) => vec![rule],
            None => {
                return Err(Failure::usage(vec![format!(
                    "--rule {n}: the file has {} rule(s), numbered from 1 in file order",
                    loaded.config.rules.len()
                )]))
            }
        },
        Which::Table(table) => {
            let wanted = TableName::parse(table);
            let chosen: Vec<&Rule> = all
                .into_iter()
                .filter(|r| Some(&r.table) == wanted.as_ref())
                .collect();
            if chosen.is_empty() {
                return Err(Failure::usage(vec![format!(
                    "--table {table}: no rule watches it; name it as schema.table, as in the rules"
                )]));
            }
            chosen
        }
    };
    let redis = &loaded.config.redis;
    let mut conn = crate::redis::connect_once(&redis.url, redis.ca_cert.as_deref())
        .await
        .map_err(|e| Failure::runtime(format!("redis at {}: {e}", redis.url.redacted())))?;
    let masters = conn
        .masters()
        .await
        .map_err(|e| Failure::runtime(redis.url.scrub(&e.to_string())))?;
    let mut total = 0;
    let patterns = rules::scan_patterns(chosen);
    for pattern in &patterns {
        let n = flush::flush_pattern_everywhere(&mut conn, &masters, pattern, dry_run)
            .await
            .map_err(|e| Failure::runtime(redis.url.scrub(&e.to_string())))?;
        println!("{pattern:<40} {n} key(s)");
        total += n;
    }
    if dry_run {
        println!("dry run: {total} key(s) would be deleted");
        return Ok(());
    }
    println!("deleted {total} key(s)");
    if !redis.channel.is_empty() {
        // Subscribers holding copies learn of it as of any flush: an
        // event with a new epoch (see `pgci_protocol::events`).
        let item = Item {
            op: CacheOp::Flush {
                table: Arc::from("*"),
                patterns,
                reason: FlushReason::Operator,
            },
            lsn: Lsn::default(),
            commit_time: Arc::from(""),
            commit_micros: 0,
            seq: 0,
            xid: 0,
        };
        let announcer = Announcer::new(&redis.channel)
            .sharded(redis.sharded_events)
            .streamed_if(&redis.stream, redis.stream_max_len);
        announcer
            .announce(std::slice::from_ref(&item), true)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| {
                Failure::runtime(format!(
                    "the keys are deleted, but the flush event could not be published on {:?} ({}): subscribers holding copies must drop them (restart them)",
                    redis.channel,
                    redis.url.scrub(&e.to_string())
                ))
            })?;
        println!("announced the flush on {:?} (a new epoch)", redis.channel);
    }
    Ok(())
}

/// The compiled rule of the Nth `[[rules]]` entry (from 1): the rules of a
/// table keep their file order, so it is the k-th rule of its table where k
/// counts the entries for that table before it.
fn nth_rule<'a>(loaded: &Loaded, all: &[&'a Rule], n: usize) -> Option<&'a Rule> {
    let entries = &loaded.config.rules;
    let entry = entries.get(n.checked_sub(1)?)?;
    let table = &entry.table;
    let before = entries[..n - 1]
        .iter()
        .filter(|e| &e.table == table)
        .count();
    all.iter()
        .copied()
        .filter(|r| &r.table == table)
        .nth(before)
}
