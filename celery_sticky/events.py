"""Ownership changes: one structured log line each, a metric, and a Celery event.

Kinds: ``claimed`` (a worker took an unowned key), ``taken_over`` (from a dead
owner), ``handed_over`` (a draining worker exported the key's state),
``released`` (the workflow ended), ``fenced`` (a worker lost the key while a task
ran; nothing was committed), ``moved`` (on purpose, with its state). The log
line's ``extra={"sticky": {...}}`` carries the fields for structured handlers;
the Celery event is ``sticky-<kind>`` with the same fields, sent when the
worker sends events (``-E``), so Flower-style monitors can follow keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import metrics

logger = logging.getLogger("celery_sticky.ownership")


def ownership_changed(
    kind: str,
    workflow: str,
    key: str,
    epoch: int,
    owner: str,
    *,
    previous: str | None = None,
    send: Callable[..., Any] | None = None,
    level: int = logging.INFO,
) -> None:
    """Record one ownership change of ``workflow:key``.

    ``send(type, **fields)`` sends the Celery event: the worker's event dispatcher
    in its main process, ``task.send_event`` in a pool process; None when the
    worker does not send events.
    """
    fields = {
        "workflow": workflow,
        "key": key,
        "epoch": epoch,
        "owner": owner,
        "previous": previous,
    }
    logger.log(
        level,
        "sticky: %s %s:%s epoch=%s owner=%s previous=%s",
        kind,
        workflow,
        key,
        epoch,
        owner,
        previous or "-",
        extra={"sticky": {"event": kind, **fields}},
    )
    metrics.ownership_changes.labels(kind).inc()
    if send is not None:
        try:
            send(f"sticky-{kind}", **fields)
        except Exception:  # monitoring must never break the worker
            logger.debug("sticky: could not send the %s event", kind, exc_info=True)


def dispatcher_send(consumer: Any) -> Callable[..., Any] | None:
    """The worker main process's event sender, when it sends events (``-E``)."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return None
    send: Callable[..., Any] = dispatcher.send
    return send
