"""``@sticky_task``: registration, argument checking, bad input at the call site."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery

from celery_sticky import ConfigurationError, InvalidKeyError, LeaseStoreUnavailable, install
from celery_sticky.app import router_of
from celery_sticky.router import StickyRouter
from celery_sticky.task import StickyTask, sticky_task


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
    install(app)
    routes = app.conf.task_routes
    assert sum(isinstance(r, StickyRouter) for r in routes) == 1
    assert routes[1] == {"other.*": {"queue": "other"}}
    assert [s for s in app.steps["worker"] if s.__name__ == "StickyWorker"] != []
    assert len(app.steps["worker"]) == 1 and len(app.steps["consumer"]) == 1


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
    from celery_sticky.settings import get_config

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
