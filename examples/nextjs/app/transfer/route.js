import { cookies } from "next/headers";
import { writeToken } from "@pg-cache-invalidator/client";
import { pool } from "../../lib/db";

// A transfer, then back to the sender's balance page. (A link, so the
// browser test can follow it; a real app posts a form or a server action,
// and the token handling is the same.) The write token is taken after the
// commit and carried in a cookie to the user's next reads.
export async function GET(request) {
  const url = new URL(request.url);
  const [from, to, token, amount] = ["from", "to", "token", "amount"].map((name) => url.searchParams.get(name));
  await pool.query("select public.transfer_tokens($1::uuid, $2::uuid, $3::uuid, $4::numeric)", [from, to, token, amount]);
  const after = await writeToken(pool);
  (await cookies()).set("pgci-after", after, { maxAge: 60, httpOnly: true, sameSite: "lax", path: "/" });
  return Response.redirect(new URL(`/balance/${from}`, request.url), 303);
}
