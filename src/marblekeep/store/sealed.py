"""The encryption barrier: a :class:`SealedStore` encrypts every record before it reaches a backend.

Storage is untrusted. What the backend (SQLite file, etcd, …) holds::

    meta:format         b"marblekeep-sealed-store/1"                    plaintext
    meta:wrapped_dek    1 || store_id(16) || key_id(16) || nonce(12) || AES-GCM(DKEK, DEK)
                        AAD = b"marblekeep/wrapped-dek/v1\\0" || store_id || key_id
    meta:kek/<id>       1 || nonce(12) || AES-GCM(KEK, DKEK), AAD = b"marblekeep/deployment-kek/v1\\0" || id
                        one per replica sealing key;
                        ``id`` = hex(HMAC-SHA256(KEK, b"marblekeep/kek-id/v1")[:16])
    meta:recovery_data  MarbleRun's recovery data R (JSON), plaintext: needed before the DEK is known
    meta:public         public metadata (JSON; opaque to the store, written by the Coordinator: the
                        recovery public keys and whether the state was created in simulation),
                        plaintext: needed before the DEK is known (absent in older states)
    sys:state           sealed index record (below)
    data:<key>          one sealed record per user key

The **deployment KEK** (DKEK, 32 random bytes) wraps the DEK; each replica's own KEK (its sealing
key, :mod:`marblekeep.store.kek`) wraps the DKEK under ``meta:kek/<id>``. A DEK change (manifest
set, new recovery keys) re-wraps only under the DKEK, so it needs nothing from other replicas; a
replica whose KEK has no entry obtains the DKEK from a running replica (the attested hand-over,
:mod:`marblekeep.handover`) and adds its own entry. A state written before the DKEK existed
(``meta:wrapped_dek`` directly under the KEK, no ``meta:kek/`` entry) is migrated at its first
open. The entries are not covered by the sealed index: each is authenticated by AES-GCM under its
replica's KEK, and deleting one only costs that replica a hand-over.

A sealed record is ``1 || key_id(16) || nonce(12) || AES-256-GCM(DEK, value)`` with
``AAD = b"marblekeep/record/v1\\0" || 1 || key_id || <backend key>`` and a fresh random
nonce per write, so a record cannot be moved to another key, swapped with another
record or decrypted under another DEK. **Key names are not encrypted** (names such as
``secret:db-password`` leak to whoever reads the disk); values are.

``sys:state`` (sealed like a record) holds ``b"MKS1" || store_id || epoch (u64) ||
record count (u64) || index digest (32) || public-metadata hash``, the hash being
``SHA-256(0x00)`` (no R) or ``SHA-256(0x01 || R)`` without ``meta:public``, and
``SHA-256(0x02 || u64(len(h)) || h || public metadata)`` with it (``h`` the former form), so
both plaintext records are authenticated once the DEK is known. The index digest is
``Σ HMAC-SHA256(K_idx, len(key) || key || sealed record) mod 2^256`` over every
``data:`` record, ``K_idx = HKDF(DEK, info=b"marblekeep/record-index/v1")``: a record
that is removed, added, or replaced by an older sealed copy of itself changes it. The
epoch grows by one with every commit and is the rollback counter
(:mod:`marblekeep.store.anchor`).

Opening (:func:`open_sealed_store`) gives one of:

- :class:`Opened` with ``fresh=True``: the backend is empty; a new DEK is made and
  nothing is written until the first commit (MarbleRun persists nothing before a manifest).
- :class:`Opened` with ``fresh=False``: the DEK unwrapped and *every* record
  verified (decrypts under the DEK, index digest and count match, R matches).
- :class:`NeedsRecovery`: the KEK does not open ``meta:wrapped_dek`` (other CPU,
  other enclave, key file lost), the wrapped DEK is missing, or it is a different
  DEK than the one the data was written with (an old ``meta:wrapped_dek`` paired
  with newer data). The Coordinator enters Recovery; :class:`PendingRecovery`
  tests candidate DEKs, completes the recovery or discards the old state.

and raises, never loading wrong data and never resetting silently:

- :class:`~marblekeep.errors.IntegrityError` naming the record when data fails
  authentication under a valid DEK, or records are missing/unknown;
- :class:`~marblekeep.errors.RollbackError` when the state's epoch is below the
  anchor's (unless ``allow_rollback=True``, which logs a WARNING and resets the anchor);
- :class:`~marblekeep.errors.StoreError` / ``ConfigError`` from the backend and KEK provider.

At run time every read is checked against the in-memory index built at open, so
a record changed underneath the running Coordinator is an ``IntegrityError`` too;
if the backend's revision moved (another writer), the store re-verifies everything
first. All methods are serialised by one lock.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from marblekeep.errors import ConflictError, IntegrityError, RollbackError, SealError, StoreError
from marblekeep.store.anchor import AnchorReading, AnchorStatus, RollbackAnchor
from marblekeep.store.base import Snapshot, Store, check_key, check_writes
from marblekeep.store.kek import KEK_SIZE, KeyEncryptionKeyProvider

__all__ = [
    "DEK_SIZE",
    "META_KEK_PREFIX",
    "HandoverFloor",
    "HandoverNeeded",
    "NeedsRecovery",
    "OpenResult",
    "Opened",
    "PendingRecovery",
    "SealedStore",
    "kek_id",
    "open_sealed_store",
]

SEAL_LOG = logging.getLogger("marblekeep.seal")

DEK_SIZE = 32
FORMAT = b"marblekeep-sealed-store/1"
META_FORMAT = "meta:format"
META_WRAPPED_DEK = "meta:wrapped_dek"
META_RECOVERY_DATA = "meta:recovery_data"
META_PUBLIC = "meta:public"
SYS_STATE = "sys:state"
META_KEK_PREFIX = "meta:kek/"
DATA_PREFIX = "data:"
_META_KEYS = frozenset({META_FORMAT, META_WRAPPED_DEK, META_RECOVERY_DATA, META_PUBLIC, SYS_STATE})

_VERSION = 1
_ID = 16
_NONCE = 12
_TAG = 16
_HEADER = 1 + _ID
_RECORD_AAD = b"marblekeep/record/v1\x00"
_WRAP_AAD = b"marblekeep/wrapped-dek/v1\x00"
_DKEK_AAD = b"marblekeep/deployment-kek/v1\x00"
_KEK_ID_INFO = b"marblekeep/kek-id/v1"
_INDEX_INFO = b"marblekeep/record-index/v1"
_STATE = struct.Struct(">4s16sQQ32s32s")
_STATE_MAGIC = b"MKS1"
_MOD = 1 << 256
#: How an operator applies the rollback override (named in every rollback refusal).
_OVERRIDE = "(marblekeep coordinator --allow-rollback; allow_rollback in the configuration)"

Rng = Callable[[int], bytes]


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP


# --------------------------------------------------------------------------------------------
# pure helpers


def _recovery_data_hash(recovery_data: bytes | None, public_metadata: bytes | None = None) -> bytes:
    """The sealed index's hash of the plaintext metadata (R and the public recovery keys)."""
    base = b"\x00" if recovery_data is None else b"\x01" + recovery_data
    if public_metadata is None:  # the format before meta:public existed
        return sha256(base).digest()
    return sha256(b"\x02" + struct.pack(">Q", len(base)) + base + public_metadata).digest()


