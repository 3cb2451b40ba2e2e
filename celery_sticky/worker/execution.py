"""The per-task protocol of a sticky task, in the pool process, as named phases.

A sticky task's ``__call__`` hands its run to :func:`execute` (named by string
from :class:`~celery_sticky.producer.task.StickyTask`), which passes through:

1. **dedup**: a task id the key's applied records already hold ran before (a
   redelivered or re-published copy): finish what a crash may have interrupted
   (its outbox) and answer as the first run did;
2. **adopt**: the first task of the key here under a new epoch makes the local
   state belong to that epoch: import the hand-over copy, or start empty (and
   report the loss when the key had state elsewhere); an imported copy brings
   the key's applied records, so the dedup is asked again;
3. **run**: the task's body, with a :class:`~celery_sticky.local.StateHandle`
   that buffers its writes;
4. **fence**: does this worker still hold the key, live, under the message's
   epoch? If not, nothing is committed and the task goes to the key's owner. The
   node answers from what it knows (:func:`known_here`: the gate's proof is still
   good by the heartbeats and the store's born stamp, no Redis call); else the
   lease store does. With ``sync`` replication (and a ``sticky_secret``) it is
   skipped: the copy write of phase 6 is the fence, atomic where the effect lands,
   and the task's one Redis call;
5. **commit**: the buffered writes, the applied record and the outbox, in one
   local transaction. It is private to this worker: a worker paused between the
   fence and here commits to its own disk only, and that state is dropped when
   the worker next sees the key under a newer epoch (phase 2);
6. **replicate**: with ``sticky_state_replication = "sync"``, append the commit's
   changes to the key's hand-over copy (or write it whole, now and then), fenced
   where they land (:mod:`celery_sticky.handoff`). A refused write means this
   worker no longer holds the key: its private commit is dropped and the task goes
   to the key's owner, as at the fence. A write that failed otherwise is proven
   with the fence's lookup after all;
7. **send outbox**: the messages the task published, now that it committed;
8. **end**: a task that finished its workflow releases the key.

Named fault points (:mod:`celery_sticky.faults`) sit between the phases, so a test
can pause or kill a worker exactly there.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

from celery.exceptions import Ignore, Retry
from celery.utils.imports import symbol_by_name
from kombu.utils.functional import retry_over_time

from .. import faults
from ..context import StickyContext, context
from ..errors import Fenced, LeaseStoreUnavailable
from ..events import ownership_changed
from ..handoff import Appended
from ..lease import LeaseInfo
from ..local.handle import StateHandle
from ..local.node_state import (
    AlreadyApplied,
    Change,
    NodeState,
    current_node,
    dumps,
    open_node_state,
)
from ..wire import StickyHeader
from .lease_clock import CHAIN_HEADER, open_lease_clock
from .outbox import send_outbox

logger = logging.getLogger(__name__)

#: How long a task waits for a lease store that does not answer (its adoption of the
#: key, the fence, the copy write) before it fails.
STORE_OUTAGE_WAIT = 60.0


def _answer_applied(
    task: Any,
    store: NodeState,
    workflow: str,
    key: str,
    task_id: str,
    stream: str,
    seq: int,
    result: Any,
) -> Any:
    """A copy of a task already applied: its stored result, its outbox sent again.

    The copy's own number is done too. A task published again under its id (a
    caller's retry after a lost reply, a copy re-sent by hand) draws a new number,
    which no commit records: left open, the key's next message waited
    ``sticky_gap_timeout`` for it.
    """
    if seq:
        store.consume(workflow, key, stream, seq)
    send_outbox(task.app, store, workflow, key, task_id)
    return result


def execute(
    task: Any, run: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run ``task`` (its body is ``run``) through every phase; returns its result."""
    spec = task.sticky
    header = StickyHeader.from_headers(getattr(task.request, "headers", None))
    stream, seq = "", 0
    if header is not None:
        workflow, key, epoch = header.workflow, header.key, header.epoch
        stream, seq = header.stream, header.seq
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
        return _answer_applied(task, store, workflow, key, task_id, stream, seq, result)

    # 2. adopt
    recovered = None
    local_epoch = store.epoch(workflow, key)
    if epoch and local_epoch is not None and epoch < local_epoch:
        # Proven under an older lease than the state it would change: it must not
        # reset the state of a later lease. The key's owner runs it instead.
        fence(task, ctx, workflow, key, nodename, epoch, None)
    if epoch and local_epoch != epoch:
        # Through a lease store outage, as the fence waits: failing here gave the
        # task's number up, and the step was lost (seen in the nemesis: six steps
        # failed reading their key's copy while the store restarted).
        recovered = through_outage(
            adopt,
            (ctx, store, workflow, key, nodename, epoch),
            f"task {task_id} adopting {workflow}:{key}",
        )
        if recovered:
            # The copy brought the key's applied records: this very task may be one
            # (it ran on the previous owner, whose acknowledgement never reached the
            # broker: a drain's closed channel, a crash after the commit).
            applied, result = store.applied(workflow, key, task_id)
            if applied:
                logger.info(
                    "sticky: task %s was applied to %s:%s before it moved", task_id, workflow, key
                )
                return _answer_applied(task, store, workflow, key, task_id, stream, seq, result)

    # 3. run
    state = StateHandle(store, workflow, key, task_id=task_id, epoch=epoch, recovered=recovered)
    try:
        result = run(*args, state=state, **kwargs)
    except BaseException as exc:
        state.discard()
        in_place = isinstance(exc, Retry) and getattr(task, "sticky_retry_in_place", True)
        if seq and not in_place and not isinstance(exc, Ignore):
            # A failed task applies nothing, but its number is done: the key's later
            # messages do not wait for it. A retry keeps its place (the gate holds it).
            store.consume(workflow, key, stream, seq)
        raise
    faults.reach("after_run")
    finish = state.finishing or task.ends_workflow
    # With sync replication the copy write (phase 6) is the fence.
    copy_fences = (
        bool(epoch) and ctx.config.state_replication == "sync" and ctx.copies.enabled and not finish
    )

    # 4. fence
    checked = epoch and not faults.UNFENCED and not copy_fences
    if checked and not known_here(task, store, workflow, key, epoch):
        lease = current_lease(ctx, workflow, key)
        if not holds(lease, nodename, epoch):
            state.discard()
            fence(task, ctx, workflow, key, nodename, epoch, lease)
    faults.reach("after_fence")

    # 5. commit: local and private to this worker until a later phase shares it
    ended: dict[str, int] | None = None
    if finish:
        # The commit drops the key's local state; its producer numbers are left
        # with the release, for the key's next owner.
        record = store.streams(workflow, key)
        if seq:
            record.advance(stream, seq)
        ended = record.as_dict() if record.complete else None
    try:
        change = state.commit(result, finish=finish, epoch=epoch, stream=stream, seq=seq)
    except AlreadyApplied as done:
        return done.result
    faults.reach("after_commit")

    # From here on the task's effects are in: a failure below is logged, never
    # reported as the task's failure ("a failing task applies nothing").
    # 6. replicate: the commit's changes to the shared copy, fenced where they land
    # (copy_append.lua; a whole new version through copy_switch.lua now and then)
    if ctx.config.state_replication == "sync" and not finish:
        try:
            # Through a lease store outage, as the fence waits: a copy left stale
            # loses this commit (and holds the key's next owner for the gap) if
            # this worker dies before its next commit.
            written = through_outage(
                replicate,
                (ctx, store, workflow, key, nodename, epoch, change),
                f"the copy of {workflow}:{key}",
            )
        except Exception:
            if copy_fences:
                # The copy write proved nothing: the fence's lookup proves the commit
                # now. A store still away after it waited drops the commit and fails
                # the task, as the lookup before the commit would have (the copy has
                # every commit before it, which the key's next task adopts).
                try:
                    lease = current_lease(ctx, workflow, key)
                except LeaseStoreUnavailable:
                    store.delete_key(workflow, key)
                    raise
                if not holds(lease, nodename, epoch):
                    store.delete_key(workflow, key)
                    fence(task, ctx, workflow, key, nodename, epoch, lease)
            logger.exception(
                "sticky: task %s committed to %s:%s but its copy was not refreshed; the "
                "next commit refreshes it",
                task_id,
                workflow,
                key,
            )
        else:
            if copy_fences and not written:
                # Refused: another worker holds the key now (this one was paused or cut
                # off past the TTL). The commit stays private and is dropped; the
                # key's owner runs the task.
                store.delete_key(workflow, key)
                fence(
                    task, ctx, workflow, key, nodename, epoch, _lookup_quietly(ctx, workflow, key)
                )
    faults.reach("after_replicate")

    # 7. send outbox
    unsent: Exception | None = None
    if state.published:
        try:
            send_outbox(task.app, store, workflow, key, task_id)
        except Exception as exc:
            unsent = exc
            logger.exception("sticky: task %s committed but its outbox was not sent", task_id)

    # 8. end
    if finish:
        try:
            end_lease(
                task.app, workflow, key, nodename, epoch, send=_event_sender(task), ended=ended
            )
        except Exception:
            logger.exception(
                "sticky: could not release %s:%s after its workflow ended", workflow, key
            )
    if unsent is not None:
        # A retry has the same task id: it finds the task applied (phase 1) and
        # sends the outbox it left, without applying anything twice.
        raise task.retry(exc=unsent, countdown=1.0, max_retries=None)
    return result


