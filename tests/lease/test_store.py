"""The lease store's Lua scripts against a real Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery

from celery_sticky.lease import ClaimStatus, LeaseStore
from celery_sticky.settings import StickyConfig
from celery_sticky.testing import start_server
from tests.lease.conftest import established


@pytest.fixture
def store(make_store: Any) -> LeaseStore:
    return make_store(1.0)  # type: ignore[no-any-return]


def test_claim_epochs_rise_and_a_live_owner_keeps_its_key(store: LeaseStore) -> None:
    store.heartbeat("a", 1, "q.a")
    store.heartbeat("b", 1, "q.b")
    first = store.claim("order", "1", candidate="a")
    assert (first.owner, first.status) == ("a", ClaimStatus.CLAIMED)
    again = store.claim("order", "1", candidate="b")
    assert again[:3] == (first.owner, first.epoch, ClaimStatus.OWNED)
    other = store.claim("order", "2", candidate="b")
    assert other.epoch > first.epoch
    assert store.owned_keys("a") == {("order", "1")}


def test_dead_owner_is_taken_over_with_a_higher_epoch(store: LeaseStore) -> None:
    store.heartbeat("a", 1, "q.a")
    first = store.claim("order", "1", candidate="a")
    time.sleep(1.2)  # the TTL is 1 s
    store.heartbeat("b", 1, "q.b")
    assert store.lookup("order", "1")[:4] == ("a", first.epoch, False, "claimed")
    assert store.claim("order", "1", candidate="b").status is ClaimStatus.PENDING
    assert store.mark_reaped("a") is not None
    moved = store.claim("order", "1", candidate="b")
    assert (moved.owner, moved.status, moved.previous) == ("b", ClaimStatus.TAKEN_OVER, "a")
    assert moved.epoch > first.epoch
    assert store.owned_keys("a") == set() and store.owned_keys("b") == {("order", "1")}
    assert store.lookup("order", "1")[:4] == ("b", moved.epoch, True, "taken_over")


def test_no_live_worker_claims_nothing(store: LeaseStore) -> None:
    assert store.claim("order", "1").status is ClaimStatus.NO_LIVE_WORKER
    assert store.claim("order", "1", candidate="ghost").status is ClaimStatus.NO_LIVE_WORKER
    assert store.lookup("order", "1") is None


def test_least_loaded_by_capacity(store: LeaseStore) -> None:
    store.heartbeat("big", 3, "q.big")
    store.heartbeat("small", 1, "q.small")
    owners = [store.claim("order", str(i)).owner for i in range(8)]
    assert owners.count("big") == 6 and owners.count("small") == 2


def test_release_only_by_the_owner(store: LeaseStore) -> None:
    store.heartbeat("a", 1, "q.a")
    store.claim("order", "1", candidate="a")
    assert not store.release("order", "1", owner="b")
    assert store.release("order", "1", owner="a")
    assert store.lookup("order", "1") is None and store.owned_keys("a") == set()


def test_deregistered_worker_keeps_its_keys_until_reaped(store: LeaseStore) -> None:
    store.heartbeat("a", 1, "q.a")
    store.heartbeat("b", 1, "q.b")
    store.claim("order", "1", candidate="a")
    store.deregister("a")
    assert store.dead_workers() == ["a"]
    assert store.claim("order", "1", candidate="b").status is ClaimStatus.PENDING
    assert store.claim("order", "1", force=True).status is ClaimStatus.TAKEN_OVER
    store.heartbeat("a", 1, "q.a")  # the same node comes back: alive, not reaped
    assert store.dead_workers() == []


def test_epochs_survive_a_store_that_forgot_everything(store: LeaseStore) -> None:
    store.heartbeat("a", 1, "q.a")
    before = store.claim("order", "1", candidate="a").epoch
    store.redis.delete(store.epoch_key, store.lease_key("order", "1"))
    assert store.claim("order", "1", candidate="a").epoch > before


def test_a_heartbeat_says_when_the_store_forgot_the_worker(store: LeaseStore) -> None:
    """A heartbeat that finds no registration (the store lost its data) registers the
    worker again and says so: its known leases are void (worker/node.py)."""
    assert store.heartbeat("a", 1, "q.a", register=True).forgotten is False
    assert store.heartbeat("a", 1, "q.a").forgotten is False
    for name in store.redis.scan_iter(f"{store.prefix}*"):  # a restart without its data
        store.redis.delete(name)
    reply = store.heartbeat("a", 1, "q.a")
    assert reply.ok and reply.forgotten
    assert store.heartbeat("a", 1, "q.a").forgotten is False, "registered again"
    assert [w.name for w in store.workers() if w.alive] == ["a"]


def test_a_store_that_lost_its_data_claims_nothing_for_the_grace(make_store: Any) -> None:
    """After the store lost its data (here: every key deleted, as an empty restart
    leaves it), the first script stamps when its data began, and no key is claimed
    for ``CLAIM_GRACE`` after that: a worker may still trust, for that long, a lease
    the lost data held (worker/node.py, KnownLeases). Before: claimed at once."""
    from celery_sticky.lease import CLAIM_GRACE
    from celery_sticky.testing import wait_for

    store: LeaseStore = make_store(30.0)  # b stays alive while the test waits
    store.heartbeat("a", 1, "q.a", register=True)
    assert store.claim("order", "1", candidate="a").status is ClaimStatus.CLAIMED
    for name in store.redis.scan_iter(f"{store.prefix}*"):  # a restart without its data
        store.redis.delete(name)
    store.heartbeat("b", 1, "q.b", register=True)
    born = store.born()
    assert born is not None, "the registration did not stamp the store"
    refused = store.claim("order", "1", candidate="b")
    assert refused.status is ClaimStatus.GRACE, refused
    assert store.lookup("order", "1") is None, "a refused claim wrote a lease"
    lease = wait_for(
        lambda: (
            (found := store.claim("order", "1", candidate="b")).status is not ClaimStatus.GRACE
            and found
        ),
        timeout=CLAIM_GRACE * 5,
    )
    granted = store.server_time()
    assert (lease.owner, lease.status) == ("b", ClaimStatus.CLAIMED)
    assert granted - float(born) >= CLAIM_GRACE, "claimed within the grace"
    assert store.born() == born, "the stamp changed without a loss"


def _commands(client: Any) -> int:
    return sum(
        int(v["calls"])
        for k, v in client.info("commandstats").items()
        if k not in ("cmdstat_info", "cmdstat_evalsha")
    )


def test_heartbeat_cost_does_not_grow_with_owned_keys() -> None:
    """A heartbeat runs the same Redis commands with 0 and with 2,000 owned keys.

    Counted on a private server, where no other client's commands interfere.
    """
    with start_server() as port:
        app = Celery("beat", broker=f"redis://127.0.0.1:{port}/0", set_as_current=False)
        store = established(LeaseStore(StickyConfig.from_app(app)))
        client = store.redis
        store.heartbeat("a", 1, "q.a")
        before = _commands(client)
        store.heartbeat("a", 1, "q.a")
        empty = _commands(client) - before
        for i in range(2000):
            store.claim("order", str(i), candidate="a")
        before = _commands(client)
        store.heartbeat("a", 1, "q.a")
        loaded = _commands(client) - before
        client.close()
    assert empty == loaded <= 5


def test_a_reaping_lock_counts_only_while_its_reaper_lives(store: LeaseStore) -> None:
    """A restarted worker waits for the reaper moving its queue, but not for a reaper
    that died holding the lock (the lock outlives it by up to two minutes)."""
    store.heartbeat("victim", 1, "q.victim")
    store.heartbeat("reaper", 1, "q.reaper")
    assert store.try_lock_reaping("victim", "reaper", 120)
    assert store.reaping("victim")
    store.deregister("reaper")  # the reaper is dead now, its lock still there
    assert not store.reaping("victim")
    store.unlock_reaping("victim")
    assert not store.reaping("victim")
