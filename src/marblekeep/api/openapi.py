"""The OpenAPI 3.1 description of the Coordinator's REST APIs, served at ``GET /api/v2/openapi.json``.

The document is ``openapi.json`` beside this module (package data). It is maintained by hand and kept
true to the routes by tests: every route of the Client, Marble and metrics applications is documented,
every documented operation is served, and a schemathesis run checks the answers against it
(tests/api/test_api_openapi*.py).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from aiohttp import web

__all__ = ["OPENAPI_PATH", "add_openapi_route", "document", "document_bytes"]

OPENAPI_PATH = "/api/v2/openapi.json"


@functools.cache
def document_bytes() -> bytes:
    """The document as shipped (UTF-8 JSON)."""
    return resources.files("marblekeep.api").joinpath("openapi.json").read_bytes()


def document() -> dict[str, Any]:
    """The document, parsed (a fresh copy each call)."""
    doc: dict[str, Any] = json.loads(document_bytes())
    return doc


async def _serve(request: web.Request) -> web.Response:
    return web.Response(body=document_bytes(), content_type="application/json")


def add_openapi_route(app: web.Application) -> None:
    """Serve the document on the Client API; public, like the status endpoint."""
    app.router.add_get(OPENAPI_PATH, _serve)
