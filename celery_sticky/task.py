"""``@sticky_task`` and the task base class it registers tasks with."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from celery import Celery, Task, shared_task
from celery.exceptions import Ignore

from . import faults
from .events import ownership_changed
from .handoff import adopt, holds_lease, replicate
from .keys import KeyFunc, KeySpec
from .lifecycle import end_lease
from .local_state import AlreadyApplied, current_node, open_node_state
from .message import StickyHeader
from .outbox import send_outbox
from .placement import AffinityFunc, AffinitySpec
from .settings import get_config
from .state import StateHandle

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger(__name__)


class StickyTask(Task):  # type: ignore[misc]
    """Base class of sticky tasks: routing by key, the per-key gate, state injection."""

    #: Where the task finds its key; set by ``@sticky_task``.
    sticky: KeySpec | None = None
    #: The tags a worker must carry to hold the task's keys; ``affinity=``.
    sticky_affinity: AffinitySpec | None = None
    #: The worker handles these messages through the per-key gate.
    Strategy = "celery_sticky.gate:sticky_strategy"
    #: Every successful run of this task ends its workflow (like ``state.finish()``).
    ends_workflow: bool = False

    @classmethod
    def bind(cls, app: Celery) -> Any:
        bound = super().bind(app)
        from .app import install

        install(app)
        return bound

    def apply_async(self, args: Any = None, kwargs: Any = None, *a: Any, **options: Any) -> Any:
        spec = self.sticky
        if spec is not None and spec.wants_state and kwargs and "state" in kwargs:
            raise TypeError(
                f"{self.name}: do not pass 'state'; the worker injects the key's state handle"
            )
        return super().apply_async(args, kwargs, *a, **options)

    def _event_sender(self) -> Callable[..., Any] | None:
        """``send_event`` when this worker sends task events (``-E``), else None."""
        if not self.app.conf.worker_send_task_events or not self.request.id:
            return None
        send: Callable[..., Any] = self.send_event
        return send

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spec = self.sticky
        if spec is None or not spec.wants_state:
            return super().__call__(*args, **kwargs)
        if "state" in kwargs:
            raise TypeError(
                f"{self.name}: do not pass 'state'; the worker injects the key's state handle"
            )
        header = StickyHeader.from_headers(getattr(self.request, "headers", None))
        if header is not None:
            workflow, key, epoch = header.workflow, header.key, header.epoch
        else:
            workflow, key = spec.locate(args, kwargs, task_name=self.name)
            epoch = 0
        config = get_config(self.app)
        nodename = current_node() or self.request.hostname or "local"
        store = open_node_state(config, nodename)
        task_id = self.request.id or str(uuid.uuid4())

        applied, result = store.applied(workflow, key, task_id)
        if applied:
            # A redelivered or re-published copy: its effects are in; finish what a
            # crash may have interrupted (the outbox) and answer as the first run did.
            logger.info("sticky: task %s was already applied to %s:%s", task_id, workflow, key)
            send_outbox(self.app, store, workflow, key, task_id)
            return result

        recovered = None
        if epoch and store.epoch(workflow, key) != epoch:
            # First task of the key here under this lease: import its hand-over copy,
            # or drop a stale local copy.
            recovered = adopt(self.app, config, store, workflow, key, epoch)
        state = StateHandle(store, workflow, key, task_id=task_id, epoch=epoch, recovered=recovered)
        try:
            result = super().__call__(*args, state=state, **kwargs)
        except BaseException:
            state.discard()
            raise
        faults.reach("after_run")
        if epoch and not holds_lease(self.app, workflow, key, nodename, epoch):
            # Fenced: this worker lost the key while the task ran (paused, cut off).
            # Nothing is committed; the task goes to the key's owner instead.
            state.discard()
            ownership_changed(
                "fenced",
                workflow,
                key,
                epoch,
                nodename,
                send=self._event_sender(),
                level=logging.WARNING,
            )
            self.signature_from_request().apply_async()
            raise Ignore()
        faults.reach("after_fence")
        finish = state.finishing or self.ends_workflow
        try:
            state.commit(result, finish=finish, epoch=epoch)
        except AlreadyApplied as done:
            return done.result
        faults.reach("after_commit")
        if config.state_replication == "sync" and not finish:
            replicate(self.app, config, store, workflow, key)
        faults.reach("after_replicate")
        if state._outbox:  # nothing published: no outbox record to read
            send_outbox(self.app, store, workflow, key, task_id)
        if finish:
            end_lease(self.app, workflow, key, nodename, epoch, send=self._event_sender())
        return result


def sticky_task(
    key: str | KeyFunc,
    workflow: str | None = None,
    *,
    affinity: Mapping[str, str] | AffinityFunc | None = None,
    base: type[StickyTask] | None = None,
    app: Celery | None = None,
    **options: Any,
) -> Callable[[F], Any]:
    """Register a sticky task, like ``shared_task``, keyed by ``key``.

    ``key`` names an argument of the task (positional or keyword) or is a callable
    taking the task's arguments and returning the key. ``workflow`` namespaces the
    key; it defaults to the argument's name. A keyword-only ``state`` parameter
    receives the key's :class:`~celery_sticky.state.StateHandle`. ``affinity``
    is a mapping of tags (``{"region": "eu"}``), or a callable taking the task's
    arguments and returning one: only workers carrying those tags may hold the
    key. Every other option passes through to Celery.

    Like ``shared_task``, the returned proxy publishes through the current app,
    which is per thread; pass ``app=`` to register the task on that app only
    (``app.task``), so that any thread publishes through it.
    """
    base = base or StickyTask
    if not (isinstance(base, type) and issubclass(base, StickyTask)):
        raise TypeError(f"sticky_task(base={base!r}): base must subclass StickyTask")

    def decorate(fun: F) -> Any:
        spec = KeySpec.for_function(fun, key, workflow, bind=bool(options.get("bind")))
        task_name = str(options.get("name") or getattr(fun, "__qualname__", repr(fun)))
        options["sticky_affinity"] = AffinitySpec.of(affinity, task_name)
        run: Callable[..., Any] = fun
        if spec.wants_state:
            run = _without_state(fun)
        if app is not None:
            return app.task(base=base, sticky=spec, **options)(run)
        return shared_task(base=base, sticky=spec, **options)(run)

    return decorate


def _without_state(fun: Callable[..., Any]) -> Callable[..., Any]:
    """``fun`` as Celery should see it: ``state`` is not the caller's to pass.

    Celery checks ``delay()`` arguments against the function's signature; hiding
    ``state`` keeps that check working for every other parameter.
    """

    @functools.wraps(fun)
    def run(*args: Any, **kwargs: Any) -> Any:
        return fun(*args, **kwargs)

    signature = inspect.signature(fun)
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != "state"]
    )
    del run.__wrapped__
    return run
