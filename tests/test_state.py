"""The state handle: a mapping on local diskcache, committed at success only."""

from __future__ import annotations

import pickle
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_sticky.errors import StateSizeLimitError
from celery_sticky.local.handle import StateHandle, outbox_task_id
from celery_sticky.local.node_state import AlreadyApplied, NodeState
from celery_sticky.settings import StickyConfig
from tests.conftest import unique


def _config(**settings: Any) -> StickyConfig:
    app = Celery("state", broker="redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.update(settings)
    return StickyConfig.from_app(app)


@pytest.fixture
def cache(tmp_path: Path) -> Any:
    store = NodeState(str(tmp_path / "node@test"), _config())
    yield store
    store.close()


def handle(store: NodeState, workflow: str = "order_id", key: str = "o1") -> StateHandle:
    return StateHandle(store, workflow, key, task_id=uuid.uuid4().hex)


def test_mapping_api_reads_its_own_writes(cache: Any) -> None:
    state = handle(cache)
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
    writer = handle(cache)
    writer["items"] = ["a"]
    assert "items" not in handle(cache)
    writer.commit()
    reader = handle(cache)
    assert reader["items"] == ["a"] and list(reader.keys()) == ["items"]
    reader.clear()
    reader["fresh"] = 1
    reader.commit()
    assert dict(handle(cache)) == {"fresh": 1}


def test_keys_and_workflows_are_isolated(cache: Any) -> None:
    for workflow, key in [("order_id", "1"), ("order_id", "2"), ("invoice", "1")]:
        state = handle(cache, workflow, key)
        state["who"] = f"{workflow}:{key}"
        state.commit()
    assert dict(handle(cache, "invoice", "1")) == {"who": "invoice:1"}
    assert dict(handle(cache, "order_id", "2")) == {"who": "order_id:2"}


def test_unpicklable_value_applies_nothing_and_names_the_field(cache: Any) -> None:
    state = handle(cache)
    state["good"] = 1
    state["lock"] = threading.Lock()
    with pytest.raises(TypeError, match="state field 'lock' of order_id:o1"):
        state.commit()
    assert dict(handle(cache)) == {}
    assert cache.applied("order_id", "o1", state.task_id) == (False, None)


def test_an_applied_task_id_applies_nothing_again(cache: Any) -> None:
    first = StateHandle(cache, "order_id", "o1", task_id="t-1")
    first["n"] = 1
    first.commit(result="first result")
    assert cache.applied("order_id", "o1", "t-1") == (True, "first result")
    again = StateHandle(cache, "order_id", "o1", task_id="t-1")
    again["n"] = 2
    with pytest.raises(AlreadyApplied) as info:
        again.commit(result="second result")
    assert info.value.result == "first result"
    assert handle(cache)["n"] == 1


def test_applied_records_are_trimmed_to_the_window(tmp_path: Path) -> None:
    store = NodeState(str(tmp_path / "n"), _config(sticky_dedup_window=3))
    for i in range(5):
        state = StateHandle(store, "order_id", "o1", task_id=f"t-{i}")
        state["i"] = i
        state.commit(result=i)
    applied = [store.applied("order_id", "o1", f"t-{i}")[0] for i in range(5)]
    assert applied == [False, False, True, True, True]
    store.close()


def test_finish_deletes_the_key_but_remembers_the_last_task(cache: Any) -> None:
    for i in range(3):
        state = StateHandle(cache, "order_id", "o1", task_id=f"t-{i}")
        state["i"] = i
        state.commit(result=i)
    last = StateHandle(cache, "order_id", "o1", task_id="t-end")
    last.finish()
    last.commit(result="done")
    assert dict(handle(cache)) == {} and cache.last_commit("order_id", "o1") is None
    assert [cache.applied("order_id", "o1", f"t-{i}")[0] for i in range(3)] == [False] * 3
    assert cache.applied("order_id", "o1", "t-end") == (True, "done")


def test_outbox_is_kept_with_the_commit_until_sent(cache: Any) -> None:
    from celery import signature

    state = StateHandle(cache, "order_id", "o1", task_id="t-1")
    first = state.publish(signature("some.task", args=(1,)))
    second = state.publish(signature("some.task", args=(2,)))
    assert first == outbox_task_id("t-1", 0) != second
    state.commit()
    assert cache.pending_outboxes() == [("order_id", "o1", "t-1")]
    assert [m["options"]["task_id"] for m in cache.outbox("order_id", "o1", "t-1")] == [
        first,
        second,
    ]
    cache.outbox_sent("order_id", "o1", "t-1")
    assert cache.pending_outboxes() == []


def test_failed_task_publishes_nothing(cache: Any) -> None:
    from celery import signature

    state = StateHandle(cache, "order_id", "o1", task_id="t-1")
    state.publish(signature("some.task"))
    state.discard()
    state.commit()
    assert cache.pending_outboxes() == []


def test_size_limit_refuses_the_commit_and_names_the_setting(tmp_path: Path) -> None:
    store = NodeState(str(tmp_path / "n"), _config(sticky_state_size_limit=200_000))
    state = handle(store)
    state["blob"] = b"x" * 500_000
    with pytest.raises(StateSizeLimitError, match="sticky_state_size_limit=200000"):
        state.commit()
    assert dict(handle(store)) == {}
    store.close()


def test_memory_tier_serves_an_unchanged_large_value_without_unpickling(cache: Any) -> None:
    big = list(range(100_000))  # ~ 500 kB pickled: above the 64 kB threshold
    writer = handle(cache)
    writer["big"] = big
    writer["small"] = 1
    writer.commit()
    assert handle(cache)["big"] is big  # the committed object itself
    other = NodeState(cache.directory, cache.config)  # as another pool process would
    replacement = handle(other)
    replacement["big"] = [1, 2, 3]
    replacement.commit()
    assert handle(cache)["big"] == [1, 2, 3], "a changed version is read again"
    other.close()


def test_failed_task_drops_the_shared_values_it_read(cache: Any) -> None:
    writer = handle(cache)
    writer["big"] = list(range(100_000))
    writer.commit()
    reader = handle(cache)
    value = reader["big"]
    value.append("mutated in place")
    reader.discard()
    assert handle(cache)["big"][-1] == 99_999


def test_failed_task_leaves_no_trace(sticky_app: Any, cluster: Any) -> None:
    key = unique("fail")
    sticky_app.tasks["tests.cluster_app.record_step"].delay(key, 0).get(timeout=30)
    with pytest.raises(RuntimeError, match="fails after writing"):
        sticky_app.tasks["tests.cluster_app.write_then_fail"].delay(key).get(timeout=30)
    seen = sticky_app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
    assert seen["state"] == {"steps": [0]}


class WriteSpy:
    """Records the values a ``NodeState``'s cache writes (``set`` and ``add``)."""

    def __init__(self, store: NodeState, monkeypatch: pytest.MonkeyPatch) -> None:
        self.values: list[Any] = []
        for name in ("set", "add"):
            original = getattr(store.cache, name)

            def spy(key: Any, value: Any, *args: Any, _original: Any = original, **kw: Any) -> Any:
                self.values.append(value)
                return _original(key, value, *args, **kw)

            monkeypatch.setattr(store.cache, name, spy)

    def take(self) -> tuple[int, int]:
        """(how many writes, how many bytes) since the last call."""
        sizes = [len(v) if isinstance(v, bytes) else len(pickle.dumps(v)) for v in self.values]
        self.values.clear()
        return len(sizes), sum(sizes)


def test_a_commit_that_adds_no_field_leaves_the_field_index_alone(
    cache: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"field-{i:05d}" for i in range(5000)]  # an index of ~70 kB pickled
    loader = handle(cache, key="many")
    loader.update(dict.fromkeys(names, b"x"))
    loader.commit()
    one = handle(cache, key="one")
    one[names[0]] = b"x"
    one.commit()
    spy = WriteSpy(cache, monkeypatch)
    costs = {}
    for key in ("many", "one"):
        step = handle(cache, key=key)
        step[names[0]] = b"changed"
        step["scratch"] = 1
        del step["scratch"]  # set and deleted by the same task: never on disk
        step.commit()
        costs[key] = spy.take()
    assert costs["many"][1] < 2_000, f"the commit wrote {costs['many'][1]} bytes"
    assert costs["many"] == costs["one"], "the commit's writes grow with the key's fields"
    assert cache.fields("order_id", "many") == tuple(names)
    assert handle(cache, key="many")[names[0]] == b"changed"


def test_adding_and_removing_fields_keeps_the_index_exact(cache: Any) -> None:
    first = handle(cache)
    first.update(a=1, b=2, c=3)
    first.commit()
    step = handle(cache)
    step["d"] = 4
    del step["b"]
    step["b"] = 5  # deleted, then written again: an update of an existing field
    del step["c"]
    step.commit()
    assert cache.fields("order_id", "o1") == ("a", "b", "d")
    assert dict(handle(cache)) == {"a": 1, "b": 5, "d": 4}
    cleared = handle(cache)
    cleared.clear()
    cleared["d"] = 6
    cleared["e"] = 7
    cleared.commit()
    assert cache.fields("order_id", "o1") == ("d", "e")
    assert dict(handle(cache)) == {"d": 6, "e": 7}
    for field in ("d", "e"):
        del (emptied := handle(cache))[field]
        emptied.commit()
    assert cache.fields("order_id", "o1") == () and dict(handle(cache)) == {}


TRICKY = [
    ("order_id", "1:x"),
    ("order_id", "1"),
    ("order_id", "x1:x"),
    ("order_id.v2", "k"),
    ("order_id", "\ud800 lone surrogate"),
    ("order_id", "ünïcode ✓"),
]


def test_keys_fields_and_task_ids_never_collide(cache: Any) -> None:
    for number, (workflow, key) in enumerate(TRICKY):
        state = StateHandle(cache, workflow, key, task_id=f"1:{key}", epoch=number + 1)
        state[key] = key
        state[f"1:{key}"] = number
        state.commit(result=key, epoch=number + 1)
    for number, (workflow, key) in enumerate(TRICKY):
        assert dict(handle(cache, workflow, key)) == {key: key, f"1:{key}": number}
        assert cache.applied(workflow, key, f"1:{key}") == (True, key)
        assert cache.epoch(workflow, key) == number + 1
    expected = sorted((w, k, n + 1) for n, (w, k) in enumerate(TRICKY))
    assert sorted(cache.local_keys()) == expected


def test_export_import_and_reset_carry_the_key_over(tmp_path: Path) -> None:
    source = NodeState(str(tmp_path / "a"), _config())
    target = NodeState(str(tmp_path / "b"), _config())
    workflow, key = "order_id", "\ud800:1"
    for i in range(3):
        state = StateHandle(source, workflow, key, task_id=f"t-{i}", epoch=7)
        state[f"f{i}"] = i
        state.commit(result=i)
    data = source.export_key(workflow, key)
    assert data is not None and data["epoch"] == 7 and data["seq"] == 3
    assert source.last_commit(workflow, key) == data["last_commit"] is not None
    target.import_key(workflow, key, data, 8)
    assert dict(handle(target, workflow, key)) == {"f0": 0, "f1": 1, "f2": 2}
    assert target.applied(workflow, key, "t-1") == (True, 1)
    assert target.epoch(workflow, key) == 8 and target.local_keys() == [(workflow, key, 8)]
    assert target.last_commit(workflow, key) == data["last_commit"]
    state = StateHandle(target, workflow, key, task_id="t-3", epoch=8)
    state["f3"] = 3
    state.commit(result=3)
    assert target.export_key(workflow, key)["seq"] == 4  # type: ignore[index]
    assert target.reset_key(workflow, key, 9) is True
    assert dict(handle(target, workflow, key)) == {} and target.epoch(workflow, key) == 9
    assert target.applied(workflow, key, "t-3") == (False, None)
    assert target.reset_key("order_id", "never-seen", 1) is False
    source.delete_key(workflow, key)
    assert source.epoch(workflow, key) is None and source.export_key(workflow, key) is None
    assert source.local_keys() == []
    source.close()
    target.close()
