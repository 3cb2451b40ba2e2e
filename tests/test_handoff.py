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
    store = LeaseStore(_config(sticky_secret=SECRET))
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
