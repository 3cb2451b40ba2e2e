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
from celery_sticky.lease import RedisHandoffStore
from celery_sticky.testing.nemesis import LEASE_URL_ENV, register_probe


def _float_env(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def make_app(prefix: str | None = None, **settings: Any) -> Celery:
    prefix = prefix or os.environ["STICKY_TEST_PREFIX"]
    url = os.environ["STICKY_TEST_REDIS_URL"]
    broker = os.environ.get("STICKY_TEST_BROKER_URL") or url
    app = Celery(f"tests-{prefix}", broker=broker, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"{prefix}.default",
        sticky_redis_url=os.environ.get("STICKY_TEST_LEASE_URL")
        or os.environ.get(LEASE_URL_ENV)
        or url,
        sticky_key_prefix=prefix,
        sticky_secret=f"tests-{prefix}-hand-over-secret",
        sticky_queue_prefix=prefix,
        sticky_state_dir=os.environ.get("STICKY_TEST_STATE_DIR", "/tmp/sticky-test-state"),
        sticky_lease_ttl=float(os.environ.get("STICKY_TEST_LEASE_TTL", "10")),
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=int(os.environ.get("STICKY_TEST_PREFETCH", "4")),
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        sticky_idle_timeout=_float_env("STICKY_TEST_IDLE_TIMEOUT"),
        sticky_state_replication=os.environ.get("STICKY_TEST_REPLICATION", "on_handoff"),
        sticky_handoff_store=os.environ.get("STICKY_TEST_HANDOFF_STORE", "redis"),
        sticky_on_state_lost="tests.cluster_app.rebuild_lost_state",
        sticky_metrics_port=int(os.environ.get("STICKY_TEST_METRICS_PORT") or 0) or None,
        sticky_metrics_address="127.0.0.1",
        sticky_max_keys_per_worker=int(os.environ.get("STICKY_TEST_MAX_KEYS") or 0) or None,
        sticky_placement=os.environ.get("STICKY_TEST_PLACEMENT") or "least_loaded",
        sticky_gap_timeout=_float_env("STICKY_TEST_GAP_TIMEOUT") or 30.0,
    )
    transport_options: dict[str, Any] = {}
    visibility = _float_env("STICKY_TEST_VISIBILITY_TIMEOUT")
    if visibility is not None:
        # kombu sweeps for expired unacked messages every interval x throttle seconds.
        transport_options.update(
            visibility_timeout=visibility, unacked_restore_interval=1, unacked_restore_throttle=1
        )
    polling = _float_env("STICKY_TEST_POLLING_INTERVAL")
    if polling is not None:
        # On Redis: how long a worker's BRPOP/BLMOVE waits before it is sent again.
        transport_options["polling_interval"] = polling
    client_name = os.environ.get("STICKY_TEST_CLIENT_NAME")
    if client_name:
        # CLIENT SETNAME of the broker connections: a test finds this worker's clients.
        transport_options["client_name"] = client_name
    if transport_options:
        app.conf.broker_transport_options = transport_options
    if broker.startswith("amqp"):
        # A frozen worker's prefetched tasks return when RabbitMQ drops its
        # connection: after two missed heartbeats.
        app.conf.broker_heartbeat = 2
        # A publish returns once RabbitMQ has it (the workers confirm theirs anyway).
        transport_options["confirm_publish"] = True
        app.conf.broker_transport_options = transport_options
    app.conf.update(settings)
    register_probe(app)  # the nemesis's probe tasks (tests/testing/test_nemesis.py)
    return app


app = make_app() if "STICKY_TEST_PREFIX" in os.environ else Celery("tests-unconfigured")

_recorder: redis.Redis | None = None


def record(event: dict[str, Any]) -> None:
    """Append an event to this worker's run log in Redis (read back by the tests)."""
    global _recorder
    if _recorder is None:
        _recorder = redis.Redis.from_url(os.environ["STICKY_TEST_REDIS_URL"])
    _recorder.rpush(f"{os.environ['STICKY_TEST_PREFIX']}:events", json.dumps(event))


def rebuild_lost_state(workflow: str, key: str) -> dict[str, Any] | None:
    """``sticky_on_state_lost`` hook: logs the loss; rebuilds keys marked ``rebuild-``;
    raises the first time for keys marked ``raise-once-`` (a source of truth that is
    down for a moment)."""
    record({"key": key, "lost": True, "workflow": workflow, "time": time.time()})
    if key.startswith("raise-once-"):
        assert _recorder is not None
        marker = f"{os.environ['STICKY_TEST_PREFIX']}:raised:{key}"
        if _recorder.set(marker, 1, nx=True, ex=600):
            raise ConnectionError(f"the source of truth of {key} does not answer")
    if key.startswith("rebuild-"):
        return {"steps": ["rebuilt"]}
    return None


def _sticky_header(task: Any) -> list[Any]:
    headers = getattr(task.request, "headers", None) or {}
    return list(headers.get("sticky") or [None, None, 0, 0])


@sticky_task(key="key", bind=True, acks_late=True)
def record_step(self: Any, key: str, step: int, duration: float = 0.01, *, state: Any) -> list[int]:
    """A workflow step: appends its number to the key's state and logs where it ran."""
    return _record_step(self, key, step, duration, state)


def _record_step(self: Any, key: str, step: int, duration: float, state: Any) -> list[int]:
    start = time.time()
    steps = state.get("steps", [])
    state["steps"] = [*steps, step]
    time.sleep(duration)
    _, _, epoch, hops = _sticky_header(self)[:4]
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
            "recovered": state.recovered,
            "pid": os.getpid(),
        }
    )
    return list(state["steps"])