class HandoverNeeded(SealError):
    """Another replica stored the shared state first, under a deployment KEK this replica's KEK has
    no entry for: the replica needs the attested hand-over (:meth:`SealedStore.adopt_handover`)."""


class _DekMismatch(Exception):
    """The data was written under another DEK than the unwrapped one (internal signal)."""


@dataclass(frozen=True)
class _Keyring:
    dek: bytes
    key_id: bytes

    @property
    def aead(self) -> AESGCM:
        return AESGCM(self.dek)

    @property
    def index_key(self) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INDEX_INFO).derive(self.dek)


class _Crypto:
    """Record sealing under one DEK."""

    def __init__(self, keyring: _Keyring, rng: Rng) -> None:
        self.keyring = keyring
        self._aead = keyring.aead
        self._index_key = keyring.index_key
        self._rng = rng

    def seal(self, inner_key: str, value: bytes) -> bytes:
        header = bytes([_VERSION]) + self.keyring.key_id
        nonce = self._rng(_NONCE)
        aad = _RECORD_AAD + header + inner_key.encode("utf-8")
        return header + nonce + self._aead.encrypt(nonce, value, aad)

    def open(self, inner_key: str, blob: bytes, *, mismatch_is_integrity: bool = True) -> bytes:
        user_key = inner_key.removeprefix(DATA_PREFIX)
        if len(blob) < _HEADER + _NONCE + _TAG or blob[0] != _VERSION:
            raise IntegrityError(
                f"stored record {user_key!r} is malformed: the storage was damaged or tampered with; "
                "restore a backup"
            )
        if blob[1:_HEADER] != self.keyring.key_id:
            if not mismatch_is_integrity:
                raise _DekMismatch
            raise IntegrityError(
                f"stored record {user_key!r} was encrypted under another data-encryption key than the rest "
                "of the state: records from different states were mixed; restore a backup"
            )
        aad = _RECORD_AAD + blob[:_HEADER] + inner_key.encode("utf-8")
        try:
            return self._aead.decrypt(blob[_HEADER : _HEADER + _NONCE], blob[_HEADER + _NONCE :], aad)
        except InvalidTag:
            raise IntegrityError(
                f"stored record {user_key!r} fails authentication under the state's key: it was modified, "
                "moved from another key or damaged; restore a backup"
            ) from None

    def element(self, inner_key: str, blob: bytes) -> int:
        encoded = inner_key.encode("utf-8")
        mac = hmac.new(self._index_key, struct.pack(">I", len(encoded)) + encoded + blob, sha256)
        return int.from_bytes(mac.digest(), "big")


def _wrap(kek: bytes, store_id: bytes, keyring: _Keyring, rng: Rng) -> bytes:
    nonce = rng(_NONCE)
    aad = _WRAP_AAD + store_id + keyring.key_id
    sealed = AESGCM(kek).encrypt(nonce, keyring.dek, aad)
    return bytes([_VERSION]) + store_id + keyring.key_id + nonce + sealed


def kek_id(kek: bytes) -> str:
    """The public id of a replica's KEK: ``hex(HMAC-SHA256(KEK, b"marblekeep/kek-id/v1")[:16])``."""
    return hmac.new(kek, _KEK_ID_INFO, sha256).digest()[:_ID].hex()


def _wrap_dkek(kek: bytes, dkek: bytes, rng: Rng) -> tuple[str, bytes]:
    """``(record key, record)`` of this KEK's entry holding the deployment KEK."""
    ident = kek_id(kek)
    nonce = rng(_NONCE)
    return META_KEK_PREFIX + ident, bytes([_VERSION]) + nonce + AESGCM(kek).encrypt(
        nonce, dkek, _DKEK_AAD + ident.encode("ascii")
    )


def _unwrap_dkek(kek: bytes, records: Mapping[str, bytes]) -> bytes | None:
    """The deployment KEK from this KEK's entry, or ``None`` (no entry, or it does not open)."""
    ident = kek_id(kek)
    blob = records.get(META_KEK_PREFIX + ident)
    if blob is None or len(blob) != 1 + _NONCE + KEK_SIZE + _TAG or blob[0] != _VERSION:
        return None
    try:
        aad = _DKEK_AAD + ident.encode("ascii")
        return AESGCM(kek).decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], aad)
    except InvalidTag:
        return None


def _kek_entries(records: Mapping[str, bytes]) -> list[str]:
    return sorted(k for k in records if k.startswith(META_KEK_PREFIX))


def _unwrap(kek: bytes, blob: bytes) -> tuple[bytes, _Keyring] | None:
    """``(store_id, keyring)`` or ``None`` if this KEK does not open the wrapped DEK."""
    if len(blob) != 1 + 2 * _ID + _NONCE + DEK_SIZE + _TAG or blob[0] != _VERSION:
        return None
    store_id, key_id = blob[1 : 1 + _ID], blob[1 + _ID : 1 + 2 * _ID]
    nonce, ct = blob[1 + 2 * _ID : 1 + 2 * _ID + _NONCE], blob[1 + 2 * _ID + _NONCE :]
    try:
        dek = AESGCM(kek).decrypt(nonce, ct, _WRAP_AAD + store_id + key_id)
    except InvalidTag:
        return None
    return store_id, _Keyring(dek, key_id)


@dataclass
class _State:
    """What the sealed index says, plus the per-record elements computed while verifying."""

    store_id: bytes
    epoch: int
    elements: dict[str, int]
    digest: int
    recovery_data: bytes | None
    public_metadata: bytes | None = None

    def sealed(self, crypto: _Crypto) -> bytes:
        body = _STATE.pack(
            _STATE_MAGIC,
            self.store_id,
            self.epoch,
            len(self.elements),
            self.digest.to_bytes(32, "big"),
            _recovery_data_hash(self.recovery_data, self.public_metadata),
        )
        return crypto.seal(SYS_STATE, body)

    def next_epoch(self, elements: dict[str, int] | None = None, digest: int | None = None) -> _State:
        """The state of the next commit: one epoch on, with the given elements and digest, else a copy
        of these."""
        return replace(
            self,
            epoch=self.epoch + 1,
            elements=dict(self.elements) if elements is None else elements,
            digest=self.digest if digest is None else digest,
        )


def _key_id_of(blob: bytes) -> bytes | None:
    if len(blob) < _HEADER or blob[0] != _VERSION:
        return None
    return blob[1:_HEADER]


def _check_layout(records: Mapping[str, bytes]) -> None:
    for key in records:
        if key not in _META_KEYS and not key.startswith((DATA_PREFIX, META_KEK_PREFIX)):
            raise IntegrityError(
                f"the stored state holds an unexpected record {key!r}: it was tampered with or "
                "written by another program; restore a backup"
            )
    fmt = records.get(META_FORMAT)
    if fmt is None:
        raise IntegrityError(
            f"the stored state has records but no {META_FORMAT!r} record: it is incomplete or "
            "damaged; restore a backup"
        )
    if fmt != FORMAT:
        raise IntegrityError(
            f"record {META_FORMAT!r} names an unknown state format: the state was damaged or written by "
            "a newer marblekeep; use a matching release or restore a backup"
        )


