"""How evenly each placement policy spreads new keys over workers of unequal capacity,
and how long moving a key on purpose takes.

Four real ``celery worker`` subprocesses (prefork, ``-c 1`` each, ``WorkerCluster``)
advertise capacities 1, 1, 2 and 4 (``--sticky-capacity``). For each repetition,
and within it each policy in turn (interleaved: rep 1 runs every policy, then rep
2, ...), a fresh producer app with that ``sticky_placement`` publishes ``--keys``
tasks (``failover_bench.touch``, stateless), one per new key, waits until every
one has run, and looks up each key's owner in the lease store. Then it releases
the batch's leases, so every batch starts from empty workers (``least_loaded``
depends on the current load).

Reported per policy (medians over the repetitions):

- keys per worker, and the load spread: ``max(load) / mean(load)`` with load =
  keys / capacity, mean over the 4 workers. 1.00 is ideal: every worker holds
  keys in proportion to its capacity.
- raw keys max / mean: what a policy blind to capacity evens out (1.00), against
  2.00 for keys in proportion to capacities 1, 1, 2, 4.
- publish time per key (``apply_async``, which claims the key at publish for
  every policy but ``first_come``).

Policies: ``least_loaded``, ``hash``, ``random``, ``first_come`` and
``two_choices`` (``placement_spread.two_choices``, defined here: the power of two
choices, the less loaded of two random candidates). The producer reuses the
candidate list it gives a placement callable for 1 s, so within a batch
``two_choices`` sees stale loads; that is measured as it is. Only the producer
imports the callable (the setting is checked when its config loads); the workers
run with the default policy and never publish.

The producer app has no result backend (so a publish does not also subscribe to
its result); the workers store results as usual and the benchmark reads them
from Redis: each task's status, and the node that ran it, which must be the
key's owner. A warm-up batch of 50 keys per policy, not reported, runs first.

Then ``--moves`` times, a key whose state holds ``--move-state-mb`` MB is made
on the capacity-1 worker, moved to the capacity-4 one (``move_key``), and its next
task (``failover_bench.check``) is published right after: the time from the move
call to that task's result, polled every 10 ms, is what a moved key waits (the
move task's turn on the owner, the export, the commit and the import; before
sequence numbers it also waited a countdown of ``sticky_lease_cache_ttl`` + 0.25 s).
The task must run on the target with the state intact (SHA-256).

    python benchmarks/placement_spread.py [--keys N] [--reps N] [--moves N]

``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) is the broker, result
store and lease store; when nothing answers there an embedded Redis is started.
The run uses its own key and queue prefix and a temporary directory; its Redis
keys, results, worker logs (kept on error) and state are deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celery
import redis
from celery import Celery
from common import against_redis, app_module, log, positive

from celery_sticky.context import lease_store
from celery_sticky.placement import Candidate
from celery_sticky.producer.admin import move_key
from celery_sticky.testing import WorkerCluster

DEFAULT_URL = "redis://127.0.0.1:6379/0"
HERE = Path(__file__).resolve().parent
CAPACITIES = (1, 1, 2, 4)
LEASE_TTL = 10.0  # generous: heartbeats on a busy 2-core machine must not lapse
WARMUP_KEYS = 50
#: (label, sticky_placement)
POLICIES = (
    ("least_loaded", "least_loaded"),
    ("hash", "hash"),
    ("random", "random"),
    ("first_come", "first_come"),
    ("two_choices", "placement_spread.two_choices"),
)


def two_choices(workflow: str, key: str, candidates: Sequence[Candidate]) -> str | None:
    """Power of two choices: the less loaded (keys / capacity) of two random candidates."""
    if not candidates:
        return None
    picked = random.sample(list(candidates), min(2, len(candidates)))
    return min(picked, key=lambda c: c.load).name


@dataclass
class Batch:
    """One policy's batch of new keys: where they went and how long publishing took."""

    policy: str
    keys: list[int]  # per worker, in CAPACITIES order
    publish_us: float  # per key
    failed: int  # tasks not SUCCESS
    elsewhere: int  # tasks that ran on a node other than the key's owner

    @property
    def spread(self) -> float:
        loads = [k / c for k, c in zip(self.keys, CAPACITIES, strict=True)]
        return max(loads) / statistics.fmean(loads)

    @property
    def raw(self) -> float:
        return max(self.keys) / statistics.fmean(self.keys)


