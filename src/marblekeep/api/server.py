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
import time
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from marblekeep.activations import ActivationOutcome
from marblekeep.api import jsend
from marblekeep.api.client_api import COORDINATOR_KEY, add_client_routes
from marblekeep.api.counter_api import add_counter_routes
from marblekeep.api.governance_api import add_governance_routes
from marblekeep.api.grpc import IDLE_TIMEOUT, GrpcProtocol, GrpcStatus, UnaryMethod
from marblekeep.api.limits import ConnectionLimits, deadline_middleware
from marblekeep.api.openapi import add_openapi_route
from marblekeep.api.origin import refuse_browser_origin
from marblekeep.api.tls import ServerCredentials, make_server_credentials
from marblekeep.api.tlslayer import ALPN_H2, ALPN_HTTP11, ProtocolFactory, TLSListener
from marblekeep.core.deployment import Deployment
from marblekeep.errors import ActivationRefused, ConfigError, MarbleKeepError
from marblekeep.handover import (
    HANDOVER_PATH,
    Membership,
    Registry,
    advertised_address,
    answer_join,
)
from marblekeep.manifest.model import SealMode
from marblekeep.marble.evidence import GramineIssuer
from marblekeep.marble.marblerun_wire import decode_activation_req
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    MAX_ACTIVATION_BODY,
    client_source,
    encode_challenge_response,
)
from marblekeep.metrics import Metrics
from marblekeep.service import Coordinator, CoordinatorConfig, utcnow
from marblekeep.store.kek import GramineSealKeyProvider, KeyEncryptionKeyProvider
from marblekeep.verification import DcapEvidenceVerifier, collateral_source

__all__ = [
    "MARBLERUN_ACTIVATE_PATH",
    "Listeners",
    "build_client_app",
    "build_marble_app",
    "grpc_protocol_factory",
    "marble_grpc_methods",
    "observe_activation",
    "parse_addr",
    "serve",
]

log = logging.getLogger("marblekeep.coordinator")

