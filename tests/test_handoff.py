"""Hand-over copies are authenticated bytes: nothing forged is ever unpickled.

Real Redis (the lease store's keyspace, written as an attacker who can reach it
would) and a real directory. The forged payload is a pickle that creates a marker
file when loaded: the marker must never appear, while a correctly signed copy is
imported all the same.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_sticky.handoff import MAGIC, Copies, DirectoryHandoffStore
from celery_sticky.lease import LeaseStore, RedisHandoffStore
from celery_sticky.settings import StickyConfig
from tests.lease.conftest import established

NODE = "hs1@hostile-tests"
SECRET = "a-secret-of-more-than-16-characters"


class Exploit:
    """Unpickling this creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def _config(**settings: Any) -> StickyConfig:
    app = Celery("handoff", broker=os.environ["STICKY_TEST_REDIS_URL"], set_as_current=False)
    app.conf.update(sticky_key_prefix=f"hs{uuid.uuid4().hex[:8]}", sticky_lease_ttl=10.0)
    app.conf.update(settings)
    return StickyConfig.from_app(app)


@pytest.fixture
def leases(redis_client: Any) -> Iterator[LeaseStore]:
    store = established(LeaseStore(_config(sticky_secret=SECRET)))
    store.heartbeat(NODE, 1, "q", register=True)
    yield store
    for name in redis_client.scan_iter(f"{store.prefix}*"):
        redis_client.delete(name)


def _copies(leases: LeaseStore, secret: Any = SECRET) -> Copies:
    config = _config(sticky_secret=secret, sticky_key_prefix=leases.config.key_prefix)
    return Copies(config, leases, RedisHandoffStore(config, leases))


def _forge(leases: LeaseStore, workflow: str, key: str, blob: bytes) -> None:
    """Write ``blob`` as the key's copy, as anyone with access to the Redis could."""
    version = f"{leases.prefix}copyv:{workflow}:{key}@1.forged"
    leases.redis.delete(version)
    leases.redis.rpush(version, blob)
    leases.redis.set(leases.copy_pointer_key(workflow, key), version)


def _own(leases: LeaseStore, key: str) -> int:
    return leases.claim("key", key, candidate=NODE).epoch


