"""The governance endpoints over real HTTPS with client certificates: the authorization matrix,
leaf-only authentication, MarbleRun's request/response shapes (v2 and v1), the two-party update
flow, and bad input that must give a 4xx JSend fail naming the field (never a 500)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from harness import RunningCoordinator, b64, changed, governance_manifest_bytes, make_user, user
from marblekeep.core.auditlog import parse_head, verify_log

KEY16 = bytes(range(16))
SVN_5 = json.dumps({"Packages": {"pkg": {"SecurityVersion": 5}}}).encode()


def full_update(**kwargs: Any) -> bytes:
    doc = changed(**kwargs)
    doc["Marbles"]["backend"]["Parameters"]["Env"]["VERSION"] = "2"
    return governance_manifest_bytes(doc)


FULL = full_update()


def propose(rc: RunningCoordinator, raw: bytes = FULL) -> None:
    with rc.client(user("alice")) as c:
        r = c.post("/api/v2/update", json={"manifest": b64(raw)})
    assert r.status_code == 200, r.text


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[RunningCoordinator], None] | None = None
    holder: str = "alice"  # a user with the needed role
    lacking: str = "dave"  # a listed user without it


SECRET_BODY = {"user_key": {"Key": b64(KEY16)}}
ENDPOINTS = [
    Endpoint("GET v2 secrets", "GET", "/api/v2/secrets", {"params": {"s": "user_key"}}),
    Endpoint(
        "GET v2 secrets (reader)",
        "GET",
        "/api/v2/secrets",
        {"params": {"s": "shared_key"}},
        holder="bob",
        lacking="carol",
    ),
    Endpoint("POST v2 secrets", "POST", "/api/v2/secrets", {"json": {"secrets": SECRET_BODY}}, lacking="bob"),
    Endpoint(
        "POST v2 update (package)",
        "POST",
        "/api/v2/update",
        {"json": {"manifest": b64(SVN_5)}},
        lacking="bob",
    ),
    Endpoint(
        "POST v2 update (full)", "POST", "/api/v2/update", {"json": {"manifest": b64(FULL)}}, holder="carol"
    ),
    Endpoint(
        "POST v2 update-manifest",
        "POST",
        "/api/v2/update-manifest",
        {"json": {"manifest": b64(FULL)}},
        propose,
        holder="bob",
    ),
    Endpoint("POST v2 update-cancel", "POST", "/api/v2/update-cancel", {}, propose, holder="carol"),
    Endpoint("GET v1 secrets", "GET", "/secrets", {"params": {"s": "user_key"}}),
    Endpoint("POST v1 secrets", "POST", "/secrets", {"json": SECRET_BODY}),
    Endpoint("POST v1 update", "POST", "/update", {"content": SVN_5}),
    Endpoint("POST v1 update-manifest", "POST", "/update-manifest", {"content": FULL}, propose, holder="bob"),
    Endpoint("POST v1 update-cancel", "POST", "/update-cancel", {}, propose),
]


UNAUTHORIZED = "unauthorized user: client certificate did not match any MarbleRun users"


def call(
    rc: RunningCoordinator, ep: Endpoint, who: Any = None, chain: tuple[Any, ...] = ()
) -> httpx.Response:
    with rc.client(who, chain=chain) as c:
        return c.request(ep.method, ep.path, **ep.kwargs)


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda ep: ep.name)
def test_authorization_matrix(running: RunningCoordinator, ep: Endpoint) -> None:
    if ep.setup is not None:
        ep.setup(running)
    # no client certificate: 401, a JSend fail
    r = call(running, ep)
    assert r.status_code == 401, r.text
    assert r.json()["status"] == "fail" and "unauthorized user" in r.json()["message"]
    # a certificate that the manifest does not list: the handshake completes, then 401 JSend fail
    # with MarbleRun's text (reference §6.2)
    r = call(running, ep, make_user("stranger"))
    assert r.status_code == 401, r.text
    assert r.json()["status"] == "fail"
    assert r.json()["message"].startswith(UNAUTHORIZED)
    # a listed user's certificate sent *after* an unlisted leaf never authenticates: 401 as well
    r = call(running, ep, make_user("stranger"), chain=(user(ep.holder),))
    assert r.status_code == 401, r.text
    assert r.json()["message"].startswith(UNAUTHORIZED)
    # a listed user without the role: 403
    r = call(running, ep, user(ep.lacking))
    assert r.status_code == 403, r.text
    assert r.json()["status"] == "fail"
    # ... also when the role holder's certificate follows as the second chain element
    r = call(running, ep, user(ep.lacking), chain=(user(ep.holder),))
    assert r.status_code == 403, r.text
    # the role holder: success
    r = call(running, ep, user(ep.holder))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success"


@pytest.mark.parametrize("path", ["/api/v2/update", "/update", "/api/v2/update-manifest", "/update-manifest"])
def test_the_log_and_the_pending_update_are_public(running: RunningCoordinator, path: str) -> None:
    propose(running)
    with running.client() as c:
        r = c.get(path)
    assert r.status_code == 200, r.text


def test_secret_shapes_v2_and_v1(running: RunningCoordinator) -> None:
    with running.client(user("alice")) as c:
        assert c.post("/api/v2/secrets", json={"secrets": SECRET_BODY}).json() == {
            "status": "success",
            "data": None,
        }
        r = c.get("/api/v2/secrets", params=[("s", "user_key"), ("s", "user_cert")])
        v1 = c.get("/secrets", params={"s": "user_key"})
    assert r.status_code == 200
    data = r.json()["data"]["secrets"]
    assert list(data["user_key"]) == [
        "Type",
        "Size",
        "Shared",
        "UserDefined",
        "Cert",
        "ValidFor",
        "Private",
        "Public",
    ]
    assert data["user_key"] == {
        "Type": "symmetric-key",
        "Size": 128,
        "Shared": False,
        "UserDefined": True,
        "Cert": None,
        "ValidFor": 0,
        "Private": b64(KEY16),
        "Public": b64(KEY16),
    }
    assert data["user_cert"]["Cert"] is None and data["user_cert"]["Private"] is None  # not set yet
    assert v1.json()["data"] == {"user_key": data["user_key"]}  # v1: the bare map


def test_two_party_update_over_https(tmp_path: Any) -> None:
    rc = RunningCoordinator(tmp_path / "seal")
    try:
        rc.set_manifest(governance_manifest_bytes(threshold=2))
        with rc.client(user("alice")) as c:
            r = c.post("/api/v2/update", json={"manifest": b64(FULL)})
        assert r.json()["data"] == {"missingAcknowledgments": 1, "missingUsers": ["bob", "carol"]}
        with rc.client() as c:
            pending = c.get("/api/v2/update-manifest").json()["data"]
        assert pending == {
            "manifest": b64(FULL),
            "message": "1 user still needs to acknowledge the update manifest",
            "missingUsers": ["bob", "carol"],
        }
        with rc.client(user("alice")) as c:  # the initiator's repeat changes nothing
            again = c.post("/api/v2/update-manifest", json={"manifest": b64(FULL)}).json()["data"]
        assert again["missingAcknowledgments"] == 1
        with rc.client(user("bob")) as c:
            bad = c.post("/api/v2/update-manifest", json={"manifest": b64(FULL[:-1] + b" ")})
            done = c.post("/api/v2/update-manifest", json={"manifest": b64(FULL)})
        assert (
            bad.status_code == 400 and bad.json()["status"] == "fail" and "manifest" in bad.json()["message"]
        )
        assert done.json()["data"] == {
            "message": "All users have acknowledged the update manifest. Update successfully applied",
            "missingUsers": ["carol"],
            "missingAcknowledgments": 0,
        }
        with rc.client() as c:
            assert c.get("/api/v2/update-manifest").status_code == 404
            manifest = c.get("/api/v2/manifest").json()["data"]
            log = c.get("/api/v2/update").json()["data"]
            v1_log = c.get("/update").json()["data"]
        assert base64.b64decode(manifest["manifest"]) == FULL
        assert v1_log == "".join(line + "\n" for line in log["updateLog"])
        assert [json.loads(line)["update"] for line in log["updateLog"]][-3:] == [
            "Complete Manifest update initiated by user. Waiting for acknowledgments to apply the update",
            "Complete Manifest update acknowledged by user",
            "Complete Manifest updated",
        ]
        head = parse_head(log["updateLogHead"])
        assert verify_log(log["updateLog"], head, rc.coord.deployment.ca.root.cert).ok
    finally:
        rc.stop()


def test_cancel_and_v1_message_shapes(running: RunningCoordinator) -> None:
    propose(running)
    with running.client(user("bob")) as c:
        ack = c.post("/update-manifest", content=FULL)
        cancel = c.post("/api/v2/update-cancel")
        none = c.post("/api/v2/update-cancel")
        none_v1 = c.post("/update-cancel")
    assert ack.json()["data"].startswith("1 user(s) still need(s) to acknowledge the update manifest.\n")
    assert cancel.json()["data"] == {"message": "Update successfully cancelled"}
    assert none.status_code == 404 and none.json()["status"] == "fail"
    assert none_v1.status_code == 400  # v1 reports a client's mistake as 400
    propose(running)
    with running.client(user("carol")) as c:
        assert c.post("/update-cancel").json()["data"] == "Update successfully cancelled"


def test_users_added_and_removed_by_an_update_take_effect_at_once(tmp_path: Any) -> None:
    rc = RunningCoordinator(tmp_path / "seal")
    try:
        rc.set_manifest(governance_manifest_bytes(threshold=1))
        erin = make_user("erin")
        doc = changed(threshold=1)
        del doc["Users"]["dave"]
        doc["Users"]["erin"] = {"Certificate": erin.cert_pem.decode(), "Roles": ["updater"]}
        with rc.client(user("alice")) as c:
            assert (
                c.post("/api/v2/update", json={"manifest": b64(governance_manifest_bytes(doc))}).status_code
                == 200
            )
        with rc.client(erin) as c:
            assert c.post("/api/v2/update-cancel").status_code == 404  # authenticated; nothing pending
        with rc.client(user("dave")) as c:  # removed: the handshake works, the request is 401
            removed = c.post("/api/v2/update-cancel")
        assert removed.status_code == 401, removed.text
        assert removed.json()["message"].startswith(UNAUTHORIZED)
    finally:
        rc.stop()


BAD_INPUTS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("secrets: no s", "GET", "/api/v2/secrets", {}, 400, "at least one query parameter"),
    ("secrets: empty s", "GET", "/api/v2/secrets", {"params": {"s": ""}}, 400, "empty query parameter"),
    ("secrets: unknown", "GET", "/api/v2/secrets", {"params": {"s": "ghost"}}, 400, "ghost"),
    ("upload: not JSON", "POST", "/api/v2/secrets", {"content": b"{nope"}, 400, "not valid JSON"),
    ("upload: array", "POST", "/api/v2/secrets", {"json": [1]}, 400, "JSON object"),
    ("upload: empty", "POST", "/api/v2/secrets", {"json": {"secrets": {}}}, 400, "no new secrets"),
    (
        "upload: bad base64",
        "POST",
        "/api/v2/secrets",
        {"json": {"secrets": {"user_key": {"Key": "%%"}}}},
        400,
        "user_key.Key",
    ),
    (
        "upload: wrong size",
        "POST",
        "/api/v2/secrets",
        {"json": {"secrets": {"user_key": {"Key": b64(b"x")}}}},
        400,
        "user_key.Key",
    ),
    (
        "upload: unknown",
        "POST",
        "/api/v2/secrets",
        {"json": {"secrets": {"ghost": {"Key": b64(b"x")}}}},
        400,
        "ghost",
    ),
    (
        "upload: wrong type",
        "POST",
        "/api/v2/secrets",
        {"json": {"secrets": {"user_key": {"Cert": b64(b"x")}}}},
        400,
        "user_key.Cert",
    ),
    ("upload v1: bad", "POST", "/secrets", {"json": {"user_key": {"Key": 5}}}, 400, "user_key.Key"),
    ("update: not JSON", "POST", "/api/v2/update", {"content": b"]"}, 400, "not valid JSON"),
    ("update: no manifest", "POST", "/api/v2/update", {"json": {}}, 400, "manifest"),
    ("update: bad base64", "POST", "/api/v2/update", {"json": {"manifest": "!!"}}, 400, "manifest"),
    (
        "update: manifest not JSON",
        "POST",
        "/api/v2/update",
        {"json": {"manifest": b64(b"{")}},
        400,
        "not valid JSON",
    ),
    (
        "update: invalid manifest",
        "POST",
        "/api/v2/update",
        {"json": {"manifest": b64(b'{"Marbles":{"m":{"Package":"x"}}}')}},
        400,
        "manifest is invalid",
    ),
    (
        "update: downgrade",
        "POST",
        "/api/v2/update",
        {"json": {"manifest": b64(b'{"Packages":{"pkg":{"SecurityVersion":1}}}')}},
        400,
        "downgrade",
    ),
    (
        "update: bad SVN type",
        "POST",
        "/api/v2/update",
        {"json": {"manifest": b64(b'{"Packages":{"pkg":{"SecurityVersion":"5"}}}')}},
        400,
        "SecurityVersion",
    ),
    ("update v1: garbage", "POST", "/update", {"content": b"\xff\xfe"}, 400, "UTF-8"),
    (
        "ack: none pending",
        "POST",
        "/api/v2/update-manifest",
        {"json": {"manifest": b64(FULL)}},
        404,
        "no pending update",
    ),
    ("ack: bad body", "POST", "/api/v2/update-manifest", {"content": b"x"}, 400, "not valid JSON"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
def test_bad_input_is_a_4xx_fail_naming_the_field(
    running: RunningCoordinator, case: tuple[str, str, str, dict[str, Any], int, str]
) -> None:
    _name, method, path, kwargs, status, needle = case
    with running.client(user("alice")) as c:
        r = c.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    doc = r.json()
    assert doc["status"] == "fail"
    assert needle in doc["message"] + json.dumps(doc.get("data"))
    assert running.coord.deployment.pending_update is None
    assert not running.coord.deployment.secrets["user_key"].has_value  # no partial write


def test_a_failed_multi_secret_upload_writes_nothing(running: RunningCoordinator) -> None:
    body = {"secrets": {"user_key": {"Key": b64(KEY16)}, "user_plain": {"Key": b64(b"a\x00b")}}}
    with running.client(user("alice")) as c:
        r = c.post("/api/v2/secrets", json=body)
        after = c.get("/api/v2/secrets", params={"s": "user_key"})
    assert r.status_code == 400 and "Marbles.frontend.Parameters.Env.PLAIN" in r.text
    assert "a\\u0000b" not in r.text and b64(b"a\x00b") not in r.text
    assert after.json()["data"]["secrets"]["user_key"]["Private"] is None


def test_governance_endpoints_before_a_manifest(tmp_path: Any) -> None:
    rc = RunningCoordinator(tmp_path / "seal")
    try:
        with rc.client() as c:
            assert c.get("/api/v2/update").status_code == 409
            assert c.get("/api/v2/update-manifest").status_code == 404
            assert c.get("/api/v2/secrets", params={"s": "x"}).status_code == 401
    finally:
        rc.stop()


def test_a_full_update_that_changes_recovery_keys_returns_new_recovery_secrets(tmp_path: Any) -> None:
    recovery_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = recovery_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rc = RunningCoordinator(tmp_path / "seal")
    try:
        rc.set_manifest(governance_manifest_bytes(threshold=1))
        with rc.client(user("alice")) as c:
            svn = c.post("/api/v2/update", json={"manifest": b64(SVN_5)}).json()["data"]
            assert "recoverySecrets" not in svn  # omitted when nothing was reissued
            doc = changed(threshold=1)
            doc["RecoveryKeys"] = {"admin": pem.decode()}
            body = {"manifest": b64(governance_manifest_bytes(doc))}
            data = c.post("/api/v2/update", json=body).json()["data"]
        secret = base64.b64decode(data["recoverySecrets"]["admin"])
        dek = recovery_key.decrypt(
            secret, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        )
        assert len(dek) == 32
        rc.restart()  # the state was re-sealed under the new key and still opens
        assert rc.coord.state == 3
        assert rc.coord.manifest() is not None and rc.coord.manifest()[0] == governance_manifest_bytes(doc)  # type: ignore[index]
    finally:
        rc.stop()


def test_a_v2_secret_upload_without_its_secrets_field_says_how(running: RunningCoordinator) -> None:
    """The v1 form (a bare map) sent to the v2 endpoint: 400 naming the field and both forms."""
    with running.client(user("alice")) as c:
        bare = c.post("/api/v2/secrets", json={"user_key": {"Key": b64(KEY16)}})
        wrong = c.post("/api/v2/secrets", json={"secrets": ["user_key"]})
    assert bare.status_code == 400 and bare.json()["status"] == "fail"
    assert bare.json()["message"].startswith('secrets: missing: POST /api/v2/secrets takes {"secrets"')
    assert "POST /secrets" in bare.json()["message"]
    assert wrong.status_code == 400 and wrong.json()["message"].startswith("secrets: not an object")
    assert b64(KEY16) not in bare.text
    assert not running.coord.deployment.secrets["user_key"].has_value