def _open_index(blob: bytes, crypto: _Crypto) -> tuple[bytes, int, int, bytes, bytes]:
    """``(store id, epoch, record count, index digest, metadata hash)`` from a sealed ``sys:state``.

    Raises ``_DekMismatch`` (sealed under another DEK) or ``IntegrityError``."""
    body = crypto.open(SYS_STATE, blob, mismatch_is_integrity=False)
    if len(body) != _STATE.size:
        raise IntegrityError(f"record {SYS_STATE!r} has an unknown layout; restore a backup")
    magic, store_id, epoch, count, digest_bytes, rd_hash = _STATE.unpack(body)
    if magic != _STATE_MAGIC:
        raise IntegrityError(f"record {SYS_STATE!r} has an unknown layout; restore a backup")
    return store_id, epoch, count, digest_bytes, rd_hash


def _verify(records: Mapping[str, bytes], crypto: _Crypto) -> _State:
    """Check every record against the sealed index. Raises ``_DekMismatch`` or ``IntegrityError``."""
    blob = records.get(SYS_STATE)
    if blob is None:
        raise IntegrityError(
            f"the stored state has no {SYS_STATE!r} record: it is incomplete or damaged; restore a backup"
        )
    store_id, epoch, count, digest_bytes, rd_hash = _open_index(blob, crypto)
    elements: dict[str, int] = {}
    digest = 0
    for key, value in records.items():
        if key.startswith(DATA_PREFIX):
            crypto.open(key, value)
            elements[key] = crypto.element(key, value)
            digest = (digest + elements[key]) % _MOD
    if len(elements) != count or digest != int.from_bytes(digest_bytes, "big"):
        raise IntegrityError(
            f"the stored records do not match the sealed index (expected {count} records, found "
            f"{len(elements)}): a record was removed, added or replaced by an older copy; restore a backup"
        )
    recovery_data = records.get(META_RECOVERY_DATA)
    public_metadata = records.get(META_PUBLIC)
    if _recovery_data_hash(recovery_data, public_metadata) != rd_hash:
        raise IntegrityError(
            f"record {META_RECOVERY_DATA!r} or {META_PUBLIC!r} does not match the sealed index: it "
            "was modified; restore a backup"
        )
    return _State(store_id, epoch, elements, digest, recovery_data, public_metadata)


# --------------------------------------------------------------------------------------------
# the store


