"""The TLS layer (api/tlslayer.py, ADR 0002): real handshakes on loopback with CPython's ssl and
the system's ``openssl s_client`` as clients.

- what the application sees: ``peer_cert_der``, ``alpn``, ``peername``/``sockname``/``socket``;
- ALPN dispatch: ``h2`` to the registered h2 protocol, ``http/1.1`` or none to aiohttp, and no
  ``h2`` where none is registered (the Client API);
- TLS 1.3, TLS 1.2 with AEAD suites only (a CBC suite is refused with an alert), no TLS 1.1;
- flow control both ways (multi-megabyte bodies), session resumption with a client certificate,
  close_notify on close.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import RunningCoordinator
from marblekeep.api import tlslayer
from marblekeep.api.limits import ConnectionLimits
from marblekeep.api.tls import ServerCredentials, make_server_credentials
from marblekeep.api.tlslayer import ALPN_H2, ALPN_HTTP11, TLSListener
from marblekeep.crypto.pki import create_root_ca
from testsupport import self_signed_cert

NOW = dt.datetime.now(dt.UTC)
T = TypeVar("T")


class BackgroundLoop:
    """An asyncio loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class Recorder(asyncio.Protocol):
    """A bare application protocol: answers every chunk with what the transport told it."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        t = self.transport
        leaf = t.get_extra_info("peer_cert_der")
        sock = t.get_extra_info("socket")
        facts = [
            self.tag,
            hashlib.sha256(leaf).hexdigest().encode() if leaf else b"-",
            str(t.get_extra_info("alpn")).encode(),
            str(t.get_extra_info("peername")[0]).encode(),
            str(t.get_extra_info("sockname")[1]).encode(),
            str(sock is not None and sock.getsockname() == t.get_extra_info("sockname")).encode(),
            str(
                t.get_extra_info("ssl_object").selected_alpn_protocol() == t.get_extra_info("alpn")
                and t.get_extra_info("ssl_object").getpeercert(binary_form=True) == leaf
            ).encode(),
            data.strip(),
        ]
        t.write(b"|".join(facts) + b"\n")
        if data.strip() == b"bye":
            t.close()


@dataclass
class Client:
    identity: tuple[Path, Path] | None = None

    def context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if self.identity is not None:
            ctx.load_cert_chain(*self.identity)
        return ctx


def self_signed_identity(tmp: Path, name: str) -> tuple[Path, Path, bytes]:
    cert, key = self_signed_cert(
        name,
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=1),
        curve=ec.SECP384R1(),
    )
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file, cert.public_bytes(serialization.Encoding.DER)


class LayerServer:
    """A TLSListener on a background loop with the given protocol factories."""

    def __init__(
        self,
        protocols: dict[str, Any],
        credentials: ServerCredentials | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.limits = limits
        self.bg = BackgroundLoop()
        root = create_root_ca(["localhost"], NOW)
        self.credentials = credentials or make_server_credentials(root, ["localhost"], NOW)
        self.runners: list[web.AppRunner] = []
        self.listener = self.bg.run(self._start(protocols))
        self.port: int = self.listener.sockets[0].getsockname()[1]

    async def _start(self, protocols: dict[str, Any]) -> TLSListener:
        resolved = {}
        for alpn, factory in protocols.items():
            if isinstance(factory, web.Application):
                runner = web.AppRunner(factory, access_log=None)
                await runner.setup()
                self.runners.append(runner)
                resolved[alpn] = runner.server
            else:
                resolved[alpn] = factory
        listener = TLSListener(lambda: self.credentials, resolved, name="test", limits=self.limits)
        await listener.start("127.0.0.1", 0)
        return listener

    async def _stop(self) -> None:
        self.listener.stop_accepting()
        for runner in self.runners:
            await runner.cleanup()
        await self.listener.close()

    def stop(self) -> None:
        self.bg.run(self._stop())
        self.bg.close()


@pytest.fixture
def layer() -> Iterator[Any]:
    servers: list[LayerServer] = []

    def start(protocols: dict[str, Any], limits: ConnectionLimits | None = None) -> LayerServer:
        server = LayerServer(protocols, limits=limits)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def exchange(port: int, ctx: ssl.SSLContext, line: bytes = b"hello\n") -> tuple[str | None, list[bytes]]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls,
    ):
        tls.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = tls.recv(65536)
            assert chunk, "connection closed before the answer"
            data += chunk
        return tls.selected_alpn_protocol(), data.strip().split(b"|")


def test_application_sees_leaf_alpn_and_socket_facts(layer: Any, tmp_path: Path) -> None:
    server = layer({ALPN_HTTP11: lambda: Recorder(b"http"), ALPN_H2: lambda: Recorder(b"h2")})
    cert, key, der = self_signed_identity(tmp_path, "marble")
    alpn, facts = exchange(server.port, Client((cert, key)).context(["h2", "http/1.1"]))
    assert alpn == "h2"
    assert facts == [
        b"h2",
        hashlib.sha256(der).hexdigest().encode(),
        b"h2",
        b"127.0.0.1",
        str(server.port).encode(),
        b"True",
        b"True",
        b"hello",
    ]
    # No certificate: None. http/1.1 offered: the http/1.1 protocol.
    alpn, facts = exchange(server.port, Client().context(["http/1.1"]))
    assert alpn == "http/1.1"
    assert facts[:3] == [b"http", b"-", b"http/1.1"]
    assert facts[6] == b"True"  # ssl_object agrees (no certificate: None)
    # No ALPN at all: http/1.1's protocol, and alpn is None.
    alpn, facts = exchange(server.port, Client().context())
    assert alpn is None
    assert facts[:3] == [b"http", b"-", b"None"]
    # Only protocols we do not speak: the handshake continues without ALPN (http/1.1).
    alpn, facts = exchange(server.port, Client().context(["spdy/3", "foo"]))
    assert alpn is None
    assert facts[0] == b"http"


def test_h2_is_not_offered_without_an_h2_protocol(layer: Any) -> None:
    server = layer({ALPN_HTTP11: lambda: Recorder(b"http")})
    alpn, facts = exchange(server.port, Client().context(["h2", "http/1.1"]))
    assert alpn == "http/1.1"
    assert facts[0] == b"http"
    alpn, facts = exchange(server.port, Client().context(["h2"]))
    assert alpn is None  # no overlap: no ALPN, and never h2
    assert facts[0] == b"http"


def test_protocol_registered_later_applies_to_new_handshakes(layer: Any) -> None:
    server = layer({ALPN_HTTP11: lambda: Recorder(b"http")})
    server.listener.set_protocol(ALPN_H2, lambda: Recorder(b"late-h2"))
    alpn, facts = exchange(server.port, Client().context(["h2", "http/1.1"]))
    assert (alpn, facts[0]) == ("h2", b"late-h2")
    with pytest.raises(ValueError, match="not supported"):
        server.listener.set_protocol("spdy/3", lambda: Recorder(b"x"))


def test_close_sends_close_notify(layer: Any) -> None:
    server = layer({ALPN_HTTP11: lambda: Recorder(b"http")})
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        Client().context().wrap_socket(raw, suppress_ragged_eofs=False) as tls,
    ):
        tls.sendall(b"bye\n")
        data = b""
        while chunk := tls.recv(65536):  # b"" only on close_notify; a bare TCP close raises
            data += chunk
    assert data.endswith(b"|bye\n")


# ------------------------------------------------------------------------ aiohttp through the layer


def _http_app(reading_paused: asyncio.Event | None = None) -> web.Application:
    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query["n"])
        block = hashlib.sha256(b"block").digest() * 2048  # 64 KiB
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:
            part = block[: min(len(block), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def digest(request: web.Request) -> web.Response:
        if reading_paused is not None:
            # Read only once the layer has paused the socket: the body backs up first.
            await asyncio.wait_for(reading_paused.wait(), 30)
        h = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            h.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": h.hexdigest()})

    async def whoami(request: web.Request) -> web.Response:
        assert request.transport is not None
        leaf = request.transport.get_extra_info("peer_cert_der")
        return web.json_response(
            {"leaf": hashlib.sha256(leaf).hexdigest() if leaf else None, "secure": request.secure}
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/big", big)
    app.router.add_post("/digest", digest)
    app.router.add_get("/whoami", whoami)
    return app


def _request(tls: ssl.SSLSocket, head: bytes, body: bytes = b"") -> tuple[bytes, bytes]:
    tls.sendall(head + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk
        data += chunk
    head_out, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head_out.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = tls.recv(1 << 20)
        assert chunk
        rest += chunk
    return head_out, rest


def test_large_bodies_both_ways_with_flow_control(layer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {"pause_reading": 0, "pause_writing": 0}
    original_pause_reading = tlslayer._TLSConnection.pause_app_reading
    original_pause_writing = tlslayer._TLSConnection.pause_writing

    reading_paused = asyncio.Event()
    writing_paused = threading.Event()

    def pause_reading(self: Any) -> None:
        calls["pause_reading"] += 1
        original_pause_reading(self)
        reading_paused.set()

    def pause_writing(self: Any) -> None:
        calls["pause_writing"] += 1
        original_pause_writing(self)
        writing_paused.set()

    monkeypatch.setattr(tlslayer._TLSConnection, "pause_app_reading", pause_reading)
    monkeypatch.setattr(tlslayer._TLSConnection, "pause_writing", pause_writing)
    server = layer({ALPN_HTTP11: _http_app(reading_paused)})
    size = 24 * 1024 * 1024 + 123
    upload = hashlib.sha256(b"seed").digest() * (size // 32) + b"x" * (size % 32)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw,
        Client().context(["http/1.1"]).wrap_socket(raw, suppress_ragged_eofs=False) as tls,
    ):
        # Download: the server writes faster than this client reads (it has not read yet).
        tls.sendall(f"GET /big?n={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # Not reading until the server's socket buffer is full makes the pause an event, not a race.
        assert writing_paused.wait(60), "the socket's write buffer never filled: flow control untested"
        head, body = _request(tls, b"")
        assert head.startswith(b"HTTP/1.1 200")
        block = hashlib.sha256(b"block").digest() * 2048
        expected = (block * (size // len(block) + 1))[:size]
        assert len(body) == size and body == expected
        # Upload on the same keep-alive connection.
        head, body = _request(
            tls, f"POST /digest HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode(), upload
        )
        assert head.startswith(b"HTTP/1.1 200")
        assert body == (f'{{"size": {size}, "sha256": "{hashlib.sha256(upload).hexdigest()}"}}'.encode())
    assert calls["pause_writing"] > 0, "the socket's write buffer never filled: flow control untested"
    assert calls["pause_reading"] > 0, "aiohttp never paused reading: flow control untested"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_session_resumption_keeps_the_client_certificate(
    layer: Any, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    server = layer({ALPN_HTTP11: _http_app()})
    cert, key, der = self_signed_identity(tmp_path, "user")
    ctx = Client((cert, key)).context()
    ctx.minimum_version = ctx.maximum_version = version
    session = None
    results = []
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            ctx.wrap_socket(raw, session=session, suppress_ragged_eofs=False) as tls,
        ):
            _, body = _request(tls, b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            results.append((tls.session_reused, body))
            session = tls.session
    assert results[0][0] is False
    assert results[1][0] is True, "the session was not resumed"
    expected = f'{{"leaf": "{hashlib.sha256(der).hexdigest()}", "secure": true}}'.encode()
    assert results[0][1] == expected
    assert results[1][1] == expected  # a resumed session still carries the client's leaf


# ------------------------------------------------------------------ versions and suites (openssl)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def shared_coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = RunningCoordinator(tmp_path_factory.mktemp("tlslayer") / "seal")
    yield running
    running.stop()


@needs_openssl
@pytest.mark.parametrize("api", ["client", "marble"])
def test_tls12_cbc_refused_gcm_accepted_tls13_offered(
    shared_coordinator: RunningCoordinator, api: str
) -> None:
    coordinator = shared_coordinator
    port = coordinator.client_port if api == "client" else coordinator.marble_port
    cbc = s_client(port, "-brief", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
    assert cbc.returncode != 0
    assert "alert handshake failure" in cbc.stderr  # a TLS alert, not a dropped connection
    every_non_aead = "ALL:COMPLEMENTOFALL:!AESGCM:!CHACHA20:!AESCCM:!ARIAGCM@SECLEVEL=0"
    any_cbc = s_client(port, "-brief", "-tls1_2", "-cipher", every_non_aead)
    assert any_cbc.returncode != 0, any_cbc.stderr
    assert "Ciphersuite" not in any_cbc.stderr
    for suite in (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ):
        gcm = s_client(port, "-brief", "-tls1_2", "-cipher", suite)
        assert gcm.returncode == 0, gcm.stderr
        assert "Protocol version: TLSv1.2" in gcm.stderr
        assert f"Ciphersuite: {suite}" in gcm.stderr
    tls13 = s_client(port, "-brief", "-tls1_3")
    assert tls13.returncode == 0, tls13.stderr
    assert "Protocol version: TLSv1.3" in tls13.stderr
    default = s_client(port, "-brief")
    assert "Protocol version: TLSv1.3" in default.stderr  # the best version is chosen by default
    old = s_client(port, "-brief", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert old.returncode != 0
    assert "alert protocol version" in old.stderr


@needs_openssl
def test_client_api_negotiates_http11_not_h2(shared_coordinator: RunningCoordinator) -> None:
    coordinator = shared_coordinator
    offered = s_client(coordinator.client_port, "-alpn", "h2,http/1.1")
    assert offered.returncode == 0, offered.stderr
    assert "ALPN protocol: http/1.1" in offered.stdout
    only_h2 = s_client(coordinator.client_port, "-alpn", "h2")
    assert only_h2.returncode == 0, only_h2.stderr
    assert "No ALPN negotiated" in only_h2.stdout


def test_plain_http_on_the_tls_port_is_closed_and_the_listener_keeps_serving(layer: Any) -> None:
    server = layer({ALPN_HTTP11: _http_app()})
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
        raw.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := raw.recv(65536):
            data += chunk
    # Not TLS: OpenSSL gives up on the first record (no alert: it is not a TLS record) and the
    # connection is closed; aiohttp never sees the request.
    assert data == b""
    # The listener keeps serving.
    assert exchange_http_whoami(server.port) == b'{"leaf": null, "secure": true}'


def exchange_http_whoami(port: int) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        Client().context().wrap_socket(raw, suppress_ragged_eofs=False) as tls,
    ):
        _, body = _request(tls, b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    return body


def test_a_client_that_stops_reading_is_dropped(layer: Any) -> None:
    """Slow read: the response cannot be written because the client does not read; after the idle
    timeout without write progress the connection is dropped and its slot freed."""
    server = layer({ALPN_HTTP11: _http_app()}, ConnectionLimits(idle_timeout=1))
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw,
        Client().context().wrap_socket(raw, suppress_ragged_eofs=False) as tls,
    ):
        tls.sendall(f"GET /big?n={256 * 1024 * 1024} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

        async def until_dropped() -> int:
            for _ in range(600):
                if server.listener.connection_count == 0:
                    return 0
                await asyncio.sleep(0.1)
            return server.listener.connection_count

        assert server.bg.run(until_dropped()) == 0, "the connection of a client that does not read stayed"
