// The package as an app gets it: `npm pack`, installed from the tarball into test/consumer,
// type-checked there with `tsc --noEmit`, and its React hook in that app built by Vite and
// driven in Chromium (playwright-core; CHROMIUM or /usr/bin/chromium) against a live taskcast.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";

import { chromium } from "playwright-core";
import { build, preview } from "vite";

import { freePort, PACKAGE, sleep, Taskcast, until } from "./taskcast.mjs";

const run = promisify(execFile);
const CONSUMER = path.join(PACKAGE, "test", "consumer");
const WAIT = 15_000;

let scratch;
before(async () => {
  scratch = await mkdtemp(path.join(tmpdir(), "taskcast-js-"));
});
after(async () => {
  await rm(scratch, { recursive: true, force: true });
});

let tarball;
test("npm pack makes a tarball of the sources and types that installs into an app", async () => {
  const { stdout } = await run("npm", ["pack", "--json", "--pack-destination", scratch], { cwd: PACKAGE });
  const [packed] = JSON.parse(stdout);
  assert.deepEqual(packed.files.map((f) => f.path).sort(), [
    "README.md",
    "package.json",
    "src/index.d.ts",
    "src/index.js",
    "src/react.d.ts",
    "src/react.js",
    "src/reporter.d.ts",
    "src/reporter.js",
  ]);
  tarball = path.join(scratch, packed.filename);
  await rm(path.join(CONSUMER, "node_modules"), { recursive: true, force: true });
  // No runtime dependencies and an optional peer: nothing is fetched.
  await run("npm", ["install", "--offline", "--no-save", "--no-package-lock", "--no-audit", "--no-fund", tarball], {
    cwd: CONSUMER,
  });
  const installed = path.join(CONSUMER, "node_modules", "@taskcast", "client");
  assert.equal(await readFile(path.join(installed, "src", "index.js"), "utf8"), await readFile(path.join(PACKAGE, "src", "index.js"), "utf8"));
  const { stdout: exports } = await run(
    process.execPath,
    ["--input-type=module", "-e", 'console.log(Object.keys(await import("@taskcast/client")).sort().join(" "))'],
    { cwd: CONSUMER },
  );
  assert.equal(exports.trim(), "TaskcastError isTerminal settings watchTask watchUser");
});

test("tsc --noEmit accepts the typed consumer, and rejects each misuse it marks", async () => {
  assert.ok(tarball, "the package is installed into the consumer");
  const tsc = path.join(PACKAGE, "node_modules", "typescript", "bin", "tsc");
  const result = await run(process.execPath, [tsc, "--noEmit", "-p", CONSUMER]).catch((e) => e);
  assert.equal(result.code ?? 0, 0, `tsc failed:\n${result.stdout}${result.stderr}`);
});

