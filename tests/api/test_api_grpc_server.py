"""The unary gRPC server (api/grpc.py) with test handlers, over h2c on loopback: grpcio as the client
for well-formed calls (flow control, concurrency, statuses), a raw ``h2`` client for what grpcio
never sends (compressed or several messages, other methods and content types)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_support import InjectingProtocol, RpcFailed, call

from marblekeep.api.grpc import GrpcProtocol, GrpcStatus, UnaryMethod, status_of
from marblekeep.errors import (
    ActivationRefused,
    AuthenticationError,
    CollateralError,
    IntegrityError,
    QuoteUnavailable,
    RequestError,
    RequestTooLarge,
    StateError,
    StoreError,
)

SECRET = "s3cr3t-value-never-sent"


class Server:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.seen_certs: list[bytes | None] = []
        self.observed: list[tuple[str, GrpcStatus]] = []
        self.peer_cert: bytes | None = b"peer-certificate-der"

        async def echo(message: bytes, cert: bytes | None) -> bytes:
            self.seen_certs.append(cert)
            await asyncio.sleep(0)
            return message * 5  # larger than the request: exercises the send windows

        async def fail(message: bytes, cert: bytes | None) -> bytes:
            raise {
                b"state": StateError("not accepting"),
                b"auth": AuthenticationError("no certificate"),
                b"refused": ActivationRefused("refused: why"),
                b"bad": RequestError("bad field"),
            }[message]

        async def bug(message: bytes, cert: bytes | None) -> bytes:
            raise ValueError(SECRET)

        methods = {
            "/t.S/Echo": UnaryMethod(echo, 512 * 1024),
            "/t.S/Fail": UnaryMethod(fail, 1024),
            "/t.S/Bug": UnaryMethod(bug, 1024),
        }

        def observe(path: str, status: GrpcStatus, seconds: float) -> None:
            self.observed.append((path, status))

        async def start() -> asyncio.Server:
            return await self.loop.create_server(
                lambda: InjectingProtocol(GrpcProtocol(methods, observe=observe), lambda _t: self.peer_cert),
                "127.0.0.1",
                0,
            )

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.stop()


def test_large_messages_both_ways_respect_flow_control(server: Server) -> None:
    message = bytes(range(256)) * 1000  # 256 000 bytes in, 1 280 000 out
    with server.channel() as channel:
        assert call(channel, message, "/t.S/Echo") == message * 5
    assert server.seen_certs == [b"peer-certificate-der"]
    assert server.observed == [("/t.S/Echo", GrpcStatus.OK)]


def test_concurrent_calls_on_one_connection(server: Server) -> None:
    with server.channel() as channel, concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: call(channel, bytes([i]) * 20_000, "/t.S/Echo"), range(64)))
    assert answers == [bytes([i]) * 100_000 for i in range(64)]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (b"state", grpc.StatusCode.FAILED_PRECONDITION),
        (b"auth", grpc.StatusCode.UNAUTHENTICATED),
        (b"refused", grpc.StatusCode.PERMISSION_DENIED),
        (b"bad", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_errors_become_statuses_with_their_messages(
    server: Server, request_: bytes, code: grpc.StatusCode
) -> None:
    with server.channel() as channel, pytest.raises(RpcFailed) as info:
        call(channel, request_, "/t.S/Fail")
    assert info.value.code is code
    assert (
        info.value.details
        == {
            b"state": "not accepting",
            b"auth": "no certificate",
            b"refused": "refused: why",
            b"bad": "bad field",
        }[request_]
    )


def test_a_bug_is_internal_without_its_text(server: Server) -> None:
    with server.channel() as channel, pytest.raises(RpcFailed) as info:
        call(channel, b"x", "/t.S/Bug")
    assert info.value.code is grpc.StatusCode.INTERNAL
    assert SECRET not in info.value.details and "internal error" in info.value.details


def test_unknown_method_and_oversized_message(server: Server) -> None:
    with server.channel() as channel:
        with pytest.raises(RpcFailed) as info:
            call(channel, b"x", "/t.S/Nope")
        assert info.value.code is grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(RpcFailed) as info:
            call(channel, bytes(2000), "/t.S/Fail")
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than 1024 bytes" in info.value.details
        assert call(channel, b"ok", "/t.S/Echo") == b"ok" * 5  # the connection is still usable


def test_status_mapping_of_every_error_family() -> None:
    assert status_of(CollateralError("expired")) is GrpcStatus.UNAVAILABLE
    assert status_of(QuoteUnavailable("quoting failed")) is GrpcStatus.UNAVAILABLE
    assert status_of(StoreError("down")) is GrpcStatus.UNAVAILABLE
    assert status_of(IntegrityError("damaged")) is GrpcStatus.INTERNAL
    assert status_of(RequestTooLarge("big")) is GrpcStatus.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- a raw HTTP/2 client


def raw_call(port: int, headers: list[tuple[str, str]], body: bytes) -> dict[str, Any]:
    """One request on a fresh connection; returns the response headers (and trailers) merged."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers)
        conn.send_data(stream, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        result: dict[str, Any] = {"data": b""}
        while True:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the stream ended"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    result.update(dict(event.headers or []))
                elif isinstance(event, h2.events.DataReceived):
                    result["data"] += event.data or b""
                    conn.acknowledge_received_data(event.flow_controlled_length or 0, stream)
                elif isinstance(event, h2.events.StreamEnded):
                    return result
            sock.sendall(conn.data_to_send())


def _headers(
    method: str = "POST", path: str = "/t.S/Echo", content_type: str = "application/grpc"
) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":scheme", "http"),
        (":authority", "localhost"),
        (":path", path),
        ("content-type", content_type),
        ("te", "trailers"),
    ]


def frame(message: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BI", compressed, len(message)) + message


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (frame(b"a") + frame(b"b"), "3", "exactly one gRPC message"),
        (frame(b"abc")[:-1], "3", "truncated"),
        (b"", "3", "no gRPC message"),
        (frame(b"abc", compressed=1), "12", "compressed messages are not supported"),
    ],
)
def test_framing_errors(server: Server, body: bytes, status: str, detail: str) -> None:
    answer = raw_call(server.port, _headers(), body)
    assert answer[":status"] == "200" and answer["grpc-status"] == status
    assert detail.replace(" ", "%20") in answer["grpc-message"] or detail in answer["grpc-message"]


def test_other_http_methods_and_content_types(server: Server) -> None:
    assert raw_call(server.port, _headers(method="PUT"), b"")[":status"] == "405"
    assert raw_call(server.port, _headers(content_type="application/json"), b"{}")[":status"] == "415"
    ok = raw_call(server.port, _headers(content_type="application/grpc+proto"), frame(b"hi"))
    assert ok["grpc-status"] == "0" and ok["data"] == frame(b"hi" * 5)


def test_an_idle_connection_is_closed_with_goaway() -> None:
    async def echo(message: bytes, cert: bytes | None) -> bytes:
        return message

    async def scenario() -> list[type]:
        methods = {"/t.S/Echo": UnaryMethod(echo, 1024)}
        server = await asyncio.get_running_loop().create_server(
            lambda: GrpcProtocol(methods, idle_timeout=0.2), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        seen: list[type] = []
        while True:  # the server closes the connection after the idle timeout
            data = await asyncio.wait_for(reader.read(65536), timeout=30)
            if not data:
                break
            seen.extend(type(e) for e in conn.receive_data(data))
            writer.write(conn.data_to_send())
        writer.close()
        server.close()
        await server.wait_closed()
        return seen

    assert h2.events.ConnectionTerminated in asyncio.run(scenario())