def test_a_forged_pickle_never_runs(leases: LeaseStore, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    exploit = pickle.dumps(Exploit(str(marker)))
    copies = _copies(leases)
    good, bad, magic = "signed", "forged", "forged-magic"
    # A correctly signed copy of one key is imported...
    assert copies.publish("key", good, {"v": 1}, owner=NODE, epoch=_own(leases, good))
    # ...while forged copies of others are refused: a bare pickle, and one dressed
    # up with the format's magic and a made-up MAC.
    _forge(leases, "key", bad, exploit)
    _forge(leases, "key", magic, MAGIC + b"\0" * 32 + exploit)
    assert copies.get("key", good) == {"v": 1}
    assert copies.get("key", bad) is None
    assert copies.get("key", magic) is None
    assert not marker.exists(), "a forged pickle ran"


def test_a_copy_moved_to_another_key_is_refused(leases: LeaseStore, tmp_path: Path) -> None:
    """The MAC covers the version name: a signed copy replayed under another key fails."""
    copies = _copies(leases)
    assert copies.publish("key", "a", {"owner": "a"}, owner=NODE, epoch=_own(leases, "a"))
    version = leases.copy_pointer("key", "a")
    assert version is not None
    leases.redis.set(leases.copy_pointer_key("key", "b"), version)
    assert copies.get("key", "b") is None
    # A key whose name extends another's ("a@1" after "a@"): still not "a"'s copy.
    assert copies.publish("key", "a@1", {"owner": "a@1"}, owner=NODE, epoch=_own(leases, "a@1"))
    leases.redis.set(leases.copy_pointer_key("key", "a"), leases.copy_pointer("key", "a@1"))
    assert copies.get("key", "a") is None


def test_rotation_and_no_secret(leases: LeaseStore) -> None:
    old = _copies(leases, "the-old-secret-1234567")
    assert old.publish("key", "r", {"v": 2}, owner=NODE, epoch=_own(leases, "r"))
    rotated = _copies(leases, ["the-new-secret-1234567", "the-old-secret-1234567"])
    assert rotated.get("key", "r") == {"v": 2}, "the previous secret still verifies"
    assert _copies(leases, "the-new-secret-1234567").get("key", "r") is None
    unsigned = Copies(
        _config(sticky_key_prefix=leases.config.key_prefix),
        leases,
        RedisHandoffStore(leases.config, leases),
    )
    if unsigned.enabled:  # STICKY_SECRET in this environment
        pytest.skip("STICKY_SECRET is set in the environment")
    assert unsigned.get("key", "r") is None
    assert not unsigned.publish("key", "r", {"v": 3}, owner=NODE, epoch=_own(leases, "r"))


def test_directory_store_stays_in_its_directory(leases: LeaseStore, tmp_path: Path) -> None:
    root = tmp_path / "copies"
    outside = tmp_path / "outside.copy"
    outside.write_bytes(pickle.dumps({"secret": "outside"}))
    store = DirectoryHandoffStore(str(root))
    for name in ("../outside.copy", "../../etc/passwd", str(outside), "a/../../outside"):
        assert store.read(name) is None
        store.write(name, b"x")
        store.delete(name)
    written = list(root.iterdir())
    assert written == [] and outside.read_bytes() == pickle.dumps({"secret": "outside"})
    # Through Copies, with a workflow of ".." (which the workflow name rule allows).
    config = _config(sticky_secret=SECRET, sticky_key_prefix=leases.config.key_prefix)
    copies = Copies(config, leases, store)
    assert copies.publish(
        "..",
        "../../x",
        {"v": 1},
        owner=NODE,
        epoch=leases.claim("..", "../../x", candidate=NODE).epoch,
    )
    assert copies.get("..", "../../x") == {"v": 1}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(p.parent for p in files if p != outside) == [root]
    assert all(len(p.stem) == 64 for p in root.iterdir()), "names are SHA-256 digests"
    assert oct(root.stat().st_mode & 0o777) == oct(0o700 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- sync replication: a copy is a version and a log of commits -------------------------

WORKFLOW = "key"


class _Context:
    """What replicate() takes of a StickyContext."""

    def __init__(self, copies: Copies) -> None:
        self.copies = copies


def _sync(leases: LeaseStore, tmp_path: Path, store: str = "redis", **settings: Any) -> Any:
    """``(copies, node state, replicate(key, epoch, change))`` for NODE, with ``settings``."""
    from celery_sticky.local.node_state import NodeState
    from celery_sticky.worker.execution import replicate

    config = _config(sticky_secret=SECRET, sticky_key_prefix=leases.config.key_prefix, **settings)
    blobs: Any = (
        RedisHandoffStore(config, leases)
        if store == "redis"
        else DirectoryHandoffStore(str(tmp_path / "copies"))
    )
    copies = Copies(config, leases, blobs)
    state = NodeState(str(tmp_path / f"node-{uuid.uuid4().hex[:6]}"), config)

    def sync(key: str, epoch: int, change: Any) -> bool:
        return replicate(_Context(copies), state, WORKFLOW, key, NODE, epoch, change)  # type: ignore[arg-type]

    return copies, state, sync


def _step(
    state: Any,
    key: str,
    number: int,
    writes: dict[str, Any],
    deletes: Any = (),
    clear: bool = False,
    epoch: int = 1,
) -> Any:
    from celery_sticky.local.handle import StateHandle

    handle = StateHandle(state, WORKFLOW, key, task_id=f"{key}-t{number}", epoch=epoch)
    if clear:
        handle.clear()
    for field in deletes:
        handle.pop(field, None)
    handle.update(writes)
    return handle.commit(result=number, stream="producer", seq=number + 1)


def _imported(copies: Copies, tmp_path: Path, key: str, epoch: int) -> Any:
    """The key as a new owner would import it: ``(export, fields)`` or None."""
    from celery_sticky.local.handle import StateHandle
    from celery_sticky.local.node_state import NodeState

    copy = copies.fetch(WORKFLOW, key)
    if copy is None:
        return None
    target = NodeState(str(tmp_path / f"taker-{uuid.uuid4().hex[:6]}"), copies.config)
    target.import_key(WORKFLOW, key, copy.data, epoch)
    try:
        return _comparable(target, key), dict(StateHandle(target, WORKFLOW, key))
    finally:
        target.close()


def _comparable(state: Any, key: str) -> dict[str, Any]:
    export = state.export_key(WORKFLOW, key)
    assert export is not None
    export.pop("epoch")  # the importer's, by design
    return export


def _log(leases: LeaseStore, key: str) -> list[bytes]:
    return leases.copy_snapshot(WORKFLOW, key)[1]


@pytest.mark.parametrize("store", ["redis", "dir"])
def test_sync_replication_sends_each_commits_change_and_an_import_is_exact(
    leases: LeaseStore, tmp_path: Path, store: str
) -> None:
    """Many commits (writes, deletes, a clear, values in files), a log that is compacted
    twice into a new version: a new owner's import reproduces the state exactly, applied
    records, producer numbers and commit times included."""
    import random

    copies, state, sync = _sync(leases, tmp_path, store, sticky_replication_log_entries=25)
    key = f"sync-{store}"
    epoch = _own(leases, key)
    rng = random.Random(16)
    base = {f"f{i}": rng.randbytes(40_000) for i in range(50)}  # 2 MB, values in files
    assert sync(key, epoch, _step(state, key, 0, base, epoch=epoch))
    versions = [leases.copy_pointer(WORKFLOW, key)]
    for number in range(1, 60):
        writes = {f"f{rng.randint(0, 60)}": rng.randbytes(rng.choice([100, 1_000, 40_000]))}
        deletes = [f"f{rng.randint(0, 60)}"] if number % 3 == 0 else []
        change = _step(state, key, number, writes, deletes, clear=number == 30, epoch=epoch)
        before = _log(leases, key)
        assert sync(key, epoch, change)
        after = _log(leases, key)
        versions.append(leases.copy_pointer(WORKFLOW, key))
        if len(after) == len(before) + 1:
            # One entry, the size of the change, whatever the state's size.
            assert len(after[-1]) < sum(len(v) for v in writes.values()) + 1_000
        else:
            assert after == [], "a new version starts its log afresh"
    runs = [versions.count(version) for version in dict.fromkeys(versions)]
    assert len(runs) >= 3 and runs[0] == 26 and max(runs) <= 26, runs  # a version, 25 entries
    imported = _imported(copies, tmp_path, key, epoch + 1)
    assert imported is not None
    assert imported[0] == _comparable(state, key)
    from celery_sticky.local.handle import StateHandle

    assert imported[1] == dict(StateHandle(state, WORKFLOW, key))
    deleted = {f for f in (f"f{i}" for i in range(61)) if f not in imported[1]}
    assert deleted, "deletes replicated"


def test_a_stale_writers_commit_is_refused_and_invisible(
    leases: LeaseStore, tmp_path: Path
) -> None:
    """The owner pauses past the TTL: its append is refused by the server's clock. Another
    worker takes the key over (a new epoch); the old owner resumes and appends again:
    refused. An import sees none of it."""
    copies, state, sync = _sync(leases, tmp_path)
    key = "zombie"
    epoch = _own(leases, key)
    for number in range(3):
        assert sync(key, epoch, _step(state, key, number, {"n": number}, epoch=epoch))
    good = _imported(copies, tmp_path, key, epoch + 1)
    assert good is not None and good[1] == {"n": 2}
    log = _log(leases, key)

    # Paused: its heartbeat is older than the TTL (by the Redis server's clock).
    leases.redis.zadd(leases.workers_key, {NODE: leases.server_time() - 60})
    paused = _step(state, key, 3, {"n": "paused"}, epoch=epoch)
    assert not sync(key, epoch, paused)
    assert _log(leases, key) == log

    # Taken over by another worker under a newer epoch; the old owner comes back.
    leases.heartbeat("taker@hostile-tests", 1, "q.taker", register=True)
    leases.mark_reaped(NODE)
    taken = leases.claim(WORKFLOW, key, candidate="taker@hostile-tests")
    assert taken.owner == "taker@hostile-tests" and taken.epoch > epoch
    leases.redis.zadd(leases.workers_key, {NODE: leases.server_time()})
    zombie = _step(state, key, 4, {"n": "zombie"}, epoch=epoch)
    assert (
        copies.append(
            WORKFLOW,
            key,
            state.copy_version(WORKFLOW, key),
            zombie,
            streams=state.streams(WORKFLOW, key).as_dict(),
            owner=NODE,
            epoch=epoch,
        ).value
        == "refused"
    )
    # Nor can it switch in a whole new version.
    assert not copies.publish(WORKFLOW, key, {"n": "zombie"}, owner=NODE, epoch=epoch)
    assert _log(leases, key) == log
    assert _imported(copies, tmp_path, key, taken.epoch) == good


def test_a_tampered_log_entry_is_refused_and_never_unpickled(
    leases: LeaseStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from celery_sticky.handoff import LOG_MAGIC

    copies, state, sync = _sync(leases, tmp_path)
    marker = tmp_path / "pwned"
    exploit = pickle.dumps(Exploit(str(marker)))
    keys = {}
    for name in ("flipped", "forged", "exploit", "replayed", "swapped", "other"):
        key = f"tamper-{name}"
        epoch = _own(leases, key)
        for number in range(3):
            assert sync(key, epoch, _step(state, key, number, {name: number}, epoch=epoch))
        assert len(_log(leases, key)) == 2  # a version, then two entries
        keys[name] = leases.copy_log_key(WORKFLOW, key)
    redis = leases.binary
    flipped = bytearray(redis.lindex(keys["flipped"], 1))  # type: ignore[arg-type]
    flipped[-3] ^= 1
    redis.lset(keys["flipped"], 1, bytes(flipped))
    redis.rpush(keys["forged"], LOG_MAGIC + b"\0" * 32 + pickle.dumps({"seq": 4}))
    redis.lset(keys["exploit"], 0, LOG_MAGIC + b"\0" * 32 + exploit)
    # Validly signed entries, in the wrong place: another key's, and each other's.
    redis.lset(keys["replayed"], 0, redis.lindex(keys["other"], 0))  # type: ignore[arg-type]
    first, second = redis.lrange(keys["swapped"], 0, -1)  # type: ignore[misc]
    redis.delete(keys["swapped"])
    redis.rpush(keys["swapped"], second, first)
    caplog.set_level("ERROR")
    for name in ("flipped", "forged", "exploit", "replayed", "swapped"):
        caplog.clear()
        assert copies.fetch(WORKFLOW, f"tamper-{name}") is None, name
        assert f"refused the copy of key:tamper-{name}: entry" in caplog.text, name
        assert "does not check under sticky_secret" in caplog.text
    assert copies.fetch(WORKFLOW, "tamper-other") is not None
    assert not marker.exists(), "a forged log entry was unpickled"


def test_a_missed_commit_writes_a_whole_version(leases: LeaseStore, tmp_path: Path) -> None:
    """A commit whose copy failed (or a worker that died between its commit and its copy)
    leaves the log behind: the next commit's entry would not follow on, so it writes a
    whole version; a retried append that landed already is not added twice."""
    copies, state, sync = _sync(leases, tmp_path)
    key = "missed"
    epoch = _own(leases, key)
    assert sync(key, epoch, _step(state, key, 0, {"a": 0}, epoch=epoch))
    change = _step(state, key, 1, {"b": 1}, epoch=epoch)
    assert sync(key, epoch, change)
    assert sync(key, epoch, change), "a retry after a lost reply"
    assert len(_log(leases, key)) == 1
    version = leases.copy_pointer(WORKFLOW, key)
    _step(state, key, 2, {"c": 2}, epoch=epoch)  # its copy never happens
    assert sync(key, epoch, _step(state, key, 3, {"a": 3}, deletes=["b"], epoch=epoch))
    assert leases.copy_pointer(WORKFLOW, key) != version and _log(leases, key) == []
    imported = _imported(copies, tmp_path, key, epoch + 1)
    assert imported is not None and imported[1] == {"a": 3, "c": 2}
    assert imported[0] == _comparable(state, key)


def test_a_log_past_its_byte_budget_writes_a_whole_version(
    leases: LeaseStore, tmp_path: Path
) -> None:
    """Entries stop at max(64 KiB, ratio x the version's bytes): a small state with large
    changes is rewritten whole (its copy never grows past about twice its size)."""
    copies, state, sync = _sync(leases, tmp_path, sticky_replication_log_ratio=0.5)
    key = "budget"
    epoch = _own(leases, key)
    sizes = []
    for number in range(8):
        assert sync(key, epoch, _step(state, key, number, {"v": bytes(30_000)}, epoch=epoch))
        sizes.append(len(_log(leases, key)))
    assert sizes == [0, 1, 2, 0, 1, 2, 0, 1]
    imported = _imported(copies, tmp_path, key, epoch + 1)
    assert imported is not None and imported[0] == _comparable(state, key)


def test_a_drain_needs_no_export_of_a_current_copy(leases: LeaseStore, tmp_path: Path) -> None:
    copies, state, sync = _sync(leases, tmp_path)
    key = "current"
    epoch = _own(leases, key)
    for number in range(3):
        assert sync(key, epoch, _step(state, key, number, {"n": number}, epoch=epoch))
    version = state.copy_version(WORKFLOW, key)
    assert version is not None

    def current() -> bool:
        record = state.streams(WORKFLOW, key).as_dict()
        return copies.is_current(WORKFLOW, key, version, state.applied_count(WORKFLOW, key), record)

    assert current()
    state.consume(WORKFLOW, key, "producer", 4)  # a failed task gave its number up
    assert not current(), "the copy lacks the producer numbers consumed since"
    _step(state, key, 4, {"n": 4}, epoch=epoch)
    assert not current(), "the copy lacks a commit"


def test_a_drain_sees_a_copy_ahead_of_stale_local_state(leases: LeaseStore, tmp_path: Path) -> None:
    """The key's copy holds three commits (another owner's); this worker's local state
    holds one, from before the key left it. Its drain must see the copy ahead and
    leave it alone (``celery_sticky.worker.drain.copy_is_ahead``): exported, the
    stale state replaced the copy under the worker's valid lease."""
    from celery_sticky.worker.drain import copy_is_ahead

    _copies_b, current, sync = _sync(leases, tmp_path)
    _copies_a, stale, _sync_a = _sync(leases, tmp_path)
    key = "came-back"
    epoch = _own(leases, key)
    _step(stale, key, 0, {"n": 0}, epoch=epoch)
    assert not copy_is_ahead(leases, stale, WORKFLOW, key), "no copy yet"
    for number in range(3):
        assert sync(key, epoch, _step(current, key, number, {"n": number}, epoch=epoch))
    assert copy_is_ahead(leases, stale, WORKFLOW, key)
    assert not copy_is_ahead(leases, current, WORKFLOW, key)
