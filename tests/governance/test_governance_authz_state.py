"""Gaps of the HTTPS authorization matrix (issue 11, finding 17).

- Per-secret ``ResourceNames`` over HTTPS: a user allowed to read (write) secret A but not B is
  refused B, and a request naming both is refused as a whole.
- Every refused request leaves the state unchanged: the records in ``state.db`` are byte for byte
  the same (a commit re-seals what it writes with fresh nonces, so any commit would show), and so are
  the secrets, the manifest, the update log and the pending update in memory.

The signature-count rule of recovery is tested in tests/recovery/test_recovery_verify_signatures.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import RunningCoordinator, b64, changed, governance_manifest_bytes, make_user, user

KEY16 = bytes(range(16))
SVN_5 = b'{"Packages": {"pkg": {"SecurityVersion": 5}}}'


def snapshot(rc: RunningCoordinator) -> tuple[Any, ...]:
    """Everything a write could change: the stored records, and the deployment in memory."""
    conn = sqlite3.connect(rc.seal_dir / "state.db")
    try:
        rows = tuple(conn.execute("SELECT key, value FROM records ORDER BY key").fetchall())
    finally:
        conn.close()
    dep = rc.coord.deployment
    manifest = dep.manifest.raw if dep.manifest is not None else None
    return rows, dict(dep.secrets), manifest, dep.update_log, dep.pending_update, dict(dep.activations)


# -------------------------------------------------------------------- per-secret ResourceNames


@pytest.fixture
def narrow(tmp_path: Path) -> Iterator[tuple[RunningCoordinator, Any]]:
    """Erin may read only ``user_key`` and write only ``user_plain``."""
    erin = make_user("erin")
    doc = changed()
    doc["Users"]["erin"] = {"Certificate": erin.cert_pem.decode(), "Roles": ["read_a", "write_b"]}
    doc["Roles"]["read_a"] = {
        "ResourceType": "Secrets",
        "ResourceNames": ["user_key"],
        "Actions": ["ReadSecret"],
    }
    doc["Roles"]["write_b"] = {
        "ResourceType": "Secrets",
        "ResourceNames": ["user_plain"],
        "Actions": ["WriteSecret"],
    }
    rc = RunningCoordinator(tmp_path / "seal")
    try:
        rc.set_manifest(governance_manifest_bytes(doc))
        with rc.client(user("alice")) as c:  # both secrets have a value to leak
            body = {"secrets": {"user_key": {"Key": b64(KEY16)}, "user_plain": {"Key": b64(b"plain-b")}}}
            assert c.post("/api/v2/secrets", json=body).status_code == 200
        yield rc, erin
    finally:
        rc.stop()


def test_per_secret_read_permission_over_https(narrow: tuple[RunningCoordinator, Any]) -> None:
    rc, erin = narrow
    with rc.client(erin) as c:
        allowed = c.get("/api/v2/secrets", params={"s": "user_key"})
        assert allowed.status_code == 200, allowed.text
        assert allowed.json()["data"]["secrets"]["user_key"]["Private"] == b64(KEY16)
        before = snapshot(rc)
        for params in ({"s": "user_plain"}, [("s", "user_key"), ("s", "user_plain")], {"s": "shared_key"}):
            refused = c.get("/api/v2/secrets", params=params)
            assert refused.status_code == 403, refused.text
            assert b64(b"plain-b") not in refused.text and b64(KEY16) not in refused.text
            assert snapshot(rc) == before  # not even a read entry in the log
        v1 = c.get("/secrets", params={"s": "user_plain"})
        assert v1.status_code == 403 and b64(b"plain-b") not in v1.text


def test_per_secret_write_permission_over_https(narrow: tuple[RunningCoordinator, Any]) -> None:
    rc, erin = narrow
    with rc.client(erin) as c:
        before = snapshot(rc)
        for body in (
            {"user_key": {"Key": b64(b"K" * 16)}},
            {"user_plain": {"Key": b64(b"new-b")}, "user_key": {"Key": b64(b"K" * 16)}},
            {"user_cert": {"Cert": "x"}},
        ):
            refused = c.post("/api/v2/secrets", json={"secrets": body})
            assert refused.status_code == 403, refused.text
            assert snapshot(rc) == before
        allowed = c.post("/api/v2/secrets", json={"secrets": {"user_plain": {"Key": b64(b"new-b")}}})
        assert allowed.status_code == 200, allowed.text
    assert rc.coord.deployment.secrets["user_plain"].private == b"new-b"
    assert rc.coord.deployment.secrets["user_key"].private == KEY16


# ---------------------------------------------------------- refused writes leave the state unchanged

WRITES: list[tuple[str, str, str, dict[str, Any], str, bool]] = [
    # (name, method, path, request, a listed user who lacks the permission, with a pending update)
    (
        "POST v2 secrets",
        "POST",
        "/api/v2/secrets",
        {"json": {"secrets": {"user_key": {"Key": b64(KEY16)}}}},
        "bob",
        True,
    ),
    ("POST v1 secrets", "POST", "/secrets", {"json": {"user_key": {"Key": b64(KEY16)}}}, "bob", True),
    ("POST v2 update (package)", "POST", "/api/v2/update", {"json": {"manifest": b64(SVN_5)}}, "bob", False),
    ("POST v1 update (package)", "POST", "/update", {"content": SVN_5}, "carol", False),
    ("POST v2 update (full)", "POST", "/api/v2/update", {"json": {"manifest": "FULL"}}, "dave", False),
    (
        "POST v2 update-manifest",
        "POST",
        "/api/v2/update-manifest",
        {"json": {"manifest": "FULL"}},
        "dave",
        True,
    ),
    ("POST v1 update-manifest", "POST", "/update-manifest", {"content": "FULL"}, "dave", True),
    ("POST v2 update-cancel", "POST", "/api/v2/update-cancel", {}, "dave", True),
    ("POST v1 update-cancel", "POST", "/update-cancel", {}, "dave", True),
    ("GET v2 secrets", "GET", "/api/v2/secrets", {"params": {"s": "user_key"}}, "carol", False),
]


def full_update() -> bytes:
    doc = changed()
    doc["Marbles"]["backend"]["Parameters"]["Env"]["VERSION"] = "2"
    return governance_manifest_bytes(doc)


def materialise(request: dict[str, Any]) -> dict[str, Any]:
    full = full_update()
    out = dict(request)
    if out.get("json") == {"manifest": "FULL"}:
        out["json"] = {"manifest": b64(full)}
    if out.get("content") == "FULL":
        out["content"] = full
    return out


@pytest.mark.parametrize("case", WRITES, ids=lambda case: case[0])
def test_a_refused_request_leaves_the_state_unchanged(
    running: RunningCoordinator, case: tuple[Any, ...]
) -> None:
    _name, method, path, request, lacking, pending = case
    if pending:  # so that acknowledging or cancelling would have something to act on
        with running.client(user("alice")) as c:
            assert c.post("/api/v2/update", json={"manifest": b64(full_update())}).status_code == 200
    before = snapshot(running)
    assert (before[4] is not None) == pending
    kwargs = materialise(request)
    with running.client() as c:  # no certificate
        assert c.request(method, path, **kwargs).status_code == 401
    assert snapshot(running) == before
    with running.client(user(lacking)) as c:
        refused = c.request(method, path, **kwargs)
    assert refused.status_code == 403, refused.text
    assert snapshot(running) == before
    with running.client(make_user("stranger")) as c:  # a certificate the manifest does not list
        assert c.request(method, path, **kwargs).status_code == 401
    assert snapshot(running) == before
