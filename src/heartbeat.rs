//! Heartbeats: on an interval, write a logical decoding message (no table
//! needed) through a regular connection and read the slot's retained WAL.
//!
//! The message travels the same path as a change, so its arrival on the
//! stream proves the pipeline alive end to end (its round-trip is a metric),
//! and it gives an idle database WAL to decode, so keepalive confirmations
//! keep the slot from retaining WAL while the watched tables are quiet.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::db::{setup, ConnInfo, Db};
use crate::source::replication::HEARTBEAT_PREFIX;
use crate::telemetry::metrics as m;

/// Runs until `shutdown` turns true.
pub async fn run(
    conn: ConnInfo,
    slot: String,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut db: Option<Db> = None;
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = ticker.tick() => {}
        }
        if db.is_none() {
            db = Db::connect(&conn).await.ok();
        }
        let Some(connection) = &db else { continue };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        match setup::heartbeat(connection, HEARTBEAT_PREFIX, &slot, now).await {
            Ok(Some((retained, wal_status))) => {
                failing = false;
                metrics::gauge!(m::SLOT_RETAINED_WAL_BYTES).set(retained as f64);
                if wal_status == "lost" {
                    tracing::error!(slot = %slot, "replication slot is lost; the stream will rebuild it");
                }
            }
            Ok(None) => failing = false,
            Err(error) => {
                if !failing {
                    tracing::warn!(error = %error, "heartbeat failed; retrying every interval");
                }
                failing = true;
                db = None;
            }
        }
    }
}
