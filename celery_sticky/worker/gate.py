"""The per-key gate: one task per key at a time, in each producer's order.

It sits in the worker's main process at the ``Task.Strategy`` level, before the
pool: locks taken inside tasks were measured to break order and block pool slots
(see DESIGN.md). Each workflow key has a FIFO of entries; only the head runs.
Before the head runs, the gate proves this worker owns the key, or forwards the
message to the owner. Entries waiting behind a busy key give their prefetch slot
back (as Celery does for ETA tasks), so they do not starve other keys.

Order is by sequence number, not arrival (:mod:`celery_sticky.sequence`): of
the entries waiting, the first to arrive whose number is next in its producer's
stream runs (the key's record of last applied numbers is read from the node's
local state). A later number waits for the missing one at most
``sticky_gap_timeout`` seconds, then runs with the gap reported. A retry keeps
its place: its number stays reserved while its countdown runs, so later
messages wait for it. A countdown task, a failed or dead-lettered one gives its
number up at once (it runs when due, or not at all).

Completion is observed on the request's pool callbacks (``on_success`` and
``on_failure``, which may fire twice: release is idempotent), never on
``Task.Request`` subclasses (Celery's generated request class bypasses them).
"""

from __future__ import annotations

import datetime
import enum
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import Retry, TaskRevokedError
from celery.utils.time import maybe_iso8601
from celery.worker.state import task_ready, task_reserved
from celery.worker.strategy import default as default_strategy
from kombu.message import Message

from .. import faults, metrics
from ..errors import (
    ConfigurationError,
    Fenced,
    ForwardingError,
    InvalidHeaderError,
    InvalidKeyError,
)
from ..events import dispatcher_send, ownership_changed, sequence_gap
from ..lease import ClaimStatus
from ..placement import affinity_queue_name
from ..producer.own_tasks import END_WORKFLOW, MOVE_KEY
from ..sequence import StreamRecord
from ..wire import HEADER, StickyHeader, check_task_body
from .backlog import GAP_BACKLOG_FACTOR, BacklogProbe
from .deadletter import dead_letter
from .forwarding import forward
from .lease_clock import CHAIN_HEADER
from .node import StickyNode

logger = logging.getLogger(__name__)

GateKey = tuple[str, str]


class _Outcome(enum.Enum):
    RUNNING = "running"  # handed to the pool; completion will release the key
    DONE = "done"  # finished, forwarded or dropped: the next entry may go
    WAIT = "wait"  # ownership cannot be proven now: retry later


class _Entry:
    """A task waiting for, or holding, its key's turn."""

    __slots__ = (
        "copies",
        "created",
        "dispatch",
        "fenced",
        "finished",
        "header",
        "held",
        "job",
        "message",
        "request",
        "retried",
        "retry_delay",
        "seq",
        "started",
        "stream",
        "submitted",
        "task_id",
        "unordered",
    )

    def __init__(
        self,
        header: StickyHeader,
        message: Message,
        dispatch: Callable[[], Any] | None = None,
        request: Any = None,
    ) -> None:
        self.header = header
        self.message = message
        self.dispatch = dispatch  # runs Celery's default strategy on the raw message
        self.request = request  # the Request, once one exists
        self.held = False  # counted out of prefetch while waiting
        self.started = False
        self.submitted = False  # handed to the pool (not only to the semaphore)
        self.job: Any = None  # what the pool's apply_async returned
        self.finished = False
        self.retry_delay = 0.0
        self.stream, self.seq = header.stream, header.seq
        headers = message.headers or {}
        # A retry reuses its task's id: a copy is the same id *and* the same retry.
        self.created = time.monotonic()
        self.task_id: str | None = (
            f"{headers['id']}/{headers.get('retries') or 0}" if headers.get("id") else None
        )
        self.copies: list[Message] = []  # duplicates, acked once this entry is done
        self.fenced = False  # its run ended at the fence: its copies run instead
        self.retried = False  # its run asked for a retry that keeps its place
        # Begun to be forwarded or to wait for the store, not because its turn came:
        # if its proof then finds the key this worker's, it goes back to its line.
        self.unordered = False

    @property
    def gate_key(self) -> GateKey:
        return (self.header.workflow, self.header.key)


