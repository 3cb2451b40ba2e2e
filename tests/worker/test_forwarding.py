"""A worker's own publishes (forwards, moves, dead letters) on the broker."""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

import pytest
from celery import Celery
from kombu.message import Message

from celery_sticky.testing import TcpProxy
from celery_sticky.wire import direct_queue
from celery_sticky.worker.bootsteps.node import confirm_publishes
from celery_sticky.worker.forwarding import publish_copy

AMQP = os.environ.get("STICKY_TEST_BROKER_URL", "")


def _message(task_id: str) -> Message:
    return Message(  # type: ignore[no-untyped-call]
        body=b"[[], {}, {}]",
        content_type="application/json",
        content_encoding="utf-8",
        headers={"id": task_id, "task": "tests.nothing"},
        properties={},
    )


@pytest.mark.skipif(not AMQP.startswith("amqp"), reason="RabbitMQ only: Redis answers each push")
def test_a_workers_publish_returns_once_rabbitmq_has_the_message() -> None:
    """The worker publishes a copy, then acknowledges the original. On RabbitMQ the
    publish must not return before the broker has the copy: here the network
    holds everything (a blackholed connection), and the publish waits until it
    flows again. Before: it returned at once (py-amqp wrote the frame to the socket),
    and a cut connection then lost the copy while the original was acknowledged."""
    queue = f"confirm-{uuid.uuid4().hex[:8]}"
    with TcpProxy.to(AMQP) as proxy:
        app = Celery("confirm", broker=proxy.url(AMQP), set_as_current=False)
        confirm_publishes(app)
        publish_copy(app, _message("first"), {"id": "first"}, queue)  # connected now
        proxy.blackhole()
        done = threading.Event()
        failed: list[BaseException] = []

        def publish() -> None:
            try:
                publish_copy(app, _message("second"), {"id": "second"}, queue)
            except BaseException as exc:
                failed.append(exc)
            done.set()

        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        returned_early = done.wait(2.0)
        proxy.restore()
        assert not returned_early, "the publish returned before the broker had the message"
        assert done.wait(60), "the publish never returned after the network healed"
        assert not failed, failed
    reader = Celery("reader", broker=AMQP, set_as_current=False)
    with reader.connection_for_write() as connection:
        bound: Any = direct_queue(queue).bind(connection.default_channel)  # type: ignore[no-untyped-call]
        ids = []
        while (got := bound.get(no_ack=True)) is not None:
            ids.append(got.headers["id"])
        bound.delete()
    assert ids == ["first", "second"]