@sticky_task(key="key", bind=True)
def stateless_step(self: Any, key: str, step: int) -> int:
    """A sticky step without a state handle (it commits nothing); logs where it ran."""
    record({"key": key, "step": step, "node": self.request.hostname, "start": time.time()})
    return step


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


@sticky_task(key="key", bind=True, acks_late=True)
def slow_write(self: Any, key: str, step: int, *, state: Any) -> list[int]:
    """Writes, says it is inside its body, then takes long enough to be killed."""
    state["steps"] = [*state.get("steps", []), step]
    record(
        {
            "key": key,
            "step": step,
            "node": self.request.hostname,
            "inside": True,
            "start": time.time(),
            "end": time.time(),
            "epoch": 0,
            "hops": 0,
            "id": self.request.id,
        }
    )
    time.sleep(float(os.environ.get("STICKY_TEST_SLOW_WRITE", "30")))
    return list(state["steps"])


@sticky_task(key="key", bind=True, acks_late=True)
def fan_out(self: Any, key: str, target: str, count: int, *, state: Any) -> list[str]:
    """Publishes ``count`` steps of ``target`` through the outbox."""
    state["fanned"] = state.get("fanned", 0) + 1
    return [state.publish(record_step.si(target, i)) for i in range(count)]


@sticky_task(key="key", bind=True)
def finish_now(self: Any, key: str, *, state: Any) -> dict[str, Any]:
    seen = dict(state.items())
    state.finish()
    return {"node": self.request.hostname, "state": seen}


@sticky_task(key="key", bind=True, ends_workflow=True)
def last_step(self: Any, key: str, *, state: Any) -> dict[str, Any]:
    return {"node": self.request.hostname, "state": dict(state.items())}


@sticky_task(key="key", bind=True, acks_late=True, max_retries=3)
def retry_step(
    self: Any, key: str, step: int, countdown: float, queue: str = "", *, state: Any
) -> list[int]:
    """A workflow step that asks for a retry on its first run; the retry appends ``step``.

    With ``queue``, the retry is sent there (a queue no worker reads: a lost retry)."""
    if self.request.retries == 0:
        raise self.retry(countdown=countdown, **({"queue": queue} if queue else {}))
    return _record_step(self, key, step, 0.01, state)


@sticky_task(key="key", bind=True, acks_late=True, max_retries=3)
def retry_once(self: Any, key: str, *, state: Any) -> int:
    """Writes, then asks for a retry on its first run: only the retry's write counts."""
    state["runs"] = state.get("runs", 0) + 1
    if self.request.retries == 0:
        raise self.retry(countdown=0.1)
    return int(state["runs"])


if os.environ.get("STICKY_TEST_CRASH_BEFORE_OUTBOX"):
    # Fault injection for the outbox test: the first task to reach the outbox
    # after its commit kills its whole worker, as a power cut would.
    import signal

    import celery_sticky.worker.execution as _task_module

    _send_outbox = _task_module.send_outbox
    _marker = os.environ["STICKY_TEST_CRASH_BEFORE_OUTBOX"]

    def _crash_then_send(app: Any, store: Any, workflow: str, key: str, task_id: str) -> int:
        if store.outbox(workflow, key, task_id) and not os.path.exists(_marker):
            with open(_marker, "w") as fh:
                fh.write("crashed")
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return int(_send_outbox(app, store, workflow, key, task_id))

    _task_module.send_outbox = _crash_then_send  # type: ignore[assignment]


class FailingCopies(RedisHandoffStore):
    """A hand-over store that fails every write of a key marked ``failcopy-``."""

    def write(self, name: str, blob: bytes) -> None:
        if ":failcopy-" in name:
            raise OSError(f"the hand-over store refuses {name}")
        super().write(name, blob)


@shared_task(bind=True)
def collect(self: Any, results: list[Any]) -> dict[str, Any]:
    """A chord body: what the header's steps returned."""
    return {"node": self.request.hostname, "results": results}


@sticky_task(key="key", bind=True)
def sticky_collect(self: Any, results: list[Any], key: str, *, state: Any) -> list[Any]:
    """A sticky chord body: the key comes after the header's results."""
    state["collected"] = results
    record(
        {
            "key": key,
            "step": "collect",
            "node": self.request.hostname,
            "start": time.time(),
            "end": time.time(),
            "id": self.request.id,
        }
    )
    return list(results)


def _region_of(
    key: str, step: int, region: str, gpu: bool = False, duration: float = 0.0
) -> dict[str, str]:
    return {"region": region, "gpu": "yes"} if gpu else {"region": region}


@sticky_task(key="key", bind=True, acks_late=True, affinity=_region_of)
def regional_step(
    self: Any,
    key: str,
    step: int,
    region: str,
    gpu: bool = False,
    duration: float = 0.0,
    *,
    state: Any,
) -> str:
    """A step only a worker of the key's region (and with a GPU, when asked) may run."""
    start = time.time()
    state["steps"] = [*state.get("steps", []), step]
    time.sleep(duration)
    record(
        {
            "key": key,
            "step": step,
            "node": self.request.hostname,
            "start": start,
            "end": time.time(),
            "id": self.request.id,
            "region": region,
            "gpu": gpu,
        }
    )
    return str(self.request.hostname)


#: What ``place_on_largest`` was offered, in the process that publishes.
offered: list[list[Any]] = []


def place_on_largest(workflow: str, key: str, candidates: Any) -> str | None:
    """A ``sticky_placement`` callable: the candidate with the most capacity."""
    offered.append(list(candidates))
    return max(candidates, key=lambda c: (c.capacity, c.name)).name if candidates else None
