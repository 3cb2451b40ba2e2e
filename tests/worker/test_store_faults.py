"""A worker never exits because of a Redis answer (real worker, private lease store).

The broker and result backend stay on the test Redis; the lease store is a
private redis-server this module starts, so the faults (OOM, BUSY, a stall,
SCRIPT FLUSH) touch nobody else. During each fault a task arrives (published to a
fixed queue, so the producer does not need the store): the worker must pause it,
not crash, and run it once the store answers again; its heartbeat must go on, so
it is never reaped.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_sticky.context import lease_store
from celery_sticky.testing import start_server
from tests.conftest import unique
from tests.hostile import HostileRun, wait_for

NODE = "f1@hostile-tests"
TTL = 10.0
BUSY_SCRIPT = """
local start = tonumber(redis.call('TIME')[1])
while tonumber(redis.call('TIME')[1]) < start + tonumber(ARGV[1]) do end
return 1
"""


@pytest.fixture(scope="module")
def faulty(prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    with start_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        run = HostileRun(
            f"{prefix}sf{uuid.uuid4().hex[:4]}",
            tmp_path_factory.mktemp("faults"),
            env={"STICKY_TEST_LEASE_URL": url, "STICKY_TEST_LEASE_TTL": str(TTL)},
        )
        run.start(NODE)
        client = redis.Redis(port=port, decode_responses=True)
        try:
            yield run, client, port
        finally:
            run.stop()
            client.close()


def _during(run: HostileRun, key: str, step: int) -> Any:
    return run.step.apply_async((key, step), queue=run.default_queue)


def _healthy(run: HostileRun, marker: str) -> None:
    worker = run.cluster.workers[NODE]  # type: ignore[union-attr]
    assert worker.running, worker.log()[-3000:]
    log = worker.log()
    assert "Unrecoverable error" not in log
    assert marker in log, f"the fault was not seen ({marker})"
    info = {w.name: w for w in lease_store(run.app).workers()}[NODE]
    assert info.alive and not info.reaped, "the heartbeat stopped"


def test_out_of_memory_window(faulty: tuple[Any, ...]) -> None:
    run, client, _port = faulty
    key, new = unique("oom"), unique("oom-new")
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    client.config_set("maxmemory", "1")
    try:
        result = _during(run, key, 1)
        claiming = _during(run, new, 0)  # its claim must write: refused while OOM
        wait_for(
            lambda: "OOM" in run.cluster.workers[NODE].log(),  # type: ignore[union-attr]
            20,
            "the worker to meet OOM",
        )
    finally:
        client.config_set("maxmemory", "0")
    assert result.get(timeout=30) == [0, 1]
    assert claiming.get(timeout=30) == [0]
    _healthy(run, "OOM")


def test_busy_script(faulty: tuple[Any, ...]) -> None:
    run, client, port = faulty
    key = unique("busy")
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    client.config_set("lua-time-limit", "100")
    runner = threading.Thread(
        target=lambda: redis.Redis(port=port).eval(BUSY_SCRIPT, 0, 3), daemon=True
    )
    runner.start()
    try:
        result = _during(run, key, 1)
        runner.join(10)
    finally:
        client.config_set("lua-time-limit", "5000")
    assert result.get(timeout=30) == [0, 1]
    _healthy(run, "BUSY")


def test_stall(faulty: tuple[Any, ...]) -> None:
    """DEBUG SLEEP: the store stops answering for a while (no error at all)."""
    run, _client, port = faulty
    key = unique("stall")
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    sleeper = threading.Thread(
        target=lambda: redis.Redis(port=port).execute_command("DEBUG", "SLEEP", "3"),
        daemon=True,
    )
    sleeper.start()
    result = _during(run, key, 1)
    sleeper.join(10)
    assert result.get(timeout=30) == [0, 1]
    _healthy(run, "registered")


def test_script_flush(faulty: tuple[Any, ...]) -> None:
    run, client, _port = faulty
    key = unique("flush")
    assert run.step.delay(key, 0).get(timeout=30) == [0]
    client.script_flush()
    assert run.step.delay(key, 1).get(timeout=30) == [0, 1]
    client.script_flush()
    assert _during(run, key, 2).get(timeout=30) == [0, 1, 2]
    _healthy(run, "registered")


def test_new_keys_after_the_faults(faulty: tuple[Any, ...]) -> None:
    """After every fault above the worker still takes new keys."""
    run, _client, _port = faulty
    keys = [unique("after") for _ in range(3)]
    assert [run.step.delay(k, 0).get(timeout=30) for k in keys] == [[0]] * 3
