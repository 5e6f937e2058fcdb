// 'use cache' entries live in Redis through the client's handler, which
// pg-cache-invalidator's tag rules keep true (see cache-handler.js).
/** @type {import('next').NextConfig} */
module.exports = {
  cacheComponents: true,
  partialPrefetching: true,
  cacheHandlers: {
    default: require.resolve("./cache-handler.js"),
  },
  // unstable_cache and the fetch cache (app/legacy): the incremental cache.
  cacheHandler: require.resolve("./incremental-cache-handler.js"),
  cacheMaxMemorySize: 0,
  // The client package is linked from the repository (file:../../…).
  outputFileTracingRoot: require("node:path").join(__dirname, "../.."),
};
