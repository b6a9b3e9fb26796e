// The Node reporter (@taskcast/client/reporter) against a real taskcast on Postgres, through
// a counting proxy: several tasks' updates in one POST /api/progress, each item answered,
// refused, retried and read on its own, in both flavours (report() and push()).

import assert from "node:assert/strict";
import { after, afterEach, before, beforeEach, test } from "node:test";

import { Reporter, ReporterError } from "@taskcast/client/reporter";

import { countingProxy } from "./proxy.mjs";
import { Taskcast } from "./taskcast.mjs";

const BATCH = "/api/progress";
const SINGLE = "/api/tasks/{id}/progress";

let server;
let proxy;
before(async () => {
  server = await Taskcast.launch();
});
after(async () => {
  await server?.close();
});
beforeEach(async () => {
  proxy = await countingProxy(server.base);
});
afterEach(async () => {
  await proxy.close();
});

const tasks = (n) => Promise.all(Array.from({ length: n }, () => server.createTask().then((t) => t.task_id)));
const state = (id) => server.request("GET", `/api/tasks/${id}`);
const cancellable = () => server.request("POST", "/api/tasks", { cancel: true });

test("50 tasks reported at once are delivered in one request", async () => {
  const ids = await tasks(50);
  const reporter = new Reporter(proxy.url, server.pushKey);
  ids.forEach((id, i) => reporter.report(id, { status: "processing", progress: i + 1 }));
  assert.equal(await reporter.flush(10_000), true, JSON.stringify(reporter.stats));
  assert.deepEqual(Object.fromEntries(proxy.requests), { [BATCH]: 1 });
  assert.deepEqual([reporter.stats.sent, reporter.stats.batches, reporter.stats.failed], [50, 1, 0]);
  const progress = await Promise.all(ids.map((id) => state(id).then((s) => s.progress)));
  assert.deepEqual(progress, ids.map((_, i) => i + 1));
});

test("50 pushes awaited together go in one request and each resolves to its own state", async () => {
  const ids = await tasks(50);
  const reporter = new Reporter(proxy.url, server.pushKey);
  const states = await Promise.all(ids.map((id) => reporter.push(id, { progress: 25 })));
  assert.deepEqual(Object.fromEntries(proxy.requests), { [BATCH]: 1 });
  assert.deepEqual(states.map((s) => [s.task_id, s.progress, s.applied]), ids.map((id) => [id, 25, true]));
});

test("a lone update goes out at once on the task's own route", async () => {
  const [id] = await tasks(1);
  const reporter = new Reporter(proxy.url, server.pushKey);
  const answer = await reporter.push(id, { progress: 5 });
  assert.equal(answer.progress, 5);
  assert.deepEqual(Object.fromEntries(proxy.requests), { [SINGLE]: 1 });
});

test("maxBatchBytes splits the waiting updates into smaller requests", async () => {
  const ids = await tasks(10);
  const reporter = new Reporter(proxy.url, server.pushKey, { maxBatchBytes: 300 });
  ids.forEach((id) => reporter.report(id, { progress: 40 }));
  assert.equal(await reporter.flush(10_000), true);
  assert.equal(reporter.stats.sent, 10);
  assert.ok(proxy.total() >= 4, JSON.stringify(Object.fromEntries(proxy.requests)));
  assert.ok(proxy.largest.get(BATCH) <= 300, `largest batch body: ${proxy.largest.get(BATCH)} bytes`);
});

test("an update to a finished task fails alone and the rest of its request is delivered", async () => {
  const ids = await tasks(4);
  const done = ids[2];
  await server.push(done, { status: "completed" });
  const reporter = new Reporter(proxy.url, server.pushKey);
  ids.forEach((id) => reporter.report(id, { progress: 30 }));
  assert.equal(await reporter.flush(10_000), false, "the refused update is a loss");
  assert.deepEqual(Object.fromEntries(proxy.requests), { [BATCH]: 1 });
  const { sent, failed, retried } = reporter.stats;
  assert.deepEqual({ sent, failed, retried }, { sent: 3, failed: 1, retried: 0 });
  assert.match(reporter.finished(done), /completed/);
  assert.deepEqual(ids.filter((id) => id !== done).map((id) => reporter.finished(id)), [null, null, null]);
  const progress = await Promise.all(ids.map((id) => state(id).then((s) => s.progress)));
  assert.deepEqual(progress, [30, 30, null, 30]);

  // Awaited: the refused push rejects with the item's status and code, the others resolve.
  const pushed = await Promise.allSettled(ids.map((id) => reporter.push(id, { progress: 35 })));
  assert.equal(proxy.count(BATCH), 2);
  assert.deepEqual(pushed.map((p) => p.status), ["fulfilled", "fulfilled", "rejected", "fulfilled"]);
  const refused = pushed[2].reason;
  assert.ok(refused instanceof ReporterError);
  assert.deepEqual([refused.status, refused.code, refused.taskId], [409, "task_finished", done]);
});

