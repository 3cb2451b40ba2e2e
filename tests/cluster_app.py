"""The Celery app the test workers run (``celery -A tests.cluster_app``).

Its settings come from the environment, so a test session and the worker
subprocesses it starts agree on Redis, prefixes and the state directory.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, shared_task

from celery_sticky import sticky_task


def make_app(prefix: str | None = None, **settings: Any) -> Celery:
    prefix = prefix or os.environ["STICKY_TEST_PREFIX"]
    url = os.environ["STICKY_TEST_REDIS_URL"]
    app = Celery(f"tests-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"{prefix}.default",
        sticky_redis_url=os.environ.get("STICKY_TEST_LEASE_URL"),
        sticky_key_prefix=prefix,
        sticky_queue_prefix=prefix,
        sticky_state_dir=os.environ.get("STICKY_TEST_STATE_DIR", "/tmp/sticky-test-state"),
        sticky_lease_ttl=float(os.environ.get("STICKY_TEST_LEASE_TTL", "10")),
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=int(os.environ.get("STICKY_TEST_PREFETCH", "4")),
        broker_connection_retry_on_startup=True,
        result_expires=3600,
    )
    app.conf.update(settings)
    return app


app = make_app() if "STICKY_TEST_PREFIX" in os.environ else Celery("tests-unconfigured")

_recorder: redis.Redis | None = None


def record(event: dict[str, Any]) -> None:
    """Append an event to this worker's run log in Redis (read back by the tests)."""
    global _recorder
    if _recorder is None:
        _recorder = redis.Redis.from_url(os.environ["STICKY_TEST_REDIS_URL"])
    _recorder.rpush(f"{os.environ['STICKY_TEST_PREFIX']}:events", json.dumps(event))


def _sticky_header(task: Any) -> list[Any]:
    headers = getattr(task.request, "headers", None) or {}
    return list(headers.get("sticky") or [None, None, 0, 0])


@sticky_task(key="key", bind=True, acks_late=True)
def record_step(self: Any, key: str, step: int, duration: float = 0.01, *, state: Any) -> list[int]:
    """A workflow step: appends its number to the key's state and logs where it ran."""
    start = time.time()
    steps = state.get("steps", [])
    state["steps"] = [*steps, step]
    time.sleep(duration)
    _, _, epoch, hops = _sticky_header(self)
    record(
        {
            "key": key,
            "step": step,
            "node": self.request.hostname,
            "start": start,
            "end": time.time(),
            "epoch": epoch,
            "hops": hops,
            "id": self.request.id,
        }
    )
    return list(state["steps"])


@sticky_task(key="key", bind=True)
def read_state(self: Any, key: str, *, state: Any) -> dict[str, Any]:
    """Everything the key's state holds, and where it was read."""
    return {"node": self.request.hostname, "state": dict(state.items())}


@sticky_task(key="key", bind=True)
def write_then_fail(self: Any, key: str, *, state: Any) -> None:
    state["poison"] = True
    raise RuntimeError("this step fails after writing")


@sticky_task(key=lambda tenant, order: f"{tenant}/{order}", workflow="tenant_order", bind=True)
def tenant_step(self: Any, tenant: str, order: int, *, state: Any) -> dict[str, Any]:
    state["count"] = state.get("count", 0) + 1
    return {"node": self.request.hostname, "count": state["count"]}


@shared_task(bind=True)
def plain_task(self: Any, x: int) -> dict[str, Any]:
    """Not sticky: the router must leave it alone."""
    return {
        "node": self.request.hostname,
        "queue": self.request.delivery_info.get("routing_key"),
        "x": x,
    }
