// useTask: the latest state of one task, for React (a peer dependency). Types in react.d.ts.

import { useEffect, useRef, useState } from "react";

import { isTerminal, watchTask } from "./index.js";

function start(taskId) {
  return { taskId, state: null, connection: taskId ? "connecting" : "idle", transport: null, error: null };
}

/**
 * Watches `taskId` while the component is mounted and returns
 * {state, connection, transport, error}. A new `taskId`, `url` or `token` starts a new
 * watch; callbacks (getToken, onState, onError, onConnection) may change on every render.
 */
export function useTask(taskId, options = {}) {
  const latest = useRef(options);
  latest.current = options;
  const { url, token } = options;
  const server = url == null ? null : String(url);
  const [result, setResult] = useState(() => start(taskId));

  useEffect(() => {
    // A new task starts from nothing; the same task under a new token or url keeps what it
    // shows until the new watch's snapshot.
    setResult((r) => {
      if (r.taskId !== taskId) return start(taskId);
      return r.connection === "ended" ? { ...r, connection: "connecting", error: null } : r;
    });
    if (!taskId) return undefined;
    const handle = watchTask(taskId, {
      url: server ?? undefined,
      token,
      getToken: latest.current.getToken && ((id, cause) => latest.current.getToken(id, cause)),
      onState: (state) => {
        setResult((r) => ({ ...r, state, error: null, connection: isTerminal(state.status) ? "ended" : r.connection }));
        latest.current.onState?.(state);
      },
      onError: (error) => {
        setResult((r) => ({ ...r, error, connection: error.fatal ? "ended" : r.connection }));
        latest.current.onError?.(error);
      },
      onConnection: (info) => {
        setResult((r) => {
          if (r.connection === "ended") return r;
          const down = r.connection === "connecting" ? "connecting" : "reconnecting";
          return { ...r, connection: info.connected ? "connected" : down, transport: info.transport };
        });
        latest.current.onConnection?.(info);
      },
    });
    return () => handle.close();
  }, [taskId, server, token]);

  // Until the effect runs for a new task id, show nothing of the previous task.
  const { state, connection, transport, error } = result.taskId === taskId ? result : start(taskId);
  return { state, connection, transport, error };
}
