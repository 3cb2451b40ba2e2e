"""The wire format: the ``sticky`` message header and the direct queues it travels in.

The header carries workflow, key, epoch, hop count, publish time and affinity.
The router writes it at publish; the worker's gate, forwarding and fencing read
it without decoding the task's arguments. The publish time (nanoseconds) puts a
moved queue back in publish order, whatever order a broker restored it in. The
affinity (the tags the key's holder must carry) lets a worker that must not hold
the key pass the task on without decoding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from kombu.entity import Exchange, Queue

HEADER = "sticky"


class StickyHeader(NamedTuple):
    workflow: str
    key: str
    epoch: int  # the lease epoch the message was routed under; 0 when none was known
    hops: int  # how often a worker forwarded it
    sent: int = 0  # time.time_ns() at publish
    affinity: str = ""  # required tags, 'name=value,...' sorted; '' for none

    def encode(self) -> list[Any]:
        fields = [self.workflow, self.key, self.epoch, self.hops, self.sent]
        return [*fields, self.affinity] if self.affinity else fields

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> StickyHeader | None:
        value = (headers or {}).get(HEADER)
        if not value:
            return None
        workflow, key, epoch, hops, *rest = value
        sent = int(rest[0]) if rest else 0
        affinity = str(rest[1]) if len(rest) > 1 else ""
        return cls(str(workflow), str(key), int(epoch), int(hops), sent, affinity)

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
