"""A node's registration on real workers: one process per node name, and a worker that
was presumed dead while it was only paused rejoining before it takes work again."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_sticky.context import lease_store
from celery_sticky.testing import wait_for
from tests.conftest import REPO
from tests.worker.test_execution import TTL, Run


@pytest.fixture
def run(prefix: str, tmp_path: Path) -> Iterator[Run]:
    this = Run(f"{prefix}n{uuid.uuid4().hex[:5]}", tmp_path)
    try:
        yield this
    finally:
        if this.cluster is not None:
            this.cluster.stop_all()


def _info(run: Run, name: str) -> object:
    return next((w for w in lease_store(run.app).workers() if w.name == name), None)


def test_a_second_process_with_a_live_node_name_refuses_to_start(run: Run) -> None:
    """Two processes under one name would split a key's state between two disks: the
    second one exits with a one-line error naming the node and the first's host and
    pid; the first goes on. After the first is killed, a new process under its name
    starts at once (same host, old pid gone), without waiting for the TTL."""
    name = "same@node-tests"
    cluster = run.start(name)
    first = cluster.workers[name]
    argv = [*first.argv]
    second = subprocess.Popen(
        argv,
        env={**first.env, **run.env},
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = second.communicate(timeout=60)
    finally:
        if second.poll() is None:  # it did not refuse: stop it and its pool
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(10)
    assert second.returncode != 0, output[-3000:]
    assert f"node name {name} is in use by another live worker process" in output
    assert f"pid {first.pid}" in output
    # On its way out it touched nothing of the first's: not marked draining, not drained.
    info = _info(run, name)
    assert getattr(info, "alive", False) and not getattr(info, "draining", True), info
    key = f"still-{uuid.uuid4().hex[:6]}"
    assert run.step(key, 0).get(timeout=30) == [0]  # the first one still works

    cluster.kill(name)
    restarted = cluster.restart(name, timeout=2 * TTL)  # registers within the TTL
    assert restarted.running
    assert run.step(key, 1).get(timeout=30) == [0, 1]


def test_a_worker_reaped_while_paused_rejoins_before_it_takes_work(run: Run) -> None:
    """Paused (whole group) past the TTL, the worker is reaped by another. When it
    resumes, it learns it was reaped, drops what moved and registers again: it is
    alive and no longer marked reaped. (It used to stay marked reaped while alive, so
    a later real death let a publish take its keys over before its queue moved.)"""
    cluster = run.start("paused@node-tests", "reaper@node-tests")
    cluster.pause("paused@node-tests")
    try:
        wait_for(
            lambda: getattr(_info(run, "paused@node-tests"), "reaped", False),
            timeout=6 * TTL,
            message="the paused worker was never reaped",
        )
    finally:
        cluster.resume("paused@node-tests")
    wait_for(
        lambda: (
            (info := _info(run, "paused@node-tests")) is not None
            and getattr(info, "alive", False)
            and not getattr(info, "reaped", True)
        ),
        timeout=6 * TTL,
        message="the resumed worker never rejoined",
    )
    log = cluster.workers["paused@node-tests"].log()
    assert "was presumed dead" in log and "rejoined" in log
