"""Requests per flush and updates/s of the Python reporters for a worker with 1, 10 and 100
tasks at once, against a live taskcast, requests counted at a proxy (tests/proxy.py).
Prints, never asserts; not collected by pytest. After a round to warm up, each round
reports one update per task and flushes, 50 rounds per size.

    TASKCAST_URL=http://127.0.0.1:8080 TASKCAST_PUSH_KEY=... \\
      python3 clients/python/tests/bench_reporter.py [thread|async]

With PYTHONPATH pointing at another copy of clients/python (e.g. main's, from
`git archive`), it measures that copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request

import taskcast
from proxy import CountingProxy

ROUNDS = 50


def create_task(url: str, key: str) -> str:
    request = urllib.request.Request(
        url + "/api/tasks", data=b"{}", method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())["task_id"]


def rounds_thread(reporter: taskcast.Reporter, tasks: list, proxy: CountingProxy):
    started = warm = 0.0
    for round_ in range(ROUNDS + 1):
        if round_ == 1:  # round 0 warms up
            started, warm = time.perf_counter(), proxy.total()
        for task in tasks:
            reporter.report(task, status="processing", progress=100 * round_ / ROUNDS)
        if not reporter.flush(30):
            raise RuntimeError(f"not delivered: {reporter.stats}")
    return time.perf_counter() - started, proxy.total() - warm


async def rounds_async(url: str, key: str, tasks: list, proxy: CountingProxy):
    started = warm = 0.0
    async with taskcast.AsyncReporter(url, key) as reporter:
        for round_ in range(ROUNDS + 1):
            if round_ == 1:
                started, warm = time.perf_counter(), proxy.total()
            for task in tasks:
                reporter.report(task, status="processing", progress=100 * round_ / ROUNDS)
            if not await reporter.flush(30):
                raise RuntimeError(f"not delivered: {reporter.stats}")
    return time.perf_counter() - started, proxy.total() - warm


def main() -> None:
    flavour = sys.argv[1] if len(sys.argv) > 1 else "thread"
    url, key = os.environ["TASKCAST_URL"].rstrip("/"), os.environ["TASKCAST_PUSH_KEY"]
    print(f"{flavour} reporter of {os.path.dirname(taskcast.__file__)}; {ROUNDS} rounds per size")
    for n in (1, 10, 100):
        tasks = [create_task(url, key) for _ in range(n)]
        proxy = CountingProxy(url)
        if flavour == "async":
            seconds, requests = asyncio.run(rounds_async(proxy.url, key, tasks, proxy))
        else:
            seconds, requests = rounds_thread(taskcast.Reporter(proxy.url, key), tasks, proxy)
        proxy.close()
        print(f"{n:3} tasks: {requests / ROUNDS:6.2f} requests per flush, "
              f"{n * ROUNDS / seconds:5.0f} updates/s ({requests} requests, {seconds:.2f} s)")


if __name__ == "__main__":
    main()
