"""A fake Coordinator's Marble API for premain tests, built on the real protocol module.

`FakeMarbleApi.handle` is transport-free (used through httpx.MockTransport); `FakeCoordinatorServer`
serves it over real HTTPS with aiohttp and a trustme certificate.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trustme
from aiohttp import web

from marblekeep.errors import RequestError
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    ActivationRequest,
    ChallengeBook,
    ChallengeVerdict,
    EvidenceType,
    MarbleParameters,
    encode_challenge_response,
    expected_report_data,
    parse_activation_request,
    seal_parameters,
)


def jsend_fail(message: str, code: str = "refused") -> bytes:
    return json.dumps({"status": "fail", "data": {"code": code}, "message": message}).encode()


def jsend_error(message: str) -> bytes:
    return json.dumps({"status": "error", "data": None, "message": message}).encode()


@dataclass
class FakeMarbleApi:
    """Challenge + activate, like a simulation-mode Coordinator with one programmable twist each."""

    params: Callable[[ActivationRequest], MarbleParameters] = lambda _req: MarbleParameters()
    not_ready: int = 0  # answer this many challenges with 503 first
    refuse: str | None = None  # refuse every activation with 403 and this reason
    status_override: int | None = None  # answer every challenge with this status
    forget_challenges: int = 0  # forget the key of this many challenges (as after a restart)
    book: ChallengeBook = field(
        default_factory=lambda: ChallengeBook(secrets.token_bytes(32), ttl=timedelta(seconds=30))
    )
    challenges: int = 0
    activations: list[ActivationRequest] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        now = datetime.now(UTC)
        if method != "POST" or path not in (CHALLENGE_PATH, ACTIVATE_PATH):
            return 405, b""
        if path == CHALLENGE_PATH:
            self.challenges += 1
            if self.status_override is not None:
                return self.status_override, jsend_error(f"scripted status {self.status_override}")
            if self.not_ready > 0:
                self.not_ready -= 1
                return 503, jsend_error("cannot accept marbles in current state")
            nonce = self.book.issue(now, secrets.token_bytes)
            if self.forget_challenges > 0:
                self.forget_challenges -= 1
                self.book = ChallengeBook(secrets.token_bytes(32), ttl=self.book.ttl)
            return 200, encode_challenge_response(nonce)
        try:
            req = parse_activation_request(body)
        except RequestError as exc:
            self.refusals.append(exc.message)
            return 400, jsend_fail(exc.message, "bad_request")
        verdict = self.book.consume(req.nonce, now)
        if verdict is not ChallengeVerdict.ACCEPTED:
            self.refusals.append(f"nonce {verdict.value}")
            # As the Coordinator: 403 with the refusal label "replay" in data.reason.
            message = f"challenge nonce {verdict.value}"
            body = {"status": "fail", "data": {"reason": "replay"}, "message": message}
            return 403, json.dumps(body).encode()
        if req.evidence_type != EvidenceType.SIMULATION or req.evidence != expected_report_data(req):
            self.refusals.append("binding")
            return 403, jsend_fail("evidence does not carry the expected report data", "attestation_failed")
        if self.refuse is not None:
            self.refusals.append(self.refuse)
            return 403, jsend_fail(self.refuse, "activation_refused")
        self.activations.append(req)
        sealed = seal_parameters(self.params(req), req)
        body = {"status": "success", "data": {"sealedParameters": base64.b64encode(sealed).decode()}}
        return 200, json.dumps(body).encode()


class FakeCoordinatorServer:
    """Serves a FakeMarbleApi over HTTPS on 127.0.0.1; the socket is bound before the server starts."""

    def __init__(self, api: FakeMarbleApi, ca: trustme.CA) -> None:
        self.api = api
        self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(self.ssl_context)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused until start()
        self.port: int = self.sock.getsockname()[1]
        self._runner: web.AppRunner | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        status, body = self.api.handle(request.method, request.path, await request.read())
        return web.Response(status=status, body=body, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock, ssl_context=self.ssl_context).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.sock.close()
