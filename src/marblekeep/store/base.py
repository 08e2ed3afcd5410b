"""The store interface every backend implements, and the transaction helper built on it.

A store is a flat, ordered map from ``str`` keys to ``bytes`` values plus one
monotonic *revision* number. It knows nothing about encryption or the
Coordinator's records; :mod:`marblekeep.store.sealed` puts the encryption
barrier on top of any store.

Rules every backend keeps (``tests/store/conformance.py`` checks them all):

1. ``commit(writes, expected_revision=r)`` applies every write (``None`` deletes)
   atomically, or none of them. It succeeds only if the store's revision is still
   ``r`` (compare-and-set) and raises :class:`~marblekeep.errors.ConflictError`
   otherwise. A non-empty commit returns the new revision, which is larger than
   any revision seen before; an empty commit only checks the revision.
2. When ``commit`` returns, the writes are durable (they survive ``kill -9`` and,
   for persistent backends, power loss).
3. ``list(prefix)`` returns exactly the keys that start with ``prefix``
   (``"secret:"`` never returns ``"secretX"``); ``snapshot(prefix)`` returns the
   same together with the revision it was read at, as one consistent read.
4. Keys are non-empty strings without NUL characters, at most
   :data:`MAX_KEY_LENGTH` UTF-8 bytes; values are ``bytes``. Anything else is a
   :class:`~marblekeep.errors.StoreError` naming the key.
5. Every backend failure surfaces as :class:`~marblekeep.errors.StoreError`; using a
   closed store is one too.

:class:`Transaction` gives read-your-writes reads over a store and commits with
compare-and-set against the revision read when it began: if anything was
committed in between, ``commit`` raises ``ConflictError`` and the caller retries
with a new transaction. That also holds for a transaction that only read: its
``commit`` tells whether the reads were consistent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from marblekeep.errors import StoreError

__all__ = ["MAX_KEY_LENGTH", "Snapshot", "Store", "Transaction", "check_key", "check_writes"]

#: Longest key a backend must accept, in UTF-8 bytes (etcd's default limit is far above this).
MAX_KEY_LENGTH = 4096


@dataclass(frozen=True)
class Snapshot:
    """A consistent read of every record under a prefix, and the revision it was read at."""

    revision: int
    records: Mapping[str, bytes] = field(default_factory=dict)


@runtime_checkable
class Store(Protocol):
    """A backend: ordered ``str -> bytes`` records, one revision, atomic compare-and-set commits."""

    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None``."""
        ...

    async def list(self, prefix: str) -> dict[str, bytes]:
        """Every record whose key starts with ``prefix`` (``""`` = all)."""
        ...

    async def snapshot(self, prefix: str = "") -> Snapshot:
        """Like :meth:`list`, read consistently together with the revision."""
        ...

    async def revision(self) -> int:
        """The revision of the last commit (0 for a store that was never written)."""
        ...

    async def commit(self, writes: Mapping[str, bytes | None], *, expected_revision: int) -> int:
        """Apply ``writes`` atomically if the revision is still ``expected_revision``; return the new one."""
        ...

    async def close(self) -> None:
        """Release the backend. Further calls raise ``StoreError``; closing twice is harmless."""
        ...


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid store key, else raise ``StoreError`` naming it."""
    if not isinstance(key, str):
        raise StoreError(f"store key must be a str, got {type(key).__name__}")
    if not key:
        raise StoreError("store key must not be empty")
    if "\x00" in key:
        raise StoreError(f"store key {key[:64]!r} contains a NUL character; use printable names")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(
            f"store key {key[:64]!r} is not valid UTF-8 (lone surrogate); use printable names"
        ) from None
    if len(encoded) > MAX_KEY_LENGTH:
        raise StoreError(f"store key {key[:64]!r}... is longer than {MAX_KEY_LENGTH} bytes; shorten it")
    return key


def check_writes(writes: Mapping[str, bytes | None]) -> dict[str, bytes | None]:
    """Validate a commit's write set; values must be ``bytes`` (``bytearray``/``memoryview`` are copied)."""
    checked: dict[str, bytes | None] = {}
    for key, value in writes.items():
        check_key(key)
        if value is None or isinstance(value, bytes):
            checked[key] = value
        elif isinstance(value, bytearray | memoryview):
            checked[key] = bytes(value)
        else:
            raise StoreError(f"value for store key {key!r} must be bytes or None, got {type(value).__name__}")
    return checked


class Transaction:
    """Read-your-writes view of a store, committed with compare-and-set.

    ``tx = await Transaction.begin(store)`` remembers the store's revision;
    reads go to the pending writes first, then to the store; ``put``/``delete``
    only record; ``await tx.commit()`` applies everything in one store commit
    that fails with ``ConflictError`` if the store changed since ``begin``. A
    transaction is used once: after ``commit`` or ``discard`` it is closed.
    """

    def __init__(self, store: Store, revision: int) -> None:
        self._store = store
        self.revision = revision
        self._writes: dict[str, bytes | None] = {}
        self._open = True

    @classmethod
    async def begin(cls, store: Store) -> Transaction:
        return cls(store, await store.revision())

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("transaction already committed or discarded; begin a new one")

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        check_key(key)
        if key in self._writes:
            return self._writes[key]
        return await self._store.get(key)

    async def list(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        merged = await self._store.list(prefix)
        for key, value in self._writes.items():
            if key.startswith(prefix):
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
        return dict(sorted(merged.items()))

    def put(self, key: str, value: bytes) -> None:
        self._check_open()
        self._writes.update(check_writes({key: value}))

    def delete(self, key: str) -> None:
        self._check_open()
        self._writes[check_key(key)] = None

    @property
    def writes(self) -> Mapping[str, bytes | None]:
        """The pending writes (``None`` = delete)."""
        return dict(self._writes)

    async def commit(self) -> int:
        """Commit the writes; returns the new revision (the old one if nothing was written)."""
        self._check_open()
        self._open = False
        return await self._store.commit(self._writes, expected_revision=self.revision)

    def discard(self) -> None:
        self._open = False
