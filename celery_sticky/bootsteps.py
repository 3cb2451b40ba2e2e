"""Worker bootsteps: the node's direct queue, registration and heartbeat, the gate.

``StickyWorker`` is a worker step (it lives as long as the worker; consumer
steps restart on every broker reconnect). ``StickyConsumer`` only tells the
gate when the broker connection restarts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import bootsteps

from . import metrics
from .drain import drain_safely
from .errors import ConfigurationError, LeaseStoreUnavailable
from .gate import KeyGate
from .lifecycle import passivate
from .local_state import NodeState, check_node_directory, open_node_state, set_current_node
from .node import StickyNode
from .outbox import send_pending
from .placement import MAX_TAGS, affinity_queues, parse_tags
from .reaper import Reaper, restore_unacked
from .router import direct_queue
from .settings import StickyConfig, get_config

logger = logging.getLogger(__name__)


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
        from .app import lease_store

        app = worker.app
        config = get_config(app)
        # Fail at start, not at the first task, when the state dir is unusable.
        self.state_directory = check_node_directory(config, worker.hostname)
        set_current_node(worker.hostname)  # before the pool forks: children inherit it
        capacity = sticky_capacity or config.worker_capacity or int(worker.concurrency or 1)
        tags = worker_tags(config, sticky_tag)
        self.node = StickyNode(worker.hostname, config, lease_store(app), capacity, tags)
        self.gate = KeyGate(app, self.node)
        # Added before the consumer starts, so it consumes the queues from the start:
        # its direct queue, and the queues where tasks wait for workers with its tags.
        app.amqp.queues.select_add(direct_queue(self.node.queue))
        for name in affinity_queues(config.queue_prefix, tags):
            app.amqp.queues.select_add(direct_queue(name))
        if tags:
            logger.info("sticky: %s carries tags %s, capacity %d", worker.hostname, tags, capacity)
        self.reaper = Reaper(
            app, self.node.store, self.node.name, min(1.0, config.heartbeat_interval)
        )
        self.drained = False
        worker.sticky = self
        logger.debug("sticky: node %s, state in %s", worker.hostname, self.state_directory)

    def start(self, worker: Any) -> None:
        # If another worker is moving this node's queue on (it was dead), let it finish.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self._being_reaped():
            time.sleep(0.2)
        self._restore_own_unacked(worker)
        self.node.start()
        self.reaper.start()
        threading.Thread(target=self._drop_stale_state, name="sticky-cleanup", daemon=True).start()
        # The pool has forked by now (this step requires it), so the main process
        # may open the state briefly: send what a crash left in the outbox.
        store = NodeState(self.state_directory, self.node.config)
        try:
            send_pending(worker.app, store)
        finally:
            store.close()
        if self.node.config.metrics_port:
            self._serve_metrics()
        idle_timeout = self.node.config.idle_timeout
        if idle_timeout is not None:
            worker.timer.call_repeatedly(
                min(idle_timeout / 2, 60.0),
                passivate,
                (worker.app, self.node.queue, self.gate.idle, idle_timeout),
            )

    def stop(self, worker: Any) -> None:
        # Draining from now on: this node's keys are routed to its queue, which the
        # drain (after the pool finished its tasks) moves on.
        self.reaper.stop()
        try:
            self.node.store.set_draining(self.node.name)
        except LeaseStoreUnavailable as exc:
            logger.warning("sticky: could not mark %s draining: %s", self.node.name, exc)

    shutdown = stop

    def drain(self, worker: Any) -> None:
        """After the pool stopped (``worker_shutdown``): hand keys over, move the queue."""
        if self.drained:
            return
        self.drained = True
        try:
            drain_safely(worker.app, self.node, self.state_directory)
        finally:
            self.node.stop(deregister=True)

    def _serve_metrics(self) -> None:
        config = self.node.config

        def gauges() -> dict[str, float]:
            values: dict[str, float] = {
                "gate_busy_keys": self.gate.busy_keys(),
                "gate_waiting": self.gate.waiting(),
                "state_bytes": metrics.directory_bytes(self.state_directory),
            }
            try:
                owned = self.node.store.owned_key(self.node.name)
                values["keys_owned"] = self.node.store.guard(
                    lambda: self.node.store.redis.scard(owned)
                )
            except LeaseStoreUnavailable:
                pass
            return values

        assert config.metrics_port is not None
        if metrics.serve(config.metrics_port, config.metrics_address, gauges):
            logger.info("sticky: metrics on %s:%d", config.metrics_address, config.metrics_port)
        else:
            logger.warning(
                "sticky: sticky_metrics_port is set but prometheus_client is not "
                "installed: pip install 'celery-sticky[prometheus]'"
            )

    def _restore_own_unacked(self, worker: Any) -> None:
        """Give back what a crashed earlier run of this node had taken (Redis only).

        A node restarted under its name after a crash finds the messages its
        previous process had prefetched still marked unacknowledged; Redis would
        return them only after ``visibility_timeout`` (an hour by default). This
        node is their consumer, so it puts them back at the head of its queue, in
        delivery order, before it starts consuming. RabbitMQ returned them when the
        old connection closed.
        """
        try:
            with worker.app.connection_for_write() as connection:
                restored = restore_unacked(connection.default_channel, self.node.queue)
        except Exception:
            logger.exception("sticky: could not restore the unacked messages of %s", self.node.name)
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

    def _drop_stale_state(self) -> None:
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
            logger.exception("sticky: could not check local state against the leases")


class StickyConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """On a broker reconnect, forget gate entries whose messages come back anyway.

    At shutdown, first send the acknowledgements the consumer still holds back.
    """

    label = "Sticky gate"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def stop(self, consumer: Any) -> None:
        step = getattr(consumer.controller, "sticky", None)
        if step is not None:
            step.gate.forget_unstarted()

    def shutdown(self, consumer: Any) -> None:
        # Without an event loop (gevent, eventlet pools) Celery 5.3 queues acks as
        # pending operations, run only between two polls of the broker, and closes the
        # connection without running the last ones (celery#5663): the broker restores
        # messages whose tasks already ran and the drain runs them again on the keys'
        # next owners. This step shuts down before the Connection step: send them now.
        consumer.perform_pending_operations()
        self.stop(consumer)


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
