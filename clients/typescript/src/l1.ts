// The in-process cache (L1) in front of Redis, kept true by Redis itself.
//
// Why CLIENT TRACKING with REDIRECT: Redis remembers every key one of our
// connections read and tells us when *anyone* changes it — the daemon's
// delete, another app instance's fill, a FLUSHALL — which the daemon's
// events alone cannot (they name only the daemon's own deletes, and an app
// fill in another process is invisible to them). ioredis speaks RESP2 only,
// so the invalidations are redirected to a second connection, the one that
// also carries the daemon's events: one ordered stream of both.
//
// What keeps it true:
//  - L1 is filled only from a plain GET on the tracked connection (never
//    from a value this process loaded itself), and only if no invalidation
//    of that key arrived while the GET was in flight;
//  - when either connection drops, an event's `seq` skips or goes back, or
//    its `epoch` changes, L1 is emptied before it answers again (a dropped
//    connection loses invalidations; a gap or an epoch says events were
//    missed or keys were flushed by pattern);
//  - a read with a write token is answered from L1 only once this process
//    has seen the daemon's position pass the token *and* a PING on the
//    invalidation connection came back after it: every invalidation Redis
//    queued for the changes before that position has then been handled.
//
// Bounds: `maxEntries` entries and `maxBytes` bytes (a key and its value
// counted as two bytes per UTF-16 unit, plus 64 bytes of bookkeeping),
// least recently used first out; each entry lives at most `ttlMs`.

import type Redis from "ioredis";
import { EventSequence, isMarker, mustDrop, parseLsn } from "./protocol";

/** The in-process cache's settings (`createCache({ redis, l1: { … } })`). */
export interface L1Options {
  /** At most this many entries. Default 10000. */
  maxEntries?: number;
  /** At most this many bytes (keys and values, two bytes per UTF-16 unit, plus 64 per entry). Default 64 MiB. */
  maxBytes?: number;
  /** An entry is read from Redis again after this long, ms. Default 60000. */
  ttlMs?: number;
  /** The daemon's events channel (`[redis] channel`). Default "cache-invalidation". */
  channel?: string;
  /** The daemon publishes with SPUBLISH (`[redis] sharded_events = true`). Default false. */
  sharded?: boolean;
  /** Called with errors of the two connections L1 keeps (they reconnect by themselves). */
  onError?: (error: Error) => void;
}

/** Why L1 was emptied, counted. */
export interface L1Drops {
  /** One of its two connections dropped. */
  disconnect: number;
  /** An event's seq skipped or went back. */
  gap: number;
  /** The daemon flushed keys by pattern (a new epoch). */
  epoch: number;
  /** Redis was flushed (FLUSHALL / FLUSHDB). */
  flush: number;
}

/** What L1 holds and has done. */
export interface L1Stats {
  entries: number;
  bytes: number;
  hits: number;
  fills: number;
  /** Reads from Redis that were not kept (an invalidation raced them, or tracking was down). */
  notKept: number;
  /** Whether L1 answers now (both connections up, tracking on). */
  tracking: boolean;
  drops: L1Drops;
}

interface Entry {
  raw: string;
  bytes: number;
  expires: number;
}

const INVALIDATE = "__redis__:invalidate";
const ENTRY_OVERHEAD = 64;

export class L1 {
  private readonly entries = new Map<string, Entry>();
  private bytes = 0;
  /** Keys with a GET in flight, and whether an invalidation spoiled them. */
  private readonly inflight = new Map<string, { reads: number; spoiled: boolean }>();
  /** Bumped whenever what L1 holds stops being trustworthy. */
  private generation = 0;
  private tracking = false;
  private subId: number | null = null;
  private readonly reader: Redis;
  private readonly sub: Redis;
  private readonly sequence = new EventSequence();
  /** The daemon's position this process has seen passed, with its invalidations handled. */
  private applied = -1n;
  private refreshing = false;
  private refreshAgain = false;
  private closed = false;
  private readonly maxEntries: number;
  private readonly maxBytes: number;
  private readonly ttlMs: number;
  private readonly channel: string;
  private readonly sharded: boolean;
  private readonly onError: (error: Error) => void;
  private readonly counts = { hits: 0, fills: 0, notKept: 0 };
  private readonly drops: L1Drops = { disconnect: 0, gap: 0, epoch: 0, flush: 0 };

