"""Until when this node's proven leases hold, shared with its pool processes.

Why: before a task's local commit, the pool asks whether this worker still holds the
key (the fence). The node's main process already knows the answer without the lease
store: from its acknowledged heartbeats and the store's ``born`` stamp it knows until
when no other worker can be given a key it proved (:class:`.node.KnownLeases`, and
docs/guarantees.md#known-leases). Written here, that answer costs a pool process a
memory read instead of a Redis round trip per task.

The record is a small file in the node's state directory, mapped into memory by each
process that uses it: the main process writes it, pool processes (prefork children,
threads, solo) read it. ``time.monotonic()`` is the system's ``CLOCK_MONOTONIC``, one
clock for every process of the host, so a deadline written by one process means the
same in another.

Layout (native byte order, 24 bytes): ``u64`` sequence, even when stable and odd while
a write is under way (a seqlock: a reader retries until it saw one whole write);
``i64`` chain, the id of the run of unbroken knowledge the deadline belongs to (0:
none); ``f64`` until, a ``time.monotonic()`` deadline. A proof made in one chain is
good only while the record still names that chain (the gate passes the chain with
the task; see :data:`CHAIN_HEADER`): a pause, a heartbeat refused or a store that
lost its data starts a new chain, so a task proven before it is fenced in the store.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from pathlib import Path

#: Message header the gate sets to the chain its proof of the key was made in (and
#: removes when it has none): the pool commits on the local record only while the
#: record still names that chain. Rewritten by the gate on every delivery, so a value
#: that travelled with a forwarded or forged message is never used.
CHAIN_HEADER = "sticky_chain"

_LAYOUT = struct.Struct("=Qqd")
FILE_NAME = "lease-clock"


class LeaseClock:
    """The shared record of one node (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create and os.fstat(fd).st_size < _LAYOUT.size:
                os.ftruncate(fd, _LAYOUT.size)  # never shrunk: a reader's map stays valid
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        if create:
            self.write(0, 0.0)  # a previous run's record means nothing now

    def write(self, chain: int, until: float) -> None:
        """Main process: knowledge ``chain`` holds until ``until`` (monotonic)."""
        with self._lock:
            sequence = _LAYOUT.unpack_from(self._map)[0]
            struct.pack_into("=Q", self._map, 0, sequence + 1)  # odd: under way
            _LAYOUT.pack_into(self._map, 0, sequence + 1, chain, until)
            struct.pack_into("=Q", self._map, 0, sequence + 2)

    def read(self) -> tuple[int, float]:
        """``(chain, until)`` as one whole write left them."""
        while True:
            before, chain, until = _LAYOUT.unpack_from(self._map)
            if not before & 1 and _LAYOUT.unpack_from(self._map)[0] == before:
                return chain, until

    def holds(self, chain: int) -> bool:
        """Whether a proof made in ``chain`` still holds now."""
        if not chain:
            return False
        current, until = self.read()
        return current == chain and time.monotonic() < until

    def close(self) -> None:
        self._map.close()


_opened: dict[tuple[int, str], LeaseClock | None] = {}


def lease_clock_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory) / FILE_NAME


def open_lease_clock(directory: str | os.PathLike[str]) -> LeaseClock | None:
    """A pool process's view of its node's record (opened once per process), or None
    when no worker main process keeps one there (a task run outside a worker)."""
    slot = (os.getpid(), str(directory))
    if slot not in _opened:
        try:
            _opened[slot] = LeaseClock(lease_clock_path(directory))
        except (OSError, ValueError):
            return None  # not there yet: asked again next time
    return _opened[slot]
