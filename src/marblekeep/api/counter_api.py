"""MarbleRun's monotonic counters on the Client API: ``POST /api/v2/monotonic-counter``.

Feature gate ``MonotonicCounter``. A Marble authenticates with the Marble certificate it received at
activation (``MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN`` and ``MARBLE_PREDEFINED_PRIVATE_KEY``):
the TLS leaf must verify against the *current* Marble root, carry a UUID as its common name and the
Marble-type extension 1.3.9903.2.1 (only the leaf counts; a later chain entry never does). The
request ``{"name": str, "value": uint64}`` raises the Marble's counter ``name`` to ``value`` if that
is larger; the answer is ``{"value": <previous value>}`` (0 for a new counter).

Status codes: 403 when the gate is off, 409 when not accepting Marbles (MarbleRun: 500), 401 without
a valid Marble certificate, 400 for a malformed body. Counters live in the sealed state, exact under
concurrency (activations.py).
"""

from __future__ import annotations

from aiohttp import web

from marblekeep.api import jsend
from marblekeep.api.body import json_object
from marblekeep.api.client_api import coordinator_of, peer_certificate_der

__all__ = ["MONOTONIC_COUNTER_PATH", "add_counter_routes"]

MONOTONIC_COUNTER_PATH = "/api/v2/monotonic-counter"


async def monotonic_counter_v2(request: web.Request) -> web.Response:
    marbles = coordinator_of(request).marbles
    marble = marbles.counter_client(peer_certificate_der(request))
    doc = await json_object(request)
    previous = await marbles.raise_counter(marble, doc.get("name"), doc.get("value"))
    return jsend.success({"value": previous})


def add_counter_routes(app: web.Application) -> None:
    app.router.add_post(MONOTONIC_COUNTER_PATH, monotonic_counter_v2)
