"""Attacks on the Marble API and the Client API: refused with clear errors, never a 5xx.

Covers ARCHITECTURE.md §2 (single-use challenge, evidence bound to the request fields, HPKE
sealing), simulation evidence against a production Coordinator, body limits, and malformed input
on every endpoint.
"""

from __future__ import annotations

import base64
import json
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import MarbleClient, Prepared, RunningCoordinator, activation_manifest_bytes
from marblekeep.errors import SealError
from marblekeep.marble.protocol import (
    ACTIVATE_PATH,
    CHALLENGE_PATH,
    MAX_ACTIVATION_BODY,
    encode_activation_request,
    expected_report_data,
    open_parameters,
)
from marblekeep.store.kek import SimulationKeyFileProvider

REPLAY = "unknown, expired or already used challenge nonce"
BINDING = "does not match the activation request's binding"


def refusal(response: httpx.Response, status: int = 403) -> str:
    """Assert a JSend fail with ``status``; return its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["status"] == "fail"
    message: str = doc["message"]
    assert message
    return message


# ------------------------------------------------------------------------------------------ replay


def test_replayed_activation_is_refused_and_burns_nothing(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        first = marble.prepare("twice")
        ok = marble.post(first.body())
        params = marble.open(first, ok)
        assert set(params.env) >= {"MARBLE_PREDEFINED_PRIVATE_KEY", "MARBLE_PREDEFINED_ROOT_CA"}
        assert deployed.coord.deployment.activations["twice"] == 1

        # The same request again, byte for byte: refused as a replay, before any counting.
        message = refusal(marble.post(first.body()))
        assert REPLAY in message
        assert deployed.coord.deployment.activations["twice"] == 1

        # So the second legitimate Marble of a MaxActivations: 2 type still gets in ...
        marble.activate("twice")
        assert deployed.coord.deployment.activations["twice"] == 2
        # ... and a third does not (MaxActivations is really enforced).
        message = refusal(marble.post(marble.prepare("twice").body()))
        assert "reached max activations count (2)" in message


def test_concurrent_replays_activate_exactly_once(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        prepared = marble.prepare("backend")
        body = prepared.body()
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: marble.post(body), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [403] * 7
    for r in responses:
        if r.status_code == 403:
            assert REPLAY in r.json()["message"]


def test_concurrent_distinct_activations_respect_max_activations(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        bodies = [marble.prepare("twice").body() for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(marble.post, bodies))
    assert sorted(r.status_code for r in responses) == [200, 200] + [403] * 6
    assert deployed.coord.deployment.activations["twice"] == 2
    for r in responses:
        if r.status_code == 403:
            assert "reached max activations count (2)" in r.json()["message"]


def test_unknown_nonce_is_refused_as_replay(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        prepared = marble.prepare()
        forged = replace(prepared.request, nonce=bytes(32))
        forged = replace(forged, evidence=expected_report_data(forged))  # self-consistent, never issued
        assert REPLAY in refusal(marble.post(encode_activation_request(forged)))


def test_intercepted_answer_is_unreadable_to_anyone_else(deployed: RunningCoordinator) -> None:
    """A relay sees the sealed Parameters but cannot open them without the Marble's key."""
    with deployed.marble() as marble:
        prepared = marble.prepare()
        response = marble.post(prepared.body())
        assert response.status_code == 200
        sealed = base64.b64decode(response.json()["data"]["sealedParameters"])
        with pytest.raises(SealError):
            open_parameters(sealed, X25519PrivateKey.generate(), prepared.request)
        assert marble.open(prepared, response).env["SHARED_KEY"]


# ----------------------------------------------------------------------------------------- binding


def _other_key(prepared: Prepared) -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


ALTERATIONS: dict[str, Callable[[Prepared, MarbleClient], dict[str, Any]]] = {
    "type": lambda p, m: {"marbleType": "once"},
    "uuid": lambda p, m: {"uuid": str(uuid_mod.uuid4())},
    "dns name added": lambda p, m: {"dnsNames": [*p.request.dns_names, "evil.example"]},
    "dns name replaced": lambda p, m: {"dnsNames": ["evil.example"]},
    "dns names emptied": lambda p, m: {"dnsNames": []},
    "hpke key": lambda p, m: {"hpkePublicKey": base64.b64encode(_other_key(p)).decode()},
    # another nonce that the Coordinator did issue (an unissued one is a replay, above)
    "nonce": lambda p, m: {"nonce": base64.b64encode(m.challenge()).decode()},
    "evidence": lambda p, m: {
        "evidence": {"type": "simulation", "data": base64.b64encode(bytes(64)).decode()}
    },
}


