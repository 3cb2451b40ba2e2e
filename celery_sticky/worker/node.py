"""The worker node's view of ownership: registration, heartbeats, proofs.

A worker may run a key's task only while it can prove it owns the key. The first
proof is a claim-script round trip to the lease store. After it the node knows
the lease (:class:`KnownLeases`) until its own deadline, the earlier of two:
nobody can take a key from a live owner (the claim script takes over only from an
owner whose heartbeat the server has not seen for a whole ``sticky_lease_ttl``),
so a lease this node holds stays its own until ``TTL`` after its last heartbeat
the store acknowledged, measured on this node's monotonic clock from when that
heartbeat was *sent* (the leader-lease argument of Chubby and Raft's lease reads);
and a store that lost its data claims nothing for ``CLAIM_GRACE`` after its data
began again (claim.lua), so a lease stays its own until ``CLAIM_GRACE`` after the
last read of the store's born stamp that found it unchanged. The clocks may drift
apart by :data:`CLOCK_DRIFT` at most. What this node did not do itself can still
change a lease before that deadline, and each of those is seen locally:

- its workflow ended, or the key moved away (its ``end_workflow`` or ``move_key``
  task ran here, through the gate): the local state no longer carries the lease's
  epoch, so a known lease is used only while it does;
- a message carries a newer epoch (the router claimed the key again): that
  message is proven in the store;
- the node was reaped, superseded, or starts draining, or its heartbeat finds the
  store forgot it, or the born stamp changed: it forgets every lease; a heartbeat
  sent after the deadline had passed (a pause) renews nothing it knew;
- a task of the key was fenced, failed or retried: the gate forgets the key.

The same knowledge is the pool's fence before the local commit: the main process
writes the current chain of knowledge and its deadline to the node's lease clock
(:mod:`.lease_clock`), the gate gives each task the chain its proof was made in,
and the pool commits without asking the store while the clock still names that
chain before its deadline (:func:`.execution.known_here`). Every shared effect is
fenced where it lands besides.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from ..errors import ConfigurationError, LeaseStoreUnavailable
from ..lease import (
    CLAIM_GRACE,
    CLOCK_DRIFT,
    ClaimStatus,
    Heartbeat,
    Lease,
    LeaseStore,
    instance_token,
)
from ..local.node_state import NodeState, node_directory, open_node_state
from ..placement import decode_tags, encode_tags, fallback_policy, matches
from ..settings import StickyConfig
from .lease_clock import LeaseClock, lease_clock_path
from .supervise import backoff

#: Seconds between two reads of the lease store's born stamp (a quarter of the claim
#: grace: a few late reads still leave the known leases trusted).
BORN_CHECK_INTERVAL = CLAIM_GRACE / 4

logger = logging.getLogger(__name__)


class KnownLeases:
    """The leases this node proved, trusted without the store until :attr:`until`.

    Two things bound that trust, both measured on this node's monotonic clock from
    when a request was *sent* (the store saw it at or after then):

    - the heartbeat: once one sent at ``t`` is acknowledged, no other worker can
      take this node's keys before ``t + TTL`` (less :data:`CLOCK_DRIFT`);
    - the store's ``born`` stamp, read every :data:`BORN_CHECK_INTERVAL`: seen
      unchanged at ``t``, the store had not lost its data then, and a store that
      loses it later claims nothing for :data:`CLAIM_GRACE` after (claim.lua), so
      nobody is given a key this node knows before ``t + CLAIM_GRACE``.

    Knowledge comes in chains (:attr:`chain`, a random id): a heartbeat sent after
    the deadline had passed (a pause), a refused one, a changed stamp, a reap or a
    drain ends the chain, forgets every lease and starts a new one. Only a proof sent
    after the chain began is remembered. The node's pool processes read the chain and
    its deadline from the shared :class:`.lease_clock.LeaseClock`.
    """

    def __init__(self, ttl: float, clock: LeaseClock | None = None) -> None:
        self.ttl = ttl
        #: From the heartbeats.
        self.deadline = 0.0
        #: From the born stamp.
        self.verified_until = 0.0
        self.stamp: str | None = None
        self.enabled = True
        #: When the current chain began: a proof older than that may have been made
        #: before a pause, and is not remembered.
        self.since = 0.0
        self.chain = _chain_id()
        self.clock = clock
        self._leases: dict[tuple[str, str], int] = {}  # (workflow, key) -> epoch
        self._lock = threading.Lock()

    @property
    def until(self) -> float:
        """Until when (monotonic) every lease remembered in this chain holds."""
        return min(self.deadline, self.verified_until) if self.enabled else 0.0

    def _new_chain(self, since: float) -> None:
        self._leases.clear()
        self.since = since
        self.chain = _chain_id()

    def _publish(self) -> None:
        if self.clock is not None:
            self.clock.write(self.chain, self.until)

    def renewed(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` (monotonic) was acknowledged.

        Sent after the deadline had passed (the process was paused, or heartbeats
        failed), it extends nothing that was known: the store may have counted this
        node dead meanwhile and given its keys to others, so each is proven again.
        """
        with self._lock:
            if sent_at >= self.deadline:
                self._new_chain(sent_at)
            self.deadline = max(self.deadline, sent_at + self.ttl * (1 - CLOCK_DRIFT))
            self._publish()

    def born_seen(self, stamp: str | None, sent_at: float) -> None:
        """The store's born stamp, as a read sent at ``sent_at`` found it.

        Changed (or first seen): the store may have lost leases this node knew, so
        the chain ends. Unchanged, or new and remembered from now: nobody is given a
        key before ``sent_at + CLAIM_GRACE``."""
        with self._lock:
            if stamp != self.stamp:
                self.stamp = stamp
                self._new_chain(max(self.since, sent_at))
                self.verified_until = 0.0
            if stamp is not None:
                grace = sent_at + CLAIM_GRACE * (1 - CLOCK_DRIFT)
                self.verified_until = max(self.verified_until, grace)
            self._publish()

    def get(self, workflow: str, key: str) -> int | None:
        """The epoch this node holds ``workflow:key`` under, if still known."""
        if time.monotonic() >= self.until:
            return None
        return self._leases.get((workflow, key))

    def chain_of(self, workflow: str, key: str, epoch: int) -> int:
        """The chain in which this node knows it holds ``workflow:key`` under
        ``epoch`` now, or 0 (the pool then asks the store)."""
        with self._lock:
            known = self._leases.get((workflow, key)) == epoch
            return self.chain if known and time.monotonic() < self.until else 0

    def remember(self, workflow: str, key: str, epoch: int, proven_at: float) -> None:
        """``workflow:key`` is this node's under ``epoch``, as a claim sent at
        ``proven_at`` (monotonic) answered."""
        with self._lock:
            if self.enabled and proven_at >= self.since:
                self._leases[(workflow, key)] = epoch

    def forget(self, workflow: str, key: str) -> None:
        with self._lock:
            self._leases.pop((workflow, key), None)

    def clear(self, *, disable: bool = False) -> None:
        """Forget every lease (reaped, superseded); ``disable``: and learn none again
        (draining: every proof goes to the store)."""
        with self._lock:
            if disable:
                self.enabled = False
            self.deadline = 0.0
            self._new_chain(time.monotonic())
            self._publish()

    def __len__(self) -> int:
        return len(self._leases)


