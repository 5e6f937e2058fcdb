// @pg-cache-invalidator/client: cache-aside reads for a Next.js (or any
// Node) app whose Redis cache pg-cache-invalidator keeps in step with
// PostgreSQL.
//
// Two races make plain cache-aside return old data even though the daemon
// invalidates every change:
//  1. a request reads a row, the row changes and the daemon deletes the
//     key, then the request stores its old copy for the whole TTL
//     -> getOrLoad fills through a lease that the daemon's delete voids;
//  2. the daemon's delete lands just after the writer's commit returned,
//     so the writer's next read still hits the old entry
//     -> take writeToken(pg) after the commit and pass it as { after }: while
//     the daemon has not applied that position the cache is not trusted.

import type Redis from "ioredis";
import type { Cluster } from "ioredis";
import { createHash, randomBytes } from "crypto";
import {
  FILL,
  FUNCTIONS,
  GET,
  RELEASE,
  isMarker,
  library,
  parseLsn,
} from "./protocol";
import { L1, type L1Options, type L1Stats } from "./l1";

export * from "./protocol";
export type { L1Options, L1Stats, L1Drops } from "./l1";

/** What a read given a write token does while the daemon is behind it. */
export type AfterPolicy = "bypass" | { waitMs: number };

export interface CacheOptions {
  /** An ioredis client (or Cluster). */
  redis: Redis | Cluster;
  /** The daemon's replication slot (names the position key). Default "pg_cache_invalidator". */
  slot?: string;
  /** How long a lease lasts, ms: longer than a slow load. Default 10000. */
  leaseMs?: number;
  /** How long to wait for another reader's fill before loading without filling, ms. Default 500. */
  leaseWaitMs?: number;
  /** Reads with { after } while the daemon is behind: "bypass" (default: read the database, do not fill) or { waitMs } (wait up to that long first). */
  after?: AfterPolicy;
  /** Default TTL of setCachedData, seconds. Default 3600. */
  defaultTtlSeconds?: number;
  /** The prefix a key's lookups are counted under. Default: keyPrefix. */
  keyPrefix?: (key: string) => string;
  /** Called after every getOrLoad, for your own metrics. */
  onLookup?: (lookup: Lookup) => void;
  /**
   * The prom-client module, when the app uses it: getOrLoad then counts
   * pgci_client_lookups_total{prefix,outcome}, pgci_client_lease_waits_total{prefix}
   * and pgci_client_fills_total{prefix} in its default registry (or in `promRegisters`).
   */
  promClient?: PromClient;
  /** Registries for the prom-client counters. Default: prom-client's default registry. */
  promRegisters?: unknown[];
  /**
   * An in-process cache in front of Redis (single server, not a Cluster),
   * kept true by Redis' CLIENT TRACKING and the daemon's events; it opens
   * two connections of its own (close them with `cache.close()`).
   */
  l1?: L1Options;
}

/** One getOrLoad, as counted per key prefix. */
export interface Lookup {
  key: string;
  prefix: string;
  source: Source;
  /** Another reader held the key's lease and this one waited for it. */
  waitedForLease: boolean;
}

/** Counts of one key prefix (see Cache.stats). */
export interface PrefixStats {
  hits: number;
  misses: number;
  leaseWaits: number;
  fills: number;
}

/** The part of prom-client used here. */
export interface PromClient {
  Counter: new (config: {
    name: string;
    help: string;
    labelNames: string[];
    registers?: unknown[];
  }) => { inc(labels: Record<string, string>, value?: number): void };
}

/**
 * The prefix a key is counted under: its `:`-separated segments up to the
 * first that holds a digit (an id), so `balance:user:<uuid>:token:<id>`
 * counts as `balance:user`; a key with no such segment counts without its
 * last segment. The same rule as the Rust client's `key_prefix`.
 */
export function keyPrefix(key: string): string {
  const segments = key.split(":");
  const id = segments.findIndex((s) => /[0-9]/.test(s));
  if (id === 0) return key;
  if (id > 0) return segments.slice(0, id).join(":");
  return segments.length > 1 ? segments.slice(0, -1).join(":") : key;
}

