"""The thread-based and asyncio reporters against a live taskcast."""

from __future__ import annotations

import asyncio
import uuid

from taskcast import AsyncReporter, Reporter


def test_reporter_walks_a_task_to_completed_and_flush_says_delivered(server):
    task = server.create_task()
    reporter = Reporter(server.url, server.key)
    reporter.report(task, status="processing", stage="generating", progress=40)
    reporter.report(task, status="completed", progress=100, image_url="https://cdn.example.com/a.png")
    assert reporter.flush(10)
    state = server.state(task)
    assert (state["status"], state["progress"], state["stage"]) == ("completed", 100.0, "generating")
    assert state["image_url"] == "https://cdn.example.com/a.png"
    assert reporter.stats["failed"] == 0


def test_updates_waiting_for_several_tasks_go_in_one_batch_request(server):
    tasks = [server.create_task() for _ in range(5)]
    reporter = Reporter(server.url, server.key)
    # Holding the reporter's lock keeps its sender from taking the first update alone, so
    # all five wait together, as they do when a generator reports faster than one round trip.
    with reporter._cond:
        for i, task in enumerate(tasks):
            reporter.report(task, status="processing", progress=10 * (i + 1))
    assert reporter.flush(10)
    assert reporter.stats["batches"] == 1 and reporter.stats["sent"] == 5, reporter.stats
    assert [server.state(t)["progress"] for t in tasks] == [10.0, 20.0, 30.0, 40.0, 50.0]


def test_a_refused_item_in_a_batch_fails_alone_without_retries(server):
    task = server.create_task()
    missing = str(uuid.uuid4())
    reporter = Reporter(server.url, server.key)
    with reporter._cond:
        reporter.report(missing, progress=5)
        reporter.report(task, progress=7)
    assert not reporter.flush(10), "a failed update makes flush report a loss"
    stats = reporter.stats
    assert (stats["sent"], stats["failed"], stats["retried"], stats["batches"]) == (1, 1, 0, 1), stats
    assert server.state(task)["progress"] == 7.0


def test_a_wrong_key_is_not_retried_and_flush_reports_the_loss(server):
    task = server.create_task()
    reporter = Reporter(server.url, "not-the-key")
    reporter.report(task, progress=50)
    assert not reporter.flush(5)
    assert (reporter.stats["failed"], reporter.stats["retried"]) == (1, 0), reporter.stats
    assert server.state(task)["version"] == 0


def test_an_unreachable_server_is_retried_then_counted_failed():
    # A port nothing listens on: connection refused, retried with backoff, then given up.
    reporter = Reporter("http://127.0.0.1:9", "key", attempts=3, backoff=0.01)
    reporter.report("task", progress=1)
    assert not reporter.flush(10)
    assert (reporter.stats["retried"], reporter.stats["failed"]) == (2, 1), reporter.stats


def test_pushes_to_a_finished_task_are_refused_and_remembered(server):
    task = server.create_task()
    server.call("POST", f"/api/tasks/{task}/progress", {"status": "cancelled"})
    reporter = Reporter(server.url, server.key)
    reporter.report(task, progress=60)
    assert not reporter.flush(5)
    assert "cancelled" in (reporter.finished(task) or ""), reporter.finished(task)
    assert reporter.stats["retried"] == 0


def test_async_reporter_batches_tasks_reported_before_it_runs(server):
    tasks = [server.create_task() for _ in range(3)]

    async def main():
        async with AsyncReporter(server.url, server.key) as reporter:
            # report() is synchronous: all three wait before the sender task first runs.
            for task in tasks:
                reporter.report(task, status="processing", stage="denoising", progress=33)
            assert await reporter.flush(10)
            reporter.report(tasks[0], status="completed", progress=100)
            assert await reporter.flush(10)
            return reporter.stats

    stats = asyncio.run(main())
    assert (stats["batches"], stats["sent"], stats["failed"]) == (1, 4, 0), stats
    assert server.state(tasks[0])["status"] == "completed"
    assert server.state(tasks[2])["stage"] == "denoising"


def test_the_old_module_name_still_imports_the_reporter():
    import taskcast_reporter

    assert taskcast_reporter.Reporter is Reporter


def test_both_reporters_see_cancel_requested_in_push_answers_single_and_batched(server):
    (task, token), (other, other_token) = server.create_cancellable(), server.create_cancellable()
    reporter = Reporter(server.url, server.key)
    reporter.report(task, status="processing", progress=10)
    assert reporter.flush(10)
    assert not reporter.is_cancel_requested(task)
    server.cancel(task, token)
    server.cancel(other, other_token)
    reporter.report(task, progress=20)  # alone: POST /api/tasks/{id}/progress
    assert reporter.flush(10)
    assert reporter.is_cancel_requested(task)
    with reporter._cond:  # both wait together: one POST /api/progress
        reporter.report(other, progress=5)
        reporter.report(task, status="cancelled")
    assert reporter.flush(10)
    assert reporter.stats["batches"] == 1, reporter.stats
    assert reporter.is_cancel_requested(other)
    assert not reporter.is_cancel_requested(task), "forgotten once reported final"
    assert server.state(task)["status"] == "cancelled"

    async def run_async() -> bool:
        async with AsyncReporter(server.url, server.key) as aio:
            aio.report(other, progress=6)
            assert await aio.flush(10)
            return aio.is_cancel_requested(other)

    assert asyncio.run(run_async())
