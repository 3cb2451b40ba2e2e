"""celery-sticky's own tasks (registered on every app, like ``shared_task``)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from .keys import KeySpec
from .lifecycle import END_WORKFLOW
from .rebalance import MOVE_KEY, run_move
from .state import StateHandle
from .task import StickyTask, _without_state


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


end_workflow = shared_task(
    base=StickyTask,
    name=END_WORKFLOW,
    bind=True,
    sticky=KeySpec("*", "key", None, None, True, workflow_arg="workflow"),
)(_without_state(_end_workflow))


def _move_key(self: Any, *, workflow: str, key: str, target: str, epoch: int) -> str:
    """Hand the key and its state to ``target`` (see :mod:`celery_sticky.rebalance`)."""
    return run_move(self.app, workflow, key, target, epoch, self.request.hostname)


# No ``state`` parameter: the move exports and deletes the key's state itself,
# after which nothing may be committed for the key here.
move_key = shared_task(
    base=StickyTask,
    name=MOVE_KEY,
    bind=True,
    sticky=KeySpec("*", "key", None, None, False, workflow_arg="workflow"),
)(_move_key)
