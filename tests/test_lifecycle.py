"""Ending workflows: finish(), ends_workflow=True, release() and idle passivation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_sticky import release
from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster
from tests.conftest import start_cluster, unique

IDLE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def idle_app(prefix: str) -> Any:
    import os

    from tests.cluster_app import make_app

    os.environ["STICKY_TEST_IDLE_TIMEOUT"] = str(IDLE_TIMEOUT)
    try:
        app = make_app(f"{prefix}lc", sticky_idle_timeout=IDLE_TIMEOUT)
    finally:
        del os.environ["STICKY_TEST_IDLE_TIMEOUT"]
    app.finalize()
    return app


@pytest.fixture(scope="module")
def idle_cluster(idle_app: Any, prefix: str) -> Iterator[WorkerCluster]:
    sub = f"{prefix}lc"
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_IDLE_TIMEOUT": str(IDLE_TIMEOUT)}
    specs = {f"lc{i}@sticky-tests": {"queues": [f"{sub}.default"]} for i in (1, 2)}
    with start_cluster(idle_app, specs, env=env) as cluster:
        yield cluster


def _steps(app: Any, key: str, steps: range) -> list[int]:
    task = app.tasks["tests.cluster_app.record_step"]
    result: list[int] = []
    for step in steps:
        result = task.delay(key, step).get(timeout=30)
    return result


@pytest.mark.parametrize("ending", ["tests.cluster_app.finish_now", "tests.cluster_app.last_step"])
def test_ending_a_workflow_releases_and_forgets(
    ending: str, idle_app: Any, idle_cluster: Any
) -> None:
    key = unique("end")
    assert _steps(idle_app, key, range(3)) == [0, 1, 2]
    ended = idle_app.tasks[ending].delay(key).get(timeout=30)
    assert ended["state"] == {"steps": [0, 1, 2]}
    assert lease_store(idle_app).lookup("key", key) is None
    assert _steps(idle_app, key, range(1)) == [0], "the next task starts fresh"


def test_release_from_outside(idle_app: Any, idle_cluster: Any) -> None:
    key = unique("release")
    assert _steps(idle_app, key, range(2)) == [0, 1]
    assert release("key", key, app=idle_app).get(timeout=30) is True
    assert lease_store(idle_app).lookup("key", key) is None
    assert release("key", key, app=idle_app) is None, "nothing left to release"
    assert _steps(idle_app, key, range(1)) == [0]


def test_idle_keys_are_passivated(idle_app: Any, idle_cluster: Any) -> None:
    busy, idle = unique("busy"), unique("idle")
    _steps(idle_app, idle, range(2))
    deadline = time.monotonic() + 6 * IDLE_TIMEOUT
    step = 0
    while lease_store(idle_app).lookup("key", idle) is not None:
        assert time.monotonic() < deadline, "the idle key was never passivated"
        _steps(idle_app, busy, range(step, step + 1))  # keeps the other key busy
        step += 1
        time.sleep(IDLE_TIMEOUT / 4)
    assert lease_store(idle_app).lookup("key", busy) is not None, "a busy key was passivated"
    assert _steps(idle_app, busy, range(step, step + 1)) == list(range(step + 1))
    assert _steps(idle_app, idle, range(1)) == [0], "the passivated key starts fresh"
