"""Fuzz: a few thousand random and mutated sticky headers and bodies, fed to one
real worker. It must stay up, and every message must be accounted for: run (its
result is SUCCESS or FAILURE), dead-lettered, or parked in an affinity queue for a
worker with tags that does not exist. Nothing else may be lost."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile import ABSENT, HostileRun, broker_client, dead_ids, publish_raw, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("STICKY_TEST_BROKER_URL", "").startswith("amqp"),
    reason="the fuzzer publishes raw headers with integers AMQP cannot encode "
    "(struct.error in amqp); it runs against the Redis broker",
)

NODE = "fz1@hostile-tests"
MESSAGES = int(os.environ.get("STICKY_FUZZ_MESSAGES", "2000"))
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(["k1", "k2", "k3"]) | st.text(min_size=1, max_size=300)
field_values = [
    st.sampled_from(["key", "other_wf", "..", "bad name", ""]) | json_value,  # workflow
    keys | json_value,  # key
    st.integers(min_value=-5, max_value=2**64) | json_value,  # epoch
    st.integers(min_value=-5, max_value=10) | json_value,  # hops
    st.integers(min_value=-5, max_value=2**64) | json_value,  # sent
    st.sampled_from(["", "zone=fuzz", "zone=fuzz,a=b", "nope", "b=1,a=2"]) | json_value,
]


@st.composite
def headers(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["absent", "none", "random", "mutated", "valid"]))
    if kind == "absent":
        return ABSENT
    if kind == "none":
        return None
    if kind == "random":
        return draw(json_value)
    valid = ["key", draw(st.sampled_from(["k1", "k2", "k3"])), 0, 0, 1, ""]
    if kind == "valid":
        return valid[: draw(st.integers(min_value=4, max_value=6))]
    mutated = list(valid)
    for index in draw(st.sets(st.integers(min_value=0, max_value=5), min_size=1)):
        mutated[index] = draw(field_values[index])
    return mutated[: draw(st.integers(min_value=0, max_value=8))]


@st.composite
def bodies(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["valid", "valid", "args", "json", "text"]))
    if kind == "valid":
        return json.dumps([[draw(keys), draw(st.integers(0, 9)), 0.0], {}, EMBED])
    if kind == "args":
        return json.dumps([draw(json_value), draw(json_value), EMBED])
    if kind == "json":
        return json.dumps(draw(json_value))
    return draw(st.text(max_size=40))


@pytest.fixture(scope="module")
def run(prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRun]:
    this = HostileRun(f"{prefix}fz{uuid.uuid4().hex[:4]}", tmp_path_factory.mktemp("fuzz"))
    this.start(NODE, concurrency=2)
    yield this
    this.stop()


def _parked(run: HostileRun) -> set[str]:
    client = broker_client(run.app)
    found = set()
    for name in client.scan_iter(f"{run.prefix}.affinity.*"):
        if client.type(name) != b"list":
            continue
        for raw in client.lrange(name, 0, -1):
            found.add(str(json.loads(raw)["headers"].get("id")))
    return found


def _finished(run: HostileRun, ids: list[str]) -> set[str]:
    client = run.app.backend.client
    done = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for task_id, raw in zip(
            chunk, client.mget([f"celery-task-meta-{i}" for i in chunk]), strict=True
        ):
            if raw and json.loads(raw)["status"] in ("SUCCESS", "FAILURE"):
                done.add(task_id)
    return done


def test_fuzzed_headers_and_bodies(run: HostileRun) -> None:
    published: list[str] = []
    sent: dict[str, tuple[Any, Any, bool]] = {}

    @settings(
        max_examples=MESSAGES,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(header=headers(), body=bodies(), direct=st.booleans())
    def publish(header: Any, body: Any, direct: bool) -> None:
        queue = run.direct_queue(NODE) if direct else run.default_queue
        task_id = publish_raw(run.app, queue, sticky=header, body=body)
        published.append(task_id)
        sent[task_id] = (header, body, direct)

    publish()
    assert len(published) >= MESSAGES // 2

    missing: set[str] = set()

    def accounted() -> bool:
        missing.clear()
        missing.update(
            set(published) - _finished(run, published) - set(dead_ids(run.app, run.prefix))
        )
        missing.difference_update(_parked(run))
        return not missing

    worker = run.cluster.workers[NODE]  # type: ignore[union-attr]
    try:
        wait_for(
            accounted,
            int(os.environ.get("STICKY_FUZZ_WAIT", "300")),
            f"every one of {len(published)} messages to be accounted for",
        )
    except AssertionError:
        shown = [sent[i] for i in sorted(missing)[:8]]
        raise AssertionError(f"{len(missing)} message(s) lost, such as {shown!r}") from None
    finally:
        assert worker.running, worker.log()[-3000:]
    assert "Unrecoverable error" not in worker.log()
    dead = dead_ids(run.app, run.prefix)
    assert dead, "no message was dead-lettered: the fuzzer made no poison"
    assert run.step.delay("after-fuzz", 0).get(timeout=30) == [0], "the worker still serves"
