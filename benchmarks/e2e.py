"""End to end on real workers: short tasks and state steps, plain Celery against sticky.

The other benchmarks time one piece at a time (a publish, a state access, the
lease store); this one asks what a user sees: how many tasks per second a cluster
of real ``celery worker`` processes gets through, with and without celery-sticky.
Two sets of ``--workers`` workers run side by side, each worker a subprocess with
its own node name: plain Celery workers (``e2e-plain-1@bench``, ...) of an app
with no sticky task (nothing of celery-sticky is installed on it), and sticky workers
(``e2e-sticky-1@bench``, ...), both with the same pool, concurrency, prefetch and
broker. For each pool (``--pools``), concurrency (``--concurrency``) and network
(``--networks``) the workers start anew, then every workload runs ``--rounds``
times, interleaved (each round runs each workload once, in a rotated order), and
each figure is the median of the rounds: the machine this runs on is shared and
noisy, and a slow minute then spreads over every workload alike.

Workloads (a batch is one workload's tasks of one round):

- short tasks: ``--tasks`` tasks over ``--keys`` keys, round robin, each doing
  nothing: a plain task, a sticky task without a state handle (routing, direct
  queue, per-key gate), and a sticky task that takes its state handle and leaves
  it untouched (also the execution protocol: the applied-record check, the fence,
  answered from the node's lease clock with no Redis call, and the commit of the
  applied record);
- a state of ``--sizes`` MB per key (1,000-byte entries), ``workers x
  concurrency`` keys: a sticky step reads and writes one entry of the key's local
  state (and commits); a stateless task does the same on a Redis hash (HGET +
  HSET), and another loads the whole state (GET the pickle, unpickle, change one
  entry, pickle, SET). The stateless tasks run on the plain workers; the sticky
  keys' states are written by a task on their owners before the rounds.

A batch is published while its workers are stopped (SIGSTOP, pool processes
included), then the workers are resumed, and the batch takes from the resume to
the end of its last task: the workers' throughput, not the producer's
(``publish_overhead.py`` measures that). The CPU time the workers' processes used
meanwhile, per task, is reported too: on a machine with fewer cores than
processes that is what throughput ends up costing. Each task's end is taken in a
``task_postrun`` handler, with the seconds since ``task_prerun`` (the task's time
in the pool: "in-task" below); a thread of each worker process sends them to Redis
on loopback every 10 ms, so no task waits for the bookkeeping. Results are ignored
(``task_ignore_result``), and the workers log at WARNING (no line per task).

Networks: ``loopback`` is Redis on this machine; ``remote`` puts Redis behind a
TCP proxy (``celery_sticky.testing.proxy``, in a process of its own) that adds
``--delay-ms`` each way, as a Redis on another machine would. In that mode
everything the workers ask Redis goes through the proxy: the broker, the lease
store and the stateless tasks' data. The producer publishes on loopback (while
the workers are stopped, so it changes no figure, only the run's length), and
the benchmark's own bookkeeping does not go through the proxy either.

Targets (issue 16), reported, not enforced: sticky short tasks at least 0.95x
plain with Redis on loopback; with Redis 0.5 ms away, a sticky step on a 100 MB
state at least 5x the stateless HGET + HSET and 300x the whole load. ``--plot
PATH`` draws the throughput ratios against the concurrency (needs matplotlib).

    python benchmarks/e2e.py [--rounds 3] [--tasks 3000] [--keys 300] [--workers 3]
        [--concurrency 2] [--pools prefork,threads] [--networks loopback,remote]
        [--delay-ms 0.5] [--sizes 1,100] [--state-tasks 300] [--plot PATH] [--keep-logs]

``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/12``) is the broker and the
lease store; when nothing answers there an embedded Redis is started. Every run
uses its own key and queue prefix and temporary directories; its Redis keys, the
workers' state and (unless ``--keep-logs`` or an error) their logs are deleted at
the end, and every worker process it started is killed, also on an error,
Ctrl-C or SIGTERM. The exit status is 1 only when the benchmark itself fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import celery
import psutil
import redis
from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_ready
from common import against_redis, calibrate_proxy, positive

from celery_sticky import INJECTED, sticky_task
from celery_sticky.testing import WorkerCluster
from celery_sticky.testing.proxy import LatencyProxy

DEFAULT_URL = "redis://127.0.0.1:6379/12"
HERE = Path(__file__).resolve().parent
MB = 1_000_000
ENTRY_BYTES = 1000
#: Long enough that a sticky worker stopped while a batch is published keeps its leases.
LEASE_TTL = 30.0
ENV = "E2E_BENCH_"  # the workers' settings come from E2E_BENCH_* variables
SHORT = 0  # the "size" of the short-task workloads

# Targets (issue 16): reported, not enforced.
SHORT_TARGET = 0.95  # sticky / plain, Redis on loopback
HASH_TARGET = 5.0  # sticky step / HGET + HSET, 100 MB state, Redis remote
WHOLE_TARGET = 300.0  # sticky step / whole load, 100 MB state, Redis remote
TARGET_SIZE = 100


# -- the workers' side: two apps, ``celery -A e2e:plain_app`` and ``e2e:sticky_app`` --


class Apps(NamedTuple):
    plain: Celery
    sticky: Celery


def entries(size_mb: int) -> int:
    """How many ``ENTRY_BYTES`` entries make a state of ``size_mb`` MB (pickled)."""
    return max(1, size_mb * MB // (ENTRY_BYTES + 16))  # ~16 bytes of pickle per entry


def entry_name(number: int) -> str:
    return f"e{number:07d}"


def text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def make_state(size_mb: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {entry_name(i): rng.randbytes(ENTRY_BYTES) for i in range(entries(size_mb))}


_clients: dict[tuple[int, str], redis.Redis] = {}


def client_for(url: str) -> redis.Redis:
    """This process's client for ``url`` (one per process: pool children fork)."""
    client = _clients.get((os.getpid(), url))
    if client is None:
        client = _clients[os.getpid(), url] = redis.Redis.from_url(url)
    return client


