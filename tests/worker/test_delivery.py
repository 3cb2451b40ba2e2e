"""Reliable delivery on Redis: no message lost at any instant of a kill -9 (issue 14).

Real workers, real Redis. A message is caught where kombu's ``BRPOP`` used to lose
it: taken from the direct queue, not yet delivered to the worker. Either the worker
reaches the ``after_receive`` fault point (right after the ``BLMOVE`` answer is
read) and kills its own process group, or the test freezes the worker (SIGSTOP of
its group) while its blocking pop waits at Redis, then publishes: Redis answers
the pop at once, so the message sits in the frozen worker's socket. Then the worker
is killed, or reaped past its TTL while frozen and resumed afterwards.

Every body run is counted (the step events, never one per task id): each step must
run exactly once, in publish order.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster, wait_for
from tests.conftest import unique, wait_settled
from tests.test_cli import cli_json
from tests.test_failover import Run

pytestmark = pytest.mark.skipif(
    os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp"),
    reason="reliable delivery is for a Redis broker (RabbitMQ requeues what a dead "
    "connection had not acknowledged); these tests look at Redis clients and lists",
)

TTL = 3.0
#: Seconds a frozen worker's blocking pop keeps waiting at Redis (its broker polling
#: interval), so that a message published while it is frozen is taken into its socket.
POLL = 12.0
VICTIM = "d1@sticky-tests"
OTHER = "d2@sticky-tests"


@pytest.fixture
def run(prefix: str, tmp_path: Path) -> Iterator[Run]:
    this = Run(f"{prefix}d{uuid.uuid4().hex[:4]}", "sync", tmp_path)
    yield this
    if this.cluster is not None:
        for name, worker in this.cluster.workers.items():
            if worker.running and worker.env.get("STICKY_TEST_POLLING_INTERVAL") == str(POLL):
                # A warm shutdown waits out its pending pop (kombu's channel close
                # reads the answer of a pending BRPOP or BLMOVE): up to POLL seconds,
                # which none of these tests is about.
                this.cluster.kill(name)
        this.cluster.stop_all()


def step_counts(run: Run, key: str) -> Counter[int]:
    return Counter(e["step"] for e in run.runs(key))


def assert_once_in_order(run: Run, key: str, steps: int) -> None:
    runs = run.runs(key)
    seen = [(e["step"], e["node"][:2], round(e["start"] % 100, 2)) for e in runs]
    counts = step_counts(run, key)
    lost = [s for s in range(steps) if counts[s] == 0]
    assert not lost, f"steps {lost} were lost; runs {seen}"
    twice = [s for s in range(steps) if counts[s] > 1]
    assert not twice, f"steps {twice} ran more than once; runs {seen}"
    assert [e["step"] for e in runs] == list(range(steps)), f"out of order: runs {seen}"


def takes_with_blmove(cluster: WorkerCluster, name: str) -> bool:
    return "with BLMOVE" in cluster.workers[name].log()


def direct_queue(run: Run, name: str) -> str:
    return f"{run.prefix}.{name}"


def inflight(run: Run, name: str) -> str:
    """The worker's in-flight list (``celery_sticky.worker.delivery.inflight_key``)."""
    return f"_sticky.inflight.{direct_queue(run, name)}"


def in_kombu_unacked(client: redis.Redis, queue: str) -> int:
    """Messages of ``queue`` recorded in kombu's unacked hash."""
    return sum(1 for _tag, raw in client.hscan_iter("unacked") if queue in str(raw))


def wait_all_acknowledged(run: Run, client: redis.Redis, name: str) -> None:
    wait_for(
        lambda: client.llen(inflight(run, name)) == 0,
        timeout=10,
        message=f"{name}'s in-flight list is not emptied by the acknowledgements",
    )


