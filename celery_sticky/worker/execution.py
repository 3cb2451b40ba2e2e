"""The per-task protocol of a sticky task, in the pool process, as named phases.

A sticky task's ``__call__`` hands its run to :func:`execute` (named by string
from :class:`~celery_sticky.producer.task.StickyTask`), which passes through:

1. **dedup**: a task id the key's applied records already hold ran before (a
   redelivered or re-published copy): finish what a crash may have interrupted
   (its outbox) and answer as the first run did;
2. **adopt**: the first task of the key here under a new epoch makes the local
   state belong to that epoch: import the hand-over copy, or start empty (and
   report the loss when the key had state elsewhere);
3. **run**: the task's body, with a :class:`~celery_sticky.local.StateHandle`
   that buffers its writes;
4. **fence**: does this worker still hold the key under the message's epoch?
   If not, nothing is committed and the task goes to the key's owner;
5. **commit**: the buffered writes, the applied record and the outbox, in one
   local transaction;
6. **replicate**: with ``sticky_state_replication = "sync"``, refresh the key's
   hand-over copy;
7. **send outbox**: the messages the task published, now that it committed;
8. **end**: a task that finished its workflow releases the key.

Named fault points (:mod:`celery_sticky.faults`) sit between the phases, so a test
can pause or kill a worker exactly there.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore
from celery.utils.imports import symbol_by_name

from .. import faults
from ..context import StickyContext, context
from ..errors import LeaseStoreUnavailable
from ..events import ownership_changed
from ..local.handle import StateHandle
from ..local.node_state import AlreadyApplied, NodeState, current_node, dumps, open_node_state
from ..wire import StickyHeader
from .outbox import send_outbox

logger = logging.getLogger(__name__)


def execute(
    task: Any, run: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run ``task`` (its body is ``run``) through every phase; returns its result."""
    spec = task.sticky
    header = StickyHeader.from_headers(getattr(task.request, "headers", None))
    if header is not None:
        workflow, key, epoch = header.workflow, header.key, header.epoch
    else:
        workflow, key = spec.locate(args, kwargs, task_name=task.name)
        epoch = 0
    ctx = context(task.app)
    nodename = current_node() or task.request.hostname or "local"
    store = open_node_state(ctx.config, nodename)
    task_id = task.request.id or str(uuid.uuid4())

    # 1. dedup
    applied, result = store.applied(workflow, key, task_id)
    if applied:
        logger.info("sticky: task %s was already applied to %s:%s", task_id, workflow, key)
        send_outbox(task.app, store, workflow, key, task_id)
        return result

    # 2. adopt
    recovered = None
    if epoch and store.epoch(workflow, key) != epoch:
        recovered = adopt(ctx, store, workflow, key, epoch)

    # 3. run
    state = StateHandle(store, workflow, key, task_id=task_id, epoch=epoch, recovered=recovered)
    try:
        result = run(*args, state=state, **kwargs)
    except BaseException:
        state.discard()
        raise
    faults.reach("after_run")

    # 4. fence
    if epoch and not holds_lease(ctx, workflow, key, nodename, epoch):
        # This worker lost the key while the task ran (paused, cut off): nothing
        # is committed; the task goes to the key's owner instead.
        state.discard()
        ownership_changed(
            "fenced",
            workflow,
            key,
            epoch,
            nodename,
            send=_event_sender(task),
            level=logging.WARNING,
        )
        task.signature_from_request().apply_async()
        raise Ignore()
    faults.reach("after_fence")

    # 5. commit
    finish = state.finishing or task.ends_workflow
    try:
        state.commit(result, finish=finish, epoch=epoch)
    except AlreadyApplied as done:
        return done.result
    faults.reach("after_commit")

    # 6. replicate
    if ctx.config.state_replication == "sync" and not finish:
        replicate(ctx, store, workflow, key)
    faults.reach("after_replicate")

    # 7. send outbox
    if state.published:
        send_outbox(task.app, store, workflow, key, task_id)

    # 8. end
    if finish:
        end_lease(task.app, workflow, key, nodename, epoch, send=_event_sender(task))
    return result


def adopt(ctx: StickyContext, store: NodeState, workflow: str, key: str, epoch: int) -> bool | None:
    """Make the key's local state belong to ``epoch`` before its first task here.

    Imports the hand-over (or replicated) copy when there is one: True. Otherwise
    starts the key empty; when the key had state before (it was taken over from
    a dead owner, or this worker held an older copy) the state is lost: the
    ``sticky_on_state_lost`` hook may rebuild it, and False is returned. None: a
    new key, nothing was lost.
    """
    config = ctx.config
    copies = ctx.handoff
    data = copies.get(workflow, key) if config.state_replication != "off" else None
    if data is not None:
        store.import_key(workflow, key, data, epoch)
        if config.state_replication != "sync":
            copies.delete(workflow, key)
        logger.info("sticky: imported the state of %s:%s (epoch %s)", workflow, key, epoch)
        return True
    had_local = store.reset_key(workflow, key, epoch)
    info = ctx.leases.lookup(workflow, key)
    if not had_local and (info is None or info.origin != "taken_over"):
        return None
    logger.warning("sticky: the state of %s:%s was lost (no copy when it moved)", workflow, key)
    if config.on_state_lost:
        rebuilt = symbol_by_name(config.on_state_lost)(workflow, key)
        if rebuilt:
            fields = {name: dumps(value) for name, value in dict(rebuilt).items()}
            store.import_key(workflow, key, {"fields": fields}, epoch)
    return False


def holds_lease(ctx: StickyContext, workflow: str, key: str, node: str, epoch: int) -> bool:
    """Whether ``node`` still holds the key under ``epoch`` (the fence before a commit).

    Waits while the lease store does not answer (up to a minute), since a commit
    that cannot be proven must not happen.
    """
    delay, deadline = 0.1, time.monotonic() + 60
    while True:
        try:
            info = ctx.leases.lookup(workflow, key)
            return info is not None and info.owner == node and info.epoch == epoch
        except LeaseStoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def replicate(ctx: StickyContext, store: NodeState, workflow: str, key: str) -> None:
    """Refresh the key's copy in the hand-over store (``sticky_state_replication="sync"``)."""
    data = store.export_key(workflow, key)
    if data is not None:
        ctx.handoff.put(workflow, key, data)


def end_lease(
    app: Any, workflow: str, key: str, owner: str, epoch: int = 0, send: Any = None
) -> None:
    """Release ``owner``'s lease of the key after its workflow ended."""
    ctx = context(app)
    try:
        # A replicated copy of an ended workflow must not come back to life.
        ctx.handoff.delete(workflow, key)
        ctx.leases.release(workflow, key, owner=owner)
    except LeaseStoreUnavailable as exc:
        # The state is gone already; the lease lapses with the owner or moves on.
        logger.warning("sticky: could not release %s:%s: %s", workflow, key, exc)
    ctx.routes.forget(workflow, key)
    ownership_changed("released", workflow, key, epoch, owner, send=send)


def _event_sender(task: Any) -> Callable[..., Any] | None:
    """``send_event`` when this worker sends task events (``-E``), else None."""
    if not task.app.conf.worker_send_task_events or not task.request.id:
        return None
    send: Callable[..., Any] = task.send_event
    return send
