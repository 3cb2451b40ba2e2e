"""Hand-over copies in Redis: a key's exported state while it waits for its next owner.

The copy lives under ``<key_prefix>:handoff:<workflow>:<key>`` in the lease
store's Redis (see the keyspace in :mod:`celery_sticky.lease`), as a pickle split
into chunks of ``CHUNK_BYTES`` so that no single command moves more than a few
MB, written in one MULTI/EXEC transaction. It shares the lease store's error
guard, so an unreachable Redis is :class:`~celery_sticky.errors.LeaseStoreUnavailable`
here too.
"""

from __future__ import annotations

import pickle
from typing import Any

import redis

from ..settings import StickyConfig
from .store import LeaseStore

CHUNK_BYTES = 4 * 2**20


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
