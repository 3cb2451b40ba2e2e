"""The node's lease clock (:mod:`celery_sticky.worker.lease_clock`) across processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from celery_sticky.worker.lease_clock import LeaseClock, open_lease_clock

_READER = """
import sys
from celery_sticky.worker.lease_clock import open_lease_clock
clock = open_lease_clock(sys.argv[1])
print(clock.holds(int(sys.argv[2])) if clock is not None else "absent")
"""


def _holds_in_another_process(directory: Path, chain: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _READER, str(directory), str(chain)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_another_process_reads_what_the_main_process_wrote(tmp_path: Path) -> None:
    """A pool process sees the chain and the deadline the main process wrote: a proof
    of that chain holds until the deadline, one of another chain never; a directory
    without a clock means "ask the store"."""
    assert _holds_in_another_process(tmp_path, 5) == "absent"
    clock = LeaseClock(tmp_path / "lease-clock", create=True)
    assert clock.read() == (0, 0.0)
    clock.write(5, time.monotonic() + 60)
    assert _holds_in_another_process(tmp_path, 5) == "True"
    assert _holds_in_another_process(tmp_path, 6) == "False", "another chain held"
    assert _holds_in_another_process(tmp_path, 0) == "False", "no chain held"
    clock.write(5, time.monotonic() - 0.001)
    assert _holds_in_another_process(tmp_path, 5) == "False", "past its deadline"
    reader = open_lease_clock(tmp_path)
    assert reader is not None and reader.read()[0] == 5
    restarted = LeaseClock(tmp_path / "lease-clock", create=True)  # the node's next run
    assert reader.read() == (0, 0.0), "a previous run's record was kept"
    restarted.close()
