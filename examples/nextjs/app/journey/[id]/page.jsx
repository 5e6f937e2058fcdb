import { Suspense } from "react";
import { cache } from "../../../lib/cache";
import { pool } from "../../../lib/db";

// The plan's journey progress page: cache-aside under journey:user:<id>,
// deleted by the daemon at every change of the user's journeys (also by
// the batch jobs that bypass the app).
async function Journey({ params }) {
  const { id } = await params;
  const rows = await cache.getOrLoad(`journey:user:${id}`, 300, async () => {
    const { rows } = await pool.query(
      "select pillar_id::text as pillar, progress, status from public.user_journeys where user_id = $1::uuid order by pillar_id",
      [id],
    );
    return rows;
  });
  return (
    <ul id="journeys">
      {(rows ?? []).map((row) => (
        <li key={row.pillar}>
          {row.pillar}: {row.progress} % ({row.status})
        </li>
      ))}
    </ul>
  );
}

export default function Page({ params }) {
  return (
    <Suspense fallback={<p>Loading…</p>}>
      <Journey params={params} />
    </Suspense>
  );
}
