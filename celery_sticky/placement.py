"""Placement: which worker a new key goes to, and which workers it may go to.

Two questions, kept apart:

* **Delineation** (may a worker hold the key?): workers advertise *tags*
  (``region=eu``); a task may require an *affinity*, a mapping of tags. Only a
  live, non-draining worker carrying every required tag may claim the key. The
  lease store enforces it, in the claim script, for every claim.
* **Placement** (which of those?): the policy named by ``sticky_placement``.
  The built-in ones run inside the claim script, atomically with the claim:
  ``least_loaded`` (fewest keys per unit of capacity), ``hash`` (rendezvous
  hashing weighted by capacity) and ``random`` (weighted by capacity);
  ``first_come`` claims nothing at publish. A dotted path names a Python
  callable ``(workflow, key, candidates) -> worker name | None``.

A task whose affinity no live worker matches waits in a per-affinity queue
(``<queue_prefix>.affinity.<tags>``), which every worker carrying those tags
consumes, rather than running somewhere it must not.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kombu.utils.imports import symbol_by_name

from .errors import ConfigurationError, InvalidKeyError

#: Policies the claim script runs itself; ``first_come`` claims at the worker.
BUILTIN_POLICIES = ("least_loaded", "hash", "random", "first_come")
#: A worker consumes one affinity queue per subset of its tags: 2**N - 1 queues.
MAX_TAGS = 5
_TAG_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,64}$")

Tags = Mapping[str, str]
AffinityFunc = Callable[..., Mapping[str, Any] | None]


@dataclass(frozen=True)
class Candidate:
    """A worker a key may be placed on, as a placement callable sees it."""

    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    capacity: int = 1
    #: Keys the worker owns now.
    keys: int = 0
    #: ``sticky_max_keys_per_worker`` as the worker advertises it (None: no limit).
    max_keys: int | None = None

    @property
    def load(self) -> float:
        """Owned keys per unit of capacity (what ``least_loaded`` minimizes)."""
        return self.keys / max(self.capacity, 1)

    @property
    def full(self) -> bool:
        return self.max_keys is not None and self.keys >= self.max_keys


PlacementFunc = Callable[[str, str, Sequence[Candidate]], str | None]


def check_tags(tags: Mapping[str, Any], what: str) -> dict[str, str]:
    """Validated tags as ``{name: value}`` strings; ``what`` names the source in errors."""
    if not isinstance(tags, Mapping):
        raise ValueError(f"{what} must be a mapping of tag names to values, not {tags!r}")
    checked: dict[str, str] = {}
    for name, value in tags.items():
        text = str(value)
        if not isinstance(name, str) or not _TAG_RE.match(name) or not _TAG_RE.match(text):
            raise ValueError(
                f"{what}: tag {name!r}={value!r}: names and values must be 1-64 letters, "
                "digits or _ . - /"
            )
        checked[name] = text
    return checked


def parse_tags(value: Any, what: str) -> dict[str, str]:
    """Tags from a mapping, or from ``"region=eu,tier=gold"`` / ``["region=eu"]`` text."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return check_tags(value, what)
    items = value.split(",") if isinstance(value, str) else list(value)
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, tag_value = str(item).strip().partition("=")
        if not sep:
            raise ValueError(f"{what}: {item!r} is not of the form name=value")
        pairs[name.strip()] = tag_value.strip()
    return check_tags(pairs, what)


def encode_tags(tags: Tags) -> str:
    """The canonical text of a tag set: ``name=value`` pairs sorted, comma-separated.

    It names affinity queues and is what the claim script parses.
    """
    return ",".join(f"{name}={tags[name]}" for name in sorted(tags))


def decode_tags(text: str) -> dict[str, str]:
    if not text:
        return {}
    return dict(pair.split("=", 1) for pair in text.split(","))


def matches(affinity: Tags, tags: Tags) -> bool:
    """Whether a worker with ``tags`` may hold a key requiring ``affinity``."""
    return all(tags.get(name) == value for name, value in affinity.items())


def affinity_queue_name(queue_prefix: str, affinity: str) -> str:
    """The queue where tasks of an affinity wait while no live worker matches it."""
    return f"{queue_prefix}.affinity.{affinity}"


def affinity_queues(queue_prefix: str, tags: Tags) -> list[str]:
    """Every affinity queue a worker with ``tags`` serves: one per non-empty subset."""
    names = sorted(tags)
    return [
        affinity_queue_name(queue_prefix, encode_tags({n: tags[n] for n in subset}))
        for size in range(1, len(names) + 1)
        for subset in itertools.combinations(names, size)
    ]


@dataclass(frozen=True)
class AffinitySpec:
    """A sticky task's ``affinity=``: fixed tags, or a function of its arguments."""

    tags: Tags | None = None
    func: AffinityFunc | None = None

    @classmethod
    def of(cls, affinity: Any, task_name: str) -> AffinitySpec | None:
        if affinity is None:
            return None
        if callable(affinity):
            return cls(func=affinity)
        try:
            return cls(tags=check_tags(affinity, f"{task_name}: affinity"))
        except ValueError as exc:
            raise TypeError(str(exc)) from None

    def resolve(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, *, task_name: str
    ) -> str:
        """The canonical affinity of one call ('' when it requires nothing)."""
        if self.tags is not None:
            return encode_tags(self.tags)
        assert self.func is not None
        try:
            tags = self.func(*(args or ()), **(kwargs or {}))
        except Exception as exc:
            raise InvalidKeyError(f"{task_name}: the affinity function raised {exc!r}") from exc
        try:
            return encode_tags(check_tags(tags or {}, f"{task_name}: affinity"))
        except ValueError as exc:
            raise InvalidKeyError(str(exc)) from None


def resolve_policy(value: str) -> str | PlacementFunc:
    """A built-in policy's name, or the callable a dotted path names."""
    if value in BUILTIN_POLICIES:
        return value
    if "." not in value and ":" not in value:
        raise ConfigurationError(
            f"sticky_placement={value!r} is not one of {', '.join(BUILTIN_POLICIES)} "
            "nor a dotted path to a function (workflow, key, candidates) -> worker"
        )
    try:
        func = symbol_by_name(value)  # type: ignore[no-untyped-call]
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"sticky_placement={value!r} cannot be imported: {exc}") from None
    if not callable(func):
        raise ConfigurationError(f"sticky_placement={value!r} is not callable")
    chosen: PlacementFunc = func
    return chosen


def fallback_policy(placement: str) -> str:
    """The policy the claim script uses when it must pick a worker itself (a worker
    that may not take a key, the reaper): the configured one when the script runs
    it, ``least_loaded`` for ``first_come`` and placement functions."""
    return placement if placement in ("hash", "random") else "least_loaded"


def eligible(candidates: Iterable[Candidate], affinity: Tags) -> list[Candidate]:
    """The candidates a key with ``affinity`` may go to; full ones only if all are full."""
    matching = [c for c in candidates if matches(affinity, c.tags)]
    room = [c for c in matching if not c.full]
    return room or matching
