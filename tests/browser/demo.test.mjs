// The demo page and /client.js in a real browser (Debian's Chromium, driven by playwright-core).
//
// Run it with scripts/browser-test, which installs what is missing and provides
// TASKCAST_TEST_DATABASE_URL (an admin URL on which we may CREATE/DROP DATABASE).
//
// It builds the real `taskcast` binary, serves it on Postgres (so tasks survive a restart)
// with the demo on (and TASKCAST_STALL_SECS=2), and checks, in order:
//   1. the page and /client.js are served; the page's ordinals read 1st, 2nd, 3rd, 11th…;
//   2. a generation started from the page shows "step n/30" and a preview (an SVG the
//      server answers), then reaches 100% and "completed", the result replacing the preview;
//   3. a server stopped (SIGTERM) and restarted mid-generation: the page reconnects by
//      itself and shows the pushes made after the restart, up to the final state;
//   4. how long a push takes to show on the page (printed);
//   5. getToken() is called for an expired or invalid token, and the watch goes on;
//   6. five generations share one WebSocket, and run at most two at once (two simulated
//      GPUs); the waiting ones show "3rd in line · 3 waiting" (queue_position/queue_length);
//   7. the time left counts down on the page between pushes; a generation that stops
//      pushing for longer than the stall period shows the stalled warning (stalled,
//      stalled_since), then carries on to "completed";
//   8. without WebSocket, or when no WebSocket can be opened, the client falls back to
//      Server-Sent Events;
//   9. "my generations" (the visitor's feed, user:<id>) shows a new generation appear; Cancel
//      on a running card ends it (card, feed and row) as cancelled;
//  10. no page errors, and versions never went backwards on any card;
// then saves screenshots under $CARGO_TARGET_DIR/browser (default target/browser), and
// with TASKCAST_UPDATE_SCREENSHOT=1 copies the showcase one to docs/demo.png.
// The last line is "N passed, N failed"; the exit code is non-zero on any failure.

