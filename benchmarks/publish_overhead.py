"""Publish overhead of a sticky task against a plain ``apply_async``.

Publishes a plain task and sticky tasks with the same signature, interleaved in
small batches in one process against a real Redis broker, and prints the median
cost of one publish of each case:

- owned key, lease cached: the key's owner is alive and the producer looked the
  lease up less than ``sticky_lease_cache_ttl`` ago (a key in active use). The
  target is at most 1.05x a plain publish.
- owned key, not cached: the same, but the producer asks the lease store first
  (a key published less often than once per ``sticky_lease_cache_ttl``).
- new key: the first publish of a key, which claims it for a live worker.

No worker consumes anything: a publish only needs the key's owner to be alive,
so the benchmark registers a worker node in the lease store itself and keeps
its heartbeat fresh. Every Redis key it writes carries a per-run prefix and is
deleted at the end.

    python benchmarks/publish_overhead.py [--rounds 100] [--batch 20] [--keys 10]

``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/14``) names the broker and
lease store; when nothing answers there an embedded Redis is started.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import celery
import kombu
import redis
from celery import Celery
from common import against_redis, positive

from celery_sticky import sticky_task
from celery_sticky.context import get_config, lease_store
from celery_sticky.lease import LeaseStore
from celery_sticky.placement import BUILTIN_POLICIES
from celery_sticky.producer.install import router_of
from celery_sticky.settings import StickyConfig
from celery_sticky.wire import HEADER

DEFAULT_URL = "redis://127.0.0.1:6379/14"
TARGET = 1.05
PAYLOAD = {"sku": "A-1001", "quantity": 3, "note": "x" * 64}


@dataclass(frozen=True)
class Run:
    """One benchmark run's names: everything it writes to Redis starts with ``prefix``."""

    prefix: str
    node: str

    @classmethod
    def new(cls) -> Run:
        prefix = f"bench-{uuid.uuid4().hex[:10]}"
        return cls(prefix=prefix, node=f"{prefix}@{socket.gethostname()}")

    @property
    def plain_queue(self) -> str:
        return f"{self.prefix}.plain"


class Heartbeat:
    """Keep a registered node alive in the lease store, as a worker's heartbeat does."""

    def __init__(self, store: LeaseStore, node: str, queue: str, interval: float) -> None:
        self.store = store
        self.node = node
        self.queue = queue
        self.interval = interval
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-heartbeat", daemon=True)

    def beat(self) -> None:
        self.store.heartbeat(self.node, 1, self.queue)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # surfaced by check() in the main thread
                self.error = exc
                return

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"heartbeat failed: {self.error}") from self.error

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)


def make_app(url: str, run: Run, placement: str) -> tuple[Celery, Any, Any]:
    """An app with a sticky task and an equivalent plain one, named for this run."""
    app = Celery("sticky-bench", broker=url, set_as_current=True)
    app.conf.update(
        task_default_queue=run.plain_queue,
        sticky_key_prefix=run.prefix,
        sticky_queue_prefix=run.prefix,
        sticky_placement=placement,
    )

    @sticky_task(key="order_id", name="bench.sticky_step")
    def sticky_step(order_id: str, payload: dict[str, Any]) -> None:
        """Never runs: the benchmark only publishes."""

    @app.task(name="bench.plain_step", shared=False)
    def plain_step(order_id: str, payload: dict[str, Any]) -> None:
        """Never runs: the benchmark only publishes."""

    app.finalize()
    return app, app.tasks["bench.sticky_step"], app.tasks["bench.plain_step"]


@dataclass
class Case:
    """One kind of publish, timed one call at a time."""

    label: str
    publish: Callable[[str], object]
    keys: Iterator[str]
    target: str = "(info)"
    #: Runs untimed before each publish.
    prepare: Callable[[str], object] | None = None
    samples: list[float] = field(default_factory=list)
    lookups: int = 0  # publishes that asked the lease store

    def measure(self, count: int) -> list[float]:
        clock = time.perf_counter
        samples = []
        for _ in range(count):
            key = next(self.keys)
            if self.prepare is not None:
                self.prepare(key)
            start = clock()
            self.publish(key)
            samples.append(clock() - start)
        return samples


class LookupCounter:
    """Counts the router's calls to the lease store (``claim`` and ``lookup``)."""

    def __init__(self, store: LeaseStore) -> None:
        self.count = 0
        for name in ("claim", "lookup"):
            setattr(store, name, self._counted(getattr(store, name)))

    def _counted(self, method: Callable[..., object]) -> Callable[..., object]:
        @functools.wraps(method)
        def counted(*args: object, **kwargs: object) -> object:
            self.count += 1
            return method(*args, **kwargs)

        return counted


