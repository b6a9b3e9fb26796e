"""The asyncio reporter: the same contract as `Reporter`, without a thread of its own.

The standard library has no asynchronous HTTP client, so each exchange runs in the
default executor (`asyncio.to_thread`); the event loop is never blocked.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, Optional

from ._delivery import Client, Queue, note


class AsyncReporter:
    """Fire-and-forget progress from asyncio code.

    `report()` is a plain call (not a coroutine) that never raises or blocks; it starts
    the sender task on first use, so create and use the reporter inside a running loop.
    `await flush()` before the loop ends, or use `async with AsyncReporter(...) as r:`.
    Merging, batching, retries and `stats` are those of `taskcast.Reporter`.
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
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._sender: Optional["asyncio.Task[None]"] = None

    async def __aenter__(self) -> "AsyncReporter":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()

    @property
    def stats(self) -> Dict[str, int]:
        """Counts: sent, retried, dropped, failed, conflated, batches."""
        return dict(self._queue.stats)

    def report(self, task_id: Any, **fields: Any) -> None:
        """Queue an update for `task_id` and return at once. Never raises."""
        try:
            if self._queue.add(str(task_id), fields):
                self._settled.clear()
                self._wake.set()
                if self._sender is None or self._sender.done():
                    self._sender = asyncio.get_running_loop().create_task(self._run())
        except Exception as e:  # the generation must go on
            note(f"report failed: {e!r}")

    def finished(self, task_id: Any) -> Optional[str]:
        """Why taskcast refused pushes for this task as finished (409), or None."""
        return self._queue.finished.get(str(task_id))

    def is_cancel_requested(self, task_id: Any) -> bool:
        """True once a push answer for this task said `cancel_requested: true` (a subscriber
        asked to stop it); stop and report `status="cancelled"`."""
        return str(task_id) in self._queue.cancel_requested

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is queued or in flight, at most `timeout` seconds. True if
        drained and nothing was dropped or failed since the previous flush."""
        if not self._queue.idle():
            try:
                await asyncio.wait_for(self._settled.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self._queue.flush_result(self._queue.idle())

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Flush, then stop the sender task. The result is `flush()`'s."""
        delivered = await self.flush(timeout)
        if self._sender is not None:
            self._sender.cancel()
            try:
                await self._sender
            except asyncio.CancelledError:
                pass
        return delivered

    async def _run(self) -> None:
        while True:
            batch, wait = self._queue.take(time.monotonic())
            if not batch:
                if self._queue.idle():
                    self._settled.set()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            if len(batch) > 1:
                self._queue.stats["batches"] += 1
            outcomes = await asyncio.to_thread(self._client.send, batch)
            now = time.monotonic()
            self._queue.settle_all(batch, outcomes, now)
