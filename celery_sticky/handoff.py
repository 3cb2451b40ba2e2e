"""The hand-over store: where a key's state waits between two owners.

A draining worker exports each key it owns (values, applied-task records) and
puts it here; the next owner imports it before the key's first task runs there.
With ``sticky_state_replication = "sync"`` every commit also refreshes the copy,
so a new owner can rebuild the state after a ``kill -9``.

Two backends: Redis (default; large copies are split into chunks, written in one
MULTI/EXEC transaction) and a directory shared by the workers
(``sticky_handoff_store = "dir:/shared/path"``). Anything else is a dotted path
to a class taking ``(config, lease_store)``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import urllib.parse
from typing import Any, Protocol

import redis
from celery.utils.imports import symbol_by_name

from .lease import LeaseStore
from .settings import StickyConfig

CHUNK_BYTES = 4 * 2**20


class HandoffStore(Protocol):
    """Where exported key state waits for its next owner."""

    def put(self, workflow: str, key: str, data: dict[str, Any]) -> None: ...

    def get(self, workflow: str, key: str) -> dict[str, Any] | None: ...

    def delete(self, workflow: str, key: str) -> None: ...


class RedisHandoffStore:
    """Copies as chunked pickles in Redis, under ``<key_prefix>:handoff:<wf>:<key>``."""

    def __init__(self, config: StickyConfig, lease_store: LeaseStore) -> None:
        # Binary replies: the lease store's client decodes to str.
        self.redis = redis.Redis.from_url(
            config.redis_url, socket_connect_timeout=2, socket_timeout=60
        )
        self.prefix = f"{config.key_prefix}:handoff:"
        self.guard = lease_store.guard

    def _name(self, workflow: str, key: str) -> str:
        return f"{self.prefix}{workflow}:{key}"

    def put(self, workflow: str, key: str, data: dict[str, Any]) -> None:
        blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
        name = self._name(workflow, key)

        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(name)
            pipe.rpush(name, *chunks)
            pipe.execute()

        self.guard(write)

    def get(self, workflow: str, key: str) -> dict[str, Any] | None:
        chunks: list[Any] = self.guard(lambda: self.redis.lrange(self._name(workflow, key), 0, -1))
        if not chunks:
            return None
        data: dict[str, Any] = pickle.loads(b"".join(chunks))
        return data

    def delete(self, workflow: str, key: str) -> None:
        self.guard(lambda: self.redis.delete(self._name(workflow, key)))


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


def handoff_store(config: StickyConfig, lease_store: LeaseStore) -> HandoffStore:
    """The configured hand-over store."""
    spec = config.handoff_store
    if spec == "redis":
        return RedisHandoffStore(config, lease_store)
    if spec.startswith("dir:"):
        return DirectoryHandoffStore(spec[4:])
    store: HandoffStore = symbol_by_name(spec)(config, lease_store)
    return store


def adopt(
    app: Any, config: StickyConfig, store: Any, workflow: str, key: str, epoch: int
) -> bool | None:
    """Make the key's local state belong to ``epoch`` before its first task here.

    Imports the hand-over (or replicated) copy when there is one: True. Otherwise
    starts the key empty; when the key had state before (it was taken over from
    a dead owner, or this worker held an older copy) the state is lost: the
    ``sticky_on_state_lost`` hook may rebuild it, and False is returned. None: a
    new key, nothing was lost.
    """
    import logging

    from .app import lease_store
    from .local_state import dumps

    leases = lease_store(app)
    copies = handoff_store(config, leases)
    data = copies.get(workflow, key) if config.state_replication != "off" else None
    if data is not None:
        store.import_key(workflow, key, data, epoch)
        if config.state_replication != "sync":
            copies.delete(workflow, key)
        logging.getLogger(__name__).info(
            "sticky: imported the state of %s:%s (epoch %s)", workflow, key, epoch
        )
        return True
    had_local = store.reset_key(workflow, key, epoch)
    info = leases.lookup(workflow, key)
    if not had_local and (info is None or info.origin != "taken_over"):
        return None
    logging.getLogger(__name__).warning(
        "sticky: the state of %s:%s was lost (no copy when it moved)", workflow, key
    )
    if config.on_state_lost:
        rebuilt = symbol_by_name(config.on_state_lost)(workflow, key)
        if rebuilt:
            fields = {name: dumps(value) for name, value in dict(rebuilt).items()}
            store.import_key(workflow, key, {"fields": fields}, epoch)
    return False


def holds_lease(app: Any, workflow: str, key: str, node: str, epoch: int) -> bool:
    """Whether ``node`` still holds the key under ``epoch`` (the fence before a commit).

    Waits while the lease store does not answer (up to a minute), since a commit
    that cannot be proven must not happen.
    """
    import time

    from .app import lease_store
    from .errors import LeaseStoreUnavailable

    delay, deadline = 0.1, time.monotonic() + 60
    while True:
        try:
            info = lease_store(app).lookup(workflow, key)
            return info is not None and info.owner == node and info.epoch == epoch
        except LeaseStoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def replicate(app: Any, config: StickyConfig, store: Any, workflow: str, key: str) -> None:
    """Refresh the key's copy in the hand-over store (``sticky_state_replication="sync"``)."""
    from .app import lease_store

    data = store.export_key(workflow, key)
    if data is not None:
        handoff_store(config, lease_store(app)).put(workflow, key, data)