test("a batch request answered 503 as a whole is retried once and delivered", async () => {
  const ids = await tasks(5);
  proxy.refuseNext(BATCH, 1);
  const reporter = new Reporter(proxy.url, server.pushKey, { backoffMs: 10 });
  ids.forEach((id) => reporter.report(id, { status: "processing", progress: 60 }));
  assert.equal(await reporter.flush(10_000), true, JSON.stringify(reporter.stats));
  assert.deepEqual(Object.fromEntries(proxy.requests), { [BATCH]: 2 }, "the five retried together");
  const { sent, retried, failed } = reporter.stats;
  assert.deepEqual({ sent, retried, failed }, { sent: 5, retried: 5, failed: 0 });
  const versions = await Promise.all(ids.map((id) => state(id).then((s) => s.version)));
  assert.deepEqual(versions, [1, 1, 1, 1, 1], "each applied once");
});

test("cancel_requested is read per task from one batch answer", async () => {
  const asked = await cancellable();
  const other = await cancellable();
  const [plain] = await tasks(1);
  const cancel = await fetch(`${server.base}/api/tasks/${asked.task_id}/cancel`, {
    method: "POST",
    headers: { authorization: `Bearer ${asked.token}` },
  });
  assert.equal(cancel.status, 200);
  const reporter = new Reporter(proxy.url, server.pushKey);
  const order = [other.task_id, asked.task_id, plain];
  const states = await Promise.all(order.map((id) => reporter.push(id, { status: "processing", progress: 10 })));
  assert.deepEqual(Object.fromEntries(proxy.requests), { [BATCH]: 1 });
  assert.deepEqual(states.map((s) => s.cancel_requested === true), [false, true, false]);
  assert.deepEqual(order.map((id) => reporter.isCancelRequested(id)), [false, true, false]);
});

test("never two requests in flight, however many updates and tasks wait", async () => {
  const ids = await tasks(5);
  const reporter = new Reporter(proxy.url, server.pushKey);
  for (let step = 1; step <= 40; step++) {
    ids.forEach((id) => reporter.report(id, { progress: step }));
    await new Promise(setImmediate); // a turn of the event loop between steps
  }
  assert.equal(await reporter.flush(10_000), true);
  assert.equal(proxy.maxInFlight, 1);
  const progress = await Promise.all(ids.map((id) => state(id).then((s) => s.progress)));
  assert.deepEqual(progress, [40, 40, 40, 40, 40], "the latest update of each task wins");
  assert.ok(proxy.total() < 40, `merged while one was in flight: ${proxy.total()} requests`);
});

// A server whose batch limits are below the reporter's: a batch it refuses whole for its
// size is sent again in smaller requests, and every update arrives.
const finalUrl = (i) => `https://cdn.example.com/images/${String(i).padStart(2, "0")}/final-result.png`;

/** `n` tasks on another real taskcast started with `settings`, a counting proxy to it, and a cleanup. */
async function limitedServer(settings, n) {
  const small = await Taskcast.launch({ settings });
  const smallProxy = await countingProxy(small.base);
  const ids = await Promise.all(Array.from({ length: n }, () => small.createTask().then((t) => t.task_id)));
  const close = async () => {
    await smallProxy.close();
    await small.close();
  };
  return { small, smallProxy, ids, close };
}

