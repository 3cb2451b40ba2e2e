"""The lease store at scale: a million owned keys across ten workers.

Registers ten simulated worker nodes in the lease store (as a worker's heartbeat
does) and claims ``--keys`` keys for them through the store's own claim script,
pipelined, then measures:

- Redis memory per million leases: the sum of ``MEMORY USAGE`` over every key the
  lease store wrote (exact, this run's keys only), and the server's ``used_memory``
  growth (includes the keyspace's own tables; other clients of the server add noise);
- a heartbeat (heartbeat.lua) of a node as the keys pile up: the lowest of five
  medians of 100 (this machine's noise is in the spread);
- route time per publish (the router, in process, no broker publish) at 10, 10,000 and
  ``--keys`` distinct keys: every key is routed once (the router's lease cache sees that
  many distinct keys), and after every few of those one of 100 hot keys is routed and
  timed: its median and mean, and the share of hot publishes that asked Redis;
- ``celery sticky status --json`` with all the keys: the command's wall time (a new
  process: Python and Celery start-up included) and ``LeaseStore.workers()`` in process;
- reaping a dead worker holding a tenth of the keys with the worker's reaper
  (``reap()``; the worker deregistered, so dead at once): its first pass (the queue
  moved on, the worker marked reaped; its keys stay its own, for a restart with the
  same name and disk), then the pass that retires it ``RETIRE_AFTER`` later (the
  keys it still holds go to live workers, the worker is forgotten); when that pass
  leaves leases naming the forgotten worker, the time to take each over with one
  claim, pipelined, as their next tasks would do.

No worker process runs. Every Redis key it writes carries a per-run prefix and is
deleted at the end. The same script runs against an older checkout (``PYTHONPATH``
pointing there) to compare before and after.

    python benchmarks/scale.py [--keys 1000000] [--quick] [--plot PATH]

``--plot`` writes a PNG (needs matplotlib): the heartbeat and the route of a key in
use against the number of keys.

``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/10``) names the lease store
and broker; when nothing answers there an embedded Redis is started.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import celery
import redis
from celery import Celery
from common import against_redis, log, positive

from celery_sticky import sticky_task
from celery_sticky.context import context, lease_store
from celery_sticky.lease import LeaseStore
from celery_sticky.producer.install import router_of
from celery_sticky.worker.reaper import RETIRE_AFTER, reap

DEFAULT_URL = "redis://127.0.0.1:6379/10"
WORKERS = 10
WORKFLOW = "order_id"
HOT_KEYS = 100
HOT_ROUTES = 20_000
LEASE_TTL = 3600.0  # simulated workers stay alive without a heartbeat thread
APP_MODULE = """
import os
from celery import Celery
app = Celery("scale-status", broker=os.environ["SCALE_BENCH_URL"], set_as_current=True)
app.conf.update(
    sticky_key_prefix=os.environ["SCALE_BENCH_PREFIX"],
    sticky_queue_prefix=os.environ["SCALE_BENCH_PREFIX"],
    sticky_lease_ttl=float(os.environ["SCALE_BENCH_TTL"]),
)
"""


def make_app(url: str, prefix: str) -> tuple[Celery, Any]:
    app = Celery("scale-bench", broker=url, set_as_current=True)
    app.conf.update(
        sticky_key_prefix=prefix,
        sticky_queue_prefix=prefix,
        sticky_lease_ttl=LEASE_TTL,
        # Entries leave the router's cache only for room, never by age, in this run.
        sticky_lease_cache_ttl=LEASE_TTL,
        task_default_queue=f"{prefix}.default",
    )

    @sticky_task(key=WORKFLOW, name="bench.scale_step")
    def scale_step(order_id: str) -> None:
        """Never runs: the benchmark only routes."""

    app.finalize()
    return app, app.tasks["bench.scale_step"]


def claim_many(store: LeaseStore, items: Iterable[tuple[str, str]], chunk: int = 2000) -> int:
    """Claim ``(key, node)`` pairs through the store's claim script, ``chunk`` per pipeline.

    ``LeaseStore.claim`` builds each call as usual; its script call is queued on a
    pipeline instead of run (so the same code drives any version of the store)."""
    claimed = 0
    pipe: Any = None

    def queue(script: Any, keys: list[str], args: list[Any]) -> Any:
        script(keys=keys, args=args, client=pipe)
        return ("", "0", "1", "", "")

    def flush() -> int:
        statuses = [int(reply[2]) for reply in pipe.execute()]
        if any(status not in (0, 1, 2) for status in statuses):
            raise RuntimeError(f"claims failed: statuses {sorted(set(statuses))}")
        return len(statuses)

    try:
        store._call = queue  # type: ignore[method-assign]
        pipe = store.redis.pipeline(transaction=False)
        for n, (key, node) in enumerate(items, 1):
            store.claim(WORKFLOW, key, node)
            if n % chunk == 0:
                claimed += flush()
                pipe = store.redis.pipeline(transaction=False)
        claimed += flush()
    finally:
        del store._call  # type: ignore[method-assign]
    return claimed


class ClaimCounter:
    """Counts the store's claims (the router's lookups in Redis) until undone."""

    def __init__(self, store: LeaseStore) -> None:
        self.store = store
        self.count = 0
        claim = store.claim

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return claim(*args, **kwargs)

        store.claim = counting  # type: ignore[method-assign]

    def undo(self) -> None:
        del self.store.claim  # type: ignore[method-assign]


def count_owned_by(store: LeaseStore, keys: list[str], node: str) -> int:
    rows = store.lease_rows([(WORKFLOW, key) for key in keys])
    return sum(1 for owner, *_rest in rows if owner == node)


def run_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{prefix}:*", count=5000))


def memory_usage(client: redis.Redis, names: list[bytes]) -> int:
    total = 0
    for start in range(0, len(names), 5000):
        pipe = client.pipeline(transaction=False)
        for name in names[start : start + 5000]:
            pipe.memory_usage(name, samples=0)
        total += sum(int(size or 0) for size in pipe.execute())
    return total


def timed(call: Callable[[], object], times: int) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def beat_all(store: LeaseStore, nodes: list[str], prefix: str) -> None:
    for node in nodes:
        store.heartbeat(node, 1, f"{prefix}.{node}", register=True)


def bench(url: str, args: argparse.Namespace) -> None:
    nkeys = args.keys
    # For the plot: (number of keys, seconds) per measure.
    curves: dict[str, list[tuple[int, float]]] = {"heartbeat": [], "route": []}
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    app, task = make_app(url, prefix)
    store = lease_store(app)
    client = redis.Redis.from_url(url)
    nodes = [f"scale-w{i}@bench" for i in range(WORKERS)]
    rows: dict[str, list[tuple[str, str]]] = {}
    try:
        beat_all(store, nodes, prefix)
        # A store whose data is new claims nothing for a second (claim.lua's grace).
        time.sleep(store.grace_left())
        used_before = int(client.info("memory")["used_memory"])

        # -- fill, with heartbeats timed on the way ---------------------------------
        checkpoints = sorted({n for n in (0, 10_000, 100_000, 1_000_000, nkeys) if n <= nkeys})
        beats: list[tuple[str, str]] = []
        done = 0
        started = time.monotonic()
        for checkpoint in checkpoints:
            if checkpoint > done:
                claim_many(store, ((f"k{i}", nodes[i % WORKERS]) for i in range(done, checkpoint)))
                done = checkpoint
                log(f"claimed {done} keys ({time.monotonic() - started:.0f} s)")
            owned = store.owned_count(nodes[0])
            medians = [
                timed(lambda: store.heartbeat(nodes[0], 1, f"{prefix}.{nodes[0]}"), 100)
                for _ in range(5)
            ]
            curves["heartbeat"].append((checkpoint, min(medians)))
            beats.append(
                (
                    f"{checkpoint:,} keys ({owned:,} on the node)",
                    f"{min(medians) * 1e6:.0f} µs (medians {min(medians) * 1e6:.0f}-"
                    f"{max(medians) * 1e6:.0f})",
                )
            )
        rows["heartbeat (lowest of 5 medians of 100)"] = beats
        fill_s = time.monotonic() - started

        # -- memory ------------------------------------------------------------------
        names = run_keys(client, prefix)
        usage = memory_usage(client, names)
        used_after = int(client.info("memory")["used_memory"])
        per_million = 1e6 / nkeys / 2**20
        rows["Redis memory for leases"] = [
            ("MEMORY USAGE, every run key", f"{usage * per_million:.0f} MB per million"),
            (
                "used_memory growth",
                f"{(used_after - used_before) * per_million:.0f} MB per million",
            ),
            ("Redis keys written", f"{len(names):,} ({len(names) / nkeys:.3f} per lease)"),
            ("claims, pipelined", f"{nkeys / fill_s:,.0f} per s"),
        ]
        log("memory measured")

        # -- status ----------------------------------------------------------------
        beat_all(store, nodes, prefix)
        in_process = timed(store.workers, 20)
        with tempfile.TemporaryDirectory() as where:
            Path(where, "scale_status_app.py").write_text(APP_MODULE)
            env = {
                **os.environ,
                "SCALE_BENCH_URL": url,
                "SCALE_BENCH_PREFIX": prefix,
                "SCALE_BENCH_TTL": str(LEASE_TTL),
                "PYTHONPATH": os.pathsep.join(
                    [where, *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
            }
            command = [sys.executable, "-m", "celery", "-A", "scale_status_app"]
            walls = []
            for _ in range(3):
                start = time.perf_counter()
                done_status = subprocess.run(
                    [*command, "sticky", "status", "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                walls.append(time.perf_counter() - start)
                if done_status.returncode != 0:
                    raise RuntimeError(f"status failed: {done_status.stderr}")
            start = time.perf_counter()
            subprocess.run([*command, "--help"], env=env, capture_output=True, timeout=120)
            startup = time.perf_counter() - start
        total = sum(w.keys for w in store.workers())
        rows["celery sticky status"] = [
            ("command wall time, median of 3", f"{statistics.median(walls):.2f} s"),
            ("of which `celery --help` start-up", f"{startup:.2f} s"),
            ("LeaseStore.workers() in process", f"{in_process * 1e3:.1f} ms"),
            ("keys it reports", f"{total:,}"),
        ]
        log("status measured")

        # -- route -----------------------------------------------------------------
        router = router_of(app)
        assert router is not None
        routes = []
        for distinct in sorted({d for d in (10, 10_000, nkeys) if d <= nkeys}):
            cache = context(app).routes
            for pair in list(getattr(cache, "_entries", {})):
                cache.forget(*pair)
            hot = [
                f"k{i}"
                for i in random.Random(distinct).sample(range(distinct), min(HOT_KEYS, distinct))
            ]
            every = max(1, distinct // HOT_ROUTES)
            hot_times: list[float] = []
            cold_times: list[float] = []
            counter = ClaimCounter(store)
            lookups = 0
            try:
                for key in hot:  # the hot keys are in use before the stream starts
                    router(task.name, (key,), {}, {}, task=task)
                clock = time.perf_counter
                stream = list(range(distinct))
                random.Random(1).shuffle(stream)
                pick = random.Random(2)
                # Every distinct key routed once (the cache sees them all), one of the
                # hot keys after every few: how often they had to ask Redis again.
                for n in range(max(distinct, HOT_ROUTES)):
                    start = clock()
                    router(task.name, (f"k{stream[n % distinct]}",), {}, {}, task=task)
                    cold_times.append(clock() - start)
                    if n % every == 0:
                        before = counter.count
                        router(task.name, (hot[pick.randrange(len(hot))],), {}, {}, task=task)
                        lookups += counter.count - before
                hot_routes = (n // every) + 1
                # Then the hot keys alone, timed: a publish of a key in use.
                for key in hot:
                    router(task.name, (key,), {}, {}, task=task)
                for _ in range(HOT_ROUTES):
                    key = hot[pick.randrange(len(hot))]
                    start = clock()
                    router(task.name, (key,), {}, {}, task=task)
                    hot_times.append(clock() - start)
            finally:
                counter.undo()
            curves["route"].append((distinct, statistics.median(hot_times)))
            routes.append(
                (
                    f"{distinct:,} distinct keys",
                    f"hot {statistics.median(hot_times) * 1e6:.1f} µs median, "
                    f"{statistics.fmean(hot_times) * 1e6:.1f} µs mean, "
                    f"{lookups / hot_routes:.1%} asked Redis meanwhile; "
                    f"stream {statistics.fmean(cold_times) * 1e6:.0f} µs mean; "
                    f"cache {len(cache):,}",
                )
            )
            log(f"routes measured at {distinct} keys")
        rows["route per publish (router in process)"] = routes

        # -- reap --------------------------------------------------------------------
        victim = nodes[0]
        beat_all(store, nodes, prefix)
        held = store.owned_count(victim)
        victim_keys = [f"k{i}" for i in range(0, nkeys, WORKERS)]
        store.deregister(victim)  # dead now
        start = time.perf_counter()
        reap(app, store, victim)  # the first pass: its queue moved on, marked reaped
        reap_s = time.perf_counter() - start
        kept = count_owned_by(store, victim_keys, victim)
        start = time.perf_counter()
        reap(app, store, victim, reaped_at=store.server_time() - RETIRE_AFTER - 1)  # retired
        retire_s = time.perf_counter() - start
        stranded = [
            key
            for key, (owner, *_rest) in zip(
                victim_keys, store.lease_rows([(WORKFLOW, k) for k in victim_keys]), strict=True
            )
            if owner == victim
        ]
        lazy_s = 0.0
        if stranded:
            start = time.perf_counter()
            claim_many(store, ((key, "") for key in stranded))
            lazy_s = time.perf_counter() - start
        left = count_owned_by(store, victim_keys, victim)
        rows[f"reap a dead worker holding {held:,} keys"] = [
            ("reap(), first pass (queue moved, reaped)", f"{reap_s:.2f} s"),
            ("keys it keeps meanwhile (a restart keeps them)", f"{kept:,}"),
            (f"reap() once retired ({RETIRE_AFTER:g} s later)", f"{retire_s:.2f} s"),
            ("keys still naming it once it is forgotten", f"{len(stranded):,}"),
            (
                "then until each of them has a live owner",
                f"{lazy_s:.2f} s (one claim per key, pipelined)" if stranded else "0 (none left)",
            ),
            ("keys with the dead worker at the end", f"{left:,}"),
        ]
        log("reap measured")
    finally:
        cleanup(client, prefix)
        client.close()
    report(url, nkeys, rows)
    if args.plot:
        plot(curves, nkeys, args.plot)
        log(f"plot written to {args.plot}")


def cleanup(client: redis.Redis, prefix: str) -> None:
    names = run_keys(client, prefix)
    for pattern in (
        f"{prefix}.*",
        f"_kombu.binding.{prefix}*",
        f"_kombu.binding_permanent.{prefix}*",
    ):
        names += client.scan_iter(match=pattern, count=5000)
    for start in range(0, len(names), 1000):
        client.unlink(*names[start : start + 1000])


def report(url: str, nkeys: int, rows: dict[str, list[tuple[str, str]]]) -> None:
    import celery_sticky

    source = Path(celery_sticky.__file__).resolve().parent.parent
    print(f"celery-sticky at scale: {nkeys:,} owned keys across {WORKERS} simulated workers")
    print(
        f"Python {platform.python_version()}, Celery {celery.__version__}, "
        f"redis-py {redis.__version__}, Redis "
        f"{redis.Redis.from_url(url).info('server')['redis_version']} at {url}, "
        f"celery_sticky from {source}"
    )
    for title, lines in rows.items():
        print()
        print(title)
        width = max(len(label) for label, _ in lines)
        for label, value in lines:
            print(f"  {label:<{width}}  {value}")


def plot(curves: dict[str, list[tuple[int, float]]], nkeys: int, path: str) -> None:
    """The cost of a heartbeat and of routing a key in use, against the number of keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "heartbeat": "heartbeat of a node (lowest of 5 medians of 100)",
        "route": "route of a key in use (median), by distinct keys seen",
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in curves.items():
        points = [(count, seconds) for count, seconds in points if count > 0]  # log axis
        ax.plot(
            [count for count, _ in points],
            [seconds * 1e6 for _, seconds in points],
            marker="o",
            label=labels[name],
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"owned keys, of {nkeys:,} across {WORKERS} workers (route: distinct keys)")
    ax.set_ylabel("µs")
    ax.set_title("lease store: cost against the number of keys")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=textwrap.dedent(
            """targets (issue 16): leases <= 120 MB per million; heartbeat and route flat;
            status < 2 s; a dead worker with 100,000 keys reaped within the failover
            bound + 5 s"""
        ),
    )
    parser.add_argument(
        "--keys", type=positive(int), default=1_000_000, help="owned keys (default 1,000,000)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="20,000 keys: a check in well under a minute"
    )
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.keys = min(args.keys, 20_000)
    return against_redis(DEFAULT_URL, lambda url: bench(url, args))


if __name__ == "__main__":
    sys.exit(main())
