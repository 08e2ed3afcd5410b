"""Request bodies of the Client API: a JSON object, base64 fields. Shared by every route module.

Every problem is a :class:`~marblekeep.errors.RequestError` (400 ``fail``) that names the field
and what to send instead: nothing a client sends yields a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web

from marblekeep.errors import RequestError, RequestTooLarge

__all__ = ["base64_field", "base64_value", "json_object", "parse_json_object", "read_body"]

_CHUNK = 64 * 1024


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (more: :class:`RequestTooLarge`, 413).

    Reads until the end of the body, however it was split into TCP segments and TLS records:
    ``request.content.read(n)`` alone returns only what has arrived so far.
    """
    too_large = f"request body too large: the limit is {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(too_large)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(too_large)
        chunks.append(chunk)


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object (invalid JSON, deep nesting or another type: 400)."""
    return parse_json_object(await request.read())


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, for a body read some other way (e.g. with a smaller limit)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: deep nesting
        raise RequestError("request body is not valid JSON: send a JSON object") from None
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object")
    return doc


def base64_value(value: Any, name: str, what: str = "the value") -> bytes:
    """``value`` (the body's field ``name``) decoded as strict standard base64."""
    if not isinstance(value, str):
        raise RequestError(f"{name}: missing or not a string: send {what} as standard base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name}: not valid standard base64") from None


def base64_field(doc: dict[str, Any], name: str) -> bytes:
    """The field ``name`` (exact spelling) of ``doc`` decoded as strict standard base64."""
    return base64_value(doc.get(name), name)
