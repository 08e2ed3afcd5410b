"""The Client API (default ``:4433``): MarbleRun's REST API, v2 and legacy v1 (reference §6).

Deviations from MarbleRun, all in docs/compatibility.md: client mistakes never produce HTTP 500
(validation errors are 400 ``fail`` with every problem as data; wrong state is 409), and the v2
``GET /api/v2/manifest`` without a manifest is 404. Unknown paths and methods stay 405, which
MarbleRun's clients rely on to fall back from v2 to v1.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Any

from aiohttp import web

from marblekeep.api import jsend
from marblekeep.api.body import base64_field, json_object, parse_json_object, read_body
from marblekeep.api.tls import match_user
from marblekeep.core.deployment import CoordinatorState
from marblekeep.errors import (
    AttestationError,
    AuthenticationError,
    AuthorizationError,
    ManifestError,
    RequestError,
    StateError,
)
from marblekeep.service import Coordinator

__all__ = [
    "COORDINATOR_KEY",
    "add_client_routes",
    "authenticated_user",
    "coordinator_of",
    "peer_certificate_der",
]

log = logging.getLogger("marblekeep.api")

COORDINATOR_KEY = web.AppKey("coordinator", Coordinator)
MAX_NONCE_BYTES = 1024
_URLSAFE_B64 = re.compile(r"\A[A-Za-z0-9_-]*={0,2}\Z")
_URLSAFE_TO_STD = str.maketrans("-_", "+/")


def coordinator_of(request: web.Request) -> Coordinator:
    """The :class:`Coordinator` the route serves (set on the application by api/server.py)."""
    return request.app[COORDINATOR_KEY]


def peer_certificate_der(request: web.Request) -> bytes | None:
    """The leaf certificate the client presented in this connection's TLS handshake (the TLS layer
    puts it in the transport's ``peer_cert_der``), or None."""
    transport = request.transport
    cert = transport.get_extra_info("peer_cert_der") if transport is not None else None
    return bytes(cert) if cert else None


def authenticated_user(request: web.Request) -> str:
    """The manifest user whose certificate is exactly the TLS client's leaf certificate.

    Raises :class:`AuthenticationError` (401, JSend fail) when the client sent no certificate or
    one that no user has: the TLS layer accepts any certificate and hands over the leaf's DER
    (``peer_cert_der``, api/tlslayer.py); later chain entries are never considered.
    """
    user = match_user(peer_certificate_der(request), coordinator_of(request).user_certificates)
    if user is None:
        raise AuthenticationError(
            "unauthorized user: client certificate did not match any MarbleRun users "
            "(send a certificate listed in the manifest's Users, with its key: -c CERT -k KEY)"
        )
    return user


def _simulation_extras(coord: Coordinator) -> dict[str, Any]:
    if not coord.simulation:
        return {}
    return {
        "simulation": True,
        "warning": "SIMULATION MODE: this Coordinator runs without a TEE; its quote is empty and it "
        "accepts Marbles without attestation. Never use it for real secrets.",
    }


# ---------------------------------------------------------------------------------------------- v2


async def status_v2(request: web.Request) -> web.Response:
    coord = coordinator_of(request)
    code, message = coord.status()
    data: dict[str, Any] = {"code": code, "message": message, **_simulation_extras(coord)}
    if coord.state is CoordinatorState.RECOVERY and coord.recovery_reason:
        data["recoveryReason"] = coord.recovery_reason
    collateral = coord.collateral_status()
    if collateral:
        data["details"] = {"collateral": collateral}
    return jsend.success(data)


