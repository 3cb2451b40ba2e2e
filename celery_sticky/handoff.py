"""The hand-over store: where a key's state waits between two owners.

A draining worker exports each key it owns (values, applied-task records) and
puts it here; the next owner imports it before the key's first task runs there.
With ``sticky_state_replication = "sync"`` every commit also refreshes the copy,
so a new owner can rebuild the state after a ``kill -9``.

Backends (``sticky_handoff_store``): ``redis`` (default, the lease store's Redis:
:class:`~celery_sticky.lease.RedisHandoffStore`), ``dir:/shared/path`` (a
directory every worker mounts: :class:`DirectoryHandoffStore`), or a dotted path
to a class taking ``(config, lease_store)``. :mod:`celery_sticky.context` builds
one per process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import urllib.parse
from typing import Any, Protocol

from celery.utils.imports import symbol_by_name

from .lease import LeaseStore, RedisHandoffStore
from .settings import StickyConfig


class HandoffStore(Protocol):
    """Where exported key state waits for its next owner."""

    def put(self, workflow: str, key: str, data: dict[str, Any]) -> None: ...

    def get(self, workflow: str, key: str) -> dict[str, Any] | None: ...

    def delete(self, workflow: str, key: str) -> None: ...


class DirectoryHandoffStore:
    """Copies as files in a directory every worker mounts (one file per key)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)

    def _file(self, workflow: str, key: str) -> str:
        return os.path.join(self.path, workflow, urllib.parse.quote(key, safe="") + ".pickle")

    def put(self, workflow: str, key: str, data: dict[str, Any]) -> None:
        target = self._file(workflow, key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temp, target)

    def get(self, workflow: str, key: str) -> dict[str, Any] | None:
        try:
            with open(self._file(workflow, key), "rb") as fh:
                data: dict[str, Any] = pickle.load(fh)
                return data
        except FileNotFoundError:
            return None

    def delete(self, workflow: str, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._file(workflow, key))


def open_handoff_store(config: StickyConfig, lease_store: LeaseStore) -> HandoffStore:
    """The configured hand-over store (use :func:`celery_sticky.context.context`'s, cached)."""
    spec = config.handoff_store
    if spec == "redis":
        return RedisHandoffStore(config, lease_store)
    if spec.startswith("dir:"):
        return DirectoryHandoffStore(spec[4:])
    store: HandoffStore = symbol_by_name(spec)(config, lease_store)
    return store
