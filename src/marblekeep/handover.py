"""The attested key hand-over between Coordinator replicas (docs/ha.md §1 "Joining").

A replica whose own KEK has no ``meta:kek/<id>`` entry (another CPU, another enclave build, in
simulation its own key file) asks a running replica for the *deployment KEK*
(:mod:`marblekeep.store.sealed`) over a mutually attested exchange, one HTTPS request on the
running replica's Marble API (``POST /coordinator/v1/handover``):

1. The joiner makes a fresh 32-byte nonce and an ephemeral X25519 key pair and sends TEE evidence
   whose report data is ``SHA-256(JOIN_TAG || nonce || public key) || 32 zero bytes``.
2. The server verifies that evidence against **its own identity** (:func:`check_peer`): simulation
   evidence only when both run with ``--simulation``; otherwise a verified SGX quote with the same
   MRSIGNER and ISV product ID, an ISV SVN at least its own and Debug equal (``ProductKey``), or
   the same MRENCLAVE (``UniqueKey``), and a TCB status ``UpToDate`` or its own.
3. It answers with the deployment KEK sealed with HPKE (X25519, HKDF-SHA256, AES-256-GCM) to the
   joiner's key, ``info = HPKE_TAG || nonce || store id || epoch``, the state it serves (store id,
   epoch) and its own evidence whose report data is ``SHA-256(SERVE_TAG || joiner nonce || joiner
   key || server nonce || store id || epoch || SHA-256(sealed key)) || 32 zero bytes``.
4. The joiner verifies that evidence against its own identity (same rules, without the SVN
   floor: the key it receives must open the state anyway), opens the key, opens the state with
   it (which checks it is the attested state at the attested epoch or later), stores its own
   entry and seeds its rollback anchor from that epoch.

The security does not rest on TLS (the joiner cannot know the server's certificate before it
has the state): the evidence binds both ephemeral values and the answer, as in the Marble
protocol (docs/protocol.md). Registered replicas are found in etcd (:class:`Membership`).

The message layer (encode, parse, report data, sealing, the identity policy) is pure; the
client, the server's handler and the membership loop do the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.errors import (
    AttestationError,
    MarbleKeepError,
    RequestError,
    SealError,
    StateError,
    StoreError,
)
from marblekeep.marble.protocol import REPORT_DATA_SIZE, EvidenceType
from marblekeep.replica import BackgroundLoop
from marblekeep.store.kek import KEK_SIZE
from marblekeep.store.sealed import HandoverFloor

__all__ = [
    "HANDOVER_PATH",
    "MAX_HANDOVER_BODY",
    "Answer",
    "HandoverClient",
    "JoinRequest",
    "Membership",
    "check_peer",
    "join_report_data",
    "serve_report_data",
]

log = logging.getLogger("marblekeep.handover")

HANDOVER_PATH = "/coordinator/v1/handover"
#: Upper bound of a request or answer body (evidence is at most 128 KiB, base64 adds a third).
MAX_HANDOVER_BODY = 256 * 1024
MAX_EVIDENCE = 128 * 1024
JOIN_TAG = b"marblekeep-handover-join-v1"
SERVE_TAG = b"marblekeep-handover-serve-v1"
HPKE_TAG = b"marblekeep-handover-kek-v1"
NONCE_SIZE = 32
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_SEALED_SIZE = 32 + KEK_SIZE + 16
_MAX_REPLICA_ID = 64


# --------------------------------------------------------------------------------------------
# messages (pure)


@dataclass(frozen=True)
class JoinRequest:
    replica_id: str
    nonce: bytes
    hpke_public_key: bytes
    evidence_type: str
    evidence: bytes


@dataclass(frozen=True)
class Answer:
    server_nonce: bytes
    store_id: bytes
    epoch: int
    sealed_key: bytes
    evidence_type: str
    evidence: bytes


def join_report_data(nonce: bytes, public_key: bytes) -> bytes:
    return hashlib.sha256(JOIN_TAG + nonce + public_key).digest() + bytes(32)


def serve_report_data(
    join: JoinRequest, server_nonce: bytes, store_id: bytes, epoch: int, sealed: bytes
) -> bytes:
    digest = hashlib.sha256(
        SERVE_TAG
        + join.nonce
        + join.hpke_public_key
        + server_nonce
        + store_id
        + struct.pack(">Q", epoch)
        + hashlib.sha256(sealed).digest()
    ).digest()
    return digest + bytes(32)


def _hpke_info(nonce: bytes, store_id: bytes, epoch: int) -> bytes:
    return HPKE_TAG + nonce + store_id + struct.pack(">Q", epoch)


def _b64(doc: Mapping[str, Any], key: str, what: str, *, size: int | None = None, limit: int = 0) -> bytes:
    raw = doc.get(key)
    if not isinstance(raw, str):
        raise RequestError(f"{what}: field {key!r} must be a base64 string")
    try:
        value = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: field {key!r} is not valid base64") from None
    if size is not None and len(value) != size:
        raise RequestError(f"{what}: field {key!r} must be {size} bytes, got {len(value)}")
    if limit and len(value) > limit:
        raise RequestError(f"{what}: field {key!r} is larger than {limit} bytes")
    return value


def _load(body: bytes, what: str) -> dict[str, Any]:
    if len(body) > MAX_HANDOVER_BODY:
        raise RequestError(f"{what} is larger than {MAX_HANDOVER_BODY} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise RequestError(f"{what} must be a JSON object")
    return doc


def _evidence_type(doc: Mapping[str, Any], what: str) -> str:
    kind = doc.get("evidenceType")
    if kind not in (EvidenceType.SIMULATION.value, EvidenceType.SGX_DCAP.value):
        raise RequestError(f"{what}: field 'evidenceType' must be 'simulation' or 'sgx-dcap'")
    return str(kind)


def encode_join(req: JoinRequest) -> bytes:
    return json.dumps(
        {
            "replicaId": req.replica_id,
            "nonce": base64.b64encode(req.nonce).decode(),
            "hpkePublicKey": base64.b64encode(req.hpke_public_key).decode(),
            "evidenceType": req.evidence_type,
            "evidence": base64.b64encode(req.evidence).decode(),
        }
    ).encode()


def parse_join(body: bytes) -> JoinRequest:
    what = "key hand-over request"
    doc = _load(body, what)
    replica_id = doc.get("replicaId")
    if (
        not isinstance(replica_id, str)
        or not 0 < len(replica_id) <= _MAX_REPLICA_ID
        or not replica_id.isprintable()
    ):
        raise RequestError(
            f"{what}: field 'replicaId' must be a printable string of 1 to {_MAX_REPLICA_ID} characters"
        )
    return JoinRequest(
        replica_id,
        _b64(doc, "nonce", what, size=NONCE_SIZE),
        _b64(doc, "hpkePublicKey", what, size=32),
        _evidence_type(doc, what),
        _b64(doc, "evidence", what, limit=MAX_EVIDENCE),
    )


def encode_answer(answer: Answer) -> dict[str, Any]:
    return {
        "serverNonce": base64.b64encode(answer.server_nonce).decode(),
        "storeId": base64.b64encode(answer.store_id).decode(),
        "epoch": answer.epoch,
        "sealedKey": base64.b64encode(answer.sealed_key).decode(),
        "evidenceType": answer.evidence_type,
        "evidence": base64.b64encode(answer.evidence).decode(),
    }


def parse_answer(doc: Mapping[str, Any]) -> Answer:
    what = "key hand-over answer"
    epoch = doc.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 1 << 63:
        raise RequestError(f"{what}: field 'epoch' must be a non-negative integer")
    return Answer(
        _b64(doc, "serverNonce", what, size=NONCE_SIZE),
        _b64(doc, "storeId", what, size=16),
        epoch,
        _b64(doc, "sealedKey", what, size=_SEALED_SIZE),
        _evidence_type(doc, what),
        _b64(doc, "evidence", what, limit=MAX_EVIDENCE),
    )


# --------------------------------------------------------------------------------------------
# identity policy (pure)


def check_peer(own: TeeClaims, peer: TeeClaims, *, seal_mode: str, peer_role: str) -> None:
    """Raise :class:`AttestationError` unless ``peer`` may take part in a hand-over with ``own``.

    ``seal_mode``: ``"UniqueKey"`` (same MRENCLAVE) or anything else (ProductKey rules: same MRSIGNER
    and ISV product ID, Debug equal; a joiner's ISV SVN at least the server's; TCB ``UpToDate`` or
    as good as the checker's). ``peer_role`` is ``"joiner"`` (checked by the server, SVN floor
    applies) or ``"server"`` (checked by the joiner).
    """
    if own.kind is TeeKind.SIMULATION or peer.kind is TeeKind.SIMULATION:
        if own.kind is peer.kind:
            return
        if own.kind is TeeKind.SIMULATION:
            raise AttestationError(
                f"the {peer_role} sent TEE evidence, but this replica runs with --simulation: simulation "
                "replicas hand the key over only to simulation replicas"
            )
        raise AttestationError(
            f"the {peer_role} sent simulation evidence, but this replica runs in a TEE: simulation evidence "
            "never receives or hands over a production key (start both with --simulation, or neither)"
        )
    if own.kind is not TeeKind.SGX or peer.kind is not TeeKind.SGX:
        raise AttestationError(
            f"the {peer_role}'s evidence is {peer.kind.value}: only SGX replicas hand keys over"
        )
    if own.debug != peer.debug:
        raise AttestationError(
            f"the {peer_role} is a {'debug' if peer.debug else 'production'} enclave and this replica "
            "is not: Debug must be equal"
        )
    if peer.tcb_status not in ("UpToDate", own.tcb_status):
        raise AttestationError(
            f"the {peer_role}'s TCB status {peer.tcb_status or 'unknown'} is worse than this replica's "
            f"({own.tcb_status or 'unknown'}): update its platform"
        )
    if seal_mode == "UniqueKey":
        if not hmac.compare_digest(own.mrenclave.lower(), peer.mrenclave.lower()):
            raise AttestationError(
                f"the {peer_role}'s MRENCLAVE {peer.mrenclave} differs from this replica's {own.mrenclave} "
                "(SealMode UniqueKey: only the same enclave build may join)"
            )
        return
    if not hmac.compare_digest(own.mrsigner.lower(), peer.mrsigner.lower()):
        raise AttestationError(
            f"the {peer_role}'s MRSIGNER {peer.mrsigner} differs from this replica's {own.mrsigner}: "
            "another signer's enclave may not join"
        )
    if own.isv_prod_id != peer.isv_prod_id:
        raise AttestationError(
            f"the {peer_role}'s ISV product ID {peer.isv_prod_id} differs from this replica's "
            f"{own.isv_prod_id}"
        )
    if peer_role == "joiner" and peer.isv_svn < own.isv_svn:
        raise AttestationError(
            f"the joiner's ISV SVN {peer.isv_svn} is below this replica's {own.isv_svn}: an older build may "
            "not join a newer one (update it)"
        )


# --------------------------------------------------------------------------------------------
# attestation of both sides


class Verifier(Protocol):
    async def verify(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims: ...


class Issuer(Protocol):
    def issue(self, report_data: bytes) -> bytes: ...


@dataclass
class Identity:
    """This replica's side of the hand-over: how it makes evidence and checks the other side's."""

    simulation: bool
    issuer: Issuer | None
    verifier: Verifier
    clock: Callable[[], dt.datetime]
    _own: TeeClaims | None = None

    @property
    def evidence_type(self) -> str:
        return EvidenceType.SIMULATION.value if self.simulation else EvidenceType.SGX_DCAP.value

    async def evidence(self, report_data: bytes) -> bytes:
        assert len(report_data) == REPORT_DATA_SIZE
        if self.simulation:
            return report_data
        if self.issuer is None:
            raise AttestationError("this replica has no TEE evidence issuer: run it under Gramine-SGX")
        return await asyncio.to_thread(self.issuer.issue, report_data)

    async def own_claims(self) -> TeeClaims:
        """This replica's own measurements: its own quote, verified like a peer's (cached)."""
        if self.simulation:
            return TeeClaims(kind=TeeKind.SIMULATION)
        if self._own is None:
            evidence = await self.evidence(hashlib.sha256(b"marblekeep-handover-self").digest() + bytes(32))
            self._own = await self.verifier.verify(self.evidence_type, evidence, self.clock())
        return self._own

    async def check(
        self, evidence_type: str, evidence: bytes, report_data: bytes, *, seal_mode: str, peer_role: str
    ) -> None:
        """Verify the peer's evidence, its binding to ``report_data`` and its identity against ours."""
        if evidence_type == EvidenceType.SIMULATION.value:
            peer = TeeClaims(kind=TeeKind.SIMULATION, report_data=evidence)
        elif self.simulation:
            peer = TeeClaims(kind=TeeKind.SGX)  # refused by check_peer without verifying anything
        else:
            peer = await self.verifier.verify(evidence_type, evidence, self.clock())
        check_peer(await self.own_claims(), peer, seal_mode=seal_mode, peer_role=peer_role)
        if not hmac.compare_digest(peer.report_data, report_data):
            raise AttestationError(
                f"the {peer_role}'s evidence does not bind this exchange (its report data differs): "
                "a replayed or relayed message"
            )


