"""The per-task protocol under the faults that used to break it (issue 13).

Each test runs its own real workers (own prefix, node names ``*@fence-tests``, a
3 s lease TTL) and makes one hole of the old fence happen on every run: an ETA task
due after its key changed epoch, a ``sticky_on_state_lost`` hook that fails once, a
hand-over store that fails after the local commit, a zombie's outbox, and a fenced
task re-sent to the key's owner. The zombie that commits after its fence is in
``tests/testing/test_nemesis.py``; node names and rejoining in ``test_node.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_sticky import release
from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster, wait_for
from celery_sticky.testing.redis_server import RedisServer
from tests.conftest import read_events, start_cluster

TTL = 3.0


class Run:
    """One test's app, workers and recorded events."""

    def __init__(
        self, prefix: str, tmp_path: Path, ttl: float = TTL, lease_url: str = "", **env: str
    ) -> None:
        from tests.cluster_app import make_app

        self.prefix = prefix
        replication = env.get("STICKY_TEST_REPLICATION", "on_handoff")
        self.env = {
            "STICKY_TEST_PREFIX": prefix,
            "STICKY_TEST_LEASE_TTL": str(ttl),
            "STICKY_TEST_STATE_DIR": str(tmp_path / "state"),
            "STICKY_TEST_REPLICATION": replication,
            **({"STICKY_TEST_LEASE_URL": lease_url} if lease_url else {}),
            **env,
        }
        settings = {"sticky_redis_url": lease_url} if lease_url else {}
        self.app = make_app(
            prefix, sticky_lease_ttl=ttl, sticky_state_replication=replication, **settings
        )
        self.app.finalize()
        self.tasks = self.app.tasks
        self.cluster: WorkerCluster | None = None
        self.logs = tmp_path / "logs"

    def start(self, *names: str, **env: str) -> WorkerCluster:
        specs = {name: {"queues": [f"{self.prefix}.default"], "env": env} for name in names}
        cluster = start_cluster(self.app, specs, env=self.env, workdir=self.logs)
        if self.cluster is None:
            self.cluster = cluster
        else:
            self.cluster.workers.update(cluster.workers)
        return self.cluster

    def step(self, key: str, step: int, **options: Any) -> Any:
        return self.tasks["tests.cluster_app.record_step"].apply_async((key, step), **options)

    def state(self, key: str) -> dict[str, Any]:
        reply: dict[str, Any] = self.tasks["tests.cluster_app.read_state"].delay(key).get(30)
        return reply

    def events(self, key: str) -> list[dict[str, Any]]:
        found = read_events(self.app.backend.client, self.prefix)
        return [e for e in found if e.get("key") == key]

    def owner(self, key: str) -> str:
        info = lease_store(self.app).lookup("key", key)
        assert info is not None, f"nobody holds {key}"
        return info.owner


@pytest.fixture
def run(prefix: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Run]:
    env = getattr(request, "param", {})
    this = Run(f"{prefix}x{uuid.uuid4().hex[:5]}", tmp_path, **env)
    try:
        yield this
    finally:
        if this.cluster is not None:
            this.cluster.stop_all()


def test_an_eta_task_runs_under_the_epoch_proven_when_it_is_due(run: Run) -> None:
    """A countdown task arrives under epoch E1; before it is due the workflow ends and
    the key starts again under E2 on the same worker. Due, the task runs under E2 on
    the live state: it must not take its arrival epoch for the key's and reset it."""
    run.start("eta@fence-tests")
    key = f"eta-{uuid.uuid4().hex[:8]}"
    run.step(key, 0).get(timeout=30)
    first = lease_store(run.app).lookup("key", key)
    assert first is not None
    late = run.step(key, 99, countdown=4)
    release("key", key, app=run.app).get(timeout=30)
    assert lease_store(run.app).lookup("key", key) is None
    run.step(key, 1).get(timeout=30)
    second = lease_store(run.app).lookup("key", key)
    assert second is not None and second.epoch > first.epoch
    late.get(timeout=30)
    assert run.state(key)["state"]["steps"] == [1, 99]


