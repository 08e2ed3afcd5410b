"""The Coordinator's use of real quotes: sign-quote, collateral status, Marble evidence binding.

Uses the real SGX quote vector with its collateral, loaded from a directory (the air-gapped path),
at a pinned time inside the collateral's validity window.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from marblekeep.attestation.collateral import DirectoryCollateralSource
from marblekeep.attestation.signquote import verify_sign_quote_signature
from marblekeep.errors import (
    ActivationRefused,
    AttestationError,
    AuthorizationError,
    CollateralError,
    QuoteUnavailable,
)
from marblekeep.marble.evidence import GramineIssuer
from marblekeep.marble.protocol import ActivationRequest, encode_activation_request
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.kek import SimulationKeyFileProvider
from marblekeep.verification import DcapEvidenceVerifier

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dcap"
PINNED = dt.datetime(2025, 6, 25, tzinfo=dt.UTC)
AFTER_EXPIRY = dt.datetime(2025, 8, 1, tzinfo=dt.UTC)


def _manifest(gates: list[str]) -> bytes:
    return json.dumps(
        {
            "Packages": {
                "backend": {
                    "UniqueID": "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
                    "AcceptedTCBStatuses": ["ConfigurationAndSWHardeningNeeded"],
                }
            },
            "Marbles": {"backend": {"Package": "backend"}},
            "Config": {"FeatureGates": gates},
        }
    ).encode()


@pytest.fixture
def collateral_dir(tmp_path: Path) -> Path:
    target = tmp_path / "collateral"
    target.mkdir()
    shutil.copy(VECTORS / "sgx_quote_collateral.json", target / "sgx.json")
    return target


@pytest.fixture
def sgx_quote() -> bytes:
    return (VECTORS / "sgx_quote").read_bytes()


async def _coordinator(
    tmp_path: Path, collateral_dir: Path, *, at: dt.datetime, simulation: bool
) -> Coordinator:
    clock = lambda: at  # noqa: E731
    verifier = DcapEvidenceVerifier(DirectoryCollateralSource(collateral_dir), clock=clock, workers=1)
    return await Coordinator.open(
        CoordinatorConfig(simulation=simulation, seal_dir=tmp_path / "seal"),
        verifier=verifier,
        kek_provider=SimulationKeyFileProvider(tmp_path / "kek"),
        clock=clock,
    )


async def _close(coord: Coordinator) -> None:
    await coord.close()
    await coord.verifier.aclose()  # type: ignore[attr-defined]


async def test_sign_quote_signs_the_verified_tcb_status(
    tmp_path: Path, collateral_dir: Path, sgx_quote: bytes
) -> None:
    coord = await _coordinator(tmp_path, collateral_dir, at=PINNED, simulation=True)
    try:
        await coord.set_manifest(_manifest(["SignQuoteEndpoint"]))
        status, signature = await coord.sign_quote(sgx_quote)
        assert status == "ConfigurationAndSWHardeningNeeded"
        root_key = coord.deployment.ca.root.cert.public_key()
        assert verify_sign_quote_signature(root_key, sgx_quote, status, signature)  # type: ignore[arg-type]
        assert not verify_sign_quote_signature(root_key, sgx_quote, "UpToDate", signature)  # type: ignore[arg-type]
        # the collateral used is reported (status endpoint and metrics read this)
        [entry] = coord.collateral_status()
        assert entry["not_after"] == "2025-07-19T10:01:18Z"
        assert entry["expired"] is False
        # a flipped byte in the report body is refused with an explanation
        tampered = bytearray(sgx_quote)
        tampered[120] ^= 1
        with pytest.raises(AttestationError) as err:
            await coord.sign_quote(bytes(tampered))
        assert err.value.http_status < 500
    finally:
        await _close(coord)


async def test_sign_quote_needs_the_feature_gate(
    tmp_path: Path, collateral_dir: Path, sgx_quote: bytes
) -> None:
    coord = await _coordinator(tmp_path, collateral_dir, at=PINNED, simulation=True)
    try:
        await coord.set_manifest(_manifest([]))
        with pytest.raises(AuthorizationError, match="SignQuoteEndpoint"):
            await coord.sign_quote(sgx_quote)
    finally:
        await _close(coord)


async def test_expired_collateral_is_never_used(
    tmp_path: Path, collateral_dir: Path, sgx_quote: bytes
) -> None:
    coord = await _coordinator(tmp_path, collateral_dir, at=AFTER_EXPIRY, simulation=True)
    try:
        await coord.set_manifest(_manifest(["SignQuoteEndpoint"]))
        with pytest.raises(AttestationError, match="expired"):
            await coord.sign_quote(sgx_quote)
    finally:
        await _close(coord)


def _activation_body(coord: Coordinator, quote: bytes) -> bytes:
    key = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    req = ActivationRequest(
        marble_type="backend",
        uuid=uuid.uuid4(),
        dns_names=("localhost",),
        hpke_public_key=key,
        nonce=coord.challenge(),
        evidence_type="sgx-dcap",
        evidence=quote,
    )
    return encode_activation_request(req)


async def test_genuine_quote_not_bound_to_the_request_is_refused(
    tmp_path: Path, collateral_dir: Path, sgx_quote: bytes
) -> None:
    """A real, verifying quote whose report data is not this request's binding gets nothing."""
    coord = await _coordinator(tmp_path, collateral_dir, at=PINNED, simulation=False)
    try:
        await coord.set_manifest(_manifest([]))
        with pytest.raises(ActivationRefused, match="report data does not match") as err:
            await coord.activate(_activation_body(coord, sgx_quote))
        assert err.value.reason == "binding"
        # a quote of the wrong declared type is refused with an explanation
        body = json.loads(_activation_body(coord, sgx_quote))
        body["evidence"]["type"] = "tdx"
        with pytest.raises(ActivationRefused, match="SGX quote"):
            await coord.activate(json.dumps(body).encode())
        # and a corrupted one names the failure
        tampered = bytearray(sgx_quote)
        tampered[200] ^= 0xFF
        body = json.loads(_activation_body(coord, bytes(tampered)))
        with pytest.raises(ActivationRefused, match="invalid quote"):
            await coord.activate(json.dumps(body).encode())
    finally:
        await _close(coord)


