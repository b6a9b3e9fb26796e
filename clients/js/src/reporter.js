// taskcast reporter for Node generators, with no dependencies (global fetch, Node >= 20).
//
//   import { Reporter } from "@taskcast/client/reporter";
//   const reporter = new Reporter("http://127.0.0.1:8080", process.env.TASK_PROCESS_SECRET_KEY);
//
// Fire and forget: report() queues and returns at once, never throws; flush() waits.
//
//   reporter.report(taskId, { status: "processing", stage: "generating", progress: 40 });
//   reporter.report(taskId, { status: "completed", progress: 100, image_url: url });
//   await reporter.flush(5000); // true if everything was delivered
//
// Or awaited: push() resolves to the committed state and throws a ReporterError when refused.
//
//   await reporter.push(taskId, { status: "processing", progress: (100 * step) / 30 });
//   if (reporter.isCancelRequested(taskId)) await reporter.push(taskId, { status: "cancelled" });
//
// Both go through one queue: updates waiting for one task merge (newest field wins); at
// most `capacity` tasks wait (the oldest unfinished one is dropped); one request is in
// flight at a time, so never two for one task. A lone update goes out at once; updates of
// several tasks that wait together go in one `POST /api/progress` (up to `maxBatch` items
// and about `maxBatchBytes` of JSON), whose items are answered one by one. Every update
// carries a `seq` (microseconds since the epoch, increasing), so a retry the server already
// applied is not applied twice. Network errors, 5xx and 429, for a whole request or one
// item, and timeouts (408 included), are retried with capped exponential backoff and
// jitter (honouring Retry-After); other refusals (401 wrong key, 409 finished task) are
// not, and a refused item fails alone. A batch the server refuses whole for its size (413
// over TASKCAST_MAX_BATCH_BODY_BYTES, or 400 over TASKCAST_MAX_BATCH_ITEMS) is not failed:
// the reporter lowers its cap (items or bytes) for the rest of its life, to the limit the
// server named or else to half of what was refused, says once on stderr which limit it
// met, and sends the same updates again at once in smaller requests (alone, when it comes
// to that); this is not counted as a retry. A lone update answered 413 is refused: it is
// too large itself. Failures of report() go to stderr (never the key); `stats` counts per
// update.

const FINAL = new Set(["completed", "failed", "cancelled"]);

// The settings a batch refused whole for its size went over: the 400 for too many updates
// names the first, the 413 for too large a body the second.
const ITEMS_SETTING = "TASKCAST_MAX_BATCH_ITEMS";
const BYTES_SETTING = "TASKCAST_MAX_BATCH_BODY_BYTES";
// Bytes of a batch body besides its items (`{"updates":[` and `]}`), with room to spare.
const BATCH_BODY_OVERHEAD = 32;

/** UTF-8 bytes, as the body is sent (not `.length`, which counts UTF-16 units). */
const encoder = new TextEncoder();
const byteLength = (text) => (typeof Buffer === "function" ? Buffer.byteLength(text) : encoder.encode(text).length);

/** The bytes of one update as an item of `POST /api/progress`, the separator after it included. */
const itemBytes = (task, update) => byteLength(JSON.stringify(update)) + byteLength(JSON.stringify(task)) + 12;

/** A push that was refused, or that still failed after every attempt. */
export class ReporterError extends Error {
  constructor(code, message, { status = 0, hint = "", taskId = null } = {}) {
    super(message);
    this.name = "ReporterError";
    this.code = code;
    this.status = status;
    this.hint = hint;
    this.taskId = taskId;
  }
}

let lastSeq = 0;
function nextSeq() {
  lastSeq = Math.max(lastSeq + 1, Date.now() * 1000);
  return lastSeq;
}

const note = (text) => console.error(`taskcast: ${text}`);

/** The merged update waiting for one task, the push() calls waiting on it, its attempts. */
class Entry {
  constructor(update) {
    this.update = update;
    this.waiters = [];
    this.sends = 0;
    this.notBefore = 0;
  }

  settle(error, state) {
    for (const { resolve, reject } of this.waiters.splice(0)) error ? reject(error) : resolve(state);
  }
}