# --------------------------------------------------------------------------------------------
# server side


class KeySource(Protocol):
    """What the serving replica hands over: its deployment KEK and the state it serves."""

    def handover_material(self) -> tuple[bytes, bytes, int, str]:
        """``(deployment KEK, store id, epoch, seal mode)``; raises StateError when it has none."""
        ...


async def answer_join(body: bytes, source: KeySource, identity: Identity, peer: str) -> dict[str, Any]:
    """The server's handling of one request: verify the joiner, then seal the key to it (JSON data)."""
    try:
        join = parse_join(body)
        dkek, store_id, epoch, seal_mode = source.handover_material()
        await identity.check(
            join.evidence_type,
            join.evidence,
            join_report_data(join.nonce, join.hpke_public_key),
            seal_mode=seal_mode,
            peer_role="joiner",
        )
        try:
            public_key = X25519PublicKey.from_public_bytes(join.hpke_public_key)
            sealed = _SUITE.encrypt(dkek, public_key, _hpke_info(join.nonce, store_id, epoch))
        except ValueError:
            raise RequestError("field 'hpkePublicKey' is not a usable X25519 public key") from None
        server_nonce = secrets.token_bytes(NONCE_SIZE)
        evidence = await identity.evidence(serve_report_data(join, server_nonce, store_id, epoch, sealed))
    except MarbleKeepError as exc:
        log.warning("key hand-over refused", extra={"peer": peer, "reason": exc.message})
        raise
    log.info(
        "deployment key handed over to a joining replica after attestation",
        extra={"peer": peer, "replica": join.replica_id, "epoch": epoch},
    )
    return encode_answer(Answer(server_nonce, store_id, epoch, sealed, identity.evidence_type, evidence))


