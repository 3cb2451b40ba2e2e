"""Per-key sequence numbers: the producer's counters, the owner's record, the header."""

from __future__ import annotations

import pytest

from celery_sticky.errors import InvalidHeaderError
from celery_sticky.sequence import MAX_STREAMS, Sequencer, StreamRecord
from celery_sticky.wire import StickyHeader, parse_header


def test_each_key_is_numbered_from_one_in_a_stream_of_its_own() -> None:
    numbers = Sequencer()
    a1, a2, b1 = numbers.next("w", "a"), numbers.next("w", "a"), numbers.next("w", "b")
    assert [a1[1], a2[1], b1[1]] == [1, 2, 1]
    assert a1[0] == a2[0] != b1[0]
    assert Sequencer().next("w", "a")[0] != a1[0], "another process, another stream"


def test_a_forgotten_counter_starts_a_new_stream_rather_than_numbering_again() -> None:
    numbers = Sequencer(limit=2)
    first = numbers.next("w", "a")
    numbers.next("w", "b")
    numbers.next("w", "c")  # "a" is the least recently used: forgotten
    again = numbers.next("w", "a")
    assert again[1] == 1 and again[0] != first[0]
    assert len(numbers) == 2


def test_a_record_expects_the_next_number_and_a_new_stream_from_one() -> None:
    record = StreamRecord()
    assert record.expected("s") == 1
    assert record.advance("s", 1) and record.expected("s") == 2
    assert not record.advance("s", 1), "an old number is no news"
    assert record.expected("s") == 2


def test_a_record_keeps_the_recent_streams_and_then_knows_it_is_incomplete() -> None:
    record = StreamRecord()
    for n in range(MAX_STREAMS + 1):
        record.advance(f"s{n}", 3)
    assert "s0" not in record.last and len(record.last) == MAX_STREAMS
    assert not record.complete
    assert record.expected("s0") is None, "a trimmed stream may start anywhere"
    again = StreamRecord.parse(record.as_dict())
    assert again.last == record.last and not again.complete


def test_a_record_from_malformed_bytes_keeps_only_valid_entries() -> None:
    parsed = StreamRecord.parse({"s": 2, "bad": "x", 3: 4, "neg": -1})
    assert parsed.last == {"s": 2} and parsed.complete
    assert StreamRecord.parse(["not", "a", "dict"]).last == {}


def test_the_header_carries_stream_and_number_and_old_headers_still_parse() -> None:
    header = StickyHeader("w", "k", 3, 0, 5, "", "abc.1", 7)
    assert parse_header(header.encode()) == header
    assert parse_header(["w", "k", 3, 0, 5]).seq == 0
    assert parse_header(["w", "k", 3, 0, 5, "region=eu"]).affinity == "region=eu"


@pytest.mark.parametrize(
    ("stream", "seq", "field"),
    [
        ("", 1, "stream"),
        ("a b", 1, "stream"),
        ("x" * 65, 1, "stream"),
        ("s", 0, "seq"),
        ("s", -1, "seq"),
        ("s", "1", "seq"),
        (5, 1, "stream"),
    ],
)
def test_a_malformed_stream_or_number_is_named(stream: object, seq: object, field: str) -> None:
    with pytest.raises(InvalidHeaderError, match=field):
        parse_header(["w", "k", 0, 0, 0, "", stream, seq])


def test_a_failed_publish_gives_its_number_back_if_it_is_still_the_last() -> None:
    import threading

    sequencer = Sequencer()
    sequencer.begin()
    stream, first = sequencer.next("wf", "k")
    assert sequencer.give_back() is True
    assert sequencer.next("wf", "k") == (stream, first)  # the number is drawn again
    sequencer.begin()
    assert sequencer.give_back() is False, "nothing was drawn since begin()"
    sequencer.begin()
    _, mine = sequencer.next("wf", "k")
    other = threading.Thread(target=sequencer.next, args=("wf", "k"))
    other.start()
    other.join()
    assert sequencer.give_back() is False, "another thread numbered the key since: a gap"
    assert sequencer.next("wf", "k") == (stream, mine + 2)