def check_routing(
    url: str, workflow: str, plain: str, plain_count: int, direct: str, direct_count: int
) -> None:
    """Fail unless every publish reached the queue it should, sticky ones with a header."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        found = {plain: client.llen(plain), direct: client.llen(direct)}
        expected = {plain: plain_count, direct: direct_count}
        if found != expected:
            raise RuntimeError(f"messages per queue: expected {expected}, found {found}")
        headers = json.loads(client.lindex(direct, 0) or "{}").get("headers", {})
        found_workflow, _key, epoch, *_rest = headers.get(HEADER) or ("", "", 0, 0)
        if found_workflow != workflow or epoch <= 0:
            raise RuntimeError(f"no or a wrong sticky header: {headers.get(HEADER)!r}")
    finally:
        client.close()


def cleanup(url: str, run: Run, queues: list[str]) -> None:
    """Delete the run's queues (with their messages), bindings and lease store keys."""
    client = redis.Redis.from_url(url)
    try:
        # Each queue has its own exchange of the same name (kombu's binding tables).
        names: list[str | bytes] = []
        for queue in queues:
            names += [queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
            names += client.scan_iter(match=f"{queue}\x06\x16*")  # priority lists
        names += client.scan_iter(match=f"{run.prefix}:*")
        for start in range(0, len(names), 500):
            client.delete(*names[start : start + 500])
    finally:
        client.close()


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def bench(url: str, args: argparse.Namespace) -> None:
    rounds, batch, nkeys, warmup = args.rounds, args.batch, args.keys, args.warmup
    run = Run.new()
    app, sticky, plain = make_app(url, run, args.placement)
    config = get_config(app)
    store = lease_store(app)
    router = router_of(app)
    assert router is not None, "binding a sticky task installs the router"
    forget = router.forget
    workflow = sticky.sticky.workflow
    direct = config.direct_queue_name(run.node)
    try:
        with Heartbeat(store, run.node, direct, config.heartbeat_interval) as heartbeat:
            hot = [f"hot-{i}" for i in range(nkeys)]
            idle = [f"idle-{i}" for i in range(nkeys)]
            # A store whose data is new claims nothing for a second (claim.lua's grace).
            time.sleep(store.grace_left())
            for key in hot + idle:
                lease = store.claim(workflow, key, candidate=run.node)
                if lease.owner != run.node:
                    raise RuntimeError(f"could not pre-claim {key}: {lease}")
            counter = LookupCounter(store)
            cases = [
                Case(
                    "plain apply_async",
                    lambda key: plain.apply_async((key, PAYLOAD)),
                    itertools.cycle(hot),
                ),
                Case(
                    "owned key, lease cached",
                    lambda key: sticky.apply_async((key, PAYLOAD)),
                    itertools.cycle(hot),
                    target=f"<= {TARGET:.2f}x",
                ),
                # A key published less often than once per sticky_lease_cache_ttl.
                Case(
                    "owned key, not cached",
                    lambda key: sticky.apply_async((key, PAYLOAD)),
                    itertools.cycle(idle),
                    prepare=lambda key: forget(workflow, key),
                ),
                # least_loaded claims it for the bench node; first_come sends it to
                # the default queue, where the first worker to receive it claims it.
                Case(
                    "new key",
                    lambda key: sticky.apply_async((key, PAYLOAD)),
                    (f"new-{i}" for i in itertools.count()),
                ),
            ]
            # Warm up: connections, queue declarations, the router's lease cache.
            for case in cases:
                case.measure(warmup)
            order = list(cases)
            for _ in range(rounds):
                for case in order:
                    before = counter.count
                    case.samples += case.measure(batch)
                    case.lookups += counter.count - before
                order.reverse()  # no case always runs first
                heartbeat.check()
            for key in (hot[0], idle[0]):
                found = store.lookup(workflow, key)
                if found is None or found[0] != run.node or not found[2]:
                    raise RuntimeError(f"the bench node lost {key} during the run: {found}")
            published = warmup + rounds * batch
            claimed = 3 if config.placement == "least_loaded" else 2
            check_routing(
                url,
                workflow,
                run.plain_queue,
                (4 - claimed) * published,
                direct,
                claimed * published,
            )
    finally:
        store.deregister(run.node)
        cleanup(url, run, [run.plain_queue, direct])
    report(url, cases, args, config)


def report(url: str, cases: list[Case], args: argparse.Namespace, config: StickyConfig) -> None:
    print(
        f"celery-sticky publish overhead: {args.rounds} rounds x {args.batch} publishes per "
        f"case, {args.keys} owned keys per case, sticky_placement={config.placement}, "
        f"sticky_lease_cache_ttl={config.lease_cache_ttl:g}"
    )
    print(
        f"Python {platform.python_version()}, Celery {celery.__version__}, "
        f"kombu {kombu.__version__}, redis-py {redis.__version__}, broker {url}"
    )
    print()
    base, *rows = cases
    plain_us = median_us(base.samples)
    print(f"{'case':<24} {'plain µs':>9} {'sticky µs':>10} {'ratio':>7} {'lookups':>8}  target")
    for case in rows:
        sticky_us = median_us(case.samples)
        share = case.lookups / len(case.samples)
        print(
            f"{case.label:<24} {plain_us:>9.1f} {sticky_us:>10.1f} {sticky_us / plain_us:>6.2f}x"
            f" {share:>8.0%}  {case.target}"
        )
    print()
    print("lookups: share of publishes that asked the lease store in Redis")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive(int), default=100, help="interleaved rounds")
    parser.add_argument(
        "--batch", type=positive(int), default=20, help="publishes per case per round"
    )
    parser.add_argument("--keys", type=positive(int), default=10, help="owned keys per case")
    parser.add_argument(
        "--warmup", type=positive(int), default=200, help="untimed publishes per case"
    )
    parser.add_argument(
        "--placement", choices=BUILTIN_POLICIES, default="least_loaded", help="sticky_placement"
    )
    args = parser.parse_args(argv)
    return against_redis(DEFAULT_URL, lambda url: bench(url, args))


if __name__ == "__main__":
    sys.exit(main())