class SealedStore:
    """A :class:`~marblekeep.store.base.Store` whose values are sealed with the DEK.

    Made by :func:`open_sealed_store` (or :class:`PendingRecovery`), never directly.
    The revision is the backend's; the sealed ``epoch`` counts commits.
    """

    def __init__(
        self,
        inner: Store,
        crypto: _Crypto,
        state: _State,
        revision: int,
        *,
        kek: bytes | None,
        provider: KeyEncryptionKeyProvider | None,
        anchor_generation: int,
        rng: Rng,
        unwritten: bool,
        pending_deletes: frozenset[str] = frozenset(),
        reset_anchor: bool = False,
        deployment_kek: bytes | None = None,
    ) -> None:
        self._inner = inner
        self._dkek = deployment_kek
        self._crypto = crypto
        self._state = state
        self._revision = revision
        self._kek = kek
        self._provider = provider
        self._anchor_generation = anchor_generation
        self._rng = rng
        self._unwritten = unwritten  # meta records not yet in the backend (fresh / discarded state)
        self._pending_deletes = pending_deletes
        self._reset_anchor = reset_anchor
        self._stale = False
        self._lock = asyncio.Lock()

    # -- properties --------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """How many commits the sealed state has seen (the rollback counter)."""
        return self._state.epoch

    @property
    def store_id(self) -> bytes:
        """Random 16-byte identity of this state, made when it was first created."""
        return self._state.store_id

    @property
    def recovery_data(self) -> bytes | None:
        """MarbleRun's recovery data R as stored (``None``: none, e.g. single recovery key)."""
        return self._state.recovery_data

    @property
    def public_metadata(self) -> bytes | None:
        """The public metadata record as stored and verified (``None``: not stored, an older state)."""
        return self._state.public_metadata

    @property
    def inner(self) -> Store:
        return self._inner

    @property
    def written(self) -> bool:
        """Whether this state is in the backend (``False``: fresh, nothing committed yet)."""
        return not self._unwritten

    def deployment_kek_for_handover(self) -> bytes | None:
        """The deployment KEK, for the attested hand-over to another replica only (``None``: none)."""
        return None if self._unwritten else self._dkek

    # -- internal ----------------------------------------------------------------------------

    def _anchor(self) -> RollbackAnchor | None:
        if self._provider is None or self._kek is None:
            return None
        path = self._provider.anchor_path
        return None if path is None else RollbackAnchor(path, self._kek)

    async def _write_anchor(self) -> None:
        anchor = self._anchor()
        if anchor is None:
            return
        try:
            self._anchor_generation = await asyncio.to_thread(
                anchor.write,
                self._state.store_id,
                self._state.epoch,
                reset=self._reset_anchor,
                generation=self._anchor_generation,
            )
            self._reset_anchor = False
        except StoreError as exc:
            # The commit itself is durable. An anchor that lags behind is accepted on load,
            # so this only weakens rollback protection until the next successful write.
            SEAL_LOG.error("state committed at epoch %d, but %s", self._state.epoch, exc.message)

    async def _reload(self) -> Snapshot:
        """Re-verify everything after another writer moved the backend's revision; the snapshot read."""
        if self._kek is None:
            raise StoreError("the sealed state changed underneath a store without a KEK; restart")
        snap = await self._inner.snapshot("")
        _check_layout(snap.records)
        wrapped = snap.records.get(META_WRAPPED_DEK)
        dkek = self._dkek
        if self._unwritten and self._kek is not None:  # another replica wrote the first state
            dkek = _unwrap_dkek(self._kek, snap.records)
            if dkek is None and _kek_entries(snap.records):
                raise HandoverNeeded(
                    "another replica stored the shared state first: this replica needs the deployment "
                    "key from it (attested hand-over, docs/ha.md); retry in a moment"
                )
        unwrapped = None if wrapped is None or dkek is None else _unwrap(dkek, wrapped)
        if unwrapped is None:
            raise SealError(
                "the stored state changed and its data-encryption key no longer unwraps with this "
                "Coordinator's key; restart the Coordinator (it will enter recovery)"
            )
        crypto = _Crypto(unwrapped[1], self._rng)
        try:
            state = _verify(snap.records, crypto)
        except _DekMismatch:
            raise SealError(
                "the stored state changed and its wrapped key does not belong to its data; restart "
                "the Coordinator (it will enter recovery)"
            ) from None
        if state.store_id != self._state.store_id and not self._unwritten:
            raise IntegrityError(
                "the stored state was replaced by a different state; restart the Coordinator"
            )
        if state.epoch < self._state.epoch:
            raise RollbackError(
                f"the stored state went back from epoch {self._state.epoch} to {state.epoch} while "
                "running: the storage is being rolled back; restart and investigate"
            )
        advanced = state.epoch > self._state.epoch
        self._dkek = dkek
        self._crypto, self._state, self._revision = crypto, state, snap.revision
        self._unwritten, self._pending_deletes, self._stale = False, frozenset(), False
        if advanced:  # another writer (a replica on a shared store) sealed newer epochs: remember them
            await self._write_anchor()
        return snap

    async def _refresh_if_unwritten(self) -> None:
        if self._unwritten and (self._stale or await self._inner.revision() != self._revision):
            await self._reload()

    async def _refresh(self) -> None:
        if self._stale or await self._inner.revision() != self._revision:
            await self._reload()

    def _mismatch(self, user_key: str) -> IntegrityError:
        return IntegrityError(
            f"stored record {user_key!r} does not match the sealed index (removed, added or replaced by "
            "an older copy while running): the storage was tampered with; restore a backup"
        )

    async def _commit_inner(self, writes: dict[str, bytes | None], state: _State, crypto: _Crypto) -> int:
        writes[SYS_STATE] = state.sealed(crypto)
        if self._unwritten:
            assert self._kek is not None or self._provider is None
            for key in self._pending_deletes:
                writes.setdefault(key, None)
            writes[META_FORMAT] = FORMAT
            if self._kek is not None:
                assert self._dkek is not None
                writes[META_WRAPPED_DEK] = _wrap(self._dkek, state.store_id, crypto.keyring, self._rng)
                entry_key, entry = _wrap_dkek(self._kek, self._dkek, self._rng)
                writes[entry_key] = entry
        if state.recovery_data != self._state.recovery_data or self._unwritten:
            writes[META_RECOVERY_DATA] = state.recovery_data
        if state.public_metadata != self._state.public_metadata or self._unwritten:
            writes[META_PUBLIC] = state.public_metadata
        try:
            revision = await self._inner.commit(writes, expected_revision=self._revision)
        except StoreError:  # a conflict, or a backend failure: re-read the backend before trusting memory
            self._stale = True
            raise
        self._crypto, self._state, self._revision = crypto, state, revision
        self._unwritten, self._pending_deletes = False, frozenset()
        await self._write_anchor()
        return revision

    # -- Store API ---------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        inner_key = DATA_PREFIX + check_key(key)
        async with self._lock:
            for _ in range(3):
                await self._refresh_if_unwritten()
                if self._unwritten:
                    return None  # nothing of this state is in the backend yet
                if self._stale:
                    await self._reload()
                blob = await self._inner.get(inner_key)
                expected = self._state.elements.get(inner_key)
                if blob is None and expected is None:
                    return None
                if blob is not None and expected == self._crypto.element(inner_key, blob):
                    return self._crypto.open(inner_key, blob)
                if await self._inner.revision() == self._revision:
                    raise self._mismatch(key)
                self._stale = True
            raise StoreError("the state keeps changing under concurrent writers; retry")

    async def snapshot(self, prefix: str = "") -> Snapshot:
        inner_prefix = DATA_PREFIX + prefix
        async with self._lock:
            for _ in range(3):
                await self._refresh_if_unwritten()
                if self._unwritten:
                    return Snapshot(self._revision, {})
                if self._stale or (not prefix and await self._inner.revision() != self._revision):
                    # re-verified just now: serve the records of that same read (a replica that
                    # follows busy writers would otherwise never catch a quiet moment)
                    full = await self._reload()
                    if not prefix:
                        return Snapshot(
                            full.revision,
                            {
                                k.removeprefix(DATA_PREFIX): self._crypto.open(k, v)
                                for k, v in sorted(full.records.items())
                                if k.startswith(DATA_PREFIX)
                            },
                        )
                snap = await self._inner.snapshot(inner_prefix)
                if snap.revision != self._revision:
                    self._stale = True
                    continue
                expected = {k for k in self._state.elements if k.startswith(inner_prefix)}
                differing = expected.symmetric_difference(snap.records)
                if differing:
                    raise self._mismatch(min(differing).removeprefix(DATA_PREFIX))
                out: dict[str, bytes] = {}
                for k, blob in snap.records.items():
                    if self._state.elements[k] != self._crypto.element(k, blob):
                        raise self._mismatch(k.removeprefix(DATA_PREFIX))
                    out[k.removeprefix(DATA_PREFIX)] = self._crypto.open(k, blob)
                return Snapshot(snap.revision, out)
            raise StoreError("the state keeps changing under concurrent writers; retry")

    async def list(self, prefix: str) -> dict[str, bytes]:
        return dict((await self.snapshot(prefix)).records)

    async def changes_since(self, revision: int, likely: Sequence[str] = ()) -> Snapshot | None:
        """The user records that other writers changed after ``revision``, verified and opened, with
        the new revision (``Snapshot(revision, {})``: nothing changed); this store then serves that
        revision. For a replica following the others' commits: the cost is what changed, not the
        size of the state.

        ``likely``: user-key prefixes where the changes usually are (activation counts). Those are
        read first; when they and the sealed index agree, nothing else changed (the index digest
        covers every record), so the backend never ranges over the rest; otherwise every record
        changed since ``revision`` is read.

        ``None`` when the changes cannot be taken one by one; the caller then reads the whole state
        (:meth:`snapshot`, which re-verifies everything): the backend cannot list changes (SQLite),
        this store does not hold ``revision`` verified, a large commit is being applied, anything but
        data records changed (a new DEK, recovery data, another replica's key entry), or a record
        was deleted.

        As safe as re-verifying everything: a record etcd did not rewrite since ``revision`` is the
        one verified before (a write always raises its ``mod_revision``; a backend going back in
        revision or changing identity is refused by the backend), and the changed records, the
        unchanged ones' known index elements and the new sealed index must agree (count and
        digest), with the epoch not going back."""
        changes_since = getattr(self._inner, "changes_since", None)
        if changes_since is None:
            return None
        async with self._lock:
            if self._unwritten or self._kek is None or self._revision != revision:
                return None
            if likely:
                narrow = [SYS_STATE, *(DATA_PREFIX + prefix for prefix in likely)]
                taken = await self._take_changes(await changes_since(revision, narrow), revision)
                if taken is not None:
                    return taken
            return await self._take_changes(await changes_since(revision), revision)

    async def _take_changes(self, changed: Snapshot | None, revision: int) -> Snapshot | None:
        """Verify ``changed`` (backend records written after ``revision``) against its sealed index
        and take it; ``None`` (nothing taken) when they do not account for the whole change."""
        if changed is None:
            return None
        if changed.revision == revision:
            return Snapshot(revision, {})
        records = changed.records
        blob = records.get(SYS_STATE)
        if blob is None or any(k != SYS_STATE and not k.startswith(DATA_PREFIX) for k in records):
            return None
        crypto = self._crypto
        try:
            store_id, epoch, count, digest_bytes, rd_hash = _open_index(blob, crypto)
        except _DekMismatch:
            return None
        state = self._state
        if store_id != state.store_id or epoch < state.epoch:
            return None  # the full read decides (IntegrityError / RollbackError)
        elements = state.elements
        digest = state.digest
        fresh: dict[str, int] = {}  # the changed records' index elements
        out: dict[str, bytes] = {}
        for key, value in records.items():
            if key == SYS_STATE:
                continue
            out[key.removeprefix(DATA_PREFIX)] = crypto.open(key, value)
            old = elements.get(key)
            if old is not None:
                digest = (digest - old) % _MOD
            fresh[key] = crypto.element(key, value)
            digest = (digest + fresh[key]) % _MOD
        added = sum(1 for key in fresh if key not in elements)
        if (
            len(elements) + added != count
            or digest != int.from_bytes(digest_bytes, "big")
            or _recovery_data_hash(state.recovery_data, state.public_metadata) != rd_hash
        ):
            return None  # a record was deleted, or something is wrong: the full read decides
        advanced = epoch > state.epoch
        elements.update(fresh)  # in place: copying would cost the size of the state
        self._state = replace(state, epoch=epoch, elements=elements, digest=digest)
        self._revision, self._stale = changed.revision, False
        if advanced:  # remember the epochs other writers sealed (as _reload does)
            await self._write_anchor()
        return Snapshot(changed.revision, out)

    async def revision(self) -> int:
        async with self._lock:
            await self._refresh()
            return self._revision

    async def commit(self, writes: Mapping[str, bytes | None], *, expected_revision: int) -> int:
        checked = check_writes(writes)
        async with self._lock:
            # No round trip to learn the backend's revision: the backend's own compare-and-set
            # refuses the commit if another writer moved it (and marks this view stale).
            if self._stale or self._unwritten:
                await self._refresh()
            if expected_revision != self._revision:
                raise ConflictError(
                    f"store changed since revision {expected_revision} (now {self._revision}); "
                    "re-read and retry"
                )
            if not checked:
                return self._revision
            # The element index is updated in place (copying it would cost the size of the state on
            # every commit) and put back exactly as it was if the commit does not go through.
            before = self._state
            elements = before.elements
            undo: dict[str, int | None] = {}
            digest = before.digest
            inner_writes: dict[str, bytes | None] = {}
            try:
                for key, value in checked.items():
                    inner_key = DATA_PREFIX + key
                    old = elements.pop(inner_key, None)
                    undo.setdefault(inner_key, old)
                    if old is not None:
                        digest = (digest - old) % _MOD
                    if value is None:
                        inner_writes[inner_key] = None
                    else:
                        blob = self._crypto.seal(inner_key, value)
                        inner_writes[inner_key] = blob
                        elements[inner_key] = self._crypto.element(inner_key, blob)
                        digest = (digest + elements[inner_key]) % _MOD
                state = self._state.next_epoch(elements, digest)
                return await self._commit_inner(inner_writes, state, self._crypto)
            except BaseException:
                # Put the index back unless the commit went through (interrupted after it, e.g.
                # while writing the anchor): memory then matches the revision it holds, so that
                # the changes since that revision (changes_since) complete it exactly.
                if self._state is before:
                    for inner_key, previous in undo.items():
                        if previous is None:
                            elements.pop(inner_key, None)
                        else:
                            elements[inner_key] = previous
                self._stale = True  # re-read and re-verify the backend before trusting memory again
                raise

    async def close(self) -> None:
        await self._inner.close()

    # -- key management ----------------------------------------------------------------------

    async def rekey(
        self,
        new_dek: bytes,
        *,
        recovery_data: bytes | _Keep | None = KEEP,
        public_metadata: bytes | _Keep | None = KEEP,
        expected_revision: int | None = None,
    ) -> int:
        """Re-encrypt every record under ``new_dek`` and store the new wrapped DEK, in one commit.

        Used when a manifest is set or its recovery keys change (the DEK is what the
        recovery secrets open). ``recovery_data`` replaces R and ``public_metadata`` the
        public recovery keys in the same commit. ``expected_revision`` (if given) makes it a
        compare-and-set like :meth:`commit`. Returns the new revision.
        """
        if not isinstance(new_dek, bytes) or len(new_dek) != DEK_SIZE:
            raise SealError(f"a data-encryption key must be {DEK_SIZE} bytes")
        async with self._lock:
            await self._refresh()
            if expected_revision is not None and expected_revision != self._revision:
                raise ConflictError(
                    f"store changed since revision {expected_revision} (now {self._revision}); "
                    "re-read and retry"
                )
            old = self._crypto
            snap = await self._inner.snapshot(DATA_PREFIX)
            if snap.revision != self._revision:
                self._stale = True
                raise ConflictError("the state changed while re-keying; retry")
            records = {} if self._unwritten else snap.records
            differing = set(records).symmetric_difference(self._state.elements)
            if differing:
                raise self._mismatch(min(differing).removeprefix(DATA_PREFIX))
            crypto = _Crypto(_Keyring(new_dek, self._rng(_ID)), self._rng)
            writes: dict[str, bytes | None] = {}
            elements: dict[str, int] = {}
            digest = 0
            for key, blob in records.items():
                if self._state.elements[key] != old.element(key, blob):
                    raise self._mismatch(key.removeprefix(DATA_PREFIX))
                sealed = crypto.seal(key, old.open(key, blob))
                writes[key] = sealed
                elements[key] = crypto.element(key, sealed)
                digest = (digest + elements[key]) % _MOD
            rd = self._state.recovery_data if isinstance(recovery_data, _Keep) else recovery_data
            pm = self._state.public_metadata if isinstance(public_metadata, _Keep) else public_metadata
            state = _State(self._state.store_id, self._state.epoch + 1, elements, digest, rd, pm)
            if self._dkek is not None:
                writes[META_WRAPPED_DEK] = _wrap(self._dkek, state.store_id, crypto.keyring, self._rng)
            return await self._commit_inner(writes, state, crypto)

    async def set_public_metadata(self, public_metadata: bytes | None) -> int:
        """Replace the public metadata (plaintext, authenticated by the sealed index), in one commit.

        A manifest set or an update that changes the recovery keys stores it with :meth:`rekey`.
        Returns the new revision.
        """
        async with self._lock:
            await self._refresh()
            if public_metadata == self._state.public_metadata:
                return self._revision
            state = replace(self._state.next_epoch(), public_metadata=public_metadata)
            return await self._commit_inner({}, state, self._crypto)

    async def rewrap(self, provider: KeyEncryptionKeyProvider) -> int:
        """Wrap the deployment KEK under another provider's KEK (e.g. the seal mode changed) in place of
        this replica's current entry, in one commit.

        The rollback anchor moves to the new provider's anchor path (a new generation).
        """
        kek = await asyncio.to_thread(provider.load_kek)
        _check_kek(kek, provider)
        async with self._lock:
            await self._refresh()
            assert self._dkek is not None
            entry_key, entry = _wrap_dkek(kek, self._dkek, self._rng)
            writes: dict[str, bytes | None] = {entry_key: entry}
            if self._kek is not None and META_KEK_PREFIX + kek_id(self._kek) != entry_key:
                writes[META_KEK_PREFIX + kek_id(self._kek)] = None
            self._kek, self._provider, self._reset_anchor = kek, provider, True
            return await self._commit_inner(writes, self._state.next_epoch(), self._crypto)

    async def adopt_handover(self, dkek: bytes, floor: HandoverFloor) -> int:
        """Take the shared state another replica stored first, with the deployment KEK it handed over
        after attestation (see :class:`HandoverNeeded`); stores this replica's entry and seeds the
        rollback anchor. Returns the new revision."""
        async with self._lock:
            if not self._unwritten:
                return self._revision
            snap = await self._inner.snapshot("")
            _check_layout(snap.records)
            wrapped = snap.records.get(META_WRAPPED_DEK)
            unwrapped = None if wrapped is None else _unwrap(dkek, wrapped)
            if unwrapped is None:
                raise SealError("the deployment key handed over does not open the shared state")
            crypto = _Crypto(unwrapped[1], self._rng)
            try:
                state = _verify(snap.records, crypto)
            except _DekMismatch:
                raise SealError("the deployment key handed over does not open the shared state") from None
            _check_floor(state, floor)
            self._dkek, self._crypto, self._state, self._revision = dkek, crypto, state, snap.revision
            self._unwritten, self._pending_deletes, self._stale = False, frozenset(), False
            self._reset_anchor = True
            for attempt in range(4):
                try:
                    return await self._store_entry_locked(migrate=False)
                except ConflictError:  # another replica committed meanwhile: re-read, store the entry again
                    if attempt == 3:
                        raise
                    await self._reload()
            raise AssertionError("unreachable")

    async def _store_entry(self, *, migrate: bool) -> int:
        """Commit this replica's ``meta:kek/<id>`` entry (after a hand-over); with ``migrate``, first
        make a deployment KEK for a state whose DEK was wrapped directly under this KEK."""
        async with self._lock:
            return await self._store_entry_locked(migrate=migrate)

    async def _store_entry_locked(self, *, migrate: bool) -> int:
        assert self._kek is not None
        writes: dict[str, bytes | None] = {}
        if migrate:
            dkek = self._rng(KEK_SIZE)
            if len(dkek) != KEK_SIZE:
                raise SealError("the random generator returned a short key")
            writes[META_WRAPPED_DEK] = _wrap(dkek, self._state.store_id, self._crypto.keyring, self._rng)
        else:
            assert self._dkek is not None
            dkek = self._dkek
        entry_key, entry = _wrap_dkek(self._kek, dkek, self._rng)
        writes[entry_key] = entry
        revision = await self._commit_inner(writes, self._state.next_epoch(), self._crypto)
        self._dkek = dkek
        return revision


