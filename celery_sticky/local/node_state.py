"""A worker node's local state on disk: fields, applied-task records, outbox.

One diskcache ``Cache`` per node, in ``<sticky_state_dir>/<nodename>/``, shared by
the node's pool processes, each opening it after the fork. Records are keyed by
``str`` (diskcache pickles any other key, slowly): a one-letter kind followed by
the record's parts, each written ``<length>:<text>`` (see :func:`encode_parts`),
so ``W`` below is ``<len(workflow)>:<workflow><len(key)>:<key>``:

=====================  ===================================================
``"v" W F``            field ``F``'s value, pickled; it exists exactly when the
                       field does, and its diskcache ``tag`` is the field's
                       version stamp (for the memory tier)
``"i" W``              the key's field names, a sorted tuple (rewritten only
                       when a field is added or removed)
``"k" W``              the key's meta row: ``(seq, last commit time, epoch,
                       streams)``: sequence number of the last applied task,
                       wall-clock time of the last commit, lease epoch the
                       state belongs to (None: not recorded), and the key's
                       producer streams, ``{stream: last number applied}``
                       (:class:`~celery_sticky.sequence.StreamRecord`)
``"a" W T``            applied record of task id ``T``: (seq, pickled result)
``"s" W N``            which task id was applied as seq ``N`` (for trimming), as
                       its encoded part ``T`` (a ``str`` value must be UTF-8)
``"o" W T``            messages task ``T`` published, not yet sent
``"O"``                the set of pending outbox records
``"r" W``              the version of the key's hand-over copy its log grows
                       from (``sync`` replication), when this node wrote or
                       imported it: where the next commit's entry goes
``"L"``                the layout of these records (:data:`LAYOUT`)
=====================  ===================================================

A one-entry commit touches as few rows as this allows: the field's value (with its
version in the same row), the meta row (with the streams), the applied record and
its ``"s"`` row. Earlier builds kept versions and streams in rows of their own; a
directory they wrote has no ``"L"`` row and is refused when opened (the version is
unreleased: there is no migration).

A commit writes a task's changes, its applied record and its outbox in one short
transaction (values are pickled and record keys built before it starts): all of
it or nothing. Its rows are written with a few SQL statements on the cache's own
connection (:mod:`celery_sticky.local.rows`, a third of what diskcache's calls
take); the applied record leaving the window hands its rows to the new one. It
returns a :class:`Change`, the commit's bytes, which ``sync`` replication appends
to the key's copy.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import diskcache

from ..errors import StateDirError, StateSizeLimitError
from ..sequence import StreamRecord
from ..settings import StickyConfig
from .memory import MISS, MemoryTier, Slot
from .private import PrivateDisk, check_private_dir, make_private_dir, make_private_files
from .rows import Rows
from .rows import supported as rows_supported

DELETED = object()
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL

OutboxRecord = tuple[str, str, str]  # (workflow, key, task id)
Meta = tuple[int, float | None, int | None]  # (seq, last commit time, epoch)

NO_META: Meta = (0, None, None)
PENDING_OUTBOXES = "O"
#: The record layout of this build (the ``"L"`` row); a directory without it, or
#: with another, is refused.
LAYOUT = 2
LAYOUT_KEY = "L"


class Change(NamedTuple):
    """What one commit changed in a key, in the bytes it stored: the entry ``sync``
    replication appends to the key's copy (:mod:`celery_sticky.handoff`), and
    :func:`apply_change` applies to an exported copy."""

    seq: int  # the key's number of applied tasks after it: one more than before
    written: dict[str, bytes]  # field -> its new value, pickled
    deleted: tuple[str, ...]
    cleared: bool  # every field not in ``written`` went first
    applied: tuple[str, int, bytes]  # (task id, seq, pickled result): its applied record
    last_commit: float
    epoch: int | None


def change_entry(change: Change, streams: dict[str, int]) -> dict[str, Any]:
    """``change`` as the entry of a copy's log (plain types only), with the key's record of
    applied producer numbers after it (``streams``)."""
    return {
        "seq": change.seq,
        "written": change.written,
        "deleted": list(change.deleted),
        "cleared": change.cleared,
        "applied": list(change.applied),
        "last_commit": change.last_commit,
        "epoch": change.epoch,
        "streams": streams,
    }


def apply_entry(data: dict[str, Any], entry: Any, seq: int, window: int) -> None:
    """Apply a copy's log entry (:func:`change_entry`), commit number ``seq``, to ``data``,
    an export (:meth:`NodeState.export_key`) that reaches ``seq - 1``; applied records
    are kept for the last ``window`` commits.

    Raises ``ValueError`` naming what is wrong when ``entry`` is not such an entry (the
    caller authenticated it: a malformed one is a bug or a version mismatch).
    """
    if not isinstance(entry, dict) or entry.get("seq") != seq:
        raise ValueError(f"it is not commit {seq} of the key")
    written, deleted, applied = entry.get("written"), entry.get("deleted"), entry.get("applied")
    if not (
        isinstance(written, dict)
        and all(isinstance(f, str) and isinstance(b, bytes) for f, b in written.items())
        and isinstance(deleted, list)
        and all(isinstance(f, str) for f in deleted)
        and isinstance(applied, list)
        and len(applied) == 3
        and isinstance(applied[0], str)
        and applied[1] == seq
        and isinstance(applied[2], bytes)
    ):
        raise ValueError(f"commit {seq} does not hold a commit's fields and applied record")
    fields = data.get("fields")
    if not isinstance(fields, dict) or entry.get("cleared"):
        fields = data["fields"] = {}
    fields.update(written)
    for field in deleted:
        fields.pop(field, None)
    records = data.get("applied")
    if not isinstance(records, list):
        records = data["applied"] = []
    records.append(tuple(applied))
    if len(records) > 2 * window:  # trimmed now and then, not on every entry
        records[:] = [record for record in records if record[1] > seq - window]
    data["seq"] = seq
    data["last_commit"] = entry.get("last_commit")
    data["epoch"] = entry.get("epoch")
    data["streams"] = StreamRecord.parse(entry.get("streams")).as_dict()


class AlreadyApplied(Exception):
    """The task id was applied before; ``result`` is what it returned then."""

    def __init__(self, result: Any) -> None:
        super().__init__("already applied")
        self.result = result


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=PICKLE_PROTOCOL)


def new_version() -> int:
    return int.from_bytes(os.urandom(8), "big") >> 1


# -- record keys -------------------------------------------------------------------


def _part(text: str) -> str:
    """One length-prefixed part: ``<len>:<text>``; ``<len>!<hex>`` when not UTF-8.

    SQLite stores keys as UTF-8, which a ``str`` with lone surrogates is not: such
    a part is written as the hex of its ``surrogatepass`` encoding, marked by ``!``.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            escaped = text.encode("utf-8", "surrogatepass").hex()
            return f"{len(escaped)}!{escaped}"
    return f"{len(text)}:{text}"


