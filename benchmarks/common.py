"""What the benchmark scripts share: an argument type and the Redis they run against."""

from __future__ import annotations

import argparse
import os
import traceback
from collections.abc import Callable
from typing import Any

from celery_sticky.testing import redis_at


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` greater than 0."""

    def convert(value: str) -> int | float:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"{value} is not greater than 0")
        return number

    return convert


def against_redis(default_url: str, bench: Callable[[str], None]) -> int:
    """Run ``bench(url)`` against ``BENCH_REDIS_URL`` (or an embedded Redis when none
    answers there); 0 when it ran, 1 (with the traceback printed) when it failed."""
    try:
        with redis_at(os.environ.get("BENCH_REDIS_URL", default_url)) as url:
            bench(url)
    except Exception:
        traceback.print_exc()
        return 1
    return 0