METRICS_KEY = web.AppKey("metrics", Metrics)
API_NAME_KEY = web.AppKey("api_name", str)
#: Response header naming the API that answered: "client" (Client API) or "marble" (Marble API).
API_HEADER = "X-MarbleKeep-API"
CLIENT_MAX_BODY = 8 * 1024 * 1024
#: MarbleRun's Marble API method (gRPC service ``rpc.Marble``).
MARBLERUN_ACTIVATE_PATH = "/rpc.Marble/Activate"

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
    clients fall back from v2 to v1 on it) with an ``Allow`` header; nothing ever leaks a traceback."""
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
    except web.HTTPMethodNotAllowed as exc:
        response = jsend.error("", 405)
        # RFC 9110 §15.5.6: a 405 lists the methods the resource supports.
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except web.HTTPNotFound:
        response = jsend.error("", 405)
        response.headers["Allow"] = ""  # an unknown path supports no method (an empty list)
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


def build_client_app(
    coord: Coordinator, metrics: Metrics, limits: ConnectionLimits | None = None
) -> web.Application:
    app = web.Application(
        middlewares=[
            deadline_middleware(limits or ConnectionLimits()),
            _errors_and_metrics,
            refuse_browser_origin,
        ],
        client_max_size=CLIENT_MAX_BODY,
    )
    app[COORDINATOR_KEY] = coord
    app[METRICS_KEY] = metrics
    app[API_NAME_KEY] = "client"
    add_client_routes(app)
    add_governance_routes(app)
    add_counter_routes(app)
    add_openapi_route(app)
    return app


async def observe_activation(
    metrics: Metrics,
    coord: Coordinator,
    protocol: str,
    claimed_type: Callable[[], object],
    activation: Awaitable[ActivationOutcome],
) -> ActivationOutcome:
    """Count and log one activation, whichever protocol carried it (the same metrics and log lines
    for both; ``protocol`` is a log field). ``claimed_type()`` (called only for a refusal, when the
    request parsed) labels it only if the manifest defines it (else ``unknown``): a client cannot
    create metric series."""
    try:
        outcome = await activation
    except ActivationRefused as exc:
        known = coord.deployment.manifest.marbles if coord.deployment.manifest else {}
        claimed = claimed_type()
        label = claimed if isinstance(claimed, str) and claimed in known else "unknown"
        metrics.activation_attempts.labels(label).inc()
        metrics.activation_refusals.labels(label, exc.reason).inc()
        log.warning(
            "marble activation refused",
            extra={"marble_type": label, "reason": exc.message, "protocol": protocol},
        )
        raise
    metrics.activation_attempts.labels(outcome.marble_type).inc()
    metrics.activation_successes.labels(outcome.marble_type).inc()
    log.info(
        "marble activated",
        extra={"marble_type": outcome.marble_type, "uuid": outcome.uuid, "protocol": protocol},
    )
    return outcome


def build_marble_app(
    coord: Coordinator, metrics: Metrics, limits: ConnectionLimits | None = None
) -> web.Application:
    async def challenge(request: web.Request) -> web.Response:
        return web.Response(
            body=encode_challenge_response(coord.challenge()), content_type="application/json"
        )

    async def activate(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            outcome = await observe_activation(
                metrics,
                coord,
                "marblekeep",
                lambda: _claimed_type(body),
                coord.marbles.activate_hpke(body, client_source(request.remote)),
            )
        except ActivationRefused as exc:
            # The reason label tells the premain what to do (``replay``: start over with a new challenge).
            data: dict[str, object] = {"reason": exc.reason}
            if exc.problems:
                data["problems"] = [{"path": p.path, "message": p.message} for p in exc.problems]
            return jsend.fail(exc.message, exc.http_status, data)
        return jsend.success({"sealedParameters": base64.b64encode(outcome.payload).decode()})

    app = web.Application(
        middlewares=[deadline_middleware(limits or ConnectionLimits()), _errors_and_metrics],
        client_max_size=MAX_ACTIVATION_BODY,
    )

    async def handover(request: web.Request) -> web.Response:
        body = await request.read()  # the whole body, up to the app's limit (413 beyond)
        peer = request.remote or "unknown"
        data = await answer_join(body, coord, coord.handover_identity, peer)
        return jsend.success(data)

    app[COORDINATOR_KEY] = coord
    app[METRICS_KEY] = metrics
    app[API_NAME_KEY] = "marble"
    app.router.add_post(CHALLENGE_PATH, challenge)
    app.router.add_post(ACTIVATE_PATH, activate)
    # another replica joining the shared state asks for the deployment KEK (marblekeep/handover.py)
    app.router.add_post(HANDOVER_PATH, handover)
    return app


def _claimed_type(body: bytes) -> object:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc.get("marbleType") if isinstance(doc, dict) else None


def marble_grpc_methods(coord: Coordinator, metrics: Metrics) -> dict[str, UnaryMethod]:
    """MarbleRun's Marble API as gRPC methods (served under ALPN ``h2`` on the Marble address)."""

    async def activate(message: bytes, client_cert_der: bytes | None) -> bytes:
        msg = decode_activation_req(message)
        activation = coord.marbles.activate_marblerun(msg, client_cert_der)
        outcome = await observe_activation(metrics, coord, "marblerun", lambda: msg.marble_type, activation)
        return outcome.payload

    return {MARBLERUN_ACTIVATE_PATH: UnaryMethod(activate, MAX_ACTIVATION_BODY)}


def grpc_protocol_factory(
    coord: Coordinator, metrics: Metrics, *, idle_timeout: float = IDLE_TIMEOUT
) -> Callable[[], GrpcProtocol]:
    """A factory of HTTP/2 protocols serving :func:`marble_grpc_methods`, one per connection. The
    transport handed to each must answer ``get_extra_info("peer_cert_der")``. ``idle_timeout``:
    a connection without a call in progress is closed (GOAWAY) after this many seconds."""
    methods = marble_grpc_methods(coord, metrics)

    def observe(path: str, status: GrpcStatus, seconds: float) -> None:
        route = path if path in methods else "unmatched"
        metrics.grpc_requests.labels(route, status.name).inc()

    return lambda: GrpcProtocol(methods, observe=observe, idle_timeout=idle_timeout)


def build_metrics_app(metrics: Metrics) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


