"""Hand-over copies in Redis: the blobs of :class:`~celery_sticky.handoff.Copies`.

Each version of a key's copy is a Redis list under its own name
(``<key_prefix>:copyv:<workflow>:<key>@<epoch>.<random>``, see the keyspace in
:mod:`celery_sticky.lease`), its bytes split into chunks of ``CHUNK_BYTES`` so
that no single command moves more than a few MB, written in one MULTI/EXEC
transaction with a one-day expiry. The fenced switch that makes a version the
key's copy (``copy_switch.lua``) removes that expiry; a version whose writer was
refused, or died before the switch, expires by itself.

The commits ``sync`` replication adds to a copy after its version are not here: they
are entries of the copy's log (``copy_append.lua``), which lives in the lease store's
Redis whatever the hand-over store is.
"""

from __future__ import annotations

from typing import Any

from ..settings import StickyConfig
from .connection import connect
from .store import LeaseStore

CHUNK_BYTES = 4 * 2**20
#: Seconds an unswitched version lives (a writer that died between write and switch).
ORPHAN_TTL = 86_400


class RedisHandoffStore:
    """Copy versions as chunked lists in the lease store's Redis."""

    def __init__(self, config: StickyConfig, lease_store: LeaseStore) -> None:
        # Binary replies: the lease store's client decodes to str.
        self.redis = connect(config.redis_url, socket_connect_timeout=2, socket_timeout=60)
        self.guard = lease_store.guard

    def write(self, name: str, blob: bytes) -> None:
        chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]

        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(name)
            pipe.rpush(name, *chunks)
            pipe.expire(name, ORPHAN_TTL)
            pipe.execute()

        self.guard(write)

    def read(self, name: str) -> bytes | None:
        chunks: list[Any] = self.guard(lambda: self.redis.lrange(name, 0, -1))
        return b"".join(chunks) if chunks else None

    def delete(self, name: str) -> None:
        self.guard(lambda: self.redis.unlink(name))
