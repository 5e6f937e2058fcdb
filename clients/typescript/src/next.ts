// A Redis-backed Next.js cache handler (`cacheHandlers` in next.config,
// for 'use cache') whose tagged entries pg-cache-invalidator keeps true:
// a daemon rule with `tags = ["profile:{id}"]` deletes the tag's mark at
// every change of the row, and this handler then no longer serves a page
// tagged `profile:<id>` that was rendered before the change. No app code
// calls revalidateTag for it, and writes that bypass the app count too.
//
// The contract (pgci_protocol::tags): a tag's mark `pgci:tag:<tag>` holds
// the Redis time (ms) from which pages carrying the tag may be trusted. A
// stored page is served only while each of its tags has a mark older than
// the page's rendering. When the page is stored, missing marks are created
// at Redis's time; so a mark the daemon deleted (or a flush, or an
// eviction) means "revalidated just now": the first page stored after a
// change renders once more at the next request, and none is served stale.
// revalidateTag() from the app (updateTags) moves the marks to now.

import type { Redis, Cluster } from "ioredis";
import { ReadableStream } from "stream/web";
import { TAG_KEY_PREFIX } from "./protocol";

/** A cache entry as Next.js hands it over (next/dist/server/lib/cache-handlers/types). */
export interface NextCacheEntry {
  value: ReadableStream<Uint8Array>;
  tags: string[];
  stale: number;
  timestamp: number;
  expire: number;
  revalidate: number;
}

/** Next.js' CacheHandler interface for `cacheHandlers` (Next.js 16). */
export interface NextCacheHandler {
  get(cacheKey: string, softTags: string[]): Promise<undefined | NextCacheEntry>;
  set(cacheKey: string, pendingEntry: Promise<NextCacheEntry>): Promise<void>;
  refreshTags(): Promise<void>;
  getExpiration(tags: string[]): Promise<number>;
  updateTags(tags: string[], durations?: { expire?: number }): Promise<void>;
}

export interface NextCacheHandlerOptions {
  /** An ioredis client (one server; on a cluster each key is its own request). */
  redis: Redis | Cluster;
  /** Prefix of the stored entries. Default "pgci:next:". */
  keyPrefix?: string;
  /** Longest an entry is kept in Redis, seconds (Next.js' `expire` when shorter). Default 86400. */
  maxTtlSeconds?: number;
  /** Largest entry stored, bytes; a bigger one is served but not kept. Default 4 MiB. */
  maxEntryBytes?: number;
  /** Called when Redis fails: the handler then answers "not cached" (the page renders). */
  onError?: (error: unknown) => void;
}

/** Creates the tag marks that are missing at Redis's time; returns [now, mark…]. */
const MARK_MISSING = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
for i, key in ipairs(KEYS) do
  local mark = tonumber(redis.call('GET', key) or '')
  if not mark then
    redis.call('SET', key, now)
    mark = now
  end
  out[i + 1] = mark
end
return out`;

/** Moves the tag marks to Redis's time now (never back). */
const MARK_NOW = `local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs(KEYS) do
  local mark = tonumber(redis.call('GET', key) or '0') or 0
  if now > mark then redis.call('SET', key, now) end
