"""Placement and delineation on real workers: policies, affinity, affinity queues.

The workers of this module carry tags (``celery worker --sticky-tag``) and
capacities (``--sticky-capacity``), under a prefix of their own, so no other
test's keys land on them.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_sticky.context import lease_store
from celery_sticky.errors import ConfigurationError
from celery_sticky.placement import (
    Candidate,
    affinity_queues,
    eligible,
    encode_tags,
    parse_tags,
    resolve_policy,
)
from celery_sticky.producer.install import router_of
from celery_sticky.settings import StickyConfig
from celery_sticky.testing import WorkerCluster, wait_for
from tests.conftest import read_events, start_cluster, unique
from tests.lease.test_claim_placement import rendezvous

TAGS = {
    "eu-a@sticky-tests": {"region": "eu"},
    "eu-b@sticky-tests": {"region": "eu", "gpu": "yes"},
    "us-a@sticky-tests": {"region": "us"},
}


@pytest.fixture(scope="module")
def sub(prefix: str) -> str:
    return f"{prefix}pl"


def placed_app(sub: str, **settings: Any) -> Any:
    from tests.cluster_app import make_app

    app = make_app(sub, **settings)
    app.finalize()
    return app


@pytest.fixture(scope="module")
def tagged(sub: str) -> Iterator[tuple[Any, WorkerCluster]]:
    app = placed_app(sub)
    specs = {
        "eu-a@sticky-tests": {"args": ["--sticky-tag", "region=eu"]},
        "eu-b@sticky-tests": {
            "args": [
                "--sticky-tag",
                "region=eu",
                "--sticky-tag",
                "gpu=yes",
                "--sticky-capacity",
                "4",
            ]
        },
        "us-a@sticky-tests": {
            "args": ["--sticky-tag", "region=us"],
            "queues": [f"{sub}.default", f"{sub}.us-only"],
        },
    }
    for spec in specs.values():
        spec.setdefault("queues", [f"{sub}.default"])
    with start_cluster(app, specs, env={"STICKY_TEST_PREFIX": sub}) as cluster:
        yield app, cluster


def wait_for_steps(redis_client: Any, sub: str, count: int, timeout: float = 90) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in read_events(redis_client, sub) if "step" in e]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


# -- the placement module ---------------------------------------------------------


def test_tags_parse_and_name_what_is_wrong() -> None:
    assert parse_tags("region=eu, tier=gold", "x") == {"region": "eu", "tier": "gold"}
    assert parse_tags(["region=eu"], "x") == {"region": "eu"}
    assert encode_tags({"tier": "gold", "region": "eu"}) == "region=eu,tier=gold"
    with pytest.raises(ValueError, match=r"--sticky-tag: 'region' is not of the form name=value"):
        parse_tags(["region"], "--sticky-tag")
    with pytest.raises(ValueError, match=r"sticky_worker_tags: tag 'region'='e u'"):
        parse_tags({"region": "e u"}, "sticky_worker_tags")


def test_a_worker_serves_one_affinity_queue_per_subset_of_its_tags() -> None:
    assert affinity_queues("p", {"region": "eu", "gpu": "yes"}) == [
        "p.affinity.gpu=yes",
        "p.affinity.region=eu",
        "p.affinity.gpu=yes,region=eu",
    ]


def test_eligible_prefers_room_and_never_drops_affinity() -> None:
    full = Candidate("a", {"region": "eu"}, keys=2, max_keys=2)
    room = Candidate("b", {"region": "eu"}, keys=0, max_keys=2)
    other = Candidate("c", {"region": "us"})
    assert eligible([full, room, other], {"region": "eu"}) == [room]
    assert eligible([full, other], {"region": "eu"}) == [full]
    assert eligible([other], {"region": "eu"}) == []


def test_bad_placement_settings_name_the_setting(sticky_app: Any) -> None:
    from celery import Celery

    for value, message in [
        ("roundrobin", "sticky_placement='roundrobin' is not one of"),
        ("tests.cluster_app.no_such_function", "sticky_placement='tests.cluster_app.no_such"),
        ("", "sticky_placement='': must be one of"),
    ]:
        app = Celery("bad", broker="redis://127.0.0.1:6379/0", set_as_current=False)
        app.conf.sticky_placement = value
        with pytest.raises(ConfigurationError, match=message):
            StickyConfig.from_app(app)
    app = Celery("bad", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.sticky_worker_tags = {f"t{i}": "x" for i in range(6)}
    with pytest.raises(ConfigurationError, match=r"sticky_worker_tags=.*at most 5 tags"):
        StickyConfig.from_app(app)
    assert resolve_policy("tests.cluster_app.place_on_largest") is not None


# -- on real workers ---------------------------------------------------------------


def test_affinity_is_never_violated_over_a_thousand_keys(
    tagged: Any, redis_client: Any, sub: str
) -> None:
    app, _cluster = tagged
    task = app.tasks["tests.cluster_app.regional_step"]
    redis_client.delete(f"{sub}:events")
    sent: dict[str, tuple[str, bool]] = {}
    for i in range(1000):
        region = "eu" if i % 2 else "us"
        gpu = region == "eu" and i % 4 == 1
        key = f"aff-{i}"
        sent[key] = (region, gpu)
        # Every tenth lands on the shared queue first, wherever it is taken from:
        # a worker that must not hold the key passes it on.
        options = {"queue": f"{sub}.default"} if i % 10 == 0 else {}
        task.apply_async((key, 0, region, gpu), **options)
    found = wait_for_steps(redis_client, sub, 1000, timeout=180)
    ran = collections.Counter(e["key"] for e in found)
    assert len(ran) == 1000 and set(ran.values()) == {1}, "every task ran exactly once"
    store = lease_store(app)
    for event in found:
        region, gpu = sent[event["key"]]
        tags = TAGS[event["node"]]
        assert tags["region"] == region and (not gpu or tags.get("gpu") == "yes"), event
        assert store.lookup("key", event["key"]).owner == event["node"]  # type: ignore[union-attr]
    per_node = collections.Counter(e["node"] for e in found)
    print(f"\naffinity: 1000 keys ran on {dict(per_node)}")
    assert per_node["us-a@sticky-tests"] == 500


def test_a_task_no_live_worker_may_run_waits_for_one(
    tagged: Any, redis_client: Any, sub: str, caplog: Any
) -> None:
    app, cluster = tagged
    task = app.tasks["tests.cluster_app.regional_step"]
    routed, landed = unique("apac"), unique("apac-landed")
    redis_client.delete(f"{sub}:events")
    with caplog.at_level(logging.ERROR, logger="celery_sticky.producer.router"):
        first = task.apply_async((routed, 0, "apac"))
    assert "no worker has ever advertised the tags region=apac" in caplog.text
    assert f"queue {sub}.affinity.region=apac" in caplog.text
    # On the shared queue, an eu or us worker takes it and must pass it on.
    second = task.apply_async((landed, 0, "apac"), queue=f"{sub}.default")
    from celery_sticky.placement import affinity_queue_name
    from celery_sticky.producer.queues import queue_size

    apac = affinity_queue_name(str(app.conf.sticky_queue_prefix), "region=apac")
    wait_for(  # the worker that took the second one passed it on, next to the first
        lambda: queue_size(app, apac) >= 2,
        timeout=30,
        message="the apac task on the shared queue was not passed on",
    )
    assert read_events(redis_client, sub) == [], "nobody may run an apac task yet"
    assert lease_store(app).lookup("key", routed) is None
    cluster.start(
        "apac-a@sticky-tests", queues=[f"{sub}.default"], args=["--sticky-tag", "region=apac"]
    )
    try:
        assert first.get(timeout=60) == "apac-a@sticky-tests"
        assert second.get(timeout=60) == "apac-a@sticky-tests"
    finally:
        cluster.stop("apac-a@sticky-tests")


def _owners(app: Any, keys: list[str]) -> dict[str, str]:
    store = lease_store(app)
    return {key: store.lookup("key", key).owner for key in keys}  # type: ignore[union-attr]


def _live(app: Any) -> dict[str, Any]:
    return {w.name: w for w in lease_store(app).workers() if w.alive and not w.draining}


def test_hash_policy_places_each_key_by_rendezvous(tagged: Any, sub: str) -> None:
    producer = placed_app(sub, sticky_placement="hash")
    task = producer.tasks["tests.cluster_app.record_step"]
    keys = [unique("hash") for _ in range(40)]
    for result in [task.delay(key, 0) for key in keys]:
        result.get(timeout=60)
    capacities = {name: w.capacity for name, w in _live(producer).items()}
    assert capacities["eu-b@sticky-tests"] == 4  # --sticky-capacity
    owners = _owners(producer, keys)
    assert owners == {key: rendezvous(capacities, f"key:{key}") for key in keys}


def test_random_policy_spreads_keys(tagged: Any, sub: str) -> None:
    producer = placed_app(sub, sticky_placement="random")
    task = producer.tasks["tests.cluster_app.record_step"]
    keys = [unique("random") for _ in range(60)]
    for result in [task.delay(key, 0) for key in keys]:
        result.get(timeout=60)
    assert set(_owners(producer, keys).values()) == set(TAGS)


def test_first_come_claims_on_the_worker_that_takes_the_task(tagged: Any, sub: str) -> None:
    producer = placed_app(sub, sticky_placement="first_come")
    router = router_of(producer)
    assert router is not None
    key = unique("first")
    assert router._route("key", key) == (None, 0, "unrouted")
    assert lease_store(producer).lookup("key", key) is None, "no claim at publish"
    task = producer.tasks["tests.cluster_app.record_step"]
    keys = [unique("first") for _ in range(10)]
    for result in [task.apply_async((k, 0), queue=f"{sub}.us-only") for k in keys]:
        result.get(timeout=60)
    assert set(_owners(producer, keys).values()) == {"us-a@sticky-tests"}


def test_a_placement_function_sees_candidates_and_decides(tagged: Any, sub: str) -> None:
    from tests import cluster_app

    producer = placed_app(sub, sticky_placement="tests.cluster_app.place_on_largest")
    task = producer.tasks["tests.cluster_app.regional_step"]
    cluster_app.offered.clear()
    us_keys = [unique("fn-us") for _ in range(5)]
    eu_keys = [unique("fn-eu") for _ in range(5)]
    results = [task.delay(k, 0, "us") for k in us_keys] + [task.delay(k, 0, "eu") for k in eu_keys]
    for result in results:
        result.get(timeout=60)
    assert set(_owners(producer, eu_keys).values()) == {"eu-b@sticky-tests"}  # capacity 4
    assert set(_owners(producer, us_keys).values()) == {"us-a@sticky-tests"}  # the only match
    seen = {c.name: c for offer in cluster_app.offered for c in offer}
    assert seen["eu-b@sticky-tests"].tags == {"region": "eu", "gpu": "yes"}
    assert seen["eu-b@sticky-tests"].capacity == 4
    assert all(len(offer) == 1 for offer in cluster_app.offered[:5]), "us keys: us-a only"


def test_a_dead_workers_tasks_wait_for_a_worker_that_may_run_them(
    tagged: Any, redis_client: Any, sub: str
) -> None:
    """kill -9 of the only ``region=ap`` worker: its queued tasks go to the affinity's
    queue, not to the live eu and us workers, and run when another ap worker comes."""
    from celery_sticky.placement import affinity_queue_name
    from celery_sticky.producer.queues import queue_size

    app, cluster = tagged
    task = app.tasks["tests.cluster_app.regional_step"]
    redis_client.delete(f"{sub}:events")
    ap = [f"{sub}.default"]
    cluster.start("ap-1@sticky-tests", queues=ap, args=["--sticky-tag", "region=ap"])
    keys = [unique("ap") for _ in range(4)]
    results = [task.delay(key, step, "ap", False, 0.5) for step in range(5) for key in keys]
    # ap-1 is busy with the keys' steps (a step records its run when its body ends).
    wait_for(lambda: wait_for_steps(redis_client, sub, 1, timeout=0), timeout=30)
    cluster.kill("ap-1@sticky-tests")
    prefix = str(app.conf.sticky_queue_prefix)
    waiting = affinity_queue_name(prefix, "region=ap")
    direct = f"{prefix}.ap-1@sticky-tests"
    # The reaper moves the dead worker's queue (and its unacked tasks) on: wait until
    # they are all on the affinity's queue; nobody may run them meanwhile.
    wait_for(
        lambda: queue_size(app, waiting) > 0 and queue_size(app, direct) == 0,
        timeout=60,
        message="the dead worker's queue was not moved on",
    )
    early = [e for e in read_events(redis_client, sub) if "step" in e]
    assert {e["node"] for e in early} <= {"ap-1@sticky-tests"}
    cluster.start("ap-2@sticky-tests", queues=ap, args=["--sticky-tag", "region=ap"])
    try:
        for result in results:
            assert result.get(timeout=90) in ("ap-1@sticky-tests", "ap-2@sticky-tests")
    finally:
        cluster.stop("ap-2@sticky-tests")
    found = [e for e in read_events(redis_client, sub) if "step" in e and e["key"] in keys]
    assert {e["node"] for e in found} <= {"ap-1@sticky-tests", "ap-2@sticky-tests"}
    for key in keys:
        runs = sorted((e for e in found if e["key"] == key), key=lambda e: e["start"])
        assert {e["step"] for e in runs} == set(range(5)), "no task lost"
        later = [e["step"] for e in runs if e["node"] == "ap-2@sticky-tests"]
        assert later == sorted(later), f"{key}: the moved steps ran in order"


def test_a_full_worker_still_gets_keys_no_other_may_hold(
    tagged: Any, sub: str, caplog: Any
) -> None:
    """``sticky_max_keys_per_worker`` as a worker advertises it, and its soft fallback."""
    app, cluster = tagged
    name = "lim-1@sticky-tests"
    cluster.start(
        name,
        queues=[f"{sub}.default"],
        args=["--sticky-tag", "region=lim"],
        env={"STICKY_TEST_MAX_KEYS": "2"},
    )
    try:
        assert _live(app)[name].max_keys == 2
        task = app.tasks["tests.cluster_app.regional_step"]
        with caplog.at_level(logging.WARNING, logger="celery_sticky.producer.router"):
            nodes = [task.delay(unique("lim"), 0, "lim").get(timeout=30) for _ in range(4)]
        assert nodes == [name] * 4, "the only matching worker takes them all"
        assert "sticky_max_keys_per_worker keys; placed on lim-1@sticky-tests anyway" in caplog.text
    finally:
        cluster.stop(name)
