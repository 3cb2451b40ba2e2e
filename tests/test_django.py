"""A Django project (tests/django_project, the one docs/django.md describes) with a real worker:
CELERY_STICKY_* settings under namespace="CELERY", tasks found by autodiscover_tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster
from tests.conftest import REPO

pytest.importorskip("django")

NODE = "d1@eco-tests"


def test_django_project_runs_sticky_tasks(prefix: str, tmp_path: os.PathLike[str]) -> None:
    from tests.cluster_app import make_app

    sub = f"{prefix}dj"  # what tests/django_project/proj/settings.py derives
    probe = make_app(sub)  # the same lease store, to see the worker register
    env = {"DJANGO_SETTINGS_MODULE": "tests.django_project.proj.settings"}
    with WorkerCluster(probe, "tests.django_project.proj", tmp_path, env=env, cwd=str(REPO)) as cl:
        cl.start(NODE, queues=[f"{sub}.default"], timeout=60)
        order = f"order-{uuid.uuid4().hex[:8]}"
        done = subprocess.run(
            [sys.executable, "-m", "tests.django_project.drive", order],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **env},
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.splitlines()[-1])
        assert (seen["key_prefix"], seen["queue_prefix"]) == (sub, sub), "CELERY_STICKY_* read"
        assert seen["first"] == {"node": NODE, "items": ["sku-1"]}
        assert seen["second"] == {"node": NODE, "items": ["sku-1", "sku-2"]}
        assert seen["plain"] == 42
        assert "tests.django_project.orders.tasks.add_item" in seen["tasks"]
        info = lease_store(probe).lookup("order_id", order)
        assert info is not None and info.owner == NODE
        assert cl.stop(NODE) == 0
        log = cl.workers[NODE].log()
    assert f"sticky: drained {NODE}" in log, "SIGTERM drained the node"
