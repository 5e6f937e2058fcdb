import Redis from "ioredis";
import { createCache } from "@pg-cache-invalidator/client";

// One client per server process: cache-aside reads with leases (a fill
// that raced the daemon's delete is refused) and write tokens.
export const cache = (globalThis.pgciExampleCache ??= createCache({
  redis: new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379/0"),
}));
