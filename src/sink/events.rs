//! The pub/sub event announcing each applied operation (the format is the
//! contract in DESIGN.md: subscribers parse it).

use serde::Serialize;

use crate::ops::{CacheOp, Item};

/// The pub/sub event for one applied operation.
#[derive(Debug, Serialize)]
struct Event<'a> {
    table: &'a str,
    op: &'a str,
    action: &'a str,
    keys: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    patterns: Option<&'a [String]>,
    lsn: String,
    commit_time: &'a str,
}

/// The event JSON for `item`.
pub fn event_json(item: &Item) -> String {
    let touched: Vec<String>;
    let (table, op) = item.op.names();
    let (action, keys, patterns): (&str, &[String], _) = match &item.op {
        CacheOp::Refresh { set, del, .. } => {
            touched = set.iter().chain(del).cloned().collect();
            ("refresh", &touched, None)
        }
        CacheOp::Query { keys, .. } => ("refresh", keys, None),
        CacheOp::Invalidate { keys, .. } => ("delete", keys, None),
        CacheOp::Flush { patterns, .. } => ("delete", &[], Some(patterns.as_slice())),
    };
    let event = Event {
        table,
        op,
        action,
        keys,
        patterns,
        lsn: item.lsn.to_string(),
        commit_time: &item.commit_time,
    };
    serde_json::to_string(&event).unwrap_or_else(|_| String::from("{}"))
}

/// The events published on `channel`, as they arrive (JSON text each),
/// for `events`. Ends when the connection does.
pub async fn subscribe(
    url: &crate::secret::SecretUrl,
    ca_cert: Option<&std::path::Path>,
    channel: &str,
) -> Result<impl futures_util::Stream<Item = String>, String> {
    use futures_util::StreamExt;
    let client = super::client(url, ca_cert).map_err(|e| e.to_string())?;
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|e| url.scrub(&e.to_string()))?;
    pubsub
        .subscribe(channel)
        .await
        .map_err(|e| url.scrub(&e.to_string()))?;
    Ok(pubsub
        .into_on_message()
        .map(|message| message.get_payload::<String>().unwrap_or_default()))
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
}