import { spawn, execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createWriteStream, mkdirSync, copyFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

import { chromium } from "playwright-core";

const run = promisify(execFile);
const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const TARGET = path.resolve(REPO, process.env.CARGO_TARGET_DIR || "target");
const OUT = path.join(TARGET, "browser");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ADMIN_URL = process.env.TASKCAST_TEST_DATABASE_URL;
const DB_NAME = process.env.TASKCAST_BROWSER_DB || `browser_${randomBytes(6).toString("hex")}`;
const PUSH_KEY = "browser-test-push-key-0123456789abcdef";
const SUBSCRIBE_SECRET = "browser-test-subscribe-secret-0123456789";
const WAIT = 20_000; // the longest any single condition may take
const STALL_SECS = 2; // the server's stall period in this test (TASKCAST_STALL_SECS)
const TOTAL_STEPS = 30; // src/demo/mod.rs
const BUDGET = 150_000; // the whole run after the build, so CI never hangs on us
let deadline = Infinity; // set once the binary is built

const now = () => performance.timeOrigin + performance.now();
const log = (...args) => console.log(...args);

// ---------------------------------------------------------------- the steps harness

const steps = [];
function step(name, fn, { required = false } = {}) {
  steps.push({ name, fn, required });
}

async function runSteps() {
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  let blocked = null;
  for (const { name, fn, required } of steps) {
    if (interrupted) blocked = "the run was interrupted";
    if (blocked) {
      log(`SKIP ${name} (${blocked})`);
      skipped++;
      continue;
    }
    const started = Date.now();
    try {
      if (Date.now() > deadline) throw new Error(`the run took longer than ${BUDGET / 1000} s after the build`);
      await fn();
      log(`ok   ${name} (${Date.now() - started} ms)`);
      passed++;
    } catch (e) {
      // Playwright appends the browser's whole log to some errors: keep the start.
      const lines = String(e?.stack || e).replace(/\x1b\[[0-9;]*m/g, "").split("\n");
      const shown = lines.length > 25 ? [...lines.slice(0, 25), `(${lines.length - 25} more lines)`] : lines;
      log(`FAIL ${name} (${Date.now() - started} ms)${interrupted ? " (interrupted)" : `\n     ${shown.join("\n     ")}`}`);
      failed++;
      if (required) blocked = `after "${name}" failed`;
    }
  }
  return { passed, failed, skipped };
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

// ---------------------------------------------------------------- Postgres, the binary

function databaseUrl(name) {
  const url = new URL(ADMIN_URL);
  url.pathname = `/${name}`;
  return url.toString();
}

async function psql(sql) {
  await run("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", ADMIN_URL, "-c", sql], { timeout: 30_000 });
}

async function buildBinary() {
  // scripts/build-bin builds it as `cargo test` does, so nothing is rebuilt after that step.
  const child = spawn(path.join(REPO, "scripts", "build-bin"), [], { cwd: REPO, stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  child.stdout.on("data", (chunk) => (out += chunk));
  const code = await new Promise((resolve) => child.on("close", resolve));
  check(code === 0, `scripts/build-bin failed (exit ${code})`);
  const executable = out.trim();
  check(executable, "scripts/build-bin printed no taskcast executable");
  return executable;
}

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** The real server process; start() and stop() may be called repeatedly (same port). */
class Server {
  constructor(binary, port, logFile) {
    this.binary = binary;
    this.port = port;
    this.base = `http://127.0.0.1:${port}`;
    this.log = createWriteStream(logFile, { flags: "a" });
    this.child = null;
    this.agent = new http.Agent({ keepAlive: true });
  }

  env() {
    const env = { ...process.env };
    for (const name of ["NODE_ENV", "APP_ENV", "TASKCAST_PUBLIC_SUBSCRIBE", "NEXT_PUBLIC_APP_URL"]) delete env[name];
    return {
      ...env,
      DATABASE_URL: databaseUrl(DB_NAME),
      TASKCAST_DEMO: "true",
      TASKCAST_SUBSCRIBE_SECRET: SUBSCRIBE_SECRET,
      TASKCAST_STALL_SECS: String(STALL_SECS),
      TASK_PROCESS_SECRET_KEY: PUSH_KEY,
      RUST_LOG: process.env.RUST_LOG || "info",
    };
  }

  async migrate() {
    const { stdout } = await run(this.binary, ["migrate"], { env: this.env(), timeout: 30_000 });
    this.log.write(`---- taskcast migrate\n${stdout}`);
  }

  async start() {
    this.log.write(`---- taskcast serve on ${this.base}\n`);
    const child = spawn(this.binary, ["--listen", `127.0.0.1:${this.port}`], {
      env: this.env(),
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child = child;
    child.stdout.pipe(this.log, { end: false });
    child.stderr.pipe(this.log, { end: false });
    child.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
    const until = Date.now() + WAIT;
    for (;;) {
      const exited = await Promise.race([child.exited, sleep(100).then(() => null)]);
      if (exited) throw new Error(`taskcast exited at startup (${JSON.stringify(exited)}); see ${OUT}/server.log`);
      const ready = await this.request("GET", "/readyz").then((r) => r.status === 200, () => false);
      if (ready) return;
      if (Date.now() > until) throw new Error(`taskcast did not get ready on ${this.base}`);
    }
  }

  /** SIGTERM, and the exit status of a graceful shutdown. */
  async stop() {
    const child = this.child;
    if (!child) return null;
    this.child = null;
    child.kill("SIGTERM");
    const exited = await Promise.race([child.exited, sleep(15_000).then(() => null)]);
    this.agent.destroy(); // kept-alive sockets died with the server
    this.agent = new http.Agent({ keepAlive: true });
    if (exited) return exited;
    child.kill("SIGKILL");
    await child.exited;
    throw new Error("taskcast did not stop within 15 s of SIGTERM");
  }

  request(method, pathname, body, headers = {}) {
    return new Promise((resolve, reject) => {
      const payload = body === undefined ? null : Buffer.from(JSON.stringify(body));
      const req = http.request(
        `${this.base}${pathname}`,
        {
          method,
          agent: this.agent,
          headers: payload ? { "content-type": "application/json", "content-length": payload.length, ...headers } : headers,
        },
        (res) => {
          let text = "";
          res.setEncoding("utf8");
          res.on("data", (chunk) => (text += chunk));
          res.on("end", () => {
            let json = null;
            try {
              json = JSON.parse(text);
            } catch {
              /* not JSON */
            }
            resolve({ status: res.statusCode, headers: res.headers, text, json });
          });
        },
      );
      req.setTimeout(10_000, () => req.destroy(new Error(`${method} ${pathname} timed out`)));
      req.on("error", reject);
      req.end(payload);
    });
  }

  async createTask() {
    const res = await this.request("POST", "/api/tasks", {}, { authorization: `Bearer ${PUSH_KEY}` });
    check(res.status === 201 && res.json?.token, `POST /api/tasks: ${res.status} ${res.text}`);
    return res.json;
  }

  async push(taskId, fields) {
    const res = await this.request("POST", `/api/tasks/${taskId}/progress`, fields, {
      authorization: `Bearer ${PUSH_KEY}`,
    });
    check(res.status === 200, `push ${JSON.stringify(fields)}: ${res.status} ${res.text}`);
    return res.json;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- page helpers

const card = (taskId) => `article.card[data-task-id="${taskId}"]`;

/** Records, in the page, when each card showed each version (for latency and ordering). */
function installRecorder() {
  window.__marker = "not reloaded";
  window.__seenAt = {};
  window.__backwards = [];
  window.__queueLines = {}; // task id -> the place-in-line lines its card showed
  window.__maxProcessing = 0; // most cards processing at once (reset by the test)
  const stamp = () => performance.timeOrigin + performance.now();
  new MutationObserver((records) => {
    const t = stamp();
    for (const r of records) {
      const el = r.target;
      const id = el.dataset.taskId;
      const version = Number(el.dataset.version);
      const seen = (window.__seenAt[id] ||= {});
      const last = Math.max(-1, ...Object.keys(seen).map(Number));
      if (version < last) window.__backwards.push({ id, version, last });
      if (!(version in seen)) seen[version] = t;
      const queue = el.querySelector(".queue")?.textContent;
      if (queue) (window.__queueLines[id] ||= []).push(queue);
    }
    const processing = document.querySelectorAll('#cards article.card[data-status="processing"]').length;
    window.__maxProcessing = Math.max(window.__maxProcessing, processing);
  }).observe(document.getElementById("cards"), { subtree: true, attributes: true, attributeFilter: ["data-version"] });
}

/** webSocket: "missing" removes it; "blocked" makes every attempt fail before opening. */
async function openPage(browser, { webSocket = "real" } = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.errors = [];
  page.sockets = [];
  page.notFound = [];
  page.on("response", (r) => r.status() === 404 && page.notFound.push(r.url()));
  page.on("pageerror", (e) => page.errors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && !/Failed to load resource|ERR_CONNECTION_REFUSED|WebSocket connection/.test(m.text())) {
      page.errors.push(`console: ${m.text()}`);
    }
  });
  page.on("websocket", (ws) => {
    const record = { url: ws.url(), subscribes: 0, closed: false };
    ws.on("framesent", (f) => {
      if (String(f.payload).includes('"subscribe"')) record.subscribes++;
    });
    ws.on("close", () => (record.closed = true));
    page.sockets.push(record);
  });
  if (webSocket === "missing") await page.addInitScript(() => delete window.WebSocket);
  if (webSocket === "blocked") {
    // As behind a proxy that drops Upgrade: the server answers HTTP, no socket ever opens.
    await page.addInitScript(() => {
      window.__wsAttempts = 0;
      window.WebSocket = class {
        constructor() {
          window.__wsAttempts++;
          setTimeout(() => {
            this.onerror?.(new Event("error"));
            this.onclose?.({ code: 1006, reason: "", wasClean: false });
          }, 10);
        }
        send() {}
        close() {}
      };
    });
  }
  await page.goto(`${server.base}/?fast`);
  await page.evaluate(installRecorder);
  return page;
}

/** Clicks "Start generation" and returns the new card's task id. */
async function startFromPage(page, { failures = false } = {}) {
  await page.setChecked("#failures", failures);
  const before = await page.$$eval("article.card", (cards) => cards.map((c) => c.dataset.taskId));
  const created = page.waitForResponse((r) => r.url().endsWith("/api/demo/tasks") || r.url().includes("/api/demo/tasks?"));
  await page.click("#start-one");
  const response = await created;
  check(response.status() === 201, `POST /api/demo/tasks answered ${response.status()}`);
  const { task_id: taskId, token } = await response.json();
  check(!before.includes(taskId) && token, "the demo answered a new task id and a token");
  await page.waitForSelector(card(taskId), { timeout: WAIT });
  return taskId;
}

function waitForCard(page, taskId, predicate, arg, timeout = WAIT) {
  return page.waitForFunction(
    ({ selector, source, arg }) => {
      const el = document.querySelector(selector);
      // eslint-disable-next-line no-new-func
      return el && new Function("el", "arg", `return (${source})(el, arg)`)(el, arg);
    },
    { selector: card(taskId), source: predicate.toString(), arg },
    { timeout },
  );
}

const finishedAt100 = (el) =>
  el.dataset.status === "completed" && el.querySelector(".percent").textContent === "100%";

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)];
const ms = (x) => `${x.toFixed(1)} ms`;

// ---------------------------------------------------------------- the test

let server = null;
let browser = null;
let page = null;
let dbCreated = false;

step(
  "build taskcast, create and migrate a fresh database, serve with the demo on",
  async () => {
    check(ADMIN_URL, "TASKCAST_TEST_DATABASE_URL is not set (run scripts/browser-test)");
    mkdirSync(OUT, { recursive: true });
    const binary = await buildBinary();
    deadline = Date.now() + BUDGET;
    setTimeout(() => {
      log("the browser test ran past its deadline; cleaning up");
      cleanup().finally(() => process.exit(1));
    }, BUDGET + 20_000).unref();
    await psql(`CREATE DATABASE ${DB_NAME}`);
    dbCreated = true;
    server = new Server(binary, await freePort(), path.join(OUT, "server.log"));
    await server.migrate();
    await server.start();
    log(`     serving ${server.base} (database ${DB_NAME}, binary ${path.relative(REPO, binary)})`);
  },
  { required: true },
);

step(
  "the page and /client.js are served; Chromium opens the page",
  async () => {
    const js = await server.request("GET", "/client.js");
    check(js.status === 200 && js.headers["content-type"].startsWith("text/javascript"), `GET /client.js: ${js.status}`);
    check(js.text.includes("export function watchTask"), "client.js exports watchTask");
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
      ],
    });
    log(`     ${CHROMIUM}: Chromium ${browser.version()}`);
    page = await openPage(browser);
    check((await page.title()) === "taskcast demo", "the page's title");
    await page.waitForSelector("#start-one:not([disabled])");
    const pill = await page.$eval("#connection", (el) => [el.dataset.state, el.textContent]);
    check(pill.join(" ") === "idle ready · nothing to watch", `with nothing to watch the pill reads "${pill.join(" ")}"`);
    const ordinals = await page.evaluate(() => [1, 2, 3, 4, 10, 11, 12, 13, 21, 22, 23, 101, 111, 112, 113, 121].map(window.taskcastDemo.ordinal));
    const expected = "1st 2nd 3rd 4th 10th 11th 12th 13th 21st 22nd 23rd 101st 111th 112th 113th 121st";
    check(ordinals.join(" ") === expected, `ordinals: ${ordinals.join(" ")}`);
  },
  { required: true },
);

let firstTask;
step("a generation shows its steps and a preview, then reaches 100% and completed, with its picture", async () => {
  firstTask = await startFromPage(page);
  const running = await waitForCard(
    page,
    firstTask,
    (el, total) => {
      const steps = el.querySelector(".steps")?.textContent.match(/^step (\d+)\/(\d+)$/);
      const preview = el.querySelector(".thumb img.preview");
      return el.dataset.status === "processing" && steps && Number(steps[1]) >= 1 && Number(steps[2]) === total && preview
        ? { steps: steps[0], preview: preview.src }
        : false;
    },
    TOTAL_STEPS,
  );
  const { steps, preview } = await running.jsonValue();
  const previewUrl = new URL(preview);
  check(previewUrl.origin === server.base && previewUrl.pathname.startsWith("/demo/preview/"), `preview at ${preview} (${steps})`);
  const svg = await server.request("GET", previewUrl.pathname);
  check(svg.status === 200 && svg.headers["content-type"] === "image/svg+xml" && svg.text.startsWith("<svg"), `GET ${preview}: ${svg.status} ${svg.headers["content-type"]}`);
  for (const nonsense of [`${firstTask}.9.1.svg`, `${firstTask}.0.31.svg`, `${firstTask}.0.1.png`, "nothing.svg"]) {
    const res = await server.request("GET", `/demo/preview/${nonsense}`);
    check(res.status === 404, `GET /demo/preview/${nonsense}: ${res.status}`);
  }
  await waitForCard(page, firstTask, finishedAt100);
  const img = await page.waitForSelector(`${card(firstTask)} .thumb img.result`, { timeout: WAIT });
  await page.waitForFunction((img) => img.complete && img.naturalWidth > 0, img, { timeout: WAIT });
  const previews = await page.$$(`${card(firstTask)} img.preview`);
  check(previews.length === 0, "the result replaced the preview");
  check(new URL(await img.getAttribute("src")).pathname.startsWith("/demo/result/"), "the result picture is shown");
  const transport = await page.$eval("#connection", (el) => el.dataset.transport);
  check(transport === "websocket", `the page watched over ${transport}`);
});

let restartedTask;
step("after a server restart mid-generation the page reconnects and shows the final state", async () => {
  restartedTask = await startFromPage(page);
  await waitForCard(page, restartedTask, (el) => {
    const p = Number.parseFloat(el.dataset.progress);
    return el.dataset.status === "processing" && p >= 10 && p <= 80;
  });
  const exited = await server.stop();
  check(exited.code === 0, `taskcast exited with ${JSON.stringify(exited)} after SIGTERM`);
  await page.waitForSelector('#connection[data-state="down"]', { timeout: WAIT });
  const shown = await page.$eval(card(restartedTask), (el) => Number(el.dataset.version));
  await server.start();
  // Nothing nudges the page: it reconnects on its own.
  await page.waitForSelector('#connection[data-state="live"]', { timeout: WAIT });
  const stored = (await server.request("GET", `/api/tasks/${restartedTask}`, undefined, { authorization: `Bearer ${PUSH_KEY}` })).json;
  check(stored.status === "processing", `the task survived the restart as ${stored.status}`);
  check(stored.version >= shown, `stored version ${stored.version} is at least the shown ${shown}`);
  // The generator died with the server; finish the task as a restarted generator would.
  const resumed = await server.push(restartedTask, { progress: 90, stage: "generating (resumed)", status: "processing" });
  await waitForCard(page, restartedTask, (el, v) => Number(el.dataset.version) === v && el.dataset.progress === "90", resumed.version);
  await server.push(restartedTask, {
    progress: 100,
    stage: "done",
    status: "completed",
    image_url: `${server.base}/demo/result/${restartedTask}.svg`,
  });
  await waitForCard(page, restartedTask, finishedAt100);
  check((await page.evaluate(() => window.__marker)) === "not reloaded", "the page was not reloaded");
});

let latency = null;
step("push → page latency (20 pushes, one at a time)", async () => {
  const { task_id: taskId, token } = await server.createTask();
  await page.evaluate(({ taskId, token }) => window.taskcastDemo.watch(taskId, token, "latency probe"), { taskId, token });
  await waitForCard(page, taskId, (el) => el.dataset.version === "0");
  // Node's and the page's clocks are both wall-clock based; measure what is left over.
  const offsets = [];
  for (let i = 0; i < 5; i++) {
    const before = now();
    const pageNow = await page.evaluate(() => performance.timeOrigin + performance.now());
    offsets.push(pageNow - (before + now()) / 2);
  }
  const offset = median(offsets);
  const shown = [];
  const acked = [];
  for (let i = 1; i <= 20; i++) {
    const sent = now();
    const state = await server.push(taskId, { progress: i * 4, stage: "latency probe", status: "processing", seq: i });
    acked.push(now() - sent);
    await page.waitForFunction(({ taskId, v }) => window.__seenAt[taskId]?.[v] !== undefined, { taskId, v: state.version }, { timeout: WAIT });
    const seen = await page.evaluate(({ taskId, v }) => window.__seenAt[taskId][v], { taskId, v: state.version });
    shown.push(seen - offset - sent);
  }
  await server.push(taskId, { progress: 100, status: "completed", stage: "done", seq: 21 });
  await waitForCard(page, taskId, finishedAt100);
  check(shown.every((x) => x > 0 && x < WAIT), `latencies are plausible: ${shown.map((x) => x.toFixed(1))}`);
  latency = { median: median(shown), p95: pct(shown, 95), max: Math.max(...shown), ack: median(acked), offset };
  log(
    `     push → page: median ${ms(latency.median)}, p95 ${ms(latency.p95)}, max ${ms(latency.max)}; ` +
      `push acknowledged (committed) after median ${ms(latency.ack)} [clock offset ${ms(offset)}]`,
  );
});

step("getToken() replaces an expired or invalid token and the watch goes on", async () => {
  const expiring = await server.createTask();
  const invalid = await server.createTask();
  const { stdout } = await run(server.binary, ["token", "--task", expiring.task_id, "--ttl", "1s"], { env: server.env() });
  const tasks = {
    expired: { taskId: expiring.task_id, first: stdout.trim(), fresh: expiring.token },
    invalid: { taskId: invalid.task_id, first: "not-a-token", fresh: invalid.token },
  };
  await page.evaluate(async (tasks) => {
    const { watchTask } = await import("/client.js"); // the page's own module instance
    window.__tokens = {};
    for (const [name, { taskId, first, fresh }] of Object.entries(tasks)) {
      const log = (window.__tokens[name] = { refreshed: [], versions: [], errors: [] });
      watchTask(taskId, {
        token: first,
        getToken: async (_, cause) => {
          log.refreshed.push(cause?.code ?? null);
          return fresh;
        },
        onState: (state) => log.versions.push(state.version),
        onError: (error) => log.errors.push(error.code),
      });
    }
  }, tasks);
  // The short-lived token expires within a second; the server then ends that subscription.
  await page.waitForFunction(
    () => window.__tokens.expired.refreshed.includes("token_expired") && window.__tokens.invalid.versions.includes(0),
    null,
    { timeout: WAIT },
  );
  for (const { taskId } of Object.values(tasks)) {
    const state = await server.push(taskId, { progress: 50, stage: "after refresh", status: "processing" });
    check(state.version === 1, `version ${state.version}`);
  }
  await page.waitForFunction(() => Object.values(window.__tokens).every((log) => log.versions.includes(1)), null, {
    timeout: WAIT,
  });
  const logs = await page.evaluate(() => window.__tokens);
  check(logs.invalid.refreshed.includes("token_invalid"), `token_invalid led to getToken: ${JSON.stringify(logs)}`);
  check(Object.values(logs).every((log) => log.errors.length === 0), `no error reached onError: ${JSON.stringify(logs)}`);
  for (const { taskId } of Object.values(tasks)) await server.push(taskId, { status: "cancelled" });
  await page.waitForFunction(() => Object.values(window.__tokens).every((log) => log.versions.includes(2)), null, {
    timeout: WAIT,
  });
});

let fiveTasks = [];
step("five generations share one WebSocket, and at most two run at once (two GPUs)", async () => {
  const opened = page.sockets.length;
  await page.evaluate(() => (window.__maxProcessing = 0));
  await page.setChecked("#failures", false);
  const responses = [];
  const listener = (r) => r.url().includes("/api/demo/tasks") && responses.push(r);
  page.on("response", listener);
  await page.click("#start-five");
  await page.waitForFunction(() => !document.getElementById("start-five").disabled, null, { timeout: WAIT });
  page.off("response", listener);
  check(responses.length === 5 && responses.every((r) => r.status() === 201), "five tasks were created");
  const ids = await Promise.all(responses.map(async (r) => (await r.json()).task_id));
  fiveTasks = ids;
  for (const id of ids) await waitForCard(page, id, finishedAt100);
  const most = await page.evaluate(() => window.__maxProcessing);
  check(most >= 1 && most <= 2, `${most} of the five were processing at once (two GPUs)`);
  const fresh = page.sockets.slice(opened);
  const subscribes = page.sockets.reduce((n, s) => n + s.subscribes, 0);
  check(fresh.length <= 1, `the five tasks opened ${fresh.length} WebSockets`);
  check(page.sockets.length <= 3, `the page opened ${page.sockets.length} WebSockets in all`);
  log(`     ${page.sockets.length} WebSockets in all on this page, ${subscribes} subscribe messages`);
});

step("while five generations share two GPUs, the waiting cards show their place in line", async () => {
  const lines = await page.evaluate((ids) => ids.flatMap((id) => window.__queueLines[id] || []), fiveTasks);
  check(lines.length > 0, "no card showed a place in line (queue_position and queue_length on pending states)");
  for (const line of lines) {
    const m = line.match(/^(\d+)(st|nd|rd|th) in line · (\d+) waiting$/);
    check(m, `a queue line reads "${line}"`);
    const [, position, suffix, length] = m;
    check(suffix === (await page.evaluate((n) => window.taskcastDemo.ordinal(n), Number(position))).slice(position.length), `"${line}"`);
    check(Number(position) >= 1 && Number(position) <= Number(length), `"${line}": the position is within the line`);
  }
  check(lines.some((line) => line.startsWith("1st in line")), `nobody was 1st in line: ${lines.join(" | ")}`);
  log(`     place-in-line lines seen: ${[...new Set(lines)].join(" | ")}`);
});

let stalledTask;
step("the time left counts down on the page between pushes", async () => {
  // This generation stops pushing for 3 stall periods part-way: a quiet stretch to watch.
  const stall = STALL_SECS * 3;
  stalledTask = await page.evaluate(async (stall) => {
    const response = await fetch(`api/demo/tasks?fast=true&failures=false&stall_secs=${stall}`, { method: "POST" });
    const body = await response.json();
    if (response.status !== 201) throw new Error(`POST /api/demo/tasks: ${response.status} ${JSON.stringify(body)}`);
    window.taskcastDemo.watch(body.task_id, body.token, body.prompt);
    return body.task_id;
  }, stall);
  // Two reads of one version (no push in between) whose countdowns differ.
  const handle = await page.waitForFunction(
    (selector) => {
      const el = document.querySelector(selector);
      const eta = el?.querySelector(".eta");
      if (!eta || !eta.dataset.remainingMs) {
        window.__etaRead = null;
        return false;
      }
      const read = { version: el.dataset.version, text: eta.textContent, ms: Number(eta.dataset.remainingMs), steps: el.querySelector(".steps")?.textContent };
      const first = window.__etaRead;
      if (!first || first.version !== read.version) {
        window.__etaRead = read;
        return false;
      }
      return read.text !== first.text ? { first, read } : false;
    },
    card(stalledTask),
    { timeout: WAIT, polling: 200 },
  );
  const { first, read } = await handle.jsonValue();
  check(read.ms < first.ms, `the countdown went from "${first.text}" to "${read.text}"`);
  check(/^(about \d+ s left|almost done)$/.test(read.text) && /^about \d+ s left$/.test(first.text), `countdown texts "${first.text}", "${read.text}"`);
  check(/^step \d+\/30$/.test(read.steps), `the steps line read "${read.steps}"`);
  log(`     at ${read.steps} (v${read.version}, no push in between): "${first.text}" → "${read.text}"`);
});

step("a generation that stops reporting shows the stalled warning", async () => {
  check(stalledTask, "no stalling generation was started");
  // Until the card shows the warning, or the stall ends and the generation completes.
  await waitForCard(page, stalledTask, (el) => el.dataset.stalled === "true" || el.dataset.status === "completed");
  const shown = await page.$eval(card(stalledTask), (el) => ({
    stalled: el.dataset.stalled,
    status: el.dataset.status,
    warning: el.querySelector(".stalled").textContent,
  }));
  check(shown.stalled === "true", `the card went ${shown.status} without showing a stalled warning (the server's stalled: true)`);
  check(/^the generator has not reported for \d+ s$/.test(shown.warning), `the warning reads "${shown.warning}"`);
  // Counted from its last report, so at least the stall period (less a second of clock).
  const silent = Number(shown.warning.match(/\d+/)?.[0]);
  check(silent >= STALL_SECS - 1, `the warning counts ${silent} s, less than the stall period (${STALL_SECS} s)`);
  log(`     "${shown.warning}"`);
});

step("the stalled generation carries on to completed, and the warning goes", async () => {
  check(stalledTask, "no stalling generation was started");
  await waitForCard(page, stalledTask, finishedAt100);
  const after = await page.$eval(card(stalledTask), (el) => [el.dataset.stalled, el.querySelector(".stalled").textContent]);
  check(after[0] === "false" && after[1] === "", `after completing the card shows stalled=${after[0]} "${after[1]}"`);
});

step("\"my generations\" (one feed for this visitor) shows a new generation appear and finish", async () => {
  const visitor = await page.evaluate(() => window.taskcastDemo.visitor);
  check(/^[0-9a-f-]{36}$/.test(visitor), `the page's visitor id is "${visitor}"`);
  // The feed started with the page's first generation; this one is created after that.
  const taskId = await startFromPage(page);
  const row = `#feed-list li[data-task-id="${taskId}"]`;
  await page.waitForSelector(row, { timeout: WAIT });
  await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === "completed", row, { timeout: WAIT });
  const rows = await page.$$eval("#feed-list li", (items) => items.map((li) => li.dataset.taskId));
  for (const id of fiveTasks) check(rows.includes(id), `the five generations are in the feed (missing ${id})`);
  log(`     ${rows.length} generations in this visitor's feed`);
});

