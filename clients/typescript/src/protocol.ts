// The lease protocol of pg-cache-invalidator (the Rust source of truth is
// crates/protocol/src/lease.rs in the daemon's repository; the package's
// test checks that its library is byte for byte the one the daemon loads).
//
// Library `pgci`, one key per call (so it works in Redis Cluster):
//   pgci_lease_get(key; token, leaseMs)        -> ["hit", value] | ["lease", token] | ["wait", msLeft]
//   pgci_lease_fill(key; token, value, ttlS)   -> 1 stored | 0 refused
//   pgci_lease_release(key; token)             -> 1 | 0
// A lease marker is "\0pgci-lease:" + token: it starts with NUL, so no JSON
// reader takes it for data.

/** What a lease marker starts with. */
export const MARKER_PREFIX = "\u0000pgci-lease:";
/** The function library's name. */
export const LIBRARY = "pgci";
/** The function names, a contract shared with the daemon and other clients. */
export const GET = "pgci_lease_get";
export const FILL = "pgci_lease_fill";
export const RELEASE = "pgci_lease_release";

export const GET_BODY = `
local v = redis.call('GET', KEYS[1])
local prefix = '\\0pgci-lease:'
if not v then
  redis.call('SET', KEYS[1], prefix .. ARGV[1], 'PX', ARGV[2])
  return {'lease', ARGV[1]}
end
if string.sub(v, 1, #prefix) == prefix then
  return {'wait', tostring(redis.call('PTTL', KEYS[1]))}
end
return {'hit', v}
`;

export const FILL_BODY = `
if redis.call('GET', KEYS[1]) == '\\0pgci-lease:' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
`;

export const RELEASE_BODY = `
if redis.call('GET', KEYS[1]) == '\\0pgci-lease:' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
`;

/** Each function's name and body. */
export const FUNCTIONS: ReadonlyArray<readonly [string, string]> = [
  [GET, GET_BODY],
  [FILL, FILL_BODY],
  [RELEASE, RELEASE_BODY],
];

/** The library text FUNCTION LOAD REPLACE takes (the same the daemon loads). */
export function library(): string {
  let text = `#!lua name=${LIBRARY}\n`;
  for (const [name, body] of FUNCTIONS) {
    text += `redis.register_function('${name}', function(KEYS, ARGV)\n${body}\nend)\n`;
  }
  return text;
}

/** Whether a stored value is a lease marker rather than data. */
export function isMarker(value: string | null | undefined): boolean {
  return typeof value === "string" && value.startsWith(MARKER_PREFIX);
}

/** Parses a pg_lsn text ("16/B374D848") into a number that orders like it. */
export function parseLsn(text: string): bigint {
  const m = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/.exec(text.trim());
  if (!m) {
    throw new Error(`not a pg_lsn: ${JSON.stringify(text)}`);
  }
  return (BigInt(`0x${m[1]}`) << 32n) | BigInt(`0x${m[2]}`);
}

/**
 * The key prefix of cache-tag marks (see pgci_protocol::tags in the
 * daemon): a rule's `tags` deletes `pgci:tag:<tag>` at each change.
 */
export const TAG_KEY_PREFIX = "pgci:tag:";

// The order of the invalidation events (the Rust source of truth is
// crates/protocol/src/events.rs). Every event carries `seq`, one more than
// the event before it on the channel, and `epoch`, which changes when keys
// were flushed by pattern. A subscriber that sees anything but the next
// `seq` of the same epoch, or whose connection dropped, drops everything it
// holds.

/** What one event says about the events before it. */
export type Observed =
  | { kind: "first" }
  | { kind: "next" }
  | { kind: "gap"; missed: number }
  | { kind: "rewound" }
  | { kind: "newEpoch" };

/** Whether a subscriber must drop everything it holds. */
export function mustDrop(observed: Observed): boolean {
  return observed.kind !== "next" && observed.kind !== "first";
}

/** The last event a subscriber saw on one channel. */
export class EventSequence {
  private last: { epoch: string; seq: number } | null = null;

  /** Takes the event numbered `seq` in `epoch`. */
  observe(epoch: string, seq: number): Observed {
    const last = this.last;
    this.last = { epoch, seq };
    if (last === null) return { kind: "first" };
    if (last.epoch !== epoch) return { kind: "newEpoch" };
    if (seq === last.seq + 1) return { kind: "next" };
    if (seq > last.seq) return { kind: "gap", missed: seq - last.seq - 1 };
    return { kind: "rewound" };
  }

  /** The subscription was lost: the next event starts afresh. */
  reset(): void {
    this.last = null;
  }
}

/** The Redis hash `seq` and `epoch` come from, in the channel's hash slot. */
export function sequenceKey(channel: string): string {
  const open = channel.indexOf("{");
  const close = open >= 0 ? channel.indexOf("}", open + 1) : -1;
  const tagged = open >= 0 && close > open + 1;
  return tagged ? `pgci:events:${channel}` : `pgci:events:{${channel}}`;
}
