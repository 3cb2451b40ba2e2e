"""A node's record layout (local/node_state.py): which rows a commit touches, and what
opening a directory another build wrote does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diskcache
import pytest
from celery import Celery

from celery_sticky.errors import StateDirError
from celery_sticky.local.handle import StateHandle
from celery_sticky.local.node_state import LAYOUT, LAYOUT_KEY, NodeState
from celery_sticky.settings import StickyConfig

WORKFLOW = "order_id"


def _config(**settings: Any) -> StickyConfig:
    app = Celery("layout", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.update(settings)
    return StickyConfig.from_app(app)


def _kinds(store: NodeState) -> set[str]:
    return {record[0] for record in store.cache.iterkeys()}


@pytest.mark.parametrize("fast", [True, False], ids=["rows", "diskcache-calls"])
def test_a_key_keeps_versions_and_streams_in_its_value_and_meta_rows(
    tmp_path: Path, fast: bool
) -> None:
    store = NodeState(str(tmp_path / "node"), _config(sticky_dedup_window=3))
    if not fast:
        store._rows = None
    for number in range(1, 8):
        state = StateHandle(store, WORKFLOW, "k", task_id=f"t-{number}", epoch=2)
        state["total"] = number
        state[f"f{number % 2}"] = b"x" * 70_000  # in a file, and in the memory tier
        state.commit(number, stream="p1", seq=number)
    # Fields, their index, the meta row, applied records and their numbers: no row of
    # a version or of the streams on their own.
    assert _kinds(store) == {"v", "i", "k", "a", "s", LAYOUT_KEY}
    assert len([r for r in store.cache.iterkeys() if r[0] == "v"]) == 3
    assert len([r for r in store.cache.iterkeys() if r[0] == "a"]) == 3  # the window
    assert store.streams(WORKFLOW, "k").as_dict() == {"p1": 7}
    assert store.applied_count(WORKFLOW, "k") == 7 and store.epoch(WORKFLOW, "k") == 2
    # A read answers from the memory tier while the version in the value row stands.
    first = StateHandle(store, WORKFLOW, "k")["f1"]
    assert StateHandle(store, WORKFLOW, "k")["f1"] is first
    later = StateHandle(store, WORKFLOW, "k", task_id="t-8")
    later["f1"] = b"y" * 70_000
    later.commit()
    assert StateHandle(store, WORKFLOW, "k")["f1"] == b"y" * 70_000
    assert store.streams(WORKFLOW, "k").as_dict() == {"p1": 7}
    store.consume(WORKFLOW, "k", "p2", 1)  # a number done without a commit
    assert store.streams(WORKFLOW, "k").as_dict() == {"p1": 7, "p2": 1}
    assert StateHandle(store, WORKFLOW, "k")["total"] == 7
    assert store.cache.check() == []
    store.close()


def test_an_empty_directory_gets_the_layout_and_opens_again(tmp_path: Path) -> None:
    config = _config()
    NodeState(str(tmp_path / "node"), config).close()
    store = NodeState(str(tmp_path / "node"), config)
    assert store.cache.get(LAYOUT_KEY) == LAYOUT
    store.close()


@pytest.mark.parametrize("layout", [None, LAYOUT + 1], ids=["earlier-build", "later-build"])
def test_a_directory_another_layout_wrote_is_refused_and_kept(
    tmp_path: Path, layout: int | None
) -> None:
    directory = tmp_path / "node"
    with diskcache.Cache(str(directory)) as cache:
        cache.set("k1:w1:k", (4, 1.0, 2))  # a key's meta row as an earlier build wrote it
        if layout is not None:
            cache.set(LAYOUT_KEY, layout)
    with pytest.raises(StateDirError) as caught:
        NodeState(str(directory), _config())
    assert str(directory) in str(caught.value)
    assert f"layout {layout or 1}" in str(caught.value)
    with diskcache.Cache(str(directory)) as cache:  # nothing was written or removed
        assert cache.get("k1:w1:k") == (4, 1.0, 2) and cache.get(LAYOUT_KEY) == layout
