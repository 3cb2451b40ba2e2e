"""A lease store of its own for each test, under a fresh key prefix."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from celery_sticky.lease import LeaseStore
from celery_sticky.settings import StickyConfig


def established(store: LeaseStore) -> LeaseStore:
    """``store`` as one that has been up for a minute: its claim grace is over (claim.lua
    refuses claims for ``CLAIM_GRACE`` after a store's data begins)."""
    store.redis.set(store.born_key, f"{store.server_time() - 60:.6f}")
    return store


@pytest.fixture
def make_store(redis_client: Any) -> Iterator[Callable[[float], LeaseStore]]:
    """``make_store(lease_ttl)``: a store on the test Redis; its keys are deleted after."""
    prefixes: list[str] = []

    def make(lease_ttl: float) -> LeaseStore:
        prefix = f"ls{uuid.uuid4().hex[:8]}"
        prefixes.append(prefix)
        app = Celery("store", broker=os.environ["STICKY_TEST_REDIS_URL"], set_as_current=False)
        app.conf.update(sticky_key_prefix=prefix, sticky_lease_ttl=lease_ttl)
        return established(LeaseStore(StickyConfig.from_app(app)))

    yield make
    for prefix in prefixes:
        for name in redis_client.scan_iter(f"{prefix}:*"):
            redis_client.delete(name)
