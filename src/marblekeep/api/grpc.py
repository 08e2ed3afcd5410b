"""A small gRPC server for unary calls, on HTTP/2 under asyncio.

It serves MarbleRun's Marble API (``/rpc.Marble/Activate``) beside our own protocol on the Marble
address; see docs/adr/0003-marblerun-grpc-marble-api.md for why it is written here rather than taken
from grpcio or grpclib, and docs/adr/0007-own-http2-framing-for-unary-grpc.md for why its HTTP/2
framing is our own (api/h2wire.py) rather than the ``h2`` state machine: the subset of RFC 9113 a
unary server needs, every violation a GOAWAY with its error code. What it implements of the
gRPC-over-HTTP/2 protocol
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
   peer's flow-control windows allow. A connection on which no handler works and the client sends
   nothing for :data:`IDLE_TIMEOUT` seconds is closed with GOAWAY: one with no call in progress (a
   premain makes one call and leaves), and one the client stalls (a request it never finishes, a
   flow-control window it never opens).
5. The handler receives the message bytes and the TLS client certificate of the connection
   (``transport.get_extra_info("peer_cert_der")``: the TLS layer puts the leaf certificate the peer
   presented *in this handshake* there; None when it presented none). It returns the answer's
   message bytes or raises a :class:`~marblekeep.errors.MarbleKeepError`, which :func:`status_of`
   maps to a gRPC status; any other exception is ``INTERNAL`` with a generic message (its text is
   never sent: it might hold data).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from marblekeep.api.h2wire import (
    CLIENT_PREFACE,
    DEFAULT_WINDOW,
    FRAME_HEADER,
    MAX_MAX_FRAME_SIZE,
    MAX_WINDOW,
    MIN_MAX_FRAME_SIZE,
    ErrorCode,
    Flag,
    FrameType,
    HeaderDecodeError,
    HpackDecoder,
    Setting,
    encode_literal,
    frame,
)
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
    "MAX_CLIENT_RESETS",
    "MAX_CONCURRENT_STREAMS",
    "MAX_CONTROL_FRAMES",
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
    __slots__ = (
        "buffer",
        "method",
        "path",
        "recv_window",
        "remote_closed",
        "send_window",
        "started",
        "task",
        "too_large",
    )

    def __init__(self, path: str, method: UnaryMethod, send_window: int) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.method = method
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.too_large = False
        self.remote_closed = False
        self.send_window = send_window
        self.recv_window = DEFAULT_WINDOW


class _ConnectionError(Exception):
    """A connection error (RFC 9113 §5.4.1): answered with GOAWAY carrying ``code``, then closed."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code
        self.why = why