type Counters = {
  lookups: { inc(labels: Record<string, string>, value?: number): void };
  leaseWaits: { inc(labels: Record<string, string>, value?: number): void };
  fills: { inc(labels: Record<string, string>, value?: number): void };
};

/** Where getOrLoad's value came from (see getOrLoadWithSource). */
export type Source = "hit" | "l1" | "filled" | "refused" | "bypassed";

/** Anything with a `query` method like pg's Client or Pool. */
export interface Queryable {
  query(text: string): Promise<{ rows: Array<Record<string, unknown>> }>;
}

/**
 * Takes a read-your-writes token after a commit: the WAL insert position now,
 * which is at or past that commit. Run it on the connection that committed
 * (or any connection, after the commit returned).
 */
export async function writeToken(pg: Queryable): Promise<string> {
  const res = await pg.query("select pg_current_wal_insert_lsn()::text as lsn");
  const lsn = res.rows[0]?.lsn;
  if (typeof lsn !== "string") {
    throw new Error("writeToken: pg_current_wal_insert_lsn() returned no value");
  }
  return lsn;
}

/** Anything with supabase-js's `rpc` method (a SupabaseClient). */
export interface SupabaseRpc {
  rpc(fn: string): PromiseLike<{ data: unknown; error: { message: string } | null }>;
}

/**
 * Takes a read-your-writes token through supabase-js, after a write
 * committed: calls `public.pgci_write_token()` (ship it once with
 * sql/client/write_token.sql). Call it after the write's own request
 * returned, never from inside the write's function: there the position is
 * before the commit (the SQL function refuses).
 */
