"""A nemesis: real workers, a seeded schedule of faults, producers streaming steps.

Single faults in isolation are what unit and failover tests cover; the invariants
break when faults arrive together (a kill during a broker reconnect, a pause past
the TTL while the lease store restarts). This module runs a workflow under such a
schedule and hands what happened to :mod:`celery_sticky.testing.checker`:

- a :class:`~celery_sticky.testing.cluster.WorkerCluster` of real ``celery worker``
  processes, each in its own process group;
- a lease store of its own (a ``redis-server`` it can restart, empty or with its
  data), so that a lease-store restart does not also empty the broker;
- a :class:`~celery_sticky.testing.proxy.TcpProxy` between the workers and the
  broker, to cut or blackhole their broker connections;
- producers (threads) publishing numbered steps of many keys, each step tagged in
  its message headers with ``(producer, seq)``;
- a fault schedule drawn from ``random.Random(seed)``: ``kill -9`` of a worker's whole
  group then a restart under the same name and disk (within or after the TTL),
  SIGSTOP of the whole group past the TTL then SIGCONT, SIGTERM and restart, a
  lease-store restart (empty or with data), a broker cut or blackhole. Faults are
  not serialized: a new one may start while earlier ones are still in effect.

Tasks take part by running their body inside :func:`record_step` (the probe tasks of
:func:`register_probe` do), which appends ``(producer, seq, run_id)`` to the key's
state and records one run record per body run. At the end every fault is healed,
the run waits until each published step ran, and reads every key's state through
its owner. The same seed gives the same schedule of faults (their timing against the
workers' own timing is not reproducible: a failing seed is a lead, and a fault point
of :mod:`celery_sticky.faults` is the way to a deterministic reproduction).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery, current_task

from .. import faults
from .checker import Published, Report, RunRecord, check
from .cluster import WorkerCluster, wait_for
from .proxy import TcpProxy
from .redis_server import RedisServer

logger = logging.getLogger(__name__)

#: The state field the applied entries ``[producer, seq, run_id]`` are kept in.
LOG_FIELD = "_nemesis"
#: The message header a producer tags a step with: ``[producer, seq]``.
HEADER = "nemesis"
#: Environment of the workers: where run records go (a Redis URL and a list name).
RECORDS_URL_ENV = "STICKY_NEMESIS_RECORDS_URL"
RECORDS_LIST_ENV = "STICKY_NEMESIS_RECORDS_LIST"
#: Environment of the workers: the lease store the app module should use.
LEASE_URL_ENV = "STICKY_NEMESIS_LEASE_URL"

#: Every kind of fault the schedule draws from.
FAULT_KINDS = (
    "kill9_restart_within_ttl",
    "kill9_restart_after_ttl",
    "pause_past_ttl",
    "sigterm_restart",
    "lease_restart_empty",
    "lease_restart_with_data",
    "broker_cut",
    "broker_blackhole",
)


# -- worker side: what a task records ---------------------------------------------


_recorder: redis.Redis | None = None
_pending_commits: dict[str, str] = {}  # task id -> run id, until its commit is shared
_sharing_from: dict[str, float] = {}  # task id -> when its copy write began


def _record(payload: Mapping[str, Any]) -> None:
    """RPUSH ``payload`` to the run's record list (no-op outside a nemesis run)."""
    global _recorder
    url, name = os.environ.get(RECORDS_URL_ENV), os.environ.get(RECORDS_LIST_ENV)
    if not url or not name:
        return
    if _recorder is None:
        _recorder = redis.Redis.from_url(url, socket_timeout=10)
    _recorder.rpush(name, json.dumps(payload))


def _tag(request: Any) -> tuple[str, int] | None:
    """The ``(producer, seq)`` a message was tagged with, or None."""
    tag = getattr(request, HEADER, None)
    if tag is None:
        tag = (getattr(request, "headers", None) or {}).get(HEADER)
    if not tag:
        return None
    producer, seq = tag[:2]
    return str(producer), int(seq)


