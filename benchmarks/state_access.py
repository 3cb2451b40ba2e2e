"""Per-step cost of workflow state: a shared Redis store against local state.

One workflow step reads a little of a large state and changes a little of it.
This benchmark times that step, for states of 1, 10 and 100 MB, in five ways,
side by side in one process, interleaved round by round (medians, because the
machine it runs on may be shared and noisy):

(a) shared store: GET the whole pickled state (a dict of ~1 KB ``bytes``
    entries) from Redis, change one entry, SET it back. What a stateless
    Celery task does.
(b) Redis hash, one field per entry: HGET one field, HSET it (two round trips).
(c) this library: a new ``StateHandle`` with a new task id reads one entry,
    writes it and commits, exactly as a sticky task step does (the commit is a
    diskcache transaction that also writes the task's applied record).
(d) a large object of the state's size (a ``dict[str, int]``, slow to unpickle)
    committed earlier and unchanged, read through a new ``StateHandle``: the
    memory tier answers without unpickling.
(d0) the same read with the memory tier off (``sticky_memory_cache_bytes=0``).

(s) ``sync`` replication of a (c) step (``sticky_state_replication = "sync"``):
    after a one-entry commit, the time ``replicate()`` takes to bring the key's
    hand-over copy up to date. It appends the commit's change to the copy's log
    (one fenced Redis call).
(s0) the same, writing the whole copy as every sync commit did before the log
    (export the key, sign it, write it in chunks, switch it in).

(a), (b), (s) and (s0) are measured twice: against Redis on loopback, and through a
TCP proxy (started here, in a child process) that delays every chunk by 0.5 ms each
way, as a Redis on another machine would. (c), (d) and (d0) never touch Redis.
Each case also times its own step, so freeing the objects a step leaves behind
is not counted.

A whole sticky task does a little more around (c): ``StickyTask.__call__`` checks
the applied record and the epoch, asks Redis whether it still holds the lease
before committing, and looks for an outbox. The details section times that too,
on both networks.

Targets: (c) under 0.1 ms; (d) at least 300x faster than (a) at 100 MB; (c)
ahead of (b) once Redis is remote; (s) at most 1 ms on loopback at 100 MB. They
are reported, not enforced: the exit status is 1 only when the benchmark itself
fails. The details below the table say where (c)'s time goes (``--profile`` adds
a cProfile listing) and what sync replication sends.

    python benchmarks/state_access.py [--sizes 1,10,100] [--rounds 5] [--budget 0.1]
        [--entry-bytes 1000] [--delay-ms 0.5] [--profile]

``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) names the Redis;
when nothing answers there an embedded one is started. Every Redis key the
benchmark writes starts with a per-run prefix and is deleted at the end; local
state lives in a temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import itertools
import os
import pickle
import platform
import pstats
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import diskcache
import redis
from celery import Celery
from common import against_redis, calibrate_proxy, positive

from celery_sticky.context import StickyContext
from celery_sticky.handoff import LOG_FLOOR_BYTES
from celery_sticky.lease.store import LeaseStore
from celery_sticky.local.handle import StateHandle
from celery_sticky.local.node_state import Change, NodeState
from celery_sticky.settings import StickyConfig
from celery_sticky.testing.proxy import LatencyProxy
from celery_sticky.worker.execution import replicate

DEFAULT_URL = "redis://127.0.0.1:6379/15"
MB = 1_000_000
WORKFLOW = "bench"
BIG_FIELD = "big"
EPOCH = 1  # a task's lease epoch, from its message: every real step has one
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
C_TARGET = 100e-6  # seconds
D_TARGET = 300.0  # times faster than (a)
D_TARGET_SIZE = 100  # MB
S_TARGET = 1e-3  # seconds, loopback, at S_TARGET_SIZE
S_TARGET_SIZE = 100  # MB
NODE = "bench@state-access"  # the worker whose copies (s) and (s0) write
SECRET = "state-access-benchmark-secret"
clock = time.perf_counter

Step = Callable[[], float]  # runs one step, returns the seconds it took


# -- cases and rounds --------------------------------------------------------------


@dataclass
class Case:
    """One way of doing a step; ``network`` is "loopback", "remote" or "local" (no Redis)."""

    name: str
    label: str
    network: str
    step: Step
    batch: int = 1
    samples: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """Range of the per-round medians, relative to the median: the run's noise."""
        if len(self.round_medians) < 2:
            return 0.0
        return (max(self.round_medians) - min(self.round_medians)) / self.median

    def calibrate(self, budget: float, max_batch: int) -> None:
        """Warm up, and size the batch so one round of this case takes about ``budget``."""
        warm: list[float] = []
        deadline = clock() + budget
        while len(warm) < max_batch and (not warm or clock() < deadline):
            warm.append(self.step())
        typical = statistics.median(warm)
        self.batch = max(1, min(max_batch, round(budget / max(typical, 1e-9))))


