"""Failover and drain times of real ``celery worker`` subprocesses.

(1) Failover after ``kill -9``: for each ``sticky_lease_ttl`` in ``--ttls``, a
cluster of ``--workers`` prefork workers (``WorkerCluster``) runs a few keys per
repetition. The worker owning most of them (the victim) is busy with their tasks
(step 1 running for each of ``--queued`` keys, steps 2 and 3 queued behind it)
when it is killed with SIGKILL, pool children included, at a random moment of its
heartbeat cycle (0.2 s + up to ttl / 4 after step 1 started); the next task of another
key of the victim, idle until then, is published right after the kill. Measured
from the kill to the start of a task body on another worker (each task records
its start and node with an RPUSH to Redis): the first and the last of the queued
keys, and the key published after the kill, against the bound ``ttl + 2 s``.
Step 1's sleep ends at the kill, so its second run holds no pool slot and the
times are the failover's alone. Also checked: each key's final state (step 1,
killed mid-run, applied once), and that no key of a survivor moved. After each
repetition a fresh worker replaces the victim.

(2) Drain on SIGTERM: one worker fills ``--keys`` keys with ``--state-mb`` MB of
random bytes each, a second worker starts, the first gets SIGTERM. Measured from
the signal: the drain's own log line, the worker's exit, and the first task of a
drained key (published 0.2 s after the signal, so it waits in the draining
worker's queue) that runs on the second worker with its state. Then every key is
checked on the second worker: recovered, same size and SHA-256 as written.

    python benchmarks/failover.py [--ttls 2,5,10] [--reps 5] [--workers 3]
        [--concurrency 4] [--queued 4] [--hold 5] [--replication on_handoff]
        [--keys 1000] [--state-mb 1] [--drain-ttl 10] [--sample 10] [--drain-timeout 900]
        [--skip-failover] [--skip-drain] [--keep-logs]

``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/9``) is the broker, result
backend and lease store; when nothing answers there an embedded Redis is started.
Every run uses its own key and queue prefix and a temporary state directory;
Redis keys, results and state are deleted at the end (worker logs too, unless
``--keep-logs`` or an error). The exit status is 1 only when the benchmark itself
fails; bound violations and bad states are reported in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import celery
import redis
from celery.result import AsyncResult
from common import against_redis, app_module, log, positive

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster

DEFAULT_URL = "redis://127.0.0.1:6379/9"
HERE = Path(__file__).resolve().parent
SLACK = 2.0  # the bound: failover within sticky_lease_ttl + 2 s
DRAINED = re.compile(
    r"sticky: drained (\S+) in ([\d.]+) s: (\d+) key\(s\) handed over, (\d+) task\(s\) moved"
)
LOG_TIME = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")
REAPED = re.compile(r"sticky: moved (\d+) task\(s\) from dead worker (\S+)")


class Phase:
    """One cluster: its app (own prefix, TTL, state dir), workers, events and cleanup."""

    def __init__(
        self,
        prefix: str,
        url: str,
        workdir: Path,
        ttl: float,
        replication: str,
        concurrency: int,
    ) -> None:
        self.prefix = prefix
        self.url = url
        self.ttl = ttl
        self.replication = replication
        self.concurrency = concurrency
        self.state_dir = workdir / "state" / prefix
        env = {
            "FAILOVER_PREFIX": prefix,
            "FAILOVER_REDIS_URL": url,
            "FAILOVER_STATE_DIR": str(self.state_dir),
            "FAILOVER_LEASE_TTL": str(ttl),
            "FAILOVER_REPLICATION": replication,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
            ),
        }
        self.app = app_module().make_app(prefix, url, str(self.state_dir), ttl, replication)
        self.app.finalize()  # binds the sticky tasks, which installs the router
        self.step = self.app.tasks["failover_bench.step"]
        self.fill = self.app.tasks["failover_bench.fill"]
        self.check = self.app.tasks["failover_bench.check"]
        self.cluster = WorkerCluster(
            self.app, "failover_app:app", workdir / "logs" / prefix, env=env, cwd=str(HERE)
        )
        self.redis = redis.Redis.from_url(url)
        self.task_ids: list[str] = []
        self._names = (f"w{i}@{prefix}" for i in itertools.count(1))

    def start(self, count: int, timeout: float = 90.0) -> list[str]:
        """Start ``count`` new workers in parallel; wait until all registered."""
        names = [next(self._names) for _ in range(count)]
        for name in names:
            self.cluster.start(
                name,
                concurrency=self.concurrency,
                queues=[f"{self.prefix}.default"],
                wait=False,
            )
        self.cluster.wait_registered(names, timeout=timeout)
        return names

    def send(self, task: Any, *args: Any) -> AsyncResult:
        result: AsyncResult = task.delay(*args)
        self.task_ids.append(result.id)
        return result

    def wait(self, results: Iterable[AsyncResult], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        return [r.get(timeout=max(0.1, deadline - time.monotonic())) for r in results]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(f"{self.prefix}:events", 0, -1)]

    def owner(self, key: str) -> str:
        info = lease_store(self.app).lookup("key", key)
        if info is None:
            raise RuntimeError(f"key {key} has no owner")
        return info.owner

    def kill(self, name: str) -> float:
        """``kill -9`` a worker and its pool children; returns the time of the signal."""
        return self.cluster.kill(name)

    def log_of(self, name: str) -> str:
        return self.cluster.workers[name].log()

    def running(self) -> list[str]:
        return [name for name, worker in self.cluster.workers.items() if worker.running]

    def close(self) -> None:
        """Kill every worker still running, delete the run's Redis keys and state.

        Killed, not stopped: a warm stop would drain every key into Redis for nothing.
        """
        for name in self.running():
            with contextlib.suppress(Exception):
                self.kill(name)
        cleanup_redis(self.redis, self.prefix, self.task_ids)
        self.redis.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def cleanup_redis(client: redis.Redis, prefix: str, task_ids: list[str]) -> None:
    """Delete the run's keys (every name holding the prefix), results, unacked entries."""
    names: list[Any] = list(client.scan_iter(match=f"*{prefix}*", count=1000))
    names += [f"celery-task-meta-{task_id}" for task_id in task_ids]
    for start in range(0, len(names), 500):
        client.delete(*names[start : start + 500])
    # kombu's shared unacked table: entries of this run's queues (after a kill -9).
    for tag, raw in client.hscan_iter("unacked"):
        with contextlib.suppress(TypeError, ValueError):
            _payload, exchange, routing_key = json.loads(raw)
            if prefix in f"{exchange} {routing_key}":
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)


