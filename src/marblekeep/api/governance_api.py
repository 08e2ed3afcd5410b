"""Client API routes for governance: user-defined secrets, manifest updates, the update log.

MarbleRun's paths, request and response shapes (reference §6.4, §6.5):

=========================================  ====================  ================================
route                                      who                   data
=========================================  ====================  ================================
``GET  /api/v2/secrets?s=A&s=B``           user, ReadSecret      ``{"secrets": {name: Secret}}``
``POST /api/v2/secrets``                   user, WriteSecret     ``null``
``GET  /api/v2/update``                    anyone                ``{"updateLog": [line...]}``
``GET  /api/v2/audit/secret-reads``        user (own reads; all  ``{"entries", "nextSeq",
                                           with UpdateManifest)  "dropped"}`` (marblekeep)
``POST /api/v2/update``                    user, UpdateSecurity  ``{"missingAcknowledgments",
                                           Version / Update      "missingUsers",
                                           Manifest              "recoverySecrets"?}``
``GET  /api/v2/update-manifest``           anyone                ``{"manifest","message",
                                                                 "missingUsers"}``
``POST /api/v2/update-manifest``           a required user       ``{"message","missingUsers",
                                                                 "missingAcknowledgments",
                                                                 "recoverySecrets"?}``
``POST /api/v2/update-cancel``             user, UpdateManifest  ``{"message"}``
=========================================  ====================  ================================

plus the v1 variants (``/secrets``, ``/update``, ``/update-manifest``, ``/update-cancel``) with
bare bodies and data. marblekeep adds ``updateLogHead`` (the root-signed head of the hash-chained
log, docs/governance.md) to ``GET /api/v2/update``.

Deviations (docs/compatibility.md, governance): a client's mistake is never a 500 — a missing
permission is 403, a bad body or a manifest that differs from the pending one is 400, no pending
update is 404, the wrong state is 409.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from aiohttp import web

from marblekeep.api import jsend
from marblekeep.api.body import base64_value, json_object
from marblekeep.api.client_api import authenticated_user, coordinator_of
from marblekeep.core.governance import CANCELLED, UpdateKind, UpdateOutcome, pending_message, secret_json
from marblekeep.errors import MarbleKeepError, NotFoundError, RequestError
from marblekeep.manifest.gojson import go_field

__all__ = ["add_governance_routes"]

log = logging.getLogger("marblekeep.api")


def _manifest_field(doc: dict[str, Any]) -> bytes:
    return base64_value(go_field(doc, "manifest"), "manifest", "the manifest")


def _recovery_json(secrets: dict[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(value).decode() for name, value in secrets.items()}


def _update_data(outcome: UpdateOutcome, recovery: dict[str, bytes] | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "missingAcknowledgments": outcome.missing_acknowledgments,
        "missingUsers": None if outcome.kind is UpdateKind.PACKAGE else list(outcome.missing_users),
    }
    if recovery is not None:
        data["recoverySecrets"] = _recovery_json(recovery)
    return data


def _v1_errors(exc: MarbleKeepError) -> web.Response:
    """v1 reports a client's mistake as 400 (authentication and authorization keep 401/403)."""
    status = exc.http_status
    if status < 500 and status not in (401, 403):
        status = 400
    return jsend.from_exception(exc, status=status)


def _deprecated(request: web.Request) -> None:
    log.info("deprecated v1 endpoint used; use /api/v2", extra={"path": request.path})


# ---------------------------------------------------------------------------------- secrets


def _secret_names(request: web.Request) -> list[str]:
    return list(request.query.getall("s", []))


async def secrets_get_v2(request: web.Request) -> web.Response:
    user = authenticated_user(request)
    secrets = await coordinator_of(request).read_secrets(user, _secret_names(request))
    return jsend.success({"secrets": {name: secret_json(s) for name, s in secrets.items()}})


async def secrets_post_v2(request: web.Request) -> web.Response:
    user = authenticated_user(request)
    doc = await json_object(request)
    secrets = go_field(doc, "secrets")
    if not isinstance(secrets, dict):
        what = "missing" if secrets is None else "not an object"
        raise RequestError(
            f'secrets: {what}: POST /api/v2/secrets takes {{"secrets": {{NAME: {{"Cert", "Private", '
            f'"Key"}}}}}} (base64 values); the bare map is the v1 form, POST /secrets'
        )
    await coordinator_of(request).write_secrets(user, secrets)
    return jsend.success(None)


async def secrets_get_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    user = authenticated_user(request)
    try:
        secrets = await coordinator_of(request).read_secrets(user, _secret_names(request))
    except MarbleKeepError as exc:
        return _v1_errors(exc)
    return jsend.success({name: secret_json(s) for name, s in secrets.items()})


