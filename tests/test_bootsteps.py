"""The worker bootstep: registration, heartbeat, deregistration, and refusing bad setups."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster, start_server
from tests.conftest import REPO, unique


def test_workers_register_with_capacity_and_direct_queue(
    sticky_app: Any, prefix: str, cluster: Any
) -> None:
    infos = {w.name: w for w in lease_store(sticky_app).workers()}
    for name in cluster.workers:
        assert infos[name].alive
        assert infos[name].capacity == 2
        assert infos[name].queue == f"{prefix}.{name}"


def _workers(tmp_path: Path) -> WorkerCluster:
    from tests.cluster_app import app

    return WorkerCluster(app, "tests.cluster_app:app", tmp_path, cwd=str(REPO))


def test_clean_stop_drains_and_deregisters(sticky_app: Any, prefix: str, tmp_path: Path) -> None:
    workers = _workers(tmp_path)
    workers.start("w4@sticky-tests", queues=[f"{prefix}.unused"])
    infos = {w.name: w for w in lease_store(sticky_app).workers()}
    assert infos["w4@sticky-tests"].alive
    assert workers.stop("w4@sticky-tests") == 0
    infos = {w.name: w for w in lease_store(sticky_app).workers()}
    info = infos["w4@sticky-tests"]
    assert not info.alive and info.draining and info.reaped
    assert "drained w4@sticky-tests" in workers.workers["w4@sticky-tests"].log()


def test_unwritable_state_dir_stops_the_worker_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    workers = _workers(tmp_path)
    worker = workers.start(
        "bad-dir@sticky-tests", wait=False, env={"STICKY_TEST_STATE_DIR": str(blocker / "state")}
    )
    assert worker.process is not None
    assert worker.process.wait(60) != 0
    assert "sticky_state_dir" in worker.log()
    assert str(blocker / "state") in worker.log()


def test_corrupt_state_is_reported_at_start(tmp_path: Path) -> None:
    """A state database that is not one fails the worker's start, naming the directory."""
    state_dir = tmp_path / "state"
    node_dir = state_dir / "corrupt@sticky-tests"
    node_dir.mkdir(parents=True)
    (node_dir / "cache.db").write_bytes(b"this is not an SQLite database" * 100)
    workers = _workers(tmp_path)
    worker = workers.start(
        "corrupt@sticky-tests", wait=False, env={"STICKY_TEST_STATE_DIR": str(state_dir)}
    )
    assert worker.process is not None
    assert worker.process.wait(60) != 0
    assert f"sticky_state_dir: cannot use '{node_dir}'" in worker.log()


def test_consumer_step_sends_held_back_acks_at_shutdown() -> None:
    """Celery 5.3 without an event loop (gevent) holds acks back and drops them at shutdown.

    Dropped, the broker restores messages whose tasks ran, and the drain runs them
    again elsewhere (tests/test_gate.py's gevent case on Celery 5.3 shows it end to end).
    """
    from celery_sticky.worker.bootsteps.gate import StickyConsumer

    sent: list[str] = []

    class Consumer:
        controller = None

        def perform_pending_operations(self) -> None:
            sent.append("acks")

    consumer = Consumer()
    StickyConsumer(consumer).shutdown(consumer)
    assert sent == ["acks"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_worker_runs_nothing_it_cannot_prove_then_resumes(
    sticky_app: Any, prefix: str, tmp_path: Path, events: Any
) -> None:
    """With its lease store down the worker holds the task; when it answers, it runs."""
    port = _free_port()
    name = "lonely@sticky-tests"
    workers = _workers(tmp_path)
    workers.start(
        name,
        wait=False,
        queues=[f"{prefix}.lonely"],
        env={"STICKY_TEST_LEASE_URL": f"redis://127.0.0.1:{port}/0"},
    )
    try:
        task = sticky_app.tasks["tests.cluster_app.record_step"]
        key = unique("unproven")
        result = task.apply_async((key, 0), queue=f"{prefix}.lonely")
        deadline = time.monotonic() + 60
        while "cannot prove ownership" not in workers.workers[name].log():
            assert time.monotonic() < deadline, workers.workers[name].log()[-2000:]
            time.sleep(0.2)
        assert f"127.0.0.1:{port}" in workers.workers[name].log()
        assert events(key) == [] and not result.ready()
        with start_server(port):
            assert result.get(timeout=60) == [0]
        assert [e["node"] for e in events(key)] == [name]
    finally:
        workers.stop_all()
