"""The gRPC server's own HTTP/2 layer (api/h2wire.py, api/grpc.py): HPACK decoding against RFC 7541's
examples and against an independent encoder (the ``hpack`` package), and the connection's handling of
what a hostile or unusual client sends: every protocol violation ends in GOAWAY with the right error
code and a closed connection, never an exception; floods are cut off; flow control is enforced.

The connection tests drive one :class:`GrpcProtocol` in memory (bytes in, bytes out) and read what it
writes with ``h2`` as an independent client, so the server's frames are checked by another
implementation."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marblekeep.api.grpc import (
    MAX_CLIENT_RESETS,
    MAX_CONCURRENT_STREAMS,
    MAX_CONTROL_FRAMES,
    GrpcProtocol,
    UnaryMethod,
)
from marblekeep.api.h2wire import (
    CLIENT_PREFACE,
    ErrorCode,
    FrameType,
    HeaderDecodeError,
    HpackDecoder,
    encode_literal,
    frame,
)

PATH = "/t.S/Echo"


# --------------------------------------------------------------------------- HPACK


RFC7541_C3 = [  # requests without Huffman coding, one connection
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
RFC7541_C4 = [  # the same requests with Huffman coding
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
RFC7541_DECODED = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", b"www.example.com"),
        (b"cache-control", b"no-cache"),
    ],
    [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/index.html"),
        (b":authority", b"www.example.com"),
        (b"custom-key", b"custom-value"),
    ],
]


@pytest.mark.parametrize("blocks", [RFC7541_C3, RFC7541_C4], ids=["raw", "huffman"])
def test_hpack_decodes_the_rfc_examples_with_their_dynamic_table(blocks: list[str]) -> None:
    decoder = HpackDecoder()
    for block, expected in zip(blocks, RFC7541_DECODED, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == expected
    assert decoder._size == 164  # RFC 7541 C.3.3 / C.4.3: the table holds 164 octets


_names = st.sampled_from([b":path", b"content-type", b"user-agent", b"x-a", b"grpc-timeout", b"te"])
_values = st.binary(max_size=60) | st.sampled_from(
    [b"application/grpc", b"/rpc.Marble/Activate", b"trailers"]
)
_header_lists = st.lists(
    st.lists(st.tuples(_names, _values), min_size=1, max_size=12), min_size=1, max_size=8
)


@settings(max_examples=200, deadline=None)
@given(blocks=_header_lists, huffman=st.booleans(), table_size=st.sampled_from([0, 64, 256, 4096]))
def test_hpack_decodes_what_an_independent_encoder_writes(
    blocks: list[list[tuple[bytes, bytes]]], huffman: bool, table_size: int
) -> None:
    encoder = hpack.Encoder()
    encoder.header_table_size = table_size  # a dynamic table size update in the next block
    decoder = HpackDecoder()
    for fields in blocks:
        assert decoder.decode(encoder.encode(fields, huffman=huffman)) == fields


@pytest.mark.parametrize(
    ("block", "why"),
    [
        (b"\x80", "index 0"),
        (b"\xff\x00", "out of range"),  # 127: beyond the static table, empty dynamic table
        (b"\x40\x05ab", "longer than its header block"),
        (b"\x3f\xe2\x1f", "above the announced limit"),  # table size update to 4096 + 1
        (b"\x82\x20", "after a header field"),
        (b"\x7f\xff\xff\xff\xff\xff\x01", "integer too large"),
        (b"\x40\x81\xff", "Huffman"),  # a Huffman string that is all padding (EOS)
    ],
)
def test_hpack_refuses_malformed_blocks(block: bytes, why: str) -> None:
    with pytest.raises(HeaderDecodeError) as caught:
        HpackDecoder().decode(block)
    assert why.rsplit(maxsplit=1)[-1].lower() in str(caught.value).lower() or why in str(caught.value)


def test_hpack_bounds_the_decoded_header_list() -> None:
    decoder = HpackDecoder(max_list_size=100)
    with pytest.raises(HeaderDecodeError, match="larger than 100 bytes"):
        decoder.decode(hpack.Encoder().encode([(b"x-big", b"v" * 80)]))


def test_literal_encoding_round_trips_through_an_independent_decoder() -> None:
    block = b"\x88" + encode_literal(31, b"application/grpc") + encode_literal(b"grpc-message", b"m" * 300)
    assert hpack.Decoder().decode(block, raw=True) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-message", b"m" * 300),
    ]


# --------------------------------------------------------------------------- one connection in memory


class Wire(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return b"peer-cert" if name == "peer_cert_der" else default

    def write(self, data: Any) -> None:
        assert not self.closed, "wrote after closing"
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


Handler = Callable[[bytes, bytes | None], Awaitable[bytes]]


async def _echo(message: bytes, cert: bytes | None) -> bytes:
    return message + b"!"


class Peer:
    """A client on h2 talking to a GrpcProtocol in memory; ``raw`` frames can be injected."""

    def __init__(self, handler: Handler = _echo, max_request: int = 1 << 20, idle: float = 60) -> None:
        self.proto = GrpcProtocol({PATH: UnaryMethod(handler, max_request)}, idle_timeout=idle)
        self.wire = Wire()
        self.proto.connection_made(self.wire)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.events: list[h2.events.Event] = []

    def send(self, data: bytes | None = None) -> None:
        self.proto.data_received(self.client.data_to_send() if data is None else data)

    async def settle(self) -> list[h2.events.Event]:
        for _ in range(5):  # handler tasks, deferred flushes
            await asyncio.sleep(0)
        data = bytes(self.wire.out)
        self.wire.out.clear()
        if data:
            self.events += self.client.receive_data(data)
        return self.events

    def request(self, body: bytes, stream_id: int | None = None, **headers: str) -> int:
        stream = stream_id or self.client.get_next_available_stream_id()
        fields = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", PATH),
            (":authority", "localhost:2001"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *headers.items(),
        ]
        self.client.send_headers(stream, fields)
        self.client.send_data(stream, struct.pack(">BI", 0, len(body)) + body, end_stream=True)
        return stream

    def answers(self) -> dict[int, tuple[bytes, dict[bytes, bytes]]]:
        out: dict[int, tuple[bytes, dict[bytes, bytes]]] = {}
        for e in self.events:
            if isinstance(e, h2.events.DataReceived):
                data, hdrs = out.get(e.stream_id, (b"", {}))
                out[e.stream_id] = (data + (e.data or b""), hdrs)
            elif isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived):
                data, hdrs = out.get(e.stream_id, (b"", {}))
                out[e.stream_id] = (data, {**hdrs, **dict(e.headers or [])})
        return out

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return found[0] if found else None


def read_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The frames the server wrote, parsed independently of it: (type, flags, stream, payload)."""
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        stream = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, stream, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    assert pos == len(data), "a truncated frame"
    return out


