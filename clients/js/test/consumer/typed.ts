// A typed consumer of the installed package: `tsc --noEmit` must accept every line, and
// each @ts-expect-error line must be an error (so the types are checked, not `any`).

import {
  type ClientMessage,
  type ConnectionInfo,
  type ErrorBody,
  type ErrorCode,
  type GetToken,
  isTerminal,
  type ServerMessage,
  settings,
  TaskcastError,
  type TaskState,
  type TaskStatus,
  type WatchHandle,
  watchTask,
  type WatchUserHandle,
  watchUser,
} from "@taskcast/client";
import { type TaskConnection, useTask, type UseTaskResult } from "@taskcast/client/react";

const getToken: GetToken = async (taskId, cause) => {
  const reason: ErrorCode | undefined = cause?.code;
  const response = await fetch(`/api/taskcast-token?task=${taskId}&reason=${reason ?? ""}`);
  return ((await response.json()) as { token: string }).token;
};

const handle: WatchHandle = watchTask("0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10", {
  url: new URL("https://progress.example.com"),
  token: null,
  getToken,
  onState: (state) => {
    const percent: number = state.progress ?? 0;
    const stage: string = state.stage ?? "queued";
    const when: string | null = state.updated_at;
    const version: number = state.version;
    const cut: ("stage" | "error" | "image_url" | "preview_url")[] = state.truncated ?? [];
    const steps: string = `${state.step ?? 0}/${state.total_steps ?? "?"}`;
    const left: number | undefined = state.eta_at ? state.eta_ms : undefined;
    console.log(steps, left, state.preview_url?.length);
    if (isTerminal(state.status)) {
      const final: "completed" | "failed" | "cancelled" = state.status;
      console.log(final, state.image_url?.toUpperCase(), state.error?.length);
    }
    console.log(percent, stage, when, version, cut, state.status_raw, state.snapshot);
  },
  onError: (error) => {
    const fatal: boolean = error.fatal;
    if (error.code === "token_expired" || error.code === "token_refresh_failed") console.log(error.hint);
    console.log(fatal, error.taskId, error.message);
  },
  onConnection: ({ connected, transport }: ConnectionInfo) => console.log(connected, transport === "sse"),
});
const last: TaskState | null = handle.state;
handle.close();
settings.maxDelayMs = 30_000;

const message: ServerMessage = JSON.parse("{}");
if (message.type === "error") {
  const code: ErrorCode = message.code;
  console.log(code, message.task_id, message.hint);
} else if (message.type === "snapshot_complete") {
  console.log(message.feed, message.tasks);
} else {
  console.log(message.progress, message.feed, last?.version);
}

const feed: WatchUserHandle = watchUser("0b6f1c5e-3f0e-4d7a-9a57-3c1f6c2d9e10", {
  url: "https://progress.example.com",
  getToken,
  onTask: (state) => console.log(state.task_id, state.version, state.feed),
  onSnapshot: (states) => console.log(states.length),
  onError: (error) => console.log(error.code),
});
const mine: Map<string, TaskState> = feed.tasks;
console.log(mine.size, feed.userId);
feed.close();
const subscribe: ClientMessage = { type: "subscribe", task_id: "1", token: "t" };
const body: ErrorBody = { error: "task_finished", message: "done", hint: "" };
const error = new TaskcastError("unavailable", "later", { hint: "retry", taskId: "1" });
console.log(subscribe, body, error instanceof Error);

export function useProgress(taskId: string | null): string {
  const result: UseTaskResult = useTask(taskId, { url: "https://progress.example.com", getToken });
  const connection: TaskConnection = result.connection;
  return `${connection} ${result.transport ?? ""} ${result.state?.progress ?? ""} ${result.error?.code ?? ""}`;
}

// @ts-expect-error a status taskcast does not have
const wrong: TaskStatus = "done";
// @ts-expect-error an error code taskcast does not send
const unknown: ErrorCode = "oops";
// @ts-expect-error task ids are strings, integer ids included
watchTask(42);
// @ts-expect-error callbacks get a TaskState, whose progress may be null
watchTask("1", { onState: (state) => state.progress.toFixed(0) });
// @ts-expect-error the hook's connection is one of five words
const pill: TaskConnection = "open";
// @ts-expect-error a subscribe message needs a task id
const bad: ClientMessage = { type: "subscribe" };
// @ts-expect-error a feed's callback is onTask, whose state may have a null progress
watchUser("1", { onTask: (state) => state.progress.toFixed(0) });
console.log(wrong, unknown, pill, bad);
