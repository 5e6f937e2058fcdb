import { Suspense } from "react";
import { connection } from "next/server";
import { unstable_cache } from "next/cache";
import { pool } from "../../../lib/db";

// The same profile through unstable_cache (apps from before 'use cache'):
// the incremental cache handler keeps it, tagged profile:<id>.
function profile(id) {
  return unstable_cache(
    async () => {
      const { rows } = await pool.query(
        "select username, coalesce(bio, '') as bio from public.profiles where id = $1::uuid",
        [id],
      );
      return rows[0] ? { ...rows[0], rendered: new Date().toISOString() } : null;
    },
    ["legacy-profile", id],
    { tags: [`profile:${id}`], revalidate: 3600 },
  )();
}

async function Legacy({ params }) {
  await connection();
  const { id } = await params;
  const row = await profile(id);
  if (!row) return <p id="missing">No such profile.</p>;
  return (
    <section>
      <h1 id="username">{row.username}</h1>
      <p id="bio">{row.bio}</p>
      <p>
        rendered at <time id="rendered">{row.rendered}</time>
      </p>
    </section>
  );
}

export default function Page({ params }) {
  return (
    <Suspense fallback={<p>Loading…</p>}>
      <Legacy params={params} />
    </Suspense>
  );
}
