"""The per-key gate on real workers: serial and ordered per key, others in parallel."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_sticky.context import get_config, lease_store
from celery_sticky.producer.queues import queue_size
from celery_sticky.testing.cluster import wait_for
from tests.conftest import start_cluster, unique
from tests.invariants import by_key, violations

STEPS = 8


def run_workflows(
    app: Any, keys: list[str], back_to_back: set[str], steps: int = STEPS, duration: float = 0.01
) -> dict[str, list[int]]:
    """Publish ``steps`` steps per key; returns each key's final state."""
    task = app.tasks["tests.cluster_app.record_step"]
    results: dict[str, list[Any]] = {key: [] for key in keys}
    for key in keys:
        if key in back_to_back:
            results[key] = [task.delay(key, step, duration) for step in range(steps)]
    stepwise = [key for key in keys if key not in back_to_back]
    for step in range(steps):
        pending = {key: task.delay(key, step, duration) for key in stepwise}
        for key, result in pending.items():
            results[key].append(result)
            result.get(timeout=60)
    return {key: rs[-1].get(timeout=60) for key, rs in results.items()}


def test_sixty_keys_eight_steps_on_three_workers(
    cluster: Any, sticky_app: Any, events: Any
) -> None:
    keys = [unique(f"k{i}") for i in range(60)]
    back_to_back = set(keys[::2])
    final = run_workflows(sticky_app, keys, back_to_back)

    recorded = [e for e in events() if e["key"] in final]
    assert len(recorded) == 60 * STEPS
    assert violations(recorded, {key: list(range(STEPS)) for key in keys}) == []
    # Every key's state holds all its steps, in order, exactly once.
    assert all(state == list(range(STEPS)) for state in final.values()), final
    # Keys spread over the cluster, and nothing was forwarded (the router was right).
    nodes = {runs[0]["node"] for runs in by_key(recorded).values()}
    assert nodes == set(cluster.workers)
    assert {e["hops"] for e in recorded} == {0}


def test_other_keys_run_while_a_key_is_busy(cluster: Any, sticky_app: Any, events: Any) -> None:
    """A key's backlog, longer than the prefetch window, does not starve other keys.

    Held messages give their prefetch slot back; without that the worker would
    fetch nothing else until the backlog drained.
    """
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    slow = unique("slow")
    task.delay(slow, 0, 0.01).get(timeout=30)
    node = events(slow)[0]["node"]
    # 30 steps of 0.1 s: far more than the worker's prefetch window of 8.
    backlog = [task.delay(slow, step, 0.1) for step in range(1, 31)]
    others: list[str] = []
    while len(others) < 3:
        key = unique("quick")
        task.delay(key, 0, 0.01).get(timeout=30)
        if events(key)[0]["node"] == node:
            others.append(key)
    for result in backlog:
        result.get(timeout=60)
    slow_starts = sorted(e["start"] for e in events(slow))
    for key in others:
        started = events(key)[0]["start"]
        behind = sum(1 for s in slow_starts if s <= started)
        # Starved, it would start only once ~22 backlog steps had run.
        assert behind < 15, f"quick key {key} started after {behind} backlog steps"
    assert [e["step"] for e in events(slow)] == list(range(31))


@pytest.mark.parametrize("pool", ["threads", "solo", "gevent"])
def test_serial_and_ordered_with_other_pools(
    pool: str, sticky_app: Any, prefix: str, events: Any
) -> None:
    """The gate holds with the threads pool (callbacks from executor threads), solo and gevent."""
    from tests.cluster_app import make_app

    sub = f"{prefix}{pool[:2]}"
    app = make_app(sub)
    env = {"STICKY_TEST_PREFIX": sub}
    if pool == "gevent":
        pytest.importorskip("gevent", reason="the gevent pool needs gevent (the test extra has it)")
    concurrency = {"threads": 4, "solo": 1, "gevent": 20}[pool]
    specs = {
        f"{pool}{i}@sticky-tests": {
            "pool": pool,
            "concurrency": concurrency,
            "queues": [f"{sub}.default"],
        }
        for i in (1, 2)
    }
    keys = [unique(pool) for _ in range(12)]
    with start_cluster(app, specs, env=env):
        final = run_workflows(app, keys, back_to_back=set(keys), steps=6, duration=0.02)
    from tests.conftest import read_events

    recorded = [e for e in read_events(app.backend.client, sub) if e["key"] in final]
    assert violations(recorded, {key: list(range(6)) for key in keys}) == []
    assert all(state == list(range(6)) for state in final.values())


