"""The lease store: who owns which workflow key, under which epoch.

Every decision that must be atomic across producers and workers is one Lua
script (the ``.lua`` files beside this module), run with EVALSHA. Liveness is
measured against the Redis server's clock, never a worker's.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.commands.core import Script

from ..errors import LeaseStoreUnavailable
from ..settings import StickyConfig

T = TypeVar("T")


class ClaimStatus(enum.IntEnum):
    PENDING = -2  # the owner is dead, its queue not reaped yet: route to it still
    NO_LIVE_WORKER = -1
    OWNED = 0
    CLAIMED = 1
    TAKEN_OVER = 2


class Lease(NamedTuple):
    """A key's owner (Celery nodename) and the epoch it holds the key under."""

    owner: str
    epoch: int
    status: ClaimStatus
    previous: str = ""  # the owner it was taken over from


class LeaseInfo(NamedTuple):
    owner: str
    epoch: int
    alive: bool
    origin: str  # "claimed", or "taken_over" from a dead owner (its state may be lost)


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    heartbeat: float
    alive: bool
    capacity: int
    queue: str
    keys: int
    draining: bool = False
    reaped: bool = False
    reaped_at: float | None = None  # server time it was first marked reaped


def _load_script(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text()


def redact_url(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class LeaseStore:
    """Claims, lookups, releases and the worker registry, one Lua script each."""

    def __init__(self, config: StickyConfig, client: redis.Redis | None = None) -> None:
        self.config = config
        self.url = config.redis_url
        self.prefix = f"{config.key_prefix}:"
        # Typed Any: redis-py types replies as bytes | str, decode_responses makes them str.
        self.redis: Any = client or redis.Redis.from_url(
            config.redis_url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
        )
        self._claim: Script = self.redis.register_script(_load_script("claim"))
        self._heartbeat: Script = self.redis.register_script(_load_script("heartbeat"))
        self._lookup: Script = self.redis.register_script(_load_script("lookup"))
        self._release: Script = self.redis.register_script(_load_script("release"))
        self._deregister: Script = self.redis.register_script(_load_script("deregister"))

    # -- Redis key names -------------------------------------------------------

    def lease_key(self, workflow: str, key: str) -> str:
        return f"{self.prefix}lease:{workflow}:{key}"

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}workers"

    def worker_key(self, node: str) -> str:
        return f"{self.prefix}worker:{node}"

    def owned_key(self, node: str) -> str:
        return f"{self.prefix}owned:{node}"

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}epoch"

    # -- operations ------------------------------------------------------------

    def claim(self, workflow: str, key: str, candidate: str = "", *, force: bool = False) -> Lease:
        """Return the key's valid lease, or claim it for ``candidate``.

        With no candidate the least loaded live worker is chosen, atomically. A
        dead owner whose queue was not reaped yet keeps the key (``PENDING``)
        unless ``force`` (the reaper moving that queue on).
        """
        owner, epoch, status, *previous = self._call(
            self._claim,
            keys=[self.lease_key(workflow, key), self.workers_key, self.epoch_key],
            args=[
                self.config.lease_ttl,
                candidate,
                self.prefix,
                f"{workflow}:{key}",
                "1" if force else "",
            ],
        )
        return Lease(owner, int(epoch), ClaimStatus(int(status)), previous[0] if previous else "")

    def release(self, workflow: str, key: str, owner: str = "") -> bool:
        """Drop a lease (only ``owner``'s when given); the next task claims afresh."""
        released = self._call(
            self._release,
            keys=[self.lease_key(workflow, key)],
            args=[self.prefix, f"{workflow}:{key}", owner],
        )
        return bool(released)

    def heartbeat(self, node: str, capacity: int, queue: str, *, register: bool = False) -> float:
        """Renew ``node``'s heartbeat (``register``: at start); returns the server time."""
        now = self._call(
            self._heartbeat,
            keys=[self.workers_key, self.worker_key(node)],
            args=[node, capacity, queue, "1" if register else ""],
        )
        return float(now)

    def deregister(self, node: str) -> None:
        """Mark ``node`` dead now; its keys stay pending until it is reaped."""
        self._call(self._deregister, keys=[self.workers_key, self.worker_key(node)], args=[node])

    def set_draining(self, node: str) -> None:
        """``node`` stops taking keys: new claims skip it, its keys wait in its queue."""
        self.guard(lambda: self.redis.hset(self.worker_key(node), "draining", "1"))

    def dead_workers(self) -> list[str]:
        """Registered workers whose heartbeat is older than the TTL (or that drained)."""
        return self.guard(
            lambda: self.redis.zrangebyscore(
                self.workers_key, "-inf", f"({self._server_time() - self.config.lease_ttl}"
            )
        )

    def try_lock_reaping(self, node: str, reaper: str, seconds: float) -> bool:
        """Become the one worker that reaps ``node`` for ``seconds``."""
        return bool(
            self.guard(
                lambda: self.redis.set(
                    f"{self.prefix}reaping:{node}", reaper, nx=True, px=int(seconds * 1000)
                )
            )
        )

    def unlock_reaping(self, node: str) -> None:
        self.guard(lambda: self.redis.delete(f"{self.prefix}reaping:{node}"))

    def reaping(self, node: str) -> bool:
        return bool(self.guard(lambda: self.redis.exists(f"{self.prefix}reaping:{node}")))

    def mark_reaped(self, node: str) -> float | None:
        """Record that ``node``'s queue was moved on (its keys may now be taken over).

        Returns when it was first marked reaped (server time), or None when the
        node came back to life meanwhile (then nothing is marked).
        """

        def mark() -> float | None:
            now = self._server_time()
            beat = self.redis.zscore(self.workers_key, node)
            if beat is not None and beat >= now - self.config.lease_ttl:
                return None
            info = self.worker_key(node)
            self.redis.hsetnx(info, "reaped_at", now)
            self.redis.hset(info, "reaped", "1")
            return float(self.redis.hget(info, "reaped_at"))

        return self.guard(mark)

    def forget_worker(self, node: str) -> None:
        """Drop a long-dead, reaped worker from the registry."""

        def forget() -> None:
            pipe = self.redis.pipeline()
            pipe.zrem(self.workers_key, node)
            pipe.delete(self.worker_key(node), self.owned_key(node))
            pipe.execute()

        self.guard(forget)

    def lookup(self, workflow: str, key: str) -> LeaseInfo | None:
        """``(owner, epoch, owner_alive, origin)`` of a key, or None when nobody holds it."""
        found = self._call(
            self._lookup,
            keys=[self.lease_key(workflow, key), self.workers_key],
            args=[self.config.lease_ttl],
        )
        if not found:
            return None
        owner, epoch, alive, origin = found
        return LeaseInfo(str(owner), int(epoch), bool(int(alive)), str(origin))

    def workers(self) -> list[WorkerInfo]:
        """Every registered worker, alive or not, with its load."""

        def read() -> list[WorkerInfo]:
            now = self._server_time()
            beats = self.redis.zrange(self.workers_key, 0, -1, withscores=True)
            pipe = self.redis.pipeline(transaction=False)
            for node, _ in beats:
                pipe.hgetall(self.worker_key(node))
                pipe.scard(self.owned_key(node))
            replies = pipe.execute()
            result = []
            for i, (node, beat) in enumerate(beats):
                info, keys = replies[2 * i], replies[2 * i + 1]
                result.append(
                    WorkerInfo(
                        name=node,
                        heartbeat=beat,
                        alive=beat >= now - self.config.lease_ttl,
                        capacity=int(info.get("capacity", 1)),
                        queue=info.get("queue", ""),
                        keys=int(keys),
                        draining=info.get("draining") == "1",
                        reaped=info.get("reaped") == "1",
                        reaped_at=(
                            float(info["reaped_at"])
                            if info.get("reaped") == "1" and info.get("reaped_at")
                            else None
                        ),
                    )
                )
            return result

        return self.guard(read)

    def owned_keys(self, node: str) -> set[tuple[str, str]]:
        """The ``(workflow, key)`` pairs registered to ``node``."""
        members = self.guard(lambda: self.redis.smembers(self.owned_key(node)))
        pairs = (str(member).split(":", 1) for member in members)
        return {(workflow, key) for workflow, key in pairs}

    def ping(self) -> None:
        self.guard(self.redis.ping)

    def _server_time(self) -> float:
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6

    def _call(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return self.guard(lambda: script(keys=keys, args=args))

    def guard(self, call: Callable[[], T]) -> T:
        """Run ``call`` (Redis commands), turning connection trouble into
        :class:`LeaseStoreUnavailable` naming the store's URL."""
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise LeaseStoreUnavailable(
                f"lease store at {redact_url(self.url)} does not answer: {exc}"
            ) from exc