def raw_answers(data: bytes) -> tuple[dict[int, tuple[bytes, dict[bytes, bytes]]], list[int], dict[int, int]]:
    """(stream → (DATA, headers and trailers)), GOAWAY codes, (stream → RST_STREAM code)."""
    decoder = hpack.Decoder()
    answers: dict[int, tuple[bytes, dict[bytes, bytes]]] = {}
    goaways: list[int] = []
    resets: dict[int, int] = {}
    for kind, _flags, stream, payload in read_frames(data):
        body, hdrs = answers.get(stream, (b"", {}))
        if kind == FrameType.DATA:
            answers[stream] = (body + payload, hdrs)
        elif kind == FrameType.HEADERS:
            answers[stream] = (body, {**hdrs, **dict(decoder.decode(payload, raw=True))})
        elif kind == FrameType.GOAWAY:
            goaways.append(int.from_bytes(payload[4:8], "big"))
        elif kind == FrameType.RST_STREAM:
            resets[stream] = int.from_bytes(payload, "big")
    return answers, goaways, resets


async def raw_exchange(
    raw: bytes, handler: Handler = _echo, max_request: int = 1 << 20
) -> tuple[Peer, dict[int, tuple[bytes, dict[bytes, bytes]]], list[int], dict[int, int]]:
    """Feed ``raw`` to a fresh connection; what it answered, parsed with :func:`raw_answers`."""
    peer = Peer(handler, max_request)
    peer.proto.data_received(raw)
    for _ in range(5):
        await asyncio.sleep(0)
    return (peer, *raw_answers(bytes(peer.wire.out)))


