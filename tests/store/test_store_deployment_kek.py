"""The deployment KEK: one ``meta:kek/<id>`` entry per replica KEK, migration of single-KEK states,
opening with a handed-over key (the floor), DEK changes without the other replicas, recovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_store_sealed import SECRET, make_state, needs_recovery, open_db, opened, put, raw_rows

from marblekeep.errors import IntegrityError, RollbackError, SealError
from marblekeep.store import SimulationKeyFileProvider, SQLiteStore, open_sealed_store
from marblekeep.store.sealed import (
    META_KEK_PREFIX,
    META_WRAPPED_DEK,
    HandoverFloor,
    HandoverNeeded,
    _wrap,
    kek_id,
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def replica(tmp_path: Path, name: str) -> SimulationKeyFileProvider:
    (tmp_path / name).mkdir(exist_ok=True)
    return SimulationKeyFileProvider(tmp_path / name / "simulation-kek")


def entries(db: Path) -> set[str]:
    return {k for k in raw_rows(db) if k.startswith(META_KEK_PREFIX)}


async def test_each_replica_kek_gets_its_own_entry_by_handover(db: Path, tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    store = await make_state(db, a)
    assert entries(db) == {META_KEK_PREFIX + kek_id(a.load_kek())}
    dkek = store.deployment_kek_for_handover()
    assert dkek is not None and len(dkek) == 32 and dkek != a.load_kek()
    floor = HandoverFloor(store.store_id, store.epoch)
    await store.close()

    # B's KEK has no entry: recovery, but a hand-over is possible
    result = needs_recovery(await open_db(db, b))
    assert result.handover_possible and "no entry for the deployment key" in result.reason.message
    await result.recovery.close()

    # with the handed-over key: opens, stores B's entry, seeds B's anchor (no --allow-rollback)
    joined = opened(
        await open_sealed_store(await SQLiteStore.open(db), b, deployment_kek=dkek, handover=floor)
    )
    assert await joined.get("secret:db") == SECRET
    assert joined.epoch == floor.epoch + 1
    await joined.close()
    assert entries(db) == {META_KEK_PREFIX + kek_id(k.load_kek()) for k in (a, b)}
    # the key ids are public, the keys are not in them
    for k in (a, b):
        assert k.load_kek().hex() not in "".join(entries(db))

    # B restarts alone on its own entry; A still opens too
    for provider in (b, a):
        again = opened(await open_db(db, provider))
        assert await again.get("secret:db") == SECRET
        await again.close()


async def test_a_dek_change_needs_nothing_from_other_replicas(db: Path, tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    store = await make_state(db, a)
    dkek, floor = store.deployment_kek_for_handover(), HandoverFloor(store.store_id, store.epoch)
    await store.close()
    joined = opened(
        await open_sealed_store(await SQLiteStore.open(db), b, deployment_kek=dkek, handover=floor)
    )
    await joined.close()

    store = opened(await open_db(db, a))
    await store.rekey(os.urandom(32), expected_revision=await store.revision())  # a manifest set
    await put(store, {"secret:new": b"after-rekey"})
    await store.close()
    again = opened(await open_db(db, b))
    assert await again.get("secret:new") == b"after-rekey"
    await again.close()


async def test_handover_floor_refuses_an_older_or_another_state(db: Path, tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    store = await make_state(db, a)
    dkek, store_id, epoch = store.deployment_kek_for_handover(), store.store_id, store.epoch
    await store.close()
    with pytest.raises(RollbackError, match="older than the epoch"):
        await open_sealed_store(
            await SQLiteStore.open(db), b, deployment_kek=dkek, handover=HandoverFloor(store_id, epoch + 5)
        )
    with pytest.raises(IntegrityError, match="another store id"):
        await open_sealed_store(
            await SQLiteStore.open(db), b, deployment_kek=dkek, handover=HandoverFloor(os.urandom(16), epoch)
        )
    with pytest.raises(SealError, match="handed over does not open"):
        await open_sealed_store(
            await SQLiteStore.open(db),
            b,
            deployment_kek=os.urandom(32),
            handover=HandoverFloor(store_id, epoch),
        )
    assert entries(db) == {META_KEK_PREFIX + kek_id(a.load_kek())}  # nothing stored for B


async def test_single_kek_state_migrates_on_first_open(db: Path, tmp_path: Path) -> None:
    a = replica(tmp_path, "a")
    store = await make_state(db, a)
    # rewrite it the way marblekeep wrote states before the deployment KEK: the DEK under the KEK
    legacy = _wrap(a.load_kek(), store.store_id, store._crypto.keyring, os.urandom)
    epoch = store.epoch
    await store.close()
    inner = await SQLiteStore.open(db)
    writes: dict[str, bytes | None] = dict.fromkeys(entries(db))
    writes[META_WRAPPED_DEK] = legacy
    await inner.commit(writes, expected_revision=await inner.revision())
    await inner.close()
    assert not entries(db)

    migrated = opened(await open_db(db, a))
    assert await migrated.get("secret:db") == SECRET
    assert migrated.epoch == epoch + 1
    dkek = migrated.deployment_kek_for_handover()
    assert dkek is not None and dkek != a.load_kek()
    await migrated.close()
    assert entries(db) == {META_KEK_PREFIX + kek_id(a.load_kek())}
    assert raw_rows(db)[META_WRAPPED_DEK] != legacy
    again = opened(await open_db(db, a))  # and it keeps opening
    assert await again.get("secret:db") == SECRET
    await again.close()


async def test_recovery_makes_a_new_deployment_kek_and_drops_stale_entries(db: Path, tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    store = await make_state(db, a)
    dek = store._crypto.keyring.dek
    await store.close()
    pending = needs_recovery(await open_db(db, b)).recovery
    recovered = await pending.complete(dek, allow_rollback=True)
    assert await recovered.get("secret:db") == SECRET
    await recovered.close()
    assert entries(db) == {META_KEK_PREFIX + kek_id(b.load_kek())}
    assert needs_recovery(await open_db(db, a)).handover_possible


async def test_a_fresh_replica_learns_that_another_stored_the_first_state(db: Path, tmp_path: Path) -> None:
    a, b = replica(tmp_path, "a"), replica(tmp_path, "b")
    fresh_b = opened(await open_db(db, b))  # started before anything was stored
    store = await make_state(db, a)
    floor = HandoverFloor(store.store_id, store.epoch)
    dkek = store.deployment_kek_for_handover()
    assert dkek is not None
    with pytest.raises(HandoverNeeded):
        await fresh_b.revision()
    await fresh_b.adopt_handover(dkek, floor)
    assert await fresh_b.get("secret:db") == SECRET
    await fresh_b.close()
    await store.close()
    again = opened(await open_db(db, b))
    assert await again.get("secret:db") == SECRET
    await again.close()
