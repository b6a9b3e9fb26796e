// watchUser against a real taskcast on Postgres: a user's feed, its snapshot, new tasks,
// every change, another user's tasks never, reconnects with the snapshot as the truth,
// and a refusal.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { after, afterEach, before, describe, test } from "node:test";
import { promisify } from "node:util";

import { settings, watchUser } from "@taskcast/client";

import { Taskcast, until } from "./taskcast.mjs";

if (typeof WebSocket !== "function") throw new Error("run with node --experimental-websocket (Node 20)");

Object.assign(settings, { minDelayMs: 50, maxDelayMs: 400, lingerMs: 100 });

const run = promisify(execFile);
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

/** A feed token from `taskcast token --user`. */
async function userToken(userId) {
  const { stdout } = await run(server.binary, ["token", "--user", userId], { env: server.env() });
  return stdout.trim();
}

function createFor(userId) {
  return server.request("POST", "/api/tasks", { user_id: userId });
}

/** watchUser, recording everything it reports. */
function watchFeed(userId, options = {}) {
  const seen = { states: [], snapshots: [], errors: [], connections: [] };
  const handle = watchUser(userId, {
    url: server.base,
    onTask: (state) => seen.states.push(state),
    onSnapshot: (states) => seen.snapshots.push(states),
    onError: (error) => seen.errors.push(error),
    onConnection: (info) => seen.connections.push(info),
    ...options,
  });
  handles.push(handle);
  seen.handle = handle;
  seen.has = (taskId, version, what = `version ${version} of ${taskId}`) =>
    until(what, () => seen.states.some((s) => s.task_id === taskId && s.version === version));
  return seen;
}

/** Checks that, outside snapshots, each task's versions only grow. */
function assertGrowingPerTask(states) {
  const last = new Map();
  for (const s of states) {
    if (!s.snapshot && last.has(s.task_id)) {
      assert.ok(s.version > last.get(s.task_id), `task ${s.task_id} went from ${last.get(s.task_id)} to ${s.version}`);
    }
    last.set(s.task_id, s.version);
  }
}

describe("watchUser", () => {
  test("delivers the snapshot, then new tasks and every change, and never another user's tasks", async () => {
    const [alice, bob] = [randomUUID(), randomUUID()];
    const first = await createFor(alice);
    const bobs = await createFor(bob);
    const seen = watchFeed(alice, { token: await userToken(alice) });
    await until("the snapshot", () => seen.snapshots.length === 1);
    assert.deepEqual(seen.snapshots[0].map((s) => [s.task_id, s.snapshot, s.feed]), [[first.task_id, true, `user:${alice}`]]);

    const second = await createFor(alice);
    await seen.has(second.task_id, 0, "the task created after subscribing");
    await server.push(bobs.task_id, { progress: 50 });
    await server.push(first.task_id, { progress: 40, status: "processing" });
    await server.push(second.task_id, { status: "completed", image_url: "https://cdn.example.com/b.png" });
    await seen.has(second.task_id, 1);
    // A finished task does not end the feed.
    await server.push(first.task_id, { progress: 80 });
    await seen.has(first.task_id, 2);

    assert.ok(seen.states.every((s) => s.task_id !== bobs.task_id), "another user's task appeared");
    assertGrowingPerTask(seen.states);
    assert.equal(seen.handle.tasks.get(second.task_id).status, "completed");
    assert.equal(seen.handle.tasks.get(first.task_id).progress, 80);
    assert.deepEqual(seen.errors, []);
  });

  test("after a server restart the feed's snapshot is the truth for each task", async () => {
    const alice = randomUUID();
    const task = await createFor(alice);
    const seen = watchFeed(alice, { token: await userToken(alice) });
    await until("the snapshot", () => seen.snapshots.length === 1);
    await server.push(task.task_id, { progress: 10, status: "processing" });
    await seen.has(task.task_id, 1);
    await server.stop();
    // Changed while taskcast is down, in plain SQL: the trigger bumps the version to 2.
    await server.sql(`UPDATE image_tasks SET progress = 77 WHERE id = '${task.task_id}'`);
    await server.start();
    await until("the snapshot after the reconnect", () => seen.snapshots.length === 2);
    const latest = seen.handle.tasks.get(task.task_id);
    assert.deepEqual([latest.version, latest.progress, latest.snapshot], [2, 77, true]);
    await server.push(task.task_id, { progress: 90 });
    await seen.has(task.task_id, 3);
    assertGrowingPerTask(seen.states);
  });

  test("a token for another user's feed is refused with a fatal forbidden error", async () => {
    const [alice, bob] = [randomUUID(), randomUUID()];
    const seen = watchFeed(alice, { token: await userToken(bob) });
    await until("the refusal", () => seen.errors.length === 1);
    assert.equal(seen.errors[0].code, "forbidden");
    assert.equal(seen.errors[0].fatal, true);
    assert.equal(seen.errors[0].taskId, `user:${alice}`);
    assert.throws(() => watchUser("not-a-uuid", { url: server.base }), TypeError);
  });
});
