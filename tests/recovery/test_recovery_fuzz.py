"""Robustness: the recovery parsers (tests/fuzzing.py).

Recovery uploads come from the network in Recovery mode; secret, signature and key files come from
an operator's disk. Each parser may only succeed or raise an error of our family (RecoveryError,
RequestError, ConfigError …), never hang.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, SLOW, no_hang, slow
from marblekeep.api.body import base64_field, parse_json_object
from marblekeep.cli.recover_cmds import decode_secret_file, decode_signature, load_coordinator_public_key
from marblekeep.errors import MarbleKeepError
from marblekeep.recovery import shamir
from marblekeep.recovery.keys import parse_recovery_public_key
from marblekeep.recovery.operator import decrypt_recovery_secret, load_private_key
from marblekeep.recovery.recoverer import Recoverer

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ours(call: Any, *args: Any) -> Any:
    with no_hang(getattr(call, "__name__", "parser")):
        try:
            return call(*args)
        except MarbleKeepError as exc:
            assert exc.message
            return None


pem_like = st.builds(
    lambda label, body, tail: f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n{tail}".encode(),
    st.sampled_from(["PUBLIC KEY", "RSA PRIVATE KEY", "PRIVATE KEY", "CERTIFICATE", "X"]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/=\n", max_size=200),
    st.text(max_size=10),
)


@FUZZ
@given(st.binary(max_size=600) | pem_like)
def test_fuzz_operator_files(data: bytes) -> None:
    _ours(load_private_key, data)
    _ours(decode_secret_file, data, "secret.bin")
    _ours(decode_signature, data, "sig.bin")
    _ours(load_coordinator_public_key, data, "coordinator.der")
    _ours(parse_recovery_public_key, "op", data.decode("latin-1"))
    _ours(decrypt_recovery_secret, data, KEY)


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_fuzz_shamir_combine(shares: list[bytes]) -> None:
    _ours(shamir.combine, shares)


@FUZZ
@given(
    st.none()
    | st.binary(max_size=200)
    | st.dictionaries(st.text(max_size=70), st.booleans()).map(lambda d: json.dumps(d).encode()),
    st.lists(st.tuples(st.binary(max_size=600), st.binary(max_size=600)), max_size=4),
)
def test_fuzz_recovery_uploads(recovery_data: bytes | None, uploads: list[tuple[bytes, bytes]]) -> None:
    """Recovery data as stored (possibly damaged) and uploads as sent: only RecoveryError & co."""

    def recovery_keys(_dek: bytes) -> tuple[dict[str, str], int]:
        return {}, 0

    recoverer = _ours(Recoverer, recovery_data, lambda _dek: False, recovery_keys)
    if recoverer is None:
        return
    for secret, signature in uploads:
        _ours(recoverer.upload, secret, signature)


@FUZZ
@given(
    st.binary(max_size=400)
    | st.dictionaries(
        st.sampled_from(["recoverySecret", "recoverySecretSignature", "x"]),
        st.none() | st.text(max_size=40) | st.integers(),
    ).map(lambda d: json.dumps(d).encode())
)
def test_fuzz_recover_request_body(body: bytes) -> None:
    doc = _ours(parse_json_object, body)
    if doc is not None:
        _ours(base64_field, doc, "recoverySecret")
        _ours(base64_field, doc, "recoverySecretSignature")


@slow
@SLOW
@given(st.binary(min_size=1000, max_size=20000))
def test_fuzz_slow_large_operator_files(data: bytes) -> None:
    _ours(decode_secret_file, data, "secret.bin")
    _ours(decode_secret_file, base64.b64encode(data), "secret.b64")
    _ours(load_private_key, data)
