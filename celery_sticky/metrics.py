"""Prometheus metrics (extra ``prometheus``): counted and exported by workers only.

Every metric here is a no-op until :func:`enable` runs, which the worker's
``Sticky metrics`` step does (``sticky_metrics_port`` or ``celery worker
--sticky-metrics-port``) before the pool forks. So a process that only publishes,
or imports the app (Flower, a web server), neither counts nor exports anything
sticky, and ``import celery_sticky`` does not import prometheus_client.

Prefork: pool processes count what happens in them (releases, moves, fenced
tasks), and prometheus_client's multiprocess mode adds their counts up: each
process writes its values to a file in ``PROMETHEUS_MULTIPROC_DIR`` and the
exporter reads them all (:class:`prometheus_client.multiprocess.MultiProcessCollector`).
prometheus_client picks its mode once, when it is first imported, and any
``celery`` command imports it early when Flower is installed (Celery loads every
``celery.commands`` plugin). So :func:`enable` does not rely on the mode: it
makes these metrics' values multiprocess ones itself, in a private directory of
the worker (removed at its exit) unless ``PROMETHEUS_MULTIPROC_DIR`` is set, and
leaves every other metric of the process as it was.

Gauges (keys owned, gate queue, local state bytes) are read when scraped.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

PREFIX = "celery_sticky"


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _Child:
    """One labelled series; its ``inc``/``observe`` are the real ones once enabled."""

    inc: Callable[..., None] = staticmethod(_noop)
    observe: Callable[..., None] = staticmethod(_noop)

    def bind(self, real: Any) -> None:
        self.inc = getattr(real, "inc", _noop)
        self.observe = getattr(real, "observe", _noop)


class _Metric(_Child):
    """A metric declared at import and made real by :func:`enable`.

    ``labels(...)`` returns the same child every time, so callers may bind children
    once (the router does): after :func:`enable` a child's ``inc`` is prometheus
    client's own bound method, no indirection on the hot path.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        known: tuple[str, ...] = (),
        **kw: Any,
    ):
        self.kind, self.name, self.doc, self.labelnames, self.kw = kind, name, doc, labels, kw
        self.known = known  # label values made at enable(), before the pool forks
        self.real: Any = None
        self._children: dict[tuple[str, ...], _Child] = {}
        _DECLARED.append(self)

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Child()
            if self.real is not None:
                with _value_class():
                    child.bind(self.real.labels(*values))
        return child

    def make_real(self, client: Any, registry: Any) -> None:
        cls = getattr(client, self.kind)
        self.real = cls(
            f"{PREFIX}_{self.name}", self.doc, self.labelnames, registry=registry, **self.kw
        )
        if not self.labelnames:
            self.bind(self.real)
        for value in self.known:
            self.labels(value)
        for values, child in self._children.items():
            child.bind(self.real.labels(*values))


_DECLARED: list[_Metric] = []

routed = _Metric(
    "Counter",
    "routed",
    "Sticky publishes by routing outcome (owned, claimed, pending, unrouted, fixed, affinity)",
    ("outcome",),
    ("owned", "claimed", "pending", "unrouted", "fixed", "affinity"),
)
ownership_changes = _Metric(
    "Counter",
    "ownership_changes",
    "Ownership changes (claimed, taken_over, handed_over, released, fenced, moved)",
    ("kind",),
    ("claimed", "taken_over", "handed_over", "released", "fenced", "moved"),
)
forwarded = _Metric("Counter", "forwarded", "Tasks forwarded to their key's owner")
duplicates = _Metric("Counter", "duplicates_dropped", "Copies of a task id dropped by the gate")
moved = _Metric("Counter", "tasks_moved", "Tasks moved from a dead or drained worker's queue")
dead_lettered = _Metric(
    "Counter",
    "dead_lettered",
    "Messages moved to the dead-letter queue, by where they were found (gate, reaper, drain)",
    ("where",),
)
store_errors = _Metric(
    "Counter",
    "lease_store_errors",
    "Lease store calls that failed (connection, timeout, OOM, READONLY, BUSY, LOADING), by kind",
    ("kind",),
)
sequence_gaps = _Metric(
    "Counter",
    "sequence_gaps",
    "Times a key's owner went on without a missing message after sticky_gap_timeout",
)
gate_wait = _Metric(
    "Histogram",
    "gate_wait_seconds",
    "Seconds a task waited behind its key in the gate before it started",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, float("inf")),
)

#: What :func:`enable` set up: the multiprocess directory, whether this module made
#: it (and in which process), and the value class of these metrics.
_state: dict[str, Any] = {"directory": None, "owned_by": None, "value_class": None}


@contextlib.contextmanager
def _value_class() -> Iterator[None]:
    """Make prometheus_client build multiprocess values for the metrics made inside."""
    from prometheus_client import values

    saved = values.ValueClass
    values.ValueClass = _state["value_class"]
    try:
        yield
    finally:
        values.ValueClass = saved


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def enable() -> str:
    """Make these metrics count, in this process and the processes it forks from now on.

    Returns the multiprocess directory: ``PROMETHEUS_MULTIPROC_DIR`` when set, else a
    new private one (set in the environment, for the pool processes, and removed when
    this process exits). Raises ImportError without prometheus_client. Idempotent.
    """
    if _state["directory"] is not None:
        return str(_state["directory"])
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="celery-sticky-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        _state["owned_by"] = os.getpid()
        atexit.register(disable)
    import prometheus_client
    from prometheus_client import values

    current = values.ValueClass
    multiprocess = getattr(current, "_multiprocess", False)
    _state["value_class"] = current if multiprocess else values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _state["directory"] = directory
    registry = prometheus_client.CollectorRegistry(auto_describe=True)
    with _value_class():
        for metric in _DECLARED:
            metric.make_real(prometheus_client, registry)
    return directory


def disable() -> None:
    """Remove the multiprocess directory :func:`enable` made (at the worker's exit)."""
    directory = _state["directory"]
    if directory and _state["owned_by"] == os.getpid():
        shutil.rmtree(directory, ignore_errors=True)


class _WorkerGauges:
    """Gauges of one worker, computed at scrape time."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

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


def serve(port: int, address: str, read_gauges: Callable[[], dict[str, float]]) -> Any:
    """Start this worker's exporter (after :func:`enable`): the counters of all its
    processes (the multiprocess files) and the scrape-time gauges. Returns the
    registry it serves."""
    import prometheus_client
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = prometheus_client.CollectorRegistry()
    MultiProcessCollector(registry, path=_state["directory"])  # type: ignore[no-untyped-call]
    registry.register(_WorkerGauges(read_gauges))
    prometheus_client.start_http_server(port, addr=address, registry=registry)
    return registry


def directory_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (local state: the database and value files)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total