def freeze_while_its_pop_waits(
    run: Run, cluster: WorkerCluster, name: str, client: redis.Redis, pops: int = 1
) -> None:
    """SIGSTOP ``name``'s group while its blocking pops wait at Redis.

    Its broker clients carry its name (``client_name``); a pop is a ``BLMOVE`` with
    reliable delivery, kombu's ``BRPOP`` without. There must be at least ``pops`` of
    them (one per queue taken with ``BLMOVE``; kombu waits on all its queues with one
    ``BRPOP``), each waiting for less than half the polling interval, so that they
    are still waiting when the test publishes.
    """

    def waiting() -> bool:
        found = [
            c
            for c in client.client_list()
            if c.get("name") == name and c.get("cmd") in ("blmove", "brpop")
        ]
        return len(found) >= pops and all(
            "b" in c["flags"] and int(c["idle"]) < POLL / 2 - 1 for c in found
        )

    wait_for(waiting, timeout=3 * POLL, message=f"{name} never waited in {pops} pop(s)")
    cluster.pause(name)
    assert waiting(), f"{name}'s pops stopped waiting as it was frozen"


def publish_into_the_socket(run: Run, name: str, client: redis.Redis, key: str, step: int) -> Any:
    """Publish a step of ``key`` (owned by the frozen ``name``) and see Redis hand it over."""
    result = run.step.delay(key, step, 0.0)
    queue = direct_queue(run, name)
    wait_for(
        lambda: client.llen(queue) == 0,
        timeout=5,
        message=f"the frozen worker's pending pop did not take the message from {queue}",
    )
    return result


@pytest.mark.parametrize("then", ["restart", "reaper"])
def test_kill_9_after_receive(
    run: Run, tmp_path: Path, redis_client: redis.Redis, then: str
) -> None:
    """The worker's group dies right after BLMOVE's answer was read (fault point
    ``after_receive:kill``): the message runs once, after a restart under the same
    name or on the worker whose reaper moved the dead worker's queue."""
    marker = tmp_path / "fault-marker"
    cluster = run.start(
        VICTIM, STICKY_TEST_FAULT="after_receive:kill", STICKY_TEST_FAULT_MARKER=str(marker)
    )
    key = unique("received")
    first = run.step.delay(key, 0, 0.0)
    wait_for(marker.exists, timeout=30, message="the worker never received the message")
    cluster.reap(VICTIM)  # its group killed itself: collect it
    assert step_counts(run, key)[0] == 0
    # Taken: only in the dead worker's in-flight list (not in kombu's unacked hash too,
    # which would restore it a second time).
    assert redis_client.llen(direct_queue(run, VICTIM)) == 0
    assert redis_client.llen(inflight(run, VICTIM)) == 1
    assert in_kombu_unacked(redis_client, direct_queue(run, VICTIM)) == 0
    status = {w["worker"]: w for w in cli_json("status", env=run.env)["workers"]}
    assert status[VICTIM]["in_flight"] == 1, "celery sticky status shows it in flight"
    if then == "restart":
        cluster.restart(VICTIM)  # the marker exists: the fault point does not fire again
    else:
        cluster.start(OTHER, queues=[f"{run.prefix}.default"])
    later = [run.step.delay(key, step, 0.0) for step in (1, 2)]
    assert later[-1].get(timeout=60) == [0, 1, 2]
    assert first.get(timeout=30) == [0]
    assert_once_in_order(run, key, 3)
    expected = VICTIM if then == "restart" else OTHER
    assert {e["node"] for e in run.runs(key)} == {expected}
    wait_all_acknowledged(run, redis_client, expected)
    assert redis_client.llen(inflight(run, VICTIM)) == 0


