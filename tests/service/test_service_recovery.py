"""Recovery through the service (issue 11, finding 2): the recovery public keys are stored beside
the sealed state, so uploads are checked before the DEK is known; older states get them stored at
their next normal start; the upload work runs off the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from marblekeep.core.deployment import CoordinatorState
from marblekeep.core.publicmeta import PublicMetadata
from marblekeep.errors import RecoveryError
from marblekeep.recovery import decrypt_recovery_secret, sign_recovery_secret
from marblekeep.service import SIMULATION_KEK_FILE, STATE_DB, Coordinator, CoordinatorConfig
from marblekeep.store import SimulationKeyFileProvider, SQLiteStore, open_sealed_store
from marblekeep.store.sealed import Opened


@pytest.fixture(scope="module")
def owner() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def manifest(owner: rsa.RSAPrivateKey) -> tuple[bytes, dict[str, str]]:
    pem = (
        owner.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    keys = {"owner": pem}
    doc = {"Packages": {"p": {"Debug": True}}, "Marbles": {"m": {"Package": "p"}}, "RecoveryKeys": keys}
    return json.dumps(doc).encode(), keys


def stored_recovery_keys(seal_dir: Path) -> bytes | None:
    conn = sqlite3.connect(seal_dir / STATE_DB)
    try:
        row = conn.execute("SELECT value FROM records WHERE key = ?", (b"meta:public",)).fetchone()
    finally:
        conn.close()
    return None if row is None else bytes(row[0])


async def make_older_state(seal_dir: Path) -> None:
    """Remove the public keys record, as a state written before it existed (same sealed format)."""
    opened = await open_sealed_store(
        await SQLiteStore.open(seal_dir / STATE_DB), SimulationKeyFileProvider(seal_dir / SIMULATION_KEK_FILE)
    )
    assert isinstance(opened, Opened)
    await opened.store.set_public_metadata(None)
    await opened.store.close()


async def test_keys_are_stored_at_set_and_backfilled_for_older_states_then_checked_in_recovery(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    config = CoordinatorConfig(seal_dir=tmp_path / "seal", simulation=True)
    raw, keys = manifest(owner)
    coord = await Coordinator.open(config)
    secrets = await coord.set_manifest(raw)
    await coord.close()
    assert stored_recovery_keys(config.seal_dir) == PublicMetadata(keys, sealed_in_simulation=True).encode()

    await make_older_state(config.seal_dir)
    assert stored_recovery_keys(config.seal_dir) is None
    coord = await Coordinator.open(config)  # a normal start stores them
    await coord.close()
    assert stored_recovery_keys(config.seal_dir) == PublicMetadata(keys, sealed_in_simulation=True).encode()

    (config.seal_dir / SIMULATION_KEK_FILE).unlink()
    coord = await Coordinator.open(config)
    try:
        assert coord.state is CoordinatorState.RECOVERY
        with pytest.raises(RecoveryError, match="does not match any recovery key"):
            await coord.recover(os.urandom(32), os.urandom(256))
        dek = decrypt_recovery_secret(secrets["owner"], owner)
        assert await coord.recover(dek, sign_recovery_secret(dek, owner)) == (0, "Recovery successful.")
        assert coord.state is CoordinatorState.ACCEPTING_MARBLES
    finally:
        await coord.close()


async def test_an_older_state_already_in_recovery_falls_back_and_still_recovers(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    config = CoordinatorConfig(seal_dir=tmp_path / "seal", simulation=True)
    raw, keys = manifest(owner)
    coord = await Coordinator.open(config)
    secrets = await coord.set_manifest(raw)
    await coord.close()
    await make_older_state(config.seal_dir)
    (config.seal_dir / SIMULATION_KEK_FILE).unlink()
    coord = await Coordinator.open(config)
    try:
        for _ in range(20):  # kept (no keys to check against), but bounded
            await coord.recover(os.urandom(32), os.urandom(256))
        dek = decrypt_recovery_secret(secrets["owner"], owner)
        assert (await coord.recover(dek, sign_recovery_secret(dek, owner)))[0] == 0
    finally:
        await coord.close()
    assert (
        stored_recovery_keys(config.seal_dir) == PublicMetadata(keys, sealed_in_simulation=True).encode()
    )  # stored now


async def test_the_ephemeral_key_and_uploads_are_made_off_the_event_loop(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    config = CoordinatorConfig(seal_dir=tmp_path / "seal", simulation=True)
    coord = await Coordinator.open(config)
    await coord.set_manifest(manifest(owner)[0])
    await coord.close()
    (config.seal_dir / SIMULATION_KEK_FILE).unlink()
    coord = await Coordinator.open(config)
    try:
        ticked = asyncio.Event()

        async def tick() -> None:
            await asyncio.sleep(0)
            ticked.set()

        key_task = asyncio.ensure_future(coord.recovery_public_key())  # RSA-4096 generation
        tick_task = asyncio.ensure_future(tick())
        # the loop runs other tasks while the key is generated: the tick finishes first
        done, _ = await asyncio.wait({key_task, tick_task}, return_when=asyncio.FIRST_COMPLETED)
        assert tick_task in done and ticked.is_set() and not key_task.done()
        der = await key_task
        assert serialization.load_der_public_key(der).key_size == 4096  # type: ignore[union-attr]
    finally:
        await coord.close()


async def test_a_cancelled_upload_keeps_the_lock_until_its_thread_is_done(
    tmp_path: Path, owner: rsa.RSAPrivateKey
) -> None:
    """A client that goes away mid-upload must not let the next upload run on the Recoverer while
    the first one's thread still works on it."""
    config = CoordinatorConfig(seal_dir=tmp_path / "seal", simulation=True)
    coord = await Coordinator.open(config)
    await coord.set_manifest(manifest(owner)[0])
    await coord.close()
    (config.seal_dir / SIMULATION_KEK_FILE).unlink()
    coord = await Coordinator.open(config)
    try:
        recoverer = coord._require_recovery()
        entered, release = threading.Event(), threading.Event()
        real_upload = recoverer.upload

        def slow_upload(secret: bytes, signature: bytes) -> object:
            entered.set()
            release.wait(60)
            return real_upload(secret, signature)

        recoverer.upload = slow_upload  # type: ignore[method-assign]
        task = asyncio.ensure_future(coord.recover(os.urandom(32), os.urandom(256)))
        assert await asyncio.to_thread(entered.wait, 60)
        task.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert coord.lock.locked() and not task.done()  # still waiting for the thread
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not coord.lock.locked()
    finally:
        await coord.close()