# -- (1) failover after kill -9 -------------------------------------------------------


@dataclass
class Failover:
    """One repetition: seconds from the kill to a task of the victim's keys elsewhere."""

    ttl: float
    victim: str
    queued: int
    first: float
    beat_age: float  # kill time - the victim's last heartbeat
    last: float
    after: float
    recovered: list[bool | None]
    healthy_moved: int
    bad_states: list[str]
    reaped: str

    @property
    def after_expiry(self) -> float:
        """From the moment the victim's heartbeat expired to the first moved task."""
        return self.first - (self.ttl - self.beat_age)

    @property
    def within(self) -> bool:
        return max(self.last, self.after) <= self.ttl + SLACK


def failover_once(phase: Phase, rep: int, args: argparse.Namespace) -> Failover:
    keys = [f"r{rep}-{i}" for i in range(args.workers * 5)]
    phase.wait([phase.send(phase.step, key, 0, 0.0) for key in keys], 60)
    owners = {key: phase.owner(key) for key in keys}
    victim = Counter(owners.values()).most_common(1)[0][0]
    mine = [key for key in keys if owners[key] == victim]
    if len(mine) < 2:
        raise RuntimeError(f"the victim {victim} owns only {mine}")
    after_key, queued = mine[-1], mine[:-1][: args.queued]
    healthy = [key for key in keys if owners[key] != victim]
    finals = []
    release = f"{phase.prefix}:release:{rep}"  # ends step 1's sleep once it moved
    # A crash comes at any moment of the heartbeat cycle: wait a random part of it.
    pause = random.uniform(0.2, 0.2 + phase.ttl / 4)
    for key in queued:
        phase.send(phase.step, key, 1, args.hold + pause, release)
        phase.send(phase.step, key, 2, 0.05)
        finals.append(phase.send(phase.step, key, 3, 0.05))
    # Kill while the victim runs step 1 of as many queued keys as it has pool slots.
    busy = min(len(queued), args.concurrency)
    deadline = time.monotonic() + 30
    while True:
        started = {
            e["key"]
            for e in phase.events()
            if e["node"] == victim and e.get("step") == 1 and e["key"] in queued
        }
        if len(started) >= busy:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{victim} started step 1 of only {sorted(started)}")
        time.sleep(0.02)
    time.sleep(pause)
    killed_at = phase.kill(victim)
    phase.redis.set(release, 1)
    # The victim's last heartbeat (Redis server time; same host clock): it is dead
    # for everyone from last beat + ttl on.
    last_beat = float(phase.redis.zscore(f"{phase.prefix}:workers", victim) or 0.0)
    finals.append(phase.send(phase.step, after_key, 1, 0.0))
    states = phase.wait(finals, phase.ttl + 60)
    # Step 0 survives the kill only in a replicated copy; step 1 (running at the kill)
    # must apply exactly once, on the new owner.
    kept = [0] if phase.replication == "sync" else []
    expected = [[*kept, 1, 2, 3]] * len(queued) + [[*kept, 1]]
    bad_states = [
        f"{key}: {got}"
        for key, got, want in zip([*queued, after_key], states, expected, strict=True)
        if got != want
    ]
    checks = [(key, phase.send(phase.step, key, 9, 0.0)) for key in healthy]
    phase.wait([result for _, result in checks], 30)
    events = phase.events()

    def moved_at(key: str) -> dict[str, Any]:
        runs = [
            e for e in events if e["task"] == "step" and e["key"] == key and e["start"] > killed_at
        ]
        first = min(runs, key=lambda e: e["start"])
        if first["node"] == victim:
            raise RuntimeError(f"{key} ran on the dead {victim} after the kill")
        return first

    delays = [moved_at(key)["start"] - killed_at for key in queued]
    after = moved_at(after_key)
    by_id = {e["id"]: e for e in events}
    healthy_moved = sum(by_id[result.id]["node"] != owners[key] for key, result in checks)
    reaped: list[str] = []
    deadline = time.monotonic() + 10  # the reaper logs after its second sweep
    while not reaped and time.monotonic() < deadline:
        reaped = [
            f"{name.split('@')[0]}: {m.group(1)}"
            for name in phase.running()
            for m in REAPED.finditer(phase.log_of(name))
            if m.group(2) == victim
        ]
        time.sleep(0.1)
    return Failover(
        ttl=phase.ttl,
        victim=victim,
        queued=len(queued),
        first=min(delays),
        beat_age=killed_at - last_beat,
        last=max(delays),
        after=after["start"] - killed_at,
        recovered=[moved_at(key).get("recovered") for key in [*queued, after_key]],
        healthy_moved=healthy_moved,
        bad_states=bad_states,
        reaped=", ".join(reaped) or "-",
    )


