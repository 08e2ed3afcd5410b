"""Protocol Buffers codec for MarbleRun's Marble API messages (``rpc.Marble/Activate``).

Pure module: bytes in, values out, no I/O. It encodes and decodes exactly three messages, written
from the proto3 schema MarbleRun publishes (``coordinator/rpc/coordinator.proto``)::

    message ActivationReq  { bytes Quote = 1; bytes CSR = 2; string MarbleType = 3; string UUID = 4; }
    message ActivationResp { Parameters Parameters = 1; }
    message Parameters     { map<string, bytes> Files = 1; map<string, bytes> Env = 2;
                             repeated string Argv = 3; }

Wire rules (https://protobuf.dev/programming-guides/encoding/), as this codec applies them:

1. A message is a sequence of fields; each starts with a varint key ``field_number << 3 | wire_type``.
   Wire types: 0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit, 3/4 start/end of a
   (deprecated) group. Field number 0 and numbers above 2^29 - 1 are malformed.
2. Varints are at most 10 bytes; lengths must fit in what remains of the input.
3. **Unknown fields are skipped** whatever their wire type (groups included, nested at most
   :data:`MAX_GROUP_DEPTH` deep), as every protobuf parser does.
4. A known field with another wire type than its own is treated as an unknown field and skipped
   (what Google's and Go's protobuf parsers do). For singular fields the **last**
   occurrence wins; repeated occurrences of a message field **merge**; map entries with the same
   key: the last wins; a map entry without key or value has the empty default.
5. ``string`` values must be valid UTF-8 (proto3; Go's protobuf refuses others too).
6. Encoding omits empty singular fields (proto3 defaults), writes map entries sorted by key with
   both key and value, so one value has one encoding.

Every malformed input raises :class:`~marblekeep.errors.RequestError` naming the message and the
field (the gRPC edge maps it to ``InvalidArgument``); the size bound is the caller's (the gRPC
framing refuses larger messages before they reach this module).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from marblekeep.errors import RequestError

__all__ = [
    "MAX_GROUP_DEPTH",
    "ActivationReq",
    "MarbleRunParameters",
    "decode_activation_req",
    "decode_activation_resp",
    "encode_activation_req",
    "encode_activation_resp",
]

MAX_GROUP_DEPTH = 32
_MAX_FIELD_NUMBER = (1 << 29) - 1

WT_VARINT = 0
WT_I64 = 1
WT_LEN = 2
WT_SGROUP = 3
WT_EGROUP = 4
WT_I32 = 5


@dataclass(frozen=True)
class ActivationReq:
    """``rpc.ActivationReq``: what a MarbleRun premain sends."""

    quote: bytes = field(default=b"", repr=False)
    csr: bytes = field(default=b"", repr=False)
    marble_type: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class MarbleRunParameters:
    """``rpc.Parameters`` (the only field of ``rpc.ActivationResp``)."""

    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    env: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    argv: tuple[str, ...] = ()


# --------------------------------------------------------------------------- primitives


_ONE_BYTE = [bytes([i]) for i in range(128)]


def _varint(value: int) -> bytes:
    assert value >= 0
    if value < 128:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, WT_LEN) + _varint(len(payload)) + payload


class _Reader:
    """Cursor over one message's bytes; every read is bounds-checked."""

    __slots__ = ("data", "end", "pos", "what")

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.end = len(data)
        self.what = what

    def error(self, detail: str) -> RequestError:
        return RequestError(f"{self.what}: malformed protobuf message: {detail}")

    def varint(self) -> int:
        result = 0
        shift = 0
        for _ in range(10):
            if self.pos >= self.end:
                raise self.error("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if result >> 64:
                    raise self.error("varint does not fit in 64 bits")
                return result
            shift += 7
        raise self.error("varint longer than 10 bytes")

    def take(self, n: int) -> memoryview:
        if n > self.end - self.pos:
            raise self.error(f"a field announces {n} bytes but only {self.end - self.pos} remain")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def fields(self) -> Iterator[tuple[int, int]]:
        """Yield (field number, wire type) until the end; the caller reads or skips each value."""
        while self.pos < self.end:
            key = self.varint()
            number, wire_type = key >> 3, key & 7
            if number == 0 or number > _MAX_FIELD_NUMBER:
                raise self.error(f"invalid field number {number}")
            if wire_type == WT_EGROUP:
                raise self.error(f"end-group marker for field {number} without a matching start")
            yield number, wire_type

    def skip(self, number: int, wire_type: int, depth: int = 0) -> None:
        if wire_type == WT_VARINT:
            self.varint()
        elif wire_type == WT_I64:
            self.take(8)
        elif wire_type == WT_LEN:
            self.take(self.varint())
        elif wire_type == WT_I32:
            self.take(4)
        elif wire_type == WT_SGROUP:
            if depth >= MAX_GROUP_DEPTH:
                raise self.error(f"groups nested deeper than {MAX_GROUP_DEPTH}")
            while True:
                if self.pos >= self.end:
                    raise self.error(f"group of field {number} is not closed")
                key = self.varint()
                inner, inner_type = key >> 3, key & 7
                if inner == 0 or inner > _MAX_FIELD_NUMBER:
                    raise self.error(f"invalid field number {inner}")
                if inner_type == WT_EGROUP:
                    if inner != number:
                        raise self.error(f"group of field {number} closed by field {inner}")
                    return
                self.skip(inner, inner_type, depth + 1)
        else:
            raise self.error(f"field {number} has the unknown wire type {wire_type}")

    def length_delimited(self) -> memoryview:
        return self.take(self.varint())

    def string(self, name: str) -> str:
        raw = self.length_delimited()
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.error(f"field {name} is not valid UTF-8") from None


# --------------------------------------------------------------------------- ActivationReq


def encode_activation_req(req: ActivationReq) -> bytes:
    parts = []
    if req.quote:
        parts.append(_len_field(1, req.quote))
    if req.csr:
        parts.append(_len_field(2, req.csr))
    if req.marble_type:
        parts.append(_len_field(3, req.marble_type.encode("utf-8")))
    if req.uuid:
        parts.append(_len_field(4, req.uuid.encode("utf-8")))
    return b"".join(parts)


def decode_activation_req(data: bytes | memoryview) -> ActivationReq:
    """Decode ``rpc.ActivationReq``; raises :class:`RequestError` for malformed input."""
    r = _Reader(data, "ActivationReq")
    quote = csr = b""
    marble_type = uuid = ""
    for number, wire_type in r.fields():
        if wire_type != WT_LEN:  # all our fields are length-delimited
            r.skip(number, wire_type)
        elif number == 1:
            quote = bytes(r.length_delimited())
        elif number == 2:
            csr = bytes(r.length_delimited())
        elif number == 3:
            marble_type = r.string("MarbleType")
        elif number == 4:
            uuid = r.string("UUID")
        else:
            r.skip(number, wire_type)
    return ActivationReq(quote=quote, csr=csr, marble_type=marble_type, uuid=uuid)


# --------------------------------------------------------------------------- ActivationResp / Parameters


def _map_entries(number: int, entries: Mapping[str, bytes]) -> list[bytes]:
    """One length-delimited field ``number`` per entry, each holding {key = 1, value = 2}."""
    key_tag, value_tag, tag = _key(1, WT_LEN), _key(2, WT_LEN), _key(number, WT_LEN)
    out: list[bytes] = []
    for name in sorted(entries):
        key, value = name.encode("utf-8"), entries[name]
        entry_len = 2 + len(key) + len(value) + len(_varint(len(key))) + len(_varint(len(value)))
        out += (tag, _varint(entry_len), key_tag, _varint(len(key)), key)
        out += (value_tag, _varint(len(value)), value)
    return out


def _encode_parameters(params: MarbleRunParameters) -> bytes:
    parts = _map_entries(1, params.files) + _map_entries(2, params.env)
    parts += [_len_field(3, arg.encode("utf-8")) for arg in params.argv]
    return b"".join(parts)


def encode_activation_resp(params: MarbleRunParameters) -> bytes:
    """``rpc.ActivationResp{Parameters: params}``. The Parameters field is always written (a
    Marble tells "activated with nothing" from a missing answer)."""
    return _len_field(1, _encode_parameters(params))


def _decode_map_entry(data: memoryview, what: str) -> tuple[str, bytes]:
    r = _Reader(data, what)
    key, value = "", b""
    for number, wire_type in r.fields():
        if wire_type != WT_LEN:  # all our fields are length-delimited
            r.skip(number, wire_type)
        elif number == 1:
            key = r.string("key")
        elif number == 2:
            value = bytes(r.length_delimited())
        else:
            r.skip(number, wire_type)
    return key, value


def _decode_parameters_into(
    data: memoryview, files: dict[str, bytes], env: dict[str, bytes], argv: list[str]
) -> None:
    r = _Reader(data, "Parameters")
    for number, wire_type in r.fields():
        if wire_type != WT_LEN:  # all our fields are length-delimited
            r.skip(number, wire_type)
        elif number == 1:
            k, v = _decode_map_entry(r.length_delimited(), "Parameters.Files")
            files[k] = v
        elif number == 2:
            k, v = _decode_map_entry(r.length_delimited(), "Parameters.Env")
            env[k] = v
        elif number == 3:
            argv.append(r.string("Argv"))
        else:
            r.skip(number, wire_type)


def decode_activation_resp(data: bytes | memoryview) -> MarbleRunParameters:
    """Decode ``rpc.ActivationResp`` to its Parameters (empty when the field is absent)."""
    r = _Reader(data, "ActivationResp")
    files: dict[str, bytes] = {}
    env: dict[str, bytes] = {}
    argv: list[str] = []
    for number, wire_type in r.fields():
        if wire_type != WT_LEN:  # all our fields are length-delimited
            r.skip(number, wire_type)
        elif number == 1:
            _decode_parameters_into(r.length_delimited(), files, env, argv)
        else:
            r.skip(number, wire_type)
    return MarbleRunParameters(files=files, env=env, argv=tuple(argv))
