"""Exactly-once state effects of sticky tasks, on real workers."""

from __future__ import annotations

from typing import Any

from tests.conftest import unique


def test_a_republished_task_id_applies_once_and_returns_the_first_result(
    sticky_app: Any, cluster: Any, events: Any
) -> None:
    task = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("dup")
    assert task.apply_async((key, 0), task_id=f"{key}-0").get(timeout=30) == [0]
    assert task.delay(key, 1).get(timeout=30) == [0, 1]
    # The same id again, after later steps: it does not run, and answers [0] as before.
    assert task.apply_async((key, 0), task_id=f"{key}-0").get(timeout=30) == [0]
    assert task.delay(key, 2).get(timeout=30) == [0, 1, 2]
    assert [e["step"] for e in events(key)] == [0, 1, 2]


def test_a_retried_task_applies_only_its_last_run(sticky_app: Any, cluster: Any) -> None:
    key = unique("retry")
    assert sticky_app.tasks["tests.cluster_app.retry_once"].delay(key).get(timeout=30) == 1
    state = sticky_app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
    assert state["state"] == {"runs": 1}


def test_outbox_messages_leave_after_the_commit(sticky_app: Any, cluster: Any, events: Any) -> None:
    key, target = unique("fan"), unique("target")
    ids = sticky_app.tasks["tests.cluster_app.fan_out"].delay(key, target, 3).get(timeout=30)
    results = [sticky_app.AsyncResult(i).get(timeout=30) for i in ids]
    assert results[-1] == [0, 1, 2]
    assert [e["step"] for e in events(target)] == [0, 1, 2]
