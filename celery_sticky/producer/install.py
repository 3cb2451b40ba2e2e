"""Wiring celery-sticky into one Celery app: ``install(app)``.

This is the composition root, and it touches only the app it is given: the
router goes into that app's ``task_routes``, the worker bootsteps into that
app's blueprints, celery-sticky's own tasks into that app's registry. The
bootsteps are named by string (as Celery names ``Task.Strategy``), so a process
that only publishes never imports :mod:`celery_sticky.worker`.

Binding a ``@sticky_task`` to an app installs it there, so users rarely call
this. A ``@sticky_task`` without ``app=`` is shared like ``shared_task``: it binds
to (and so installs on) every app of the process; pass ``app=`` to keep it to one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .own_tasks import register_own_tasks
from .router import StickyRouter

if TYPE_CHECKING:
    from celery import Celery

#: The worker bootsteps, by name: imported by the worker only.
WORKER_STEP = "celery_sticky.worker.bootsteps.node:StickyWorker"
WORKER_STEPS = (
    WORKER_STEP,
    "celery_sticky.worker.bootsteps.reaper:ReaperStep",
    "celery_sticky.worker.bootsteps.passivation:PassivationStep",
    "celery_sticky.worker.bootsteps.metrics:MetricsStep",
)
CONSUMER_STEPS = (
    "celery_sticky.worker.bootsteps.gate:StickyConsumer",
    "celery_sticky.worker.bootsteps.delivery:ReliableDelivery",
)


def install(app: Celery) -> None:
    """Add the sticky router, bootsteps and celery-sticky's own tasks to ``app``. Idempotent.

    Settings are not read here but on first use, after configuration.
    """
    _install_routes_and_steps(app)
    register_own_tasks(app)


def install_on_bind(app: Celery) -> None:
    """What binding a ``@sticky_task`` to ``app`` does (see :class:`StickyTask.bind`).

    Binding happens while the app finalizes, when no task may be added to its
    registry: celery-sticky's own tasks are added right after finalization (or,
    for a task defined later, when first needed).
    """
    _install_routes_and_steps(app)
    if not app.finalized:
        register_own_tasks(app)
    else:
        app.on_after_finalize.connect(
            _after_finalize, sender=app, weak=False, dispatch_uid=f"celery_sticky.{id(app)}"
        )


def _after_finalize(sender: Celery, **kwargs: object) -> None:
    register_own_tasks(sender)


def _install_routes_and_steps(app: Celery) -> None:
    routes = app.conf.task_routes
    existing = list(routes) if isinstance(routes, list | tuple) else [routes] if routes else []
    if not any(isinstance(route, StickyRouter) for route in existing):
        app.conf.task_routes = [StickyRouter(app), *existing]
        # The router table is cached on first use; make Celery read it again.
        app.amqp.flush_routes()
        app.amqp.__dict__.pop("router", None)
    for step in WORKER_STEPS:
        app.steps["worker"].add(step)
    for step in CONSUMER_STEPS:
        app.steps["consumer"].add(step)


def router_of(app: Celery) -> StickyRouter | None:
    """The app's sticky router, None when celery-sticky is not installed there."""
    routes = app.conf.task_routes
    for route in routes if isinstance(routes, list | tuple) else [routes]:
        if isinstance(route, StickyRouter):
            return route
    return None


def is_installed(app: Celery) -> bool:
    return router_of(app) is not None
