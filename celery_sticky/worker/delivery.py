"""Reliable delivery on Redis: every queue a worker takes, ``BLMOVE`` into an in-flight list.

kombu's Redis transport consumes all of a channel's queues with one ``BRPOP``: the
message leaves the list when Redis answers, and the worker records it (kombu's
``unacked`` hash) only once it has read the answer. A worker killed in between
loses the message; a worker paused in between holds it in its socket and runs it
late, after its queue was moved on. Plain Celery on Redis has the same hole.

The worker takes a message with ``BLMOVE <queue> <in-flight list> RIGHT LEFT``,
which moves it, in one atomic step on the server, into an in-flight list of that
worker; the acknowledgement removes it from there (``LREM``). At no instant is the
message only in a process: it is in the queue or in an in-flight list until
acknowledged. A direct queue (``<sticky_queue_prefix>.<nodename>``) has exactly one
consumer, so its list is named after the queue (``_sticky.inflight.<queue>``). A
shared queue (the task queue a key without an owner waits in, affinity queues, any
queue given with ``-Q``) has a list per worker taking from it
(``_sticky.inflight.<queue>|<node>``), and the worker names its shared queues in a
set (``_sticky.taken.<node>``) so that whoever finds it dead knows which lists to
give back. kombu's own ``BRPOP`` path would leave a killed worker's shared-queue
messages in kombu's unacked hash, which records no consumer: they would come back
only after ``visibility_timeout`` (an hour by default), far behind the key's later
steps, or be lost in the ``BRPOP`` window.

**Why BLMOVE and not a stream with a consumer group.** Producers keep publishing
with kombu's ``LPUSH``: nothing changes on the producer side, in the message
format, in ``celery sticky`` looks into queues, in the reaper's and the drain's
moves (kombu ``get``), or for a mixed fleet during an upgrade. A stream would need
its own publish path, its own trimming, and a second format for every reader, to
get what a single-consumer queue does not need: several consumers per group.

**Shape.** :class:`ReliableChannel` subclasses kombu's Redis ``Channel`` (whichever
the transport uses: plain or Sentinel). While its only consumed queue is the queue
it names, it sends ``BLMOVE`` where kombu sends ``BRPOP`` (the poller is kombu's,
unchanged), and its QoS acknowledges with ``LREM``. ``BLMOVE`` takes from one list,
so the consumer step :mod:`celery_sticky.worker.bootsteps.delivery` opens one such
channel per queue on the worker's broker connection, consumes each there with
Celery's own task handler, and takes those queues out of Celery's task consumer.
Broadcast (fanout) queues stay with kombu.

**Not in kombu's unacked hash.** A message taken with ``BLMOVE`` is not written to
kombu's ``unacked`` hash: the in-flight list is its only record. Neither kombu's
visibility-timeout sweep nor its restore at shutdown can then restore it a second
time (no double restore), and a message held longer than ``visibility_timeout``
(a long backlog behind a busy key) is no longer delivered twice.

**Restore in place.** :func:`restore_inflight` (``restore_inflight.lua``, atomic)
moves an in-flight list back to the head of its queue, oldest taken first again. A
node restarted under its name does it for every list of its own before it consumes
(see ``_restore_own_unacked`` in :mod:`celery_sticky.worker.bootsteps.node`); the
reaper and the drain do it before they move the queue on
(:func:`celery_sticky.worker.reaper.restore_unacked`, :func:`restore_shared`). A
channel that closes (warm shutdown, broker reconnect) gives back the messages it
delivered and nobody acknowledged (``requeue_inflight.lua``: only those still in
flight, so nothing is duplicated); a rejected message asked to be requeued goes
back to the head as well (as RabbitMQ does), not to the tail.

**Priorities.** ``BLMOVE`` takes from one list, while kombu publishes a message
with a priority into a sub-list ``<queue>\\x06\\x16<n>``. A queue taken with
``BLMOVE`` ignores priorities: a key's order matters more than a message's priority.
At most once a second, before it waits, the channel moves what sits in the sub-lists
onto the queue's tail (``fold_priorities.lua``), so such a message joins the queue
within a second, never stranded. (kombu's Redis priorities are lower numbers first;
a message with none, Celery's default, is not in a sub-list.) A worker that needs
priorities on a shared queue sets ``sticky_reliable_delivery = False``.

**Prefetch.** The channel takes at most the worker's prefetch
(``worker_prefetch_multiplier`` x concurrency) unacknowledged messages, and follows
every change Celery and the gate make to it (``qos.increment_eventually`` for held
and ETA tasks, ``decrement_eventually`` when they run): see :func:`share_prefetch`.
Each of the worker's channels has that budget: the direct queue's messages are
nobody else's to take, so this takes nothing from other workers; a worker taking
several shared queues may hold that many messages of each. Celery's
``worker_disable_prefetch`` (a patch of the task consumer's channel) does not
reach these channels.

**Fault point.** ``after_receive`` (:mod:`celery_sticky.faults`) is reached right
after a ``BLMOVE`` answer is read, before the message is delivered.

**Off** (``sticky_reliable_delivery = False``), on other brokers, with kombu's
``global_keyprefix`` (its key prefixing does not cover these commands), or on a
Redis older than 6.2 (no ``BLMOVE``): kombu's ``BRPOP`` for every queue, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import cache
from importlib import resources
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import QoS as _VirtualQoS
from kombu.utils.encoding import bytes_to_str as _bytes_to_str
from kombu.utils.json import loads as _loads

from .. import faults
from ..settings import StickyConfig
from ..wire import inflight_key, moving_index, shared_inflight_index

logger = logging.getLogger(__name__)

# kombu's classes and helpers, untyped: seen as Any.
_RedisChannel: Any = kombu_redis.Channel
_RedisQoS: Any = kombu_redis.QoS
VirtualQoS: Any = _VirtualQoS
loads: Any = _loads
bytes_to_str: Any = _bytes_to_str

#: Seconds between two moves of a queue's priority sub-lists onto the queue.
FOLD_INTERVAL = 1.0


@cache
def _script_text(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text()


def _run_script(client: Any, name: str, keys: list[str], args: list[Any] | None = None) -> int:
    script = client.register_script(_script_text(name))
    return int(script(keys=keys, args=args or []))


def is_redis_channel(channel: Any) -> bool:
    return isinstance(channel, kombu_redis.Channel)


def restore_inflight(channel: Any, queue: str, node: str = "") -> int:
    """Move an in-flight list of ``queue`` back to its head, in delivery order; how
    many moved: the direct queue's (no ``node``), or ``node``'s list of a shared queue.

    Atomic (one script). 0 on a broker other than Redis. Only for a list whose
    consumer is dead or is this process before it consumes: the messages of tasks
    still running would run twice.
    """
    if not is_redis_channel(channel) or channel.global_keyprefix:
        return 0
    with channel.conn_or_acquire() as client:
        return _run_script(client, "restore_inflight", [queue, inflight_key(queue, node)])


def take_shared(channel: Any, node: str, queue: str) -> None:
    """Record that ``node`` takes shared ``queue`` with ``BLMOVE`` (before it does)."""
    with channel.conn_or_acquire() as client:
        client.sadd(shared_inflight_index(node), queue)


def restore_shared(channel: Any, node: str) -> int:
    """Give back every shared-queue message ``node`` took and did not acknowledge, and
    what it held of queues it was moving: each to the head of its queue, where any
    worker takes it. For a dead ``node``, or this process before it consumes. Returns
    how many moved."""
    if not is_redis_channel(channel) or channel.global_keyprefix:
        return 0
    with channel.conn_or_acquire() as client:
        queues = sorted(
            {bytes_to_str(q) for q in client.smembers(shared_inflight_index(node))}
            | {bytes_to_str(q) for q in client.smembers(moving_index(node))}
        )
    return sum(restore_inflight(channel, queue, node) for queue in queues)


def forget_shared(channel: Any, node: str) -> None:
    """Delete a retired ``node``'s record of shared queues (their lists were given back)."""
    if not is_redis_channel(channel) or channel.global_keyprefix:
        return
    restore_shared(channel, node)  # what a straggling BLMOVE took since
    with channel.conn_or_acquire() as client:
        client.delete(shared_inflight_index(node), moving_index(node))


