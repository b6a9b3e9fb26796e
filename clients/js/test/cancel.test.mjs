// Cancel from the page (watchTask's handle.cancel(), over the WebSocket or HTTP) and the
// Node reporter seeing it in its push answers, against a real taskcast on Postgres.

import assert from "node:assert/strict";
import { after, afterEach, before, test } from "node:test";

import { settings, TaskcastError, watchTask } from "@taskcast/client";
import { Reporter, ReporterError } from "@taskcast/client/reporter";

import { Taskcast, sleep, until } from "./taskcast.mjs";

if (typeof WebSocket !== "function") throw new Error("run with node --experimental-websocket (Node 20)");

Object.assign(settings, { minDelayMs: 50, maxDelayMs: 400, lingerMs: 100 });

let server;
before(async () => {
  server = await Taskcast.launch();
});
after(async () => {
  await server?.close();
});

const handles = [];
afterEach(() => {
  for (const handle of handles.splice(0)) handle.close();
});

function watch(taskId, options = {}) {
  const seen = { states: [], errors: [], connected: false };
  const handle = watchTask(taskId, {
    url: server.base,
    onState: (state) => seen.states.push(state),
    onError: (error) => seen.errors.push(error),
    onConnection: (info) => (seen.connected = info.connected),
    ...options,
  });
  handles.push(handle);
  return { handle, seen };
}

/** A task created with a token that may cancel it. */
const cancellable = () => server.request("POST", "/api/tasks", { cancel: true });

test("handle.cancel() over the WebSocket records the request once and every watcher sees it", async () => {
  const { task_id, token } = await cancellable();
  const { handle, seen } = watch(task_id, { token });
  await until("the snapshot", () => seen.states.length > 0);
  await until("the socket", () => seen.connected);
  const first = await handle.cancel();
  assert.equal(first.task_id, task_id);
  assert.equal(first.applied, true);
  assert.equal(typeof first.cancel_requested_at, "string");
  const state = await until("cancel_requested in a state", () => seen.states.find((s) => s.cancel_requested));
  assert.equal(state.version, first.version);
  const again = await handle.cancel();
  assert.deepEqual([again.applied, again.version], [false, first.version]);
  assert.deepEqual(seen.errors, []);
});

test("handle.cancel() before the socket is open goes over HTTP", async () => {
  const { task_id, token } = await cancellable();
  const { handle, seen } = watch(task_id, { token });
  // Called in the same turn as watchTask: no socket is open yet.
  const result = await handle.cancel();
  assert.equal(result.applied, true);
  await until("cancel_requested in a state", () => seen.states.some((s) => s.cancel_requested));
});

test("a watch-only token is refused with forbidden and the watch goes on", async () => {
  const { task_id, token } = await server.createTask();
  const { handle, seen } = watch(task_id, { token });
  await until("the socket", () => seen.connected && seen.states.length > 0);
  await assert.rejects(handle.cancel(), (e) => e instanceof TaskcastError && e.code === "forbidden");
  // Over HTTP too, with the same code.
  const { handle: early } = watch((await server.createTask()).task_id, { token: "not-a-token" });
  await assert.rejects(early.cancel(), (e) => e instanceof TaskcastError && e.code === "token_invalid");
  await server.push(task_id, { progress: 30 });
  await until("the next state", () => seen.states.some((s) => s.progress === 30));
  assert.deepEqual(seen.errors, [], "a refused cancel does not end the subscription");
});

test("a finished task answers task_finished", async () => {
  const { task_id, token } = await cancellable();
  await server.push(task_id, { status: "completed" });
  const { handle } = watch(task_id, { token });
  await assert.rejects(handle.cancel(), (e) => e.code === "task_finished" && /cannot be cancelled/.test(e.message));
});

test("taskcast token --cancel mints the cancel right", async () => {
  const { task_id } = await server.createTask();
  const token = await server.token(task_id, "1h", ["--cancel"]);
  const { handle } = watch(task_id, { token });
  assert.equal((await handle.cancel()).applied, true);
});

test("the Node reporter sees cancel_requested in the answer to its next push", async () => {
  const { task_id, token } = await cancellable();
  const reporter = new Reporter(server.base, server.pushKey);
  const before = await reporter.push(task_id, { status: "processing", progress: 10 });
  assert.equal(before.applied, true);
  assert.equal(reporter.isCancelRequested(task_id), false);
  const { handle } = watch(task_id, { token });
  await handle.cancel();
  const answer = await reporter.push(task_id, { progress: 20 });
  assert.equal(answer.cancel_requested, true);
  assert.equal(reporter.isCancelRequested(task_id), true);
  const done = await reporter.push(task_id, { status: "cancelled" });
  assert.equal(done.status, "cancelled");
  assert.equal(reporter.isCancelRequested(task_id), false, "forgotten once final");
  await assert.rejects(
    reporter.push(task_id, { progress: 30 }),
    (e) => e instanceof ReporterError && e.status === 409 && e.code === "task_finished",
  );
});

test("the Node reporter retries a push while the server is down, once", async () => {
  const { task_id } = await server.createTask();
  const reporter = new Reporter(server.base, server.pushKey, { attempts: 40, backoffMs: 50, backoffMaxMs: 200 });
  await server.stop();
  const pushed = reporter.push(task_id, { progress: 42 });
  await sleep(300);
  await server.start();
  const answer = await pushed;
  assert.equal(answer.progress, 42);
  assert.equal(answer.version, 1, "applied once");
  const wrongKey = new Reporter(server.base, "wrong-key-0123456789abcdef0123456789");
  await assert.rejects(wrongKey.push(task_id, { progress: 1 }), (e) => e.status === 401);
});
