"""The pytest fixtures celery-sticky offers its users, used as a user would."""

from __future__ import annotations

import uuid
from typing import Any

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


def test_sticky_config_and_app(sticky_config: dict[str, Any], sticky_celery_app: Any) -> None:
    from celery_sticky.context import get_config
    from celery_sticky.producer.install import router_of

    prefix = sticky_config["sticky_key_prefix"]
    assert sticky_config["task_default_queue"] == f"{prefix}.default"
    assert sticky_celery_app.conf.broker_url == sticky_config["broker_url"]
    assert router_of(sticky_celery_app) is not None, "celery-sticky is installed"
    config = get_config(sticky_celery_app)
    assert (config.key_prefix, config.redis_url) == (prefix, sticky_config["broker_url"])
