"""WorkerCluster: each worker is a process group of its own; pause, resume and kill
reach the pool children too, and nothing is left running."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psutil

from celery_sticky.testing import wait_for
from tests.conftest import start_cluster


def test_pause_resume_and_kill_act_on_the_whole_group(prefix: str, tmp_path: Path) -> None:
    from tests.cluster_app import make_app

    sub = f"{prefix}c{uuid.uuid4().hex[:4]}"
    app = make_app(sub)
    app.finalize()
    name = "g1@nemesis"
    specs = {name: {"queues": [f"{sub}.default"], "concurrency": 2}}
    with start_cluster(app, specs, env={"STICKY_TEST_PREFIX": sub}, workdir=tmp_path) as cluster:
        worker = cluster.workers[name]
        pids = wait_for(lambda: (p := worker.processes()) and len(p) >= 3 and p, timeout=30)
        assert {os.getpgid(pid) for pid in pids} == {worker.pgid}, "one group per worker"
        assert worker.pgid != os.getpgid(0), "not the test's own group"
        cluster.pause(name)
        assert wait_for(
            lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in pids),
            timeout=10,
        ), "the pool children are frozen with the main process"
        cluster.resume(name)
        wait_for(
            lambda: all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in pids),
            timeout=10,
        )
        cluster.kill(name)
        wait_for(lambda: not any(psutil.pid_exists(p) and _alive(p) for p in pids), timeout=10)
        cluster.restart(name)  # same name, same options
        assert cluster.workers[name].running
    assert not cluster.workers[name].running, "stopped with the cluster"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
