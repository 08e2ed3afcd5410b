"""MarbleRun-protocol test support: Marbles built as MarbleRun's premain builds them, a grpcio client,
and gRPC endpoints serving marblekeep's ``rpc.Marble/Activate`` from an in-process Coordinator.

Two endpoints:

- ``tls``: the Coordinator's own Marble listener (the TLS layer, ALPN ``h2``): the Marble presents its
  self-signed certificate, which nobody registered, exactly as a MarbleRun premain does;
- ``h2c``: the production :func:`marblekeep.api.server.grpc_protocol_factory` over plaintext HTTP/2
  (prior knowledge), behind a small transport wrapper that answers ``get_extra_info("peer_cert_der")``
  with :attr:`GrpcEndpoints.h2c_peer_cert` (what the TLS layer provides in production).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from harness import RunningCoordinator, free_port
from marble.marblerun_support import MarbleRunMarble, PbActivationResp
from marblekeep.api.server import MARBLERUN_ACTIVATE_PATH, grpc_protocol_factory

MAX_VALIDITY = dt.timedelta(days=365 * 292)


# --------------------------------------------------------------------------- a MarbleRun-style Marble


@dataclass(frozen=True)
class Activated:
    files: dict[str, bytes]
    env: dict[str, bytes]
    argv: tuple[str, ...]


def parse_response(data: bytes) -> Activated:
    resp = PbActivationResp.FromString(data)
    p = resp.Parameters
    return Activated(dict(p.Files), dict(p.Env), tuple(p.Argv))


class RpcFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# --------------------------------------------------------------------------- endpoints


class PeerCertTransport(asyncio.Transport):
    """Delegates to the real transport; answers ``peer_cert_der`` as the TLS layer does."""

    def __init__(self, inner: asyncio.Transport, cert: bytes | None) -> None:
        super().__init__()
        self._inner = inner
        self._cert = cert

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peer_cert_der":
            return self._cert
        return self._inner.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()


class InjectingProtocol(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, cert_of: Callable[[asyncio.Transport], bytes | None]) -> None:
        self._inner = inner
        self._cert_of = cert_of

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._inner.connection_made(PeerCertTransport(transport, self._cert_of(transport)))

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GrpcEndpoints:
    """gRPC endpoints (TLS and h2c) of a :class:`RunningCoordinator`."""

    def __init__(self, running: RunningCoordinator) -> None:
        self.running = running
        self.h2c_peer_cert: bytes | None = None
        self.server_ca_pem = running.coord.deployment.ca.root.cert_pem
        self.tls_port = running.marble_port
        factory = grpc_protocol_factory(running.coord, running.listeners.metrics)
        self.h2c_port = free_port()

        async def start() -> list[asyncio.Server]:
            h2c = await asyncio.get_running_loop().create_server(
                lambda: InjectingProtocol(factory(), lambda _t: self.h2c_peer_cert),
                "127.0.0.1",
                self.h2c_port,
            )
            return [h2c]

        self._servers = running.run(start())

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for server in self._servers:
                await server.wait_closed()

        self.running.run(close())

    @contextmanager
    def tls_channel(self, marble: MarbleRunMarble | None) -> Iterator[grpc.Channel]:
        """A grpcio channel over TLS presenting ``marble``'s certificate (None: no certificate)."""
        if marble is not None:
            creds = grpc.ssl_channel_credentials(self.server_ca_pem, marble.key_pem, marble.cert_pem)
        else:
            creds = grpc.ssl_channel_credentials(self.server_ca_pem)
        options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
        channel = grpc.secure_channel(f"127.0.0.1:{self.tls_port}", creds, options=options)
        try:
            yield channel
        finally:
            channel.close()

    @contextmanager
    def h2c_channel(self) -> Iterator[grpc.Channel]:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{self.h2c_port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        try:
            yield channel
        finally:
            channel.close()


def call(channel: grpc.Channel, request: bytes, path: str = MARBLERUN_ACTIVATE_PATH) -> bytes:
    """One unary call with raw bytes; raises :class:`RpcFailed` with the status and details."""
    stub = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        return bytes(stub(request, timeout=60))
    except grpc.RpcError as exc:
        raise RpcFailed(exc.code(), exc.details() or "") from None  # type: ignore[attr-defined]


def activate_tls(endpoints: GrpcEndpoints, marble: MarbleRunMarble, marble_type: str, **kw: Any) -> Activated:
    with endpoints.tls_channel(marble) as channel:
        return parse_response(call(channel, marble.request(marble_type, **kw)))
