"""A synchronous Client API SDK (httpx): v2 first, v1 when the Coordinator answers 405.

Every call decodes the JSend envelope (:mod:`marblekeep.client.jsend`) into a small frozen
value or one of our errors. TLS: a client built with a pinned root trusts only servers whose
certificate that root signed directly (:mod:`marblekeep.client.pinning`); the unverified client
exists only to fetch the quote on first contact (``CoordinatorClient.unverified``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from marblekeep.client.jsend import EndpointMissing, clean_text, decode_envelope
from marblekeep.client.pinning import NotFromPinnedRoot, parse_chain, pinned_context
from marblekeep.crypto.signing import verify_manifest_signature
from marblekeep.errors import AttestationError, AuthenticationError, ConfigError, CoordinatorError

__all__ = [
    "DEFAULT_CLIENT_PORT",
    "CertQuote",
    "CoordinatorClient",
    "ManifestInfo",
    "PendingUpdateInfo",
    "RecoverAnswer",
    "SignedUpdateLog",
    "Status",
    "UpdateAnswer",
    "base_url",
    "manifest_json",
]

DEFAULT_CLIENT_PORT = 4433
#: Response header naming the API that answered (set by marblekeep's listeners).
API_HEADER = "X-MarbleKeep-API"
DEFAULT_TIMEOUT = 30.0


_HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def base_url(addr: str) -> str:
    """``host:port`` (or ``[v6]:port``, ``host``, ``https://host:port``) → ``https://host:port``."""
    text = addr.strip().rstrip("/")
    if text.startswith("https://"):
        text = text[len("https://") :]
    elif "://" in text:
        raise ConfigError(f"Coordinator address {addr!r}: use HOST:PORT (the Client API speaks HTTPS only)")
    bad = ConfigError(f"Coordinator address {addr!r}: expected HOST:PORT, e.g. localhost:4433 or [::1]:4433")
    if not text:
        raise bad
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise bad
        port = rest[1:]
        try:
            host = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            raise bad from None
    elif text.count(":") > 1:  # a bare IPv6 address
        try:
            host, port = f"[{ipaddress.IPv6Address(text)}]", ""
        except ValueError:
            raise bad from None
    else:
        host, _, port = text.partition(":")
        host = host or "localhost"
        if len(host) > 253 or not _HOST_NAME.match(host):
            raise bad
    if port == "":
        port = str(DEFAULT_CLIENT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Coordinator address {addr!r}: the port must be a number from 1 to 65535")
    return f"https://{host}:{int(port)}"


@dataclass(frozen=True)
class Status:
    code: int
    message: str
    simulation: bool = False  # marblekeep's extension: the Coordinator runs without a TEE
    warning: str = ""


@dataclass(frozen=True)
class CertQuote:
    """The quote endpoint's answer. ``nonce`` is what the quote's report data binds (``b""`` when
    the Coordinator only has the v1 endpoint, which takes no nonce)."""

    chain: tuple[x509.Certificate, ...]
    quote: bytes
    nonce: bytes = b""
    simulation: bool = False

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]

    @property
    def intermediate(self) -> x509.Certificate:
        return self.chain[0]

    def certificates(self, which: str) -> list[x509.Certificate]:
        """``root``, ``intermediate`` or ``chain`` (intermediate then root)."""
        return {"root": [self.root], "intermediate": [self.intermediate], "chain": list(self.chain)}[which]

    def pem(self, which: str) -> bytes:
        """``root``, ``intermediate`` or ``chain`` (intermediate then root) as PEM."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certificates(which))


@dataclass(frozen=True)
class ManifestInfo:
    raw: bytes
    fingerprint: str
    signature: bytes = field(repr=False)

    def check(self, root: x509.Certificate) -> None:
        """The fingerprint is SHA-256 of the bytes and the signature is ``root``'s; else raise."""
        actual = hashlib.sha256(self.raw).hexdigest()
        if actual != self.fingerprint.lower():
            raise AttestationError(
                f"the Coordinator reported manifest fingerprint {clean_text(self.fingerprint, 80)} but"
                f" the manifest it sent hashes to {actual}: do not trust this Coordinator"
            )
        if not verify_manifest_signature(root, self.raw, self.signature):
            raise AttestationError(
                "the manifest's signature does not verify with the Coordinator's root certificate:"
                " do not trust this Coordinator"
            )


@dataclass(frozen=True)
class UpdateAnswer:
    """The answer to a manifest update, an acknowledgement or a cancellation.

    ``message`` is the Coordinator's text as sent (v2 ``message``, or the v1 answer), None when
    it sent none; ``missing_acknowledgments`` and ``missing_users`` say who still has to
    acknowledge a full update (0 and ``()`` once it applied); ``recovery_secrets`` holds the new
    recovery secrets (name → base64, as sent) when the update changed the recovery keys.
    """

    message: str | None = None
    missing_acknowledgments: int = 0
    missing_users: tuple[str, ...] = ()
    recovery_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class PendingUpdateInfo:
    """The pending full update: the Coordinator's ``message``, who has not acknowledged yet,
    and the proposed manifest (:attr:`manifest`, byte for byte)."""

    message: str | None
    missing_users: tuple[str, ...]
    manifest_base64: str

    @property
    def manifest(self) -> bytes:
        try:
            return base64.b64decode(self.manifest_base64, validate=True)
        except (binascii.Error, ValueError):
            raise CoordinatorError("pending update: the manifest in the answer is not valid base64") from None


@dataclass(frozen=True)
class SignedUpdateLog:
    """``GET /api/v2/update``: the log lines as the Coordinator wrote them (not sanitised: they
    are hashed) and ``head``, its signed head as sent (None from a Coordinator without one)."""

    lines: tuple[str, ...]
    head: Any


@dataclass(frozen=True)
class RecoverAnswer:
    """``POST /api/v2/recover``: how many secrets are still missing, and the Coordinator's text."""

    remaining: int
    message: str


def _b64(value: Any, name: str, what: str, *, allow_empty: bool = False) -> bytes:
    if value is None and allow_empty:
        return b""
    if not isinstance(value, str):
        raise CoordinatorError(f"{what}: the answer lacks {name} (expected base64 text)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise CoordinatorError(f"{what}: {name} in the answer is not valid base64") from None


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CoordinatorError(f"{what}: the answer's data is not a JSON object")
    return data


def _recovery_secrets(doc: Mapping[str, Any]) -> dict[str, str]:
    secrets = doc.get("recoverySecrets")
    if not isinstance(secrets, dict):
        return {}
    return {str(k): v for k, v in secrets.items() if isinstance(v, str)}


def _names(users: Any) -> tuple[str, ...]:
    return tuple(str(u) for u in users) if isinstance(users, list) else ()


def _update_answer(doc: Mapping[str, Any]) -> UpdateAnswer:
    message, missing = doc.get("message"), doc.get("missingAcknowledgments", 0)
    return UpdateAnswer(
        message=message if isinstance(message, str) else None,
        missing_acknowledgments=missing if isinstance(missing, int) else 0,
        missing_users=_names(doc.get("missingUsers")),
        recovery_secrets=_recovery_secrets(doc),
    )


def _cause_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _root_certificate(root: object) -> x509.Certificate:
    """``root`` as a certificate: one already, or PEM bytes/text (the last certificate of a chain)."""
    if isinstance(root, x509.Certificate):
        return root
    if isinstance(root, str):
        root = root.encode("utf-8", "replace")
    if isinstance(root, bytes | bytearray | memoryview):
        try:
            return parse_chain(bytes(root), "root")[-1]
        except AttestationError:
            raise ConfigError(
                "root: not a PEM certificate; give the Coordinator's root certificate as PEM (bytes or"
                " text) or as a cryptography x509.Certificate"
            ) from None
    raise ConfigError(
        f"root: expected a PEM certificate (bytes or text) or an x509.Certificate, got {type(root).__name__}"
    )


_REFUSED_CERT_ALERTS = ("UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "BAD_CERTIFICATE", "CERTIFICATE_REQUIRED")


def _refused_cert(exc: ssl.SSLError) -> bool:
    """The server's TLS alert says it did not accept our client certificate."""
    text = f"{exc.reason or ''} {exc}".upper().replace(" ", "_")
    return "ALERT" in text and any(alert in text for alert in _REFUSED_CERT_ALERTS)


class CoordinatorClient:
    """The Client API of one Coordinator. Use as a context manager, or call :meth:`close`.

    ``root``: the pinned root certificate (a ``cryptography`` certificate, or its PEM as bytes or
    text); TLS then accepts only a server certificate signed directly by it. ``client_cert``:
    ``(cert_file, key_file)`` of a manifest user (PEM), sent for user-authenticated endpoints.
    ``transport``: an httpx transport for tests.
    """

    def __init__(
        self,
        addr: str,
        root: x509.Certificate | bytes | str | None,
        *,
        client_cert: tuple[Path, Path] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        _unverified: bool = False,
    ) -> None:
        if root is None and not _unverified:
            raise CoordinatorError(
                "a Coordinator client needs a pinned root (or CoordinatorClient.unverified)"
            )
        root = _root_certificate(root) if root is not None else None
        self.addr = addr
        self._client_cert = client_cert
        self._timeout = timeout
        self.base_url = base_url(addr)
        self.root = root
        verify: ssl.SSLContext | bool = pinned_context(root, client_cert) if root is not None else False
        self._http = httpx.Client(
            base_url=self.base_url,
            verify=verify,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": "marblekeep-cli"},
            follow_redirects=False,
            trust_env=False,
        )

    @classmethod
    def unverified(
        cls, addr: str, *, timeout: float = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None
    ) -> CoordinatorClient:
        """A client that does NOT authenticate the server: only for fetching the quote, which is then
        verified (or, with --insecure, explicitly not)."""
        return cls(addr, None, timeout=timeout, transport=transport, _unverified=True)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ transport

    def _refused_certificate(self, what: str) -> AuthenticationError:
        assert self._client_cert is not None
        return AuthenticationError(
            f"{what}: the Coordinator at {self.addr} refused the client certificate"
            f" {self._client_cert[0]} in the TLS handshake: this certificate is not a user of the"
            " deployment (the manifest's Users do not list it); use the certificate and key of a"
            " listed user"
        )

    def _refuses_our_certificate(self) -> bool:
        """After a connection failure with a client certificate: does the same Coordinator answer
        without it? Then it refused the certificate in the TLS handshake (a Coordinator that
        verifies user certificates there, as marblekeep's stdlib-TLS listener does)."""
        if self._client_cert is None or self.root is None:
            return False
        try:
            with CoordinatorClient(self.addr, self.root, timeout=self._timeout) as probe:
                probe.status()
        except Exception:  # the Coordinator is unreachable for another reason
            return False
        return True

    def _transport_error(self, exc: httpx.HTTPError, what: str) -> Exception:
        for cause in _cause_chain(exc):
            if isinstance(cause, NotFromPinnedRoot):
                return AttestationError(
                    f"{what}: the Coordinator at {self.addr} is not the one whose root certificate is pinned"
                    f" ({cause.verify_message or cause}); it is another Coordinator, or it was reset"
                )
            if isinstance(cause, ssl.SSLCertVerificationError):
                detail = cause.verify_message or "certificate verification failed"
                return AttestationError(
                    f"{what}: the Coordinator at {self.addr} presented a TLS certificate that does not"
                    f" verify with the pinned root ({clean_text(detail, 200)}); it is another Coordinator,"
                    " or it was reset"
                )
            if isinstance(cause, ssl.SSLError) and self._client_cert is not None and _refused_cert(cause):
                return self._refused_certificate(what)
            if isinstance(cause, ssl.SSLError):
                return CoordinatorError(
                    f"{what}: TLS with {self.addr} failed ({clean_text(cause.reason or str(cause), 200)}):"
                    " is this the Coordinator's Client API (default port 4433)?"
                )
        if isinstance(exc, httpx.TimeoutException):
            return CoordinatorError(f"{what}: the Coordinator at {self.addr} did not answer in time")
        return CoordinatorError(
            f"{what}: cannot reach the Coordinator at {self.addr} ({type(exc).__name__}: "
            f"{clean_text(str(exc), 200) or 'no detail'}); check the address (HOST:PORT of the Client API,"
            " default port 4433) and that the Coordinator runs"
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        what = f"{method} {path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            error = self._transport_error(exc, what)
            if type(error) is CoordinatorError and self._refuses_our_certificate():
                error = self._refused_certificate(what)
            raise error from None
        except (httpx.InvalidURL, UnicodeError):
            raise ConfigError(f"Coordinator address {self.addr!r}: not a valid HOST:PORT") from None
        if response.headers.get(API_HEADER, "").lower() == "marble":
            raise ConfigError(
                f"{what}: {self.addr} is the Coordinator's Marble API port (where Marbles activate), not"
                f" its Client API: use the Client API's address (default port {DEFAULT_CLIENT_PORT},"
                " the Coordinator's --client-addr)"
            )
        try:
            return decode_envelope(response.status_code, response.content, what)
        except AuthenticationError as exc:
            raise self._not_a_user(exc) from None

    def _not_a_user(self, exc: AuthenticationError) -> AuthenticationError:
        """401: name the certificate that is not a user (or say that one is needed)."""
        if self._client_cert is None:
            return AuthenticationError(
                f"{exc.message.split(' (authorizing user')[0]}: this request needs a user of the"
                " deployment: pass the certificate and key of a user listed in the manifest's Users"
                " (-c/--cert and -k/--key)",
                problems=exc.problems,
            )
        cert_file = self._client_cert[0]
        return AuthenticationError(
            f"{exc.message.split(' (authorizing user')[0]}: the certificate {cert_file} is not a user of"
            " the deployment (the manifest's Users do not list it): use the certificate and key of a"
            " listed user, or add this certificate to Users with a manifest update",
            problems=exc.problems,
        )

    def _v2_or_v1(
        self, v2: tuple[str, str, dict[str, Any]], v1: tuple[str, str, dict[str, Any]]
    ) -> tuple[int, Any]:
        """(2, data) from the v2 endpoint, or (1, data) from v1 if v2 answered 405."""
        try:
            return 2, self._request(v2[0], v2[1], **v2[2])
        except EndpointMissing:
            return 1, self._request(v1[0], v1[1], **v1[2])

    # ------------------------------------------------------------------------------------ endpoints

    def status(self) -> Status:
        """The Coordinator's state: ``code`` (1 recovery, 2 accepting a manifest, 3 accepting Marbles)."""
        version, data = self._v2_or_v1(("GET", "/api/v2/status", {}), ("GET", "/status", {}))
        doc = _object(data, "status")
        code_key, message_key = ("code", "message") if version == 2 else ("StatusCode", "StatusMessage")
        code, message = doc.get(code_key), doc.get(message_key)
        if isinstance(code, bool) or not isinstance(code, int) or not isinstance(message, str):
            raise CoordinatorError(f"status: the answer lacks {code_key} (integer) or {message_key} (text)")
        warning = doc.get("warning")
        return Status(
            code=code,
            message=clean_text(message),
            simulation=doc.get("simulation") is True,
            warning=clean_text(warning) if isinstance(warning, str) else "",
        )

    def quote(self, nonce: bytes | None = None) -> CertQuote:
        """The certificate chain (intermediate, root) and a quote over SHA-256(root DER ‖ nonce)."""
        params = {"nonce": base64.urlsafe_b64encode(nonce).decode()} if nonce else {}
        version, data = self._v2_or_v1(("GET", "/api/v2/quote", {"params": params}), ("GET", "/quote", {}))
        doc = _object(data, "quote")
        cert_key, quote_key = ("cert", "quote") if version == 2 else ("Cert", "Quote")
        cert = doc.get(cert_key)
        if not isinstance(cert, str):
            raise CoordinatorError(f"quote: the answer lacks {cert_key} (the PEM certificate chain)")
        try:
            chain = parse_chain(cert.encode(), f"quote: {cert_key}")
        except AttestationError as exc:
            raise CoordinatorError(exc.message) from None
        return CertQuote(
            chain=tuple(chain),
            quote=_b64(doc.get(quote_key), quote_key, "quote", allow_empty=True),
            nonce=(nonce or b"") if version == 2 else b"",
            simulation=doc.get("simulation") is True,
        )

    def manifest(self) -> ManifestInfo | None:
        """The manifest in effect, or None when none is set. Call :meth:`ManifestInfo.check`."""
        try:
            version, data = self._v2_or_v1(("GET", "/api/v2/manifest", {}), ("GET", "/manifest", {}))
        except CoordinatorError as exc:
            if exc.status == 404:  # marblekeep: v2 GET without a manifest
                return None
            raise
        doc = _object(data, "manifest")
        keys = (
            ("manifest", "manifestFingerprint", "manifestSignatureRootECDSA")
            if version == 2
            else ("Manifest", "ManifestSignature", "ManifestSignatureRootECDSA")
        )
        if doc.get(keys[0]) in (None, ""):  # v1 answers 200 with empty fields
            return None
        fingerprint = doc.get(keys[1])
        if not isinstance(fingerprint, str):
            raise CoordinatorError(f"manifest: the answer lacks {keys[1]}")
        return ManifestInfo(
            raw=_b64(doc.get(keys[0]), keys[0], "manifest"),
            fingerprint=fingerprint,
            signature=_b64(doc.get(keys[2]), keys[2], "manifest"),
        )

    def set_manifest(self, raw: bytes) -> dict[str, bytes]:
        """Set the first manifest; returns the recovery secrets (name → RSA-OAEP-encrypted secret)."""
        body = {"manifest": base64.b64encode(raw).decode()}
        _version, data = self._v2_or_v1(
            ("POST", "/api/v2/manifest", {"json": body}),
            ("POST", "/manifest", {"content": raw}),
        )
        if data is None:
            return {}
        secrets = _object(data, "set manifest").get("RecoverySecrets")
        if secrets is None:
            return {}
        if not isinstance(secrets, dict):
            raise CoordinatorError("set manifest: RecoverySecrets in the answer is not an object")
        return {
            str(name): _b64(value, f"RecoverySecrets.{name}", "set manifest")
            for name, value in secrets.items()
        }

    def update_log(self) -> list[str]:
        """The manifest update log, one entry per line (GET /api/v2/update)."""
        try:
            version, data = self._v2_or_v1(("GET", "/api/v2/update", {}), ("GET", "/update", {}))
        except EndpointMissing:
            raise CoordinatorError(
                f"this Coordinator ({self.addr}) does not serve the update log (neither GET"
                " /api/v2/update nor GET /update): it is a version without manifest updates",
                status=405,
            ) from None
        if version == 1:
            if not isinstance(data, str):
                raise CoordinatorError("update log: the v1 answer is not text")
            return [clean_text(line) for line in data.splitlines()]
        lines = _object(data, "update log").get("updateLog")
        if lines is None:
            return []
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise CoordinatorError("update log: updateLog in the answer is not a list of strings")
        return [clean_text(line) for line in lines]

    # ------------------------------------------------------------------- governance (user endpoints)

    def read_secrets(self, names: Sequence[str]) -> dict[str, Any]:
        """The secrets ``names`` as MarbleRun Secret objects (name → JSON object, base64 values).

        Needs a user with ReadSecret; each read is recorded in the Coordinator's update log.
        """
        params = [("s", name) for name in names]
        version, data = self._v2_or_v1(
            ("GET", "/api/v2/secrets", {"params": params}), ("GET", "/secrets", {"params": params})
        )
        doc = _object(data, "secret get")
        return _object(doc.get("secrets"), "secret get") if version == 2 else doc

    def write_secrets(self, upload: Mapping[str, Any]) -> None:
        """Set user-defined secrets, all or nothing: name → ``{"Cert", "Private", "Key"}`` (base64).

        Needs a user with WriteSecret.
        """
        self._v2_or_v1(
            ("POST", "/api/v2/secrets", {"json": {"secrets": dict(upload)}}),
            ("POST", "/secrets", {"json": dict(upload)}),
        )

    def apply_update(self, raw: bytes) -> UpdateAnswer:
        """Propose a manifest update: a package update applies at once, a full manifest once
        enough users acknowledged it (the proposer counts as one). Needs UpdateManifest or
        UpdateSecurityVersion."""
        version, data = self._v2_or_v1(
            ("POST", "/api/v2/update", {"json": {"manifest": base64.b64encode(raw).decode()}}),
            ("POST", "/update", {"content": raw}),
        )
        return _update_answer(data if isinstance(data, dict) and version == 2 else {})

    def acknowledge_update(self, raw: bytes) -> UpdateAnswer:
        """Acknowledge the pending update; ``raw`` must be byte-identical to it."""
        version, data = self._v2_or_v1(
            ("POST", "/api/v2/update-manifest", {"json": {"manifest": base64.b64encode(raw).decode()}}),
            ("POST", "/update-manifest", {"content": raw}),
        )
        if version == 2:
            return _update_answer(_object(data, "acknowledge"))
        return UpdateAnswer(message=data if isinstance(data, str) else None)

    def cancel_update(self) -> UpdateAnswer:
        """Cancel the pending update (needs UpdateManifest)."""
        version, data = self._v2_or_v1(("POST", "/api/v2/update-cancel", {}), ("POST", "/update-cancel", {}))
        message = _object(data, "cancel").get("message") if version == 2 else data
        return UpdateAnswer(message=message if isinstance(message, str) else None)

    def pending_update(self) -> PendingUpdateInfo | None:
        """The pending full update (anyone may read it), or None when no update is pending."""
        try:
            _version, data = self._v2_or_v1(
                ("GET", "/api/v2/update-manifest", {}), ("GET", "/update-manifest", {})
            )
        except CoordinatorError as exc:
            if exc.status == 404 and not isinstance(exc, EndpointMissing):
                return None
            raise
        doc = _object(data, "pending update")
        message, value = doc.get("message"), doc.get("manifest")
        return PendingUpdateInfo(
            message=message if isinstance(message, str) else None,
            missing_users=_names(doc.get("missingUsers")),
            manifest_base64=value if isinstance(value, str) else "",
        )

    def update_log_with_head(self) -> SignedUpdateLog:
        """The update log with its signed head (v2 only: ``GET /api/v2/update``), for verification."""
        doc = _object(self._request("GET", "/api/v2/update"), "update log")
        lines = doc.get("updateLog") or []
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise CoordinatorError("update log: updateLog in the answer is not a list of strings")
        return SignedUpdateLog(lines=tuple(lines), head=doc.get("updateLogHead"))

    # ------------------------------------------------------------------------------------ recovery

    def recover(self, secret: bytes, signature: bytes) -> RecoverAnswer:
        """Upload one recovery secret and its signature (``POST /api/v2/recover``, status 1 only)."""
        body = {
            "recoverySecret": base64.b64encode(secret).decode(),
            "recoverySecretSignature": base64.b64encode(signature).decode(),
        }
        data = self._request("POST", "/api/v2/recover", json=body)
        if not isinstance(data, dict):
            raise CoordinatorError("recover: the answer's data is not a JSON object")
        remaining, message = data.get("remaining"), data.get("message")
        if isinstance(remaining, bool) or not isinstance(remaining, int) or not isinstance(message, str):
            raise CoordinatorError("recover: the answer lacks remaining (integer) or message (text)")
        return RecoverAnswer(remaining=remaining, message=message)

    def recovery_public_key(self) -> bytes:
        """The Coordinator's ephemeral RSA key for encrypted recovery uploads (SubjectPublicKeyInfo
        DER). It lives only as long as the Coordinator process (status 1 only)."""
        data = self._request("GET", "/api/v2/recover/public-key")
        value = data.get("ephemeralPublicKey") if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise CoordinatorError("recover public-key: the answer lacks ephemeralPublicKey (base64 DER)")
        compact = "".join(value.split())
        try:
            der = base64.b64decode(compact, validate=True) if compact else None
        except (binascii.Error, ValueError):
            der = None
        if der is None:
            raise CoordinatorError("recover public-key: ephemeralPublicKey is not base64")
        try:
            serialization.load_der_public_key(der)
        except ValueError:
            raise CoordinatorError("recover public-key: ephemeralPublicKey is not a DER public key") from None
        return der


def manifest_json(raw: bytes) -> Any:
    """The manifest bytes as JSON (for ``manifest get -s``); raise if they are not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CoordinatorError("the Coordinator's manifest is not valid JSON") from None
