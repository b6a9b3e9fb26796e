// taskcast client: watch tasks live, with no dependencies. This one file is both the npm
// package @taskcast/client (clients/js; types in index.d.ts, React hook in react.js) and
// what the server serves at GET /client.js (compiled in with include_str!).
//
//   import { watchTask } from "@taskcast/client";  // or "https://taskcast.example.com/client.js"
//   const handle = watchTask(taskId, {
//     url: "https://taskcast.example.com", // needed unless loaded from the server's /client.js
//     token,                             // from POST /api/tasks (minted by your server)
//     getToken: () => fetchFreshToken(), // optional; may return a Promise
//     onState: (state) => render(state), // {task_id, progress, stage, status, version, ...}
//     onError: (error) => console.warn(error.code, error.message, error.fatal),
//   });
//   await handle.cancel();               // ask to stop the generation (needs a token with the
//                                        // cancel right, or the owner's Supabase session)
//   handle.close();                      // stop watching (it also stops by itself when the
//                                        // task is completed, failed or cancelled)
//
// All tasks watched against one server share one WebSocket (ref-counted). After every
// reconnect the server's snapshot is the truth; otherwise a state whose version is not
// newer than the last one seen is ignored, so a task never goes backwards; the one
// exception is a place-in-line update (`derived: true`): the same version with a new
// `queue_position` and `queue_length`, passed on as the state it updates. When a
// WebSocket cannot be opened while the server itself answers HTTP (a proxy that drops
// Upgrade, say), or when WebSocket does not exist, each task is streamed over
// Server-Sent Events (GET /api/tasks/{id}/events) instead.
//
// watchUser(userId, {token | getToken, onTask, onSnapshot, onError, onConnection, url})
// watches every task of one user (the feed `user:<uuid>`, on the same socket): a snapshot
// of the user's unfinished tasks and latest finished ones (onTask for each, then
// onSnapshot with them all), then every change to any of them, tasks created later
// included. Per task the same rules as watchTask: a snapshot is the truth, otherwise a
// version not newer than the last one seen is ignored. A feed never ends by itself.
//
// `url` defaults to the folder this module was loaded from (so a page that imports
// https://host/client.js talks to https://host). A copy bundled into an app (the npm
// package included) must pass `url` explicitly, as "https://host" or "wss://host".

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
// Errors a fresh token (getToken) may cure.
const TOKEN_ERRORS = new Set(["token_expired", "token_invalid", "token_required", "forbidden"]);
// Errors worth retrying later on the same subscription.
const TRANSIENT_ERRORS = new Set(["limit_exceeded", "unavailable", "internal"]);

/** Backoff and fallback settings; exported so tests and apps can tune them. */
export const settings = {
  minDelayMs: 500, // first reconnect waits 0.5x..1x of this
  maxDelayMs: 15000, // the cap of the exponential backoff
  wsFailuresBeforeSse: 3, // failed WS opens, with the server reachable, before SSE
  maxTokenRefreshes: 3, // consecutive refreshes that did not help before giving up
  lingerMs: 1000, // an unused socket is kept this long for the next watchTask
  cancelTimeoutMs: 10000, // a cancel sent on the socket and not answered by then is rejected
};

const connections = new Map(); // http base URL -> Connection

/** Whether a status is final: completed, failed or cancelled. */
export function isTerminal(status) {
  return TERMINAL.has(status);
}

/** An error from the server (code, message, hint) or from the client itself. */
export class TaskcastError extends Error {
  constructor(code, message, { hint = "", taskId = null, fatal = false } = {}) {
    super(message);
    this.name = "TaskcastError";
    this.code = code;
    this.hint = hint;
    this.taskId = taskId;
    this.fatal = fatal;
  }
}

/**
 * Watches one task. Options: token, getToken, onState(state), onError(TaskcastError),
 * onConnection({connected, transport}), url. Returns {taskId, state, close()}.
 */
