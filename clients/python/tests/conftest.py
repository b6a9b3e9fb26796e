"""The suite runs against a live taskcast: scripts/py-test starts the real binary on a fresh
Postgres database and passes its address and secrets in TASKCAST_URL, TASKCAST_PUSH_KEY and
TASKCAST_SUBSCRIBE_SECRET, and the binary and database in TASKCAST_BIN and
TASKCAST_DATABASE_URL (for a second server with other settings, `server_with`). Without
them every test fails at setup, never skips."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import pytest

from proxy import CountingProxy


class Server:
    """The taskcast under test, spoken to with plain urllib (not the code under test)."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url.rstrip("/"), key

    def call(self, method: str, path: str, body: Optional[Any] = None) -> Dict[str, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def create_task(self) -> str:
        return self.call("POST", "/api/tasks", {"prompt": "pytest"})["task_id"]

    def create_cancellable(self) -> Tuple[str, str]:
        """A task, and a subscribe token that may cancel it (`"cancel": true`)."""
        created = self.call("POST", "/api/tasks", {"prompt": "pytest", "cancel": True})
        return created["task_id"], created["token"]

    def cancel(self, task: str, token: str) -> Dict[str, Any]:
        """What a page does: `POST /api/tasks/{id}/cancel` with its token."""
        request = urllib.request.Request(
            f"{self.url}/api/tasks/{task}/cancel",
            method="POST",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def state(self, task: str) -> Dict[str, Any]:
        return self.call("GET", f"/api/tasks/{task}")


@pytest.fixture(scope="session")
def server() -> Server:
    url, key = os.environ.get("TASKCAST_URL"), os.environ.get("TASKCAST_PUSH_KEY")
    if not url or not key:
        pytest.fail("TASKCAST_URL and TASKCAST_PUSH_KEY are not set: run scripts/py-test")
    return Server(url, key)


@pytest.fixture
def proxy(server: Server):
    """A counting HTTP proxy in front of the server (tests/proxy.py)."""
    counting = CountingProxy(server.url)
    yield counting
    counting.close()


@pytest.fixture
def server_with(server: Server, tmp_path) -> Iterator[Callable[..., Server]]:
    """Starts another real taskcast on the same database with the given settings, e.g.
    `server_with(TASKCAST_MAX_BATCH_ITEMS="2")`; stopped after the test."""
    binary, database = os.environ.get("TASKCAST_BIN"), os.environ.get("TASKCAST_DATABASE_URL")
    if not binary or not database:
        pytest.fail("TASKCAST_BIN and TASKCAST_DATABASE_URL are not set: run scripts/py-test")
    started = []

    def start(**settings: str) -> Server:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("NODE_ENV", "APP_ENV")}
        env.update(DATABASE_URL=database, TASK_PROCESS_SECRET_KEY=server.key, **settings)
        log = open(tmp_path / f"taskcast-{port}.log", "wb")
        process = subprocess.Popen(
            [binary, "--listen", f"127.0.0.1:{port}"], env=env, stdout=log, stderr=log
        )
        started.append((process, log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as ready:
                    if ready.status == 200:
                        return Server(url, server.key)
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"taskcast with {settings} did not start: see {log.name}")
            time.sleep(0.05)

    yield start
    for process, log in started:
        process.terminate()
        process.wait(15)
        log.close()
