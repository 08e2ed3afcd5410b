"""Following other writers by their changes only (``changes_since``), on real etcd: the backend lists
the records written after a revision; the sealed store verifies them against the sealed index and
takes them, or hands the decision to a full re-read (which refuses tampering as at any start)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc

from etcd_support import EtcdMember, raw_range
from marblekeep.errors import IntegrityError, StoreError
from marblekeep.store import Opened, SimulationKeyFileProvider, open_sealed_store
from marblekeep.store.base import Snapshot
from marblekeep.store.etcd import EtcdConfig, EtcdStore
from marblekeep.store.sealed import SealedStore

pytestmark = pytest.mark.slow


class _StopAfterFlip(EtcdStore):
    """A writer that dies after its large commit's flip, before applying it (as under kill -9)."""

    async def _apply(self, ops: Any, head_mod: int, pending_mod: int) -> bool:
        raise StoreError("simulated crash after the flip")


def raw_put(member: EtcdMember, key: bytes, value: bytes) -> None:
    """A write straight into etcd, past the Coordinator (an attacker with etcd write access)."""
    channel = grpc.insecure_channel(member.target)
    try:
        rpc.KVStub(channel).Put(rpc.PutRequest(key=key, value=value), timeout=10)
    finally:
        channel.close()


async def put(store: EtcdStore | SealedStore, writes: dict[str, bytes | None]) -> int:
    return await store.commit(writes, expected_revision=await store.revision())


