"""Workflow keys: how a task's arguments name the key it belongs to.

A workflow key is ``(workflow, key)``. ``workflow`` is a namespace (by default
the key argument's name, so every task taking ``order_id`` shares one), ``key``
the value taken from the arguments, compared by its string form.
"""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidKeyError

MAX_KEY_LENGTH = 256
WORKFLOW_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")

KeyFunc = Callable[..., Any]


def normalize_key(value: Any, *, task_name: str, source: str) -> str:
    """Check a key value and return its string form (what leases and state use)."""
    if value is None:
        raise InvalidKeyError(f"{task_name}: the key {source} is None")
    if isinstance(value, bool) or not isinstance(value, str | int | uuid.UUID):
        raise InvalidKeyError(
            f"{task_name}: the key {source} must be a str, int or UUID, "
            f"not {type(value).__name__} ({value!r:.60})"
        )
    text = str(value)
    if not text:
        raise InvalidKeyError(f"{task_name}: the key {source} is an empty string")
    if len(text) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"{task_name}: the key {source} is {len(text)} characters long "
            f"(at most {MAX_KEY_LENGTH}): {text[:40]!a}..."
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Lone surrogates (from a bad decode, or os.fsdecode): no broker, no Redis and
        # no log line can carry them. Shown with escapes, never raw.
        raise InvalidKeyError(
            f"{task_name}: the key {source} is not valid Unicode text "
            f"({exc.reason} at position {exc.start}): {text[:60]!a}"
        ) from None
    return text


@dataclass(frozen=True)
class KeySpec:
    """Where a sticky task finds its key, and the workflow the key belongs to."""

    workflow: str
    arg_name: str | None
    arg_index: int | None
    key_func: KeyFunc | None
    wants_state: bool
    #: Name of an argument holding the workflow, for tasks that serve every
    #: workflow (celery-sticky's own lifecycle task); None: ``workflow`` is fixed.
    workflow_arg: str | None = None

    @classmethod
    def for_function(
        cls, fun: Callable[..., Any], key: str | KeyFunc, workflow: str | None, *, bind: bool
    ) -> KeySpec:
        """Resolve ``key`` against ``fun``'s signature, failing at decoration time."""
        name = getattr(fun, "__qualname__", repr(fun))
        params = list(inspect.signature(fun).parameters.values())
        if bind:
            params = params[1:]
        state = next((p for p in params if p.name == "state"), None)
        if state is not None and state.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(
                f"{name}: the 'state' parameter must be keyword-only (def f(..., *, state))"
            )
        if callable(key):
            if workflow is None:
                raise TypeError(
                    f"{name}: a callable key needs an explicit workflow= "
                    "(the namespace of its keys)"
                )
            return cls(_check_workflow(workflow, name), None, None, key, state is not None)
        if not isinstance(key, str):
            raise TypeError(f"{name}: key must be an argument name or a callable, not {key!r}")
        param = next((p for p in params if p.name == key), None)
        if param is None or param.name == "state":
            raise TypeError(f"{name}: key={key!r} is not a parameter of the task")
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"{name}: key={key!r} names a *args/**kwargs parameter")
        index = None
        if param.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            index = params.index(param)
        return cls(_check_workflow(workflow or key, name), key, index, None, state is not None)

    def locate(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, *, task_name: str
    ) -> tuple[str, str]:
        """``(workflow, key)`` of one call."""
        key = self.extract(args, kwargs, task_name=task_name)
        if self.workflow_arg is None:
            return self.workflow, key
        workflow = (kwargs or {}).get(self.workflow_arg)
        if not isinstance(workflow, str) or not WORKFLOW_RE.match(workflow):
            raise InvalidKeyError(f"{task_name}: workflow={workflow!r} is not a workflow name")
        return workflow, key

    def extract(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, *, task_name: str
    ) -> str:
        """The normalized key of one call (args exclude ``self`` for bound tasks)."""
        args = args or ()
        kwargs = kwargs or {}
        if self.key_func is not None:
            try:
                value = self.key_func(*args, **kwargs)
            except Exception as exc:
                raise InvalidKeyError(f"{task_name}: the key function raised {exc!r}") from exc
            return normalize_key(value, task_name=task_name, source="returned by the key function")
        source = f"argument {self.arg_name!r}"
        if self.arg_index is not None and len(args) > self.arg_index:
            value = args[self.arg_index]
        elif self.arg_name is not None and self.arg_name in kwargs:
            value = kwargs[self.arg_name]
        else:
            raise InvalidKeyError(f"{task_name}: the key {source} is missing")
        return normalize_key(value, task_name=task_name, source=source)


def _check_workflow(workflow: str, name: str) -> str:
    if not isinstance(workflow, str) or not WORKFLOW_RE.match(workflow):
        raise TypeError(
            f"{name}: workflow={workflow!r} must be 1-128 characters of letters, digits, _ . -"
        )
    return workflow