def encode_parts(*parts: str) -> str:
    """The parts of a record key, each length-prefixed: unambiguous for any ``str``."""
    return "".join([_part(part) for part in parts])


def decode_parts(text: str) -> list[str] | None:
    """The parts :func:`encode_parts` joined, or None when ``text`` is not such a join."""
    parts = []
    position = 0
    while position < len(text):
        colon = text.find(":", position)
        bang = text.find("!", position)
        mark = colon if bang < 0 or 0 <= colon < bang else bang
        digits = text[position:mark] if mark >= 0 else ""
        if not digits.isdigit() or not digits.isascii():
            return None
        end = mark + 1 + int(digits)
        if end > len(text):
            return None
        part = text[mark + 1 : end]
        if text[mark] == "!":
            try:
                part = bytes.fromhex(part).decode("utf-8", "surrogatepass")
            except ValueError:
                return None
        parts.append(part)
        position = end
    return parts


def _wk(workflow: str, key: str) -> str:
    return _part(workflow) + _part(key)


def _split_meta(row: Any) -> tuple[Meta, StreamRecord]:
    """The meta and the producer streams of a ``"k"`` row (None: the key has none)."""
    if row is None:
        return NO_META, StreamRecord()
    return row[:3], StreamRecord.parse(row[3])


def _meta_row(meta: Meta, streams: StreamRecord) -> tuple[Any, ...]:
    return (*meta, streams.as_dict())