# --------------------------------------------------------------------------------------------
# client side


class MemberSource(Protocol):
    async def members(self, limit: int = 64) -> dict[str, bytes]: ...


Poster = Callable[[str, bytes, float], Awaitable[tuple[int, bytes]]]


async def _https_post(address: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """POST to ``https://<address>/coordinator/v1/handover`` (the certificate is not checked: the
    exchange is attested at the message layer; see the module docstring)."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.post(
            f"https://{address}{HANDOVER_PATH}",
            data=body,
            headers={"Content-Type": "application/json"},
            ssl=False,
        ) as response,
    ):
        data = await response.content.read(MAX_HANDOVER_BODY + 1)
        return response.status, data


@dataclass
class HandoverClient:
    """The joining replica: asks registered replicas in turn until one hands the key over."""

    members: MemberSource
    identity: Identity
    replica_id: str
    wait: float = 60.0
    request_timeout: float = 10.0
    post: Poster = _https_post
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    monotonic: Callable[[], float] = lambda: asyncio.get_running_loop().time()

    async def _ask(self, name: str, address: str) -> tuple[bytes, HandoverFloor]:
        private = X25519PrivateKey.generate()
        public = private.public_key().public_bytes_raw()
        nonce = secrets.token_bytes(NONCE_SIZE)
        evidence = await self.identity.evidence(join_report_data(nonce, public))
        join = JoinRequest(self.replica_id, nonce, public, self.identity.evidence_type, evidence)
        try:
            status, raw = await self.post(address, encode_join(join), self.request_timeout)
        except (TimeoutError, OSError) as exc:
            raise StoreError(f"replica {name} at {address} is unreachable ({type(exc).__name__})") from None
        except Exception as exc:  # aiohttp's client errors
            raise StoreError(f"replica {name} at {address} is unreachable ({type(exc).__name__})") from None
        try:
            doc = _load(raw, "key hand-over answer")
        except RequestError:
            raise StoreError(f"replica {name} at {address} answered HTTP {status} without JSON") from None
        if status != 200 or doc.get("status") != "success" or not isinstance(doc.get("data"), dict):
            message = doc.get("message") if isinstance(doc.get("message"), str) else f"HTTP {status}"
            if status == 403:
                raise AttestationError(f"replica {name} refused the key hand-over: {str(message)[:500]}")
            raise StateError(f"replica {name} cannot hand the key over: {str(message)[:500]}")
        answer = parse_answer(doc["data"])
        await self.identity.check(
            answer.evidence_type,
            answer.evidence,
            serve_report_data(join, answer.server_nonce, answer.store_id, answer.epoch, answer.sealed_key),
            seal_mode="ProductKey",
            peer_role="server",
        )
        try:
            dkek = _SUITE.decrypt(
                answer.sealed_key, private, _hpke_info(nonce, answer.store_id, answer.epoch)
            )
        except (InvalidTag, ValueError):
            raise SealError(
                f"the key sealed by replica {name} does not open with this exchange's key"
            ) from None
        if len(dkek) != KEK_SIZE:
            raise SealError(f"replica {name} handed over a key of the wrong size")
        return dkek, HandoverFloor(answer.store_id, answer.epoch)

    async def obtain(self) -> tuple[bytes, HandoverFloor] | None:
        """The deployment KEK and the attested floor, or ``None`` when no replica handed it over within
        ``wait`` seconds (then the caller enters Recovery)."""
        end = self.monotonic() + self.wait
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                registered = await self.members.members()
            except StoreError as exc:
                log.warning("cannot list the registered replicas", extra={"reason": exc.message})
                registered = {}
            for name, raw in sorted(registered.items()):
                if name == self.replica_id:
                    continue
                address = _member_address(raw)
                if address is None:
                    log.warning(
                        "a registered replica has an unreadable address", extra={"replica": name[:64]}
                    )
                    continue
                try:
                    result = await self._ask(name, address)
                except MarbleKeepError as exc:
                    log.warning(
                        "key hand-over from a replica failed",
                        extra={"replica": name, "address": address, "reason": exc.message},
                    )
                    continue
                log.info(
                    "deployment key received from a replica after mutual attestation",
                    extra={"replica": name, "address": address, "epoch": result[1].epoch},
                )
                return result
            remaining = end - self.monotonic()
            if remaining <= 0:
                log.warning(
                    "no replica handed the deployment key over",
                    extra={"attempts": attempt, "registered": len(registered), "waited_s": self.wait},
                )
                return None
            log.info(
                "waiting for a replica to hand the deployment key over",
                extra={"attempt": attempt, "registered": len(registered), "retry_in_s": round(delay, 1)},
            )
            await self.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


def _member_address(raw: bytes) -> str | None:
    try:
        doc = json.loads(raw[:4096])
    except (ValueError, UnicodeDecodeError):
        return None
    address = doc.get("address") if isinstance(doc, dict) else None
    if (
        not isinstance(address, str)
        or not 0 < len(address) <= 300
        or not address.isprintable()
        or "/" in address
    ):
        return None
    return address


# --------------------------------------------------------------------------------------------
# membership


class Registry(Protocol):
    async def register_member(self, member_id: str, value: bytes, ttl: int) -> int: ...

    async def keep_member_alive(self, lease: int) -> int: ...

    async def revoke_member(self, lease: int) -> None: ...


def advertised_address(mesh_addr: str, override: str = "") -> str:
    """The hand-over address other replicas use: ``override``, else the Marble API address with an
    unspecified host (``0.0.0.0``, ``::``, empty) replaced by this host's name."""
    if override:
        return override
    host, _, port = mesh_addr.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):  # noqa: S104 (a comparison, not a bind)
        host = socket.gethostname()
    return f"{host}:{port}"


