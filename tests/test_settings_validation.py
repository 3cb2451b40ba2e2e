"""Every setting is checked at worker start and at the first publish, with one line
naming the setting, the value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from celery import Celery

from celery_sticky import sticky_task
from celery_sticky.errors import ConfigurationError
from celery_sticky.settings import StickyConfig
from tests.conftest import REPO

BAD: list[tuple[dict[str, Any], str]] = [
    ({"sticky_lease_ttl": float("nan")}, "sticky_lease_ttl=nan: must be a finite number"),
    ({"sticky_lease_ttl": float("inf")}, "sticky_lease_ttl=inf: must be a finite number"),
    ({"sticky_lease_ttl": True}, "sticky_lease_ttl=True: must be a finite number"),
    ({"sticky_lease_ttl": "ten"}, "sticky_lease_ttl='ten': must be a finite number"),
    ({"sticky_idle_timeout": float("inf")}, "sticky_idle_timeout=inf"),
    ({"sticky_lease_cache_ttl": 30.0}, "sticky_lease_cache_ttl=30.0 must be at most"),
    ({"sticky_handoff_store": "no.such.Store"}, "sticky_handoff_store='no.such.Store': cannot"),
    ({"sticky_handoff_store": "dir:"}, "sticky_handoff_store='dir:': dir: must be followed"),
    ({"sticky_handoff_store": "dir:relative/x"}, "an absolute directory path"),
    ({"sticky_handoff_store": "nothing"}, "sticky_handoff_store='nothing': must be a dotted"),
    ({"sticky_on_state_lost": "no.such.func"}, "sticky_on_state_lost='no.such.func': cannot"),
    ({"sticky_on_state_lost": "os.sep"}, "sticky_on_state_lost='os.sep': names"),
    ({"sticky_state_dir": "relative/state"}, "sticky_state_dir='relative/state': must be an"),
    ({"sticky_metrics_port": 70000}, "sticky_metrics_port=70000: must be a port number"),
    ({"sticky_max_hops": 2.5}, "sticky_max_hops=2.5: must be a whole number"),
    ({"sticky_dedup_window": False}, "sticky_dedup_window=False: must be"),
    ({"sticky_redis_url": "http://x"}, "sticky_redis_url='http://x': must be a Redis URL"),
    ({"sticky_redis_url": "sentinel://h:26379"}, "sentinel:// URL without a master name"),
    (
        {"sticky_redis_url": "redis://user:hunter22@h:1/0", "sticky_lease_ttl": -1},
        "sticky_lease_ttl=-1",
    ),
]


def _conf(settings: dict[str, Any]) -> Any:
    app = Celery("settings", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.update(settings)
    return app.conf


@pytest.mark.parametrize(("settings", "message"), BAD, ids=[str(s) for s, _ in BAD])
def test_bad_setting_is_one_line(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        StickyConfig.from_conf(_conf(settings))
    text = str(raised.value)
    assert message in text
    assert "\n" not in text
    assert "hunter22" not in text


def test_good_settings_pass() -> None:
    config = StickyConfig.from_conf(
        _conf(
            {
                "sticky_handoff_store": "dir:/srv/copies/../copies",
                "sticky_on_state_lost": "tests.cluster_app.rebuild_lost_state",
                "sticky_state_dir": "~/state",
                "sticky_lease_cache_ttl": 10.0,
                "broker_transport_options": {"master_name": "mymaster"},
                "sticky_redis_url": "sentinel://h1:26379;sentinel://h2:26379/2",
            }
        )
    )
    assert config.handoff_store == "dir:/srv/copies"
    assert os.path.isabs(config.state_dir)
    assert config.redis_url.endswith("/2?master_name=mymaster")


def test_checked_at_the_first_publish() -> None:
    app = Celery("publish", broker="memory://", set_as_current=False)
    app.conf.update(sticky_redis_url="redis://127.0.0.1:1/0", sticky_lease_ttl=float("nan"))

    @sticky_task(app=app, key="order_id")
    def step(order_id: str) -> None: ...

    with pytest.raises(ConfigurationError, match="sticky_lease_ttl=nan"):
        step.delay("o-1")


def test_checked_at_worker_start(tmp_path: Any) -> None:
    env = {
        **os.environ,
        "STICKY_TEST_PREFIX": "hbadsetting",
        "STICKY_TEST_LEASE_TTL": "nan",
        "STICKY_TEST_STATE_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.cluster_app:app",
            "worker",
            "-n",
            "bad@hostile-tests",
            "-P",
            "solo",
            "--without-gossip",
            "--without-mingle",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=120,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "sticky_lease_ttl=nan: must be a finite number greater than 0" in output, output
