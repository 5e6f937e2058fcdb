// The cache handler for 'use cache': entries in Redis, served only while
// the daemon has not revalidated their tags. With the daemon rule
//   [[rules]]
//   table = "public.profiles"
//   tags = ["profile:{id}"]
// a page that calls cacheTag(`profile:${id}`) shows a change to that row on
// the next load, whoever made it (the app, a SQL function, a migration),
// and no app code calls revalidateTag.
const Redis = require("ioredis");
const { createNextCacheHandler } = require("@pg-cache-invalidator/client");

module.exports = createNextCacheHandler({
  redis: new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0"),
});
