"""The wire format: the ``sticky`` message header and the direct queues it travels in.

The header carries workflow, key, epoch, hop count, publish time, affinity and
the message's place in its producer's sequence of the key (stream id, number).
The router writes it at publish; the worker's gate, forwarding and fencing read
it without decoding the task's arguments. The publish time (nanoseconds) puts a
moved queue back in publish order, whatever order a broker restored it in. The
affinity (the tags the key's holder must carry) lets a worker that must not hold
the key pass the task on without decoding it. The stream and sequence number let
the owner's gate apply each producer's messages of a key in the order they were
published, whatever order they arrive in (forwarded, restored, moved).

A header is data from the broker, which anyone who can write there controls:
:meth:`StickyHeader.from_headers` checks every field (type, range, length) and
raises :class:`~celery_sticky.errors.InvalidHeaderError` naming the field, so the
worker dead-letters the message (``<sticky_queue_prefix>.dead``, see
:func:`dead_letter_queue_name`) instead of failing on it. Fields a newer version
appends after the known ones are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from kombu.entity import Exchange, Queue

from .errors import InvalidHeaderError
from .keys import MAX_KEY_LENGTH, WORKFLOW_RE
from .placement import encode_tags, parse_tags

HEADER = "sticky"
#: Header of a dead-lettered message: why it was dead-lettered.
DEAD_REASON = "sticky_dead_reason"
#: Header of a dead-lettered message: the queue it was taken from.
DEAD_FROM = "sticky_dead_from"
#: Largest epoch, hop count or publish stamp a header may carry (a signed 64-bit int).
_MAX_INT = 2**63 - 1
_MAX_HOPS = 1_000_000
_FIELDS = ("workflow", "key", "epoch", "hops", "sent", "affinity", "stream", "seq")
#: A producer stream's id: the producing process and a generation (``producer/sequence.py``).
_STREAM_RE = re.compile(r"[0-9A-Za-z._-]{1,64}")


def check_task_body(body: Any) -> tuple[Any, Any, Any]:
    """``(args, kwargs, embed)`` of a decoded task message body (Celery protocol 2), or
    :class:`InvalidHeaderError` when it has another shape (which would fail inside
    Celery's request, where the failure is neither acknowledged nor recorded)."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise InvalidHeaderError(
            f"the task's body must be [args, kwargs, embed], not {type(body).__name__} "
            f"({_shown(body)})"
        )
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        raise InvalidHeaderError(f"the task's args must be a list, not {_shown(args)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidHeaderError(f"the task's kwargs must be a mapping, not {_shown(kwargs)}")
    if embed is not None and not isinstance(embed, dict):
        raise InvalidHeaderError(f"the task's embed must be a mapping, not {_shown(embed)}")
    for name in ("callbacks", "errbacks", "chain"):
        value = (embed or {}).get(name)
        if value is not None and not isinstance(value, list | tuple):
            raise InvalidHeaderError(f"the task's {name} must be a list, not {_shown(value)}")
    chord = (embed or {}).get("chord")
    if chord is not None and not isinstance(chord, dict):
        raise InvalidHeaderError(f"the task's chord must be a mapping, not {_shown(chord)}")
    return args, kwargs, embed


#: Name of an in-flight list on a Redis broker: this prefix, then the queue's name
#: (see :mod:`celery_sticky.worker.delivery`).
INFLIGHT_PREFIX = "_sticky.inflight."
#: A set per worker naming the shared queues it takes with ``BLMOVE``, so that the
#: reaper finds their in-flight lists: this prefix, then the worker's name.
SHARED_INFLIGHT_PREFIX = "_sticky.taken."
#: A set per worker naming the queues it moves on (a reap, a drain), each through an
#: in-flight list of its own: this prefix, then the worker's name.
MOVING_PREFIX = "_sticky.moving."


def inflight_key(queue: str, node: str = "") -> str:
    """The in-flight list of ``queue`` (in the broker's Redis): what a worker took with
    ``BLMOVE`` and has not acknowledged yet.

    A direct queue has one consumer, named in the queue's own name: its list is
    ``_sticky.inflight.<queue>``. A shared queue (the task queue, affinity queues) has
    a list per worker taking from it: ``_sticky.inflight.<queue>|<node>``.
    """
    return INFLIGHT_PREFIX + (f"{queue}|{node}" if node else queue)


def shared_inflight_index(node: str) -> str:
    """The set of the shared queues ``node`` takes with ``BLMOVE`` (broker's Redis)."""
    return SHARED_INFLIGHT_PREFIX + node


def moving_index(node: str) -> str:
    """The set of the queues ``node`` is moving on, or failed to finish moving (broker's
    Redis): each has an in-flight list ``_sticky.inflight.<queue>|<node>``."""
    return MOVING_PREFIX + node


def dead_letter_queue_name(queue_prefix: str) -> str:
    """The queue where messages that cannot be handled wait for an operator."""
    return f"{queue_prefix}.dead"


def _shown(value: Any) -> str:
    """A value for an error message: ASCII only, short."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int_field(name: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidHeaderError(
            f"sticky header field {name} must be an int, not {type(value).__name__} "
            f"({_shown(value)})"
        )
    if not 0 <= value <= limit:
        raise InvalidHeaderError(f"sticky header field {name}={value} is not in 0..{limit}")
    return value


def _text_field(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidHeaderError(
            f"sticky header field {name} must be a str, not {type(value).__name__} "
            f"({_shown(value)})"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidHeaderError(
            f"sticky header field {name} is not valid UTF-8 text: {_shown(value)}"
        ) from None
    return value


def parse_header(value: Any) -> StickyHeader:
    """A validated header from the raw value of a message's ``sticky`` header.

    Raises :class:`InvalidHeaderError` naming the first field at fault.
    """
    if not isinstance(value, list | tuple):
        raise InvalidHeaderError(
            f"sticky header must be a list, not {type(value).__name__} ({_shown(value)})"
        )
    if len(value) < 4:
        raise InvalidHeaderError(
            f"sticky header has {len(value)} field(s), at least 4 are needed "
            f"({', '.join(_FIELDS[:4])}): {_shown(value)}"
        )
    workflow = _text_field("workflow", value[0])
    if not WORKFLOW_RE.match(workflow):
        raise InvalidHeaderError(
            f"sticky header field workflow={_shown(workflow)} is not a workflow name "
            "(1-128 letters, digits, _ . -)"
        )
    key = _text_field("key", value[1])
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidHeaderError(
            f"sticky header field key is {len(key)} characters long (1..{MAX_KEY_LENGTH}): "
            f"{_shown(key)}"
        )
    epoch = _int_field("epoch", value[2], _MAX_INT)
    hops = _int_field("hops", value[3], _MAX_HOPS)
    sent = _int_field("sent", value[4], _MAX_INT) if len(value) > 4 else 0
    affinity = _text_field("affinity", value[5]) if len(value) > 5 else ""
    if affinity:
        try:
            canonical = encode_tags(parse_tags(affinity, "affinity"))
        except ValueError as exc:
            raise InvalidHeaderError(f"sticky header field {exc}") from None
        if canonical != affinity:
            raise InvalidHeaderError(
                f"sticky header field affinity={_shown(affinity)} is not in canonical form "
                f"({_shown(canonical)})"
            )
    stream, seq = "", 0
    if len(value) > 7:
        stream = _text_field("stream", value[6])
        if not _STREAM_RE.fullmatch(stream):
            raise InvalidHeaderError(
                f"sticky header field stream={_shown(stream)} is not a stream id "
                "(1-64 letters, digits, _ . -)"
            )
        seq = _int_field("seq", value[7], _MAX_INT)
        if seq == 0:
            raise InvalidHeaderError("sticky header field seq=0: sequence numbers start at 1")
    # Fields after these (a newer version's) are ignored.
    return StickyHeader(workflow, key, epoch, hops, sent, affinity, stream, seq)


class StickyHeader(NamedTuple):
    workflow: str
    key: str
    epoch: int  # the lease epoch the message was routed under; 0 when none was known
    hops: int  # how often a worker forwarded it
    sent: int = 0  # time.time_ns() at publish
    affinity: str = ""  # required tags, 'name=value,...' sorted; '' for none
    stream: str = ""  # the producer stream that numbered it; '' for an unnumbered message
    seq: int = 0  # its number in that stream (1, 2, ...); 0 for an unnumbered message

    def encode(self) -> list[Any]:
        fields = [self.workflow, self.key, self.epoch, self.hops, self.sent]
        if self.seq:
            return [*fields, self.affinity, self.stream, self.seq]
        return [*fields, self.affinity] if self.affinity else fields

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> StickyHeader | None:
        """The message's header, or None when it has none (absent or ``None``).

        Raises :class:`~celery_sticky.errors.InvalidHeaderError` when it is malformed.
        """
        if headers is None:
            return None
        if not isinstance(headers, Mapping):
            raise InvalidHeaderError(
                f"message headers must be a mapping, not {type(headers).__name__}"
            )
        value = headers.get(HEADER)
        if value is None:
            return None
        return parse_header(value)

    @classmethod
    def safe_from_headers(cls, headers: Any) -> StickyHeader | None:
        """Like :meth:`from_headers`, but None for a malformed header too (for code
        that only looks, such as sorting or counting)."""
        try:
            return cls.from_headers(headers)
        except InvalidHeaderError:
            return None

    def with_headers(self, headers: Mapping[str, Any] | None) -> dict[str, Any]:
        """A new headers dict with this header set (the input is not changed)."""
        return {**(headers or {}), HEADER: self.encode()}


def direct_queue(name: str) -> Queue:
    """A worker's direct queue (or an affinity queue): durable, never auto-deleted,
    no ``expires`` (``Queue(expires=...)`` on Redis drops the list with its messages).
    """
    exchange = Exchange(name, type="direct")  # type: ignore[no-untyped-call]
    queue: Queue = Queue(  # type: ignore[no-untyped-call]
        name, exchange, routing_key=name, durable=True, auto_delete=False
    )
    return queue
