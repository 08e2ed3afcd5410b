"""Governance through the Coordinator service, with real sealed storage and restarts: pending
updates and SVN updates survive restarts, secrets survive updates as Marbles see them, unset
user-defined secrets block a Marble until set, and tampering with stored log entries is found."""

from __future__ import annotations

import base64
import json
import uuid as uuid_mod
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harness import FakeSgxVerifier, activate, changed, governance_manifest_bytes
from marblekeep.core.auditlog import LogVerification, verify_log
from marblekeep.errors import ActivationRefused, ManifestError, RequestError, StateError
from marblekeep.service import Coordinator, CoordinatorConfig
from marblekeep.store.kek import SimulationKeyFileProvider
from marblekeep.store.sealed import Opened, open_sealed_store
from marblekeep.store.sqlite import SQLiteStore

KEY16 = bytes(range(16))
SVN_5 = json.dumps({"Packages": {"pkg": {"SecurityVersion": 5}}}).encode()


def full_update(threshold: int = 0, **kwargs: object) -> bytes:
    doc = changed(threshold=threshold, **kwargs)  # type: ignore[arg-type]
    doc["Marbles"]["backend"]["Parameters"]["Env"]["VERSION"] = "2"
    del doc["Secrets"]["removable"]
    return governance_manifest_bytes(doc)


class Opener:
    """Opens (and reopens) a Coordinator on one seal directory; closes whatever is open."""

    def __init__(self, seal_dir: Path, *, simulation: bool) -> None:
        self.config = CoordinatorConfig(seal_dir=seal_dir, simulation=simulation)
        self.simulation = simulation
        self.current: Coordinator | None = None

    async def open(self) -> Coordinator:
        if self.current is not None:
            await self.current.close()
        kek = None if self.simulation else SimulationKeyFileProvider(self.config.seal_dir / "kek.key")
        verifier = None if self.simulation else FakeSgxVerifier()
        self.current = await Coordinator.open(self.config, kek_provider=kek, verifier=verifier)  # type: ignore[arg-type]
        return self.current

    async def close(self) -> None:
        if self.current is not None:
            await self.current.close()
            self.current = None


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Opener]:
    opener = Opener(tmp_path / "seal", simulation=True)
    yield opener
    await opener.close()


@pytest.fixture
async def sgx(tmp_path: Path) -> AsyncIterator[Opener]:
    opener = Opener(tmp_path / "seal", simulation=False)
    yield opener
    await opener.close()


def verified(coord: Coordinator) -> LogVerification:
    lines, head = coord.update_log()
    return verify_log(lines, head, coord.deployment.ca.root.cert)


async def test_a_pending_update_survives_a_restart(sim: Opener) -> None:
    coord = await sim.open()
    await coord.set_manifest(governance_manifest_bytes())
    raw = full_update()
    outcome, _ = await coord.update_manifest("alice", raw)
    assert outcome.missing_acknowledgments == 2
    await coord.acknowledge_update("bob", raw)

    coord = await sim.open()
    pending = coord.pending_update()
    assert pending is not None and pending.raw == raw
    assert pending.acknowledged == ("alice", "bob") and pending.missing_users == ("carol",)
    assert verified(coord).ok
    outcome, _ = await coord.acknowledge_update("carol", raw)
    assert outcome.applied

    coord = await sim.open()
    current = coord.manifest()
    assert coord.pending_update() is None and current is not None and current[0] == raw
    lines, _ = coord.update_log()
    assert [json.loads(line)["update"] for line in lines] == [
        "Initial manifest set",
        "Complete Manifest update initiated by user. Waiting for acknowledgments to apply the update",
        "Complete Manifest update acknowledged by user",
        "Complete Manifest update acknowledged by user",
        "Complete Manifest updated",
    ]
    assert verified(coord).ok


async def test_old_version_marbles_are_refused_after_an_svn_update_across_restarts(sgx: Opener) -> None:
    coord = await sgx.open()
    await coord.set_manifest(governance_manifest_bytes())
    raw_before, signature_before, _ = coord.manifest() or (b"", b"", "")
    await activate(coord, "backend", svn=2)
    await coord.update_manifest("alice", SVN_5)
    with pytest.raises(ActivationRefused, match="ISVSVN 2 is below package pkg SecurityVersion 5"):
        await activate(coord, "backend", svn=2)
    await activate(coord, "backend", svn=5)

    coord = await sgx.open()
    with pytest.raises(ActivationRefused, match="SecurityVersion 5"):
        await activate(coord, "backend", svn=4)
    await activate(coord, "backend", svn=6)
    # the raw manifest and its signature are those of the manifest as set
    assert coord.manifest() == (raw_before, signature_before, coord.manifest()[2])  # type: ignore[index]
    with pytest.raises(ManifestError, match="downgrade"):
        await coord.update_manifest("alice", b'{"Packages": {"pkg": {"SecurityVersion": 3}}}')