step("Cancel on a running card: the generator stops, the card and the feed end as cancelled", async () => {
  const visitor = await page.evaluate(() => window.taskcastDemo.visitor);
  // Normal pace (~20 s): the click lands while it runs, whatever the machine's load.
  const taskId = await page.evaluate(async (visitor) => {
    const response = await fetch(`api/demo/tasks?failures=false&user=${visitor}`, { method: "POST" });
    const body = await response.json();
    if (response.status !== 201) throw new Error(`POST /api/demo/tasks: ${response.status} ${JSON.stringify(body)}`);
    window.taskcastDemo.watch(body.task_id, body.token, body.prompt);
    return body.task_id;
  }, visitor);
  await waitForCard(page, taskId, (el) => el.dataset.status === "processing" && !el.querySelector(".cancel").hidden);
  const clicked = now();
  await page.click(`${card(taskId)} .cancel`);
  await waitForCard(page, taskId, (el) => el.dataset.status === "cancelled");
  const took = Math.round(now() - clicked);
  const shown = await page.$eval(card(taskId), (el) => ({
    percent: el.querySelector(".percent").textContent,
    button: el.querySelector(".cancel").hidden,
  }));
  check(/^stopped at \d+%$/.test(shown.percent), `the cancelled card reads "${shown.percent}"`);
  check(shown.button, "the Cancel button is gone once the task is cancelled");
  const row = `#feed-list li[data-task-id="${taskId}"]`;
  await page.waitForFunction((sel) => document.querySelector(sel)?.dataset.status === "cancelled", row, { timeout: WAIT });
  const sql = `SELECT status || ' ' || (cancel_requested_at IS NOT NULL) FROM image_tasks WHERE id = '${taskId}'`;
  const { stdout } = await run("psql", ["-X", "-At", "-d", databaseUrl(DB_NAME), "-c", sql], { timeout: 30_000 });
  check(stdout.trim() === "cancelled true", `the row reads "${stdout.trim()}"`);
  log(`     click → card shows cancelled: ${took} ms (the generator stops at its next step)`);
});