#: Our SETTINGS: at most MAX_CONCURRENT_STREAMS streams, header lists up to MAX_HEADER_LIST_SIZE;
#: windows and frame sizes stay at the protocol's defaults (64 KiB - 1, 16 KiB).
_SETTINGS = frame(
    FrameType.SETTINGS,
    0,
    0,
    struct.pack(
        ">HLHL",
        Setting.MAX_CONCURRENT_STREAMS,
        MAX_CONCURRENT_STREAMS,
        Setting.MAX_HEADER_LIST_SIZE,
        MAX_HEADER_LIST_SIZE,
    ),
)
_SETTINGS_ACK = frame(FrameType.SETTINGS, Flag.ACK, 0)
#: ``:status 200`` (static index 8) and ``content-type: application/grpc`` (name: static index 31).
_RESPONSE_HEADERS = b"\x88" + encode_literal(31, b"application/grpc")
_TRAILERS_OK = encode_literal(b"grpc-status", b"0")
#: The largest header block accepted, HEADERS and CONTINUATION frames together.
MAX_HEADER_BLOCK = 2 * MAX_HEADER_LIST_SIZE
#: Frames that oblige us to answer (PING, SETTINGS) or streams the client resets, accepted between two
#: new streams; beyond it the connection is closed with ENHANCE_YOUR_CALM (floods, rapid reset).
MAX_CONTROL_FRAMES = 100
#: Streams in progress that the client may reset on one connection (each may have started work).
MAX_CLIENT_RESETS = 2 * MAX_CONCURRENT_STREAMS
_FRAME_HEADER_SIZE = FRAME_HEADER.size
_U32 = struct.Struct(">L")
_GOAWAY = struct.Struct(">LL")


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
        self._transport: asyncio.Transport | None = None
        self._peer_cert: bytes | None = None
        self._decoder = HpackDecoder(max_list_size=MAX_HEADER_LIST_SIZE)
        self._in = bytearray()
        self._out = bytearray()
        self._preface_seen = False
        self._settings_seen = False
        #: (stream id, END_STREAM set on its HEADERS, the block so far) while CONTINUATION is due.
        self._continuation: tuple[int, bool, bytearray] | None = None
        self._last_stream = 0
        self._streams: dict[int, _Stream] = {}
        self._pending: dict[int, tuple[memoryview, bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._send_window = DEFAULT_WINDOW
        self._recv_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = MIN_MAX_FRAME_SIZE
        self._control_frames = 0
        self._client_resets = 0
        self._goaway_received = False
        self._closed = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        cert = transport.get_extra_info("peer_cert_der")
        self._peer_cert = bytes(cert) if cert else None
        self._out += _SETTINGS
        # The server preface (SETTINGS) goes out with the first answer to the client's own preface,
        # which usually arrives with the end of the TLS handshake (one TLS write instead of two);
        # at the latest on the next turn of the event loop.
        asyncio.get_running_loop().call_soon(self._flush)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._in += data
        try:
            self._receive()
        except _ConnectionError as exc:
            log.info("gRPC connection closed: HTTP/2 protocol error", extra={"error": exc.why})
            self._out += frame(FrameType.GOAWAY, 0, 0, _GOAWAY.pack(self._last_stream, exc.code))
            self._flush()
            self._close()
            return
        except HeaderDecodeError as exc:
            log.info("gRPC connection closed: HTTP/2 protocol error", extra={"error": str(exc)})
            self._out += frame(
                FrameType.GOAWAY, 0, 0, _GOAWAY.pack(self._last_stream, ErrorCode.COMPRESSION_ERROR)
            )
            self._flush()
            self._close()
            return
        self._flush()
        if self._goaway_received and not self._busy():
            self._close()
            return
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._streams.clear()
        self._pending.clear()

    # ------------------------------------------------------------------ frames in

    def _receive(self) -> None:
        buf = self._in
        pos = 0
        if not self._preface_seen:
            size = len(CLIENT_PREFACE)
            if buf[: min(len(buf), size)] != CLIENT_PREFACE[: min(len(buf), size)]:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface")
            if len(buf) < size:
                return
            self._preface_seen = True
            pos = size
        end = len(buf)
        try:
            while end - pos >= _FRAME_HEADER_SIZE:
                high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buf, pos)
                length = (high << 8) | low
                if length > MIN_MAX_FRAME_SIZE:  # our SETTINGS_MAX_FRAME_SIZE is the default
                    raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "frame larger than 16 KiB")
                if end - pos - _FRAME_HEADER_SIZE < length:
                    break
                start = pos + _FRAME_HEADER_SIZE
                pos = start + length
                self._on_frame(kind, flags, stream_id & 0x7FFFFFFF, bytes(buf[start:pos]))
                if self._closed:
                    return
        finally:
            del buf[:pos]

    def _on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and (
            kind != FrameType.CONTINUATION or stream_id != self._continuation[0]
        ):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "expected a CONTINUATION frame")
        if not self._settings_seen:
            if kind != FrameType.SETTINGS or flags & Flag.ACK:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "the client preface lacks SETTINGS")
            self._settings_seen = True
        if kind == FrameType.DATA:
            self._on_data(flags, stream_id, payload)
        elif kind == FrameType.HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif kind == FrameType.CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif kind == FrameType.SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == FrameType.WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == FrameType.PING:
            if stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING of a wrong size")
            if not flags & Flag.ACK:
                self._count_control_frame()
                self._out += frame(FrameType.PING, Flag.ACK, 0, payload)
        elif kind == FrameType.RST_STREAM:
            if not stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM of a wrong size")
            if stream_id > self._last_stream:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self._count_control_frame()
            if stream_id in self._streams:
                self._client_resets += 1
                if self._client_resets > MAX_CLIENT_RESETS:  # "rapid reset": work started, then abandoned
                    raise _ConnectionError(
                        ErrorCode.ENHANCE_YOUR_CALM, "too many streams reset by the client"
                    )
            self._drop_stream(stream_id)
        elif kind == FrameType.PRIORITY:
            if not stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY of a wrong size")
        elif kind == FrameType.GOAWAY:
            if stream_id:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            self._goaway_received = True
        elif kind == FrameType.PUSH_PROMISE:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Frames of unknown types are ignored (RFC 9113 §4.1).

    def _count_control_frame(self) -> None:
        self._control_frames += 1
        if self._control_frames > MAX_CONTROL_FRAMES:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "too many control frames or resets")

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> tuple[int, int]:
        """(start, end) of a frame's content once its padding is removed."""
        if not flags & Flag.PADDED:
            return 0, len(payload)
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding longer than its frame")
        return 1, len(payload) - payload[0]

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id or not stream_id % 2:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0 or a server stream id")
        start, end = self._unpad(flags, payload)
        if flags & Flag.PRIORITY:
            start += 5
            if start > end:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
        block = payload[start:end]
        end_stream = bool(flags & Flag.END_STREAM)
        if flags & Flag.END_HEADERS:
            self._on_header_block(stream_id, end_stream, block)
        else:
            self._continuation = (stream_id, end_stream, bytearray(block))

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is None:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        _, end_stream, block = self._continuation
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & Flag.END_HEADERS:
            self._continuation = None
            self._on_header_block(stream_id, end_stream, bytes(block))

    def _on_header_block(self, stream_id: int, end_stream: bool, block: bytes) -> None:
        # Decoded whatever becomes of the stream: the decoder's table must follow the client's.
        fields = self._decoder.decode(block)
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client: they must end its side of the stream
            if not end_stream or stream.remote_closed:
                self._reset(stream_id, ErrorCode.PROTOCOL_ERROR)
                return
            self._on_end(stream_id, stream)
            return
        if stream_id <= self._last_stream:
            self._out += frame(FrameType.RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.STREAM_CLOSED))
            return
        self._last_stream = stream_id
        self._control_frames = 0
        if self._goaway_received:
            return
        if len(self._streams) >= MAX_CONCURRENT_STREAMS:
            self._out += frame(FrameType.RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.REFUSED_STREAM))
            return
        self._on_request(stream_id, end_stream, fields)

    def _on_request(self, stream_id: int, end_stream: bool, fields: list[tuple[bytes, bytes]]) -> None:
        method_name = path_raw = None
        content_type = b""
        for name, value in fields:
            if name == b":method":
                method_name = value
            elif name == b":path":
                path_raw = value
            elif name == b"content-type":
                content_type = value
        if method_name is None or path_raw is None:
            self._reset(stream_id, ErrorCode.PROTOCOL_ERROR)  # a malformed request (RFC 9113 §8.1.1)
            return
        if method_name != b"POST":
            self._respond_http(stream_id, b"405")
            return
        if content_type != b"application/grpc" and not content_type.startswith(
            (b"application/grpc+", b"application/grpc;")
        ):
            self._respond_http(stream_id, b"415")
            return
        path = path_raw.decode("latin-1")
        method = self._methods.get(path)
        if method is None:
            self._trailers_only(stream_id, GrpcStatus.UNIMPLEMENTED, f"unknown method {path[:128]}")
            self._observed(path, GrpcStatus.UNIMPLEMENTED, 0.0)
            return
        stream = _Stream(path, method, self._peer_initial_window)
        self._streams[stream_id] = stream
        if end_stream:
            self._on_end(stream_id, stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if stream_id > self._last_stream:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
        length = len(payload)  # padding counts for flow control
        self._recv_window -= length
        if self._recv_window < 0:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        if self._recv_window < DEFAULT_WINDOW // 2:
            self._out += frame(FrameType.WINDOW_UPDATE, 0, 0, _U32.pack(DEFAULT_WINDOW - self._recv_window))
            self._recv_window = DEFAULT_WINDOW
        start, end = self._unpad(flags, payload)
        stream = self._streams.get(stream_id)
        if stream is None or stream.too_large:
            return  # a stream already answered (or reset): its data is dropped
        if stream.remote_closed:
            self._reset(stream_id, ErrorCode.STREAM_CLOSED)
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            self._reset(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
            return
        stream.buffer += payload[start:end]
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
            self._out += frame(FrameType.RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.NO_ERROR))
            return
        if flags & Flag.END_STREAM:
            self._on_end(stream_id, stream)
        elif stream.recv_window < DEFAULT_WINDOW // 2:
            self._out += frame(
                FrameType.WINDOW_UPDATE, 0, stream_id, _U32.pack(DEFAULT_WINDOW - stream.recv_window)
            )
            stream.recv_window = DEFAULT_WINDOW

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS of a wrong size")
        self._count_control_frame()
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, offset)
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "initial window size too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == Setting.MAX_FRAME_SIZE:
                if not MIN_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "maximum frame size out of range")
                self._peer_max_frame = value
            elif key == Setting.ENABLE_PUSH and value > 1:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            # HEADER_TABLE_SIZE bounds the client's decoder table, which our answers never use;
            # MAX_CONCURRENT_STREAMS and MAX_HEADER_LIST_SIZE do not concern a server of unary calls.
        self._out += _SETTINGS_ACK
        self._send_all_pending()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE of a wrong size")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._send_all_pending()
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # a closed stream: allowed, ignored
        if not increment:
            self._reset(stream_id, ErrorCode.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
            return
        if stream_id in self._pending:
            self._send_pending(stream_id)

    def _on_end(self, stream_id: int, stream: _Stream) -> None:
        stream.remote_closed = True
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

    def _busy(self) -> bool:
        return bool(self._streams or self._tasks or self._pending)

    def _arm_idle(self) -> None:
        """(Re)start the idle timer: it runs whenever no handler is working, so a connection whose
        client neither sends nor lets us send (an unfinished request, a zero flow-control window)
        is closed after the idle timeout as well as one with nothing in progress."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self._closed and not self._tasks:
            self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if self._tasks or self._closed:
            return
        if self._streams or self._pending:
            log.info("gRPC connection closed: the client stalled a call", extra={"error": "idle timeout"})
        self._out += frame(FrameType.GOAWAY, 0, 0, _GOAWAY.pack(self._last_stream, ErrorCode.NO_ERROR))
        self._flush()
        self._close()

    # ------------------------------------------------------------------ frames out

    def _finish(self, stream_id: int, answer: bytes | None, status: GrpcStatus, message: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._observed(stream.path, status, time.perf_counter() - stream.started)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.discard(task)  # done: it no longer keeps the connection busy
        if self._closed or stream is None:  # the client went away or reset the stream meanwhile
            self._streams.pop(stream_id, None)
            return
        if answer is None:
            self._trailers_only(stream_id, status, message)
        else:
            self._out += frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id, _RESPONSE_HEADERS)
            self._pending[stream_id] = (memoryview(_PREFIX.pack(0, len(answer)) + answer), _TRAILERS_OK)
            self._send_pending(stream_id)
        self._flush()
        if self._goaway_received and not self._busy():
            self._close()
            return
        self._arm_idle()

    def _send_all_pending(self) -> None:
        for stream_id in list(self._pending):
            self._send_pending(stream_id)

    def _send_pending(self, stream_id: int) -> None:
        data, trailers = self._pending[stream_id]
        stream = self._streams[stream_id]
        while data:
            window = min(self._send_window, stream.send_window, self._peer_max_frame)
            if window <= 0:
                self._pending[stream_id] = (data, trailers)
                return
            chunk, data = data[:window], data[window:]
            self._out += frame(FrameType.DATA, 0, stream_id, bytes(chunk))
            self._send_window -= len(chunk)
            stream.send_window -= len(chunk)
        self._out += frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, stream_id, trailers)
        del self._pending[stream_id]
        self._streams.pop(stream_id, None)

    def _trailers_only(self, stream_id: int, status: GrpcStatus, message: str) -> None:
        block = _RESPONSE_HEADERS + encode_literal(b"grpc-status", str(int(status)).encode())
        if message:
            block += encode_literal(b"grpc-message", _grpc_message(message))
        self._out += frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, stream_id, block)
        # Answered: DATA the client still sends on it is dropped (its stream id is below the last).
        self._streams.pop(stream_id, None)

    def _observed(self, path: str, status: GrpcStatus, seconds: float) -> None:
        if self._observe is not None:
            self._observe(path, status, seconds)

    def _respond_http(self, stream_id: int, status: bytes) -> None:
        block = encode_literal(8, status)  # ``:status`` (static index 8) with another value
        self._out += frame(FrameType.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, stream_id, block)

    def _reset(self, stream_id: int, code: int) -> None:
        self._out += frame(FrameType.RST_STREAM, 0, stream_id, _U32.pack(code))
        self._drop_stream(stream_id)

    def _drop_stream(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        self._pending.pop(stream_id, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()

    def _flush(self) -> None:
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(bytes(self._out))
        self._out.clear()

    def _close(self) -> None:
        self._closed = True
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
