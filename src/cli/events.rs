//! `events [--json] [--table T] [--key GLOB] [--count N] [--since ID]`:
//! tails the invalidation events the daemon publishes, as a readable
//! table or JSON lines, until Ctrl-C (or N events). Each event's `seq` and
//! `epoch` are checked as a subscriber must check them (see
//! [`pgci_protocol::events`]): a gap or a new epoch is reported on
//! stderr. With `--since` the events come from `redis.stream`, from the
//! entry after ID (`0`: the oldest kept), then live.

use futures_util::StreamExt;
use pgci_protocol::events::{Observed, Sequence};
use wildmatch::WildMatch;

use crate::cli::{Failure, Loaded};
use crate::sink::redis::events;

/// What to print.
pub struct Args {
    /// JSON lines (the payload as published) instead of a table.
    pub json: bool,
    /// Only events of this table (`schema.table`).
    pub table: Option<String>,
    /// Only events with a key (or flush pattern) matching this glob
    /// (`*` and `?`).
    pub key: Option<String>,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Read `redis.stream` from the entry after this id.
    pub since: Option<String>,
}

/// Subscribes to the channel (or reads the stream) and prints matching
/// events.
pub async fn events(loaded: Loaded, args: Args) -> Result<(), Failure> {
    let redis = &loaded.config.redis;
    if redis.channel.is_empty() {
        return Err(Failure::usage(vec![
            "redis.channel is empty: events are off; set a channel (default \"cache-invalidation\") and restart the daemon".to_string(),
        ]));
    }
    let source = match &args.since {
        None => {
            let stream = events::subscribe(redis).await.map_err(|e| {
                Failure::runtime(format!("cannot subscribe at {}: {e}", redis.url.redacted()))
            })?;
            eprintln!(
                "listening on {} channel {:?} (Ctrl-C to stop)",
                redis.url.redacted(),
                redis.channel
            );
            stream
        }
        Some(since) => {
            if redis.stream.is_empty() {
                return Err(Failure::usage(vec![
                    "--since reads redis.stream, which is not set: set stream = \"…\" under [redis] (the daemon then keeps its events there), or drop --since".to_string(),
                ]));
            }
            let stream = events::read_stream(redis, since).await.map_err(|e| {
                Failure::runtime(format!(
                    "cannot read the stream {:?} at {}: {e}",
                    redis.stream,
                    redis.url.redacted()
                ))
            })?;
            eprintln!(
                "reading {} stream {:?} after {since} (Ctrl-C to stop)",
                redis.url.redacted(),
                redis.stream
            );
            stream
        }
    };
    let glob = args.key.as_deref().map(WildMatch::new);
    if !args.json {
        println!(
            "{:>8} {:<27} {:<28} {:<9} {:<8} keys",
            "seq", "commit_time", "table", "op", "action"
        );
    }
    let mut printed = 0u64;
    let mut order = Sequence::default();
    if let Some(since) = args.since.as_deref().filter(|s| !matches!(*s, "0" | "0-0")) {
        // Resuming after an entry: it must still be there, or what came
        // after it may be trimmed already.
        match events::stream_entry(redis, since).await {
            Ok(Some(event)) => {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&event) {
                    check_order(&mut order, &event);
                }
            }
            Ok(None) => eprintln!(
                "the stream no longer holds entry {since} (trimmed past it, or emptied): events after it may be missing; a subscriber drops everything it holds"
            ),
            Err(e) => {
                return Err(Failure::runtime(format!(
                    "cannot read the stream {:?}: {e}",
                    redis.stream
                )))
            }
        }
    }
    let mut stream = std::pin::pin!(source);
    loop {
        let payload = tokio::select! {
            payload = stream.next() => match payload {
                Some(payload) => payload,
                None => return Err(Failure::runtime("the redis connection closed")),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&payload) else {
            continue;
        };
        if let Some(note) = check_order(&mut order, &event) {
            eprintln!("{note}");
        }
        if !wanted(&event, args.table.as_deref(), glob.as_ref()) {
            continue;
        }
        if args.json {
            println!("{payload}");
        } else {
            println!("{}", row(&event));
        }
        printed += 1;
        if args.count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
    }
}

