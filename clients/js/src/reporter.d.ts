import type { ServerErrorCode, TaskState, TaskStatus } from "./index.js";

/** The fields a generator may push; at least one of them. */
export interface PushFields {
  progress?: number;
  stage?: string;
  status?: TaskStatus;
  image_url?: string;
  error?: string;
  step?: number;
  total_steps?: number;
  /** An http(s) URL; `""` clears it. */
  preview_url?: string;
}

export interface ReporterOptions {
  /** Most tasks with an update waiting; past it the oldest unfinished one is dropped (1024). */
  capacity?: number;
  /** Tries per update, the first included (5). */
  attempts?: number;
  /** The first retry waits 0.5x to 1x of this (200). */
  backoffMs?: number;
  /** The cap of the exponential backoff (5000). */
  backoffMaxMs?: number;
  /** Bound on each request (5000). */
  timeoutMs?: number;
  /**
   * Most updates in one `POST /api/progress` (100). A server whose TASKCAST_MAX_BATCH_ITEMS
   * is lower refuses a larger batch whole (400): the reporter then lowers this cap for the
   * rest of its life (to the server's limit) and sends the same updates again at once in
   * smaller requests; nothing fails or counts as retried.
   */
  maxBatch?: number;
  /**
   * Most bytes (UTF-8) of updates in one `POST /api/progress` (262144). A server whose
   * TASKCAST_MAX_BATCH_BODY_BYTES is lower refuses a larger batch whole (413): the
   * reporter then lowers this cap for the rest of its life and sends the same updates
   * again at once in smaller requests. A lone update answered 413 is refused (too large
   * itself).
   */
  maxBatchBytes?: number;
}

/** Counts per update since the reporter was made. */
export interface ReporterStats {
  sent: number;
  /** Sent again after a network error, timeout (408 included), 5xx or 429; not one folded
   * into a newer update of its task instead (`conflated`), nor one sent again in a
   * smaller request after its batch was refused whole for its size. */
  retried: number;
  dropped: number;
  failed: number;
  /** Merged into a newer update of its task, while waiting or instead of a retry. */
  conflated: number;
  /** Requests to `POST /api/progress` (several tasks in one request). */
  batches: number;
}

/** A push refused by the server (its code), or still failing after every attempt. */
export class ReporterError extends Error {
  readonly code: ServerErrorCode | "unavailable" | "http_error" | "dropped";
  /** The HTTP status (of the item, in a batch), 0 when there was no answer. */
  readonly status: number;
  readonly hint: string;
  readonly taskId: string | null;
}

export class Reporter {
  constructor(url: string, key: string, options?: ReporterOptions);
  readonly stats: Readonly<ReporterStats>;
  /** Queues an update and returns at once; never throws. */
  report(taskId: string, fields: PushFields): void;
  /** Pushes (merged with the task's waiting update) and resolves to the committed state. */
  push(taskId: string, fields: PushFields): Promise<TaskState & { applied: boolean }>;
  /** True once a push answer said a subscriber asked to cancel the task. */
  isCancelRequested(taskId: string): boolean;
  /** Why taskcast refused this task's pushes as finished (409), or null. */
  finished(taskId: string): string | null;
  /** Waits until nothing is queued or in flight (at most timeoutMs, 5000): true if drained
   * and nothing was dropped or failed since the previous flush. Never rejects. */
  flush(timeoutMs?: number): Promise<boolean>;
}
