"""JSend envelopes as MarbleRun writes them (reference §6.1).

- success: ``{"status":"success","data":...}``, ``application/json``;
- fail (the client's fault, 4xx): ``{"status":"fail","data":...,"message":"..."}``, ``application/json``;
- error (the server's fault, 5xx, and 405): ``{"status":"error","data":null,"message":"..."}`` sent as
  ``text/plain; charset=utf-8`` with ``X-Content-Type-Options: nosniff``, like Go's ``http.Error``.

Bodies end in a newline and escape ``<``, ``>``, ``&`` like Go's JSON encoder.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from marblekeep.errors import MarbleKeepError

__all__ = ["encode", "error", "fail", "from_exception", "success"]

_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def encode(doc: Any) -> bytes:
    return (json.dumps(doc, separators=(",", ":")).translate(_GO_ESCAPES) + "\n").encode()


def success(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=encode({"status": "success", "data": data}), status=status, content_type="application/json"
    )


def fail(message: str, status: int = 400, data: Any = None) -> web.Response:
    doc: dict[str, Any] = {"status": "fail", "data": data}
    if message:
        doc["message"] = message
    return web.Response(body=encode(doc), status=status, content_type="application/json")


def error(message: str, status: int = 500) -> web.Response:
    doc: dict[str, Any] = {"status": "error", "data": None}
    if message:
        doc["message"] = message
    resp = web.Response(body=encode(doc), status=status, content_type="text/plain", charset="utf-8")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def from_exception(exc: MarbleKeepError, *, status: int | None = None) -> web.Response:
    """The envelope for one of our errors: 4xx → fail (with problems as data), 5xx → error."""
    code = status or exc.http_status
    if code >= 500:
        return error(exc.message, code)
    data: Any = None
    if exc.problems:
        data = {"problems": [{"path": p.path, "message": p.message} for p in exc.problems]}
    return fail(exc.message, code, data)