async def test_the_backend_lists_what_was_written_after_a_revision(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    store = await EtcdStore.open(config)
    try:
        first = await put(store, {"a": b"1", "b": b"1", "big": b"x"})
        second = await put(store, {"b": b"2", "c": b"3", "big": b"B" * (config.inline_limit + 5)})
        assert await store.changes_since(first) == Snapshot(
            second, {"b": b"2", "c": b"3", "big": b"B" * (config.inline_limit + 5)}
        )  # chunked values are read whole
        assert await store.changes_since(second) == Snapshot(second, {})
        third = await put(store, {"a": None})
        assert await store.changes_since(second) == Snapshot(third, {})  # deletions do not show
        assert await store.changes_since(third + 1000) is None  # a revision this store never had
    finally:
        await store.close()


async def test_the_backend_lists_nothing_while_a_large_commit_is_applied(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    crashing = _StopAfterFlip(config)
    try:
        rev = await put(crashing, {"a": b"1"})
        with pytest.raises(StoreError, match="simulated crash"):
            await crashing.commit({f"k{i:04d}": b"v" for i in range(400)}, expected_revision=rev)
        assert await crashing.changes_since(rev) is None  # pending: read everything instead
    finally:
        await crashing.close()


async def _two_replicas(member: EtcdMember, tmp_path: Path) -> tuple[SealedStore, SealedStore, EtcdConfig]:
    """Two sealed stores on one etcd prefix with the same KEK (as two replicas after the hand-over)."""
    provider = SimulationKeyFileProvider(tmp_path / "kek")
    config = member.config()
    first = await open_sealed_store(await EtcdStore.open(config), provider)
    assert isinstance(first, Opened)
    await put(first.store, {"manifest": b"m", "activations:m": b"0", "secret:s": b"s0"})
    second = await open_sealed_store(await EtcdStore.open(config), provider)
    assert isinstance(second, Opened)
    return first.store, second.store, config


async def test_a_replica_takes_another_ones_commit_by_its_changes(
    etcd_server: EtcdMember, tmp_path: Path
) -> None:
    a, b, _config = await _two_replicas(etcd_server, tmp_path)
    try:
        seen = await b.revision()
        epoch = b.epoch
        rev = await put(a, {"activations:m": b"1", "monotonicCounter:x": b"\x07" + bytes(7)})
        changes = await b.changes_since(seen)
        assert changes == Snapshot(rev, {"activations:m": b"1", "monotonicCounter:x": b"\x07" + bytes(7)})
        assert b.epoch == epoch + 1  # the other writer's epoch is followed
        assert await b.changes_since(rev) == Snapshot(rev, {})
        # the index b keeps is exact: it commits on top, and a full verification accepts the result
        rev = await b.commit({"activations:m": b"2"}, expected_revision=rev)
        assert (await b.snapshot("")).records["activations:m"] == b"2"
        assert await a.get("activations:m") == b"2"  # a re-verifies everything after b's commit
        assert await b.changes_since(seen) is None  # not the revision b holds: read everything
    finally:
        await a.close()
        await b.close()


async def test_a_deleted_record_hands_over_to_the_full_read(etcd_server: EtcdMember, tmp_path: Path) -> None:
    a, b, _config = await _two_replicas(etcd_server, tmp_path)
    try:
        seen = await b.revision()
        await put(a, {"secret:s": None, "activations:m": b"1"})
        assert await b.changes_since(seen) is None  # the record count tells something was removed
        records = (await b.snapshot("")).records
        assert "secret:s" not in records and records["activations:m"] == b"1"
    finally:
        await a.close()
        await b.close()


async def test_an_older_sealed_copy_slipped_in_is_refused_by_the_full_read(
    etcd_server: EtcdMember, tmp_path: Path
) -> None:
    a, b, config = await _two_replicas(etcd_server, tmp_path)
    try:
        seen = await b.revision()
        old_copy = raw_range(etcd_server, config.prefix)[b"r/data:activations:m"]
        await put(a, {"activations:m": b"5"})
        # an attacker with write access to etcd puts back the older sealed copy of the record
        raw_put(etcd_server, config.prefix.encode() + b"r/data:activations:m", old_copy)
        assert await b.changes_since(seen) is None  # it does not match the sealed index
        with pytest.raises(IntegrityError, match="sealed index"):
            await b.snapshot("")
    finally:
        await a.close()
        await b.close()


async def test_a_damaged_changed_record_is_refused(etcd_server: EtcdMember, tmp_path: Path) -> None:
    a, b, config = await _two_replicas(etcd_server, tmp_path)
    try:
        seen = await b.revision()
        await put(a, {"activations:m": b"5"})
        key = config.prefix.encode() + b"r/data:activations:m"
        blob = bytearray(raw_range(etcd_server, config.prefix)[b"r/data:activations:m"])
        blob[-1] ^= 1
        raw_put(etcd_server, key, b"\x00" + bytes(blob[1:]))
        with pytest.raises(IntegrityError, match="activations:m"):
            await b.changes_since(seen)
    finally:
        await a.close()
        await b.close()


async def test_a_commit_interrupted_after_it_went_through_keeps_the_index_of_its_revision(
    etcd_server: EtcdMember, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while writing the rollback anchor, after etcd applied the commit: the index in memory
    is the committed one (not put back), so taking the next changes on top of it stays exact."""
    a, b, _config = await _two_replicas(etcd_server, tmp_path)
    try:
        async def cancelled() -> None:
            raise asyncio.CancelledError

        monkeypatch.setattr(b, "_write_anchor", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await put(b, {"activations:m": b"1"})
        monkeypatch.undo()
        committed = b._revision  # the commit's revision (no full re-read in between)
        assert await a.get("activations:m") == b"1"
        rev = await put(a, {"activations:m": b"2"})
        assert await b.changes_since(committed) == Snapshot(rev, {"activations:m": b"2"})
        assert await b.commit({"activations:m": b"3"}, expected_revision=rev) > rev
        assert await a.get("activations:m") == b"3"  # a verifies what b's index produced
    finally:
        await a.close()
        await b.close()


async def test_likely_prefixes_are_read_first_and_the_index_tells_whether_that_was_all(
    etcd_server: EtcdMember, tmp_path: Path
) -> None:
    """With the prefixes where changes usually are (activation counts), the backend ranges over
    those alone when the sealed index confirms nothing else changed; otherwise over everything."""
    a, b, _config = await _two_replicas(etcd_server, tmp_path)
    try:
        inner = b.inner
        assert isinstance(inner, EtcdStore)
        calls: list[tuple[str, ...]] = []
        real = inner.changes_since

        async def recording(revision: int, prefixes: Any = ("",)) -> Snapshot | None:
            calls.append(tuple(prefixes))
            return await real(revision, prefixes)

        inner.changes_since = recording  # type: ignore[method-assign]
        seen = await b.revision()
        rev = await put(a, {"activations:m": b"1"})
        assert await b.changes_since(seen, likely=("activations:",)) == Snapshot(rev, {"activations:m": b"1"})
        assert calls == [("sys:state", "data:activations:")]  # the rest of the state was not ranged
        calls.clear()
        rev2 = await put(a, {"activations:m": b"2", "secret:s": b"s1"})
        changes = await b.changes_since(rev, likely=("activations:",))
        assert changes == Snapshot(rev2, {"activations:m": b"2", "secret:s": b"s1"})
        assert calls == [("sys:state", "data:activations:"), ("",)]  # the index said: more changed
        assert (await b.snapshot("")).records["secret:s"] == b"s1"
    finally:
        await a.close()
        await b.close()
