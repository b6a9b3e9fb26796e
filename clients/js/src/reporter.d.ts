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
  /** Tries per push, the first included (5). */
  attempts?: number;
  /** The first retry waits 0.5x to 1x of this (200). */
  backoffMs?: number;
  /** The cap of the exponential backoff (5000). */
  backoffMaxMs?: number;
  /** Bound on each request (5000). */
  timeoutMs?: number;
}

/** A push refused by the server (its code), or still failing after every attempt. */
export class ReporterError extends Error {
  readonly code: ServerErrorCode | "unavailable" | "http_error";
  /** The HTTP status, 0 when there was no answer. */
  readonly status: number;
  readonly hint: string;
  readonly taskId: string | null;
}

export class Reporter {
  constructor(url: string, key: string, options?: ReporterOptions);
  /** Pushes and resolves to the committed state (with `applied`). */
  push(taskId: string, fields: PushFields): Promise<TaskState & { applied: boolean }>;
  /** True once a push answer said a subscriber asked to cancel the task. */
  isCancelRequested(taskId: string): boolean;
}