class Listeners:
    """The running listeners of one Coordinator (for tests and :func:`serve`).

    Both TLS listeners run on the TLS layer (api/tlslayer.py) with the same in-memory listener
    credentials. The Marble API offers ALPN ``h2`` — MarbleRun's gRPC Marble API
    (:func:`grpc_protocol_factory`; ``marble_h2`` replaces it in tests) — and ``http/1.1``, our own
    protocol (docs/adr/0003-marblerun-grpc-marble-api.md). The Client API never offers ``h2``.
    """

    def __init__(
        self, coord: Coordinator, config: CoordinatorConfig, *, marble_h2: ProtocolFactory | None = None
    ) -> None:
        self.coord = coord
        self.config = config
        self.limits = config.connection_limits
        self.metrics = Metrics(lambda: float(coord.state), coord.collateral_status)
        self.runners: list[web.AppRunner] = []
        self.tls_listeners: list[TLSListener] = []
        self.client_listener: TLSListener | None = None
        self.marble_listener: TLSListener | None = None
        self._marble_h2 = (
            marble_h2
            if marble_h2 is not None
            else grpc_protocol_factory(coord, self.metrics, idle_timeout=self.limits.idle_timeout)
        )
        self._root_der = coord.deployment.ca.root.cert_der
        self.credentials = make_server_credentials(coord.deployment.ca.root, config.dns_names, coord.clock())
        # New handshakes see a recovered root without a restart. Users are matched per request
        # (api/client_api.py), so a user change needs nothing here.
        coord.observers.append(self._on_change)

    def _on_change(self, dep: Deployment) -> None:
        if dep.ca.root.cert_der != self._root_der:
            self._root_der = dep.ca.root.cert_der
            self.credentials = make_server_credentials(dep.ca.root, self.config.dns_names, self.coord.clock())

    def _current_credentials(self) -> ServerCredentials:
        return self.credentials

    async def _runner(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5.0, **self.limits.runner_kwargs()
        )
        await runner.setup()
        self.runners.append(runner)
        return runner

    async def _start_tls(
        self, app: web.Application, addr: str, what: str, h2: ProtocolFactory | None = None
    ) -> TLSListener:
        host, port = parse_addr(addr, what)
        runner = await self._runner(app)
        assert runner.server is not None
        protocols: dict[str, ProtocolFactory] = {ALPN_HTTP11: runner.server}
        if h2 is not None:
            protocols[ALPN_H2] = h2
        listener = TLSListener(self._current_credentials, protocols, limits=self.limits, name=what)
        try:
            await listener.start(host, port)
        except OSError as exc:
            raise ConfigError(f"{what}: cannot listen on {addr}: {exc.strerror}") from None
        self.tls_listeners.append(listener)
        return listener

    async def start(self) -> None:
        self.client_listener = await self._start_tls(
            build_client_app(self.coord, self.metrics, self.limits), self.config.client_addr, "client API"
        )
        self.marble_listener = await self._start_tls(
            build_marble_app(self.coord, self.metrics, self.limits),
            self.config.mesh_addr,
            "Marble API",
            self._marble_h2,
        )
        if self.config.prometheus_addr:
            host, port = parse_addr(self.config.prometheus_addr, "metrics")
            runner = await self._runner(build_metrics_app(self.metrics))
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                raise ConfigError(
                    f"metrics: cannot listen on {self.config.prometheus_addr}: {exc.strerror}"
                ) from None

    async def stop(self) -> None:
        # Stop accepting, let running requests finish (aiohttp's graceful shutdown closes idle
        # connections), then drop whatever is left (handshakes, other protocols).
        for listener in self.tls_listeners:
            listener.stop_accepting()
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()
        for listener in self.tls_listeners:
            await listener.close()
        self.tls_listeners.clear()


#: File descriptors beyond the two listeners' connections: store, logs, collateral, metrics.
FD_RESERVE = 128


def ensure_fd_limit(limits: ConnectionLimits) -> None:
    """Raise the soft RLIMIT_NOFILE so that both listeners can hold ``max_connections`` each (up to
    the hard limit); say so when even the hard limit is too low."""
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:  # pragma: no cover - not on POSIX
        return
    need = 2 * limits.max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < need:
        log.warning(
            "the open-file limit is lower than the connection limits need: lower --max-connections "
            "or raise the limit (ulimit -n)",
            extra={"open_files": target, "needed": need, "max_connections": limits.max_connections},
        )


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
    ensure_fd_limit(config.connection_limits)
    listeners = Listeners(coord, config)
    membership: Membership | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await listeners.start()
        if coord.backend is not None and hasattr(coord.backend, "register_member"):
            # a shared store: be found by replicas that join without a key of their own
            membership = Membership(
                cast(Registry, coord.backend),
                coord.replica_id,
                advertised_address(config.mesh_addr, config.handover_addr),
                coord.can_hand_over,
            )
            membership.start()
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
        if membership is not None:
            await membership.stop()
        await listeners.stop()
        await coord.close()
        if verifier is not None:
            await verifier.aclose()
        log.info("coordinator stopped")