export class Reporter {
  /**
   * `url`: taskcast's base URL; `key`: the push key (TASK_PROCESS_SECRET_KEY). Options:
   * capacity (1024), attempts (5), backoffMs (200), backoffMaxMs (5000), timeoutMs per
   * request (5000), maxBatch (100) and maxBatchBytes (256 KiB) per request.
   */
  constructor(
    url,
    key,
    {
      capacity = 1024,
      attempts = 5,
      backoffMs = 200,
      backoffMaxMs = 5000,
      timeoutMs = 5000,
      maxBatch = 100,
      maxBatchBytes = 256 * 1024,
    } = {},
  ) {
    if (typeof fetch !== "function") throw new TypeError("Reporter needs a global fetch (Node 20 or newer)");
    this.url = String(url).replace(/\/+$/, "");
    this.key = String(key ?? "").trim();
    this.options = {
      capacity: Math.max(1, capacity),
      attempts: Math.max(1, attempts),
      backoffMs,
      backoffMaxMs,
      timeoutMs,
      maxBatch: Math.max(1, maxBatch),
      maxBatchBytes,
    };
    /** Counts per update: sent; retried (sent again after a network error, timeout, 5xx or
     * 429); dropped; failed; conflated (merged into a newer update of its task, while
     * waiting or instead of a retry); batches: requests to `POST /api/progress`. */
    this.stats = { sent: 0, retried: 0, dropped: 0, failed: 0, conflated: 0, batches: 0 };
    this.cancelRequested = new Set();
    this.refused = new Map(); // task id -> why taskcast refused it as finished
    this.waiting = new Map(); // task id -> Entry, oldest task first
    this.running = false;
    this.wake = null;
    this.idle = []; // resolvers of pending flush() calls
    this.lostAtFlush = 0;
    this.limitsMet = new Set(); // the size limits a batch was refused for, said once each
  }

  /** Queues `fields` for `taskId` and returns at once. Never throws. */
  report(taskId, fields = {}) {
    try {
      this.#add(String(taskId), fields);
    } catch (e) {
      note(`report failed: ${e}`); // the generation must go on
    }
  }

  /**
   * Pushes `fields` (progress, stage, status, image_url, error, step, total_steps,
   * preview_url) for `taskId`; resolves to the committed state (`cancel_requested: true`
   * once a subscriber asked to cancel). Throws a ReporterError when refused or when every
   * attempt failed. Merged with the task's update already waiting, if any.
   */
  push(taskId, fields) {
    return new Promise((resolve, reject) => {
      const entry = this.#add(String(taskId), fields ?? {});
      if (!entry) return reject(new ReporterError("invalid_input", "nothing to push: every field is empty"));
      entry.waiters.push({ resolve, reject });
    });
  }

  /**
   * True once the answer to a push for `taskId` said `cancel_requested: true`: a subscriber
   * asked to stop it. Stop between steps and push `{status: "cancelled"}`.
   */
  isCancelRequested(taskId) {
    return this.cancelRequested.has(String(taskId));
  }

  /** Why taskcast refused this task's pushes as finished (409), or null. */
  finished(taskId) {
    return this.refused.get(String(taskId)) ?? null;
  }

  /** Resolves when nothing is queued or in flight, or after timeoutMs: true if drained and
   * nothing was dropped or failed since the previous flush. Never rejects. */
  async flush(timeoutMs = 5000) {
    let timer;
    const drained =
      this.running || this.waiting.size
        ? await Promise.race([
            new Promise((resolve) => this.idle.push(() => resolve(true))),
            new Promise((resolve) => (timer = setTimeout(resolve, timeoutMs, false))),
          ])
        : true;
    clearTimeout(timer);
    const lost = this.stats.dropped + this.stats.failed;
    const ok = drained && lost === this.lostAtFlush;
    this.lostAtFlush = lost;
    return ok;
  }

