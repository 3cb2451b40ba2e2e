"""The commit's SQL fast path (local/rows.py) stores exactly what diskcache's calls store.

Every test runs the same commits through a node whose commits go through
:class:`~celery_sticky.local.rows.Rows` and through one that uses diskcache's calls
only, and compares what a reader sees, what an export holds, and diskcache's own
bookkeeping (its row count and volume, kept by triggers, and its value files).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_sticky.local.handle import StateHandle
from celery_sticky.local.node_state import AlreadyApplied, NodeState
from celery_sticky.local.rows import supported
from celery_sticky.settings import StickyConfig

WORKFLOW = "order_id"


def _config(**settings: Any) -> StickyConfig:
    app = Celery("rows", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.update(settings)
    return StickyConfig.from_app(app)


def _pair(tmp_path: Path, **settings: Any) -> tuple[NodeState, NodeState]:
    """A node committing through rows, and one through diskcache's calls."""
    config = _config(**settings)
    fast = NodeState(str(tmp_path / "fast"), config)
    slow = NodeState(str(tmp_path / "slow"), config)
    assert fast._rows is not None, "diskcache's schema is not the one rows.py knows"
    slow._rows = None
    return fast, slow


def _files(store: NodeState) -> list[str]:
    """Value files diskcache keeps for ``store``."""
    found = []
    for root, _dirs, names in os.walk(store.directory):
        found += [os.path.join(root, name) for name in names if name.endswith(".val")]
    return found


def _settings(store: NodeState) -> dict[str, Any]:
    """diskcache's row count and value bytes, which its triggers keep."""
    rows = store.cache._sql("SELECT key, value FROM Settings WHERE key IN ('count', 'size')")
    return dict(rows.fetchall())


def _view(store: NodeState, key: str, task_ids: list[str]) -> Any:
    export = store.export_key(WORKFLOW, key)
    assert export is not None
    export.pop("last_commit")
    return (
        export,
        dict(StateHandle(store, WORKFLOW, key)),
        [store.applied(WORKFLOW, key, task_id) for task_id in task_ids],
        store.streams(WORKFLOW, key).as_dict(),
        len(store.cache),
        _settings(store),
        len(_files(store)),
    )


def test_the_fast_path_is_there() -> None:
    import diskcache

    assert supported(diskcache.Cache())


def test_random_commits_store_the_same_as_diskcache(tmp_path: Path) -> None:
    fast, slow = _pair(tmp_path, sticky_dedup_window=7)
    rng = random.Random(16)
    task_ids = []
    for number in range(60):
        task_id = f"t-{number}"
        task_ids.append(task_id)
        writes: dict[str, Any] = {}
        for _ in range(rng.randint(0, 3)):
            field = f"f{rng.randint(0, 6)}"
            size = rng.choice([10, 1_000, 40_000])  # 40 kB: in a file of its own
            writes[field] = rng.randbytes(size)
        deletes = {f"f{rng.randint(0, 6)}" for _ in range(rng.randint(0, 2))}
        stream, seq = ("p1", number + 1) if rng.random() < 0.7 else ("", 0)
        result = rng.randbytes(40_000) if number % 9 == 0 else number
        for store in (fast, slow):
            state = StateHandle(store, WORKFLOW, "k", task_id=task_id, epoch=3)
            for field in deletes:
                state.pop(field, None)
            state.update(writes)
            state.commit(result, stream=stream, seq=seq)
        assert _view(fast, "k", task_ids) == _view(slow, "k", task_ids), number
    assert fast.cache.check() == [] and slow.cache.check() == []
    for store in (fast, slow):
        store.close()


def test_a_refused_commit_leaves_no_file_and_no_row(tmp_path: Path) -> None:
    fast, _slow = _pair(tmp_path)
    first = StateHandle(fast, WORKFLOW, "k", task_id="t-1")
    first["big"] = b"x" * 50_000
    first.commit("done")
    before = (len(fast.cache), sorted(_files(fast)))
    again = StateHandle(fast, WORKFLOW, "k", task_id="t-1")
    again["big"] = b"y" * 50_000
    again["other"] = b"z" * 50_000
    with pytest.raises(AlreadyApplied):
        again.commit("again")
    assert (len(fast.cache), sorted(_files(fast))) == before
    assert StateHandle(fast, WORKFLOW, "k")["big"] == b"x" * 50_000
    # A replaced large value's old file goes with the commit that replaced it.
    later = StateHandle(fast, WORKFLOW, "k", task_id="t-2")
    later["big"] = b"small now"
    later.commit()
    assert _files(fast) == [] and fast.cache.check() == []


def test_an_ended_workflows_record_expires_and_the_id_applies_again(tmp_path: Path) -> None:
    fast, slow = _pair(tmp_path, sticky_finished_dedup_ttl=0.05)
    for store in (fast, slow):
        last = StateHandle(store, WORKFLOW, "k", task_id="t-end")
        last.finish()
        last.commit("ended")
        assert store.applied(WORKFLOW, "k", "t-end") == (True, "ended")
    import time

    time.sleep(0.1)
    for store in (fast, slow):
        assert store.applied(WORKFLOW, "k", "t-end") == (False, None)
        again = StateHandle(store, WORKFLOW, "k", task_id="t-end")
        again["n"] = 1
        again.commit("again")
        assert store.applied(WORKFLOW, "k", "t-end") == (True, "again")
        store.cache.expire()  # the record does not expire a second time
        assert store.applied(WORKFLOW, "k", "t-end") == (True, "again")
    assert _view(fast, "k", ["t-end"]) == _view(slow, "k", ["t-end"])


def test_a_commit_of_thousands_of_fields(tmp_path: Path) -> None:
    """More rows than one statement may take parameters for: SQLite's limit, as builds
    before 3.32 have it (999; this one may allow more)."""
    import sqlite3

    fast, slow = _pair(tmp_path)
    fast.cache._con.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    fields = {f"f{i}": i for i in range(6_000)}
    for store in (fast, slow):
        load = StateHandle(store, WORKFLOW, "k", task_id="load")
        load.update(fields)
        load.commit()
        change = StateHandle(store, WORKFLOW, "k", task_id="change")
        change.update({f"f{i}": -i for i in range(0, 6_000, 2)})
        for i in range(1, 6_000, 4):
            del change[f"f{i}"]
        change.commit()
    assert _view(fast, "k", ["load", "change"]) == _view(slow, "k", ["load", "change"])
