"""Supervised background threads: a Redis answer never ends one.

The worker's threads that talk to the lease store (the reaper, the start-up
cleanup; the heartbeat has its own loop in :mod:`celery_sticky.worker.node`)
run their step through :func:`supervise`: any exception is logged (a
:class:`~celery_sticky.errors.LeaseStoreUnavailable` briefly: the store is away
now, which is expected) and the step runs again after a backoff that doubles up
to a cap, with jitter, so workers that lost the store together do not come back
in lockstep. Only the stop event ends the thread.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable

from ..errors import LeaseStoreUnavailable

logger = logging.getLogger(__name__)


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait after ``failures`` failures in a row: doubling, capped, jittered."""
    delay = min(cap, base * 2 ** max(failures - 1, 0))
    return float(delay * random.uniform(0.5, 1.0))


def supervise(
    name: str,
    step: Callable[[], bool | None],
    stop: threading.Event,
    *,
    interval: float,
    cap: float = 30.0,
    first_delay: float | None = None,
) -> threading.Thread:
    """Start a daemon thread running ``step`` every ``interval`` seconds until ``stop``.

    ``step`` returning True ends the thread (its work is done); raising backs off
    (from ``interval``, doubling up to ``cap``, jittered) and tries again.
    """

    def run() -> None:
        failures = 0
        delay = interval if first_delay is None else first_delay
        while not stop.wait(delay):
            try:
                done = step()
            except LeaseStoreUnavailable as exc:
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning("sticky: %s paused (%d): %s", name, failures, exc)
            except Exception:
                failures += 1
                logger.exception("sticky: %s failed (%d); it goes on", name, failures)
            else:
                if failures:
                    logger.info("sticky: %s goes on after %d failure(s)", name, failures)
                failures = 0
                if done:
                    return
            delay = backoff(failures, interval, cap) if failures else interval

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
