"""The worker node's view of ownership: registration, heartbeats, proofs.

A worker may run a key's task only while it can prove it owns the key. The proof
is one claim-script round trip to the lease store, made right before each task
of the key starts. It is not cached: a key can be released (its workflow ended,
or an operator released it) and claimed elsewhere while this worker still
remembers owning it, and a cached proof would then run a task in two places.
"""

from __future__ import annotations

import logging
import threading

from ..errors import LeaseStoreUnavailable
from ..lease import ClaimStatus, Lease, LeaseStore
from ..placement import decode_tags, encode_tags, fallback_policy, matches
from ..settings import StickyConfig

logger = logging.getLogger(__name__)


class StickyNode:
    """One worker's registration, heartbeat and ownership proofs."""

    def __init__(
        self,
        name: str,
        config: StickyConfig,
        store: LeaseStore,
        capacity: int,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.store = store
        self.capacity = capacity
        self.tags = dict(tags or {})
        self.queue = config.direct_queue_name(name)
        # Who takes a key this node may not (affinity, key limit).
        self.fallback_policy = fallback_policy(config.placement)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False

    # -- liveness --------------------------------------------------------------

    def beat(self, register: bool = False) -> None:
        self.store.heartbeat(
            self.name,
            self.capacity,
            self.queue,
            register=register,
            tags=encode_tags(self.tags),
            max_keys=self.config.max_keys_per_worker,
        )
        self._registered = True

    def start(self) -> None:
        try:
            self.beat(register=True)
            logger.info("sticky: %s registered, direct queue %s", self.name, self.queue)
        except LeaseStoreUnavailable as exc:
            logger.warning("sticky: %s; will keep trying to register", exc)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat_loop, name="sticky-heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.heartbeat_interval + 1)
        if deregister:
            try:
                self.store.deregister(self.name)
            except LeaseStoreUnavailable as exc:
                logger.warning("sticky: could not deregister %s: %s", self.name, exc)

    def _heartbeat_loop(self) -> None:
        delay = self.config.heartbeat_interval
        failures = 0
        while not self._stop.wait(delay):
            try:
                self.beat(register=not self._registered)
                if failures:
                    logger.info("sticky: lease store answers again; %s heartbeats", self.name)
                failures = 0
                delay = self.config.heartbeat_interval
            except LeaseStoreUnavailable as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning(
                        "sticky: heartbeat of %s failed (%d): %s", self.name, failures, exc
                    )
                delay = min(self.config.heartbeat_interval, 0.2 * 2**failures)

    # -- ownership -------------------------------------------------------------

    def prove(self, workflow: str, key: str, affinity: str = "") -> Lease | None:
        """The key's lease, claimed for this node when nobody valid holds it.

        When this node may not take the key (it lacks a tag of ``affinity``, or is
        at its key limit while another is not), the key is claimed for the worker
        the placement policy picks, and the caller forwards the task there. A
        ``NO_LIVE_WORKER`` lease means no live worker may hold the key and this
        node must not either: the caller parks the task in the affinity's queue.

        A ``MOVING`` lease naming this node: the key is being moved here; the
        caller holds the task until the move commits. Returns None when ownership
        cannot be proven now (the lease store does not answer, or this node is not
        registered alive); the caller waits and retries.
        """
        try:
            lease = self.store.claim(
                workflow, key, candidate=self.name, policy=self.fallback_policy, affinity=affinity
            )
        except LeaseStoreUnavailable as exc:
            logger.warning("sticky: cannot prove ownership of %s:%s: %s", workflow, key, exc)
            return None
        if lease.status is ClaimStatus.NO_LIVE_WORKER:
            if affinity and not matches(decode_tags(affinity), self.tags):
                return lease
            return None
        if lease.owner == self.name and lease.status is ClaimStatus.PENDING:
            return None  # the registry counts this node dead: it must not run the key
        # MOVING with this node as the owner: the key is on its way here while its
        # old owner runs what it has; the caller holds the task (and asks again soon).
        return lease