def _epoch(request: Any) -> int:
    """The lease epoch the message carries (0 when it has none)."""
    sticky = (getattr(request, "headers", None) or {}).get("sticky") or getattr(
        request, "sticky", None
    )
    try:
        return int(sticky[2]) if sticky else 0
    except (TypeError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def record_step(task: Any, state: Any, key: str | None = None) -> Iterator[None]:
    """Run a sticky task's body inside this to take part in a nemesis run.

    On entry, appends ``[producer, seq, run_id]`` to ``state[LOG_FIELD]``; when the
    body returns, records the run (key, step, node, pid, start, end, epoch, task id)
    and, once its commit is shared (fault point ``after_replicate``), when its sharing began
    (``after_commit``: the copy write is next) and ended. Outside
    a nemesis run (no tag in the message headers) it does nothing, so instrumented
    tasks can stay instrumented. ``key`` defaults to the state handle's key.
    """
    tag = _tag(task.request)
    if tag is None:
        yield
        return
    producer, seq = tag
    run_id = uuid.uuid4().hex
    start = time.time()
    state[LOG_FIELD] = [*state.get(LOG_FIELD, []), [producer, seq, run_id]]
    yield
    task_id = str(task.request.id or "")
    _pending_commits[task_id] = run_id
    _record(
        {
            "key": key if key is not None else str(getattr(state, "key", "")),
            "producer": producer,
            "seq": seq,
            "node": str(task.request.hostname or ""),
            "pid": os.getpid(),
            "start": start,
            "end": time.time(),
            "epoch": _epoch(task.request),
            "task_id": task_id,
            "run_id": run_id,
        }
    )


def _task_id() -> str:
    task = current_task
    request = getattr(task, "request", None) if task is not None else None
    return str(getattr(request, "id", "") or "")


def _on_committed() -> None:
    """Right after a recorded task's local commit (fault point ``after_commit``), before
    its copy write: the earliest its effects may become visible to another worker.

    The end alone is not enough: a worker paused while its copy write's answer was in
    flight stamps the end after the pause, although the write landed before it and the
    key's next owner adopted it (seen in a RabbitMQ run: a SIGSTOP of 7.5 s). The two
    stamps bound when the write landed, and the checker tells what it cannot decide
    from what it can.
    """
    task_id = _task_id()
    if task_id in _pending_commits:
        _sharing_from[task_id] = time.time()


def _on_shared() -> None:
    """Right after a recorded task's commit was shared (fault point ``after_replicate``:
    local commit, then the fenced copy write): record when its effects became visible
    at the latest, and when its sharing began.

    Not when the task reports success: that comes after the outbox, and a worker
    paused in between (its copy already written, its key taken over by a worker that
    adopted that copy and ran the next step) made the checker see two runs overlap
    (seen in CI: a step "succeeded in 4.26 s" across a 4.2 s SIGSTOP). Not at the
    local commit alone either: the copy write comes after it, and a zombie's stale copy
    write is the very effect the checker is there to see (an unfenced zombie stamped
    there let ``test_a_zombie_that_passed_its_fence[unfenced]`` kill the new owner
    before the zombie's copy landed, so nobody adopted it).
    """
    task_id = _task_id()
    run_id = _pending_commits.pop(task_id, None)
    sharing = _sharing_from.pop(task_id, None)
    if run_id is not None:
        _record({"commit": run_id, "time": time.time(), "from": sharing})


faults.observe("after_commit", _on_committed)
faults.observe("after_replicate", _on_shared)


def applied_log(state: Any) -> list[list[Any]]:
    """The applied entries ``[producer, seq, run_id]`` a key's state holds."""
    return [list(entry) for entry in state.get(LOG_FIELD, [])]


@dataclass(frozen=True)
class Probe:
    """The names of the probe tasks :func:`register_probe` registered."""

    workflow: str
    step_name: str
    read_name: str

    @classmethod
    def named(cls, workflow: str = "nemesis") -> Probe:
        """The probe of ``workflow`` (as :func:`register_probe` registers it)."""
        return cls(
            workflow,
            f"celery_sticky.nemesis.step.{workflow}",
            f"celery_sticky.nemesis.read.{workflow}",
        )

    def publish(self, app: Celery) -> Callable[[str, dict[str, Any], float], Any]:
        """A ``publish`` callable for :meth:`Nemesis.run` that sends the probe step."""
        step = app.tasks[self.step_name]
        return lambda key, headers, duration: step.apply_async((key, duration), headers=headers)

    def read(self, app: Celery) -> Callable[[str, float], list[list[Any]]]:
        """A ``read`` callable for :meth:`Nemesis.run`: the key's log through its owner."""
        task = app.tasks[self.read_name]

        def read(key: str, timeout: float) -> list[list[Any]]:
            log: list[list[Any]] = task.delay(key).get(timeout=timeout)["log"]
            return log

        return read


def _key_of(key: str, *args: Any, **kwargs: Any) -> str:
    return key


def register_probe(app: Celery, workflow: str = "nemesis") -> Probe:
    """Register the probe tasks on ``app`` (in the module the workers import, too).

    ``step(key, duration)`` appends its tag inside :func:`record_step` and sleeps
    ``duration`` seconds; ``read(key)`` returns ``{"node", "log"}``. Both are keyed
    by their first argument in ``workflow``: give your own workflow's name to read the
    state of your own tasks (instrumented with :func:`record_step`) through its owner.
    """
    from .. import sticky_task

    probe = Probe.named(workflow)
    step_name, read_name = probe.step_name, probe.read_name

    @sticky_task(
        key=_key_of,
        workflow=workflow,
        app=app,
        name=step_name,
        bind=True,
        acks_late=True,
        shared=False,
    )
    def step(self: Any, key: str, duration: float = 0.0, *, state: Any) -> int:
        with record_step(self, state, key):
            time.sleep(duration)
        return len(state.get(LOG_FIELD, []))

    @sticky_task(key=_key_of, workflow=workflow, app=app, name=read_name, bind=True, shared=False)
    def read(self: Any, key: str, *, state: Any) -> dict[str, Any]:
        return {"node": self.request.hostname, "log": applied_log(state)}

    return probe


# -- harness side -------------------------------------------------------------------


@dataclass
class NemesisConfig:
    """What a run does; the same ``seed`` draws the same schedule of faults."""

    seed: int = 0
    #: Seconds of streaming under faults (then everything is healed and checked).
    duration: float = 60.0
    keys: int = 20
    producers: int = 2
    workers: int = 3
    concurrency: int = 2
    #: The workers' ``sticky_lease_ttl`` (faults are timed against it).
    ttl: float = 3.0
    #: Each step's body sleeps a duration drawn from this range.
    step_duration: tuple[float, float] = (0.01, 0.08)
    #: Seconds between two publishes of one producer.
    publish_interval: float = 0.05
    #: Seconds between two faults, drawn from this range.
    fault_interval: tuple[float, float] = (1.0, 4.0)
    faults: Sequence[str] = FAULT_KINDS
    #: Seconds allowed after healing for every published step to run.
    settle_timeout: float = 90.0
    #: Seconds to wait for each read of a key's final state (two attempts).
    read_timeout: float = 30.0
    #: Node names are ``<node_prefix><i>@<host>``.
    node_prefix: str = "n"
    host: str = "nemesis"

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")


@dataclass
class NemesisResult:
    """What a run did and what the checker found."""

    config: NemesisConfig
    report: Report
    faults: Counter[str] = field(default_factory=Counter)
    timeline: list[str] = field(default_factory=list)
    settled: bool = True
    #: Workers that exited by themselves during the run (restarted), by node name.
    crashes: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return self.report.ok

    def describe(self) -> str:
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())) or "none"
        lines = [
            f"nemesis seed={self.config.seed} duration={self.config.duration:g}s "
            f"workers={self.config.workers} keys={self.config.keys} "
            f"producers={self.config.producers}",
            f"faults: {faults}",
            f"workers that exited by themselves: {sum(self.crashes.values())}",
            "" if self.settled else "not every published step ran before the settle timeout",
            self.report.describe(),
        ]
        if not self.ok:
            lines.append("timeline:")
            lines += [f"  {event}" for event in self.timeline]
            lines.append(f"replay with seed={self.config.seed}")
        return "\n".join(line for line in lines if line)


