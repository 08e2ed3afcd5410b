"""The evidence must carry all 64 bytes of the expected report data (issue 11, #11).

docs/protocol.md §4.1: report_data = binding digest || 32 zero bytes, and the Coordinator refuses
the request unless the evidence carries exactly these 64 bytes. A verifier stands in for DCAP here
and returns claims whose report data differs from the expected value only in its second half.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.errors import ActivationRefused
from marblekeep.marble.protocol import (
    ActivationRequest,
    EvidenceType,
    encode_activation_request,
    expected_report_data,
)
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.kek import SimulationKeyFileProvider

MANIFEST = json.dumps(
    {
        "Packages": {"pkg": {"UniqueID": "aa" * 32}},
        "Marbles": {"backend": {"Package": "pkg", "Parameters": {"Env": {"K": "v"}}}},
    }
).encode()


class ReportDataVerifier:
    """Accepts any evidence and claims that the quote carries the report data it is told to."""

    def __init__(self) -> None:
        self.report_data = b""

    async def verify(self, evidence_type: str, evidence: bytes, now: dt.datetime) -> TeeClaims:
        return TeeClaims(
            kind=TeeKind.SGX,
            report_data=self.report_data,
            tcb_status="UpToDate",
            mrenclave="aa" * 32,
        )


def _request(coord: Coordinator) -> ActivationRequest:
    return ActivationRequest(
        marble_type="backend",
        uuid=uuid.uuid4(),
        dns_names=("backend.example",),
        hpke_public_key=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        nonce=coord.challenge(),
        evidence_type=EvidenceType.SGX_DCAP,
        evidence=b"a quote (the verifier above does not look at it)",
    )


@pytest.mark.parametrize("flip", [32, 47, 63])
async def test_second_half_of_report_data_is_compared(tmp_path: Path, flip: int) -> None:
    verifier = ReportDataVerifier()
    coord = await Coordinator.open(
        CoordinatorConfig(simulation=False, seal_dir=tmp_path / "seal"),
        verifier=verifier,
        kek_provider=SimulationKeyFileProvider(tmp_path / "kek"),
    )
    try:
        await coord.set_manifest(MANIFEST)
        good = _request(coord)
        verifier.report_data = expected_report_data(good)
        outcome = await coord.activate(encode_activation_request(good))
        assert outcome.marble_type == "backend"

        bad = _request(coord)
        altered = bytearray(expected_report_data(bad))
        altered[flip] ^= 0x01
        verifier.report_data = bytes(altered)
        with pytest.raises(ActivationRefused) as err:
            await coord.activate(encode_activation_request(replace(bad)))
        assert err.value.reason == "binding"
        assert "report data does not match" in err.value.message
        # the first 32 bytes alone still bind: a wrong digest is refused as before
        other = _request(coord)
        wrong = bytearray(expected_report_data(other))
        wrong[0] ^= 0x01
        verifier.report_data = bytes(wrong)
        with pytest.raises(ActivationRefused, match="report data does not match"):
            await coord.activate(encode_activation_request(other))
    finally:
        await coord.close()
