"""Moving keys on purpose, on real workers: ``move`` (even a busy key, in order)
and ``rebalance`` (idle keys only, with their state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from celery_sticky.context import lease_store
from celery_sticky.errors import MoveError
from celery_sticky.lease import WorkerInfo
from celery_sticky.producer.admin import move_key
from celery_sticky.producer.rebalance import plan_rebalance
from celery_sticky.testing import WorkerCluster, wait_for
from tests.conftest import REPO, read_events, start_cluster, unique
from tests.invariants import violations

R1, R2, R3 = "r1@sticky-tests", "r2@sticky-tests", "r3@sticky-tests"


@pytest.fixture(scope="module")
def sub(prefix: str) -> str:
    return f"{prefix}rb"


@pytest.fixture(scope="module")
def moving(sub: str) -> Iterator[tuple[Any, WorkerCluster]]:
    from tests.cluster_app import make_app

    app = make_app(sub)
    app.finalize()
    specs = {
        R1: {"args": ["--sticky-tag", "region=eu"]},
        R2: {"args": ["--sticky-tag", "region=eu"]},
        R3: {"args": ["--sticky-tag", "region=us"]},
    }
    for spec in specs.values():
        spec["queues"] = [f"{sub}.default"]
    with start_cluster(app, specs, env={"STICKY_TEST_PREFIX": sub}) as cluster:
        yield app, cluster


def cli(sub: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cluster_app:app", "sticky", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "STICKY_TEST_PREFIX": sub},
        cwd=str(REPO),
        timeout=180,
    )


def on(app: Any, node: str) -> str:
    """The direct queue of ``node``: a task sent there makes that worker claim its key."""
    return str(app.conf.sticky_queue_prefix) + "." + node


def steps_of(redis_client: Any, sub: str, key: str) -> list[dict[str, Any]]:
    found = [e for e in read_events(redis_client, sub) if e.get("key") == key and "step" in e]
    return sorted(found, key=lambda e: e["start"])


def test_plan_moves_idle_keys_from_most_to_least_loaded() -> None:
    def worker(name: str, keys: int, capacity: int = 1, **tags: str) -> WorkerInfo:
        return WorkerInfo(name, 0.0, True, capacity, f"q.{name}", keys, tags=tags)

    owned = {"a": [("k", str(i)) for i in range(6)], "b": [], "c": []}
    workers = [worker("a", 6, region="eu"), worker("b", 0, region="eu"), worker("c", 0, 2)]
    busy: dict[str, Any] = {"a": {("k", "0"), ("k", "1")}, "b": set(), "c": set()}
    eu_only = {("k", "2")}
    moves = plan_rebalance(
        workers, owned, busy, lambda w, k: "region=eu" if (w, k) in eu_only else "", 10
    )
    moved = {(m.workflow, m.key): m.target for m in moves}
    assert ("k", "0") not in moved and ("k", "1") not in moved, "busy keys stay"
    assert moved.get(("k", "2"), "b") == "b", "an eu key goes to an eu worker only"
    # Four idle keys, all moved: a:2 b:2 c:2 keys, c with twice the capacity.
    assert len(moves) == 4 and sorted(moved.values()) == ["b", "b", "c", "c"]
    assert plan_rebalance(workers, owned, {**busy, "a": None}, lambda w, k: "", 10) == []
    assert len(plan_rebalance(workers, owned, busy, lambda w, k: "", 1)) == 1


def test_moving_a_busy_key_keeps_its_order_and_state(
    moving: Any, redis_client: Any, sub: str
) -> None:
    app, _cluster = moving
    task = app.tasks["tests.cluster_app.record_step"]
    key = unique("move")
    task.apply_async((key, 0), queue=on(app, R1)).get(timeout=30)
    before = [task.delay(key, step, 0.3) for step in range(1, 6)]
    # Step 1 ran (it records when its body ends), steps 2-5 wait behind it on r1.
    wait_for(lambda: any(e["step"] == 1 for e in steps_of(redis_client, sub, key)), timeout=30)
    move_key("key", key, R2, app=app)
    after = [task.delay(key, step, 0.05) for step in range(6, 12)]
    for result in before + after:
        result.get(timeout=60)
    events = steps_of(redis_client, sub, key)
    assert violations(events, {key: list(range(12))}, one_node=False) == []
    nodes = [e["node"] for e in events]
    assert nodes[:6] == [R1] * 6, "what was sent before the move runs on the old owner"
    assert nodes[6:] == [R2] * 6, "what was sent after it runs on the new one"
    assert [e["recovered"] for e in events][6] is True, "the state came along"
    assert task.delay(key, 12).get(timeout=30) == list(range(13))
    info = lease_store(app).lookup("key", key)
    assert info is not None and (info.owner, info.origin) == (R2, "moved")
    # The target waited for the move, not for a number it took as missing.
    gaps = [line for line in _cluster.workers[R2].log().splitlines() if f"gap in key:{key}" in line]
    assert gaps == [], gaps


def test_move_refuses_what_it_must_not_do(moving: Any, sub: str) -> None:
    app, _cluster = moving
    task = app.tasks["tests.cluster_app.regional_step"]
    key = unique("eu-move")
    assert task.apply_async((key, 0, "eu"), queue=on(app, R1)).get(timeout=30) == R1
    shown = cli(sub, "show", "key", key, "--json")
    assert json.loads(shown.stdout)["affinity"] == "region=eu", shown.stderr
    with pytest.raises(MoveError, match=f"worker '{R3}' lacks a tag the key's affinity region=eu"):
        move_key("key", key, R3, app=app)
    done = cli(sub, "move", "key", key, "nobody@nowhere")
    assert done.returncode == 1 and "unknown worker 'nobody@nowhere'" in done.stderr
    done = cli(sub, "move", "key", unique("none"), R2)
    assert done.returncode == 1 and "no lease for key:" in done.stderr
    done = cli(sub, "move", "key", key, R2, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["moved"] is True
    assert lease_store(app).lookup("key", key).owner == R2  # type: ignore[union-attr]


def test_rebalance_moves_only_idle_keys_and_keeps_their_state(
    moving: Any, redis_client: Any, sub: str
) -> None:
    app, _cluster = moving
    store = lease_store(app)
    task = app.tasks["tests.cluster_app.record_step"]
    # Even out what earlier tests left, so r1's new keys make the whole imbalance.
    keys = [unique("idle") for _ in range(12)]
    for key in keys:
        for step in range(3):
            task.apply_async((key, step), queue=on(app, R1)).get(timeout=30)
    busy, scheduled = keys[0], keys[1]
    running = task.delay(busy, 3, 20.0)  # runs on r1 until well after the rebalance
    later = task.apply_async((scheduled, 3), countdown=25)  # waits on r1

    def reported() -> set[tuple[str, ...]]:
        replies = app.control.broadcast("sticky_busy_keys", destination=[R1], reply=True, timeout=5)
        return {tuple(k) for reply in replies for k in reply.get(R1, {}).get("keys", [])}

    wait_for(  # both reached r1: one running, one scheduled
        lambda: {("key", busy), ("key", scheduled)} <= reported(),
        timeout=30,
        message="running and scheduled keys are busy",
    )

    dry = cli(sub, "rebalance", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)["moves"]
    assert plan and all(m["task_id"] is None for m in plan)
    assert {store.lookup("key", k).owner for k in keys} == {R1}, "a dry run moves nothing"  # type: ignore[union-attr]

    done = cli(sub, "rebalance", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    moves = json.loads(done.stdout)["moves"]
    moved = {m["key"]: m["to"] for m in moves if m["key"] in keys}
    print(f"\nrebalance: moved {len(moves)} key(s): {sorted(moved.values())}")
    assert moved, "r1 held 12 more keys than the others"
    assert busy not in moved and scheduled not in moved, "busy keys stay"
    assert all(m["error"] is None for m in moves)
    loads = {w.name: w.keys for w in store.workers() if w.alive}
    assert max(loads.values()) - min(loads.values()) <= 2, loads
    for key, target in moved.items():
        assert store.lookup("key", key).owner == target  # type: ignore[union-attr]
        assert task.delay(key, 3).get(timeout=30) == [0, 1, 2, 3], "state moved along"
        assert steps_of(redis_client, sub, key)[-1]["node"] == target
    assert running.get(timeout=30) == [0, 1, 2, 3]
    assert later.get(timeout=60) == [0, 1, 2, 3]
    assert store.lookup("key", busy).owner == R1  # type: ignore[union-attr]
