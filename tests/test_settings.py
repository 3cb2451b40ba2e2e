"""Settings: defaults, validation naming the setting, the broker fallback."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_sticky.errors import ConfigurationError
from celery_sticky.lease.store import redact_url
from celery_sticky.settings import SETTINGS, StickyConfig


def _app(**conf: object) -> Celery:
    app = Celery("settings", broker="redis://127.0.0.1:6379/3", set_as_current=False)
    app.conf.update(conf)
    return app


def test_defaults() -> None:
    config = StickyConfig.from_app(_app())
    assert config.redis_url == "redis://127.0.0.1:6379/3"
    assert config.lease_ttl == 10.0 and config.heartbeat_interval == 2.5
    assert config.direct_queue_name("w1@h") == "sticky.w1@h"
    assert config.placement == "least_loaded"
    assert config.state_dir.endswith("celery-sticky")


def test_config_from_object_values_win() -> None:
    class Conf:
        sticky_lease_ttl = 4
        sticky_queue_prefix = "orders"

    app = Celery("conf", broker="redis://127.0.0.1:6379/3", set_as_current=False)
    app.config_from_object(Conf)
    config = StickyConfig.from_app(app)
    assert (config.lease_ttl, config.heartbeat_interval, config.queue_prefix) == (4, 1, "orders")


@pytest.mark.parametrize(
    ("conf", "named"),
    [
        ({"sticky_lease_ttl": -1}, "sticky_lease_ttl=-1"),
        ({"sticky_lease_ttl": "soon"}, "sticky_lease_ttl='soon'"),
        ({"sticky_heartbeat_interval": 6}, "sticky_heartbeat_interval=6"),
        ({"sticky_placement": "nearest"}, "sticky_placement='nearest'"),
        ({"sticky_queue_prefix": "a b"}, "sticky_queue_prefix='a b'"),
        ({"sticky_max_hops": 0}, "sticky_max_hops=0"),
    ],
)
def test_bad_settings_are_named(conf: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named.replace("(", r"\(")):
        StickyConfig.from_app(_app(**conf))


def test_every_setting_is_documented() -> None:
    for setting in SETTINGS:
        assert setting.doc and setting.key.startswith("sticky_")
    assert {s.name for s in SETTINGS} == set(StickyConfig.__dataclass_fields__)


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert redact_url("redis://h/0") == "redis://h/0"
