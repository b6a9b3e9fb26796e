// Types for index.js. The wire shapes follow the server: src/domain/state.rs (the state
// object), src/error.rs (error codes) and src/ws/protocol.rs (client messages).

/** taskcast's five statuses; the last three are final. */
export type TaskStatus = "pending" | "processing" | "completed" | "failed" | "cancelled";

/** The statuses after which a task never changes again (a push gets 409). */
export type TerminalStatus = "completed" | "failed" | "cancelled";

/** Text fields cut (or, for the URLs, left out) because the row held more than a push may send. */
export type TruncatedField = "stage" | "error" | "image_url" | "preview_url";

/**
 * A task's state: the same object in WebSocket messages, SSE events and HTTP answers.
 * Optional fields are absent (not `null`) when there is nothing to say.
 */
export interface TaskState {
  type: "state";
  /** The task's id as text (a UUID, or the decimal text of an integer id). */
  task_id: string;
  /** 0 to 100, fractions kept; `null` until set. */
  progress: number | null;
  /** At most 256 characters; `null` until set. */
  stage: string | null;
  status: TaskStatus;
  /** The word the table holds, when it is not `status` itself (an alias or the app's word). */
  status_raw?: string;
  /** Grows by one with every applied change, from any writer. */
  version: number;
  /** RFC 3339 time of the last change; `null` when the stored time cannot be shown. */
  updated_at: string | null;
  image_url?: string;
  /** The generator's error text (usually with `status: "failed"`). */
  error?: string;
  truncated?: TruncatedField[];
  /** "step 12 of 30": whole numbers from 0 to 1,000,000, as the generator reported them. */
  step?: number;
  total_steps?: number;
  /** The latest in-progress preview (an http(s) URL); absent once the task is finished. */
  preview_url?: string;
  /**
   * Processing tasks only: estimated milliseconds left at `eta_at`, absent when there is
   * nothing to go on. Time left now is `eta_ms - (now - Date.parse(eta_at))`.
   */
  eta_ms?: number;
  /** RFC 3339 time the estimate was made for (the change's `updated_at`). */
  eta_at?: string;
  /**
   * Pending tasks only: place in line (1 is next) among the pending tasks of its queue,
   * ordered by creation time, and how many are pending in it.
   */
  queue_position?: number;
  queue_length?: number;
  /**
   * `true` on a place-in-line update: the same state and version as before, with a new
   * `queue_position` and `queue_length` (derived by the server, never a new version).
   */
  derived?: boolean;
  /**
   * Processing tasks only: the generator sent no change for TASKCAST_STALL_SECS. Cleared
   * (absent) from the next change on.
   */
  stalled?: true;
  /** RFC 3339 time the task was found stalled. */
  stalled_since?: string;
  /** `true` once a subscriber asked to cancel the task (it stays set after it ends). */
  cancel_requested?: boolean;
  /** RFC 3339 time of that request. */
  cancel_requested_at?: string;
  /** `true` in the first message of a (re)subscription and in GET and create answers. */
  snapshot: boolean;
  /** Only in answers to a push: whether it changed anything (`false` for a stale `seq`). */
  applied?: boolean;
  /** Only in the answer to `POST /api/tasks`: a subscribe token for the new task. */
  token?: string;
  /** Only on a user feed's frames: the feed, `user:<uuid>`. */
  feed?: string;
}

/** After a feed's snapshot states: how many there were. */
export interface SnapshotComplete {
  type: "snapshot_complete";
  feed: string;
  tasks: number;
}

/** Error codes the server sends (HTTP bodies and WebSocket error messages). */
export type ServerErrorCode =
  | "invalid_input"
  | "unauthorized"
  | "token_required"
  | "token_invalid"
  | "token_expired"
  | "forbidden"
  | "not_found"
  | "route_not_found"
  | "method_not_allowed"
  | "task_finished"
  | "limit_exceeded"
  | "payload_too_large"
  | "request_timeout"
  | "unsupported_media_type"
  | "upgrade_required"
  | "schema_missing"
  | "version_exhausted"
  | "status_not_storable"
  | "schema_unsupported"
  | "unreadable_row"
  | "unavailable"
  | "internal";

/** Error codes the client makes itself. */
export type ClientErrorCode =
  /** `getToken()` threw or rejected; it is retried with backoff. */
  | "token_refresh_failed"
  /** Neither WebSocket nor EventSource exists here. */
  | "unsupported";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

/** A WebSocket error message; `task_id` is set when it concerns one subscription. */
export interface ErrorMessage {
  type: "error";
  task_id?: string;
  /** Set when the error answers a client request other than a subscription (`"cancel"`). */
  request?: "cancel";
  code: ServerErrorCode;
  message: string;
  hint: string;
}

/** An HTTP error body. */
export interface ErrorBody {
  error: ServerErrorCode;
  message: string;
  hint: string;
}

/** The answer to a WebSocket cancel message (and what `WatchHandle.cancel()` resolves to). */
export interface CancelRequested {
  type: "cancel_requested";
  task_id: string;
  /** The task's version with the request recorded. */
  version: number;
  cancel_requested_at: string;
  /** `false` when it had been requested before (nothing changed). */
  applied: boolean;
}

/**
 * Every message the server sends on a WebSocket on its own. A socket that sent a
 * `CancelMessage` also gets a `CancelRequested` (or an `ErrorMessage` with `request`).
 */
export type ServerMessage = TaskState | ErrorMessage | SnapshotComplete;

