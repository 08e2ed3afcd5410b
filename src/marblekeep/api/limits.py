"""Connection limits of the Coordinator's listeners (issue 11 item 3, docs/operations.md).

One unauthenticated client must not be able to hold a connection, a file descriptor and its
buffers for long, nor open so many that nobody else gets in. Each listener therefore enforces:

- ``handshake_timeout``: the TLS handshake must complete within this time of the TCP accept;
- ``header_timeout``: once the first byte of a request has arrived, its head (request line and
  headers) must be complete within this time;
- ``body_timeout``: once the head has arrived, the whole body must have arrived within this time
  (else HTTP 408, and the connection is closed);
- ``idle_timeout``: a connection without a request in progress (a fresh one, one between two
  keep-alive requests, and one whose request head is still incomplete) is closed this long after
  it opened or after its last response; and a connection whose peer stops reading (nothing can
  be written for this long) is dropped;
- ``max_connections``: at most this many connections (handshaking or established) per listener;
  a connection beyond it is reset at once, with one log line per interval naming the limit.

The handshake deadline and the cap live in the TLS layer (api/tlslayer.py); the head deadline is
armed by the TLS layer and cleared by :func:`deadline_middleware` when a request reaches the
application; the body deadline is the middleware's; the idle deadline is aiohttp's keep-alive
timeout (:meth:`ConnectionLimits.runner_kwargs`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from aiohttp import web
from aiohttp.typedefs import Middleware

from marblekeep.errors import ConfigError, RequestTimeout

__all__ = ["ConnectionLimits", "RequestTracker", "deadline_middleware"]

log = logging.getLogger("marblekeep.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Upper bound for any of the timeouts (a typo such as 3600 instead of 36 should not pass silently).
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True)
class ConnectionLimits:
    """Timeouts (seconds) and the connection cap of one listener; see the module docstring."""

    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    max_connections: int = 512

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "header_timeout", "body_timeout", "idle_timeout"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not 0 < value <= MAX_TIMEOUT
            ):
                raise ConfigError(
                    f"{name}: {value!r} is not a number of seconds in (0, {MAX_TIMEOUT:.0f}]: "
                    "give a positive number such as 30"
                )
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int):
            raise ConfigError(f"max_connections: {self.max_connections!r} is not a whole number")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ConfigError(
                f"max_connections: {self.max_connections} is out of range: give 1 to 1000000 per listener"
            )

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``web.AppRunner`` (aiohttp's RequestHandler) that apply the limits."""
        return {
            # aiohttp closes a connection whose handler waits for a request this long after the
            # connection opened or the last response; data received meanwhile does not extend it.
            "keepalive_timeout": self.idle_timeout,
            # After a response, aiohttp reads and discards an unread request body at most this long.
            "lingering_time": min(10.0, self.body_timeout),
        }


@runtime_checkable
class RequestTracker(Protocol):
    """What the TLS layer's transport offers the HTTP middleware (api/tlslayer.py)."""

    def request_started(self) -> None: ...

    def request_finished(self) -> None: ...


def deadline_middleware(limits: ConnectionLimits) -> Middleware:
    """The outermost middleware of an application served by the TLS layer.

    It tells the transport that a request head has arrived (which clears the head deadline) and
    arms the body deadline: if the body has not fully arrived ``body_timeout`` after the head, the
    handler's read fails with :class:`RequestTimeout` (HTTP 408) and the connection is closed
    after that response.
    """

    @web.middleware
    async def deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
        tracker = request.transport if isinstance(request.transport, RequestTracker) else None
        if tracker is not None:
            tracker.request_started()
        watchdog: asyncio.TimerHandle | None = None
        expired: list[bool] = []
        if request.body_exists and not request.content.is_eof():

            def expire() -> None:
                if request.content.is_eof():
                    return  # the body is complete; the handler is just slow to consume it
                expired.append(True)
                log.info(
                    "request body not received in time: answering 408 and closing the connection",
                    extra={"path": request.path, "body_timeout": limits.body_timeout},
                )
                request.content.set_exception(
                    RequestTimeout(
                        f"request body not received within {limits.body_timeout:g} s: send the whole "
                        "body at once (the Coordinator's body timeout; operators can raise it with "
                        "--body-timeout)"
                    )
                )

            watchdog = asyncio.get_running_loop().call_later(limits.body_timeout, expire)
        try:
            response = await handler(request)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if tracker is not None:
                tracker.request_finished()
        if expired:
            response.force_close()
        return response

    return deadlines
