// A real taskcast for the package's tests: the binary scripts/browser-test built
// (TASKCAST_BIN), served on a free port, on a fresh Postgres database when
// TASKCAST_TEST_DATABASE_URL is set (so tasks survive a restart), else on the in-memory store.

import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);
export const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const REPO = path.resolve(PACKAGE, "../..");
const PUSH_KEY = "js-client-test-push-key-0123456789abcdef";
const SUBSCRIBE_SECRET = "js-client-test-subscribe-secret-0123456789";

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function binary() {
  const target = path.resolve(REPO, process.env.CARGO_TARGET_DIR || "target");
  const bin = process.env.TASKCAST_BIN || path.join(target, "debug", "taskcast");
  if (!existsSync(bin)) throw new Error(`${bin} does not exist: run scripts/browser-test js (it builds taskcast)`);
  return bin;
}

export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Resolves when `condition()` is truthy; rejects after `ms` with `what` in the message. */
export async function until(what, condition, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** The real server process; start() and stop() may be called repeatedly (same port).
 * `settings`: more environment for the server, e.g. `{ TASKCAST_MAX_BATCH_ITEMS: "2" }`. */
export class Taskcast {
  static async launch({ postgres = true, settings = {} } = {}) {
    const admin = postgres ? process.env.TASKCAST_TEST_DATABASE_URL : undefined;
    if (postgres && !admin) throw new Error("TASKCAST_TEST_DATABASE_URL is not set (run scripts/browser-test js)");
    const server = new Taskcast(binary(), await freePort(), admin, settings);
    if (admin) {
      await server.psql(admin, `CREATE DATABASE ${server.db}`);
      await run(server.binary, ["migrate"], { env: server.env(), timeout: 30_000 });
    }
    await server.start();
    return server;
  }

  constructor(binary, port, admin, settings = {}) {
    this.binary = binary;
    this.settings = settings;
    this.base = `http://127.0.0.1:${port}`;
    this.port = port;
    this.admin = admin;
    // scripts/browser-test drops databases with this prefix if a run is killed.
    this.db = admin ? `${process.env.TASKCAST_JS_DB_PREFIX || "js_"}${randomBytes(6).toString("hex")}` : null;
    this.child = null;
    this.output = [];
  }

  get databaseUrl() {
    const url = new URL(this.admin);
    url.pathname = `/${this.db}`;
    return url.toString();
  }

  env() {
    const env = { ...process.env };
    for (const name of ["NODE_ENV", "APP_ENV", "TASKCAST_PUBLIC_SUBSCRIBE", "NEXT_PUBLIC_APP_URL", "DATABASE_URL"]) {
      delete env[name];
    }
    if (this.db) env.DATABASE_URL = this.databaseUrl;
    return {
      ...env,
      TASKCAST_DEMO: "false",
      TASKCAST_SUBSCRIBE_SECRET: SUBSCRIBE_SECRET,
      TASK_PROCESS_SECRET_KEY: PUSH_KEY,
      RUST_LOG: process.env.RUST_LOG || "warn",
      ...this.settings,
    };
  }

  async psql(url, sql) {
    await run("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql], { timeout: 30_000 });
  }

  /** Runs SQL in the task database (Postgres only). */
  sql(statement) {
    return this.psql(this.databaseUrl, statement);
  }

  async start() {
    const child = spawn(this.binary, ["--listen", `127.0.0.1:${this.port}`], {
      env: this.env(),
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child = child;
    for (const stream of [child.stdout, child.stderr]) stream.on("data", (chunk) => this.output.push(String(chunk)));
    child.exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
    let exited = null;
    child.exited.then((e) => (exited = e));
    await until(`taskcast on ${this.base}`, async () => {
      if (exited) throw new Error(`taskcast exited at startup (${JSON.stringify(exited)}):\n${this.output.join("")}`);
      return fetch(`${this.base}/readyz`).then((r) => r.ok, () => false);
    });
  }

  /** SIGTERM, then waits for the exit of a graceful shutdown. */
  async stop() {
    const child = this.child;
    if (!child) return;
    this.child = null;
    child.kill("SIGTERM");
    let timer;
    const late = new Promise((resolve) => (timer = setTimeout(resolve, 15_000, null)));
    const exited = await Promise.race([child.exited, late]);
    clearTimeout(timer);
    if (exited) return;
    child.kill("SIGKILL");
    throw new Error("taskcast did not stop within 15 s of SIGTERM");
  }

  /** Stops the server and drops its database. */
  async close() {
    await this.stop();
    if (this.db) await this.psql(this.admin, `DROP DATABASE IF EXISTS ${this.db} WITH (FORCE)`);
  }

  /** The push key the server was started with (for the reporter under test). */
  get pushKey() {
    return PUSH_KEY;
  }

  async request(method, pathname, body) {
    const response = await fetch(`${this.base}${pathname}`, {
      method,
      headers: { authorization: `Bearer ${PUSH_KEY}`, ...(body ? { "content-type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const json = await response.json();
    if (!response.ok) throw new Error(`${method} ${pathname}: ${response.status} ${JSON.stringify(json)}`);
    return json;
  }

  /** A new task: its state at version 0, plus `token`. */
  createTask() {
    return this.request("POST", "/api/tasks", {});
  }

  /** A push as the generator makes it; resolves to the committed state. */
  push(taskId, fields) {
    return this.request("POST", `/api/tasks/${taskId}/progress`, fields);
  }

  /** A subscribe token from `taskcast token` (e.g. ttl "1s"; `extra` flags such as "--cancel"). */
  async token(taskId, ttl = "1h", extra = []) {
    const args = ["token", "--task", taskId, "--ttl", ttl, ...extra];
    const { stdout } = await run(this.binary, args, { env: this.env() });
    return stdout.trim();
  }
}
