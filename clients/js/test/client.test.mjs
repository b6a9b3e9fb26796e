// watchTask against a real taskcast on Postgres, in Node (its WebSocket is the same WHATWG
// API browsers have): reconnects, the snapshot as the truth, token refresh, and that
// GET /client.js is this very file.

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { after, afterEach, before, describe, test } from "node:test";

import { settings, TaskcastError, watchTask } from "@taskcast/client";

import { PACKAGE, Taskcast, until } from "./taskcast.mjs";

if (typeof WebSocket !== "function") throw new Error("run with node --experimental-websocket (Node 20)");

// Fast retries, so a restart is noticed within a second.
Object.assign(settings, { minDelayMs: 50, maxDelayMs: 400, lingerMs: 100 });

let server;
before(async () => {
  server = await Taskcast.launch();
});
after(async () => {
  await server?.close();
});

// Every watch a test started ends with it, even when the test fails half-way.
const handles = [];
afterEach(() => {
  for (const handle of handles.splice(0)) handle.close();
});

/** watchTask, recording everything it reports. */
function watch(taskId, options = {}) {
  const seen = { states: [], errors: [], connections: [] };
  const handle = watchTask(taskId, {
    url: server.base,
    onState: (state) => seen.states.push(state),
    onError: (error) => seen.errors.push(error),
    onConnection: (info) => seen.connections.push(info),
    ...options,
  });
  handles.push(handle);
  seen.handle = handle;
  seen.version = (v) => until(`version ${v} of ${taskId}`, () => seen.states.some((s) => s.version === v));
  return seen;
}

describe("watchTask", () => {
  test("delivers the snapshot, then every push in order, and ends by itself at a final status", async () => {
    const task = await server.createTask();
    const seen = watch(task.task_id, { token: task.token });
    await seen.version(0);
    await server.push(task.task_id, { progress: 30, stage: "generating", status: "processing" });
    await server.push(task.task_id, { progress: 100, status: "completed", image_url: "https://cdn.example.com/a.png" });
    await seen.version(2);
    assert.deepEqual(
      seen.states.map((s) => [s.version, s.snapshot, s.status, s.progress]),
      [
        [0, true, "pending", null],
        [1, false, "processing", 30],
        [2, false, "completed", 100],
      ],
    );
    assert.equal(seen.handle.state.image_url, "https://cdn.example.com/a.png");
    assert.deepEqual(seen.connections[0], { connected: true, transport: "websocket" });
    // The watch has ended: a later subscriber sees the task, this one hears nothing more.
    const later = watch(task.task_id, { token: task.token });
    await later.version(2);
    assert.equal(seen.states.length, 3);
    assert.deepEqual(seen.errors, []);
  });

  test("a new place in line (same version, derived) reaches onState and the handle's state", async () => {
    const ahead = await server.createTask();
    const task = await server.createTask();
    const seen = watch(task.task_id, { token: task.token });
    await seen.version(0);
    const first = seen.states[0];
    assert.ok(first.queue_position >= 2, `a snapshot behind a pending task: ${JSON.stringify(first)}`);
    // The task ahead starts: this one moves up one place without a new version.
    await server.push(ahead.task_id, { status: "processing" });
    const moved = await until("the new place", () =>
      seen.states.find((s) => s.queue_position === first.queue_position - 1),
    );
    assert.equal(moved.version, 0);
    assert.equal(moved.derived, true);
    assert.equal(seen.handle.state.queue_position, first.queue_position - 1);
  });

  test("reconnects by itself after a server restart and delivers the pushes made after it", async () => {
    const task = await server.createTask();
    const seen = watch(task.task_id, { token: task.token });
    await seen.version(0);
    await server.push(task.task_id, { progress: 10, status: "processing" });
    await seen.version(1);
    await server.stop();
    await until("the client to notice the server went away", () => seen.connections.some((c) => !c.connected));
    await server.start();
    await until("the client to reconnect", () => seen.connections.at(-1).connected);
    // The resubscription's snapshot, then a push made after the restart.
    await until("the snapshot after the reconnect", () => seen.states.filter((s) => s.snapshot).length === 2);
    await server.push(task.task_id, { progress: 100, status: "completed" });
    await seen.version(2);
    assert.deepEqual(
      seen.states.map((s) => [s.version, s.snapshot]),
      [
        [0, true],
        [1, false],
        [1, true],
        [2, false],
      ],
    );
    assert.deepEqual(seen.errors, [], "a restart is not an error");
  });

  test("after a reconnect the snapshot is the truth, even at an older version", async () => {
    const task = await server.createTask();
    const seen = watch(task.task_id, { token: task.token });
    // Subscribed before the pushes, so the first snapshot is version 0 however busy the machine.
    await seen.version(0);
    for (const progress of [20, 40, 60]) await server.push(task.task_id, { progress, status: "processing" });
    await seen.version(3);
    // As after a database restore: the row is back at an older version while taskcast is down.
    await server.stop();
    await server.sql(`UPDATE image_tasks SET progress = 20, taskcast_version = 1 WHERE id = '${task.task_id}'`);
    await server.start();
    await until("the restored snapshot", () => seen.states.at(-1).snapshot && seen.states.at(-1).version === 1);
    assert.equal(seen.handle.state.progress, 20);
    // Later versions count from the snapshot, not from the highest version seen before.
    await server.push(task.task_id, { progress: 30 });
    const shown = () => JSON.stringify(seen.states.map((s) => [s.version, s.progress, s.snapshot]));
    await until("the push after the restore", () => seen.states.some((s) => s.version === 2 && s.progress === 30)).catch((e) => {
      throw new Error(`${e.message}; states seen: ${shown()}; connections: ${JSON.stringify(seen.connections)}`);
    });
    assert.deepEqual(
      seen.states.map((s) => [s.version, s.progress]),
      [
        [0, null],
        [1, 20],
        [2, 40],
        [3, 60],
        [1, 20],
        [2, 30],
      ],
      shown(),
    );
  });

  test("tasks watched against one server share one WebSocket", async () => {
    const tasks = await Promise.all([1, 2, 3].map(() => server.createTask()));
    const opened = [];
    const Native = globalThis.WebSocket;
    globalThis.WebSocket = class extends Native {
      constructor(...args) {
        super(...args);
        opened.push(args[0]);
      }
    };
    try {
      // Wait out the linger of sockets left by earlier tests.
      await new Promise((resolve) => setTimeout(resolve, settings.lingerMs * 3));
      const watches = tasks.map((t) => watch(t.task_id, { token: t.token }));
      await Promise.all(watches.map((w) => w.version(0)));
      assert.equal(opened.length, 1, `opened ${JSON.stringify(opened)}`);
    } finally {
      globalThis.WebSocket = Native;
    }
  });
});

