"""Browser-origin check for the Client API: no state change on behalf of a web page.

A web page cannot read the Client API's answers across origins, but a browser *sends* what the page
asks for: a form post (``application/x-www-form-urlencoded``, which curl's ``-d`` sends too) or a
"simple" ``fetch`` needs no CORS preflight, and the browser attaches the user's client certificate
when the user has one installed. The Client API does not look at the Content-Type, so such a request
would be executed. Browsers mark every cross-origin request, and every non-GET same-origin one, with
an ``Origin`` header; curl, MarbleRun's CLI and Go client, marblekeep's CLI and SDK never send one.

Rule: a request with a state-changing method (POST, PUT, PATCH, DELETE) that carries an ``Origin``
header (any value, ``null`` included) is refused with 403 before it reaches a handler. Reads (GET,
HEAD, OPTIONS) are not affected: their answers stay behind the browser's same-origin policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from marblekeep.errors import AuthorizationError

__all__ = ["STATE_CHANGING_METHODS", "refuse_browser_origin"]

STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

BROWSER_ORIGIN_REFUSED = (
    "browser-origin request refused: state-changing requests to the Client API must not carry an "
    "Origin header (they are not accepted from web pages); use the marblekeep or marblerun CLI, curl, "
    "or an HTTP client that does not send Origin"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def refuse_browser_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 for a state-changing request with an ``Origin`` header; anything else passes."""
    if request.method in STATE_CHANGING_METHODS and hdrs.ORIGIN in request.headers:
        raise AuthorizationError(BROWSER_ORIGIN_REFUSED)
    return await handler(request)