def _run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def test_requests_on_one_connection_share_the_decoders_dynamic_table() -> None:
    async def scenario() -> None:
        peer = Peer()
        peer.send()
        first = peer.request(b"one")
        peer.send()
        await peer.settle()
        second = peer.request(b"two")  # h2's encoder now refers to the first request's indexed fields
        peer.send()
        await peer.settle()
        answers = peer.answers()
        assert answers[first][0] == struct.pack(">BI", 0, 4) + b"one!"
        assert answers[second][0] == struct.pack(">BI", 0, 4) + b"two!"
        assert answers[second][1][b"grpc-status"] == b"0"
        assert not peer.wire.closed

    _run(scenario())


def test_ping_is_answered_with_its_payload() -> None:
    async def scenario() -> None:
        peer = Peer()
        peer.client.ping(b"12345678")
        peer.send()
        events = await peer.settle()
        acks = [e for e in events if isinstance(e, h2.events.PingAckReceived)]
        assert [a.ping_data for a in acks] == [b"12345678"]

    _run(scenario())


def _settings() -> bytes:
    return CLIENT_PREFACE + frame(FrameType.SETTINGS, 0, 0)


def _headers_block(path: str = PATH) -> bytes:
    return hpack.Encoder().encode(
        [(":method", "POST"), (":scheme", "https"), (":path", path), ("content-type", "application/grpc")]
    )


def test_continuation_padding_and_priority_are_understood() -> None:
    async def scenario() -> None:
        block = _headers_block()
        half = len(block) // 2
        message = struct.pack(">BI", 0, 2) + b"hi"
        priority = b"\x00\x00\x00\x00\x10"
        raw = (
            _settings()
            # HEADERS with PRIORITY and PADDED, without END_HEADERS; then CONTINUATION
            + frame(FrameType.HEADERS, 0x20 | 0x08, 1, b"\x03" + priority + block[:half] + b"\x00" * 3)
            + frame(FrameType.CONTINUATION, 0x04, 1, block[half:])
            # padded DATA with END_STREAM
            + frame(FrameType.DATA, 0x08 | 0x01, 1, b"\x04" + message + b"\x00" * 4)
        )
        _peer, answers, goaways, _ = await raw_exchange(raw)
        assert not goaways
        assert answers[1][0] == struct.pack(">BI", 0, 3) + b"hi!"
        assert answers[1][1][b"grpc-status"] == b"0"

    _run(scenario())