async def test_symmetric_secret_in_a_file_survives_package_and_full_updates(sim: Opener) -> None:
    coord = await sim.open()
    await coord.set_manifest(governance_manifest_bytes(threshold=1))
    marble = uuid_mod.uuid4()
    first = await activate(coord, "backend", marble_uuid=marble)
    shared = first.files["/data/shared.key"]
    assert len(shared) == 32  # hex of 16 bytes

    await coord.update_manifest("alice", SVN_5)
    after_svn = await activate(coord, "backend", marble_uuid=marble)
    assert after_svn.files["/data/shared.key"] == shared
    assert after_svn.env["PER_KEY"] == first.env["PER_KEY"]
    assert after_svn.files["/data/cert.pem"] != first.files["/data/cert.pem"]  # shared certs regenerate

    outcome, _ = await coord.update_manifest("alice", full_update(1))
    assert outcome.applied
    coord = await sim.open()
    after_full = await activate(coord, "backend", marble_uuid=marble)
    assert after_full.files["/data/shared.key"] == shared
    assert after_full.files["/data/previous.key"] == shared
    assert after_full.env["PER_KEY"] == first.env["PER_KEY"]
    assert after_full.env["VERSION"] == b"2"


async def test_removing_a_secret_in_a_full_update_removes_it(sim: Opener) -> None:
    coord = await sim.open()
    await coord.set_manifest(governance_manifest_bytes(threshold=1))
    assert "removable" in coord.deployment.secrets
    await coord.update_manifest("alice", full_update(1))
    coord = await sim.open()
    assert "removable" not in coord.deployment.secrets
    assert "removable" not in coord.deployment.previous_secrets
    with pytest.raises(RequestError, match="removable"):
        await coord.read_secrets("alice", ["removable"])


async def test_a_marble_needing_an_unset_user_secret_is_refused_until_it_is_set(sim: Opener) -> None:
    coord = await sim.open()
    await coord.set_manifest(governance_manifest_bytes())
    with pytest.raises(ActivationRefused) as exc:
        await activate(coord, "frontend")
    assert "user_key" in exc.value.message and "user_plain" in exc.value.message
    await coord.write_secrets(
        "alice",
        {
            "user_key": {"Key": base64.b64encode(KEY16).decode()},
            "user_plain": {"Key": base64.b64encode(b"hello").decode()},
        },
    )
    coord = await sim.open()  # the values are durable
    params = await activate(coord, "frontend")
    assert params.env["USER_KEY"] == KEY16.hex().encode()
    assert params.env["PLAIN"] == b"hello"
    # a user-defined secret keeps its value over a full update that leaves its definition alone
    await coord.update_manifest("alice", full_update(0))
    await coord.acknowledge_update("bob", full_update(0))
    await coord.acknowledge_update("carol", full_update(0))
    assert (await activate(coord, "frontend")).env["USER_KEY"] == KEY16.hex().encode()


async def test_reading_secrets_is_audited_not_logged_publicly_and_needs_state_3(sim: Opener) -> None:
    coord = await sim.open()
    with pytest.raises(StateError):
        await coord.read_secrets("alice", ["user_key"])
    await coord.set_manifest(governance_manifest_bytes())
    before, _ = coord.update_log()
    got = await coord.read_secrets("bob", ["shared_key"])
    assert len(got["shared_key"].private) == 16
    lines, _ = coord.update_log()
    assert lines == before  # the public update log holds MarbleRun's entries only
    [entry] = coord.secret_reads("bob", 0).entries
    assert (entry["user"], entry["secrets"]) == ("bob", [{"name": "shared_key", "type": "symmetric-key"}])
    assert got["shared_key"].private.hex() not in json.dumps(entry)


async def _tamper(config: CoordinatorConfig, change: dict[str, bytes | None]) -> None:
    """Rewrite stored records through the sealed store (as someone holding the DEK could)."""
    inner = await SQLiteStore.open(config.seal_dir / "state.db")
    opened = await open_sealed_store(inner, SimulationKeyFileProvider(config.seal_dir / "simulation-kek.key"))
    assert isinstance(opened, Opened)
    store = opened.store
    try:
        await store.commit(change, expected_revision=await store.revision())
    finally:
        await store.close()


async def _stored_log(config: CoordinatorConfig) -> dict[str, bytes]:
    inner = await SQLiteStore.open(config.seal_dir / "state.db")
    opened = await open_sealed_store(inner, SimulationKeyFileProvider(config.seal_dir / "simulation-kek.key"))
    assert isinstance(opened, Opened)
    try:
        return await opened.store.list("updateLog:")
    finally:
        await opened.store.close()


@pytest.mark.parametrize("kind", ["delete", "reorder", "edit", "delete-newest"])
async def test_tampering_with_stored_log_entries_is_detected_after_restart(sim: Opener, kind: str) -> None:
    coord = await sim.open()
    await coord.set_manifest(governance_manifest_bytes())
    await coord.write_secrets("alice", {"user_key": {"Key": base64.b64encode(KEY16).decode()}})
    await coord.read_secrets("bob", ["user_key"])  # not logged: the log has 3 entries
    await coord.update_manifest("alice", SVN_5)
    await coord.write_secrets("alice", {"user_key": {"Key": base64.b64encode(KEY16[::-1]).decode()}})
    assert verified(coord).ok
    await sim.close()

    stored = await _stored_log(sim.config)
    keys = sorted(stored)
    assert len(keys) == 4
    change: dict[str, bytes | None]
    if kind == "delete":
        change = {keys[1]: None}
    elif kind == "delete-newest":
        change = {keys[-1]: None}
    elif kind == "reorder":
        change = {keys[1]: stored[keys[2]], keys[2]: stored[keys[1]]}
    else:
        change = {keys[1]: stored[keys[1]].replace(b'"alice"', b'"mallory"')}
    await _tamper(sim.config, change)

    coord = await sim.open()
    result = verified(coord)
    assert not result.ok
    assert result.first_broken == {"delete": 2, "delete-newest": 4, "reorder": 2, "edit": 2}[kind]
