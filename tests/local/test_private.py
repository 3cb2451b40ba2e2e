"""Private local state: 0700 directories, 0600 files, shared directories refused."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_sticky.errors import StateDirError
from celery_sticky.local.node_state import NodeState, check_node_directory
from celery_sticky.settings import StickyConfig

NODE = "pv1@hostile-tests"


def _config(state_dir: Path) -> StickyConfig:
    app = Celery("private", broker=os.environ["STICKY_TEST_REDIS_URL"], set_as_current=False)
    app.conf.update(sticky_state_dir=str(state_dir))
    return StickyConfig.from_app(app)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[Any]:
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_created_private(tmp_path: Path, umask: Any, mask: int) -> None:
    umask(mask)
    state = tmp_path / "state"
    directory = Path(check_node_directory(_config(state), NODE))
    assert _mode(state) == 0o700
    assert _mode(directory) == 0o700
    store = NodeState(str(directory), _config(state))
    try:
        store.cache.set("big", os.urandom(1 << 20))  # a value file of its own
    finally:
        store.close()
    files = [p for p in directory.rglob("*") if p.is_file()]
    assert any(p.name == "cache.db" for p in files)
    assert any(p.suffix == ".val" for p in files), files
    for path in files:
        assert _mode(path) & 0o077 == 0, f"{path} is {oct(_mode(path))}"
    for path in [p for p in directory.rglob("*") if p.is_dir()]:
        assert _mode(path) & 0o077 == 0, f"{path} is {oct(_mode(path))}"


def test_a_stricter_umask_is_kept(tmp_path: Path, umask: Any) -> None:
    umask(0o277)  # stricter than 0700: the directories are narrowed, never widened
    try:
        check_node_directory(_config(tmp_path / "state"), NODE)
    except StateDirError:
        assert os.geteuid() != 0  # only root can still write there
    umask(0o022)
    assert _mode(tmp_path / "state") == 0o500


def test_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / NODE).mkdir(parents=True)
    os.chmod(state / NODE, 0o777)
    with pytest.raises(StateDirError, match="writable by others") as raised:
        check_node_directory(_config(state), NODE)
    assert "\n" not in str(raised.value)
    os.chmod(state / NODE, 0o700)
    os.chmod(state, 0o777)
    with pytest.raises(StateDirError, match="writable by others"):
        check_node_directory(_config(state), NODE)
    os.chmod(state, 0o1777)  # like /tmp: others cannot replace what is ours
    check_node_directory(_config(state), NODE)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_refuses_a_directory_of_another_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / NODE).mkdir(parents=True, mode=0o700)
    os.chown(state / NODE, 65534, 65534)
    with pytest.raises(StateDirError, match="owned by uid 65534") as raised:
        check_node_directory(_config(state), NODE)
    assert "\n" not in str(raised.value)
