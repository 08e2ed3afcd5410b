"""Quote verification with dcap-qvl: evidence forms, validity window, tampering, collateral parsing."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import struct
from pathlib import Path

import dcap_qvl
import pytest
from attestation_vectors import SGX_AT, TDX_MRTD, VECTORS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marblekeep.attestation.claims import TeeKind
from marblekeep.attestation.dcap import (
    Collateral,
    CollateralKey,
    _qvl_collateral,
    collateral_key_of_quote,
    verify_quote,
)
from marblekeep.attestation.evidence import add_oe_header, parse_header, read_report, strip_oe_header
from marblekeep.errors import AttestationError, CollateralError, ConfigError

# SGX quote v3 layout: header 0..48, report body 48..432, u32 signature data length at 432,
# then the ECDSA quote signature 436..500, attestation key 500..564, QE report 564..948 and
# the QE report signature 948..1012.
SGX_BODY = (48, 432)
SGX_SIGNED_REGION = (0, 1012)


def test_collateral_window_and_key(sgx_collateral: Collateral, tdx_collateral: Collateral) -> None:
    assert sgx_collateral.key == CollateralKey(TeeKind.SGX, "00A067110000", "processor")
    assert str(sgx_collateral.key) == "sgx/00A067110000/processor"
    assert sgx_collateral.not_before == dt.datetime(2025, 6, 19, 10, 56, 11, tzinfo=dt.UTC)
    assert sgx_collateral.not_after == dt.datetime(2025, 7, 19, 10, 1, 18, tzinfo=dt.UTC)
    assert sgx_collateral.expires_first == "QE identity"
    assert sgx_collateral.tcb_evaluation_data_number == 17
    assert tdx_collateral.key == CollateralKey(TeeKind.TDX, "B0C06F000000", "platform")
    status = sgx_collateral.status(SGX_AT)
    assert status["expired"] is False and status["not_after"] == "2025-07-19T10:01:18Z"


def test_collateral_key_of_quote(sgx_quote: bytes, tdx_quote: bytes, sgx_collateral: Collateral) -> None:
    assert collateral_key_of_quote(sgx_quote) == sgx_collateral.key
    assert collateral_key_of_quote(add_oe_header(sgx_quote)) == sgx_collateral.key
    assert collateral_key_of_quote(tdx_quote) == CollateralKey(TeeKind.TDX, "B0C06F000000", "platform")


def test_oe_header_is_stripped(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    wrapped = add_oe_header(sgx_quote)
    assert wrapped[:16] == struct.pack("<IIQ", 1, 2, len(sgx_quote))
    assert strip_oe_header(wrapped) == sgx_quote
    assert strip_oe_header(sgx_quote) == sgx_quote
    assert verify_quote(wrapped, sgx_collateral, SGX_AT) == verify_quote(sgx_quote, sgx_collateral, SGX_AT)
    with pytest.raises(AttestationError, match="announces 4601 bytes of quote but 4600 follow"):
        strip_oe_header(struct.pack("<IIQ", 1, 2, len(sgx_quote) + 1) + sgx_quote)


def test_report_fields_match_dcap_qvl(
    sgx_quote: bytes, sgx_collateral: Collateral, tdx_quote: bytes, tdx_collateral: Collateral
) -> None:
    """Our offsets read the same values that dcap-qvl itself reports for the verified quote."""
    at = int(SGX_AT.timestamp())
    sgx = json.loads(dcap_qvl.verify(sgx_quote, _qvl_collateral(sgx_collateral.raw_json), at).to_json())
    sgx_report = sgx["report"]["SgxEnclave"]
    claims = verify_quote(sgx_quote, sgx_collateral, SGX_AT)
    assert claims.mrenclave == sgx_report["mr_enclave"] and claims.mrsigner == sgx_report["mr_signer"]
    assert (claims.isv_prod_id, claims.isv_svn) == (sgx_report["isv_prod_id"], sgx_report["isv_svn"])
    assert claims.report_data.hex() == sgx_report["report_data"]
    tdx = json.loads(dcap_qvl.verify(tdx_quote, _qvl_collateral(tdx_collateral.raw_json), at).to_json())
    td = tdx["report"]["TD10"]
    claims = verify_quote(tdx_quote, tdx_collateral, SGX_AT)
    assert claims.mrtd == td["mr_td"] == TDX_MRTD
    assert claims.rtmrs == (td["rt_mr0"], td["rt_mr1"], td["rt_mr2"], td["rt_mr3"])
    assert claims.mrseam == td["mr_seam"] and claims.report_data.hex() == td["report_data"]


def test_debug_bits_are_read(sgx_quote: bytes, tdx_quote: bytes) -> None:
    sgx = bytearray(sgx_quote)
    sgx[96] |= 0x02  # SGX ATTRIBUTES.DEBUG
    assert read_report(bytes(sgx)).debug and not read_report(sgx_quote).debug
    tdx = bytearray(tdx_quote)
    tdx[48 + 120] |= 0x01  # TD_ATTRIBUTES.DEBUG
    assert read_report(bytes(tdx)).debug and not read_report(tdx_quote).debug


def test_tdx_v5_layout(tdx_outdated_quote: bytes) -> None:
    header = parse_header(tdx_outdated_quote)
    assert (header.version, header.kind) == (5, TeeKind.TDX)
    parsed = dcap_qvl.parse_quote(tdx_outdated_quote).report
    claims = read_report(tdx_outdated_quote)
    assert claims.mrtd == parsed.mr_td.hex() and claims.rtmrs[3] == parsed.rt_mr3.hex()
    assert claims.report_data == parsed.report_data


def test_window_edges(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    start = sgx_collateral.not_before
    verify_quote(sgx_quote, sgx_collateral, start)
    with pytest.raises(CollateralError, match=r"collateral not yet valid: issued 2025-06-19T10:56:11Z"):
        verify_quote(sgx_quote, sgx_collateral, start - dt.timedelta(seconds=1))


def test_naive_time_is_refused(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    with pytest.raises(ConfigError, match="timezone-aware"):
        verify_quote(sgx_quote, sgx_collateral, dt.datetime(2025, 6, 25))


def test_collateral_for_the_other_tee(sgx_quote: bytes, tdx_collateral: Collateral) -> None:
    with pytest.raises(CollateralError, match=r"collateral is for TDX .* but the quote is an SGX quote"):
        verify_quote(sgx_quote, tdx_collateral, SGX_AT)


def test_collateral_for_another_platform(tdx_quote: bytes, tdx_outdated_collateral: Collateral) -> None:
    at = dt.datetime(2026, 2, 25, tzinfo=dt.UTC)
    with pytest.raises(AttestationError) as info:
        verify_quote(tdx_quote, tdx_outdated_collateral, at)
    assert info.value.message.startswith("quote verification failed")


@pytest.mark.parametrize(
    ("quote", "message"),
    [
        (b"", "too short"),
        (b"\x03\x00" + bytes(46), "quote verification failed"),
        (b"\x07\x00\x02\x00" + bytes(100), "quote verification failed"),
    ],
)
def test_garbage_quotes(sgx_collateral: Collateral, quote: bytes, message: str) -> None:
    with pytest.raises(AttestationError, match=message):
        verify_quote(quote, sgx_collateral, SGX_AT)


def test_truncated_quote(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    for size in (48, 431, 1000, len(sgx_quote) - 1):
        with pytest.raises(AttestationError):
            verify_quote(sgx_quote[:size], sgx_collateral, SGX_AT)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    position=st.integers(*SGX_SIGNED_REGION).filter(lambda p: p < SGX_SIGNED_REGION[1]),
    mask=st.integers(1, 255),
)
def test_any_flipped_byte_of_body_or_signature_fails(
    sgx_quote: bytes, sgx_collateral: Collateral, position: int, mask: int
) -> None:
    tampered = bytearray(sgx_quote)
    tampered[position] ^= mask
    with pytest.raises(AttestationError):  # never accepted, never a bare exception
        verify_quote(bytes(tampered), sgx_collateral, SGX_AT)


def test_every_report_body_byte_is_covered(sgx_quote: bytes, sgx_collateral: Collateral) -> None:
    """Exhaustive over the 384 report-body bytes (one flip each): the body is what policy reads."""
    failures = 0
    for position in range(*SGX_BODY):
        tampered = bytearray(sgx_quote)
        tampered[position] ^= 0x01
        try:
            verify_quote(bytes(tampered), sgx_collateral, SGX_AT)
        except AttestationError:
            failures += 1
    assert failures == SGX_BODY[1] - SGX_BODY[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(48, 48 + 584 - 1), mask=st.integers(1, 255))
def test_flipped_td_report_byte_fails(
    tdx_quote: bytes, tdx_collateral: Collateral, position: int, mask: int
) -> None:
    tampered = bytearray(tdx_quote)
    tampered[position] ^= mask
    with pytest.raises(AttestationError):
        verify_quote(bytes(tampered), tdx_collateral, SGX_AT)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mangled_quotes_only_raise_attestation_errors(
    sgx_quote: bytes, sgx_collateral: Collateral, data: st.DataObject
) -> None:
    """Truncated, extended or overwritten quotes: a clear AttestationError, never a bare exception;
    any change to the signed part (header, report body, signatures, QE report) is refused."""
    cut = data.draw(st.integers(0, len(sgx_quote)))
    tail = data.draw(st.binary(max_size=64))
    mangled = bytearray(sgx_quote[:cut] + tail)
    for _ in range(data.draw(st.integers(0, 4))):
        if mangled:
            mangled[data.draw(st.integers(0, len(mangled) - 1))] = data.draw(st.integers(0, 255))
    signed_part_intact = bytes(mangled[: SGX_SIGNED_REGION[1]]) == sgx_quote[: SGX_SIGNED_REGION[1]]
    if signed_part_intact:
        # bytes after the signed part (e.g. padding after the PEM chain) may or may not matter
        with contextlib.suppress(AttestationError):
            verify_quote(bytes(mangled), sgx_collateral, SGX_AT)
    else:
        with pytest.raises(AttestationError):
            verify_quote(bytes(mangled), sgx_collateral, SGX_AT)
    with contextlib.suppress(AttestationError):
        collateral_key_of_quote(bytes(mangled))


# --------------------------------------------------------------------------- collateral parsing


def _raw() -> dict[str, str]:
    data: dict[str, str] = json.loads((VECTORS / "sgx_quote_collateral.json").read_bytes())
    return data


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("tcb_info"), "tcb_info: missing"),
        (lambda d: d.update(pck_crl="zz"), "pck_crl: not a hex string"),
        (lambda d: d.update(pck_crl="00ff"), "pck_crl: not a DER certificate revocation list"),
        (lambda d: d.update(tcb_info="{"), "tcb_info: not valid JSON"),
        (lambda d: d.update(tcb_info="[]"), "tcb_info: not a JSON object"),
        (
            lambda d: d.update(qe_identity=d["qe_identity"].replace('"nextUpdate"', '"x"')),
            "qe_identity.nextUpdate",
        ),
        (lambda d: d.update(tcb_info_issuer_chain="nope"), "tcb_info_issuer_chain: not a PEM"),
        (lambda d: d.update(tcb_info_signature="xyz"), "tcb_info_signature: not a hex string"),
        (lambda d: d.update(pck_crl=d["root_ca_crl"]), "pck_crl: issuer 'Intel SGX Root CA' is not"),
    ],
)
def test_bad_collateral_names_the_field(mutate: object, field: str) -> None:
    data = _raw()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(CollateralError) as info:
        Collateral.from_json(json.dumps(data).encode())
    assert field in info.value.message


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"not json", b"[]", b"{}"])
def test_unusable_collateral_files(raw: bytes) -> None:
    with pytest.raises(CollateralError, match="collateral: "):
        Collateral.from_json(raw)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_collateral_parser_never_raises_bare_exceptions(raw: bytes) -> None:
    with contextlib.suppress(CollateralError):
        Collateral.from_json(raw)


def test_vectors_match_their_recorded_digests(dcap_vectors: Path) -> None:
    """tests/vectors/dcap is a verbatim copy of ../shared/vectors/dcap: SHA256SUMS records the
    digests of the copy (``sha256sum -c SHA256SUMS``), so a damaged vector fails here, in any checkout."""
    sums = (dcap_vectors / "SHA256SUMS").read_text().splitlines()
    recorded = {name: digest for digest, name in (line.split() for line in sums if line.strip())}
    data_files = {p.name for p in dcap_vectors.iterdir() if p.name not in ("README.md", "SHA256SUMS")}
    assert set(recorded) == data_files
    for name, digest in recorded.items():
        assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() == digest, name
