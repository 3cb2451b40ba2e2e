"""Every Redis answer is an answer: each kind of error the lease store can get is
:class:`LeaseStoreUnavailable` ("cannot serve now"), and the store serves again
once the fault is gone. Faults are made on a private redis-server, never the
shared one: OOM (``CONFIG SET maxmemory``), READONLY (``REPLICAOF`` a master that
is not there), BUSY (a long script), and ``SCRIPT FLUSH`` (which redis-py answers by loading the
script again). A stall (``DEBUG SLEEP``) is retried by redis-py itself; the worker
test in tests/worker/test_store_faults.py covers it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from celery_sticky.errors import LeaseStoreUnavailable
from celery_sticky.lease import LeaseStore
from celery_sticky.settings import StickyConfig
from celery_sticky.testing import start_server
from tests.lease.conftest import established

NODE = "e1@hostile-tests"
BUSY_SCRIPT = """
local start = tonumber(redis.call('TIME')[1])
while tonumber(redis.call('TIME')[1]) < start + tonumber(ARGV[1]) do end
return 1
"""


@pytest.fixture(scope="module")
def server() -> Iterator[redis.Redis]:
    with start_server() as port:
        client = redis.Redis(port=port, decode_responses=True)
        yield client
        client.close()


@pytest.fixture
def store(server: redis.Redis) -> LeaseStore:
    port = server.connection_pool.connection_kwargs["port"]
    app = Celery("errors", broker=f"redis://127.0.0.1:{port}/0", set_as_current=False)
    app.conf.update(sticky_key_prefix=f"se{uuid.uuid4().hex[:6]}", sticky_lease_ttl=10.0)
    store = established(LeaseStore(StickyConfig.from_app(app)))
    store.heartbeat(NODE, 1, "q", register=True)
    return store


def _claim(store: LeaseStore) -> None:
    store.claim("key", "k", candidate=NODE)


def test_out_of_memory(server: redis.Redis, store: LeaseStore) -> None:
    _claim(store)
    server.config_set("maxmemory", "1")
    try:
        with pytest.raises(LeaseStoreUnavailable, match=r"\(OOM\)"):
            store.claim("key", "other", candidate=NODE)
        with pytest.raises(LeaseStoreUnavailable, match=r"\(OOM\)"):
            store.heartbeat(NODE, 1, "q")
    finally:
        server.config_set("maxmemory", "0")
    _claim(store)
    assert store.heartbeat(NODE, 1, "q").ok


def test_read_only_replica(server: redis.Redis, store: LeaseStore) -> None:
    """What a client still connected to a demoted master sees during a failover."""
    server.execute_command("REPLICAOF", "127.0.0.1", "1")  # nothing listens there
    try:
        with pytest.raises(LeaseStoreUnavailable, match=r"\(READONLY\)"):
            store.heartbeat(NODE, 1, "q")
    finally:
        server.execute_command("REPLICAOF", "NO", "ONE")
    assert store.heartbeat(NODE, 1, "q").ok


def test_busy_script(server: redis.Redis, store: LeaseStore) -> None:
    server.config_set("lua-time-limit", "100")
    port = server.connection_pool.connection_kwargs["port"]
    runner = threading.Thread(
        target=lambda: redis.Redis(port=port).eval(BUSY_SCRIPT, 0, 2), daemon=True
    )
    runner.start()
    try:
        deadline = threading.Event()
        for _ in range(50):
            try:
                store.heartbeat(NODE, 1, "q")
            except LeaseStoreUnavailable as exc:
                assert "(BUSY)" in str(exc)
                break
            deadline.wait(0.05)
        else:
            pytest.fail("the store never answered BUSY")
    finally:
        runner.join(10)
        server.config_set("lua-time-limit", "5000")
    assert store.heartbeat(NODE, 1, "q").ok


def test_script_flush_is_reloaded(server: redis.Redis, store: LeaseStore) -> None:
    _claim(store)
    server.script_flush()
    assert store.claim("key", "k", candidate=NODE).owner == NODE
    assert store.lookup("key", "k") is not None


def test_loading_is_unavailable(store: LeaseStore) -> None:
    def loading() -> None:
        raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")

    with pytest.raises(LeaseStoreUnavailable, match=r"\(LOADING\)"):
        store.guard(loading)
