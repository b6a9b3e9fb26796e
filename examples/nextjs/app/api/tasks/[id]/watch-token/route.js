// GET /api/tasks/{id}/watch-token: a short-lived taskcast subscribe token for one task, for
// the signed-in user who owns it. Next.js App Router route handler (Node.js runtime), no
// dependencies.
//
// Server-side environment (never NEXT_PUBLIC_*):
//   TASKCAST_URL               taskcast as this server reaches it, e.g. https://progress.example.com
//   TASKCAST_SUBSCRIBE_SECRET  the same 32+ character secret taskcast has
// The browser sends its Supabase access token (supabase.auth.getSession()) as
// `Authorization: Bearer <access_token>`, and gets back { task_id, token, expires_at } to
// open wss://progress.example.com/ws?task_id=<id>&token=<token>. The push key is not here:
// it belongs to the generator only.
import { createHmac } from "node:crypto";

export const runtime = "nodejs";
export const dynamic = "force-dynamic";

const TTL_SECONDS = 15 * 60;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const NO_STORE = { "cache-control": "no-store" };

function fail(status, error, message) {
  return Response.json({ error, message }, { status, headers: NO_STORE });
}

const base64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 JWT with the claims taskcast reads: task_id and exp. */
export function mintSubscribeToken(taskId, secret, ttlSeconds = TTL_SECONDS) {
  const exp = Math.floor(Date.now() / 1000) + ttlSeconds;
  const header = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = base64url(JSON.stringify({ task_id: taskId, exp }));
  const signature = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return { token: `${header}.${payload}.${signature}`, expires_at: exp };
}

/**
 * Whether the holder of this Supabase access token may watch the task. taskcast decides, as
 * it would for the browser itself: with SUPABASE_URL (or SUPABASE_JWT_SECRET) set there, it
 * verifies the session and checks image_tasks.user_id = sub. 200: yes; 401/403: no.
 * Replace this with your own check if your users are not Supabase users.
 */
async function userMayWatch(accessToken, taskId, taskcastUrl) {
  const response = await fetch(`${taskcastUrl}/api/tasks/${taskId}`, {
    headers: { authorization: `Bearer ${accessToken}` },
    signal: AbortSignal.timeout(5000),
  });
  await response.body?.cancel();
  if (response.status === 200) return true;
  if ([401, 403, 404].includes(response.status)) return false;
  throw new Error(`taskcast answered ${response.status}`);
}

export async function GET(request, { params }) {
  const { id } = await params;
  if (!UUID.test(id)) {
    return fail(400, "invalid_input", "the task id must be a UUID such as 0b6e1c2a-...");
  }
  const secret = process.env.TASKCAST_SUBSCRIBE_SECRET ?? "";
  const taskcastUrl = (process.env.TASKCAST_URL ?? "").replace(/\/+$/, "");
  if (secret.length < 32 || !taskcastUrl) {
    console.error("watch-token: set TASKCAST_URL and TASKCAST_SUBSCRIBE_SECRET (32+ characters)");
    return fail(500, "misconfigured", "the server cannot mint progress tokens right now");
  }
  const match = /^Bearer\s+(\S+)$/i.exec(request.headers.get("authorization") ?? "");
  if (!match) {
    return fail(401, "unauthorized", "send the Supabase access token as Authorization: Bearer <token>");
  }
  let allowed;
  try {
    allowed = await userMayWatch(match[1], id, taskcastUrl);
  } catch (error) {
    console.error("watch-token: asking taskcast failed:", error.message);
    return fail(503, "unavailable", "progress is unavailable right now; try again shortly");
  }
  if (!allowed) {
    return fail(403, "forbidden", "you may not watch this task");
  }
  return Response.json({ task_id: id, ...mintSubscribeToken(id, secret) }, { headers: NO_STORE });
}