export function watchTask(taskId, options = {}) {
  if (typeof taskId !== "string" || taskId === "") {
    throw new TypeError("watchTask: taskId must be a non-empty string (the task's UUID)");
  }
  const connection = connectionFor(options.url);
  const watcher = new Watcher(taskId, options);
  connection.add(watcher);
  return {
    taskId,
    get state() {
      return watcher.state;
    },
    close: () => connection.remove(watcher),
    cancel: () => connection.cancel(watcher),
  };
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/**
 * Watches every task of one user: the feed `user:<userId>`. Options: token (a feed token
 * with claim user_id, or the user's Supabase access token), getToken, onTask(state),
 * onSnapshot(states), onError(TaskcastError), onConnection({connected, transport}), url.
 * Returns {userId, tasks (a Map of task id to its latest state), close()}.
 */
export function watchUser(userId, options = {}) {
  if (typeof userId !== "string" || !UUID.test(userId)) {
    throw new TypeError("watchUser: userId must be the user's UUID");
  }
  const connection = connectionFor(options.url);
  const watcher = new Watcher(`user:${userId.toLowerCase()}`, options, true);
  connection.add(watcher);
  return {
    userId,
    get tasks() {
      return new Map(watcher.tasks);
    },
    close: () => connection.remove(watcher),
  };
}

// The one shared connection to the server at `url` (see the header).
function connectionFor(url) {
  const base = endpoints(url);
  let connection = connections.get(base.http);
  if (!connection) {
    connection = new Connection(base);
    connections.set(base.http, connection);
  }
  return connection;
}

function endpoints(url) {
  const given = url != null;
  const u = given
    ? new URL(String(url), typeof location === "undefined" ? undefined : location.href)
    : new URL(".", import.meta.url);
  const scheme = { "ws:": "http:", "wss:": "https:" }[u.protocol] || u.protocol;
  if (scheme !== "http:" && scheme !== "https:") {
    throw new TypeError(`watchTask: url must be http(s) or ws(s), got ${u.protocol}`);
  }
  const path = u.pathname.replace(/\/+$/, "").replace(/\/ws$/, "");
  return {
    http: `${scheme}//${u.host}${path}`,
    ws: `${scheme === "https:" ? "wss:" : "ws:"}//${u.host}${path}/ws`,
  };
}

/** `POST /api/tasks/{id}/cancel` with `token` as `Authorization: Bearer`. */
async function cancelOverHttp(base, taskId, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(`${base.http}/api/tasks/${encodeURIComponent(taskId)}/cancel`, {
    method: "POST",
    headers,
    cache: "no-store",
  });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    throw new TaskcastError(body?.error ?? "unavailable", body?.message ?? `HTTP ${response.status}`, {
      hint: body?.hint ?? "",
      taskId,
    });
  }
  const { task_id, version, cancel_requested_at, applied } = body;
  return { task_id, version, cancel_requested_at, applied };
}

function backoff(attempt) {
  const ceiling = Math.min(settings.maxDelayMs, settings.minDelayMs * 2 ** Math.min(attempt, 20));
  return ceiling * (0.5 + Math.random() / 2);
}

// A throwing callback must not break the client: rethrow it on its own turn.
function call(fn, ...args) {
  if (typeof fn !== "function") return;
  try {
    fn(...args);
  } catch (e) {
    setTimeout(() => {
      throw e;
    });
  }
}

/** One watchTask or watchUser call: its callbacks and whether it has ended. */
class Watcher {
  // `taskId` is the subscription's id: a task's, or `user:<uuid>` for a feed.
  constructor(taskId, options, feed = false) {
    this.taskId = taskId;
    this.options = options;
    this.state = null;
    this.feed = feed;
    this.tasks = feed ? new Map() : null; // a feed's latest state per task
    this.ended = false;
  }
  deliver(state) {
    if (this.ended) return;
    if (this.feed) {
      this.tasks.set(state.task_id, state);
      call(this.options.onTask, state);
      return;
    }
    this.state = state;
    call(this.options.onState, state);
  }
  snapshotDone() {
    if (!this.ended && this.feed) call(this.options.onSnapshot, [...this.tasks.values()]);
  }
  fail(error) {
    if (!this.ended) call(this.options.onError, error);
  }
  connection(info) {
    if (!this.ended) call(this.options.onConnection, info);
  }
}

