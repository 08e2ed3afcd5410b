"""A Marble asking for the Coordinator's DNS name is refused (issue 11, #9).

Its certificate would chain to the Coordinator root with serverAuth, so ``curl --cacert root.pem``
and MarbleRun's CLI would accept it for the Coordinator's name.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.errors import ActivationRefused
from marblekeep.marble.protocol import (
    ActivationRequest,
    EvidenceType,
    encode_activation_request,
    expected_report_data,
    open_parameters,
)
from marblekeep.service import Coordinator, CoordinatorConfig

MANIFEST = json.dumps(
    {"Packages": {"pkg": {"UniqueID": "aa" * 32}}, "Marbles": {"web": {"Package": "pkg"}}}
).encode()


async def _activate(coord: Coordinator, names: tuple[str, ...]) -> x509.Certificate:
    key = X25519PrivateKey.generate()
    req = ActivationRequest(
        marble_type="web",
        uuid=uuid.uuid4(),
        dns_names=names,
        hpke_public_key=key.public_key().public_bytes_raw(),
        nonce=coord.challenge(),
        evidence_type=EvidenceType.SIMULATION,
        evidence=b"",
    )
    req = replace(req, evidence=expected_report_data(req))
    outcome = await coord.activate(encode_activation_request(req))
    params = open_parameters(outcome.sealed, key, req)
    return x509.load_pem_x509_certificate(params.env["MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN"])


async def test_marble_cannot_take_the_coordinators_name(tmp_path: Path) -> None:
    config = CoordinatorConfig(
        simulation=True, seal_dir=tmp_path / "seal", dns_names=("localhost", "coordinator.example")
    )
    coord = await Coordinator.open(config)
    try:
        await coord.set_manifest(MANIFEST)
        for names in (("coordinator.example",), ("web.example", "COORDINATOR.example."), ("*.example",)):
            with pytest.raises(ActivationRefused, match="Coordinator itself") as err:
                await _activate(coord, names)
            assert err.value.reason == "dns_names"
        # MarbleRun's default (localhost) and other names still work
        leaf = await _activate(coord, ("localhost", "web.example"))
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost", "web.example"]
    finally:
        await coord.close()
