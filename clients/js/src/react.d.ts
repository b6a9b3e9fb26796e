// Types for react.js.

import type { TaskcastError, TaskState, Transport, WatchOptions } from "./index.js";

/**
 * - `idle`: no task id was given;
 * - `connecting`: watching, the transport has not been up yet;
 * - `connected`: the transport is up;
 * - `reconnecting`: it was up and went down; the client retries by itself;
 * - `ended`: the task reached a final status, or a fatal error ended the watch.
 */
export type TaskConnection = "idle" | "connecting" | "connected" | "reconnecting" | "ended";

/** `watchTask`'s options. A new `url` or `token` starts a new watch; the callbacks may change freely. */
export type UseTaskOptions = WatchOptions;

export interface UseTaskResult {
  /** The latest state, `null` before the first (and right after `taskId` changes). */
  state: TaskState | null;
  connection: TaskConnection;
  transport: Transport | null;
  /** The latest error, cleared by the next state; `error.fatal` means the watch ended. */
  error: TaskcastError | null;
}

/** Watches `taskId` while the component is mounted; pass `null` to watch nothing. */
export function useTask(taskId: string | null | undefined, options?: UseTaskOptions): UseTaskResult;