class NodeState:
    """Every key's local state on one worker node."""

    def __init__(self, directory: str, config: StickyConfig) -> None:
        self.directory = directory
        self.config = config
        self.cache = diskcache.Cache(
            directory,
            eviction_policy="none",
            size_limit=2**62,
            statistics=False,
            disk=PrivateDisk,
        )
        make_private_files(directory)
        self._check_layout()
        self.memory = MemoryTier(config.memory_cache_bytes, config.memory_cache_min_bytes)
        #: The commit's fast path (None: diskcache's calls only, see local/rows.py).
        self._rows = Rows(self.cache) if rows_supported(self.cache) else None

    def close(self) -> None:
        self.cache.close()

    def _check_layout(self) -> None:
        """Mark an empty directory with :data:`LAYOUT`; refuse one another build wrote."""
        with self.cache.transact():
            found = self.cache.get(LAYOUT_KEY)
            if found is None and len(self.cache) == 0:
                self.cache.set(LAYOUT_KEY, LAYOUT)
                return
        if found != LAYOUT:
            self.cache.close()
            raise StateDirError(
                f"local state in {self.directory!r} has record layout {found or 1}, this "
                f"build reads layout {LAYOUT}: stop its worker with the build that wrote "
                "it (a drain hands every key on), or delete the directory to start its "
                "keys from their hand-over copies"
            )

    # -- reads -----------------------------------------------------------------

    def fields(self, workflow: str, key: str) -> tuple[str, ...]:
        return tuple(self.cache.get("i" + _wk(workflow, key), default=()))

    def read(self, workflow: str, key: str, field: str) -> Any:
        """The field's value, or ``MISS``; large values come from the memory tier."""
        suffix = _wk(workflow, key) + _part(field)
        slot = (self.directory, workflow, key, field)
        if self._rows is None:
            return self._read_calls(slot, "v" + suffix)
        for _attempt in range(3):
            version, stored = self._rows.read_field("v" + suffix)
            if version is None or stored is None:
                return MISS
            value = self.memory.get(slot, version)
            if value is not MISS:
                return value
            try:
                raw = self._rows.fetch(stored)
                break
            except OSError:  # its file went with a commit since: read that one
                continue
        else:
            return self._read_calls(slot, "v" + suffix)
        value = pickle.loads(raw)
        self.memory.put(slot, version, value, len(raw))
        return value

    def _read_calls(self, slot: Slot, value_key: str) -> Any:
        """:meth:`read` through diskcache's calls. ``read=True``: a value in a file is
        opened, and read only when the memory tier misses (a small one comes as bytes)."""
        found, version = self.cache.get(value_key, read=True, tag=True)
        if found is None:
            return MISS
        with contextlib.nullcontext() if isinstance(found, bytes) else found:
            value = self.memory.get(slot, version)
            if value is not MISS:
                return value
            raw = found if isinstance(found, bytes) else found.read()
        value = pickle.loads(raw)
        self.memory.put(slot, version, value, len(raw))
        return value

    def applied(self, workflow: str, key: str, task_id: str) -> tuple[bool, Any]:
        """``(True, result)`` when task ``task_id`` was applied to the key."""
        record = self.cache.get("a" + _wk(workflow, key) + _part(task_id))
        if record is None:
            return False, None
        return True, pickle.loads(record[1])

    def _meta(self, wk: str) -> Meta:
        row = self.cache.get("k" + wk)
        return NO_META if row is None else row[:3]

    def _meta_row(self, wk: str) -> tuple[Meta, StreamRecord]:
        """The key's meta and its producer streams (one ``"k"`` row)."""
        return _split_meta(self.cache.get("k" + wk))

    def last_commit(self, workflow: str, key: str) -> float | None:
        last = self._meta(_wk(workflow, key))[1]
        return None if last is None else float(last)

    # -- the commit ------------------------------------------------------------

    def commit(
        self,
        workflow: str,
        key: str,
        task_id: str,
        *,
        writes: Mapping[str, Any],
        cleared: bool,
        result: Any,
        outbox: list[dict[str, Any]],
        finish: bool,
        epoch: int = 0,
        stream: str = "",
        seq: int = 0,
    ) -> Change | None:
        """Apply a task's changes and record it as applied, atomically (with its
        number ``seq`` in producer ``stream``, when it has one). Returns what changed
        (:class:`Change`, what ``sync`` replication sends), or None when the task
        finished the workflow (the key's state is gone).

        Raises :class:`AlreadyApplied` (writing nothing) when the id was applied
        meanwhile, :class:`StateSizeLimitError` when the state would grow past
        ``sticky_state_size_limit``, and ``TypeError`` naming the field whose value
        cannot be pickled.

        The key's field index is read and rewritten only when the set of fields
        changes: a written field is new when its version row did not exist, a
        deleted one was there when deleting its version row removed something.
        """
        blobs: dict[str, Any] = {}
        for field, value in writes.items():
            if value is DELETED:
                blobs[field] = DELETED
                continue
            try:
                blobs[field] = dumps(value)
            except Exception as exc:
                raise TypeError(
                    f"state field {field!r} of {workflow}:{key} cannot be pickled: {exc}"
                ) from exc
        try:
            pickled_result = dumps(result)
        except Exception as exc:
            raise TypeError(f"the result of task {task_id} cannot be pickled: {exc}") from exc
        if self.config.state_size_limit is not None:
            self._check_size(workflow, key, sum(len(b) for b in blobs.values() if b is not DELETED))
        versions = {field: new_version() for field, blob in blobs.items() if blob is not DELETED}
        if finish:
            self._commit_finish(workflow, key, task_id, pickled_result, outbox)
            self.memory.discard_key(self.directory, workflow, key)
            return None
        old_fields: frozenset[str] = frozenset()
        if self._rows is not None and not cleared:
            applied = self._commit_rows(
                workflow, key, task_id, blobs, versions, pickled_result, epoch, stream, seq, outbox
            )
        else:
            applied, old_fields = self._commit_calls(
                workflow,
                key,
                task_id,
                blobs,
                versions,
                cleared,
                pickled_result,
                epoch,
                stream,
                seq,
                outbox,
            )
        # Outside the transaction: keep what this task wrote in the memory tier.
        written: dict[str, bytes] = {}
        deleted: list[str] = []
        for field, blob in blobs.items():
            slot = (self.directory, workflow, key, field)
            if blob is DELETED:
                deleted.append(field)
                self.memory.discard(slot)
            else:
                written[field] = blob
                self.memory.put(slot, versions[field], writes[field], len(blob))
        if cleared:
            for field in old_fields - set(blobs):
                self.memory.discard((self.directory, workflow, key, field))
        number, when, meta_epoch = applied
        return Change(
            seq=number,
            written=written,
            deleted=tuple(deleted),
            cleared=cleared,
            applied=(task_id, number, pickled_result),
            last_commit=when or 0.0,
            epoch=meta_epoch,
        )

    def _commit_rows(
        self,
        workflow: str,
        key: str,
        task_id: str,
        blobs: dict[str, Any],
        versions: dict[str, int],
        pickled_result: bytes,
        epoch: int,
        stream: str,
        seq: int,
        outbox: list[dict[str, Any]],
    ) -> Meta:
        """The commit of :meth:`commit` (not clearing, not finishing) as SQL statements
        on the cache's connection (:mod:`celery_sticky.local.rows`); returns the new meta."""
        assert self._rows is not None
        wk = _wk(workflow, key)
        task_part = _part(task_id)
        applied_key, meta_key = "a" + wk + task_part, "k" + wk
        with self._rows.commit() as rows:
            # Values first, outside the lock (large ones go to files, as Cache.set does).
            written, removed_keys = [], []
            for field, blob in blobs.items():
                suffix = wk + _part(field)
                if blob is DELETED:
                    removed_keys.append((field, "v" + suffix))
                else:
                    written.append((field, "v" + suffix, rows.encode(blob)))
            with rows.locked():
                now = time.time()
                wanted = [applied_key, meta_key]
                wanted += [value_key for _field, value_key, _value in written]
                found = rows.select(wanted, now)
                previous = found.get(applied_key)
                if previous is not None and previous.value is not None:
                    raise AlreadyApplied(pickle.loads(previous.value[1]))
                inserts: list[Any] = []
                added, removed = [], []
                for field, value_key, value in written:
                    # The value row exists exactly when the field does.
                    old = found.get(value_key)
                    if old is None:
                        added.append(field)
                    rows.write(value_key, value, old, now, inserts, tag=versions[field])
                for field, value_key in removed_keys:
                    if rows.delete(value_key)[0]:
                        removed.append(field)
                meta_row = found.get(meta_key)
                (old_seq, _, old_epoch), streams = _split_meta(
                    meta_row.value if meta_row is not None else None
                )
                number = int(old_seq) + 1
                meta: Meta = (number, now, epoch or old_epoch)
                if seq:
                    streams.advance(stream, seq)
                rows.write(meta_key, rows.encode(_meta_row(meta, streams)), meta_row, now, inserts)
                # The applied record leaving the window (trimmed) gives its rows to this one.
                expired = number - self.config.dedup_window
                old_number, old_applied = (
                    rows.trimmed("s" + wk + _part(str(expired)), "a" + wk)
                    if expired > 0
                    else (None, None)
                )
                applied = rows.encode((number, pickled_result))
                if old_applied is not None and (
                    previous is not None or old_applied.expire_time is not None
                ):
                    rows.delete_row(old_applied)
                    old_applied = None
                if old_applied is not None:
                    rows.write(applied_key, applied, old_applied, now, inserts, rekey=True)
                else:
                    rows.write(applied_key, applied, previous, now, inserts)
                number_key = "s" + wk + _part(str(number))
                rows.write(number_key, rows.encode(task_part), old_number, now, inserts, rekey=True)
                rows.insert(inserts)
                if added or removed:
                    index_key = "i" + wk
                    fields = set(self.cache.get(index_key, default=()))
                    fields.update(added)
                    fields.difference_update(removed)
                    self._write_index(index_key, fields)
                if outbox:
                    self._add_outbox(workflow, key, task_id, wk + task_part, outbox)
        return meta

    def _commit_calls(
        self,
        workflow: str,
        key: str,
        task_id: str,
        blobs: dict[str, Any],
        versions: dict[str, int],
        cleared: bool,
        pickled_result: bytes,
        epoch: int,
        stream: str,
        seq: int,
        outbox: list[dict[str, Any]],
    ) -> tuple[Meta, frozenset[str]]:
        """The commit of :meth:`commit` through diskcache's calls (a clearing commit, or
        a cache whose schema :mod:`celery_sticky.local.rows` does not know); returns the
        new meta and, when clearing, the fields the key had."""
        cache = self.cache
        wk = _wk(workflow, key)
        task_part = _part(task_id)
        applied_key = "a" + wk + task_part
        index_key = "i" + wk
        rows = [(field, blob, "v" + wk + _part(field)) for field, blob in blobs.items()]
        old_fields: frozenset[str] = frozenset()
        with cache.transact():
            previous = cache.get(applied_key)
            if previous is not None:
                raise AlreadyApplied(pickle.loads(previous[1]))
            if cleared:
                old_fields = frozenset(self.fields(workflow, key))
                kept = {field for field, blob in blobs.items() if blob is not DELETED}
                for field in old_fields - kept:
                    cache.delete("v" + wk + _part(field))
                for field, blob, value_key in rows:
                    if blob is not DELETED:
                        cache.set(value_key, blob, tag=versions[field])
                if kept != old_fields:
                    self._write_index(index_key, kept)
            else:
                added, removed = [], []
                for field, blob, value_key in rows:
                    # The value row exists exactly when the field does.
                    if blob is DELETED:
                        if cache.delete(value_key):
                            removed.append(field)
                        continue
                    if cache.add(value_key, blob, tag=versions[field]):
                        added.append(field)
                    else:
                        cache.set(value_key, blob, tag=versions[field])
                if added or removed:
                    fields = set(cache.get(index_key, default=()))
                    fields.update(added)
                    fields.difference_update(removed)
                    self._write_index(index_key, fields)
            meta = self._record_applied(wk, task_part, pickled_result, epoch, stream, seq)
            if outbox:
                self._add_outbox(workflow, key, task_id, wk + task_part, outbox)
        return meta, old_fields

    def _commit_finish(
        self,
        workflow: str,
        key: str,
        task_id: str,
        pickled_result: bytes,
        outbox: list[dict[str, Any]],
    ) -> None:
        """The last commit of a workflow: the key's state goes, its applied record stays
        for ``sticky_finished_dedup_ttl`` seconds."""
        cache = self.cache
        wk = _wk(workflow, key)
        task_part = _part(task_id)
        applied_key = "a" + wk + task_part
        with cache.transact():
            previous = cache.get(applied_key)
            if previous is not None:
                raise AlreadyApplied(pickle.loads(previous[1]))
            self._delete_key(wk, self.fields(workflow, key))
            cache.set(applied_key, (0, pickled_result), expire=self.config.finished_dedup_ttl)
            if outbox:
                self._add_outbox(workflow, key, task_id, wk + task_part, outbox)

    def _add_outbox(
        self, workflow: str, key: str, task_id: str, record: str, outbox: list[dict[str, Any]]
    ) -> None:
        self.cache.set("o" + record, outbox)
        pending = self.cache.get(PENDING_OUTBOXES, default=frozenset())
        self.cache.set(PENDING_OUTBOXES, pending | {(workflow, key, task_id)})

    def _write_index(self, index_key: str, fields: Iterable[str]) -> None:
        names = tuple(sorted(fields))
        if names:
            self.cache.set(index_key, names)
        else:
            self.cache.delete(index_key)

    def _record_applied(
        self, wk: str, task_part: str, result: bytes, epoch: int, stream: str, number: int
    ) -> Meta:
        """The applied record (its ``"s"`` row holds the task id's encoded part), and
        ``number`` of ``stream`` when it has one; returns the key's new meta."""
        cache = self.cache
        (seq, _, old_epoch), streams = self._meta_row(wk)
        seq = int(seq) + 1
        meta: Meta = (seq, time.time(), epoch or old_epoch)
        if number:
            streams.advance(stream, number)
        cache.set("k" + wk, _meta_row(meta, streams))
        cache.set("a" + wk + task_part, (seq, result))
        cache.set("s" + wk + _part(str(seq)), task_part)
        expired = seq - self.config.dedup_window
        if expired > 0:
            old = cache.pop("s" + wk + _part(str(expired)))
            if old is not None:
                cache.delete("a" + wk + old)
        return meta

    def streams(self, workflow: str, key: str) -> StreamRecord:
        """The key's last applied number per producer stream (:mod:`celery_sticky.sequence`)."""
        return self._meta_row(_wk(workflow, key))[1]

    def forget_streams(self, workflow: str, key: str) -> None:
        """The key's history is not all here (its state was lost): streams the record
        does not know may start at any number."""
        with self.cache.transact():
            wk = _wk(workflow, key)
            meta, streams = self._meta_row(wk)
            streams.complete = False
            self.cache.set("k" + wk, _meta_row(meta, streams))

    def consume(self, workflow: str, key: str, stream: str, seq: int) -> None:
        """Record number ``seq`` of ``stream`` as done without a commit: the task failed,
        was dead-lettered, or waits for its countdown (it runs when due)."""
        if seq:
            with self.cache.transact():
                wk = _wk(workflow, key)
                meta, streams = self._meta_row(wk)
                if streams.advance(stream, seq):
                    self.cache.set("k" + wk, _meta_row(meta, streams))

    def _delete_key(self, wk: str, fields: Iterable[str]) -> None:
        cache = self.cache
        for field in fields:
            cache.delete("v" + wk + _part(field))
        cache.delete("i" + wk)
        seq = int(self._meta(wk)[0])
        for number in range(max(1, seq - self.config.dedup_window + 1), seq + 1):
            old = cache.pop("s" + wk + _part(str(number)))
            if old is not None:
                cache.delete("a" + wk + old)
        cache.delete("k" + wk)
        cache.delete("r" + wk)

    def delete_key(self, workflow: str, key: str) -> None:
        """Forget everything about a key (its lease moved on, or it was released)."""
        with self.cache.transact():
            self._delete_key(_wk(workflow, key), self.fields(workflow, key))
        self.memory.discard_key(self.directory, workflow, key)

    # -- ownership changes -------------------------------------------------------

    def epoch(self, workflow: str, key: str) -> int | None:
        """The lease epoch the key's local state belongs to (None: no local state)."""
        epoch = self._meta(_wk(workflow, key))[2]
        return None if epoch is None else int(epoch)

    def local_keys(self) -> list[tuple[str, str, int]]:
        """``(workflow, key, epoch)`` of every key with local state (a full scan)."""
        found = []
        for record in self.cache.iterkeys():
            if not (isinstance(record, str) and record.startswith("k")):
                continue
            parts = decode_parts(record[1:])
            if parts is None or len(parts) != 2:
                continue
            meta = self.cache.get(record)
            if meta is not None and meta[2] is not None:
                found.append((parts[0], parts[1], int(meta[2])))
        return found

    def export_key(self, workflow: str, key: str) -> dict[str, Any] | None:
        """The key's state and applied records, as raw bytes, for a hand-over."""
        cache = self.cache
        wk = _wk(workflow, key)
        with cache.transact():
            (seq, last_commit, epoch), streams = self._meta_row(wk)
            fields = self.fields(workflow, key)
            if epoch is None and not fields:
                return None
            applied = []
            for number in range(max(1, seq - self.config.dedup_window + 1), seq + 1):
                task_part = cache.get("s" + wk + _part(str(number)))
                if task_part is None:
                    continue
                record = cache.get("a" + wk + task_part)
                task_ids = decode_parts(task_part)
                if record is not None and task_ids:
                    applied.append((task_ids[0], record[0], record[1]))
            return {
                "workflow": workflow,
                "key": key,
                "epoch": epoch,
                "seq": seq,
                "fields": {f: cache.get("v" + wk + _part(f)) for f in fields},
                "applied": applied,
                "last_commit": last_commit,
                "streams": streams.as_dict(),
            }

    def import_key(
        self,
        workflow: str,
        key: str,
        data: dict[str, Any],
        epoch: int,
        *,
        copy_version: str | None = None,
    ) -> None:
        """Replace the key's local state with an exported copy, under ``epoch``;
        ``copy_version``: the copy stays the key's, and its log grows from that version
        (:meth:`copy_version`)."""
        cache = self.cache
        wk = _wk(workflow, key)
        window = self.config.dedup_window
        with cache.transact():
            self._delete_key(wk, self.fields(workflow, key))
            fields = data.get("fields") or {}
            for field, blob in fields.items():
                suffix = wk + _part(field)
                cache.set("v" + suffix, blob, tag=new_version())
            if fields:
                cache.set("i" + wk, tuple(sorted(fields)))
            seq = int(data.get("seq") or 0)
            for task_id, number, result in data.get("applied") or ():
                if number > seq - window:  # a longer window than this node's keeps more
                    task_part = _part(task_id)
                    cache.set("a" + wk + task_part, (number, result))
                    cache.set("s" + wk + _part(str(number)), task_part)
            streams = StreamRecord.parse(data.get("streams"))
            cache.set("k" + wk, _meta_row((seq, data.get("last_commit"), epoch), streams))
            if copy_version is not None:
                cache.set("r" + wk, copy_version)
        self.memory.discard_key(self.directory, workflow, key)

    def copy_version(self, workflow: str, key: str) -> str | None:
        """The version of the key's copy its log grows from, as this node last wrote or
        imported it (None: the next copy is a full version). A hint: the lease store
        refuses an entry that does not follow on from the copy it has."""
        found = self.cache.get("r" + _wk(workflow, key))
        return found if isinstance(found, str) else None

    def set_copy_version(self, workflow: str, key: str, version: str | None) -> None:
        if version is None:
            self.cache.delete("r" + _wk(workflow, key))
        else:
            self.cache.set("r" + _wk(workflow, key), version)

    def applied_count(self, workflow: str, key: str) -> int:
        """How many tasks were applied to the key (its commits since it started here or
        in the copy it was imported from): a :class:`Change`'s ``seq``."""
        return int(self._meta(_wk(workflow, key))[0])

    def has_state(self, workflow: str, key: str) -> bool:
        """Whether the key has local state (fields, or a record of an epoch)."""
        return self._meta(_wk(workflow, key))[2] is not None or bool(self.fields(workflow, key))

    def reset_key(self, workflow: str, key: str, epoch: int) -> bool:
        """Start the key afresh under ``epoch``; True when there was local state to drop."""
        cache = self.cache
        wk = _wk(workflow, key)
        with cache.transact():
            fields = self.fields(workflow, key)
            had = self._meta(wk)[2] is not None or bool(fields)
            self._delete_key(wk, fields)
            cache.set("k" + wk, _meta_row((0, None, epoch), StreamRecord()))
        self.memory.discard_key(self.directory, workflow, key)
        return had

    def _check_size(self, workflow: str, key: str, incoming: int) -> None:
        limit = self.config.state_size_limit
        if limit is None:
            return
        used = self.cache.volume()
        if used + incoming > limit:
            raise StateSizeLimitError(
                f"committing {incoming} bytes to {workflow}:{key} would take the state in "
                f"{self.directory} to {used + incoming} bytes, past "
                f"sticky_state_size_limit={limit}; nothing was written"
            )

    # -- outbox ----------------------------------------------------------------

    def outbox(self, workflow: str, key: str, task_id: str) -> list[dict[str, Any]]:
        return list(self.cache.get("o" + _wk(workflow, key) + _part(task_id), default=()))

    def pending_outboxes(self) -> list[OutboxRecord]:
        return sorted(self.cache.get(PENDING_OUTBOXES, default=frozenset()))

    def outbox_sent(self, workflow: str, key: str, task_id: str) -> None:
        with self.cache.transact():
            self.cache.delete("o" + _wk(workflow, key) + _part(task_id))
            pending = self.cache.get(PENDING_OUTBOXES, default=frozenset())
            self.cache.set(PENDING_OUTBOXES, pending - {(workflow, key, task_id)})