def run_rounds(cases: list[Case], rounds: int) -> None:
    """Interleave the cases: each round runs a batch of each, in a rotated order."""
    for number in range(rounds):
        shift = number % len(cases)
        for case in cases[shift:] + cases[:shift]:
            samples = [case.step() for _ in range(case.batch)]
            case.samples += samples
            case.round_medians.append(statistics.median(samples))


# -- state for one size --------------------------------------------------------------


def make_config(url: str, state_dir: str, **settings: Any) -> StickyConfig:
    app = Celery("state-bench", broker=url, set_as_current=False)
    app.conf.update(sticky_state_dir=state_dir, **settings)
    return StickyConfig.from_app(app)


def make_state(size: int, entry_bytes: int, rng: random.Random) -> dict[str, bytes]:
    """A dict of ~``entry_bytes`` entries whose pickle is about ``size`` bytes."""
    count = max(1, size // (entry_bytes + 16))  # ~16 bytes of pickle framing per entry
    return {f"e{i:07d}": rng.randbytes(entry_bytes) for i in range(count)}


def make_big_object(size: int) -> dict[str, int]:
    """A ``dict[str, int]`` whose pickle is about ``size`` bytes: slow to unpickle."""
    per_entry = len(pickle.dumps({f"k{i:09d}": i * 7919 for i in range(10_000)})) / 10_000
    return {f"k{i:09d}": i * 7919 for i in range(int(size / per_entry))}


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux), to show what the memory tier holds."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()
    except OSError:
        return None


def field_order(fields: list[str], rng: random.Random) -> Iterator[str]:
    """Fields in a fixed random order, so each step touches a different entry."""
    order = rng.sample(fields, len(fields))
    return itertools.cycle(order)


class CountingCache:
    """Wraps a diskcache ``Cache`` and counts the operations a step makes."""

    COUNTED = ("get", "set", "delete", "pop", "transact")

    def __init__(self, cache: diskcache.Cache) -> None:
        self._cache = cache
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._cache, name)
        if name not in self.COUNTED:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted

    def __contains__(self, key: object) -> bool:
        self.calls["contains"] = self.calls.get("contains", 0) + 1
        return key in self._cache


@dataclass
class Breakdown:
    """Where the time of a (c) step goes, beyond its median."""

    fields: int
    index_bytes: int
    calls: dict[str, int]
    statements: list[str]
    encode_tuple: float
    encode_str: float
    get_tuple: float
    get_str: float
    profile: str = ""


def median_of(fn: Callable[[], object], count: int = 2000) -> float:
    samples = []
    for _ in range(count):
        start = clock()
        fn()
        samples.append(clock() - start)
    return statistics.median(samples)


