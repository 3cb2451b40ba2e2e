"""pytest fixtures for testing your own sticky tasks against real workers.

Enable with ``pytest_plugins = ["celery_sticky.testing.pytest_plugin"]`` in your
``conftest.py``. pytest-celery 1.x registers a Docker-based ``celery_worker``
fixture that shadows Celery's own; these fixtures use neither (they start real
``celery worker`` subprocesses), but if you also use Celery's in-process worker,
run pytest with ``-p no:celery -p celery.contrib.pytest``.
"""

from __future__ import annotations

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
def sticky_config(sticky_redis_url: str, tmp_path: Path) -> dict[str, Any]:
    """Settings for a Redis-backed sticky app of one test: its own prefixes and state dir.

    Merge it into Celery's own fixture to make ``celery_app`` sticky::

        @pytest.fixture
        def celery_config(sticky_config):
            return {**sticky_config, "task_always_eager": False}
    """
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return {
        "broker_url": sticky_redis_url,
        "result_backend": sticky_redis_url,
        "task_default_queue": f"{prefix}.default",
        "sticky_key_prefix": prefix,
        "sticky_queue_prefix": prefix,
        "sticky_state_dir": str(tmp_path / "sticky-state"),
    }


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
