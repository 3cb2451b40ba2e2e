"""Failover on real processes: kill -9, kill -STOP, SIGTERM drains, restarts.

Each test runs its own workers (their own key and queue prefix) with a short
lease TTL, really kills, pauses and restarts them, and asserts: every published
step ran, each key's state holds each step exactly once and in order, keys of
healthy workers never moved, and the failover bound held.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster
from tests.conftest import read_events, start_cluster, unique

TTL = 3.0
BOUND = TTL + 2.0


class Run:
    """One test's app, workers and recorded events."""

    def __init__(self, prefix: str, replication: str, tmp_path: Path) -> None:
        from tests.cluster_app import make_app

        self.prefix = prefix
        self.env = {
            "STICKY_TEST_PREFIX": prefix,
            "STICKY_TEST_LEASE_TTL": str(TTL),
            "STICKY_TEST_REPLICATION": replication,
            "STICKY_TEST_STATE_DIR": str(tmp_path / "state"),
        }
        self.app = make_app(prefix, sticky_lease_ttl=TTL, sticky_state_replication=replication)
        self.app.finalize()
        self.step = self.app.tasks["tests.cluster_app.record_step"]
        self.cluster: WorkerCluster | None = None
        self.logs = tmp_path / "logs"

    def start(self, *names: str) -> WorkerCluster:
        specs = {name: {"queues": [f"{self.prefix}.default"]} for name in names}
        self.cluster = start_cluster(self.app, specs, env=self.env, workdir=self.logs)
        return self.cluster

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.app.backend.client, self.prefix)

    def runs(self, key: str) -> list[dict[str, Any]]:
        """The key's step runs, the last run of each task id, by start time."""
        last: dict[str, dict[str, Any]] = {}
        for event in self.events():
            if event.get("key") == key and "step" in event:
                last[event["id"]] = event
        return sorted(last.values(), key=lambda e: e["start"])

    def owner(self, key: str) -> str:
        info = lease_store(self.app).lookup("key", key)
        assert info is not None
        return info.owner


@pytest.fixture
def run(prefix: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Run]:
    replication = getattr(request, "param", "sync")
    this = Run(f"{prefix}f{uuid.uuid4().hex[:4]}", replication, tmp_path)
    yield this
    if this.cluster is not None:
        this.cluster.stop_all()


def assert_exact(run: Run, finals: dict[str, list[Any]], steps: int) -> None:
    """State holds each step exactly once, in order; runs never overlapped."""
    for key, state in finals.items():
        runs = run.runs(key)
        seen = [
            (e["step"], e["node"][:2], e.get("recovered"), round(e["start"] % 100, 2)) for e in runs
        ]
        assert state == list(range(steps)), f"{key}: state {state}; runs {seen}"
        assert [e["step"] for e in runs] == list(range(steps)), key
        for before, after in itertools.pairwise(runs):
            assert after["start"] >= before["end"], f"{key}: steps overlapped"


def publish_all(run: Run, keys: list[str], steps: range, duration: float) -> dict[str, Any]:
    return {key: [run.step.delay(key, s, duration) for s in steps] for key in keys}


def test_kill_9_of_a_busy_worker(run: Run) -> None:
    cluster = run.start("f1@sticky-tests", "f2@sticky-tests", "f3@sticky-tests")
    keys = [unique("busy") for _ in range(12)]
    for key in keys:
        run.step.delay(key, 0, 0.0).get(timeout=30)
    owners = {key: run.owner(key) for key in keys}
    victim = max(set(owners.values()), key=list(owners.values()).count)
    pending = publish_all(run, keys, range(1, 8), 0.15)
    time.sleep(0.5)  # the victim is inside a step now
    killed_at = cluster.kill(victim)  # the time of the signal itself
    finals = {key: results[-1].get(timeout=60) for key, results in pending.items()}
    assert_exact(run, finals, 8)
    moved = [key for key in keys if owners[key] == victim]
    assert moved, "the victim owned keys"
    for key in keys:
        nodes = {e["node"] for e in run.runs(key)}
        if key in moved:
            after = [e for e in run.runs(key) if e["start"] > killed_at]
            assert after and after[0]["node"] != victim
            assert after[0]["start"] - killed_at <= BOUND, "failover bound"
        else:
            assert nodes == {owners[key]}, f"{key} of a healthy worker moved"


def test_kill_9_of_an_idle_worker_keeps_replicated_state(run: Run) -> None:
    cluster = run.start("f1@sticky-tests", "f2@sticky-tests")
    keys = [unique("idle") for _ in range(6)]
    for key in keys:
        for step in range(3):
            run.step.delay(key, step, 0.0).get(timeout=30)
    owners = {key: run.owner(key) for key in keys}
    victim = owners[keys[0]]
    killed_at = cluster.kill(victim)
    finals = {key: run.step.delay(key, 3, 0.0).get(timeout=60) for key in keys}
    assert_exact(run, finals, 4)
    for key in keys:
        last = run.runs(key)[-1]
        if owners[key] == victim:
            assert last["node"] != victim and last["recovered"] is True
            assert last["start"] - killed_at <= BOUND + 1, "failover bound"
        else:
            assert last["node"] == owners[key]


