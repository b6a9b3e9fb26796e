// taskcast reporter for Node generators: push progress, and learn from each push's answer
// whether a subscriber asked to cancel the task. No dependencies (global fetch, Node >= 20).
//
//   import { Reporter } from "@taskcast/client/reporter";
//   const reporter = new Reporter("http://127.0.0.1:8080", process.env.TASK_PROCESS_SECRET_KEY);
//   for (let step = 1; step <= 30; step++) {
//     await denoise(step);
//     await reporter.push(taskId, { status: "processing", progress: (100 * step) / 30 });
//     if (reporter.isCancelRequested(taskId)) {
//       await reporter.push(taskId, { status: "cancelled" });
//       break;
//     }
//   }
//
// Each push carries a `seq` (microseconds since the epoch, increasing), so a retried push
// the server already applied is answered without being applied twice. Network errors, 5xx
// and 429 are retried with capped exponential backoff and jitter (honouring Retry-After);
// other refusals (401 wrong key, 409 finished task) throw at once.

const FINAL = new Set(["completed", "failed", "cancelled"]);

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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class Reporter {
  /**
   * `url`: taskcast's base URL; `key`: the push key (TASK_PROCESS_SECRET_KEY). Options:
   * attempts (5), backoffMs (200), backoffMaxMs (5000), timeoutMs per request (5000).
   */
  constructor(url, key, { attempts = 5, backoffMs = 200, backoffMaxMs = 5000, timeoutMs = 5000 } = {}) {
    if (typeof fetch !== "function") throw new TypeError("Reporter needs a global fetch (Node 18 or newer)");
    this.url = String(url).replace(/\/+$/, "");
    this.key = String(key ?? "").trim();
    this.options = { attempts: Math.max(1, attempts), backoffMs, backoffMaxMs, timeoutMs };
    this.cancelRequested = new Set();
  }

  /**
   * Pushes `fields` (progress, stage, status, image_url, error, step, total_steps,
   * preview_url) for `taskId`; resolves to the committed state (`cancel_requested: true`
   * once a subscriber asked to cancel). Throws a ReporterError when refused or when every
   * attempt failed.
   */
  async push(taskId, fields) {
    const id = String(taskId);
    const final = FINAL.has(fields?.status);
    if (final) this.cancelRequested.delete(id);
    const body = JSON.stringify({ ...fields, seq: nextSeq() });
    const url = `${this.url}/api/tasks/${encodeURIComponent(id)}/progress`;
    for (let attempt = 1; ; attempt++) {
      let retryAfterMs = 0;
      let failure;
      let response = null;
      try {
        response = await fetch(url, {
          method: "POST",
          headers: { authorization: `Bearer ${this.key}`, "content-type": "application/json" },
          body,
          signal: AbortSignal.timeout(this.options.timeoutMs),
        });
      } catch (e) {
        failure = new ReporterError("unavailable", `push failed: ${e?.message ?? e}`, { taskId: id });
      }
      if (response) {
        const answer = await response.json().catch(() => null);
        if (response.ok) {
          if (!final && answer?.cancel_requested === true) this.cancelRequested.add(id);
          return answer;
        }
        failure = new ReporterError(answer?.error ?? "http_error", answer?.message ?? `HTTP ${response.status}`, {
          status: response.status,
          hint: answer?.hint ?? "",
          taskId: id,
        });
        if (response.status < 500 && response.status !== 429) throw failure;
        const after = Number(response.headers.get("retry-after"));
        if (Number.isFinite(after) && after > 0) retryAfterMs = Math.min(after, 60) * 1000;
      }
      if (attempt >= this.options.attempts) {
        failure.message += ` (after ${attempt} attempts)`;
        throw failure;
      }
      const step = Math.min(this.options.backoffMs * 2 ** (attempt - 1), this.options.backoffMaxMs);
      await sleep(Math.max(step / 2 + (Math.random() * step) / 2, retryAfterMs));
    }
  }

  /**
   * True once the answer to a push for `taskId` said `cancel_requested: true`: a subscriber
   * asked to stop it. Stop between steps and push `{status: "cancelled"}`.
   */
  isCancelRequested(taskId) {
    return this.cancelRequested.has(String(taskId));
  }
}
