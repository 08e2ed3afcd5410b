"""The etcd backend: the store's records in an etcd v3 cluster, for Coordinator replicas (HA).

etcd only ever sees what a :class:`~marblekeep.store.base.Store` is given: under a
:class:`~marblekeep.store.sealed.SealedStore` that is sealed records and their key names.
See docs/adr/0004-etcd-backend.md for the client choice and docs/ha.md for operations.

Key layout under the configured prefix ``P`` (default ``/marblekeep/``)::

    P head                 b"MKE1" || commit id (16 random bytes)          rewritten by every commit
    P pending              b"MKP1" || tx id (16) || parts (u32) || SHA-256(redo stream)
                           present only while a large commit is being applied (below)
    P r/<key>              one record per store key (UTF-8 key bytes):
                           b"\\x00" || value                                          inline value
                           b"\\x01" || chunk id (16) || chunks (u32) || length (u64) || SHA-256(value)
    P c/<chunk id hex>/<n:08d>   piece n of a chunked value (values above the inline limit)
    P tx/<tx id hex>/<n:08d>     piece n of a large commit's redo stream
    P members/<replica id>       a running replica's hand-over address (JSON), under its etcd lease:
                                 it disappears when the replica stops renewing (docs/ha.md §1)

The store's **revision** is the etcd ``mod_revision`` of ``P head`` (0 while it does not
exist). etcd revisions are cluster-wide and only grow, so the store revision does too.

Invariants:

1. The logical content of the store at etcd revision ``R`` is the ``P r/`` records at ``R``,
   overlaid with the redo stream named by ``P pending`` if that key exists at ``R``. Every
   read takes ``head``, ``pending`` and the records in **one** read-only etcd transaction (one
   revision ``R``) and reads any further pages, chunks and redo pieces *at* ``R``: a reader
   never mixes two commits.
2. A commit is decided by exactly one etcd transaction, the *flip*: it compares
   ``mod_revision(P head) == expected_revision`` and that ``P pending`` is absent (or still the
   one the committer rolled forward), and puts a new ``P head``. Nothing a reader can see
   changes before the flip; everything the commit wrote is visible from the flip's revision on.
3. Chunks and redo pieces are **immutable** and written *before* the flip under fresh random
   ids, so staging them changes nothing a reader sees. A chunk set is referenced by at most
   one record; it is deleted only after the record that referenced it was replaced (learnt
   from ``prev_kv`` of the write that replaced it).
4. A commit that fits one etcd transaction (at most ``max_txn_ops`` operations, 128 by etcd's
   default, and ``max_request_bytes``, 1.5 MiB) writes its records in the flip itself. A larger
   one writes its redo stream to ``P tx/<id>/``, flips ``head`` and ``pending`` together, then
   applies the stream to ``P r/`` in transactions that each compare ``mod_revision(P head)``
   to the flip's revision (so a late apply never overwrites a newer commit), and finally
   deletes ``pending`` together with a new ``head``. Whoever finds a ``pending`` (the next
   writer, a restarted replica) can finish the apply: it is idempotent.
5. A commit whose outcome is unknown (connection lost after sending the flip) is resolved before
   ``commit`` returns: the head's commit id says whether the flip went through; if the head is
   still at the expected revision, a *fence* (a new head at that revision) makes sure the lost
   flip can never apply later. If etcd cannot be reached to resolve it, ``StoreError`` says so.
6. Leftovers of crashed commits (chunks or redo pieces that no flip references) are collected
   when a store is opened: after a fence moved ``head``, no commit staged before it can flip.
7. The etcd cluster id and the highest revision seen are remembered: a cluster that changes
   identity or whose revision goes backwards (restored from an older backup while this
   process runs) is refused with :class:`~marblekeep.errors.RollbackError`. Across restarts,
   the sealed state's epoch and each replica's rollback anchor catch an older copy.

Every call to etcd has a deadline (``timeout``, 5 s by default); an unreachable cluster is a
:class:`~marblekeep.errors.StoreError` (HTTP 503) naming the endpoints, never a hang.
Several endpoints are tried in turn; the client reconnects on its own when etcd is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aetcd import rpc

from marblekeep.errors import ConflictError, RollbackError, StoreError
from marblekeep.store.base import Snapshot, check_key, check_writes

__all__ = [
    "DEFAULT_PREFIX",
    "EtcdConfig",
    "EtcdEndpoint",
    "EtcdStore",
    "EtcdTLS",
]

log = logging.getLogger("marblekeep.store.etcd")

DEFAULT_PREFIX = "/marblekeep/"
#: etcd 3.4 defaults (``--max-txn-ops``, ``--max-request-bytes``).
ETCD_MAX_TXN_OPS = 128
ETCD_MAX_REQUEST_BYTES = 1536 * 1024

_HEAD_MAGIC = b"MKE1"
_PENDING = struct.Struct(">4s16sI32s")
_PENDING_MAGIC = b"MKP1"
_POINTER = struct.Struct(">16sIQ32s")
_INLINE = 0
_CHUNKED = 1
_STREAM_MAGIC = b"MKT1"
_ID = 16
#: Bytes of request overhead counted per operation and per transaction (protobuf framing, compares).
_OP_OVERHEAD = 64
_TXN_OVERHEAD = 16 * 1024
_PAGE_RECORDS = 512
_READ_RETRIES = 5

_T = TypeVar("_T")
Rng = Callable[[int], bytes]


@dataclass(frozen=True)
class EtcdEndpoint:
    """One etcd client endpoint."""

    host: str
    port: int

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class EtcdTLS:
    """TLS towards etcd (``etcds://``): CA bundle (``None``: system roots), client certificate and key."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class EtcdConfig:
    """Where and how to reach etcd. ``prefix`` starts and ends with ``/``."""

    endpoints: tuple[EtcdEndpoint, ...]
    prefix: str = DEFAULT_PREFIX
    tls: EtcdTLS | None = None
    timeout: float = 5.0
    max_txn_ops: int = ETCD_MAX_TXN_OPS
    max_request_bytes: int = ETCD_MAX_REQUEST_BYTES
    #: Values up to this size are stored inside their record; larger ones in chunks.
    inline_limit: int = 512 * 1024
    #: Size of one chunk / redo piece (one etcd request each).
    chunk_size: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise StoreError("etcd: at least one endpoint is needed")
        if not (self.prefix.startswith("/") and self.prefix.endswith("/")):
            raise StoreError(f"etcd key prefix {self.prefix!r} must start and end with '/'")
        if self.max_txn_ops < 8:
            raise StoreError("etcd: max_txn_ops must be at least 8")
        if self.chunk_size + _TXN_OVERHEAD > self.max_request_bytes:
            raise StoreError("etcd: chunk_size must leave room for the request overhead")
        if self.inline_limit + _TXN_OVERHEAD + 4096 > self.max_request_bytes:
            raise StoreError("etcd: inline_limit must leave room for one record in a transaction")

    @property
    def scheme(self) -> str:
        return "etcds" if self.tls is not None else "etcd"

    def describe(self) -> str:
        """``etcd://h:p,h:p`` plus the prefix, for logs and errors (never holds credentials)."""
        hosts = ",".join(e.target for e in self.endpoints)
        return f"{self.scheme}://{hosts}{self.prefix.rstrip('/')}"


# --------------------------------------------------------------------------------------------
# encodings (pure)


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for every key starting with ``prefix`` (``prefix`` never ends in 0xff here)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


@dataclass(frozen=True)
class _Pointer:
    chunk_id: bytes
    count: int
    length: int
    digest: bytes

    def encode(self) -> bytes:
        return bytes([_CHUNKED]) + _POINTER.pack(self.chunk_id, self.count, self.length, self.digest)


@dataclass(frozen=True)
class _Pending:
    tx_id: bytes
    parts: int
    digest: bytes

    def encode(self) -> bytes:
        return _PENDING.pack(_PENDING_MAGIC, self.tx_id, self.parts, self.digest)


def _malformed(what: str) -> StoreError:
    return StoreError(
        f"etcd record {what} is malformed: it was damaged or written by another program; "
        "restore the etcd cluster from a backup"
    )


def _decode_pending(raw: bytes, where: str) -> _Pending:
    if len(raw) != _PENDING.size:
        raise _malformed(where)
    magic, tx_id, parts, digest = _PENDING.unpack(raw)
    if magic != _PENDING_MAGIC:
        raise _malformed(where)
    return _Pending(tx_id, parts, digest)


def _decode_envelope(raw: bytes, where: str) -> bytes | _Pointer:
    if not raw:
        raise _malformed(where)
    if raw[0] == _INLINE:
        return raw[1:]
    if raw[0] == _CHUNKED and len(raw) == 1 + _POINTER.size:
        return _Pointer(*_POINTER.unpack(raw[1:]))
    raise _malformed(where)


def _encode_stream(ops: Sequence[tuple[bytes, bytes | None]]) -> bytes:
    out = [_STREAM_MAGIC]
    for key, envelope in ops:
        out.append(struct.pack(">BI", 0 if envelope is None else 1, len(key)))
        out.append(key)
        if envelope is not None:
            out.append(struct.pack(">I", len(envelope)))
            out.append(envelope)
    return b"".join(out)


def _decode_stream(raw: bytes, where: str) -> list[tuple[bytes, bytes | None]]:
    if not raw.startswith(_STREAM_MAGIC):
        raise _malformed(where)
    ops: list[tuple[bytes, bytes | None]] = []
    pos = len(_STREAM_MAGIC)
    try:
        while pos < len(raw):
            op, key_len = struct.unpack_from(">BI", raw, pos)
            pos += 5
            key = raw[pos : pos + key_len]
            pos += key_len
            if op == 0:
                ops.append((key, None))
                continue
            if op != 1:
                raise _malformed(where)
            (value_len,) = struct.unpack_from(">I", raw, pos)
            pos += 4
            ops.append((key, raw[pos : pos + value_len]))
            pos += value_len
    except struct.error:
        raise _malformed(where) from None
    if pos != len(raw):
        raise _malformed(where)
    return ops


# --------------------------------------------------------------------------------------------
# gRPC plumbing


class _Compacted(Exception):
    """A read at a fixed revision hit etcd's compaction (internal signal: read again)."""


class _Ambiguous(Exception):
    """A state-changing request may or may not have been applied (the connection broke)."""


_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


#: gRPC's words for a call that failed before it reached any server (no connection): not applied.
_NOT_CONNECTED = (
    "failed to connect to all addresses",
    "Connection refused",
    "connections to all backends failing",
)


def _channel_options(config: EtcdConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
        # reconnect quickly once etcd is back (gRPC's default backoff grows to two minutes)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 0),
    ]


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read the etcd {what} {path}: {exc.strerror}; check the path") from None


def _credentials(tls: EtcdTLS) -> Any:
    ca = None if tls.ca_file is None else _read_file(tls.ca_file, "CA file")
    if (tls.cert_file is None) != (tls.key_file is None):
        raise StoreError("etcd TLS: give both the client certificate and its key, or neither")
    cert = None if tls.cert_file is None else _read_file(tls.cert_file, "client certificate")
    key = None if tls.key_file is None else _read_file(tls.key_file, "client key")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _Conn:
    """One gRPC channel per endpoint; calls go to the current one and fail over to the next."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        creds = None if config.tls is None else _credentials(config.tls)
        self._channels: list[Any] = []
        for endpoint in config.endpoints:
            if creds is None:
                channel = grpc.aio.insecure_channel(endpoint.target, options=_channel_options(config))
            else:
                channel = grpc.aio.secure_channel(endpoint.target, creds, options=_channel_options(config))
            self._channels.append(channel)
        self._kv = [rpc.KVStub(c) for c in self._channels]
        self._watch = [rpc.WatchStub(c) for c in self._channels]
        self._lease = [rpc.LeaseStub(c) for c in self._channels]
        self._current = 0
        self.closed = False

    def unreachable(self, exc: BaseException | None = None) -> StoreError:
        detail = ""
        if isinstance(exc, grpc.aio.AioRpcError):
            detail = f" ({exc.code().name}: {exc.details() or 'no details'})"
        return StoreError(
            f"etcd is unreachable at {self.config.describe()}{detail}; check that the etcd cluster runs "
            "and that --store names it; the Coordinator retries on its own"
        )

    def _failed(self, exc: grpc.aio.AioRpcError) -> StoreError:
        code = exc.code()
        details = exc.details() or ""
        if code is grpc.StatusCode.INVALID_ARGUMENT and "too large" in details:
            return StoreError(
                f"etcd at {self.config.describe()} refused a request as too large ({details}); start etcd "
                "with a --max-request-bytes of at least 1.5 MiB (its default)"
            )
        if code is grpc.StatusCode.INVALID_ARGUMENT and "too many operations" in details:
            return StoreError(
                f"etcd at {self.config.describe()} refused a transaction ({details}); start etcd with a "
                f"--max-txn-ops of at least {self.config.max_txn_ops} (its default is 128)"
            )
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return StoreError(
                f"etcd at {self.config.describe()} refused access ({code.name}: {details}); check the client "
                "certificate given with --store-cert-file/--store-key-file and etcd's role for it"
            )
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return StoreError(
                f"etcd at {self.config.describe()} is out of space or overloaded ({details}); compact and "
                "defragment it, or raise its --quota-backend-bytes (docs/ha.md)"
            )
        return StoreError(f"etcd at {self.config.describe()} failed a request ({code.name}: {details})")

    async def call(self, method: str, request: Any, *, idempotent: bool, timeout: float | None = None) -> Any:
        """Call ``KV.<method>``; idempotent calls fail over across endpoints within the deadline."""
        if self.closed:
            raise StoreError(f"the etcd store {self.config.describe()} is closed")
        deadline = self.config.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        attempts = 0
        while True:
            index = self._current
            stub = self._kv[index]
            remaining = max(end - loop.time(), 0.05)
            try:
                return await getattr(stub, method)(request, timeout=remaining)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.OUT_OF_RANGE and "compacted" in (exc.details() or ""):
                    raise _Compacted from None
                if exc.code() not in _UNREACHABLE:
                    raise self._failed(exc) from None
                if self._current == index and len(self._channels) > 1:
                    self._current = (index + 1) % len(self._channels)
                never_sent = exc.code() is grpc.StatusCode.UNAVAILABLE and any(
                    sign in (exc.details() or "") for sign in _NOT_CONNECTED
                )
                if not idempotent and not never_sent:
                    raise _Ambiguous from None
                attempts += 1
                if loop.time() >= end:
                    raise self.unreachable(exc) from None
                if attempts % len(self._channels) == 0:
                    await asyncio.sleep(min(0.2, max(end - loop.time(), 0)))
            except asyncio.CancelledError:
                raise
            if self.closed:
                raise StoreError(f"the etcd store {self.config.describe()} is closed")

    async def lease_call(self, method: str, request: Any) -> Any:
        """Call ``Lease.<method>`` on each endpoint in turn within the deadline."""
        if self.closed:
            raise StoreError(f"the etcd store {self.config.describe()} is closed")
        last: grpc.aio.AioRpcError | None = None
        for _ in range(len(self._channels)):
            try:
                return await getattr(self._lease[self._current], method)(request, timeout=self.config.timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _UNREACHABLE:
                    raise self._failed(exc) from None
                last = exc
                self.rotate()
        raise self.unreachable(last)

    async def lease_keep_alive(self, lease_id: int) -> int:
        """Renew a lease once; its remaining TTL in seconds (0: it expired)."""
        if self.closed:
            raise StoreError(f"the etcd store {self.config.describe()} is closed")
        call = self._lease[self._current].LeaseKeepAlive(timeout=self.config.timeout)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            self.rotate()
            raise self.unreachable(exc) from None
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise self.unreachable()
        return int(response.TTL)

    def watch_stub(self) -> Any:
        """The Watch stub of the current endpoint (rotated on failure by :meth:`rotate`)."""
        return self._watch[self._current]

    def rotate(self) -> None:
        self._current = (self._current + 1) % len(self._channels)

    async def close(self) -> None:
        self.closed = True
        for channel in self._channels:
            await channel.close()


def _range_op(
    key: bytes, range_end: bytes = b"", *, keys_only: bool = False, limit: int = 0, min_mod_revision: int = 0
) -> Any:
    return rpc.RequestOp(
        request_range=rpc.RangeRequest(
            key=key,
            range_end=range_end,
            keys_only=keys_only,
            limit=limit,
            min_mod_revision=min_mod_revision,
        )
    )


def _put_op(key: bytes, value: bytes, *, prev_kv: bool = False) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, prev_kv=prev_kv))


def _delete_op(key: bytes, range_end: bytes = b"", *, prev_kv: bool = False) -> Any:
    return rpc.RequestOp(
        request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=range_end, prev_kv=prev_kv)
    )


def _mod_equals(key: bytes, revision: int) -> Any:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=key, mod_revision=revision)


def _absent(key: bytes) -> Any:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.VERSION, key=key, version=0)


# --------------------------------------------------------------------------------------------
# the store


@dataclass
class _View:
    """``head`` and ``pending`` as read together at one etcd revision."""

    revision: int  # the etcd revision the read happened at
    head_mod: int  # the store revision (0: no head)
    head_commit: bytes | None
    pending: _Pending | None
    pending_mod: int
    records: list[Any] = field(default_factory=list)  # KeyValue messages
    more: bool = False


class EtcdStore:
    """A :class:`~marblekeep.store.base.Store` on etcd (see the module docstring for the layout).

    ``EtcdStore(config)`` does no I/O; :meth:`open` connects, checks that etcd answers,
    finishes a large commit a crashed writer left behind and collects its leftovers.
    """

    def __init__(self, config: EtcdConfig, *, rng: Rng = os.urandom) -> None:
        self.config = config
        self._rng = rng
        self._conn = _Conn(config)
        self._p = config.prefix.encode("utf-8")
        self._head_key = self._p + b"head"
        self._pending_key = self._p + b"pending"
        self._rec = self._p + b"r/"
        self._chunks = self._p + b"c/"
        self._tx = self._p + b"tx/"
        self._members = self._p + b"members/"
        self._budget = config.max_request_bytes - _TXN_OVERHEAD
        self._cluster_id: int | None = None
        self._max_revision = 0

    @classmethod
    async def open(cls, config: EtcdConfig, *, rng: Rng = os.urandom) -> EtcdStore:
        store = cls(config, rng=rng)
        try:
            await store.revision()
            await store.collect_garbage()
        except BaseException:
            await store.close()
            raise
        return store

    def describe(self) -> str:
        return self.config.describe()

    # -- plumbing ----------------------------------------------------------------------------

    def _observe(self, header: Any, floor: int) -> int:
        """Check a response header against what this process saw before the request was sent.

        etcd answers linearizably, so a request sent after revision ``floor`` was seen must be
        answered at ``floor`` or later (concurrent requests may complete in any order)."""
        cluster_id = int(header.cluster_id)
        revision = int(header.revision)
        if self._cluster_id is None:
            self._cluster_id = cluster_id
        elif cluster_id != self._cluster_id:
            raise RollbackError(
                f"the etcd cluster at {self.describe()} changed identity while running (cluster id "
                f"{self._cluster_id:x} became {cluster_id:x}): it was replaced or restored from a backup; "
                "restart the Coordinator, whose rollback anchor then decides whether the state may load"
            )
        if revision < floor:
            raise RollbackError(
                f"the etcd revision at {self.describe()} went back from {floor} to {revision}: "
                "the cluster was restored from an older backup while running; restart the Coordinator, "
                "whose rollback anchor then decides whether the state may load"
            )
        self._max_revision = max(self._max_revision, revision)
        return revision

    async def _call(
        self, method: str, request: Any, *, idempotent: bool = True, timeout: float | None = None
    ) -> Any:
        floor = self._max_revision
        response = await self._conn.call(method, request, idempotent=idempotent, timeout=timeout)
        self._observe(response.header, floor)
        return response

    async def _txn(self, compare: Iterable[Any], success: Iterable[Any], failure: Iterable[Any] = ()) -> Any:
        request = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self._call("Txn", request, idempotent=False)

    async def _read_txn(self, ops: Sequence[Any]) -> Any:
        request = rpc.TxnRequest(success=list(ops))
        return await self._call("Txn", request, idempotent=True)

    async def _range(
        self, key: bytes, range_end: bytes, *, revision: int, limit: int = 0, keys_only: bool = False
    ) -> Any:
        request = rpc.RangeRequest(
            key=key, range_end=range_end, revision=revision, limit=limit, keys_only=keys_only
        )
        return await self._call("Range", request)

    def _record_key(self, key: str) -> bytes:
        return self._rec + key.encode("utf-8")

    def _user_key(self, raw: bytes) -> str:
        try:
            return raw[len(self._rec) :].decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed(f"key {raw[:80]!r}") from None

    def _view(self, response: Any, records_index: int | None = None) -> _View:
        revision = int(response.header.revision)
        head_kvs = response.responses[0].response_range.kvs
        pending_kvs = response.responses[1].response_range.kvs
        head_mod, head_commit = 0, None
        if head_kvs:
            kv = head_kvs[0]
            head_mod = int(kv.mod_revision)
            value = bytes(kv.value)
            if value:  # keys_only reads leave it empty
                if len(value) != len(_HEAD_MAGIC) + _ID or not value.startswith(_HEAD_MAGIC):
                    raise _malformed(f"{self._head_key.decode()!r}")
                head_commit = value[len(_HEAD_MAGIC) :]
        pending, pending_mod = None, 0
        if pending_kvs:
            pending = _decode_pending(bytes(pending_kvs[0].value), repr(self._pending_key.decode()))
            pending_mod = int(pending_kvs[0].mod_revision)
        view = _View(revision, head_mod, head_commit, pending, pending_mod)
        if records_index is not None:
            rr = response.responses[records_index].response_range
            view.records = list(rr.kvs)
            view.more = bool(rr.more)
        return view

    def _head_ops(self) -> list[Any]:
        return [_range_op(self._head_key), _range_op(self._pending_key)]

    async def _read_view(self, extra: Sequence[Any] = ()) -> _View:
        response = await self._read_txn([*self._head_ops(), *extra])
        return self._view(response, 2 if extra else None)

    async def _read_pieces(self, prefix: bytes, count: int, *, revision: int, where: str) -> bytes:
        """Concatenate ``count`` pieces ``prefix<n:08d>`` read at ``revision``."""
        pieces: list[bytes] = []
        start = prefix
        end = _prefix_end(prefix)
        while True:
            response = await self._range(start, end, revision=revision, limit=8)
            for kv in response.kvs:
                pieces.append(bytes(kv.value))
            if not response.more or not response.kvs:
                break
            start = bytes(response.kvs[-1].key) + b"\x00"
        if len(pieces) != count:
            raise _malformed(f"{where} (expected {count} pieces, found {len(pieces)})")
        return b"".join(pieces)

    async def _value(self, raw_key: bytes, envelope: bytes, revision: int) -> bytes:
        decoded = _decode_envelope(envelope, repr(raw_key.decode("utf-8", "replace")))
        if isinstance(decoded, bytes):
            return decoded
        where = f"chunks of {raw_key.decode('utf-8', 'replace')!r}"
        value = await self._read_pieces(
            self._chunks + decoded.chunk_id.hex().encode() + b"/",
            decoded.count,
            revision=revision,
            where=where,
        )
        if len(value) != decoded.length or hashlib.sha256(value).digest() != decoded.digest:
            raise _malformed(where)
        return value

    async def _overlay(self, view: _View) -> dict[bytes, bytes | None]:
        """The pending redo stream's writes (record key → envelope or None), read at the view's revision."""
        if view.pending is None:
            return {}
        pending = view.pending
        where = f"redo stream {pending.tx_id.hex()}"
        raw = await self._read_pieces(
            self._tx + pending.tx_id.hex().encode() + b"/", pending.parts, revision=view.revision, where=where
        )
        if hashlib.sha256(raw).digest() != pending.digest:
            raise _malformed(where)
        return dict(_decode_stream(raw, where))

    async def _reading(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        for _ in range(_READ_RETRIES):
            try:
                return await fn()
            except _Compacted:
                continue  # the revision we read at was compacted meanwhile: read again at a newer one
        raise StoreError(
            f"etcd at {self.describe()} compacts faster than a read completes; lower the compaction rate"
        )

    # -- Store API: reads --------------------------------------------------------------------

    async def revision(self) -> int:
        response = await self._call("Range", rpc.RangeRequest(key=self._head_key, keys_only=True))
        return int(response.kvs[0].mod_revision) if response.kvs else 0

    async def get(self, key: str) -> bytes | None:
        raw_key = self._record_key(check_key(key))

        async def read() -> bytes | None:
            view = await self._read_view([_range_op(raw_key)])
            overlay = await self._overlay(view)
            if raw_key in overlay:
                envelope = overlay[raw_key]
            else:
                envelope = bytes(view.records[0].value) if view.records else None
            if envelope is None:
                return None
            return await self._value(raw_key, envelope, view.revision)

        return await self._reading(read)

    async def snapshot(self, prefix: str = "") -> Snapshot:
        if not isinstance(prefix, str):
            raise StoreError(f"store prefix must be a str, got {type(prefix).__name__}")
        start = self._rec + prefix.encode("utf-8", "surrogatepass")
        end = _prefix_end(start)

        async def read() -> Snapshot:
            view = await self._read_view([_range_op(start, end, limit=_PAGE_RECORDS)])
            envelopes: dict[bytes, bytes | None] = {bytes(kv.key): bytes(kv.value) for kv in view.records}
            more = view.more
            while more and view.records:
                after = bytes(view.records[-1].key) + b"\x00"
                response = await self._range(after, end, revision=view.revision, limit=_PAGE_RECORDS)
                view.records = list(response.kvs)
                more = bool(response.more)
                envelopes.update((bytes(kv.key), bytes(kv.value)) for kv in view.records)
            for raw_key, envelope in (await self._overlay(view)).items():
                if raw_key.startswith(start):
                    envelopes[raw_key] = envelope
            out: dict[str, bytes] = {}
            for raw_key in sorted(envelopes):
                envelope = envelopes[raw_key]
                if envelope is not None:
                    out[self._user_key(raw_key)] = await self._value(raw_key, envelope, view.revision)
            return Snapshot(view.head_mod, out)

        return await self._reading(read)

    async def changes_since(self, revision: int, prefixes: Sequence[str] = ("",)) -> Snapshot | None:
        """The records under ``prefixes`` written after store revision ``revision`` (by etcd's
        ``mod_revision``), read together with the current store revision at one etcd revision:
        ``Snapshot(revision, {})`` when nothing moved.

        For a replica that holds the state as of ``revision`` and follows the others' commits
        (:meth:`marblekeep.store.sealed.SealedStore.changes_since`). Deleted records do not show
        (the caller checks the record count); ``None`` while a large commit is being applied or if
        the store revision is below ``revision``: read the whole state instead. etcd filters by
        ``mod_revision`` after reading the range, so narrow ``prefixes`` keep a large state cheap."""
        ranges = []
        for prefix in prefixes:
            start = self._rec + prefix.encode("utf-8", "surrogatepass")
            # no limit: etcd filters by mod_revision after ranging, so a limit would cut the range
            ranges.append(_range_op(start, _prefix_end(start), min_mod_revision=revision + 1))

        async def read() -> Snapshot | None:
            response = await self._read_txn([*self._head_ops(), *ranges])
            view = self._view(response)
            if view.pending is not None or view.head_mod < revision:
                return None
            if view.head_mod == revision:
                return Snapshot(revision, {})
            out: dict[str, bytes] = {}
            for result in response.responses[2:]:
                for kv in result.response_range.kvs:
                    raw_key = bytes(kv.key)
                    out[self._user_key(raw_key)] = await self._value(raw_key, bytes(kv.value), view.revision)
            return Snapshot(view.head_mod, out)

        return await self._reading(read)

    # -- Store API: commit -------------------------------------------------------------------

    def _op_size(self, key: bytes, envelope: bytes | None) -> int:
        return _OP_OVERHEAD + len(key) + (0 if envelope is None else len(envelope))

    async def _stage(self, prefix: bytes, data: bytes) -> int:
        """Write ``data`` as immutable pieces ``prefix<n:08d>``; returns the number of pieces."""
        size = self.config.chunk_size
        count = max(1, -(-len(data) // size))
        for n in range(count):
            piece = data[n * size : (n + 1) * size]
            request = rpc.PutRequest(key=prefix + f"{n:08d}".encode(), value=piece)
            await self._call("Put", request, timeout=self.config.timeout * 4)
        return count

    async def _prepare(self, writes: Mapping[str, bytes | None]) -> list[tuple[bytes, bytes | None]]:
        """Record key → envelope (``None``: delete); values above the inline limit are staged as chunks."""
        ops: list[tuple[bytes, bytes | None]] = []
        for key, value in writes.items():
            raw_key = self._record_key(key)
            if value is None:
                ops.append((raw_key, None))
            elif len(value) <= self.config.inline_limit:
                ops.append((raw_key, bytes([_INLINE]) + value))
            else:
                chunk_id = self._rng(_ID)
                count = await self._stage(self._chunks + chunk_id.hex().encode() + b"/", value)
                pointer = _Pointer(chunk_id, count, len(value), hashlib.sha256(value).digest())
                ops.append((raw_key, pointer.encode()))
        return ops

    def _fits(self, ops: Sequence[tuple[bytes, bytes | None]]) -> bool:
        if len(ops) + 3 > self.config.max_txn_ops:  # + head, pending, slack
            return False
        return sum(self._op_size(k, v) for k, v in ops) <= self._budget

    def _batches(self, ops: Sequence[tuple[bytes, bytes | None]]) -> list[list[tuple[bytes, bytes | None]]]:
        batches: list[list[tuple[bytes, bytes | None]]] = [[]]
        size = 0
        for op in ops:
            cost = self._op_size(*op)
            if batches[-1] and (len(batches[-1]) + 2 > self.config.max_txn_ops or size + cost > self._budget):
                batches.append([])
                size = 0
            batches[-1].append(op)
            size += cost
        return [b for b in batches if b]

    @staticmethod
    def _write_op(key: bytes, envelope: bytes | None) -> Any:
        if envelope is None:
            return _delete_op(key, prev_kv=True)
        return _put_op(key, envelope, prev_kv=True)

    def _head_value(self, commit_id: bytes) -> bytes:
        return _HEAD_MAGIC + commit_id

    def _replaced_chunks(self, response: Any, ops: Sequence[tuple[bytes, bytes | None]]) -> list[bytes]:
        """Chunk ids that the writes in ``response`` (one per op, in order) made unreferenced."""
        freed: list[bytes] = []
        for op, result in zip(ops, response.responses, strict=False):
            which = result.WhichOneof("response")
            if which == "response_put":
                prev = [result.response_put.prev_kv] if result.response_put.HasField("prev_kv") else []
            elif which == "response_delete_range":
                prev = list(result.response_delete_range.prev_kvs)
            else:
                continue
            new = None if op[1] is None else _decode_envelope(op[1], "new record")
            for kv in prev:
                try:
                    old = _decode_envelope(bytes(kv.value), "old record")
                except StoreError:
                    continue
                if isinstance(old, _Pointer) and not (
                    isinstance(new, _Pointer) and new.chunk_id == old.chunk_id
                ):
                    freed.append(old.chunk_id)
        return freed

    async def _delete_prefixes(self, prefixes: Iterable[bytes]) -> None:
        """Best effort: remove unreferenced chunk sets / redo streams (leftovers are collected at open)."""
        for prefix in prefixes:
            try:
                await self._call(
                    "DeleteRange", rpc.DeleteRangeRequest(key=prefix, range_end=_prefix_end(prefix))
                )
            except StoreError as exc:
                log.warning("could not remove unreferenced etcd records", extra={"reason": exc.message})
                return

    def _chunk_prefix(self, chunk_id: bytes) -> bytes:
        return self._chunks + chunk_id.hex().encode() + b"/"

    def _tx_prefix(self, tx_id: bytes) -> bytes:
        return self._tx + tx_id.hex().encode() + b"/"

    async def _apply(
        self, ops: Sequence[tuple[bytes, bytes | None]], head_mod: int, pending_mod: int
    ) -> bool:
        """Write a redo stream's ops to the records, each batch guarded by the flip's head and pending.

        Returns ``False`` if the guard failed (someone else finished the commit and moved on)."""
        guard = [_mod_equals(self._head_key, head_mod), _mod_equals(self._pending_key, pending_mod)]
        freed: list[bytes] = []
        try:
            for batch in self._batches(ops):
                try:
                    response = await self._txn(guard, [self._write_op(k, v) for k, v in batch])
                except _Ambiguous:
                    raise self._conn.unreachable() from None
                if not response.succeeded:
                    return False
                freed.extend(self._replaced_chunks(response, batch))
        finally:
            await self._delete_prefixes(self._chunk_prefix(c) for c in freed)
        return True

    async def _roll_forward(self, view: _View) -> None:
        """Finish the large commit that ``view`` shows pending (idempotent, guarded by the head)."""
        for _ in range(_READ_RETRIES):
            try:
                overlay = await self._overlay(view)
                break
            except _Compacted:
                view = await self._read_view()
                if view.pending is None:
                    return
        else:
            raise StoreError(f"etcd at {self.describe()} compacts faster than a read completes")
        await self._apply(list(overlay.items()), view.head_mod, view.pending_mod)

    async def _clear(self, head_mod: int, pending_mod: int) -> int | None:
        """Delete ``pending`` with a new head once its stream is applied; the new revision or ``None``."""
        try:
            response = await self._txn(
                [_mod_equals(self._head_key, head_mod), _mod_equals(self._pending_key, pending_mod)],
                [_delete_op(self._pending_key), _put_op(self._head_key, self._head_value(self._rng(_ID)))],
            )
        except _Ambiguous:
            return None  # finished by the next writer or the next open
        return int(response.header.revision) if response.succeeded else None

    async def _resolve(self, expected: int, commit_id: bytes) -> int | None:
        """After an ambiguous flip: its revision if it was applied, ``None`` if it never will be."""
        try:
            view = await self._read_view()
            if view.head_commit == commit_id:
                return view.head_mod
            if view.head_mod != expected:
                return None
            fence = await self._txn(
                [_mod_equals(self._head_key, expected)],
                [_put_op(self._head_key, self._head_value(self._rng(_ID)))],
            )
            if fence.succeeded:
                return None
            view = await self._read_view()
            return view.head_mod if view.head_commit == commit_id else None
        except (_Ambiguous, StoreError):
            raise StoreError(
                f"etcd at {self.describe()} became unreachable during a commit, so whether it was applied "
                "is unknown; the Coordinator re-reads the state before its next "
                "write"
            ) from None

    async def _flip(
        self,
        expected: int,
        ops: Sequence[tuple[bytes, bytes | None]],
        extra: Sequence[Any],
        commit_id: bytes,
        pending_mod: int,
    ) -> tuple[int, Any | None] | _View:
        """The deciding transaction: ``(revision, response or None)`` if applied, else the head as read."""
        compare = [_mod_equals(self._head_key, expected)]
        compare.append(
            _mod_equals(self._pending_key, pending_mod) if pending_mod else _absent(self._pending_key)
        )
        success = [self._write_op(k, v) for k, v in ops]
        success.append(_put_op(self._head_key, self._head_value(commit_id)))
        success.extend(extra)
        try:
            response = await self._txn(compare, success, self._head_ops())
        except _Ambiguous:
            revision = await self._resolve(expected, commit_id)
            if revision is None:
                raise StoreError(
                    f"the connection to etcd at {self.describe()} broke during a commit; it was not "
                    "applied; retry"
                ) from None
            return revision, None
        if response.succeeded:
            return int(response.header.revision), response
        return self._view(response)

    def _conflict(self, expected: int, now: int) -> ConflictError:
        return ConflictError(f"store changed since revision {expected} (now {now}); re-read and retry")

    async def commit(self, writes: Mapping[str, bytes | None], *, expected_revision: int) -> int:
        checked = check_writes(writes)
        if self._conn.closed:
            raise StoreError(f"the etcd store {self.describe()} is closed")
        if not checked or any(v is not None and len(v) > self.config.inline_limit for v in checked.values()):
            # an empty commit only checks; a commit with chunks checks before staging them
            current = await self.revision()
            if current != expected_revision:
                raise self._conflict(expected_revision, current)
            if not checked:
                return current
        ops = await self._prepare(checked)
        try:
            if self._fits(ops):
                return await self._commit_small(ops, expected_revision)
            return await self._commit_large(ops, expected_revision)
        except ConflictError:
            # not applied: the chunks staged for it are referenced by nothing
            staged = [_decode_envelope(v, "new record") for _, v in ops if v is not None]
            await self._delete_prefixes(
                self._chunk_prefix(p.chunk_id) for p in staged if isinstance(p, _Pointer)
            )
            raise

    async def _commit_small(self, ops: Sequence[tuple[bytes, bytes | None]], expected: int) -> int:
        commit_id = self._rng(_ID)
        pending_mod = 0
        old_pending: _Pending | None = None
        for _ in range(3):
            extra = [_delete_op(self._pending_key)] if pending_mod else []
            outcome = await self._flip(expected, ops, extra, commit_id, pending_mod)
            if isinstance(outcome, tuple):
                revision, response = outcome
                if response is not None:
                    freed = self._replaced_chunks(response, ops)
                    await self._delete_prefixes(self._chunk_prefix(c) for c in freed)
                if old_pending is not None:
                    await self._delete_prefixes([self._tx_prefix(old_pending.tx_id)])
                return revision
            if outcome.head_mod != expected:
                raise self._conflict(expected, outcome.head_mod)
            if outcome.pending is None:
                continue  # the pending commit was cleared between the compare and the read
            # a large commit at this revision is not fully applied yet: finish it, then write (and clear it)
            await self._roll_forward(outcome)
            pending_mod, old_pending = outcome.pending_mod, outcome.pending
        raise StoreError(
            f"etcd at {self.describe()}: the commit kept losing against a concurrent writer; retry"
        )

    async def _commit_large(self, ops: Sequence[tuple[bytes, bytes | None]], expected: int) -> int:
        view = await self._read_view()
        if view.head_mod != expected:
            raise self._conflict(expected, view.head_mod)
        pending_mod = 0
        old_pending: _Pending | None = None
        if view.pending is not None:
            await self._roll_forward(view)
            pending_mod, old_pending = view.pending_mod, view.pending
        stream = _encode_stream(ops)
        tx_id = self._rng(_ID)
        parts = await self._stage(self._tx_prefix(tx_id), stream)
        pending = _Pending(tx_id, parts, hashlib.sha256(stream).digest())
        commit_id = self._rng(_ID)
        outcome = await self._flip(
            expected, (), [_put_op(self._pending_key, pending.encode())], commit_id, pending_mod
        )
        if not isinstance(outcome, tuple):
            await self._delete_prefixes([self._tx_prefix(tx_id)])
            raise self._conflict(expected, outcome.head_mod)
        flip_revision = outcome[0]
        if old_pending is not None:
            await self._delete_prefixes([self._tx_prefix(old_pending.tx_id)])
        # head and pending were put by the flip, so both carry its revision
        if not await self._apply(ops, flip_revision, flip_revision):
            return flip_revision
        cleared = await self._clear(flip_revision, flip_revision)
        if cleared is None:
            return flip_revision  # someone else finished it: the caller re-reads before trusting its view
        await self._delete_prefixes([self._tx_prefix(tx_id)])
        return cleared

    # -- maintenance -------------------------------------------------------------------------

    async def collect_garbage(self) -> int:
        """Finish a large commit a crashed writer left, then remove unreferenced chunks and redo pieces.

        Returns how many chunk sets / redo streams were removed. Cheap when there is nothing to do
        (two key counts).
        """
        view = await self._read_view()
        if view.pending is not None:
            await self._roll_forward(view)
            if await self._clear(view.head_mod, view.pending_mod) is not None:
                await self._delete_prefixes([self._tx_prefix(view.pending.tx_id)])
        counts = await self._read_txn(
            [
                rpc.RequestOp(
                    request_range=rpc.RangeRequest(
                        key=self._chunks, range_end=_prefix_end(self._chunks), count_only=True
                    )
                ),
                rpc.RequestOp(
                    request_range=rpc.RangeRequest(
                        key=self._tx, range_end=_prefix_end(self._tx), count_only=True
                    )
                ),
            ]
        )
        if not any(int(r.response_range.count) for r in counts.responses):
            return 0

        async def scan() -> tuple[_View, set[bytes], set[bytes]]:
            current = await self._read_view()
            referenced: set[bytes] = set()
            if current.pending is not None:
                return current, set(), set()
            end = _prefix_end(self._rec)
            start = self._rec
            while True:
                response = await self._range(start, end, revision=current.revision, limit=_PAGE_RECORDS)
                for kv in response.kvs:
                    decoded = _decode_envelope(
                        bytes(kv.value), repr(bytes(kv.key).decode("utf-8", "replace"))
                    )
                    if isinstance(decoded, _Pointer):
                        referenced.add(decoded.chunk_id.hex().encode())
                if not response.more or not response.kvs:
                    break
                start = bytes(response.kvs[-1].key) + b"\x00"
            orphans: set[bytes] = set()
            for area in (self._chunks, self._tx):
                response = await self._range(
                    area, _prefix_end(area), revision=current.revision, keys_only=True
                )
                for kv in response.kvs:
                    ident = bytes(kv.key)[len(area) :].split(b"/", 1)[0]
                    if area is self._tx or ident not in referenced:
                        orphans.add(area + ident + b"/")
            return current, referenced, orphans

        current, _, orphans = await self._reading(scan)
        if current.pending is not None or not orphans:
            return 0
        # The fence: after it, no commit that staged before the scan can flip (its expected head is gone).
        try:
            fence = await self._txn(
                [_mod_equals(self._head_key, current.head_mod), _absent(self._pending_key)],
                [_put_op(self._head_key, self._head_value(self._rng(_ID)))],
            )
        except _Ambiguous:
            raise self._conn.unreachable() from None
        if not fence.succeeded:
            return 0  # a writer is active: leave the leftovers for the next collection
        await self._delete_prefixes(sorted(orphans))
        log.info("removed leftovers of interrupted etcd commits", extra={"count": len(orphans)})
        return len(orphans)

    async def close(self) -> None:
        if not self._conn.closed:
            await self._conn.close()

    # -- replica membership (for the attested key hand-over; not part of the store's content) ------

    async def register_member(self, member_id: str, value: bytes, ttl: int) -> int:
        """Put ``P members/<member_id>`` = ``value`` under a new lease of ``ttl`` seconds; the lease id."""
        grant = await self._conn.lease_call("LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl))
        if grant.error:
            raise StoreError(f"etcd at {self.describe()} refused a lease: {grant.error}")
        lease = int(grant.ID)
        request = rpc.PutRequest(key=self._members + member_id.encode("utf-8"), value=value, lease=lease)
        await self._call("Put", request)
        return lease

    async def keep_member_alive(self, lease: int) -> int:
        """Renew a membership lease; the remaining TTL (0: expired, register again)."""
        return await self._conn.lease_keep_alive(lease)

    async def revoke_member(self, lease: int) -> None:
        """End a membership lease now (its key disappears)."""
        await self._conn.lease_call("LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease))

    async def members(self, limit: int = 64) -> dict[str, bytes]:
        """The registered replicas: id -> value (at most ``limit``)."""
        request = rpc.RangeRequest(key=self._members, range_end=_prefix_end(self._members), limit=limit)
        response = await self._call("Range", request)
        return {
            bytes(kv.key)[len(self._members) :].decode("utf-8", "replace"): bytes(kv.value)
            for kv in response.kvs
        }

    async def watch_head(self, after: int) -> AsyncIterator[int]:
        """Yield the store revision each time it moves past ``after``, until the store is closed.

        Built on an etcd watch of ``P head``. The watch reconnects on its own (trying the
        endpoints in turn) and, after reconnecting or when it fell behind a compaction, yields
        the current revision, so a follower that re-reads on every yield never misses a commit.
        """
        while not self._conn.closed:
            call = None
            try:
                call = self._conn.watch_stub().Watch()
                await call.write(
                    rpc.WatchRequest(
                        create_request=rpc.WatchCreateRequest(key=self._head_key, start_revision=after + 1)
                    )
                )
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF or response.canceled:
                        break
                    if response.compact_revision:
                        break  # fell behind a compaction: re-read below, then watch again
                    revisions = [int(e.kv.mod_revision) for e in response.events]
                    if revisions and max(revisions) > after:
                        after = max(revisions)
                        yield after
            except grpc.aio.AioRpcError:
                self._conn.rotate()
            finally:
                if call is not None:
                    call.cancel()
            if self._conn.closed:
                return
            await asyncio.sleep(0.5)
            try:
                current = await self.revision()
            except StoreError:
                continue
            if current != after:
                after = current
                yield current

    # defined last: inside the class body, ``list`` names this method
    async def list(self, prefix: str) -> dict[str, bytes]:
        return dict((await self.snapshot(prefix)).records)