/** One task on a connection, shared by every watcher of it. */
class Subscription {
  constructor(taskId, watcher) {
    this.taskId = taskId;
    this.watchers = new Set();
    this.token = watcher.options.token ?? null;
    this.getToken = null;
    this.state = null; // the last state delivered
    this.feed = watcher.feed;
    this.states = watcher.feed ? new Map() : null; // a feed's last state per task
    this.sent = false; // a subscribe went out on the current socket
    this.refreshing = false;
    this.refreshes = 0;
    this.attempt = 0; // for this subscription's own retries
    this.timer = null;
    this.source = null; // the EventSource, in SSE mode
  }
  clearTimer() {
    clearTimeout(this.timer);
    this.timer = null;
  }
}

/** A shared transport to one server: a WebSocket, or one EventSource per task. */
class Connection {
  constructor(base) {
    this.base = base;
    this.subs = new Map();
    this.socket = null;
    this.open = false;
    this.attempt = 0;
    this.wsFailures = 0;
    this.timer = null;
    this.lingerTimer = null;
    this.mode = typeof WebSocket === "function" ? "websocket" : "sse";
    this.connected = null;
    this.cancels = new Map(); // task id -> cancel requests waiting for their answer, in order
    this.onOnline = () => {
      if (this.timer !== null) {
        this.clearTimer();
        this.connect();
      }
    };
    if (typeof addEventListener === "function") addEventListener("online", this.onOnline);
  }

  add(watcher) {
    clearTimeout(this.lingerTimer);
    this.lingerTimer = null;
    let sub = this.subs.get(watcher.taskId);
    const fresh = !sub;
    if (fresh) {
      sub = new Subscription(watcher.taskId, watcher);
      this.subs.set(sub.taskId, sub);
    }
    sub.watchers.add(watcher);
    if (!sub.token && watcher.options.token) sub.token = watcher.options.token;
    if (!sub.getToken && typeof watcher.options.getToken === "function") {
      sub.getToken = watcher.options.getToken;
    }
    if (this.connected !== null) {
      const info = this.connected;
      queueMicrotask(() => watcher.connection(info));
    }
    if (!fresh) {
      // A later watcher of the same task starts from what the others already have.
      if (sub.feed) {
        const states = [...sub.states.values()].map((s) => ({ ...s, snapshot: true }));
        queueMicrotask(() => states.forEach((s) => watcher.deliver(s)));
      } else if (sub.state) {
        const state = { ...sub.state, snapshot: true };
        queueMicrotask(() => watcher.deliver(state));
      }
      return;
    }
    if (!sub.token && sub.getToken) {
      this.refreshToken(sub, null);
    } else if (this.mode === "sse") {
      this.openStream(sub);
    } else if (this.open) {
      this.sendSubscribe(sub);
    } else if (!this.socket && this.timer === null) {
      this.connect();
    }
  }

  remove(watcher) {
    const sub = this.subs.get(watcher.taskId);
    watcher.ended = true;
    if (!sub || !sub.watchers.delete(watcher) || sub.watchers.size > 0) return;
    this.drop(sub);
  }

  // Ends a subscription: no more messages, nothing held for it.
  drop(sub) {
    for (const watcher of sub.watchers) watcher.ended = true;
    sub.watchers.clear();
    sub.clearTimer();
    if (sub.source) sub.source.close();
    sub.source = null;
    if (this.subs.get(sub.taskId) === sub) this.subs.delete(sub.taskId);
    if (sub.sent && this.open) this.send({ type: "unsubscribe", task_id: sub.taskId });
    sub.sent = false;
    if (this.subs.size === 0 && this.lingerTimer === null) {
      this.lingerTimer = setTimeout(() => this.dispose(), settings.lingerMs);
    }
  }