PublishFn = Callable[[str, dict[str, Any], float], Any]
ReadFn = Callable[[str, float], Sequence[Sequence[Any]]]


class Nemesis:
    """The infrastructure of a nemesis run: lease store, broker proxy, record list.

    Use as a context manager; configure the producer app with :attr:`lease_url` (its
    ``sticky_redis_url``) and make the workers' app module read
    ``STICKY_NEMESIS_LEASE_URL`` (or map :attr:`lease_url` into your own variable with
    ``env=`` of :meth:`run`). The workers' broker URL is given to them through
    ``CELERY_BROKER_URL``, pointing at the proxy; producers publish directly.
    """

    def __init__(
        self,
        config: NemesisConfig,
        *,
        broker_url: str,
        records_url: str,
        own_lease_store: bool = True,
        lease_url: str | None = None,
    ) -> None:
        self.config = config
        self.broker_url = broker_url
        self.records_url = records_url
        self.records_list = f"sticky-nemesis:{uuid.uuid4().hex[:12]}:records"
        self.own_lease_store = own_lease_store
        self._lease_url = lease_url
        self.lease_server: RedisServer | None = None
        self.proxy = TcpProxy.to(broker_url)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Nemesis:
        try:
            if self.own_lease_store:
                self.lease_server = self._stack.enter_context(RedisServer())
            self._stack.enter_context(self.proxy)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(self.records_url).delete(self.records_list)
        self._stack.close()

    @property
    def lease_url(self) -> str:
        if self.lease_server is not None:
            return self.lease_server.url
        if self._lease_url is None:
            raise RuntimeError("no lease store: own_lease_store=False needs lease_url=")
        return self._lease_url

    @property
    def worker_broker_url(self) -> str:
        """The broker URL through the proxy, as the workers use it."""
        return self.proxy.url(self.broker_url)

    def worker_env(self) -> dict[str, str]:
        return {
            "CELERY_BROKER_URL": self.worker_broker_url,
            LEASE_URL_ENV: self.lease_url,
            RECORDS_URL_ENV: self.records_url,
            RECORDS_LIST_ENV: self.records_list,
        }

    def cluster(
        self,
        app: Celery,
        app_path: str,
        workdir: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> WorkerCluster:
        """A :class:`WorkerCluster` whose workers use this run's proxy, lease store, records."""
        return WorkerCluster(
            app, app_path, workdir, env={**self.worker_env(), **(env or {})}, cwd=cwd
        )

    def records(self) -> list[RunRecord]:
        """Every run recorded so far, with the commit times merged in."""
        client = redis.Redis.from_url(self.records_url)
        try:
            raw = [json.loads(item) for item in client.lrange(self.records_list, 0, -1)]
        finally:
            client.close()
        commits: dict[str, tuple[float, float | None]] = {}
        for item in raw:
            if "commit" in item:
                began = item.get("from")
                commits.setdefault(
                    item["commit"], (float(item["time"]), None if began is None else float(began))
                )
        runs = []
        for item in raw:
            if "run_id" in item:
                committed, sharing = commits.get(item["run_id"], (None, None))
                runs.append(
                    RunRecord.from_dict({**item, "committed": committed, "sharing": sharing})
                )
        return runs

    def run(
        self,
        app: Celery,
        app_path: str,
        workdir: str | os.PathLike[str],
        *,
        publish: PublishFn,
        read: ReadFn,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        worker_options: Mapping[str, Any] | None = None,
    ) -> NemesisResult:
        """Start the workers, stream steps under the fault schedule, heal, check.

        ``publish(key, headers, duration)`` must publish one step of ``key`` with
        ``headers`` (which carry the step's tag) and a body lasting about ``duration``;
        ``read(key, timeout)`` returns the key's :func:`applied_log` read through its
        owner. ``worker_options`` go to :meth:`WorkerCluster.start` (``queues=``...).
        """
        cfg = self.config
        cluster = self.cluster(app, app_path, workdir, env=env, cwd=cwd)
        names = [f"{cfg.node_prefix}{i + 1}@{cfg.host}" for i in range(cfg.workers)]
        options = {"concurrency": cfg.concurrency, **(worker_options or {})}
        with cluster:
            for name in names:
                cluster.start(name, wait=False, **options)
            cluster.wait_registered(names, timeout=60)
            run = _Run(self, cluster, names, publish)
            try:
                run.stream()
            finally:
                run.heal()
            settled = run.settle()
            finals: dict[str, Sequence[Sequence[Any]] | None] = {}
            for key in run.keys:
                finals[key] = _read_with_retry(read, key, cfg.read_timeout)
            report = check(run.published, self.records(), finals)
        return NemesisResult(cfg, report, run.faults, run.timeline, settled, run.crashes)


def _read_with_retry(
    read: ReadFn, key: str, timeout: float, attempts: int = 2
) -> Sequence[Sequence[Any]] | None:
    for _ in range(attempts):
        try:
            return read(key, timeout)
        except Exception as exc:
            logger.warning("nemesis: reading %s failed: %r", key, exc)
    return None


class _Run:
    """One run's producers and fault schedule (the cluster is the caller's)."""

    def __init__(
        self, nemesis: Nemesis, cluster: WorkerCluster, names: list[str], publish: PublishFn
    ) -> None:
        self.nemesis = nemesis
        self.cfg = nemesis.config
        self.cluster = cluster
        self.names = names
        self.publish_fn = publish
        self.rng = random.Random(self.cfg.seed)
        tag = uuid.uuid4().hex[:6]
        self.keys = [f"nk{self.cfg.seed}-{tag}-{i}" for i in range(self.cfg.keys)]
        self.published: dict[str, Published] = {key: Published() for key in self.keys}
        self.lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.crashes: Counter[str] = Counter()
        self.timeline: list[str] = []
        self.actions: list[tuple[float, int, str, Callable[[], None]]] = []
        self.counter = itertools.count()
        self.terminating: set[str] = set()
        self.dead: set[str] = set()
        self.proxy_fault = False
        self.started = time.monotonic()

    # - bookkeeping -

    def note(self, text: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.started:7.2f}s {text}")

    def later(self, delay: float, what: str, action: Callable[[], None]) -> None:
        heapq.heappush(self.actions, (time.monotonic() + delay, next(self.counter), what, action))

    def healthy(self) -> list[str]:
        return [
            name
            for name in self.names
            if self.cluster.workers[name].running
            and not self.cluster.workers[name].paused
            and name not in self.terminating
        ]

    # - producers -

    def producer(self, index: int, stop: threading.Event) -> None:
        name = f"p{index}"
        rng = random.Random(self.cfg.seed * 1000 + index)
        seqs = dict.fromkeys(self.keys, 0)
        low, high = self.cfg.step_duration
        while not stop.is_set():
            key = rng.choice(self.keys)
            seq = seqs[key]
            seqs[key] += 1
            headers = {HEADER: [name, seq]}
            try:
                sent = self.publish_fn(key, headers, rng.uniform(low, high))
            except Exception as exc:
                logger.warning("nemesis: publishing %s %s#%s failed: %r", key, name, seq, exc)
                with self.lock:
                    self.published[key].uncertain.add((name, seq))
            else:
                with self.lock:
                    self.published[key].steps.append((name, seq))
                    task_id = getattr(sent, "id", None)
                    if isinstance(task_id, str):
                        self.published[key].task_ids[(name, seq)] = task_id
            stop.wait(self.cfg.publish_interval)

    # - the schedule -

    def stream(self) -> None:
        stop = threading.Event()
        threads = [
            threading.Thread(target=self.producer, args=(i, stop), name=f"nemesis-p{i}")
            for i in range(self.cfg.producers)
        ]
        for thread in threads:
            thread.start()
        try:
            end = time.monotonic() + self.cfg.duration
            next_fault = time.monotonic() + self.rng.uniform(*self.cfg.fault_interval)
            while time.monotonic() < end:
                self.run_due()
                self.notice_crashes()
                if time.monotonic() >= next_fault:
                    try:
                        self.fault()
                    except Exception as exc:  # a fault that could not be applied
                        self.note(f"applying a fault failed: {exc!r}")
                    next_fault = time.monotonic() + self.rng.uniform(*self.cfg.fault_interval)
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)

    def run_due(self, everything: bool = False) -> None:
        """Run the actions due now (all pending ones when ``everything``); an action
        that schedules another one does not run it in the same call."""
        now = time.monotonic()
        due = []
        while self.actions and (everything or self.actions[0][0] <= now):
            due.append(heapq.heappop(self.actions))
        for _, _, what, action in due:
            try:
                action()
            except Exception as exc:
                self.note(f"{what} failed: {exc!r}")

    def fault(self) -> None:
        kinds = [kind for kind in self.cfg.faults if self.possible(kind)]
        if not kinds:
            return
        kind = self.rng.choice(kinds)
        ttl = self.cfg.ttl
        self.faults[kind] += 1
        if kind.startswith("kill9"):
            name = self.rng.choice(self.healthy())
            self.cluster.kill(name)
            self.dead.add(name)
            within = kind == "kill9_restart_within_ttl"
            delay = self.rng.uniform(0.1, 0.5) * ttl if within else self.rng.uniform(1.5, 2.5) * ttl
            self.note(f"kill -9 {name}, restart in {delay:.1f}s")
            self.later(delay, f"restart {name}", lambda: self.restart(name))
        elif kind == "pause_past_ttl":
            name = self.rng.choice(self.healthy())
            delay = self.rng.uniform(1.5, 2.5) * ttl
            self.cluster.pause(name)
            self.note(f"SIGSTOP {name} (group) for {delay:.1f}s")
            self.later(delay, f"SIGCONT {name}", lambda: self.resume(name))
        elif kind == "sigterm_restart":
            name = self.rng.choice(self.healthy())
            self.cluster.signal(name, signal.SIGTERM)
            self.terminating.add(name)
            self.note(f"SIGTERM {name}")
            deadline = time.monotonic() + 60
            self.later(
                0.5, f"restart {name} once it exited", lambda: self.after_term(name, deadline)
            )
        elif kind.startswith("lease_restart"):
            keep = kind == "lease_restart_with_data"
            down = self.rng.uniform(0.0, 1.0)
            server = self.nemesis.lease_server
            assert server is not None
            self.note(f"lease store restart ({'with data' if keep else 'empty'}, down {down:.1f}s)")
            server.restart(keep_data=keep, down_for=down)
        elif kind.startswith("broker"):
            delay = self.rng.uniform(0.5, 2.0) * ttl
            if kind == "broker_cut":
                self.nemesis.proxy.cut()
            else:
                self.nemesis.proxy.blackhole()
            self.proxy_fault = True
            self.note(f"{kind} for {delay:.1f}s")
            self.later(delay, "restore the broker", self.restore_broker)

    def notice_crashes(self) -> None:
        """A worker that exited by itself (not killed or stopped here) crashed: count it,
        keep its log's last line in the timeline, and start it again."""
        for name in self.names:
            worker = self.cluster.workers[name]
            if worker.running or name in self.dead or name in self.terminating:
                continue
            self.crashes[name] += 1
            last = next(
                (line for line in reversed(worker.log().splitlines()) if "CRITICAL" in line),
                "no CRITICAL line in its log",
            )
            code = worker.process.returncode if worker.process is not None else None
            self.note(f"{name} exited by itself (exit {code}): {last[:200]}")
            self.cluster.reap(name)
            self.restart(name)

    def possible(self, kind: str) -> bool:
        if kind.startswith(("kill9", "pause", "sigterm")):
            return len(self.healthy()) >= 2  # someone must be left to take over
        if kind.startswith("lease"):
            return self.nemesis.lease_server is not None
        return not self.proxy_fault

    # - healing -

    def restart(self, name: str) -> None:
        self.cluster.restart(name, wait=False)
        self.dead.discard(name)
        self.note(f"restarted {name}")

    def resume(self, name: str) -> None:
        self.cluster.resume(name)
        self.note(f"SIGCONT {name}")

    def after_term(self, name: str, deadline: float) -> None:
        """Restart ``name`` once it exited after SIGTERM; kill it at ``deadline``."""
        worker = self.cluster.workers[name]
        if worker.running and time.monotonic() < deadline:
            self.later(
                0.5, f"restart {name} once it exited", lambda: self.after_term(name, deadline)
            )
            return
        if worker.running:
            self.cluster.kill(name)
            self.note(f"{name} did not exit within 60s of SIGTERM: killed")
        self.terminating.discard(name)
        self.restart(name)

    def restore_broker(self) -> None:
        self.nemesis.proxy.restore()
        self.proxy_fault = False
        self.note("broker restored")

    def heal(self) -> None:
        """End every fault: resume, restore, restart; wait until every worker registered."""
        self.note("healing")
        with contextlib.suppress(Exception):
            self.nemesis.proxy.restore()
        for name in self.names:
            worker = self.cluster.workers[name]
            if worker.paused:
                self.resume(name)
        deadline = time.monotonic() + 90
        while self.actions and time.monotonic() < deadline:
            self.run_due(everything=True)
            if self.actions:
                time.sleep(0.2)
        server = self.nemesis.lease_server
        if server is not None and (server.process is None or server.process.poll() is not None):
            server.start()
        for name in self.names:
            if not self.cluster.workers[name].running:
                self.restart(name)
        self.cluster.wait_registered(self.names, timeout=90)

    def settle(self) -> bool:
        """Wait until every published step ran at least once (True), or time out."""
        wanted = {
            (key, step) for key, published in self.published.items() for step in published.steps
        }

        def all_ran() -> bool:
            ran = {(r.key, (r.producer, r.seq)) for r in self.nemesis.records()}
            return wanted <= ran

        try:
            wait_for(all_ran, timeout=self.cfg.settle_timeout, interval=0.5)
        except TimeoutError:
            self.note("settle timeout: not every published step ran")
            return False
        self.note("settled")
        return True


def run_nemesis(
    app_factory: Callable[[str], Celery],
    app_path: str,
    workdir: str | os.PathLike[str],
    config: NemesisConfig,
    *,
    broker_url: str,
    records_url: str,
    probe: Probe,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    worker_options: Mapping[str, Any] | None = None,
) -> NemesisResult:
    """One run with the probe tasks: ``app_factory(lease_url)`` builds the producer app."""
    with Nemesis(config, broker_url=broker_url, records_url=records_url) as nemesis:
        app = app_factory(nemesis.lease_url)
        app.finalize()
        return nemesis.run(
            app,
            app_path,
            Path(workdir),
            publish=probe.publish(app),
            read=probe.read(app),
            env=env,
            cwd=cwd,
            worker_options=worker_options,
        )