def current_lease(ctx: StickyContext, workflow: str, key: str) -> LeaseInfo | None:
    """The key's lease as the lease store has it now (liveness by the server's clock).

    Waits while the lease store does not answer (up to a minute), since a commit
    that cannot be proven must not happen.
    """
    lease: LeaseInfo | None = through_outage(
        ctx.leases.lookup, (workflow, key), f"the lease of {workflow}:{key}"
    )
    return lease


def through_outage(call: Callable[..., Any], args: tuple[Any, ...], what: str) -> Any:
    """``call(*args)``, called again while the lease store does not answer (for up to
    ``STORE_OUTAGE_WAIT`` seconds, then its ``LeaseStoreUnavailable`` is raised)."""

    def waiting(exc: Exception, _intervals: Any, retries: int) -> float:
        if retries == 0:
            logger.warning("sticky: %s waits for the lease store: %s", what, exc)
        return min(0.1 + 0.5 * retries, 5.0)

    return retry_over_time(  # type: ignore[no-untyped-call]
        call, LeaseStoreUnavailable, args=args, errback=waiting, timeout=STORE_OUTAGE_WAIT
    )


def known_here(task: Any, store: NodeState, workflow: str, key: str, epoch: int) -> bool:
    """Whether this node knows, without the lease store, that it still holds the key
    under ``epoch``: the gate proved it in a chain of known leases the node's record
    still names, before that chain's deadline (:mod:`.lease_clock`), and the local
    state is the key's under that epoch (a move or an end of the key, which run
    here, change it)."""
    headers = getattr(task.request, "headers", None) or {}
    chain = headers.get(CHAIN_HEADER) if isinstance(headers, dict) else None
    if type(chain) is not int or not chain:
        return False
    clock = open_lease_clock(store.directory)
    return clock is not None and clock.holds(chain) and store.epoch(workflow, key) == epoch