class KeyGate:
    """The per-key FIFOs of one worker."""

    def __init__(self, app: Celery, node: StickyNode) -> None:
        self.app = app
        self.node = node
        self.consumer: Any = None  # the worker's Consumer, set by the strategy
        self._queues: dict[GateKey, deque[_Entry]] = {}
        self._task_ids: dict[str, _Entry] = {}  # every raw entry in a queue, by task id
        #: Keys with nothing queued or running -> when their last task ended
        #: (monotonic); kept only when idle passivation is on.
        self.idle: dict[GateKey, float] = {}
        self._track_idle = node.config.idle_timeout is not None
        #: Busy keys' records of last applied numbers per stream, as last read.
        self._records: dict[GateKey, StreamRecord] = {}
        #: Numbers held for retries waiting for their countdown:
        #: key -> stream -> (seq, until when, monotonic).
        self._reserved: dict[GateKey, dict[str, tuple[int, float]]] = {}
        #: Keys with a gap timer pending.
        self._gap_timers: set[GateKey] = set()
        #: Keys whose every waiting entry waits for a missing number.
        self._gap_waiting: set[GateKey] = set()
        #: key -> stream -> since when (monotonic) the stream's next message is
        #: missing while the key could otherwise run. The gap timeout counts from
        #: there, not from a message's arrival: a message held behind a busy key
        #: for longer than ``sticky_gap_timeout`` must still wait for its
        #: predecessor once the key is free (seen in the nemesis: thousands of
        #: steps held behind slow keys ran past gaps at once, out of order).
        self._gap_since: dict[GateKey, dict[str, float]] = {}
        #: Whether messages wait where a missing one may be (started on first use).
        self._backlog: BacklogProbe | None = None
        self._lock = threading.RLock()
        self._local = threading.local()

    # -- inspection ------------------------------------------------------------

    def busy_keys(self) -> int:
        return len(self._queues)

    def key_status(self, workflow: str, key: str) -> tuple[int, bool]:
        """``(entries queued, head running)`` of one key (``(0, False)``: idle here)."""
        with self._lock:
            entries = self._queues.get((workflow, key))
            if not entries:
                return 0, False
            return len(entries), bool(entries[0].started)

    def head_of(self, workflow: str, key: str) -> dict[str, Any] | None:
        """The first entry of a key's line, for an operator (``celery sticky show key``):
        which task, its number, whether it started and reached the pool, and for how
        long it has been here. None when the key has nothing here."""
        with self._lock:
            entries = self._queues.get((workflow, key))
            if not entries:
                return None
            head = entries[0]
            return {
                "task_id": head.task_id,
                "stream": head.stream,
                "seq": head.seq,
                "started": head.started,
                "in_pool": head.submitted,
                "seconds_here": round(time.monotonic() - head.created, 3),
            }

    def keys_with_tasks(self) -> set[GateKey]:
        """Keys with a task queued or running here, or scheduled (ETA) for later."""
        with self._lock:
            keys = set(self._queues)
        timer = getattr(self.consumer, "timer", None)
        for waiting in list(getattr(timer, "queue", ())):
            request = next(iter(getattr(waiting.entry, "args", ())), None)
            header = StickyHeader.safe_from_headers(
                getattr(getattr(request, "message", None), "headers", None)
            )
            if header is not None:
                keys.add((header.workflow, header.key))
        return keys

    def waiting(self) -> int:
        with self._lock:
            return sum(len(q) - 1 for q in self._queues.values())

    # -- entry points ----------------------------------------------------------

    def submit(self, entry: _Entry) -> None:
        """Queue an entry behind its key; run it now if the key is free."""
        key = entry.gate_key
        with self._lock:
            if entry.task_id is not None and entry.request is None:
                original = self._task_ids.get(entry.task_id)
                if original is not None:
                    # A second copy of a task the gate holds or runs (a publisher sent
                    # it twice, or Redis redelivered a held message after its
                    # visibility timeout): the first copy runs; this one is acked when
                    # it is done (not before: if the worker dies first, it comes back).
                    logger.info("sticky: holding a duplicate of task %s", entry.task_id)
                    metrics.duplicates.inc()
                    original.copies.append(entry.message)
                    # It gives its prefetch slot back while it waits, like a held entry:
                    # copies held behind keys that wait for a missing number once took
                    # every slot, so the missing messages behind them in the queue were
                    # never fetched (seen in the nemesis: a worker idle for minutes with
                    # 12,699 messages queued and 8 duplicates held).
                    self._qos("increment_eventually")
                    return
                self._task_ids[entry.task_id] = entry
            if self._track_idle:
                self.idle.pop(key, None)
            queue = self._queues.setdefault(key, deque())
            queue.append(entry)
            if len(queue) > 1:
                entry.held = True
                self._qos("increment_eventually")
                if queue[0].started or key not in self._gap_waiting:
                    return  # running, or waiting for the lease store: not for this one
                # The line waits for a missing number: this may be it.
        self._run_head(key)

    def launch(self, request: Any) -> None:
        """Hand a request to the pool, watching for its completion.

        Called (through the consumer proxy) by Celery's strategy while the gate
        dispatches an entry; anything else (rate-limited buckets) passes straight.
        """
        entry: _Entry | None = getattr(self._local, "entry", None)
        if entry is None:
            self.consumer.on_task_request(request)
            return
        entry.request = request
        self._watch(entry, request)
        self.consumer.on_task_request(request)

    def on_eta_due(self, request: Any) -> None:
        """An ETA/countdown task is due: it queues behind its key like a new arrival."""
        task_reserved(request)
        self._qos("decrement_eventually")
        header = StickyHeader.safe_from_headers(request.message.headers)
        if header is None:  # cannot happen for a message the gate admitted
            self.consumer.on_task_request(request)
            return
        self.submit(_Entry(header, request.message, request=request))

    def forget_unstarted(self) -> None:
        """After a broker reconnect: drop entries whose messages the broker restores.

        Entries handed to a pool process keep their place until they complete. One
        the pool had not written to a process yet was dropped by the reconnect
        (Celery's ``on_close`` flushes the pool: see :func:`_still_runs`), so
        it goes too. Kept, it held its key for good, its redelivered copy waiting
        behind it (seen in the nemesis on RabbitMQ: keys stuck for minutes behind a
        head "in the pool", their messages delivered and unacknowledged).
        """
        with self._lock:
            for key in list(self._queues):
                kept = deque(
                    e
                    for e in self._queues[key]
                    if e.submitted and not e.finished and _still_runs(e.job)
                )
                for entry in kept:
                    # Its held copies went back with the channel (they come again), and
                    # the slots they gave back with the prefetch count Celery resets.
                    entry.copies.clear()
                if kept:
                    self._queues[key] = kept
                else:
                    del self._queues[key]
            self._gap_waiting.intersection_update(self._queues)
            self._gap_since = {k: v for k, v in self._gap_since.items() if k in self._queues}
            self._task_ids = {
                e.task_id: e
                for q in self._queues.values()
                for e in q
                if e.task_id is not None and e.request is None
            }

    # -- the head of a key -------------------------------------------------------

    def _run_head(self, key: GateKey) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(key)
                if not queue or queue[0].started:
                    return
                head = self._choose(key, queue)
                if head is not None:
                    head.unordered = False
                    self._begin(head)
            if head is None:
                head = self._past_gap(key)
                if head is None:
                    return
            outcome = self._start(head)
            if outcome is _Outcome.RUNNING:
                return
            if outcome is _Outcome.WAIT:
                with self._lock:
                    head.started = False
                self._retry_later(key, head)
                return
            self._pop(key, head)

    def _begin(self, entry: _Entry) -> None:
        """Mark the key's chosen entry started (called holding the lock)."""
        entry.started = True
        since = self._gap_since.get(entry.gate_key)
        if since is not None:
            since.pop(entry.stream, None)  # its stream goes on: no gap held any more
            if not since:
                del self._gap_since[entry.gate_key]
        if entry.held:
            entry.held = False
            self._qos("decrement_eventually")

    # -- order by sequence number ------------------------------------------------

    def _record(self, key: GateKey) -> StreamRecord:
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = self.node.state.streams(*key)
        return record

    def _choose(
        self,
        key: GateKey,
        queue: deque[_Entry],
        record: StreamRecord | None = None,
        now: float | None = None,
    ) -> _Entry | None:
        """The entry to run next (moved to the queue's front), None when all wait.

        ``record`` is the key's record of applied numbers (default: the one in
        the local state). With ``now``, an entry that waited ``sticky_gap_timeout``
        may run past its gap (counted from when the key first waited for it).
        """
        record = self._record(key) if record is None else record
        reserved = self._reserved.get(key, {})
        gap_since = self._gap_since.get(key, {})
        lowest: dict[str, int] = {}
        for entry in queue:
            if entry.seq and entry.seq < lowest.get(entry.stream, entry.seq + 1):
                lowest[entry.stream] = entry.seq
        for entry in queue:
            if self._ready(entry, record, reserved, lowest, gap_since, now):
                if entry is not queue[0]:
                    displaced = queue[0]
                    queue.remove(entry)
                    queue.appendleft(entry)
                    if not displaced.held:
                        displaced.held = True
                        self._qos("increment_eventually")
                return entry
        return None

    def _ready(
        self,
        entry: _Entry,
        record: StreamRecord,
        reserved: dict[str, tuple[int, float]],
        lowest: dict[str, int],
        gap_since: dict[str, float],
        now: float | None,
    ) -> bool:
        if not entry.seq:
            return True  # not numbered (published without the router): arrival order
        held_for = reserved.get(entry.stream)
        if held_for is not None and time.monotonic() < held_for[1]:
            return entry.seq <= held_for[0]  # only the reserved retry (or older) may go
        expected = record.expected(entry.stream)
        if expected is None:
            # A stream an incomplete record does not know: from its lowest arrival.
            return entry.seq == lowest[entry.stream]
        if entry.seq <= expected:
            return True  # next, or done already (a copy: the task's dedup answers it)
        since = gap_since.get(entry.stream)
        timed_out = now is not None and since is not None and self._gap_expired(since, now)
        return timed_out and entry.seq == lowest[entry.stream]

    def _gap_expired(self, since: float, now: float) -> bool:
        """Whether a key that has waited for a missing number since ``since`` goes on.

        After ``sticky_gap_timeout``, unless messages still wait where the missing one
        may be (:mod:`celery_sticky.worker.backlog`: this worker's queue, where a
        forward or a moved backlog joins the tail, and the other workers' queues and
        in-flight lists; seen in the nemesis: forwarded steps reached a busy owner two
        minutes after they were sent, and 58 gaps were declared meanwhile). Then the
        key waits on, for at most ``GAP_BACKLOG_FACTOR`` timeouts in all, so that a
        lost message stops its key for a bounded time in a cluster that never
        catches up.
        """
        waited, timeout = now - since, self.node.config.gap_timeout
        if waited < timeout:
            return False
        return waited >= timeout * GAP_BACKLOG_FACTOR or not self._backlog_seen(now)

    def _backlog_seen(self, now: float) -> bool:
        """Whether messages wait where a missing one may be, as last seen by the
        backlog probe (never asked here: see :class:`BacklogProbe`)."""
        if self._backlog is None:
            self._backlog = BacklogProbe(self.app, self.node)
        return self._backlog.ask(now)

    def _past_gap(self, key: GateKey) -> _Entry | None:
        """Every waiting entry of the key waits for an earlier number.

        First make sure which record holds. The local one is this epoch's when the
        local state is; otherwise the key is new here (nothing to adopt: every
        stream starts at 1), or its first task here adopts a copy or a loss (the
        record is not known yet: each stream from its lowest arrival). Then an
        entry that waited ``sticky_gap_timeout`` runs with its gap reported, and
        the others wait for the earliest deadline.
        """
        with self._lock:
            queue = self._queues.get(key)
            if not queue or queue[0].started:
                return None
            head = queue[0]
        header = head.header
        lease = self.node.prove(header.workflow, header.key, header.affinity, header.epoch)
        if lease is None or lease.owner != self.node.name or lease.status is ClaimStatus.MOVING:
            # Not ours (or no answer): _start forwards it or waits for the store. Moving
            # here: _start waits for the move to commit; its copy brings the record.
            # Its turn did not come: should _start's own proof find the key this
            # worker's (the store answers again, the owner died meanwhile), the head
            # goes back to its line instead of running past the numbers it waits for
            # (seen in the nemesis: a lease store restart between the two proofs, and
            # a key's steps ran in arrival order from then on).
            faults.reach("unproven_head")
            with self._lock:
                self._gap_waiting.discard(key)
                queue = self._queues.get(key)
                if not queue or queue[0] is not head or head.started:
                    return None
                head.unordered = True
                self._begin(head)
            return head
        record: StreamRecord | None = None
        if self.node.state.epoch(*key) != lease.epoch:
            record = self._starting_record(key)
        with self._lock:
            queue = self._queues.get(key)
            if not queue or queue[0].started:
                return None
            now = time.monotonic()
            since = self._gap_since.setdefault(key, {})
            for waiting in queue:
                if waiting.seq:
                    since.setdefault(waiting.stream, now)  # the key waits from now
            entry = self._choose(key, queue, record, now=now)
            if entry is not None:
                self._gap_waiting.discard(key)
                entry.unordered = False
                self._begin(entry)
                known = self._record(key) if record is None else record
                expected = known.expected(entry.stream) or entry.seq
                if entry.seq > expected:
                    sequence_gap(
                        *key,
                        entry.stream,
                        (expected, entry.seq - 1),
                        self.node.name,
                        send=dispatcher_send(self.consumer),
                    )
                return entry
            reserved = self._reserved.get(key, {})
            timeout = self.node.config.gap_timeout
            deadlines = [
                reserved[e.stream][1]
                if reserved.get(e.stream, (0, 0.0))[1] > now
                # A gap (or a retry whose place ran out: it is one now, timed from
                # when the key began to wait). Past its timeout, the gap waits for
                # this worker's backlog: look again in a second.
                else max(
                    since[e.stream] + timeout,
                    min(now + 1.0, since[e.stream] + timeout * GAP_BACKLOG_FACTOR),
                )
                for e in queue
                if e.seq
            ]
            self._gap_waiting.add(key)
            for waiting in queue:
                # All of them wait: none may hold a prefetch slot, or the missing
                # message could not be fetched (forwarded here, it is behind them).
                if not waiting.held:
                    waiting.held = True
                    self._qos("increment_eventually")
            deadline = min((d for d in deadlines if d > now), default=None)
            if deadline is not None and key not in self._gap_timers:
                self._gap_timers.add(key)
                self.consumer.timer.call_after(max(deadline - now, 0.01), self._gap_due, (key,))
            return None

    def _starting_record(self, key: GateKey) -> StreamRecord:
        """The record of a key whose first task here has not adopted its state yet.

        A key with a copy to adopt has the record switched in with the copy. A key
        with no history here (no local state, no copy, not taken over from a dead
        owner) starts with the record its ended workflow left, or an empty one:
        every stream it does not know starts at 1. Otherwise (its state was lost)
        each stream runs from its lowest arrival.
        """
        workflow, key_ = key
        store = self.node.store
        config = self.node.config
        try:
            if config.state_replication != "off" and store.copy_pointer(*key):
                # The copy the first task adopts: its record was switched in with it.
                streams = store.copy_streams(*key)
                if streams is None:
                    return StreamRecord(complete=False)
                return StreamRecord.parse(streams)
            if not self.node.state.has_state(workflow, key_):
                if config.copy_holds_every_commit:
                    # No copy, and every commit writes one: nothing ran here yet.
                    return StreamRecord.parse(store.ended_streams(workflow, key_))
                info = store.lookup(workflow, key_)
                if info is None or info.origin != "taken_over":
                    return StreamRecord.parse(store.ended_streams(workflow, key_))
        except Exception:
            logger.debug("sticky: could not tell whether %s:%s is new here", *key, exc_info=True)
        return StreamRecord(complete=False)

    def _gap_due(self, key: GateKey) -> None:
        self._gap_timers.discard(key)
        self._run_head(key)

    def _scheduled(self, key: GateKey, entry: _Entry) -> None:
        """The entry left without running now: Celery scheduled it (countdown/ETA) or
        dropped it (revoked, expired). A retry keeps its number reserved; anything
        else gives it up, so later messages do not wait for it."""
        if not entry.seq:
            return
        headers = entry.message.headers or {}
        if headers.get("eta") and headers.get("retries") and self._retry_in_place(headers):
            self._reserve(key, entry.stream, entry.seq, _seconds_until(headers["eta"]))
        else:
            self._consume(key, entry.stream, entry.seq)

    def _retry_in_place(self, headers: Any) -> bool:
        task = self.app.tasks.get(headers.get("task"))
        return bool(getattr(task, "sticky_retry_in_place", True))

    def _reserve(self, key: GateKey, stream: str, seq: int, due_in: float = 0.0) -> None:
        """Hold ``seq`` of ``stream`` for a retry: until it is due, then as long as a
        gap may last (a retry that never comes does not stop the key for good)."""
        until = time.monotonic() + max(due_in, 0.0) + self.node.config.gap_timeout
        with self._lock:
            self._reserved.setdefault(key, {})[stream] = (seq, until)

    def _consume(self, key: GateKey, stream: str, seq: int) -> None:
        try:
            self.node.state.consume(key[0], key[1], stream, seq)
        except Exception:
            logger.exception("sticky: could not record number %s of %s:%s as done", seq, *key)
        with self._lock:
            self._records.pop(key, None)

    def _pop(self, key: GateKey, entry: _Entry) -> None:
        with self._lock:
            queue = self._queues.get(key)
            if not queue or queue[0] is not entry:
                return
            queue.popleft()
            if entry.task_id is not None and self._task_ids.get(entry.task_id) is entry:
                del self._task_ids[entry.task_id]
            # The task may have committed its number: read the record again.
            self._records.pop(key, None)
            stateless = (
                entry.request is not None
                and entry.seq
                and not _keeps_state(self.app, entry.message)
            )
            reserved = self._reserved.get(key)
            if (
                reserved is not None
                and entry.request is not None
                and not entry.retried
                and reserved.get(entry.stream, (0, 0.0))[0] == entry.seq
            ):
                del reserved[entry.stream]  # the retry ran (or gave its number up)
                if not reserved:
                    del self._reserved[key]
            if not queue:
                del self._queues[key]
                self._gap_waiting.discard(key)
                self._gap_since.pop(key, None)
                if self._track_idle:
                    if _is_own_task(entry.message):
                        # end_workflow ended the key, move_key moved it away: neither
                        # leaves a key here to passivate (it would claim a new epoch
                        # only to release it again, every sticky_idle_timeout).
                        self.idle.pop(key, None)
                    else:
                        self.idle[key] = time.monotonic()
        if stateless and entry.stream not in self._reserved.get(key, {}):
            # A task without a state handle commits nothing: its number is done here.
            self._consume(key, entry.stream, entry.seq)
        for copy in entry.copies:
            self._qos("decrement_eventually")  # the slot it gave back while held
            if copy.acknowledged:
                continue
            if entry.fenced:
                # The fence sent the task again and it came back here (the key is
                # still this worker's: the lease store had counted it dead for a
                # moment, say during a failover): this copy is the task now. It goes
                # back to its queue's head and comes in again, as a task of its own.
                copy.requeue()  # type: ignore[no-untyped-call]
            else:
                copy.ack()  # type: ignore[no-untyped-call]
                # Its number is done with the task: later messages must not wait for it
                # (a copy sent again under the task's id draws a number of its own).
                header = StickyHeader.safe_from_headers(copy.headers)
                if header is not None and header.seq and header.seq != entry.seq:
                    self._consume(key, header.stream, header.seq)

    def _start(self, entry: _Entry) -> _Outcome:
        header = entry.header
        lease = self.node.prove(header.workflow, header.key, header.affinity, header.epoch)
        if lease is None:
            return _Outcome.WAIT
        if lease.status is ClaimStatus.MOVING and lease.owner == self.node.name:
            # Moving here: ask again every 0.2 s (a move commits within about
            # sticky_lease_cache_ttl), not with the store-outage backoff.
            entry.retry_delay = 0.1
            return _Outcome.WAIT
        entry.retry_delay = 0.0
        if entry.unordered and lease.owner == self.node.name:
            # Begun only to be forwarded or to wait for the store, and the key is this
            # worker's: back to its line, where its turn is checked (next look: 0.1 s).
            entry.unordered = False
            return _Outcome.WAIT
        if lease.status is ClaimStatus.NO_LIVE_WORKER:
            # This node may not hold the key and no live worker may: wait in the
            # affinity's queue for one that may.
            queue = affinity_queue_name(self.node.config.queue_prefix, header.affinity)
            self._forward_to(entry, queue, 0)
            return _Outcome.DONE
        if lease.owner != self.node.name:
            self._forward(entry, lease.owner, lease.epoch)
            return _Outcome.DONE
        if lease.status in (ClaimStatus.CLAIMED, ClaimStatus.TAKEN_OVER):
            ownership_changed(
                "claimed" if lease.status is ClaimStatus.CLAIMED else "taken_over",
                header.workflow,
                header.key,
                lease.epoch,
                lease.owner,
                previous=lease.previous or None,
                send=dispatcher_send(self.consumer),
            )
        metrics.gate_wait.observe(time.monotonic() - entry.created)
        faults.reach("after_prove")
        proven = header._replace(epoch=lease.epoch).encode()
        # The chain of known leases this proof belongs to: the pool commits on it
        # without asking the store while the node's record still names it (0: ask).
        chain = self.node.known.chain_of(header.workflow, header.key, lease.epoch)
        headers = [entry.message.headers]
        if entry.request is not None:
            # A due ETA/countdown task: its Request copied the headers when it
            # arrived; it runs (and adopts) under the epoch proven now.
            headers.append(entry.request.request_dict)
        for fields in headers:
            fields[HEADER] = proven
            if chain:
                fields[CHAIN_HEADER] = chain
            else:
                fields.pop(CHAIN_HEADER, None)  # one that came with the message
        self._local.entry = entry
        try:
            if entry.request is not None:
                self._watch(entry, entry.request)
                self.consumer.on_task_request(entry.request)
            elif entry.dispatch is not None:
                entry.dispatch()
        except Exception as exc:
            logger.exception("sticky: could not start a task of %s:%s", *entry.gate_key)
            if not entry.message.acknowledged:
                self._dead_letter(entry.message, f"could not start: {exc!r}")
            return _Outcome.DONE
        finally:
            self._local.entry = None
        if entry.request is None or entry.finished:
            # Celery dropped it (revoked, expired) or scheduled it (ETA), or the
            # pool ran it synchronously (solo): the key is free again.
            if entry.request is None:
                self._scheduled(entry.gate_key, entry)
            return _Outcome.DONE
        return _Outcome.RUNNING

    def _forward(self, entry: _Entry, owner: str, epoch: int) -> None:
        self._forward_to(entry, self.node.config.direct_queue_name(owner), epoch)

    def _forward_to(self, entry: _Entry, queue: str, epoch: int) -> None:
        try:
            forward(self.app, entry.message, entry.header, queue, epoch, self.node.config.max_hops)
        except ForwardingError as exc:
            logger.error("sticky: %s", exc)
        except Exception:
            # The broker did not take the copy (a cut connection): the message stays
            # unacknowledged and comes back (reconnect, restart or reaper), rather
            # than stop the consumer (seen in the nemesis: "Unrecoverable error").
            logger.exception("sticky: could not forward a task of %s:%s", *entry.gate_key)
        if entry.request is not None:
            task_ready(entry.request)

    def _retry_later(self, key: GateKey, entry: _Entry) -> None:
        entry.retry_delay = min(max(entry.retry_delay * 2, 0.1), self.node.config.proof_retry_max)
        # Jitter: workers that lost the store together do not come back in lockstep.
        delay = entry.retry_delay * random.uniform(0.75, 1.25)
        self.consumer.timer.call_after(delay, self._run_head, (key,))

    def _dead_letter(self, message: Message, reason: str) -> None:
        """Poison: to the dead-letter queue (logged, counted); the worker goes on.

        A message whose header could be read gives its number up (its later ones
        do not wait for it, and no gap is reported for it)."""
        source = (message.delivery_info or {}).get("routing_key") or ""
        try:
            dead_letter(self.app, message, reason, source=str(source), where="gate")
            header = StickyHeader.safe_from_headers(message.headers)
            if header is not None and header.seq:
                self._consume((header.workflow, header.key), header.stream, header.seq)
        except Exception:
            # The broker does not take it now: give it back (it comes again, or the
            # reconnect restores it) rather than lose it or stop the consumer.
            logger.exception("sticky: could not dead-letter a message (%s)", reason)
            if not message.acknowledged:
                message.reject(requeue=True)  # type: ignore[no-untyped-call]

    # -- completion --------------------------------------------------------------

    def _watch(self, entry: _Entry, request: Any) -> None:
        """Wrap the request's pool callbacks so the key is released when it ends."""
        on_success, on_failure = request.on_success, request.on_failure
        execute_using_pool = request.execute_using_pool

        def success(*args: Any, **kwargs: Any) -> Any:
            try:
                return on_success(*args, **kwargs)
            finally:
                self._finish(entry)

        def failure(*args: Any, **kwargs: Any) -> Any:
            # Fenced, failed or retried: the next task of the key proves it in the store.
            self.node.known.forget(*entry.gate_key)
            exc = getattr(args[0] if args else None, "exception", None)
            entry.fenced = isinstance(exc, Fenced)
            if (
                isinstance(exc, Retry)
                and entry.seq
                and self._retry_in_place(entry.message.headers or {})
            ):
                # Later messages of the key wait for the retry (before the key is
                # released below, so none slips in): for its countdown, and then as
                # long as a gap may last, even before its message arrives here.
                entry.retried = True
                self._reserve(entry.gate_key, entry.stream, entry.seq, _delay_of(exc.when))
            try:
                return on_failure(*args, **kwargs)
            finally:
                self._finish(entry)

        def execute(*args: Any, **kwargs: Any) -> Any:
            entry.submitted = True
            try:
                entry.job = execute_using_pool(*args, **kwargs)
                return entry.job
            except TaskRevokedError:
                self._finish(entry)  # revoked before it ran: no callback will come
                raise

        request.on_success = success
        request.on_failure = failure
        request.execute_using_pool = execute

    def _finish(self, entry: _Entry) -> None:
        with self._lock:
            if entry.finished:
                return
            entry.finished = True
        if getattr(self._local, "entry", None) is entry:
            return  # finished synchronously inside _start, which pops it
        key = entry.gate_key
        self._pop(key, entry)
        self._run_head(key)

    def _qos(self, method: str) -> None:
        qos = getattr(self.consumer, "qos", None)
        if qos is not None:
            getattr(qos, method)()


