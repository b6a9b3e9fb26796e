// A minimal React app using the hook as an app would; test/package.test.mjs builds it with
// Vite and drives it in Chromium. The test chooses the task through window.watch().

import { StrictMode, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";
import { useTask } from "@taskcast/client/react";

declare global {
  interface Window {
    /** Watch this task (null: none); set by the app. */
    watch(taskId: string | null, token?: string): void;
    /** What each render showed: "task_id version", or null for no state. */
    rendered: (string | null)[];
    /** A fresh subscribe token; provided by the test. */
    freshToken(taskId: string, cause: string | null): Promise<string>;
  }
}

window.rendered = [];
const server = new URLSearchParams(location.search).get("server") ?? undefined;

function Progress({ taskId, token }: { taskId: string | null; token?: string }) {
  const { state, connection, transport, error } = useTask(taskId, {
    url: server,
    token,
    getToken: (id, cause) => window.freshToken(id, cause?.code ?? null),
  });
  // What each committed render showed, for the test.
  useEffect(() => {
    window.rendered.push(state ? `${state.task_id} ${state.version}` : null);
  });
  return (
    <section
      id="task"
      data-task-id={state?.task_id ?? ""}
      data-connection={connection}
      data-transport={transport ?? ""}
      data-status={state?.status ?? ""}
      data-version={state?.version ?? ""}
      data-error={error ? `${error.code}${error.fatal ? " fatal" : ""}` : ""}
    >
      <p id="stage">{state?.stage ?? ""}</p>
      <progress max={100} value={state?.progress ?? 0} />
      <span id="percent">{state?.progress == null ? "" : `${state.progress}%`}</span>
    </section>
  );
}

function App() {
  const [watched, setWatched] = useState<{ taskId: string | null; token?: string }>({ taskId: null });
  window.watch = (taskId, token) => setWatched({ taskId, token });
  return <Progress taskId={watched.taskId} token={watched.token} />;
}

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <App />
  </StrictMode>,
);