def make_apps(prefix: str, url: str, data_prefix: str, state_dir: str) -> Apps:
    """The plain app and the sticky app of one setup; every name starts with ``prefix``.

    ``url`` is the broker, the lease store and the stateless tasks' Redis: loopback,
    or the latency proxy. The stateless tasks' data is the run's, under ``data_prefix``.
    """
    common: dict[str, Any] = {
        "task_ignore_result": True,
        "worker_hijack_root_logger": False,
        # No pidbox: nothing of a run is left in Redis's shared binding tables.
        "worker_enable_remote_control": False,
        "broker_connection_retry_on_startup": True,
    }
    plain = Celery(f"e2e-plain-{prefix}", broker=url, set_as_current=False)
    plain.conf.update(task_default_queue=f"{prefix}.plain", **common)
    sticky = Celery(f"e2e-sticky-{prefix}", broker=url, set_as_current=False)
    sticky.conf.update(
        task_default_queue=f"{prefix}.sticky",
        sticky_redis_url=url,
        sticky_key_prefix=prefix,
        sticky_queue_prefix=prefix,
        sticky_state_dir=state_dir,
        sticky_lease_ttl=LEASE_TTL,
        # Killed at the end of a setup, never drained: no hand-over copies to write.
        sticky_state_replication="off",
        **common,
    )

    def noop(key: str, number: int) -> None:
        """A short task: nothing but Celery's own work."""

    def hash_step(key: str, entry: str) -> None:
        """One entry of the key's state, kept as a Redis hash: HGET it, HSET it."""
        client, name = client_for(url), f"{data_prefix}:hash:{key}"
        value = client.hget(name, entry)
        assert value is not None, f"{name} has no {entry}"
        client.hset(name, entry, os.urandom(len(value)))

    def whole_step(key: str, entry: str) -> None:
        """The key's whole state, one pickle in Redis: GET, change one entry, SET."""
        client, name = client_for(url), f"{data_prefix}:blob:{key}"
        blob = client.get(name)
        assert blob is not None, f"{name} is missing"
        state = pickle.loads(cast(bytes, blob))
        state[entry] = os.urandom(len(state[entry]))
        client.set(name, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))

    for fun in (noop, hash_step, whole_step):
        plain.task(name=f"e2e_bench.{fun.__name__}", shared=False)(fun)

    @sticky_task(key="key", name="e2e_bench.sticky_bare", app=sticky)
    def sticky_bare(key: str, number: int) -> None:
        """A short sticky task without a state handle: nothing to check or commit."""

    @sticky_task(key="key", name="e2e_bench.sticky_noop", app=sticky)
    def sticky_noop(key: str, number: int, *, state: Any = INJECTED) -> None:
        """A short sticky task with its state handle, which it does not touch."""

    @sticky_task(key="key", name="e2e_bench.sticky_step", app=sticky)
    def sticky_step(key: str, entry: str, *, state: Any = INJECTED) -> None:
        """One entry of the key's local state: read it, write it (committed after)."""
        state[entry] = os.urandom(len(state[entry]))

    @sticky_task(key="key", name="e2e_bench.fill", app=sticky)
    def fill(key: str, size_mb: int, *, state: Any = INJECTED) -> None:
        """Write the key's whole state (before the rounds)."""
        state.update(make_state(size_mb, seed=size_mb))

    sticky.finalize()  # binds the sticky tasks, which installs the router
    return Apps(plain, sticky)


