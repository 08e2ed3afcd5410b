"""The rollback anchor: the highest state epoch this Coordinator has sealed, kept beside the KEK.

File format (128 bytes): two 64-byte slots. A slot is::

    b"MKA1" || generation (u32 BE) || store_id (16) || epoch (u64 BE) || HMAC-SHA256(K, first 32 bytes)

with ``K = HKDF-SHA256(KEK, salt=None, info=b"marblekeep/rollback-anchor/v1", L=32)``.
Epoch ``e`` is written to slot ``e % 2`` with one ``pwrite`` + ``fsync``; a torn
write damages one slot only and the other still holds ``e - 1``, which the
store accepts (a state may be ahead of its anchor, never behind it). A reset
(new state, operator override) bumps the generation and writes both slots; the
valid slot with the highest ``(generation, epoch)`` wins on read.

Only someone holding the KEK can forge a slot. Someone who controls the disk
can still delete the file or put back an old copy of it *together with* an old
database; see docs/operations.md ("Rollback protection") for what this covers.
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from marblekeep.errors import StoreError

__all__ = ["AnchorReading", "AnchorStatus", "RollbackAnchor"]

_MAGIC = b"MKA1"
_BODY = struct.Struct(">4sI16sQ")  # 32 bytes
_SLOT = 64
_INFO = b"marblekeep/rollback-anchor/v1"


class AnchorStatus(enum.Enum):
    MISSING = "missing"  # no anchor file
    INVALID = "invalid"  # a file, but no slot verifies under this KEK
    VALID = "valid"


@dataclass(frozen=True)
class AnchorReading:
    status: AnchorStatus
    generation: int = 0
    store_id: bytes = b""
    epoch: int = 0


class RollbackAnchor:
    """Reads and writes one anchor file, authenticated with a key derived from the KEK."""

    def __init__(self, path: Path, kek: bytes) -> None:
        self.path = Path(path)
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(kek)

    def _slot(self, generation: int, store_id: bytes, epoch: int) -> bytes:
        body = _BODY.pack(_MAGIC, generation, store_id, epoch)
        return body + hmac.new(self._key, body, sha256).digest()

    def read(self) -> AnchorReading:
        try:
            with open(self.path, "rb") as f:
                data = f.read(2 * _SLOT + 1)
        except FileNotFoundError:
            return AnchorReading(AnchorStatus.MISSING)
        except OSError as exc:
            raise StoreError(f"cannot read the rollback anchor {self.path}: {exc.strerror}") from None
        best: AnchorReading | None = None
        for i in range(2):
            slot = data[i * _SLOT : (i + 1) * _SLOT]
            if len(slot) != _SLOT:
                continue
            body, mac = slot[:32], slot[32:]
            if not hmac.compare_digest(hmac.new(self._key, body, sha256).digest(), mac):
                continue
            magic, generation, store_id, epoch = _BODY.unpack(body)
            if magic != _MAGIC:
                continue
            reading = AnchorReading(AnchorStatus.VALID, generation, store_id, epoch)
            if best is None or (generation, epoch) > (best.generation, best.epoch):
                best = reading
        return best if best is not None else AnchorReading(AnchorStatus.INVALID)

    def write(self, store_id: bytes, epoch: int, *, reset: bool = False, generation: int = 0) -> int:
        """Record ``epoch`` for ``store_id``; returns the generation written.

        ``reset=True`` starts a new generation (``generation + 1``) and writes both
        slots; otherwise only slot ``epoch % 2`` is written under ``generation``.
        """
        if len(store_id) != 16:
            raise StoreError("rollback anchor: the store id must be 16 bytes")
        if reset:
            generation += 1
        slot = self._slot(generation, store_id, epoch)
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if reset or created:
                    os.pwrite(fd, slot + slot, 0)
                else:
                    os.pwrite(fd, slot, (epoch % 2) * _SLOT)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            raise StoreError(
                f"cannot write the rollback anchor {self.path}: {exc.strerror}; check the anchor directory"
            ) from None
        return generation