export async function writeTokenFromSupabase(supabase: SupabaseRpc): Promise<string> {
  const { data, error } = await supabase.rpc("pgci_write_token");
  if (error) {
    const missing = /pgci_write_token/.test(error.message) && /find|exist/i.test(error.message);
    throw new Error(
      missing
        ? `writeTokenFromSupabase: ${error.message}: run sql/client/write_token.sql once in the database (SQL editor or a migration)`
        : `writeTokenFromSupabase: ${error.message}`,
    );
  }
  if (typeof data !== "string") {
    throw new Error(`writeTokenFromSupabase: pgci_write_token returned ${JSON.stringify(data)}, not a pg_lsn`);
  }
  parseLsn(data);
  return data;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isError(e: unknown, text: string): boolean {
  return e instanceof Error && e.message.toLowerCase().includes(text);
}

export class Cache {
  private readonly redis: Redis | Cluster;
  private readonly positionKey: string;
  private readonly leaseMs: number;
  private readonly leaseWaitMs: number;
  private readonly after: AfterPolicy;
  private readonly defaultTtl: number;
  /** Whether FCALL works here; undefined until tried. */
  private functions: boolean | undefined;
  private readonly prefixOf: (key: string) => string;
  private readonly onLookup: ((lookup: Lookup) => void) | undefined;
  private readonly counters: Counters | undefined;
  private readonly counts = new Map<string, PrefixStats>();
  private readonly l1: L1 | undefined;

  constructor(options: CacheOptions) {
    this.redis = options.redis;
    this.positionKey = `pgci:position:${options.slot ?? "pg_cache_invalidator"}`;
    this.leaseMs = options.leaseMs ?? 10_000;
    this.leaseWaitMs = options.leaseWaitMs ?? 500;
    this.after = options.after ?? "bypass";
    this.defaultTtl = options.defaultTtlSeconds ?? 3600;
    this.prefixOf = options.keyPrefix ?? keyPrefix;
    this.onLookup = options.onLookup;
    if (options.l1 !== undefined) {
      if (!("duplicate" in options.redis) || "nodes" in options.redis) {
        throw new Error("l1: needs a single Redis server (CLIENT TRACKING follows one connection); leave l1 out on a Redis Cluster");
      }
      this.l1 = new L1(options.redis as Redis, options.l1, () => this.redis.get(this.positionKey));
    }
    const prom = options.promClient;
    const registers = options.promRegisters;
    this.counters = prom && {
      lookups: new prom.Counter({
        name: "pgci_client_lookups_total",
        help: "Cache lookups by key prefix and outcome (hit, miss)",
        labelNames: ["prefix", "outcome"],
        registers,
      }),
      leaseWaits: new prom.Counter({
        name: "pgci_client_lease_waits_total",
        help: "Lookups that waited for another reader's lease, by key prefix",
        labelNames: ["prefix"],
        registers,
      }),
      fills: new prom.Counter({
        name: "pgci_client_fills_total",
        help: "Lookups that filled their key, by key prefix",
        labelNames: ["prefix"],
        registers,
      }),
    };
  }

  /** Lookups, lease waits and fills so far, per key prefix. */
  stats(): Record<string, PrefixStats> {
    return Object.fromEntries([...this.counts].map(([prefix, c]) => [prefix, { ...c }]));
  }

  private record(key: string, source: Source, waitedForLease: boolean): void {
    const prefix = this.prefixOf(key);
    const hit = source === "hit" || source === "l1";
    const c = this.counts.get(prefix) ?? { hits: 0, misses: 0, leaseWaits: 0, fills: 0 };
    c.hits += hit ? 1 : 0;
    c.misses += hit ? 0 : 1;
    c.leaseWaits += waitedForLease ? 1 : 0;
    c.fills += source === "filled" ? 1 : 0;
    this.counts.set(prefix, c);
    if (this.counters) {
      this.counters.lookups.inc({ prefix, outcome: hit ? "hit" : "miss" });
      if (waitedForLease) this.counters.leaseWaits.inc({ prefix });
      if (source === "filled") this.counters.fills.inc({ prefix });
    }
    this.onLookup?.({ key, prefix, source, waitedForLease });
  }

  /**
   * The value of `key`; on a miss, `loader()` (a JSON-serializable value, or
   * null for "no such row", which is not cached) fills it through a lease.
   * With `{ after: token }`, never a value older than that write.
   */
  async getOrLoad<T>(
    key: string,
    ttlSeconds: number,
    loader: () => Promise<T | null>,
    options: { after?: string } = {},
  ): Promise<T | null> {
    return (await this.getOrLoadWithSource(key, ttlSeconds, loader, options)).value;
  }

  /** getOrLoad, also saying where the value came from. */
  async getOrLoadWithSource<T>(
    key: string,
    ttlSeconds: number,
    loader: () => Promise<T | null>,
    options: { after?: string } = {},
  ): Promise<{ value: T | null; source: Source }> {
    const waited = { lease: false };
    const result = await this.lookup(key, ttlSeconds, loader, options, waited);
    this.record(key, result.source, waited.lease);
    return result;
  }

  private async lookup<T>(
    key: string,
    ttlSeconds: number,
    loader: () => Promise<T | null>,
    options: { after?: string },
    waited: { lease: boolean },
  ): Promise<{ value: T | null; source: Source }> {
    const near = this.l1?.lookup(key, options.after);
    if (near !== undefined) {
      return { value: JSON.parse(near) as T, source: "l1" };
    }
    if (options.after !== undefined && !(await this.caughtUp(options.after))) {
      return { value: await loader(), source: "bypassed" };
    }
    // A hit costs one GET: a cached value is never a lease marker, so the
    // lease function is called only on a miss or a marker.
    const cached = this.l1 ? await this.l1.read(key) : await this.redis.get(key);
    if (cached !== null && !isMarker(cached)) {
      return { value: JSON.parse(cached) as T, source: "hit" };
    }
    const token = randomBytes(12).toString("hex");
    const deadline = Date.now() + this.leaseWaitMs;
    for (;;) {
      const reply = (await this.call(GET, key, [token, String(this.leaseMs)])) as [string, string];
      const [kind, payload] = reply;
      if (kind === "hit") {
        return { value: JSON.parse(payload) as T, source: "hit" };
      }
      if (kind === "lease") {
        break;
      }
      if (kind !== "wait") {
        throw new Error(`${GET}: unexpected reply for key ${key}`);
      }
      waited.lease = true;
      const now = Date.now();
      if (now >= deadline) {
        return { value: await loader(), source: "bypassed" };
      }
      const left = Math.max(1, Math.min(5, Number(payload) || 1));
      await sleep(Math.min(left, deadline - now));
    }
    let value: T | null;
    try {
      value = await loader();
    } catch (e) {
      await this.call(RELEASE, key, [token]).catch(() => undefined);
      throw e;
    }
    if (value === null || value === undefined) {
      await this.call(RELEASE, key, [token]);
      return { value: null, source: "bypassed" };
    }
    const stored = await this.call(FILL, key, [token, JSON.stringify(value), String(ttlSeconds)]);
    return { value, source: Number(stored) === 1 ? "filled" : "refused" };
  }

  /** The plan's plain read: the cached value, or null (a lease marker reads as a miss). */
  async getCachedData<T>(key: string): Promise<T | null> {
    const raw = await this.redis.get(key);
    if (raw === null || isMarker(raw)) {
      return null;
    }
    return JSON.parse(raw) as T;
  }

  /**
   * The plan's plain write (SET … EX, no lease): only for values computed
   * from a write the caller just made, never for values read earlier.
   */
  async setCachedData(key: string, data: unknown, ttlSeconds?: number): Promise<void> {
    await this.redis.set(key, JSON.stringify(data), "EX", ttlSeconds ?? this.defaultTtl);
  }

  /** The in-process cache's figures (undefined without `l1`). */
  l1Stats(): L1Stats | undefined {
    return this.l1?.stats();
  }

  /** Closes what the cache opened itself (L1's two connections); the app's own client stays open. */
  async close(): Promise<void> {
    await this.l1?.close();
  }

  /** Deletes `key` (and any lease on it). */
  async invalidateCache(key: string): Promise<void> {
    await this.redis.del(key);
  }

  /** writeToken, for convenience. */
  writeToken(pg: Queryable): Promise<string> {
    return writeToken(pg);
  }

  /** The position the daemon has applied (pg_lsn text), or null. */
  async appliedPosition(): Promise<string | null> {
    return this.redis.get(this.positionKey);
  }

  private async caughtUp(token: string): Promise<boolean> {
    const wanted = parseLsn(token);
    const deadline = typeof this.after === "object" ? Date.now() + this.after.waitMs : 0;
    for (;;) {
      const applied = await this.redis.get(this.positionKey);
      if (applied !== null && parseLsn(applied) >= wanted) {
        // Lets later reads with this token answer from L1.
        void this.l1?.passed(applied).catch(() => undefined);
        return true;
      }
      if (Date.now() >= deadline) {
        return false;
      }
      await sleep(1);
    }
  }

  /** FCALL where Redis has the library (loading it once when missing), else the body by SHA. */
  private async call(fn: string, key: string, args: string[]): Promise<unknown> {
    if (this.functions !== false) {
      try {
        const out = await this.redis.call("FCALL", fn, 1, key, ...args);
        this.functions = true;
        return out;
      } catch (e) {
        if (isError(e, "function not found")) {
          await this.redis.call("FUNCTION", "LOAD", "REPLACE", library());
          return this.redis.call("FCALL", fn, 1, key, ...args);
        }
        if (!isError(e, "unknown command")) {
          throw e;
        }
        this.functions = false;
      }
    }
    const body = FUNCTIONS.find(([name]) => name === fn)?.[1];
    if (body === undefined) {
      throw new Error(`unknown lease function ${fn}`);
    }
    const sha = createHash("sha1").update(body).digest("hex");
    try {
      return await this.redis.evalsha(sha, 1, key, ...args);
    } catch (e) {
      if (!isError(e, "noscript")) {
        throw e;
      }
      return this.redis.eval(body, 1, key, ...args);
    }
  }
}

/** createCache({ redis, ...options }): the package's entry point. */
export function createCache(options: CacheOptions): Cache {
  return new Cache(options);
}

export { createNextCacheHandler, createNextIncrementalCacheHandler } from "./next";
export type {
  NextCacheEntry,
  NextCacheHandler,
  NextCacheHandlerOptions,
  NextIncrementalHandler,
  NextIncrementalValue,
} from "./next";
