"""The etcd backend against real etcd: key layout, etcd's limits, interrupted commits, outages, rollback.

The conformance suite (tests/store/conformance.py) also runs on etcd; this module checks what is
particular to etcd. Tests that stop, restore or kill etcd start their own member.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from aetcd import rpc

from etcd_support import EtcdCluster, EtcdMember, free_port, raw_range, unique_prefix
from marblekeep.errors import ConflictError, RollbackError, StoreError
from marblekeep.handover import Membership
from marblekeep.store import Opened, SimulationKeyFileProvider, open_sealed_store
from marblekeep.store.etcd import EtcdConfig, EtcdEndpoint, EtcdStore, _Ambiguous
from marblekeep.store.location import EtcdLocation, parse_store_url

pytestmark = pytest.mark.slow


def raw_keys(member: EtcdMember, prefix: str) -> dict[bytes, bytes]:
    return raw_range(member, prefix)


def raw_put(member: EtcdMember, key: bytes, value: bytes) -> None:
    channel = grpc.insecure_channel(member.target)
    try:
        rpc.KVStub(channel).Put(rpc.PutRequest(key=key, value=value), timeout=10)
    finally:
        channel.close()


async def put(store: EtcdStore, writes: dict[str, bytes | None]) -> int:
    return await store.commit(writes, expected_revision=await store.revision())


async def test_layout_small_commit_is_one_record_per_key(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    store = await EtcdStore.open(config)
    rev = await put(store, {"secret:a": b"A", "meta:x": b"X"})
    keys = raw_keys(etcd_server, config.prefix)
    assert keys[b"r/secret:a"] == b"\x00A" and keys[b"r/meta:x"] == b"\x00X"
    assert keys[b"head"].startswith(b"MKE1") and len(keys[b"head"]) == 20
    assert set(keys) == {b"head", b"r/secret:a", b"r/meta:x"}
    assert await store.revision() == rev
    await store.close()


async def test_large_value_is_chunked_and_old_chunks_are_removed(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    store = await EtcdStore.open(config)
    big = os.urandom(3 * 1024 * 1024 + 17)  # above etcd's 1.5 MiB request limit
    await put(store, {"big": big})
    keys = raw_keys(etcd_server, config.prefix)
    chunks = sorted(k for k in keys if k.startswith(b"c/"))
    assert len(chunks) == 4 and keys[b"r/big"][0] == 1
    assert all(len(keys[c]) <= config.chunk_size for c in chunks)
    assert await store.get("big") == big
    other = await EtcdStore.open(config)  # another replica reads the same bytes
    assert await other.get("big") == big
    await put(store, {"big": b"small now"})
    keys = raw_keys(etcd_server, config.prefix)
    assert not [k for k in keys if k.startswith(b"c/")], "replaced chunks must be removed"
    assert await other.get("big") == b"small now"
    await store.close()
    await other.close()


async def test_commit_beyond_etcd_limits_is_atomic_for_readers(etcd_server: EtcdMember) -> None:
    """3,000 records of 2 KiB (6 MiB, 3,000 operations) in one commit: readers see none or all."""
    config = etcd_server.config()
    writer = await EtcdStore.open(config)
    reader = await EtcdStore.open(config)
    await put(writer, {"rec:0000": b"old", "keep": b"k"})
    values = {f"rec:{i:04d}": os.urandom(2048) for i in range(3000)}
    stop = asyncio.Event()
    observed: list[int] = []

    async def watch() -> None:
        while not stop.is_set():
            snap = await reader.snapshot("rec:")
            observed.append(len(snap.records))
            assert len(snap.records) in (1, 3000), f"a reader saw a partial commit: {len(snap.records)}"
            if len(snap.records) == 3000:
                assert dict(snap.records) == values
            await asyncio.sleep(0)

    task = asyncio.create_task(watch())
    rev = await put(writer, dict(values))
    await asyncio.sleep(0.2)
    stop.set()
    await task
    assert observed and observed[-1] == 3000
    assert await writer.revision() == rev
    keys = raw_keys(etcd_server, config.prefix)
    assert b"pending" not in keys and not [k for k in keys if k.startswith(b"tx/")]
    assert (await reader.list("")) == values | {"keep": b"k"}
    await writer.close()
    await reader.close()


class _StopAfterFlip(EtcdStore):
    """A writer that dies after its large commit's flip, before applying it (as under kill -9)."""

    async def _apply(self, ops: Any, head_mod: int, pending_mod: int) -> bool:
        raise StoreError("simulated crash after the flip")