  #add(task, fields) {
    // Any field is sent: the server refuses a misspelt one with a message.
    const update = Object.fromEntries(Object.entries(fields).filter(([, v]) => v != null));
    if (Object.keys(update).length === 0) return null;
    if (FINAL.has(update.status)) this.cancelRequested.delete(task);
    update.seq = nextSeq();
    let entry = this.waiting.get(task);
    if (entry) {
      Object.assign(entry.update, update);
      entry.sends = 0; // a new update gets its own attempts
      this.stats.conflated++;
    } else {
      if (this.waiting.size >= this.options.capacity) {
        const entries = [...this.waiting];
        const [victim, dropped] = entries.find(([, e]) => !FINAL.has(e.update.status)) ?? entries[0];
        this.waiting.delete(victim);
        this.stats.dropped++;
        dropped.settle(new ReporterError("dropped", `dropped: more than ${this.options.capacity} tasks waiting`, { taskId: victim }));
      }
      entry = new Entry(update);
      this.waiting.set(task, entry);
    }
    if (this.wake) this.wake();
    if (!this.running) this.#run().catch((e) => note(`unexpected error: ${e}`));
    return entry;
  }

  async #run() {
    this.running = true;
    try {
      // One microtask: updates reported in the same turn (a loop over tasks) go together.
      await null;
      while (this.waiting.size) {
        const { batch, wait } = this.#take(Date.now());
        if (batch.length === 0) {
          await new Promise((resolve) => {
            const timer = setTimeout(resolve, wait);
            this.wake = () => (clearTimeout(timer), resolve());
          });
          this.wake = null;
          continue;
        }
        if (batch.length > 1) this.stats.batches++;
        const outcomes = await this.#send(batch);
        if (batch.length > 1 && outcomes[0]?.tooLarge) {
          this.#split(batch, outcomes[0]);
          continue;
        }
        const jitter = Math.random(); // one per exchange: what failed together retries together
        batch.forEach(([task, entry], i) => this.#settle(task, entry, outcomes[i], jitter));
      }
    } finally {
      this.running = false;
      this.idle.splice(0).forEach((resolve) => resolve());
    }
  }

  /** Removes the due entries, oldest first, within maxBatch and maxBatchBytes (at least
   * one); when none is due, the milliseconds until one is. */
  #take(now) {
    const batch = [];
    let size = 0;
    let wait = Infinity;
    for (const [task, entry] of this.waiting) {
      if (entry.notBefore > now) {
        wait = Math.min(wait, entry.notBefore - now);
        continue;
      }
      size += itemBytes(task, entry.update);
      if (batch.length && size > this.options.maxBatchBytes) break;
      batch.push([task, entry]);
      if (batch.length >= this.options.maxBatch) break;
    }
    for (const [task] of batch) this.waiting.delete(task);
    return { batch, wait };
  }

  /**
   * A batch refused whole for its size, none of its updates looked at: lowers the cap it
   * went over for good (to the limit the server named, else to half of what was sent),
   * says so once per limit, and puts the updates back at the head of the queue to go again
   * at once in smaller requests. Not an attempt: nothing is counted, except an update
   * folded into a newer one (conflated).
   */
  #split(batch, refused) {
    const [setting, named] = refused.tooLarge;
    let cap;
    if (setting === ITEMS_SETTING) {
      const sent = batch.length;
      const lowered = Math.max(1, named > 0 && named < sent ? named : Math.floor(sent / 2));
      this.options.maxBatch = Math.min(this.options.maxBatch, lowered);
      cap = `${this.options.maxBatch} updates`;
    } else {
      const sent = batch.reduce((sum, [task, entry]) => sum + itemBytes(task, entry.update), 0);
      const limit = named - BATCH_BODY_OVERHEAD;
      const lowered = Math.max(1, limit > 0 && limit < sent ? limit : Math.floor(sent / 2));
      this.options.maxBatchBytes = Math.min(this.options.maxBatchBytes, lowered);
      cap = `${this.options.maxBatchBytes} bytes of updates`;
    }
    if (!this.limitsMet.has(setting)) {
      this.limitsMet.add(setting);
      note(`the server refused a batch of ${batch.length} updates as too large (${setting}): ${refused.why}; from now on at most ${cap} go in one request`);
    }
    const back = [];
    for (const [task, entry] of batch) {
      const newer = this.waiting.get(task);
      if (newer) {
        // Reported again meanwhile: fold this one under it.
        newer.update = { ...entry.update, ...newer.update };
        newer.waiters.unshift(...entry.waiters);
        this.stats.conflated++;
      } else {
        back.push([task, entry]);
      }
    }
    this.waiting = new Map([...back, ...this.waiting]);
  }

  #settle(task, entry, outcome, jitter) {
    if (outcome.ok) {
      this.stats.sent++;
      if (outcome.state?.cancel_requested === true && !FINAL.has(entry.update.status)) this.cancelRequested.add(task);
      return entry.settle(null, outcome.state);
    }
    if (outcome.code === "task_finished") this.refused.set(task, outcome.message);
    entry.sends++;
    if (outcome.retry && entry.sends < this.options.attempts) {
      const newer = this.waiting.get(task);
      if (newer) {
        // A newer update waits: fold this one under it (its fields win, its seq is newer);
        // counted as conflated, not retried.
        newer.update = { ...entry.update, ...newer.update };
        newer.waiters.unshift(...entry.waiters);
        this.stats.conflated++;
        return;
      }
      this.stats.retried++;
      const { backoffMs, backoffMaxMs } = this.options;
      const step = Math.min(backoffMs * 2 ** (entry.sends - 1), backoffMaxMs);
      entry.notBefore = Date.now() + Math.max(step / 2 + (jitter * step) / 2, Math.min(outcome.after, 60) * 1000);
      this.waiting.set(task, entry);
      return;
    }
    const failed = ++this.stats.failed;
    const retried = outcome.retry ? ` (after ${entry.sends} attempts)` : "";
    const error = new ReporterError(outcome.code || "http_error", `${outcome.message}${retried}`, {
      status: outcome.status,
      hint: outcome.hint,
      taskId: task,
    });
    if (entry.waiters.length) return entry.settle(error);
    if ((failed & (failed - 1)) === 0) {
      // the 1st, 2nd, 4th... failure
      const soFar = `${entry.sends} attempts, ${failed} failed so far`;
      note(`progress for task ${task} not delivered (${soFar}): ${outcome.why}`);
    }
  }

  /** One outcome per entry, in order: one task to its own route, several to the batch. */
  async #send(batch) {
    if (batch.length === 1) {
      const [[task, entry]] = batch;
      const { outcome, answer } = await this.#post(`/api/tasks/${encodeURIComponent(task)}/progress`, entry.update);
      if (outcome.ok) outcome.state = answer;
      return [outcome];
    }
    const updates = batch.map(([task, entry]) => ({ task_id: task, ...entry.update }));
    const { outcome, answer } = await this.#post("/api/progress", { updates });
    if (!outcome.ok) return batch.map(() => outcome);
    const results = answer?.results;
    if (!Array.isArray(results) || results.length !== batch.length) {
      const broken = failure(500, "internal", "the batch answer has no results");
      return batch.map(() => broken);
    }
    return results.map((item) =>
      item?.status === 200
        ? { ok: true, state: item.state }
        : failure(item?.status ?? 0, item?.error, item?.message, item?.hint),
    );
  }

  async #post(path, payload) {
    try {
      const response = await fetch(this.url + path, {
        method: "POST",
        headers: { authorization: `Bearer ${this.key}`, "content-type": "application/json" },
        body: JSON.stringify(payload),
        signal: AbortSignal.timeout(this.options.timeoutMs),
      });
      const answer = await response.json().catch(() => null);
      if (response.ok) return { outcome: { ok: true }, answer };
      const outcome = failure(response.status, answer?.error, answer?.message ?? response.statusText, answer?.hint);
      outcome.tooLarge = sizeRefusal(response.status, answer);
      const after = Number(response.headers.get("retry-after"));
      if (Number.isFinite(after) && after > 0) outcome.after = after;
      return { outcome };
    } catch (e) {
      // refused, reset, timed out, DNS
      const why = `${e.cause?.code ?? e.name}: ${e.cause?.message ?? e.message}`;
      return { outcome: failure(0, "unavailable", `push failed: ${why}`) };
    }
  }
}