def _nonce(request: web.Request) -> bytes | None:
    raw = request.query.get("nonce")
    if raw is None:
        return None
    # Go's base64.URLEncoding: only the URL-safe alphabet, padding required. (Python's
    # urlsafe_b64decode silently drops other characters, and accepts '+' and '/'.)
    if not _URLSAFE_B64.match(raw):
        raise RequestError("nonce: not valid URL-safe base64 (with padding)")
    try:
        nonce = base64.b64decode(raw.translate(_URLSAFE_TO_STD), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("nonce: not valid URL-safe base64 (with padding)") from None
    if len(nonce) > MAX_NONCE_BYTES:
        raise RequestError(f"nonce: longer than {MAX_NONCE_BYTES} bytes")
    return nonce


async def quote_v2(request: web.Request) -> web.Response:
    coord = coordinator_of(request)
    quote = coord.quote(_nonce(request))
    data = {
        "cert": coord.certificate_chain_pem().decode(),
        "quote": base64.b64encode(quote).decode(),
        **_simulation_extras(coord),
    }
    return jsend.success(data)


async def manifest_get_v2(request: web.Request) -> web.Response:
    current = coordinator_of(request).manifest()
    if current is None:
        return jsend.fail("no manifest has been set yet: set one with `marblekeep manifest set`", 404)
    raw, signature, fingerprint = current
    return jsend.success(
        {
            "manifestSignatureRootECDSA": base64.b64encode(signature).decode(),
            "manifestFingerprint": fingerprint,
            "manifest": base64.b64encode(raw).decode(),
        }
    )


def _recovery_secrets_json(secrets: dict[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(value).decode() for name, value in secrets.items()}


async def manifest_post_v2(request: web.Request) -> web.Response:
    doc = await json_object(request)
    raw = base64_field(doc, "manifest")
    secrets = await coordinator_of(request).set_manifest(raw)
    return jsend.success({"RecoverySecrets": _recovery_secrets_json(secrets)})


async def sign_quote_v2(request: web.Request) -> web.Response:
    doc = await json_object(request)
    quote = base64_field(doc, "sgxQuote")
    try:
        status, signature = await coordinator_of(request).sign_quote(quote)
    except AuthorizationError as exc:
        return jsend.error(exc.message, 403)
    except AttestationError as exc:
        if exc.http_status >= 500:  # collateral unavailable: not the client's fault
            return jsend.error(exc.message, exc.http_status)
        return jsend.fail(exc.message, 400, {"sgxQuote": exc.message})
    return jsend.success({"tcbStatus": status, "verificationSignature": base64.b64encode(signature).decode()})


# ---------------------------------------------------------------------------------------------- v1


def _deprecated(request: web.Request) -> None:
    log.info("deprecated v1 endpoint used; use /api/v2", extra={"path": request.path})


async def status_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    code, message = coordinator_of(request).status()
    return jsend.success({"StatusCode": code, "StatusMessage": message})


async def quote_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    coord = coordinator_of(request)
    quote = coord.quote(None)
    return jsend.success(
        {"Cert": coord.certificate_chain_pem().decode(), "Quote": base64.b64encode(quote).decode()}
    )


async def manifest_get_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    current = coordinator_of(request).manifest()
    if current is None:  # MarbleRun answers 200 with empty fields here
        return jsend.success({"ManifestSignatureRootECDSA": None, "ManifestSignature": "", "Manifest": None})
    raw, signature, fingerprint = current
    return jsend.success(
        {
            "ManifestSignatureRootECDSA": base64.b64encode(signature).decode(),
            "ManifestSignature": fingerprint,
            "Manifest": base64.b64encode(raw).decode(),
        }
    )


async def manifest_post_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    raw = await request.read()
    try:
        secrets = await coordinator_of(request).set_manifest(raw)
    except (ManifestError, StateError) as exc:  # v1 reports every set-manifest failure as 400
        return jsend.from_exception(exc, status=400)
    return jsend.success({"RecoverySecrets": _recovery_secrets_json(secrets)} if secrets else None)


async def recover_v1(request: web.Request) -> web.Response:
    return jsend.fail(
        "recovery via /recover is no longer supported. Use the /api/v2/recover endpoint instead.", 410
    )


MAX_RECOVER_BODY = 20480


async def recover_v2(request: web.Request) -> web.Response:
    doc = parse_json_object(await read_body(request, MAX_RECOVER_BODY))
    secret = base64_field(doc, "recoverySecret")
    signature = base64_field(doc, "recoverySecretSignature")
    remaining, message = await coordinator_of(request).recover(secret, signature)
    return jsend.success({"remaining": remaining, "message": message})


async def recover_public_key_v2(request: web.Request) -> web.Response:
    der = await coordinator_of(request).recovery_public_key()
    return jsend.success({"algorithm": "RSA", "ephemeralPublicKey": base64.b64encode(der).decode()})


def add_client_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v2/status", status_v2)
    r.add_get("/api/v2/quote", quote_v2)
    r.add_get("/api/v2/manifest", manifest_get_v2)
    r.add_post("/api/v2/manifest", manifest_post_v2)
    r.add_post("/api/v2/sign-quote", sign_quote_v2)
    r.add_post("/api/v2/recover", recover_v2)
    r.add_get("/api/v2/recover/public-key", recover_public_key_v2)
    r.add_get("/status", status_v1)
    r.add_get("/quote", quote_v1)
    r.add_get("/manifest", manifest_get_v1)
    r.add_post("/manifest", manifest_post_v1)
    r.add_post("/recover", recover_v1)
