"""Hand-over copies: where a key's state waits between two owners, fenced and signed.

A draining worker exports each key it owns (values, applied-task records) and
publishes it here; the next owner imports it before the key's first task runs
there. With ``sticky_state_replication = "sync"`` every commit also refreshes the
copy, so a new owner can rebuild the state after a ``kill -9``.

Two things make a copy safe to use:

- **Fenced where it lands.** A copy is first written under a fresh version name
  that nobody reads, then made the key's copy by ``copy_switch.lua``, which checks
  atomically that the writer still holds the key live under the epoch it wrote
  with. A paused or cut-off owner that resumes after another worker took the key
  over is refused, and its version deleted: nothing it wrote becomes visible. The
  same switch covers every backend, since the pointer lives in the lease store.
- **Signed.** The bytes are a pickle; they are unpickled only when their
  HMAC-SHA256 under ``sticky_secret`` checks, bound to the version name (a copy
  cannot be replayed under another key). Without a secret nothing is written or
  read.

Backends hold the versions' bytes (``sticky_handoff_store``): ``redis`` (the lease
store's Redis: :class:`~celery_sticky.lease.RedisHandoffStore`), ``dir:/path``
(a directory every worker mounts: :class:`DirectoryHandoffStore`, file names
derived from a hash of the version name, never from message fields), or a dotted
path to a class taking ``(config, lease_store)``. :mod:`celery_sticky.context`
builds one :class:`Copies` per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import pickle
import re
import tempfile
import uuid
from typing import Any, Protocol

from celery.utils.imports import symbol_by_name

from . import faults
from .lease import LeaseStore, RedisHandoffStore
from .settings import StickyConfig

logger = logging.getLogger(__name__)

#: What every signed copy starts with (a format version, for later changes).
MAGIC = b"sticky-copy:1\n"
_MAC_BYTES = 32
#: What follows ``copyv:<workflow>:<key>@`` in a version name: ``<epoch>.<uuid hex>``.
_VERSION_TAIL = re.compile(r"[0-9]+\.[0-9a-f]{32}")


class HandoffStore(Protocol):
    """Where the bytes of copy versions live; names are opaque, chosen by :class:`Copies`."""

    def write(self, name: str, blob: bytes) -> None: ...

    def read(self, name: str) -> bytes | None: ...

    def delete(self, name: str) -> None: ...


class DirectoryHandoffStore:
    """Copy versions as files in a directory every worker mounts (one file per version)."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)

    def _file(self, name: str) -> str:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        return os.path.join(self.path, f"{digest}.copy")

    def write(self, name: str, blob: bytes) -> None:
        fd, temp = tempfile.mkstemp(dir=self.path, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(temp, self._file(name))

    def read(self, name: str) -> bytes | None:
        try:
            with open(self._file(name), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._file(name))


def open_handoff_store(config: StickyConfig, lease_store: LeaseStore) -> HandoffStore:
    """The configured backend (use :func:`celery_sticky.context.context`'s, cached)."""
    spec = config.handoff_store
    if spec == "redis":
        return RedisHandoffStore(config, lease_store)
    if spec.startswith("dir:"):
        return DirectoryHandoffStore(spec[4:])
    store: HandoffStore = symbol_by_name(spec)(config, lease_store)
    return store


class Copies:
    """Fenced, signed hand-over copies of keys' state (see the module doc)."""

    def __init__(self, config: StickyConfig, leases: LeaseStore, blobs: HandoffStore) -> None:
        self.config = config
        self.leases = leases
        self.blobs = blobs
        self._keys = [secret.encode() for secret in config.secret]

    @property
    def enabled(self) -> bool:
        """False without ``sticky_secret``: nothing is written or read."""
        return bool(self._keys)

    def publish(
        self, workflow: str, key: str, data: dict[str, Any], *, owner: str, epoch: int
    ) -> bool:
        """Make ``data`` the key's copy if ``owner`` still holds it live under ``epoch``.

        Returns False when there is no secret, or when the lease store refused the
        writer (it lost the key: its version is deleted, nothing became visible).
        """
        if not self.enabled:
            return False
        version = f"{self._version_prefix(workflow, key)}{epoch}.{uuid.uuid4().hex}"
        payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        self.blobs.write(version, self._seal(version, payload))
        try:
            streams = data.get("streams")
            switched, previous = self.leases.switch_copy(
                workflow,
                key,
                owner,
                epoch,
                version,
                version,
                fenced=not faults.UNFENCED,
                streams=streams if isinstance(streams, dict) else None,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.blobs.delete(version)
            raise
        if not switched:
            self.blobs.delete(version)
            logger.warning(
                "sticky: fenced: %s no longer holds %s:%s under epoch %s; its copy was "
                "not published",
                owner,
                workflow,
                key,
                epoch,
            )
            return False
        if previous and previous != version:
            self.blobs.delete(previous)
        return True

    def get(self, workflow: str, key: str) -> dict[str, Any] | None:
        """The key's copy, or None (none, unsigned, or signed with no known secret)."""
        if not self.enabled:
            return None
        version = self.leases.copy_pointer(workflow, key)
        if version is None:
            return None
        own = self._version_prefix(workflow, key)
        if not version.startswith(own) or not _VERSION_TAIL.fullmatch(version[len(own) :]):
            # The MAC binds the bytes to their version name, and the name to its key:
            # a pointer to another key's (validly signed) copy is a replay.
            logger.error(
                "sticky: refused the copy of %s:%s: its pointer names another key's copy",
                workflow,
                key,
            )
            return None
        blob = self.blobs.read(version)
        if blob is None:
            logger.error("sticky: the copy of %s:%s (%s) is missing", workflow, key, version)
            return None
        payload = self._open(version, blob)
        if payload is None:
            logger.error(
                "sticky: refused the copy of %s:%s: its signature does not check under "
                "sticky_secret (forged, corrupted, or signed with a secret this worker does "
                "not have)",
                workflow,
                key,
            )
            return None
        data: dict[str, Any] = pickle.loads(payload)  # authenticated above
        return data

    def retire(self, workflow: str, key: str, *, owner: str, epoch: int) -> bool:
        """Drop the key's copy if ``owner`` still holds it live under ``epoch``."""
        switched, previous = self.leases.switch_copy(workflow, key, owner, epoch, "", "")
        if switched and previous:
            self.blobs.delete(previous)
        return switched

    def _version_prefix(self, workflow: str, key: str) -> str:
        return f"{self.leases.prefix}copyv:{workflow}:{key}@"

    def _seal(self, name: str, payload: bytes) -> bytes:
        return MAGIC + self._mac(self._keys[0], name, payload) + payload

    def _open(self, name: str, blob: bytes) -> bytes | None:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _MAC_BYTES:
            return None
        mac = blob[len(MAGIC) : len(MAGIC) + _MAC_BYTES]
        payload = blob[len(MAGIC) + _MAC_BYTES :]
        for secret in self._keys:
            if hmac.compare_digest(mac, self._mac(secret, name, payload)):
                return payload
        return None

    @staticmethod
    def _mac(secret: bytes, name: str, payload: bytes) -> bytes:
        signer = hmac.new(secret, name.encode("utf-8", "surrogatepass") + b"\0", hashlib.sha256)
        signer.update(payload)
        return signer.digest()
