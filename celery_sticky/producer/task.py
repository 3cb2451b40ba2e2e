"""``@sticky_task`` and the task base class it registers tasks with.

The class belongs to the producer side: it carries the key and affinity specs the
router reads, and checks what callers pass. What a sticky task does when it runs
is the worker's business: Celery builds its strategy from ``Strategy`` and the
per-task protocol comes from ``Execution``, both named by string, so publishing
never imports :mod:`celery_sticky.worker`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar, overload

from celery import Task, shared_task
from celery.utils.imports import symbol_by_name

from ..context import context
from ..keys import KeyFunc, KeySpec
from ..placement import AffinityFunc, AffinitySpec

if TYPE_CHECKING:
    from celery import Celery

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class _Injected:
    def __repr__(self) -> str:
        return "INJECTED"


#: The default to give ``state`` for type checkers: ``*, state: StateHandle = INJECTED``.
#: The worker always passes the key's state handle; callers never do, and with this
#: default a type checker does not ask them to (``state`` stays a parameter of ``P``).
INJECTED: Any = _Injected()


class StickyTaskProxy(Protocol[P, R_co]):
    """What ``@sticky_task`` returns, for type checkers: a Celery task whose calls and
    ``delay``/``s``/``si`` take the decorated function's parameters (without ``self``
    when ``bind=True``) and whose direct call returns its return type. Every other
    attribute of a Celery ``Task`` is there too, untyped (Celery ships no types)."""

    name: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...


class StickyTask(Task):  # type: ignore[misc]
    """Base class of sticky tasks: routing by key, the per-key gate, state injection."""

    #: Where the task finds its key; set by ``@sticky_task``.
    sticky: KeySpec | None = None
    #: The tags a worker must carry to hold the task's keys; ``affinity=``.
    sticky_affinity: AffinitySpec | None = None
    #: The worker handles these messages through the per-key gate.
    Strategy = "celery_sticky.worker.gate:sticky_strategy"
    #: The per-task protocol (dedup, adopt, run, fence, commit, ...) in the pool.
    Execution = "celery_sticky.worker.execution:execute"
    #: What binding the task to an app does to the app (router, bootsteps, own tasks).
    Installer = "celery_sticky.producer.install:install_on_bind"
    #: Every successful run of this task ends its workflow (like ``state.finish()``).
    ends_workflow: bool = False
    #: A retry keeps the task's place in its key's order: the key's later messages
    #: wait for it (``sticky_retry_in_place=False``: it runs when due, after them).
    sticky_retry_in_place: bool = True

    @classmethod
    def bind(cls, app: Celery) -> Any:
        bound = super().bind(app)
        symbol_by_name(cls.Installer)(app)
        return bound

    def apply_async(self, args: Any = None, kwargs: Any = None, *a: Any, **options: Any) -> Any:
        spec = self.sticky
        if spec is not None and spec.wants_state and kwargs and "state" in kwargs:
            raise TypeError(
                f"{self.name}: do not pass 'state'; the worker injects the key's state handle"
            )
        sequencer = context(self.app).sequencer
        sequencer.begin()
        try:
            return super().apply_async(args, kwargs, *a, **options)
        except BaseException:
            # Nothing was sent (the broker refused it after Celery's retries): the
            # key's number goes back, so its owner waits for no gap.
            sequencer.give_back()
            raise

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spec = self.sticky
        if spec is None or not spec.wants_state:
            return super().__call__(*args, **kwargs)
        if "state" in kwargs:
            raise TypeError(
                f"{self.name}: do not pass 'state'; the worker injects the key's state handle"
            )
        execute = symbol_by_name(self.Execution)
        return execute(self, super().__call__, args, kwargs)


@overload
def sticky_task(
    key: str | KeyFunc,
    workflow: str | None = None,
    *,
    bind: Literal[True],
    affinity: Mapping[str, str] | AffinityFunc | None = None,
    base: type[StickyTask] | None = None,
    app: Celery | None = None,
    **options: Any,
) -> Callable[[Callable[Concatenate[Any, P], R]], StickyTaskProxy[P, R]]: ...


@overload
def sticky_task(
    key: str | KeyFunc,
    workflow: str | None = None,
    *,
    bind: Literal[False] = False,
    affinity: Mapping[str, str] | AffinityFunc | None = None,
    base: type[StickyTask] | None = None,
    app: Celery | None = None,
    **options: Any,
) -> Callable[[Callable[P, R]], StickyTaskProxy[P, R]]: ...


def sticky_task(
    key: str | KeyFunc,
    workflow: str | None = None,
    *,
    bind: bool = False,
    affinity: Mapping[str, str] | AffinityFunc | None = None,
    base: type[StickyTask] | None = None,
    app: Celery | None = None,
    **options: Any,
) -> Callable[[Callable[..., Any]], Any]:
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

    For type checkers the result is a :class:`StickyTaskProxy` carrying the
    function's parameters and return type; give ``state`` the default
    :data:`INJECTED` so that callers, who never pass it, are not asked to.
    """
    base = base or StickyTask
    if not (isinstance(base, type) and issubclass(base, StickyTask)):
        raise TypeError(f"sticky_task(base={base!r}): base must subclass StickyTask")

    if bind:
        options["bind"] = True

    def decorate(fun: Callable[..., Any]) -> Any:
        spec = KeySpec.for_function(fun, key, workflow, bind=bind)
        task_name = str(options.get("name") or getattr(fun, "__qualname__", repr(fun)))
        options["sticky_affinity"] = AffinitySpec.of(affinity, task_name)
        run: Callable[..., Any] = fun
        if spec.wants_state:
            run = without_state(fun)
        if app is not None:
            # Not shared (Celery's app.task shares by default): the task and the
            # stickiness it installs stay on this app.
            options.setdefault("shared", False)
            return app.task(base=base, sticky=spec, **options)(run)
        return shared_task(base=base, sticky=spec, **options)(run)

    return decorate


def without_state(fun: Callable[..., Any]) -> Callable[..., Any]:
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