class Cluster:
    """The run's workers and everything it writes (Redis keys, temp dirs)."""

    def __init__(self, url: str, prefix: str, workdir: Path) -> None:
        self.url = url
        self.prefix = prefix
        self.workdir = workdir
        self.state_dir = str(workdir / "state")
        self.redis = redis.Redis.from_url(url)
        self.app = self.producer("least_loaded")
        env = {
            "FAILOVER_PREFIX": prefix,
            "FAILOVER_REDIS_URL": url,
            "FAILOVER_STATE_DIR": self.state_dir,
            "FAILOVER_LEASE_TTL": str(LEASE_TTL),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
            ),
        }
        self.cluster = WorkerCluster(
            self.app, "failover_app:app", workdir / "logs", env=env, cwd=str(HERE)
        )
        self.names = [f"w{i}@{prefix}" for i in range(1, len(CAPACITIES) + 1)]
        self.task_ids: list[str] = []

    def producer(self, placement: str) -> Celery:
        """A producer app with ``sticky_placement=placement`` and no result backend."""
        app = app_module().make_app(self.prefix, self.url, self.state_dir, LEASE_TTL)
        app.conf.sticky_placement = placement
        app.conf.result_backend = None
        app.finalize()  # binds the sticky tasks, which installs the router
        return app

    def start(self) -> None:
        for name, capacity in zip(self.names, CAPACITIES, strict=True):
            self.cluster.start(
                name,
                concurrency=1,
                queues=[f"{self.prefix}.default"],
                args=["--sticky-capacity", str(capacity)],
                wait=False,
            )
        self.cluster.wait_registered(self.names, timeout=120)

    def check_empty(self) -> None:
        """Every worker alive and owning no key (the previous batch was released)."""
        workers = {w.name: w for w in lease_store(self.app).workers()}
        for name, capacity in zip(self.names, CAPACITIES, strict=True):
            info = workers.get(name)
            if info is None or not info.alive or info.draining:
                raise RuntimeError(f"worker {name} is not alive: {info}")
            if info.capacity != capacity or info.keys:
                raise RuntimeError(f"worker {name}: capacity {info.capacity}, {info.keys} keys")

    def batch(self, label: str, placement: str, keys: list[str]) -> Batch:
        self.check_empty()
        app = self.producer(placement)
        try:
            task = app.tasks["failover_bench.touch"]
            workflow = task.sticky.workflow
            started = time.perf_counter()
            ids = [task.apply_async((key,)).id for key in keys]
            publish_s = time.perf_counter() - started
            self.task_ids += ids
            results = self.wait(ids, timeout=60 + 0.05 * len(keys))
            store = lease_store(app)
            owners = []
            for key in keys:
                info = store.lookup(workflow, key)
                owners.append(info.owner if info is not None else "(none)")
            counts = Counter(owners)
            unknown = set(counts) - set(self.names)
            if unknown:
                raise RuntimeError(f"{label}: keys owned by {sorted(unknown)}: {counts}")
            failed = sum(r.get("status") != "SUCCESS" for r in results)
            elsewhere = sum(
                r.get("status") == "SUCCESS" and r.get("result") != owner
                for r, owner in zip(results, owners, strict=True)
            )
            for key in keys:
                store.release(workflow, key)
            self.redis.delete(*(f"celery-task-meta-{i}" for i in ids))
            return Batch(
                policy=label,
                keys=[counts[name] for name in self.names],
                publish_us=publish_s / len(keys) * 1e6,
                failed=failed,
                elsewhere=elsewhere,
            )
        finally:
            with contextlib.suppress(Exception):
                lease_store(app).redis.close()
            app.close()

    def move(self, key: str, size: int) -> float:
        """Seconds from ``move_key`` to the result of the key's next task, on the target."""
        source, target = self.names[0], self.names[-1]
        fill = self.app.tasks["failover_bench.fill"]
        check = self.app.tasks["failover_bench.check"]
        made = fill.apply_async((key, size), queue=f"{self.prefix}.{source}").id
        self.task_ids.append(made)
        sha = self.wait([made], timeout=60)[0]["result"]
        started = time.perf_counter()
        move_key("key", key, target, app=self.app)
        after = check.delay(key).id
        self.task_ids.append(after)
        result = self.wait([after], timeout=60, poll=0.01)[0]["result"]
        waited = time.perf_counter() - started
        if (result["node"], result["sha"], result["recovered"]) != (target, sha, True):
            raise RuntimeError(f"moved key {key}: {result} (wanted {target}, sha {sha})")
        lease_store(self.app).release("key", key)
        return waited

    def wait(self, ids: list[str], timeout: float, poll: float = 0.1) -> list[dict[str, Any]]:
        """Every task's stored result (as the worker wrote it), once all are there."""
        names = [f"celery-task-meta-{i}" for i in ids]
        deadline = time.monotonic() + timeout
        while True:
            done = sum(self.redis.exists(*names[s : s + 1000]) for s in range(0, len(names), 1000))
            if done == len(names):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {done} of {len(names)} tasks ran in {timeout:.0f} s")
            time.sleep(poll)
        raw = itertools.chain.from_iterable(
            self.redis.mget(names[s : s + 1000]) for s in range(0, len(names), 1000)
        )
        return [json.loads(r) for r in raw]

    def close(self) -> None:
        """Stop the workers (warm: they own no key), delete the run's Redis keys."""
        for name, worker in self.cluster.workers.items():
            if worker.running:
                self.cluster.signal(name, signal.SIGTERM)
        for name, worker in self.cluster.workers.items():
            assert worker.process is not None
            try:
                worker.process.wait(30)
            except subprocess.TimeoutExpired:
                self.cluster.kill(name)
        names: list[Any] = list(self.redis.scan_iter(match=f"*{self.prefix}*", count=1000))
        names += [f"celery-task-meta-{i}" for i in self.task_ids]
        for start in range(0, len(names), 500):
            self.redis.delete(*names[start : start + 500])
        with contextlib.suppress(Exception):
            lease_store(self.app).redis.close()
        self.app.close()
        self.redis.close()


