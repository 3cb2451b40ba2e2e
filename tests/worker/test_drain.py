"""The drain (:mod:`celery_sticky.worker.drain`) on real workers, through outages."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from celery_sticky.context import lease_store
from celery_sticky.testing import TcpProxy, wait_for
from tests.conftest import start_cluster, unique

TTL = 10.0  # long enough that no reaper moves the draining worker's queue meanwhile


def test_a_drain_goes_on_through_a_lease_store_outage(prefix: str, tmp_path: Path) -> None:
    """The lease store stops answering the draining worker just as its drain starts
    (fault point ``before_drain:stop``, then the proxy to the store is cut while the
    worker is frozen). The drain tries again once the store is back: the key's queued
    steps move on with its state (``on_handoff`` replication: only a drain copies it).

    Before, the drain gave up at its first failed call: the queue waited for the
    reaper and the key's state was lost (the steps ran on empty state)."""
    from tests.cluster_app import make_app

    url = os.environ["STICKY_TEST_REDIS_URL"]
    sub = f"{prefix}dr"
    app = make_app(sub, sticky_lease_ttl=TTL, sticky_state_replication="on_handoff")
    app.finalize()
    step = app.tasks["tests.cluster_app.record_step"]
    marker = tmp_path / "fault-marker"
    victim, heir = "dr1@sticky-tests", "dr2@sticky-tests"
    env = {
        "STICKY_TEST_PREFIX": sub,
        "STICKY_TEST_LEASE_TTL": str(TTL),
        "STICKY_TEST_REPLICATION": "on_handoff",
        "STICKY_TEST_STATE_DIR": str(tmp_path / "state"),
    }
    with TcpProxy.to(url) as proxy:
        victim_env = {
            "STICKY_TEST_LEASE_URL": proxy.url(url),
            "STICKY_TEST_FAULT": "before_drain:stop",
            "STICKY_TEST_FAULT_MARKER": str(marker),
        }
        queues = [f"{sub}.default"]
        with start_cluster(
            app, {victim: {"queues": queues, "env": victim_env}}, env=env, workdir=tmp_path
        ) as cluster:
            key = unique("drain")
            assert step.delay(key, 0).get(timeout=30) == [0]
            info = lease_store(app).lookup("key", key)
            assert info is not None and info.owner == victim
            cluster.start(heir, queues=queues)
            cluster.signal(victim, signal.SIGTERM)  # a warm shutdown, then the drain
            wait_for(marker.exists, timeout=30, message="the drain never started")
            cluster.workers[victim].paused = True  # the fault point froze its group
            # Published while the owner drains: they wait in its queue for the drain.
            later: list[Any] = [step.delay(key, n) for n in (1, 2, 3)]
            proxy.cut()
            cluster.resume(victim)
            wait_for(  # the drain met the outage: it tries again (before: gave up)
                lambda: any(
                    said in cluster.workers[victim].log()
                    for said in ("trying again", "its queue waits for the reaper")
                ),
                timeout=30,
                message="the drain never met the outage",
            )
            proxy.restore()
            assert later[-1].get(timeout=60) == [0, 1, 2, 3], "the drain lost the state"
            wait_for(
                lambda: not cluster.workers[victim].running,
                timeout=30,
                message="the drained worker did not exit",
            )
            log = cluster.workers[victim].log()
            assert "its queue waits for the reaper" not in log
            assert f"drained {victim}" in log


def test_a_drain_does_not_hand_over_state_older_than_the_copy(prefix: str, tmp_path: Path) -> None:
    """A key runs step 0 on A, moves to B (steps 1 and 2), then moves back to A, where
    no task of it runs before A drains. A's local state ([0]) is older than the key's
    copy ([0, 1, 2]): the drain must leave the copy alone, and the key's next owner
    goes on from [0, 1, 2].

    Before, the drain exported every key it held, and its valid lease let the stale
    state replace the copy: steps 1 and 2 were lost (seen in the nemesis: 88 steps)."""
    from celery_sticky.context import get_config
    from celery_sticky.producer.admin import move_key
    from tests.cluster_app import make_app

    sub = f"{prefix}db"
    app = make_app(sub)
    app.finalize()
    step = app.tasks["tests.cluster_app.record_step"]
    a, b = "db1@sticky-tests", "db2@sticky-tests"
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_STATE_DIR": str(tmp_path / "state")}
    queues = [f"{sub}.default"]
    specs = {a: {"queues": queues}, b: {"queues": queues}}
    with start_cluster(app, specs, env=env, workdir=tmp_path) as cluster:
        key = unique("back")
        on_a = get_config(app).direct_queue_name(a)
        assert step.apply_async((key, 0), queue=on_a).get(timeout=30) == [0]
        move_key("key", key, b, app=app).get(timeout=60)
        assert step.delay(key, 1).get(timeout=30) == [0, 1]
        assert step.delay(key, 2).get(timeout=30) == [0, 1, 2]
        move_key("key", key, a, app=app).get(timeout=60)
        info = lease_store(app).lookup("key", key)
        assert info is not None and info.owner == a
        assert cluster.stop(a, timeout=60) == 0  # a warm shutdown: the drain
        assert step.delay(key, 3).get(timeout=60) == [0, 1, 2, 3], "the drain rolled back"
