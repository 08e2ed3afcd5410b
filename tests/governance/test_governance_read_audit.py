"""Secret reads leave the public update log for an authenticated, bounded audit trail (issue 11, #8)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness import RunningCoordinator, b64, governance_manifest_bytes, governance_manifest_doc, user

KEY16 = bytes(range(16))


def _doc() -> dict[str, Any]:
    doc = governance_manifest_doc()
    doc["Users"]["dave"]["Roles"] = ["secret_writer"]  # owns the user-defined secrets, no UpdateManifest
    return doc


@pytest.fixture
def rc(tmp_path: Path) -> Any:
    running = RunningCoordinator(tmp_path / "seal")
    try:
        running.set_manifest(governance_manifest_bytes(_doc()))
        with running.client(user("alice")) as c:
            r = c.post("/api/v2/secrets", json={"secrets": {"user_key": {"Key": b64(KEY16)}}})
        assert r.status_code == 200, r.text
        yield running
    finally:
        running.stop()


def _trail(rc: RunningCoordinator, who: str, **params: Any) -> dict[str, Any]:
    with rc.client(user(who)) as c:
        r = c.get("/api/v2/audit/secret-reads", params=params)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def test_reads_are_not_in_the_public_update_log(rc: RunningCoordinator) -> None:
    with rc.client() as c:
        before = c.get("/api/v2/update").json()["data"]["updateLog"]
    with rc.client(user("bob")) as c:
        for _ in range(5):
            assert c.get("/api/v2/secrets", params={"s": ["user_key", "shared_key"]}).status_code == 200
    with rc.client() as c:
        after = c.get("/api/v2/update").json()["data"]
        v1 = c.get("/update").json()["data"]
    assert after["updateLog"] == before
    messages = [json.loads(line)["update"] for line in after["updateLog"]]
    assert messages == ["Initial manifest set", "Secret set"]
    assert "Secret read" not in v1
    assert after["updateLogHead"]["entries"] == 2


def test_the_trail_shows_each_user_what_they_may_see(rc: RunningCoordinator) -> None:
    with rc.client(user("bob")) as c:
        assert c.get("/api/v2/secrets", params={"s": ["user_key", "shared_key"]}).status_code == 200
    with rc.client(user("alice")) as c:
        assert c.get("/api/v2/secrets", params={"s": "shared_key"}).status_code == 200

    everything = _trail(rc, "carol")  # UpdateManifest: every read
    assert [(e["seq"], e["user"]) for e in everything["entries"]] == [(1, "bob"), (2, "alice")]
    assert everything["entries"][0]["secrets"] == [
        {"name": "user_key", "type": "symmetric-key"},
        {"name": "shared_key", "type": "symmetric-key"},
    ]
    assert (everything["nextSeq"], everything["dropped"]) == (2, 0)
    assert _trail(rc, "bob")["entries"] == everything["entries"]  # bob holds UpdateManifest too
    owner = _trail(rc, "dave")  # WriteSecret on user_key only: that secret of bob's read, nothing else
    assert [(e["user"], e["secrets"]) for e in owner["entries"]] == [
        ("bob", [{"name": "user_key", "type": "symmetric-key"}])
    ]
    assert _trail(rc, "carol", since=1)["entries"] == everything["entries"][1:]
    # no value anywhere
    text = json.dumps(everything)
    assert KEY16.hex() not in text and b64(KEY16) not in text


def test_the_trail_needs_a_user(rc: RunningCoordinator) -> None:
    with rc.client() as c:
        r = c.get("/api/v2/audit/secret-reads")
        assert r.status_code == 401
        assert c.get("/api/v2/audit/secret-reads", params={"since": "-1"}).status_code in (400, 401)
    with rc.client(user("bob")) as c:
        r = c.get("/api/v2/audit/secret-reads", params={"since": "x"})
    assert r.status_code == 400 and "since" in r.json()["message"]
