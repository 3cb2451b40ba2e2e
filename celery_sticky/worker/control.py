"""Remote control commands the ``celery sticky`` CLI asks workers (``celery control``).

Registered in Celery's global command panel when this module is imported (by
the worker's sticky bootstep), so every worker running celery-sticky answers them:

- ``sticky_drain``: warm shutdown of the worker; its shutdown path drains it
  (keys handed over, queue moved on). It replies before it stops, unlike
  Celery's ``shutdown``, so the caller knows the worker heard it.
- ``sticky_key_info``: what the worker knows of one workflow key: its place in
  the per-key gate and its local state (last commit, last task, fields, bytes).
- ``sticky_busy_keys``: the keys with a task queued, running or scheduled on
  the worker (``celery sticky rebalance`` moves only the others).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.platforms import EX_OK
from celery.worker import state as worker_state
from celery.worker.control import control_command, inspect_command

from ..local.node_state import NodeState

logger = logging.getLogger(__name__)


def _sticky_step(state: Any) -> Any:
    """The worker's ``StickyWorker`` step, or None on a worker without celery-sticky."""
    consumer = getattr(state, "consumer", None)
    controller = getattr(consumer, "controller", None)
    return getattr(controller, "sticky", None)


@control_command()  # type: ignore[untyped-decorator]
def sticky_drain(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Drain this worker: warm shutdown, its keys and queue handed over."""
    step = _sticky_step(state)
    if step is None:
        return {"error": "celery-sticky is not running on this worker"}
    logger.warning("sticky: drain requested remotely; warm shutdown of %s", state.hostname)
    # What a SIGTERM does: the consumer loop raises WorkerShutdown at its next turn,
    # after this reply went out; the worker's shutdown path then drains.
    worker_state.should_stop = EX_OK
    return {"ok": f"draining {state.hostname}"}


@inspect_command(args=[("workflow", str), ("key", str)], signature="<workflow> <key>")  # type: ignore[untyped-decorator]
def sticky_key_info(state: Any, workflow: str, key: str, **kwargs: Any) -> dict[str, Any]:
    """One workflow key as this worker sees it: gate, last commit, state size."""
    step = _sticky_step(state)
    if step is None:
        return {"error": "celery-sticky is not running on this worker"}
    return key_info(step, workflow, key)


@inspect_command()  # type: ignore[untyped-decorator]
def sticky_busy_keys(state: Any, **kwargs: Any) -> dict[str, Any]:
    """The keys this worker has a task of: queued, running or scheduled."""
    step = _sticky_step(state)
    if step is None:
        return {"error": "celery-sticky is not running on this worker"}
    return {"keys": sorted([list(key) for key in step.gate.keys_with_tasks()])}


def key_info(step: Any, workflow: str, key: str) -> dict[str, Any]:
    queued, running = step.gate.key_status(workflow, key)
    gate: dict[str, Any] = {"queued": queued, "running": running}
    head = step.gate.head_of(workflow, key)
    if head is not None:
        gate["head"] = head
    info: dict[str, Any] = {"node": step.node.name, "gate": gate, "local": None}
    # The pool processes hold their own handles; the main process opens the state
    # briefly, reads, and closes it again (as the bootstep does at start).
    local = NodeState(step.state_directory, step.node.config)
    try:
        exported = local.export_key(workflow, key)
        if exported is not None:
            blobs = exported.get("fields") or {}
            applied = exported.get("applied") or []
            info["local"] = {
                "epoch": exported.get("epoch"),
                "last_commit": exported.get("last_commit"),
                "last_task": applied[-1][0] if applied else None,
                "tasks_applied": int(exported.get("seq") or 0),
                "fields": len(blobs),
                "bytes": sum(len(blob) for blob in blobs.values() if blob is not None),
            }
    finally:
        local.close()
    return info
