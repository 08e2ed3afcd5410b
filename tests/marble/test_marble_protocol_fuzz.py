"""Robustness: the activation-request parser and the other Marble-protocol parsers (tests/fuzzing.py).

``parse_activation_request`` takes unauthenticated bytes from the network: it may only return an
``ActivationRequest`` or raise ``RequestError`` naming a field, never anything else, never hang.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, SLOW, no_hang, slow
from marblekeep.errors import MarbleKeepError, RequestError, SealError
from marblekeep.marble.protocol import (
    MAX_ACTIVATION_BODY,
    ActivationRequest,
    encode_activation_request,
    open_parameters,
    parse_activation_request,
    parse_challenge_response,
)

FIELDS = ["marbleType", "uuid", "dnsNames", "hpkePublicKey", "nonce", "evidence", "type", "data"]
VALID: dict[str, Any] = {
    "marbleType": "backend",
    "uuid": "0f7b6a3e-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
    "dnsNames": ["localhost", "10.0.0.1"],
    "hpkePublicKey": base64.b64encode(bytes(range(32))).decode(),
    "nonce": base64.b64encode(bytes(32)).decode(),
    "evidence": {"type": "simulation", "data": base64.b64encode(bytes(64)).decode()},
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["simulation", "sgx-dcap", "tdx", "AAAA", "====", "\ud800", "a" * 300])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=20,
)


def _parse(body: bytes) -> None:
    with no_hang("parse_activation_request"):
        try:
            req = parse_activation_request(body)
        except RequestError as exc:
            assert exc.message and "Traceback" not in exc.message
            return
    assert isinstance(req, ActivationRequest)
    # what parses re-encodes and parses to the same request
    assert parse_activation_request(encode_activation_request(req)) == req


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_activation_request_bytes(body: bytes) -> None:
    _parse(body)


@FUZZ
@given(json_values)
def test_fuzz_activation_request_json_documents(doc: Any) -> None:
    _parse(json.dumps(doc).encode())


@FUZZ
@given(st.sampled_from(sorted(VALID)), json_values, st.booleans())
def test_fuzz_activation_request_one_field_changed(name: str, value: Any, drop: bool) -> None:
    doc = dict(VALID)
    if drop:
        del doc[name]
    else:
        doc[name] = value
    _parse(json.dumps(doc).encode())


@FUZZ
@given(st.data())
def test_fuzz_activation_request_mutated_bytes(data: st.DataObject) -> None:
    body = bytearray(json.dumps(VALID).encode())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    _parse(bytes(body))


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_challenge_response(body: bytes) -> None:
    with no_hang("parse_challenge_response"):
        with contextlib.suppress(RequestError):
            assert len(parse_challenge_response(body)) == 32


KEY = X25519PrivateKey.generate()
REQUEST = parse_activation_request(json.dumps(VALID).encode())


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_sealed_parameters(sealed: bytes) -> None:
    with no_hang("open_parameters"):
        with contextlib.suppress(SealError):
            open_parameters(sealed, KEY, REQUEST)


@slow
@SLOW
@given(st.integers(1, 40), st.sampled_from(["[", '{"a":', '"', "1"]))
def test_fuzz_slow_deep_and_large_bodies(depth_k: int, opener: str) -> None:
    """Deep nesting and bodies around the size limit (slow: large inputs)."""
    _parse((opener * (depth_k * 1000)).encode()[: MAX_ACTIVATION_BODY + 10])
    _parse(b" " * (MAX_ACTIVATION_BODY - 2) + b"{}")


def test_errors_are_our_family() -> None:
    assert issubclass(RequestError, MarbleKeepError) and issubclass(SealError, MarbleKeepError)
