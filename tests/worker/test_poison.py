"""Poison is data: a malformed ``sticky`` header never stops a worker or a reaper.

Real workers, real Redis: messages published straight to the shared queue, to a
worker's direct queue and to a dead worker's queue, with headers a bug, another
version or an attacker could write. Each poison message must land in
``<prefix>.dead`` with its reason; every good message around it must still run,
the worker must stay up, and the reaper must still move a dead worker's queue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_sticky.context import lease_store
from tests.conftest import REPO, unique
from tests.hostile import HostileRun, dead_ids, publish_raw, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp"),
    reason="these tests read the dead-letter and direct queues as Redis lists; "
    "the code under test is the same on RabbitMQ, the assertions need a Redis broker",
)

POISON: dict[str, Any] = {
    "bool": True,
    "string": "order-1",
    "short list": ["key", "k"],
    "int key": ["key", 5, 0, 0],
    "negative hops": ["key", "k", 0, -1],
    "negative epoch": ["key", "k", -5, 0],
    "float epoch": ["key", "k", 1.5, 0],
    "long key": ["key", "k" * 300, 0, 0],
    "bad workflow": ["../../etc", "k", 0, 0],
    "bad affinity": ["key", "k", 0, 0, 0, "not a tag"],
    "dict": {"workflow": "key"},
    "lone surrogate": ["key", "k\ud800", 0, 0],
}


@pytest.fixture
def run(prefix: str, tmp_path: Path) -> Iterator[HostileRun]:
    this = HostileRun(
        f"{prefix}p{uuid.uuid4().hex[:4]}", tmp_path, env={"STICKY_TEST_LEASE_TTL": "3"}
    )
    yield this
    this.stop()


def _assert_dead(run: HostileRun, poisoned: dict[str, str]) -> None:
    dead = wait_for(
        lambda: (found := dead_ids(run.app, run.prefix)) and set(poisoned) <= set(found) and found,
        30,
        f"{len(poisoned)} message(s) in {run.prefix}.dead",
    )
    for task_id, label in poisoned.items():
        assert dead[task_id], f"{label}: no reason given"


def test_poison_on_the_shared_queue(run: HostileRun) -> None:
    cluster = run.start("h1@hostile-tests")
    key = unique("poison")
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    poisoned = {
        publish_raw(run.app, run.default_queue, (key, 99), sticky=value): label
        for label, value in POISON.items()
    }
    # A message without a header whose arguments cannot be decoded to find a key.
    poisoned[publish_raw(run.app, run.default_queue, sticky=None, body="[1, 2")] = "bad body"
    assert run.step.delay(key, 1).get(timeout=30) == [0, 1], "the worker went on"
    _assert_dead(run, poisoned)
    assert cluster.workers["h1@hostile-tests"].running
    log = cluster.workers["h1@hostile-tests"].log()
    assert "dead-lettered" in log
    assert "Unrecoverable error" not in log


def test_poison_in_a_direct_queue(run: HostileRun) -> None:
    cluster = run.start("h2@hostile-tests")
    key = unique("direct")
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    direct = run.direct_queue("h2@hostile-tests")
    poisoned = {
        publish_raw(run.app, direct, (key, 99), sticky=value): label
        for label, value in POISON.items()
    }
    assert run.step.delay(key, 1).get(timeout=30) == [0, 1]
    _assert_dead(run, poisoned)
    assert cluster.workers["h2@hostile-tests"].running


def test_poison_in_a_dead_workers_queue(run: HostileRun) -> None:
    """The reaper dead-letters the poison and still moves the good tasks on."""
    cluster = run.start("h3@hostile-tests", "h4@hostile-tests")
    store = lease_store(run.app)
    keys = [unique("reap") for _ in range(8)]
    for key in keys:
        run.step.delay(key, 0).get(timeout=30)
    victim = "h4@hostile-tests"
    owned = [k for k in keys if store.lookup("key", k).owner == victim]  # type: ignore[union-attr]
    assert owned, "placement gave the victim no key"
    cluster.kill(victim)
    queue = run.direct_queue(victim)
    poisoned = {
        publish_raw(run.app, queue, (owned[0], 99), sticky=value): label
        for label, value in POISON.items()
    }
    # Good tasks of the dead worker's keys, routed to its queue (its lease is pending).
    results = [run.step.delay(key, 1) for key in owned]
    for result in results:
        assert result.get(timeout=60)[-1] == 1, "moved on by the reaper and run"
    assert all(store.lookup("key", k).owner == "h3@hostile-tests" for k in owned)  # type: ignore[union-attr]
    _assert_dead(run, poisoned)
    dead = dead_ids(run.app, run.prefix)
    assert all(dead[task_id] for task_id in poisoned)
    assert cluster.workers["h3@hostile-tests"].running


def cli(run: HostileRun, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cluster_app:app", "sticky", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **run.env},
        cwd=str(REPO),
        timeout=120,
    )


def test_dead_letters_listed_and_requeued(run: HostileRun) -> None:
    """``celery sticky dead`` lists them; ``--requeue`` routes them from their arguments."""
    run.start("h5@hostile-tests")
    key = unique("requeue")
    poisoned = {
        publish_raw(run.app, run.default_queue, (key, step), sticky=value): label
        for step, (label, value) in enumerate(
            [("bool", True), ("short list", ["key", key]), ("string", key)]
        )
    }
    _assert_dead(run, poisoned)
    listed = cli(run, "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["dead"]
    assert {row["id"] for row in rows} == set(poisoned)
    assert all(row["reason"] and row["from"] == run.default_queue for row in rows)
    plain = cli(run, "dead")
    assert plain.returncode == 0 and "3 dead letter(s)" in plain.stdout, plain.stdout
    requeued = cli(run, "dead", "--requeue", "--json")
    assert requeued.returncode == 0, requeued.stderr
    assert len(json.loads(requeued.stdout)["requeued"]) == 3
    for task_id in poisoned:
        assert run.app.AsyncResult(task_id).get(timeout=30)
    assert dead_ids(run.app, run.prefix) == {}
    steps = run.step.delay(key, 3).get(timeout=30)
    assert sorted(steps) == [0, 1, 2, 3]
