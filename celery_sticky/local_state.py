"""A worker node's local state on disk: fields, applied-task records, outbox.

One diskcache ``Cache`` per node, in ``<sticky_state_dir>/<nodename>/``, shared by
the node's pool processes, each opening it after the fork. Records, keyed by
tuples:

==============================  ==========================================
``("v", workflow, key, field)``  the field's value, pickled
``("m", workflow, key, field)``  the value's version stamp (for the memory tier)
``("i", workflow, key)``         the key's field names
``("n", workflow, key)``         sequence number of the key's last applied task
``("a", workflow, key, id)``     applied record of task ``id``: (seq, pickled result)
``("s", workflow, key, seq)``    which task id was applied as ``seq`` (for trimming)
``("t", workflow, key)``         time of the key's last commit
``("o", workflow, key, id)``     messages task ``id`` published, not yet sent
``("O",)``                       the set of pending outbox records
``("e", workflow, key)``         the lease epoch the key's state belongs to
==============================  ==========================================

A commit writes a task's changes, its applied record and its outbox in one short
transaction (values are pickled before it starts): all of it or nothing.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import diskcache

from .errors import StateDirError, StateSizeLimitError
from .memory_tier import MISS, MemoryTier
from .settings import StickyConfig

DELETED = object()
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

OutboxRecord = tuple[str, str, str]  # (workflow, key, task id)


class AlreadyApplied(Exception):
    """The task id was applied before; ``result`` is what it returned then."""

    def __init__(self, result: Any) -> None:
        super().__init__("already applied")
        self.result = result


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=PICKLE_PROTOCOL)


def new_version() -> int:
    return int.from_bytes(os.urandom(8), "big") >> 1


class NodeState:
    """Every key's local state on one worker node."""

    def __init__(self, directory: str, config: StickyConfig) -> None:
        self.directory = directory
        self.config = config
        self.cache = diskcache.Cache(
            directory, eviction_policy="none", size_limit=2**62, statistics=False
        )
        self.memory = MemoryTier(config.memory_cache_bytes, config.memory_cache_min_bytes)

    def close(self) -> None:
        self.cache.close()

    # -- reads -----------------------------------------------------------------

    def fields(self, workflow: str, key: str) -> tuple[str, ...]:
        return tuple(self.cache.get(("i", workflow, key), default=()))

    def read(self, workflow: str, key: str, field: str) -> Any:
        """The field's value, or ``MISS``; large values come from the memory tier."""
        version = self.cache.get(("m", workflow, key, field))
        if version is None:
            return MISS
        slot = (self.directory, workflow, key, field)
        value = self.memory.get(slot, version)
        if value is not MISS:
            return value
        raw = self.cache.get(("v", workflow, key, field))
        if raw is None:
            return MISS
        value = pickle.loads(raw)
        self.memory.put(slot, version, value, len(raw))
        return value

    def applied(self, workflow: str, key: str, task_id: str) -> tuple[bool, Any]:
        """``(True, result)`` when task ``task_id`` was applied to the key."""
        record = self.cache.get(("a", workflow, key, task_id))
        if record is None:
            return False, None
        return True, pickle.loads(record[1])

    def last_commit(self, workflow: str, key: str) -> float | None:
        last = self.cache.get(("t", workflow, key))
        return None if last is None else float(last)

    # -- the commit ------------------------------------------------------------

    def commit(
        self,
        workflow: str,
        key: str,
        task_id: str,
        *,
        writes: Mapping[str, Any],
        cleared: bool,
        result: Any,
        outbox: list[dict[str, Any]],
        finish: bool,
        epoch: int = 0,
    ) -> None:
        """Apply a task's changes and record it as applied, atomically.

        Raises :class:`AlreadyApplied` (writing nothing) when the id was applied
        meanwhile, :class:`StateSizeLimitError` when the state would grow past
        ``sticky_state_size_limit``, and ``TypeError`` naming the field whose value
        cannot be pickled.
        """
        blobs = {}
        for field, value in writes.items():
            if value is DELETED:
                blobs[field] = DELETED
                continue
            try:
                blobs[field] = dumps(value)
            except Exception as exc:
                raise TypeError(
                    f"state field {field!r} of {workflow}:{key} cannot be pickled: {exc}"
                ) from exc
        try:
            pickled_result = dumps(result)
        except Exception as exc:
            raise TypeError(f"the result of task {task_id} cannot be pickled: {exc}") from exc
        self._check_size(workflow, key, sum(len(b) for b in blobs.values() if b is not DELETED))
        versions = {field: new_version() for field, blob in blobs.items() if blob is not DELETED}

        cache = self.cache
        with cache.transact():
            if ("a", workflow, key, task_id) in cache:
                _, previous = cache.get(("a", workflow, key, task_id))
                raise AlreadyApplied(pickle.loads(previous))
            old_fields = set(self.fields(workflow, key))
            if finish:
                self._delete_key(workflow, key, old_fields)
                cache.set(
                    ("a", workflow, key, task_id),
                    (0, pickled_result),
                    expire=self.config.finished_dedup_ttl,
                )
            else:
                fields = set() if cleared else set(old_fields)
                for field in old_fields - fields:
                    cache.delete(("v", workflow, key, field))
                    cache.delete(("m", workflow, key, field))
                for field, blob in blobs.items():
                    if blob is DELETED:
                        cache.delete(("v", workflow, key, field))
                        cache.delete(("m", workflow, key, field))
                        fields.discard(field)
                    else:
                        cache.set(("v", workflow, key, field), blob)
                        cache.set(("m", workflow, key, field), versions[field])
                        fields.add(field)
                if fields:
                    cache.set(("i", workflow, key), tuple(sorted(fields)))
                else:
                    cache.delete(("i", workflow, key))
                self._record_applied(workflow, key, task_id, pickled_result)
                if epoch:
                    cache.set(("e", workflow, key), epoch)
            if outbox:
                cache.set(("o", workflow, key, task_id), outbox)
                pending = cache.get(("O",), default=frozenset())
                cache.set(("O",), pending | {(workflow, key, task_id)})
        # Outside the transaction: keep what this task wrote in the memory tier.
        if finish:
            self.memory.discard_key(self.directory, workflow, key)
            return
        for field, blob in blobs.items():
            slot = (self.directory, workflow, key, field)
            if blob is DELETED:
                self.memory.discard(slot)
            else:
                self.memory.put(slot, versions[field], writes[field], len(blob))
        if cleared:
            for field in old_fields - set(blobs):
                self.memory.discard((self.directory, workflow, key, field))

    def _record_applied(self, workflow: str, key: str, task_id: str, result: bytes) -> None:
        cache = self.cache
        seq = int(cache.get(("n", workflow, key), default=0)) + 1
        cache.set(("n", workflow, key), seq)
        cache.set(("a", workflow, key, task_id), (seq, result))
        cache.set(("s", workflow, key, seq), task_id)
        cache.set(("t", workflow, key), time.time())
        expired = seq - self.config.dedup_window
        if expired > 0:
            old = cache.pop(("s", workflow, key, expired))
            if old is not None:
                cache.delete(("a", workflow, key, old))

    def _delete_key(self, workflow: str, key: str, fields: Iterable[str]) -> None:
        cache = self.cache
        for field in fields:
            cache.delete(("v", workflow, key, field))
            cache.delete(("m", workflow, key, field))
        cache.delete(("i", workflow, key))
        seq = int(cache.get(("n", workflow, key), default=0))
        for number in range(max(1, seq - self.config.dedup_window + 1), seq + 1):
            old = cache.pop(("s", workflow, key, number))
            if old is not None:
                cache.delete(("a", workflow, key, old))
        cache.delete(("n", workflow, key))
        cache.delete(("t", workflow, key))
        cache.delete(("e", workflow, key))

    def delete_key(self, workflow: str, key: str) -> None:
        """Forget everything about a key (its lease moved on, or it was released)."""
        with self.cache.transact():
            self._delete_key(workflow, key, self.fields(workflow, key))
        self.memory.discard_key(self.directory, workflow, key)

    # -- ownership changes -------------------------------------------------------

    def epoch(self, workflow: str, key: str) -> int | None:
        """The lease epoch the key's local state belongs to (None: no local state)."""
        epoch = self.cache.get(("e", workflow, key))
        return None if epoch is None else int(epoch)

    def local_keys(self) -> list[tuple[str, str, int]]:
        """``(workflow, key, epoch)`` of every key with local state (a full scan)."""
        found = []
        for record in self.cache.iterkeys():
            if isinstance(record, tuple) and len(record) == 3 and record[0] == "e":
                epoch = self.cache.get(record)
                if epoch is not None:
                    found.append((record[1], record[2], int(epoch)))
        return found

    def export_key(self, workflow: str, key: str) -> dict[str, Any] | None:
        """The key's state and applied records, as raw bytes, for a hand-over."""
        cache = self.cache
        with cache.transact():
            epoch = cache.get(("e", workflow, key))
            fields = self.fields(workflow, key)
            if epoch is None and not fields:
                return None
            seq = int(cache.get(("n", workflow, key), default=0))
            applied = []
            for number in range(max(1, seq - self.config.dedup_window + 1), seq + 1):
                task_id = cache.get(("s", workflow, key, number))
                record = None if task_id is None else cache.get(("a", workflow, key, task_id))
                if record is not None:
                    applied.append((task_id, record[0], record[1]))
            return {
                "workflow": workflow,
                "key": key,
                "epoch": epoch,
                "seq": seq,
                "fields": {f: cache.get(("v", workflow, key, f)) for f in fields},
                "applied": applied,
                "last_commit": cache.get(("t", workflow, key)),
            }

    def import_key(self, workflow: str, key: str, data: dict[str, Any], epoch: int) -> None:
        """Replace the key's local state with an exported copy, under ``epoch``."""
        cache = self.cache
        with cache.transact():
            self._delete_key(workflow, key, self.fields(workflow, key))
            fields = data.get("fields") or {}
            for field, blob in fields.items():
                cache.set(("v", workflow, key, field), blob)
                cache.set(("m", workflow, key, field), new_version())
            if fields:
                cache.set(("i", workflow, key), tuple(sorted(fields)))
            for task_id, seq, result in data.get("applied") or ():
                cache.set(("a", workflow, key, task_id), (seq, result))
                cache.set(("s", workflow, key, seq), task_id)
            cache.set(("n", workflow, key), int(data.get("seq") or 0))
            if data.get("last_commit") is not None:
                cache.set(("t", workflow, key), data["last_commit"])
            cache.set(("e", workflow, key), epoch)
        self.memory.discard_key(self.directory, workflow, key)

    def reset_key(self, workflow: str, key: str, epoch: int) -> bool:
        """Start the key afresh under ``epoch``; True when there was local state to drop."""
        cache = self.cache
        with cache.transact():
            had = ("e", workflow, key) in cache or bool(self.fields(workflow, key))
            self._delete_key(workflow, key, self.fields(workflow, key))
            cache.set(("e", workflow, key), epoch)
        self.memory.discard_key(self.directory, workflow, key)
        return had

    def _check_size(self, workflow: str, key: str, incoming: int) -> None:
        limit = self.config.state_size_limit
        if limit is None:
            return
        used = self.cache.volume()
        if used + incoming > limit:
            raise StateSizeLimitError(
                f"committing {incoming} bytes to {workflow}:{key} would take the state in "
                f"{self.directory} to {used + incoming} bytes, past "
                f"sticky_state_size_limit={limit}; nothing was written"
            )

    # -- outbox ----------------------------------------------------------------

    def outbox(self, workflow: str, key: str, task_id: str) -> list[dict[str, Any]]:
        return list(self.cache.get(("o", workflow, key, task_id), default=()))

    def pending_outboxes(self) -> list[OutboxRecord]:
        return sorted(self.cache.get(("O",), default=frozenset()))

    def outbox_sent(self, workflow: str, key: str, task_id: str) -> None:
        with self.cache.transact():
            self.cache.delete(("o", workflow, key, task_id))
            pending = self.cache.get(("O",), default=frozenset())
            self.cache.set(("O",), pending - {(workflow, key, task_id)})