def new_replica_id() -> str:
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


class Membership(BackgroundLoop):
    """Keeps ``<prefix>/members/<replica id>`` registered under an etcd lease while ``ready()`` is true
    (the replica holds a stored state it can hand over). A dead replica disappears with its lease."""

    _task_name = "marblekeep-membership"

    def __init__(
        self,
        registry: Registry,
        replica_id: str,
        address: str,
        ready: Callable[[], bool],
        *,
        ttl: int = 10,
    ) -> None:
        self.registry = registry
        self.replica_id = replica_id
        self.address = address
        self.ready = ready
        self.ttl = ttl
        self.lease: int | None = None
        #: Set once registered (tests wait on it).
        self.registered = asyncio.Event()

    async def _run(self) -> None:
        value = json.dumps({"address": self.address}).encode()
        delay = 1.0
        while True:
            try:
                if self.lease is None:
                    if self.ready():
                        self.lease = await self.registry.register_member(self.replica_id, value, self.ttl)
                        self.registered.set()
                        log.info(
                            "registered for the key hand-over",
                            extra={"replica": self.replica_id, "address": self.address, "ttl_s": self.ttl},
                        )
                elif await self.registry.keep_member_alive(self.lease) <= 0:
                    log.warning(
                        "the membership lease expired; registering again", extra={"replica": self.replica_id}
                    )
                    self.lease = None
                    self.registered.clear()
                    continue
                delay = 1.0
                await asyncio.sleep(self.ttl / 3)
            except asyncio.CancelledError:
                raise
            except MarbleKeepError as exc:
                log.warning("cannot renew the replica membership", extra={"reason": exc.message})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.ttl / 2)
            except Exception as exc:  # a bug: its type only (its text or traceback might hold data)
                log.error("the membership loop failed; restarting it", extra={"error": type(exc).__name__})
                await asyncio.sleep(delay)

    async def stop(self) -> None:
        await super().stop()
        if self.lease is not None:
            with contextlib.suppress(MarbleKeepError):
                await self.registry.revoke_member(self.lease)
            self.lease = None
