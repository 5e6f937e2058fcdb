import { Pool } from "pg";

// One pool per server process (Next.js may evaluate this module more than once).
export const pool = (globalThis.pgciExamplePool ??= new Pool({
  connectionString: process.env.DATABASE_URL,
  max: 5,
}));
