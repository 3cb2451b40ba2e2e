"""Prometheus metrics (extra ``prometheus``); no-ops when prometheus_client is missing.

Counted in the process where things happen: a worker's main process counts
claims, take-overs, forwards, held duplicates, the gate's waits and the tasks its
reaper or drain moved, and serves them on ``sticky_metrics_port``; a producer
counts its own routing decisions in its own registry. Gauges (keys owned, gate
queue, local state bytes) are read when scraped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

prometheus_client: Any
try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # pragma: no cover - exercised where the extra is missing
    prometheus_client = None

PREFIX = "celery_sticky"


class _Nothing:
    """Stands in for a metric when prometheus_client is not installed."""

    def labels(self, *args: Any, **kwargs: Any) -> _Nothing:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    if prometheus_client is None:
        return _Nothing()
    return prometheus_client.Counter(f"{PREFIX}_{name}", doc, labels)


routed = _counter(
    "routed",
    "Sticky publishes by routing outcome (owned, claimed, pending, unrouted, fixed)",
    ("outcome",),
)
ownership_changes = _counter(
    "ownership_changes",
    "Ownership changes seen by this process (claimed, taken_over, handed_over, released, fenced)",
    ("kind",),
)
forwarded = _counter("forwarded", "Tasks forwarded to their key's owner")
duplicates = _counter("duplicates_dropped", "Copies of a task id dropped by the gate")
moved = _counter("tasks_moved", "Tasks moved from a dead or drained worker's queue")
dead_lettered = _counter(
    "dead_lettered",
    "Messages moved to the dead-letter queue, by where they were found (gate, reaper, drain)",
    ("where",),
)
store_errors = _counter(
    "lease_store_errors",
    "Lease store calls that failed (connection, timeout, OOM, READONLY, BUSY, LOADING), by kind",
    ("kind",),
)
gate_wait = (
    _Nothing()
    if prometheus_client is None
    else prometheus_client.Histogram(
        f"{PREFIX}_gate_wait_seconds",
        "Seconds a task waited behind its key in the gate before it started",
        buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, float("inf")),
    )
)


class _WorkerGauges:
    """Gauges of one worker, computed at scrape time."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        values = self.read()
        docs = {
            "keys_owned": "Keys this worker owns (its set in the lease store)",
            "gate_busy_keys": "Keys with a task running or waiting in the gate",
            "gate_waiting": "Tasks waiting behind their key in the gate",
            "state_bytes": "Bytes of local state on this worker's disk",
        }
        for name, doc in docs.items():
            if name in values:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=values[name])


def serve(port: int, address: str, read_gauges: Callable[[], dict[str, float]]) -> bool:
    """Start the exporter of this worker; False when prometheus_client is missing."""
    if prometheus_client is None:
        return False
    prometheus_client.REGISTRY.register(_WorkerGauges(read_gauges))
    prometheus_client.start_http_server(port, addr=address)
    return True


def directory_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (local state: the database and value files)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total