@pytest.mark.parametrize("field", sorted(ALTERATIONS))
def test_bound_field_altered_after_evidence_is_refused(deployed: RunningCoordinator, field: str) -> None:
    with deployed.marble() as marble:
        prepared = marble.prepare("backend", dns_names=("localhost", "backend.internal"))
        doc = prepared.doc() | ALTERATIONS[field](prepared, marble)
        response = marble.post(json.dumps(doc))
        message = refusal(response)
        assert BINDING in message, message
        # The legitimate Marble, with its own unaltered request, is not locked out by the attempt.
        assert marble.activate("backend").env["SEAL_KEY"]
    assert deployed.coord.deployment.activations.get("once", 0) == 0


def test_altered_type_does_not_consume_a_max_activations_slot(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        prepared = marble.prepare("backend")
        refusal(marble.post(json.dumps(prepared.doc() | {"marbleType": "once"})))
        assert "ONCE_KEY" in marble.activate("once").env  # the one activation is still available


@pytest.mark.parametrize("key", [bytes(32), b"\x01" + bytes(31)], ids=["zero", "one"])
def test_low_order_hpke_key_is_400_and_uses_no_activation(deployed: RunningCoordinator, key: bytes) -> None:
    """A self-consistent request (binding over the bad key) whose answer cannot be sealed."""
    with deployed.marble() as marble:
        prepared = marble.prepare("once")
        bad = replace(prepared.request, hpke_public_key=key)
        bad = replace(bad, evidence=expected_report_data(bad))
        message = refusal(marble.post(encode_activation_request(bad)), 400)
        assert "'hpkePublicKey'" in message
        assert deployed.coord.deployment.activations.get("once", 0) == 0
        assert "ONCE_KEY" in marble.activate("once").env  # the single activation is still there


# ------------------------------------------------------------------------------------- simulation


@pytest.fixture
def production(tmp_path: Path) -> Iterator[RunningCoordinator]:
    """A Coordinator NOT in simulation mode (state sealed with a key file so that it can start)."""
    seal = tmp_path / "prod"
    seal.mkdir()
    running = RunningCoordinator(
        seal, simulation=False, kek_provider=SimulationKeyFileProvider(seal / "kek.key")
    )
    try:
        running.set_manifest()
        yield running
    finally:
        running.stop()


def test_simulation_evidence_refused_by_production_coordinator(production: RunningCoordinator) -> None:
    with production.client() as client:
        status = client.get("/api/v2/status").json()["data"]
    assert status["code"] == 3
    assert "simulation" not in status
    with production.marble() as marble:
        message = refusal(marble.post(marble.prepare("backend").body()))
    assert "simulation evidence was sent to a Coordinator that is not in simulation mode" in message
    assert production.coord.deployment.activations.get("backend", 0) == 0


def test_unverifiable_quote_refused_by_production_coordinator(production: RunningCoordinator) -> None:
    with production.marble() as marble:
        prepared = marble.prepare("once")
        forged = replace(prepared.request, evidence_type="sgx-dcap", evidence=b"\x03\x00" + bytes(1000))
        message = refusal(marble.post(encode_activation_request(forged)))
    assert "quote" in message
    assert production.coord.deployment.activations.get("once", 0) == 0


# ------------------------------------------------------------------------------------- body limits


def test_oversized_activation_body_is_413(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        prepared = marble.prepare()
        doc = prepared.doc() | {"padding": "x" * MAX_ACTIVATION_BODY}
        message = refusal(marble.post(json.dumps(doc)), 413)
        assert "too large" in message
        # exactly at the limit is parsed (and refused for what it is, not for its size)
        body = prepared.body()
        pad = MAX_ACTIVATION_BODY - len(body) - len(',"padding":""')
        at_limit = body[:-1] + b',"padding":"' + b"x" * pad + b'"}'
        assert len(at_limit) == MAX_ACTIVATION_BODY
        response = marble.post(at_limit)
        assert response.status_code == 200, response.text  # unknown fields are ignored


def test_oversized_manifest_is_413(tmp_path: Path) -> None:
    running = RunningCoordinator(tmp_path / "seal", max_manifest_bytes=4096)
    try:
        raw = activation_manifest_bytes()
        big = raw[:-1] + b"," + json.dumps({"Padding": "x" * 5000}).encode()[1:]
        with running.client() as client:
            v2 = client.post("/api/v2/manifest", json={"manifest": base64.b64encode(big).decode()})
            v1 = client.post("/manifest", content=big)
            for response in (v2, v1):
                message = refusal(response, 413)
                assert "manifest" in message
                assert "4096" in message
            assert client.get("/api/v2/status").json()["data"]["code"] == 2
            # a manifest within the limit is still accepted afterwards
            assert client.post("/manifest", content=raw).status_code == 200
    finally:
        running.stop()


def test_body_beyond_client_api_limit_is_413(coordinator: RunningCoordinator) -> None:
    with coordinator.client() as client:
        response = client.post("/manifest", content=b" " * (8 * 1024 * 1024 + 1))
    assert "too large" in refusal(response, 413)


# ---------------------------------------------------------------------------------- malformed input

GOOD_FIELDS = ("marbleType", "uuid", "dnsNames", "hpkePublicKey", "nonce", "evidence")


def _without(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: {k: v for k, v in d.items() if k != name}


MALFORMED_ACTIVATION: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("not json", lambda d: "{not json", "not valid JSON"),
    ("array", lambda d: [d], "must be a JSON object"),
    ("string", lambda d: "activate me", "must be a JSON object"),
    ("type is a number", lambda d: d | {"marbleType": 5}, "'marbleType'"),
    ("empty type", lambda d: d | {"marbleType": ""}, "'marbleType'"),
    ("control chars in type", lambda d: d | {"marbleType": "a\nb"}, "'marbleType'"),
    ("uuid not a uuid", lambda d: d | {"uuid": "not-a-uuid"}, "'uuid'"),
    ("uuid is a number", lambda d: d | {"uuid": 7}, "'uuid'"),
    ("dnsNames a string", lambda d: d | {"dnsNames": "localhost"}, "'dnsNames'"),
    ("dnsNames with a number", lambda d: d | {"dnsNames": ["a", 1]}, "'dnsNames[1]'"),
    ("dnsNames with a space", lambda d: d | {"dnsNames": ["a b"]}, "'dnsNames[0]'"),
    ("key not base64", lambda d: d | {"hpkePublicKey": "@@@@"}, "'hpkePublicKey'"),
    ("key too short", lambda d: d | {"hpkePublicKey": "AAAA"}, "'hpkePublicKey'"),
    ("key url-safe b64", lambda d: d | {"hpkePublicKey": "-_" * 22}, "'hpkePublicKey'"),
    ("nonce not base64", lambda d: d | {"nonce": "!!"}, "'nonce'"),
    ("nonce null", lambda d: d | {"nonce": None}, "'nonce'"),
    ("evidence a string", lambda d: d | {"evidence": "quote"}, "'evidence'"),
    ("evidence unknown type", lambda d: d | {"evidence": {"type": "sev", "data": ""}}, "'evidence.type'"),
    (
        "evidence data bad",
        lambda d: d | {"evidence": {"type": "simulation", "data": "%%"}},
        "'evidence.data'",
    ),
    ("evidence missing data", lambda d: d | {"evidence": {"type": "simulation"}}, "'evidence'"),
    *[(f"missing {name}", _without(name), f"'{name}'") for name in GOOD_FIELDS],
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(m, e, id=name) for name, m, e in MALFORMED_ACTIVATION],
)
def test_malformed_activation_is_400_naming_the_field(
    deployed: RunningCoordinator, mutate: Callable[[dict[str, Any]], Any], expected: str
) -> None:
    with deployed.marble() as marble:
        doc = mutate(marble.prepare().doc())
        body = doc if isinstance(doc, str) and doc.startswith("{") else json.dumps(doc)
        message = refusal(marble.post(body), 400)
    assert expected in message, message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b'{"uuid": 1, "uuid": 2}', "duplicate JSON key 'uuid'"),
        (b'{"marbleType": NaN}', "NaN"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"", "not valid JSON"),
        (b'{"nonce": 1' + b"0" * 5000 + b"}", "activation request"),
    ],
)
def test_malformed_activation_bytes_are_400(deployed: RunningCoordinator, body: bytes, expected: str) -> None:
    with deployed.marble() as marble:
        message = refusal(marble.post(body), 400)
    assert expected in message, message