def take_moving(channel: Any, mover: str, queue: str) -> None:
    """Record that ``mover`` moves ``queue`` on through its own in-flight list of it
    (before it takes anything), and give back what an earlier move left there."""
    with channel.conn_or_acquire() as client:
        client.sadd(moving_index(mover), queue)
    restore_inflight(channel, queue, mover)


def end_moving(channel: Any, mover: str, queue: str) -> None:
    """A move of ``queue`` by ``mover`` ended: forget it unless it left messages taken
    (a channel that could not give them back; :func:`give_back_moved` does later)."""
    with channel.conn_or_acquire() as client:
        if not client.llen(inflight_key(queue, mover)):
            client.srem(moving_index(mover), queue)


def give_back_moved(channel: Any, mover: str, skip: str = "") -> list[str]:
    """What moves of this live ``mover`` took and could not give back (the broker went
    away midway: the move failed and closing its channel failed too), back to the heads
    of their queues; returns the queues that got messages back. Call it only while
    ``mover`` moves none of them (``skip``: a queue a move may still be taking)."""
    if not is_redis_channel(channel) or channel.global_keyprefix:
        return []
    with channel.conn_or_acquire() as client:
        queues = sorted(bytes_to_str(q) for q in client.smembers(moving_index(mover)))
    back = []
    for queue in queues:
        if queue == skip:
            continue
        if restore_inflight(channel, queue, mover):
            back.append(queue)
        end_moving(channel, mover, queue)
    return back


