import { Suspense } from "react";
import { cookies } from "next/headers";
import { cache } from "../../../lib/cache";
import { pool } from "../../../lib/db";

// The plan's balance page: cache-aside under balance:user:<id>, which the
// daemon deletes at every change of the user's balances. After the user's
// own transfer the cookie carries a write token: until the daemon has
// applied that write, the page reads the database instead of the cache.
async function Balance({ params }) {
  const { id } = await params;
  const after = (await cookies()).get("pgci-after")?.value;
  const { value, source } = await cache.getOrLoadWithSource(
    `balance:user:${id}`,
    300,
    async () => {
      const { rows } = await pool.query(
        "select token_id::text as token, balance::text as balance from public.user_tokens where user_id = $1::uuid order by token_id",
        [id],
      );
      return rows;
    },
    { after },
  );
  return (
    <section>
      <ul id="balances">
        {(value ?? []).map((row) => (
          <li key={row.token} data-token={row.token}>
            <span className="token">{row.token}</span>: <span className="balance">{row.balance}</span>
          </li>
        ))}
      </ul>
      <p>
        from <span id="source">{source}</span>
      </p>
    </section>
  );
}

export default function Page({ params }) {
  return (
    <Suspense fallback={<p>Loading…</p>}>
      <Balance params={params} />
    </Suspense>
  );
}