def test_a_restart_while_the_broker_is_away_still_takes_its_messages_back(
    run: Run, tmp_path: Path, redis_client: redis.Redis
) -> None:
    """The worker dies with a message in its in-flight list and restarts while its broker
    does not answer (seen in the nemesis: a kill, then a broker cut at the restart).
    It keeps trying to take its previous run's messages back before it consumes: the
    step still runs, before the key's next one. (Before, the failed try was logged
    and the node consumed anyway: the message stayed in the in-flight list, behind
    everything newer, until the node's next restart.)"""
    from celery_sticky.testing import TcpProxy

    redis_url = os.environ["STICKY_TEST_REDIS_URL"]
    if (os.environ.get("STICKY_TEST_BROKER_URL") or redis_url) != redis_url:
        pytest.skip("the worker's broker connection goes through a proxy to Redis")
    marker = tmp_path / "fault-marker"
    with TcpProxy.to(redis_url) as proxy:
        cluster = run.start(
            VICTIM,
            STICKY_TEST_BROKER_URL=proxy.url(redis_url),
            STICKY_TEST_FAULT="after_receive:kill",
            STICKY_TEST_FAULT_MARKER=str(marker),
        )
        try:
            key = unique("away")
            first = run.step.delay(key, 0, 0.0)
            wait_for(marker.exists, timeout=30, message="the worker never received the message")
            cluster.reap(VICTIM)
            assert redis_client.llen(inflight(run, VICTIM)) == 1
            proxy.cut()
            cluster.restart(VICTIM, wait=False)
            wait_for(
                lambda: "could not restore the unacked messages" in cluster.workers[VICTIM].log(),
                timeout=60,
                message="the restarted worker never tried to take its messages back",
            )
            proxy.restore()
            assert run.step.delay(key, 1, 0.0).get(timeout=20) == [0, 1]
            assert first.get(timeout=5) == [0]
            assert_once_in_order(run, key, 2)
            wait_all_acknowledged(run, redis_client, VICTIM)
        finally:
            cluster.stop_all()  # while its broker still answers through the proxy


@pytest.mark.parametrize("then", ["restart", "reaper"])
def test_kill_9_with_a_message_in_the_socket(
    run: Run, redis_client: redis.Redis, then: str
) -> None:
    """A message Redis already handed to a frozen worker's pending pop survives the
    worker's kill -9."""
    cluster = run.start(
        VICTIM, STICKY_TEST_POLLING_INTERVAL=str(POLL), STICKY_TEST_CLIENT_NAME=VICTIM
    )
    key = unique("socket")
    run.step.delay(key, 0, 0.0).get(timeout=30)
    wait_settled(run.app, VICTIM, "key", key)
    freeze_while_its_pop_waits(run, cluster, VICTIM, redis_client)
    in_socket = publish_into_the_socket(run, VICTIM, redis_client, key, 1)
    cluster.kill(VICTIM)
    if then == "restart":
        cluster.restart(VICTIM)
    else:
        cluster.start(OTHER, queues=[f"{run.prefix}.default"])
    last = run.step.delay(key, 2, 0.0)
    last.get(timeout=60)
    assert_once_in_order(run, key, 3)
    assert in_socket.get(timeout=5) == [0, 1]
    wait_all_acknowledged(run, redis_client, VICTIM if then == "restart" else OTHER)


@pytest.fixture
def shared_run(run: Run) -> Run:
    """``run`` under ``first_come``: a new key's steps wait in the shared task queue
    (``<prefix>.default``) until the worker that takes the first one claims the key."""
    from tests.cluster_app import make_app

    run.app = make_app(
        run.prefix,
        sticky_lease_ttl=TTL,
        sticky_state_replication="sync",
        sticky_placement="first_come",
    )
    run.app.finalize()
    run.step = run.app.tasks["tests.cluster_app.record_step"]
    run.env["STICKY_TEST_PLACEMENT"] = "first_come"
    return run