# --------------------------------------------------------------------------------------------
# opening


@dataclass(frozen=True)
class Opened:
    """The state is usable: ``fresh`` (nothing stored yet) or loaded and verified."""

    store: SealedStore
    fresh: bool

    @property
    def outcome(self) -> str:
        return "fresh" if self.fresh else "loaded"


@dataclass(frozen=True)
class NeedsRecovery:
    """The DEK cannot be unwrapped: the Coordinator must enter Recovery. ``reason`` says why."""

    recovery: PendingRecovery
    reason: SealError
    #: Other replicas' KEKs have entries for the deployment KEK, none for this one: a running replica
    #: can hand the deployment KEK over (:mod:`marblekeep.handover`).
    handover_possible: bool = False

    @property
    def outcome(self) -> str:
        return "needs_recovery"


OpenResult = Opened | NeedsRecovery


def _check_kek(kek: bytes, provider: KeyEncryptionKeyProvider) -> None:
    if not isinstance(kek, bytes) or len(kek) != KEK_SIZE:
        raise SealError(f"{provider.description} returned a key-encryption key of the wrong size")


def _fresh_store(
    inner: Store,
    revision: int,
    kek: bytes | None,
    provider: KeyEncryptionKeyProvider | None,
    rng: Rng,
    *,
    generation: int,
    pending_deletes: frozenset[str] = frozenset(),
    reset_anchor: bool = False,
) -> SealedStore:
    dek = rng(DEK_SIZE)
    if len(dek) != DEK_SIZE:
        raise SealError("the random generator returned a short key")
    crypto = _Crypto(_Keyring(dek, rng(_ID)), rng)
    state = _State(rng(_ID), 0, {}, 0, None)
    dkek = rng(KEK_SIZE)
    if len(dkek) != KEK_SIZE:
        raise SealError("the random generator returned a short key")
    return SealedStore(
        inner,
        crypto,
        state,
        revision,
        kek=kek,
        provider=provider,
        anchor_generation=generation,
        rng=rng,
        unwritten=True,
        pending_deletes=pending_deletes,
        reset_anchor=reset_anchor,
        deployment_kek=dkek,
    )