def run_batches(cluster: Cluster, args: argparse.Namespace) -> list[Batch]:
    for label, placement in POLICIES:
        keys = [f"warm-{label}-{i}" for i in range(WARMUP_KEYS)]
        cluster.batch(label, placement, keys)
    log("warm-up done")
    batches: list[Batch] = []
    for rep in range(1, args.reps + 1):
        for label, placement in POLICIES:
            keys = [f"r{rep}-{label}-{i}" for i in range(args.keys)]
            batch = cluster.batch(label, placement, keys)
            batches.append(batch)
            log(
                f"rep {rep}/{args.reps} {label}: keys {batch.keys}, spread {batch.spread:.2f}, "
                f"{batch.publish_us:.0f} µs/key"
            )
    return batches


def run_moves(cluster: Cluster, args: argparse.Namespace) -> list[float]:
    size = int(args.move_state_mb * 2**20)
    waits = [cluster.move(f"move-{i}", size) for i in range(args.moves)]
    log(f"{args.moves} move(s): median {statistics.median(waits):.2f} s")
    return waits


def report_moves(waits: list[float], args: argparse.Namespace) -> None:
    print(
        f"moves: {len(waits)} key(s) with {args.move_state_mb:g} MB of state, capacity-1 worker "
        "to capacity-4 worker, sticky_lease_cache_ttl=1"
    )
    print(
        f"    move_key -> next task's result on the target: median {statistics.median(waits):.2f} s"
        f", min {min(waits):.2f} s, max {max(waits):.2f} s; every state arrived intact (SHA-256)"
    )
    print()


