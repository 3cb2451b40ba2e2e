"""The canvas with sticky tasks on real workers: chords, links, retries, countdowns."""

from __future__ import annotations

import time
from typing import Any

from celery import chord

from tests.conftest import unique
from tests.invariants import violations


def test_chord_header_by_key_and_sticky_body(sticky_app: Any, cluster: Any, events: Any) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    body = sticky_app.tasks["tests.cluster_app.sticky_collect"]
    keys = [unique("chord") for _ in range(6)]
    for key in keys:
        step.delay(key, 0).get(timeout=30)
    owners = {key: events(key)[0]["node"] for key in keys}
    target = keys[0]
    result = chord(step.si(key, 1) for key in keys)(body.s(target)).get(timeout=60)
    assert sorted(result) == sorted([[0, 1]] * 6)
    for key in keys:
        assert [e["node"] for e in events(key) if e["step"] != "collect"] == [owners[key]] * 2
    collected = [e for e in events(target) if e["step"] == "collect"]
    assert [e["node"] for e in collected] == [owners[target]], "the body ran on its key's owner"


def test_link_and_link_error(sticky_app: Any, cluster: Any, events: Any) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    failing = sticky_app.tasks["tests.cluster_app.write_then_fail"]
    key = unique("link")
    step.apply_async((key, 0), link=step.si(key, 1)).get(timeout=30)
    deadline = time.monotonic() + 30
    while len(events(key)) < 2:
        assert time.monotonic() < deadline, "the linked step never ran"
        time.sleep(0.05)
    failing.apply_async((key,), link_error=step.si(key, 2))
    while len(events(key)) < 3:
        assert time.monotonic() < deadline, "the error callback never ran"
        time.sleep(0.05)
    assert violations(events(key), {key: [0, 1, 2]}) == []
    state = sticky_app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
    assert state["state"] == {"steps": [0, 1, 2]}, "the failed task wrote nothing"


def test_retry_stays_with_the_owner(sticky_app: Any, cluster: Any, events: Any) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("retry")
    step.delay(key, 0).get(timeout=30)
    owner = events(key)[0]["node"]
    assert sticky_app.tasks["tests.cluster_app.retry_once"].delay(key).get(timeout=30) == 1
    seen = sticky_app.tasks["tests.cluster_app.read_state"].delay(key).get(timeout=30)
    assert seen["node"] == owner and seen["state"]["runs"] == 1


def test_countdowns_keep_their_order_and_do_not_block_other_keys(
    sticky_app: Any, cluster: Any, events: Any
) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    key, other = unique("eta"), unique("free")
    step.delay(key, 0).get(timeout=30)
    published = time.time()
    later = [
        step.apply_async((key, 1), countdown=3.0),
        step.apply_async((key, 2), countdown=3.5),
    ]
    step.delay(other, 0).get(timeout=30)
    assert events(other)[0]["end"] - published < 2.5, "a countdown blocked another key"
    for result in later:
        result.get(timeout=30)
    runs = events(key)
    assert [e["step"] for e in runs] == [0, 1, 2]
    assert runs[1]["start"] - published >= 3.0 and runs[2]["start"] - published >= 3.5
    assert violations(runs, {key: [0, 1, 2]}) == []