def _rollback_message(state_epoch: int, anchor: AnchorReading, path: object) -> str:
    return (
        f"refusing to load the stored state: it is at epoch {state_epoch}, but this Coordinator has "
        f"already sealed epoch {anchor.epoch} (rollback anchor {path}). The state is older than the "
        "newest one this Coordinator wrote: someone may be replaying an old copy to undo later changes "
        "(revoked users, package updates, activation counters). If you are deliberately restoring a "
        f"backup, start once with the rollback override {_OVERRIDE}; the override is logged."
    )


def _check_anchor(
    anchor: RollbackAnchor | None,
    reading: AnchorReading,
    state: _State,
    allow_rollback: bool,
) -> bool:
    """Apply the rollback rules; returns whether the anchor must be reset (new generation)."""
    if anchor is None:
        return False
    problem: str | None = None
    if reading.status is AnchorStatus.MISSING:
        if state.epoch > 1:  # epoch 1 may have crashed before its first anchor write
            problem = (
                f"refusing to load the stored state at epoch {state.epoch}: its rollback anchor "
                f"{anchor.path} is missing, so it cannot be told apart from a replayed old copy. If you "
                "moved or restored the state deliberately, start once with the rollback override "
                f"{_OVERRIDE}; the override is logged."
            )
    elif reading.status is AnchorStatus.INVALID:
        problem = (
            f"refusing to load the stored state: the rollback anchor {anchor.path} does not verify under "
            "this Coordinator's key (damaged or replaced). If you restored the state deliberately, start "
            f"once with the rollback override {_OVERRIDE}; the override is logged."
        )
    elif reading.store_id != state.store_id:
        problem = (
            f"refusing to load the stored state: the rollback anchor {anchor.path} belongs to another "
            "state (the state was replaced by a different one). If that was deliberate, start once with "
            f"the rollback override {_OVERRIDE}; the override is logged."
        )
    elif state.epoch < reading.epoch:
        problem = _rollback_message(state.epoch, reading, anchor.path)
    if problem is None:
        return False
    if not allow_rollback:
        raise RollbackError(problem)
    SEAL_LOG.warning(
        "ROLLBACK OVERRIDE: loading state epoch %d although the anchor %s says %s (epoch %d); "
        "the anchor is reset to the loaded state",
        state.epoch,
        anchor.path,
        reading.status.value,
        reading.epoch,
    )
    return True


