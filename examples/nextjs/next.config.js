// 'use cache' entries live in Redis through the client's handler, which
// pg-cache-invalidator's tag rules keep true (see cache-handler.js).
/** @type {import('next').NextConfig} */
module.exports = {
  cacheComponents: true,
  partialPrefetching: true,
  cacheHandlers: {
    default: require.resolve("./cache-handler.js"),
  },
  // The client package is linked from the repository (file:../../…).
  outputFileTracingRoot: require("node:path").join(__dirname, "../.."),
};
