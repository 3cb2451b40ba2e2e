"""The lease store: who owns which workflow key, under which epoch.

Every decision that must be atomic across producers and workers is one Lua
script (the ``.lua`` files beside this module), run with EVALSHA. Liveness is
measured against the Redis server's clock, never a worker's. The keys it
writes are listed in :mod:`celery_sticky.lease`.
"""

from __future__ import annotations

import enum
import json
import os
import random
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple, TypeVar

import redis
from redis.commands.core import Script

from .. import metrics
from ..errors import LeaseStoreUnavailable
from ..placement import decode_tags
from ..settings import StickyConfig
from ..urls import redact_url as redact_url  # re-exported by lease/ for its callers
from .connection import connect

T = TypeVar("T")


class ClaimStatus(enum.IntEnum):
    MOVING = -4  # being moved on purpose to the lease's owner: route there, it waits
    UNOWNED = -3  # nobody holds it and the claim was told not to pick anyone
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
    over_limit: bool = False  # every worker that may hold it was at its key limit


class LeaseInfo(NamedTuple):
    owner: str
    epoch: int
    alive: bool
    origin: str  # "claimed", "taken_over" from a dead owner (its state may be lost), "moved"
    affinity: str = ""  # the tags its holder must carry ('name=value,...')
    moving_to: str = ""  # the worker a move under way hands it to