def _chain_id() -> int:
    """A new chain's id: random, never 0 (0 means none)."""
    return secrets.randbits(62) + 1


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
        self._watcher: threading.Thread | None = None
        self._registered = False
        #: This process's token in the registry: one process per node name.
        self.instance = instance_token()
        #: Reaped while paused: no proof succeeds until it registered again.
        self.rejoining = False
        #: Another process took this node's name while this one was away: this
        #: process must stop without touching the node's registry entry or queue.
        self.superseded = False
        #: Called (from the heartbeat thread) once this process is superseded.
        self.on_superseded: Callable[[], None] = lambda: None
        #: Leases proven here, known without the store until the heartbeat deadline.
        self.known = KnownLeases(config.lease_ttl)
        #: Called (from the heartbeat thread) while rejoining, before registering again.
        self.on_rejoin: Callable[[], None] = lambda: None

    @property
    def state(self) -> NodeState:
        """This node's local state, as this process opened it."""
        return open_node_state(self.config, self.name)

    # -- liveness --------------------------------------------------------------

    def beat(self, register: bool = False) -> None:
        """One heartbeat (or registration); acts on what the lease store answers."""
        sent_at = time.monotonic()
        reply = self._heartbeat(register)
        if reply.status == "taken" and _gone(reply.instance):
            # A crashed earlier process of this node on this host: its name is free.
            sent_at = time.monotonic()
            reply = self._heartbeat(register, force=True)
        if reply.status != "ok" or reply.forgotten:
            # Not (or no longer) this node's view: a lease it knew may be gone.
            self.known.clear()
        if reply.status == "taken":
            # Not this process's name: nothing it does on the way out (marking the
            # node draining, draining it, deregistering) may touch the other's.
            self.superseded = True
            raise NodeNameInUse(
                f"node name {self.name} is in use by another live worker process "
                f"({_describe(reply.instance)}): give this worker another name (-n), or "
                "stop the other one first"
            )
        if reply.status == "superseded":
            self._superseded(reply)
            return
        if reply.status == "reaped":
            self._rejoin()
            return
        self._registered = True
        if not self.rejoining and not reply.forgotten:
            self.known.renewed(sent_at)

    def _heartbeat(self, register: bool, force: bool = False) -> Heartbeat:
        return self.store.heartbeat(
            self.name,
            self.capacity,
            self.queue,
            register=register,
            tags=encode_tags(self.tags),
            max_keys=self.config.max_keys_per_worker,
            instance=self.instance,
            force=force,
        )

    def _rejoin(self) -> None:
        """Reaped while it was only paused: its queue was moved on and its keys may
        have been taken over. Drop the state of keys that moved, then register again
        (which clears the reaped mark); until then no proof succeeds here."""
        self.rejoining = True
        logger.warning(
            "sticky: %s was presumed dead (paused longer than sticky_lease_ttl) and its "
            "queue moved on; rejoining",
            self.name,
        )
        self.on_rejoin()
        reply = self._heartbeat(register=True)
        if reply.status == "superseded" or reply.status == "taken":
            self._superseded(reply)
            return
        self.rejoining = False
        self._registered = True
        logger.info("sticky: %s rejoined", self.name)

    def _superseded(self, reply: Heartbeat) -> None:
        if self.superseded:
            return
        self.superseded = True
        self._stop.set()
        logger.error(
            "sticky: another process took the node name %s (%s) while this one was away; "
            "this process stops without touching the node's keys or queue",
            self.name,
            _describe(reply.instance),
        )
        self.on_superseded()

    def start(self) -> None:
        self._open_clock()
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
        self._watcher = threading.Thread(
            target=self._born_loop, name="sticky-store-watch", daemon=True
        )
        self._watcher.start()

    def _open_clock(self) -> None:
        """The record the pool reads known leases from (see :mod:`.lease_clock`)."""
        directory = node_directory(self.config.state_dir, self.name)
        try:
            self.known.clock = LeaseClock(lease_clock_path(directory), create=True)
        except OSError as exc:
            logger.warning(
                "sticky: cannot share known leases with the pool through %s (%s); the pool "
                "asks the lease store before each commit",
                directory,
                exc,
            )

    def _born_loop(self) -> None:
        """Read the store's born stamp every BORN_CHECK_INTERVAL (see KnownLeases)."""
        while not self._stop.wait(BORN_CHECK_INTERVAL):
            sent_at = time.monotonic()
            try:
                stamp = self.store.born()
            except LeaseStoreUnavailable:
                continue  # unverified: known leases lapse after the grace
            self.known.born_seen(stamp, sent_at)

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self.known.clear(disable=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.config.heartbeat_interval + 1)
        if deregister and not self.superseded:
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
            except NodeNameInUse as exc:
                # The store did not answer at start; now that it does, the name is taken.
                logger.error("sticky: %s", exc)
                self.superseded = True
                self._stop.set()
                self.on_superseded()
            except Exception as exc:  # the thread lives as long as the worker
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning(
                        "sticky: heartbeat of %s failed (%d): %s", self.name, failures, exc
                    )
                delay = backoff(failures, 0.2, self.config.heartbeat_interval)

    # -- ownership -------------------------------------------------------------

    def prove(self, workflow: str, key: str, affinity: str = "", epoch: int = 0) -> Lease | None:
        """The key's lease, claimed for this node when nobody valid holds it.

        A lease this node knows (:class:`KnownLeases`) is answered without the store,
        unless the message carries a newer ``epoch`` than the known one.

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
        if self.rejoining or self.superseded:
            return None
        known = self.known.get(workflow, key)
        if known is not None and epoch <= known and self.state.epoch(workflow, key) == known:
            return Lease(self.name, known, ClaimStatus.OWNED)
        sent_at = time.monotonic()
        try:
            lease = self.store.claim(
                workflow, key, candidate=self.name, policy=self.fallback_policy, affinity=affinity
            )
        except LeaseStoreUnavailable as exc:
            logger.warning("sticky: cannot prove ownership of %s:%s: %s", workflow, key, exc)
            return None
        if lease.status is ClaimStatus.GRACE:
            return None  # the store's data is new: nothing is claimed for a moment
        if lease.status is ClaimStatus.NO_LIVE_WORKER:
            if affinity and not matches(decode_tags(affinity), self.tags):
                return lease
            return None
        if lease.owner == self.name and lease.status is ClaimStatus.PENDING:
            return None  # the registry counts this node dead: it must not run the key
        if lease.owner == self.name and lease.status in _HELD:
            self.known.remember(workflow, key, lease.epoch, sent_at)
        else:
            self.known.forget(workflow, key)
        # MOVING with this node as the owner: the key is on its way here while its
        # old owner runs what it has; the caller holds the task (and asks again soon).
        return lease


_HELD = (ClaimStatus.OWNED, ClaimStatus.CLAIMED, ClaimStatus.TAKEN_OVER)


class NodeNameInUse(ConfigurationError):
    """Another live worker process registered this node name."""


def _describe(instance: str) -> str:
    host, _, rest = instance.partition(":")
    pid = rest.partition(":")[0]
    return f"host {host}, pid {pid}" if pid else instance or "unknown process"


def _gone(instance: str) -> bool:
    """Whether ``instance`` was a process of this host that no longer runs."""
    host, _, rest = instance.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
