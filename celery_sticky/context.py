"""Per-app, per-process objects, built once and cached on the app in one place.

A producer, a worker's main process and each pool process need the app's
resolved settings, a lease store client, a hand-over store client, the
router's lease cache and its per-key sequence counters. Building them on every
use costs a Redis connection each time (the hand-over store once did, per
commit); sharing them across a fork shares a socket between processes. So :func:`context` keeps one
:class:`StickyContext` per app and process id: after a fork the child builds its
own on first use. Settings are read on first use (after configuration), once
per app: a fork does not change them.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

from .handoff import Copies, open_handoff_store
from .lease import LeaseStore
from .sequence import Sequencer
from .settings import StickyConfig

if TYPE_CHECKING:
    from celery import Celery

#: Most leases a process caches; past that the least recently used one goes.
ROUTE_CACHE_LIMIT = 100_000


class RouteCache:
    """Leases a producer looked up: ``(workflow, key) -> (queue, epoch)`` for a few seconds.

    A bounded LRU: at ``limit`` entries a new one pushes out the least recently used,
    one at a time, so hot keys stay cached however many distinct keys pass through
    (a publish costs the same with 10 keys or a million). A stale entry is harmless
    (the receiving worker checks ownership and forwards); entries are dropped when
    this process releases or moves the key.

    An ``OrderedDict`` rather than ``cachetools.TTLCache``: a hit here is one C-level
    ``get`` and ``move_to_end`` without a lock (each is atomic under the GIL), where
    cachetools' caches are not safe to read from several threads without one and would
    be a new dependency of every producer.
    """

    def __init__(self, ttl: float, limit: int = ROUTE_CACHE_LIMIT) -> None:
        self.ttl = ttl
        self.limit = max(int(limit), 1)
        self._entries: OrderedDict[tuple[str, str], tuple[float, str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, workflow: str, key: str, now: float) -> tuple[str, int] | None:
        pair = (workflow, key)
        entry = self._entries.get(pair)
        if entry is None or entry[0] <= now:
            return None
        try:  # noqa: SIM105 (a bare try costs nothing on the publish path; suppress() does)
            self._entries.move_to_end(pair)
        except KeyError:  # evicted or forgotten by another thread meanwhile
            pass
        return entry[1], entry[2]

    def put(self, workflow: str, key: str, queue: str, epoch: int, now: float) -> None:
        pair = (workflow, key)
        with self._lock:
            self._entries[pair] = (now + self.ttl, queue, epoch)
            self._entries.move_to_end(pair)
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)

    def forget(self, workflow: str, key: str) -> None:
        with self._lock:
            self._entries.pop((workflow, key), None)

    def __contains__(self, pair: object) -> bool:
        return pair in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class StickyContext:
    """What one process needs of one app: config, stores, route cache."""

    def __init__(self, config: StickyConfig) -> None:
        self.config = config
        self.pid = os.getpid()
        self.leases = LeaseStore(config)
        self.routes = RouteCache(config.lease_cache_ttl)
        #: Numbers this process's publishes per key (a new stream after a fork).
        self.sequencer = Sequencer()
        self._copies: Copies | None = None

    @property
    def copies(self) -> Copies:
        """The hand-over copies, built on first use (their setting is checked then)."""
        if self._copies is None:
            blobs = open_handoff_store(self.config, self.leases)
            self._copies = Copies(self.config, self.leases, blobs)
        return self._copies


_configs: weakref.WeakKeyDictionary[Celery, StickyConfig] = weakref.WeakKeyDictionary()
_contexts: weakref.WeakKeyDictionary[Celery, StickyContext] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def get_config(app: Celery) -> StickyConfig:
    """The app's resolved settings, read on first use (after configuration)."""
    config = _configs.get(app)
    if config is None:
        config = _configs[app] = StickyConfig.from_conf(app.conf)
    return config


def reset_config(app: Celery) -> None:
    """Forget the cached settings and clients, so the next use reads ``app.conf`` again."""
    _configs.pop(app, None)
    _contexts.pop(app, None)


def context(app: Celery) -> StickyContext:
    """This process's :class:`StickyContext` for ``app`` (a new one after a fork)."""
    found = _contexts.get(app)
    if found is not None and found.pid == os.getpid():
        return found
    with _lock:
        found = _contexts.get(app)
        if found is None or found.pid != os.getpid():
            found = _contexts[app] = StickyContext(get_config(app))
    return found


def lease_store(app: Celery) -> LeaseStore:
    """This process's lease store client for ``app``."""
    return context(app).leases
