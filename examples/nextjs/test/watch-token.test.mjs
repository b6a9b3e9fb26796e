// Calls the route handler as Next.js would (a real Request, params as a Promise) against a
// live taskcast, then subscribes with the token it returned. Run by `cargo test nextjs`
// (tests/api/nextjs.rs), which starts taskcast and signs the Supabase sessions:
//   TASKCAST_URL=... TASKCAST_SUBSCRIBE_SECRET=... node test/watch-token.test.mjs <task> <owner-token> <other-token>
import assert from "node:assert/strict";
import { GET } from "../app/api/tasks/[id]/watch-token/route.js";

const [task, owner, other] = process.argv.slice(2);
const taskcast = process.env.TASKCAST_URL;

function call(id, accessToken) {
  const headers = accessToken ? { authorization: `Bearer ${accessToken}` } : {};
  const request = new Request(`http://app.test/api/tasks/${id}/watch-token`, { headers });
  return GET(request, { params: Promise.resolve({ id }) });
}

const granted = await call(task, owner);
const body = await granted.json();
assert.equal(granted.status, 200, JSON.stringify(body));
assert.equal(body.task_id, task);
assert.equal(granted.headers.get("cache-control"), "no-store");

// The token subscribes: the SSE stream's first event is the task's state.
const stream = await fetch(`${taskcast}/api/tasks/${task}/events?token=${body.token}`, {
  signal: AbortSignal.timeout(5000),
});
assert.equal(stream.status, 200);
const reader = stream.body.getReader();
let text = "";
while (!text.includes("\n\n")) {
  const { value, done } = await reader.read();
  assert.ok(!done, "the stream ended before its first event");
  text += new TextDecoder().decode(value);
}
await reader.cancel();
const first = JSON.parse(text.split("\n").find((l) => l.startsWith("data:")).slice(5));
assert.equal(first.task_id, task);

// Someone else's session, no session, and a malformed id are refused with what to do.
const statuses = [
  (await call(task, other)).status,
  (await call(task, undefined)).status,
  (await call("not-a-uuid", owner)).status,
];
assert.deepEqual(statuses, [403, 401, 400]);
console.log(JSON.stringify({ granted: granted.status, first_event: first.type, refused: statuses }));
