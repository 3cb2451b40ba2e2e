"""The commit's rows, written with SQL on the diskcache ``Cache``'s own connection.

A task's commit is the one local write on every step's path: its changed fields, its
applied record, the key's meta row and the trim of the oldest applied record. Through
diskcache's calls that took 24 SQLite statements (each ``set`` is a SELECT, an UPDATE or
INSERT and a cull query, each ``delete`` and ``pop`` a small transaction of its own),
about 0.18 ms a commit, most of it spent outside SQLite's COMMIT. :class:`Rows` does
the same writes in 6 statements for a one-entry change: one SELECT for every row the
commit reads or replaces, an UPDATE by rowid (or one multi-row INSERT) for each row it
writes (the field's value, its version in diskcache's ``tag`` column; the key's meta
row, with its producer streams), one SELECT for the applied record that leaves the
dedup window, and that record hands its two rows to the new one (an UPDATE of their
key), which leaves the table's end and the expiry index alone: 7 pages to the WAL
instead of 12 (``benchmarks/state_access.py``, docs/performance.md).

It stays diskcache's store: the statements run inside ``Cache.transact()`` (one
transaction with any diskcache call made there, serialised against every other
writer the same way), keys and values are encoded by the cache's own ``Disk`` (so
``Cache.get`` reads them back unchanged, values of 32 KB and more in files as
usual), and diskcache's triggers keep its ``count`` and ``size`` (``volume()``)
exact. What it skips is the cull of expired rows each ``set`` makes; the commit
writes no expiring row (the end of a workflow, which does, still goes through
``set``).

It relies on diskcache's schema, the ``Cache`` table's columns and its unique
index on ``(key, raw)`` (diskcache 5; 5.6.3 is tested), on SQLite 3.35 or later
(``DELETE ... RETURNING``), and on ``Cache._con``, the cache's per-thread connection
(reopened after a fork), which diskcache does not document. :func:`supported` checks
the schema when a cache is opened; on any other
:class:`~celery_sticky.local.node_state.NodeState` commits through diskcache's calls.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import diskcache

logger = logging.getLogger(__name__)

#: The columns of diskcache's ``Cache`` table (diskcache 5).
CACHE_COLUMNS = (
    "rowid",
    "key",
    "raw",
    "store_time",
    "expire_time",
    "access_time",
    "access_count",
    "tag",
    "size",
    "mode",
    "filename",
    "value",
)
#: Rows whose value :meth:`RowCommit.select` returns (small records); others give None.
_VALUED_KINDS = "('a', 'k', 'i')"
# ``tag`` is diskcache's own column (``Cache.set(..., tag=...)``): a field's value row
# keeps the field's version there (see node_state.py), other rows keep None.
_UPDATE = (
    "UPDATE Cache SET store_time = ?, access_time = ?, tag = ?, size = ?, mode = ?,"
    " filename = ?, value = ? WHERE rowid = ?"
)
# A row that had an expiry (an applied record left by an ended workflow) loses it.
_UPDATE_EXPIRING = (
    "UPDATE Cache SET store_time = ?, expire_time = NULL, access_time = ?, tag = ?, size = ?,"
    " mode = ?, filename = ?, value = ? WHERE rowid = ?"
)
# OR REPLACE: the commit inserts only rows its SELECT did not find, but for an "s" row
# a damaged store may have left behind (a short str value: no file to remove).
_INSERT = (
    "INSERT OR REPLACE INTO Cache(key, raw, store_time, expire_time, access_time,"
    " access_count, tag, size, mode, filename, value) VALUES "
)
_INSERT_ROW = "(?, 1, ?, NULL, ?, 0, ?, ?, ?, ?, ?)"
_INSERT_PARAMS = _INSERT_ROW.count("?")
# A row taking another key: the applied record leaving the window makes room for the
# new one. Its rowid and expiry stay, so neither the table's end nor the expiry index
# is touched: three fewer pages to the WAL per commit than a DELETE and an INSERT.
_REKEY = (
    "UPDATE OR REPLACE Cache SET key = ?, store_time = ?, access_time = ?, tag = ?, size = ?,"
    " mode = ?, filename = ?, value = ? WHERE rowid = ?"
)
_READ_FIELD = "SELECT tag, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
_DELETE = "DELETE FROM Cache WHERE key = ? AND raw = 1 RETURNING filename, mode, value"
_DELETE_ROW = "DELETE FROM Cache WHERE rowid = ? RETURNING filename"
# The "s" row of a number and the "a" row it names (its value is the task id's part).
_TRIMMED = (
    "SELECT s.rowid, a.rowid, a.expire_time, a.filename FROM Cache AS s"
    " LEFT JOIN Cache AS a ON a.key = ? || s.value AND a.raw = 1"
    " WHERE s.key = ? AND s.raw = 1"
)


class Row(NamedTuple):
    """A row :meth:`RowCommit.select` found: its rowid, expiry, file and (small kinds) value."""

    rowid: int
    expire_time: float | None
    filename: str | None
    value: Any


def supported(cache: diskcache.Cache) -> bool:
    """Whether ``cache`` has the schema :class:`Rows` writes, on a SQLite it runs on
    (see the module doc)."""
    try:
        con = cache._con
        columns = tuple(row[1] for row in con.execute("PRAGMA table_info(Cache)"))
        indexes = {row[1]: row[2] for row in con.execute("PRAGMA index_list(Cache)")}
        unique = [row[2] for row in con.execute("PRAGMA index_info(Cache_key_raw)")]
    except Exception:
        logger.warning("sticky: cannot read diskcache's schema", exc_info=True)
        return False
    ok = columns == CACHE_COLUMNS and indexes.get("Cache_key_raw") == 1 and unique == ["key", "raw"]
    if ok and sqlite3.sqlite_version_info < (3, 35):  # DELETE ... RETURNING
        logger.warning(
            "sticky: SQLite %s is older than 3.35; commits go through diskcache's calls (slower)",
            sqlite3.sqlite_version,
        )
        return False
    if not ok:
        logger.warning(
            "sticky: diskcache %s keeps a schema this version does not know (columns %s); "
            "commits go through diskcache's calls (slower)",
            getattr(diskcache, "__version__", "?"),
            columns,
        )
    return ok


#: Most rows one statement selects: a commit of thousands of fields stays under
#: SQLite's limit on a statement's parameters (32,766 by default since 3.32, 999
#: before) in statements of a size SQLite plans quickly.
_BATCH = 128
#: Most rows one INSERT takes: each takes ``_INSERT_PARAMS`` parameters, 999 at most.
_INSERT_BATCH = 999 // _INSERT_PARAMS


@functools.lru_cache(maxsize=_BATCH)
def _select(count: int) -> str:
    return (
        "SELECT key, rowid, expire_time, mode, filename, CASE WHEN substr(key, 1, 1) IN "
        f"{_VALUED_KINDS} THEN value END FROM Cache WHERE key IN ({', '.join('?' * count)})"
        " AND raw = 1"
    )


@functools.lru_cache(maxsize=_INSERT_BATCH)
def _insert(count: int) -> str:
    return _INSERT + ", ".join([_INSERT_ROW] * count)


class Rows:
    """Direct row access to one diskcache ``Cache`` (see the module doc)."""

    def __init__(self, cache: diskcache.Cache) -> None:
        self.cache = cache
        self.disk = cache.disk

    def read_field(self, value_key: str) -> tuple[Any, Any]:
        """A field's version (its value row's tag) and its ``Disk.fetch`` arguments
        ``(mode, filename, value)``, from one row: never a version with another
        commit's value; ``(None, None)`` when the field does not exist."""
        found = self.cache._con.execute(_READ_FIELD, (value_key,)).fetchone()
        if found is None:
            return None, None
        tag, mode, filename, value = found
        return tag, (mode, filename, value)

    def fetch(self, stored: tuple[Any, Any, Any]) -> Any:
        """The value :meth:`read_pair` found (a file is read now)."""
        mode, filename, value = stored
        return self.disk.fetch(mode, filename, value, False)

    def commit(self) -> RowCommit:
        """One commit's writes, a context manager: files of rows it replaced or deleted
        are removed when it succeeded, the files it wrote when it failed (as
        ``Cache.set`` does)."""
        return RowCommit(self)


