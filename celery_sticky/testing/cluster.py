"""Real ``celery worker`` subprocesses with distinct node names, for tests and demos.

Celery's in-process test worker is not the real thing (solo pool, no
``worker_ready``/``worker_shutdown`` signals, the machine name for a hostname):
whatever crosses processes is tested against workers started here.

Each worker runs in a session (and process group) of its own, so that one signal
reaches the main process and its pool children together: ``kill -9`` of a node is
a power cut of the whole node, and SIGSTOP freezes the pool children too (a paused
main process alone leaves its children running and committing). A process group is
also how the fault points of :mod:`celery_sticky.faults` stop or kill a worker from
inside. Because workers no longer share the caller's group, Ctrl-C does not reach
them: every group started here is killed when its cluster stops, and again at
interpreter exit (``atexit``) for whatever a failing or interrupted caller left.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from ..context import lease_store

#: Process groups started by any cluster of this process and not yet reaped.
_LIVE_GROUPS: set[int] = set()


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid`` (a stopped process dies too).

    Only groups started here and not yet known to be gone are signalled: a group id
    stays reserved while any member (or the unreaped leader) exists, so the signal
    cannot reach a stranger that reused the number.
    """
    if pgid not in _LIVE_GROUPS:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@atexit.register
def kill_all_groups() -> None:
    """Kill every worker group this process started and did not stop (also run at exit)."""
    for pgid in list(_LIVE_GROUPS):
        _kill_group(pgid)
    _LIVE_GROUPS.clear()


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises :class:`TimeoutError` (with ``message``, or a callable producing it) when
    ``timeout`` seconds pass first. Tests wait for a condition with this instead of
    sleeping for a time that is usually enough.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise TimeoutError(text or f"condition not met within {timeout:g} s")
        time.sleep(interval)


@dataclass
class Worker:
    """One worker subprocess (its own process group)."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: The keyword arguments of its last :meth:`WorkerCluster.start`, for restarts.
    options: dict[str, Any] = field(default_factory=dict)
    #: True between :meth:`WorkerCluster.pause` and :meth:`WorkerCluster.resume`.
    paused: bool = False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def pgid(self) -> int:
        """The worker's process group: the main process's pid (it leads its session)."""
        return self.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def processes(self) -> list[int]:
        """Pids of the main process and every descendant still alive (pool children)."""
        import psutil

        if not self.running:
            return []
        try:
            main = psutil.Process(self.pid)
            return [main.pid, *(child.pid for child in main.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class WorkerCluster:
    """Start, kill, pause, stop and inspect named workers of one app.

    ``app`` is the producer-side app (same settings as the workers), used to see
    the workers register in the lease store; ``app_path`` is what ``celery -A``
    imports in the workers; ``env`` is added to their environment. Use it as a
    context manager (or call :meth:`stop_all`) so every worker is stopped.
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
        queues = list(queues) if queues else None
        args = list(args)
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
        if worker.running:
            raise RuntimeError(f"worker {name} is running already (pid {worker.pid})")
        worker.argv = argv
        worker.env = {**self.env, **(env or {})}
        worker.options = {
            "pool": pool,
            "concurrency": concurrency,
            "queues": queues,
            "args": args,
            "env": dict(env or {}),
        }
        worker.paused = False
        with open(worker.log_path, "ab") as log:
            worker.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=worker.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _LIVE_GROUPS.add(worker.pgid)
        self.workers[name] = worker
        if wait:
            self.wait_registered([name], timeout=timeout)
        return worker

    def restart(self, name: str, *, wait: bool = True, **overrides: Any) -> Worker:
        """Start ``name`` again with the options of its last start (same node name and disk)."""
        worker = self.workers[name]
        if worker.running:
            raise RuntimeError(f"worker {name} is still running: kill or stop it first")
        return self.start(name, **{**worker.options, **overrides, "wait": wait})

    def wait_registered(self, names: Iterable[str], timeout: float = 30.0) -> None:
        """Block until every worker in ``names`` heartbeats in the lease store, and the
        store claims keys (a new store, or one that lost its data, claims nothing for
        a second: see :meth:`LeaseStore.grace_left`)."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        store = lease_store(self.app)
        while True:
            alive = {info.name for info in store.workers() if info.alive}
            if wanted <= alive:
                time.sleep(store.grace_left())
                return
            for name in wanted - alive:
                worker = self.workers.get(name)
                if worker is not None and not worker.running:
                    raise RuntimeError(f"worker {name} exited:\n{worker.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(wanted - alive)} did not register")
            time.sleep(0.1)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to the worker's main process only (as an orchestrator's SIGTERM)."""
        os.kill(self.workers[name].pid, sig)

    def signal_group(self, name: str, sig: int) -> None:
        """Send ``sig`` to the worker's whole process group (main process and pool)."""
        os.killpg(self.workers[name].pgid, sig)

    def pause(self, name: str) -> float:
        """SIGSTOP the worker's whole group (pool children too); returns the time of it."""
        worker = self.workers[name]
        paused_at = time.time()
        self.signal_group(name, signal.SIGSTOP)
        worker.paused = True
        return paused_at

    def resume(self, name: str) -> float:
        """SIGCONT the worker's whole group; returns the time of it."""
        worker = self.workers[name]
        resumed_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.signal_group(name, signal.SIGCONT)
        worker.paused = False
        return resumed_at

    def kill(self, name: str) -> float:
        """``kill -9`` the worker's whole process group, main process and pool children.

        Returns the wall-clock time of the signal, for measuring failover.
        """
        worker = self.workers[name]
        assert worker.process is not None
        killed_at = time.time()
        _kill_group(worker.pgid)
        worker.process.wait(10)
        _LIVE_GROUPS.discard(worker.pgid)
        worker.paused = False
        return killed_at

    def reap(self, name: str) -> None:
        """Collect a worker whose group was killed from inside (a fault point)."""
        worker = self.workers[name]
        if worker.process is not None:
            _kill_group(worker.pgid)  # whatever of the group is left
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(10)
            _LIVE_GROUPS.discard(worker.pgid)
        worker.paused = False

    def stop(self, name: str, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM to the main process); returns the exit code.

        A paused worker is resumed first. When the worker does not exit within
        ``timeout`` its group is killed and :class:`subprocess.TimeoutExpired` raised;
        pool children left behind by an exited main process are killed.
        """
        worker = self.workers[name]
        assert worker.process is not None
        if worker.paused:
            self.resume(name)
        if worker.running:
            worker.process.send_signal(signal.SIGTERM)
        try:
            return worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            raise
        finally:
            _kill_group(worker.pgid)
            _LIVE_GROUPS.discard(worker.pgid)

    def stop_all(self, timeout: float = 20.0) -> None:
        """Stop every worker: SIGTERM them together, kill what is left after ``timeout``."""
        for name, worker in self.workers.items():
            if worker.paused:
                self.resume(name)
            if worker.running:
                with contextlib.suppress(ProcessLookupError):
                    self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.workers.values():
            if worker.process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            _kill_group(worker.pgid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(10)
            _LIVE_GROUPS.discard(worker.pgid)

    def __enter__(self) -> WorkerCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
