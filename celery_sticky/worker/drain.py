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

Each step tries again through a lease store or broker outage, for up to
``sticky_drain_timeout`` seconds in all: every step can run twice (a queue move
takes what is left, in publish order; an export writes a new version). Giving up
at the first failed call left the queue to the reaper: in the nemesis, 14 of 24
drains failed that way while the lease store restarted, and the worker's
restart then raced the reaper for its own queue.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from celery import Celery

from .. import faults
from ..context import context
from ..errors import LeaseStoreUnavailable
from ..events import app_sender, ownership_changed
from ..lease import LeaseStore
from ..local.node_state import NodeState
from .delivery import forget_shared
from .node import StickyNode
from .reaper import move_queue
from .supervise import backoff

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Retrying:
    """Runs a drain's steps, each again after an outage until the drain's deadline."""

    def __init__(self, app: Celery, node: StickyNode) -> None:
        self.node = node
        self.deadline = time.monotonic() + node.config.drain_timeout
        with app.connection_for_write() as connection:
            broker_errors = tuple(connection.connection_errors)
        self.errors: tuple[type[BaseException], ...] = (LeaseStoreUnavailable, *broker_errors)

    def __call__(self, what: str, step: Callable[[], T]) -> T:
        failures = 0
        while True:
            try:
                return step()
            except self.errors as exc:
                failures += 1
                pause = backoff(failures, 0.1, 2.0)
                if time.monotonic() + pause > self.deadline:
                    raise
                logger.warning(
                    "sticky: drain of %s: %s failed (%d), trying again: %r",
                    self.node.name,
                    what,
                    failures,
                    exc,
                )
                time.sleep(pause)


def copy_is_ahead(leases: LeaseStore, state: NodeState, workflow: str, key: str) -> bool:
    """Whether the key's copy holds more commits than this worker's local state.

    Then the key came back to this worker (claimed again after another owner drained,
    before this worker's restart had dropped its old state) and none of its tasks ran
    here since. Exported, the stale local state would replace the copy under the
    worker's valid lease, and the commits made elsewhere would be lost (seen in the
    nemesis: 88 steps of 4 keys, each a drain of a worker that had just got them back).
    """
    _version, head, _streams = leases.copy_position(workflow, key)
    return head is not None and head > state.applied_count(workflow, key)


def drain_node(app: Celery, node: StickyNode, directory: str) -> None:
    """Hand every key of ``node`` over and move its queue on (see the module doc)."""
    config = node.config
    leases = node.store
    faults.reach("before_drain")
    started = time.monotonic()
    retrying = _Retrying(app, node)
    # Marked at the warm shutdown's start; again here, in case the store was away then.
    retrying("marking it draining", lambda: leases.set_draining(node.name))
    owned = retrying("listing its keys", lambda: leases.owned_keys(node.name))
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
            info = leases.lookup(workflow, key)
            if info is None or info.owner != node.name:
                handed.add((workflow, key))
                continue
            if copy_is_ahead(leases, store, workflow, key):
                # Claimed here again, but no task of it ran since another worker
                # committed to it: the copy is the key's state, this one is stale.
                logger.info(
                    "sticky: not handing %s:%s over: its copy holds commits this "
                    "worker's local state lacks",
                    workflow,
                    key,
                )
                handed.add((workflow, key))
                continue
            if current(workflow, key) or export(workflow, key, info.epoch):
                exported.add((workflow, key))
                ownership_changed("handed_over", workflow, key, info.epoch, node.name, send=send)
            handed.add((workflow, key))  # not before: a failed export is tried again

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
        moved = retrying(
            "moving its queue",
            lambda: move_queue(
                app, leases, node.queue, before_move=hand_over, where="drain", mover=node.name
            ),
        )
        retrying("handing its keys over", lambda: hand_over(sorted(owned)))
    finally:
        events.close()
        if store is not None:
            store.close()
    node.stop(deregister=True)
    retrying("marking it reaped", lambda: leases.mark_reaped(node.name))
    time.sleep(0.1)  # publishes that looked a lease up just before
    moved += retrying(
        "moving its stragglers",
        lambda: move_queue(app, leases, node.queue, restore=False, where="drain", mover=node.name),
    )

    def forget() -> None:
        with app.connection_for_write() as connection:
            # What its channels could not give back when they closed (the broker was
            # away), then its record of shared queues (the moves above took through
            # it too): a drained node is no longer registered, so no reaper would
            # ever delete it (a restart under its name writes it again).
            forget_shared(connection.default_channel, node.name)

    retrying("giving back its shared queues' messages", forget)
    for workflow, key in owned:
        retrying(
            f"releasing {workflow}:{key}",
            functools.partial(leases.release, workflow, key, owner=node.name),
        )
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