# -- one NodeState per process and directory, opened after the fork -------------

_opened: dict[tuple[int, str], NodeState] = {}
_opened_lock = threading.Lock()


def node_directory(state_dir: str, nodename: str) -> str:
    return os.path.join(state_dir, nodename)


def open_node_state(config: StickyConfig, nodename: str) -> NodeState:
    """This process's ``NodeState`` for ``nodename``, opened on first use."""
    directory = node_directory(config.state_dir, nodename)
    slot = (os.getpid(), directory)
    state = _opened.get(slot)
    if state is None:
        with _opened_lock:
            state = _opened.get(slot)
            if state is None:
                state = _opened[slot] = NodeState(directory, config)
    return state


def check_node_directory(config: StickyConfig, nodename: str) -> str:
    """Fail at worker start, naming the directory, when local state is unusable.

    Creates the directory (``0700``; see :mod:`celery_sticky.local.private`),
    refuses one another user owns or others may write to, writes a probe file, and
    opens and reads the cache (a corrupt database fails here rather than at the
    first task). The cache is closed again: the pool processes open their own
    after the fork.
    """
    directory = node_directory(config.state_dir, nodename)
    try:
        make_private_dir(directory)
    except OSError as exc:
        raise StateDirError(f"sticky_state_dir: cannot create {directory!r}: {exc}") from exc
    check_private_dir(config.state_dir, owned=False)
    check_private_dir(directory, owned=True)
    try:
        probe = os.path.join(directory, f".write-probe-{os.getpid()}")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
        state = NodeState(directory, config)
        try:
            state.pending_outboxes()
            state.cache.volume()
        finally:
            state.close()
    except Exception as exc:
        raise StateDirError(
            f"sticky_state_dir: cannot use {directory!r} for local state: {exc}"
        ) from exc
    return directory


# Set by the worker bootstep in the main process, before the pool forks.
_current_node: str | None = None


def set_current_node(nodename: str) -> None:
    global _current_node
    _current_node = nodename


def current_node() -> str | None:
    """The nodename of the worker this process belongs to, if it is one."""
    return _current_node