def _lookup_quietly(ctx: StickyContext, workflow: str, key: str) -> LeaseInfo | None:
    """The key's lease, or None when the store does not answer (the router places it)."""
    try:
        return ctx.leases.lookup(workflow, key)
    except LeaseStoreUnavailable:
        return None


def holds(lease: LeaseInfo | None, node: str, epoch: int) -> bool:
    """Whether ``lease`` is ``node``'s, under ``epoch``, and live."""
    return lease is not None and lease.owner == node and lease.epoch == epoch and lease.alive


def fence(
    task: Any,
    ctx: StickyContext,
    workflow: str,
    key: str,
    node: str,
    epoch: int,
    lease: LeaseInfo | None,
) -> NoReturn:
    """This worker lost the key (paused, cut off) or the message is stale: commit
    nothing, send the task to the key's live owner (or let the router place it),
    and end this run without a result."""
    ownership_changed(
        "fenced", workflow, key, epoch, node, send=_event_sender(task), level=logging.WARNING
    )
    request = task.request
    again = task.signature(request.args, request.kwargs, request.as_execution_options())
    if lease is not None and lease.alive and lease.owner != node:
        # Straight to the owner: not back to this worker's own queue, where
        # delivery_info would send it (Celery's signature_from_request).
        again.set(queue=ctx.config.direct_queue_name(lease.owner))
    again.apply_async()
    raise Fenced()


