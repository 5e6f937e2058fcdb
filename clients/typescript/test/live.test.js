// Tests of @pg-cache-invalidator/client against a real Redis, a real
// PostgreSQL and the daemon running on them with the demo rules
// (profile:user:{id} deleted on every change of public.profiles).
// The daemon's repository runs them from `cargo test --test main
// clients::typescript`, which starts all three and sets
// PGCI_TEST_REDIS_URL and PGCI_TEST_DATABASE_URL; without them `npm test`
// skips these and says so (test/unit.test.js needs no servers).
"use strict";

const nodeTest = require("node:test");
const assert = require("node:assert/strict");
const Redis = require("ioredis");
const { Client } = require("pg");
const { createHash } = require("node:crypto");
const {
  createCache,
  createNextCacheHandler,
  createNextIncrementalCacheHandler,
  writeToken,
  library,
  isMarker,
  MARKER_PREFIX,
  keyPrefix,
  FUNCTIONS,
  TAG_KEY_PREFIX,
  sequenceKey,
  parseLsn,
} = require("../dist");

const redisUrl = process.env.PGCI_TEST_REDIS_URL;
const databaseUrl = process.env.PGCI_TEST_DATABASE_URL;
const skip =
  redisUrl && databaseUrl
    ? false
    : "needs a Redis and a PostgreSQL the daemon runs on: set PGCI_TEST_REDIS_URL and PGCI_TEST_DATABASE_URL, or run `cargo test --test main clients::typescript` in the daemon's repository";
