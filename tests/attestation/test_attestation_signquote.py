"""The sign-quote contract (reference §6.6) with real P-384 signatures."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from attestation_vectors import SGX_AT
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from marblekeep.attestation.dcap import Collateral, verify_quote
from marblekeep.attestation.evidence import add_oe_header
from marblekeep.attestation.signquote import (
    is_raw_sgx_quote,
    sign_quote_message,
    sign_quote_payload,
    verify_sign_quote_signature,
)


def _header(version: int = 3, key_type: int = 2, tee: int = 0, qe_svn: int = 1, pce_svn: int = 1) -> bytes:
    return struct.pack("<HHIHH", version, key_type, tee, qe_svn, pce_svn) + bytes(36)


def test_is_raw_sgx_quote(sgx_quote: bytes, tdx_quote: bytes) -> None:
    assert is_raw_sgx_quote(sgx_quote)
    assert not is_raw_sgx_quote(add_oe_header(sgx_quote))
    assert not is_raw_sgx_quote(tdx_quote)
    assert not is_raw_sgx_quote(b"")


@pytest.mark.parametrize(
    ("fields", "raw"),
    [
        ({}, True),
        ({"key_type": 3}, True),
        ({"key_type": 4}, False),
        ({"version": 4}, False),
        ({"tee": 0x81}, False),
        ({"qe_svn": 0}, False),
        ({"pce_svn": 0}, False),
    ],
)
def test_is_raw_sgx_quote_rules(fields: dict[str, int], raw: bool) -> None:
    assert is_raw_sgx_quote(_header(**fields)) is raw


def test_payload_is_sha256_of_base64_quote_and_status(sgx_quote: bytes) -> None:
    status = "ConfigurationAndSWHardeningNeeded"
    message = base64.b64encode(sgx_quote) + status.encode()
    assert sign_quote_message(sgx_quote, status) == message
    assert sign_quote_payload(sgx_quote, status) == hashlib.sha256(message).digest()
    # the quote *as submitted*: with or without the OE header gives different payloads
    assert sign_quote_payload(add_oe_header(sgx_quote), status) != sign_quote_payload(sgx_quote, status)


def test_signature_round_trip_with_the_verified_status(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    status = verify_quote(sgx_quote, sgx_collateral, SGX_AT).tcb_status
    root = ec.generate_private_key(ec.SECP384R1())
    signature = root.sign(sign_quote_payload(sgx_quote, status), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    # the same as signing the message with SHA-256: what MarbleRun clients check
    root.public_key().verify(signature, sign_quote_message(sgx_quote, status), ec.ECDSA(hashes.SHA256()))
    assert verify_sign_quote_signature(root.public_key(), sgx_quote, status, signature)
    assert not verify_sign_quote_signature(root.public_key(), sgx_quote, "UpToDate", signature)
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    assert not verify_sign_quote_signature(other, sgx_quote, status, signature)


@settings(max_examples=50, deadline=None)
@given(quote=st.binary(max_size=64), status=st.sampled_from(["UpToDate", "OutOfDate", "SWHardeningNeeded"]))
def test_payload_binds_quote_and_status(quote: bytes, status: str) -> None:
    assert sign_quote_payload(quote, status) != sign_quote_payload(quote + b"\0", status)
    assert len(sign_quote_payload(quote, status)) == 32
