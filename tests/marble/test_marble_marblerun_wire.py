"""The protobuf codec of MarbleRun's Marble API, against Google's protobuf package."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marble.marblerun_support import PbActivationReq, PbActivationResp
from marblekeep.errors import RequestError
from marblekeep.marble.marblerun_wire import (
    ActivationReq,
    MarbleRunParameters,
    decode_activation_req,
    decode_activation_resp,
    encode_activation_req,
    encode_activation_resp,
)

text = st.text(max_size=40)
blobs = st.binary(max_size=200)
requests = st.builds(ActivationReq, quote=blobs, csr=blobs, marble_type=text, uuid=text)
parameters = st.builds(
    MarbleRunParameters,
    files=st.dictionaries(text, blobs, max_size=6),
    env=st.dictionaries(text, blobs, max_size=6),
    argv=st.lists(text, max_size=6).map(tuple),
)


def _pb_request(req: ActivationReq) -> bytes:
    msg = PbActivationReq(Quote=req.quote, CSR=req.csr, MarbleType=req.marble_type, UUID=req.uuid)
    return bytes(msg.SerializeToString())


def _pb_response(params: MarbleRunParameters) -> bytes:
    msg = PbActivationResp()
    msg.Parameters.Argv.extend(params.argv)
    for k, v in params.files.items():
        msg.Parameters.Files[k] = v
    for k, v in params.env.items():
        msg.Parameters.Env[k] = v
    return bytes(msg.SerializeToString(deterministic=True))


@given(requests)
def test_request_round_trip(req: ActivationReq) -> None:
    assert decode_activation_req(encode_activation_req(req)) == req


@given(parameters)
def test_response_round_trip(params: MarbleRunParameters) -> None:
    decoded = decode_activation_resp(encode_activation_resp(params))
    assert (dict(decoded.files), dict(decoded.env), decoded.argv) == (
        dict(params.files),
        dict(params.env),
        params.argv,
    )


@given(requests)
def test_request_bytes_equal_protobuf_and_decode_it(req: ActivationReq) -> None:
    pb = _pb_request(req)
    assert encode_activation_req(req) == pb  # singular fields in number order, defaults omitted
    assert decode_activation_req(pb) == req
    parsed = PbActivationReq.FromString(encode_activation_req(req))
    assert (parsed.Quote, parsed.CSR, parsed.MarbleType, parsed.UUID) == (
        req.quote,
        req.csr,
        req.marble_type,
        req.uuid,
    )


@given(parameters)
def test_response_read_by_protobuf_and_protobuf_read_by_us(params: MarbleRunParameters) -> None:
    parsed = PbActivationResp.FromString(encode_activation_resp(params))
    assert parsed.HasField("Parameters")
    assert dict(parsed.Parameters.Files) == dict(params.files)
    assert dict(parsed.Parameters.Env) == dict(params.env)
    assert tuple(parsed.Parameters.Argv) == params.argv
    ours = decode_activation_resp(_pb_response(params))
    assert (dict(ours.files), dict(ours.env), ours.argv) == (
        dict(params.files),
        dict(params.env),
        params.argv,
    )


def test_empty_parameters_are_still_sent() -> None:
    assert encode_activation_resp(MarbleRunParameters()) == b"\x0a\x00"
    assert PbActivationResp.FromString(b"\x0a\x00").HasField("Parameters")


# Unknown fields of every wire type, and a (deprecated) group with a nested group inside.
UNKNOWN = (
    b"\x28\x96\x01"  # field 5, varint 150
    b"\x31"
    + bytes(8)  # field 6, fixed64
    + b"\x3d"
    + bytes(4)  # field 7, fixed32
    + b"\x42\x03abc"  # field 8, length-delimited
    + b"\x4b"
    + b"\x53"
    + b"\x08\x01"
    + b"\x54"
    + b"\x4c"  # group 9 { group 10 { field 1 = 1 } }
    + b"\xf8\xff\xff\xff\x0f\x01"  # field 2^29-1, varint 1
)


def test_unknown_fields_are_skipped_as_protobuf_does() -> None:
    body = b"\x1a\x07backend" + UNKNOWN + b"\x22\x03abc"
    assert decode_activation_req(body) == ActivationReq(marble_type="backend", uuid="abc")
    pb = PbActivationReq.FromString(body)
    assert (pb.MarbleType, pb.UUID) == ("backend", "abc")
    resp = b"\x0a\x04\x1a\x02hi" + UNKNOWN
    assert decode_activation_resp(resp).argv == ("hi",)


def test_known_field_with_another_wire_type_is_skipped_as_protobuf_does() -> None:
    body = b"\x18\x01\x22\x01u"  # MarbleType as a varint (ignored), UUID "u"
    assert decode_activation_req(body) == ActivationReq(uuid="u")
    pb = PbActivationReq.FromString(body)
    assert (pb.MarbleType, pb.UUID) == ("", "u")


def test_last_singular_value_wins_messages_merge_map_keys_replace() -> None:
    body = b"\x1a\x01a\x1a\x01b"
    assert decode_activation_req(body).marble_type == PbActivationReq.FromString(body).MarbleType == "b"
    # Two Parameters fields merge; the second Files entry for "k" replaces the first.
    first = b"\x0a\x06" + b"\x0a\x01k\x12\x01\x31" + b"\x1a\x01x"
    second = b"\x0a\x06" + b"\x0a\x01k\x12\x01\x32"
    entry = b"\x0a" + bytes([len(first)]) + first + b"\x0a" + bytes([len(second)]) + second
    ours = decode_activation_resp(entry)
    pb = PbActivationResp.FromString(entry)
    assert dict(ours.files) == dict(pb.Parameters.Files) == {"k": b"2"}
    assert ours.argv == tuple(pb.Parameters.Argv) == ("x",)


def test_map_entry_without_key_or_value_defaults_to_empty() -> None:
    body = b"\x0a\x04" + b"\x12\x02" + b"\x12\x00"  # Parameters{Env entry{value=""}}
    assert (
        dict(decode_activation_resp(body).env)
        == {"": b""}
        == dict(PbActivationResp.FromString(body).Parameters.Env)
    )


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"\x0a", "truncated varint"),
        (b"\x0a\x05abc", "announces 5 bytes but only 3 remain"),
        (b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "varint longer than 10 bytes"),
        (b"\x00\x01", "invalid field number 0"),
        (b"\x1a\x02\xff\xfe", "MarbleType is not valid UTF-8"),
        (b"\x2f", "unknown wire type 7"),
        (b"\x2c", "end-group marker for field 5 without a matching start"),
        (b"\x2b\x08\x01", "group of field 5 is not closed"),
        (b"\x2b\x34", "group of field 5 closed by field 6"),
        (b"\x2b" * 40, "groups nested deeper than 32"),
    ],
)
def test_malformed_requests_name_the_problem(body: bytes, detail: str) -> None:
    with pytest.raises(RequestError) as info:
        decode_activation_req(body)
    assert info.value.message.startswith("ActivationReq: malformed protobuf message")
    assert detail in info.value.message
    with pytest.raises(Exception):  # noqa: B017 (protobuf's own DecodeError): both refuse it
        PbActivationReq.FromString(body)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_request_error(data: bytes) -> None:
    for decode in (decode_activation_req, decode_activation_resp):
        with contextlib.suppress(RequestError):  # anything else (IndexError, ...) fails the test
            decode(data)
