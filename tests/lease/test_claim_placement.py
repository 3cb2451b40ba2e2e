"""Placement inside the claim script, against a real Redis: policies, affinity,
key limits, and the two move scripts.

Workers here are registry entries made with the heartbeat script, as a worker
process makes them; what runs on real workers is in tests/test_placement.py.
"""

from __future__ import annotations

import collections
import hashlib
import math
import time
from typing import Any

import pytest

from celery_sticky.lease import ClaimStatus, LeaseStore


@pytest.fixture
def store(make_store: Any) -> LeaseStore:
    return make_store(30.0)  # type: ignore[no-any-return]


def register(
    store: LeaseStore, name: str, capacity: int = 1, tags: str = "", max_keys: int | None = None
) -> None:
    store.heartbeat(name, capacity, f"q.{name}", register=True, tags=tags, max_keys=max_keys)


def rendezvous(workers: dict[str, int], member: str) -> str:
    """An independent oracle of weighted rendezvous hashing (what claim.lua computes)."""

    def score(name: str) -> float:
        digest = hashlib.sha1(f"{name}\n{member}".encode()).hexdigest()
        u = (int(digest[:13], 16) + 0.5) / 16**13
        return workers[name] / -math.log(u)

    return max(workers, key=score)


def owners(store: LeaseStore, keys: list[str], **claim: Any) -> dict[str, str]:
    return {key: store.claim("order", key, **claim).owner for key in keys}


def release_all(store: LeaseStore, keys: list[str]) -> None:
    for key in keys:
        assert store.release("order", key)


def test_hash_is_deterministic_and_weighted_by_capacity(store: LeaseStore) -> None:
    workers = {"a": 1, "b": 1, "c": 2}
    for name, capacity in workers.items():
        register(store, name, capacity)
    keys = [str(i) for i in range(600)]
    first = owners(store, keys, policy="hash")
    assert first == {key: rendezvous(workers, f"order:{key}") for key in keys}
    release_all(store, keys)
    assert owners(store, keys, policy="hash") == first  # same workers, same targets
    counts = collections.Counter(first.values())
    # c has half the capacity: about half the keys (binomial sd ~12 of 300).
    assert 240 < counts["c"] < 360, counts


def test_hash_moves_about_one_nth_of_new_keys_when_a_worker_joins(store: LeaseStore) -> None:
    for name in ("a", "b", "c"):
        register(store, name)
    keys = [str(i) for i in range(3000)]
    before = owners(store, keys, policy="hash")
    release_all(store, keys)
    register(store, "d")
    after = owners(store, keys, policy="hash")
    changed = [key for key in keys if before[key] != after[key]]
    share = len(changed) / len(keys)
    print(
        f"\nhash: a 4th worker joined; {len(changed)}/{len(keys)} = {share:.1%} of new-key "
        "targets changed (ideal 1/4 = 25%)"
    )
    # Only keys that now go to the new worker change target; about 1/N of them.
    assert {after[key] for key in changed} == {"d"}
    assert 0.22 < share < 0.28


def test_random_is_weighted_by_capacity(store: LeaseStore) -> None:
    register(store, "a", capacity=1)
    register(store, "b", capacity=3)
    keys = [str(i) for i in range(2000)]
    counts = collections.Counter(owners(store, keys, policy="random").values())
    assert 0.70 < counts["b"] / len(keys) < 0.80, counts  # 3/4, sd ~1%


def test_affinity_only_matching_workers_claim(store: LeaseStore) -> None:
    register(store, "eu1", tags="region=eu")
    register(store, "eu2", tags="gpu=yes,region=eu")
    register(store, "us1", capacity=8, tags="region=us")
    for policy in ("least_loaded", "hash", "random"):
        placed = owners(
            store, [f"{policy}{i}" for i in range(60)], policy=policy, affinity="region=eu"
        )
        assert set(placed.values()) == {"eu1", "eu2"}, policy
    gpu = store.claim("order", "g", policy="hash", affinity="gpu=yes,region=eu")
    assert gpu.owner == "eu2"
    # A candidate lacking a tag does not get the key; the policy places it.
    lease = store.claim("order", "c", candidate="us1", affinity="region=eu")
    assert lease.status is ClaimStatus.CLAIMED and lease.owner in ("eu1", "eu2")
    # No live worker matches: nobody claims it, and the lease keeps no trace.
    assert store.claim("order", "x", affinity="region=apac").status is ClaimStatus.NO_LIVE_WORKER
    assert store.lookup("order", "x") is None
    assert store.lookup("order", "g").affinity == "gpu=yes,region=eu"  # type: ignore[union-attr]


def test_a_taken_over_key_keeps_its_affinity(store: LeaseStore) -> None:
    register(store, "eu1", tags="region=eu")
    register(store, "us1", tags="region=us")
    store.claim("order", "1", affinity="region=eu")
    store.deregister("eu1")
    store.mark_reaped("eu1")
    register(store, "eu2", tags="region=eu")
    # No affinity given (a message published before it had one): the lease's own applies.
    taken = store.claim("order", "1", candidate="us1")
    assert (taken.status, taken.owner) == (ClaimStatus.TAKEN_OVER, "eu2")


