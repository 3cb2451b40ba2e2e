"""The ``Sticky metrics`` worker step: on with ``sticky_metrics_port`` or
``celery worker --sticky-metrics-port``.

It turns the metrics on in the worker's main process when the step is made,
which is before the pool forks, so that pool processes count in
prometheus_client's multiprocess mode (see :mod:`celery_sticky.metrics`); it
serves them all once the worker starts. The gauges (keys owned, gate queue,
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

    def __init__(self, worker: Any, sticky_metrics_port: int | None = None, **kwargs: Any):
        super().__init__(worker, **kwargs)
        self.port = sticky_metrics_port or get_config(worker.app).metrics_port
        self.enabled = False
        if self.port is None:
            return
        if not metrics.available():
            logger.warning(
                "sticky: a metrics port is set but prometheus_client is not installed: "
                "pip install 'celery-sticky[prometheus]'"
            )
            return
        directory = metrics.enable()
        self.enabled = True
        logger.debug("sticky: metrics of every process of this worker in %s", directory)

    def include_if(self, worker: Any) -> bool:
        return self.enabled

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

        assert self.port is not None
        metrics.serve(self.port, config.metrics_address, gauges)
        logger.info("sticky: metrics on %s:%d", config.metrics_address, self.port)