def test_unknown_type_and_nil_uuid_are_refused(deployed: RunningCoordinator) -> None:
    with deployed.marble() as marble:
        message = refusal(marble.post(marble.prepare("frontend").body()))
        assert "unknown marble type 'frontend'" in message
        assert "backend, once, twice" in message
        message = refusal(marble.post(marble.prepare("backend", uuid_mod.UUID(int=0)).body()))
        assert "nil UUID" in message


def test_activation_before_manifest_is_409_retryable(coordinator: RunningCoordinator) -> None:
    with coordinator.marble() as marble:
        message = refusal(marble.post(marble.prepare().body()), 409)
    assert "set a manifest first" in message


MALFORMED_MANIFEST_V2: list[tuple[bytes, str]] = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b"{}", "manifest: missing or not a string"),
    (b'{"manifest": 5}', "manifest: missing or not a string"),
    (b'{"manifest": "@@@@"}', "manifest: not valid standard base64"),
    (b'{"manifest": "e30"}', "manifest: not valid standard base64"),  # unpadded
    (b'{"manifest": "' + base64.b64encode(b"not json") + b'"}', "manifest"),
    (b'{"manifest": "' + base64.b64encode(b"\xff\x00") + b'"}', "manifest"),
]


@pytest.mark.parametrize(("body", "expected"), MALFORMED_MANIFEST_V2)
def test_malformed_manifest_post_v2_is_400(
    coordinator: RunningCoordinator, body: bytes, expected: str
) -> None:
    with coordinator.client() as client:
        message = refusal(client.post("/api/v2/manifest", content=body), 400)
    assert expected in message, message


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe\x00", b"[]", b"", b"null", b'{"Marbles": 5}'])
def test_malformed_manifest_post_v1_is_400(coordinator: RunningCoordinator, body: bytes) -> None:
    with coordinator.client() as client:
        refusal(client.post("/manifest", content=body), 400)
        assert client.get("/api/v2/status").json()["data"]["code"] == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"nope", "not valid JSON"),
        (b'{"sgxQuote": 1}', "sgxQuote"),
        (b'{"sgxQuote": "**"}', "sgxQuote"),
    ],
)
def test_malformed_sign_quote_is_400(coordinator: RunningCoordinator, body: bytes, expected: str) -> None:
    with coordinator.client() as client:
        response = client.post("/api/v2/sign-quote", content=body)
    assert expected in refusal(response, 400)


