"""The router: owned keys to their owner's queue, claims at publish, hands off otherwise."""

from __future__ import annotations

from typing import Any

from celery import chain, group

from celery_sticky.context import lease_store
from celery_sticky.producer.install import router_of
from celery_sticky.wire import HEADER
from tests.conftest import unique
from tests.invariants import violations


def test_non_sticky_tasks_are_untouched(sticky_app: Any, prefix: str, cluster: Any) -> None:
    router = router_of(sticky_app)
    assert router is not None
    options: dict[str, Any] = {}
    assert router("tests.cluster_app.plain_task", (1,), {}, options) is None
    assert options == {}
    result = sticky_app.tasks["tests.cluster_app.plain_task"].delay(7).get(timeout=30)
    assert result["queue"] == f"{prefix}.default"


def test_owned_key_routes_to_owner_queue_with_header(
    sticky_app: Any, prefix: str, cluster: Any
) -> None:
    router = router_of(sticky_app)
    key = unique("route")
    options: dict[str, Any] = {}
    route = router("tests.cluster_app.record_step", (key, 0), {}, options)
    lease = lease_store(sticky_app).lookup("key", key)
    assert lease is not None and lease[2], "the key was claimed at publish for a live worker"
    owner, epoch = lease.owner, lease.epoch
    assert route == {"queue": f"{prefix}.{owner}"}
    assert options["headers"][HEADER][:4] == ["key", key, epoch, 0]
    # Each call returns a new dict: Celery mutates what a router returns.
    again = router("tests.cluster_app.record_step", (key, 1), {}, {})
    assert again == route and again is not route


def test_queue_fixed_by_caller_wins(
    sticky_app: Any, prefix: str, cluster: Any, events: Any
) -> None:
    """An unowned key sent to a queue only w3 consumes starts, and stays, on w3."""
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("special")
    options: dict[str, Any] = {"queue": f"{prefix}.special"}
    assert router_of(sticky_app)("tests.cluster_app.record_step", (key, 0), {}, options) is None
    assert lease_store(sticky_app).lookup("key", key) is None, "the router stayed out"
    task.apply_async((key, 0), queue=f"{prefix}.special").get(timeout=30)
    task.delay(key, 1).get(timeout=30)
    assert [e["node"] for e in events(key)] == ["w3@sticky-tests"] * 2


def test_chain_of_sticky_and_plain_tasks(sticky_app: Any, cluster: Any, events: Any) -> None:
    """Later chain steps are published from the worker, through the router there."""
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    plain = sticky_app.tasks["tests.cluster_app.plain_task"]
    key = unique("chain")
    flow = chain(step.si(key, 0), step.si(key, 1), plain.si(3), step.si(key, 2), step.si(key, 3))
    assert flow.apply_async().get(timeout=60) == [0, 1, 2, 3]
    assert violations(events(key), {key: [0, 1, 2, 3]}) == []


def test_group_of_sticky_tasks(sticky_app: Any, cluster: Any, events: Any) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    keys = [unique("group") for _ in range(9)]
    group(step.si(key, 0) for key in keys).apply_async().get(timeout=60)
    group(step.si(key, 1) for key in keys).apply_async().get(timeout=60)
    assert violations([e for k in keys for e in events(k)], {k: [0, 1] for k in keys}) == []


def test_callable_key_and_explicit_workflow(sticky_app: Any, cluster: Any) -> None:
    task = sticky_app.tasks["tests.cluster_app.tenant_step"]
    tenant = unique("tenant")
    first = task.delay(tenant, 7).get(timeout=30)
    second = task.delay(tenant, 7).get(timeout=30)
    other = task.delay(tenant, 8).get(timeout=30)
    assert (first["count"], second["count"], other["count"]) == (1, 2, 1)
    assert first["node"] == second["node"]
    assert lease_store(sticky_app).lookup("tenant_order", f"{tenant}/7") is not None
