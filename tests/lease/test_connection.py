"""The lease store over TLS with an ACL user, and through Redis Sentinel during a
failover: real servers this module starts (skipped, with the reason, when this
machine's redis-server cannot), and a real worker on each."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_sticky.errors import LeaseStoreUnavailable
from celery_sticky.lease import LeaseStore
from celery_sticky.settings import StickyConfig
from tests.conftest import unique
from tests.hostile import HostileRun, wait_for
from tests.lease.conftest import established
from tests.redis_servers import sentinel_group, tls_server

USER, PASSWORD = "sticky-acl", "acl-pass-7f3e9d"


def _store(url: str, **settings: Any) -> LeaseStore:
    app = Celery("conn", broker="memory://", set_as_current=False)
    app.conf.update(sticky_redis_url=url, sticky_key_prefix=f"cn{uuid.uuid4().hex[:6]}")
    app.conf.update(settings)
    return LeaseStore(StickyConfig.from_app(app))


def test_tls_and_acl_user(prefix: str, tmp_path: Path) -> None:
    with tls_server(USER, PASSWORD) as (port, ca):
        url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        store = established(_store(url))
        assert store.heartbeat("tls1@hostile-tests", 1, "q", register=True).ok
        assert store.claim("key", "k", candidate="tls1@hostile-tests").owner == "tls1@hostile-tests"
        wrong = _store(url.replace(PASSWORD, "not-the-password"))
        with pytest.raises(LeaseStoreUnavailable) as raised:
            wrong.ping()
        assert PASSWORD not in str(raised.value) and "not-the-password" not in str(raised.value)
        plain = _store(f"redis://{USER}:{PASSWORD}@127.0.0.1:{port}/0")  # no TLS: refused
        with pytest.raises(LeaseStoreUnavailable):
            plain.ping()
        run = HostileRun(
            f"{prefix}tl{uuid.uuid4().hex[:4]}",
            tmp_path,
            env={"STICKY_TEST_LEASE_URL": url},
        )
        try:
            run.start("tls2@hostile-tests")
            key = unique("tls")
            assert run.step.delay(key, 0).get(timeout=30) == [0]
            assert run.step.delay(key, 1).get(timeout=30) == [0, 1]
            assert PASSWORD not in run.cluster.workers["tls2@hostile-tests"].log()  # type: ignore[union-attr]
        finally:
            run.stop()


def _publish(run: HostileRun, key: str, step: int) -> Any:
    """A producer retries while the store fails over (the router needs it)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return run.step.delay(key, step)
        except LeaseStoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _replica_caught_up(master: int, replica: int) -> None:
    """Wait until the replica on port ``replica`` has applied every write the master
    on port ``master`` had taken when this was called."""
    offset = int(redis.Redis(port=master).info("replication")["master_repl_offset"])
    follower = redis.Redis(port=replica)
    wait_for(
        lambda: int(follower.info("replication")["slave_repl_offset"]) >= offset,
        30,
        "the replica to catch up with the master",
    )


def test_sentinel_failover_during_a_run(prefix: str, tmp_path: Path) -> None:
    with sentinel_group("stickymaster") as (master, replica, sentinel):
        url = f"sentinel://127.0.0.1:{sentinel}/0"
        run = HostileRun(
            f"{prefix}sn{uuid.uuid4().hex[:4]}",
            tmp_path,
            env={"STICKY_TEST_LEASE_URL": url + "?master_name=stickymaster"},
            # The Celery users' way: the master name in broker_transport_options.
            sticky_redis_url=url,
            broker_transport_options={"master_name": "stickymaster"},
        )
        try:
            run.start("sn1@hostile-tests")
            keys = [unique("sentinel") for _ in range(3)]
            for key in keys:
                assert run.step.delay(key, 0).get(timeout=30) == [0]
            # The claims above are on the master; a forced failover does not wait for the
            # replica, and a claim it misses is a lease the store lost (the worker then
            # drops that key's state, as documented). This test is about what happens
            # during the failover: start it once the replica has everything so far.
            _replica_caught_up(master, replica)
            watcher = redis.Redis(port=sentinel, decode_responses=True)
            watcher.sentinel_failover("stickymaster")
            pending = []
            step = 1
            deadline = time.monotonic() + 60
            # Keep publishing while the master changes, and after.
            while True:
                pending += [(key, step, _publish(run, key, step)) for key in keys]
                step += 1
                address = watcher.sentinel_get_master_addr_by_name("stickymaster")
                if int(address[1]) == replica and step > 5:
                    break
                assert time.monotonic() < deadline, "the failover did not happen"
                time.sleep(0.2)
            # Writes that reached the old master before it was demoted are lost (Redis
            # replicates asynchronously; the lease store survives that, see
            # test_store_loss). Claims made once it is a replica must reach the new one.
            demoted = redis.Redis(port=master, decode_responses=True)
            wait_for(
                lambda: demoted.info("replication")["role"] == "slave",
                30,
                "the old master to become a replica",
            )
            fresh = [unique("after-failover") for _ in range(3)]  # claims must write
            for key in keys + fresh:
                pending.append((key, step, _publish(run, key, step)))
            for key, number, result in pending:
                steps = result.get(timeout=60)
                first = 0 if key in keys else number
                assert steps == list(range(first, number + 1)), (key, steps)
            worker = run.cluster.workers["sn1@hostile-tests"]  # type: ignore[union-attr]
            assert worker.running and "Unrecoverable error" not in worker.log()
            assert "was lost" not in worker.log(), "the failover lost a key's lease or state"
            promoted = redis.Redis(port=replica, decode_responses=True)
            assert promoted.info("replication")["role"] == "master"
            failed_over = float(promoted.time()[0])
            wait_for(
                lambda: (
                    (promoted.zscore(f"{run.prefix}:workers", "sn1@hostile-tests") or 0)
                    > failed_over
                ),
                30,
                "the worker to heartbeat to the new master",
            )
            assert all(
                promoted.hexists(
                    f"{run.prefix}:leases:{LeaseStore.bucket('key', key)}", f"key:{key}"
                )
                for key in fresh
            )
        finally:
            run.stop()
