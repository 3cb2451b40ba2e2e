"""Ending and moving keys from outside: :func:`release` and :func:`move_key`.

Both send one of celery-sticky's own tasks to the key's owner, so what they ask
for happens there, through the per-key gate, after every task already queued
for the key:

- :func:`release` ends a workflow (``end_workflow``): lease released, local state
  deleted, as if a task had called ``state.finish()``.
- :func:`move_key` moves a key with its state to another worker, in order:

  1. it marks the lease *moving* (``move_begin.lua``): from then on publishers
     send the key's new tasks to the target, whose gate holds them;
  2. it sends ``move_key`` to the owner's queue, at once: it joins the back of the
     key's line on the owner and runs after every task waiting there. A task a
     producer routed to the owner under a lease it cached before step 1 may arrive
     after it: the owner forwards it to the target, whose gate puts it back in its
     producer's order by sequence number (the copy carries the record of applied
     numbers), so no countdown is needed for order;
  3. the owner runs it (:mod:`celery_sticky.worker.moves`): exports the key's
     state to the hand-over store and makes the target the owner under a new
     epoch (``move_commit.lua``). The target's held tasks then run there, the
     first one importing the state.

  If the owner dies before step 3, the key fails over as usual (the move is
  off); if the target dies, or the move misses its deadline (its task lost or
  failed), the move is off and the owner keeps the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..context import context
from ..errors import MoveError
from .own_tasks import END_WORKFLOW, MOVE_KEY, own_task

if TYPE_CHECKING:
    from celery import Celery

_BEGIN_ERRORS = {
    0: "nobody holds {workflow}:{key}",
    -1: "the owner of {workflow}:{key}, {owner}, is not alive (it fails over by itself)",
    -2: "worker {target!r} is not alive, or is draining",
    -3: "worker {target!r} lacks a tag the key's affinity {affinity} requires",
    -4: "{workflow}:{key} is already being moved",
    -5: "{target} owns {workflow}:{key} already",
}


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from celery import current_app

    current: Celery = current_app._get_current_object()
    return current


def release(workflow: str, key: str, *, app: Celery | None = None) -> Any:
    """End a workflow from outside: release its lease and delete its local state.

    Returns the ``AsyncResult`` of the ``end_workflow`` task sent to the key's
    owner (it runs after every task already queued for the key), or None when
    nobody holds the key.
    """
    app = _app(app)
    if context(app).leases.lookup(workflow, key) is None:
        return None
    return own_task(app, END_WORKFLOW).apply_async(kwargs={"workflow": workflow, "key": key})


def move_key(
    workflow: str,
    key: str,
    target: str,
    *,
    app: Celery | None = None,
    owner: str = "",
    timeout: float = 60.0,
) -> Any:
    """Start moving ``workflow:key`` and its state to worker ``target`` (see the module doc).

    Returns the ``AsyncResult`` of the move task sent to the key's owner; raises
    :class:`MoveError` when the key cannot be moved now, saying why. ``owner``:
    move only if the key still belongs to that worker. A move whose task has not
    committed ``timeout`` seconds after it became due (the task was lost or
    failed, or the tasks queued before it ran longer) is called off: the key
    stays with its owner, and the tasks held for it on the target go there.
    """
    app = _app(app)
    ctx = context(app)
    config = ctx.config
    if config.state_replication == "off":
        raise MoveError(
            "sticky_state_replication='off': a moved key would start empty on its new worker"
        )
    store = ctx.leases
    status, current, epoch = store.begin_move(workflow, key, target, owner, deadline=timeout)
    if status != 1:
        info = store.lookup(workflow, key)
        affinity = info.affinity if info is not None else ""
        raise MoveError(
            _BEGIN_ERRORS[status].format(
                workflow=workflow, key=key, owner=current, target=target, affinity=affinity
            )
        )
    ctx.routes.forget(workflow, key)  # this process's next publish goes to the target
    return own_task(app, MOVE_KEY).apply_async(
        kwargs={"workflow": workflow, "key": key, "target": target, "epoch": epoch},
        queue=config.direct_queue_name(current),
    )
