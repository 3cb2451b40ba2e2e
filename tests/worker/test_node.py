"""A node's registration on real workers: one process per node name, and a worker that
was presumed dead while it was only paused rejoining before it takes work again."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

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


def _commands(url: str, sha: str, member: str, body: Callable[[], None]) -> int:
    """How many ``EVALSHA sha`` naming ``member`` reach the Redis at ``url`` while
    ``body`` runs (seen with MONITOR, from any client)."""
    end = f"end-of-count-{uuid.uuid4().hex}"
    seen: list[str] = []
    client = redis.Redis.from_url(url)
    with client.monitor() as monitor:
        thread = threading.Thread(
            target=lambda: seen.extend(
                itertools.takewhile(
                    lambda c: end not in c, (e["command"] for e in monitor.listen())
                )
            ),
            daemon=True,
        )
        thread.start()
        body()
        client.echo(end)
        thread.join(timeout=30)
    assert not thread.is_alive(), "MONITOR never saw the end of the count"
    return sum(1 for c in seen if c.startswith(f"EVALSHA {sha}") and member in c)


def test_an_owned_key_is_proven_from_the_heartbeat_not_per_task(run: Run) -> None:
    """Once a worker proved a key, its next tasks start without a claim round trip to
    the lease store (the lease is known until the heartbeat deadline), and the pool's
    fence answers from the same knowledge (the node's lease clock): with ``on_handoff``
    replication a task of a held key makes no lease-store call at all.
    Before: a claim per task; then a lookup per task (the fence)."""
    run.start("owner@node-tests")
    key = f"known-{uuid.uuid4().hex[:8]}"
    assert run.step(key, 0).get(timeout=30) == [0]  # the first task claims the key
    store = lease_store(run.app)
    url = os.environ["STICKY_TEST_REDIS_URL"]

    def ten_steps() -> None:
        for step in range(1, 11):
            run.step(key, step).get(timeout=30)

    member = f"key:{key}"
    claims = _commands(url, store._claim.sha, member, ten_steps)
    assert claims == 0, f"{claims} claims for 10 tasks of a key the worker holds"
    assert run.state(key)["state"]["steps"] == list(range(11))
    lookups = _commands(url, store._lookup.sha, member, lambda: run.step(key, 11).get(30))
    assert lookups == 0, "the fence asked the store although the node knows the lease"
    assert run.state(key)["state"]["steps"] == list(range(12))


def test_with_sync_replication_a_task_makes_one_lease_store_call(
    prefix: str, tmp_path: Path
) -> None:
    """With ``sync`` replication the fenced copy write is the fence: a task of a key
    the worker holds makes that one call to the lease store (no claim, no lookup).
    Before: a lookup before the commit, then the copy write."""
    this = Run(f"{prefix}s{uuid.uuid4().hex[:5]}", tmp_path, STICKY_TEST_REPLICATION="sync")
    try:
        this.start("synced@node-tests")
        key = f"synced-{uuid.uuid4().hex[:8]}"
        assert this.step(key, 0).get(timeout=30) == [0]
        store = lease_store(this.app)
        url = os.environ["STICKY_TEST_REDIS_URL"]
        member = f"key:{key}"
        scripts = {"claim": store._claim, "lookup": store._lookup, "append": store._copy_append}
        counts: dict[str, int] = {}
        for name, script in scripts.items():
            step = len(counts) + 1
            counts[name] = _commands(
                url, script.sha, member, lambda s=step: this.step(key, s).get(timeout=30)
            )
        assert counts == {"claim": 0, "lookup": 0, "append": 1}, counts
        assert this.state(key)["state"]["steps"] == [0, 1, 2, 3]
    finally:
        if this.cluster is not None:
            this.cluster.stop_all()


def test_known_leases_last_until_the_heartbeat_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease is known from an acknowledged heartbeat until TTL (less the drift) after
    that heartbeat was sent; clearing forgets, and a disabled record learns nothing."""
    from celery_sticky.worker import node as node_module

    now = [100.0]
    monkeypatch.setattr("celery_sticky.worker.node.time.monotonic", lambda: now[0])
    monkeypatch.setattr("celery_sticky.worker.node.CLAIM_GRACE", 1000.0)  # not the subject
    known = node_module.KnownLeases(ttl=10.0)
    known.born_seen("born-1", 100.0)
    known.remember("wf", "k", 7, now[0])
    assert known.get("wf", "k") is None, "no heartbeat acknowledged yet"
    known.renewed(sent_at=100.0)
    assert known.get("wf", "k") is None, "proven before the chain of heartbeats began"
    known.remember("wf", "k", 7, now[0])
    assert known.get("wf", "k") == 7
    now[0] = 100.0 + 10.0 * (1 - node_module.CLOCK_DRIFT) - 0.001
    assert known.get("wf", "k") == 7
    now[0] += 0.002
    assert known.get("wf", "k") is None, "past the deadline the store must be asked"
    known.remember("wf", "k", 7, now[0])
    known.renewed(sent_at=now[0])
    assert known.get("wf", "k") is None, "a heartbeat sent past the deadline renews nothing known"
    known.remember("wf", "k", 6, now[0] - 1)  # a claim sent before the chain began
    assert known.get("wf", "k") is None, "a proof from before a pause is not remembered"
    known.remember("wf", "k", 7, now[0])
    now[0] += 5
    known.renewed(sent_at=now[0])  # within the deadline: the chain holds
    known.renewed(sent_at=now[0] - 5)  # a late answer to an older heartbeat: no step back
    assert known.deadline == now[0] + 10.0 * (1 - node_module.CLOCK_DRIFT)
    assert known.get("wf", "k") == 7
    known.forget("wf", "k")
    assert known.get("wf", "k") is None
    known.remember("wf", "k", 8, now[0])
    known.clear(disable=True)
    known.renewed(sent_at=now[0])
    known.remember("wf", "k", 9, now[0])
    assert known.get("wf", "k") is None and len(known) == 0


def test_known_leases_last_only_while_the_stores_born_stamp_is_seen(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The store's born stamp, read every quarter of the claim grace, bounds what the
    node knows: unchanged, until ``CLAIM_GRACE`` after the read was sent (a store that
    lost its data claims nothing for that long); changed, every known lease is void and
    a new chain begins. The pool reads the chain and its deadline from the node's
    lease clock: a proof is good there only in the chain it was made in."""
    from celery_sticky.lease import CLAIM_GRACE, CLOCK_DRIFT
    from celery_sticky.worker import node as node_module
    from celery_sticky.worker.lease_clock import LeaseClock

    now = [100.0]
    monkeypatch.setattr("celery_sticky.worker.node.time.monotonic", lambda: now[0])
    monkeypatch.setattr("celery_sticky.worker.lease_clock.time.monotonic", lambda: now[0])
    clock = LeaseClock(tmp_path / "clock", create=True)
    reader = LeaseClock(tmp_path / "clock")  # as a pool process opens it
    known = node_module.KnownLeases(ttl=10.0, clock=clock)
    known.renewed(sent_at=100.0)
    known.remember("wf", "k", 7, now[0])
    assert known.get("wf", "k") is None, "the store's stamp was never seen"
    assert known.chain_of("wf", "k", 7) == 0
    known.born_seen("born-1", now[0])
    assert known.get("wf", "k") is None, "proven before the stamp was first seen"
    known.remember("wf", "k", 7, now[0])
    chain = known.chain_of("wf", "k", 7)
    assert known.get("wf", "k") == 7 and chain and reader.holds(chain)
    assert known.chain_of("wf", "k", 6) == 0, "another epoch is not known"
    now[0] += CLAIM_GRACE * (1 - CLOCK_DRIFT) - 0.001
    assert known.get("wf", "k") == 7 and reader.holds(chain)
    now[0] += 0.002
    assert known.get("wf", "k") is None, "no read of the stamp within the grace"
    assert not reader.holds(chain)
    known.born_seen("born-1", now[0])  # read again, unchanged: the chain holds
    assert known.get("wf", "k") == 7 and reader.holds(chain)
    known.born_seen("born-2", now[0])  # the store lost its data
    assert known.get("wf", "k") is None and len(known) == 0
    assert not reader.holds(chain), "a proof of the old chain held on"
    known.remember("wf", "k", 9, now[0])
    assert reader.holds(known.chain_of("wf", "k", 9))
    known.clear(disable=True)
    assert reader.read() == (known.chain, 0.0)