async def secrets_post_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    user = authenticated_user(request)
    try:
        await coordinator_of(request).write_secrets(user, await json_object(request))
    except MarbleKeepError as exc:
        return _v1_errors(exc)
    return jsend.success(None)


# ---------------------------------------------------------------------------------- read audit

MAX_TRAIL_PAGE = 1000


def _query_int(request: web.Request, name: str, default: int, upper: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise RequestError(f"{name}: not a non-negative integer")
    return min(int(raw), upper)


async def secret_reads_v2(request: web.Request) -> web.Response:
    """GET /api/v2/audit/secret-reads?since=SEQ&limit=N (marblekeep; docs/governance.md)."""
    user = authenticated_user(request)
    since = _query_int(request, "since", 0, 2**62)
    limit = _query_int(request, "limit", MAX_TRAIL_PAGE, MAX_TRAIL_PAGE)
    page = coordinator_of(request).secret_reads(user, since, limit)
    return jsend.success({"entries": list(page.entries), "nextSeq": page.next_seq, "dropped": page.dropped})


# ---------------------------------------------------------------------------------- update log


async def update_log_v2(request: web.Request) -> web.Response:
    lines, head = coordinator_of(request).update_log()
    return jsend.success(
        {"updateLog": list(lines), "updateLogHead": head.to_json() if head is not None else None}
    )


async def update_log_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    lines, _head = coordinator_of(request).update_log()
    return jsend.success("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------- updates


async def update_post_v2(request: web.Request) -> web.Response:
    user = authenticated_user(request)
    raw = _manifest_field(await json_object(request))
    outcome, recovery = await coordinator_of(request).update_manifest(user, raw)
    return jsend.success(_update_data(outcome, recovery))


async def update_post_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    user = authenticated_user(request)
    try:
        await coordinator_of(request).update_manifest(user, await request.read())
    except MarbleKeepError as exc:
        return _v1_errors(exc)
    return jsend.success(None)


async def pending_get(request: web.Request) -> web.Response:
    """GET /api/v2/update-manifest and /update-manifest: anyone may read the pending update."""
    pending = coordinator_of(request).pending_update()
    if pending is None:
        raise NotFoundError("no pending update: start one with `marblekeep manifest update apply`")
    return jsend.success(
        {
            "manifest": base64.b64encode(pending.raw).decode(),
            "message": pending_message(pending),
            "missingUsers": list(pending.missing_users),
        }
    )


async def acknowledge_v2(request: web.Request) -> web.Response:
    user = authenticated_user(request)
    raw = _manifest_field(await json_object(request))
    outcome, recovery = await coordinator_of(request).acknowledge_update(user, raw)
    data: dict[str, Any] = {
        "message": outcome.message,
        "missingUsers": list(outcome.missing_users),
        "missingAcknowledgments": outcome.missing_acknowledgments,
    }
    if recovery is not None:
        data["recoverySecrets"] = _recovery_json(recovery)
    return jsend.success(data)


async def acknowledge_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    user = authenticated_user(request)
    try:
        outcome, _recovery = await coordinator_of(request).acknowledge_update(user, await request.read())
    except MarbleKeepError as exc:
        return _v1_errors(exc)
    return jsend.success(outcome.message)


async def cancel_v2(request: web.Request) -> web.Response:
    user = authenticated_user(request)
    await coordinator_of(request).cancel_update(user)
    return jsend.success({"message": CANCELLED})


async def cancel_v1(request: web.Request) -> web.Response:
    _deprecated(request)
    user = authenticated_user(request)
    try:
        await coordinator_of(request).cancel_update(user)
    except MarbleKeepError as exc:
        return _v1_errors(exc)
    return jsend.success(CANCELLED)


def add_governance_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v2/secrets", secrets_get_v2)
    r.add_post("/api/v2/secrets", secrets_post_v2)
    r.add_get("/api/v2/audit/secret-reads", secret_reads_v2)
    r.add_get("/api/v2/update", update_log_v2)
    r.add_post("/api/v2/update", update_post_v2)
    r.add_get("/api/v2/update-manifest", pending_get)
    r.add_post("/api/v2/update-manifest", acknowledge_v2)
    r.add_post("/api/v2/update-cancel", cancel_v2)
    r.add_get("/secrets", secrets_get_v1)
    r.add_post("/secrets", secrets_post_v1)
    r.add_get("/update", update_log_v1)
    r.add_post("/update", update_post_v1)
    r.add_get("/update-manifest", pending_get)
    r.add_post("/update-manifest", acknowledge_v1)
    r.add_post("/update-cancel", cancel_v1)