  dispose() {
    this.lingerTimer = null;
    if (this.subs.size > 0) return;
    this.clearTimer();
    if (connections.get(this.base.http) === this) connections.delete(this.base.http);
    if (typeof removeEventListener === "function") removeEventListener("online", this.onOnline);
    const socket = this.socket;
    this.socket = null;
    this.open = false;
    if (socket) socket.close(1000, "no more tasks");
  }

  clearTimer() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  setConnected(connected) {
    const info = { connected, transport: this.mode };
    if (this.connected && this.connected.connected === connected && this.connected.transport === this.mode) {
      return;
    }
    this.connected = info;
    for (const sub of this.subs.values()) for (const w of sub.watchers) w.connection(info);
  }

  // ---- WebSocket ----

  connect() {
    this.timer = null;
    if (this.subs.size === 0 || this.socket) return;
    if (this.mode === "sse") {
      for (const sub of this.subs.values()) if (!sub.source && !sub.timer) this.openStream(sub);
      return;
    }
    let socket;
    try {
      socket = new WebSocket(this.base.ws);
    } catch {
      this.mode = "sse"; // e.g. a Content-Security-Policy that forbids ws:
      this.connect();
      return;
    }
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      if (this.socket !== socket) return;
      opened = true;
      this.open = true;
      this.wsFailures = 0;
      this.setConnected(true);
      for (const sub of this.subs.values()) {
        if (!sub.refreshing && !sub.timer) this.sendSubscribe(sub);
      }
    };
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onMessage(message);
    };
    // Browsers fire error then close; Node 20's WebSocket fires only error when it cannot
    // connect. Whichever comes first ends this socket; the other is ignored.
    socket.onerror = socket.onclose = () => {
      if (this.socket !== socket) return; // closed on purpose, or already handled
      this.socket = null;
      socket.close();
      this.open = false;
      this.failCancels();
      for (const sub of this.subs.values()) sub.sent = false;
      if (this.subs.size === 0) return;
      this.setConnected(false);
      if (opened) {
        this.reconnectLater();
      } else {
        // Never opened: is the server down (wait), or is WebSocket blocked (use SSE)?
        this.reachable().then((up) => {
          if (up && ++this.wsFailures >= settings.wsFailuresBeforeSse) this.mode = "sse";
          this.reconnectLater();
        });
      }
    };
  }

  reconnectLater() {
    if (this.subs.size === 0 || this.timer !== null) return;
    this.timer = setTimeout(() => this.connect(), backoff(this.attempt++));
  }

  // Any HTTP answer, even an error, means the server is up.
  async reachable() {
    if (typeof fetch !== "function") return false;
    const abort = typeof AbortController === "function" ? new AbortController() : null;
    const timer = setTimeout(() => abort && abort.abort(), 3000);
    try {
      await fetch(`${this.base.http}/healthz`, { mode: "no-cors", cache: "no-store", signal: abort?.signal });
      return true;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  send(message) {
    if (this.socket && this.open) this.socket.send(JSON.stringify(message));
  }

  // ---- cancel ----

  /**
   * Asks the server to cancel the watcher's task with the subscription's current token:
   * as a WebSocket message when the socket is open, else `POST /api/tasks/{id}/cancel`.
   * Resolves {task_id, version, cancel_requested_at, applied}; rejects a TaskcastError
   * with the server's code (403 forbidden, 409 task_finished, ...).
   */
  async cancel(watcher) {
    const taskId = watcher.taskId;
    const sub = this.subs.get(taskId);
    let token = sub?.token ?? watcher.options.token ?? null;
    if (!token && typeof watcher.options.getToken === "function") {
      token = (await watcher.options.getToken(taskId, null)) ?? null;
    }
    if (this.mode === "websocket" && this.socket && this.open) {
      return new Promise((resolve, reject) => {
        const waiting = this.cancels.get(taskId) ?? [];
        const entry = { resolve, reject };
        entry.timer = setTimeout(() => {
          const list = this.cancels.get(taskId) ?? [];
          const at = list.indexOf(entry);
          if (at >= 0) list.splice(at, 1);
          reject(new TaskcastError("unavailable", "no answer to the cancel request in time", {
            hint: "retry; the request is idempotent",
            taskId,
          }));
        }, settings.cancelTimeoutMs);
        waiting.push(entry);
        this.cancels.set(taskId, waiting);
        const message = { type: "cancel", task_id: taskId };
        if (token) message.token = token;
        this.send(message);
      });
    }
    return cancelOverHttp(this.base, taskId, token);
  }

  /** Settles the oldest cancel request waiting for `taskId`; answers come in order. */
  settleCancel(taskId, settle) {
    const waiting = this.cancels.get(taskId);
    const entry = waiting?.shift();
    if (!entry) return;
    if (waiting.length === 0) this.cancels.delete(taskId);
    clearTimeout(entry.timer);
    settle(entry);
  }

  /** The socket closed with cancel requests unanswered: they may or may not have landed. */
  failCancels() {
    for (const [taskId, waiting] of this.cancels) {
      for (const entry of waiting) {
        clearTimeout(entry.timer);
        entry.reject(new TaskcastError("unavailable", "the connection closed before the cancel was answered", {
          hint: "retry; the request is idempotent",
          taskId,
        }));
      }
    }
    this.cancels.clear();
  }

  sendSubscribe(sub) {
    const message = { type: "subscribe", task_id: sub.taskId };
    if (sub.token) message.token = sub.token;
    sub.sent = true;
    this.send(message);
  }

  onMessage(message) {
    if (message.type === "cancel_requested") {
      const { task_id, version, cancel_requested_at, applied } = message;
      this.settleCancel(task_id, (e) => e.resolve({ task_id, version, cancel_requested_at, applied }));
      return;
    }
    if (message.type === "error" && message.request === "cancel") {
      const error = new TaskcastError(message.code, message.message, {
        hint: message.hint,
        taskId: message.task_id ?? null,
      });
      this.settleCancel(message.task_id, (e) => e.reject(error));
      return;
    }
    // A feed's frames name it in `feed`; their task_id is the task's.
    const key = message.feed ?? message.task_id;
    const sub = key ? this.subs.get(key) : null;
    if (message.type === "state") {
      if (sub) this.onState(sub, message);
    } else if (message.type === "snapshot_complete") {
      if (sub) this.onSnapshotComplete(sub);
    } else if (message.type === "error") {
      const error = new TaskcastError(message.code, message.message, {
        hint: message.hint,
        taskId: message.task_id ?? null,
      });
      if (sub) this.onError(sub, error);
      else if (!message.task_id) {
        for (const s of this.subs.values()) for (const w of s.watchers) w.fail(error);
      }
    }
  }

  // ---- shared by both transports ----

  onState(sub, state) {
    // Versions are per task; a feed keeps the last one of each of its tasks.
    const last = sub.feed ? sub.states.get(state.task_id) : sub.state;
    // A place-in-line update re-sends the state held, same version, marked `derived`.
    const placed = state.derived === true && last && state.version === last.version;
    if (!state.snapshot && !placed && last && state.version <= last.version) return;
    if (sub.feed) sub.states.set(state.task_id, state);
    sub.state = state;
    sub.refreshes = 0;
    sub.attempt = 0;
    this.attempt = 0;
    for (const watcher of [...sub.watchers]) watcher.deliver(state);
    if (!sub.feed && TERMINAL.has(state.status)) this.drop(sub);
  }

  onSnapshotComplete(sub) {
    for (const watcher of [...sub.watchers]) watcher.snapshotDone();
  }

  onError(sub, error) {
    if (TOKEN_ERRORS.has(error.code) && sub.getToken && sub.refreshes < settings.maxTokenRefreshes) {
      sub.sent = false;
      this.refreshToken(sub, error);
    } else if (TRANSIENT_ERRORS.has(error.code)) {
      sub.sent = false;
      for (const w of sub.watchers) w.fail(error);
      this.retryLater(sub);
    } else {
      error.fatal = true;
      for (const w of [...sub.watchers]) w.fail(error);
      this.drop(sub);
    }
  }

  retryLater(sub) {
    sub.clearTimer();
    sub.timer = setTimeout(() => {
      sub.timer = null;
      this.resubscribe(sub);
    }, backoff(sub.attempt++));
  }

  resubscribe(sub) {
    if (this.subs.get(sub.taskId) !== sub) return;
    if (this.mode === "sse") this.openStream(sub);
    else if (this.open) this.sendSubscribe(sub);
    else if (!this.socket && this.timer === null) this.connect();
  }

  async refreshToken(sub, cause) {
    if (sub.refreshing) return;
    sub.refreshing = true;
    sub.refreshes += 1;
    let token;
    try {
      token = await sub.getToken(sub.taskId, cause);
    } catch (e) {
      sub.refreshing = false;
      if (this.subs.get(sub.taskId) !== sub) return;
      const error = new TaskcastError("token_refresh_failed", `getToken() failed: ${e?.message ?? e}`, {
        hint: "getToken is retried with backoff",
        taskId: sub.taskId,
      });
      for (const w of sub.watchers) w.fail(error);
      sub.refreshes -= 1; // a failing call is retried, not counted as a useless token
      this.retryLater(sub);
      return;
    }
    sub.refreshing = false;
    if (this.subs.get(sub.taskId) !== sub) return;
    sub.token = token ?? null;
    this.resubscribe(sub);
  }

  // ---- Server-Sent Events ----

  openStream(sub) {
    if (sub.source) sub.source.close();
    sub.source = null;
    if (sub.refreshing || this.subs.get(sub.taskId) !== sub) return;
    if (typeof EventSource !== "function") {
      const error = new TaskcastError("unsupported", "this browser has neither WebSocket nor EventSource", {
        taskId: sub.taskId,
        fatal: true,
      });
      for (const w of [...sub.watchers]) w.fail(error);
      this.drop(sub);
      return;
    }
    const query = sub.token ? `?token=${encodeURIComponent(sub.token)}` : "";
    const url = `${this.base.http}/api/tasks/${encodeURIComponent(sub.taskId)}/events${query}`;
    const source = new EventSource(url);
    sub.source = source;
    let opened = false;
    let first = true;
    source.onopen = () => {
      opened = true;
      this.setConnected(true);
    };
    source.onmessage = (event) => {
      if (sub.source !== source) return;
      let state;
      try {
        state = JSON.parse(event.data);
      } catch {
        return;
      }
      // Each (re)opened stream starts with a snapshot (a feed's are marked by the server).
      if (first && !sub.feed) state.snapshot = true;
      first = false;
      if (state.type === "state") this.onState(sub, state);
      else if (state.type === "snapshot_complete") this.onSnapshotComplete(sub);
    };
    source.onerror = () => {
      if (sub.source !== source) return;
      // We do our own backoff rather than EventSource's fixed retry.
      source.close();
      sub.source = null;
      this.setConnected(false);
      if (opened) this.retryLater(sub);
      else this.diagnose(sub);
    };
  }

  // EventSource hides the HTTP status of a refusal; ask the same question over fetch (a
  // feed has no plain read: its event stream is asked, and closed if it opens).
  async diagnose(sub) {
    let body = null;
    try {
      const query = sub.token ? `?token=${encodeURIComponent(sub.token)}` : "";
      const path = `/api/tasks/${encodeURIComponent(sub.taskId)}${sub.feed ? "/events" : ""}`;
      const response = await fetch(`${this.base.http}${path}${query}`, {
        cache: "no-store",
      });
      if (!response.ok) body = await response.json();
      else if (sub.feed) await response.body?.cancel();
    } catch {
      body = null; // unreachable or unreadable: try again later
    }
    if (this.subs.get(sub.taskId) !== sub) return;
    if (body && typeof body.error === "string") {
      this.onError(sub, new TaskcastError(body.error, body.message, { hint: body.hint, taskId: sub.taskId }));
    } else {
      this.retryLater(sub);
    }
  }
}
