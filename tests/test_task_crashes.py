"""Exactly-once state effects across ``kill -9`` of a worker, on real processes.

The killed worker restarts with the same name and state directory and takes back
the messages its previous process had taken (on Redis they would otherwise come
back only after the broker's visibility timeout, an hour by default); each is
run again or recognized as applied, and its effects land once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from celery_sticky.testing import WorkerCluster
from tests.conftest import REPO, read_events, unique

NODE = "crash@sticky-tests"


@pytest.fixture(scope="module")
def crash_prefix(prefix: str) -> str:
    return f"{prefix}cr"


@pytest.fixture(scope="module")
def crash_app(crash_prefix: str) -> Any:
    from tests.cluster_app import make_app

    app = make_app(crash_prefix)
    app.finalize()
    return app


def _cluster(app: Any, prefix: str, tmp_path: Path) -> WorkerCluster:
    env = {"STICKY_TEST_PREFIX": prefix}  # Redis's default visibility timeout: an hour
    return WorkerCluster(app, "tests.cluster_app:app", tmp_path, env=env, cwd=str(REPO))


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_kill_inside_the_body_applies_the_write_once(
    crash_app: Any, crash_prefix: str, tmp_path: Path
) -> None:
    workers = _cluster(crash_app, crash_prefix, tmp_path)
    queues = [f"{crash_prefix}.default"]
    key = unique("killed")
    try:
        workers.start(NODE, queues=queues, env={"STICKY_TEST_SLOW_WRITE": "30"})
        step = crash_app.tasks["tests.cluster_app.record_step"]
        assert step.delay(key, 0).get(timeout=30) == [0]
        pending = crash_app.tasks["tests.cluster_app.slow_write"].delay(key, 1)

        def inside() -> bool:
            return any(
                e["key"] == key and e.get("inside")
                for e in read_events(crash_app.backend.client, crash_prefix)
            )

        _wait_for(inside, 30, "the task never reached its body")
        workers.kill(NODE)  # the write is buffered, not committed
        workers.start(NODE, queues=queues, env={"STICKY_TEST_SLOW_WRITE": "0"})
        assert pending.get(timeout=60) == [0, 1]
        assert step.delay(key, 2).get(timeout=30) == [0, 1, 2]
    finally:
        workers.stop_all()


def test_kill_between_commit_and_outbox_sends_each_message_once(
    crash_app: Any, crash_prefix: str, tmp_path: Path
) -> None:
    workers = _cluster(crash_app, crash_prefix, tmp_path)
    queues = [f"{crash_prefix}.default"]
    marker = tmp_path / "crashed"
    key, target = unique("fan"), unique("target")
    try:
        worker = workers.start(
            NODE, queues=queues, env={"STICKY_TEST_CRASH_BEFORE_OUTBOX": str(marker)}
        )
        pending = crash_app.tasks["tests.cluster_app.fan_out"].delay(key, target, 3)
        _wait_for(lambda: not worker.running, 30, "the worker did not crash after its commit")
        assert marker.exists()
        workers.start(NODE, queues=queues, env={"STICKY_TEST_CRASH_BEFORE_OUTBOX": str(marker)})
        ids = pending.get(timeout=60)  # redelivered: recognized as applied
        assert [crash_app.AsyncResult(i).get(timeout=60) for i in ids][-1] == [0, 1, 2]
        seen = read_events(crash_app.backend.client, crash_prefix)
        assert [e["step"] for e in seen if e["key"] == target] == [0, 1, 2]
        state = crash_app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
        assert state["state"] == {"fanned": 1}
        assert "left in the outbox" in worker.log()
    finally:
        workers.stop_all()
    assert not os.environ.get("STICKY_TEST_CRASH_BEFORE_OUTBOX")
