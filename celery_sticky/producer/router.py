"""The router: send every task of an owned key to its owner's direct queue.

Runs wherever tasks are published: producers, and workers publishing chain steps
and chord bodies. It claims unowned keys at publish for the worker the placement
policy picks among those the key's affinity allows, and stamps each sticky
message with the ``sticky`` header, numbered in this process's sequence of the
key (:mod:`celery_sticky.sequence`). A key no live worker may hold goes to its
affinity's queue, where the first matching worker to come claims it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..context import RouteCache, context, get_config
from ..events import app_sender, ownership_changed
from ..keys import KeySpec
from ..lease import CLAIM_GRACE, ClaimStatus, Lease, LeaseStore
from ..placement import (
    AffinitySpec,
    Candidate,
    PlacementFunc,
    affinity_queue_name,
    decode_tags,
    eligible,
    matches,
    resolve_policy,
)
from ..sequence import Sequencer
from ..settings import StickyConfig
from ..wire import StickyHeader
from .queues import ensure_queue

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

_OUTCOMES = {
    ClaimStatus.OWNED: "owned",
    ClaimStatus.CLAIMED: "claimed",
    ClaimStatus.TAKEN_OVER: "claimed",
    ClaimStatus.PENDING: "pending",
    ClaimStatus.MOVING: "pending",
}
# Label children bound once: the routing metric costs no lookup per publish.
_ROUTED = {
    o: metrics.routed.labels(o)
    for o in ("owned", "claimed", "pending", "unrouted", "fixed", "affinity")
}
#: Seconds a producer reuses the worker list it gives a placement function, and
#: between two log lines about one affinity no live worker matches.
_CANDIDATES_TTL = 1.0
_WARN_EVERY = 60.0


class StickyRouter:
    """A Celery router (``task_routes`` entry) for tasks made with ``@sticky_task``."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._config: StickyConfig | None = None
        self._policy: str | PlacementFunc | None = None
        self._candidates: tuple[float, list[Candidate]] = (0.0, [])
        self._warned: dict[str, float] = {}  # affinity or "over_limit" -> when last logged

    @property
    def config(self) -> StickyConfig:
        if self._config is None:
            self._config = get_config(self.app)
        return self._config

    @property
    def policy(self) -> str | PlacementFunc:
        if self._policy is None:
            self._policy = resolve_policy(self.config.placement)
        return self._policy

    @property
    def store(self) -> LeaseStore:
        return context(self.app).leases

    @property
    def sequencer(self) -> Sequencer:
        """This process's per-key sequence counters."""
        return context(self.app).sequencer

    @property
    def cache(self) -> RouteCache:
        """This process's lease cache (shared with release and move, which forget keys)."""
        return context(self.app).routes

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
        affinity_spec: AffinitySpec | None = getattr(task, "sticky_affinity", None)
        affinity = affinity_spec.resolve(args, kwargs, task_name=name) if affinity_spec else ""
        old = StickyHeader.safe_from_headers(options.get("headers"))
        same = old is not None and (old.workflow, old.key) == (workflow, key)
        hops = old.hops if same and old is not None else 0
        if options.get("queue"):
            stream, seq = self._number(workflow, key, old if same else None)
            # A queue fixed by the caller or the task wins: the router stays out,
            # and the receiving worker still forwards to the owner if there is one.
            options["headers"] = StickyHeader(
                workflow, key, 0, hops, time.time_ns(), affinity, stream, seq
            ).with_headers(options.get("headers"))
            _ROUTED["fixed"].inc()
            return None
        queue, epoch, outcome = self._route(workflow, key, affinity, name)
        # Numbered once routed: a publish the lease store refused sends nothing, and
        # must leave no gap in the key's sequence.
        stream, seq = self._number(workflow, key, old if same else None)
        _ROUTED[outcome].inc()
        # Celery merges the router's dict under the caller's options, so the header
        # goes into the options of this one publish (a fresh dict, never shared).
        options["headers"] = StickyHeader(
            workflow, key, epoch, hops, time.time_ns(), affinity, stream, seq
        ).with_headers(options.get("headers"))
        if queue is None:
            return None
        return {"queue": queue}

    def _number(self, workflow: str, key: str, old: StickyHeader | None) -> tuple[str, int]:
        """The message's ``(stream, seq)`` in this process's sequence of the key."""
        if old is not None and old.seq:
            # The same message again (a retry, a fenced task sent on): it keeps its
            # place in its producer's sequence, so later ones wait for it.
            return old.stream, old.seq
        return self.sequencer.next(workflow, key)

    def _route(
        self, workflow: str, key: str, affinity: str = "", task_name: str = ""
    ) -> tuple[str | None, int, str]:
        """``(queue or None, epoch, outcome)``; outcome labels the routing metric."""
        now = time.monotonic()
        cached = self.cache.get(workflow, key, now)
        if cached is not None:
            return cached[0], cached[1], "owned"
        config = self.config
        lease = self._claim(workflow, key, affinity)
        if lease.status is ClaimStatus.GRACE:
            lease = self._claim_after_grace(workflow, key, affinity)
        if lease.status is ClaimStatus.GRACE:
            return None, 0, "unrouted"  # the worker that takes the task claims the key
        if lease.status in (ClaimStatus.NO_LIVE_WORKER, ClaimStatus.UNOWNED):
            if not affinity:
                return None, 0, "unrouted"  # the task's own queue; its worker claims it
            queue = affinity_queue_name(config.queue_prefix, affinity)
            ensure_queue(self.app, queue)
            if lease.status is ClaimStatus.NO_LIVE_WORKER:
                self._warn_unmatched(affinity, task_name, queue)
            return queue, 0, "affinity"
        if lease.over_limit:
            self._warn_once(
                "over_limit",
                "sticky: every worker that may hold %s:%s has sticky_max_keys_per_worker keys; "
                "placed on %s anyway",
                workflow,
                key,
                lease.owner,
            )
        queue = config.direct_queue_name(lease.owner)
        ensure_queue(self.app, queue)
        # A dead owner's queue about to move on, or a key moving on purpose: send
        # the task where the key's line is now, and ask again next time.
        if lease.status in (ClaimStatus.PENDING, ClaimStatus.MOVING):
            return queue, lease.epoch, _OUTCOMES[lease.status]
        outcome, epoch = _OUTCOMES[lease.status], lease.epoch
        self.cache.put(workflow, key, queue, epoch, now)
        if lease.status in (ClaimStatus.CLAIMED, ClaimStatus.TAKEN_OVER):
            self._announce(workflow, key, lease)
        return queue, epoch, outcome

    def _announce(self, workflow: str, key: str, lease: Lease) -> None:
        """One log line, and one Celery event when this app sends events, per claim made here.

        Only on a claim (once per key and owner), never on the owned-key path. The
        event goes out when the publishing app has task events on
        (``worker_send_task_events``, as ``celery worker -E`` sets in a worker, or
        ``task_send_sent_event``), through a dispatcher borrowed from the app's
        producer pool; a monitor that is down costs the log line nothing.
        """
        kind = "claimed" if lease.status is ClaimStatus.CLAIMED else "taken_over"
        with app_sender(self.app) as send:
            ownership_changed(
                kind,
                workflow,
                key,
                lease.epoch,
                lease.owner,
                previous=lease.previous or None,
                send=send,
            )

    def _claim_after_grace(self, workflow: str, key: str, affinity: str) -> Lease:
        """The claim again, until the store's claim grace is over (claim.lua: its data
        is new, as after it lost it; at most ``CLAIM_GRACE`` seconds, once per store)."""
        deadline = time.monotonic() + CLAIM_GRACE * 1.5
        while True:
            time.sleep(CLAIM_GRACE / 20)
            lease = self._claim(workflow, key, affinity)
            if lease.status is not ClaimStatus.GRACE or time.monotonic() > deadline:
                return lease

    def _claim(self, workflow: str, key: str, affinity: str) -> Lease:
        """The key's lease, claimed at publish as the placement policy says."""
        policy = self.policy
        store = self.store
        if isinstance(policy, str):
            # first_come claims at the worker that takes the task first.
            return store.claim(
                workflow,
                key,
                policy="none" if policy == "first_come" else policy,
                affinity=affinity,
            )
        lease = store.claim(workflow, key, policy="none", affinity=affinity)
        if lease.status is not ClaimStatus.UNOWNED:
            return lease
        candidates = eligible(self.candidates(), decode_tags(affinity))
        if not candidates:
            return store.claim(workflow, key, policy="least_loaded", affinity=affinity)
        try:
            choice = policy(workflow, key, candidates) or ""
        except Exception:
            logger.exception(
                "sticky: sticky_placement=%s failed for %s:%s; placing it on the least loaded "
                "worker",
                self.config.placement,
                workflow,
                key,
            )
            choice = ""
        if choice and choice not in {c.name for c in candidates}:
            logger.error(
                "sticky: sticky_placement=%s chose %r for %s:%s, which is not one of the "
                "candidates %s; placing it on the least loaded worker",
                self.config.placement,
                choice,
                workflow,
                key,
                sorted(c.name for c in candidates),
            )
            choice = ""
        # The script checks the choice again (alive, affinity) and falls back to
        # least_loaded if it may no longer take the key.
        return store.claim(workflow, key, choice, policy="least_loaded", affinity=affinity)

    def candidates(self) -> Sequence[Candidate]:
        """Live, non-draining workers as placement callables see them (cached briefly)."""
        now = time.monotonic()
        expires, cached = self._candidates
        if expires > now:
            return cached
        fresh = [
            Candidate(w.name, w.tags, w.capacity, w.keys, w.max_keys)
            for w in self.store.workers()
            if w.alive and not w.draining
        ]
        self._candidates = (now + _CANDIDATES_TTL, fresh)
        return fresh

    def _warn_unmatched(self, affinity: str, task_name: str, queue: str) -> None:
        required = decode_tags(affinity)
        if any(matches(required, tags) for tags in self.store.tagsets()):
            self._warn_once(
                affinity,
                "sticky: no live worker has the tags %s that %s requires; its tasks wait in "
                "queue %s",
                affinity,
                task_name,
                queue,
            )
        else:
            self._warn_once(
                affinity,
                "sticky: no worker has ever advertised the tags %s that %s requires "
                "(sticky_worker_tags, or celery worker --sticky-tag); its tasks wait in "
                "queue %s until one does",
                affinity,
                task_name,
                queue,
                level=logging.ERROR,
            )

    def _warn_once(
        self, topic: str, message: str, *args: Any, level: int = logging.WARNING
    ) -> None:
        now = time.monotonic()
        if now - self._warned.get(topic, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[topic] = now
            logger.log(level, message, *args)

    def forget(self, workflow: str, key: str) -> None:
        """Drop a cached lease (after a release), so the next publish asks Redis."""
        self.cache.forget(workflow, key)