@pytest.mark.parametrize("run", ["on_handoff"], indirect=True)
def test_lost_state_is_said_not_hidden(run: Run) -> None:
    """Without a copy, a key taken over from a dead worker says its state was lost."""
    cluster = run.start("f1@sticky-tests", "f2@sticky-tests")
    plain, rebuilt = unique("lost"), f"rebuild-{uuid.uuid4().hex[:8]}"
    for key in (plain, rebuilt):
        run.step.delay(key, 0, 0.0).get(timeout=30)
        run.step.delay(key, 1, 0.0).get(timeout=30)
    victims = {run.owner(plain), run.owner(rebuilt)}
    for victim in victims:
        cluster.kill(victim)
    if len(victims) == 2:
        cluster.start("f3@sticky-tests", queues=[f"{run.prefix}.default"])
    assert run.step.delay(plain, 2, 0.0).get(timeout=60) == [2]
    assert run.step.delay(rebuilt, 2, 0.0).get(timeout=60) == ["rebuilt", 2]
    assert run.runs(plain)[-1]["recovered"] is False
    lost = [e["key"] for e in run.events() if e.get("lost")]
    assert sorted(lost) == sorted([plain, rebuilt])


def test_a_paused_owner_does_not_run_or_commit_after_it_resumes(run: Run) -> None:
    """kill -STOP of an owner past the TTL, then kill -CONT: the zombie commits nothing.

    On Redis, the one message the frozen worker's pending BRPOP took is in its
    socket until it resumes: it is forwarded then and runs after later steps
    (documented). Every step still applies exactly once.
    """
    cluster = run.start("f1@sticky-tests", "f2@sticky-tests")
    key = unique("zombie")
    run.step.delay(key, 0, 0.0).get(timeout=30)
    zombie = run.owner(key)
    inflight = run.step.delay(key, 1, 2.0)  # inside its body when paused
    time.sleep(0.5)
    cluster.signal(zombie, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        later = [run.step.delay(key, step, 0.0) for step in range(2, 5)]
        later[-1].get(timeout=60)
        assert run.owner(key) != zombie
    finally:
        cluster.signal(zombie, signal.SIGCONT)
    resumed_at = time.time()
    inflight.get(timeout=30)
    for result in later:
        result.get(timeout=30)
    run.step.delay(key, 5, 0.0).get(timeout=30)
    time.sleep(3.0)  # give the zombie time to misbehave
    final = run.app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
    steps = final["state"]["steps"]
    assert sorted(steps) == [0, 1, 2, 3, 4, 5], f"each step applied once: {steps}"
    assert steps[-1] == 5
    runs = run.runs(key)
    assert sorted(e["step"] for e in runs) == [0, 1, 2, 3, 4, 5]
    assert all(e["node"] != zombie for e in runs[1:]), "a zombie's run counted"
    late = [
        e
        for e in run.events()
        if e.get("key") == key and e.get("node") == zombie and e["start"] > resumed_at
    ]
    assert late == [], "the zombie started a task after it resumed"
    first_moved = min(e["start"] for e in runs if e["node"] != zombie)
    # On RabbitMQ the paused worker's prefetched tasks come back only when the broker
    # drops its connection, after two missed heartbeats (broker_heartbeat = 2 here).
    amqp = os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp")
    assert first_moved - stopped_at <= BOUND + (4.0 if amqp else 0.0), "failover bound"


@pytest.mark.parametrize("run", ["on_handoff"], indirect=True)
def test_sigterm_drain_under_a_stream_of_tasks(run: Run) -> None:
    cluster = run.start("f1@sticky-tests", "f2@sticky-tests", "f3@sticky-tests")
    keys = [unique("stream") for _ in range(15)]
    for key in keys:
        run.step.delay(key, 0, 0.0).get(timeout=30)
    owners = {key: run.owner(key) for key in keys}
    victim = owners[keys[0]]
    results: dict[str, list[Any]] = {key: [] for key in keys}
    steps = 12

    def stream() -> None:
        for step in range(1, steps):
            for key in keys:
                results[key].append(run.step.delay(key, step, 0.02))
            time.sleep(0.1)

    producer = threading.Thread(target=stream)
    producer.start()
    time.sleep(0.4)
    assert cluster.stop(victim, timeout=60) == 0
    producer.join()
    finals = {key: rs[-1].get(timeout=60) for key, rs in results.items()}
    assert_exact(run, finals, steps)
    for key in keys:
        nodes = [e["node"] for e in run.runs(key)]
        if owners[key] == victim:
            assert nodes[-1] != victim
            moved = [e for e in run.runs(key) if e["node"] != victim]
            assert moved[0]["recovered"] is True, "the state was handed over"
        else:
            assert set(nodes) == {owners[key]}, f"{key} of a healthy worker moved"
    assert "handed over" in cluster.workers[victim].log()


@pytest.mark.parametrize("wait", ["within", "after"])
def test_restart_with_the_same_name_and_disk(run: Run, wait: str) -> None:
    cluster = run.start("f1@sticky-tests", "f2@sticky-tests")
    keys = [unique("restart") for _ in range(6)]
    for key in keys:
        run.step.delay(key, 0, 0.0).get(timeout=30)
    owners = {key: run.owner(key) for key in keys}
    victim = owners[keys[0]]
    cluster.kill(victim)
    if wait == "after":
        deadline = time.monotonic() + 30
        while not any(w.name == victim and w.reaped for w in lease_store(run.app).workers()):
            assert time.monotonic() < deadline, "the dead worker was never reaped"
            time.sleep(0.2)
    cluster.start(victim, queues=[f"{run.prefix}.default"])
    finals = {key: run.step.delay(key, 1, 0.0).get(timeout=60) for key in keys}
    assert finals == {key: [0, 1] for key in keys}, "sessions survive the restart"
    for key in keys:
        assert [e["node"] for e in run.runs(key)] == [owners[key]] * 2, "no key moved"
