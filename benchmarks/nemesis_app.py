"""The Celery app the nemesis benchmark's workers run (``celery -A nemesis_app:app``).

Settings come from ``NEMESIS_*`` environment variables set by ``benchmarks/nemesis.py``;
the broker URL the workers use is the harness's proxy (``CELERY_BROKER_URL``, which
Celery prefers over the configured one). The probe tasks of
``celery_sticky.testing.nemesis`` are the workflow.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_sticky.testing.nemesis import register_probe


def make_app() -> Celery:
    prefix = os.environ["NEMESIS_PREFIX"]
    url = os.environ["NEMESIS_REDIS_URL"]
    broker = os.environ.get("NEMESIS_BROKER_URL") or url
    app = Celery(f"nemesis-{prefix}", broker=broker, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=f"{prefix}.default",
        sticky_redis_url=os.environ["NEMESIS_LEASE_URL"],
        sticky_key_prefix=prefix,
        sticky_secret=f"nemesis-{prefix}-hand-over-secret",
        sticky_queue_prefix=prefix,
        sticky_state_dir=os.environ["NEMESIS_STATE_DIR"],
        sticky_lease_ttl=float(os.environ.get("NEMESIS_LEASE_TTL", "3")),
        sticky_state_replication=os.environ.get("NEMESIS_REPLICATION", "sync"),
        sticky_gap_timeout=float(os.environ.get("NEMESIS_GAP_TIMEOUT", "30")),
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
    )
    if broker.startswith("amqp"):
        app.conf.broker_heartbeat = 2
        # A publish returns once RabbitMQ has the message: the producers' steps are
        # not lost in a cut connection unnoticed (the workers do this themselves).
        app.conf.broker_transport_options = {"confirm_publish": True}
    register_probe(app)
    return app


app = make_app() if "NEMESIS_PREFIX" in os.environ else Celery("nemesis-unconfigured")