@pytest.mark.parametrize("run", [{"STICKY_TEST_REPLICATION": "on_handoff"}], indirect=True)
def test_a_state_lost_hook_that_fails_once_reports_the_loss_on_the_retry(run: Run) -> None:
    """The owner dies without a copy; on the next owner the hook raises (its source of
    truth is down): the task fails and nothing is stored, so the next task adopts the
    key again, calls the hook again and is told the state was lost (``recovered`` is
    False, not None as for a key that never had state)."""
    cluster = run.start("lost1@fence-tests", "lost2@fence-tests")
    key = f"raise-once-{uuid.uuid4().hex[:8]}"
    run.step(key, 0).get(timeout=30)
    victim = run.owner(key)
    cluster.kill(victim)
    wait_for(
        lambda: any(w.name == victim and not w.alive for w in lease_store(run.app).workers()),
        timeout=4 * TTL,
        message="the owner never expired",
    )
    for step in (1, 2):
        # The first task to adopt the key on the new owner fails in the hook: step 1,
        # or step 0 again when it was not yet acknowledged at the kill.
        with contextlib.suppress(ConnectionError):
            run.step(key, step).get(timeout=60)
    wait_for(lambda: len([e for e in run.events(key) if e.get("lost")]) == 2, timeout=30)
    after = [e for e in run.events(key) if "step" in e and e["node"] != victim]
    assert after and after[0]["recovered"] is False, after


@pytest.mark.parametrize(
    "run",
    [
        {
            "STICKY_TEST_REPLICATION": "sync",
            "STICKY_TEST_HANDOFF_STORE": "tests.cluster_app.FailingCopies",
        }
    ],
    indirect=True,
)
def test_a_failure_after_the_commit_does_not_fail_the_task(run: Run) -> None:
    """The hand-over store fails after the local commit (``sync`` replication): the task
    committed, so it succeeds (the error is logged) and its step is in the state once."""
    run.start("copy@fence-tests")
    key = f"failcopy-{uuid.uuid4().hex[:8]}"
    assert run.step(key, 0).get(timeout=30) == [0]
    assert run.step(key, 1).get(timeout=30) == [0, 1]
    assert run.state(key)["state"]["steps"] == [0, 1]
    assert "its copy was not refreshed" in run.cluster.workers["copy@fence-tests"].log()  # type: ignore[union-attr]
    # Not a warm shutdown: its drain would retry the failing store for the key's copy
    # until sticky_drain_timeout, which this test is not about.
    run.cluster.kill("copy@fence-tests")  # type: ignore[union-attr]


def test_a_fenced_task_goes_to_the_keys_owner(run: Run) -> None:
    """The owner runs a step, is frozen (whole group) after the body, before its fence;
    the key is taken over; resumed, the owner is fenced and sends the task to the new
    owner's queue (not back to its own), where it runs: the step applies once, there."""
    marker = run.logs.parent / "fault-marker"
    run.start(
        "zombie@fence-tests",
        STICKY_TEST_FAULT="after_run:stop",
        STICKY_TEST_FAULT_MARKER=str(marker),
    )
    key = f"fenced-{uuid.uuid4().hex[:8]}"
    result = run.step(key, 0)
    wait_for(marker.exists, timeout=30, message="the owner never reached after_run")
    assert run.cluster is not None
    run.cluster.workers["zombie@fence-tests"].paused = True
    run.start("taker@fence-tests")

    def expired() -> bool:
        # Dead, or already taken over: the taker's reaper may move the zombie's queue
        # (its in-flight step 0) and claim the key before a poll sees it dead.
        info = lease_store(run.app).lookup("key", key)
        return info is not None and (info.alive is False or info.owner != "zombie@fence-tests")

    wait_for(expired, timeout=4 * TTL, message="the zombie never expired")
    run.step(key, 1).get(timeout=60)  # claims the key for the live worker
    assert run.owner(key) == "taker@fence-tests"
    # The taker gets the step twice: moved from the dead zombie's queue, then re-sent by
    # the fenced zombie (it finds it applied and answers with the stored result). On
    # RabbitMQ the first comes only once the broker dropped the frozen connection (two
    # missed heartbeats): resumed before that, the zombie would keep it and the taker
    # would get it once.
    received = f"Task tests.cluster_app.record_step[{result.id}] received"
    taker_log = run.cluster.workers["taker@fence-tests"]
    wait_for(lambda: received in taker_log.log(), timeout=30, message="never moved")
    run.cluster.resume("zombie@fence-tests")
    result.get(timeout=60)
    zombie_log = run.cluster.workers["zombie@fence-tests"]
    wait_for(lambda: "fenced key:" in zombie_log.log(), timeout=30, message="never fenced")
    wait_for(lambda: taker_log.log().count(received) >= 2, timeout=30, message="not re-sent")
    steps = run.state(key)["state"]["steps"]
    assert sorted(steps) == [0, 1] and len(steps) == 2, steps
    # Straight to the owner: the zombie never got its own task back to forward it.
    assert f"[{result.id}] of key:{key} to" not in zombie_log.log()


