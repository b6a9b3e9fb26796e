"""What both reporters share: the queue of waiting updates (one per task) and the HTTP
exchange that sends them. Neither blocks nor raises; the reporters add the waiting.

One exchange sends the updates of one task to `POST /api/tasks/{id}/progress`, or those of
several tasks, in one request, to `POST /api/progress` (each item gets its own status).

A batch the server refuses whole for its size (413 over TASKCAST_MAX_BATCH_BODY_BYTES, or
400 over TASKCAST_MAX_BATCH_ITEMS) is not a refusal of its updates: the queue lowers its cap
for good and puts them back, to go again at once in smaller requests.
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

#: Statuses after which taskcast accepts no more pushes for a task (409).
FINAL = frozenset({"completed", "failed", "cancelled"})

#: The settings a batch refused whole for its size went over: the 400 for too many
#: updates names the first, the 413 for too large a body the second.
ITEMS_SETTING = "TASKCAST_MAX_BATCH_ITEMS"
BYTES_SETTING = "TASKCAST_MAX_BATCH_BODY_BYTES"

#: Bytes of a batch body besides its items (`{"updates": [` and `]}`), with room to spare.
BATCH_BODY_OVERHEAD = 32

Update = Dict[str, Any]


@dataclass
class Entry:
    """The merged update waiting for one task, and how often it was sent already."""

    update: Update
    sends: int = 0
    not_before: float = 0.0


@dataclass
class Outcome:
    """What happened to one task's update in one exchange."""

    ok: bool
    status: int = 0  # 0: no HTTP answer (refused, reset, timed out)
    code: str = ""
    why: str = ""
    after: float = 0.0  # Retry-After, seconds
    cancel_requested: bool = False  # the answer said a subscriber asked to cancel
    #: A request refused for its size: the setting it went over, and the limit the server
    #: named (0 when none, as in a proxy's 413). Acted on for a batch only.
    too_large: Optional[Tuple[str, int]] = None

    @property
    def retry(self) -> bool:
        """No answer (refused, reset, timed out), 408 (the body timed out), 5xx or 429."""
        return not self.ok and (self.status in (0, 408, 429) or self.status >= 500)


