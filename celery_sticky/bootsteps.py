"""Worker bootsteps: the node's direct queue, registration and heartbeat, the gate.

``StickyWorker`` is a worker step (it lives as long as the worker; consumer
steps restart on every broker reconnect). ``StickyConsumer`` only tells the
gate when the broker connection restarts.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from .gate import KeyGate
from .lifecycle import passivate
from .local_state import NodeState, check_node_directory, set_current_node
from .node import StickyNode
from .outbox import send_pending
from .router import direct_queue
from .settings import get_config

logger = logging.getLogger(__name__)


class StickyWorker(bootsteps.StartStopStep):
    """Consume this node's direct queue, register the node, heartbeat."""

    label = "Sticky"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        from .app import lease_store

        app = worker.app
        config = get_config(app)
        # Fail at start, not at the first task, when the state dir is unusable.
        self.state_directory = check_node_directory(config, worker.hostname)
        set_current_node(worker.hostname)  # before the pool forks: children inherit it
        capacity = config.worker_capacity or int(worker.concurrency or 1)
        self.node = StickyNode(worker.hostname, config, lease_store(app), capacity)
        self.gate = KeyGate(app, self.node)
        # Added before the consumer starts, so it consumes the queue from the start.
        app.amqp.queues.select_add(direct_queue(self.node.queue))
        worker.sticky = self
        logger.debug("sticky: node %s, state in %s", worker.hostname, self.state_directory)

    def start(self, worker: Any) -> None:
        self.node.start()
        # The pool has forked by now (this step requires it), so the main process
        # may open the state briefly: send what a crash left in the outbox.
        store = NodeState(self.state_directory, self.node.config)
        try:
            send_pending(worker.app, store)
        finally:
            store.close()
        idle_timeout = self.node.config.idle_timeout
        if idle_timeout is not None:
            worker.timer.call_repeatedly(
                min(idle_timeout / 2, 60.0),
                passivate,
                (worker.app, self.node.queue, self.gate.idle, idle_timeout),
            )

    def stop(self, worker: Any) -> None:
        self.node.stop(deregister=True)

    def shutdown(self, worker: Any) -> None:
        self.node.stop(deregister=True)


class StickyConsumer(bootsteps.StartStopStep):
    """On a broker reconnect, forget gate entries whose messages come back anyway."""

    label = "Sticky gate"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def stop(self, consumer: Any) -> None:
        step = getattr(consumer.controller, "sticky", None)
        if step is not None:
            step.gate.forget_unstarted()

    shutdown = stop
