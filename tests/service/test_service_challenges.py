"""Challenges cannot be flushed, and one client cannot exhaust the used-nonce set (issue 11, #6)."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.errors import ActivationRefused, TooManyRequests
from marblekeep.marble.protocol import (
    ActivationRequest,
    ChallengeBook,
    EvidenceType,
    encode_activation_request,
    expected_report_data,
)
from marblekeep.service import Coordinator, CoordinatorConfig

MANIFEST = json.dumps(
    {
        "Packages": {"pkg": {"UniqueID": "aa" * 32}},
        "Marbles": {
            "backend": {"Package": "pkg", "Parameters": {"Env": {"K": "{{ hex .MarbleRun.SealKey }}"}}}
        },
    }
).encode()


@pytest.fixture
async def coord(tmp_path: Path) -> Coordinator:
    c = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=tmp_path / "seal"))
    await c.set_manifest(MANIFEST)
    yield c  # type: ignore[misc]
    await c.close()


def _body(nonce: bytes) -> bytes:
    req = ActivationRequest(
        marble_type="backend",
        uuid=uuid.uuid4(),
        dns_names=("localhost",),
        hpke_public_key=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        nonce=nonce,
        evidence_type=EvidenceType.SIMULATION,
        evidence=b"",
    )
    return encode_activation_request(replace(req, evidence=expected_report_data(req)))


async def test_a_challenge_survives_a_flood_of_challenges(coord: Coordinator) -> None:
    pending = coord.challenge()
    for _ in range(20_000):  # twice the old book's capacity
        coord.challenge()
    outcome = await coord.activate(_body(pending))
    assert outcome.marble_type == "backend"


async def test_replays_and_foreign_nonces_are_refused_as_replay(coord: Coordinator) -> None:
    body = _body(coord.challenge())
    await coord.activate(body, "10.0.0.1")
    with pytest.raises(ActivationRefused, match="already used") as err:
        await coord.activate(body, "10.0.0.2")
    assert err.value.reason == "replay"
    with pytest.raises(ActivationRefused, match="unknown") as err:
        await coord.activate(_body(os.urandom(32)), "10.0.0.1")
    assert err.value.reason == "replay"


async def test_one_address_cannot_fill_the_used_set(coord: Coordinator) -> None:
    coord.challenges = ChallengeBook(os.urandom(32), max_used=4, max_used_per_source=2)
    for _ in range(2):
        await coord.activate(_body(coord.challenge()), "10.0.0.66")
    with pytest.raises(TooManyRequests, match="from this address") as err:
        await coord.activate(_body(coord.challenge()), "10.0.0.66")
    assert err.value.http_status == 429
    # others still get in, until the set is full
    await coord.activate(_body(coord.challenge()), "10.0.0.1")
    await coord.activate(_body(coord.challenge()), "10.0.0.2")
    with pytest.raises(TooManyRequests, match="in all"):
        await coord.activate(_body(coord.challenge()), "10.0.0.3")