class Queue:
    """Waiting updates, oldest task first; not thread-safe (the reporters hold a lock)."""

    def __init__(
        self,
        capacity: int,
        attempts: int,
        backoff: float,
        backoff_max: float,
        max_batch: int = 100,
        max_batch_bytes: int = 256 * 1024,
    ):
        self.capacity, self.attempts = max(1, capacity), max(1, attempts)
        self.backoff, self.backoff_max = backoff, backoff_max
        #: The most updates, and about the most bytes, per request: lowered for good when
        #: the server refuses a batch as too large (see `split`).
        self.max_batch, self.max_batch_bytes = max(1, max_batch), max_batch_bytes
        self.limits_met: set = set()
        self.waiting: Dict[str, Entry] = {}
        self.in_flight = 0
        self.finished: Dict[str, str] = {}
        #: Tasks whose push answer said `cancel_requested: true`; a task leaves once a
        #: final status is reported for it.
        self.cancel_requested: set = set()
        self.stats: Dict[str, int] = dict(
            sent=0, retried=0, dropped=0, failed=0, conflated=0, batches=0
        )
        self._seq = 0
        self._lost_at_flush = 0

    def add(self, task: str, fields: Mapping[str, Any]) -> bool:
        """Merges `fields` (None values left out) into the task's waiting update."""
        update = {k: v for k, v in fields.items() if v is not None}
        if not update:
            return False
        if update.get("status") in FINAL:
            self.cancel_requested.discard(task)
        # Microseconds since the epoch: still increasing after a generator restart.
        self._seq = update["seq"] = max(self._seq + 1, time.time_ns() // 1000)
        entry = self.waiting.get(task)
        if entry is not None:
            entry.update.update(update)
            entry.sends = 0  # a new update gets its own attempts
            self.stats["conflated"] += 1
            return True
        if len(self.waiting) >= self.capacity:
            open_tasks = (t for t, e in self.waiting.items() if e.update.get("status") not in FINAL)
            del self.waiting[next(open_tasks, next(iter(self.waiting)))]
            self.stats["dropped"] += 1
        self.waiting[task] = Entry(update)
        return True

    def take(self, now: float) -> Tuple[List[Tuple[str, Entry]], Optional[float]]:
        """Removes up to `max_batch` entries that are due, oldest first, whose encoded
        items fit in `max_batch_bytes` (always at least one). When none is due: no entries
        and the seconds until one is (None when nothing waits)."""
        limit, max_bytes = self.max_batch, self.max_batch_bytes
        due: List[str] = []
        size = 0
        soonest: Optional[float] = None
        for task, entry in self.waiting.items():
            if entry.not_before <= now:
                size += item_size(task, entry.update)
                if due and size > max_bytes:
                    break
                due.append(task)
                if len(due) >= limit:
                    break
            else:
                wait = entry.not_before - now
                soonest = wait if soonest is None else min(soonest, wait)
        self.in_flight += len(due)
        return [(task, self.waiting.pop(task)) for task in due], (None if due else soonest)

    def settle_all(
        self, batch: List[Tuple[str, Entry]], outcomes: List[Outcome], now: float
    ) -> None:
        """Records the outcomes of one exchange. Its retries share one jitter, so updates
        that failed together (a 503 for the whole request) are retried together."""
        if len(batch) > 1 and outcomes and outcomes[0].too_large is not None:
            self.split(batch, outcomes[0])
            return
        jitter = random.random()
        for (task, entry), outcome in zip(batch, outcomes):
            self.settle(task, entry, outcome, now, jitter)

    def split(self, batch: List[Tuple[str, Entry]], refused: Outcome) -> None:
        """A batch refused whole for its size, none of its updates looked at: lowers the
        cap it went over for good (to the limit the server named, else to half of what was
        sent), says so once per limit, and puts the updates back at the head of the queue
        to go again at once in smaller requests (alone, when it comes to that). Not an
        attempt: nothing is counted, except an update folded into a newer one (conflated)."""
        self.in_flight -= len(batch)
        setting, named = refused.too_large or (BYTES_SETTING, 0)
        if setting == ITEMS_SETTING:
            sent = len(batch)
            self.max_batch = min(self.max_batch, max(1, named if 0 < named < sent else sent // 2))
            cap = f"{self.max_batch} updates"
        else:
            sent = sum(item_size(task, entry.update) for task, entry in batch)
            named = named - BATCH_BODY_OVERHEAD if named else 0
            lowered = max(1, named if 0 < named < sent else sent // 2)
            self.max_batch_bytes = min(self.max_batch_bytes, lowered)
            cap = f"{self.max_batch_bytes} bytes of updates"
        if setting not in self.limits_met:
            self.limits_met.add(setting)
            note(
                f"the server refused a batch of {len(batch)} updates as too large ({setting}): "
                f"{refused.why}; from now on at most {cap} go in one request"
            )
        back: Dict[str, Entry] = {}
        for task, entry in batch:
            newer = self.waiting.get(task)
            if newer is not None:  # reported again meanwhile: fold this one under it
                newer.update = {**entry.update, **newer.update}
                self.stats["conflated"] += 1
            else:
                back[task] = entry
        self.waiting = {**back, **self.waiting}

    def settle(self, task: str, entry: Entry, outcome: Outcome, now: float, jitter: float) -> None:
        """Records one outcome: sent, scheduled again (merged under any newer update), or
        failed."""
        self.in_flight -= 1
        if outcome.ok:
            self.stats["sent"] += 1
            if outcome.cancel_requested and entry.update.get("status") not in FINAL:
                self.cancel_requested.add(task)
            return
        if outcome.code == "task_finished":
            self.finished[task] = outcome.why
        entry.sends += 1
        if outcome.retry and entry.sends < self.attempts:
            newer = self.waiting.get(task)
            if newer is not None:  # fold this one under the newer fields, not a retry
                newer.update = {**entry.update, **newer.update}
                self.stats["conflated"] += 1
                return
            self.stats["retried"] += 1
            step = min(self.backoff * 2 ** (entry.sends - 1), self.backoff_max)
            delay = max(step / 2 + jitter * step / 2, min(outcome.after, 60.0))
            entry.not_before = now + delay
            self.waiting[task] = entry
            return
        self.stats["failed"] += 1
        failed = self.stats["failed"]
        if failed & (failed - 1) == 0:  # the 1st, 2nd, 4th... failure
            note(
                f"progress for task {task} not delivered ({entry.sends} attempts, "
                f"{failed} failed so far): {outcome.why}"
            )

    def idle(self) -> bool:
        return not self.waiting and self.in_flight == 0

    def flush_result(self, drained: bool) -> bool:
        """True if drained and nothing was dropped or failed since the previous flush."""
        lost = self.stats["dropped"] + self.stats["failed"]
        ok, self._lost_at_flush = drained and lost == self._lost_at_flush, lost
        return ok


class Client:
    """Blocking HTTP with urllib; one call per exchange."""

    def __init__(self, url: str, key: str, timeout: float):
        self.url, self.key, self.timeout = url.rstrip("/"), key.strip(), timeout

    def send(self, batch: List[Tuple[str, Entry]]) -> List[Outcome]:
        """One outcome per entry, in order. Never raises."""
        try:
            if len(batch) == 1:
                task, entry = batch[0]
                path = f"/api/tasks/{urllib.parse.quote(task, safe='')}/progress"
                outcome, state = self._post(path, entry.update)
                outcome.cancel_requested = is_cancel_requested(state)
                return [outcome]
            updates = [{"task_id": task, **entry.update} for task, entry in batch]
            whole, body = self._post("/api/progress", {"updates": updates})
            if not whole.ok:
                return [whole] * len(batch)
            results = body.get("results") if isinstance(body, dict) else None
            if not isinstance(results, list) or len(results) != len(batch):
                return [Outcome(False, 500, "internal", "the batch answer has no results")] * len(batch)
            return [item_outcome(item) for item in results]
        except Exception as e:  # a bug here must not stop the sender
            return [Outcome(False, 0, "", f"unexpected error: {e!r}")] * len(batch)

    def _post(self, path: str, payload: Any) -> Tuple[Outcome, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return Outcome(True, answer.status), json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                error = json.loads(e.read())
            except Exception:
                error = {}
            after = (e.headers.get("Retry-After") or "").strip()
            if not isinstance(error, dict):
                error = {}
            outcome = Outcome(
                False,
                e.code,
                str(error.get("error", "")),
                f"{e.code} {e.reason}: {error.get('message', '')}",
                float(after) if after.isdigit() else 0.0,
                too_large=size_refusal(e.code, error),
            )
            return outcome, None
        except Exception as e:  # refused, reset, timed out, DNS
            return Outcome(False, 0, "", str(getattr(e, "reason", e))), None


def item_size(task: str, update: Update) -> int:
    """The bytes the update takes as an item of `POST /api/progress`, with the separator
    after it (JSON is ASCII here: `json.dumps` escapes the rest)."""
    return len(json.dumps(update)) + len(json.dumps(task)) + 15


def size_refusal(status: int, error: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    """Whether an error answer refuses the request for its size: a 413 (the server's says
    "the body is larger than the limit of N bytes (TASKCAST_MAX_BATCH_BODY_BYTES)"; a
    proxy's may name nothing), or a 400 `invalid_input` naming TASKCAST_MAX_BATCH_ITEMS
    ("send from 1 to N updates per request (...), got M"). Any other 400 is about the
    request's shape, which smaller requests would not change. The setting and N (0 when
    unnamed)."""
    message = str(error.get("message", ""))
    if status == 413:
        return BYTES_SETTING, number_after(message, "limit of ")
    if status == 400 and error.get("error") == "invalid_input" and ITEMS_SETTING in message:
        return ITEMS_SETTING, number_after(message, " to ")
    return None


def number_after(text: str, marker: str) -> int:
    """The number right after the first `marker` in `text`, or 0."""
    at = text.find(marker)
    rest = text[at + len(marker) :] if at >= 0 else ""
    digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
    return int(digits) if digits else 0


def item_outcome(item: Any) -> Outcome:
    """One entry of `POST /api/progress`'s `results`."""
    status = item.get("status", 0) if isinstance(item, dict) else 0
    if status == 200:
        return Outcome(True, 200, cancel_requested=is_cancel_requested(item.get("state")))
    code = str(item.get("error", "")) if isinstance(item, dict) else ""
    message = item.get("message", "") if isinstance(item, dict) else ""
    return Outcome(False, status, code, f"{status} {code}: {message}")


def is_cancel_requested(state: Any) -> bool:
    """Whether a pushed task's state says a subscriber asked to cancel it."""
    return isinstance(state, dict) and state.get("cancel_requested") is True


def note(text: str) -> None:
    """A failure worth knowing about, on stderr (never the key)."""
    print(f"taskcast: {text}", file=sys.stderr, flush=True)
