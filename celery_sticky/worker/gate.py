"""The per-key gate: one task per key at a time, in the order received.

It sits in the worker's main process at the ``Task.Strategy`` level, before the
pool: locks taken inside tasks were measured to break order and block pool slots
(see DESIGN.md). Each workflow key has a FIFO of entries; only the head runs.
Before the head runs, the gate proves this worker owns the key, or forwards the
message to the owner. Entries waiting behind a busy key give their prefetch slot
back (as Celery does for ETA tasks), so they do not starve other keys.

Completion is observed on the request's pool callbacks (``on_success`` and
``on_failure``, which may fire twice: release is idempotent), never on
``Task.Request`` subclasses (Celery's generated request class bypasses them).
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.worker.state import task_ready, task_reserved
from celery.worker.strategy import default as default_strategy
from kombu.message import Message

from .. import faults, metrics
from ..errors import ConfigurationError, ForwardingError, InvalidHeaderError, InvalidKeyError
from ..events import dispatcher_send, ownership_changed
from ..lease import ClaimStatus
from ..placement import affinity_queue_name
from ..producer.own_tasks import END_WORKFLOW, MOVE_KEY
from ..wire import HEADER, StickyHeader, check_task_body
from .deadletter import dead_letter
from .forwarding import forward
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
        "finished",
        "header",
        "held",
        "message",
        "request",
        "retry_delay",
        "started",
        "submitted",
        "task_id",
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
        self.finished = False
        self.retry_delay = 0.0
        headers = message.headers or {}
        # A retry reuses its task's id: a copy is the same id *and* the same retry.
        self.created = time.monotonic()
        self.task_id: str | None = (
            f"{headers['id']}/{headers.get('retries') or 0}" if headers.get("id") else None
        )
        self.copies: list[Message] = []  # duplicates, acked once this entry is done

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
                    return
                self._task_ids[entry.task_id] = entry
            if self._track_idle:
                self.idle.pop(key, None)
            queue = self._queues.setdefault(key, deque())
            queue.append(entry)
            if len(queue) > 1:
                entry.held = True
                self._qos("increment_eventually")
                return
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

        Entries already handed to the pool keep their place until they complete.
        """
        with self._lock:
            for key in list(self._queues):
                kept = deque(e for e in self._queues[key] if e.submitted and not e.finished)
                if kept:
                    self._queues[key] = kept
                else:
                    del self._queues[key]
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
                if not queue:
                    return
                head = queue[0]
                if head.started:
                    return
                head.started = True
                if head.held:
                    head.held = False
                    self._qos("decrement_eventually")
            outcome = self._start(head)
            if outcome is _Outcome.RUNNING:
                return
            if outcome is _Outcome.WAIT:
                with self._lock:
                    head.started = False
                self._retry_later(key, head)
                return
            self._pop(key, head)

    def _pop(self, key: GateKey, entry: _Entry) -> None:
        with self._lock:
            queue = self._queues.get(key)
            if not queue or queue[0] is not entry:
                return
            queue.popleft()
            if entry.task_id is not None and self._task_ids.get(entry.task_id) is entry:
                del self._task_ids[entry.task_id]
            if not queue:
                del self._queues[key]
                if self._track_idle:
                    if _is_own_task(entry.message):
                        # end_workflow ended the key, move_key moved it away: neither
                        # leaves a key here to passivate (it would claim a new epoch
                        # only to release it again, every sticky_idle_timeout).
                        self.idle.pop(key, None)
                    else:
                        self.idle[key] = time.monotonic()
        for copy in entry.copies:
            if not copy.acknowledged:
                copy.ack()  # type: ignore[no-untyped-call]

    def _start(self, entry: _Entry) -> _Outcome:
        header = entry.header
        lease = self.node.prove(header.workflow, header.key, header.affinity)
        if lease is None:
            return _Outcome.WAIT
        if lease.status is ClaimStatus.MOVING and lease.owner == self.node.name:
            # Moving here: ask again every 0.2 s (a move commits within about
            # sticky_lease_cache_ttl), not with the store-outage backoff.
            entry.retry_delay = 0.1
            return _Outcome.WAIT
        entry.retry_delay = 0.0
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
        entry.message.headers[HEADER] = proven
        if entry.request is not None:
            # A due ETA/countdown task: its Request copied the headers when it
            # arrived; it runs (and adopts) under the epoch proven now.
            entry.request.request_dict[HEADER] = proven
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
            return _Outcome.DONE
        return _Outcome.RUNNING

    def _forward(self, entry: _Entry, owner: str, epoch: int) -> None:
        self._forward_to(entry, self.node.config.direct_queue_name(owner), epoch)

    def _forward_to(self, entry: _Entry, queue: str, epoch: int) -> None:
        try:
            forward(self.app, entry.message, entry.header, queue, epoch, self.node.config.max_hops)
        except ForwardingError as exc:
            logger.error("sticky: %s", exc)
        if entry.request is not None:
            task_ready(entry.request)

    def _retry_later(self, key: GateKey, entry: _Entry) -> None:
        entry.retry_delay = min(max(entry.retry_delay * 2, 0.1), self.node.config.proof_retry_max)
        # Jitter: workers that lost the store together do not come back in lockstep.
        delay = entry.retry_delay * random.uniform(0.75, 1.25)
        self.consumer.timer.call_after(delay, self._run_head, (key,))

    def _dead_letter(self, message: Message, reason: str) -> None:
        """Poison: to the dead-letter queue (logged, counted); the worker goes on."""
        source = (message.delivery_info or {}).get("routing_key") or ""
        try:
            dead_letter(self.app, message, reason, source=str(source), where="gate")
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
            try:
                return on_failure(*args, **kwargs)
            finally:
                self._finish(entry)

        def execute(*args: Any, **kwargs: Any) -> Any:
            entry.submitted = True
            try:
                return execute_using_pool(*args, **kwargs)
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