  constructor(
    redis: Redis,
    options: L1Options,
    private readonly readPosition: () => Promise<string | null>,
  ) {
    this.maxEntries = positive(options.maxEntries ?? 10_000, "maxEntries");
    this.maxBytes = positive(options.maxBytes ?? 64 * 1024 * 1024, "maxBytes");
    this.ttlMs = positive(options.ttlMs ?? 60_000, "ttlMs");
    this.channel = options.channel ?? "cache-invalidation";
    this.sharded = options.sharded ?? false;
    this.onError = options.onError ?? (() => undefined);
    // Our own connections: tracking follows a connection, and the app's own
    // reads on its client must not be tracked or blocked by a subscription.
    this.reader = redis.duplicate({ connectionName: "pgci-l1-reader" });
    this.sub = redis.duplicate({ connectionName: "pgci-l1-events", autoResubscribe: false });
    for (const conn of [this.reader, this.sub]) {
      conn.on("error", (e: Error) => this.onError(e));
      conn.on("close", () => {
        if (conn === this.sub) this.subId = null;
        this.drop("disconnect");
      });
    }
    this.sub.on("ready", () => void this.subscribe());
    this.reader.on("ready", () => void this.track());
    this.sub.on("messageBuffer", (channel: Buffer, message: unknown) => this.message(channel.toString(), message));
    this.sub.on("smessageBuffer", (channel: Buffer, message: unknown) => this.message(channel.toString(), message));
  }

  /** The cached raw value of `key`, if L1 may answer for a read given `after` (a write token) or none. */
  lookup(key: string, after: string | undefined): string | undefined {
    if (!this.tracking) return undefined;
    if (after !== undefined && parseLsn(after) > this.applied) return undefined;
    const entry = this.entries.get(key);
    if (entry === undefined) return undefined;
    if (entry.expires <= Date.now()) {
      this.remove(key);
      return undefined;
    }
    // Most recently used last.
    this.entries.delete(key);
    this.entries.set(key, entry);
    this.counts.hits += 1;
    return entry.raw;
  }

  /** GET on the tracked connection; the value is kept if nothing changed it meanwhile. */
  async read(key: string): Promise<string | null> {
    const generation = this.generation;
    const trusted = this.tracking;
    const mark = this.inflight.get(key) ?? { reads: 0, spoiled: false };
    mark.reads += 1;
    this.inflight.set(key, mark);
    let raw: string | null;
    try {
      raw = await this.reader.get(key);
    } finally {
      mark.reads -= 1;
      if (mark.reads === 0) this.inflight.delete(key);
    }
    if (raw !== null && !isMarker(raw)) {
      if (trusted && this.tracking && generation === this.generation && !mark.spoiled) {
        this.store(key, raw);
      } else {
        this.counts.notKept += 1;
      }
    }
    return raw;
  }

  /**
   * The daemon's position was read as `position` (after the changes before
   * it were applied in Redis): once a PING on the invalidation connection
   * comes back, their invalidations have been handled here.
   */
  async passed(position: string): Promise<void> {
    const wanted = parseLsn(position);
    if (wanted <= this.applied || !this.tracking) return;
    const generation = this.generation;
    await this.sub.ping();
    if (generation === this.generation && this.tracking && wanted > this.applied) {
      this.applied = wanted;
    }
  }

  stats(): L1Stats {
    return {
      entries: this.entries.size,
      bytes: this.bytes,
      ...this.counts,
      tracking: this.tracking,
      drops: { ...this.drops },
    };
  }

