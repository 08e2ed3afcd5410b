"""Rollback protection: the sealed epoch against the anchor kept beside the KEK."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from marblekeep.errors import RollbackError
from marblekeep.store import (
    AnchorStatus,
    NeedsRecovery,
    Opened,
    OpenResult,
    RollbackAnchor,
    SealedStore,
    SimulationKeyFileProvider,
    SQLiteStore,
    open_sealed_store,
)


@pytest.fixture
def provider(tmp_path: Path) -> SimulationKeyFileProvider:
    return SimulationKeyFileProvider(tmp_path / "kek")


async def open_db(db: Path, provider: SimulationKeyFileProvider, **kw: bool) -> OpenResult:
    return await open_sealed_store(await SQLiteStore.open(db), provider, **kw)


async def store_at(db: Path, provider: SimulationKeyFileProvider) -> SealedStore:
    result = await open_db(db, provider)
    assert isinstance(result, Opened)
    return result.store


async def bump(store: SealedStore, n: int) -> None:
    for i in range(n):
        await store.commit({f"k{i % 2}": os.urandom(8)}, expected_revision=await store.revision())


def copy_db(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def anchor_of(provider: SimulationKeyFileProvider) -> RollbackAnchor:
    assert provider.anchor_path is not None
    return RollbackAnchor(provider.anchor_path, provider.load_kek())


def test_anchor_roundtrip_and_authentication(tmp_path: Path) -> None:
    kek, sid = os.urandom(32), os.urandom(16)
    anchor = RollbackAnchor(tmp_path / "a", kek)
    assert anchor.read().status is AnchorStatus.MISSING
    assert anchor.write(sid, 1) == 0
    for epoch in range(2, 6):
        anchor.write(sid, epoch)
        reading = anchor.read()
        assert (reading.status, reading.store_id, reading.epoch) == (AnchorStatus.VALID, sid, epoch)
    assert anchor.write(os.urandom(16), 1, reset=True, generation=0) == 1
    assert anchor.read().epoch == 1 and anchor.read().generation == 1
    assert RollbackAnchor(tmp_path / "a", os.urandom(32)).read().status is AnchorStatus.INVALID
    # a torn write of one slot falls back to the other slot (one epoch behind)
    anchor.write(anchor.read().store_id, 2, generation=1)
    data = bytearray((tmp_path / "a").read_bytes())
    data[0] ^= 0xFF  # slot 0 holds epoch 2
    (tmp_path / "a").write_bytes(bytes(data))
    assert anchor.read().epoch == 1
    data[64] ^= 0xFF
    (tmp_path / "a").write_bytes(bytes(data))
    assert anchor.read().status is AnchorStatus.INVALID


async def test_replayed_old_database_is_refused_until_override(
    tmp_path: Path, provider: SimulationKeyFileProvider, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "state.db"
    store = await store_at(db, provider)
    await bump(store, 3)
    await store.close()
    copy_db(db, tmp_path / "backup.db")  # epoch 3
    store = await store_at(db, provider)
    await bump(store, 4)  # epoch 7, e.g. a user was revoked meanwhile
    await store.close()
    copy_db(tmp_path / "backup.db", db)  # the host replays the old file
    with pytest.raises(RollbackError) as info:
        await open_db(db, provider)
    message = info.value.message
    assert "epoch 3" in message and "epoch 7" in message
    assert "replaying an old copy" in message and "allow_rollback" in message
    with caplog.at_level(logging.WARNING, logger="marblekeep.seal"):
        restored = await open_db(db, provider, allow_rollback=True)
    assert isinstance(restored, Opened) and restored.store.epoch == 3
    assert "ROLLBACK OVERRIDE" in caplog.text and "3" in caplog.text and "7" in caplog.text
    await bump(restored.store, 1)
    await restored.store.close()
    again = await open_db(db, provider)  # the anchor now follows the restored state
    assert isinstance(again, Opened) and again.store.epoch == 4
    await again.store.close()


async def test_anchor_lagging_by_one_is_accepted(tmp_path: Path, provider: SimulationKeyFileProvider) -> None:
    db = tmp_path / "state.db"
    store = await store_at(db, provider)
    await bump(store, 4)
    assert provider.anchor_path is not None
    lagging = provider.anchor_path.read_bytes()  # anchor at epoch 4
    await bump(store, 1)  # epoch 5; pretend we crashed before the anchor write
    await store.close()
    provider.anchor_path.write_bytes(lagging)
    result = await open_db(db, provider)
    assert isinstance(result, Opened) and result.store.epoch == 5
    assert anchor_of(provider).read().epoch == 5  # caught up
    await result.store.close()


async def test_missing_anchor(tmp_path: Path, provider: SimulationKeyFileProvider) -> None:
    db = tmp_path / "state.db"
    store = await store_at(db, provider)
    await bump(store, 1)
    await store.close()
    assert provider.anchor_path is not None
    provider.anchor_path.unlink()  # crash before the very first anchor write: epoch 1 is accepted
    result = await open_db(db, provider)
    assert isinstance(result, Opened)
    await bump(result.store, 2)
    await result.store.close()
    provider.anchor_path.unlink()
    with pytest.raises(RollbackError, match="missing"):
        await open_db(db, provider)
    result = await open_db(db, provider, allow_rollback=True)
    assert isinstance(result, Opened)
    await result.store.close()
    assert anchor_of(provider).read().epoch == 3


async def test_forged_anchor_is_refused(tmp_path: Path, provider: SimulationKeyFileProvider) -> None:
    db = tmp_path / "state.db"
    store = await store_at(db, provider)
    await bump(store, 3)
    await store.close()
    assert provider.anchor_path is not None
    provider.anchor_path.write_bytes(os.urandom(128))
    with pytest.raises(RollbackError, match="does not verify"):
        await open_db(db, provider)


async def test_deleted_state_is_not_silently_reset(
    tmp_path: Path, provider: SimulationKeyFileProvider
) -> None:
    db = tmp_path / "state.db"
    store = await store_at(db, provider)
    await bump(store, 2)
    await store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    with pytest.raises(RollbackError, match="empty state"):
        await open_db(db, provider)
    fresh = await open_db(db, provider, allow_rollback=True)
    assert isinstance(fresh, Opened) and fresh.fresh
    await bump(fresh.store, 1)
    await fresh.store.close()
    again = await open_db(db, provider)
    assert isinstance(again, Opened) and not again.fresh
    await again.store.close()


async def test_anchor_of_another_state_is_refused(
    tmp_path: Path, provider: SimulationKeyFileProvider
) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    store_a = await store_at(a, provider)
    await bump(store_a, 2)
    await store_a.close()
    with pytest.raises(RollbackError, match="empty state"):  # a second state beside the first one
        await open_db(b, provider)
    result_b = await open_db(b, provider, allow_rollback=True)
    assert isinstance(result_b, Opened)
    await bump(result_b.store, 5)  # same key file: the anchor now belongs to b
    await result_b.store.close()
    with pytest.raises(RollbackError, match="another state"):
        await open_db(a, provider)


async def test_recovery_resets_an_anchor_sealed_under_another_key(
    tmp_path: Path, provider: SimulationKeyFileProvider, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "state.db"
    store = await store_at(db, provider)
    dek = os.urandom(32)
    await store.rekey(dek)
    await bump(store, 2)
    await store.close()
    provider.path.unlink()  # a new key file; the old anchor stays beside it
    fresh_provider = SimulationKeyFileProvider(provider.path)
    result = await open_db(db, fresh_provider)
    assert isinstance(result, NeedsRecovery)
    with caplog.at_level(logging.WARNING, logger="marblekeep.seal"):
        recovered = await result.recovery.complete(dek)
    assert "cannot vouch" in caplog.text
    await recovered.close()
    again = await open_db(db, fresh_provider)
    assert isinstance(again, Opened) and again.store.epoch == 4
    await again.store.close()


async def test_failed_anchor_write_keeps_the_commit(
    tmp_path: Path, provider: SimulationKeyFileProvider, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "state.db"
    store = await store_at(db, provider)
    await bump(store, 1)
    assert provider.anchor_path is not None
    provider.anchor_path.unlink()
    provider.anchor_path.mkdir()  # writes to the anchor now fail
    with caplog.at_level(logging.ERROR, logger="marblekeep.seal"):
        await store.commit({"kept": b"1"}, expected_revision=await store.revision())
    assert "rollback anchor" in caplog.text
    assert await store.get("kept") == b"1"
    await store.close()
