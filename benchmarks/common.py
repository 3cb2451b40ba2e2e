"""What the benchmark scripts share: an argument type, the Redis they run against,
the worker app module, a progress log."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
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


def app_module() -> ModuleType:
    """``failover_app``, imported the way the workers import it (from this directory)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("failover_app")


def log(message: str) -> None:
    """A progress line on stderr (stdout holds the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