if (skip) console.log(`# skipping the live tests: ${skip}`);
const test = (name, fn) => nodeTest(name, { skip }, fn);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, ms, condition) {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

let redis;
let pg;
let ids;
/** Whether the server has Redis Functions (7.0+); before, the lease code runs as scripts. */
let hasFunctions;

const isUnknownCommand = (error) => /unknown command/i.test(String(error?.message));
const sha1 = (text) => createHash("sha1").update(text).digest("hex");
/** Calls a lease function as the client would: FCALL, or its body as a script before Redis 7. */
const callLease = (name, keys, ...args) => {
  if (hasFunctions) return redis.call("FCALL", name, keys.length, ...keys, ...args);
  const body = FUNCTIONS.find(([fn]) => fn === name)[1];
  return redis.call("EVAL", body, keys.length, ...keys, ...args);
};
/** Makes Redis forget the lease code, as a restart without persistence does. */
const forgetLeaseCode = async () => {
  if (hasFunctions) await redis.call("FUNCTION", "FLUSH");
  await redis.call("SCRIPT", "FLUSH");
};

nodeTest.before(async () => {
  if (skip) return;
  redis = new Redis(redisUrl);
  hasFunctions = await redis.call("FUNCTION", "LIST").then(
    () => true,
    (error) => {
      if (isUnknownCommand(error)) return false;
      throw error;
    },
  );
  pg = new Client({ connectionString: databaseUrl });
  await pg.connect();
  const res = await pg.query("select id::text as id from public.profiles order by id limit 10");
  ids = res.rows.map((r) => r.id);
});

nodeTest.after(async () => {
  if (skip) return;
  await pg.end();
  redis.disconnect();
});

const rowOf = async (client, id) =>
  (await client.query("select to_jsonb(p) as row from public.profiles p where id = $1::uuid", [id])).rows[0]?.row ?? null;

test("the library (before Redis 7: the scripts) is the one the daemon loaded", async () => {
  if (!hasFunctions) {
    const exists = await redis.call("SCRIPT", "EXISTS", ...FUNCTIONS.map(([, body]) => sha1(body)));
    assert.deepEqual(exists, FUNCTIONS.map(() => 1));
    return;
  }
  const listed = await redis.call("FUNCTION", "LIST", "LIBRARYNAME", "pgci", "WITHCODE");
  const flat = JSON.stringify(listed);
  assert.ok(flat.includes("pgci_lease_get"), flat);
  const entry = listed[0];
  const code = entry[entry.indexOf("library_code") + 1];
  assert.equal(code, library());
});

test("a miss fills through a lease, then hits; a lease reads as a miss", async () => {
  const cache = createCache({ redis });
  const key = `profile:user:${ids[0]}`;
  await cache.invalidateCache(key);
  let loads = 0;
  const loader = async () => {
    loads += 1;
    return rowOf(pg, ids[0]);
  };
  const first = await cache.getOrLoadWithSource(key, 3600, loader);
  assert.equal(first.source, "filled");
  const second = await cache.getOrLoadWithSource(key, 3600, loader);
  assert.equal(second.source, "hit");
  assert.deepEqual(second.value, first.value);
  assert.equal(loads, 1);
  assert.deepEqual(await cache.getCachedData(key), first.value);
  await redis.set(key, `${MARKER_PREFIX}someone`, "PX", 10000);
  assert.ok(isMarker(await redis.get(key)));
  assert.equal(await cache.getCachedData(key), null);
  await cache.invalidateCache(key);
});

test("a fill that raced the daemon's invalidation is refused", async () => {
  const cache = createCache({ redis });
  const id = ids[1];
  const key = `profile:user:${id}`;
  await cache.invalidateCache(key);
  let resume;
  const paused = new Promise((r) => (resume = r));
  let loaded;
  const wasLoaded = new Promise((r) => (loaded = r));
  const read = cache.getOrLoadWithSource(key, 3600, async () => {
    const row = await rowOf(pg, id);
    loaded();
    await paused;
    return row;
  });
  await wasLoaded;
  // Another reader waits for the lease, then loads without filling.
  const other = createCache({ redis, leaseWaitMs: 30 });
  const second = await other.getOrLoadWithSource(key, 3600, async () => ({ other: true }));
  assert.equal(second.source, "bypassed");
  await pg.query("update public.profiles set bio = 'raced' where id = $1::uuid", [id]);
  await waitFor("the daemon to delete the key", 10000, async () => (await redis.get(key)) === null);
  resume();
  const { value, source } = await read;
  assert.equal(source, "refused");
  assert.notEqual(value.bio, "raced");
  assert.equal(await redis.get(key), null, "nothing old was cached");
});

test("a read given a write token never returns an entry older than the write", async () => {
  const cache = createCache({ redis });
  const id = ids[2];
  const key = `profile:user:${id}`;
  await cache.setCachedData(key, { bio: "old" }, 60);
  // A token far ahead of the daemon: the cache is not trusted.
  const ahead = await cache.getOrLoadWithSource(key, 60, async () => ({ bio: "db" }), { after: "FFFFFFFF/0" });
  assert.deepEqual(ahead, { value: { bio: "db" }, source: "bypassed" });
  assert.deepEqual(await cache.getCachedData(key), { bio: "old" }, "a bypass does not fill");
  // A token the daemon has passed: the cache is used.
  const behind = await cache.getOrLoadWithSource(key, 60, async () => ({ bio: "db" }), { after: "0/0" });
  assert.deepEqual(behind, { value: { bio: "old" }, source: "hit" });
  // A real write, then the writer's own read.
  await pg.query("update public.profiles set bio = 'mine' where id = $1::uuid", [id]);
  const token = await writeToken(pg);
  const own = await cache.getOrLoad(key, 60, () => rowOf(pg, id), { after: token });
  assert.equal(own.bio, "mine");
  const waiting = createCache({ redis, after: { waitMs: 2000 } });
  const waited = await waiting.getOrLoadWithSource(key, 60, () => rowOf(pg, id), { after: token });
  assert.equal(waited.value.bio, "mine");
  assert.notEqual(waited.source, "bypassed", "the daemon applied the write within 2 s");
});

test("racing readers and a writer: nothing stale after quiescence, no stale own read", async () => {
  const hot = ids.slice(3, 10);
  const keys = hot.map((id) => `profile:user:${id}`);
  await redis.del(...keys);
  const clients = await Promise.all(
    Array.from({ length: 4 }, async () => {
      const c = new Client({ connectionString: databaseUrl });
      await c.connect();
      return c;
    }),
  );
  let stop = false;
  let refused = 0;
  const readers = clients.slice(1).flatMap((client) =>
    [0, 1].map(async () => {
      const cache = createCache({ redis });
      while (!stop) {
        const i = Math.floor(Math.random() * hot.length);
        const { source } = await cache.getOrLoadWithSource(keys[i], 3600, async () => {
          const row = await rowOf(client, hot[i]);
          await sleep(Math.random() * 5);
          return row;
        });
        if (source === "refused") refused += 1;
        await sleep(1);
      }
    }),
  );
  const writerCache = createCache({ redis });
  const writer = clients[0];
  let ownReads = 0;
  let staleOwnReads = 0;
  let lastToken = "0/0";
  // At least 1.5 s and 60 own reads (a loaded machine does fewer a
  // second), at most 30 s.
  const until = Date.now() + 1500;
  const cap = Date.now() + 30000;
  for (let n = 0; (Date.now() < until || ownReads < 60) && Date.now() < cap; n++) {
    const i = n % hot.length;
    const bio = `ts-${n}`;
    await writer.query("update public.profiles set bio = $2 where id = $1::uuid", [hot[i], bio]);
    lastToken = await writeToken(writer);
    const seen = await writerCache.getOrLoad(keys[i], 3600, () => rowOf(writer, hot[i]), { after: lastToken });
    ownReads += 1;
    if (seen?.bio !== bio) staleOwnReads += 1;
    await sleep(10);
  }
  await waitFor("the daemon to apply the last write", 10000, async () => {
    const applied = await writerCache.appliedPosition();
    return applied !== null && require("../dist").parseLsn(applied) >= require("../dist").parseLsn(lastToken);
  });
  stop = true;
  await Promise.all(readers);
  let staleKeys = 0;
  for (let i = 0; i < hot.length; i++) {
    const cached = await redis.get(keys[i]);
    if (cached === null || isMarker(cached)) continue;
    const row = await rowOf(writer, hot[i]);
    if (JSON.stringify(JSON.parse(cached)) !== JSON.stringify(row)) staleKeys += 1;
  }
  await Promise.all(clients.map((c) => c.end()));
  console.log(`typescript race: stale keys ${staleKeys}/${hot.length}, stale own reads ${staleOwnReads}/${ownReads}, refused fills ${refused}`);
  assert.equal(staleOwnReads, 0);
  assert.equal(staleKeys, 0);
  assert.ok(ownReads > 50, `${ownReads}`);
});

test("a Redis that forgot the functions gets them from the client", async () => {
  await forgetLeaseCode();
  const cache = createCache({ redis });
  const key = `profile:user:${ids[0]}`;
  await cache.invalidateCache(key);
  const { source } = await cache.getOrLoadWithSource(key, 60, () => rowOf(pg, ids[0]));
  assert.equal(source, "filled");
});

test("lookups are counted per key prefix: stats, a callback, and prom-client", async () => {
  const promClient = require("prom-client");
  const registry = new promClient.Registry();
  const seen = [];
  const cache = createCache({
    redis,
    leaseWaitMs: 30,
    promClient,
    promRegisters: [registry],
    onLookup: (lookup) => seen.push(lookup),
  });
  const id = ids[7];
  const key = `profile:user:${id}`;
  await redis.del(key);
  const first = await cache.getOrLoadWithSource(key, 3600, () => rowOf(pg, id));
  assert.equal(first.source, "filled");
  const second = await cache.getOrLoadWithSource(key, 3600, () => rowOf(pg, id));
  assert.equal(second.source, "hit");
  // Another reader holds the lease: this one waits, then loads without filling.
  await redis.del(key);
  await callLease("pgci_lease_get", [key], "someone-else", 10000);
  const third = await cache.getOrLoadWithSource(key, 3600, () => rowOf(pg, id));
  assert.equal(third.source, "bypassed");
  await redis.del(key);

  assert.deepEqual(cache.stats(), { "profile:user": { hits: 1, misses: 2, leaseWaits: 1, fills: 1 } });
  assert.deepEqual(
    seen.map((l) => [l.prefix, l.source, l.waitedForLease]),
    [
      ["profile:user", "filled", false],
      ["profile:user", "hit", false],
      ["profile:user", "bypassed", true],
    ],
  );
  const text = await registry.metrics();
  assert.match(text, /pgci_client_lookups_total\{prefix="profile:user",outcome="hit"\} 1/);
  assert.match(text, /pgci_client_lookups_total\{prefix="profile:user",outcome="miss"\} 2/);
  assert.match(text, /pgci_client_lease_waits_total\{prefix="profile:user"\} 1/);
  assert.match(text, /pgci_client_fills_total\{prefix="profile:user"\} 1/);
  assert.equal(keyPrefix("balance:user:0b7e4c1a-9d1f:token:t1"), "balance:user");
});

test("the Next.js cache handler serves a tagged page until the daemon revalidates its tag", async () => {
  const handler = createNextCacheHandler({ redis, onError: (e) => assert.fail(String(e)) });
  const [mine, other] = [ids[8], ids[9]];
  const tagOf = (id) => `profile:${id}`;
  const entry = (id, text) => ({
    value: new ReadableStream({
      start(c) {
        c.enqueue(new TextEncoder().encode(text));
        c.close();
      },
    }),
    tags: [tagOf(id)],
    stale: 300,
    timestamp: Date.now(),
    expire: 3600,
    revalidate: 900,
  });
  const read = async (key, soft = []) => {
    const got = await handler.get(key, soft);
    return got === undefined ? undefined : await new Response(got.value).text();
  };
  // Stored twice: the first page after a revalidation rendered before its
  // tag's new mark and is not kept; the next one is.
  // The handler compares clocks with the error of one TIME round trip: on
  // a loaded machine a page rendered a few ms after the mark is still
  // within it and is not kept, so render again a little later, as Next.js
  // would on the next request.
  const store = async (key, id, text) => {
    await handler.set(key, Promise.resolve(entry(id, text)));
    assert.equal(await read(key), undefined, "the first page after a revalidation renders again");
    for (let attempt = 0; attempt < 50 && (await read(key)) === undefined; attempt++) {
      await sleep(5 + attempt * 10);
      await handler.set(key, Promise.resolve(entry(id, text)));
    }
    assert.equal(await read(key), text);
  };
  await redis.del(TAG_KEY_PREFIX + tagOf(mine), TAG_KEY_PREFIX + tagOf(other));
  await store("page-mine", mine, "mine v1");
  await store("page-other", other, "other v1");
  // A write by plain SQL: the daemon deletes the tag's mark.
  await pg.query("update public.profiles set bio = 'tagged' where id = $1::uuid", [mine]);
  await waitFor("the daemon to revalidate the tag", 10000, async () => (await redis.exists(TAG_KEY_PREFIX + tagOf(mine))) === 0);
  assert.equal(await read("page-mine"), undefined, "a page rendered before the change is not served");
  assert.equal(await read("page-other"), "other v1", "another user's page stays cached");
  // revalidateTag / revalidatePath from the app (updateTags): own and soft tags.
  await sleep(2);
  await handler.updateTags(["_N_T_/other"]);
  assert.equal(await read("page-other", ["_N_T_/other"]), undefined, "a revalidated path");
  assert.equal(await read("page-other", ["_N_T_/elsewhere"]), "other v1");
  await handler.updateTags([tagOf(other)]);
  assert.equal(await read("page-other"), undefined, "a revalidated tag");
});

test("the Next.js incremental cache handler (unstable_cache, fetch) honours the daemon's tag marks", async () => {
  const Handler = createNextIncrementalCacheHandler({ redis, onError: (e) => assert.fail(String(e)) });
  const handler = new Handler({});
  const [mine, other] = [ids[6], ids[5]];
  const tagOf = (id) => `profile:${id}`;
  const fetchValue = (text) => ({
    kind: "FETCH",
    data: { headers: {}, body: Buffer.from(text).toString("base64"), status: 200, url: "" },
    revalidate: 3600,
    tags: [],
  });
  // As Next.js does: a lookup, then the computed value.
  const compute = async (key, id, text) => {
    const got = await handler.get(key, { kind: "FETCH", tags: [tagOf(id)], softTags: [] });
    if (got !== null) return got.value;
    await handler.set(key, fetchValue(text), { tags: [tagOf(id)] });
    return null;
  };
  const body = (value) => Buffer.from(value.data.body, "base64").toString();
  await redis.del(TAG_KEY_PREFIX + tagOf(mine), TAG_KEY_PREFIX + tagOf(other));
  for (const [key, id, text] of [["fetch-mine", mine, "mine v1"], ["fetch-other", other, "other v1"]]) {
    assert.equal(await compute(key, id, text), null, "a miss");
    assert.equal(await compute(key, id, text), null, "the first value after a revalidation is not kept");
    // As in the test above: on a loaded machine a value computed a few ms
    // after the mark is still within the clock error, so compute again a
    // little later, as Next.js would on the next request.
    for (let attempt = 0; attempt < 50; attempt++) {
      await sleep(5 + attempt * 10);
      if ((await compute(key, id, text)) !== null) break;
    }
    assert.equal(body(await compute(key, id, "not computed")), text, "then it is served");
  }
  // A page entry's Buffers and Maps come back as they went.
  const page = { kind: "APP_PAGE", html: "<p>x</p>", rscData: Buffer.from([1, 2, 3]), segmentData: new Map([["/a", Buffer.from("seg")]]), headers: { "x-next-cache-tags": tagOf(other) } };
  await handler.get("page-other", {});
  await handler.set("page-other", page, {});
  const got = (await handler.get("page-other", {})).value;
  assert.deepEqual([got.rscData, got.segmentData.get("/a").toString()], [Buffer.from([1, 2, 3]), "seg"]);
  // A write by plain SQL: the daemon deletes the tag's mark.
  await pg.query("update public.profiles set bio = 'tagged again' where id = $1::uuid", [mine]);
  await waitFor("the daemon to revalidate the tag", 10000, async () => (await redis.exists(TAG_KEY_PREFIX + tagOf(mine))) === 0);
  assert.equal(await compute("fetch-mine", mine, "mine v2"), null, "a value computed before the change is not served");
  assert.equal(body(await compute("fetch-other", other, "x")), "other v1", "another user's value stays");
  // revalidateTag from the app.
  await sleep(2);
  await handler.revalidateTag(tagOf(other));
  assert.equal(await handler.get("fetch-other", { kind: "FETCH", tags: [tagOf(other)] }), null);
  assert.equal(await handler.get("page-other", {}), null, "a page carrying the tag in x-next-cache-tags");
});

// ---- L1: the in-process cache kept true by CLIENT TRACKING and the events.

/** A cache with L1, once its tracking is on. */
const l1Cache = async (options = {}) => {
  const cache = createCache({ redis, l1: { onError: () => undefined, ...options } });
  await waitFor("L1's tracking to start", 5000, async () => cache.l1Stats().tracking);
  return cache;
};

/** Reads `key` until L1 answers it (a fill, then a Redis hit that L1 keeps). */
const intoL1 = async (cache, key, id) => {
  for (let i = 0; i < 5; i++) {
    if ((await cache.getOrLoadWithSource(key, 3600, () => rowOf(pg, id))).source === "l1") return;
  }
  assert.fail(`L1 never answered ${key}`);
};

/** Kills the L1 connection named `name` (CLIENT KILL, as a network cut or an output-buffer limit would). */
const killL1Connection = async (name) => {
  const list = String(await redis.call("CLIENT", "LIST"));
  const ids = list
    .split("\n")
    .filter((line) => line.includes(` name=${name} `))
    .map((line) => /(?:^|\s)id=(\d+)/.exec(line)[1]);
  assert.ok(ids.length > 0, `no connection named ${name}:\n${list}`);
  for (const id of ids) await redis.call("CLIENT", "KILL", "ID", id);
};

test("L1 answers a repeated read in process; SQL changes and other instances' writes reach it by tracking", async () => {
  const cache = await l1Cache();
  const other = createCache({ redis });
  try {
    const id = ids[4];
    const key = `profile:user:${id}`;
    await redis.del(key);
    assert.equal((await cache.getOrLoadWithSource(key, 3600, () => rowOf(pg, id))).source, "filled");
    // Its own load is not kept: L1 holds only what it read from Redis.
    assert.equal(cache.l1Stats().entries, 0);
    assert.equal((await cache.getOrLoadWithSource(key, 3600, () => rowOf(pg, id))).source, "hit");
    const near = await cache.getOrLoadWithSource(key, 3600, () => assert.fail("no load from L1"));
    assert.equal(near.source, "l1");
    // A change by plain SQL: the daemon deletes the key, tracking tells L1.
    await pg.query("update public.profiles set bio = 'l1 sql' where id = $1::uuid", [id]);
    // Both of the daemon's passes over the key are done (the second one
    // would delete what another instance writes below).
    const token = await writeToken(pg);
    await waitFor("the daemon to pass the update", 10000, async () => {
      const applied = await other.appliedPosition();
      return applied !== null && parseLsn(applied) >= parseLsn(token);
    });
    await waitFor("L1 to drop the key", 5000, async () => cache.l1Stats().entries === 0);
    await intoL1(cache, key, id);
    assert.equal((await cache.getOrLoad(key, 3600, () => rowOf(pg, id))).bio, "l1 sql");
    // Another instance overwrites the key (no delete first): tracking again.
    await other.setCachedData(key, { bio: "another instance" });
    await waitFor("L1 to drop the overwritten key", 5000, async () => cache.l1Stats().entries === 0);
    assert.equal((await cache.getOrLoad(key, 3600, () => rowOf(pg, id))).bio, "another instance");
    // Another instance's lease fill after an invalidation.
    await intoL1(cache, key, id);
    await other.invalidateCache(key);
    assert.equal((await other.getOrLoadWithSource(key, 3600, async () => ({ bio: "filled elsewhere" }))).source, "filled");
    await waitFor("L1 to drop the refilled key", 5000, async () => cache.l1Stats().entries === 0);
    assert.equal((await cache.getOrLoad(key, 3600, () => rowOf(pg, id))).bio, "filled elsewhere");
    const stats = cache.l1Stats();
    assert.ok(stats.hits >= 3 && stats.fills >= 3, JSON.stringify(stats));
  } finally {
    await cache.close();
    await redis.del(`profile:user:${ids[4]}`);
  }
});

test("L1 is emptied when a connection drops, an event is missed or keys are flushed (a new epoch)", async () => {
  const cache = await l1Cache();
  const keyOf = (id) => `profile:user:${id}`;
  const fill = async () => {
    for (const id of ids.slice(0, 4)) await intoL1(cache, keyOf(id), id);
    assert.equal(cache.l1Stats().entries, 4);
  };
  try {
    // The invalidation connection is cut: what it would have carried is lost.
    await fill();
    await killL1Connection("pgci-l1-events");
    await waitFor("L1 to learn of the cut", 5000, async () => cache.l1Stats().drops.disconnect >= 1);
    assert.equal(cache.l1Stats().entries, 0);
    await waitFor("tracking to start again", 5000, async () => cache.l1Stats().tracking);
    // Tracking redirects to the new connection: a change still reaches L1.
    await fill();
    await pg.query("update public.profiles set bio = 'after the cut' where id = $1::uuid", [ids[0]]);
    await waitFor("L1 to drop the changed key", 10000, async () => cache.l1Stats().entries === 3);
    assert.equal((await cache.getOrLoad(keyOf(ids[0]), 3600, () => rowOf(pg, ids[0]))).bio, "after the cut");
    // The tracked connection is cut.
    await fill();
    await killL1Connection("pgci-l1-reader");
    await waitFor("L1 to learn of the cut", 5000, async () => cache.l1Stats().drops.disconnect >= 2);
    assert.equal(cache.l1Stats().entries, 0);
    await waitFor("tracking to start again", 5000, async () => cache.l1Stats().tracking);
    // An event gap: the daemon's numbering skips three events this
    // subscriber never saw (as when its messages were lost).
    await fill();
    await pg.query("update public.pillars set slug = slug where true");
    await waitFor("an event", 5000, async () => (await redis.hget(sequenceKey("cache-invalidation"), "seq")) !== null);
    await sleep(200);
    assert.deepEqual([cache.l1Stats().drops.gap, cache.l1Stats().drops.epoch], [0, 0], "a pillar's event is no gap");
    await redis.hincrby(sequenceKey("cache-invalidation"), "seq", 3);
    await pg.query("update public.pillars set slug = slug where true");
    await waitFor("L1 to see the gap", 5000, async () => cache.l1Stats().drops.gap >= 1);
    assert.equal(cache.l1Stats().entries, 0);
    // A new epoch: TRUNCATE makes the daemon flush journey keys by pattern.
    await fill();
    await pg.query("truncate public.user_journeys");
    await waitFor("L1 to see the new epoch", 10000, async () => cache.l1Stats().drops.epoch >= 1);
    assert.equal(cache.l1Stats().entries, 0);
    // And it fills again.
    await fill();
  } finally {
    await cache.close();
  }
});

test("a read with a write token never returns a value from before the write through L1", async () => {
  const cache = await l1Cache();
  const id = ids[3];
  const key = `profile:user:${id}`;
  let reads = 0;
  let fromL1 = 0;
  let stale = 0;
  try {
    for (let n = 0; n < 25; n++) {
      // L1 holds the value before the write.
      await intoL1(cache, key, id);
      const bio = `l1-token-${n}`;
      await pg.query("update public.profiles set bio = $2 where id = $1::uuid", [id, bio]);
      const token = await writeToken(pg);
      // Read with the token until L1 answers it, and a few more times.
      for (let i = 0, sinceL1 = 0; sinceL1 < 3 && i < 400; i++) {
        const { value, source } = await cache.getOrLoadWithSource(key, 3600, () => rowOf(pg, id), { after: token });
        reads += 1;
        if (value?.bio !== bio) stale += 1;
        if (source === "l1") {
          fromL1 += 1;
          sinceL1 += 1;
        }
        await sleep(1);
      }
    }
    console.log(`# L1 token reads: ${reads}, from L1 ${fromL1}, stale ${stale}`);
    assert.equal(stale, 0);
    assert.ok(fromL1 >= 25, `L1 answered only ${fromL1} reads with a token`);
  } finally {
    await cache.close();
  }
});

test("L1 keeps at most maxEntries entries and maxBytes bytes, each for at most ttlMs", async () => {
  const keyOf = (id) => `profile:user:${id}`;
  const byCount = await l1Cache({ maxEntries: 2 });
  const byBytes = await l1Cache({ maxBytes: 1500 });
  const byTime = await l1Cache({ ttlMs: 50 });
  try {
    for (const id of ids.slice(0, 5)) {
      await intoL1(byCount, keyOf(id), id);
      await intoL1(byBytes, keyOf(id), id);
    }
    assert.equal(byCount.l1Stats().entries, 2);
    // The most recently used stay.
    assert.equal((await byCount.getOrLoadWithSource(keyOf(ids[4]), 3600, () => rowOf(pg, ids[4]))).source, "l1");
    const { entries, bytes } = byBytes.l1Stats();
    assert.ok(bytes <= 1500 && entries >= 1 && entries < 5, JSON.stringify(byBytes.l1Stats()));
    await intoL1(byTime, keyOf(ids[0]), ids[0]);
    await sleep(80);
    assert.equal((await byTime.getOrLoadWithSource(keyOf(ids[0]), 3600, () => rowOf(pg, ids[0]))).source, "hit");
    assert.throws(() => createCache({ redis, l1: { maxEntries: 0 } }), /l1.maxEntries: 0 is not a positive number/);
  } finally {
    await Promise.all([byCount.close(), byBytes.close(), byTime.close()]);
  }
});
