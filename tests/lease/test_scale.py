"""The compact lease records (lease.lua), the key counters the scripts keep, and the
reaper's batched hand-over of a dead worker's keys, against a real Redis."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from celery import Celery

from celery_sticky.lease import ClaimStatus, LeaseStore
from celery_sticky.lease.store import LEASE_BUCKETS, OWNED_BUCKETS, bucket_of
from celery_sticky.settings import StickyConfig
from celery_sticky.worker.reaper import RETIRE_AFTER, reap


@pytest.fixture
def store(make_store: Any) -> LeaseStore:
    return make_store(30.0)  # type: ignore[no-any-return]


def register(store: LeaseStore, name: str, capacity: int = 1, tags: str = "") -> None:
    store.heartbeat(name, capacity, f"q.{name}", register=True, tags=tags)


def every_lease(store: LeaseStore) -> dict[tuple[str, str], list[str | None]]:
    """Every lease in the store, read bucket by bucket as `celery sticky keys` does."""
    members: list[str] = []
    position = 0
    while True:
        position, page = store.scan_leases(position, None, 1024)
        members += page
        if position == 0:
            break
    pairs = [tuple(member.split(":", 1)) for member in members]
    return dict(zip(pairs, store.lease_rows(pairs), strict=True))  # type: ignore[arg-type]


def assert_counts_agree(store: LeaseStore, nodes: list[str]) -> None:
    """Each node's counter = its owned entries = the leases that name it as owner."""
    leases = every_lease(store)
    for node in nodes:
        holding = {pair for pair, (owner, _, _) in leases.items() if owner == node}
        assert store.owned_keys(node) == holding, node
        assert store.owned_count(node) == len(holding), node
    listed = {w.name: w.keys for w in store.workers()}
    for node in nodes:
        if node in listed:
            assert listed[node] == store.owned_count(node)


def test_the_bucket_is_stable_and_spread() -> None:
    assert bucket_of("order:1") == bucket_of("order:1") == LeaseStore.bucket("order", "1")
    buckets = {bucket_of(f"order:{i}") for i in range(5000)}
    assert all(0 <= b < LEASE_BUCKETS for b in buckets) and len(buckets) > 4000


def test_a_lease_round_trips_every_field_and_status(store: LeaseStore) -> None:
    register(store, "a", tags="pipe=x|y,zone=1")  # '|' in a tag: the affinity goes last
    register(store, "b", tags="pipe=x|y,zone=1")
    affinity = "pipe=x|y,zone=1"
    claimed = store.claim("order", "1", "a", affinity=affinity)
    assert claimed.status is ClaimStatus.CLAIMED
    info = store.lookup("order", "1")
    assert info is not None
    assert info[:6] == ("a", claimed.epoch, True, "claimed", affinity, "")
    assert info.since is not None and abs(info.since - store.server_time()) < 5
    assert store.lease_since("order", "1") == info.since
    assert store.lease_rows([("order", "1"), ("order", "none")]) == [
        ["a", str(claimed.epoch), "claimed"],
        [None, None, None],
    ]
    # moving: the record keeps the target and the deadline, claims route there
    assert store.begin_move("order", "1", "b", deadline=30)[0] == 1
    assert store.lookup("order", "1").moving_to == "b"  # type: ignore[union-attr]
    moving = store.claim("order", "1", "")
    assert (moving.owner, moving.status, moving.previous) == ("b", ClaimStatus.MOVING, "a")
    assert store.claim("order", "1", "a").status is ClaimStatus.OWNED  # the owner itself
    moved = store.commit_move("order", "1", "a", claimed.epoch, "b")
    assert (moved.owner, moved.status) == ("b", ClaimStatus.CLAIMED) and moved.epoch > claimed.epoch
    info = store.lookup("order", "1")
    assert info is not None and info[:6] == ("b", moved.epoch, True, "moved", affinity, "")
    # a move whose deadline passed is off at the next claim
    assert store.begin_move("order", "1", "a", deadline=0.01)[0] == 1
    time.sleep(0.05)
    assert store.claim("order", "1", "").status is ClaimStatus.OWNED
    assert store.lookup("order", "1").moving_to == ""  # type: ignore[union-attr]
    # copy_switch reads the same record: owner and epoch fence it
    assert store.switch_copy("order", "1", "b", moved.epoch, "v1", "none")[0]
    assert not store.switch_copy("order", "1", "a", moved.epoch, "v2", "none")[0]
    assert not store.switch_copy("order", "1", "b", moved.epoch - 1, "v2", "none")[0]
    # pending while the dead owner is not reaped, then taken over
    store.deregister("b")
    assert store.claim("order", "1", "a").status is ClaimStatus.PENDING
    store.mark_reaped("b")
    taken = store.claim("order", "1", "a")
    assert (taken.owner, taken.status, taken.previous) == ("a", ClaimStatus.TAKEN_OVER, "b")
    info = store.lookup("order", "1")
    assert info is not None and info[:5] == ("a", taken.epoch, True, "taken_over", affinity)
    assert store.release("order", "1", owner="a", epoch=taken.epoch)
    assert store.lookup("order", "1") is None
    assert_counts_agree(store, ["a", "b"])