def test_two_copies_of_a_task_id_run_once(sticky_app: Any, cluster: Any, events: Any) -> None:
    """Copies of one task id held behind a busy key are dropped by the gate, and the
    numbers the copies drew are done with the task: the next step does not wait
    ``sticky_gap_timeout`` (30 s here) for them (it did, racing its own ``get``)."""
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("twice")
    task.delay(key, 0, 0.01).get(timeout=30)
    busy = task.delay(key, 1, 1.0)
    copies = [task.apply_async((key, 2, 0.01), task_id=f"{key}-step2") for _ in range(3)]
    busy.get(timeout=30)
    assert copies[0].get(timeout=30) == [0, 1, 2]
    sent = time.monotonic()
    last = task.delay(key, 3, 0.01).get(timeout=60)
    assert time.monotonic() - sent < 15, "step 3 waited for the numbers of the copies"
    assert last == [0, 1, 2, 3]
    assert [e["step"] for e in events(key)] == [0, 1, 2, 3]


# -- order by sequence number ------------------------------------------------------


def _numbered(key: str, stream: str, seq: int) -> dict[str, Any]:
    """Headers of a message numbered ``seq`` in producer ``stream`` (the router keeps them)."""
    # Written out (workflow, key, epoch, hops, sent, affinity, stream, seq): what
    # StickyHeader("key", key, 0, 0, 0, "", stream, seq).encode() gives.
    return {"sticky": ["key", key, 0, 0, 0, "", stream, seq]}


def _owner_queue(app: Any, key: str) -> str:
    lease = lease_store(app).lookup("key", key)
    assert lease is not None
    return get_config(app).direct_queue_name(lease.owner)


def test_a_late_message_runs_in_its_producers_order(
    cluster: Any, sticky_app: Any, redis_client: Any
) -> None:
    """Numbers 2 and 3 reach the owner before 1 (a forwarded or restored message is
    late): they wait for it, and the key applies 1, 2, 3."""
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key, stream = unique("late"), f"test.{uuid.uuid4().hex[:8]}"
    second = task.apply_async((key, 2), headers=_numbered(key, stream, 2))
    third = task.apply_async((key, 3), headers=_numbered(key, stream, 3))
    queue = _owner_queue(sticky_app, key)
    wait_for(lambda: redis_client.llen(queue) == 0, message=f"{queue} was not consumed")
    first = task.apply_async((key, 1), headers=_numbered(key, stream, 1))
    assert third.get(timeout=60) == [1, 2, 3]
    assert second.get(timeout=10) == [1, 2]
    assert first.get(timeout=10) == [1]


def test_a_retry_keeps_its_place_and_a_countdown_task_runs_when_due(
    cluster: Any, sticky_app: Any, events: Any
) -> None:
    """A step that asks for a retry (countdown 1 s) runs before the key's later steps;
    a countdown task does not hold the later steps back."""
    record_step = sticky_app.tasks["tests.cluster_app.record_step"]
    retry_step = sticky_app.tasks["tests.cluster_app.retry_step"]
    key = unique("retry")
    record_step.delay(key, 0).get(timeout=30)
    retried = retry_step.delay(key, 1, 1.0)
    after = record_step.delay(key, 2)
    assert after.get(timeout=60) == [0, 1, 2]
    assert retried.get(timeout=10) == [0, 1]

    other = unique("countdown")
    record_step.delay(other, 0).get(timeout=30)
    later = record_step.apply_async((other, 1), countdown=3)
    assert record_step.delay(other, 2).get(timeout=60) == [0, 2], "it did not wait for the ETA"
    assert later.get(timeout=30) == [0, 2, 1]


@contextlib.contextmanager
def _a_lost_retry(
    prefix: str, name: str, countdown: float, gap_timeout: float
) -> Iterator[tuple[Any, str, Callable[[], str]]]:
    """A one-worker cluster where number 2 of a key asked for a retry (in ``countdown``
    seconds) that is sent to a queue no worker reads: it never comes.

    Yields ``(record_step, key, log)`` once the retry is sent; ``log()`` reads the
    worker's log."""
    from tests.cluster_app import make_app

    app = make_app(prefix)
    app.finalize()
    record_step = app.tasks["tests.cluster_app.record_step"]
    retry_step = app.tasks["tests.cluster_app.retry_step"]
    nowhere = f"{prefix}.nowhere"
    env = {"STICKY_TEST_PREFIX": prefix, "STICKY_TEST_GAP_TIMEOUT": str(gap_timeout)}
    try:
        with start_cluster(app, {name: {"queues": [f"{prefix}.default"]}}, env=env) as workers:
            key = unique("lostretry")
            assert record_step.delay(key, 1).get(timeout=30) == [1]
            retry_step.delay(key, 2, countdown, nowhere)
            wait_for(lambda: queue_size(app, nowhere) == 1, timeout=30)
            yield record_step, key, workers.workers[name].log
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(nowhere)


