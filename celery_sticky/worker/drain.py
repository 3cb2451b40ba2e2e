"""Draining a worker: its keys, their state and their queued tasks move on.

Runs on a warm shutdown (SIGTERM, ``celery control shutdown``, the ``drain``
command), after the pool finished its running tasks. The worker was marked
draining when it stopped consuming: it keeps its heartbeat (so no reaper takes
its queue), new keys go elsewhere, and publishers keep sending its keys' tasks to
its queue, behind the ones already there. Then:

1. its queue is taken; the keys with tasks in it get their state exported to
   the hand-over store first, then the tasks move, in publish order, to the
   keys' new owners, which import the state on their first task;
2. every other key it owns gets its state exported;
3. it stops heartbeating, is marked dead and reaped, stragglers are moved, and
   its leases released.

With ``sync`` replication a key whose copy already holds its last commit (its
version and log, as that commit left them) is not exported again: the next
owner imports that copy, as it would after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import time

from celery import Celery

from ..context import context
from ..errors import LeaseStoreUnavailable
from ..events import app_sender, ownership_changed
from ..local.node_state import NodeState
from .delivery import forget_shared
from .node import StickyNode
from .reaper import move_queue

logger = logging.getLogger(__name__)


def drain_node(app: Celery, node: StickyNode, directory: str) -> None:
    """Hand every key of ``node`` over and move its queue on (see the module doc)."""
    config = node.config
    leases = node.store
    started = time.monotonic()
    owned = leases.owned_keys(node.name)
    handed: set[tuple[str, str]] = set()  # looked at
    exported: set[tuple[str, str]] = set()  # copied to the hand-over store
    copies = context(app).copies if config.state_replication != "off" else None
    if copies is not None and not copies.enabled:
        copies = None  # no sticky_secret: nothing can be handed over (said at start)
    store = NodeState(directory, config) if copies is not None else None

    # One event sender for the whole drain (the consumer's dispatcher is closed by now).
    events = contextlib.ExitStack()
    send = events.enter_context(app_sender(app, hostname=node.name))

    def hand_over(keys: list[tuple[str, str]]) -> None:
        if copies is None or store is None:
            return
        for workflow, key in keys:
            if (workflow, key) in handed or (workflow, key) not in owned:
                continue
            handed.add((workflow, key))
            info = leases.lookup(workflow, key)
            if info is None or info.owner != node.name:
                continue
            if current(workflow, key) or export(workflow, key, info.epoch):
                exported.add((workflow, key))
                ownership_changed("handed_over", workflow, key, info.epoch, node.name, send=send)

    def current(workflow: str, key: str) -> bool:
        """With sync replication, whether the key's copy already holds every commit (its
        version and log, as the last commit left them): nothing to write then."""
        if config.state_replication != "sync" or copies is None or store is None:
            return False
        version = store.copy_version(workflow, key)
        return version is not None and copies.is_current(
            workflow,
            key,
            version,
            store.applied_count(workflow, key),
            store.streams(workflow, key).as_dict(),
        )

    def export(workflow: str, key: str, epoch: int) -> bool:
        assert copies is not None and store is not None
        data = store.export_key(workflow, key)
        return data is not None and copies.publish(
            workflow, key, data, owner=node.name, epoch=epoch
        )

    try:
        # Keys with queued tasks first: their tasks move as soon as their state is out.
        moved = move_queue(app, leases, node.queue, before_move=hand_over, where="drain")
        hand_over(sorted(owned))
    finally:
        events.close()
        if store is not None:
            store.close()
    node.stop(deregister=True)
    with app.connection_for_write() as connection:
        # What its channels could not give back when they closed (the broker was away),
        # then its record of shared queues: a drained node is no longer registered, so
        # no reaper would ever delete it (a restart under its name writes it again).
        forget_shared(connection.default_channel, node.name)
    leases.mark_reaped(node.name)
    time.sleep(0.1)  # publishes that looked a lease up just before
    moved += move_queue(app, leases, node.queue, restore=False, where="drain")
    for workflow, key in owned:
        leases.release(workflow, key, owner=node.name)
    logger.info(
        "sticky: drained %s in %.1f s: %d key(s) handed over, %d task(s) moved, "
        "%d lease(s) released",
        node.name,
        time.monotonic() - started,
        len(exported),
        moved,
        len(owned),
    )


def drain_safely(app: Celery, node: StickyNode, directory: str) -> None:
    try:
        drain_node(app, node, directory)
    except LeaseStoreUnavailable as exc:
        logger.error(
            "sticky: could not drain %s (its queue waits for the reaper): %s", node.name, exc
        )
    except Exception:
        logger.exception("sticky: drain of %s failed (its queue waits for the reaper)", node.name)
