"""celery-sticky's own tasks: ``end_workflow`` and ``move_key``.

They are registered on each app celery-sticky is installed on, and only there
(they used to be shared tasks, which bound to, and so installed on, every app in
the process). Both are sticky tasks keyed by their ``workflow`` and ``key``
arguments, so they run on the key's owner, in the key's line, after every task
queued before them.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from celery.utils.imports import symbol_by_name

from ..keys import KeySpec
from ..local.handle import StateHandle
from ..wire import StickyHeader
from .task import StickyTask, without_state

if TYPE_CHECKING:
    from celery import Celery

END_WORKFLOW = "celery_sticky.end_workflow"
MOVE_KEY = "celery_sticky.move_key"
#: The body of the move, on the owner; named by string (a producer never loads it).
RUN_MOVE = "celery_sticky.worker.moves:run_move"

_registered: weakref.WeakSet[Celery] = weakref.WeakSet()


def _end_workflow(
    self: Any, *, workflow: str, key: str, idle_since: float | None = None, state: StateHandle
) -> bool:
    """End the key's workflow; when passivating, only if it stayed idle."""
    if idle_since is not None:
        last = state.last_commit
        if last is not None and last > idle_since:
            return False
    state.finish()
    return True


def _move_key(self: Any, *, workflow: str, key: str, target: str, epoch: int) -> str:
    """Hand the key and its state to ``target`` (see :mod:`celery_sticky.worker.moves`)."""
    run_move = symbol_by_name(RUN_MOVE)
    # The move's own number goes with the key: its target must not wait for it.
    header = StickyHeader.safe_from_headers(getattr(self.request, "headers", None))
    number = (header.stream, header.seq) if header is not None and header.seq else None
    return str(run_move(self.app, workflow, key, target, epoch, self.request.hostname, number))


def register_own_tasks(app: Celery) -> None:
    """Add ``end_workflow`` and ``move_key`` to ``app`` (lazily before it finalizes)."""
    if app in _registered:
        return
    _registered.add(app)
    app.task(
        base=StickyTask,
        name=END_WORKFLOW,
        bind=True,
        shared=False,
        sticky=KeySpec("*", "key", None, None, True, workflow_arg="workflow"),
    )(without_state(_end_workflow))
    # No ``state`` parameter: the move exports and deletes the key's state itself,
    # after which nothing may be committed for the key here.
    app.task(
        base=StickyTask,
        name=MOVE_KEY,
        bind=True,
        shared=False,
        sticky=KeySpec("*", "key", None, None, False, workflow_arg="workflow"),
    )(_move_key)


def own_task(app: Celery, name: str) -> Any:
    """One of celery-sticky's own tasks on ``app``, registered first if needed."""
    register_own_tasks(app)
    return app.tasks[name]
