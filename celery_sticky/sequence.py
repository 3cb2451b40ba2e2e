"""Per-key sequence numbers: the order a key's owner applies its messages in.

Timing cannot keep order per key: a message forwarded from a stale route, one a
crashed worker's queue gives back, one a paused worker held in its socket all
arrive after messages published later. So every sticky publish is numbered where
it is made, without a Redis round trip: each producer process numbers its
messages of each key 1, 2, 3... in a *stream* of its own, and the owner's gate
(:mod:`celery_sticky.worker.gate`) runs each stream's messages of a key in that
order, holding a gap for at most ``sticky_gap_timeout`` seconds.

A stream id is the producing process's random id and a generation: a key whose
counter this process forgot (the counters are a bounded LRU) starts a new stream
at 1 rather than number again from 1 in an old one. Streams of different
producers are not ordered among themselves: two processes publishing to one key
at once have no order to keep.

The owner records, per key, the last number applied of each stream
(:class:`StreamRecord`): it is committed with the key's state, travels in its
hand-over copy, and keeps the :data:`MAX_STREAMS` most recently used streams, so
the record stays small however many short-lived producers a key sees. The record
orders; it does not deduplicate (the applied-task records do): a countdown task
runs when due, after later numbers of its stream.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

#: Keys whose counters a producer process keeps before it forgets the least recently used.
COUNTER_LIMIT = 100_000
#: Streams a key's record keeps (the most recently applied).
MAX_STREAMS = 32


class Sequencer:
    """Numbers one process's publishes per key: ``next(workflow, key) -> (stream, seq)``."""

    def __init__(self, limit: int = COUNTER_LIMIT) -> None:
        self.limit = limit
        self.process = f"{uuid.uuid4().hex[:12]}"
        self._generation = 0
        self._counters: OrderedDict[tuple[str, str], tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._issued = threading.local()  # this thread's last number: given back on failure

    def next(self, workflow: str, key: str) -> tuple[str, int]:
        with self._lock:
            counter = self._counters.pop((workflow, key), None)
            if counter is None:
                self._generation += 1
                counter = (f"{self.process}.{self._generation:x}", 0)
                if len(self._counters) >= self.limit:
                    self._counters.popitem(last=False)
            stream, seq = counter[0], counter[1] + 1
            self._counters[(workflow, key)] = (stream, seq)
        self._issued.last = (workflow, key, stream, seq)
        return stream, seq

    def begin(self) -> None:
        """A publish starts in this thread: :meth:`give_back` concerns its number only."""
        self._issued.last = None

    def give_back(self) -> bool:
        """The publish this thread began failed: its number was never sent.

        A number that is sent nowhere is a gap the key's owner waits
        ``sticky_gap_timeout`` for (seen in the nemesis: every publish that failed
        on a lease store restart held its key's later steps for 30 s, and a step
        late past that runs out of order). The number is taken back when it is
        still the key's last one, so the next publish uses it; when this process
        numbered the key again meanwhile (another thread), it stays a gap.
        """
        issued = getattr(self._issued, "last", None)
        self._issued.last = None
        if issued is None:
            return False
        workflow, key, stream, seq = issued
        with self._lock:
            if self._counters.get((workflow, key)) != (stream, seq):
                return False
            self._counters[(workflow, key)] = (stream, seq - 1)
            return True

    def __len__(self) -> int:
        return len(self._counters)


#: In a stored record, marks it incomplete (never a stream id, which is not empty).
_INCOMPLETE = ""


class StreamRecord:
    """A key's last applied number per stream, most recently used last.

    A *complete* record knows every stream that ever reached the key, so a stream
    it does not know starts at 1. It stops being complete when the key's state
    was lost (its history is elsewhere, or nowhere) or a stream was trimmed: then
    a stream it does not know starts at the lowest number that arrived.
    """

    __slots__ = ("complete", "last")

    def __init__(self, last: dict[str, int] | None = None, complete: bool = True) -> None:
        self.last: dict[str, int] = dict(last or {})
        self.complete = complete

    def expected(self, stream: str) -> int | None:
        """The number that may run next in ``stream``: None for a stream not on record
        when the record is incomplete."""
        done = self.last.get(stream)
        if done is None:
            return 1 if self.complete else None
        return done + 1

    def advance(self, stream: str, seq: int) -> bool:
        """Record ``seq`` as done in ``stream``; False when it was not news."""
        done = self.last.pop(stream, 0)
        self.last[stream] = max(done, seq)
        while len(self.last) > MAX_STREAMS:
            del self.last[next(iter(self.last))]
            self.complete = False
        return seq > done

    def as_dict(self) -> dict[str, int]:
        return {**self.last, _INCOMPLETE: 1} if not self.complete else dict(self.last)

    @classmethod
    def parse(cls, raw: object) -> StreamRecord:
        """A record from stored or copied data; anything malformed is dropped."""
        if not isinstance(raw, dict):
            return cls()
        last = {
            stream: seq
            for stream, seq in raw.items()
            if isinstance(stream, str) and stream and isinstance(seq, int) and seq > 0
        }
        return cls(last, complete=_INCOMPLETE not in raw)