def bench_failover(url: str, workdir: Path, run: str, args: argparse.Namespace) -> list[Failover]:
    results: list[Failover] = []
    for ttl in args.ttls:
        phase = Phase(
            f"{run}t{ttl:g}".replace(".", "_"),
            url,
            workdir,
            ttl,
            args.replication,
            args.concurrency,
        )
        try:
            phase.start(args.workers)
            for rep in range(args.reps):
                outcome = failover_once(phase, rep, args)
                log(
                    f"ttl {ttl:g}: rep {rep + 1}/{args.reps}: first {outcome.first:.2f} s, "
                    f"last {outcome.last:.2f} s, published after kill {outcome.after:.2f} s"
                )
                results.append(outcome)
                phase.start(1)  # replace the victim
        finally:
            phase.close()
    return results


# -- (2) drain on SIGTERM ----------------------------------------------------------------


@dataclass
class Drain:
    """Timings of one drain, in seconds from the SIGTERM."""

    keys: int
    state_bytes: int
    fill_s: float
    disk_bytes: int
    drain_line: str
    logged_s: float | None
    handed_over: int | None
    moved: int | None
    exit_s: float
    exit_code: int | None
    first_s: float
    first_key: str
    last_sample_s: float
    sampled: int
    verify_s: float
    ok: int
    problems: list[str] = field(default_factory=list)
    handoff_peak_bytes: int = 0
    handoff_peak_keys: int = 0
    left_in_redis: int = 0
    drain_start_s: float | None = None


