// Fire-and-forget progress reporting to taskcast, with Node's built-in fetch only (Node 18+).
//
//   import { Reporter } from "./taskcast_reporter.mjs";
//   const reporter = new Reporter("http://127.0.0.1:8080", process.env.TASK_PROCESS_SECRET_KEY);
//   reporter.report(taskId, { status: "processing", stage: "generating", progress: 40 });
//   reporter.report(taskId, { status: "completed", progress: 100, image_url: url }); // or error
//   await reporter.flush(5000); // at the end of a generation: true if everything was delivered
//
// report() never throws and returns nothing to await, so a failed progress update never
// breaks the generation. Sending happens in the background: updates waiting for one task
// merge (newest field wins); at most `capacity` tasks wait (the oldest non-final one is
// dropped); every update carries a `seq`, so a retry is harmless; network errors, timeouts,
// 5xx and 429 are retried with backoff and jitter (honouring Retry-After); other refusals
// (401 wrong key, 409 finished task) are not. Failures go to stderr (never the key) and are
// counted in `reporter.stats`. Pending sends keep the process alive until they finish.
//
// CLI (used by the tests): node taskcast_reporter.mjs --url U --key K --task T [--stage S]
// walks task T to completed, then exits 0 after flush whether or not progress got through.
import { parseArgs } from "node:util";
import { pathToFileURL } from "node:url";

const FINAL = ["completed", "failed", "cancelled"];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const note = (text) => console.error(`taskcast_reporter: ${text}`);

export class Reporter {
  constructor(url, key, { capacity = 1024, timeoutMs = 5000, attempts = 5, backoffMs = 200,
                          backoffMaxMs = 5000 } = {}) {
    Object.assign(this, { timeoutMs, attempts, backoffMs, backoffMaxMs });
    this.capacity = Math.max(1, capacity);
    this.url = url.replace(/\/+$/, "");
    this.key = String(key ?? "").trim();
    this.stats = { sent: 0, retried: 0, dropped: 0, failed: 0, conflated: 0 };
    this.waiting = new Map(); // task id -> latest update, oldest task first
    this.running = false;
    this.seq = 0;
    this.lostAtFlush = 0;
    this.idle = []; // resolvers of pending flush() calls
  }

  /** Queue an update for taskId and return at once. Never throws. */
  report(taskId, fields = {}) {
    try {
      // Any field is sent: the server refuses a misspelt one with a message (stderr).
      const update = Object.fromEntries(Object.entries(fields).filter(([, v]) => v != null));
      if (Object.keys(update).length === 0) return;
      // Microseconds since the epoch: still increasing after a generator restart.
      this.seq = update.seq = Math.max(this.seq + 1, Date.now() * 1000);
      const task = String(taskId);
      if (this.waiting.has(task)) {
        Object.assign(this.waiting.get(task), update);
        this.stats.conflated++;
      } else {
        if (this.waiting.size >= this.capacity) {
          const entries = [...this.waiting];
          const victim = entries.find(([, u]) => !FINAL.includes(u.status)) ?? entries[0];
          this.waiting.delete(victim[0]);
          this.stats.dropped++;
        }
        this.waiting.set(task, update);
      }
      if (!this.running) this.#run().catch((e) => note(`unexpected error: ${e}`));
    } catch (e) {
      note(`report failed: ${e}`); // the generation must go on
    }
  }

  /** Resolves when nothing is queued or in flight, or after timeoutMs: true if drained and
   * nothing was dropped or failed since the previous flush. Never rejects. */
  async flush(timeoutMs = 5000) {
    let timer;
    const drained = this.running || this.waiting.size
      ? await Promise.race([
          new Promise((resolve) => this.idle.push(() => resolve(true))),
          new Promise((resolve) => { timer = setTimeout(() => resolve(false), timeoutMs); }),
        ])
      : true;
    clearTimeout(timer);
    const lost = this.stats.dropped + this.stats.failed;
    const ok = drained && lost === this.lostAtFlush;
    this.lostAtFlush = lost;
    return ok;
  }

  async #run() {
    this.running = true;
    try {
      while (this.waiting.size) {
        const [task, update] = this.waiting.entries().next().value;
        this.waiting.delete(task);
        await this.#deliver(task, update);
      }
    } finally {
      this.running = false;
      this.idle.splice(0).forEach((resolve) => resolve());
    }
  }

  async #deliver(task, update) {
    for (let attempt = 1; ; attempt++) {
      if (attempt > 1) {
        if (this.waiting.has(task)) { // a newer update waits: fold this one into it
          this.waiting.set(task, { ...update, ...this.waiting.get(task) });
          this.stats.conflated++;
          return;
        }
        this.stats.retried++;
      }
      const { retry, why, after } = await this.#send(task, update);
      if (why === undefined) return void this.stats.sent++;
      if (!retry || attempt >= this.attempts) {
        const failed = ++this.stats.failed;
        if ((failed & (failed - 1)) !== 0) return; // noted at the 1st, 2nd, 4th... failure
        const soFar = `${attempt} attempts, ${failed} failed so far`;
        return note(`progress for task ${task} not delivered (${soFar}): ${why}`);
      }
      const step = Math.min(this.backoffMs * 2 ** (attempt - 1), this.backoffMaxMs);
      await sleep(Math.max(step / 2 + (Math.random() * step) / 2, Math.min(after, 60) * 1000));
    }
  }

  async #send(task, update) {
    try {
      const response = await fetch(`${this.url}/api/tasks/${encodeURIComponent(task)}/progress`, {
        method: "POST",
        headers: { authorization: `Bearer ${this.key}`, "content-type": "application/json" },
        body: JSON.stringify(update),
        signal: AbortSignal.timeout(this.timeoutMs),
      });
      if (response.ok) return {};
      const body = await response.json().catch(() => ({}));
      const after = Number(response.headers.get("retry-after")) || 0;
      const retry = response.status >= 500 || response.status === 429;
      const why = `${response.status} ${response.statusText}: ${body.message ?? ""}`;
      return { retry, why, after };
    } catch (e) { // refused, reset, timed out, DNS
      const why = `${e.cause?.code ?? e.name}: ${e.cause?.message ?? e.message}`;
      return { retry: true, why, after: 0 };
    }
  }
}

async function main() {
  const { values: args } = parseArgs({
    options: {
      url: { type: "string", default: "http://127.0.0.1:8080" },
      key: { type: "string", default: process.env.TASK_PROCESS_SECRET_KEY ?? "development-key" },
      task: { type: "string" },
      stage: { type: "string", default: "done" },
      delay: { type: "string", default: "20" }, // milliseconds between updates
    },
  });
  if (!args.task) {
    note("usage: --url U --key K --task T [--stage S] [--delay MS]");
    return 2;
  }
  const reporter = new Reporter(args.url, args.key);
  reporter.report(args.task, { status: "pending", stage: "queued" });
  for (let percent = 0; percent <= 100; percent += 10) {
    reporter.report(args.task, { status: "processing", stage: "generating", progress: percent });
    await sleep(Number(args.delay));
  }
  reporter.report(args.task, { stage: "uploading" });
  const image_url = `https://cdn.example.com/taskcast/${args.task}.png`;
  reporter.report(args.task, { status: "completed", progress: 100, stage: args.stage, image_url });
  if (!(await reporter.flush(10000))) {
    note("some progress was not delivered; the generation itself is not affected");
  }
  console.log(JSON.stringify(reporter.stats));
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main();
}