def reliable_delivery_enabled(config: StickyConfig, connection: Any) -> bool:
    """Whether this worker's broker connection takes its queues with ``BLMOVE``."""
    if not config.reliable_delivery:
        return False
    channel = connection.default_channel
    if not is_redis_channel(channel):
        return False  # RabbitMQ requeues what a dead connection had not acknowledged
    if channel.global_keyprefix:
        logger.warning(
            "sticky: reliable delivery is off: the broker uses global_keyprefix %r",
            channel.global_keyprefix,
        )
        return False
    try:
        with channel.conn_or_acquire() as client:
            version = str(client.info("server").get("redis_version", ""))
    except channel.ResponseError:
        return True  # INFO refused (a managed Redis): BLMOVE may still be there
    if version and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (6, 2):
        logger.warning("sticky: reliable delivery is off: Redis %s has no BLMOVE", version)
        return False
    return True


class ReliableQoS(_RedisQoS):  # type: ignore[misc]
    """kombu's Redis QoS, except for messages taken with ``BLMOVE``: those are not
    written to kombu's unacked hash, their acknowledgement removes them from the
    in-flight list, and their restore puts them back at the queue's head."""

    channel: ReliableChannel

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.is_taken(delivery_tag):
            VirtualQoS.append(self, message, delivery_tag)  # the in-flight list records it
        else:
            super().append(message, delivery_tag)

    def _not_taken(self) -> bool:
        """For a tag this channel holds no taken message of: True when kombu's own
        bookkeeping applies, False when the channel closed (what it took was given
        back, and kombu's path would need the connection the close let go)."""
        return not (self.channel.closed or self.channel.connection is None)

    def ack(self, delivery_tag: str) -> None:
        raw = self.channel.release(delivery_tag)
        if raw is None:
            if self._not_taken():
                super().ack(delivery_tag)
            else:
                VirtualQoS.ack(self, delivery_tag)
            return
        try:
            self.channel.control.lrem(self.channel.inflight, -1, raw)
        except Exception:
            # Still in flight: given back when the channel closes (a reconnect), to
            # run again as a copy the gate or the applied records recognise.
            self.channel.retake(delivery_tag, raw)
            raise
        VirtualQoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        raw = self.channel.release(delivery_tag)
        if raw is None:
            if self._not_taken():
                super().reject(delivery_tag, requeue=requeue)
            else:
                VirtualQoS.ack(self, delivery_tag)
            return
        try:
            if requeue:
                self.channel.requeue([raw])
            else:
                self.channel.control.lrem(self.channel.inflight, -1, raw)
        except Exception:
            self.channel.retake(delivery_tag, raw)
            raise
        VirtualQoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """Give back what this channel delivered and nobody acknowledged (channel close)."""
        self._flush()
        taken: list[bytes] = []
        for tag in list(self._delivered):
            raws = self.channel.release_all(tag)
            if raws:
                taken.extend(raws)
            else:
                self.restore_by_tag(tag, client=client)
        self._delivered.clear()
        if not taken:
            return
        try:
            self.channel.requeue(list(reversed(taken)))  # newest first: the oldest at the head
        except Exception:
            # Still in the in-flight list, so not lost: the consumer step gives them
            # back when it starts again (a reconnect); else the node's next start,
            # the drain or the reaper does.
            self.channel.unreturned.extend(reversed(taken))
            logger.warning(
                "sticky: could not give back %d message(s) to %s; they stay in its "
                "in-flight list until the node restarts, drains or is reaped",
                len(taken),
                self.channel.reliable_queue,
                exc_info=True,
            )


