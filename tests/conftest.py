"""Test session setup: a real Redis, a run prefix, and real worker subprocesses.

Redis is the one at ``STICKY_TEST_REDIS_URL`` (default 127.0.0.1:6379, db 11)
when it answers, otherwise an embedded server started for the session. Every
run uses its own key and queue prefix, so runs never see each other's leases.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_sticky.testing import WorkerCluster, redis_at

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["celery_sticky.testing.pytest_plugin"]
_session = contextlib.ExitStack()


def pytest_configure(config: pytest.Config) -> None:
    # The worker subprocesses and tests.cluster_app read these at import time.
    url = _session.enter_context(
        redis_at(os.environ.get("STICKY_TEST_REDIS_URL", "redis://127.0.0.1:6379/11"))
    )
    workdir = tempfile.mkdtemp(prefix="sticky-tests-")
    _session.callback(shutil.rmtree, workdir, True)
    os.environ["STICKY_TEST_REDIS_URL"] = url
    os.environ["STICKY_TEST_PREFIX"] = f"t{uuid.uuid4().hex[:8]}"
    os.environ["STICKY_TEST_STATE_DIR"] = os.path.join(workdir, "state")
    os.environ["STICKY_TEST_WORKDIR"] = workdir
    os.environ.setdefault("PYTHONPATH", str(REPO))


def _rabbitmq_missing() -> str | None:
    """Why the RabbitMQ run cannot happen here, or None when it can (or is not asked for)."""
    broker = os.environ.get("STICKY_TEST_BROKER_URL", "")
    if not broker.startswith("amqp"):
        return None
    from kombu import Connection

    try:
        with Connection(broker, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        return f"no RabbitMQ answers at {broker} ({exc})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _rabbitmq_missing()
    if missing is None:
        return
    if os.environ.get("STICKY_REQUIRE_RABBITMQ"):
        raise pytest.UsageError(f"STICKY_REQUIRE_RABBITMQ is set but {missing}")
    skip = pytest.mark.skip(reason=f"the RabbitMQ run is skipped: {missing}")
    for item in items:
        item.add_marker(skip)


def pytest_unconfigure(config: pytest.Config) -> None:
    prefix = os.environ.get("STICKY_TEST_PREFIX")
    if prefix:
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis.from_url(os.environ["STICKY_TEST_REDIS_URL"])
            patterns = (
                f"{prefix}*",
                f"_kombu.binding.{prefix}*",
                f"_kombu.binding_permanent.{prefix}*",
                f"_sticky.inflight.{prefix}*",
            )
            for pattern in patterns:
                for name in client.scan_iter(pattern, count=1000):
                    client.delete(name)
    _session.close()


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["STICKY_TEST_REDIS_URL"], decode_responses=True)


@pytest.fixture(scope="session")
def prefix() -> str:
    return os.environ["STICKY_TEST_PREFIX"]


@pytest.fixture(scope="session")
def sticky_app() -> Any:
    from tests.cluster_app import app

    app.finalize()  # binds the sticky tasks, which installs the router
    return app


def start_cluster(
    app: Any,
    specs: dict[str, dict[str, Any]],
    env: dict[str, str] | None = None,
    workdir: Path | None = None,
) -> WorkerCluster:
    """Start workers (name -> WorkerCluster.start options) in parallel; wait for all."""
    workdir = workdir or Path(os.environ["STICKY_TEST_WORKDIR"]) / "logs"
    cluster = WorkerCluster(app, "tests.cluster_app:app", workdir, env=env, cwd=str(REPO))
    for name, options in specs.items():
        cluster.start(name, wait=False, **options)
    try:
        cluster.wait_registered(specs, timeout=60)
    except BaseException:
        cluster.stop_all()
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster(sticky_app: Any, prefix: str) -> Iterator[WorkerCluster]:
    """Three prefork workers (-c 2); w3 also consumes the ``special`` queue."""
    queues = [f"{prefix}.default"]
    specs = {
        "w1@sticky-tests": {"queues": queues},
        "w2@sticky-tests": {"queues": queues},
        "w3@sticky-tests": {"queues": [*queues, f"{prefix}.special"]},
    }
    with start_cluster(sticky_app, specs) as running:
        yield running


def read_events(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(f"{prefix}:events", 0, -1)]


@pytest.fixture
def events(redis_client: redis.Redis, prefix: str) -> Any:
    """Callable returning the step events recorded so far, optionally for one key."""

    def read(key: str | None = None) -> list[dict[str, Any]]:
        found = read_events(redis_client, prefix)
        return [e for e in found if "step" in e and (key is None or e["key"] == key)]

    return read


def unique(label: str) -> str:
    """A key nobody used before in this session."""
    return f"{label}-{uuid.uuid4().hex[:10]}"


def wait_settled(app: Any, node: str, workflow: str, key: str, timeout: float = 30.0) -> None:
    """Wait until ``node``'s gate holds nothing of the key: its last task was acknowledged.

    A result can be read before the worker acknowledged the message (``acks_late``
    acknowledges after the result is stored), so a test that kills a worker right
    after ``.get()`` would race the acknowledgement. The gate lets the key go only
    after the acknowledgement.
    """
    from celery_sticky.testing import wait_for

    def idle() -> bool:
        replies = app.control.broadcast(
            "sticky_key_info",
            arguments={"workflow": workflow, "key": key},
            destination=[node],
            reply=True,
            timeout=1.0,
        )
        for reply in replies:
            gate = (reply.get(node) or {}).get("gate") or {}
            if gate.get("queued") == 0 and not gate.get("running"):
                return True
        return False

    wait_for(idle, timeout=timeout, message=f"{node} still holds {workflow}:{key}")