/** A failed update: retried when there was no answer, or 408 (the body timed out), 5xx or 429. */
function failure(status, code, message = "", hint = "") {
  const retry = status === 0 || status === 408 || status === 429 || status >= 500;
  const why = status ? `${status} ${code ?? ""}: ${message}` : message;
  return { ok: false, retry, status, code: code ?? "", message, hint: hint ?? "", why, after: 0 };
}

/**
 * Whether an error answer refuses the request for its size: a 413 (the server's says "the
 * body is larger than the limit of N bytes (TASKCAST_MAX_BATCH_BODY_BYTES)"; a proxy's may
 * name nothing), or a 400 `invalid_input` naming TASKCAST_MAX_BATCH_ITEMS ("send from 1 to
 * N updates per request (...), got M"). Any other 400 is about the request's shape, which
 * smaller requests would not change. `[setting, N]` (N 0 when unnamed), or null.
 */
function sizeRefusal(status, answer) {
  const message = typeof answer?.message === "string" ? answer.message : "";
  const after = (marker) => Number(message.split(marker)[1]?.match(/^\d+/)?.[0] ?? 0);
  if (status === 413) return [BYTES_SETTING, after("limit of ")];
  if (status === 400 && answer?.error === "invalid_input" && message.includes(ITEMS_SETTING)) {
    return [ITEMS_SETTING, after(" to ")];
  }
  return null;
}
