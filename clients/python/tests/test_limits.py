"""A server whose batch limits are below the reporter's (a second real taskcast started with
small TASKCAST_MAX_BATCH_ITEMS or TASKCAST_MAX_BATCH_BODY_BYTES): a batch it refuses whole
for its size is sent again in smaller requests, and every update arrives."""

from __future__ import annotations

import asyncio

from proxy import CountingProxy
from taskcast import AsyncReporter, Reporter

BATCH = "/api/progress"


def url(i: int) -> str:
    return f"https://cdn.example.com/images/{i:02}/final-result.png"


def test_ten_tasks_to_a_server_taking_two_updates_per_batch_are_all_delivered(server_with):
    small = server_with(TASKCAST_MAX_BATCH_ITEMS="2")
    tasks = [small.create_task() for _ in range(10)]
    proxy = CountingProxy(small.url)
    try:
        reporter = Reporter(proxy.url, small.key, backoff=0.01)  # max_batch 100
        with reporter._cond:  # all ten wait together: one request, refused whole (400)
            for task in tasks:
                reporter.report(task, status="processing", progress=50)
        assert reporter.flush(10), reporter.stats
        stats = reporter.stats
        assert (stats["sent"], stats["failed"], stats["retried"]) == (10, 0, 0), stats
        assert proxy.count(BATCH) == 6, f"the ten, then five of two: {proxy.requests}"
        assert [small.state(t)["progress"] for t in tasks] == [50.0] * 10

        # The final updates: the lowered cap holds, no request is refused again.
        with reporter._cond:
            for i, task in enumerate(tasks):
                reporter.report(task, status="completed", progress=100, image_url=url(i))
        assert reporter.flush(10), reporter.stats
        stats = reporter.stats
        assert (stats["sent"], stats["failed"], stats["retried"]) == (20, 0, 0), stats
        assert proxy.count(BATCH) == 11, f"five of two: {proxy.requests}"
        states = [small.state(t) for t in tasks]
        assert [(s["status"], s["image_url"]) for s in states] == [
            ("completed", url(i)) for i in range(10)
        ]
    finally:
        proxy.close()


def test_ten_final_updates_to_a_server_with_a_smaller_batch_body_limit_are_all_delivered(
    server_with,
):
    # 1,500 bytes, far below the reporter's 256 KiB; the ten updates take about 2,000.
    small = server_with(TASKCAST_MAX_BATCH_BODY_BYTES="1500")
    tasks = [small.create_task() for _ in range(10)]
    proxy = CountingProxy(small.url)

    async def main():
        async with AsyncReporter(proxy.url, small.key, backoff=0.01) as reporter:
            for i, task in enumerate(tasks):
                reporter.report(task, status="completed", progress=100, image_url=url(i))
            assert await reporter.flush(10), reporter.stats
            return reporter.stats

    try:
        stats = asyncio.run(main())
        assert (stats["sent"], stats["failed"], stats["retried"]) == (10, 0, 0), stats
        assert proxy.count(BATCH) >= 3, f"refused (413), then in parts: {proxy.requests}"
        states = [small.state(t) for t in tasks]
        assert [(s["status"], s["image_url"]) for s in states] == [
            ("completed", url(i)) for i in range(10)
        ]
    finally:
        proxy.close()
