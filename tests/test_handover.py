"""The attested key hand-over's messages, identity policy and exchange (marblekeep/handover.py).

The exchange runs the real server handler (:func:`answer_join`) and the real client
(:class:`HandoverClient`) with a deterministic fake TEE: its "quote" is a JSON description of the
enclave followed by the 64 bytes of report data, and its verifier returns exactly those claims.
That isolates the policy and the binding from DCAP (checked with real quotes elsewhere); the
end-to-end test with real processes is tests/e2e/test_e2e_handover.py.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import logging
import os
from typing import Any

import pytest

from marblekeep.attestation.claims import TeeClaims, TeeKind
from marblekeep.errors import AttestationError, RequestError, StateError
from marblekeep.handover import (
    HandoverClient,
    Identity,
    JoinRequest,
    advertised_address,
    answer_join,
    check_peer,
    encode_join,
    join_report_data,
    parse_answer,
    parse_join,
)

SGX = TeeClaims(
    kind=TeeKind.SGX,
    tcb_status="UpToDate",
    mrenclave="aa" * 32,
    mrsigner="bb" * 32,
    isv_prod_id=7,
    isv_svn=3,
)
SIM = TeeClaims(kind=TeeKind.SIMULATION)


def now() -> dt.datetime:
    return dt.datetime(2026, 12, 6, tzinfo=dt.UTC)


# -- identity policy -------------------------------------------------------------------------


def test_product_key_same_signer_and_product_with_a_newer_svn_may_join() -> None:
    check_peer(
        SGX,
        dataclasses.replace(SGX, isv_svn=4, mrenclave="cc" * 32),
        seal_mode="ProductKey",
        peer_role="joiner",
    )
    check_peer(SGX, SGX, seal_mode="ProductKey", peer_role="joiner")
    # the joiner accepts an older server (the key it receives must open the state anyway)
    check_peer(SGX, dataclasses.replace(SGX, isv_svn=1), seal_mode="ProductKey", peer_role="server")


@pytest.mark.parametrize(
    ("change", "mode", "message"),
    [
        ({"isv_svn": 2}, "ProductKey", "ISV SVN 2 is below this replica's 3"),
        ({"mrsigner": "dd" * 32}, "ProductKey", "MRSIGNER"),
        ({"isv_prod_id": 8}, "ProductKey", "ISV product ID 8"),
        ({"debug": True}, "ProductKey", "Debug must be equal"),
        ({"tcb_status": "OutOfDate"}, "ProductKey", "TCB status OutOfDate"),
        ({"mrenclave": "cc" * 32}, "UniqueKey", "MRENCLAVE"),
        ({"kind": TeeKind.TDX}, "ProductKey", "only SGX replicas"),
    ],
)
def test_other_identities_are_refused(change: dict[str, Any], mode: str, message: str) -> None:
    with pytest.raises(AttestationError, match=message):
        check_peer(SGX, dataclasses.replace(SGX, **change), seal_mode=mode, peer_role="joiner")


def test_simulation_evidence_only_between_simulation_replicas() -> None:
    check_peer(SIM, SIM, seal_mode="ProductKey", peer_role="joiner")
    with pytest.raises(AttestationError, match="sent simulation evidence, but this replica runs in a TEE"):
        check_peer(SGX, SIM, seal_mode="ProductKey", peer_role="joiner")
    with pytest.raises(AttestationError, match="sent TEE evidence, but this replica runs with --simulation"):
        check_peer(SIM, SGX, seal_mode="ProductKey", peer_role="server")


# -- messages ----------------------------------------------------------------------------------


def join_body(**change: Any) -> bytes:
    doc = json.loads(encode_join(JoinRequest("r1", b"n" * 32, b"k" * 32, "simulation", b"e" * 64)))
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"x" * (256 * 1024 + 1), "larger than"),
        (b"[]", "JSON object"),
        (b"{", "not JSON"),
        (join_body(nonce="AAAA"), "'nonce' must be 32 bytes"),
        (join_body(hpkePublicKey="%%%"), "'hpkePublicKey' is not valid base64"),
        (join_body(evidenceType="epid"), "'evidenceType' must be"),
        (join_body(replicaId=""), "'replicaId'"),
        (join_body(evidence=base64.b64encode(bytes(128 * 1024 + 1)).decode()), "'evidence' is larger"),
    ],
)
def test_bad_requests_name_the_field(body: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_join(body)


def test_bad_answers_name_the_field() -> None:
    with pytest.raises(RequestError, match="'epoch'"):
        parse_answer({"epoch": -1})
    with pytest.raises(RequestError, match="'serverNonce'"):
        parse_answer({"epoch": 1})


def test_advertised_address() -> None:
    assert advertised_address("127.0.0.1:2001") == "127.0.0.1:2001"
    assert advertised_address(":2001").endswith(":2001") and not advertised_address(":2001").startswith(":")
    assert advertised_address("0.0.0.0:2001", "replica-1.svc:2001") == "replica-1.svc:2001"


# -- the exchange ------------------------------------------------------------------------------


class FakeTee:
    """Issuer and verifier of a fake TEE whose quote is ``JSON(claims) || 0x00 || report data``."""

    def __init__(self, claims: TeeClaims) -> None:
        self.claims = claims

    def issue(self, report_data: bytes) -> bytes:
        doc = {f.name: getattr(self.claims, f.name) for f in dataclasses.fields(TeeClaims)}
        doc.update(kind=self.claims.kind.value, report_data="", advisory_ids=[], rtmrs=[])
        return json.dumps(doc).encode() + b"\x00" + report_data

    async def verify(self, evidence_type: str, evidence: bytes, at: dt.datetime) -> TeeClaims:
        head, _, report_data = evidence.partition(b"\x00")
        doc = json.loads(head)
        doc.update(kind=TeeKind(doc["kind"]), report_data=report_data, advisory_ids=(), rtmrs=())
        return TeeClaims(**doc)


def identity(claims: TeeClaims) -> Identity:
    tee = FakeTee(claims)
    return Identity(claims.kind is TeeKind.SIMULATION, tee, tee, now)


class Source:
    def __init__(self, seal_mode: str = "ProductKey") -> None:
        self.key = os.urandom(32)
        self.store_id = os.urandom(16)
        self.seal_mode = seal_mode

    def handover_material(self) -> tuple[bytes, bytes, int, str]:
        return self.key, self.store_id, 42, self.seal_mode


class Members:
    async def members(self, limit: int = 64) -> dict[str, bytes]:
        return {"server-1": json.dumps({"address": "127.0.0.1:1"}).encode()}


def client(joiner: Identity, server: Identity, source: Any, *, tamper: bool = False) -> HandoverClient:
    async def post(address: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        try:
            data = await answer_join(body, source, server, "127.0.0.1")
        except (AttestationError, RequestError, StateError) as exc:
            return exc.http_status, json.dumps(
                {"status": "fail", "data": None, "message": exc.message}
            ).encode()
        if tamper:
            sealed = bytearray(base64.b64decode(data["sealedKey"]))
            sealed[-1] ^= 1
            data["sealedKey"] = base64.b64encode(bytes(sealed)).decode()
        return 200, json.dumps({"status": "success", "data": data}).encode()

    async def no_sleep(seconds: float) -> None:
        return None

    return HandoverClient(Members(), joiner, "joiner-1", wait=0, post=post, sleep=no_sleep)


@pytest.mark.parametrize("claims", [SGX, SIM])
async def test_same_identity_receives_the_key_and_the_floor(
    claims: TeeClaims, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    source = Source()
    got = await client(identity(claims), identity(claims), source).obtain()
    assert got is not None
    key, floor = got
    assert key == source.key and floor.store_id == source.store_id and floor.epoch == 42
    assert "deployment key handed over to a joining replica after attestation" in caplog.text
    assert source.key.hex() not in caplog.text and repr(source.key) not in caplog.text


async def test_another_enclave_is_refused_in_unique_key_mode_with_a_log_line_on_both_sides(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    joiner = identity(dataclasses.replace(SGX, mrenclave="cc" * 32))
    source = Source("UniqueKey")
    assert await client(joiner, identity(SGX), source).obtain() is None
    server_lines = [r for r in caplog.records if r.getMessage() == "key hand-over refused"]
    assert server_lines and "MRENCLAVE" in server_lines[0].__dict__["reason"]
    joiner_lines = [r for r in caplog.records if r.getMessage() == "key hand-over from a replica failed"]
    assert joiner_lines and "refused the key hand-over" in joiner_lines[0].__dict__["reason"]
    assert source.key.hex() not in caplog.text


async def test_joiner_refuses_a_server_of_another_signer() -> None:
    # a server that accepts the joiner (it believes it has the joiner's identity) but whose evidence
    # shows another signer: the joiner checks the server on its own
    other = FakeTee(dataclasses.replace(SGX, mrsigner="ee" * 32))
    server = Identity(False, other, FakeTee(SGX), now, _own=SGX)
    joiner = identity(SGX)
    c = client(joiner, server, Source())
    with pytest.raises(AttestationError, match="server's MRSIGNER"):
        await c._ask("server-1", "127.0.0.1:1")


async def test_a_changed_answer_does_not_verify() -> None:
    c = client(identity(SGX), identity(SGX), Source(), tamper=True)
    with pytest.raises(AttestationError, match="does not bind this exchange"):
        await c._ask("server-1", "127.0.0.1:1")


async def test_evidence_bound_to_another_exchange_is_refused() -> None:
    server, source = identity(SGX), Source()
    joiner = identity(SGX)
    first = JoinRequest("j", os.urandom(32), os.urandom(32), "sgx-dcap", b"")
    evidence = await joiner.evidence(join_report_data(first.nonce, first.hpke_public_key))
    replayed = dataclasses.replace(first, hpke_public_key=os.urandom(32), evidence=evidence)
    with pytest.raises(AttestationError, match="does not bind this exchange"):
        await answer_join(encode_join(replayed), source, server, "127.0.0.1")


async def test_a_replica_without_a_state_says_so() -> None:
    class Empty:
        def handover_material(self) -> tuple[bytes, bytes, int, str]:
            raise StateError("this replica holds no stored state yet")

    c = client(identity(SIM), identity(SIM), Empty())
    with pytest.raises(StateError, match="cannot hand the key over"):
        await c._ask("server-1", "127.0.0.1:1")
