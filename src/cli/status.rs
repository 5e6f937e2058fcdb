//! `status [--json]`: the slot (or the outbox backlog) as a table or JSON.

use crate::cli::{Failure, Loaded};
use crate::db::Db;
use crate::redis::position;
use crate::redis::server::{self, ServerInfo};
use crate::source::install::{self, SourceStatus};

/// The source's state as JSON (`status --json`), with the group's name
/// when the file has table groups.
pub async fn status_json(loaded: Loaded) -> Result<serde_json::Value, Failure> {
    let group = loaded.config.group.clone();
    let mut value = state(loaded, true).await?.unwrap_or_default();
    if let (Some(group), Some(map)) = (group, value.as_object_mut()) {
        map.insert("group".to_string(), serde_json::json!(group));
    }
    Ok(value)
}

/// Prints the source's state.
pub async fn status(loaded: Loaded) -> Result<(), Failure> {
    state(loaded, false).await.map(|_| ())
}

/// The state as JSON (`json`), or printed as a table: the source's (see
/// [`crate::source::install::SourceSetup::status`]), then what each target records it applied,
/// then the Redis server's.
async fn state(loaded: Loaded, json: bool) -> Result<Option<serde_json::Value>, Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let redis = &loaded.config.redis;
    let server = server::read_once(&redis.url, redis.ca_cert.as_deref()).await;
    let setup = install::of(&loaded.config);
    let (rows, mut value, confirmed) = match setup.status(&db, &loaded.conn).await? {
        SourceStatus::Missing(why) => return Err(Failure::usage(vec![why])),
        SourceStatus::Found {
            rows,
            json,
            confirmed,
        } => (rows, json, confirmed),
    };
    if !setup.records_wal_position() {
        if json {
            if let Some(map) = value.as_object_mut() {
                map.insert("redis".to_string(), redis_json(&server));
            }
            return Ok(Some(value));
        }
        print_rows(&rows);
        print_redis(&server);
        return Ok(None);
    }
    // What Redis records as applied: behind the slot means the next start
    // flushes every rule key (see `redis::position`).
    let name = setup.record_name();
    let recorded = position::read_once(&redis.url, redis.ca_cert.as_deref(), &name).await;
    let covers = match (&recorded, confirmed) {
        (Ok(r), Some(confirmed)) => Some(position::covers(*r, confirmed)),
        _ => None,
    };
    // With several targets, what each one records (the first is above).
    let mut targets = Vec::new();
    if loaded.config.listed_targets {
        for target in &loaded.config.targets {
            let recorded = position::read_once(&target.url, target.ca_cert.as_deref(), &name).await;
            targets.push((target.name().to_string(), recorded));
        }
    }
    if json {
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "recorded_lsn".to_string(),
                match &recorded {
                    Ok(Some(lsn)) => serde_json::Value::String(lsn.to_string()),
                    _ => serde_json::Value::Null,
                },
            );
            map.insert(
                "recorded_covers_slot".to_string(),
                serde_json::json!(covers),
            );
            map.insert("redis".to_string(), redis_json(&server));
            if !targets.is_empty() {
                let each: Vec<serde_json::Value> = targets
                    .iter()
                    .map(|(name, recorded)| match recorded {
                        Ok(lsn) => serde_json::json!({
                            "name": name,
                            "recorded_lsn": lsn.map(|l| l.to_string()),
                            "recorded_covers_slot": confirmed.map(|c| position::covers(*lsn, c)),
                        }),
                        Err(error) => serde_json::json!({"name": name, "error": error}),
                    })
                    .collect();
                map.insert("targets".to_string(), serde_json::json!(each));
            }
        }
        return Ok(Some(value));
    }
    let mut rows = rows;
    rows.push((
        "recorded_lsn",
        match (&recorded, covers) {
            (Ok(Some(lsn)), Some(true)) => format!("{lsn} (redis has applied up to the slot)"),
            (Ok(Some(lsn)), _) => {
                format!("{lsn} (behind the slot: the next start flushes every rule key)")
            }
            (Ok(None), _) => "- (none: the next start flushes every rule key)".to_string(),
            (Err(error), _) => format!("- (cannot ask redis: {error})"),
        },
    ));
    print_rows(&rows);
    for (name, recorded) in &targets {
        let covers = recorded
            .as_ref()
            .ok()
            .zip(confirmed)
            .map(|(r, c)| position::covers(*r, c));
        let text = match (recorded, covers) {
            (Ok(Some(lsn)), Some(true)) => format!("{lsn} (has applied up to the slot)"),
            (Ok(Some(lsn)), _) => format!("{lsn} (behind the slot)"),
            (Ok(None), _) => "- (no record)".to_string(),
            (Err(error), _) => format!("- (cannot ask redis: {error})"),
        };
        println!("target {name:<8} {text}");
    }
    print_redis(&server);
    Ok(None)
}

/// The Redis server's state and the caching plan's warnings, as JSON.
fn redis_json(server: &Result<ServerInfo, String>) -> serde_json::Value {
    match server {
        Ok(info) => {
            let mut value = serde_json::to_value(info).unwrap_or_default();
            if let Some(map) = value.as_object_mut() {
                map.insert("hit_ratio".to_string(), serde_json::json!(info.hit_ratio()));
                map.insert("warnings".to_string(), serde_json::json!(info.warnings()));
            }
            value
        }
        Err(error) => serde_json::json!({ "error": error }),
    }
}

/// The Redis server's state, then one `warning:` line per setting the
/// caching plan asks for and the server lacks.
fn print_redis(server: &Result<ServerInfo, String>) {
    let info = match server {
        Ok(info) => info,
        Err(error) => {
            print_rows(&[("redis", format!("- (cannot read INFO: {error})"))]);
            return;
        }
    };
    let mb =
        |b: Option<u64>| b.map_or_else(|| "-".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6));
    print_rows(&[
        (
            "redis_version",
            info.version.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "redis_memory",
            format!(
                "{} used, {} peak, limit {}",
                mb(info.used_memory),
                mb(info.used_memory_peak),
                match info.maxmemory {
                    Some(0) => "none".to_string(),
                    other => mb(other),
                }
            ),
        ),
        (
            "redis_policy",
            info.maxmemory_policy.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "redis_hit_ratio",
            match info.hit_ratio() {
                Some(r) => format!("{:.1} % since its restart", r * 100.0),
                None => "- (too few lookups yet)".to_string(),
            },
        ),
        (
            "redis_persist",
            format!(
                "rdb save {}, aof {}",
                match info.save_schedule.as_deref() {
                    Some("") => "off".to_string(),
                    Some(s) => format!("\"{s}\""),
                    None => "unknown (CONFIG GET refused)".to_string(),
                },
                if info.aof_enabled == Some(true) {
                    "on"
                } else {
                    "off"
                }
            ),
        ),
    ]);
    for warning in info.warnings() {
        println!("warning: {warning}");
    }
}

fn print_rows(rows: &[(&str, String)]) {
    for (name, value) in rows {
        println!("{name:<15} {value}");
    }
}
