//! The pub/sub event announcing each applied operation (the format is the
//! contract in DESIGN.md and the README: subscribers parse it), numbered
//! for gap detection (see [`pgci_protocol::events`]) and optionally kept
//! in a Redis Stream.
//!
//! One script per batch ([`ANNOUNCE`]) draws the events' `seq` numbers
//! from the channel's sequence record, stamps the epoch, appends each
//! event to the stream and publishes it: Redis runs it atomically, so
//! the numbers are contiguous whatever else publishes on the channel (the
//! daemons of other groups), and on a single server it runs inside the
//! batch's transaction with the position record.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::ops::{CacheOp, Item};

/// Most bytes of keys one event lists. Keys hold whatever a row held (a
/// 20 MB value in a key column made a 40 MB event, and Redis closed every
/// subscriber for its output buffer): past this the event lists the keys
/// that fit and says how many it left out (`keys_omitted`), and a
/// subscriber drops everything it holds of the table.
pub const MAX_EVENT_KEY_BYTES: usize = 64 << 10;

/// Numbers and publishes a batch's events. `KEYS[1]` the sequence record
/// (hash: `seq`, `epoch`), `KEYS[2]` the stream when there is one; `ARGV`:
/// the channel, `PUBLISH` or `SPUBLISH`, an epoch to start, `1` to start
/// it now (the batch flushed), the stream's MAXLEN, then each event's JSON
/// without its opening brace. A missing record (an emptied Redis) starts
/// a new epoch too. With a stream, the published event also names the
/// entry that holds it (`stream_id`), where a subscriber back from a
/// disconnect resumes. Returns the last `seq`.
const ANNOUNCE: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if ARGV[4] == '1' or not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local count = #ARGV - 5
local seq = redis.call('HINCRBY', KEYS[1], 'seq', count) - count
for i = 6, #ARGV do
  seq = seq + 1
  local head = '{"seq":' .. string.format('%d', seq) .. ',"epoch":"' .. epoch .. '",'
  if KEYS[2] then
    local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'event', head .. ARGV[i])
    head = head .. '"stream_id":"' .. id .. '",'
  end
  redis.call(ARGV[2], ARGV[1], head .. ARGV[i])
end
return seq
"#;

/// Where a target's events go.
#[derive(Debug, Clone)]
pub struct Announcer {
    channel: String,
    sharded: bool,
    /// The channel's sequence record.
    sequence: String,
    /// `[redis] stream` and its `stream_max_len`.
    stream: Option<(String, u64)>,
}

impl Announcer {
    /// Events on `channel`, published with `PUBLISH`.
    pub fn new(channel: &str) -> Announcer {
        Announcer {
            channel: channel.to_string(),
            sharded: false,
            sequence: pgci_protocol::events::sequence_key(channel),
            stream: None,
        }
    }

    /// Published with `SPUBLISH` instead.
    pub fn sharded(mut self, sharded: bool) -> Announcer {
        self.sharded = sharded;
        self
    }

    /// Appended to the stream `name` too (none when empty), trimmed to
    /// about `max_len` entries.
    pub fn streamed_if(mut self, name: &str, max_len: u64) -> Announcer {
        if !name.is_empty() {
            self.stream = Some((name.to_string(), max_len));
        }
        self
    }

    /// The script call that numbers, stores and publishes the events of
    /// the row operations among `items` (a first pass announced with its
    /// second may hold flushes: those were announced when applied).
    pub fn announce_rows(&self, items: &[Item]) -> redis::Cmd {
        self.announce(
            items
                .iter()
                .filter(|i| !matches!(i.op, CacheOp::Flush { .. })),
            false,
        )
    }