def adopt(
    ctx: StickyContext, store: NodeState, workflow: str, key: str, node: str, epoch: int
) -> bool | None:
    """Make the key's local state belong to ``epoch`` before its first task here.

    Imports the hand-over (or replicated) copy when there is one: True. Otherwise
    starts the key empty; when the key had state before (it was taken over from
    a dead owner, or this worker held an older copy) the state is lost: the
    ``sticky_on_state_lost`` hook may rebuild it, and False is returned. None: a
    new key, nothing was lost. Nothing is stored before the hook returned, so a
    hook that raises leaves the key to be adopted again by the task's retry.
    """
    config = ctx.config
    copies = ctx.copies
    copy = copies.fetch(workflow, key) if config.state_replication != "off" else None
    if copy is not None:
        # With sync replication the copy stays the key's, and this worker's commits go
        # on appending to its log; otherwise it is used up.
        keep = config.state_replication == "sync"
        store.import_key(
            workflow, key, copy.data, epoch, copy_version=copy.version if keep else None
        )
        if not keep:
            copies.retire(workflow, key, owner=node, epoch=epoch)
        logger.info(
            "sticky: imported the state of %s:%s (epoch %s; a version and %d log entries)",
            workflow,
            key,
            epoch,
            copy.entries,
        )
        return True
    had_local = store.has_state(workflow, key)
    if (
        not had_local
        and config.copy_holds_every_commit
        and ctx.leases.copy_pointer(workflow, key) is None
    ):
        # No copy although every commit writes one: the key never committed (its
        # owner died before its first commit did), so nothing was lost, and which
        # numbers ran is known too: none (the gate waits for each stream's first).
        store.reset_key(workflow, key, epoch)
        return None
    info = ctx.leases.lookup(workflow, key)
    if not had_local and (info is None or info.origin != "taken_over"):
        store.reset_key(workflow, key, epoch)
        return None
    rebuilt = symbol_by_name(config.on_state_lost)(workflow, key) if config.on_state_lost else None
    logger.warning("sticky: the state of %s:%s was lost (no copy when it moved)", workflow, key)
    if rebuilt:
        fields = {name: dumps(value) for name, value in dict(rebuilt).items()}
        store.import_key(workflow, key, {"fields": fields}, epoch)
    else:
        store.reset_key(workflow, key, epoch)
    # Which producer numbers were applied was lost with it: the gate cannot wait
    # for a stream's first numbers (they may have run on the lost owner).
    store.forget_streams(workflow, key)
    return False


def replicate(
    ctx: StickyContext,
    store: NodeState,
    workflow: str,
    key: str,
    node: str,
    epoch: int,
    change: Change | None = None,
) -> bool:
    """Bring the key's hand-over copy up to date (``sticky_state_replication="sync"``),
    fenced: False when ``node`` no longer holds the key under ``epoch`` (nothing became
    visible).

    ``change`` (what the commit just changed) is appended to the copy's log: one
    Redis call, whatever the state's size. A whole new version is written instead when
    there is no copy to append to yet, when the copy is not where this commit follows on
    from (an earlier commit's copy failed, the worker died between a commit and its
    copy, another version replaced it), or when the log outgrew its budget.
    """
    copies = ctx.copies
    if not copies.enabled:
        return False  # no sticky_secret: nothing is written (the worker said so at start)
    if change is not None:
        version = store.copy_version(workflow, key)
        if version is not None:
            appended = copies.append(
                workflow,
                key,
                version,
                change,
                streams=store.streams(workflow, key).as_dict(),
                owner=node,
                epoch=epoch,
            )
            if appended is not Appended.REBASE:
                return appended is Appended.APPENDED
    data = store.export_key(workflow, key)
    if data is None:
        return False
    version = copies.publish_version(workflow, key, data, owner=node, epoch=epoch)
    if version is None:
        return False
    store.set_copy_version(workflow, key, version)
    return True


def end_lease(
    app: Any,
    workflow: str,
    key: str,
    owner: str,
    epoch: int = 0,
    send: Any = None,
    ended: dict[str, int] | None = None,
) -> None:
    """Release ``owner``'s lease of the key after its workflow ended, leaving the key's
    record of applied producer numbers (``ended``) for its next owner."""
    ctx = context(app)
    try:
        # A replicated copy of an ended workflow must not come back to life.
        ctx.copies.retire(workflow, key, owner=owner, epoch=epoch)
        ctx.leases.release(workflow, key, owner=owner, epoch=epoch, ended=ended)
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
