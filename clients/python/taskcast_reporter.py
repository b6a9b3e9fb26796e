"""Fire-and-forget progress reporting to taskcast, with the Python standard library only.

    from taskcast_reporter import Reporter
    reporter = Reporter("http://127.0.0.1:8080", os.environ["TASK_PROCESS_SECRET_KEY"])
    reporter.report(task_id, status="processing", stage="generating", progress=40)
    reporter.report(task_id, status="completed", progress=100, image_url=url)  # or error=...
    reporter.flush(5)  # at the end of a generation: True if everything was delivered

report() never raises and never blocks, so a failed progress update never breaks the
generation. A background thread sends: updates waiting for one task merge (newest field
wins); at most `capacity` tasks wait (the oldest non-final one is dropped); every update
carries a `seq`, so a retry is harmless; network errors, 5xx and 429 are retried with
backoff and jitter (honouring Retry-After); other refusals (401 wrong key, 409 finished
task) are not. Failures go to stderr (never the key) and are counted in `reporter.stats`.

CLI (used by the tests): python3 taskcast_reporter.py --url U --key K --task T [--stage S]
walks task T to completed, then exits 0 after flush whether or not progress got through.
"""
import argparse, atexit, json, os, random, sys, threading, time
import urllib.error, urllib.parse, urllib.request

FINAL = ("completed", "failed", "cancelled")


class Reporter:
    def __init__(self, url, key, capacity=1024, timeout=5.0, attempts=5, backoff=0.2,
                 backoff_max=5.0):
        self.url, self.key, self.capacity = url.rstrip("/"), key.strip(), max(1, capacity)
        self.timeout, self.attempts = timeout, attempts
        self.backoff, self.backoff_max = backoff, backoff_max
        self.stats = dict(sent=0, retried=0, dropped=0, failed=0, conflated=0)
        self._waiting = {}  # task id -> latest update, oldest task first
        self._busy, self._seq, self._lost_at_flush = False, 0, 0
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="taskcast-reporter", daemon=True).start()
        atexit.register(self.flush, 2.0)  # the daemon thread dies with the interpreter

    def report(self, task_id, **fields):
        """Queue an update for task_id and return at once. Never raises."""
        try:
            # Any field is sent: the server refuses a misspelt one with a message (stderr).
            update = {k: v for k, v in fields.items() if v is not None}
            with self._cond:
                if not update:
                    return
                # Microseconds since the epoch: still increasing after a generator restart.
                self._seq = update["seq"] = max(self._seq + 1, time.time_ns() // 1000)
                task = str(task_id)
                if task in self._waiting:
                    self._waiting[task].update(update)
                    self.stats["conflated"] += 1
                else:
                    if len(self._waiting) >= self.capacity:
                        first = next(iter(self._waiting))
                        old = (t for t, u in self._waiting.items() if u.get("status") not in FINAL)
                        del self._waiting[next(old, first)]
                        self.stats["dropped"] += 1
                    self._waiting[task] = update
                self._cond.notify_all()
        except Exception as e:  # the generation must go on
            _note(f"report failed: {e!r}")

    def flush(self, timeout=5.0):
        """Wait until nothing is queued or in flight, at most `timeout` seconds. True if
        drained and nothing was dropped or failed since the previous flush."""
        with self._cond:
            drained = self._cond.wait_for(lambda: not self._waiting and not self._busy, timeout)
            lost = self.stats["dropped"] + self.stats["failed"]
            ok, self._lost_at_flush = drained and lost == self._lost_at_flush, lost
            return ok

    def _run(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting)
                task = next(iter(self._waiting))
                update, self._busy = self._waiting.pop(task), True
            try:
                self._deliver(task, update)
            except Exception as e:
                _note(f"unexpected error: {e!r}")
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _deliver(self, task, update):
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                with self._cond:
                    if task in self._waiting:  # a newer update waits: fold this one into it
                        self._waiting[task] = {**update, **self._waiting[task]}
                        self.stats["conflated"] += 1
                        return
                    self.stats["retried"] += 1
            retry, why, after = self._send(task, update)
            if why is None or not retry or attempt == self.attempts:
                with self._cond:
                    self.stats["sent" if why is None else "failed"] += 1
                    failed = self.stats["failed"]
                if why is not None and failed & (failed - 1) == 0:  # the 1st, 2nd, 4th...
                    _note(f"progress for task {task} not delivered ({attempt} attempts, "
                          f"{failed} failed so far): {why}")
                return
            step = min(self.backoff * 2 ** (attempt - 1), self.backoff_max)
            time.sleep(max(step / 2 + random.random() * step / 2, min(after, 60.0)))

    def _send(self, task, update):
        """One POST: (retry?, why it failed or None, Retry-After seconds)."""
        request = urllib.request.Request(
            f"{self.url}/api/tasks/{urllib.parse.quote(task, safe='')}/progress",
            data=json.dumps(update).encode(), method="POST",
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout):
                return False, None, 0.0
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("message", "")
            except Exception:
                message = ""
            after = e.headers.get("Retry-After", "")
            after = float(after) if after.strip().isdigit() else 0.0
            return e.code >= 500 or e.code == 429, f"{e.code} {e.reason}: {message}", after
        except Exception as e:  # refused, reset, timed out, DNS
            return True, str(getattr(e, "reason", e)), 0.0


def _note(text):
    print(f"taskcast_reporter: {text}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description="Walk a task to completed through taskcast.")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--key", default=os.environ.get("TASK_PROCESS_SECRET_KEY", "development-key"))
    p.add_argument("--task", required=True)
    p.add_argument("--stage", default="done", help="stage text of the final update")
    p.add_argument("--delay", type=float, default=0.02, help="seconds between updates")
    args = p.parse_args()
    task = args.task
    reporter = Reporter(args.url, args.key)
    reporter.report(task, status="pending", stage="queued")
    for percent in range(0, 101, 10):
        reporter.report(task, status="processing", stage="generating", progress=percent)
        time.sleep(args.delay)
    reporter.report(task, stage="uploading")
    url = f"https://cdn.example.com/taskcast/{task}.png"
    reporter.report(task, status="completed", progress=100, stage=args.stage, image_url=url)
    if not reporter.flush(10):
        _note("some progress was not delivered; the generation itself is not affected")
    print(json.dumps(reporter.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