test("useTask in a Vite-built React app, in Chromium, follows a live taskcast", async (t) => {
  assert.ok(tarball, "the package is installed into the consumer");
  const outDir = path.join(scratch, "dist");
  await build({ root: CONSUMER, logLevel: "warn", build: { outDir, emptyOutDir: true } });
  const app = await preview({ root: CONSUMER, logLevel: "warn", build: { outDir }, preview: { host: "127.0.0.1", port: await freePort(), strictPort: true } });
  const server = await Taskcast.launch({ postgres: false });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
  });
  t.after(async () => {
    await browser.close();
    await server.close();
    await new Promise((resolve) => app.httpServer.close(resolve));
  });

  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
  const sent = []; // every WebSocket message the page sent
  page.on("websocket", (ws) => ws.on("framesent", (f) => sent.push(JSON.parse(String(f.payload)))));
  const refreshed = [];
  let tokenDelay = 0;
  await page.exposeFunction("freshToken", async (taskId, cause) => {
    refreshed.push([taskId, cause]);
    await sleep(tokenDelay);
    return server.token(taskId);
  });
  const origin = new URL(app.resolvedUrls.local[0]).origin;
  await page.goto(`${origin}/?server=${encodeURIComponent(server.base)}`);
  // Every version each task showed, in order, to check none went backwards.
  await page.evaluate(() => {
    window.shown = {};
    const el = document.getElementById("task");
    new MutationObserver(() => {
      const { taskId, version } = el.dataset;
      if (taskId && version !== "") (window.shown[taskId] ||= []).push(Number(version));
    }).observe(el, { attributes: true });
  });
  const shows = (attrs) =>
    page.waitForSelector(`#task${Object.entries(attrs).map(([k, v]) => `[data-${k}="${v}"]`).join("")}`, { timeout: WAIT });

  await t.test("with no task id the hook is idle", async () => {
    await shows({ connection: "idle", status: "" });
  });

  const task = await server.createTask();
  await t.test("it shows the snapshot, each push, and ends at the final status", async () => {
    await page.evaluate(([id, token]) => window.watch(id, token), [task.task_id, task.token]);
    await shows({ "task-id": task.task_id, connection: "connected", transport: "websocket", status: "pending", version: 0 });
    await server.push(task.task_id, { progress: 40, stage: "generating", status: "processing" });
    await shows({ status: "processing", version: 1 });
    assert.equal(await page.textContent("#percent"), "40%");
    assert.equal(await page.textContent("#stage"), "generating");
    await server.push(task.task_id, { progress: 100, status: "completed" });
    await shows({ status: "completed", version: 2, connection: "ended", error: "" });
    assert.equal(await page.textContent("#percent"), "100%");
    // Each render passed a new getToken function; none of them started a new watch.
    const subscribes = sent.filter((m) => m.type === "subscribe" && m.task_id === task.task_id);
    assert.equal(subscribes.length, 1, JSON.stringify(sent));
  });

  await t.test("getToken given to the hook replaces an expired token and the watch goes on", async () => {
    const expiring = await server.createTask();
    await page.evaluate(([id, token]) => window.watch(id, token), [expiring.task_id, await server.token(expiring.task_id, "1s")]);
    await shows({ "task-id": expiring.task_id, connection: "connected", version: 0 });
    // The server ends the subscription when its token expires; only a refresh brings the push.
    await until("getToken after the expiry", () => refreshed.length > 0);
    assert.deepEqual(refreshed, [[expiring.task_id, "token_expired"]]);
    await server.push(expiring.task_id, { progress: 10, status: "processing" });
    await shows({ "task-id": expiring.task_id, version: 1, error: "" });
  });

  await t.test("a new token for the same task keeps its state on screen while it resubscribes", async () => {
    const task = await server.createTask();
    await server.push(task.task_id, { progress: 60, stage: "kept", status: "processing" });
    await page.evaluate(([id, token]) => window.watch(id, token), [task.task_id, task.token]);
    await shows({ "task-id": task.task_id, version: 1 });
    const from = await page.evaluate(() => window.rendered.length);
    // No token now: the new watch asks getToken, which takes a while to answer.
    tokenDelay = 300;
    await page.evaluate((id) => window.watch(id, undefined), task.task_id);
    await until("getToken for the new watch", () => refreshed.some(([id, cause]) => id === task.task_id && cause === null));
    await server.push(task.task_id, { progress: 65 });
    await shows({ "task-id": task.task_id, version: 2, connection: "connected" });
    tokenDelay = 0;
    const rendered = await page.evaluate((from) => window.rendered.slice(from), from);
    assert.ok(!rendered.includes(null), `the state was cleared: ${JSON.stringify(rendered)}`);
  });

  await t.test("a new task id starts from nothing and shows only the new task", async () => {
    const [first, second] = [await server.createTask(), await server.createTask()];
    await server.push(first.task_id, { progress: 70, stage: "first", status: "processing" });
    await page.evaluate(([id, token]) => window.watch(id, token), [first.task_id, first.token]);
    await shows({ "task-id": first.task_id, version: 1 });
    await page.evaluate(([id, token]) => window.watch(id, token), [second.task_id, second.token]);
    await shows({ "task-id": second.task_id, version: 0, status: "pending" });
    assert.equal(await page.textContent("#stage"), "");
    await server.push(first.task_id, { progress: 80, stage: "first, unwatched" });
    await server.push(second.task_id, { progress: 5, stage: "second" });
    await shows({ "task-id": second.task_id, version: 1 });
    assert.equal(await page.textContent("#stage"), "second");
  });

  await t.test("a task that does not exist ends the watch with a fatal error", async () => {
    const missing = "00000000-0000-4000-8000-000000000000";
    await page.evaluate(([id, token]) => window.watch(id, token), [missing, await server.token(missing)]);
    await shows({ connection: "ended", error: "not_found fatal", status: "" });
  });

  await t.test("no page errors, and no task's version ever went backwards", async () => {
    assert.deepEqual(errors, []);
    const shown = await page.evaluate(() => window.shown);
    for (const [id, versions] of Object.entries(shown)) {
      assert.ok(versions.every((v, i) => i === 0 || v >= versions[i - 1]), `${id}: ${versions}`);
    }
  });
});
