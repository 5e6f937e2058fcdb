//! The pub/sub event announcing each applied operation (the format is the
//! contract in DESIGN.md: subscribers parse it).

use serde::Serialize;

use crate::ops::{CacheOp, Item};

/// Most bytes of keys one event lists. Keys hold whatever a row held (a
/// 20 MB value in a key column made a 40 MB event, and Redis closed every
/// subscriber for its output buffer): past this the event lists the keys
/// that fit and says how many it left out (`keys_omitted`), and a
/// subscriber drops everything it holds of the table.
pub const MAX_EVENT_KEY_BYTES: usize = 64 << 10;

/// The pub/sub event for one applied operation.
#[derive(Debug, Serialize)]
struct Event<'a> {
    table: &'a str,
    op: &'a str,
    action: &'a str,
    keys: &'a [&'a String],
    /// Keys left out to bound the event (see [`MAX_EVENT_KEY_BYTES`]).
    #[serde(skip_serializing_if = "is_zero")]
    keys_omitted: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    patterns: Option<&'a [String]>,
    lsn: String,
    commit_time: &'a str,
}

/// The event JSON for `item`.
pub fn event_json(item: &Item) -> String {
    let (table, op) = item.op.names();
    let (action, patterns) = match &item.op {
        CacheOp::Refresh { .. } | CacheOp::Query { .. } => ("refresh", None),
        CacheOp::Invalidate { .. } => ("delete", None),
        CacheOp::Flush { patterns, .. } => ("delete", Some(patterns.as_slice())),
    };
    let keys: Vec<&String> = item.op.keys().all().collect();
    let mut budget = MAX_EVENT_KEY_BYTES;
    let listed = keys
        .iter()
        .take_while(|k| match budget.checked_sub(k.len()) {
            Some(left) => {
                budget = left;
                true
            }
            None => false,
        })
        .count();
    let event = Event {
        table,
        op,
        action,
        keys: &keys[..listed],
        keys_omitted: keys.len() - listed,
        patterns,
        lsn: item.lsn.to_string(),
        commit_time: &item.commit_time,
    };
    serde_json::to_string(&event).unwrap_or_else(|_| String::from("{}"))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The command that announces `payload` on `channel`: `SPUBLISH` when
/// `sharded`, else `PUBLISH`.
pub fn publish(channel: &str, sharded: bool, payload: String) -> redis::Cmd {
    let mut cmd = redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" });
    cmd.arg(channel).arg(payload);
    cmd
}

/// The events published on the configured channel, as they arrive (JSON
/// text each), for `events` and the status page. Ends when the connection
/// does. Sharded events are read with `SSUBSCRIBE` from the node that
/// serves the channel's slot (on a cluster: its master now; a slot that
/// moves ends the stream, and the caller subscribes again).
pub async fn subscribe(
    redis: &crate::config::RedisConfig,
) -> Result<futures_util::stream::BoxStream<'static, String>, String> {
    use futures_util::StreamExt;
    let url = &redis.url;
    let scrub = |e: redis::RedisError| url.scrub(&e.to_string());
    if !redis.sharded_events {
        let client =
            crate::redis::client(url, redis.ca_cert.as_deref()).map_err(|e| e.to_string())?;
        let mut pubsub = client.get_async_pubsub().await.map_err(scrub)?;
        pubsub.subscribe(&redis.channel).await.map_err(scrub)?;
        return Ok(pubsub
            .into_on_message()
            .map(|message| message.get_payload::<String>().unwrap_or_default())
            .boxed());
    }
    let client = match redis.cluster_seeds() {
        None => crate::redis::client(url, redis.ca_cert.as_deref()).map_err(|e| e.to_string())?,
        Some(seeds) => {
            let seeds: Vec<&str> = seeds.iter().map(|s| s.expose()).collect();
            let timeout = std::time::Duration::from_secs(10);
            let cluster = crate::redis::cluster::ClusterConn::connect(&seeds, timeout, timeout)
                .await
                .map_err(scrub)?;
            let owner = cluster
                .owner_of_key(redis.channel.as_bytes())
                .await
                .map_err(scrub)?;
            let info = redis::IntoConnectionInfo::into_connection_info(url.expose())
                .map_err(scrub)?
                .set_addr(redis::ConnectionAddr::Tcp(owner.0, owner.1));
            redis::Client::open(info).map_err(scrub)?
        }
    };
    // The async pub/sub of the redis crate has no SSUBSCRIBE: a blocking
    // connection on a thread of its own reads the messages.
    let channel = redis.channel.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(1024);
    std::thread::spawn(move || {
        let subscribed = client.get_connection().and_then(|mut conn| {
            let reply = redis::cmd("SSUBSCRIBE")
                .arg(&channel)
                .query::<redis::Value>(&mut conn)?;
            reply.extract_error()?;
            Ok(conn)
        });
        let mut conn = match subscribed {
            Ok(conn) => {
                let _ = ready_tx.send(Ok(()));
                conn
            }
            Err(error) => {
                let _ = ready_tx.send(Err(error));
                return;
            }
        };
        while let Ok(redis::Value::Array(message)) = conn.recv_response() {
            // ["smessage", channel, payload]
            if let [redis::Value::BulkString(kind), _, redis::Value::BulkString(payload)] =
                message.as_slice()
            {
                if kind == b"smessage"
                    && tx
                        .blocking_send(String::from_utf8_lossy(payload).into_owned())
                        .is_err()
                {
                    return;
                }
            }
        }
    });
    ready_rx
        .await
        .map_err(|_| "the subscriber thread ended".to_string())?
        .map_err(scrub)?;
    Ok(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|payload| (payload, rx))
    })
    .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;
    use crate::ops::{FlushReason, Op};
    use std::sync::Arc;

    fn item(op: CacheOp) -> Item {
        Item {
            op,
            lsn: Lsn(0x16B3748),
            commit_time: Arc::from("2026-11-26T07:00:00.123456Z"),
            commit_micros: 1,
            seq: 1,
            xid: 0,
        }
    }

    #[test]
    fn events_have_the_documented_shape() {
        let invalidated = item(CacheOp::Invalidate {
            table: Arc::from("public.profiles"),
            op: Op::Update,
            keys: vec!["profile:user:1".into()],
        });
        assert_eq!(
            event_json(&invalidated),
            r#"{"table":"public.profiles","op":"update","action":"delete","keys":["profile:user:1"],"lsn":"0/16B3748","commit_time":"2026-11-26T07:00:00.123456Z"}"#
        );
        let flushed = item(CacheOp::Flush {
            table: Arc::from("*"),
            patterns: vec!["profile:user:*".into()],
            reason: FlushReason::SlotReset,
        });
        assert_eq!(
            event_json(&flushed),
            r#"{"table":"*","op":"flush","action":"delete","keys":[],"patterns":["profile:user:*"],"lsn":"0/16B3748","commit_time":"2026-11-26T07:00:00.123456Z"}"#
        );
    }

    /// A 20 MB key does not make a 20 MB event: the keys that fit are
    /// listed and the rest counted.
    #[test]
    fn an_event_is_bounded_in_bytes() {
        let huge = format!("profile:username:{}", "x".repeat(20 << 20));
        let event = event_json(&item(CacheOp::Invalidate {
            table: Arc::from("public.profiles"),
            op: Op::Update,
            keys: vec!["profile:user:1".into(), huge, "profile:user:2".into()],
        }));
        assert!(event.len() < MAX_EVENT_KEY_BYTES + 1024, "{}", event.len());
        let parsed: serde_json::Value = serde_json::from_str(&event).expect("json");
        assert_eq!(parsed["keys"], serde_json::json!(["profile:user:1"]));
        assert_eq!(parsed["keys_omitted"], 2);
    }
}
