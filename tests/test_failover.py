"""Failover on real processes: kill -9, kill -STOP, SIGTERM drains, restarts.

Each test runs its own workers (their own key and queue prefix) with a short
lease TTL, really kills, pauses and restarts them, and asserts: every published
step ran, each key's state holds each step exactly once and in order, keys of
healthy workers never moved, and the failover bound held.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_sticky.context import get_config, lease_store
from celery_sticky.testing import WorkerCluster, wait_for
from celery_sticky.worker.reaper import move_queue
from tests.conftest import read_events, start_cluster, unique, wait_settled

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

    def start(self, *names: str, **env: str) -> WorkerCluster:
        """Start ``names`` (``env`` is added to theirs only) and wait until they registered."""
        specs = {name: {"queues": [f"{self.prefix}.default"], "env": env} for name in names}
        self.cluster = start_cluster(self.app, specs, env=self.env, workdir=self.logs)
        return self.cluster

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.app.backend.client, self.prefix)

    def step_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if "step" in e]

    def runs(self, key: str) -> list[dict[str, Any]]:
        """Every body run of the key's steps (a step run twice is there twice), by start."""
        found = [e for e in self.events() if e.get("key") == key and "step" in e]
        return sorted(found, key=lambda e: e["start"])

    def applied_runs(self, key: str, crashed: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The key's runs without those cut short by a crash: a run on a node of
        ``crashed`` whose step ran again later elsewhere (allowed, and counted)."""
        runs = self.runs(key)
        crashed = set(crashed)
        return [
            e
            for i, e in enumerate(runs)
            if not (
                e["node"] in crashed
                and any(
                    later["step"] == e["step"] and later["node"] != e["node"]
                    for later in runs[i + 1 :]
                )
            )
        ]

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


def assert_exact(
    run: Run, finals: dict[str, list[Any]], steps: int, crashed: Iterable[str] = ()
) -> int:
    """State holds each step exactly once, in order; no two runs overlapped; every
    body ran once, except runs cut short on a ``crashed`` node and run again (their
    number is returned). Every run counts: a step run twice is seen twice."""
    reruns = 0
    for key, state in finals.items():
        runs = run.runs(key)
        seen = [
            (e["step"], e["node"][:2], e.get("recovered"), round(e["start"] % 100, 2)) for e in runs
        ]
        assert state == list(range(steps)), f"{key}: state {state}; runs {seen}"
        applied = run.applied_runs(key, crashed)
        reruns += len(runs) - len(applied)
        assert [e["step"] for e in applied] == list(range(steps)), f"{key}: runs {seen}"
        for before, after in itertools.pairwise(runs):
            assert after["start"] >= before["end"], f"{key}: steps overlapped: {seen}"
    return reruns


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
    wait_for(  # the victim is busy with its keys' steps now
        lambda: any(e["node"] == victim and e["step"] >= 1 for e in run.step_events()),
        timeout=30,
    )
    killed_at = cluster.kill(victim)  # the time of the signal itself
    finals = {key: results[-1].get(timeout=60) for key, results in pending.items()}
    assert_exact(run, finals, 8, crashed=[victim])
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
    assert_exact(run, finals, 4, crashed=[victim])
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
        wait_settled(run.app, run.owner(key), "key", key)  # acknowledged before the kill
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


def test_a_frozen_owner_commits_nothing_visible(run: Run, tmp_path: Path) -> None:
    """The owner's whole group (pool child included) freezes right after its fence
    passed (fault point ``after_fence:stop``); another worker takes the key over once
    the lease store says the owner is dead; then the zombie resumes.

    Nothing the zombie did may be visible: not in the owner's state, not in the
    hand-over copy (the new owner is killed afterwards, so the next one rebuilds the
    key from that copy), not in the order of the steps, and it starts no task under
    its stale lease.
    """
    marker = tmp_path / "fault-marker"
    zombie = "f1@sticky-tests"
    cluster = run.start(
        zombie, STICKY_TEST_FAULT="after_fence:stop", STICKY_TEST_FAULT_MARKER=str(marker)
    )
    key = unique("zombie")
    inflight = run.step.delay(key, 0, 0.0)
    wait_for(marker.exists, timeout=30, message="the owner never reached its fence")
    stopped_at = time.time()
    cluster.workers[zombie].paused = True  # the fault point froze the whole group
    for name in ("f2@sticky-tests", "f3@sticky-tests"):
        cluster.start(name, queues=[f"{run.prefix}.default"], wait=False)
    cluster.wait_registered(["f2@sticky-tests", "f3@sticky-tests"], timeout=60)
    wait_for(
        lambda: any(w.name == zombie and not w.alive for w in lease_store(run.app).workers()),
        timeout=4 * TTL,
        message="the frozen owner's lease never expired",
    )
    later = [run.step.delay(key, step, 0.0) for step in range(1, 4)]
    later[-1].get(timeout=60)
    successor = run.owner(key)
    assert successor != zombie
    wait_for(
        lambda: any(e["step"] == 0 and e["node"] != zombie for e in run.runs(key)),
        timeout=30,
        message="step 0 never ran on the new owner",
    )
    log_before = len(cluster.workers[zombie].log())
    resumed_at = cluster.resume(zombie)
    # Whatever the zombie does with step 0 once it resumes is over when it logs the
    # task's end (succeeded, or discarded by a working fence).
    wait_for(
        lambda: inflight.id in cluster.workers[zombie].log()[log_before:],
        timeout=30,
        message="the zombie never finished step 0",
    )
    cluster.kill(successor)
    run.step.delay(key, 4, 0.0).get(timeout=90)
    final = run.app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=60)
    runs = run.runs(key)
    seen = [(e["step"], e["node"][:2], round(e["start"] % 100, 2)) for e in runs]
    assert final["state"]["steps"] == [0, 1, 2, 3, 4], f"state {final['state']}; runs {seen}"
    # Once it rejoined (registered again) the old owner is a live worker like any
    # other and may be given the key anew, under a newer epoch; under its stale lease
    # it must start nothing.
    stale = max(e["epoch"] for e in runs if e["node"] == zombie and e["start"] < resumed_at)
    late = [
        e for e in runs if e["node"] == zombie and e["start"] > resumed_at and e["epoch"] <= stale
    ]
    assert late == [], "the zombie started a task under its stale lease after it resumed"
    first_moved = min(e["start"] for e in runs if e["node"] != zombie)
    # On RabbitMQ the paused worker's prefetched tasks come back only when the broker
    # drops its connection, after two missed heartbeats (broker_heartbeat = 2 here).
    amqp = os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp")
    assert first_moved - stopped_at <= BOUND + 2 + (4.0 if amqp else 0.0), "failover bound"


def ready_in(app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` (not taken by a consumer), on either broker."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        if connection.transport.driver_type == "redis":
            return int(channel.client.llen(queue))  # passive declare: 404 once it is empty
        _name, count, _consumers = channel.queue_declare(queue, passive=True)
    return int(count)


def test_a_key_taken_over_before_its_first_commit_keeps_order(run: Run) -> None:
    """Its owner dies (fault point ``after_run:kill``) before the key's first commit;
    another worker takes the key over with no copy, which under ``sync`` replication
    means nothing was lost: not the state, and not which numbers ran (none). So a
    second producer's step 3, routed to the new owner while its steps 1 and 2 are still
    on their way (parked, as in a dead worker's queue a reaper has yet to move), waits
    for them. (It ran first when a take-over without a copy was taken for lost state,
    whose record runs a stream it does not know from its lowest arrival: seen in CI on
    RabbitMQ as ``[3, 0, 1, 2, 4]``.)"""
    from tests.cluster_app import make_app

    victim = "f1@sticky-tests"
    marker = run.logs.parent / "fault-marker"
    cluster = run.start(
        victim, STICKY_TEST_FAULT="after_run:kill", STICKY_TEST_FAULT_MARKER=str(marker)
    )
    cluster.start("f2@sticky-tests", queues=[f"{run.prefix}.default"])
    key = unique("first")
    first = run.step.delay(key, 0, 0.0)
    wait_for(lambda: not cluster.workers[victim].running, timeout=30, message="no kill")
    assert first.get(timeout=60) == [0]  # on f2, from the victim's restored in-flight list
    producer = make_app(run.prefix, sticky_lease_ttl=TTL, sticky_state_replication="sync")
    try:
        producer.finalize()
        step = producer.tasks["tests.cluster_app.record_step"]
        parked = f"{run.prefix}.parked"  # nobody consumes it
        for number in (1, 2):
            step.apply_async((key, number, 0.0), queue=parked)
        third = step.delay(key, 3, 0.0)
        # Taken from f2's queue (its gate holds it, or ran it: Celery logs it received
        # only when the gate lets it go).
        owner_queue = get_config(run.app).direct_queue_name("f2@sticky-tests")
        wait_for(lambda: ready_in(producer, owner_queue) == 0, timeout=30, message="not taken")
        assert move_queue(producer, lease_store(producer), parked, restore=False) == 2
        assert third.get(timeout=60) == [0, 1, 2, 3]
    finally:
        producer.close()
    runs = run.applied_runs(key, crashed=[victim])  # step 0's body ran on f1 too
    assert [e["step"] for e in runs] == [0, 1, 2, 3], runs
    assert runs[0]["node"] == "f2@sticky-tests" and runs[0]["recovered"] is None, runs[0]


@pytest.mark.parametrize("run", ["on_handoff"], indirect=True)
def test_sigterm_drain_under_a_stream_of_tasks(run: Run) -> None:
    """A step running when the drain starts finishes and commits, but its
    acknowledgement finds the channel closed: its message goes back and moves on
    with the key. The new owner finds it in the applied records its copy brought,
    and does not run its body again (before the fix it did, and the commit then
    found it applied: the body ran twice, the effect once)."""
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
    wait_for(lambda: any(e["step"] >= 1 for e in run.step_events()), timeout=30)  # streaming
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
        wait_for(
            lambda: any(w.name == victim and w.reaped for w in lease_store(run.app).workers()),
            timeout=30,
            message="the dead worker was never reaped",
        )
    cluster.start(victim, queues=[f"{run.prefix}.default"])
    finals = {key: run.step.delay(key, 1, 0.0).get(timeout=60) for key in keys}
    assert finals == {key: [0, 1] for key in keys}, "sessions survive the restart"
    for key in keys:
        assert [e["node"] for e in run.runs(key)] == [owners[key]] * 2, "no key moved"
