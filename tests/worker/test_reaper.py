"""The order a dead or drained worker's queue moves on in."""

from __future__ import annotations

from kombu.message import Message

from celery_sticky.worker.reaper import in_publish_order


def _message(stream: str, seq: int, sent: int) -> Message:
    header = ["w", "k", 0, 0, sent, "", stream, seq]
    return Message(body=b"", headers={"sticky": header})  # type: ignore[no-untyped-call]


def _numbers(messages: list[Message]) -> list[str]:
    return [f"{m.headers['sticky'][6]}{m.headers['sticky'][7]}" for m in messages]


def test_a_producer_whose_clock_stepped_back_keeps_its_order() -> None:
    """Producer a's clock stepped back between its messages 1 and 2: by publish time
    alone they would move as a2, b1, a3, a1; each stream keeps its numbers' order."""
    moved = [_message("a", 1, 300), _message("b", 1, 150), _message("a", 2, 100)]
    moved.append(_message("a", 3, 200))
    assert _numbers(in_publish_order(moved)) == ["a1", "b1", "a2", "a3"]


def test_unnumbered_messages_keep_publish_time_order() -> None:
    plain = [Message(body=b"", headers={"sticky": ["w", "k", 0, 0, t]}) for t in (3, 1, 2)]  # type: ignore[no-untyped-call]
    assert [m.headers["sticky"][4] for m in in_publish_order(plain)] == [1, 2, 3]
