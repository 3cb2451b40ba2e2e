"""What the benchmark scripts share: an argument type, the Redis they run against,
a Redis made remote by a latency proxy, the worker app module, a progress log."""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

from celery_sticky.testing import redis_at
from celery_sticky.testing.proxy import LatencyProxy


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` greater than 0."""

    def convert(value: str) -> int | float:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value} is not greater than 0")
        return number

    return convert


def against_redis(default_url: str, bench: Callable[[str], None]) -> int:
    """Run ``bench(url)`` against ``BENCH_REDIS_URL`` (or an embedded Redis when none
    answers there); 0 when it ran, 1 (with the traceback printed) when it failed."""
    try:
        with redis_at(os.environ.get("BENCH_REDIS_URL", default_url)) as url:
            bench(url)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def ping_rtt(client: redis.Redis, count: int = 300) -> float:
    """The median PING round trip to ``client``'s Redis, in seconds."""
    client.ping()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def calibrate_proxy(
    proxy: LatencyProxy, local: redis.Redis, remote: redis.Redis, each_way: float
) -> tuple[float, float]:
    """Set the proxy's sleep so a round trip through it gains ``2 * each_way`` in all.

    Waking up for each delayed chunk and the extra loopback hops cost the proxy
    itself a few hundred µs per round trip on a busy VM; the sleep is shortened by
    that much. Returns the PING round trips, loopback and through the proxy.
    """
    sleep = each_way
    for _ in range(5):
        proxy.set_delay(sleep)
        direct, via = ping_rtt(local, 500), ping_rtt(remote, 500)
        excess = (via - direct) - 2 * each_way
        if abs(excess) < 0.05 * 2 * each_way:
            break
        sleep = min(each_way, max(0.0, sleep - excess / 2))
    proxy.set_delay(sleep)
    return ping_rtt(local, 500), ping_rtt(remote, 500)


def app_module() -> ModuleType:
    """``failover_app``, imported the way the workers import it (from this directory)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("failover_app")


def log(message: str) -> None:
    """A progress line on stderr (stdout holds the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