def test_leases_are_small_listpack_buckets(store: LeaseStore) -> None:
    register(store, "celery@a-rather-long-host-name.example.internal")
    for i in range(300):
        store.claim("order", f"key-{i}", "celery@a-rather-long-host-name.example.internal")
    bucket = store.lease_key("order", "key-7")
    assert store.redis.object("encoding", bucket) == "listpack"
    raw = store.redis.hget(bucket, "order:key-7")
    assert len(raw) < 40, raw  # the owner is a short id, not its name
    node_id = store.node_id("celery@a-rather-long-host-name.example.internal")
    owned = f"{store.prefix}owned:{node_id}:{LeaseStore.bucket('order', 'key-7') % OWNED_BUCKETS}"
    assert store.redis.hexists(owned, "order:key-7")


def test_counts_stay_right_across_claim_release_takeover_move_and_reap(
    store: LeaseStore,
) -> None:
    nodes = ["a", "b", "c"]
    for node in nodes:
        register(store, node)
    keys = [str(i) for i in range(200)]
    for key in keys:
        store.claim("order", key)  # least_loaded spreads them
    assert sorted(store.owned_count(n) for n in nodes) == [66, 67, 67]
    for key in keys[:30]:
        info = store.lookup("order", key)
        assert info is not None and store.release("order", key, owner=info.owner)
    store.release("order", keys[30], owner="nobody")  # refused: counts unchanged
    info = store.lookup("order", keys[40])
    assert info is not None
    target = next(n for n in nodes if n != info.owner)
    store.begin_move("order", keys[40], target)
    store.commit_move("order", keys[40], info.owner, info.epoch, target)
    assert_counts_agree(store, nodes)
    store.deregister("a")
    store.mark_reaped("a")
    held = store.owned_count("a")
    taken = store.claim("order", next(iter(store.owned_keys("a")))[1], "b")
    assert taken.status is ClaimStatus.TAKEN_OVER and store.owned_count("a") == held - 1
    assert_counts_agree(store, nodes)
    result = store.take_over_keys("a")
    assert result == (held - 1, 0, True)
    assert store.owned_count("a") == 0 and store.owned_keys("a") == set()
    assert store.owned_count("b") + store.owned_count("c") == 170
    assert_counts_agree(store, nodes)


