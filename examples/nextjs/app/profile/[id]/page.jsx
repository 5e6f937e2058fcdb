import { Suspense } from "react";
import { cacheTag } from "next/cache";
import { pool } from "../../../lib/db";

// The cached part: tagged profile:<id>, which the daemon's rule
// `tags = ["profile:{id}"]` revalidates at every change of the row.
async function Profile({ id }) {
  "use cache";
  cacheTag(`profile:${id}`);
  const { rows } = await pool.query(
    "select username, coalesce(bio, '') as bio from public.profiles where id = $1::uuid",
    [id],
  );
  if (rows.length === 0) return <p id="missing">No such profile.</p>;
  return (
    <section>
      <h1 id="username">{rows[0].username}</h1>
      <p id="bio">{rows[0].bio}</p>
      <p>
        rendered at <time id="rendered">{new Date().toISOString()}</time>
      </p>
    </section>
  );
}

async function ProfileOf({ params }) {
  const { id } = await params;
  return <Profile id={id} />;
}

export default function Page({ params }) {
  return (
    <Suspense fallback={<p>Loading…</p>}>
      <ProfileOf params={params} />
    </Suspense>
  );
}