step("the client falls back to Server-Sent Events without WebSocket, or when it cannot open one", async () => {
  for (const variant of ["missing", "blocked"]) {
    const ssePage = await openPage(browser, { webSocket: variant });
    try {
      const taskId = await startFromPage(ssePage);
      await waitForCard(ssePage, taskId, finishedAt100);
      const transport = await ssePage.$eval("#connection", (el) => el.dataset.transport);
      check(transport === "sse", `${variant}: the page used ${transport}`);
      check(ssePage.sockets.length === 0, `${variant}: no real WebSocket was opened`);
      check(ssePage.errors.length === 0, ssePage.errors.join("\n"));
      if (variant === "blocked") {
        const attempts = await ssePage.evaluate(() => window.__wsAttempts);
        check(attempts === 3, `${variant}: ${attempts} WebSocket attempts before falling back`);
      }
    } finally {
      await ssePage.context().close();
    }
  }
});

step("no page errors, and no card ever showed an older version after a newer one", async () => {
  check(page.errors.length === 0, page.errors.join("\n"));
  const backwards = await page.evaluate(() => window.__backwards);
  check(backwards.length === 0, `versions went backwards: ${JSON.stringify(backwards)}`);
  await page.screenshot({ path: path.join(OUT, "after-restart.png") });
});

