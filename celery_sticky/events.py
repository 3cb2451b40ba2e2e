"""Ownership changes: one structured log line each, a metric, and a Celery event.

Kinds: ``claimed`` (a worker took an unowned key), ``taken_over`` (from a dead
owner), ``handed_over`` (a draining worker exported the key's state),
``released`` (the workflow ended), ``fenced`` (a worker lost the key while a task
ran; nothing was committed), ``moved`` (on purpose, with its state). The log
line's ``extra={"sticky": {...}}`` carries the fields for structured handlers;
the Celery event is ``sticky-<kind>`` with the same fields, sent when the
process sends events (a worker started with ``-E``, or any app with
``worker_send_task_events`` or ``task_send_sent_event`` on), so Flower and
``celery events`` can follow keys. Where each kind is recorded:

- ``claimed``, ``taken_over`` at publish: the publisher (``producer/router.py``),
  with :func:`app_sender`; on arrival: the worker's main process (``worker/gate.py``),
  with :func:`dispatcher_send`;
- ``moved``: the pool process running the move (``worker/moves.py``), :func:`app_sender`;
- ``handed_over``: the main process draining at shutdown (``worker/drain.py``),
  :func:`app_sender`;
- ``released``, ``fenced``: the pool process (``worker/execution.py``), ``task.send_event``.

A key's owner that goes on without a missing message (``sticky_gap_timeout``)
records it the same way: :func:`sequence_gap`, event ``sticky-gap``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
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


def sequence_gap(
    workflow: str,
    key: str,
    stream: str,
    missing: tuple[int, int],
    owner: str,
    *,
    send: Callable[..., Any] | None = None,
) -> None:
    """A key's owner went on without messages ``missing`` (first, last) of ``stream``.

    An ERROR log line, the ``sequence_gaps`` metric and a ``sticky-gap`` event.
    """
    first, last = missing
    fields = {
        "workflow": workflow,
        "key": key,
        "stream": stream,
        "missing_first": first,
        "missing_last": last,
        "owner": owner,
    }
    numbers = str(first) if first == last else f"{first}-{last}"
    logger.error(
        "sticky: gap in %s:%s: message(s) %s of producer stream %s did not arrive within "
        "sticky_gap_timeout; %s goes on without them",
        workflow,
        key,
        numbers,
        stream,
        owner,
        extra={"sticky": {"event": "gap", **fields}},
    )
    metrics.sequence_gaps.inc()
    if send is not None:
        try:
            send("sticky-gap", **fields)
        except Exception:  # monitoring must never break the worker
            logger.debug("sticky: could not send the gap event", exc_info=True)


def dispatcher_send(consumer: Any) -> Callable[..., Any] | None:
    """The worker main process's event sender, when it sends events (``-E``)."""
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not getattr(dispatcher, "enabled", False):
        return None
    send: Callable[..., Any] = dispatcher.send
    return send


def events_on(app: Any) -> bool:
    """Whether ``app`` sends events: ``worker_send_task_events`` (set in a worker started
    with ``-E`` by the ``Sticky`` step, before its pool forks) or ``task_send_sent_event``."""
    conf = app.conf
    return bool(conf.worker_send_task_events or conf.task_send_sent_event)


@contextlib.contextmanager
def app_sender(app: Any, hostname: str | None = None) -> Iterator[Callable[..., Any] | None]:
    """An event sender for ``with`` blocks outside the consumer: a dispatcher borrowed from
    ``app``'s producer pool when :func:`events_on`, else None (and None when the broker
    cannot give one: monitoring never stops the caller)."""
    if not events_on(app):
        yield None
        return
    with contextlib.ExitStack() as stack:
        send: Callable[..., Any] | None
        try:
            send = stack.enter_context(app.events.default_dispatcher(hostname=hostname)).send
        except Exception:
            logger.debug("sticky: no event dispatcher", exc_info=True)
            send = None
        yield send
