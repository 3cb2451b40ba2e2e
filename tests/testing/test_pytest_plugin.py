"""The pytest fixtures celery-sticky offers its users, used as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO


def test_fixtures_start_workers_and_tell_owners(
    sticky_redis_url: str, sticky_workers: Any, sticky_owner: Any, prefix: str
) -> None:
    from tests.cluster_app import make_app

    sub = f"{prefix}pl"
    app = make_app(sub)
    app.finalize()
    cluster = sticky_workers(
        app,
        "tests.cluster_app:app",
        ["p1@plugin", "p2@plugin"],
        env={"STICKY_TEST_PREFIX": sub},
        cwd=str(REPO),
        queues=[f"{sub}.default"],
    )
    assert set(cluster.workers) == {"p1@plugin", "p2@plugin"}
    assert sticky_redis_url.startswith("redis://")
    key = f"plugin-{uuid.uuid4().hex[:8]}"
    assert app.tasks["tests.cluster_app.record_step"].delay(key, 0).get(timeout=30) == [0]
    assert sticky_owner(app, "key", key) in {"p1@plugin", "p2@plugin"}
    assert sticky_owner(app, "key", "never-published") is None


_LATE_TASK = """
import pytest
from celery_sticky import ConfigurationError, StateHandle, sticky_task

pytest_plugins = ["celery.contrib.pytest", "celery_sticky.testing.pytest_plugin"]


@pytest.fixture
def celery_config(sticky_config):
    return sticky_config


def test_late(celery_app, celery_worker):
    @sticky_task(key="k", app=celery_app, name="eco.late")
    def late(k: str, *, state: StateHandle) -> None:
        state["seen"] = True

    with pytest.raises(ConfigurationError) as raised:
        celery_worker.reload()
    print("RAISED:", raised.value)
"""


def test_a_sticky_task_registered_after_the_worker_started_fails_loudly(
    tmp_path: Path, sticky_redis_url: str
) -> None:
    """As a user's suite meets it (in a process of its own: this suite's shared sticky
    tasks would install celery-sticky on Celery's test app before its worker starts)."""
    (tmp_path / "test_late.py").write_text(_LATE_TASK)
    options = ["-q", "-s", "-p", "no:celery", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *options, str(tmp_path / "test_late.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "STICKY_REDIS_URL": sticky_redis_url},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RAISED: sticky task eco.late: worker " in done.stdout
    assert "started without celery-sticky's bootsteps" in done.stdout


def test_the_namespace_is_deleted_after_the_test(
    sticky_redis_url: str, request: pytest.FixtureRequest
) -> None:
    import redis

    from celery_sticky.testing.pytest_plugin import sticky_config

    # Run the fixture by hand, as pytest would around a test that used it.
    steps = sticky_config.__wrapped__(sticky_redis_url, Path(str(request.config.rootpath)))  # type: ignore[attr-defined]
    config = next(steps)
    prefix = config["sticky_key_prefix"]
    client = redis.Redis.from_url(sticky_redis_url)
    client.set(f"{prefix}:lease:key:x", "1")
    client.rpush(f"{prefix}.default", "message")
    client.sadd(f"_kombu.binding.{prefix}.default", "binding")
    with pytest.raises(StopIteration):
        next(steps)
    assert not list(client.scan_iter(f"*{prefix}*")), "nothing of the test's namespace is left"


def test_sticky_config_and_app(sticky_config: dict[str, Any], sticky_celery_app: Any) -> None:
    from celery_sticky.context import get_config
    from celery_sticky.producer.install import router_of

    prefix = sticky_config["sticky_key_prefix"]
    assert sticky_config["task_default_queue"] == f"{prefix}.default"
    assert sticky_celery_app.conf.broker_url == sticky_config["broker_url"]
    assert router_of(sticky_celery_app) is not None, "celery-sticky is installed"
    config = get_config(sticky_celery_app)
    assert (config.key_prefix, config.redis_url) == (prefix, sticky_config["broker_url"])
