"""Forwarding: a message delivered to a worker that does not own its key."""

from __future__ import annotations

from typing import Any

import pytest
from celery.result import AsyncResult

from celery_sticky.context import lease_store
from celery_sticky.errors import ForwardingError
from tests.conftest import unique
from tests.hostile import publish_raw


def _owner_and_other(sticky_app: Any, key: str, cluster: Any) -> tuple[str, str]:
    owner = lease_store(sticky_app).lookup("key", key)[0]  # type: ignore[index]
    other = next(name for name in cluster.workers if name != owner)
    return owner, other


def test_misdelivered_task_is_forwarded_to_the_owner(
    sticky_app: Any, prefix: str, cluster: Any, events: Any
) -> None:
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("fwd")
    task.delay(key, 0).get(timeout=30)
    owner, other = _owner_and_other(sticky_app, key, cluster)
    # Straight into another worker's direct queue, as a stale cached lease would.
    task.apply_async((key, 1), queue=f"{prefix}.{other}").get(timeout=30)
    task.delay(key, 2).get(timeout=30)
    runs = events(key)
    assert [(e["step"], e["node"], e["hops"]) for e in runs] == [
        (0, owner, 0),
        (1, owner, 1),
        (2, owner, 0),
    ]


def test_forwarding_stops_at_the_hop_limit(
    sticky_app: Any, prefix: str, cluster: Any, events: Any
) -> None:
    """Three hops under the key's current lease: the workers disagree, it fails. (The
    message is published raw: the router would stamp epoch 0 on a fixed queue.)"""
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("hops")
    task.delay(key, 0).get(timeout=30)
    _, other = _owner_and_other(sticky_app, key, cluster)
    epoch = lease_store(sticky_app).lookup("key", key)[1]  # type: ignore[index]
    task_id = publish_raw(sticky_app, f"{prefix}.{other}", (key, 1), sticky=["key", key, epoch, 3])
    with pytest.raises(ForwardingError, match="forwarded 3 times"):
        AsyncResult(task_id, app=sticky_app).get(timeout=30, propagate=True)
    assert [e["step"] for e in events(key)] == [0]


def test_hops_under_an_older_lease_do_not_count(
    sticky_app: Any, prefix: str, cluster: Any, events: Any
) -> None:
    """A message that travelled three times under leases older than the key's current
    one followed real changes of owner (seen in the nemesis: an owner reaped while the
    message travelled to it): it is forwarded on, and runs."""
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("hops")
    task.delay(key, 0).get(timeout=30)
    owner, other = _owner_and_other(sticky_app, key, cluster)
    epoch = lease_store(sticky_app).lookup("key", key)[1]  # type: ignore[index]
    task_id = publish_raw(
        sticky_app, f"{prefix}.{other}", (key, 1), sticky=["key", key, epoch - 1, 3]
    )
    assert AsyncResult(task_id, app=sticky_app).get(timeout=30) == [0, 1]
    runs = [(e["step"], e["node"], e["hops"]) for e in events(key)]
    assert runs == [(0, owner, 0), (1, owner, 1)]
