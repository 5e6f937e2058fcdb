// Tests that need no servers: the key-prefix rule, LSN parsing, the lease
// protocol's text, and the package's two entry points (require and import
// give the same API). `npm test` runs these anywhere.
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const cjs = require("../dist");

test("keyPrefix counts a key under its segments before the first id", () => {
  assert.equal(cjs.keyPrefix("balance:user:0b7e4c1a-9d1f:token:t1"), "balance:user");
  assert.equal(cjs.keyPrefix("profile:user:42"), "profile:user");
  assert.equal(cjs.keyPrefix("journeys:all"), "journeys");
  assert.equal(cjs.keyPrefix("plain"), "plain");
  assert.equal(cjs.keyPrefix("42:x"), "42:x");
});

test("parseLsn orders positions like pg_lsn, and refuses what is not one", () => {
  assert.equal(cjs.parseLsn("0/0"), 0n);
  assert.equal(cjs.parseLsn("16/B374D848"), (0x16n << 32n) | 0xb374d848n);
  assert.ok(cjs.parseLsn("1/0") > cjs.parseLsn("0/FFFFFFFF"));
  assert.throws(() => cjs.parseLsn("12345"), /not a pg_lsn/);
  assert.throws(() => cjs.parseLsn("0/123456789"), /not a pg_lsn/);
});

test("a lease marker is never data", () => {
  assert.ok(cjs.isMarker(`${cjs.MARKER_PREFIX}abc`));
  assert.ok(!cjs.isMarker('{"bio":"x"}'));
  assert.ok(!cjs.isMarker(null));
  assert.ok(!cjs.isMarker(undefined));
});

test("the library registers every lease function", () => {
  const text = cjs.library();
  assert.ok(text.startsWith(`#!lua name=${cjs.LIBRARY}\n`));
  for (const [name] of cjs.FUNCTIONS) assert.ok(text.includes(`register_function('${name}'`), name);
  assert.deepEqual(
    cjs.FUNCTIONS.map(([name]) => name),
    [cjs.GET, cjs.FILL, cjs.RELEASE],
  );
});

test("writeToken returns the position the database reports, and says when there is none", async () => {
  const token = await cjs.writeToken({ query: async () => ({ rows: [{ lsn: "0/16B3748" }] }) });
  assert.equal(token, "0/16B3748");
  await assert.rejects(cjs.writeToken({ query: async () => ({ rows: [] }) }), /returned no value/);
});

test("import and require give the same API (one copy of the code)", async () => {
  const esm = await import("../dist/index.mjs");
  const names = Object.keys(cjs).filter((n) => n !== "__esModule");
  assert.deepEqual(Object.keys(esm).sort(), names.sort());
  for (const name of names) assert.equal(esm[name], cjs[name], name);
});

test("writeTokenFromSupabase calls the shipped function and says what to do when it is missing", async () => {
  const calls = [];
  const supabase = (answer) => ({
    rpc: async (fn) => {
      calls.push(fn);
      return answer;
    },
  });
  assert.equal(await cjs.writeTokenFromSupabase(supabase({ data: "0/1A2B", error: null })), "0/1A2B");
  assert.deepEqual(calls, ["pgci_write_token"]);
  await assert.rejects(
    cjs.writeTokenFromSupabase(
      supabase({ data: null, error: { message: "Could not find the function public.pgci_write_token without parameters in the schema cache" } }),
    ),
    /run sql\/client\/write_token\.sql once/,
  );
  await assert.rejects(
    cjs.writeTokenFromSupabase(supabase({ data: null, error: { message: "permission denied for function pgci_write_token" } })),
    /permission denied/,
  );
  await assert.rejects(cjs.writeTokenFromSupabase(supabase({ data: 42, error: null })), /not a pg_lsn/);
});

test("an event subscriber learns what it missed, as the daemon's contract says", () => {
  const seen = new cjs.EventSequence();
  assert.deepEqual(seen.observe("e1", 7), { kind: "first" });
  assert.deepEqual(seen.observe("e1", 8), { kind: "next" });
  assert.deepEqual(seen.observe("e1", 11), { kind: "gap", missed: 2 });
  assert.deepEqual(seen.observe("e1", 11), { kind: "rewound" });
  assert.deepEqual(seen.observe("e2", 12), { kind: "newEpoch" });
  assert.ok(cjs.mustDrop({ kind: "gap", missed: 1 }));
  assert.ok(!cjs.mustDrop({ kind: "next" }));
  seen.reset();
  assert.deepEqual(seen.observe("e2", 40), { kind: "first" });
  assert.equal(cjs.sequenceKey("cache-invalidation"), "pgci:events:{cache-invalidation}");
  assert.equal(cjs.sequenceKey("app{inv}"), "pgci:events:app{inv}");
});
