"""Forwarding: a message delivered to a worker that does not own its key."""

from __future__ import annotations

from typing import Any

import pytest

from celery_sticky.context import lease_store
from celery_sticky.errors import ForwardingError
from tests.conftest import unique


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
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("hops")
    task.delay(key, 0).get(timeout=30)
    _, other = _owner_and_other(sticky_app, key, cluster)
    result = task.apply_async(
        (key, 1), queue=f"{prefix}.{other}", headers={"sticky": ["key", key, 0, 3]}
    )
    with pytest.raises(ForwardingError, match="forwarded 3 times"):
        result.get(timeout=30, propagate=True)
    assert [e["step"] for e in events(key)] == [0]