_S = _settings()
_SETTINGS_FRAME = FrameType.SETTINGS
_WU = FrameType.WINDOW_UPDATE


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", ErrorCode.PROTOCOL_ERROR),
        (CLIENT_PREFACE + frame(FrameType.PING, 0, 0, b"x" * 8), ErrorCode.PROTOCOL_ERROR),  # no SETTINGS
        (_settings() + frame(FrameType.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
        (_settings() + frame(FrameType.DATA, 0, 7, b"x"), ErrorCode.PROTOCOL_ERROR),  # idle stream
        (_settings() + frame(FrameType.HEADERS, 0x04, 2, _headers_block()), ErrorCode.PROTOCOL_ERROR),
        (_settings() + frame(FrameType.HEADERS, 0x04, 1, b"\x80"), ErrorCode.COMPRESSION_ERROR),
        (_settings() + frame(FrameType.PUSH_PROMISE, 0x04, 1, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),
        (_settings() + frame(FrameType.PING, 0, 0, b"short"), ErrorCode.FRAME_SIZE_ERROR),
        (_settings() + frame(FrameType.SETTINGS, 0, 0, b"\x00" * 5), ErrorCode.FRAME_SIZE_ERROR),
        (
            _settings() + frame(FrameType.SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"),
            ErrorCode.PROTOCOL_ERROR,
        ),
        (
            _settings() + frame(FrameType.SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff"),
            ErrorCode.FLOW_CONTROL_ERROR,
        ),
        (_settings() + frame(FrameType.WINDOW_UPDATE, 0, 0, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),
        (
            _settings() + frame(FrameType.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"),
            ErrorCode.FLOW_CONTROL_ERROR,
        ),
        (_settings() + frame(FrameType.CONTINUATION, 0x04, 1, b""), ErrorCode.PROTOCOL_ERROR),
        (
            _settings()
            + frame(FrameType.HEADERS, 0, 1, _headers_block())
            + frame(FrameType.PING, 0, 0, b"x" * 8),
            ErrorCode.PROTOCOL_ERROR,
        ),  # anything but CONTINUATION after HEADERS without END_HEADERS
        (
            _settings() + frame(FrameType.HEADERS, 0x0C, 1, b"\xff" + _headers_block()),
            ErrorCode.PROTOCOL_ERROR,
        ),
        (_settings() + frame(FrameType.RST_STREAM, 0, 0, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),
        (_settings() + b"\x00\x40\x01\x00\x00\x00\x00\x00\x01", ErrorCode.FRAME_SIZE_ERROR),  # 16 KiB + 1
    ],
)
def test_protocol_violations_end_in_goaway_and_close(raw: bytes, code: int) -> None:
    async def scenario() -> None:
        peer, _answers, goaways, _ = await raw_exchange(raw)
        assert peer.wire.closed
        assert goaways == [code]  # the last frame written, then the connection closed
        assert read_frames(bytes(peer.wire.out))[-1][0] == FrameType.GOAWAY

    _run(scenario())


def test_a_header_block_across_continuation_frames_is_bounded() -> None:
    async def scenario() -> None:
        raw = _settings() + frame(FrameType.HEADERS, 0, 1, b"\x00" * 100)
        raw += frame(FrameType.CONTINUATION, 0, 1, b"\x00" * 16384) * 3
        peer, _answers, goaways, _ = await raw_exchange(raw)
        assert peer.wire.closed and goaways == [ErrorCode.ENHANCE_YOUR_CALM]

    _run(scenario())


def test_a_ping_flood_is_cut_off() -> None:
    async def scenario() -> None:
        raw = _settings() + frame(FrameType.PING, 0, 0, b"p" * 8) * (MAX_CONTROL_FRAMES + 5)
        peer, _answers, goaways, _ = await raw_exchange(raw)
        assert peer.wire.closed and goaways == [ErrorCode.ENHANCE_YOUR_CALM]
        pongs = [f for f in read_frames(bytes(peer.wire.out)) if f[0] == FrameType.PING]
        # The client's own SETTINGS counts too: MAX_CONTROL_FRAMES - 1 pings were answered.
        assert len(pongs) == MAX_CONTROL_FRAMES - 1 and all(f[1] == 0x1 for f in pongs)

    _run(scenario())


def test_rapid_reset_is_cut_off() -> None:
    """Streams whose request is complete (work started) and then reset, again and again (CVE-2023-44487)."""
    gate = asyncio.Event()

    async def slow(message: bytes, cert: bytes | None) -> bytes:
        await gate.wait()
        return message

    async def scenario() -> None:
        peer = Peer(slow)
        peer.send()
        for _ in range(MAX_CLIENT_RESETS + 1):
            stream = peer.request(b"x")
            peer.client.reset_stream(stream)
            peer.send()
            await peer.settle()
        assert peer.wire.closed
        assert peer.goaway().error_code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[union-attr]
        tasks = list(peer.proto._tasks)
        peer.proto.connection_lost(None)  # what the transport reports once closed
        await peer.settle()
        assert all(t.cancelled() for t in tasks)

    _run(scenario())


@pytest.mark.parametrize("stall", ["unfinished request", "closed window"])
def test_a_client_that_stalls_a_call_is_disconnected_after_the_idle_timeout(stall: str) -> None:
    async def scenario() -> None:
        peer = Peer(idle=0.05)
        if stall == "unfinished request":  # HEADERS, then never the end of the stream
            peer.send(_settings() + frame(FrameType.HEADERS, 0x04, 1, _headers_block()))
        else:  # a window of 0 for every stream: the answer can never be sent
            zero_window = frame(FrameType.SETTINGS, 0, 0, b"\x00\x04\x00\x00\x00\x00")
            message = struct.pack(">BI", 0, 2) + b"hi"
            peer.send(
                CLIENT_PREFACE
                + zero_window
                + frame(FrameType.HEADERS, 0x04, 1, _headers_block())
                + frame(FrameType.DATA, 0x01, 1, message)
            )
        for _ in range(200):
            if peer.wire.closed:
                break
            await asyncio.sleep(0.01)
        _answers, goaways, _ = raw_answers(bytes(peer.wire.out))
        assert peer.wire.closed and goaways == [ErrorCode.NO_ERROR]

    _run(scenario())


def test_streams_beyond_the_concurrency_limit_are_refused_and_resets_cancel_handlers() -> None:
    started: list[int] = []
    cancelled: list[bool] = []
    gate = asyncio.Event()

    async def slow(message: bytes, cert: bytes | None) -> bytes:
        started.append(1)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return message

    async def scenario() -> None:
        peer = Peer(slow)
        peer.send()
        streams = [peer.request(b"x") for _ in range(MAX_CONCURRENT_STREAMS + 1)]
        peer.send()
        await peer.settle()
        refused = [
            e.stream_id
            for e in peer.events
            if isinstance(e, h2.events.StreamReset) and e.error_code == ErrorCode.REFUSED_STREAM
        ]
        assert refused == [streams[-1]]
        assert len(started) == MAX_CONCURRENT_STREAMS
        peer.client.reset_stream(streams[0])
        peer.send()
        await peer.settle()
        assert cancelled == [True]
        gate.set()
        await peer.settle()
        answered = set(peer.answers())
        assert streams[0] not in answered and streams[-1] not in answered
        assert set(streams[1:-1]) <= answered

    _run(scenario())


def test_the_server_raises_the_clients_windows_as_it_reads() -> None:
    async def scenario() -> None:
        peer = Peer(max_request=1 << 20)
        peer.send()
        body = b"y" * 200_000  # three times the initial window: only possible with WINDOW_UPDATEs
        stream = peer.client.get_next_available_stream_id()
        peer.client.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", PATH),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
            ],
        )
        pending = struct.pack(">BI", 0, len(body)) + body
        while pending:
            room = min(peer.client.local_flow_control_window(stream), peer.client.max_outbound_frame_size)
            assert room > 0, "the server never raised the window"
            chunk, pending = pending[:room], pending[room:]
            peer.client.send_data(stream, chunk, end_stream=not pending)
            peer.send()
            await peer.settle()
        acked = 0
        for _ in range(50):  # the answer is larger than the client's window too: acknowledge as it comes
            await peer.settle()
            fresh, acked = peer.events[acked:], len(peer.events)
            for event in fresh:
                if isinstance(event, h2.events.DataReceived):
                    peer.client.acknowledge_received_data(event.flow_controlled_length or 0, stream)
            peer.send()
            if any(isinstance(e, h2.events.StreamEnded) for e in peer.events):
                break
        data, trailers = peer.answers()[stream]
        assert trailers[b"grpc-status"] == b"0" and data.endswith(b"y!")

    _run(scenario())


_frame_kinds = st.sampled_from(list(range(11)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(
        st.tuples(
            _frame_kinds, st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5]), st.binary(max_size=40)
        ),
        max_size=12,
    )
)
def test_arbitrary_frames_never_raise(frames: list[tuple[int, int, int, bytes]]) -> None:
    """Whatever frames follow a valid preface, the connection answers or closes; nothing escapes."""

    async def scenario() -> None:
        peer = Peer()
        raw = _settings() + b"".join(frame(k, f, s, p) for k, f, s, p in frames)
        for i in range(0, len(raw), 7):  # delivered in small pieces, as TCP may
            peer.proto.data_received(raw[i : i + 7])
        for _ in range(5):
            await asyncio.sleep(0)
        peer.proto.connection_lost(None)

    _run(scenario())