/**
 * Watch a task, or with `task_id: "user:<uuid>"` that user's feed; `token` overrides the
 * connection URL's `?token=` for this subscription.
 */
export interface SubscribeMessage {
  type: "subscribe";
  task_id: string;
  token?: string;
}

export interface UnsubscribeMessage {
  type: "unsubscribe";
  task_id: string;
}

/** Ask to cancel a task; `token` overrides the connection URL's `?token=`. */
export interface CancelMessage {
  type: "cancel";
  task_id: string;
  token?: string;
}

/** Every message a client may send on a WebSocket. */
export type ClientMessage = SubscribeMessage | UnsubscribeMessage | CancelMessage;

/** What `WatchHandle.cancel()` resolves to. */
export type CancelResult = Omit<CancelRequested, "type">;

export type Transport = "websocket" | "sse";

/** What `onConnection` gets: whether the transport to the server is up, and which one. */
export interface ConnectionInfo {
  connected: boolean;
  transport: Transport;
}

/** An error from the server (code, message, hint) or from the client itself. */
export class TaskcastError extends Error {
  constructor(code: ErrorCode, message: string, options?: { hint?: string; taskId?: string | null; fatal?: boolean });
  readonly name: "TaskcastError";
  code: ErrorCode;
  hint: string;
  taskId: string | null;
  /** `true` when the watch has ended because of it; otherwise the client retries by itself. */
  fatal: boolean;
}

/**
 * Returns a subscribe token for the task. Called when the watch starts without a token and
 * after `token_expired`, `token_invalid`, `token_required` or `forbidden` (then `cause` is
 * that error). A throw or rejection is reported as `token_refresh_failed` and retried.
 */
export type GetToken = (
  taskId: string,
  cause: TaskcastError | null,
) => string | null | undefined | Promise<string | null | undefined>;

export interface WatchOptions {
  /**
   * The server, as "https://host" or "wss://host" (a path prefix is kept). Defaults to the
   * folder this module was loaded from, which is right only for the server's own /client.js.
   */
  url?: string | URL;
  /** A subscribe token for this task. */
  token?: string | null;
  getToken?: GetToken;
  /**
   * Every state, in version order: the snapshot first, then each newer one; a pending
   * task's new place in line comes as the same version again with `derived: true`.
   */
  onState?: (state: TaskState) => void;
  /** Errors; the watch goes on unless `error.fatal`. */
  onError?: (error: TaskcastError) => void;
  /** The shared transport went up or down (called again after each change). */
  onConnection?: (info: ConnectionInfo) => void;
}

export interface WatchHandle {
  readonly taskId: string;
  /** The last state delivered to this watch, or `null` before the first. */
  readonly state: TaskState | null;
  /** Stops watching (idempotent). A watch also ends by itself on a final status or a fatal error. */
  close(): void;
  /**
   * Asks the server to cancel the task (a WebSocket message when connected, else
   * `POST /api/tasks/{id}/cancel`), with the watch's current token: one with the cancel
   * right, or the owner's Supabase session. Idempotent. Rejects with a TaskcastError:
   * `forbidden` (no right), `task_finished` (already ended), `unavailable`, ...
   * The generator stops when it next pushes; the state then ends as `cancelled`.
   */
  cancel(): Promise<CancelResult>;
}

/** Backoff and fallback settings, shared by every watch; apps and tests may tune them. */
export interface Settings {
  /** The first reconnect waits 0.5x to 1x of this. */
  minDelayMs: number;
  /** The cap of the exponential backoff. */
  maxDelayMs: number;
  /** Failed WebSocket opens, while the server answers HTTP, before switching to SSE. */
  wsFailuresBeforeSse: number;
  /** Consecutive token refreshes that did not help before the watch gives up. */
  maxTokenRefreshes: number;
  /** How long an unused socket is kept for the next `watchTask`. */
  lingerMs: number;
  /** A cancel sent on the socket and not answered within this is rejected (`unavailable`). */
  cancelTimeoutMs: number;
}

export const settings: Settings;

/** Whether a status is final: completed, failed or cancelled. */
export function isTerminal(status: string): status is TerminalStatus;

/** Watches one task. Throws a `TypeError` for an empty `taskId` or a `url` that is not http(s) or ws(s). */
export function watchTask(taskId: string, options?: WatchOptions): WatchHandle;

export interface WatchUserOptions {
  /** As for `watchTask`. */
  url?: string | URL;
  /** A feed token (claim `user_id`, from `SubscribeAuth::mint_user` or `taskcast token --user`) or the user's Supabase access token. */
  token?: string | null;
  /** As for `watchTask`; called with the feed's id, `user:<uuid>`. */
  getToken?: GetToken;
  /** Each task's states: its snapshot state first, then each newer one (per task in version order). */
  onTask?: (state: TaskState) => void;
  /** After each (re)subscription's snapshot: every task known to this watch. */
  onSnapshot?: (states: TaskState[]) => void;
  onError?: (error: TaskcastError) => void;
  onConnection?: (info: ConnectionInfo) => void;
}

export interface WatchUserHandle {
  readonly userId: string;
  /** The latest state of every task seen, by task id (a copy). */
  readonly tasks: Map<string, TaskState>;
  /** Stops watching (idempotent). A feed ends by itself only on a fatal error. */
  close(): void;
}

/**
 * Watches every task of one user (the feed `user:<userId>`): the user's unfinished and
 * latest finished tasks, then every change, new tasks included. Throws a `TypeError` when
 * `userId` is not a UUID.
 */
export function watchUser(userId: string, options?: WatchUserOptions): WatchUserHandle;
