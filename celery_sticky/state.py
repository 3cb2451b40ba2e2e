"""The state handle: a mapping over the key's state on the worker's local disk.

State lives in one diskcache ``Cache`` per worker node, under
``<sticky_state_dir>/<nodename>/``, shared by the node's pool processes. Each
process opens it itself on first use, after the fork (an SQLite connection must
not cross a fork). A task's writes are buffered in the handle and committed in
one short transaction when the task succeeds; a task that raises writes nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

import diskcache

from .errors import StateDirError

_DELETED = object()
_MISSING = object()

# Set by the worker bootstep in the main process, before the pool forks.
_node_name: str | None = None
_state_dir: str | None = None
_caches: dict[tuple[int, str], diskcache.Cache] = {}
_caches_lock = threading.Lock()


def node_state_dir(state_dir: str, nodename: str) -> str:
    return os.path.join(state_dir, nodename)


def configure_node(state_dir: str, nodename: str) -> str:
    """Check (at worker start, not at the first task) that the state dir is usable.

    Returns the node's directory. Raises :class:`StateDirError` naming the path.
    """
    global _node_name, _state_dir
    path = node_state_dir(state_dir, nodename)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
        # Open and close once: a corrupt database fails here, at start.
        diskcache.Cache(path, eviction_policy="none").close()
    except Exception as exc:
        raise StateDirError(
            f"sticky_state_dir: cannot use {path!r} for local state: {exc}"
        ) from exc
    _node_name, _state_dir = nodename, state_dir
    return path


def current_node() -> str | None:
    """The nodename of the worker this process belongs to, if it is one."""
    return _node_name


def open_cache(state_dir: str, nodename: str) -> diskcache.Cache:
    """This process's handle on the node's state cache, opened on first use."""
    path = node_state_dir(state_dir, nodename)
    slot = (os.getpid(), path)
    cache = _caches.get(slot)
    if cache is None:
        with _caches_lock:
            cache = _caches.get(slot)
            if cache is None:
                cache = _caches[slot] = diskcache.Cache(
                    path, eviction_policy="none", size_limit=2**62, statistics=False
                )
    return cache


class StateHandle(MutableMapping[str, Any]):
    """A task's view of one workflow key's state.

    Reads see the task's own writes. Values are any picklable object, stored by
    value: mutating an object you read does not change the state until you
    assign it back (``state["items"] = items``).
    """

    def __init__(self, cache: diskcache.Cache, workflow: str, key: str) -> None:
        self._cache = cache
        self.workflow = workflow
        self.key = key
        self._writes: dict[str, Any] = {}
        self._cleared = False
        self._fields: frozenset[str] | None = None

    # -- storage layout --------------------------------------------------------

    def _value_key(self, field: str) -> tuple[str, str, str, str]:
        return ("v", self.workflow, self.key, field)

    @property
    def _index_key(self) -> tuple[str, str, str]:
        return ("i", self.workflow, self.key)

    def _committed_fields(self) -> frozenset[str]:
        if self._fields is None:
            self._fields = frozenset(self._cache.get(self._index_key, default=()))
        return self._fields

    # -- mapping API -----------------------------------------------------------

    def __getitem__(self, field: str) -> Any:
        if field in self._writes:
            value = self._writes[field]
            if value is _DELETED:
                raise KeyError(field)
            return value
        if self._cleared:
            raise KeyError(field)
        value = self._cache.get(self._value_key(field), default=_MISSING)
        if value is _MISSING:
            raise KeyError(field)
        return value

    def __setitem__(self, field: str, value: Any) -> None:
        if not isinstance(field, str):
            raise TypeError(f"state fields are str, not {type(field).__name__} ({field!r:.60})")
        self._writes[field] = value

    def __delitem__(self, field: str) -> None:
        if field not in self:
            raise KeyError(field)
        self._writes[field] = _DELETED

    def __contains__(self, field: object) -> bool:
        if field in self._writes:
            return self._writes[field] is not _DELETED
        return not self._cleared and field in self._committed_fields()

    def _current_fields(self) -> list[str]:
        base = set() if self._cleared else set(self._committed_fields())
        for field, value in self._writes.items():
            if value is _DELETED:
                base.discard(field)
            else:
                base.add(field)
        return sorted(base)

    def __iter__(self) -> Iterator[str]:
        return iter(self._current_fields())

    def __len__(self) -> int:
        return len(self._current_fields())

    def clear(self) -> None:
        self._writes.clear()
        self._cleared = True

    def __repr__(self) -> str:
        return f"<StateHandle {self.workflow}:{self.key} fields={self._current_fields()!r}>"

    # -- commit ----------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._cleared or bool(self._writes)

    def commit(self) -> None:
        """Write the buffered changes in one transaction (all or nothing)."""
        if not self.dirty:
            return
        fields = self._current_fields()
        previous = self._committed_fields()
        cache = self._cache
        with cache.transact():
            if self._cleared:
                for field in previous:
                    cache.delete(self._value_key(field))
            for field, value in self._writes.items():
                if value is _DELETED:
                    cache.delete(self._value_key(field))
                    continue
                try:
                    cache.set(self._value_key(field), value)
                except Exception as exc:
                    raise TypeError(
                        f"state field {field!r} of {self.workflow}:{self.key} cannot be "
                        f"stored: {exc}"
                    ) from exc
            if fields:
                cache.set(self._index_key, tuple(fields))
            else:
                cache.delete(self._index_key)
        self._fields = frozenset(fields)
        self._writes.clear()
        self._cleared = False
