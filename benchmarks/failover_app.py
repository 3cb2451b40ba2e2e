"""The Celery app the failover benchmark's workers run (``celery -A failover_app:app``).

Its settings come from ``FAILOVER_*`` environment variables, so the benchmarks
(``benchmarks/failover.py``, ``benchmarks/placement_spread.py``) and the worker
subprocesses they start agree on Redis, the key and queue prefix, the lease TTL
and the state directory. The workflow steps (``step``, ``check``) record when
their body started and on which node (an RPUSH of a JSON event to
``<prefix>:events``) before doing anything else; ``touch`` only says where it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import redis
from celery import Celery

from celery_sticky import sticky_task


def make_app(
    prefix: str, url: str, state_dir: str, lease_ttl: float, replication: str = "on_handoff"
) -> Celery:
    """An app whose keys, queues and state are all under ``prefix`` / ``state_dir``."""
    app = Celery(f"failover-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"{prefix}.default",
        sticky_redis_url=url,
        sticky_key_prefix=prefix,
        sticky_secret=f"benchmark-{prefix}-hand-over-secret",
        sticky_queue_prefix=prefix,
        sticky_state_dir=state_dir,
        sticky_lease_ttl=lease_ttl,
        sticky_state_replication=replication,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=4,
        # No pidbox: nothing of a run is left in Redis's shared binding tables.
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
    )
    return app


def app_from_env() -> Celery:
    return make_app(
        os.environ["FAILOVER_PREFIX"],
        os.environ["FAILOVER_REDIS_URL"],
        os.environ["FAILOVER_STATE_DIR"],
        float(os.environ["FAILOVER_LEASE_TTL"]),
        os.environ.get("FAILOVER_REPLICATION", "on_handoff"),
    )


app = app_from_env() if "FAILOVER_PREFIX" in os.environ else Celery("failover-unconfigured")

_recorder: redis.Redis | None = None


def _client() -> redis.Redis:
    """This process's Redis client (made after the pool's fork)."""
    global _recorder
    if _recorder is None:
        _recorder = redis.Redis.from_url(os.environ["FAILOVER_REDIS_URL"])
    return _recorder


def record(task: Any, event: dict[str, Any]) -> None:
    """Append ``event`` (with the node and pid) to the run's event list in Redis."""
    event.update(node=task.request.hostname, pid=os.getpid(), id=task.request.id)
    _client().rpush(f"{os.environ['FAILOVER_PREFIX']}:events", json.dumps(event))


@sticky_task(key="key", name="failover_bench.step", bind=True, acks_late=True)
def step(
    self: Any, key: str, number: int, duration: float = 0.0, until: str = "", *, state: Any
) -> list[int]:
    """A workflow step: records its start, appends ``number`` to the state, sleeps.

    The sleep lasts ``duration`` seconds, or ends as soon as the Redis key ``until``
    exists (so a step run again after a failover does not hold a pool slot).
    Returns the key's steps so far (what the state holds after this step).
    """
    event = {"task": "step", "key": key, "step": number, "start": time.time()}
    record(self, {**event, "recovered": state.recovered})
    steps = [*state.get("steps", []), number]
    state["steps"] = steps
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if until and _client().exists(until):
            break
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
    return steps


@sticky_task(key="key", name="failover_bench.fill", bind=True)
def fill(self: Any, key: str, size: int, *, state: Any) -> str:
    """Writes ``size`` random bytes into the key's state; returns their SHA-256."""
    blob = os.urandom(size)
    digest = hashlib.sha256(blob).hexdigest()
    state["blob"] = blob
    state["sha"] = digest
    return digest


@sticky_task(key="key", name="failover_bench.check", bind=True, acks_late=True)
def check(self: Any, key: str, *, state: Any) -> dict[str, Any]:
    """Records its start, then reports what the key's state holds and where it ran."""
    start = time.time()
    record(self, {"task": "check", "key": key, "start": start, "recovered": state.recovered})
    blob = state.get("blob")
    return {
        "node": self.request.hostname,
        "start": start,
        "recovered": state.recovered,
        "size": None if blob is None else len(blob),
        "sha": None if blob is None else hashlib.sha256(blob).hexdigest(),
        "stored_sha": state.get("sha"),
    }


@sticky_task(key="key", name="failover_bench.touch", bind=True)
def touch(self: Any, key: str) -> str:
    """A stateless step (no ``state`` parameter, so nothing is written locally) that
    returns the node it ran on; ``placement_spread.py`` compares it with the key's owner."""
    return str(self.request.hostname)
