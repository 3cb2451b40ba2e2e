"""The lease store: who owns which workflow key, under which epoch.

Every decision that must be atomic across producers and workers is one Lua
script (the ``.lua`` files beside this module), run with EVALSHA. Liveness is
measured against the Redis server's clock, never a worker's. The keys it
writes are listed in :mod:`celery_sticky.lease`.
"""

from __future__ import annotations

import enum
import hashlib
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
    GRACE = -5  # the store's data is new (it lost its data): nobody may claim yet
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
    since: float | None = None  # server time its owner took it


class Reaped(NamedTuple):
    """What :meth:`LeaseStore.take_over_keys` did: keys handed over to live workers,
    keys left with the dead worker (no live worker may take them: their affinity),
    and whether the worker was (still) reaped and not live."""

    moved: int
    left: int
    reaped: bool


class Heartbeat(NamedTuple):
    """A heartbeat's answer: ``status`` is ``ok``, ``taken`` (another live process
    registered the name), ``superseded`` (this process is no longer the registered
    one) or ``reaped`` (register again to rejoin); ``instance`` is the registered token;
    ``forgotten``: the store had no registration of the node (it lost its data) and
    registered it again."""

    status: str
    server_time: float
    instance: str
    forgotten: bool = False

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


#: Lease buckets: ``<prefix>:leases:<b>``, b from :meth:`LeaseStore.bucket` (and
#: ``bucket_of`` in lease.lua). About 61 leases each at a million keys, so each stays a
#: listpack under Redis's default ``hash-max-listpack-entries`` (128).
LEASE_BUCKETS = 16384
#: Owned buckets per worker: ``<prefix>:owned:<id>:<b % 4096>`` (about 24 keys each for
#: a worker holding 100,000).
OWNED_BUCKETS = 4096
#: Owned buckets one reap_keys.lua call starts from at most, and keys it hands over
#: per call (about): a call blocks Redis for a few milliseconds.
REAP_BATCH_KEYS = 1000
#: Seconds after a store's data began (first use, or after it lost its data) in which
#: nothing is claimed (claim.lua's claim grace). A worker trusts a lease it proved only
#: while it saw the store's ``born`` stamp unchanged within this long
#: (:class:`celery_sticky.worker.node.KnownLeases`), so no key it trusts can be given to
#: another worker by a store that forgot it.
CLAIM_GRACE = 1.0
#: How far a worker's monotonic clock may run slow against the lease store's clock
#: over one lease TTL or claim grace, as a fraction (NTP keeps it within a few parts
#: per million; steps of the server's wall clock are not covered: the lease store
#: must not jump forward).
CLOCK_DRIFT = 0.01
#: Scripts that read or write a lease: lease.lua goes in front of each.
_LEASE_SCRIPTS = {
    "claim",
    "lookup",
    "release",
    "copy_switch",
    "copy_append",
    "move_begin",
    "move_commit",
    "reap_keys",
}
_ORIGINS = {"c": "claimed", "t": "taken_over", "m": "moved"}


def _load_script(name: str) -> str:
    text = resources.files(__package__).joinpath(f"{name}.lua").read_text()
    if name in _LEASE_SCRIPTS:
        return _load_script("lease") + text
    return text


def bucket_of(member: str) -> int:
    """The lease bucket of ``'<workflow>:<key>'``; lease.lua's ``bucket_of`` computes the same."""
    return int(hashlib.sha1(member.encode()).hexdigest()[:8], 16) % LEASE_BUCKETS