def test_a_task_fenced_on_a_worker_that_keeps_its_key_runs_there(run: Run) -> None:
    """The only worker is frozen (whole group) after a step's body, past the TTL: its
    fence then finds it dead, commits nothing and sends the step again, which comes
    back to it (it is alive again and still holds the key). That copy must run: it used
    to be taken for a duplicate of the fenced run and acknowledged with it, and the step
    was lost (seen in the Sentinel failover test, where the fence saw the worker dead
    for a moment)."""
    marker = run.logs.parent / "fault-marker"
    run.start(
        "alone@fence-tests",
        STICKY_TEST_FAULT="after_run:stop",
        STICKY_TEST_FAULT_MARKER=str(marker),
    )
    key = f"alone-{uuid.uuid4().hex[:8]}"
    result = run.step(key, 0)
    wait_for(marker.exists, timeout=30, message="the worker never reached after_run")
    assert run.cluster is not None
    run.cluster.workers["alone@fence-tests"].paused = True

    def dead() -> bool:
        info = lease_store(run.app).lookup("key", key)
        return info is not None and not info.alive

    wait_for(dead, timeout=4 * TTL, message="the frozen worker never expired")
    worker = run.cluster.workers["alone@fence-tests"]
    # The pool children first: the main process's heartbeat, resumed with them, could
    # renew the lease before the child's fence looks it up (CI on RabbitMQ: "never
    # fenced"). The main process stays frozen until the fence has spoken.
    for pid in worker.processes()[1:]:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: "fenced key:" in worker.log(), timeout=30, message="never fenced")
    run.cluster.resume("alone@fence-tests")
    assert result.get(timeout=30) == [0]
    assert run.step(key, 1).get(timeout=30) == [0, 1]
    assert run.state(key)["state"]["steps"] == [0, 1]


@contextlib.contextmanager
def _run_with_a_lease_store(
    prefix: str, tmp_path: Path, ttl: float = TTL, **env: str
) -> Iterator[tuple[Run, RedisServer]]:
    """A :class:`Run` whose lease store is a ``redis-server`` of its own, which the test
    may stop or restart; its workers are stopped at the end."""
    with RedisServer() as server:
        run = Run(f"{prefix}{uuid.uuid4().hex[:5]}", tmp_path, ttl=ttl, lease_url=server.url, **env)
        try:
            yield run, server
        finally:
            if run.cluster is not None:
                run.cluster.stop_all()


def _start_armed(run: Run, name: str, fault: str) -> Path:
    """Start worker ``name`` with ``fault`` (``point:action``) armed; returns the marker
    file its first process to reach the point creates."""
    marker = run.logs.parent / "fault-marker"
    run.start(name, STICKY_TEST_FAULT=fault, STICKY_TEST_FAULT_MARKER=str(marker))
    return marker


def test_an_owner_paused_across_an_empty_lease_store_restart_is_fenced(
    prefix: str, tmp_path: Path
) -> None:
    """The owner of a key is frozen (whole group) after a step's body, before its fence,
    well within its lease (TTL 30 s here). Meanwhile the lease store restarts empty and
    a new worker claims the key. Resumed, the owner must not commit on the lease it
    knew locally (the store that granted it is gone): its fence asks the store, is
    fenced, and the step goes to the new owner. Each step is in the key's state once.

    (Known leases trusted only their heartbeat deadline would let the zombie commit:
    the step would be applied on a worker that no longer owns the key, and lost.)"""
    # The new owner knows nothing of the key (the store lost its record): it waits for
    # number 1 (step 0, held by the paused owner) for the gap timeout, 2 s here.
    with _run_with_a_lease_store(
        f"{prefix}born", tmp_path, ttl=30.0, STICKY_TEST_GAP_TIMEOUT="2"
    ) as (run, server):
        marker = _start_armed(run, "paused@fence-tests", "after_run:stop")
        key = f"born-{uuid.uuid4().hex[:8]}"
        result = run.step(key, 0)
        wait_for(marker.exists, timeout=30, message="the owner never reached after_run")
        frozen_at = time.monotonic()
        assert run.cluster is not None
        run.cluster.workers["paused@fence-tests"].paused = True
        server.restart(keep_data=False)
        run.start("taker@fence-tests")
        run.step(key, 1).get(timeout=60)
        assert run.owner(key) == "taker@fence-tests"
        # Still well inside the lease the paused owner knew (at least 2/3 of the
        # TTL after its last heartbeat): what this test is about.
        assert time.monotonic() - frozen_at < 18, "too slow: the pause outlasted the lease"
        run.cluster.resume("paused@fence-tests")
        paused = run.cluster.workers["paused@fence-tests"]
        wait_for(lambda: "fenced key:" in paused.log(), timeout=30, message="never fenced")
        assert 0 in result.get(timeout=60)  # run again by the new owner
        wait_for(
            lambda: sorted(run.state(key)["state"]["steps"]) == [0, 1],
            timeout=30,
            message="the fenced step never reached the new owner",
        )
        assert sorted(run.state(key)["state"]["steps"]) == [0, 1]