end
return now`;

interface Stored {
  /** The value's bytes, base64. */
  v: string;
  tags: string[];
  stale: number;
  /** Next.js' timestamp (its clock), handed back as it came. */
  timestamp: number;
  /** When rendering began, on Redis's clock (conservatively early). */
  renderedAt: number;
  expire: number;
  revalidate: number;
}

const isCluster = (redis: Redis | Cluster): boolean => (redis as { isCluster?: boolean }).isCluster === true;

async function readAll(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  const reader = stream.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    total += value.length;
  }
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.length;
  }
  return bytes;
}

function streamOf(bytes: Uint8Array): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(bytes);
      controller.close();
    },
  });
}

/**
 * A Next.js `cacheHandlers` handler on Redis that honours the daemon's tag
 * marks. In `cache-handler.js`: `module.exports = createNextCacheHandler({ redis: new Redis(url) })`;
 * in next.config: `cacheHandlers: { default: require.resolve("./cache-handler.js") }`.
 */
export function createNextCacheHandler(options: NextCacheHandlerOptions): NextCacheHandler {
  const redis = options.redis;
  const prefix = options.keyPrefix ?? "pgci:next:";
  const maxTtl = options.maxTtlSeconds ?? 86400;
  const maxBytes = options.maxEntryBytes ?? 4 << 20;
  const onError = options.onError ?? ((error: unknown) => console.error("pgci next cache handler:", error));
  const cluster = isCluster(redis);
  /** Sets in flight in this process: a get of the same key waits for it. */
  const pending = new Map<string, Promise<void>>();
  const markKey = (tag: string) => `${TAG_KEY_PREFIX}${tag}`;

  /** The marks of `tags` (creating missing ones), and Redis's time now. */
  async function marksCreating(tags: string[]): Promise<{ now: number; marks: number[] }> {
    if (tags.length === 0 || !cluster) {
      const out = (await redis.eval(MARK_MISSING, tags.length, ...tags.map(markKey))) as number[];
      return { now: Number(out[0]), marks: out.slice(1).map(Number) };
    }
    const each = await Promise.all(
      tags.map((tag) => redis.eval(MARK_MISSING, 1, markKey(tag)) as Promise<number[]>),
    );
    return { now: Math.min(...each.map((o) => Number(o[0]))), marks: each.map((o) => Number(o[1])) };
  }

  /** The marks of `tags` as they are (null: missing). */
  async function marks(tags: string[]): Promise<Array<number | null>> {
    if (tags.length === 0) return [];
    const keys = tags.map(markKey);
    const values = cluster
      ? await Promise.all(keys.map((k) => redis.get(k)))
      : await (redis as Redis).mget(...keys);
    // A mark that is not a number (a lease marker) counts as missing.
    return values.map((v) => (v === null || Number.isNaN(Number(v)) ? null : Number(v)));
  }

  async function store(cacheKey: string, pendingEntry: Promise<NextCacheEntry>): Promise<void> {
    // Next.js calls set as rendering begins: the clocks are compared now.
    const before = Date.now();
    const [seconds, micros] = await redis.time();
    const after = Date.now();
    const offset = Number(seconds) * 1000 + Math.floor(Number(micros) / 1000) - (before + after) / 2;
    const error = (after - before) / 2 + 1;
    const entry = await pendingEntry;
    const bytes = await readAll(entry.value);
    if (bytes.length > maxBytes) return;
    const renderedAt = entry.timestamp + offset - error;
    const { marks: current } = await marksCreating(entry.tags);
    // A mark at or after the rendering began: this page may hold data from
    // before a change, do not keep it.
    if (current.some((mark) => mark >= renderedAt)) return;
    const ttl = Math.max(1, Math.min(maxTtl, Math.floor(entry.expire)));
    const stored: Stored = {
      v: Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length).toString("base64"),
      tags: entry.tags,
      stale: entry.stale,
      timestamp: entry.timestamp,
      renderedAt,
      expire: entry.expire,
      revalidate: entry.revalidate,
    };
    await redis.set(prefix + cacheKey, JSON.stringify(stored), "EX", ttl);
  }

  return {
    async get(cacheKey, softTags) {
      await pending.get(cacheKey);
      try {
        const text = await redis.get(prefix + cacheKey);
        if (text === null) return undefined;
        const stored = JSON.parse(text) as Stored;
        const [own, soft] = await Promise.all([marks(stored.tags), marks(softTags)]);
        // Own tags: a missing mark was deleted by the daemon (or flushed,
        // or evicted): revalidated. Soft tags (paths) only have marks once
        // revalidated (updateTags).
        if (own.some((mark) => mark === null || mark >= stored.renderedAt)) return undefined;
        if (soft.some((mark) => mark !== null && mark >= stored.renderedAt)) return undefined;
        return {
          value: streamOf(new Uint8Array(Buffer.from(stored.v, "base64"))),
          tags: stored.tags,
          stale: stored.stale,
          timestamp: stored.timestamp,
          expire: stored.expire,
          revalidate: stored.revalidate,
        };
      } catch (error) {
        onError(error);
        return undefined;
      }
    },

    async set(cacheKey, pendingEntry) {
      const done = store(cacheKey, pendingEntry).catch(onError);
      pending.set(cacheKey, done);
      try {
        await done;
      } finally {
        if (pending.get(cacheKey) === done) pending.delete(cacheKey);
      }
    },

    async refreshTags() {
      // Marks are read with each entry: nothing to refresh per request.
    },

    async getExpiration() {
      // Soft tags are checked in get, against the same clock as the entry.
      return Infinity;
    },

    async updateTags(tags) {
      if (tags.length === 0) return;
      try {
        if (cluster) {
          await Promise.all(tags.map((tag) => redis.eval(MARK_NOW, 1, markKey(tag))));
        } else {
          await redis.eval(MARK_NOW, tags.length, ...tags.map(markKey));
        }
      } catch (error) {
        onError(error);
      }
    },
  };
}

/** What Next.js' incremental cache (`cacheHandler`: fetch cache, unstable_cache, ISR) stores. */
export interface NextIncrementalValue {
  kind: string;
  [field: string]: unknown;
}

/** Next.js' incremental `CacheHandler` (next/dist/server/lib/incremental-cache), as this handler implements it. */
export interface NextIncrementalHandler {
  get(cacheKey: string, ctx?: { kind?: string; tags?: string[]; softTags?: string[] }): Promise<{ lastModified: number; value: NextIncrementalValue } | null>;
  set(cacheKey: string, data: NextIncrementalValue | null, ctx?: { tags?: string[] }): Promise<void>;
  revalidateTag(tags: string | string[], durations?: { expire?: number }): Promise<void>;
  resetRequestCache(): void;
}

/** Most cache keys whose last lookup start this process remembers (oldest forgotten first). */
const MAX_STARTS = 10_000;

/**
 * A Next.js incremental `cacheHandler` (fetch cache, `unstable_cache`, ISR)
 * on Redis that honours the daemon's tag marks like
 * {@link createNextCacheHandler}. Next.js instantiates it, so this returns
 * the class: in `incremental-cache-handler.js`,
 * `module.exports = createNextIncrementalCacheHandler({ redis: new Redis(url) })`,
 * and in next.config: `cacheHandler: require.resolve("./incremental-cache-handler.js"), cacheMaxMemorySize: 0`.
 *
 * Next.js reads an entry (`get`) before it computes one (`set`), so the
 * rendering began at the last `get` of the key: the handler remembers
 * that time (on Redis's clock, from an offset measured every few seconds)
 * and stores the value only if none of its tags was revalidated since.
 * A `set` with no `get` before it in this process is not stored.
 */
export function createNextIncrementalCacheHandler(
  options: NextCacheHandlerOptions,
): new (ctx?: unknown) => NextIncrementalHandler {
  const redis = options.redis;
  const prefix = options.keyPrefix ?? "pgci:next:incremental:";
  const maxTtl = options.maxTtlSeconds ?? 86400;
  const maxBytes = options.maxEntryBytes ?? 4 << 20;
  const onError = options.onError ?? ((error: unknown) => console.error("pgci next incremental cache handler:", error));
  const cluster = isCluster(redis);
  const markKey = (tag: string) => `${TAG_KEY_PREFIX}${tag}`;
  /** Redis time minus local time, and how far off it may be, ms. */
  let clock: { offset: number; error: number; at: number } | null = null;
  /** When the last lookup of each key began, Redis clock. */
  const starts = new Map<string, number>();

  async function redisNow(): Promise<number> {
    if (clock === null || Date.now() - clock.at > 10_000) {
      const before = Date.now();
      const [seconds, micros] = await redis.time();
      const after = Date.now();
      clock = {
        offset: Number(seconds) * 1000 + Math.floor(Number(micros) / 1000) - (before + after) / 2,
        error: (after - before) / 2 + 1,
        at: after,
      };
    }
    return Date.now() + clock.offset - clock.error;
  }

  async function marksOf(tags: string[], create: boolean): Promise<Array<number | null>> {
    if (tags.length === 0) return [];
    const keys = tags.map(markKey);
    if (create) {
      if (cluster) {
        return Promise.all(keys.map(async (k) => Number(((await redis.eval(MARK_MISSING, 1, k)) as number[])[1])));
      }
      return ((await redis.eval(MARK_MISSING, keys.length, ...keys)) as number[]).slice(1).map(Number);
    }
    const values = cluster ? await Promise.all(keys.map((k) => redis.get(k))) : await (redis as Redis).mget(...keys);
    // A mark that is not a number (a lease marker) counts as missing.
    return values.map((v) => (v === null || Number.isNaN(Number(v)) ? null : Number(v)));
  }

  /** The tags an entry carries: the fetch's, or a page's `x-next-cache-tags`. */
  function tagsOf(data: NextIncrementalValue, ctx?: { tags?: string[] }): string[] {
    const tags = new Set<string>(ctx?.tags ?? []);
    for (const tag of (data.tags as string[] | undefined) ?? []) tags.add(tag);
    const headers = data.headers as Record<string, unknown> | undefined;
    const header = headers?.["x-next-cache-tags"];
    if (typeof header === "string") for (const tag of header.split(",")) if (tag) tags.add(tag);
    return [...tags];
  }

  return class PgciIncrementalCacheHandler implements NextIncrementalHandler {
    constructor(_ctx?: unknown) {}

    async get(cacheKey: string, ctx?: { tags?: string[]; softTags?: string[] }) {
      try {
        const now = await redisNow();
        // The earliest lookup still pending (a set clears it); one older
        // than a minute belonged to a lookup that stored nothing.
        const pending = starts.get(cacheKey);
        if (pending === undefined || now - pending > 60_000) {
          if (starts.size >= MAX_STARTS) starts.delete(starts.keys().next().value as string);
          starts.delete(cacheKey);
          starts.set(cacheKey, now);
        }
        const text = await redis.get(prefix + cacheKey);
        if (text === null) return null;
        const stored = JSON.parse(text, revive) as { value: NextIncrementalValue; lastModified: number; renderedAt: number; tags: string[] };
        const own = await marksOf([...new Set([...stored.tags, ...(ctx?.tags ?? [])])], false);
        const soft = await marksOf(ctx?.softTags ?? [], false);
        if (own.some((mark) => mark === null || mark >= stored.renderedAt)) return null;
        if (soft.some((mark) => mark !== null && mark >= stored.renderedAt)) return null;
        return { lastModified: stored.lastModified, value: stored.value };
      } catch (error) {
        onError(error);
        return null;
      }
    }

    async set(cacheKey: string, data: NextIncrementalValue | null, ctx?: { tags?: string[] }) {
      const renderedAt = starts.get(cacheKey);
      starts.delete(cacheKey);
      try {
        if (data === null) {
          await redis.del(prefix + cacheKey);
          return;
        }
        if (renderedAt === undefined) return;
        const tags = tagsOf(data, ctx);
        const marks = await marksOf(tags, true);
        if (marks.some((mark) => mark !== null && mark >= renderedAt)) return;
        const text = JSON.stringify({ value: data, lastModified: Date.now(), renderedAt, tags }, replace);
        if (Buffer.byteLength(text) > maxBytes) return;
        await redis.set(prefix + cacheKey, text, "EX", maxTtl);
      } catch (error) {
        onError(error);
      }
    }

    async revalidateTag(tags: string | string[]) {
      const list = typeof tags === "string" ? [tags] : tags;
      if (list.length === 0) return;
      try {
        if (cluster) {
          await Promise.all(list.map((tag) => redis.eval(MARK_NOW, 1, markKey(tag))));
        } else {
          await redis.eval(MARK_NOW, list.length, ...list.map(markKey));
        }
      } catch (error) {
        onError(error);
      }
    }

    resetRequestCache() {}
  };
}

/** JSON for Buffers (after their toJSON) and Maps, which page entries hold. */
function replace(_key: string, value: unknown): unknown {
  if (value instanceof Map) return { __pgciMap: [...value.entries()] };
  const buffer = value as { type?: unknown; data?: unknown };
  if (buffer !== null && typeof buffer === "object" && buffer.type === "Buffer" && Array.isArray(buffer.data)) {
    return { __pgciBase64: Buffer.from(buffer.data as number[]).toString("base64") };
  }
  return value;
}

function revive(_key: string, value: unknown): unknown {
  if (value !== null && typeof value === "object") {
    const tagged = value as { __pgciMap?: Array<[unknown, unknown]>; __pgciBase64?: string };
    if (tagged.__pgciMap !== undefined) return new Map(tagged.__pgciMap);
    if (tagged.__pgciBase64 !== undefined) return Buffer.from(tagged.__pgciBase64, "base64");
  }
  return value;
}
