"""The router: send every task of an owned key to its owner's direct queue.

Runs wherever tasks are published: producers, and workers publishing chain steps
and chord bodies. It claims unowned keys at publish for the worker the placement
policy picks, and stamps each sticky message with the ``sticky`` header.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery import Celery
from kombu.entity import Exchange, Queue

from . import metrics
from .keys import KeySpec
from .lease import ClaimStatus, LeaseStore
from .message import StickyHeader
from .settings import StickyConfig, get_config

_CACHE_LIMIT = 100_000
_OUTCOMES = {
    ClaimStatus.OWNED: "owned",
    ClaimStatus.CLAIMED: "claimed",
    ClaimStatus.TAKEN_OVER: "claimed",
    ClaimStatus.PENDING: "pending",
}
# Label children bound once: the routing metric costs no lookup per publish.
_ROUTED = {
    o: metrics.routed.labels(o) for o in ("owned", "claimed", "pending", "unrouted", "fixed")
}


def direct_queue(name: str) -> Queue:
    """A worker's direct queue: durable, never auto-deleted, no ``expires``.

    (``Queue(expires=...)`` on Redis drops the list with its messages.)
    """
    exchange = Exchange(name, type="direct")  # type: ignore[no-untyped-call]
    queue: Queue = Queue(  # type: ignore[no-untyped-call]
        name, exchange, routing_key=name, durable=True, auto_delete=False
    )
    return queue


def ensure_queue(app: Celery, name: str) -> None:
    """Make ``name`` a known queue of the app, so publishing to it needs no lookup."""
    queues = app.amqp.queues
    if name not in queues:
        queues.add(direct_queue(name))


class StickyRouter:
    """A Celery router (``task_routes`` entry) for tasks made with ``@sticky_task``."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._config: StickyConfig | None = None
        # (workflow, key) -> (expires at, queue name, epoch); process-local.
        self._cache: dict[tuple[str, str], tuple[float, str, int]] = {}
        self._lock = threading.Lock()

    @property
    def config(self) -> StickyConfig:
        if self._config is None:
            self._config = get_config(self.app)
        return self._config

    @property
    def store(self) -> LeaseStore:
        from .app import lease_store

        return lease_store(self.app)

    def __call__(
        self,
        name: str,
        args: Any,
        kwargs: Any,
        options: dict[str, Any],
        task: Any = None,
        **kw: Any,
    ) -> dict[str, Any] | None:
        task = task if task is not None else self.app.tasks.get(name)
        spec = getattr(task, "sticky", None)
        if not isinstance(spec, KeySpec):
            return None
        workflow, key = spec.locate(args, kwargs, task_name=name)
        old = StickyHeader.from_headers(options.get("headers"))
        same = old is not None and (old.workflow, old.key) == (workflow, key)
        hops = old.hops if same and old is not None else 0
        if options.get("queue"):
            # A queue fixed by the caller or the task wins: the router stays out,
            # and the receiving worker still forwards to the owner if there is one.
            options["headers"] = StickyHeader(workflow, key, 0, hops, time.time_ns()).with_headers(
                options.get("headers")
            )
            _ROUTED["fixed"].inc()
            return None
        queue, epoch, outcome = self._route(workflow, key)
        _ROUTED[outcome].inc()
        # Celery merges the router's dict under the caller's options, so the header
        # goes into the options of this one publish (a fresh dict, never shared).
        options["headers"] = StickyHeader(workflow, key, epoch, hops, time.time_ns()).with_headers(
            options.get("headers")
        )
        if queue is None:
            return None
        return {"queue": queue}

    def _route(self, workflow: str, key: str) -> tuple[str | None, int, str]:
        """``(queue or None, epoch, outcome)``; outcome labels the routing metric."""
        now = time.monotonic()
        cached = self._cache.get((workflow, key))
        if cached is not None and cached[0] > now:
            return cached[1], cached[2], "owned"
        config = self.config
        store = self.store
        cacheable = True
        if config.placement == "first_come":
            found = store.lookup(workflow, key)
            if found is None or not found.alive:
                return None, 0, "unrouted"
            owner, epoch, outcome = found.owner, found.epoch, "owned"
        else:
            lease = store.claim(workflow, key)
            if lease.status is ClaimStatus.NO_LIVE_WORKER:
                return None, 0, "unrouted"
            owner, epoch = lease.owner, lease.epoch
            outcome = _OUTCOMES[lease.status]
            # A dead owner's queue is about to be moved on: send the task after
            # the ones already there (the reaper keeps their order), uncached.
            cacheable = lease.status is not ClaimStatus.PENDING
        queue = config.direct_queue_name(owner)
        ensure_queue(self.app, queue)
        if not cacheable:
            return queue, epoch, outcome
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[(workflow, key)] = (now + config.lease_cache_ttl, queue, epoch)
        return queue, epoch, outcome

    def forget(self, workflow: str, key: str) -> None:
        """Drop a cached lease (after a release), so the next publish asks Redis."""
        self._cache.pop((workflow, key), None)
