"""``@sticky_task``: registration, argument checking, bad input at the call site."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery
from celery.utils.imports import symbol_by_name

from celery_sticky import ConfigurationError, InvalidKeyError, LeaseStoreUnavailable, install
from celery_sticky.producer.install import CONSUMER_STEPS, router_of
from celery_sticky.producer.router import StickyRouter
from celery_sticky.producer.task import StickyTask, sticky_task


def test_callers_never_pass_state(sticky_app: Any) -> None:
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    with pytest.raises(TypeError, match="do not pass 'state'"):
        task.delay("k", 0, state={})


def test_argument_checking_still_works_without_state(sticky_app: Any) -> None:
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    with pytest.raises(TypeError, match="step"):
        task.delay("k")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "is None"),
        (1.5, "must be a str, int or UUID, not float"),
        (True, "must be a str, int or UUID, not bool"),
        ({"a": 1}, "must be a str, int or UUID, not dict"),
        ("", "empty string"),
        ("x" * 257, "257 characters long"),
    ],
)
def test_bad_keys_fail_at_publish_naming_the_task_and_key(
    sticky_app: Any, key: Any, message: str
) -> None:
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    with pytest.raises(InvalidKeyError, match=message) as info:
        task.delay(key, 0)
    assert "tests.cluster_app.record_step" in str(info.value)
    assert "'key'" in str(info.value)


def test_missing_key_argument(sticky_app: Any) -> None:
    router = router_of(sticky_app)
    assert router is not None
    with pytest.raises(InvalidKeyError, match="argument 'key' is missing"):
        router("tests.cluster_app.record_step", (), {"step": 1}, {})


def test_int_and_uuid_keys_are_accepted(sticky_app: Any) -> None:
    router = router_of(sticky_app)
    assert router is not None
    for key in (17, uuid.uuid4()):
        options: dict[str, Any] = {}
        router("tests.cluster_app.record_step", (key, 0), {}, options)
        assert options["headers"]["sticky"][1] == str(key)


def test_decoration_errors() -> None:
    with pytest.raises(TypeError, match="callable key needs an explicit workflow"):
        sticky_task(key=lambda order: order)(lambda order: None)
    with pytest.raises(TypeError, match="key='nope' is not a parameter"):

        @sticky_task(key="nope")
        def no_such(order: str) -> None: ...

    with pytest.raises(TypeError, match="'state' parameter must be keyword-only"):

        @sticky_task(key="order")
        def positional_state(order: str, state: Any) -> None: ...

    with pytest.raises(TypeError, match="workflow='bad name'"):

        @sticky_task(key="order", workflow="bad name")
        def bad_workflow(order: str) -> None: ...


def test_install_is_idempotent() -> None:
    app = Celery("idempotent", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.task_routes = {"other.*": {"queue": "other"}}
    install(app)
    steps = {name: set(app.steps[name]) for name in ("worker", "consumer")}
    install(app)
    routes = app.conf.task_routes
    assert sum(isinstance(r, StickyRouter) for r in routes) == 1
    assert routes[1] == {"other.*": {"queue": "other"}}
    # Steps are named by string (a producer never imports the worker side).
    worker_steps = [symbol_by_name(s) for s in app.steps["worker"]]
    assert [s for s in worker_steps if s.__name__ == "StickyWorker"] != []
    assert {name: set(app.steps[name]) for name in ("worker", "consumer")} == steps
    assert sorted(app.steps["consumer"]) == sorted(CONSUMER_STEPS)  # the gate, the delivery


def test_unreachable_lease_store_fails_publish_naming_the_url() -> None:
    from tests.cluster_app import make_app

    app = make_app(
        f"unreach{uuid.uuid4().hex[:6]}", sticky_redis_url="redis://:secret@127.0.0.1:1/0"
    )
    app.finalize()
    with pytest.raises(LeaseStoreUnavailable, match=r"127\.0\.0\.1:1") as info:
        app.tasks["tests.cluster_app.record_step"].delay("k", 0)
    assert "secret" not in str(info.value)


def test_non_redis_broker_needs_sticky_redis_url() -> None:
    app = Celery("amqp", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
    app.finalize()
    from celery_sticky.context import get_config

    with pytest.raises(ConfigurationError, match="sticky_redis_url is not set"):
        get_config(app)


def test_registering_on_one_app_works_from_any_thread() -> None:
    import threading

    app = Celery("threads", broker="redis://127.0.0.1:6379/0", set_as_current=False)

    @sticky_task(key="order_id", app=app)
    def ship(order_id: str) -> None: ...

    seen: list[Any] = []
    thread = threading.Thread(target=lambda: seen.append(ship.app))
    thread.start()
    thread.join()
    assert seen == [app]
    assert isinstance(app.tasks[ship.name], StickyTask)
    assert any(isinstance(r, StickyRouter) for r in app.conf.task_routes)


_TWO_APPS = """
import json, os, tempfile
from celery import Celery
from celery_sticky import sticky_task

installed = Celery("installed", broker=os.environ["URL"], set_as_current=False)
prefix = os.environ["PREFIX"]
installed.conf.update(
    sticky_key_prefix=prefix, sticky_queue_prefix=prefix, sticky_state_dir=tempfile.mkdtemp()
)
plain = Celery("plain", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)

@sticky_task(key="order_id", app=installed)
def step(order_id, *, state):
    return None

@plain.task(shared=False)
def add(x, y):
    return x + y

report = {}
for app in (installed, plain):
    app.finalize()
    worker = app.WorkController(hostname=f"{app.main}@two-apps", pool_cls="solo", concurrency=1)
    report[app.main] = {
        "steps": sorted(worker.blueprint.steps),
        "routes": [type(r).__name__ for r in (app.conf.task_routes or ())],
        "tasks": sorted(t for t in app.tasks if t.startswith("celery_sticky")),
    }
print(json.dumps(report))
"""


def test_install_touches_only_its_app(prefix: str) -> None:
    """Two apps in one process: the one a sticky task binds to gets the router, the
    bootsteps and the library's own tasks; the other (an AMQP broker and no
    ``sticky_*`` settings) builds its worker as plain Celery."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "URL": os.environ["STICKY_TEST_REDIS_URL"], "PREFIX": f"{prefix}two"}
    out = subprocess.run(
        [sys.executable, "-c", _TWO_APPS],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    sticky_steps = [s for s in report["installed"]["steps"] if "celery_sticky" in s]
    assert "celery_sticky.worker.bootsteps.node.StickyWorker" in sticky_steps
    assert report["installed"]["routes"] == ["StickyRouter"]
    assert report["installed"]["tasks"] == ["celery_sticky.end_workflow", "celery_sticky.move_key"]
    assert [s for s in report["plain"]["steps"] if "celery_sticky" in s] == []
    assert report["plain"]["routes"] == []
    assert report["plain"]["tasks"] == []