test("10 tasks reported at once to a server taking 2 updates per batch are all delivered", async () => {
  const { small, smallProxy, ids, close } = await limitedServer({ TASKCAST_MAX_BATCH_ITEMS: "2" }, 10);
  try {
    const reporter = new Reporter(smallProxy.url, small.pushKey, { backoffMs: 10 }); // maxBatch 100
    ids.forEach((id) => reporter.report(id, { status: "processing", progress: 50 }));
    assert.equal(await reporter.flush(10_000), true, JSON.stringify(reporter.stats));
    const { sent, failed, retried } = reporter.stats;
    assert.deepEqual({ sent, failed, retried }, { sent: 10, failed: 0, retried: 0 });
    assert.equal(smallProxy.count(BATCH), 6, "the ten (refused whole, 400), then five of two");
    const progress = await Promise.all(ids.map((id) => small.request("GET", `/api/tasks/${id}`).then((s) => s.progress)));
    assert.deepEqual(progress, Array(10).fill(50));

    // Awaited final updates: the lowered cap holds, no request is refused again.
    const states = await Promise.all(
      ids.map((id, i) => reporter.push(id, { status: "completed", progress: 100, image_url: finalUrl(i) })),
    );
    assert.deepEqual(states.map((s) => [s.status, s.image_url]), ids.map((_, i) => ["completed", finalUrl(i)]));
    assert.equal(smallProxy.count(BATCH), 11, "five of two");
    assert.deepEqual([reporter.stats.sent, reporter.stats.failed], [20, 0]);
  } finally {
    await close();
  }
});

test("10 final updates to a server with a smaller batch body limit are all delivered", async () => {
  // 1,500 bytes, far below the reporter's 256 KiB; the ten updates take about 2,000.
  const { small, smallProxy, ids, close } = await limitedServer({ TASKCAST_MAX_BATCH_BODY_BYTES: "1500" }, 10);
  try {
    const reporter = new Reporter(smallProxy.url, small.pushKey, { backoffMs: 10 });
    // Non-ASCII stages: the byte budget counts UTF-8 bytes, not UTF-16 units.
    ids.forEach((id, i) => reporter.report(id, { status: "completed", progress: 100, stage: "完了", image_url: finalUrl(i) }));
    assert.equal(await reporter.flush(10_000), true, JSON.stringify(reporter.stats));
    const { sent, failed, retried } = reporter.stats;
    assert.deepEqual({ sent, failed, retried }, { sent: 10, failed: 0, retried: 0 });
    assert.ok(smallProxy.count(BATCH) >= 3, `refused (413), then in parts: ${JSON.stringify(Object.fromEntries(smallProxy.requests))}`);
    const states = await Promise.all(ids.map((id) => small.request("GET", `/api/tasks/${id}`)));
    assert.deepEqual(states.map((s) => [s.status, s.image_url]), ids.map((_, i) => ["completed", finalUrl(i)]));
  } finally {
    await close();
  }
});

test("the byte budget counts UTF-8 bytes: non-ASCII updates stay within maxBatchBytes", async () => {
  const ids = await tasks(6);
  // Each item is about 180 bytes of UTF-8 but 140 UTF-16 units: counted in units, three
  // would go in one body of about 550 bytes.
  const stage = "é".repeat(40);
  const reporter = new Reporter(proxy.url, server.pushKey, { maxBatchBytes: 500 });
  ids.forEach((id) => reporter.report(id, { progress: 40, stage }));
  assert.equal(await reporter.flush(10_000), true, JSON.stringify(reporter.stats));
  assert.equal(reporter.stats.sent, 6);
  assert.ok(proxy.largest.get(BATCH) <= 500, `largest batch body: ${proxy.largest.get(BATCH)} bytes`);
});

test("a retried update folded into a newer one counts as conflated, not retried", async () => {
  const [id] = await tasks(1);
  const reporter = new Reporter(proxy.url, server.pushKey, { backoffMs: 10 });
  proxy.refuseNext(`/api/tasks/${id}/progress`, 1);
  proxy.onRequest = () => {
    proxy.onRequest = null;
    reporter.report(id, { stage: "newer" }); // while the first update is in flight
  };
  reporter.report(id, { progress: 10 });
  assert.equal(await reporter.flush(10_000), true, JSON.stringify(reporter.stats));
  const { sent, retried, conflated } = reporter.stats;
  assert.deepEqual({ sent, retried, conflated }, { sent: 1, retried: 0, conflated: 1 });
  const { progress, stage } = await state(id);
  assert.deepEqual([progress, stage], [10, "newer"]);
});