class ReliableChannel(_RedisChannel):  # type: ignore[misc]
    """A Redis channel that takes its one queue with ``BLMOVE`` (module doc)."""

    QoS = ReliableQoS

    #: The queue this channel takes with BLMOVE; set by :func:`open_channel`.
    reliable_queue: str | None = None
    inflight = ""
    _sent: str | None = None  # the blocking command waiting for its answer
    _folded_at = float("-inf")
    _in_poll: Any
    _brpop_sent_at: float | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # delivery tag -> the messages exactly as taken (the LREM needs the bytes)
        self._taken: dict[str, list[bytes]] = {}
        self._taken_lock = threading.Lock()
        #: Messages this channel could not give back when it closed, newest first.
        self.unreturned: list[bytes] = []
        #: A client for acknowledgements and give-backs (thread-safe: a pool). It keeps
        #: the pool after the channel closed, when late acknowledgements still come.
        self.control: Any = self._create_client()

    # -- bookkeeping of taken messages (acks may come from other threads) ---------

    def is_taken(self, tag: str) -> bool:
        with self._taken_lock:
            return tag in self._taken

    def release(self, tag: str) -> bytes | None:
        with self._taken_lock:
            raws = self._taken.get(tag)
            if not raws:
                return None
            raw = raws.pop()
            if not raws:
                del self._taken[tag]
            return raw

    def retake(self, tag: str, raw: bytes) -> None:
        with self._taken_lock:
            self._taken.setdefault(tag, []).append(raw)

    def release_all(self, tag: str) -> list[bytes]:
        with self._taken_lock:
            return self._taken.pop(tag, [])

    def requeue(self, raws: list[bytes]) -> int:
        """Messages still in flight back to the queue's head (``raws`` newest first)."""
        assert self.reliable_queue is not None
        return _run_script(
            self.control, "requeue_inflight", [self.reliable_queue, self.inflight], list(raws)
        )

    # -- the blocking take ---------------------------------------------------------

    def _reliable(self) -> str | None:
        queue = self.reliable_queue
        return queue if queue is not None and list(self._active_queues) == [queue] else None

    def _brpop_start(self, timeout: float | None = None) -> None:
        queue = self._reliable()
        if queue is None:
            self._sent = "BRPOP"
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        self._maybe_fold(queue)
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()
        self._sent = "BLMOVE"
        connection.send_command("BLMOVE", queue, self.inflight, "RIGHT", "LEFT", timeout or 0)

    def _brpop_read(self, **options: Any) -> bool:
        if self._sent != "BLMOVE":
            return bool(super()._brpop_read(**options))
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                # Reconnect on the next round; what BLMOVE may have moved meanwhile
                # is in the in-flight list, given back when the channel closes.
                self.client.connection.disconnect()
                raise
            if not item:
                raise Empty()
            faults.reach("after_receive")
            self._deliver_taken(item)
            return True
        finally:
            self._in_poll = None
            self._sent = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush is not None:
                flush()

    def _read_taken(self, queue: str, item: bytes) -> tuple[Any, str] | None:
        """``(payload, delivery tag)`` of a message just taken into the in-flight list;
        None for one no worker can read, dropped from the list, loudly (kombu's
        ``BRPOP`` would raise into the event loop and lose it)."""
        try:
            payload = loads(bytes_to_str(item))
            return payload, str(payload["properties"]["delivery_tag"])
        except Exception:
            logger.error(
                "sticky: dropped an unreadable message from %s: %r", queue, bytes(item[:500])
            )
            self.control.lrem(self.inflight, -1, item)
            return None

    def _deliver_taken(self, item: bytes) -> None:
        queue = self.reliable_queue
        assert queue is not None
        taken = self._read_taken(queue, item)
        if taken is None:
            raise Empty()
        payload, tag = taken
        if queue not in self.connection._callbacks:
            self.requeue([item])  # cancelled while BLMOVE waited: back to the head
            raise Empty()
        with self._taken_lock:
            self._taken.setdefault(tag, []).append(item)
        self.connection._deliver(payload, queue)

    # -- taking one message (a queue move: the reaper, the drain) -----------------

    def _get(self, queue: str, timeout: Any = None) -> Any:
        """``basic_get`` of the channel's queue: ``LMOVE`` into its in-flight list.

        A queue move (:func:`celery_sticky.worker.reaper.move_queue`) takes a dead or
        drained worker's whole queue before it republishes it. With kombu's ``get``
        (``RPOP``, then kombu's unacked hash) a mover that died or lost the broker
        midway left what it had taken in that hash, where Redis gives it back only
        after ``visibility_timeout`` (an hour by default), and the queue's owner,
        restarted meanwhile, never looks (seen in the nemesis: 7,151 messages of a
        restarted worker's queue stranded there). In the queue's in-flight list they
        go back to the queue's head with the owner's next start, the next reaper
        pass, or this channel's close.
        """
        if queue != self.reliable_queue:
            return super()._get(queue, timeout)
        self._maybe_fold(queue)
        while True:
            item = self.control.lmove(queue, self.inflight, "RIGHT", "LEFT")
            if item is None:
                raise Empty()
            taken = self._read_taken(queue, item)
            if taken is None:
                continue
            payload, tag = taken
            with self._taken_lock:
                self._taken.setdefault(tag, []).append(item)
            return payload

    def _maybe_fold(self, queue: str) -> None:
        """Move the queue's priority sub-lists onto it (at most every FOLD_INTERVAL s)."""
        now = time.monotonic()
        if now - self._folded_at < FOLD_INTERVAL:
            return
        self._folded_at = now
        subs = [self._q_for_pri(queue, p) for p in self.priority_steps]
        subs = [name for name in dict.fromkeys(subs) if name != queue]
        if not subs:
            return
        try:
            moved = _run_script(self.control, "fold_priorities", [queue, *subs])
        except self.ResponseError:
            logger.warning("sticky: could not fold the priorities of %s", queue, exc_info=True)
            return
        if moved:
            logger.info(
                "sticky: %d message(s) with a priority moved onto %s (queues taken "
                "with BLMOVE ignore priorities)",
                moved,
                queue,
            )