/// What `event`'s `seq` and `epoch` say about the events before it, as a
/// line for stderr when a subscriber would have to drop what it holds.
fn check_order(order: &mut Sequence, event: &serde_json::Value) -> Option<String> {
    let (Some(epoch), Some(seq)) = (event["epoch"].as_str(), event["seq"].as_u64()) else {
        return Some(
            "an event without seq and epoch (a daemon older than this one): its order cannot be checked".to_string(),
        );
    };
    let before = order.last().map(|(e, s)| (e.to_string(), s));
    let observed = order.observe(epoch, seq);
    let (last_epoch, last) = before.unwrap_or_default();
    match observed {
        Observed::First | Observed::Next => None,
        Observed::Gap { missed } => Some(format!(
            "gap: {missed} event(s) missed between seq {last} and {seq}: a subscriber drops everything it holds"
        )),
        Observed::Rewound => Some(format!(
            "seq went back from {last} to {seq} in epoch {epoch}: redis lost writes (restored or failed over); a subscriber drops everything it holds"
        )),
        Observed::NewEpoch => Some(format!(
            "new epoch {epoch} (was {last_epoch}): keys were flushed by pattern; a subscriber drops everything it holds"
        )),
    }
}

fn strings(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
}

fn wanted(event: &serde_json::Value, table: Option<&str>, key: Option<&WildMatch>) -> bool {
    if table.is_some_and(|t| event["table"].as_str() != Some(t)) {
        return false;
    }
    match key {
        None => true,
        Some(glob) => strings(&event["keys"])
            .into_iter()
            .chain(strings(&event["patterns"]))
            .any(|k| glob.matches(k)),
    }
}

/// The table view: every field through [`printable`], since keys hold
/// whatever a row held (an escape sequence in a username must not reach
/// the operator's terminal).
fn row(event: &serde_json::Value) -> String {
    let text = |name: &str| printable(event[name].as_str().unwrap_or("-"));
    let list = |name: &str| {
        strings(&event[name])
            .into_iter()
            .map(printable)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let keys = match list("patterns") {
        patterns if !patterns.is_empty() => format!("flush {patterns}"),
        _ => list("keys"),
    };
    let seq = event["seq"]
        .as_u64()
        .map_or_else(|| "-".to_string(), |n| n.to_string());
    format!(
        "{seq:>8} {:<27} {:<28} {:<9} {:<8} {keys}",
        text("commit_time"),
        text("table"),
        text("op"),
        text("action")
    )
}

/// `text` with control characters escaped as JSON escapes them (`\r`,
/// `\u001b`); everything else, including non-ASCII letters, as it is.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key holding an escape sequence and a carriage return is shown
    /// escaped, never raw.
    #[test]
    fn control_characters_are_escaped_in_the_table() {
        let event = serde_json::json!({"table": "public.profiles", "op": "update", "action": "delete",
            "keys": ["profile:username:\u{1b}[31mred\rover"], "commit_time": "t\u{7}"});
        let line = row(&event);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(
            line.contains("profile:username:\\u001b[31mred\\rover"),
            "{line}"
        );
        assert_eq!(printable("journée ✓"), "journée ✓");
    }

    #[test]
    fn events_are_filtered_by_table_and_key_glob() {
        let event = serde_json::json!({"table": "public.profiles", "op": "update", "action": "delete",
            "keys": ["profile:user:1"], "lsn": "0/1", "commit_time": "2026-12-03T00:00:00Z"});
        assert!(wanted(&event, Some("public.profiles"), None));
        assert!(!wanted(&event, Some("public.user_tokens"), None));
        assert!(wanted(&event, None, Some(&WildMatch::new("profile:*"))));
        assert!(!wanted(&event, None, Some(&WildMatch::new("balance:*"))));
        let flush = serde_json::json!({"table": "public.profiles", "op": "truncate", "action": "delete",
            "keys": [], "patterns": ["profile:user:*"]});
        assert!(wanted(
            &flush,
            None,
            Some(&WildMatch::new("profile:user:*"))
        ));
        assert!(row(&flush).ends_with("flush profile:user:*"));
    }

    #[test]
    fn gaps_and_new_epochs_are_reported() {
        let event = |epoch: &str, seq: u64| serde_json::json!({"seq": seq, "epoch": epoch});
        let mut order = Sequence::default();
        assert_eq!(check_order(&mut order, &event("a", 1)), None);
        assert_eq!(check_order(&mut order, &event("a", 2)), None);
        let gap = check_order(&mut order, &event("a", 5)).expect("gap");
        assert!(
            gap.starts_with("gap: 2 event(s) missed between seq 2 and 5"),
            "{gap}"
        );
        let epoch = check_order(&mut order, &event("b", 6)).expect("epoch");
        assert!(epoch.starts_with("new epoch b (was a)"), "{epoch}");
        let back = check_order(&mut order, &event("b", 3)).expect("rewound");
        assert!(back.starts_with("seq went back from 6 to 3"), "{back}");
    }
}
