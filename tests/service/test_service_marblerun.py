"""MarbleRun's activation protocol in the service: the quote is verified (raw or with the Open
Enclave header) and bound to the TLS client certificate of the call; monotonic counters.

Real quotes: the SGX vector with its collateral at a pinned time. Its report data is fixed
("Hello, world!"), so it can only show that a real quote is verified and then refused for its
binding; a fake verifier (report data = the first 64 quote bytes) shows the accepted path.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import random
import shutil
import uuid as uuid_mod
from pathlib import Path

import pytest

from marble.marblerun_support import MarbleRunMarble, PbActivationResp
from marblekeep.activations import counter_id
from marblekeep.api.grpc import GrpcStatus, status_of
from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.attestation.collateral import DirectoryCollateralSource
from marblekeep.attestation.evidence import add_oe_header
from marblekeep.crypto.pki import LeafIssuer, create_intermediate, create_root_ca
from marblekeep.errors import (
    ActivationRefused,
    AuthenticationError,
    AuthorizationError,
    CollateralError,
    RequestError,
)
from marblekeep.marble.marblerun_wire import ActivationReq
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.kek import SimulationKeyFileProvider
from marblekeep.verification import DcapEvidenceVerifier

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "dcap"
PINNED = dt.datetime(2025, 6, 25, tzinfo=dt.UTC)
AFTER_EXPIRY = dt.datetime(2025, 8, 1, tzinfo=dt.UTC)
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"


def _manifest(gates: tuple[str, ...] = ()) -> bytes:
    return json.dumps(
        {
            "Packages": {
                "backend": {
                    "UniqueID": MRENCLAVE,
                    "AcceptedTCBStatuses": ["ConfigurationAndSWHardeningNeeded"],
                }
            },
            "Marbles": {
                "backend": {
                    "Package": "backend",
                    "Parameters": {"Env": {"SEAL": "{{ hex .MarbleRun.SealKey }}"}},
                }
            },
            "Config": {"FeatureGates": list(gates)},
        }
    ).encode()


def _marble() -> tuple[bytes, bytes]:
    """(client certificate DER, CSR DER) of a MarbleRun-style Marble."""
    m = MarbleRunMarble()
    return m.cert_der, m.csr_der


class FakeSgxVerifier:
    """Report data = the first 64 bytes after any OE header; measurements = the package's."""

    async def verify(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims:
        if evidence[:8] == bytes.fromhex("0100000002000000"):
            evidence = evidence[16:]
        return TeeClaims(
            kind=TeeKind.SGX,
            report_data=evidence[:64],
            tcb_status="UpToDate",
            mrenclave=MRENCLAVE,
            mrsigner="ab" * 32,
        )


async def _open(
    tmp_path: Path, *, verifier: object = None, at: dt.datetime = PINNED, simulation: bool = False
) -> Coordinator:
    clock = lambda: at  # noqa: E731
    if verifier is None:
        target = tmp_path / "collateral"
        target.mkdir(exist_ok=True)
        shutil.copy(VECTORS / "sgx_quote_collateral.json", target / "sgx.json")
        verifier = DcapEvidenceVerifier(DirectoryCollateralSource(target), clock=clock, workers=1)
    return await Coordinator.open(
        CoordinatorConfig(simulation=simulation, seal_dir=tmp_path / "seal"),
        verifier=verifier,  # type: ignore[arg-type]
        kek_provider=SimulationKeyFileProvider(tmp_path / "kek"),
        clock=clock,
    )


def _req(csr: bytes, quote: bytes, marble_uuid: uuid_mod.UUID | None = None) -> ActivationReq:
    return ActivationReq(
        quote=quote, csr=csr, marble_type="backend", uuid=str(marble_uuid or uuid_mod.uuid4())
    )


@pytest.mark.parametrize("oe_header", [False, True], ids=["raw", "oe-header"])
async def test_a_real_quote_is_verified_then_refused_for_another_certificate(
    tmp_path: Path, oe_header: bool
) -> None:
    quote = (VECTORS / "sgx_quote").read_bytes()
    coord = await _open(tmp_path)
    try:
        await coord.set_manifest(_manifest())
        cert, csr = _marble()
        with pytest.raises(ActivationRefused) as info:
            await coord.marbles.activate_marblerun(
                _req(csr, add_oe_header(quote) if oe_header else quote), cert
            )
        # It got past the signature, collateral and TCB checks: the refusal is the binding.
        assert info.value.reason == "binding"
        assert "not SHA-256 of the TLS client certificate" in info.value.message
        assert status_of(info.value) is GrpcStatus.PERMISSION_DENIED
        assert coord.deployment.activations == {}
    finally:
        await coord.close()


async def test_a_tampered_real_quote_is_refused(tmp_path: Path) -> None:
    quote = bytearray((VECTORS / "sgx_quote").read_bytes())
    quote[48 + 64] ^= 0x01  # MRENCLAVE: the signature no longer covers it
    coord = await _open(tmp_path)
    try:
        await coord.set_manifest(_manifest())
        cert, csr = _marble()
        with pytest.raises(ActivationRefused) as info:
            await coord.marbles.activate_marblerun(_req(csr, bytes(quote)), cert)
        assert info.value.reason == "attestation"
        assert info.value.message.startswith("invalid quote:")
    finally:
        await coord.close()


async def test_expired_collateral_is_unavailable(tmp_path: Path) -> None:
    coord = await _open(tmp_path, at=AFTER_EXPIRY)
    try:
        await coord.set_manifest(_manifest())
        cert, csr = _marble()
        with pytest.raises(CollateralError) as info:
            await coord.marbles.activate_marblerun(_req(csr, (VECTORS / "sgx_quote").read_bytes()), cert)
        assert status_of(info.value) is GrpcStatus.UNAVAILABLE
    finally:
        await coord.close()


async def test_an_empty_quote_is_accepted_only_in_simulation(tmp_path: Path) -> None:
    coord = await _open(tmp_path / "real", verifier=FakeSgxVerifier())
    sim = await _open(tmp_path / "sim", verifier=FakeSgxVerifier(), simulation=True)
    try:
        for c in (coord, sim):
            await c.set_manifest(_manifest())
        cert, csr = _marble()
        with pytest.raises(ActivationRefused) as info:
            await coord.marbles.activate_marblerun(_req(csr, b""), cert)
        assert "empty quote" in info.value.message and "simulation" in info.value.message
        outcome = await sim.marbles.activate_marblerun(_req(csr, b""), cert)
        assert PbActivationResp.FromString(outcome.payload).Parameters.Env["SEAL"]
    finally:
        await coord.close()
        await sim.close()


@pytest.mark.parametrize("oe_header", [False, True], ids=["raw", "oe-header"])
async def test_a_quote_binds_to_exactly_the_presented_certificate(tmp_path: Path, oe_header: bool) -> None:
    coord = await _open(tmp_path, verifier=FakeSgxVerifier())
    try:
        await coord.set_manifest(_manifest())
        cert, csr = _marble()
        other_cert, _ = _marble()
        # The fake verifier's report data is the raw quote's first 64 bytes.
        raw = hashlib.sha256(cert).digest() + bytes(32) + bytes(400)
        evidence = add_oe_header(raw) if oe_header else raw
        with pytest.raises(ActivationRefused) as info:
            await coord.marbles.activate_marblerun(_req(csr, evidence), other_cert)
        assert info.value.reason == "binding"
        outcome = await coord.marbles.activate_marblerun(_req(csr, evidence), cert)
        assert PbActivationResp.FromString(outcome.payload).Parameters.Env["SEAL"]
    finally:
        await coord.close()


# --------------------------------------------------------------------------- monotonic counters


def _marble_cert(
    coord: Coordinator, marble_type: str = "backend", marble_uuid: uuid_mod.UUID | None = None
) -> bytes:
    """A Marble certificate as an activation issues it (under the current Marble root)."""
    leaf = coord.prepared.leaf_issuer.issue(
        marble_uuid or uuid_mod.uuid4(), marble_type, ("localhost",), PINNED
    )
    return leaf.cert_der


async def test_counters_are_off_without_the_feature_gate(tmp_path: Path) -> None:
    coord = await _open(tmp_path, verifier=FakeSgxVerifier(), simulation=True)
    try:
        with pytest.raises(AuthorizationError, match="add MonotonicCounter to the manifest"):
            await coord.marbles.monotonic_counter(None, "c", 1)
        await coord.set_manifest(_manifest())
        with pytest.raises(AuthorizationError, match="add MonotonicCounter to the manifest"):
            await coord.marbles.monotonic_counter(_marble_cert(coord), "c", 1)
    finally:
        await coord.close()


async def test_only_a_marble_certificate_of_the_current_root_authenticates(tmp_path: Path) -> None:
    coord = await _open(tmp_path, verifier=FakeSgxVerifier(), simulation=True)
    try:
        await coord.set_manifest(_manifest(("monotoniccounter",)))  # the gate is case-insensitive
        other_root = create_root_ca(["localhost"], PINNED)
        _, other_marble_root = create_intermediate(other_root, ["localhost"], PINNED)
        foreign = LeafIssuer(other_marble_root).issue(uuid_mod.uuid4(), "backend", (), PINNED).cert_der
        self_signed, _ = _marble()  # what a MarbleRun premain presents at activation
        for cert, why in (
            (None, "no client certificate"),
            (b"junk", "cannot be parsed"),
            (foreign, "not issued by the current Marble root"),
            (self_signed, "not issued by the current Marble root"),
        ):
            with pytest.raises(AuthenticationError, match=why):
                await coord.marbles.monotonic_counter(cert, "c", 1)
        assert coord.deployment.counters == {}
    finally:
        await coord.close()


async def test_counter_values_only_grow_and_the_answer_is_the_previous_value(tmp_path: Path) -> None:
    coord = await _open(tmp_path, verifier=FakeSgxVerifier(), simulation=True)
    try:
        await coord.set_manifest(_manifest(("MonotonicCounter",)))
        marble_uuid = uuid_mod.uuid4()
        cert = _marble_cert(coord, marble_uuid=marble_uuid)
        count = coord.marbles.monotonic_counter
        assert [await count(cert, "c", v) for v in (0, 5, 3, 7, 7, 2**64 - 1)] == [0, 0, 5, 5, 7, 7]
        assert await count(cert, "other", 1) == 0
        # Another activation of the same Marble (same UUID and type): the same counters.
        assert await count(_marble_cert(coord, marble_uuid=marble_uuid), "c", 0) == 2**64 - 1
        # Another UUID: its own counters.
        assert await count(_marble_cert(coord), "c", 0) == 0
        key = counter_id("backend", marble_uuid.bytes, "c")
        assert key.split(":") == [
            "YmFja2VuZA==",
            base64.b64encode(marble_uuid.bytes).decode(),
            "Yw==",
        ]
        assert coord.deployment.counters[key] == 2**64 - 1
        for name, value in (
            ("c", -1),
            ("c", 2**64),
            ("c", 1.0),
            ("c", True),
            ("c", "1"),
            (7, 1),
            (None, 1),
            ("\ud800", 1),
            ("x" * 1025, 1),
        ):
            with pytest.raises(RequestError):
                await count(cert, name, value)
    finally:
        await coord.close()


async def test_concurrent_counter_raises_are_serialised_exactly_and_persisted(tmp_path: Path) -> None:
    coord = await _open(tmp_path, verifier=FakeSgxVerifier(), simulation=True)
    try:
        await coord.set_manifest(_manifest(("MonotonicCounter",)))
        marble_uuid = uuid_mod.uuid4()
        cert = _marble_cert(coord, marble_uuid=marble_uuid)
        values = list(range(1, 101))
        random.Random(7).shuffle(values)
        previous = await asyncio.gather(*(coord.marbles.monotonic_counter(cert, "n", v) for v in values))
        # Some serial order explains every answer: the calls that raised the counter form a chain
        # (each one's previous value is the value the one before it set), ending at the maximum;
        # every other call saw a value at least its own, set by a call of that chain (or nothing).
        raised = sorted((v, p) for v, p in zip(values, previous, strict=True) if v > p)
        assert raised[0][1] == 0 and raised[-1][0] == 100
        assert all(raised[i][1] == raised[i - 1][0] for i in range(1, len(raised)))
        chain = {0} | {v for v, _ in raised}
        assert all(p in chain and p >= v for v, p in zip(values, previous, strict=True) if v <= p)
    finally:
        await coord.close()
    reopened = await _open(tmp_path, verifier=FakeSgxVerifier(), simulation=True)
    try:
        assert await reopened.marbles.monotonic_counter(cert, "n", 0) == 100
    finally:
        await reopened.close()
