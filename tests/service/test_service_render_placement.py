"""Where an activation's render runs (activations.py, ``MarbleActivations._render``): in a worker
thread the first time a Marble type renders on a state, and whenever its Parameters were large; on
the event loop once the type rendered small on the same state (counts aside). The answers are the
same either way; only the hand-over to a thread is saved."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import marblekeep.activations as activations_module
from marblekeep.activations import INLINE_RENDER_MAX_BYTES
from marblekeep.marble.protocol import (
    ActivationRequest,
    ChallengeBook,
    EvidenceType,
    encode_activation_request,
    expected_report_data,
    open_parameters,
)
from marblekeep.service import Coordinator, CoordinatorConfig

BIG = b"x" * (INLINE_RENDER_MAX_BYTES + 1024)
MANIFEST = {
    "Packages": {"p": {"Debug": True, "SignerID": "00", "ProductID": 1, "SecurityVersion": 1}},
    "Marbles": {
        "small": {
            "Package": "p",
            "MaxActivations": 1000,
            "Parameters": {"Env": {"K": "{{ hex .Secrets.k }}"}},
        },
        "big": {
            "Package": "p",
            "Parameters": {
                "Files": {
                    "/big": {
                        "Encoding": "base64",
                        "NoTemplates": True,
                        "Data": base64.b64encode(BIG).decode(),
                    }
                }
            },
        },
    },
    "Secrets": {"k": {"Type": "symmetric-key", "Size": 128, "Shared": True}},
}


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread each render (core activate call) ran in."""
    seen: list[int] = []
    real: Callable[..., Any] = activations_module.activate

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(activations_module, "activate", recording)
    return seen


async def activate(coord: Coordinator, marble_type: str) -> dict[str, bytes]:
    key = X25519PrivateKey.generate()
    req = ActivationRequest(
        marble_type=marble_type,
        uuid=uuid.uuid4(),
        dns_names=("localhost",),
        hpke_public_key=key.public_key().public_bytes_raw(),
        nonce=coord.challenge(),
        evidence_type=EvidenceType.SIMULATION,
        evidence=b"",
    )
    req = dataclasses.replace(req, evidence=expected_report_data(req))
    outcome = await coord.activate(encode_activation_request(req))
    params = open_parameters(outcome.sealed, key, req)
    return {**params.files, **{k: v.encode() if isinstance(v, str) else v for k, v in params.env.items()}}


async def test_small_parameters_render_on_the_loop_after_the_first_and_large_ones_in_a_thread(
    tmp_path: Path, threads: list[int]
) -> None:
    coord = await Coordinator.open(CoordinatorConfig(simulation=True, seal_dir=tmp_path / "seal"))
    coord.challenges = ChallengeBook(b"\x01" * 32, max_used=10_000, max_used_per_source=10_000)
    try:
        await coord.set_manifest(json.dumps(MANIFEST).encode())
        loop_thread = threading.get_ident()

        answers = [await activate(coord, "small") for _ in range(3)]
        assert threads[0] != loop_thread  # the first render of a type on this state: in a thread
        assert threads[1:] == [loop_thread, loop_thread]  # it was small: on the loop since
        assert len({a["K"] for a in answers}) == 1  # same shared key either way
        assert coord.deployment.activations == {"small": 3}  # counted commits keep it on the loop

        threads.clear()
        for _ in range(2):
            assert (await activate(coord, "big"))["/big"] == BIG
        assert all(t != loop_thread for t in threads)  # large Parameters: always in a thread

        threads.clear()
        async with coord.lock:  # a change beyond the counts (same values, new objects)
            dep = coord.deployment
            await coord.commit(dataclasses.replace(dep, secrets=dict(dep.secrets)))
        await activate(coord, "small")
        await activate(coord, "small")
        assert threads[0] != loop_thread and threads[1] == loop_thread
    finally:
        await coord.close()