# Bookkeeping, in the workers: each task's end and its time in the pool, sent by a
# thread of each process through a loopback Redis connection of its own
# (``E2E_BENCH_RECORD_URL``), a few at a time, so that no task waits for it.
def _record_names(prefix: str) -> dict[str, str]:
    return {
        name: f"{prefix}:bench:{name}"
        for name in ("times", "ends", "expect", "done", "failed", "ready")
    }


class Recorder:
    """Collects ``(seconds in the pool, end time, failure)`` of this process's tasks and
    appends them to the setup's lists every ``FLUSH`` seconds while there are any; the
    flush that completes the expected count pushes to ``done``."""

    FLUSH = 0.01

    def __init__(self) -> None:
        self.names = _record_names(os.environ[f"{ENV}PREFIX"])
        self.client = redis.Redis.from_url(os.environ[f"{ENV}RECORD_URL"])
        self.started: dict[str, float] = {}
        self.ended: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        threading.Thread(target=self.run, name="e2e-bench-recorder", daemon=True).start()

    def add(self, took: float, ended: float, failure: str) -> None:
        with self.lock:
            self.ended.append((took, ended, failure))
        self.wake.set()

    def run(self) -> None:
        while self.wake.wait():
            time.sleep(self.FLUSH)
            self.wake.clear()
            with self.lock:
                items, self.ended = self.ended, []
            if items:
                self.flush(items)

    def flush(self, items: list[tuple[float, float, str]]) -> None:
        names, pipe = self.names, self.client.pipeline(transaction=False)
        pipe.rpush(names["times"], *(took for took, _, _ in items))
        pipe.rpush(names["ends"], *(ended for _, ended, _ in items))
        pipe.get(names["expect"])
        failures = [failure for _, _, failure in items if failure]
        if failures:
            pipe.rpush(names["failed"], *failures)
        count, _, expect, *_ = pipe.execute()
        if expect is not None and count - len(items) < int(expect) <= count:
            self.client.rpush(names["done"], count)


_recorders: dict[int, Recorder] = {}


def recorder() -> Recorder:
    """This process's recorder (pool children fork: one each, made in the child)."""
    found = _recorders.get(os.getpid())
    if found is None:
        found = _recorders[os.getpid()] = Recorder()
    return found


def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        recorder().started[task_id] = time.perf_counter()


def _task_ended(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    rec = recorder()
    started = rec.started.pop(task_id or "", None)
    if started is not None:
        failure = "" if state == "SUCCESS" else f"{getattr(task, 'name', '?')}[{task_id}]: {state}"
        rec.add(time.perf_counter() - started, time.time(), failure)


def _worker_ready(sender: Any = None, **_: Any) -> None:
    rec = recorder()
    rec.client.rpush(rec.names["ready"], str(sender.hostname))


def _apps_from_env() -> Apps:
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_ended, weak=False)
    worker_ready.connect(_worker_ready, weak=False)
    return make_apps(
        os.environ[f"{ENV}PREFIX"],
        os.environ[f"{ENV}URL"],
        os.environ[f"{ENV}DATA_PREFIX"],
        os.environ[f"{ENV}STATE_DIR"],
    )


if f"{ENV}PREFIX" in os.environ:
    plain_app, sticky_app = _apps_from_env()


# -- workloads and batches --------------------------------------------------------