class HandoffWatch:
    """Samples, in a thread, how many hand-over copies of the run wait in Redis, and their bytes.

    (The server's ``used_memory`` is shared with other users; this counts the run's own
    ``<prefix>:copyv:*`` lists, with ``MEMORY USAGE``.)
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.pattern = f"{prefix}:copyv:*"
        self.peak_bytes = 0
        self.peak_keys = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        names = list(self.client.scan_iter(match=self.pattern, count=1000))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.memory_usage(name, samples=0)
        used = sum(int(n or 0) for n in pipe.execute()) if names else 0
        self.peak_bytes = max(self.peak_bytes, used)
        self.peak_keys = max(self.peak_keys, len(names))

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(redis.RedisError):
                self.sample()

    def __enter__(self) -> HandoffWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def spaced(items: list[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items``, first and last included."""
    if count >= len(items):
        return list(items)
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def bench_drain(url: str, workdir: Path, run: str, args: argparse.Namespace) -> Drain:
    size = int(args.state_mb * 2**20)
    phase = Phase(f"{run}d", url, workdir, args.drain_ttl, args.replication, args.concurrency)
    try:
        (first,) = phase.start(1)
        keys = [f"k{i:05d}" for i in range(args.keys)]
        log(f"drain: filling {len(keys)} key(s) with {args.state_mb:g} MB each on {first}")
        started = time.monotonic()
        fills = [phase.send(phase.fill, key, size) for key in keys]
        digests = dict(zip(keys, phase.wait(fills, 120 + 0.5 * len(keys)), strict=True))
        fill_s = time.monotonic() - started
        owners = Counter(phase.owner(key) for key in keys)
        if owners != Counter({first: len(keys)}):
            raise RuntimeError(f"keys not all on {first}: {owners}")
        disk = tree_bytes(phase.state_dir / first)
        (second,) = phase.start(1)
        sample = spaced(keys, args.sample)
        log(f"drain: SIGTERM to {first} ({disk / 2**20:.0f} MB of state on disk)")
        with HandoffWatch(phase.redis, phase.prefix) as copies:
            signalled = time.time()
            phase.cluster.signal(first, signal.SIGTERM)
            time.sleep(0.2)  # the worker marks itself draining; these wait in its queue
            probes = {key: phase.send(phase.check, key) for key in sample}
            process = phase.cluster.workers[first].process
            assert process is not None
            deadline = time.monotonic() + args.drain_timeout
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{first} did not exit {args.drain_timeout} s after SIGTERM")
                time.sleep(0.01)
            exit_s = time.time() - signalled
            log(f"drain: {first} exited after {exit_s:.1f} s; checking every key on {second}")
            probed = dict(zip(sample, phase.wait(probes.values(), 120), strict=True))
            started = time.monotonic()
            rest = [key for key in keys if key not in probes]
            checked = dict(
                zip(
                    rest,
                    phase.wait([phase.send(phase.check, key) for key in rest], 120 + len(rest)),
                    strict=True,
                )
            )
            verify_s = time.monotonic() - started
        problems = []
        # With replication off nothing is handed over: every key starts empty there.
        for key, result in {} if args.replication == "off" else {**probed, **checked}.items():
            expected = (second, True, size, digests[key], digests[key])
            got = (
                result["node"],
                result["recovered"],
                result["size"],
                result["sha"],
                result["stored_sha"],
            )
            if got != expected:
                problems.append(
                    f"{key}: node {got[0]}, recovered {got[1]}, {got[2]} byte(s), "
                    f"sha {'ok' if got[3] == digests[key] else 'WRONG'}"
                )
        first_key = min(probed, key=lambda key: probed[key]["start"])
        left = len(list(phase.redis.scan_iter(match=copies.pattern, count=1000)))
        text = phase.log_of(first)
        match = DRAINED.search(text)
        line = next((ln for ln in text.splitlines() if "sticky: drained" in ln), "(no line)")
        drain_start_s = None
        stamp = LOG_TIME.match(line)
        if match and stamp:
            logged_at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            drain_start_s = logged_at - float(match.group(2)) - signalled
        return Drain(
            keys=len(keys),
            state_bytes=size,
            fill_s=fill_s,
            disk_bytes=disk,
            drain_line=line.split("sticky: ", 1)[-1],
            logged_s=float(match.group(2)) if match else None,
            handed_over=int(match.group(3)) if match else None,
            moved=int(match.group(4)) if match else None,
            exit_s=exit_s,
            exit_code=process.returncode,
            first_s=probed[first_key]["start"] - signalled,
            first_key=first_key,
            last_sample_s=max(r["start"] for r in probed.values()) - signalled,
            sampled=len(probed),
            verify_s=verify_s,
            ok=len(keys) - len(problems),
            problems=problems,
            handoff_peak_bytes=copies.peak_bytes,
            handoff_peak_keys=copies.peak_keys,
            left_in_redis=left,
            drain_start_s=drain_start_s,
        )
    finally:
        phase.close()