def test_a_retry_holds_its_place_for_its_countdown_before_its_message_arrives(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Number 2 asks for a retry in 4 s, and its message has not reached the owner (here
    it never does). Number 3 must wait for it for the countdown and then
    ``sticky_gap_timeout`` (2 s here), not only the gap timeout: the retry's place was
    given up as soon as its first run ended, and 3 ran 2 s later, reporting a retry
    that was still to come as lost."""
    name = "lostretry1@sticky-tests"
    with _a_lost_retry(f"{prefix}lostretry", name, 4.0, 2.0) as (record_step, key, log):
        third = record_step.delay(key, 3)
        try:
            wait_for(third.ready, timeout=3.0)
        except TimeoutError:
            pass
        else:
            pytest.fail(f"3 overtook a retry that was not due yet: state {third.get()}")
        assert third.get(timeout=30) == [1, 3]
        assert f"gap in key:{key}: message(s) 2 of producer stream" in log(), log()[-3000:]


def test_a_key_goes_on_when_an_overdue_retrys_place_runs_out(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Number 2's retry was due after 1 s and never came; number 3 arrives at 2 s, while
    the retry's place is still held (until 1 + 3 s, ``sticky_gap_timeout`` being 3 s
    here). When the place runs out, 3 waits out its own gap timeout and runs with the
    gap reported. (The place's end scheduled no look after it: 3 waited until
    another message of the key came.)"""
    name = "lostretry2@sticky-tests"
    with _a_lost_retry(f"{prefix}overdue", name, 1.0, 3.0) as (record_step, key, log):
        # The scenario itself: 3 arrives after the retry was due, within its place.
        time.sleep(2.0)
        third = record_step.delay(key, 3)
        assert third.get(timeout=30) == [1, 3], "3 waited past the end of the retry's place"
        assert f"gap in key:{key}: message(s) 2 of producer stream" in log(), log()[-3000:]


def test_a_missing_number_is_waited_for_then_reported(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Number 2 never comes: 3 waits ``sticky_gap_timeout`` (2 s here), then runs, and the
    worker reports the gap (ERROR log naming the key and the number)."""
    from tests.cluster_app import make_app

    sub = f"{prefix}gap"
    app = make_app(sub)
    app.finalize()
    task = app.tasks["tests.cluster_app.record_step"]
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_GAP_TIMEOUT": "2"}
    name = "gap1@sticky-tests"
    with start_cluster(app, {name: {"queues": [f"{sub}.default"]}}, env=env) as workers:
        key, stream = unique("gap"), f"test.{uuid.uuid4().hex[:8]}"
        assert task.apply_async((key, 1), headers=_numbered(key, stream, 1)).get(timeout=30) == [1]
        sent = time.monotonic()
        third = task.apply_async((key, 3), headers=_numbered(key, stream, 3))
        assert third.get(timeout=60) == [1, 3]
        assert time.monotonic() - sent >= 2.0, "number 3 did not wait for the missing 2"
        log = workers.workers[name].log()
        assert f"gap in key:{key}: message(s) 2 of producer stream {stream}" in log, log[-3000:]


def test_a_head_handed_on_unproven_goes_back_to_its_line_when_the_key_is_ours(
    sticky_app: Any, prefix: str, redis_client: Any, tmp_path: Any
) -> None:
    """Number 3 of a key reaches its owner while number 2 is missing and the lease store
    is away: the owner cannot prove the key, and hands the waiting head on to be
    forwarded or to wait for the store. The store answers again right then (fault
    point ``unproven_head``: the worker's group is frozen there, the store started,
    the group resumed), and the head's own proof finds the key this worker's. It must
    go back to its line and wait for number 2, not run. (It ran: seen in RabbitMQ
    nemesis runs as hundreds of steps of a key applied in arrival order after a lease
    store restart, with no gap reported.)"""
    from celery_sticky.testing.redis_server import RedisServer
    from celery_sticky.worker.lease_clock import FILE_NAME, LeaseClock
    from tests.cluster_app import make_app

    sub = f"{prefix}unproven"
    name = "unproven1@sticky-tests"
    marker = tmp_path / "fault-marker"
    state_dir = tmp_path / "state"
    with RedisServer() as server:
        app = make_app(sub, sticky_redis_url=server.url, sticky_lease_ttl=30.0)
        app.finalize()
        task = app.tasks["tests.cluster_app.record_step"]
        env = {
            "STICKY_TEST_PREFIX": sub,
            "STICKY_TEST_LEASE_URL": server.url,
            "STICKY_TEST_LEASE_TTL": "30",
            "STICKY_TEST_GAP_TIMEOUT": "60",
            "STICKY_TEST_STATE_DIR": str(state_dir),
        }
        spec = {
            "queues": [f"{sub}.default"],
            "env": {
                "STICKY_TEST_FAULT": "unproven_head:stop",
                "STICKY_TEST_FAULT_MARKER": str(marker),
            },
        }
        with start_cluster(app, {name: spec}, env=env, workdir=tmp_path / "logs") as workers:
            key, stream = unique("unproven"), f"test.{uuid.uuid4().hex[:8]}"
            assert task.apply_async((key, 1), headers=_numbered(key, stream, 1)).get(30) == [1]
            owner_queue = _owner_queue(app, key)
            clocks = list(state_dir.rglob(FILE_NAME))
            assert len(clocks) == 1, clocks
            clock = LeaseClock(clocks[0])
            server.stop(save=True)

            def known_lease_over() -> bool:
                # The owner trusts what it proved for a second after the store last
                # answered (the claim grace): past that, a proof asks the store.
                _chain, until = clock.read()
                return until < time.monotonic()

            wait_for(known_lease_over, timeout=30, message="the known lease never ran out")
            # Straight to the owner's queue: the router would ask the stopped store.
            third = task.apply_async((key, 3), headers=_numbered(key, stream, 3), queue=owner_queue)
            wait_for(marker.exists, timeout=30, message="the owner never handed 3 on unproven")
            workers.workers[name].paused = True  # the fault point froze its group
            server.start()
            workers.resume(name)
            second = task.apply_async(
                (key, 2), headers=_numbered(key, stream, 2), queue=owner_queue
            )
            assert second.get(timeout=60) == [1, 2], "number 3 ran before number 2"
            assert third.get(timeout=60) == [1, 2, 3]


def test_a_gap_is_timed_from_when_the_key_waits_not_from_arrival(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Number 3 arrives while number 1 runs for 4 s, longer than ``sticky_gap_timeout``
    (2 s here); number 2 is published only once 1 has finished. 3 must still wait for
    2: the key waited for no gap while 1 ran. (Timed from 3's arrival, it ran at once:
    seen in the nemesis as thousands of held steps applied out of order.)"""
    from tests.cluster_app import make_app

    sub = f"{prefix}gapclock"
    app = make_app(sub)
    app.finalize()
    task = app.tasks["tests.cluster_app.record_step"]
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_GAP_TIMEOUT": "2"}
    with start_cluster(app, {"gapclock1@sticky-tests": {"queues": [f"{sub}.default"]}}, env=env):
        key, stream = unique("gapclock"), f"test.{uuid.uuid4().hex[:8]}"
        first = task.apply_async((key, 1, 4.0), headers=_numbered(key, stream, 1))
        third = task.apply_async((key, 3), headers=_numbered(key, stream, 3))
        assert first.get(timeout=60) == [1]
        # 3 has waited behind 1 for about 4 s: it must not run now, before 2 exists.
        try:
            wait_for(third.ready, timeout=1.0)
        except TimeoutError:
            pass
        else:
            pytest.fail(f"number 3 ran past a gap the key never held: state {third.get()}")
        second = task.apply_async((key, 2), headers=_numbered(key, stream, 2))
        assert third.get(timeout=60) == [1, 2, 3]
        assert second.get(timeout=10) == [1, 2]


def test_a_gap_waits_while_the_missing_number_may_be_in_the_owners_queue(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Number 3 of a key waits for 2, which joins the owner's queue behind a backlog of
    other keys' tasks that takes longer than ``sticky_gap_timeout`` (2 s here) to work
    off (a forward, or a moved queue, lands at the tail like this). 3 waits until the
    queue is worked off and 2 arrives. (Timed out at 2 s, it ran before 2: seen in the
    nemesis as gaps declared while the missing steps sat in the owner's own queue.)"""
    from tests.cluster_app import make_app

    sub = f"{prefix}gapq"
    app = make_app(sub)
    app.finalize()
    task = app.tasks["tests.cluster_app.record_step"]
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_GAP_TIMEOUT": "2", "STICKY_TEST_PREFETCH": "1"}
    spec = {"queues": [f"{sub}.default"], "concurrency": 1}
    with start_cluster(app, {"gapq1@sticky-tests": spec}, env=env):
        key, stream = unique("gapq"), f"test.{uuid.uuid4().hex[:8]}"
        assert task.apply_async((key, 1), headers=_numbered(key, stream, 1)).get(timeout=30) == [1]
        third = task.apply_async((key, 3), headers=_numbered(key, stream, 3))
        backlog = [task.delay(unique("busy"), 0, 0.25) for _ in range(24)]  # about 6 s
        second = task.apply_async((key, 2), headers=_numbered(key, stream, 2))
        assert third.get(timeout=60) == [1, 2, 3], "3 ran before 2 arrived from the queue"
        assert second.get(timeout=10) == [1, 2]
        assert all(r.get(timeout=30) == [0] for r in backlog)


def test_held_duplicates_leave_room_to_fetch_a_missing_number(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Number 3 and task T (number 4) wait for number 2; a copy of T (number 5) is held
    as T's duplicate. With a prefetch of one, the copy must give its slot back as the
    waiting entries do, or nothing more is fetched: 2, queued behind them, would stay
    in the queue until the gap gave up on it. (Seen in the nemesis: a worker idle for
    minutes, 8 duplicates held, 12,699 messages queued.)"""
    from tests.cluster_app import make_app

    sub = f"{prefix}dupslot"
    app = make_app(sub)
    app.finalize()
    task = app.tasks["tests.cluster_app.record_step"]
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_GAP_TIMEOUT": "2", "STICKY_TEST_PREFETCH": "1"}
    spec = {"queues": [f"{sub}.default"], "concurrency": 1}
    with start_cluster(app, {"dupslot1@sticky-tests": spec}, env=env):
        key, stream = unique("dupslot"), f"test.{uuid.uuid4().hex[:8]}"
        assert task.apply_async((key, 1), headers=_numbered(key, stream, 1)).get(timeout=30) == [1]
        task.apply_async((key, 3), headers=_numbered(key, stream, 3))
        same = f"{key}-t"
        t = task.apply_async((key, 4), headers=_numbered(key, stream, 4), task_id=same)
        task.apply_async((key, 4), headers=_numbered(key, stream, 5), task_id=same)
        queue = _owner_queue(app, key)
        wait_for(lambda: redis_client.llen(queue) == 0, message=f"{queue} not consumed")
        sent = time.monotonic()
        second = task.apply_async((key, 2), headers=_numbered(key, stream, 2))
        assert second.get(timeout=60) == [1, 2], "2 was not fetched before 3 ran"
        assert time.monotonic() - sent < 10, "2 waited in the queue behind held duplicates"
        assert t.get(timeout=30) == [1, 2, 3, 4]


def test_first_come_with_two_workers_keeps_each_keys_order(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Under ``first_come`` both workers take a new key's first steps from the shared
    queue: one claims the key, the other forwards what it took, which arrives behind
    later steps. The owner still applies every key's steps in publish order."""
    from tests.cluster_app import make_app

    sub = f"{prefix}fc"
    app = make_app(sub, sticky_placement="first_come")
    app.finalize()
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_PLACEMENT": "first_come"}
    specs = {f"fc{i}@sticky-tests": {"queues": [f"{sub}.default"]} for i in (1, 2)}
    keys = [unique("fc") for _ in range(20)]
    with start_cluster(app, specs, env=env):
        final = run_workflows(app, keys, back_to_back=set(keys), steps=STEPS, duration=0.0)
    disordered = {key: state for key, state in final.items() if state != list(range(STEPS))}
    assert not disordered, disordered


def test_held_messages_keep_their_order_across_a_broker_reconnect(
    prefix: str, redis_client: Any
) -> None:
    """Steps held behind a busy key when the worker's broker connection drops come back
    from the broker in whatever order it restores them: they still run in publish order."""

    from celery_sticky.testing import TcpProxy
    from tests.cluster_app import make_app

    url = os.environ["STICKY_TEST_REDIS_URL"]
    if (os.environ.get("STICKY_TEST_BROKER_URL") or url) != url:
        pytest.skip("the worker's broker connection goes through a proxy to Redis")
    sub = f"{prefix}rc"
    app = make_app(sub)
    app.finalize()
    task = app.tasks["tests.cluster_app.record_step"]
    name = "rc1@sticky-tests"
    with TcpProxy.to(url) as proxy:
        env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_BROKER_URL": proxy.url(url)}
        with start_cluster(app, {name: {"queues": [f"{sub}.default"]}}, env=env):
            key = unique("rc")
            task.delay(key, 0).get(timeout=30)
            busy = task.delay(key, 1, 2.0)
            rest = [task.delay(key, step) for step in range(2, 8)]
            queue = _owner_queue(app, key)
            wait_for(lambda: redis_client.llen(queue) == 0, message=f"{queue} not consumed")
            proxy.cut()
            busy.get(timeout=30)  # the result backend is reached directly
            proxy.restore()
            assert rest[-1].get(timeout=120) == list(range(8))


@contextlib.contextmanager
def _worker_behind_a_proxy(
    prefix: str, name: str, concurrency: int
) -> Iterator[tuple[Any, Any, Any]]:
    """One worker whose broker connection goes through a TCP proxy (Redis or RabbitMQ):
    yields ``(record_step, worker, proxy)``."""
    from celery_sticky.testing import TcpProxy
    from tests.cluster_app import make_app

    broker = os.environ.get("STICKY_TEST_BROKER_URL") or os.environ["STICKY_TEST_REDIS_URL"]
    app = make_app(prefix)
    app.finalize()
    with TcpProxy.to(broker) as proxy:
        env = {"STICKY_TEST_PREFIX": prefix, "STICKY_TEST_BROKER_URL": proxy.url(broker)}
        spec = {"queues": [f"{prefix}.default"], "concurrency": concurrency}
        with start_cluster(app, {name: spec}, env=env) as workers:
            yield app.tasks["tests.cluster_app.record_step"], workers.workers[name], proxy


def _reconnect(proxy: Any, log: Callable[[], str]) -> None:
    """Cut the worker's broker connection, and restore it once the worker saw the cut;
    returns once it connected again."""
    connected, lost = log().count("Connected to "), log().count("Connection to broker lost")
    proxy.cut()
    wait_for(lambda: log().count("Connection to broker lost") > lost, timeout=30)
    proxy.restore()
    wait_for(lambda: log().count("Connected to ") > connected, timeout=60)


def test_a_key_goes_on_after_its_running_step_outlived_a_broker_reconnect(
    prefix: str, redis_client: Any
) -> None:
    """A step is in the pool when the worker's broker connection drops, and ends while
    the worker reconnects. The key's next steps, published meanwhile, must run: the
    step's end must free the key."""
    with _worker_behind_a_proxy(f"{prefix}rcrun", "rcrun1@sticky-tests", 1) as (
        task,
        worker,
        proxy,
    ):
        key = unique("rcrun")
        task.delay(key, 0).get(timeout=30)
        busy = task.delay(key, 1, 3.0)
        wait_for(lambda: f"record_step[{busy.id}] received" in worker.log(), timeout=30)
        proxy.cut()
        assert busy.get(timeout=30) == [0, 1]  # the result backend is reached directly
        proxy.restore()
        rest = [task.delay(key, step) for step in range(2, 5)]
        assert rest[-1].get(timeout=60) == list(range(5))


def test_a_step_a_paused_process_held_across_a_reconnect_ends_before_its_key_goes_on(
    prefix: str, redis_client: Any
) -> None:
    """Both pool processes are paused; key B's step (3 s long) is written into one's
    pipe, unacknowledged by it. The broker connection drops: Celery's flush forgets
    the job, though the process runs it once resumed. The key's next steps must run,
    and not beside it: the step's redelivered copy starts only once it ended. (The
    gate waited for its end for good; forgetting the entry instead ran the copy
    beside it on the other process.)"""
    with _worker_behind_a_proxy(f"{prefix}ghost", "ghost1@sticky-tests", 2) as (
        task,
        worker,
        proxy,
    ):
        key = unique("ghost")
        task.delay(key, 0).get(timeout=30)
        children = worker.processes()[1:]
        assert len(children) == 2, children
        for pid in children:
            os.kill(pid, signal.SIGSTOP)
        try:
            held = task.delay(key, 1, 3.0)
            wait_for(lambda: f"record_step[{held.id}] received" in worker.log(), timeout=30)
            # The main process writes the job into an idle process's pipe on its
            # event loop's next turn; nothing shows it while the process is paused.
            time.sleep(0.5)
            _reconnect(proxy, worker.log)
        finally:
            for pid in children:
                os.kill(pid, signal.SIGCONT)
        assert task.delay(key, 2).get(timeout=60) == [0, 1, 2]
        assert held.get(timeout=30) == [0, 1]
        runs = re.findall(
            rf"(\d\d:\d\d:\d\d,\d+): INFO/[\w-]+\] Task \S+\[{held.id}\] (received|succeeded)",
            worker.log(),
        )
        events = [what for _, what in runs]
        assert events.count("succeeded") == 2, f"the job was not written before the cut: {runs}"
        assert events == ["received", "succeeded", "received", "succeeded"], (
            f"the copy started beside the held step: {runs}"
        )


def test_a_step_the_pool_dropped_at_a_reconnect_runs_from_its_redelivered_copy(
    prefix: str, redis_client: Any
) -> None:
    """One pool process, busy with a long step of key A. A first broker reconnect lets
    Celery hand the pool one more task (it resets its semaphore): key B's step waits in
    the pool's buffer for the busy process. A second reconnect flushes that buffer
    (the broker sends B's message again) and no callback ever comes for the dropped
    job. B's redelivered copy must run: the gate held B's key for good behind the
    dropped entry (seen in the nemesis on RabbitMQ as keys stuck for minutes)."""
    with _worker_behind_a_proxy(f"{prefix}flush", "flush1@sticky-tests", 1) as (
        task,
        worker,
        proxy,
    ):
        log = worker.log
        a, b = unique("flushA"), unique("flushB")
        task.delay(a, 0).get(timeout=30)
        task.delay(b, 0).get(timeout=30)
        busy = task.delay(a, 1, 12.0)
        wait_for(lambda: f"record_step[{busy.id}] received" in log(), timeout=30)
        _reconnect(proxy, log)
        stranded = task.delay(b, 1)
        wait_for(lambda: f"record_step[{stranded.id}] received" in log(), timeout=30)
        assert not busy.ready(), "the busy step ended too soon for this test"
        _reconnect(proxy, log)
        assert busy.get(timeout=60) == [0, 1]
        assert stranded.get(timeout=60) == [0, 1], "B's step never ran again"
        assert task.delay(b, 2).get(timeout=60) == [0, 1, 2]


def test_a_dead_lettered_message_gives_its_number_up(cluster: Any, sticky_app: Any) -> None:
    """Number 2 has a body of another shape: it is dead-lettered, and number 3 runs at
    once instead of waiting ``sticky_gap_timeout`` (30 s here) for it."""
    from tests.hostile import publish_raw

    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key, stream = unique("dead"), f"test.{uuid.uuid4().hex[:8]}"
    assert task.apply_async((key, 1), headers=_numbered(key, stream, 1)).get(timeout=30) == [1]
    queue = _owner_queue(sticky_app, key)
    publish_raw(sticky_app, queue, sticky=_numbered(key, stream, 2)["sticky"], body=[1, 2])
    sent = time.monotonic()
    assert task.apply_async((key, 3), headers=_numbered(key, stream, 3)).get(timeout=60) == [1, 3]
    assert time.monotonic() - sent < 15, "number 3 waited for the dead-lettered number 2"


def test_steps_of_a_task_without_state_keep_their_order_without_waiting(
    cluster: Any, sticky_app: Any, events: Any
) -> None:
    """A sticky task with no ``state`` parameter commits nothing: the gate records its
    number itself, so the key's next step does not wait ``sticky_gap_timeout``."""
    task = sticky_app.tasks["tests.cluster_app.stateless_step"]
    key = unique("stateless")
    sent = time.monotonic()
    results = [task.delay(key, step) for step in range(4)]
    assert [r.get(timeout=60) for r in results] == [0, 1, 2, 3]
    assert time.monotonic() - sent < 15, "a step waited for a number already run"
    assert [e["step"] for e in sorted(events(key), key=lambda e: e["start"])] == [0, 1, 2, 3]