@dataclass
class Workload:
    """One kind of task, run once per round; the rates are the rounds' tasks per second."""

    size: int  # MB of state per key; SHORT for the short tasks
    kind: str  # "plain", "bare", "noop", "step", "hash" or "whole"
    task: str
    sticky: bool
    rates: list[float] = field(default_factory=list)
    in_task: list[float] = field(default_factory=list)  # per round: median seconds in the pool
    # Per round: CPU seconds per task of the workers' main processes, of their pool processes.
    cpu: list[tuple[float, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> float:
        """Range of the rounds' rates relative to their median: the run's noise."""
        return (max(self.rates) - min(self.rates)) / self.rate if len(self.rates) > 1 else 0.0


LABELS = {
    "plain": "plain task",
    "bare": "sticky, no state handle",
    "noop": "sticky, state handle",
    "step": "sticky step",
    "hash": "HGET + HSET",
    "whole": "whole GET + SET",
}
#: (workload, the one it is compared with), in the report's order.
SHORT_PAIRS = (("bare", "plain"), ("noop", "plain"))
STATE_PAIRS = (("step", "hash"), ("step", "whole"))


def pairs(size: int) -> tuple[tuple[str, str], ...]:
    return SHORT_PAIRS if size == SHORT else STATE_PAIRS


class Batch(NamedTuple):
    seconds: float
    in_task: float
    cpu: tuple[float, float]  # CPU seconds of the main processes, of the pool processes


def cpu_seconds(cluster: WorkerCluster) -> tuple[float, float]:
    """CPU seconds used so far by the cluster's main processes, and by their pool processes
    (none with the threads pool: its threads are the main process's)."""
    main = pool = 0.0
    for worker in cluster.workers.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(worker.pid)
            main += sum(process.cpu_times()[:2])
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    pool += sum(child.cpu_times()[:2])
    return main, pool


@dataclass
class Run:
    """What every setup of the run shares: the prefix, Redis, directories, the proxy."""

    prefix: str
    url: str
    workdir: Path
    record: redis.Redis
    remote_url: str = ""
    rtt: tuple[float, float] = (0.0, 0.0)
    data_keys: dict[int, int] = field(default_factory=dict)  # size -> keys with data


class Setup:
    """One pool, concurrency and network: its apps, workers, keys and workloads.

    Each setup starts from nothing: a key prefix and a state directory of its own. (The
    same nodes restarted would keep their keys and states, but a restarted worker first
    scans its whole local state, in its main process: with 100 MB states that takes
    minutes of CPU, which the rounds would measure.)
    """

    def __init__(
        self, run: Run, pool: str, concurrency: int, network: str, args: argparse.Namespace
    ) -> None:
        self.run = run
        self.pool = pool
        self.concurrency = concurrency
        self.network = network
        self.args = args
        self.prefix = f"{run.prefix}-{pool}-c{concurrency}-{network}"
        self.url = run.remote_url if network == "remote" else run.url
        self.state_dir = run.workdir / "state" / self.prefix
        # The producer's side of the apps: it publishes on loopback whatever the network.
        self.apps = make_apps(self.prefix, run.url, run.prefix, str(self.state_dir))
        self.names = _record_names(self.prefix)
        env = {
            f"{ENV}PREFIX": self.prefix,
            f"{ENV}URL": self.url,
            f"{ENV}RECORD_URL": run.url,
            f"{ENV}DATA_PREFIX": run.prefix,
            f"{ENV}STATE_DIR": str(self.state_dir),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
            ),
        }
        logs = run.workdir / "logs" / self.prefix
        self.clusters = {
            False: WorkerCluster(self.apps.plain, "e2e:plain_app", logs, env=env, cwd=str(HERE)),
            True: WorkerCluster(self.apps.sticky, "e2e:sticky_app", logs, env=env, cwd=str(HERE)),
        }
        self.state_keys: int = args.workers * concurrency  # one per pool slot
        self.workloads = [
            Workload(SHORT, "plain", "e2e_bench.noop", sticky=False),
            Workload(SHORT, "bare", "e2e_bench.sticky_bare", sticky=True),
            Workload(SHORT, "noop", "e2e_bench.sticky_noop", sticky=True),
        ]
        for size in args.sizes:
            self.workloads += [
                Workload(size, "step", "e2e_bench.sticky_step", sticky=True),
                Workload(size, "hash", "e2e_bench.hash_step", sticky=False),
                Workload(size, "whole", "e2e_bench.whole_step", sticky=False),
            ]

    @property
    def title(self) -> str:
        return f"{self.pool} -c {self.concurrency}, Redis {self.network}"

    # -- workers ----------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start both sets of workers; wait until every one is ready."""
        self.run.record.delete(self.names["ready"])
        for sticky, cluster in self.clusters.items():
            queue = f"{self.prefix}.{'sticky' if sticky else 'plain'}"
            for number in range(1, self.args.workers + 1):
                cluster.start(
                    f"e2e-{'sticky' if sticky else 'plain'}-{number}@bench",
                    pool=self.pool,
                    concurrency=self.concurrency,
                    queues=[queue],
                    args=["-l", "warning"],  # the last --loglevel wins
                    wait=False,
                )
        names = {name for cluster in self.clusters.values() for name in cluster.workers}
        deadline = time.monotonic() + timeout
        while not names <= {text(n) for n in self.run.record.lrange(self.names["ready"], 0, -1)}:
            self.check_running()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers of {self.title} were not ready in {timeout:g} s")
            time.sleep(0.1)
        self.clusters[True].wait_registered(self.clusters[True].workers, timeout=timeout)

    def check_running(self) -> None:
        for cluster in self.clusters.values():
            for worker in cluster.workers.values():
                if not worker.running:
                    raise RuntimeError(f"{worker.name} exited:\n{worker.log()[-3000:]}")

    def kill(self) -> None:
        """Kill every worker of the setup (a warm stop would drain every key for nothing)."""
        for cluster in self.clusters.values():
            for name, worker in cluster.workers.items():
                if worker.running:
                    with contextlib.suppress(Exception):
                        cluster.kill(name)

    def logs(self) -> str:
        return "\n".join(
            f"--- {worker.name}\n{worker.log()[-2000:]}"
            for cluster in self.clusters.values()
            for worker in cluster.workers.values()
        )

    # -- batches ----------------------------------------------------------------------

    def messages(self, workload: Workload, count: int) -> list[tuple[Any, ...]]:
        if workload.size == SHORT:
            return [(f"k{n % self.args.keys}", n) for n in range(count)]
        fields = entries(workload.size)
        return [
            (f"s{workload.size}-{n % self.state_keys}", entry_name(n * 7919 % fields))
            for n in range(count)
        ]

    def count(self, workload: Workload) -> int:
        if workload.size == SHORT:
            return int(self.args.tasks)
        if workload.kind == "whole":
            # A whole load of 100 MB takes seconds: at least one per key (one per pool slot).
            return max(self.state_keys, int(self.args.state_tasks) // workload.size)
        return int(self.args.state_tasks)

    def batch(self, sticky: bool, task: str, messages: list[tuple[Any, ...]]) -> Batch:
        """Publish ``messages`` with the workers stopped, resume them, wait for the last."""
        record, names = self.run.record, self.names
        record.delete(names["times"], names["ends"], names["done"], names["failed"])
        record.set(names["expect"], len(messages))
        cluster = self.clusters[sticky]
        signature = (self.apps.sticky if sticky else self.apps.plain).tasks[task]
        workers = list(cluster.workers)
        for name in workers:
            cluster.pause(name)
        try:
            for args in messages:
                signature.apply_async(args)
            cpu_before = cpu_seconds(cluster)
        finally:
            resumed = time.time()
            for name in workers:
                cluster.resume(name)
        timeout = 120 + 0.2 * len(messages)
        deadline = time.monotonic() + timeout
        done = None
        while done is None and time.monotonic() < deadline and not record.exists(names["failed"]):
            # Short waits: redis-py's socket timeout (5 s by default) also bounds a BLPOP.
            done = record.blpop([names["done"]], timeout=1)
            self.check_running()
        failed = [text(raw) for raw in record.lrange(names["failed"], 0, 9)]
        if done is None or failed:
            finished = record.llen(names["times"])
            raise RuntimeError(
                f"{self.title}: {task}: {finished} of {len(messages)} task(s) ended "
                f"in {timeout:g} s; failed: {failed or 'none'}\n{self.logs()}"
            )
        cpu_after = cpu_seconds(cluster)
        times = [float(raw) for raw in record.lrange(names["times"], 0, -1)]
        ended = max(float(raw) for raw in record.lrange(names["ends"], 0, -1))
        cpu = (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])
        return Batch(ended - resumed, statistics.median(times), cpu)

    def prepare(self) -> None:
        """Make sure the stateless tasks' data is in Redis; write each sticky key's state on
        its owner."""
        for size in self.args.sizes:
            write_data(self.run, size, self.state_keys)
            keys = [f"s{size}-{n}" for n in range(self.state_keys)]
            started = time.monotonic()
            self.batch(True, "e2e_bench.fill", [(key, size) for key in keys])
            log(
                f"{self.title}: {len(keys)} sticky state(s) of {size} MB written in "
                f"{time.monotonic() - started:.1f} s"
            )

    def warm_up(self) -> None:
        """Every workload once, smaller, not measured: imports, connections, the short keys'
        claims (each key's first task claims it), first reads of the state."""
        for workload in self.workloads:
            count = self.args.keys if workload.size == SHORT else 2 * self.state_keys
            self.batch(workload.sticky, workload.task, self.messages(workload, count))

    def measure(self) -> None:
        for number in range(self.args.rounds):
            shift = number % len(self.workloads)
            for workload in self.workloads[shift:] + self.workloads[:shift]:
                messages = self.messages(workload, self.count(workload))
                batch = self.batch(workload.sticky, workload.task, messages)
                workload.rates.append(len(messages) / batch.seconds)
                workload.in_task.append(batch.in_task)
                workload.cpu.append((batch.cpu[0] / len(messages), batch.cpu[1] / len(messages)))
            log(
                f"{self.title}: round {number + 1}/{self.args.rounds}: "
                + ", ".join(
                    f"{w.kind}{'' if w.size == SHORT else f'@{w.size}MB'} {w.rates[-1]:.0f}/s"
                    for w in self.workloads
                )
            )


def write_data(run: Run, size: int, keys: int) -> None:
    """The stateless tasks' data for ``keys`` keys of ``size`` MB: a pickle and a hash each."""
    have = run.data_keys.get(size, 0)
    if have >= keys:
        return
    state = make_state(size, seed=size)
    blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    for number in range(have, keys):
        key = f"s{size}-{number}"
        run.record.set(f"{run.prefix}:blob:{key}", blob)
        names = list(state)
        with run.record.pipeline(transaction=False) as pipe:
            for start in range(0, len(names), 1000):
                chunk: dict[Any, Any] = {n: state[n] for n in names[start : start + 1000]}
                pipe.hset(f"{run.prefix}:hash:{key}", mapping=chunk)
            pipe.execute()
    run.data_keys[size] = keys


# -- the report -----------------------------------------------------------------------


def fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def rows(setup: Setup) -> Iterator[tuple[int, Workload, Workload]]:
    """(size, sticky workload, the one it is compared with), in report order."""
    by = {(w.size, w.kind): w for w in setup.workloads}
    for size in (SHORT, *setup.args.sizes):
        for sticky, other in pairs(size):
            yield size, by[size, sticky], by[size, other]


def report(setups: list[Setup], run: Run, args: argparse.Namespace, argv: list[str]) -> None:
    print("celery-sticky end to end: plain Celery against sticky, real workers")
    print(f"command: {shlex.join(['python', 'benchmarks/e2e.py', *argv])}")
    server = run.record.info("server")
    print(
        f"Python {platform.python_version()}, Celery {celery.__version__}, redis-py "
        f"{redis.__version__}, Redis {server.get('redis_version')} at {run.url}, "
        f"{os.cpu_count()} CPU(s), run prefix {run.prefix}"
    )
    print(
        f"{args.workers} plain and {args.workers} sticky workers; {args.rounds} interleaved "
        f"round(s); short tasks: {args.tasks} over {args.keys} keys; states: "
        f"{args.state_tasks} steps per round over workers x concurrency keys, "
        "whole loads fewer (see the tasks column)"
    )
    if any(s.network == "remote" for s in setups):
        print(
            f"remote: PING round trip {run.rtt[1] * 1e3:.2f} ms through the proxy, against "
            f"{run.rtt[0] * 1e3:.2f} ms on loopback (asked +{2 * args.delay_ms:g} ms)"
        )
    print()
    print("tasks/s: median of the rounds, from the workers' resume to the end of the last task;")
    print("spread: range of the rounds' rates / median; in-task: median time in the pool, ms.")
    header = (
        f"{'setup':<28} {'workload':<12} {'sticky':<24} {'tasks':>5} {'tasks/s':>8} "
        f"{'spread':>6} {'in-task':>7} | {'against':<16} {'tasks':>5} {'tasks/s':>8} "
        f"{'spread':>6} {'in-task':>7} | {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for setup in setups:
        title = setup.title
        for size, sticky, other in rows(setup):
            workload = "short tasks" if size == SHORT else f"{size} MB state"
            print(
                f"{title:<28} {workload:<12} {sticky.label:<24} {setup.count(sticky):>5} "
                f"{fmt_rate(sticky.rate):>8} {sticky.spread:>6.0%} "
                f"{fmt_ms(statistics.median(sticky.in_task)):>7} | {other.label:<16} "
                f"{setup.count(other):>5} {fmt_rate(other.rate):>8} {other.spread:>6.0%} "
                f"{fmt_ms(statistics.median(other.in_task)):>7} | "
                f"{fmt_ratio(sticky.rate / other.rate):>7}"
            )
            title = ""
    print()
    print(
        "CPU per task, ms (median of the rounds): the workers' main processes + their pool "
        "processes (threads: all in the main process)"
    )
    for setup in setups:
        title = setup.title
        for size in (SHORT, *setup.args.sizes):
            workload = "short tasks" if size == SHORT else f"{size} MB state"
            cells = [
                f"{w.label} "
                + " + ".join(fmt_ms(statistics.median(part)) for part in zip(*w.cpu, strict=True))
                for w in setup.workloads
                if w.size == size
            ]
            print(f"  {title:<28} {workload:<12} {';  '.join(cells)}")
            title = ""
    print()
    print("Targets (issue 16; reported, not enforced)")
    for setup in setups:
        if setup.network == "loopback":
            for kind in ("bare", "noop"):
                got = ratio(setup, SHORT, kind, "plain")
                verdict = "PASS" if got >= SHORT_TARGET else "FAIL"
                print(
                    f"  {setup.title:<28} short, {LABELS[kind]} >= {SHORT_TARGET}x plain: "
                    f"{fmt_ratio(got)}  {verdict}"
                )
        elif TARGET_SIZE in setup.args.sizes:
            for kind, target in (("hash", HASH_TARGET), ("whole", WHOLE_TARGET)):
                got = ratio(setup, TARGET_SIZE, "step", kind)
                verdict = "PASS" if got >= target else "FAIL"
                print(
                    f"  {setup.title:<28} {TARGET_SIZE} MB, sticky step >= {target:g}x "
                    f"{LABELS[kind]}: {fmt_ratio(got)}  {verdict}"
                )
    if TARGET_SIZE not in args.sizes:
        print(f"  (state targets not checked: run with {TARGET_SIZE} among --sizes)")


def ratio(setup: Setup, size: int, kind: str, other: str) -> float:
    """Throughput of workload ``kind`` over that of ``other``, of one size, in ``setup``."""
    by = {(w.size, w.kind): w for w in setup.workloads}
    return by[size, kind].rate / by[size, other].rate


def plot(setups: list[Setup], path: str) -> None:
    """Throughput ratios against concurrency: the short tasks (sticky / plain), then the
    state steps (sticky step / stateless task) for each network, one line per pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    pools = sorted({s.pool for s in setups})
    networks = [n for n in ("loopback", "remote") if any(s.network == n for s in setups)]
    sizes: list[int] = setups[0].args.sizes
    panels = 1 + (len(networks) if sizes else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 6.4), squeeze=False)
    styles = {"prefork": "-", "threads": "--"}

    def line(ax: Any, pool: str, network: str, pair: tuple[int, str, str], **style: Any) -> None:
        points = sorted(
            (s.concurrency, ratio(s, *pair))
            for s in setups
            if s.pool == pool and s.network == network
        )
        ax.plot([c for c, _ in points], [r for _, r in points], styles.get(pool, ":"), **style)

    short = axes[0][0]
    for pool in pools:
        for network in networks:
            for kind, marker in (("noop", "o"), ("bare", "^")):
                label = f"{pool}, Redis {network}, {LABELS[kind]}"
                line(short, pool, network, (SHORT, kind, "plain"), marker=marker, label=label)
    short.axhline(SHORT_TARGET, color="grey", linewidth=0.8, linestyle=":")
    short.set_title("short tasks: sticky / plain")
    short.set_ylabel("throughput ratio (tasks/s over tasks/s)")
    short.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    for ax, network in zip(axes[0][1:], networks, strict=False):
        for pool in pools:
            for size in sizes:
                for _, other in pairs(size):
                    label = f"{pool}, {size} MB, against {LABELS[other]}"
                    marker = "o" if other == "hash" else "s"
                    line(ax, pool, network, (size, "step", other), marker=marker, label=label)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"state steps, Redis {network}: sticky / stateless")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    for ax in axes[0]:
        ax.set_xlabel("concurrency of each worker")
        ax.set_xticks(sorted({s.concurrency for s in setups}))
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cleanup_redis(client: redis.Redis, prefix: str) -> None:
    """Delete the run's keys: every name holding the prefix (queues, leases, data)."""
    names: list[Any] = list(client.scan_iter(match=f"*{prefix}*", count=1000))
    for start in range(0, len(names), 500):
        client.delete(*names[start : start + 500])
    # kombu's shared unacked table: entries of this run's queues (none unless killed mid-batch).
    for tag, raw in client.hscan_iter("unacked"):
        with contextlib.suppress(TypeError, ValueError):
            _payload, exchange, routing_key = json.loads(raw)
            if prefix in f"{exchange} {routing_key}":
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)


@contextlib.contextmanager
def proxied(url: str, args: argparse.Namespace, run: Run) -> Iterator[None]:
    """The latency proxy in front of Redis when a setup needs it (sets ``run.remote_url``)."""
    if "remote" not in args.networks:
        yield
        return
    parts = urlsplit(url)
    with LatencyProxy(parts.hostname or "127.0.0.1", parts.port or 6379, args.delay) as proxy:
        run.remote_url = proxy.url(url)
        remote = redis.Redis.from_url(run.remote_url)
        try:
            run.rtt = calibrate_proxy(proxy, run.record, remote, args.delay)
        finally:
            remote.close()
        yield


def bench(url: str, args: argparse.Namespace, argv: list[str]) -> None:
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"sticky-e2e-{prefix}-"))
    run = Run(prefix, url, workdir, redis.Redis.from_url(url))
    log(f"run {prefix}, work dir {workdir}")
    setups: list[Setup] = []
    keep = args.keep_logs
    try:
        with proxied(url, args, run):
            for network in args.networks:
                for pool in args.pools:
                    for concurrency in args.concurrency:
                        setup = Setup(run, pool, concurrency, network, args)
                        try:
                            log(f"{setup.title}: starting {2 * args.workers} workers")
                            setup.start()
                            setup.prepare()
                            setup.warm_up()
                            setup.measure()
                        finally:
                            setup.kill()
                            shutil.rmtree(setup.state_dir, ignore_errors=True)
                        setups.append(setup)
    except BaseException:
        keep = True
        raise
    finally:
        for setup in setups:
            setup.kill()
        cleanup_redis(run.record, prefix)
        shutil.rmtree(workdir / "state", ignore_errors=True)
        if keep:
            log(f"worker logs kept in {workdir / 'logs'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(setups, run, args, argv)
    run.record.close()
    if args.plot:
        plot(setups, args.plot)
        log(f"plot written to {args.plot}")


def listed(
    convert: Callable[[str], Any], choices: tuple[str, ...] = ()
) -> Callable[[str], list[Any]]:
    """An argparse type: a comma-separated list of ``convert``-ed values (of ``choices``)."""

    def parse(value: str) -> list[Any]:
        try:
            found = [convert(part.strip()) for part in value.split(",") if part.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{value!r}: a comma-separated list") from None
        if not found:
            raise argparse.ArgumentTypeError(f"{value!r}: an empty list")
        wrong = [item for item in found if choices and item not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong}: choose among {', '.join(choices)}")
        return found

    return parse


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=positive(int), default=3, help="interleaved rounds")
    parser.add_argument(
        "--tasks", type=positive(int), default=3000, help="short tasks per workload and round"
    )
    parser.add_argument("--keys", type=positive(int), default=300, help="keys of the short tasks")
    parser.add_argument(
        "--workers", type=positive(int), default=3, help="workers of each kind (plain, sticky)"
    )
    parser.add_argument(
        "--concurrency", type=listed(positive(int)), default=[2], help="pool sizes, e.g. 1,2,4"
    )
    parser.add_argument(
        "--pools",
        type=listed(str, ("prefork", "threads")),
        default=["prefork", "threads"],
        help="worker pools",
    )
    parser.add_argument(
        "--networks",
        type=listed(str, ("loopback", "remote")),
        default=["loopback", "remote"],
        help="Redis on loopback, and/or behind the latency proxy",
    )
    parser.add_argument(
        "--delay-ms", type=positive(float), default=0.5, help="delay the proxy adds each way, ms"
    )
    parser.add_argument(
        "--sizes",
        type=listed(int),
        default=[1, 100],
        help="MB of state per key for the state steps; 0 for none",
    )
    parser.add_argument(
        "--state-tasks", type=positive(int), default=300, help="state steps per workload and round"
    )
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    args = parser.parse_args(argv)
    if any(size < 0 for size in args.sizes):
        parser.error("--sizes: MB of state, 0 or more")
    args.sizes = sorted({size for size in args.sizes if size > 0})
    args.delay = args.delay_ms / 1e3
    # A SIGTERM (``timeout``, a CI runner) unwinds like Ctrl-C: every worker is killed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return against_redis(DEFAULT_URL, lambda url: bench(url, args, argv))


if __name__ == "__main__":
    sys.exit(main())
