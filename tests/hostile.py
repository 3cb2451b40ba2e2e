"""Helpers of the hostile-input tests: raw publishes the router never sees, and
looks into the dead-letter queue that need nothing of the code under test."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from celery_sticky import testing
from celery_sticky.testing import WorkerCluster
from tests.conftest import start_cluster

RECORD_STEP = "tests.cluster_app.record_step"
#: Where a header is absent from a raw publish (not the same as ``None``).
ABSENT = object()


def publish_raw(
    app: Celery,
    queue: str,
    args: Any = (),
    kwargs: Any = None,
    *,
    sticky: Any = ABSENT,
    task: str = RECORD_STEP,
    body: Any = ABSENT,
    task_id: str | None = None,
) -> str:
    """Publish a task message straight to ``queue`` (no router), with ``sticky`` as
    its sticky header (ABSENT: none) and, when given, ``body`` instead of the real one."""
    task_id = task_id or str(uuid.uuid4())
    message = app.amqp.create_task_message(task_id, task, args, kwargs or {})
    headers = dict(message.headers)
    if sticky is not ABSENT:
        headers["sticky"] = sticky
    payload = message.body if body is ABSENT else body
    with app.producer_or_acquire() as producer:
        producer.publish(
            payload,
            exchange="",
            routing_key=queue,
            headers=headers,
            serializer="json",
            retry=True,
            declare=[app.amqp.queues[queue]] if queue in app.amqp.queues else None,
        )
    return task_id


def broker_client(app: Celery) -> redis.Redis:
    return redis.Redis.from_url(app.conf.broker_url)


def raw_messages(app: Celery, queue: str) -> list[dict[str, Any]]:
    """The messages of a queue on the Redis broker, oldest first, left in place."""
    client = broker_client(app)
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


def dead_ids(app: Celery, prefix: str) -> dict[str, str]:
    """Task id -> reason of every message in ``<prefix>.dead``."""
    found = {}
    for message in raw_messages(app, f"{prefix}.dead"):
        headers = message.get("headers") or {}
        found[str(headers.get("id"))] = str(headers.get("sticky_dead_reason"))
    return found


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """:func:`celery_sticky.testing.wait_for`, naming what it waits for."""
    return testing.wait_for(condition, timeout, interval=0.1, message=f"waiting for {what}")


class HostileRun:
    """An app and workers of its own (own key and queue prefix)."""

    def __init__(
        self, prefix: str, tmp: Path, env: dict[str, str] | None = None, **settings: Any
    ) -> None:
        from tests.cluster_app import make_app

        self.prefix = prefix
        self.env = {
            "STICKY_TEST_PREFIX": prefix,
            "STICKY_TEST_STATE_DIR": str(tmp / "state"),
            **(env or {}),
        }
        if "STICKY_TEST_LEASE_TTL" in self.env:
            settings.setdefault("sticky_lease_ttl", float(self.env["STICKY_TEST_LEASE_TTL"]))
        if "STICKY_TEST_LEASE_URL" in self.env:
            settings.setdefault("sticky_redis_url", self.env["STICKY_TEST_LEASE_URL"])
        self.app = make_app(prefix, **settings)
        self.app.finalize()
        self.step = self.app.tasks[RECORD_STEP]
        self.logs = tmp / "logs"
        self.cluster: WorkerCluster | None = None
        self.default_queue = f"{prefix}.default"

    def start(self, *names: str, **options: Any) -> WorkerCluster:
        specs = {name: {"queues": [self.default_queue], **options} for name in names}
        self.cluster = start_cluster(self.app, specs, env=self.env, workdir=self.logs)
        return self.cluster

    def direct_queue(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop_all()


def environ_redis_url() -> str:
    return os.environ["STICKY_TEST_REDIS_URL"]