@pytest.mark.parametrize("then", ["restart", "reaper"])
def test_kill_9_with_a_shared_queue_message_in_the_socket(
    shared_run: Run, redis_client: redis.Redis, then: str
) -> None:
    """A new key's first step waits in the shared queue; Redis hands it to a frozen
    worker's pending pop, and the worker is killed. The step still runs, once, before
    the key's next one: after a restart under the same name (which gives back its
    shared-queue messages before it consumes), or on another worker once its reaper
    gave them back. (kombu's BRPOP loses it: the message left the list and no record
    of it exists.)"""
    run = shared_run
    cluster = run.start(
        VICTIM, STICKY_TEST_POLLING_INTERVAL=str(POLL), STICKY_TEST_CLIENT_NAME=VICTIM
    )
    shared = f"{run.prefix}.default"
    freeze_while_its_pop_waits(run, cluster, VICTIM, redis_client, pops=2)
    key = unique("shared")
    in_socket = run.step.delay(key, 0, 0.0)
    wait_for(
        lambda: redis_client.llen(shared) == 0,
        timeout=5,
        message=f"the frozen worker's pending pop did not take the message from {shared}",
    )
    assert redis_client.llen(shared) == 0 and lease_store(run.app).lookup("key", key) is None
    cluster.kill(VICTIM)
    if then == "restart":
        cluster.restart(VICTIM)
    else:
        cluster.start(OTHER, queues=[shared])
    last = run.step.delay(key, 1, 0.0)
    assert last.get(timeout=60) == [0, 1]
    assert in_socket.get(timeout=5) == [0]
    assert_once_in_order(run, key, 2)
    assert {e["node"] for e in run.runs(key)} == {VICTIM if then == "restart" else OTHER}
    wait_for(  # acknowledged (LREM) just after the result is stored
        lambda: redis_client.llen(f"_sticky.inflight.{shared}|{VICTIM}") == 0,
        timeout=10,
        message="a message stayed in the victim's in-flight list of the shared queue",
    )


def test_a_drained_worker_leaves_no_record_of_its_shared_queues(
    shared_run: Run, redis_client: redis.Redis
) -> None:
    """A worker that took the shared queue with ``BLMOVE`` and drained leaves neither
    its set of shared queues (``_sticky.taken.<node>``) nor an in-flight list behind:
    it is no longer registered, so no reaper would ever delete them (seen after every
    nemesis run)."""
    run = shared_run
    cluster = run.start(VICTIM)
    key = unique("drained")
    assert run.step.delay(key, 0, 0.0).get(timeout=30) == [0]
    taken = f"_sticky.taken.{VICTIM}"
    assert redis_client.exists(taken), "the worker did not record its shared queue"
    assert cluster.stop(VICTIM, timeout=60) == 0
    leftovers = [
        k
        for k in (taken, f"_sticky.inflight.{run.prefix}.default|{VICTIM}")
        if redis_client.exists(k)
    ]
    assert not leftovers, f"the drained worker left {leftovers}"


def test_sigstop_with_a_message_in_the_socket(run: Run, redis_client: redis.Redis) -> None:
    """A frozen worker holds a message in its socket; it is reaped past its TTL; the
    message runs on the key's new owner in its place; once resumed, the old worker
    does not apply it again."""
    zombie = VICTIM
    cluster = run.start(
        zombie, STICKY_TEST_POLLING_INTERVAL=str(POLL), STICKY_TEST_CLIENT_NAME=zombie
    )
    key = unique("zombie")
    run.step.delay(key, 0, 0.0).get(timeout=30)
    wait_settled(run.app, zombie, "key", key)
    freeze_while_its_pop_waits(run, cluster, zombie, redis_client)
    in_socket = publish_into_the_socket(run, zombie, redis_client, key, 1)
    cluster.start(OTHER, queues=[f"{run.prefix}.default"])
    wait_for(
        lambda: any(w.name == zombie and w.reaped for w in lease_store(run.app).workers()),
        timeout=6 * TTL,
        message="the frozen worker was never reaped",
    )
    later = [run.step.delay(key, step, 0.0) for step in (2, 3)]
    later[-1].get(timeout=60)
    log_before = len(cluster.workers[zombie].log())
    resumed_at = cluster.resume(zombie)

    def handled() -> bool:
        # The resumed worker reads the message from its socket and forwards it to the
        # key's owner (it logs the task id); the owner then either recognises a task
        # it applied (a second "succeeded" for the id) or runs it now.
        if in_socket.id not in cluster.workers[zombie].log()[log_before:]:
            return False
        succeeded = cluster.workers[OTHER].log().count(f"[{in_socket.id}] succeeded")
        late = [e for e in run.runs(key) if e["step"] == 1 and e["start"] > resumed_at]
        return succeeded >= 2 or bool(late)

    wait_for(handled, timeout=30, message="the resumed worker never handled its message")
    assert_once_in_order(run, key, 4)
    assert {e["node"] for e in run.runs(key) if e["step"] >= 1} == {OTHER}
    state = run.app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
    assert state["state"]["steps"] == [0, 1, 2, 3]