# -- one NodeState per process and directory, opened after the fork -------------

_opened: dict[tuple[int, str], NodeState] = {}
_opened_lock = threading.Lock()


def node_directory(state_dir: str, nodename: str) -> str:
    return os.path.join(state_dir, nodename)


def open_node_state(config: StickyConfig, nodename: str) -> NodeState:
    """This process's ``NodeState`` for ``nodename``, opened on first use."""
    directory = node_directory(config.state_dir, nodename)
    slot = (os.getpid(), directory)
    state = _opened.get(slot)
    if state is None:
        with _opened_lock:
            state = _opened.get(slot)
            if state is None:
                state = _opened[slot] = NodeState(directory, config)
    return state


def check_node_directory(config: StickyConfig, nodename: str) -> str:
    """Fail at worker start, naming the directory, when local state is unusable.

    Creates the directory, writes a probe file, and opens and reads the cache (a
    corrupt database fails here rather than at the first task). The cache is
    closed again: the pool processes open their own after the fork.
    """
    directory = node_directory(config.state_dir, nodename)
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
        state = NodeState(directory, config)
        try:
            state.pending_outboxes()
            state.cache.volume()
        finally:
            state.close()
    except Exception as exc:
        raise StateDirError(
            f"sticky_state_dir: cannot use {directory!r} for local state: {exc}"
        ) from exc
    return directory


# Set by the worker bootstep in the main process, before the pool forks.
_current_node: str | None = None


def set_current_node(nodename: str) -> None:
    global _current_node
    _current_node = nodename


def current_node() -> str | None:
    """The nodename of the worker this process belongs to, if it is one."""
    return _current_node
