"""``celery sticky``: every command against real workers and a real Redis.

The CLI runs as operators run it, ``python -m celery -A tests.cluster_app:app sticky
...`` in a subprocess with the workers' environment; one test runs it in-process
to check its plain columns.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from celery_sticky.context import lease_store
from celery_sticky.testing import WorkerCluster
from tests.conftest import REPO, start_cluster, unique, wait_settled

CLI = [sys.executable, "-m", "celery", "-A", "tests.cluster_app:app", "sticky"]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=str(REPO),
        timeout=120,
    )


def cli_json(*args: str, env: dict[str, str] | None = None) -> Any:
    done = cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The error a failing command printed: one line, no traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def all_pages(*args: str, limit: int, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every row of ``keys``, following its cursor; no page longer than ``limit``."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        extra = ["--cursor", cursor] if cursor else []
        page = cli_json("keys", *args, "--limit", str(limit), *extra, env=env)
        assert len(page["keys"]) <= limit
        rows += page["keys"]
        cursor = page["cursor"]
        if cursor is None:
            return rows
    raise AssertionError("the cursor never ended")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- status ------------------------------------------------------------------------


def test_status_lists_the_workers_alive_with_their_keys(
    sticky_app: Any, prefix: str, cluster: WorkerCluster
) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    for result in [step.delay(unique("status"), 0, 0.0) for _ in range(6)]:
        result.get(timeout=30)
    store = lease_store(sticky_app)
    data = cli_json("status")
    workers = {row["worker"]: row for row in data["workers"]}
    for name in cluster.workers:
        row = workers[name]
        assert row["alive"] is True and row["state"] == "alive", row
        assert row["keys"] == len(store.owned_keys(name)) > 0, row
        assert row["queue"] == f"{prefix}.{name}"
        assert row["queue_depth"] == 0
        assert 0 <= row["heartbeat_age"] < 10, row
    table = cli("status")
    assert table.returncode == 0, table.stderr
    for name in cluster.workers:
        line = next(line for line in table.stdout.splitlines() if line.startswith(name))
        cells = line.split()
        assert cells[:5] == [name, "alive", str(workers[name]["keys"]), "2", f"{prefix}.{name}"]


# -- keys --------------------------------------------------------------------------


def test_keys_of_a_worker_page_by_page(sticky_app: Any, cluster: WorkerCluster) -> None:
    worker = "w1@sticky-tests"
    store = lease_store(sticky_app)
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    for key in [unique("mine") for _ in range(5)]:
        store.claim("key", key, worker)
        step.delay(key, 0, 0.0).get(timeout=30)
    rows = all_pages("--worker", worker, limit=2)
    listed = [(row["workflow"], row["key"]) for row in rows]
    assert len(listed) == len(set(listed)), "a key listed twice"
    assert set(listed) == store.owned_keys(worker)
    assert all(row["owner"] == worker and row["alive"] for row in rows)
    table = cli("keys", "--worker", worker, "--limit", "2")
    assert table.returncode == 0, table.stderr
    assert "more with --cursor" in table.stdout
    assert len([line for line in table.stdout.splitlines() if worker in line]) == 2


def test_keys_scans_every_lease_and_filters_by_workflow(
    sticky_app: Any, cluster: WorkerCluster
) -> None:
    tenant = unique("tenant")
    orders = sticky_app.tasks["tests.cluster_app.tenant_step"]
    for order in range(3):
        orders.delay(tenant, order).get(timeout=30)
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    plain = unique("scanned")
    step.delay(plain, 0, 0.0).get(timeout=30)
    store = lease_store(sticky_app)

    tenants = all_pages("--workflow", "tenant_order", limit=1)
    assert {row["workflow"] for row in tenants} == {"tenant_order"}
    mine = {row["key"]: row for row in tenants if row["key"].startswith(f"{tenant}/")}
    assert sorted(mine) == [f"{tenant}/{order}" for order in range(3)]
    for key, row in mine.items():
        info = store.lookup("tenant_order", key)
        assert info is not None
        assert (row["owner"], row["epoch"]) == (info.owner, info.epoch)

    everything = all_pages(limit=7)
    listed = {(row["workflow"], row["key"]) for row in everything}
    assert ("key", plain) in listed
    assert {("tenant_order", key) for key in mine} <= listed


# -- show --------------------------------------------------------------------------


def test_show_gives_the_owner_that_ran_the_task_and_its_view(
    sticky_app: Any, cluster: WorkerCluster, events: Any
) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    key = unique("shown")
    step.delay(key, 0, 0.0).get(timeout=30)
    last = step.delay(key, 1, 0.0)
    last.get(timeout=30)
    node = events(key)[-1]["node"]
    info = lease_store(sticky_app).lookup("key", key)
    assert info is not None

    data = cli_json("show", "key", key)
    assert (data["owner"], data["epoch"], data["alive"]) == (node, info.epoch, True)
    assert data["origin"] == "claimed"
    local = data["on_owner"]["local"]
    assert local is not None, data["on_owner"]
    assert local["last_task"] == last.id
    assert local["tasks_applied"] == 2
    assert local["fields"] == 1 and local["bytes"] > 0
    assert local["epoch"] == info.epoch
    assert abs(time.time() - local["last_commit"]) < 60
    assert data["on_owner"]["gate"] == {"queued": 0, "running": False}

    table = cli("show", "key", key)
    assert table.returncode == 0, table.stderr
    assert node in table.stdout and last.id in table.stdout
    assert "1 field(s)" in table.stdout

    # While a step runs and another waits behind it, the owner's gate says so.
    running = step.delay(key, 2, 4.0)
    waiting = step.delay(key, 3, 0.0)
    deadline = time.monotonic() + 3.5
    gate = None
    while time.monotonic() < deadline:
        gate = cli_json("show", "key", key)["on_owner"]["gate"]
        if gate["running"]:
            break
    assert gate is not None and (gate["queued"], gate["running"]) == (2, True), gate
    # Which task is first in line, and that it reached the pool.
    head = gate["head"]
    assert head["task_id"] == f"{running.id}/0" and head["started"] and head["in_pool"], head
    assert waiting.get(timeout=30) == [0, 1, 2, 3]
    running.get(timeout=30)


# -- release -----------------------------------------------------------------------


def test_release_ends_the_workflow_and_frees_the_lease(
    sticky_app: Any, cluster: WorkerCluster
) -> None:
    step = sticky_app.tasks["tests.cluster_app.record_step"]
    read_state = sticky_app.tasks["tests.cluster_app.read_state"]
    store = lease_store(sticky_app)
    key = unique("released")
    step.delay(key, 0, 0.0).get(timeout=30)
    assert store.lookup("key", key) is not None

    done = cli("release", "key", key, "--wait")
    assert done.returncode == 0, done.stderr
    assert UUID.search(done.stdout), done.stdout
    assert f"released key:{key}" in done.stdout
    assert store.lookup("key", key) is None
    assert cli("show", "key", key).returncode == 1
    assert read_state.delay(key).get(timeout=30)["state"] == {}, "the state was deleted"

    other = unique("released")
    step.delay(other, 0, 0.0).get(timeout=30)
    sent = cli_json("release", "key", other)
    assert sent["key"] == other and sent["released"] is None
    assert sticky_app.AsyncResult(sent["task_id"]).get(timeout=30) is True
    assert store.lookup("key", other) is None


# -- drain -------------------------------------------------------------------------


def test_drain_stops_the_worker_and_its_keys_move_with_their_state(
    sticky_app: Any, prefix: str, tmp_path: Path, cluster: WorkerCluster, events: Any
) -> None:
    name = "cli-drain@sticky-tests"
    workers = WorkerCluster(sticky_app, "tests.cluster_app:app", tmp_path, cwd=str(REPO))
    workers.start(name, queues=[f"{prefix}.cli-unused"])
    try:
        store = lease_store(sticky_app)
        step = sticky_app.tasks["tests.cluster_app.record_step"]
        keys = [unique("drained") for _ in range(3)]
        for key in keys:
            store.claim("key", key, name)
            step.delay(key, 0, 0.0).get(timeout=30)
            step.delay(key, 1, 0.0).get(timeout=30)
            assert events(key)[-1]["node"] == name
        status = {row["worker"]: row for row in cli_json("status")["workers"]}
        assert status[name]["keys"] == 3

        data = cli_json("drain", name, "--wait")
        assert data == {"worker": name, "keys": 3, "drained": True}
        process = workers.workers[name].process
        assert process is not None
        assert process.wait(30) == 0
        assert "drain requested remotely" in workers.workers[name].log()

        read_state = sticky_app.tasks["tests.cluster_app.read_state"]
        for key in keys:
            seen = read_state.delay(key).get(timeout=30)
            assert seen["node"] != name
            assert seen["state"] == {"steps": [0, 1]}, "the state moved with the key"
        status = {row["worker"]: row for row in cli_json("status")["workers"]}
        assert status[name]["state"] == "reaped" and status[name]["keys"] == 0

        again = cli("drain", name)
        assert again.returncode == 1
        assert "not alive" in one_line_error(again)
    finally:
        workers.stop_all()


# -- reap --------------------------------------------------------------------------


def test_reap_moves_a_killed_workers_queue_now(prefix: str, tmp_path: Path) -> None:
    """Its own workers (prefix, TTL 30 s), so no other reaper gets there first."""
    from tests.cluster_app import make_app

    own = f"{prefix}r{uuid.uuid4().hex[:4]}"
    env = {
        "STICKY_TEST_PREFIX": own,
        "STICKY_TEST_LEASE_TTL": "30",
        "STICKY_TEST_STATE_DIR": str(tmp_path / "state"),
    }
    app = make_app(own, sticky_lease_ttl=30.0)
    app.finalize()
    victim, taker = "cli-victim@sticky-tests", "cli-taker@sticky-tests"
    specs = {name: {"queues": [f"{own}.default"]} for name in (victim, taker)}
    workers = start_cluster(app, specs, env=env, workdir=tmp_path / "logs")
    try:
        store = lease_store(app)
        step = app.tasks["tests.cluster_app.record_step"]
        keys = [unique("reaped") for _ in range(2)]
        for key in keys:
            store.claim("key", key, victim)
            assert step.delay(key, 0, 0.0).get(timeout=30) == [0]
            wait_settled(app, victim, "key", key)  # acknowledged before the kill
        workers.kill(victim)
        # The taker's reaper would move the queue too: pause it while the CLI does.
        workers.signal(taker, signal.SIGSTOP)
        try:
            store.deregister(victim)  # dead now, not after the 30 s TTL
            pending = [step.delay(key, 1, 0.0) for key in keys]
            status = {row["worker"]: row for row in cli_json("status", env=env)["workers"]}
            assert status[victim]["state"] == "dead"
            assert status[victim]["queue_depth"] == 2, "its tasks wait in its queue"
            shown = cli_json("show", "key", keys[0], env=env)
            assert shown["owner"] == victim and shown["alive"] is False
            assert shown["on_owner"] is None

            reaped = cli_json("reap", env=env)
        finally:
            workers.signal(taker, signal.SIGCONT)
        row = next(row for row in reaped["reaped"] if row["worker"] == victim)
        assert row["moved"] == 2 and row["skipped"] is None and row["already_reaped"] is False
        assert row["keys_before"] == 2 and row["keys_after"] == 0
        # kill -9 left no copy of the state (replication on_handoff): the taker starts afresh.
        assert [result.get(timeout=30) for result in pending] == [[1], [1]]
        for key in keys:
            info = store.lookup("key", key)
            assert info is not None and info.owner == taker
        status = {row["worker"]: row for row in cli_json("status", env=env)["workers"]}
        assert status[victim]["state"] == "reaped"
        assert status[victim]["queue_depth"] == 0
    finally:
        workers.stop_all()


# -- errors ------------------------------------------------------------------------


def test_unknown_key_or_worker_exits_1(cluster: WorkerCluster) -> None:
    missing = unique("missing")
    for args in (
        ["show", "key", missing],
        ["release", "key", missing],
        ["keys", "--worker", "nobody@nowhere"],
        ["drain", "nobody@nowhere"],
    ):
        done = cli(*args)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        message = one_line_error(done)
        assert missing in message or "nobody@nowhere" in message


def test_bad_usage_exits_2(cluster: WorkerCluster) -> None:
    for args in (
        ["keys", "--limit", "0"],
        ["keys", "--cursor", "not-a-cursor"],
        ["show", "key"],
        ["no-such-command"],
    ):
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_unreachable_lease_store_exits_3_naming_its_url(cluster: WorkerCluster) -> None:
    port = _free_port()
    env = {"STICKY_TEST_LEASE_URL": f"redis://127.0.0.1:{port}/0"}
    for args in (
        ["status"],
        ["keys"],
        ["show", "key", "k"],
        ["release", "key", "k"],
        ["drain", "w1@sticky-tests"],
        ["reap"],
    ):
        done = cli(*args, env=env)
        assert done.returncode == 3, (args, done.stderr)
        message = one_line_error(done)
        assert f"redis://127.0.0.1:{port}/0" in message, message


def test_bad_lease_store_url_and_wrong_app_path_say_so_in_one_line() -> None:
    done = cli("status", env={"STICKY_TEST_LEASE_URL": "http://127.0.0.1:1/"})
    assert done.returncode == 2
    assert "sticky_redis_url" in one_line_error(done)
    wrong = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cluster_app:nope", "sticky", "status"],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=60,
    )
    assert wrong.returncode == 2
    assert "Traceback" not in wrong.stderr
    assert "nope" in wrong.stderr


# -- plain text --------------------------------------------------------------------


def test_plain_columns_whatever_is_installed(sticky_app: Any, cluster: WorkerCluster) -> None:
    from celery.bin.celery import celery as celery_main

    result = CliRunner().invoke(celery_main, ["-A", "tests.cluster_app:app", "sticky", "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "worker",
        "state",
        "keys",
        "capacity",
        "queue",
        "depth",
        "heartbeat",
    ]
    assert set(lines[1].replace(" ", "")) == {"-"}
    for name in cluster.workers:
        assert any(line.startswith(name) and " alive " in line for line in lines), lines
