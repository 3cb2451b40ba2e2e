"""The ``Sticky`` worker step: this node's direct queue, registration, heartbeat, gate, drain.

A worker step lives as long as the worker (consumer steps restart on every
broker reconnect). It builds the node's services before the consumer starts, so
the direct queue and the affinity queues are consumed from the start, and
drains the node once the pool has stopped (``worker_shutdown``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from celery import bootsteps
from celery.signals import worker_shutdown
from kombu.utils.functional import retry_over_time

from ...context import context
from ...errors import ConfigurationError, LeaseStoreUnavailable
from ...local.node_state import NodeState, check_node_directory, open_node_state, set_current_node
from ...placement import MAX_TAGS, affinity_queues, parse_tags
from ...producer.own_tasks import register_own_tasks
from ...producer.queues import broker_is_amqp
from ...settings import StickyConfig
from ...wire import direct_queue
from .. import control  # noqa: F401  (registers the remote control commands)
from ..delivery import restore_shared
from ..drain import drain_safely
from ..gate import KeyGate
from ..node import StickyNode
from ..outbox import send_pending
from ..reaper import restore_unacked
from ..supervise import supervise

logger = logging.getLogger(__name__)

#: Seconds a starting node keeps trying to take back its previous run's messages
#: (the broker away), and the longest wait between two tries.
RESTORE_TIMEOUT = 300.0
RESTORE_RETRY_MAX = 5.0


def confirm_publishes(app: Any) -> None:
    """On RabbitMQ, make this worker's publishes wait for the broker's confirmation.

    A worker publishes a copy, then acknowledges the original: a forward to a key's
    owner, a queue move, a dead letter; and it marks an outbox entry sent once
    published. Without publisher confirms, py-amqp's publish returns as soon as the
    frame is written to the socket; a connection cut right then loses the copy while
    the acknowledgement, on the consumer's connection, still reaches the broker (a
    step lost in the RabbitMQ nemesis runs). Redis answers each ``LPUSH`` itself.
    Set here, before the pool forks, so every connection of the worker has it
    (``broker_transport_options``: a ``confirm_publish`` the user set wins).
    """
    if not broker_is_amqp(app):
        return
    options = dict(app.conf.broker_transport_options or {})
    if "confirm_publish" not in options:
        options["confirm_publish"] = True
        app.conf.broker_transport_options = options


class StickyWorker(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consume this node's direct queue, register the node, heartbeat."""

    label = "Sticky"
    requires = ("celery.worker.components:Pool",)

    def __init__(
        self,
        worker: Any,
        sticky_tag: tuple[str, ...] = (),
        sticky_capacity: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(worker, **kwargs)
        app = worker.app
        ctx = context(app)
        config = ctx.config
        register_own_tasks(app)
        confirm_publishes(app)
        # Fail at start, not at the first task, when the state dir is unusable.
        self.state_directory = check_node_directory(config, worker.hostname)
        set_current_node(worker.hostname)  # before the pool forks: children inherit it
        capacity = sticky_capacity or config.worker_capacity or int(worker.concurrency or 1)
        tags = worker_tags(config, sticky_tag)
        self.node = StickyNode(worker.hostname, config, ctx.leases, capacity, tags)
        # A new store's claim grace (claim.lua) runs while this worker starts; if the
        # store does not answer, the registration stamps it once it does.
        with contextlib.suppress(LeaseStoreUnavailable):
            ctx.leases.stamp_born()
        self.node.on_rejoin = self._drop_stale_state
        self.node.on_superseded = _terminate
        self.gate = KeyGate(app, self.node)
        # Added before the consumer starts, so it consumes the queues from the start:
        # its direct queue, and the queues where tasks wait for workers with its tags.
        app.amqp.queues.select_add(direct_queue(self.node.queue))
        for name in affinity_queues(config.queue_prefix, tags):
            app.amqp.queues.select_add(direct_queue(name))
        if tags:
            logger.info("sticky: %s carries tags %s, capacity %d", worker.hostname, tags, capacity)
        if config.state_replication != "off" and not config.secret:
            logger.warning(
                "sticky: sticky_state_replication=%r but sticky_secret is not set (nor "
                "STICKY_SECRET): hand-over copies are neither written nor read, so a key's "
                "state starts empty on its next owner. Set a secret shared by every worker "
                "to hand state over",
                config.state_replication,
            )
        if getattr(worker, "task_events", False):
            # `celery worker -E` sets no setting: say it in the app's conf before the pool
            # forks, so pool processes (moves, releases) and the router send events too.
            app.conf.worker_send_task_events = True
        self.drained = False
        worker.sticky = self
        worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid="celery_sticky.drain")
        logger.debug("sticky: node %s, state in %s", worker.hostname, self.state_directory)

    def start(self, worker: Any) -> None:
        # If another worker is moving this node's queue on (it was dead), let it
        # finish, for a while: under a steady stream of publishes a reap can take long,
        # and a node that waits is a node that is down. What it moves after this
        # reaches the keys' owners anyway (this node forwards what is not its own).
        deadline = time.monotonic() + max(2 * self.node.config.lease_ttl, 10.0)
        while self._being_reaped():
            if time.monotonic() > deadline:
                logger.warning(
                    "sticky: %s starts while another worker still moves its queue on",
                    self.node.name,
                )
                break
            time.sleep(0.2)
        # Register first: a second process under a live node's name is refused here,
        # before it could take back that node's unacknowledged messages.
        self.node.start()
        self._restore_own_unacked(worker)
        # Supervised: retried with backoff until the lease store answered for every key.
        self._cleanup_stop = threading.Event()
        supervise(
            "sticky-cleanup",
            self._drop_stale_state_or_raise,
            self._cleanup_stop,
            interval=1.0,
            first_delay=0.0,
        )
        # The pool has forked by now (this step requires it), so the main process
        # may open the state briefly: send what a crash left in the outbox.
        store = NodeState(self.state_directory, self.node.config)
        try:
            send_pending(worker.app, store)
        finally:
            store.close()

    def stop(self, worker: Any) -> None:
        # Draining from now on: this node's keys are routed to its queue, which the
        # drain (after the pool finished its tasks) moves on.
        cleanup = getattr(self, "_cleanup_stop", None)
        if cleanup is not None:
            cleanup.set()
        # Every proof from now on asks the store, which answers that the key waits
        # for the drain.
        self.node.known.clear(disable=True)
        if self.node.superseded:
            return  # the name, its queue and its keys belong to another process now
        try:
            self.node.store.set_draining(self.node.name)
        except LeaseStoreUnavailable as exc:
            logger.warning("sticky: could not mark %s draining: %s", self.node.name, exc)

    shutdown = stop

    def drain(self, worker: Any) -> None:
        """After the pool stopped (``worker_shutdown``): hand keys over, move the queue."""
        if self.drained or self.node.superseded:
            return
        self.drained = True
        try:
            drain_safely(worker.app, self.node, self.state_directory)
        finally:
            self.node.stop(deregister=True)

    def info(self, worker: Any) -> dict[str, Any]:
        """This node's part of ``celery inspect stats`` (and of Flower's worker "Other" tab).

        Counts, not key lists: a worker may own many keys (``celery sticky keys -w``
        pages through them).
        """
        node = self.node
        sticky: dict[str, Any] = {
            "node": node.name,
            "queue": node.queue,
            "capacity": node.capacity,
            "tags": dict(node.tags),
            "gate_busy_keys": self.gate.busy_keys(),
            "gate_waiting": self.gate.waiting(),
            "keys_owned": None,
        }
        with contextlib.suppress(LeaseStoreUnavailable):
            sticky["keys_owned"] = node.store.owned_count(node.name)
        return {"sticky": sticky}

    def _restore_own_unacked(self, worker: Any) -> None:
        """Give back what a crashed earlier run of this node had taken (Redis only).

        A node restarted under its name after a crash finds the messages its
        previous process had taken still in its in-flight lists (reliable delivery,
        :mod:`celery_sticky.worker.delivery`), or marked unacknowledged in kombu's
        hash (delivered with ``BRPOP``), where Redis would return them only after
        ``visibility_timeout`` (an hour by default). This node is their consumer, so
        it puts them back at the head of their queues, in delivery order, before it
        starts consuming (this step runs before the consumer starts): its direct
        queue's, and those of the shared queues it took from. RabbitMQ returned them
        when the old connection closed.

        Retried while the broker does not answer: a node that consumed with the
        previous run's messages still in its in-flight list would leave them there,
        behind everything newer, until its next restart (seen in the nemesis: a
        broker cut at the restart held a key's steps for minutes).
        """

        def restore() -> int:
            with worker.app.connection_for_write() as connection:
                channel = connection.default_channel
                return restore_unacked(channel, self.node.queue) + restore_shared(
                    channel, self.node.name
                )

        def failed(exc: Exception, _intervals: Any, retries: int) -> float:
            logger.warning(
                "sticky: could not restore the unacked messages of %s yet (%r); trying again",
                self.node.name,
                exc,
            )
            return min(0.5 * (retries + 1), RESTORE_RETRY_MAX)

        try:
            restored = retry_over_time(  # type: ignore[no-untyped-call]
                restore, Exception, errback=failed, timeout=RESTORE_TIMEOUT
            )
        except Exception:
            logger.exception(
                "sticky: could not restore the unacked messages of %s; they come back when "
                "it restarts, drains or is reaped",
                self.node.name,
            )
            return
        if restored:
            logger.info(
                "sticky: %s took back %d message(s) its previous run had taken",
                self.node.name,
                restored,
            )

    def _being_reaped(self) -> bool:
        try:
            return self.node.store.reaping(self.node.name)
        except LeaseStoreUnavailable:
            return False  # the heartbeat loop keeps trying; proofs wait for the store

    def _drop_stale_state_or_raise(self) -> bool:
        self._drop_stale_state(raise_errors=True)
        return True

    def _drop_stale_state(self, raise_errors: bool = False) -> None:
        """Free the disk of keys whose lease moved on while this node was away."""
        try:
            store = open_node_state(self.node.config, self.node.name)
            dropped = 0
            for workflow, key, epoch in store.local_keys():
                info = self.node.store.lookup(workflow, key)
                if info is None or info.owner != self.node.name or info.epoch != epoch:
                    store.delete_key(workflow, key)
                    dropped += 1
            if dropped:
                logger.info("sticky: dropped the local state of %d key(s) that moved on", dropped)
        except Exception:
            if raise_errors:
                raise
            logger.exception("sticky: could not check local state against the leases")


def _terminate() -> None:
    """Stop this worker now, without a drain (its node name belongs to another process)."""
    from celery.platforms import EX_FAILURE
    from celery.worker import state as worker_state

    worker_state.should_terminate = EX_FAILURE


def worker_tags(config: StickyConfig, options: tuple[str, ...] = ()) -> dict[str, str]:
    """The worker's tags: ``sticky_worker_tags``, overridden by ``--sticky-tag`` options."""
    tags = dict(config.worker_tags or {})
    try:
        tags.update(parse_tags(list(options), "--sticky-tag"))
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if len(tags) > MAX_TAGS:
        raise ConfigurationError(
            f"--sticky-tag / sticky_worker_tags: {len(tags)} tags, at most {MAX_TAGS} "
            "(a worker consumes one affinity queue per subset of its tags)"
        )
    return tags


def on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    """``worker_shutdown`` handler: drain the node once its pool has stopped."""
    step = getattr(sender, "sticky", None)
    if isinstance(step, StickyWorker):
        step.drain(sender)
