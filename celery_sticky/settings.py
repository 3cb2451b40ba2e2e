"""Every ``sticky_*`` setting, in one list that also generates the docs.

Settings are read with ``app.conf.get("sticky_<name>", default)`` rather than
through ``app.add_defaults``: defaults added that way override values loaded by
``config_from_object`` (a known Celery trap). This module only turns a mapping
of settings into a validated :class:`StickyConfig`; caching it per app is
:mod:`celery_sticky.context`'s job.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigurationError
from .placement import BUILTIN_POLICIES, MAX_TAGS, parse_tags, resolve_policy

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+socket://")
SENTINEL_SCHEME = "sentinel://"


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "celery-sticky")


@dataclass(frozen=True)
class Setting:
    """One setting: its name without the ``sticky_`` prefix, default and meaning."""

    name: str
    default: Any
    doc: str
    convert: Callable[[Any], Any] = lambda value: value

    @property
    def key(self) -> str:
        return f"sticky_{self.name}"


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a finite number greater than 0, not a bool")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a finite number greater than 0") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a finite number greater than 0")
    return number


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"must be {what}, not a bool")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be {what}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be {what}") from None
    if isinstance(value, float) and value != number:
        raise ValueError(f"must be {what}")
    return number


def _positive_int(value: Any) -> int:
    number = _whole(value, "a whole number greater than 0")
    if number <= 0:
        raise ValueError("must be a whole number greater than 0")
    return number


def _non_negative_int(value: Any) -> int:
    number = _whole(value, "a whole number, 0 or more")
    if number < 0:
        raise ValueError("must be a whole number, 0 or more")
    return number


def _port(value: Any) -> int:
    number = _whole(value, "a port number, 1-65535")
    if not 1 <= number <= 65535:
        raise ValueError("must be a port number, 1-65535")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _redis_url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith((*REDIS_SCHEMES, SENTINEL_SCHEME)):
        schemes = ", ".join((*REDIS_SCHEMES, SENTINEL_SCHEME))
        raise ValueError(f"must be a Redis URL starting with one of {schemes}")
    return value


def _absolute_dir(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be an absolute directory path")
    path = os.path.expanduser(value)
    if not os.path.isabs(path):
        raise ValueError(
            "must be an absolute directory path (a relative one would depend on the "
            "directory each worker happens to start in)"
        )
    return os.path.normpath(path)


def _importable(value: Any, what: str) -> Any:
    """The object a dotted path names (``module.name`` or ``module:name``)."""
    from kombu.utils.imports import symbol_by_name

    if not isinstance(value, str) or ("." not in value and ":" not in value):
        raise ValueError(f"must be a dotted path to {what}")
    try:
        found = symbol_by_name(value)  # type: ignore[no-untyped-call]
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot be imported ({exc.__class__.__name__}: {exc})") from None
    if not callable(found):
        raise ValueError(f"names {found!r}, which is not {what}")
    return found


def _handoff_store(value: Any) -> str:
    if value == "redis":
        return "redis"
    if isinstance(value, str) and value.startswith("dir:"):
        path = os.path.expanduser(value[4:])
        if not path or not os.path.isabs(path):
            raise ValueError("dir: must be followed by an absolute directory path (dir:/path)")
        return "dir:" + os.path.normpath(path)
    _importable(value, "a class taking (config, lease_store)")
    return str(value)


def _hook(value: Any) -> str:
    _importable(value, "a function (workflow, key)")
    return str(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError("must be True or False")


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)

    return convert


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _policy(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"must be one of {', '.join(BUILTIN_POLICIES)} or a dotted path to a function"
        )
    resolve_policy(value)  # fails now, naming the setting, rather than at the first publish
    return value


def _secrets(value: Any) -> tuple[str, ...]:
    found = (value,) if isinstance(value, str) else tuple(value)
    if not found or not all(isinstance(v, str) and len(v) >= 16 for v in found):
        raise ValueError("must be a string of 16 characters or more, or a list of such strings")
    return found


def _name(value: Any) -> str:
    text = str(value)
    if not text or any(ch.isspace() or ch in ":*?[]" for ch in text):
        raise ValueError("must be a non-empty name without spaces or any of : * ? [ ]")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "redis_url",
        None,
        "URL of the Redis that holds leases, epochs and the worker registry. "
        "Defaults to `broker_url` when the broker is Redis; with any other broker it must be set. "
        "`rediss://user:password@host:port/db` for TLS and an ACL user (TLS options as query "
        "arguments, such as `?ssl_ca_certs=/path/ca.pem`); "
        "`sentinel://host:26379;sentinel://host2:26379/db?master_name=mymaster` through Redis "
        "Sentinel (without `master_name` in the URL, `broker_transport_options['master_name']` "
        "is used).",
        _optional(_redis_url),
    ),
    Setting(
        "state_dir",
        None,
        "Directory for local state; each worker uses `<state_dir>/<nodename>/`. Must be on a local "
        "disk (diskcache uses SQLite: never NFS). Default: `$XDG_STATE_HOME/celery-sticky` "
        "(`~/.local/state/celery-sticky`). Must be an absolute path. Directories are created "
        "0700 and files 0600; a worker refuses a directory owned by another user or writable "
        "by others.",
        _optional(_absolute_dir),
    ),
    Setting(
        "lease_ttl",
        10.0,
        "Seconds without a heartbeat after which a worker is dead and its keys may move.",
        _positive_float,
    ),
    Setting(
        "heartbeat_interval",
        None,
        "Seconds between a worker's heartbeats. Default: a quarter of `sticky_lease_ttl`. "
        "Must be shorter than half the TTL.",
        _optional(_positive_float),
    ),
    Setting(
        "queue_prefix",
        "sticky",
        "Prefix of each worker's direct queue, named `<prefix>.<nodename>`.",
        _name,
    ),
    Setting(
        "key_prefix",
        "sticky",
        "Namespace of every Redis key the lease store writes (`<prefix>:lease:...`).",
        _name,
    ),
    Setting(
        "placement",
        "least_loaded",
        "How a new key picks its worker among the live workers that may hold it: "
        "`least_loaded` (fewest owned keys per unit of capacity), `hash` (rendezvous hashing "
        "weighted by capacity: the same key goes to the same worker while the set of workers "
        "stays the same), `random` (weighted by capacity), `first_come` (no claim at publish: "
        "the first worker that takes the task claims the key), or a dotted path to a function "
        "`(workflow, key, candidates) -> worker name or None` (see docs/placement.md). The "
        "built-in ones are decided atomically in Redis.",
        _policy,
    ),
    Setting(
        "lease_cache_ttl",
        1.0,
        "Seconds a producer reuses a lease it looked up before asking Redis again. A stale "
        "entry is harmless: the receiving worker checks ownership and forwards. At most "
        "`sticky_lease_ttl`.",
        _positive_float,
    ),
    Setting(
        "max_hops",
        3,
        "How many times a message may be forwarded between workers under one lease before "
        "it fails with `ForwardingError` (a hop to an owner under a newer epoch starts the "
        "count again).",
        _positive_int,
    ),
    Setting(
        "worker_capacity",
        None,
        "Capacity a worker advertises to placement. Default: its pool concurrency. "
        "`celery worker --sticky-capacity N` sets it for one worker.",
        _optional(_positive_int),
    ),
    Setting(
        "worker_tags",
        None,
        'Tags a worker advertises, as a mapping or `"region=eu,tier=gold"`; only workers '
        "carrying every tag of a task's `affinity=` may hold its key. At most "
        f"{MAX_TAGS} tags (a worker consumes one affinity queue per subset of them). "
        "`celery worker --sticky-tag region=eu` (repeatable) sets them for one worker.",
        _optional(lambda value: parse_tags(value, "sticky_worker_tags")),
    ),
    Setting(
        "max_keys_per_worker",
        None,
        "Most keys a worker takes while another worker that may hold the key has room. When "
        "every such worker is full the policy picks among all of them anyway (the limit is "
        "soft: tasks are never refused for it) and a warning is logged. Default: no limit.",
        _optional(_positive_int),
    ),
    Setting(
        "gap_timeout",
        30.0,
        "Seconds a key's owner holds a producer's later messages of the key while an "
        "earlier one (by its sequence number) has not arrived, counted from when the key "
        "could otherwise run (not while they wait behind a running task of the key). "
        "Then it goes on without "
        "it, with an ERROR log, the `sticky_sequence_gaps_total` metric and a "
        "`sticky-gap` event naming the key and the missing number. While messages still "
        "wait where the missing one may be when the time is up (the owner's queue, the "
        "other workers' direct queues and, on Redis, their in-flight lists), the key "
        "waits on, up to ten times this in all. Longer than a message can take to reach "
        "the owner: a forward, or a reap (`sticky_lease_ttl` and the reaper's pass).",
        _positive_float,
    ),
    Setting(
        "dedup_window",
        1000,
        "Applied-task records kept per key: a task id among a key's last N applied tasks is "
        "not run again (its stored result is returned). A copy arriving after N newer tasks "
        "of the key runs again.",
        _positive_int,
    ),
    Setting(
        "finished_dedup_ttl",
        3600.0,
        "Seconds the record of a workflow's last task outlives the workflow, so a redelivered "
        "copy of the task that ended it is still recognized (matches Redis's default "
        "`visibility_timeout`).",
        _positive_float,
    ),
    Setting(
        "memory_cache_bytes",
        256 * 2**20,
        "Bytes of decoded state values each pool process keeps in memory, so a large value "
        "that has not changed is not unpickled again. 0 turns the memory tier off.",
        _non_negative_int,
    ),
    Setting(
        "memory_cache_min_bytes",
        64 * 2**10,
        "Values smaller than this (pickled) are read from disk every time: cheap enough.",
        _non_negative_int,
    ),
    Setting(
        "state_size_limit",
        None,
        "Most bytes a worker's state directory may hold. A commit that would pass it fails "
        "the task with `StateSizeLimitError`; nothing is evicted. Default: no limit.",
        _optional(_positive_int),
    ),
    Setting(
        "idle_timeout",
        None,
        "Seconds without a task after which a key is passivated: its lease released and its "
        "local state deleted, as if its workflow had ended. Default: off (keys live until "
        "their workflow ends).",
        _optional(_positive_float),
    ),
    Setting(
        "state_replication",
        "on_handoff",
        "Where copies of a key's state exist besides its owner's disk: `off` (nowhere: a "
        "key whose owner drains or dies starts empty elsewhere), `on_handoff` (a drained "
        "worker hands each key's state over), `sync` (every commit also brings the copy up "
        "to date before the task is acknowledged, so a new owner rebuilds the state after a "
        "crash: it appends what it changed to the copy's log, one Redis call, and the copy "
        "is rewritten whole only when the log outgrows its budget, see "
        "`sticky_replication_log_ratio`).",
        _choice("off", "on_handoff", "sync"),
    ),
    Setting(
        "replication_log_ratio",
        0.5,
        "With `sync` replication, how large a copy's log of commits may grow, as a fraction "
        "of the copy's last full version (and at least 64 KiB): past it, the next commit "
        "rewrites the whole copy and the log starts over. Larger: fewer full rewrites, more "
        "Redis memory (the copy takes up to 1 + this times the state) and longer imports.",
        _positive_float,
    ),
    Setting(
        "replication_log_entries",
        10_000,
        "With `sync` replication, most commits a copy's log holds before the next commit "
        "rewrites the whole copy: bounds the work of an import (each entry is checked and "
        "applied in turn).",
        _positive_int,
    ),
    Setting(
        "handoff_store",
        "redis",
        "Where hand-over copies wait: `redis` (the lease store, in chunks), "
        "`dir:/path` (a directory every worker mounts), or a dotted path to a class taking "
        "`(config, lease_store)` with `write(name, blob)`, `read(name)` and `delete(name)`. "
        "Whichever it is, a copy becomes the key's copy only through a switch in the lease "
        "store that checks the writer still holds the key (see docs/failure-modes.md). "
        "Checked at start: the path must be absolute, the class importable.",
        _handoff_store,
    ),
    Setting(
        "secret",
        None,
        "Secret that signs hand-over copies (HMAC-SHA256): a copy is unpickled only when its "
        "signature checks, so whoever can write to the lease store's Redis or the hand-over "
        "directory cannot run code in the workers. A string, or a list of strings, newest "
        "first: the first signs, every one verifies (to rotate, put the new one first and "
        "drop the old one once every worker has it). Default: the `STICKY_SECRET` "
        "environment variable (and `STICKY_SECRET_PREVIOUS`, which only verifies). Without "
        "a secret no copy is written or read: a key's state starts empty on its next owner, "
        "and workers say so at start.",
        _optional(_secrets),
    ),
    Setting(
        "on_state_lost",
        None,
        "Dotted path to a function `(workflow, key)` called when a key is taken over with "
        "no usable copy of its state. It may return a mapping to start the state from "
        "(rebuilt from your source of truth); the task also sees `state.recovered is False`. "
        "Checked at start: it must import and be callable.",
        _optional(_hook),
    ),
    Setting(
        "metrics_port",
        None,
        "Port of the worker's Prometheus exporter (needs the `prometheus` extra); "
        "`celery worker --sticky-metrics-port` overrides it. Default: no exporter. With "
        "several workers on one host, give each its own port. Pool processes' counts are "
        "added up through prometheus_client's multiprocess mode (see Monitoring).",
        _optional(_port),
    ),
    Setting(
        "metrics_address",
        "0.0.0.0",
        "Address the Prometheus exporter listens on.",
        _text,
    ),
    Setting(
        "proof_retry_max",
        5.0,
        "Longest pause, in seconds, between a worker's attempts to prove ownership while the "
        "lease store does not answer (the backoff starts at 0.1 s and doubles).",
        _positive_float,
    ),
    Setting(
        "drain_timeout",
        30.0,
        "Seconds a drain (warm shutdown) keeps trying through lease store or broker "
        "outages before it gives up; whatever it has not moved by then waits for the "
        "reaper, which moves a dead worker's queue once its lease expired.",
        _positive_float,
    ),
    Setting(
        "reliable_delivery",
        True,
        "On a Redis broker, take each task of a worker's queues (its direct queue and the "
        "shared ones it consumes; not broadcast queues) with `BLMOVE` into an in-flight list "
        "of that worker, removed by the acknowledgement, instead of kombu's `BRPOP` (which "
        "removes a message before the worker has it: a worker killed in that instant loses "
        "it). A restarted worker, the reaper of a dead one and the drain put the in-flight "
        "lists back at the heads of their queues first. Those queues then ignore message "
        "priorities. Off: kombu's `BRPOP` for every queue. Ignored on other brokers "
        "(RabbitMQ requeues what a dead connection had not acknowledged). See "
        "docs/failure-modes.md.",
        _bool,
    ),
)

SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


class AppSettings(Protocol):
    """What :meth:`StickyConfig.from_conf` reads: ``app.conf`` of a Celery app."""

    broker_url: Any

    def get(self, key: str, default: Any = None) -> Any: ...


@dataclass(frozen=True)
class StickyConfig:
    """The resolved ``sticky_*`` settings of one app, validated once."""

    redis_url: str
    state_dir: str
    lease_ttl: float
    heartbeat_interval: float
    queue_prefix: str
    key_prefix: str
    placement: str
    lease_cache_ttl: float
    max_hops: int
    worker_capacity: int | None
    worker_tags: dict[str, str] | None
    max_keys_per_worker: int | None
    dedup_window: int
    finished_dedup_ttl: float
    memory_cache_bytes: int
    memory_cache_min_bytes: int
    state_size_limit: int | None
    idle_timeout: float | None
    state_replication: str
    replication_log_ratio: float
    replication_log_entries: int
    handoff_store: str
    on_state_lost: str | None
    metrics_port: int | None
    metrics_address: str
    proof_retry_max: float
    drain_timeout: float
    reliable_delivery: bool
    gap_timeout: float
    #: Newest first; empty when none is configured. Not shown in the repr.
    secret: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_app(cls, app: Any) -> StickyConfig:
        """Validate the ``sticky_*`` settings of a Celery app (uncached: see
        :func:`celery_sticky.context.get_config`)."""
        return cls.from_conf(app.conf)

    @classmethod
    def from_conf(cls, conf: AppSettings) -> StickyConfig:
        """Validate the ``sticky_*`` settings of ``conf`` (a Celery app's ``app.conf``)."""
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = conf.get(setting.key, setting.default)
            try:
                values[setting.name] = setting.convert(raw)
            except (TypeError, ValueError) as exc:
                shown = "<hidden>" if setting.name == "secret" else _redacted(repr(raw))
                raise ConfigurationError(f"{setting.key}={shown}: {exc}") from None
        values["redis_url"] = resolve_redis_url(
            values["redis_url"] or _redis_url_from_broker(conf), conf
        )
        values["state_dir"] = values["state_dir"] or _default_state_dir()
        values["secret"] = values["secret"] or _secrets_from_environment()
        ttl = values["lease_ttl"]
        interval = values["heartbeat_interval"] or ttl / 4
        if interval * 2 > ttl:
            raise ConfigurationError(
                f"sticky_heartbeat_interval={interval!r} must be less than half of "
                f"sticky_lease_ttl={ttl!r}, or one lost heartbeat would kill the worker"
            )
        values["heartbeat_interval"] = interval
        if values["lease_cache_ttl"] > ttl:
            raise ConfigurationError(
                f"sticky_lease_cache_ttl={values['lease_cache_ttl']!r} must be at most "
                f"sticky_lease_ttl={ttl!r}: a producer would route to a lease longer than it "
                "can live"
            )
        tags = values["worker_tags"] or {}
        if len(tags) > MAX_TAGS:
            raise ConfigurationError(
                f"sticky_worker_tags={tags!r}: at most {MAX_TAGS} tags "
                "(a worker consumes one affinity queue per subset of its tags)"
            )
        return cls(**values)

    def direct_queue_name(self, nodename: str) -> str:
        return f"{self.queue_prefix}.{nodename}"

    @property
    def copy_holds_every_commit(self) -> bool:
        """Every commit of a key reaches its copy (``sync`` replication with a
        ``sticky_secret``): a key taken over without a copy never committed anything,
        so nothing of it was lost."""
        return self.state_replication == "sync" and bool(self.secret)


def _redacted(text: str) -> str:
    """``text`` with URL passwords replaced by ``***``."""
    return re.sub(r"(://[^:/@;\s]*):[^@;\s]*@", r"\1:***@", text)


def _secrets_from_environment() -> tuple[str, ...]:
    found: list[str] = []
    for name in ("STICKY_SECRET", "STICKY_SECRET_PREVIOUS"):
        value = os.environ.get(name)
        if value:
            try:
                found.extend(_secrets(value))
            except ValueError as exc:
                raise ConfigurationError(f"${name}: {exc}") from None
    return tuple(found)


def resolve_redis_url(url: str, conf: AppSettings) -> str:
    """``url``, with a Sentinel master name from ``broker_transport_options`` added when
    a ``sentinel://`` URL carries none (how Celery users configure Sentinel)."""
    if not url.startswith(SENTINEL_SCHEME) or "master_name=" in url:
        return url
    options = conf.get("broker_transport_options") or {}
    master = options.get("master_name") if isinstance(options, dict) else None
    if not master:
        raise ConfigurationError(
            "sticky_redis_url is a sentinel:// URL without a master name: add "
            "?master_name=<name> to it, or set broker_transport_options['master_name']"
        )
    return f"{url}{'&' if '?' in url else '?'}master_name={master}"


def _redis_url_from_broker(conf: AppSettings) -> str:
    broker = conf.broker_url
    urls = broker if isinstance(broker, list | tuple) else str(broker or "").split(";")
    first = str(urls[0]).strip() if urls else ""
    if first.startswith(REDIS_SCHEMES):
        return first
    if first.startswith(SENTINEL_SCHEME):
        return ";".join(str(u).strip() for u in urls)
    shown = first or "(not set)"
    raise ConfigurationError(
        f"sticky_redis_url is not set and broker_url {shown!r} is not a Redis URL: "
        "set sticky_redis_url to the Redis that holds the leases"
    )
