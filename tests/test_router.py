"""The router: owned keys to their owner's queue, claims at publish, hands off otherwise."""

from __future__ import annotations

from typing import Any

from celery import chain, group

from celery_sticky.context import RouteCache, lease_store
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
    key, probe = unique("special"), unique("special")
    options: dict[str, Any] = {"queue": f"{prefix}.special"}
    # Another key: a router call numbers the key's message, and a number never sent
    # would hold the key's next ones for sticky_gap_timeout.
    assert router_of(sticky_app)("tests.cluster_app.record_step", (probe, 0), {}, options) is None
    assert lease_store(sticky_app).lookup("key", probe) is None, "the router stayed out"
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


# -- the router's lease cache: a bounded LRU ------------------------------------------


def test_route_cache_evicts_the_least_recently_used_one_at_a_time() -> None:
    cache = RouteCache(ttl=60.0, limit=1000)
    for i in range(1000):
        cache.put("key", str(i), f"q{i % 3}", i, now=0.0)
    assert cache.get("key", "0", now=1.0) == ("q0", 0)  # used: now the most recent
    cache.put("key", "new", "q1", 5000, now=1.0)  # full: pushes out one, the oldest unused
    assert len(cache) == 1000
    assert cache.get("key", "1", now=1.0) is None
    assert cache.get("key", "0", now=1.0) == ("q0", 0)
    assert all(cache.get("key", str(i), now=1.0) is not None for i in range(2, 1000))
    assert cache.get("key", "new", now=1.0) == ("q1", 5000)


def test_route_cache_keeps_hot_keys_while_a_million_others_pass() -> None:
    """Never cleared whole: a hot key used now and then survives any number of cold ones."""
    cache = RouteCache(ttl=1e9, limit=10_000)
    hot = [("hot", str(i)) for i in range(100)]
    for workflow, key in hot:
        cache.put(workflow, key, "q", 1, now=0.0)
    for n in range(1_000_000):
        cache.put("cold", str(n), "q", 1, now=0.0)
        if n % 1000 == 0:
            for workflow, key in hot:
                assert cache.get(workflow, key, now=0.0) == ("q", 1), (n, key)
        assert len(cache) <= 10_000
    assert len(cache) == 10_000


def test_route_cache_entries_still_expire_and_can_be_forgotten() -> None:
    cache = RouteCache(ttl=5.0, limit=10)
    cache.put("key", "a", "q", 1, now=100.0)
    assert cache.get("key", "a", now=104.9) == ("q", 1)
    assert cache.get("key", "a", now=105.0) is None
    cache.put("key", "b", "q", 2, now=100.0)
    cache.forget("key", "b")
    assert cache.get("key", "b", now=100.0) is None and ("key", "b") not in cache


def test_a_publish_the_lease_store_refused_leaves_no_gap(
    prefix: str, cluster: Any, redis_client: Any
) -> None:
    """The lease store is away for one publish of a new key (seen in the nemesis: every
    lease store restart failed some publishes). The retried publish must take the
    number the failed one drew, or the key's owner waits ``sticky_gap_timeout`` for a
    message that was never sent, and reports a gap."""
    import os

    import pytest

    from celery_sticky.errors import LeaseStoreUnavailable
    from celery_sticky.testing import TcpProxy
    from tests.cluster_app import make_app

    url = os.environ["STICKY_TEST_REDIS_URL"]
    with TcpProxy.to(url) as proxy:
        app = make_app(prefix, sticky_redis_url=proxy.url(url), sticky_gap_timeout=30.0)
        app.finalize()
        task = app.tasks["tests.cluster_app.record_step"]
        key = unique("refused")
        proxy.cut()
        with pytest.raises(LeaseStoreUnavailable):
            task.delay(key, 0)
        proxy.restore()
        # Well within the gap timeout: the first message the owner sees is number 1.
        assert task.delay(key, 0).get(timeout=10) == [0]
        assert task.delay(key, 1).get(timeout=10) == [0, 1]
    logs = "".join(worker.log() for worker in cluster.workers.values())
    assert f"gap in key:{key}" not in logs