class RowCommit:
    """The statements of one commit. Values are encoded with :meth:`encode` before
    :meth:`locked` (large ones are written to files then, outside the write lock, as
    ``Cache.set`` does); the other methods run inside it."""

    def __init__(self, rows: Rows) -> None:
        self.cache = rows.cache
        self.disk = rows.disk
        self.sql: Any = None
        self.old_files: list[str] = []
        self.new_files: list[str] = []

    def __enter__(self) -> RowCommit:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.remove(self.new_files if kind is not None else self.old_files)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """``Cache.transact()``, with the cache's connection at hand."""
        with self.cache.transact():
            self.sql = self.cache._con.execute
            try:
                yield
            finally:
                self.sql = None

    def encode(self, value: Any) -> tuple[int, int, str | None, Any]:
        """``(size, mode, filename, db value)`` of ``value``, as ``Cache.set`` stores it."""
        encoded: tuple[int, int, str | None, Any] = self.disk.store(value, False)
        if encoded[2] is not None:
            self.new_files.append(encoded[2])
        return encoded

    def select(self, keys: Iterable[str], now: float) -> dict[str, Row]:
        """The rows of ``keys`` (str keys) that exist, in one statement (per ``_BATCH``
        keys). The value is decoded for the small kinds (applied, meta, streams, index
        records); a row that expired has ``value`` None and ``expire_time`` -1 (it is
        replaced, not read)."""
        names = list(keys)
        found = {}
        for start in range(0, len(names), _BATCH):
            batch = names[start : start + _BATCH]
            for key, rowid, expire_time, mode, filename, value in self.sql(
                _select(len(batch)), batch
            ):
                live = expire_time is None or expire_time > now
                decoded = self.disk.fetch(mode, filename, value, False) if live and mode else None
                found[key] = Row(rowid, expire_time if live else -1.0, filename, decoded)
        return found

    def write(
        self,
        key: str,
        encoded: tuple[int, int, str | None, Any],
        row: Row | None,
        now: float,
        inserts: list[Any],
        *,
        rekey: bool = False,
        tag: int | None = None,
    ) -> None:
        """Replace ``row`` (found by :meth:`select`) with ``encoded`` and ``tag``, or
        queue an insert for :meth:`insert` when there is none. ``rekey``: ``row`` is
        another key's (from :meth:`trimmed`), which it becomes."""
        size, mode, filename, value = encoded
        if row is None:
            inserts.extend((key, now, now, tag, size, mode, filename, value))
            return
        if row.filename:
            self.old_files.append(row.filename)
        if rekey:
            self.sql(_REKEY, (key, now, now, tag, size, mode, filename, value, row.rowid))
            return
        statement = _UPDATE if row.expire_time is None else _UPDATE_EXPIRING
        self.sql(statement, (now, now, tag, size, mode, filename, value, row.rowid))

    def trimmed(self, number_key: str, applied_prefix: str) -> tuple[Row | None, Row | None]:
        """The ``"s"`` row ``number_key`` and the ``"a"`` row it names (``applied_prefix``
        followed by its value), each None when missing; values are not read."""
        found = self.sql(_TRIMMED, (applied_prefix, number_key)).fetchone()
        if found is None:
            return None, None
        number_rowid, applied_rowid, expire_time, filename = found
        number_row = Row(number_rowid, None, None, None)
        if applied_rowid is None:
            return number_row, None
        return number_row, Row(applied_rowid, expire_time, filename, None)

    def delete_row(self, row: Row) -> None:
        """Delete ``row`` (found by :meth:`select` or :meth:`trimmed`)."""
        if self.sql(_DELETE_ROW, (row.rowid,)).fetchone() is not None and row.filename:
            self.old_files.append(row.filename)

    def insert(self, inserts: list[Any]) -> None:
        """Insert the rows :meth:`write` queued: one statement (per ``_INSERT_BATCH`` rows)."""
        step = _INSERT_PARAMS * _INSERT_BATCH
        for start in range(0, len(inserts), step):
            batch = inserts[start : start + step]
            self.sql(_insert(len(batch) // _INSERT_PARAMS), batch)

    def delete(self, key: str) -> tuple[bool, Any]:
        """Delete the row of ``key``: ``(whether it existed, its value if stored raw)``
        (a short ``str`` or an ``int`` is; see ``Disk.store``)."""
        found = self.sql(_DELETE, (key,)).fetchone()
        if found is None:
            return False, None
        filename, mode, value = found
        if filename:
            self.old_files.append(filename)
        return True, value if mode == diskcache.core.MODE_RAW else None

    def remove(self, filenames: list[str]) -> None:
        for name in filenames:
            self.disk.remove(name)