@dataclass(frozen=True)
class HandoverFloor:
    """What a running replica attested when it handed the deployment KEK over: the state it serves.

    The joining replica opens the state only if it is that state (``store_id``) at that epoch or
    later, and seeds its rollback anchor from it (so no ``--allow-rollback`` is needed to join)."""

    store_id: bytes
    epoch: int


def _check_floor(state: _State, floor: HandoverFloor) -> None:
    if not hmac.compare_digest(state.store_id, floor.store_id):
        raise IntegrityError(
            "the stored state is not the one the replica that handed the key over serves (another "
            "store id): the store was replaced; check --store"
        )
    if state.epoch < floor.epoch:
        raise RollbackError(
            f"the stored state is at epoch {state.epoch}, older than the epoch {floor.epoch} the "
            "replica that handed the key over attested: the store is being rolled back"
        )


async def open_sealed_store(
    inner: Store,
    provider: KeyEncryptionKeyProvider | None,
    *,
    allow_rollback: bool = False,
    rng: Rng = os.urandom,
    deployment_kek: bytes | None = None,
    handover: HandoverFloor | None = None,
) -> OpenResult:
    """Open the sealed state in ``inner`` with the KEK from ``provider``.

    ``provider=None`` is ``SealMode: Disabled``: pass a fresh
    :class:`~marblekeep.store.memory.MemoryStore`; nothing is wrapped or anchored.
    See the module docstring for the outcomes. ``allow_rollback`` is the operator's
    override for restoring a backup older than the anchor (logged at WARNING).
    ``deployment_kek`` and ``handover`` come from an attested hand-over: the state is opened with
    that deployment KEK, checked against the floor, and this replica's entry is stored.
    """
    for attempt in range(4):
        try:
            return await _open_once(
                inner,
                provider,
                allow_rollback=allow_rollback,
                rng=rng,
                deployment_kek=deployment_kek,
                handover=handover,
            )
        except ConflictError:  # another replica committed while this one stored its entry: re-read
            if attempt == 3:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


async def _open_once(
    inner: Store,
    provider: KeyEncryptionKeyProvider | None,
    *,
    allow_rollback: bool,
    rng: Rng,
    deployment_kek: bytes | None,
    handover: HandoverFloor | None,
) -> OpenResult:
    snap = await inner.snapshot("")
    kek: bytes | None = None
    anchor: RollbackAnchor | None = None
    reading = AnchorReading(AnchorStatus.MISSING)
    if provider is not None:
        kek = await asyncio.to_thread(provider.load_kek)
        _check_kek(kek, provider)
        if provider.anchor_path is not None:
            anchor = RollbackAnchor(provider.anchor_path, kek)
            reading = await asyncio.to_thread(anchor.read)

    if not snap.records:
        if handover is not None:
            raise SealError("the stored state disappeared during the key hand-over; restart the Coordinator")
        reset = False
        if anchor is not None and reading.status is not AnchorStatus.MISSING:
            if not allow_rollback:
                raise RollbackError(
                    f"refusing to start with an empty state: the rollback anchor {anchor.path} shows "
                    f"that this Coordinator already sealed a state (epoch {reading.epoch}). The state "
                    "was deleted or lost; restore it from a backup, or start once with the rollback "
                    f"override {_OVERRIDE} to begin a new deployment deliberately."
                )
            SEAL_LOG.warning(
                "ROLLBACK OVERRIDE: starting a new, empty state although the anchor %s records epoch %d",
                anchor.path,
                reading.epoch,
            )
            reset = True
        store = _fresh_store(
            inner, snap.revision, kek, provider, rng, generation=reading.generation, reset_anchor=reset
        )
        return Opened(store, fresh=True)

    _check_layout(snap.records)
    pending = PendingRecovery(inner, snap, kek, provider, rng)
    wrapped = snap.records.get(META_WRAPPED_DEK)
    if kek is None or wrapped is None:
        return NeedsRecovery(
            pending,
            SealError(
                "the stored state has no wrapped data-encryption key"
                if wrapped is None
                else "the stored state exists but no key-encryption key is configured (SealMode Disabled)"
            ),
        )
    entries = _kek_entries(snap.records)
    own_entry = META_KEK_PREFIX + kek_id(kek) in snap.records
    dkek = deployment_kek if deployment_kek is not None else _unwrap_dkek(kek, snap.records)
    migrate = False
    if dkek is None and not entries and _unwrap(kek, wrapped) is not None:
        dkek, migrate = kek, True  # written before the deployment KEK existed
    if dkek is None:
        what = provider.description if provider else "the KEK"
        if entries and not own_entry:
            reason = (
                f"{what} does not unwrap the stored data-encryption key: it has no entry for the "
                "deployment key-encryption key (this replica never held it: another CPU, enclave build or "
                "key file); a running replica can hand it over after "
                "attestation, otherwise upload the recovery secrets or set a new manifest"
            )
        else:
            reason = (
                f"{what} does not unwrap the stored data-encryption key (another CPU, another enclave "
                "build, a lost key file, or a damaged record); upload the recovery secrets or set a new "
                "manifest"
            )
        return NeedsRecovery(pending, SealError(reason), handover_possible=bool(entries) and not own_entry)
    unwrapped = _unwrap(dkek, wrapped)
    if unwrapped is None:
        if deployment_kek is not None:
            raise SealError("the deployment key-encryption key handed over does not open the stored state")
        return NeedsRecovery(
            pending,
            SealError(
                f"{provider.description if provider else 'the KEK'}'s deployment key does not unwrap the "
                "stored data-encryption key (a damaged record); upload the recovery secrets or set a new "
                "manifest"
            ),
        )
    wrapped_store_id, keyring = unwrapped
    crypto = _Crypto(keyring, rng)
    try:
        state = _verify(snap.records, crypto)
    except _DekMismatch:
        return NeedsRecovery(
            pending,
            SealError(
                "the wrapped data-encryption key does not belong to the stored data (an older or newer "
                "key file than the data); upload the recovery secrets or set a new manifest"
            ),
        )
    if state.store_id != wrapped_store_id:
        raise IntegrityError(
            f"record {META_WRAPPED_DEK!r} belongs to another state than the data; restore a backup"
        )
    if handover is not None:
        _check_floor(state, handover)
        reset = True  # the anchor is seeded from the attested epoch (or later), not trusted from disk
    else:
        reset = _check_anchor(anchor, reading, state, allow_rollback)
    store = SealedStore(
        inner,
        crypto,
        state,
        snap.revision,
        kek=kek,
        provider=provider,
        anchor_generation=reading.generation,
        rng=rng,
        unwritten=False,
        reset_anchor=reset,
        deployment_kek=None if migrate else dkek,
    )
    if migrate:
        await store._store_entry(migrate=True)
        SEAL_LOG.info("state key hierarchy migrated: a deployment key-encryption key now wraps the DEK")
    elif not own_entry:
        await store._store_entry(migrate=False)
    elif reset or state.epoch > reading.epoch or reading.status is not AnchorStatus.VALID:
        await store._write_anchor()
    return Opened(store, fresh=False)


