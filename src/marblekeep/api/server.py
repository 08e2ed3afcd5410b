"""The Coordinator's listeners: Client API, Marble API and (optionally) Prometheus metrics.

``serve(config)`` opens the Coordinator, binds the listeners and runs until SIGTERM/SIGINT, then
stops accepting connections, lets running requests finish and closes the store.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from marblekeep.api import jsend
from marblekeep.api.client_api import COORDINATOR_KEY, add_client_routes
from marblekeep.api.governance_api import add_governance_routes
from marblekeep.api.tls import TLSContexts, make_server_credentials
from marblekeep.core.deployment import Deployment
from marblekeep.errors import ActivationRefused, ConfigError, MarbleKeepError
from marblekeep.manifest.model import SealMode
from marblekeep.marble.evidence import GramineIssuer
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    MAX_ACTIVATION_BODY,
    encode_challenge_response,
)
from marblekeep.metrics import Metrics
from marblekeep.service import Coordinator, CoordinatorConfig, utcnow
from marblekeep.store.kek import GramineSealKeyProvider, KeyEncryptionKeyProvider
from marblekeep.verification import DcapEvidenceVerifier, collateral_source

__all__ = ["Listeners", "build_client_app", "build_marble_app", "parse_addr", "serve"]

log = logging.getLogger("marblekeep.coordinator")

METRICS_KEY = web.AppKey("metrics", Metrics)
API_NAME_KEY = web.AppKey("api_name", str)
#: Response header naming the API that answered: "client" (Client API) or "marble" (Marble API).
API_HEADER = "X-MarbleKeep-API"
CLIENT_MAX_BODY = 8 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def parse_addr(addr: str, what: str) -> tuple[str, int]:
    """``host:port`` / ``:port`` / ``[::1]:port`` → (host, port); empty host = all interfaces."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {addr!r} is not an address of the form HOST:PORT or :PORT")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)  # noqa: S104 (listening on all interfaces is the documented default)


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a JSend envelope; unknown routes and methods are 405 (MarbleRun's
    clients fall back from v2 to v1 on it); nothing ever leaks a traceback."""
    start = time.perf_counter()
    metrics = request.app[METRICS_KEY]
    api = request.app[API_NAME_KEY]
    response: web.StreamResponse
    try:
        response = await handler(request)
    except MarbleKeepError as exc:
        response = jsend.from_exception(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        response = jsend.fail(f"request body too large: {exc.text}", 413)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        response = jsend.error("", 405)
    except web.HTTPException as exc:
        response = (
            jsend.fail(exc.reason, exc.status) if exc.status < 500 else jsend.error(exc.reason, exc.status)
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: log its type (never its text: it might hold data), answer 500
        log.error(
            "internal error while handling a request",
            extra={"path": request.path, "error": type(exc).__name__},
            exc_info=False,
        )
        response = jsend.error("internal error: see the Coordinator's log", 500)
    # Names the listener, so that a client pointed at the wrong port can say which one it reached.
    response.headers[API_HEADER] = api
    route = _route_label(request)
    metrics.http_requests.labels(api, route, request.method, str(response.status)).inc()
    metrics.http_latency.labels(api, route).observe(time.perf_counter() - start)
    return response


def build_client_app(coord: Coordinator, metrics: Metrics) -> web.Application:
    app = web.Application(middlewares=[_errors_and_metrics], client_max_size=CLIENT_MAX_BODY)
    app[COORDINATOR_KEY] = coord
    app[METRICS_KEY] = metrics
    app[API_NAME_KEY] = "client"
    add_client_routes(app)
    add_governance_routes(app)
    return app


def build_marble_app(coord: Coordinator, metrics: Metrics) -> web.Application:
    async def challenge(request: web.Request) -> web.Response:
        return web.Response(
            body=encode_challenge_response(coord.challenge()), content_type="application/json"
        )

    async def activate(request: web.Request) -> web.Response:
        body = await request.read()
        marble_types = coord.deployment.manifest.marbles if coord.deployment.manifest else {}
        try:
            outcome = await coord.activate(body)
        except ActivationRefused as exc:
            label = _type_label(body, marble_types)
            metrics.activation_attempts.labels(label).inc()
            metrics.activation_refusals.labels(label, exc.reason).inc()
            log.warning("marble activation refused", extra={"marble_type": label, "reason": exc.message})
            raise
        metrics.activation_attempts.labels(outcome.marble_type).inc()
        metrics.activation_successes.labels(outcome.marble_type).inc()
        log.info("marble activated", extra={"marble_type": outcome.marble_type, "uuid": outcome.uuid})
        return jsend.success({"sealedParameters": base64.b64encode(outcome.sealed).decode()})

    app = web.Application(middlewares=[_errors_and_metrics], client_max_size=MAX_ACTIVATION_BODY)
    app[COORDINATOR_KEY] = coord
    app[METRICS_KEY] = metrics
    app[API_NAME_KEY] = "marble"
    app.router.add_post(CHALLENGE_PATH, challenge)
    app.router.add_post(ACTIVATE_PATH, activate)
    return app


def _type_label(body: bytes, known: Mapping[str, object]) -> str:
    """The Marble type for metric labels: only types the manifest defines, else ``unknown``."""
    try:
        value = json.loads(body).get("marbleType")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return "unknown"
    return value if isinstance(value, str) and value in known else "unknown"


def build_metrics_app(metrics: Metrics) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


class Listeners:
    """The running listeners of one Coordinator (for tests and :func:`serve`)."""

    def __init__(self, coord: Coordinator, config: CoordinatorConfig) -> None:
        self.coord = coord
        self.config = config
        self.metrics = Metrics(lambda: float(coord.state), coord.collateral_status)
        self.runners: list[web.AppRunner] = []
        self._root_der = coord.deployment.ca.root.cert_der
        self.credentials = make_server_credentials(coord.deployment.ca.root, config.dns_names, coord.clock())
        self.client_tls = TLSContexts(self.credentials, coord.user_certificates.values())
        self.marble_tls = TLSContexts(self.credentials)
        # New handshakes see the current users (and, after a recovery, the recovered root) without a restart.
        coord.observers.append(self._on_change)

    def _on_change(self, dep: Deployment) -> None:
        if dep.ca.root.cert_der != self._root_der:
            self._root_der = dep.ca.root.cert_der
            self.credentials = make_server_credentials(dep.ca.root, self.config.dns_names, self.coord.clock())
            self.marble_tls.update(self.credentials, ())
        self.client_tls.update(self.credentials, self.coord.user_certificates.values())

    async def _start(self, app: web.Application, addr: str, what: str, tls: ssl.SSLContext | None) -> None:
        host, port = parse_addr(addr, what)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot listen on {addr}: {exc.strerror}") from None

    async def start(self) -> None:
        await self._start(
            build_client_app(self.coord, self.metrics),
            self.config.client_addr,
            "client API",
            self.client_tls.base,
        )
        await self._start(
            build_marble_app(self.coord, self.metrics),
            self.config.mesh_addr,
            "Marble API",
            self.marble_tls.base,
        )
        if self.config.prometheus_addr:
            await self._start(build_metrics_app(self.metrics), self.config.prometheus_addr, "metrics", None)

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()


async def serve(config: CoordinatorConfig, *, ready: Callable[[], None] | None = None) -> None:
    source = collateral_source(config.pccs_url or None, config.collateral_dir)
    verifier = DcapEvidenceVerifier(source, clock=utcnow) if source is not None else None
    seal_providers: dict[SealMode, KeyEncryptionKeyProvider] | None = None
    quote_issuer = None
    if not config.simulation:
        # The manifest's SealMode is only known after unsealing: the Coordinator tries both keys.
        seal_providers = {
            mode: GramineSealKeyProvider(config.attestation_root, mode, anchor_dir=config.seal_dir)
            for mode in (SealMode.PRODUCT_KEY, SealMode.UNIQUE_KEY)
        }
        quote_issuer = GramineIssuer(config.attestation_root)
    if verifier is not None:
        verifier.start()
    try:
        coord = await Coordinator.open(
            config, verifier=verifier, quote_issuer=quote_issuer, seal_providers=seal_providers
        )
    except BaseException:
        if verifier is not None:
            await verifier.aclose()
        raise
    listeners = Listeners(coord, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await listeners.start()
        code, message = coord.status()
        log.info(
            "coordinator started",
            extra={
                "client_api": config.client_addr,
                "marble_api": config.mesh_addr,
                "metrics": config.prometheus_addr or "off",
                "state": code,
                "status": message,
                "simulation": coord.simulation,
            },
        )
        if ready is not None:
            ready()
        await stop.wait()
        log.info("shutting down: finishing running requests")
    finally:
        await listeners.stop()
        await coord.close()
        if verifier is not None:
            await verifier.aclose()
        log.info("coordinator stopped")
