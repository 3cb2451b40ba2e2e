"""Wiring celery-sticky into a Celery app: ``install(app)`` and per-app objects."""

from __future__ import annotations

import os
import threading
import weakref

from celery import Celery
from celery.signals import worker_shutdown

from .lease import LeaseStore
from .router import StickyRouter
from .settings import get_config

_stores: weakref.WeakKeyDictionary[Celery, tuple[int, LeaseStore]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def install(app: Celery) -> None:
    """Add the sticky router and bootsteps to ``app``. Idempotent.

    Binding a ``@sticky_task`` to an app calls this, so users rarely need to.
    Settings are not read here but on first use, after configuration.
    """
    from . import control, tasks  # noqa: F401  (own tasks and remote control commands)
    from .bootsteps import StickyConsumer, StickyWorker, on_worker_shutdown

    routes = app.conf.task_routes
    existing = list(routes) if isinstance(routes, list | tuple) else [routes] if routes else []
    if not any(isinstance(route, StickyRouter) for route in existing):
        app.conf.task_routes = [StickyRouter(app), *existing]
        # The router table is cached on first use; make Celery read it again.
        app.amqp.flush_routes()
        app.amqp.__dict__.pop("router", None)
    app.steps["worker"].add(StickyWorker)
    app.steps["consumer"].add(StickyConsumer)
    worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid="celery_sticky.drain")


def router_of(app: Celery) -> StickyRouter | None:
    routes = app.conf.task_routes
    for route in routes if isinstance(routes, list | tuple) else [routes]:
        if isinstance(route, StickyRouter):
            return route
    return None


def lease_store(app: Celery) -> LeaseStore:
    """This process's lease store client for ``app`` (a new one after a fork)."""
    pid = os.getpid()
    cached = _stores.get(app)
    if cached is not None and cached[0] == pid:
        return cached[1]
    with _lock:
        cached = _stores.get(app)
        if cached is None or cached[0] != pid:
            cached = _stores[app] = (pid, LeaseStore(get_config(app)))
    return cached[1]