describe("token refresh", () => {
  test("an expired token is replaced through getToken (cause token_expired) and the watch goes on", async () => {
    const task = await server.createTask();
    const causes = [];
    const seen = watch(task.task_id, {
      token: await server.token(task.task_id, "1s"),
      getToken: async (taskId, cause) => {
        causes.push([taskId, cause?.code]);
        return task.token;
      },
    });
    await seen.version(0);
    await until("getToken after the expiry", () => causes.length === 1, 10_000);
    assert.deepEqual(causes, [[task.task_id, "token_expired"]]);
    await until("the snapshot under the fresh token", () => seen.states.filter((s) => s.snapshot).length === 2);
    await server.push(task.task_id, { progress: 50, status: "processing" });
    await seen.version(1);
    assert.deepEqual(seen.errors, [], "a refreshed token is not an error");
  });

  test("without a token getToken is asked first; an invalid token is replaced the same way", async () => {
    const first = await server.createTask();
    const second = await server.createTask();
    const asked = [];
    const getToken = (taskId, cause) => {
      asked.push([taskId, cause?.code ?? null]);
      return taskId === first.task_id ? first.token : Promise.resolve(second.token);
    };
    const none = watch(first.task_id, { getToken });
    const invalid = watch(second.task_id, { token: "not-a-token", getToken });
    await Promise.all([none.version(0), invalid.version(0)]);
    assert.deepEqual(asked, [
      [first.task_id, null],
      [second.task_id, "token_invalid"],
    ]);
    assert.deepEqual([...none.errors, ...invalid.errors], []);
  });

  test("a getToken that fails is reported as token_refresh_failed and retried", async () => {
    const task = await server.createTask();
    let calls = 0;
    const seen = watch(task.task_id, {
      getToken: async () => {
        calls += 1;
        if (calls === 1) throw new Error("the app's token route is down");
        return task.token;
      },
    });
    await seen.version(0);
    assert.equal(calls, 2);
    assert.equal(seen.errors.length, 1);
    const [error] = seen.errors;
    assert.ok(error instanceof TaskcastError);
    assert.equal(error.code, "token_refresh_failed");
    assert.equal(error.fatal, false);
    assert.match(error.message, /the app's token route is down/);
  });

  test("tokens that keep failing end the watch with a fatal error after maxTokenRefreshes", async () => {
    const task = await server.createTask();
    let calls = 0;
    const seen = watch(task.task_id, {
      token: "not-a-token",
      getToken: () => {
        calls += 1;
        return `still-not-a-token-${calls}`;
      },
    });
    await until("the fatal error", () => seen.errors.some((e) => e.fatal));
    assert.equal(calls, settings.maxTokenRefreshes);
    assert.deepEqual(
      seen.errors.map((e) => [e.code, e.fatal, e.taskId]),
      [["token_invalid", true, task.task_id]],
    );
    assert.deepEqual(seen.states, []);
  });

  test("a task that does not exist ends the watch with a fatal not_found", async () => {
    const missing = "00000000-0000-4000-8000-000000000000";
    const seen = watch(missing, { token: await server.token(missing) });
    await until("the error", () => seen.errors.length > 0);
    assert.deepEqual(
      seen.errors.map((e) => [e.code, e.fatal]),
      [["not_found", true]],
    );
  });
});

test("GET /client.js serves this package's src/index.js byte for byte", async () => {
  const response = await fetch(`${server.base}/client.js`);
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type"), /^text\/javascript/);
  const source = await readFile(path.join(PACKAGE, "src", "index.js"), "utf8");
  assert.equal(await response.text(), source);
});
