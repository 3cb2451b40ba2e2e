"""A gap waits while its missing message may still come from another worker's queue
(worker/backlog.py), on real workers and a real Redis broker."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from celery_sticky.context import get_config, lease_store
from celery_sticky.testing import wait_for
from tests.conftest import start_cluster, unique
from tests.test_gate import _numbered

OWNER, OTHER = "gapx1@sticky-tests", "gapx2@sticky-tests"


@pytest.mark.skipif(
    os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp"),
    reason="RabbitMQ pushes the message into the frozen worker's socket, where a passive "
    "declare does not count it (worker/backlog.py)",
)
def test_a_gap_waits_while_the_missing_number_sits_in_another_workers_queue(
    sticky_app: Any, prefix: str, redis_client: Any
) -> None:
    """Number 2 of a key sits in another worker's direct queue (a stale route) while
    that worker is frozen for longer than ``sticky_gap_timeout`` (2 s here); number 3
    reaches the owner meanwhile. Once thawed, the other worker forwards 2. 3 must
    wait for it. (Timed out at 2 s because the owner's own queue was empty, 3 ran
    before 2: seen in the nemesis as steps forwarded between restarting workers that
    reached their owner 40 s after it had declared them lost.)"""
    from tests.cluster_app import make_app

    sub = f"{prefix}gapx"
    app = make_app(sub)
    app.finalize()
    task = app.tasks["tests.cluster_app.record_step"]
    config = get_config(app)
    env = {"STICKY_TEST_PREFIX": sub, "STICKY_TEST_GAP_TIMEOUT": "2"}
    spec = {"queues": [f"{sub}.default"]}
    with start_cluster(app, {OWNER: spec, OTHER: spec}, env=env) as workers:
        key, stream = unique("gapx"), f"test.{uuid.uuid4().hex[:8]}"
        owner_queue, other_queue = (config.direct_queue_name(name) for name in (OWNER, OTHER))
        first = task.apply_async((key, 1), headers=_numbered(key, stream, 1), queue=owner_queue)
        assert first.get(timeout=30) == [1]
        lease = lease_store(app).lookup("key", key)
        assert lease is not None and lease.owner == OWNER
        workers.pause(OTHER)
        second = task.apply_async((key, 2), headers=_numbered(key, stream, 2), queue=other_queue)
        third = task.apply_async((key, 3), headers=_numbered(key, stream, 3), queue=owner_queue)
        try:
            # Three gap timeouts: 3 must still wait, 2 is on its way.
            wait_for(third.ready, timeout=6.0)
        except TimeoutError:
            pass
        else:
            pytest.fail(f"number 3 ran while 2 sat in {other_queue}: state {third.get()}")
        finally:
            workers.resume(OTHER)
        assert second.get(timeout=60) == [1, 2]
        assert third.get(timeout=60) == [1, 2, 3], "3 ran before 2 arrived from the other queue"
