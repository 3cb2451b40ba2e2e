"""The order a dead or drained worker's queue moves on in."""

from __future__ import annotations

from typing import Any

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


def _numbered(app: Any, queue: str, count: int) -> list[str]:
    """Publish ``count`` steps of one key, numbered 1.. in one stream, straight to
    ``queue``; their task ids in publish order."""
    from tests.hostile import publish_raw

    return [
        publish_raw(app, queue, ["k", n], sticky=["key", "k", 0, 0, n, "", "s", n + 1])
        for n in range(count)
    ]


_MOVER = """
import inspect, os, signal, sys
from tests.cluster_app import make_app
from celery_sticky.context import lease_store
from celery_sticky.worker.reaper import move_queue

app = make_app(sys.argv[1])
app.finalize()
options = {"mover": sys.argv[3]} if "mover" in inspect.signature(move_queue).parameters else {}

def die(keys):  # every message taken, none republished: a kill -9 right there
    os.kill(os.getpid(), signal.SIGKILL)

move_queue(app, lease_store(app), sys.argv[2], before_move=die, **options)
"""


def test_a_mover_killed_midway_leaves_the_queue_whole(prefix: str) -> None:
    """A reaper (or a drain) is killed with the whole queue it moves taken and none of
    it republished. Whoever reaps the mover gives every message back to the queue's
    head, in order (what ``reap`` does first: ``restore_shared`` of the dead node).

    Before, the mover took them with kombu's ``get``: they sat in kombu's unacked
    hash, which only a reap of the *queue's* dead owner or its restart looks into;
    its owner restarted meanwhile left them there for ``visibility_timeout`` (an hour).
    Seen in the nemesis: 7,151 messages of a restarted worker's queue stranded so."""
    import json
    import os
    import subprocess
    import sys
    import uuid

    import pytest

    from celery_sticky.worker.delivery import restore_shared
    from tests.cluster_app import make_app
    from tests.conftest import REPO
    from tests.hostile import broker_client, raw_messages

    if os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp"):
        pytest.skip("RabbitMQ requeues what a killed consumer had not acknowledged")
    sub = f"{prefix}mk{uuid.uuid4().hex[:4]}"
    app = make_app(sub)
    queue, mover = f"{sub}.gone@sticky-tests", "mover@sticky-tests"
    ids = _numbered(app, queue, 20)
    assert [m["headers"]["id"] for m in raw_messages(app, queue)] == ids
    done = subprocess.run(
        [sys.executable, "-c", _MOVER, sub, queue, mover],
        cwd=REPO,
        env={**os.environ, "STICKY_TEST_PREFIX": sub},
        timeout=60,
        capture_output=True,
    )
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    client = broker_client(app)
    assert client.llen(queue) == 0, "the mover took nothing"
    with app.connection_for_write() as connection:
        restore_shared(connection.default_channel, mover)
    stranded = [
        json.loads(raw)[0]["headers"]["id"]
        for raw in client.hvals("unacked")
        if json.loads(raw)[2] == queue
    ]
    back = [m["headers"]["id"] for m in raw_messages(app, queue)]
    assert back == ids, f"{len(back)} of {len(ids)} back; {len(stranded)} in kombu's unacked hash"


def test_a_move_in_batches_gives_back_what_no_live_worker_may_take_in_order(
    prefix: str, monkeypatch: Any
) -> None:
    """A queue move takes ``MOVE_BATCH`` messages at a time. Messages no live worker may
    take (here: no worker is registered) stay taken until the move ends, then go back
    to the queue's head in their order: put back at once, the next batch took them
    again, for ever."""
    import os
    import uuid

    import pytest

    from celery_sticky.context import lease_store
    from celery_sticky.worker import reaper
    from tests.cluster_app import make_app
    from tests.hostile import raw_messages

    if os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp"):
        pytest.skip("reads the queue's Redis list")
    monkeypatch.setattr(reaper, "MOVE_BATCH", 7)
    sub = f"{prefix}mb{uuid.uuid4().hex[:4]}"
    app = make_app(sub)
    queue = f"{sub}.gone@sticky-tests"
    ids = _numbered(app, queue, 25)
    moved = reaper.move_queue(app, lease_store(app), queue, mover="mover@sticky-tests")
    assert moved == 0
    assert [m["headers"]["id"] for m in raw_messages(app, queue)] == ids


def test_a_move_that_failed_while_the_broker_was_away_is_given_back_by_the_next_pass(
    prefix: str,
) -> None:
    """A reaper's move fails midway while the broker is away (the lease store or the
    broker failed; here ``before_move`` cuts the proxy to the broker and raises), so
    closing its channel cannot give back what it took either. The mover stays alive.
    Its next reaper pass gives those messages back to the queue's head, in order.

    Before, they waited in the mover's in-flight list of that queue until the mover
    itself restarted or died: in a nemesis run a step ran 14 minutes late so."""
    import os
    import uuid

    import pytest

    from celery_sticky.context import lease_store
    from celery_sticky.testing import TcpProxy
    from celery_sticky.wire import inflight_key
    from celery_sticky.worker.reaper import Reaper, move_queue
    from tests.cluster_app import make_app
    from tests.hostile import broker_client, raw_messages

    broker = os.environ.get("STICKY_TEST_BROKER_URL") or os.environ["STICKY_TEST_REDIS_URL"]
    if broker.startswith("amqp"):
        pytest.skip("RabbitMQ requeues what a closed channel had not acknowledged")
    sub = f"{prefix}mf{uuid.uuid4().hex[:4]}"
    app = make_app(sub)
    queue, mover = f"{sub}.gone@sticky-tests", "mover@sticky-tests"
    ids = _numbered(app, queue, 10)
    with TcpProxy.to(broker) as proxy:
        cut_app = make_app(sub, broker_url=proxy.url(broker))

        def broker_goes_away(keys: list[tuple[str, str]]) -> None:
            proxy.cut()
            raise ConnectionError("the broker went away mid-move")

        with pytest.raises(ConnectionError):
            move_queue(
                cut_app, lease_store(cut_app), queue, before_move=broker_goes_away, mover=mover
            )
        proxy.restore()
    client = broker_client(app)
    assert client.llen(queue) == 0
    assert client.llen(inflight_key(queue, mover)) == len(ids), "the move gave them back itself"
    Reaper(app, lease_store(app), mover, interval=1).run_once()
    back = [m["headers"]["id"] for m in raw_messages(app, queue)]
    assert back == ids, f"{len(back)} of {len(ids)} back"
    assert client.llen(inflight_key(queue, mover)) == 0
