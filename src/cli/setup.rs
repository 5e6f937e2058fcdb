//! `setup [--print]` and `teardown`: plan the statements from the rules and
//! the live catalog (see each source's `install` module), then print or
//! run them.

use crate::cli::{Failure, Loaded};
use crate::db::{catalog, Db};
use crate::lsn::Lsn;
use crate::redis::{leases, position};
use crate::source::install;

/// `setup`: prints (`--print`) or runs what the database is missing.
pub async fn setup(loaded: Loaded, print: bool) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let plan = install::of(&loaded.config)
        .plan(&db, &loaded.conn, &loaded.rules)
        .await?;
    if !plan.problems.is_empty() {
        return Err(Failure::usage(plan.problems));
    }
    if print {
        println!(
            "-- pg-cache-invalidator setup for {}",
            loaded.conn.redacted()
        );
        if plan.is_empty() {
            println!("-- nothing to do: the database is ready");
        }
        for step in &plan.steps {
            println!("{step}");
        }
        print_standby_steps(&loaded, &plan);
        return Ok(());
    }
    load_leases(&loaded).await;
    if plan.is_empty() {
        println!("nothing to do: the database is ready");
        return Ok(());
    }
    let standby = run(&db, &loaded, &plan).await?;
    // The record of what the cache holds starts where the source does.
    if plan.creates_slot {
        record_slot_start(standby.as_ref().unwrap_or(&db), &loaded).await;
    }
    if !install::of(&loaded.config).records_wal_position() {
        record_outbox_start(&loaded).await;
    }
    Ok(())
}

/// `--print`'s statements for the standby that holds the slot.
fn print_standby_steps(loaded: &Loaded, plan: &install::Plan) {
    if plan.standby_steps.is_empty() {
        return;
    }
    println!(
        "-- on the standby that holds the slot ({}, replication.url):",
        loaded.conn.slot_server().redacted()
    );
    for step in &plan.standby_steps {
        println!("{step}");
    }
}

/// Runs `plan`: its statements on the primary `db`, then those for the
/// standby of `replication.url` (connected to here when there are any),
/// saying `done:` after each. Returns that standby's connection.
async fn run(db: &Db, loaded: &Loaded, plan: &install::Plan) -> Result<Option<Db>, Failure> {
    let standby = match plan.standby_steps.is_empty() {
        true => None,
        false => Some(Db::connect(loaded.conn.slot_server()).await?),
    };
    install::apply(
        db,
        standby.as_ref(),
        plan,
        loaded.config.setup.lock_timeout.0,
        |step| println!("done: {}", step.why),
        waiting,
    )
    .await?;
    Ok(standby)
}

/// Says once that a statement on the standby waits for the primary.
fn waiting(step: &install::Step) {
    eprintln!(
        "waiting: {} — the standby waits for the primary's next running-transactions record (grant EXECUTE ON FUNCTION pg_log_standby_snapshot() to the daemon's role to bring it at once)",
        step.why
    );
}

/// Gives the outbox's count of applied batches a start in Redis (if it
/// has none), so that the first `run` does not flush the cache: a `run`
/// that finds no record flushes every rule key once (see
/// `redis::position`).
async fn record_outbox_start(loaded: &Loaded) {
    let counter = install::of(&loaded.config).record_name();
    for redis in &loaded.config.targets {
        let at = target_name(loaded, redis);
        match position::record_if_absent(&redis.url, redis.ca_cert.as_deref(), &counter, Lsn(0))
            .await
        {
            Ok(true) => println!("done: {at} records that the cache starts with the outbox"),
            Ok(false) => {}
            Err(error) => eprintln!(
                "note: cannot record the outbox's start in {at} ({error}): the first run will flush every rule key there once"
            ),
        }
    }
}

/// How setup names a target: "redis", or "redis target NAME".
fn target_name(loaded: &Loaded, redis: &crate::config::RedisConfig) -> String {
    if loaded.config.listed_targets {
        format!("redis target {}", redis.name())
    } else {
        "redis".to_string()
    }
}

/// Loads the lease functions app readers call (the daemon loads them at
/// start too; readers load them when missing), so a failure is a note.
async fn load_leases(loaded: &Loaded) {
    for redis in &loaded.config.targets {
        let at = target_name(loaded, redis);
        match leases::load_once(&redis.url, redis.ca_cert.as_deref()).await {
            Ok(leases::Loaded::Current) => {}
            Ok(how) => println!("done: lease functions for app readers loaded into {at} ({how:?})"),
            Err(error) => eprintln!(
                "note: cannot load the lease functions into {at} ({error}): the daemon loads them at start"
            ),
        }
    }
}

/// Tells Redis where the new slot starts, so that the first `run` does not
/// flush the cache (see `redis::position`). Without it the first `run`
/// flushes every rule key once, which is safe; so a failure is a note.
async fn record_slot_start(db: &Db, loaded: &Loaded) {
    let slot = &loaded.config.replication.slot;
    let start = catalog::inspect_slot(db, slot)
        .await
        .ok()
        .flatten()
        .and_then(|info| info.confirmed_flush_lsn)
        .and_then(|text| text.parse::<Lsn>().ok());
    let Some(start) = start else { return };
    for redis in &loaded.config.targets {
        let at = target_name(loaded, redis);
        match position::record_if_absent(&redis.url, redis.ca_cert.as_deref(), slot, start).await {
            Ok(true) => println!("done: {at} records that the cache starts at the slot's position {start}"),
            Ok(false) => println!(
                "note: {at} already records an older position for slot {slot}: the next run flushes every rule key there once, because changes before the new slot may have been missed"
            ),
            Err(error) => eprintln!(
                "note: cannot record the slot's start in {at} ({error}): the first run will flush every rule key there once"
            ),
        }
    }
}

/// `teardown`: drops the slot and publication, or the outbox.
pub async fn teardown(loaded: Loaded) -> Result<(), Failure> {
    let db = Db::connect(&loaded.conn).await?;
    let plan = install::of(&loaded.config)
        .plan_teardown(&db, &loaded.conn)
        .await?;
    if !plan.problems.is_empty() {
        return Err(Failure::usage(plan.problems));
    }
    if plan.is_empty() {
        println!("nothing to do: no slot or publication left");
        return Ok(());
    }
    run(&db, &loaded, &plan).await?;
    println!("note: replica identities were left as they are");
    Ok(())
}