class SizeRun:
    """Everything one state size needs: Redis data, local state, the cases."""

    def __init__(self, ctx: Context, size_mb: int) -> None:
        self.ctx = ctx
        self.size_mb = size_mb
        size = size_mb * MB
        rng = random.Random(size_mb)
        self.names = {
            "blob": f"{ctx.prefix}:{size_mb}:blob",
            "hash": f"{ctx.prefix}:{size_mb}:hash",
        }
        state = make_state(size, ctx.entry_bytes, rng)
        self.fields = list(state)
        self.new_values = [rng.randbytes(ctx.entry_bytes) for _ in range(16)]
        blob = pickle.dumps(state, protocol=PICKLE_PROTOCOL)
        self.state_bytes = len(blob)
        client = ctx.local
        client.set(self.names["blob"], blob)
        del blob
        with client.pipeline(transaction=False) as pipe:
            for start in range(0, len(self.fields), 1000):
                chunk: dict[Any, Any] = {n: state[n] for n in self.fields[start : start + 1000]}
                pipe.hset(self.names["hash"], mapping=chunk)
            pipe.execute()

        self.directory = os.path.join(ctx.tmp, f"node-{size_mb}")
        self.store = NodeState(self.directory, ctx.config)
        self.store_off = NodeState(self.directory, ctx.config_off)  # same data, no memory tier
        self.state_key = f"state-{size_mb}"
        self.small_key = f"small-{size_mb}"
        self.big_key = f"big-{size_mb}"
        # Reach the steady state first: past sticky_dedup_window applied records
        # every commit also trims the oldest one.
        for key in (self.state_key, self.small_key):
            for number in range(ctx.config.dedup_window + 10):
                handle = StateHandle(
                    self.store, WORKFLOW, key, task_id=f"warm-{number}", epoch=EPOCH
                )
                handle[self.fields[0]] = state[self.fields[0]]
                handle.commit()
        loader = StateHandle(self.store, WORKFLOW, self.state_key, task_id="load", epoch=EPOCH)
        loader.update(state)
        started = clock()
        loader.commit()
        self.load_seconds = clock() - started
        # (s) and (s0): the same state under a key of its own, with a copy, owned by NODE.
        self.sync_key = f"sync-{size_mb}"
        self.sync_epoch = ctx.lease_local.claim(WORKFLOW, self.sync_key, candidate=NODE).epoch
        loader = StateHandle(
            self.store, WORKFLOW, self.sync_key, task_id="load", epoch=self.sync_epoch
        )
        loader.update(state)
        loader.commit()
        del state, loader
        if not replicate(
            ctx.sync_local, self.store, WORKFLOW, self.sync_key, NODE, self.sync_epoch
        ):
            raise RuntimeError("(s) the first copy was refused")

        before = rss_bytes()
        big = make_big_object(size)
        after = rss_bytes()
        self.big_len = len(big)
        self.big_rss = None if before is None or after is None else after - before
        handle = StateHandle(self.store, WORKFLOW, self.big_key, task_id="load-big", epoch=EPOCH)
        handle[BIG_FIELD] = big
        handle.commit()
        self.big_bytes = len(self.store.export_key(WORKFLOW, self.big_key)["fields"][BIG_FIELD])
        self._big_id = id(big)
        del big, handle  # the memory tier keeps it

        self.cases = self._cases()
        self.detail = self._detail_cases()

    # -- steps -----------------------------------------------------------------------

    def _shared_step(self, client: redis.Redis) -> Step:
        fields, values = field_order(self.fields, random.Random(1)), self.new_values
        name = self.names["blob"]
        counter = itertools.count()

        def step() -> float:
            value = values[next(counter) % len(values)]
            start = clock()
            state = pickle.loads(cast(bytes, client.get(name)))
            state[next(fields)] = value
            client.set(name, pickle.dumps(state, protocol=PICKLE_PROTOCOL))
            return clock() - start

        return step

    def _hash_step(self, client: redis.Redis) -> Step:
        fields, values = field_order(self.fields, random.Random(2)), self.new_values
        name = self.names["hash"]
        counter = itertools.count()

        def step() -> float:
            entry, value = next(fields), values[next(counter) % len(values)]
            start = clock()
            client.hget(name, entry)
            client.hset(name, entry, value)
            return clock() - start

        return step

    def _handle_step(self, key: str, fields: list[str], read: bool, write: bool) -> Step:
        store, values = self.store, self.new_values
        order = field_order(fields, random.Random(3))
        counter = itertools.count()

        def step() -> float:
            task_id, entry = str(uuid.uuid4()), next(order)
            value = values[next(counter) % len(values)]
            start = clock()
            handle = StateHandle(store, WORKFLOW, key, task_id=task_id, epoch=EPOCH)
            if read:
                _ = handle[entry]
            if write:
                handle[entry] = value
                handle.commit()
            return clock() - start

        return step

    def _commit_only_step(self) -> Step:
        store, key = self.store, self.state_key

        def step() -> float:
            task_id = str(uuid.uuid4())
            start = clock()
            StateHandle(store, WORKFLOW, key, task_id=task_id, epoch=EPOCH).commit()
            return clock() - start

        return step

    def _task_step(self, lease: LeaseStore) -> Step:
        """(c) with what ``StickyTask.__call__`` adds around it today, Celery aside.

        Before the task body: was this task id applied already, does the local
        state belong to the message's epoch; after it: does this worker still hold
        the lease (a Redis round trip: the fence), commit, any outbox to send.
        """
        store, key, values = self.store, self.state_key, self.new_values
        order = field_order(self.fields, random.Random(4))
        counter = itertools.count()
        epoch_of = getattr(store, "epoch", None)  # stores that record the epoch

        def step() -> float:
            task_id, entry = str(uuid.uuid4()), next(order)
            value = values[next(counter) % len(values)]
            start = clock()
            store.applied(WORKFLOW, key, task_id)
            if epoch_of is not None:
                epoch_of(WORKFLOW, key)
            handle = StateHandle(store, WORKFLOW, key, task_id=task_id, epoch=EPOCH)
            _ = handle[entry]
            handle[entry] = value
            lease.lookup(WORKFLOW, key)
            handle.commit()
            store.outbox(WORKFLOW, key, task_id)
            return clock() - start

        return step

    def _sync_step(self, sync: StickyContext, whole: bool) -> Step:
        """A one-entry commit (untimed), then its replication: the change appended to
        the copy's log, or (``whole``) the whole key written as a new version."""
        store, key, epoch, values = self.store, self.sync_key, self.sync_epoch, self.new_values
        order = field_order(self.fields, random.Random(5))
        counter = itertools.count()

        def step() -> float:
            handle = StateHandle(store, WORKFLOW, key, task_id=str(uuid.uuid4()), epoch=epoch)
            handle[next(order)] = values[next(counter) % len(values)]
            change: Change | None = handle.commit()
            start = clock()
            done = replicate(sync, store, WORKFLOW, key, NODE, epoch, None if whole else change)
            elapsed = clock() - start
            if not done:
                raise RuntimeError(f"({'s0' if whole else 's'}) the copy was refused")
            return elapsed

        return step

    def _big_step(self, store: NodeState) -> Step:
        key = self.big_key

        def step() -> float:
            task_id = str(uuid.uuid4())
            start = clock()
            value = StateHandle(store, WORKFLOW, key, task_id=task_id, epoch=EPOCH)[BIG_FIELD]
            elapsed = clock() - start
            del value  # freeing a decoded copy is not part of the read
            return elapsed

        return step

    def _cases(self) -> list[Case]:
        ctx = self.ctx
        return [
            Case(
                "(a)",
                "shared store: GET, change one entry, SET",
                "loopback",
                self._shared_step(ctx.local),
            ),
            Case(
                "(a)",
                "shared store: GET, change one entry, SET",
                "remote",
                self._shared_step(ctx.remote),
            ),
            Case(
                "(b)", "Redis hash: HGET + HSET one field", "loopback", self._hash_step(ctx.local)
            ),
            Case("(b)", "Redis hash: HGET + HSET one field", "remote", self._hash_step(ctx.remote)),
            Case(
                "(c)",
                "handle: read + write one entry, commit",
                "local",
                self._handle_step(self.state_key, self.fields, read=True, write=True),
            ),
            Case("(d)", "handle: large object, memory tier", "local", self._big_step(self.store)),
            Case("(d0)", "handle: large object, tier off", "local", self._big_step(self.store_off)),
            Case(
                "(s)",
                "sync: the commit's change to the copy",
                "loopback",
                self._sync_step(ctx.sync_local, whole=False),
            ),
            Case(
                "(s)",
                "sync: the commit's change to the copy",
                "remote",
                self._sync_step(ctx.sync_remote, whole=False),
            ),
            Case(
                "(s0)",
                "sync, before: the whole copy rewritten",
                "loopback",
                self._sync_step(ctx.sync_local, whole=True),
            ),
            Case(
                "(s0)",
                "sync, before: the whole copy rewritten",
                "remote",
                self._sync_step(ctx.sync_remote, whole=True),
            ),
        ]

    def _detail_cases(self) -> list[Case]:
        key, fields = self.state_key, self.fields
        return [
            Case(
                "c.read",
                "new handle + read one entry",
                "local",
                self._handle_step(key, fields, True, False),
            ),
            Case(
                "c.write",
                "new handle + write one entry + commit",
                "local",
                self._handle_step(key, fields, False, True),
            ),
            Case("c.commit", "new handle + commit, no writes", "local", self._commit_only_step()),
            Case(
                "c.1field",
                "(c) on a key with 1 field",
                "local",
                self._handle_step(self.small_key, fields[:1], True, True),
            ),
            Case(
                "c.task",
                "(c) + task wrapper's checks, loopback Redis",
                "loopback",
                self._task_step(self.ctx.lease_local),
            ),
            Case(
                "c.task",
                "(c) + task wrapper's checks, remote Redis",
                "remote",
                self._task_step(self.ctx.lease_remote),
            ),
        ]

    # -- checks and analysis ---------------------------------------------------------

    def verify(self) -> None:
        """Fail unless every case did what it claims (so no case measured nothing)."""
        state = pickle.loads(cast(bytes, self.ctx.local.get(self.names["blob"])))
        if len(state) != len(self.fields):
            raise RuntimeError(f"(a) state has {len(state)} entries, expected {len(self.fields)}")
        del state
        if self.ctx.local.hlen(self.names["hash"]) != len(self.fields):
            raise RuntimeError("(b) hash lost entries")
        task_id = str(uuid.uuid4())
        handle = StateHandle(self.store, WORKFLOW, self.state_key, task_id=task_id, epoch=EPOCH)
        handle[self.fields[0]] = b"verify"
        handle.commit()
        if StateHandle(self.store, WORKFLOW, self.state_key)[self.fields[0]] != b"verify":
            raise RuntimeError("(c) a committed entry did not read back")
        if not self.store.applied(WORKFLOW, self.state_key, task_id)[0]:
            raise RuntimeError("(c) a commit left no applied record")
        if len(self.store.fields(WORKFLOW, self.state_key)) != len(self.fields):
            raise RuntimeError("(c) the key lost fields")
        big = StateHandle(self.store, WORKFLOW, self.big_key)[BIG_FIELD]
        if id(big) != self._big_id:
            raise RuntimeError("(d) the memory tier did not answer: the value was decoded again")
        del big
        decoded = StateHandle(self.store_off, WORKFLOW, self.big_key)[BIG_FIELD]
        if len(decoded) != self.big_len:
            raise RuntimeError("(d0) read back a different object")
        del decoded
        copy = self.ctx.sync_local.copies.fetch(WORKFLOW, self.sync_key)
        local = self.store.export_key(WORKFLOW, self.sync_key)
        if copy is None or local is None or copy.data["fields"] != local["fields"]:
            raise RuntimeError("(s) the copy does not hold the key's state")
        if copy.data["seq"] != local["seq"]:
            raise RuntimeError("(s) the copy does not reach the key's last commit")
        del copy, local

    def transfer_times(self) -> tuple[float, float]:
        """Median GET of the pickled state, loopback and through the proxy (for (a))."""
        name = self.names["blob"]
        return (
            median_of(lambda: self.ctx.local.get(name), 3),
            median_of(lambda: self.ctx.remote.get(name), 3),
        )

    def breakdown(self, profile: bool) -> Breakdown:
        """Count and price what a (c) step does in diskcache (untimed by the rounds)."""
        store, key = self.store, self.state_key
        counting = CountingCache(store.cache)
        store.cache = counting
        statements: list[str] = []
        connection = counting._cache._con  # the commit's SQL runs on it (local/rows.py)
        connection.set_trace_callback(statements.append)
        try:
            self._handle_step(key, self.fields, True, True)()
        finally:
            connection.set_trace_callback(None)
            store.cache = counting._cache
        cache = store.cache
        tuple_key = ("m", WORKFLOW, key, self.fields[0])
        str_key = "\x1f".join(tuple_key)
        cache.set(str_key, cache.get(tuple_key))
        try:
            result = Breakdown(
                fields=len(self.fields),
                index_bytes=len(pickle.dumps(store.fields(WORKFLOW, key), PICKLE_PROTOCOL)),
                calls=counting.calls,
                statements=statements,
                encode_tuple=median_of(lambda: cache.disk.put(tuple_key)),
                encode_str=median_of(lambda: cache.disk.put(str_key)),
                get_tuple=median_of(lambda: cache.get(tuple_key)),
                get_str=median_of(lambda: cache.get(str_key)),
            )
        finally:
            cache.delete(str_key)
        if profile:
            step = self._handle_step(key, self.fields, True, True)
            typical = next(case for case in self.cases if case.name == "(c)").median
            count = max(20, min(2000, round(2.0 / max(typical, 1e-6))))
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(count):
                step()
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(14)
            result.profile = f"{count} steps of (c) under cProfile:\n{out.getvalue()}"
        return result

    def sync_detail(self) -> tuple[int, int, int]:
        """``(bytes of a log entry, bytes of the version, commits a version takes)``: a
        version takes entries until its log reaches its budget; then one commit writes
        the whole copy (as (s0)) and the log starts over."""
        self._sync_step(self.ctx.sync_local, whole=True)()  # a fresh version, then
        self._sync_step(self.ctx.sync_local, whole=False)()  # one entry after it
        leases = self.ctx.sync_local.leases
        version, log = leases.copy_snapshot(WORKFLOW, self.sync_key)
        blob = self.ctx.sync_local.copies.blobs.read(version or "")
        if len(log) != 1 or blob is None:
            raise RuntimeError("(s) the step did not append one entry to a version")
        config = self.ctx.config
        budget = max(LOG_FLOOR_BYTES, config.replication_log_ratio * len(blob))
        per_version = min(config.replication_log_entries, int(budget // len(log[0])))
        return len(log[0]), len(blob), max(1, per_version)

    def close(self) -> None:
        self.store.close()
        self.store_off.close()
        self.store.memory.discard_key(self.directory, WORKFLOW, self.big_key)
        self.ctx.local.delete(*self.names.values())
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Context:
    """What every size shares: clients, configs, names."""

    url: str
    prefix: str
    tmp: str
    entry_bytes: int
    local: redis.Redis
    remote: redis.Redis
    config: StickyConfig
    config_off: StickyConfig
    lease_local: LeaseStore
    lease_remote: LeaseStore
    sync_local: StickyContext
    sync_remote: StickyContext


@dataclass
class SizeResult:
    size_mb: int
    sync_entry_bytes: int
    sync_version_bytes: int
    sync_per_version: int
    state_bytes: int
    entries: int
    big_bytes: int
    big_len: int
    big_rss: int | None
    load_seconds: float
    transfer: tuple[float, float]
    cases: list[Case]
    detail: list[Case]
    breakdown: Breakdown


# -- report ----------------------------------------------------------------------------


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2f}x"


def report_header(
    ctx: Context, args: argparse.Namespace, rtt: tuple[float, float], sleep: float
) -> None:
    server = ctx.local.info("server")
    print(
        f"celery-sticky state access: {args.rounds} interleaved rounds, ~{args.budget:g} s per "
        f"case per round, entries of {args.entry_bytes} bytes, {os.cpu_count()} CPUs"
    )
    print(
        f"Python {platform.python_version()}, diskcache {diskcache.__version__}, "
        f"redis-py {redis.__version__}, Redis {server.get('redis_version')} at {ctx.url}; "
        f"local state in {ctx.tmp}"
    )
    print(
        f"PING round trip: loopback {fmt(rtt[0])}, through the proxy {fmt(rtt[1])}: "
        f"+{fmt(rtt[1] - rtt[0])} (asked +{2 * args.delay_ms:g} ms; the proxy sleeps "
        f"{fmt(sleep)} each way, the rest is its own cost)"
    )


def report(results: list[SizeResult], args: argparse.Namespace) -> None:
    print()
    print("Medians per step; x(a) = how many times faster than (a) of the same size and network;")
    print("spread = range of the per-round medians relative to the median.")
    header = (
        f"{'state':>6}  {'case':<5} {'what':<42} {'loopback':>10} {'x(a)':>7} {'spread':>6}"
        f" {'+' + format(args.delay_ms, 'g') + ' ms/way':>11} {'x(a)':>7} {'spread':>6}"
    )
    print(header)
    print("-" * len(header))
    for res in results:
        by = {(c.name, c.network): c for c in res.cases}
        base = {net: by["(a)", net].median for net in ("loopback", "remote")}
        for number, name in enumerate(("(a)", "(b)", "(c)", "(d)", "(d0)", "(s)", "(s0)")):
            loop = by.get((name, "loopback")) or by[name, "local"]
            remote = by.get((name, "remote")) or by[name, "local"]
            size = f"{res.size_mb} MB" if number == 0 else ""
            print(
                f"{size:>6}  {name:<5} {loop.label:<42} {fmt(loop.median):>10}"
                f" {fmt_ratio(base['loopback'] / loop.median):>7} {loop.spread:>6.0%}"
                f" {fmt(remote.median):>11} {fmt_ratio(base['remote'] / remote.median):>7}"
                f" {remote.spread:>6.0%}"
            )
    print("(c), (d) and (d0) never touch Redis: one measurement, shown in both columns.")
    print("(s) and (s0) are what sync replication adds to a (c) step (the commit is not in them).")

    print()
    print("Targets")
    for res in results:
        by = {(c.name, c.network): c for c in res.cases}
        c, b_remote = by["(c)", "local"].median, by["(b)", "remote"].median
        verdict = "PASS" if c < C_TARGET else "FAIL"
        print(f"  {res.size_mb:>3} MB  (c) < {fmt(C_TARGET)}: {fmt(c)}  {verdict}")
        verdict = "PASS" if c < b_remote else "FAIL"
        print(
            f"  {res.size_mb:>3} MB  (c) ahead of remote (b): {fmt(c)} vs {fmt(b_remote)}"
            f" ({fmt_ratio(b_remote / c)})  {verdict}"
        )
        d = by["(d)", "local"].median
        for net in ("loopback", "remote"):
            ratio = by["(a)", net].median / d
            if res.size_mb == D_TARGET_SIZE:
                verdict = "PASS" if ratio >= D_TARGET else "FAIL"
            else:
                verdict = f"(target at {D_TARGET_SIZE} MB)"
            print(
                f"  {res.size_mb:>3} MB  (d) >= {D_TARGET:g}x faster than {net} (a):"
                f" {fmt_ratio(ratio)}  {verdict}"
            )
    if not any(res.size_mb == D_TARGET_SIZE for res in results):
        print(f"  (d) target not checked: run with {D_TARGET_SIZE} among --sizes")
    for res in results:
        sync = next(c for c in res.cases if c.name == "(s)" and c.network == "loopback").median
        if res.size_mb == S_TARGET_SIZE:
            verdict = "PASS" if sync <= S_TARGET else "FAIL"
        else:
            verdict = f"(target at {S_TARGET_SIZE} MB)"
        print(f"  {res.size_mb:>3} MB  (s) <= {fmt(S_TARGET)} on loopback: {fmt(sync)}  {verdict}")

    print()
    print("Details: where (c)'s time goes (medians, interleaved with the cases above), and more")
    for res in results:
        by_name = {case.name: case for case in res.detail}
        bd = res.breakdown
        c = next(case for case in res.cases if case.name == "(c)").median
        d, d0 = (next(x for x in res.cases if x.name == n).median for n in ("(d)", "(d0)"))
        calls = ", ".join(f"{name} {count}" for name, count in sorted(bd.calls.items()))
        print(
            f"  {res.size_mb} MB: {bd.fields} fields; the field index (rewritten only when"
            f" fields come or go) is {bd.index_bytes / 1e3:,.1f} kB pickled"
        )
        print(f"    {'(c) full step':<46} {fmt(c):>10}")
        for case in res.detail:
            print(f"    {case.label:<46} {fmt(case.median):>10}")
        floor = by_name["c.1field"].median
        print(
            f"    => {fmt(max(0.0, c - floor))} of (c) grows with the key's field count"
            f" ((c) minus the same step on a 1-field key)"
        )
        print(f"    diskcache calls per (c) step: {calls or 'none'}")
        # SQLite traces a trigger's run with its statement's text again: one statement
        # per run of the same text.
        run = [sql for i, sql in enumerate(bd.statements) if not i or sql != bd.statements[i - 1]]
        words = collections.Counter(" ".join(sql.split()[:2]) for sql in run)
        print(
            f"    SQLite statements per (c) step: {len(run)}"
            f" ({', '.join(f'{word} {n}' for word, n in sorted(words.items()))})"
        )
        print(
            f"    diskcache key encoding: tuple key {fmt(bd.encode_tuple)}, str key"
            f" {fmt(bd.encode_str)}; get: tuple key {fmt(bd.get_tuple)}, str key"
            f" {fmt(bd.get_str)}"
        )
        rss = "" if res.big_rss is None else f", about {res.big_rss / MB:,.0f} MB in memory"
        print(
            f"    memory tier: saves {fmt_ratio(d0 / d)} on (d); its {res.big_bytes / MB:.0f} MB"
            f" (pickled) object is a dict of {res.big_len:,} entries{rss}"
        )
        print(
            f"    loading the state ({res.entries:,} fields, one commit): {fmt(res.load_seconds)}"
        )
    print()
    print("Sync replication: what one one-entry commit sends, and what it costs over time")
    for res in results:
        by = {(c.name, c.network): c.median for c in res.cases}
        per_version = res.sync_per_version
        for net in ("loopback", "remote"):
            delta, whole = by["(s)", net], by["(s0)", net]
            amortized = delta + (whole - delta) / per_version
            print(
                f"  {res.size_mb:>3} MB, {net:<8}: (s) {fmt(delta)} against {fmt(whole)} for"
                f" the whole copy ({fmt_ratio(whole / delta)} less); with a whole copy every"
                f" {per_version:,} commits: {fmt(amortized)} a commit on average"
            )
        print(
            f"  {res.size_mb:>3} MB: a log entry is {res.sync_entry_bytes:,} bytes; the"
            f" version {res.sync_version_bytes / MB:,.1f} MB"
        )
    for res in results:
        if res.breakdown.profile:
            print()
            print(f"{res.size_mb} MB: {res.breakdown.profile}")


# -- main --------------------------------------------------------------------------------


def cleanup_redis(client: redis.Redis, prefix: str) -> None:
    names = list(client.scan_iter(match=f"{prefix}:*"))
    if names:
        client.delete(*names)


def bench(url: str, args: argparse.Namespace) -> None:
    parts = urlsplit(url)
    tmp = tempfile.mkdtemp(prefix="sticky-state-bench-")
    prefix = f"bench-state-{uuid.uuid4().hex[:10]}"
    results: list[SizeResult] = []
    try:
        with LatencyProxy(parts.hostname or "127.0.0.1", parts.port or 6379, args.delay) as proxy:
            remote_url = proxy.url(url)
            local, remote = redis.Redis.from_url(url), redis.Redis.from_url(remote_url)
            # A lease that outlives the run: (s) and (s0) write copies as NODE, which
            # never heartbeats again after it registers.
            sync_settings = {
                "sticky_key_prefix": prefix,
                "sticky_secret": SECRET,
                "sticky_lease_ttl": 86_400.0,
                "sticky_state_replication": "sync",
            }
            config = make_config(url, tmp, **sync_settings)
            sync_local = StickyContext(config)
            sync_remote = StickyContext(make_config(remote_url, tmp, **sync_settings))
            sync_local.leases.heartbeat(NODE, 1, "bench", register=True)
            # A store whose data is new claims nothing for a second (claim.lua's grace).
            time.sleep(sync_local.leases.grace_left())
            ctx = Context(
                url=url,
                prefix=prefix,
                tmp=tmp,
                entry_bytes=args.entry_bytes,
                local=local,
                remote=remote,
                config=config,
                config_off=make_config(url, tmp, sticky_memory_cache_bytes=0),
                lease_local=LeaseStore(config, redis.Redis.from_url(url, decode_responses=True)),
                lease_remote=LeaseStore(
                    config, redis.Redis.from_url(remote_url, decode_responses=True)
                ),
                sync_local=sync_local,
                sync_remote=sync_remote,
            )
            try:
                rtt = calibrate_proxy(proxy, local, remote, args.delay)
                report_header(ctx, args, rtt, proxy.delay)
                for size_mb in args.sizes:
                    print(f"... {size_mb} MB: preparing", file=sys.stderr, flush=True)
                    run = SizeRun(ctx, size_mb)
                    try:
                        cases = run.cases + run.detail
                        for case in cases:
                            case.calibrate(args.budget, args.max_batch)
                        print(f"... {size_mb} MB: measuring", file=sys.stderr, flush=True)
                        run_rounds(cases, args.rounds)
                        run.verify()
                        breakdown = run.breakdown(args.profile and size_mb == max(args.sizes))
                        entry_bytes, version_bytes, per_version = run.sync_detail()
                        results.append(
                            SizeResult(
                                size_mb=size_mb,
                                sync_entry_bytes=entry_bytes,
                                sync_version_bytes=version_bytes,
                                sync_per_version=per_version,
                                state_bytes=run.state_bytes,
                                entries=len(run.fields),
                                big_bytes=run.big_bytes,
                                big_len=run.big_len,
                                big_rss=run.big_rss,
                                load_seconds=run.load_seconds,
                                transfer=run.transfer_times(),
                                cases=run.cases,
                                detail=run.detail,
                                breakdown=breakdown,
                            )
                        )
                    finally:
                        run.close()
                        del run
                        gc.collect()
            finally:
                cleanup_redis(local, prefix)
                for client in (local, remote, ctx.lease_local.redis, ctx.lease_remote.redis):
                    client.close()
                for sync in (ctx.sync_local, ctx.sync_remote):
                    sync.leases.redis.close()
                    sync.leases.binary.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)


def sizes(value: str) -> list[int]:
    try:
        found = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: sizes are whole MB, e.g. 1,10,100") from None
    if not found or any(size <= 0 for size in found):
        raise argparse.ArgumentTypeError(f"{value!r}: sizes are whole MB greater than 0")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", type=sizes, default=[1, 10, 100], help="state sizes in MB")
    parser.add_argument("--rounds", type=positive(int), default=5, help="interleaved rounds")
    parser.add_argument(
        "--budget", type=positive(float), default=0.1, help="seconds per case per round"
    )
    parser.add_argument(
        "--max-batch", type=positive(int), default=300, help="most steps per case per round"
    )
    parser.add_argument(
        "--entry-bytes", type=positive(int), default=1000, help="size of one state entry"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.5, help="delay the proxy adds each way, in ms"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile (c) at the largest size")
    args = parser.parse_args(argv)
    args.delay = args.delay_ms / 1e3
    started = clock()
    if against_redis(DEFAULT_URL, lambda url: bench(url, args)):
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
    print(f"\ntotal run time {clock() - started:.0f} s, peak memory of this process {peak:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