  /** Empties L1 and closes its two connections. */
  async close(): Promise<void> {
    this.closed = true;
    this.drop("disconnect");
    this.reader.disconnect();
    this.sub.disconnect();
  }

  private async subscribe(): Promise<void> {
    try {
      // A new connection (no resubscription): it can still answer CLIENT ID.
      const id = Number(await this.sub.client("ID"));
      await this.sub.subscribe(INVALIDATE);
      if (this.sharded) {
        await this.sub.ssubscribe(this.channel);
      } else {
        await this.sub.subscribe(this.channel);
      }
      this.sequence.reset();
      this.subId = id;
      await this.track();
    } catch (e) {
      this.onError(e as Error);
      // Start over on a fresh connection rather than half subscribed.
      this.sub.disconnect(true);
    }
  }

  private async track(): Promise<void> {
    const subId = this.subId;
    if (subId === null || this.reader.status !== "ready" || this.closed) return;
    const generation = this.generation;
    try {
      await this.reader.call("CLIENT", "TRACKING", "OFF");
      await this.reader.call("CLIENT", "TRACKING", "ON", "REDIRECT", String(subId));
      if (generation === this.generation && subId === this.subId) {
        this.tracking = true;
      }
    } catch (e) {
      this.onError(e as Error);
    }
  }

  private message(channel: string, message: unknown): void {
    if (channel === INVALIDATE) {
      if (message === null || message === undefined) {
        this.drop("flush");
        return;
      }
      const keys = Array.isArray(message) ? message : [message];
      for (const key of keys) this.invalidate(String(key));
      return;
    }
    if (channel !== this.channel) return;
    let event: { seq?: unknown; epoch?: unknown };
    try {
      event = JSON.parse(String(message));
    } catch {
      return;
    }
    if (typeof event.seq === "number" && typeof event.epoch === "string") {
      const observed = this.sequence.observe(event.epoch, event.seq);
      if (mustDrop(observed)) {
        this.drop(observed.kind === "newEpoch" ? "epoch" : "gap");
      }
    }
    this.refreshPosition();
  }

  /** Learns the daemon's position after an event (one refresh at a time). */
  private refreshPosition(): void {
    if (this.refreshing) {
      this.refreshAgain = true;
      return;
    }
    this.refreshing = true;
    void (async () => {
      try {
        do {
          this.refreshAgain = false;
          const position = await this.readPosition();
          if (position !== null) await this.passed(position);
        } while (this.refreshAgain && !this.closed);
      } catch (e) {
        this.onError(e as Error);
      } finally {
        this.refreshing = false;
      }
    })();
  }

  private invalidate(key: string): void {
    const mark = this.inflight.get(key);
    if (mark !== undefined) mark.spoiled = true;
    this.remove(key);
  }

  private drop(why: keyof L1Drops): void {
    if (why === "disconnect") this.tracking = false;
    this.generation += 1;
    this.drops[why] += 1;
    this.entries.clear();
    this.bytes = 0;
    for (const mark of this.inflight.values()) mark.spoiled = true;
  }

  private store(key: string, raw: string): void {
    const bytes = 2 * (key.length + raw.length) + ENTRY_OVERHEAD;
    if (bytes > this.maxBytes) return;
    this.remove(key);
    this.entries.set(key, { raw, bytes, expires: Date.now() + this.ttlMs });
    this.bytes += bytes;
    this.counts.fills += 1;
    for (const oldest of this.entries.keys()) {
      if (this.entries.size <= this.maxEntries && this.bytes <= this.maxBytes) break;
      this.remove(oldest);
    }
  }

  private remove(key: string): void {
    const entry = this.entries.get(key);
    if (entry === undefined) return;
    this.entries.delete(key);
    this.bytes -= entry.bytes;
  }
}

function positive(n: number, name: string): number {
  if (!Number.isFinite(n) || n <= 0) {
    throw new Error(`l1.${name}: ${n} is not a positive number; leave it out for the default`);
  }
  return n;
}
