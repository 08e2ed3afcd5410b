"""The HTTP/2 wire pieces the gRPC server needs (RFC 9113 framing, RFC 7541 header decoding).

Only the server side, and only what a unary gRPC server uses: frame headers, SETTINGS, the HPACK
*decoder* (with its dynamic table, kept in step for every header block the client sends, including
blocks of requests that are refused), and constant header blocks for our answers. Our answers never
use the client's dynamic table (every field is a static-table index or a literal *without indexing*),
so the client's SETTINGS_HEADER_TABLE_SIZE needs no encoder state here.

Huffman decoding is the ``hpack`` package's (the reference table of RFC 7541 Appendix B); the short
strings a client stack repeats on every connection (``:path``, ``user-agent``, ``content-type``) are
decoded once and then found in a small bounded cache.
"""

from __future__ import annotations

import struct
from collections import deque

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

__all__ = [
    "CLIENT_PREFACE",
    "DEFAULT_WINDOW",
    "FRAME_HEADER",
    "MAX_MAX_FRAME_SIZE",
    "MAX_WINDOW",
    "MIN_MAX_FRAME_SIZE",
    "ErrorCode",
    "Flag",
    "FrameType",
    "HeaderDecodeError",
    "HpackDecoder",
    "Setting",
    "encode_literal",
    "frame",
]

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: length (24 bits), type, flags, stream id (31 bits; the reserved bit is ignored on receipt)
FRAME_HEADER = struct.Struct(">HBBBL")
DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
MIN_MAX_FRAME_SIZE = 16_384
MAX_MAX_FRAME_SIZE = 2**24 - 1


class FrameType:
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class ErrorCode:
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class Setting:
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte header, then ``payload``."""
    n = len(payload)
    return FRAME_HEADER.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


# --------------------------------------------------------------------------- encoding (our answers)


def _encode_int(value: int, prefix_bits: int, first: int) -> bytearray:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytearray([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return out


def encode_literal(name: bytes | int, value: bytes) -> bytes:
    """A header field as a literal *without indexing* (RFC 7541 §6.2.2), raw strings (no Huffman):
    ``name`` is a static-table index or the name itself. Touches no dynamic table."""
    if isinstance(name, int):
        out = _encode_int(name, 4, 0x00)
    else:
        out = bytearray([0x00]) + _encode_int(len(name), 7, 0x00) + name
    return bytes(out + _encode_int(len(value), 7, 0x00) + value)


# --------------------------------------------------------------------------- decoding (requests)


class HeaderDecodeError(Exception):
    """A header block that cannot be decoded: a connection error (COMPRESSION_ERROR), since the
    decoder's state no longer matches the client's. The text names what was wrong (no header data)."""


_STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
_STATIC_LEN = len(_STATIC)
#: Every entry's size counts its name, its value and 32 octets (RFC 7541 §4.1).
_ENTRY_OVERHEAD = 32
#: Huffman-coded strings at most this long are cached, at most _CACHE_MAX of them (first come).
_CACHE_STRING_MAX = 96
_CACHE_MAX = 512
_huffman_cache: dict[bytes, bytes] = {}


def _huffman(data: bytes) -> bytes:
    if len(data) <= _CACHE_STRING_MAX:
        hit = _huffman_cache.get(data)
        if hit is not None:
            return hit
    try:
        text = bytes(decode_huffman(data))
    except HPACKDecodingError:
        raise HeaderDecodeError("invalid Huffman-coded string in a header block") from None
    if len(data) <= _CACHE_STRING_MAX and len(_huffman_cache) < _CACHE_MAX:
        _huffman_cache[data] = text
    return text


class HpackDecoder:
    """One connection's HPACK decoder (RFC 7541), with the dynamic table the client's encoder fills.

    ``table_limit`` is the SETTINGS_HEADER_TABLE_SIZE this side announced (the default, 4096, unless
    changed); ``max_list_size`` bounds the decoded header list (names + values + 32 per field)."""

    __slots__ = ("_dynamic", "_limit", "_max_list", "_max_size", "_size")

    def __init__(self, table_limit: int = 4096, max_list_size: int = 16 * 1024) -> None:
        self._dynamic: deque[tuple[bytes, bytes]] = deque()
        self._size = 0
        self._limit = table_limit
        self._max_size = table_limit
        self._max_list = max_list_size

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The header fields of one complete header block, in order. Raises HeaderDecodeError."""
        fields: list[tuple[bytes, bytes]] = []
        pos, end, list_size = 0, len(block), 0
        while pos < end:
            byte = block[pos]
            if byte & 0x80:  # indexed field
                index, pos = self._int(block, pos, 7)
                field = self._entry(index)
            elif byte & 0x40:  # literal with incremental indexing
                field, pos = self._literal(block, pos, 6)
                self._add(field)
            elif byte & 0x20:  # dynamic table size update
                if fields:
                    raise HeaderDecodeError("a dynamic table size update after a header field")
                size, pos = self._int(block, pos, 5)
                if size > self._limit:
                    raise HeaderDecodeError("a dynamic table size update above the announced limit")
                self._max_size = size
                self._evict(0)
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                field, pos = self._literal(block, pos, 4)
            list_size += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if list_size > self._max_list:
                raise HeaderDecodeError(f"the header list is larger than {self._max_list} bytes")
            fields.append(field)
        return fields

    @staticmethod
    def _int(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            if pos >= len(data):
                raise HeaderDecodeError("a truncated integer in a header block")
            if shift > 21:  # more than 2^28: no header block here is that large
                raise HeaderDecodeError("an integer too large in a header block")
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(data):
            raise HeaderDecodeError("a truncated string in a header block")
        huffman = data[pos] & 0x80
        length, pos = self._int(data, pos, 7)
        if pos + length > len(data):
            raise HeaderDecodeError("a string longer than its header block")
        raw = data[pos : pos + length]
        return (_huffman(raw) if huffman else raw), pos + length

    def _literal(self, data: bytes, pos: int, prefix_bits: int) -> tuple[tuple[bytes, bytes], int]:
        index, pos = self._int(data, pos, prefix_bits)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._string(data, pos)
        value, pos = self._string(data, pos)
        return (name, value), pos

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_LEN:
            return _STATIC[index - 1]
        dynamic = index - _STATIC_LEN - 1
        if index == 0 or dynamic >= len(self._dynamic):
            raise HeaderDecodeError(f"header table index {index} is out of range")
        return self._dynamic[dynamic]

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        if size > self._max_size:  # larger than the table: it empties it (RFC 7541 §4.4)
            self._dynamic.clear()
            self._size = 0
            return
        self._evict(size)
        self._dynamic.appendleft(field)
        self._size += size

    def _evict(self, room: int) -> None:
        while self._dynamic and self._size + room > self._max_size:
            name, value = self._dynamic.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD
