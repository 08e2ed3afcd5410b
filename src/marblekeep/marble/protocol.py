"""The Marble activation protocol: wire format, binding digest, HPKE sealing, challenge book.

Used by both sides: the Coordinator (parse a request, check the binding, seal the
Parameters, keep the challenge nonces) and the Marble's premain (build a request,
open the Parameters). docs/protocol.md is the normative description; every byte
layout here is written down there with a worked example.

This module is pure: no files, sockets, clocks, environment or global randomness.
Time and randomness are parameters (:class:`ChallengeBook`); HPKE encryption draws
its ephemeral key from the OS inside ``cryptography``, which is part of the primitive.

Rules:

1. A Marble asks for a challenge: a fresh 32-byte nonce, single use, short-lived, authenticated
   by the Coordinator (:class:`ChallengeBook`: issuing one stores nothing).
2. It generates an ephemeral X25519 key pair and computes
   ``report_data = binding_digest(nonce, public key, type, uuid, dns names) || 32 zero bytes``;
   the TEE evidence carries that report data.
3. It sends the request; the Coordinator consumes the nonce (a replay finds it gone),
   verifies the evidence and that its report data equals :func:`expected_report_data`.
4. The Coordinator seals the Parameters with HPKE (RFC 9180, base mode, single shot)
   to that public key, with ``info`` binding the nonce and the UUID.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import json
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from marblekeep.errors import ConfigError, RequestError, SealError

__all__ = [
    "ACTIVATE_PATH",
    "BINDING_TAG",
    "CHALLENGE_PATH",
    "HPKE_INFO_TAG",
    "HPKE_PUBLIC_KEY_SIZE",
    "MAX_ACTIVATION_BODY",
    "MAX_EVIDENCE_BYTES",
    "NONCE_SIZE",
    "REPORT_DATA_SIZE",
    "ActivationRequest",
    "ChallengeBook",
    "ChallengeVerdict",
    "EvidenceType",
    "MarbleParameters",
    "binding_digest",
    "binding_preimage",
    "client_source",
    "encode_activation_request",
    "encode_challenge_response",
    "expected_report_data",
    "hpke_info",
    "open_parameters",
    "parse_activation_request",
    "parse_challenge_response",
    "seal_parameters",
]

CHALLENGE_PATH = "/marble/v1/challenge"
ACTIVATE_PATH = "/marble/v1/activate"

NONCE_SIZE = 32
HPKE_PUBLIC_KEY_SIZE = 32
REPORT_DATA_SIZE = 64

#: Domain tag opening the binding digest's preimage (24 ASCII bytes, no length prefix).
BINDING_TAG = b"marblekeep-activation-v1"
#: Domain tag of the challenge nonces' HMAC (only the Coordinator that issued them checks it).
_CHALLENGE_TAG = b"marblekeep-challenge-v1"
#: Domain tag opening the HPKE ``info`` (16 ASCII bytes, no length prefix).
HPKE_INFO_TAG = b"marblekeep-seal1"

#: Upper bound of an activation request body; the Coordinator should refuse larger bodies earlier.
MAX_ACTIVATION_BODY = 256 * 1024
#: Upper bound of the decoded evidence (an SGX or TDX quote with its certificate chain is ~5-8 KiB).
MAX_EVIDENCE_BYTES = 128 * 1024
MAX_MARBLE_TYPE_BYTES = 256
MAX_DNS_NAMES = 64
MAX_DNS_NAME_BYTES = 253

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_UUID_RE = re.compile(r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_DNS_NAME_RE = re.compile(r"\A[\x21-\x7e]+\Z")  # printable ASCII, no space (A-labels, IP literals)


class EvidenceType(enum.StrEnum):
    """The closed set of evidence types a Marble may send."""

    SIMULATION = "simulation"  # no TEE: data is the 64-byte report data itself
    SGX_DCAP = "sgx-dcap"  # SGX ECDSA quote v3 (raw, or with Open Enclave's 16-byte header)
    TDX = "tdx"  # TDX quote v4/v5


@dataclass(frozen=True)
class ActivationRequest:
    """One activation request as a Marble sends it (parsed and bounded, or built locally)."""

    marble_type: str
    uuid: UUID
    dns_names: tuple[str, ...]
    hpke_public_key: bytes
    nonce: bytes
    evidence_type: str
    evidence: bytes


@dataclass(frozen=True)
class MarbleParameters:
    """What a Marble receives: files to write, environment variables to set, argv to run with."""

    files: Mapping[str, bytes] = field(default_factory=dict)
    env: Mapping[str, bytes] = field(default_factory=dict)
    argv: tuple[str, ...] = ()


# --------------------------------------------------------------------------- binding


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def binding_preimage(
    nonce: bytes, hpke_public_key: bytes, marble_type: str, uuid: UUID, dns_names: Sequence[str]
) -> bytes:
    """The exact bytes hashed by :func:`binding_digest` (docs/protocol.md, "Binding digest")."""
    parts = [
        BINDING_TAG,
        _lp(nonce),
        _lp(hpke_public_key),
        _lp(marble_type.encode("utf-8")),
        _lp(uuid.bytes),
        struct.pack(">I", len(dns_names)),
    ]
    parts.extend(_lp(name.encode("utf-8")) for name in dns_names)
    return b"".join(parts)


def binding_digest(
    nonce: bytes, hpke_public_key: bytes, marble_type: str, uuid: UUID, dns_names: Sequence[str]
) -> bytes:
    """SHA-256 over the length-prefixed request fields: 32 bytes, report_data[0:32]."""
    return hashlib.sha256(binding_preimage(nonce, hpke_public_key, marble_type, uuid, dns_names)).digest()


def expected_report_data(req: ActivationRequest) -> bytes:
    """The 64 bytes the evidence must carry: the binding digest followed by 32 zero bytes."""
    digest = binding_digest(req.nonce, req.hpke_public_key, req.marble_type, req.uuid, req.dns_names)
    return digest + bytes(REPORT_DATA_SIZE - len(digest))


def hpke_info(nonce: bytes, uuid: UUID) -> bytes:
    """HPKE ``info``: tag (16) || nonce (32) || UUID (16 raw bytes) = 64 bytes."""
    return HPKE_INFO_TAG + nonce + uuid.bytes


# --------------------------------------------------------------------------- wire format


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, where: str, *, exact: int | None = None, limit: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string of standard base64")
    if limit is not None and len(value) > (limit + 2) // 3 * 4:
        raise RequestError(f"{where} is too long: at most {limit} bytes after base64 decoding")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError, binascii.Error):
        raise RequestError(f"{where} is not standard base64 (RFC 4648 alphabet with '=' padding)") from None
    if exact is not None and len(data) != exact:
        raise RequestError(f"{where} must decode to exactly {exact} bytes, got {len(data)}")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(f"duplicate JSON key {key[:64]!r}: each field may appear only once")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise RequestError(f"JSON constant {name} is not allowed")


def _load_json(body: bytes, what: str, limit: int) -> Any:
    if len(body) > limit:
        raise RequestError(f"{what} is {len(body)} bytes; the limit is {limit} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise RequestError(f"{what} is not valid JSON: {exc.msg} at {where}") from None
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply") from None
    except ValueError:  # e.g. an integer literal beyond Python's 4300-digit conversion limit
        raise RequestError(f"{what} is not valid JSON: a number is too long") from None


def _text(value: object, where: str, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where} must be a string")
    if not value:
        raise RequestError(f"{where} must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise RequestError(f"{where} contains a lone surrogate; send valid Unicode") from None
    if size > max_bytes:
        raise RequestError(f"{where} is {size} bytes in UTF-8; the limit is {max_bytes}")
    return value


def parse_activation_request(body: bytes) -> ActivationRequest:
    """Parse and bound an activation request body; raises only :class:`RequestError`, naming the field."""
    doc = _load_json(body, "activation request body", MAX_ACTIVATION_BODY)
    if not isinstance(doc, dict):
        raise RequestError("activation request body must be a JSON object")
    for name in ("marbleType", "uuid", "dnsNames", "hpkePublicKey", "nonce", "evidence"):
        if name not in doc:
            raise RequestError(f"field '{name}' is missing from the activation request")

    marble_type = _text(doc["marbleType"], "field 'marbleType'", MAX_MARBLE_TYPE_BYTES)
    if _CONTROL_RE.search(marble_type):
        raise RequestError("field 'marbleType' contains control characters")

    raw_uuid = doc["uuid"]
    if not isinstance(raw_uuid, str) or not _UUID_RE.match(raw_uuid):
        raise RequestError(
            "field 'uuid' must be a UUID in the 8-4-4-4-12 hexadecimal form, "
            "e.g. 0f7b6a3e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
        )
    marble_uuid = UUID(raw_uuid)

    raw_names = doc["dnsNames"]
    if not isinstance(raw_names, list):
        raise RequestError("field 'dnsNames' must be a JSON array of strings")
    if len(raw_names) > MAX_DNS_NAMES:
        raise RequestError(f"field 'dnsNames' has {len(raw_names)} entries; the limit is {MAX_DNS_NAMES}")
    dns_names: list[str] = []
    for i, name in enumerate(raw_names):
        where = f"field 'dnsNames[{i}]'"
        text = _text(name, where, MAX_DNS_NAME_BYTES)
        if not _DNS_NAME_RE.match(text):
            raise RequestError(
                f"{where} must be printable ASCII without spaces "
                "(a DNS name in A-label form or an IP address)"
            )
        dns_names.append(text)

    public_key = _unb64(doc["hpkePublicKey"], "field 'hpkePublicKey'", exact=HPKE_PUBLIC_KEY_SIZE)
    nonce = _unb64(doc["nonce"], "field 'nonce'", exact=NONCE_SIZE)

    evidence = doc["evidence"]
    if not isinstance(evidence, dict):
        raise RequestError("field 'evidence' must be an object {\"type\": ..., \"data\": ...}")
    if "type" not in evidence or "data" not in evidence:
        raise RequestError("field 'evidence' must have both 'type' and 'data'")
    raw_type = evidence["type"]
    known = ", ".join(repr(t.value) for t in EvidenceType)
    if not isinstance(raw_type, str) or raw_type not in {t.value for t in EvidenceType}:
        raise RequestError(f"field 'evidence.type' must be one of {known}")
    data = _unb64(evidence["data"], "field 'evidence.data'", limit=MAX_EVIDENCE_BYTES)
    if len(data) > MAX_EVIDENCE_BYTES:
        raise RequestError(f"field 'evidence.data' is {len(data)} bytes; the limit is {MAX_EVIDENCE_BYTES}")

    return ActivationRequest(
        marble_type=marble_type,
        uuid=marble_uuid,
        dns_names=tuple(dns_names),
        hpke_public_key=public_key,
        nonce=nonce,
        evidence_type=EvidenceType(raw_type),
        evidence=data,
    )


def encode_activation_request(req: ActivationRequest) -> bytes:
    """The JSON body of ``POST /marble/v1/activate`` (UTF-8, compact)."""
    doc = {
        "marbleType": req.marble_type,
        "uuid": str(req.uuid),
        "dnsNames": list(req.dns_names),
        "hpkePublicKey": _b64(req.hpke_public_key),
        "nonce": _b64(req.nonce),
        "evidence": {"type": str(req.evidence_type), "data": _b64(req.evidence)},
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_challenge_response(nonce: bytes) -> bytes:
    """JSend body answering ``POST /marble/v1/challenge``."""
    return json.dumps({"status": "success", "data": {"nonce": _b64(nonce)}}).encode("utf-8")


def parse_challenge_response(body: bytes) -> bytes:
    """The nonce from a challenge response; :class:`RequestError` if the body is not one."""
    doc = _load_json(body, "challenge response", 64 * 1024)
    if not isinstance(doc, dict) or doc.get("status") != "success" or not isinstance(doc.get("data"), dict):
        raise RequestError("challenge response is not a JSend success object with a 'data' object")
    return _unb64(doc["data"].get("nonce"), "challenge response field 'data.nonce'", exact=NONCE_SIZE)


# --------------------------------------------------------------------------- sealing


def _params_plaintext(params: MarbleParameters) -> bytes:
    doc = {
        "Files": {path: _b64(data) for path, data in params.files.items()},
        "Env": {name: _b64(value) for name, value in params.env.items()},
        "Argv": list(params.argv),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def seal_parameters(params: MarbleParameters, req: ActivationRequest) -> bytes:
    """HPKE-seal the Parameters to the request's public key: ``enc (32) || ciphertext || tag (16)``.

    Raises :class:`RequestError` when the request's public key is unusable (e.g. a low-order point).
    """
    try:
        public_key = X25519PublicKey.from_public_bytes(req.hpke_public_key)
        return _SUITE.encrypt(_params_plaintext(params), public_key, hpke_info(req.nonce, req.uuid))
    except ValueError:
        raise RequestError(
            "field 'hpkePublicKey' is not a usable X25519 public key; send the public key of a fresh key pair"
        ) from None


def _opened_map(doc: dict[str, Any], key: str, check_key: Callable[[str], str | None]) -> dict[str, bytes]:
    raw = doc.get(key, {})
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SealError(f"sealed parameters: '{key}' must be an object")
    out: dict[str, bytes] = {}
    for name, value in raw.items():
        problem = check_key(name)
        if problem:
            raise SealError(f"sealed parameters: {key} entry {name[:80]!r} {problem}")
        try:
            out[name] = _unb64(value, f"{key}[{name[:80]!r}]")
        except RequestError as exc:
            raise SealError(f"sealed parameters: {exc.message}") from None
    return out


def _check_path(name: str) -> str | None:
    if not name:
        return "has an empty path"
    if "\x00" in name:
        return "contains a NUL character"
    return None


def _check_env_name(name: str) -> str | None:
    if not name:
        return "has an empty name"
    if "=" in name or "\x00" in name:
        return "has a name containing '=' or NUL, which cannot be set in the environment"
    return None


def open_parameters(sealed: bytes, private_key: X25519PrivateKey, req: ActivationRequest) -> MarbleParameters:
    """Open sealed Parameters with the Marble's ephemeral private key; :class:`SealError` on any failure."""
    try:
        plaintext = _SUITE.decrypt(sealed, private_key, hpke_info(req.nonce, req.uuid))
    except (InvalidTag, ValueError):
        raise SealError(
            "sealed parameters cannot be opened: they were not sealed to this activation's key, "
            "nonce and UUID (wrong Coordinator, or a corrupted or relayed answer)"
        ) from None
    try:
        doc = _load_json(plaintext, "sealed parameters", len(plaintext))
    except RequestError as exc:
        raise SealError(exc.message) from None
    if not isinstance(doc, dict):
        raise SealError("sealed parameters must be a JSON object with Files, Env and Argv")
    files = _opened_map(doc, "Files", _check_path)
    env = _opened_map(doc, "Env", _check_env_name)
    for name, value in env.items():
        if b"\x00" in value:
            raise SealError(f"sealed parameters: Env[{name[:80]!r}] contains a NUL byte and cannot be set")
    raw_argv = doc.get("Argv", [])
    if raw_argv is None:
        raw_argv = []
    if not isinstance(raw_argv, list) or not all(isinstance(a, str) and "\x00" not in a for a in raw_argv):
        raise SealError("sealed parameters: 'Argv' must be an array of strings without NUL characters")
    return MarbleParameters(files=files, env=env, argv=tuple(raw_argv))


# --------------------------------------------------------------------------- challenges


class ChallengeVerdict(enum.Enum):
    """What :meth:`ChallengeBook.consume` found out about a nonce."""

    ACCEPTED = "accepted"
    UNKNOWN = "unknown"  # not issued by this Coordinator process (forged, or from before a restart)
    EXPIRED = "expired"
    USED = "used"  # consumed before: a replay (or a relay that was faster than the Marble)
    SOURCE_BUSY = "source_busy"  # this client address consumed its quota within the TTL
    BUSY = "busy"  # the used-nonce set is full

    @property
    def fresh_challenge_helps(self) -> bool:
        """True when a Marble should simply start over with a new challenge."""
        return self in (ChallengeVerdict.UNKNOWN, ChallengeVerdict.EXPIRED, ChallengeVerdict.USED)


def client_source(address: str | None) -> str:
    """The quota key of a client address: the IPv4 address, or the /64 of an IPv6 address."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class _Bucket:
    """The nonces consumed that were issued in one second, and how many came from each source."""

    used: set[bytes] = field(default_factory=set)
    sources: Counter[str] = field(default_factory=Counter)


class ChallengeBook:
    """Stateless challenges with a bounded set of used nonces (docs/protocol.md §3.1, §7).

    A nonce is ``issued (u64 BE, ms) || random (8 bytes) || tag (16 bytes)``, where ``tag`` is
    HMAC-SHA256(key, "marblekeep-challenge-v1" || issued || random) truncated to 16 bytes and
    ``key`` is a random per-process secret. Issuing stores nothing, so no number of challenge
    requests can push out a Marble's pending challenge. :meth:`consume` accepts a nonce once: its tag
    must verify (constant time), it must be younger than ``ttl``, and it must not be in the
    used-nonce set, where it then stays until it expires. Replay stays impossible because an entry
    is dropped only once its nonce has expired, and expiry never reverses: the book's time is the
    latest ``now`` it has seen (a wall clock stepping back does not revive old nonces).

    The used set is bounded: at most ``max_used`` entries in all and ``max_used_per_source`` from
    one client address (an IPv4 address or an IPv6 /64) within ``ttl``. Past either bound a nonce
    is not consumed and the client is told to slow down (:attr:`ChallengeVerdict.SOURCE_BUSY`,
    :attr:`ChallengeVerdict.BUSY`); filling the set takes ``max_used / max_used_per_source``
    addresses each sustaining ``max_used_per_source / ttl`` activation requests per second.
    Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        key: bytes,
        ttl: timedelta = timedelta(seconds=60),
        *,
        max_used: int = 262_144,
        max_used_per_source: int = 32_768,
    ) -> None:
        if len(key) < 32:
            raise ConfigError("the challenge key must be at least 32 random bytes")
        if ttl < timedelta(seconds=1):
            raise ConfigError("challenge ttl must be at least one second")
        if max_used < 1 or max_used_per_source < 1:
            raise ConfigError("challenge max_used and max_used_per_source must be at least 1")
        self._key = key
        self._ttl_ms = int(ttl / timedelta(milliseconds=1))
        self.ttl = ttl
        self.max_used = max_used
        self.max_used_per_source = max_used_per_source
        self._latest_ms = 0
        self._buckets: dict[int, _Bucket] = {}
        self._per_source: Counter[str] = Counter()
        self._size = 0

    def __len__(self) -> int:
        """How many used nonces are remembered (they are forgotten once expired)."""
        return self._size

    def _tick(self, now: datetime) -> int:
        now_ms = int(now.timestamp() * 1000)
        if now_ms > self._latest_ms:
            self._latest_ms = now_ms
            horizon = (now_ms - self._ttl_ms) // 1000
            for second in [s for s in self._buckets if s < horizon]:
                bucket = self._buckets.pop(second)
                self._size -= len(bucket.used)
                self._per_source.subtract(bucket.sources)
                for source in bucket.sources:
                    if self._per_source[source] <= 0:
                        del self._per_source[source]
        return self._latest_ms

    def _tag(self, head: bytes) -> bytes:
        return hmac.new(self._key, _CHALLENGE_TAG + head, hashlib.sha256).digest()[:16]

    def issue(self, now: datetime, rng: Callable[[int], bytes]) -> bytes:
        """A fresh nonce of :data:`NONCE_SIZE` bytes (8 of them from ``rng``); nothing is stored."""
        issued = self._tick(now)
        random_part = rng(8)
        assert len(random_part) == 8, "rng returned the wrong number of bytes"
        head = struct.pack(">Q", issued) + random_part
        return head + self._tag(head)

    def consume(self, nonce: bytes, now: datetime, source: str = "") -> ChallengeVerdict:
        """Accept ``nonce`` once (see the class docstring); ``source`` is :func:`client_source`."""
        latest = self._tick(now)
        if len(nonce) != NONCE_SIZE or not hmac.compare_digest(self._tag(nonce[:16]), nonce[16:]):
            return ChallengeVerdict.UNKNOWN
        (issued,) = struct.unpack(">Q", nonce[:8])
        if issued > latest or latest - issued >= self._ttl_ms:
            return ChallengeVerdict.EXPIRED
        bucket = self._buckets.get(issued // 1000)
        if bucket is not None and nonce in bucket.used:
            return ChallengeVerdict.USED
        if self._per_source[source] >= self.max_used_per_source:
            return ChallengeVerdict.SOURCE_BUSY
        if self._size >= self.max_used:
            return ChallengeVerdict.BUSY
        if bucket is None:
            bucket = self._buckets[issued // 1000] = _Bucket()
        bucket.used.add(nonce)
        bucket.sources[source] += 1
        self._per_source[source] += 1
        self._size += 1
        return ChallengeVerdict.ACCEPTED
