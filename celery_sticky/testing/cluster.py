"""Real ``celery worker`` subprocesses with distinct node names, for tests and demos.

Celery's in-process test worker is not the real thing (solo pool, no
``worker_ready``/``worker_shutdown`` signals, the machine name for a hostname):
whatever crosses processes is tested against workers started here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from ..context import lease_store


@dataclass
class Worker:
    """One worker subprocess."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class WorkerCluster:
    """Start, kill, stop and inspect named workers of one app.

    ``app`` is the producer-side app (same settings as the workers), used to see
    the workers register in the lease store; ``app_path`` is what ``celery -A``
    imports in the workers; ``env`` is added to their environment.
    """

    def __init__(
        self,
        app: Celery,
        app_path: str,
        workdir: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.app = app
        self.app_path = app_path
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.workers: dict[str, Worker] = {}

    def start(
        self,
        name: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Iterable[str] | None = None,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> Worker:
        """Start worker ``name`` (a full nodename, ``w1@host``) and wait until it registers."""
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.app_path,
            "worker",
            "-n",
            name,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-l",
            "info",
            "--without-gossip",
            "--without-mingle",
            *args,
        ]
        if queues:
            argv += ["-Q", ",".join(queues)]
        worker = self.workers.get(name) or Worker(
            name, argv, self.workdir / f"{name.replace('@', '_')}.log"
        )
        worker.argv = argv
        worker.env = {**self.env, **(env or {})}
        with open(worker.log_path, "ab") as log:
            worker.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=worker.env, cwd=self.cwd
            )
        self.workers[name] = worker
        if wait:
            self.wait_registered([name], timeout=timeout)
        return worker

    def wait_registered(self, names: Iterable[str], timeout: float = 30.0) -> None:
        """Block until every worker in ``names`` heartbeats in the lease store."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        store = lease_store(self.app)
        while True:
            alive = {info.name for info in store.workers() if info.alive}
            if wanted <= alive:
                return
            for name in wanted - alive:
                worker = self.workers.get(name)
                if worker is not None and not worker.running:
                    raise RuntimeError(f"worker {name} exited:\n{worker.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(wanted - alive)} did not register")
            time.sleep(0.1)

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.workers[name].pid, sig)

    def kill(self, name: str) -> float:
        """``kill -9`` the worker's main process and its pool children.

        Returns the wall-clock time of the signal (taken after the children were
        listed, right before it), for measuring failover.
        """
        worker = self.workers[name]
        children = _children(worker.pid)
        killed_at = time.time()
        os.kill(worker.pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert worker.process is not None
        worker.process.wait(10)
        return killed_at

    def stop(self, name: str, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM); returns the exit code."""
        worker = self.workers[name]
        assert worker.process is not None
        if worker.running:
            worker.process.send_signal(signal.SIGTERM)
        try:
            return worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            raise

    def stop_all(self) -> None:
        for name, worker in self.workers.items():
            if worker.running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.stop(name, timeout=20)

    def __enter__(self) -> WorkerCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (its pool processes), by psutil."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
