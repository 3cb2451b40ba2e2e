"""The state handle: a mapping on local diskcache, committed at success only."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from celery_sticky.state import StateHandle, open_cache
from tests.conftest import unique


@pytest.fixture
def cache(tmp_path: Path) -> Any:
    return open_cache(str(tmp_path), "node@test")


def test_mapping_api_reads_its_own_writes(cache: Any) -> None:
    state = StateHandle(cache, "order_id", "o1")
    assert state.get("items") is None and len(state) == 0 and "items" not in state
    state["items"] = [1]
    state.update(total=3, note="x")
    assert state.setdefault("total", 9) == 3
    del state["note"]
    assert state["items"] == [1] and "note" not in state
    assert sorted(state) == ["items", "total"] and dict(state.items()) == {"items": [1], "total": 3}
    with pytest.raises(KeyError):
        del state["missing"]
    with pytest.raises(TypeError, match="state fields are str"):
        state[1] = "x"  # type: ignore[index]


def test_writes_are_invisible_until_commit(cache: Any) -> None:
    writer = StateHandle(cache, "order_id", "o1")
    writer["items"] = ["a"]
    assert "items" not in StateHandle(cache, "order_id", "o1")
    writer.commit()
    reader = StateHandle(cache, "order_id", "o1")
    assert reader["items"] == ["a"] and list(reader.keys()) == ["items"]
    reader.clear()
    reader["fresh"] = 1
    reader.commit()
    assert dict(StateHandle(cache, "order_id", "o1")) == {"fresh": 1}


def test_keys_and_workflows_are_isolated(cache: Any) -> None:
    for workflow, key in [("order_id", "1"), ("order_id", "2"), ("invoice", "1")]:
        state = StateHandle(cache, workflow, key)
        state["who"] = f"{workflow}:{key}"
        state.commit()
    assert dict(StateHandle(cache, "invoice", "1")) == {"who": "invoice:1"}
    assert dict(StateHandle(cache, "order_id", "2")) == {"who": "order_id:2"}


def test_unpicklable_value_applies_nothing_and_names_the_field(cache: Any) -> None:
    state = StateHandle(cache, "order_id", "o1")
    state["good"] = 1
    state["lock"] = threading.Lock()
    with pytest.raises(TypeError, match="state field 'lock' of order_id:o1"):
        state.commit()
    assert dict(StateHandle(cache, "order_id", "o1")) == {}


def test_failed_task_leaves_no_trace(sticky_app: Any, cluster: Any) -> None:
    key = unique("fail")
    sticky_app.tasks["tests.cluster_app.record_step"].delay(key, 0).get(timeout=30)
    with pytest.raises(RuntimeError, match="fails after writing"):
        sticky_app.tasks["tests.cluster_app.write_then_fail"].delay(key).get(timeout=30)
    seen = sticky_app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
    assert seen["state"] == {"steps": [0]}
