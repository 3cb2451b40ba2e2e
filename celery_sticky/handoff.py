"""Hand-over copies: where a key's state waits between two owners, fenced and signed.

A draining worker exports each key it owns (values, applied-task records) and
publishes it here; the next owner imports it before the key's first task runs
there. With ``sticky_state_replication = "sync"`` every commit also brings the
copy up to date, so a new owner can rebuild the state after a ``kill -9``.

A copy is a full **version** of the key's state followed by a **log** of the
commits since. A drain, a move or a first ``sync`` commit writes a version; every
later ``sync`` commit appends one entry to the log: the fields it changed (their
pickled bytes), the fields it deleted, its applied record and the key's record of
producer numbers: the changed values and about 250 bytes, whatever the state's
size, in one Redis call. When the log outgrows its budget
(``sticky_replication_log_entries`` entries, or ``sticky_replication_log_ratio``
times the version's size, never less than :data:`LOG_FLOOR_BYTES`), the next commit
writes a new version instead and the log starts over with it. An import is the
version with the log's entries applied in order; a drain whose copy is already
current has nothing to write.

Two things make a copy safe to use:

- **Fenced where it lands.** A version is first written under a fresh name that
  nobody reads, then made the key's copy by ``copy_switch.lua``; an entry is
  appended by ``copy_append.lua``. Both check atomically that the writer still
  holds the key live under the epoch it wrote with; the append also checks that
  the entry follows on from the copy as it is (the same version, the previous
  commit last). A paused or cut-off owner that resumes after another worker took
  the key over is refused, its version deleted: nothing it wrote becomes visible.
  The same scripts cover every backend, since the pointer and the log live in the
  lease store.
- **Signed.** Versions and entries are pickles; they are unpickled only when their
  HMAC-SHA256 under ``sticky_secret`` checks. A version's MAC binds it to its name
  (its key); an entry's, under a key derived from the secret for logs alone, binds
  it to its version and its commit number, so it can be replayed under no other
  key, version or place in the log. A log entry that does not check refuses the
  whole copy (a copy without some of its commits would silently lose them).
  Without a secret nothing is written or read.

Backends hold the versions' bytes (``sticky_handoff_store``): ``redis`` (the lease
store's Redis: :class:`~celery_sticky.lease.RedisHandoffStore`), ``dir:/path``
(a directory every worker mounts: :class:`DirectoryHandoffStore`, file names
derived from a hash of the version name, never from message fields), or a dotted
path to a class taking ``(config, lease_store)``. Logs always live in the lease
store's Redis, whatever the backend: their entries are small, and the fence needs
them where the lease is. :mod:`celery_sticky.context` builds one :class:`Copies`
per process.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import json
import logging
import os
import pickle
import re
import struct
import tempfile
import uuid
from typing import Any, NamedTuple, Protocol

from celery.utils.imports import symbol_by_name

from . import faults
from .lease import LeaseStore, RedisHandoffStore
from .lease.copies import CHUNK_BYTES
from .local.node_state import Change, apply_entry, change_entry
from .settings import StickyConfig

logger = logging.getLogger(__name__)

#: What every signed copy starts with (a format version, for later changes).
MAGIC = b"sticky-copy:1\n"
#: What every signed entry of a copy's log starts with.
LOG_MAGIC = b"sticky-log:1\n"
_MAC_BYTES = 32
#: Bytes a copy's log may always hold, however small its version.
LOG_FLOOR_BYTES = 64 * 1024
#: Largest entry appended to a log; a commit that changed more writes a new version
#: (in chunks: one Lua call must not carry megabytes).
MAX_ENTRY_BYTES = CHUNK_BYTES
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


class Appended(enum.Enum):
    """What :meth:`Copies.append` did."""

    APPENDED = "appended"
    REFUSED = "refused"  # the writer no longer holds the key: nothing became visible
    REBASE = "rebase"  # not appended: write a new full version (Copies.publish_version)


class Copy(NamedTuple):
    """A key's copy as :meth:`Copies.fetch` read it: the state (an export, with every
    entry of the log applied), the version its log grows from, and how many entries
    the log held."""

    data: dict[str, Any]
    version: str
    entries: int


class Copies:
    """Fenced, signed hand-over copies of keys' state (see the module doc)."""

    def __init__(self, config: StickyConfig, leases: LeaseStore, blobs: HandoffStore) -> None:
        self.config = config
        self.leases = leases
        self.blobs = blobs
        self._keys = [secret.encode() for secret in config.secret]
        # Entries are signed under keys of their own: no entry's MAC is a version's.
        self._log_keys = [
            hmac.new(secret, b"sticky-copy-log:1", hashlib.sha256).digest() for secret in self._keys
        ]

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
        return self.publish_version(workflow, key, data, owner=owner, epoch=epoch) is not None

    def publish_version(
        self, workflow: str, key: str, data: dict[str, Any], *, owner: str, epoch: int
    ) -> str | None:
        """:meth:`publish`, returning the new version's name (None where it returns
        False). The copy's log starts afresh from it: entries may follow ``data``'s
        applied count (``data["seq"]``, an export's)."""
        if not self.enabled:
            return None
        version = f"{self._version_prefix(workflow, key)}{epoch}.{uuid.uuid4().hex}"
        payload = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        blob = self._seal(version, payload)
        self.blobs.write(version, blob)
        seq = data.get("seq")
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
                seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
                size=len(blob),
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
            return None
        if previous and previous != version:
            self.blobs.delete(previous)
        return version

    def append(
        self,
        workflow: str,
        key: str,
        version: str,
        change: Change,
        *,
        streams: dict[str, int],
        owner: str,
        epoch: int,
    ) -> Appended:
        """Append ``change`` (commit ``change.seq`` of the key) to the log of the key's copy
        ``version``, if ``owner`` still holds the key live under ``epoch`` and the copy
        reaches commit ``change.seq - 1`` (copy_append.lua): one Redis call. ``streams``:
        the key's record of applied producer numbers after the commit."""
        if not self.enabled:
            return Appended.REFUSED
        payload = pickle.dumps(change_entry(change, streams), protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > MAX_ENTRY_BYTES:
            return Appended.REBASE
        header = LOG_MAGIC + self._entry_mac(self._log_keys[0], version, change.seq, payload)
        status = self.leases.append_copy_log(
            workflow,
            key,
            owner,
            epoch,
            version,
            change.seq,
            header + payload,
            streams=streams,
            max_entries=self.config.replication_log_entries,
            max_ratio=self.config.replication_log_ratio,
            floor_bytes=LOG_FLOOR_BYTES,
            fenced=not faults.UNFENCED,
        )
        if status > 0:
            return Appended.APPENDED
        if status < 0:
            return Appended.REBASE
        logger.warning(
            "sticky: fenced: %s no longer holds %s:%s under epoch %s; its commit %s was not "
            "added to the copy",
            owner,
            workflow,
            key,
            epoch,
            change.seq,
        )
        return Appended.REFUSED

    def is_current(
        self, workflow: str, key: str, version: str, seq: int, streams: dict[str, int]
    ) -> bool:
        """Whether the key's copy is ``version`` with its log at commit ``seq`` and the
        record of producer numbers ``streams``: a drain has nothing to write then."""
        pointer, head, record = self.leases.copy_position(workflow, key)
        if pointer != version or head != seq or record is None:
            return False
        try:
            return bool(json.loads(record) == streams)
        except ValueError:
            return False

    def get(self, workflow: str, key: str) -> dict[str, Any] | None:
        """The key's copy, or None (none, unsigned, or signed with no known secret)."""
        found = self.fetch(workflow, key)
        return None if found is None else found.data

    def fetch(self, workflow: str, key: str) -> Copy | None:
        """The key's copy: its version with its log applied, or None (none, or refused:
        a version or an entry unsigned, signed with no known secret, or not the key's,
        each said in an ERROR log line)."""
        if not self.enabled:
            return None
        version, entries = self.leases.copy_snapshot(workflow, key)
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
        if not entries:
            return Copy(data, version, 0)
        base = data.get("seq") if isinstance(data, dict) else None
        if not isinstance(base, int) or isinstance(base, bool):
            logger.error(
                "sticky: refused the copy of %s:%s: its log has %d entries but its version "
                "(%s) no commit number to apply them to",
                workflow,
                key,
                len(entries),
                version,
            )
            return None
        for position, entry in enumerate(entries):
            seq = base + 1 + position
            payload = self._open_entry(version, seq, entry)
            if payload is None:
                logger.error(
                    "sticky: refused the copy of %s:%s: entry %d of its log (commit %d after "
                    "%s) does not check under sticky_secret (forged, corrupted, moved from "
                    "another copy or place, or signed with a secret this worker does not "
                    "have); nothing of the copy was used",
                    workflow,
                    key,
                    position,
                    seq,
                    version,
                )
                return None
            try:
                apply_entry(data, pickle.loads(payload), seq, self.config.dedup_window)
            except ValueError as exc:  # authenticated, but not what this version writes
                logger.error(
                    "sticky: refused the copy of %s:%s: entry %d of its log cannot be applied: %s",
                    workflow,
                    key,
                    position,
                    exc,
                )
                return None
        return Copy(data, version, len(entries))

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

    def _open_entry(self, version: str, seq: int, entry: bytes) -> bytes | None:
        """The payload of a log entry if it is commit ``seq`` of ``version``'s log, signed."""
        start = len(LOG_MAGIC) + _MAC_BYTES
        if not entry.startswith(LOG_MAGIC) or len(entry) < start:
            return None
        mac, payload = entry[len(LOG_MAGIC) : start], entry[start:]
        for secret in self._log_keys:
            if hmac.compare_digest(mac, self._entry_mac(secret, version, seq, payload)):
                return payload
        return None

    @staticmethod
    def _entry_mac(secret: bytes, version: str, seq: int, payload: bytes) -> bytes:
        name = version.encode("utf-8", "surrogatepass")
        signer = hmac.new(secret, struct.pack(">QI", seq, len(name)) + name, hashlib.sha256)
        signer.update(payload)
        return signer.digest()

    @staticmethod
    def _mac(secret: bytes, name: str, payload: bytes) -> bytes:
        signer = hmac.new(secret, name.encode("utf-8", "surrogatepass") + b"\0", hashlib.sha256)
        signer.update(payload)
        return signer.digest()