class _GatedConsumer:
    """The worker's Consumer as Celery's default strategy sees it under the gate.

    The default strategy hands finished requests to ``on_task_request`` and due
    ETA requests to ``apply_eta_task``; both go through the gate instead.
    """

    def __init__(self, consumer: Any, gate: KeyGate) -> None:
        self._consumer = consumer
        self.on_task_request = gate.launch
        self.apply_eta_task = gate.on_eta_due

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


_NOT_INSTALLED = (
    "sticky task {task}: worker {node} started without celery-sticky's bootsteps, so it "
    "cannot run it stickily. A sticky task registered after the worker started (then "
    "`worker.reload()`) is too late: define sticky tasks, or call "
    "celery_sticky.install(app), before the worker starts"
)


def sticky_strategy(task: Any, app: Celery, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """``Task.Strategy`` of sticky tasks: Celery's default behind the per-key gate."""
    node_step = getattr(consumer.controller, "sticky", None)
    if node_step is None:
        # Running it as a plain task would drop every guarantee without a word.
        raise ConfigurationError(_NOT_INSTALLED.format(task=task.name, node=consumer.hostname))
    gate: KeyGate = node_step.gate
    gate.consumer = consumer
    handler = default_strategy(task, app, _GatedConsumer(consumer, gate), **kwargs)

    def sticky_task_message_handler(
        message: Message, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any
    ) -> None:
        try:
            header = _header_of(task, message)
        except InvalidKeyError as exc:
            logger.error("sticky: %s", exc)
            task_id = (message.headers or {}).get("id")
            if task_id:
                task.backend.mark_as_failure(task_id, exc)
            message.ack()  # type: ignore[no-untyped-call]
            return
        except InvalidHeaderError as exc:
            gate._dead_letter(message, str(exc))
            return
        except Exception as exc:  # arguments that cannot be decoded to find the key
            gate._dead_letter(message, f"cannot read the task's key: {exc!r}")
            return
        gate.submit(
            _Entry(
                header,
                message,
                dispatch=lambda: handler(message, body, ack, reject, callbacks, **kw),
            )
        )

    return sticky_task_message_handler


def _seconds_until(eta: Any) -> float:
    """Seconds until an ETA header (ISO 8601) is due; 0 when it cannot be read."""
    try:
        due = maybe_iso8601(eta)
        if due is None:
            return 0.0
        if due.tzinfo is None:
            due = due.replace(tzinfo=datetime.UTC)
        return float((due - datetime.datetime.now(datetime.UTC)).total_seconds())
    except (TypeError, ValueError):
        return 0.0


def _delay_of(when: Any) -> float:
    """Seconds until a retry is due, from :class:`~celery.exceptions.Retry`'s ``when``
    (a countdown in seconds, an ETA, or None)."""
    if isinstance(when, int | float):
        return float(when)
    return _seconds_until(when) if when is not None else 0.0


def _still_runs(job: Any) -> bool:
    """Whether a job handed to the pool will still run and call back, after a broker
    reconnect; a job Celery's flush forgot though a process has it is given back to
    the pool here.

    On a reconnect Celery's ``AsynPool.flush`` takes every job no process has
    acknowledged out of the pool's cache, so that no callback comes for it. A job
    never written to a process will not run: False. One already written (a paused
    process had it in its pipe, or the flush finished writing it) runs, and its
    result would be ignored: it goes back into the cache, so that its completion
    reaches Celery's request and the gate (otherwise its key would wait for it for
    good, or run its next task beside it). Jobs of other pools, and jobs still in
    the cache, still run.
    """
    cache, ident = getattr(job, "_cache", None), getattr(job, "_job", None)
    if not isinstance(cache, dict) or ident is None or cache.get(ident) is job:
        return True
    if getattr(job, "_write_to", None) is None:
        return False
    if not job.ready():
        cache[ident] = job
    return True


def _keeps_state(app: Celery, message: Message) -> bool:
    """Whether the message's task runs through the per-task protocol (it has ``state``)."""
    task = app.tasks.get((message.headers or {}).get("task"))
    spec = getattr(task, "sticky", None)
    return bool(getattr(spec, "wants_state", True))


def _is_own_task(message: Message) -> bool:
    return (message.headers or {}).get("task") in (END_WORKFLOW, MOVE_KEY)


def _header_of(task: Any, message: Message) -> StickyHeader:
    """The message's sticky header; messages published without the router are parsed.

    The body is checked too (Celery decodes it in this process anyway, and kombu
    caches the decoded body): one of another shape fails inside Celery's request
    callbacks, where it would be neither acknowledged nor recorded.
    """
    header = StickyHeader.from_headers(message.headers)
    if (message.headers or {}).get("task") is None:  # protocol 1: Celery decodes it
        if header is not None:
            return header
        args, kwargs = message.payload["args"], message.payload["kwargs"]
    else:
        args, kwargs, _embed = check_task_body(message.decode())  # type: ignore[no-untyped-call]
    if header is not None:
        return header
    workflow, key = task.sticky.locate(args, kwargs, task_name=task.name)
    affinity = getattr(task, "sticky_affinity", None)
    tags = affinity.resolve(args, kwargs, task_name=task.name) if affinity else ""
    header = StickyHeader(workflow, key, 0, 0, 0, tags)
    message.headers[HEADER] = header.encode()
    return header