_CLASSES: dict[type, type] = {}


def reliable_channel_class(base: type) -> type:
    """:class:`ReliableChannel` over the transport's own channel class (plain, Sentinel)."""
    if issubclass(base, ReliableChannel):
        return base
    if base is kombu_redis.Channel:
        return ReliableChannel
    found = _CLASSES.get(base)
    if found is None:
        found = _CLASSES[base] = type(f"Reliable{base.__name__}", (ReliableChannel, base), {})
    return found


def open_channel(connection: Any, queue: str, node: str = "") -> Any:
    """A :class:`ReliableChannel` on ``connection`` (a kombu Connection) for ``queue``:
    the direct queue, or a shared queue with ``node``'s own in-flight list."""
    transport = connection.transport
    cls = reliable_channel_class(transport.Channel)
    channel = cls(connection.connection)
    channel.reliable_queue = queue
    channel.inflight = inflight_key(queue, node)
    transport.channels.append(channel)  # closed with the connection, like kombu's own
    return channel


def give_back(old: Any, new: Any = None) -> None:
    """Before ``new`` consumes: what ``old`` (the channel before a reconnect) delivered
    and nobody acknowledged goes back to the queue's head, if closing ``old`` could not
    do it (the broker was away). ``new`` None: the queue is no longer consumed."""
    try:
        old.close()
    except Exception:
        logger.debug("sticky: closing the previous delivery channel failed", exc_info=True)
    try:
        old.qos.restore_unacked()  # a no-op when the close did it
    except Exception:
        logger.debug("sticky: restoring through the previous channel failed", exc_info=True)
    if old.unreturned:
        try:
            (new if new is not None else old).requeue(list(old.unreturned))
        except Exception:
            # Still in the in-flight list: the reconnected consumer's full restore
            # (the "Sticky gate" step) or the node's next start gives them back.
            logger.warning("sticky: could not give back %d message(s) yet", len(old.unreturned))
        old.unreturned.clear()


def share_prefetch(qos: Any, channel: Any) -> None:
    """Make Celery's prefetch control (``consumer.qos``) set ``channel``'s prefetch too.

    Every change Celery or the gate makes (held and ETA tasks give their slot back
    with ``increment_eventually``) reaches both the task consumer's channel and
    this one, so a held message of either never blocks the other's next one.
    """
    channel.basic_qos(0, qos.value, False)
    original = qos.callback

    def set_prefetch_count(prefetch_count: int) -> Any:
        channel.basic_qos(0, prefetch_count, False)
        return original(prefetch_count=prefetch_count)

    qos.callback = set_prefetch_count
