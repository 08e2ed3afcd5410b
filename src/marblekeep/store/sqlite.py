"""The default persistent backend: one SQLite database file (stdlib ``sqlite3``).

Layout (schema version 1)::

    records(key BLOB PRIMARY KEY, value BLOB)   -- one row per record; key = UTF-8 bytes
    meta(name TEXT PRIMARY KEY, value INTEGER)  -- 'revision' and 'schema'

The database runs in WAL mode with ``synchronous=FULL``: SQLite fsyncs the
write-ahead log before ``COMMIT`` returns, so a commit that returned survives
``kill -9`` and power loss. A commit is one ``BEGIN IMMEDIATE … COMMIT``
transaction that checks and bumps the revision row, so compare-and-set also
holds between processes sharing the file. All SQLite calls run on one worker
thread owned by the store; the event loop never blocks on disk I/O.

On open the store runs ``PRAGMA quick_check`` and refuses a damaged file with a
:class:`~marblekeep.errors.StoreError` (restore a backup, or recover).
See docs/adr/0001-sqlite-default-store.md for why SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from marblekeep.errors import ConflictError, StoreError
from marblekeep.store.base import Snapshot, check_key, check_writes

__all__ = ["SQLiteStore"]

_SCHEMA_VERSION = 1
_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', 1)",  # = _SCHEMA_VERSION
)


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with ``prefix`` (None: no bound)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SQLiteStore:
    """A :class:`~marblekeep.store.base.Store` in one SQLite file.

    ``SQLiteStore(path)`` does no I/O; the database is opened (and created with
    mode 0600 if absent) by the first operation. ``await SQLiteStore.open(path)``
    opens it at once so that errors surface early.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="marblekeep-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> SQLiteStore:
        store = cls(path, busy_timeout=busy_timeout)
        try:
            await store._run("open", lambda conn: None)
        except BaseException:
            await store.close()
            raise
        return store

    # -- plumbing --------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        created = not self.path.exists()
        if created:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
            except FileExistsError:
                created = False
            except OSError as exc:
                raise StoreError(
                    f"cannot create the state database {self.path}: {exc.strerror}; "
                    "check that the directory exists and is writable"
                ) from None
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_timeout
        )
        # a damaged file can hold any bytes where SQLite expects text: never fail on decoding
        conn.text_factory = lambda raw: raw.decode("utf-8", "replace")
        try:
            row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise StoreError(
                    f"SQLite store {self.path}: cannot switch to WAL journal mode; "
                    "use a local file system that supports shared memory"
                )
            conn.execute("PRAGMA synchronous=FULL")
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StoreError(
                    f"SQLite store {self.path} is damaged ({'; '.join(problems[:3])}); "
                    "restore it from a backup"
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                schema = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if schema is None or schema[0] != _SCHEMA_VERSION:
                raise StoreError(
                    f"SQLite store {self.path} has schema version {None if schema is None else schema[0]!r}, "
                    f"this marblekeep reads version {_SCHEMA_VERSION}; use a matching marblekeep release"
                )
            if created:
                _fsync_dir(self.path.parent)
        except BaseException:
            conn.close()
            raise
        return conn

    def _call(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StoreError(f"SQLite store {self.path} is closed")
        try:
            if self._conn is None:
                self._conn = self._connect()
            return fn(self._conn)
        except (sqlite3.Error, UnicodeError, ValueError, OverflowError) as exc:
            raise StoreError(
                f"SQLite store {self.path}: {what} failed ({type(exc).__name__}: {exc}); "
                "check the disk and the file, or restore a backup"
            ) from None

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StoreError(f"SQLite store {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, what, fn))

    def _decode_key(self, raw: object) -> str:
        if not isinstance(raw, bytes):
            raise StoreError(f"SQLite store {self.path}: a record key is not a BLOB; restore a backup")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(
                f"SQLite store {self.path}: record key {raw[:64].hex()} (hex) is not UTF-8; restore a backup"
            ) from None

    def _value(self, key: str, raw: object) -> bytes:
        if not isinstance(raw, bytes):
            raise StoreError(
                f"SQLite store {self.path}: the value of record {key!r} is not a BLOB; restore a backup"
            )
        return raw

    @staticmethod
    def _revision_of(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        if row is None or not isinstance(row[0], int):
            raise sqlite3.DatabaseError("the revision row is missing or not an integer")
        return int(row[0])

    def _select(self, conn: sqlite3.Connection, prefix: str) -> dict[str, bytes]:
        lo = prefix.encode("utf-8")
        hi = _prefix_end(lo)
        if hi is None:
            rows = conn.execute("SELECT key, value FROM records WHERE key >= ? ORDER BY key", (lo,))
        else:
            rows = conn.execute(
                "SELECT key, value FROM records WHERE key >= ? AND key < ? ORDER BY key", (lo, hi)
            )
        out: dict[str, bytes] = {}
        for raw_key, raw_value in rows.fetchall():
            key = self._decode_key(raw_key)
            out[key] = self._value(key, raw_value)
        return out

    # -- Store API -------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        encoded = check_key(key).encode("utf-8")

        def op(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT value FROM records WHERE key = ?", (encoded,)).fetchone()
            return None if row is None else self._value(key, row[0])

        return await self._run(f"reading {key!r}", op)

    async def list(self, prefix: str) -> dict[str, bytes]:
        return await self._run(f"listing {prefix!r}", lambda conn: self._select(conn, prefix))

    async def snapshot(self, prefix: str = "") -> Snapshot:
        def op(conn: sqlite3.Connection) -> Snapshot:
            conn.execute("BEGIN")
            try:
                revision = self._revision_of(conn)
                records = self._select(conn, prefix)
            finally:
                conn.execute("COMMIT")
            return Snapshot(revision, records)

        return await self._run(f"reading a snapshot of {prefix!r}", op)

    async def revision(self) -> int:
        return await self._run("reading the revision", self._revision_of)

    async def commit(self, writes: Mapping[str, bytes | None], *, expected_revision: int) -> int:
        checked = check_writes(writes)
        puts = [(k.encode("utf-8"), v) for k, v in checked.items() if v is not None]
        deletes = [(k.encode("utf-8"),) for k, v in checked.items() if v is None]

        def op(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE" if checked else "BEGIN")
            try:
                current = self._revision_of(conn)
                if current != expected_revision:
                    raise ConflictError(
                        f"store changed since revision {expected_revision} (now {current}); re-read and retry"
                    )
                if checked:
                    current += 1
                    conn.executemany("INSERT OR REPLACE INTO records (key, value) VALUES (?, ?)", puts)
                    conn.executemany("DELETE FROM records WHERE key = ?", deletes)
                    conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (current,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            return current

        return await self._run("commit", op)

    async def close(self) -> None:
        if self._closed:
            return

        def op() -> None:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, op)
        finally:
            self._closed = True
            self._executor.shutdown(wait=False)