# -- the report ------------------------------------------------------------------------


def report_failover(results: list[Failover], args: argparse.Namespace) -> None:
    print(
        f"(1) failover after kill -9: {args.workers} workers (prefork -c {args.concurrency}), "
        f"{args.reps} repetition(s) per TTL, sticky_state_replication={args.replication}"
    )
    print("    seconds from the kill to the first task body of a victim's key on another worker")
    print()
    print(
        f"{'ttl s':>5} {'bound s':>7} {'reps':>4} | {'first queued key':>16} | "
        f"{'last queued key':>15} | {'published after kill':>20} | {'in bound':>8} | "
        f"{'states ok':>9} | expiry -> first"
    )
    print(
        f"{'':>5} {'':>7} {'':>4} | {'median':>7} {'max':>8} | {'median':>7} {'max':>7} | "
        f"{'median':>9} {'max':>10} | {'':>8} | {'':>9} | {'median':>6} {'max':>6}"
    )
    for ttl in args.ttls:
        rows = [r for r in results if r.ttl == ttl]
        if not rows:
            continue

        def cols(values: list[float]) -> tuple[float, float]:
            return statistics.median(values), max(values)

        first, last, after, expiry = (
            cols([getattr(r, a) for r in rows]) for a in ("first", "last", "after", "after_expiry")
        )
        keys = sum(r.queued + 1 for r in rows)
        ok = keys - sum(len(r.bad_states) for r in rows)
        print(
            f"{ttl:>5g} {ttl + SLACK:>7g} {len(rows):>4} | {first[0]:>7.2f} {first[1]:>8.2f} | "
            f"{last[0]:>7.2f} {last[1]:>7.2f} | {after[0]:>9.2f} {after[1]:>10.2f} | "
            f"{sum(r.within for r in rows):>4}/{len(rows):<3} | {f'{ok}/{keys}':>9} | "
            f"{expiry[0]:>6.2f} {expiry[1]:>6.2f}"
        )
    print()
    print("    expiry -> first: from the victim's last heartbeat + ttl to the first moved task")
    print()
    print("    per repetition: victim; first / last queued key / key published after the kill (s);")
    print("    age of the victim's last heartbeat at the kill (s); recovered flag of each moved")
    print("    key's first task (T/F/-); survivors' keys that moved; tasks the reaper moved (by")
    print("    whom); keys whose final state is not as expected")
    for r in results:
        flags = "".join({True: "T", False: "F", None: "-"}[f] for f in r.recovered)
        print(
            f"    ttl {r.ttl:>4g}  {r.victim.split('@')[0]:<4} {r.first:5.2f} {r.last:5.2f} "
            f"{r.after:5.2f}  beat age {r.beat_age:4.2f}  recovered {flags:<6} "
            f"healthy moved {r.healthy_moved}  reaped by {r.reaped}  bad states {len(r.bad_states)}"
        )
        for bad in r.bad_states:
            print(f"        BAD STATE {bad}")
    expected = "[0, 1, 2, 3]" if args.replication == "sync" else "[1, 2, 3] (step 0 lost)"
    print(f"    expected final state of a queued key: {expected}")
    print()