async def test_interrupted_large_commit_is_finished_by_others(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    crashing = _StopAfterFlip(config)
    await put(crashing, {"a": b"1", "gone": b"x"})
    writes: dict[str, bytes | None] = {f"k{i:04d}": str(i).encode() for i in range(400)}
    writes["gone"] = None
    writes["a"] = b"2"
    rev = await crashing.revision()
    with pytest.raises(StoreError, match="simulated crash"):
        await crashing.commit(writes, expected_revision=rev)
    keys = raw_keys(etcd_server, config.prefix)
    assert b"pending" in keys, "the flip went through before the crash"
    # A reader sees the whole commit already (the redo stream overlays the records).
    reader = EtcdStore(config)
    assert await reader.get("a") == b"2" and await reader.get("gone") is None
    assert len(await reader.list("k")) == 400
    flipped = await reader.revision()
    assert flipped > rev
    # The next writer finishes the commit, then writes its own.
    new_rev = await put(reader, {"after": b"y"})
    assert new_rev > flipped
    keys = raw_keys(etcd_server, config.prefix)
    assert b"pending" not in keys and not [k for k in keys if k.startswith(b"tx/")]
    assert keys[b"r/a"] == b"\x002" and b"r/gone" not in keys and b"r/k0399" in keys
    await crashing.close()
    await reader.close()


async def test_open_finishes_an_interrupted_commit_and_collects_leftovers(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    crashing = _StopAfterFlip(config)
    await put(crashing, {"a": b"1"})
    with pytest.raises(StoreError):
        await crashing.commit(
            {f"k{i:04d}": b"v" for i in range(300)}, expected_revision=await crashing.revision()
        )
    # leftovers of commits that died before their flip: a chunk set and a redo stream nobody references
    raw_put(etcd_server, (config.prefix + "c/" + "ab" * 16 + "/00000000").encode(), b"orphan chunk")
    raw_put(etcd_server, (config.prefix + "tx/" + "cd" * 16 + "/00000000").encode(), b"orphan stream")
    before = await crashing.revision()
    await crashing.close()
    store = await EtcdStore.open(config)
    keys = raw_keys(etcd_server, config.prefix)
    assert b"pending" not in keys
    assert not [k for k in keys if k.startswith((b"c/", b"tx/"))]
    assert len(await store.list("k")) == 300
    assert await store.revision() > before  # the fence moved the head: no stale commit can flip
    await store.close()


async def test_conflicting_commit_leaves_nothing_behind(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    a = await EtcdStore.open(config)
    b = await EtcdStore.open(config)
    rev = await put(a, {"x": b"1"})
    await b.commit({"x": b"2"}, expected_revision=rev)
    with pytest.raises(ConflictError):
        await a.commit({"x": b"3", "big": os.urandom(2 * 1024 * 1024)}, expected_revision=rev)
    with pytest.raises(ConflictError):
        await a.commit({f"k{i}": b"v" for i in range(500)}, expected_revision=rev)
    keys = raw_keys(etcd_server, config.prefix)
    assert not [k for k in keys if k.startswith((b"c/", b"tx/"))]
    assert await a.get("x") == b"2" and await a.get("k1") is None
    await a.close()
    await b.close()


class _LoseReply(EtcdStore):
    """The connection breaks around the flip: before it is sent, or after it was applied."""

    def __init__(self, config: EtcdConfig, *, applied: bool) -> None:
        super().__init__(config)
        self.applied = applied
        self.armed = True

    async def _txn(self, compare: Any, success: Any, failure: Any = ()) -> Any:
        if self.armed and failure:  # the flip (the only transaction with a failure branch)
            self.armed = False
            if self.applied:
                await super()._txn(compare, success, failure)
            raise _Ambiguous
        return await super()._txn(compare, success, failure)


async def test_unknown_commit_outcome_is_resolved_never_applied_twice(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    applied = _LoseReply(config, applied=True)
    rev = await put(applied, {"n": b"0"})
    applied.armed = True
    new_rev = await applied.commit({"n": b"1"}, expected_revision=rev)  # the reply was lost, not the write
    assert new_rev == await applied.revision() and await applied.get("n") == b"1"

    lost = _LoseReply(config, applied=False)
    with pytest.raises(StoreError, match="not applied"):
        await lost.commit({"n": b"2"}, expected_revision=new_rev)
    assert await lost.get("n") == b"1"
    # the fence moved the head: the lost flip can never apply later
    assert await lost.revision() > new_rev
    await applied.close()
    await lost.close()


async def test_unreachable_etcd_is_a_store_error_naming_the_endpoint() -> None:
    port = free_port()
    config = EtcdConfig((EtcdEndpoint("127.0.0.1", port),), prefix=unique_prefix(), timeout=1.0)
    with pytest.raises(StoreError) as info:
        await EtcdStore.open(config)
    assert f"127.0.0.1:{port}" in info.value.message and "unreachable" in info.value.message
    assert info.value.http_status == 503


async def test_etcd_stopped_then_back_the_same_store_recovers(tmp_path: Path) -> None:
    member = EtcdMember(tmp_path / "etcd").start()
    try:
        store = await EtcdStore.open(member.config(timeout=1.0))
        rev = await put(store, {"a": b"acknowledged"})
        member.stop()
        with pytest.raises(StoreError, match="unreachable"):
            await store.commit({"a": b"during outage"}, expected_revision=rev)
        with pytest.raises(StoreError, match="unreachable"):
            await store.get("a")
        member.start()
        for _ in range(100):  # the client reconnects on its own (backoff at most 1 s)
            try:
                value = await store.get("a")
                break
            except StoreError:
                await asyncio.sleep(0.1)
        assert value == b"acknowledged"
        assert await put(store, {"a": b"after"}) > rev
        await store.close()
    finally:
        member.stop()


async def test_three_member_cluster_keeps_serving_with_one_member_killed(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "cluster").start()
    try:
        store = await EtcdStore.open(cluster.config(timeout=2.0))
        await put(store, {"a": b"1"})
        cluster.members[0].kill()  # the endpoint the store talks to first
        for i in range(20):
            await put(store, {"a": str(i).encode()})
        assert await store.get("a") == b"19"
        await store.close()
    finally:
        cluster.stop()


async def test_revision_going_backwards_is_detected(tmp_path: Path) -> None:
    """etcd restored from an older copy of its data while a store is open: refused, not served."""
    member = EtcdMember(tmp_path / "etcd").start()
    backup = tmp_path / "backup"
    try:
        store = await EtcdStore.open(member.config())
        await put(store, {"a": b"1"})
        member.stop()
        shutil.copytree(member.data_dir, backup)
        member.start()
        for i in range(5):
            await put(store, {"a": str(i).encode()})
        member.stop()
        shutil.rmtree(member.data_dir)
        shutil.copytree(backup, member.data_dir)
        member.start()
        with pytest.raises(RollbackError, match="went back"):
            for _ in range(100):
                try:
                    await store.get("a")
                    break
                except RollbackError:
                    raise
                except StoreError:
                    await asyncio.sleep(0.1)
        await store.close()
    finally:
        member.stop()


async def test_sealed_state_rollback_on_etcd_is_refused_by_the_anchor(tmp_path: Path) -> None:
    """An older copy of etcd's data behind a restarted Coordinator: the epoch is below the anchor."""
    member = EtcdMember(tmp_path / "etcd").start()
    backup = tmp_path / "backup"
    provider = SimulationKeyFileProvider(tmp_path / "kek")
    prefix = unique_prefix()
    try:
        opened = await open_sealed_store(await EtcdStore.open(member.config(prefix)), provider)
        assert isinstance(opened, Opened)
        sealed = opened.store
        for i in range(3):
            await sealed.commit({"counter": str(i).encode()}, expected_revision=await sealed.revision())
        await sealed.close()
        member.stop()
        shutil.copytree(member.data_dir, backup)
        member.start()
        opened = await open_sealed_store(await EtcdStore.open(member.config(prefix)), provider)
        assert isinstance(opened, Opened)
        await opened.store.commit({"counter": b"revoked"}, expected_revision=await opened.store.revision())
        await opened.store.close()
        member.stop()
        shutil.rmtree(member.data_dir)
        shutil.copytree(backup, member.data_dir)
        member.start()
        inner = await EtcdStore.open(member.config(prefix))
        with pytest.raises(RollbackError, match="epoch"):
            await open_sealed_store(inner, provider)
        again = await open_sealed_store(inner, provider, allow_rollback=True)
        assert isinstance(again, Opened) and await again.store.get("counter") == b"2"
        await inner.close()
    finally:
        member.stop()


async def test_etcds_with_client_certificates(tmp_path: Path) -> None:
    """etcd requiring TLS client certificates: reached with etcds:// and the CA/cert/key options;
    without a client certificate, or with the wrong CA, a clear StoreError."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("marblekeep-replica")
    files = {
        name: tmp_path / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key")
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server-key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client"]))
    client.private_key_pem.write_to_path(str(files["client-key"]))
    member = EtcdMember(tmp_path / "etcd", tls=(files["ca"], files["server"], files["server-key"])).start()
    try:
        url = f"etcds://127.0.0.1:{member.client_port}/tls-test"
        location = parse_store_url(
            url, ca_file=files["ca"], cert_file=files["client"], key_file=files["client-key"], timeout=10.0
        )
        assert isinstance(location, EtcdLocation)
        store: EtcdStore | None = None
        for _ in range(100):  # the member elects itself leader shortly after it listens
            try:
                store = await EtcdStore.open(location.config)
                break
            except StoreError:
                await asyncio.sleep(0.2)
        assert store is not None
        await put(store, {"a": b"over TLS"})
        assert await store.get("a") == b"over TLS"
        await store.close()

        no_client_cert = parse_store_url(url, ca_file=files["ca"], timeout=2.0)
        assert isinstance(no_client_cert, EtcdLocation)
        with pytest.raises(StoreError) as info:
            await EtcdStore.open(no_client_cert.config)
        assert "etcds://127.0.0.1" in info.value.message
        other_ca = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        wrong_ca = parse_store_url(
            url, ca_file=other_ca, cert_file=files["client"], key_file=files["client-key"], timeout=2.0
        )
        assert isinstance(wrong_ca, EtcdLocation)
        with pytest.raises(StoreError):
            await EtcdStore.open(wrong_ca.config)
    finally:
        member.stop()


async def test_watch_reports_other_writers_and_survives_compaction(etcd_server: EtcdMember) -> None:
    """The follower's watch: each commit of another writer is reported; a watch that starts behind
    etcd's compaction reports the current revision (the replica then re-reads everything)."""
    config = etcd_server.config()
    watcher = await EtcdStore.open(config)
    writer = await EtcdStore.open(config)
    start = await put(writer, {"a": b"0"})
    seen: list[int] = []

    async def follow() -> None:
        async for revision in watcher.watch_head(start):
            seen.append(revision)
            if len(seen) == 3:
                return

    task = asyncio.create_task(follow())
    revisions = []
    for i in range(3):
        revisions.append(await put(writer, {"a": str(i + 1).encode()}))
        await asyncio.sleep(0.05)
    await asyncio.wait_for(task, 30)
    assert seen == revisions

    # behind a compaction: the watch cannot replay, so it reports where the store is now
    for i in range(3):
        latest = await put(writer, {"a": f"later-{i}".encode()})
    channel = grpc.insecure_channel(etcd_server.target)
    try:
        rpc.KVStub(channel).Compact(rpc.CompactionRequest(revision=latest, physical=True), timeout=10)
    finally:
        channel.close()
    generator = watcher.watch_head(start)
    first = await asyncio.wait_for(generator.__anext__(), 30)
    assert first == latest == await watcher.revision()
    await generator.aclose()
    # reads after the compaction work (they read at the current revision)
    assert await watcher.get("a") == b"later-2"
    await watcher.close()
    await writer.close()


async def test_members_register_under_a_lease_and_disappear_with_it(etcd_server: EtcdMember) -> None:
    config = etcd_server.config()
    store = await EtcdStore.open(config)
    other = await EtcdStore.open(config)
    try:
        revision = await store.revision()
        lease = await store.register_member("r1", b'{"address": "127.0.0.1:1"}', ttl=30)
        assert await other.members() == {"r1": b'{"address": "127.0.0.1:1"}'}
        assert await store.keep_member_alive(lease) > 0
        assert await store.revision() == revision  # membership is not part of the store's content
        assert b"members/r1" in raw_keys(etcd_server, config.prefix)
        await store.revoke_member(lease)
        assert await other.members() == {}
        assert await store.keep_member_alive(lease) == 0  # an ended lease reports TTL 0

        # a replica that stops renewing (killed) disappears when its lease runs out
        await store.register_member("dead", b"{}", ttl=2)
        deadline = asyncio.get_running_loop().time() + 30
        while "dead" in await other.members():
            assert asyncio.get_running_loop().time() < deadline, "the lease never expired"
            await asyncio.sleep(0.2)

        # the Membership loop registers once the replica is ready, renews, and revokes at stop
        ready = False
        membership = Membership(store, "r2", "127.0.0.1:2", lambda: ready, ttl=3)
        membership.start()
        await asyncio.sleep(1.5)
        assert await other.members() == {}  # not ready: not registered
        ready = True
        await asyncio.wait_for(membership.registered.wait(), 30)
        await asyncio.sleep(4)  # longer than the TTL: still there because it is renewed
        assert set(await other.members()) == {"r2"}
        await membership.stop()
        assert await other.members() == {}
    finally:
        await store.close()
        await other.close()
