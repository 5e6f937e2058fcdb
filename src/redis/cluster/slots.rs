//! The slot map: which master serves each hash slot (read from `CLUSTER
//! SLOTS`), and which slot a key or a command routes to.

use redis::{Cmd, Value};

use super::Addr;

/// Hash slots in a Redis Cluster.
pub(super) const SLOTS: u16 = 16384;

/// Which master serves each slot, and how many replicas each has.
#[derive(Debug, Default, PartialEq)]
pub(super) struct SlotMap {
    /// Counts readings, so that a request that saw an out-of-date map
    /// asks for a reading only if nobody made one since.
    pub(super) generation: u64,
    /// Index into `masters` per slot; `None`: no node serves it.
    pub(super) owner: Vec<Option<u16>>,
    pub(super) masters: Vec<Master>,
    /// Every node named (masters and replicas): where to read the map
    /// from next time.
    pub(super) nodes: Vec<Addr>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Master {
    pub(super) addr: Addr,
    /// Replicas connected to it (its `ROLE`), or, when it did not say,
    /// those the map lists.
    pub(super) replicas: usize,
}

impl SlotMap {
    pub(super) fn owner_of(&self, slot: u16) -> Option<&Master> {
        let index = (*self.owner.get(usize::from(slot))?)?;
        self.masters.get(usize::from(index))
    }
}

/// The hash slot of `key` (its `{…}` tag's, when it has a non-empty one).
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = pgci_protocol::keys::hash_tag(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// The key a command routes by: `None` for the commands without one that
/// this program sends (they may run on any master).
pub(super) fn key_of(cmd: &Cmd) -> Option<&[u8]> {
    let mut args = cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => bytes,
        _ => &b""[..],
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"PING" | b"INFO" | b"CLUSTER" | b"FUNCTION" | b"SCRIPT" | b"PUBLISH" | b"SCAN"
        | b"WAIT" | b"CONFIG" | b"DBSIZE" | b"CLIENT" | b"ACL" | b"TIME" | b"MULTI" | b"EXEC" => {
            None
        }
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let numkeys = args.nth(1)?;
            (numkeys != b"0").then(|| args.next()).flatten()
        }
        _ => args.next(),
    }
}

/// Reads a `CLUSTER SLOTS` reply. A node listed with an empty host is the
/// one that answered (`asked_host`).
pub(super) fn parse_slots(reply: &Value, asked_host: &str) -> Result<SlotMap, String> {
    let Value::Array(ranges) = reply else {
        return Err(format!("not an array: {reply:?}"));
    };
    let mut map = SlotMap {
        owner: vec![None; usize::from(SLOTS)],
        ..SlotMap::default()
    };
    let node = |value: &Value| -> Result<Addr, String> {
        let Value::Array(fields) = value else {
            return Err(format!("a node is not an array: {value:?}"));
        };
        let host = match fields.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            other => return Err(format!("a node's host: {other:?}")),
        };
        let host = if host.is_empty() || host == "?" {
            asked_host.to_string()
        } else {
            host
        };
        match fields.get(1) {
            Some(Value::Int(port)) => u16::try_from(*port)
                .map(|port| (host, port))
                .map_err(|_| format!("a node's port: {port}")),
            other => Err(format!("a node's port: {other:?}")),
        }
    };
    let mut parsed = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err(format!("a slot range is not an array: {range:?}"));
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(master)) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err(format!("a slot range: {fields:?}"));
        };
        if !(0..i64::from(SLOTS)).contains(start) || !(*start..i64::from(SLOTS)).contains(end) {
            return Err(format!("slots {start}-{end} out of range"));
        }
        let replicas = fields[3..]
            .iter()
            .map(node)
            .collect::<Result<Vec<_>, _>>()?;
        parsed.push((*start as usize..=*end as usize, node(master)?, replicas));
    }
    for (_, master, replicas) in &parsed {
        if !map.masters.iter().any(|m| &m.addr == master) {
            map.masters.push(Master {
                addr: master.clone(),
                replicas: replicas.len(),
            });
        }
        for addr in std::iter::once(master).chain(replicas) {
            if !map.nodes.contains(addr) {
                map.nodes.push(addr.clone());
            }
        }
    }
    map.masters.sort_by(|a, b| a.addr.cmp(&b.addr));
    for (slots, master, _) in parsed {
        let index = map.masters.iter().position(|m| m.addr == master);
        for slot in slots {
            map.owner[slot] = index.map(|i| i as u16);
        }
    }
    Ok(map)
}
