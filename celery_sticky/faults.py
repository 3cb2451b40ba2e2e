"""Named fault points on the execution path, for tests that must hit a window every time.

A random fault schedule hits the window between a worker's ownership check and its
commit (or between taking a message from Redis and delivering it) only by luck; a
fault point hits it on every run. The execution path calls
:func:`reach` at a few named places (``FAULT_POINTS``). Nothing happens unless the
process was started with ``STICKY_TEST_FAULT=<point>:<action>`` in its environment
(read once, at import), so production pays one dictionary lookup per point.

Actions act on the whole process group, which the test cluster gives each worker
(``start_new_session``), so the pool children stop or die with the main process:

- ``stop``: SIGSTOP the group (a GC pause, a frozen VM, a partition); the test
  sends SIGCONT when it has made another worker take over;
- ``kill``: SIGKILL the group (a power cut).

``STICKY_TEST_UNFENCED=1`` builds the deliberately broken worker the nemesis
checker must catch: no fence before the commit, and hand-over copies switched in
without checking the writer's lease. Never set it outside a test of the checker.

A point fires once per test: the first process to reach it creates the marker file
``STICKY_TEST_FAULT_MARKER`` (default ``<tmp>/sticky-fault-<point>``) exclusively
and writes its pid there, so the test can wait for the file instead of sleeping.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable

#: Where the execution path calls :func:`reach`, in the order a task passes them.
FAULT_POINTS = (
    "after_receive",  # worker main process: a BLMOVE answer read, before the delivery
    "after_prove",  # worker main process: ownership proven, before the pool gets the task
    "unproven_head",  # worker main process: a key waiting for a number could not prove
    # it is this worker's (no answer, another owner), before its head is handed on
    "after_run",  # pool: the task's body returned, before the fence
    "after_fence",  # pool: the fence passed, before the local commit
    "after_commit",  # pool: committed locally, before replication
    "after_replicate",  # pool: replicated, before the outbox is sent
    "before_drain",  # worker main process: warm shutdown, pool done, before the drain
)

_ACTIONS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, action = spec.partition(":")
    if point not in FAULT_POINTS or action not in _ACTIONS:
        raise ValueError(
            f"STICKY_TEST_FAULT={spec!r}: expected <point>:<action> with point in "
            f"{', '.join(FAULT_POINTS)} and action in {', '.join(_ACTIONS)}"
        )
    return point, _ACTIONS[action]


_ARMED = _parse(os.environ.get("STICKY_TEST_FAULT", ""))

_OBSERVERS: dict[str, list[Callable[[], None]]] = {}

#: Test-only: fencing switched off (see the module doc).
UNFENCED = os.environ.get("STICKY_TEST_UNFENCED") == "1"


def marker_path(point: str) -> str:
    """The file the first process to reach ``point`` creates."""
    default = os.path.join(tempfile.gettempdir(), f"sticky-fault-{point}")
    return os.environ.get("STICKY_TEST_FAULT_MARKER") or default


def observe(point: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` (in the process that reaches it) each time ``point`` is reached:
    the nemesis records there when a task's commit really happened."""
    if point not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {point!r}: one of {', '.join(FAULT_POINTS)}")
    _OBSERVERS.setdefault(point, []).append(callback)


def reach(point: str) -> None:
    """Tell the point's observers, then apply the armed fault if this is its point and
    it has not fired yet."""
    for callback in _OBSERVERS.get(point, ()):
        callback()
    if _ARMED is None or _ARMED[0] != point:
        return
    try:
        fd = os.open(marker_path(point), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # fired already, in this process or another
    with os.fdopen(fd, "w") as marker:
        marker.write(str(os.getpid()))
    os.killpg(os.getpgid(0), _ARMED[1])