def test_a_key_adopted_while_the_lease_store_is_away_waits_for_it(
    prefix: str, tmp_path: Path
) -> None:
    """A key's first task on a worker is proven, then (the worker frozen at
    ``after_prove``) the lease store stops. Resumed, the pool adopts the key, which
    reads the store: the task must wait for the store and then run, not fail (a
    failed step gives its number up: the nemesis lost six steps so, while the store
    restarted)."""
    with _run_with_a_lease_store(f"{prefix}away", tmp_path) as (run, server):
        marker = _start_armed(run, "adopter@fence-tests", "after_prove:stop")
        key = f"away-{uuid.uuid4().hex[:8]}"
        result = run.step(key, 0)
        wait_for(marker.exists, timeout=30, message="the worker never proved the key")
        assert run.cluster is not None
        worker = run.cluster.workers["adopter@fence-tests"]
        worker.paused = True
        server.stop(save=True)
        run.cluster.resume("adopter@fence-tests")
        wait_for(
            lambda: "waits for the lease store" in worker.log() or result.ready(),
            timeout=30,
            message="the task neither waited nor ended",
        )
        server.start()
        assert result.get(timeout=60) == [0]


def test_a_zombies_outbox_and_the_new_owners_rerun_apply_once(run: Run) -> None:
    """The owner of ``A`` commits a task that published three steps of ``B`` and is
    frozen (whole group) before it sends them (``after_replicate:stop``). The key is
    taken over and the task runs again there, publishing the same three messages
    (their ids derive from the task's id and position). The zombie resumes and sends
    its copies too: ``B``'s owner applies each step once."""
    marker = run.logs.parent / "fault-marker"
    run.start(
        "sender@fence-tests",
        STICKY_TEST_FAULT="after_replicate:stop",
        STICKY_TEST_FAULT_MARKER=str(marker),
    )
    source, target = f"outbox-{uuid.uuid4().hex[:8]}", f"target-{uuid.uuid4().hex[:8]}"
    fan_out = run.tasks["tests.cluster_app.fan_out"].delay(source, target, 3)
    wait_for(marker.exists, timeout=30, message="the owner never reached after_replicate")
    assert run.cluster is not None
    run.cluster.workers["sender@fence-tests"].paused = True
    run.start("rerun@fence-tests")
    ids = fan_out.get(timeout=60)  # the re-run on the new owner
    assert len(ids) == 3
    run.cluster.resume("sender@fence-tests")
    sender = run.cluster.workers["sender@fence-tests"]
    wait_for(
        lambda: f"fan_out[{fan_out.id}] succeeded" in sender.log(),
        timeout=60,
        message="the zombie never sent its outbox",
    )
    # Its copies were published before it reported success; a step published now
    # reaches B's owner after them, and B's line runs in arrival order.
    run.step(target, 99).get(timeout=60)
    assert run.state(target)["state"]["steps"] == [0, 1, 2, 99]
    bodies = [e["id"] for e in run.events(target) if e.get("step") in (0, 1, 2)]
    assert sorted(bodies) == sorted(ids), "a step of B ran twice"


def test_a_task_the_copy_shows_applied_does_not_run_again(run: Run) -> None:
    """A step ran and committed on a worker that then drained (its state handed over);
    its message comes back and reaches the key's new owner (a drain closes the channel
    before a late acknowledgement reaches the broker: seen in
    ``test_sigterm_drain_under_a_stream_of_tasks``). The copy the new owner adopts
    holds the step's applied record: it answers with the stored result and its body
    does not run again (before, it ran, and only the commit found it applied)."""
    run.start("old@fence-tests")
    key = f"copy-{uuid.uuid4().hex[:8]}"
    run.step(key, 0).get(timeout=30)
    first = run.step(key, 1)
    assert first.get(timeout=30) == [0, 1]
    run.start("new@fence-tests")
    assert run.cluster is not None
    assert run.cluster.stop("old@fence-tests", timeout=60) == 0  # drains: hands the state over
    sent = time.monotonic()
    run.step(key, 1, task_id=first.id)  # the same message again (its result is stored)
    # The key's next step runs after it, in order: once it is done, so is the copy.
    assert run.step(key, 2).get(timeout=60) == [0, 1, 2]
    # The copy drew a number of its own, done with it (not a gap of 30 s).
    assert time.monotonic() - sent < 15, "the key's next step waited for the copy's number"
    assert run.owner(key) == "new@fence-tests"
    runs = [(e["step"], e["node"]) for e in run.events(key)]
    assert runs == [(0, "old@fence-tests"), (1, "old@fence-tests"), (2, "new@fence-tests")]
    assert run.state(key)["state"]["steps"] == [0, 1, 2]
