// The cache handler for Next.js' incremental cache (unstable_cache, the
// fetch cache, ISR): entries in Redis, served only while the daemon has
// not revalidated their tags (the same marks as cache-handler.js).
const Redis = require("ioredis");
const { createNextIncrementalCacheHandler } = require("@pg-cache-invalidator/client");

module.exports = createNextIncrementalCacheHandler({
  redis: new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0"),
});