# ------------------------------------------------------------------------------ random bytes (fuzz)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    running = RunningCoordinator(tmp_path_factory.mktemp("fuzz") / "seal")
    try:
        yield running
    finally:
        running.stop()


# (API, path, whether the endpoint parses its body)
POST_ENDPOINTS = [
    ("client", "/api/v2/manifest", True),
    ("client", "/manifest", True),
    ("client", "/api/v2/sign-quote", True),
    ("client", "/recover", False),  # always 410
    ("client", "/api/v2/recover", True),
    *[("client", path, True) for path in ("/api/v2/secrets", "/api/v2/update", "/secrets", "/update")],
    ("client", "/api/v2/update-manifest", True),
    ("client", "/api/v2/update-cancel", True),
    ("marble", ACTIVATE_PATH, True),
    ("marble", CHALLENGE_PATH, False),  # ignores its body: a fresh challenge for anyone
]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    endpoint=st.sampled_from(POST_ENDPOINTS),
    body=st.one_of(
        st.binary(max_size=512),
        st.text(max_size=256).map(str.encode),
        st.dictionaries(
            st.sampled_from(["manifest", "sgxQuote", *GOOD_FIELDS]),
            st.one_of(st.none(), st.integers(), st.text(max_size=40), st.lists(st.text(max_size=5))),
            max_size=6,
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_random_bodies_never_5xx(
    fuzz_target: RunningCoordinator, endpoint: tuple[str, str, bool], body: bytes
) -> None:
    api, path, parses = endpoint
    base = fuzz_target.client_url if api == "client" else fuzz_target.marble_url
    with httpx.Client(base_url=base, verify=fuzz_target.ssl_context(), trust_env=False, timeout=30) as c:
        response = c.post(path, content=body)
    assert response.status_code < 500, (path, body, response.text)
    doc = response.json()
    if parses:
        assert 400 <= response.status_code < 500
        if path.endswith("/sign-quote") and response.status_code == 403:
            # a well-formed request while the feature gate is off: MarbleRun's 403 JSend *error*
            assert doc["status"] == "error"
            assert "SignQuoteEndpoint" in doc["message"]
        else:
            assert doc["status"] == "fail"
        assert doc["message"]
    assert fuzz_target.coord.status()[0] == 2


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nonce=st.text(max_size=48))
def test_random_quote_nonces_are_200_or_400(fuzz_target: RunningCoordinator, nonce: str) -> None:
    with fuzz_target.client() as client:
        response = client.get("/api/v2/quote", params={"nonce": nonce})
    try:
        valid = base64.urlsafe_b64encode(base64.urlsafe_b64decode(nonce.encode("ascii"))).decode() == nonce
    except ValueError:
        valid = False
    assert response.status_code == (200 if valid else 400), (nonce, response.text)


# ------------------------------------------------------------------- every POST endpoint, with a user

ALL_CLIENT_POSTS = [
    "/api/v2/manifest",
    "/api/v2/sign-quote",
    "/api/v2/recover",
    "/api/v2/secrets",
    "/api/v2/update",
    "/api/v2/update-manifest",
    "/api/v2/update-cancel",
    "/manifest",
    "/secrets",
    "/update",
    "/update-manifest",
    "/update-cancel",
]

HOSTILE_BODIES = {
    "deep arrays": b"[" * 20000,
    "deep objects": b'{"a":' * 5000,
    "not json": b"\x00\xff garbage",
    "wrong types": b'{"manifest": 1, "secrets": [1], "recoverySecret": {}, "sgxQuote": []}',
    "bad base64": b'{"manifest": "%%%", "recoverySecret": "%%%", "recoverySecretSignature": "%%%"}',
}


@pytest.mark.parametrize("path", ALL_CLIENT_POSTS)
def test_hostile_bodies_on_every_client_post_are_4xx(coordinator: RunningCoordinator, path: str) -> None:
    with coordinator.client() as client:
        for name, body in HOSTILE_BODIES.items():
            response = client.post(path, content=body)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            assert response.json()["status"] == "fail"
    assert coordinator.coord.status()[0] == 2


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[RunningCoordinator, Path, Path]]:
    """A Coordinator whose manifest has a user holding every permission; returns its cert and key."""
    ca = trustme.CA()
    leaf = ca.issue_cert("admin@example")
    cert, key = tmp_path / "admin.pem", tmp_path / "admin.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    manifest = json.loads(activation_manifest_bytes())
    manifest["Secrets"]["user_key"] = {"Type": "symmetric-key", "Size": 128, "UserDefined": True}
    manifest["Users"] = {"admin": {"Certificate": cert.read_text(), "Roles": ["secrets", "pkgs", "update"]}}
    manifest["Roles"] = {
        "secrets": {
            "ResourceType": "Secrets",
            "ResourceNames": ["user_key"],
            "Actions": ["ReadSecret", "WriteSecret"],
        },
        "pkgs": {"ResourceType": "Packages", "ResourceNames": ["pkg"], "Actions": ["UpdateSecurityVersion"]},
        "update": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
    }
    running = RunningCoordinator(tmp_path / "seal")
    try:
        running.set_manifest(json.dumps(manifest).encode())
        yield running, cert, key
    finally:
        running.stop()