def test_policy_none_claims_nothing(store: LeaseStore) -> None:
    register(store, "a")
    assert store.claim("order", "1", policy="none").status is ClaimStatus.UNOWNED
    assert store.lookup("order", "1") is None
    store.claim("order", "1", candidate="a")
    assert store.claim("order", "1", policy="none").status is ClaimStatus.OWNED


def test_key_limit_prefers_workers_with_room_then_is_soft(store: LeaseStore) -> None:
    register(store, "a", capacity=4, max_keys=2)
    register(store, "b", capacity=1, max_keys=3)
    placed = [store.claim("order", str(i)) for i in range(5)]
    counts = collections.Counter(lease.owner for lease in placed)
    assert counts == {"a": 2, "b": 3}
    assert not any(lease.over_limit for lease in placed)
    # Everyone is full: placed anyway (least loaded: a), and said so.
    extra = store.claim("order", "5")
    assert (extra.owner, extra.over_limit) == ("a", True)
    # A full candidate (a worker taking a first_come task) yields to one with room.
    register(store, "c", max_keys=1)
    lease = store.claim("order", "6", candidate="a")
    assert lease.owner == "c"


def test_move_begin_and_commit(store: LeaseStore) -> None:
    register(store, "a", tags="region=eu")
    register(store, "b", tags="region=eu")
    register(store, "us", tags="region=us")
    first = store.claim("order", "1", candidate="a", affinity="region=eu")
    assert store.begin_move("order", "1", "us")[0] == -3  # lacks region=eu
    assert store.begin_move("order", "1", "a")[0] == -5
    assert store.begin_move("order", "1", "ghost")[0] == -2
    assert store.begin_move("order", "nope", "b")[0] == 0
    assert store.begin_move("order", "1", "b") == (1, "a", first.epoch)
    assert store.begin_move("order", "1", "b")[0] == -4
    # While moving: publishers are sent to the target, the target waits, the owner runs.
    assert store.claim("order", "1").status is ClaimStatus.MOVING
    assert store.claim("order", "1").owner == "b"
    assert store.claim("order", "1", candidate="b").status is ClaimStatus.MOVING
    assert store.claim("order", "1", candidate="a")[:3] == ("a", first.epoch, ClaimStatus.OWNED)
    # A commit for a stale epoch does nothing; the right one hands the key over.
    assert store.commit_move("order", "1", "a", first.epoch - 1, "b").status is ClaimStatus.OWNED
    moved = store.commit_move("order", "1", "a", first.epoch, "b")
    assert (moved.owner, moved.status) == ("b", ClaimStatus.CLAIMED) and moved.epoch > first.epoch
    info = store.lookup("order", "1")
    assert info is not None and (info.owner, info.origin, info.moving_to) == ("b", "moved", "")
    assert store.owned_keys("a") == set() and store.owned_keys("b") == {("order", "1")}


def test_a_move_to_a_worker_that_died_is_called_off(store: LeaseStore) -> None:
    register(store, "a")
    register(store, "b")
    lease = store.claim("order", "1", candidate="a")
    assert store.begin_move("order", "1", "b")[0] == 1
    store.deregister("b")
    assert store.claim("order", "1")[:3] == ("a", lease.epoch, ClaimStatus.OWNED)
    assert store.commit_move("order", "1", "a", lease.epoch, "b").status is ClaimStatus.OWNED
    assert store.lookup("order", "1").moving_to == ""  # type: ignore[union-attr]


def test_a_move_that_misses_its_deadline_is_called_off(store: LeaseStore) -> None:
    """A lost or failed move task must not leave the key's new tasks waiting for good."""
    register(store, "a")
    register(store, "b")
    lease = store.claim("order", "1", candidate="a")
    assert store.begin_move("order", "1", "b", deadline=0.3)[0] == 1
    assert store.claim("order", "1").status is ClaimStatus.MOVING
    time.sleep(0.4)
    assert store.claim("order", "1")[:3] == ("a", lease.epoch, ClaimStatus.OWNED)
    assert store.lookup("order", "1").moving_to == ""  # type: ignore[union-attr]
    assert store.commit_move("order", "1", "a", lease.epoch, "b").status is ClaimStatus.OWNED
    # Late, but nobody asked meanwhile: the commit itself checks the deadline.
    assert store.begin_move("order", "1", "b", deadline=0.3)[0] == 1
    time.sleep(0.4)
    assert store.commit_move("order", "1", "a", lease.epoch, "b").status is ClaimStatus.OWNED
    assert store.begin_move("order", "1", "b")[0] == 1, "a new move may start"


def test_registered_tags_are_remembered(store: LeaseStore) -> None:
    register(store, "a", tags="region=eu,tier=gold")
    register(store, "b")
    assert store.tagsets() == [{"region": "eu", "tier": "gold"}]
    info = {w.name: w for w in store.workers()}
    assert info["a"].tags == {"region": "eu", "tier": "gold"} and info["b"].tags == {}
    # Registering again with other tags replaces them.
    register(store, "a", tags="region=us")
    assert {w.name: w.tags for w in store.workers()}["a"] == {"region": "us"}
