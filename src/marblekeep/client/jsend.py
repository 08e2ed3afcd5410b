"""Decode a Coordinator's JSend answer into its ``data`` or one of our errors (pure: no I/O).

MarbleRun's envelopes (reference §6.1): ``{"status":"success","data":...}``;
``{"status":"fail","data":...,"message":"..."}`` for the client's mistakes (4xx);
``{"status":"error","data":null,"message":"..."}`` for the server's (5xx; sent as text/plain).
A 405 with an empty error body means "this API version does not have this endpoint": the caller
falls back from v2 to v1 on :class:`EndpointMissing`.

The Coordinator's message is shown to a person, so it is sanitised: control characters (terminal
escape sequences) are escaped and its length is capped.
"""

from __future__ import annotations

import json
from typing import Any

from marblekeep.errors import (
    AuthenticationError,
    AuthorizationError,
    CoordinatorError,
    MarbleKeepError,
    Problem,
)

__all__ = ["MAX_MESSAGE_CHARS", "EndpointMissing", "clean_text", "decode_envelope"]

MAX_MESSAGE_CHARS = 2000
_MAX_PROBLEMS = 100


class EndpointMissing(CoordinatorError):
    """HTTP 405 (or 404 without JSend): the Coordinator does not serve this path/method."""

    code = "endpoint_missing"


def clean_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` safe to print on a terminal: control characters escaped, at most ``limit`` chars."""
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if ch in {"\n", "\t"}:
            out.append(ch)
        elif code < 0x20 or 0x7F <= code < 0xA0 or code in (0x2028, 0x2029) or 0x202A <= code <= 0x202E:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    result = "".join(out)
    if len(result) > limit:
        result = result[:limit] + f"... ({len(result) - limit} more characters)"
    return result


def _problems(data: Any) -> list[Problem]:
    if not isinstance(data, dict):
        return []
    raw = data.get("problems")
    if not isinstance(raw, list):
        return []
    found: list[Problem] = []
    for item in raw[:_MAX_PROBLEMS]:
        if isinstance(item, dict) and isinstance(item.get("message"), str):
            path = item.get("path")
            found.append(
                Problem(clean_text(path if isinstance(path, str) else "", 300), clean_text(item["message"]))
            )
    return found


def _failure(status_code: int, what: str, message: str, problems: list[Problem]) -> MarbleKeepError:
    text = f"{what}: the Coordinator answered HTTP {status_code}"
    if message:
        text += f": {message}"
    if status_code == 401:
        return AuthenticationError(
            text + " (authorizing user: pass the certificate and key of a user listed in the manifest with"
            " -c/--cert and -k/--key)",
            problems=problems,
        )
    if status_code == 403:
        return AuthorizationError(text, problems=problems)
    return CoordinatorError(text, status=status_code, problems=problems)


def decode_envelope(status_code: int, body: bytes, what: str) -> Any:
    """The ``data`` of a successful answer; otherwise raise.

    ``what`` names the request for messages (``GET /api/v2/status``). Raises
    :class:`EndpointMissing` for 405 (and for a 404 that is not JSend), :class:`AuthenticationError`
    for 401, :class:`AuthorizationError` for 403, :class:`CoordinatorError` for anything else.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    if not isinstance(doc, dict) or doc.get("status") not in ("success", "fail", "error"):
        if status_code in (404, 405):
            raise EndpointMissing(
                f"{what}: this Coordinator does not serve it (HTTP {status_code})", status=status_code
            )
        snippet = clean_text(body[:200].decode("utf-8", "replace"), 200).strip()
        raise CoordinatorError(
            f"{what}: HTTP {status_code} with an answer that is not JSend"
            + (f" ({snippet!r})" if snippet else " (empty body)")
            + ": is this the Coordinator's Client API address (default port 4433)?",
            status=status_code,
        )
    envelope_status = doc["status"]
    raw_message = doc.get("message")
    message = clean_text(raw_message) if isinstance(raw_message, str) else ""
    if envelope_status == "success" and 200 <= status_code < 300:
        return doc.get("data")
    if status_code == 405 and not message:
        raise EndpointMissing(f"{what}: this Coordinator does not serve it (HTTP 405)", status=status_code)
    if envelope_status == "success":  # a success envelope with an error status: trust the status
        raise CoordinatorError(f"{what}: the Coordinator answered HTTP {status_code}", status=status_code)
    raise _failure(status_code, what, message, _problems(doc.get("data")))