    /// The script call that numbers, stores and publishes the events of
    /// `items`; `new_epoch` when they report a flush.
    pub fn announce<'a>(
        &self,
        items: impl IntoIterator<Item = &'a Item>,
        new_epoch: bool,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(ANNOUNCE)
            .arg(if self.stream.is_some() { 2 } else { 1 })
            .arg(&self.sequence);
        if let Some((stream, _)) = &self.stream {
            cmd.arg(stream);
        }
        cmd.arg(&self.channel)
            .arg(if self.sharded { "SPUBLISH" } else { "PUBLISH" })
            .arg(next_epoch())
            .arg(if new_epoch { "1" } else { "0" })
            .arg(self.stream.as_ref().map_or(0, |(_, n)| *n));
        for item in items {
            let json = event_json(item);
            cmd.arg(json.strip_prefix('{').unwrap_or(&json));
        }
        cmd
    }
}

/// A new epoch name: the time in microseconds (hex), never the same twice
/// in one process.
fn next_epoch() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return format!("{next:x}"),
            Err(seen) => last = seen,
        }
    }
}

/// The pub/sub event for one applied operation (`seq` and `epoch` are
/// put in front by [`ANNOUNCE`]).
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

/// The event JSON for `item`, without `seq` and `epoch`.
fn event_json(item: &Item) -> String {
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

/// The event kept in `redis.stream` at entry `id`, if the stream still
/// holds it.
pub async fn stream_entry(
    redis: &crate::config::RedisConfig,
    id: &str,
) -> Result<Option<String>, String> {
    let mut conn = crate::redis::connect_once(&redis.url, redis.ca_cert.as_deref()).await?;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&redis.stream)
        .arg(id)
        .arg(id)
        .query_async(&mut conn)
        .await
        .map_err(|e| redis.url.scrub(&e.to_string()))?;
    Ok(entries
        .into_iter()
        .flat_map(|(_, fields)| fields)
        .find(|(field, _)| field == pgci_protocol::events::STREAM_FIELD)
        .map(|(_, event)| event))
}

/// `XREAD`'s reply: per stream, its entries (id, field-value pairs).
type XReadReply = Vec<(String, Vec<(String, Vec<(String, String)>)>)>;

/// The events kept in `redis.stream` from the entry after `since` (`0`:
/// the oldest kept), then each new one as it is added. Ends when the
/// connection fails.
pub async fn read_stream(
    redis: &crate::config::RedisConfig,
    since: &str,
) -> Result<futures_util::stream::BoxStream<'static, String>, String> {
    use futures_util::StreamExt;
    let conn = crate::redis::connect_once(&redis.url, redis.ca_cert.as_deref()).await?;
    let stream = redis.stream.clone();
    let url = redis.url.clone();
    // Each read blocks at most 250 ms: below the connection's response
    // timeout (500 ms), and Ctrl-C is noticed between reads.
    let read = move |(mut conn, after): (crate::redis::conn::Conn, String)| {
        let stream = stream.clone();
        let url = url.clone();
        async move {
            loop {
                let reply: redis::RedisResult<Option<XReadReply>> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&after)
                    .query_async(&mut conn)
                    .await;
                match reply {
                    Ok(None) => continue,
                    Ok(Some(streams)) => {
                        let entries: Vec<(String, Vec<(String, String)>)> = streams
                            .into_iter()
                            .flat_map(|(_, entries)| entries)
                            .collect();
                        let Some(last) = entries.last().map(|(id, _)| id.clone()) else {
                            continue;
                        };
                        let payloads: Vec<String> = entries
                            .into_iter()
                            .flat_map(|(_, fields)| fields)
                            .filter(|(field, _)| field == pgci_protocol::events::STREAM_FIELD)
                            .map(|(_, payload)| payload)
                            .collect();
                        return Some((payloads, (conn, last)));
                    }
                    Err(error) => {
                        eprintln!(
                            "reading the stream failed: {}",
                            url.scrub(&error.to_string())
                        );
                        return None;
                    }
                }
            }
        }
    };
    Ok(
        futures_util::stream::unfold((conn, since.to_string()), read)
            .flat_map(futures_util::stream::iter)
            .boxed(),
    )
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
