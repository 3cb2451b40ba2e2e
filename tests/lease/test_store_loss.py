"""A lease store that restarts empty while workflows run (real workers, real Redis).

The broker stays up; the lease store is a private Redis that is stopped and
started again with nothing in it. No worker may then trust its local state under
a lease it cannot prove: each key's next task gets a new epoch, which no local
state belongs to, so the state is dropped and the task is told
(``state.recovered is False``).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from celery_sticky.context import lease_store
from celery_sticky.testing import start_server
from tests.conftest import read_events, start_cluster


def test_a_lease_store_that_forgets_everything(prefix: str, tmp_path: Path) -> None:
    from tests.cluster_app import make_app

    sub = f"{prefix}ls"
    with start_server() as port:
        lease_url = f"redis://127.0.0.1:{port}/0"
        app = make_app(sub, sticky_redis_url=lease_url)
        app.finalize()
        env = {
            "STICKY_TEST_PREFIX": sub,
            "STICKY_TEST_LEASE_URL": lease_url,
            "STICKY_TEST_LEASE_TTL": "3",
            "STICKY_TEST_STATE_DIR": str(tmp_path / "state"),
        }
        specs = {f"ls{i}@sticky-tests": {"queues": [f"{sub}.default"]} for i in (1, 2)}
        cluster = start_cluster(app, specs, env=env, workdir=tmp_path / "logs")
        step = app.tasks["tests.cluster_app.record_step"]
        keys = [f"forget-{uuid.uuid4().hex[:8]}" for _ in range(4)]
        try:
            for key in keys:
                for n in range(3):
                    assert step.delay(key, n, 0.0).get(timeout=30) == list(range(n + 1))
            epochs = {key: lease_store(app).lookup("key", key).epoch for key in keys}  # type: ignore[union-attr]
        except BaseException:
            cluster.stop_all()
            raise
    with start_server(port):  # the same port, nothing in it
        try:
            cluster.wait_registered(specs, timeout=30)
            finals = {key: step.delay(key, 3, 0.0).get(timeout=60) for key in keys}
            assert finals == {key: [3] for key in keys}, "stale local state was trusted"
            for key in keys:
                info = lease_store(app).lookup("key", key)
                assert info is not None and info.epoch > epochs[key], "epochs only rise"
            runs = [e for e in read_events(app.backend.client, sub) if e.get("step") == 3]
            assert sorted(e["key"] for e in runs) == sorted(keys)
            assert all(e["recovered"] is False for e in runs), "the loss was not said"
        finally:
            cluster.stop_all()
