"""Store conformance suite: every backend (and the sealed barrier over each) must pass all of it.

To add a backend, add a :class:`Backend` factory to :data:`BACKENDS`. The etcd backends run
against the session's real etcd (``etcd_server`` fixture), each test under its own key prefix.
``tests/store/test_store_conformance.py`` loads this module and collects its tests;
the ``backend`` fixture runs each test once per entry.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcd_support import EtcdMember, unique_prefix
from marblekeep.errors import ConflictError, StoreError
from marblekeep.store import (
    MemoryStore,
    Opened,
    SimulationKeyFileProvider,
    SQLiteStore,
    Store,
    Transaction,
    open_sealed_store,
)
from marblekeep.store.etcd import EtcdStore


@dataclass
class Backend:
    name: str
    persistent: bool
    open: Callable[[], Awaitable[Store]]  # opens (again) the same backend


async def _sealed(inner: Store, key_file: Path) -> Store:
    result = await open_sealed_store(inner, SimulationKeyFileProvider(key_file))
    assert isinstance(result, Opened)
    return result.store


def _memory(tmp: Path) -> Backend:
    async def open_() -> Store:
        return MemoryStore()

    return Backend("memory", False, open_)


def _sqlite(tmp: Path) -> Backend:
    async def open_() -> Store:
        return await SQLiteStore.open(tmp / "state.db")

    return Backend("sqlite", True, open_)


def _sealed_memory(tmp: Path) -> Backend:
    async def open_() -> Store:
        return await _sealed(MemoryStore(), tmp / "kek")

    return Backend("sealed-memory", False, open_)


def _sealed_sqlite(tmp: Path) -> Backend:
    async def open_() -> Store:
        return await _sealed(await SQLiteStore.open(tmp / "state.db"), tmp / "kek")

    return Backend("sealed-sqlite", True, open_)


def _etcd(tmp: Path, etcd: EtcdMember) -> Backend:
    config = etcd.config(unique_prefix())

    async def open_() -> Store:
        return await EtcdStore.open(config)

    return Backend("etcd", True, open_)


def _sealed_etcd(tmp: Path, etcd: EtcdMember) -> Backend:
    config = etcd.config(unique_prefix())

    async def open_() -> Store:
        return await _sealed(await EtcdStore.open(config), tmp / "kek")

    return Backend("sealed-etcd", True, open_)


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "sealed-memory": _sealed_memory,
    "sealed-sqlite": _sealed_sqlite,
}
#: Backends on the session's real etcd.
ETCD_BACKENDS: dict[str, Callable[[Path, EtcdMember], Backend]] = {
    "etcd": _etcd,
    "sealed-etcd": _sealed_etcd,
}


@pytest.fixture(params=sorted(BACKENDS) + sorted(ETCD_BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param in ETCD_BACKENDS:
        return ETCD_BACKENDS[request.param](tmp_path, request.getfixturevalue("etcd_server"))
    return BACKENDS[request.param](tmp_path)


async def put(store: Store, writes: dict[str, bytes | None]) -> int:
    return await store.commit(writes, expected_revision=await store.revision())


# --------------------------------------------------------------------------------------------


async def test_empty_store(backend: Backend) -> None:
    store = await backend.open()
    assert await store.get("nothing") is None
    assert await store.list("") == {}
    assert await store.revision() == 0
    snap = await store.snapshot()
    assert snap.revision == 0 and dict(snap.records) == {}
    await store.close()


async def test_put_get_overwrite_delete(backend: Backend) -> None:
    store = await backend.open()
    await put(store, {"a": b"1", "b": b"\x00\xff" * 10})
    assert await store.get("a") == b"1"
    assert await store.get("b") == b"\x00\xff" * 10
    await put(store, {"a": b"2"})
    assert await store.get("a") == b"2"
    await put(store, {"a": None, "never-existed": None})
    assert await store.get("a") is None
    assert await store.get("b") == b"\x00\xff" * 10
    await put(store, {"empty": b""})
    assert await store.get("empty") == b""
    assert await store.list("") == {"b": b"\x00\xff" * 10, "empty": b""}
    await store.close()


async def test_prefix_isolation(backend: Backend) -> None:
    store = await backend.open()
    keys = ["secret", "secret:", "secret:a", "secret:b", "secretX", "secrets:c", "secre", "sea", "t"]
    keys.append("secret:\uffff")
    await put(store, {k: k.encode() for k in keys})
    assert sorted(await store.list("secret:")) == ["secret:", "secret:a", "secret:b", "secret:\uffff"]
    assert sorted(await store.list("secret")) == sorted(k for k in keys if k.startswith("secret"))
    assert await store.list("secretX") == {"secretX": b"secretX"}
    assert await store.list("zzz") == {}
    assert sorted(await store.list("")) == sorted(keys)
    assert (await store.snapshot("secret:")).records.keys() == (await store.list("secret:")).keys()
    # values come back attached to their own keys
    assert all(v == k.encode() for k, v in (await store.list("")).items())
    await store.close()


async def test_unicode_keys(backend: Backend) -> None:
    store = await backend.open()
    keys = ["user:Zoë", "user:日本", "user:\U0001f600", "user:a b/c\\d\"e'f"]
    await put(store, {k: k.encode("utf-8") for k in keys})
    for k in keys:
        assert await store.get(k) == k.encode("utf-8")
    assert sorted(await store.list("user:")) == sorted(keys)
    await store.close()


async def test_compare_and_set_conflict_applies_nothing(backend: Backend) -> None:
    store = await backend.open()
    r1 = await put(store, {"x": b"1"})
    r2 = await store.commit({"x": b"2"}, expected_revision=r1)
    with pytest.raises(ConflictError):
        await store.commit({"x": b"stale", "y": b"stale"}, expected_revision=r1)
    assert await store.get("x") == b"2"
    assert await store.get("y") is None
    assert await store.revision() == r2
    with pytest.raises(ConflictError):
        await store.commit({}, expected_revision=r1)  # an empty commit still checks the revision
    await store.close()


async def test_multi_key_commit_is_atomic(backend: Backend) -> None:
    store = await backend.open()
    await put(store, {"a": b"old-a", "b": b"old-b"})
    rev = await store.revision()
    bad: dict[str, object] = {"a": b"new-a", "c": b"new-c", "b": 12345}
    with pytest.raises(StoreError):
        await store.commit(bad, expected_revision=rev)  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        await store.commit({"a": b"new-a", "": b"empty key"}, expected_revision=rev)
    assert await store.list("") == {"a": b"old-a", "b": b"old-b"}
    assert await store.revision() == rev
    await store.commit({f"k{i}": bytes([i]) for i in range(50)} | {"a": None}, expected_revision=rev)
    got = await store.list("")
    assert "a" not in got and got["b"] == b"old-b" and len(got) == 51
    await store.close()


async def test_revision_is_monotonic(backend: Backend) -> None:
    store = await backend.open()
    seen = [await store.revision()]
    for i in range(20):
        seen.append(await put(store, {f"k{i % 3}": str(i).encode()} if i % 4 else {f"k{i % 3}": None}))
        assert await store.revision() == seen[-1]
    assert all(a < b for a, b in itertools.pairwise(seen))
    assert await store.commit({}, expected_revision=seen[-1]) == seen[-1]
    assert await store.revision() == seen[-1]
    await store.close()


async def test_reopen_keeps_everything(backend: Backend) -> None:
    if not backend.persistent:
        pytest.skip(f"{backend.name} does not persist")
    store = await backend.open()
    await put(store, {"a": b"1", "secret:x": b"2", "gone": b"3"})
    await put(store, {"gone": None})
    rev = await store.revision()
    await store.close()
    again = await backend.open()
    assert await again.list("") == {"a": b"1", "secret:x": b"2"}
    assert await again.revision() == rev
    assert await put(again, {"a": b"4"}) > rev
    await again.close()
    third = await backend.open()
    assert await third.get("a") == b"4"
    await third.close()


async def test_large_values(backend: Backend) -> None:
    store = await backend.open()
    big = bytes(range(256)) * (8 * 4096)  # 8 MiB
    await put(store, {"big": big, "small": b"s"})
    assert await store.get("big") == big
    assert (await store.list("b"))["big"] == big
    await store.close()


async def test_ten_thousand_keys(backend: Backend) -> None:
    store = await backend.open()
    values = {f"secret:{i:05d}": i.to_bytes(4, "big") * 50 for i in range(10_000)}
    await put(store, dict(values))
    await put(store, {"secretX": b"outside"})
    listed = await store.list("secret:")
    assert listed == values
    assert await store.get("secret:04321") == values["secret:04321"]
    await put(store, {"secret:00000": None, "secret:09999": b"changed"})
    listed = await store.list("secret:")
    assert len(listed) == 9_999 and listed["secret:09999"] == b"changed"
    await store.close()


async def test_invalid_keys_and_values_are_store_errors(backend: Backend) -> None:
    store = await backend.open()
    rev = await store.revision()
    for key in ["", "nul\x00inside", "x" * 5000, "\udc80"]:
        with pytest.raises(StoreError):
            await store.commit({key: b"v"}, expected_revision=rev)
        with pytest.raises(StoreError):
            await store.get(key)
    with pytest.raises(StoreError):
        await store.commit({"k": "a str"}, expected_revision=rev)  # type: ignore[dict-item]
    await store.close()


async def test_closed_store_raises_store_error(backend: Backend) -> None:
    store = await backend.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreError):
        await store.get("a")
    with pytest.raises(StoreError):
        await store.commit({"a": b"1"}, expected_revision=0)


async def test_transaction_read_your_writes(backend: Backend) -> None:
    store = await backend.open()
    await put(store, {"secret:a": b"A", "secret:b": b"B", "other": b"O"})
    tx = await Transaction.begin(store)
    assert await tx.get("secret:a") == b"A"
    tx.put("secret:c", b"C")
    tx.delete("secret:a")
    tx.put("secret:b", b"B2")
    assert await tx.get("secret:a") is None
    assert await tx.get("secret:c") == b"C"
    assert await tx.list("secret:") == {"secret:b": b"B2", "secret:c": b"C"}
    assert await store.get("secret:c") is None  # nothing visible before commit
    rev = await tx.commit()
    assert rev == await store.revision()
    assert await store.list("secret:") == {"secret:b": b"B2", "secret:c": b"C"}
    with pytest.raises(StoreError):
        tx.put("again", b"x")
    with pytest.raises(StoreError):
        await tx.commit()
    await store.close()


async def test_transaction_conflict(backend: Backend) -> None:
    store = await backend.open()
    await put(store, {"counter": b"0"})
    first = await Transaction.begin(store)
    second = await Transaction.begin(store)
    first.put("counter", b"1")
    second.put("counter", b"2")
    second.put("extra", b"x")
    await first.commit()
    with pytest.raises(ConflictError):
        await second.commit()
    assert await store.get("counter") == b"1"
    assert await store.get("extra") is None
    # a read-only transaction learns that its reads are stale
    reader = await Transaction.begin(store)
    assert await reader.get("counter") == b"1"
    await put(store, {"counter": b"3"})
    with pytest.raises(ConflictError):
        await reader.commit()
    await store.close()


async def test_concurrent_increments_with_retry(backend: Backend) -> None:
    store = await backend.open()
    await put(store, {"n": b"0"})

    async def increment() -> None:
        while True:
            tx = await Transaction.begin(store)
            value = int(await tx.get("n") or b"0")
            await asyncio.sleep(0)
            tx.put("n", str(value + 1).encode())
            try:
                await tx.commit()
                return
            except ConflictError:
                continue

    await asyncio.gather(*(increment() for _ in range(20)))
    assert await store.get("n") == b"20"
    await store.close()
