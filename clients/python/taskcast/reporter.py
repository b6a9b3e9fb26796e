"""The thread-based reporter: `report()` queues and returns at once; a daemon thread sends."""

from __future__ import annotations

import atexit
import threading
import time
from typing import Any, Dict, Optional

from ._delivery import Client, Queue, note


class Reporter:
    """Fire-and-forget progress for any number of tasks.

    `report()` never raises and never blocks. Updates waiting for one task merge (newest
    field wins); at most `capacity` tasks wait (the oldest unfinished one is dropped);
    every update carries a `seq`, so a retry is harmless. One request is in flight at a
    time, so never two for one task. A lone update goes out at once; when several tasks
    have updates waiting, up to `max_batch` of them (about `max_batch_bytes` of JSON) go in
    one `POST /api/progress`, whose items are answered one by one. A batch the server
    refuses whole for its size (413 over TASKCAST_MAX_BATCH_BODY_BYTES, or 400 over
    TASKCAST_MAX_BATCH_ITEMS) is not failed: the reporter lowers its cap (items or bytes)
    for the rest of its life, to the limit the server named or else to half of what was
    refused, says once on stderr which limit it met, and sends the same updates again at
    once in smaller requests (alone, when it comes to that); this is not counted as a
    retry. A lone update answered 413 is refused: it is too large itself.
    Network errors, timeouts (408 included), 5xx and 429 are retried with backoff and
    jitter (honouring Retry-After), for a whole request or a single item; other refusals
    (401 wrong key, 409 finished task) are not, and a refused item fails alone. Failures
    go to stderr and `stats` (counted per update).
    """

    def __init__(
        self,
        url: str,
        key: str,
        capacity: int = 1024,
        timeout: float = 5.0,
        attempts: int = 5,
        backoff: float = 0.2,
        backoff_max: float = 5.0,
        max_batch: int = 100,
        max_batch_bytes: int = 256 * 1024,
    ) -> None:
        self._client = Client(url, key, timeout)
        self._queue = Queue(
            capacity, attempts, backoff, backoff_max, max_batch, max_batch_bytes
        )
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="taskcast-reporter", daemon=True).start()
        atexit.register(self.flush, 2.0)  # the daemon thread dies with the interpreter

    @property
    def stats(self) -> Dict[str, int]:
        """Counts per update: sent; retried (sent again after a network error, timeout,
        5xx or 429); dropped; failed; conflated (merged into a newer update of its task,
        while waiting or instead of a retry); and batches (requests to
        `POST /api/progress`)."""
        with self._cond:
            return dict(self._queue.stats)

    def report(self, task_id: Any, **fields: Any) -> None:
        """Queue an update (`progress`, `stage`, `status`, `image_url`, `error`) for
        `task_id` and return at once. Never raises."""
        try:
            with self._cond:
                if self._queue.add(str(task_id), fields):
                    self._cond.notify_all()
        except Exception as e:  # the generation must go on
            note(f"report failed: {e!r}")

    def finished(self, task_id: Any) -> Optional[str]:
        """Why taskcast refused pushes for this task as finished (409: completed, failed or
        cancelled, by this generator or by anyone else), or None."""
        with self._cond:
            return self._queue.finished.get(str(task_id))

    def is_cancel_requested(self, task_id: Any) -> bool:
        """True once a push answer for this task said `cancel_requested: true`: a subscriber
        asked to stop it. Stop between steps and report `status="cancelled"`. Learned from
        push answers, so it arrives with the answer to the next push after the request."""
        with self._cond:
            return str(task_id) in self._queue.cancel_requested

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is queued or in flight, at most `timeout` seconds. True if
        drained and nothing was dropped or failed since the previous flush."""
        with self._cond:
            drained = self._cond.wait_for(self._queue.idle, timeout)
            return self._queue.flush_result(drained)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    batch, wait = self._queue.take(time.monotonic())
                    if batch:
                        break
                    self._cond.wait(wait)
                if len(batch) > 1:
                    self._queue.stats["batches"] += 1
            outcomes = self._client.send(batch)
            with self._cond:
                now = time.monotonic()
                self._queue.settle_all(batch, outcomes, now)
                self._cond.notify_all()
