"""docs/protocol.md's worked example is recomputed here, so the page and the code cannot drift apart."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from marblekeep.marble import premain, protocol
from marblekeep.marble.protocol import (
    ActivationRequest,
    EvidenceType,
    MarbleParameters,
    binding_digest,
    binding_preimage,
    encode_activation_request,
    expected_report_data,
    hpke_info,
    open_parameters,
    parse_activation_request,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

NONCE = bytes(range(32))
PRIVATE_KEY = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
PUBLIC_KEY = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
MARBLE_TYPE = "backend"
MARBLE_UUID = UUID("0f7b6a3e-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
DNS_NAMES = ("localhost", "backend.default.svc")
DIGEST_HEX = "74eeb382052008f76d86a54583f0e543905d007886b0c5b689b1fae1c0b2da22"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def worked_example(doc: str) -> str:
    return doc.split("## 9. Worked example", 1)[1]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def request() -> ActivationRequest:
    req = ActivationRequest(
        MARBLE_TYPE, MARBLE_UUID, DNS_NAMES, PUBLIC_KEY, NONCE, EvidenceType.SIMULATION, b""
    )
    return ActivationRequest(**{**req.__dict__, "evidence": expected_report_data(req)})


def test_inputs_listed_in_the_doc(doc: str) -> None:
    example = worked_example(doc)
    for value in (PRIVATE_KEY.hex(), PUBLIC_KEY.hex(), str(MARBLE_UUID), *DNS_NAMES, f"`{MARBLE_TYPE}`"):
        assert value in example
    assert X25519PrivateKey.from_private_bytes(PRIVATE_KEY).public_key().public_bytes_raw() == PUBLIC_KEY


def test_preimage_block_matches_field_by_field(doc: str) -> None:
    block = code_blocks(worked_example(doc))[0]
    # the hex columns of each line; the right-hand comments are not hex
    hex_tokens = [tok for tok in block.split() if re.fullmatch(r"(?:[0-9a-f]{2}){4,}", tok)]
    preimage = binding_preimage(NONCE, PUBLIC_KEY, MARBLE_TYPE, MARBLE_UUID, DNS_NAMES)
    assert bytes.fromhex("".join(hex_tokens)) == preimage
    assert f"Binding preimage ({len(preimage)} bytes)" in doc


def test_digest_and_info_in_the_doc(doc: str) -> None:
    digest = binding_digest(NONCE, PUBLIC_KEY, MARBLE_TYPE, MARBLE_UUID, DNS_NAMES)
    assert digest.hex() == DIGEST_HEX
    blocks = code_blocks(worked_example(doc))
    assert blocks[1].strip() == DIGEST_HEX
    assert blocks[2].strip() == hpke_info(NONCE, MARBLE_UUID).hex()


def test_request_body_in_the_doc(doc: str) -> None:
    body = code_blocks(worked_example(doc))[3].strip().encode()
    assert parse_activation_request(body) == request()
    assert body == encode_activation_request(request())


def test_sealed_example_opens_to_the_documented_plaintext(doc: str) -> None:
    blocks = code_blocks(worked_example(doc))
    sealed = base64.b64decode(blocks[4].strip(), validate=True)
    plaintext = json.loads(blocks[5])
    key = X25519PrivateKey.from_private_bytes(PRIVATE_KEY)
    params = open_parameters(sealed, key, request())
    assert params == MarbleParameters(
        files={"config/app.conf": b"greeting = hello\n"}, env={"GREETING": b"hi"}, argv=("./app", "serve")
    )
    assert params.files == {k: base64.b64decode(v) for k, v in plaintext["Files"].items()}
    assert params.env == {k: base64.b64decode(v) for k, v in plaintext["Env"].items()}
    assert list(params.argv) == plaintext["Argv"]


def test_doc_states_the_constants_the_code_uses(doc: str) -> None:
    assert f'"{protocol.BINDING_TAG.decode()}"' in doc
    assert f'"{protocol.HPKE_INFO_TAG.decode()}"' in doc
    assert f"`POST {protocol.CHALLENGE_PATH}`" in doc
    assert f"`POST {protocol.ACTIVATE_PATH}`" in doc
    assert f"{protocol.MAX_ACTIVATION_BODY:,}".replace(",", " ") in doc
    assert f"{protocol.MAX_EVIDENCE_BYTES:,}".replace(",", " ") in doc
    assert f"min({premain.BACKOFF_CAP:g} s, {premain.BACKOFF_INITIAL:g} s" in doc
    assert f"default {premain.DEFAULT_ACTIVATION_TIMEOUT:g} s" in doc
