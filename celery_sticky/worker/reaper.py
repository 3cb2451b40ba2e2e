"""Moving a dead or drained worker's queue on, in order, to the keys' new owners.

On Redis a dead worker's prefetched, unacknowledged messages would come back
only after ``visibility_timeout`` (an hour by default), into its own queue, and
the queue itself is consumed by nobody. Every live worker runs a :class:`Reaper`;
for each dead worker exactly one of them (a lock in Redis) restores the dead
worker's unacknowledged messages to the head of its queue in delivery order,
then takes the queue's messages one by one and republishes each to the key's new
owner (a claim that takes the key over from the dead worker), then marks the
worker reaped: only then may its other keys be taken over (by their next task), so
newer tasks never overtake the ones that were queued. A worker still dead a minute
later is retired: the reaper hands the keys it still holds over itself, a batch per
Lua call, so none is left with a forgotten owner. On RabbitMQ the broker requeues a dead
connection's unacknowledged messages itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.message import Message

from .. import metrics
from ..errors import InvalidHeaderError
from ..lease import ClaimStatus, LeaseStore
from ..placement import affinity_queue_name, fallback_policy
from ..producer.queues import queue_size
from ..wire import StickyHeader, direct_queue, inflight_key
from .deadletter import dead_letter
from .delivery import (
    end_moving,
    forget_shared,
    give_back_moved,
    is_redis_channel,
    open_channel,
    reliable_delivery_enabled,
    restore_inflight,
    restore_shared,
    take_moving,
)
from .forwarding import republish
from .supervise import supervise

logger = logging.getLogger(__name__)

#: How long a reaped worker's registry entry and queue are kept for stragglers
#: (tasks published under a lease looked up just before the reaping).
RETIRE_AFTER = 60.0


def restore_unacked(channel: Any, queue: str) -> int:
    """Put a queue's unacknowledged Redis messages back at its head, oldest first.

    First its in-flight list (reliable delivery, :mod:`.delivery`: one atomic step),
    then what kombu's unacked hash holds for it (delivered with ``BRPOP``: reliable
    delivery off, or before it was on), which ends at the very head. A message is in
    one of the two, never both, so none is restored twice.
    """
    qos = getattr(channel, "qos", None)
    if qos is None or not hasattr(qos, "restore_by_tag"):
        return 0  # not Redis: the broker requeues them itself
    restored = restore_inflight(channel, queue)
    client = channel.client
    found = []
    for tag, raw in client.hscan_iter(channel.unacked_key):
        try:
            _payload, exchange, routing_key = json.loads(raw)
        except (TypeError, ValueError):
            continue
        if queue in (exchange, routing_key):
            score = client.zscore(channel.unacked_index_key, tag) or 0.0
            found.append((score, tag))
    # The consuming end is the right; pushing the newest first leaves the oldest
    # rightmost, to be taken first.
    for _score, tag in sorted(found, reverse=True):
        qos.restore_by_tag(tag, client, leftmost=False)
    return restored + len(found)


#: Messages a queue move takes at a time: a move that fails (the broker or the lease
#: store away) starts again from the batch it was moving, not from the whole queue
#: (seen in the nemesis: a drain took 11,639 messages, failed on a broker cut, gave
#: them all back and took them all again, over and over).
MOVE_BATCH = 500


def take_all(channel: Any, queue: str, limit: int | None = None) -> list[Message]:
    """The messages waiting in ``queue`` (at most ``limit``), unacknowledged, in
    queue order."""
    bound = direct_queue(queue).bind(channel)  # type: ignore[no-untyped-call]
    # Declared first (idempotent): a worker stopped right after it started may not
    # have declared its queue yet, and RabbitMQ closes the channel on a get from a
    # queue that does not exist.
    bound.declare()
    messages: list[Message] = []
    while limit is None or len(messages) < limit:
        message = bound.get(no_ack=False, accept={"json", "pickle", "yaml", "msgpack"})
        if message is None:
            return messages
        messages.append(message)
    return messages


def in_publish_order(messages: list[Message]) -> list[Message]:
    """Messages in publish order: each producer stream's by sequence number.

    A broker may put messages back out of order: Redis restores a worker's
    prefetched messages reversed at shutdown, and requeues a rejected one at the
    tail. Messages are first sorted by the publish time in their header (stable),
    which interleaves producers about as they published; then each stream's
    messages are put back in its own places in sequence order, since a
    producer's clock may step back while its numbers never do. (The new owner's
    gate orders by number anyway; this keeps it from waiting.)
    """
    headers = [StickyHeader.safe_from_headers(m.headers) for m in messages]
    sent = [h.sent if h is not None else 0 for h in headers]
    seq = [h.seq if h is not None else 0 for h in headers]
    order = sorted(range(len(messages)), key=sent.__getitem__)
    slots: dict[tuple[str, str, str], list[int]] = {}
    for position, index in enumerate(order):
        header = headers[index]
        if header is not None and header.seq:
            slots.setdefault((header.workflow, header.key, header.stream), []).append(position)
    for places in slots.values():
        indexes = sorted((order[p] for p in places), key=seq.__getitem__)
        for place, index in zip(places, indexes, strict=True):
            order[place] = index
    return [messages[i] for i in order]


def move_queue(
    app: Celery,
    store: LeaseStore,
    queue: str,
    *,
    restore: bool = True,
    before_move: Callable[[list[tuple[str, str]]], None] | None = None,
    where: str = "reaper",
    mover: str = "",
) -> int:
    """Move every message of ``queue`` to its key's owner, ``MOVE_BATCH`` at a time;
    returns how many moved.

    ``restore``: first put the queue's unacknowledged Redis messages back (a scan
    of the transport's whole unacked hash: done once per dead worker).
    ``before_move(keys)``: called with the keys that have tasks in the queue, in
    order, once the messages are taken and before any is republished (a drain
    hands those keys over first, so their tasks wait for nothing else).
    A message with a malformed sticky header goes to the dead-letter queue
    (``where`` labels the metric); the others still move. ``mover``: the node doing
    the move (its in-flight list holds what it took until each is republished);
    empty for a process that is no node (``celery sticky reap``), which takes into
    the queue's own in-flight list.
    """
    moved = 0
    policy = fallback_policy(store.config.placement)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        if restore:
            restore_unacked(channel, queue)
        reliable = reliable_delivery_enabled(store.config, connection)
        if reliable:
            # Taken into an in-flight list, not kombu's unacked hash (see
            # ReliableChannel._get): the mover's own list of this queue, recorded in
            # its moving index, so that if the mover dies midway whoever reaps it (or
            # its restart) gives what it held back to the queue's head, and if the
            # move fails while the broker is away, the mover's next reaper pass does
            # (Reaper.run_once). Closed with the connection: what was not
            # acknowledged goes back at once.
            if mover:
                take_moving(channel, mover, queue)
            move_channel = open_channel(connection, queue, mover)
        else:
            move_channel = channel
        # Taken a batch at a time; what no live worker may take yet stays taken (in
        # the mover's in-flight list) until the end, then goes back to the queue's
        # head in its order: put back at once, the next batch would take it again.
        waiting: list[Message] = []
        while True:
            messages = in_publish_order(take_all(move_channel, queue, MOVE_BATCH))
            if not messages:
                break
            moved += _move_batch(app, store, queue, messages, policy, before_move, where, waiting)
        for message in reversed(waiting):
            message.requeue()  # type: ignore[no-untyped-call]
        if reliable and mover:
            end_moving(channel, mover, queue)
    return moved


def _move_batch(
    app: Celery,
    store: LeaseStore,
    queue: str,
    messages: list[Message],
    policy: Any,
    before_move: Callable[[list[tuple[str, str]]], None] | None,
    where: str,
    waiting: list[Message],
) -> int:
    """Republish one batch of a queue move (see :func:`move_queue`); what no live
    worker may take yet goes to ``waiting``."""
    moved = 0
    if before_move is not None:
        keys: dict[tuple[str, str], None] = {}
        for message in messages:
            header = StickyHeader.safe_from_headers(message.headers)
            if header is not None:
                keys[(header.workflow, header.key)] = None
        before_move(list(keys))
    for message in messages:
        try:
            header = StickyHeader.from_headers(message.headers)
        except InvalidHeaderError as exc:
            dead_letter(app, message, str(exc), source=queue, where=where)
            continue
        if header is None:
            # Not a sticky task: back to the default queue it would have taken.
            republish(app, message, None, app.conf.task_default_queue)
        else:
            lease = store.claim(
                header.workflow,
                header.key,
                force=True,
                policy=policy,
                affinity=header.affinity,
            )
            if lease.status is ClaimStatus.NO_LIVE_WORKER and header.affinity:
                # No live worker may hold it: it waits for one in its affinity's queue.
                affinity_queue = affinity_queue_name(store.config.queue_prefix, header.affinity)
                republish(app, message, header._replace(epoch=0), affinity_queue)
                moved += 1
                continue
            if lease.status is ClaimStatus.GRACE:
                waiting.append(message)  # the store's data is new: claims wait a moment
                continue
            if lease.status is ClaimStatus.NO_LIVE_WORKER:
                waiting.append(message)
                logger.warning("sticky: no live worker to take %s:%s", header.workflow, header.key)
                continue
            destination = store.config.direct_queue_name(lease.owner)
            republish(app, message, header._replace(epoch=lease.epoch), destination)
        moved += 1
        metrics.moved.inc()
    return moved


def reap(
    app: Celery, store: LeaseStore, node: str, reaped_at: float | None = None, mover: str = ""
) -> int:
    """Move a dead worker's queue on and mark it reaped; hand its keys over and forget
    it when long dead.

    The first time (``reaped_at`` None) this restores its unacknowledged messages,
    moves its queue, marks it reaped and moves what arrived meanwhile: O(its queued
    tasks), whatever the number of keys it holds. From then on any of its keys is
    taken over by its next task; the others stay its own, so a worker that comes back
    with the same name and disk soon after keeps them and their local state. Later
    passes move stragglers (tasks published under a lease looked up just before, and
    what a paused worker's last ``BLMOVE`` took into its in-flight list after the
    first pass). Every pass first gives back what it took from shared queues and did
    not acknowledge; ``RETIRE_AFTER`` seconds after it was reaped the worker is not coming
    back: every key it still holds goes to a live worker (a take-over, as its next
    task would do, about a thousand keys per Lua call: O(its keys), never a scan of
    every key), then its queue, in-flight list and registry entries are deleted.
    ``mover``: the reaping node (see :func:`move_queue`).
    """
    queue = store.config.direct_queue_name(node)
    with app.connection_for_write() as connection:
        # Its messages of shared queues: back to their heads, for any worker to take.
        shared = restore_shared(connection.default_channel, node)
    if shared:
        logger.info("sticky: gave back %d shared-queue message(s) of dead worker %s", shared, node)
    if reaped_at is None:
        moved = move_queue(app, store, queue, mover=mover)
        reaped_at = store.mark_reaped(node)
        if reaped_at is None:
            logger.info("sticky: %s came back while being reaped", node)
            return moved
        time.sleep(0.1)  # publishes that looked the lease up before it was marked
        moved += move_queue(app, store, queue, restore=False, mover=mover)
    else:
        with app.connection_for_write() as connection:
            restored = restore_inflight(connection.default_channel, queue)
        moved = (
            move_queue(app, store, queue, restore=False, mover=mover)
            if restored or queue_size(app, queue)
            else 0
        )
    if moved:
        logger.info("sticky: moved %d task(s) from dead worker %s", moved, node)
    if store.server_time() - reaped_at > RETIRE_AFTER:  # both by the server's clock
        take_over_keys(store, node)
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            direct_queue(queue).bind(channel).delete()  # type: ignore[no-untyped-call]
            if is_redis_channel(channel) and not channel.global_keyprefix:
                channel.client.delete(inflight_key(queue))  # empty: restored just above
                forget_shared(channel, node)
        store.forget_worker(node)
        logger.info("sticky: forgot dead worker %s and deleted its queue", node)
    return moved


def take_over_keys(store: LeaseStore, node: str) -> int:
    """Hand the keys a reaped worker still holds to live workers; returns how many."""
    if not store.owned_count(node):
        return 0
    started = time.monotonic()
    result = store.take_over_keys(node, fallback_policy(store.config.placement))
    if result.moved:
        metrics.ownership_changes.labels("taken_over").inc(result.moved)
        logger.info(
            "sticky: handed %d key(s) of dead worker %s over in %.2f s",
            result.moved,
            node,
            time.monotonic() - started,
        )
    if result.left:
        logger.warning(
            "sticky: %d key(s) of dead worker %s stay with it: no live worker may hold them "
            "(their affinity); their next task takes them over",
            result.left,
            node,
        )
    return result.moved


class Reaper:
    """A thread in every worker that reaps dead workers (each by exactly one reaper)."""

    def __init__(self, app: Celery, store: LeaseStore, node: str, interval: float) -> None:
        self.app = app
        self.store = store
        self.node = node
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Supervised: a failed pass (the store or the broker away, a Redis error)
        # backs off and tries again; nothing but stop() ends the thread.
        self._stop.clear()
        self._thread = supervise("sticky-reaper", self._pass, self._stop, interval=self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run_once(self) -> int:
        moved = self.give_back_moved()
        for info in self.store.workers():
            if info.alive or info.name == self.node:
                continue
            if not self.store.try_lock_reaping(info.name, self.node, 120):
                continue
            try:
                moved += reap(self.app, self.store, info.name, info.reaped_at, mover=self.node)
            finally:
                self.store.unlock_reaping(info.name)
        return moved

    def give_back_moved(self) -> int:
        """What an earlier pass took from a queue it moved and could not give back
        (the move failed while the broker was away, and so did closing its channel),
        back to the queue's head; returns how many tasks moved on from there.

        Without this the messages waited in this worker's in-flight list of that
        queue until this worker restarted or died, while the key's later steps ran:
        a step held 14 minutes, seen in a nemesis run. A queue whose worker is still
        dead is moved on by this pass's reap of it; a worker forgotten since has
        nobody to reap its queue, so it is moved here."""
        with self.app.connection_for_write() as connection:
            own = self.store.config.direct_queue_name(self.node)  # a drain may move it
            queues = give_back_moved(connection.default_channel, self.node, skip=own)
        if not queues:
            return 0
        logger.warning("sticky: gave back what an unfinished move took from %s", ", ".join(queues))
        known = {self.store.config.direct_queue_name(info.name) for info in self.store.workers()}
        return sum(
            move_queue(self.app, self.store, queue, restore=False, mover=self.node)
            for queue in queues
            if queue not in known
        )

    def _pass(self) -> None:
        self.run_once()