def decode_lease(raw: str, names: dict[str, str]) -> tuple[str, int, str, float, str]:
    """``(owner, epoch, origin, since, affinity)`` of a packed lease (see lease.lua);
    ``names`` maps node ids to names."""
    owner_id, epoch, since, origin, _moving, _until, affinity = raw.split("|", 6)
    return (
        names.get(owner_id, ""),
        int(epoch or 0),
        _ORIGINS.get(origin, "claimed"),
        float(since or 0),
        affinity,
    )


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
        self._stamp_born: Script = self.redis.register_script(_load_script("stamp_born"))
        self._lookup: Script = self.redis.register_script(_load_script("lookup"))
        self._release: Script = self.redis.register_script(_load_script("release"))
        self._copy_switch: Script = self.redis.register_script(_load_script("copy_switch"))
        self._copy_append: Script = self.redis.register_script(_load_script("copy_append"))
        self._binary: redis.Redis | None = None
        self._deregister: Script = self.redis.register_script(_load_script("deregister"))
        self._move_begin: Script = self.redis.register_script(_load_script("move_begin"))
        self._move_commit: Script = self.redis.register_script(_load_script("move_commit"))
        self._reap_keys: Script = self.redis.register_script(_load_script("reap_keys"))

    # -- Redis key names -------------------------------------------------------

    @staticmethod
    def bucket(workflow: str, key: str) -> int:
        """The key's lease bucket number (0 .. LEASE_BUCKETS - 1)."""
        return bucket_of(f"{workflow}:{key}")

    def lease_key(self, workflow: str, key: str) -> str:
        """The Redis hash that holds the key's lease (with those of its bucket)."""
        return f"{self.prefix}leases:{self.bucket(workflow, key)}"

    def _lease_args(self, workflow: str, key: str) -> tuple[str, str, int]:
        """``(bucket hash, member, bucket number)`` of a key."""
        member = f"{workflow}:{key}"
        bucket = bucket_of(member)
        return f"{self.prefix}leases:{bucket}", member, bucket

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}workers"

    def worker_key(self, node: str) -> str:
        return f"{self.prefix}worker:{node}"

    @property
    def keycount_key(self) -> str:
        return f"{self.prefix}keycount"

    def node_id(self, node: str) -> str | None:
        """The node's short id in the lease records, or None when it never held a key."""
        found = self.guard(lambda: self.redis.hget(f"{self.prefix}node-id", node))
        return str(found) if found else None

    def _owned_buckets(self, node_id: str) -> list[str]:
        return [f"{self.prefix}owned:{node_id}:{b}" for b in range(OWNED_BUCKETS)]

    def _node_names(self) -> dict[str, str]:
        names: dict[str, str] = self.redis.hgetall(f"{self.prefix}node-name")
        return names

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def tagsets_key(self) -> str:
        return f"{self.prefix}tagsets"

    @property
    def born_key(self) -> str:
        return f"{self.prefix}born"

    def stamp_born(self) -> str:
        """Stamp when the store's data began, unless stamped (stamp_born.lua); the stamp."""
        return str(self._call(self._stamp_born, keys=[self.born_key], args=[]))

    def grace_left(self) -> float:
        """Seconds until this store claims keys (0 when it does): its data is new, as
        after it lost it (claim.lua's claim grace). An unstamped store is stamped now."""
        born = float(self.born() or self.stamp_born())
        return max(0.0, born + CLAIM_GRACE * (1 + CLOCK_DRIFT) - self.server_time())

    def born(self) -> str | None:
        """The store's ``born`` stamp (when its data began; see claim.lua's claim
        grace), or None while nobody has stamped it. Changed: the store lost its data."""
        found = self.guard(lambda: self.redis.get(self.born_key))
        return str(found) if found is not None else None

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
        bucket_key, member, bucket = self._lease_args(workflow, key)
        owner, epoch, status, previous, over_limit = self._call(
            self._claim,
            keys=[bucket_key, self.workers_key, self.epoch_key],
            args=[
                self.config.lease_ttl,
                candidate,
                self.prefix,
                member,
                "1" if force else "",
                policy,
                affinity,
                repr(random.random()),
                bucket,
                CLAIM_GRACE * (1 + CLOCK_DRIFT),
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
        bucket_key, member, bucket = self._lease_args(workflow, key)
        released = self._call(
            self._release,
            keys=[bucket_key, self.ended_key(workflow, key)],
            args=[
                self.prefix,
                member,
                owner,
                str(epoch) if epoch else "",
                bucket,
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
        seq: int | None = None,
        size: int = 0,
    ) -> tuple[bool, str]:
        """Make ``version`` the key's copy (``""``: retire it) if ``writer`` still holds the
        key live under ``epoch`` (copy_switch.lua), with the copy's record of applied
        producer numbers (``streams``, see :meth:`copy_streams`). The copy's log starts
        afresh: entries may follow ``seq``, the version's applied count (None: none may),
        up to a budget measured against its ``size`` in bytes. Returns ``(switched,
        previous version)``. ``fenced=False`` skips the check: only the nemesis
        checker's broken build does."""
        bucket_key, member, _bucket = self._lease_args(workflow, key)
        switched, previous = self._call(
            self._copy_switch,
            keys=[
                bucket_key,
                self.workers_key,
                self.copy_pointer_key(workflow, key),
                version_key,
                self.copy_streams_key(workflow, key),
                self.copy_log_key(workflow, key),
                self.copy_head_key(workflow, key),
            ],
            args=[
                self.config.lease_ttl,
                writer,
                epoch,
                version,
                "1" if fenced else "0",
                self.prefix,
                member,
                json.dumps(streams, separators=(",", ":")) if streams is not None else "",
                "" if seq is None else str(int(seq)),
                int(size),
            ],
        )
        return bool(int(switched)), str(previous)

    def copy_log_key(self, workflow: str, key: str) -> str:
        return f"{self.prefix}copylog:{workflow}:{key}"

    def copy_head_key(self, workflow: str, key: str) -> str:
        return f"{self.prefix}copyhead:{workflow}:{key}"

    def append_copy_log(
        self,
        workflow: str,
        key: str,
        writer: str,
        epoch: int,
        version: str,
        seq: int,
        entry: bytes,
        *,
        streams: dict[str, int],
        max_entries: int,
        max_ratio: float,
        floor_bytes: int,
        fenced: bool = True,
    ) -> int:
        """Append ``entry``, the key's commit number ``seq``, to its copy's log if
        ``writer`` still holds the key live under ``epoch``, the copy is still
        ``version`` with its log at ``seq - 1``, and the log stays within
        ``max_entries`` and ``max(floor_bytes, max_ratio * the version's bytes)``
        (copy_append.lua). Returns 1 (appended), 0 (refused: the writer lost the key)
        or -1 (not appended: write a new full version)."""
        bucket_key, member, _bucket = self._lease_args(workflow, key)
        status = self._call(
            self._copy_append,
            keys=[
                bucket_key,
                self.workers_key,
                self.copy_pointer_key(workflow, key),
                self.copy_log_key(workflow, key),
                self.copy_head_key(workflow, key),
                self.copy_streams_key(workflow, key),
            ],
            args=[
                self.config.lease_ttl,
                writer,
                epoch,
                version,
                "1" if fenced else "0",
                self.prefix,
                member,
                seq - 1,
                seq,
                entry,
                json.dumps(streams, separators=(",", ":")),
                max_entries,
                repr(float(max_ratio)),
                floor_bytes,
            ],
        )
        return int(status)

    def copy_snapshot(self, workflow: str, key: str) -> tuple[str | None, list[bytes]]:
        """The key's copy as one snapshot: the version its pointer names (None: no copy)
        and the entries of its log, as bytes (unauthenticated: the caller checks them)."""
        pointer_key = self.copy_pointer_key(workflow, key)
        log_key = self.copy_log_key(workflow, key)

        def read() -> tuple[str | None, list[bytes]]:
            pipe = self.binary.pipeline(transaction=True)
            pipe.get(pointer_key)
            pipe.lrange(log_key, 0, -1)
            pointer, entries = pipe.execute()
            if not pointer:
                return None, []
            return bytes(pointer).decode("utf-8", "replace"), [bytes(e) for e in entries]

        return self.guard(read)

    def copy_position(self, workflow: str, key: str) -> tuple[str | None, int | None, str | None]:
        """``(version, applied count, record of producer numbers as JSON)`` the key's copy
        reaches now, each None when missing (unauthenticated: compared, never trusted)."""

        def read() -> tuple[str | None, int | None, str | None]:
            pipe = self.redis.pipeline(transaction=True)
            pipe.get(self.copy_pointer_key(workflow, key))
            pipe.hget(self.copy_head_key(workflow, key), "seq")
            pipe.get(self.copy_streams_key(workflow, key))
            pointer, seq, streams = pipe.execute()
            number = int(seq) if isinstance(seq, str) and seq.isdigit() else None
            return (str(pointer) if pointer else None), number, (str(streams) if streams else None)

        return self.guard(read)

    @property
    def binary(self) -> redis.Redis:
        """A client that returns bytes (the lease store's decodes replies to ``str``), for
        the copy's log; made on first use."""
        if self._binary is None:
            self._binary = connect(self.url, socket_connect_timeout=2, socket_timeout=60)
        return self._binary

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
        status, now, registered, *rest = self._call(
            self._heartbeat,
            keys=[self.workers_key, self.worker_key(node), self.tagsets_key, self.born_key],
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
        forgotten = bool(rest) and str(rest[0]) == "1"
        return Heartbeat(str(status), float(now), str(registered), forgotten)

    def begin_move(
        self, workflow: str, key: str, target: str, owner: str = "", *, deadline: float = 60.0
    ) -> tuple[int, str, int]:
        """Route the key's new tasks to ``target`` until the move commits, or is off
        ``deadline`` seconds from now (see move_begin.lua).

        Returns ``(status, owner, epoch)``.
        """
        bucket_key, member, _bucket = self._lease_args(workflow, key)
        status, current, epoch = self._call(
            self._move_begin,
            keys=[bucket_key, self.workers_key],
            args=[self.config.lease_ttl, self.prefix, target, owner, deadline, member],
        )
        return int(status), str(current), int(epoch)

    def commit_move(self, workflow: str, key: str, owner: str, epoch: int, target: str) -> Lease:
        """Make ``target`` the owner under a new epoch; ``CLAIMED`` when moved, else ``OWNED``."""
        bucket_key, member, bucket = self._lease_args(workflow, key)
        moved, current, new_epoch = self._call(
            self._move_commit,
            keys=[bucket_key, self.workers_key, self.epoch_key],
            args=[self.config.lease_ttl, self.prefix, member, owner, epoch, target, bucket],
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

    def take_over_keys(
        self, node: str, policy: str = "least_loaded", batch: int = REAP_BATCH_KEYS
    ) -> Reaped:
        """Hand every key of a reaped, dead ``node`` to live workers (reap_keys.lua, one
        call per batch of about ``batch`` keys: O(its keys), never a scan of every key)."""
        moved = left = 0
        position = 0
        salt = uuid.uuid4().hex
        while position >= 0:
            position, done, stayed, status = self._call(
                self._reap_keys,
                keys=[self.workers_key, self.epoch_key],
                args=[self.config.lease_ttl, self.prefix, node, position, batch, policy, salt],
            )
            position = int(position)
            if status != "ok":
                return Reaped(moved, left, False)
            moved, left = moved + int(done), left + int(stayed)
        return Reaped(moved, left, True)

    def forget_worker(self, node: str) -> None:
        """Drop a long-dead, reaped worker from the registry, with its key entries
        (UNLINK of its owned buckets, a batch at a time). A lease it still holds (no
        live worker could take it) stays: its next task takes it over."""

        def forget() -> None:
            node_id = self.redis.hget(f"{self.prefix}node-id", node)
            pipe = self.redis.pipeline()
            pipe.zrem(self.workers_key, node)
            pipe.delete(self.worker_key(node))
            pipe.hdel(self.keycount_key, node)
            pipe.execute()
            if node_id:
                names = self._owned_buckets(str(node_id))
                for start in range(0, len(names), 512):
                    self.redis.unlink(*names[start : start + 512])

        self.guard(forget)

    def lookup(self, workflow: str, key: str) -> LeaseInfo | None:
        """The key's lease as it stands (see :class:`LeaseInfo`), or None when nobody holds it."""
        bucket_key, member, _bucket = self._lease_args(workflow, key)
        found = self._call(
            self._lookup,
            keys=[bucket_key, self.workers_key],
            args=[self.config.lease_ttl, self.prefix, member],
        )
        if not found:
            return None
        owner, epoch, alive, origin, affinity, moving_to, since = found
        return LeaseInfo(
            str(owner),
            int(epoch),
            bool(int(alive)),
            str(origin),
            str(affinity),
            str(moving_to),
            float(since) if since else None,
        )

    def workers(self) -> list[WorkerInfo]:
        """Every registered worker, alive or not, with its load."""

        def read() -> list[WorkerInfo]:
            now = self._server_time()
            beats = self.redis.zrange(self.workers_key, 0, -1, withscores=True)
            pipe = self.redis.pipeline(transaction=False)
            for node, _ in beats:
                pipe.hgetall(self.worker_key(node))
            pipe.hmget(self.keycount_key, [node for node, _ in beats] or ["-"])
            *infos, counts = pipe.execute()  # the counts: one HMGET, O(workers)
            result = []
            for (node, beat), info, keys in zip(beats, infos, counts, strict=False):
                result.append(
                    WorkerInfo(
                        name=node,
                        heartbeat=beat,
                        alive=beat >= now - self.config.lease_ttl,
                        capacity=int(info.get("capacity", 1)),
                        queue=info.get("queue", ""),
                        keys=int(keys or 0),
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
        """The ``(workflow, key)`` pairs registered to ``node`` (its owned buckets,
        read a pipelined batch at a time)."""
        members: list[str] = []
        position = 0
        while True:
            position, page = self.scan_owned(node, position, None, 512)
            members += page
            if position == 0:
                break
        pairs = (str(member).split(":", 1) for member in members)
        return {(workflow, key) for workflow, key in pairs}

    def owned_count(self, node: str) -> int:
        """How many keys are registered to ``node`` (a counter the scripts keep: O(1))."""
        return int(self.guard(lambda: self.redis.hget(self.keycount_key, node)) or 0)

    def is_registered(self, node: str) -> bool:
        """Whether ``node`` is in the worker registry (alive or not)."""
        return self.guard(lambda: self.redis.zscore(self.workers_key, node)) is not None

    def lease_since(self, workflow: str, key: str) -> float | None:
        """Server time the key's current owner took it, or None when nobody holds it."""
        info = self.lookup(workflow, key)
        return info.since if info is not None else None

    def _scan_buckets(self, names: Sequence[str], match: str | None) -> list[str]:
        """Every field of the hashes ``names`` matching the glob ``match`` (pipelined
        HSCANs; a bucket that is no listpack may take more than one)."""
        found: list[str] = []
        pending = [(name, 0) for name in names]
        while pending:
            pipe = self.redis.pipeline(transaction=False)
            for name, cursor in pending:
                pipe.hscan(name, cursor, match=match, count=1000)
            replies = pipe.execute()
            following = []
            for (name, _), (cursor, fields) in zip(pending, replies, strict=True):
                found += [str(field) for field in fields]
                if int(cursor):
                    following.append((name, int(cursor)))
            pending = following
        return found

    def scan_owned(
        self, node: str, position: int, match: str | None, count: int
    ) -> tuple[int, list[str]]:
        """One page of ``node``'s owned keys: ``count`` owned buckets from ``position``,
        ``(next position or 0 at the end, ['<workflow>:<key>'])``; ``match`` is a glob
        over members."""

        def page() -> tuple[int, list[str]]:
            node_id = self.redis.hget(f"{self.prefix}node-id", node)
            if not node_id:
                return 0, []
            end = min(position + max(count, 1), OWNED_BUCKETS)
            names = [f"{self.prefix}owned:{node_id}:{b}" for b in range(position, end)]
            return (0 if end >= OWNED_BUCKETS else end), self._scan_buckets(names, match)

        return self.guard(page)

    def scan_leases(self, position: int, match: str | None, count: int) -> tuple[int, list[str]]:
        """One page of every lease: ``count`` lease buckets from ``position``,
        ``(next position or 0 at the end, ['<workflow>:<key>'])``; ``match`` is a glob
        over members. A whole pass reads every bucket: for listings, never a hot path."""

        def page() -> tuple[int, list[str]]:
            end = min(position + max(count, 1), LEASE_BUCKETS)
            names = [f"{self.prefix}leases:{b}" for b in range(position, end)]
            return (0 if end >= LEASE_BUCKETS else end), self._scan_buckets(names, match)

        return self.guard(page)

    def lease_rows(self, pairs: Sequence[Sequence[str]]) -> list[list[str | None]]:
        """``[owner, epoch, origin]`` of each ``(workflow, key)`` (Nones when nobody holds
        it), one pipelined read."""

        def read() -> list[list[str | None]]:
            pipe = self.redis.pipeline(transaction=False)
            for workflow, key in pairs:
                bucket_key, member, _bucket = self._lease_args(workflow, key)
                pipe.hget(bucket_key, member)
            raws = pipe.execute()
            names = self._node_names() if any(raws) else {}
            rows: list[list[str | None]] = []
            for raw in raws:
                if raw is None:
                    rows.append([None, None, None])
                    continue
                owner, epoch, origin, _since, _affinity = decode_lease(raw, names)
                rows.append([owner, str(epoch), origin])
            return rows

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