def test_a_reap_hands_every_key_over_and_leaves_no_stray_entry(make_store: Any) -> None:
    """3,000 keys of a dead worker, through the reaper's own function: reaped, they stay
    its own (a restart with the same name keeps them); retired, every key ends with a
    live worker under a higher epoch and nothing of the dead worker is left."""
    store: LeaseStore = make_store(30.0)
    for node in ("dead", "b", "c"):
        register(store, node, capacity=2 if node == "c" else 1)
    keys = [f"k{i}" for i in range(3000)]
    pipe = store.redis.pipeline(transaction=False)
    for key in keys:  # claims through the real script, pipelined
        bucket_key, member, bucket = store._lease_args("order", key)
        store._claim(
            keys=[bucket_key, store.workers_key, store.epoch_key],
            args=[30.0, "dead", store.prefix, member, "", "least_loaded", "", "0.5", bucket, 1],
            client=pipe,
        )
    pipe.execute()
    store.claim("order", "elsewhere", "b")
    before = every_lease(store)
    assert store.owned_count("dead") == 3000
    store.deregister("dead")
    app = Celery("reaper", broker=os.environ["STICKY_TEST_REDIS_URL"], set_as_current=False)
    app.conf.update(sticky_key_prefix=store.prefix[:-1], sticky_lease_ttl=30.0)
    assert StickyConfig.from_app(app).key_prefix == store.config.key_prefix
    assert reap(app, store, "dead") == 0  # no queued task
    assert every_lease(store) == before, "reaped: its keys wait for their next task"
    assert {w.name: w.reaped for w in store.workers()}["dead"]
    started = time.monotonic()
    retired = store.server_time() - RETIRE_AFTER - 1  # reaped long ago: retire it now
    assert reap(app, store, "dead", reaped_at=retired) == 0
    elapsed = time.monotonic() - started
    after = every_lease(store)
    assert set(after) == set(before)
    for pair in keys:
        owner, epoch, origin = after[("order", pair)]
        assert owner in ("b", "c") and origin == "taken_over", (pair, owner)
        assert int(epoch or 0) > int(before[("order", pair)][1] or 0)
    assert after[("order", "elsewhere")] == before[("order", "elsewhere")]
    assert "dead" not in {w.name for w in store.workers()}
    assert store.owned_count("dead") == 0
    node_id = store.node_id("dead")
    assert not list(store.redis.scan_iter(f"{store.prefix}owned:{node_id}:*", count=1000))
    assert not store.redis.hexists(store.keycount_key, "dead")
    # least_loaded by capacity: c (2) gets about twice b's share
    assert abs(store.owned_count("c") - 2 * store.owned_count("b")) <= 3
    assert_counts_agree(store, ["dead", "b", "c"])
    assert elapsed < 10


def test_keys_no_live_worker_may_take_stay_with_the_dead_one(store: LeaseStore) -> None:
    register(store, "gpu", tags="gpu=1")
    register(store, "cpu")
    for i in range(20):
        store.claim("order", f"g{i}", "gpu", affinity="gpu=1")
        store.claim("order", f"c{i}", "gpu")
    store.deregister("gpu")
    assert store.take_over_keys("gpu") == (0, 0, False)  # not reaped yet: nothing done
    store.mark_reaped("gpu")
    assert store.take_over_keys("gpu") == (20, 20, True)
    assert store.owned_keys("gpu") == {("order", f"g{i}") for i in range(20)}
    register(store, "gpu2", tags="gpu=1")
    assert store.take_over_keys("gpu") == (20, 0, True)
    assert store.owned_count("gpu2") == 20 and store.owned_count("gpu") == 0
    assert_counts_agree(store, ["gpu", "cpu", "gpu2"])


def test_a_live_worker_keeps_its_keys(store: LeaseStore) -> None:
    register(store, "a")
    register(store, "b")
    store.claim("order", "1", "a")
    assert store.take_over_keys("a") == (0, 0, False)
    store.deregister("a")
    store.mark_reaped("a")
    register(store, "a")  # back before the reaper came: not reaped any more
    assert store.take_over_keys("a") == (0, 0, False)
    info = store.lookup("order", "1")
    assert info is not None and (info.owner, info.alive, info.origin) == ("a", True, "claimed")


def test_forget_worker_drops_its_entries(store: LeaseStore) -> None:
    register(store, "a", tags="gpu=1")
    register(store, "b")
    store.claim("order", "1", "a", affinity="gpu=1")
    store.deregister("a")
    store.mark_reaped("a")
    assert store.take_over_keys("a") == (0, 1, True)  # nobody may take it
    node_id = store.node_id("a")
    store.forget_worker("a")
    assert store.owned_count("a") == 0
    assert not list(store.redis.scan_iter(f"{store.prefix}owned:{node_id}:*", count=1000))
    assert "a" not in {w.name for w in store.workers()}
    # its lease stays; the next claim takes it over for a matching worker
    register(store, "gpu2", tags="gpu=1")
    taken = store.claim("order", "1", "")
    assert (taken.owner, taken.status) == ("gpu2", ClaimStatus.TAKEN_OVER)
    assert store.owned_count("gpu2") == 1 and store.owned_count("a") == 0
