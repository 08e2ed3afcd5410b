"""A small gRPC server for unary calls, on HTTP/2 (``h2``) under asyncio.

It serves MarbleRun's Marble API (``/rpc.Marble/Activate``) beside our own protocol on the Marble
address; see docs/adr/0003-marblerun-grpc-marble-api.md for why it is written here on ``h2`` rather
than taken from grpcio or grpclib. What it implements of the gRPC-over-HTTP/2 protocol
(https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md):

1. A request is a stream: HEADERS ``:method POST``, ``:path /<service>/<method>``, ``content-type``
   ``application/grpc`` (or ``application/grpc+proto``), then DATA holding exactly one
   length-prefixed message (1-byte compressed flag = 0, 4-byte big-endian length, the message),
   then END_STREAM. Another method → HTTP 405; another content type → HTTP 415.
2. The answer is HEADERS ``:status 200``, ``content-type application/grpc``, DATA with one
   length-prefixed message, then trailers ``grpc-status: 0``. A failure is a *Trailers-Only*
   answer: one HEADERS frame with ``:status 200``, ``grpc-status`` and a percent-encoded
   ``grpc-message``, ending the stream.
3. Unknown paths: ``UNIMPLEMENTED``. A compressed message (we offer no ``grpc-encoding``):
   ``UNIMPLEMENTED``. Zero or more than one message, or a truncated frame: ``INVALID_ARGUMENT``.
   A message larger than the method's bound: ``RESOURCE_EXHAUSTED``, answered as soon as the bound
   is passed (the rest of the stream is not read).
4. Each stream's handler runs as its own task, so one connection can carry concurrent calls
   (at most :data:`MAX_CONCURRENT_STREAMS`, so a connection buffers at most that many bounded
   messages). Received data is acknowledged as it is consumed (flow control); answers are sent as the
   peer's flow-control windows allow. A connection with no call in progress for
   :data:`IDLE_TIMEOUT` seconds is closed with GOAWAY (a premain makes one call and leaves).
5. The handler receives the message bytes and the TLS client certificate of the connection
   (``transport.get_extra_info("peer_cert_der")``: the TLS layer puts the leaf certificate the peer
   presented *in this handshake* there; None when it presented none). It returns the answer's
   message bytes or raises a :class:`~marblekeep.errors.MarbleKeepError`, which :func:`status_of`
   maps to a gRPC status; any other exception is ``INTERNAL`` with a generic message (its text is
   never sent: it might hold data).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from marblekeep.errors import (
    ActivationRefused,
    AttestationError,
    AuthenticationError,
    AuthorizationError,
    CollateralError,
    ConflictError,
    IntegrityError,
    MarbleKeepError,
    NotFoundError,
    QuoteUnavailable,
    RequestError,
    RequestTooLarge,
    SealError,
    StateError,
    StoreError,
)

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONCURRENT_STREAMS",
    "GrpcProtocol",
    "GrpcStatus",
    "PeerCertificate",
    "UnaryMethod",
    "status_of",
]

log = logging.getLogger("marblekeep.grpc")

MAX_CONCURRENT_STREAMS = 16
IDLE_TIMEOUT = 60.0
MAX_HEADER_LIST_SIZE = 16 * 1024
_PREFIX = struct.Struct(">BI")
#: One configuration for every connection (h2 only reads it).
_H2_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=True,
    # Our own response headers are fixed and valid: skip h2's per-header checks on them.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class GrpcStatus(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


PeerCertificate = bytes | None
#: A unary handler: (request message, the peer's TLS client certificate DER) → response message.
Handler = Callable[[bytes, PeerCertificate], Awaitable[bytes]]
#: Told of every answered call: (request path, status, seconds from the request's headers).
Observer = Callable[[str, "GrpcStatus", float], None]


@dataclass(frozen=True)
class UnaryMethod:
    handler: Handler
    max_request_bytes: int


#: Error kinds and their gRPC status, first match wins (order matters: RequestTooLarge is a RequestError,
#: QuoteUnavailable an AttestationError, ConflictError a StoreError, IntegrityError a SealError).
_STATUS_OF_ERROR: tuple[tuple[type[MarbleKeepError] | tuple[type[MarbleKeepError], ...], GrpcStatus], ...] = (
    (RequestTooLarge, GrpcStatus.RESOURCE_EXHAUSTED),
    (RequestError, GrpcStatus.INVALID_ARGUMENT),
    (NotFoundError, GrpcStatus.NOT_FOUND),
    (StateError, GrpcStatus.FAILED_PRECONDITION),
    (AuthenticationError, GrpcStatus.UNAUTHENTICATED),
    ((CollateralError, QuoteUnavailable), GrpcStatus.UNAVAILABLE),
    ((ActivationRefused, AttestationError, AuthorizationError), GrpcStatus.PERMISSION_DENIED),
    (ConflictError, GrpcStatus.ABORTED),
    (IntegrityError, GrpcStatus.INTERNAL),
    ((StoreError, SealError), GrpcStatus.UNAVAILABLE),
)


def status_of(exc: MarbleKeepError) -> GrpcStatus:
    """The gRPC status for one of our errors (MarbleRun's codes where it defines them).

    Not accepting Marbles → FAILED_PRECONDITION; no client certificate → UNAUTHENTICATED; a refusal
    (unknown type, quote, package, MaxActivations, nil UUID, parameters) → PERMISSION_DENIED; a
    malformed message → INVALID_ARGUMENT (too large: RESOURCE_EXHAUSTED); the Coordinator's
    collateral or store temporarily unusable → UNAVAILABLE (retryable); damaged state → INTERNAL.
    """
    for kinds, status in _STATUS_OF_ERROR:
        if isinstance(exc, kinds):
            return status
    return GrpcStatus.INTERNAL


def _grpc_message(text: str) -> bytes:
    """Percent-encode as the gRPC spec asks (bytes outside 0x20-0x7E, and '%'); one line, bounded."""
    text = " ".join(text.split())[:2048]
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


class _Stream:
    __slots__ = ("buffer", "method", "path", "started", "task", "too_large")

    def __init__(self, path: str, method: UnaryMethod) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.method = method
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.too_large = False


class GrpcProtocol(asyncio.Protocol):
    """One HTTP/2 connection serving unary gRPC methods; build one per connection."""

    def __init__(
        self,
        methods: Mapping[str, UnaryMethod],
        *,
        observe: Observer | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._methods = methods
        self._observe = observe
        self._idle_timeout = idle_timeout
        self._idle: asyncio.TimerHandle | None = None
        self._conn = h2.connection.H2Connection(config=_H2_CONFIG)
        self._transport: asyncio.Transport | None = None
        self._peer_cert: bytes | None = None
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, tuple[memoryview, list[tuple[bytes, bytes]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        cert = transport.get_extra_info("peer_cert_der")
        self._peer_cert = bytes(cert) if cert else None
        self._conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        self._conn.initiate_connection()
        # The server preface (SETTINGS) goes out with the first answer to the client's own preface,
        # which usually arrives with the end of the TLS handshake (one TLS write instead of two);
        # at the latest on the next turn of the event loop.
        asyncio.get_running_loop().call_soon(self._flush)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("gRPC connection closed: HTTP/2 protocol error", extra={"error": type(exc).__name__})
            self._flush()
            self._close()
            return
        for event in events:
            self._on_event(event)
        self._flush()
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._streams.clear()
        self._pending.clear()

    # ------------------------------------------------------------------ events

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event.stream_id, event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event.stream_id, event.data or b"", event.flow_controlled_length or 0)
        elif isinstance(event, h2.events.StreamEnded):
            self._on_end(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.pop(event.stream_id, None)
            self._pending.pop(event.stream_id, None)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            for stream_id in list(self._pending):
                self._send_pending(stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()

    def _on_request(self, stream_id: int, raw_headers: list[tuple[bytes, bytes]]) -> None:
        headers = {bytes(k): bytes(v) for k, v in raw_headers}
        if headers.get(b":method") != b"POST":
            self._respond_http(stream_id, b"405")
            return
        content_type = headers.get(b"content-type", b"")
        if content_type != b"application/grpc" and not content_type.startswith(
            (b"application/grpc+", b"application/grpc;")
        ):
            self._respond_http(stream_id, b"415")
            return
        path = headers.get(b":path", b"").decode("latin-1")
        method = self._methods.get(path)
        if method is None:
            self._trailers_only(stream_id, GrpcStatus.UNIMPLEMENTED, f"unknown method {path[:128]}")
            self._observed(path, GrpcStatus.UNIMPLEMENTED, 0.0)
            return
        self._streams[stream_id] = _Stream(path, method)

    def _on_data(self, stream_id: int, data: bytes, flow_len: int) -> None:
        if flow_len:
            self._conn.acknowledge_received_data(flow_len, stream_id)
        stream = self._streams.get(stream_id)
        if stream is None or stream.too_large:
            return
        stream.buffer += data
        if len(stream.buffer) > stream.method.max_request_bytes + _PREFIX.size:
            stream.too_large = True
            stream.buffer.clear()
            self._observed(stream.path, GrpcStatus.RESOURCE_EXHAUSTED, time.perf_counter() - stream.started)
            self._trailers_only(
                stream_id,
                GrpcStatus.RESOURCE_EXHAUSTED,
                f"request message larger than {stream.method.max_request_bytes} bytes",
            )
            # The answer is complete: ask the client to stop sending the rest (RFC 9113 §8.1).
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _on_end(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.too_large:
            return
        message, problem = _unframe(bytes(stream.buffer))
        stream.buffer.clear()
        if message is None:
            compressed = problem.startswith("compressed")
            status = GrpcStatus.UNIMPLEMENTED if compressed else GrpcStatus.INVALID_ARGUMENT
            self._observed(stream.path, status, time.perf_counter() - stream.started)
            self._trailers_only(stream_id, status, problem)
            return
        task = asyncio.get_running_loop().create_task(self._call(stream_id, stream.method, message))
        stream.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, stream_id: int, method: UnaryMethod, message: bytes) -> None:
        try:
            answer = await method.handler(message, self._peer_cert)
        except MarbleKeepError as exc:
            self._finish(stream_id, None, status_of(exc), exc.message)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: its text might hold data, so only its type is logged
            log.error("internal error in a gRPC handler", extra={"error": type(exc).__name__})
            self._finish(stream_id, None, GrpcStatus.INTERNAL, "internal error: see the Coordinator's log")
            return
        self._finish(stream_id, answer, GrpcStatus.OK, "")

    # ------------------------------------------------------------------ idle connections

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self._closed and not self._streams and not self._tasks and not self._pending:
            self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if self._streams or self._tasks or self._pending or self._closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.close_connection()
        self._flush()
        self._close()

    # ------------------------------------------------------------------ sending

    def _finish(self, stream_id: int, answer: bytes | None, status: GrpcStatus, message: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._observed(stream.path, status, time.perf_counter() - stream.started)
        if self._closed:
            return
        try:
            if answer is None:
                self._trailers_only(stream_id, status, message)
            else:
                headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
                self._conn.send_headers(stream_id, headers)
                frame = _PREFIX.pack(0, len(answer)) + answer
                self._pending[stream_id] = (memoryview(frame), [(b"grpc-status", b"0")])
                self._send_pending(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._pending.pop(stream_id, None)  # the client went away meanwhile
        self._flush()
        task = asyncio.current_task()
        if task is not None:
            self._tasks.discard(task)  # done: it no longer keeps the connection busy
        self._arm_idle()

    def _send_pending(self, stream_id: int) -> None:
        data, trailers = self._pending[stream_id]
        try:
            while data:
                window = min(
                    self._conn.local_flow_control_window(stream_id), self._conn.max_outbound_frame_size
                )
                if window <= 0:
                    self._pending[stream_id] = (data, trailers)
                    return
                chunk, data = data[:window], data[window:]
                self._conn.send_data(stream_id, bytes(chunk))
            self._conn.send_headers(stream_id, trailers, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._pending.pop(stream_id, None)

    def _trailers_only(self, stream_id: int, status: GrpcStatus, message: str) -> None:
        headers = [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(int(status)).encode()),
        ]
        if message:
            headers.append((b"grpc-message", _grpc_message(message)))
        try:
            self._conn.send_headers(stream_id, headers, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._streams.pop(stream_id, None)

    def _observed(self, path: str, status: GrpcStatus, seconds: float) -> None:
        if self._observe is not None:
            self._observe(path, status, seconds)

    def _respond_http(self, stream_id: int, status: bytes) -> None:
        self._conn.send_headers(stream_id, [(b":status", status)], end_stream=True)

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


def _unframe(body: bytes) -> tuple[bytes | None, str]:
    """The single message of a unary request, or (None, why not)."""
    if len(body) < _PREFIX.size:
        return None, "the request holds no gRPC message (send exactly one)"
    compressed, length = _PREFIX.unpack_from(body)
    if compressed:
        return None, "compressed messages are not supported: send them uncompressed (grpc-encoding identity)"
    if _PREFIX.size + length != len(body):
        if _PREFIX.size + length < len(body):
            return None, "a unary request holds exactly one gRPC message; more data followed it"
        return None, "the gRPC message is truncated: its length prefix announces more bytes than were sent"
    return body[_PREFIX.size :], ""
