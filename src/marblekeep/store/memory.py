"""In-memory store: for tests and for ``SealMode: Disabled`` (nothing is persisted, as in MarbleRun)."""

from __future__ import annotations

from collections.abc import Mapping

from marblekeep.errors import ConflictError, StoreError
from marblekeep.store.base import Snapshot, check_key, check_writes

__all__ = ["MemoryStore"]


class MemoryStore:
    """A :class:`~marblekeep.store.base.Store` held in a dict.

    Every method runs without awaiting in between, so each call is atomic with
    respect to the other tasks of the event loop.
    """

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}
        self._revision = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the in-memory store is closed")

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        return self._records.get(check_key(key))

    async def list(self, prefix: str) -> dict[str, bytes]:
        self._check_open()
        return {k: v for k, v in sorted(self._records.items()) if k.startswith(prefix)}

    async def snapshot(self, prefix: str = "") -> Snapshot:
        self._check_open()
        return Snapshot(self._revision, await self.list(prefix))

    async def revision(self) -> int:
        self._check_open()
        return self._revision

    async def commit(self, writes: Mapping[str, bytes | None], *, expected_revision: int) -> int:
        self._check_open()
        checked = check_writes(writes)
        if expected_revision != self._revision:
            raise ConflictError(
                f"store changed since revision {expected_revision} (now {self._revision}); re-read and retry"
            )
        if not checked:
            return self._revision
        for key, value in checked.items():
            if value is None:
                self._records.pop(key, None)
            else:
                self._records[key] = value
        self._revision += 1
        return self._revision

    async def close(self) -> None:
        self._closed = True
