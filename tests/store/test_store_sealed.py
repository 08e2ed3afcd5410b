"""The encryption barrier, startup outcomes, re-keying and recovery hooks of the sealed store."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from marblekeep.errors import ConflictError, IntegrityError, SealError, StoreError
from marblekeep.store import (
    MemoryStore,
    NeedsRecovery,
    Opened,
    OpenResult,
    SealedStore,
    SimulationKeyFileProvider,
    SQLiteStore,
    open_sealed_store,
)

SECRET = b"TOP-SECRET-VALUE-0123456789abcdef"


def opened(result: OpenResult) -> SealedStore:
    assert isinstance(result, Opened), f"expected an opened store, got {result}"
    return result.store


def needs_recovery(result: OpenResult) -> NeedsRecovery:
    assert isinstance(result, NeedsRecovery), f"expected recovery, got {result}"
    return result


async def put(store: SealedStore, writes: dict[str, bytes | None]) -> int:
    return await store.commit(writes, expected_revision=await store.revision())


def raw_rows(db: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(db)
    try:
        return {k.decode(): v for k, v in conn.execute("SELECT key, value FROM records")}
    finally:
        conn.close()


def raw_exec(db: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql, args)
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def provider(tmp_path: Path) -> SimulationKeyFileProvider:
    return SimulationKeyFileProvider(tmp_path / "simulation-kek")


async def open_db(db: Path, provider: SimulationKeyFileProvider, **kw: bool) -> OpenResult:
    return await open_sealed_store(await SQLiteStore.open(db), provider, **kw)


async def make_state(db: Path, provider: SimulationKeyFileProvider) -> SealedStore:
    store = opened(await open_db(db, provider))
    await put(store, {"secret:db": SECRET, "secret:api": b"api-key", "manifest": b"{}"})
    await put(store, {"activations:backend": b"3"})
    return store


# -- basic behaviour ---------------------------------------------------------------------------


async def test_fresh_store_persists_nothing_until_first_commit(
    db: Path, provider: SimulationKeyFileProvider
) -> None:
    result = await open_db(db, provider)
    assert isinstance(result, Opened) and result.fresh and result.outcome == "fresh"
    assert await result.store.get("x") is None
    await result.store.close()
    assert raw_rows(db) == {}
    again = await open_db(db, provider)
    assert isinstance(again, Opened) and again.fresh
    await again.store.close()


async def test_values_are_encrypted_and_names_are_not(db: Path, provider: SimulationKeyFileProvider) -> None:
    store = await make_state(db, provider)
    await store.close()
    rows = raw_rows(db)
    assert "data:secret:db" in rows  # names leak (documented)
    everything = b"".join(rows.values()) + db.read_bytes()
    assert SECRET not in everything and b"api-key" not in everything
    assert len([k for k in rows if k.startswith("meta:kek/")]) == 1  # this KEK's deployment-KEK entry
    assert {k for k in rows if not k.startswith("meta:kek/")} == {
        "meta:format",
        "meta:wrapped_dek",
        "sys:state",
        "data:secret:db",
        "data:secret:api",
        "data:manifest",
        "data:activations:backend",
    }
    # the same value written twice gets a fresh nonce
    store = opened(await open_db(db, provider))
    await put(store, {"a": SECRET, "b": SECRET})
    await store.close()
    rows = raw_rows(db)
    assert rows["data:a"][17:29] != rows["data:b"][17:29]
    assert rows["data:a"][29:] != rows["data:b"][29:]


async def test_reopen_loads_and_epoch_counts_commits(db: Path, provider: SimulationKeyFileProvider) -> None:
    store = await make_state(db, provider)
    store_id, epoch = store.store_id, store.epoch
    assert epoch == 2
    await store.close()
    result = await open_db(db, provider)
    assert isinstance(result, Opened) and not result.fresh and result.outcome == "loaded"
    again = result.store
    assert again.store_id == store_id and again.epoch == 2
    assert await again.get("secret:db") == SECRET
    assert await again.list("secret:") == {"secret:api": b"api-key", "secret:db": SECRET}
    await put(again, {"x": b"1"})
    assert again.epoch == 3
    await again.commit({}, expected_revision=await again.revision())
    assert again.epoch == 3  # an empty commit changes nothing
    await again.close()


async def test_disabled_mode_uses_memory_and_no_kek() -> None:
    store = opened(await open_sealed_store(MemoryStore(), None))
    await put(store, {"k": b"v"})
    assert await store.get("k") == b"v"
    assert "meta:wrapped_dek" not in await store.inner.list("")
    await store.close()


# -- startup outcomes ------------------------------------------------------------------------


async def test_other_kek_needs_recovery(
    db: Path, tmp_path: Path, provider: SimulationKeyFileProvider
) -> None:
    store = await make_state(db, provider)
    await store.close()
    other = SimulationKeyFileProvider(tmp_path / "other-kek")
    result = needs_recovery(await open_db(db, other))
    assert isinstance(result.reason, SealError) and "does not unwrap" in result.reason.message
    assert result.outcome == "needs_recovery"
    await result.recovery._inner.close()


async def test_missing_wrapped_dek_needs_recovery(db: Path, provider: SimulationKeyFileProvider) -> None:
    store = await make_state(db, provider)
    await store.close()
    raw_exec(db, "DELETE FROM records WHERE key = ?", b"meta:wrapped_dek")
    result = needs_recovery(await open_db(db, provider))
    assert "no wrapped" in result.reason.message


async def test_recovery_with_the_dek_restores_everything(
    db: Path, tmp_path: Path, provider: SimulationKeyFileProvider
) -> None:
    store = await make_state(db, provider)
    dek = os.urandom(32)
    await store.rekey(dek, recovery_data=b'{"aa":true}')
    await store.close()
    os.unlink(provider.path)  # the KEK is gone (other host, lost key file)
    new_provider = SimulationKeyFileProvider(tmp_path / "simulation-kek")
    result = needs_recovery(await open_db(db, new_provider))
    pending = result.recovery
    assert pending.recovery_data == b'{"aa":true}'
    assert pending.try_key(dek)
    assert not pending.try_key(os.urandom(32))
    assert not pending.try_key(dek[:16])
    with pytest.raises(SealError):
        await pending.complete(os.urandom(32))
    recovered = await pending.complete(dek)
    assert await recovered.get("secret:db") == SECRET
    assert recovered.recovery_data == b'{"aa":true}'
    await recovered.close()
    # re-sealed under the new KEK: the next start loads without recovery
    again = opened(await open_db(db, new_provider))
    assert await again.get("activations:backend") == b"3"
    await again.close()


async def test_discard_in_recovery_starts_a_new_state(
    db: Path, tmp_path: Path, provider: SimulationKeyFileProvider
) -> None:
    store = await make_state(db, provider)
    old_id = store.store_id
    await store.close()
    result = needs_recovery(await open_db(db, SimulationKeyFileProvider(tmp_path / "other")))
    fresh = await result.recovery.discard()
    assert fresh.store_id != old_id
    assert await fresh.get("secret:db") is None and await fresh.list("") == {}
    await put(fresh, {"manifest": b"new"})
    await fresh.close()
    assert {k for k in raw_rows(db) if k.startswith("data:")} == {"data:manifest"}
    again = opened(await open_db(db, SimulationKeyFileProvider(tmp_path / "other")))
    assert await again.list("") == {"manifest": b"new"}
    await again.close()


async def test_old_wrapped_dek_with_newer_data_needs_recovery(
    db: Path, provider: SimulationKeyFileProvider
) -> None:
    store = await make_state(db, provider)
    old_wrapped = raw_rows(db)["meta:wrapped_dek"]
    await store.rekey(os.urandom(32))
    await put(store, {"secret:db": b"newer"})
    await store.close()
    raw_exec(db, "UPDATE records SET value = ? WHERE key = ?", old_wrapped, b"meta:wrapped_dek")
    result = needs_recovery(await open_db(db, provider))
    assert "does not belong" in result.reason.message


async def test_rekey_reencrypts_everything_in_one_commit(
    db: Path, provider: SimulationKeyFileProvider
) -> None:
    store = await make_state(db, provider)
    before = raw_rows(db)
    rev = await store.revision()
    new_dek = os.urandom(32)
    assert await store.rekey(new_dek, recovery_data=b"R") == rev + 1
    after = raw_rows(db)
    for key in before:
        if key.startswith("data:"):
            assert before[key] != after[key]
            # really under the new DEK, with the key name as associated data
            blob = after[key]
            aad = b"marblekeep/record/v1\x00" + blob[:17] + key.encode()
            assert AESGCM(new_dek).decrypt(blob[17:29], blob[29:], aad) in {SECRET, b"api-key", b"{}", b"3"}
    assert after["meta:recovery_data"] == b"R"
    assert await store.get("secret:db") == SECRET
    with pytest.raises(SealError):
        await store.rekey(b"short")
    await store.close()
    again = opened(await open_db(db, provider))
    assert await again.get("secret:db") == SECRET and again.recovery_data == b"R"
    await again.rekey(os.urandom(32), recovery_data=None)
    assert again.recovery_data is None
    await again.close()
    assert "meta:recovery_data" not in raw_rows(db)


async def test_rewrap_moves_to_another_kek(
    db: Path, tmp_path: Path, provider: SimulationKeyFileProvider
) -> None:
    store = await make_state(db, provider)
    other = SimulationKeyFileProvider(tmp_path / "unique-kek")
    await store.rewrap(other)
    await store.close()
    again = opened(await open_db(db, other))
    assert await again.get("secret:db") == SECRET
    await again.close()
    needs_recovery(await open_db(db, provider))


# -- tampering -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    ["modify-value", "swap-values", "rename-key", "delete-record", "add-record", "old-copy", "recovery-data"],
)
async def test_tampering_is_refused_naming_the_record(
    db: Path, provider: SimulationKeyFileProvider, attack: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = await make_state(db, provider)
    old_db_value = raw_rows(db)["data:secret:db"]
    await put(store, {"secret:db": b"rotated-" + SECRET, "x": b"y"})
    await store.close()
    rows = raw_rows(db)
    if attack == "modify-value":
        blob = bytearray(rows["data:secret:db"])
        blob[-20] ^= 1
        raw_exec(db, "UPDATE records SET value = ? WHERE key = ?", bytes(blob), b"data:secret:db")
    elif attack == "swap-values":
        raw_exec(db, "UPDATE records SET value = ? WHERE key = ?", rows["data:secret:api"], b"data:secret:db")
        raw_exec(db, "UPDATE records SET value = ? WHERE key = ?", rows["data:secret:db"], b"data:secret:api")
    elif attack == "rename-key":
        raw_exec(db, "UPDATE records SET key = ? WHERE key = ?", b"data:secret:dc", b"data:secret:db")
    elif attack == "delete-record":
        raw_exec(db, "DELETE FROM records WHERE key = ?", b"data:secret:db")
    elif attack == "add-record":
        raw_exec(db, "INSERT INTO records VALUES (?, ?)", b"data:secret:new", rows["data:x"])
    elif attack == "old-copy":
        raw_exec(db, "UPDATE records SET value = ? WHERE key = ?", old_db_value, b"data:secret:db")
    elif attack == "recovery-data":
        raw_exec(db, "INSERT INTO records VALUES (?, ?)", b"meta:recovery_data", b'{"00":true}')
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(IntegrityError) as info:
            await open_db(db, provider)
    message = info.value.message
    if attack in {"modify-value", "swap-values", "rename-key"}:
        assert "'secret:db'" in message or "'secret:api'" in message or "'secret:dc'" in message
    if attack == "recovery-data":
        assert "meta:recovery_data" in message
    assert SECRET.decode() not in message and SECRET.decode() not in caplog.text
    assert "restore a backup" in message


async def test_unknown_record_is_refused(db: Path, provider: SimulationKeyFileProvider) -> None:
    await (await make_state(db, provider)).close()
    raw_exec(db, "INSERT INTO records VALUES (?, ?)", b"junk", b"x")
    with pytest.raises(IntegrityError, match="'junk'"):
        await open_db(db, provider)


async def test_tampering_while_running_is_detected(db: Path, provider: SimulationKeyFileProvider) -> None:
    store = await make_state(db, provider)
    old = raw_rows(db)["data:secret:db"]
    await put(store, {"secret:db": b"v2"})
    # the host swaps an old copy back underneath the running store (revision untouched)
    raw_exec(db, "UPDATE records SET value = ? WHERE key = ?", old, b"data:secret:db")
    with pytest.raises(IntegrityError, match="secret:db"):
        await store.get("secret:db")
    with pytest.raises(IntegrityError, match="secret:db"):
        await store.list("secret:")
    raw_exec(db, "DELETE FROM records WHERE key = ?", b"data:secret:api")
    with pytest.raises(IntegrityError, match="secret:api"):
        await store.get("secret:api")
    await store.close()


async def test_concurrent_writer_is_picked_up(db: Path, provider: SimulationKeyFileProvider) -> None:
    first = await make_state(db, provider)
    second = opened(await open_db(db, provider))
    rev = await second.revision()
    await put(first, {"secret:db": b"from-first", "new": b"n"})
    assert await second.get("secret:db") == b"from-first"
    assert await second.get("new") == b"n"
    with pytest.raises(ConflictError):
        await second.commit({"z": b"1"}, expected_revision=rev)
    await put(second, {"z": b"1"})
    assert await first.get("z") == b"1"
    assert await first.list("secret:") == {"secret:api": b"api-key", "secret:db": b"from-first"}
    await first.close()
    await second.close()


async def test_damaged_sqlite_file_is_a_store_error(db: Path, provider: SimulationKeyFileProvider) -> None:
    await (await make_state(db, provider)).close()
    db.write_bytes(b"not a database at all" * 300)
    with pytest.raises(StoreError):
        await open_db(db, provider)


async def test_database_file_is_private(db: Path, provider: SimulationKeyFileProvider) -> None:
    await (await make_state(db, provider)).close()
    assert db.stat().st_mode & 0o077 == 0


# ------------------------------------- the recovery public keys beside R (issue 11, finding 2)


async def test_public_metadata_is_plaintext_authenticated_and_readable_in_recovery(
    db: Path, provider: SimulationKeyFileProvider, tmp_path: Path
) -> None:
    store = await make_state(db, provider)
    assert store.public_metadata is None  # as in a state written before they were stored
    await store.rekey(os.urandom(32), recovery_data=b"null", public_metadata=b'{"RecoveryKeys":{"a":"PEM"}}')
    await put(store, {"x": b"1"})
    await store.close()
    assert raw_rows(db)["meta:public"] == b'{"RecoveryKeys":{"a":"PEM"}}'
    reopened = opened(await open_db(db, provider))
    assert reopened.public_metadata == b'{"RecoveryKeys":{"a":"PEM"}}'
    await reopened.close()
    # readable without the KEK (Recovery), before any DEK is known
    other = SimulationKeyFileProvider(tmp_path / "other-kek")
    pending = needs_recovery(await open_db(db, other)).recovery
    assert pending.public_metadata == b'{"RecoveryKeys":{"a":"PEM"}}'
    await pending.close()
    # authenticated once the DEK is known: a swapped record is refused
    raw_exec(db, "UPDATE records SET value = ? WHERE key = ?", b'{"RecoveryKeys":{}}', b"meta:public")
    with pytest.raises(IntegrityError, match="meta:public"):
        await open_db(db, provider)
    raw_exec(db, "DELETE FROM records WHERE key = ?", b"meta:public")
    with pytest.raises(IntegrityError, match="meta:public"):
        await open_db(db, provider)


async def test_set_public_metadata_stores_them_for_an_older_state(
    db: Path, provider: SimulationKeyFileProvider
) -> None:
    store = await make_state(db, provider)
    epoch = store.epoch
    await store.set_public_metadata(b"{}")
    await store.set_public_metadata(b"{}")  # unchanged: no commit
    assert store.epoch == epoch + 1
    await store.close()
    reopened = opened(await open_db(db, provider))
    assert reopened.public_metadata == b"{}" and await reopened.get("secret:db") == SECRET
    await reopened.close()
