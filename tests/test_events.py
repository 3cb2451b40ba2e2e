"""Ownership changes: a structured log line each, Celery events, Prometheus metrics."""

from __future__ import annotations

import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster, wait_for
from tests.conftest import start_cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def observed(prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One worker sending events (-E) and serving metrics, and a second to forward from."""
    from tests.cluster_app import make_app

    sub = f"{prefix}ev"
    app = make_app(sub)
    app.finalize()
    port = _free_port()
    env = {"STICKY_TEST_PREFIX": sub}
    specs = {
        "ev1@sticky-tests": {
            "queues": [f"{sub}.default"],
            "args": ["-E"],
            "env": {"STICKY_TEST_METRICS_PORT": str(port)},
        },
        "ev2@sticky-tests": {"queues": [f"{sub}.other"]},
    }
    logs: Path = tmp_path_factory.mktemp("events")
    cluster: WorkerCluster = start_cluster(app, specs, env=env, workdir=logs)
    try:
        yield {"app": app, "cluster": cluster, "port": port, "prefix": sub}
    finally:
        cluster.stop_all()


def test_each_claim_is_one_structured_log_line(observed: dict[str, Any]) -> None:
    app, cluster = observed["app"], observed["cluster"]
    key = f"log-{uuid.uuid4().hex[:8]}"
    step = app.tasks["tests.cluster_app.record_step"]
    step.apply_async((key, 0), queue=f"{observed['prefix']}.default").get(timeout=30)
    step.apply_async((key, 1), queue=f"{observed['prefix']}.default").get(timeout=30)
    info = lease_store(app).lookup("key", key)
    assert info is not None and info.owner == "ev1@sticky-tests"
    line = f"sticky: claimed key:{key} epoch={info.epoch} owner=ev1@sticky-tests previous=-"
    log = cluster.workers["ev1@sticky-tests"].log()
    assert log.count(line) == 1, "one line for the claim, none for the later task"


def test_claims_are_celery_events(observed: dict[str, Any]) -> None:
    app = observed["app"]
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"sticky-claimed": seen.append})
            ready.set()
            receiver.capture(limit=None, timeout=15, wakeup=True)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    keys: list[str] = []

    def claimed() -> dict[str, Any] | None:
        # Events sent before the receiver's queue is bound are lost: claim new keys
        # until one claim is seen, rather than sleeping for the binding.
        key = f"event-{uuid.uuid4().hex[:8]}"
        keys.append(key)
        app.tasks["tests.cluster_app.record_step"].apply_async(
            (key, 0), queue=f"{observed['prefix']}.default"
        ).get(timeout=30)
        return next((e for e in seen if e.get("key") in keys), None)

    event = wait_for(claimed, timeout=30, interval=0.2, message=lambda: f"no claim seen: {seen}")
    assert event["workflow"] == "key" and event["owner"] == "ev1@sticky-tests"
    assert event["hostname"] == "ev1@sticky-tests" and event["epoch"] > 0


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("celery_sticky"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_prometheus_metrics(observed: dict[str, Any]) -> None:
    app, port, sub = observed["app"], observed["port"], observed["prefix"]
    step = app.tasks["tests.cluster_app.record_step"]
    before = _metrics(port)
    keys = [f"metric-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for key in keys:
        step.apply_async((key, 0), queue=f"{sub}.default").get(timeout=30)
    # One task of an ev1 key delivered to ev2, which forwards it.
    step.apply_async((keys[0], 1), queue=f"{sub}.other").get(timeout=30)
    after = _metrics(port)
    claimed = 'celery_sticky_ownership_changes_total{kind="claimed"}'
    assert after[claimed] - before.get(claimed, 0) == 3
    assert (
        after["celery_sticky_gate_wait_seconds_count"]
        - before.get("celery_sticky_gate_wait_seconds_count", 0)
        == 4
    )
    owned = lease_store(app).owned_keys("ev1@sticky-tests")
    assert after["celery_sticky_keys_owned"] == len(owned)
    assert after["celery_sticky_state_bytes"] > 0
    assert after["celery_sticky_gate_waiting"] == 0