def report_drain(d: Drain, args: argparse.Namespace) -> None:
    total = d.keys * d.state_bytes / 2**20
    print(
        f"(2) drain on SIGTERM: {d.keys} key(s) x {args.state_mb:g} MB = {total:.0f} MB of state, "
        f"sticky_lease_ttl={args.drain_ttl:g}, prefork -c {args.concurrency}, "
        f"sticky_state_replication={args.replication}"
    )
    print()
    rows = [
        ("fill (one task per key, 1 worker)", f"{d.fill_s:.1f} s", f"{total / d.fill_s:.0f} MB/s"),
        ("state on the draining worker's disk", f"{d.disk_bytes / 2**20:.0f} MB", ""),
        (
            "drain as logged by the worker",
            "-" if d.logged_s is None else f"{d.logged_s:.1f} s",
            "" if d.logged_s is None else f"{total / max(d.logged_s, 0.05):.0f} MB/s",
        ),
        (
            "SIGTERM -> drain start (from the log line's time)",
            "-" if d.drain_start_s is None else f"{d.drain_start_s:.2f} s",
            "Celery's warm shutdown before it",
        ),
        ("SIGTERM -> worker exit", f"{d.exit_s:.2f} s", f"exit code {d.exit_code}"),
        (
            "SIGTERM -> first drained key's task on the new worker",
            f"{d.first_s:.2f} s",
            f"key {d.first_key}",
        ),
        (
            f"SIGTERM -> last of the {d.sampled} sampled keys there",
            f"{d.last_sample_s:.2f} s",
            "",
        ),
        (
            f"then: next task of the other {d.keys - d.sampled} key(s)",
            f"{d.verify_s:.1f} s",
            f"{(d.keys - d.sampled) / max(d.verify_s, 1e-3):.0f} keys/s",
        ),
        (
            "keys with complete state on the new worker",
            "n/a" if args.replication == "off" else f"{d.ok}/{d.keys}",
            "recovered, size, sha" if args.replication != "off" else "replication off",
        ),
        (
            "hand-over copies in Redis, peak",
            f"{d.handoff_peak_bytes / 2**20:.0f} MB",
            f"{d.handoff_peak_keys} key(s); {d.left_in_redis} left after the checks"
            + (" (sync keeps each key's copy)" if args.replication == "sync" else ""),
        ),
    ]
    for label, value, note in rows:
        print(f"    {label:<55} {value:>10}  {note}")
    print(f"    worker log: {d.drain_line}")
    for problem in d.problems[:10]:
        print(f"    BAD STATE {problem}")
    if len(d.problems) > 10:
        print(f"    ... and {len(d.problems) - 10} more")
    print()


def bench(url: str, args: argparse.Namespace, argv: list[str]) -> None:
    run = f"fo{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix=f"sticky-failover-{run}-"))
    log(f"run {run}, work dir {workdir}")
    keep = args.keep_logs
    try:
        failovers = [] if args.skip_failover else bench_failover(url, workdir, run, args)
        drain = None if args.skip_drain else bench_drain(url, workdir, run, args)
    except BaseException:
        keep = True
        raise
    finally:
        shutil.rmtree(workdir / "state", ignore_errors=True)
        if keep:
            log(f"worker logs kept in {workdir / 'logs'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("celery-sticky failover benchmark")
    print(f"command: {shlex.join(['python', 'benchmarks/failover.py', *argv])}")
    print(
        f"Python {platform.python_version()}, Celery {celery.__version__}, "
        f"redis-py {redis.__version__}, Redis {url}, {os.cpu_count()} CPU(s), run prefix {run}"
    )
    print()
    if failovers:
        report_failover(failovers, args)
    if drain is not None:
        report_drain(drain, args)


def numbers(value: str) -> list[float]:
    try:
        found = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: comma-separated seconds, e.g. 2,5,10"
        ) from None
    if not found or min(found) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: TTLs are seconds greater than 0")
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--ttls", type=numbers, default=[2.0, 5.0, 10.0], help="sticky_lease_ttl values, s"
    )
    parser.add_argument("--reps", type=positive(int), default=5, help="kills per TTL")
    parser.add_argument("--workers", type=positive(int), default=3, help="workers in (1)")
    parser.add_argument("--concurrency", type=positive(int), default=4, help="pool processes")
    parser.add_argument("--queued", type=positive(int), default=4, help="busy keys of the victim")
    parser.add_argument(
        "--hold", type=positive(float), default=5.0, help="s step 1 runs on the victim (+ pause)"
    )
    parser.add_argument(
        "--replication",
        choices=("off", "on_handoff", "sync"),
        default="on_handoff",
        help="sticky_state_replication",
    )
    parser.add_argument("--keys", type=positive(int), default=1000, help="keys to drain in (2)")
    parser.add_argument("--state-mb", type=positive(float), default=1.0, help="MB of state per key")
    parser.add_argument(
        "--drain-ttl", type=positive(float), default=10.0, help="sticky_lease_ttl in (2), s"
    )
    parser.add_argument(
        "--sample", type=positive(int), default=10, help="keys with a task during the drain"
    )
    parser.add_argument(
        "--drain-timeout", type=positive(float), default=900.0, help="s from SIGTERM to exit"
    )
    parser.add_argument("--skip-failover", action="store_true", help="skip (1)")
    parser.add_argument("--skip-drain", action="store_true", help="skip (2)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs")
    args = parser.parse_args(argv)
    if args.workers < 2 and not args.skip_failover:
        parser.error("--workers: failover needs at least 2")
    return against_redis(DEFAULT_URL, lambda url: bench(url, args, argv))


if __name__ == "__main__":
    sys.exit(main())