def test_a_message_with_a_priority_is_not_stranded(run: Run) -> None:
    """Direct queues ignore priorities: a message kombu put in a priority sub-list of
    the direct queue still runs."""
    cluster = run.start(VICTIM)
    key = unique("priority")
    run.step.delay(key, 0, 0.0).get(timeout=30)
    assert run.step.apply_async((key, 1, 0.0), priority=5).get(timeout=30) == [0, 1]
    assert_once_in_order(run, key, 2)
    assert takes_with_blmove(cluster, VICTIM)


def test_held_tasks_give_their_prefetch_slot_back(run: Run) -> None:
    """Prefetch 2 (multiplier 1, two processes): tasks held behind a busy key do not keep
    another key's task, behind them in the direct queue, from starting."""
    cluster = run.start(VICTIM, STICKY_TEST_PREFETCH="1")
    busy, other = unique("busy"), unique("other")
    run.step.delay(busy, 0, 0.0).get(timeout=30)
    run.step.delay(other, 0, 0.0).get(timeout=30)
    results = [run.step.delay(busy, step, 1.5 if step == 1 else 0.0) for step in range(1, 6)]
    late = run.step.delay(other, 1, 0.0)
    late.get(timeout=30)
    results[-1].get(timeout=30)
    first_busy = next(e for e in run.runs(busy) if e["step"] == 1)
    other_run = next(e for e in run.runs(other) if e["step"] == 1)
    assert other_run["start"] < first_busy["end"], "the other key waited for the busy one"
    assert takes_with_blmove(cluster, VICTIM)


def test_a_broker_reconnect_gives_held_messages_back_in_order(run: Run) -> None:
    """The broker connection is cut while a key's step runs and its next steps wait in
    the gate; new connections are refused for a while, so the closing channel cannot
    give them back then. Once the broker answers again, they come back (at the head of
    the queue, in delivery order) and each step runs once, in order. The running step
    ends after the reconnect: its late acknowledgement on the closed channel must not
    stop the worker."""
    from celery_sticky.testing import TcpProxy

    redis_url = os.environ["STICKY_TEST_REDIS_URL"]
    with TcpProxy.to(redis_url) as proxy:
        cluster = run.start(VICTIM, STICKY_TEST_BROKER_URL=proxy.url(redis_url))
        key = unique("reconnect")
        run.step.delay(key, 0, 0.0).get(timeout=30)
        results = [run.step.delay(key, step, 5.0 if step == 1 else 0.0) for step in range(1, 6)]
        queue = direct_queue(run, VICTIM)
        wait_for(
            lambda: (
                f"[{results[0].id}] received" in cluster.workers[VICTIM].log()
                and run.app.backend.client.llen(queue) == 0
            ),
            timeout=30,
            message="the worker never took the steps (step 1 running, the others held)",
        )
        proxy.cut()
        wait_for(
            lambda: "Connection to broker lost" in cluster.workers[VICTIM].log(),
            timeout=30,
            message="the worker never saw the broker go",
        )
        proxy.restore()
        try:
            assert results[-1].get(timeout=60) == [0, 1, 2, 3, 4, 5]
            assert_once_in_order(run, key, 6)
        finally:
            cluster.stop_all()  # while its broker still answers through the proxy
