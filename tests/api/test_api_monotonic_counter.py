"""``POST /api/v2/monotonic-counter`` over HTTP, the Marble authenticated by the certificate the
transport reports (``peer_cert_der``, what the TLS layer provides). The HTTP server is the real
Client API application; only the transport is wrapped to report a chosen client certificate."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import uuid as uuid_mod
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from grpc_support import InjectingProtocol

from harness import ACTIVATION_MANIFEST, RunningCoordinator, free_port
from marblekeep.api.server import build_client_app

PATH = "/api/v2/monotonic-counter"


class CounterEndpoint:
    def __init__(self, running: RunningCoordinator) -> None:
        self.running = running
        self.peer_cert: bytes | None = None
        self.port = free_port()
        app = build_client_app(running.coord, running.listeners.metrics)

        async def start() -> tuple[web.AppRunner, asyncio.Server]:
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            server = runner.server
            assert server is not None
            loop = asyncio.get_running_loop()
            listener = await loop.create_server(
                lambda: InjectingProtocol(server(), lambda _t: self.peer_cert), "127.0.0.1", self.port
            )
            return runner, listener

        self._runner, self._listener = running.run(start())

    def post(self, body: object, cert: bytes | None) -> httpx.Response:
        self.peer_cert = cert
        return httpx.post(
            f"http://127.0.0.1:{self.port}{PATH}", content=json.dumps(body), trust_env=False, timeout=30
        )

    def stop(self) -> None:
        async def close() -> None:
            self._listener.close()
            await self._listener.wait_closed()
            await self._runner.cleanup()

        self.running.run(close())


def _manifest(gates: list[str]) -> bytes:
    return json.dumps({**ACTIVATION_MANIFEST, "Config": {"FeatureGates": gates}}).encode()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningCoordinator]:
    with RunningCoordinator(tmp_path / "seal") as coordinator:
        yield coordinator


@pytest.fixture
def endpoint(running: RunningCoordinator) -> Iterator[CounterEndpoint]:
    ep = CounterEndpoint(running)
    try:
        yield ep
    finally:
        ep.stop()


def _marble_cert(running: RunningCoordinator, marble_uuid: uuid_mod.UUID) -> bytes:
    coord = running.coord
    return coord.prepared.leaf_issuer.issue(marble_uuid, "backend", ("localhost",), coord.clock()).cert_der


def test_counter_endpoint_status_codes(running: RunningCoordinator, endpoint: CounterEndpoint) -> None:
    running.set_manifest(_manifest([]))
    cert = _marble_cert(running, uuid_mod.uuid4())
    r = endpoint.post({"name": "c", "value": 1}, cert)
    assert r.status_code == 403 and "MonotonicCounter" in r.json()["message"]
    assert httpx.get(f"http://127.0.0.1:{endpoint.port}{PATH}", trust_env=False).status_code == 405


def test_counter_endpoint_over_http(running: RunningCoordinator, endpoint: CounterEndpoint) -> None:
    running.set_manifest(_manifest(["MonotonicCounter"]))
    cert = _marble_cert(running, uuid_mod.uuid4())
    r = endpoint.post({"name": "c", "value": 1}, None)
    assert r.status_code == 401 and r.json()["status"] == "fail"
    assert "no client certificate" in r.json()["message"]
    r = endpoint.post({"name": "c", "value": -1}, cert)
    assert r.status_code == 400 and "value" in r.json()["message"]
    assert endpoint.post({"name": "c", "value": 10}, cert).json() == {
        "status": "success",
        "data": {"value": 0},
    }
    assert endpoint.post({"name": "c", "value": 4}, cert).json()["data"] == {"value": 10}
    assert endpoint.post({"name": "c", "value": 11}, cert).json()["data"] == {"value": 10}

    # Many concurrent clients: exactly one serial order (see the service test for the full check).
    values = list(range(100, 132))
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda v: endpoint.post({"name": "n", "value": v}, cert), values))
    previous = [a.json()["data"]["value"] for a in answers]
    raised = sorted((v, p) for v, p in zip(values, previous, strict=True) if v > p)
    assert raised[0][1] == 0 and raised[-1][0] == 131
    assert all(raised[i][1] == raised[i - 1][0] for i in range(1, len(raised)))
    assert endpoint.post({"name": "n", "value": 0}, cert).json()["data"] == {"value": 131}