def report(batches: list[Batch], args: argparse.Namespace) -> None:
    caps = "/".join(str(c) for c in CAPACITIES)
    print(
        f"{len(CAPACITIES)} workers (prefork -c 1), capacities {caps}; {args.keys} new keys "
        f"per batch, {args.reps} rep(s), policies interleaved; medians over reps"
    )
    print()
    worker_cols = " ".join(f"{f'cap {c}':>5}" for c in CAPACITIES)
    header = (
        f"{'policy':<13}| {'keys per worker':^23} | {'load spread max/mean':^20} "
        f"| {'raw keys':^8} | {'publish':^7}"
    )
    print(header)
    print(
        f"{'':<13}| {worker_cols} | {'median':>6} {'(min-max)':>13} | {'max/mean':>8} "
        f"| {'µs/key':>7}"
    )
    print("-" * len(header))
    for label, _ in POLICIES:
        rows = [b for b in batches if b.policy == label]
        per_worker = " ".join(
            f"{statistics.median(b.keys[i] for b in rows):>5g}" for i in range(len(CAPACITIES))
        )
        spreads = [b.spread for b in rows]
        span = f"({min(spreads):.2f}-{max(spreads):.2f})"
        print(
            f"{label:<13}| {per_worker} | {statistics.median(spreads):>6.2f} {span:>13} "
            f"| {statistics.median(b.raw for b in rows):>8.2f} "
            f"| {statistics.median(b.publish_us for b in rows):>7.0f}"
        )
    total = sum(CAPACITIES)
    ideal = " ".join(f"{args.keys * c / total:>5g}" for c in CAPACITIES)
    print("-" * len(header))
    raw = max(CAPACITIES) / statistics.fmean(CAPACITIES)
    print(f"{'by capacity':<13}| {ideal} | {1:>6.2f} {'':>13} | {raw:>8.2f} |")
    print()
    rate = 1e6 / statistics.median(b.publish_us for b in batches if b.policy == "two_choices")
    print("    load = keys / capacity; spread 1.00: every worker as loaded as its capacity says")
    print("    raw keys max/mean: 1.00 when keys ignore capacity, 2.00 when proportional to it")
    print("    publish: apply_async, with the router's claim (lookup for first_come); workers busy")
    print(
        f"    two_choices sees loads refreshed once a second: every ~{rate:.0f} keys at this rate"
    )
    print()
    failed = sum(b.failed for b in batches)
    elsewhere = sum(b.elsewhere for b in batches)
    print(
        f"checks: every key owned by one of the workers; {failed} task(s) not SUCCESS, "
        f"{elsewhere} ran on a node other than the key's owner"
    )
    print()


def bench(url: str, args: argparse.Namespace, argv: list[str]) -> None:
    prefix = f"ps{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"sticky-placement-{prefix}-"))
    log(f"run {prefix}, work dir {workdir}")
    keep = False
    cluster = Cluster(url, prefix, workdir)
    try:
        server = cluster.redis.info("server").get("redis_version", "?")
        cluster.start()
        log("workers registered")
        batches = run_batches(cluster, args)
        waits = run_moves(cluster, args)
    except BaseException:
        keep = True
        raise
    finally:
        cluster.close()
        shutil.rmtree(workdir / "state", ignore_errors=True)
        if keep:
            log(f"worker logs kept in {workdir / 'logs'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("celery-sticky placement spread benchmark")
    print(f"command: {shlex.join(['python', 'benchmarks/placement_spread.py', *argv])}")
    print(
        f"Python {platform.python_version()}, Celery {celery.__version__}, "
        f"redis-py {redis.__version__}, Redis {server} at {url}, {os.cpu_count()} CPU(s), "
        f"run prefix {prefix}"
    )
    print()
    report(batches, args)
    report_moves(waits, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--keys", type=positive(int), default=2000, help="new keys per batch")
    parser.add_argument("--reps", type=positive(int), default=3, help="batches per policy")
    parser.add_argument("--moves", type=positive(int), default=10, help="keys moved, one by one")
    parser.add_argument(
        "--move-state-mb", type=positive(float), default=1.0, help="MB of state per moved key"
    )
    args = parser.parse_args(argv)
    return against_redis(DEFAULT_URL, lambda url: bench(url, args, argv))


if __name__ == "__main__":
    sys.exit(main())
