"""Several tasks' updates in one `POST /api/progress`, counted at a proxy in front of the
live taskcast: each item answered, refused, retried and read on its own."""

from __future__ import annotations

import asyncio

from taskcast import AsyncReporter, Reporter

BATCH = "/api/progress"
SINGLE = "/api/tasks/{id}/progress"


def test_fifty_tasks_reported_at_once_take_far_fewer_than_fifty_requests(server, proxy):
    tasks = [server.create_task() for _ in range(50)]
    reporter = Reporter(proxy.url, server.key)
    for i, task in enumerate(tasks):
        reporter.report(task, status="processing", progress=i + 1)
    assert reporter.flush(10), reporter.stats
    assert [server.state(t)["progress"] for t in tasks] == [float(i + 1) for i in range(50)]
    print(f"50 tasks: {proxy.count(BATCH)} batch + {proxy.count(SINGLE)} single requests")
    assert proxy.total() <= 5, proxy.requests
    assert (reporter.stats["sent"], reporter.stats["failed"]) == (50, 0), reporter.stats


def test_async_reporter_sends_fifty_tasks_in_one_request(server, proxy):
    tasks = [server.create_task() for _ in range(50)]

    async def main():
        async with AsyncReporter(proxy.url, server.key) as reporter:
            for task in tasks:
                reporter.report(task, progress=50)
            assert await reporter.flush(10)
            return reporter.stats

    stats = asyncio.run(main())
    assert (proxy.count(BATCH), proxy.total()) == (1, 1), proxy.requests
    assert (stats["sent"], stats["batches"]) == (50, 1), stats
    assert all(server.state(t)["progress"] == 50.0 for t in tasks)


def test_max_batch_bytes_splits_the_waiting_updates_into_smaller_requests(server, proxy):
    tasks = [server.create_task() for _ in range(10)]

    async def main():
        async with AsyncReporter(proxy.url, server.key, max_batch_bytes=300) as reporter:
            for task in tasks:
                reporter.report(task, progress=40)
            assert await reporter.flush(10)
            return reporter.stats

    stats = asyncio.run(main())
    assert stats["sent"] == 10, stats
    assert proxy.total() >= 4, proxy.requests
    assert proxy.largest[BATCH] <= 300, proxy.largest


def test_an_update_to_a_finished_task_fails_alone_and_the_rest_of_its_request_is_delivered(
    server, proxy
):
    tasks = [server.create_task() for _ in range(4)]
    done = tasks[2]
    server.call("POST", f"/api/tasks/{done}/progress", {"status": "completed"})
    reporter = Reporter(proxy.url, server.key)
    with reporter._cond:  # all four wait together: one request
        for task in tasks:
            reporter.report(task, progress=30)
    assert not reporter.flush(10), "the refused update is a loss"
    assert (proxy.count(BATCH), proxy.total()) == (1, 1), proxy.requests
    stats = reporter.stats
    assert (stats["sent"], stats["failed"], stats["retried"]) == (3, 1, 0), stats
    assert "completed" in (reporter.finished(done) or ""), reporter.finished(done)
    assert [reporter.finished(t) for t in tasks if t != done] == [None] * 3
    assert [server.state(t)["progress"] for t in tasks] == [30.0, 30.0, None, 30.0]


def test_a_batch_request_answered_503_as_a_whole_is_retried_and_delivered(server, proxy):
    tasks = [server.create_task() for _ in range(5)]
    proxy.refuse_next(BATCH, times=1)
    reporter = Reporter(proxy.url, server.key, backoff=0.01)
    with reporter._cond:
        for task in tasks:
            reporter.report(task, status="processing", progress=60)
    assert reporter.flush(10), reporter.stats
    assert proxy.count(BATCH) == 2, proxy.requests
    stats = reporter.stats
    assert (stats["sent"], stats["retried"], stats["failed"]) == (5, 5, 0), stats
    assert [server.state(t)["version"] for t in tasks] == [1] * 5, "each applied once"


def test_the_async_reporter_retries_a_whole_503_too(server, proxy):
    tasks = [server.create_task() for _ in range(3)]
    proxy.refuse_next(BATCH, times=2)

    async def main():
        async with AsyncReporter(proxy.url, server.key, backoff=0.01) as reporter:
            for task in tasks:
                reporter.report(task, progress=70)
            assert await reporter.flush(10)
            return reporter.stats

    stats = asyncio.run(main())
    assert proxy.count(BATCH) == 3, proxy.requests
    assert (stats["sent"], stats["retried"]) == (3, 6), stats
    assert all(server.state(t)["progress"] == 70.0 for t in tasks)


def test_cancel_requested_is_read_per_task_from_one_batch_answer(server, proxy):
    (asked, token), (other, _) = server.create_cancellable(), server.create_cancellable()
    plain = server.create_task()
    server.cancel(asked, token)
    reporter = Reporter(proxy.url, server.key)
    with reporter._cond:
        for task in (other, asked, plain):
            reporter.report(task, status="processing", progress=10)
    assert reporter.flush(10)
    assert (proxy.count(BATCH), proxy.total()) == (1, 1), proxy.requests
    seen = [reporter.is_cancel_requested(t) for t in (other, asked, plain)]
    assert seen == [False, True, False]

    async def run_async():
        async with AsyncReporter(proxy.url, server.key) as aio:
            for task in (plain, asked, other):
                aio.report(task, progress=20)
            assert await aio.flush(10)
            return [aio.is_cancel_requested(t) for t in (plain, asked, other)]

    assert asyncio.run(run_async()) == [False, True, False]
    assert proxy.count(BATCH) == 2, proxy.requests


def test_a_retried_update_folded_into_a_newer_one_counts_as_conflated_not_retried(server, proxy):
    task = server.create_task()
    reporter = Reporter(proxy.url, server.key, backoff=0.01)
    proxy.refuse_next(f"/api/tasks/{task}/progress", times=1)
    newer = []

    def report_newer(_path: str) -> None:  # while the first update is in flight
        if not newer:
            newer.append(True)
            reporter.report(task, stage="newer")

    proxy.on_request = report_newer
    reporter.report(task, progress=10)
    assert reporter.flush(10), reporter.stats
    stats = reporter.stats
    assert (stats["sent"], stats["retried"], stats["conflated"]) == (1, 0, 1), stats
    state = server.state(task)
    assert (state["progress"], state["stage"]) == (10.0, "newer")