class PendingRecovery:
    """The sealed state while the Coordinator is in Recovery.

    ``try_key(candidate)`` (synchronous, for :class:`marblekeep.recovery.recoverer.Recoverer`)
    tells whether a candidate DEK opens the state. ``complete(dek)`` verifies every
    record under it, wraps it with the current KEK and commits (the anchor is reset
    if the old one cannot be verified). ``discard()`` returns a fresh state that
    replaces the old one at its first commit (a new manifest set in Recovery).
    """

    def __init__(
        self,
        inner: Store,
        snap: Snapshot,
        kek: bytes | None,
        provider: KeyEncryptionKeyProvider | None,
        rng: Rng,
    ) -> None:
        self._inner = inner
        self._snap = snap
        self._kek = kek
        self._provider = provider
        self._rng = rng

    @property
    def recovery_data(self) -> bytes | None:
        """R as stored in plaintext (unauthenticated until the DEK is known, as in MarbleRun)."""
        return self._snap.records.get(META_RECOVERY_DATA)

    @property
    def public_metadata(self) -> bytes | None:
        """The public metadata as stored (unauthenticated until the DEK is known; ``None``: a state
        written before it existed)."""
        return self._snap.records.get(META_PUBLIC)

    def verified_public_metadata(self, dek: bytes) -> bytes | None:
        """The public metadata, authenticated with a candidate DEK (read-only; every record is
        verified as in :meth:`complete`). Raises ``SealError``/``IntegrityError``."""
        state_blob = self._snap.records.get(SYS_STATE)
        key_id = None if state_blob is None else _key_id_of(state_blob)
        if key_id is None or not self.try_key(dek):
            raise SealError("the key does not decrypt the stored state")
        try:
            return _verify(self._snap.records, _Crypto(_Keyring(dek, key_id), self._rng)).public_metadata
        except _DekMismatch:
            raise SealError("the key does not decrypt the stored state") from None

    def try_key(self, candidate: bytes) -> bool:
        blob = self._snap.records.get(SYS_STATE)
        key_id = None if blob is None else _key_id_of(blob)
        if blob is None or key_id is None or len(candidate) != DEK_SIZE:
            return False
        try:
            _Crypto(_Keyring(candidate, key_id), self._rng).open(SYS_STATE, blob)
        except IntegrityError:
            return False
        return True

    def peek(self, dek: bytes, key: str) -> bytes | None:
        """Decrypt one record of the stored state with a candidate DEK, read-only.

        For reading the stored manifest's recovery keys before :meth:`complete`
        (signature checks); the full verification happens in ``complete``.
        """
        inner_key = DATA_PREFIX + check_key(key)
        state_blob = self._snap.records.get(SYS_STATE)
        key_id = None if state_blob is None else _key_id_of(state_blob)
        if key_id is None or not self.try_key(dek):
            raise SealError("the key does not decrypt the stored state")
        blob = self._snap.records.get(inner_key)
        if blob is None:
            return None
        return _Crypto(_Keyring(dek, key_id), self._rng).open(inner_key, blob)

    async def complete(
        self,
        dek: bytes,
        *,
        recovery_data: bytes | _Keep | None = KEEP,
        public_metadata: bytes | _Keep | None = KEEP,
        allow_rollback: bool = False,
    ) -> SealedStore:
        """Load the state with the recovered DEK and re-seal it under this Coordinator's KEK."""
        snap = await self._inner.snapshot("")
        if snap.revision != self._snap.revision:
            raise ConflictError("the stored state changed during recovery; restart the Coordinator")
        blob = snap.records.get(SYS_STATE)
        key_id = None if blob is None else _key_id_of(blob)
        if key_id is None or not self.try_key(dek):
            raise SealError("the recovered key does not decrypt the stored state")
        crypto = _Crypto(_Keyring(dek, key_id), self._rng)
        state = _verify(snap.records, crypto)
        anchor = None
        reading = AnchorReading(AnchorStatus.MISSING)
        if self._provider is not None and self._kek is not None and self._provider.anchor_path is not None:
            anchor = RollbackAnchor(self._provider.anchor_path, self._kek)
            reading = await asyncio.to_thread(anchor.read)
        if reading.status is AnchorStatus.VALID and reading.store_id == state.store_id:
            if state.epoch < reading.epoch:
                if not allow_rollback:
                    path = anchor.path if anchor else ""
                    raise RollbackError(_rollback_message(state.epoch, reading, path))
                SEAL_LOG.warning(
                    "ROLLBACK OVERRIDE: recovering state epoch %d although the anchor records epoch %d",
                    state.epoch,
                    reading.epoch,
                )
        elif anchor is not None and reading.status is not AnchorStatus.MISSING:
            SEAL_LOG.warning(
                "recovery: the rollback anchor %s was written for another key or state and cannot vouch "
                "for this one; it is reset to the recovered state (epoch %d)",
                anchor.path,
                state.epoch,
            )
        store = SealedStore(
            self._inner,
            crypto,
            state,
            snap.revision,
            kek=self._kek,
            provider=self._provider,
            anchor_generation=reading.generation,
            rng=self._rng,
            unwritten=False,
            reset_anchor=True,
        )
        rd = state.recovery_data if isinstance(recovery_data, _Keep) else recovery_data
        pm = state.public_metadata if isinstance(public_metadata, _Keep) else public_metadata
        new_state = _State(state.store_id, state.epoch + 1, dict(state.elements), state.digest, rd, pm)
        writes: dict[str, bytes | None] = {}
        if self._kek is not None:
            # a new deployment KEK: the other replicas' entries hold one that no longer opens the DEK
            dkek = self._rng(KEK_SIZE)
            if len(dkek) != KEK_SIZE:
                raise SealError("the random generator returned a short key")
            for key in _kek_entries(snap.records):
                writes[key] = None
            writes[META_WRAPPED_DEK] = _wrap(dkek, state.store_id, crypto.keyring, self._rng)
            entry_key, entry = _wrap_dkek(self._kek, dkek, self._rng)
            writes[entry_key] = entry
            store._dkek = dkek
        async with store._lock:
            await store._commit_inner(writes, new_state, crypto)
        return store

    async def close(self) -> None:
        """Close the backend (the Coordinator stops while still in Recovery)."""
        await self._inner.close()

    async def discard(self) -> SealedStore:
        """A fresh state (new DEK, new store id); its first commit deletes every old record."""
        anchor_generation = 0
        if self._provider is not None and self._kek is not None and self._provider.anchor_path is not None:
            reading = await asyncio.to_thread(RollbackAnchor(self._provider.anchor_path, self._kek).read)
            anchor_generation = reading.generation
        return _fresh_store(
            self._inner,
            self._snap.revision,
            self._kek,
            self._provider,
            self._rng,
            generation=anchor_generation,
            pending_deletes=frozenset(self._snap.records),
            reset_anchor=True,
        )