class Heartbeat(NamedTuple):
    """A heartbeat's answer: ``status`` is ``ok``, ``taken`` (another live process
    registered the name), ``superseded`` (this process is no longer the registered
    one) or ``reaped`` (register again to rejoin); ``instance`` is the registered token."""

    status: str
    server_time: float
    instance: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def instance_token() -> str:
    """This process's token for the worker registry: ``<host>:<pid>:<random>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
    tags: dict[str, str] = field(default_factory=dict)
    max_keys: int | None = None

    @property
    def load(self) -> float:
        """Owned keys per unit of capacity."""
        return self.keys / max(self.capacity, 1)


def _load_script(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text()


class LeaseStore:
    """Claims, lookups, releases and the worker registry, one Lua script each."""

    def __init__(self, config: StickyConfig, client: redis.Redis | None = None) -> None:
        self.config = config
        self.url = config.redis_url
        self.prefix = f"{config.key_prefix}:"
        #: The token heartbeats carry unless the caller passes its own.
        self.instance = instance_token()
        # Typed Any: redis-py types replies as bytes | str, decode_responses makes them str.
        self.redis: Any = client or connect(
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
        self._copy_switch: Script = self.redis.register_script(_load_script("copy_switch"))
        self._deregister: Script = self.redis.register_script(_load_script("deregister"))
        self._move_begin: Script = self.redis.register_script(_load_script("move_begin"))
        self._move_commit: Script = self.redis.register_script(_load_script("move_commit"))

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

    @property
    def tagsets_key(self) -> str:
        return f"{self.prefix}tagsets"

    # -- operations ------------------------------------------------------------

    def claim(
        self,
        workflow: str,
        key: str,
        candidate: str = "",
        *,
        force: bool = False,
        policy: str = "least_loaded",
        affinity: str = "",
    ) -> Lease:
        """Return the key's valid lease, or claim it for ``candidate``.

        When there is no candidate, or it may not take the key (not live, lacks a
        tag of ``affinity``, at its key limit while others are not), ``policy``
        picks among the live workers that may, atomically; ``"none"`` picks
        nobody (``UNOWNED``). A dead owner whose queue was not reaped yet keeps
        the key (``PENDING``) unless ``force`` (the reaper moving that queue on).
        """
        owner, epoch, status, previous, over_limit = self._call(
            self._claim,
            keys=[self.lease_key(workflow, key), self.workers_key, self.epoch_key],
            args=[
                self.config.lease_ttl,
                candidate,
                self.prefix,
                f"{workflow}:{key}",
                "1" if force else "",
                policy,
                affinity,
                repr(random.random()),
            ],
        )
        return Lease(owner, int(epoch), ClaimStatus(int(status)), previous, over_limit == "1")

    def release(
        self,
        workflow: str,
        key: str,
        owner: str = "",
        epoch: int = 0,
        ended: dict[str, int] | None = None,
    ) -> bool:
        """Drop a lease (only ``owner``'s, under ``epoch``, when given); the next task
        claims afresh. ``ended``: the workflow ended, and this is the key's record of
        applied producer numbers, kept for ``sticky_finished_dedup_ttl`` seconds
        (:meth:`ended_streams`)."""
        released = self._call(
            self._release,
            keys=[self.lease_key(workflow, key), self.ended_key(workflow, key)],
            args=[
                self.prefix,
                f"{workflow}:{key}",
                owner,
                str(epoch) if epoch else "",
                json.dumps(ended, separators=(",", ":")) if ended else "",
                max(1, int(self.config.finished_dedup_ttl)),
            ],
        )
        return bool(released)

    def ended_key(self, workflow: str, key: str) -> str:
        return f"{self.prefix}ended:{workflow}:{key}"

    def ended_streams(self, workflow: str, key: str) -> dict[str, Any] | None:
        """The record of applied producer numbers the key's ended workflow left, or None
        (validated by the caller: bytes from Redis)."""
        return self._json_at(self.ended_key(workflow, key))

    def copy_pointer_key(self, workflow: str, key: str) -> str:
        return f"{self.prefix}copy:{workflow}:{key}"

    def copy_pointer(self, workflow: str, key: str) -> str | None:
        """The version name the key's hand-over copy points at, or None."""
        name = self.guard(lambda: self.redis.get(self.copy_pointer_key(workflow, key)))
        return str(name) if name else None

    def switch_copy(
        self,
        workflow: str,
        key: str,
        writer: str,
        epoch: int,
        version: str,
        version_key: str,
        *,
        fenced: bool = True,
        streams: dict[str, int] | None = None,
    ) -> tuple[bool, str]:
        """Make ``version`` the key's copy (``""``: retire it) if ``writer`` still holds the
        key live under ``epoch`` (copy_switch.lua), with the copy's record of applied
        producer numbers (``streams``, see :meth:`copy_streams`). Returns ``(switched,
        previous version)``. ``fenced=False`` skips the check: only the nemesis
        checker's broken build does."""
        switched, previous = self._call(
            self._copy_switch,
            keys=[
                self.lease_key(workflow, key),
                self.workers_key,
                self.copy_pointer_key(workflow, key),
                version_key,
                self.copy_streams_key(workflow, key),
            ],
            args=[
                self.config.lease_ttl,
                writer,
                epoch,
                version,
                "1" if fenced else "0",
                json.dumps(streams, separators=(",", ":")) if streams is not None else "",
            ],
        )
        return bool(int(switched)), str(previous)

    def copy_streams_key(self, workflow: str, key: str) -> str:
        return f"{self.prefix}copyseq:{workflow}:{key}"

    def copy_streams(self, workflow: str, key: str) -> dict[str, Any] | None:
        """The record of applied producer numbers of the key's copy, or None (validated by
        the caller: bytes from Redis)."""
        return self._json_at(self.copy_streams_key(workflow, key))

    def _json_at(self, name: str) -> dict[str, Any] | None:
        raw = self.guard(lambda: self.redis.get(name))
        if not raw:
            return None
        try:
            found = json.loads(raw)
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def heartbeat(
        self,
        node: str,
        capacity: int,
        queue: str,
        *,
        register: bool = False,
        tags: str = "",
        max_keys: int | None = None,
        instance: str = "",
        force: bool = False,
    ) -> Heartbeat:
        """Renew ``node``'s heartbeat (``register``: at start, with its ``tags``,
        key limit and ``instance`` token; ``force``: over a live token whose process
        is known to be gone). See heartbeat.lua for the statuses."""
        status, now, registered = self._call(
            self._heartbeat,
            keys=[self.workers_key, self.worker_key(node), self.tagsets_key],
            args=[
                node,
                capacity,
                queue,
                "1" if register else "",
                tags,
                max_keys or "",
                instance or self.instance,
                self.config.lease_ttl,
                "1" if force else "",
            ],
        )
        return Heartbeat(str(status), float(now), str(registered))

    def begin_move(
        self, workflow: str, key: str, target: str, owner: str = "", *, deadline: float = 60.0
    ) -> tuple[int, str, int]:
        """Route the key's new tasks to ``target`` until the move commits, or is off
        ``deadline`` seconds from now (see move_begin.lua).

        Returns ``(status, owner, epoch)``.
        """
        status, current, epoch = self._call(
            self._move_begin,
            keys=[self.lease_key(workflow, key), self.workers_key],
            args=[self.config.lease_ttl, self.prefix, target, owner, deadline],
        )
        return int(status), str(current), int(epoch)

    def commit_move(self, workflow: str, key: str, owner: str, epoch: int, target: str) -> Lease:
        """Make ``target`` the owner under a new epoch; ``CLAIMED`` when moved, else ``OWNED``."""
        moved, current, new_epoch = self._call(
            self._move_commit,
            keys=[self.lease_key(workflow, key), self.workers_key, self.epoch_key],
            args=[self.config.lease_ttl, self.prefix, f"{workflow}:{key}", owner, epoch, target],
        )
        status = ClaimStatus.CLAIMED if int(moved) else ClaimStatus.OWNED
        return Lease(str(current), int(new_epoch), status, owner if int(moved) else "")

    def tagsets(self) -> list[dict[str, str]]:
        """Every tag set a worker ever registered with (this store's lifetime)."""
        members = self.guard(lambda: self.redis.smembers(self.tagsets_key))
        return [decode_tags(str(member)) for member in members]

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
        """Whether a live worker is moving ``node``'s queue on right now.

        A reaper that died while it held the lock leaves it for up to its expiry; a
        lock held by a worker that no longer heartbeats does not count.
        """

        def read() -> bool:
            reaper = self.redis.get(f"{self.prefix}reaping:{node}")
            if reaper is None:
                return False
            beat = self.redis.zscore(self.workers_key, reaper)
            return beat is not None and beat >= self._server_time() - self.config.lease_ttl

        return bool(self.guard(read))

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
        """The key's lease as it stands (see :class:`LeaseInfo`), or None when nobody holds it."""
        found = self._call(
            self._lookup,
            keys=[self.lease_key(workflow, key), self.workers_key],
            args=[self.config.lease_ttl],
        )
        if not found:
            return None
        owner, epoch, alive, origin, affinity, moving_to = found
        return LeaseInfo(
            str(owner), int(epoch), bool(int(alive)), str(origin), str(affinity), str(moving_to)
        )

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
                        tags=decode_tags(info.get("tags", "")),
                        max_keys=int(info["max_keys"]) if info.get("max_keys") else None,
                    )
                )
            return result

        return self.guard(read)

    def owned_keys(self, node: str) -> set[tuple[str, str]]:
        """The ``(workflow, key)`` pairs registered to ``node``."""
        members = self.guard(lambda: self.redis.smembers(self.owned_key(node)))
        pairs = (str(member).split(":", 1) for member in members)
        return {(workflow, key) for workflow, key in pairs}

    def owned_count(self, node: str) -> int:
        """How many keys are registered to ``node``."""
        return int(self.guard(lambda: self.redis.scard(self.owned_key(node))))

    def is_registered(self, node: str) -> bool:
        """Whether ``node`` is in the worker registry (alive or not)."""
        return self.guard(lambda: self.redis.zscore(self.workers_key, node)) is not None

    def lease_since(self, workflow: str, key: str) -> float | None:
        """Server time the key's current owner took it, or None when nobody holds it."""
        since = self.guard(lambda: self.redis.hget(self.lease_key(workflow, key), "since"))
        return float(since) if since else None

    def scan_owned(
        self, node: str, position: int, match: str | None, count: int
    ) -> tuple[int, list[str]]:
        """One SSCAN page of ``node``'s owned set: ``(next position, ['<workflow>:<key>'])``."""
        page: tuple[int, list[str]] = self.guard(
            lambda: self.redis.sscan(self.owned_key(node), position, match=match, count=count)
        )
        return page

    @property
    def lease_key_prefix(self) -> str:
        """What every lease key starts with (``<prefix>lease:``)."""
        return f"{self.prefix}lease:"

    def scan_lease_keys(self, position: int, match: str, count: int) -> tuple[int, list[str]]:
        """One SCAN page of lease keys matching ``match`` (a glob over whole key names)."""
        page: tuple[int, list[str]] = self.guard(
            lambda: self.redis.scan(position, match=match, count=count)
        )
        return page

    def lease_rows(self, pairs: Sequence[Sequence[str]]) -> list[list[str | None]]:
        """``[owner, epoch, origin]`` of each ``(workflow, key)``, one pipelined read."""

        def read() -> list[list[str | None]]:
            pipe = self.redis.pipeline(transaction=False)
            for workflow, key in pairs:
                pipe.hmget(self.lease_key(workflow, key), "owner", "epoch", "origin")
            replies: list[list[str | None]] = pipe.execute()
            return replies

        return self.guard(read)

    def ping(self) -> None:
        self.guard(self.redis.ping)

    def server_time(self) -> float:
        """The Redis server's clock, which every liveness decision is measured against."""
        return self.guard(self._server_time)

    def _server_time(self) -> float:
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / 1e6

    def _call(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        return self.guard(lambda: script(keys=keys, args=args))

    def guard(self, call: Callable[[], T]) -> T:
        """Run ``call`` (Redis commands), turning every Redis error into
        :class:`LeaseStoreUnavailable` naming the store's URL.

        Every Redis answer that is not a reply means "the store cannot serve this
        now", whatever its kind: a dropped connection or a timeout, ``OOM`` (maxmemory
        reached), ``READONLY`` (a replica, during a Sentinel failover), ``BUSY`` (a
        script or ``DEBUG SLEEP`` running), ``LOADING`` (a restart reading its data),
        ``MASTERDOWN``, ``NOREPLICAS``. Callers pause sticky work and try again
        later; none of these may stop a worker. ``NOSCRIPT`` (after ``SCRIPT FLUSH``
        or a restart) never gets here: redis-py loads the script again and retries.
        """
        try:
            return call()
        except redis.RedisError as exc:
            kind = _error_kind(exc)
            metrics.store_errors.labels(kind).inc()
            raise LeaseStoreUnavailable(
                f"lease store at {redact_url(self.url)} cannot serve now ({kind}): {exc}"
            ) from exc


_ERROR_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (redis.TimeoutError, "timeout"),
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.AuthenticationError, "auth"),
    (redis.ConnectionError, "connection"),
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),
)


_ERROR_CODE = re.compile(
    r"(?:^|[\s-])(OOM|READONLY|BUSY|LOADING|MASTERDOWN|NOREPLICAS|NOPERM|MISCONF|CLUSTERDOWN)\b"
)


def _error_kind(exc: BaseException) -> str:
    """A short label of a Redis error: ``connection``, ``timeout`` or the reply's code."""
    for cls, kind in _ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    if isinstance(exc, redis.ResponseError) and exc.args:
        # A script's error carries the code inside: "...: @user_script:172: -OOM ...".
        found = _ERROR_CODE.search(str(exc.args[0]))
        return found.group(1) if found else "error"
    return type(exc).__name__
