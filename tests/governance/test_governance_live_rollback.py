"""Rollback of the database underneath a running Coordinator (issue 11, finding 15).

While a Coordinator serves HTTPS, another process puts an older copy of ``state.db`` back (through
SQLite's backup API, as a second writer on the file would): an older user list (a user removed by
an update comes back), an older user-defined secret and an older ``MaxActivations`` counter. The
sealed store notices that the backend's revision moved, re-verifies the stored state and finds its
epoch lower than the one it committed last (``SealedStore._reload``): every later request that
would commit — a secret write, an activation of the counted Marble — is refused with a rollback
error instead of being written on top of the old state, and a restart refuses the old state too
(rollback anchor). A secret read commits nothing (issue 11, finding 8): it answers from the
Coordinator's own newest state, never from the old copy.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harness import RunningCoordinator, activate, b64, changed, governance_manifest_bytes, user
from marblekeep.errors import RollbackError


def copy_db(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (WAL included) onto ``target``."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def revision(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])
    finally:
        conn.close()


def test_a_database_rolled_back_under_a_running_coordinator_is_never_served(tmp_path: Path) -> None:
    doc = changed(threshold=1)
    doc["Marbles"]["backend"]["MaxActivations"] = 2
    rc = RunningCoordinator(tmp_path / "seal")
    db, old = rc.seal_dir / "state.db", tmp_path / "old.db"
    try:
        rc.set_manifest(governance_manifest_bytes(doc))
        with rc.client(user("alice")) as c:
            assert (
                c.post("/api/v2/secrets", json={"secrets": {"user_plain": {"Key": b64(b"v1")}}}).status_code
                == 200
            )
        copy_db(db, old)  # the copy: v1, dave listed, no activation

        rc.run(activate(rc.coord, "backend"))
        update = changed(threshold=1)
        update["Marbles"]["backend"]["MaxActivations"] = 2
        del update["Users"]["dave"]
        with rc.client(user("alice")) as c:
            assert (
                c.post(
                    "/api/v2/update", json={"manifest": b64(governance_manifest_bytes(update))}
                ).status_code
                == 200
            )
            assert (
                c.post("/api/v2/secrets", json={"secrets": {"user_plain": {"Key": b64(b"v2")}}}).status_code
                == 200
            )
        assert "dave" not in rc.coord.deployment.manifest.users  # type: ignore[union-attr]

        copy_db(old, db)  # the rollback, while the Coordinator runs

        with rc.client(user("alice")) as c:
            read = c.get("/api/v2/secrets", params={"s": "user_plain"})
            write = c.post("/api/v2/secrets", json={"secrets": {"user_plain": {"Key": b64(b"v3")}}})
        assert write.status_code == 503, write.text
        assert "went back from epoch" in write.json()["message"]
        assert read.status_code == 200, read.text
        assert read.json()["data"]["secrets"]["user_plain"]["Private"] == b64(b"v2")
        for answer in (read, write):
            assert b64(b"v1") not in answer.text
        with pytest.raises(RollbackError, match="went back from epoch"):
            rc.run(activate(rc.coord, "backend"))
        with rc.client(user("dave")) as c:  # the removed user stays removed
            assert c.get("/api/v2/secrets", params={"s": "user_plain"}).status_code == 401
        # nothing was written on top of the old copy
        assert revision(db) == revision(old)
        # and a restart refuses the old state (rollback anchor) instead of serving it
        with pytest.raises(RollbackError, match="epoch"):
            rc.restart()
    finally:
        rc.stop()
