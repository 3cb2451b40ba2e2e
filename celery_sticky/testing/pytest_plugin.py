"""pytest fixtures for testing your own sticky tasks against real workers.

Enable with ``pytest_plugins = ["celery_sticky.testing.pytest_plugin"]`` in your
``conftest.py``. pytest-celery 1.x registers a Docker-based ``celery_worker``
fixture that shadows Celery's own; these fixtures use neither (they start real
``celery worker`` subprocesses), but if you also use Celery's in-process worker,
run pytest with ``-p no:celery -p celery.contrib.pytest``.

Sticky tasks must exist before a worker starts: a worker started without them
has none of celery-sticky's bootsteps, and one registered later (then
``celery_worker.reload()``) makes the reload raise ``ConfigurationError``
instead of running the task unsticky.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from ..context import lease_store
from .cluster import WorkerCluster
from .redis_server import redis_at


@pytest.fixture(scope="session")
def sticky_redis_url() -> Iterator[str]:
    """A Redis URL that answers: ``STICKY_REDIS_URL`` (default 127.0.0.1:6379/0), or
    an embedded server started for the session when nothing answers there."""
    with redis_at(os.environ.get("STICKY_REDIS_URL", "redis://127.0.0.1:6379/0")) as url:
        yield url


@pytest.fixture
def sticky_config(sticky_redis_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Settings for a Redis-backed sticky app of one test: its own namespace and state dir.

    Every Redis key of the test lives under its own prefix (leases, registry,
    hand-over copies, its queues and their bindings) and is deleted after the test;
    results expire after an hour. Merge it into Celery's own fixture to make
    ``celery_app`` sticky::

        @pytest.fixture
        def celery_config(sticky_config):
            return {**sticky_config, "task_always_eager": False}
    """
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield {
        "broker_url": sticky_redis_url,
        "result_backend": sticky_redis_url,
        "result_expires": 3600,
        "task_default_queue": f"{prefix}.default",
        "sticky_key_prefix": prefix,
        "sticky_queue_prefix": prefix,
        "sticky_state_dir": str(tmp_path / "sticky-state"),
    }
    forget_namespace(sticky_redis_url, prefix)


def forget_namespace(url: str, prefix: str) -> int:
    """Delete every Redis key of one test's namespace; returns how many."""
    import redis

    patterns = (f"{prefix}*", f"_kombu.binding.{prefix}*", f"_kombu.binding_permanent.{prefix}*")
    deleted = 0
    with contextlib.suppress(redis.RedisError), redis.Redis.from_url(url) as client:
        for pattern in patterns:
            for name in client.scan_iter(pattern, count=1000):
                deleted += int(client.delete(name))
    return deleted


@pytest.fixture
def sticky_celery_app(sticky_config: dict[str, Any]) -> Celery:
    """A Celery app configured by ``sticky_config``, with celery-sticky installed."""
    from ..producer.install import install

    app = Celery(f"sticky-test-{sticky_config['sticky_key_prefix']}", set_as_current=False)
    app.conf.update(sticky_config)
    install(app)
    return app


StartWorkers = Callable[..., WorkerCluster]


@pytest.fixture
def sticky_workers(tmp_path: Path) -> Iterator[StartWorkers]:
    """Start real workers: ``sticky_workers(app, "proj.celery:app", ["w1@t", "w2@t"])``.

    Keyword arguments go to :meth:`WorkerCluster.start` (``pool``, ``concurrency``,
    ``queues``, ``env``...); ``env=`` is also given to every worker. Returns the
    :class:`WorkerCluster` once all have registered; stops them after the test.
    """
    clusters: list[WorkerCluster] = []

    def start(
        app: Celery,
        app_path: str,
        names: Iterable[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        **options: Any,
    ) -> WorkerCluster:
        cluster = WorkerCluster(
            app, app_path, tmp_path / f"workers-{len(clusters)}", env=env, cwd=cwd
        )
        clusters.append(cluster)
        names = list(names)
        for name in names:
            cluster.start(name, wait=False, **options)
        cluster.wait_registered(names, timeout=60)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop_all()


@pytest.fixture
def sticky_owner() -> Callable[[Celery, str, str], str | None]:
    """``sticky_owner(app, workflow, key)``: the node that owns the key now (or None)."""

    def owner(app: Celery, workflow: str, key: str) -> str | None:
        info = lease_store(app).lookup(workflow, key)
        return None if info is None else info.owner

    return owner