step("screenshot of the page with generations in every state", async () => {
  const shot = await openPage(browser);
  try {
    // The pushes a generator would have made to get a task where it is in the picture.
    // Steps as the simulated generator reports them, with its preview while generating.
    const journey = (to, progress, extra = {}, previewOf = null) => {
      const pushes = [{ status: "pending", stage: "queued", progress: 0 }];
      if (to === "queued") return pushes;
      const generating = (p) => {
        const step = Math.round((p * TOTAL_STEPS) / 100);
        const push = { status: "processing", stage: "generating", progress: p, step, total_steps: TOTAL_STEPS };
        return to === "generating" && step > 0 ? { ...push, preview_url: previewOf(step) } : push;
      };
      for (let p = 0; p < progress; p += 9) pushes.push(generating(p));
      pushes.push(generating(progress));
      if (to === "failed") pushes.push({ status: "failed", ...extra });
      if (to === "uploading" || to === "completed") pushes.push({ stage: "uploading" });
      if (to === "completed") pushes.push({ status: "completed", stage: "done", ...extra });
      return pushes;
    };
    const error = "out of GPU memory at 1024x1024 (simulated failure)";
    // src/demo.rs's PROMPTS, in order.
    const DEMO_PROMPTS = [
      "a red fox in fresh snow",
      "a lighthouse at dusk, oil painting",
      "a tiny robot watering plants",
      "a neon city street in the rain",
      "an astronaut cat on the moon",
      "a bowl of ramen, studio lighting",
      "a paper boat on a quiet lake",
      "mountains at sunrise, watercolor",
    ];
    // Oldest first: the page shows the newest card first.
    const scenes = [
      ["a lighthouse at dusk, oil painting", "completed", 100],
      ["an astronaut cat on the moon", "completed", 100],
      ["a bowl of ramen, studio lighting", "failed", 41, { error }],
      ["a neon city street in the rain", "completed", 100],
      ["a red fox in fresh snow", "uploading", 100],
      ["mountains at sunrise, watercolor", "generating", 67],
      ["a tiny robot watering plants", "generating", 23],
      ["a paper boat on a quiet lake", "queued", 0],
    ];
    const running = [];
    for (const [prompt, to, progress, extra] of scenes) {
      const { task_id: taskId, token } = await server.createTask();
      await shot.evaluate(({ taskId, token, prompt }) => window.taskcastDemo.watch(taskId, token, prompt), { taskId, token, prompt });
      await waitForCard(shot, taskId, (el) => el.dataset.version === "0");
      // The picture of the prompt's own subject: its index in src/demo.rs's PROMPTS.
      const subject = DEMO_PROMPTS.indexOf(prompt);
      check(subject >= 0, `"${prompt}" is not one of the demo's prompts`);
      const image = { image_url: `${server.base}/demo/result/${taskId}.${subject}.svg` };
      const previewOf = (step) => `${server.base}/demo/preview/${taskId}.${subject}.${step}.svg`;
      let state;
      let seq = 0;
      for (const fields of journey(to, progress, to === "completed" ? image : extra, previewOf)) {
        state = await server.push(taskId, { ...fields, seq: ++seq });
      }
      await waitForCard(shot, taskId, (el, v) => Number(el.dataset.version) === v, state.version);
      if (to === "generating") running.push({ taskId, seq });
    }
    await shot.waitForFunction(() => [...document.images].every((i) => i.complete && i.naturalWidth > 0), null, { timeout: WAIT });
    await shot.waitForSelector('#connection[data-state="live"]', { timeout: WAIT });
    // The running scenes report again, so none is shown stalled (the stall period is short here).
    for (const { taskId, seq } of running) {
      const state = await server.push(taskId, { stage: "generating", seq: seq + 1 });
      await waitForCard(shot, taskId, (el, v) => Number(el.dataset.version) >= v && el.dataset.stalled === "false", state.version);
    }
    // Each prompt its own picture; a failed card says it stopped, not the stage it was in.
    const pictures = await shot.evaluate(() => Promise.all([...document.querySelectorAll("img.result")].map(async (i) => (await fetch(i.src)).text())));
    const previews = await shot.$$eval("img.preview", (imgs) => imgs.length);
    check(previews === 2, `${previews} previews on the two generating cards`);
    check(pictures.length === 3 && new Set(pictures).size === 3, `3 different pictures expected, got ${pictures.length} (${new Set(pictures).size} different)`);
    const failedLine = await shot.$eval('.card[data-status="failed"]', (el) => [el.querySelector(".stage").textContent, el.querySelector(".percent").textContent]);
    check(failedLine.join(" ") === "failed stopped at 41%", `the failed card reads "${failedLine.join(" ")}"`);
    check(shot.notFound.length === 0, `404s while loading the page: ${shot.notFound.join(", ")}`);
    const file = path.join(OUT, "demo.png");
    await shot.screenshot({ path: file });
    log(`     saved ${path.relative(REPO, file)}`);
    if (process.env.TASKCAST_UPDATE_SCREENSHOT === "1") {
      mkdirSync(path.join(REPO, "docs"), { recursive: true });
      copyFileSync(file, path.join(REPO, "docs", "demo.png"));
      log("     copied it to docs/demo.png");
    }
  } finally {
    await shot.context().close();
  }
});

let interrupted = false;
let cleaning = null;
function cleanup() {
  cleaning ||= (async () => {
    if (browser) await browser.close().catch(() => {});
    browser = null;
    if (server) await server.stop().catch((e) => log(`     stopping taskcast: ${e.message}`));
    if (dbCreated) {
      dbCreated = false;
      await psql(`DROP DATABASE IF EXISTS ${DB_NAME} WITH (FORCE)`).catch((e) => log(`     dropping ${DB_NAME}: ${e.message}`));
    }
  })();
  return cleaning;
}

for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(signal, () => {
    interrupted = true;
    log(`${signal}: cleaning up`);
    cleanup().finally(() => process.exit(1));
  });
}

const started = Date.now();
let outcome;
try {
  outcome = await runSteps();
} finally {
  await cleanup();
}
const { passed, failed, skipped } = outcome;
log(`browser test finished in ${((Date.now() - started) / 1000).toFixed(1)} s; server log: ${path.relative(REPO, path.join(OUT, "server.log"))}`);
if (latency) log(`push → page latency: median ${ms(latency.median)}, p95 ${ms(latency.p95)} over 20 pushes`);
log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ""}`);
process.exit(failed || skipped ? 1 : 0);