class _FakeGramine:
    """A directory laid out like Gramine's /dev/attestation, serving a fixed quote."""

    def __init__(self, root: Path, quote: bytes) -> None:
        root.mkdir()
        (root / "attestation_type").write_text("dcap")
        (root / "user_report_data").write_bytes(b"")
        (root / "quote").write_bytes(quote)
        self.root = root

    @property
    def report_data(self) -> bytes:
        return (self.root / "user_report_data").read_bytes()


async def test_coordinator_quote_binds_root_and_nonce(tmp_path: Path, sgx_quote: bytes) -> None:
    """Outside simulation the quote endpoint asks Gramine for a quote over SHA-256(root DER ‖ nonce)."""
    gramine = _FakeGramine(tmp_path / "attestation", sgx_quote)
    coord = await Coordinator.open(
        CoordinatorConfig(simulation=False, seal_dir=tmp_path / "seal"),
        quote_issuer=GramineIssuer(gramine.root),
        kek_provider=SimulationKeyFileProvider(tmp_path / "kek"),
    )
    try:
        root_der = coord.deployment.ca.root.cert_der
        assert coord.quote(b"nonce-1") == sgx_quote
        assert gramine.report_data == hashlib.sha256(root_der + b"nonce-1").digest() + bytes(32)
        assert coord.quote(None) == sgx_quote
        assert gramine.report_data == hashlib.sha256(root_der).digest() + bytes(32)
        # a broken quoting setup is the server's problem (503), not a refusal of the client
        (gramine.root / "attestation_type").write_text("epid")
        with pytest.raises(QuoteUnavailable, match="dcap") as err:
            coord.quote(b"n")
        assert err.value.http_status == 503
    finally:
        await coord.close()


async def test_expired_collateral_at_activation_is_the_coordinators_problem(
    tmp_path: Path, collateral_dir: Path, sgx_quote: bytes
) -> None:
    """503 (the premain retries while collateral is refreshed), not a refusal of the Marble."""
    coord = await _coordinator(tmp_path, collateral_dir, at=AFTER_EXPIRY, simulation=False)
    try:
        await coord.set_manifest(_manifest([]))
        with pytest.raises(CollateralError, match="expired") as err:
            await coord.activate(_activation_body(coord, sgx_quote))
        assert err.value.http_status == 503
    finally:
        await _close(coord)


async def test_tdx_evidence_is_verified_and_bound(tmp_path: Path, collateral_dir: Path) -> None:
    """A TDX quote goes through the same path: verified against TDX collateral, then its report
    data must carry the request's binding (the vector's does not, so it is refused for that)."""
    shutil.copy(VECTORS / "tdx_quote_collateral.json", collateral_dir / "tdx.json")
    tdx_quote = (VECTORS / "tdx_quote").read_bytes()
    coord = await _coordinator(tmp_path, collateral_dir, at=PINNED, simulation=False)
    try:
        await coord.set_manifest(_manifest([]))
        body = json.loads(_activation_body(coord, tdx_quote))
        body["evidence"]["type"] = "tdx"
        with pytest.raises(ActivationRefused, match="report data does not match") as err:
            await coord.activate(json.dumps(body).encode())
        assert err.value.reason == "binding"
    finally:
        await _close(coord)
