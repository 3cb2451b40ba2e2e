"""The ``Sticky metrics`` worker step, on when ``sticky_metrics_port`` is set.

Serves the worker's Prometheus metrics; the gauges (keys owned, gate queue,
local state bytes) are read at scrape time.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import bootsteps

from ... import metrics
from ...context import get_config
from ...errors import LeaseStoreUnavailable

logger = logging.getLogger(__name__)


class MetricsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    label = "Sticky metrics"
    requires = ("celery_sticky.worker.bootsteps.node:StickyWorker",)

    def include_if(self, worker: Any) -> bool:
        return get_config(worker.app).metrics_port is not None

    def start(self, worker: Any) -> None:
        step = worker.sticky
        node, gate = step.node, step.gate
        config = node.config

        def gauges() -> dict[str, float]:
            values: dict[str, float] = {
                "gate_busy_keys": gate.busy_keys(),
                "gate_waiting": gate.waiting(),
                "state_bytes": metrics.directory_bytes(step.state_directory),
            }
            with contextlib.suppress(LeaseStoreUnavailable):
                values["keys_owned"] = node.store.owned_count(node.name)
            return values

        assert config.metrics_port is not None
        if metrics.serve(config.metrics_port, config.metrics_address, gauges):
            logger.info("sticky: metrics on %s:%d", config.metrics_address, config.metrics_port)
        else:
            logger.warning(
                "sticky: sticky_metrics_port is set but prometheus_client is not "
                "installed: pip install 'celery-sticky[prometheus]'"
            )
