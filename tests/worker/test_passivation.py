"""Passivation ends idle keys only: a key with a countdown task waiting is not idle,
and celery-sticky's own tasks never make a key look idle (real workers)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from celery_sticky.context import lease_store
from tests.conftest import unique
from tests.hostile import HostileRun, wait_for

IDLE = 1.5


@pytest.fixture(scope="module")
def run(prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    this = HostileRun(
        f"{prefix}pv{uuid.uuid4().hex[:4]}",
        tmp_path_factory.mktemp("passivation"),
        env={"STICKY_TEST_IDLE_TIMEOUT": str(IDLE)},
        sticky_idle_timeout=IDLE,
    )
    this.start("pv1@hostile-tests")
    yield this
    this.stop()


def test_a_countdown_task_keeps_its_key(run: HostileRun) -> None:
    key = unique("countdown")
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    waiting = run.step.apply_async((key, 1), countdown=4 * IDLE)
    # Meanwhile the key's last task ended long ago: idle, were it not for the countdown.
    assert waiting.get(timeout=60) == [0, 1], "the key's state was passivated while a task waited"


def test_end_workflow_does_not_make_the_key_idle_again(run: HostileRun) -> None:
    key = unique("ended")
    store = lease_store(run.app)
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    wait_for(lambda: store.lookup("key", key) is None, 10 * IDLE, "the idle key to be passivated")
    # Once ended, nothing may claim it again (end_workflow marking it idle would, every
    # sticky_idle_timeout: claim a new epoch, then release it).
    deadline = time.monotonic() + 4 * IDLE
    while time.monotonic() < deadline:
        assert store.lookup("key", key) is None, "the ended key was claimed again"
        time.sleep(0.05)
    assert run.step.delay(key, 1).get(timeout=30) == [1]
