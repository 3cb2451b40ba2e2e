"""The memory tier: decoded large state values kept in the pool process.

Unpickling a 100 MB object from disk takes hundreds of milliseconds; a task that
reads it on every step should pay that once. Entries are validated against the
version stamp the store writes with each value, so a value changed by another
process of the worker is read again. Bounded by bytes (``sticky_memory_cache_bytes``),
least recently used first out.

Values served from here are the same object for every task of this process that
reads them: treat what you read as read-only and assign a new object to change a
value. A task that fails drops the entries it read, so its in-place changes do
not outlive it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

Slot = tuple[str, str, str, str]  # (node directory, workflow, key, field)

MISS = object()


class MemoryTier:
    """A byte-bounded LRU of ``slot -> (version, value)``."""

    def __init__(self, max_bytes: int, min_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.bytes = 0
        self._entries: OrderedDict[Slot, tuple[int, Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, slot: Slot, version: int) -> Any:
        with self._lock:
            entry = self._entries.get(slot)
            if entry is None:
                return MISS
            if entry[0] != version:
                self._drop(slot)
                return MISS
            self._entries.move_to_end(slot)
            return entry[1]

    def put(self, slot: Slot, version: int, value: Any, size: int) -> None:
        """Keep ``value`` if it is worth it (large enough) and fits at all."""
        if size < self.min_bytes or size > self.max_bytes:
            return
        with self._lock:
            self._drop(slot)
            self._entries[slot] = (version, value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                oldest = next(iter(self._entries))
                self._drop(oldest)

    def discard(self, slot: Slot) -> None:
        with self._lock:
            self._drop(slot)

    def discard_key(self, directory: str, workflow: str, key: str) -> None:
        with self._lock:
            for slot in [s for s in self._entries if s[:3] == (directory, workflow, key)]:
                self._drop(slot)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, slot: Slot) -> None:
        entry = self._entries.pop(slot, None)
        if entry is not None:
            self.bytes -= entry[2]