@pytest.mark.parametrize("path", ALL_CLIENT_POSTS)
def test_hostile_bodies_from_an_authenticated_user_are_4xx(
    admin: tuple[RunningCoordinator, Path, Path], path: str
) -> None:
    running, cert, key = admin
    ctx = running.ssl_context()
    ctx.load_cert_chain(cert, key)
    with httpx.Client(base_url=running.client_url, verify=ctx, trust_env=False, timeout=30) as client:
        for name, body in HOSTILE_BODIES.items():
            response = client.post(path, content=body)
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
            assert response.status_code != 401, "the user certificate was not accepted"
            assert response.json()["status"] == "fail"
        assert client.get("/api/v2/status").json()["data"]["code"] == 3


def test_challenge_refusals_carry_the_reason_for_the_premain(deployed: RunningCoordinator) -> None:
    """A 403 for an unknown, expired or used nonce says ``data.reason == "replay"``, so that the
    premain starts over with a fresh challenge (issue 11, #6); other refusals carry their label."""
    with deployed.marble() as marble:
        prepared = marble.prepare("backend")
        assert marble.post(prepared.body()).status_code == 200
        again = marble.post(prepared.body())
        unknown = marble.post(json.dumps(prepared.doc() | {"nonce": base64.b64encode(bytes(32)).decode()}))
        wrong_type = marble.prepare("nope")
        refused = marble.post(wrong_type.body())
    assert again.status_code == 403
    assert again.json()["data"] == {"reason": "replay"}
    assert unknown.status_code == 403 and unknown.json()["data"]["reason"] == "replay"
    assert refused.status_code == 403 and refused.json()["data"]["reason"] == "unknown_type"
