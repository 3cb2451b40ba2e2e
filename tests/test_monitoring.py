"""Where Celery users look: events (publish-time claims, moves, hand-overs), Flower,
Prometheus under prefork, and ``celery sticky purge``. Real workers, Redis, Flower.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_sticky import move_key, release
from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster
from tests.conftest import REPO, start_cluster

E1, E2 = "e1@eco-tests", "e2@eco-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.1)


class EventLog:
    """Every ``sticky-*`` Celery event seen on the app's broker while it runs."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._listen, daemon=True)

    def _listen(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self._on})
            self.ready.set()
            with contextlib.suppress(Exception):
                self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on(self, event: dict[str, Any]) -> None:
        if str(event.get("type", "")).startswith("sticky-"):
            self.seen.append(event)

    def of(self, kind: str, key: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == f"sticky-{kind}" and e.get("key") == key]

    def wait(self, kind: str, key: str, timeout: float = 20.0) -> dict[str, Any]:
        found = wait_for(lambda: self.of(kind, key), timeout, f"a sticky-{kind} event for {key}")
        return dict(found[0])

    def __enter__(self) -> EventLog:
        self.thread.start()
        self.ready.wait(10)
        # The receiver's queue is bound once it consumes: publish a probe until it is seen.
        with self.app.events.default_dispatcher() as dispatcher:
            wait_for(
                lambda: dispatcher.send("sticky-probe", key="probe") or self.of("probe", "probe"),
                timeout=15,
                what="the event receiver to listen",
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def watched(prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two prefork workers sending events; e1 serves metrics (--sticky-metrics-port)."""
    from tests.cluster_app import make_app

    sub = f"{prefix}mo"
    app = make_app(sub, task_send_sent_event=True)
    app.finalize()
    port = free_port()
    specs = {
        E1: {"queues": [f"{sub}.default"], "args": ["-E", "--sticky-metrics-port", str(port)]},
        E2: {"queues": [f"{sub}.other"], "args": ["-E"]},
    }
    logs: Path = tmp_path_factory.mktemp("monitoring")
    cluster: WorkerCluster = start_cluster(
        app, specs, env={"STICKY_TEST_PREFIX": sub}, workdir=logs
    )
    try:
        yield {"app": app, "cluster": cluster, "port": port, "prefix": sub}
    finally:
        cluster.stop_all()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("celery_sticky"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_a_claim_at_publish_is_one_log_line_and_one_event(
    watched: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    app = watched["app"]
    step = app.tasks["tests.cluster_app.record_step"]
    key = f"pub-{uuid.uuid4().hex[:8]}"
    with EventLog(app) as events, caplog.at_level(logging.INFO, "celery_sticky.ownership"):
        step.delay(key, 0).get(timeout=30)  # no queue fixed: the router claims at publish
        step.delay(key, 1).get(timeout=30)
        event = events.wait("claimed", key)
    owner = lease_store(app).lookup("key", key)
    assert owner is not None and owner.owner in (E1, E2)
    lines = [r.getMessage() for r in caplog.records if f"key:{key} " in r.getMessage()]
    assert lines == [
        f"sticky: claimed key:{key} epoch={owner.epoch} owner={owner.owner} previous=-"
    ]
    assert len(events.of("claimed", key)) == 1, "claimed once: at publish, not again on arrival"
    assert (event["owner"], event["epoch"], event["workflow"]) == (owner.owner, owner.epoch, "key")
    assert event["hostname"] not in (E1, E2), "sent by the publisher"


def test_prefork_metrics_count_releases_moves_and_forwards(watched: dict[str, Any]) -> None:
    """Released and moved are counted in pool processes, forwarded in the main process:
    one scrape of e1 sees all three."""
    app, port, sub = watched["app"], watched["port"], watched["prefix"]
    step = app.tasks["tests.cluster_app.record_step"]
    store = lease_store(app)
    before = scrape(port)
    on_e1 = [f"m{i}-{uuid.uuid4().hex[:8]}" for i in range(2)]
    for key in on_e1:  # a fixed queue: the router stays out, e1 claims on arrival
        step.apply_async((key, 0), queue=f"{sub}.default").get(timeout=30)
        assert store.lookup("key", key).owner == E1  # type: ignore[union-attr]
    on_e2 = f"m2-{uuid.uuid4().hex[:8]}"
    step.apply_async((on_e2, 0), queue=f"{sub}.other").get(timeout=30)
    with EventLog(app) as events:
        release("key", on_e1[0], app=app)
        move_key("key", on_e1[1], E2, app=app)
        # A task of e2's key delivered to e1, which forwards it to e2.
        ran = step.apply_async((on_e2, 1), queue=f"{sub}.default").get(timeout=30)
        assert ran == [0, 1]
        wait_for(lambda: store.lookup("key", on_e1[0]) is None, what="the release")
        wait_for(
            lambda: getattr(store.lookup("key", on_e1[1]), "owner", None) == E2, what="the move"
        )
        moved = events.wait("moved", on_e1[1])
        released = events.wait("released", on_e1[0])
    assert (moved["owner"], moved["previous"], moved["hostname"]) == (E2, E1, E1)
    assert released["owner"] == E1

    def counted() -> dict[str, float]:
        after = scrape(port)
        return {
            name: after.get(name, 0) - before.get(name, 0)
            for name in (
                'celery_sticky_ownership_changes_total{kind="released"}',
                'celery_sticky_ownership_changes_total{kind="moved"}',
                'celery_sticky_ownership_changes_total{kind="claimed"}',
                "celery_sticky_forwarded_total",
            )
        }

    expected = {
        'celery_sticky_ownership_changes_total{kind="released"}': 1,
        'celery_sticky_ownership_changes_total{kind="moved"}': 1,
        'celery_sticky_ownership_changes_total{kind="claimed"}': 2,
        "celery_sticky_forwarded_total": 1,
    }
    wait_for(lambda: counted() == expected, timeout=10, what=f"{expected}, seen {counted()}")
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ, "set in the worker, not here"


def test_flower_shows_sticky_stats_and_exports_no_sticky_metrics(
    watched: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("flower")
    port = free_port()
    env = {**os.environ, "STICKY_TEST_PREFIX": watched["prefix"]}
    argv = [sys.executable, "-m", "celery", "-A", "tests.cluster_app:app", "flower"]
    argv += [f"--port={port}", "--address=127.0.0.1", "--basic-auth=eco:secret"]
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:

        def get(path: str) -> Any:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}{path}",
                    headers={"Authorization": f"Basic {base64.b64encode(b'eco:secret').decode()}"},
                )
                with urllib.request.urlopen(request, timeout=20) as response:
                    return response.read().decode()
            except OSError:
                assert flower.poll() is None, (tmp_path / "flower.log").read_text()
                return None

        workers = json.loads(wait_for(lambda: get("/api/workers?refresh=1"), 60, "Flower"))
        stats = workers[E1]["stats"]
        assert stats["sticky"]["node"] == E1
        assert stats["sticky"]["queue"] == f"{watched['prefix']}.{E1}"
        owned = lease_store(watched["app"]).owned_count(E1)
        assert stats["sticky"]["keys_owned"] == owned
        metrics = get("/metrics")
        assert "flower_" in metrics and "celery_sticky" not in metrics
    finally:
        flower.terminate()
        flower.wait(20)


def test_a_drain_sends_handed_over_events(watched: dict[str, Any]) -> None:
    app, cluster = watched["app"], watched["cluster"]
    # Keys with local state on e2 (a key moved there and not run since has none: its
    # copy is still in the hand-over store, nothing to hand over).
    with_state = [key for _, key in lease_store(app).owned_keys(E2) if key.startswith("m2-")]
    assert with_state, "e2 ran a task of a key in the test before"
    with EventLog(app) as events:
        assert cluster.stop(E2) == 0
        for key in with_state:
            event = events.wait("handed_over", key)
            assert (event["workflow"], event["owner"], event["hostname"]) == ("key", E2, E2)


# -- purge ---------------------------------------------------------------------------


def test_sticky_purge_empties_direct_and_affinity_queues(prefix: str) -> None:
    """`celery purge` misses the sticky queues; `celery sticky purge` takes the same flags."""
    from tests.cluster_app import make_app

    sub = f"{prefix}pu"
    app = make_app(sub)
    app.finalize()
    store = lease_store(app)
    node = "e9@eco-tests"
    direct = f"{sub}.{node}"
    affinity = f"{sub}.affinity.zone=a"
    # A registered worker that consumes nothing (as a stuck one would), with a tag.
    store.heartbeat(node, 1, direct, register=True, tags="zone=a")
    step = app.tasks["tests.cluster_app.record_step"]
    for i in range(3):
        step.apply_async((f"purge-{i}", i), queue=direct)
    for i in range(2):
        step.apply_async((f"purge-a{i}", i), queue=affinity)
    env = {**os.environ, "STICKY_TEST_PREFIX": sub}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "celery", "-A", "tests.cluster_app:app", *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)

    try:
        plain = run("purge", "-f")
        assert plain.returncode == 0, plain.stderr
        assert "No messages purged" in plain.stdout
        unknown = run("sticky", "purge", "-f", "-Q", f"{sub}.nope")
        assert unknown.returncode == 1 and "not a sticky queue" in unknown.stderr
        asked = run("sticky", "purge", "-X", affinity)
        assert asked.returncode == 1 and "Aborted" in asked.stderr, "prompts without -f"
        direct_only = run("sticky", "purge", "-f", "-X", affinity)
        assert direct_only.returncode == 0, direct_only.stderr
        assert "Purged 3 messages from 1 sticky queue." in direct_only.stdout
        rest = run("sticky", "purge", "-f", "--json")
        assert json.loads(rest.stdout) == {"queues": {direct: 0, affinity: 2}, "purged": 2}
    finally:
        store.deregister(node)
        store.forget_worker(node)
