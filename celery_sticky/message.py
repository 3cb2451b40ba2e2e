"""The ``sticky`` message header: workflow, key, epoch and hop count.

The router writes it at publish; the worker's gate, forwarding and fencing read
it without decoding the task's arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

HEADER = "sticky"


class StickyHeader(NamedTuple):
    workflow: str
    key: str
    epoch: int  # the lease epoch the message was routed under; 0 when none was known
    hops: int  # how often a worker forwarded it

    def encode(self) -> list[Any]:
        return [self.workflow, self.key, self.epoch, self.hops]

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> StickyHeader | None:
        value = (headers or {}).get(HEADER)
        if not value:
            return None
        workflow, key, epoch, hops = value
        return cls(str(workflow), str(key), int(epoch), int(hops))

    def with_headers(self, headers: Mapping[str, Any] | None) -> dict[str, Any]:
        """A new headers dict with this header set (the input is not changed)."""
        return {**(headers or {}), HEADER: self.encode()}
